"""bastion.signal_ratio on hand-computed diagnostics rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bastion.signal_ratio import main, signal_ratio_ipm, signal_ratio_mean


def _row(
    rnd: int,
    norm: float,
    cos: float | None = None,
    weight: float | None = 0.25,
    malicious: bool = False,
    status: str = "accepted",
) -> dict:
    return {
        "round": rnd,
        "update_norm": norm,
        "cosine_to_aggregate": cos,
        "weight": weight,
        "malicious": malicious,
        "status": status,
    }


def test_mean_run_ratio_is_the_mean_norm_over_the_median_norm() -> None:
    # updates (3, 0), (0, 1), (1, 0): mean (4/3, 1/3), |mean| = sqrt(17)/3, median norm 1
    vecs = [(3.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
    mean = (4 / 3, 1 / 3)
    mnorm = (mean[0] ** 2 + mean[1] ** 2) ** 0.5
    rows = []
    for x, y in vecs:
        norm = (x * x + y * y) ** 0.5
        rows.append(_row(1, norm, (x * mean[0] + y * mean[1]) / norm / mnorm, 1 / 3))
    rows.append(_row(1, 99.0, 1.0, 1 / 3, status="rejected"))  # not aggregated: ignored
    assert signal_ratio_mean(rows) == {1: pytest.approx(17**0.5 / 3)}


def test_mean_run_refuses_attacked_rounds_and_skips_rows_without_cosine() -> None:
    with pytest.raises(ValueError, match="malicious"):
        signal_ratio_mean([_row(1, 1.0, 1.0), _row(1, 1.0, 1.0, malicious=True)])
    assert signal_ratio_mean([_row(1, 1.0, None), _row(2, 2.0, 0.5, 1.0)]) == {2: 0.5}


def test_ipm_ratio_divides_the_attack_norm_by_epsilon() -> None:
    rows = [_row(3, n) for n in (1.0, 2.0, 4.0)] + [_row(3, 5.0, malicious=True)] * 2
    # |mean(honest)| = 5 / 10; median honest norm 2
    assert signal_ratio_ipm(rows, 10.0) == {3: pytest.approx(0.25)}
    with pytest.raises(ValueError, match="epsilon"):
        signal_ratio_ipm(rows, 0.0)


def test_cli_prints_a_table_and_names_a_missing_file(tmp_path: Path, capsys) -> None:
    rows = [_row(1, 2.0, 0.5, 0.5), _row(1, 2.0, 0.5, 0.5)]
    (tmp_path / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(tmp_path)]) == 0
    assert "| 1 | 0.500 |" in capsys.readouterr().out
    assert main([str(tmp_path / "nope")]) == 2
    assert "diagnostics.jsonl" in capsys.readouterr().err
