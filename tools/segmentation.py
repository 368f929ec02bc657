"""Promptable segmentation with SAM or MedSAM checkpoints (``segment-anything``), MMedAgent's ``MedSAM``.

Two preprocessing paths, chosen by the checkpoint type (never by accident):

* ``medsam`` — MedSAM's own inference: resize the RGB image to the encoder's square input
  (1024x1024 for MedSAM), min-max scale to [0, 1], call the image encoder directly, scale prompts
  to that grid, sigmoid the low-resolution logits, upsample bilinearly to the image, threshold 0.5.
* ``sam`` — SAM's ``SamPredictor``: resize the longest side, normalise with SAM's pixel mean/std,
  pad; masks are logits > 0 at the image size.

The variant is the ``variant`` option if given, else ``"variant"`` in the checkpoint's JSON config,
else ``medsam`` when the checkpoint's file name says MedSAM, else ``sam``.

Architecture: the standard ``vit_b`` / ``vit_l`` / ``vit_h`` builders of ``sam_model_registry``
(type from the ``model_type`` option or inferred from the weights). A checkpoint of another size
gets a JSON config beside it (``name.pth`` -> ``name.json``, or the ``config`` option) with any of
the keys of :data:`ARCH_DEFAULTS`; it is then built from segment-anything's modules.
"""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
from pydantic import Field, model_validator

from mmedagent.tools._boxes import (
    MAX_PROMPTS,
    Box,
    Point,
    as_pil_rgb,
    check_boxes,
    check_points,
    denormalize_boxes,
    encode_rle,
    mask_to_box,
    pick_device,
    weights_error,
)
from mmedagent.tools.base import Overlay, Tool, ToolParams, ToolResult

DEFAULT_CHECKPOINT = "medsam_vit_b.pth"
HOW_TO_GET = (
    "Download MedSAM's medsam_vit_b.pth (https://github.com/bowang-lab/MedSAM, 'Model checkpoints') or a SAM "
    "checkpoint (e.g. https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth) and pass "
    "checkpoint=PATH (an http(s) URL is downloaded once into torch's hub cache)."
)

# segment-anything's vit_b architecture; a JSON config overrides any of these keys.
ARCH_DEFAULTS: dict[str, Any] = {
    "image_size": 1024,
    "patch_size": 16,
    "encoder_embed_dim": 768,
    "encoder_depth": 12,
    "encoder_num_heads": 12,
    "encoder_global_attn_indexes": [2, 5, 8, 11],
    "window_size": 14,
    "prompt_embed_dim": 256,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}
# segment-anything's larger encoders; a config's "model_type" starts from one of these.
PRESETS: dict[str, dict[str, Any]] = {
    "vit_b": {},
    "vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": [7, 15, 23, 31],
    },
}
ENCODER_WIDTH_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
CONFIG_ONLY_KEYS = {"variant", "model_type"}

DECODE_BATCH = 16
"""Prompts decoded together. The mask decoder copies the image embedding once per prompt (4 MB for SAM's
256x64x64) and SAM upsamples every mask to the image size as floats, so many boxes (a composite's detections)
go through in slices of this many, each mask encoded as RLE as soon as it is made."""


def build_sam(arch: dict[str, Any]):
    """A ``segment_anything.modeling.Sam`` of any size: :data:`ARCH_DEFAULTS` keys over the preset of
    ``model_type`` (default ``vit_b``)."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    unknown = set(arch) - set(ARCH_DEFAULTS) - CONFIG_ONLY_KEYS
    if unknown:
        raise ValueError(f"unknown SAM config keys {sorted(unknown)}; known: {sorted(ARCH_DEFAULTS)}")
    preset = arch.get("model_type", "vit_b")
    if preset not in PRESETS:
        raise ValueError(f"SAM config model_type must be one of {sorted(PRESETS)}, got {preset!r}")
    a = {**ARCH_DEFAULTS, **PRESETS[preset], **{k: v for k, v in arch.items() if k not in CONFIG_ONLY_KEYS}}
    grid = a["image_size"] // a["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=a["encoder_depth"],
            embed_dim=a["encoder_embed_dim"],
            img_size=a["image_size"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a["encoder_num_heads"],
            patch_size=a["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(a["encoder_global_attn_indexes"]),
            window_size=a["window_size"],
            out_chans=a["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a["prompt_embed_dim"],
            image_embedding_size=(grid, grid),
            input_image_size=(a["image_size"], a["image_size"]),
            mask_in_chans=a["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=a["decoder_depth"],
                embedding_dim=a["prompt_embed_dim"],
                mlp_dim=a["decoder_mlp_dim"],
                num_heads=a["decoder_num_heads"],
            ),
            transformer_dim=a["prompt_embed_dim"],
            iou_head_depth=a["iou_head_depth"],
            iou_head_hidden_dim=a["iou_head_hidden_dim"],
        ),
    )


def _infer_model_type(state: dict, ref: str) -> str:
    weight = state.get("image_encoder.patch_embed.proj.weight")
    width = None if weight is None else int(weight.shape[0])
    if width not in ENCODER_WIDTH_TO_TYPE:
        raise ValueError(
            f"segmentation: cannot tell the SAM size of {ref!r} (encoder width {width}); pass model_type "
            "or put a JSON architecture config beside it (see the module docstring)"
        )
    return ENCODER_WIDTH_TO_TYPE[width]


def medsam_preprocess(image: Any, size: int):
    """MedSAM's input: RGB resized to size x size (bicubic), min-max scaled to [0, 1], (1, 3, S, S)."""
    import torch
    from PIL import Image

    arr = np.asarray(as_pil_rgb(image).resize((size, size), Image.BICUBIC), dtype=np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-8)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


class SegmentationParams(ToolParams):
    boxes: list[Box] | None = Field(
        None, max_length=MAX_PROMPTS,
        description=f"[[x1, y1, x2, y2], ...] normalised to [0, 1]; one mask per box (at most {MAX_PROMPTS}).",
    )
    points: list[Point] | None = Field(
        None, max_length=MAX_PROMPTS,
        description=f"[[x, y], ...] normalised to [0, 1]; refine each box, or make one mask alone (at most "
                    f"{MAX_PROMPTS}).",
    )
    point_labels: list[Literal[0, 1]] | None = Field(
        None, description="1 = inside the object, 0 = outside; one per point (default all 1)."
    )

    @model_validator(mode="after")
    def _prompts_make_sense(self):
        if not self.boxes and not self.points:
            raise ValueError("give boxes and/or points to segment")
        point_labels_for(len(self.points or []), self.point_labels)
        return self


def point_labels_for(n_points: int, point_labels: Any) -> np.ndarray:
    """The labels of ``n_points`` points: ``point_labels`` (one 0 or 1 per point) or all 1."""
    if point_labels is None:
        return np.ones(n_points, dtype=np.int64)
    labels = np.asarray(point_labels).reshape(-1)
    if len(labels) != n_points:
        raise ValueError(f"{len(labels)} point_labels for {n_points} points")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("point_labels must be 1 (inside the object) or 0 (outside)")
    return labels.astype(np.int64)


class SegmentationResult(ToolResult):
    boxes: list[list[float]] = Field(description="Normalised box around each mask ([] for an empty mask).")
    areas: list[int] = Field(description="Pixels in each mask.")
    masks: list[dict[str, Any]] = Field(description="COCO RLE of each mask (for the UI).")

    hidden_from_model = frozenset({"masks"})

    def overlay(self) -> Overlay:
        return Overlay(boxes=self.boxes, masks=self.masks)


def masks_result(masks: Iterable[np.ndarray]) -> SegmentationResult:
    """Result fields for bool HxW masks, read once each (a generator keeps one full-size mask in memory)."""
    boxes, areas, rles = [], [], []
    for m in masks:
        boxes.append(mask_to_box(m) or [])
        areas.append(int(m.sum()))
        rles.append(encode_rle(m))
    return SegmentationResult(boxes=boxes, areas=areas, masks=rles)


class SegmentationTool(Tool):
    """SAM / MedSAM segmentation from box and point prompts.

    Options: ``checkpoint`` (``.pth`` path or http(s) URL; default ``medsam_vit_b.pth``),
    ``variant`` (``medsam`` | ``sam``; see the module docstring), ``model_type`` (``vit_b`` |
    ``vit_l`` | ``vit_h``, inferred from the weights when omitted), ``config`` (JSON architecture
    for other sizes; default: beside the checkpoint), ``device``.
    """

    name = "segmentation"
    aliases = ("MedSAM", "SAM")
    description = (
        "Segment the object inside each box (or at the points) with MedSAM/SAM; "
        "returns the box and pixel area of each mask (masks are drawn for the user)."
    )
    Params = SegmentationParams
    Result = SegmentationResult

    def load(self) -> None:
        import torch

        ref = str(self.options.get("checkpoint", DEFAULT_CHECKPOINT))
        state, arch, source = self._read(ref)
        variant = (
            self.options.get("variant") or arch.get("variant") or ("medsam" if "medsam" in source.lower() else "sam")
        )
        if variant not in ("medsam", "sam"):
            raise ValueError(f"segmentation: variant must be 'medsam' or 'sam', got {variant!r}")
        model_type = self.options.get("model_type") or arch.get("model_type")
        if any(k not in CONFIG_ONLY_KEYS for k in arch):
            model = build_sam({**arch, **({"model_type": model_type} if model_type else {})})
        else:
            from segment_anything import sam_model_registry

            model_type = model_type or _infer_model_type(state, ref)
            if model_type not in sam_model_registry:
                raise ValueError(
                    f"segmentation: model_type must be one of {sorted(sam_model_registry)}, got {model_type!r}"
                )
            model = sam_model_registry[model_type](checkpoint=None)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise RuntimeError(
                f"segmentation: {ref!r} does not match the {model_type or 'configured'} SAM architecture: {e}"
            ) from e
        self.device = pick_device(self.options.get("device"))
        self.model = model.to(self.device).eval()
        self.variant = variant
        self.input_size = int(model.image_encoder.img_size)
        self._lock = threading.Lock()  # SamPredictor keeps per-image state
        self._torch = torch
        if variant == "sam":
            from segment_anything import SamPredictor

            self.predictor = SamPredictor(self.model)
        self.weights_note = f"{'MedSAM' if variant == 'medsam' else 'SAM'}: {Path(source).name}"

    def _read(self, ref: str) -> tuple[dict, dict, str]:
        """(state dict, architecture config, source name) of a checkpoint path or URL."""
        import torch

        if urlparse(ref).scheme in ("http", "https", "file"):
            try:
                state = torch.hub.load_state_dict_from_url(ref, map_location="cpu", weights_only=True)
            except OSError as e:
                raise weights_error(self.name, ref, HOW_TO_GET, e) from e
            config_path = self.options.get("config")
            source = Path(urlparse(ref).path).name
        else:
            path = Path(ref).expanduser()
            if not path.is_file():
                why = "a folder, not a .pth file" if path.is_dir() else "no such file"
                raise weights_error(self.name, ref, HOW_TO_GET, FileNotFoundError(why))
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise weights_error(self.name, ref, HOW_TO_GET, ValueError(
                    "not a PyTorch checkpoint (a state dict saved with torch.save), or a damaged one")) from e
            config_path = self.options.get("config") or (
                path.with_suffix(".json") if path.with_suffix(".json").is_file() else None
            )
            source = path.name
        if not isinstance(state, dict):
            raise weights_error(self.name, ref, HOW_TO_GET, TypeError(f"holds a {type(state).__name__}, not a state dict"))
        for key in ("model", "state_dict"):  # training checkpoints wrap the weights
            if isinstance(state.get(key), dict):
                state = state[key]
        return state, self._arch(config_path), source

    def _arch(self, config_path: str | Path | None) -> dict:
        """The JSON architecture config at ``config_path`` ({} for none)."""
        if not config_path:
            return {}
        try:
            arch = json.loads(Path(config_path).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"segmentation: cannot read the SAM architecture config {str(config_path)!r} "
                             f"({type(e).__name__}: {' '.join(str(e).split())}); give a JSON file of the keys in "
                             "ARCH_DEFAULTS, or leave the config option out for a standard vit_b/l/h checkpoint") from e
        if not isinstance(arch, dict):
            raise ValueError(f"segmentation: the SAM architecture config {str(config_path)!r} must be a JSON object, "
                             f"not a {type(arch).__name__}")
        return arch

    def segment(self, image: Any, boxes=None, points=None, point_labels=None) -> SegmentationResult:
        """Masks for normalised boxes and/or points (lists or arrays) on an image; any number of boxes
        (they are decoded :data:`DECODE_BATCH` at a time)."""
        boxes = None if boxes is None or len(boxes) == 0 else check_boxes(boxes)
        points = None if points is None or len(points) == 0 else check_points(points)
        if boxes is None and points is None:
            raise ValueError("give boxes and/or points to segment")
        labels = point_labels_for(0 if points is None else len(points), point_labels)
        img = as_pil_rgb(image)
        w, h = img.size
        boxes_px = None if boxes is None else denormalize_boxes(boxes, w, h)
        points_px = None if points is None else points * [w, h]
        decode = self._medsam if self.variant == "medsam" else self._sam
        with self._lock, self._torch.inference_mode():
            return masks_result(decode(img, boxes_px, points_px, labels))

    def _prompt_batches(self, boxes, points, labels, scale) -> Iterator[tuple[Any, Any]]:
        """(boxes, (point coords, point labels)) tensors of :data:`DECODE_BATCH` prompts at a time, scaled to
        the encoder's grid: one prompt per box (points shared), or one from the points alone."""
        torch = self._torch
        n = len(boxes) if boxes is not None else 1
        box_t = (
            torch.as_tensor(boxes * np.tile(scale, 2), dtype=torch.float, device=self.device)
            if boxes is not None
            else None
        )
        pts = None
        if points is not None:
            coords = torch.as_tensor(points * scale, dtype=torch.float, device=self.device)[None].expand(n, -1, -1)
            pts = (coords, torch.as_tensor(labels, device=self.device)[None].expand(n, -1))
        for i in range(0, n, DECODE_BATCH):
            part = slice(i, i + DECODE_BATCH)
            yield (None if box_t is None else box_t[part]), (None if pts is None else (pts[0][part], pts[1][part]))

    def _medsam(self, img, boxes, points, labels) -> Iterator[np.ndarray]:
        torch = self._torch
        w, h = img.size
        s = self.input_size
        embedding = self.model.image_encoder(medsam_preprocess(img, s).to(self.device))
        for box_t, pts in self._prompt_batches(boxes, points, labels, np.array([s / w, s / h])):
            sparse, dense = self.model.prompt_encoder(
                points=pts, boxes=None if box_t is None else box_t[:, None, :], masks=None
            )
            low_res, _ = self.model.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            # one mask at a time: a float map at full size is 4 bytes a pixel (≈ 200 MB for a 8000x6000 scan)
            for m in low_res:
                yield (torch.nn.functional.interpolate(torch.sigmoid(m[None]), size=(h, w), mode="bilinear",
                                                       align_corners=False)[0, 0] > 0.5).cpu().numpy()

    def _sam(self, img, boxes, points, labels) -> Iterator[np.ndarray]:
        torch = self._torch
        w, h = img.size
        self.predictor.set_image(np.asarray(img))
        new_h, new_w = self.predictor.input_size
        multimask = boxes is None and len(points) == 1  # a single click is ambiguous: keep SAM's best of 3
        for box_t, pts in self._prompt_batches(boxes, points, labels, np.array([new_w / w, new_h / h])):
            masks, scores, _ = self.predictor.predict_torch(
                point_coords=None if pts is None else pts[0],
                point_labels=None if pts is None else pts[1],
                boxes=box_t,
                multimask_output=multimask,
            )
            best = scores.argmax(dim=1)
            yield from masks[torch.arange(len(masks)), best].cpu().numpy()

    def __call__(self, image: Any, params: SegmentationParams) -> SegmentationResult:
        return self.segment(image, params.boxes, params.points, params.point_labels)
