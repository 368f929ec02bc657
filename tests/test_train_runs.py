"""Whole ``train/run.py`` runs on a tiny text LM, in-process: finished runs are not trained again, resuming
with other data or settings is refused, and runs that cannot work fail up front with one clear error."""

import json
import subprocess
import sys

import pytest
from _train_fixtures import ROOT, TEXT_RECORD, TRAIN_MEM
from PIL import Image

from mmedagent.data.formats import DataError


def _data(path, n=4, answer="Empirical antibiotics, chosen by severity and local resistance."):
    rows = [{**TEXT_RECORD, "id": f"t{k}",
             "conversations": [TEXT_RECORD["conversations"][0], {"from": "gpt", "value": f"{answer} ({k})"}]}
            for k in range(n)]
    path.write_text(json.dumps(rows))
    return path


def _argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "1000", "--report_to", "none",
            "--logging_steps", "1", *extra]


def _step(out):
    return json.loads((out / "trainer_state.json").read_text())["global_step"]


def test_finished_run_is_not_trained_again_and_changed_settings_are_refused(tiny_models, tmp_path, caplog):
    from mmedagent.train.run import RUN_FILE, main
    from mmedagent.train.trainer import ResumeError

    model, data, out = tiny_models("llama"), _data(tmp_path / "train.json"), tmp_path / "run"
    assert main(_argv(model, data, out)) == out
    assert _step(out) == 2 and (out / "checkpoint-2").is_dir() and (out / RUN_FILE).is_file()
    adapter = (out / "adapter_model.safetensors").read_bytes()

    caplog.clear()
    assert main(_argv(model, data, out)) == out  # the same run again: nothing to do
    assert _step(out) == 2 and not (out / "checkpoint-3").exists()
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert "nothing to do" in caplog.text

    (out / "mmedagent_train.json").unlink()  # killed after the last checkpoint, before the final save
    assert main(_argv(model, data, out)) == out
    assert _step(out) == 2 and not (out / "checkpoint-3").exists() and (out / "mmedagent_train.json").is_file()

    with pytest.raises(ResumeError, match=r"--learning_rate \(0.001 -> 0.002\) changed.*new --output_dir"):
        main(_argv(model, data, out, "--learning_rate", "2e-3"))
    other = _data(tmp_path / "other.json", answer="Something else entirely.")
    with pytest.raises(ResumeError, match=r"the training data changed"):
        main(_argv(model, other, out))


def test_a_second_run_into_the_same_output_dir_is_refused_while_the_first_trains(tiny_models, tmp_path):
    from mmedagent.locks import take_lock
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import LOCK_FILE, main

    model, data, out = tiny_models("llama"), _data(tmp_path / "train.json"), tmp_path / "run"
    out.mkdir()
    first = take_lock(out / LOCK_FILE)  # what the first run holds while it trains
    with pytest.raises(FlagError, match=r"run is in use by another training run \(process \d+\): wait for it"):
        main(_argv(model, data, out))
    assert not (out / "checkpoint-2").exists()
    first.close()
    assert main(_argv(model, data, out)) == out and _step(out) == 2
    assert not (out / LOCK_FILE).exists()  # the trained folder holds no lock file


def test_missing_resume_folder_is_refused_up_front(tmp_path):
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import main

    data = _data(tmp_path / "train.json")
    with pytest.raises(FlagError, match=r"--resume_from_checkpoint .*gone: no such folder"):
        main(_argv(tmp_path / "no-model-needed", data, tmp_path / "run", "--resume_from_checkpoint",
                   str(tmp_path / "gone")))
    assert not (tmp_path / "run").exists()  # a refused run leaves no empty output folder


def test_a_run_with_no_answer_token_left_is_an_error(tiny_models, tmp_path):
    from mmedagent.train.run import main

    data = _data(tmp_path / "train.json")
    with pytest.raises(DataError, match=r"train.json: record 1: no answer token is left to train on after "
                                        r"truncation to --model_max_length 8"):
        main(_argv(tiny_models("llama"), data, tmp_path / "run", "--model_max_length", "8"))
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_dataset_errors_when_every_record_has_no_label(tiny_models, tmp_path):
    from mmedagent.model.loading import load_processor
    from mmedagent.train.dataset import SupervisedDataset, load_samples

    samples = load_samples(str(_data(tmp_path / "train.json", n=2)), None, vision=False)
    ds = SupervisedDataset(samples, load_processor(tiny_models("llama"), "causal_lm"), "causal_lm", None, 8)
    ds[0]  # one record without labels: a warning
    with pytest.raises(DataError, match="no record of .* has an answer token left"):
        ds[1]


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "0"], "--max_steps must be a positive number of steps, or -1"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
])
def test_nonsense_train_flags_are_refused(tmp_path, flags, message):
    from mmedagent.train.args import FlagError, parse_args

    with pytest.raises(FlagError, match=message):
        parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", *flags))


def test_llava_flags_not_taken_are_explained_not_guessed(tmp_path):
    """LLaVA's own flags get the reason, not the nearest name (--tune_mm_mlp_adapter is not --freeze_mm_mlp_adapter)."""
    from mmedagent.train.args import FlagError, parse_args

    with pytest.raises(FlagError, match=r"^unknown flag\(s\): --pretrain_mm_mlp_adapter \(the projector comes from "
                                        r"--model_name_or_path") as e:
        parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", "--pretrain_mm_mlp_adapter", "p.bin"))
    assert "did you mean" not in str(e.value)
    with pytest.raises(FlagError, match=r"^--tune_mm_mlp_adapter True \(LLaVA.s projector-only pretraining stage\) is "
                                        r"not supported; the projector trains by default"):
        parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", "--tune_mm_mlp_adapter", "True"))
    with pytest.raises(FlagError, match=r"^--freeze_backbone True with --lora_enable False would train the projector "
                                        r"alone"):
        parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", "--freeze_backbone", "True",
                         "--lora_enable", "False"))


@pytest.mark.parametrize("flags", [["--tune_mm_mlp_adapter", "False", "--freeze_backbone", "False"],
                                   ["--freeze_backbone", "True"]])
def test_llava_fine_tuning_values_of_its_stage_flags_are_taken(tmp_path, flags):
    """LLaVA fine-tuning scripts pass ``--tune_mm_mlp_adapter False`` / ``--freeze_backbone False`` (or True, which
    LoRA makes a no-op in LLaVA too): values that train what this script trains anyway are not refused."""
    from mmedagent.train.args import parse_args

    _, _, args = parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", *flags))
    assert args.lora_enable


def test_report_to_an_integration_that_cannot_run_is_refused_before_loading(tmp_path, monkeypatch):
    """MMedAgent's ``--report_to wandb`` on a machine without wandb: one error line from the flags, not the
    Trainer's traceback after the data was checked and the model loaded."""
    from transformers.integrations import integration_utils

    from mmedagent.train.args import FlagError, parse_args

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    with pytest.raises(FlagError, match=r"^--report_to wandb: WandbCallback requires wandb to be installed\..* Or pass "
                                        r"--report_to none\.$"):
        parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", "--report_to", "wandb"))
    with pytest.raises(FlagError, match=r"^--report_to: wanb is not supported"):
        parse_args(_argv(tmp_path / "m", tmp_path / "d.json", tmp_path / "o", "--report_to", "wanb"))


def test_missing_model_is_one_error_line(tmp_path):
    data = _data(tmp_path / "train.json")
    proc = subprocess.run([sys.executable, str(TRAIN_MEM), *_argv(tmp_path / "no_such_model", data, tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error: {tmp_path / 'no_such_model'}: no such local directory" in proc.stderr


def test_qwen2_vl_images_capped_to_image_max_tokens(tiny_models, tmp_path):
    """--image_max_tokens lowers the processor's max area (never raises it), and the saved processor keeps it."""
    from mmedagent.model.loading import load_processor
    from mmedagent.train.dataset import Sample, SupervisedDataset
    from mmedagent.train.run import cap_image_tokens

    processor = load_processor(tiny_models("qwen2_vl"), "qwen2_vl")
    ip = processor.image_processor
    side = ip.patch_size * ip.merge_size
    ip.size = {"shortest_edge": ip.size["shortest_edge"], "longest_edge": 4096 * side * side}  # a real model's limit
    big = tmp_path / "big.png"
    Image.new("RGB", (40 * side, 30 * side), (80, 80, 80)).save(big)
    sample = Sample("data.json", 1, ({"role": "user", "content": "<image>\nWhat is it?"},
                                     {"role": "assistant", "content": "A scan."}), (str(big),))

    def image_tokens():
        ds = SupervisedDataset([sample], processor, "qwen2_vl", None, 4096)
        return int((ds[0]["input_ids"] == ds.image_token_id).sum())

    assert image_tokens() == 40 * 30
    cap_image_tokens(processor, 100)
    assert image_tokens() <= 100
    cap_image_tokens(processor, 10_000)  # never raises the limit
    assert image_tokens() <= 100
    processor.save_pretrained(tmp_path / "saved")
    again = load_processor(tmp_path / "saved", "qwen2_vl").image_processor
    assert again.size["longest_edge"] == 100 * side * side


def test_original_llava_hub_id_trains_from_the_cache_with_the_vision_tower_flag(tiny_models, tmp_path, monkeypatch):
    """An original LLaVA checkpoint by hub id (``microsoft/llava-med-v1.5-mistral-7b`` in the HF cache) is
    converted and trained as a local original folder is; offline, its tower (``openai/clip-...``) comes from
    MMedAgent's ``--vision_tower`` (a local copy), and without it the error names that flag."""
    from _train_fixtures import write_images, write_mmedagent, write_original_llava_of
    from huggingface_hub import constants

    from mmedagent.train.args import FlagError
    from mmedagent.train.run import backbone_family, main

    repo, commit = tmp_path / "hub" / "models--microsoft--llava-med-v1.5-mistral-7b", "0" * 40
    tower = write_original_llava_of(tiny_models("llava"), repo / "snapshots" / commit,
                                    "openai/clip-vit-large-patch14-336", arch="LlavaMistralForCausalLM",
                                    model_type="llava_mistral", safetensors=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path / "cache"))
    hub_id = "microsoft/llava-med-v1.5-mistral-7b"
    assert backbone_family(hub_id) == "llava"
    data = write_mmedagent(tmp_path / "train.json", write_images(tmp_path / "images", 2), 2)
    argv = _argv(hub_id, data, tmp_path / "out", "--image_folder", str(tmp_path / "images"), "--max_steps", "1",
                 "--version", "v1", "--mm_projector_type", "mlp2x_gelu")
    with pytest.raises(FlagError, match=r"^the vision tower of .* could not be loaded .*; pass .* --vision_tower$"):
        main(argv)
    out = main([*argv, "--vision_tower", str(tower)])
    manifest = json.loads((out / "mmedagent_train.json").read_text())
    assert manifest["family"] == "llava" and manifest["base_model"] == hub_id and _step(out) == 1


def test_unknown_model_type_is_a_flag_error(tmp_path):
    """A config transformers cannot read is the one ``error:`` line train_mem.py prints, not a traceback."""
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import backbone_family

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_mpt", "architectures": ["MptForCausalLM"]}))
    with pytest.raises(FlagError, match=rf"^--model_name_or_path {tmp_path}: .*llava_mpt"):
        backbone_family(str(tmp_path))


def test_a_released_mmedagent_lora_folder_as_base_is_a_flag_error(tmp_path, monkeypatch):
    """MMedAgent's LoRA release carries its base's original-LLaVA config.json: the error says to merge it first."""
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import main

    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path / "cache"))
    lora = tmp_path / "mmedagent-lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                                                  "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 128}))
    with pytest.raises(FlagError, match=r"^--model_name_or_path .*mmedagent-lora: .* is a LoRA adapter, not a full "
                                        r"checkpoint: merge it"):
        main(_argv(lora, _data(tmp_path / "train.json"), tmp_path / "out"))


def test_more_epochs_continue_a_finished_epoch_run(tiny_models, tmp_path, caplog):
    """A run trained for --num_train_epochs 1, rerun with the same flags, is done; with --num_train_epochs 2
    it continues from its last checkpoint (not "already trained")."""
    from mmedagent.train.run import main

    model, data, out = tiny_models("llama"), _data(tmp_path / "train.json"), tmp_path / "run"
    argv = _argv(model, data, out, "--max_steps", "-1")  # the last --max_steps wins
    main([*argv, "--num_train_epochs", "1"])
    assert _step(out) == 2
    caplog.clear()
    main([*argv, "--num_train_epochs", "1"])
    assert "nothing to do" in caplog.text and _step(out) == 2
    caplog.clear()
    main([*argv, "--num_train_epochs", "2"])
    assert "nothing to do" not in caplog.text and _step(out) == 4 and (out / "checkpoint-4").is_dir()


def test_mid_run_checkpoint_loads_for_serving_with_its_template(tiny_models, tmp_path):
    """Every checkpoint-N holds the training manifest, so load_planner(checkpoint-N) uses the trained
    template (not the processor's chat template), as it does for the final output."""
    from mmedagent.model import load_planner

    from mmedagent.train.run import main

    out = tmp_path / "run"
    main(_argv(tiny_models("llama"), _data(tmp_path / "train.json"), out, "--save_steps", "1", "--version", "v1"))
    final = json.loads((out / "mmedagent_train.json").read_text())
    assert json.loads((out / "checkpoint-1" / "mmedagent_train.json").read_text()) == final
    assert final["template"] == "vicuna_v1"
    assert load_planner(out / "checkpoint-1", dtype="float32", device="cpu").template == "vicuna_v1"


def test_a_model_is_served_with_the_system_message_it_was_trained_with(tiny_models, tmp_path, caplog):
    """Records without a system turn are rendered without one; the output says so (mmedagent.json), the
    merged model keeps it, so serving and evaluation do not put the tool catalog in front of a model that
    never saw it. Records that share one system text are served with it; records with several texts leave the
    serving default alone."""
    from mmedagent.model import planner_settings
    from mmedagent.model.adapters import merge_lora
    from mmedagent.train.run import main

    out = tmp_path / "run"
    main(_argv(tiny_models("llama"), _data(tmp_path / "train.json"), out))
    assert planner_settings(out) == {"system_prompt": "none"}
    merged = merge_lora(out, None, tmp_path / "merged", dtype="float32")
    assert planner_settings(merged) == {"system_prompt": "none"}
    rows = json.loads(_data(tmp_path / "sys.json").read_text())
    for r in rows:
        r["conversations"].insert(0, {"from": "system", "value": "You are a radiologist."})
    (tmp_path / "sys.json").write_text(json.dumps(rows))
    main(_argv(tiny_models("llama"), tmp_path / "sys.json", tmp_path / "run_sys"))
    assert planner_settings(tmp_path / "run_sys") == {"system_prompt": "text", "system_text": "You are a radiologist."}
    rows[0]["conversations"][0]["value"] = "You are a pathologist."  # texts differ
    (tmp_path / "sys.json").write_text(json.dumps(rows))
    main(_argv(tiny_models("llama"), tmp_path / "sys.json", tmp_path / "run_mixed"))
    assert planner_settings(tmp_path / "run_mixed") == {}  # the serving default, and a warning says so
    assert "the records have 2 different system messages (or none): mmedagent.json records none" in caplog.text
