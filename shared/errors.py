"""The project's error hierarchy: each error says where it came from.

Every error carries a stable `reason` code, the one devices report in `failed`
events and the CLI prints; the facts are attributes, not only message text.
"""

from __future__ import annotations


class HotswapError(Exception):
    """Base of every error the project raises on purpose."""

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ArtifactError(HotswapError):
    """A manifest or model file failed verification."""

    reason = "artifact_invalid"


class SignatureError(ArtifactError):
    """No trusted key produced a valid signature over the manifest."""

    reason = "signature_invalid"


class IntegrityError(ArtifactError):
    """The bytes do not match the manifest (size or sha256)."""

    reason = "integrity_mismatch"


class CompatibilityError(ArtifactError):
    """The model cannot run on this device or in place of the active model."""

    reason = "incompatible"


class ModelFormatError(ArtifactError):
    """The bytes are not a TFLite model the interpreter can load."""

    reason = "not_a_model"


class DownloadError(HotswapError):
    """Fetching an artifact failed (network, HTTP status, size limit, timeout)."""

    reason = "download_failed"


class BrokerError(HotswapError):
    """The MQTT broker could not be started or reached."""

    reason = "broker_unavailable"


class StorageError(HotswapError):
    """Object storage (S3) could not be reached or refused the request."""

    reason = "storage_unavailable"


class RequestError(HotswapError):
    """An operator request was refused by the controller (unknown id, bad input)."""

    reason = "bad_request"


class CommandAuthError(HotswapError):
    """A command was refused before any work: its controller signature or its validity window.

    Reasons: `command_unsigned`, `command_untrusted_key`, `command_signature_invalid`,
    `command_expired`, `command_not_yet_valid`, `command_no_expiry`.
    """

    reason = "command_refused"


class DowngradeError(ArtifactError):
    """Anti-rollback: the manifest's version is below the highest this device activated.

    `version` is the refused one, `highest` the floor it was compared with; reason
    `downgrade`, or `version_unorderable` when the two cannot be ordered.
    """

    reason = "downgrade"

    def __init__(
        self, message: str, *, version: str, highest: str, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.version = version
        self.highest = highest
