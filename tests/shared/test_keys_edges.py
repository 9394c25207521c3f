"""Key file edge cases: overwrite on request, wrong key types, permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from shared.keys import (
    KeyFileError,
    init_keys,
    load_private_key,
    load_public_key,
    load_public_keys,
    public_pem,
    write_atomic,
)
from shared.manifest import key_id


def test_init_creates_the_directory_and_a_readable_public_key(tmp_path: Path) -> None:
    """A missing directory is created; signing.pub is not private (0644)."""
    _, pub = init_keys(tmp_path / "a" / "b")
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_refusal_keeps_the_existing_key_and_says_how_to_replace_it(tmp_path: Path) -> None:
    """A refused init leaves the old key byte for byte and mentions --force."""
    priv, _ = init_keys(tmp_path)
    before = priv.read_bytes()
    with pytest.raises(KeyFileError, match=r"already exists.*--force") as err:
        init_keys(tmp_path)
    assert priv.read_bytes() == before and err.value.reason == "bad_key"


def test_overwrite_replaces_the_pair(tmp_path: Path) -> None:
    """overwrite=True writes a new key, still 0600, matching the new public key."""
    priv, pub = init_keys(tmp_path)
    old = key_id(load_public_key(pub))
    init_keys(tmp_path, overwrite=True)
    assert key_id(load_public_key(pub)) != old
    assert key_id(load_private_key(priv).public_key()) == key_id(load_public_key(pub))
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


def test_no_temp_files_are_left_behind(tmp_path: Path) -> None:
    """The atomic writes leave only signing.key and signing.pub in the directory."""
    init_keys(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.key", "signing.pub"]


def test_write_atomic_replaces_content_and_sets_mode(tmp_path: Path) -> None:
    """A second write replaces the content with the requested mode."""
    target = tmp_path / "f"
    write_atomic(target, b"one")
    write_atomic(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_public_key_given_as_private_is_refused_clearly(tmp_path: Path) -> None:
    """Passing signing.pub where the private key belongs names the file in the error."""
    _, pub = init_keys(tmp_path)
    with pytest.raises(KeyFileError, match=r"signing\.pub is not an unencrypted PEM private key"):
        load_private_key(pub)


def test_missing_public_key_and_directory_as_key(tmp_path: Path) -> None:
    """An absent public key or a directory path gives 'cannot read', not an OSError."""
    with pytest.raises(KeyFileError, match="cannot read public key"):
        load_public_key(tmp_path / "nope.pub")
    with pytest.raises(KeyFileError, match="cannot read signing key"):
        load_private_key(tmp_path)


def test_encrypted_private_key_is_refused(tmp_path: Path) -> None:
    """A passphrase-protected PEM is a KeyFileError, not a TypeError."""
    path = tmp_path / "enc.key"
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw"))
    )
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(path)


def test_keys_of_another_algorithm_are_refused(tmp_path: Path) -> None:
    """EC keys are valid PEM but not Ed25519: refused on both sides."""
    ec = generate_private_key(SECP256R1())
    priv, pub = tmp_path / "ec.key", tmp_path / "ec.pub"
    priv.write_bytes(ec.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    pub.write_bytes(ec.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        load_private_key(priv)
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(pub)


def test_load_public_keys_loads_each_and_fails_on_any_bad_one(tmp_path: Path) -> None:
    """Several trusted keys load in order; one garbage file fails the whole list."""
    keys = [Ed25519PrivateKey.generate().public_key() for _ in range(2)]
    paths = []
    for i, k in enumerate(keys):
        p = tmp_path / f"{i}.pub"
        p.write_bytes(public_pem(k))
        paths.append(p)
    assert [key_id(k) for k in load_public_keys(paths)] == [key_id(k) for k in keys]
    (tmp_path / "bad.pub").write_text("garbage")
    with pytest.raises(KeyFileError):
        load_public_keys([*paths, tmp_path / "bad.pub"])
