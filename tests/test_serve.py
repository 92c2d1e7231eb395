"""The Serve application end to end: a real `serve.run` on 127.0.0.1 with the demo model.

One application serves, for the whole module:
  shapes   an artifact folder (3 demo classes, heads from layers 1-2)
  circles  another folder on the same base model (circle / other, heads from layer 3)
  alien    a folder fitted "on another revision" (refused: 409)
  reg      models:/sav-serve-test@production in a sqlite MLflow registry (version 1 = shapes,
           version 2 = circles, registered as candidate)
  moves    a video classifier (moving squares, 3 frames per video given as images)
The expected answers come from the code jobs/predict.py runs (`ClassifyRows`, in process).
The test that kills the classifier replica runs last.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.slow

TOKEN = "test-token-3f9a"
REGISTERED = "sav-serve-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = "What is in the image?"
TIMEOUT = 90  # seconds per HTTP call: every call returns or the test fails, none hangs


# --- fixture: artifacts, registry, server -----------------------------------------------------


def fit_artifact(
    lm, vectors, labels, layers, k, out, preprocessing=None, calibrated=True, positive=None
):
    """A SAV artifact from captured vectors [n, layer, head, head_dim], heads only from `layers`
    (so the artifacts differ in their deepest layer); with the probabilities' temperature
    (unless not `calibrated`) and, for a `positive` label, a threshold reaching precision 0.9
    leave-one-out."""
    from sav_ray.core import calibration, reduce
    from sav_ray.core.artifact import Calibration, SavArtifact, Selection, write_artifact
    from sav_ray.core.prompts import PromptConfig
    from sav_ray.core.resolution import Preprocessing

    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels])
    sums = reduce.ClassSums.from_batch(names, vectors, y)
    scores = reduce.head_hits(vectors, y, sums, "paper").scores()  # [layer, head]
    outside = np.ones(scores.shape[0], dtype=bool)
    outside[list(layers)] = False
    scores[outside] = -1.0
    heads = reduce.select_heads(scores, k)  # [k, 2]
    centroids = reduce.gather_heads(sums.centroids(), heads).astype(np.float32)
    vectors_k = reduce.gather_heads(vectors, heads)
    curve = calibration.loo_curve(vectors_k, y, centroids, sums.counts, [k])
    temperature = curve.temperature(0)
    threshold = None
    if positive is not None:
        p = calibration.loo_probabilities(vectors_k, y, centroids, sums.counts, temperature)
        c = names.index(positive)
        t, precision, recall = calibration.choose_threshold(p[:, c], y == c, "precision", 0.9)
        threshold = calibration.Threshold(positive, t, "precision", 0.9, precision, recall)
    artifact = SavArtifact(
        labels=names,
        heads=heads,
        centroids=centroids,
        calibration=Calibration(temperature, float(curve.best_log_loss()[0][0]), 1.0)
        if calibrated
        else None,
        threshold=threshold,
        base_model=lm.info,
        prompt=PromptConfig(),
        selection=Selection(
            "paper",
            k,
            {n: int(c) for n, c in zip(names, sums.counts, strict=True)},
            [float(scores[layer, head]) for layer, head in heads],
        ),
        preprocessing=preprocessing or Preprocessing(),
    )
    return write_artifact(artifact, out)


class Server:
    def __init__(self, url, mlflow_uri, images, test_manifest, expected, artifacts, lm, videos):
        self.videos = videos  # the video test rows' (text, base64 GIF)
        self.url = url
        self.mlflow_uri = mlflow_uri
        self.images = images  # test images, base64
        self.test_manifest = test_manifest  # their manifest
        self.expected = expected  # artifact name -> [prediction dict per test image]
        self.artifacts = artifacts  # name -> SavArtifact
        self.lm = lm

    def post(self, body, headers=AUTH, path="/v1/classify", **kwargs):
        return requests.post(self.url + path, json=body, headers=headers, timeout=TIMEOUT, **kwargs)

    def get(self, path, headers=AUTH):
        return requests.get(self.url + path, headers=headers, timeout=TIMEOUT)

    def classify(self, model, indices):
        inputs = [{"text": QUESTION, "images": [self.images[i]]} for i in indices]
        return self.post({"model": model, "inputs": inputs})

    def models(self):
        return {m["name"]: m for m in self.get("/v1/models").json()["models"]}


@pytest.fixture(scope="module")
def server(
    local_ray,
    demo_model_dir,
    demo_data,
    video_data,
    manifest_examples,
    tmp_path_factory,
    serve_on_loopback,
):
    from ray import serve

    from sav_ray.core.artifact import write_artifact
    from sav_ray.core.capture import capture_examples
    from sav_ray.core.manifest import ManifestFields, read_manifest
    from sav_ray.core.models import load_model
    from sav_ray.core.prompts import Example, PromptConfig
    from sav_ray.core.resolution import Preprocessing
    from sav_ray.core.video import load_video
    from sav_ray.pipelines.config import ModelConfig
    from sav_ray.pipelines.predicting import ClassifyRows
    from sav_ray.pipelines.preprocess import object_column, preprocess_rows
    from sav_ray.tracking.registry import promote, register_artifact
    from sav_ray.tracking.runs import run, use_store
    from serve.schemas import AppConfig

    tmp = tmp_path_factory.mktemp("serve")
    lm = load_model(str(demo_model_dir))
    fields = ManifestFields.from_flags("image", "question", "label", None)

    examples, labels = manifest_examples(demo_data["train"])
    vectors = np.concatenate(
        [capture_examples(lm, examples[i : i + 10], PromptConfig()) for i in range(0, 60, 10)]
    )  # [60, layer, head, head_dim]
    circle = ["circle" if label == "red_circle" else "other" for label in labels]
    artifacts = {
        "shapes": fit_artifact(lm, vectors, labels, [1, 2], 8, tmp / "shapes"),
        "circles": fit_artifact(lm, vectors, circle, [3], 6, tmp / "circles", positive="circle"),
    }
    other_revision = dataclasses.replace(lm.info, revision="abc123")
    write_artifact(
        dataclasses.replace(artifacts["shapes"], base_model=other_revision), tmp / "alien"
    )

    uri = use_store(f"sqlite:///{tmp}/mlflow.db")
    for version, name in enumerate(("shapes", "circles"), start=1):
        # registry.py finds the artifact of a logged model only in a folder named "sav"
        folder = tmp / f"v{version}" / "sav"
        shutil.copytree(tmp / name, folder)
        with run("serve-test", uri, f"fit-{name}"):
            register_artifact(REGISTERED, artifacts[name], folder)
        if name == "shapes":
            promote(REGISTERED, "candidate", "production", uri=uri)

    # What jobs/predict.py answers: its actor's code on the same rows, in this process.
    table = read_manifest(demo_data["test"], fields)
    columns = {k: object_column(v) for k, v in table.to_pydict().items()}
    test = preprocess_rows(columns, str(demo_model_dir), None, PromptConfig().to_dict(), {})
    expected = {}
    for name in ("shapes", "circles"):
        rows = ClassifyRows(ModelConfig(model=str(demo_model_dir)), artifacts[name])(test)
        expected[name] = [json.loads(p) for p in rows["prediction"]]
    test_examples, _ = manifest_examples(demo_data["test"])
    images = [base64.b64encode(_png(ex.images[0])).decode() for ex in test_examples]

    # the video classifier: 3 frames per video (not the default 8), as images
    prep = Preprocessing(video_frames=3, video_input="images")
    no_image = ManifestFields(image=())
    train = read_manifest(video_data["train"], no_image)
    train_examples = [
        Example(text=t, images=[], video=load_video(p, 3))
        for p, t in zip(train["video"].to_pylist(), train["text"].to_pylist(), strict=True)
    ]
    vectors = capture_examples(lm, train_examples, PromptConfig(), preprocessing=prep)
    moves = fit_artifact(  # as fitted before probabilities existed: votes only
        lm,
        vectors,
        train["label"].to_pylist(),
        [1, 2],
        6,
        tmp / "moves",
        preprocessing=prep,
        calibrated=False,
    )
    table = read_manifest(video_data["test"], no_image)
    columns = {k: object_column(v) for k, v in table.to_pydict().items()}
    test = preprocess_rows(
        columns, str(demo_model_dir), None, PromptConfig().to_dict(), prep.to_dict()
    )
    rows = ClassifyRows(ModelConfig(model=str(demo_model_dir)), moves)(test)
    expected["moves"] = [json.loads(p) for p in rows["prediction"]]
    videos = [
        (t, base64.b64encode(open(p, "rb").read()).decode())
        for p, t in zip(table["video"].to_pylist(), table["text"].to_pylist(), strict=True)
    ]

    config = AppConfig(
        models=[
            {"name": "shapes", "ref": str(tmp / "shapes")},
            {"name": "circles", "ref": str(tmp / "circles")},
            {"name": "alien", "ref": str(tmp / "alien")},
            {"name": "reg", "ref": f"models:/{REGISTERED}@production"},
            {"name": "moves", "ref": str(tmp / "moves")},
        ],
        tracking_uri=uri,
        poll_interval_s=1.5,
        request_timeout_s=45,
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
        token_env="SAV_TEST_TOKEN",
        limits={
            "max_body_bytes": 1_000_000,
            "max_inputs": 16,
            "max_image_bytes": 100_000,
            "max_image_pixels": 250_000,
            "max_video_frames": 8,
        },
    )
    url = serve_on_loopback(config, "SAV_TEST_TOKEN", TOKEN)
    yield Server(url, uri, images, demo_data["test"], expected, artifacts, lm, videos)
    serve.shutdown()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same(outputs, expected):
    assert [o["label"] for o in outputs] == [e["label"] for e in expected]
    for o, e in zip(outputs, expected, strict=True):
        assert o["votes"] == e["votes"]
        assert o["scores"].keys() == e["scores"].keys()
        for label, score in e["scores"].items():
            assert abs(o["scores"][label] - score) <= 1e-5


# --- tests --------------------------------------------------------------------------------------


def test_models_are_listed_with_versions_and_the_alien_refused(server):
    models = server.models()
    assert models["shapes"]["status"] == "ready" and models["shapes"]["version"] is None
    assert models["shapes"]["artifact_hash"] == server.artifacts["shapes"].digest
    assert models["reg"]["version"] == "1", models["reg"]["error"]
    assert models["reg"]["model_id"] == f"models:/{REGISTERED}/1"
    assert models["alien"]["status"] == "error" and "revision" in models["alien"]["error"]
    assert server.get("/healthz", headers={}).json()["models_ready"] == 4


def test_predictions_over_http_equal_batch_prediction(server):
    outputs = []
    for start in range(0, 30, 7):  # requests of up to 7 inputs
        r = server.classify("shapes", range(start, min(start + 7, 30)))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["artifact_hash"] == server.artifacts["shapes"].digest
        assert body["model"] == "shapes" and body["version"] is None
        outputs += body["outputs"]
    assert_same(outputs, server.expected["shapes"])


def test_the_client_classifies_a_manifest_over_http(server):
    from serve.client import accuracy, classify_manifest

    records = classify_manifest(server.url, "shapes", server.test_manifest, token=TOKEN)
    assert_same(records, server.expected["shapes"])
    assert accuracy(records) >= 0.9


def test_two_artifacts_share_one_replica_and_batch_under_200_concurrent_requests(server):
    rng = np.random.default_rng(0)
    jobs = [(str(rng.choice(["shapes", "circles"])), int(rng.integers(30))) for _ in range(200)]

    def call(job):
        model, i = job
        r = server.classify(model, [i])
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(call, jobs))
    for (model, i), (status, body) in zip(jobs, results, strict=True):
        assert status == 200, body
        assert body["model"] == model
        assert_same(body["outputs"], [server.expected[model][i]])
    stats = server.get("/v1/stats").json()["classifier"]
    assert stats["max_batch_size"] > 1
    # requests for the two artifacts shared batches (one forward pass each)
    assert any(int(n) >= 2 for n in stats["models_per_batch"]), stats["models_per_batch"]
    served = server.models()
    assert {served["shapes"]["model_id"], served["circles"]["model_id"]} <= set(
        stats["inputs_per_model"]
    )
    from ray import serve

    classifier = serve.status().applications["sav"].deployments["Classifier"]
    assert sum(classifier.replica_states.values()) == 1


def test_a_request_naming_two_models_runs_one_forward_row_per_input(server):
    """Each model's result equals a request for it alone; the classifier ran one row per
    input (counted by a hook on the first decoder layer), not one per model."""
    inputs = [{"text": QUESTION, "images": [server.images[i]]} for i in range(5)]
    before = server.get("/v1/stats").json()["classifier"]
    r = server.post({"models": ["circles", "shapes", "reg"], "inputs": inputs})
    after = server.get("/v1/stats").json()["classifier"]
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["model"] for res in results] == ["circles", "shapes", "reg"]
    assert after["rows_run"] - before["rows_run"] == 5
    assert after["forward_rows"] - before["forward_rows"] == 5
    assert after["forward_passes"] - before["forward_passes"] <= 5
    for res in results:
        alone = server.post({"model": res["model"], "inputs": inputs})
        assert alone.status_code == 200, alone.text
        alone = alone.json()
        assert {k: res[k] for k in alone if k != "outputs"} == {
            k: v for k, v in alone.items() if k != "outputs"
        }
        assert [o["label"] for o in res["outputs"]] == [o["label"] for o in alone["outputs"]]
        assert [o["votes"] for o in res["outputs"]] == [o["votes"] for o in alone["outputs"]]
        for got, want in zip(res["outputs"], alone["outputs"], strict=True):
            for label, score in want["scores"].items():
                assert abs(got["scores"][label] - score) <= 1e-6
    assert_same(results[0]["outputs"], server.expected["circles"][:5])
    assert_same(results[1]["outputs"], server.expected["shapes"][:5])
    assert results[2]["version"] == "1" and results[2]["artifact_hash"] == (
        server.artifacts["shapes"].digest
    )


def test_raw_image_files_are_accepted_as_multipart_uploads(server):
    raw = [base64.b64decode(server.images[i]) for i in range(3)]
    r = requests.post(
        server.url + "/v1/classify",
        headers=AUTH,
        data={"model": "shapes", "text": QUESTION},
        files={"image": ("0.png", raw[0], "image/png")},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert_same(r.json()["outputs"], server.expected["shapes"][:1])
    body = {
        "models": ["shapes", "circles"],
        "inputs": [{"text": QUESTION, "images": [f"part:img{i}"]} for i in (2, 1)]
        + [{"text": QUESTION, "images": [server.images[0]]}],  # base64 beside uploads
    }
    r = requests.post(
        server.url + "/v1/classify",
        headers=AUTH,
        files={
            "request": (None, json.dumps(body), "application/json"),
            **{f"img{i}": (f"{i}.png", raw[i], "image/png") for i in (1, 2)},
        },
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    shapes, circles = r.json()["results"]
    assert_same(shapes["outputs"], [server.expected["shapes"][i] for i in (2, 1, 0)])
    assert_same(circles["outputs"], [server.expected["circles"][i] for i in (2, 1, 0)])


def test_probabilities_sum_to_one_and_the_decision_follows_the_stored_threshold(server):
    threshold = server.models()["circles"]["threshold"]
    assert threshold["positive_label"] == "circle" and threshold["precision"] >= 0.9
    r = server.classify("circles", range(12))
    assert r.status_code == 200, r.text
    for out, expected in zip(r.json()["outputs"], server.expected["circles"][:12], strict=True):
        p = out["probabilities"]
        assert abs(sum(p.values()) - 1.0) <= 1e-6
        for label, value in expected["probabilities"].items():
            assert abs(p[label] - value) <= 1e-6
        assert out["decision"] == (p["circle"] >= threshold["threshold"])
        assert out["decision"] == expected["decision"]
    moves = server.post({"model": "moves", "inputs": [{"text": "?", "video": server.videos[0][1]}]})
    assert moves.status_code == 200, moves.text
    [out] = moves.json()["outputs"]  # an artifact without probabilities: votes only
    assert out["probabilities"] is None and out["decision"] is None


def test_layers_after_the_deepest_selected_one_never_run(server):
    deepest = max(a.deepest_layer for a in server.artifacts.values())
    assert deepest == 3 < server.lm.info.num_layers - 1
    for model in ("shapes", "circles", "reg"):
        assert server.classify(model, [0, 1]).status_code == 200
    layers_run = server.get("/v1/stats").json()["classifier"]["layers_run"]
    assert all(n > 0 for n in layers_run[: deepest + 1]), layers_run
    assert layers_run[deepest + 1 :] == [0] * (len(layers_run) - deepest - 1), layers_run


def test_videos_are_classified_as_predict_does_and_an_over_limit_one_gets_413(server, tmp_path):
    from sav_ray.fixtures.demo_data import write_gif

    inputs = [{"text": text, "video": video} for text, video in server.videos]
    r = server.post({"model": "moves", "inputs": inputs})
    assert r.status_code == 200, r.text
    assert_same(r.json()["outputs"], server.expected["moves"])
    frames = [Image.new("RGB", (16, 16), (20 * t, 0, 0)) for t in range(12)]  # over 8 frames
    write_gif(frames, tmp_path / "long.gif")
    long = base64.b64encode((tmp_path / "long.gif").read_bytes()).decode()
    r = server.post({"model": "moves", "inputs": [inputs[0], {"text": "q", "video": long}]})
    assert r.status_code == 413, r.text
    assert r.json()["detail"].startswith("inputs[1].video: more than 8 frames")


def png_b64(width, height, noise=False) -> str:
    rng = np.random.default_rng(0)
    pixels = (
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if noise
        else np.full((height, width, 3), 128, dtype=np.uint8)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def one(images, text=QUESTION, model="shapes"):
    return {"model": model, "inputs": [{"text": text, "images": images}]}


JSON = {**AUTH, "Content-Type": "application/json"}


def bad_requests(server):
    """(what, requests.post kwargs, expected status, words in the message)."""
    good = server.images[0]
    return [
        (
            "malformed JSON",
            {"data": '{"model": "shapes", "inputs": [', "headers": JSON},
            400,
            "JSON",
        ),
        ("bytes, not JSON", {"data": b"\xff\xfe\x00", "headers": JSON}, 400, "body"),
        ("inputs not a list", {"json": {"model": "shapes", "inputs": "x"}}, 422, "inputs"),
        (
            "text not a string",
            {"json": {"model": "shapes", "inputs": [{"text": 5}]}},
            422,
            "inputs[0].text",
        ),
        ("no model", {"json": {"inputs": [{"text": "a"}]}}, 422, "model"),
        ("unknown field", {"json": {**one([good]), "modle": "x"}}, 422, "modle"),
        ("bad base64", {"json": one(["@@@"])}, 400, "inputs[0].images[0]: not valid base64"),
        ("not an image", {"json": one([base64.b64encode(b"hello").decode()])}, 400, "not an image"),
        (
            "video not base64",
            {"json": {"model": "moves", "inputs": [{"video": "@@@"}]}},
            400,
            "inputs[0].video: not valid base64",
        ),
        (
            "not a video",
            {"json": {"model": "moves", "inputs": [{"video": base64.b64encode(b"hi").decode()}]}},
            400,
            "inputs[0].video: not a video",
        ),
        ("too many pixels", {"json": one([png_b64(600, 600)])}, 413, "pixels"),
        ("too many bytes", {"json": one([png_b64(200, 200, noise=True)])}, 413, "100000 bytes"),
        ("body too large", {"json": one(["A" * 1_100_000])}, 413, "request body"),
        (
            "body too large, chunked",
            {"data": iter([b"x" * 600_000, b"x" * 600_000]), "headers": JSON},
            413,
            "request body",
        ),
        (
            "too many inputs",
            {"json": {"model": "shapes", "inputs": [{"text": "a"}] * 17}},
            413,
            "inputs",
        ),
        ("text too long", {"json": one([], text="a" * 8001)}, 413, "inputs[0].text"),
        ("unknown model", {"json": one([good], model="nope")}, 404, "unknown model 'nope'"),
        ("other base model", {"json": one([good], model="alien")}, 409, "revision"),
        (
            "one of several models on another base model",
            {"json": {"models": ["shapes", "alien"], "inputs": [{"images": [good]}]}},
            409,
            "models[1]: model 'alien' cannot be served",
        ),
        (
            "model and models",
            {"json": {"model": "shapes", "models": ["circles"], "inputs": [{"text": "a"}]}},
            422,
            "not both",
        ),
        (
            "a model twice",
            {"json": {"models": ["shapes", "shapes"], "inputs": [{"text": "a"}]}},
            422,
            "repeated: ['shapes']",
        ),
        (
            "too many models",
            {"json": {"models": [f"m{i}" for i in range(9)], "inputs": [{"text": "a"}]}},
            413,
            "models",
        ),
        (
            "an upload not sent",
            {"files": {"request": (None, json.dumps(one(["part:cat"])))}},
            400,
            "inputs[0].images[0]: names the upload 'cat'",
        ),
        (
            "a file part name twice, the request part last",
            {
                "files": [
                    ("cat", ("a.png", b"x")),
                    ("cat", ("b.png", b"y")),
                    ("request", (None, json.dumps(one(["part:cat"])))),
                ]
            },
            400,
            "file part 'cat' is sent twice",
        ),
        (
            "an unknown multipart field",
            {"files": {"model": (None, "shapes"), "colour": (None, "red")}},
            400,
            "['colour']",
        ),
        (
            "an uploaded file that is not an image",
            {"files": {"model": (None, "shapes"), "image": ("a.png", b"hello")}},
            400,
            "inputs[0].images[0]: not an image",
        ),
        ("placeholders", {"json": one([good], text="<image> and <image>?")}, 422, "placeholder"),
        ("server path", {"json": one(["file:///etc/passwd"])}, 400, "file://"),
        ("URL", {"json": one(["http://127.0.0.1:9/a.png"])}, 400, "URL"),
        ("no token", {"json": one([good]), "headers": {}}, 401, "bearer token"),
        (
            "wrong token",
            {"json": one([good]), "headers": {"Authorization": "Bearer x"}},
            401,
            "token",
        ),
    ]


def test_each_bad_request_gets_its_4xx_and_the_server_still_answers(server):
    for what, kwargs, status, words in bad_requests(server):
        kwargs = {"headers": AUTH, **kwargs}
        r = requests.post(server.url + "/v1/classify", timeout=TIMEOUT, **kwargs)
        assert r.status_code == status, (what, r.status_code, r.text)
        assert words in r.json()["detail"], (what, r.text)
    for path in ("/v1/models", "/v1/stats", "/openapi.json", "/docs"):
        assert server.get(path, headers={}).status_code == 401, path
    assert server.get("/healthz", headers={}).status_code == 200
    r = server.classify("shapes", [0, 1, 2])
    assert r.status_code == 200
    assert_same(r.json()["outputs"], server.expected["shapes"][:3])


# --- fuzzing from /openapi.json -------------------------------------------------------------

SERVED = ["shapes", "circles", "alien", "reg", "moves"]
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def one_in(n, rare, otherwise):
    """`rare` one time in `n`. (st.one_of would not do: it merges equal branches.)"""
    return st.integers(1, n).flatmap(lambda i: rare if i == 1 else otherwise)


def strings(schema, interesting):
    limit = min(schema.get("maxLength", 40), 40)
    return st.text(max_size=limit) | st.sampled_from(interesting)


def from_schema(schema, components, interesting):
    """Values for a JSON Schema of the OpenAPI document; at every level, one time in eight,
    any JSON instead."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].rsplit("/", 1)[1]], components, interesting)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, components, interesting) for s in schema[key]])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = {
            k: from_schema(v, components, interesting)
            for k, v in schema.get("properties", {}).items()
        }
        if "model" in props:  # mostly served names, so that requests get past the lookup
            props["model"] = one_in(2, props["model"], otherwise=st.sampled_from(SERVED))
        required = set(schema.get("required", []))
        value = st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    elif kind == "array":
        items = from_schema(schema.get("items", {}), components, interesting)
        value = st.lists(
            items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4)
        )
    elif kind == "string":
        value = strings(schema, interesting)
    elif kind == "integer":
        value = st.integers()
    elif kind == "number":
        value = st.floats()
    elif kind == "boolean":
        value = st.booleans()
    else:
        value = ANY_JSON
    return one_in(8, ANY_JSON, otherwise=value)


def operations(spec, interesting):
    """A strategy of (method, path, requests kwargs) over every operation of the document."""
    components = spec.get("components", {}).get("schemas", {})
    choices = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            params = {
                p["name"]: strings(p.get("schema", {}), interesting)
                for p in op.get("parameters", [])
                if p.get("in") == "query"
            }
            query = st.fixed_dictionaries({}, optional=params)
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                payload = from_schema(body["schema"], components, interesting)
                kwargs = st.one_of(
                    # NaN and inf go out as they are (invalid JSON), not refused by requests
                    st.builds(lambda q, j: {"params": q, "data": json.dumps(j)}, query, payload),
                    st.builds(lambda q, b: {"params": q, "data": b}, query, st.binary(max_size=64)),
                )
            else:
                kwargs = st.builds(lambda q: {"params": q}, query)
            # operations with a body get most of the examples: they have the most to refuse
            weight = 6 if body else 1
            choices += [st.tuples(st.just(method.upper()), st.just(path), kwargs)] * weight
    return st.sampled_from(choices).flatmap(lambda operation: operation)


def test_fuzzing_every_operation_of_the_openapi_document_finds_no_5xx(server):
    spec = server.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/models", "/v1/models/reload", "/v1/stats", "/healthz"} <= set(
        spec["paths"]
    )
    assert spec["paths"]["/v1/classify"]["post"]["requestBody"]
    interesting = [
        *SERVED,
        png_b64(32, 32),
        f"data:image/png;base64,{png_b64(40, 30)}",
        server.images[2][:100],
        base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode(),
        "file:///etc/passwd",
        "http://127.0.0.1:9/a.png",
        "<image>",
        "<image> <image>",
        "\x00",
    ]
    seen = []

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(operations(spec, interesting))
    def check(request):
        method, path, kwargs = request
        headers = {**AUTH, "Content-Type": "application/json"}
        r = requests.request(method, server.url + path, headers=headers, timeout=TIMEOUT, **kwargs)
        seen.append(r.status_code)
        assert r.status_code < 500, (method, path, kwargs, r.status_code, r.text[:500])

    check()
    assert seen.count(200) >= 5 and len({s for s in seen if 400 <= s < 500}) >= 3, seen
    assert server.classify("shapes", [3]).status_code == 200


# --- following the registry -------------------------------------------------------------------


def test_promotion_is_followed_on_reload_with_no_failed_request(server):
    from sav_ray.tracking.registry import promote

    assert server.models()["reg"]["version"] == "1"
    stop, results, lock = threading.Event(), [], threading.Lock()

    def load(worker):
        i = worker
        while not stop.is_set():
            started = time.monotonic()
            r = server.classify("reg", [i % 30])
            with lock:
                results.append((started, i % 30, r.status_code, r.json()))
            i += 4

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        promote(REGISTERED, "candidate", "production", uri=server.mlflow_uri)
        r = server.post(None, path="/v1/models/reload", params={"model": "reg"})
        switched = time.monotonic()
        assert r.status_code == 200, r.text
        [change] = r.json()["changes"]
        assert change["name"] == "reg" and change["to_version"] == "2" and change["error"] is None
        assert server.models()["reg"]["version"] == "2"
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=TIMEOUT)
    assert results and all(status == 200 for _, _, status, _ in results), [
        body for _, _, status, body in results if status != 200
    ][:3]
    for started, i, _, body in results:
        assert body["version"] in ("1", "2")
        assert_same(
            body["outputs"], [server.expected["shapes" if body["version"] == "1" else "circles"][i]]
        )
        if started > switched:
            assert body["version"] == "2"
    versions = {body["version"] for *_, body in results}
    assert versions == {"1", "2"}


def test_a_rollback_is_followed_within_the_poll_interval(server):
    from sav_ray.tracking.registry import rollback

    assert server.models()["reg"]["version"] == "2"
    rollback(REGISTERED, "production", uri=server.mlflow_uri)
    deadline = time.monotonic() + 20
    while server.models()["reg"]["version"] != "1":
        assert time.monotonic() < deadline, "the poller did not follow the alias"
        time.sleep(0.3)
    body = server.classify("reg", [4]).json()
    assert body["version"] == "1"
    assert_same(body["outputs"], [server.expected["shapes"][4]])


# --- a text LLM as base model: a second application on the same Serve instance ---------------


def test_a_text_llm_server_classifies_text_and_refuses_images(server, tiny_model, tmp_path):
    """Its own Classifier (one base model per application): the tiny Qwen2 text LLM, with a SAV
    fitted in process; answers equal `predict_examples`; an image is a 422 naming the field."""
    from ray import serve

    from sav_ray.core.capture import capture_examples
    from sav_ray.core.classify import predict_examples
    from sav_ray.core.prompts import Example, PromptConfig
    from sav_ray.fixtures.demo_data import make_text_dataset
    from serve.app import application
    from serve.schemas import AppConfig

    lm = tiny_model("qwen2")
    data = make_text_dataset(tmp_path / "data", train_per_class=8, test_per_class=3)
    train, test = (
        [json.loads(line) for line in data[split].read_text().splitlines()]
        for split in ("train", "test")
    )
    vectors = capture_examples(lm, [Example(r["question"], []) for r in train], PromptConfig())
    labels = [r["label"] for r in train]
    artifact = fit_artifact(lm, vectors, labels, range(lm.info.num_layers), 6, tmp_path / "sav")
    expected = predict_examples(lm, artifact, [Example(r["question"], []) for r in test])

    config = AppConfig(
        models=[{"name": "intent", "ref": str(tmp_path / "sav")}],
        poll_interval_s=0,
        token_env="SAV_TEXT_TEST_TOKEN_UNSET",
    )
    quarter = {"ray_actor_options": {"num_cpus": 0.25}}
    serve.run(
        application(
            config, classifier_options={"num_replicas": 1, **quarter}, ingress_options=quarter
        ),
        name="text",
        route_prefix="/text",
    )
    try:
        url = f"{server.url}/text/v1/classify"
        inputs = [{"text": r["question"]} for r in test]
        r = requests.post(url, json={"model": "intent", "inputs": inputs}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert_same(r.json()["outputs"], [p.to_dict() for p in expected])
        image = {"text": "cat?", "images": [server.images[0]]}
        r = requests.post(
            url, json={"model": "intent", "inputs": [inputs[0], image]}, timeout=TIMEOUT
        )
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith("inputs[1].images: the base model ")
        assert "takes text only" in r.json()["detail"]
    finally:
        serve.delete("text")


# --- last: a replica dies -----------------------------------------------------------------------


def test_a_killed_classifier_replica_is_replaced_and_every_request_gets_an_answer(server):
    import ray
    from ray import serve

    before = server.get("/v1/stats").json()["classifier"]["replica"]
    [actor] = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Classifier" in a["name"] and "REPLICA" in a["name"]
    ]
    rng = np.random.default_rng(1)
    jobs = [
        (str(rng.choice(["shapes", "circles"])), [int(i) for i in rng.integers(30, size=4)])
        for _ in range(120)
    ]

    def call(job):
        started = time.monotonic()
        r = server.classify(*job)
        return started, time.monotonic(), r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(call, job) for job in jobs]
        deadline = time.monotonic() + 30
        # killed while calls are inside it: the Ingress decodes and encodes inputs, so under
        # load the replica is not always busy, and a kill between batches strands nothing
        while server.get("/v1/stats").json()["classifier"]["in_flight"] < 4:
            assert time.monotonic() < deadline, "the classifier never had 4 calls in flight"
        killed = time.monotonic()
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        results = [f.result(timeout=2 * TIMEOUT) for f in futures]

    assert any(start < killed < end for start, end, *_ in results), "the kill was not under load"
    answered = 0
    for (model, rows), (_, _, status, body) in zip(jobs, results, strict=True):
        if status == 200:
            assert_same(body["outputs"], [server.expected[model][i] for i in rows])
            answered += 1
        else:
            assert status in (503, 504), body
    assert answered > 0

    deadline = time.monotonic() + 90
    while True:
        status = serve.status().applications["sav"].deployments["Classifier"]
        stats = server.get("/v1/stats")
        if status.status == "HEALTHY" and stats.status_code == 200:
            if stats.json()["classifier"]["replica"] != before:
                break
        assert time.monotonic() < deadline, "no new classifier replica"
        time.sleep(0.5)
    assert stats.json()["ingress"]["classifier_retries"] > 0  # in-flight calls were retried
    r = server.classify("circles", [5])
    assert r.status_code == 200
    assert_same(r.json()["outputs"], [server.expected["circles"][5]])
