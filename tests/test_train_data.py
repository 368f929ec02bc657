"""Training data, arguments and model preparation, in-process on tiny models (no launcher)."""

import json
import re
import warnings

import pytest
import torch
from _train_fixtures import ROOT, TEXT_RECORD, tool_record, write_images
from PIL import Image

from mmedagent.data.formats import DataError
from mmedagent.protocol import Record


def _dataset(model_dir, data_path, folder, template="vicuna_v1", max_len=2048, family=None):
    from mmedagent.model.loading import load_processor
    from mmedagent.train.dataset import SupervisedDataset, load_samples

    family = family or ("qwen2_vl" if "qwen" in model_dir.name else "llava")
    samples = load_samples(str(data_path), str(folder) if folder else None, vision=True)
    return SupervisedDataset(samples, load_processor(model_dir, family), family, template, max_len)


def _trained_text(ds, item):
    ids = [t for t, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()) if lab != -100]
    return ds.tokenizer.decode(ids)


def test_labels_cover_exactly_the_assistant_turns(tiny_models, train_data):
    ds = _dataset(tiny_models("llava"), train_data["mmedagent"], train_data["images"])
    item = ds[0]
    rec = Record.from_dict(tool_record(0, "img0.png"))
    plan, answer = (m.text() for m in rec.conversations if m.role == "gpt")
    assert _trained_text(ds, item) == f" {plan}</s> {answer}</s>"  # both gpt turns + their end-of-turn
    ids, labels = item["input_ids"], item["labels"]
    image = ids == ds.image_token_id
    assert image.sum() == 16 and (labels[image] == -100).all()  # 4x4 patches, never trained
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    learned = (labels != -100).nonzero().flatten()
    assert (labels[learned] == ids[learned]).all()
    prompt = ds.tokenizer.decode(ids[: learned[0]])
    assert "USER:" in prompt and "Can you locate the tumor" in prompt


def test_qwen2_vl_chat_template_labels(tiny_models, train_data):
    ds = _dataset(tiny_models("qwen2_vl"), train_data["sharegpt"], None, template=None)
    item = ds[1]
    text = _trained_text(ds, item)
    assert '"prompts": ["nodule"]' in text and "The nodule is in the lower right region." in text
    assert "Where is the nodule" not in text and "grounding dino output" not in text
    assert set(item) >= {"pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert (item["labels"][item["input_ids"] == ds.image_token_id] == -100).all()


def test_truncation_keeps_image_tokens_whole(tiny_models, train_data):
    full = _dataset(tiny_models("llava"), train_data["mmedagent"], train_data["images"])[0]
    ds = _dataset(tiny_models("llava"), train_data["mmedagent"], train_data["images"], max_len=100)
    item = ds[0]
    assert len(item["input_ids"]) == len(item["labels"]) == 100
    assert (item["input_ids"] == ds.image_token_id).sum() == 16
    assert (item["input_ids"] == full["input_ids"][:100]).all()
    tight = _dataset(tiny_models("llava"), train_data["mmedagent"], train_data["images"], max_len=40)
    with pytest.raises(DataError, match=r"mmedagent.json: record 1: the image tokens end at position \d+, beyond "
                                        r"--model_max_length 40"):
        tight[0]


def test_records_cut_to_the_length_limit_are_named_then_counted(tiny_models, train_data, caplog, monkeypatch):
    from mmedagent.train import dataset

    monkeypatch.setattr(dataset, "CUT_COUNT_EVERY", 2)
    ds = _dataset(tiny_models("llava"), train_data["mmedagent"], train_data["images"], max_len=100)
    full = _dataset(tiny_models("llava"), train_data["mmedagent"], train_data["images"])
    with caplog.at_level("WARNING", logger=dataset.log.name):
        for epoch in range(2):  # a record seen again is not reported again
            for i in range(len(ds)):
                ds[i]
    cut = [i for i in range(len(full)) if len(full[i]["input_ids"]) > 100]
    assert len(cut) > dataset.CUT_NAMED + 1
    named = [r.getMessage() for r in caplog.records if "cut to --model_max_length 100 (" in r.getMessage()]
    assert len(named) == dataset.CUT_NAMED and named[0].startswith(f"{full.samples[cut[0]].where}: "
                                                                    f"{len(full[cut[0]]['input_ids'])} tokens")
    lost = int((full[cut[0]]["labels"][100:] != -100).sum())
    assert f"({lost} answer tokens not trained)" in named[0]
    counts = [r.getMessage() for r in caplog.records if "records cut to --model_max_length 100 so far" in r.getMessage()]
    assert counts and counts[-1].startswith(f"{len(cut) - len(cut) % 2} records")


def test_a_record_cut_before_its_answer_is_reported_once_not_every_epoch(tiny_models, tmp_path, caplog):
    from mmedagent.train import dataset

    names = write_images(tmp_path / "im", 1)
    short = {"id": "s", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    data = tmp_path / "train.json"
    data.write_text(json.dumps([short] + [tool_record(k, names[0]) for k in range(dataset.CUT_NAMED)]))
    full = _dataset(tiny_models("llava"), data, tmp_path / "im")
    answer_at = min(int((full[i]["labels"] != -100).nonzero()[0]) for i in range(1, len(full)))
    assert len(full[0]["input_ids"]) <= answer_at  # only the tool records are cut, before their first answer token
    ds = _dataset(tiny_models("llava"), data, tmp_path / "im", max_len=answer_at)
    with caplog.at_level("WARNING", logger=dataset.log.name):
        for epoch in range(3):
            for i in range(len(ds)):
                ds[i]
    warned = [r.getMessage() for r in caplog.records]
    assert [m.split(":")[1] for m in warned] == [f" record {i}" for i in range(2, len(ds) + 1)], warned
    assert all(f"to --model_max_length {answer_at} (" in m and "not trained: no answer token left)" in m for m in warned)


@pytest.mark.parametrize("question", ["<image><image>\nCompare the two scans.", "Compare the two scans."])
def test_adjacent_images_get_their_labels(tiny_models, tmp_path, question):
    """Two images whose markers touch (written so, or added for a record without markers): the processor's
    expanded image tokens form one run, and the labels still line up."""
    names = write_images(tmp_path / "im", 2)
    record = tool_record(0, names[0])
    record["image"] = names
    record["conversations"][0]["value"] = question
    path = tmp_path / "two.json"
    path.write_text(json.dumps([record]))
    ds = _dataset(tiny_models("llava"), path, tmp_path / "im")
    item = ds[0]
    plan, answer = (m.text() for m in Record.from_dict(record).conversations if m.role == "gpt")
    assert _trained_text(ds, item) == f" {plan}</s> {answer}</s>"
    image = item["input_ids"] == ds.image_token_id
    assert image.sum() == 32 and (item["labels"][image] == -100).all()
    assert item["pixel_values"].shape[0] == 2


@pytest.mark.parametrize("bad, message", [
    ({"image": "missing.png"}, r"record 2: image not found: .*missing.png"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]},
     r"record 2: turn 1 is 'assistant', expected 'user'"),
    ({"conversations": [{"from": "human", "value": "<image>\nonly a question"}]}, r"record 2: no assistant turn"),
    ({"conversations": [{"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}]},
     r"record 2: 2 <image> (marker|tag)\(s\) for 1 image\(s\)"),
])
def test_bad_records_name_file_and_record(tmp_path, bad, message):
    from mmedagent.train.dataset import load_samples

    names = write_images(tmp_path / "im", 1)
    good = tool_record(0, names[0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, {**good, **bad}]))
    with pytest.raises(DataError, match="bad.json: " + message):
        load_samples(str(path), str(tmp_path / "im"), vision=True)


def test_unusable_images_are_all_reported_before_training(tmp_path):
    """Files that exist but are no image (a Git LFS pointer, an HTML error page, an empty file) and missing ones
    are all found by their first bytes before training, and reported in one line: file count, first references."""
    import nibabel as nib
    import numpy as np

    from mmedagent.imaging import load_image
    from mmedagent.train.dataset import load_samples

    im = tmp_path / "im"
    names = write_images(im, 1)
    (im / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 52311\n")
    (im / "page.png").write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n")
    (im / "empty.png").write_bytes(b"")
    nib.save(nib.Nifti1Pair(np.zeros((8, 8, 3), dtype=np.int16), np.eye(4)), im / "ct.img")  # .img + .hdr
    load_image(im / "ct.img")  # the voxel half of a pair is an image the data loader reads
    refs = [names[0], "lfs.png", "page.png", "empty.png", "missing.png", "lfs.png", "ct.img", "lfs.png", "page.png"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([tool_record(k, ref) for k, ref in enumerate(refs)]))
    with pytest.raises(DataError) as err:
        load_samples(str(path), str(im), vision=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("4 image file(s) cannot be used for training (7 reference(s) in the data): ")
    assert [re.sub(r".*bad\.json: ", "", part) for part in message.split("; ")] == [
        "record 2: a Git LFS pointer, not the image (fetch it: git lfs pull): lfs.png",
        "record 3: an HTML page, not an image: page.png",
        "record 4: empty file, not an image: empty.png",
        "record 5: image not found: missing.png",
        "record 6: a Git LFS pointer, not the image (fetch it: git lfs pull): lfs.png",
        "and 2 more"]
    assert str(im) not in message  # references as the data writes them
    good = tmp_path / "good.json"
    good.write_text(json.dumps([tool_record(0, names[0]), tool_record(1, "ct.img")]))
    assert [s.images for s in load_samples(str(good), str(im), vision=True)] == [(str(im / names[0]),),
                                                                                  (str(im / "ct.img"),)]


def test_images_without_image_folder_lie_beside_the_data_file(tmp_path, monkeypatch):
    """Without --image_folder, relative image paths are resolved against the data file's folder, as
    read_records(check_images=True) checks them; not against the current directory."""
    from mmedagent.data.formats import read_records
    from mmedagent.train.dataset import load_samples

    names = write_images(tmp_path / "set" / "im", 1)
    data = tmp_path / "set" / "train.json"
    data.write_text(json.dumps([tool_record(0, f"im/{names[0]}")]))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert read_records(data, check_images=True)
    assert load_samples(str(data), None, vision=True)[0].images == (str(tmp_path / "set" / "im" / names[0]),)
    monkeypatch.chdir(tmp_path)
    assert load_samples("set/train.json", None, vision=True)[0].images == (f"set/im/{names[0]}",)


def test_validation_data_is_checked_before_training(tiny_models, tmp_path):
    from mmedagent.train.run import build_trainer

    names = write_images(tmp_path / "im", 2)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([tool_record(0, names[0])]))
    val = tmp_path / "val.json"
    val.write_text(json.dumps([tool_record(1, names[1]), tool_record(2, "missing.png")]))
    base = ["--model_name_or_path", str(tiny_models("llava")), "--output_dir", str(tmp_path / "out"),
            "--data_path", str(train), "--image_folder", str(tmp_path / "im"), "--report_to", "none"]
    with pytest.raises(DataError, match=r"val.json: record 2: image not found: .*missing.png"):
        build_trainer([*base, "--eval_data_path", str(val)])
    with pytest.raises(ValueError, match="--eval_strategy steps needs validation data: --eval_data_path"):
        build_trainer([*base, "--eval_strategy", "steps"])


def test_validation_images_default_to_the_training_folders_only_when_they_pair(tiny_models, tmp_path):
    """One validation file beside two training files with their own image folders: the error names
    --eval_image_folder, which is what to give, not a mismatch of the training data."""
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import build_trainer

    for name in ("a", "b"):
        write_images(tmp_path / f"im_{name}", 1)
        (tmp_path / f"{name}.json").write_text(json.dumps([tool_record(0, "img0.png")]))
    base = ["--model_name_or_path", str(tiny_models("llava")), "--output_dir", str(tmp_path / "out"),
            "--data_path", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}",
            "--image_folder", f"{tmp_path / 'im_a'},{tmp_path / 'im_b'}", "--eval_data_path", str(tmp_path / "a.json"),
            "--report_to", "none"]
    with pytest.raises(FlagError, match=r"^--image_folder \(the default of --eval_image_folder\) lists 2 folders for "
                                        r"1 --eval_data_path file\(s\)"):
        build_trainer(base)
    with pytest.raises(FlagError, match=r"^--eval_image_folder lists 3 folders for 1 --eval_data_path file\(s\)"):
        build_trainer([*base, "--eval_image_folder", "x,y,z"])
    trainer, _ = build_trainer([*base, "--eval_image_folder", str(tmp_path / "im_a")])
    assert trainer.eval_dataset.samples[0].images == (str(tmp_path / "im_a" / "img0.png"),)


def test_comma_separated_files_and_folders(tmp_path):
    from mmedagent.train.dataset import load_samples

    for name in ("a", "b"):
        write_images(tmp_path / f"im_{name}", 1)
        (tmp_path / f"{name}.json").write_text(json.dumps([tool_record(0, "img0.png"), TEXT_RECORD]))
    paths = f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"
    samples = load_samples(paths, f"{tmp_path / 'im_a'},{tmp_path / 'im_b'}", vision=True)
    assert [s.images for s in samples] == [(str(tmp_path / "im_a/img0.png"),), (), (str(tmp_path / "im_b/img0.png"),), ()]
    assert samples[0].messages[0]["content"].startswith("<image>\n")
    with pytest.raises(ValueError, match=r"^--image_folder lists 3 folders for 2 --data_path file\(s\)"):
        load_samples(paths, "x,y,z", vision=True)
    with pytest.raises(DataError, match=r"a.json: record 1: has an image but the backbone is a text-only model"):
        load_samples(paths, f"{tmp_path / 'im_a'},{tmp_path / 'im_b'}", vision=False)


def test_pad_is_done_by_the_saved_processor_so_inference_pads_too(tiny_models, tmp_path):
    """--image_aspect_ratio pad on a transformers-layout LLaVA (plain CLIP processor: resize + centre crop):
    the processor saved with the adapter pads to a square with the mean colour, and training used it."""
    from mmedagent.model.loading import load_model_and_processor, load_processor
    from mmedagent.train.run import build_trainer

    names = write_images(tmp_path / "im", 2)  # 40 high, 28 / 32 wide
    train = tmp_path / "train.json"
    train.write_text(json.dumps([tool_record(1, names[1])]))
    out = tmp_path / "out"
    trainer, _ = build_trainer(["--model_name_or_path", str(tiny_models("llava")), "--output_dir", str(out),
                                "--data_path", str(train), "--image_folder", str(tmp_path / "im"), "--report_to",
                                "none", "--lora_r", "4", "--version", "v1", "--image_aspect_ratio", "pad"])
    trainer.save_model(str(out))  # adapter + processing_class, as at the end of training
    _, served, _ = load_model_and_processor(out, dtype="float32", device="cpu")  # what serving loads
    assert type(served.image_processor).__name__ == "LlavaImageProcessor" and served.image_processor.do_pad

    image = Image.open(tmp_path / "im" / names[1]).convert("RGB")
    w, h = image.size
    assert w != h
    base = load_processor(tiny_models("llava"), "llava").image_processor
    square = Image.new("RGB", (max(w, h),) * 2, tuple(int(255 * m) for m in base.image_mean))  # LLaVA's expand2square
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    by_hand = base(images=square, return_tensors="pt")["pixel_values"]
    pixels = served(text="<image>", images=image, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, by_hand, atol=1e-6)
    assert not torch.allclose(base(images=image, return_tensors="pt")["pixel_values"], by_hand, atol=1e-2)  # cropped
    assert torch.equal(trainer.train_dataset[0]["pixel_values"], pixels)  # trained on what is served


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_pad_is_refused_for_backbones_that_keep_the_aspect_ratio(tmp_path, family):
    from mmedagent.train.args import FlagError, check_backbone_flags, parse_args

    flags = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                        "--image_aspect_ratio", "pad"])
    with pytest.raises(FlagError, match=rf"^--image_aspect_ratio pad applies to LLaVA only: b \(a {family} backbone\) "
                                        r"keeps each image's aspect ratio itself"):
        check_backbone_flags(family, *flags)
    check_backbone_flags("llava", *flags)
    check_backbone_flags(family, *parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path),
                                              "--data_path", "d", "--image_aspect_ratio", "square"]))


def test_mixed_batch_collates_and_runs(tiny_models, train_data):
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.dataset import Collator

    ds = _dataset(tiny_models("llava"), train_data["mixed"], train_data["images"])
    assert [n > 0 for n in ds.modality_lengths] == [True] * 4 + [False] * 2  # keyed on the images themselves
    batch = Collator(ds.tokenizer.pad_token_id, "llava")([ds[0], ds[4], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape and batch["pixel_values"].shape[0] == 2
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    model, _, _ = load_model_and_processor(tiny_models("llava"), dtype="float32", device="cpu")
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # ZeRO-3: a text-only batch carries a masked blank image, so every rank runs the vision tower
    text_only = [ds[4], ds[5]]
    blanked = Collator(ds.tokenizer.pad_token_id, "llava", ds.blank_image_item())(text_only)
    plain = Collator(ds.tokenizer.pad_token_id, "llava")(text_only)
    assert blanked["pixel_values"].shape[0] == 1 and "pixel_values" not in plain
    assert (blanked["labels"] != -100).sum() == (plain["labels"] != -100).sum()
    assert (blanked["input_ids"] == ds.image_token_id).sum() == 16
    assert torch.allclose(model(**blanked).loss, model(**plain).loss, atol=1e-5)


def test_modality_groups_never_mix():
    from mmedagent.train.trainer import modality_grouped_indices

    lengths = [5, -3, 7, -2, 9, 4, -8, 6, 1, -1]
    order = modality_grouped_indices(lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(len(lengths)))
    full = [order[k:k + 2] for k in range(0, 8, 2)]
    assert all(len({lengths[i] > 0 for i in mb}) == 1 for mb in full)
    assert all(abs(lengths[a]) >= abs(lengths[b]) for a, b in full)


RECIPE = ["--lora_enable", "True", "--lora_r", "128", "--lora_alpha", "256", "--mm_projector_lr", "2e-5", "--deepspeed", "./scripts/zero2.json", "--version", "v1", "--data_path", "d.json", "--image_folder", "imgs", "--vision_tower", "openai/clip-vit-large-patch14-336", "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--group_by_modality_length", "False", "--bf16", "True", "--num_train_epochs", "30", "--per_device_train_batch_size", "12", "--gradient_accumulation_steps", "2", "--save_strategy", "steps", "--save_steps", "3000", "--save_total_limit", "2", "--learning_rate", "2e-4", "--weight_decay", "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", "2048", "--gradient_checkpointing", "True", "--dataloader_num_workers", "4", "--lazy_preprocess", "True", "--report_to", "none"]


def test_mmedagent_recipe_flags_parse(tmp_path, monkeypatch):
    from mmedagent.train.args import check_backbone_flags, parse_args, template_name

    monkeypatch.chdir(ROOT)  # the recipe names ./scripts/zero2.json
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # MMedAgent's --gradient_checkpointing is no deprecated name here
        m, d, t = parse_args(["--model_name_or_path", "base", "--output_dir", str(tmp_path), *RECIPE])
    assert t.activation_checkpointing is True and t.gradient_checkpointing is True
    assert t.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert (t.lora_r, t.lora_alpha, t.mm_projector_lr, t.warmup_steps, t.bf16) == (128, 256, 2e-5, 0.03, True)
    assert (m.mm_vision_select_layer, m.mm_use_im_start_end, d.image_aspect_ratio) == (-2, False, "pad")
    assert template_name(m.version) == "vicuna_v1" and t.use_cpu == (not torch.cuda.is_available())
    check_backbone_flags("llava", m, d, t)
    with pytest.raises(ValueError, match=r"--vision_tower, --mm_vision_select_layer, --mm_projector_type, "
                                         r"--mm_use_im_start_end, --mm_use_im_patch_token do\(es\) not apply to base "
                                         r"\(a qwen2_vl backbone\)"):
        check_backbone_flags("qwen2_vl", m, d, t)
    text_only = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                            "--image_folder", "i", "--image_aspect_ratio", "pad", "--mm_projector_lr", "1e-5"])
    with pytest.raises(ValueError, match=r"--image_folder, --image_aspect_ratio, --mm_projector_lr .*causal_lm"):
        check_backbone_flags("causal_lm", *text_only)


def test_a_bitsandbytes_optim_is_left_to_a_deepspeed_config_with_its_own_optimizer(tmp_path):
    """A DeepSpeed config with an ``optimizer`` section chooses the optimizer itself (transformers ignores
    ``--optim``): the flag is then no reason to refuse the run on a machine without bitsandbytes."""
    from mmedagent.train.args import parse_args

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                  "zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    _, _, t = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path / "o"), "--data_path", "d",
                          "--deepspeed", str(config), "--optim", "adamw_8bit"])
    assert str(getattr(t.optim, "value", t.optim)) == "adamw_8bit"


@pytest.mark.parametrize("flags, message", [
    (["--mm_use_im_start_end", "True"], "--mm_use_im_start_end True is not supported"),
    (["--bits", "4"], r"--bits 4 \(QLoRA\) needs a CUDA GPU"),
    (["--optim", "adamw_8bit"], r"^--optim adamw_8bit is a bitsandbytes optimizer: it needs a CUDA GPU with "
                                r"bitsandbytes, but this machine has no CUDA GPU. Use --optim adamw_torch here.$"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in"),
    (["--fp16", "True", "--deepspeed", str(ROOT / "scripts" / "zero2.json")], r"^--fp16 True needs a CUDA GPU"),
    (["--fp16", "True"], r"^--fp16 True needs a CUDA GPU: on CPU there is no fp16 mixed precision .* Use --bf16 True"),
    (["--image_aspect_ratio", "anyres"], "--image_aspect_ratio must be 'pad' or 'square'"),
    (["--mm_projector_lr", "2e-5", "--freeze_mm_mlp_adapter", "True"],
     r"^--mm_projector_lr sets the projector's learning rate, but --freeze_mm_mlp_adapter True keeps"),
    (["--version", "llava_v0"], r"^--version 'llava_v0' is not a conversation template; choose one of "
                                r"v1 \(= vicuna_v1\), vicuna \(= vicuna_v1\), llava_v1 \(= vicuna_v1\), vicuna_v1, "
                                r"llama3, qwen2, or leave --version out for the processor's own chat template$"),
])
def test_bad_flags_are_rejected(tmp_path, flags, message):
    from mmedagent.train.args import check_backbone_flags, parse_args

    if ("--bits" in flags or "--fp16" in flags or "--optim" in flags) and torch.cuda.is_available():
        pytest.skip("QLoRA and fp16 are allowed on a GPU")
    with pytest.raises(ValueError, match=message):
        check_backbone_flags("llava", *parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path),
                                                   "--data_path", "d", *flags]))


@pytest.mark.parametrize("flags, message", [
    (["--evaluation_strategy", "no"], r"^unknown flag\(s\): --evaluation_strategy \(did you mean --eval_strategy "),
    (["--overwrite_output_dir", "True"],
     r"--overwrite_output_dir \(gone from transformers 5; .* use a new --output_dir"),
    (["stray"], r"^unexpected argument\(s\) stray"),
    (["--lora_r", "abc"], r"^argument --lora_r/--lora-r: invalid int value: 'abc'$"),
    (["--bf16", "True", "--fp16", "True"], r"^At most one of fp16 and bf16 can be True"),
])
def test_unknown_flags_and_transformers_refusals_are_flag_errors(tmp_path, flags, message):
    """Typos, flags transformers 5 renamed or dropped, and its own flag checks: one ``error:`` line, not a traceback."""
    from mmedagent.train.args import FlagError, parse_args

    with pytest.raises(FlagError, match=message):
        parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d", *flags])


def test_version_names_map_to_model_layer_templates(tmp_path):
    from mmedagent.train.args import parse_args, template_name

    for version, template in (("v1", "vicuna_v1"), ("llava_v1", "vicuna_v1"), ("llama3", "llama3"), (None, None)):
        m, _, _ = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                              *(["--version", version] if version else [])])
        assert template_name(m.version) == template


def test_another_familys_template_is_refused_before_training(tiny_models, tmp_path):
    """--version llama3 on a Vicuna-tokenizer LLaVA would train on markers the tokenizer lacks."""
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import build_trainer

    names = write_images(tmp_path / "im", 1)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([tool_record(0, names[0])]))
    with pytest.raises(FlagError, match=r"^--version llama3: conversation template 'llama3' writes <\|.*which this "
                                        r"model's tokenizer does not have"):
        build_trainer(["--model_name_or_path", str(tiny_models("llava")), "--output_dir", str(tmp_path / "out"),
                       "--data_path", str(train), "--image_folder", str(tmp_path / "im"), "--report_to", "none",
                       "--lora_r", "4", "--version", "llama3"])


def test_vision_select_layer_must_be_the_checkpoints(tiny_models, tmp_path):
    """The adapter stores no config: a layer other than the checkpoint's would be dropped at merge / load."""
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import FlagError, parse_args
    from mmedagent.train.modeling import apply_llava_flags

    model, _, _ = load_model_and_processor(tiny_models("llava"), dtype="float32", device="cpu")
    assert model.config.vision_feature_layer == -2  # llava-hf's default, and MMedAgent's recipe value
    base = ["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d"]
    apply_llava_flags(model, parse_args([*base, "--mm_vision_select_layer", "-2"])[0])
    with pytest.raises(FlagError, match=r"^--mm_vision_select_layer -1 differs from the checkpoint's "
                                        r"vision_feature_layer \(-2\), and a LoRA adapter cannot carry another "
                                        r"layer.*checkpoint whose config.json has vision_feature_layer -1"):
        apply_llava_flags(model, parse_args([*base, "--mm_vision_select_layer", "-1"])[0])
    assert model.config.vision_feature_layer == -2


def test_qlora_keeps_the_frozen_vision_encoder_in_the_training_dtype(tiny_models, train_data, tmp_path):
    """peft's ``prepare_model_for_kbit_training`` makes every unquantized weight float32; the frozen vision encoder
    (kept unquantized) goes back to the training dtype, as in LLaVA's QLoRA: CLIP-L in float32 costs 0.6 GB more
    per GPU, Mllama's encoder 1.8 GB. (bitsandbytes needs a GPU: the base here is unquantized, ``bits`` set after
    the flags' CPU check.)"""
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import parse_args
    from mmedagent.train.dataset import Collator
    from mmedagent.train.modeling import prepare_model

    _, _, t = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                          "--lora_enable", "True", "--lora_r", "4", "--bf16", "True"])
    t.bits = 4
    model, _, _ = load_model_and_processor(tiny_models("llava"), dtype="bfloat16", device="cpu")
    model = prepare_model(model, "llava", t)
    vision = {p.dtype for n, p in model.named_parameters() if ".vision_tower." in n}
    assert vision == {torch.bfloat16}
    ds = _dataset(tiny_models("llava"), train_data["mixed"], train_data["images"], template="vicuna_v1", family="llava")
    batch = Collator(ds.tokenizer.pad_token_id, "llava")([ds[0], ds[1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the Trainer's --bf16 mixed precision
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_lora_targets_language_model_only_and_projector_trains_at_its_lr(tiny_models, tmp_path):
    from transformers import Trainer

    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import parse_args
    from mmedagent.train.modeling import apply_llava_flags, prepare_model
    from mmedagent.train.trainer import MMedTrainer

    m, _, t = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                          "--mm_projector_lr", "1e-5", "--learning_rate", "1e-3", "--lora_r", "4",
                          "--mm_projector_type", "linear"])
    model, _, _ = load_model_and_processor(tiny_models("llava"), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="--mm_projector_type linear does not match the checkpoint's projector"):
        apply_llava_flags(model, m)
    model = prepare_model(model, "llava", t)
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora and all(".language_model." in n for n in lora)
    assert {n.rsplit(".", 1)[-1] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in trainable)
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    opt = MMedTrainer(model=model, args=t, projector="model.multi_modal_projector").create_optimizer()
    proj = {id(p) for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad}
    by_lr: dict[float, set[int]] = {}
    for g in opt.param_groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
    assert set(by_lr) == {1e-3, 1e-5} and by_lr[1e-5] == proj
    assert opt.param_groups[0]["lr"] == 1e-3  # the Trainer logs group 0's rate
    assert issubclass(MMedTrainer, Trainer)


def test_lora_vision_adapts_vision_attention_and_mlp_but_not_the_projector(tiny_models, tmp_path):
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import parse_args
    from mmedagent.train.modeling import lora_target_regex, prepare_model

    base = ["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d", "--lora_r", "4"]
    _, _, t = parse_args([*base, "--lora_vision", "True",
                          "--lora_target_modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])
    model, _, _ = load_model_and_processor(tiny_models("mllama"), dtype="float32", device="cpu")
    model = prepare_model(model, "mllama", t)
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    vision = {n.rsplit(".", 1)[-1] for n in lora if ".vision_model." in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} <= vision
    assert any(".language_model." in n for n in lora)
    assert not any("multi_modal_projector" in n and "modules_to_save" not in n for n in lora)
    with pytest.raises(ValueError, match="needs --lora_enable True"):
        parse_args([*base, "--lora_vision", "True", "--lora_enable", "False"])
    text_only, _, _ = load_model_and_processor(tiny_models("llama"), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="no vision encoder"):
        lora_target_regex(text_only, "causal_lm", vision_too=True)
    qwen, _, _ = load_model_and_processor(tiny_models("qwen2_vl"), dtype="float32", device="cpu")
    pattern = re.compile(lora_target_regex(qwen, "qwen2_vl", vision_too=True))
    names = [n for n, _ in qwen.named_modules()]
    assert any(pattern.match(n) for n in names if n.startswith("model.visual.blocks."))
    assert not any(pattern.match(n) for n in names if n.startswith("model.visual.merger"))


def test_full_finetune_freezes_vision_only(tiny_models, tmp_path):
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import parse_args
    from mmedagent.train.modeling import prepare_model

    _, _, t = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                          "--lora_enable", "False"])
    model, _, _ = load_model_and_processor(tiny_models("qwen2_vl"), dtype="float32", device="cpu")
    model = prepare_model(model, "qwen2_vl", t)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(v for n, v in grads.items() if n.startswith("model.language_model.") or ".merger." in n)
    assert not any(v for n, v in grads.items() if n.startswith("model.visual.") and ".merger." not in n)


@pytest.mark.parametrize("lora", ["True", "False"])
def test_bf16_without_deepspeed_updates_fp32_weights(tiny_models, tmp_path, lora):
    """--bf16 loads the model in bf16; what trains (LoRA, the projector, or the whole language model) must be fp32
    for the Trainer's mixed precision, or bf16's rounding swallows small updates (fp16's NaNs them)."""
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import parse_args
    from mmedagent.train.modeling import prepare_model

    _, _, t = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                          "--bf16", "True", "--lora_enable", lora, "--lora_r", "4"])
    model, _, _ = load_model_and_processor(tiny_models("llava"), dtype="bfloat16", device="cpu")
    model = prepare_model(model, "llava", t)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert projector
    before = [p.detach().clone() for p in projector]
    opt = torch.optim.AdamW(projector, lr=2e-5, weight_decay=0)  # MMedAgent's --mm_projector_lr
    for p in projector:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all((b != p).all() for b, p in zip(before, projector))  # every weight moved


def test_mllama_mixed_batch(tiny_models, train_data):
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.dataset import Collator

    ds = _dataset(tiny_models("mllama"), train_data["mixed"], train_data["images"], template=None, family="mllama")
    text = _trained_text(ds, ds[0])
    assert '"prompts": ["tumor"]' in text and "Can you locate" not in text
    batch = Collator(ds.tokenizer.pad_token_id, "mllama")([ds[0], ds[4]])  # image + text-only
    assert batch["pixel_values"].shape[0] == 2 and batch["cross_attention_mask"].shape[:2] == batch["input_ids"].shape
    assert not batch["cross_attention_mask"][1].any()  # the text-only row attends to no image
    model, _, _ = load_model_and_processor(tiny_models("mllama"), dtype="float32", device="cpu")
    assert torch.isfinite(model(**batch).loss)


def test_mllama_blank_image_leaves_the_loss_unchanged(tiny_models, train_data, tmp_path):
    """ZeRO-3 adds a masked-out blank image to an image-free batch (every rank must run the vision encoder,
    projector and cross-attention layers); no real token may see it, so the loss is that without it."""
    from mmedagent.model.loading import load_model_and_processor
    from mmedagent.train.args import parse_args
    from mmedagent.train.dataset import Collator
    from mmedagent.train.modeling import prepare_model

    ds = _dataset(tiny_models("mllama"), train_data["mixed"], train_data["images"], template=None, family="mllama")
    model, _, _ = load_model_and_processor(tiny_models("mllama"), dtype="float32", device="cpu")
    gated = [m for m in model.modules() if type(m).__name__ == "MllamaCrossAttentionDecoderLayer"]
    assert gated and all(layer.cross_attn_attn_gate.abs().max() > 0 for layer in gated)  # open: shut ones hide a leak
    _, _, t = parse_args(["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d",
                          "--lora_r", "4"])
    model = prepare_model(model, "mllama", t).eval()  # LoRA B starts at 0: the base model's outputs

    pad_id = ds.tokenizer.pad_token_id
    text_only = [ds[4], ds[5]]
    blank = ds.blank_image_item()
    blanked = Collator(pad_id, "mllama", blank)(text_only)
    plain = Collator(pad_id, "mllama")(text_only)
    assert "pixel_values" not in plain and blanked["pixel_values"].shape[0] == 2
    assert blanked["aspect_ratio_ids"].flatten().tolist()[1] == 0 < blanked["aspect_ratio_ids"].flatten().tolist()[0]
    assert not blanked["pixel_values"][1].any()  # the blank fills the first row; the other row is padding
    assert not blanked["cross_attention_mask"].any()  # no token attends to the blank
    assert (blanked["labels"] != -100).sum() == (plain["labels"] != -100).sum()
    with torch.no_grad():
        assert torch.allclose(model(**blanked).loss, model(**plain).loss, atol=1e-5)
        # a text-only sample next to an image sample is trained as it is served (no image: layers skipped)
        mixed = Collator(pad_id, "mllama")([ds[0], ds[4]])
        n = len(ds[4]["input_ids"])
        alone = model(**Collator(pad_id, "mllama")([ds[4]])).logits[0]
        assert torch.allclose(model(**mixed).logits[1, :n], alone, atol=1e-5)


def test_hf_image_caption_dataset_becomes_instruction_pairs(tiny_models, tmp_path):
    import datasets

    images = [Image.new("RGB", (30, 20), c) for c in ((200, 0, 0), (0, 200, 0))]
    captions = ["Chest X-ray with a right lower lobe opacity.", "Brain MRI with a left temporal lesion."]
    hf = datasets.Dataset.from_dict({"image": images, "caption": captions}).cast_column("image", datasets.Image())
    hf.save_to_disk(str(tmp_path / "radiology_mini"))
    ds = _dataset(tiny_models("llava"), tmp_path / "radiology_mini", tmp_path / "exported")
    assert len(ds) == 2 and all(len(s.images) == 1 for s in ds.samples)
    item = ds[1]
    assert captions[1] in _trained_text(ds, item) and item["pixel_values"].shape[0] == 1


def test_the_seed_fixes_the_adapters_initial_weights(tiny_models, tmp_path):
    """``--seed`` seeds before the LoRA adapters are made (Trainer seeds only after), so a run repeats."""
    from mmedagent.train.run import build_trainer

    names = write_images(tmp_path / "im", 1)
    train = tmp_path / "train.json"
    train.write_text(json.dumps([tool_record(0, names[0])]))

    def adapters(seed: str) -> dict[str, torch.Tensor]:
        trainer, _ = build_trainer(["--model_name_or_path", str(tiny_models("llava")), "--output_dir",
                                    str(tmp_path / "out"), "--data_path", str(train), "--image_folder",
                                    str(tmp_path / "im"), "--report_to", "none", "--lora_enable", "True",
                                    "--lora_r", "4", "--seed", seed])
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_A" in k}

    first, again, other = adapters("0"), adapters("0"), adapters("1")
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a (tf32) GPU")
def test_tf32_without_a_gpu_is_refused_by_our_flag_check(tmp_path):
    """Before transformers' own ValueError (one traceback per rank), as for --bits 4."""
    from mmedagent.train.args import FlagError, parse_args

    base = ["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d"]
    with pytest.raises(FlagError, match=r"^--tf32 True needs a CUDA GPU .*this machine has no GPU. Leave --tf32 out"):
        parse_args([*base, "--tf32", "True"])
    assert parse_args([*base, "--tf32", "False"])[2].tf32 is False


def test_mmedagents_deepspeed_flag_finds_the_shipped_config_outside_a_checkout(tmp_path, monkeypatch):
    """``--deepspeed ./scripts/zero2.json`` as MMedAgent's recipe writes it, run where there is no scripts/ (an
    installed package): the shipped config is used; a file that is there is left alone, one that is nowhere named.
    """
    from mmedagent.train.args import DEEPSPEED_CONFIGS, FlagError, parse_args, shipped_deepspeed_config

    assert (ROOT / "scripts" / "zero2.json").resolve() == (DEEPSPEED_CONFIGS / "zero2.json").resolve()
    monkeypatch.chdir(tmp_path)
    base = ["--model_name_or_path", "b", "--output_dir", str(tmp_path), "--data_path", "d"]
    _, _, args = parse_args([*base, "--deepspeed", "./scripts/zero3.json"])
    assert args.deepspeed == str(DEEPSPEED_CONFIGS / "zero3.json")
    assert shipped_deepspeed_config(["--deepspeed=scripts/zero2.json"]) == [f"--deepspeed={DEEPSPEED_CONFIGS / 'zero2.json'}"]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "zero2.json").write_text("{}")
    assert shipped_deepspeed_config(["--deepspeed", "scripts/zero2.json"]) == ["--deepspeed", "scripts/zero2.json"]
    (tmp_path / "mine.json").write_text("{}")
    assert shipped_deepspeed_config(["--deepspeed", "mine.json"]) == ["--deepspeed", "mine.json"]
    text = '{"zero_optimization": {"stage": 2}}'  # DeepSpeed takes a config as JSON text too
    assert shipped_deepspeed_config(["--deepspeed", text]) == ["--deepspeed", text]
    with pytest.raises(FlagError, match=r"^--deepspeed zero4\.json: no such file; the shipped configs are zero2\.json, "
                                        r"zero3\.json, zero3_offload\.json"):  # not transformers' "Expected a string path"
        shipped_deepspeed_config(["--deepspeed", "zero4.json"])
