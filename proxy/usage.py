"""Token counts of one exchange, each with where it came from."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

TokenSource = Literal["upstream", "estimated"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens by the kinds that are priced apart.

    `input_tokens` includes `cached_input_tokens` and `cache_write_tokens` (as OpenAI's
    `prompt_tokens` includes `cached_tokens`); `output_tokens` includes `reasoning_tokens`.
    Pricing subtracts the parts so nothing is billed twice.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    input_source: TokenSource = "estimated"
    output_source: TokenSource = "estimated"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def with_output(self, output_tokens: int, source: TokenSource) -> Usage:
        return replace(self, output_tokens=output_tokens, output_source=source)
