"""Preflight: check the model before Ray starts, from its config and processor files alone.

    info = check_model(cfg, prompt, table)   # BaseModelInfo: architecture and head geometry

No weights are read. The model is built from its config on the meta device (accelerate's
`init_empty_weights`) to find its heads; the processor is loaded and renders the chat prompt
of the manifest's first row (images are placeholders in the template, no pixels are needed).
The model class is chosen as `load_model` chooses it (`sav_ray.core.models.model_class`).
Every problem (no such folder or hub id, no config.json, neither an image-text-to-text model
nor a causal LM, an encoder-decoder model, a decoder layout sav-ray cannot read, no processor
or tokenizer files, no chat template, a template that fails) is a ConfigError naming the flag,
the model and the cause, and a manifest row with images for a text-only base model (a text LLM)
a ManifestError naming the file, row and field, so a job stops with one line in seconds
instead of after Ray has started its actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sav_ray.core.artifact import BaseModelInfo
from sav_ray.core.errors import ConfigError
from sav_ray.core.manifest import refuse_images
from sav_ray.core.models import ModelLayoutError, UnsupportedModelError, find_heads, model_class
from sav_ray.core.prompts import Example, PromptConfig, PromptError, render

if TYPE_CHECKING:
    from sav_ray.pipelines.config import ModelConfig


def _cause(e: BaseException) -> str:
    """The first line of an exception from transformers or the hub, for a one-line message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_config(name: str, revision: str | None, where: str) -> Any:
    """The model's config (config.json only)."""
    from transformers import AutoConfig

    folder = Path(name)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ConfigError(f"{where}: no config.json in this folder; give a saved model's folder")
    if not folder.is_dir() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        raise ConfigError(f"{where}: no such folder (a hub id is ORG/NAME)")
    try:
        return AutoConfig.from_pretrained(name, revision=None if folder.is_dir() else revision)
    except OSError as e:
        raise ConfigError(
            f"{where}: not a model folder here, and not found on the Hugging Face hub or in its "
            f"cache ({_cause(e)})"
        ) from None
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{where}: its config.json cannot be read ({_cause(e)})") from None


def meta_model(config: Any, where: str) -> Any:
    """The model built from `config` with every tensor on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights

    try:
        auto_class = model_class(config)
    except UnsupportedModelError as e:
        raise ConfigError(f"{where}: {e}") from None
    try:
        with init_empty_weights():
            return auto_class.from_config(config)
    except Exception as e:  # whatever transformers raises for a config it cannot build
        raise ConfigError(
            f"{where}: the model cannot be built from its config ({_cause(e)})"
        ) from None


def load_checked_processor(
    name: str, revision: str | None, where: str, chat_template: str | None = None
) -> Any:
    """The processor, with a tokenizer and a chat template (its own, or `chat_template`)."""
    from sav_ray.core.processors import load_processor

    local = Path(name).is_dir()
    try:
        processor = load_processor(name, revision=None if local else revision)
    except Exception as e:  # missing files raise OSError, ValueError, TypeError, AttributeError
        raise ConfigError(
            f"{where}: its processor cannot be loaded; the folder needs the processor, "
            f"tokenizer and image processor files of the checkpoint ({_cause(e)})"
        ) from None
    tokenizer = getattr(processor, "tokenizer", None)
    template = getattr(processor, "chat_template", None) or getattr(
        tokenizer, "chat_template", None
    )
    if not template and not chat_template:
        raise ConfigError(
            f"{where}: the checkpoint has no chat template (chat_template.jinja), and sav-ray "
            "builds every prompt with one; fit with --chat-template FILE (a Jinja chat template)"
        )
    return processor


def first_example(table: Any) -> Example:
    """The manifest's first row, its images (and a video's frame) as placeholders: rendering
    needs only their number."""
    row = table.slice(0, 1).to_pylist()[0]
    return Example(
        text=row["text"],
        images=[None] * len(row["images"]),
        where=f"row {row['row']}",
        video=[None] if row["video"] else [],
    )


def check_model(
    model: ModelConfig, prompt: PromptConfig, table: Any = None, flag: str = "--model"
) -> BaseModelInfo:
    """Check `model.model` can run here, from config and processor files; return its geometry
    (`revision` as given, `dtype` as asked, `modalities` from the processor). `table`: the
    manifest, whose first row's prompt must render and whose rows may hold images only if the
    model takes them. Raises ConfigError naming `flag`, or ManifestError naming a row."""
    from sav_ray.core.processors import modalities

    where = f"{flag} {model.model}"
    config = load_config(model.model, model.revision, where)
    meta = meta_model(config, where)
    try:
        layout = find_heads(meta)
    except ModelLayoutError as e:
        raise ConfigError(f"{where}: unsupported model layout: {e}") from None
    processor = load_checked_processor(model.model, model.revision, where, prompt.chat_template)
    info = BaseModelInfo(
        name_or_path=model.model,
        revision=model.revision,
        architecture=type(meta).__name__,
        num_layers=layout.num_layers,
        num_heads=layout.num_heads,
        head_dim=layout.head_dim,
        dtype=model.dtype,
        modalities=modalities(processor),
        layer_ids=layout.layer_ids,
    )
    if table is not None and not info.takes_images:
        refuse_images(table, info.text_only_reason)
    if table is not None and table.num_rows:
        example = first_example(table)
        try:
            render(processor, example, prompt)
        except PromptError:
            raise
        except Exception as e:
            raise ConfigError(
                f"{where}: its chat template fails on {example.where} ({_cause(e)})"
            ) from None
    return info
