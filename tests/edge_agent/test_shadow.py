"""Shadow mode: mirrored inferences count agreement by the model's task and never touch
what is served."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np

from edge_agent.runtime import DoubleBufferedRuntime, ModelSlot
from edge_agent.shadow import ShadowMirror, same_top_class
from edge_agent.telemetry import TelemetryRecorder
from shared.manifest import ModelTask, Quantization, TensorSignature, TensorSpec
from shared.messages import ModelRef
from shared.model_builder import build_dense_model
from tests.edge_agent.layout_models import Out, T, build_layout_model, two_input_model

Window = tuple[int, int | None, str | None]


def slot(seed: int, version: str, **kw: object) -> ModelSlot:
    return load(build_dense_model(seed=seed, **kw), version)  # type: ignore[arg-type]


def load(data: bytes, version: str) -> ModelSlot:
    return ModelSlot.load(ModelRef(name="m", version=version, sha256=version * 64), data)


def run_with_shadow(
    served: ModelSlot, shadow: ModelSlot, n: int = 60, task: ModelTask | None = None
) -> dict[str, Window]:
    rec = TelemetryRecorder("d", datetime.now(UTC))
    rt = DoubleBufferedRuntime(observer=rec.observe)
    rt.activate(served)
    rt.shadow = ShadowMirror(shadow, seconds=5, observer=rec.observe_shadow, task=task).start()
    rng = np.random.default_rng(0)
    for _ in range(n):
        xs = served.sample_inputs(rng)
        # the served outputs are the active model's
        for got, want in zip(rt.infer(xs), served.run(xs), strict=True):
            np.testing.assert_allclose(got, want)
        time.sleep(0.002)
    time.sleep(0.3)
    return {
        f"{w.model.version}{'-shadow' if w.shadow else ''}": (
            w.count, w.agreements, w.agreement_rule
        )
        for w in rec.drain(datetime.now(UTC))
    }  # fmt: skip


def test_identical_shadow_agrees_on_every_inference() -> None:
    """Same weights in another file: every mirrored call agrees; served counts are separate."""
    got = run_with_shadow(slot(1, "a"), slot(1, "b", description="re-export"))
    assert got["a"] == (60, None, None)
    assert got["b-shadow"] == (60, 60, "same top class of 'output'")


def test_different_shadow_disagrees_sometimes() -> None:
    """Other weights: fewer agreements than calls."""
    got = run_with_shadow(slot(1, "a"), slot(11, "c", hidden=(16, 16)))
    count, agreements, _ = got["c-shadow"]
    assert count == 60 and agreements is not None and agreements < count


def other_sum_model() -> bytes:
    """two_input_model's interface with another function: `sum` is b's values, not a + b."""
    a, b = T("a", shape=(1, 4)), T("b", shape=(1, 4))
    return build_layout_model(
        [a, b],
        [Out("copy", (1,), T("sum", shape=(1, 4))), Out("copy", (0,), T("a_copy", shape=(1, 4)))],
    )


def test_a_two_input_model_agrees_numerically_on_every_output() -> None:
    """No classifier (task none): every output within the tolerance. The same function in
    another file agrees on every call; another function on none."""
    none = ModelTask(kind="none")
    served = load(two_input_model(), "a")
    same = run_with_shadow(served, load(two_input_model(), "b"), n=40, task=none)
    assert same["b-shadow"] == (40, 40, "all outputs within rtol=0.01, atol=0.001")
    other = run_with_shadow(served, load(other_sum_model(), "c"), n=40, task=none)
    assert other["c-shadow"][:2] == (40, 0)


def test_full_queue_skips_instead_of_blocking() -> None:
    """offer() returns at once even when the shadow cannot keep up."""
    mirror = ShadowMirror(slot(1, "d"), seconds=5, observer=lambda *a: None, depth=2)
    x, out = np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)
    for _ in range(100):
        mirror.offer((x,), (out,))  # thread not started: nothing drains the queue
    assert mirror.skipped == 98


def test_offer_copies_the_inputs_the_caller_may_reuse() -> None:
    got: list[tuple[np.ndarray, ...]] = []
    mirror = ShadowMirror(
        slot(1, "e"), seconds=5, observer=lambda ref, ms, outs, xs, agreed, rule: got.append(xs)
    )
    x = np.zeros((1, 4), np.float32)
    mirror.offer((x,), (np.zeros((1, 3), np.float32),))
    x[:] = 7.0
    mirror.start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    mirror.stop()
    assert got and float(got[0][0].max()) == 0.0


def test_same_top_class_compares_rows() -> None:
    """Agreement is per batch row: every row must pick the same class."""
    a = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert same_top_class(a, np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert not same_top_class(a, np.array([[0.3, 0.7], [0.4, 0.6]]))


def test_quantized_outputs_agree_within_one_quantization_step() -> None:
    """uint8 landmarks at scale 0.05: one step apart agrees, two steps apart does not; the
    rule says so. Values are compared real, so another zero point is no difference."""
    q = Quantization(scale=(0.05,), zero_point=(0,))
    candidate = load(two_input_model(), "f")
    served = TensorSignature(
        inputs=candidate.signature.inputs,
        outputs=tuple(
            TensorSpec(name=o.name, shape=o.shape, dtype="uint8", quantization=q)
            for o in candidate.signature.outputs
        ),
    )
    mirror = ShadowMirror(
        candidate, seconds=1, observer=lambda *a: None, task=ModelTask(kind="none"), served=served
    )
    assert mirror.rule == "all outputs within rtol=0.01, atol=0.001 (or one quantization step)"
    real = np.full((1, 4), 1.0, np.float32)
    raw = np.full((1, 4), 20, np.uint8)  # 20 * 0.05 = 1.0
    assert mirror.agrees((raw, raw), (real, real))
    assert mirror.agrees((raw + 1, raw), (real, real))
    assert not mirror.agrees((raw + 2, raw), (real, real))
