"""Wire message edge cases: schema version, commands on the wire, histogram corners."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from shared.manifest import build_manifest, sign_manifest
from shared.messages import (
    COMMAND,
    LATENCY_BUCKETS_MS,
    REQUEST,
    DeployCommand,
    DeviceState,
    GetRollout,
    Histogram,
    ModelRef,
    Selector,
    StartRollout,
    SwitchCommand,
    TelemetryWindow,
)
from shared.tflite import read_signature


def test_command_fields_are_camel_case_on_the_wire() -> None:
    """commandId, rolloutId, issuedAt and expiresAt are camelCase; no snake_case leaks."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    cmd = SwitchCommand(
        command_id="c-1",
        rollout_id="r-1",
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        to=ModelRef(name="clf", version="2", sha256="ab" * 32),
    )
    wire = json.loads(cmd.to_wire())
    assert {"v", "kind", "commandId", "rolloutId", "issuedAt", "expiresAt", "to"} <= wire.keys()
    assert wire["kind"] == "switch" and wire["v"] == 1
    assert not any("_" in k for k in wire)


def test_deploy_round_trips_through_the_command_adapter(model_v1: bytes) -> None:
    """A deploy with a signed manifest parses back as DeployCommand with identical signed bytes."""
    m = build_manifest(name="clf", version="1", data=model_v1, signature=read_signature(model_v1))
    signed = sign_manifest(m, Ed25519PrivateKey.generate())
    cmd = DeployCommand(command_id="c-9", manifest=signed, url="http://s3/x", activate=False)
    back = COMMAND.validate_json(cmd.to_wire())
    assert isinstance(back, DeployCommand)
    assert back.manifest.signed == signed.signed and back.activate is False
    assert back == cmd


def test_other_schema_versions_are_refused() -> None:
    """A message with v=2 does not validate: `v` is pinned to 1."""
    with pytest.raises(ValidationError):
        COMMAND.validate_json(b'{"v":2,"kind":"cancel","commandId":"c"}')


def test_missing_kind_is_refused_by_both_adapters() -> None:
    """Without a `kind` discriminator neither adapter guesses a model."""
    with pytest.raises(ValidationError):
        COMMAND.validate_json(b'{"commandId":"c"}')
    with pytest.raises(ValidationError):
        REQUEST.validate_json(b'{"rolloutId":"r"}')


def test_request_adapter_ignores_unknown_keys() -> None:
    """A newer operator's extra fields do not stop an older controller from parsing."""
    req = REQUEST.validate_json(b'{"kind":"get_rollout","rolloutId":"r-1","newThing":[1]}')
    assert req == GetRollout(rollout_id="r-1")


def test_snake_case_keys_are_accepted_too() -> None:
    """populate_by_name: Python-style keys validate as well as camelCase ones."""
    req = REQUEST.validate_python({"kind": "get_rollout", "rollout_id": "r-2"})
    assert isinstance(req, GetRollout) and req.rollout_id == "r-2"


def test_messages_are_frozen() -> None:
    """Parsed messages cannot be mutated after the fact."""
    state = DeviceState(device_id="d", region="eu", device_type="cam", online=True)
    with pytest.raises(ValidationError):
        state.online = False  # type: ignore[misc]


def test_empty_command_id_is_refused() -> None:
    """commandId must be non-empty."""
    with pytest.raises(ValidationError):
        COMMAND.validate_json(b'{"kind":"cancel","commandId":""}')


def test_expired_is_inclusive_at_the_deadline() -> None:
    """At exactly expires_at the command counts as expired."""
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert SwitchCommand(
        command_id="c", expires_at=t, to=ModelRef(name="m", version="1", sha256="0" * 64)
    ).expired(t)


@pytest.mark.parametrize("field", ["device_id", "region", "device_type"])
@pytest.mark.parametrize("bad", ["a/b", "+", "#", ""])
def test_device_state_refuses_unsafe_ids_in_every_id_field(field: str, bad: str) -> None:
    """device_id, region and device_type all have to be topic-safe."""
    fields = {"device_id": "d", "region": "eu", "device_type": "cam", field: bad}
    with pytest.raises(ValidationError):
        DeviceState(online=True, **fields)


def test_histogram_mean_of_empty_is_none_and_merge_keeps_operands() -> None:
    """An empty histogram has no mean; merging returns a new histogram."""
    empty = Histogram.empty(LATENCY_BUCKETS_MS)
    assert empty.n == 0 and empty.mean() is None
    one = Histogram(counts=(1,) + (0,) * 14, total=0.04)
    merged = empty.merged(one)
    assert merged.n == 1 and empty.n == 0 and merged.mean() == pytest.approx(0.04)


def test_quantile_in_the_overflow_bucket_reports_the_last_finite_bound() -> None:
    """Samples above the last finite bound give that bound, never infinity."""
    h = Histogram(counts=(0,) * 14 + (5,), total=10_000.0)
    assert h.quantile(0.5, LATENCY_BUCKETS_MS) == 1000.0


def test_quantile_extremes_pick_lowest_and_highest_populated_buckets() -> None:
    """q=0 gives the first populated bucket and q=1 the last populated one."""
    counts = [0] * 15
    counts[2], counts[9] = 3, 1
    h = Histogram(counts=tuple(counts))
    assert h.quantile(0.0, LATENCY_BUCKETS_MS) == LATENCY_BUCKETS_MS[2]
    assert h.quantile(1.0, LATENCY_BUCKETS_MS) == LATENCY_BUCKETS_MS[9]


def test_selector_min_memory_excludes_devices_with_unknown_memory() -> None:
    """A device that reports no memory does not meet a memory floor."""
    s = Selector(min_memory_mb=1)
    assert not s.matches(device_id="d", device_type="cam", memory_mb=None)
    assert s.matches(device_id="d", device_type="cam", memory_mb=1)


def test_selector_survives_the_wire() -> None:
    """A selector serialises camelCase and parses back to an equal selector."""
    s = Selector(device_types=("cam",), min_memory_mb=256, cohort=("d1",))
    wire = json.loads(s.to_wire())
    assert wire["deviceTypes"] == ["cam"] and wire["minMemoryMb"] == 256
    assert Selector.model_validate_json(s.to_wire()) == s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strategy": "progressive"},
        {"strategy": "progressive", "stages": [{"percent": 50, "durationS": 0}]},
        {"strategy": "ab"},
        {"strategy": "ab", "version_b": "1"},
        {"strategy": "regional"},
        {"strategy": "regional", "regions": ["eu/west"]},
    ],
)
def test_start_rollout_refuses_incomplete_strategies(kwargs: dict[str, object]) -> None:
    """Progressive needs stages ending at 100, A/B a different B, regional safe regions."""
    with pytest.raises(ValidationError):
        StartRollout(model="m", version="1", **kwargs)


def _window(**changes: object) -> bytes:
    """A valid telemetry window as the agent sends it, with some fields replaced (raw JSON)."""
    body: dict[str, object] = {
        "v": 1,
        "kind": "telemetry",
        "deviceId": "cam-1",
        "model": {"name": "m", "version": "1", "sha256": "a" * 64},
        "windowStart": "2026-01-01T00:00:00Z",
        "windowEnd": "2026-01-01T00:00:05Z",
        "count": 10,
        "errors": 0,
        "latencyMs": {"counts": [0] * 4 + [10] + [0] * 10, "total": 8.0},
        "confidence": {"counts": [0] * 9 + [10], "total": 9.5},
    }
    text = json.dumps(body | changes)
    return text.replace('"__inf__"', "Infinity").replace('"__nan__"', "NaN").encode()


def test_a_valid_telemetry_window_is_accepted() -> None:
    """The reference window the hostile variants below start from is itself valid."""
    assert TelemetryWindow.model_validate_json(_window()).count == 10


@pytest.mark.parametrize(
    "changes",
    [
        {"latencyMs": {"counts": [5, 5, 5], "total": 1.0}},  # wrong bucket layout
        {"confidence": {"counts": [1] * 3, "total": 1.0}},
        {"latencyMs": {"counts": [0] * 4 + [10] + [0] * 10, "total": "__inf__"}},
        {"latencyMs": {"counts": [0] * 4 + [10] + [0] * 10, "total": "__nan__"}},
        {"latencyMs": {"counts": [0] * 4 + [10] + [0] * 10, "total": -1.0}},
        {"latencyMs": {"counts": [0] * 4 + [-10] + [0] * 10, "total": 1.0}},
        {"count": 10**30},
        {"latencyMs": {"counts": [0] * 4 + [10**30] + [0] * 10, "total": 1.0}},
        {"errors": 11},
        {"agreements": 11},
        {"inputMean": "__nan__"},
        {"inputs": {"counts": [1, 2], "total": 0.0}},
        {"windowEnd": "2025-12-31T00:00:00Z"},
        {"inputHistograms": [{"counts": [1, -1], "total": 0.0}]},  # negative count
        {"inputHistograms": [{"counts": [10**30], "total": 0.0}]},  # beyond any window
        {"inputHistograms": [{"counts": [1] * 65, "total": 0.0}]},  # more buckets than any dtype
        {"inputHistograms": [{"counts": [1], "total": "__nan__"}]},
        {"inputHistograms": [{"counts": [1], "total": "__inf__"}]},
        {"inputHistograms": [{"counts": [1], "total": 0.0}] * 65},  # more tensors than allowed
        {"inputHistograms": [{"counts": [1.5], "total": 0.0}]},
        {"task": "x" * 513},
        {"agreementRule": "x" * 257},
    ],
)
def test_hostile_telemetry_windows_are_refused_at_the_edge(changes: dict[str, object]) -> None:
    """Wrong bucket counts, negative or huge counts, non-finite totals: refused on arrival."""
    with pytest.raises(ValidationError):
        TelemetryWindow.model_validate_json(_window(**changes))


def test_windows_of_older_agents_parse_without_the_per_task_fields() -> None:
    """No task, per-input histograms or agreement rule: still a window that counts."""
    w = TelemetryWindow.model_validate_json(_window())
    assert (w.task, w.input_histograms, w.agreement_rule) == (None, None, None)


def test_per_input_histograms_task_and_rule_round_trip() -> None:
    """One histogram per input (any layout up to the limit; empty for a tensor with no
    buckets), the task and the agreement rule, all camelCase on the wire."""
    hists = [{"counts": [3, 0, 5], "total": -2.5}, {"counts": [], "total": 0.0}]
    raw = _window(
        inputHistograms=hists, task="none", agreementRule="same top class of 'out'",
        confidence={"counts": [0] * 10, "total": 0.0}, shadow=True, agreements=3,
    )  # fmt: skip
    w = TelemetryWindow.model_validate_json(raw)
    assert w.input_histograms == (Histogram(counts=(3, 0, 5), total=-2.5), Histogram(counts=()))
    assert w.task == "none" and w.confidence.n == 0  # task none: an empty confidence histogram
    wire = json.loads(w.to_wire())
    assert {"inputHistograms", "task", "agreementRule"} <= wire.keys()
    assert TelemetryWindow.model_validate_json(w.to_wire()) == w


def test_a_not_applicable_verdict_is_on_the_wire() -> None:
    """Rollout statuses carry not_applicable verdicts, the task and per-tensor PSI."""
    from shared.messages import CohortSummary, GateVerdict, RolloutStatus

    status = RolloutStatus(
        rollout_id="r", model="m", version="2", strategy="canary", status="InProgress",
        devices_targeted=1, devices_updated=1, task="none (declared)",
        gates=(GateVerdict(gate="max_confidence_drop", verdict="not_applicable", threshold=0.1),),
        candidate=CohortSummary(devices=1, inferences=5, input_psi_by_tensor={"image": 0.2}),
    )  # fmt: skip
    back = RolloutStatus.model_validate_json(status.to_wire())
    assert back == status and back.gates[0].verdict == "not_applicable"
    assert json.loads(status.to_wire())["candidate"]["inputPsiByTensor"] == {"image": 0.2}
