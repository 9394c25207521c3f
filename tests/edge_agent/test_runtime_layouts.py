"""The runtime on every tensor layout: several inputs and outputs, every dtype, quantized
inputs, dynamic dimensions; three call forms; every output watched."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_agent.health import health_problem
from edge_agent.runtime import DoubleBufferedRuntime, ModelSlot, SlotStats
from shared.errors import ModelFormatError
from shared.messages import ModelRef
from shared.model_builder import build_quantized_model, build_two_input_model
from tests.edge_agent.layout_models import (
    TYPES,
    Out,
    T,
    build_layout_model,
    nan_in_second_output_model,
)

FEATURES = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)
CONTEXT = np.array([[1.5, -0.5]], np.float32)


def slot(data: bytes, version: str = "1") -> ModelSlot:
    return ModelSlot.load(ModelRef(name="m", version=version, sha256=version[0] * 64), data)


def runtime(s: ModelSlot) -> DoubleBufferedRuntime:
    rt = DoubleBufferedRuntime()
    rt.activate(s)
    return rt


def test_infer_answers_in_the_form_it_was_asked_in() -> None:
    """A sequence gives a tuple in output order, a mapping a dict by output name, one array
    one array; the three agree."""
    rt = runtime(slot(build_two_input_model(seed=1)))
    scores, regression = rt.infer((FEATURES, CONTEXT))
    assert (scores.shape, regression.shape) == ((1, 3), (1, 2))
    by_name = rt.infer({"context": CONTEXT, "features": FEATURES})
    assert list(by_name) == ["scores", "regression"]
    np.testing.assert_array_equal(by_name["scores"], scores)
    np.testing.assert_array_equal(rt.infer([FEATURES, CONTEXT])[1], regression)
    single = runtime(slot(build_quantized_model(seed=1)))
    x = np.array([[1, -2, 3, 4]], np.int8)
    out = single.infer(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    np.testing.assert_array_equal(single.infer((x,))[0], out)
    np.testing.assert_array_equal(single.infer({"input": x})["output"], out)


def test_inputs_the_model_does_not_take_are_refused_naming_the_tensor() -> None:
    """Wrong count, dtype, shape or names; one array for a model of two inputs: a ValueError
    that says which tensor and what it takes, counted as a failed call."""
    s = slot(build_two_input_model(seed=1))
    rt = runtime(s)
    cases = [
        (FEATURES, "takes \\['features', 'context'\\]"),
        ((FEATURES,), "takes 2 inputs"),
        ((FEATURES, CONTEXT.astype(np.float64)), r"input 1 \('context'\) must be float32\[1, 2\]"),
        ((FEATURES, np.zeros((1, 3), np.float32)), r"input 1 \('context'\).*got float32\[1, 3\]"),
        ({"features": FEATURES}, r"missing \['context'\]"),
        ({"features": FEATURES, "context": CONTEXT, "extra": CONTEXT}, r"unknown \['extra'\]"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            rt.infer(inputs)  # type: ignore[call-overload]
    assert s.stats.snapshot().errors == len(cases)


def test_one_array_for_a_model_with_several_outputs_is_refused() -> None:
    """One array in, one array out: a model with two outputs is asked with a sequence or a
    mapping, so that no output is silently dropped."""
    rt = runtime(slot(nan_in_second_output_model()))
    with pytest.raises(ValueError, match="sequence in input order"):
        rt.infer(FEATURES)
    assert len(rt.infer((FEATURES,))) == 2


def test_swaps_between_multi_output_models_under_load_drop_nothing_and_never_mix() -> None:
    """Four threads call a two-input, two-output model while the main thread swaps A and B
    200 times: no error, and every call's outputs are all A's or all B's."""
    a, b = slot(build_two_input_model(seed=1), "1"), slot(build_two_input_model(seed=2), "2")
    a.grow(2)
    b.grow(2)
    expected = {"1": a.run((FEATURES, CONTEXT)), "2": b.run((FEATURES, CONTEXT))}
    assert not np.allclose(expected["1"][0], expected["2"][0])
    seen: list[tuple[str, tuple[np.ndarray, ...] | None]] = []
    rt = DoubleBufferedRuntime(
        observer=lambda ref, _ms, outs, _xs: seen.append((ref.version, outs))
    )
    rt.activate(a)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = [0] * 4

    def load(i: int) -> None:
        while not stop.is_set():
            try:
                outs = rt.infer((FEATURES, CONTEXT))
            except BaseException as exc:  # any failure is a dropped request
                errors.append(exc)
                return
            if not any(
                all(np.allclose(o, e) for o, e in zip(outs, want, strict=True))
                for want in expected.values()
            ):
                errors.append(AssertionError(f"outputs of neither model: {outs}"))
            counts[i] += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(100):
        rt.activate(b)
        time.sleep(0.001)
        rt.activate(a)
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert all(c > 0 for c in counts)
    assert {v for v, _ in seen} == {"1", "2"}
    for version, outs in seen:  # the observer names the model that served each call
        assert outs is not None
        for got, want in zip(outs, expected[version], strict=True):
            np.testing.assert_allclose(got, want)


def test_the_observer_gets_every_input_and_output_in_order_and_none_for_a_nan() -> None:
    """(model, ms, outputs in output order, inputs in input order); a NaN in any output
    makes the outputs None (telemetry counts an error), and the caller still gets them."""
    calls: list[tuple[tuple[np.ndarray, ...] | None, tuple[np.ndarray, ...]]] = []
    rt = DoubleBufferedRuntime(observer=lambda _ref, _ms, outs, xs: calls.append((outs, xs)))
    rt.activate(slot(nan_in_second_output_model()))
    positive = np.array([[1.0, 4.0, 9.0, 16.0]], np.float32)
    _, root = rt.infer((positive,))
    np.testing.assert_array_equal(root, [[1, 2, 3, 4]])
    _, root = rt.infer((FEATURES,))  # sqrt(-1.0): NaN in output 1
    assert np.isnan(root).any()
    ((outs, xs), (nan_outs, nan_xs)) = calls
    assert outs is not None and len(outs) == 2 and xs[0] is positive
    assert nan_outs is None and nan_xs[0] is FEATURES


def test_health_watch_catches_a_nan_in_the_second_output_and_names_it() -> None:
    """The slot's stats count a call whose second output has a NaN; the judge says which."""
    s = slot(nan_in_second_output_model())
    rt = runtime(s)
    before = s.stats.snapshot()
    rt.infer((np.ones((1, 4), np.float32),))
    rt.infer((FEATURES,))
    seen = s.stats.since(before)
    assert (seen.count, seen.nonfinite, len(seen.latencies_ms)) == (2, 1, 1)
    problem = health_problem(seen, None, max_latency_factor=20)
    assert problem == (
        "1 of 2 inferences produced non-finite outputs (output 1 ('root'): NaN or inf)"
    )


def test_an_output_of_another_shape_than_the_signature_is_a_health_problem() -> None:
    """Output shapes are checked against the signature (-1 matches any size)."""
    s = slot(build_two_input_model(seed=1))
    outs = s.run((FEATURES, CONTEXT))
    assert s.output_problem(outs) is None
    bad = s.output_problem((outs[0], np.zeros((1, 5), np.float32)))
    assert bad is not None and not bad.nonfinite
    assert bad.detail == "output 1 ('regression'): shape [1, 5] instead of [1, 2]"
    stats = SlotStats()
    stats.record(1.0, problem=bad)
    judged = health_problem(stats.since(SlotStats().snapshot()), None, max_latency_factor=20)
    assert judged is not None and "wrong shape (output 1 ('regression')" in judged


def test_sample_inputs_have_each_inputs_dtype_shape_and_range() -> None:
    """Every input gets a value of its dtype and shape; quantized 8-bit inputs span their
    whole range (the calibrated real range), wide integers stay small, bools are both."""
    inputs = [
        T("f32", "float32", (2, 3)),
        T("f16", "float16", (1, 3)),
        T("q_int8", "int8", (1, 64), (0.1019608,), (-128,)),
        T("q_uint8", "uint8", (1, 64), (0.0039063,), (0,)),
        T("q_per_channel", "int8", (1, 3), (0.1, 0.2, 0.3), (0, 0, 0), 1),
        T("i32", "int32", (1, 64)),
        T("i64", "int64", (1, 64)),
        T("flags", "bool", (1, 64)),
    ]
    outs = [
        Out("copy", (i,), T(f"{t.name}_out", t.dtype, t.shape, t.scale, t.zero_point, t.dimension))
        for i, t in enumerate(inputs)
    ]
    s = slot(build_layout_model(inputs, outs))
    rng = np.random.default_rng(0)
    samples = [s.sample_inputs(rng) for _ in range(50)]
    for i, t in enumerate(inputs):
        values = np.stack([xs[i] for xs in samples])
        assert values.dtype == np.dtype(t.dtype) and values.shape[1:] == t.shape, t.name
        if t.dtype in ("int8", "uint8"):
            info = np.iinfo(t.dtype)
            assert info.min <= values.min() and values.max() <= info.max, t.name
            if values.size >= 1000:  # enough draws to reach both ends
                assert values.min() == info.min and values.max() == info.max, t.name
        if t.dtype in ("int32", "int64"):
            assert values.min() >= 0 and values.max() < 16, t.name
        if t.dtype == "bool":
            assert values.any() and not values.all()
    dequantized = 0.1019608 * (np.stack([xs[2] for xs in samples]).astype(float) + 128)
    assert dequantized.min() >= 0.0 and dequantized.max() <= 26.1  # the calibrated range
    # And the model runs on them: every output copies its input back.
    for xs in samples[:3]:
        for x, y in zip(xs, s.run(xs), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", sorted(TYPES))
def test_every_dtype_flows_through_infer(dtype: str) -> None:
    """float32, float16, float64, int8, uint8, int16, int32, int64 and bool in and out."""
    s = slot(
        build_layout_model([T("x", dtype, (1, 5))], [Out("copy", (0,), T("y", dtype, (1, 5)))])
    )
    (x,) = s.sample_inputs(np.random.default_rng(1))
    y = runtime(s).infer(x)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, x)


def test_dynamic_inputs_are_resized_on_first_use_on_each_interpreter() -> None:
    """A [-1, -1] input takes any size: each interpreter of the pool is resized when a call
    brings a shape it is not sized for; outputs follow; probes then use the live shape."""
    s = slot(
        build_layout_model(
            [T("x", "float32", (-1, -1))], [Out("copy", (0,), T("y", "float32", (-1, -1)))]
        )
    )
    assert s.dynamic and s.sample_shapes == ((1, 1024),)
    s.grow(2)
    rt = runtime(s)
    rng = np.random.default_rng(0)
    for shape in [(1, 3), (2, 7), (1, 3), (5, 1), (2, 7)] * 3:
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(rt.infer(x), x)
    assert s.sample_shapes == ((2, 7),)
    assert s.sample_inputs(rng)[0].shape == (2, 7)
    with pytest.raises(ValueError, match=r"must be float32\[-1, -1\]"):
        rt.infer(np.zeros((1, 2, 3), np.float32))  # the rank is fixed


def test_a_third_party_dynamic_model_resizes_and_survives_a_size_it_cannot_take(
    melspectrogram: bytes,
) -> None:
    """The mel spectrogram front end ([-1, -1] audio): its placeholder [1, 1] does not run,
    so it loads unallocated; real lengths resize it; a too-short frame fails that call only."""
    s = slot(melspectrogram)
    s.warm_up(np.random.default_rng(0))  # at the sample shape, (1, 1024)
    rt = runtime(s)
    (spec,) = rt.infer((np.zeros((1, 1280), np.float32),))
    assert spec.shape == (1, 1, 5, 32)
    with pytest.raises(RuntimeError):
        rt.infer((np.zeros((1, 100), np.float32),))
    (spec,) = rt.infer((np.zeros((1, 16000), np.float32),))
    assert spec.shape == (1, 1, 97, 32)
    assert s.output_problem((spec,)) is None


def test_a_model_that_loads_but_does_not_run_is_refused_at_warm_up(
    unloadable_model: bytes,
) -> None:
    """An unresolved custom op: LiteRT's compiler takes the file, the first run fails, and
    the warm-up says so as a ModelFormatError before the model can serve."""
    try:
        s = slot(unloadable_model)
    except ModelFormatError:
        return  # the Python interpreter refuses it at load: refused all the same
    with pytest.raises(ModelFormatError, match="loads but does not run"):
        s.warm_up(np.random.default_rng(0))


def test_third_party_multi_output_models_swap_under_load(
    face_detector: bytes, hand_landmarker: bytes
) -> None:
    """Real detectors and landmark models: calls by name during swaps between two files of
    the face detector, and every output of the landmark model read."""
    a, b = slot(face_detector, "1"), slot(face_detector + bytes(64), "2")
    rt = runtime(a)
    (image,) = a.sample_inputs(np.random.default_rng(0))
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                out = rt.infer({"input": image})
                assert list(out) == ["regressors", "classificators"]
                assert out["classificators"].shape == (1, 896, 1)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(20):
        rt.activate(b)
        time.sleep(0.005)
        rt.activate(a)
        time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    hands = slot(hand_landmarker)
    outs = hands.run(hands.sample_inputs(np.random.default_rng(0)))
    assert [o.shape for o in outs] == [(1, 63), (1, 1), (1, 1), (1, 63)]
    assert hands.output_problem(outs) is None


def test_quantized_stateful_wake_word_runs_on_its_quantized_range(wakeword_int8: bytes) -> None:
    """int8 [1, 3, 40] in, uint8 [1, 1] out, quantization read from the model."""
    s = slot(wakeword_int8)
    (port,) = s.inputs
    assert port.quantization is not None and port.quantization.zero_point == (-128,)
    (x,) = s.sample_inputs(np.random.default_rng(0))
    assert x.dtype == np.int8 and x.shape == (1, 3, 40)
    out = runtime(s).infer(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1)
