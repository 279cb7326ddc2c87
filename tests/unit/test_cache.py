"""Tests of task.cache: the content-addressed npz cache."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from task import cache
from task.cache import cache_dir, cache_path, cached_arrays


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cache at a per-test directory so nothing lands in ~/.cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("BASTION_CACHE_DIR", str(d))
    return d


class Counter:
    """A compute() that counts its calls and returns fixed arrays."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.arrays = {
            "x": rng.standard_normal((5, 3)).astype(np.float32),
            "y": rng.integers(0, 10, size=5).astype(np.int64),
        }
        self.calls = 0

    def __call__(self) -> dict[str, np.ndarray]:
        self.calls += 1
        return {k: v.copy() for k, v in self.arrays.items()}


def assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)


def test_cache_dir_uses_env_and_creates_it(_isolated_cache: Path) -> None:
    assert not _isolated_cache.exists()
    assert cache_dir() == _isolated_cache
    assert _isolated_cache.is_dir()


def test_cache_dir_defaults_to_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "bastion"
    assert cache_dir().is_dir()


def test_hit_does_not_recompute_and_returns_equal_arrays() -> None:
    compute = Counter()
    first = cached_arrays("ns", {"a": 1}, compute)
    second = cached_arrays("ns", {"a": 1}, compute)
    assert compute.calls == 1
    assert_same_arrays(first, compute.arrays)
    assert_same_arrays(second, compute.arrays)


def test_key_order_does_not_matter() -> None:
    compute = Counter()
    cached_arrays("ns", {"a": 1, "b": [1, 2]}, compute)
    cached_arrays("ns", {"b": [1, 2], "a": 1}, compute)
    assert compute.calls == 1


def test_different_key_or_namespace_recomputes() -> None:
    c1, c2, c3 = Counter(1), Counter(2), Counter(3)
    cached_arrays("ns", {"a": 1}, c1)
    r2 = cached_arrays("ns", {"a": 2}, c2)
    r3 = cached_arrays("other", {"a": 1}, c3)
    assert (c1.calls, c2.calls, c3.calls) == (1, 1, 1)
    assert_same_arrays(r2, c2.arrays)
    assert_same_arrays(r3, c3.arrays)
    # each key still maps to its own arrays
    assert_same_arrays(cached_arrays("ns", {"a": 1}, Counter(9)), c1.arrays)
    assert_same_arrays(cached_arrays("ns", {"a": 2}, Counter(9)), c2.arrays)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_recomputed_and_overwritten(damage: str) -> None:
    compute = Counter()
    cached_arrays("ns", {"k": "v"}, compute)
    path = cache_path("ns", {"k": "v"})
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a zip file at all" * 10)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:
        path.write_bytes(b"")

    again = cached_arrays("ns", {"k": "v"}, compute)
    assert compute.calls == 2
    assert_same_arrays(again, compute.arrays)
    # the file was rewritten: the next call is a hit again
    assert_same_arrays(cached_arrays("ns", {"k": "v"}, compute), compute.arrays)
    assert compute.calls == 2


def test_cache_file_is_plain_npz_without_pickle() -> None:
    compute = Counter()
    cached_arrays("ns", {"k": 1}, compute)
    path = cache_path("ns", {"k": 1})
    assert path.suffix == ".npz"
    with np.load(path, allow_pickle=False) as npz:
        assert_same_arrays({k: npz[k] for k in npz.files}, compute.arrays)
    # no temporary files left next to it
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_object_arrays_are_refused_and_nothing_is_written() -> None:
    with pytest.raises(TypeError, match="pickle"):
        cached_arrays("ns", {"k": 1}, lambda: {"x": np.array([{"a": 1}], dtype=object)})
    assert not cache_path("ns", {"k": 1}).exists()


def test_non_json_key_is_refused() -> None:
    with pytest.raises(TypeError, match="JSON"):
        cached_arrays("ns", {"k": object()}, Counter())


def test_compute_error_propagates_and_writes_nothing() -> None:
    def boom() -> dict[str, np.ndarray]:
        raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError, match="compute failed"):
        cached_arrays("ns", {"k": 1}, boom)
    assert not cache_path("ns", {"k": 1}).exists()


# --------------------------------------------------------------------------- #
# Concurrency (fork: children inherit the monkeypatched environment)
# --------------------------------------------------------------------------- #

_BIG = 1 << 20  # 4 MiB of float32 per array: large enough for writes to interleave


def _big_arrays() -> dict[str, np.ndarray]:
    return {
        "a": np.arange(_BIG, dtype=np.float32),
        "b": np.arange(_BIG, dtype=np.int64)[::-1].copy(),
    }


def _racer(barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    calls = 0

    def compute() -> dict[str, np.ndarray]:
        nonlocal calls
        calls += 1
        time.sleep(0.1)  # make sure every process misses and writes
        return _big_arrays()

    barrier.wait()
    first = cached_arrays("race", {"k": 1}, compute)
    second = cached_arrays("race", {"k": 1}, compute)
    want = _big_arrays()
    ok = all(
        np.array_equal(r[k], want[k]) and r[k].dtype == want[k].dtype
        for r in (first, second)
        for k in want
    )
    out.put((ok, calls))


def test_concurrent_writers_all_get_full_arrays() -> None:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(ok for ok, _ in results), results
    # each process computed at most once (its second call was a hit)
    assert all(calls == 1 for _, calls in results), results
    path = cache_path("race", {"k": 1})
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def _rewriter(path: str, rounds: int, start: mp.synchronize.Event) -> None:
    arrays = _big_arrays()
    start.set()
    for _ in range(rounds):
        cache._write_atomic(Path(path), arrays)


def _reader(deadline: float, out: mp.Queue) -> None:
    def must_not_run() -> dict[str, np.ndarray]:
        raise AssertionError("a reader saw a missing or partial cache file")

    want = _big_arrays()
    reads = 0
    try:
        while time.monotonic() < deadline:
            got = cached_arrays("rw", {"k": 1}, must_not_run)
            assert all(np.array_equal(got[k], want[k]) for k in want)
            reads += 1
        out.put(("ok", reads))
    except AssertionError as exc:
        out.put(("fail", str(exc)))


def test_readers_never_see_a_partial_file_while_it_is_rewritten() -> None:
    path = cache_path("rw", {"k": 1})
    cache._write_atomic(path, _big_arrays())
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start = ctx.Event()
    writer = ctx.Process(target=_rewriter, args=(str(path), 25, start))
    writer.start()
    assert start.wait(timeout=30)
    deadline = time.monotonic() + 1.5
    readers = [ctx.Process(target=_reader, args=(deadline, out)) for _ in range(3)]
    for r in readers:
        r.start()
    results = [out.get(timeout=60) for _ in readers]
    for p in [writer, *readers]:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(status == "ok" for status, _ in results), results
    assert sum(n for _, n in results) > 0


def test_a_hit_is_a_read_only_memory_map_of_the_cache_file() -> None:
    compute = Counter()
    cached_arrays("ns", {"k": "map"}, compute)
    hit = cached_arrays("ns", {"k": "map"}, compute)
    assert compute.calls == 1
    assert_same_arrays(hit, compute.arrays)
    for value in hit.values():
        assert isinstance(value, np.memmap)
        assert Path(value.filename) == cache_path("ns", {"k": "map"})
        assert not value.flags.writeable


def test_an_empty_array_round_trips() -> None:
    empty = {"x": np.zeros((0, 4), dtype=np.float32)}
    cached_arrays("ns", {"k": "empty"}, lambda: empty)
    hit = cached_arrays("ns", {"k": "empty"}, lambda: empty)
    assert hit["x"].shape == (0, 4) and hit["x"].dtype == np.float32


def _mapped_images() -> tuple[np.ndarray, np.ndarray]:
    """A (20, 1, 3, 2) float32 array as the cache maps it, and the same array in memory."""
    x = np.arange(20 * 6, dtype=np.float32).reshape(20, 1, 3, 2)
    cached_arrays("ns", {"k": "rows"}, lambda: {"x": x})
    return cached_arrays("ns", {"k": "rows"}, lambda: {"x": x})["x"], x


@pytest.mark.parametrize(
    "indices",
    [
        [7, 2, 19, 0],  # unsorted
        [3, 3, 5, 3],  # repeated
        [-1, -20, 4],  # negative
        list(range(5, 12)),  # one contiguous run: one read
        [0, 1, 2, 10, 11, 19],  # runs and singles
        [13],
        [],
    ],
)
def test_take_rows_equals_fancy_indexing(indices: list[int]) -> None:
    mapped, x = _mapped_images()
    got = cache.take_rows(mapped, np.array(indices, dtype=np.int64))
    want = x[np.array(indices, dtype=np.intp)]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert not isinstance(got, np.memmap) and got.flags.writeable


def test_take_rows_of_a_view_or_a_plain_array_indexes_it() -> None:
    mapped, x = _mapped_images()
    idx = np.array([4, 0, 2])
    # a view's .offset is its parent's: it must be indexed, not read from the file
    np.testing.assert_array_equal(cache.take_rows(mapped[5:15], idx), x[5:15][idx])
    np.testing.assert_array_equal(cache.take_rows(x, idx), x[idx])


def test_take_rows_refuses_an_index_out_of_range() -> None:
    mapped, _ = _mapped_images()
    with pytest.raises(IndexError, match="out of range"):
        cache.take_rows(mapped, np.array([3, 20]))
