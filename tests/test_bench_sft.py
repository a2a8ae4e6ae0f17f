"""`python -m runner.bench --sft` (runner/bench_sft.py) on the tiny model, 2 steps: the printed
table has every field with positive numbers, and every side trains on the number of
completion tokens a step that the data file and the tokenizer say it should (ours by our
encoding rule, TRL by TRL's own tokenization of the same rows), with the same first loss.

The bench runs once for the module: sides ours and trl where trl is installed, ours alone
where it is not. The TRL test then reports itself skipped, never passed, and the ours test
checks the ours side either way."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

B, L, EXAMPLES = 4, 64, 16
TINY = {"model": {"name": "tiny", "source": "tiny", "tokenizer_from": "smollm2_135m"}}
HAS_TRL = importlib.util.find_spec("trl") is not None
ROWS = ["forward_s", "backward_s", "optimizer_s", "other_s", "step_s", "steps_per_s", "completion_tokens/step",
        "total_tokens/step", "completion_tokens/s", "total_tokens/s", "rss_gb", "loss_step1"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(stdout, the table {row: {side: value}}, the data file) of one bench run."""
    data_dir = tmp_path_factory.mktemp("bench_sft")
    sides = "ours,trl" if HAS_TRL else "ours"
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "runner.bench", "--sft", "--model", "tiny", "--steps", "2",
                        "--repeats", "1", "--examples", str(EXAMPLES), "--batch", str(B), "--max-length", str(L),
                        "--sides", sides, "--data-dir", str(data_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    i = next(j for j, line in enumerate(lines) if line.startswith("per step (median)"))
    names = lines[i].split()[3:]
    assert names == sides.split(","), lines[i]
    table = {}
    for line in lines[i + 1:]:
        if not line.strip():
            break
        key, *values = line.split()
        table[key] = dict(zip(names, map(float, values)))
    (data,) = data_dir.glob("*.jsonl")
    return r.stdout, table, data


@pytest.fixture(scope="module")
def tok():
    from runner.config import validate
    from runner.models import load_tokenizer

    return load_tokenizer(validate(TINY).model)


def rows_of(data: Path) -> list[dict]:
    return [json.loads(line) for line in data.read_text().splitlines()]


def ours_completion_tokens(tok, data: Path) -> list[int]:
    """Trained-on tokens of each example as our SFT step encodes it (runner/loop/sft_step.py)."""
    from runner.loop import sft_step

    class Rows(list):
        column_names = ["prompt", "completion"]

    exs = sft_step.from_rows(Rows(rows_of(data)), "", None, str(data))
    return [sum(sft_step.encode(tok, e, 10_000, False, "test")[0].train) for e in exs]


def check_side(table: dict, side: str, per_example: list[int]) -> None:
    for key in ROWS:
        assert key in table, f"{key} missing from the table"
        value = table[key][side]
        assert value >= 0 if key == "other_s" else value > 0, (key, side, value)
    assert len(set(per_example)) == 1, per_example  # every example the same shape: any batch of B is B x that
    assert table["completion_tokens/step"][side] == B * per_example[0]
    assert table["total_tokens/step"][side] == B * L
    assert table["step_s"][side] >= table["forward_s"][side] + table["backward_s"][side]


def test_the_ours_side_prints_every_field_and_trains_the_datas_completion_tokens(bench, tok):
    out, table, data = bench
    per_example = ours_completion_tokens(tok, data)
    # independently of our encoder: the completion's own tokens and its EOS, the rest of L the prompt's
    assert per_example == [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows_of(data)]
    assert 0 < per_example[0] < L
    check_side(table, "ours", per_example)
    assert out.startswith("cpu: ") and "ours: runner Trainer in-process: python -m runner model=tiny algo=sft" in out
    assert "time split ours: forward" in out
    floors = out.split("\nfloor (")[1]  # how far from the machine's floor: forward, backward, optimizer, step
    assert "  ours " in floors and "step: floor" in floors and "6 x params x tokens" in floors


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install '.[bench]'): no TRL claim is tested")
def test_trl_sees_the_same_completion_tokens_and_loss_as_ours(bench, tok, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from envs.base import Prompt
    from runner.config import validate
    from runner.models import load_policy
    from runner.rollout.hf import render

    out, table, data = bench
    rows = rows_of(data)
    # TRL's own tokenization of the rows (prompt rendered by the chat template, as the bench gives them)
    model, _ = load_policy(validate(TINY).model)  # a fresh one: SFTTrainer patches its forward
    ds = Dataset.from_dict({"prompt": [render(tok, Prompt((("user", r["prompt"]),), "")) for r in rows],
                            "completion": [r["completion"] for r in rows]})
    trainer = SFTTrainer(model=model, train_dataset=ds, processing_class=tok,
                         args=SFTConfig(output_dir=str(tmp_path), max_length=L, completion_only_loss=True,
                                        bf16=False, use_cpu=True, report_to="none"))
    trl_per_example = [sum(x != -100 for x in row["labels"][1:]) for row in trainer.train_dataset]
    assert trl_per_example == ours_completion_tokens(tok, data)
    assert all(len(row["input_ids"]) == L for row in trainer.train_dataset)
    check_side(table, "trl", trl_per_example)
    assert table["completion_tokens/step"]["trl"] == table["completion_tokens/step"]["ours"]
    # the same weights on the same first batch: the same loss
    assert table["loss_step1"]["trl"] == pytest.approx(table["loss_step1"]["ours"], rel=1e-4)
    assert "same tokens per step on every side: yes" in out and "tokens checked identical to ours" in out
    assert "completion_only_loss=True" in out and "padding_free=False" in out and "packing=False" in out
    assert "ours vs trl" in out and "speed-up min" in out


def test_the_trl_sides_are_refused_in_one_line_without_trl(monkeypatch, capsys):
    from runner import bench_sft

    monkeypatch.setattr(bench_sft, "trl_available", lambda: False)
    assert bench_sft.main(["--model", "tiny", "--sides", "ours,trl"]) == 2
    err = capsys.readouterr().err
    assert "need trl" in err and "--sides ours" in err
