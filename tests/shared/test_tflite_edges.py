"""TFLite binding edge cases: signature_of, tensor details, builder options."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import ArtifactError, ModelFormatError
from shared.model_builder import build_dense_model
from shared.tflite import looks_like_tflite, make_interpreter, read_signature, signature_of


def test_signature_of_a_live_interpreter_matches_read_signature(model_v1: bytes) -> None:
    """signature_of on an interpreter equals read_signature on the bytes."""
    sig = signature_of(make_interpreter(model_v1))
    assert sig == read_signature(model_v1)
    assert [s.name for s in sig.inputs] == ["input"]
    assert [s.name for s in sig.outputs] == ["output"]
    assert sig.inputs[0].dtype == "float32"


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batch_sets_leading_dimension_and_each_row_is_a_distribution(batch: int) -> None:
    """With batch=n the model takes [n, 4], and every output row sums to 1."""
    model = build_dense_model(batch=batch)
    interp = make_interpreter(model)
    inp = interp.get_input_details()[0]
    assert tuple(inp["shape"]) == (batch, 4)
    x = np.random.default_rng(0).standard_normal((batch, 4)).astype(np.float32)
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert out.shape == (batch, 3)
    np.testing.assert_allclose(out.sum(axis=1), np.ones(batch), atol=1e-5)


def test_without_softmax_outputs_are_not_normalised() -> None:
    """softmax=False yields raw logits (they do not generally sum to 1)."""
    interp = make_interpreter(build_dense_model(softmax=False, seed=5))
    interp.set_tensor(interp.get_input_details()[0]["index"], np.full((1, 4), 3, np.float32))
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    assert not np.isclose(out.sum(), 1.0, atol=1e-3)


def test_same_seed_builds_identical_bytes() -> None:
    """The builder is deterministic for a seed, so fixtures are reproducible."""
    assert build_dense_model(seed=7) == build_dense_model(seed=7)
    assert build_dense_model(seed=7) != build_dense_model(seed=8)


def test_hidden_layers_change_the_file_not_the_signature() -> None:
    """Deeper/wider hidden layers keep the same tensor signature."""
    small, big = build_dense_model(hidden=(4,)), build_dense_model(hidden=(32, 32))
    assert len(big) > len(small)
    assert read_signature(big) == read_signature(small)


def test_format_error_is_an_artifact_error_with_reason() -> None:
    """ModelFormatError carries reason not_a_model and is caught as ArtifactError."""
    with pytest.raises(ArtifactError) as err:
        read_signature(b"PK\x03\x04 a zip file, not a model")
    assert isinstance(err.value, ModelFormatError) and err.value.reason == "not_a_model"


@pytest.mark.parametrize("keep", [8, 16, 64])
def test_heavily_truncated_models_are_refused(model_v1: bytes, keep: int) -> None:
    """A model cut to its first few bytes still has 'TFL3' but is refused, not a crash."""
    head = model_v1[:keep]
    assert looks_like_tflite(head)
    with pytest.raises(ModelFormatError):
        make_interpreter(head)
