"""Preflight: the model and its prompt are checked from config and processor files before Ray
starts; every problem is one line naming the flag, exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sav_ray.cli import fit as fit_job
from sav_ray.core.errors import ConfigError
from sav_ray.core.manifest import read_manifest
from sav_ray.core.models import find_heads, load_model
from sav_ray.core.prompts import PromptConfig
from sav_ray.pipelines.config import ModelConfig
from sav_ray.pipelines.preflight import check_model, load_config, meta_model

ROOT = Path(__file__).resolve().parents[1]


def copy_without(src: Path, out: Path, drop) -> Path:
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors" and not drop(f.name):  # no weights: none are read
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def bad_models(demo_model_dir, tmp_path_factory):
    """name -> (model folder, words the error must contain)."""
    from transformers import Florence2Config, GPT2Config, ViTConfig

    base = tmp_path_factory.mktemp("bad_models")
    vit = base / "vit"
    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(vit)
    gpt2 = base / "gpt2"  # a causal LM whose blocks are transformer.h[i].attn.c_proj
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(gpt2)
    Florence2Config().save_pretrained(base / "florence2")  # image-text-to-text, but enc-dec
    (base / "empty").mkdir()
    return {
        "layout": (gpt2, "unsupported model layout"),
        "not_generative": (vit, "neither an image-text-to-text model nor a causal language"),
        "encoder_decoder": (
            base / "florence2",
            "is an encoder-decoder: the prompt goes to its encoder",
        ),
        "no_config": (base / "empty", "no config.json"),
        "no_folder": (base / "missing", "no such folder"),
        "no_processor": (
            copy_without(demo_model_dir, base / "no_processor", lambda n: n != "config.json"),
            "processor cannot be loaded",
        ),
        "no_template": (
            copy_without(demo_model_dir, base / "no_template", lambda n: "chat_template" in n),
            "no chat template (chat_template.jinja), and sav-ray builds every prompt with one; "
            "fit with --chat-template FILE",
        ),
    }


def test_geometry_from_the_config_alone_matches_the_loaded_model(demo_model_dir, small_data):
    meta = meta_model(load_config(str(demo_model_dir), None, "--model"), "--model")
    layout = find_heads(meta)
    assert layout.o_projs[0].weight.device.type == "meta"  # built without weights
    table = read_manifest(small_data["train"])
    info = check_model(ModelConfig(model=str(demo_model_dir)), PromptConfig(), table)
    loaded = load_model(str(demo_model_dir)).info
    for field in ("architecture", "num_layers", "num_heads", "head_dim"):
        assert getattr(info, field) == getattr(loaded, field)


@pytest.mark.parametrize(
    "case",
    [
        "layout",
        "not_generative",
        "encoder_decoder",
        "no_config",
        "no_folder",
        "no_processor",
        "no_template",
    ],
)
def test_each_problem_is_one_line_naming_the_flag_and_model(bad_models, case):
    import ray

    folder, words = bad_models[case]
    with pytest.raises(ConfigError) as caught:
        check_model(ModelConfig(model=str(folder)), PromptConfig())
    message = str(caught.value)
    assert message.startswith(f"--model {folder}: ") and words in message
    assert "\n" not in message
    assert not ray.is_initialized()


def test_a_template_that_fails_on_the_first_row_names_the_row(demo_model_dir, tmp_path):
    model = copy_without(demo_model_dir, tmp_path / "model", lambda n: n == "chat_template.jinja")
    (model / "chat_template.jinja").write_text("{{ raise_exception('no system turns here') }}")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"image": None, "question": "what shape?", "label": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"--model .*: its chat template fails on row 1"):
        check_model(ModelConfig(model=str(model)), PromptConfig(), read_manifest(manifest))


@pytest.mark.parametrize("case", ["layout", "no_processor", "no_template"])
def test_the_job_stops_before_ray_starts(
    bad_models, small_data, tmp_path, case, fit_job_in_fresh_ray
):
    folder, words = bad_models[case]
    args = ["--model", folder, "--train", small_data["train"], "--output", tmp_path / "sav"]
    proc, ray_dir = fit_job_in_fresh_ray(args, timeout=120)
    # Ray honours RAY_TMPDIR (test_placement sees a session there when a job starts Ray).
    assert ray_dir is None
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 5, proc.stderr
    assert lines[-1].startswith(f"error: --model {folder}: ") and words in lines[-1]
    assert "Ray" not in proc.stdout + proc.stderr


def test_an_encoder_decoder_model_ends_the_fit_before_ray_starts(
    bad_models, small_data, tmp_path, capsys
):
    """In process (the subprocess path is tested above): one line with the cause, exit 2."""
    import ray

    folder, words = bad_models["encoder_decoder"]
    out = tmp_path / "sav"
    code = fit_job.main(
        ["--model", str(folder), "--train", str(small_data["train"]), "--output", str(out)]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(lines) == 1 and lines[0].startswith(f"error: --model {folder}: ")
    assert words in lines[0] and "decoder-only" in lines[0]
    assert not ray.is_initialized()
