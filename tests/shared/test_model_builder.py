"""The generated models with several inputs and outputs, and quantized ones, run in real LiteRT."""

from __future__ import annotations

from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from shared.model_builder import (
    INPUT_SCALE,
    INPUT_ZERO_POINT,
    OUTPUT_SCALE,
    OUTPUT_ZERO_POINT,
    build_quantized_model,
    build_two_input_model,
)
from shared.tflite import make_interpreter

FEATURES = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
CONTEXT = np.array([[1.5, -0.5]], dtype=np.float32)


def run(interp: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feed inputs by tensor name, invoke, read every output by name."""
    for detail in interp.get_input_details():
        interp.set_tensor(detail["index"], inputs[detail["name"]])
    interp.invoke()
    return {d["name"]: np.array(interp.get_tensor(d["index"])) for d in interp.get_output_details()}


def python_interpreter(model: bytes) -> Any:
    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    return interp


def test_two_input_model_has_two_named_inputs_and_two_outputs() -> None:
    """features [1,4] and context [1,2] in; scores [1,3] (a distribution) and regression [1,2] out."""
    interp = python_interpreter(build_two_input_model())
    ins = [(d["name"], d["shape"].tolist()) for d in interp.get_input_details()]
    outs = [(d["name"], d["shape"].tolist()) for d in interp.get_output_details()]
    assert ins == [("features", [1, 4]), ("context", [1, 2])]
    assert outs == [("scores", [1, 3]), ("regression", [1, 2])]
    out = run(interp, {"features": FEATURES, "context": CONTEXT})
    assert np.isclose(out["scores"].sum(), 1.0, atol=1e-5) and (out["scores"] >= 0).all()
    assert np.isfinite(out["regression"]).all()


def test_both_inputs_reach_both_outputs_and_seeds_change_the_function() -> None:
    """Changing either input changes each output; another seed gives other outputs."""
    interp = python_interpreter(build_two_input_model(seed=1))
    base = run(interp, {"features": FEATURES, "context": CONTEXT})
    for changed in (
        {"features": FEATURES * -2, "context": CONTEXT},
        {"features": FEATURES, "context": CONTEXT * -2},
    ):
        out = run(interp, changed)
        assert all(not np.allclose(out[k], base[k]) for k in base), changed
    other = run(
        python_interpreter(build_two_input_model(seed=2)),
        {"features": FEATURES, "context": CONTEXT},
    )
    assert not np.allclose(other["scores"], base["scores"])


def test_quantized_model_takes_int8_and_gives_uint8_probabilities() -> None:
    """int8 input and uint8 output with their scales and zero points; the dequantized output is a
    distribution (to the output's 1/256 step) and matches the float computation's class."""
    interp = python_interpreter(build_quantized_model(seed=3))
    (x,), (y,) = interp.get_input_details(), interp.get_output_details()
    assert (x["name"], x["dtype"], x["quantization"]) == (
        "input",
        np.int8,
        (INPUT_SCALE, INPUT_ZERO_POINT),
    )
    assert (y["name"], y["dtype"], y["quantization"]) == (
        "output",
        np.uint8,
        (OUTPUT_SCALE, OUTPUT_ZERO_POINT),
    )
    q = np.array([[8, -16, 32, 4]], dtype=np.int8)
    out = run(interp, {"input": q})["output"]
    probabilities = OUTPUT_SCALE * (out.astype(np.float32) - OUTPUT_ZERO_POINT)
    assert out.dtype == np.uint8 and out.shape == (1, 3)
    assert abs(probabilities.sum() - 1.0) <= 3 * OUTPUT_SCALE
    other = run(python_interpreter(build_quantized_model(seed=4)), {"input": q})["output"]
    assert not np.array_equal(other, out)


def test_the_project_binding_runs_them_as_the_python_interpreter_does() -> None:
    """shared.tflite (LiteRT's C API where it loads) gives the Python interpreter's outputs."""
    cases = [
        (build_two_input_model(), {"features": FEATURES, "context": CONTEXT}),
        (build_quantized_model(), {"input": np.array([[1, 2, -3, 4]], dtype=np.int8)}),
    ]
    for model, inputs in cases:
        expected = run(python_interpreter(model), inputs)
        got = run(make_interpreter(model), inputs)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
