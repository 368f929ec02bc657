"""Session-scoped tiny checkpoints for the model-layer tests (and anyone else who needs a real tiny model).

Use: ``from _model_fixtures import tiny_models`` in a test module, then ``tiny_models("llava")``
returns the directory of a tiny random LLaVA checkpoint, built once per session.
"""

from __future__ import annotations


from PIL import Image


def test_image(size: int = 40) -> Image.Image:
    """A small deterministic RGB image with some structure (not a flat colour)."""
    img = Image.new("RGB", (size, size - 8), (30, 30, 30))
    for x in range(size // 4, size // 2):
        for y in range(size // 4, size // 2):
            img.putpixel((x, y), (220, 180, 40))
    return img


test_image.__test__ = False  # not a pytest test


def logits(model, inputs):
    import torch

    with torch.no_grad():
        return model(**inputs).logits


def write_original_llava(model, tokenizer_dir, out, tower, *, arch: str = "LlavaLlamaForCausalLM",
                         model_type: str = "llava", shards: int = 1, safetensors: bool = False, tied: bool = False):
    """Save the transformers Llava ``model`` as the original LLaVA code saves it (``LlavaLlamaForCausalLM``
    layout, ``mlp2x_gelu`` projector, tower referenced by path, one weight file or ``shards`` + index json) with
    the tokenizer files of ``tokenizer_dir``; ``tied``: no ``lm_head.weight``, ``tie_word_embeddings`` true."""
    import json
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v.clone()
        elif k.startswith("model.multi_modal_projector."):
            state[k.replace("multi_modal_projector.linear_1", "mm_projector.0").replace(
                "multi_modal_projector.linear_2", "mm_projector.2")] = v.clone()
        elif k == "lm_head.weight" and not tied:
            state[k] = v.clone()
    keys = list(state)
    name = "model-{:05d}-of-{:05d}.safetensors" if safetensors else "pytorch_model-{:05d}-of-{:05d}.bin"
    if shards == 1:
        name = "model.safetensors" if safetensors else "pytorch_model.bin"
    weight_map = {}
    for i in range(shards):
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        f = name.format(i + 1, shards)
        save_file(part, str(out / f), metadata={"format": "pt"}) if safetensors else torch.save(part, out / f)
        weight_map.update(dict.fromkeys(part, f))
    if shards > 1:
        index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = model.config.text_config.to_dict()
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    cfg.update(
        architectures=[arch], model_type=model_type, mm_vision_tower=str(tower),
        mm_hidden_size=model.config.vision_config.hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_use_im_start_end=False,
        mm_use_im_patch_token=False, image_aspect_ratio="pad", mm_patch_merge_type="flat", use_mm_proj=True,
        tokenizer_model_max_length=2048, tokenizer_padding_side="right", tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    (out / "config.json").write_text(json.dumps(cfg))
    for f in Path(tokenizer_dir).glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out
