"""Shared fixtures: tiny random models built offline once per session, a local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# head_dim differs from hidden/heads (64/4 = 16) where the architecture allows it
HEAD_DIM = {"llava": 32, "gemma3": 32}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """arch -> folder of a saved tiny model (built once per session)."""
    from sav_ray.fixtures.tiny import build_tiny_model

    built: dict[str, object] = {}

    def get(arch: str):
        if arch not in built:
            out = tmp_path_factory.mktemp(f"tiny_{arch}")
            built[arch] = build_tiny_model(arch, out, head_dim=HEAD_DIM.get(arch))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """arch -> LoadedModel of a tiny model, loaded through the real loader (cached)."""
    from sav_ray.core.models import load_model

    loaded: dict[str, object] = {}

    def get(arch: str):
        if arch not in loaded:
            loaded[arch] = load_model(str(tiny_model_dir(arch)))
        return loaded[arch]

    return get


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The demo model (sav_ray.fixtures.tiny.DEMO_MODEL): 48 heads."""
    from sav_ray.fixtures.tiny import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """{"train": manifest, "test": manifest}: 3 classes, 20 train and 10 test images each."""
    from sav_ray.fixtures.demo_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the module (2 CPUs, no dashboard), shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# --- MLflow: tracking, registry, evaluation and promotion tests -----------------------------


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """The session's MLflow store: sqlite in a temp folder, never the repo's data/mlflow.

    Set in the environment, so jobs run in-process or as subprocesses use it too.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """{"train": manifest, "test": manifest}: demo images, 3 classes, 6 train and 3 test each."""
    from sav_ray.fixtures.demo_data import make_dataset

    return make_dataset(tmp_path_factory.mktemp("small_data"), train_per_class=6, test_per_class=3)


@pytest.fixture(scope="session")
def video_data(tmp_path_factory):
    """{"train": manifest, "test": manifest}: moving-square GIFs (6 frames, 32 px), 2 classes,
    4 train and 2 test each; rows hold `video`, `question`, `label` and no image field."""
    from sav_ray.fixtures.demo_data import make_video_dataset

    return make_video_dataset(tmp_path_factory.mktemp("video_data"))


def _manifest_examples(path):
    """(examples, labels) of a manifest, images loaded: the in-process view of its rows."""
    from sav_ray.core.images import load_image
    from sav_ray.core.manifest import read_manifest
    from sav_ray.core.prompts import Example

    table = read_manifest(path)
    examples = [
        Example(text=text, images=[load_image(p) for p in paths], where=f"row {row}")
        for row, paths, text in zip(
            table["row"].to_pylist(),
            table["images"].to_pylist(),
            table["text"].to_pylist(),
            strict=True,
        )
    ]
    return examples, table["label"].to_pylist()


@pytest.fixture(scope="session")
def manifest_examples():
    """path -> (examples, labels): a manifest's rows as in-process Examples, images loaded."""
    return _manifest_examples


def _fit_in_process(lm, examples, labels_of_rows, prompt, k):
    """The SavArtifact (not written) of `examples` fitted with the core functions (no Ray):
    `paper` selection of k heads, the probabilities' temperature from leave-one-out."""
    import numpy as np

    from sav_ray.core import calibration, reduce
    from sav_ray.core.artifact import Calibration, SavArtifact, Selection
    from sav_ray.core.capture import capture_examples

    labels = tuple(sorted(set(labels_of_rows)))
    y = np.array([labels.index(label) for label in labels_of_rows])  # [n]
    vectors = capture_examples(lm, examples, prompt)  # [n, layer, head, head_dim]
    sums = reduce.ClassSums.from_batch(labels, vectors, y)
    scores = reduce.head_hits(vectors, y, sums, "paper").scores()  # [layer, head]
    heads = reduce.select_heads(scores, k)  # [k, 2]
    centroids = reduce.gather_heads(sums.centroids(), heads)  # [class, k, head_dim]
    curve = calibration.loo_curve(
        reduce.gather_heads(vectors, heads), y, centroids, sums.counts, [k]
    )
    return SavArtifact(
        labels=list(labels),
        heads=heads,
        centroids=centroids,
        calibration=Calibration(
            temperature=curve.temperature(0),
            loo_log_loss=float(curve.best_log_loss()[0][0]),
            loo_accuracy=float(curve.accuracy()[0]),
        ),
        base_model=lm.info,
        prompt=prompt,
        selection=Selection(
            method="paper",
            k=k,
            examples_per_class={lab: int(c) for lab, c in zip(labels, sums.counts, strict=True)},
            scores=[float(scores[layer, head]) for layer, head in heads],
        ),
        head_scores=scores.astype(np.float32),
    )


@pytest.fixture(scope="session")
def fit_in_process():
    """(lm, examples, labels, prompt, k) -> SavArtifact fitted in-process (paper selection)."""
    return _fit_in_process


@pytest.fixture(scope="session")
def demo_sav(demo_model_dir, small_data, tmp_path_factory):
    """(LoadedModel, artifact folder, SavArtifact): the demo model's SAV (k=10) on small_data,
    fitted in-process with the core functions (no Ray), written with the one writer."""
    from sav_ray.core.artifact import write_artifact
    from sav_ray.core.models import load_model
    from sav_ray.core.prompts import PromptConfig

    lm = load_model(str(demo_model_dir))
    examples, labels_of_rows = _manifest_examples(small_data["train"])
    artifact = _fit_in_process(lm, examples, labels_of_rows, PromptConfig(), 10)
    out = tmp_path_factory.mktemp("demo_sav") / "sav"
    return lm, out, write_artifact(artifact, out)


def _o_proj_identity(lm, inputs):
    """Capture `inputs` while hooks record every o_proj's output; assert that o_proj of each
    captured last-token vector equals that output at the last real token. Returns the vectors."""
    import torch

    from sav_ray.core.capture import capture_inputs, last_token_positions

    outputs: dict[int, torch.Tensor] = {}  # layer -> [batch, seq, hidden]
    handles = [
        o.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
        for i, o in enumerate(lm.layout.o_projs)
    ]
    try:
        vectors = capture_inputs(lm, inputs)  # [batch, layer, head, head_dim]
    finally:
        for h in handles:
            h.remove()
    positions = last_token_positions(inputs["attention_mask"])  # [batch]
    rows = torch.arange(len(positions))
    for layer, o_proj in enumerate(lm.layout.o_projs):
        rebuilt = o_proj(vectors[:, layer].reshape(len(rows), -1))  # [batch, hidden]
        own = outputs[layer][rows, positions]  # [batch, hidden]
        torch.testing.assert_close(rebuilt, own, atol=1e-5, rtol=0)
    return vectors


@pytest.fixture(scope="session")
def o_proj_identity():
    """(lm, inputs) -> vectors, asserting o_proj(captured vector) == o_proj's own output."""
    return _o_proj_identity


def _fit_job_in_fresh_ray(args, timeout):
    """Run `jobs/fit.py ARGS` as a subprocess with no RAY_ADDRESS and its own RAY_TMPDIR.
    Returns (completed process, names in RAY_TMPDIR/ray, or None where Ray made no folder)."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        proc = subprocess.run(
            [sys.executable, str(root / "jobs" / "fit.py"), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**env, "RAY_TMPDIR": str(ray_tmp)},
        )
        ray_dir = ray_tmp / "ray"
        return proc, sorted(p.name for p in ray_dir.iterdir()) if ray_dir.exists() else None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def fit_job_in_fresh_ray():
    """(args, timeout) -> (process, Ray's temp folder listing or None): jobs/fit.py in a
    subprocess with a Ray temp dir of its own."""
    return _fit_job_in_fresh_ray


def _serve_on_loopback(config, token_env=None, token=None):
    """Start Serve on a free 127.0.0.1 port and run `config`'s application at "/" (one
    Classifier replica of 1 CPU; the Ingress with `token_env`=`token` in its environment);
    its base URL. The caller ends it with `serve.shutdown()`."""
    from ray import serve

    from sav_ray.bench.serving import free_port
    from serve.app import application

    env = {token_env: token} if token_env else {}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        application(
            config,
            classifier_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
            ingress_options={
                "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}}
            },
        ),
        name="sav",
        route_prefix="/",
    )
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def serve_on_loopback():
    return _serve_on_loopback


class LoopbackHttp:
    """An HTTP/1.0 server on 127.0.0.1 in threads, for tests. `routes` maps a path to the bytes
    to answer 200 with (with their Content-Length), or to `fn(handler, stop)` that writes the
    whole response itself. Other paths get 404. `paths` records every path asked for;
    `close()` sets `stop` (long answers watch it) and stops the server."""

    def __init__(self, routes):
        import http.server
        import threading

        self.paths, self.stop = [], threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):  # noqa: N802
                outer.paths.append(self.path)
                answer = routes.get(self.path)
                if answer is None:
                    self.send_error(404)
                elif callable(answer):
                    answer(self, outer.stop)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def drip(length: int, chunk: bytes = b"x" * 16, every_s: float = 0.25):
        """A route answering 200 with `Content-Length: length` and then `chunk` every `every_s`
        seconds until the server stops (or the client goes)."""

        def answer(handler, stop):
            handler.send_response(200)
            handler.send_header("Content-Length", str(length))
            handler.end_headers()
            while not stop.is_set():
                try:
                    handler.wfile.write(chunk)
                    handler.wfile.flush()
                except OSError:
                    return
                stop.wait(every_s)

        return answer


@pytest.fixture(scope="session")
def loopback_http():
    """LoopbackHttp (the class): start one with `loopback_http(routes)`, `close()` it after."""
    return LoopbackHttp


@pytest.fixture(scope="session")
def big_manifest(demo_data, tmp_path_factory):
    """The demo training set five times over (300 rows), so the fit lasts long enough to kill."""
    base = demo_data["train"].parent
    rows = [json.loads(line) for line in demo_data["train"].read_text().splitlines()]
    out = tmp_path_factory.mktemp("big") / "train.jsonl"
    with out.open("w") as f:
        for copy in range(5):
            for r in rows:
                f.write(
                    json.dumps({**r, "image": str(base / r["image"]), "id": f"{copy}-{r['image']}"})
                    + "\n"
                )
    return out


def _stopped_cleanly(uri: str, experiment: str, name: str, output: Path, signame: str):
    """One run, KILLED, tagged with the signal; no version of `name`; no artifact at `output`,
    and no temporary sibling of it."""
    from sav_ray.tracking import registry

    c = registry.client(uri)
    (run,) = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "KILLED", run.info.status
    assert run.data.tags["sav.error"] == f"stopped by {signame}"
    assert not c.search_model_versions(f"name = '{name}'")
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.tmp-*"))


@pytest.fixture(scope="session")
def stopped_cleanly():
    """Asserts a stopped fit left its store and output clean (tests/test_stops.py)."""
    return _stopped_cleanly
