"""Model and path globs (fnmatch syntax) as the config gives them.

fnmatch never rejects a pattern: an unclosed `[` quietly becomes a literal, so `gpt-[4`
matches only the model named exactly "gpt-[4", and the route, price or budget it was meant
for silently applies to nothing. The config refuses such a pattern instead.
"""

from __future__ import annotations

__all__ = ["check_glob"]


def _class_end(pattern: str, start: int) -> int:
    """Index of the `]` closing the class opened at `start`, or -1 (fnmatch's own rules: a
    `]` straight after `[` or `[!` belongs to the set)."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "!":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    return pattern.find("]", i)


def check_glob(value: str) -> str:
    """`value` unchanged, or ValueError naming it when a `[` opens a class that never closes."""
    i = 0
    while i < len(value):
        if value[i] == "[":
            end = _class_end(value, i)
            if end < 0:
                raise ValueError(
                    f"{value!r} is not a valid glob: the '[' at position {i + 1} is never closed"
                    " (write [[] for a literal '[')"
                )
            i = end
        i += 1
    return value
