"""Client momentum: with or without Adam's bias correction (docs/AGGREGATION.md).

An in-process federated run through the functions the ClientApp and ServerApp use:
each round, every client trains the global model with ``task.training.train_local``
(the run-config defaults: lr 0.1, local momentum 0.9, 5 local epochs, batch 32, the
round's seed plus its partition id), turns it into its reply with
``task.momentum.momentum_reply``, and the server moves the global model by the mean
of the replies' deltas (``mean``, server-lr 1: FedAvg with uniform weights), then
evaluates on the test split. Three variants per partitioner and seed:

- **off**: beta = 0, the raw update (today's default);
- **m0**: beta, ``m_0 = 0`` as in the papers (no correction);
- **adam**: beta, ``m_t / (1 - beta^t)`` (what Bastion does).

Printed: the test accuracy after rounds 1, 3, 5 and the last, averaged over the
seeds, and the mean over all rounds (area under the accuracy curve).

    python benchmarks/client_momentum.py                  # 10 clients, 10 rounds, beta 0.9
    python benchmarks/client_momentum.py --seeds 0 1 2 --partitioners iid dirichlet

Never run by the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common.config import RunConfig
from task.datasets import load_dataset
from task.federated import PartitionSpec, load_client_data
from task.models import build_model
from task.momentum import momentum_reply
from task.training import evaluate, train_local

VARIANTS = ("off", "m0", "adam")


def run(variant: str, partitioner: str, seed: int, args: argparse.Namespace) -> list[float]:
    cfg = RunConfig.from_flat({"seed": seed, "partitioner": partitioner})
    spec = PartitionSpec("digits", args.clients, partitioner, seed, alpha=cfg.alpha)
    clients = [load_client_data(spec, pid) for pid in range(args.clients)]
    _, test = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model("digits")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    memory: list = [None] * args.clients
    accuracy = []
    for rnd in range(1, args.rounds + 1):
        instr = cfg.train_instructions(rnd)
        deltas = []
        for pid, data in enumerate(clients):
            local = build_model("digits")
            local.load_state_dict(state)
            train_local(
                local,
                data.train,
                lr=cfg.lr,
                momentum=cfg.momentum,
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                seed=int(instr["round-seed"]) + pid,
            )
            sent = local.state_dict()
            if variant != "off":
                sent, memory[pid] = momentum_reply(
                    state,
                    sent,
                    beta=args.beta,
                    previous=memory[pid],
                    server_round=rnd,
                    bias_correction=variant == "adam",
                )
            deltas.append({k: sent[k] - state[k] for k in state})
        state = {k: state[k] + torch.stack([d[k] for d in deltas]).mean(0) for k in state}
        model.load_state_dict(state)
        accuracy.append(evaluate(model, test).accuracy)
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitioners", nargs="+", default=["iid", "dirichlet"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    shown = sorted({1, 3, 5, args.rounds})
    print(
        f"digits, {args.clients} clients, {args.rounds} rounds, beta {args.beta}, "
        f"seeds {args.seeds}; test accuracy (mean over seeds)"
    )
    head = " ".join(f"{f'r{r}':>6}" for r in shown)
    print(f"{'partitioner':<11} {'variant':<5} {head}   mean")
    start = time.monotonic()
    for partitioner in args.partitioners:
        for variant in VARIANTS:
            curves = [run(variant, partitioner, s, args) for s in args.seeds]
            mean = [statistics.fmean(c[r - 1] for c in curves) for r in range(1, args.rounds + 1)]
            cells = " ".join(f"{mean[r - 1]:6.3f}" for r in shown)
            print(f"{partitioner:<11} {variant:<5} {cells}  {statistics.fmean(mean):.3f}")
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
