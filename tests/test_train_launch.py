"""`deepspeed train/train_mem.py` on CPU (gloo): ZeRO-2 and ZeRO-3 with LoRA, LLaVA and Qwen2-VL, every
data format, kill-and-resume. Each launch is a real multi-process run of the entry point."""

import json
import subprocess

import pytest
import torch
from _train_fixtures import (ROOT, TEXT_RECORD, base_args, command, losses, run_training, run_until, tool_record,
                             train_env, write_images, write_original_llava_of)
from safetensors.torch import load_file

ZERO2, ZERO3 = str(ROOT / "scripts" / "zero2.json"), str(ROOT / "scripts" / "zero3.json")
LLAVA_FLAGS = ["--version", "v1", "--mm_projector_lr", "1e-3", "--mm_projector_type", "mlp2x_gelu",
               "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
               "--image_aspect_ratio", "pad", "--bf16", "True", "--lazy_preprocess", "True"]


@pytest.fixture(scope="module")
def zero2_resumed(tiny_models, train_data, tmp_path_factory):
    """Two CPU ranks, ZeRO-2 + LoRA on MMedAgent records; killed after checkpoint-3, then resumed."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    args = base_args(tiny_models("llava"), train_data["mmedagent"], out, "--image_folder", str(train_data["images"]),
                     "--deepspeed", ZERO2, "--max_steps", "24", "--save_steps", "3", "--save_total_limit", "2",
                     *LLAVA_FLAGS)
    run_until(args, 2, out / "checkpoint-3")
    assert not (out / "trainer_state.json").exists()  # killed mid-run
    log = run_training(args, 2)
    return {"out": out, "log": log, "base": tiny_models("llava")}


def _projector(state: dict) -> torch.Tensor:
    return next(v for k, v in state.items() if "multi_modal_projector" in k and k.endswith("linear_1.weight"))


def test_zero2_two_ranks_lora_llava_loads_and_loss_fell(zero2_resumed):
    out = zero2_resumed["out"]
    manifest = json.loads((out / "mmedagent_train.json").read_text())
    assert manifest["family"] == "llava" and manifest["template"] == "vicuna_v1" and manifest["lora"]
    assert manifest["base_model"] == str(zero2_resumed["base"].resolve())
    assert json.loads((out / "checkpoint-24" / "mmedagent_train.json").read_text()) == manifest  # served alike
    assert (out / "loss.png").stat().st_size > 1000 and (out / "trainer_state.json").is_file()
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    base = load_file(zero2_resumed["base"] / "model.safetensors")
    assert not torch.equal(_projector(saved).float(), _projector(base).float())  # the projector trained too
    steps = losses(out)
    first, last = [sum(steps[s] for s in r) / 3 for r in (range(1, 4), range(22, 25))]
    assert last < first, steps

    from mmedagent.model import load_planner

    planner = load_planner(out, conv_template=manifest["template"], dtype="float32", device="cpu")
    from PIL import Image

    reply = planner.generate([{"role": "user", "content": "<image>\nCan you locate the tumor in this MRI image?"}],
                             Image.new("RGB", (32, 32), (90, 90, 90)), max_new_tokens=8, temperature=0)
    assert isinstance(reply, str) and reply


def test_resume_continues_step_counter_and_loss(zero2_resumed):
    out, log = zero2_resumed["out"], zero2_resumed["log"]
    resumed_from = int(log.split("resuming from ")[1].split("checkpoint-")[1].split()[0])
    assert resumed_from >= 3 and resumed_from % 3 == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    steps = losses(out)
    assert sorted(steps) == list(range(1, 25))  # each step logged once: history kept, counter continued
    assert steps[resumed_from + 1] < steps[1]  # no restart from the initial weights
    assert abs(steps[resumed_from + 1] - steps[resumed_from]) < 0.5 * (steps[1] - steps[resumed_from]) + 0.05


def test_zero3_two_ranks_sharegpt_mmedagent_and_text_only(tiny_models, train_data, tmp_path, monkeypatch):
    """ZeRO-3 with a comma-separated mix of sharegpt and MMedAgent files (with text-only records), from an
    original-layout LLaVA (as MMedAgent's LLaVA-Med base), converted once for both ranks."""
    out = tmp_path / "run"
    data = f"{train_data['sharegpt']},{train_data['mixed']}"
    write_original_llava_of(tiny_models("llava"), tmp_path / "llava-med")
    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path / "cache"))
    run_training(base_args(tmp_path / "llava-med", data, out, "--image_folder", f"{train_data['images']}",
                           "--deepspeed", ZERO3, "--max_steps", "8", "--save_strategy", "no",
                           "--group_by_modality_length", "True", *LLAVA_FLAGS), 2)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(v.numel() > 0 for v in saved.values())  # gathered, not empty ZeRO-3 shards
    steps = losses(out)
    assert sum(steps[s] for s in (7, 8)) < sum(steps[s] for s in (1, 2)), steps


def test_zero3_two_ranks_mllama_image_and_text_only_records(tiny_models, train_data, tmp_path):
    """Mllama under ZeRO-3: with one record per rank, every step pairs an image record with a text-only one;
    the text-only rank must run the vision encoder, projector and cross-attention layers too (masked blank)."""
    out = tmp_path / "run"
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([tool_record(0, "img0.png"), TEXT_RECORD]))
    run_training(base_args(tiny_models("mllama"), data, out, "--image_folder", str(train_data["images"]),
                           "--deepspeed", ZERO3, "--max_steps", "2", "--save_strategy", "no",
                           "--per_device_train_batch_size", "1"), 2, timeout=240)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(v.numel() > 0 for v in saved.values())
    assert any("cross_attn" in k for k in saved)  # the cross-attention layers' LoRA, gathered
    steps = losses(out)
    assert sorted(steps) == [1, 2] and all(v == v and v > 0 for v in steps.values()), steps


def test_zero2_two_ranks_one_without_an_image_at_every_step(tiny_models, train_data, tmp_path):
    """ZeRO-2 reduces the gradients of the same parameters on every rank: a rank whose batch has no image
    (one record per rank: an image record here, a text-only one there) runs the vision encoder and the
    projector on a masked-out blank too, or the ranks' collectives no longer match (gloo: "Received data
    size doesn't match expected size"; NCCL: a hang)."""
    out = tmp_path / "run"
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([tool_record(0, "img0.png"), TEXT_RECORD]))
    run_training(base_args(tiny_models("llava"), data, out, "--image_folder", str(train_data["images"]),
                           "--deepspeed", ZERO2, "--max_steps", "2", "--save_strategy", "no",
                           "--per_device_train_batch_size", "1", *LLAVA_FLAGS), 2)
    steps = losses(out)
    assert sorted(steps) == [1, 2] and all(v == v and v > 0 for v in steps.values()), steps


def test_zero3_run_killed_after_its_last_checkpoint_writes_its_outputs_from_it(tiny_models, train_data, tmp_path):
    """A ZeRO-3 run killed after its last checkpoint, before the final save (e.g. at a job's time limit), is
    finished when started again: the checkpoint is loaded through the DeepSpeed engine (its weights are
    partitioned) and its adapter, projector included, becomes the output; no step is trained again."""
    out = tmp_path / "run"
    args = base_args(tiny_models("llava"), train_data["mmedagent"], out, "--image_folder", str(train_data["images"]),
                     "--deepspeed", ZERO3, "--max_steps", "2", "--save_steps", "2", *LLAVA_FLAGS)
    run_training(args)
    final = load_file(out / "adapter_model.safetensors")
    for name in ("adapter_model.safetensors", "mmedagent_train.json", "trainer_state.json"):
        (out / name).unlink()
    log = run_training(args)
    assert "checkpoint-2 already reached the last step (2)" in log
    again = load_file(out / "adapter_model.safetensors")
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    assert any("multi_modal_projector" in k for k in again)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "mmedagent_train.json").is_file() and not (out / "checkpoint-3").exists()


def test_qwen2_vl_sharegpt_one_rank(tiny_models, train_data, tmp_path):
    """Qwen2-VL (its processor's chat template) on a sharegpt file; one rank to save CI time."""
    out = tmp_path / "run"
    run_training(base_args(tiny_models("qwen2_vl"), train_data["sharegpt"], out, "--deepspeed", ZERO2,
                           "--max_steps", "8", "--save_strategy", "no", "--mm_projector_lr", "1e-3"), 1)
    manifest = json.loads((out / "mmedagent_train.json").read_text())
    assert manifest["family"] == "qwen2_vl" and manifest["template"] is None
    saved = load_file(out / "adapter_model.safetensors")
    assert any(".merger." in k for k in saved) and not any(".visual.blocks" in k for k in saved)
    steps = losses(out)
    assert sum(steps[s] for s in (7, 8)) < sum(steps[s] for s in (1, 2)), steps


def _fails(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(args, None), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


def test_damaged_image_found_by_a_data_loader_worker_is_one_error_line(tiny_models, tmp_path):
    """An image whose header is right but whose content is damaged is found only when a worker decodes it
    (MMedAgent's recipe: 4 workers); the error names the record, not the worker's traceback."""
    names = write_images(tmp_path / "images", 2)
    whole = (tmp_path / "images" / names[1]).read_bytes()
    (tmp_path / "images" / "damaged.png").write_bytes(whole[:len(whole) // 2])
    data = tmp_path / "train.json"
    data.write_text(json.dumps([tool_record(0, names[0]), tool_record(1, "damaged.png")]))
    proc = _fails(base_args(tiny_models("llava"), data, tmp_path / "run", "--image_folder", str(tmp_path / "images"),
                            "--version", "v1", "--max_steps", "2", "--per_device_train_batch_size", "1",
                            "--save_strategy", "no", "--dataloader_num_workers", "1"))
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {data}: record 2: cannot load image: cannot decode PNG image"), proc.stderr[-3000:]


def test_an_attention_kernel_that_cannot_run_here_is_one_error_line(tiny_models, train_data, tmp_path):
    """flash-attn needs CUDA and fp16/bf16 weights: asked for on CPU in float32 it is refused in one line (it
    was a traceback from the model loader)."""
    proc = _fails(base_args(tiny_models("llava"), train_data["mmedagent"], tmp_path / "run", "--image_folder",
                            str(train_data["images"]), "--version", "v1", "--max_steps", "1",
                            "--attn_implementation", "flash_attention_2"))
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: flash_attention_2 runs in float16 or bfloat16, not float32"), proc.stderr[-2000:]


def test_a_workers_error_of_several_lines_is_given_whole_without_the_traceback():
    from torch._utils import ExceptionWrapper

    from mmedagent.data.formats import DataError
    from mmedagent.train.train_mem import error_line

    try:
        raise DataError("train.json: record 2: cannot load image\nthe file is cut off: copy it again")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapped.reraise()
    except DataError as e:
        assert error_line(e) == "train.json: record 2: cannot load image\nthe file is cut off: copy it again"


def test_resume_with_changed_projector_lr_says_why_not_a_traceback(tiny_models, train_data, tmp_path):
    """checkpoint-2 saved with --mm_projector_lr (3 optimizer groups); resumed without it (2 groups)."""
    out = tmp_path / "run"
    args = base_args(tiny_models("llava"), train_data["mmedagent"], out, "--image_folder", str(train_data["images"]),
                     "--version", "v1", "--save_steps", "2")
    run_training([*args, "--max_steps", "2", "--mm_projector_lr", "2e-5"])
    err = _fails([*args, "--max_steps", "4"]).stderr.strip().splitlines()[-1]  # refused up front: the run's settings
    assert err.startswith(f"error: {out / 'checkpoint-2'} was trained with other settings than this run: "
                          "--mm_projector_lr (2e-05 -> None) changed"), err
    assert "use a new --output_dir" in err
    (out / "mmedagent_run.json").unlink()  # a run saved without a fingerprint: the optimizer state says why
    err = _fails([*args, "--max_steps", "4"]).stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: resuming from {out / 'checkpoint-2'} failed: its optimizer state does not match "
                          "the current settings"), err
    assert "--mm_projector_lr" in err and "use a new --output_dir" in err
    assert "different number of parameter groups" in err  # the underlying cause, in the same line
    err = _fails([*args, "--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")]).stderr
    assert "drop --resume_from_checkpoint" in err


def test_resume_error_explains_checkpoint_loads_only():
    from mmedagent.train.trainer import ResumeError, resume_error

    def _load_optimizer_and_scheduler():  # named like transformers' loader
        raise ValueError("loaded state dict has a different number of parameter groups")

    def training_step():
        raise ValueError("some other failure")

    for fn, explained in ((_load_optimizer_and_scheduler, True), (training_step, False)):
        try:
            fn()
        except ValueError as e:
            got = resume_error(e, "out/checkpoint-4", explicit=False)
        assert isinstance(got, ResumeError) if explained else got is None


def test_a_checkpoint_whose_last_rank_was_still_writing_is_not_resumed_from(tmp_path):
    """Killed (OOM, Ctrl-C) after rank 0 wrote trainer_state.json but while rank 1 wrote its RNG state:
    resuming from it failed on the cut-short file; the checkpoint before it is taken instead."""
    import torch

    from mmedagent.train.trainer import latest_checkpoint

    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text("{}")
        for rank in (0, 1):
            torch.save({"python": [rank]}, ckpt / f"rng_state_{rank}.pth")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    whole = (tmp_path / "checkpoint-4" / "rng_state_1.pth").read_bytes()
    (tmp_path / "checkpoint-4" / "rng_state_1.pth").write_bytes(whole[:-30])
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_deepspeed_without_a_launcher_runs_as_one_rank(tiny_models, tmp_path):
    """``python train/train_mem.py --deepspeed ...``: one rank, not DeepSpeed's MPI discovery (``mpi4py``) failing."""
    data = tmp_path / "text.json"
    data.write_text(json.dumps([TEXT_RECORD] * 2))
    out = tmp_path / "run"
    run_training(base_args(tiny_models("llama"), data, out, "--deepspeed", ZERO2, "--max_steps", "1"))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a (tf32) GPU")
def test_bad_flag_is_one_error_line_not_a_traceback(tmp_path):
    proc = _fails(["--model_name_or_path", "b", "--data_path", "d", "--output_dir", str(tmp_path), "--tf32", "True"])
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --tf32 True needs a CUDA GPU"), proc.stderr
