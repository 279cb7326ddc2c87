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


def npy_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s ``.npy`` payload, without copying it.

    Flower's ``Array.numpy()`` runs ``np.load`` on a ``BytesIO``, which copies the
    payload; decoding n updates of d floats that way costs an extra n x d copy.
    Raises ``ValueError`` for a payload that is not a plain (non-object) ``.npy``.
    """
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported serialization type {array.stype!r}")
    data = array.data
    header = io.BytesIO(data)
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    else:
        return np.asarray(array.numpy())
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header.tell() != count * dtype.itemsize:
        raise ValueError(
            f"payload holds {len(data) - header.tell()} bytes, header says {count} x {dtype}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=header.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


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
        self, record: ArrayRecord, step: torch.Tensor, scale: float, chunk: int = 1 << 20
    ) -> ArrayRecord:
        """``record + scale * step`` as a new ``ArrayRecord`` (sums in float64, in chunks).

        Works array by array and chunk by chunk, so the only full-size allocations
        are the result's arrays.
        """
        step = step.detach().to("cpu")
        arrays: OrderedDict[str, Array] = OrderedDict()
        for slot in self.slots:
            base = self._view(record, slot)
            result = torch.empty(
                base.shape, dtype=torch.float64 if slot.dtype == "float64" else torch.float32
            )
            for lo in range(0, base.numel(), chunk):
                hi = min(lo + chunk, base.numel())
                total = (
                    base[lo:hi].double() + scale * step[slot.start + lo : slot.start + hi].double()
                )
                result[lo:hi] = total.to(result.dtype)
            piece = result.numpy().reshape(slot.shape).astype(slot.dtype, copy=False)
            arrays[slot.name] = Array(np.ascontiguousarray(piece))
        return ArrayRecord(arrays)

    def flatten(self, record: ArrayRecord, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``record`` as one flat tensor of length :attr:`dim`."""
        out = torch.empty(self.dim, dtype=dtype)
        self.flatten_into(record, out)
        return out
