"""Checkpoints as users have them: original LLaVA / LLaVA-Med layouts (sharded, tied, Mistral LM, other
tokenizers, by hub id), incomplete or unknown checkpoints: same logits as the transformers model, or one clear line."""

import json
import logging
import re
import shutil
import subprocess
import sys

import pytest
import torch

from _model_fixtures import logits, test_image, write_original_llava
from mmedagent.model import load_model_and_processor


@pytest.fixture(scope="module")
def llava(tiny_models, tmp_path_factory):
    """The tiny transformers Llava, its CLIP tower saved on its own, and a prompt with an image."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("checkpoints")
    env = pytest.MonkeyPatch()
    env.setenv("MMEDAGENT_CACHE", str(root / "cache"))
    hf_dir = tiny_models("llava")
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    tower = root / "clip-tower"
    model.model.vision_tower.save_pretrained(tower)
    processor.image_processor.save_pretrained(tower)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the tumor?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = dict(processor(images=test_image(32), text=prompt, return_tensors="pt", add_special_tokens=False))
    yield {"hf": hf_dir, "model": model, "tower": tower, "root": root, "inputs": inputs}
    env.undo()


def test_sharded_llava_med_v15_and_llava_llama_checkpoints_give_the_same_logits(llava):
    """LLaVA-Med v1.5 (LlavaMistralForCausalLM, sharded safetensors) keeps a Mistral LM; LLaVA-1.5 with
    ``llava_llama`` and sharded ``pytorch_model-*.bin`` a Llama one; both equal the transformers model."""
    expected = logits(llava["model"], llava["inputs"])
    med = write_original_llava(llava["model"], llava["hf"], llava["root"] / "llava-med-v1.5", llava["tower"],
                               arch="LlavaMistralForCausalLM", model_type="llava_mistral", shards=3, safetensors=True)
    model, _, family = load_model_and_processor(med)
    assert family == "llava" and model.config.text_config.model_type == "mistral"
    torch.testing.assert_close(logits(model, llava["inputs"]), expected)
    v15 = write_original_llava(llava["model"], llava["hf"], llava["root"] / "v15", llava["tower"],
                               model_type="llava_llama", shards=2)
    model, _, _ = load_model_and_processor(v15)
    assert model.config.text_config.model_type == "llama"
    torch.testing.assert_close(logits(model, llava["inputs"]), expected)


def test_a_base_trained_with_image_start_and_end_tokens_converts_with_a_warning(llava, caplog):
    """LLaVA-Med v1.0, MMedAgent's base, says mm_use_im_start_end: true; MMedAgent trained its LoRA without those
    tokens. Converting it was refused, so MMedAgent's adapter could not be stacked on its own base."""
    src = write_original_llava(llava["model"], llava["hf"], llava["root"] / "llava-med-v1.0", llava["tower"])
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    with caplog.at_level(logging.WARNING, logger="mmedagent.model.llava_convert"):
        model, _, family = load_model_and_processor(src)
    assert family == "llava" and "trained with image start/end tokens" in caplog.text
    torch.testing.assert_close(logits(model, llava["inputs"]), logits(llava["model"], llava["inputs"]))


def test_a_converted_checkpoint_reports_the_vicuna_template_it_carries(llava):
    """info() said "chat_template", so an evaluation with --conv-template vicuna_v1 and one without (the same
    prompt) were reported as prompted differently."""
    from mmedagent.model import load_planner

    src = write_original_llava(llava["model"], llava["hf"], llava["root"] / "llava-med-template", llava["tower"])
    assert load_planner(src).info()["template"] == "vicuna_v1"
    assert load_planner(llava["hf"]).info()["template"] == "chat_template"  # llava-hf's own template


def test_tied_word_embeddings_checkpoint_converts(llava):
    """``tie_word_embeddings: true`` and no ``lm_head.weight``: the output layer is the embeddings."""
    from transformers import LlavaForConditionalGeneration

    reference = LlavaForConditionalGeneration.from_pretrained(llava["hf"]).eval()
    reference.lm_head.weight.data.copy_(reference.model.language_model.embed_tokens.weight.data)
    src = write_original_llava(reference, llava["hf"], llava["root"] / "tied", llava["tower"], tied=True)
    model, _, _ = load_model_and_processor(src)
    torch.testing.assert_close(logits(model, llava["inputs"]), logits(reference, llava["inputs"]))
    untied = llava["root"] / "tied-but-not-said"
    shutil.copytree(src, untied)
    cfg = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="no lm_head.weight and its config.json has tie_word_embeddings false"):
        load_model_and_processor(untied)


def test_tokenizer_without_image_or_pad_token(llava):
    """LLaVA-1.5's tokenizer has no ``<image>`` and no pad token: both are added, the embeddings grow by one
    row and every other token's logits are unchanged."""
    src = write_original_llava(llava["model"], llava["hf"], llava["root"] / "plain-tokenizer", llava["tower"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (src / name).read_text().replace("<image>", "<im_unused>")
        data = json.loads(text)
        data.pop("pad_token", None)
        (src / name).write_text(json.dumps(data))
    model, processor, _ = load_model_and_processor(src)
    vocab = llava["model"].config.text_config.vocab_size
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>") == vocab
    assert tok.pad_token == "<unk>" and model.get_input_embeddings().weight.shape[0] == vocab + 1
    inputs = dict(llava["inputs"])
    ids = inputs["input_ids"].clone()
    ids[ids == llava["model"].config.image_token_id] = vocab
    inputs["input_ids"] = ids
    torch.testing.assert_close(logits(model, inputs)[..., :vocab], logits(llava["model"], llava["inputs"]))


def test_a_tower_of_the_wrong_width_is_one_error_line(llava, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", llava["tower"])
    other = tmp_path / "clip-base"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3,
                                     image_size=32, patch_size=8)).save_pretrained(other)
    CLIPImageProcessor.from_pretrained(llava["tower"]).save_pretrained(other)
    run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(src), "--dst",
                          str(tmp_path / "out"), "--vision-tower", str(other)], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the projector of") and "takes 32-dim vision features" in last and "gives 48" in last


def test_original_llava_by_hub_id_loads_from_the_cache(llava, tmp_path, monkeypatch):
    """``microsoft/llava-med-v1.5-mistral-7b`` in the Hugging Face cache of an offline server is converted like
    a local folder (transformers itself does not know ``llava_mistral``)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--microsoft--llava-med-v1.5-mistral-7b"
    commit = "0" * 40
    write_original_llava(llava["model"], llava["hf"], repo / "snapshots" / commit, llava["tower"],
                         arch="LlavaMistralForCausalLM", model_type="llava_mistral", safetensors=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _, family = load_model_and_processor("microsoft/llava-med-v1.5-mistral-7b")
    assert family == "llava"
    torch.testing.assert_close(logits(model, llava["inputs"]), logits(llava["model"], llava["inputs"]))


def test_missing_weights_are_an_error_not_a_random_init(tiny_models, tmp_path):
    """A transformers checkpoint without its projector: transformers would only warn and initialise it at random."""
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "no-projector"
    shutil.copytree(tiny_models("llava"), partial)
    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "multi_modal_projector" not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"4 weights missing from the checkpoint \(model\.multi_modal_projector"):
        load_model_and_processor(partial)


def test_an_unknown_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_mpt", "architectures": ["LlavaMptForCausalLM"]}))
    with pytest.raises(ValueError) as e:
        load_model_and_processor(tmp_path)
    assert "llava_mpt" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_converting_a_lora_folder_says_to_merge_it(llava, tmp_path):
    """MMedAgent's release is a LoRA folder whose config.json is the base's (mm_vision_tower and all)."""
    from mmedagent.model.llava_convert import convert_llava_checkpoint

    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "mmedagent-release", llava["tower"])
    for f in src.glob("pytorch_model*"):
        f.unlink()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 128}))
    with pytest.raises(ValueError, match="is a LoRA adapter, not a full checkpoint: merge it .*merge_lora_weights"):
        convert_llava_checkpoint(src, tmp_path / "out")



def test_a_conversion_another_process_finished_first_is_used(llava, tmp_path, monkeypatch):
    """Two ranks (or the server and an evaluation) converting the same checkpoint at once: the one that
    finishes second uses the first one's output instead of failing on the rename."""
    import shutil

    from mmedagent.model import llava_convert

    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path / "cache"))
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", llava["tower"])
    real = llava_convert.convert_llava_checkpoint

    def raced(source, dst, vision_tower=None):
        real(source, dst, vision_tower=vision_tower)
        out = dst.parent / f"llava-{llava_convert._fingerprint(source, str(vision_tower or ''))}"
        shutil.copytree(dst, out)  # the other process renamed its copy into place first

    monkeypatch.setattr(llava_convert, "convert_llava_checkpoint", raced)
    out = llava_convert.converted_cache_dir(src)
    assert (out / "config.json").is_file() and [p.name for p in out.parent.iterdir()] == [out.name]


def _as_linear_projector(model):
    """A copy of the tiny Llava whose projector is one Linear (LLaVA's ``linear``): identity activation and
    ``linear_2``, as a converted ``linear`` checkpoint has them."""
    import copy

    from transformers.activations import ACT2FN

    linear = copy.deepcopy(model)
    projector = linear.model.multi_modal_projector
    projector.act, linear.config.projector_hidden_act = ACT2FN["linear"], "linear"
    projector.linear_2.weight.data.copy_(torch.eye(projector.linear_2.weight.shape[0]))
    projector.linear_2.bias.data.zero_()
    return linear


@pytest.mark.parametrize(("weights", "declared"), [("mlp2x_gelu", None), ("mlp2x_gelu", "linear"),
                                                   ("linear", "mlp2x_gelu")])
def test_the_projector_weights_decide_its_type_when_the_config_says_otherwise(llava, tmp_path, weights, declared):
    """LLaVA keeps a pretrained projector whatever ``mm_projector_type`` says (and LLaVA-Med v1.0 names none,
    which means linear): the conversion was a KeyError traceback. Its type is now read from the weights."""
    reference = llava["model"] if weights == "mlp2x_gelu" else _as_linear_projector(llava["model"])
    src = write_original_llava(reference, llava["hf"], tmp_path / "orig", llava["tower"])
    if weights == "linear":
        state = torch.load(src / "pytorch_model.bin", weights_only=True)
        state["model.mm_projector.weight"] = state.pop("model.mm_projector.0.weight")
        state["model.mm_projector.bias"] = state.pop("model.mm_projector.0.bias")
        del state["model.mm_projector.2.weight"], state["model.mm_projector.2.bias"]
        torch.save(state, src / "pytorch_model.bin")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("mm_projector_type")
    (src / "config.json").write_text(json.dumps({**cfg, **({"mm_projector_type": declared} if declared else {})}))
    run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(src), "--dst",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    from transformers import LlavaForConditionalGeneration

    converted = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert converted.config.projector_hidden_act == ("gelu" if weights == "mlp2x_gelu" else "linear")
    torch.testing.assert_close(logits(converted, llava["inputs"]), logits(reference, llava["inputs"]))
    if weights == "mlp2x_gelu":  # the converted mlp2x model is not the linear reading of the same weights
        assert not torch.allclose(logits(converted, llava["inputs"]), logits(_as_linear_projector(converted),
                                                                              llava["inputs"]))


def test_a_projector_of_another_shape_is_one_error_line(llava, tmp_path):
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", llava["tower"])
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.mm_projector.4.weight"], state["model.mm_projector.4.bias"] = torch.zeros(64, 64), torch.zeros(64)
    torch.save(state, src / "pytorch_model.bin")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("mm_projector_type")  # no type named: the weights (an mlp3x_gelu) are read
    (src / "config.json").write_text(json.dumps(cfg))
    run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(src), "--dst",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the projector tensors (0.bias, 0.weight, 2.bias, 2.weight, 4.bias, 4.weight) are "
                           "neither a linear nor an mlp2x_gelu projector"), last


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "llama"])
def test_a_folder_without_its_tokenizer_says_to_copy_it(tiny_models, tmp_path, arch):
    """A model saved without its tokenizer files: Qwen2-VL's loaded with an empty tokenizer (one token) and failed
    at the first question with an image-token count mismatch; Llama's asked to install sentencepiece."""
    from mmedagent.model import load_planner

    src = tmp_path / arch
    shutil.copytree(tiny_models(arch), src)
    for f in src.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match=rf"{arch} holds no tokenizer .*needs those files of the model it was "
                                         "trained from copied into it"):
        load_planner(src)


def test_a_folder_without_its_image_processor_says_to_copy_it(tiny_models, tmp_path):
    src = tmp_path / "llava-checkpoint-1234"
    shutil.copytree(tiny_models("llava"), src)
    (src / "processor_config.json").unlink()
    with pytest.raises(ValueError, match=r"llava-checkpoint-1234: its processor cannot be loaded: .*"
                                         r"preprocessor_config.json.*copied into it"):
        load_model_and_processor(src)


def test_converting_a_checkpoint_without_its_tokenizer_is_one_error_line(llava, tmp_path):
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", llava["tower"])
    for f in src.glob("tokenizer*"):
        f.unlink()
    run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(src), "--dst",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-2000:]
    assert re.match(r"error: .*orig holds no tokenizer .*copied into it", run.stderr.strip().splitlines()[-1])


def test_converting_into_a_folder_holding_files_is_refused(llava, tmp_path):
    """``--dst`` = ``--src`` wrote the converted model over the original (its config.json lost, its weights left
    beside the new ones); another model's folder kept its files (a stale shard index loads the old shards)."""
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", llava["tower"])
    config = (src / "config.json").read_text()
    for dst in (src, llava["hf"]):
        run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(src), "--dst",
                              str(dst)], capture_output=True, text=True)
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.strip().splitlines()[-1] == (f"error: {dst} already exists and is not an empty directory: "
                                                       "choose a new output directory")
    assert (src / "config.json").read_text() == config and not (src / "model.safetensors").exists()


def test_an_original_checkpoint_with_only_a_sentencepiece_tokenizer_converts(llava, tmp_path):
    """LLaVA-Med and MMedAgent folders ship LLaMA's ``tokenizer.model`` (sentencepiece), often without a
    ``tokenizer.json``: reading it needs sentencepiece and protobuf, which the project installs. The converted
    tokenizer gives the ids LLaVA's code trained on (it gave ``US`` ``ER`` after ``</s>``, not ``▁USER``)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer  # as converted, as saved, rebuilt from its config

    from mmedagent.model.llava_convert import converted_cache_dir
    from mmedagent.model.tiny import _MEDICAL

    (tmp_path / "corpus.txt").write_text(_MEDICAL * 20 + "\nUSER: ASSISTANT: Where\n" * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "m"),
                                   vocab_size=600, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, minloglevel=2, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False)  # as LLaMA's: spaces and newlines kept
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "llava-med", llava["tower"])
    for f in src.glob("tokenizer*"):
        f.unlink()
    shutil.copy(tmp_path / "m.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    model, processor, family = load_model_and_processor(src)
    tok = processor.tokenizer
    assert family == "llava" and tok.convert_ids_to_tokens(tok("The tumor")["input_ids"]) == ["<s>", "▁The", "▁tumor"]
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    prompt = "<s>USER: <image>\nWhere is the tumor? ASSISTANT:"
    inputs = processor(images=test_image(32), text=prompt, return_tensors="pt", add_special_tokens=False)
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3

    # the ids LLaVA trained on: its slow tokenizer (legacy) encodes each stretch between special tokens on its own,
    # "▁" first, and tokenizer_image_token encodes the text on each side of <image> apart (a second "▁" after it)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    conversation = "A chat. USER: <image>\nWhere is the tumor? ASSISTANT: The liver.</s>USER: Where? ASSISTANT:"
    llava_ids = [1]
    for k, chunk in enumerate(conversation.split("<image>")):
        llava_ids += [-200] if k else []
        for j, part in enumerate(chunk.split("</s>")):
            llava_ids += ([2] if j else []) + (sp.encode(part) if part else [])
    image_id = tok.convert_tokens_to_ids("<image>")
    converted = converted_cache_dir(src)
    for tokenizer in (tok, AutoTokenizer.from_pretrained(converted), LlamaTokenizer.from_pretrained(converted)):
        ids = tokenizer("<s>" + conversation, add_special_tokens=False)["input_ids"]
        assert [-200 if i == image_id else i for i in ids] == llava_ids


def test_a_folder_holding_checkpoints_rather_than_being_one_names_them(tiny_models, tmp_path):
    """A recipe's or a run's output folder holds its checkpoints (``merged``, ``checkpoint-N``); loading the
    folder itself said "Unrecognized model ... should have a `model_type` key in its config.json", of a
    config.json that is not there."""
    from mmedagent.model.loading import ModelNotFoundError

    shutil.copytree(tiny_models("llama"), tmp_path / "merged")
    (tmp_path / "train.log").write_text("")
    with pytest.raises(ModelNotFoundError, match=r"not a checkpoint folder \(no config.json\); checkpoints inside it: merged$"):
        load_model_and_processor(tmp_path)


def test_a_checkpoint_path_under_the_home_folder_written_with_a_tilde_loads(tiny_models, tmp_path, monkeypatch):
    """``~/ckpt`` from a config file or a quoted argument (no shell expands it) was read as a bad hub id."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_models("llama"), tmp_path / "ckpt")
    model, _, family = load_model_and_processor("~/ckpt")
    assert family == "causal_lm" and model is not None


def test_cls_patch_features_keep_the_cls_token_as_the_transformers_full_strategy(llava, tmp_path):
    """LLaVA-Med v1.5 style config with ``mm_vision_select_feature: cls_patch`` and no ``mm_hidden_size``: the
    converted model keeps the CLS feature (one image token more) and equals transformers' ``full`` strategy."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    full = tmp_path / "hf-full"
    shutil.copytree(llava["hf"], full)
    for name in ("config.json", "processor_config.json"):
        data = json.loads((full / name).read_text())
        (full / name).write_text(json.dumps({**data, "vision_feature_select_strategy": "full"}))
    reference = LlavaForConditionalGeneration.from_pretrained(full).eval()
    processor = AutoProcessor.from_pretrained(full)
    inputs = dict(processor(images=test_image(32), text="USER: <image>\nWhere? ASSISTANT:", return_tensors="pt"))
    src = write_original_llava(reference, llava["hf"], tmp_path / "orig", llava["tower"],
                               arch="LlavaMistralForCausalLM", model_type="llava_mistral")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["mm_hidden_size"]
    (src / "config.json").write_text(json.dumps({**cfg, "mm_vision_select_feature": "cls_patch"}))
    model, converted, _ = load_model_and_processor(src)
    ids = converted(images=test_image(32), text="<image>", return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == model.config.image_seq_length == 17
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs))


def test_anyres_and_projector_only_folders_are_refused_in_one_line(llava, tmp_path):
    """LLaVA-1.6's ``image_aspect_ratio: anyres`` was converted as one square image (its tiles silently lost);
    a pretraining-stage folder (``mm_projector.bin`` alone) said only that it has no weights."""
    from mmedagent.model.llava_convert import convert_llava_checkpoint

    anyres = write_original_llava(llava["model"], llava["hf"], tmp_path / "llava-v1.6", llava["tower"])
    cfg = json.loads((anyres / "config.json").read_text())
    (anyres / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": "anyres"}))
    with pytest.raises(ValueError, match=r"image_aspect_ratio 'anyres' \(LLaVA-NeXT / LLaVA-1.6 tiling\) is not "
                                         "supported"):
        convert_llava_checkpoint(anyres, tmp_path / "out")
    pretrain = write_original_llava(llava["model"], llava["hf"], tmp_path / "pretrain", llava["tower"])
    state = torch.load(pretrain / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if ".mm_projector." in k}, pretrain / "mm_projector.bin")
    (pretrain / "pytorch_model.bin").unlink()
    run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(pretrain), "--dst",
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {pretrain} holds only mm_projector.bin (LLaVA's pretraining stage: the projector without the "
        "language model), not a full checkpoint; use the checkpoint fine-tuned from it")


def test_a_full_clip_checkpoint_is_a_tower(llava, tmp_path):
    """``openai/clip-vit-large-patch14-336``, what ``mm_vision_tower`` names, is a full CLIP (text half too)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vision = llava["model"].config.vision_config.to_dict()
    clip = CLIPModel(CLIPConfig(vision_config=vision, projection_dim=16, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)))
    clip.vision_model.load_state_dict(llava["model"].model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor.from_pretrained(llava["tower"]).save_pretrained(tmp_path / "clip")
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", tmp_path / "clip")
    model, _, _ = load_model_and_processor(src)
    torch.testing.assert_close(logits(model, llava["inputs"]), logits(llava["model"], llava["inputs"]))


def test_a_tower_that_is_not_a_clip_vision_checkpoint_is_one_error_line(llava, tmp_path):
    """``--vision-tower`` at the llava-hf folder (whose tower is inside it, under other names) converted with a
    randomly initialised tower, with only transformers' warning; a wrong ``--vision-tower`` path was blamed on
    ``mm_vision_tower``."""
    src = write_original_llava(llava["model"], llava["hf"], tmp_path / "orig", llava["tower"])
    for tower, message in [
        (llava["hf"], rf"error: vision tower '{llava['hf']}' \(given as --vision-tower\) is not a CLIP vision "
                      r"checkpoint: \d+ of its weights are missing \(embeddings\..*\); pass the CLIP tower with "
                      "--vision-tower$"),
        (tmp_path / "no-such-tower", rf"error: vision tower '{tmp_path / 'no-such-tower'}' \(given as --vision-tower\) "
                                     "could not be loaded; pass its local path with --vision-tower$"),
    ]:
        run = subprocess.run([sys.executable, "scripts/convert_llava_checkpoint.py", "--src", str(src), "--dst",
                              str(tmp_path / "out"), "--vision-tower", str(tower)], capture_output=True, text=True)
        assert run.returncode == 2, run.stderr[-2000:]
        assert re.match(message, run.stderr.strip().splitlines()[-1]), run.stderr[-1000:]
    assert not (tmp_path / "out").exists()
