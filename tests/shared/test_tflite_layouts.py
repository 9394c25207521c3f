"""Tensor layouts through both bindings: the same signature (shape signatures, dtypes,
quantization, signature keys) and the same outputs, whatever the layout."""

from __future__ import annotations

import numpy as np
import pytest

from shared import tflite_schema
from shared.manifest import Quantization
from shared.model_builder import build_quantized_model, build_two_input_model
from shared.tflite import (
    Interpreter,
    make_interpreter,
    read_signature,
    serving_signature,
    signature_of,
    uses_c_api,
)
from tests.edge_agent.layout_models import TYPES, Out, T, build_layout_model

QUANTIZED = [
    T("q8", "int8", (1, 4), (0.5,), (-3,)),
    T("qu8", "uint8", (1, 4), (0.25,), (128,)),
    T("per_channel", "int8", (1, 3), (0.1, 0.2, 0.3), (0, 1, -1), 1),
    T("q16", "int16", (1, 2), (0.001,), (0,)),
]


def copies(inputs: list[T], **kw: object) -> bytes:
    """Each input copied to an output of the same layout (`<name>_out`)."""
    outs = [
        Out("copy", (i,), T(f"{t.name}_out", t.dtype, t.shape, t.scale, t.zero_point, t.dimension))
        for i, t in enumerate(inputs)
    ]
    return build_layout_model(inputs, outs, **kw)  # type: ignore[arg-type]


LAYOUTS = {
    "two inputs, two outputs": build_two_input_model(seed=1),
    "int8 in, uint8 out": build_quantized_model(seed=1),
    "every dtype": copies([T(f"in_{d}", d, (1, 3)) for d in TYPES]),
    "per-tensor and per-channel quantization": copies(QUANTIZED, signature="serving_default"),
    "three signatures": copies([T("x")], signature="zeta", extra_signatures=("alpha", "beta")),
    "dynamic dimensions": copies([T("x", "float32", (-1, -1)), T("n", "int32", (-1,))]),
}


def run(interp: Interpreter, xs: list[np.ndarray]) -> list[np.ndarray]:
    for d, x in zip(interp.get_input_details(), xs, strict=True):
        if tuple(d["shape"]) != x.shape:
            interp.resize_tensor_input(d["index"], x.shape, strict=True)
    interp.allocate_tensors()
    for d, x in zip(interp.get_input_details(), xs, strict=True):
        interp.set_tensor(d["index"], x)
    interp.invoke()
    return [np.asarray(interp.get_tensor(d["index"])) for d in interp.get_output_details()]


def inputs_for(interp: Interpreter) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    xs = []
    for d in interp.get_input_details():
        shape = tuple(2 if s < 0 else int(s) for s in d["shape_signature"])
        dtype = np.dtype(d["dtype"])
        if dtype == np.bool_:
            xs.append(rng.random(shape) < 0.5)
        elif dtype.kind == "f":
            xs.append(rng.standard_normal(shape).astype(dtype))
        else:
            xs.append(rng.integers(0, 100, shape).astype(dtype))
    return xs


@pytest.mark.parametrize("name", LAYOUTS)
def test_both_bindings_and_the_file_reader_describe_every_layout_alike(name: str) -> None:
    """C API, Python interpreter and the runtime-free reader report the same signature, and
    both bindings compute the same outputs."""
    data = LAYOUTS[name]
    fast, bare = make_interpreter(data), make_interpreter(data, c_api=False)
    assert not uses_c_api(bare)
    assert signature_of(fast) == signature_of(bare) == read_signature(data)
    assert read_signature(data) == tflite_schema.read_signature(data)
    xs = inputs_for(bare)
    for a, b in zip(run(fast, xs), run(bare, xs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantization_is_read_per_tensor_and_per_channel() -> None:
    """Scales, zero points and the channel dimension, from the C API as from the file."""
    data = LAYOUTS["per-tensor and per-channel quantization"]
    interp = make_interpreter(data)
    assert uses_c_api(interp)
    got = {s.name: s.quantization for s in signature_of(interp).inputs}
    assert got["q8"] == Quantization(scale=(0.5,), zero_point=(-3,), dimension=0)
    assert got["qu8"] == Quantization(scale=(0.25,), zero_point=(128,), dimension=0)
    per_channel = got["per_channel"]
    assert per_channel is not None and per_channel.dimension == 1
    assert per_channel.zero_point == (0, 1, -1)
    np.testing.assert_allclose(per_channel.scale, (0.1, 0.2, 0.3), rtol=1e-6)
    assert signature_of(make_interpreter(build_two_input_model())).inputs[0].quantization is None


def test_dynamic_dimensions_keep_their_minus_one_and_run_on_the_python_interpreter() -> None:
    """The C API would report the placeholder size and could not resize: such a model takes
    the Python interpreter, whose signature keeps -1 where any size goes."""
    data = LAYOUTS["dynamic dimensions"]
    interp = make_interpreter(data)
    assert not uses_c_api(interp)
    assert (
        read_signature(data).describe()
        == "(float32[-1, -1],int32[-1]) -> (float32[-1, -1],int32[-1])"
    )


def test_the_served_signature_is_serving_default_else_the_first() -> None:
    """Signature keys are listed in the file's order; `serving_default` serves if present."""
    three = make_interpreter(LAYOUTS["three signatures"])
    assert signature_of(three).signature_keys == ("zeta", "alpha", "beta")
    assert serving_signature(three) == "zeta"
    with_default = copies([T("x")], signature="alpha", extra_signatures=("serving_default",))
    assert serving_signature(make_interpreter(with_default)) == "serving_default"
    assert serving_signature(make_interpreter(build_two_input_model())) is None


def test_a_signature_on_another_subgraph_is_served_through_its_runner() -> None:
    """The serving signature runs subgraph 1 (subgraph 0 is something else): the C API path
    declines it and the Python interpreter runs that signature's subgraph, not `invoke`'s."""
    data = build_layout_model(
        [T("x")], [Out("sqrt", (0,), T("root"))], signature="serving_default", serving_subgraph=1
    )
    interp = make_interpreter(data)
    assert not uses_c_api(interp)
    sig = signature_of(interp)
    assert sig.describe() == "(float32[1, 4]) -> (float32[1, 4])"
    assert [s.name for s in sig.inputs + sig.outputs] == ["x", "root"]
    (root,) = run(interp, [np.array([[1, 4, 9, 16]], np.float32)])
    np.testing.assert_array_equal(root, [[1, 2, 3, 4]])


@pytest.mark.parametrize(
    "fixture",
    ["face_detector", "hand_landmarker", "wakeword_int8", "wakeword_int8_b", "melspectrogram"],
)
def test_third_party_models_read_alike_through_both_bindings(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    """Real models: the live interpreter's signature is the file reader's (what a manifest
    signs), on the C API path where it takes the model and on the Python interpreter."""
    data: bytes = request.getfixturevalue(fixture)
    expected = tflite_schema.read_signature(data)
    assert signature_of(make_interpreter(data)) == expected
    assert signature_of(make_interpreter(data, c_api=False)) == expected
    assert read_signature(data) == expected
