"""The agent's crash-safe model store: model files, signed manifests, pointers.

Layout under the data directory:

    models/<sha256>.tflite          the verified model bytes
    models/<sha256>.manifest.json   the signed manifest it was verified against
    downloads/<sha256>.tflite.part  an unfinished download (never loaded)
    state.json                      {active, previous} sha256 pointers + recent commands

Every file is written to a temp file in the same directory, fsynced and moved
into place with `os.replace`, and a model file is in `models/` before any
pointer names it: killed at any moment, the store names exactly one valid
active model (or none before the first) on restart. Does disk I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from shared.keys import write_atomic
from shared.manifest import Manifest, SignedManifest

log = structlog.get_logger("hotswap.agent.store")

RECENT_COMMANDS = 256


@dataclass
class StoreState:
    active: str | None = None
    previous: str | None = None
    staged: str | None = None  # blue-green: loaded into standby, waiting for a switch
    # command_id -> the final event (wire JSON) it produced, oldest first
    commands: dict[str, str | None] = field(default_factory=dict)


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = root / "models"
        self.downloads = root / "downloads"
        self.state_path = root / "state.json"

    def open(self) -> StoreState:
        """Create the directories, drop leftovers of a crash, read the pointers."""
        for d in (self.root, self.models, self.downloads):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.root.glob("*.tmp"), *self.models.glob("*.tmp")]:
            leftover.unlink(missing_ok=True)
        state = self._read_state()
        for sha in (state.active, state.previous):
            if sha is not None and not self.has(sha):
                log.error("stored_model_missing", sha256=sha)
        if state.active is not None and not self.has(state.active):
            state.active, state.previous = state.previous, None
        if state.previous is not None and not self.has(state.previous):
            state.previous = None
        return state

    def clean_downloads(self, keep: Iterable[Path] = ()) -> None:
        kept = set(keep)
        for part in self.downloads.iterdir():
            if part not in kept:
                part.unlink(missing_ok=True)

    def _read_state(self) -> StoreState:
        try:
            raw: dict[str, Any] = json.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValueError) as exc:
            # state.json is only ever replaced atomically; a broken one is outside damage.
            log.error("state_file_unreadable", path=str(self.state_path), error=str(exc))
            return StoreState()
        commands = raw.get("commands") or {}
        return StoreState(
            active=raw.get("active"),
            previous=raw.get("previous"),
            staged=raw.get("staged"),
            commands={str(k): v for k, v in commands.items()},
        )

    def write_state(self, state: StoreState) -> None:
        while len(state.commands) > RECENT_COMMANDS:
            state.commands.pop(next(iter(state.commands)))
        body = {
            "active": state.active,
            "previous": state.previous,
            "staged": state.staged,
            "commands": state.commands,
        }
        write_atomic(self.state_path, json.dumps(body, indent=1).encode())

    # ------------------------------------------------------------ models

    def model_path(self, sha256: str) -> Path:
        return self.models / f"{sha256}.tflite"

    def manifest_path(self, sha256: str) -> Path:
        return self.models / f"{sha256}.manifest.json"

    def download_path(self, sha256: str) -> Path:
        return self.downloads / f"{sha256}.tflite"

    def has(self, sha256: str) -> bool:
        return self.model_path(sha256).is_file() and self.manifest_path(sha256).is_file()

    def adopt(self, signed: SignedManifest, manifest: Manifest, downloaded: Path) -> None:
        """Move a verified download into the store (manifest first, then the model)."""
        write_atomic(self.manifest_path(manifest.sha256), signed.model_dump_json().encode())
        with downloaded.open("rb") as f:
            os.fsync(f.fileno())
        downloaded.replace(self.model_path(manifest.sha256))
        _fsync_dir(self.models)

    def read(self, sha256: str, *, check: bool = True) -> tuple[bytes, SignedManifest]:
        """The stored bytes and manifest; ValueError if the bytes no longer match.

        `check=False` skips the digest for callers that verify the bytes themselves.
        """
        data = self.model_path(sha256).read_bytes()
        if check and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"stored model {sha256[:12]}… is corrupted")
        signed = SignedManifest.model_validate_json(self.manifest_path(sha256).read_bytes())
        return data, signed

    def stored(self) -> list[tuple[str, Manifest]]:
        out = []
        for path in self.models.glob("*.manifest.json"):
            sha = path.name.removesuffix(".manifest.json")
            try:
                out.append(
                    (sha, SignedManifest.model_validate_json(path.read_bytes()).unverified())
                )
            except (OSError, ValueError):
                continue
        return out

    def prune(self, keep_per_model: int, protect: Iterable[str | None]) -> list[str]:
        """Delete all but the newest `keep_per_model` versions of each model."""
        protected = {p for p in protect if p}
        by_name: dict[str, list[tuple[str, Manifest]]] = {}
        for sha, manifest in self.stored():
            by_name.setdefault(manifest.name, []).append((sha, manifest))
        removed = []
        for entries in by_name.values():
            entries.sort(key=lambda e: e[1].created_at, reverse=True)
            for sha, _ in entries[keep_per_model:]:
                if sha in protected:
                    continue
                self.model_path(sha).unlink(missing_ok=True)
                self.manifest_path(sha).unlink(missing_ok=True)
                removed.append(sha)
        return removed


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
