"""Tests for task.partition: federated splits built on flwr-datasets partitioners."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from task.partition import (
    PARTITIONERS,
    label_distribution,
    partition_indices,
    split_train_test,
)

NUM_CLASSES = 10
COVERING = ("iid", "dirichlet", "label-sorted")


def random_labels(n: int, *, seed: int = 1234, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Labels in random storage order, every class present, mildly unbalanced."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.5, 1.5, size=num_classes)
    labels = rng.choice(num_classes, size=n, p=probs / probs.sum())
    labels[:num_classes] = np.arange(num_classes)  # every class present
    return rng.permutation(labels)


def assert_well_formed(parts: list[np.ndarray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for p in parts:
        assert isinstance(p, np.ndarray)
        assert p.dtype == np.int64
        assert p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices must be strictly increasing (sorted, unique)"
        if p.size:
            assert p[0] >= 0 and p[-1] < n
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat), "partitions overlap"


def mean_tv_to_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over partitions of the total-variation distance to the global label mix."""
    dist = label_distribution(labels, parts, NUM_CLASSES)
    global_dist = np.bincount(labels, minlength=NUM_CLASSES) / len(labels)
    return float(np.mean(0.5 * np.abs(dist - global_dist).sum(axis=1)))


# ----------------------------------------------------------------- structure


@pytest.mark.parametrize("partitioner", PARTITIONERS)
@pytest.mark.parametrize(("n", "num_partitions"), [(1000, 10), (997, 13), (300, 50)])
def test_parts_disjoint_sorted_int64_and_cover_all(
    partitioner: str, n: int, num_partitions: int
) -> None:
    # num_partitions >= NUM_CLASSES: pathological (first-deterministic) uses every class.
    labels = random_labels(n)
    parts = partition_indices(labels, num_partitions, partitioner, seed=3)
    assert_well_formed(parts, n, num_partitions)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("partitioner", COVERING)
def test_single_partition_holds_everything(partitioner: str) -> None:
    labels = random_labels(200)
    (part,) = partition_indices(labels, 1, partitioner, seed=0)
    np.testing.assert_array_equal(part, np.arange(200))


@pytest.mark.parametrize("partitioner", COVERING)
def test_as_many_partitions_as_samples_gives_one_each(partitioner: str) -> None:
    labels = random_labels(40)
    parts = partition_indices(labels, 40, partitioner, seed=0, alpha=0.1)
    assert sorted(len(p) for p in parts) == [1] * 40
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(40))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=60).map(np.array),
    data=st.data(),
)
def test_property_covering_partitioners(labels: np.ndarray, data: st.DataObject) -> None:
    num_partitions = data.draw(st.integers(1, len(labels)), label="num_partitions")
    partitioner = data.draw(st.sampled_from(COVERING), label="partitioner")
    alpha = data.draw(st.sampled_from([0.05, 0.5, 10.0]), label="alpha")
    parts = partition_indices(labels, num_partitions, partitioner, seed=7, alpha=alpha)
    assert_well_formed(parts, len(labels), num_partitions)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 1


# ----------------------------------------------------------------- determinism


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_same_seed_same_partitions(partitioner: str) -> None:
    labels = random_labels(500)
    a = partition_indices(labels, 10, partitioner, seed=11, alpha=0.3, classes_per_partition=3)
    b = partition_indices(labels, 10, partitioner, seed=11, alpha=0.3, classes_per_partition=3)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_different_seed_different_partitions(partitioner: str) -> None:
    labels = random_labels(500)
    a = partition_indices(labels, 10, partitioner, seed=1)
    b = partition_indices(labels, 10, partitioner, seed=2)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------- iid


@pytest.mark.parametrize(("n", "num_partitions"), [(1000, 10), (997, 13), (101, 100)])
def test_iid_sizes_differ_by_at_most_one(n: int, num_partitions: int) -> None:
    parts = partition_indices(random_labels(n), num_partitions, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n


def test_iid_is_random_even_when_data_is_stored_sorted_by_label() -> None:
    # Flower's IidPartitioner alone cuts contiguous blocks; the seeded shuffle must
    # make every partition a random sample, so each sees (almost) every class.
    labels = np.repeat(np.arange(NUM_CLASSES), 100)
    parts = partition_indices(labels, 10, "iid", seed=0)
    for p in parts:
        assert len(np.unique(labels[p])) >= 8
    assert mean_tv_to_global(labels, parts) < 0.25


# ----------------------------------------------------------------- label-sorted


@pytest.mark.parametrize(("n", "num_partitions"), [(1000, 10), (997, 13), (1000, 7), (50, 50)])
def test_label_sorted_contiguous_in_label_order_and_balanced(n: int, num_partitions: int) -> None:
    labels = random_labels(n)
    parts = partition_indices(labels, num_partitions, "label-sorted", seed=5)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for left, right in itertools.pairwise(parts):
        assert labels[left].max() <= labels[right].min()
    # Equivalently: reading the partitions in id order lists the labels sorted.
    concatenated = np.concatenate([np.sort(labels[p]) for p in parts])
    np.testing.assert_array_equal(concatenated, np.sort(labels))


def test_label_sorted_balanced_classes_give_one_class_per_partition() -> None:
    # Karimireddy, He & Jaggi (2022): with C equal classes and C workers, worker i
    # holds exactly class i.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(NUM_CLASSES), 37))
    parts = partition_indices(labels, NUM_CLASSES, "label-sorted", seed=0)
    np.testing.assert_array_equal(
        label_distribution(labels, parts, NUM_CLASSES), np.eye(NUM_CLASSES)
    )


def test_label_sorted_breaks_ties_in_seeded_random_order() -> None:
    labels = np.zeros(100, dtype=np.int64)  # one class: everything is a tie
    firsts = [partition_indices(labels, 2, "label-sorted", seed=s)[0] for s in range(3)]
    for f in firsts:
        assert len(f) == 50
        assert not np.array_equal(f, np.arange(50)), "ties must not keep storage order"
    assert not np.array_equal(firsts[0], firsts[1])
    np.testing.assert_array_equal(
        firsts[0], partition_indices(labels, 2, "label-sorted", seed=0)[0]
    )


# ----------------------------------------------------------------- pathological


@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize("num_partitions", [10, 25])
def test_pathological_each_partition_has_k_classes(k: int, num_partitions: int) -> None:
    labels = random_labels(1000)
    parts = partition_indices(
        labels, num_partitions, "pathological", seed=2, classes_per_partition=k
    )
    assert_well_formed(parts, len(labels), num_partitions)
    for pid, p in enumerate(parts):
        classes = np.unique(labels[p])
        # "first-deterministic" (Li et al., 2022): exactly k classes, the first p % C.
        assert len(classes) == k
        assert pid % NUM_CLASSES in classes
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_pathological_fewer_partitions_than_classes_drops_unused_classes_with_warning() -> None:
    labels = random_labels(1000)
    with pytest.warns(UserWarning, match="pathological"):
        parts = partition_indices(labels, 3, "pathological", seed=0, classes_per_partition=2)
    assert_well_formed(parts, len(labels), 3)
    used = set()
    for p in parts:
        classes = set(np.unique(labels[p]).tolist())
        assert len(classes) == 2
        used |= classes
    # Exactly the samples of the classes some partition drew are kept.
    expected = np.flatnonzero(np.isin(labels, sorted(used)))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), expected)
    assert len(used) < NUM_CLASSES


# ----------------------------------------------------------------- dirichlet


def test_dirichlet_heterogeneity_grows_as_alpha_shrinks() -> None:
    labels = random_labels(1000)
    tv = {
        alpha: np.mean(
            [
                mean_tv_to_global(
                    labels, partition_indices(labels, 10, "dirichlet", seed=s, alpha=alpha)
                )
                for s in range(4)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert tv[0.1] > tv[1.0] > tv[100.0]
    iid_tv = mean_tv_to_global(labels, partition_indices(labels, 10, "iid", seed=0))
    assert tv[0.1] > 2 * iid_tv


@pytest.mark.parametrize("num_partitions", [10, 50, 100])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_dirichlet_tiny_alpha_many_partitions_digits_scale(
    num_partitions: int, alpha: float
) -> None:
    # The size of scikit-learn digits' training split: a plain Dirichlet draw leaves
    # partitions empty here; every partition must still get at least one sample.
    labels = random_labels(1437)
    parts = partition_indices(labels, num_partitions, "dirichlet", seed=num_partitions, alpha=alpha)
    assert_well_formed(parts, len(labels), num_partitions)
    assert min(len(p) for p in parts) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"partitioner": "shards"},
            r"partitioner='shards'.*'iid'.*'dirichlet'.*'label-sorted'.*'pathological'",
        ),
        ({"num_partitions": 0}, r"num_partitions=0.*\[1, 100\]"),
        ({"num_partitions": 101}, r"num_partitions=101.*\[1, 100\].*number of samples"),
        ({"num_partitions": 2.5}, r"num_partitions=2\.5"),
        ({"num_partitions": True}, r"num_partitions=True"),
        ({"partitioner": "dirichlet", "alpha": 0.0}, r"alpha=0\.0.*> 0"),
        ({"partitioner": "dirichlet", "alpha": -1.0}, r"alpha=-1\.0.*> 0"),
        ({"partitioner": "dirichlet", "alpha": float("nan")}, r"alpha=nan"),
        ({"partitioner": "dirichlet", "alpha": float("inf")}, r"alpha=inf"),
        (
            {"partitioner": "pathological", "classes_per_partition": 0},
            r"classes_per_partition=0.*\[1, 10\]",
        ),
        (
            {"partitioner": "pathological", "classes_per_partition": 11},
            r"classes_per_partition=11.*\[1, 10\].*distinct labels",
        ),
        ({"seed": -1}, r"seed=-1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs: dict, pattern: str) -> None:
    args = {"num_partitions": 10, "partitioner": "iid", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=pattern):
        partition_indices(random_labels(100), **args)


@pytest.mark.parametrize(
    "labels",
    [np.array([], dtype=np.int64), np.zeros((10, 2), dtype=np.int64), np.linspace(0, 1, 10)],
    ids=["empty", "2-d", "float"],
)
def test_bad_labels_raise(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="labels"):
        partition_indices(labels, 1, "iid", seed=0)


def test_pathological_impossible_split_raises_clear_value_error() -> None:
    # Class 0 has one sample but "first-deterministic" gives it to partitions 0 and 10.
    labels = np.concatenate([[0], np.repeat(np.arange(1, NUM_CLASSES), 50)])
    with pytest.raises(
        ValueError, match=r"pathological.*num_partitions=20.*classes_per_partition=1"
    ):
        partition_indices(labels, 20, "pathological", seed=0, classes_per_partition=1)


def test_importing_module_does_not_import_datasets_libraries() -> None:
    code = (
        "import sys, task.partition; "
        "bad = [m for m in ('datasets', 'flwr_datasets') if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------- split_train_test


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.2), (37, 0.1), (10, 0.5), (1000, 0.05)])
def test_split_train_test_disjoint_covering_and_respects_fraction(n: int, fraction: float) -> None:
    indices = np.sort(np.random.default_rng(0).choice(10 * n, size=n, replace=False))
    train, test = split_train_test(indices, fraction, seed=3)
    for arr in (train, test):
        assert arr.dtype == np.int64
        assert np.all(np.diff(arr) > 0)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    assert len(test) == round(fraction * n)


def test_split_train_test_deterministic_and_seed_dependent() -> None:
    indices = np.arange(100, 200)
    a = split_train_test(indices, 0.3, seed=1)
    b = split_train_test(indices, 0.3, seed=1)
    c = split_train_test(indices, 0.3, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    # A random subset, not the first or last block.
    assert not np.array_equal(a[1], indices[:30]) and not np.array_equal(a[1], indices[-30:])


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"),
    [(1, 0.5, 0), (2, 0.01, 1), (2, 0.99, 1), (10, 0.99, 9), (10, 0.01, 1)],
)
def test_split_train_test_edge_sizes(n: int, fraction: float, n_test: int) -> None:
    train, test = split_train_test(np.arange(n), fraction, seed=0)
    assert len(test) == n_test
    assert len(train) == n - n_test >= 1


@settings(max_examples=100, deadline=None)
@given(
    indices=st.sets(st.integers(0, 10_000), min_size=1, max_size=300).map(
        lambda s: np.array(sorted(s), dtype=np.int64)
    ),
    fraction=st.floats(0.001, 0.999),
    seed=st.integers(0, 2**32),
)
def test_split_train_test_property(indices: np.ndarray, fraction: float, seed: int) -> None:
    train, test = split_train_test(indices, fraction, seed=seed)
    assert len(train) >= 1
    assert len(test) >= 1 or len(indices) == 1
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    if len(indices) >= 2:
        assert abs(len(test) - fraction * len(indices)) < 1.0


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_train_test_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(np.arange(10), fraction, seed=0)


@pytest.mark.parametrize(
    "indices",
    [np.array([], dtype=np.int64), np.zeros((2, 2), dtype=np.int64), np.array([0.5, 1.5])],
    ids=["empty", "2-d", "float"],
)
def test_split_train_test_bad_indices(indices: np.ndarray) -> None:
    with pytest.raises(ValueError, match="indices"):
        split_train_test(indices, 0.2, seed=0)


# ----------------------------------------------------------------- label_distribution


def test_label_distribution_hand_computed() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5]), np.array([], dtype=np.int64)]
    expected = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(label_distribution(labels, parts, 4), expected)


def test_label_distribution_rows_sum_to_one() -> None:
    labels = random_labels(500)
    parts = partition_indices(labels, 10, "dirichlet", seed=0, alpha=0.3)
    dist = label_distribution(labels, parts, NUM_CLASSES)
    assert dist.shape == (10, NUM_CLASSES)
    np.testing.assert_allclose(dist.sum(axis=1), 1.0)
    counts = dist * np.array([len(p) for p in parts])[:, None]
    np.testing.assert_allclose(counts.sum(axis=0), np.bincount(labels, minlength=NUM_CLASSES))


def test_label_distribution_label_out_of_range() -> None:
    with pytest.raises(ValueError, match="num_classes=2"):
        label_distribution(np.array([0, 1, 2]), [np.array([0, 1, 2])], 2)
