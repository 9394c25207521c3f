"""Controller command signatures and validity windows: a bytes-in core, no I/O.

The controller signs every command it publishes with its own Ed25519 key over
the exact bytes `topic + "\\n" + payload`, as they go on the wire: nothing is
re-serialised before verification (the python-tuf lesson), and the topic is
inside the signature, so a command cannot be moved to another device's or
another region's topic. The signature travels in an MQTT 5 user property:

    hotswap-sig: <key id>:<base64 of the 64-byte signature>

where the key id is the sha256 of the raw public key, hex (`shared.manifest.key_id`,
as for manifests). A publish may carry several (key rotation); one valid
signature by a trusted key is enough.

Freshness: the signed payload names `issuedAt` and `expiresAt`; a device
refuses a command past its expiry, or issued further in the future than the
clock skew it tolerates. Replays inside the window are answered from the
device's record of command ids (see `edge_agent.store`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import CommandAuthError
from shared.manifest import key_id

SIGNATURE_PROPERTY = "hotswap-sig"
DEFAULT_MAX_CLOCK_SKEW_S = 300.0
# Never look at more signatures than this on one publish (each costs a verification).
MAX_SIGNATURES = 8

# Every reason a device gives for refusing a command before any work. Such a refusal
# speaks of the copy the device received, not of the controller's own command (a forged
# or replayed copy may reuse a real command id), so the controller never applies it.
COMMAND_REFUSAL_REASONS: frozenset[str] = frozenset(
    {
        "command_unsigned",
        "command_untrusted_key",
        "command_signature_invalid",
        "command_expired",
        "command_not_yet_valid",
        "command_no_expiry",
    }
)

_KEY_ID = re.compile(r"^[0-9a-f]{64}$")


def signed_bytes(topic: str, payload: bytes) -> bytes:
    """What a command signature covers: the topic, a newline, the payload bytes."""
    return topic.encode() + b"\n" + payload


def sign_command(topic: str, payload: bytes, key: Ed25519PrivateKey) -> str:
    """The `hotswap-sig` property value for publishing `payload` on `topic`."""
    sig = key.sign(signed_bytes(topic, payload))
    return f"{key_id(key.public_key())}:{base64.b64encode(sig).decode()}"


def signatures_in(user_properties: Iterable[tuple[str, str]] | None) -> tuple[str, ...]:
    """The `hotswap-sig` values among a publish's user properties (name, value) pairs."""
    return tuple(v for k, v in (user_properties or ()) if k == SIGNATURE_PROPERTY)


def verify_command(
    topic: str,
    payload: bytes,
    signatures: Sequence[str],
    trusted: Mapping[str, Ed25519PublicKey],
) -> str:
    """The id of the trusted key that signed exactly `topic` + `payload`.

    Raises CommandAuthError: `command_unsigned` (no signature at all),
    `command_untrusted_key` (signed, but by no key this device trusts) or
    `command_signature_invalid` (a trusted key id, but the signature does not
    verify: tampered bytes, another topic, or garbage).
    """
    if not signatures:
        raise CommandAuthError(
            f"command on {topic} carries no {SIGNATURE_PROPERTY} signature",
            reason="command_unsigned",
        )
    message = signed_bytes(topic, payload)
    claimed: list[str] = []
    tried = False
    for value in signatures[:MAX_SIGNATURES]:
        kid, _, encoded = value.partition(":")
        claimed.append(kid[:12])
        if not _KEY_ID.match(kid) or kid not in trusted:
            continue
        tried = True
        try:
            sig = base64.b64decode(encoded, validate=True)
            trusted[kid].verify(sig, message)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        return kid
    if not tried:
        raise CommandAuthError(
            f"command on {topic} is signed by no trusted controller key (key ids {claimed})",
            reason="command_untrusted_key",
        )
    raise CommandAuthError(
        f"command signature on {topic} does not verify", reason="command_signature_invalid"
    )


def check_validity(
    issued_at: datetime,
    expires_at: datetime | None,
    now: datetime,
    *,
    max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
    require_expiry: bool = False,
) -> None:
    """Refuse a command outside its validity window (CommandAuthError).

    `command_expired` at or after `expires_at`; `command_not_yet_valid` when
    `issued_at` is more than `max_clock_skew_s` ahead of `now` (the device's
    clock may lag the controller's by that much); `command_no_expiry` when an
    expiry is required (authenticated commands: a command valid forever could
    be replayed forever) and missing. Naive times are taken as UTC.
    """
    now = _utc(now)
    if expires_at is None:
        if require_expiry:
            raise CommandAuthError("command carries no expiry", reason="command_no_expiry")
    elif now >= _utc(expires_at):
        raise CommandAuthError(
            f"command expired at {_utc(expires_at).isoformat()} (now {now.isoformat()})",
            reason="command_expired",
        )
    ahead = (_utc(issued_at) - now).total_seconds()
    if ahead > max_clock_skew_s:
        raise CommandAuthError(
            f"command issued {ahead:.0f}s in the future (clock skew allowed: "
            f"{max_clock_skew_s:g}s)",
            reason="command_not_yet_valid",
        )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
