"""What a device checks before a model touches its runtime: a bytes-in core, no I/O.

In the order of DESIGN.md §2: the manifest's signature against the trusted keys,
then that the manifest is meant for this device type, then (while streaming,
in `fetch`) the size limit, then the sha256 of the whole file, and last the
tensor signature of the loaded model against the manifest's promise and against
the model it would replace. Callers fetch, store and load around these checks.

Interface compatibility protects the application that calls the served model:
a candidate must take exactly the inputs the active model takes and give the
outputs the application reads (same tensors in the same order, each with the
same name, dtype, shape signature and quantization). The signed manifest says
what the file holds, so `verify_interface` refuses an incompatible candidate
before it is downloaded or loaded, naming the first differing tensor; after the
load, the file must be exactly what the manifest says (`verify_tensor_signature`,
always strict). An operator who means to change the interface says so: a
manifest pushed with `interface_change`, or a deploy command with
`allow_interface_change`.

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


def verify_interface(
    manifest: Manifest, active: TensorSignature | None, *, allow_interface_change: bool = False
) -> None:
    """The candidate's signed interface can stand in for the active model's.

    CompatibilityError `incompatible` naming the first differing tensor, e.g.
    "output 1 ('Identity_1'): shape [1, 2] instead of [1, 1]", unless the manifest
    or the command says the interface is meant to change.
    """
    if active is None or allow_interface_change or manifest.interface_change:
        return
    diff = active.difference(manifest.signature)
    if diff is not None:
        raise CompatibilityError(
            f"{manifest.ref} cannot replace the active model: {diff} "
            "(an interface change must be allowed: `model push --interface-change` or "
            "`rollout start --allow-interface-change`)",
            reason="incompatible",
        )


def verify_tensor_signature(
    manifest: Manifest,
    loaded: TensorSignature,
    active: TensorSignature | None,
    *,
    allow_interface_change: bool = False,
) -> None:
    """The loaded model is exactly what the manifest promises, and can replace the active model.

    The manifest check is always strict (tensors and signature keys); the active
    check is `verify_interface`'s.
    """
    diff = manifest.signature.difference(loaded)
    if diff is None and set(manifest.signature.signature_keys) != set(loaded.signature_keys):
        diff = (
            f"signature keys {sorted(loaded.signature_keys)} instead of "
            f"{sorted(manifest.signature.signature_keys)}"
        )
    if diff is not None:
        raise CompatibilityError(
            f"{manifest.ref}: the file's tensors are not the signed ones: {diff}",
            reason="incompatible_manifest_mismatch",
        )
    verify_interface(manifest, active, allow_interface_change=allow_interface_change)


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
