"""The push decision (pure): a registered version with other bytes is refused before any upload."""

from __future__ import annotations

import pytest

from controller.operator import registered_key
from shared.errors import RequestError

ROWS = [
    {"name": "clf", "version": "1.0.0", "sha256": "a" * 64, "s3Key": "models/clf/1.0.0/a.tflite"},
    {"name": "det", "version": "1.0.0", "sha256": "c" * 64, "s3Key": "models/det/1.0.0/c.tflite"},
]


def test_a_new_version_uploads_and_the_same_bytes_reuse_the_registered_key() -> None:
    """Unknown name@version: None (upload); same sha256: the registered key (no upload)."""
    assert registered_key(ROWS, "clf", "2.0.0", "a" * 64) is None
    assert registered_key(ROWS, "clf", "1.0.0", "a" * 64) == "models/clf/1.0.0/a.tflite"


def test_other_bytes_under_a_registered_version_are_bad_input_naming_the_registered_sha() -> None:
    """Refused with reason bad_request (the CLI exits 2) and the registered sha256's prefix."""
    with pytest.raises(
        RequestError, match=r"already registered with another sha256 \(aaaaaaaaaaaa"
    ) as info:
        registered_key(ROWS, "clf", "1.0.0", "b" * 64)
    assert info.value.reason == "bad_request"
