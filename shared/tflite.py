"""The TFLite runtime binding: LiteRT first, tflite_runtime as the fallback.

Loads interpreters from bytes and reads a model's tensor signature: every input
and output with its shape signature (-1: a dimension sized by the caller),
dtype and quantization, and the model's signature keys. Where the installed
LiteRT wheel's C API can be bound (`shared.litert_capi`), models are compiled
and run through it, so loading a model never stops the threads that are
running inferences (the Python interpreter holds the GIL while it packs the
weights); otherwise, and for what the C API path does not take (more than one
CPU thread, dynamic shapes, string tensors, ...), the Python interpreter of
LiteRT or tflite_runtime. Both give the same tensor details and outputs.

A model is served through one entry point: its `serving_default` signature if
it has one, else its first signature, else its main subgraph. Where that
signature runs the main subgraph (nearly always), `invoke` on the interpreter
is its signature runner; otherwise the Python interpreter serves the
signature's own subgraph (`_SignatureInterpreter`). A model with a dynamic
input is not allocated here when its placeholder sizes (usually 1) cannot be
allocated: the caller resizes it to real shapes first (`ModelSlot` does, on
first use). CPU only; no network or disk I/O (callers read the files).
"""

from __future__ import annotations

import importlib
import mmap
from typing import Any, Protocol, cast

import numpy as np

from shared import litert_capi
from shared.errors import ModelFormatError
from shared.manifest import Quantization, TensorSignature, TensorSpec

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
    def resize_tensor_input(
        self, input_index: int, tensor_size: Any, strict: bool = False
    ) -> None: ...
    def get_signature_list(self) -> dict[str, dict[str, list[str]]]: ...


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
    if (
        c_api
        and C_API is not None
        and default_delegates
        and num_threads == 1  # c_api_loads
        and not _declares_dynamic_shapes(data)
    ):
        try:
            return C_API.compile(data)
        except litert_capi.LiteRtError as exc:
            if exc.invalid_model:
                raise ModelFormatError(f"LiteRT refused the model: {exc}") from exc
            # Parsed but not compiled: the Python interpreter says why, or runs it.
        except litert_capi.UnsupportedModel:
            pass  # a valid model the C API path does not take: the Python interpreter runs it
    return _binding_interpreter(data, num_threads=num_threads, default_delegates=default_delegates)


def _declares_dynamic_shapes(data: ModelBytes) -> bool:
    """Whether the main subgraph's inputs or outputs have a -1 in their shape signature.

    The C API reports such a tensor at its placeholder size (1), and this binding
    cannot resize it: the Python interpreter runs it. A few field reads of the
    flatbuffer, no copy; a file too damaged to read them is left to LiteRT's parser.
    """
    from ai_edge_litert import schema_py_generated as schema  # only where C_API is bound

    try:
        graph = schema.Model.GetRootAs(data, 0).Subgraphs(0)
        if graph is None:
            return False
        ends = [graph.Inputs(i) for i in range(graph.InputsLength())]
        ends += [graph.Outputs(i) for i in range(graph.OutputsLength())]
        for index in ends:
            tensor = graph.Tensors(index)
            if tensor is not None and any(
                tensor.ShapeSignature(d) < 0 for d in range(tensor.ShapeSignatureLength())
            ):
                return True
    except Exception:  # damaged bytes: LiteRT's own parser says why
        return False
    return False


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
    except (ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"the TFLite interpreter refused the model: {exc}") from exc
    served: Interpreter = cast(Interpreter, interp)
    key = serving_signature(served)
    if key is not None and _signature_subgraph(interp, key) != 0:
        served = _SignatureInterpreter(interp, key)
    try:
        served.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        if not has_dynamic_inputs(served):
            raise ModelFormatError(f"the TFLite interpreter refused the model: {exc}") from exc
        # Its placeholder sizes do not run (an audio frame of 1 sample, say): allocated
        # when it is resized to the shapes it is called with.
    return served


def serving_signature(interp: Interpreter) -> str | None:
    """The signature a model is served through: `serving_default`, else the first one."""
    keys = list(interp.get_signature_list())
    if litert_capi.SERVING_SIGNATURE in keys:
        return litert_capi.SERVING_SIGNATURE
    return keys[0] if keys else None


def _signature_subgraph(interp: Any, key: str) -> int:
    """The subgraph a signature runs (0 where the binding predates signature runners).

    No reference to the wrapper outlives the call: the Python interpreter refuses to
    allocate or resize while anything else holds it.
    """
    if not hasattr(interp._interpreter, "GetSubgraphIndexFromSignature"):
        return 0
    return int(interp._interpreter.GetSubgraphIndexFromSignature(key))


def has_dynamic_inputs(interp: Interpreter) -> bool:
    return any(-1 in d["shape_signature"] for d in interp.get_input_details())


class _SignatureInterpreter:
    """The `Interpreter` surface of one signature runner of the Python interpreter, for a
    served signature that runs another subgraph than the main one (all `invoke` runs).

    The public `SignatureRunner` resizes and reallocates on every call; this one
    drives the same subgraph through the same wrapper calls, allocating only
    when asked to (after a resize), like the interpreter itself.
    """

    def __init__(self, interp: Any, key: str) -> None:
        self._interp = interp
        self._wrapper = interp._interpreter
        self._subgraph = int(self._wrapper.GetSubgraphIndexFromSignature(key))
        runner = interp.get_signature_runner(key)
        self._input_indices = [int(d["index"]) for d in runner.get_input_details().values()]
        self._output_indices = [int(d["index"]) for d in runner.get_output_details().values()]

    def allocate_tensors(self) -> None:
        self._wrapper.AllocateTensors(self._subgraph)

    def invoke(self) -> None:
        self._wrapper.Invoke(self._subgraph)

    def _details(self, indices: list[int]) -> list[dict[str, Any]]:
        return [self._interp._get_tensor_details(i, self._subgraph) for i in indices]

    def get_input_details(self) -> list[dict[str, Any]]:
        return self._details(self._input_indices)

    def get_output_details(self) -> list[dict[str, Any]]:
        return self._details(self._output_indices)

    def set_tensor(self, tensor_index: int, value: Any) -> None:
        self._wrapper.SetTensor(tensor_index, value, self._subgraph)

    def get_tensor(self, tensor_index: int) -> Any:
        return self._wrapper.GetTensor(tensor_index, self._subgraph)

    def resize_tensor_input(self, input_index: int, tensor_size: Any, strict: bool = False) -> None:
        shape = np.array(tensor_size, dtype=np.int32)
        self._wrapper.ResizeInputTensor(input_index, shape, strict, self._subgraph)

    def get_signature_list(self) -> dict[str, dict[str, list[str]]]:
        listed: dict[str, dict[str, list[str]]] = self._interp.get_signature_list()
        return listed


def quantization_of(detail: dict[str, Any]) -> Quantization | None:
    """A tensor's affine quantization from its details; None when it has no scale."""
    params = detail.get("quantization_parameters") or {}
    scales = [float(v) for v in params.get("scales", ())]
    if not scales:
        return None
    return Quantization(
        scale=tuple(scales),
        zero_point=tuple(int(v) for v in params.get("zero_points", ())),
        dimension=int(params.get("quantized_dimension", 0)),
    )


def _specs(details: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d.get("shape_signature", d["shape"])),
            dtype=np.dtype(d["dtype"]).name,
            quantization=quantization_of(d),
        )
        for d in details
    )


def signature_of(interp: Interpreter) -> TensorSignature:
    """Every input and output of the served entry point, and the model's signature keys
    (in the file's order, as both bindings list them)."""
    return TensorSignature(
        inputs=_specs(interp.get_input_details()),
        outputs=_specs(interp.get_output_details()),
        signature_keys=tuple(interp.get_signature_list()),
    )


def read_signature(data: bytes) -> TensorSignature:
    """The tensor signature of a model file (loads it once in a throwaway interpreter)."""
    return signature_of(make_interpreter(data, default_delegates=False))
