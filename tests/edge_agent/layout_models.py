"""Small real `.tflite` files with chosen tensor layouts, for the layout tests.

Any number of inputs and outputs, every dtype the runtime takes, per-tensor
and per-channel quantization, dynamic dimensions, named signatures (also on a
subgraph other than the main one). Each output is one of a few ops on the
inputs: `copy` (SHAPE + RESHAPE: the input's values, any dtype, any shape),
`sqrt` (NaN for negative inputs), `add` (two inputs). Pure: returns bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

TYPES = {
    "float32": schema.TensorType.FLOAT32,
    "float16": schema.TensorType.FLOAT16,
    "float64": schema.TensorType.FLOAT64,
    "int8": schema.TensorType.INT8,
    "uint8": schema.TensorType.UINT8,
    "int16": schema.TensorType.INT16,
    "int32": schema.TensorType.INT32,
    "int64": schema.TensorType.INT64,
    "bool": schema.TensorType.BOOL,
}


@dataclass(frozen=True)
class T:
    """One tensor: name, dtype, shape signature (-1: dynamic), affine quantization."""

    name: str
    dtype: str = "float32"
    shape: tuple[int, ...] = (1, 4)
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    dimension: int = 0


@dataclass(frozen=True)
class Out:
    """One output: `op` over the inputs at `args`, written to `tensor`."""

    op: str  # "copy", "sqrt" or "add"
    args: tuple[int, ...]
    tensor: T


class _Graph:
    def __init__(self, model: object, buffers: list[object]) -> None:
        self.model = model
        self.buffers = buffers
        self.graph = schema.SubGraphT()
        self.graph.tensors, self.graph.operators = [], []

    def tensor(self, t: T) -> int:
        self.buffers.append(schema.BufferT())
        st = schema.TensorT()
        st.name = t.name.encode()
        st.type = TYPES[t.dtype]
        st.shape = [1 if d < 0 else d for d in t.shape]
        if any(d < 0 for d in t.shape):
            st.shapeSignature = list(t.shape)
        st.buffer = len(self.buffers) - 1
        if t.scale:
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint = list(t.scale), list(t.zero_point)
            q.quantizedDimension = t.dimension
            st.quantization = q
        self.graph.tensors.append(st)
        return len(self.graph.tensors) - 1

    def op(self, code: int, inputs: list[int], outputs: list[int], options: object = None) -> None:
        op = schema.OperatorT()
        op.opcodeIndex = code
        op.inputs, op.outputs = inputs, outputs
        if options is not None:
            kind, value = options
            op.builtinOptionsType, op.builtinOptions = kind, value
        self.graph.operators.append(op)


_CODES = (
    schema.BuiltinOperator.SHAPE,
    schema.BuiltinOperator.RESHAPE,
    schema.BuiltinOperator.SQRT,
    schema.BuiltinOperator.ADD,
)


def _subgraph(model: object, buffers: list[object], inputs: Sequence[T], outputs: Sequence[Out]):  # type: ignore[no-untyped-def]
    g = _Graph(model, buffers)
    ins = [g.tensor(t) for t in inputs]
    outs = []
    for k, out in enumerate(outputs):
        target = g.tensor(out.tensor)
        if out.op == "copy":
            shape = g.tensor(T(f"shape_{k}", "int32", (len(inputs[out.args[0]].shape),)))
            opts = schema.ShapeOptionsT()
            opts.outType = schema.TensorType.INT32
            g.op(0, [ins[out.args[0]]], [shape], (schema.BuiltinOptions.ShapeOptions, opts))
            g.op(1, [ins[out.args[0]], shape], [target])
        elif out.op == "sqrt":
            g.op(2, [ins[out.args[0]]], [target])
        elif out.op == "add":
            opts = schema.AddOptionsT()
            g.op(
                3,
                [ins[out.args[0]], ins[out.args[1]]],
                [target],
                (schema.BuiltinOptions.AddOptions, opts),
            )
        else:
            raise ValueError(out.op)
        outs.append(target)
    g.graph.inputs, g.graph.outputs = ins, outs
    return g.graph, ins, outs


def build_layout_model(
    inputs: Sequence[T],
    outputs: Sequence[Out],
    *,
    signature: str | None = None,
    signature_names: tuple[Sequence[str], Sequence[str]] | None = None,
    serving_subgraph: int = 0,
    extra_signatures: Sequence[str] = (),
) -> bytes:
    """A model with these inputs and outputs.

    `signature`: a SignatureDef of that key over them (names: the tensor names
    unless `signature_names`). `serving_subgraph=1` puts a different subgraph
    first (one float32 [1, 2] input copied out, no signature), so that the
    signature runs a subgraph other than the main one. `extra_signatures`:
    more keys over the same subgraph, listed after `signature`.
    """
    model = schema.ModelT()
    model.version = 3
    model.description = b"hotswap layout test model"
    buffers: list[object] = [schema.BufferT()]
    model.buffers = buffers
    codes = []
    for code in _CODES:
        oc = schema.OperatorCodeT()
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = min(code, 127)
        oc.version = 1
        codes.append(oc)
    model.operatorCodes = codes
    graphs = []
    if serving_subgraph:
        first, _, _ = _subgraph(
            model,
            buffers,
            [T("other_in", "float32", (1, 2))],
            [Out("copy", (0,), T("other_out", "float32", (1, 2)))],
        )
        graphs.append(first)
    graph, ins, outs = _subgraph(model, buffers, inputs, outputs)
    graphs.append(graph)
    model.subgraphs = graphs
    if signature is not None:
        in_names, out_names = signature_names or (
            [t.name for t in inputs],
            [o.tensor.name for o in outputs],
        )
        defs = []
        for key in (signature, *extra_signatures):
            sig = schema.SignatureDefT()
            sig.signatureKey = key
            sig.subgraphIndex = serving_subgraph
            sig.inputs = [_tensor_map(n, i) for n, i in zip(in_names, ins, strict=True)]
            sig.outputs = [_tensor_map(n, i) for n, i in zip(out_names, outs, strict=True)]
            defs.append(sig)
        model.signatureDefs = defs
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_map(name: str, index: int) -> object:
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


def two_input_model(*, width: int = 4) -> bytes:
    """float32 a [1, width] and b [1, width] -> sum [1, width] (a + b) and a_copy (a's values)."""
    a, b = T("a", shape=(1, width)), T("b", shape=(1, width))
    return build_layout_model(
        [a, b],
        [
            Out("add", (0, 1), T("sum", shape=(1, width))),
            Out("copy", (0,), T("a_copy", shape=(1, width))),
        ],
    )


def nan_in_second_output_model() -> bytes:
    """x [1, 4] -> (x, sqrt(x)): the second output is NaN wherever x < 0."""
    x = T("x", shape=(1, 4))
    return build_layout_model(
        [x],
        [Out("copy", (0,), T("x_copy", shape=(1, 4))), Out("sqrt", (0,), T("root", shape=(1, 4)))],
    )


def multi_output_model(*, second: str = "root") -> bytes:
    """x [1, 4] -> (x_copy, `second`): two outputs with x's values (`second` names the
    second, so that a candidate can differ from it)."""
    x = T("x", shape=(1, 4))
    return build_layout_model(
        [x],
        [Out("copy", (0,), T("x_copy", shape=(1, 4))), Out("copy", (0,), T(second, shape=(1, 4)))],
    )


def with_other_weights(data: bytes, *, shift: float = 0.5) -> bytes:
    """`data` with its last float constant (a bias, usually) shifted by `shift`: another
    version of a third-party model, with the same tensor interface and other outputs."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    floats = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16}
    constants = [
        t
        for t in model.subgraphs[0].tensors
        if t.type in floats and model.buffers[t.buffer].data is not None
    ]
    tensor = constants[-1]
    buffer = model.buffers[tensor.buffer]
    values = np.frombuffer(bytes(buffer.data), floats[tensor.type]) + shift
    buffer.data = np.frombuffer(values.astype(floats[tensor.type]).tobytes(), np.uint8)
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
