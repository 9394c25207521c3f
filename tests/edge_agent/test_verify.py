"""The device's bytes-in trust checks, in DESIGN.md's order, on plain data."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.verify import (
    raised_floor,
    verify_artifact,
    verify_interface,
    verify_manifest,
    verify_not_downgrade,
    verify_tensor_signature,
    version_order,
)
from shared.errors import CompatibilityError, DowngradeError, IntegrityError, SignatureError
from shared.manifest import (
    KeySignature,
    Manifest,
    Quantization,
    SignedManifest,
    build_manifest,
    canonical_json,
    sign_manifest,
    trusted_keyring,
)
from shared.model_builder import build_dense_model, build_quantized_model, build_two_input_model
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


def test_a_manifest_for_another_framework_is_refused(model_v1: bytes, key) -> None:
    """The signed framework is part of the binding: an ONNX manifest never reaches the loader."""
    manifest, _ = signed_for(model_v1, key)
    onnx = sign_manifest(manifest.model_copy(update={"framework": "onnx"}), key)
    with pytest.raises(CompatibilityError) as err:
        verify_manifest(onnx, trusted_keyring([key.public_key()]), device_type="camera")
    assert err.value.reason == "incompatible_framework"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "other"),
        ("version", "9.9.9"),
        ("sha256", "0" * 64),
        ("size", 1),
        ("deviceTypes", ["camera", "gateway"]),
        ("signature", {"inputs": [], "outputs": []}),
    ],
)
def test_mix_and_match_any_edited_manifest_field_breaks_the_signature(
    model_v1: bytes, key, field: str, value: object
) -> None:
    """Name, version, sha256, size, device types and tensors are signed together."""
    _, signed = signed_for(model_v1, key, ("camera",))
    body = json.loads(signed.signed)
    body[field] = value
    edited = SignedManifest(signed=canonical_json(body).decode(), signatures=signed.signatures)
    with pytest.raises(SignatureError) as err:
        verify_manifest(edited, trusted_keyring([key.public_key()]), device_type="camera")
    assert err.value.reason == "signature_invalid"


def manifest_at(version: str, data: bytes) -> Manifest:
    return build_manifest(name="clf", version=version, data=data, signature=read_signature(data))


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.10.0", "1.9.0", 1),
        ("2.0.0rc1", "2.0.0", -1),
        ("2.0.0-rc1", "2.0.0rc1", 0),  # PEP 440 normalises the spelling
        ("1.0", "1.0.0", 0),
        ("2.0.0+build7", "2.0.0", 1),
        ("2.0.0-slow", "1.0.0", None),  # not PEP 440
        ("a", "b", None),
    ],
)
def test_versions_are_ordered_as_pep_440(a: str, b: str, order: int | None) -> None:
    """Numeric, not lexical; pre-releases below releases; other strings have no order."""
    assert version_order(a, b) == order


def test_a_lower_version_is_refused_unless_the_command_allows_it(model_v1: bytes) -> None:
    """Floor 2.0.0: 1.9.9 is a downgrade; 2.0.0 and 2.0.1 pass; allow_downgrade lets 1.9.9 in."""
    floor = {"clf": "2.0.0"}
    with pytest.raises(DowngradeError) as err:
        verify_not_downgrade(manifest_at("1.9.9", model_v1), floor, allow_downgrade=False)
    assert (err.value.reason, err.value.version, err.value.highest) == (
        "downgrade",
        "1.9.9",
        "2.0.0",
    )
    for version in ("2.0.0", "2.0.1", "10.0"):
        verify_not_downgrade(manifest_at(version, model_v1), floor, allow_downgrade=False)
    verify_not_downgrade(manifest_at("1.9.9", model_v1), floor, allow_downgrade=True)
    verify_not_downgrade(manifest_at("0.1", model_v1), {"other": "9"}, allow_downgrade=False)


def test_a_version_that_cannot_be_ordered_is_refused_over_a_floor(model_v1: bytes) -> None:
    """Not PEP 440 on either side: `version_unorderable`, unless downgrades are allowed."""
    for version, floor in (("2.0.0-slow", "1.0.0"), ("3.0.0", "weird"), ("b", "a")):
        with pytest.raises(DowngradeError) as err:
            verify_not_downgrade(
                manifest_at(version, model_v1), {"clf": floor}, allow_downgrade=False
            )
        assert err.value.reason == "version_unorderable"
        verify_not_downgrade(manifest_at(version, model_v1), {"clf": floor}, allow_downgrade=True)


def test_the_floor_only_goes_up() -> None:
    """Activating higher raises it; lower or unorderable leaves it; PEP 440 replaces a non-PEP one."""
    assert raised_floor({}, "clf", "1.0.0") == {"clf": "1.0.0"}
    assert raised_floor({"clf": "1.0.0"}, "clf", "2.0.0") == {"clf": "2.0.0"}
    assert raised_floor({"clf": "2.0.0"}, "clf", "1.0.0") == {"clf": "2.0.0"}
    assert raised_floor({"clf": "2.0.0"}, "clf", "x") == {"clf": "2.0.0"}
    assert raised_floor({"clf": "x"}, "clf", "y") == {"clf": "x"}
    assert raised_floor({"clf": "x"}, "clf", "0.1") == {"clf": "0.1"}
    floors = {"clf": "2.0.0"}
    assert raised_floor(floors, "det", "0.1") == {"clf": "2.0.0", "det": "0.1"}
    assert floors == {"clf": "2.0.0"}  # not mutated


def test_an_incompatible_interface_is_refused_naming_the_first_differing_tensor() -> None:
    """Same inputs, another second output shape: `incompatible`, and the message says which
    tensor differs and how (candidate's value instead of the served one's)."""
    served = read_signature(build_two_input_model(seed=1))
    candidate = build_two_input_model(seed=2, regression=3)
    manifest = manifest_at("2.0.0", candidate)
    with pytest.raises(CompatibilityError) as err:
        verify_interface(manifest, served)
    assert err.value.reason == "incompatible"
    assert "output 1 ('regression'): shape [1, 3] instead of [1, 2]" in str(err.value)
    verify_interface(manifest_at("2.0.0", build_two_input_model(seed=3)), served)  # other weights
    verify_interface(manifest, None)  # nothing served yet: nothing to protect


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        (build_two_input_model(features=5), "input 0 ('features'): shape [1, 5] instead of [1, 4]"),
        (build_dense_model(), "1 inputs instead of 2"),
        (build_two_input_model(classes=4), "output 0 ('scores'): shape [1, 4] instead of [1, 3]"),
    ],
)
def test_inputs_outputs_and_counts_are_all_part_of_the_interface(
    candidate: bytes, message: str
) -> None:
    """An input the application feeds, an output it reads, or their number."""
    with pytest.raises(CompatibilityError, match=re.escape(message)):
        verify_interface(manifest_at("2", candidate), read_signature(build_two_input_model()))


def test_quantization_is_part_of_the_interface() -> None:
    """int8 input with another scale: the application's quantized values would mean
    something else."""
    served = read_signature(build_quantized_model(seed=1))
    q = Quantization(scale=(0.5,), zero_point=(0,))
    other = served.model_copy(
        update={"inputs": (served.inputs[0].model_copy(update={"quantization": q}),)}
    )
    with pytest.raises(CompatibilityError) as err:
        verify_interface(manifest_at("2", build_quantized_model(seed=2)), other)
    assert (
        "input 0 ('input'): quantization q(scale=0.0625, zero_point=0) instead of "
        "q(scale=0.5, zero_point=0)"
    ) in str(err.value)


def test_an_interface_change_is_accepted_when_the_manifest_or_the_command_says_so() -> None:
    """`interface_change` in the signed manifest, or the command's allow_interface_change."""
    served = read_signature(build_two_input_model())
    data = build_dense_model()
    verify_interface(manifest_at("2", data), served, allow_interface_change=True)
    changed = manifest_at("2", data).model_copy(update={"interface_change": True})
    verify_interface(changed, served)
    verify_tensor_signature(changed, read_signature(data), served)


def test_the_file_must_be_exactly_what_the_manifest_signs_even_with_a_change_allowed() -> None:
    """The manifest-vs-file check stays strict: tensors (named) and signature keys."""
    data = build_two_input_model()
    manifest = manifest_at("2", data)
    loaded = read_signature(build_two_input_model(context=3))
    with pytest.raises(CompatibilityError) as err:
        verify_tensor_signature(manifest, loaded, None, allow_interface_change=True)
    assert err.value.reason == "incompatible_manifest_mismatch"
    assert "input 1 ('context'): shape [1, 3] instead of [1, 2]" in str(err.value)
    keyed = read_signature(data).model_copy(update={"signature_keys": ("serving_default",)})
    with pytest.raises(CompatibilityError, match="signature keys") as err:
        verify_tensor_signature(manifest, keyed, None)
    assert err.value.reason == "incompatible_manifest_mismatch"
