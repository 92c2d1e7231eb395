"""Where the model actors run: `auto` resolved against the cluster, requests it cannot meet
refused at once, and each actor's device taken from the GPUs Ray assigned it.

Driver side, after Ray starts and before the pipeline is built:

    map_batches(ExtractVectors, ..., **actor_pool(cfg))   # compute=, num_gpus=, num_cpus=

`--gpus-per-actor auto` is 1 when a node of the cluster has a GPU, else 0; `--actors auto` is
as many actors as the cluster's GPUs hold at that share (CPUs permitting), 1 on a CPU cluster.
Ray itself would wait forever for a request no node can meet ("No available node types can
fulfill resource request"), so `resolve` refuses it with a ConfigError naming the flag, what
was asked and what the cluster has; `--wait-for-resources S` first polls for up to S seconds
(and asks the autoscaler for the missing nodes).

Actor side: a GPU actor runs on `cuda`, the GPU Ray assigned it (Ray sets CUDA_VISIBLE_DEVICES
for it). Ray leaves CUDA_VISIBLE_DEVICES alone for an actor given no GPU, so a CPU actor hides
every GPU before torch initialises CUDA and runs on the CPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sav_ray.core.errors import ConfigError

if TYPE_CHECKING:
    from sav_ray.core.artifact import BaseModelInfo
    from sav_ray.core.models import LoadedModel
    from sav_ray.pipelines.config import ModelConfig

AUTO = "auto"
# CPUs the actors must leave free: Ray Data's read and decode tasks need one to run at all
# (an actor pool holding every CPU starves them and the pipeline hangs).
RESERVED_CPUS = 0.5
_EPS = 1e-9  # fractional shares (0.5 GPU) must not lose an actor to rounding

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeResources:
    """What one live node of the cluster offers."""

    name: str  # node IP
    cpus: float
    gpus: float


def describe_cluster(nodes: list[NodeResources]) -> str:
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    text = f"{len(nodes)} node{'s' * (len(nodes) != 1)}: {cpus:g} CPUs, {gpus:g} GPUs"
    if len(nodes) > 1:
        text += f" (at most {max(n.gpus for n in nodes):g} GPUs, "
        text += f"{max(n.cpus for n in nodes):g} CPUs on one node)"
    return text


def _fits(have: float, need: float) -> float:
    """How many shares of `need` fit in `have` (unbounded when nothing is needed)."""
    return math.inf if need <= 0 else math.floor(have / need + _EPS)


def resolve(
    actors: int | str,
    gpus_per_actor: float | str,
    cpus_per_actor: float,
    nodes: list[NodeResources],
    reserved_cpus: float = RESERVED_CPUS,
) -> tuple[int, float]:
    """(actors, GPUs per actor) for `auto` or given values on these nodes; ConfigError naming
    the flag when the cluster cannot run them."""
    if not nodes:
        raise ConfigError("the Ray cluster has no live nodes; start one (ray start) and retry")
    have = describe_cluster(nodes)
    max_gpus = max(n.gpus for n in nodes)
    gpus = (1.0 if max_gpus >= 1 else 0.0) if gpus_per_actor == AUTO else float(gpus_per_actor)
    cpus = float(cpus_per_actor)
    if gpus > max_gpus + _EPS:
        where = (
            "no node of the cluster has that many GPUs" if max_gpus else "the cluster has no GPU"
        )
        raise ConfigError(
            f"--gpus-per-actor {gpus:g}: {where} (cluster: {have}); use --gpus-per-actor auto "
            "or at most the GPUs of one node, or --wait-for-resources SECONDS on an autoscaling "
            "cluster"
        )
    if cpus > max(n.cpus for n in nodes) + _EPS:
        raise ConfigError(
            f"--cpus-per-actor {cpus:g}: no node of the cluster has that many CPUs "
            f"(cluster: {have}); lower --cpus-per-actor"
        )
    per_node = sum(min(_fits(n.gpus, gpus), _fits(n.cpus, cpus)) for n in nodes)
    total_gpus, total_cpus = sum(n.gpus for n in nodes), sum(n.cpus for n in nodes)
    free_cpus = total_cpus - reserved_cpus
    if actors == AUTO:
        n = min(per_node, _fits(free_cpus, cpus)) if gpus > 0 else 1
        flag = f"--actors auto ({n})"
    else:
        n, flag = int(actors), f"--actors {actors}"
    if n * gpus > total_gpus + _EPS:
        raise ConfigError(
            f"{flag} x --gpus-per-actor {gpus:g} = {n * gpus:g} GPUs, but the cluster has "
            f"{total_gpus:g} ({have}); use --actors auto or fewer actors"
        )
    if n < 1 or n * cpus > free_cpus + _EPS:
        raise ConfigError(
            f"{flag} x --cpus-per-actor {cpus:g} = {max(n, 1) * cpus:g} CPUs, but the cluster "
            f"has {total_cpus:g} and reading and decoding need {reserved_cpus:g} of them "
            f"({have}); lower --cpus-per-actor or --actors"
        )
    if n > per_node:
        raise ConfigError(
            f"{flag}: each actor needs {gpus:g} GPUs and {cpus:g} CPUs on one node, and the "
            f"cluster's nodes hold {per_node} such actors ({have}); use --actors auto"
        )
    return n, gpus


def choose_device(gpu_ids: list, cuda_available: bool) -> tuple[str, str | None]:
    """(device, warning) of an actor given `gpu_ids` by Ray: `cuda` is its own GPU, since Ray
    made only those visible; none assigned, or no CUDA in this process, is the CPU."""
    if not gpu_ids:
        return "cpu", None
    if cuda_available:
        return "cuda", None
    return "cpu", (
        f"Ray assigned GPU {gpu_ids} to this actor, but torch sees no CUDA device here "
        "(a CPU build of torch, or a GPU declared without CUDA); running on the CPU"
    )


def format_placements(placements: list[dict[str, Any]]) -> str:
    """'2 actors: GPU [0], GPU [1]' from the actors' placement records."""
    parts = []
    for p in placements:
        text = f"GPU {p['gpu_ids']}" if p["gpu_ids"] else "CPU"
        if p["gpu_ids"] and not str(p["device"]).startswith("cuda"):
            text += f" (ran on {p['device']})"
        parts.append(text)
    return f"{len(placements)} actor{'s' * (len(placements) != 1)}: {', '.join(parts)}"


# --- Ray ------------------------------------------------------------------------------------


def cluster_nodes() -> list[NodeResources]:
    import ray

    return [
        NodeResources(
            name=n["NodeManagerAddress"],
            cpus=float(n["Resources"].get("CPU", 0.0)),
            gpus=float(n["Resources"].get("GPU", 0.0)),
        )
        for n in ray.nodes()
        if n["Alive"]
    ]


def place(model: ModelConfig) -> ModelConfig:
    """`model` with `actors` and `gpus_per_actor` resolved on the live cluster. A request it
    cannot meet waits up to `wait_for_resources` seconds (asking the autoscaler for it), then
    raises the ConfigError."""
    deadline = time.monotonic() + model.wait_for_resources
    requested = False
    while True:
        try:
            actors, gpus = resolve(
                model.actors, model.gpus_per_actor, model.cpus_per_actor, cluster_nodes()
            )
            break
        except ConfigError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                if model.wait_for_resources:
                    raise ConfigError(
                        f"{e} (still so after --wait-for-resources {model.wait_for_resources:g})"
                    ) from None
                raise
            if not requested:
                _request_resources(model)
                requested = True
            time.sleep(min(2.0, left))
    if requested:
        _request_resources(None)  # the nodes came: withdraw the request
    return replace(model, actors=actors, gpus_per_actor=gpus)


def _request_resources(model: ModelConfig | None) -> None:
    """Ask an autoscaling cluster for the actors' nodes (None: withdraw the request); a
    cluster without an autoscaler ignores it."""
    from ray.autoscaler.sdk import request_resources

    if model is None:
        request_resources(bundles=[])
        return
    gpus = 1.0 if model.gpus_per_actor == AUTO else float(model.gpus_per_actor)
    bundle = {"CPU": float(model.cpus_per_actor), "GPU": gpus}
    count = 1 if model.actors == AUTO else int(model.actors)
    request_resources(bundles=[{k: v for k, v in bundle.items() if v > 0}] * count)


def actor_pool(model: ModelConfig) -> dict[str, Any]:
    """`map_batches` arguments for the model actors: `compute`, `num_gpus`, `num_cpus`."""
    import ray

    placed = place(model)
    return {
        "compute": ray.data.ActorPoolStrategy(size=placed.actors),
        "num_gpus": placed.gpus_per_actor,
        "num_cpus": placed.cpus_per_actor,
    }


def actor_placement() -> dict[str, Any]:
    """This process's placement `{node, pid, gpu_ids, device}`; call it before anything
    initialises CUDA. In a Ray actor: the GPUs Ray assigned it, and with none, every GPU
    hidden. Outside Ray actors (a driver, a test): cuda when visible, else cpu."""
    import ray
    import torch

    in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    if not in_actor:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return {"node": os.uname().nodename, "pid": os.getpid(), "gpu_ids": [], "device": device}
    gpu_ids = list(ray.get_gpu_ids())
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when torch initialises CUDA
    device, warning = choose_device(gpu_ids, bool(gpu_ids) and torch.cuda.is_available())
    if warning:
        logger.warning(warning)
    return {
        "node": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "gpu_ids": gpu_ids,
        "device": device,
    }


def load_actor_model(cfg: ModelConfig, expect: BaseModelInfo | None = None) -> LoadedModel:
    """Load the model inside a Ray actor, on the GPU Ray assigned it or on the CPU (a CPU actor
    never touches a GPU: `actor_placement`); torch threads match the actor's CPU share (so
    actors do not oversubscribe the node). Given `expect`, refuse a model it was not fitted on.
    The placement (node, pid, GPU ids, device) is recorded on the returned model."""
    import torch

    from sav_ray.core.models import load_model
    from sav_ray.pipelines.logs import quiet_progress_bars

    placement = actor_placement()  # before anything initialises CUDA
    quiet_progress_bars()  # one loading bar per actor would only clutter the job's output
    if cfg.cpus_per_actor >= 1:
        torch.set_num_threads(int(cfg.cpus_per_actor))
    on_gpu = placement["device"].startswith("cuda")
    lm = load_model(
        cfg.model,
        cfg.revision,
        dtype=cfg.dtype,
        device=placement["device"],
        device_map=cfg.device_map if on_gpu else None,  # accelerate's map over visible GPUs
    )
    if expect is not None:
        expect.check_compatible(lm.info)
    lm.placement = {**placement, "device": str(lm.input_device)}
    return lm
