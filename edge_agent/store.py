"""The agent's crash-safe model store: model files, signed manifests, pointers.

Layout under the data directory:

    models/<sha256>.tflite          the verified model bytes
    models/<sha256>.manifest.json   the signed manifest it was verified against
    downloads/<sha256>.tflite.part  an unfinished download (never loaded)
    state.json                      {active, previous, staged} sha256 pointers, the highest
                                    version activated per model name (anti-rollback), and
                                    the answers to commands until they expire (replays)

Every file is written to a temp file in the same directory, fsynced and moved
into place with `os.replace`, and a model file is in `models/` before any
pointer names it: killed at any moment, the store names exactly one valid
active model (or none before the first) on restart. Does disk I/O.

Answered command ids are kept until their command expires (plus a grace for a
clock that steps back), so a replayed command is answered from the record and
never runs again: once pruned, the command itself is refused as expired.
`RECENT_COMMANDS` caps the record for memory; over it, the records closest to
their expiry go first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from edge_agent.verify import raised_floor
from shared.errors import ArtifactError
from shared.keys import write_atomic
from shared.manifest import Manifest, SignedManifest

log = structlog.get_logger("hotswap.agent.store")

RECENT_COMMANDS = 4096
# Kept this long past its expiry: a clock stepping back must not revive a pruned command.
COMMAND_GRACE_S = 600.0
# A command without an expiry (unauthenticated mode) is remembered this long.
UNEXPIRING_COMMAND_KEEP_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class CommandRecord:
    """One command id's answer: the final event (wire JSON; None while in progress)."""

    answer: str | None
    expires_at: float  # unix time after which a replay is refused as expired anyway


@dataclass
class StoreState:
    active: str | None = None
    previous: str | None = None
    staged: str | None = None  # blue-green: loaded into standby, waiting for a switch
    # command_id -> its record, oldest first
    commands: dict[str, CommandRecord] = field(default_factory=dict)
    # model name -> the highest version activated (anti-rollback floor)
    highest: dict[str, str] = field(default_factory=dict)


def prune_commands(
    commands: dict[str, CommandRecord],
    now: float,
    *,
    grace_s: float = COMMAND_GRACE_S,
    cap: int = RECENT_COMMANDS,
) -> dict[str, CommandRecord]:
    """The records still worth keeping: not expired for `grace_s`, at most `cap`.

    Over the cap, the records that expire soonest are dropped first (their replay
    window is the shortest). Order of the survivors is kept.
    """
    live = {k: r for k, r in commands.items() if r.expires_at + grace_s > now}
    if len(live) <= cap:
        return live
    keep = set(sorted(live, key=lambda k: live[k].expires_at, reverse=True)[:cap])
    log.warning("command_record_full", dropped=len(live) - cap, cap=cap)
    return {k: r for k, r in live.items() if k in keep}


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
        commands: dict[str, CommandRecord] = {}
        keep_until = time.time() + UNEXPIRING_COMMAND_KEEP_S
        for k, v in (raw.get("commands") or {}).items():
            if isinstance(v, dict):
                expires = v.get("expires_at")
                commands[str(k)] = CommandRecord(
                    v.get("answer"),
                    float(expires) if isinstance(expires, int | float) else keep_until,
                )
            else:  # before expiries were recorded: {command_id: answer}
                commands[str(k)] = CommandRecord(v, keep_until)
        state = StoreState(
            active=raw.get("active"),
            previous=raw.get("previous"),
            staged=raw.get("staged"),
            commands=commands,
        )
        if "highest" in raw:
            state.highest = {str(k): str(v) for k, v in raw["highest"].items()}
        else:  # before anti-rollback: what was activated is what the pointers name
            for sha in (state.active, state.previous):
                manifest = self._stored_manifest(sha)
                if manifest is not None:
                    state.highest = raised_floor(state.highest, manifest.name, manifest.version)
        return state

    def _stored_manifest(self, sha256: str | None) -> Manifest | None:
        if sha256 is None:
            return None
        try:
            signed = SignedManifest.model_validate_json(self.manifest_path(sha256).read_bytes())
            return signed.unverified()
        except (OSError, ValueError, ArtifactError):
            return None

    def write_state(self, state: StoreState, *, now: float | None = None) -> None:
        state.commands = prune_commands(state.commands, time.time() if now is None else now)
        body = {
            "active": state.active,
            "previous": state.previous,
            "staged": state.staged,
            "highest": state.highest,
            "commands": {
                k: {"answer": r.answer, "expires_at": r.expires_at}
                for k, r in state.commands.items()
            },
        }
        # Compact on purpose: json's C encoder runs only without `indent`; the pure-Python
        # one held the GIL (and paused inference threads) ~40 ms on a full command record.
        write_atomic(self.state_path, json.dumps(body, separators=(",", ":")).encode())

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
