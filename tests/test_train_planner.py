"""The tiny trained planner (mmedagent.train.fixture): trained through train_mem.py, it emits exactly the
trained tool calls under greedy decoding, and answers from the tool outputs."""

import json

import pytest

from mmedagent.protocol import parse_turn, render_tool_results


@pytest.fixture(scope="module")
def planner():
    from mmedagent.model import load_planner
    from mmedagent.train.fixture import trained_tiny_planner

    out = trained_tiny_planner()
    manifest = json.loads((out / "mmedagent_train.json").read_text())
    planner = load_planner(out, dtype="float32", device="cpu")  # template from the training manifest
    assert planner.template == manifest["template"] == "vicuna_v1"
    return planner


def test_emits_exactly_the_trained_tool_calls(planner):
    from mmedagent.train.fixture import PLANNER_CASES

    for case in PLANNER_CASES:
        messages = [{"role": "user", "content": f"<image>\n{case.question}"}]
        turn = parse_turn(planner.generate(messages, case.image(), max_new_tokens=96, temperature=0))
        assert turn.actions == case.calls, case.question
        assert turn == case.plan


def test_answers_after_the_tool_results(planner):
    from mmedagent.protocol import render_turn
    from mmedagent.train.fixture import PLANNER_CASES

    case = PLANNER_CASES[0]
    messages = [{"role": "user", "content": f"<image>\n{case.question}"},
                {"role": "assistant", "content": render_turn(case.plan)},
                {"role": "user", "content": render_tool_results(list(case.outcomes), case.question)}]
    turn = parse_turn(planner.generate(messages, case.image(), max_new_tokens=64, temperature=0))
    assert turn == case.answer


def test_prompt_lookup_answer_is_the_greedy_answer_with_quoted_tokens_accepted(planner):
    from mmedagent.protocol import render_turn
    from mmedagent.train.fixture import PLANNER_CASES

    case = PLANNER_CASES[0]
    messages = [{"role": "user", "content": f"<image>\n{case.question}"},
                {"role": "assistant", "content": render_turn(case.plan)},
                {"role": "user", "content": render_tool_results(list(case.outcomes), case.question)}]
    planner.prompt_lookup = 8
    try:
        reply = planner.generate(messages, case.image(), max_new_tokens=64, temperature=0)
    finally:
        planner.prompt_lookup = 0
    assert parse_turn(reply) == case.answer
    stats = planner.last_stats
    assert stats["accepted_drafts"] > 0  # the answer quotes the tool output
    assert stats["drafted_tokens"] >= stats["accepted_drafts"]
    assert planner.generate(messages, case.image(), max_new_tokens=64, temperature=0) == reply


def test_cache_is_reused():
    from mmedagent.train.fixture import trained_tiny_planner

    first = trained_tiny_planner()
    assert trained_tiny_planner() == first and (first.parent / "DONE").is_file()


def test_merge_script_keeps_the_trained_projector(tmp_path):
    """scripts/merge_lora_weights.py reads our output layout (no folder-name guessing); the merged model
    plans exactly like the adapter."""
    import subprocess
    import sys

    from _train_fixtures import ROOT

    from mmedagent.model import load_planner
    from mmedagent.protocol import render_turn
    from mmedagent.train.fixture import PLANNER_CASES, trained_tiny_planner

    merged = tmp_path / "merged-model"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_lora_weights.py"), "--model-path",
                           str(trained_tiny_planner()), "--save-model-path", str(merged)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planner = load_planner(merged, dtype="float32", device="cpu")  # the merge keeps the recorded template
    assert planner.template == "vicuna_v1"
    for case in PLANNER_CASES:
        reply = planner.generate([{"role": "user", "content": f"<image>\n{case.question}"}], case.image(),
                                 max_new_tokens=96, temperature=0)
        assert reply.strip() == render_turn(case.plan)
