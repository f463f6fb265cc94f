from __future__ import annotations

import hmac

import pytest
from pydantic import TypeAdapter, ValidationError

import proxy.keys as keys_module
from proxy.keys import KeyRing, VirtualKey, VirtualKeys, generate_key, hash_key, parse_bearer, request_user

ALICE_SECRET = "tg-alice-0123456789"
BOB_SECRET = "tg-bob-9876543210"


def _ring() -> KeyRing:
    return KeyRing(
        [
            VirtualKey(name="alice", key_sha256=hash_key(ALICE_SECRET), metadata={"team": "search"}),
            VirtualKey(name="bob", key_sha256=hash_key(BOB_SECRET), models=("gpt-4o-mini*", "local/*")),
        ]
    )


def test_hash_key_is_lowercase_sha256_hex() -> None:
    # The FIPS 180-2 test vector for "abc".
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_generate_key_is_random_and_hashable() -> None:
    a, b = generate_key(), generate_key()
    assert a != b and a.startswith("tg-") and len(a) > 40
    VirtualKey(name="k", key_sha256=hash_key(a))


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert parse_bearer(header) == token


def test_authenticate_finds_the_matching_key() -> None:
    ring = _ring()
    assert ring.enabled
    alice = ring.authenticate(ALICE_SECRET)
    assert alice is not None and alice.name == "alice" and alice.metadata == {"team": "search"}
    bob = ring.authenticate(BOB_SECRET)
    assert bob is not None and bob.name == "bob"


@pytest.mark.parametrize("presented", [None, "", "tg-alice-012345678", ALICE_SECRET + " ", hash_key(ALICE_SECRET)])
def test_authenticate_rejects_anything_else(presented: str | None) -> None:
    # Including the stored digest itself: the config does not hold usable secrets.
    assert _ring().authenticate(presented) is None


def test_authenticate_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    ring = _ring()
    assert ring.authenticate(ALICE_SECRET) is not None  # alice is first: no early exit
    assert len(calls) == 2
    calls.clear()
    assert ring.authenticate("nope") is None
    assert len(calls) == 2
    # Digests, not secrets, are compared: equal length whatever was presented.
    assert all(len(a) == 32 and len(b) == 32 for a, b in calls)


def test_allows_by_model_globs() -> None:
    ring = _ring()
    alice, bob = ring.by_name["alice"], ring.by_name["bob"]
    assert ring.allows(alice, "gpt-4o") and ring.allows(None, "anything")
    assert ring.allows(bob, "gpt-4o-mini") and ring.allows(bob, "gpt-4o-mini-2024-07-18")
    assert ring.allows(bob, "local/qwen")
    assert not ring.allows(bob, "gpt-4o")
    assert not ring.allows(bob, "GPT-4O-MINI")  # globs are case-sensitive, like model ids
    assert not ring.allows(bob, None)


def test_empty_ring_is_disabled() -> None:
    ring = KeyRing([])
    assert not ring.enabled and ring.authenticate("x") is None


@pytest.mark.parametrize(
    "digest",
    [hash_key("x").upper(), hash_key("x")[:-1], hash_key("x") + "0", "z" * 64],
)
def test_virtual_key_rejects_malformed_digests(digest: str) -> None:
    with pytest.raises(ValidationError) as err:
        VirtualKey(name="k", key_sha256=digest)
    assert err.value.errors()[0]["loc"] == ("key_sha256",)


def test_virtual_key_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError) as err:
        VirtualKey.model_validate({"name": "k", "key_sha256": hash_key("x"), "secret": "x"})
    assert err.value.errors()[0]["loc"] == ("secret",)


def test_virtual_keys_must_be_unique() -> None:
    adapter = TypeAdapter(VirtualKeys)

    def key(name: str, secret: str) -> dict[str, str]:
        return {"name": name, "key_sha256": hash_key(secret)}

    good = adapter.validate_python([key("a", "1"), key("b", "2")])
    assert [k.name for k in good] == ["a", "b"]
    with pytest.raises(ValidationError, match="used twice"):
        adapter.validate_python([key("a", "1"), key("a", "2")])
    with pytest.raises(ValidationError, match="same key_sha256"):
        adapter.validate_python([key("a", "1"), key("b", "1")])


def test_request_user_prefers_the_configured_header() -> None:
    assert request_user("body-user", "header-user") == "header-user"
    assert request_user("body-user", None) == "body-user"
    assert request_user("  body-user ", "  ") == "body-user"
    assert request_user(42, None) is None
    assert request_user(None, None) is None
    assert request_user("x" * 1000, None) == "x" * keys_module.MAX_USER_LENGTH
