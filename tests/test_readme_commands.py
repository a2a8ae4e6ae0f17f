"""The README's `python -m runner ...` commands, as bash would pass them, compose and validate:
a command that rots (a renamed key, a value bash mangles, like an unquoted `'<answer>'`, a
setting the checks refuse) fails here. Composition and validation only: nothing is loaded or
trained (several commands are for GPUs or take minutes; their running is covered by the
tests of what they run). A multirun is checked at the first value of each swept key. Left
out: the one command that names an illustrative module of the user's (`my_pkg.dpo`)."""

import re
import shlex
from pathlib import Path

import pytest

from runner.show_config import show

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if (line.startswith("python -m runner ") or line == "python -m runner") and "my_pkg." not in line:
                out.append(line)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("command", COMMANDS)
def test_a_readme_command_composes_and_validates(command, monkeypatch, tmp_path):
    # the README's paths are from the repository root; a hostfile is the user's own
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "hosts").write_text("node1 slots=8\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    words = shlex.split(command, comments=True)[3:]  # bash's quoting and comments
    if "-m" in words:  # a sweep: each swept key at its first value
        words = [w.split("=", 1)[0] + "=" + w.split("=", 1)[1].split(",")[0] if "=" in w and "[" not in w else w
                 for w in words if w != "-m"]
    config_dir = None
    if "--config-dir" in words:
        i = words.index("--config-dir")
        config_dir, words = words[i + 1], words[:i] + words[i + 2:]
    show(words, config_dir)
