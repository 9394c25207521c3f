"""Shadow mode: mirrored inferences count agreement and never touch what is served."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np

from edge_agent.runtime import DoubleBufferedRuntime, ModelSlot
from edge_agent.shadow import ShadowMirror, same_top_class
from edge_agent.telemetry import TelemetryRecorder
from shared.messages import ModelRef
from shared.model_builder import build_dense_model


def slot(seed: int, version: str, **kw: object) -> ModelSlot:
    ref = ModelRef(name="m", version=version, sha256=version * 64)
    return ModelSlot.load(ref, build_dense_model(seed=seed, **kw))  # type: ignore[arg-type]


def run_with_shadow(shadow: ModelSlot, n: int = 60) -> dict[str, tuple[int, int | None]]:
    rec = TelemetryRecorder("d", datetime.now(UTC))
    rt = DoubleBufferedRuntime(observer=rec.observe)
    served = slot(1, "a")
    rt.activate(served)
    rt.shadow = ShadowMirror(shadow, seconds=5, observer=rec.observe_shadow).start()
    rng = np.random.default_rng(0)
    for _ in range(n):
        x = served.sample_input(rng)
        np.testing.assert_allclose(rt.infer(x), served.run(x))  # the served output is the active's
        time.sleep(0.002)
    time.sleep(0.3)
    return {
        f"{w.model.version}{'-shadow' if w.shadow else ''}": (w.count, w.agreements)
        for w in rec.drain(datetime.now(UTC))
    }


def test_identical_shadow_agrees_on_every_inference() -> None:
    """Same weights in another file: every mirrored call agrees; served counts are separate."""
    got = run_with_shadow(slot(1, "b", description="re-export"))
    assert got["a"] == (60, None)
    assert got["b-shadow"] == (60, 60)


def test_different_shadow_disagrees_sometimes() -> None:
    """Other weights: fewer agreements than calls."""
    got = run_with_shadow(slot(11, "c", hidden=(16, 16)))
    count, agreements = got["c-shadow"]
    assert count == 60 and agreements is not None and agreements < count


def test_full_queue_skips_instead_of_blocking() -> None:
    """offer() returns at once even when the shadow cannot keep up."""
    mirror = ShadowMirror(slot(1, "d"), seconds=5, observer=lambda *a: None, depth=2)
    x, out = np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)
    for _ in range(100):
        mirror.offer(x, out)  # thread not started: nothing drains the queue; a block would hang
    assert mirror.skipped == 98


def test_same_top_class_compares_rows() -> None:
    """Agreement is per batch row: every row must pick the same class."""
    a = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert same_top_class(a, np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert not same_top_class(a, np.array([[0.3, 0.7], [0.4, 0.6]]))
