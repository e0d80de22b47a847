"""``splitglm bench structured`` on the real demo model, on the CPU: the command's quick run, and its driver."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quick_run_reports_every_mode_at_each_batch_size(demo_checkpoint, tmp_path, capsys):
    from splitglm.cli import main

    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--quick", "--model", demo_checkpoint, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["device"], r["batch"]) for r in result["rows"]] == [("cpu", 1), ("cpu", 4)]
    for row in result["rows"]:
        assert all(row[f"{mode}_tok_s"] > 0 for mode in ("plain", "schema", "penalties"))
        assert row["mask_ms_per_token"] > 0
        assert row["schema_overhead_pct"] == pytest.approx(100 * (row["plain_tok_s"] / row["schema_tok_s"] - 1),
                                                           abs=0.15)
        assert row["schema_ratio"] == pytest.approx(row["schema_tok_s"] / row["plain_tok_s"], abs=1e-3)
    assert result["schema_compile_ms"] > 0
    table = capsys.readouterr().out
    assert "overhead %" in table and table.count("\n   cpu") == 2


@pytest.mark.slow
def test_schema_episodes_are_valid_json_and_the_runs_restart_alike(demo_checkpoint):
    """Greedy decoding under the schema ends in JSON that validates; a plain run replaying its restarts decodes
    the same positions."""
    import jsonschema

    from runtime.checkpoint import load_spec, load_tokenizer
    from runtime.grammar import Grammars, Vocabulary
    from splitglm.bench.structured import SCHEMA, Lockstep, build_tiers, decode

    tokenizer = load_tokenizer(demo_checkpoint)
    grammars = Grammars(Vocabulary.load(demo_checkpoint, load_spec(demo_checkpoint).vocab_size))
    tiers = build_tiers(demo_checkpoint, "cpu")
    run = Lockstep(tiers, tokenizer, grammars, "schema", 1, 96, "t")
    run.start([0])
    texts = []
    while not texts:
        if run.step():
            texts.append(tokenizer.decode(run.states[0].tokens, skip_special_tokens=True))
    assert run.states[0].matcher.stopped and run.states[0].tokens[-1] in load_spec(demo_checkpoint).eos_token_ids
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    steps = run.tokens + 2  # past the episode's end: one restart
    schema, restarts = decode(tiers, tokenizer, grammars, "schema", 1, steps, 96, "s")
    plain, replayed = decode(tiers, tokenizer, grammars, "plain", 1, steps, 96, "p", schedule=restarts)
    assert restarts == replayed and sum(map(len, restarts)) == 1
    assert schema["episodes_ended"] == schema["episodes_valid_json"] == 1 and schema["episodes_cut"] == 0
    assert schema["mask_ms_per_token"] > plain["mask_ms_per_token"] >= 0
