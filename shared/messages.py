"""Message models for every topic of DESIGN.md §2.

JSON on the wire, camelCase keys, snake_case in Python; every message carries
`v` (the schema version) and a `kind` discriminator. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator
from pydantic.alias_generators import to_camel

from shared.manifest import SignedManifest
from shared.sketch import CONFIDENCE_MAPPING, LATENCY_MAPPING, SketchData
from shared.topics import check_ident

MAX_MESSAGE_BYTES = 256 * 1024


def utcnow() -> datetime:
    return datetime.now(UTC)


class WireModel(BaseModel):
    # Unknown keys are ignored so that a newer controller can talk to older agents.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )
    v: Literal[1] = 1  # SCHEMA_VERSION

    def to_wire(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class ModelRef(WireModel):
    name: str
    version: str
    sha256: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Selector(WireModel):
    """Which devices of a region a region-wide command is for (all fields AND-ed)."""

    device_types: tuple[str, ...] = ()
    min_memory_mb: int | None = None
    cohort: tuple[str, ...] = ()  # explicit device ids; empty means every device

    def matches(self, *, device_id: str, device_type: str, memory_mb: int | None) -> bool:
        if self.device_types and device_type not in self.device_types:
            return False
        if self.min_memory_mb is not None and (memory_mb or 0) < self.min_memory_mb:
            return False
        return not self.cohort or device_id in self.cohort


# ---------------------------------------------------------------- commands


class _Command(WireModel):
    command_id: str = Field(min_length=1, max_length=128)
    rollout_id: str | None = None
    issued_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    selector: Selector | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class DeployCommand(_Command):
    """Download, verify, load and activate the model the signed manifest names.

    With `activate` false the model is only staged: loaded, warm and resident in
    the standby slot, for a later `switch` (blue-green).
    """

    kind: Literal["deploy"] = "deploy"
    manifest: SignedManifest
    url: str = Field(max_length=8192)
    activate: bool = True
    # With activate=false: mirror live inputs to the staged model for this long (shadow mode).
    shadow_s: float | None = Field(default=None, gt=0)
    # Anti-rollback override: install even if the manifest's version is below the highest
    # the device has activated for this model. Trusted because the command is signed by
    # the controller, which sets it for A/B tests and operator-approved downgrades only.
    allow_downgrade: bool = False
    # Install even if the model's tensor interface differs from the active model's
    # (`rollout start --allow-interface-change`); otherwise the device refuses it.
    allow_interface_change: bool = False


class SwitchCommand(_Command):
    """Make the staged model `to` active: one reference swap (blue-green)."""

    kind: Literal["switch"] = "switch"
    to: ModelRef


class RollbackCommand(_Command):
    """Swap back to `to` (default: the resident previous model)."""

    kind: Literal["rollback"] = "rollback"
    to: ModelRef | None = None


class CancelCommand(_Command):
    """Abandon the work of an earlier command of the same rollout, if not yet active."""

    kind: Literal["cancel"] = "cancel"


Command = Annotated[
    DeployCommand | SwitchCommand | RollbackCommand | CancelCommand, Field(discriminator="kind")
]
COMMAND = TypeAdapter[Command](Command)


# ---------------------------------------------------------------- device → controller


class Capabilities(WireModel):
    memory_mb: int | None = None
    cpu_count: int | None = None
    runtime: str = ""


class DeviceState(WireModel):
    """Retained on the device's state topic; the last will sets online=false."""

    kind: Literal["state"] = "state"
    device_id: str
    region: str
    device_type: str
    capabilities: Capabilities = Capabilities()
    online: bool
    active: ModelRef | None = None
    standby: ModelRef | None = None
    agent_version: str = ""
    at: datetime = Field(default_factory=utcnow)

    @field_validator("device_id", "region", "device_type")
    @classmethod
    def _ident(cls, v: str) -> str:
        return check_ident(v)


class DeviceRecord(WireModel):
    """Retained on `hotswap/v1/registry/{device_id}`: what provisioning fixed for a device.

    Published by the broker's admin identity only (devices cannot write there), so
    the controller trusts it over the device's own state: a device that claims
    another region or type is refused. `revoked` is set by `hotswap device revoke`.
    """

    kind: Literal["device_record"] = "device_record"
    device_id: str
    region: str | None = None  # None only on a revocation record
    device_type: str | None = None
    revoked: bool = False
    at: datetime = Field(default_factory=utcnow)

    @field_validator("device_id", "region", "device_type")
    @classmethod
    def _ident(cls, v: str | None) -> str | None:
        return None if v is None else check_ident(v)

    @model_validator(mode="after")
    def _complete(self) -> DeviceRecord:
        if not self.revoked and (self.region is None or self.device_type is None):
            raise ValueError("a device record names its region and device type")
        return self


EventPhase = Literal[
    "received", "downloading", "verified", "staged", "activated", "failed", "rolled_back"
]
# `staged`: a deploy with activate=false is done (the model waits in standby).
FINAL_PHASES: frozenset[str] = frozenset({"staged", "activated", "failed", "rolled_back"})


class DeviceEvent(WireModel):
    """Progress of one command on one device."""

    kind: Literal["event"] = "event"
    device_id: str
    command_id: str
    rollout_id: str | None = None
    phase: EventPhase
    reason: str | None = None
    detail: str | None = Field(default=None, max_length=2048)
    model: ModelRef | None = None
    at: datetime = Field(default_factory=utcnow)

    @classmethod
    def answering(
        cls,
        command: _Command,
        device_id: str,
        phase: EventPhase,
        *,
        reason: str | None = None,
        detail: str | None = None,
        model: ModelRef | None = None,
    ) -> DeviceEvent:
        """A device's answer to `command` (its ids), `detail` cut to what the contract takes."""
        return cls(
            device_id=device_id,
            command_id=command.command_id,
            rollout_id=command.rollout_id,
            phase=phase,
            reason=reason,
            detail=detail[:2048] if detail else None,
            model=model,
        )


# Fixed bucket upper bounds, so that windows from any device merge by adding counts.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, math.inf,
)  # fmt: skip
CONFIDENCE_BUCKETS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
# Input values (a sample of the inferences), for drift: population stability index.
# Float inputs; other dtypes have their own buckets (`shared.tasks.input_bounds`).
INPUT_BUCKETS: tuple[float, ...] = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, math.inf)
# Limits of a window's per-input histograms: the controller does not know a message's
# dtypes when it parses it, so it bounds them here and checks the bucket layouts against
# the model's registered signature when it merges windows.
MAX_INPUT_TENSORS = 64
MAX_INPUT_BUCKETS = 64


class Histogram(WireModel):
    """Counts per fixed bucket (upper bounds inclusive) plus the plain sum."""

    counts: tuple[int, ...]
    total: float = 0.0

    @classmethod
    def empty(cls, bounds: Sequence[float]) -> Histogram:
        return cls(counts=(0,) * len(bounds))

    @property
    def n(self) -> int:
        return sum(self.counts)

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def merged(self, other: Histogram) -> Histogram:
        if len(other.counts) != len(self.counts):
            raise ValueError("histograms with different buckets do not merge")
        return Histogram(
            counts=tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            total=self.total + other.total,
        )

    def quantile(self, q: float, bounds: Sequence[float]) -> float | None:
        """The upper bound of the bucket holding the q-quantile (conservative)."""
        n = self.n
        if not n:
            return None
        rank = q * n
        seen = 0
        for bound, count in zip(bounds, self.counts, strict=True):
            seen += count
            if seen >= rank and count:
                return bound if math.isfinite(bound) else bounds[-2]
        return bounds[-2]


# No device runs this many inferences in one window: a larger count is a lie or a bug
# (and would overflow the database's integers).
MAX_WINDOW_COUNT = 10**12


def _check_histogram(
    name: str, h: Histogram, bounds: Sequence[float] | None, *, signed: bool
) -> None:
    """Bucket layout (`bounds`; None: at most MAX_INPUT_BUCKETS), counts, total."""
    if bounds is None:
        if len(h.counts) > MAX_INPUT_BUCKETS:
            raise ValueError(f"{name}: {len(h.counts)} buckets, at most {MAX_INPUT_BUCKETS}")
    elif len(h.counts) != len(bounds):
        raise ValueError(f"{name}: {len(h.counts)} buckets, the contract has {len(bounds)}")
    if any(c < 0 or c > MAX_WINDOW_COUNT for c in h.counts):
        raise ValueError(f"{name}: bucket counts must be integers in 0..{MAX_WINDOW_COUNT}")
    if not math.isfinite(h.total) or (not signed and h.total < 0):
        raise ValueError(f"{name}: total must be finite" + ("" if signed else " and >= 0"))


class TelemetryWindow(WireModel):
    """Inference metrics of one model version on one device over one window.

    Checked completely on arrival (one device's bad window must never reach the
    gates): the contract's bucket layouts, non-negative bounded integer counts,
    finite totals, errors and agreements within the count. Per-input histograms
    are bounded here (their layouts depend on dtypes the message does not carry)
    and matched against the registered signature when the controller merges them.

    Added fields are optional: a window of an older agent (no task, no per-input
    histograms, no agreement rule, no sketches) still parses and counts, and an
    older controller ignores the fields it does not know (`extra="ignore"`), so
    adding the sketches needs no new schema version.
    """

    kind: Literal["telemetry"] = "telemetry"
    device_id: str
    model: ModelRef
    window_start: datetime
    window_end: datetime
    count: int = Field(ge=0, le=MAX_WINDOW_COUNT)
    errors: int = Field(ge=0, le=MAX_WINDOW_COUNT)
    latency_ms: Histogram
    confidence: Histogram
    input_mean: float | None = Field(default=None, allow_inf_nan=False)
    input_std: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # The first input's values on INPUT_BUCKETS, over a sample of the window's inferences
    # (what controllers before per-input histograms read).
    inputs: Histogram | None = None
    # One histogram per input tensor, in input order, on `shared.tasks.input_bounds` of
    # that tensor (empty counts for a tensor with no buckets), over the same sample.
    input_histograms: tuple[Histogram, ...] | None = Field(
        default=None, max_length=MAX_INPUT_TENSORS
    )
    # `shared.tasks.describe` of the task the confidence was computed by ("none": the
    # confidence histogram stays empty). None: an agent that predates tasks.
    task: str | None = Field(default=None, max_length=512)
    # Shadow mode: the model ran on mirrored inputs, unserved; `agreements` counts the
    # inferences whose outputs agreed with the served model's by `agreement_rule`
    # (None: an older agent, which compared the first output's top class).
    shadow: bool = False
    agreements: int | None = Field(default=None, ge=0, le=MAX_WINDOW_COUNT)
    agreement_rule: str | None = Field(default=None, max_length=256)
    # The same calls as `latency_ms` and `confidence` at high resolution (`shared.sketch`):
    # latency on LATENCY_MAPPING (quantiles within 2 %), confidence on CONFIDENCE_MAPPING
    # (a 0.001 grid). Mergeable by adding counts. None: an agent that predates sketches.
    latency_sketch: SketchData | None = None
    confidence_sketch: SketchData | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TelemetryWindow:
        _check_histogram("latencyMs", self.latency_ms, LATENCY_BUCKETS_MS, signed=False)
        _check_histogram("confidence", self.confidence, CONFIDENCE_BUCKETS, signed=False)
        if self.inputs is not None:
            _check_histogram("inputs", self.inputs, INPUT_BUCKETS, signed=True)
        for i, h in enumerate(self.input_histograms or ()):
            _check_histogram(f"inputHistograms[{i}]", h, None, signed=True)
        if self.errors > self.count:
            raise ValueError("errors exceed the window's count")
        for name, sketch, mapping in (
            ("latencySketch", self.latency_sketch, LATENCY_MAPPING),
            ("confidenceSketch", self.confidence_sketch, CONFIDENCE_MAPPING),
        ):
            if sketch is None:
                continue
            if sketch.mapping != mapping:
                have, want = sketch.mapping.describe(), mapping.describe()
                raise ValueError(f"{name}: {have}, the contract has {want}")
            if sketch.n > self.count:
                raise ValueError(f"{name}: counts more values than the window's count")
        if self.agreements is not None and self.agreements > self.count:
            raise ValueError("agreements exceed the window's count")
        if self.window_end < self.window_start:
            raise ValueError("the window ends before it starts")
        return self


# ---------------------------------------------------------------- controller → all

RolloutState = Literal[
    "Pending", "InProgress", "Paused", "Succeeded", "Failed", "RolledBack", "Aborted"
]
FINAL_ROLLOUT_STATES: frozenset[str] = frozenset({"Succeeded", "Failed", "RolledBack", "Aborted"})


GateOutcome = Literal["pass", "fail", "inconclusive", "not_applicable"]


class GateVerdict(WireModel):
    """One gate's reading. `not_applicable`: the gate measures something the model does
    not have (confidence of a model with no confidence); it neither passes nor fails.

    `observed` is the estimate; `low`/`high` its interval at `level` (two-sided: each
    bound is one-sided at (1 + level) / 2), None where the gate has none (a point reading,
    or agents without sketches), except that the bound a `fail` is decided on (`low` of a
    `max_` gate, `high` of `min_agreement`) is one-sided at `fail_level` when that is set:
    the sequential level of this reading of the bake (`controller.gates.look_level`).
    The samples and devices each side counted; `method` how it was computed
    (`docs/gates.md`). Fields after `detail` are optional (older controllers do not send
    them).
    """

    gate: str
    verdict: GateOutcome
    observed: float | None = None
    threshold: float | None = None
    detail: str = ""
    low: float | None = None
    high: float | None = None
    level: float | None = None
    fail_level: float | None = None  # one-sided level of the fail bound; None: at `level`
    samples: int | None = None  # candidate's inferences (or confidence values) counted
    baseline_samples: int | None = None
    devices: int | None = None  # candidate devices whose own statistic counted
    baseline_devices: int | None = None
    method: str | None = None


class DeviceProgress(WireModel):
    device_id: str
    state: str
    reason: str | None = None


class CohortSummary(WireModel):
    """What one cohort's telemetry says over the current stage's window."""

    devices: int
    inferences: int
    error_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    mean_confidence: float | None = None
    # Population stability index of the inputs vs the baseline: the largest of the
    # tensors' (or, from agents without per-input histograms, the first input's).
    input_psi: float | None = None
    input_psi_by_tensor: dict[str, float] | None = None  # input tensor name -> PSI
    agreement: float | None = None  # shadow: share of inferences agreeing with the served
    task: str | None = None  # the task(s) the cohort's confidence means ("; " between)
    agreement_rule: str | None = None  # shadow: how agreement was counted
    # How the quantiles were read: "sketch" (within 2 %) or "histograms" (agents without
    # sketches: 15 fixed buckets, a bucket's upper bound). None: an older controller.
    quantiles: str | None = None
    # The comparison window: windows counted from this instant (devices' clocks), and
    # the settle rule that left each device's first calls of a version out.
    window_start: datetime | None = None
    settle: str | None = None


class ABComparison(WireModel):
    """An A/B test's reading: each side's value of the winner metric, and the verdict."""

    metric: str
    version_a: str
    version_b: str
    value_a: float | None = None
    value_b: float | None = None
    improvement: float | None = None  # how much better B is than A (share; >0: B better)
    winner: str | None = None  # the winning version once decided
    detail: str = ""


STATUS_DEVICE_LINES = 50


class RolloutStatus(WireModel):
    """Retained on `hotswap/v1/rollouts/{id}/status`."""

    kind: Literal["rollout_status"] = "rollout_status"
    rollout_id: str
    model: str
    version: str
    strategy: str
    status: RolloutState
    devices_targeted: int
    devices_updated: int
    devices_failed: int = 0
    devices_pending: int = 0
    success_rate: float = 0.0  # percent of targeted devices that activated
    avg_inference_latency: float | None = None  # ms, candidate version on targeted devices
    stage: str = ""
    gates: tuple[GateVerdict, ...] = ()
    candidate: CohortSummary | None = None
    baseline: CohortSummary | None = None
    ab: ABComparison | None = None
    # The candidate's task (declared in its manifest or inferred from its signature) and,
    # for shadow rollouts, how its agreement with the served model was counted.
    task: str | None = None
    agreement_rule: str | None = None
    # Devices per state (`rolled_back` and `rollback_failed` once a rollback answered):
    # the status's size does not grow with the fleet.
    device_states: dict[str, int] = Field(default_factory=dict)
    # Each device's line, only for rollouts of at most STATUS_DEVICE_LINES devices;
    # larger ones page through `rollout devices` (ListRolloutDevices).
    devices: tuple[DeviceProgress, ...] = ()
    reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def final(self) -> bool:
        return self.status in FINAL_ROLLOUT_STATES


class ControllerState(WireModel):
    kind: Literal["controller_state"] = "controller_state"
    online: bool
    version: str = ""
    at: datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------- operator ⇄ controller


class RegisterModel(WireModel):
    kind: Literal["register_model"] = "register_model"
    manifest: SignedManifest
    s3_key: str


class ListModels(WireModel):
    kind: Literal["list_models"] = "list_models"


class ListDevices(WireModel):
    """A page of the fleet, by device id: answers stay far below the broker's packet
    limit at any fleet size (the CLI asks page after page)."""

    kind: Literal["list_devices"] = "list_devices"
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=1000, ge=1, le=2000)  # a device's row is ~300 bytes


class GateSpec(WireModel):
    """Thresholds a candidate cohort must meet; None leaves a gate out."""

    max_latency_ms: float | None = Field(default=None, gt=0)  # candidate p95
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_latency_increase: float | None = Field(default=None, ge=0)  # cand p95 / base p95 - 1
    max_confidence_drop: float | None = Field(default=None, ge=0, le=1)
    max_input_psi: float | None = Field(default=None, gt=0)  # input drift vs the baseline
    # shadow: share agreeing with the served outputs (same top class for classifiers)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    # Inferences per cohort before a verdict: 2,000 (e.g. 20 devices x 100) is what the
    # latency gate needs to catch +10 % in 95 % of canaries (bench/gates.py, docs/gates.md).
    min_samples: int = Field(default=2000, ge=1)
    # Seconds after a device's first window of a version (the one holding the swap) before
    # its windows count for the gates (`controller.live`, docs/gates.md).
    settle_s: float = Field(default=1.0, ge=0, le=3600)

    @property
    def any(self) -> bool:
        return any(
            g is not None
            for g in (
                self.max_latency_ms,
                self.max_error_rate,
                self.max_latency_increase,
                self.max_confidence_drop,
                self.max_input_psi,
                self.min_agreement,
            )
        )


StrategyName = Literal[
    "direct", "canary", "progressive", "regional", "rolling", "ab", "blue-green", "shadow"
]  # fmt: skip


class StageSpec(WireModel):
    percent: float = Field(gt=0, le=100)  # cumulative share of the targets
    duration_s: float = Field(ge=0)  # bake time once the stage's devices are done


class StartRollout(WireModel):
    kind: Literal["start_rollout"] = "start_rollout"
    model: str
    version: str
    strategy: StrategyName = "direct"
    devices: tuple[str, ...] = ()
    region: str | None = None
    device_type: str | None = None
    # With no devices, region or device type: the whole fleet, only when asked for.
    all_devices: bool = False
    # Cancel older active rollouts on the devices this one shares with them.
    supersede: bool = False
    device_timeout_s: float = Field(default=600.0, gt=0)
    retries: int = Field(default=0, ge=0, le=10)  # re-sends to a failed or timed-out device
    # canary
    canary_percent: float = Field(default=10.0, gt=0, lt=100)
    canary_duration_s: float = Field(default=300.0, ge=0)
    # progressive
    stages: tuple[StageSpec, ...] = ()
    # regional
    regions: tuple[str, ...] = ()
    region_delay_s: float = Field(default=0.0, ge=0)
    # rolling
    batch_size: int = Field(default=1, ge=1)
    batch_delay_s: float = Field(default=0.0, ge=0)
    # A/B: `version` is A, `version_b` is B; half the targets each, then the winner to all
    version_b: str | None = None
    test_duration_s: float = Field(default=300.0, ge=0)
    winner_metric: Literal["latency", "errors", "confidence"] = "latency"
    min_improvement: float = Field(default=0.05, ge=0)  # B must beat A by this share
    # shadow: mirror live inputs to the candidate this long; the gates read the result
    shadow_duration_s: float = Field(default=300.0, gt=0)
    # safety
    gates: GateSpec = GateSpec()
    manual_approval: bool = False
    # Deploys may go below the version a device has activated (anti-rollback override).
    allow_downgrade: bool = False
    # Devices may take a model whose tensor interface differs from the one they serve.
    allow_interface_change: bool = False
    max_failure_percent: float = Field(default=0.0, ge=0, le=100)  # abort threshold
    min_executed: int = Field(default=1, ge=1)  # ...counted after this many devices finished

    @model_validator(mode="after")
    def _strategy_fields(self) -> StartRollout:
        if self.strategy == "progressive":
            if not self.stages:
                raise ValueError("a progressive rollout needs stages, e.g. 10:5m,50:10m,100:0")
            shares = [s.percent for s in self.stages]
            if shares != sorted(shares) or len(set(shares)) != len(shares) or shares[-1] != 100:
                raise ValueError("progressive stages must grow and end at 100%")
        if self.strategy == "ab" and (not self.version_b or self.version_b == self.version):
            raise ValueError("an A/B test needs --version-b, different from --version")
        if self.strategy == "regional" and not self.regions:
            raise ValueError("a regional rollout needs --regions a,b,c")
        for r in self.regions:
            check_ident(r, "region")
        return self


RolloutAction = Literal["approve", "pause", "resume", "abort", "rollback"]


class ControlRollout(WireModel):
    """Operator control of a running rollout."""

    kind: Literal["control_rollout"] = "control_rollout"
    rollout_id: str
    action: RolloutAction


class GetRollout(WireModel):
    kind: Literal["get_rollout"] = "get_rollout"
    rollout_id: str


class ListRollouts(WireModel):
    kind: Literal["list_rollouts"] = "list_rollouts"


class ListRolloutDevices(WireModel):
    """A page of one rollout's devices (the retained status only counts them)."""

    kind: Literal["list_rollout_devices"] = "list_rollout_devices"
    rollout_id: str
    state: str | None = None  # only devices in this state
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=500, ge=1, le=5000)


class RolloutDevicesPage(WireModel):
    rollout_id: str
    total: int  # devices matching (all pages)
    offset: int
    devices: tuple[DeviceProgress, ...]


class Ping(WireModel):
    """Is a controller answering? (`controller run` asks before taking the controller's id.)"""

    kind: Literal["ping"] = "ping"


Request = Annotated[
    RegisterModel
    | ListModels
    | ListDevices
    | StartRollout
    | GetRollout
    | ListRollouts
    | ListRolloutDevices
    | ControlRollout
    | Ping,
    Field(discriminator="kind"),
]
REQUEST = TypeAdapter[Request](Request)


class Response(WireModel):
    kind: Literal["response"] = "response"
    ok: bool
    error: str | None = None
    reason: str | None = None
    result: Any = None
