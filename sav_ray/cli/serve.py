"""Serve one artifact on this machine, classify a manifest over HTTP, print the accuracy, stop.
The last step of `make demo`:

    python -m serve.local --ref data/demo/sav --data data/demo/data/test.jsonl

`--ref` is an artifact folder or models:/NAME@ALIAS. Ray is the cluster in RAY_ADDRESS, else a
local one. For a server that keeps running, use `serve run serve/config.yaml`.
"""

import socket
import sys

from sav_ray.cli import job_parser, parse_job_args
from sav_ray.core.errors import job_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@job_main
def main(argv: list[str] | None) -> int:
    p = job_parser("serve", __doc__)
    p.add_argument("--ref", required=True, help="artifact folder or models:/NAME@ALIAS")
    p.add_argument("--data", required=True, help="manifest to classify over HTTP")
    p.add_argument("--name", default="demo", help="the served model name")
    p.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: a free one)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for a models:/ reference")
    args = parse_job_args(p, argv)

    from ray import serve

    from sav_ray.pipelines.fitting import init_ray
    from sav_ray.pipelines.logs import quiet_serve_driver, serve_logging_config
    from serve.app import application
    from serve.client import accuracy, classify_manifest, wait_ready
    from serve.schemas import AppConfig

    quiet_serve_driver()
    config = AppConfig(
        models=[{"name": args.name, "ref": args.ref}],
        tracking_uri=args.tracking_uri,
        poll_interval_s=0,
    )
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    init_ray()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port}, logging_config=serve_logging_config()
    )
    try:
        serve.run(
            application(config, ingress_options={"ray_actor_options": {"num_cpus": 0.25}}),
            name="sav",
            route_prefix="/",
        )
        wait_ready(url)
        print(f"serving {args.ref} as {args.name!r} at {url}", flush=True)
        records = classify_manifest(url, args.name, args.data)
    finally:
        serve.shutdown()
    acc = accuracy(records)
    print(f"classified {len(records)} rows over HTTP")
    if acc is not None:
        print(f"accuracy over HTTP {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
