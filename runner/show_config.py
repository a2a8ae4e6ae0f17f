"""`python -m runner.show_config [--config-dir DIR] [overrides]`: the whole config a run with
these overrides would use, every key of the schema with its value, validated.

Hydra's `python -m runner --cfg job` prints only what the YAML files compose to: keys left to
the schema's defaults (runner/config.py), such as vLLM's keys under rollout=hf, are not in it.
This prints what the run itself writes to <output_dir>/config.yaml and logs to MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parent.parent / "conf"


def show(overrides: list[str], config_dir: str | None = None) -> str:
    from hydra import compose, initialize_config_dir

    from runner.config import to_dict, validate
    from runner.plugins import register_entry_points

    register_entry_points()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, *extra])
    return yaml.safe_dump(to_dict(validate(cfg)), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    from runner.config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config_dir = None
    if "--config-dir" in args:
        i = args.index("--config-dir")
        config_dir = args[i + 1]
        del args[i:i + 2]
    try:
        print(show(args, config_dir), end="")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
