"""Shared numerics for the robust aggregation rules (no Flower imports).

Everything here works on an ``(n, d)`` tensor of client deltas on CPU or CUDA
and processes the ``d`` coordinates in column chunks, so the temporaries stay
a small fraction of the input:

* :func:`centered_gram` -- the ``n x n`` Gram matrix of the mean-centred rows,
  accumulated in float64 (used for every pairwise distance: Krum, Multi-Krum,
  Bulyan, nearest-neighbour mixing, the geometric median's Weiszfeld
  iterations);
* :func:`coordinate_median`, :func:`coordinate_trimmed_mean`,
  :func:`bulyan_coordinate_phase` -- coordinate-wise order statistics computed
  by an elementwise min/max *sorting network* over the ``n`` rows of each chunk
  (Batcher 1968, odd-even merge sort), pruned to the outputs a rule needs;
* :func:`combine_rows` -- ``sum_i w_i x_i`` with float64 accumulation.

Numerical choices are explained in ``docs/AGGREGATION.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "assert_finite",
    "bulyan_coordinate_phase",
    "centered_gram",
    "chunk_columns",
    "combine_rows",
    "coordinate_median",
    "coordinate_trimmed_mean",
    "krum_order",
    "krum_scores",
    "mix_rows",
    "nonfinite_rows",
    "norm64",
    "row_sq_norms",
    "sorting_network",
    "sq_dists_from_gram",
]

# Up to this many rows the pruned sorting network beats torch.sort and
# torch.median on the same chunks (2-core x86: ~3x and ~1.7x at n = 128, ~5x
# and ~10x at n = 25); its comparator count grows as n log^2 n, so larger n
# falls back to torch.sort on the chunk.
NETWORK_MAX_ROWS = 128
# From this many rows on, the Gram kernel multiplies only the lower block
# triangle (3 of 4 half-size products).
_GRAM_SPLIT_ROWS = 48


# --------------------------------------------------------------------------- #
# Chunking                                                                     #
# --------------------------------------------------------------------------- #
def chunk_columns(
    n: int,
    d: int,
    device: torch.device,
    *,
    bytes_per_column: int,
    input_itemsize: int = 4,
    cpu_target_bytes: int = 1 << 21,
    cuda_target_bytes: int = 1 << 27,
    max_fraction: float = 0.05,
    min_columns: int = 1024,
) -> int:
    """Number of columns per chunk for a kernel whose temporaries take
    ``bytes_per_column`` bytes per column.

    The chunk targets ``cpu_target_bytes`` (for the Gram kernel about the L2
    cache, so the chunk stays cache-resident while it is centred and
    multiplied) or ``cuda_target_bytes`` of temporaries, but never more than
    ``max_fraction`` of the input's size (``n * d * input_itemsize`` bytes),
    with a floor of ``min_columns`` so tiny inputs are not cut into pieces that
    only cost dispatch overhead. Rounded down to a multiple of 64 columns.
    """
    per_col = max(1, bytes_per_column)
    target = cuda_target_bytes if device.type == "cuda" else cpu_target_bytes
    cols = target // per_col
    cap = int(max_fraction * n * d * input_itemsize) // per_col
    cols = min(cols, max(cap, min_columns))
    if cols > 64:
        cols -= cols % 64
    return max(1, min(d, cols))


def _chunks(d: int, cols: int) -> Iterator[tuple[int, int]]:
    for start in range(0, d, cols):
        yield start, min(d, start + cols)


# --------------------------------------------------------------------------- #
# Finiteness                                                                   #
# --------------------------------------------------------------------------- #
def nonfinite_rows(x: Tensor) -> list[int]:
    """Indices of the rows of ``x`` that contain a NaN or an infinity.

    Chunked over columns so the boolean temporary stays small.
    """
    n, d = x.shape
    bad = torch.zeros(n, dtype=torch.bool, device=x.device)
    cols = chunk_columns(n, d, x.device, bytes_per_column=n, input_itemsize=x.element_size())
    for s, e in _chunks(d, cols):
        bad |= ~torch.isfinite(x[:, s:e]).all(dim=1)
    return [int(i) for i in torch.nonzero(bad.cpu()).flatten()]


_VECTOR_CHUNK = 1 << 16


def all_finite(v: Tensor) -> bool:
    """Whether every entry of ``v`` is finite, with chunk-sized temporaries only.

    ``torch.isfinite(v).all()`` materialises ``|v|`` and boolean masks, and
    ``v.sum(dtype=torch.float64)`` a float64 copy of ``v`` (measured: ~2 float32
    vectors of ``v``'s size either way). Here each chunk of 2^16 entries is
    summed in float64: a sum is finite exactly when its entries are (float32
    entries cannot overflow a float64 sum).
    """
    if not v.is_floating_point():
        return True
    flat = v.reshape(-1)
    if v.dtype == torch.float64:  # float64 entries could overflow a sum: exact check
        return all(
            bool(torch.isfinite(flat[i : i + _VECTOR_CHUNK]).all())
            for i in range(0, flat.numel(), _VECTOR_CHUNK)
        )
    total = 0.0
    for i in range(0, flat.numel(), _VECTOR_CHUNK):
        total += float(torch.sum(flat[i : i + _VECTOR_CHUNK], dtype=torch.float64))
    return math.isfinite(total)


def norm64(v: Tensor) -> float:
    """The L2 norm of ``v`` accumulated in float64, chunk by chunk (no full copy)."""
    flat = v.reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), _VECTOR_CHUNK):
        total += float(
            torch.linalg.vector_norm(flat[i : i + _VECTOR_CHUNK], dtype=torch.float64) ** 2
        )
    return math.sqrt(total)


def assert_finite(x: Tensor, rule: str) -> None:
    """Raise ``ValueError`` naming ``rule`` and the offending rows if ``x`` has
    a non-finite entry."""
    bad = nonfinite_rows(x)
    if bad:
        raise ValueError(
            f"{rule}: input rows {bad[:20]}{' ...' if len(bad) > 20 else ''} contain "
            "NaN or infinite values; the rule needs finite updates"
        )


def _raise_if_nonfinite(x: Tensor, rule: str) -> None:
    """Called when a cheap fused check saw a non-finite sum: find the rows
    (a float32 sum can also overflow on finite data, in which case this is a
    no-op and the caller's result is used)."""
    assert_finite(x, rule)


# --------------------------------------------------------------------------- #
# Gram matrix and distances                                                    #
# --------------------------------------------------------------------------- #
def centered_gram(x: Tensor, rule: str = "gram") -> Tensor:
    """Gram matrix ``C C^T`` of the mean-centred rows ``C = X - 1 mu^T``.

    ``mu`` is the coordinate-wise mean of the rows. Centring does not change
    any pairwise distance, ``||x_i - x_j||^2 = G_ii + G_jj - 2 G_ij``, but it
    removes the component the updates share, so the cancellation in that
    formula is relative to the spread of the updates rather than to their
    (possibly much larger) norm. Each column chunk is widened to float64 and
    centred by its mean rounded to ``x``'s dtype (so ``x - mu`` is exact in
    float64), multiplied in float64 and accumulated in float64: the distances
    agree with a direct float64 computation ``sum_k (x_ik - x_jk)^2`` to about
    ``1e-16`` relative to the centred norms.

    The chunk (about 4 MB of float64 on CPU, at most ~5% of the input) is
    split into sub-blocks of 2048 columns multiplied by one batched GEMM,
    which parallelises over the sub-blocks (a single ``n x n`` output is too
    small for a multi-threaded GEMM).

    Returns an ``(n, n)`` float64 tensor on ``x``'s device. Raises
    ``ValueError`` naming ``rule`` if ``x`` holds NaN or infinities (detected
    from the Gram diagonal, at no extra pass).
    """
    n, d = x.shape
    sub = 2048 if x.device.type != "cuda" else 16384
    cols = chunk_columns(
        n,
        d,
        x.device,
        bytes_per_column=8 * n,
        cpu_target_bytes=1 << 22,
        input_itemsize=x.element_size(),
        min_columns=sub,
    )
    if cols >= sub:
        cols -= cols % sub
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    buf = torch.empty(n, cols, dtype=torch.float64, device=x.device)
    round_center = x.dtype != torch.float64
    half = n // 2
    for s, e in _chunks(d, cols):
        width = e - s
        centred = buf[:, :width]
        centred.copy_(x[:, s:e])
        mu = centred.mean(dim=0)
        if round_center:
            # A centre representable in x's dtype makes ``x - mu`` exact in float64.
            mu = mu.to(x.dtype).to(torch.float64)
        centred.sub_(mu)
        blocks = width // sub if width % sub == 0 else 0
        if blocks <= 1:
            gram.addmm_(centred, centred.T)
            continue
        # (blocks, n, sub) strided view; batched GEMMs over the blocks
        bv = buf.view(n, cols // sub, sub)[:, :blocks].transpose(0, 1)
        if n < _GRAM_SPLIT_ROWS:
            gram += torch.bmm(bv, bv.transpose(1, 2)).sum(dim=0)
        else:
            # symmetric: the two diagonal blocks and one off-diagonal block
            # (3/4 of the multiply-adds of the full product)
            top, bot = bv[:, :half], bv[:, half:]
            gram[:half, :half] += torch.bmm(top, top.transpose(1, 2)).sum(dim=0)
            gram[half:, half:] += torch.bmm(bot, bot.transpose(1, 2)).sum(dim=0)
            gram[half:, :half] += torch.bmm(bot, top.transpose(1, 2)).sum(dim=0)
    if n >= _GRAM_SPLIT_ROWS and d >= 2 * sub:
        gram[:half, half:] = gram[half:, :half].T
    if not bool(torch.isfinite(gram.diagonal()).all()):
        _raise_if_nonfinite(x, rule)
        raise ValueError(f"{rule}: squared norms overflow float64")
    return gram


def sq_dists_from_gram(gram: Tensor) -> Tensor:
    """Pairwise squared distances ``G_ii + G_jj - 2 G_ij`` from a Gram matrix,
    clamped at zero (rounding can make a tiny distance negative), with an
    exact zero diagonal and made exactly symmetric (a GEMM need not round
    ``G_ij`` and ``G_ji`` identically), so that ``d(i, j) == d(j, i)`` and
    symmetric ties stay ties."""
    g = (gram + gram.T) * 0.5
    diag = g.diagonal()
    dist = diag[:, None] + diag[None, :] - 2.0 * g
    dist.clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(dist: Tensor, num_neighbours: int) -> Tensor:
    """Krum score of every row: the sum of its squared distances to its
    ``num_neighbours`` nearest *other* rows (Blanchard et al. 2017, Sec. 4).

    ``dist`` is an ``(n, n)`` float64 matrix of squared distances. The
    neighbours' distances are summed in increasing order.
    """
    return _krum_sorted(dist, num_neighbours)[0]


def _krum_sorted(dist: Tensor, num_neighbours: int) -> tuple[Tensor, Tensor]:
    n = dist.shape[0]
    masked = dist.clone()
    masked.fill_diagonal_(math.inf)
    rows = torch.sort(masked, dim=1).values[:, : max(n - 1, 0)]
    k = max(0, min(num_neighbours, n - 1))
    return rows[:, :k].sum(dim=1), rows


def krum_order(dist: Tensor, num_neighbours: int) -> tuple[list[int], Tensor]:
    """Rows ordered by increasing Krum score, and the scores.

    Exact score ties -- which Krum's symmetric distances create whenever two
    rows are each other's only counted neighbour -- are broken by comparing
    the rows' next-nearest distances in increasing order (the
    ``num_neighbours + 1``-th, then the next, ...), and only then by index.
    This keeps the choice independent of the order of the inputs (the paper
    leaves ties unspecified).
    """
    scores, rows = _krum_sorted(dist, num_neighbours)
    k = max(0, min(num_neighbours, dist.shape[0] - 1))
    s = scores.tolist()
    tail = rows[:, k:].tolist()
    order = sorted(range(len(s)), key=lambda i: (s[i], tail[i], i))
    return order, scores


def row_sq_norms(x: Tensor, center: Tensor | None = None) -> Tensor:
    """``||x_i - center||^2`` for every row (center defaults to 0), accumulated
    in float64 over column chunks. Returns an ``(n,)`` float64 tensor on x's
    device."""
    n, d = x.shape
    cols = chunk_columns(n, d, x.device, bytes_per_column=8 * n, input_itemsize=x.element_size())
    out = torch.zeros(n, dtype=torch.float64, device=x.device)
    buf = torch.empty(n, cols, dtype=torch.float64, device=x.device)
    for s, e in _chunks(d, cols):
        b = buf[:, : e - s]
        if center is None:
            b.copy_(x[:, s:e])
        else:
            torch.sub(x[:, s:e], center[s:e].to(torch.float64), out=b)
        out += torch.einsum("ij,ij->i", b, b)
    return out


def combine_rows(
    x: Tensor, weights: Tensor, *, base: Tensor | None = None, base_weight: float = 0.0
) -> Tensor:
    """``sum_i w_i x_i  (+ base_weight * base)`` with float64 accumulation.

    ``weights`` is an ``(n,)`` tensor (any float dtype, any device); rows with
    a zero weight are not read. Each column chunk of the used rows is widened
    to float64 and contracted with the weights (a float64 GEMV), so the
    result is the exactly rounded combination up to ~1e-16 relative error even
    when the rows share a large common component. The result has ``x``'s
    dtype and device.
    """
    n, d = x.shape
    w = weights.detach().to(device="cpu", dtype=torch.float64)
    nz = torch.nonzero(w).flatten()
    m = int(nz.numel())
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    use_all = m == n
    w_used = w[nz].to(x.device)
    rows_used = nz.tolist()
    cols = chunk_columns(
        max(m, 1),
        d,
        x.device,
        bytes_per_column=8 * (max(m, 1) + 1),
        cpu_target_bytes=1 << 22,
        input_itemsize=x.element_size(),
    )
    buf = torch.empty(max(m, 1), cols, dtype=torch.float64, device=x.device)
    acc_full = torch.empty(cols, dtype=torch.float64, device=x.device)
    for s, e in _chunks(d, cols):
        acc = acc_full[: e - s]
        if m:
            b = buf[:, : e - s]
            if use_all:
                b.copy_(x[:, s:e])
            else:
                for j, i in enumerate(rows_used):
                    b[j].copy_(x[i, s:e])
            torch.mv(b.T, w_used, out=acc)
        else:
            acc.zero_()
        if base is not None and base_weight != 0.0:
            acc.add_(base[s:e], alpha=base_weight)
        out[s:e].copy_(acc)
    return out


# --------------------------------------------------------------------------- #
# Sorting networks                                                             #
# --------------------------------------------------------------------------- #
@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort network on ``n`` wires (Batcher 1968).

    Built for the next power of two and restricted to the first ``n`` wires:
    the extra wires can be thought of as holding ``+inf``, which never leaves
    them, so every comparator touching them is a no-op and is dropped. Each
    comparator ``(a, b)`` with ``a < b`` puts the minimum on ``a`` and the
    maximum on ``b``; after all comparators wire ``k`` holds the ``k``-th
    smallest value.
    """
    if n < 1:
        raise ValueError(f"sorting network needs n >= 1, got n={n}")
    size = 1 << max(0, (n - 1).bit_length())
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


def _prune(
    network: Sequence[tuple[int, int]],
    labels: Sequence[int],
    needed: frozenset[int] | None,
) -> tuple[tuple[int, int], ...]:
    """Drop comparators that cannot change what a rule reads.

    ``labels[k]`` groups the final positions: the rule only needs the
    multiset of values in each group, so a comparator whose two wires are in
    the same group and that is the last one touching both wires only permutes
    values inside a group and is dropped (repeated from the back). Then, if
    ``needed`` is given, only comparators on which some needed final position
    depends are kept.
    """
    kept: list[tuple[int, int]] = []
    touched = [False] * len(labels)
    for a, b in reversed(network):
        if not touched[a] and not touched[b] and labels[a] == labels[b]:
            continue
        kept.append((a, b))
        touched[a] = touched[b] = True
    kept.reverse()
    if needed is None:
        return tuple(kept)
    live = set(needed)
    out: list[tuple[int, int]] = []
    for a, b in reversed(kept):
        if a in live or b in live:
            out.append((a, b))
            live.add(a)
            live.add(b)
    out.reverse()
    return tuple(out)


@functools.cache
def _median_network(n: int) -> tuple[tuple[int, int], ...]:
    mids = _median_positions(n)
    labels = [1 if k in mids else 0 for k in range(n)]
    return _prune(sorting_network(n), labels, frozenset(mids))


@functools.cache
def _trimmed_network(n: int, trim: int) -> tuple[tuple[int, int], ...]:
    labels = [1 if trim <= k < n - trim else 0 for k in range(n)]
    return _prune(sorting_network(n), labels, frozenset(range(trim, n - trim)))


@functools.cache
def _bulyan_network(theta: int, f: int) -> tuple[tuple[int, int], ...]:
    # Exact positions are needed for the 2f+1 smallest, the 2f+1 largest and
    # the median; the remaining (core) positions are only summed.
    exact = set(range(min(theta, 2 * f + 1)))
    exact |= set(range(max(0, theta - 2 * f - 1), theta))
    exact |= set(_median_positions(theta))
    labels = [k + 1 if k in exact else 0 for k in range(theta)]
    return _prune(sorting_network(theta), labels, None)


def _median_positions(n: int) -> tuple[int, ...]:
    return ((n - 1) // 2,) if n % 2 else (n // 2 - 1, n // 2)


def _run_network(rows: list[Tensor], spare: Tensor, network: Sequence[tuple[int, int]]) -> Tensor:
    """Apply ``network`` to the row tensors in place (by swapping row
    references, so each comparator costs one ``minimum`` and one ``maximum``).
    Returns the new spare row."""
    minimum, maximum = torch.minimum, torch.maximum
    for a, b in network:
        ra, rb = rows[a], rows[b]
        minimum(ra, rb, out=spare)
        maximum(ra, rb, out=rb)
        rows[a] = spare
        spare = ra
    return spare


def _sorted_chunk_rows(
    x: Tensor,
    s: int,
    e: int,
    buf: Tensor | None,
    network: Sequence[tuple[int, int]] | None,
    rows_index: Tensor | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Order columns ``s:e`` of ``x`` (optionally only rows ``rows_index``).

    With a sorting ``network`` the chunk is copied into ``buf`` (one spare
    row) and sorted in place; without one, ``torch.sort`` sorts it. Returns
    the ordered rows (views; row ``k`` holds the ``k``-th smallest value of
    every column) and the chunk's sum (a cheap finiteness witness: it is
    finite whenever every entry is, barring float overflow).
    """
    chunk = x[:, s:e]
    if network is None:
        if rows_index is not None:
            chunk = torch.index_select(chunk, 0, rows_index)
        ordered = torch.sort(chunk.T, dim=1).values
        return list(ordered.T.unbind(0)), chunk.sum()
    assert buf is not None
    m = buf.shape[0] - 1
    b = buf[:, : e - s]
    if rows_index is None:
        b[:m].copy_(chunk)
    else:
        torch.index_select(chunk, 0, rows_index, out=b[:m])
    witness = b[:m].sum()
    rows = list(b.unbind(0))
    spare = rows.pop()
    _run_network(rows, spare, network)
    return rows, witness


def _order_buffer(m: int, d: int, x: Tensor, network: object) -> tuple[Tensor | None, int]:
    """Work buffer of ``m + 1`` rows for a network over ``m`` rows (``None``
    when there is no network) and the chunk width: about 65536 columns on CPU,
    about 1M on CUDA, and at most ~5% of the input.

    On CPU, torch runs an elementwise op on one thread below 32768 elements
    (its grain size); 65536 columns let every comparator use two threads and
    amortise the per-op dispatch cost (median of 25 rows per 1.1e7 columns on 2 cores:
    0.59 s at 32768 columns, 0.43 s at 65536, 0.42 s at 131072)."""
    item = x.element_size()
    cols = chunk_columns(
        m + 1,
        d,
        x.device,
        bytes_per_column=(m + 1) * item,
        cpu_target_bytes=65536 * (m + 1) * item,
        cuda_target_bytes=(1 << 20) * (m + 1) * item,
        input_itemsize=item,
    )
    if network is None:
        return None, cols
    return torch.empty(m + 1, cols, dtype=x.dtype, device=x.device), cols


def _check_witnesses(witnesses: list[Tensor], x: Tensor, rule: str) -> None:
    if witnesses and not bool(torch.isfinite(torch.stack(witnesses)).all()):
        _raise_if_nonfinite(x, rule)


def coordinate_median(x: Tensor, rule: str = "median") -> Tensor:
    """Coordinate-wise median of the rows of ``x`` (Yin et al. 2018).

    For even ``n`` it is the mean of the two middle values,
    ``(s_{n/2-1} + s_{n/2}) / 2`` rounded once (``torch.median`` would return
    the lower one). Uses a pruned sorting network for ``n <= 128`` and
    ``torch.sort`` on chunks above; both give bit-identical results.
    """
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    network = _median_network(n) if n <= NETWORK_MAX_ROWS else None
    buf, cols = _order_buffer(n, d, x, network)
    mids = _median_positions(n)
    witnesses = []
    for s, e in _chunks(d, cols):
        rows, w = _sorted_chunk_rows(x, s, e, buf, network)
        witnesses.append(w)
        if len(mids) == 1:
            out[s:e].copy_(rows[mids[0]])
        else:
            o = out[s:e]
            torch.mul(rows[mids[0]], 0.5, out=o)
            o.add_(rows[mids[1]], alpha=0.5)
    _check_witnesses(witnesses, x, rule)
    return out


def coordinate_trimmed_mean(x: Tensor, trim: int, rule: str = "trimmed-mean") -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the
    ``trim`` largest and ``trim`` smallest values and average the remaining
    ``n - 2 trim``; the average is accumulated in float64 and rounded once."""
    n, d = x.shape
    if not 0 <= 2 * trim < n:
        raise ValueError(f"{rule} needs n > 2f, got n={n}, f={trim}")
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    network = _trimmed_network(n, trim) if n <= NETWORK_MAX_ROWS else None
    buf, cols = _order_buffer(n, d, x, network)
    acc_full = torch.empty(cols, dtype=torch.float64, device=x.device)
    row64_full = torch.empty(cols, dtype=torch.float64, device=x.device)
    count = n - 2 * trim
    witnesses = []
    for s, e in _chunks(d, cols):
        rows, w = _sorted_chunk_rows(x, s, e, buf, network)
        witnesses.append(w)
        acc, row64 = acc_full[: e - s], row64_full[: e - s]
        acc.copy_(rows[trim])
        for k in range(trim + 1, n - trim):
            # widen explicitly: a mixed-dtype add_ allocates per-thread temporaries
            row64.copy_(rows[k])
            acc.add_(row64)
        acc.div_(count)
        out[s:e].copy_(acc)
    _check_witnesses(witnesses, x, rule)
    return out


def bulyan_coordinate_phase(x: Tensor, selected: Tensor, f: int, rule: str = "bulyan") -> Tensor:
    """Second phase of Bulyan (El Mhamdi, Guerraoui & Rouault 2018, Alg. 1
    step 2): over the ``theta = len(selected)`` selected rows, per coordinate
    average the ``beta = theta - 2f`` values closest to the coordinate-wise
    median ``m`` of the selected rows.

    With the selected values of a coordinate sorted, ``s_0 <= ... <=
    s_{theta-1}``, the ``beta`` closest values form a window ``s_j ..
    s_{j+beta-1}`` with ``j`` in ``0..2f``. Write ``c_k`` for "``s_k`` is
    farther from ``m`` than ``s_{k+beta}``", i.e. ``s_k + s_{k+beta} < 2m``
    (an exact tie counts the larger value as farther, so ``c_k`` is false).
    ``s_k + s_{k+beta}`` is non-decreasing in ``k``, so ``c_0..c_{2f-1}`` is
    a run of trues followed by falses and ``j = #{k < 2f : c_k}``: the window
    starts after every value that loses to the value ``beta`` places above it.
    The sums are formed in float64 from float32 inputs, and rounding is
    monotone, so the computed ``c_k`` keep that order. Row ``k`` then belongs to
    the window iff ``k >= j`` (``k >= 2f`` or not ``c_k``) and ``k < j + beta``
    (``k < beta`` or ``c_{k-beta}``); the window is averaged in float64 and
    rounded once.

    Cost per column chunk: the sorting network, ``2f`` add-and-compare passes
    and ``theta`` float64 accumulations (masked at the ``4f`` edge rows) --
    no gathers.
    """
    theta = int(selected.numel())
    beta = theta - 2 * f
    d = x.shape[1]
    if beta < 1:
        raise ValueError(f"{rule} needs theta - 2f >= 1, got theta={theta}, f={f}")
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    network = _bulyan_network(theta, f) if theta <= NETWORK_MAX_ROWS else None
    buf, cols = _order_buffer(theta, d, x, network)
    idx = selected.to(device=x.device, dtype=torch.long)
    mids = _median_positions(theta)
    f64 = {"dtype": torch.float64, "device": x.device}
    acc_full = torch.empty(cols, **f64)
    row_full = torch.empty(cols, **f64)
    twice_med_full = torch.empty(cols, **f64)
    # c_k for k < 2f, stored as float64 0/1 so it multiplies the rows directly
    farther_full = torch.empty(max(2 * f, 1), cols, **f64)
    witnesses = []
    for s, e in _chunks(d, cols):
        rows, w = _sorted_chunk_rows(x, s, e, buf, network, rows_index=idx)
        witnesses.append(w)
        width = e - s
        acc, row64 = acc_full[:width], row_full[:width]
        twice_med = twice_med_full[:width]
        # 2m exactly: the middle value doubled, or the sum of the two middle ones
        twice_med.copy_(rows[mids[0]])
        if len(mids) == 2:
            row64.copy_(rows[mids[1]])
            twice_med.add_(row64)
        else:
            twice_med.mul_(2.0)
        farther = farther_full[:, :width]
        for k in range(2 * f):
            c = farther[k]
            c.copy_(rows[k])
            row64.copy_(rows[k + beta])
            c.add_(row64)
            torch.lt(c, twice_med, out=c)
        acc.zero_()
        for k in range(theta):
            row64.copy_(rows[k])
            at_least_start = k >= 2 * f  # else: not c_k
            below_end = k < beta  # else: c_{k-beta}
            if at_least_start and below_end:
                acc.add_(row64)
                continue
            if not at_least_start:
                # keep iff not c_k: subtract c_k * s_k from s_k
                row64.addcmul_(row64, farther[k], value=-1.0)
            if not below_end:
                row64.mul_(farther[k - beta])
            acc.add_(row64)
        torch.div(acc, beta, out=out[s:e])
    _check_witnesses(witnesses, x, rule)
    return out


# --------------------------------------------------------------------------- #
# Row mixing (pre-aggregation outputs)                                         #
# --------------------------------------------------------------------------- #
def mix_rows(x: Tensor, mixing: Tensor, rule: str = "mix") -> Tensor:
    """``mixing @ x`` for an ``(m, n)`` coefficient matrix, with float64
    accumulation, chunked over columns.

    Sparse mixings (at most 16 non-zeros per row and fewer than ``n / 2``:
    resampling, bucketing) gather just the rows each output needs; dense ones
    (nearest-neighbour mixing) use a float64 GEMM per chunk. Returns an
    ``(m, d)`` tensor with ``x``'s dtype and device. Raises ``ValueError``
    naming ``rule`` if ``x`` has non-finite entries that reach the output.
    """
    n, d = x.shape
    mix = mixing.detach().to(device="cpu", dtype=torch.float64)
    m = mix.shape[0]
    out = torch.empty(m, d, dtype=x.dtype, device=x.device)
    nnz = (mix != 0).sum(dim=1)
    k = int(nnz.max()) if m else 0
    f64 = {"dtype": torch.float64, "device": x.device}
    witnesses = []
    if 0 < k <= 16 and 2 * k < n:
        idx = torch.zeros(m, k, dtype=torch.long)
        coef = torch.zeros(m, k, dtype=torch.float64)
        for r in range(m):
            cols_r = torch.nonzero(mix[r]).flatten()
            idx[r, : cols_r.numel()] = cols_r
            coef[r, : cols_r.numel()] = mix[r, cols_r]
        idx_flat = idx.flatten().to(x.device)
        coef = coef.to(x.device)[:, :, None]
        cols = chunk_columns(
            n,
            d,
            x.device,
            bytes_per_column=m * k * (x.element_size() + 16),
            cpu_target_bytes=1 << 22,
            input_itemsize=x.element_size(),
        )
        for s, e in _chunks(d, cols):
            gathered = torch.index_select(x[:, s:e], 0, idx_flat).view(m, k, e - s)
            acc = (gathered.to(torch.float64) * coef).sum(dim=1)
            witnesses.append(acc.sum())
            out[:, s:e].copy_(acc)
    else:
        mix_dev = mix.to(x.device)
        cols = chunk_columns(
            n,
            d,
            x.device,
            bytes_per_column=8 * (n + m),
            cpu_target_bytes=1 << 22,
            input_itemsize=x.element_size(),
        )
        buf = torch.empty(n, cols, **f64)
        acc_full = torch.empty(m, cols, **f64)
        for s, e in _chunks(d, cols):
            b = buf[:, : e - s]
            b.copy_(x[:, s:e])
            acc = acc_full[:, : e - s]
            torch.mm(mix_dev, b, out=acc)
            witnesses.append(acc.sum())
            out[:, s:e].copy_(acc)
    if witnesses and not bool(torch.isfinite(torch.stack(witnesses)).all()):
        _raise_if_nonfinite(x, rule)
        raise ValueError(f"{rule}: the mixed updates overflow {x.dtype}")
    return out
