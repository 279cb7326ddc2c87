"""A small content-addressed on-disk cache of named numpy arrays.

Flower starts a fresh ClientApp process for every message, so whatever a client
needs (its dataset, already decoded and normalised) must load in milliseconds,
without importing scikit-learn or other heavy libraries. :func:`cached_arrays`
stores the output of an expensive computation as an uncompressed ``.npz`` file
(no pickle) whose name is a hash of what was computed, so the next process only
pays for ``np.load``.

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
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "cache_path", "cached_arrays"]

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


def _load(path: Path) -> dict[str, np.ndarray]:
    """Read every array of the ``.npz`` file at ``path`` into memory (no pickle)."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


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
