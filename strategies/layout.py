"""The layout of a model inside an ``ArrayRecord``: names, shapes, dtypes, offsets.

Robust aggregation works on flat vectors: every client's update becomes one row
of an ``(n, d)`` tensor. :class:`ModelLayout` records where each array lives in
that row so a flat aggregate turns back into an ``ArrayRecord`` with the global
model's exact keys, shapes and dtypes.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


class UnsupportedNpyVersion(ValueError):
    """A ``.npy`` header of a format version other than 1.0 and 2.0."""


class NpyHeaderError(ValueError):
    """A ``.npy`` header that is not the one ``np.save`` writes for a plain array."""


# Bounds of the strict header parser (:func:`read_npy_header`). np.save writes a
# header of well under 1 KiB for any array Bastion aggregates (format 2.0 only past
# 64 KiB); NumPy's own reader refuses more than 10,000 bytes by default, too.
MAX_NPY_HEADER_BYTES = 10_000
MAX_NPY_NDIM = 32  # NumPy allows 64
MAX_NPY_DIM_DIGITS = 18  # every dimension below 10^18
# a dtype string as np.save writes it for a plain (non-structured) dtype: '<f4', '|u1'
_DESCR = re.compile(r"[<>|=]?[A-Za-z][A-Za-z0-9]{0,7}")
_INT = re.compile(rf"[0-9]{{1,{MAX_NPY_DIM_DIGITS}}}")
_SPACE = re.compile(r"[ \t]*")
_KEY = re.compile(r"(['\"])(descr|fortran_order|shape)\1")


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says about the payload that follows it."""

    version: tuple[int, int]
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # where the data starts

    @property
    def data_bytes(self) -> int:
        """Bytes of data the header promises (exact: Python integers, no overflow)."""
        return math.prod(self.shape) * self.dtype.itemsize


class _Scanner:
    """A cursor over the header text; each method consumes one token or raises."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, what: str) -> NpyHeaderError:
        near = self.text[self.pos : self.pos + 12]
        return NpyHeaderError(f".npy header: {what} at character {self.pos} (near {near!r})")

    def space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]

    def match(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        self.space()
        found = pattern.match(self.text, self.pos)
        if found is None:
            raise self.fail(f"expected {what}")
        self.pos = found.end()
        return found

    def peek(self, char: str) -> bool:
        self.space()
        return self.text.startswith(char, self.pos)

    def take(self, char: str) -> None:
        if not self.peek(char):
            raise self.fail(f"expected {char!r}")
        self.pos += len(char)

    def string(self, pattern: re.Pattern[str], what: str) -> str:
        self.space()
        quote = self.text[self.pos : self.pos + 1]
        if quote not in ("'", '"'):
            raise self.fail(f"expected {what} in quotes")
        self.pos += 1
        value = self.match(pattern, what).group()
        if not self.text.startswith(quote, self.pos):
            raise self.fail(f"expected the closing quote of {what}")
        self.pos += 1
        return value

    def boolean(self) -> bool:
        for word, value in (("True", True), ("False", False)):
            if self.peek(word):
                self.pos += len(word)
                return value
        raise self.fail("expected True or False")

    def shape(self) -> tuple[int, ...]:
        """A Python tuple literal of non-negative integers: (), (n,), (n, m), (n, m,)."""
        self.take("(")
        dims: list[int] = []
        while not self.peek(")"):
            if len(dims) == MAX_NPY_NDIM:
                raise self.fail(f"more than {MAX_NPY_NDIM} dimensions")
            dims.append(int(self.match(_INT, "a dimension (0..10^18)").group()))
            if self.peek(","):
                self.pos += 1
            elif len(dims) == 1:
                raise self.fail("expected ',' (a one-dimensional shape is written (n,))")
            else:
                break
        self.take(")")
        return tuple(dims)


def _parse_header_dict(text: str) -> tuple[str, bool, tuple[int, ...]]:
    """``descr``, ``fortran_order`` and ``shape`` of the header dict literal ``text``.

    Accepts exactly what ``np.save`` writes (and the same dict with other spacing,
    key order, quotes or a missing trailing comma): a dict of those three keys, each
    once; ``descr`` a plain dtype string, ``fortran_order`` a bool, ``shape`` a tuple
    of non-negative integers; then spaces and one newline. Linear in ``len(text)``,
    no recursion, no ``eval``: a malformed header raises :class:`NpyHeaderError`
    naming what was expected where.
    """
    if not text.endswith("\n"):
        raise NpyHeaderError(".npy header does not end with a newline")
    scan = _Scanner(text[:-1])
    values: dict[str, object] = {}
    scan.take("{")
    while not scan.peek("}"):
        key = scan.match(_KEY, "'descr', 'fortran_order' or 'shape'").group(2)
        if key in values:
            raise scan.fail(f"key {key!r} twice")
        scan.take(":")
        if key == "descr":
            values[key] = scan.string(_DESCR, "a plain dtype such as '<f4'")
        elif key == "fortran_order":
            values[key] = scan.boolean()
        else:
            values[key] = scan.shape()
        if not scan.peek(","):
            break
        scan.pos += 1
    scan.take("}")
    scan.space()
    if scan.pos != len(scan.text):
        raise scan.fail("expected the end of the header")
    missing = [k for k in ("descr", "fortran_order", "shape") if k not in values]
    if missing:
        raise NpyHeaderError(f".npy header lacks key(s) {missing}")
    return str(values["descr"]), bool(values["fortran_order"]), values["shape"]  # type: ignore[return-value]


def read_npy_header(data: bytes | memoryview) -> NpyHeader:
    """Parse the ``.npy`` header at the start of ``data`` (format 1.0 or 2.0, what
    ``np.save`` writes), reading nothing past it.

    A strict, bounded parser of its own (NumPy's ``read_array_header_*`` runs
    ``ast.literal_eval`` on whatever the header holds, and raises tokenizer,
    index, recursion and other errors on crafted input): the header is at most
    :data:`MAX_NPY_HEADER_BYTES` bytes of printable ASCII, the dict grammar is the
    one :func:`_parse_header_dict` accepts, and the dtype a plain one NumPy knows.
    Raises :class:`UnsupportedNpyVersion` or :class:`NpyHeaderError` (both
    ``ValueError``) otherwise; never anything else.
    """
    view = memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != b"\x93NUMPY":
        raise NpyHeaderError("the magic string is not correct; expected b'\\x93NUMPY'")
    version = (view[6], view[7])
    if version == (1, 0):
        start, length = 10, int.from_bytes(view[8:10], "little")
    elif version == (2, 0):
        start, length = 12, int.from_bytes(view[8:12], "little") if len(view) >= 12 else -1
    else:
        raise UnsupportedNpyVersion(f".npy format version {version}; allowed: 1.0, 2.0")
    if not 0 < length <= MAX_NPY_HEADER_BYTES:
        raise NpyHeaderError(
            f".npy header length {length}; allowed: 1..{MAX_NPY_HEADER_BYTES} bytes"
        )
    if len(view) < start + length:
        raise NpyHeaderError(
            f"payload of {len(view)} bytes ends inside its .npy header ({start + length} bytes)"
        )
    raw = bytes(view[start : start + length])
    if any(b > 126 or (b < 32 and b not in (9, 10)) for b in raw):
        raise NpyHeaderError(".npy header holds bytes other than printable ASCII")
    descr, fortran, shape = _parse_header_dict(raw.decode("ascii"))
    try:
        with warnings.catch_warnings():  # deprecated aliases warn; they are refused below
            warnings.simplefilter("ignore")
            dtype = np.dtype(descr)
    except (TypeError, ValueError):
        raise NpyHeaderError(f".npy header: unknown dtype {descr!r}") from None
    if dtype.fields is not None or dtype.subdtype is not None:
        raise NpyHeaderError(f".npy header: dtype {descr!r} is not a plain dtype")
    return NpyHeader(version, shape, fortran, dtype, start + length)


def npy_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s ``.npy`` payload, without copying it.

    Flower's ``Array.numpy()`` runs ``np.load`` on a ``BytesIO``, which copies the
    payload; decoding n updates of d floats that way costs an extra n x d copy.
    The values are exactly ``np.load``'s. Raises ``ValueError`` for a payload that
    is not a plain, native-byte-order, non-object ``.npy`` of exactly the length
    its header promises.
    """
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    data = array.data
    head = read_npy_header(data)
    if head.dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    if not head.dtype.isnative:
        raise ValueError(f"byte order of dtype {head.dtype.str!r} is not this machine's")
    if len(data) - head.offset != head.data_bytes:
        raise ValueError(
            f"payload holds {len(data) - head.offset} bytes, header says "
            f"{list(head.shape)} x {head.dtype}"
        )
    count = math.prod(head.shape)
    flat = np.frombuffer(data, dtype=head.dtype, count=count, offset=head.offset)
    return flat.reshape(head.shape, order="F" if head.fortran else "C")


def npy_array(values: np.ndarray) -> Array:
    """An ``Array`` holding ``values`` as ``.npy`` bytes, byte-identical to
    ``Array(values)``, with one copy of the data instead of up to three.

    ``Array(ndarray)`` runs ``np.save`` into a growing ``BytesIO`` (which
    reallocates, and may copy, as it grows) and then takes its value; here the
    ``.npy`` header is written on its own and joined with a view of the data,
    so the only full-size allocation is the returned payload.
    """
    values = np.asarray(values)
    if not values.flags.c_contiguous:
        values = values.copy(order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if values.dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    header = io.BytesIO()
    meta = np.lib.format.header_data_from_array_1_0(values)
    try:
        np.lib.format.write_array_header_1_0(header, meta)
    except ValueError:  # header longer than 64 KiB: format 2.0, as np.save does
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, meta)
    data = b"".join((header.getvalue(), memoryview(values.reshape(-1)).cast("B")))
    return Array(
        dtype=str(values.dtype), shape=tuple(values.shape), stype="numpy.ndarray", data=data
    )


@dataclass(frozen=True)
class ArraySlot:
    """One named array of the model and its slice of the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    start: int
    stop: int


@dataclass(frozen=True)
class ModelLayout:
    """Names, shapes, dtypes and flat offsets of a model's arrays (in record order)."""

    slots: tuple[ArraySlot, ...]

    @property
    def dim(self) -> int:
        """Number of scalars ``d`` in the flat vector."""
        return self.slots[-1].stop if self.slots else 0

    @classmethod
    def of(cls, record: ArrayRecord) -> ModelLayout:
        """The layout of ``record``; every array must hold floating-point numbers."""
        slots, offset = [], 0
        for name, array in record.items():
            if np.dtype(array.dtype).kind != "f":
                raise ValueError(
                    f"array {name!r} has dtype {array.dtype}; Bastion aggregates floating-point "
                    "models only (no integer buffers such as BatchNorm's num_batches_tracked)"
                )
            size = int(np.prod(array.shape, dtype=np.int64))
            slots.append(
                ArraySlot(name, tuple(array.shape), str(array.dtype), offset, offset + size)
            )
            offset += size
        return cls(tuple(slots))

    def _view(self, record: ArrayRecord, slot: ArraySlot) -> torch.Tensor:
        """Read-only flat tensor over one array's payload (no copy), checked against ``slot``."""
        values = npy_view(record[slot.name])
        if values.shape != slot.shape or str(values.dtype) != slot.dtype:
            raise ValueError(
                f"array {slot.name!r} payload is {values.dtype}{list(values.shape)}, "
                f"expected {slot.dtype}{list(slot.shape)}"
            )
        with warnings.catch_warnings():  # read-only buffer: we only read from it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(values.reshape(-1))

    def flatten_into(
        self, record: ArrayRecord, out: torch.Tensor, *, minus: ArrayRecord | None = None
    ) -> None:
        """Copy ``record``'s arrays (minus ``minus``'s, if given) into the 1-D ``out``.

        One pass per array, straight from the message payloads: no intermediate copy
        of either record. Raises ``ValueError`` when a payload's real shape or dtype
        differs from this layout (the ``Array`` metadata can say one thing and the
        bytes another).
        """
        for slot in self.slots:
            piece = out[slot.start : slot.stop]
            if minus is None:
                piece.copy_(self._view(record, slot))
            else:
                torch.sub(self._view(record, slot), self._view(minus, slot), out=piece)

    def add_scaled(
        self,
        record: ArrayRecord,
        step: torch.Tensor,
        scale: float,
        chunk: int = 1 << 20,
        *,
        overwrite_step: bool = False,
    ) -> ArrayRecord:
        """``record + scale * step`` as a new ``ArrayRecord``, each entry rounded once.

        With ``overwrite_step`` (a CPU ``step`` the caller no longer needs), each
        array's sum is formed in ``step``'s own memory where the dtypes match, so
        the only full-size allocation left is the ``.npy`` payloads.

        With ``scale == 1`` and a float32 array, one float32 addition is already the
        correctly rounded sum (IEEE 754), so it is done directly into the result.
        Otherwise each chunk is formed in float64 in two reused buffers and rounded
        once to the array's dtype. The only full-size allocations are the result's
        arrays (and their ``.npy`` serialisation, which ``Array`` makes).
        """
        step = step.detach().to("cpu")
        arrays: OrderedDict[str, Array] = OrderedDict()
        big = min(chunk, max((slot.stop - slot.start for slot in self.slots), default=1))
        acc = torch.empty(big, dtype=torch.float64)
        tmp = torch.empty(big, dtype=torch.float64)
        for slot in self.slots:
            base = self._view(record, slot)
            dtype = torch.float64 if slot.dtype == "float64" else torch.float32
            piece_step = step[slot.start : slot.stop]
            reuse = overwrite_step and piece_step.dtype == dtype and piece_step.is_contiguous()
            result = piece_step if reuse else torch.empty(base.shape, dtype=dtype)
            if scale == 1.0 and dtype == base.dtype == piece_step.dtype:
                torch.add(base, piece_step, out=result)
            else:
                for lo in range(0, base.numel(), chunk):
                    hi = min(lo + chunk, base.numel())
                    a, b = acc[: hi - lo], tmp[: hi - lo]
                    a.copy_(base[lo:hi])
                    b.copy_(piece_step[lo:hi])
                    a.add_(b, alpha=scale)
                    result[lo:hi].copy_(a)
            piece = result.numpy().reshape(slot.shape).astype(slot.dtype, copy=False)
            arrays[slot.name] = npy_array(piece)
            del result, piece  # free this array before the next one is built
        return ArrayRecord(arrays)

    def flatten(self, record: ArrayRecord, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``record`` as one flat tensor of length :attr:`dim`."""
        out = torch.empty(self.dim, dtype=dtype)
        self.flatten_into(record, out)
        return out
