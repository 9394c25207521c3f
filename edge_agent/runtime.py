"""The double-buffered inference runtime: an active slot, a standby slot, one swap.

Each `ModelSlot` owns a pool of interpreters of one model, each used by one
call at a time (interpreters are not thread-safe). `DoubleBufferedRuntime.infer`
reads the active slot reference once and runs on it, so an inference that started before a swap
finishes on the old interpreter while every later call sees the new one; the
swap itself is a single reference assignment and never waits for inferences.
The previous model stays loaded in the standby slot: rolling back is another
reference swap. CPU work only; no network or disk I/O.

Any tensor layout the interpreter runs: any number of inputs and outputs, every
numeric dtype and bool, quantized or not. A call gives its inputs as one array
(single-input models), a sequence in input order, or a mapping by input name,
and gets its outputs back the same way (see `DoubleBufferedRuntime.infer`).
Every input is checked against the model's signature before it reaches an
interpreter; every output is checked for NaN/inf and for its shape after.

Dynamic dimensions (-1 in the shape signature) take whatever size the caller
gives. Each interpreter of the pool is sized for the input shapes of its last
call: a call with other shapes resizes its inputs and reallocates that
interpreter's tensors first (the Python interpreter: about as long as a few
invokes of the model; calls that keep their shapes pay nothing, calls that
alternate shapes pay it each time they land on an interpreter sized for the
other). Dynamic-shape models run on the Python interpreter (see shared.tflite).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import numpy as np

from shared.errors import HotswapError, ModelFormatError
from shared.manifest import Quantization, TensorSignature, TensorSpec
from shared.messages import ModelRef
from shared.tflite import Interpreter, ModelBytes, make_interpreter, signature_of

# The size a dynamic dimension takes in sample inputs (warm-up, probes, synthetic load)
# until a caller has used the model: 1 for the leading (batch) dimension, this for the
# others (long enough for audio front ends, e.g. a 512-sample FFT window).
DYNAMIC_DIM_SAMPLE = 1024
# Unquantized 32/64-bit integer inputs are ids, indices or lengths: sampled in [0, 16).
WIDE_INT_SAMPLE_HIGH = 16

Shapes = tuple[tuple[int, ...], ...]
Inputs = np.ndarray | Sequence[np.ndarray] | Mapping[str, np.ndarray]
Outputs = np.ndarray | tuple[np.ndarray, ...] | dict[str, np.ndarray]


class NoModelError(HotswapError):
    """An inference was asked for before any model was loaded."""

    reason = "no_model"


@dataclass(frozen=True, slots=True)
class HealthSample:
    """Live inferences of one slot over some span: what the health judge reads."""

    count: int = 0
    errors: int = 0
    nonfinite: int = 0  # inferences with a NaN or inf in any output
    latencies_ms: tuple[float, ...] = ()
    last_at: float = 0.0  # monotonic time of the newest inference
    malformed: int = 0  # inferences with an output of another shape than the signature's
    problem: str | None = None  # the newest bad output, e.g. "output 1 ('scores'): NaN or inf"


@dataclass(frozen=True, slots=True)
class OutputProblem:
    """What is wrong with one call's outputs (the first bad output)."""

    nonfinite: bool  # NaN/inf; otherwise a wrong shape
    detail: str


class SlotStats:
    """Counters of a slot's live inferences (any thread), for health watching."""

    def __init__(self, keep: int = 256) -> None:
        self._lock = threading.Lock()
        self._count = self._errors = self._nonfinite = self._malformed = 0
        self._latencies: deque[float] = deque(maxlen=keep)
        self._last_at = 0.0
        self._problem: str | None = None

    def record(
        self, latency_ms: float, *, failed: bool = False, problem: OutputProblem | None = None
    ) -> None:
        with self._lock:
            self._count += 1
            self._last_at = time.monotonic()
            if failed:
                self._errors += 1
            elif problem is not None:
                if problem.nonfinite:
                    self._nonfinite += 1
                else:
                    self._malformed += 1
                self._problem = problem.detail
            else:
                self._latencies.append(latency_ms)

    def snapshot(self) -> HealthSample:
        with self._lock:
            return HealthSample(
                self._count,
                self._errors,
                self._nonfinite,
                tuple(self._latencies),
                self._last_at,
                self._malformed,
                self._problem,
            )

    def since(self, before: HealthSample) -> HealthSample:
        """What happened after `before` was taken (latencies: the newest ones)."""
        now = self.snapshot()
        fresh = now.count - before.count
        errors = now.errors - before.errors
        nonfinite = now.nonfinite - before.nonfinite
        malformed = now.malformed - before.malformed
        ok = max(0, fresh - errors - nonfinite - malformed)
        return HealthSample(
            fresh,
            errors,
            nonfinite,
            now.latencies_ms[len(now.latencies_ms) - ok :] if ok else (),
            now.last_at,
            malformed,
            now.problem if nonfinite or malformed else None,
        )


@dataclass(frozen=True, slots=True)
class Port:
    """One input or output tensor of a slot's model, as the hot path checks it."""

    side: str  # "input" or "output"
    position: int
    index: int  # the interpreter's tensor index
    spec: TensorSpec
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # the shape signature: -1 where any size goes
    dynamic: bool

    @classmethod
    def of(cls, side: str, position: int, detail: dict[str, Any], spec: TensorSpec) -> Port:
        dtype = np.dtype(detail["dtype"])
        return cls(side, position, int(detail["index"]), spec, dtype, spec.shape, -1 in spec.shape)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def quantization(self) -> Quantization | None:
        return self.spec.quantization

    def fits(self, shape: tuple[int, ...]) -> bool:
        if shape == self.shape:
            return True
        return (
            self.dynamic
            and len(shape) == len(self.shape)
            and all(s == -1 or s == d for s, d in zip(self.shape, shape, strict=True))
        )

    def label(self) -> str:
        return f"{self.side} {self.position} ({self.name!r})"

    def describe(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


class _Pooled:
    """One interpreter of a pool and the input shapes it is allocated for (None: not yet
    for any real shape: a dynamic-shape model before its first call)."""

    __slots__ = ("interp", "shapes")

    def __init__(self, interp: Interpreter, shapes: Shapes | None) -> None:
        self.interp = interp
        self.shapes = shapes


def _ports(
    side: str, details: list[dict[str, Any]], specs: tuple[TensorSpec, ...]
) -> tuple[Port, ...]:
    return tuple(
        Port.of(side, i, d, spec) for i, (d, spec) in enumerate(zip(details, specs, strict=True))
    )


def default_sample_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A concrete shape for a shape signature (see DYNAMIC_DIM_SAMPLE)."""
    return tuple(
        d if d >= 0 else (1 if i == 0 else DYNAMIC_DIM_SAMPLE) for i, d in enumerate(shape)
    )


def sample_tensor(port: Port, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random value for one input, of its dtype and in a range the model expects.

    Floats: N(0, 1). Bool: fair coin. Quantized 8/16-bit integers: uniform over
    the whole integer range, i.e. real values spread over the range the model was
    calibrated for; wider quantized integers: N(0, 1) real values, quantized.
    Unquantized 8/16-bit integers (pixels, PCM samples): the whole range;
    unquantized wider ones (ids, indices, lengths): [0, WIDE_INT_SAMPLE_HIGH).
    """
    dtype = port.dtype
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind not in "iu":
        return np.zeros(shape, dtype)
    info = np.iinfo(dtype)
    q = port.quantization
    if dtype.itemsize <= 2:
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if q is None:
        return rng.integers(0, WIDE_INT_SAMPLE_HIGH, shape, dtype=dtype)
    scale, zero_point = np.array(q.scale), np.array(q.zero_point)
    if scale.size > 1 and len(shape) > q.dimension:  # per channel: one scale per slice
        along = [1] * len(shape)
        along[q.dimension] = scale.size
        scale, zero_point = scale.reshape(along), zero_point.reshape(along)
    values: np.ndarray = np.clip(
        np.rint(rng.standard_normal(shape) / scale) + zero_point, info.min, info.max
    )
    return values.astype(dtype)


@dataclass(eq=False)
class ModelSlot:
    """One loaded model: a pool of interpreters, each used by one call at a time.

    A pool of one behaves like an interpreter behind a lock. `grow` adds
    interpreters of the same model so that that many threads infer in
    parallel; the pool grows after a swap, never in front of it.
    """

    ref: ModelRef
    interpreter: Interpreter
    signature: TensorSignature
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    data: ModelBytes = field(repr=False, default=b"")  # bytes, or a mapping of the file
    num_threads: int = 1
    stats: SlotStats = field(default_factory=SlotStats)
    # Input shapes for sample inputs: the shapes of the newest resize (live traffic's),
    # or the signature's with DYNAMIC_DIM_SAMPLE for its dynamic dimensions.
    sample_shapes: Shapes = ()
    _free: queue.SimpleQueue[_Pooled] = field(default_factory=queue.SimpleQueue)
    _size: int = 1

    def __post_init__(self) -> None:
        self.dynamic = any(p.dynamic for p in self.inputs)
        self._fixed: Shapes | None = None if self.dynamic else tuple(p.shape for p in self.inputs)
        if not self.sample_shapes:
            self.sample_shapes = tuple(default_sample_shape(p.shape) for p in self.inputs)
        self._finite_checked = tuple(p.dtype.kind in "fc" for p in self.outputs)
        # One array in, one array out (the shorthand call) fits this model.
        self.single = len(self.inputs) == 1 and len(self.outputs) == 1
        self._free.put(_Pooled(self.interpreter, self._fixed))

    @classmethod
    def load(cls, ref: ModelRef, data: ModelBytes, *, num_threads: int = 1) -> ModelSlot:
        """Build, allocate and describe an interpreter (ModelFormatError if not a model)."""
        interp = make_interpreter(data, num_threads=num_threads)
        signature = signature_of(interp)
        return cls(
            ref=ref,
            interpreter=interp,
            signature=signature,
            inputs=_ports("input", interp.get_input_details(), signature.inputs),
            outputs=_ports("output", interp.get_output_details(), signature.outputs),
            data=data,
            num_threads=num_threads,
        )

    @property
    def pool_size(self) -> int:
        return self._size

    def grow(self, size: int) -> None:
        """Add interpreters until the pool holds `size` (call from a worker thread).

        Not warmed up: the first interpreter was, and a fresh one's first call is
        no slower than its next ones (measured, LiteRT C API and Python
        interpreter alike), so a warm-up would only be one more full inference
        competing with the live ones while the new model serves on one interpreter.
        (A dynamic-shape model's new interpreters are sized by their first call.)
        """
        while self._size < size:
            interp = make_interpreter(self.data, num_threads=self.num_threads)
            self._size += 1
            self._free.put(_Pooled(interp, self._fixed))

    # ------------------------------------------------------------ calls

    def arrange(self, inputs: Inputs) -> tuple[np.ndarray, ...]:
        """The inputs of one call in input order, from any of the three call forms.

        ValueError when the form does not fit the model (one array for a model
        with several inputs or outputs, a mapping with missing or unknown names).
        """
        if isinstance(inputs, np.ndarray):
            if not self.single:
                raise ValueError(
                    f"{self.ref.ref} takes {self._names(self.inputs)} and gives "
                    f"{self._names(self.outputs)}: call it with a sequence in input order "
                    "or a mapping by input name (one array is for one input, one output)"
                )
            return (inputs,)
        if isinstance(inputs, Mapping):
            missing = [p.name for p in self.inputs if p.name not in inputs]
            unknown = sorted(set(inputs) - {p.name for p in self.inputs})
            if missing or unknown:
                raise ValueError(
                    f"{self.ref.ref} takes inputs {self._names(self.inputs)}: "
                    f"missing {missing}, unknown {unknown}"
                )
            return tuple(inputs[p.name] for p in self.inputs)
        return tuple(inputs)

    def shaped_like(self, inputs: Inputs, outputs: tuple[np.ndarray, ...]) -> Outputs:
        """`outputs` in the form the call gave its inputs in (see `arrange`)."""
        if isinstance(inputs, np.ndarray):
            return outputs[0]
        if isinstance(inputs, Mapping):
            return {p.name: out for p, out in zip(self.outputs, outputs, strict=True)}
        return outputs

    @overload
    def run(self, inputs: np.ndarray) -> np.ndarray: ...
    @overload
    def run(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]: ...
    def run(
        self, inputs: np.ndarray | tuple[np.ndarray, ...]
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """One inference on a free interpreter of this slot (thread-safe): the outputs in
        output order. One array in, one array out: the shorthand of single-input,
        single-output models."""
        if isinstance(inputs, np.ndarray):
            return self._run(self.arrange(inputs))[0]
        return self._run(inputs)

    def _run(self, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        ports = self.inputs
        if len(inputs) != len(ports):
            raise ValueError(
                f"{self.ref.ref} takes {len(ports)} inputs {self._names(ports)}, got {len(inputs)}"
            )
        for port, x in zip(ports, inputs):  # noqa: B905 - the lengths are equal (above)
            if (
                not isinstance(x, np.ndarray)
                or x.dtype != port.dtype
                or (x.shape != port.shape and not port.fits(x.shape))
            ):
                got = f"{x.dtype.name}{list(x.shape)}" if isinstance(x, np.ndarray) else type(x)
                raise ValueError(f"{port.label()} must be {port.describe()}, got {got}")
        pooled = self._free.get()  # waits while every interpreter of the pool is busy
        try:
            interp = pooled.interp
            if self.dynamic:
                shapes = tuple(x.shape for x in inputs)
                if pooled.shapes != shapes:
                    self._resize(pooled, shapes)
            for port, x in zip(ports, inputs):  # noqa: B905 - as above
                interp.set_tensor(port.index, x)
            interp.invoke()
            # Copies: ours to hand out.
            outs = tuple([interp.get_tensor(p.index) for p in self.outputs])
        finally:
            self._free.put(pooled)
        return outs

    def _resize(self, pooled: _Pooled, shapes: Shapes) -> None:
        """Size one interpreter's inputs for `shapes` and reallocate its tensors."""
        interp = pooled.interp
        pooled.shapes = None  # until the allocation succeeded
        for port, shape in zip(self.inputs, shapes, strict=True):
            interp.resize_tensor_input(port.index, shape, strict=True)
        interp.allocate_tensors()
        pooled.shapes = shapes
        self.sample_shapes = shapes  # what callers use: what probes and warm-ups use

    def output_problem(self, outputs: tuple[np.ndarray, ...]) -> OutputProblem | None:
        """The first output of a call that has a NaN/inf or another shape than the
        signature's, or None when every output is sound."""
        for port, out, floating in zip(self.outputs, outputs, self._finite_checked):  # noqa: B905
            if out.shape != port.shape and not port.fits(out.shape):
                return OutputProblem(
                    False, f"{port.label()}: shape {list(out.shape)} instead of {list(port.shape)}"
                )
            if floating and not np.isfinite(out).all():
                return OutputProblem(True, f"{port.label()}: NaN or inf")
        return None

    def sample_inputs(
        self, rng: np.random.Generator, shapes: Shapes | None = None
    ) -> tuple[np.ndarray, ...]:
        """Random inputs of the right dtypes and shapes, one per input (warm-up, health
        probes, synthetic load); see `sample_tensor` for the values."""
        shapes = shapes or self.sample_shapes
        return tuple(sample_tensor(p, s, rng) for p, s in zip(self.inputs, shapes, strict=True))

    def warm_up(
        self, rng: np.random.Generator, runs: int = 1, shapes: Shapes | None = None
    ) -> None:
        """Run the model on sample inputs (of `shapes`, e.g. the served model's, if given).

        A model that loads but does not run (an op LiteRT cannot prepare, sizes it
        cannot take) is a ModelFormatError here, before it can serve.
        """
        for _ in range(runs):
            try:
                self._run(self.sample_inputs(rng, shapes))
            except (RuntimeError, ValueError) as exc:
                raise ModelFormatError(f"{self.ref.ref} loads but does not run: {exc}") from exc

    @staticmethod
    def _names(ports: tuple[Port, ...]) -> str:
        return "[" + ", ".join(repr(p.name) for p in ports) + "]"


class Mirror(Protocol):
    """Takes a copy of each served call (shadow mode); must never block."""

    def offer(
        self, inputs: tuple[np.ndarray, ...], served_outputs: tuple[np.ndarray, ...]
    ) -> None: ...


# (model, latency ms, the outputs in output order or None when the call failed or an
# output was NaN/inf or of the wrong shape, the inputs in input order)
Observer = Callable[[ModelRef, float, tuple[np.ndarray, ...] | None, tuple[np.ndarray, ...]], None]


class DoubleBufferedRuntime:
    """Active + standby slots; `infer` is safe from any number of threads."""

    def __init__(self, observer: Observer | None = None) -> None:
        self._active: ModelSlot | None = None
        self._standby: ModelSlot | None = None
        self._swap_lock = threading.Lock()  # serialises swaps, never inferences
        self._observer = observer
        self.shadow: Mirror | None = None  # a candidate fed copies of the inputs (shadow mode)
        self.swapped_at = 0.0  # perf_counter() of the last swap: from then on, the new model serves

    @property
    def active(self) -> ModelSlot | None:
        return self._active

    @property
    def standby(self) -> ModelSlot | None:
        return self._standby

    @overload
    def infer(self, inputs: np.ndarray) -> np.ndarray: ...
    @overload
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
    @overload
    def infer(self, inputs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]: ...
    def infer(self, inputs: Inputs) -> Outputs:
        """One inference on the active model.

        One array (a single-input, single-output model) gives one array; a
        sequence in input order gives a tuple in output order; a mapping by input
        name gives a dict by output name. ValueError for inputs the model does
        not take; NoModelError before any model is loaded.
        """
        slot = self._active  # one read: the call stays on this slot even if a swap follows
        if slot is None:
            raise NoModelError("no model is loaded yet")
        start = time.perf_counter()
        xs: tuple[np.ndarray, ...] = ()
        single = isinstance(inputs, np.ndarray) and slot.single
        try:
            xs = (inputs,) if isinstance(inputs, np.ndarray) and single else slot.arrange(inputs)
            outs = slot._run(xs)
        except Exception:
            ms = (time.perf_counter() - start) * 1e3
            slot.stats.record(ms, failed=True)
            if self._observer is not None:
                self._observer(slot.ref, ms, None, xs)
            raise
        ms = (time.perf_counter() - start) * 1e3
        problem = slot.output_problem(outs)
        slot.stats.record(ms, problem=problem)
        if self._observer is not None:
            # A non-finite or misshapen output reaches telemetry as an error.
            self._observer(slot.ref, ms, outs if problem is None else None, xs)
        mirror = self.shadow
        if mirror is not None and problem is None:
            mirror.offer(xs, outs)
        return outs[0] if single else slot.shaped_like(inputs, outs)

    def activate(self, slot: ModelSlot) -> ModelSlot | None:
        """Make `slot` active; the old active becomes standby. Returns the old active."""
        with self._swap_lock:
            previous = self._active
            self._active = slot
            self.swapped_at = time.perf_counter()
            if previous is not None and previous is not slot:
                self._standby = previous
            elif self._standby is slot:
                self._standby = None
            return previous

    def stage(self, slot: ModelSlot) -> None:
        """Keep `slot` resident as standby, ready for a switch; the active slot is untouched."""
        with self._swap_lock:
            if slot is not self._active:
                self._standby = slot

    def swap_back(self) -> ModelSlot:
        """Exchange active and standby (rollback without loading anything)."""
        with self._swap_lock:
            if self._standby is None:
                raise NoModelError("no resident previous model to roll back to")
            self._active, self._standby = self._standby, self._active
            self.swapped_at = time.perf_counter()
            return self._active

    def restore(self, active: ModelSlot | None, standby: ModelSlot | None) -> None:
        """Install both slots at once (agent start-up, undoing a failed activation)."""
        with self._swap_lock:
            self._active, self._standby = active, standby
