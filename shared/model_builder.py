"""Builds real `.tflite` flatbuffers from chosen weights: no TensorFlow needed.

FULLY_CONNECTED layers (ReLU between them) with an optional SOFTMAX head,
written with the TFLite schema's object API: a one-input MLP
(`build_dense_model`), a model with two inputs and two outputs
(`build_two_input_model`) and an int8-in, uint8-out quantized one
(`build_quantized_model`). Tests, the demo and the benchmarks make their models
here, so nothing is downloaded at run time. Pure: returns bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema


class _GraphWriter:
    """One model with one subgraph under construction: tensors, their buffers, operators."""

    def __init__(self, description: str) -> None:
        self.model = schema.ModelT()
        self.model.version = 3
        self.model.description = description.encode()
        self.model.buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel by convention
        self.model.operatorCodes = []
        self.graph = schema.SubGraphT()
        self.graph.tensors, self.graph.operators = [], []
        self._opcodes: dict[int, int] = {}

    def tensor(
        self,
        shape: Sequence[int],
        name: str,
        data: np.ndarray | None = None,
        *,
        dtype: int = schema.TensorType.FLOAT32,
        scale: float | None = None,
        zero_point: int = 0,
    ) -> int:
        """A tensor (constant when `data` is given, as float32); its index."""
        buf = schema.BufferT()
        if data is not None:
            # A uint8 ndarray packs as one vector copy; bytes would pack byte by byte.
            buf.data = np.frombuffer(
                np.ascontiguousarray(data, dtype=np.float32).tobytes(), dtype=np.uint8
            )
        self.model.buffers.append(buf)
        t = schema.TensorT()
        t.shape, t.type, t.name = list(shape), dtype, name.encode()
        t.buffer = len(self.model.buffers) - 1
        if scale is not None:
            t.quantization = schema.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [scale], [zero_point]
        self.graph.tensors.append(t)
        return len(self.graph.tensors) - 1

    def rename(self, index: int, name: str) -> None:
        self.graph.tensors[index].name = name.encode()

    def op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int = schema.BuiltinOptions.NONE,
        options: object = None,
    ) -> None:
        if code not in self._opcodes:
            self._opcodes[code] = len(self.model.operatorCodes)
            self.model.operatorCodes.append(_opcode(code))
        op = schema.OperatorT()
        op.opcodeIndex = self._opcodes[code]
        op.inputs, op.outputs = list(inputs), list(outputs)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        self.graph.operators.append(op)

    def dense(
        self, rng: np.random.Generator, x: int, width: int, out: int, size: int, *, relu: bool
    ) -> None:
        """`out = x @ W.T + b` with seeded weights `W` [size, width], ReLU if `relu`."""
        weights = rng.standard_normal((size, width)) / np.sqrt(width)
        bias = rng.standard_normal(size) * 0.1
        i = len(self.graph.operators)
        w_idx = self.tensor([size, width], f"w{i}", weights)
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = (
            schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
        )
        self.op(
            schema.BuiltinOperator.FULLY_CONNECTED,
            [x, w_idx, self.tensor([size], f"b{i}", bias)],
            [out],
            schema.BuiltinOptions.FullyConnectedOptions,
            options,
        )

    def softmax(self, x: int, out: int) -> None:
        options = schema.SoftmaxOptionsT()
        options.beta = 1.0
        self.op(
            schema.BuiltinOperator.SOFTMAX,
            [x],
            [out],
            schema.BuiltinOptions.SoftmaxOptions,
            options,
        )

    def finish(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        self.graph.inputs, self.graph.outputs = list(inputs), list(outputs)
        self.model.subgraphs = [self.graph]
        builder = flatbuffers.Builder(1024)
        builder.Finish(self.model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


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
    g = _GraphWriter(description)
    current = g.tensor([batch, input_size], "input")
    first = current
    width = input_size
    sizes = [*hidden, output_size]
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        out = g.tensor([batch, size], "logits" if last and softmax else f"dense_{i}")
        if last and not softmax:
            g.rename(out, "output")
        g.dense(rng, current, width, out, size, relu=not last)
        current, width = out, size
    if softmax:
        out = g.tensor([batch, output_size], "output")
        g.softmax(current, out)
        current = out
    return g.finish([first], [current])


def build_two_input_model(
    *,
    features: int = 4,
    context: int = 2,
    hidden: int = 8,
    classes: int = 3,
    regression: int = 2,
    seed: int = 0,
    description: str = "hotswap generated two-input model",
) -> bytes:
    """Two float32 inputs, two float32 outputs, seeded random weights.

    `features` [1, features] and `context` [1, context] each go through a
    FULLY_CONNECTED layer; their sum (ADD, ReLU) feeds two heads: `scores`
    [1, classes] (softmax: a classifier's output) and `regression`
    [1, regression] (plain values). The inputs differ in size and the outputs in
    meaning, so a caller that mixes them up is caught.
    """
    rng = np.random.default_rng(seed)
    g = _GraphWriter(description)
    x_features = g.tensor([1, features], "features")
    x_context = g.tensor([1, context], "context")
    from_features = g.tensor([1, hidden], "from_features")
    g.dense(rng, x_features, features, from_features, hidden, relu=False)
    from_context = g.tensor([1, hidden], "from_context")
    g.dense(rng, x_context, context, from_context, hidden, relu=False)
    joined = g.tensor([1, hidden], "joined")
    add = schema.AddOptionsT()
    add.fusedActivationFunction = schema.ActivationFunctionType.RELU
    g.op(
        schema.BuiltinOperator.ADD,
        [from_features, from_context],
        [joined],
        schema.BuiltinOptions.AddOptions,
        add,
    )
    logits = g.tensor([1, classes], "logits")
    g.dense(rng, joined, hidden, logits, classes, relu=False)
    scores = g.tensor([1, classes], "scores")
    g.softmax(logits, scores)
    values = g.tensor([1, regression], "regression")
    g.dense(rng, joined, hidden, values, regression, relu=False)
    return g.finish([x_features, x_context], [scores, values])


# Input: real = INPUT_SCALE * (q - INPUT_ZERO_POINT), q in int8: about [-8, 8).
INPUT_SCALE, INPUT_ZERO_POINT = 1 / 16, 0
# Output: probabilities as uint8 steps of 1/256, as quantized classifiers report them.
OUTPUT_SCALE, OUTPUT_ZERO_POINT = 1 / 256, 0


def build_quantized_model(
    *,
    input_size: int = 4,
    hidden: Sequence[int] = (8,),
    output_size: int = 3,
    seed: int = 0,
    description: str = "hotswap generated quantized model",
) -> bytes:
    """An int8-in, uint8-out classifier `[1, input_size] -> [1, output_size]`.

    The input is int8 with `INPUT_SCALE` / `INPUT_ZERO_POINT`, DEQUANTIZEd into a
    float MLP with a softmax head, whose probabilities are QUANTIZEd to uint8 with
    `OUTPUT_SCALE` / `OUTPUT_ZERO_POINT`: the interface of a fully quantized
    model, with the weights kept in float32 (file size does not matter here).
    """
    rng = np.random.default_rng(seed)
    g = _GraphWriter(description)
    q_in = g.tensor(
        [1, input_size],
        "input",
        dtype=schema.TensorType.INT8,
        scale=INPUT_SCALE,
        zero_point=INPUT_ZERO_POINT,
    )
    current = g.tensor([1, input_size], "dequantized")
    g.op(schema.BuiltinOperator.DEQUANTIZE, [q_in], [current])
    width = input_size
    sizes = [*hidden, output_size]
    for i, size in enumerate(sizes):
        last = i == len(sizes) - 1
        out = g.tensor([1, size], "logits" if last else f"dense_{i}")
        g.dense(rng, current, width, out, size, relu=not last)
        current, width = out, size
    probabilities = g.tensor([1, output_size], "probabilities")
    g.softmax(current, probabilities)
    q_out = g.tensor(
        [1, output_size],
        "output",
        dtype=schema.TensorType.UINT8,
        scale=OUTPUT_SCALE,
        zero_point=OUTPUT_ZERO_POINT,
    )
    g.op(schema.BuiltinOperator.QUANTIZE, [probabilities], [q_out])
    return g.finish([q_in], [q_out])


def _opcode(code: int) -> object:
    oc = schema.OperatorCodeT()
    oc.builtinCode = code
    oc.deprecatedBuiltinCode = min(code, 127)
    oc.version = 1
    return oc
