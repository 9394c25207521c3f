"""What a model's tensors mean to telemetry: its task, its confidence, its input buckets.

The manifest may declare the model's task (`shared.manifest.ModelTask`); when it
does not, `default_task` infers one from the tensor signature by a fixed rule,
so the agent and the controller always agree on what "confidence" is:

1. **classifier**: the model has exactly one output, of a float or quantized
   dtype, whose last dimension is at least 2 and whose other dimensions are 1
   (the first may also be -1, a dynamic batch): `[1, 1000]`, `[-1, 521]`. The
   last axis holds the class scores.
2. **detector** (threshold `DEFAULT_SCORE_THRESHOLD`): otherwise, the first
   float or quantized output whose name contains `score` or `classificator`
   (case-insensitive; `classes` outputs hold indices, not scores), e.g.
   BlazeFace's `classificators [1, 896, 1]`.
3. **none** otherwise (landmarks, regressors, spectrograms, embeddings, a lone
   `[1, 1]` score): no confidence, and the confidence gates say `not applicable`.

A heuristic cannot tell an embedding `[1, 128]` from a 128-class head:
declare `none` in the manifest for those.

Confidence per inference (`confidence_of`), on real values (quantized outputs
are dequantized first):

- classifier: per row of the output (the first axis when it has more than one,
  else the whole output), the top score as a probability; rows that already are
  probabilities (values in [0, 1] summing to 1 within 1e-3, or a quantized
  output whose whole range lies in [0, 1], the TFLite softmax/logistic
  convention) are read as they are, others are logits and get a softmax. The
  mean over the rows.
- detector: every element of the output is one candidate's score; scores are
  probabilities when they all lie in [0, 1] (or the quantized range does),
  else logits and get a sigmoid. The mean of the scores above the threshold;
  none above: no sample (None).
- none: None.

Shadow agreement (`outputs_agree`): classifiers agree when every row picks the
same top class of the task's output; other models when every output has the
same shape and agrees numerically within `DEFAULT_RTOL` / `DEFAULT_ATOL`
(`np.allclose` on real values). `agreement_rule` names the rule for the
telemetry window and the rollout status.

Input drift (`input_bounds`): each input tensor's values are counted on fixed
bucket upper bounds chosen by its dtype alone, so windows from any device
merge. Quantized inputs are bucketed on their raw integers (the quantization is
part of the interface: two models whose inputs quantize differently have
different interfaces, and the controller compares a tensor's histograms only
between equal dtypes and quantizations).

Pure: numpy only, no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from shared.manifest import Manifest, ModelTask, Quantization, TensorSignature, TensorSpec
from shared.messages import INPUT_BUCKETS

DEFAULT_SCORE_THRESHOLD = 0.5
# Shadow agreement of non-classifiers: |candidate - served| <= atol + rtol * |served|.
DEFAULT_RTOL = 1e-2
DEFAULT_ATOL = 1e-3
# What agents before per-task telemetry compared (the top class of the first output);
# windows that name no rule were counted by it.
LEGACY_AGREEMENT_RULE = "same top class of the first output"
# Tolerance of a float row's sum for it to count as a probability distribution.
_DISTRIBUTION_TOLERANCE = 1e-3

_FLOAT_DTYPES = frozenset({"float16", "float32", "float64", "bfloat16"})
_QUANTIZABLE_DTYPES = frozenset({"uint8", "int8", "int16"})
_SCORE_NAME = re.compile(r"score|classificator", re.IGNORECASE)


def _numeric_head(spec: TensorSpec) -> bool:
    """Whether an output can hold scores: float, or an integer type with quantization."""
    return spec.dtype in _FLOAT_DTYPES or (
        spec.dtype in _QUANTIZABLE_DTYPES and spec.quantization is not None
    )


def default_task(signature: TensorSignature) -> ModelTask:
    """The task a signature implies when the manifest declares none (the module's rule)."""
    outputs = signature.outputs
    if len(outputs) == 1:
        (out,) = outputs
        shape = out.shape
        if (
            _numeric_head(out)
            and len(shape) >= 1
            and shape[-1] >= 2
            and all(d == 1 or (i == 0 and d == -1) for i, d in enumerate(shape[:-1]))
        ):
            return ModelTask(kind="classifier", output=out.name)
    for out in outputs:
        if _numeric_head(out) and _SCORE_NAME.search(out.name):
            return ModelTask(
                kind="detector", output=out.name, score_threshold=DEFAULT_SCORE_THRESHOLD
            )
    return ModelTask(kind="none")


def effective_task(manifest: Manifest) -> ModelTask:
    """The manifest's declared task, else the one its signature implies."""
    return manifest.task if manifest.task is not None else default_task(manifest.signature)


def describe(task: ModelTask) -> str:
    """One line: "classifier on 'out'", "detector on 'scores' (threshold 0.5)", "none"."""
    if task.kind == "none":
        return "none"
    text = f"{task.kind} on {task.output!r}"
    if task.kind == "detector":
        text += f" (threshold {task.score_threshold:g})"
    return text


def describe_effective(manifest: Manifest) -> str:
    """`describe` of the effective task, saying whether it was declared or inferred."""
    origin = "declared" if manifest.task is not None else "inferred from the signature"
    return f"{describe(effective_task(manifest))} ({origin})"


def has_confidence(task: ModelTask) -> bool:
    return task.kind != "none"


def task_problem(task: ModelTask, signature: TensorSignature) -> str | None:
    """Why `task` cannot be read from a model with `signature`, or None if it can."""
    if task.kind == "none":
        return None
    spec = next((o for o in signature.outputs if o.name == task.output), None)
    if spec is None:
        names = ", ".join(repr(o.name) for o in signature.outputs)
        return f"the {task.kind} task names output {task.output!r}; the model has {names}"
    if not _numeric_head(spec):
        return f"output {spec.name!r} is {spec.dtype} without quantization: it holds no scores"
    return None


# ---------------------------------------------------------------- reading outputs


def dequantize(
    values: np.ndarray, quantization: Quantization | None, *, leading: int = 0
) -> np.ndarray:
    """Real values (float64) of a tensor: scale * (q - zero_point), per channel if need be.

    `leading` axes are stacked in front of the tensor's own (calls of a batch), so a
    per-channel `dimension` counts from after them.
    """
    real = np.asarray(values, dtype=np.float64)
    if quantization is None:
        return real
    if len(quantization.scale) == 1:
        return quantization.scale[0] * (real - quantization.zero_point[0])
    axis = leading + quantization.dimension
    shape = [1] * real.ndim
    shape[axis] = len(quantization.scale)
    scale = np.asarray(quantization.scale, dtype=np.float64).reshape(shape)
    zero = np.asarray(quantization.zero_point, dtype=np.float64).reshape(shape)
    out: np.ndarray = scale * (real - zero)
    return out


def unit_range(quantization: Quantization | None, dtype: np.dtype[np.generic]) -> bool:
    """Whether every value a quantized tensor can hold lies in [0, 1] (softmax, logistic)."""
    if quantization is None or not np.issubdtype(dtype, np.integer):
        return False
    info = np.iinfo(dtype)  # type: ignore[type-var]
    for scale, zero in zip(quantization.scale, quantization.zero_point, strict=True):
        lo, hi = sorted((scale * (info.min - zero), scale * (info.max - zero)))
        if lo < -1e-9 or hi > 1.0 + 1e-6:
            return False
    return True


def is_distribution(rows: np.ndarray) -> bool:
    """Whether every row (last axis) of real values is a probability distribution."""
    if rows.size == 0:
        return False
    sums = rows.sum(axis=-1)
    return bool(
        rows.min() >= 0.0 and rows.max() <= 1.0 + _DISTRIBUTION_TOLERANCE
        and np.abs(sums - 1.0).max() < _DISTRIBUTION_TOLERANCE
    )  # fmt: skip


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow: clipped where it is 0 or 1 in float64 anyway."""
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))
    return out


def classifier_rows(output: np.ndarray) -> np.ndarray:
    """One inference's output as rows of class scores: its first axis, if it has two."""
    return output.reshape(output.shape[0] if output.ndim > 1 else 1, -1)


def confidence_of(
    task: ModelTask,
    outputs: Mapping[str, np.ndarray],
    quantization: Quantization | None = None,
) -> float | None:
    """One inference's confidence under `task` (the module's rules), or None.

    `outputs` maps output names to the raw arrays of one inference; `quantization`
    is that of the task's output, if it is quantized. None: the task has no
    confidence, its output is missing or empty, or (detector) no score is above
    the threshold.
    """
    if task.kind == "none" or task.output is None or task.output not in outputs:
        return None
    raw = np.asarray(outputs[task.output])
    if raw.size == 0:
        return None
    real = dequantize(raw, quantization)
    unit = unit_range(quantization, raw.dtype)
    if task.kind == "classifier":
        rows = classifier_rows(real)
        if rows.shape[1] == 0:
            return None
        if not (unit or is_distribution(rows)):
            rows = np.exp(rows - rows.max(axis=1, keepdims=True))
            rows = rows / rows.sum(axis=1, keepdims=True)
        return float(rows.max(axis=1).mean())
    scores = real.reshape(-1)
    if not (unit or (scores.min() >= 0.0 and scores.max() <= 1.0)):
        scores = sigmoid(scores)
    threshold = task.score_threshold if task.score_threshold is not None else 0.0
    above = scores[scores > threshold]
    return float(above.mean()) if above.size else None


# ---------------------------------------------------------------- shadow agreement


def agreement_rule(
    task: ModelTask,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    quantized: bool = False,
) -> str:
    """How shadow agreement is counted for a model with `task` (for windows and status).

    `quantized`: the model has quantized outputs, compared on real values with an
    absolute tolerance of at least one quantization step (`outputs_agree`'s `steps`).
    """
    if task.kind == "classifier":
        return f"same top class of {task.output!r}"
    rule = f"all outputs within rtol={rtol:g}, atol={atol:g}"
    return rule + " (or one quantization step)" if quantized else rule


def outputs_agree(
    task: ModelTask,
    served: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    steps: Mapping[str, float] | None = None,
) -> bool:
    """Whether a shadow candidate's outputs agree with the served ones (`agreement_rule`).

    Both map output names to real values (dequantized) of the same inference.
    Classifiers: every row of the task's output picks the same top class. Others:
    the same output names, each of the same shape and `np.allclose` (NaN never
    agrees), with an absolute tolerance of at least `steps[name]` for a quantized
    output (its quantization step: two quantized models rarely round alike).
    """
    if task.kind == "classifier":
        a, b = served.get(task.output or ""), candidate.get(task.output or "")
        if a is None or b is None:
            return False
        ra, rb = classifier_rows(np.asarray(a)), classifier_rows(np.asarray(b))
        return (
            ra.shape == rb.shape
            and ra.size > 0
            and bool((ra.argmax(axis=1) == rb.argmax(axis=1)).all())
        )
    if served.keys() != candidate.keys():
        return False
    for name, a in served.items():
        b = candidate[name]
        tol = max(atol, steps.get(name, 0.0)) if steps else atol
        if np.shape(a) != np.shape(b) or not np.allclose(b, a, rtol=rtol, atol=tol):
            return False
    return True


# ---------------------------------------------------------------- input drift


def _even(lo: int, hi: int, buckets: int) -> tuple[float, ...]:
    """Upper bounds of `buckets` equal integer buckets over lo..hi (inclusive)."""
    width = (hi - lo + 1) // buckets
    return tuple(float(lo + width * (i + 1) - 1) for i in range(buckets))


INTEGER_BUCKETS: tuple[float, ...] = (-1.0, 0.0, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5, math.inf)
_BOUNDS: dict[str, tuple[float, ...]] = {
    "bool": (0.0, 1.0),
    "uint8": _even(0, 255, 8),  # 31, 63, ..., 255
    "int8": _even(-128, 127, 8),  # -97, -65, ..., 127
    "uint16": _even(0, 65535, 8),
    "int16": _even(-32768, 32767, 8),
    # Wide integers are mostly ids, positions, lengths and masks: negatives together,
    # then 0, 1 and one bucket per decade, the last open.
    "int32": INTEGER_BUCKETS,
    "uint32": INTEGER_BUCKETS,
    "int64": INTEGER_BUCKETS,
    "uint64": INTEGER_BUCKETS,
}


def input_bounds(spec: TensorSpec) -> tuple[float, ...]:
    """Bucket upper bounds (inclusive; the last takes the rest) for an input's values.

    By dtype alone (`dtype_bounds`): floats `INPUT_BUCKETS` (NaN in the last
    bucket); bool (0, 1); 8- and 16-bit integers 8 equal buckets over their whole
    range; wider integers `INTEGER_BUCKETS`. Quantized inputs: their raw integers.
    Types with no order (strings, complex): no buckets, `()`.
    """
    return dtype_bounds(spec.dtype)


def dtype_bounds(dtype: str) -> tuple[float, ...]:
    """`input_bounds` of a tensor of this dtype (numpy's name: "float32", "uint8", ...)."""
    if dtype in _FLOAT_DTYPES:
        return INPUT_BUCKETS
    return _BOUNDS.get(dtype, ())


def input_layout(spec: TensorSpec) -> str:
    """What must be equal for two histograms of a tensor to compare: dtype, quantization."""
    quant = spec.quantization.describe() if spec.quantization else "no quantization"
    return f"{spec.dtype}, {quant}"


def signature_bounds(signature: TensorSignature) -> tuple[tuple[float, ...], ...]:
    """`input_bounds` of every input, in input order."""
    return tuple(input_bounds(s) for s in signature.inputs)


def histogram_counts(values: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Counts of `values` per bucket of `bounds` (upper bounds inclusive; NaN and all
    above the last bound in the last bucket). The reference the recorder must match."""
    if not bounds:
        return np.zeros(0, dtype=np.int64)
    flat = np.asarray(values).reshape(-1)
    edges = np.asarray(bounds[:-1], dtype=np.float64)
    idx = np.searchsorted(edges, flat.astype(np.float64), side="left")
    counts: np.ndarray = np.bincount(idx, minlength=len(bounds))
    return counts
