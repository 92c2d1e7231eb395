"""Text LLMs and decoders nested differently: capture identities on tiny random models, and
text-only SAVs end to end (fit and predict on Ray, the MLflow model, refusals of images).

Qwen2 and Llama are text LLMs saved with a tokenizer and no processor (`TextProcessor`);
Llama 4's decoder layers sit one level below `get_decoder()`; Phi-4-multimodal is a multimodal
model registered as a causal LM. The last two are run on token ids: their processors need
torchvision.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sav_ray.cli import fit as fit_job
from sav_ray.cli import predict as predict_job
from sav_ray.core.capture import LayerCounter, capture_inputs
from sav_ray.core.models import LoadedModel, decoder_layers, find_heads, model_class
from sav_ray.core.prompts import Example, PromptConfig, encode
from sav_ray.fixtures.tiny import (
    NO_PROCESSOR_ARCHITECTURES,
    TEXT_ARCHITECTURES,
    tiny_model_without_processor,
)

ROOT = Path(__file__).resolve().parents[1]

PROMPT = PromptConfig()
TEXTS = [
    "Is the cat on the road?",
    "a much longer question about the small red car on the left of the large boat, please",
    "Safe?",
]


@pytest.fixture(scope="module", params=[*TEXT_ARCHITECTURES, *NO_PROCESSOR_ARCHITECTURES])
def lm(request, tiny_model):
    if request.param in TEXT_ARCHITECTURES:
        return tiny_model(request.param)  # through load_model, from a saved folder
    model = tiny_model_without_processor(request.param)
    return LoadedModel(model=model, processor=None, layout=find_heads(model), info=None)


def batch(lm: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded prompts: chat template + tokenizer, or (no processor) BOS + one id per word."""
    if lm.processor is not None:
        return dict(encode(lm.processor, [Example(t, []) for t in texts], PROMPT))
    rows = [[1] + [3 + sum(map(ord, w)) % 500 for w in t.split()] for t in texts]
    seq = max(map(len, rows))
    ids = torch.stack([F.pad(torch.tensor(r), (seq - len(r), 0)) for r in rows])  # [batch, seq]
    mask = torch.stack(
        [F.pad(torch.ones(len(r), dtype=torch.int64), (seq - len(r), 0)) for r in rows]
    )
    return {"input_ids": ids, "attention_mask": mask}


def test_o_proj_of_captured_vector_equals_o_proj_output(lm, o_proj_identity):
    vectors = o_proj_identity(lm, batch(lm, TEXTS))
    text = lm.model.config.get_text_config()
    assert vectors.shape == (3, text.num_hidden_layers, text.num_attention_heads, 16)


def test_padded_batch_equals_one_at_a_time(lm):
    inputs = batch(lm, TEXTS)
    assert inputs["attention_mask"][:, 0].min() == 0  # really padded
    together = capture_inputs(lm, inputs)  # [batch, layer, head, head_dim]
    alone = torch.cat([capture_inputs(lm, batch(lm, [t])) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 1e-3


def test_early_exit_gives_same_vectors_and_skips_later_layers(lm):
    inputs = batch(lm, TEXTS)
    full = capture_inputs(lm, inputs)
    counter = LayerCounter(lm.model)
    try:
        early = capture_inputs(lm, inputs, layers=[0, 1], early_exit=True)
    finally:
        counter.remove()
    torch.testing.assert_close(early, full[:, :2], atol=0, rtol=0)
    assert counter.counts[:2] == [1, 1] and not any(counter.counts[2:])


def test_model_class_and_layer_nesting_come_from_the_config():
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    llama4 = tiny_model_without_processor("llama4")
    assert model_class(llama4.config) is AutoModelForImageTextToText
    assert not hasattr(llama4.get_decoder(), "layers")  # a causal LM: layers one level down
    assert decoder_layers(llama4) is llama4.get_decoder().model.layers
    phi4 = tiny_model_without_processor("phi4_multimodal")
    assert model_class(phi4.config) is AutoModelForCausalLM  # multimodal, registered as causal LM


def test_llama_prompt_has_one_bos_and_pads_with_eos(tiny_model):
    lm = tiny_model("llama")
    tokenizer = lm.processor.tokenizer
    assert tokenizer(["x"])["input_ids"][0][0] == tokenizer.bos_token_id  # the tokenizer adds one
    inputs = batch(lm, TEXTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # [batch, seq]
    assert ((ids == tokenizer.bos_token_id) & (mask == 1)).sum(dim=1).tolist() == [1, 1, 1]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert (ids[mask == 0] == tokenizer.eos_token_id).all()


def test_zero_shot_answers_decode_through_the_text_processor(tiny_model):
    """evaluate.py's zero-shot baseline: greedy generation, new tokens decoded."""
    from sav_ray.pipelines.evaluation import generate_answers

    lm = tiny_model("qwen2")
    answers = generate_answers(lm, batch(lm, TEXTS[:2]), max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_images_for_a_text_llm_are_refused_naming_row_and_field(tiny_model_dir, tmp_path):
    from sav_ray.core.manifest import ManifestError, read_manifest
    from sav_ray.pipelines.config import ModelConfig
    from sav_ray.pipelines.preflight import check_model

    manifest = tmp_path / "rows.jsonl"
    rows = [
        {"question": "cat?", "label": "a"},
        {"question": "car?", "photo": "x.png", "label": "b"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tiny_model_dir("qwen2")
    table = read_manifest(manifest, fields_with_image("photo"))
    with pytest.raises(ManifestError) as caught:
        check_model(ModelConfig(model=str(folder)), PROMPT, table)
    message = str(caught.value)
    assert "row 2: field 'photo' gives an image" in message
    assert f"the base model {folder} takes text only" in message
    info = check_model(
        ModelConfig(model=str(folder)), PROMPT, read_manifest(manifest, fields_with_image(""))
    )
    assert info.modalities == ("text",) and info.architecture == "Qwen2ForCausalLM"


def fields_with_image(image: str):
    from sav_ray.core.manifest import ManifestFields

    return ManifestFields.from_flags(image=image, text="question", label="label")


# --- text-only SAV end to end: one fit on Ray -------------------------------------------------


@pytest.fixture(scope="module")
def text_sav(local_ray, tiny_model_dir, tmp_path_factory):
    """jobs/fit.py then jobs/predict.py on a text-only manifest (`--image-field ''`) with the
    tiny Qwen2: (model folder, data, artifact, prediction records)."""
    from sav_ray.core.artifact import load_artifact
    from sav_ray.fixtures.demo_data import make_text_dataset

    tmp = tmp_path_factory.mktemp("text_sav")
    data = make_text_dataset(tmp / "data", train_per_class=10, test_per_class=6)
    folder = str(tiny_model_dir("qwen2"))
    out, preds = tmp / "sav", tmp / "preds.jsonl"
    fit_args = ["--model", folder, "--train", str(data["train"]), "--image-field", ""]
    assert fit_job.main([*fit_args, "--output", str(out), "--num-heads", "8"]) == 0
    predict_args = ["--artifact", str(out), "--data", str(data["test"]), "--image-field", ""]
    assert predict_job.main([*predict_args, "--output", str(preds)]) == 0
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    return folder, data, load_artifact(out), records


def test_a_text_only_manifest_fits_and_predicts_on_a_text_llm(text_sav, tiny_model):
    from sav_ray.core.classify import predict_examples
    from sav_ray.pipelines.predicting import accuracy

    folder, data, artifact, records = text_sav
    assert artifact.base_model.modalities == ("text",)
    assert artifact.base_model.architecture == "Qwen2ForCausalLM"
    rows = [json.loads(line) for line in data["test"].read_text().splitlines()]
    assert len(records) == len(rows) == 12
    # The Ray job's answers are the in-process classifier's (as the server and MLflow model use).
    expected = predict_examples(
        tiny_model("qwen2"), artifact, [Example(r["question"], []) for r in rows]
    )
    assert [r["label"] for r in records] == [p.label for p in expected]
    assert [r["votes"] for r in records] == [p.votes for p in expected]
    assert accuracy(records) >= 0.75  # two classes: chance is 0.5


def test_the_mlflow_model_takes_text_and_refuses_images_for_a_text_llm(text_sav, tiny_model):
    from sav_ray.core.images import ImageError
    from sav_ray.tracking.pyfunc_model import SavModel

    folder, data, artifact, records = text_sav
    model = SavModel()
    model.lm, model.artifact, model.batch_size = tiny_model("qwen2"), artifact, 4
    rows = [json.loads(line) for line in data["test"].read_text().splitlines()]
    out = model.predict(None, pd.DataFrame({"text": [r["question"] for r in rows]}))
    assert list(out["label"]) == [r["label"] for r in records]
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    with pytest.raises(
        ImageError, match=r"input row 1: field 'image': the base model .* takes text only"
    ):
        model.predict(None, pd.DataFrame({"text": ["a", "b"], "image": [None, png]}))
    assert np.isfinite(list(out["scores"][0].values())).all()
