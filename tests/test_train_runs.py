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


def test_missing_resume_folder_is_refused_up_front(tmp_path):
    from mmedagent.train.args import FlagError
    from mmedagent.train.run import main

    data = _data(tmp_path / "train.json")
    with pytest.raises(FlagError, match=r"--resume_from_checkpoint .*gone: no such folder"):
        main(_argv(tmp_path / "no-model-needed", data, tmp_path / "run", "--resume_from_checkpoint",
                   str(tmp_path / "gone")))


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
