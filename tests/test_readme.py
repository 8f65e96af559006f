"""The README's commands, read out of README.md so they cannot drift: the two set-up commands are
what .ci/run runs, and the "Using it" walk-through runs as written, start to finish."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell lines of a block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [line.split(" #", 1)[0].strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _section(title: str) -> str:
    start = README.index(title)
    nxt = README.find("\n#", start + len(title))
    return README[start:nxt if nxt > 0 else None]


def test_setup_block_is_two_commands_and_ci_runs_the_same() -> None:
    first = _bash_blocks(README)[0]
    assert README.index(first) < README.index("\n## "), "the set-up block must open the README"
    install, tests = _commands(first)
    install_cmd, _, quickstart = install.partition(" && ")
    assert quickstart == "equilibrate quickstart" and install_cmd.startswith("pip install ")
    ci = (REPO / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    # CI installs exactly what the README installs (quietly) and runs the README's test command
    pip_args = install_cmd.removeprefix("pip install ").split()
    assert [line for line in ci_lines if "pip install" in line] == [f"python -m pip install -q {' '.join(pip_args)}"]
    assert tests in ci_lines
    assert "exit 5" in ci or '"$rc" -eq 5' in ci  # pytest collecting nothing is a failure


def test_using_it_walk_through_runs_as_written(tmp_path: Path, equilibrate_cache: Path) -> None:
    """Every command of the README's command-line block, in order, in a fresh folder (with the
    repository's configs/ in it, as in a clone): the chain of exports must hold together."""
    block = _bash_blocks(_section("### Command line"))[0]
    commands = _commands(block)
    assert commands and all(c.startswith("equilibrate ") for c in commands)
    # plain shell words only: no pipes, redirections or substitutions that the driver would not emulate
    assert not any(set(c) & set("|><$`;") for c in commands), commands
    assert any(" export " in f" {c} " for c in commands) and any(c.startswith("equilibrate eval") for c in commands)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    # One Python process runs them through the console entry point (`equilibrate` = cli:main), so the
    # suite pays the imports once; each command must exit 0.
    driver = (
        "import json, shlex, sys\n"
        "from equilibrate_pl.cli import main\n"
        "for line in json.loads(sys.argv[1]):\n"
        "    print('$', line, flush=True)\n"
        "    try:\n"
        "        code = main(shlex.split(line)[1:])\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code or 0\n"
        "    if code:\n"
        "        sys.exit(f'README command failed ({code}): {line}')\n"
    )
    env = {**os.environ, "EQUILIBRATE_CACHE": str(equilibrate_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", driver, json.dumps(commands)], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for stage in ("sft", "rm", "dpo", "ppo"):
        assert (tmp_path / "runs" / stage / "export" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "runs" / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"sft", "adpo", "appo"}
    assert "model:\n  class_path: equilibrate_pl.modules.PreferenceModule" in run.stdout  # the last line's output
    assert (tmp_path / "runs" / "labelled.jsonl").is_file() and (tmp_path / "data" / "world").is_dir()
