"""Virtual keys: who is calling, checked without keeping or leaking the secrets.

The YAML holds only sha256 digests of the keys (`tollgate keys hash` prints one). A
presented bearer token is hashed once and compared against every configured digest with
`hmac.compare_digest`, visiting all of them whether or not one matched, so the time taken
does not tell which key (or how much of one) was right.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from proxy.globs import check_glob

# Users end up in bucket ids and ledger keys; keep them bounded.
MAX_USER_LENGTH = 256


class VirtualKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    models: tuple[Annotated[str, AfterValidator(check_glob)], ...] | None = None  # allowed model globs; None = any model
    metadata: dict[str, str] = {}
    # Add `usage.cost` to this key's response bodies (and stream usage chunks), as the
    # x-tollgate-include-cost request header does per request.
    include_cost: bool = False


def _unique(keys: tuple[VirtualKey, ...]) -> tuple[VirtualKey, ...]:
    names: set[str] = set()
    digests: set[str] = set()
    for key in keys:
        if key.name in names:
            raise ValueError(f"key name {key.name!r} is used twice")
        if key.key_sha256 in digests:
            raise ValueError(f"key {key.name!r} has the same key_sha256 as another key")
        names.add(key.name)
        digests.add(key.key_sha256)
    return keys


# The type of the `keys:` section: names and digests unique.
VirtualKeys = Annotated[tuple[VirtualKey, ...], AfterValidator(_unique)]


def hash_key(secret: str) -> str:
    """The lowercase hex sha256 of a key: what goes into `key_sha256`."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_key(prefix: str = "tg-") -> str:
    """A fresh random key (256 bits) for `tollgate keys new`-style helpers."""
    return prefix + secrets.token_urlsafe(32)


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None when absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def request_user(body_user: object, header_value: str | None) -> str | None:
    """The user a request is attributed to.

    The configured header wins when present: it is set by whatever sits in front of the
    proxy, while the body's `user` is whatever the client chose to send.
    """
    for candidate in (header_value, body_user):
        if isinstance(candidate, str) and candidate.strip():
            return candidate.strip()[:MAX_USER_LENGTH]
    return None


class KeyRing:
    """The configured virtual keys. Empty = keys are off and requests are anonymous."""

    def __init__(self, keys: Sequence[VirtualKey]) -> None:
        self.keys: tuple[VirtualKey, ...] = tuple(keys)
        self._digests = [(bytes.fromhex(k.key_sha256), k) for k in self.keys]
        self.by_name: Mapping[str, VirtualKey] = {k.name: k for k in self.keys}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, presented: str | None) -> VirtualKey | None:
        """The key whose digest matches `presented`, else None. Constant time in the match."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: VirtualKey | None = None
        for expected, key in self._digests:
            # No break: every digest is compared so timing does not reveal the position.
            if hmac.compare_digest(digest, expected):
                found = key
        return found

    @staticmethod
    def allows(key: VirtualKey | None, model: str | None) -> bool:
        """Whether `key` may use `model`. Anonymous or unrestricted keys may use any model;
        a restricted key needs a model that matches one of its globs."""
        if key is None or key.models is None:
            return True
        if model is None:
            return False
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in key.models)
