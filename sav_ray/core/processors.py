"""Processor loading: `AutoProcessor` with a fallback for machines without torchvision, and a
tokenizer-only processor for text LLMs.

A text LLM's checkpoint (Qwen2, Llama, ...) has a tokenizer and no processor, and
`AutoProcessor` then returns the tokenizer itself; it is wrapped in `TextProcessor`, which
offers what sav-ray uses of a processor (`__call__(text=[...])`, `apply_chat_template`,
`.tokenizer`, `batch_decode`) and refuses images.

Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision processors take a `video_processor` (SmolVLM's
requires one), and video processors exist only with torchvision; without it
`AutoProcessor.from_pretrained` fails ("Can't load video processor ...", or an ImportError naming
torchvision), on tiny test models and real hub checkpoints alike. The tiny models of `sav_ray.fixtures.tiny` save no video processor, so
they take the fallback even where torchvision is installed.

The fallback loads the same processor class without its video processor, through
transformers' own `from_pretrained`: the image processor (PIL backend), the tokenizer, the chat
template and every other saved processor setting (`num_image_tokens`,
`vision_feature_select_strategy`, ...), so image and text inputs give the same tensors. A
processor that requires a video processor gets a stand-in whose settings are all None, since its
code (SmolVLM's `apply_chat_template` reads `video_processor.fps`) assumes there is one.

    processor = load_processor("Qwen/Qwen2-VL-2B-Instruct", revision="<commit>")
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

# Keyword arguments of `load_processor` that locate files; the model config is read with these.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "trust_remote_code")


class TextProcessor:
    """A text LLM's tokenizer with the processor interface sav-ray uses; it takes no images.

    Text LLM chat templates (Qwen2's, Llama's) read a message's content as one string, so the
    text items of a content list are joined before the template renders. The rendered prompt
    already holds the template's special tokens (Llama's BOS), so tokenising adds none. A
    tokenizer without a pad token (Llama's) pads with its EOS token: padding is masked out, and
    the capture finds each row's last real token from the mask.

        processor = TextProcessor(AutoTokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct"))
        processor(text=[processor.apply_chat_template(chat, tokenize=False)], return_tensors="pt")
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(
            [{**m, "content": _plain_text(m["content"])} for m in conversation], **kwargs
        )

    def __call__(self, text: list[str], images: Any = None, **kwargs: Any) -> Any:
        if images is not None and any(images):
            raise ValueError(
                "this base model takes text only (its checkpoint has a tokenizer and no image "
                "processor); give inputs without images"
            )
        return self.tokenizer(text, add_special_tokens=False, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def save_pretrained(self, out_dir: Any) -> Any:
        return self.tokenizer.save_pretrained(out_dir)


def _plain_text(content: Any) -> str:
    """A message's content as one string; an image item has no place in a text LLM's prompt."""
    if isinstance(content, str):
        return content
    kinds = sorted({item["type"] for item in content if item["type"] != "text"})
    if kinds:
        raise ValueError(
            f"this base model takes text only, but the prompt holds {' and '.join(kinds)} "
            "items; give inputs without images"
        )
    return "".join(item["text"] for item in content)


def modalities(processor: Any) -> tuple[str, ...]:
    """The inputs a processor takes: text, and images where it has an image processor."""
    if getattr(processor, "image_processor", None) is None:
        return ("text",)
    return ("text", "image")


def load_processor(
    name_or_path: str, revision: str | None = None, **kwargs: Any
) -> ProcessorMixin | TextProcessor:
    """Load the processor of a hub id or local directory, its tokenizer padding on the left.

    A processor whose video processor cannot be loaded (no torchvision, or no video processor
    config) is loaded without it; any other error is raised unchanged. A checkpoint with a
    tokenizer and no processor (a text LLM) gives a `TextProcessor`.
    """
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        if not _is_video_processor_error(error):
            raise
        processor_cls = _processor_class(name_or_path, revision, kwargs)
        if processor_cls is None or "video_processor" not in _init_parameters(processor_cls):
            raise
        processor = _without_video_processor(processor_cls).from_pretrained(
            name_or_path, revision=revision, **kwargs
        )
    if isinstance(processor, PreTrainedTokenizerBase):
        return TextProcessor(processor)
    # Left padding, as for generation; the capture still finds the last real token from the mask.
    processor.tokenizer.padding_side = "left"
    return processor


def build_processor(
    processor_cls: type[ProcessorMixin],
    image_processor: Any,
    tokenizer: Any,
    chat_template: str | None = None,
    **kwargs: Any,
) -> ProcessorMixin:
    """Construct `processor_cls` in-process, without a video processor if it takes one.

    `kwargs` are the processor's own settings (e.g. `num_image_tokens`); the tokenizer is set
    to pad on the left.
    """
    if "video_processor" in _init_parameters(processor_cls):
        processor_cls = _without_video_processor(processor_cls)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
    )
    processor.tokenizer.padding_side = "left"
    return processor


def _is_video_processor_error(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is about video processors or torchvision."""
    seen: BaseException | None = error
    while seen is not None:
        message = str(seen).lower()
        if "video processor" in message or "torchvision" in message:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _processor_class(
    name_or_path: str, revision: str | None, kwargs: dict[str, Any]
) -> type[ProcessorMixin] | None:
    """The processor class transformers maps the checkpoint's model type to, if any."""
    hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
    config = AutoConfig.from_pretrained(name_or_path, revision=revision, **hub_kwargs)
    return PROCESSOR_MAPPING.get(type(config), None)


def _init_parameters(processor_cls: type) -> list[str]:
    return list(inspect.signature(processor_cls.__init__).parameters)


class _NoVideoProcessor:
    """Stands in for a required video processor that cannot be loaded: false, every setting None."""

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __repr__(self) -> str:
        return "<no video processor>"


@functools.cache
def _without_video_processor(processor_cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of `processor_cls` whose `__init__` has the same parameters but `video_processor`.

    transformers finds a processor's sub-processors from the names in `__init__`'s signature and
    the settings it loads from `__init__.__code__.co_varnames`, so the new `__init__` is compiled
    with those names as real parameters (as `dataclasses` does), not a `**kwargs` wrapper.
    The class keeps its parent's name, so a saved processor still names the real class and
    loads without this fallback where torchvision is installed. Where the parent requires a
    video processor, it gets None and the instances read `_NoVideoProcessor` in its place.
    """
    signature = inspect.signature(processor_cls.__init__).parameters
    required = signature["video_processor"].default is inspect.Parameter.empty
    parameters = [p for p in signature.values() if p.name != "video_processor"]
    named = [p for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    others = [p.kind for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert others in ([], [inspect.Parameter.VAR_KEYWORD]), f"{processor_cls}: {parameters}"
    defaults = [p.default for p in named if p.default is not inspect.Parameter.empty]
    assert all(
        p.default is not inspect.Parameter.empty for p in named[len(named) - len(defaults) :]
    )

    self_name, *names = (p.name for p in named)
    passed = [f"{n}={n}" for n in names] + (["video_processor=None"] if required else [])
    source = (
        f"def __init__({self_name}, {', '.join(names)}, **kwargs):\n"
        f"    parent_init({self_name}, {', '.join(passed)}, **kwargs)\n"
    )
    namespace: dict[str, Any] = {"parent_init": processor_cls.__init__}
    exec(source, namespace)
    init = namespace["__init__"]
    init.__defaults__ = tuple(defaults)
    init.__qualname__ = f"{processor_cls.__name__}.__init__"
    init.__doc__ = processor_cls.__init__.__doc__
    attributes: dict[str, Any] = {"__init__": init, "__module__": __name__}
    if required:
        attributes["video_processor"] = _NoVideoProcessor()
    return type(processor_cls.__name__, (processor_cls,), attributes)
