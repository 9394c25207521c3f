"""Controller command signatures and validity windows, on plain bytes and times."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.command_auth import (
    SIGNATURE_PROPERTY,
    check_validity,
    sign_command,
    signatures_in,
    signed_bytes,
    verify_command,
)
from shared.errors import CommandAuthError
from shared.manifest import key_id, trusted_keyring

TOPIC = "hotswap/v1/devices/cam-1/cmd"
PAYLOAD = b'{"kind":"rollback","commandId":"c-1","v":1}'
KEY = Ed25519PrivateKey.generate()
TRUSTED = trusted_keyring([KEY.public_key()])
NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def reason_of(topic: str, payload: bytes, signatures: tuple[str, ...], trusted=TRUSTED) -> str:
    with pytest.raises(CommandAuthError) as err:
        verify_command(topic, payload, signatures, trusted)
    return err.value.reason


def test_a_signature_verifies_for_exactly_its_topic_and_payload() -> None:
    """Signed bytes are topic, newline, payload; the verifier names the key that signed."""
    sig = sign_command(TOPIC, PAYLOAD, KEY)
    assert sig.split(":")[0] == key_id(KEY.public_key())
    assert verify_command(TOPIC, PAYLOAD, (sig,), TRUSTED) == key_id(KEY.public_key())
    assert signed_bytes(TOPIC, PAYLOAD) == TOPIC.encode() + b"\n" + PAYLOAD


def test_any_changed_byte_of_payload_or_topic_is_signature_invalid() -> None:
    """One flipped payload byte, another device's topic, a region topic: all refused."""
    sig = sign_command(TOPIC, PAYLOAD, KEY)
    flipped = PAYLOAD[:-2] + bytes([PAYLOAD[-2] ^ 1]) + PAYLOAD[-1:]
    assert reason_of(TOPIC, flipped, (sig,)) == "command_signature_invalid"
    assert reason_of(TOPIC.replace("cam-1", "cam-2"), PAYLOAD, (sig,)) == (
        "command_signature_invalid"
    )
    assert reason_of("hotswap/v1/regions/eu-west/cmd", PAYLOAD, (sig,)) == (
        "command_signature_invalid"
    )
    # The same bytes re-serialised (whitespace) are other bytes: refused, not re-parsed.
    assert reason_of(TOPIC, PAYLOAD.replace(b",", b", "), (sig,)) == "command_signature_invalid"


def test_missing_unknown_and_malformed_signatures_are_refused_with_their_reason() -> None:
    """No property: unsigned; another key: untrusted; garbage under our key id: invalid."""
    assert reason_of(TOPIC, PAYLOAD, ()) == "command_unsigned"
    stranger = Ed25519PrivateKey.generate()
    assert reason_of(TOPIC, PAYLOAD, (sign_command(TOPIC, PAYLOAD, stranger),)) == (
        "command_untrusted_key"
    )
    kid = key_id(KEY.public_key())
    for garbage in (f"{kid}:not base64!", f"{kid}:", f"{kid}:{base64.b64encode(b'x').decode()}"):
        assert reason_of(TOPIC, PAYLOAD, (garbage,)) == "command_signature_invalid"
    assert reason_of(TOPIC, PAYLOAD, ("no-colon-at-all",)) == "command_untrusted_key"


def test_a_stranger_cannot_sign_under_a_trusted_key_id() -> None:
    """A signature by another key, labelled with the trusted key's id, does not verify."""
    stranger = Ed25519PrivateKey.generate()
    forged = sign_command(TOPIC, PAYLOAD, stranger).split(":")[1]
    assert reason_of(TOPIC, PAYLOAD, (f"{key_id(KEY.public_key())}:{forged}",)) == (
        "command_signature_invalid"
    )


def test_rotation_one_valid_signature_among_several_is_enough() -> None:
    """Old and new controller keys both sign; a device trusting either accepts."""
    new = Ed25519PrivateKey.generate()
    sigs = (sign_command(TOPIC, PAYLOAD, new), sign_command(TOPIC, PAYLOAD, KEY))
    assert verify_command(TOPIC, PAYLOAD, sigs, TRUSTED) == key_id(KEY.public_key())
    assert verify_command(TOPIC, PAYLOAD, sigs, trusted_keyring([new.public_key()])) == key_id(
        new.public_key()
    )
    assert reason_of(TOPIC, PAYLOAD, sigs, trusted_keyring([])) == "command_untrusted_key"


def test_signatures_are_picked_from_user_properties_by_name() -> None:
    """Only `hotswap-sig` values count; no properties at all is no signature."""
    props = [("other", "x"), (SIGNATURE_PROPERTY, "a:b"), (SIGNATURE_PROPERTY, "c:d")]
    assert signatures_in(props) == ("a:b", "c:d")
    assert signatures_in(None) == ()


@pytest.mark.parametrize(
    ("issued", "expires", "require", "reason"),
    [
        (-60, 60, True, None),
        (-60, None, False, None),
        (-60, None, True, "command_no_expiry"),
        (-120, -1, False, "command_expired"),
        (-120, 0, False, "command_expired"),  # the expiry instant itself is past
        (299, 600, True, None),  # within the 300 s skew
        (301, 600, True, "command_not_yet_valid"),
    ],
)
def test_validity_window(
    issued: int, expires: int | None, require: bool, reason: str | None
) -> None:
    """Expired at or after expiresAt; not yet valid beyond the clock skew; expiry required."""
    issued_at = NOW + timedelta(seconds=issued)
    expires_at = NOW + timedelta(seconds=expires) if expires is not None else None
    if reason is None:
        check_validity(issued_at, expires_at, NOW, max_clock_skew_s=300, require_expiry=require)
        return
    with pytest.raises(CommandAuthError) as err:
        check_validity(issued_at, expires_at, NOW, max_clock_skew_s=300, require_expiry=require)
    assert err.value.reason == reason


def test_naive_times_are_taken_as_utc() -> None:
    """A payload time without a zone compares as UTC instead of failing."""
    naive_past = (NOW - timedelta(seconds=1)).replace(tzinfo=None)
    with pytest.raises(CommandAuthError) as err:
        check_validity(naive_past - timedelta(hours=1), naive_past, NOW)
    assert err.value.reason == "command_expired"
