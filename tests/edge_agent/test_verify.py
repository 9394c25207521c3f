"""The device's bytes-in trust checks, in DESIGN.md's order, on plain data."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.verify import (
    verify_artifact,
    verify_manifest,
    verify_tensor_signature,
)
from shared.errors import CompatibilityError, IntegrityError, SignatureError
from shared.manifest import (
    KeySignature,
    SignedManifest,
    build_manifest,
    sign_manifest,
    trusted_keyring,
)
from shared.tflite import read_signature


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed_for(data: bytes, key: Ed25519PrivateKey, device_types: tuple[str, ...] = ()):
    manifest = build_manifest(
        name="clf",
        version="1",
        data=data,
        signature=read_signature(data),
        device_types=device_types,
    )
    return manifest, sign_manifest(manifest, key)


def test_valid_manifest_for_this_device_type_verifies(model_v1: bytes, key) -> None:
    """A manifest signed by a trusted key and naming this device type passes."""
    manifest, signed = signed_for(model_v1, key, ("camera",))
    got = verify_manifest(signed, trusted_keyring([key.public_key()]), device_type="camera")
    assert got == manifest
    verify_artifact(got, model_v1)


def test_wrong_device_type_is_refused(model_v1: bytes, key) -> None:
    """A model signed for gateways does not run on a camera."""
    _, signed = signed_for(model_v1, key, ("gateway",))
    with pytest.raises(CompatibilityError) as err:
        verify_manifest(signed, trusted_keyring([key.public_key()]), device_type="camera")
    assert err.value.reason == "incompatible_device_type"


def test_unknown_key_and_flipped_signature_are_refused(model_v1: bytes, key) -> None:
    """Another key's signature, or one flipped bit of ours, fails verification."""
    _, signed = signed_for(model_v1, key)
    other = trusted_keyring([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(SignatureError):
        verify_manifest(signed, other, device_type="camera")
    raw = bytearray(base64.b64decode(signed.signatures[0].sig))
    raw[0] ^= 1
    flipped = SignedManifest(
        signed=signed.signed,
        signatures=(
            KeySignature(key_id=signed.signatures[0].key_id, sig=base64.b64encode(raw).decode()),
        ),
    )
    with pytest.raises(SignatureError) as err:
        verify_manifest(flipped, trusted_keyring([key.public_key()]), device_type="camera")
    assert err.value.reason == "signature_invalid"


def test_bytes_that_differ_from_the_manifest_are_refused(model_v1: bytes, key) -> None:
    """A truncated file fails on size; a same-size altered file fails on sha256."""
    manifest, _ = signed_for(model_v1, key)
    with pytest.raises(IntegrityError) as err:
        verify_artifact(manifest, model_v1[:-1])
    assert err.value.reason == "size_mismatch"
    altered = bytearray(model_v1)
    altered[-1] ^= 0xFF
    with pytest.raises(IntegrityError) as err:
        verify_artifact(manifest, bytes(altered))
    assert err.value.reason == "sha256_mismatch"
    assert hashlib.sha256(model_v1).hexdigest() == manifest.sha256


def test_tensor_signature_must_match_manifest_and_active_model(
    model_v1: bytes, model_other_signature: bytes, key
) -> None:
    """A file whose tensors differ from the signed ones, or from the active model's, is refused."""
    manifest, _ = signed_for(model_v1, key)
    v1_sig = read_signature(model_v1)
    other_sig = read_signature(model_other_signature)
    verify_tensor_signature(manifest, v1_sig, None)
    verify_tensor_signature(manifest, v1_sig, v1_sig)
    with pytest.raises(CompatibilityError) as err:
        verify_tensor_signature(manifest, other_sig, None)
    assert err.value.reason == "incompatible_manifest_mismatch"
    other_manifest, _ = signed_for(model_other_signature, key)
    with pytest.raises(CompatibilityError) as err:
        verify_tensor_signature(other_manifest, other_sig, v1_sig)
    assert err.value.reason == "incompatible"
