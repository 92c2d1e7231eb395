"""A small client of the sav-ray HTTP API (standard library only), and a CLI that classifies a
manifest over HTTP and prints the accuracy:

    python -m serve.client --url http://127.0.0.1:8000 --model shapes --data data/demo/test.jsonl

The bearer token, when the server has one, is read from SAV_SERVE_TOKEN (or --token-env).
"""

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class ServerError(RuntimeError):
    """The server answered with an error status; the message has its status and detail."""


def request(
    url: str, path: str, body: Any = None, token: str | None = None, timeout: float = 120
) -> Any:
    """One JSON call: GET without a body, POST with one."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", "")
        except ValueError:
            detail = e.reason
        raise ServerError(f"{path}: HTTP {e.code}: {detail}") from None


def wait_ready(url: str, timeout: float = 300) -> None:
    """Wait until GET /healthz answers 200 (at least one model loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            request(url, "/healthz", timeout=5)
            return
        except (ServerError, OSError) as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout:.0f} s: {e}") from None
            time.sleep(1)


def classify_manifest(
    url: str,
    model: str,
    manifest: str | Path,
    *,
    token: str | None = None,
    per_request: int = 8,
    image_field: str = "image",
    text_field: str = "question",
    label_field: str = "label",
) -> list[dict[str, Any]]:
    """Classify every row of a manifest over HTTP; one record per row, in manifest order, with
    `label` (predicted), `votes`, `scores`, `true_label` (None without labels) and `version`."""
    from sav_ray.core.manifest import ManifestFields, read_manifest

    fields = ManifestFields.from_flags(image_field, text_field, label_field, None)
    rows = read_manifest(manifest, fields, require_label=False).to_pylist()
    records = []
    for start in range(0, len(rows), per_request):
        chunk = rows[start : start + per_request]
        inputs = [
            {
                "text": row["text"],
                "images": [base64.b64encode(Path(p).read_bytes()).decode() for p in row["images"]],
            }
            for row in chunk
        ]
        answer = request(url, "/v1/classify", {"model": model, "inputs": inputs}, token)
        for row, output in zip(chunk, answer["outputs"], strict=True):
            records.append({**output, "true_label": row["label"], "version": answer["version"]})
    return records


def accuracy(records: list[dict[str, Any]]) -> float | None:
    labelled = [r for r in records if r["true_label"] not in (None, "")]
    if not labelled:
        return None
    return sum(r["label"] == r["true_label"] for r in labelled) / len(labelled)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.client", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="a served model name (GET /v1/models)")
    p.add_argument("--data", required=True, help="manifest to classify (labels optional)")
    p.add_argument("--per-request", type=int, default=8, help="inputs per HTTP request")
    p.add_argument("--token-env", default="SAV_SERVE_TOKEN")
    p.add_argument("--image-field", default="image")
    p.add_argument("--text-field", default="question")
    p.add_argument("--label-field", default="label")
    args = p.parse_args(argv)
    try:
        records = classify_manifest(
            args.url,
            args.model,
            args.data,
            token=os.environ.get(args.token_env) or None,
            per_request=args.per_request,
            image_field=args.image_field,
            text_field=args.text_field,
            label_field=args.label_field,
        )
    except (ServerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    acc = accuracy(records)
    print(f"classified {len(records)} rows over HTTP with {args.model}")
    if acc is not None:
        print(f"accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
