"""Supervised data for instruction tuning: every format the data layer reads, validated up front.

Records come from :func:`mmedagent.data.formats.read_records` (MMedAgent / LLaVA JSON and JSONL,
sharegpt ``messages`` + ``images``, HF image + caption data sets, text-only dialogue). Each turn's
text is :meth:`mmedagent.protocol.Message.text` (the one turn format); the prompt and the trained
spans come from the model layer's :func:`~mmedagent.model.templates.render_segments`; images are
decoded lazily with :func:`mmedagent.imaging.load_image`. Labels cover assistant tokens only
(planning and answer turns alike); everything else is ``-100``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmedagent.data.formats import DataError, chat_messages, read_records
from mmedagent.imaging import image_file_problem, load_image
from mmedagent.model.templates import render_segments, tokenizer_of
from mmedagent.protocol import Record
from mmedagent.train.args import FlagError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
SEQ_PAD = {"input_ids": None, "labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0,
           "token_type_ids": 0}
"""Per-token keys and their padding value (None: the tokenizer's pad id)."""


@dataclass(frozen=True)
class Sample:
    """A validated record: where it came from, its chat messages and its resolved images."""

    source: str
    index: int  # 1-based record number in ``source``
    messages: tuple[dict[str, str], ...]
    images: tuple[Any, ...]  # paths, or bytes / PIL images from in-memory data sets

    @property
    def where(self) -> str:
        return f"{self.source}: record {self.index}"


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


DATA_FLAGS = ("--data_path", "--image_folder")
"""The flags a list of data files and its image folders came from, as errors name them."""


def pair_folders(data_paths: list[str], folders: list[str], flags: tuple[str, str] = DATA_FLAGS) -> list[str | None]:
    """MMedAgent's comma-separated ``--image_folder``: one for all data files, or one per file."""
    if not folders:
        return [None] * len(data_paths)
    if len(folders) == 1:
        return folders * len(data_paths)
    if len(folders) != len(data_paths):
        raise FlagError(f"{flags[1]} lists {len(folders)} folders for {len(data_paths)} {flags[0]} file(s); "
                         "give one folder, or one per data file")
    return list(folders)


def _resolve_image(ref: Any, base: str | Path) -> Any:
    """A path from the data, relative to ``base`` unless absolute; in-memory images as they are."""
    return str(Path(base) / ref) if isinstance(ref, (str, Path)) else ref


BAD_IMAGES_SHOWN = 5
"""How many unusable images the error before training names (all are counted)."""


def record_to_sample(record: Record, source: str, index: int, base: str | Path, vision: bool) -> Sample:
    """Check one record and turn it into chat messages (image paths resolved against ``base``); every error
    names file and record."""
    where = f"{source}: record {index}"
    messages = chat_messages(record, where)
    images = tuple(_resolve_image(ref, base) for ref in record.images)
    if images and not vision:
        raise DataError(f"{where}: has an image but the backbone is a text-only model")
    return Sample(source, index, tuple(messages), images)


def load_samples(data_path: str, image_folder: str | None, vision: bool,
                 flags: tuple[str, str] = DATA_FLAGS) -> list[Sample]:
    """Read and validate every record of every (comma-separated) data file, before training starts.

    Images are relative to the file's ``--image_folder`` (MMedAgent's), else to the data file's folder (as
    :func:`~mmedagent.data.formats.read_records` checks them). Each image file's first bytes are read once
    (nothing is decoded) and all unusable images are reported together in one :class:`DataError`. ``flags``:
    the flags ``data_path`` and ``image_folder`` came from, for the errors."""
    paths = split_list(data_path)
    if not paths:
        raise FlagError(f"{flags[0]} is empty")
    samples: list[Sample] = []
    verdicts: dict[str, str | None] = {}  # resolved image path -> problem (records share images)
    bad: list[str] = []
    for path, folder in zip(paths, pair_folders(paths, split_list(image_folder), flags)):
        records = read_records(path, image_folder=folder)
        if not records:
            raise DataError(f"{path}: no records")
        base = folder if folder is not None else Path(path).parent
        for i, record in enumerate(records, 1):
            sample = record_to_sample(record, path, i, base, vision)
            for ref, image in zip(record.images, sample.images):
                if isinstance(image, str):
                    if image not in verdicts:
                        verdicts[image] = image_file_problem(image)
                    if verdicts[image] is not None:
                        bad.append(f"{sample.where}: {verdicts[image]}: {ref}")
            samples.append(sample)
    if bad:
        files = sum(problem is not None for problem in verdicts.values())
        more = f"; and {len(bad) - BAD_IMAGES_SHOWN} more" if len(bad) > BAD_IMAGES_SHOWN else ""
        raise DataError(f"{files} image file(s) cannot be used for training ({len(bad)} reference(s) in the data): "
                        f"{'; '.join(bad[:BAD_IMAGES_SHOWN])}{more}")
    return samples


def token_labels(offsets: Sequence[tuple[int, int]], trained: np.ndarray) -> list[bool]:
    """A token is trained when the last character it covers lies in a trained segment."""
    return [bool(e > s and trained[e - 1]) for s, e in offsets]


CUT_NAMED, CUT_COUNT_EVERY = 3, 100  # records cut to model_max_length: named, then counted every so many


class SupervisedDataset(torch.utils.data.Dataset):
    """Lazily tokenised chat samples with assistant-only labels."""

    def __init__(self, samples: list[Sample], processor: Any, family: str, template: str | None,
                 model_max_length: int):
        # Images go to the processor as they are: LLaVA's ``pad`` is the processor's own (train/run.py gives
        # it a padding image processor, which the Trainer saves), so inference pads exactly as training did.
        self.samples = samples
        self._untrained: set[int] = set()  # records seen with no label left (all of them: an error)
        self._cut: set[str] = set()  # records found longer than model_max_length (the first few are named)
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.family = family
        self.template = template
        self.model_max_length = model_max_length
        self.image_token_id = None
        if family != "causal_lm":
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        mean = getattr(getattr(processor, "image_processor", None), "image_mean", None) or [0.5, 0.5, 0.5]
        self.background = tuple(round(255 * x) for x in mean)

    def blank_image_item(self) -> dict[str, torch.Tensor]:
        """One blank image as a masked-out item (attention 0, no labels): see :class:`Collator`.

        Mllama: its ``cross_attention_mask`` is all zero, so no token attends to the blank (the Collator puts
        it in the first sample's row); :func:`mmedagent.train.modeling.keep_imageless_rows` then makes the
        cross-attention layers leave such rows unchanged, as for a text-only batch."""
        image = Image.new("RGB", (32, 32), self.background)  # the processor resizes it as it needs
        enc = self.processor(text=[self.processor.image_token], images=[image], add_special_tokens=False,
                             return_tensors="pt")
        item = {k: (v[0] if k in SEQ_PAD else v) for k, v in enc.items()}
        item["attention_mask"] = torch.zeros_like(item["input_ids"])
        item["labels"] = torch.full_like(item["input_ids"], IGNORE_INDEX)
        if "cross_attention_mask" in item:
            item["cross_attention_mask"] = torch.zeros_like(item["cross_attention_mask"])
        return item

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Approximate lengths, negative for text-only samples (LLaVA's convention; keyed on the
        samples' images, not on a misspelt ``'images'`` field)."""
        out = []
        for s in self.samples:
            n = sum(len(m["content"]) for m in s.messages) // 4 + 1
            out.append(n + 128 * len(s.images) if s.images else -n)
        return out

    def _images(self, sample: Sample) -> list[Image.Image]:
        out = []
        for ref in sample.images:
            try:
                image = ref.convert("RGB") if isinstance(ref, Image.Image) else load_image(ref).image
            except Exception as e:  # any decoder failure becomes a data error naming the record
                raise DataError(f"{sample.where}: cannot load image: {e}") from e
            out.append(image)
        return out

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Tokenise one sample: model inputs plus ``labels``; truncation never cuts image tokens."""
        segments = render_segments(list(sample.messages), self.template, self.processor)
        text = "".join(t for t, _ in segments)
        trained = np.zeros(len(text), dtype=bool)
        pos = 0
        for t, is_trained in segments:
            trained[pos:pos + len(t)] = is_trained
            pos += len(t)
        tok = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels_t = token_labels(tok["offset_mapping"], trained)
        images = self._images(sample)
        if self.family == "causal_lm":
            enc = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        else:
            enc = self.processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        labels = self._align(tok["input_ids"], labels_t, ids, sample)
        out = dict(enc)
        limit = self.model_max_length
        if len(ids) > limit:
            image_pos = [i for i, t in enumerate(ids) if t == self.image_token_id] if images else []
            if image_pos and image_pos[-1] >= limit:
                raise DataError(f"{sample.where}: the image tokens end at position {image_pos[-1] + 1}, beyond "
                                f"--model_max_length {limit}; raise --model_max_length or use smaller images")
            for k, v in out.items():
                if k in SEQ_PAD or k == "cross_attention_mask":
                    out[k] = v[:, :limit]
            lost = sum(x != IGNORE_INDEX for x in labels[limit:])
            labels = labels[:limit]
            self._note_cut(sample, len(ids), lost, any(x != IGNORE_INDEX for x in labels))
        item = {k: (v[0] if k in SEQ_PAD else v) for k, v in out.items()}
        item["labels"] = torch.tensor(labels, dtype=torch.long)
        return item

    def _note_cut(self, sample: Sample, n_tokens: int, lost: int, trained_left: bool) -> None:
        """Warn of a record cut to ``--model_max_length``, once per record (the first ones by name, then their
        count): only truncation leaves a record without an answer token, as every record has an assistant turn."""
        if sample.where in self._cut:
            return
        self._cut.add(sample.where)
        if len(self._cut) <= CUT_NAMED:
            log.warning("%s: %d tokens, cut to --model_max_length %d (%d answer tokens not trained%s)%s", sample.where,
                        n_tokens, self.model_max_length, lost, "" if trained_left else ": no answer token left",
                        "; further cut records are counted, not named" if len(self._cut) == CUT_NAMED else "")
        elif len(self._cut) % CUT_COUNT_EVERY == 0:
            log.warning("%d records cut to --model_max_length %d so far", len(self._cut), self.model_max_length)

    def _align(self, tok_ids: list[int], tok_labels: list[bool], ids: list[int], sample: Sample) -> list[int]:
        """Labels for the processor's ids, which equal the tokenizer's except for expanded image tokens.

        A run of image tokens in the tokenizer's ids (adjacent ``<image>`` markers, e.g. the ones added for a
        record with several images and no marker) is one run of expanded image tokens in the processor's."""
        labels: list[int] = []
        i = j = 0
        while i < len(tok_ids):
            tid = tok_ids[i]
            if j >= len(ids) or ids[j] != tid:
                raise DataError(f"{sample.where}: processor and tokenizer disagree at token {j}; "
                                "cannot place the labels")
            if tid == self.image_token_id:
                while i < len(tok_ids) and tok_ids[i] == tid:
                    i += 1
                while j < len(ids) and ids[j] == tid:
                    labels.append(IGNORE_INDEX)
                    j += 1
                continue
            labels.append(tid if tok_labels[i] else IGNORE_INDEX)
            i += 1
            j += 1
        if j != len(ids):
            raise DataError(f"{sample.where}: processor produced {len(ids) - j} unexpected trailing tokens")
        return labels

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.encode(self.samples[i])
        if not (item["labels"] != IGNORE_INDEX).any():
            self._untrained.add(i)
            if len(self._untrained) == len(self.samples):  # a run that would train on nothing, loss 0
                raise DataError(f"no record of {', '.join(sorted({s.source for s in self.samples}))} has an answer "
                                f"token left after truncation to --model_max_length {self.model_max_length}; "
                                "raise --model_max_length")
        return item


def _pad_to(t: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    pad = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad, value=value) if any(pad) else t


@dataclass
class Collator:
    """Right-pads per-token keys; concatenates image inputs (zero-padding mllama's batch-first ones).

    ``blank_image`` (several ranks or ZeRO-3, every vision family): appended, masked out, to a batch without
    any image: its tokens join the first sample's sequence (attention 0, labels -100), its image inputs
    become that sample's (Mllama: the first row of the batch-first tensors, with an all-zero
    ``cross_attention_mask``). Every rank must run the vision encoder, the projector (and Mllama's
    cross-attention layers) at every step, in the same order: ZeRO-3 gathers each module's weights
    collectively, and ZeRO-1/2 (like DDP) reduce the gradients of the same parameters on every rank, so a
    rank whose batch has no image deadlocks or breaks the others' collectives. The loss is that of the
    batch without it, and the gradient it gives the projector is zero.
    """

    pad_token_id: int
    family: str
    blank_image: dict[str, torch.Tensor] | None = None

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.blank_image is not None and not any("pixel_values" in x for x in items):
            first, blank = items[0], self.blank_image
            joined = {k: torch.cat([first[k], blank[k]]) for k in SEQ_PAD if k in first}
            items = [{**joined, **{k: v for k, v in blank.items() if k not in SEQ_PAD}}, *items[1:]]
        length = max(len(x["input_ids"]) for x in items)
        batch: dict[str, torch.Tensor] = {}
        for key, value in SEQ_PAD.items():
            if key in items[0]:
                fill = self.pad_token_id if value is None else value
                batch[key] = torch.stack([_pad_to(x[key], (length,), fill) for x in items])
        extra = sorted({k for x in items for k in x} - set(SEQ_PAD))
        for key in extra:
            present = [x[key] for x in items if key in x]
            if self.family == "mllama":
                # batch-first tensors (pixel_values, aspect_ratio_*, cross_attention_mask): one row per sample
                shape = [max(t.shape[d] for t in present) for d in range(present[0].dim())]
                if key == "cross_attention_mask":
                    shape[1] = length
                rows = [_pad_to(x[key], shape, 0) if key in x else present[0].new_zeros(shape) for x in items]
                batch[key] = torch.cat(rows)
            else:  # llava / qwen2_vl: image rows of the samples that have images, in order
                batch[key] = torch.cat(present)
        return batch

