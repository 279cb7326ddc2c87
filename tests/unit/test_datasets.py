"""Tests of task.datasets: IDX parsing, dataset loading, normalisation, errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from task import datasets as ds
from task.datasets import (
    DATASETS,
    ArrayDataset,
    DatasetInfo,
    DatasetNotFoundError,
    load_dataset,
    num_classes,
    read_idx,
)

# The usual normalisation constants, written here independently of the code.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parents[2]


class UrlRecorder:
    """Stand-in for urllib.request.urlopen: records URLs, serves bytes or raises."""

    def __init__(self, payloads: dict[str, bytes] | None = None) -> None:
        self.payloads = payloads
        self.urls: list[str] = []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        self.urls.append(url)
        assert timeout is not None and timeout > 0, "downloads must use a timeout"
        if self.payloads is None:
            raise urllib.error.URLError("network disabled in tests")
        name = url.rsplit("/", 1)[-1]
        if name not in self.payloads:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        return io.BytesIO(self.payloads[name])


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> UrlRecorder:
    """Private cache dir, no $BASTION_DATA_DIR, and no network for every test."""
    monkeypatch.setenv("BASTION_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BASTION_DATA_DIR", raising=False)
    offline = UrlRecorder()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return offline


# --------------------------------------------------------------------------- #
# IDX writing helpers (independent of the code under test)
# --------------------------------------------------------------------------- #

DTYPE_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(DTYPE_CODES[code]).tobytes()


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, gz: bool = False) -> Path:
    data = idx_bytes(arr, code)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dir(
    directory: Path,
    n_train: int = 20,
    n_test: int = 10,
    seed: int = 0,
    gz: bool = True,
    n_train_labels: int | None = None,
    image_shape: tuple[int, int] = (28, 28),
    label_max: int = 10,
) -> dict[str, np.ndarray]:
    """Write the four IDX files of a tiny MNIST-like dataset; return the raw arrays."""
    rng = np.random.default_rng(seed)
    raw = {
        "train_images": rng.integers(0, 256, (n_train, *image_shape), dtype=np.uint8),
        "train_labels": rng.integers(0, label_max, n_train_labels or n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *image_shape), dtype=np.uint8),
        "test_labels": rng.integers(0, label_max, n_test, dtype=np.uint8),
    }
    for role, arr in raw.items():
        suffix = ".gz" if gz else ""
        write_idx(directory / f"{IDX_NAMES[role]}{suffix}", arr, 0x08, gz=gz)
    return raw


# --------------------------------------------------------------------------- #
# read_idx
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_read_idx_round_trips_every_dtype(tmp_path: Path, code: int, gz: bool) -> None:
    rng = np.random.default_rng(code)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(DTYPE_CODES[code])
    if code == 0x08:
        arr = rng.integers(0, 256, (3, 4, 5)).astype(np.uint8)
    path = write_idx(tmp_path / "f.idx", arr, code, gz=gz)
    got = read_idx(path)
    assert got.shape == (3, 4, 5)
    assert got.dtype == np.dtype(DTYPE_CODES[code]).newbyteorder("=")
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    data = idx_bytes(arr, 0x0C)
    gz_without_suffix = tmp_path / "plain-name"
    gz_without_suffix.write_bytes(gzip.compress(data))
    plain_with_suffix = tmp_path / "looks-compressed.gz"
    plain_with_suffix.write_bytes(data)
    np.testing.assert_array_equal(read_idx(gz_without_suffix), arr)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), arr)


def test_read_idx_one_dimensional_labels(tmp_path: Path) -> None:
    labels = np.array([9, 0, 3, 255], dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", labels)), labels)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("bad_magic", "magic"),
        ("bad_dtype", "dtype code 0x0A"),
        ("truncated", "truncated"),
        ("trailing", "trailing"),
        ("short_header", "header"),
        ("tiny", "not an IDX file"),
    ],
)
def test_read_idx_rejects_malformed_files(
    tmp_path: Path, damage: str, message: str, gz: bool
) -> None:
    good = idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8), 0x08)
    bad = {
        "bad_magic": b"\x01" + good[1:],
        "bad_dtype": good[:2] + b"\x0a" + good[3:],
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "short_header": good[:9],
        "tiny": good[:3],
    }[damage]
    path = tmp_path / f"{damage}.idx"
    path.write_bytes(gzip.compress(bad) if gz else bad)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.zeros((4, 4), dtype=np.uint8), 0x08))
    path = tmp_path / "broken.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------- #
# Registry and ArrayDataset
# --------------------------------------------------------------------------- #


def test_registry_lists_exactly_the_supported_datasets() -> None:
    expected = {
        "digits": DatasetInfo("digits", 10, (64,)),
        "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28)),
        "mnist": DatasetInfo("mnist", 10, (1, 28, 28)),
        "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32)),
    }
    assert expected == DATASETS
    assert num_classes("cifar10") == 10


@pytest.mark.parametrize("bad", ["cifar", "MNIST", "", "fashion_mnist"])
def test_unknown_dataset_names_value_and_allowed(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        load_dataset(bad)
    msg = str(err.value)
    assert repr(bad) in msg
    for allowed in DATASETS:
        assert allowed in msg
    with pytest.raises(ValueError, match="allowed"):
        num_classes(bad)


def test_array_dataset_subset_and_validation() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6, dtype=np.int64)
    data = ArrayDataset(x, y)
    assert len(data) == 6
    sub = data.subset([4, 1, 4])
    np.testing.assert_array_equal(sub.x, x[[4, 1, 4]])
    np.testing.assert_array_equal(sub.y, [4, 1, 4])
    assert len(data.subset(np.array([], dtype=np.int64))) == 0
    assert len(data.subset([])) == 0
    with pytest.raises(TypeError):
        data.subset(np.ones(6, dtype=bool))
    with pytest.raises(TypeError, match="float32"):
        ArrayDataset(x.astype(np.float64), y)
    with pytest.raises(TypeError, match="int64"):
        ArrayDataset(x, y.astype(np.int32))
    with pytest.raises(ValueError, match="shape"):
        ArrayDataset(x, y[:5])


# --------------------------------------------------------------------------- #
# MNIST / Fashion-MNIST from IDX files
# --------------------------------------------------------------------------- #


def expected_standardised(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((images.astype(np.float64) / 255.0 - mean) / std)[:, None, :, :]


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [("fashion-mnist", FASHION_MEAN, FASHION_STD), ("mnist", MNIST_MEAN, MNIST_STD)],
)
@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_is_loaded_and_standardised(
    tmp_path: Path, name: str, mean: float, std: float, gz: bool
) -> None:
    raw = make_idx_dir(tmp_path / "data", gz=gz)
    train, test = load_dataset(name, tmp_path / "data")
    assert train.x.shape == (20, 1, 28, 28) and test.x.shape == (10, 1, 28, 28)
    assert train.x.dtype == np.float32 and test.x.dtype == np.float32
    assert train.y.dtype == np.int64 and test.y.dtype == np.int64
    np.testing.assert_allclose(
        train.x, expected_standardised(raw["train_images"], mean, std), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        test.x, expected_standardised(raw["test_images"], mean, std), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(train.y, raw["train_labels"])
    np.testing.assert_array_equal(test.y, raw["test_labels"])


def test_data_dir_accepts_str_and_empty_string_means_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = make_idx_dir(tmp_path / "data")
    train, _ = load_dataset("mnist", str(tmp_path / "data"))
    np.testing.assert_array_equal(train.y, raw["train_labels"])
    monkeypatch.setenv("BASTION_DATA_DIR", str(tmp_path / "data"))
    train, _ = load_dataset("mnist", "")
    np.testing.assert_array_equal(train.y, raw["train_labels"])


@pytest.mark.parametrize("sub", ["mnist", "mnist/raw", "MNIST/raw"])
def test_torchvision_style_subdirectories_are_searched(tmp_path: Path, sub: str) -> None:
    raw = make_idx_dir(tmp_path / "root" / sub, seed=3)
    train, test = load_dataset("mnist", tmp_path / "root")
    np.testing.assert_array_equal(train.y, raw["train_labels"])
    np.testing.assert_array_equal(test.y, raw["test_labels"])


def test_data_dir_takes_precedence_over_env_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = make_idx_dir(tmp_path / "explicit", seed=1, n_train=7)
    env = make_idx_dir(tmp_path / "env", seed=2, n_train=9)
    monkeypatch.setenv("BASTION_DATA_DIR", str(tmp_path / "env"))
    train, _ = load_dataset("mnist", tmp_path / "explicit")
    np.testing.assert_array_equal(train.y, explicit["train_labels"])
    train, _ = load_dataset("mnist")  # no data_dir: falls back to $BASTION_DATA_DIR
    np.testing.assert_array_equal(train.y, env["train_labels"])


def test_env_dir_takes_precedence_over_debian_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = make_idx_dir(tmp_path / "system", seed=4, n_train=5)
    monkeypatch.setitem(ds._SYSTEM_DIRS, "fashion-mnist", (tmp_path / "system",))
    train, _ = load_dataset("fashion-mnist")
    np.testing.assert_array_equal(train.y, system["train_labels"])
    env = make_idx_dir(tmp_path / "env", seed=5, n_train=6)
    monkeypatch.setenv("BASTION_DATA_DIR", str(tmp_path / "env"))
    train, _ = load_dataset("fashion-mnist")
    np.testing.assert_array_equal(train.y, env["train_labels"])


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "data", n_train=20, n_train_labels=19)
    with pytest.raises(ValueError, match=r"20 images.*19 labels"):
        load_dataset("mnist", tmp_path / "data")


def test_labels_out_of_range_are_rejected(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "data", label_max=12, n_train=60)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)") as err:
        load_dataset("mnist", tmp_path / "data")
    assert "train-labels-idx1-ubyte" in str(err.value)


def test_wrong_image_size_is_rejected(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "data", image_shape=(27, 28))
    with pytest.raises(ValueError, match="28, 28") as err:
        load_dataset("fashion-mnist", tmp_path / "data")
    assert "train-images-idx3-ubyte" in str(err.value)


def test_second_load_hits_the_cache_and_source_changes_invalidate_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_idx_dir(tmp_path / "data", seed=0, gz=False)
    first, _ = load_dataset("mnist", tmp_path / "data")

    real_read_idx = ds.read_idx
    reads: list[Path] = []

    def counting_read_idx(path: str | Path) -> np.ndarray:
        reads.append(Path(path))
        return real_read_idx(path)

    monkeypatch.setattr(ds, "read_idx", counting_read_idx)
    again, _ = load_dataset("mnist", tmp_path / "data")
    assert reads == []  # served from the cache
    np.testing.assert_array_equal(again.x, first.x)

    # Rewrite the labels with different content: the fingerprint changes.
    new_labels = (read_idx(tmp_path / "data" / IDX_NAMES["train_labels"]) + 1) % 10
    write_idx(tmp_path / "data" / IDX_NAMES["train_labels"], new_labels.astype(np.uint8))
    path = tmp_path / "data" / IDX_NAMES["train_labels"]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, _ = load_dataset("mnist", tmp_path / "data")
    assert len(reads) == 4
    np.testing.assert_array_equal(changed.y, new_labels)


# --------------------------------------------------------------------------- #
# Missing data and downloads
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("name", "mirror_host"),
    [
        ("fashion-mnist", "fashion-mnist.s3-website.eu-central-1.amazonaws.com"),
        ("mnist", "ossci-datasets.s3.amazonaws.com"),
    ],
)
def test_missing_idx_data_with_failed_download_explains_everything(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    _isolated: UrlRecorder,
    name: str,
    mirror_host: str,
) -> None:
    system = tmp_path / "no-debian"
    monkeypatch.setitem(ds._SYSTEM_DIRS, "fashion-mnist", (system,))
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv("BASTION_DATA_DIR", str(env_dir))
    data_dir = tmp_path / "new" / "data"  # does not exist yet
    partial = env_dir / name
    write_idx(partial / IDX_NAMES["train_images"], np.zeros((1, 28, 28), dtype=np.uint8))

    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, data_dir)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert repr(name) in msg
    searched = [
        data_dir,
        data_dir / name,
        data_dir / name / "raw",
        env_dir,
        env_dir / name,
        tmp_path / "cache" / "data" / name,
    ]
    if name == "fashion-mnist":
        searched.append(system)
    for d in searched:
        assert f"{d} (" in msg, d
    assert "incomplete, missing" in msg  # the partial directory is reported as such
    assert "network disabled in tests" in msg
    assert "failed" in msg.lower()
    assert "--data-dir" in msg
    for fname in IDX_NAMES.values():
        assert fname in msg
    if name == "fashion-mnist":
        assert "apt-get install dataset-fashion-mnist" in msg
    # the download really was attempted, from the right mirror, into data_dir
    assert _isolated.urls and mirror_host in _isolated.urls[0]
    assert _isolated.urls[0].endswith(".gz")
    # a failed download leaves no directories behind
    assert not (tmp_path / "new").exists()


def test_download_false_does_not_touch_the_network(tmp_path: Path, _isolated: UrlRecorder) -> None:
    with pytest.raises(DatasetNotFoundError, match="not attempted") as err:
        load_dataset("mnist", tmp_path / "empty", download=False)
    assert _isolated.urls == []
    assert str(tmp_path / "empty") in str(err.value)


def _gz_idx_payloads(raw: dict[str, np.ndarray]) -> dict[str, bytes]:
    return {f"{IDX_NAMES[r]}.gz": gzip.compress(idx_bytes(a, 0x08)) for r, a in raw.items()}


def test_successful_idx_download_is_checked_and_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    raw = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 6, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    payloads = _gz_idx_payloads(raw)
    server = UrlRecorder(payloads)
    monkeypatch.setattr(urllib.request, "urlopen", server)
    monkeypatch.setitem(
        ds._IDX_MD5, "mnist", {k: hashlib.md5(v).hexdigest() for k, v in payloads.items()}
    )
    train, test = load_dataset("mnist", tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(payloads)
    assert len(server.urls) == 4
    np.testing.assert_array_equal(train.y, raw["train_labels"])
    np.testing.assert_allclose(
        test.x, expected_standardised(raw["test_images"], MNIST_MEAN, MNIST_STD), atol=1e-5
    )


def test_idx_download_with_wrong_md5_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    raw = {
        "train_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 2, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 2, dtype=np.uint8),
    }
    # served bytes differ from the official files: the real MD5s cannot match
    monkeypatch.setattr(urllib.request, "urlopen", UrlRecorder(_gz_idx_payloads(raw)))
    monkeypatch.setitem(ds._SYSTEM_DIRS, "fashion-mnist", ())
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(DatasetNotFoundError, match="md5 mismatch"):
        load_dataset("fashion-mnist", dest)
    assert list(dest.iterdir()) == []  # nothing (not even a temp file) left behind


# --------------------------------------------------------------------------- #
# CIFAR-10
# --------------------------------------------------------------------------- #

CIFAR_BATCHES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def make_cifar_batches(directory: Path, rows: int = 3, seed: int = 0) -> dict[str, dict]:
    """Write six tiny CIFAR-10 batch pickles (protocol 2, like the original files)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(CIFAR_BATCHES):
        batch = {
            b"batch_label": f"batch {i}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, rows)],
            b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}_{j}.png".encode() for j in range(rows)],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = batch
    return batches


def cifar_expected(data: np.ndarray) -> np.ndarray:
    """Channel-first standardised images, built plane by plane (R, G, B)."""
    n = len(data)
    out = np.empty((n, 3, 32, 32))
    for c in range(3):
        plane = data[:, c * 1024 : (c + 1) * 1024].reshape(n, 32, 32)
        out[:, c] = (plane / 255.0 - CIFAR_MEAN[c]) / CIFAR_STD[c]
    return out


def check_cifar(train: ArrayDataset, test: ArrayDataset, batches: dict[str, dict]) -> None:
    train_data = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_labels = [v for i in range(1, 6) for v in batches[f"data_batch_{i}"][b"labels"]]
    rows = len(batches["test_batch"][b"data"])
    assert train.x.shape == (5 * rows, 3, 32, 32) and test.x.shape == (rows, 3, 32, 32)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    np.testing.assert_allclose(train.x, cifar_expected(train_data), atol=1e-5)
    np.testing.assert_allclose(test.x, cifar_expected(batches["test_batch"][b"data"]), atol=1e-5)
    np.testing.assert_array_equal(train.y, train_labels)
    np.testing.assert_array_equal(test.y, batches["test_batch"][b"labels"])


def test_cifar_directory_layout_and_planted_pixel(tmp_path: Path) -> None:
    batches = make_cifar_batches(tmp_path / "data" / "cifar-10-batches-py")
    # plant a green pixel at row 5, column 7 of image 1 in data_batch_2
    data = batches["data_batch_2"][b"data"]
    data[1, :] = 0
    data[1, 1 * 1024 + 5 * 32 + 7] = 255
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump(batches["data_batch_2"], f, protocol=2)

    train, test = load_dataset("cifar10", tmp_path / "data")
    image = train.x[3 + 1]  # 3 rows per batch: data_batch_2 row 1
    assert image[1, 5, 7] == pytest.approx((1.0 - CIFAR_MEAN[1]) / CIFAR_STD[1], abs=1e-5)
    zero = [(0.0 - CIFAR_MEAN[c]) / CIFAR_STD[c] for c in range(3)]
    mask = np.ones((3, 32, 32), dtype=bool)
    mask[1, 5, 7] = False
    expected_background = np.broadcast_to(np.array(zero)[:, None, None], (3, 32, 32))
    np.testing.assert_allclose(image[mask], expected_background[mask], atol=1e-5)
    check_cifar(train, test, batches)


def test_cifar_batches_directly_in_data_dir(tmp_path: Path) -> None:
    batches = make_cifar_batches(tmp_path / "batches", seed=1)
    check_cifar(*load_dataset("cifar10", tmp_path / "batches"), batches)


def build_cifar_archive(path: Path, source: Path, extra: list[tarfile.TarInfo] | None = None):
    with tarfile.open(path, "w:gz") as tar:
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
        tar.add(source, arcname="cifar-10-batches-py")


def test_cifar_archive_is_extracted_and_loaded(tmp_path: Path) -> None:
    batches = make_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", seed=2)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    build_cifar_archive(
        data_dir / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py"
    )
    check_cifar(*load_dataset("cifar10", data_dir), batches)
    assert sorted(p.name for p in (data_dir / "cifar-10-batches-py").iterdir()) == sorted(
        CIFAR_BATCHES
    )
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]  # no temp dirs left


def test_cifar_archive_next_to_incomplete_extraction_is_reported(tmp_path: Path) -> None:
    make_cifar_batches(tmp_path / "src" / "cifar-10-batches-py")
    data_dir = tmp_path / "data"
    (data_dir / "cifar-10-batches-py").mkdir(parents=True)
    (data_dir / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"left over")
    build_cifar_archive(
        data_dir / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py"
    )
    with pytest.raises(ValueError, match="already exists but lacks"):
        load_dataset("cifar10", data_dir)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_cifar_archive_with_unsafe_member_is_rejected(tmp_path: Path, kind: str) -> None:
    make_cifar_batches(tmp_path / "src" / "cifar-10-batches-py")
    if kind == "dotdot":
        evil = tarfile.TarInfo("cifar-10-batches-py/../../evil.txt")
        evil.size = 4
    elif kind == "absolute":
        evil = tarfile.TarInfo(str(tmp_path / "evil.txt"))
        evil.size = 4
    else:
        evil = tarfile.TarInfo("cifar-10-batches-py/link")
        evil.type = tarfile.SYMTYPE
        evil.linkname = "/etc/passwd"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    build_cifar_archive(
        data_dir / "cifar-10-python.tar.gz", tmp_path / "src" / "cifar-10-batches-py", [evil]
    )
    with pytest.raises(ValueError, match=r"unsafe path|not a regular file") as err:
        load_dataset("cifar10", data_dir)
    assert "cifar-10-python.tar.gz" in str(err.value)
    assert not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar_download_with_wrong_md5_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_cifar_batches(tmp_path / "src" / "cifar-10-batches-py")
    build_cifar_archive(tmp_path / "fake.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    server = UrlRecorder({"cifar-10-python.tar.gz": (tmp_path / "fake.tar.gz").read_bytes()})
    monkeypatch.setattr(urllib.request, "urlopen", server)
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", dest)
    msg = str(err.value)
    assert "md5 mismatch" in msg and "c58f30108f718f92721af3b95e74349a" in msg
    assert server.urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert list(dest.iterdir()) == []


def test_cifar_download_with_matching_md5_is_extracted_and_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = make_cifar_batches(tmp_path / "src" / "cifar-10-batches-py", seed=4)
    build_cifar_archive(tmp_path / "fake.tar.gz", tmp_path / "src" / "cifar-10-batches-py")
    payload = (tmp_path / "fake.tar.gz").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", UrlRecorder({"cifar-10-python.tar.gz": payload}))
    monkeypatch.setattr(ds, "_CIFAR_MD5", hashlib.md5(payload).hexdigest())
    check_cifar(*load_dataset("cifar10"), batches)  # no data_dir: goes to the cache dir
    assert (tmp_path / "cache" / "data" / "cifar10" / "cifar-10-python.tar.gz").is_file()


def test_missing_cifar_error_lists_searched_dirs(tmp_path: Path, _isolated: UrlRecorder) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", tmp_path / "nothing")
    msg = str(err.value)
    assert "'cifar10'" in msg and "network disabled in tests" in msg
    for d in (tmp_path / "nothing", tmp_path / "cache" / "data" / "cifar10"):
        assert f"{d} (" in msg
    assert "cifar-10-python.tar.gz" in msg and "--data-dir" in msg


def _rewrite_batch(path: Path, changes: dict[bytes, object]) -> None:
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch.update(changes)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({b"data": np.zeros((3, 3071), dtype=np.uint8)}, r"\(N, 3072\)"),
        ({b"data": np.zeros((3, 3072), dtype=np.int16)}, "uint8"),
        ({b"labels": [0, 10, 1]}, r"labels must lie in \[0, 10\)"),
        ({b"labels": [0, 1]}, "labels have shape"),
    ],
)
def test_malformed_cifar_batches_are_rejected(tmp_path: Path, change: dict, message: str) -> None:
    make_cifar_batches(tmp_path / "data" / "cifar-10-batches-py")
    _rewrite_batch(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3", change)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset("cifar10", tmp_path / "data")
    assert "data_batch_3" in str(err.value)


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    make_cifar_batches(tmp_path / "data" / "cifar-10-batches-py")
    with open(tmp_path / "data" / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing") as err:
        load_dataset("cifar10", tmp_path / "data")
    assert "test_batch" in str(err.value)


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits_shapes_range_split_and_stratification() -> None:
    from sklearn.datasets import load_digits

    full = load_digits()
    train, test = load_dataset("digits")
    n = len(full.target)
    assert len(train) + len(test) == n
    assert len(test) == pytest.approx(0.2 * n, abs=1)
    assert train.x.shape == (len(train), 64) and test.x.shape == (len(test), 64)
    assert train.x.dtype == np.float32 and test.y.dtype == np.int64
    both = np.concatenate([train.x, test.x])
    assert both.min() == 0.0 and both.max() == 1.0
    # train + test is exactly the full data set scaled by 1/16 (a partition)
    want = np.concatenate([full.data / 16.0, full.target[:, None]], axis=1)
    got = np.concatenate([both, np.concatenate([train.y, test.y])[:, None]], axis=1)
    np.testing.assert_allclose(
        got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-7
    )
    # stratified: every class is in the test set in proportion
    counts_all = np.bincount(full.target, minlength=10)
    counts_test = np.bincount(test.y, minlength=10)
    assert (counts_test > 0).all()
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)


def test_digits_split_is_fixed_across_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_train, a_test = load_dataset("digits")
    monkeypatch.setenv("BASTION_CACHE_DIR", str(tmp_path / "other-cache"))
    np.random.seed(12345)  # a run's global seed must not change the split
    b_train, b_test = load_dataset("digits")  # computed again from scratch
    assert (tmp_path / "other-cache" / "arrays").is_dir()
    np.testing.assert_array_equal(a_train.x, b_train.x)
    np.testing.assert_array_equal(a_test.x, b_test.x)
    np.testing.assert_array_equal(a_test.y, b_test.y)


def test_warm_cache_load_in_fresh_process_skips_sklearn(tmp_path: Path) -> None:
    train, test = load_dataset("digits")  # warms tmp_path/cache
    code = (
        "import sys, numpy as np\n"
        "from task.datasets import load_dataset\n"
        "tr, te = load_dataset('digits')\n"
        "assert 'sklearn' not in sys.modules, 'sklearn was imported'\n"
        "print(tr.x.shape[0], te.x.shape[0], float(np.abs(te.x).sum()), int(te.y.sum()))\n"
    )
    env = {**os.environ, "BASTION_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    n_train, n_test, abs_sum, label_sum = proc.stdout.split()
    assert (int(n_train), int(n_test), int(label_sum)) == (len(train), len(test), test.y.sum())
    assert float(abs_sum) == pytest.approx(float(np.abs(test.x).sum()), rel=1e-6)


# --------------------------------------------------------------------------- #
# The real Fashion-MNIST from Debian, when installed
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian() -> None:
    train, test = load_dataset("fashion-mnist", download=False)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    # Fashion-MNIST is balanced: 6000 / 1000 images of each of the 10 classes
    np.testing.assert_array_equal(np.bincount(train.y, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.y, minlength=10), [1000] * 10)
    # the standardisation constants fit this data: train mean ~0, std ~1
    flat = train.x.reshape(-1)
    mean = float(flat.mean(dtype=np.float64))
    std = float(np.sqrt(np.dot(flat, flat) / flat.size - mean**2))  # no 376 MB temporary
    assert abs(mean) < 0.01
    assert abs(std - 1.0) < 0.01


def test_training_set_is_loaded_once_per_process_and_shared_read_only() -> None:
    from task.federated import training_set

    a = training_set("digits")
    assert training_set("digits") is a
    with pytest.raises(ValueError, match="read-only"):
        a.x[0, 0] = 1.0
