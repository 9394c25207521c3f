"""The artifact manifest and its Ed25519 signature (the trust chain's first link).

A manifest binds together what a model *is*: name, version, sha256, size,
framework, tensor signature and the device types it may run on. It is signed as
canonical JSON bytes and travels as those exact bytes, so verification never
depends on re-serialising a parsed object (the TUF "signed" / "signatures" split).

Verification is a bytes-in core: no network, no disk. Callers fetch and store
around it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from shared.errors import ArtifactError, SignatureError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
MAX_MANIFEST_BYTES = 64 * 1024


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid"
    )


class Quantization(_Wire):
    """Affine quantization of a tensor: real = scale * (q - zero_point).

    One scale and zero point per tensor, or one per slice along `dimension`
    (per-channel). Read from the model file itself.
    """

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    dimension: int = 0

    def describe(self) -> str:
        if len(self.scale) == 1:
            return f"q(scale={self.scale[0]:.6g}, zero_point={self.zero_point[0]})"
        return f"q(per-channel x{len(self.scale)} on dim {self.dimension})"


class TensorSpec(_Wire):
    """One input or output tensor: what a model promises its callers.

    `shape` is the shape signature: -1 marks a dimension the model takes at any
    size (resized on first use or by the caller).
    """

    name: str = Field(max_length=256)
    shape: tuple[int, ...]
    dtype: str = Field(max_length=32)
    quantization: Quantization | None = None

    def difference(self, other: TensorSpec) -> str | None:
        """How `other` (a candidate's tensor) differs from this one, or None if it is the same.

        Same name, dtype, shape signature and quantization: an application that
        feeds or reads this tensor by name, with these bytes, keeps working.
        """
        for what, mine, theirs in (
            ("name", self.name, other.name),
            ("dtype", self.dtype, other.dtype),
            ("shape", list(self.shape), list(other.shape)),
            ("quantization", self._quant(), other._quant()),
        ):
            if mine != theirs:
                return f"{what} {theirs} instead of {mine}"
        return None

    def _quant(self) -> str:
        return self.quantization.describe() if self.quantization else "none"

    def describe(self) -> str:
        quant = f" {self.quantization.describe()}" if self.quantization else ""
        return f"{self.name}:{self.dtype}{list(self.shape)}{quant}"


class TensorSignature(_Wire):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Named signature runners of the model (its SignatureDefs), if it has any.
    signature_keys: tuple[str, ...] = ()

    def difference(self, candidate: TensorSignature) -> str | None:
        """The first way `candidate` cannot stand in for this interface, or None.

        Compatible means: the same inputs and the same outputs, in the same order,
        each with the same name, dtype, shape signature and quantization. The
        answer names the first differing tensor.
        """
        for side, mine, theirs in (
            ("input", self.inputs, candidate.inputs),
            ("output", self.outputs, candidate.outputs),
        ):
            if len(mine) != len(theirs):
                return f"{len(theirs)} {side}s instead of {len(mine)}"
            for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                diff = a.difference(b)
                if diff is not None:
                    return f"{side} {i} ({a.name!r}): {diff}"
        return None

    def compatible_with(self, other: TensorSignature) -> bool:
        return self.difference(other) is None

    def describe(self) -> str:
        def side(specs: tuple[TensorSpec, ...]) -> str:
            return ",".join(f"{s.dtype}{list(s.shape)}" for s in specs)

        return f"({side(self.inputs)}) -> ({side(self.outputs)})"


TaskKind = Literal["classifier", "detector", "none"]


class ModelTask(_Wire):
    """What the model's outputs mean, so that telemetry knows what "confidence" is.

    - `classifier`: `output` holds class scores (probabilities or logits) along
      its last axis; confidence is the top score per inference.
    - `detector`: `output` holds per-candidate scores; confidence is the mean
      score of the candidates above `score_threshold` (none above: no sample).
    - `none`: no confidence (landmarks, regressors, embeddings, ...): confidence
      gates report `not applicable`.
    """

    kind: TaskKind
    output: str | None = Field(default=None, max_length=256)
    score_threshold: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _complete(self) -> ModelTask:
        if self.kind != "none" and not self.output:
            raise ValueError(f"a {self.kind} task names its output tensor")
        if self.kind == "detector" and self.score_threshold is None:
            raise ValueError("a detector task has a score threshold")
        return self


class Manifest(_Wire):
    """What the operator signs: the identity and the promises of one model file."""

    name: str
    version: str
    sha256: str
    size: int = Field(gt=0)
    framework: str = "tflite"
    signature: TensorSignature
    created_at: datetime
    device_types: tuple[str, ...] = ()
    # What the outputs mean (telemetry's confidence); None: inferred from the signature.
    task: ModelTask | None = None
    # The operator means this version to change the tensor interface of the one it
    # replaces (`model push --interface-change`): devices accept the difference.
    interface_change: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("model name: 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION.match(v):
            raise ValueError("version: 1-64 letters, digits, '.', '_', '+' or '-'")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return v

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class KeySignature(_Wire):
    key_id: str
    sig: str  # base64 of the 64-byte Ed25519 signature


class SignedManifest(_Wire):
    """The canonical manifest bytes (as text) and the signatures over them."""

    signed: str = Field(max_length=MAX_MANIFEST_BYTES)
    signatures: tuple[KeySignature, ...]

    def unverified(self) -> Manifest:
        """Parse the manifest WITHOUT checking signatures (registries, display)."""
        return _parse_manifest(self.signed.encode())


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A key's id: sha256 of its raw public bytes, hex (as TUF derives key ids)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> SignedManifest:
    # Defaults left out: a manifest that uses no newer field reads on older agents.
    payload = canonical_json(manifest.model_dump(mode="json", by_alias=True, exclude_defaults=True))
    sig = private_key.sign(payload)
    return SignedManifest(
        signed=payload.decode(),
        signatures=(
            KeySignature(
                key_id=key_id(private_key.public_key()), sig=base64.b64encode(sig).decode()
            ),
        ),
    )


def trusted_keyring(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in keys}


def verify_signed_manifest(
    signed: SignedManifest, trusted: Mapping[str, Ed25519PublicKey]
) -> Manifest:
    """Return the manifest if a trusted key signed exactly these bytes.

    Raises SignatureError (reason `untrusted_key` or `signature_invalid`) or
    ArtifactError (`manifest_invalid`) when the signed bytes do not parse.
    """
    payload = signed.signed.encode()
    known = [s for s in signed.signatures if s.key_id in trusted]
    if not known:
        raise SignatureError(
            "manifest is not signed by any trusted key "
            f"(signed by {[s.key_id[:12] for s in signed.signatures]})",
            reason="untrusted_key",
        )
    for entry in known:
        try:
            sig = base64.b64decode(entry.sig, validate=True)
            trusted[entry.key_id].verify(sig, payload)
        except (InvalidSignature, ValueError):
            continue
        return _parse_manifest(payload)
    raise SignatureError("manifest signature does not verify", reason="signature_invalid")


def _parse_manifest(payload: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ArtifactError(
            f"manifest invalid: {'.'.join(map(str, first['loc']))}: {first['msg']}",
            reason="manifest_invalid",
        ) from exc


def build_manifest(
    *,
    name: str,
    version: str,
    data: bytes,
    signature: TensorSignature,
    device_types: Iterable[str] = (),
    created_at: datetime | None = None,
    task: ModelTask | None = None,
    interface_change: bool = False,
) -> Manifest:
    return Manifest(
        task=task,
        interface_change=interface_change,
        name=name,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        signature=signature,
        created_at=created_at or datetime.now(UTC),
        device_types=tuple(device_types),
    )
