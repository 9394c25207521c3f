"""The double-buffered inference runtime: an active slot, a standby slot, one swap.

Each `ModelSlot` owns a pool of interpreters of one model, each used by one
call at a time (interpreters are not thread-safe). `DoubleBufferedRuntime.infer`
reads the active slot reference once and runs on it, so an inference that started before a swap
finishes on the old interpreter while every later call sees the new one; the
swap itself is a single reference assignment and never waits for inferences.
The previous model stays loaded in the standby slot: rolling back is another
reference swap. CPU work only; no network or disk I/O.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shared.errors import CompatibilityError, HotswapError
from shared.manifest import TensorSignature
from shared.messages import ModelRef
from shared.tflite import Interpreter, ModelBytes, make_interpreter, signature_of


class NoModelError(HotswapError):
    """An inference was asked for before any model was loaded."""

    reason = "no_model"


@dataclass(frozen=True, slots=True)
class Inference:
    """What one call produced, for telemetry."""

    ref: ModelRef
    output: np.ndarray
    latency_ms: float


@dataclass(frozen=True, slots=True)
class HealthSample:
    """Live inferences of one slot over some span: what the health judge reads."""

    count: int = 0
    errors: int = 0
    nonfinite: int = 0
    latencies_ms: tuple[float, ...] = ()
    last_at: float = 0.0  # monotonic time of the newest inference


class SlotStats:
    """Counters of a slot's live inferences (any thread), for health watching."""

    def __init__(self, keep: int = 256) -> None:
        self._lock = threading.Lock()
        self._count = self._errors = self._nonfinite = 0
        self._latencies: deque[float] = deque(maxlen=keep)
        self._last_at = 0.0

    def record(self, latency_ms: float, *, failed: bool = False, finite: bool = True) -> None:
        with self._lock:
            self._count += 1
            self._last_at = time.monotonic()
            if failed:
                self._errors += 1
            elif not finite:
                self._nonfinite += 1
            else:
                self._latencies.append(latency_ms)

    def snapshot(self) -> HealthSample:
        with self._lock:
            return HealthSample(
                self._count, self._errors, self._nonfinite, tuple(self._latencies), self._last_at
            )

    def since(self, before: HealthSample) -> HealthSample:
        """What happened after `before` was taken (latencies: the newest ones)."""
        now = self.snapshot()
        fresh = now.count - before.count
        ok = max(0, fresh - (now.errors - before.errors) - (now.nonfinite - before.nonfinite))
        return HealthSample(
            fresh,
            now.errors - before.errors,
            now.nonfinite - before.nonfinite,
            now.latencies_ms[len(now.latencies_ms) - ok :] if ok else (),
            now.last_at,
        )


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
    input_index: int
    output_index: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype[Any]
    data: ModelBytes = field(repr=False, default=b"")  # bytes, or a mapping of the file
    num_threads: int = 1
    stats: SlotStats = field(default_factory=SlotStats)
    _free: queue.SimpleQueue[Interpreter] = field(default_factory=queue.SimpleQueue)
    _size: int = 1

    def __post_init__(self) -> None:
        self._free.put(self.interpreter)

    @classmethod
    def load(cls, ref: ModelRef, data: ModelBytes, *, num_threads: int = 1) -> ModelSlot:
        """Build, allocate and describe an interpreter (ModelFormatError if not a model)."""
        interp = make_interpreter(data, num_threads=num_threads)
        inputs = interp.get_input_details()
        outputs = interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            # The runtime's call API is one tensor in, one tensor out.
            raise CompatibilityError(
                f"models with {len(inputs)} inputs and {len(outputs)} outputs are not supported"
            )
        return cls(
            ref=ref,
            interpreter=interp,
            signature=signature_of(interp),
            input_index=int(inputs[0]["index"]),
            output_index=int(outputs[0]["index"]),
            input_shape=tuple(int(d) for d in inputs[0]["shape"]),
            input_dtype=np.dtype(inputs[0]["dtype"]),
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
        """
        while self._size < size:
            interp = make_interpreter(self.data, num_threads=self.num_threads)
            self._size += 1
            self._free.put(interp)

    def run(self, x: np.ndarray) -> np.ndarray:
        """One inference on a free interpreter of this slot (thread-safe)."""
        if x.shape != self.input_shape or x.dtype != self.input_dtype:
            raise ValueError(
                f"input must be {self.input_dtype.name}{list(self.input_shape)}, "
                f"got {x.dtype.name}{list(x.shape)}"
            )
        interp = self._free.get()  # waits while every interpreter of the pool is busy
        try:
            interp.set_tensor(self.input_index, x)
            interp.invoke()
            out: np.ndarray = interp.get_tensor(self.output_index)  # a copy: ours to hand out
        finally:
            self._free.put(interp)
        return out

    def sample_input(self, rng: np.random.Generator) -> np.ndarray:
        """A random input of the right shape and type (warm-up, health probes, load)."""
        if np.issubdtype(self.input_dtype, np.floating):
            return rng.standard_normal(self.input_shape).astype(self.input_dtype)
        info = np.iinfo(self.input_dtype)
        return rng.integers(info.min, info.max, self.input_shape, dtype=self.input_dtype)

    def warm_up(self, rng: np.random.Generator, runs: int = 1) -> None:
        for _ in range(runs):
            self.run(self.sample_input(rng))


class Mirror(Protocol):
    """Takes a copy of each served call (shadow mode); must never block."""

    def offer(self, x: np.ndarray, served: np.ndarray) -> None: ...


# (model, latency ms, output or None when the call failed or gave NaN/inf, input)
Observer = Callable[[ModelRef, float, np.ndarray | None, np.ndarray], None]


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

    def infer(self, x: np.ndarray) -> np.ndarray:
        slot = self._active  # one read: the call stays on this slot even if a swap follows
        if slot is None:
            raise NoModelError("no model is loaded yet")
        start = time.perf_counter()
        try:
            out = slot.run(x)
        except Exception:
            ms = (time.perf_counter() - start) * 1e3
            slot.stats.record(ms, failed=True)
            if self._observer is not None:
                self._observer(slot.ref, ms, None, x)
            raise
        ms = (time.perf_counter() - start) * 1e3
        finite = bool(np.isfinite(out).all())
        slot.stats.record(ms, finite=finite)
        if self._observer is not None:
            # A non-finite output reaches telemetry as an error.
            self._observer(slot.ref, ms, out if finite else None, x)
        mirror = self.shadow
        if mirror is not None and finite:
            mirror.offer(x, out)
        return out

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
