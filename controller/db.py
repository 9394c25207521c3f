"""SQLModel tables and the engine: the controller's source of truth.

SQLite (WAL) by default, PostgreSQL by URL. Every rollout decision is
re-derived from these rows, so a controller killed at any point resumes.
Times are stored as UNIX seconds (float) so both databases agree on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel, UniqueConstraint, create_engine


class ModelVersionRow(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    version: str
    sha256: str
    size: int
    signature: str  # human-readable tensor signature, e.g. (float32[1, 4]) -> (float32[1, 3])
    device_types: str = ""  # comma-separated; empty means any
    signed_manifest: str  # the SignedManifest JSON as pushed
    s3_key: str
    created_at: float
    # The `traceparent` of the push that registered it (None untraced or older rows):
    # each rollout of the version links its trace to that push. Not on the wire.
    trace_parent: str | None = Field(default=None, exclude=True)


class DeviceRow(SQLModel, table=True):
    __tablename__ = "devices"

    device_id: str = Field(primary_key=True)
    region: str = Field(index=True)
    device_type: str = Field(index=True)
    online: bool = False
    active_name: str | None = None
    active_version: str | None = None
    active_sha256: str | None = None
    standby_ref: str | None = None
    memory_mb: int | None = None
    agent_version: str = ""
    last_seen: float = 0.0
    # Region and device type came from the provisioning record (hotswap/v1/registry/…),
    # not from the device: its own state may not change them.
    provisioned: bool = False
    revoked: bool = False  # `hotswap device revoke`: offline for good, never targeted


class RolloutRow(SQLModel, table=True):
    __tablename__ = "rollouts"

    rollout_id: str = Field(primary_key=True)
    model: str
    version: str
    sha256: str
    strategy: str
    spec: str  # JSON of the StartRollout request that created it
    status: str = Field(index=True)
    reason: str | None = None
    device_timeout_s: float = 600.0
    created_at: float
    updated_at: float
    finished_at: float | None = None
    # Where the planner is (every decision is re-derived from these on each tick).
    stage_index: int = 0
    stage_started_at: float | None = None
    stage_settled_at: float | None = None  # when every device of the stage was final
    approved_stage: int = 0  # the operator approved starting stages up to this index
    rolling_back: bool = False
    version_b: str | None = None  # A/B tests: the other version
    winner: str | None = None  # A/B tests: the version rolled out to all once decided
    ab_result: str | None = None  # A/B tests: the comparison (JSON) the decision was made on
    # The candidate's served inferences on devices that activated it, over the rollout.
    served_latency_total_ms: float = 0.0
    served_count: int = 0


class AssignmentRow(SQLModel, table=True):
    """One device's part in one rollout: which command it got and how far it came."""

    __tablename__ = "assignments"

    rollout_id: str = Field(primary_key=True, foreign_key="rollouts.rollout_id")
    device_id: str = Field(primary_key=True)
    region: str = ""
    version: str = ""  # the version this device is to run (A/B); "" means the rollout's
    state: str = "pending"
    command_id: str | None = None
    rollback_command_id: str | None = None
    rollback_state: str | None = None  # None, sent, rolled_back, failed, timed_out
    rollback_sent_at: float | None = None
    reason: str | None = None
    detail: str | None = None
    attempts: int = 0
    sent_at: float | None = None
    updated_at: float = 0.0


class DeviceClaimRow(SQLModel, table=True):
    """A device belongs to at most one active rollout: the primary key says so.

    Claimed in the transaction that creates the rollout and released when it ends,
    so two starts racing for the same device cannot both commit.
    """

    __tablename__ = "device_claims"

    device_id: str = Field(primary_key=True)
    rollout_id: str = Field(foreign_key="rollouts.rollout_id", index=True)
    claimed_at: float = 0.0


class TelemetryWindowRow(SQLModel, table=True):
    __tablename__ = "telemetry_windows"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True)
    model: str
    version: str = Field(index=True)
    window_start: float
    window_end: float = Field(index=True)
    count: int
    errors: int
    latency_total_ms: float
    latency_counts: str  # JSON list, LATENCY_BUCKETS_MS
    confidence_counts: str  # JSON list, CONFIDENCE_BUCKETS
    confidence_total: float = 0.0
    input_counts: str = ""  # JSON list, INPUT_BUCKETS (a sample of the inputs); "" if none
    shadow: bool = False  # mirrored, unserved inferences of a shadow model
    agreements: int = 0  # shadow: inferences agreeing with the served model's outputs
    input_mean: float | None = None
    input_std: float | None = None
    # JSON list of {"counts": [...], "total": x}, one per input tensor in input order, on
    # shared.tasks.input_bounds of each; "" if the agent sent none (an older agent).
    input_histograms: str = ""
    task: str = ""  # the task the agent computed confidence by (describe()); "" if unsaid
    agreement_rule: str = ""  # shadow: how the agent counted agreements; "" if unsaid


class TelemetryRollupRow(SQLModel, table=True):
    """One device's telemetry of one version over one stage of a rollout, merged.

    Bounded: a row per device, version and served/mirrored side per stage, however
    many windows it sent (controller.live.Rollup, as JSON). What the gates read
    again after a restart; pruned with its rollout (`telemetry_retention_s`).
    """

    __tablename__ = "telemetry_rollups"

    rollout_id: str = Field(primary_key=True)
    stage_index: int = Field(primary_key=True)
    device_id: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    shadow: bool = Field(primary_key=True)
    data: str
    updated_at: float = 0.0


class TelemetryMinuteRow(SQLModel, table=True):
    """The fleet's telemetry of one model version per minute, merged (Rollup JSON).

    Bounded by versions and minutes, not by devices or windows: what the fleet's
    devices said, kept for `telemetry_retention_s` whether or not a rollout ran.
    """

    __tablename__ = "telemetry_minutes"

    model: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    shadow: bool = Field(primary_key=True)
    minute: int = Field(primary_key=True)  # UNIX time // 60 of the window's end
    windows: int = 0
    count: int = 0
    errors: int = 0
    latency_total_ms: float = 0.0
    data: str = ""


def make_engine(url: str) -> Engine:
    """An engine for `url`; creates the SQLite file's directory and turns on WAL."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine, "connect", _sqlite_pragmas)
    SQLModel.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Columns added to a table since its database was created, with their defaults.

    `create_all` makes missing tables but leaves existing ones alone; a database
    written by an older controller gets the new (defaulted) columns here.
    """
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in SQLModel.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = getattr(column.default, "arg", None)
                clause = ""
                if isinstance(default, bool):
                    clause = f" DEFAULT {'TRUE' if default else 'FALSE'}"
                elif isinstance(default, int | float):
                    clause = f" DEFAULT {default}"
                elif isinstance(default, str):
                    clause = " DEFAULT '" + default.replace("'", "''") + "'"
                conn.execute(
                    text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{clause}")
                )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
