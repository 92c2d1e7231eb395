"""The jobs' code and the `sav-ray` command: fit, predict, evaluate, promote, serve, demo, benchmark.

Each job is a module with `main(argv)`; `jobs/<name>.py` (the entry points of `ray job submit`)
and `sav-ray <name>` run the same `main` with the same flags. The top layer: it may import
every other one, and nothing in the package imports it.
"""

from __future__ import annotations

import argparse

from sav_ray.pipelines.logs import add_verbose_arg, set_verbosity

COMMAND = "sav-ray"
_invoked_as_command = False


def prog(job: str) -> str:
    """The program name a job's `--help` shows: `sav-ray fit` or `jobs/fit.py`."""
    return f"{COMMAND} {job}" if _invoked_as_command else f"jobs/{job}.py"


def job_parser(job: str, doc: str) -> argparse.ArgumentParser:
    """A job's parser: its program name, the first line of its docstring, and `--verbose`."""
    p = argparse.ArgumentParser(prog=prog(job), description=doc.splitlines()[0])
    add_verbose_arg(p)
    return p


def parse_job_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a job's flags (its parser has `--verbose`) and apply the verbosity they ask for."""
    args = p.parse_args(argv)
    set_verbosity(args.verbose)
    return args
