"""The serving rows of the benchmark: Ray Serve latency and throughput (see `sav_ray/bench/rows.py`).

A closed-loop load generator on 127.0.0.1 against the real Serve app (`serve/app.py`), deployed
twice side by side, with dynamic batching and with `max_batch_size=1`. The load tests run in
rounds, the two deployments back to back in alternating order at each client count, so every
figure has a spread over rounds; the HTTP + voting overhead is paired with the bare forward.
Wall time only: the work is spread over the Serve processes. Then `peak_memory` sends parallel
requests of large 16-bit images to the batched deployment and reads each process's peak
resident memory from /v1/stats.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sav_ray.bench.rows import NO_TARGET, Row, Spread, Timings, median, spread_fields, timed_rounds
from sav_ray.core.artifact import SavArtifact, load_artifact, write_artifact
from sav_ray.core.capture import capture_examples
from sav_ray.core.classify import needed_layers
from sav_ray.core.models import LoadedModel
from sav_ray.core.prompts import Example

# 6. Serving ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    clients: int
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    requests_per_s: float

    def to_dict(self) -> dict[str, float]:
        return dict(vars(self))


def load_test(send: Callable[[], None], clients: int, requests: int, warmup: int = 2) -> LoadResult:
    """`clients` threads send `requests` requests in all, each waiting for its answer before the
    next (closed loop); latency percentiles over all of them, rate over the wall time."""
    for _ in range(warmup):
        send()
    latencies: list[float] = []
    errors, remaining = 0, requests
    lock = threading.Lock()

    def client() -> None:
        nonlocal errors, remaining
        while True:
            with lock:
                if remaining == 0:
                    return
                remaining -= 1
            start = time.perf_counter()
            try:
                send()
            except Exception:
                with lock:
                    errors += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1e3 if latencies else np.array([math.nan])
    return LoadResult(
        clients=clients,
        requests=requests,
        errors=errors,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        requests_per_s=len(latencies) / wall,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


CONFIGS = {"batched": "batched", "max_batch_size=1": "unbatched"}  # table name: app name


def serving(
    artifact_dir: Path,
    lm: LoadedModel,
    example: Example,
    *,
    dtype: str,
    device: str,
    threads: int,
    clients: Sequence[int],
    requests: dict[int, int],
    rounds: int,
    overhead_reps: int,
    max_batch_size: int = 16,
    memory_requests: tuple[int, int] = (8, 4000),
) -> tuple[list[Row], list[dict[str, Any]]]:
    """Serve the artifact with `serve/app.py` on 127.0.0.1 (a free port) twice, with dynamic
    batching and with max_batch_size=1; load both in `rounds` rounds of 1, 8, 16 closed-loop
    clients, and compare one client's latency with the bare early-exit forward pass in this
    process. Stops the applications and Serve at the end."""
    import requests as http
    from ray import serve

    from serve.app import application
    from serve.schemas import AppConfig

    artifact = load_artifact(artifact_dir, expect=lm.info)
    layers = needed_layers(artifact)
    inputs = [{"text": example.text, "images": [_png_base64(example.images[0])]}]
    body = json.dumps({"model": "bench", "inputs": inputs})
    others = sibling_artifacts(artifact, artifact_dir.parent / "bench_siblings", 3)
    body_four = json.dumps({"models": ["bench", *others], "inputs": inputs})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    local = threading.local()

    def sender(app: str, data: str = body) -> Callable[[], None]:
        def send() -> None:
            if not hasattr(local, "session"):
                local.session = http.Session()  # keep-alive, as a real client would
            reply = local.session.post(
                f"{url}/{app}/v1/classify",
                data=data,
                headers={"Content-Type": "application/json"},
                timeout=300,
            )
            reply.raise_for_status()

        return send

    def bare() -> None:
        capture_examples(lm, [example], artifact.prompt, layers, early_exit=True)

    # Both deployments live at once (only one is loaded at a time), so their logical shares
    # must fit together: half a GPU each on a GPU, half a CPU each on 2 CPUs.
    gpus = 0.5 if device.startswith("cuda") else 0
    send = {name: sender(app) for name, app in CONFIGS.items()}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for name, app in CONFIGS.items():
            config = AppConfig(
                models=[
                    {"name": "bench", "ref": str(artifact_dir)},
                    *({"name": name, "ref": str(ref)} for name, ref in others.items()),
                ],
                dtype=dtype,
                device=device,
                torch_threads=threads,
                poll_interval_s=0,
                request_timeout_s=300,
                max_batch_size=max_batch_size if name == "batched" else 1,
            )
            serve.run(
                application(
                    config,
                    classifier_options={
                        "num_replicas": 1,
                        "max_ongoing_requests": max(32, 2 * max(clients)),
                        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": gpus},
                    },
                    ingress_options={"ray_actor_options": {"num_cpus": 0.25}},
                ),
                name=app,
                route_prefix=f"/{app}",
            )
            _wait_healthy(f"{url}/{app}")
        before = http.get(f"{url}/{CONFIGS['max_batch_size=1']}/v1/stats", timeout=300).json()
        one_client = timed_rounds(
            {"http": send["max_batch_size=1"], "bare": bare},
            overhead_reps,
            warmup=2,
            device=lm.input_device,
        )
        after = http.get(f"{url}/{CONFIGS['max_batch_size=1']}/v1/stats", timeout=300).json()
        batched = CONFIGS["batched"]
        four_one = timed_rounds(
            {"four": sender(batched, body_four), "one": send["batched"]},
            overhead_reps,
            warmup=2,
        )
        top = max(clients)
        four_one_load = load_rounds(
            {"four": sender(batched, body_four), "one": send["batched"]},
            [top],
            requests,
            rounds,
        )
        results = load_rounds(send, clients, requests, rounds)
        memory = peak_memory(f"{url}/{CONFIGS['batched']}", *memory_requests)
        for app in CONFIGS.values():
            serve.delete(app)
    finally:
        serve.shutdown()

    table = [
        {"config": name, "clients": n, **summarise(results[name, n])}
        for name in CONFIGS
        for n in clients
    ]
    http_ms = 1e3 * median(one_client.wall["http"])
    bare_ms = 1e3 * median(one_client.wall["bare"])
    shares = Spread.of([1 - r for r in one_client.ratios("bare", "http", "wall")])
    where = time_per_input(before, after)
    gains = Spread.of(
        [
            b.requests_per_s / u.requests_per_s
            for b, u in zip(results["batched", top], results["max_batch_size=1", top], strict=True)
        ]
    )
    by = {(r["config"], r["clients"]): r for r in table}
    rows = [
        Row(
            key="serving_overhead",
            title="Serving: HTTP + voting overhead over the bare forward, share of p50 at 1 client",
            **spread_fields(shares, "wall", "back-to-back pairs' shares (1 - bare / http)"),
            op="<=",
            threshold=0.10,
            measured={
                "http_ms_p50": http_ms,
                "bare_forward_ms_p50": bare_ms,
                "overhead_ms": http_ms - bare_ms,
                "batched_http_ms_p50": by["batched", 1]["p50_ms"],
                "reps": overhead_reps,
                **where,
                "http_and_proxy_ms": http_ms - where["ingress_request_ms"],
            },
            note=(
                "one input per request (base64 PNG), max_batch_size=1, each request back to back "
                "with the same early-exit forward run in the benchmark process; the overhead is "
                "JSON and base64 decoding, the Serve proxy, ingress and classifier hops, and "
                "voting. Where a request's time goes, per input from the server's own counters "
                "(/v1/stats, `time_per_input`): the Ingress decoding the image and running the "
                "processor, the actor hop to the classifier and back, the classifier's wait for "
                "its batch and model lock, its forward pass and voting, the rest of the Ingress "
                "handler, and what is left of the client's latency: HTTP and the Serve proxy. batched_http_ms_p50: one client of the batched deployment, whose wait "
                "for more requests (batch_wait_timeout_s) adds to a lone request's latency"
            ),
            if_missed=(
                f"{http_ms - bare_ms:.0f} ms per request for JSON and base64/PNG decoding, the "
                "proxy -> ingress -> classifier actor hops and voting, against a "
                f"{bare_ms:.0f} ms forward of this small model; on 2 shared CPUs the Serve actors "
                "also compete with the forward for cores. The share falls where the forward is "
                "longer (a 7B model, real image tokens)"
            ),
        ),
        Row(
            key="serving_batching",
            title=f"Serving: req/s with batching / max_batch_size=1 at {top} clients",
            **spread_fields(gains, "wall", "rounds' ratios (the two load tests back to back)"),
            op=NO_TARGET,
            threshold=math.nan,
            measured={
                f"batched_rps_{top}": by["batched", top]["requests_per_s"],
                f"unbatched_rps_{top}": by["max_batch_size=1", top]["requests_per_s"],
                f"batched_p95_ms_{top}": by["batched", top]["p95_ms"],
                f"unbatched_p95_ms_{top}": by["max_batch_size=1", top]["p95_ms"],
                "rounds": rounds,
            },
            note=(
                f"closed-loop clients, one classifier replica per deployment, {requests[top]} "
                "requests per load test. Batching must pay under load (> 1), but this row gives "
                "no verdict: on a shared 2-core CPU two full runs disagreed by far more than "
                "their spreads (the rounds of one run do not capture how the two deployments' "
                "share of the cores varies from run to run)"
            ),
        ),
        many_models_row(four_one, four_one_load, top, len(others) + 1),
        memory,
    ]
    return rows, table


def many_models_row(
    t: Timings, load: dict[tuple[str, int], list[LoadResult]], clients: int, n: int
) -> Row:
    """p50 latency of one request naming `n` classifiers over one naming 1 (1 client, back to
    back pairs), with both sides' throughput at `clients` clients."""
    ratios = Spread.of(t.ratios("four", "one", "wall"))
    four, one = summarise(load["four", clients]), summarise(load["one", clients])
    return Row(
        key="serving_many_models",
        title=f"Serving: p50 latency of a request naming {n} classifiers / naming 1",
        **spread_fields(ratios, "wall", "back-to-back pairs' ratios at 1 client"),
        op="<=",
        threshold=1.2,
        measured={
            "four_ms_p50": 1e3 * median(t.wall["four"]),
            "one_ms_p50": 1e3 * median(t.wall["one"]),
            f"four_rps_{clients}": four["requests_per_s"],
            f"one_rps_{clients}": one["requests_per_s"],
            f"four_p95_ms_{clients}": four["p95_ms"],
            f"one_p95_ms_{clients}": one["p95_ms"],
            "reps": len(t.wall["four"]),
        },
        note=(
            f"the batched deployment serving the benchmark artifact and {n - 1} others on the "
            "same base model (heads drawn from the same layers); one input per request, one "
            f"forward pass for all {n} (the union of their heads); throughput with {clients} "
            "closed-loop clients, the two request kinds' load tests back to back"
        ),
        if_missed=(
            f"each extra classifier adds its own gather and vote, and {n} results to encode "
            "as JSON; the forward pass is shared"
        ),
    )


def sibling_artifacts(artifact: SavArtifact, folder: Path, n: int) -> dict[str, Path]:
    """`n` artifacts on the same base model as `artifact`, written under `folder`: the same
    labels and k, heads drawn at random from the layers `artifact` reads (so a request naming
    them all runs no deeper), random centroids. For timing only."""
    rng = np.random.default_rng(0)
    layers = sorted({int(layer) for layer, _ in artifact.heads})
    pairs = np.array([(la, h) for la in layers for h in range(artifact.base_model.num_heads)])
    k = min(len(artifact.heads), len(pairs))
    out = {}
    for i in range(n):
        heads = pairs[np.sort(rng.choice(len(pairs), k, replace=False))]  # [k, 2]
        centroids = rng.standard_normal((len(artifact.labels), k, artifact.base_model.head_dim))
        sibling = dataclasses.replace(
            artifact,
            heads=heads.astype(np.int64),
            centroids=centroids.astype(np.float32),  # [C, k, D]
            head_scores=None,
            selection=dataclasses.replace(artifact.selection, k=k, scores=[0.0] * k),
        )
        out[f"sibling{i + 1}"] = folder / f"sibling{i + 1}"
        write_artifact(sibling, out[f"sibling{i + 1}"], overwrite=True)
    return out


def time_per_input(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Where a request of one input spends its time, in milliseconds per input between two
    /v1/stats answers, from the server's own clocks: the Ingress decoding and running the
    processor, the hop to the classifier and back, the classifier's wait for its batch and its
    model lock, its forward pass and voting, and the rest of the Ingress's handler (FastAPI,
    validation, JSON). What the client sees beyond `ingress_request_ms` is HTTP and the proxy."""
    n = max(after["classifier"]["inputs"] - before["classifier"]["inputs"], 1)

    def ms(side: str, part: str) -> float:
        spent = after[side]["seconds"].get(part, 0.0) - before[side]["seconds"].get(part, 0.0)
        return 1e3 * spent / n

    call, in_replica = ms("ingress", "classifier_calls"), ms("classifier", "calls")
    forward, vote = ms("classifier", "forward"), ms("classifier", "vote")
    decode, encode = ms("ingress", "decode"), ms("ingress", "encode")
    return {
        "ingress_decode_ms": decode,
        "ingress_encode_ms": encode,
        "hop_to_classifier_ms": call - in_replica,
        "classifier_wait_ms": in_replica - forward - vote,
        "classifier_forward_ms": forward,
        "classifier_vote_ms": vote,
        "ingress_other_ms": ms("ingress", "requests") - decode - encode - call,
        "ingress_request_ms": ms("ingress", "requests"),
    }


def png_16_bit(width: int, height: int) -> str:
    """A 16-bit greyscale gradient PNG, base64; small (it compresses well) for its pixels."""
    levels = (np.add.outer(np.arange(height) * 7, np.arange(width) * 16) % 65536).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")  # mode I;16
    return base64.b64encode(buffer.getvalue()).decode()


def peak_memory(url: str, parallel: int, side: int) -> Row:
    """`parallel` requests at once, each two 16-bit `side` x `side` PNGs (2 x 16 M pixels at
    4000: the default max_request_pixels), against an application with the default limits;
    the peak RSS of its Ingress and Classifier replica (/v1/stats) after them."""
    import requests as http

    image = png_16_bit(side, side)
    body = json.dumps(
        {"model": "bench", "inputs": [{"text": "What is in the image?", "images": [image] * 2}]}
    )
    before = http.get(f"{url}/v1/stats", timeout=300).json()

    def send(_: int) -> int:
        headers = {"Content-Type": "application/json"}
        return http.post(f"{url}/v1/classify", data=body, headers=headers, timeout=600).status_code

    with ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(send, range(parallel)))
    after = http.get(f"{url}/v1/stats", timeout=300).json()
    ingress, classifier = after["ingress"]["peak_rss_mb"], after["classifier"]["peak_rss_mb"]
    return Row(
        key="serving_peak_rss",
        title=(
            f"Serving: peak RSS (GiB) of the Ingress and of the Classifier replica, {parallel} "
            f"parallel requests of two 16-bit {side}x{side} PNGs"
        ),
        value=max(ingress, classifier) / 1024,
        op="<=",
        threshold=1.5,
        measured={
            "ingress_peak_mib_before": before["ingress"]["peak_rss_mb"],
            "ingress_peak_mib": ingress,
            "classifier_peak_mib_before": before["classifier"]["peak_rss_mb"],
            "classifier_peak_mib": classifier,
            "answered_200": codes.count(200),
            "answered_503": codes.count(503),
            "pixels_in_flight_peak": after["ingress"]["pixels"]["peak"],
            "pixel_budget": after["ingress"]["pixels"]["pixels"],
        },
        note=(
            "each process's peak resident memory since it started (ru_maxrss, through "
            "/v1/stats), after the load tests and these requests; the default limits and pixel "
            "budget; a 503 is a request the pixel budget turned away (Retry-After)"
        ),
        if_missed=(
            f"Ingress {ingress:.0f} MiB, Classifier {classifier:.0f} MiB: decoded images held at "
            "once (pixel_budget) or copies made while decoding or preprocessing them"
        ),
    )


def load_rounds(
    send: dict[str, Callable[[], None]],
    clients: Sequence[int],
    requests: dict[int, int],
    rounds: int,
) -> dict[tuple[str, int], list[LoadResult]]:
    """{(config, clients): [one LoadResult per round]}: in each round, at each client count, the
    configs' load tests back to back, in an order that alternates from one test to the next."""
    results: dict[tuple[str, int], list[LoadResult]] = {(c, n): [] for c in send for n in clients}
    names = list(send)
    for r in range(rounds):
        for i, n in enumerate(clients):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                results[name, n].append(load_test(send[name], n, requests[n], warmup=1))
    return results


def summarise(results: Sequence[LoadResult]) -> dict[str, float]:
    """One line of the serving table: medians over rounds, and the spread of req/s."""
    rps = Spread.of([r.requests_per_s for r in results])
    return {
        "p50_ms": median([r.p50_ms for r in results]),
        "p95_ms": median([r.p95_ms for r in results]),
        "requests_per_s": rps.median,
        "requests_per_s_q1": rps.q1,
        "requests_per_s_q3": rps.q3,
        "rounds": len(results),
        "requests": sum(r.requests for r in results),
        "errors": sum(r.errors for r in results),
    }


def _wait_healthy(url: str, timeout_s: float = 600) -> None:
    import requests as http

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except http.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Serve app at {url} did not become healthy in {timeout_s:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """The peak-memory row alone, on a fresh application with the default limits:

    python -m sav_ray.bench.serving --artifact data/demo/sav     # after `make demo`
    """
    import argparse

    import ray
    from ray import serve

    from serve.app import application
    from serve.schemas import AppConfig

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True, help="artifact folder to serve")
    p.add_argument("--parallel", type=int, default=8, help="requests at once (default 8)")
    p.add_argument("--side", type=int, default=4000, help="image side in pixels (default 4000)")
    args = p.parse_args(argv)

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}/memory"
    config = AppConfig(
        models=[{"name": "bench", "ref": str(Path(args.artifact).resolve())}],
        poll_interval_s=0,
        request_timeout_s=600,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            application(
                config,
                classifier_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                ingress_options={"ray_actor_options": {"num_cpus": 0.5}},
            ),
            name="memory",
            route_prefix="/memory",
        )
        _wait_healthy(url)
        row = peak_memory(url, args.parallel, args.side)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(json.dumps(row.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
