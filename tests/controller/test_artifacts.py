"""Artifact keys and orphans (pure): content-addressed keys, and what no registered version uses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.artifacts import (
    StoredObject,
    artifact_key,
    find_orphans,
    manifest_key,
    manifest_key_of,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
NOW = datetime(2026, 1, 1, tzinfo=UTC)
OLD = NOW - timedelta(hours=1)


def test_keys_name_the_bytes_so_other_bytes_never_share_a_key() -> None:
    """Same name@version, other sha256: other keys; the manifest sits beside its artifact."""
    assert artifact_key("clf", "1.0.0", SHA_A) == f"models/clf/1.0.0/{SHA_A}.tflite"
    assert manifest_key("clf", "1.0.0", SHA_A) == f"models/clf/1.0.0/{SHA_A}.manifest.json"
    assert artifact_key("clf", "1.0.0", SHA_A) != artifact_key("clf", "1.0.0", SHA_B)
    assert manifest_key_of(artifact_key("clf", "1.0.0", SHA_A)) == manifest_key(
        "clf", "1.0.0", SHA_A
    )
    # Versions registered before content addressing keep their fixed names.
    assert manifest_key_of("models/clf/0.9/model.tflite") == "models/clf/0.9/manifest.json"
    with pytest.raises(ValueError, match="invalid sha256"):
        artifact_key("clf", "1.0.0", "../x")


def test_orphans_are_the_old_objects_no_registered_artifact_refers_to() -> None:
    """Registered artifacts and their manifests (either layout) stay; recent objects and
    objects outside models/ are never orphans."""
    registered = [artifact_key("clf", "1.0.0", SHA_A), "models/clf/0.9/model.tflite"]
    objects = [
        StoredObject(artifact_key("clf", "1.0.0", SHA_A), 10, OLD),
        StoredObject(manifest_key("clf", "1.0.0", SHA_A), 1, OLD),
        StoredObject("models/clf/0.9/model.tflite", 10, OLD),
        StoredObject("models/clf/0.9/manifest.json", 1, OLD),
        StoredObject(manifest_key("clf", "1.0.0", SHA_B), 1, OLD),  # refused push, after upload
        StoredObject(artifact_key("clf", "1.0.0", SHA_B), 10, OLD),
        StoredObject(artifact_key("clf", "2.0.0", SHA_B), 10, NOW),  # a push in flight
        StoredObject("backups/db.sqlite", 5, OLD),
    ]
    found = find_orphans(objects, registered, before=NOW - timedelta(minutes=10))
    assert [o.key for o in found] == [
        manifest_key("clf", "1.0.0", SHA_B),
        artifact_key("clf", "1.0.0", SHA_B),
    ]
    assert (
        find_orphans(objects, [*registered, artifact_key("clf", "1.0.0", SHA_B)], before=NOW) == []
    )
