"""Builds real `.tflite` flatbuffers from chosen weights: no TensorFlow needed.

A chain of FULLY_CONNECTED layers (ReLU between them) and an optional SOFTMAX
head, written with the TFLite schema's object API. Tests, the demo and the
benchmarks make their models here, so nothing is downloaded at run time.
Pure: returns bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema


def build_dense_model(
    *,
    input_size: int = 4,
    hidden: Sequence[int] = (8,),
    output_size: int = 3,
    seed: int = 0,
    softmax: bool = True,
    batch: int = 1,
    description: str = "hotswap generated model",
) -> bytes:
    """A float32 MLP `[batch, input_size] -> [batch, output_size]`, seeded random weights.

    Different seeds give different outputs for the same input, which is how tests
    tell versions apart from real inference results. More or wider hidden layers
    make a slower model with the same tensor signature; a larger batch multiplies
    the work per invoke without growing the file (benchmarks).
    """
    rng = np.random.default_rng(seed)
    model = schema.ModelT()
    model.version = 3
    model.description = description.encode()
    model.buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel by convention
    codes = [_opcode(schema.BuiltinOperator.FULLY_CONNECTED)]
    if softmax:
        codes.append(_opcode(schema.BuiltinOperator.SOFTMAX))
    model.operatorCodes = codes

    graph = schema.SubGraphT()
    graph.tensors, graph.operators = [], []

    def tensor(shape: Sequence[int], name: str, data: np.ndarray | None = None) -> int:
        buf = schema.BufferT()
        if data is not None:
            # A uint8 ndarray packs as one vector copy; bytes would pack byte by byte.
            buf.data = np.frombuffer(
                np.ascontiguousarray(data, dtype=np.float32).tobytes(), dtype=np.uint8
            )
        model.buffers.append(buf)
        t = schema.TensorT()
        t.shape, t.type, t.name = list(shape), schema.TensorType.FLOAT32, name.encode()
        t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    current = tensor([batch, input_size], "input")
    graph.inputs = [current]
    width = input_size
    sizes = [*hidden, output_size]
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        weights = rng.standard_normal((size, width)) / np.sqrt(width)
        bias = rng.standard_normal(size) * 0.1
        out = tensor([batch, size], "logits" if last and softmax else f"dense_{i}")
        if last and not softmax:
            graph.tensors[out].name = b"output"
        op = schema.OperatorT()
        op.opcodeIndex = 0
        w_idx = tensor([size, width], f"w{i}", weights)
        op.inputs = [current, w_idx, tensor([size], f"b{i}", bias)]
        op.outputs = [out]
        op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            schema.ActivationFunctionType.NONE if last else schema.ActivationFunctionType.RELU
        )
        op.builtinOptions = options
        graph.operators.append(op)
        current, width = out, size
    if softmax:
        out = tensor([batch, output_size], "output")
        op = schema.OperatorT()
        op.opcodeIndex = 1
        op.inputs, op.outputs = [current], [out]
        op.builtinOptionsType = schema.BuiltinOptions.SoftmaxOptions
        sm = schema.SoftmaxOptionsT()
        sm.beta = 1.0
        op.builtinOptions = sm
        graph.operators.append(op)
        current = out
    graph.outputs = [current]
    model.subgraphs = [graph]

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _opcode(code: int) -> object:
    oc = schema.OperatorCodeT()
    oc.builtinCode = code
    oc.deprecatedBuiltinCode = min(code, 127)
    oc.version = 1
    return oc
