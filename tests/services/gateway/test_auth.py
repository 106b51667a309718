"""API keys at the gateway: hashes only, compared in constant time against every accepted hash."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from kvmesh.services.gateway.auth import KEY_ID_CHARS, ApiKeys, bearer, key_hash, parse_hashes


def test_every_accepted_hash_is_compared_with_compare_digest_whatever_matched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The presented key's hash goes through hmac.compare_digest against each accepted hash,
    the matching one first or none at all: the work done does not depend on where, or how
    far, a hash matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    keys = ApiKeys([key_hash("alpha"), key_hash("beta"), key_hash("gamma")])
    for presented, expected in [("alpha", key_hash("alpha")[:KEY_ID_CHARS]),
                                ("gamma", key_hash("gamma")[:KEY_ID_CHARS]),
                                ("alphA", None), ("", None)]:  # fmt: skip
        calls.clear()
        assert keys.identify(presented) == expected
        digest = hashlib.sha256(presented.encode()).hexdigest().encode()
        assert calls == [(digest, h.encode()) for h in keys.hashes]


def test_hashes_come_from_the_list_and_the_file_which_reload_rereads(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"# ops team\n{key_hash('from-file').upper()}\n\n")
    keys = ApiKeys([key_hash("from-env")], file)
    assert keys.identify("from-file") and keys.identify("from-env")
    file.write_text("")
    assert keys.reload() and keys.identify("from-file") is None and keys.identify("from-env")
    file.write_text("not-a-hash\n")  # a broken file leaves the keys in force
    assert not keys.reload() and keys.identify("from-env")


def test_a_key_written_in_place_of_its_hash_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="entry 2: not a hex SHA-256 hash"):
        parse_hashes([key_hash("x"), "sk-live-123"], "keys")


def test_bearer_reads_only_an_authorization_bearer_entry() -> None:
    assert bearer([("x-other", "Bearer no"), ("authorization", "Bearer  k1 ")]) == "k1"
    assert bearer([("authorization", "bearer k2")]) == "k2"
    assert bearer([("authorization", "Basic k3")]) == ""
    assert bearer(None) == ""
