"""Models loaded from a mapping of their file: same outputs, and unaffected by the file going."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from edge_agent.runtime import DoubleBufferedRuntime, ModelSlot
from shared.messages import ModelRef
from shared.model_builder import build_dense_model
from shared.tflite import uses_c_api

REF = ModelRef(name="m", version="1", sha256="c" * 64)


def mapped(path: Path) -> mmap.mmap:
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def test_a_mapped_model_serves_like_bytes_after_its_file_is_replaced_and_deleted(
    tmp_path: Path,
) -> None:
    """The store replaces files atomically (never writes one in place) and prunes old
    ones: a slot loaded from the mapping keeps serving, and grows, with the outputs of
    the same model loaded from bytes."""
    data = build_dense_model(seed=4, input_size=16, hidden=(32,), output_size=5, batch=2)
    path = tmp_path / "model.tflite"
    path.write_bytes(data)
    slot = ModelSlot.load(REF, mapped(path))
    assert uses_c_api(slot.interpreter)
    from_bytes = ModelSlot.load(REF, data)
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)

    other = tmp_path / "other.tflite"
    other.write_bytes(
        build_dense_model(seed=5, input_size=16, hidden=(32,), output_size=5, batch=2)
    )
    other.replace(path)  # a new file under the same name (the store's os.replace), then
    path.unlink()  # a prune: the mapping still reads the original model
    slot.grow(3)

    rt = DoubleBufferedRuntime()
    rt.activate(slot)
    for _ in range(5):  # several calls: every interpreter of the pool serves some
        np.testing.assert_array_equal(rt.infer(x), from_bytes.run(x))
    assert slot.pool_size == 3
