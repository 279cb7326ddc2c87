"""Datasets of the ML task: loading, validation, normalisation and caching.

:func:`load_dataset` returns a ``(train, test)`` pair of :class:`ArrayDataset`
holding float32 inputs ready for a model and int64 labels. Supported datasets
(see :data:`DATASETS`):

- ``digits``: scikit-learn's bundled 8x8 digits (offline), scaled to [0, 1],
  split 80/20 (stratified) with a fixed seed so the central test set is the
  same in every run.
- ``fashion-mnist`` and ``mnist``: the IDX files (Xiao et al., 2017; LeCun et
  al., 1998), scaled to [0, 1] and standardised with the usual constants.
  Fashion-MNIST is also found where Debian's ``dataset-fashion-mnist``
  package installs it.
- ``cifar10``: the "CIFAR-10 python version" (Krizhevsky, 2009), scaled to
  [0, 1] and standardised per channel.

Decoded arrays are cached with :func:`task.cache.cached_arrays`, keyed by the
dataset name and a fingerprint of the source files (resolved path, size,
mtime), so a fresh process (Flower starts one per message) loads a dataset
with one ``np.load`` and never imports scikit-learn. Importing this module is
cheap: heavy or rarely needed modules are imported inside the functions that
use them.

Nothing here downloads unless the data is missing and ``download=True``; a
failed download raises :class:`DatasetNotFoundError` that lists every
directory searched and says how to provide the files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from task.cache import cache_dir, cached_arrays, take_rows

if TYPE_CHECKING:
    import tarfile

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DIGITS_SPLIT_SEED",
    "ArrayDataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "load_dataset",
    "num_classes",
    "read_idx",
]

#: Environment variable naming an extra directory searched for dataset files.
DATA_DIR_ENV = "BASTION_DATA_DIR"

#: Seed of the digits train/test split. Fixed on purpose, *not* a run seed:
#: the central test set must be identical in every run.
DIGITS_SPLIT_SEED = 20240
_DIGITS_TEST_FRACTION = 0.2

#: Bump when the preprocessing below changes, to invalidate cached arrays.
_PREPROCESS_VERSION = 1
_CACHE_NAMESPACE = "dataset"

#: Set to ``1`` to forbid downloads (``load_dataset(download=None)``).
NO_DOWNLOAD_ENV = "BASTION_NO_DOWNLOAD"
#: Timeout (seconds) of each network operation of a download.
DOWNLOAD_TIMEOUT_S = 60.0


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset were not found locally and could not be downloaded."""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled dataset held in memory as numpy arrays.

    ``x`` is float32 with the samples along axis 0: channel-first images
    ``(N, C, H, W)`` or flat features ``(N, F)``. ``y`` is int64 of shape ``(N,)``.
    """

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or self.x.dtype != np.float32:
            raise TypeError(
                f"ArrayDataset.x must be a float32 numpy array, got "
                f"{getattr(self.x, 'dtype', type(self.x).__name__)}"
            )
        if not isinstance(self.y, np.ndarray) or self.y.dtype != np.int64:
            raise TypeError(
                f"ArrayDataset.y must be an int64 numpy array, got "
                f"{getattr(self.y, 'dtype', type(self.y).__name__)}"
            )
        if self.x.ndim < 2:
            raise ValueError(f"ArrayDataset.x must have shape (N, ...), got {self.x.shape}")
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise ValueError(
                f"ArrayDataset.y must have shape ({len(self.x)},) to match x {self.x.shape}, "
                f"got {self.y.shape}"
            )

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self.y)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayDataset:
        """Return a new dataset with the samples at integer positions ``indices`` (copied)."""
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.intp)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(
                f"subset() takes a 1-D sequence of integer indices, got dtype {idx.dtype} "
                f"and shape {idx.shape}"
            )
        # rows of a mapped cache file are read, not faulted in (task.cache.take_rows)
        return ArrayDataset(take_rows(self.x, idx), take_rows(self.y, idx))


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: its name, class count and per-sample input shape."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, (64,)),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28)),
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28)),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32)),
}

# Per-channel (mean, std) of the training images scaled to [0, 1]: the usual
# constants (MNIST: torchvision examples; Fashion-MNIST: computed on its train
# set; CIFAR-10: the true per-channel std of the train set, not the widely
# copied (0.2023, 0.1994, 0.2010)).
_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _info(name: str) -> DatasetInfo:
    """Return ``DATASETS[name]``, or raise ``ValueError`` naming the allowed names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}"
        ) from None


def num_classes(name: str) -> int:
    """Return the number of classes of dataset ``name`` (``ValueError`` if unknown)."""
    return _info(name).num_classes


# --------------------------------------------------------------------------- #
# Helpers: files, fingerprints, downloads
# --------------------------------------------------------------------------- #


def _fingerprint(paths: Iterable[Path]) -> list[list[object]]:
    """Return ``[resolved path, size, mtime_ns]`` of each file, for cache keys."""
    out: list[list[object]] = []
    for p in paths:
        resolved = p.resolve()
        st = resolved.stat()
        out.append([str(resolved), st.st_size, st.st_mtime_ns])
    return out


def _normalise_data_dir(data_dir: str | Path | None) -> Path | None:
    """Return ``data_dir`` as an expanded ``Path``; ``None`` or ``""`` mean no directory."""
    if data_dir is None:
        return None
    text = str(data_dir).strip()
    return Path(text).expanduser() if text else None


def _env_data_dir() -> Path | None:
    """Return ``$BASTION_DATA_DIR`` as a ``Path`` when set and not empty."""
    return _normalise_data_dir(os.environ.get(DATA_DIR_ENV))


def _default_download_dir(name: str) -> Path:
    """Return where downloads go when no ``data_dir`` is given: ``cache_dir()/data/<name>``."""
    return cache_dir() / "data" / name


def _dedupe(dirs: Iterable[Path]) -> list[Path]:
    """Return ``dirs`` without repeats (by absolute path), keeping the first occurrence."""
    seen: set[str] = set()
    out: list[Path] = []
    for d in dirs:
        key = os.path.abspath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _md5(path: Path) -> str:
    """Return the hex MD5 digest of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``url`` to ``dest`` and check its MD5; ``dest`` appears only when complete.

    The body is streamed into a temporary file next to ``dest`` and renamed
    over it after the checksum matched. Raises ``OSError`` (network, disk) or
    ``ValueError`` (checksum mismatch); no partial file is left behind.
    """
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(
                f"md5 mismatch for {url}: expected {md5}, got {digest.hexdigest()} "
                "(corrupt or tampered download)"
            )
        os.replace(tmp_name, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _download_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types that mean "this download attempt failed"."""
    from http.client import HTTPException

    return (OSError, ValueError, HTTPException)


def _dir_state(directory: Path) -> str:
    """Describe ``directory`` for an error message: missing, or present without the files."""
    return "exists, files missing" if directory.is_dir() else "does not exist"


def _not_found(
    name: str,
    states: Mapping[Path, str],
    wanted: str,
    download_note: str,
    how_to: str,
) -> DatasetNotFoundError:
    """Build the error for a dataset that was neither found nor downloaded.

    ``states`` maps every searched directory, in search order, to what was
    seen there before any download attempt.
    """
    lines = [f"dataset {name!r} not found: looked for {wanted} in:"]
    lines += [f"  - {d} ({state})" for d, state in states.items()]
    lines.append(download_note)
    lines.append(f"To get the data: {how_to}")
    return DatasetNotFoundError("\n".join(lines))


def _missing_dirs(directory: Path) -> list[Path]:
    """Return ``directory`` and its ancestors that do not exist yet, deepest first."""
    missing: list[Path] = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    return missing


def _remove_empty(dirs: Sequence[Path]) -> None:
    """Remove the directories ``dirs`` (deepest first) while they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


# --------------------------------------------------------------------------- #
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------- #

# IDX dtype codes (http://yann.lecun.com/exdb/mnist/), all big-endian on disk.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Public mirrors and the MD5s of their .gz files (same as torchvision's).
_IDX_MIRRORS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
}
_IDX_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}

# Where OS packages install datasets: Debian's `apt-get install dataset-fashion-mnist`
# puts train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
# t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz here.
_DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {"fashion-mnist": (_DEBIAN_FASHION_MNIST_DIR,)}

# torchvision's folder names (root/<ClassName>/raw).
_TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or plain) and return its array.

    IDX layout: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
    one big-endian uint32 per dimension, then the big-endian payload.
    Compression is detected from the gzip magic bytes, not the file name.
    The result has native byte order and the dimensions of the header.
    Raises ``ValueError`` naming the file for a bad magic, an unsupported
    dtype code, a corrupt gzip stream, or a payload whose size does not match
    the header.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=f) as gz:
                    raw = gz.read()
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc
        else:
            raw = f.read()

    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes, header needs 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic starts with {raw[:2].hex()}, expected 0000)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{code:02X} (allowed: {allowed})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions need {header_len})"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX payload {what}: header dims {dims} of {dtype.name} need "
            f"{expected} bytes, file has {actual}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _idx_search_dirs(name: str, data_dir: Path | None) -> list[Path]:
    """Return the directories searched for the IDX files of ``name``, in order."""
    dirs: list[Path] = []
    for base in (data_dir, _env_data_dir()):
        if base is not None:
            dirs += [
                base,
                base / name,
                base / name / "raw",
                base / _TORCHVISION_NAMES[name] / "raw",
            ]
    dirs += list(_SYSTEM_DIRS.get(name, ()))
    dirs.append(_default_download_dir(name))
    return _dedupe(dirs)


def _find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Return ``(found, missing)``: the IDX files in ``directory`` by role, and absent names."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, fname in _IDX_FILES.items():
        for candidate in (directory / fname, directory / f"{fname}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(fname)
    return found, missing


def _download_idx(name: str, dest: Path) -> None:
    """Download the four ``.gz`` IDX files of ``name`` into ``dest`` (trying each mirror)."""
    errors = _download_errors()
    for fname in _IDX_FILES.values():
        if (dest / fname).is_file() or (dest / f"{fname}.gz").is_file():
            continue
        gz_name = f"{fname}.gz"
        failures: list[str] = []
        for mirror in _IDX_MIRRORS[name]:
            url = mirror + gz_name
            try:
                _download(url, dest / gz_name, _IDX_MD5[name][gz_name])
                break
            except errors as exc:
                failures.append(f"{url}: {type(exc).__name__}: {exc}")
        else:
            raise OSError("; ".join(failures))


def _idx_how_to(name: str) -> str:
    """Return the instructions to obtain the IDX files of ``name`` offline."""
    files = ", ".join(f"{f}[.gz]" for f in _IDX_FILES.values())
    where = (
        f"pass a directory holding the four IDX files ({files}) with --data-dir DIR "
        f"(run config data-dir=DIR, load_dataset(..., data_dir=DIR)) or set ${DATA_DIR_ENV}"
    )
    if name == "fashion-mnist":
        return (
            "install Debian's package (`apt-get install dataset-fashion-mnist`, which puts "
            f"them in {_DEBIAN_FASHION_MNIST_DIR}), or {where}. Upstream: "
            f"{_IDX_MIRRORS[name][0]}"
        )
    return f"download them from {_IDX_MIRRORS[name][0]} on a machine with internet, then {where}."


def _standardise(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float], channel_axis: int = 1
) -> np.ndarray:
    """Return ``(images / 255 - mean[c]) / std[c]`` as float32, per channel ``c``."""
    x = images.astype(np.float32)
    x /= np.float32(255.0)
    shape = [1] * x.ndim
    shape[channel_axis] = len(mean)
    x -= np.asarray(mean, dtype=np.float32).reshape(shape)
    x /= np.asarray(std, dtype=np.float32).reshape(shape)
    return x


def _labels_int64(labels: np.ndarray, n_classes: int, source: object) -> np.ndarray:
    """Return ``labels`` as int64 after checking they lie in ``[0, n_classes)``."""
    y = np.asarray(labels).astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{source}: labels must lie in [0, {n_classes}), found values in [{y.min()}, {y.max()}]"
        )
    return y


def _decode_idx(name: str, files: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """Read, validate and normalise the four IDX files of ``name``."""
    info = DATASETS[name]
    _, height, width = info.input_shape
    mean, std = _NORMALISATION[name]
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        img_path, lbl_path = files[f"{split}_images"], files[f"{split}_labels"]
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (height, width):
            raise ValueError(
                f"{img_path}: expected uint8 images of shape (N, {height}, {width}), got "
                f"{images.dtype} {images.shape}"
            )
        if labels.ndim != 1:
            raise ValueError(f"{lbl_path}: expected 1-D labels, got shape {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(
                f"{name} {split} split: {img_path} has {len(images)} images but "
                f"{lbl_path} has {len(labels)} labels"
            )
        out[f"x_{split}"] = _standardise(images[:, None, :, :], mean, std)
        out[f"y_{split}"] = _labels_int64(labels, info.num_classes, lbl_path)
    return out


def _load_idx_dataset(name: str, data_dir: Path | None, download: bool) -> dict[str, np.ndarray]:
    """Find (or download) the IDX files of ``name`` and return its cached, normalised arrays."""
    searched = _idx_search_dirs(name, data_dir)
    states: dict[Path, str] = {}
    files: dict[str, Path] | None = None
    for d in searched:
        found, missing = _find_idx_files(d)
        if not missing:
            files = found
            break
        states[d] = f"incomplete, missing {', '.join(missing)}" if found else _dir_state(d)

    if files is None:
        wanted = ", ".join(f"{f}[.gz]" for f in _IDX_FILES.values())
        dest = data_dir if data_dir is not None else _default_download_dir(name)
        if not download:
            note = "Download not attempted (download=False)."
            raise _not_found(name, states, wanted, note, _idx_how_to(name))
        created = _missing_dirs(dest)
        try:
            _download_idx(name, dest)
        except _download_errors() as exc:
            _remove_empty(created)
            note = f"Download into {dest} failed: {exc}"
            raise _not_found(name, states, wanted, note, _idx_how_to(name)) from exc
        files, _ = _find_idx_files(dest)

    key = {
        "dataset": name,
        "version": _PREPROCESS_VERSION,
        "sources": _fingerprint(files[r] for r in _IDX_FILES),
    }
    return cached_arrays(_CACHE_NAMESPACE, key, lambda: _decode_idx(name, files))


# --------------------------------------------------------------------------- #
# CIFAR-10 (python version)
# --------------------------------------------------------------------------- #

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_BATCHES = (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH)

# The only globals a CIFAR-10 batch pickle references (numpy arrays; py3
# pickles of bytes use _codecs.encode). numpy>=2 moved numpy.core to numpy._core.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 batch needs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: a CIFAR-10 batch holds only "
                "numpy arrays, lists and bytes"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(data uint8 (N, 3072), labels int64 (N,))`` of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            # Pickle is the dataset's own distribution format: this is a trusted
            # file the user provided (or that we downloaded and checked by MD5).
            # As a further guard the unpickler only resolves numpy-array globals.
            # encoding="bytes" because the batches were pickled by Python 2.
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 batch pickle ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict batch, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: batch lacks b'data' or b'labels' (keys: {list(batch)})")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        raise ValueError(
            f"{path}: b'data' must be a uint8 array of shape (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: b'labels' is not a list of integers ({exc})") from exc
    if y.shape != (len(data),):
        raise ValueError(f"{path}: {len(data)} images but labels have shape {y.shape}")
    return data, _labels_int64(y, DATASETS["cifar10"].num_classes, path)


def _check_tar_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Raise ``ValueError`` unless a tar member is a plain file/dir inside the target."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise ValueError(f"{archive}: unsafe path in archive member {name!r}")
    if not (member.isfile() or member.isdir()):
        raise ValueError(f"{archive}: archive member {name!r} is not a regular file or directory")


def _extract_cifar(archive: Path, dest_root: Path) -> Path:
    """Extract ``archive`` safely and return ``dest_root/cifar-10-batches-py``.

    Every member is checked first (no absolute paths, no ``..``, no links or
    devices). Extraction happens in a temporary directory inside
    ``dest_root`` which is then renamed into place, so concurrent processes
    never see a half-extracted directory.
    """
    import shutil
    import tarfile

    target = dest_root / _CIFAR_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".{_CIFAR_DIR}."))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_tar_member(archive, m)
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
        except (tarfile.TarError, EOFError, OSError) as exc:
            if isinstance(exc, PermissionError):
                raise
            raise ValueError(f"{archive}: cannot read archive ({exc})") from exc
        extracted = tmp / _CIFAR_DIR
        missing = [b for b in _CIFAR_BATCHES if not (extracted / b).is_file()]
        if missing:
            raise ValueError(f"{archive}: archive lacks {_CIFAR_DIR}/ with {', '.join(missing)}")
        try:
            os.rename(extracted, target)
        except OSError as exc:
            # Another process extracted it first: use theirs if it is complete.
            if not _has_batches(target):
                raise ValueError(
                    f"cannot extract {archive}: {target} already exists but lacks some of "
                    f"{', '.join(_CIFAR_BATCHES)}; remove it to extract again ({exc})"
                ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cifar_search_dirs(data_dir: Path | None) -> list[Path]:
    """Return the directories searched for CIFAR-10 batches or archive, in order."""
    dirs: list[Path] = []
    for base in (data_dir, _env_data_dir()):
        if base is not None:
            dirs += [base, base / "cifar10", base / _TORCHVISION_NAMES["cifar10"]]
    dirs.append(_default_download_dir("cifar10"))
    return _dedupe(dirs)


def _has_batches(directory: Path) -> bool:
    """Return whether ``directory`` holds all six CIFAR-10 batch files."""
    return all((directory / b).is_file() for b in _CIFAR_BATCHES)


def _extract_somewhere(archive: Path) -> Path:
    """Extract ``archive`` next to itself, or into the cache when that dir is read-only."""
    try:
        return _extract_cifar(archive, archive.parent)
    except PermissionError:
        fallback = _default_download_dir("cifar10")
        if _has_batches(fallback / _CIFAR_DIR):  # extracted there by an earlier call
            return fallback / _CIFAR_DIR
        return _extract_cifar(archive, fallback)


def _find_cifar(searched: Sequence[Path], states: dict[Path, str]) -> Path | None:
    """Return the first CIFAR-10 batch directory found (extracting an archive if needed).

    Records what each directory that did not qualify holds in ``states``.
    """
    for d in searched:
        for candidate in (d / _CIFAR_DIR, d):
            if _has_batches(candidate):
                return candidate
        if (d / _CIFAR_ARCHIVE).is_file():
            return _extract_somewhere(d / _CIFAR_ARCHIVE)
        partial = [
            f"{prefix}{b}"
            for prefix, where in ((f"{_CIFAR_DIR}/", d / _CIFAR_DIR), ("", d))
            for b in _CIFAR_BATCHES
            if (where / b).is_file()
        ]
        states[d] = f"incomplete, has only {', '.join(partial)}" if partial else _dir_state(d)
    return None


def _decode_cifar(batch_dir: Path) -> dict[str, np.ndarray]:
    """Read, validate and normalise the CIFAR-10 batches in ``batch_dir``."""
    mean, std = _NORMALISATION["cifar10"]
    out: dict[str, np.ndarray] = {}
    for split, names in (("train", _CIFAR_TRAIN_BATCHES), ("test", (_CIFAR_TEST_BATCH,))):
        parts = [_read_cifar_batch(batch_dir / n) for n in names]
        data = np.concatenate([p[0] for p in parts])
        # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major:
        # a reshape gives channel-first (N, 3, 32, 32) directly.
        out[f"x_{split}"] = _standardise(data.reshape(-1, 3, 32, 32), mean, std)
        out[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    return out


def _load_cifar10(data_dir: Path | None, download: bool) -> dict[str, np.ndarray]:
    """Find (or download) CIFAR-10 and return its cached, normalised arrays."""
    states: dict[Path, str] = {}
    batch_dir = _find_cifar(_cifar_search_dirs(data_dir), states)
    if batch_dir is None:
        wanted = f"{_CIFAR_DIR}/ ({', '.join(_CIFAR_BATCHES)}) or {_CIFAR_ARCHIVE}"
        how_to = (
            f"download {_CIFAR_URL} (md5 {_CIFAR_MD5}) on a machine with internet and "
            f"pass the directory holding {_CIFAR_ARCHIVE} or the extracted {_CIFAR_DIR}/ "
            f"with --data-dir DIR (run config data-dir=DIR, load_dataset(..., data_dir=DIR)) "
            f"or set ${DATA_DIR_ENV}."
        )
        dest = data_dir if data_dir is not None else _default_download_dir("cifar10")
        if not download:
            note = "Download not attempted (download=False)."
            raise _not_found("cifar10", states, wanted, note, how_to)
        created = _missing_dirs(dest)
        try:
            _download(_CIFAR_URL, dest / _CIFAR_ARCHIVE, _CIFAR_MD5)
        except _download_errors() as exc:
            _remove_empty(created)
            note = f"Download of {_CIFAR_URL} into {dest} failed: {type(exc).__name__}: {exc}"
            raise _not_found("cifar10", states, wanted, note, how_to) from exc
        batch_dir = _extract_somewhere(dest / _CIFAR_ARCHIVE)

    key = {
        "dataset": "cifar10",
        "version": _PREPROCESS_VERSION,
        "sources": _fingerprint(batch_dir / b for b in _CIFAR_BATCHES),
    }
    return cached_arrays(_CACHE_NAMESPACE, key, lambda: _decode_cifar(batch_dir))


# --------------------------------------------------------------------------- #
# digits (scikit-learn)
# --------------------------------------------------------------------------- #


def _digits_source() -> Path:
    """Return scikit-learn's bundled digits file, located without importing sklearn."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "dataset 'digits' needs scikit-learn (pip install scikit-learn)", name="sklearn"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    data_file = package / "datasets" / "data" / "digits.csv.gz"
    # If a future scikit-learn moves the file, fingerprint the package instead.
    return data_file if data_file.is_file() else package / "__init__.py"


def _decode_digits() -> dict[str, np.ndarray]:
    """Load scikit-learn's digits, scale to [0, 1] and split 80/20 stratified (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return {
        "x_train": np.ascontiguousarray(x_train),
        "y_train": np.ascontiguousarray(y_train),
        "x_test": np.ascontiguousarray(x_test),
        "y_test": np.ascontiguousarray(y_test),
    }


def _load_digits() -> dict[str, np.ndarray]:
    """Return the cached digits arrays (see :func:`_decode_digits`)."""
    key = {
        "dataset": "digits",
        "version": _PREPROCESS_VERSION,
        "sources": _fingerprint([_digits_source()]),
        "split_seed": DIGITS_SPLIT_SEED,
        "test_fraction": _DIGITS_TEST_FRACTION,
    }
    return cached_arrays(_CACHE_NAMESPACE, key, _decode_digits)


# --------------------------------------------------------------------------- #
# Public entry point
# --------------------------------------------------------------------------- #


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool | None = None
) -> tuple[ArrayDataset, ArrayDataset]:
    """Return ``(train, test)`` of dataset ``name``, normalised and ready for a model.

    Inputs are float32 (images channel-first ``(N, C, H, W)``, digits
    ``(N, 64)``), labels int64. Normalisation: digits ``x / 16``; MNIST and
    Fashion-MNIST ``(x / 255 - mean) / std``; CIFAR-10 the same per channel
    (constants in ``_NORMALISATION``).

    Files are searched in ``data_dir`` (and its ``<name>``, ``<name>/raw`` and
    torchvision-style subfolders), then ``$BASTION_DATA_DIR`` likewise, then
    system locations (Debian's ``/usr/share/datasets/fashion-mnist``), then
    ``cache_dir()/data/<name>``. When nothing is found and ``download`` is
    true, the files are downloaded from the public mirrors into ``data_dir``
    (or ``cache_dir()/data/<name>``) and checked by MD5. ``data_dir=""`` is the
    same as ``None``. ``download=None`` (the default) means "yes, unless the
    environment variable ``BASTION_NO_DOWNLOAD=1`` is set" (air-gapped sites,
    tests). ``digits`` ships with scikit-learn and ignores ``data_dir`` and
    ``download``.

    Raises ``ValueError`` for an unknown name or malformed files, and
    :class:`DatasetNotFoundError` (a ``FileNotFoundError``) when the data is
    neither present nor downloadable.
    """
    info = _info(name)
    directory = _normalise_data_dir(data_dir)
    if download is None:
        download = os.environ.get(NO_DOWNLOAD_ENV, "") != "1"
    if name == "digits":
        arrays = _load_digits()
    elif name in ("mnist", "fashion-mnist"):
        arrays = _load_idx_dataset(name, directory, download)
    else:
        arrays = _load_cifar10(directory, download)

    splits = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[1:] != info.input_shape:
            raise ValueError(
                f"dataset {name!r} {split} inputs have shape {x.shape[1:]}, "
                f"expected {info.input_shape}"
            )
        splits.append(ArrayDataset(x, y))
    return splits[0], splits[1]
