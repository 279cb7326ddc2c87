"""The layout of a model inside an ``ArrayRecord``: names, shapes, dtypes, offsets.

Robust aggregation works on flat vectors: every client's update becomes one row
of an ``(n, d)`` tensor. :class:`ModelLayout` records where each array lives in
that row so a flat aggregate turns back into an ``ArrayRecord`` with the global
model's exact keys, shapes and dtypes.
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


class UnsupportedNpyVersion(ValueError):
    """A ``.npy`` header of a format version other than 1.0 and 2.0."""


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
        """Bytes of data the header promises."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_npy_header(data: bytes) -> NpyHeader:
    """Parse the ``.npy`` header at the start of ``data`` (format 1.0 or 2.0, what
    ``np.save`` writes), reading nothing past it. Raises ``ValueError`` otherwise."""
    header = io.BytesIO(data)  # shares the bytes object, no copy
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    else:
        raise UnsupportedNpyVersion(f".npy format version {version}; allowed: 1.0, 2.0")
    return NpyHeader(version, tuple(shape), bool(fortran), dtype, header.tell())


def npy_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s ``.npy`` payload, without copying it.

    Flower's ``Array.numpy()`` runs ``np.load`` on a ``BytesIO``, which copies the
    payload; decoding n updates of d floats that way costs an extra n x d copy.
    Raises ``ValueError`` for a payload that is not a plain (non-object) ``.npy``.
    """
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    data = array.data
    head = read_npy_header(data)
    if head.dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    if len(data) - head.offset != head.data_bytes:
        raise ValueError(
            f"payload holds {len(data) - head.offset} bytes, header says "
            f"{list(head.shape)} x {head.dtype}"
        )
    count = int(np.prod(head.shape, dtype=np.int64))
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
