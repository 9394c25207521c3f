"""The LiteRT C API path: same tensors and outputs as the Python interpreter, GIL released."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shared import litert_capi, tflite
from shared.errors import ModelFormatError
from shared.model_builder import build_dense_model
from shared.tflite import make_interpreter, signature_of, uses_c_api

MODELS = {
    "tiny": {},
    "softmax-free": {"softmax": False, "hidden": (16, 16)},
    "batched": {"input_size": 32, "hidden": (64,), "output_size": 5, "batch": 8},
    "wide": {"input_size": 256, "hidden": (512, 512), "output_size": 10, "batch": 16},
}


def run(interp: tflite.Interpreter, x: np.ndarray) -> np.ndarray:
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return np.asarray(interp.get_tensor(interp.get_output_details()[0]["index"]))


def details(interp: tflite.Interpreter) -> list[tuple[str, int, list[int], str]]:
    return [
        (d["name"], d["index"], [int(v) for v in d["shape"]], np.dtype(d["dtype"]).name)
        for d in interp.get_input_details() + interp.get_output_details()
    ]


def test_the_installed_litert_wheel_is_run_through_its_c_api() -> None:
    """This environment (ai-edge-litert 2.3) binds the C API, so models load without the GIL."""
    assert tflite.RUNTIME_NAME == "litert"
    assert tflite.C_API is not None
    assert uses_c_api(make_interpreter(build_dense_model()))


@pytest.mark.parametrize("name", MODELS)
def test_c_api_gives_the_python_interpreters_tensors_and_outputs(name: str) -> None:
    """Same names, tensor indices, shapes, dtypes and signature; bit-identical outputs."""
    data = build_dense_model(seed=5, **MODELS[name])  # type: ignore[arg-type]
    fast, bare = make_interpreter(data), make_interpreter(data, c_api=False)
    assert uses_c_api(fast) and not uses_c_api(bare)
    assert details(fast) == details(bare)
    assert signature_of(fast) == signature_of(bare)
    shape = tuple(int(v) for v in bare.get_input_details()[0]["shape"])
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(run(fast, x), run(bare, x))


def test_loading_and_running_let_other_threads_run_python() -> None:
    """While a model compiles and runs through the C API, another Python thread keeps going.

    The Python interpreter holds the GIL through allocate_tensors(). With the
    switch interval set far out, the ticker thread can only run while the main
    thread has given the GIL up; one load (or five runs) during which it ticks
    three times shows the call released it. A busy machine may not schedule
    the ticker within a 1 ms load, so loads repeat, up to 20 s, until one shows
    it. (Through the Python interpreter no load ever gets past one tick.)
    """
    data = build_dense_model(seed=1, **MODELS["wide"])  # type: ignore[arg-type]
    x = np.ones((16, 256), np.float32)
    ticks = 0
    stop = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0)  # gives the GIL up at once, like any thread doing Python work

    during_load, during_run = [0], [0]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    t = threading.Thread(target=ticker)
    t.start()
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and (max(during_load) < 3 or max(during_run) < 3):
            before = ticks
            interp = make_interpreter(data)
            during_load.append(ticks - before)
            before = ticks
            for _ in range(5):
                run(interp, x)
            during_run.append(ticks - before)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(switch)
    assert max(during_load) >= 3, during_load[-20:]
    assert max(during_run) >= 3, during_run[-20:]


def test_threads_with_their_own_interpreters_run_concurrently_and_correctly() -> None:
    """Four threads, one compiled model each, the same expected outputs."""
    data = build_dense_model(seed=3, **MODELS["batched"])  # type: ignore[arg-type]
    x = np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)
    want = run(make_interpreter(data, c_api=False), x)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            interp = make_interpreter(data)
            for _ in range(50):
                np.testing.assert_array_equal(run(interp, x), want)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_wrong_inputs_and_unknown_tensors_are_value_errors(model_v1: bytes) -> None:
    """Like the Python interpreter: a clear ValueError, nothing run."""
    interp = make_interpreter(model_v1)
    index = interp.get_input_details()[0]["index"]
    with pytest.raises(ValueError, match="float64"):
        interp.set_tensor(index, np.zeros((1, 4), np.float64))
    with pytest.raises(ValueError, match="mismatch"):
        interp.set_tensor(index, np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError):
        interp.set_tensor(12345, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError):
        interp.get_tensor(12345)


def test_get_tensor_is_a_copy_and_a_closed_interpreter_refuses_to_run(model_v1: bytes) -> None:
    """The caller owns what get_tensor returns; close() releases the model for good."""
    interp = make_interpreter(model_v1)
    assert isinstance(interp, litert_capi.CompiledInterpreter)
    out = run(interp, np.ones((1, 4), np.float32))
    again = interp.get_tensor(interp.get_output_details()[0]["index"])
    again[:] = -1
    np.testing.assert_array_equal(run(interp, np.ones((1, 4), np.float32)), out)
    interp.close()
    with pytest.raises(RuntimeError):
        interp.invoke()


@pytest.mark.parametrize("keep", [8, 64, 300])
def test_truncated_models_are_refused_by_litert_as_not_a_model(model_v1: bytes, keep: int) -> None:
    """LiteRT's own parser refuses them: ModelFormatError, no fallback, no crash."""
    assert tflite.C_API is not None
    with pytest.raises(litert_capi.LiteRtError) as err:
        tflite.C_API.compile(model_v1[:keep])
    assert err.value.invalid_model
    with pytest.raises(ModelFormatError):
        make_interpreter(model_v1[:keep])


def test_what_the_c_api_path_does_not_take_runs_on_the_python_interpreter(
    model_v1: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than one CPU thread, no XNNPACK, a model the binding declines, or no C API at
    all: the Python interpreter, with the same outputs."""
    x = np.ones((1, 4), np.float32)
    want = run(make_interpreter(model_v1), x)
    for interp in (
        make_interpreter(model_v1, num_threads=2),
        make_interpreter(model_v1, default_delegates=False),
        make_interpreter(model_v1, c_api=False),
    ):
        assert not uses_c_api(interp)
        np.testing.assert_allclose(run(interp, x), want, rtol=1e-6)

    def decline(data: bytes) -> litert_capi.CompiledInterpreter:
        raise litert_capi.UnsupportedModel("dynamic shape")

    assert tflite.C_API is not None
    monkeypatch.setattr(tflite.C_API, "compile", decline)
    assert not uses_c_api(make_interpreter(model_v1))
    monkeypatch.setattr(tflite, "C_API", None)
    interp = make_interpreter(model_v1)
    assert not uses_c_api(interp)
    np.testing.assert_allclose(run(interp, x), want, rtol=1e-6)


def test_a_library_without_the_c_api_is_not_bound(tmp_path: Path) -> None:
    """Missing library or missing symbols: None, so callers use the Python interpreter."""
    assert litert_capi.load_c_api(tmp_path / "libLiteRt.so") is None
    assert litert_capi.load_c_api(Path("libm.so.6")) is None  # loads, has no LiteRt symbols
