"""Issue 33, case 6: bad data files in env=dataset are refused before any model loads, with
exit code 2 and one line naming the key (env.path, env.eval_path, env.prompt_column,
env.eval_size), the file and, where there is one, the line (JSON Lines) or row at fault;
the file is read once, by the loader the run uses (envs/data_files.py load_rows), which the
preflight (runner/preflight/fits.py env_prompts) calls without swallowing its error.

Most cases call that preflight function on a validated config: the same route as the CLI
(validate, Hydra's instantiate of the env, the preflight), without a process per case. A few
run the real CLI for the end-to-end contract: exit 2, the first stderr line, no traceback,
and nothing loaded (fast, no MLflow store, no checkpoint).
"""

import json
import time
from pathlib import Path

import pytest

from conftest import run_cli
from runner.config import ConfigError, validate

REPO = Path(__file__).resolve().parent.parent
REWARD = "examples.arithmetic.rewards.correct"
LIMIT_S = 15  # as tests/test_bad_input.py: refusals take ~2 s, loading the tiny model and MLflow >= 17 s


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch):
    """The reward function's import path resolves from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(start, start + n)]


def jsonl(items: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in items)


def write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def late_bad_byte(tmp_path: Path) -> tuple[Path, str]:
    """200 good rows, then line 150 with a 0xff byte: read lazily, the run failed at the step
    that reached it."""
    lines = jsonl(rows(200)).encode().split(b"\n")
    lines[149] = b'{"prompt": "caf\xff?", "answer": "x"}'
    return write(tmp_path / "late.jsonl", b"\n".join(lines)), "line 150: not UTF-8 (byte 0xff at column 16)"


def save_to_disk(path: Path, n: int = 5) -> Path:
    import datasets

    datasets.Dataset.from_list(rows(n)).save_to_disk(str(path))
    return path


def damaged(path: Path, how: str) -> Path:
    """A save_to_disk directory with one file missing or overwritten with garbage."""
    save_to_disk(path)
    arrow = next(path.glob("*.arrow"))
    if how == "no arrow":
        arrow.unlink()
    elif how == "garbage arrow":
        arrow.write_bytes(b"garbage" * 10)
    elif how == "no info":
        (path / "dataset_info.json").unlink()
    else:
        (path / "dataset_info.json").write_text("{not json")
    return path


def parquet(path: Path, truncate: bool = False) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows(20)), path)
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


def config(**env):
    node = {"_target_": "envs.dataset.DatasetEnv", "name": "dataset", "reward_funcs": [REWARD], **env}
    return validate({"env": node})


def refusal(**env) -> str:
    """The preflight's one-line refusal of this env (runner/preflight/fits.py env_prompts)."""
    from runner.preflight.fits import env_prompts

    with pytest.raises(ConfigError) as e:
        env_prompts(config(**env))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -- every bad file, through the preflight ---------------------------------------------------

def bad_files(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    """case -> (env keys, the refusal's text after `KEY: /abs/file`)."""
    t = tmp_path
    good = write(t / "good.jsonl", jsonl(rows(30)))
    malformed = jsonl(rows(6)) + '{"prompt": "x" "answer": 1}\n' + jsonl(rows(3))
    late, late_msg = late_bad_byte(t)
    chat = [{"role": "user", "content": "hi"}]
    return {
        "malformed JSONL line": ({"path": write(t / "m.jsonl", malformed)},
                                 " line 7: not valid JSON (Expecting ',' delimiter)"),
        "non-UTF-8 byte in a late row": ({"path": late}, " " + late_msg),
        "empty file": ({"path": write(t / "e.jsonl", "")}, ": no rows"),
        "blank lines only": ({"path": write(t / "b.jsonl", "\n \n")}, ": no rows"),
        "empty JSON": ({"path": write(t / "e.json", "[]")}, ": no rows"),
        "header-only CSV": ({"path": write(t / "h.csv", "prompt,answer\n")}, ": no rows"),
        "a line that is not an object": ({"path": write(t / "l.jsonl", jsonl(rows(2)) + "[1, 2]\n")},
                                         " line 3: not a JSON object (a list)"),
        "JSON not a list": ({"path": write(t / "o.json", json.dumps({"data": rows(3)}))},
                            ": not a list of objects (one JSON object with keys data); "
                            "give [{...}, {...}] or one object per line"),
        "JSON list of strings": ({"path": write(t / "s.json", json.dumps(["a", "b"]))},
                                 " row 1: not a JSON object (a string)"),
        "JSON syntax": ({"path": write(t / "x.json", '[\n{"prompt": "a"},\n{"prompt": }\n]')},
                        " line 3: not valid JSON (Expecting value)"),
        "CSV bad line": ({"path": write(t / "c.csv", "prompt,answer\na,1\nb,2,3\n")},
                         " line 3: not valid CSV (Expected 2 fields in line 3, saw 3)"),
        "empty prompt": ({"path": write(t / "p1.jsonl", jsonl(rows(4) + [{"prompt": "  ", "answer": "1"}]))},
                         " line 5: 'prompt' is empty"),
        "null prompt": ({"path": write(t / "p2.jsonl", jsonl(rows(4) + [{"answer": "1"}]))},
                        " line 5: 'prompt' is missing or null"),
        "number prompt": ({"path": write(t / "p3.jsonl", jsonl(rows(1) + [{"prompt": 7}]))},
                          " line 2: 'prompt' is not a string or a chat [{role, content}, ...] (a number)"),
        "chat without content": ({"path": write(t / "p4.jsonl", jsonl([{"prompt": chat},
                                                                       {"prompt": [{"role": "user"}]}]))},
                                 " line 2: 'prompt' is not a chat: message 1 is not {role, content} strings "
                                 "({'role': 'user'})"),
        "empty CSV cell": ({"path": write(t / "p5.csv", "prompt,answer\na,1\n,2\n")},
                           " row 2: 'prompt' is missing or null"),
        "truncated parquet": ({"path": parquet(t / "t.parquet", truncate=True)},
                              ": not a readable Parquet file (Parquet magic bytes not found in footer. "
                              "Either the file is corrupted or this is not a parquet file.)"),
        "garbage parquet": ({"path": write(t / "g.parquet", b"PAR1 not really")}, ": not a readable Parquet file ("),
        "save_to_disk without its arrow file": ({"path": damaged(t / "d1", "no arrow")},
                                                ": not a readable datasets.save_to_disk directory "
                                                "(data-00000-of-00001.arrow is missing)"),
        "save_to_disk garbage arrow file": ({"path": damaged(t / "d2", "garbage arrow")},
                                            ": not a readable datasets.save_to_disk directory "
                                            "(data-00000-of-00001.arrow: "),
        "save_to_disk without dataset_info.json": ({"path": damaged(t / "d3", "no info")},
                                                   ": not a readable datasets.save_to_disk directory "
                                                   "(dataset_info.json missing)"),
        "save_to_disk garbage dataset_info.json": ({"path": damaged(t / "d4", "garbage info")},
                                                   ": not a readable datasets.save_to_disk directory "
                                                   "(dataset_info.json: not valid JSON "
                                                   "(Expecting property name enclosed in double quotes))"),
        "eval_path malformed": ({"path": good, "eval_path": write(t / "em.jsonl", malformed)},
                                " line 7: not valid JSON (Expecting ',' delimiter)"),
        "eval_path empty": ({"path": good, "eval_path": write(t / "ee.jsonl", "")}, ": no rows"),
        "eval_path late non-UTF-8": ({"path": good, "eval_path": late}, " " + late_msg),
        "eval_path damaged save_to_disk": ({"path": good, "eval_path": damaged(t / "d5", "no arrow")},
                                           ": not a readable datasets.save_to_disk directory "
                                           "(data-00000-of-00001.arrow is missing)"),
    }


def test_each_bad_file_is_one_line_naming_key_file_and_line(tmp_path):
    for case, (env, rest) in bad_files(tmp_path).items():
        key = "eval_path" if "eval_path" in env else "path"
        env = {k: str(v) for k, v in env.items()}
        msg = refusal(**env)
        assert msg.startswith(f"env.{key}: {env[key]}{rest}"), (case, msg)


def test_prompt_column_missing_lists_the_files_columns(tmp_path):
    f = str(write(tmp_path / "q.jsonl", jsonl(rows(30))))
    assert refusal(path=f, prompt_column="question") == \
        f"env.prompt_column: 'question' is not a column of {f} (columns: prompt, answer)"
    no_prompt = str(write(tmp_path / "n.jsonl", jsonl([{"question": "a", "answer": "1"}] * 30)))
    assert refusal(path=no_prompt) == \
        f"env.prompt_column: 'prompt' is not a column of {no_prompt} (columns: question, answer)"
    csv = str(write(tmp_path / "n.csv", "question,answer\na,1\nb,2\n"))
    assert refusal(path=csv, eval_path=csv, eval_size=1).startswith(
        f"env.prompt_column: 'prompt' is not a column of {csv} (columns: question, answer)")
    held = str(write(tmp_path / "h.jsonl", jsonl([{"question": "a"}])))
    assert refusal(path=f, eval_path=held) == \
        f"env.prompt_column: 'prompt' is not a column of {held} (columns: question)"


@pytest.mark.parametrize("n", [16, 10])
def test_eval_size_as_large_as_the_file_is_refused(tmp_path, n):
    f = str(write(tmp_path / "small.jsonl", jsonl(rows(n))))
    assert refusal(path=f, eval_size=16).startswith(f"env.eval_size=16: {f} has only {n} rows")


def test_good_files_of_every_kind_still_load(tmp_path):
    """The checks refuse only what cannot train: JSON Lines in a .json file, CSV numbers,
    a column of mixed types (kept as JSON values, as datasets' own loader keeps it), chats."""
    from envs.dataset import load_rows

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    mixed = rows(3) + [{"prompt": "p", "answer": 4}]
    files = {write(tmp_path / "a.jsonl", jsonl(rows(5))): 5, write(tmp_path / "b.json", json.dumps(rows(4))): 4,
             write(tmp_path / "c.json", jsonl(rows(3))): 3, write(tmp_path / "d.csv", "prompt,answer\na,1\nb,2\n"): 2,
             write(tmp_path / "e.jsonl", "\ufeff" + jsonl(mixed)): 4,
             write(tmp_path / "f.jsonl", jsonl([{"prompt": chat}] * 2)): 2,
             parquet(tmp_path / "g.parquet"): 20, save_to_disk(tmp_path / "h"): 5}
    for f, n in files.items():
        ds = load_rows(str(f), "env.path", "prompt")
        assert len(ds) == n, f
    assert load_rows(str(tmp_path / "d.csv"), "env.path", "prompt")[1]["answer"] == 2
    assert load_rows(str(tmp_path / "e.jsonl"), "env.path", "prompt")[3]["answer"] == 4
    assert load_rows(str(tmp_path / "f.jsonl"), "env.path", "prompt")[0]["prompt"] == chat


def test_the_file_is_read_once_for_the_preflight_and_the_run(tmp_path, monkeypatch):
    """The preflight builds the env to check its file; the run's build finds it cached,
    until the file changes."""
    import envs.data_files as dataset
    from runner.plugins import build_env
    from runner.preflight.fits import env_prompts

    reads = []
    read = dataset._read
    monkeypatch.setattr(dataset, "_read", lambda p, *a: (reads.append(p), read(p, *a))[1])
    f = write(tmp_path / "once.jsonl", jsonl(rows(30)))
    cfg = config(path=str(f))
    env_prompts(cfg)
    env = build_env(cfg.env, cfg.seed)
    assert reads == [f] and len(env.eval_prompts()) == 16
    write(f, jsonl(rows(31)))
    build_env(cfg.env, cfg.seed)
    assert reads == [f, f]


# -- end to end: the real CLI ----------------------------------------------------------------

def cli_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (overrides, the first stderr line)."""
    late, late_msg = late_bad_byte(tmp_path)
    malformed = write(tmp_path / "bad.jsonl", jsonl(rows(6)) + '{"prompt": "x" "answer": 1}\n' + jsonl(rows(30)))
    good = write(tmp_path / "good.jsonl", jsonl(rows(30)))
    small = write(tmp_path / "small.jsonl", jsonl(rows(8)))
    broken = damaged(tmp_path / "held", "garbage arrow")
    return {
        "malformed": ([f"env.path={malformed}"],
                      f"error: env.path: {malformed} line 7: not valid JSON (Expecting ',' delimiter)"),
        "late non-UTF-8": ([f"env.path={late}"], f"error: env.path: {late} {late_msg}"),
        "eval_path damaged": ([f"env.path={good}", f"env.eval_path={broken}"],
                              f"error: env.eval_path: {broken}: not a readable datasets.save_to_disk directory"),
        "eval_size": ([f"env.path={small}", "env.eval_size=8"], f"error: env.eval_size=8: {small} has only 8 rows"),
    }


@pytest.mark.parametrize("case", ["malformed", "late non-UTF-8", "eval_path damaged", "eval_size"])
def test_the_cli_refuses_bad_data_with_exit_2_before_loading(tmp_path, case):
    overrides, first = cli_cases(tmp_path)[case]
    store, out = tmp_path / "mlruns.db", tmp_path / "out"
    t = time.monotonic()
    r = run_cli(["model=tiny", "env=dataset", f"env.reward_funcs=[{REWARD}]", *overrides,
                 f"tracking.uri=sqlite:///{store}", f"output_dir={out}"], cwd=REPO, timeout=120)
    took = time.monotonic() - t
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.splitlines()[0].startswith(first), r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr and "HYDRA_FULL_ERROR" not in r.stdout + r.stderr
    assert took < LIMIT_S, f"{took:.1f} s"
    assert not store.exists() and not (out / "checkpoints").exists()
