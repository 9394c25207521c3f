"""What a device checks before a model touches its runtime: a bytes-in core, no I/O.

In the order of DESIGN.md §2: the manifest's signature against the trusted keys,
then that the manifest is meant for this device type, then (while streaming,
in `fetch`) the size limit, then the sha256 of the whole file, and last the
tensor signature of the loaded model against the manifest's promise and against
the model it would replace. Callers fetch, store and load around these checks.

Anti-rollback (TUF / Uptane): a device remembers, per model name, the highest
version it has activated, and refuses a manifest below it unless the (signed)
command allows a downgrade. Versions are ordered as PEP 440 versions
(`packaging.version.Version`: `1.10.0` > `1.9.0`, `2.0.0rc1` < `2.0.0`); a
version that is not PEP 440 cannot be ordered, so a deploy of it over a model
with a recorded floor is refused (`version_unorderable`) unless downgrades are
allowed. Equal versions are not a downgrade.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from packaging.version import InvalidVersion, Version

from shared.errors import CompatibilityError, DowngradeError, IntegrityError
from shared.manifest import Manifest, SignedManifest, TensorSignature, verify_signed_manifest


def verify_manifest(
    signed: SignedManifest,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    device_type: str,
) -> Manifest:
    """The manifest, if a trusted key signed it for a TFLite model and this device type."""
    manifest = verify_signed_manifest(signed, trusted)
    if manifest.framework != "tflite":
        raise CompatibilityError(
            f"{manifest.ref} is a {manifest.framework!r} model; this device runs TFLite",
            reason="incompatible_framework",
        )
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


def parse_version(version: str) -> Version | None:
    """The PEP 440 version, or None if `version` is not one."""
    try:
        return Version(version)
    except InvalidVersion:
        return None


def version_order(a: str, b: str) -> int | None:
    """-1, 0 or 1 as PEP 440 orders `a` against `b`; None if either is not PEP 440."""
    va, vb = parse_version(a), parse_version(b)
    if va is None or vb is None:
        return None
    return (va > vb) - (va < vb)


def verify_not_downgrade(
    manifest: Manifest, highest: Mapping[str, str], *, allow_downgrade: bool
) -> None:
    """Anti-rollback: refuse a version below the highest activated for this model name.

    DowngradeError `downgrade` when it is lower, `version_unorderable` when the
    two versions cannot be ordered; nothing is refused with `allow_downgrade`
    or for a model name this device never activated.
    """
    floor = highest.get(manifest.name)
    if floor is None or allow_downgrade:
        return
    order = version_order(manifest.version, floor)
    if order is None:
        raise DowngradeError(
            f"{manifest.ref}: cannot order version {manifest.version!r} against the highest "
            f"activated {floor!r} (versions must be PEP 440, e.g. 1.2.0, 2.0.0rc1)",
            version=manifest.version,
            highest=floor,
            reason="version_unorderable",
        )
    if order < 0:
        raise DowngradeError(
            f"{manifest.ref} is older than {manifest.name}@{floor}, already activated here "
            "(a downgrade needs a command that allows it)",
            version=manifest.version,
            highest=floor,
        )


def raised_floor(highest: Mapping[str, str], name: str, version: str) -> dict[str, str]:
    """`highest` after activating `name@version`: the floor only ever goes up.

    A version that orders above the floor replaces it, and so does any PEP 440
    version over a floor that is not one; anything else leaves the floor alone.
    """
    updated = dict(highest)
    floor = highest.get(name)
    if floor is None:
        updated[name] = version
        return updated
    new, old = parse_version(version), parse_version(floor)
    if new is not None and (old is None or new > old):
        updated[name] = version
    return updated
