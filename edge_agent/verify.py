"""What a device checks before a model touches its runtime: a bytes-in core, no I/O.

In the order of DESIGN.md §2: the manifest's signature against the trusted keys,
then that the manifest is meant for this device type, then (while streaming,
in `fetch`) the size limit, then the sha256 of the whole file, and last the
tensor signature of the loaded model against the manifest's promise and against
the model it would replace. Callers fetch, store and load around these checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import CompatibilityError, IntegrityError
from shared.manifest import Manifest, SignedManifest, TensorSignature, verify_signed_manifest


def verify_manifest(
    signed: SignedManifest,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    device_type: str,
) -> Manifest:
    """The manifest, if a trusted key signed it and it names this device type (or none)."""
    manifest = verify_signed_manifest(signed, trusted)
    if manifest.device_types and device_type not in manifest.device_types:
        raise CompatibilityError(
            f"{manifest.ref} is for device types {list(manifest.device_types)}, "
            f"this device is {device_type!r}",
            reason="incompatible_device_type",
        )
    return manifest


def verify_artifact(manifest: Manifest, data: bytes) -> None:
    """The bytes are exactly the file the manifest describes (size, then sha256)."""
    verify_size(manifest, len(data))
    verify_digest(manifest, hashlib.sha256(data).hexdigest())


def verify_size(manifest: Manifest, size: int) -> None:
    if size != manifest.size:
        raise IntegrityError(
            f"{manifest.ref}: size {size} != manifest size {manifest.size}",
            reason="size_mismatch",
        )


def verify_digest(manifest: Manifest, sha256: str) -> None:
    if sha256 != manifest.sha256:
        raise IntegrityError(
            f"{manifest.ref}: sha256 {sha256[:12]}… != manifest {manifest.sha256[:12]}…",
            reason="sha256_mismatch",
        )


def verify_tensor_signature(
    manifest: Manifest, loaded: TensorSignature, active: TensorSignature | None
) -> None:
    """The loaded model keeps the manifest's promise and can replace the active model."""
    if not loaded.compatible_with(manifest.signature):
        raise CompatibilityError(
            f"{manifest.ref}: the file's tensors {loaded.describe()} are not the signed "
            f"{manifest.signature.describe()}",
            reason="incompatible_manifest_mismatch",
        )
    if active is not None and not loaded.compatible_with(active):
        raise CompatibilityError(
            f"{manifest.ref}: tensor signature {loaded.describe()} is incompatible with "
            f"the active model's {active.describe()}",
            reason="incompatible",
        )
