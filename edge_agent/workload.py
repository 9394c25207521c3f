"""A synthetic inference source for demos, simulation and benchmarks.

Runs real inferences through the agent's runtime at a target rate from its own
thread (like an application's camera loop would), with random inputs for every
input of the active model, each of its dtype, shape and value range
(`ModelSlot.sample_inputs`: quantized inputs across their quantized range).
Errors are counted, never raised: the load keeps going across swaps. Does no
I/O besides the inferences.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from edge_agent.runtime import DoubleBufferedRuntime, NoModelError


class SyntheticWorkload:
    def __init__(
        self,
        runtime: DoubleBufferedRuntime,
        infer: Callable[[tuple[np.ndarray, ...]], object],
        *,
        hz: float,
        seed: int = 0,
        name: str = "workload",
    ) -> None:
        if hz <= 0:
            raise ValueError("workload rate must be positive")
        self._runtime = runtime
        self._infer = infer
        self._period = 1.0 / hz
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.completed = 0
        self.failed = 0

    def start(self) -> SyntheticWorkload:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            slot = self._runtime.active
            if slot is not None:
                try:
                    self._infer(slot.sample_inputs(self._rng))
                    self.completed += 1
                except (NoModelError, ValueError, RuntimeError):
                    self.failed += 1
            next_at += self._period
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # fell behind: don't burst to catch up
