"""LLaVA JSON training data: samples -> token ids, labels and pixels, lazily, with loud errors.

A data file is a JSON list (or JSON Lines) of samples::

    {"id": "0001", "image": "coco/0001.jpg",            # or ["a.jpg", "b.jpg"], or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A cat."}]}

The file is read once; images are opened only when a sample is encoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from llavakit.data.labels import (
    EmptySupervision,
    LabelError,
    check_supervised,
    supervised_text,
    tokenize_with_labels,
)
from llavakit.errors import ImageCountMismatch, ImageError, LlavakitError
from llavakit.model.llava import IGNORE_INDEX, image_token_count
from llavakit.processing.processor import IMAGE, LlavaProcessor, expand_image_tokens
from llavakit.processing.templates import Turn

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DatasetFormatError(LlavakitError, ValueError):
    """The data file itself is unusable (missing, not JSON, not a list of samples)."""


class InvalidSample(LlavakitError, ValueError):
    """One sample cannot be trained on; ``reason`` says why."""

    def __init__(self, sample_id: str, reason: str) -> None:
        self.sample_id = sample_id
        self.reason = reason
        super().__init__(f"sample {sample_id}: {reason}")


@dataclass
class TrainExample:
    """One encoded training sample (image placeholders already expanded)."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # one [tiles, 3, H, W] each
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width)
    sample_id: str = ""
    image_tokens: int = 0  # how many of ``input_ids`` are image placeholders


def load_samples(data_path: str | os.PathLike) -> list[Any]:
    """The samples of a LLaVA JSON (list) or JSON Lines file, read once."""
    path = Path(data_path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: no such data file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read the data file ({exc})") from None
    if path.suffix == ".jsonl":
        return [_parse(path, line, n) for n, line in enumerate(text.splitlines()) if line.strip()]
    samples = _parse(path, text)
    if not isinstance(samples, list):
        raise DatasetFormatError(
            f"{path}: expected a JSON list of samples, got a {type(samples).__name__}"
        )
    return samples


def _parse(path: Path, text: str, line: int = 0) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(
            f"{path}: not valid JSON (line {exc.lineno + line}, column {exc.colno}: {exc.msg})"
        ) from None


def sample_id_of(sample: Any, index: int | None = None) -> str:
    if isinstance(sample, dict) and sample.get("id") is not None:
        return str(sample["id"])
    return f"#{index}" if index is not None else "?"


def image_paths(sample: dict) -> list[str]:
    image = sample.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def parse_sample(sample: Any, sid: str) -> tuple[list[Turn], str | None, list[str]]:
    """(turns, system, image paths) of a raw sample; ``InvalidSample`` if malformed."""
    if not isinstance(sample, dict):
        raise InvalidSample(sid, f"a sample must be a JSON object, got {type(sample).__name__}")
    if "conversations" not in sample:
        raise InvalidSample(sid, 'missing "conversations"')
    convs = sample["conversations"]
    if not isinstance(convs, list):
        raise InvalidSample(sid, '"conversations" must be a list')
    if not convs:
        raise InvalidSample(sid, "empty conversation")
    image = sample.get("image")
    if image is not None and not (
        isinstance(image, str)
        or (isinstance(image, list) and image and all(isinstance(p, str) for p in image))
    ):
        raise InvalidSample(sid, '"image" must be a path or a non-empty list of paths')
    system, turns = None, []
    for i, message in enumerate(convs):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise InvalidSample(sid, f'turn {i}: expected {{"from": ..., "value": ...}}')
        role, value = message["from"], message["value"]
        if not isinstance(value, str):
            raise InvalidSample(sid, f'turn {i}: "value" must be a string')
        if role == "system" and i == 0:
            system = value
            continue
        if role == "system":
            raise InvalidSample(sid, f"turn {i}: a system message must be the first turn")
        if role not in ROLES:
            raise InvalidSample(sid, f"turn {i}: unknown role {role!r} (use human or gpt)")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if ROLES[role] != expected:
            raise InvalidSample(
                sid,
                f"turn {i}: expected a {'human' if expected == 'user' else 'gpt'} turn; "
                "turns must alternate human/gpt, starting with human",
            )
        if expected == "assistant" and not value.strip():
            raise InvalidSample(sid, f"turn {i}: empty gpt reply")
        turns.append((ROLES[role], value))
    if not turns:
        raise InvalidSample(sid, "empty conversation")
    if turns[-1][0] != "assistant":
        raise InvalidSample(sid, "the conversation ends with a human turn (nothing to learn)")
    return turns, system, image_paths(sample)


def _image_first(turns: list[Turn]) -> list[Turn]:
    """Original LLaVA training: a single ``<image>`` moves to the front of its turn, then "\\n"."""
    if sum(text.count(IMAGE) for _, text in turns) != 1:
        return turns
    return [
        (role, IMAGE + "\n" + text.replace(IMAGE, "").strip()) if IMAGE in text else (role, text)
        for role, text in turns
    ]


def encode_untruncated(
    processor: LlavaProcessor,
    sample: Any,
    image_folder: str | os.PathLike | None,
    index: int | None = None,
    pixels: bool = True,
) -> TrainExample:
    """Encode a sample without truncation (``pixels=False`` skips image preprocessing)."""
    sid = sample_id_of(sample, index)
    turns, system, paths = parse_sample(sample, sid)
    try:  # placeholders are checked before any image is opened
        turns = processor.build_turns(
            None, [{"role": r, "content": t} for r, t in turns], len(paths)
        )
    except ImageCountMismatch as exc:
        raise InvalidSample(
            sid,
            f"{exc.placeholders} <image> placeholder(s) but {exc.images} image(s) in the sample; "
            "use one placeholder per image, or none to put all images first",
        ) from None
    folder = Path(image_folder) if image_folder is not None else Path()
    try:
        images = processor.load_images([folder / p for p in paths])
    except ImageError as exc:
        raise InvalidSample(sid, f"image: {exc}") from None
    try:
        text, spans = supervised_text(processor, _image_first(turns), system)
        ids, labels = tokenize_with_labels(processor, text, spans)
    except EmptySupervision:
        raise InvalidSample(sid, "fully masked: no supervised token") from None
    except LabelError as exc:
        raise InvalidSample(sid, str(exc)) from None
    sizes = [(img.height, img.width) for img in images]
    counts = [image_token_count(processor.config, size) for size in sizes]
    try:
        ids, labels = _expand(ids, labels, processor.config.image_token_id, counts)
    except ImageCountMismatch as exc:
        raise InvalidSample(sid, str(exc)) from None
    try:
        pixel_values = [processor.image_processor(img) for img in images] if pixels else []
    except (ImageError, ValueError, OSError) as exc:
        raise InvalidSample(sid, f"image preprocessing failed: {exc}") from None
    return TrainExample(ids, labels, pixel_values, sizes, sid, sum(counts))


def _expand(
    ids: list[int], labels: list[int], image_id: int, counts: list[int]
) -> tuple[list[int], list[int]]:
    """Expand image placeholders in ids (and -100 labels alongside them)."""
    expanded = expand_image_tokens(ids, image_id, counts)  # checks the counts
    out_labels: list[int] = []
    images = iter(counts)
    for token, label in zip(ids, labels, strict=True):
        out_labels.extend([IGNORE_INDEX] * next(images) if token == image_id else [label])
    return expanded, out_labels


def truncate(example: TrainExample, max_length: int, image_id: int) -> TrainExample:
    """Cut the text to ``max_length`` tokens; ``InvalidSample`` if that would cut image tokens
    or leave nothing supervised."""
    ids, labels, sid = example.input_ids, example.labels, example.sample_id
    if len(ids) > max_length:
        if image_id in ids[max_length:]:
            raise InvalidSample(
                sid,
                f"image tokens cut by truncation at {max_length} tokens (the sample is "
                f"{len(ids)} tokens, {example.image_tokens} of them image tokens)",
            )
        ids, labels = ids[:max_length], labels[:max_length]
    try:
        check_supervised(labels)
    except EmptySupervision:
        raise InvalidSample(
            sid, f"fully masked after truncation at {max_length} tokens (no reply left)"
        ) from None
    return TrainExample(
        ids, labels, example.pixel_values, example.image_sizes, sid, example.image_tokens
    )


def encode_sample(
    processor: LlavaProcessor,
    sample: Any,
    image_folder: str | os.PathLike | None,
    max_length: int,
    index: int | None = None,
) -> TrainExample:
    """Encode one LLaVA JSON sample for training; ``InvalidSample`` says why it cannot be."""
    example = encode_untruncated(processor, sample, image_folder, index)
    return truncate(example, max_length, processor.config.image_token_id)


class LlavaDataset(Dataset):
    """A LLaVA JSON file as a torch Dataset of ``TrainExample``; images load in ``__getitem__``.

    ``skip`` holds indices (into the file) to leave out, e.g. the invalid samples found by
    ``validate_dataset`` (``--skip-invalid``).
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_folder: str | os.PathLike | None,
        processor: LlavaProcessor,
        max_length: int | None = None,
        skip: Iterable[int] = (),
    ) -> None:
        self.data_path = Path(data_path)
        self.image_folder = image_folder
        self.processor = processor
        self.max_length = max_length or processor.config.max_context
        self.samples = load_samples(data_path)
        self.skip = skip

    @property
    def skip(self) -> set[int]:
        """Indices of the file's samples left out (assignable)."""
        return self._skip

    @skip.setter
    def skip(self, indices: Iterable[int]) -> None:
        self._skip = set(indices)
        self.indices = [i for i in range(len(self.samples)) if i not in self._skip]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> TrainExample:
        index = self.indices[k]
        return encode_sample(
            self.processor, self.samples[index], self.image_folder, self.max_length, index
        )

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, positive for samples with images and negative for text-only ones (as
        the original's, for grouping batches by modality); no image is opened."""
        return [_modality_length(self.samples[i]) for i in self.indices]


def _modality_length(sample: Any) -> int:
    if not isinstance(sample, dict):
        return 0
    convs = sample.get("conversations")
    words = sum(
        len(m["value"].split())
        for m in (convs if isinstance(convs, list) else [])
        if isinstance(m, dict) and isinstance(m.get("value"), str)
    )
    return words if sample.get("image") is not None else -words


def collate(examples: list[TrainExample], pad_token_id: int) -> dict[str, Any]:
    """Right-padded batch for ``LlavaForCausalLM.forward`` (labels -100 on padding)."""
    longest = max(len(e.input_ids) for e in examples)
    shape = (len(examples), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": [p for e in examples for p in e.pixel_values],
        "image_sizes": [s for e in examples for s in e.image_sizes],
    }


__all__ = [
    "DatasetFormatError",
    "InvalidSample",
    "LlavaDataset",
    "TrainExample",
    "collate",
    "encode_sample",
    "load_samples",
    "truncate",
]
