"""Operator keys on disk: created private, never clobbered, clear errors when wrong."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.keys import KeyFileError, init_keys, load_private_key, load_public_key, load_public_keys


def test_init_writes_a_0600_private_key_and_a_public_key(tmp_path: Path) -> None:
    """signing.key is readable by its owner only; the pair belongs together."""
    priv, pub = init_keys(tmp_path / "keys")
    assert (priv.name, pub.name) == ("signing.key", "signing.pub")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    private = load_private_key(priv)
    public = load_public_key(pub)
    assert private.public_key().public_bytes_raw() == public.public_bytes_raw()


def test_init_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    """A second init in the same directory fails instead of replacing the key."""
    init_keys(tmp_path)
    with pytest.raises(KeyFileError):
        init_keys(tmp_path)


def test_loading_errors_say_what_is_wrong(tmp_path: Path) -> None:
    """Missing file, garbage, and a public key given as private: one clear KeyFileError each."""
    priv, pub = init_keys(tmp_path)
    with pytest.raises(KeyFileError, match="cannot read signing key"):
        load_private_key(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_private_key(garbage)
    with pytest.raises(KeyFileError):
        load_private_key(pub)
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(priv)
    with pytest.raises(KeyFileError, match="no trusted public key"):
        load_public_keys([])
