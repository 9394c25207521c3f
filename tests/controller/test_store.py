"""The store on SQLite and on PostgreSQL: registry, targets, events, telemetry."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy

from controller.store import Store
from shared.errors import RequestError
from shared.keys import init_keys, load_private_key
from shared.manifest import build_manifest, sign_manifest
from shared.messages import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    DeviceEvent,
    DeviceState,
    Histogram,
    ModelRef,
    StartRollout,
    TelemetryWindow,
)
from shared.tflite import read_signature

PG_URL = os.environ.get(
    "HOTSWAP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_store() -> Iterator[Store]:
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"hotswap_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        if os.environ.get("CI"):
            raise  # CI machines run PostgreSQL: its absence there is a failure
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc.orig}")
    url = PG_URL.rsplit("/", 1)[0] + f"/{name}"
    store = Store(url)
    try:
        yield store
    finally:
        store.engine.dispose()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    if request.param == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'c.db'}")
    else:
        yield from _postgres_store()


def _signed(tmp_path, model: bytes, version: str = "1.0"):
    priv, _ = init_keys(tmp_path / f"k{uuid.uuid4().hex[:6]}")
    m = build_manifest(name="m", version=version, data=model, signature=read_signature(model))
    return sign_manifest(m, load_private_key(priv))


def _state(device_id: str, region: str = "eu", online: bool = True) -> DeviceState:
    return DeviceState(device_id=device_id, region=region, device_type="cam", online=online)


def test_register_is_idempotent_and_refuses_changed_bytes(
    store: Store, tmp_path, model_v1: bytes, model_v2: bytes
) -> None:
    """The same model twice is fine; the same name@version with other bytes is refused."""
    signed = _signed(tmp_path, model_v1)
    a = store.register_model(signed, "k1", 1.0)
    b = store.register_model(signed, "k1", 2.0)
    assert a.id == b.id
    with pytest.raises(RequestError, match="already registered with another sha256"):
        store.register_model(_signed(tmp_path, model_v2), "k2", 3.0)
    with pytest.raises(RequestError, match=r"unknown model m@9 \(known versions: 1.0\)"):
        store.get_model("m", "9")


def test_targets_by_ids_region_and_type(store: Store, tmp_path, model_v1: bytes) -> None:
    """Targets resolve from explicit ids or selectors; unknown ids are named."""
    for d, r in (("a", "eu"), ("b", "eu"), ("c", "us")):
        store.upsert_device(_state(d, r), 1.0)
    model = store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    assert store.resolve_targets(StartRollout(model="m", version="1.0", region="eu"), model) == [
        "a",
        "b",
    ]
    assert store.resolve_targets(
        StartRollout(model="m", version="1.0", devices=("c", "a")), model
    ) == ["a", "c"]
    with pytest.raises(RequestError, match="not registered: zz"):
        store.resolve_targets(StartRollout(model="m", version="1.0", devices=("a", "zz")), model)
    with pytest.raises(RequestError, match="no registered device matches region 'mars'"):
        store.resolve_targets(StartRollout(model="m", version="1.0", region="mars"), model)


def test_events_move_forward_only_and_ignore_stale_commands(
    store: Store, tmp_path, model_v1: bytes
) -> None:
    """Only the current command's events apply, forward only; final rows stay closed."""
    store.upsert_device(_state("a"), 1.0)
    model = store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    r = store.create_rollout(
        StartRollout(model="m", version="1.0", devices=("a",)), model, ["a"], 1.0
    )
    store.mark_sent(r.rollout_id, "a", "c-1", 2.0)

    def ev(phase: str, command: str = "c-1") -> DeviceEvent:
        return DeviceEvent(device_id="a", command_id=command, rollout_id=r.rollout_id, phase=phase)

    assert store.apply_event(ev("downloading"), 3.0) is not None
    assert store.apply_event(ev("received"), 3.1) is None  # out of order
    assert store.apply_event(ev("activated", "c-old"), 3.2) is None  # stale command
    assert store.mark_timed_out(r.rollout_id, "a", 4.0)
    assert store.apply_event(ev("activated"), 5.0) is None  # late success after timeout
    [row] = store.assignments(r.rollout_id)
    assert (row.state, row.reason) == ("timed_out", "timeout")


def test_last_will_keeps_the_known_model(store: Store) -> None:
    """A last will (online=false, no model) does not erase what the device serves."""
    ref = ModelRef(name="m", version="1", sha256="a" * 64)
    store.upsert_device(
        DeviceState(device_id="a", region="eu", device_type="cam", online=True, active=ref), 1.0
    )
    store.upsert_device(_state("a", online=False), 2.0)
    [row] = store.list_devices()
    assert (row.online, row.active_version) == (False, "1")


def test_average_latency_over_telemetry_windows(store: Store) -> None:
    """Average latency weights each window by its inference count."""
    ref = ModelRef(name="m", version="1", sha256="a" * 64)
    t = datetime.now(UTC)
    for device, count, total in (("a", 10, 20.0), ("b", 30, 30.0), ("c", 100, 1e6)):
        store.record_telemetry(
            TelemetryWindow(
                device_id=device,
                model=ref,
                window_start=t,
                window_end=t,
                count=count,
                errors=0,
                latency_ms=Histogram(counts=(0,) * len(LATENCY_BUCKETS_MS), total=total),
                confidence=Histogram.empty(CONFIDENCE_BUCKETS),
            )
        )
    assert store.avg_latency_ms("m", "1", ["a", "b"], t.timestamp() - 1) == pytest.approx(1.25)
    assert store.avg_latency_ms("m", "2", ["a"], 0) is None


def test_cohort_stats_merge_served_and_shadow_windows_apart(store: Store) -> None:
    """Telemetry windows merge per cohort with every histogram; shadow windows stay separate."""
    from shared.messages import (
        CONFIDENCE_BUCKETS,
        INPUT_BUCKETS,
        LATENCY_BUCKETS_MS,
        Histogram,
        ModelRef,
        TelemetryWindow,
    )

    now = datetime.now(UTC)
    ref = ModelRef(name="clf", version="2", sha256="c" * 64)

    def window(device: str, shadow: bool, agreements: int | None) -> TelemetryWindow:
        lat = [0] * len(LATENCY_BUCKETS_MS)
        lat[4] = 10
        conf = [0] * len(CONFIDENCE_BUCKETS)
        conf[8] = 10
        return TelemetryWindow(
            device_id=device, model=ref, window_start=now, window_end=now, count=10, errors=0,
            latency_ms=Histogram(counts=tuple(lat), total=10.0),
            confidence=Histogram(counts=tuple(conf), total=8.5),
            inputs=Histogram(counts=(0, 0, 0, 0, 20, 20, 0, 0, 0, 0)),
            shadow=shadow, agreements=agreements,
        )  # fmt: skip

    store.record_telemetry(window("d1", False, None))
    store.record_telemetry(window("d2", False, None))
    store.record_telemetry(window("d1", True, 7))
    since = now.timestamp() - 1
    served = store.cohort_stats("clf", ["d1", "d2"], since, version="2")
    assert (served.devices, served.count, served.agreements) == (2, 20, 0)
    assert served.inputs.n == 80 and len(served.inputs.counts) == len(INPUT_BUCKETS)
    assert served.confidence.mean() == 0.85
    mirrored = store.cohort_stats("clf", ["d1", "d2"], since, version="2", shadow=True)
    assert (mirrored.devices, mirrored.count, mirrored.agreements) == (1, 10, 7)
    assert mirrored.agreement == 0.7
    assert store.avg_latency_ms("clf", "2", ["d1", "d2"], since) == 1.0
