"""The offline demo (`make demo`): every step a user would run, on a tiny local model.

1. build a tiny random Qwen2-VL and a generated 3-class image data set under data/demo/
2. fit a SAV classifier on Ray (jobs/fit.py)
3. classify the held-out split (jobs/predict.py) and print the test accuracy

Each step is the command line a user would type, printed before it runs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sav_ray.demo_data import make_dataset  # noqa: E402
from sav_ray.tiny import build_demo_model  # noqa: E402

DEMO = ROOT / "data" / "demo"


def run(*args: str) -> None:
    print("\n$ " + shlex.join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model = DEMO / "model"
    if not (model / "config.json").exists():
        build_demo_model(model)
    splits = make_dataset(DEMO / "data")
    print(f"model: {model}\ntrain: {splits['train']}\ntest:  {splits['test']}")

    sav = DEMO / "sav"
    run(
        "jobs/fit.py",
        "--model",
        str(model),
        "--train",
        str(splits["train"]),
        "--output",
        str(sav),
        "--overwrite",
        "--num-heads",
        "20",
    )
    run(
        "jobs/predict.py",
        "--artifact",
        str(sav),
        "--data",
        str(splits["test"]),
        "--output",
        str(DEMO / "predictions.jsonl"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
