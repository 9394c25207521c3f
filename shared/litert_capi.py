"""A ctypes binding to the LiteRT C API shipped in the ai-edge-litert wheel.

Why it exists: the wheel's Python `Interpreter` holds the GIL while it builds
the interpreter and `allocate_tensors()` packs the weights for XNNPACK (a few
milliseconds for a 10 MB model), so every inference thread of the process
stops whenever a model is loaded. ctypes releases the GIL around each foreign
call, so loading (`LiteRtCreateCompiledModel`) and running
(`LiteRtRunCompiledModel`) through the C API in the same wheel's
`libLiteRt.so` never stop the other threads.

`CompiledInterpreter` has the `Interpreter` surface the project uses
(`get_input_details`, `set_tensor`, `invoke`, `get_tensor`, ...) with the
same tensor names, indices, shapes, dtypes, quantization parameters and
signature list as the Python interpreter, for any number of inputs and outputs.
It serves the model's `serving_default` signature where it has one, else its
first (the signature runner of that key, which must run the main subgraph).
Its tensors live in 64-byte aligned numpy arrays handed to LiteRT as
host-memory tensor buffers: `set_tensor` is a copy into the input array,
`invoke` one C call. One CPU thread per model (the C API's default: CPU options, thread count
included, only travel as an opaque TOML payload, not bound here), one call at a
time per interpreter. Fixed shapes only: a model with a dynamic dimension (-1),
an element type without a numpy dtype, block-wise quantization or a served
signature on another subgraph is `UnsupportedModel`, and `shared.tflite` runs
it on the Python interpreter instead.

The C API's ABI has changed between releases (2.3 added the environment to
`LiteRtCreateModelFromBuffer`), so `load_c_api` only binds the releases it was
written and tested against and returns None otherwise, or when the library or
a symbol is missing: callers then use the Python interpreter. Loads a shared
library; no network or disk I/O otherwise.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import mmap
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ai-edge-litert releases (major, minor) whose libLiteRt.so ABI this binding matches.
TESTED_RELEASES = ((2, 3),)
HOST_MEMORY_ALIGNMENT = 64  # LITERT_HOST_MEMORY_BUFFER_ALIGNMENT
_MAX_RANK = 8  # LITERT_TENSOR_MAX_RANK

_STATUS_INVALID_FLATBUFFER = 501
_HW_ACCELERATOR_CPU = 1
_ENV_AUTO_REGISTER_ACCELERATORS = 24  # kLiteRtEnvOptionTagAutoRegisterAccelerators
_ENV_MIN_LOGGER_SEVERITY = 25  # kLiteRtEnvOptionTagMinLoggerSeverity
_ANY_INT = 2  # kLiteRtAnyTypeInt
_SEVERITY_WARNING = 2  # per-model "INFO" lines on stderr would follow every load otherwise
_QUANTIZATION_PER_TENSOR = 1  # LiteRtQuantizationTypeId
_QUANTIZATION_PER_CHANNEL = 2
# The key LiteRT gives the signature it makes up for a model that has none (the Python
# interpreter lists no signature for such a model).
PLACEHOLDER_SIGNATURE = "<placeholder signature>"
SERVING_SIGNATURE = "serving_default"

# LiteRtElementType -> numpy dtype (the values are TfLiteType's).
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.int32),
    3: np.dtype(np.uint8),
    4: np.dtype(np.int64),
    6: np.dtype(np.bool_),
    7: np.dtype(np.int16),
    8: np.dtype(np.complex64),
    9: np.dtype(np.int8),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
    12: np.dtype(np.complex128),
    13: np.dtype(np.uint64),
    16: np.dtype(np.uint32),
    17: np.dtype(np.uint16),
}

_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_SIZE = ctypes.c_size_t


class _Layout(ctypes.Structure):
    _fields_ = (
        ("rank", ctypes.c_uint32, 7),
        ("has_strides", ctypes.c_uint32, 1),
        ("dimensions", ctypes.c_int32 * _MAX_RANK),
        ("strides", ctypes.c_uint32 * _MAX_RANK),
    )


class _RankedTensorType(ctypes.Structure):
    _fields_ = (("element_type", ctypes.c_int), ("layout", _Layout))


class _Any(ctypes.Structure):
    _fields_ = (("type", ctypes.c_int), ("int_value", ctypes.c_int64))


class _EnvOption(ctypes.Structure):
    _fields_ = (("tag", ctypes.c_int), ("value", _Any))


class _PerTensor(ctypes.Structure):
    _fields_ = (("scale", ctypes.c_float), ("zero_point", ctypes.c_int64))


class _PerChannel(ctypes.Structure):
    _fields_ = (
        ("quantized_dimension", ctypes.c_int32),
        ("num_channels", ctypes.c_uint64),
        ("scales", ctypes.POINTER(ctypes.c_float)),
        ("zero_points", ctypes.POINTER(ctypes.c_int64)),
    )


# The header's static_asserts (x86-64 and aarch64): other sizes mean other structs.
_STRUCTS_MATCH = (
    ctypes.sizeof(_RankedTensorType) == 72
    and ctypes.sizeof(_EnvOption) == 24
    and ctypes.sizeof(_PerTensor) == 16
    and ctypes.sizeof(_PerChannel) == 32
)
_NAME = ctypes.POINTER(ctypes.c_char_p)

# name -> (argument types, result type); every one must be exported.
_SIGNATURES: dict[str, tuple[tuple[Any, ...], Any]] = {
    "LiteRtCreateEnvironment": ((ctypes.c_int, _P, _PP), ctypes.c_int),
    "LiteRtCreateModelFromBuffer": ((_P, _P, _SIZE, _PP), ctypes.c_int),
    "LiteRtDestroyModel": ((_P,), None),
    "LiteRtCreateOptions": ((_PP,), ctypes.c_int),
    "LiteRtSetOptionsHardwareAccelerators": ((_P, ctypes.c_int), ctypes.c_int),
    "LiteRtDestroyOptions": ((_P,), None),
    "LiteRtCreateCompiledModel": ((_P, _P, _P, _PP), ctypes.c_int),
    "LiteRtDestroyCompiledModel": ((_P,), None),
    "LiteRtGetNumModelSignatures": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtGetModelSignature": ((_P, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetMainModelSubgraphIndex": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtGetModelSubgraph": ((_P, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetSignatureSubgraph": ((_P, _PP), ctypes.c_int),
    "LiteRtGetNumSubgraphInputs": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtGetSubgraphInput": ((_P, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetNumSubgraphOutputs": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtGetSubgraphOutput": ((_P, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetNumSignatureInputs": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtGetSignatureInputTensorByIndex": ((_P, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetNumSignatureOutputs": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtGetSignatureOutputTensorByIndex": ((_P, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetSignatureKey": ((_P, _NAME), ctypes.c_int),
    "LiteRtGetSignatureInputName": ((_P, _SIZE, _NAME), ctypes.c_int),
    "LiteRtGetSignatureOutputName": ((_P, _SIZE, _NAME), ctypes.c_int),
    "LiteRtGetTensorName": ((_P, _NAME), ctypes.c_int),
    "LiteRtGetTensorIndex": ((_P, ctypes.POINTER(ctypes.c_uint32)), ctypes.c_int),
    "LiteRtGetTensorTypeId": ((_P, ctypes.POINTER(ctypes.c_int)), ctypes.c_int),
    "LiteRtGetRankedTensorType": ((_P, ctypes.POINTER(_RankedTensorType)), ctypes.c_int),
    "LiteRtGetQuantizationTypeId": ((_P, ctypes.POINTER(ctypes.c_int)), ctypes.c_int),
    "LiteRtGetPerTensorQuantization": ((_P, ctypes.POINTER(_PerTensor)), ctypes.c_int),
    "LiteRtGetPerChannelQuantization": ((_P, ctypes.POINTER(_PerChannel)), ctypes.c_int),
    "LiteRtGetCompiledModelInputBufferRequirements": ((_P, _SIZE, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetCompiledModelOutputBufferRequirements": ((_P, _SIZE, _SIZE, _PP), ctypes.c_int),
    "LiteRtGetTensorBufferRequirementsBufferSize": ((_P, ctypes.POINTER(_SIZE)), ctypes.c_int),
    "LiteRtCreateTensorBufferFromHostMemory": (
        (ctypes.POINTER(_RankedTensorType), _P, _SIZE, _P, _PP),
        ctypes.c_int,
    ),
    "LiteRtDestroyTensorBuffer": ((_P,), None),
    "LiteRtRunCompiledModel": ((_P, _SIZE, _SIZE, _PP, _SIZE, _PP), ctypes.c_int),
}


class LiteRtError(RuntimeError):
    """A LiteRT C API call returned an error status."""

    def __init__(self, call: str, status: int) -> None:
        super().__init__(f"{call} failed with LiteRT status {status}")
        self.call = call
        self.status = status

    @property
    def invalid_model(self) -> bool:
        return self.call == "LiteRtCreateModelFromBuffer"


class UnsupportedModel(Exception):  # noqa: N818 - a verdict, not a failure of the call
    """A valid model this binding does not run (dynamic shapes, string tensors, ...)."""


# (scales, zero points, quantized dimension), as the Python interpreter's
# `quantization_parameters` hold them.
QuantizationParameters = tuple[tuple[float, ...], tuple[int, ...], int]


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    index: int  # the tensor's index in the subgraph, as the Python interpreter reports it
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    type_: _RankedTensorType
    quantization: QuantizationParameters | None


def _release(
    api: CApi, compiled: int, model: int, options: int, buffers: list[int], keep: object = None
) -> None:
    """Destroy what one CompiledInterpreter created; `keep` (its bytes and arrays) dies after."""
    # Order matters: the compiled model uses the buffers and the model, the model the bytes.
    if compiled:
        api.fn.LiteRtDestroyCompiledModel(compiled)
    for b in buffers:
        api.fn.LiteRtDestroyTensorBuffer(b)
    if model:
        api.fn.LiteRtDestroyModel(model)
    if options:
        api.fn.LiteRtDestroyOptions(options)


def _aligned(
    shape: tuple[int, ...], dtype: np.dtype[Any], min_bytes: int
) -> tuple[np.ndarray, int]:
    """A zeroed array of `shape` starting on a HOST_MEMORY_ALIGNMENT boundary, and how
    many bytes from its start are allocated (at least `min_bytes`, LiteRT's requirement)."""
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    host_bytes = max(size, min_bytes, 1)
    raw = np.zeros(host_bytes + HOST_MEMORY_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_MEMORY_ALIGNMENT
    # A view: it keeps `raw`, padding included, alive.
    return raw[start : start + size].view(dtype).reshape(shape), host_bytes


class CApi:
    """The bound library and its one LiteRT environment (created on first use)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.fn = library
        for name, (args, res) in _SIGNATURES.items():
            f = getattr(library, name)  # AttributeError when the symbol is missing
            f.argtypes = args
            f.restype = res
        self._env: int | None = None
        self._env_lock = threading.Lock()

    def call(self, name: str, *args: Any) -> None:
        """Call the C function `name`; LiteRtError unless it returns kLiteRtStatusOk."""
        status = getattr(self.fn, name)(*args)
        if status != 0:
            raise LiteRtError(name, status)

    def environment(self) -> int:
        with self._env_lock:
            if self._env is None:
                cpu_only = _Any(_ANY_INT, _HW_ACCELERATOR_CPU)
                quiet = _Any(_ANY_INT, _SEVERITY_WARNING)
                opts = (_EnvOption * 2)(
                    _EnvOption(_ENV_AUTO_REGISTER_ACCELERATORS, cpu_only),
                    _EnvOption(_ENV_MIN_LOGGER_SEVERITY, quiet),
                )
                env = ctypes.c_void_p()
                self.call("LiteRtCreateEnvironment", len(opts), opts, ctypes.byref(env))
                # Lives as long as the process: every compiled model refers to it.
                self._env = int(env.value or 0)
            return self._env

    def compile(self, data: bytes | mmap.mmap) -> CompiledInterpreter:
        """Parse `data` and compile it for the CPU (XNNPACK), without holding the GIL.

        `data` may be a read-only mapping of the model file: LiteRT reads it in
        place, and the interpreter keeps it (like bytes) for as long as it lives.

        LiteRtError when LiteRT refuses the model (`invalid_model` when it is not
        a model at all), UnsupportedModel for a valid model this binding does
        not run.
        """
        return CompiledInterpreter(self, data)


class CompiledInterpreter:
    """One compiled model with its own input/output buffers: the `Interpreter` surface."""

    def __init__(self, api: CApi, data: bytes | mmap.mmap) -> None:
        self._api = api
        call = api.call
        # LiteRT reads the model where it is: bytes directly, a mapping through its address.
        view = data if isinstance(data, bytes) else np.frombuffer(data, np.uint8)
        address = view if isinstance(view, bytes) else view.ctypes.data
        env = api.environment()
        model = ctypes.c_void_p()
        options = ctypes.c_void_p()
        compiled = ctypes.c_void_p()
        buffers: list[int] = []
        # Until the finalizer owns them, a failure releases what was created.
        try:
            call("LiteRtCreateModelFromBuffer", env, address, len(data), ctypes.byref(model))
            served, signature, inputs, outputs, listed = self._describe(int(model.value or 0))
            call("LiteRtCreateOptions", ctypes.byref(options))
            call("LiteRtSetOptionsHardwareAccelerators", options, _HW_ACCELERATOR_CPU)
            call("LiteRtCreateCompiledModel", env, model, options, ctypes.byref(compiled))
            arrays: dict[int, np.ndarray] = {}
            handles: dict[int, int] = {}
            for kind in ("Input", "Output"):
                requirements = f"LiteRtGetCompiledModel{kind}BufferRequirements"
                for pos, t in enumerate(signature[kind]):
                    req = ctypes.c_void_p()
                    call(requirements, compiled, served, pos, ctypes.byref(req))
                    size = ctypes.c_size_t()
                    call("LiteRtGetTensorBufferRequirementsBufferSize", req, ctypes.byref(size))
                    arr, host_bytes = _aligned(t.shape, t.dtype, size.value)
                    buf = ctypes.c_void_p()
                    call(
                        "LiteRtCreateTensorBufferFromHostMemory",
                        ctypes.byref(t.type_), arr.ctypes.data, host_bytes, None, ctypes.byref(buf),
                    )  # fmt: skip
                    buffers.append(int(buf.value or 0))
                    arrays[t.index] = arr
                    handles[t.index] = buffers[-1]
        except BaseException:
            _release(
                api,
                int(compiled.value or 0),
                int(model.value or 0),
                int(options.value or 0),
                buffers,
            )
            raise
        self._inputs, self._outputs = inputs, outputs
        self._signature_list = listed
        self._arrays = arrays
        self._input_arrays = {t.index: arrays[t.index] for t in inputs}
        in_handles = (ctypes.c_void_p * len(signature["Input"]))(
            *(handles[t.index] for t in signature["Input"])
        )
        out_handles = (ctypes.c_void_p * len(signature["Output"]))(
            *(handles[t.index] for t in signature["Output"])
        )
        self._compiled = int(compiled.value or 0)
        # The arguments of every run, converted once (the served signature, all inputs,
        # all outputs).
        self._run_args = (
            ctypes.c_void_p(self._compiled),
            ctypes.c_size_t(served),
            ctypes.c_size_t(len(in_handles)),
            in_handles,
            ctypes.c_size_t(len(out_handles)),
            out_handles,
        )
        self._closed = False
        # The finalizer keeps the bytes and the arrays alive for as long as LiteRT uses them.
        self._finalizer = weakref.finalize(
            self,
            _release,
            api,
            self._compiled,
            int(model.value or 0),
            int(options.value or 0),
            buffers,
            (data, view, arrays),
        )

    def _describe(
        self, model: int
    ) -> tuple[
        int,
        dict[str, list[_Tensor]],
        list[_Tensor],
        list[_Tensor],
        dict[str, dict[str, list[str]]],
    ]:
        """(the served signature's index, its tensors in run order, the main subgraph's
        inputs and outputs in its order, the signature list as the Python interpreter's)."""
        call = self._api.call
        n = ctypes.c_size_t()
        call("LiteRtGetNumModelSignatures", model, ctypes.byref(n))
        if n.value < 1:
            raise UnsupportedModel("the model has no signature")
        listed: dict[str, dict[str, list[str]]] = {}
        handles: list[ctypes.c_void_p] = []
        for i in range(n.value):
            sig = ctypes.c_void_p()
            call("LiteRtGetModelSignature", model, i, ctypes.byref(sig))
            handles.append(sig)
            key = _text(call, "LiteRtGetSignatureKey", sig)
            if key != PLACEHOLDER_SIGNATURE:
                listed[key] = {
                    "inputs": _names(call, sig, "Input"),
                    "outputs": _names(call, sig, "Output"),
                }
        served = list(listed).index(SERVING_SIGNATURE) if SERVING_SIGNATURE in listed else 0
        sig = handles[served]
        sub, main = ctypes.c_void_p(), ctypes.c_void_p()
        call("LiteRtGetSignatureSubgraph", sig, ctypes.byref(sub))
        call("LiteRtGetMainModelSubgraphIndex", model, ctypes.byref(n))
        call("LiteRtGetModelSubgraph", model, n.value, ctypes.byref(main))
        if sub.value != main.value:
            # The Python interpreter describes the main subgraph; this signature runs another.
            raise UnsupportedModel("the served signature does not run the main subgraph")

        def tensors(count_fn: str, get_fn: str, owner: ctypes.c_void_p) -> list[_Tensor]:
            count = ctypes.c_size_t()
            call(count_fn, owner, ctypes.byref(count))
            out = []
            for i in range(count.value):
                t = ctypes.c_void_p()
                call(get_fn, owner, i, ctypes.byref(t))
                out.append(self._tensor(t))
            return out

        by_signature = {
            "Input": tensors(
                "LiteRtGetNumSignatureInputs", "LiteRtGetSignatureInputTensorByIndex", sig
            ),
            "Output": tensors(
                "LiteRtGetNumSignatureOutputs", "LiteRtGetSignatureOutputTensorByIndex", sig
            ),
        }
        inputs = tensors("LiteRtGetNumSubgraphInputs", "LiteRtGetSubgraphInput", main)
        outputs = tensors("LiteRtGetNumSubgraphOutputs", "LiteRtGetSubgraphOutput", main)
        for kind, mine in (("Input", inputs), ("Output", outputs)):
            if sorted(t.index for t in by_signature[kind]) != sorted(t.index for t in mine):
                raise UnsupportedModel(
                    f"the served signature's {kind.lower()}s are not the subgraph's"
                )
        return served, by_signature, inputs, outputs, listed

    def _tensor(self, tensor: ctypes.c_void_p) -> _Tensor:
        call = self._api.call
        label = _text(call, "LiteRtGetTensorName", tensor)
        index = ctypes.c_uint32()
        call("LiteRtGetTensorIndex", tensor, ctypes.byref(index))
        type_id = ctypes.c_int()
        call("LiteRtGetTensorTypeId", tensor, ctypes.byref(type_id))
        if type_id.value != 0:  # kLiteRtRankedTensorType
            raise UnsupportedModel(f"{label}: unranked tensor")
        ranked = _RankedTensorType()
        call("LiteRtGetRankedTensorType", tensor, ctypes.byref(ranked))
        dtype = _DTYPES.get(ranked.element_type)
        shape = tuple(int(d) for d in ranked.layout.dimensions[: ranked.layout.rank])
        if dtype is None:
            raise UnsupportedModel(f"{label}: element type {ranked.element_type}")
        if any(d < 0 for d in shape) or ranked.layout.has_strides:
            raise UnsupportedModel(f"{label}: dynamic or strided shape {shape}")
        return _Tensor(label, int(index.value), shape, dtype, ranked, self._quantization(tensor))

    def _quantization(self, tensor: ctypes.c_void_p) -> QuantizationParameters | None:
        call = self._api.call
        kind = ctypes.c_int()
        call("LiteRtGetQuantizationTypeId", tensor, ctypes.byref(kind))
        if kind.value == _QUANTIZATION_PER_TENSOR:
            one = _PerTensor()
            call("LiteRtGetPerTensorQuantization", tensor, ctypes.byref(one))
            return (float(one.scale),), (int(one.zero_point),), 0
        if kind.value == _QUANTIZATION_PER_CHANNEL:
            many = _PerChannel()
            call("LiteRtGetPerChannelQuantization", tensor, ctypes.byref(many))
            n = int(many.num_channels)
            return (
                tuple(float(many.scales[i]) for i in range(n)),
                tuple(int(many.zero_points[i]) for i in range(n)),
                int(many.quantized_dimension),
            )
        if kind.value != 0:  # block-wise: no Python interpreter field to report it the same way
            raise UnsupportedModel(f"quantization type {kind.value}")
        return None

    # ---- the Interpreter surface

    def allocate_tensors(self) -> None:
        """Nothing to do: compiling allocated everything (kept for the Interpreter API)."""

    def _details(self, tensors: list[_Tensor]) -> list[dict[str, Any]]:
        out = []
        for t in tensors:
            scales, zero_points, dimension = t.quantization or ((), (), 0)
            out.append(
                {
                    "name": t.name,
                    "index": t.index,
                    "shape": np.array(t.shape, dtype=np.int32),
                    "shape_signature": np.array(t.shape, dtype=np.int32),
                    "dtype": t.dtype.type,
                    "quantization": (scales[0], zero_points[0]) if len(scales) == 1 else (0.0, 0),
                    "quantization_parameters": {
                        "scales": np.array(scales, dtype=np.float32),
                        "zero_points": np.array(zero_points, dtype=np.int32),
                        "quantized_dimension": dimension,
                    },
                }
            )
        return out

    def get_input_details(self) -> list[dict[str, Any]]:
        return self._details(self._inputs)

    def get_output_details(self) -> list[dict[str, Any]]:
        return self._details(self._outputs)

    def get_signature_list(self) -> dict[str, dict[str, list[str]]]:
        """The model's signatures: key -> input and output names (none made up by LiteRT)."""
        return {
            k: {side: list(v) for side, v in io.items()} for k, io in self._signature_list.items()
        }

    def resize_tensor_input(self, input_index: int, tensor_size: Any, strict: bool = False) -> None:
        """Only to the shape the input has: this binding takes fixed shapes (see the module)."""
        target = self._input_arrays.get(input_index)
        if target is None:
            raise ValueError(f"tensor {input_index} is not an input of this model")
        if tuple(int(d) for d in tensor_size) != target.shape:
            raise ValueError(
                f"input {input_index} has the fixed shape {list(target.shape)}; "
                f"cannot resize it to {list(tensor_size)}"
            )

    def set_tensor(self, tensor_index: int, value: Any) -> None:
        target = self._input_arrays.get(tensor_index)
        if target is None:
            raise ValueError(f"tensor {tensor_index} is not an input of this model")
        if type(value) is not np.ndarray:
            value = np.asarray(value)
        if value.dtype != target.dtype:
            raise ValueError(
                f"Cannot set tensor: got value of type {value.dtype.name} but expected type "
                f"{target.dtype.name} for input {tensor_index}"
            )
        if value.shape != target.shape:
            raise ValueError(
                f"Cannot set tensor: dimension mismatch, got {list(value.shape)} but expected "
                f"{list(target.shape)} for input {tensor_index}"
            )
        np.copyto(target, value)

    def invoke(self) -> None:
        """Run the model on the inputs set (one C call: other threads keep running)."""
        if self._closed:
            raise RuntimeError("the interpreter was closed")
        status = self._api.fn.LiteRtRunCompiledModel(*self._run_args)
        if status != 0:
            raise LiteRtError("LiteRtRunCompiledModel", status)

    def get_tensor(self, tensor_index: int) -> np.ndarray:
        """A copy of an input or output tensor (like the Python interpreter's)."""
        arr = self._arrays.get(tensor_index)
        if arr is None:
            raise ValueError(f"tensor {tensor_index} is not an input or output of this model")
        return arr.copy()

    def close(self) -> None:
        """Release the compiled model now instead of when it is garbage collected."""
        self._closed = True
        self._finalizer()


def _text(call: Any, fn: str, *args: Any) -> str:
    """The string a LiteRT getter `fn(*args, const char**)` returns (owned by the model)."""
    value = ctypes.c_char_p()
    call(fn, *args, ctypes.byref(value))
    return (value.value or b"").decode("utf-8", "replace")


def _names(call: Any, signature: ctypes.c_void_p, kind: str) -> list[str]:
    """A signature's input (`kind` "Input") or output names, in its order."""
    count = ctypes.c_size_t()
    call(f"LiteRtGetNumSignature{kind}s", signature, ctypes.byref(count))
    return [_text(call, f"LiteRtGetSignature{kind}Name", signature, i) for i in range(count.value)]


def _wheel_library() -> Path | None:
    spec = importlib.util.find_spec("ai_edge_litert")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "libLiteRt.so"
        if candidate.is_file():
            return candidate
    return None


def _tested_release() -> bool:
    try:
        version = importlib.metadata.version("ai-edge-litert")
    except importlib.metadata.PackageNotFoundError:
        return False
    parts = version.split(".")
    try:
        release = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return False
    return release in TESTED_RELEASES


def load_c_api(library: Path | None = None) -> CApi | None:
    """The C API of `library` (default: the installed wheel's), or None where it cannot be used.

    None when the wheel is not a release this binding was tested against (with
    the default library), the library is missing or cannot be opened, or a
    symbol is absent.
    """
    if not _STRUCTS_MATCH:
        return None
    if library is None:
        if not _tested_release():
            return None
        library = _wheel_library()
        if library is None:
            return None
    try:
        return CApi(ctypes.CDLL(str(library)))
    except (OSError, AttributeError):
        return None
