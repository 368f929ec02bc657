"""The synthetic set: deterministic per seed, every task present, masks/boxes/labels consistent."""

import json
import re

import numpy as np
import pytest
from _data_fixtures import synth_dir  # noqa: F401  (fixture)
from PIL import Image

from mmedagent.data import templates
from mmedagent.data.__main__ import main
from mmedagent.data.builders import TASKS
from mmedagent.data.check import check_file
from mmedagent.data.formats import read_records
from mmedagent.data.synth import LABEL_VALUES, synth
from mmedagent.protocol import parse_tool_results


def test_every_task_in_train_and_eval(synth_dir):
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    for split in ("train", "eval"):
        tasks = manifest["files"][split]["tasks"]
        assert set(tasks) == {*TASKS, "direct"}
        recs = read_records(synth_dir / f"{split}.json")
        assert len(recs) == manifest["files"][split]["records"]
        report = check_file(synth_dir / f"{split}.json", image_folder=synth_dir / "images")
        assert report.ok and not report.unregistered, report.problems
    train_imgs = {i for r in read_records(synth_dir / "train.json") for i in r.images}
    eval_imgs = {i for r in read_records(synth_dir / "eval.json") for i in r.images}
    assert train_imgs and eval_imgs and not train_imgs & eval_imgs


def test_eval_uses_heldout_phrasings(synth_dir):
    held = templates.bank("grounding", "heldout")
    pats = [re.escape(t).replace(r"\{target\}", ".+") for t in held]
    qs = [r.first_question() for r in read_records(synth_dir / "eval.json") if r.tool_calls()
          and r.tool_calls()[0].API_name == "grounding"]
    assert qs and all(any(re.fullmatch(p, q) for p in pats) for q in qs)


def test_boxes_and_masks_match_the_pixels(synth_dir):
    for rec in read_records(synth_dir / "train.json"):
        if not rec.tool_calls() or rec.tool_calls()[0].API_name != "segmentation":
            continue
        out = parse_tool_results(rec.conversations[2].value).outcomes[0].output
        mask = np.asarray(Image.open(synth_dir / "masks" / rec.image))
        assert out["areas"] == [int((mask > 0).sum())]
        assert set(np.unique(mask)) - {0} <= set(LABEL_VALUES.values())
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        assert out["boxes"][0] == [round(xs.min() / w, 2), round(ys.min() / h, 2),
                                   round((xs.max() + 1) / w, 2), round((ys.max() + 1) / h, 2)]
        img = np.asarray(Image.open(synth_dir / "images" / rec.image).convert("L")).astype(float)
        m = mask > 0
        grown = m.copy()
        for axis in (0, 1):
            for shift in (-2, 2):
                grown |= np.roll(m, shift, axis=axis)
        ring = grown & ~m
        assert abs(img[m].mean() - img[ring].mean()) > 20  # the lesion stands out from its surroundings
        assert img.shape == (48, 48)


def test_deterministic_per_seed(tmp_path, synth_dir):
    synth(tmp_path / "a", n=10, seed=3, size=48)
    assert (tmp_path / "a" / "train.json").read_bytes() == (synth_dir / "train.json").read_bytes()
    assert (tmp_path / "a" / "images" / "img_0003.png").read_bytes() == (synth_dir / "images" / "img_0003.png").read_bytes()
    assert main(["synth", "--out", str(tmp_path / "b"), "--n", "10", "--seed", "4", "--size", "48",
                 "--api-names", "mmedagent"]) == 0
    assert (tmp_path / "b" / "train.json").read_bytes() != (synth_dir / "train.json").read_bytes()
    names = {c.API_name for r in read_records(tmp_path / "b" / "train.json") for c in r.tool_calls()}
    assert names == {"grounding dino", "MedSAM", "grounding dino + MedSAM", "BiomedClip", "ChatCAD-G", "ChatCAD-R"}
    with pytest.raises(ValueError):
        synth(tmp_path / "c", n=1)


def test_synth_into_a_used_folder_is_refused_not_mixed_with_the_old_set(tmp_path, capsys):
    """A second synth into the same --out left the first set's images and masks beside the new manifest."""
    assert main(["synth", "--out", str(tmp_path / "s"), "--n", "10", "--size", "48"]) == 0
    before = sorted(p.name for p in (tmp_path / "s" / "images").iterdir())
    assert main(["synth", "--out", str(tmp_path / "s"), "--n", "4", "--size", "48"]) == 2
    assert "is not empty: synth writes a whole data set into a folder of its own" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == before  # nothing touched


def test_variants_rephrase_tool_examples_and_loosen_segmentation_boxes(tmp_path, synth_dir):
    from collections import Counter

    assert main(["synth", "--out", str(tmp_path / "v"), "--n", "10", "--seed", "3", "--size", "48",
                 "--variants", "3"]) == 0
    one, three = (json.loads((d / "manifest.json").read_text())["files"] for d in (synth_dir, tmp_path / "v"))
    for task, n in one["train"]["tasks"].items():
        assert three["train"]["tasks"][task] == (n * 3 if task in TASKS else n)
    assert three["eval"] == one["eval"]  # the evaluation split is untouched
    records = read_records(tmp_path / "v" / "train.json")
    seg = [r for r in records if r.tool_calls() and r.tool_calls()[0].API_name == "segmentation"]
    by_image = {}
    for r in seg:
        by_image.setdefault(r.images[0], []).append(r.tool_calls()[0].API_params["boxes"][0])
    for boxes in by_image.values():
        assert len(boxes) == 3 and len({tuple(b) for b in boxes}) > 1
        tight = boxes[0]  # the first copy is the lesion's own box; the others enclose it
        for b in boxes[1:]:
            assert b[0] <= tight[0] and b[1] <= tight[1] and b[2] >= tight[2] and b[3] >= tight[3]
            assert all(0 <= v <= 1 for v in b) and max(abs(x - y) for x, y in zip(b, tight)) <= 0.05 + 1e-9
    questions = Counter(r.first_question() for r in records if r.tool_calls())
    assert len(questions) > len(records) // 3  # copies are phrased anew, not repeated verbatim
    assert check_file(tmp_path / "v" / "train.json", image_folder=tmp_path / "v" / "images").ok
    seg_only = synth(tmp_path / "s", n=10, seed=3, size=48, box_variants=2)["files"]["train"]["tasks"]
    assert seg_only == {**one["train"]["tasks"], "segmentation": 2 * one["train"]["tasks"]["segmentation"]}
    with pytest.raises(ValueError, match="variants"):
        synth(tmp_path / "w", n=4, variants=0)
    with pytest.raises(ValueError, match="box_variants"):
        synth(tmp_path / "w", n=4, box_variants=0)


def test_box_drills_practise_copying_a_random_box_into_the_call(tmp_path, synth_dir):
    one = json.loads((synth_dir / "manifest.json").read_text())["files"]
    assert main(["synth", "--out", str(tmp_path / "d"), "--n", "10", "--seed", "3", "--size", "48",
                 "--variants", "2", "--box-drills", "3"]) == 0
    files = json.loads((tmp_path / "d" / "manifest.json").read_text())["files"]
    assert files["train"]["tasks"]["box_drill"] == 3 * one["train"]["tasks"]["segmentation"]  # per base example
    assert files["eval"] == one["eval"]
    drills = [r for r in read_records(tmp_path / "d" / "train.json") if r.id.startswith("train-drill-")]
    assert len(drills) == files["train"]["tasks"]["box_drill"]
    boxes = set()
    for r in drills:
        assert [m.role for m in r.conversations] == ["human", "gpt"]  # question and plan only
        (call,) = r.tool_calls()
        box = call.API_params["boxes"][0]
        assert call.API_name == "segmentation" and box[0] <= box[2] <= 1 and box[1] <= box[3] <= 1
        assert json.dumps(box)[1:-1] in r.first_question()  # written in the question as the call writes it
        boxes.add(tuple(box))
    assert len(boxes) == len(drills)
    report = check_file(tmp_path / "d" / "train.json", image_folder=tmp_path / "d" / "images")
    assert report.ok and report.planning_only == len(drills)
    with pytest.raises(ValueError, match="box_drills"):
        synth(tmp_path / "w", n=4, box_drills=-1)


def test_drill_records_draw_fresh_boxes_per_seed(synth_dir):
    from mmedagent.data.synth import drill_records

    n_seg = json.loads((synth_dir / "manifest.json").read_text())["files"]["train"]["tasks"]["segmentation"]
    first, again, other = (drill_records(synth_dir, 2, s, "e0-") for s in (11, 11, 12))
    assert len(first) == 2 * n_seg and first[0].id == "e0-1"
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]  # deterministic per seed

    def boxes(records):
        return [tuple(r.tool_calls()[0].API_params["boxes"][0]) for r in records]

    assert not set(boxes(first)) & set(boxes(other))  # a new seed: new boxes to copy
    train_images = {i for r in read_records(synth_dir / "train.json") for i in r.images}
    for r in other:
        assert r.images[0] in train_images  # drills never touch the evaluation images
        assert json.dumps(r.tool_calls()[0].API_params["boxes"][0])[1:-1] in r.first_question()
