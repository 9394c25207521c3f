"""Mergeable quantile sketches: latency with a bounded relative error, confidence on a fine grid.

A `QuantileSketch` counts values per bucket of a fixed `Mapping`, so that two
sketches of the same mapping merge by adding counts: windows and devices merge
in any order (associative, commutative) and the merge of two sketches has the
very bucket counts of the sketch of the union of their values. Count, sum, min
and max are kept beside the buckets. Pure: no I/O.

Mappings (the contract both ends share; `LATENCY_MAPPING`, `CONFIDENCE_MAPPING`):

* `LogMapping` (DDSketch, Masson et al., PVLDB 2019): bucket `i` holds the
  values in `(gamma**(i-1), gamma**i]`, i.e. `i = ceil(log_gamma(x))`. With
  `gamma = 1.02` the bucket's geometric midpoint is within `sqrt(gamma) - 1`
  (0.995 %) of any value in it (DDSketch's relative accuracy
  `(gamma-1)/(gamma+1)` is 0.990 %). Values at or below `MIN_INDEXABLE`
  (zero, a timer that did not tick) count in a zero bucket read as 0 (clamped
  to the minimum). Latency in milliseconds: 1e-6 ms is a nanosecond.
* `LinearMapping`: bucket `i` holds `((i-1)*width, i*width]` (bucket 0 holds
  exactly 0). Confidence lies in [0, 1], where a relative error is the wrong
  measure (1 % of 0.95 is coarser than the differences that matter), so it is
  counted exactly on a grid of 0.001: an estimate is within one bin width.

Quantiles follow numpy's default (`linear`) definition: the q-quantile of n
values lies at rank `h = q * (n - 1)`, between the values of ranks `floor(h)`
and `ceil(h)`. The value of a rank is estimated inside its bucket by
interpolation: the `c` values of a bucket are taken as spread evenly (in log
space for the log mapping) over its range, the `j`-th at fraction
`(j + 0.5) / c`; the lowest and highest ranks are the exact min and max, and
every estimate is clamped to them. An estimate and its rank's true value lie
in the same bucket, so the relative error of a log-mapped quantile is below
`gamma - 1` (2 %) whatever the data, and near the 0.5 % of the midpoint for
data that fills its buckets smoothly (`tests/shared/test_sketch.py`, and the
figures in `docs/gates.md`); `interpolate=False` reads each bucket at its
midpoint instead, within 0.995 %.

Bounded size: at most `max_buckets` (default `MAX_BUCKETS`, 1024) contiguous
bucket indices are kept. When a value or a merge stretches the span beyond,
the lowest buckets are folded into the lowest kept one (DDSketch's
"collapsing lowest" store): the high quantiles, which the gates read, keep
their accuracy; quantiles below the fold read too high. 1024 buckets at
gamma 1.02 span a ratio of 6e8 (1 µs to 10 minutes in ms), so no real window
collapses. The fold commutes with merging: the merged sketch still equals the
sketch of the union, collapsed.

Values that are NaN, infinite or negative are not counted (neither in the
buckets nor in count/sum/min/max); `dropped` says how many there were.

Why not the `ddsketch` package (Datadog's, pure Python, 3.0.1, protobuf only for
its optional serialisation): its `add` takes one value at a time in Python,
measured at about 1.4 µs a value here (`LogCollapsingLowestDenseDDSketch`,
4,096 log-normal values), while `QuantileSketch.add` takes a whole batch in a
dozen numpy calls, 3 to 4 ns a value plus 13 µs a call (`bench/sketch.py`
measures what that costs an inference); for two sketches the package would
cost each inference more than the whole recorder does today (2 µs). Its
quantiles read a bucket's representative (no interpolation), its store keeps
float weights where our windows validate integer counts, and its wire form is
protobuf where ours are JSON. The mapping and store are a few lines here; the
wire model would be ours in any case.

Wire form (`SketchData`): the mapping (`m`, `p`), the index `o` of the first
counted bucket and the counts from there on (`c`), in which a run of k empty
buckets is written as the single number -k; plus the zero bucket (`z`), sum,
min and max. Measured on typical windows (`bench/sketch.py`, `wire_bytes`), this is
smaller than both the plain contiguous run and sparse (index, count) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import HotswapError

MAX_BUCKETS = 1024
MIN_INDEXABLE = 1e-6
# Counts beyond this in one sketch are a lie or a bug (as `shared.messages.MAX_WINDOW_COUNT`).
MAX_COUNT = 10**12
# Bucket indices on the wire: the log mapping at gamma 1.02 indexes any float64 within
# +-36,000; this bounds what a message may claim.
MAX_INDEX = 10**6

MappingKind = Literal["log", "lin"]


class SketchMismatchError(HotswapError, ValueError):
    """Two sketches of different mappings were merged: their buckets do not line up."""

    reason = "sketch_mismatch"

    def __init__(self, mine: Mapping, theirs: Mapping) -> None:
        super().__init__(f"sketches of {mine.describe()} and {theirs.describe()} do not merge")
        self.mine = mine
        self.theirs = theirs


@dataclass(frozen=True, slots=True)
class Mapping:
    """Value -> bucket index, and back. `kind` log: `param` is gamma; lin: the bin width."""

    kind: MappingKind
    param: float

    def __post_init__(self) -> None:
        if self.kind == "log" and not 1.0 < self.param <= 1.5:
            raise ValueError(f"log mapping: gamma must lie in (1, 1.5], not {self.param}")
        if self.kind == "lin" and not 0.0 < self.param <= 1.0:
            raise ValueError(f"linear mapping: width must lie in (0, 1], not {self.param}")

    def describe(self) -> str:
        return f"{self.kind}({self.param:g})"

    @property
    def has_zero_bucket(self) -> bool:
        return self.kind == "log"

    def index(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Bucket indices of finite `values` above the zero bucket (log) or >= 0 (lin)."""
        if self.kind == "log":
            scaled = np.log(values)
            scaled *= 1.0 / math.log(self.param)
        else:
            scaled = values * (1.0 / self.param)
        np.ceil(scaled, out=scaled)
        return scaled.astype(np.int64)

    def value(self, index: int, fraction: float) -> float:
        """The value `fraction` (0: lower edge, 1: upper edge) of the way through a bucket;
        log-linearly for the log mapping."""
        if self.kind == "log":
            return float(self.param ** (index - 1 + fraction))
        return max(0.0, (index - 1 + fraction) * self.param)

    def midpoint(self, index: int) -> float:
        """The bucket's representative: geometric (log) or arithmetic (lin) midpoint."""
        return self.value(index, 0.5)


# gamma 1.02: an interpolated quantile within 2 %, a midpoint within 0.995 %.
LATENCY_GAMMA = 1.02
CONFIDENCE_WIDTH = 0.001
LATENCY_MAPPING = Mapping("log", LATENCY_GAMMA)
CONFIDENCE_MAPPING = Mapping("lin", CONFIDENCE_WIDTH)


def encode_counts(counts: Sequence[int]) -> tuple[int, ...]:
    """Counts with each run of k empty buckets written as -k."""
    out: list[int] = []
    zeros = 0
    for c in counts:
        if c == 0:
            zeros += 1
            continue
        if zeros:
            out.append(-zeros)
            zeros = 0
        out.append(int(c))
    if zeros:
        out.append(-zeros)
    return tuple(out)


def decode_counts(encoded: Iterable[int]) -> list[int]:
    """The inverse of `encode_counts`."""
    out: list[int] = []
    for c in encoded:
        if c < 0:
            out.extend([0] * -c)
        else:
            out.append(c)
    return out


class SketchData(BaseModel):
    """A sketch on the wire. Short keys: a window carries two of them.

    `m`/`p`: the mapping (kind, gamma or width). `o`: index of the first bucket in `c`;
    `c`: the counts of buckets `o`, `o+1`, ... with a run of k empty buckets written as
    -k (`encode_counts`). `z`: values at or below MIN_INDEXABLE (log mapping).
    `s`, `mn`, `mx`: sum, min and max of the counted values (min/max None when empty).
    `d`: values dropped as NaN, infinite or negative.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    m: MappingKind
    p: float
    o: int = Field(default=0, ge=-MAX_INDEX, le=MAX_INDEX)
    c: tuple[int, ...] = Field(default=(), max_length=MAX_BUCKETS)
    z: int = Field(default=0, ge=0, le=MAX_COUNT)
    s: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    mn: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    mx: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    d: int = Field(default=0, ge=0, le=MAX_COUNT)

    @property
    def mapping(self) -> Mapping:
        return Mapping(self.m, self.p)

    def counts(self) -> list[int]:
        """The contiguous counts of buckets `o`, `o+1`, ... (decoded)."""
        return decode_counts(self.c)

    @property
    def n(self) -> int:
        return sum(c for c in self.c if c > 0) + self.z

    @model_validator(mode="after")
    def _consistent(self) -> SketchData:
        self.mapping  # noqa: B018  (validates the parameter)
        if any(c > MAX_COUNT for c in self.c):
            raise ValueError(f"bucket counts must be at most {MAX_COUNT}")
        span = sum(-c if c < 0 else 1 for c in self.c)
        if span > MAX_BUCKETS or self.o + span > MAX_INDEX:
            raise ValueError(f"a sketch spans at most {MAX_BUCKETS} buckets")
        if self.z and self.m != "log":
            raise ValueError("only a log mapping has a zero bucket")
        n = self.n
        if n > MAX_COUNT:
            raise ValueError(f"a sketch counts at most {MAX_COUNT} values")
        if (self.mn is None) != (n == 0) or (self.mx is None) != (n == 0):
            raise ValueError("min and max are given exactly when the sketch counts values")
        if self.mn is not None and self.mx is not None and self.mn > self.mx:
            raise ValueError("min exceeds max")
        return self


class QuantileSketch:
    """Counts per bucket of `mapping` (a contiguous run from `offset`), count, sum, min, max.

    Not thread-safe: the owner serialises `add` and `merge`.
    """

    __slots__ = ("_counts", "_max", "_min", "_offset", "_sum", "dropped", "mapping",
                 "max_buckets", "zero_count")  # fmt: skip

    def __init__(self, mapping: Mapping, max_buckets: int = MAX_BUCKETS) -> None:
        if max_buckets < 1:
            raise ValueError("a sketch keeps at least one bucket")
        self.mapping = mapping
        self.max_buckets = max_buckets
        self._counts: npt.NDArray[np.int64] = np.zeros(0, np.int64)
        self._offset = 0
        self.zero_count = 0
        self.dropped = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    @classmethod
    def latency(cls) -> QuantileSketch:
        return cls(LATENCY_MAPPING)

    @classmethod
    def confidence(cls) -> QuantileSketch:
        return cls(CONFIDENCE_MAPPING)

    # ------------------------------------------------------------ reading

    @property
    def count(self) -> int:
        return int(self._counts.sum()) + self.zero_count

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float | None:
        return self._min if self.count else None

    @property
    def max(self) -> float | None:
        return self._max if self.count else None

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def span(self) -> int:
        """How many contiguous buckets the store holds (at most `max_buckets`)."""
        return len(self._counts)

    def mean(self) -> float | None:
        n = self.count
        return self._sum / n if n else None

    def bins(self) -> dict[int, int]:
        """Non-empty buckets: index -> count (the zero bucket is `zero_count`)."""
        nz = np.flatnonzero(self._counts)
        return {int(i) + self._offset: int(self._counts[i]) for i in nz}

    def quantile(self, q: float, *, interpolate: bool = True) -> float | None:
        """The q-quantile (numpy's `linear` definition) estimated from the buckets."""
        return self.quantiles([q], interpolate=interpolate)[0]

    def quantiles(self, qs: Sequence[float], *, interpolate: bool = True) -> list[float | None]:
        if any(not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError("quantiles lie in [0, 1]")
        n = self.count
        if not n:
            return [None for _ in qs]
        cum = np.cumsum(self._counts)
        out: list[float | None] = []
        for q in qs:
            h = q * (n - 1)
            lo = math.floor(h)
            v = self._at_rank(lo, n, cum, interpolate)
            t = h - lo
            if t > 0.0:
                v += t * (self._at_rank(lo + 1, n, cum, interpolate) - v)
            out.append(v)
        return out

    def at_rank(self, k: int) -> float | None:
        """The estimated value of the k-th smallest value (0-based, clamped to the ranks)."""
        n = self.count
        if not n:
            return None
        return self._at_rank(min(max(k, 0), n - 1), n, np.cumsum(self._counts), True)

    def _at_rank(self, k: int, n: int, cum: npt.NDArray[np.int64], interpolate: bool) -> float:
        if k <= 0:
            return self._min
        if k >= n - 1:
            return self._max
        k -= self.zero_count
        if k < 0:
            return self._min  # a zero-bucket value: at most MIN_INDEXABLE, and >= min
        j = int(np.searchsorted(cum, k, side="right"))
        c = int(self._counts[j])
        if interpolate:
            within = k - (int(cum[j]) - c)
            v = self.mapping.value(j + self._offset, (within + 0.5) / c)
        else:
            v = self.mapping.midpoint(j + self._offset)
        return min(max(v, self._min), self._max)

    # ------------------------------------------------------------ writing

    def add(self, values: npt.ArrayLike) -> None:
        """Count `values` (any shape). NaN, infinite and negative ones are dropped."""
        x = np.asarray(values, dtype=np.float64).reshape(-1)
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())  # NaN if any is NaN
        if not (lo >= 0.0 and hi < math.inf):
            ok = np.isfinite(x) & (x >= 0.0)
            self.dropped += int(x.size - np.count_nonzero(ok))
            x = x[ok]
            if not x.size:
                return
            lo, hi = float(x.min()), float(x.max())
        self._sum += float(x.sum())
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)
        if self.mapping.has_zero_bucket and lo <= MIN_INDEXABLE:
            tiny = x <= MIN_INDEXABLE
            self.zero_count += int(np.count_nonzero(tiny))
            x = x[~tiny]
            if not x.size:
                return
        idx = self.mapping.index(x)
        lo = int(idx.min())
        self._add_counts(lo, np.bincount(idx - lo))

    def merge(self, other: QuantileSketch) -> None:
        """Add `other`'s counts into this sketch (in place)."""
        if other.mapping != self.mapping:
            raise SketchMismatchError(self.mapping, other.mapping)
        self.dropped += other.dropped
        if not other.count:
            return
        self.zero_count += other.zero_count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        if other.span:
            self._add_counts(other._offset, other._counts)

    def subtract(self, other: QuantileSketch) -> None:
        """Take `other`'s counts out of this sketch (in place): the inverse of `merge` for a
        sketch that was merged in before (a device leaving a cohort).

        Counts, sum and dropped subtract exactly; min and max cannot be taken apart, so
        they become bounds: the old ones, narrowed to the edges of the lowest and highest
        buckets still counted. Refused (ValueError) when a count would go negative.
        """
        if other.mapping != self.mapping:
            raise SketchMismatchError(self.mapping, other.mapping)
        if other.zero_count > self.zero_count:
            raise ValueError("subtracting counts this sketch does not hold")
        if other.span:
            lo, hi = other._offset, other._offset + other.span
            start, end = self._offset, self._offset + self.span
            if lo < start or hi > end:
                raise ValueError("subtracting counts this sketch does not hold")
            mine = self._counts.copy()
            mine[lo - start : hi - start] -= other._counts
            if (mine < 0).any():
                raise ValueError("subtracting counts this sketch does not hold")
            self._counts = mine
        self.zero_count -= other.zero_count
        self.dropped = max(0, self.dropped - other.dropped)
        self._sum = max(0.0, self._sum - other._sum)
        self._trim()
        if not self.count:
            self._sum, self._min, self._max = 0.0, math.inf, -math.inf
            return
        if self.zero_count == 0:
            self._min = max(self._min, self.mapping.value(self._offset, 0.0))
        if self.span:
            self._max = min(self._max, self.mapping.value(self._offset + self.span - 1, 1.0))
        else:
            self._max = min(self._max, MIN_INDEXABLE)

    def merged(self, other: QuantileSketch) -> QuantileSketch:
        out = self.copy()
        out.merge(other)
        return out

    def copy(self) -> QuantileSketch:
        out = QuantileSketch(self.mapping, self.max_buckets)
        out._counts = self._counts.copy()
        out._offset = self._offset
        out.zero_count, out.dropped = self.zero_count, self.dropped
        out._sum, out._min, out._max = self._sum, self._min, self._max
        return out

    def _add_counts(self, lo: int, counts: npt.NDArray[np.int64]) -> None:
        """Add `counts` of buckets lo, lo+1, ... then fold the span to `max_buckets`."""
        hi = lo + len(counts)  # exclusive
        if not len(self._counts):
            self._counts, self._offset = counts.astype(np.int64), lo
        else:
            start, end = self._offset, self._offset + len(self._counts)
            if lo < start or hi > end:
                new_start, new_end = min(lo, start), max(hi, end)
                grown = np.zeros(new_end - new_start, np.int64)
                grown[start - new_start : end - new_start] = self._counts
                self._counts, self._offset = grown, new_start
            self._counts[lo - self._offset : hi - self._offset] += counts
        excess = len(self._counts) - self.max_buckets
        if excess > 0:
            # Collapse the lowest: their counts join the lowest bucket kept.
            self._counts[excess] += int(self._counts[:excess].sum())
            self._counts = self._counts[excess:].copy()
            self._offset += excess
        if self._counts[0] == 0 or self._counts[-1] == 0:
            self._trim()

    def _trim(self) -> None:
        nz = np.flatnonzero(self._counts)
        if not len(nz):
            self._counts, self._offset = np.zeros(0, np.int64), 0
        elif nz[0] > 0 or nz[-1] < len(self._counts) - 1:
            self._offset += int(nz[0])
            self._counts = self._counts[nz[0] : nz[-1] + 1].copy()

    # ------------------------------------------------------------ wire

    def to_data(self) -> SketchData:
        n = self.count
        return SketchData(
            m=self.mapping.kind,
            p=self.mapping.param,
            o=self._offset,
            c=encode_counts(self._counts.tolist()),
            z=self.zero_count,
            s=self._sum,
            mn=self._min if n else None,
            mx=self._max if n else None,
            d=self.dropped,
        )

    @classmethod
    def from_data(cls, data: SketchData, max_buckets: int = MAX_BUCKETS) -> QuantileSketch:
        out = cls(data.mapping, max_buckets)
        out.zero_count, out.dropped, out._sum = data.z, data.d, data.s
        if data.mn is not None and data.mx is not None:
            out._min, out._max = data.mn, data.mx
        counts = np.array(data.counts(), np.int64)
        if len(counts):
            out._add_counts(data.o, counts)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return (
            self.mapping == other.mapping
            and self._offset == other._offset
            and np.array_equal(self._counts, other._counts)
            and self.zero_count == other.zero_count
            and self.dropped == other.dropped
            and (self._min, self._max) == (other._min, other._max)
            and math.isclose(self._sum, other._sum, rel_tol=1e-9, abs_tol=1e-12)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"QuantileSketch({self.mapping.describe()}, n={self.count}, "
            f"span={self.span}, offset={self._offset})"
        )
