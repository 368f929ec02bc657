"""Vision tools (grounding, segmentation, grounding+segmentation, classification), box/mask helpers and
overlay rendering — on tiny random models saved and loaded through the user-facing paths."""

import numpy as np
import pytest
import torch
from PIL import Image

from _tools_fixtures import (
    TINY_SAM,
    scan_16bit,
    scan_image,
    save_tiny_grounding_dino,
    save_tiny_open_clip,
    save_tiny_sam,
)
from mmedagent.dispatcher import Dispatcher
from mmedagent.protocol import AssistantTurn, ToolCall, parse_tool_results, parse_turn, render_tool_results, render_turn
from mmedagent.render import PALETTE, render
from mmedagent.tools import Overlay, get_tool
from mmedagent.tools._boxes import (
    as_pil_rgb,
    box_iou,
    check_boxes,
    decode_rle,
    denormalize_boxes,
    encode_rle,
    mask_to_box,
    nms,
    normalize_boxes,
    rle_area,
    rle_counts,
    string_to_counts,
)
from mmedagent.tools.classification import MODALITY_LABELS, ClassificationTool
from mmedagent.tools.grounding import GroundingTool
from mmedagent.tools.grounding_segmentation import GroundingSegmentationTool
from mmedagent.tools.segmentation import SegmentationTool, medsam_preprocess

# --- boxes, NMS, RLE -------------------------------------------------------------------------


def test_normalise_and_back():
    px = [[10, 20, 50, 40], [0, 0, 200, 100]]
    norm = normalize_boxes(px, width=200, height=100)
    assert norm.tolist() == [[0.05, 0.2, 0.25, 0.4], [0.0, 0.0, 1.0, 1.0]]
    assert np.allclose(denormalize_boxes(norm, 200, 100), px)
    assert normalize_boxes([[-5, 10, 250, 90]], 200, 100).tolist() == [[0.0, 0.1, 1.0, 0.9]]  # clipped


def test_check_boxes_rejects_pixels_and_flipped():
    check_boxes([[0.1, 0.2, 0.3, 0.4]])
    with pytest.raises(ValueError, match="normalised"):
        check_boxes([[10, 20, 30, 40]])
    with pytest.raises(ValueError, match="x1 <= x2"):
        check_boxes([[0.5, 0.2, 0.3, 0.4]])


def test_iou_known_values():
    a = [[0, 0, 2, 2]]
    b = [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 0, 0]]
    assert np.allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0, 0.0]])


def test_nms_known_inputs():
    boxes = [[0, 0, 10, 10], [0, 0, 10, 9.5], [0, 0, 10, 5], [20, 20, 30, 30]]
    scores = [0.8, 0.9, 0.7, 0.6]
    # box 0 overlaps box 1 with IoU 0.95 > 0.8 -> suppressed; box 2 (IoU 0.53 with box 1) stays.
    assert nms(boxes, scores, 0.8) == [1, 2, 3]
    assert nms(boxes, scores, 0.5) == [1, 3]
    assert nms(np.zeros((0, 4)), [], 0.5) == []


def test_mask_to_box_uses_pixel_edges():
    m = np.zeros((10, 20), bool)
    m[2:5, 4:8] = True
    assert mask_to_box(m) == [4 / 20, 2 / 10, 8 / 20, 5 / 10]
    assert mask_to_box(np.ones((3, 3))) == [0, 0, 1, 1]
    assert mask_to_box(np.zeros((3, 3))) is None


def test_rle_known_coco_values():
    # Reference strings produced by pycocotools.mask.encode(np.asfortranarray(m)).
    m = np.zeros((5, 7), np.uint8)
    m[1:4, 2:6] = 1
    m[0, 6] = 1
    m[4, 0] = 1
    assert rle_counts(m) == [4, 1, 6, 3, 2, 3, 2, 3, 2, 3, 1, 1, 4]  # column-major, zeros first
    assert encode_rle(m) == {"size": [5, 7], "counts": "4162L00000ON3"}
    big = np.zeros((40, 50), np.uint8)
    big[3:30, 5:45] = 1
    big[10:20, 10:12] = 0
    expected = "[6k0=00000000\\OM33MM33a" + "0" * 65 + "U6"
    assert encode_rle(big)["counts"] == expected
    assert (decode_rle({"size": [40, 50], "counts": expected.encode()}) == big.astype(bool)).all()


def test_rle_round_trip_and_uncompressed_form():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 5), (17, 9), (64, 48)]:
        for p in (0.0, 0.3, 1.0):
            m = rng.random(shape) < p
            rle = encode_rle(m)
            assert (decode_rle(rle) == m).all()
            assert rle_area(rle) == int(m.sum())
            assert string_to_counts(rle["counts"]) == rle_counts(m)
    starts_with_one = np.array([[1, 0], [1, 1]], bool)  # F order: 1,1,0,1
    assert rle_counts(starts_with_one) == [0, 2, 1, 1]
    assert (decode_rle({"size": [2, 2], "counts": [0, 2, 1, 1]}) == starts_with_one).all()
    with pytest.raises(ValueError, match="expected 2x2"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})


def test_as_pil_rgb_accepts_arrays():
    grey16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    img = as_pil_rgb(grey16)
    assert img.mode == "RGB" and img.size == (4, 3)
    assert np.asarray(img)[0, 0, 0] == 0 and np.asarray(img)[2, 3, 0] == 255
    with pytest.raises(ValueError, match="shape"):
        as_pil_rgb(np.zeros((2, 3, 5)))


def test_as_pil_rgb_scales_wide_pil_images_like_arrays():
    """16-bit, 32-bit and float PIL images are min-max scaled like arrays, not clipped to white."""
    scan = scan_16bit()
    values = np.asarray(scan)
    expected = np.asarray(as_pil_rgb(values))
    assert expected.min() == 0 and expected.max() == 255
    for img in (scan, Image.fromarray(values.astype(np.int32)), Image.fromarray(values.astype(np.float32))):
        assert np.array_equal(np.asarray(as_pil_rgb(img)), expected), img.mode


def test_as_pil_rgb_ignores_the_alpha_of_wide_rgba_arrays():
    """A 12-bit colour array with an opaque 16-bit alpha was scaled by the alpha's 65535: nearly black."""
    rgb = (np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3) * 240) % 4096
    rgba = np.concatenate([rgb, np.full((2, 3, 1), 65535, dtype=np.uint16)], axis=-1)
    expected = np.asarray(as_pil_rgb(rgb))
    assert expected.max() == 255
    assert np.array_equal(np.asarray(as_pil_rgb(rgba)), expected)
    assert np.array_equal(np.asarray(as_pil_rgb(rgba.astype(np.float32) / 65535)), expected)
    rgba8 = (rgba // 257).astype(np.uint8)
    assert np.array_equal(np.asarray(as_pil_rgb(rgba8)), np.asarray(Image.fromarray(rgba8).convert("RGB")))


def test_as_pil_rgb_scales_over_finite_values():
    """One NaN (a masked MRI map's background) used to turn the whole image black."""
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    holes = values.copy()
    holes[0, 0], holes[0, 1], holes[2, 3] = np.nan, -np.inf, np.inf
    filled = values.copy()
    filled[0, :2], filled[2, 3] = 2, 10  # the finite minimum and maximum of ``holes``
    assert np.array_equal(np.asarray(as_pil_rgb(holes)), np.asarray(as_pil_rgb(filled)))
    assert np.asarray(as_pil_rgb(filled)).max() == 255
    assert np.asarray(as_pil_rgb(np.full((2, 2), np.nan))).max() == 0


# --- rendering -------------------------------------------------------------------------------


def test_render_draws_box_and_mask_where_they_are():
    img = Image.new("RGB", (100, 80), (0, 0, 0))
    mask = np.zeros((80, 100), bool)
    mask[50:70, 10:30] = True
    out = render(
        img, [Overlay(boxes=[[0.5, 0.25, 0.9, 0.75]], labels=["tumor"]), Overlay(masks=[encode_rle(mask)]), None]
    )
    px = np.asarray(out).astype(int)
    assert out.size == img.size and np.asarray(img).max() == 0  # input untouched
    assert tuple(px[40, 50]) == PALETTE[0]  # left edge of the box, first colour
    assert px[40, 70].sum() == 0  # inside the box, no mask: unchanged
    assert px[60, 20].sum() > 0 and px[60, 40].sum() == 0  # mask blended only inside the mask
    assert np.allclose(px[60, 20], np.array(PALETTE[1]) * 0.45, atol=1)
    assert px[:18, 50:90].sum() > 0  # label drawn above the box
    assert px[:, :45][:45].sum() == 0  # nothing elsewhere


def test_an_empty_mask_keeps_the_next_box_in_its_mask_colour():
    """Segmentation reports an empty mask's box as ``[]``; the boxes after it keep their masks' colour."""
    from mmedagent.tools.segmentation import masks_result

    masks = np.zeros((2, 80, 100), bool)
    masks[1, 20:60, 30:70] = True
    out = np.asarray(render(Image.new("RGB", (100, 80)), masks_result(masks).overlay())).astype(int)
    assert tuple(out[40, 30]) == PALETTE[1]  # the second mask's box outline, in the second colour
    assert np.allclose(out[40, 50], np.array(PALETTE[1]) * 0.45, atol=1)  # and its fill


# --- tiny models -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_weights")
    return {
        "grounding": save_tiny_grounding_dino(root / "grounding-dino"),
        "medsam": save_tiny_sam(root / "sam", "tiny_medsam_vit"),
        "sam": save_tiny_sam(root / "sam", "tiny_sam_vit"),
        "clip": save_tiny_open_clip(root / "biomedclip-tiny"),
    }


@pytest.fixture(scope="session")
def grounding(weights):
    tool = GroundingTool(model=str(weights["grounding"]))
    tool.ensure_loaded()
    return tool


@pytest.fixture(scope="session")
def medsam(weights):
    tool = SegmentationTool(checkpoint=str(weights["medsam"]))
    tool.ensure_loaded()
    return tool


@pytest.fixture(scope="session")
def sam(weights):
    tool = SegmentationTool(checkpoint=str(weights["sam"]))
    tool.ensure_loaded()
    return tool


@pytest.fixture(scope="session")
def classifier(weights):
    tool = ClassificationTool(model=str(weights["clip"]))
    tool.ensure_loaded()
    return tool


@pytest.fixture(scope="session")
def dispatcher(grounding, medsam, classifier):
    d = Dispatcher([grounding, medsam, classifier, GroundingSegmentationTool(grounding=grounding, segmentation=medsam)])
    yield d
    d.close()


def call(name, **params):
    return ToolCall(API_name=name, API_params=params)


def test_registry_finds_the_four_tools_by_mmedagent_names():
    assert get_tool("grounding dino") is GroundingTool
    assert get_tool("medsam") is SegmentationTool and get_tool("SAM") is SegmentationTool
    assert get_tool("Grounding DINO + MedSAM") is GroundingSegmentationTool
    assert get_tool("BiomedClip") is ClassificationTool


# grounding


def test_grounding_boxes_normalised_sorted_and_suppressed(grounding):
    img = scan_image(150, 130)
    out = grounding(img, GroundingTool.Params(prompts=["tumor", " lesion "], box_threshold=0.0, text_threshold=0.0))
    assert out.boxes and len(out.boxes) == len(out.logits) == len(out.phrases)
    b = np.array(out.boxes)
    assert (b >= 0).all() and (b <= 1).all() and (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert out.logits == sorted(out.logits, reverse=True)
    iou = box_iou(b, b)
    assert (iou[~np.eye(len(b), dtype=bool)] <= 0.8 + 1e-6).all()  # NMS at IoU 0.8
    for phrase in out.phrases:
        assert set(phrase.split()) <= {"tumor", "lesion"}  # no [SEP] or dots
    strict = grounding(img, GroundingTool.Params(prompts=["tumor"], box_threshold=0.999))
    assert strict.boxes == [] and strict.for_model() == {"boxes": [], "logits": [], "phrases": []}



def test_grounding_max_boxes_keeps_the_best(weights):
    img = scan_image(150, 130)
    params = GroundingTool.Params(prompts=["tumor"], box_threshold=0.0, text_threshold=0.0)
    every = GroundingTool(model=str(weights["grounding"]))
    capped = GroundingTool(model=str(weights["grounding"]), max_boxes=2)
    every.load()
    capped.load()
    full, top = every(img, params), capped(img, params)
    assert len(full.boxes) > 2 and top.boxes == full.boxes[:2] and top.logits == full.logits[:2]
    with pytest.raises(ValueError, match="max_boxes must be at least 1"):
        GroundingTool(model=str(weights["grounding"]), max_boxes=0).load()


def test_grounding_matches_direct_model_call(grounding, weights):
    """The tool's boxes are the model's own relative boxes (cxcywh -> xyxy), thresholded, NMS at 0.8."""
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    img = scan_image(140, 128)
    processor = AutoProcessor.from_pretrained(weights["grounding"])
    model = GroundingDinoForObjectDetection.from_pretrained(weights["grounding"]).eval()
    inputs = processor(images=img, text="tumor . mass .", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    scores = outputs.logits.sigmoid().max(-1).values[0].numpy()
    cx, cy, w, h = outputs.pred_boxes[0].numpy().T
    boxes = np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1), 0, 1)
    keep = scores > 0.4
    order = nms(boxes[keep], scores[keep], 0.8)
    assert order  # the tiny model does find something above 0.4
    out = grounding(img, GroundingTool.Params(prompts=["Tumor", "mass"], box_threshold=0.4, text_threshold=0.25))
    assert np.allclose(out.boxes, boxes[keep][order], atol=1e-5)
    assert np.allclose(out.logits, scores[keep][order], atol=1e-5)


def test_grounding_param_errors(dispatcher):
    img = scan_image(130, 130)
    assert "prompt 1 is empty" in dispatcher.dispatch(call("grounding dino", prompts=["tumor", " "]), img).error
    assert "prompts" in dispatcher.dispatch(call("grounding dino", prompts=[]), img).error
    assert "box_threshold" in dispatcher.dispatch(call("grounding dino", prompts=["x"], box_threshold=2), img).error


def test_grounding_prompts_longer_than_the_text_encoder_are_a_clear_error(dispatcher):
    """The tiny model reads 32 text tokens; 12 four-word prompts make 62 (was a tensor-size crash)."""
    img = scan_image(130, 130)
    words = ["tumor", "lesion", "cell", "nucleus", "liver", "kidney", "brain", "lung", "heart", "mass"]
    prompts = [" ".join(words[i : i + 4] if i < 7 else words[i - 7 : i - 3][::-1]) for i in range(12)]
    assert len(set(prompts)) == 12
    err = dispatcher.dispatch(call("grounding dino", prompts=prompts), img).error
    assert "62 text tokens" in err and "at most 32" in err and "fewer or shorter prompts" in err
    assert dispatcher.dispatch(call("grounding dino", prompts=prompts[:6]), img).ok


def test_repeated_prompts_are_read_once_and_separator_only_prompts_are_refused(dispatcher):
    """A repeat (any case or spacing) spent the detector's text tokens for nothing: 12 copies of a prompt were
    refused as too long; a prompt of '.' (Grounding DINO's phrase separator) named nothing and gave empty phrases."""
    assert GroundingTool.Params(prompts=["tumor", " Tumor", "liver  mass", "LIVER mass"]).prompts == ["tumor",
                                                                                                  "liver mass"]
    img = scan_image(130, 130)
    assert dispatcher.dispatch(call("grounding dino", prompts=["tumor lesion cell nucleus"] * 12), img).ok
    for bad in (".", " . ", "?"):
        err = dispatcher.dispatch(call("grounding dino", prompts=["tumor", bad]), img).error
        assert "prompt 1" in err and "names nothing" in err


def test_an_image_too_elongated_for_the_detector_is_a_clear_error_and_the_turn_goes_on(dispatcher):
    """The tiny detector scales the long side to 160 px: a 2000x1 strip would keep no row (was transformers'
    "Size must contain 'height' and 'width' keys" error)."""
    strip = scan_image(2000, 1)
    calls = [call("grounding dino", prompts=["tumor"]), call("grounding dino + MedSAM", prompts=["tumor"]),
             call("MedSAM", boxes=[[0, 0, 1, 1]])]
    outcomes, _ = dispatcher.dispatch_all(calls, strip)
    for o in outcomes[:2]:
        assert "the image is 2000x1 pixels" in o.error and "under 160:1" in o.error
    assert outcomes[2].ok
    assert dispatcher.dispatch(call("grounding dino", prompts=["tumor"]), scan_image(300, 2)).ok  # 160:1 reads


# segmentation


def test_variant_follows_checkpoint_type(weights, medsam, sam):
    assert medsam.variant == "medsam" and sam.variant == "sam"
    forced = SegmentationTool(checkpoint=str(weights["medsam"]), variant="sam")
    forced.ensure_loaded()
    assert forced.variant == "sam"
    with pytest.raises(ValueError, match="variant must be"):
        SegmentationTool(checkpoint=str(weights["sam"]), variant="sam2").ensure_loaded()


def test_variant_from_config_and_url(tmp_path, monkeypatch):
    ckpt = save_tiny_sam(tmp_path, "weights_v3", variant="medsam")
    tool = SegmentationTool(checkpoint=str(ckpt))
    tool.ensure_loaded()
    assert tool.variant == "medsam" and tool.input_size == TINY_SAM["image_size"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    url_tool = SegmentationTool(checkpoint=ckpt.as_uri(), config=str(ckpt.with_suffix(".json")))
    url_tool.ensure_loaded()
    assert url_tool.variant == "medsam"
    assert (tmp_path / "hub" / "hub" / "checkpoints" / ckpt.name).is_file()  # cached like any torch hub download


def test_sam_size_from_weights_and_config_errors(tmp_path):
    from mmedagent.tools.segmentation import _infer_model_type, build_sam

    assert _infer_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}, "x") == "vit_h"
    with pytest.raises(ValueError, match="encoder width 32.*JSON architecture config"):
        _infer_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(32, 3, 8, 8)}, "x")
    with pytest.raises(ValueError, match="unknown SAM config keys"):
        build_sam({"encoder_width": 8})
    ckpt = save_tiny_sam(tmp_path, "odd")
    ckpt.with_suffix(".json").unlink()  # weights of a non-standard size without their config
    with pytest.raises(ValueError, match="cannot tell the SAM size"):
        SegmentationTool(checkpoint=str(ckpt)).ensure_loaded()


def _capture_encoder_and_prompts(tool):
    seen = {}
    h1 = tool.model.image_encoder.register_forward_pre_hook(lambda m, args: seen.__setitem__("pixels", args[0].clone()))
    h2 = tool.model.prompt_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("prompt", kwargs), with_kwargs=True
    )
    return seen, (h1, h2)


def test_medsam_preprocessing_matches_reference(medsam):
    img = scan_image(48, 40)
    s = TINY_SAM["image_size"]
    box = [0.25, 0.2, 0.75, 0.9]
    seen, hooks = _capture_encoder_and_prompts(medsam)
    try:
        out = medsam(img, SegmentationTool.Params(boxes=[box]))
    finally:
        for h in hooks:
            h.remove()
    # MedSAM: resize to S x S, min-max to [0, 1], no mean/std, no padding.
    ref = np.asarray(img.resize((s, s), Image.BICUBIC), dtype=np.float32)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    pixels = seen["pixels"][0].permute(1, 2, 0).numpy()
    assert pixels.shape == (s, s, 3) and np.allclose(pixels, ref, atol=1e-6)
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert torch.allclose(medsam_preprocess(img, s), seen["pixels"])
    # Box scaled to the S grid: box / [W, H, W, H] * S.
    assert torch.allclose(seen["prompt"]["boxes"], torch.tensor([[[0.25 * s, 0.2 * s, 0.75 * s, 0.9 * s]]]))
    # Mask: sigmoid of the low-res logits, bilinear to the image size, > 0.5.
    m = medsam.model
    with torch.no_grad():
        emb = m.image_encoder(torch.from_numpy(ref).permute(2, 0, 1)[None])
        sparse, dense = m.prompt_encoder(points=None, boxes=seen["prompt"]["boxes"], masks=None)
        low, _ = m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
        prob = torch.nn.functional.interpolate(low.sigmoid(), size=(40, 48), mode="bilinear", align_corners=False)
    assert (decode_rle(out.masks[0]) == (prob[0, 0] > 0.5).numpy()).all()
    assert out.areas[0] == int((prob[0, 0] > 0.5).sum())


def test_sam_preprocessing_matches_reference(sam):
    from segment_anything.utils.transforms import ResizeLongestSide

    img = scan_image(48, 40)
    s = TINY_SAM["image_size"]
    seen, hooks = _capture_encoder_and_prompts(sam)
    try:
        out = sam(img, SegmentationTool.Params(boxes=[[0.25, 0.2, 0.75, 0.9]]))
    finally:
        for h in hooks:
            h.remove()
    # SAM: longest side to S, (x - mean) / std with SAM's pixel statistics, zero-pad to S x S.
    resized = ResizeLongestSide(s).apply_image(np.asarray(img)).astype(np.float32)
    assert resized.shape[:2] == (53, 64)
    norm = (resized - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    ref = np.zeros((s, s, 3), np.float32)
    ref[:53, :64] = norm
    assert np.allclose(seen["pixels"][0].permute(1, 2, 0).numpy(), ref, atol=1e-4)
    # Box scaled by the resize factors (64/48, 53/40), not to a square grid.
    expected = torch.tensor([[[0.25 * 48 * 64 / 48, 0.2 * 40 * 53 / 40], [0.75 * 48 * 64 / 48, 0.9 * 40 * 53 / 40]]])
    assert torch.allclose(seen["prompt"]["boxes"].reshape(1, 2, 2), expected, atol=1e-4)
    assert decode_rle(out.masks[0]).shape == (40, 48)


def test_segmentation_boxes_points_and_compact_form(medsam, sam):
    img = scan_image(48, 40)
    for tool in (medsam, sam):
        out = tool(img, SegmentationTool.Params(boxes=[[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8]]))
        assert len(out.masks) == len(out.areas) == len(out.boxes) == 2
        for rle, area, box in zip(out.masks, out.areas, out.boxes, strict=True):
            mask = decode_rle(rle)
            assert mask.shape == (40, 48) and area == mask.sum()
            assert box == (mask_to_box(mask) or [])
        compact = out.for_model()
        assert set(compact) == {"boxes", "areas"}  # masks hidden from the model
        overlay = out.overlay()
        assert overlay.masks == out.masks
        one = tool(img, SegmentationTool.Params(points=[[0.5, 0.5], [0.1, 0.1]], point_labels=[1, 0]))
        assert len(one.masks) == 1
        click = tool(img, SegmentationTool.Params(points=[[0.6, 0.4]]))
        assert len(click.masks) == 1


def test_segment_takes_arrays_and_refuses_pixel_boxes(medsam):
    """``segment()`` (the call without a params object) failed on numpy prompts ("truth value of an array is
    ambiguous") and segmented pixel boxes as if they were normalised."""
    img = scan_image(48, 40)
    boxes = [[0.1, 0.1, 0.5, 0.5], [0.4, 0.3, 0.9, 0.8]]
    assert medsam.segment(img, boxes=np.array(boxes)) == medsam.segment(img, boxes=boxes)
    points = [[0.5, 0.5], [0.1, 0.1]]
    assert medsam.segment(img, points=np.array(points), point_labels=np.array([1, 0])) == medsam.segment(
        img, points=points, point_labels=[1, 0])
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        medsam.segment(img, boxes=[[10, 10, 30, 30]])
    with pytest.raises(ValueError, match="give boxes and/or points"):
        medsam.segment(img, boxes=np.zeros((0, 4)))


def test_segment_refuses_pixel_points_and_bad_point_labels(medsam):
    """``segment()`` (the composite's and plug-ins' call) took pixel points as if they were normalised."""
    img = scan_image(48, 40)
    with pytest.raises(ValueError, match=r"point coordinates must be normalised to \[0, 1\]"):
        medsam.segment(img, points=[[24, 20]])
    with pytest.raises(ValueError, match="2 point_labels for 1 points"):
        medsam.segment(img, points=[[0.5, 0.5]], point_labels=[1, 0])
    with pytest.raises(ValueError, match=r"point_labels must be 1 \(inside the object\) or 0"):
        medsam.segment(img, points=[[0.5, 0.5]], point_labels=[2])


def test_many_boxes_are_decoded_a_few_at_a_time_each_with_its_own_mask(medsam, sam):
    """A composite's detections (up to the detector's 900 queries) went through the mask decoder in one batch,
    which copies the image embedding once per box (4 MB each at MedSAM's size) and, for SAM, upsamples every
    mask to the image size at once."""
    from mmedagent.tools.segmentation import DECODE_BATCH

    img = Image.fromarray(np.random.default_rng(5).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 0.5, (2 * DECODE_BATCH + 3, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.1, 0.5, corner.shape)], axis=1).tolist()
    for tool in (medsam, sam):
        batches = []
        hook = tool.model.mask_decoder.register_forward_pre_hook(
            lambda m, args, kwargs: batches.append(len(kwargs["sparse_prompt_embeddings"])), with_kwargs=True
        )
        try:
            out = tool.segment(img, boxes)
        finally:
            hook.remove()
        assert batches == [DECODE_BATCH, DECODE_BATCH, 3]
        assert out.masks == [tool.segment(img, [b]).masks[0] for b in boxes]
        assert all(m["size"] == [50, 70] for m in out.masks)


def test_a_huge_list_of_boxes_points_labels_or_prompts_is_a_param_error_naming_the_limit(dispatcher):
    img = scan_image()
    box, point = [0.1, 0.1, 0.5, 0.5], [0.3, 0.3]
    err = dispatcher.dispatch(call("MedSAM", boxes=[box] * 101), img).error
    assert "boxes" in err and "at most 100 items" in err
    assert "at most 100 items" in dispatcher.dispatch(call("MedSAM", points=[point] * 101), img).error
    assert dispatcher.dispatch(call("MedSAM", boxes=[box] * 100), img).ok
    labels = [f"finding {i}" for i in range(101)]
    err = dispatcher.dispatch(call("BiomedClip", labels=labels), img).error
    assert "labels" in err and "at most 100 items" in err
    assert dispatcher.dispatch(call("BiomedClip", labels=labels[:100]), img).ok
    err = dispatcher.dispatch(call("grounding dino", prompts=["tumor"] * 101), img).error
    assert "prompts" in err and "at most 100 items" in err


def test_segmentation_param_errors(dispatcher):
    img = scan_image()
    err = dispatcher.dispatch(call("MedSAM"), img).error
    assert "give boxes and/or points" in err
    assert "x1 <= x2" in dispatcher.dispatch(call("MedSAM", boxes=[[0.5, 0.1, 0.2, 0.4]]), img).error
    assert "less than or equal to 1" in dispatcher.dispatch(call("MedSAM", boxes=[[10, 20, 30, 40]]), img).error
    err = dispatcher.dispatch(call("MedSAM", points=[[0.1, 0.2]], point_labels=[1, 0]), img).error
    assert "2 point_labels for 1 points" in err


# classification


def test_classification_default_labels_and_ranking(classifier):
    img = scan_image()
    out = classifier(img, ClassificationTool.Params(top_k=14))
    assert sorted(out.labels) == sorted(MODALITY_LABELS) and len(MODALITY_LABELS) == 14
    assert out.probabilities == sorted(out.probabilities, reverse=True)
    assert abs(sum(out.probabilities) - 1) < 1e-5
    top = classifier(img, ClassificationTool.Params())
    assert top.labels == out.labels[:3] and len(top.probabilities) == 3


def test_classification_matches_open_clip_zero_shot(classifier, weights):
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{weights['clip']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{weights['clip']}")
    labels = ["chest X-ray", "brain MRI", "abdomen CT"]
    img = scan_image()
    with torch.no_grad():
        im = model.encode_image(preprocess(img)[None], normalize=True)
        tx = model.encode_text(tokenizer([f"a scan of {lab}" for lab in labels]), normalize=True)
        probs = (model.logit_scale.exp() * im @ tx.T).softmax(-1)[0]
    out = classifier(img, ClassificationTool.Params(labels=labels, template="a scan of ", top_k=5))
    order = probs.argsort(descending=True).tolist()
    assert out.labels == [labels[i] for i in order]
    assert np.allclose(out.probabilities, probs[order].numpy(), atol=1e-5)


def test_classification_param_errors(dispatcher):
    img = scan_image()
    assert "distinct" in dispatcher.dispatch(call("BiomedClip", labels=["a", "a"]), img).error
    assert "empty" in dispatcher.dispatch(call("BiomedClip", labels=["a", ""]), img).error
    assert "top_k" in dispatcher.dispatch(call("BiomedClip", top_k=0), img).error


def test_a_template_slot_other_than_empty_braces_is_a_param_error(dispatcher):
    """'a photo of {label}' was taken as slot-less: the model read 'a photo of {label} brain MRI'."""
    img = scan_image()
    for template in ("a photo of {label}", "{0} scan", "a {} image }"):
        err = dispatcher.dispatch(call("BiomedClip", template=template), img).error
        assert "template" in err and "written {}" in err
    assert dispatcher.dispatch(call("BiomedClip", template="a {} image"), img).ok


def test_classification_template_with_or_without_trailing_space_or_slot(classifier):
    """``"a scan of"`` is not glued to the label ("a scan ofchest X-ray"); ``{}`` marks where the label goes."""
    img = scan_image()
    labels = ["chest X-ray", "brain MRI", "abdomen CT"]

    def run(template):
        return classifier(img, ClassificationTool.Params(labels=labels, template=template, top_k=3))

    assert run("a scan of") == run("a scan of ") == run("a scan of {}")
    assert run("{} scan") != run("a scan of ")
    from mmedagent.tools.classification import label_prompt

    assert label_prompt("a scan of", "chest X-ray") == "a scan of chest X-ray"
    assert label_prompt("a scan of ", "chest X-ray") == "a scan of chest X-ray"
    assert label_prompt("a {} image.", "chest X-ray") == "a chest X-ray image."


def test_classification_labels_differing_only_in_case_are_duplicates(dispatcher):
    """The text encoders lowercase, so such labels would split one class's probability between them."""
    labels = ["Chest X-ray", "chest  x-ray", "brain MRI"]
    err = dispatcher.dispatch(call("BiomedClip", labels=labels), scan_image()).error
    assert "distinct" in err


# wide (16-bit) scans


def test_tools_read_a_16_bit_scan_as_its_scaled_rendering(grounding, medsam, sam, classifier):
    """A 16-bit PIL scan gives the same results as its uint16 array (min-max scaled), not a white image."""
    scan = scan_16bit(150, 130)
    values = np.asarray(scan)
    find = GroundingTool.Params(prompts=["tumor"], box_threshold=0.0, text_threshold=0.0)
    assert grounding(scan, find) == grounding(values, find)
    seg = SegmentationTool.Params(boxes=[[0.3, 0.1, 0.9, 0.7]])
    assert medsam(scan, seg) == medsam(values, seg) and sam(scan, seg) == sam(values, seg)
    assert classifier(scan, ClassificationTool.Params()) == classifier(values, ClassificationTool.Params())


# missing weights


def test_missing_weights_say_where_and_how(tmp_path):
    missing = tmp_path / "nothing-here"
    with pytest.raises(RuntimeError, match=r"local path .*nothing-here.*hf download"):
        GroundingTool(model=str(missing)).ensure_loaded()
    with pytest.raises(RuntimeError, match=r"nothing-here\.pth.*medsam_vit_b\.pth"):
        SegmentationTool(checkpoint=str(missing) + ".pth").ensure_loaded()
    with pytest.raises(RuntimeError, match=r"nothing-here.*open_clip"):
        ClassificationTool(model=str(missing)).ensure_loaded()


# through the dispatcher


def test_composite_tool_end_to_end(dispatcher, grounding, medsam):
    composite = dispatcher.resolve("grounding dino + MedSAM")
    assert composite.grounding is grounding and composite.segmentation is medsam  # shared, not reloaded
    img = scan_image(150, 130)
    [outcome], [result] = dispatcher.dispatch_all(
        [
            call(
                "grounding dino + MedSAM", image="<imagepath>", prompts=["tumor"], box_threshold=0.0, text_threshold=0.0
            )
        ],
        img,
    )
    assert outcome.ok, outcome.error
    assert set(outcome.output) == {"boxes", "logits", "phrases", "areas"}
    assert len(result.masks) == len(result.boxes) == len(result.areas) > 0
    direct = grounding.detect(img, ["tumor"], 0.0, 0.0)
    assert result.boxes == direct.boxes
    assert result.masks == medsam.segment(img, boxes=direct.boxes).masks
    assert all(decode_rle(m).shape == (130, 150) for m in result.masks)
    drawn = render(img, result.overlay())
    assert drawn.size == img.size and not np.array_equal(np.asarray(drawn), np.asarray(img))


def test_multi_call_turn_end_to_end(dispatcher):
    """One planner turn with two actions: parsed, dispatched together, fed back in the one wording."""
    question = "Where is the tumor and what kind of image is this?"
    turn = AssistantTurn(
        thoughts="Locate the tumor and classify the modality.",
        actions=[
            ToolCall(
                API_name="grounding dino",
                API_params={"image": "<imagepath>", "prompts": ["tumor"], "box_threshold": 0.0},
            ),
            ToolCall(API_name="BiomedClip", API_params={"image": "<imagepath>"}),
        ],
        value="Please wait.",
    )
    parsed = parse_turn(render_turn(turn))
    img = scan_image(140, 130)
    outcomes, results = dispatcher.dispatch_all(parsed.actions, img)
    assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
    assert results[0].boxes and results[1].labels[0] in MODALITY_LABELS
    assert all(round(v, 2) == v for box in outcomes[0].output["boxes"] for v in box)  # compact form, 2 decimals
    text = render_tool_results(outcomes, question)
    assert "grounding dino output: {'boxes': [[" in text and "BiomedClip output: {'labels': [" in text
    back = parse_tool_results(text)
    assert back.question == question
    overlays = [r.overlay() for r in results]
    assert overlays[1] is None and render(img, overlays).size == img.size


def test_weights_errors_are_one_line():
    from mmedagent.tools._boxes import weights_error

    hub = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")
    msg = str(weights_error("grounding", "org/model", "Download it.", hub))
    assert "\n" not in msg and "load the files. Check your connection." in msg


def test_weights_that_are_missing_or_of_another_kind_are_one_clear_line(tmp_path):
    """A missing folder was read as a malformed hub id ("Repo id must be in the form ...") or an open_clip model
    name (a list of every built-in model); a folder of another model type, a file that is no checkpoint and an
    unreadable config raised the libraries' errors (a TypeError from the wrong modules, a 6-line unpickling
    error, a bare FileNotFoundError)."""
    from transformers import BertConfig

    def error(make):
        with pytest.raises((RuntimeError, ValueError)) as info:
            make().ensure_loaded()
        msg = str(info.value)
        assert "\n" not in msg
        return msg

    missing = tmp_path / "nothing-here"
    for make in (lambda: GroundingTool(model=str(missing)), lambda: ClassificationTool(model=str(missing))):
        msg = error(make)
        assert "nothing-here' (FileNotFoundError: no such folder)" in msg and "Repo id" not in msg
        assert "Available" not in msg
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    assert "holds a 'bert' model, not Grounding DINO" in error(lambda: GroundingTool(model=str(tmp_path / "bert")))
    (tmp_path / "notes.pth").write_text('{"not": "weights"}')
    assert "notes.pth' (ValueError: not a PyTorch checkpoint" in error(
        lambda: SegmentationTool(checkpoint=str(tmp_path / "notes.pth")))
    ckpt = save_tiny_sam(tmp_path / "sam", "tiny_medsam_vit")
    assert "cannot read the SAM architecture config" in error(
        lambda: SegmentationTool(checkpoint=str(ckpt), config=str(tmp_path / "none.json")))


def test_weights_folders_under_the_home_folder_load(weights, monkeypatch):
    """``~/...`` reached transformers and open_clip unexpanded: a folder that exists was 'not found'."""
    monkeypatch.setenv("HOME", str(weights["grounding"].parent))
    for tool in (GroundingTool(model=f"~/{weights['grounding'].name}"),
                 ClassificationTool(model=f"~/{weights['clip'].name}")):
        tool.ensure_loaded()
        assert tool.loaded


def test_an_mm_grounding_dino_checkpoint_runs_as_itself(weights, tmp_path):
    """MM-Grounding-DINO loaded into GroundingDinoForObjectDetection dropped its class-embedding biases (a warning,
    then other scores); it is its own model class in transformers, read through the same processor."""
    import shutil

    from transformers import GroundingDinoConfig, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    out = tmp_path / "mm-grounding-dino"
    shutil.copytree(weights["grounding"], out)
    fields = MMGroundingDinoConfig().to_dict()
    config = {k: v for k, v in GroundingDinoConfig.from_pretrained(out).to_dict().items()
              if k in fields and k not in ("model_type", "architectures", "transformers_version")}
    torch.manual_seed(1)
    model = MMGroundingDinoForObjectDetection(MMGroundingDinoConfig(**config)).eval()
    model.save_pretrained(out)
    tool = GroundingTool(model=str(out))
    tool.ensure_loaded()
    assert type(tool.model) is MMGroundingDinoForObjectDetection
    img = scan_image(150, 130)
    inputs = tool.processor(images=img, text="tumor .", return_tensors="pt")
    with torch.inference_mode():
        direct = tool.processor.post_process_grounded_object_detection(
            model(**inputs), inputs["input_ids"], threshold=0.0, text_threshold=0.0)[0]
    found = tool(img, GroundingTool.Params(prompts=["tumor"], box_threshold=0.0, text_threshold=0.0))
    assert max(found.logits) == pytest.approx(float(direct["scores"].max()), abs=1e-5)


def test_weights_errors_name_a_checkpoint_file_as_a_path_not_a_hub_id(tmp_path, monkeypatch):
    from mmedagent.tools._boxes import weights_error

    missing = FileNotFoundError("no such file")
    assert "from local path 'medsam_vit_b.pth'" in str(weights_error("segmentation", "medsam_vit_b.pth", "", missing))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert "from hub id 'IDEA-Research/grounding-dino-base' (OSError: offline)" in str(
        weights_error("grounding", "IDEA-Research/grounding-dino-base", "", OSError("offline")))
    assert "from hub id 'weights/gdino' (no local folder has that name; OSError: offline)" in str(
        weights_error("grounding", "weights/gdino", "", OSError("offline")))  # a mistyped folder, read as a hub id


def test_medsam_masks_of_several_boxes_are_each_boxs_own_mask_at_full_size(medsam):
    """The masks are brought to the image's size one at a time (memory); each must stay its own box's."""
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    boxes = [[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]]
    both = medsam.segment(img, boxes)
    alone = [medsam.segment(img, [b]) for b in boxes]
    assert both.masks == [a.masks[0] for a in alone] and both.areas == [a.areas[0] for a in alone]
    assert both.masks[0]["size"] == [90, 130]
