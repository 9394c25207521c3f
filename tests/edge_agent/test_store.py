"""The agent's model store: atomic pointers, crash leftovers, pruning, corruption."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.store import ModelStore, StoreState
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
    """What write_state wrote is what open reads, commands included."""
    store = ModelStore(tmp_path)
    store.open()
    sha = put(store, tmp_path, build_dense_model(seed=1), "1")
    store.write_state(StoreState(active=sha, commands={"c-1": '{"phase":"activated"}'}))
    again = ModelStore(tmp_path).open()
    assert again.active == sha and again.previous is None
    assert again.commands == {"c-1": '{"phase":"activated"}'}


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
