"""The layout of a model inside an ``ArrayRecord``: names, shapes, dtypes, offsets.

Robust aggregation works on flat vectors: every client's update becomes one row
of an ``(n, d)`` tensor. :class:`ModelLayout` records where each array lives in
that row so a flat aggregate turns back into an ``ArrayRecord`` with the global
model's exact keys, shapes and dtypes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


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

    def flatten_into(self, record: ArrayRecord, out: torch.Tensor) -> None:
        """Copy ``record``'s arrays into the 1-D tensor ``out`` (length :attr:`dim`)."""
        for slot in self.slots:
            values = torch.from_numpy(record[slot.name].numpy()).reshape(-1)
            out[slot.start : slot.stop].copy_(values)

    def flatten(self, record: ArrayRecord, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``record`` as one flat tensor of length :attr:`dim`."""
        out = torch.empty(self.dim, dtype=dtype)
        self.flatten_into(record, out)
        return out

    def unflatten(self, vector: torch.Tensor) -> ArrayRecord:
        """Turn a flat vector back into an ``ArrayRecord`` with this layout's keys and dtypes."""
        vector = vector.detach().to("cpu")
        arrays: OrderedDict[str, Array] = OrderedDict()
        for slot in self.slots:
            piece = vector[slot.start : slot.stop].reshape(slot.shape).numpy()
            arrays[slot.name] = Array(np.ascontiguousarray(piece.astype(slot.dtype, copy=False)))
        return ArrayRecord(arrays)
