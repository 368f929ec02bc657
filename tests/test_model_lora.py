"""Original LLaVA-layout checkpoints, MMedAgent LoRA output, our peft adapters, and merging."""

import json
import re
import subprocess
import sys

import pytest
import torch

from _model_fixtures import logits, test_image, write_original_llava
from mmedagent.model import load_model_and_processor, load_planner

LM_TARGETS = r".*\.language_model\..*\.(q_proj|v_proj|gate_proj)"


@pytest.fixture(scope="module")
def llava_setup(tiny_models, tmp_path_factory):
    """Tiny transformers Llava, the same model in the original LLaVA layout, and a reference LoRA."""

    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava_layouts")
    env = pytest.MonkeyPatch()  # conversions cache here, for this module only
    env.setenv("MMEDAGENT_CACHE", str(root / "cache"))
    hf_dir = tiny_models("llava")
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)

    # --- original layout: LM under model.*, projector under model.mm_projector.{0,2}, tower elsewhere
    orig = root / "llava-med-orig"
    tower = root / "clip-tower"
    model.model.vision_tower.save_pretrained(tower)
    processor.image_processor.save_pretrained(tower)
    write_original_llava(model, hf_dir, orig, tower)

    # --- a LoRA with a retrained projector, saved the MMedAgent way
    lora_model = get_peft_model(
        LlavaForConditionalGeneration.from_pretrained(hf_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS, init_lora_weights=False),
    ).eval()
    torch.manual_seed(1)
    for p in lora_model.base_model.model.model.multi_modal_projector.parameters():
        p.data += 0.2 * torch.randn_like(p)
    mmed = root / "mmedagent-lora-r4"  # no "llava" in the name: the projector must still be applied
    lora_model.save_pretrained(mmed)
    from safetensors.torch import load_file

    weights = load_file(str(mmed / "adapter_model.safetensors"))
    (mmed / "adapter_model.safetensors").unlink()
    torch.save({k.replace("language_model.", ""): v for k, v in weights.items()}, mmed / "adapter_model.bin")
    acfg = json.loads((mmed / "adapter_config.json").read_text())
    acfg.update(target_modules=["q_proj", "v_proj", "gate_proj"], base_model_name_or_path="./checkpoints/llava-med")
    (mmed / "adapter_config.json").write_text(json.dumps(acfg))
    proj = lora_model.base_model.model.model.multi_modal_projector
    torch.save({
        f"base_model.model.model.mm_projector.{i}.{p}": getattr(getattr(proj, name), p).detach().clone()
        for i, name in (("0", "linear_1"), ("2", "linear_2")) for p in ("weight", "bias")
    }, mmed / "non_lora_trainables.bin")

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the tumor?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = processor(images=test_image(32), text=prompt, return_tensors="pt", add_special_tokens=False)
    yield {"hf": hf_dir, "model": model, "orig": orig, "mmed": mmed, "lora_model": lora_model,
            "inputs": dict(inputs), "root": root, "processor": processor}
    env.undo()


def test_original_layout_converts_to_the_same_model(llava_setup):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmedagent.model.llava_convert import convert_llava_checkpoint

    dst = convert_llava_checkpoint(llava_setup["orig"], llava_setup["root"] / "converted")
    converted = LlavaForConditionalGeneration.from_pretrained(dst).eval()
    proc = AutoProcessor.from_pretrained(dst)
    inputs = llava_setup["inputs"]
    torch.testing.assert_close(logits(converted, inputs), logits(llava_setup["model"], inputs))
    # processor: same pixels for a square image, LLaVA's pad-to-square for others, Vicuna v1 chat template
    from PIL import Image

    image = test_image(32)  # 32 x 24: LLaVA pads it to 32 x 32 with the mean colour (expand2square)
    clip = llava_setup["processor"].image_processor
    square = Image.new("RGB", (32, 32), tuple(int(x * 255) for x in clip.image_mean))
    square.paste(image, (0, (32 - image.height) // 2))
    ours = proc(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, clip(square, return_tensors="pt")["pixel_values"], atol=0.02, rtol=0)
    assert converted.config.vision_feature_layer == -2 and converted.config.vision_feature_select_strategy == "default"
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                    add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s>A chat between") and text.endswith("USER: hi ASSISTANT:")


def test_original_layout_loads_on_the_fly(llava_setup):
    model, _, family = load_model_and_processor(llava_setup["orig"])
    assert family == "llava"
    torch.testing.assert_close(logits(model, llava_setup["inputs"]), logits(llava_setup["model"], llava_setup["inputs"]))


def test_original_layout_with_an_unreachable_tower_takes_vision_tower(llava_setup):
    """MMedAgent's config names the tower as on the training machine; vision_tower= points elsewhere."""
    import shutil

    from mmedagent.model import load_planner

    moved = llava_setup["root"] / "moved-orig"
    shutil.copytree(llava_setup["orig"], moved)
    cfg = json.loads((moved / "config.json").read_text())
    tower = cfg["mm_vision_tower"]
    cfg["mm_vision_tower"] = "/training-cluster/openai/clip-vit-large-patch14-336"
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="could not be loaded; pass its local path"):
        load_model_and_processor(moved)
    planner = load_planner(moved, vision_tower=tower)
    torch.testing.assert_close(logits(planner.model, llava_setup["inputs"]),
                               logits(llava_setup["model"], llava_setup["inputs"]))
    with pytest.raises(ValueError, match="applies to original LLaVA checkpoints"):
        load_model_and_processor(llava_setup["hf"], vision_tower=tower)


def test_mmedagent_lora_with_projector_on_original_base(llava_setup):
    expected = logits(llava_setup["lora_model"], llava_setup["inputs"])
    assert not torch.allclose(expected, logits(llava_setup["model"], llava_setup["inputs"]))
    planner = load_planner(llava_setup["orig"], adapter=llava_setup["mmed"], conv_template="vicuna_v1")
    torch.testing.assert_close(logits(planner.model, llava_setup["inputs"]), expected)
    assert planner.info()["adapter"] == str(llava_setup["mmed"])


def test_our_peft_adapter_stacks_on_its_recorded_base(llava_setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(llava_setup["hf"])
    base.name_or_path = str(llava_setup["hf"])
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=LM_TARGETS, init_lora_weights=False,
                                                 modules_to_save=["multi_modal_projector"])).eval()
    for p in peft_model.base_model.model.model.multi_modal_projector.modules_to_save.parameters():
        p.data += 0.3
    peft_model.save_pretrained(tmp_path / "ours")
    expected = logits(peft_model, llava_setup["inputs"])
    planner = load_planner(tmp_path / "ours")
    torch.testing.assert_close(logits(planner.model, llava_setup["inputs"]), expected)
    assert planner.generate([{"role": "user", "content": "<image>\nWhere?"}], test_image(32), max_new_tokens=3) is not None


def test_merge_script_equals_adapter_on_base(llava_setup, tmp_path):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "merged"
    run = subprocess.run(
        [sys.executable, "scripts/merge_lora_weights.py", "--model-path", str(llava_setup["mmed"]),
         "--model-base", str(llava_setup["orig"]), "--save-model-path", str(out)],
        capture_output=True, text=True, env={**__import__("os").environ},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    merged = LlavaForConditionalGeneration.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, llava_setup["inputs"]), logits(llava_setup["lora_model"], llava_setup["inputs"]),
                               rtol=1e-4, atol=1e-4)
    _, proc, _ = load_model_and_processor(out)
    assert proc.image_processor.do_pad  # processor saved alongside


def test_merge_script_takes_the_vision_tower_of_an_original_base(llava_setup, tmp_path):
    """An original base naming a tower that is not on this machine (``mm_vision_tower`` a hub id or a
    training cluster's path): ``--vision-tower`` points the merge at a local copy."""
    import shutil

    from transformers import LlavaForConditionalGeneration

    base = tmp_path / "llava-med"
    shutil.copytree(llava_setup["orig"], base)
    cfg = json.loads((base / "config.json").read_text())
    tower, cfg["mm_vision_tower"] = cfg["mm_vision_tower"], "/training-cluster/openai/clip-vit-large-patch14-336"
    (base / "config.json").write_text(json.dumps(cfg))
    run = subprocess.run(
        [sys.executable, "scripts/merge_lora_weights.py", "--model-path", str(llava_setup["mmed"]), "--model-base",
         str(base), "--vision-tower", tower, "--save-model-path", str(tmp_path / "merged")],
        capture_output=True, text=True, env={**__import__("os").environ},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged, llava_setup["inputs"]), logits(llava_setup["lora_model"], llava_setup["inputs"]),
                               rtol=1e-4, atol=1e-4)


def test_a_merge_keeps_the_bases_dtype(tiny_models, tmp_path):
    """A float16 base merges into a float16 checkpoint (was float32 on CPU: twice the memory and disk)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmedagent.model.adapters import merge_lora

    base = tmp_path / "base-fp16"
    AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_models("llama")).save_pretrained(base)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = merge_lora(tmp_path / "adapter", base, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.dtype == torch.float16
    state = model.state_dict()
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    delta = state["model.layers.0.self_attn.q_proj.weight"].float() - lora.base_model.model.model.layers[
        0].self_attn.q_proj.base_layer.weight.float()
    assert delta.abs().max() > 0  # the adapter is in the weights


def test_the_model_worker_stacks_an_adapter_on_model_base(llava_setup):
    """``--model-base``: an adapter whose recorded base (``./checkpoints/llava-med``) is not on this machine."""
    from mmedagent.serve.config import ServeConfig
    from mmedagent.serve.model_worker import load_host

    host = load_host(ServeConfig(model_path=str(llava_setup["mmed"]), model_base=str(llava_setup["orig"]), tools={}))
    torch.testing.assert_close(logits(host.planner.model, llava_setup["inputs"]),
                               logits(llava_setup["lora_model"], llava_setup["inputs"]), rtol=1e-4, atol=1e-4)


def test_evaluation_stacks_an_adapter_on_model_base(llava_setup):
    from mmedagent.evaluation.cli import make_runner, parser

    args = parser().parse_args(["--model", str(llava_setup["mmed"]), "--model-base", str(llava_setup["orig"]),
                                "--conv-template", "vicuna_v1", "--data", "unused.json", "--tool-mode", "gold"])
    planner = make_runner(args).planner
    assert planner.template == "vicuna_v1"
    torch.testing.assert_close(logits(planner.model, llava_setup["inputs"]),
                               logits(llava_setup["lora_model"], llava_setup["inputs"]), rtol=1e-4, atol=1e-4)


def test_lora_without_base_is_a_clear_error(llava_setup):
    with pytest.raises(ValueError, match=r"base model is not found here \('\./checkpoints/llava-med'\).*--model-base"):
        load_model_and_processor(llava_setup["mmed"])  # "./checkpoints/llava-med" does not exist


def test_an_adapter_finds_its_base_through_the_training_manifest(llava_setup, tmp_path):
    """peft records ``--model_name_or_path`` as typed (``./base_model``: relative to where training
    ran); the training manifest records it absolute, and that is where the base is looked up."""
    import json
    import shutil

    from mmedagent.model.adapters import TRAIN_MANIFEST, adapter_base

    adapter = tmp_path / "run"
    shutil.copytree(llava_setup["mmed"], adapter)
    (adapter / TRAIN_MANIFEST).write_text(json.dumps({"base_model": str(llava_setup["orig"])}))
    assert adapter_base(adapter) == str(llava_setup["orig"])
    model, _, _ = load_model_and_processor(adapter)
    torch.testing.assert_close(logits(model, llava_setup["inputs"]), logits(llava_setup["lora_model"], llava_setup["inputs"]),
                               rtol=1e-4, atol=1e-4)


def test_an_unmerged_qwen2_vl_adapter_answers_about_an_image(tiny_models, tmp_path):
    """Qwen2-VL's rotary positions come from the model inside the peft wrapper (the recipe's output
    is an adapter; serving it must not need a merge first)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base_dir = tiny_models("qwen2_vl")
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    base.name_or_path = str(base_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    question = [{"role": "user", "content": "<image>\nWhat is it?"}]
    with_adapter = load_planner(tmp_path / "adapter").generate(question, test_image(32), max_new_tokens=4)
    assert with_adapter == load_planner(base_dir).generate(question, test_image(32), max_new_tokens=4)  # B = 0: same


def _linear_projector_base(llava_setup, out):
    """The original base with a single-Linear projector, as LLaVA-Med v1.0 has (no ``mm_projector_type``)."""
    import shutil

    shutil.copytree(llava_setup["orig"], out)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    for k in [k for k in state if ".mm_projector." in k]:
        del state[k]
    torch.manual_seed(5)
    state["model.mm_projector.weight"], state["model.mm_projector.bias"] = torch.randn(64, 32) * 0.1, torch.zeros(64)
    torch.save(state, out / "pytorch_model.bin")
    cfg = json.loads((out / "config.json").read_text())
    del cfg["mm_projector_type"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_an_mlp2x_gelu_lora_projector_keeps_its_gelu_on_a_linear_projector_base(llava_setup, tmp_path):
    """MMedAgent trains an mlp2x_gelu projector; a base with a linear one (LLaVA-Med v1.0) was given the LoRA's
    two Linear layers without the GELU between them (its identity activation kept), silently."""
    from transformers import LlavaForConditionalGeneration

    base = _linear_projector_base(llava_setup, tmp_path / "llava-med-v1.0")
    expected = logits(llava_setup["lora_model"], llava_setup["inputs"])
    planner = load_planner(base, adapter=llava_setup["mmed"], conv_template="vicuna_v1")
    torch.testing.assert_close(logits(planner.model, llava_setup["inputs"]), expected)
    out = tmp_path / "merged"
    run = subprocess.run([sys.executable, "scripts/merge_lora_weights.py", "--model-path", str(llava_setup["mmed"]),
                          "--model-base", str(base), "--save-model-path", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    merged = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert merged.config.projector_hidden_act == "gelu"
    torch.testing.assert_close(logits(merged, llava_setup["inputs"]), expected, rtol=1e-4, atol=1e-4)


def test_an_mmedagent_lora_without_non_lora_trainables_is_applied(llava_setup, tmp_path):
    """Original-layout LoRA keys (no ``language_model.``) and no non_lora_trainables.bin: the LoRA was not
    recognised as MMedAgent's, and peft skipped every weight: the base model, silently."""
    import shutil

    adapter = tmp_path / "lora-frozen-projector"
    shutil.copytree(llava_setup["mmed"], adapter)
    (adapter / "non_lora_trainables.bin").unlink()
    model, processor, _ = load_model_and_processor(adapter, base=llava_setup["orig"])
    text = {"input_ids": processor.tokenizer("USER: Where is the tumor? ASSISTANT:", return_tensors="pt")["input_ids"]}
    expected = logits(llava_setup["lora_model"], text)  # the projector plays no part without an image
    assert not torch.allclose(expected, logits(llava_setup["model"], text))
    torch.testing.assert_close(logits(model, text), expected)


def test_an_adapter_on_a_base_it_does_not_fit_is_one_error_line(llava_setup, tiny_models, tmp_path):
    """Another size was a RuntimeError traceback (size mismatch); another family of the same size loaded:
    peft skips what has no place in it (the projector) and applies the rest — a silently wrong model."""
    from mmedagent.model.adapters import TRAIN_MANIFEST
    from mmedagent.model.tiny import make_tiny_model

    def merge(adapter, base):
        out = tmp_path / f"merged-{adapter.name}-{base.name}"
        return subprocess.run([sys.executable, "scripts/merge_lora_weights.py", "--model-path", str(adapter),
                               "--model-base", str(base), "--save-model-path", str(out)],
                              capture_output=True, text=True)

    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    ours = tmp_path / "ours"
    llava_setup["lora_model"].save_pretrained(ours)  # LoRA on the LM (no manifest: trained elsewhere)
    with_projector = tmp_path / "with-projector"  # as our training saves it: no base class recorded by peft
    get_peft_model(LlavaForConditionalGeneration.from_pretrained(llava_setup["hf"]), LoraConfig(
        r=2, target_modules=LM_TARGETS, modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM",
    )).save_pretrained(with_projector)
    narrow = make_tiny_model("llava", tmp_path / "llava-hidden-32", hidden=32)
    for adapter, base, message in [
        (llava_setup["mmed"], narrow, r"mmedagent-lora-r4 does not fit the base model .*llava-hidden-32: projector: "
                                      "size mismatch"),
        (ours, narrow, "ours does not fit the base model .*llava-hidden-32: size mismatch"),
        (ours, tiny_models("qwen2_vl"), "ours does not fit the base model .*qwen2_vl: it was trained on a "
                                        "LlavaForConditionalGeneration, the base is a Qwen2VLForConditionalGeneration"),
        (with_projector, tiny_models("qwen2_vl"), "with-projector does not fit the base model .*qwen2_vl: 4 adapter "
                                                  "weights have no place in it .*multi_modal_projector"),
    ]:
        run = merge(adapter, base)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert re.search(message, run.stderr.strip().splitlines()[-1]), run.stderr[-1000:]
    (ours / "adapter_config.json").write_text(json.dumps({**json.loads((ours / "adapter_config.json").read_text()),
                                                          "auto_mapping": None, "task_type": "CAUSAL_LM"}))
    (ours / TRAIN_MANIFEST).write_text(json.dumps({"base_model": str(llava_setup["hf"]), "family": "llava"}))
    with pytest.raises(ValueError, match="was trained on a llava model but the base .*qwen2_vl is qwen2_vl"):
        load_model_and_processor(ours, base=tiny_models("qwen2_vl"))


def test_a_merge_into_a_directory_holding_files_is_refused(llava_setup, tmp_path):
    """Merging into the adapter's (or the base's, or an earlier merge's) folder mixed the merged model with
    their files (adapter_config.json made it load as the adapter again; a stale manifest named another template)."""
    from mmedagent.model.adapters import merge_lora

    for out in (llava_setup["mmed"], llava_setup["orig"]):
        with pytest.raises(ValueError, match="already exists and is not an empty directory"):
            merge_lora(llava_setup["mmed"], llava_setup["orig"], out)
    (tmp_path / "empty").mkdir()
    assert (merge_lora(llava_setup["mmed"], llava_setup["orig"], tmp_path / "empty") / "config.json").is_file()


def _old_layout(arch: str, key: str) -> str:
    """An adapter weight's name as transformers 4.x named the module (before ``model.language_model``)."""
    if arch == "qwen2_vl":
        return key.replace("base_model.model.model.language_model.", "base_model.model.model.")
    return key.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")


@pytest.mark.parametrize("arch", ["llava", "mllama", "qwen2_vl"])
def test_an_adapter_saved_under_transformers_4_loads_as_saved_today(tiny_models, tmp_path, arch):
    """LoRA saved by a TRL / unsloth notebook before transformers 5 names the LM's modules the old way: Llava's
    and Mllama's (which peft renames) were refused as 'no place in it', Qwen2-VL's (which it does not) too."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_models(arch)), LoraConfig(
        r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False,
        task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "today")
    lora.save_pretrained(tmp_path / "old")
    weights = load_file(str(tmp_path / "old" / "adapter_model.safetensors"))
    old = str(tmp_path / "old" / "adapter_model.safetensors")
    save_file({_old_layout(arch, k): v for k, v in weights.items()}, old)
    assert set(load_file(old)) != set(weights)

    text = {"input_ids": torch.tensor([[5, 17, 42, 99, 7]])}
    with lora.disable_adapter():
        base = logits(lora, text)
    expected = logits(lora, text)  # the adapter as trained
    assert not torch.allclose(expected, base)
    for name in ("today", "old"):
        model, _, _ = load_model_and_processor(tmp_path / name)
        torch.testing.assert_close(logits(model, text), expected)


def test_an_adapter_missing_weights_its_config_places_is_one_error_line(llava_setup, tmp_path):
    """An adapter file without some of the LoRA weights its target_modules place (a trimmed or half-written
    file) loaded with those left at their initial values: a silently different model."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "trimmed"
    llava_setup["lora_model"].save_pretrained(adapter)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if "v_proj" not in k}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"trimmed does not fit the base model .*: \d+ LoRA weights its config "
                                         r"places in the base are not in it \(.*v_proj"):
        load_model_and_processor(adapter, base=llava_setup["hf"])


def test_a_projector_saved_in_the_adapter_file_is_applied_not_dropped(llava_setup, tmp_path):
    """A LLaVA-layout LoRA trained with ``modules_to_save=["mm_projector"]`` keeps its projector in the adapter
    file (no non_lora_trainables.bin): it was skipped with a warning and the base's projector kept, silently."""
    import shutil

    from safetensors.torch import save_file

    adapter = tmp_path / "lora-projector-in-adapter"
    shutil.copytree(llava_setup["mmed"], adapter)
    weights = torch.load(adapter / "adapter_model.bin", weights_only=True)
    weights.update(torch.load(adapter / "non_lora_trainables.bin", weights_only=True))
    (adapter / "adapter_model.bin").unlink()
    (adapter / "non_lora_trainables.bin").unlink()
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    planner = load_planner(llava_setup["orig"], adapter=adapter, conv_template="vicuna_v1")
    torch.testing.assert_close(logits(planner.model, llava_setup["inputs"]),
                               logits(llava_setup["lora_model"], llava_setup["inputs"]))
    lora_on_projector = {**weights, "base_model.model.model.mm_projector.0.lora_A.weight": torch.zeros(4, 32)}
    save_file(lora_on_projector, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"LoRA on the projector \(base_model\.model\.model\.mm_projector\.0\.lora_A"
                                         r"\.weight\) is not supported"):
        load_model_and_processor(adapter, base=llava_setup["orig"])
