"""Reads and writes of the controller's tables (one short transaction each).

Does database I/O, synchronously: each call is brief, and the async service
calls it from its loop. Validation that needs the database (unknown model,
unregistered device) lives here and raises RequestError with a one-line reason.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, insert, or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, delete, select

from controller.db import (
    AssignmentRow,
    DeviceClaimRow,
    DeviceRow,
    ModelVersionRow,
    RolloutRow,
    TelemetryMinuteRow,
    TelemetryRollupRow,
    TelemetryWindowRow,
    make_engine,
)
from controller.gates import CohortStats, TensorInputs
from controller.live import Rollup
from controller.planner import FINAL_DEVICE_STATES, advances
from controller.strategies import ab_split, strategy
from shared.errors import ArtifactError, RequestError
from shared.manifest import Manifest, ModelTask, SignedManifest
from shared.messages import (
    CONFIDENCE_BUCKETS,
    INPUT_BUCKETS,
    DeviceEvent,
    DeviceRecord,
    DeviceState,
    Histogram,
    StartRollout,
    TelemetryWindow,
)
from shared.tasks import (
    LEGACY_AGREEMENT_RULE,
    describe_effective,
    effective_task,
    input_bounds,
    input_layout,
)
from shared.tasks import describe as describe_task

OPEN_STATUSES = ("Pending", "InProgress", "Paused")
# A rollback the device answered: its line says rolled_back or rollback_failed.
ANSWERED_ROLLBACK_STATES = ("rolled_back", "failed", "timed_out")
# How long a version read as not registered is taken at that, and how many are kept.
UNREGISTERED_TTL_S = 10.0
MAX_UNREGISTERED = 4096


@dataclass(frozen=True, slots=True)
class Superseded:
    """Devices an older rollout lost to a newer one (`rollout start --supersede`)."""

    rollout_id: str
    devices: tuple[str, ...]
    ended: bool  # the older rollout had no device left and ended Aborted


@dataclass(slots=True)
class Assignment:
    """An assignment row as plain data (the columns of controller.db.AssignmentRow)."""

    rollout_id: str
    device_id: str
    region: str = ""
    version: str = ""
    state: str = "pending"
    command_id: str | None = None
    rollback_command_id: str | None = None
    rollback_state: str | None = None
    rollback_sent_at: float | None = None
    reason: str | None = None
    detail: str | None = None
    attempts: int = 0
    sent_at: float | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class RolloutRollups:
    """An open rollout's per-device rollups of its stage to write, (device, version,
    shadow, Rollup JSON) each, and its served-latency totals (ms, inferences)."""

    rollout_id: str
    stage_index: int
    rollups: Sequence[tuple[str, str, bool, str]]
    served: tuple[float, int]


@dataclass(frozen=True, slots=True)
class Created:
    rollout: RolloutRow
    superseded: tuple[Superseded, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class _Meaning:
    """What the telemetry of one registered model version means (from its manifest)."""

    task: ModelTask
    task_text: str  # shared.tasks.describe(task): what an agent names in its windows
    origin: str  # shared.tasks.describe_effective: the task, declared or inferred
    legacy_confidence: bool  # an agent naming no task computed this very confidence
    inputs: tuple[tuple[str, str, tuple[float, ...]], ...]  # per input: name, layout, bounds

    @classmethod
    def of(cls, manifest: Manifest) -> _Meaning:
        task = effective_task(manifest)
        outputs = manifest.signature.outputs
        return cls(
            task=task,
            task_text=describe_task(task),
            origin=describe_effective(manifest),
            # Older agents took the first output's top class (softmax if need be).
            legacy_confidence=task.kind == "classifier"
            and bool(outputs)
            and outputs[0].name == task.output
            and outputs[0].quantization is None,
            inputs=tuple(
                (spec.name, input_layout(spec), input_bounds(spec))
                for spec in manifest.signature.inputs
            ),
        )

    def reads_confidence_of(self, reported_task: str | None) -> bool:
        if reported_task is None:
            return self.legacy_confidence
        return reported_task == self.task_text

    def tensor_inputs(self, stored: str, first: list[int] | None) -> tuple[TensorInputs, ...]:
        """A row's per-input histograms that fit the signature, tensor by tensor.

        An older agent's first-input histogram (INPUT_BUCKETS) stands for the first
        tensor when that is a float one: the same buckets over the same values.
        """
        if not stored:
            if first is None or not self.inputs or self.inputs[0][2] != INPUT_BUCKETS:
                return ()
            name, layout, _ = self.inputs[0]
            return (TensorInputs(name, layout, Histogram(counts=tuple(first))),)
        try:
            hists = [Histogram.model_validate(h) for h in json.loads(stored)]
        except (ValueError, TypeError):
            return ()  # a damaged row: its other numbers still count
        if len(hists) != len(self.inputs):
            return ()  # another interface than the registered one: not comparable
        return tuple(
            TensorInputs(name, layout, h)
            for (name, layout, bounds), h in zip(self.inputs, hists, strict=True)
            if bounds and len(h.counts) == len(bounds)
        )


class Store:
    def __init__(self, url_or_engine: str | Engine) -> None:
        self.engine = (
            make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        )
        self._meanings: dict[tuple[str, str], _Meaning] = {}
        # Versions not registered here, with when that was read (time.monotonic): a
        # device's telemetry of such a version cost a query a window (unbounded by
        # anything but the device's rate). Forgotten on register and after a while.
        self._unregistered: dict[tuple[str, str], float] = {}

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ------------------------------------------------------------ models

    def register_model(
        self, signed: SignedManifest, s3_key: str, now: float, trace_parent: str | None = None
    ) -> ModelVersionRow:
        """Record a pushed model; the same manifest twice is fine, a changed one is not.
        `trace_parent`: the push's trace context, kept for the version's rollouts."""
        manifest = signed.unverified()
        with self.session() as s:
            existing = s.exec(
                select(ModelVersionRow).where(
                    ModelVersionRow.name == manifest.name,
                    ModelVersionRow.version == manifest.version,
                )
            ).first()
            if existing is not None:
                if existing.sha256 != manifest.sha256:
                    raise RequestError(
                        f"model {manifest.ref} is already registered with another sha256 "
                        f"({existing.sha256[:12]}…); push a new version instead"
                    )
                return existing
            row = ModelVersionRow(
                name=manifest.name,
                version=manifest.version,
                sha256=manifest.sha256,
                size=manifest.size,
                signature=manifest.signature.describe(),
                device_types=",".join(manifest.device_types),
                signed_manifest=signed.model_dump_json(by_alias=True),
                s3_key=s3_key,
                created_at=now,
                trace_parent=trace_parent,
            )
            s.add(row)
            s.commit()
            self._unregistered.pop((manifest.name, manifest.version), None)
            return row

    def get_model(self, name: str, version: str) -> ModelVersionRow:
        with self.session() as s:
            row = s.exec(
                select(ModelVersionRow).where(
                    ModelVersionRow.name == name, ModelVersionRow.version == version
                )
            ).first()
            if row is None:
                known = s.exec(
                    select(ModelVersionRow.version).where(ModelVersionRow.name == name)
                ).all()
                hint = f" (known versions: {', '.join(known)})" if known else ""
                raise RequestError(f"unknown model {name}@{version}{hint}", reason="unknown_model")
            return row

    def list_models(self) -> list[ModelVersionRow]:
        with self.session() as s:
            return list(
                s.exec(select(ModelVersionRow).order_by(col(ModelVersionRow.created_at))).all()
            )

    # ------------------------------------------------------------ devices

    def upsert_device(self, state: DeviceState, now: float) -> str | None:
        """Record what a device says of itself; returns what was refused of its claim."""
        return self.upsert_devices([state], now).get(state.device_id)

    def upsert_devices(self, states: Sequence[DeviceState], now: float) -> dict[str, str]:
        """Record what devices say of themselves, in one transaction (later states win).

        Region and device type are the provisioning record's once there is one: a
        state that says otherwise keeps them (the rest of it is still taken), and
        the returned map says, per device, what was refused. A revoked device stays
        offline whatever it says.
        """
        refused: dict[str, str] = {}
        if not states:
            return refused
        # The hot path of a fleet's answers (every device republishes its state): plain
        # rows, one SELECT per 500 ids, one executemany UPDATE and one INSERT.
        table = DeviceRow.__table__  # type: ignore[attr-defined]
        with self.engine.begin() as conn:
            ids = sorted({st.device_id for st in states})
            stored: dict[str, dict[str, Any]] = {}
            for i in range(0, len(ids), 500):
                found = conn.execute(select(table).where(table.c.device_id.in_(ids[i : i + 500])))
                stored.update((r["device_id"], dict(r)) for r in found.mappings())
            new: dict[str, dict[str, Any]] = {}
            for state in states:
                row = stored.get(state.device_id)
                if row is None:
                    row = new.get(state.device_id)
                if row is None:
                    row = new[state.device_id] = DeviceRow(
                        device_id=state.device_id,
                        region=state.region,
                        device_type=state.device_type,
                    ).model_dump()
                if row["provisioned"] and (row["region"], row["device_type"]) != (
                    state.region,
                    state.device_type,
                ):
                    refused[state.device_id] = (
                        f"claims region {state.region!r} and type {state.device_type!r}, "
                        f"provisioned as {row['region']!r} and {row['device_type']!r}"
                    )
                elif not row["provisioned"]:
                    row["region"], row["device_type"] = state.region, state.device_type
                row["online"] = state.online and not row["revoked"]
                if state.online or state.active is not None:
                    # A last will carries no model: keep what the device last said it serves.
                    active = state.active
                    row["active_name"] = active.name if active else None
                    row["active_version"] = active.version if active else None
                    row["active_sha256"] = active.sha256 if active else None
                    row["standby_ref"] = state.standby.ref if state.standby else None
                row["memory_mb"] = state.capabilities.memory_mb
                row["agent_version"] = state.agent_version or row["agent_version"]
                row["last_seen"] = now
            if stored:
                conn.execute(
                    update(table)
                    .where(table.c.device_id == bindparam("k_device"))
                    .values({n: bindparam(f"v_{n}") for n in _STATE_COLUMNS}),
                    [
                        {"k_device": d} | {f"v_{n}": row[n] for n in _STATE_COLUMNS}
                        for d, row in stored.items()
                    ],
                )
            if new:
                conn.execute(insert(table), list(new.values()))
        return refused

    def apply_record(self, record: DeviceRecord, now: float) -> list[str]:
        """Take one provisioning record; returns the rollouts it touched."""
        return self.apply_records([record], now)

    def apply_records(self, records: Sequence[DeviceRecord], now: float) -> list[str]:
        """Take provisioning records (authoritative identity, or a revocation), in one
        transaction.

        A revocation sets the device offline, releases its claim and closes its
        open assignments with reason `revoked`; returns the rollouts touched.
        """
        touched: list[str] = []
        if not records:
            return touched
        with self.session() as s:
            ids = sorted({r.device_id for r in records})
            rows: dict[str, DeviceRow] = {}
            for i in range(0, len(ids), 500):
                for found in s.exec(
                    select(DeviceRow).where(col(DeviceRow.device_id).in_(ids[i : i + 500]))
                ).all():
                    rows[found.device_id] = found
            for record in records:
                row = rows.get(record.device_id)
                if row is None:
                    if record.revoked or record.region is None or record.device_type is None:
                        continue  # never seen: nothing to revoke
                    row = rows[record.device_id] = DeviceRow(
                        device_id=record.device_id,
                        region=record.region,
                        device_type=record.device_type,
                    )
                if record.region is not None and record.device_type is not None:
                    row.region, row.device_type = record.region, record.device_type
                    row.provisioned = True
                row.revoked = record.revoked
                if record.revoked:
                    row.online = False
                    touched += self._close_revoked(s, record.device_id, now)
                s.add(row)
            s.commit()
        return touched

    def _close_revoked(self, s: Session, device_id: str, now: float) -> list[str]:
        open_ids = select(RolloutRow.rollout_id).where(col(RolloutRow.status).in_(OPEN_STATUSES))
        touched = []
        for a in s.exec(
            select(AssignmentRow).where(
                AssignmentRow.device_id == device_id,
                col(AssignmentRow.rollout_id).in_(open_ids),
            )
        ):
            if a.state not in FINAL_DEVICE_STATES:
                a.state, a.reason, a.detail = "cancelled", "revoked", "device revoked"
                a.updated_at = now
                s.add(a)
                touched.append(a.rollout_id)
        s.exec(delete(DeviceClaimRow).where(col(DeviceClaimRow.device_id) == device_id))
        return touched

    def list_devices(self, offset: int = 0, limit: int | None = None) -> list[DeviceRow]:
        """Devices by id; a page of them with `offset` and `limit`."""
        with self.session() as s:
            query = select(DeviceRow).order_by(col(DeviceRow.device_id)).offset(offset)
            return list(s.exec(query.limit(limit) if limit is not None else query).all())

    def device_page(self, offset: int, limit: int | None) -> list[dict[str, Any]]:
        """A page of devices by id as plain column dicts: `device list` during a
        10,000-device rollout, where building ORM objects took 18x as long."""
        table = DeviceRow.__table__  # type: ignore[attr-defined]
        query = table.select().order_by(table.c.device_id).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self.session() as s:
            return [dict(row) for row in s.connection().execute(query).mappings()]

    def region_sizes(self) -> dict[str, int]:
        """Devices per region that may be subscribed to its topic (not revoked)."""
        with self.session() as s:
            rows = s.exec(
                select(DeviceRow.region, func.count())
                .where(~col(DeviceRow.revoked))
                .group_by(col(DeviceRow.region))
            ).all()
            return {str(region): int(n) for region, n in rows}

    def devices_online(self) -> int:
        with self.session() as s:
            return int(
                s.exec(
                    select(func.count()).where(col(DeviceRow.online), ~col(DeviceRow.revoked))
                ).one()
            )

    def resolve_targets(self, req: StartRollout, model: ModelVersionRow) -> list[str]:
        """The device ids a rollout request names; RequestError when it names none."""
        allowed = set(filter(None, model.device_types.split(",")))
        with self.session() as s:
            if req.devices:
                rows = {d.device_id: d for d in s.exec(select(DeviceRow)).all()}
                missing = [d for d in req.devices if d not in rows]
                if missing:
                    raise RequestError(
                        f"device(s) not registered: {', '.join(missing)}", reason="unknown_device"
                    )
                revoked = [d for d in req.devices if rows[d].revoked]
                if revoked:
                    raise RequestError(
                        f"device(s) revoked: {', '.join(revoked)}", reason="bad_request"
                    )
                wrong = [d for d in req.devices if allowed and rows[d].device_type not in allowed]
                if wrong:
                    raise RequestError(
                        f"{model.name}@{model.version} is only for device types "
                        f"{sorted(allowed)}; not for: {', '.join(wrong)}",
                        reason="incompatible_device",
                    )
                return sorted(set(req.devices))
            query = select(DeviceRow).where(~col(DeviceRow.revoked))
            if req.region:
                query = query.where(DeviceRow.region == req.region)
            if req.device_type:
                query = query.where(DeviceRow.device_type == req.device_type)
            found = [
                d.device_id for d in s.exec(query).all() if not allowed or d.device_type in allowed
            ]
        if not found:
            what = " and ".join(
                f"{k} {v!r}"
                for k, v in (("region", req.region), ("device type", req.device_type))
                if v
            )
            raise RequestError(
                f"no registered device matches {what or 'the request'}", reason="no_targets"
            )
        return sorted(found)

    # ------------------------------------------------------------ rollouts

    def create_rollout(
        self,
        req: StartRollout,
        model: ModelVersionRow,
        targets: Sequence[str],
        now: float,
    ) -> Created:
        """The rollout, its assignments and its claims on `targets`, in one transaction.

        A device already claimed by an active rollout makes this fail with a
        RequestError naming it, unless `req.supersede`: then the older rollout's
        assignments of those devices close (`cancelled`, reason `superseded`) and
        its claims pass to the new one. The claims' primary key decides a race.
        """
        rollout = RolloutRow(
            rollout_id=f"r-{uuid.uuid4().hex[:12]}",
            model=model.name,
            version=model.version,
            sha256=model.sha256,
            strategy=req.strategy,
            spec=req.model_dump_json(by_alias=True),
            status="Pending",
            device_timeout_s=req.device_timeout_s,
            version_b=req.version_b if strategy(req.strategy).two_versions else None,
            created_at=now,
            updated_at=now,
        )
        try:
            with self.session() as s:
                s.add(rollout)
                s.flush()  # the parent row exists before its assignments reference it
                superseded = self._take_claims(s, rollout.rollout_id, targets, req.supersede, now)
                regions = {
                    d.device_id: d.region
                    for d in s.exec(
                        select(DeviceRow).where(col(DeviceRow.device_id).in_(list(targets)))
                    ).all()
                }
                side_b: set[str] = set()
                if strategy(req.strategy).two_versions and req.version_b:
                    side_b = set(ab_split(list(targets), rollout.rollout_id)[1])
                for device_id in targets:
                    s.add(
                        AssignmentRow(
                            rollout_id=rollout.rollout_id,
                            device_id=device_id,
                            region=regions.get(device_id, ""),
                            version=req.version_b if device_id in side_b and req.version_b else "",
                            updated_at=now,
                        )
                    )
                s.commit()
        except IntegrityError:
            # Another start claimed one of these devices between our check and our commit.
            with self.session() as s:
                self._refuse_overlap(s, targets)
            raise
        return Created(rollout, superseded)

    def reclaim(self, rollout_id: str, now: float) -> None:
        """Claim a finished rollout's devices again (an operator's rollback reopens it)."""
        with self.session() as s:
            devices = s.exec(
                select(AssignmentRow.device_id).where(AssignmentRow.rollout_id == rollout_id)
            ).all()
            self._take_claims(s, rollout_id, devices, False, now)
            s.commit()

    def _take_claims(
        self, s: Session, rollout_id: str, targets: Sequence[str], supersede: bool, now: float
    ) -> tuple[Superseded, ...]:
        claims = s.exec(
            select(DeviceClaimRow).where(
                col(DeviceClaimRow.device_id).in_(list(targets)),
                DeviceClaimRow.rollout_id != rollout_id,
            )
        ).all()
        if claims and not supersede:
            self._refuse_overlap(s, targets, rollout_id)
        by_rollout: dict[str, list[str]] = {}
        for claim in claims:
            by_rollout.setdefault(claim.rollout_id, []).append(claim.device_id)
            s.delete(claim)
        s.flush()
        superseded = []
        for older_id, devices in sorted(by_rollout.items()):
            left = 0
            for a in s.exec(select(AssignmentRow).where(AssignmentRow.rollout_id == older_id)):
                if a.device_id in devices:
                    a.state, a.reason, a.detail = "cancelled", "superseded", f"by {rollout_id}"
                    a.updated_at = now
                    s.add(a)
                elif a.state != "cancelled":
                    left += 1
            ended = left == 0
            older = s.get(RolloutRow, older_id)
            if ended and older is not None:
                older.status, older.reason = "Aborted", f"superseded by {rollout_id}"
                older.finished_at = older.updated_at = now
                s.add(older)
            superseded.append(Superseded(older_id, tuple(sorted(devices)), ended))
        held = set(
            s.exec(
                select(DeviceClaimRow.device_id).where(DeviceClaimRow.rollout_id == rollout_id)
            ).all()
        )
        for device_id in targets:
            if device_id not in held:
                s.add(DeviceClaimRow(device_id=device_id, rollout_id=rollout_id, claimed_at=now))
        s.flush()
        return tuple(superseded)

    def _refuse_overlap(
        self, s: Session, targets: Sequence[str], rollout_id: str | None = None
    ) -> None:
        claims = s.exec(
            select(DeviceClaimRow).where(col(DeviceClaimRow.device_id).in_(list(targets)))
        ).all()
        by_rollout: dict[str, list[str]] = {}
        for claim in claims:
            if claim.rollout_id != rollout_id:
                by_rollout.setdefault(claim.rollout_id, []).append(claim.device_id)
        if not by_rollout:
            return
        parts = [
            f"{len(ds)} device(s) in active rollout {rid} ({', '.join(sorted(ds)[:5])}"
            + (", …)" if len(ds) > 5 else ")")
            for rid, ds in sorted(by_rollout.items())
        ]
        raise RequestError(
            "a device belongs to one active rollout at a time: "
            + "; ".join(parts)
            + ". Wait for it to end, abort it, or pass --supersede",
            reason="rollout_conflict",
        )

    def get_rollout(self, rollout_id: str) -> RolloutRow:
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
        if row is None:
            raise RequestError(f"unknown rollout {rollout_id!r}", reason="unknown_rollout")
        return row

    def list_rollouts(self) -> list[RolloutRow]:
        with self.session() as s:
            return list(s.exec(select(RolloutRow).order_by(col(RolloutRow.created_at))).all())

    def mark_step_failed(self, rollout_id: str, reason: str, now: float) -> None:
        """Say on the rollout that the controller could not step it (its status stays)."""
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None or row.reason == reason:
                return
            row.reason, row.updated_at = reason, now
            s.add(row)
            s.commit()

    def open_rollouts(self) -> list[RolloutRow]:
        """Rollouts not finished: pending, in progress or paused."""
        with self.session() as s:
            return list(
                s.exec(select(RolloutRow).where(col(RolloutRow.status).in_(OPEN_STATUSES))).all()
            )

    def recently_finished(self, since: float) -> list[RolloutRow]:
        with self.session() as s:
            return list(
                s.exec(select(RolloutRow).where(col(RolloutRow.finished_at) >= since)).all()
            )

    def assignment_states(self, rollout_id: str) -> list[Assignment]:
        """A rollout's assignments as plain rows (no ORM objects: 10,000 of them load in
        a fraction of the time), by device id."""
        table = AssignmentRow.__table__  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            return [
                Assignment(**dict(row))
                for row in conn.execute(
                    select(table)
                    .where(table.c.rollout_id == rollout_id)
                    .order_by(table.c.device_id)
                ).mappings()
            ]

    def assignments(self, rollout_id: str) -> list[AssignmentRow]:
        with self.session() as s:
            return list(
                s.exec(
                    select(AssignmentRow)
                    .where(AssignmentRow.rollout_id == rollout_id)
                    .order_by(col(AssignmentRow.device_id))
                ).all()
            )

    def set_rollout_status(
        self, rollout_id: str, status: str, reason: str | None, now: float, *, final: bool
    ) -> None:
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                return
            row.status, row.reason, row.updated_at = status, reason, now
            if final:
                row.finished_at = now
                s.exec(delete(DeviceClaimRow).where(col(DeviceClaimRow.rollout_id) == rollout_id))
            s.add(row)
            s.commit()

    def update_rollout(self, rollout_id: str, now: float, **changes: object) -> RolloutRow:
        """Set planner fields of a rollout (stage, approval, rollback flag, status)."""
        with self.session() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise RequestError(f"unknown rollout {rollout_id!r}", reason="unknown_rollout")
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = now
            s.add(row)
            s.commit()
            s.refresh(row)
            return row

    def decide_winner(self, rollout_id: str, version: str, now: float) -> list[str]:
        """Record an A/B winner; devices on the other side go back to pending for it."""
        with self.session() as s:
            rollout = s.get(RolloutRow, rollout_id)
            if rollout is None or rollout.winner is not None:
                return []
            rollout.winner, rollout.updated_at = version, now
            s.add(rollout)
            moved = []
            for a in s.exec(select(AssignmentRow).where(AssignmentRow.rollout_id == rollout_id)):
                if (a.version or rollout.version) != version:
                    a.version, a.state, a.command_id, a.sent_at = version, "pending", None, None
                    a.reason = a.detail = None
                    a.updated_at = now
                    s.add(a)
                    moved.append(a.device_id)
            s.commit()
            return moved

    def _update(
        self,
        rollout_id: str,
        devices: Sequence[str],
        change: Callable[[AssignmentRow], bool],
        now: float,
    ) -> list[AssignmentRow]:
        """Apply `change` to the devices' assignments in one transaction; the rows changed."""
        if not devices:
            return []
        changed = []
        with self.session() as s:
            rows = _load_assignments(s, rollout_id, set(devices))
            for device_id in devices:
                row = rows.get(device_id)
                if row is not None and change(row):
                    row.updated_at = now
                    s.add(row)
                    changed.append(row)
            s.commit()
        return changed

    def mark_rollback_sent(
        self, rollout_id: str, devices: Sequence[str], command_id: str, now: float
    ) -> list[AssignmentRow]:
        """Persist a rollback command's intent before it is published."""

        def change(row: AssignmentRow) -> bool:
            if row.rollback_state is not None:
                return False
            row.rollback_command_id, row.rollback_state = command_id, "sent"
            row.rollback_sent_at = now
            return True

        return self._update(rollout_id, devices, change, now)

    def mark_rollback_timed_out(
        self, rollout_id: str, devices: Sequence[str], now: float
    ) -> list[AssignmentRow]:
        def change(row: AssignmentRow) -> bool:
            if row.rollback_state != "sent":
                return False
            row.rollback_state = "timed_out"
            return True

        return self._update(rollout_id, devices, change, now)

    def reset_for_retry(
        self, rollout_id: str, devices: Sequence[str], now: float
    ) -> list[AssignmentRow]:
        """Failed or timed-out devices go back to pending (their attempts are kept)."""

        def change(row: AssignmentRow) -> bool:
            if row.state not in ("failed", "timed_out"):
                return False
            row.state, row.command_id, row.sent_at = "pending", None, None
            row.reason = row.detail = None
            return True

        return self._update(rollout_id, devices, change, now)

    def mark_switching(
        self, rollout_id: str, devices: Sequence[str], command_id: str, now: float
    ) -> list[AssignmentRow]:
        """Staged devices get the switch command (persisted before it is published)."""

        def change(row: AssignmentRow) -> bool:
            if row.state != "staged":
                return False
            row.state, row.command_id, row.sent_at = "switching", command_id, now
            return True

        return self._update(rollout_id, devices, change, now)

    def mark_sent(
        self, rollout_id: str, devices: Sequence[str], command_id: str, now: float
    ) -> list[AssignmentRow]:
        """Persist the intent to send before the command is published (pending devices)."""

        def change(row: AssignmentRow) -> bool:
            if row.state != "pending":
                return False
            row.state, row.command_id, row.sent_at = "sent", command_id, now
            row.attempts += 1
            return True

        return self._update(rollout_id, devices, change, now)

    def mark_timed_out(
        self, rollout_id: str, devices: Sequence[str], now: float
    ) -> list[AssignmentRow]:
        def change(row: AssignmentRow) -> bool:
            if not advances(row.state, "timed_out"):
                return False
            row.state, row.reason = "timed_out", "timeout"
            return True

        return self._update(rollout_id, devices, change, now)

    def apply_event(self, event: DeviceEvent, now: float) -> Assignment | None:
        """Apply a device's progress event; returns the row if it changed."""
        changed = self.apply_events([event], now)
        return changed[0] if changed else None

    def apply_events(self, events: Sequence[DeviceEvent], now: float) -> list[Assignment]:
        """Apply devices' progress events in order, in one transaction; the rows changed
        (each once, as it ends up).

        At fleet scale this is the hot path: rows are read and written as plain tuples
        (one SELECT per rollout and chunk, one executemany UPDATE), not ORM objects;
        the rows returned are plain copies (`Assignment`).
        """
        ours = [e for e in events if e.rollout_id]
        if not ours:
            return []
        table = AssignmentRow.__table__  # type: ignore[attr-defined]
        changed: dict[tuple[str, str], Assignment] = {}
        with self.engine.begin() as conn:
            rows: dict[tuple[str, str], Assignment] = {}
            by_rollout: dict[str, set[str]] = {}
            for e in ours:
                by_rollout.setdefault(str(e.rollout_id), set()).add(e.device_id)
            for rollout_id, device_set in by_rollout.items():
                ids = sorted(device_set)
                for i in range(0, len(ids), 500):
                    for found in conn.execute(
                        select(table).where(
                            table.c.rollout_id == rollout_id,
                            table.c.device_id.in_(ids[i : i + 500]),
                        )
                    ).mappings():
                        loaded = Assignment(**dict(found))
                        rows[(loaded.rollout_id, loaded.device_id)] = loaded
            for event in ours:
                key = (str(event.rollout_id), event.device_id)
                row = rows.get(key)
                if row is not None and _apply_event(row, event, now):
                    changed[key] = row
            if changed:
                conn.execute(
                    update(table)
                    .where(
                        table.c.rollout_id == bindparam("k_rollout"),
                        table.c.device_id == bindparam("k_device"),
                    )
                    .values({n: bindparam(f"v_{n}") for n in _EVENT_COLUMNS}),
                    [
                        {"k_rollout": r.rollout_id, "k_device": r.device_id}
                        | {f"v_{n}": getattr(r, n) for n in _EVENT_COLUMNS}
                        for r in changed.values()
                    ],
                )
        return list(changed.values())

    # ------------------------------------------------------------ telemetry

    def window_stats(self, window: TelemetryWindow) -> CohortStats:
        """What one window adds to a cohort, read by its version's registered manifest.

        Its confidence counts only if the agent computed it by that version's task (an
        older agent's, which names none, only for a classifier on the first output);
        its per-input histograms only if they fit the signature, tensor by tensor. A
        version registered nowhere here is read as before tasks.
        """
        meaning = self._meaning(window.model.name, window.model.version)
        confidence = window.confidence
        if meaning is not None and not meaning.reads_confidence_of(window.task):
            confidence = Histogram.empty(CONFIDENCE_BUCKETS)  # computed by another rule
        first = window.inputs
        stored = (
            json.dumps([{"counts": list(h.counts), "total": h.total} for h in hists])
            if (hists := window.input_histograms) is not None
            else ""
        )
        return CohortStats(
            0,
            window.count,
            window.errors,
            window.latency_ms,
            confidence,
            first if first is not None else Histogram.empty(INPUT_BUCKETS),
            window.agreements or 0,
            meaning.tensor_inputs(stored, list(first.counts) if first else None) if meaning else (),
            frozenset({meaning.task}) if meaning else frozenset(),
            frozenset({window.agreement_rule or LEGACY_AGREEMENT_RULE})
            if window.shadow
            else frozenset(),
        )

    def save_telemetry(
        self,
        fleet: dict[tuple[str, str, bool, int], tuple[int, Rollup]],
        rollouts: Sequence[RolloutRollups],
        now: float,
    ) -> None:
        """One batch of telemetry in one transaction: the fleet's per-minute rollups,
        keyed (model, version, shadow, minute) with their window counts, added to what
        is stored; and open rollouts' per-device rollups of their stage, written whole
        with their served-latency totals."""
        with self.session() as s:
            for (model, version, shadow, minute), (windows, rollup) in fleet.items():
                row = s.get(TelemetryMinuteRow, (model, version, shadow, minute))
                if row is None:
                    row = TelemetryMinuteRow(
                        model=model, version=version, shadow=shadow, minute=minute
                    )
                    total = rollup
                else:
                    total = Rollup.from_json(row.data) if row.data else Rollup()
                    total.add(rollup)
                row.windows += windows
                row.count, row.errors = total.count, total.errors
                row.latency_total_ms, row.data = total.latency_total, total.to_json()
                s.add(row)
            for r in rollouts:
                self._write_rollups(s, r, now)
            s.commit()

    def _write_rollups(self, s: Session, r: RolloutRollups, now: float) -> None:
        existing = {
            (row.device_id, row.version, row.shadow): row
            for row in s.exec(
                select(TelemetryRollupRow).where(
                    TelemetryRollupRow.rollout_id == r.rollout_id,
                    TelemetryRollupRow.stage_index == r.stage_index,
                    col(TelemetryRollupRow.device_id).in_(sorted({x[0] for x in r.rollups})),
                )
            ).all()
        }
        for device_id, version, shadow, data in r.rollups:
            row = existing.get((device_id, version, shadow)) or TelemetryRollupRow(
                rollout_id=r.rollout_id,
                stage_index=r.stage_index,
                device_id=device_id,
                version=version,
                shadow=shadow,
                data=data,
            )
            row.data, row.updated_at = data, now
            s.add(row)
        rollout = s.get(RolloutRow, r.rollout_id)
        if rollout is not None:
            rollout.served_latency_total_ms, rollout.served_count = r.served
            s.add(rollout)

    def load_rollups(self, rollout_id: str, stage_index: int) -> list[TelemetryRollupRow]:
        with self.session() as s:
            return list(
                s.exec(
                    select(TelemetryRollupRow).where(
                        TelemetryRollupRow.rollout_id == rollout_id,
                        TelemetryRollupRow.stage_index == stage_index,
                    )
                ).all()
            )

    def prune_telemetry(self, finished_before: float) -> int:
        """Drop what is older than a time: rollups of rollouts finished before it, the
        fleet's minutes before it, the raw windows an older controller stored; how many
        rollout rollup rows went."""
        with self.session() as s:
            done = select(RolloutRow.rollout_id).where(
                col(RolloutRow.finished_at).is_not(None),
                col(RolloutRow.finished_at) < finished_before,
            )
            result = s.exec(
                delete(TelemetryRollupRow).where(col(TelemetryRollupRow.rollout_id).in_(done))
            )
            s.exec(
                delete(TelemetryWindowRow).where(
                    col(TelemetryWindowRow.window_end) < finished_before
                )
            )
            s.exec(
                delete(TelemetryMinuteRow).where(
                    col(TelemetryMinuteRow.minute) < int(finished_before // 60)
                )
            )
            s.commit()
            return int(result.rowcount or 0)

    def state_counts(self, rollout_id: str) -> tuple[dict[str, int], dict[str, int]]:
        """A rollout's devices per deploy state and per rollback state (one query)."""
        counts: dict[str, int] = {}
        rollbacks: dict[str, int] = {}
        with self.session() as s:
            for state, rollback, n in s.exec(
                select(AssignmentRow.state, AssignmentRow.rollback_state, func.count())
                .where(AssignmentRow.rollout_id == rollout_id)
                .group_by(col(AssignmentRow.state), col(AssignmentRow.rollback_state))
            ).all():
                counts[state] = counts.get(state, 0) + int(n)
                if rollback is not None:
                    rollbacks[rollback] = rollbacks.get(rollback, 0) + int(n)
        return counts, rollbacks

    def assignments_page(
        self, rollout_id: str, state: str | None, offset: int, limit: int
    ) -> tuple[int, list[AssignmentRow]]:
        """A page of a rollout's devices by id (optionally in one state as the status
        counts it, `rolled_back` and `rollback_failed` included), and how many there are
        in all."""
        with self.session() as s:
            where: list[ColumnElement[bool]] = [col(AssignmentRow.rollout_id) == rollout_id]
            rollback = col(AssignmentRow.rollback_state)
            if state == "rolled_back":
                where.append(rollback == "rolled_back")
            elif state == "rollback_failed":
                where.append(rollback.in_(("failed", "timed_out")))
            elif state is not None:
                where.append(col(AssignmentRow.state) == state)
                if state == "activated":  # the status shows an answered rollback instead
                    where.append(or_(rollback.is_(None), rollback.not_in(ANSWERED_ROLLBACK_STATES)))
            total = int(s.exec(select(func.count()).select_from(AssignmentRow).where(*where)).one())
            rows = s.exec(
                select(AssignmentRow)
                .where(*where)
                .order_by(col(AssignmentRow.device_id))
                .offset(offset)
                .limit(limit)
            ).all()
            return total, list(rows)

    def registered_task(self, model: str, version: str) -> ModelTask | None:
        """The task a registered version's telemetry is read by; None if unregistered."""
        meaning = self._meaning(model, version)
        return meaning.task if meaning is not None else None

    def model_task(self, model: str, version: str) -> str | None:
        """The task a registered version's telemetry is read by, saying where it came from
        ("classifier on 'out' (inferred from the signature)"); None if unregistered."""
        meaning = self._meaning(model, version)
        return meaning.origin if meaning is not None else None

    def _meaning(self, model: str, version: str) -> _Meaning | None:
        """What telemetry of a registered version means (cached: versions never change)."""
        key = (model, version)
        cached = self._meanings.get(key)
        if cached is not None:
            return cached
        missed = self._unregistered.get(key)
        if missed is not None and time.monotonic() - missed < UNREGISTERED_TTL_S:
            return None
        with self.session() as s:
            row = s.exec(
                select(ModelVersionRow.signed_manifest).where(
                    ModelVersionRow.name == model, ModelVersionRow.version == version
                )
            ).first()
        if row is None:
            # Not registered here: read as before tasks. Remembered for a while (a
            # bounded number of them: a device may name versions at random).
            if len(self._unregistered) >= MAX_UNREGISTERED:
                self._unregistered.clear()
            self._unregistered[key] = time.monotonic()
            return None
        try:
            manifest = SignedManifest.model_validate_json(row).unverified()
        except (ValueError, ArtifactError):
            return None
        meaning = self._meanings[key] = _Meaning.of(manifest)
        return meaning


# What an event may change of an assignment (`_apply_event`).
_EVENT_COLUMNS = ("state", "rollback_state", "reason", "detail", "updated_at")
# What a device's state message may change of its row.
_STATE_COLUMNS = (
    "region",
    "device_type",
    "online",
    "active_name",
    "active_version",
    "active_sha256",
    "standby_ref",
    "memory_mb",
    "agent_version",
    "last_seen",
)


def _apply_event(row: Assignment, event: DeviceEvent, now: float) -> bool:
    """Move one assignment by one event; False when the event changes nothing."""
    if row.rollback_command_id is not None and row.rollback_command_id == event.command_id:
        # The answer to our rollback command: only its final phase matters.
        if row.rollback_state != "sent" or event.phase not in ("rolled_back", "failed"):
            return False
        row.rollback_state, row.updated_at = event.phase, now
        if event.phase == "failed":
            row.reason, row.detail = event.reason or "failed", event.detail
        return True
    if row.command_id != event.command_id:
        return False  # not ours, or a stale command's echo
    if not advances(row.state, event.phase):
        return False
    late = row.state == "timed_out"
    row.state, row.updated_at = event.phase, now
    if event.phase in ("failed", "rolled_back"):
        row.reason, row.detail = event.reason or event.phase, event.detail
    elif late:
        row.reason, row.detail = None, "answered after its timeout"
    return True


def _load_assignments(s: Session, rollout_id: str, devices: set[str]) -> dict[str, AssignmentRow]:
    """The rollout's assignments of these devices, in chunks a database takes in IN ()."""
    ids = sorted(devices)
    rows: dict[str, AssignmentRow] = {}
    for i in range(0, len(ids), 500):
        for row in s.exec(
            select(AssignmentRow).where(
                AssignmentRow.rollout_id == rollout_id,
                col(AssignmentRow.device_id).in_(ids[i : i + 500]),
            )
        ).all():
            rows[row.device_id] = row
    return rows
