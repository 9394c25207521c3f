"""A TFLite model's tensor signature, read from the flatbuffer itself: no ML runtime.

`model push` and the controller describe a model without an interpreter: this
module walks the file by the flatbuffers layout (root offset, vtables, offsets
to vectors and tables) with the field slots of the few TFLite schema tables it
needs, written here from the public `schema.fbs` (the generated schema module
is not used). Values are read with the `flatbuffers` package's low-level
`Table` API; the structure check, which visits every table, reads its offsets
with precompiled structs to stay fast.

Every position is bounds-checked before it is read, and every loop is bounded
by the file's size or a fixed limit, so a hostile or damaged file raises
ModelFormatError: it never reads out of range, crashes, or takes more than
linear time. Besides the tensors it reports, the walk checks the structure an
interpreter relies on (operator codes, tensors, operators, buffers, signature
defs, metadata), which is how a truncated file is refused.

Tensor types map to the numpy dtype names the interpreter reports (`DTYPES`).
Refused when an input or output has them (`REFUSED_TYPES`): RESOURCE and
VARIANT (handles, not data an application feeds), INT4, UINT4 and INT2 (packed
sub-byte integers that the interpreter presents as whole int8/uint8 bytes),
BFLOAT16 (no numpy dtype), and any value the schema does not define.

Pure: bytes in, a TensorSignature out; no I/O.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from typing import Any

from flatbuffers import number_types, util
from flatbuffers.table import Table
from pydantic import ValidationError

from shared.errors import ModelFormatError
from shared.manifest import Quantization, TensorSignature, TensorSpec

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
# A flatbuffer addresses at most 2 GiB; larger models keep their weights after it.
MAX_FLATBUFFER_BYTES = 2**31 - 1
# Limits on what is read in full. Beyond them a signature would not fit in a
# manifest (64 KiB) anyway, and they keep a file that points many entries at one
# huge vector from costing more than one read of it.
MAX_IO_TENSORS = 256
MAX_RANK = 64
MAX_CHANNELS = 4096
MAX_NAME_BYTES = 1024
MAX_SIGNATURE_DEFS = 256
# Far more tables than any real model has (they count tensors and operators in
# thousands); keeps the walk over a hostile file to seconds.
MAX_TABLES = 1_000_000

# TensorType (schema.fbs) -> the numpy dtype name the interpreter reports for it.
DTYPES: dict[int, str] = {
    0: "float32",  # FLOAT32
    1: "float16",  # FLOAT16
    2: "int32",  # INT32
    3: "uint8",  # UINT8
    4: "int64",  # INT64
    5: "bytes",  # STRING
    6: "bool",  # BOOL
    7: "int16",  # INT16
    8: "complex64",  # COMPLEX64
    9: "int8",  # INT8
    10: "float64",  # FLOAT64
    11: "complex128",  # COMPLEX128
    12: "uint64",  # UINT64
    15: "uint32",  # UINT32
    16: "uint16",  # UINT16
}
REFUSED_TYPES: dict[int, str] = {
    13: "RESOURCE",
    14: "VARIANT",
    17: "INT4",
    18: "BFLOAT16",
    19: "INT2",
    20: "UINT4",
}


def _slot(field_id: int) -> int:
    """The vtable offset of a table's `field_id`-th field (after the vtable's two sizes)."""
    return 4 + 2 * field_id


# The highest field id read in any table (Operator.intermediates), plus one.
_FIELDS_READ = 9


class _Model:
    VERSION = _slot(0)
    OPERATOR_CODES = _slot(1)
    SUBGRAPHS = _slot(2)
    DESCRIPTION = _slot(3)
    BUFFERS = _slot(4)
    METADATA_BUFFER = _slot(5)
    METADATA = _slot(6)
    SIGNATURE_DEFS = _slot(7)


class _OperatorCode:
    CUSTOM_CODE = _slot(1)


class _SubGraph:
    TENSORS = _slot(0)
    INPUTS = _slot(1)
    OUTPUTS = _slot(2)
    OPERATORS = _slot(3)
    NAME = _slot(4)


class _Tensor:
    SHAPE = _slot(0)
    TYPE = _slot(1)
    BUFFER = _slot(2)
    NAME = _slot(3)
    QUANTIZATION = _slot(4)
    SHAPE_SIGNATURE = _slot(7)


class _Quantization:
    MIN = _slot(0)
    MAX = _slot(1)
    SCALE = _slot(2)
    ZERO_POINT = _slot(3)
    QUANTIZED_DIMENSION = _slot(6)


class _Operator:
    OPCODE_INDEX = _slot(0)
    INPUTS = _slot(1)
    OUTPUTS = _slot(2)
    BUILTIN_OPTIONS = _slot(4)  # the union's value; slot 3 holds its type
    CUSTOM_OPTIONS = _slot(5)
    MUTATING_VARIABLE_INPUTS = _slot(7)
    INTERMEDIATES = _slot(8)


class _Buffer:
    DATA = _slot(0)
    OFFSET = _slot(1)
    SIZE = _slot(2)


class _Metadata:
    NAME = _slot(0)
    BUFFER = _slot(1)


class _SignatureDef:
    INPUTS = _slot(0)
    OUTPUTS = _slot(1)
    SIGNATURE_KEY = _slot(2)
    SUBGRAPH_INDEX = _slot(4)


class _TensorMap:
    NAME = _slot(0)
    TENSOR_INDEX = _slot(1)


def read_signature(data: bytes) -> TensorSignature:
    """The inputs and outputs of the model's first subgraph, and its signature keys.

    Shapes are shape signatures (-1: any size) where the file has them, else
    shapes; quantization is reported when a tensor has scales. Raises
    ModelFormatError when `data` is not a valid TFLite flatbuffer, or when an
    input or output is one this project cannot describe (module docstring).
    """
    if len(data) < 8 or not util.BufferHasIdentifier(data, 0, FILE_IDENTIFIER):
        raise ModelFormatError("not a TFLite flatbuffer (missing 'TFL3' identifier)")
    model = _ModelFile(data)
    inputs, outputs = model.io_specs("input"), model.io_specs("output")
    try:
        return TensorSignature(inputs=inputs, outputs=outputs, signature_keys=model.signature_keys)
    except ValidationError as exc:
        raise _undescribable(exc) from None


def _damaged(what: str) -> ModelFormatError:
    return ModelFormatError(f"damaged TFLite file: {what}")


def _undescribable(exc: ValidationError) -> ModelFormatError:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    return ModelFormatError(f"the model's signature cannot be described: {where}: {first['msg']}")


_I8 = struct.Struct("<b")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_VTABLE_SIZES = struct.Struct("<HH")


class _File:
    """The bytes, with every position tested before it is read.

    Checking the structure visits every table once, so that part is kept cheap:
    a vtable (which many tables share) is read and checked once, positions are
    read with precompiled structs, and error messages are only composed for
    errors. Values are read with flatbuffers' `Table`.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.end = min(len(data), MAX_FLATBUFFER_BYTES)
        self._layouts: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._tables = 0

    def outside(self, pos: int, size: int, what: str) -> ModelFormatError:
        return _damaged(f"{what} (byte {pos}, {size} long) lies outside its {self.end} bytes")

    def need(self, pos: int, size: int, what: str) -> None:
        if pos < 0 or pos + size > self.end:
            raise self.outside(pos, size, what)

    def target(self, pos: int, owner: _Node | _Vector | None, what: str) -> int:
        """Where the offset stored at `pos` points, checked to be inside the file."""
        if pos + 4 > self.end:
            raise self.outside(pos, 4, _label(owner, what))
        target: int = pos + _U32.unpack_from(self.data, pos)[0]
        if target + 4 > self.end:
            raise self.outside(target, 4, _label(owner, what))
        return target

    def table(self, pos: int, what: str, index: int | None = None) -> _Node:
        """The table at `pos` (from `target`), once its vtable and inline fields are in the file."""
        self._tables += 1
        if self._tables > MAX_TABLES:
            raise ModelFormatError(f"more than {MAX_TABLES} tables: no real model has as many")
        vtable = pos - _I32.unpack_from(self.data, pos)[0]
        layout = self._layouts.get(vtable)
        if layout is None:
            layout = self._layouts[vtable] = self._layout(vtable, _label(None, what, index))
        if pos + layout[0] > self.end:
            raise self.outside(pos, layout[0], _label(None, what, index))
        return _Node(self, pos, layout[1], what, index)

    def _layout(self, vtable: int, what: str) -> tuple[int, tuple[int, ...]]:
        """A vtable: the size of the tables using it and their fields' offsets (0: absent)."""
        self.need(vtable, 4, f"{what}'s vtable")
        vtable_size, inline_size = _VTABLE_SIZES.unpack_from(self.data, vtable)
        if vtable_size < 4 or vtable_size % 2 or inline_size < 4:
            raise _damaged(f"{what} has a malformed vtable")
        self.need(vtable, vtable_size, f"{what}'s vtable")
        # Only the fields this module reads: a vtable may list thousands, and
        # overlapping ones must not cost more than a constant each.
        count = min((vtable_size - 4) // 2, _FIELDS_READ)
        fields = struct.unpack_from(f"<{count}H", self.data, vtable + 4)
        if any(offset and not 4 <= offset < inline_size for offset in fields):
            raise _damaged(f"{what} has a field outside the table")
        return inline_size, fields


def _label(owner: _Node | _Vector | None, what: str, index: int | None = None) -> str:
    item = what if index is None else f"{what} {index}"
    return f"{owner.what} {item}" if owner is not None else item


class _Vector:
    """A vector whose `length` items of `item_size` bytes are inside the file."""

    __slots__ = ("_file", "_label", "_owner", "length", "start")

    def __init__(self, file: _File, start: int, length: int, owner: _Node, label: str) -> None:
        self._file, self.start, self.length = file, start, length
        self._owner, self._label = owner, label

    @property
    def what(self) -> str:
        return _label(self._owner, self._label)

    def table(self, i: int, what: str) -> _Node:
        """Item `i` of a vector of tables."""
        if not 0 <= i < self.length:
            raise _damaged(f"{what} {i} is not in {self.what} ({self.length} long)")
        return self._file.table(self._file.target(self.start + 4 * i, self, what), what, i)

    def tables(self, what: str) -> Iterator[_Node]:
        for i in range(self.length):
            yield self.table(i, what)


class _Node:
    """One table: a field's bytes are checked to be inside the file before it is read."""

    __slots__ = ("_fields", "_file", "_index", "_label", "pos")

    def __init__(
        self, file: _File, pos: int, fields: tuple[int, ...], label: str, index: int | None
    ) -> None:
        self._file, self.pos, self._fields = file, pos, fields
        self._label, self._index = label, index

    @property
    def what(self) -> str:
        return _label(None, self._label, self._index)

    def _field(self, slot: int, size: int, what: str) -> int | None:
        """The field's position (None: absent), its `size` bytes checked."""
        i = (slot - 4) >> 1
        offset = self._fields[i] if i < len(self._fields) else 0
        if not offset:
            return None
        if self.pos + offset + size > self._file.end:
            raise self._file.outside(self.pos + offset, size, _label(self, what))
        return self.pos + offset

    def _table(self) -> Table:
        return Table(self._file.data, self.pos)

    def scalar(self, slot: int, kind: struct.Struct, what: str, default: int = 0) -> int:
        where = self._field(slot, kind.size, what)
        return default if where is None else int(kind.unpack_from(self._file.data, where)[0])

    def vector(self, slot: int, item_size: int, what: str) -> _Vector | None:
        where = self._field(slot, 4, what)
        if where is None:
            return None
        file = self._file
        target = file.target(where, self, what)
        length: int = _U32.unpack_from(file.data, target)[0]
        if target + 4 + length * item_size > file.end:
            raise file.outside(target + 4, length * item_size, _label(self, what))
        return _Vector(file, target + 4, length, self, what)

    def tables(self, slot: int, what: str) -> Iterator[_Node]:
        vector = self.vector(slot, 4, f"{what}s")
        return vector.tables(what) if vector else iter(())

    def child(self, slot: int, what: str) -> _Node | None:
        where = self._field(slot, 4, what)
        if where is None:
            return None
        return self._file.table(self._file.target(where, self, what), _label(self, what))

    def numbers(self, slot: int, flags: Any, what: str, limit: int) -> list[Any]:
        """A vector of numbers (empty when absent); refused above `limit` items."""
        vector = self.vector(slot, flags.bytewidth, what)
        if vector is None:
            return []
        if vector.length > limit:
            raise ModelFormatError(f"{vector.what} has {vector.length} items (at most {limit})")
        table = self._table()
        return list(table.GetVectorAsNumpy(flags, table.Offset(slot)).tolist())

    def check_string(self, slot: int, what: str) -> _Vector | None:
        vector = self.vector(slot, 1, what)
        # A string ends in a NUL its length leaves out: the first byte a cut file loses.
        if vector is not None and vector.start + vector.length >= self._file.end:
            raise self._file.outside(vector.start + vector.length, 1, f"{vector.what}'s end")
        return vector

    def string(self, slot: int, what: str) -> str:
        """A short string field, decoded ("" when absent)."""
        vector = self.check_string(slot, what)
        if vector is None:
            return ""
        if vector.length > MAX_NAME_BYTES:
            raise ModelFormatError(f"{vector.what} is longer than {MAX_NAME_BYTES} bytes")
        table = self._table()
        raw = bytes(table.String(self.pos + table.Offset(slot)))
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ModelFormatError(f"{vector.what} is not UTF-8") from None


class _ModelFile:
    """One walk over a file: the structure is checked on construction, I/O tensors read after."""

    def __init__(self, data: bytes) -> None:
        file = _File(data)
        model = file.table(file.target(0, None, "root table offset"), "the model")
        version = model.scalar(_Model.VERSION, _U32, "version")
        if version != SCHEMA_VERSION:
            raise ModelFormatError(
                f"TFLite schema version {version}, not {SCHEMA_VERSION}: not a model LiteRT reads"
            )
        opcodes = 0
        for code in model.tables(_Model.OPERATOR_CODES, "operator code"):
            code.check_string(_OperatorCode.CUSTOM_CODE, "custom code")
            opcodes += 1
        buffers = model.vector(_Model.BUFFERS, 4, "buffers")
        if buffers is None:
            raise _damaged("the model has no buffers")
        for buffer in buffers.tables("buffer"):
            _check_buffer(buffer, len(data))
        graphs = model.vector(_Model.SUBGRAPHS, 4, "subgraphs")
        if graphs is None or graphs.length == 0:
            raise _damaged("the model has no subgraph")
        tensor_counts = [
            _check_subgraph(graph, opcodes=opcodes, buffers=buffers.length)
            for graph in graphs.tables("subgraph")
        ]
        model.check_string(_Model.DESCRIPTION, "description")
        model.vector(_Model.METADATA_BUFFER, 4, "metadata buffer")
        for entry in model.tables(_Model.METADATA, "metadata"):
            entry.check_string(_Metadata.NAME, "name")
            if entry.scalar(_Metadata.BUFFER, _U32, "buffer") >= buffers.length:
                raise _damaged(f"{entry.what} names no buffer")
        signatures = model.vector(_Model.SIGNATURE_DEFS, 4, "signature defs")
        if signatures is not None and signatures.length > MAX_SIGNATURE_DEFS:
            raise ModelFormatError(f"more than {MAX_SIGNATURE_DEFS} signature defs")
        self.signature_keys = tuple(
            _check_signature_def(signature, tensor_counts)
            for signature in (signatures.tables("signature def") if signatures else ())
        )
        self._graph = graphs.table(0, "subgraph")
        self._tensors = self._graph.vector(_SubGraph.TENSORS, 4, "tensors")
        self._specs: dict[int, TensorSpec] = {}

    def io_specs(self, side: str) -> tuple[TensorSpec, ...]:
        """The first subgraph's inputs or outputs (`side`), in order."""
        slot = _SubGraph.INPUTS if side == "input" else _SubGraph.OUTPUTS
        specs = []
        for index in self._graph.numbers(slot, number_types.Int32Flags, f"{side}s", MAX_IO_TENSORS):
            if index not in self._specs:
                if self._tensors is None:
                    raise _damaged(f"{side} {index} names a tensor of a subgraph that has none")
                self._specs[index] = self._spec(self._tensors.table(index, "tensor"), side)
            specs.append(self._specs[index])
        return tuple(specs)

    @staticmethod
    def _spec(tensor: _Node, side: str) -> TensorSpec:
        name = tensor.string(_Tensor.NAME, "name")
        kind = tensor.scalar(_Tensor.TYPE, _I8, "type")
        if kind not in DTYPES:
            what = REFUSED_TYPES.get(kind, f"{kind} (not in the TFLite schema)")
            raise ModelFormatError(
                f"{side} {name!r} has tensor type {what}: not one an application can feed or read"
            )
        shape = tuple(
            int(d)
            for d in tensor.numbers(_Tensor.SHAPE, number_types.Int32Flags, "shape", MAX_RANK)
        )
        signature = tensor.numbers(
            _Tensor.SHAPE_SIGNATURE, number_types.Int32Flags, "shape signature", MAX_RANK
        )
        try:
            return TensorSpec(
                name=name,
                shape=tuple(int(d) for d in signature) or shape,
                dtype=DTYPES[kind],
                quantization=_quantization(tensor, shape, name),
            )
        except ValidationError as exc:
            raise _undescribable(exc) from None


def _quantization(tensor: _Node, shape: tuple[int, ...], name: str) -> Quantization | None:
    """Affine quantization when the tensor has scales, checked as the interpreter checks it."""
    params = tensor.child(_Tensor.QUANTIZATION, "quantization")
    if params is None:
        return None
    scale = params.numbers(_Quantization.SCALE, number_types.Float32Flags, "scale", MAX_CHANNELS)
    if not scale:
        return None
    zero_point = params.numbers(
        _Quantization.ZERO_POINT, number_types.Int64Flags, "zero point", MAX_CHANNELS
    )
    if len(zero_point) != len(scale):
        raise ModelFormatError(
            f"tensor {name!r} has {len(scale)} quantization scales but {len(zero_point)} "
            "zero points"
        )
    if not all(math.isfinite(s) for s in scale):
        raise ModelFormatError(f"tensor {name!r} has a quantization scale that is not finite")
    dimension = params.scalar(_Quantization.QUANTIZED_DIMENSION, _I32, "dimension")
    if len(scale) > 1 and not (0 <= dimension < len(shape) and shape[dimension] == len(scale)):
        raise ModelFormatError(
            f"tensor {name!r} {list(shape)} has {len(scale)} per-channel scales along "
            f"dimension {dimension}"
        )
    return Quantization(
        scale=tuple(float(s) for s in scale),
        zero_point=tuple(int(z) for z in zero_point),
        dimension=dimension,
    )


def _check_buffer(buffer: _Node, file_size: int) -> None:
    buffer.vector(_Buffer.DATA, 1, "data")
    # Offset above 1: the data sits outside the flatbuffer, this many bytes into the file.
    offset = buffer.scalar(_Buffer.OFFSET, _U64, "offset")
    size = buffer.scalar(_Buffer.SIZE, _U64, "size")
    if offset > 1 and offset + size > file_size:
        raise _damaged(
            f"{buffer.what}'s data (byte {offset}, {size} long) lies outside its {file_size} bytes"
        )


def _check_subgraph(graph: _Node, *, opcodes: int, buffers: int) -> int:
    """Check a subgraph's tables, each in constant time; its number of tensors.

    Nothing here reads a whole vector of indices: a hostile file could point every
    operator at one long vector and make that quadratic.
    """
    tensors = graph.vector(_SubGraph.TENSORS, 4, "tensors")
    for tensor in tensors.tables("tensor") if tensors else ():
        tensor.vector(_Tensor.SHAPE, 4, "shape")
        tensor.vector(_Tensor.SHAPE_SIGNATURE, 4, "shape signature")
        tensor.scalar(_Tensor.TYPE, _I8, "type")
        tensor.check_string(_Tensor.NAME, "name")
        if tensor.scalar(_Tensor.BUFFER, _U32, "buffer") >= buffers:
            raise _damaged(f"{graph.what} {tensor.what} names no buffer")
        params = tensor.child(_Tensor.QUANTIZATION, "quantization")
        if params is not None:
            params.vector(_Quantization.MIN, 4, "min")
            params.vector(_Quantization.MAX, 4, "max")
            params.vector(_Quantization.SCALE, 4, "scale")
            params.vector(_Quantization.ZERO_POINT, 8, "zero point")
    graph.vector(_SubGraph.INPUTS, 4, "inputs")
    graph.vector(_SubGraph.OUTPUTS, 4, "outputs")
    for op in graph.tables(_SubGraph.OPERATORS, "operator"):
        if op.scalar(_Operator.OPCODE_INDEX, _U32, "opcode index") >= opcodes:
            raise _damaged(f"{graph.what} {op.what} names no operator code")
        op.vector(_Operator.INPUTS, 4, "inputs")
        op.vector(_Operator.OUTPUTS, 4, "outputs")
        op.vector(_Operator.INTERMEDIATES, 4, "intermediates")
        op.vector(_Operator.CUSTOM_OPTIONS, 1, "custom options")
        op.vector(_Operator.MUTATING_VARIABLE_INPUTS, 1, "mutating variable inputs")
        op.child(_Operator.BUILTIN_OPTIONS, "builtin options")
    graph.check_string(_SubGraph.NAME, "name")
    return tensors.length if tensors else 0


def _check_signature_def(signature: _Node, tensor_counts: list[int]) -> str:
    """Check a signature def against the subgraph it runs; its key."""
    key = signature.string(_SignatureDef.SIGNATURE_KEY, "key")
    graph = signature.scalar(_SignatureDef.SUBGRAPH_INDEX, _U32, "subgraph index")
    if graph >= len(tensor_counts):
        raise _damaged(f"signature {key!r} names no subgraph")
    for slot, side in ((_SignatureDef.INPUTS, "input"), (_SignatureDef.OUTPUTS, "output")):
        entries = signature.vector(slot, 4, f"{side}s")
        if entries is not None and entries.length > MAX_IO_TENSORS:
            raise ModelFormatError(f"signature {key!r} has more than {MAX_IO_TENSORS} {side}s")
        for entry in entries.tables(f"signature {key!r} {side}") if entries else ():
            entry.check_string(_TensorMap.NAME, "name")
            index = entry.scalar(_TensorMap.TENSOR_INDEX, _U32, "tensor index")
            if index >= tensor_counts[graph]:
                raise _damaged(f"{entry.what} names no tensor of subgraph {graph}")
    return key
