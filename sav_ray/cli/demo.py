"""The offline demo (`make demo`): every step a user would run, on a tiny local model.

1. build a tiny random Qwen2-VL and a generated 3-class image data set under data/demo/
2. fit a SAV classifier on Ray and register it in MLflow as `sav-demo` (alias candidate)
3. classify the held-out split (`sav-ray predict`) and print the test accuracy
4. evaluate the candidate against the zero-shot and all-heads baselines (`sav-ray evaluate`)
5. promote it to `production` if it reaches 0.9 accuracy (`sav-ray promote`)
6. serve `models:/sav-demo@production` with Ray Serve and classify the test images over HTTP

Each step is the command line a user would type, printed before it runs (`sav-ray NAME` is
`python jobs/NAME.py`). Quiet by default; `--verbose` shows Ray's and Serve's own logs too.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from sav_ray.cli import COMMAND, job_parser, parse_job_args
from sav_ray.fixtures.demo_data import make_dataset
from sav_ray.fixtures.tiny import build_demo_model
from sav_ray.pipelines.logs import is_verbose
from sav_ray.tracking.runs import project_root, tracking_uri


def run(command: str, *args: str, verbose: bool) -> None:
    print("\n$ " + shlex.join([COMMAND, command, *args]), flush=True)
    flags = ["--verbose"] if verbose else []
    cmd = [sys.executable, "-m", "sav_ray.cli", command, *args, *flags]
    subprocess.run(cmd, cwd=project_root(), check=True)


def main(argv: list[str] | None = None) -> int:
    p = job_parser("demo", __doc__)
    parse_job_args(p, argv)
    verbose = is_verbose()  # --verbose, or SAV_LOG_LEVEL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    demo = project_root() / "data" / "demo"
    model = demo / "model"
    if not (model / "config.json").exists():
        build_demo_model(model)
    splits = make_dataset(demo / "data")
    print(f"model: {model}\ntrain: {splits['train']}\ntest:  {splits['test']}")

    sav, name = demo / "sav", "sav-demo"
    train, test = str(splits["train"]), str(splits["test"])
    run("fit", "--model", str(model), "--train", train, "--output", str(sav), "--overwrite",
        "--num-heads", "20", "--register", name, verbose=verbose)  # fmt: skip
    run("predict", "--artifact", str(sav), "--data", test,
        "--output", str(demo / "predictions.jsonl"), verbose=verbose)  # fmt: skip
    run("evaluate", "--artifact", f"models:/{name}@candidate", "--data", test,
        "--train", train, verbose=verbose)  # fmt: skip
    run("promote", name, "--from", "candidate", "--to", "production",
        "--min-accuracy", "0.9", verbose=verbose)  # fmt: skip
    run("serve", "--ref", f"models:/{name}@production", "--data", test, verbose=verbose)
    print(f"\nMLflow: mlflow ui --backend-store-uri {tracking_uri()} --port 5000"
          "  (then open http://127.0.0.1:5000)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
