"""GPU placement: `auto` resolved against the cluster, requests it cannot meet refused with the
flag named, each actor on the GPU Ray assigned it, and an actor's error as one line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sav_ray.cli import fit as fit_job
from sav_ray.core.errors import ConfigError
from sav_ray.pipelines.config import FitConfig
from sav_ray.pipelines.placement import AUTO, NodeResources, choose_device, resolve

ROOT = Path(__file__).resolve().parents[1]

CPU_NODE = NodeResources("10.0.0.1", cpus=8, gpus=0)
GPU_NODES = [NodeResources("10.0.0.2", cpus=16, gpus=4), NodeResources("10.0.0.3", cpus=16, gpus=2)]


@pytest.mark.parametrize(
    ("actors", "gpus", "cpus", "nodes", "expected"),
    [
        (AUTO, AUTO, 1, [CPU_NODE], (1, 0.0)),  # a CPU cluster: one actor, no GPU
        (AUTO, AUTO, 1, GPU_NODES, (6, 1.0)),  # one actor per GPU over both nodes
        (AUTO, 0.5, 1, GPU_NODES, (12, 0.5)),  # half a GPU each: two per GPU
        (AUTO, 2, 1, GPU_NODES, (3, 2.0)),  # two GPUs each: 2 fit on the first node, 1 on the other
        (AUTO, AUTO, 4, [NodeResources("a", cpus=6, gpus=4)], (1, 1.0)),  # CPUs are short
        (3, 0, 2, [CPU_NODE], (3, 0.0)),
    ],
)
def test_resolve_auto_and_given_numbers(actors, gpus, cpus, nodes, expected):
    assert resolve(actors, gpus, cpus, nodes) == expected


@pytest.mark.parametrize(
    ("actors", "gpus", "cpus", "nodes", "flag", "says"),
    [
        (AUTO, 1, 1, [CPU_NODE], "--gpus-per-actor 1", "no GPU"),
        (AUTO, 8, 1, GPU_NODES, "--gpus-per-actor 8", "no node of the cluster has that many"),
        (7, 1, 1, GPU_NODES, "--actors 7 x --gpus-per-actor 1", "the cluster has 6"),
        (4, 0, 2, [CPU_NODE], "--actors 4 x --cpus-per-actor 2", "has 8"),
        (AUTO, 0, 12, [CPU_NODE], "--cpus-per-actor 12", "no node"),
        (2, 3, 1, GPU_NODES, "--actors 2", "hold 1 such actors"),  # 6 GPUs, but 3 on one node
    ],
)
def test_a_request_the_cluster_cannot_meet_names_the_flag(actors, gpus, cpus, nodes, flag, says):
    with pytest.raises(ConfigError) as caught:
        resolve(actors, gpus, cpus, nodes)
    message = str(caught.value)
    assert flag in message and says in message and "cluster" in message


def test_an_actor_runs_on_its_gpu_or_the_cpu():
    assert choose_device([], cuda_available=True) == ("cpu", None)  # never the node's GPUs
    assert choose_device([1], cuda_available=True) == ("cuda", None)  # Ray made only GPU 1 visible
    device, warning = choose_device([1], cuda_available=False)
    assert device == "cpu" and "[1]" in warning


@pytest.fixture(scope="module")
def two_gpu_ray():
    """A local Ray that declares 2 GPUs (assignment is real, CUDA is not)."""
    import ray

    ray.init(address="local", num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False)
    # An actor reports its placement with the rows it ran. Ray Data hands a block to the least
    # busy actor, ties to the same one, so with blocks arriving one at a time from a single
    # decode task, one actor could run them all: dispatch once both actors are up, decode in
    # several tasks at once, and give an actor one block at a time.
    context = ray.data.DataContext.get_current()
    settings = {
        "wait_for_min_actors_s": 300,
        "op_resource_reservation_enabled": False,
        "max_tasks_in_flight_per_actor": 1,
    }
    before = {key: getattr(context, key) for key in settings}
    for key, value in settings.items():
        setattr(context, key, value)
    yield ray
    for key, value in before.items():
        setattr(context, key, value)
    ray.shutdown()


def test_auto_starts_one_actor_per_gpu(two_gpu_ray, demo_model_dir, demo_data, tmp_path):
    import torch

    from sav_ray.pipelines.fitting import fit

    cfg = FitConfig(
        model=str(demo_model_dir),
        train=str(demo_data["train"]),  # 60 rows: 30 blocks to share
        output=str(tmp_path / "sav"),
        batch_size=2,
        cpus_per_actor=0.5,  # a CPU left for the read and decode tasks
    )
    assert (cfg.actors, cfg.gpus_per_actor) == (AUTO, AUTO)
    _, stats = fit(cfg)
    assert len(stats.placements) == 2
    assert len({p["pid"] for p in stats.placements}) == 2
    gpu_ids = [p["gpu_ids"] for p in stats.placements]
    assert all(len(ids) == 1 for ids in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    if not torch.cuda.is_available():  # declared GPUs without CUDA: warned, ran on the CPU
        assert {p["device"] for p in stats.placements} == {"cpu"}
    assert stats.forward_rows == stats.examples


def test_serve_gives_a_classifier_replica_a_gpu_when_the_cluster_has_one(two_gpu_ray):
    from serve.app import classifier_resources
    from serve.schemas import AppConfig

    cfg = AppConfig.model_validate({"models": [{"name": "m", "ref": "/a"}]})
    assert cfg.gpus_per_replica == AUTO
    assert classifier_resources(cfg) == {"num_cpus": 1.0, "num_gpus": 1.0}
    given = cfg.model_copy(update={"gpus_per_replica": 0})
    assert classifier_resources(given)["num_gpus"] == 0


def test_an_error_inside_an_actor_is_one_line_with_a_log(
    two_gpu_ray, demo_model_dir, small_data, tmp_path, capsys, monkeypatch
):
    """Corrupt weights pass preflight (config and processor only) and fail in the actors'
    constructors, which Ray alone would report as a bare ActorDiedError."""
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir, model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("SAV_RAY_LOG_DIR", str(tmp_path / "logs"))
    argv = ["--model", str(model), "--train", str(small_data["train"]), "--output"]
    code = fit_job.main([*argv, str(tmp_path / "sav"), "--cpus-per-actor", "0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err  # Ray Data's own console log of it is kept short too
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    found = re.search(r"\(full traceback: (.+)\)$", line)
    assert found, line
    log = Path(found.group(1))
    assert log.parent == tmp_path / "logs"
    assert "Traceback" in log.read_text() and "ExtractVectors" in log.read_text()
    assert "ActorDiedError" not in line  # the constructor's own exception, not Ray's wrapper


def test_a_gpu_request_on_a_cpu_cluster_fails_at_once(
    demo_model_dir, small_data, tmp_path, fit_job_in_fresh_ray
):
    """Ray would wait forever for the GPU; the job exits 2 naming the flag."""
    args = ["--model", demo_model_dir, "--train", small_data["train"], "--output", tmp_path / "sav"]
    proc, ray_dir = fit_job_in_fresh_ray([*args, "--gpus-per-actor", "1"], timeout=60)
    # Ray did start, in RAY_TMPDIR: test_preflight relies on it to see that it did not.
    assert any(name.startswith("session_") for name in ray_dir or [])
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "--gpus-per-actor 1" in line and "no GPU" in line
    assert not (tmp_path / "sav").exists()
