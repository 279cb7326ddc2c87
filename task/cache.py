"""A small content-addressed on-disk cache of named numpy arrays.

Flower starts a fresh ClientApp process for every message, so whatever a client
needs (its dataset, already decoded and normalised) must load in milliseconds,
without importing scikit-learn or other heavy libraries. :func:`cached_arrays`
stores the output of an expensive computation as an uncompressed ``.npz`` file
(no pickle) whose name is a hash of what was computed, so the next process only
maps it: the arrays come back as read-only ``np.memmap`` views of the file, whose pages
every process on the host shares (:func:`_load`).

Writes are atomic (a temporary file in the cache directory, then
``os.replace``), so any number of processes may race on the same key: a reader
sees either no file or a complete one, never a partial write. A cache file that
cannot be read (truncated, corrupt, not a zip) is recomputed and overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import re
import struct
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["cache_dir", "cache_path", "cached_arrays", "take_rows"]

_LOG = logging.getLogger(__name__)

#: Environment variable that overrides the cache location.
CACHE_ENV = "BASTION_CACHE_DIR"

_SAFE_NAMESPACE = re.compile(r"[^A-Za-z0-9_.-]+")

# Exceptions that mean "this cache file is unusable", as raised by np.load and
# zipfile on truncated, corrupt or foreign files.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def cache_dir() -> Path:
    """Return the Bastion cache directory, creating it if needed.

    The directory is ``$BASTION_CACHE_DIR`` when that variable is set and not
    empty, otherwise ``~/.cache/bastion``.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "bastion"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _key_digest(namespace: str, key: Mapping[str, object]) -> str:
    """Return the SHA-256 hex digest of ``namespace`` and the canonical JSON of ``key``."""
    try:
        canonical = json.dumps(dict(key), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cache key for namespace {namespace!r} must be JSON-serialisable "
            f"(str, int, float, bool, None, lists and dicts of them): {exc}"
        ) from exc
    payload = namespace.encode("utf-8") + b"\0" + canonical.encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def cache_path(namespace: str, key: Mapping[str, object]) -> Path:
    """Return the file that caches ``(namespace, key)``.

    The name is ``<namespace>-<sha256(namespace, json(key))>.npz`` inside
    ``cache_dir()/arrays``; the namespace is sanitised to a safe file-name
    prefix, and only the hash decides identity.
    """
    if not namespace:
        raise ValueError("cache namespace must be a non-empty string")
    digest = _key_digest(namespace, key)
    prefix = _SAFE_NAMESPACE.sub("_", namespace)[:48]
    return cache_dir() / "arrays" / f"{prefix}-{digest}.npz"


def _check_arrays(namespace: str, arrays: object) -> dict[str, np.ndarray]:
    """Validate that ``arrays`` is a ``dict[str, np.ndarray]`` storable without pickle."""
    if not isinstance(arrays, Mapping):
        raise TypeError(
            f"compute() for cache namespace {namespace!r} must return a dict of numpy "
            f"arrays, got {type(arrays).__name__}"
        )
    checked: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise TypeError(
                f"array names in cache namespace {namespace!r} must be non-empty strings "
                f"without '/', got {name!r}"
            )
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"array {name!r} in cache namespace {namespace!r} must be a numpy array, "
                f"got {type(value).__name__}"
            )
        if value.dtype.hasobject:
            raise TypeError(
                f"array {name!r} in cache namespace {namespace!r} has dtype {value.dtype}, "
                "which cannot be stored without pickle"
            )
        checked[name] = value
    return checked


_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _mapped_member(path: Path, f: BinaryIO, info: zipfile.ZipInfo) -> np.ndarray:
    """Memory-map the ``.npy`` member ``info`` of the uncompressed ``.npz`` at ``path``.

    ``np.savez`` stores members uncompressed, so each array's bytes lie contiguous in
    the file: after the member's local ZIP header (APPNOTE 4.3.7: 30 bytes, the name,
    the extra field) and the ``.npy`` header (NEP 1). numpy cannot map a ``.npz`` member
    itself (``np.load(mmap_mode=...)`` ignores it for archives), hence this.
    """
    f.seek(info.header_offset)
    signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"{path}: bad local header for {info.filename!r}")
    f.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise ValueError(f"{path}: member {info.filename!r} holds Python objects")
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    return np.memmap(
        path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=f.tell()
    )


def _load(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file at ``path`` (no pickle), memory-mapped read-only.

    Mapping instead of reading: a process only pays for the pages it touches (a
    client's partition of the training set, not all of it), and every process that
    maps the same cache file shares one copy of those pages in the page cache
    (forked ClientApp tasks, SuperNodes on one host). A member stored compressed (not
    written by this module) is read into memory.
    """
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                arrays[name] = _mapped_member(path, f, info)
            else:
                with zf.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _write_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, atomically.

    The data goes to a uniquely named temporary file in the same directory,
    is flushed to disk, and is then renamed over ``path`` with ``os.replace``
    (atomic on POSIX), so concurrent readers never observe a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; the cache is shareable
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def cached_arrays(
    namespace: str,
    key: Mapping[str, object],
    compute: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return the named arrays for ``(namespace, key)``, computing them at most once.

    On a hit, the arrays are loaded from the cache file (see :func:`cache_path`).
    On a miss, or when the cache file is unreadable, ``compute()`` is called,
    its result is written atomically to the cache and returned as computed.
    ``key`` must be JSON-serialisable; it should include everything the result
    depends on (source-file fingerprints, preprocessing version, seeds).

    A failure to *write* the cache (read-only or full disk) is logged and the
    computed arrays are still returned.
    """
    path = cache_path(namespace, key)
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    except _UNREADABLE as exc:
        _LOG.warning("cache file %s is unreadable (%s); recomputing it", path, exc)

    arrays = _check_arrays(namespace, compute())
    try:
        _write_atomic(path, arrays)
    except OSError as exc:
        _LOG.warning("could not write cache file %s (%s); continuing without cache", path, exc)
    return arrays


def take_rows(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` (a copy), read with ``pread`` when ``array`` maps a cache file.

    Fancy indexing into a memory map faults pages in one by one, and Linux maps up to
    64 KB around each faulting page (``fault_around_bytes``; ``MADV_RANDOM`` does not
    turn that off): a client's 2,345 scattered Fashion-MNIST rows (7 MB) touched 105 MB
    of the 188 MB file, all counted in the process's RSS. Reading the rows (sorted and
    coalesced into runs) puts only the copy in the process; the file's pages stay in
    the page cache, shared.
    """
    idx = np.asarray(indices, dtype=np.intp)
    if (
        not isinstance(array, np.memmap)
        # a whole mapping as np.memmap made it (a view's .offset is its parent's)
        or not isinstance(array.base, mmap.mmap)
        or array.filename is None
        or not array.flags.c_contiguous
        or array.ndim == 0
        or idx.size == 0
    ):
        return np.asarray(array)[idx]
    n = array.shape[0]
    if idx.min() < -n or idx.max() >= n:
        raise IndexError(f"index out of range for {n} rows")
    idx = np.where(idx < 0, idx + n, idx)
    row_bytes = array.strides[0]
    order = np.argsort(idx, kind="stable")
    rows = idx[order]
    out = np.empty((len(idx), *array.shape[1:]), dtype=array.dtype)
    sorted_out = memoryview(out.reshape(-1).view(np.uint8))
    with open(array.filename, "rb", buffering=0) as f:
        fd = f.fileno()
        start = 0
        # one pread per run of consecutive rows (a contiguous partition is one read)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for run in np.split(np.arange(len(rows)), breaks):
            first, count = int(rows[run[0]]), len(run)
            buf = os.pread(fd, count * row_bytes, array.offset + first * row_bytes)
            if len(buf) != count * row_bytes:
                raise OSError(f"{array.filename}: short read at row {first}")
            sorted_out[start * row_bytes : (start + count) * row_bytes] = buf
            start += count
    result = np.empty_like(out)
    result[order] = out
    return result
