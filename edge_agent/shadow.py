"""Shadow mode: a candidate model runs on copies of live inputs; its outputs are never served.

`ShadowMirror.offer` is the runtime's `Mirror`: called after each served
inference with its inputs and outputs, it only copies the inputs into a small
queue (full queue: the sample is skipped), so the caller is never delayed. A
thread runs the candidate on them, compares its outputs with the served ones
by the candidate's task (`shared.tasks.outputs_agree`: the same top class for
a classifier, every output within a tolerance for other models, on real
values) and reports (model, latency, outputs, inputs, agreed, rule) until its
deadline passes. Thread work only; no I/O.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from edge_agent.runtime import ModelSlot
from shared.manifest import ModelTask, TensorSignature
from shared.messages import ModelRef
from shared.tasks import agreement_rule, default_task, dequantize, outputs_agree

# (model, latency ms, outputs or None when the call failed or an output was unsound,
# inputs, agreed with the served outputs (None: not compared), the rule it was judged by)
ShadowObserver = Callable[
    [ModelRef, float, tuple[np.ndarray, ...] | None, tuple[np.ndarray, ...], bool | None, str],
    None,
]


def same_top_class(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether every row of two outputs picks the same class."""
    ra = a.reshape(a.shape[0] if a.ndim > 1 else 1, -1)
    rb = b.reshape(b.shape[0] if b.ndim > 1 else 1, -1)
    return ra.shape == rb.shape and bool((ra.argmax(axis=1) == rb.argmax(axis=1)).all())


class ShadowMirror:
    def __init__(
        self,
        slot: ModelSlot,
        *,
        seconds: float,
        observer: ShadowObserver,
        task: ModelTask | None = None,
        served: TensorSignature | None = None,
        on_end: Callable[[ShadowMirror], None] | None = None,
        depth: int = 64,
    ) -> None:
        """`task`: the candidate's (default: the one its signature implies); `served`:
        the signature of the served model (default: the candidate's, the same
        interface), whose quantization reads the served outputs."""
        self.slot = slot
        self.task = task if task is not None else default_task(slot.signature)
        self.deadline = time.monotonic() + seconds
        self.skipped = 0
        theirs = (served or slot.signature).outputs
        mine = slot.signature.outputs
        self._names = tuple(o.name for o in mine)
        self._quant = tuple(o.quantization for o in mine)
        self._served_quant = tuple(o.quantization for o in theirs)
        # Quantized outputs agree within one quantization step (the coarser side's).
        self._steps = {
            name: max([max(q.scale) for q in (a, b) if q is not None], default=0.0)
            for name, a, b in zip(self._names, self._quant, self._served_quant, strict=False)
            if a is not None or b is not None
        }
        self.rule = agreement_rule(self.task, quantized=bool(self._steps))
        self._observer = observer
        self._on_end = on_end
        self._queue: queue.Queue[tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]] = (
            queue.Queue(maxsize=depth)
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"shadow-{slot.ref.ref}", daemon=True
        )

    def start(self) -> ShadowMirror:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def offer(self, inputs: tuple[np.ndarray, ...], served_outputs: tuple[np.ndarray, ...]) -> None:
        """Queue a copy of one served call's inputs with its outputs (never blocks)."""
        try:
            self._queue.put_nowait((tuple([x.copy() for x in inputs]), served_outputs))
        except queue.Full:
            self.skipped += 1  # the shadow is behind: sample, never block the caller

    def agrees(self, served: tuple[np.ndarray, ...], candidate: tuple[np.ndarray, ...]) -> bool:
        """`shared.tasks.outputs_agree` on both calls' real values, by output position."""
        if len(served) != len(candidate) or len(candidate) != len(self._names):
            return False
        if self.task.kind == "classifier":
            # Only the task's output is compared: only it is read.
            i = self._names.index(self.task.output) if self.task.output in self._names else -1
            if i < 0:
                return False
            a = {self._names[i]: dequantize(served[i], self._served_quant[i])}
            b = {self._names[i]: dequantize(candidate[i], self._quant[i])}
            return outputs_agree(self.task, a, b)
        names, quant, served_quant = self._names, self._quant, self._served_quant
        a = {n: dequantize(x, q) for n, x, q in zip(names, served, served_quant, strict=True)}
        b = {n: dequantize(x, q) for n, x, q in zip(names, candidate, quant, strict=True)}
        return outputs_agree(self.task, a, b, steps=self._steps)

    def _loop(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                xs, served = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            try:
                outs = self.slot.run(xs)
            except (RuntimeError, ValueError):
                ms = (time.perf_counter() - t0) * 1e3
                self._observer(self.slot.ref, ms, None, xs, None, self.rule)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            if self.slot.output_problem(outs) is not None:
                self._observer(self.slot.ref, ms, None, xs, None, self.rule)
                continue
            self._observer(self.slot.ref, ms, outs, xs, self.agrees(served, outs), self.rule)
        if self._on_end is not None:
            self._on_end(self)
