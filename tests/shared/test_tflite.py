"""The TFLite binding and the model builder: real flatbuffers in the real interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import ModelFormatError
from shared.model_builder import build_dense_model
from shared.tflite import RUNTIME_NAME, looks_like_tflite, make_interpreter, read_signature


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    interp = make_interpreter(model)
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return np.array(interp.get_tensor(interp.get_output_details()[0]["index"]))


def test_built_model_runs_and_outputs_a_distribution() -> None:
    """A generated MLP loads in the real runtime and its softmax rows sum to 1."""
    out = run(build_dense_model(seed=1), np.ones((1, 4), dtype=np.float32))
    assert out.shape == (1, 3)
    assert np.isclose(out.sum(), 1.0, atol=1e-5) and (out >= 0).all()
    assert RUNTIME_NAME in ("litert", "tflite_runtime")


def test_signature_and_batch_come_from_the_model() -> None:
    """read_signature reports the real tensors; batch changes the leading dimension."""
    assert read_signature(build_dense_model()).describe() == "(float32[1, 4]) -> (float32[1, 3])"
    batched = build_dense_model(input_size=8, output_size=2, batch=5, softmax=False)
    assert read_signature(batched).describe() == "(float32[5, 8]) -> (float32[5, 2])"


def test_seeds_give_different_functions_with_the_same_signature() -> None:
    """Two versions are told apart by their outputs, not their shapes."""
    x = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)
    a, b = build_dense_model(seed=1), build_dense_model(seed=2)
    assert read_signature(a) == read_signature(b)
    assert not np.allclose(run(a, x), run(b, x))


@pytest.mark.parametrize("data", [b"", b"not a model at all", b"\x00" * 64])
def test_bytes_that_are_not_a_model_raise_model_format_error(data: bytes) -> None:
    """No TFL3 identifier: refused before the interpreter sees it."""
    assert not looks_like_tflite(data)
    with pytest.raises(ModelFormatError):
        make_interpreter(data)


def test_truncated_model_is_refused_by_the_interpreter() -> None:
    """A real model cut in half keeps its identifier but does not load."""
    model = build_dense_model(hidden=(64,))
    with pytest.raises(ModelFormatError):
        make_interpreter(model[: len(model) // 2])
