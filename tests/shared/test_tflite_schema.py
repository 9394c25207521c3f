"""The runtime-free signature reader: it reads what LiteRT reads, and refuses what is not a model.

Every generated and third-party model is read both ways (the flatbuffer walk and
the real interpreter's tensor details); damaged, truncated and hostile files
must raise ModelFormatError, never crash, and cost linear time.
"""

from __future__ import annotations

import contextlib
import random
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from shared import tflite_schema
from shared.errors import ModelFormatError
from shared.manifest import TensorSignature
from shared.model_builder import build_dense_model, build_quantized_model, build_two_input_model
from shared.tflite_schema import DTYPES, REFUSED_TYPES, read_signature

ROOT = Path(__file__).resolve().parents[2]
GENERATED = {
    "dense": build_dense_model(),
    "dense_batched_no_softmax": build_dense_model(
        input_size=8, output_size=2, batch=5, softmax=False
    ),
    "dense_no_hidden": build_dense_model(hidden=()),
    "two_input": build_two_input_model(),
    "quantized": build_quantized_model(),
}
THIRD_PARTY = (
    "face_detector", "hand_landmarker", "wakeword_int8", "wakeword_int8_b", "melspectrogram",
    "unloadable_model",
)  # fmt: skip

Tensor = tuple[str, list[int], str, tuple[list[float], list[int], int] | None]


def interpreter_view(data: bytes) -> tuple[list[Tensor], list[Tensor], list[str]]:
    """What LiteRT's Python interpreter reports (without allocating: some models do not)."""
    interp = Interpreter(
        model_content=data,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )

    def side(details: list[dict[str, Any]]) -> list[Tensor]:
        out: list[Tensor] = []
        for d in details:
            q = d["quantization_parameters"]
            quant = (
                (q["scales"].tolist(), q["zero_points"].tolist(), int(q["quantized_dimension"]))
                if len(q["scales"])
                else None
            )
            out.append((d["name"], d["shape_signature"].tolist(), np.dtype(d["dtype"]).name, quant))
        return out

    keys = list(interp.get_signature_list())
    return side(interp.get_input_details()), side(interp.get_output_details()), keys


def reader_view(signature: TensorSignature) -> tuple[list[Tensor], list[Tensor], list[str]]:
    def side(specs: Sequence[Any]) -> list[Tensor]:
        return [
            (
                s.name,
                list(s.shape),
                s.dtype,
                (
                    list(s.quantization.scale),
                    list(s.quantization.zero_point),
                    s.quantization.dimension,
                )
                if s.quantization
                else None,
            )
            for s in specs
        ]

    return side(signature.inputs), side(signature.outputs), list(signature.signature_keys)


def one_tensor_model(
    dtype: int = schema.TensorType.FLOAT32,
    shape: Sequence[int] = (1, 3),
    *,
    shape_signature: Sequence[int] | None = None,
    scale: Sequence[float] | None = None,
    zero_point: Sequence[int] | None = None,
    dimension: int = 0,
    name: bytes = b"x",
) -> bytes:
    """A model with no operators whose one tensor is both input and output."""
    model = schema.ModelT()
    model.version, model.operatorCodes = 3, []
    model.buffers = [schema.BufferT(), schema.BufferT()]
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.name, tensor.buffer = list(shape), dtype, name, 1
    if shape_signature is not None:
        tensor.shapeSignature = list(shape_signature)
    if scale is not None:
        tensor.quantization = schema.QuantizationParametersT()
        tensor.quantization.scale = list(scale)
        tensor.quantization.zeroPoint = list(zero_point or ())
        tensor.quantization.quantizedDimension = dimension
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = [tensor], [0], [0], []
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def interpreter_refuses(data: bytes) -> bool:
    try:
        interpreter_view(data)
    except (ValueError, RuntimeError):
        return True
    return False


@pytest.mark.parametrize("name", [*GENERATED, *THIRD_PARTY])
def test_reads_what_the_interpreter_reports(name: str, request: pytest.FixtureRequest) -> None:
    """Inputs and outputs (name, shape signature, dtype, quantization) and signature keys
    equal LiteRT's own reading, for every generated and every third-party model."""
    data = GENERATED[name] if name in GENERATED else request.getfixturevalue(name)
    assert reader_view(read_signature(data)) == interpreter_view(data)


def test_a_quantized_real_model_reads_with_its_scales_and_signature_runner(
    wakeword_int8: bytes,
) -> None:
    """The int8 wake word: int8 input q(0.10196, -128), uint8 output, `serving_default`."""
    signature = read_signature(wakeword_int8)
    (x,), (y,) = signature.inputs, signature.outputs
    assert (x.dtype, x.shape, y.dtype, y.shape) == ("int8", (1, 3, 40), "uint8", (1, 1))
    assert x.quantization is not None and x.quantization.zero_point == (-128,)
    assert x.quantization.scale[0] == pytest.approx(0.10196, abs=1e-5)
    assert signature.signature_keys == ("serving_default",)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_schema_type_maps_to_the_dtype_the_interpreter_reports(code: int) -> None:
    """Each accepted TensorType is named as numpy names the interpreter's dtype."""
    data = one_tensor_model(code)
    assert read_signature(data).inputs[0].dtype == DTYPES[code]
    assert reader_view(read_signature(data)) == interpreter_view(data)


@pytest.mark.parametrize("code", [*sorted(REFUSED_TYPES), 21, 100, -1])
def test_types_no_application_can_feed_are_refused(code: int) -> None:
    """RESOURCE, VARIANT, sub-byte ints, BFLOAT16 and values outside the schema: refused by name."""
    with pytest.raises(ModelFormatError, match="tensor type") as info:
        read_signature(one_tensor_model(code))
    assert REFUSED_TYPES.get(code, "not in the TFLite schema") in str(info.value)


def test_per_channel_quantization_is_read_with_its_dimension() -> None:
    """Three scales along dimension 1 of [1, 3]: all of them, and the dimension, as LiteRT has them."""
    data = one_tensor_model(
        schema.TensorType.INT8, scale=[0.5, 0.25, 0.125], zero_point=[1, 2, 3], dimension=1
    )
    (spec,) = read_signature(data).inputs
    assert spec.quantization is not None
    assert (spec.quantization.scale, spec.quantization.zero_point) == (
        (0.5, 0.25, 0.125),
        (1, 2, 3),
    )
    assert spec.quantization.dimension == 1
    assert reader_view(read_signature(data)) == interpreter_view(data)


@pytest.mark.parametrize(
    ("scale", "zero_point", "dimension"),
    [
        ([0.5], [], 0),  # no zero point for the scale
        ([0.5, 0.2], [1], 0),  # counts differ
        ([0.5, 0.5], [0, 0], 1),  # 2 scales on a dimension of size 3
        ([0.5] * 3, [0] * 3, 5),  # dimension beyond the rank
        ([0.5] * 3, [0] * 3, -1),
    ],
)
def test_quantization_the_interpreter_refuses_is_refused(
    scale: list[float], zero_point: list[int], dimension: int
) -> None:
    """Parameters LiteRT rejects are ModelFormatError here too, not a manifest promise."""
    data = one_tensor_model(
        schema.TensorType.INT8, scale=scale, zero_point=zero_point, dimension=dimension
    )
    assert interpreter_refuses(data)
    with pytest.raises(ModelFormatError, match=r"quantization|per-channel"):
        read_signature(data)


def test_zero_points_without_scales_are_no_quantization() -> None:
    """LiteRT reports no quantization for a tensor without scales, and so does the reader."""
    data = one_tensor_model(schema.TensorType.INT8, scale=[], zero_point=[4])
    assert read_signature(data).inputs[0].quantization is None
    assert reader_view(read_signature(data)) == interpreter_view(data)


@pytest.mark.parametrize(
    ("shape_signature", "expected"), [([-1, 3], (-1, 3)), ([], (1, 3)), (None, (1, 3))]
)
def test_a_shape_signature_wins_over_the_shape_unless_it_is_empty(
    shape_signature: list[int] | None, expected: tuple[int, ...]
) -> None:
    """-1 marks a dynamic dimension; an empty or absent signature leaves the shape."""
    data = one_tensor_model(shape_signature=shape_signature)
    assert read_signature(data).inputs[0].shape == expected
    assert reader_view(read_signature(data)) == interpreter_view(data)


def _with_version(data: bytes, version: int) -> bytes:
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    model.version = version
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "TFL3"),
        (b"TFL3", "TFL3"),
        (b"not a model at all", "TFL3"),
        (b"\x00" * 64, "TFL3"),
        (b"\x00\x00\x00\x00TFL3", "damaged"),  # root table at offset 0, over the identifier
        (b"\xff\xff\xff\x7fTFL3" + b"\x00" * 56, "outside"),  # root table far past the end
        (struct.pack("<I", 8) + b"TFL3" + struct.pack("<i", -(2**30)), "vtable"),
        (random.Random(1).randbytes(4) + b"TFL3" + random.Random(2).randbytes(4000), "damaged"),
        (_with_version(build_dense_model(), 2), "schema version 2"),
    ],
)
def test_bytes_that_are_not_a_model_are_refused(data: bytes, match: str) -> None:
    """No identifier, offsets that point outside, a foreign schema version: ModelFormatError."""
    with pytest.raises(ModelFormatError, match=match):
        read_signature(data)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_every_cut_of_a_generated_model_is_refused(name: str) -> None:
    """Each prefix of the file, down to the empty one, is refused (the builder leaves no slack)."""
    data = GENERATED[name]
    for size in range(len(data)):
        with pytest.raises(ModelFormatError):
            read_signature(data[:size])


@pytest.mark.parametrize("name", ["face_detector", "wakeword_int8", "melspectrogram"])
def test_cuts_of_real_models_are_refused_where_the_interpreter_refuses_them(
    name: str, request: pytest.FixtureRequest
) -> None:
    """At 64 points through the file and each of its last 160 bytes, the reader refuses a cut
    exactly when LiteRT does (MediaPipe files carry a zip of labels after the flatbuffer:
    cutting that is harmless to both)."""
    data: bytes = request.getfixturevalue(name)
    sizes = sorted(
        {len(data) * k // 64 for k in range(64)} | set(range(len(data) - 160, len(data)))
    )
    for size in sizes:
        cut = data[:size]
        try:
            read_signature(cut)
            refused = False
        except ModelFormatError:
            refused = True
        assert refused == interpreter_refuses(cut), f"cut at {size} of {len(data)}"


def mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    """`count` copies of `data` with a few bytes or 32-bit words overwritten."""
    rng = random.Random(seed)
    words = (0, 1, 4, 0x7FFFFFFF, 0xFFFFFFFF)
    out = []
    for _ in range(count):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(damaged) - 4)
            if rng.random() < 0.5:
                damaged[pos] = rng.randrange(256)
            else:
                value = rng.choice((*words, rng.randrange(2**32), rng.randrange(4096)))
                struct.pack_into("<I", damaged, pos - pos % 4, value)
        out.append(bytes(damaged))
    return out


@pytest.mark.parametrize("name", ["two_input", "quantized", "wakeword_int8"])
def test_damaged_files_raise_model_format_error_or_read_quickly(
    name: str, request: pytest.FixtureRequest
) -> None:
    """1500 seeded mutations each: a signature or ModelFormatError, never another exception,
    none slower than a second."""
    data = GENERATED[name] if name in GENERATED else request.getfixturevalue(name)
    for damaged in mutations(data, 1500, seed=len(data)):
        started = time.perf_counter()
        with contextlib.suppress(ModelFormatError):
            read_signature(damaged)
        assert time.perf_counter() - started < 1.0


def shared_tensor_model(entries: int) -> bytes:
    """A subgraph whose tensor list names one tensor table `entries` times (built by hand:
    the object API would write the table that many times)."""
    b = flatbuffers.Builder(0)
    name = b.CreateString("x")
    schema.TensorStartShapeVector(b, 2)
    b.PrependInt32(3)
    b.PrependInt32(1)
    shape = b.EndVector()
    schema.TensorStart(b)
    schema.TensorAddShape(b, shape)
    schema.TensorAddName(b, name)
    tensor = schema.TensorEnd(b)
    b.StartVector(4, entries, 4)
    for _ in range(entries):
        b.PrependUOffsetTRelative(tensor)
    tensors = b.EndVector()
    ends = []
    for _ in range(2):
        b.StartVector(4, 1, 4)
        b.PrependInt32(0)
        ends.append(b.EndVector())
    schema.SubGraphStart(b)
    schema.SubGraphAddTensors(b, tensors)
    schema.SubGraphAddInputs(b, ends[0])
    schema.SubGraphAddOutputs(b, ends[1])
    graph = schema.SubGraphEnd(b)
    schema.BufferStart(b)
    buffer = schema.BufferEnd(b)
    vectors = []
    for item in (buffer, graph):
        b.StartVector(4, 1, 4)
        b.PrependUOffsetTRelative(item)
        vectors.append(b.EndVector())
    schema.ModelStart(b)
    schema.ModelAddVersion(b, 3)
    schema.ModelAddBuffers(b, vectors[0])
    schema.ModelAddSubgraphs(b, vectors[1])
    b.Finish(schema.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_one_table_named_many_times_costs_linear_time() -> None:
    """200,000 entries pointing at one tensor (800 KB): read in seconds, as LiteRT reads it;
    a walk that re-read shared vectors in full would be quadratic."""
    data = shared_tensor_model(200_000)
    started = time.perf_counter()
    signature = read_signature(data)
    assert time.perf_counter() - started < 20.0
    assert reader_view(signature) == interpreter_view(data)


def test_more_tables_than_any_model_has_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk stops at MAX_TABLES (lowered here): a bound on the time a file can cost."""
    monkeypatch.setattr(tflite_schema, "MAX_TABLES", 1000)
    assert read_signature(shared_tensor_model(900)).inputs[0].name == "x"
    with pytest.raises(ModelFormatError, match="more than 1000 tables"):
        read_signature(shared_tensor_model(1000))


@pytest.mark.parametrize(
    ("name", "match"),
    [(b"\xff\xfe bad", "not UTF-8"), (b"n" * 300, "cannot be described"), (b"n" * 2000, "longer")],
)
def test_names_a_manifest_cannot_carry_are_refused(name: bytes, match: str) -> None:
    """A tensor name that is not UTF-8, or longer than a manifest takes: ModelFormatError."""
    with pytest.raises(ModelFormatError, match=match):
        read_signature(one_tensor_model(name=name))


def test_reading_a_signature_loads_no_ml_runtime(tmp_path: Path) -> None:
    """`model push` and the controller need no interpreter: importing the reader and the
    operator client, and reading a model, leaves LiteRT and tflite_runtime unloaded."""
    model = tmp_path / "m.tflite"
    model.write_bytes(GENERATED["two_input"])
    script = (
        "import sys\n"
        "import controller.operator\n"
        "from shared.tflite_schema import read_signature\n"
        f"print(read_signature(open({str(model)!r}, 'rb').read()).describe())\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('ai_edge_litert', 'tflite_runtime', 'tensorflow') or m == 'shared.tflite')\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(float32[1, 4],float32[1, 2]) -> (float32[1, 3],float32[1, 2])"
