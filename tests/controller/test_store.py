"""The store on SQLite and on PostgreSQL: registry, targets, events, telemetry."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy

from controller.live import Rollup
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
    ).rollout
    store.mark_sent(r.rollout_id, "a", "c-1", 2.0)

    def ev(phase: str, command: str = "c-1") -> DeviceEvent:
        return DeviceEvent(device_id="a", command_id=command, rollout_id=r.rollout_id, phase=phase)

    assert store.apply_event(ev("downloading"), 3.0) is not None
    assert store.apply_event(ev("received"), 3.1) is None  # out of order
    assert store.apply_event(ev("activated", "c-old"), 3.2) is None  # stale command
    assert store.mark_timed_out(r.rollout_id, "a", 4.0)
    assert store.apply_event(ev("received"), 4.5) is None  # late progress changes nothing
    [row] = store.assignments(r.rollout_id)
    assert (row.state, row.reason) == ("timed_out", "timeout")
    # A late final answer to the same command: the record shows what the device runs.
    assert store.apply_event(ev("activated"), 5.0) is not None
    [row] = store.assignments(r.rollout_id)
    assert (row.state, row.reason, row.detail) == ("activated", None, "answered after its timeout")


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
    tele = Telemetry(store)
    ref = ModelRef(name="m", version="1", sha256="a" * 64)
    t = datetime.now(UTC)
    for device, count, total in (("a", 10, 20.0), ("b", 30, 30.0), ("c", 100, 1e6)):
        tele.record(
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
    assert tele.avg_latency_ms("m", "1", ["a", "b"], t.timestamp() - 1) == pytest.approx(1.25)
    assert tele.avg_latency_ms("m", "2", ["a"], 0) is None


def test_cohort_stats_merge_served_and_shadow_windows_apart(store: Store) -> None:
    """Telemetry windows merge per cohort with every histogram; shadow windows stay separate."""
    tele = Telemetry(store)
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

    tele.record(window("d1", False, None))
    tele.record(window("d2", False, None))
    tele.record(window("d1", True, 7))
    since = now.timestamp() - 1
    served = tele.cohort_stats("clf", ["d1", "d2"], since, version="2")
    assert (served.devices, served.count, served.agreements) == (2, 20, 0)
    assert served.inputs.n == 80 and len(served.inputs.counts) == len(INPUT_BUCKETS)
    assert served.confidence.mean() == 0.85
    mirrored = tele.cohort_stats("clf", ["d1", "d2"], since, version="2", shadow=True)
    assert (mirrored.devices, mirrored.count, mirrored.agreements) == (1, 10, 7)
    assert mirrored.agreement == 0.7
    assert tele.avg_latency_ms("clf", "2", ["d1", "d2"], since) == 1.0


class Telemetry:
    """Windows merged the way the controller merges them (Store.window_stats, then
    controller.live.Rollup), filtered as a cohort: model, devices, since, version(s)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.windows: list[TelemetryWindow] = []

    def record(self, window: TelemetryWindow) -> None:
        self.windows.append(window)

    def _chosen(
        self, model: str, devices, since: float, version=None, not_version=None, shadow=False
    ) -> list[TelemetryWindow]:
        return [
            w
            for w in self.windows
            if w.model.name == model
            and w.device_id in devices
            and w.window_end.timestamp() >= since
            and w.shadow == shadow
            and (version is None or w.model.version == version)
            and (not_version is None or w.model.version != not_version)
        ]

    def cohort_stats(self, model: str, devices, since: float, **kw):
        total = Rollup()
        chosen = self._chosen(model, devices, since, **kw)
        for w in chosen:
            total.add(Rollup.of(self.store.window_stats(w)))
        return total.stats(len({w.device_id for w in chosen}))

    def avg_latency_ms(self, model: str, version: str, devices, since: float) -> float | None:
        chosen = self._chosen(model, devices, since, version=version)
        count = sum(w.count for w in chosen)
        return sum(w.latency_ms.total for w in chosen) / count if count else None


def _start(store: Store, model, devices: tuple[str, ...], *, supersede: bool = False):
    req = StartRollout(model="m", version="1.0", devices=devices, supersede=supersede)
    return store.create_rollout(req, model, list(devices), 1.0)


def test_a_device_belongs_to_one_active_rollout(store: Store, tmp_path, model_v1: bytes) -> None:
    """An overlapping start is refused naming the active rollout and the overlap; none is
    half-written; once the first rollout ends its devices are free again."""
    for d in ("a", "b", "c"):
        store.upsert_device(_state(d), 1.0)
    model = store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    first = _start(store, model, ("a", "b")).rollout
    with pytest.raises(RequestError, match=rf"2 device\(s\) in active rollout {first.rollout_id}"):
        _start(store, model, ("a", "b", "c"))
    assert [r.rollout_id for r in store.list_rollouts()] == [first.rollout_id]  # nothing partial
    store.set_rollout_status(first.rollout_id, "Succeeded", None, 2.0, final=True)
    assert _start(store, model, ("a", "b", "c")).rollout.rollout_id != first.rollout_id


def test_supersede_closes_the_older_rollouts_overlap(
    store: Store, tmp_path, model_v1: bytes
) -> None:
    """--supersede: the older rollout's shared devices close `cancelled`/`superseded`; it ends
    Aborted when no device is left to it."""
    for d in ("a", "b", "c"):
        store.upsert_device(_state(d), 1.0)
    model = store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    partly = _start(store, model, ("a", "b")).rollout
    wholly = _start(store, model, ("c",)).rollout
    created = _start(store, model, ("b", "c"), supersede=True)
    by_id = {x.rollout_id: x for x in created.superseded}
    assert by_id[partly.rollout_id].devices == ("b",) and not by_id[partly.rollout_id].ended
    assert by_id[wholly.rollout_id].ended
    states = {a.device_id: (a.state, a.reason) for a in store.assignments(partly.rollout_id)}
    assert states == {"a": ("pending", None), "b": ("cancelled", "superseded")}
    ended = store.get_rollout(wholly.rollout_id)
    assert (
        ended.status == "Aborted" and ended.reason == f"superseded by {created.rollout.rollout_id}"
    )


def test_starts_racing_from_two_controllers_never_both_win(
    store: Store, tmp_path, model_v1: bytes
) -> None:
    """Two stores on one database start rollouts for the same device at the same instant,
    round after round: exactly one wins each time, the other gets the clear refusal."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model = store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    other = Store(store.engine.url.render_as_string(hide_password=False))
    for round_ in range(8):
        device = f"d{round_}"
        store.upsert_device(_state(device), 1.0)
        barrier = threading.Barrier(2)

        def start(on: Store, device: str = device, barrier: threading.Barrier = barrier) -> str:
            barrier.wait(5)
            try:
                return _start(on, model, (device,)).rollout.rollout_id
            except RequestError as exc:
                assert exc.reason == "rollout_conflict", exc
                return "refused"

        with ThreadPoolExecutor(2) as pool:
            results = sorted(pool.map(start, (store, other)))
        assert results[1] == "refused" and results[0].startswith("r-"), results
    other.engine.dispose()


def test_revocation_closes_open_assignments_and_excludes_the_device(
    store: Store, tmp_path, model_v1: bytes
) -> None:
    """A revocation record: offline, revoked, open assignments `cancelled`/`revoked`, claim
    released, never a target again (by id: refused; by selector: left out)."""
    from shared.messages import DeviceRecord

    for d in ("a", "b"):
        store.upsert_device(_state(d), 1.0)
    model = store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    r = _start(store, model, ("a", "b")).rollout
    assert store.devices_online() == 2
    assert store.apply_record(DeviceRecord(device_id="a", revoked=True), 2.0) == [r.rollout_id]
    assert store.devices_online() == 1
    row = {d.device_id: d for d in store.list_devices()}["a"]
    assert (row.online, row.revoked) == (False, True)
    states = {a.device_id: (a.state, a.reason) for a in store.assignments(r.rollout_id)}
    assert states["a"] == ("cancelled", "revoked")
    store.upsert_device(_state("a"), 3.0)  # a retained online state arriving late
    assert store.devices_online() == 1
    with pytest.raises(RequestError, match="revoked: a"):
        store.resolve_targets(StartRollout(model="m", version="1.0", devices=("a",)), model)
    assert store.resolve_targets(StartRollout(model="m", version="1.0", region="eu"), model) == [
        "b"
    ]


def test_the_provisioned_identity_outranks_the_devices_claim(store: Store) -> None:
    """After a provisioning record, a state claiming another region keeps the provisioned one
    (and is reported); what the device may say of itself still updates."""
    from shared.messages import Capabilities, DeviceRecord

    store.apply_record(DeviceRecord(device_id="a", region="r2", device_type="cam"), 1.0)
    claim = DeviceState(
        device_id="a",
        region="r1",
        device_type="cam",
        online=True,
        capabilities=Capabilities(memory_mb=512),
        agent_version="9.9",
    )
    refused = store.upsert_device(claim, 2.0)
    assert refused is not None and "'r1'" in refused and "'r2'" in refused
    [row] = store.list_devices()
    assert (row.region, row.memory_mb, row.agent_version, row.online) == ("r2", 512, "9.9", True)
    assert store.upsert_device(_state("a", region="r2"), 3.0) is None


# ------------------------------------------------------------ telemetry by task and tensor


def _register(store: Store, version: str, signature, task=None) -> None:
    """Register `m@version` with this tensor signature (and declared task, if any)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    m = build_manifest(
        name="m", version=version, data=version.encode(), signature=signature, task=task
    )
    store.register_model(sign_manifest(m, Ed25519PrivateKey.generate()), f"k{version}", 1.0)


def _two_inputs(first_dtype: str = "uint8"):
    from shared.manifest import TensorSignature, TensorSpec

    return TensorSignature(
        inputs=(
            TensorSpec(name="image", shape=(1, 8, 8, 3), dtype=first_dtype),
            TensorSpec(name="features", shape=(1, 4), dtype="float32"),
        ),
        outputs=(TensorSpec(name="out", shape=(1, 3), dtype="float32"),),
    )


def _tw(device: str, version: str, **fields) -> TelemetryWindow:
    now = datetime.now(UTC)
    lat = [0] * len(LATENCY_BUCKETS_MS)
    lat[4] = 10
    conf = [0] * len(CONFIDENCE_BUCKETS)
    conf[8] = 10
    body = {
        "device_id": device, "model": ModelRef(name="m", version=version, sha256="c" * 64),
        "window_start": now, "window_end": now, "count": 10, "errors": 0,
        "latency_ms": Histogram(counts=tuple(lat), total=10.0),
        "confidence": Histogram(counts=tuple(conf), total=8.5),
    }  # fmt: skip
    return TelemetryWindow(**(body | fields))


U8_HIST = Histogram(counts=(1, 2, 3, 4, 5, 6, 7, 8))
F_HIST = Histogram(counts=(0, 0, 0, 0, 2, 2, 0, 0, 0, 0), total=1.0)


def test_cohort_stats_merge_per_input_histograms_that_fit_the_registered_signature(
    store: Store,
) -> None:
    """Per tensor, by the registered signature: fitting histograms add up; a tensor whose
    bucket count does not fit its dtype is left out, a window with another number of
    tensors contributes none (its other numbers still count)."""
    tele = Telemetry(store)
    _register(store, "1", _two_inputs())
    tele.record(_tw("a", "1", input_histograms=(U8_HIST, F_HIST)))
    tele.record(_tw("b", "1", input_histograms=(U8_HIST, F_HIST)))
    tele.record(_tw("c", "1", input_histograms=(F_HIST, F_HIST)))  # image: 10 buckets
    tele.record(_tw("d", "1", input_histograms=(U8_HIST,)))  # one tensor of two
    stats = tele.cohort_stats("m", ["a", "b", "c", "d"], 0, version="1")
    assert (stats.devices, stats.count) == (4, 40)
    by_name = {t.name: t for t in stats.input_tensors}
    assert by_name["image"].histogram.counts == tuple(2 * c for c in U8_HIST.counts)
    assert by_name["image"].layout == "uint8, no quantization"
    assert by_name["features"].histogram.n == 12 and by_name["features"].histogram.total == 3.0


def test_older_agents_first_input_histogram_stands_for_a_float_first_tensor(
    store: Store,
) -> None:
    """An agent without per-input histograms: its INPUT_BUCKETS histogram is the first
    tensor's when that is float (same buckets); for a uint8 image it is not comparable."""
    tele = Telemetry(store)
    legacy = Histogram(counts=(0, 0, 0, 0, 20, 20, 0, 0, 0, 0))
    _register(store, "f", _two_inputs("float32"))
    _register(store, "u", _two_inputs("uint8"))
    tele.record(_tw("a", "f", inputs=legacy))
    tele.record(_tw("a", "u", inputs=legacy))
    (image,) = tele.cohort_stats("m", ["a"], 0, version="f").input_tensors
    assert (image.name, image.histogram) == ("image", legacy)
    uint8 = tele.cohort_stats("m", ["a"], 0, version="u")
    assert uint8.input_tensors == () and uint8.inputs == legacy  # the fallback stays


def test_cohort_confidence_counts_only_windows_computed_by_the_registered_task(
    store: Store,
) -> None:
    """The version's task comes from its manifest (declared or inferred); a window that
    names another task, or an older agent's window for a model that is not a classifier
    on its first output, adds no confidence (its inferences still count)."""
    tele = Telemetry(store)
    from shared.manifest import ModelTask

    _register(store, "1", _two_inputs())  # inferred: classifier on 'out'
    _register(store, "2", _two_inputs(), ModelTask(kind="none"))
    tele.record(_tw("a", "1", task="classifier on 'out'"))
    tele.record(_tw("b", "1"))  # an older agent: the same confidence
    tele.record(_tw("c", "1", task="detector on 'out' (threshold 0.5)"))
    tele.record(_tw("a", "2"))  # an older agent's softmax of a task-none model
    one = tele.cohort_stats("m", ["a", "b", "c"], 0, version="1")
    assert one.count == 30 and one.confidence.n == 20
    assert one.tasks == frozenset({ModelTask(kind="classifier", output="out")})
    two = tele.cohort_stats("m", ["a"], 0, version="2")
    assert two.confidence.n == 0 and two.tasks == frozenset({ModelTask(kind="none")})
    assert store.model_task("m", "1") == "classifier on 'out' (inferred from the signature)"
    assert store.model_task("m", "2") == "none (declared)"
    assert store.model_task("m", "9") is None
    unregistered = tele.cohort_stats("m", ["a"], 0, version="9")
    assert unregistered.tasks == frozenset() and unregistered.count == 0


def test_shadow_cohorts_carry_the_agreement_rule_the_agents_used(store: Store) -> None:
    """A window naming no rule was counted by the older agents' top-class rule."""
    tele = Telemetry(store)
    from shared.tasks import LEGACY_AGREEMENT_RULE

    _register(store, "1", _two_inputs())
    rule = "same top class of 'out'"
    tele.record(_tw("a", "1", shadow=True, agreements=9, agreement_rule=rule))
    tele.record(_tw("b", "1", shadow=True, agreements=4))
    stats = tele.cohort_stats("m", ["a", "b"], 0, version="1", shadow=True)
    assert stats.agreements == 13 and stats.agreement_rules == {rule, LEGACY_AGREEMENT_RULE}
    assert tele.cohort_stats("m", ["a", "b"], 0, version="1").agreement_rules == frozenset()


def test_a_database_of_an_older_controller_opens_and_its_raw_windows_are_pruned(tmp_path) -> None:
    """An older controller's raw telemetry rows are not read (the gates read rollups); the
    table stays readable and its rows go with the retention."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sqlalchemy.create_engine(url)
    with old.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                "CREATE TABLE telemetry_windows (id INTEGER PRIMARY KEY, device_id VARCHAR,"
                " model VARCHAR, version VARCHAR, window_start FLOAT, window_end FLOAT,"
                " count INTEGER, errors INTEGER, latency_total_ms FLOAT, latency_counts VARCHAR,"
                " confidence_counts VARCHAR, confidence_total FLOAT, input_counts VARCHAR,"
                " shadow BOOLEAN, agreements INTEGER, input_mean FLOAT, input_std FLOAT)"
            )
        )
        conn.execute(
            sqlalchemy.text(
                "INSERT INTO telemetry_windows VALUES (1, 'a', 'm', '1', 0, 5, 10, 0, 10.0,"
                " :lat, :conf, 8.5, '', 0, 0, NULL, NULL)"
            ),
            {"lat": str([0] * 4 + [10] + [0] * 10), "conf": str([0] * 8 + [10, 0])},
        )
    old.dispose()
    store = Store(url)
    store.prune_telemetry(finished_before=10.0)
    with store.engine.connect() as conn:
        left = conn.execute(sqlalchemy.text("SELECT count(*) FROM telemetry_windows")).scalar()
    assert left == 0


def test_the_plain_assignment_has_every_column_of_the_row() -> None:
    """Events are applied on plain copies (Store.apply_events): none of a row's columns may
    be missing from them, or an update would drop it."""
    from dataclasses import fields

    from controller.db import AssignmentRow
    from controller.store import Assignment

    columns = set(AssignmentRow.__table__.columns.keys())  # type: ignore[attr-defined]
    assert {f.name for f in fields(Assignment)} == columns


def test_a_device_page_holds_what_the_rows_hold_in_id_order(store: Store) -> None:
    """`device list`'s page read as plain column dicts: the same fields and values as
    the rows, ordered by id, offset and limit applied."""
    ref = ModelRef(name="m", version="1", sha256="a" * 64)
    for i in (3, 1, 4, 0, 2):
        state = DeviceState(
            device_id=f"d{i}", region="eu", device_type="cam", online=i % 2 == 0, active=ref
        )
        store.upsert_device(state, float(i))
    rows = {r.device_id: r.model_dump() for r in store.list_devices()}
    page = store.device_page(1, 3)
    assert [d["device_id"] for d in page] == ["d1", "d2", "d3"]
    assert page == [rows[d["device_id"]] for d in page]
    assert [d["device_id"] for d in store.device_page(0, None)] == [f"d{i}" for i in range(5)]
    assert store.device_page(5, 10) == []


def test_a_version_not_registered_costs_one_query_not_one_a_window(
    store: Store, tmp_path, model_v1: bytes
) -> None:
    """Telemetry naming a version this controller never registered (a device may name
    any) used to query the database for every window; it is remembered for a while,
    and forgotten as soon as the version is registered."""
    queries: list[str] = []
    sqlalchemy.event.listen(
        store.engine, "before_cursor_execute", lambda *a: queries.append(str(a[2]))
    )
    for _ in range(50):
        assert store.registered_task("m", "1.0") is None
    assert len([q for q in queries if "model_versions" in q]) == 1, queries
    store.register_model(_signed(tmp_path, model_v1), "k", 1.0)
    assert store.registered_task("m", "1.0") is not None
