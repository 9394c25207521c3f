"""Manifest edge cases: several signatures, malformed signatures and content checks."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from shared.errors import ArtifactError, SignatureError
from shared.manifest import (
    KeySignature,
    Manifest,
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


def _manifest(data: bytes, **kw: object) -> Manifest:
    return build_manifest(
        name="clf", version="1.0.0", data=data, signature=read_signature(data), **kw
    )


def _with(signed: SignedManifest, *sigs: KeySignature) -> SignedManifest:
    return SignedManifest(signed=signed.signed, signatures=sigs)


def test_build_manifest_records_hash_and_size(model_v1: bytes) -> None:
    """sha256 and size are those of the given bytes."""
    m = _manifest(model_v1, device_types=["cam"])
    assert m.sha256 == hashlib.sha256(model_v1).hexdigest() and m.size == len(model_v1)
    assert m.device_types == ("cam",) and m.ref == "clf@1.0.0"


def test_an_untrusted_extra_signature_does_not_block_a_trusted_one(model_v1: bytes) -> None:
    """With signatures by an unknown key and a trusted key, the trusted one verifies."""
    trusted, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good = sign_manifest(_manifest(model_v1), trusted)
    other = sign_manifest(_manifest(model_v1), stranger)
    both = _with(good, other.signatures[0], good.signatures[0])
    assert verify_signed_manifest(both, trusted_keyring([trusted.public_key()])).name == "clf"


def test_a_bad_entry_for_a_trusted_key_is_skipped_if_another_verifies(model_v1: bytes) -> None:
    """A broken signature entry does not hide a valid one from a second trusted key."""
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    by_b = sign_manifest(_manifest(model_v1), b)
    broken_a = KeySignature(key_id=key_id(a.public_key()), sig=base64.b64encode(b"x" * 64).decode())
    ring = trusted_keyring([a.public_key(), b.public_key()])
    verify_signed_manifest(_with(by_b, broken_a, by_b.signatures[0]), ring)


@pytest.mark.parametrize("sig", ["not base64!!", "", base64.b64encode(b"short").decode()])
def test_malformed_signature_encoding_is_signature_invalid(model_v1: bytes, sig: str) -> None:
    """Invalid base64 or a wrong-length signature is refused as signature_invalid, not a crash."""
    key = Ed25519PrivateKey.generate()
    signed = sign_manifest(_manifest(model_v1), key)
    bad = _with(signed, KeySignature(key_id=signed.signatures[0].key_id, sig=sig))
    with pytest.raises(SignatureError) as err:
        verify_signed_manifest(bad, trusted_keyring([key.public_key()]))
    assert err.value.reason == "signature_invalid"


def test_no_signatures_is_untrusted(model_v1: bytes) -> None:
    """A manifest with an empty signature list is refused as untrusted_key."""
    key = Ed25519PrivateKey.generate()
    bare = _with(sign_manifest(_manifest(model_v1), key))
    with pytest.raises(SignatureError) as err:
        verify_signed_manifest(bare, trusted_keyring([key.public_key()]))
    assert err.value.reason == "untrusted_key"


def test_signature_from_one_key_under_another_keys_id_is_refused(model_v1: bytes) -> None:
    """Claiming a trusted key id for a signature made by another key does not verify."""
    trusted, attacker = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    forged_sig = sign_manifest(_manifest(model_v1), attacker).signatures[0].sig
    good = sign_manifest(_manifest(model_v1), trusted)
    forged = _with(good, KeySignature(key_id=good.signatures[0].key_id, sig=forged_sig))
    with pytest.raises(SignatureError):
        verify_signed_manifest(forged, trusted_keyring([trusted.public_key()]))


@pytest.mark.parametrize(
    "payload",
    [b"not json", canonical_json({"name": "clf/evil"}), canonical_json({"extra": 1})],
)
def test_signed_garbage_is_manifest_invalid(payload: bytes) -> None:
    """Validly signed bytes that are not a valid manifest raise ArtifactError(manifest_invalid)."""
    key = Ed25519PrivateKey.generate()
    sig = base64.b64encode(key.sign(payload)).decode()
    signed = SignedManifest(
        signed=payload.decode(),
        signatures=(KeySignature(key_id=key_id(key.public_key()), sig=sig),),
    )
    with pytest.raises(ArtifactError) as err:
        verify_signed_manifest(signed, trusted_keyring([key.public_key()]))
    assert err.value.reason == "manifest_invalid" and not isinstance(err.value, SignatureError)
    with pytest.raises(ArtifactError):
        signed.unverified()


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "a/b"), ("version", ""), ("sha256", "AB" * 32), ("sha256", "ab"), ("size", 0)],
)
def test_manifest_fields_are_validated(model_v1: bytes, field: str, value: object) -> None:
    """Bad names, versions, non-lowercase or short hashes and zero size are refused."""
    data = _manifest(model_v1).model_dump()
    data[field] = value
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)


def test_canonical_json_is_key_order_independent() -> None:
    """Equal mappings give identical bytes whatever their insertion order."""
    assert canonical_json({"b": 1, "a": "é"}) == canonical_json({"a": "é", "b": 1})
    assert canonical_json({"a": "é"}) == '{"a":"é"}'.encode()


def test_compatible_with_needs_the_same_tensor_counts(
    model_v1: bytes, model_other_signature: bytes
) -> None:
    """An extra output or a different input width makes signatures incompatible."""
    sig = read_signature(model_v1)
    extra = TensorSignature(
        inputs=sig.inputs,
        outputs=(*sig.outputs, TensorSpec(name="aux", shape=(1,), dtype="float32")),
    )
    assert sig.compatible_with(sig)
    assert not sig.compatible_with(extra) and not extra.compatible_with(sig)
    assert not sig.compatible_with(read_signature(model_other_signature))
