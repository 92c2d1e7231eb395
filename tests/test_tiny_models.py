"""Tiny offline models (`sav_ray.fixtures.tiny`) and the processor loader (`sav_ray.core.processors`).

Every architecture is built, saved, reloaded from disk and run on a left-padded batch mixing
one-image, two-image and text-only prompts.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Qwen2VLProcessor

from sav_ray.core.processors import load_processor
from sav_ray.fixtures.tiny import (
    ARCHITECTURES,
    build_tiny_model,
    build_tokenizer,
    tiny_model_and_processor,
)

VOCAB = 512

# (user content, images): one image, two images of different sizes, text only.
ROWS = [
    (
        [{"type": "image"}, {"type": "text", "text": "What is this?"}],
        [Image.new("RGB", (40, 30), "red")],
    ),
    (
        [
            {"type": "image"},
            {"type": "text", "text": "Compare this picture"},
            {"type": "image"},
            {"type": "text", "text": "with that one: which is blue?"},
        ],
        [Image.new("RGB", (56, 56), "blue"), Image.new("RGB", (28, 50), (0, 160, 0))],
    ),
    ([{"type": "text", "text": "A text only question, longer than the others by some words."}], []),
]


def prompts(processor) -> list[str]:
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        for content, _ in ROWS
    ]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_build_reload_and_batch(arch, tmp_path):
    out_dir = build_tiny_model(arch, tmp_path / arch)
    model = AutoModelForImageTextToText.from_pretrained(out_dir)
    processor = load_processor(str(out_dir))

    built, _ = tiny_model_and_processor(arch)  # same default seed
    built_weights, reloaded = built.state_dict(), model.state_dict()
    assert built_weights.keys() == reloaded.keys()
    for name, tensor in built_weights.items():
        assert torch.equal(tensor, reloaded[name]), name

    texts = prompts(processor)
    inputs = processor(
        text=texts, images=[images for _, images in ROWS], padding=True, return_tensors="pt"
    )
    mask = inputs["attention_mask"]  # [batch, seq]
    assert mask[:, -1].all(), "left padding puts every row's last token at -1"
    assert not mask.all(), "rows of different lengths are padded"
    with torch.no_grad():
        logits = model(**inputs).logits  # [batch, seq, vocab]
    assert logits.shape == (len(ROWS), mask.shape[1], VOCAB)

    # Each row of the padded batch gives the same last-token logits as the row alone.
    for row, (text, (_, images)) in enumerate(zip(texts, ROWS, strict=True)):
        alone = processor(text=[text], images=[images] if images else None, return_tensors="pt")
        with torch.no_grad():
            last = model(**alone).logits[0, -1]  # [vocab]
        torch.testing.assert_close(logits[row, -1], last, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gemma3", "llava"])
def test_head_dim_other_than_hidden_over_heads(arch):
    model, processor = tiny_model_and_processor(arch, hidden_size=64, num_heads=4, head_dim=32)
    o_proj = model.get_decoder().layers[0].self_attn.o_proj
    assert o_proj.in_features == 4 * 32  # [num_heads * head_dim], not hidden_size
    inputs = processor(text=prompts(processor)[:1], images=[ROWS[0][1]], return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == VOCAB


def test_head_dim_is_refused_where_the_text_model_fixes_it():
    with pytest.raises(ValueError, match="head_dim=32 works only for llava, gemma3"):
        tiny_model_and_processor("qwen2_vl", head_dim=32)


def test_seed_decides_the_weights_and_the_tokenizer_is_deterministic():
    a, _ = tiny_model_and_processor("llava", seed=0)
    b, _ = tiny_model_and_processor("llava", seed=1)
    name = "model.language_model.embed_tokens.weight"
    assert not torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert build_tokenizer("llava").get_vocab() == build_tokenizer("llava").get_vocab()


def test_fallback_keeps_processor_class_and_settings(tmp_path):
    out_dir = build_tiny_model("llava_onevision", tmp_path / "ov")
    processor = load_processor(str(out_dir))
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    assert not hasattr(processor, "video_processor")
    assert processor.num_image_tokens == 16
    assert processor.vision_feature_select_strategy == "full"
    assert processor.image_processor.image_grid_pinpoints == [
        [56, 56],
        [56, 112],
        [112, 56],
        [112, 112],
    ]
    assert processor.tokenizer.padding_side == "left"
    assert processor.chat_template == build_tokenizer("llava_onevision").chat_template


def test_fallback_reads_a_hub_style_checkpoint(tmp_path):
    """The layout of e.g. Qwen/Qwen2-VL-2B-Instruct: preprocessor_config.json, chat_template.json
    and a video processor config that needs torchvision; no processor_config.json."""
    built = build_tiny_model("qwen2_vl", tmp_path / "built")
    hub = shutil.copytree(built, tmp_path / "hub")
    processor_config = json.loads((hub / "processor_config.json").read_text())
    image_config = processor_config["image_processor"]
    image_config.update(
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2VLProcessor"
    )
    (hub / "preprocessor_config.json").write_text(json.dumps(image_config))
    (hub / "video_preprocessor_config.json").write_text(
        json.dumps(
            {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor"}
        )
    )
    template = (hub / "chat_template.jinja").read_text()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (hub / "processor_config.json").unlink()
    (hub / "chat_template.jinja").unlink()

    from_hub, from_built = load_processor(str(hub)), load_processor(str(built))
    assert isinstance(from_hub, Qwen2VLProcessor)
    texts = prompts(from_hub)[:2]
    assert texts == prompts(from_built)[:2]
    images = [images for _, images in ROWS[:2]]
    a = from_hub(text=texts, images=images, padding=True, return_tensors="pt")
    b = from_built(text=texts, images=images, padding=True, return_tensors="pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_other_errors_propagate(tmp_path):
    with pytest.raises(OSError, match="missing"):
        load_processor(str(tmp_path / "missing"))


def test_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'blip'"):
        tiny_model_and_processor("blip")
