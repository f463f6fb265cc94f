"""`python -m bench fidelity`: the local prompt estimate next to OpenAI's real count.

Every real OpenAI capture whose response reports usage (non-stream bodies, and streams with
`include_usage`) is estimated from its request body, as Tollgate estimates a request whose
upstream reports no usage, and printed next to the real `prompt_tokens` with the error.
Captures are read from tests/fixtures/openai and tests/fixtures/openai-extra (and, when
present, ../shared/fixtures/openai); a capture name seen twice is counted once.

The bound column is the accuracy the project holds itself to (tests/unit/
test_prompt_estimate_accuracy.py asserts the same bounds): ±3 tokens for text, tools,
response_format and suffix; ±5% for images; a remote image (size unknown) is estimated at
the model's largest billed image and marked `assumed`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from proxy import estimate as estimating
from proxy import usage as usage_json
from proxy.encodings import warm

REPO = Path(__file__).resolve().parents[1]
CAPTURE_DIRS = (
    REPO / "tests" / "fixtures" / "openai",
    REPO / "tests" / "fixtures" / "openai-extra",
    REPO.parent / "shared" / "fixtures" / "openai",
    Path("/work/shared/fixtures/openai"),
)


@dataclass(frozen=True, slots=True)
class Case:
    capture: str
    endpoint: str
    model: str
    kind: str  # text | tools | response_format | suffix | image | audio
    real: int
    estimate: int
    image_assumed: bool

    @property
    def error(self) -> int:
        return self.estimate - self.real

    @property
    def relative(self) -> float:
        return self.error / self.real if self.real else 0.0

    @property
    def bound(self) -> str:
        return "±5%" if self.kind == "image" else "±3"

    @property
    def within(self) -> bool:
        if self.kind == "image":
            return abs(self.relative) <= 0.05
        if self.kind == "audio":
            # Audio is sized from its WAV header; the ±3 bound applies as to text.
            return abs(self.error) <= 3
        return abs(self.error) <= 3


def real_prompt_tokens(endpoint: str, raw: str) -> int | None:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        usage = usage_json.usage_from_body(endpoint, body)
        return None if usage is None else usage.input_tokens
    found = None
    for line in raw.splitlines():
        if line.startswith("data: {"):
            usage = usage_json.usage_from_stream_payload(endpoint, json.loads(line[len("data: "):]))
            if usage is not None:
                found = usage.input_tokens
    return found


def _kind(endpoint: str, body: dict[str, Any]) -> str:
    text = json.dumps(body)
    if '"image_url"' in text or '"input_image"' in text:
        return "image"
    if '"input_audio"' in text:
        return "audio"
    if body.get("tools") or body.get("functions"):
        return "tools"
    if isinstance(body.get("response_format"), dict) and body["response_format"].get("type") == "json_schema":
        return "response_format"
    if endpoint == "completions" and body.get("suffix"):
        return "suffix"
    return "text"


def capture_files(dirs: tuple[Path, ...] = CAPTURE_DIRS) -> list[Path]:
    seen: dict[str, Path] = {}
    for root in dirs:
        if root.is_dir():
            for path in sorted(root.glob("*.yaml")):
                seen.setdefault(path.stem, path)
    return [seen[name] for name in sorted(seen)]


def cases(dirs: tuple[Path, ...] = CAPTURE_DIRS) -> list[Case]:
    out = []
    for path in capture_files(dirs):
        cassette = yaml.safe_load(path.read_text())
        for interaction in cassette.get("interactions", []):
            request, response = interaction["request"], interaction["response"]
            if response.get("code") != 200:
                continue
            url = request["url"].split("?", 1)[0]
            tail = url.split("/v1/", 1)[1] if "/v1/" in url else url.rsplit("/deployments/", 1)[-1].split("/", 1)[-1]
            endpoint = tail.replace("/", ".")
            if endpoint not in ("chat.completions", "completions", "embeddings", "responses"):
                continue
            real = real_prompt_tokens(endpoint, response["body"])
            if real is None:
                continue
            body = json.loads(request["body"])
            model = body.get("model", "")
            detail = estimating.estimate_prompt(endpoint, body, model)
            out.append(Case(path.stem, endpoint, model, _kind(endpoint, body), real, detail.tokens,
                            detail.image_size_assumed))
    return out


def render(rows: list[Case]) -> str:
    lines = [f"{'capture':34} {'endpoint':16} {'model':28} {'kind':15} {'real':>6} {'est':>6} "
             f"{'error':>6} {'error%':>7} {'bound':>5} ok"]
    for r in rows:
        note = " (image size assumed)" if r.image_assumed else ""
        lines.append(
            f"{r.capture:34} {r.endpoint:16} {r.model:28} {r.kind:15} {r.real:6d} {r.estimate:6d} "
            f"{r.error:+6d} {r.relative * 100:+6.1f}% {r.bound:>5} {'yes' if r.within else 'NO'}{note}"
        )
    worst = max((abs(r.error) for r in rows if r.kind != "image"), default=0)
    lines.append(f"{len(rows)} cases; {sum(r.within for r in rows)} within bound; "
                 f"largest non-image |error| {worst} tokens")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object per case")
    a = p.parse_args(argv)
    warm(["gpt-3.5-turbo"])  # cl100k_base too, built before anything is estimated
    rows = cases()
    if a.json:
        for r in rows:
            print(json.dumps({**asdict(r), "error": r.error, "within_bound": r.within}))
    else:
        print(render(rows))
    return 0 if all(r.within for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
