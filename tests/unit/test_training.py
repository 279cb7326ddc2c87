"""Local SGD: learns, honours epochs/steps, is deterministic for a seed."""

from __future__ import annotations

import numpy as np
import torch

from task.datasets import ArrayDataset
from task.models import DigitsMLP
from task.training import evaluate, train_local


def toy_data(n: int = 256, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n)
    centers = rng.normal(size=(10, 64)).astype(np.float32) * 3
    x = centers[y] + rng.normal(size=(n, 64)).astype(np.float32) * 0.5
    return ArrayDataset(x.astype(np.float32), y.astype(np.int64))


def fresh_model() -> DigitsMLP:
    torch.manual_seed(0)
    return DigitsMLP()


def test_training_reduces_loss_and_raises_accuracy() -> None:
    data = toy_data()
    model = fresh_model()
    before = evaluate(model, data)
    train_local(model, data, lr=0.1, momentum=0.9, epochs=5, batch_size=32)
    after = evaluate(model, data)
    assert after.loss < before.loss / 2
    assert after.accuracy > 0.9 > before.accuracy


def test_steps_take_precedence_over_epochs() -> None:
    data = toy_data(100)
    result = train_local(fresh_model(), data, lr=0.01, epochs=3, steps=11, batch_size=32)
    assert result.steps == 11  # 11 steps, crossing an epoch boundary (4 batches per epoch)
    result = train_local(fresh_model(), data, lr=0.01, epochs=3, steps=0, batch_size=32)
    assert result.steps == 3 * 4
    assert result.num_examples == 100


def test_same_seed_same_weights_different_seed_different_weights() -> None:
    data = toy_data(128)

    def run(seed: int) -> list[torch.Tensor]:
        model = fresh_model()
        train_local(model, data, lr=0.1, epochs=1, batch_size=16, seed=seed)
        return [p.detach().clone() for p in model.parameters()]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_evaluate_counts_correct_predictions() -> None:
    data = toy_data(50)
    model = fresh_model()
    with torch.no_grad():
        expected = (model(torch.from_numpy(data.x)).argmax(1).numpy() == data.y).mean()
    assert evaluate(model, data, batch_size=7).accuracy == expected
