"""The server under hostile input: a real `serve.run` on 127.0.0.1 with a bearer token, a
`file://` allowlist and a URL allowlist pointing at a local upstream (an HTTP server on
127.0.0.1 that this module starts and stops). Each finding of the hostile-input review is
reproduced: URL allowlist bypasses, control characters, a slow upstream, large 16-bit images
and the routes answered without the token; after each, a good request still gets the right
answer. Every HTTP call is bounded by TIMEOUT; the drip upstream stops when the module ends.
"""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from sav_ray.bench.serving import png_16_bit
from sav_ray.core.classify import predict_examples
from sav_ray.core.prompts import Example

pytestmark = pytest.mark.slow

TOKEN = "hostile-token-8c1d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION = "What is in the image?"
TIMEOUT = 60
URL_DEADLINE_S = 2.0


class Server:
    def __init__(self, url, upstream, folder, image_b64, expected):
        self.url, self.upstream, self.folder = url, upstream, folder
        self.image_b64, self.expected = image_b64, expected

    def post(self, body, headers=AUTH):
        return requests.post(self.url + "/v1/classify", json=body, headers=headers, timeout=TIMEOUT)

    def one(self, image, text=QUESTION, model="shapes"):
        return self.post({"model": model, "inputs": [{"text": text, "images": [image]}]})

    def assert_good_request_answers(self):
        r = self.one(self.image_b64)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["votes"] == self.expected


@pytest.fixture(scope="module")
def server(local_ray, demo_sav, demo_data, tmp_path_factory, serve_on_loopback, loopback_http):
    from ray import serve

    from serve.schemas import AppConfig

    lm, artifact_dir, artifact = demo_sav
    image_path = sorted((demo_data["test"].parent / "images" / "test").glob("*.png"))[0]
    png = image_path.read_bytes()
    with Image.open(image_path) as img:
        expected = predict_examples(lm, artifact, [Example(QUESTION, [img.convert("RGB")])])
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "a.png").write_bytes(png)
    upstream = loopback_http(
        {
            "/ok/a.png": png,
            "/no/secret.png": png,
            "/ok/drip": loopback_http.drip(2**20),  # 64 bytes/s: 4.5 hours for 1 MB
            "/ok/drip-100mb": loopback_http.drip(100 * 2**20),
        }
    )
    config = AppConfig(
        models=[{"name": "shapes", "ref": str(artifact_dir)}],
        poll_interval_s=0,
        request_timeout_s=45,
        token_env="SAV_HOSTILE_TOKEN",
        fetch_workers=2,
        fetch_queue=8,
        pixel_budget=40_000_000,
        pixel_wait_s=1.0,
        limits={"max_image_pixels": 16_000_000, "max_request_pixels": 32_000_000},
        image_sources={
            "allowed_paths": [str(folder)],
            "allowed_url_prefixes": [f"{upstream.url}/ok/"],
            "url_timeout_s": 5,
            "url_deadline_s": URL_DEADLINE_S,
            "request_fetch_s": 4,
        },
    )
    url = serve_on_loopback(config, "SAV_HOSTILE_TOKEN", TOKEN)
    yield Server(
        url,
        upstream,
        folder,
        base64.b64encode(png).decode(),
        expected[0].votes,
    )
    serve.shutdown()
    upstream.close()


def test_url_bypasses_are_refused_alike_whether_or_not_the_target_exists(server):
    up = server.upstream.url
    r = server.one(f"{up}/ok/a.png")  # allowed: fetched, and classified as the base64 image
    assert r.status_code == 200 and r.json()["outputs"][0]["votes"] == server.expected
    asked = len(server.upstream.paths)
    for target in ("secret.png", "missing.png"):
        answers = set()
        for attack in (
            f"{up}/ok/../no/{target}",
            f"{up}/ok/%2e%2e/no/{target}",
            f"{up}/ok/%2E%2E/no/{target}",
            f"{up}/ok/..%2fno/{target}",
            f"{up}/ok/..%2Fno%2F{target}",
            f"{up}/ok/.%2e/no/{target}",
            f"{up}/no/{target}",
            f"{up}/okno/{target}",
            f"http://x@{up.removeprefix('http://')}/ok/../no/{target}",
        ):
            r = server.one(attack)
            assert r.status_code == 400, (attack, r.text)
            detail = r.json()["detail"]
            assert detail.startswith("inputs[0].images[0]: this URL is not accepted: ")
            answers.add((attack.replace(target, "T"), detail))
        if target == "secret.png":
            secret_answers = answers
    assert secret_answers == answers  # the same answers, whether the file exists or not
    assert len(server.upstream.paths) == asked  # and nothing was asked of the upstream
    server.assert_good_request_answers()


@pytest.mark.parametrize(
    "where, value",
    [
        ("image", "file:///etc/passwd\u0000"),
        ("image", "FOLDER/a.png\u0000"),
        ("image", "UP/ok/a.png\u0000"),
        ("image", "UP/ok/a .png"),
        ("image", "UP/ok/a.png\r\nX-Injected: 1"),
        ("text", "what\u0000 is it?"),
        ("model", "shapes\u0000"),
    ],
)
def test_control_characters_get_400_naming_the_field(server, where, value):
    value = value.replace("FOLDER", f"file://{server.folder}").replace("UP", server.upstream.url)
    body = {"model": "shapes", "inputs": [{"text": QUESTION, "images": [server.image_b64]}]}
    field = {"image": "inputs[0].images[0]", "text": "inputs[0].text", "model": "model"}[where]
    if where == "image":
        body["inputs"][0]["images"] = [value]
    elif where == "text":
        body["inputs"][0]["text"] = value
    else:
        body["model"] = value
    r = server.post(body)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith(f"{field}: ")
    server.assert_good_request_answers()


HOSTILE = [
    "\u0000",
    "a\u0000b",
    "\r\n\r\n",
    "\u001b[31m",
    "\u202e\ufeff",
    "../../../../etc/passwd",
    "file:///etc/passwd",
    "file:///etc/passwd\u0000.png",
    "file://FOLDER/../../etc/passwd",
    "file://FOLDER/%2e%2e/a.png",
    "file://FOLDER/a.png/",
    "file://FOLDER",
    "UP/ok/../no/secret.png",
    "UP/ok/%2e%2e%2fno%2fsecret.png",
    "UP/ok/a.png#\u0000",
    "UP/ok/%00",
    "http://[::1/ok/a.png",
    "http://127.0.0.1:0/ok/a.png",
    "http://:80/ok/a.png",
    "https://UPHOST/ok/a.png",
    "data:image/png;base64,\u0000",
    "data:,",
    "<image>" * 10,
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    "x" * 5000,
]


def test_hostile_strings_in_every_field_get_no_5xx(server):
    base = {"model": "shapes", "inputs": [{"text": QUESTION, "images": [server.image_b64]}]}
    statuses = []
    for raw in HOSTILE:
        value = (
            raw.replace("FOLDER", str(server.folder))
            .replace("UPHOST", server.upstream.url.removeprefix("http://"))
            .replace("UP", server.upstream.url)
        )
        for field in ("model", "text", "image", "video"):
            body = {"model": base["model"], "inputs": [dict(base["inputs"][0])]}
            if field == "model":
                body["model"] = value
            elif field == "image":
                body["inputs"][0]["images"] = [value]
            else:
                body["inputs"][0][field] = value
            r = server.post(body)
            statuses.append(r.status_code)
            assert r.status_code < 500, (field, raw, r.status_code, r.text[:300])
            assert r.json()["detail"] if r.status_code >= 400 else True
        r = requests.post(
            server.url + "/v1/models/reload", params={"model": value}, headers=AUTH, timeout=TIMEOUT
        )
        assert r.status_code < 500, (raw, r.text[:300])
    assert {400, 404} <= set(statuses)
    server.assert_good_request_answers()


def test_a_slow_upstream_delays_only_its_own_requests(server):
    drip = f"{server.upstream.url}/ok/drip"
    started = time.monotonic()
    r = server.one(f"{drip}-100mb")  # over max_image_bytes: refused from its Content-Length
    assert r.status_code == 413 and "Content-Length is 104857600 bytes" in r.text
    r = server.one(drip)  # 1 MB at 64 bytes/s would take 4.5 hours
    assert r.status_code == 400 and f"did not finish within {URL_DEADLINE_S:g} s" in r.text
    assert time.monotonic() - started < URL_DEADLINE_S + 10

    with ThreadPoolExecutor(16) as pool:
        drips = [pool.submit(server.one, drip) for _ in range(8)]
        time.sleep(1.0)  # the eight are in the Ingress: two fetching, six queued
        t0 = time.monotonic()
        server.assert_good_request_answers()
        base64_seconds = time.monotonic() - t0
        extra = [pool.submit(server.one, drip) for _ in range(6)]  # past workers + queue
        answers = [f.result() for f in drips + extra]
    assert base64_seconds < 5, base64_seconds
    codes = [a.status_code for a in answers]
    assert set(codes) <= {400, 503}, codes
    refused = [a for a in answers if a.status_code == 503]
    assert refused and all(a.headers["Retry-After"].isdigit() for a in refused), codes
    assert all("busy" in a.json()["detail"] for a in refused)
    stats = requests.get(server.url + "/v1/stats", headers=AUTH, timeout=TIMEOUT).json()
    assert stats["ingress"]["fetch_pool"]["refused"] >= len(refused)
    assert stats["ingress"]["fetch_pool"]["admitted"] == 0
    server.assert_good_request_answers()


def test_large_16_bit_images_stay_within_the_pixel_budget(server):
    """Eight parallel requests of two 16-bit 4000 x 4000 PNGs (32 M pixels each, the request
    limit) against a budget of 40 M pixels in flight: each request waits for the budget or
    gets 503 with Retry-After; none fails otherwise, and the budget is never exceeded."""
    image = png_16_bit(4000, 4000)
    body = {"model": "shapes", "inputs": [{"text": QUESTION, "images": [image, image]}]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.post(body), range(8)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503} and 200 in codes, [a.text[:200] for a in answers]
    for a in answers:
        if a.status_code == 503:
            assert a.headers["Retry-After"].isdigit() and "pixels" in a.json()["detail"]
    stats = requests.get(server.url + "/v1/stats", headers=AUTH, timeout=TIMEOUT).json()
    pixels = stats["ingress"]["pixels"]
    assert 32_000_000 <= pixels["peak"] <= pixels["pixels"] == 40_000_000
    assert pixels["used"] == 0 and pixels["refused"] == codes.count(503)
    server.assert_good_request_answers()


def test_only_ray_serves_own_two_routes_answer_without_the_token(server):
    """The application's routes all need the token but /healthz; Ray Serve's HTTP proxy
    answers /-/healthz and /-/routes itself, before any application code (README: Serving)."""
    for path in ("/v1/models", "/v1/stats", "/openapi.json", "/docs"):
        r = requests.get(server.url + path, timeout=TIMEOUT)
        assert r.status_code == 401, path
    r = requests.post(server.url + "/v1/models/reload", timeout=TIMEOUT)
    assert r.status_code == 401
    assert (
        server.post({"model": "shapes", "inputs": [{"text": "a"}]}, headers={}).status_code == 401
    )
    assert requests.get(server.url + "/healthz", timeout=TIMEOUT).status_code == 200
    proxy_health = requests.get(server.url + "/-/healthz", timeout=TIMEOUT)
    assert proxy_health.status_code == 200 and proxy_health.text == "success"
    routes = requests.get(server.url + "/-/routes", timeout=TIMEOUT)
    assert routes.status_code == 200 and routes.json() == {"/": "sav"}
    server.assert_good_request_answers()
