"""The double-buffered runtime: swaps under concurrent load never fail or mix models."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_agent.runtime import DoubleBufferedRuntime, ModelSlot, NoModelError
from shared.messages import ModelRef
from shared.model_builder import build_dense_model

X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def slot(data: bytes, version: str) -> ModelSlot:
    return ModelSlot.load(ModelRef(name="m", version=version, sha256="0" * 64), data)


def test_infer_before_any_model_raises_no_model_error() -> None:
    """A runtime without a model says so instead of crashing."""
    with pytest.raises(NoModelError):
        DoubleBufferedRuntime().infer(X)


def test_wrong_input_shape_is_a_clear_value_error(model_v1: bytes) -> None:
    """Inputs of the wrong shape or type are refused before touching the interpreter."""
    rt = DoubleBufferedRuntime()
    rt.activate(slot(model_v1, "1"))
    with pytest.raises(ValueError, match=r"float32\[1, 4\]"):
        rt.infer(np.zeros((1, 5), dtype=np.float32))


def test_activate_keeps_previous_resident_and_swap_back_restores_it(
    model_v1: bytes, model_v2: bytes
) -> None:
    """The old model stays loaded as standby; rollback is a reference swap."""
    a, b = slot(model_v1, "1"), slot(model_v2, "2")
    rt = DoubleBufferedRuntime()
    assert rt.activate(a) is None
    out_a = rt.infer(X)
    assert rt.activate(b) is a
    assert (rt.active, rt.standby) == (b, a)
    out_b = rt.infer(X)
    assert not np.allclose(out_a, out_b)
    assert rt.swap_back() is a
    np.testing.assert_allclose(rt.infer(X), out_a)
    assert rt.standby is b


def test_swaps_under_concurrent_load_drop_nothing_and_never_mix(
    model_v1: bytes, model_v2: bytes
) -> None:
    """Four threads infer while the main thread swaps 200 times: no error, every output is A's or B's."""
    a, b = slot(model_v1, "1"), slot(model_v2, "2")
    expected = {"1": a.run(X), "2": b.run(X)}
    seen: list[tuple[str, np.ndarray]] = []
    rt = DoubleBufferedRuntime(
        observer=lambda ref, _ms, outs, _x: seen.append((ref.version, outs[0] if outs else None))
    )
    rt.activate(a)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = [0] * 4

    def load(i: int) -> None:
        while not stop.is_set():
            try:
                out = rt.infer(X)
            except BaseException as exc:  # any failure is a dropped request
                errors.append(exc)
                return
            if not (np.allclose(out, expected["1"]) or np.allclose(out, expected["2"])):
                errors.append(AssertionError(f"output of neither model: {out}"))
            counts[i] += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(100):
        rt.activate(b)
        time.sleep(0.001)  # let the load threads run on each side of every swap
        rt.activate(a)
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert all(c > 0 for c in counts)
    # Each output is the one of the model the observer says served the call.
    for version, out in seen:
        assert out is not None
        np.testing.assert_allclose(out, expected[version])
    assert {v for v, _ in seen} == {"1", "2"}


def test_slot_reads_shape_and_signature_from_the_interpreter(
    model_v1: bytes,
) -> None:
    """A normal model loads with its signature read from the interpreter."""
    s = slot(model_v1, "1")
    assert [p.shape for p in s.inputs] == [(1, 4)]
    assert s.signature.describe() == "(float32[1, 4]) -> (float32[1, 3])"


def test_model_built_with_other_weights_gives_other_outputs() -> None:
    """Sanity for every swap test: two seeds are two different functions."""
    x1 = slot(build_dense_model(seed=11), "a").run(X)
    x2 = slot(build_dense_model(seed=12), "b").run(X)
    assert not np.allclose(x1, x2)


def test_telemetry_windows_carry_counts_latency_confidence_and_sampled_inputs(
    model_v1: bytes,
) -> None:
    """A window per model version: count, errors, histograms on fixed buckets, input stats."""
    from datetime import UTC, datetime

    from edge_agent.telemetry import INPUT_SAMPLE_EVERY, TelemetryRecorder

    rec = TelemetryRecorder("cam-1", datetime.now(UTC))
    rt = DoubleBufferedRuntime(observer=rec.observe)
    rt.activate(slot(model_v1, "1"))
    for _ in range(8 * INPUT_SAMPLE_EVERY):
        rt.infer(X)
    with pytest.raises(ValueError):
        rt.infer(np.zeros((1, 5), dtype=np.float32))
    (window,) = rec.drain(datetime.now(UTC))
    assert (window.count, window.errors) == (8 * INPUT_SAMPLE_EVERY + 1, 1)
    assert window.latency_ms.n == window.confidence.n == 8 * INPUT_SAMPLE_EVERY
    assert window.inputs is not None and window.inputs.n == 8 * X.size
    assert window.input_mean == pytest.approx(float(X.mean()), rel=1e-5)
    assert 0 < (window.confidence.mean() or 0) <= 1
    assert rec.drain(datetime.now(UTC)) == []
