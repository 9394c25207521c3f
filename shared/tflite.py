"""The TFLite runtime binding: LiteRT first, tflite_runtime as the fallback.

Loads interpreters from bytes and reads a model's tensor signature. CPU only;
no network or disk I/O (callers read the files).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, cast

import numpy as np

from shared.errors import ModelFormatError
from shared.manifest import TensorSignature, TensorSpec

TFLITE_IDENTIFIER = b"TFL3"


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


def looks_like_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == TFLITE_IDENTIFIER


def make_interpreter(
    data: bytes, *, num_threads: int = 1, default_delegates: bool = True
) -> Interpreter:
    """An allocated interpreter for `data`; ModelFormatError if it is not a model.

    `default_delegates=False` skips XNNPACK: for one-off reads (signatures) where
    speed does not matter, and the delegate's start-up notice on stderr would.
    """
    if not looks_like_tflite(data):
        raise ModelFormatError("not a TFLite flatbuffer (missing 'TFL3' identifier)")
    kwargs: dict[str, Any] = {}
    if not default_delegates:
        kwargs["experimental_op_resolver_type"] = (
            _RUNTIME.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    try:
        interp = _INTERPRETER(model_content=data, num_threads=num_threads, **kwargs)
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
