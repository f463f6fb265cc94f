"""The synthetic upstream's vocabulary and its record of what it did (`Truth`): what the
demo compares Tollgate's measurements with. Pure."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.estimate import count_text_tokens

# Common English words, each one o200k_base token when preceded by a space (checked by
# `SyntheticUpstream.start`, so a tokenizer change cannot silently break the "truth").
WORDS: tuple[str, ...] = tuple(
    "the quick brown fox jumps over lazy dog and then runs far away into green hills where"
    " small birds sing every morning while rivers flow softly under bright blue skies".split()
)

DEFAULT_EMBEDDING_DIMENSIONS = 16


def completion_words(n: int) -> list[str]:
    """The `n` tokens every completion of length `n` consists of (deterministic)."""
    return [" " + WORDS[i % len(WORDS)] for i in range(n)]


@dataclass(slots=True)
class Truth:
    """What the synthetic upstream did for one request, on the perf_counter_ns clock."""

    request_id: str
    endpoint: str  # chat.completions, completions, embeddings
    model: str
    stream: bool
    include_usage: bool
    t_received_ns: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    t_role_ns: int | None = None  # role-only chunk written (chat streams)
    token_times_ns: list[int] = field(default_factory=list)  # each output-carrying chunk written
    t_body_ns: int | None = None  # whole body written (non-streams)
    t_done_ns: int | None = None  # last byte written
    aborted: bool = False

    @property
    def ttft_s(self) -> float | None:
        """First output-carrying chunk written, since the request arrived."""
        if not self.token_times_ns:
            return None
        return (self.token_times_ns[0] - self.t_received_ns) / 1e9

    @property
    def time_to_body_s(self) -> float | None:
        """Non-streams: the whole body written, since the request arrived."""
        return None if self.t_body_ns is None else (self.t_body_ns - self.t_received_ns) / 1e9

    @property
    def gaps_s(self) -> list[float]:
        t = self.token_times_ns
        return [(b - a) / 1e9 for a, b in itertools.pairwise(t)]

    @property
    def mean_gap_s(self) -> float | None:
        gaps = self.gaps_s
        return sum(gaps) / len(gaps) if gaps else None


def check_vocabulary(model: str) -> None:
    """Refuse to run if the words are not one token each (the truth would be wrong)."""
    words = completion_words(len(WORDS))
    bad = [w for w in words if count_text_tokens(w, model) != 1]
    if bad or count_text_tokens("".join(words), model) != len(words):
        raise RuntimeError(f"synthetic vocabulary is not one token per word for {model!r}: {bad}")


def embedding_inputs(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) for v in value):
            return [orjson.dumps(value).decode()]
        if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            return [orjson.dumps(v).decode() for v in value]
    return None


def vector(text: str, dims: int) -> list[float]:
    """A deterministic unit-free vector in [-1, 1) from the text's hash."""
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend((b - 128) / 128 for b in digest)
        counter += 1
    return out[:dims]
