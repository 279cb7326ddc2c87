"""What one federated client holds: its partition of a dataset, split into train/test.

Flower starts a fresh ClientApp process for every message, so the partition
indices are computed once (with flwr-datasets partitioners, see
:mod:`task.partition`) and kept in Bastion's on-disk cache; later rounds load
them in milliseconds without importing the partitioning libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from task.cache import cached_arrays
from task.datasets import ArrayDataset, load_dataset
from task.partition import partition_indices, split_train_test


@dataclass(frozen=True)
class PartitionSpec:
    """How a dataset is cut into client partitions (identical on every node of a run)."""

    dataset: str
    num_partitions: int
    partitioner: str
    seed: int
    alpha: float = 0.5
    classes_per_partition: int = 2
    test_fraction: float = 0.2

    def cache_key(self) -> dict[str, object]:
        """The fields that determine the partition (all of them)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class ClientData:
    """A client's local training and test split."""

    train: ArrayDataset
    test: ArrayDataset


def client_indices(
    labels: np.ndarray, spec: PartitionSpec, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the training set) of one partition's local train and test split."""
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is not allowed; allowed: 0..{spec.num_partitions - 1}"
        )

    def compute() -> dict[str, np.ndarray]:

        parts = partition_indices(
            labels,
            spec.num_partitions,
            spec.partitioner,
            seed=spec.seed,
            alpha=spec.alpha,
            classes_per_partition=spec.classes_per_partition,
        )
        arrays: dict[str, np.ndarray] = {}
        for pid, idx in enumerate(parts):
            train, test = split_train_test(idx, spec.test_fraction, seed=spec.seed + pid)
            arrays[f"train_{pid}"], arrays[f"test_{pid}"] = train, test
        return arrays

    key = spec.cache_key() | {"num_labels": len(labels), "labels_sum": int(labels.sum())}
    arrays = cached_arrays("partitions", key, compute)
    return arrays[f"train_{partition_id}"], arrays[f"test_{partition_id}"]


def load_client_data(
    spec: PartitionSpec, partition_id: int, data_dir: str | Path | None = None
) -> ClientData:
    """Load the dataset (cached) and return partition ``partition_id``'s train/test split.

    The training set is kept in this process for the next call (see
    :func:`training_set`), so a long-lived ClientApp process, as Flower's Simulation
    Engine runs them, does not re-read it for every message.
    """
    train_full = training_set(spec.dataset, data_dir)
    train_idx, test_idx = client_indices(train_full.y, spec, partition_id)
    return ClientData(train=train_full.subset(train_idx), test=train_full.subset(test_idx))


# (dataset, data dir) -> training set, for the process's lifetime; one entry.
_TRAIN_SETS: dict[tuple[str, str], ArrayDataset] = {}


def training_set(dataset: str, data_dir: str | Path | None = None) -> ArrayDataset:
    """The dataset's training split, loaded once per process.

    Reading Fashion-MNIST from the disk cache costs ~0.1 s (220 MB) per call; in a
    Ray actor of the Simulation Engine that is once per message. A deployed
    SuperNode starts a new ClientApp process per message and gains nothing here.
    The arrays are made read-only: every caller in the process shares them.
    """
    key = (dataset, str(data_dir or ""))
    if key not in _TRAIN_SETS:
        train, _ = load_dataset(dataset, data_dir or None)
        train.x.flags.writeable = False
        train.y.flags.writeable = False
        _TRAIN_SETS.clear()
        _TRAIN_SETS[key] = train
    return _TRAIN_SETS[key]
