"""The jobs' code and the `sav-ray` command: fit, predict, evaluate, promote, serve, demo, benchmark.

Each job is a module with `main(argv)`; `jobs/<name>.py` (the entry points of `ray job submit`)
and `sav-ray <name>` run the same `main` with the same flags. The top layer: it may import
every other one, and nothing in the package imports it.
"""

from __future__ import annotations

COMMAND = "sav-ray"
_invoked_as_command = False


def prog(job: str) -> str:
    """The program name a job's `--help` shows: `sav-ray fit` or `jobs/fit.py`."""
    return f"{COMMAND} {job}" if _invoked_as_command else f"jobs/{job}.py"
