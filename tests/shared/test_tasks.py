"""Model tasks: the inferred default, confidence per task, shadow agreement, input buckets."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from shared.manifest import Manifest, ModelTask, Quantization, TensorSignature, TensorSpec
from shared.messages import INPUT_BUCKETS, MAX_INPUT_BUCKETS
from shared.tasks import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    INTEGER_BUCKETS,
    agreement_rule,
    confidence_of,
    default_task,
    dequantize,
    describe,
    describe_effective,
    effective_task,
    has_confidence,
    histogram_counts,
    input_bounds,
    input_layout,
    outputs_agree,
    task_problem,
)

U8_SOFTMAX = Quantization(scale=(1 / 256,), zero_point=(0,))


def spec(name: str, *shape: int, dtype: str = "float32", q: Quantization | None = None):
    return TensorSpec(name=name, shape=shape, dtype=dtype, quantization=q)


def sig(*outputs: TensorSpec, inputs: tuple[TensorSpec, ...] = ()) -> TensorSignature:
    return TensorSignature(inputs=inputs or (spec("x", 1, 4),), outputs=outputs)


CLASSIFIER = ModelTask(kind="classifier", output="out")
DETECTOR = ModelTask(kind="detector", output="scores", score_threshold=0.5)
NONE = ModelTask(kind="none")

# ---------------------------------------------------------------- default_task


@pytest.mark.parametrize(
    ("signature", "want"),
    [
        (sig(spec("out", 1, 3)), CLASSIFIER),
        (sig(spec("out", -1, 521)), CLASSIFIER),  # dynamic batch of frames (YAMNet-like)
        (sig(spec("out", 1, 1, 1, 1001)), CLASSIFIER),
        (sig(spec("out", 1, 1001, dtype="uint8", q=U8_SOFTMAX)), CLASSIFIER),
        (sig(spec("out", 10)), CLASSIFIER),
        # BlazeFace: box regressors and per-anchor scores
        (
            sig(spec("regressors", 1, 896, 16), spec("classificators", 1, 896, 1)),
            ModelTask(kind="detector", output="classificators", score_threshold=0.5),
        ),
        (
            sig(spec("boxes", 1, 10, 4), spec("detection_scores", 1, 10)),
            ModelTask(kind="detector", output="detection_scores", score_threshold=0.5),
        ),
        # hand landmarks: four outputs, none named like scores
        (sig(spec("Identity", 1, 63), spec("Identity_1", 1, 1), spec("Identity_3", 1, 63)), NONE),
        (sig(spec("out", 1, 1)), NONE),  # a lone score: no class axis
        (sig(spec("out", 1, 1, -1, 32)), NONE),  # a spectrogram: a dynamic inner axis
        (sig(spec("out", 1, 5, 10)), NONE),  # a sequence of rows, not one head
        (sig(spec("out", 1, 10, dtype="int32")), NONE),  # integers without quantization
        (sig(spec("out", 1, 10, dtype="int8")), NONE),
        (sig(spec("boxes", 1, 10, 4), spec("classes", 1, 10)), NONE),  # classes are indices
        (sig(spec("a", 1, 3), spec("b", 1, 3)), NONE),  # two heads: which one?
    ],
)
def test_default_task_follows_the_documented_rule(signature: TensorSignature, want: ModelTask):
    """One class-shaped output → classifier; else a score-named output → detector at 0.5;
    else none."""
    assert default_task(signature) == want


def manifest(task: ModelTask | None, signature: TensorSignature) -> Manifest:
    return Manifest(
        name="m", version="1", sha256="a" * 64, size=1, signature=signature,
        created_at=datetime.now(UTC), task=task,
    )  # fmt: skip


def test_a_declared_task_wins_and_the_status_text_says_where_it_came_from() -> None:
    """effective_task: the manifest's task if declared, else the inferred one."""
    s = sig(spec("out", 1, 3))
    assert effective_task(manifest(None, s)) == CLASSIFIER
    assert effective_task(manifest(NONE, s)) == NONE
    inferred = describe_effective(manifest(None, s))
    assert inferred == "classifier on 'out' (inferred from the signature)"
    assert describe_effective(manifest(NONE, s)) == "none (declared)"


def test_describe_names_kind_output_and_threshold() -> None:
    assert describe(CLASSIFIER) == "classifier on 'out'"
    assert describe(DETECTOR) == "detector on 'scores' (threshold 0.5)"
    assert describe(NONE) == "none"
    assert not has_confidence(NONE) and has_confidence(DETECTOR) and has_confidence(CLASSIFIER)


def test_task_problem_names_a_missing_or_scoreless_output() -> None:
    s = sig(spec("out", 1, 3), spec("idx", 1, dtype="int64"))
    assert task_problem(CLASSIFIER, s) is None and task_problem(NONE, s) is None
    assert "names output 'scores'" in (task_problem(DETECTOR, s) or "")
    idx = ModelTask(kind="classifier", output="idx")
    assert "int64 without quantization" in (task_problem(idx, s) or "")


# ---------------------------------------------------------------- confidence_of


def test_classifier_confidence_reads_probabilities_as_they_are_and_softmaxes_logits() -> None:
    """Probabilities: the top one; logits: softmax first; batch rows: the mean of the rows."""
    assert confidence_of(CLASSIFIER, {"out": np.array([[0.1, 0.7, 0.2]])}) == pytest.approx(0.7)
    logits = np.array([[2.0, 0.0, -1.0]])
    want = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    assert confidence_of(CLASSIFIER, {"out": logits}) == pytest.approx(want)
    rows = np.array([[0.9, 0.1], [0.6, 0.4]], np.float32)
    assert confidence_of(CLASSIFIER, {"out": rows}) == pytest.approx(0.75)
    assert confidence_of(CLASSIFIER, {"out": np.array([0.2, 0.8])}) == pytest.approx(0.8)


def test_quantized_classifier_confidence_is_on_real_values() -> None:
    """A uint8 softmax (scale 1/256): 200 reads as 0.78, not as a logit of 200."""
    raw = np.zeros((1, 1001), np.uint8)
    raw[0, 5] = 200
    raw[0, 6] = 30
    got = confidence_of(CLASSIFIER, {"out": raw}, U8_SOFTMAX)
    assert got == pytest.approx(200 / 256)


def test_detector_confidence_is_the_mean_score_above_the_threshold() -> None:
    """Scores above 0.5 averaged; none above → no sample; logits get a sigmoid."""
    scores = np.array([[0.9, 0.7, 0.2, 0.1]])
    assert confidence_of(DETECTOR, {"scores": scores}) == pytest.approx(0.8)
    assert confidence_of(DETECTOR, {"scores": np.array([[0.1, 0.5]])}) is None
    logits = np.array([[[3.0], [-4.0], [0.0]]])  # BlazeFace-like raw logits
    assert confidence_of(DETECTOR, {"scores": logits}) == pytest.approx(1 / (1 + math.exp(-3)))


def test_sigmoid_of_extreme_logits_neither_overflows_nor_loses_the_answer() -> None:
    """Warnings are errors here: e^1000 would be one."""
    got = confidence_of(DETECTOR, {"scores": np.array([[-1000.0, 900.0, -5.0]])})
    assert got == pytest.approx(1.0)


def test_no_confidence_without_a_task_output_or_for_task_none() -> None:
    assert confidence_of(NONE, {"out": np.array([[0.1, 0.9]])}) is None
    assert confidence_of(CLASSIFIER, {"other": np.array([[0.1, 0.9]])}) is None
    assert confidence_of(CLASSIFIER, {"out": np.zeros((1, 0))}) is None


def test_dequantize_per_tensor_and_per_channel() -> None:
    """real = scale * (q - zero_point); per channel along `dimension` (after stacked axes)."""
    q = Quantization(scale=(0.5,), zero_point=(10,))
    np.testing.assert_allclose(dequantize(np.array([10, 12], np.uint8), q), [0.0, 1.0])
    per = Quantization(scale=(1.0, 0.1), zero_point=(0, 5), dimension=1)
    x = np.array([[[1, 15], [2, 25]]], np.int8)  # one stacked call of a [2, 2] tensor
    np.testing.assert_allclose(dequantize(x, per, leading=1), [[[1.0, 1.0], [2.0, 2.0]]])
    assert dequantize(np.array([1, 2], np.int32), None).dtype == np.float64


# ---------------------------------------------------------------- shadow agreement


def test_classifiers_agree_on_the_same_top_class_of_every_row() -> None:
    a = {"out": np.array([[0.1, 0.9], [0.8, 0.2]])}
    assert outputs_agree(CLASSIFIER, a, {"out": np.array([[0.3, 0.7], [0.6, 0.4]])})
    assert not outputs_agree(CLASSIFIER, a, {"out": np.array([[0.3, 0.7], [0.4, 0.6]])})
    assert not outputs_agree(CLASSIFIER, a, {"out": np.array([[0.3, 0.7]])})  # other shape
    assert agreement_rule(CLASSIFIER) == "same top class of 'out'"


def test_other_models_agree_when_every_output_is_within_the_tolerance() -> None:
    """|b - a| <= atol + rtol * |a| on every value of every output; NaN never agrees."""
    a = {"lm": np.array([[100.0, 0.0]]), "s": np.array([[0.5]])}
    near = {"lm": np.array([[100.0 * (1 + DEFAULT_RTOL / 2), DEFAULT_ATOL / 2]]), "s": a["s"]}
    assert outputs_agree(NONE, a, near)
    far = {"lm": np.array([[100.0 * (1 + 2 * DEFAULT_RTOL), 0.0]]), "s": a["s"]}
    assert not outputs_agree(NONE, a, far)
    assert not outputs_agree(NONE, a, {"lm": a["lm"]})  # an output missing
    assert not outputs_agree(NONE, a, {"lm": np.array([100.0, 0.0]), "s": a["s"]})  # shape
    assert not outputs_agree(NONE, a, {"lm": np.array([[np.nan, 0.0]]), "s": a["s"]})
    assert outputs_agree(DETECTOR, a, a)
    assert agreement_rule(NONE) == "all outputs within rtol=0.01, atol=0.001"
    assert agreement_rule(DETECTOR, rtol=0.1, atol=0) == "all outputs within rtol=0.1, atol=0"


# ---------------------------------------------------------------- input buckets


@pytest.mark.parametrize(
    "dtype",
    ["float16", "float32", "float64", "bool", "uint8", "int8", "uint16", "int16", "int32",
     "int64", "uint32", "uint64"],
)  # fmt: skip
def test_every_numeric_dtype_has_fixed_increasing_bounds(dtype: str) -> None:
    bounds = input_bounds(spec("x", 1, 4, dtype=dtype))
    assert 2 <= len(bounds) <= MAX_INPUT_BUCKETS
    assert list(bounds) == sorted(set(bounds))
    assert bounds == input_bounds(spec("y", 7, dtype=dtype))  # the dtype alone decides


def test_float_inputs_keep_the_wire_buckets_and_ints_split_their_range_evenly() -> None:
    assert input_bounds(spec("x", 1, dtype="float32")) == INPUT_BUCKETS
    u8 = input_bounds(spec("x", 1, dtype="uint8"))
    assert u8 == (31.0, 63.0, 95.0, 127.0, 159.0, 191.0, 223.0, 255.0)
    values = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(histogram_counts(values, u8), [32] * 8)
    i8 = input_bounds(spec("x", 1, dtype="int8"))
    assert i8[0] == -97.0 and i8[-1] == 127.0
    np.testing.assert_array_equal(
        histogram_counts(np.arange(-128, 128, dtype=np.int8), i8), [32] * 8
    )
    assert input_bounds(spec("x", 1, dtype="bool")) == (0.0, 1.0)
    assert input_bounds(spec("x", 1, dtype="int64")) == INTEGER_BUCKETS
    assert input_bounds(spec("x", 1, dtype="string")) == ()


def test_quantized_inputs_bucket_their_raw_integers_and_say_so_in_the_layout() -> None:
    """The buckets do not depend on the quantization; the layout (what compares) does."""
    q = Quantization(scale=(0.0078125,), zero_point=(128,))
    plain, quant = spec("x", 1, dtype="uint8"), spec("x", 1, dtype="uint8", q=q)
    assert input_bounds(plain) == input_bounds(quant)
    assert input_layout(plain) != input_layout(quant)
    assert input_layout(quant).startswith("uint8, q(scale=0.0078125, zero_point=128)")


def test_histogram_counts_are_upper_inclusive_with_the_rest_and_nan_last() -> None:
    values = np.array([-5.0, -3.0, -2.5, 0.0, 3.0, 3.5, np.inf, np.nan])
    want = [2, 1, 0, 0, 1, 0, 0, 0, 1, 3]
    np.testing.assert_array_equal(histogram_counts(values, INPUT_BUCKETS), want)
    assert histogram_counts(np.array([1, 2]), ()).size == 0


@pytest.mark.parametrize(
    ("fixture", "want"),
    [
        ("face_detector", "detector on 'classificators' (threshold 0.5)"),
        ("hand_landmarker", "none"),  # landmarks and presence scores, nothing named a score
        ("wakeword_int8", "none"),  # a lone quantized score [1, 1]
        ("melspectrogram", "none"),  # a dynamic spectrogram [-1, 1, -1, 32]
    ],
)
def test_default_tasks_of_real_third_party_models(
    fixture: str, want: str, request: pytest.FixtureRequest
) -> None:
    """The rule on models nobody here wrote: BlazeFace is a detector, the rest have none."""
    from shared.tflite import read_signature

    assert describe(default_task(read_signature(request.getfixturevalue(fixture)))) == want
