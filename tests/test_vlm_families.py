"""PaliGemma, SmolVLM and Mllama (Llama 3.2 Vision): capture identities, the fit + predict
round trip, Mllama's self-attention layers, and `--chat-template` for checkpoints without one.

Tiny random models (`sav_ray.fixtures.tiny.VLM_FAMILIES`). PaliGemma, as its base checkpoints, has no
chat template: every prompt of it here uses `PALIGEMMA_CHAT_TEMPLATE`. Its processor returns
`labels`, SmolVLM's processor requires a video processor (none without torchvision), and Mllama
interleaves cross-attention decoder layers without `self_attn`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sav_ray.core import reduce
from sav_ray.core.artifact import ArtifactError, load_artifact, write_artifact
from sav_ray.core.capture import LayerCounter, capture_examples
from sav_ray.core.classify import predict_examples, predictions
from sav_ray.core.errors import ConfigError
from sav_ray.core.manifest import read_manifest
from sav_ray.core.prompts import PromptConfig, encode
from sav_ray.fixtures.tiny import PALIGEMMA_CHAT_TEMPLATE, VLM_FAMILIES, sample_examples
from sav_ray.pipelines.config import FitConfig, ModelConfig
from sav_ray.pipelines.fitting import fit
from sav_ray.pipelines.preflight import check_model


def prompt_for(arch: str) -> PromptConfig:
    return PromptConfig(chat_template=PALIGEMMA_CHAT_TEMPLATE if arch == "paligemma" else None)


@pytest.fixture(scope="module", params=VLM_FAMILIES)
def arch_lm(request, tiny_model):
    return request.param, tiny_model(request.param)


def test_capture_identities(arch_lm, o_proj_identity):
    """o_proj(captured) == o_proj's output at the last real token (the processor's own padded
    batch, labels and all); the per-row collate path gives the same vectors, batched or one at a
    time; stopping after layer 1 gives the same vectors and skips the later decoder layers."""
    arch, lm = arch_lm
    prompt, exs = prompt_for(arch), sample_examples()
    processed = dict(encode(lm.processor, exs, prompt))
    if arch == "paligemma":
        assert "labels" in processed  # given to the model, it would compute a loss
    vectors = o_proj_identity(lm, processed).numpy()  # [3, layer, head, head_dim]
    assert vectors.shape == (3, lm.info.num_layers, lm.info.num_heads, lm.info.head_dim)

    batch = capture_examples(lm, exs, prompt)
    np.testing.assert_allclose(batch, vectors, atol=1e-5, rtol=0)
    single = np.concatenate([capture_examples(lm, [ex], prompt) for ex in exs])
    np.testing.assert_allclose(batch, single, atol=1e-5, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3

    counter = LayerCounter(lm.model)
    try:
        early = capture_examples(lm, exs, prompt, layers=[0, 1], early_exit=True)
    finally:
        counter.remove()
    np.testing.assert_array_equal(early, batch[:, :2])
    last_ran = max(i for i, n in enumerate(counter.counts) if n)
    assert last_ran == lm.info.decoder_layers[1] < len(counter.counts) - 1


def test_fit_and_predict_round_trip(
    arch_lm, small_data, manifest_examples, fit_in_process, tmp_path
):
    """Fitted in-process, written, loaded against the model: predicting (early exit after the
    deepest selected layer) gives the votes of the test rows' full-capture vectors."""
    arch, lm = arch_lm
    prompt = prompt_for(arch)
    train, train_labels = manifest_examples(small_data["train"])
    write_artifact(fit_in_process(lm, train, train_labels, prompt, 4), tmp_path / "sav")
    loaded = load_artifact(tmp_path / "sav", expect=lm.info)
    assert loaded.prompt == prompt and loaded.base_model == lm.info

    test, _ = manifest_examples(small_data["test"])
    assert_predictions_reuse(lm, loaded, test, prompt)


def assert_predictions_reuse(lm, artifact, rows, prompt: PromptConfig) -> list:
    """predict_examples(artifact) equals the votes of `rows`' vectors captured with `prompt`."""
    vectors = capture_examples(lm, rows, prompt)  # [n, layer, head, head_dim]
    expected = predictions(artifact, reduce.gather_heads(vectors, artifact.heads))
    got = predict_examples(lm, artifact, rows)
    assert [p.votes for p in got] == [p.votes for p in expected]
    for p, e in zip(got, expected, strict=True):
        assert p.label == e.label
        np.testing.assert_allclose(list(p.scores.values()), list(e.scores.values()), atol=1e-5)
    return got


def test_mllama_heads_are_its_self_attention_layers(tiny_model):
    lm = tiny_model("mllama")
    text = lm.model.config.get_text_config()
    layers = lm.model.get_decoder().layers
    self_attention = [i for i in range(len(layers)) if i not in text.cross_attention_layers]
    assert lm.info.layer_ids == lm.layout.layer_ids == tuple(self_attention) == (0, 2)
    assert lm.info.num_layers == 2
    assert all(
        o is layers[i].self_attn.o_proj for o, i in zip(lm.layout.o_projs, (0, 2), strict=True)
    )
    assert lm.info.to_dict()["layer_ids"] == [0, 2]

    shifted = replace(lm.info, layer_ids=(1, 3))
    with pytest.raises(ArtifactError, match=r"head layers are decoder layers \[0, 2\] != \[1, 3\]"):
        lm.info.check_compatible(shifted)
    identity = replace(lm.info, layer_ids=None)
    assert "layer_ids" not in identity.to_dict()  # absent: layer i is decoder layer i
    with pytest.raises(ArtifactError, match="head layers are decoder layers"):
        identity.check_compatible(lm.info)


def test_smolvlm_processor_without_its_video_processor(tiny_model):
    processor = tiny_model("smolvlm").processor
    assert type(processor).__name__ == "SmolVLMProcessor"
    assert not processor.video_processor and processor.video_processor.fps is None


def test_no_chat_template_is_an_error_naming_the_flag(tiny_model_dir, small_data):
    folder = tiny_model_dir("paligemma")
    table = read_manifest(small_data["train"])
    with pytest.raises(ConfigError) as caught:
        check_model(ModelConfig(model=str(folder)), PromptConfig(), table)
    message = str(caught.value)
    assert "no chat template" in message and "--chat-template FILE" in message
    assert "\n" not in message
    info = check_model(ModelConfig(model=str(folder)), prompt_for("paligemma"), table)
    assert info.architecture == "PaliGemmaForConditionalGeneration"


def test_an_unreadable_chat_template_file_names_the_flag(tmp_path, small_data):
    base = ["--model", "m", "--train", str(small_data["train"]), "--output", str(tmp_path / "o")]
    for path, words in (
        (tmp_path / "missing.jinja", "cannot be read"),
        (tmp_path, "cannot be read"),
    ):
        with pytest.raises(ConfigError, match=f"--chat-template {path}: {words}"):
            FitConfig.from_args([*base, "--chat-template", str(path)])
    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(ConfigError, match="--chat-template .*empty.jinja: the file is empty"):
        FitConfig.from_args([*base, "--chat-template", str(tmp_path / "empty.jinja")])


@pytest.mark.slow
def test_chat_template_flag_recorded_and_reused(
    tiny_model_dir, tiny_model, small_data, manifest_examples, local_ray, tmp_path
):
    """--chat-template through the fit's config, fitted on Ray: the artifact records the file's
    template; its centroids are the vectors of that template, and predicting reuses it."""
    template = tmp_path / "paligemma.jinja"
    template.write_text(PALIGEMMA_CHAT_TEMPLATE)
    out = tmp_path / "sav"
    args = ["--model", tiny_model_dir("paligemma"), "--train", small_data["train"]]
    args += ["--output", out, "--num-heads", "4", "--chat-template", template]
    write_artifact(fit(FitConfig.from_args([str(a) for a in args]))[0], out)

    lm = tiny_model("paligemma")
    artifact = load_artifact(out, expect=lm.info)
    assert artifact.prompt.chat_template == PALIGEMMA_CHAT_TEMPLATE

    train, labels = manifest_examples(small_data["train"])
    vectors = capture_examples(lm, train, prompt_for("paligemma"))  # [n, layer, head, head_dim]
    for c, label in enumerate(artifact.labels):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        own = vectors[rows][:, artifact.heads[:, 0], artifact.heads[:, 1]].mean(axis=0)
        np.testing.assert_allclose(artifact.centroids[c], own, atol=1e-5, rtol=0)

    test, _ = manifest_examples(small_data["test"])
    assert_predictions_reuse(lm, artifact, test, prompt_for("paligemma"))
    # the equality is not vacuous: another template gives other vectors
    other = PromptConfig(chat_template="Q: " + PALIGEMMA_CHAT_TEMPLATE)
    ours = capture_examples(lm, test[:2], artifact.prompt)
    assert np.abs(capture_examples(lm, test[:2], other) - ours).max() > 1e-3
