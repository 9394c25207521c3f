"""The TFLite runtime binding: LiteRT first, tflite_runtime as the fallback.

Loads interpreters from bytes and reads a model's tensor signature. Where the
installed LiteRT wheel's C API can be bound (`shared.litert_capi`), models are
compiled and run through it, so loading a model never stops the threads that
are running inferences (the Python interpreter holds the GIL while it packs the
weights); otherwise, and for what the C API path does not take (more than one
CPU thread, dynamic shapes, string tensors, ...), the Python interpreter of
LiteRT or tflite_runtime. Both give the same tensor details and outputs. CPU
only; no network or disk I/O (callers read the files).
"""

from __future__ import annotations

import importlib
import mmap
from typing import Any, Protocol, cast

import numpy as np

from shared import litert_capi
from shared.errors import ModelFormatError
from shared.manifest import TensorSignature, TensorSpec

TFLITE_IDENTIFIER = b"TFL3"
# A model's bytes: in memory, or a read-only mapping of its file (read in place).
ModelBytes = bytes | mmap.mmap


class Interpreter(Protocol):
    """The part of the TFLite interpreter API the project uses."""

    def allocate_tensors(self) -> None: ...
    def invoke(self) -> None: ...
    def get_input_details(self) -> list[dict[str, Any]]: ...
    def get_output_details(self) -> list[dict[str, Any]]: ...
    def set_tensor(self, tensor_index: int, value: Any) -> None: ...
    def get_tensor(self, tensor_index: int) -> Any: ...


def _runtime_module() -> tuple[Any, str]:
    for module, name in (
        ("ai_edge_litert.interpreter", "litert"),
        ("tflite_runtime.interpreter", "tflite_runtime"),
    ):
        try:
            return importlib.import_module(module), name
        except ImportError:
            continue
    raise ImportError(
        "no TFLite runtime: install 'ai-edge-litert' (or 'tflite-runtime' with numpy<2)"
    )


_RUNTIME, RUNTIME_NAME = _runtime_module()
_INTERPRETER = _RUNTIME.Interpreter
# The C API of the LiteRT wheel, None where it cannot be used (see shared.litert_capi).
C_API = litert_capi.load_c_api() if RUNTIME_NAME == "litert" else None


def looks_like_tflite(data: ModelBytes) -> bool:
    return len(data) >= 8 and data[4:8] == TFLITE_IDENTIFIER


def make_interpreter(
    data: ModelBytes, *, num_threads: int = 1, default_delegates: bool = True, c_api: bool = True
) -> Interpreter:
    """An allocated interpreter for `data`; ModelFormatError if it is not a model.

    Compiled through the LiteRT C API when it is available (`C_API`) and takes
    the model, unless `c_api=False`; otherwise the Python interpreter.
    `default_delegates=False` skips XNNPACK: for one-off reads (signatures) where
    speed does not matter, and the delegate's start-up notice on stderr would.
    """
    if not looks_like_tflite(data):
        raise ModelFormatError("not a TFLite flatbuffer (missing 'TFL3' identifier)")
    if c_api and C_API is not None and default_delegates and num_threads == 1:  # c_api_loads
        try:
            return C_API.compile(data)
        except litert_capi.LiteRtError as exc:
            if exc.invalid_model:
                raise ModelFormatError(f"LiteRT refused the model: {exc}") from exc
            # Parsed but not compiled: the Python interpreter says why, or runs it.
        except litert_capi.UnsupportedModel:
            pass  # a valid model the C API path does not take: the Python interpreter runs it
    return _binding_interpreter(data, num_threads=num_threads, default_delegates=default_delegates)


def c_api_loads(*, num_threads: int = 1) -> bool:
    """Whether `make_interpreter` would compile through the LiteRT C API, which reads a
    mapped file in place (the Python binding copies anything that is not `bytes`)."""
    return C_API is not None and num_threads == 1


def uses_c_api(interp: Interpreter) -> bool:
    """Whether `interp` runs through the LiteRT C API (loads and invokes without the GIL)."""
    return isinstance(interp, litert_capi.CompiledInterpreter)


def _binding_interpreter(
    data: ModelBytes, *, num_threads: int, default_delegates: bool
) -> Interpreter:
    kwargs: dict[str, Any] = {}
    if not default_delegates:
        kwargs["experimental_op_resolver_type"] = (
            _RUNTIME.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    try:
        content = data if isinstance(data, bytes) else bytes(data)  # it takes bytes only
        interp = _INTERPRETER(model_content=content, num_threads=num_threads, **kwargs)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"the TFLite interpreter refused the model: {exc}") from exc
    return cast(Interpreter, interp)


def _specs(details: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=np.dtype(d["dtype"]).name,
        )
        for d in details
    )


def signature_of(interp: Interpreter) -> TensorSignature:
    return TensorSignature(
        inputs=_specs(interp.get_input_details()), outputs=_specs(interp.get_output_details())
    )


def read_signature(data: bytes) -> TensorSignature:
    """The tensor signature of a model file (loads it once in a throwaway interpreter)."""
    return signature_of(make_interpreter(data, default_delegates=False))
