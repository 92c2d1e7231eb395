"""The `sav-ray` command: every job under one name, with exactly the flags of jobs/<name>.py;
and the repository refers to nothing outside itself."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sav_ray.cli as cli
from sav_ray.cli.main import COMMANDS
from sav_ray.cli.main import main as sav_ray_main

ROOT = Path(__file__).resolve().parents[1]
SAV_RAY = Path(sys.executable).parent / "sav-ray"


def flags(help_text: str) -> list[str]:
    """The options a --help lists, in order (the program name left out)."""
    return re.findall(r"(?m)^\s+(-{1,2}[\w-]+)", help_text)


def help_in_process(command: str, as_command: bool) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        if as_command:
            sav_ray_main([command, "-h"])
        else:
            __import__(f"sav_ray.cli.{command}", fromlist=["main"]).main(["-h"])
    cli._invoked_as_command = False
    assert exit_.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_the_flags_of_its_job_file(command):
    job = help_in_process(command, as_command=False)
    sub = help_in_process(command, as_command=True)
    assert f"usage: jobs/{command}.py" in job and f"usage: sav-ray {command}" in sub
    assert flags(job) == flags(sub) and "--verbose" in flags(job), (job, sub)
    assert (ROOT / "jobs" / f"{command}.py").is_file() or command == "serve"


def test_sav_ray_fit_help_equals_jobs_fit_py_help():
    """The installed console script against the ray-job entry point, as a user runs them."""
    env_run = dict(capture_output=True, text=True, timeout=120, cwd=ROOT)
    script = subprocess.run([str(SAV_RAY), "fit", "-h"], **env_run)
    job = subprocess.run([sys.executable, "jobs/fit.py", "-h"], **env_run)
    assert script.returncode == job.returncode == 0, script.stderr + job.stderr
    assert flags(script.stdout) == flags(job.stdout)
    body = lambda text: text.split("options:", 1)[1]  # noqa: E731
    assert body(script.stdout) == body(job.stdout)  # same help, word for word


def test_an_unknown_command_is_exit_2_naming_it(capsys):
    assert sav_ray_main(["fitt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fitt'" in err and "fit" in err


def test_job_files_are_entry_points_without_path_hacks():
    for job in (ROOT / "jobs").glob("*.py"):
        text = job.read_text(encoding="utf-8")
        assert "sys.path" not in text, job
        assert f"from sav_ray.cli.{job.stem} import main" in text, job


OUTSIDE = re.compile(r"\.\./shared|/work/|DESIGN\.md|ENVIRONMENT\.md|STYLE\.md")


def test_no_file_refers_to_a_path_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if not tracked:  # not a git checkout (an sdist): read the tree
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".txt", ".cfg", ""}:
            continue
        if name == "tests/test_cli.py" or not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{n + 1}: {line.strip()}")
    assert hits == []


def test_a_job_run_in_process_gives_its_caller_back_the_signal_handlers(mlflow_store, capsys):
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert sav_ray_main(["promote", "no-such-model", "--tracking-uri", mlflow_store]) == 2
    assert "error:" in capsys.readouterr().err
    cli._invoked_as_command = False
    assert {s: signal.getsignal(s) for s in before} == before
