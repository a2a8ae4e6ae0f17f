"""Start a DeepSpeed job in N processes, and be one of them.

`python -m runner trainer=deepspeed trainer.num_procs=N` composes and validates the config
once (Hydra runs only there), writes everything a worker needs to
`<output_dir>/launch/job-<sha256>.json` and starts the workers with torchrun (one node) or the
deepspeed launcher (a hostfile, several nodes). Each worker (`python -m runner.launch
JOB`) rebuilds the same validated config from that file, so no rank re-enters Hydra or
makes its own output directory. Rank 0 alone talks to MLflow, writes the sweep ledger and
the result file the launcher reads back.

Signals: Ctrl-C in a terminal reaches every process of the foreground group; a SIGTERM
sent to the launcher is passed on to the workers, which stop after the current step,
checkpoint and mark the run KILLED, as a single-process run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from runner import host
from runner.config import RunConfig

RESULT_FILE = "result.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(cfg: RunConfig, job_file: Path, port: int) -> list[str]:
    """The launcher command line for this config (tested on its own for the multi-node form)."""
    t = cfg.trainer
    if t.launcher == "deepspeed":
        cmd = ["deepspeed", "--master_port", str(port)]
        if t.hostfile:
            cmd += ["--hostfile", os.path.expanduser(t.hostfile)]
        else:
            cmd += ["--num_nodes", "1"]
        if t.device != "cpu":
            cmd += ["--num_gpus", str(t.num_procs)]
        return cmd + ["--module", "runner.launch", str(job_file)]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(t.num_procs),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "runner.launch", str(job_file)]


def launch(cfg: RunConfig, output_dir: Path, config_yaml: str, *, started_at: Optional[float] = None,
           job_id: str = "0", parent_run_id: Optional[str] = None, extra_tags: Optional[dict] = None,
           ledger: Optional[dict] = None, invocation: Optional[dict] = None) -> dict[str, Any]:
    """Run the job in worker processes; returns rank 0's result (stop_reason, step, metrics)."""
    launch_dir = output_dir / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    result_path = launch_dir / RESULT_FILE
    result_path.unlink(missing_ok=True)
    job = {"config_yaml": config_yaml, "output_dir": str(output_dir), "job_id": job_id,
           "parent_run_id": parent_run_id, "extra_tags": extra_tags or {}, "ledger": ledger, "invocation": invocation,
           "started_at": started_at or time.time()}
    text = json.dumps(job, indent=2)
    # the workers check the file against the digest in its name: a job file changed or cut
    # after the launch (a shared filesystem, a second launcher) is refused, not half-read
    job_file = launch_dir / f"job-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    for old_job in launch_dir.glob("job*.json"):
        old_job.unlink(missing_ok=True)
    tmp = job_file.with_name(job_file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, job_file)
    port = cfg.trainer.master_port or free_port()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # workers import runner and envs from here
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if cfg.trainer.num_threads:
        env["OMP_NUM_THREADS"] = str(cfg.trainer.num_threads)
    if cfg.trainer.num_procs > 1 and not host.user_set():
        # workers share this node's cores: spinning threads would steal them from each other
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.Popen(command(cfg, job_file, port), env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # the workers got the same Ctrl-C; wait for their checkpoint
                continue
    finally:
        signal.signal(signal.SIGTERM, old)
    result = read_result(result_path)
    result["returncode"] = rc
    return result


def read_result(path: Path) -> dict[str, Any]:
    """Rank 0's result; {} where it wrote none (it died first: the exit code tells), and a
    damaged one said as such rather than taken as a clean stop."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as e:
        return {"stop_reason": "error", "error": f"{path} is damaged ({str(e).splitlines()[0]})"}


def read_job(job_file: Path) -> dict[str, Any]:
    """The launcher's job file, verified against the digest in its name (job-<sha256>.json)."""
    text = job_file.read_bytes()
    m = re.fullmatch(r"job-([0-9a-f]{16})\.json", job_file.name)
    if m and hashlib.sha256(text).hexdigest()[:16] != m.group(1):
        raise SystemExit(f"error: {job_file} does not match the digest in its name (changed or cut after the "
                         f"launch); start the job again with the same command")
    job = json.loads(text)
    if not isinstance(job, dict):
        raise SystemExit(f"error: {job_file} is not a job file")
    return job


def worker(job_file: Path) -> int:
    """One rank: the same `runner.train.run` as a single-process job, on a DeepSpeed backend."""
    import math

    from omegaconf import OmegaConf

    from runner.budget import CostMeter
    from runner.sweep_ledger import SweepLedger
    from runner.config import validate
    from runner.train import CLEAN_EXIT_REASONS, NonFiniteError, run

    job = read_job(Path(job_file))
    meter = CostMeter(0.0, spent_seconds=max(0.0, time.time() - job["started_at"]))  # from the launcher's start
    cfg = validate(OmegaConf.create(job["config_yaml"]))
    meter.usd_per_device_hour, meter.devices = cfg.budget.usd_per_device_hour, cfg.budget.devices
    rank = int(os.environ.get("RANK", "0"))
    output_dir = Path(job["output_dir"])
    ledger = None
    if rank == 0 and job.get("ledger"):
        ledger = SweepLedger(Path(job["ledger"]["path"]), job["ledger"]["cap_usd"])
    status: dict[str, Any] = {}
    try:
        trainer = run(cfg, output_dir, job["config_yaml"], meter, ledger, job["job_id"],
                      job.get("parent_run_id"), job.get("extra_tags"), job.get("invocation"))
        status = {"stop_reason": trainer.stop_reason, "step": trainer.step,
                  "objective": trainer.final_metrics.get(cfg.objective, math.nan),
                  "estimate": getattr(trainer, "estimate", None)}
        code = 0 if trainer.stop_reason in CLEAN_EXIT_REASONS else 130
        trainer.backend.close()
    except KeyboardInterrupt:
        status, code = {"stop_reason": "interrupted"}, 130
    except NonFiniteError as e:
        status, code = {"stop_reason": "nonfinite", "error": str(e)}, 1
    if rank == 0:
        tmp = output_dir / "launch" / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(status, default=str))
        os.replace(tmp, output_dir / "launch" / RESULT_FILE)
    return code


if __name__ == "__main__":
    host.configure()  # before torch loads

    sys.exit(worker(Path(sys.argv[1])))
