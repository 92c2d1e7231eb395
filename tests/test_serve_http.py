"""The HTTP layer of serve/app.py without Ray: the token and body-size guard, and how request
validation errors become 400, 413 or 422. Requests are sent straight to the ASGI app.

No `from __future__ import annotations` here (nor in serve/app.py): FastAPI must see the
request model built in `make_app` as a class, not as the string "ClassifyRequest".
"""

import asyncio
import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from sav_ray.serving.requests import RequestLimits
from serve.http_api import Guard, _validation_handler
from serve.schemas import AppConfig, classify_request_model

LIMITS = RequestLimits(max_body_bytes=2000, max_inputs=2, max_text_chars=10, max_image_bytes=30)
TOKEN = "s3cret"


def make_app(token: str | None = TOKEN) -> FastAPI:
    ClassifyRequest = classify_request_model(LIMITS)  # noqa: N806
    app = FastAPI()
    app.add_middleware(Guard, token=token, max_body_bytes=LIMITS.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_handler(LIMITS))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        return {"inputs": len(body.inputs)}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


def call(app, method, path, body=b"", headers=(), chunks=None):
    """(status, JSON body) of one request; `chunks` sends the body in parts without a length."""
    parts = list(chunks) if chunks is not None else [body]
    headers = [(k.lower().encode(), v.encode()) for k, v in headers]
    if chunks is None:
        headers.append((b"content-length", str(len(body)).encode()))
    sent = []

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1234),
    }
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


AUTH = [("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")]


def post(app, payload, headers=AUTH):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return call(app, "POST", "/v1/classify", body, headers)


@pytest.mark.parametrize(
    "payload, status, words",
    [
        ({"model": "m", "inputs": [{"text": "hi", "images": ["aGk="]}]}, 200, None),
        (b'{"model": "m", "inputs": [', 400, "not valid JSON at character"),
        (b"[" * 900 + b"]" * 900, 422, "body"),
        (b"\xff\xfe\x00", 400, "body"),
        (b'{"model": NaN}', 422, "model"),
        ({"model": "m", "inputs": "x"}, 422, "inputs: Input should be a valid list"),
        ({"model": "m", "inputs": [{"text": 3}]}, 422, "inputs[0].text"),
        ({"model": "m", "inputs": []}, 422, "inputs: List should have at least 1 item"),
        ({"model": "m", "inputs": [{"text": "a"}], "x": 1}, 422, "x: Extra inputs"),
        ({"model": "m", "inputs": [{"text": "a"}] * 3}, 413, "inputs: List should have at most 2"),
        ({"model": "m", "inputs": [{"text": "a" * 11}]}, 413, "inputs[0].text"),
        ({"model": "m", "inputs": [{"images": ["A" * 400]}]}, 413, "base64 of at most 30 bytes"),
    ],
)
def test_validation_errors_map_to_400_413_or_422_naming_the_field(payload, status, words):
    got, body = post(make_app(), payload)
    assert got == status, body
    if words:
        assert words in body["detail"]


def test_every_route_but_health_needs_the_token():
    app = make_app()
    payload = {"model": "m", "inputs": [{"text": "a"}]}
    json_only = [("Content-Type", "application/json")]
    for headers in (json_only, [("Authorization", "Bearer wrong"), *json_only]):
        status, body = post(app, payload, headers)
        assert status == 401 and "bearer token" in body["detail"]
    assert post(app, payload, [("Authorization", f"bearer {TOKEN}"), *json_only])[0] == 200
    assert call(app, "GET", "/healthz")[0] == 200
    assert call(app, "GET", "/openapi.json")[0] == 401
    assert call(make_app(token=None), "GET", "/openapi.json")[0] == 200


def test_bodies_over_the_limit_are_refused_with_or_without_a_length():
    app = make_app()
    big = json.dumps({"model": "m", "inputs": [{"text": "a" * 3000}]}).encode()
    status, body = post(app, big)
    assert status == 413 and "over the limit of 2000 bytes" in body["detail"]
    status, body = call(app, "POST", "/v1/classify", headers=AUTH, chunks=[big[:1500], big[1500:]])
    assert status == 413 and "request body" in body["detail"]
    status, _ = call(
        app, "POST", "/v1/classify", headers=AUTH, chunks=[b'{"model": "m", ', b'"inputs": [{}]}']
    )
    assert status == 200


def test_app_config_names_the_wrong_key():
    with pytest.raises(ValueError, match="limits.max_inputz"):
        AppConfig.model_validate(
            {"models": [{"name": "m", "ref": "/a"}], "limits": {"max_inputz": 3}}
        )
    with pytest.raises(ValueError, match="repeated"):
        AppConfig.model_validate(
            {"models": [{"name": "m", "ref": "/a"}, {"name": "m", "ref": "/b"}]}
        )
    with pytest.raises(ValueError, match="name"):
        AppConfig.model_validate({"models": [{"name": "a/b", "ref": "/a"}]})


def test_the_shipped_config_is_valid():
    import yaml

    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    [app] = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    cfg = AppConfig.model_validate(app["args"])
    assert cfg.limits == RequestLimits()  # the file states the defaults
    deployments = {d["name"] for d in app["deployments"]}
    assert deployments == {"Classifier", "Ingress"}
