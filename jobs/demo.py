"""The offline demo (`make demo`): every step a user would run, on a tiny local model.

1. build a tiny random Qwen2-VL and a generated 3-class image data set under data/demo/
2. fit a SAV classifier on Ray and register it in MLflow as `sav-demo` (alias candidate)
3. classify the held-out split (jobs/predict.py) and print the test accuracy
4. evaluate the candidate against the zero-shot and all-heads baselines (jobs/evaluate.py)
5. promote it to `production` if it reaches 0.9 accuracy (jobs/promote.py)
6. serve `models:/sav-demo@production` with Ray Serve and classify the test images over HTTP

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

from sav_ray.fixtures.demo_data import make_dataset  # noqa: E402
from sav_ray.fixtures.tiny import build_demo_model  # noqa: E402
from sav_ray.tracking.runs import tracking_uri  # noqa: E402

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

    sav, name = DEMO / "sav", "sav-demo"
    train, test = str(splits["train"]), str(splits["test"])
    run("jobs/fit.py", "--model", str(model), "--train", train, "--output", str(sav),
        "--overwrite", "--num-heads", "20", "--register", name)  # fmt: skip
    run("jobs/predict.py", "--artifact", str(sav), "--data", test,
        "--output", str(DEMO / "predictions.jsonl"))  # fmt: skip
    run("jobs/evaluate.py", "--model", f"models:/{name}@candidate", "--data", test,
        "--train", train)  # fmt: skip
    run("jobs/promote.py", name, "--from", "candidate", "--to", "production",
        "--min-accuracy", "0.9")  # fmt: skip
    run("-m", "serve.local", "--ref", f"models:/{name}@production", "--data", test)
    print(f"\nMLflow: mlflow ui --backend-store-uri {tracking_uri()} --port 5000"
          "  (then open http://127.0.0.1:5000)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
