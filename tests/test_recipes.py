"""The three fine-tuning recipes end to end with ``--tiny`` (train → save → merge/export → compare or
evaluate → load in the serving stack), plus argument and data validation."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from _recipes_fixtures import dicom_data_url, dicom_path, read_json, run_recipe, start_controller, state_dict
from mmedagent.data.formats import DataError

from mmedagent.recipes import RECIPES, get_recipe
from mmedagent.recipes.__main__ import main
from mmedagent.recipes.config import config_from_args
from mmedagent.recipes.data import read_captions, read_dialogue
from mmedagent.recipes.dialogue import chosen_option
from mmedagent.recipes.radiology import ATTENTION_AND_MLP, INSTRUCTION

METRICS = {"bleu4", "rouge_l", "meteor"}


@pytest.fixture(scope="session")
def radiology(tmp_path_factory):
    out = tmp_path_factory.mktemp("radiology")
    return out, run_recipe("radiology-llama32v", out)


@pytest.fixture(scope="session")
def diagnosis(tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnosis")
    return out, run_recipe("diagnosis-qwen2vl", out)


@pytest.fixture(scope="session")
def dialogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("dialogue")
    return out, run_recipe("dialogue-llama3", out)


def _check_metrics(values):
    assert METRICS <= set(values)
    for k in METRICS:
        assert 0.0 <= values[k] <= 1.0, (k, values[k])


def _check_training_outputs(trained, steps):
    state = read_json(trained / "trainer_state.json")
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == steps and all(0 < loss < 20 for loss in losses)  # finite, one per step
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_json(trained / "mmedagent_train.json")["base_model"]


def _lora_deltas(adapter):
    """{module name: (alpha / r) * B @ A} from a saved adapter."""
    cfg = read_json(adapter / "adapter_config.json")
    weights = state_dict(adapter)
    out = {}
    for key, a in weights.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = weights[key.replace("lora_A", "lora_B")]
            out[module] = cfg["lora_alpha"] / cfg["r"] * b @ a
    return out


def _check_merged(out, base, merged):
    """The merged model = base + the LoRA deltas (to bf16 precision), and loads like any checkpoint."""
    from mmedagent.model import load_model_and_processor

    assert read_json(merged / "config.json")["dtype"] == "bfloat16"
    base_model, _, _ = load_model_and_processor(base)
    merged_model, _, family = load_model_and_processor(merged)
    base_p, merged_p = dict(base_model.named_parameters()), dict(merged_model.named_parameters())
    deltas = _lora_deltas(out / "adapter")
    assert deltas
    moved = 0
    for module, delta in deltas.items():
        expected = base_p[module + ".weight"].detach() + delta
        got = merged_p[module + ".weight"].detach()
        assert torch.allclose(got, expected, atol=2e-3, rtol=1e-2), module
        moved += float(delta.abs().max()) > 1e-4
    assert moved, "training left every LoRA delta at zero"
    return family


# --------------------------------------------------------------------------- radiology-llama32v


def test_radiology_end_to_end(radiology):
    out, summary = radiology
    adapter = out / "adapter"
    cfg = read_json(adapter / "adapter_config.json")
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 16, 0.0)
    for name in ATTENTION_AND_MLP.split(","):
        assert name in cfg["target_modules"]  # attention and MLP
    assert (adapter / "adapter_model.safetensors").is_file()
    lora_a = [k for k in state_dict(adapter) if ".lora_A" in k]
    vision = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in lora_a if ".vision_model." in k}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} <= vision  # --lora_vision: vision layers too
    _check_training_outputs(adapter, steps=6)
    assert _check_merged(out, out / "tiny-base", out / "merged") == "mllama"

    rows = read_json(out / "data" / "train.json")
    assert len(rows) == 10  # 12 generated rows, 2 held out
    assert rows[0]["messages"][0]["content"] == f"<image>\n{INSTRUCTION}"
    assert rows[0]["messages"][1]["content"].startswith(("Chest", "Brain", "Abdomen", "Knee"))
    held = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert {h["image"] for h in held}.isdisjoint(r["images"][0] for r in rows)

    report = read_json(out / "report.json")
    assert [r["reference"] for r in report["examples"]] == [h["reference"] for h in held]
    assert all({"before", "after"} <= set(r) for r in report["examples"])
    assert any(r["before"] != r["after"] for r in report["examples"])
    for when in ("before", "after"):
        _check_metrics(report["metrics"]["heldout"][when])
    table = (out / "report.txt").read_text()
    assert "| REFERENCE" in table and "| BEFORE" in table and "| AFTER" in table
    assert summary["export"] == str(out / "merged") and summary["loss_curve"]


def test_radiology_vision_lora_trains_under_gradient_checkpointing(radiology, tmp_path):
    """With a GPU the recipe turns gradient checkpointing on; the image must still reach the loss: the vision
    encoder's LoRA, the projector and the cross-attention LoRA all move. (The tiny checkpoint's cross-attention
    gates are open, as a trained one's are: shut, no image reaches the text and nothing on the image side
    gets a gradient.)"""
    from safetensors.torch import load_file

    out, _ = radiology
    base = out / "tiny-base"
    gates = [v for k, v in load_file(str(base / "model.safetensors")).items()
             if k.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate"))]
    assert gates and all(float(v.abs().max()) > 0 for v in gates)
    data = next((out / "tiny-data").iterdir())
    run = tmp_path / "run"
    assert main(["radiology-llama32v", "--model", str(base), "--data", str(data), "--out", str(run),
                 "--gradient-checkpointing", "true", "--max-steps", "2", "--warmup-steps", "0", "--lr", "1e-2",
                 "--gradient-accumulation-steps", "1", "--weight-decay", "0", "--eval-samples", "0",
                 "--max-seq-length", "512"]) == 0
    trained = state_dict(run / "adapter")
    moved = {part: max(float(v.abs().max()) for k, v in trained.items() if part in k and "lora_B" in k)
             for part in (".vision_model.", ".cross_attn.")}
    assert all(v > 0 for v in moved.values()), moved
    projector = state_dict(base)["multi_modal_projector.weight"]  # trained in full (no weight decay: only its gradient)
    assert not torch.equal(trained["base_model.model.model.multi_modal_projector.weight"], projector)


# --------------------------------------------------------------------------- diagnosis-qwen2vl


def test_diagnosis_end_to_end(diagnosis):
    out, summary = diagnosis
    cfg = read_json(out / "adapter" / "adapter_config.json")
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in cfg["target_modules"]  # every Linear layer by default
    _check_training_outputs(out / "adapter", steps=6)
    assert _check_merged(out, out / "tiny-base", out / "merged") == "qwen2_vl"

    rows = read_json(out / "data" / "train.json")  # sharegpt messages + images
    assert rows[0]["id"].startswith("tiny-") and len(rows[0]["images"]) == 1
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
    assert "diagnosis" in rows[0]["messages"][0]["content"]
    assert "region of interest" in rows[0]["messages"][1]["content"]  # the long MedTrinity-style caption
    _check_metrics(read_json(out / "report.json")["metrics"]["heldout"]["after"])
    assert summary["metrics"]["heldout"]["n"] == 2


def test_diagnosis_export_served_with_dicom(diagnosis):
    """The exported model in the model worker (as `serve/controller.py --model-path` starts it),
    answering a chat request that carries a DICOM CT slice."""
    from fastapi.testclient import TestClient
    from mmedagent.serve.config import ServeConfig
    from mmedagent.serve.model_worker import build_app, load_host

    out, _ = diagnosis
    host = load_host(ServeConfig(model_path=str(out / "merged"), model_name="diagnosis"))
    assert host.info["family"] == "qwen2_vl"
    with TestClient(build_app(host)) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": dicom_data_url()}},
                            {"type": "text", "text": "What is the most likely diagnosis?"},
                        ],
                    }
                ],
                "max_tokens": 6,
                "temperature": 0,
            },
        )
    assert reply.status_code == 200, reply.text
    text = reply.json()["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip()


def test_diagnosis_export_controller_and_cli_with_dicom(diagnosis, tmp_path, capsys):
    """`python serve/controller.py --model-path EXPORTED` and `serve/cli.py --image CT.dcm -q ...`."""
    from mmedagent.serve.cli import main as cli_main

    out, _ = diagnosis
    proc, url = start_controller(out / "merged", tmp_path)
    try:
        assert cli_main(["--controller", url, "--image", dicom_path(), "-q", "What is the diagnosis?"]) == 0
    finally:
        proc.stop()
    assert "answer: " in capsys.readouterr().out


# --------------------------------------------------------------------------- dialogue-llama3


def test_dialogue_end_to_end(dialogue):
    out, summary = dialogue
    cfg = read_json(out / "adapter" / "adapter_config.json")
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (8, 32, 0.1)
    _check_training_outputs(out / "adapter", steps=6)
    assert _check_merged(out, out / "tiny-base", out / "merged") == "causal_lm"
    evals = [e for e in read_json(out / "adapter" / "trainer_state.json")["log_history"] if "eval_loss" in e]
    assert evals and 0 < evals[-1]["eval_loss"] < 20  # the val split's loss, from --eval_data_path
    assert read_json(out / "adapter" / "eval_results.json")["eval_loss"] == evals[-1]["eval_loss"]

    ids = {name: {r["id"] for r in read_json(out / "data" / f"{name}.json")} for name in ("train", "val", "test")}
    assert [len(ids[n]) for n in ("train", "val", "test")] == [20, 2, 2]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])

    metrics = read_json(out / "report.json")["metrics"]
    assert set(metrics) == {"val", "test"}
    for split in ("val", "test"):
        _check_metrics(metrics[split]["after"])
        if "accuracy" in metrics[split]["after"]:
            assert metrics[split]["after"]["accuracy"] in (0.0, 0.5, 1.0)
    assert any("accuracy" in metrics[s]["after"] for s in metrics)  # seed 3407 puts a MedQA row in val or test
    assert summary["metrics"] == metrics


def test_dialogue_cli_chat_on_result(dialogue, tmp_path, monkeypatch, capsys):
    """`python serve/controller.py --model-path EXPORTED`, then the terminal chat loop (serve/cli.py),
    two questions in one conversation."""
    import io

    from mmedagent.serve.cli import main as cli_main

    out, _ = dialogue
    proc, url = start_controller(out / "merged", tmp_path)
    try:
        monkeypatch.setattr(
            "sys.stdin", io.StringIO("Hi doctor, I have a painful swollen big toe.\nWhat should I do?\n")
        )
        assert cli_main(["--controller", url]) == 0
    finally:
        proc.stop()
    printed = capsys.readouterr().out
    assert printed.count("answer: ") == 2, printed
    assert "registered model worker" in proc.output() and "merged" in proc.output()


def test_dialogue_full_fine_tuning(tmp_path):
    summary = run_recipe(
        "dialogue-llama3",
        tmp_path,
        "--no-lora",
        "--max-steps",
        "2",
        "--tiny-rows",
        "8",
        "--val-fraction",
        "1",
        "--test-fraction",
        "1",
        "--max-new-tokens",
        "4",
    )
    model = tmp_path / "model"
    assert summary["export"] == str(model) and not (tmp_path / "adapter").exists()
    assert not (model / "adapter_config.json").exists() and (model / "model.safetensors").is_file()
    base, tuned = state_dict(tmp_path / "tiny-base"), state_dict(model)
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k in tuned)
    _check_metrics(summary["metrics"]["test"]["after"])


def test_held_out_prompt_beyond_the_context_is_not_answered(tmp_path, capsys):
    """A held-out question longer than the model's context is refused by the served model: it is reported as
    not answered and left out of the scores, and the run (already trained and exported) completes."""
    rows = [{"id": "twin", "instruction": "Answer as a doctor.", "input": "I cough.", "output": "Rest."}] * 2 + [
        {"id": "long", "instruction": "Answer as a doctor.", "input": "I feel unwell. " * 3000, "output": "Rest."},
        {"id": "short", "instruction": "Answer as a doctor.", "input": "I sneeze.", "output": "Rest."},
    ]
    data = _rows(tmp_path / "dialogue.jsonl", rows)
    run_recipe("dialogue-llama3", tmp_path / "out", "--data", str(data), "--val-fraction", "0", "--test-fraction",
               "2", "--max-steps", "1", "--max-new-tokens", "2")
    assert "held-out long: not answered: the prompt is" in capsys.readouterr().out
    report = read_json(tmp_path / "out" / "report.json")
    assert report["metrics"]["test"]["n"] == 1 and report["metrics"]["test"]["not_answered"] == 1
    assert {r["id"]: r["after"] == "(not answered)" for r in report["examples"]} == {"long": True, "short": False}
    assert [r["id"] for r in read_json(tmp_path / "out" / "data" / "train.json")] == ["twin", "twin"]


def test_stop_after_data_then_skip_training(dialogue, tmp_path, capsys, monkeypatch):
    """The multi-GPU path: data + the printed train_mem.py line, training elsewhere, then export + evaluation."""
    import shutil

    out, _ = dialogue
    assert main(["dialogue-llama3", "--tiny", "--out", str(tmp_path), "--stop-after-data"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "train: python " in x).split("train: ", 1)[1]
    argv = shlex.split(line)  # pasteable from any directory: the script and every path are absolute
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert argv[0] == "python" and Path(argv[1]).is_absolute() and Path(argv[1]).name == "train_mem.py"
    assert Path(argv[1]).is_file() and Path(flags["--model_name_or_path"]).is_dir()
    assert Path(flags["--data_path"]).is_absolute() and Path(flags["--data_path"]).is_file()
    assert Path(flags["--output_dir"]) == (tmp_path / "adapter").resolve()
    assert (tmp_path / "data" / "train.json").is_file() and not (tmp_path / "adapter").exists()
    monkeypatch.chdir(out.parent)  # a base model named by a relative path is printed by its absolute one
    assert main(["dialogue-llama3", "--model", str((out / "tiny-base").relative_to(out.parent)), "--no-lora",
                 "--out", str(tmp_path / "rel"), "--data", str(tmp_path / "data" / "train.json"),
                 "--stop-after-data"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "train: python " in x)
    argv = shlex.split(line.split("train: ", 1)[1])
    assert dict(zip(argv[2::2], argv[3::2]))["--model_name_or_path"] == str((out / "tiny-base").resolve())
    assert main(["dialogue-llama3", "--tiny", "--out", str(tmp_path), "--skip-training"]) == 2
    assert "holds no finished training run" in capsys.readouterr().err

    shutil.copytree(out / "adapter", tmp_path / "adapter")  # as if trained under deepspeed
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    summary = run_recipe("dialogue-llama3", tmp_path, "--skip-training")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before  # not retrained
    assert "train_mem.py --model_name_or_path" in capsys.readouterr().out
    assert summary["export"] == str(tmp_path / "merged") and (tmp_path / "merged" / "config.json").is_file()
    _check_metrics(summary["metrics"]["test"]["after"])


def _files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_with_other_data_is_refused_before_out_changes(dialogue, tmp_path, capsys, monkeypatch):
    """A rerun on a trained OUT with other data (or another training setting) is refused in one line before
    anything in OUT is written: OUT/data keeps the files its checkpoints were trained on. The same data and
    settings still go through."""
    out, _ = dialogue
    before = _files(out)
    other = _rows(tmp_path / "other.jsonl", [{"question": f"Is {k} even?", "answer": "yes"} for k in range(12)])
    cases = [
        (["--data", str(other), "--stop-after-data"], "was trained with other settings than this run: the training data"),
        (["--tiny-rows", "14"], "was trained with other settings than this run: the training data"),
        (["--learning-rate", "0.5", "--stop-after-data"], "--learning_rate (0.01 -> 0.5) changed"),
        (["--data", str(other), "--skip-training"], "--skip-training: " + str(out / "adapter")
         + " was trained on other data"),
    ]
    for flags, message in cases:
        assert main(["dialogue-llama3", "--tiny", "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "--out" in err and err.count("\n") == 1, err
        assert _files(out) == before, flags  # byte for byte, no file added or left behind
    assert main(["dialogue-llama3", "--tiny", "--out", str(out), "--stop-after-data"]) == 0
    assert _files(out) == before
    (out / ".staging").mkdir()  # a run killed between moving OUT/data aside and the new data in
    (out / "data").rename(out / ".staging" / ".data.old")
    assert main(["dialogue-llama3", "--tiny", "--out", str(out), "--data", str(other), "--stop-after-data"]) == 2
    capsys.readouterr()
    assert _files(out) == before  # the old data was put back, not deleted with the staging folder

    from mmedagent.recipes.base import Recipe

    def interrupted(self, stage):  # Ctrl-C between moving OUT/data aside and the new data in
        (out / "data").rename(stage / ".data.old")
        raise KeyboardInterrupt

    monkeypatch.setattr(Recipe, "_move_into_place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["dialogue-llama3", "--tiny", "--out", str(out), "--stop-after-data"])
    capsys.readouterr()
    assert _files(out) == before


def test_rerun_with_the_same_caption_data_keeps_its_image_paths(diagnosis, capsys):
    """Images exported from the data are prepared aside and written as their OUT/data paths: the same data
    prepared again holds the same bytes (so training resumes), other data is refused with OUT/data as it was."""
    out, _ = diagnosis
    before = _files(out / "data")
    assert main(["diagnosis-qwen2vl", "--tiny", "--out", str(out), "--stop-after-data"]) == 0
    assert _files(out / "data") == before
    images = [Path(i) for r in read_json(out / "data" / "train.json") for i in r["images"]]
    assert images and all(i.parent == out / "data" / "images" and i.is_file() for i in images)
    assert main(["diagnosis-qwen2vl", "--tiny", "--out", str(out), "--eval-samples", "3"]) == 2
    assert "the training data changed" in capsys.readouterr().err
    assert _files(out / "data") == before and not (out / ".staging").exists()


# --------------------------------------------------------------------------- arguments and data


def test_overrides_and_effective_config(capsys):
    cls = get_recipe("radiology-llama32v").Config
    cfg = config_from_args(cls, {"tiny": True, "lora_r": 4, "learning_rate": 0.5})
    assert (cfg.lora_r, cfg.learning_rate, cfg.max_steps) == (4, 0.5, cls.TINY["max_steps"])
    assert config_from_args(cls, {}).max_steps == 30
    eff = cfg.resolved()
    if not torch.cuda.is_available():
        assert (eff["bits"], eff["optim"], eff["bf16"]) == (16, "adamw_torch", False)
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in RECIPES)
    with pytest.raises(SystemExit):
        main(["radiology-llama32v", "--lora-r", "many"])
    assert main(["no-such-recipe"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_quantised_base_refused_on_cpu(tmp_path, capsys):
    assert main(["radiology-llama32v", "--tiny", "--out", str(tmp_path), "--bits", "4"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "tiny-base").exists()


def _has_bitsandbytes():
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("flags, message", [
    (["--optim", "adamw_8bit"], "--optim adamw_8bit is a bitsandbytes optimizer: it needs a CUDA GPU"),
    (["--optim", "paged_adamw_32bit"], "--optim paged_adamw_32bit is a bitsandbytes optimizer"),
    (["--bits", "5"], "--bits must be 4 or 8 (a quantised base, QLoRA) or 16 (off), got 5"),
])
def test_what_needs_bitsandbytes_refused_up_front(tmp_path, capsys, flags, message):
    """A notebook's ``optim="adamw_8bit"`` where bitsandbytes cannot run (no CUDA GPU, or not installed) is one
    error before any work, not an ImportError from the Trainer once the model is loaded; so is a --bits that
    train_mem.py would refuse only after the data is converted."""
    if flags[0] == "--optim" and torch.cuda.is_available() and _has_bitsandbytes():
        pytest.skip("bitsandbytes runs here")
    assert main(["dialogue-llama3", "--tiny", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "tiny-base").exists()


def test_gpu_without_bitsandbytes_trains_a_16_bit_base(monkeypatch):
    """On a CUDA GPU without bitsandbytes the QLoRA recipe resolves to a 16-bit base and AdamW (it chose a 4-bit
    base, and failed once the data was converted and the model loading began); an explicit --bits 4 names what
    to install. Only the machine's description is replaced here: the settings are resolved as on such a GPU."""
    if _has_bitsandbytes():
        pytest.skip("bitsandbytes is installed here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cls = get_recipe("radiology-llama32v").Config
    eff = config_from_args(cls, {}).resolved()
    assert (eff["bits"], eff["optim"], eff["bf16"], eff["gradient_checkpointing"]) == (16, "adamw_torch", True, True)
    with pytest.raises(ValueError, match=r"--bits 4 .* but bitsandbytes is not installed \(pip install bitsandbytes\)"):
        config_from_args(cls, {"bits": 4}).resolved()


def test_push_to_hub_arguments(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as hub_constants

    assert main(["radiology-llama32v", "--tiny", "--out", str(tmp_path), "--push-to-hub", "not a repo"]) == 2
    assert "owner/name" in capsys.readouterr().err

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    assert main(["radiology-llama32v", "--tiny", "--out", str(tmp_path), "--push-to-hub", "me/radiology"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "tiny-base").exists()  # refused before any work

    secret = "hf_recipeTestSecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    assert (
        main(
            [
                "radiology-llama32v",
                "--tiny",
                "--out",
                str(tmp_path),
                "--data",
                str(bad),
                "--push-to-hub",
                "me/radiology",
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert secret not in captured.out + captured.err
    assert f"{bad}: record 1: missing column(s) caption" in captured.err


def _png(path):
    from PIL import Image

    Image.new("RGB", (16, 16), (90, 90, 90)).save(path)
    return path.name


def test_bad_caption_data_named_by_file_and_row(tmp_path):
    good = _png(tmp_path / "a.png")
    cases = {
        "missing image": (
            [{"image": good, "caption": "Chest X-ray."}, {"image": "gone.png", "caption": "CT."}],
            "record 2: image not found: {folder}/gone.png (relative paths are read from the data's folder",
        ),
        "empty caption": (
            [{"image": good, "caption": "Chest X-ray."}, {"image": good, "caption": "  "}],
            "record 2: empty caption",
        ),
        "missing column": (
            [{"image": good, "caption": "x"}, {"image": good, "text": "x"}],
            "record 2: missing column(s) caption",
        ),
    }
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError) as err:
            read_captions(path, None, tmp_path / "export")
        assert f"{path}: {message.format(folder=tmp_path)}" in str(err.value), name


def test_bad_parquet_columns_named(tmp_path):
    import datasets

    path = tmp_path / "medtrinity.parquet"
    datasets.Dataset.from_dict({"image": ["a.png"], "text": ["x"]}).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"{path}: missing column\(s\) caption; the data has image, text "
                                        r"\(name the columns to use with --image-column / --caption-column\)"):
        read_captions(path, None, tmp_path / "export")
    with pytest.raises(DataError, match=rf"{path}: missing column\(s\) report; the data has image, text$"):
        read_captions(path, None, tmp_path / "export", caption_column="report")


def test_dialogue_rows_and_choices(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"question": "Q?", "options": ["flu", "gout"], "answer_idx": "B"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"question": "Q2?", "options": {"A": "x", "B": "y"}, "answer_idx": "C"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"record 3: answer_idx 'C' is not one of the options \['A', 'B'\]"):
        read_dialogue(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"record 3: missing columns"):
        read_dialogue(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (rec, mc), (_, chat) = read_dialogue(path)
    assert mc.reference == "B. gout" and mc.options == ("A", "B") and "A. flu\nB. gout" in mc.prompt
    assert rec.conversations[-1].value == "B. gout" and (chat.prompt, chat.reference) == ("Hi", "Hello")
    path.write_text(
        json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "I cough."},
                    {"from": "gpt", "value": "Since when?"},
                    {"from": "human", "value": "Two weeks."},
                    {"from": "gpt", "value": "See a doctor."},
                ]
            }
        )
        + "\n"
    )
    ((_, multi),) = read_dialogue(path)
    assert (multi.prompt, multi.reference) == ("Two weeks.", "See a doctor.")
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "user"]
    assert chosen_option("The answer is B. gout", ("A", "B")) == "B"
    assert chosen_option("I think (A)", ("A", "B")) == "A"
    assert chosen_option("no idea", ("A", "B")) is None


def test_dialogue_table_mixing_layouts(tmp_path):
    """A parquet file mixing MedQA and ChatDoctor rows pads each row's unused columns with null: those are
    absent, not the text "None" (no "E. None" option, no "None" answer); odd rows are one-line errors."""
    import datasets

    text = datasets.Value("string")
    features = datasets.Features({
        "question": text, "options": {k: text for k in "ABCDE"}, "answer_idx": text,
        "instruction": text, "input": text, "output": text,
        "messages": datasets.List({"role": text, "content": text}),
    })
    rows = [
        {"question": "Q1?", "options": dict(zip("ABCDE", ("flu", "gout", "asthma", "angina", "sepsis"))),
         "answer_idx": "E"},
        {"question": "Q2?", "options": {"A": "flu", "B": "gout", "C": "asthma", "D": "angina"}, "answer_idx": "B"},
        {"instruction": "Answer as a doctor.", "input": "I cough.", "output": "See a doctor."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    path = tmp_path / "mixed.parquet"
    padded = [{k: row.get(k) for k in features} for row in rows]
    datasets.Dataset.from_list(padded, features=features).to_parquet(str(path))
    (_, five), (_, four), (_, chat), (_, hello) = read_dialogue(path)
    assert five.options == tuple("ABCDE") and four.options == tuple("ABCD") and "None" not in four.prompt
    assert (chat.prompt, chat.reference) == ("Answer as a doctor.\nI cough.", "See a doctor.")
    assert (hello.prompt, hello.reference) == ("Hi", "Hello")

    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([padded[2], dict(padded[2], output=None)], features=features).to_parquet(str(bad))
    with pytest.raises(DataError, match=rf"{bad}: record 2: missing columns: .*; it has instruction, input$"):
        read_dialogue(bad)
    lone = _rows(tmp_path / "lone.jsonl", [{"messages": [{"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(DataError, match=r"lone.jsonl: record 1: the answer must follow a user turn"):
        read_dialogue(lone)
    options = [{"key": "A", "value": "flu"}, {"key": "B", "value": "gout"}]
    bigbio = _rows(tmp_path / "bigbio.jsonl", [{"question": "Q?", "options": options, "answer_idx": "B"}])
    ((_, mc),) = read_dialogue(bigbio)
    assert mc.reference == "B. gout" and "A. flu\nB. gout" in mc.prompt


def test_csv_and_tsv_data(tmp_path):
    """ROCO-style CSV (quoted captions holding commas, image paths relative to the CSV) and ChatDoctor-style TSV;
    a row whose fields do not match the header is an error naming its record and line, never a cut caption."""
    (tmp_path / "images").mkdir()
    names = [_png(tmp_path / "images" / f"roco_{k}.png") for k in range(3)]
    path = tmp_path / "captions.csv"
    path.write_text("id,image,caption\n" + "".join(f'ROCO_{k},images/{n},"Chest CT, axial view {k}."\n'
                                                   for k, n in enumerate(names)))
    items = read_captions(path, None, tmp_path / "export")
    assert [(i.id, i.image, i.caption) for i in items] == [
        (f"ROCO_{k}", str((tmp_path / "images" / n).resolve()), f"Chest CT, axial view {k}.")
        for k, n in enumerate(names)]
    path.write_text(f"image,caption\nimages/{names[0]},Chest CT\nimages/{names[1]},Chest CT, axial view\n")
    with pytest.raises(DataError, match=rf"{path}: record 2 \(line 3\): 3 field\(s\), the header has 2"):
        read_captions(path, None, tmp_path / "export")
    medqa = tmp_path / "medqa.csv"
    medqa.write_text('question,options,answer_idx\nWhich?,"{""A"": ""flu"", ""B"": ""gout""}",B\n')
    ((_, mc),) = read_dialogue(medqa)
    assert mc.reference == "B. gout" and mc.options == ("A", "B")
    tsv = tmp_path / "chatdoctor.tsv"
    tsv.write_text("instruction\tinput\toutput\nAnswer as a doctor.\tI cough, a lot.\tSee a doctor.\n")
    ((_, e),) = read_dialogue(tsv)
    assert (e.prompt, e.reference) == ("Answer as a doctor.\nI cough, a lot.", "See a doctor.")


def test_duplicates_are_never_held_out(tmp_path):
    """An exact duplicate row would be trained on under another row number: only unique rows are held out.
    The same caption under another image is no duplicate."""
    from mmedagent.recipes.data import CaptionItem, caption_key, duplicate_count, split

    train, held = split(list(range(10)), [4], seed=1, key=lambda x: min(x, 6))  # 6..9 are one row, four times
    assert len(held) == 4 and not {6, 7, 8, 9} & set(held) and sorted(train + held) == list(range(10))
    assert split(list(range(10)), [4], seed=1) == split(list(range(10)), [4], seed=1, key=lambda x: x)
    same, other = _png(tmp_path / "a.png"), "b.png"
    (tmp_path / other).write_bytes(_image_bytes(200))
    (tmp_path / "copy.png").write_bytes((tmp_path / same).read_bytes())
    items = [CaptionItem(str(k), str(tmp_path / n), "No acute findings.")
             for k, n in enumerate((same, "copy.png", other))]
    assert duplicate_count(items, caption_key(items)) == {"duplicates_never_held_out": 2}
    _, held = split(items, [1], seed=1, key=caption_key(items))
    assert held == [items[2]]


def test_unknown_source_is_a_data_error(tmp_path):
    from mmedagent.recipes.data import materialise

    assert materialise(str(tmp_path), "train", tmp_path / "cache") == tmp_path  # local paths are used as they are
    with pytest.raises(
        DataError,
        match=r"nobody/no-such-dataset: not a local file or folder, and loading it as a "
        r"Hugging Face dataset \(config None, split 'train'\) failed",
    ):
        materialise("nobody/no-such-dataset", "train", tmp_path / "cache")


# --------------------------------------------------------------------------- data checks up front


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_image_header_is_checked_up_front(tmp_path):
    """A broken image in the middle of the data is named by the user's file and row, before any model loads."""
    rows = [{"image": _png(tmp_path / f"{k}.png"), "caption": f"Scan {k}."} for k in range(5)]
    (tmp_path / "bad.png").write_bytes(b"this is not an image at all")
    rows[2]["image"] = "bad.png"
    path = _rows(tmp_path / "scans.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}: record 3: bad.png: not an image file"):
        read_captions(path, None, tmp_path / "export")
    (tmp_path / "bad.png").write_bytes((tmp_path / "0.png").read_bytes()[:20])  # a PNG cut inside its header
    with pytest.raises(DataError, match=rf"{path}: record 3: bad.png is a damaged PNG image"):
        read_captions(path, None, tmp_path / "export")


def _image_bytes(shade):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (shade, shade, shade)).save(buf, format="PNG")
    return buf.getvalue()


def test_rows_with_colliding_ids_keep_their_own_images(tmp_path):
    """Duplicate ids, and ids that sanitise to one file name, never share an exported image."""
    import datasets

    from mmedagent.data.formats import read_records

    ids = ["case/0", "case_0", "case/0", "case 0"]
    path = tmp_path / "dup.parquet"
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string"),
                                  "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(
        {"image": [{"bytes": _image_bytes(40 * k), "path": None} for k in range(4)], "id": ids,
         "caption": [f"c{k}" for k in range(4)]}, features=features).to_parquet(str(path))
    items = read_captions(path, None, tmp_path / "export")
    assert len({i.image for i in items}) == 4
    assert [Path(i.image).read_bytes() for i in items] == [_image_bytes(40 * k) for k in range(4)]
    records = read_records(path, image_folder=tmp_path / "export2")  # the data layer's own export
    assert len({r.image for r in records}) == 4


def test_parquet_image_paths_are_read_from_image_folder(tmp_path):
    import datasets

    pics = tmp_path / "pics"
    pics.mkdir()
    names = [_png(pics / f"p{k}.png") for k in range(3)]
    path = tmp_path / "data" / "rows.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict({"image": names, "caption": ["a", "b", "c"]}).to_parquet(str(path))
    items = read_captions(path, str(pics), tmp_path / "export")
    assert [Path(i.image) for i in items] == [(pics / n).resolve() for n in names]
    with pytest.raises(DataError, match=rf"{path}: record 1: image not found: {path.parent / names[0]}"):
        read_captions(path, None, tmp_path / "export")  # default: the data's folder
    for n in names:
        _png(path.parent / n)
    assert [Path(i.image) for i in read_captions(path, None, tmp_path / "export")] == [
        (path.parent / n).resolve() for n in names]


def test_parquet_with_a_plain_binary_image_column(tmp_path):
    """Images stored as raw bytes by pandas / pyarrow (no HF Image feature) are exported like any stored image;
    an image column of another type is an error naming the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pandas.parquet"
    pq.write_table(pa.table({"image": pa.array([_image_bytes(10), _image_bytes(200)], pa.binary()),
                             "caption": ["dark", "bright"]}), str(path))
    items = read_captions(path, None, tmp_path / "export")
    assert [Path(i.image).read_bytes() for i in items] == [_image_bytes(10), _image_bytes(200)]
    bad = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image": [7], "caption": ["x"]}), str(bad))
    with pytest.raises(DataError, match=rf"{bad}: record 1: cannot export an image of type int"):
        read_captions(bad, None, tmp_path / "export")


def test_local_dataset_dict_honours_data_split(tmp_path):
    import datasets

    from mmedagent.recipes.data import iter_rows

    img = {"bytes": _image_bytes(90), "path": None}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": [img] * 3, "caption": ["tr0", "tr1", "tr2"]}, features=features),
        "test": datasets.Dataset.from_dict({"image": [img] * 2, "caption": ["te0", "te1"]}, features=features),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    def caps(split):
        return [i.caption for i in read_captions(tmp_path / "dd", None, tmp_path / "x", split=split)]

    assert caps("train") == ["tr0", "tr1", "tr2"] and caps("test") == ["te0", "te1"]
    assert caps("train[1:]") == ["tr1", "tr2"]
    with pytest.raises(DataError, match=r"dd: no split 'validation'; it has train, test \(use --data-split\)"):
        caps("validation")
    text = datasets.DatasetDict({s: datasets.Dataset.from_dict({"instruction": [s], "output": ["x"]})
                                 for s in ("train", "test")})
    text.save_to_disk(str(tmp_path / "text"))
    assert [r["instruction"] for _, r in iter_rows(tmp_path / "text", "test")] == ["test"]


def test_null_image_and_empty_data_messages(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    path = tmp_path / "null.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": _image_bytes(5), "path": None}, None], "caption": ["a", "b"]},
                               features=features).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"{path}: record 2: no image"):
        read_captions(path, None, tmp_path / "export")
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"image": [], "caption": []}, features=features).to_parquet(str(empty))
    with pytest.raises(DataError, match=rf"{empty}: no records"):
        read_captions(empty, None, tmp_path / "export")
    datasets.Dataset.from_dict({"image": [], "caption": []}, features=features).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"hf: no records"):
        read_captions(tmp_path / "hf", None, tmp_path / "export")


# --------------------------------------------------------------------------- settings checked up front


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "--max-steps must be a positive number of steps, or -1"),
    (["--max-steps", "-5"], "--max-steps must be a positive number of steps, or -1"),
    (["--eval-samples", "-1"], "--eval-samples must be 0"),
    (["--export-dtype", "foo"], "--export-dtype 'foo' is not a dtype"),
    (["--per-device-train-batch-size", "0"], "--per-device-train-batch-size must be at least 1"),
])
def test_nonsense_settings_refused_before_any_work(tmp_path, capsys, flags, message):
    assert main(["radiology-llama32v", "--tiny", "--out", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tiny-base").exists()


@pytest.mark.parametrize("flag, value", [("--val-fraction", "-0.1"), ("--test-fraction", "1.5")])
def test_nonsense_held_out_sizes_refused(tmp_path, capsys, flag, value):
    assert main(["dialogue-llama3", "--tiny", "--out", str(tmp_path), flag, value]) == 2
    assert f"{flag} must be 0 (none held out)" in capsys.readouterr().err


def test_zero_held_out_means_none():
    from mmedagent.recipes.data import split

    train, val, test = split(list(range(10)), [0, 2], seed=1)
    assert (len(train), len(val), len(test)) == (8, 0, 2)
    cfg = config_from_args(get_recipe("dialogue-llama3").Config, {"val_fraction": 0.0})
    assert not hasattr(cfg, "eval_samples")  # held out by --val-fraction / --test-fraction: no flag that does nothing
    assert cfg.resolved()["export_dtype"] == "bfloat16"
    assert config_from_args(get_recipe("dialogue-llama3").Config, {"export_dtype": "bf16"}).resolved()[
        "export_dtype"] == "bfloat16"


def test_train_flags_checked_under_stop_after_data_and_tiny_model_named(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["dialogue-llama3", "--tiny", "--out", str(out), "--stop-after-data", "--", "--bogus_flag", "1"]) == 2
    assert "bogus_flag" in capsys.readouterr().err
    assert main(["diagnosis-qwen2vl", "--tiny", "--out", str(out), "--stop-after-data"]) == 0
    printed = capsys.readouterr().out
    config = json.loads(printed[printed.index("{"):printed.index("\n}") + 2])
    assert config["model"] == str(out / "tiny-base")  # not the default hub model
    line = next(x for x in printed.splitlines() if "train: python " in x)
    assert "--image_max_tokens 256" in line  # half of the tiny cutoff (512): Qwen2-VL images scaled to fit


def test_missing_model_is_one_error_before_data_work(tmp_path, capsys):
    data = _rows(tmp_path / "qa.jsonl", [{"instruction": "Hi", "output": "Hello"}] * 4)
    out = tmp_path / "o"
    rc = main(["dialogue-llama3", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'nope'}: no such local directory" in err and "Traceback" not in err
    assert not (out / "data" / "train.json").exists()


def test_failed_merge_keeps_the_previous_export(tmp_path, monkeypatch):
    import mmedagent.model.adapters as adapters
    from mmedagent.recipes.base import Recipe

    recipe = Recipe(config_from_args(get_recipe("dialogue-llama3").Config, {"out": str(tmp_path)}))
    recipe.settings = {"lora": True, "export_dtype": "bfloat16"}
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_text("previous export")

    def failing(model, base, save, dtype=None):
        save.mkdir(parents=True)
        (save / "model.safetensors").write_text("half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapters, "merge_lora", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        recipe.export(tmp_path / "adapter")
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]

    def works(model, base, save, dtype=None):
        save.mkdir(parents=True)
        (save / "model.safetensors").write_text(f"new export in {dtype}")

    monkeypatch.setattr(adapters, "merge_lora", works)
    assert recipe.export(tmp_path / "adapter") == tmp_path / "merged"
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "new export in bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_push_leaves_out_checkpoints_and_optimizer_state(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    from mmedagent.recipes.base import push_to_hub

    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_args.bin", "optimizer.pt",
                 "checkpoint-6/model.safetensors", "checkpoint-6/optimizer.pt", "checkpoint-6/rng_state.pth",
                 "checkpoint-6/trainer_state.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo, **k: f"https://huggingface.co/{repo}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: calls.update(k))
    push_to_hub(tmp_path, "me/model", True)
    files = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    sent = sorted(filter_repo_objects(files, allow_patterns=calls.get("allow_patterns"),
                                      ignore_patterns=calls.get("ignore_patterns")))
    assert sent == ["config.json", "model.safetensors", "tokenizer.json"]


def test_multiple_choice_letter_not_the_article():
    opts = ("A", "B", "C", "D")
    assert chosen_option("A likely diagnosis is B. gout", opts) == "B"
    assert chosen_option("A patient like this most likely has (C) asthma", opts) == "C"
    assert chosen_option("B. gout", opts) == "B"
    assert chosen_option("Answer: D", opts) == "D"
    assert chosen_option("A diagnosis of gout.", opts) is None


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_printed_next_steps_run_from_any_folder(name, tmp_path, monkeypatch):
    """The serve commands a run ends with name the scripts and the export by absolute paths."""
    cls = get_recipe(name)
    recipe = cls(config_from_args(cls.Config, {"out": str(tmp_path / "out")}))
    monkeypatch.chdir(tmp_path)
    steps = recipe.next_steps(Path("out/merged"))
    serve = shlex.split(steps[0].split("#")[0])
    assert Path(serve[1]).is_absolute() and Path(serve[1]).name == "controller.py" and Path(serve[1]).is_file()
    assert serve[serve.index("--model-path") + 1] == str(tmp_path / "out" / "merged")
    assert Path(shlex.split(steps[1].split("#")[0])[1]).is_file()  # serve/cli.py


# --------------------------------------------------------------------------- data and flags as notebooks have them


def test_caption_columns_named_by_flag(tmp_path, capsys):
    """ROCO's CSV names its image column ``name``, MIMIC-style tables ``findings``: --image-column /
    --caption-column read them; ``id`` is optional (a row without one gets the file's name and row number)."""
    (tmp_path / "images" / "sub").mkdir(parents=True)
    names = [f"sub/PMC{k}.png" if k % 2 else f"PMC{k}.png" for k in range(6)]
    for n in names:
        _png(tmp_path / "images" / n)
    roco = tmp_path / "traindata.csv"
    roco.write_text("id,name,findings\n" + "".join(f'ROCO_{k},{n},"Axial CT, lésion {k}."\n'
                                                   for k, n in enumerate(names)))
    items = read_captions(roco, str(tmp_path / "images"), tmp_path / "x", image_column="name",
                          caption_column="findings")
    assert [(i.id, Path(i.image).name, i.caption) for i in items][1] == ("ROCO_1", "PMC1.png", "Axial CT, lésion 1.")
    no_id = _rows(tmp_path / "noid.jsonl", [{"path": f"images/{n}", "report": f"MRI {k}."} for k, n in enumerate(names)])
    items = read_captions(no_id, None, tmp_path / "x", image_column="path", caption_column="report")
    assert [i.id for i in items][:2] == ["noid-1", "noid-2"]
    out = tmp_path / "run"
    assert main(["diagnosis-qwen2vl", "--tiny", "--out", str(out), "--data", str(no_id), "--image-column", "path",
                 "--caption-column", "report", "--stop-after-data"]) == 0
    train = read_json(out / "data" / "train.json")
    assert len(train) == 4 and {r["messages"][1]["content"] for r in train} <= {f"MRI {k}." for k in range(6)}


def test_every_unusable_row_is_listed_at_once(tmp_path):
    """Missing images, empty captions and bad answers of many rows are one error listing each row, so a user
    fixes them all in one go rather than one per run."""
    good = _png(tmp_path / "a.png")
    rows = [{"image": good, "caption": "CT."}, {"image": "gone.png", "caption": "CT."},
            {"image": good, "caption": " "}, {"image": good, "caption": "MRI."}, {"image": "sub/gone2.png",
                                                                                "caption": "X-ray."}]
    path = _rows(tmp_path / "caps.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_captions(path, None, tmp_path / "export")
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 3 of 5 records cannot be used; fix or remove them:"
    assert [x.split(": ")[1] for x in lines[1:]] == ["record 2", "record 3", "record 5"]
    assert "empty caption (the caption column)" in lines[2]
    qa = _rows(tmp_path / "qa.jsonl", [{"instruction": "Hi", "output": ""}, {"question": " ", "answer": "x"},
                                       {"question": "Q?", "answer": "Flu."}])
    with pytest.raises(DataError, match=r"2 of 3 records cannot be used(.|\n)*record 1: the last turn must be a "
                                        r"non-empty answer\n.*record 2: empty question"):
        read_dialogue(qa)


def test_medqa_answer_text_and_free_text_qa(tmp_path):
    """MedQA copies that keep only the answer's text, and MedQuAD-style question + answer rows, are trained on."""
    path = _rows(tmp_path / "qa.jsonl", [
        {"question": "Which?", "options": {"A": "Flu", "B": "Gout"}, "answer": "gout"},
        {"question": "What is gout?", "answer": "A form of arthritis."},
        {"question": "Which?", "options": {"A": "Flu", "B": "Gout"}, "answer": "asthma"},
    ])
    with pytest.raises(DataError, match=r"record 3: no answer_idx, and answer 'asthma' is not one of the options "
                                        r"\['A', 'B'\]; give the correct option's letter in answer_idx"):
        read_dialogue(path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    (_, mc), (rec, free) = read_dialogue(path)
    assert mc.reference == "B. Gout" and mc.options == ("A", "B")
    assert (free.prompt, free.reference, free.options) == ("What is gout?", "A form of arthritis.", ())
    assert rec.conversations[-1].value == "A form of arthritis."


def test_hub_dialogue_layouts(tmp_path):
    """The column names of the medical dialogue sets people bring are read as they are: MedQuAD's capitalised
    Question / Answer, ai-medical-chatbot's Patient / Doctor, medical-o1's Question / Complex_CoT / Response (its
    reasoning trained on too), and Alpaca rows without an instruction."""
    path = _rows(tmp_path / "hub.jsonl", [
        {"qtype": "information", "Question": "What is gout?", "Answer": "A form of arthritis."},
        {"Description": "Q. Headache?", "Patient": "Hi doctor, my head aches.", "Doctor": "Hi. Rest and drink water."},
        {"Question": "Chest pain on exertion?", "Complex_CoT": "Exertional pain suggests ischaemia.",
         "Response": "Stable angina."},
        {"input": "I cough at night.", "output": "Since when?"},
    ])
    medquad, chatbot, o1, alpaca = (e for _, e in read_dialogue(path))
    assert (medquad.prompt, medquad.reference) == ("What is gout?", "A form of arthritis.")
    assert (chatbot.prompt, chatbot.reference) == ("Hi doctor, my head aches.", "Hi. Rest and drink water.")
    assert o1.prompt == "Chest pain on exertion?"
    assert o1.reference == ("## Thinking\n\nExertional pain suggests ischaemia.\n\n## Final Response\n\n"
                            "Stable angina.")
    assert (alpaca.prompt, alpaca.reference) == ("I cough at night.", "Since when?")
    empty = _rows(tmp_path / "empty.jsonl", [{"Question": "Q?", "Complex_CoT": "Thinking.", "Response": " "}])
    with pytest.raises(DataError, match=r"empty.jsonl: record 1: empty answer \(the response column\)"):
        read_dialogue(empty)
    odd = _rows(tmp_path / "odd.jsonl", [{"Prompt": "Q?", "Reply": "A."}])
    with pytest.raises(DataError, match=r"record 1: missing columns: .*patient\+doctor.*; it has Prompt, Reply$"):
        read_dialogue(odd)


def test_too_few_records_names_the_held_out_flags(tmp_path, capsys):
    """Data too small for the held-out parts says which settings hold fewer out."""
    assert main(["dialogue-llama3", "--tiny", "--tiny-rows", "4", "--out", str(tmp_path / "o"),
                 "--stop-after-data"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "4 records leave none for training after holding out 4; use more data or fewer held-out records "
        "(--val-fraction, --test-fraction)")


def test_notebook_flag_names(tmp_path, capsys, monkeypatch):
    """The names notebooks use (--lr, --epochs, --max-seq-length, --cutoff_len, --load-in-4bit) work; a
    train_mem.py flag given as a setting is shown after `--`; QLoRA on a CPU says it trains a 16-bit base;
    the paths printed are absolute even for a relative --out."""
    monkeypatch.chdir(tmp_path)
    assert main(["dialogue-llama3", "--tiny", "--out", "rel", "--lr", "3e-4", "--epochs", "2", "--max_steps", "-1",
                 "--max-seq-length", "300", "--batch-size", "1", "--stop-after-data"]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "train: python " in x)
    for flag in ("--learning_rate 0.0003", "--num_train_epochs 2.0", "--model_max_length 300",
                 "--per_device_train_batch_size 1", f"--output_dir {tmp_path / 'rel' / 'adapter'}"):
        assert flag in line
    assert f"-> {tmp_path / 'rel' / 'data' / 'train.json'}" in printed
    with pytest.raises(SystemExit):
        main(["dialogue-llama3", "--tiny", "--out", "rel", "--eval-steps", "5", "--stop-after-data"])
    err = capsys.readouterr().err
    assert "--eval-steps (a train_mem.py flag: give it after `--`, e.g. `-- --eval_steps VALUE`)" in err
    if not torch.cuda.is_available():
        assert main(["dialogue-llama3", "--tiny", "--out", "rel", "--load_in_4bit"]) == 2
        assert "--bits 4 (a quantised base, QLoRA) needs a CUDA GPU" in capsys.readouterr().err
        assert main(["radiology-llama32v", "--tiny", "--out", "rad", "--stop-after-data"]) == 0
        assert ("this machine has no CUDA GPU: QLoRA's 4-bit base needs a CUDA GPU with bitsandbytes, so LoRA trains "
                "on a 16-bit base here") in capsys.readouterr().out


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    """While a run holds OUT (the command started again in another terminal), a second one stops before it
    writes anything; once the first ends, the same command goes on."""
    from mmedagent.recipes.base import run_lock

    out = tmp_path / "o"
    out.mkdir()
    with run_lock(out):
        assert main(["dialogue-llama3", "--tiny", "--out", str(out), "--stop-after-data"]) == 2
        assert f"{out} is in use by another recipe run (process " in capsys.readouterr().err
        assert not (out / "tiny-base").exists()
    assert main(["dialogue-llama3", "--tiny", "--out", str(out), "--stop-after-data"]) == 0
    assert not (out / ".recipe.lock").exists()  # no stale lock file naming a finished process
