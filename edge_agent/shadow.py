"""Shadow mode: a candidate model runs on copies of live inputs; its outputs are never served.

`ShadowMirror.offer` is called after each served inference and only copies the
input into a small queue (full queue: the sample is skipped), so the caller is
never delayed. A thread runs the candidate on it, compares its top class with
the served output's, and reports (model, latency, output, input, agreed) until
its deadline passes. Thread work only; no I/O.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from edge_agent.runtime import ModelSlot
from shared.messages import ModelRef

ShadowObserver = Callable[[ModelRef, float, np.ndarray | None, np.ndarray, bool | None], None]


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
        on_end: Callable[[ShadowMirror], None] | None = None,
        depth: int = 64,
    ) -> None:
        self.slot = slot
        self.deadline = time.monotonic() + seconds
        self.skipped = 0
        self._observer = observer
        self._on_end = on_end
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray]] = queue.Queue(maxsize=depth)
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

    def offer(self, x: np.ndarray, served: np.ndarray) -> None:
        try:
            self._queue.put_nowait((x.copy(), served))
        except queue.Full:
            self.skipped += 1  # the shadow is behind: sample, never block the caller

    def _loop(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                x, served = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            try:
                out = self.slot.run(x)
            except (RuntimeError, ValueError):
                self._observer(self.slot.ref, (time.perf_counter() - t0) * 1e3, None, x, None)
                continue
            ms = (time.perf_counter() - t0) * 1e3
            finite = bool(np.isfinite(out).all())
            agreed = same_top_class(out, served) if finite else None
            self._observer(self.slot.ref, ms, out if finite else None, x, agreed)
        if self._on_end is not None:
            self._on_end(self)
