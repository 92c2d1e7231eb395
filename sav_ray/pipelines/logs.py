"""What a job prints: its own lines by default; Ray's, Ray Data's, Serve's and MLflow's INFO
logs, per-request access logs and download/loading progress bars only with `--verbose` or
SAV_LOG_LEVEL=DEBUG (or INFO). Warnings and errors always show.

The jobs call `set_verbosity` once, after parsing their flags; `init_ray`, the Serve app and
the model actors read the level back with `is_verbose`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

ENV = "SAV_LOG_LEVEL"
# Loggers that speak at INFO in a normal run (Ray core, Serve, MLflow's "Created version ...").
CHATTY = ("ray", "ray.serve", "ray.train", "mlflow", "alembic", "urllib3", "filelock")


def add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray's, Ray Data's, Ray Serve's and MLflow's own INFO logs, progress "
        f"bars of downloads and model loading, and each request's access log (or {ENV}=DEBUG)",
    )


def is_verbose() -> bool:
    return os.environ.get(ENV, "WARNING").upper() in ("DEBUG", "INFO")


def set_verbosity(flag: bool) -> bool:
    """Apply `--verbose` (or SAV_LOG_LEVEL) to this process and export it in SAV_LOG_LEVEL, so
    the processes the job starts (a local Ray's workers, the demo's steps) agree. True: verbose."""
    if flag:
        os.environ[ENV] = "DEBUG"
    verbose = is_verbose()
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
        for name in CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
        quiet_progress_bars()
    return verbose


def quiet_progress_bars() -> None:
    """MLflow's artifact download bars and transformers' weight loading bar, in this process
    and (through the environment) the workers a local Ray starts from it."""
    if is_verbose():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub loads
    # Already loaded, they read the environment too early: tell them. Not loaded, nothing is
    # imported here (a job that never loads a model, like promote, does not pay for it).
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def ray_init_kwargs() -> dict[str, Any]:
    """`ray.init` arguments: the driver's Ray logs at WARNING unless verbose."""
    return {} if is_verbose() else {"logging_level": logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's console at WARNING unless verbose (its ray-data.log file in the session folder
    keeps every line). Its progress bars stay: on a terminal they are bars, and elsewhere Ray
    Data logs them at INFO, which this silences."""
    import ray.data  # noqa: F401  (configures the ray.data logger and its handlers)

    if is_verbose():
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not the file
            handler.setLevel(logging.WARNING)


def quiet_serve_driver() -> None:
    """The driver's `ray.serve` logger at WARNING unless verbose; call after importing
    ray.serve, whose import sets it to INFO."""
    if not is_verbose():
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def serve_logging_config() -> dict[str, Any]:
    """Ray Serve's `logging_config` for its system actors and our deployments: INFO and access
    logs only when verbose (Serve's log files under the Ray session keep them either way at
    INFO when verbose)."""
    if is_verbose():
        return {"log_level": "INFO", "enable_access_log": True}
    return {"log_level": "WARNING", "enable_access_log": False}
