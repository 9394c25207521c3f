"""Manifest signing and verification: tampering, wrong keys, rotation, invalid content."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.errors import ArtifactError, SignatureError
from shared.manifest import (
    KeySignature,
    SignedManifest,
    TensorSignature,
    TensorSpec,
    build_manifest,
    canonical_json,
    key_id,
    sign_manifest,
    trusted_keyring,
    verify_signed_manifest,
)
from shared.tflite import read_signature


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signed(model_v1: bytes, key: Ed25519PrivateKey) -> SignedManifest:
    m = build_manifest(
        name="clf", version="1.0.0", data=model_v1, signature=read_signature(model_v1)
    )
    return sign_manifest(m, key)


def test_round_trip_returns_the_signed_manifest(signed: SignedManifest, key) -> None:
    """A manifest verifies against the key that signed it and parses back."""
    m = verify_signed_manifest(signed, trusted_keyring([key.public_key()]))
    assert (m.name, m.version) == ("clf", "1.0.0")
    assert signed.signatures[0].key_id == key_id(key.public_key())


def test_tampered_signed_bytes_are_refused(signed: SignedManifest, key) -> None:
    """Changing one field of the signed bytes (the sha256) breaks the signature."""
    body = json.loads(signed.signed)
    body["sha256"] = "0" * 64
    forged = SignedManifest(signed=canonical_json(body).decode(), signatures=signed.signatures)
    with pytest.raises(SignatureError) as err:
        verify_signed_manifest(forged, trusted_keyring([key.public_key()]))
    assert err.value.reason == "signature_invalid"


def test_flipped_signature_byte_is_refused(signed: SignedManifest, key) -> None:
    """One flipped bit in the signature fails verification."""
    raw = bytearray(base64.b64decode(signed.signatures[0].sig))
    raw[10] ^= 0x01
    bad = SignedManifest(
        signed=signed.signed,
        signatures=(
            KeySignature(key_id=signed.signatures[0].key_id, sig=base64.b64encode(raw).decode()),
        ),
    )
    with pytest.raises(SignatureError):
        verify_signed_manifest(bad, trusted_keyring([key.public_key()]))


def test_wrong_key_is_untrusted(signed: SignedManifest) -> None:
    """A manifest signed by a key the device does not trust is refused as untrusted_key."""
    with pytest.raises(SignatureError) as err:
        verify_signed_manifest(signed, trusted_keyring([Ed25519PrivateKey.generate().public_key()]))
    assert err.value.reason == "untrusted_key"


def test_key_rotation_accepts_either_trusted_key_and_refuses_a_removed_one(
    model_v1: bytes, key
) -> None:
    """With old and new keys trusted both verify; after removing the old key, it is refused."""
    new = Ed25519PrivateKey.generate()
    m = build_manifest(name="clf", version="2", data=model_v1, signature=read_signature(model_v1))
    by_old, by_new = sign_manifest(m, key), sign_manifest(m, new)
    both = trusted_keyring([key.public_key(), new.public_key()])
    assert verify_signed_manifest(by_old, both) == verify_signed_manifest(by_new, both)
    rotated = trusted_keyring([new.public_key()])
    verify_signed_manifest(by_new, rotated)
    with pytest.raises(SignatureError):
        verify_signed_manifest(by_old, rotated)


def test_validly_signed_invalid_manifest_is_manifest_invalid(key) -> None:
    """Signed bytes that are not a manifest give ArtifactError(manifest_invalid)."""
    payload = canonical_json({"name": "clf", "version": "1"})
    sig = base64.b64encode(key.sign(payload)).decode()
    bad = SignedManifest(
        signed=payload.decode(),
        signatures=(KeySignature(key_id=key_id(key.public_key()), sig=sig),),
    )
    with pytest.raises(ArtifactError) as err:
        verify_signed_manifest(bad, trusted_keyring([key.public_key()]))
    assert err.value.reason == "manifest_invalid"


def test_tensor_signatures_compare_names_shapes_types_and_quantization() -> None:
    """A candidate must take and give the same tensors: name, shape signature, dtype and
    quantization; the difference names the first tensor that differs."""
    from shared.manifest import Quantization

    a = TensorSignature(inputs=(TensorSpec(name="in", shape=(1, 4), dtype="float32"),),
                        outputs=(TensorSpec(name="out", shape=(1, 3), dtype="float32"),))  # fmt: skip

    def with_input(**kw: object) -> TensorSignature:
        spec = TensorSpec.model_validate({"name": "in", "shape": (1, 4), "dtype": "float32"} | kw)
        return TensorSignature(inputs=(spec,), outputs=a.outputs)

    assert a.difference(with_input()) is None and a.compatible_with(with_input())
    assert a.difference(with_input(name="x")) == "input 0 ('in'): name x instead of in"
    assert a.difference(with_input(shape=(1, 5))) == (
        "input 0 ('in'): shape [1, 5] instead of [1, 4]"
    )
    assert a.difference(with_input(shape=(-1, 4))) is not None  # dynamic is not static
    assert a.difference(with_input(dtype="int8")) == "input 0 ('in'): dtype int8 instead of float32"
    q = Quantization(scale=(0.5,), zero_point=(3,))
    assert "quantization" in (a.difference(with_input(quantization=q)) or "")
    two_out = TensorSignature(inputs=a.inputs, outputs=a.outputs * 2)
    assert a.difference(two_out) == "2 outputs instead of 1"
    assert a.describe() == "(float32[1, 4]) -> (float32[1, 3])"
