"""The URL space: which path is which model endpoint, under any spelling, and which paths
may be appended to an upstream's API base at all. Pure."""

from __future__ import annotations

from urllib.parse import unquote

from proxy.exchange import Endpoint

MODEL_PATHS: dict[str, Endpoint] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}

# The path after /v1 each model endpoint is sent upstream under.
CANONICAL: dict[Endpoint, str] = {endpoint: path[3:] for path, endpoint in MODEL_PATHS.items()}


def _decoded(path: str) -> str:
    # Percent-encoding is undone until it is stable (`%2e%2e`, `..%2f`, double encoding),
    # since the upstream, or anything in front of it, may decode again.
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return path


def escapes_api_base(raw_path: str) -> bool:
    """Whether a path could leave the upstream's API base once the upstream URL is built.

    The upstream URL is the configured base plus the client's path, and URL normalisation
    resolves dot segments: `/v1/../props` would reach `<root>/props` on the upstream host,
    with the upstream's credentials attached.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if "%" not in path and "/." not in path and not path.startswith(".") and "\\" not in path and "\x00" not in path:
        # The usual path: nothing encoded, and no segment begins with a dot.
        return False
    path = _decoded(path)
    if "\\" in path or "\x00" in path:
        return True
    return any(segment in (".", "..") for segment in path.split("/"))


def metered_endpoint(raw_path: str) -> Endpoint | None:
    """The model endpoint a path names under any spelling an upstream might accept: any
    case, repeated or trailing slashes, `.` segments, `;parameters`, percent-encoding.
    Such a request is metered (and budgeted) as that endpoint, never passed through."""
    path = _decoded(raw_path.split("?", 1)[0])
    segments = [seg.split(";", 1)[0].lower() for seg in path.split("/")]
    canonical = "/" + "/".join(seg for seg in segments if seg not in ("", "."))
    return MODEL_PATHS.get(canonical)
