"""DP-SGD vs plain SGD: local-training throughput, peak memory and per-round setup cost.

Trains ``--models``: the Fashion-MNIST CNN (``mnist``: ``task.models.MnistCNN``, 184,586
parameters, on ``--examples`` Fashion-MNIST images, default 6,000: one client's share
with 10 clients) and the CIFAR-10 CNN (``cifar``: ``Cifar10CNN``, 106,922 parameters,
four convolutions with GroupNorm, on as many seeded Gaussian images of CIFAR-10's
shape: CIFAR-10 is not on this machine, and a step's time does not depend on the
pixels), through the exact functions the ClientApp calls:

- **plain**: ``task.training.train_local`` (shuffled DataLoader, ``PlainSGD``);
- **hooks / ew / functorch / ghost**: ``task.training.train_local_dp`` with that
  Opacus ``grad_sample_mode`` (Opacus 1.6: Poisson-sampled ``DPDataLoader``, per-sample
  gradients or, for ``ghost``, per-sample norms via ghost clipping with a second
  backward pass, clipping to ``max_grad_norm``, Gaussian noise, ``DPOptimizer`` /
  ``DPOptimizerFastGradientClipping`` around ``torch.optim.SGD``);
- **ghost-conv**: Opacus' ghost clipping with Bastion's ``Conv2d`` ghost norms
  (``task.ghost_norms``): still two backward passes;
- **bookkeeping**: one backward pass (``task.bookkeeping``, Bu et al. 2023), same
  Opacus loader, optimizer and noise.

Hyper-parameters are the run-config defaults (lr 0.1, momentum 0.9, no weight decay;
noise multiplier 1.0, max grad norm 1.0). For each torch thread count (``--threads``,
``torch.set_num_threads``) and each batch size (``--batches``; for DP the *expected*
Poisson batch size, q = batch / examples):

1. warm-up: every mode runs one short call (lazy imports, allocator, thread pools);
2. ``--reps`` repetitions (fewer, but at least 3, once the group has run
   ``--max-group-s`` seconds); in repetition r every mode runs once, in an order rotated
   by r (so no mode always runs first or right after another), each call on a fresh
   copy of the same initial model with the repetition's seed (same shuffling for
   plain, same Poisson draws and noise seed for every DP mode);
3. per call: the loop time that the function itself reports (``result.seconds``:
   the training steps, data loading and the optimizer included) and the call's wall
   time. **samples/s** = examples actually processed / loop time: for plain the batch
   sizes of the shuffled loader, for DP the realised Poisson batch sizes, replayed
   outside the timing with Opacus' ``DPDataLoader`` and the same seed over a dummy
   dataset (the warm-up checks the replay against the batch sizes the optimizer saw).
   **setup** = wall - loop: everything ``train_local_dp`` does before the first
   step (``prepare_module`` wrapping the model with hooks, the optimizers, the DP
   loader, the generators) and its teardown (``_close``), i.e. the per-round fixed
   cost of DP in a process where Opacus is already imported;
4. the table gives the median per mode, the ratio plain/DP of the medians (the
   target: DP-SGD at most 1.5x slower than plain SGD in samples/s) and the range of
   the per-repetition (paired) ratios;
5. **peak MB** (``--memory-steps``, default 4; 0 skips it): in one fresh process per
   (model, batch, mode), after a warm-up call, the resident memory that one call adds
   at its peak over what the process held before it (``/proc/self/status`` VmHWM
   after resetting it through ``/proc/self/clear_refs``; 1 thread).

Separately (``--cold-modes``), one fresh subprocess per mode measures what the first
round of a ClientApp process pays (Flower starts one per message): the Opacus import
(the modules ``train_local_dp`` imports) and the setup of the first call after it,
then the setup of a second call. ``--profile MODE`` instead runs ``torch.profiler``
over one call and prints the most expensive ops.

    python benchmarks/privacy.py                      # 1 and 2 threads, batch 64 and 256 (~5 min)
    python benchmarks/privacy.py --models mnist cifar --modes plain ghost bookkeeping
    python benchmarks/privacy.py --quick              # smoke check (< 1 min)
    python benchmarks/privacy.py --threads 1 --batches 64 --steps 30 --reps 7 --json dp.json
    python benchmarks/privacy.py --profile ghost --batches 256 --threads 1

Never run by the test suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DP_MODES = ("hooks", "ew", "functorch", "ghost", "ghost-conv", "bookkeeping")
FAST_MODES = ("ghost", "ghost-conv", "bookkeeping")  # no p.grad_sample in the step hook
MODES = ("plain", *DP_MODES)
# model name -> (class name in task.models, input shape, data)
MODELS = {
    "mnist": ("MnistCNN", (1, 28, 28), "Fashion-MNIST"),
    "cifar": ("Cifar10CNN", (3, 32, 32), "synthetic CIFAR-shaped"),
}
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}  # common.config defaults
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
TARGET = 1.5  # DP-SGD at most 1.5x plain SGD in samples/s
MIN_REPS = 3  # repetitions run even past --max-group-s
OPACUS_MODULES = (
    "opacus.data_loader",
    "opacus.grad_sample.utils",
    "opacus.optimizers",
    "opacus.utils.fast_gradient_clipping_utils",
)


def local_data(examples: int, seed: int = 0, model: str = "mnist") -> Any:
    """One client's training set: a seeded random subset of Fashion-MNIST for
    ``mnist``; for ``cifar``, seeded Gaussian images of CIFAR-10's shape with random
    labels (CIFAR-10 is not on this machine, and the time of a step does not depend
    on the pixel values)."""
    import numpy as np

    from task.datasets import ArrayDataset, load_dataset

    if model == "cifar":
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((examples, *MODELS[model][1]), dtype=np.float32)
        return ArrayDataset(x, rng.integers(0, 10, examples).astype(np.int64))
    train, _ = load_dataset("fashion-mnist", download=False)
    idx = np.random.default_rng(seed).permutation(len(train))[:examples]
    return train.subset(np.sort(idx))


def build(model: str) -> Any:
    """A fresh, seeded instance of the benchmarked model."""
    import torch

    from task import models

    torch.manual_seed(0)
    return getattr(models, MODELS[model][0])()


def plain_sizes(n: int, batch: int, steps: int) -> list[int]:
    """Batch sizes ``train_local`` takes: its loader keeps the last partial batch."""
    epoch = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    return [epoch[i % len(epoch)] for i in range(steps)]


def poisson_sizes(n: int, batch: int, steps: int, seed: int) -> list[int]:
    """Replay of the Poisson batch sizes of ``train_local_dp`` with this seed.

    Runs Opacus' own ``DPDataLoader`` with the same rate and seeded generator (which
    the sampler and each new iterator's base seed draw from) over a dummy dataset of
    ``n`` scalars, looping over epochs as ``train_local_dp`` does.
    """
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    from task.training import dp_sample_rate

    loader = DPDataLoader(
        TensorDataset(torch.zeros(n)),
        sample_rate=dp_sample_rate(n, batch),
        generator=torch.Generator().manual_seed(seed),
    )
    sizes: list[int] = []
    while len(sizes) < steps:
        for (xb,) in loader:
            sizes.append(len(xb))
            if len(sizes) >= steps:
                break
    return sizes


def one_call(
    mode: str, model: Any, data: Any, batch: int, steps: int, seed: int, hook: Any = None
) -> dict[str, Any]:
    """One call of the product function on ``model`` (trained in place)."""
    from task.training import train_local, train_local_dp

    t0 = time.perf_counter()
    if mode == "plain":
        r = train_local(model, data, **SGD, steps=steps, batch_size=batch, seed=seed)
        samples = sum(plain_sizes(len(data), batch, r.steps))
    else:
        r = train_local_dp(
            model,
            data,
            **SGD,
            **DP,
            steps=steps,
            batch_size=batch,
            grad_sample_mode=mode,
            seed=seed,
            step_hook=hook,
        )
        samples = sum(poisson_sizes(len(data), batch, r.steps, seed))
    wall = time.perf_counter() - t0
    return {
        "mode": mode,
        "steps": r.steps,
        "samples": samples,
        "loop_s": r.seconds,
        "setup_s": wall - r.seconds,
        "samples_per_s": samples / r.seconds,
        "ms_per_step": 1000 * r.seconds / r.steps,
        "loss": r.mean_loss,
    }


def check_replay(mode: str, base: Any, data: Any, batch: int, seed: int = 12345) -> None:
    """The replayed Poisson sizes must be the batch sizes the DP optimizer saw.

    ``mode`` is not ``ghost``: the step hook reads ``p.grad_sample``, which ghost
    clipping never materialises.
    """
    model = copy.deepcopy(base)
    seen: list[int] = []
    first = next(iter(model.parameters()))

    def hook(_optimizer: Any) -> None:
        seen.append(len(first.grad_sample))

    one_call(mode, model, data, batch, 4, seed, hook=hook)
    want = poisson_sizes(len(data), batch, 4, seed)
    if seen != want:
        raise RuntimeError(f"Poisson replay {want} != batch sizes seen by Opacus {seen}")


def run_group(
    threads: int,
    batch: int,
    steps: int,
    reps: int,
    modes: list[str],
    data: Any,
    base: Any,
    max_s: float = 0.0,
    model_name: str = "mnist",
) -> list[dict[str, Any]]:
    """Warm-up, then ``reps`` interleaved repetitions of every mode at one setting.

    With ``max_s > 0`` no repetition starts once the group has run ``max_s`` seconds
    (warm-up included), after at least ``MIN_REPS``.
    """
    import torch

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    for mode in modes:  # warm-up
        one_call(mode, copy.deepcopy(base), data, batch, max(2, steps // 4), seed=999)
    checkable = [m for m in modes if m not in ("plain", *FAST_MODES)]
    if checkable:  # outside the timed repetitions
        check_replay(checkable[0], base, data, batch)
    out = []
    for rep in range(reps):
        if max_s > 0 and rep >= MIN_REPS and time.perf_counter() - t_start > max_s:
            print(f"  time cap: {rep} repetitions", file=sys.stderr, flush=True)
            break
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
        for pos, mode in enumerate(order):
            model = copy.deepcopy(base)
            r = one_call(mode, model, data, batch, steps, seed=1000 + rep)
            r.update(model=model_name, threads=threads, batch=batch, rep=rep, position=pos)
            out.append(r)
            print(
                f"  {model_name} threads={threads} batch={batch} rep={rep} {mode:11s} "
                f"{r['samples_per_s']:7.0f} samples/s  {r['ms_per_step']:6.1f} ms/step  "
                f"setup {1000 * r['setup_s']:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    return out


def summarise(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (threads, batch, mode) and the plain/DP ratios."""
    rows = []
    keys = sorted(
        {(c["model"], c["threads"], c["batch"]) for c in calls},
        key=lambda k: (list(MODELS).index(k[0]), k[1], k[2]),
    )
    for model, threads, batch in keys:
        group = [
            c for c in calls if (c["model"], c["threads"], c["batch"]) == (model, threads, batch)
        ]
        by_mode = {m: [c for c in group if c["mode"] == m] for m in MODES}
        plain = {c["rep"]: c["samples_per_s"] for c in by_mode["plain"]}
        plain_med = statistics.median(plain.values()) if plain else None
        for mode in MODES:
            cs = by_mode[mode]
            if not cs:
                continue
            sps = [c["samples_per_s"] for c in cs]
            row = {
                "model": model,
                "threads": threads,
                "batch": batch,
                "mode": mode,
                "reps": len(cs),
                "steps": cs[0]["steps"],
                "samples_per_s": statistics.median(sps),
                "samples_per_s_min": min(sps),
                "samples_per_s_max": max(sps),
                "ms_per_step": statistics.median(c["ms_per_step"] for c in cs),
                "setup_ms": 1000 * statistics.median(c["setup_s"] for c in cs),
                "mean_batch": statistics.mean(c["samples"] / c["steps"] for c in cs),
            }
            if mode != "plain" and plain_med is not None:
                row["ratio"] = plain_med / row["samples_per_s"]
                paired = [plain[c["rep"]] / c["samples_per_s"] for c in cs if c["rep"] in plain]
                row["paired_min"], row["paired_max"] = min(paired), max(paired)
            rows.append(row)
    return rows


HEADER = (
    "| model | threads | batch | mode | reps | samples/s (median) | min–max | ms/step "
    f"| DP/plain time | paired min–max | <= {TARGET:g}x? | setup ms (warm) | peak MB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _row(r: dict[str, Any]) -> str:
    head = (
        f"| {MODELS[r['model']][0]} | {r['threads']} | {r['batch']} | {r['mode']} | {r['reps']} "
        f"| {r['samples_per_s']:.0f} | {r['samples_per_s_min']:.0f}–{r['samples_per_s_max']:.0f} "
        f"| {r['ms_per_step']:.1f} "
    )
    peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "–"
    if "ratio" not in r:  # plain, or plain not measured
        return head + f"| – | – | – | {r['setup_ms']:.1f} | {peak} |"
    ok = "yes" if r["ratio"] <= TARGET else "no"
    return head + (
        f"| {r['ratio']:.2f}x | {r['paired_min']:.2f}–{r['paired_max']:.2f}x | {ok} "
        f"| {r['setup_ms']:.1f} | {peak} |"
    )


COLD_HEADER = (
    "| mode | Opacus import s | first call: setup ms | second call: setup ms |\n|---|---|---|---|"
)


def _cold_row(r: dict[str, Any]) -> str:
    imp = "–" if r["mode"] == "plain" else f"{r['import_s']:.2f}"
    return (
        f"| {r['mode']} | {imp} | {1000 * r['first_setup_s']:.0f} "
        f"| {1000 * r['second_setup_s']:.1f} |"
    )


def cold(mode: str, examples: int, batch: int) -> dict[str, Any]:
    """In this fresh process: Opacus import, then the setup of a first and a second call."""
    import importlib

    import torch

    torch.set_num_threads(1)
    data = local_data(examples)
    base = build("mnist")
    t0 = time.perf_counter()
    if mode != "plain":
        for name in OPACUS_MODULES:
            importlib.import_module(name)
    import_s = time.perf_counter() - t0
    first = one_call(mode, copy.deepcopy(base), data, batch, 1, seed=1)
    second = one_call(mode, copy.deepcopy(base), data, batch, 1, seed=2)
    return {
        "mode": mode,
        "import_s": import_s,
        "first_setup_s": first["setup_s"],
        "second_setup_s": second["setup_s"],
    }


def _status_kb(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory(mode: str, model: str, examples: int, batch: int, steps: int) -> dict[str, Any]:
    """In this fresh process: the peak resident memory a call adds over what the
    process held before it (after a warm-up call of the same mode, with the
    kernel's peak counter reset: ``/proc/self/clear_refs`` = 5)."""
    import gc

    import torch

    torch.set_num_threads(1)
    data = local_data(examples, model=model)
    base = build(model)
    for name in OPACUS_MODULES:
        __import__(name)
    one_call(mode, copy.deepcopy(base), data, batch, 2, seed=999)
    fresh = copy.deepcopy(base)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    one_call(mode, fresh, data, batch, steps, seed=1)
    return {
        "mode": mode,
        "model": model,
        "batch": batch,
        "peak_mb": (_status_kb("VmHWM") - before) / 1024,
    }


def run_memory(
    modes: list[str], models: list[str], examples: int, batches: list[int], steps: int
) -> list[dict[str, Any]]:
    """:func:`memory` in one fresh subprocess per (model, batch, mode)."""
    out = []
    for model in models:
        for batch in batches:
            for mode in modes:
                cmd = [
                    sys.executable,
                    __file__,
                    "--memory",
                    mode,
                    "--models",
                    model,
                    "--examples",
                    str(examples),
                ]
                cmd += ["--batches", str(batch), "--steps", str(steps)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    print(
                        f"memory {model} {batch} {mode} failed: {proc.stderr[-500:]}",
                        file=sys.stderr,
                    )
                    continue
                out.append(json.loads(lines[-1]))
                print(
                    f"  memory {model} batch={batch} {mode}: +{out[-1]['peak_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    return out


def run_cold(modes: list[str], examples: int, batch: int) -> list[dict[str, Any]]:
    out = []
    for mode in modes:
        cmd = [sys.executable, __file__, "--cold", mode, "--examples", str(examples)]
        cmd += ["--batches", str(batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"cold {mode} failed: {proc.stderr[-500:]}", file=sys.stderr)
            continue
        out.append(json.loads(lines[-1]))
    return out


def profile(
    mode: str, model: str, threads: int, batch: int, steps: int, examples: int, top: int
) -> None:
    """torch.profiler over one call (after a warm-up call): the most expensive ops."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(threads)
    data = local_data(examples, model=model)
    base = build(model)
    one_call(mode, copy.deepcopy(base), data, batch, 2, seed=999)
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        r = one_call(mode, copy.deepcopy(base), data, batch, steps, seed=1)
    print(
        f"{MODELS[model][0]}, {mode}, batch {batch}, {threads} thread(s), {r['steps']} steps, "
        f"{r['ms_per_step']:.1f} ms/step under the profiler"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=8, help="training steps per call")
    p.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
    p.add_argument(
        "--max-group-s",
        type=float,
        default=50.0,
        help=f"per (threads, batch): start no repetition after this many seconds, once "
        f"{MIN_REPS} are done (0: always --reps)",
    )
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--models", nargs="+", default=["mnist"], choices=list(MODELS))
    p.add_argument(
        "--memory-steps",
        type=int,
        default=4,
        help="steps of the peak-memory call (one fresh process per model, batch and mode; 0: skip)",
    )
    p.add_argument("--examples", type=int, default=6000, help="size of the local training set")
    p.add_argument(
        "--cold-modes",
        nargs="*",
        default=list(MODES),
        choices=MODES,
        help="modes whose first-call setup is timed in a fresh process (none: skip)",
    )
    p.add_argument("--quick", action="store_true", help="1 thread, batch 64, few steps (< 1 min)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--profile", choices=MODES, help="torch.profiler over one call, then exit")
    p.add_argument("--top", type=int, default=25, help="rows of the --profile table")
    p.add_argument("--cold", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--memory", choices=MODES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.cold:
        print(json.dumps(cold(a.cold, a.examples, a.batches[0])))
        return 0
    if a.memory:
        print(json.dumps(memory(a.memory, a.models[0], a.examples, a.batches[0], a.steps)))
        return 0
    if a.profile:
        profile(a.profile, a.models[0], a.threads[0], a.batches[0], a.steps, a.examples, a.top)
        return 0
    if a.quick:
        a.threads, a.batches, a.steps, a.reps, a.memory_steps = [1], [64], 4, 2, 0
        a.cold_modes = [m for m in ("plain", "ghost") if m in a.cold_modes]

    load, start = os.getloadavg()[0], time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start))
    t0 = time.perf_counter()
    for name in OPACUS_MODULES:  # imported once here, so no timed call pays for it
        __import__(name)
    import_s = time.perf_counter() - t0
    modes = [m for m in MODES if m in a.modes]
    calls = []
    for model in a.models:
        data, base = local_data(a.examples, model=model), build(model)
        for threads in a.threads:
            for batch in a.batches:
                calls += run_group(
                    threads, batch, a.steps, a.reps, modes, data, base, a.max_group_s, model
                )
    rows = summarise(calls)
    mem = (
        run_memory(modes, a.models, a.examples, a.batches, a.memory_steps) if a.memory_steps else []
    )
    for r in rows:  # peak memory is measured on 1 thread; it is listed on every row
        match = [
            m
            for m in mem
            if (m["model"], m["batch"], m["mode"]) == (r["model"], r["batch"], r["mode"])
        ]
        r["peak_mb"] = match[0]["peak_mb"] if match else None
    cold_rows = run_cold(a.cold_modes, a.examples, a.batches[0]) if a.cold_modes else []

    print(HEADER)
    for r in rows:
        print(_row(r))
    print()
    print(
        f"{stamp}; "
        + ", ".join(f"{MODELS[m][0]} on {a.examples} {MODELS[m][2]} examples" for m in a.models)
        + f"; {a.steps} steps per call, "
        f"medians of up to {a.reps} interleaved repetitions"
        + (f" (at most {a.max_group_s:g} s per group, >= {MIN_REPS})" if a.max_group_s else "")
        + f"; DP batch = expected Poisson batch "
        f"(noise {DP['noise_multiplier']}, clip {DP['max_grad_norm']}); Opacus import "
        f"{import_s:.2f} s (not timed in any call); total {time.time() - start:.0f} s; "
        f"1-min load at start: {load:.2f}; {os.cpu_count()} CPUs"
    )
    if mem:
        print(
            f"peak MB: resident memory a call of {a.memory_steps} steps adds at its peak, "
            "1 thread, in a fresh process per model, batch and mode"
        )
    if cold_rows:
        print()
        print(f"Per-round fixed cost in a fresh process (1 thread, batch {a.batches[0]}):")
        print(COLD_HEADER)
        for r in cold_rows:
            print(_cold_row(r))
    print()
    print(f"Target (DP-SGD samples/s >= plain / {TARGET:g}):")
    for r in rows:
        if "ratio" in r:
            verdict = "met" if r["ratio"] <= TARGET else "missed"
            print(
                f"- {MODELS[r['model']][0]}, {r['mode']}, batch {r['batch']}, "
                f"{r['threads']} thread(s): {verdict} ({r['ratio']:.2f}x)"
            )
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "date": stamp,
                    "load_1min": load,
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                    "opacus_import_s": import_s,
                    "summary": rows,
                    "cold": cold_rows,
                    "memory": mem,
                    "calls": calls,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
