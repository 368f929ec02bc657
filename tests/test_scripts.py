"""Every script under scripts/ starts, and the benchmarks run end to end on tiny models."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_starts(script):
    proc = run(str(script), "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_bench_agent_runs_and_reuse_matches_naive(tiny_models, tmp_path):
    given = tmp_path / "a-checkpoint-with-a-long-name"  # --model as in BENCHMARKS.md, a name wider than "llava-tiny"
    given.symlink_to(tiny_models("llava"), target_is_directory=True)
    proc = run("scripts/bench_agent.py", "--presets", "tiny", "--model", str(given), "--repeats", "1",
               "--plan-tokens", "3", "--answer-tokens", "3", "--threads", "1", "--prompt-lookup", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = lines[head + 2: head + 4]
    assert [r.split()[0] for r in rows] == ["llava-tiny", given.name]
    assert all(r.split()[-1] == "True" for r in rows)  # greedy tokens identical with and without KV reuse
    columns = [i for i, c in enumerate(lines[head]) if c == "|"]
    assert all([i for i, c in enumerate(r) if c == "|"] == columns for r in rows), proc.stdout  # one table


def _one_line_error(*args: str, prefix: str = "error: ", code: int = 2) -> str:
    proc = run(*args, timeout=300)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), last
    return last


@pytest.mark.parametrize("args, expected", [
    (["--presets", "huge"], "argument --presets: invalid choice: 'huge'"),
    (["--presets", "tiny", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--presets", "tiny", "--dtype", "float33"], "error: unknown dtype 'float33'"),
    (["--presets", "tiny", "--model", "runs/no-such-model"], "error: runs/no-such-model: no such local directory"),
])
def test_bench_agent_refuses_bad_input_in_one_line_before_building_models(args, expected):
    assert expected in _one_line_error("scripts/bench_agent.py", *args, prefix="")


def test_bench_train_and_box_copy_refuse_bad_models_in_one_line(tiny_models):
    for script in ("scripts/bench_train.py", "scripts/bench_box_copy.py"):
        err = _one_line_error(script, "--model", "runs/no-such-model")
        assert err.startswith("error: runs/no-such-model: no such local directory"), err
    llama = tiny_models("llama")
    assert _one_line_error("scripts/bench_train.py", "--model", str(llama)) == \
        f"error: {llama}: not a LLaVA checkpoint (its config has no vision_config.image_size)"
    assert _one_line_error("scripts/bench_train.py", "--steps", "0", prefix="").endswith(
        "argument --steps: must be at least 1, got 0")
    assert _one_line_error("scripts/bench_box_copy.py", "--n", "0", prefix="").endswith(
        "argument --n: must be at least 1, got 0")


def test_bench_rag_refuses_bad_counts_in_one_line():
    assert _one_line_error("scripts/bench_rag.py", "--embed-batches", "64", "0", prefix="").endswith(
        "argument --embed-batches: must be at least 1, got 0")


def test_bench_serve_reports_a_missing_controller_and_a_stack_that_does_not_start_in_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _one_line_error("scripts/bench_serve.py", "--url", f"http://127.0.0.1:{port}", code=1)
    assert err.startswith(f"error: no controller answers at http://127.0.0.1:{port}"), err
    proc = run("scripts/bench_serve.py", "--tool", "no_such_tool", "--chats", "1", TMPDIR=str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: the serving stack did not start: ") and "unknown tool 'no_such_tool'" in err, err
    assert [str(log) in err for log in tmp_path.glob("bench_serve_*.log")] == [True]  # its log, named, kept


def test_bench_serve_runs_on_its_own_stack_and_leaves_no_log_behind(tmp_path):
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.glob("bench_serve_*.log"))
    proc = run("scripts/bench_serve.py", "--chats", "2", "--tool-calls", "3", "--max-tokens", "2", "--image-size", "32",
               TMPDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chats"]["ok"] == 2 and result["tools"]["tool_calls"] == 3
    assert result["tools"]["overhead_p50_ms"] > 0
    # the stack's log goes to $TMPDIR and is kept only when something went wrong
    assert not list(tmp_path.glob("bench_serve_*.log")) and set(system_tmp.glob("bench_serve_*.log")) <= before


def test_bench_train_runs_on_a_given_checkpoint_and_leaves_nothing_behind(tiny_models, tmp_path):
    proc = run("scripts/bench_train.py", "--model", str(tiny_models("llava")), "--batch", "1", "--steps", "1",
               "--warmup", "1", "--lora_r", "4", TMPDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["framework_step_s"] > 0 and result["bare_step_s"] > 0 and result["ratio"] > 0
    assert not list(tmp_path.glob("bench_train_*"))  # its model, data and run (95 MB with the default model) are gone


def test_bench_box_copy_scores_the_demo_planner():
    proc = run("scripts/bench_box_copy.py", "--model", "demo", "--n", "6", "--phrasings", "train")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bank, asked, exact, valid, iou = next(line for line in proc.stdout.splitlines() if line.startswith("train")).split()
    assert int(asked) == 6 and 0 < int(exact) <= int(valid) <= 6  # the shipped planner copies some boxes exactly
    assert int(exact) / 6 <= float(iou) <= int(valid) / 6


def test_finetune_lora_without_arguments_prints_its_usage_only():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_lora.sh")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("MMedAgent's LoRA instruction-tuning recipe")
    assert lines[-1].endswith("see docs/train.md for CPU runs.") and "set -euo" not in proc.stdout


def test_finetune_lora_reads_relative_paths_from_where_it_is_run(tmp_path):
    """The recipe's paths are the user's (``./base_model`` as in MMedAgent's README), not the repo's."""
    stub = tmp_path / "bin" / "deepspeed"  # records what the launcher would be given
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\npwd\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    env = {**ENV, "PATH": f"{stub.parent}:{ENV.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "finetune_lora.sh"), "./base_model", "d.json", "imgs"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert Path(lines[0]) == tmp_path  # run where the user is: ./base_model, d.json, imgs are theirs
    assert Path(lines[1]) == ROOT / "train" / "train_mem.py"
    flag = {lines[i]: lines[i + 1] for i in range(2, len(lines) - 1) if lines[i].startswith("--")}
    assert flag["--model_name_or_path"] == "./base_model" and flag["--output_dir"] == "./checkpoints/mmedagent-lora"
    assert Path(flag["--deepspeed"]) == ROOT / "scripts" / "zero2.json"


def test_missing_models_are_one_line_errors(tiny_models, tmp_path):
    """A model path that does not exist here (relative, as typed) or a folder that is not an adapter:
    one ``error:`` line naming it, not a Hub-client traceback."""
    proc = run("scripts/merge_lora_weights.py", "--model-path", str(tiny_models("llama")), "--save-model-path",
               str(tmp_path / "m"), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "is not a LoRA adapter" in proc.stderr
    data = tmp_path / "d.json"
    data.write_text('[{"question": "Is there a fracture?", "answer": "no", "answer_type": "CLOSED"}]')
    proc = run("scripts/evaluate.py", "--model", "runs/llava-lora", "--data", str(data), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: runs/llava-lora: no such local directory (relative paths are read from" in proc.stderr, proc.stderr


def _convert_error(*args: str) -> str:
    proc = run("scripts/convert_llava_checkpoint.py", *args, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_convert_llava_checkpoint_reports_bad_sources_in_one_line(tiny_models, tmp_path):
    hf = tiny_models("llava")
    err = _convert_error("--src", str(hf), "--dst", str(tmp_path / "out"))
    assert err.startswith(f"error: {hf} is already in transformers layout") and "nothing to convert" in err, err
    assert not (tmp_path / "out").exists()
    err = _convert_error("--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "out"))
    assert err == f"error: {tmp_path / 'missing'}: no such directory"
    orig = tmp_path / "orig"  # original LLaVA layout whose config names no tower: the CLI flag is named
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava"}))
    err = _convert_error("--src", str(orig), "--dst", str(tmp_path / "out"))
    assert "names no vision tower" in err and "pass --vision-tower" in err and "vision_tower=" not in err, err
