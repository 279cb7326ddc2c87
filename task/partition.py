"""Split a labelled dataset into federated partitions (one per SuperNode).

The splits are computed with the partitioners of Flower Datasets
(``flwr_datasets.partitioner``) on a tiny Hugging Face ``datasets.Dataset`` that
holds only the labels and the original row index; each partition is returned as
the sorted array of row indices it owns, so the caller can index its own arrays
or tensors without going through Hugging Face datasets.

Partitioners (``PARTITIONERS``):

- ``"iid"``: uniformly random, equal-size partitions (sizes differ by at most one).
- ``"dirichlet"``: label-skewed partitions; for every class, the proportions of its
  samples that go to each partition are drawn from ``Dir(alpha * 1)``
  (Yurochkin et al., 2019, "Bayesian nonparametric federated learning of neural
  networks"; Hsu, Qi & Brown, 2019, "Measuring the effects of non-identical data
  distribution for federated visual classification"). Small ``alpha`` is very
  heterogeneous, large ``alpha`` tends to IID.
- ``"label-sorted"``: the non-IID split of Karimireddy, He & Jaggi (ICLR 2022,
  "Byzantine-robust learning on heterogeneous datasets via resampling", Sec. 6):
  sort the samples by label and cut the sorted sequence into ``num_partitions``
  contiguous, equal shards; partition ``i`` gets shard ``i``.
- ``"pathological"``: every partition holds samples of exactly
  ``classes_per_partition`` classes (Li, Diao, Chen & He, ICDE 2022, "Federated
  learning on non-IID data silos: an experimental study", the "#C=k" split).

Importing this module is cheap: ``datasets`` and ``flwr_datasets`` (about 2 s of
imports) are loaded inside :func:`partition_indices` only, because every Flower
ClientApp process imports this module. Callers should cache the result.
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

__all__ = [
    "PARTITIONERS",
    "label_distribution",
    "partition_indices",
    "split_train_test",
]

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "label-sorted", "pathological")

# The HF column names of the tiny dataset handed to the flwr-datasets partitioners.
_LABEL = "label"
_IDX = "idx"

# Minimum number of samples per partition guaranteed for "dirichlet".
_DIRICHLET_MIN_PARTITION_SIZE = 1


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
) -> list[np.ndarray]:
    """Split the samples with the given ``labels`` into ``num_partitions`` partitions.

    Args:
        labels: 1-D integer array, the class label of every sample.
        num_partitions: number of partitions, ``1 <= num_partitions <= len(labels)``.
        partitioner: one of :data:`PARTITIONERS` (see the module docstring).
        seed: non-negative integer; the result is a deterministic function of all
            arguments. Before partitioning, the rows are shuffled with this seed
            (as ``flwr_datasets.FederatedDataset`` does by default), so that no
            partition depends on the storage order of the dataset.
        alpha: Dirichlet concentration (``"dirichlet"`` only; finite, ``> 0``).
        classes_per_partition: classes per partition (``"pathological"`` only;
            between 1 and the number of distinct labels).

    Returns:
        A list of ``num_partitions`` sorted ``int64`` arrays; entry ``i`` holds the
        indices into ``labels`` of the samples of partition ``i``. The arrays are
        pairwise disjoint. For ``"iid"``, ``"dirichlet"`` and ``"label-sorted"``
        they cover every index exactly once and no partition is empty. For
        ``"pathological"`` (Flower's ``PathologicalPartitioner`` in
        ``"first-deterministic"`` mode, the mode of Li et al., 2022) every
        partition holds exactly ``classes_per_partition`` classes and at least one
        sample of each; partition ``p``'s first class is ``p % num_classes``, so
        when ``num_partitions >= num_classes`` every sample is used. Otherwise the
        samples of classes that no partition drew are dropped and a
        ``UserWarning`` names them.

    Raises:
        ValueError: an argument is out of range (the message names the parameter,
            its value and what is allowed), or the split is impossible (e.g.
            ``"pathological"`` would need to give one class to more partitions than
            it has samples).

    ``"dirichlet"`` uses Flower's ``DirichletPartitioner`` with
    ``min_partition_size=0`` (one Dirichlet draw, no resampling) and then
    guarantees every partition at least one sample: Flower's resampling loop gives
    up after 11 draws, and with tiny ``alpha`` and many partitions (e.g. 1437
    digits over 100 partitions at ``alpha=0.05``, a partition receives no sample
    of a given class with probability about 0.8, so about 1 in 10 partitions is
    empty, measured) nearly every draw leaves some partition empty. Each
    empty partition instead receives one random sample taken from the currently
    largest partition; this moves at most ``num_partitions - 1`` samples and keeps
    the label skew of the draw.
    """
    labels = _check_labels(labels)
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"partitioner={partitioner!r} is unknown; allowed: "
            + ", ".join(repr(p) for p in PARTITIONERS)
        )
    num_partitions = _check_int(
        "num_partitions", num_partitions, 1, len(labels), high_is="the number of samples"
    )
    seed = _check_seed(seed)
    classes = np.unique(labels)

    if partitioner == "dirichlet":
        alpha = _check_alpha(alpha)
    if partitioner == "pathological":
        classes_per_partition = _check_int(
            "classes_per_partition",
            classes_per_partition,
            1,
            len(classes),
            high_is="the number of distinct labels",
        )

    import datasets  # lazy: ~2 s of imports, see the module docstring
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    dataset = datasets.Dataset.from_dict(
        {_LABEL: labels, _IDX: np.arange(len(labels), dtype=np.int64)}
    ).shuffle(seed=seed, keep_in_memory=True)

    part: Any
    if partitioner == "iid":
        # IidPartitioner cuts contiguous, equal shards (Dataset.shard(contiguous=True),
        # sizes differ by at most one); the seeded shuffle above makes them random.
        part = IidPartitioner(num_partitions=num_partitions)
    elif partitioner == "dirichlet":
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=_LABEL,
            alpha=alpha,
            min_partition_size=0,  # see the docstring: we top up empty partitions
            self_balancing=False,
            shuffle=False,  # we sort each partition's indices anyway
            seed=seed,
        )
    elif partitioner == "label-sorted":
        part = _label_sorted_partitioner_class()(num_partitions=num_partitions)
    else:
        part = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=_LABEL,
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    part.dataset = dataset

    with warnings.catch_warnings():
        # PathologicalPartitioner warns about unused classes with advice that names
        # a parameter it no longer has; we issue our own warning below.
        warnings.simplefilter("ignore", UserWarning)
        try:
            parts = [_read_indices(part.load_partition(i)) for i in range(num_partitions)]
        except ValueError as err:
            raise ValueError(
                f"partitioner={partitioner!r} cannot split {len(labels)} samples of "
                f"{len(classes)} classes into num_partitions={num_partitions}"
                + (
                    f" with classes_per_partition={classes_per_partition}"
                    if partitioner == "pathological"
                    else ""
                )
                + f": {err}"
            ) from err

    if partitioner == "dirichlet":
        parts = _top_up_empty(parts, _DIRICHLET_MIN_PARTITION_SIZE, seed=seed)

    _check_result(parts, labels, partitioner)
    return parts


@functools.cache
def _label_sorted_partitioner_class() -> type:
    """Define (once, lazily) the flwr-datasets partitioner for ``"label-sorted"``.

    None of Flower's partitioners does exactly what Karimireddy et al. (2022)
    describe. ``ShardPartitioner`` (flwr-datasets 0.6.1) sorts by label and cuts
    shards, but (a) it always assigns shards to partitions through a random
    permutation (``self._rng.permutation``, whatever ``shuffle`` says), so
    partition ``i`` does not get shard ``i`` and partitions are not in label
    order; (b) with one shard per partition every shard has
    ``floor(N / num_partitions)`` samples and only ``num_partitions`` shards are
    assigned, so ``N % num_partitions`` samples are dropped
    (``keep_incomplete_shard=True`` only adds a short shard to the random draw);
    (c) its tie order is whatever ``Dataset.sort`` yields. The subclass below sorts stably by label
    (ties keep the order of the given dataset, which ``partition_indices``
    shuffles with the seed) and cuts ``num_partitions`` contiguous shards with
    ``Dataset.shard(contiguous=True)`` -- the same cut ``IidPartitioner`` makes.
    The class is built inside a function so importing this module does not import
    ``flwr_datasets``.
    """
    from flwr_datasets.partitioner import Partitioner

    class LabelSortedPartitioner(Partitioner):
        """Sort by label (stable) and give contiguous shard ``i`` to partition ``i``.

        Shard sizes differ by at most one (the first ``N % num_partitions`` shards
        have one sample more). Karimireddy, He & Jaggi, ICLR 2022, Sec. 6.
        """

        def __init__(self, num_partitions: int, partition_by: str = _LABEL) -> None:
            super().__init__()
            if num_partitions < 1:
                raise ValueError(f"num_partitions={num_partitions} must be >= 1")
            self._num_partitions = num_partitions
            self._partition_by = partition_by
            self._sorted: datasets.Dataset | None = None

        @property
        def num_partitions(self) -> int:
            """Total number of partitions."""
            return self._num_partitions

        def load_partition(self, partition_id: int) -> datasets.Dataset:
            """Return shard ``partition_id`` of the label-sorted dataset."""
            if self._num_partitions > self.dataset.num_rows:
                raise ValueError(
                    f"num_partitions={self._num_partitions} exceeds the number of "
                    f"samples ({self.dataset.num_rows})"
                )
            if self._sorted is None:
                keys = self.dataset.with_format("arrow")[self._partition_by].to_numpy()
                order = np.argsort(keys, kind="stable")
                self._sorted = self.dataset.select(order, keep_in_memory=True)
            return self._sorted.shard(
                num_shards=self._num_partitions, index=partition_id, contiguous=True
            )

    return LabelSortedPartitioner


def _read_indices(partition: datasets.Dataset) -> np.ndarray:
    """Return the sorted ``int64`` original row indices held by one HF partition."""
    column = partition.with_format("arrow")[_IDX].to_numpy()
    return np.sort(np.asarray(column, dtype=np.int64))


def _top_up_empty(parts: list[np.ndarray], minimum: int, *, seed: int) -> list[np.ndarray]:
    """Move random samples from the largest partitions until each has ``minimum``.

    Deterministic given ``seed``; the donor is always the currently largest
    partition (lowest id on ties), which has more than ``minimum`` samples
    whenever ``minimum * len(parts) <= total`` -- guaranteed by the callers.
    """
    rng = np.random.default_rng([seed, 0x70F0])
    parts = [p.copy() for p in parts]
    for i in range(len(parts)):
        while len(parts[i]) < minimum:
            donor = int(np.argmax([len(p) for p in parts]))
            take = int(rng.integers(len(parts[donor])))
            parts[i] = np.sort(np.append(parts[i], parts[donor][take]))
            parts[donor] = np.delete(parts[donor], take)
    return parts


def _check_result(parts: list[np.ndarray], labels: np.ndarray, partitioner: str) -> None:
    """Assert the invariants promised by :func:`partition_indices` (cheap, O(N))."""
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if len(np.unique(flat)) != len(flat):
        raise RuntimeError(f"partitioner={partitioner!r} produced overlapping partitions")
    if partitioner != "pathological" and (
        len(flat) != len(labels) or any(len(p) == 0 for p in parts)
    ):
        raise RuntimeError(
            f"partitioner={partitioner!r} did not assign every sample to a non-empty "
            f"partition ({len(flat)} of {len(labels)} assigned)"
        )
    if partitioner == "pathological" and len(flat) < len(labels):
        mask = np.ones(len(labels), dtype=bool)
        mask[flat] = False
        dropped = np.unique(labels[mask])
        warnings.warn(
            f"partitioner='pathological': classes {dropped.tolist()} were drawn by no "
            f"partition (num_partitions={len(parts)}); their {int(mask.sum())} samples "
            "are not used. Use num_partitions >= the number of classes to use all data.",
            UserWarning,
            stacklevel=3,
        )


def split_train_test(
    indices: np.ndarray, test_fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one partition's sample indices into a local train and test set.

    ``round(test_fraction * n)`` of the ``n`` indices, chosen uniformly at random
    with ``seed``, form the test set, clipped so that both sets are non-empty when
    ``n >= 2`` (a single-sample partition gives it to train and has an empty test
    set). Both returned arrays are sorted ``int64``, disjoint, and together hold
    exactly the given indices. Deterministic given ``(indices, test_fraction, seed)``.

    Raises:
        ValueError: ``indices`` is not a non-empty 1-D integer array, or
            ``test_fraction`` is not in the open interval (0, 1).
    """
    arr = np.asarray(indices)
    if arr.ndim != 1 or arr.size == 0 or not _is_integer_dtype(arr.dtype):
        raise ValueError(
            f"indices must be a non-empty 1-D integer array, got shape {arr.shape} "
            f"and dtype {arr.dtype}"
        )
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float | np.floating):
        raise ValueError(f"test_fraction={test_fraction!r} must be a float in (0, 1)")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in the open interval (0, 1)")
    seed = _check_seed(seed)
    n = arr.size
    n_test = 0 if n == 1 else min(max(round(float(test_fraction) * n), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    arr = arr.astype(np.int64, copy=False)
    return np.sort(arr[perm[n_test:]]), np.sort(arr[perm[:n_test]])


def label_distribution(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-partition class proportions.

    Returns a float64 array of shape ``(len(parts), num_classes)`` whose entry
    ``[i, c]`` is the fraction of partition ``i``'s samples that have label ``c``;
    each row sums to 1, except that an empty partition gives a row of zeros.

    Raises:
        ValueError: a label used by some partition is outside ``[0, num_classes)``.
    """
    labels = np.asarray(labels)
    num_classes = _check_int("num_classes", num_classes, 1, None)
    out = np.zeros((len(parts), num_classes), dtype=np.float64)
    for i, idx in enumerate(parts):
        part_labels = labels[np.asarray(idx, dtype=np.int64)]
        if part_labels.size == 0:
            continue
        if part_labels.min() < 0 or part_labels.max() >= num_classes:
            raise ValueError(
                f"partition {i} has labels outside [0, num_classes={num_classes}): "
                f"min {part_labels.min()}, max {part_labels.max()}"
            )
        out[i] = np.bincount(part_labels, minlength=num_classes) / part_labels.size
    return out


# --------------------------------------------------------------------------- checks


def _is_integer_dtype(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) and dtype != np.bool_


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not _is_integer_dtype(arr.dtype):
        raise ValueError(
            f"labels must be a non-empty 1-D integer array, got shape {arr.shape} "
            f"and dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=False)


def _check_int(
    name: str, value: Any, low: int, high: int | None, *, high_is: str | None = None
) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``[low, high]``, else raise.

    ``high_is`` says what the upper bound is (e.g. "the number of samples").
    """
    if high is None:
        allowed = f"an integer >= {low}"
    else:
        allowed = f"an integer in [{low}, {high}]"
        if high_is is not None:
            allowed += f" ({high} = {high_is})"
    try:
        if isinstance(value, bool):
            raise TypeError
        ivalue = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is not allowed; must be {allowed}") from None
    if ivalue < low or (high is not None and ivalue > high):
        raise ValueError(f"{name}={ivalue} is not allowed; must be {allowed}")
    return ivalue


def _check_seed(seed: Any) -> int:
    return _check_int("seed", seed, 0, None)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.integer | np.floating):
        raise ValueError(f"alpha={alpha!r} is not allowed; must be a finite number > 0")
    value = float(alpha)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"alpha={alpha!r} is not allowed; must be a finite number > 0")
    return value
