"""The agent's model store: atomic pointers, crash leftovers, pruning, corruption."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.store import (
    COMMAND_GRACE_S,
    UNEXPIRING_COMMAND_KEEP_S,
    CommandRecord,
    ModelStore,
    StoreState,
    prune_commands,
)
from shared.manifest import build_manifest, sign_manifest
from shared.model_builder import build_dense_model
from shared.tflite import read_signature

KEY = Ed25519PrivateKey.generate()


def put(store: ModelStore, tmp: Path, data: bytes, version: str, age_s: int = 0) -> str:
    manifest = build_manifest(
        name="clf",
        version=version,
        data=data,
        signature=read_signature(data),
        created_at=datetime.now(UTC) - timedelta(seconds=age_s),
    )
    download = store.download_path(manifest.sha256)
    download.write_bytes(data)
    store.adopt(sign_manifest(manifest, KEY), manifest, download)
    return manifest.sha256


def test_pointers_survive_a_reopen(tmp_path: Path) -> None:
    """What write_state wrote is what open reads, commands and version floors included."""
    store = ModelStore(tmp_path)
    store.open()
    sha = put(store, tmp_path, build_dense_model(seed=1), "1")
    until = time.time() + 3600
    store.write_state(
        StoreState(
            active=sha,
            commands={"c-1": CommandRecord('{"phase":"activated"}', until)},
            highest={"clf": "1"},
        )
    )
    again = ModelStore(tmp_path).open()
    assert again.active == sha and again.previous is None
    assert again.commands == {"c-1": CommandRecord('{"phase":"activated"}', until)}
    assert again.highest == {"clf": "1"}


def test_open_removes_crash_leftovers(tmp_path: Path) -> None:
    """Temp files of an interrupted atomic write and partial downloads are swept."""
    store = ModelStore(tmp_path)
    store.open()
    (tmp_path / ".state.json.abc.tmp").write_bytes(b"{")
    (store.models / ".x.manifest.json.def.tmp").write_bytes(b"{")
    (store.downloads / "abc.tflite.part").write_bytes(b"half")
    store.open()
    store.clean_downloads()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_missing_active_file_falls_back_to_previous(tmp_path: Path) -> None:
    """If the active model's file is gone, the previous one becomes active."""
    store = ModelStore(tmp_path)
    store.open()
    a = put(store, tmp_path, build_dense_model(seed=1), "1")
    b = put(store, tmp_path, build_dense_model(seed=2), "2")
    store.write_state(StoreState(active=b, previous=a))
    store.model_path(b).unlink()
    state = ModelStore(tmp_path).open()
    assert (state.active, state.previous) == (a, None)


def test_read_detects_corruption(tmp_path: Path) -> None:
    """A stored file whose bytes changed on disk is refused, not loaded."""
    store = ModelStore(tmp_path)
    store.open()
    sha = put(store, tmp_path, build_dense_model(seed=1), "1")
    path = store.model_path(sha)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    try:
        store.read(sha)
    except ValueError as exc:
        assert "corrupted" in str(exc)
    else:
        raise AssertionError("a corrupted model was read")


def test_prune_keeps_the_newest_k_and_the_protected(tmp_path: Path) -> None:
    """Only the newest K versions per model stay, plus whatever a pointer names."""
    store = ModelStore(tmp_path)
    store.open()
    shas = [
        put(store, tmp_path, build_dense_model(seed=i), str(i), age_s=100 - i) for i in range(5)
    ]
    removed = store.prune(2, protect=(shas[0], None))
    assert set(removed) == {shas[1], shas[2]}
    assert {sha for sha, _ in store.stored()} == {shas[0], shas[3], shas[4]}


def test_answered_commands_are_kept_until_they_expire_not_by_count() -> None:
    """Many commands far from expiry all stay; expired ones go after the grace."""
    now = 1_000_000.0
    fresh = {f"c-{i}": CommandRecord("{}", now + 3600) for i in range(1000)}
    old = {"c-old": CommandRecord("{}", now - COMMAND_GRACE_S - 1)}
    graced = {"c-graced": CommandRecord("{}", now - COMMAND_GRACE_S + 1)}
    kept = prune_commands({**old, **graced, **fresh}, now)
    assert set(kept) == {"c-graced", *fresh}
    assert list(kept)[:2] == ["c-graced", "c-0"]  # order kept


def test_over_the_cap_the_records_expiring_soonest_go_first() -> None:
    """The cap bounds memory; what it drops has the shortest replay window left."""
    now = 0.0
    records = {f"c-{i}": CommandRecord(None, now + 100 + i) for i in range(10)}
    kept = prune_commands(records, now, cap=4)
    assert list(kept) == ["c-6", "c-7", "c-8", "c-9"]


def test_old_state_files_keep_their_answers_and_derive_the_version_floor(tmp_path: Path) -> None:
    """A state.json from before expiries and floors: answers kept for days, floor from pointers."""
    store = ModelStore(tmp_path)
    store.open()
    higher = put(store, tmp_path, build_dense_model(seed=1), "1.10.0")
    lower = put(store, tmp_path, build_dense_model(seed=2), "1.9.0")
    # Rolled back: active is the older version number; the floor is the higher of the two.
    old_body = {"active": lower, "previous": higher, "commands": {"c-1": '{"phase":"activated"}'}}
    store.state_path.write_text(json.dumps(old_body))
    before = time.time()
    state = ModelStore(tmp_path).open()
    assert state.highest == {"clf": "1.10.0"}
    record = state.commands["c-1"]
    assert record.answer == '{"phase":"activated"}'
    assert record.expires_at >= before + UNEXPIRING_COMMAND_KEEP_S
    store.write_state(state)
    assert json.loads(store.state_path.read_text())["highest"] == {"clf": "1.10.0"}


def test_a_recorded_floor_is_not_re_derived(tmp_path: Path) -> None:
    """Once state.json has floors, they are what it says, even above what is stored."""
    store = ModelStore(tmp_path)
    store.open()
    sha = put(store, tmp_path, build_dense_model(seed=1), "1.0.0")
    store.write_state(StoreState(active=sha, highest={"clf": "3.0.0"}))
    assert ModelStore(tmp_path).open().highest == {"clf": "3.0.0"}
