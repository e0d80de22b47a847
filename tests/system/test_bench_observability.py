"""``splitglm bench observability --quick`` on the tiny talking plan: it runs its three stacks and reports every
field, with spans received from the tracing stack and scrapes of the metrics stack."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_reports_each_mode_against_off(talking_plan, tmp_path, capsys):
    from splitglm.cli import main

    out = tmp_path / "observability.json"
    assert main(["bench", "observability", "--quick", "--plan", talking_plan, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"off", "metrics", "tracing"} and result["aim_cost_pct"] == 2.0
    for row in result["modes"].values():
        assert row["tok_s"] > 0 and len(row["runs_tok_s"]) == 1
        assert row["ratio"] == pytest.approx(row["tok_s"] / result["modes"]["off"]["tok_s"], abs=2e-3)
    assert result["modes"]["off"]["cost_pct"] == 0.0
    assert result["spans_received"] > 0  # the tracing stack exported; the others did not
    assert isinstance(result["cloud_metrics"], bool) and result["scrapes"] >= 0
    assert "aim: cost <= 2%" in capsys.readouterr().out
