"""Ed25519 signing keys on disk: create, load, and load trusted public keys.

Does file I/O only. Private keys are PKCS#8 PEM written with mode 0600 through
a temp file and `os.replace`, so a crash never leaves half a key behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from shared.errors import HotswapError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class KeyFileError(HotswapError):
    """A key file is missing, unreadable or of the wrong type."""

    reason = "bad_key"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically: temp file in the same dir, fsync, replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def init_keys(directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a signing key pair in `directory`; refuse to clobber an existing key."""
    private_path, public_path = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    if private_path.exists() and not overwrite:
        raise KeyFileError(f"{private_path} already exists (pass --force to replace it)")
    key = Ed25519PrivateKey.generate()
    write_atomic(
        private_path,
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        mode=0o600,
    )
    write_atomic(public_path, public_pem(key.public_key()))
    return private_path, public_path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from exc
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror}") from exc
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    keys = [load_public_key(p) for p in paths]
    if not keys:
        raise KeyFileError("no trusted public key given")
    return keys
