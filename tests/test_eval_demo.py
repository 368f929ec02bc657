"""The demo model's name resolution and held-out split (the build itself is a benchmark, not a test)."""

import json
import shutil

import pytest

from _eval_fixtures import direct_record, grounding_record, write_json
from mmedagent import demo


def test_demo_path_comes_from_the_cache_and_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "PACKAGED", tmp_path / "not-shipped")
    assert demo.demo_dir() == tmp_path / "demo"
    with pytest.raises(FileNotFoundError, match="scripts/build_demo_model.py"):
        demo.demo_model_path(build_if_missing=False)
    assert demo.resolve_model("/models/x") == "/models/x"
    assert demo.demo_report() is None
    built = tmp_path / "demo"
    built.mkdir()
    (built / "config.json").write_text("{}")
    (built / demo.SETTINGS_FILE).write_text(json.dumps({"system_prompt": "plain"}))
    (built / demo.REPORT_FILE).write_text(json.dumps({"tool_selection_accuracy": 0.97}))
    assert demo.resolve_model("demo") == str(built) and demo.model_path() == built
    assert demo.demo_report()["tool_selection_accuracy"] == 0.97


def test_heldout_keeps_only_unseen_question_wordings(tmp_path):
    train = write_json(tmp_path / "train.json", [grounding_record("t1", question="Where is the tumor?"), direct_record("t2")])
    ev = write_json(tmp_path / "eval.json", [
        grounding_record("e1", question="Where is the tumor?"),  # same wording as training: dropped
        grounding_record("e2", question="Mark the tumor for me, please."),
        direct_record("e3"),  # same question as t2: dropped
    ])
    assert demo.heldout_records(train, ev, tmp_path / "held.json") == 1
    assert [r["id"] for r in json.loads((tmp_path / "held.json").read_text())] == ["e2"]


def test_routes_needs_both_targets():
    assert demo.routes({"tool_selection_accuracy": 0.96, "argument_validity": 1.0})
    assert not demo.routes({"tool_selection_accuracy": 0.96, "argument_validity": 0.98})
    assert not demo.routes({"tool_selection_accuracy": None, "argument_validity": 1.0})


def test_a_local_build_takes_precedence_over_the_shipped_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEDAGENT_CACHE", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(demo, "PACKAGED", shipped)
    for where, score in ((shipped, 0.96), (demo.demo_dir(), 0.99)):
        where.mkdir(parents=True)
        (where / "config.json").write_text("{}")
        (where / demo.SETTINGS_FILE).write_text("{}")
        (where / demo.REPORT_FILE).write_text(json.dumps({"tool_selection_accuracy": score}))
        assert demo.demo_model_path(build_if_missing=False) == where
        assert demo.demo_report()["tool_selection_accuracy"] == score


def test_reevaluating_the_shipped_model_reproduces_its_report(tmp_path):
    """``build_demo_model.py --reevaluate`` rebuilds the held-out split from the build record and gets
    the shipped report's calls back (the routing figures in BENCHMARKS.md)."""
    shipped = demo.demo_report(demo.PACKAGED)
    model = shutil.copytree(demo.PACKAGED, tmp_path / "demo")
    report = demo.reevaluate(model)
    assert report["build"] == shipped["build"] and report == demo.demo_report(model)
    assert [(s["id"], s["question"], s["calls"]) for s in report["samples"]] == \
        [(s["id"], s["question"], s["calls"]) for s in shipped["samples"]]
    for key in ("tool_selection_accuracy", "argument_validity", "routes"):
        assert report[key] == shipped[key]
    assert report["routes"] and report["argument_validity"] == 1.0


def test_reevaluate_needs_a_build_record(tmp_path):
    (tmp_path / demo.REPORT_FILE).write_text(json.dumps({"tool_selection_accuracy": 0.97}))
    with pytest.raises(FileNotFoundError, match="build record"):
        demo.reevaluate(tmp_path)
