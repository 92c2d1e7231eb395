"""Capture on tiny random models of every supported family.

The captured vector is the input of o_proj at the last real token, so o_proj applied to it
must rebuild o_proj's own output there; batching, padding side and early exit must not
change it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sav_ray.core.capture import HeadCapture, LayerCounter, capture_examples, capture_inputs
from sav_ray.core.models import ModelLayoutError, find_heads
from sav_ray.core.prompts import Example, PromptConfig, encode
from sav_ray.fixtures.tiny import sample_examples

ARCHS = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava", "gemma3"]
PROMPT = PromptConfig()


@pytest.fixture(scope="module", params=ARCHS)
def lm(request, tiny_model):
    return tiny_model(request.param)


def test_geometry_comes_from_o_proj(lm):
    text = lm.model.config.get_text_config()
    assert lm.info.num_layers == text.num_hidden_layers
    assert lm.info.num_heads == text.num_attention_heads
    assert lm.info.head_dim * lm.info.num_heads == lm.layout.o_projs[0].in_features
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention


def test_o_proj_of_captured_vector_equals_o_proj_output(lm, o_proj_identity):
    vectors = o_proj_identity(lm, dict(encode(lm.processor, sample_examples()[:2], PROMPT)))
    assert vectors.shape == (2, lm.info.num_layers, lm.info.num_heads, lm.info.head_dim)


def test_padded_batch_equals_one_at_a_time(lm):
    exs = sample_examples()
    batch = capture_examples(lm, exs, PROMPT)
    single = np.concatenate([capture_examples(lm, [ex], PROMPT) for ex in exs])
    assert batch.shape == (3, lm.info.num_layers, lm.info.num_heads, lm.info.head_dim)
    np.testing.assert_allclose(batch, single, atol=1e-5, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3  # different prompts, different vectors


def test_right_padding_finds_the_last_real_token(lm):
    exs = sample_examples()[:2]
    left = capture_examples(lm, exs, PROMPT)
    tokenizer = lm.processor.tokenizer
    tokenizer.padding_side = "right"
    try:
        inputs = dict(encode(lm.processor, exs, PROMPT))
        assert inputs["attention_mask"][:, -1].min() == 0  # really right-padded
        right = capture_inputs(lm, inputs).numpy()
    finally:
        tokenizer.padding_side = "left"
    np.testing.assert_allclose(right, left, atol=1e-5, rtol=0)


def test_early_exit_gives_same_vectors_and_skips_later_layers(lm):
    exs = sample_examples()
    full = capture_examples(lm, exs, PROMPT)
    counter = LayerCounter(lm.model)
    try:
        early = capture_examples(lm, exs, PROMPT, layers=[0, 1], early_exit=True)
    finally:
        counter.remove()
    np.testing.assert_array_equal(early, full[:, :2])
    assert counter.counts == [1, 1, 0, 0]  # layers 2 and 3 never ran


def test_text_only_rows_and_two_images_in_one_batch(lm):
    exs = [sample_examples()[2], Example("no image here, just words", [])]
    batch = capture_examples(lm, exs, PROMPT)
    text_only = capture_examples(lm, exs[1:], PROMPT)
    np.testing.assert_allclose(batch[1:], text_only, atol=1e-5, rtol=0)
    assert np.isfinite(batch).all()


def test_hooks_are_removed_even_on_error(lm):
    o_proj = lm.layout.o_projs[0]
    before = len(o_proj._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with HeadCapture(lm.layout, torch.tensor([0])):
            assert len(o_proj._forward_pre_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(o_proj._forward_pre_hooks) == before


def test_system_prompt_and_template_change_the_prompt(lm):
    ex = sample_examples()[:1]
    plain = capture_examples(lm, ex, PROMPT)
    framed = capture_examples(
        lm, ex, PromptConfig(text_template="Question: {text} Answer:", system_prompt="Be brief.")
    )
    assert np.abs(plain - framed).max() > 1e-4


def test_unsupported_layout_names_the_model_class():
    class NoLayers(torch.nn.Module):
        def get_decoder(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ModelLayoutError, match="NoLayers"):
        find_heads(NoLayers())
