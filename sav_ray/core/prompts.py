"""Prompts: how a manifest row becomes one chat turn for the model (docs/design.md, "Prompt").

By default one user turn holds the row's video (if any), its images in order, then its text;
the chat template is applied with the generation prompt appended, and vectors are read at the
last token of that prompt. Where the text holds `<image>` placeholders, the images go at those
places (the video still comes first). A video is one video item where the processor takes video
natively (`VIDEO_NATIVE`), else its N sampled frames as N image items (`VIDEO_AS_IMAGES`).
A checkpoint without a chat template (PaliGemma base models) needs one given with
`--chat-template FILE`: its text is part of the prompt settings. The settings here are recorded
in the artifact and reused at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

IMAGE_PLACEHOLDER = "<image>"

# How a row's video reaches the processor (recorded in the artifact's preprocessing).
VIDEO_NATIVE = "native"  # one video item; the frames go to the processor's `videos`
VIDEO_AS_IMAGES = "images"  # N image items before the row's images; frames go to `images`
VIDEO_INPUTS = (VIDEO_NATIVE, VIDEO_AS_IMAGES)


class PromptError(ValueError):
    """A row cannot be turned into a prompt (the message names the row and field)."""


@dataclass(frozen=True)
class PromptConfig:
    """Prompt settings; `text_template` must contain `{text}` (the row's text).

    `chat_template`: a Jinja chat template used instead of the checkpoint's (None: its own).
    """

    text_template: str = "{text}"
    system_prompt: str | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if "{text}" not in self.text_template:
            raise PromptError(
                f"--text-template {self.text_template!r} has no '{{text}}' placeholder; "
                "add one where the row's text goes"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.chat_template is None:
            del d["chat_template"]  # absent means the checkpoint's own (schema_version 3)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptConfig:
        return cls(
            text_template=d["text_template"],
            system_prompt=d.get("system_prompt"),
            chat_template=d.get("chat_template"),
        )


@dataclass
class Example:
    """One input: its text, its images in order and its video's sampled frames (PIL, RGB)."""

    text: str
    images: list  # [PIL.Image.Image]
    where: str = "input"  # names the example in errors, e.g. "row 12"
    video: list = field(default_factory=list)  # [PIL.Image.Image]: sampled frames; [] for none


def user_content(
    example: Example, config: PromptConfig, video_input: str = VIDEO_AS_IMAGES
) -> list[dict[str, Any]]:
    """The user turn's content items: the video, then images then text, or images at `<image>`
    placeholders."""
    text = config.text_template.format(text=example.text)
    n_slots = text.count(IMAGE_PLACEHOLDER)
    if not example.video:
        items: list[dict[str, Any]] = []
    elif video_input == VIDEO_NATIVE:
        items = [{"type": "video"}]
    else:
        items = [{"type": "image"} for _ in example.video]
    if n_slots == 0:
        items += [{"type": "image"} for _ in example.images]
        return items + [{"type": "text", "text": text}]
    if n_slots != len(example.images):
        raise PromptError(
            f"{example.where}: the text has {n_slots} {IMAGE_PLACEHOLDER} placeholder(s) but the "
            f"row has {len(example.images)} image(s); give one image per placeholder"
        )
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            items.append({"type": "image"})
        if piece:
            items.append({"type": "text", "text": piece})
    return items


def messages(
    example: Example, config: PromptConfig, video_input: str = VIDEO_AS_IMAGES
) -> list[dict[str, Any]]:
    """The chat: an optional system turn, then one user turn."""
    chat: list[dict[str, Any]] = []
    if config.system_prompt:
        chat.append({"role": "system", "content": [{"type": "text", "text": config.system_prompt}]})
    chat.append({"role": "user", "content": user_content(example, config, video_input)})
    return chat


def render(
    processor: Any, example: Example, config: PromptConfig, video_input: str = VIDEO_AS_IMAGES
) -> str:
    """The prompt string: the chat template (the config's, else the model's) with the generation
    prompt appended."""
    return processor.apply_chat_template(
        messages(example, config, video_input),
        chat_template=config.chat_template,
        add_generation_prompt=True,
        tokenize=False,
    )


def encode(processor: Any, examples: list[Example], config: PromptConfig) -> Any:
    """Tokenise a batch (padded; the capture finds each row's last real token from the mask).

    Text-only rows may share a batch with image rows: they get an empty image list.
    """
    texts = [render(processor, ex, config) for ex in examples]
    if any(ex.images for ex in examples):
        return processor(
            text=texts, images=[ex.images for ex in examples], padding=True, return_tensors="pt"
        )
    return processor(text=texts, padding=True, return_tensors="pt")
