"""Instruction-data builders: each reader on fixtures made here, the dialogue form, options and --check."""

import csv
import http.server
import json
import re
import threading

import nibabel as nib
import numpy as np
import pytest
from _data_fixtures import records_of, save_grey, synth_dir, write_json  # noqa: F401  (fixture)
from PIL import Image

from mmedagent.data import builders, templates
from mmedagent.data.__main__ import main
from mmedagent.data.check import check_file
from mmedagent.data.formats import DataError, read_records, to_sharegpt, from_sharegpt
from mmedagent.protocol import IMAGE_PLACEHOLDER, parse_tool_results, parse_turn


def run_cli(*args):
    return main([str(a) for a in args])


def assert_valid(path):
    report = check_file(path)
    assert report.ok, report.problems
    assert not report.unregistered  # every canonical and MMedAgent name resolves to a registered tool
    return report


def tool_turns(rec):
    plan, result, final = rec.conversations[1], rec.conversations[2], rec.conversations[3]
    return plan, parse_tool_results(result.value), final


@pytest.fixture()
def coco(tmp_path):
    save_grey(tmp_path / "imgs" / "a.png", (40, 20))
    save_grey(tmp_path / "imgs" / "b.png", (32, 32))
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 7, "name": "nodule"}, {"id": 8, "name": "rib fracture"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 2, 10, 8]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 10, 20, 10]},
            {"id": 3, "image_id": 2, "category_id": 8, "bbox": [0, 0, 16, 8]},
        ],
    }
    return tmp_path, ann


def test_coco_to_grounding(coco):
    root, ann = coco
    p = write_json(root / "ann.json", ann)
    assert run_cli("build", "coco", "--annotations", p, "--image-root", root / "imgs", "--out", root / "g.json") == 0
    recs = records_of(root / "g.json")
    assert len(recs) == 2
    first = next(r for r in recs if r.image == "a.png")
    plan, result, final = tool_turns(first)
    call = plan.actions[0]
    assert call.API_name == "grounding" and call.API_params == {"image": IMAGE_PLACEHOLDER, "prompts": ["nodule"]}
    out = result.outcomes[0].output
    assert out["boxes"] == [[0.1, 0.1, 0.35, 0.5], [0.5, 0.5, 1.0, 1.0]] and out["phrases"] == ["nodule", "nodule"]
    assert result.question == first.first_question() and "nodule" in first.first_question()
    assert "[0.1, 0.1, 0.35, 0.5]" in final.value and final.actions == []
    assert first.conversations[0].value.startswith("<image>\n")
    assert_valid(root / "g.json")



def test_coco_boxes_of_a_photo_with_an_exif_orientation_are_of_the_upright_image(coco):
    """An image stored 40x20 with EXIF orientation 6 is 20x40 as shown, and as the model sees it: COCO boxes
    (x, y, w, h in pixels) are normalised by the upright size when the annotations give none."""
    from PIL import Image

    root, ann = coco
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (40, 20)).save(root / "imgs" / "b.png", exif=exif)
    exs = builders.read_coco(write_json(root / "ann.json", ann), root / "imgs")
    assert [t.box for t in next(e for e in exs if e.image == "b.png").targets] == [[0.0, 0.0, 0.8, 0.2]]


def test_coco_crowd_annotations_are_not_grounding_boxes(coco, caplog):
    """An iscrowd region (many objects, an RLE mask) is not one object's box: skipped, with a warning."""
    root, ann = coco
    ann["annotations"].append({"id": 4, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 20], "iscrowd": 1,
                               "segmentation": {"counts": [0, 800], "size": [20, 40]}})
    exs = builders.read_coco(write_json(root / "ann.json", ann), root / "imgs")
    assert [t.box for t in next(e for e in exs if e.image == "a.png").targets] == [[0.1, 0.1, 0.35, 0.5], [0.5, 0.5, 1.0, 1.0]]
    assert "1 crowd annotation(s) (iscrowd 1: a region of many objects) skipped" in caplog.text

@pytest.mark.parametrize(
    "patch, match",
    [
        (lambda a: a["annotations"][1].update(bbox=[30, 10, 20, 10]), r"annotations\[2\]: box .* outside the 40x20 image"),
        (lambda a: a["annotations"][0].update(category_id=99), r"annotations\[1\]: unknown category_id 99"),
        (lambda a: a["annotations"][2].update(image_id=5), r"annotations\[3\]: unknown image_id 5"),
        (lambda a: a["images"][0].update(file_name="missing.png"), r"images\[1\]: image not found: missing.png"),
        (lambda a: a["annotations"][0].update(bbox=[1, 1, 0, 3]), r"annotations\[1\]: box .* empty"),
    ],
)
def test_coco_validation(coco, patch, match, capsys):
    root, ann = coco
    patch(ann)
    p = write_json(root / "ann.json", ann)
    with pytest.raises(DataError, match=match):
        builders.read_coco(p, root / "imgs")
    assert run_cli("build", "coco", "--annotations", p, "--image-root", root / "imgs", "--out", root / "g.json") == 2
    assert "ann.json" in capsys.readouterr().err


def test_mmedagent_api_names_validate_against_tools(coco):
    root, ann = coco
    p = write_json(root / "ann.json", ann)
    run_cli("build", "coco", "--annotations", p, "--image-root", root / "imgs", "--out", root / "g.jsonl",
            "--api-names", "mmedagent", "--format", "sharegpt")
    recs = records_of(root / "g.jsonl")
    assert recs[0].tool_calls()[0].API_name == "grounding dino"
    assert parse_tool_results(recs[0].conversations[2].value).outcomes[0].tool == "grounding dino"
    assert_valid(root / "g.jsonl")


def test_masks_to_segmentation(tmp_path):
    save_grey(tmp_path / "imgs" / "s1.png", (32, 32))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 4:12] = 1  # liver: x 4..11, y 8..15
    mask[20:30, 20:24] = 2  # tumor
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "s1.png")
    out = tmp_path / "seg.json"
    assert run_cli("build", "masks", "--images", tmp_path / "imgs", "--masks", tmp_path / "masks",
                   "--labels", "1=liver,2=tumor", "--out", out, "--api-names", "mmedagent") == 0
    recs = records_of(out)
    assert len(recs) == 4
    seg = [r for r in recs if r.tool_calls()[0].API_name == "MedSAM"]
    gs = [r for r in recs if r.tool_calls()[0].API_name == "grounding dino + MedSAM"]
    assert len(seg) == len(gs) == 2
    liver = next(r for r in seg if "liver" in r.first_question())
    assert liver.tool_calls()[0].API_params == {"image": IMAGE_PLACEHOLDER, "boxes": [[0.12, 0.25, 0.38, 0.5]]}
    assert "[0.12, 0.25, 0.38, 0.5]" in liver.first_question()
    assert tool_turns(liver)[1].outcomes[0].output["areas"] == [64]
    tumor = next(r for r in gs if "tumor" in r.first_question())
    assert tumor.tool_calls()[0].API_params["prompts"] == ["tumor"]
    assert tool_turns(tumor)[1].outcomes[0].output["boxes"] == [[0.62, 0.62, 0.75, 0.94]]
    assert_valid(out)


def test_a_mask_drawn_on_a_photos_stored_pixels_is_turned_with_the_photo(tmp_path):
    """A photo stored 40x20 with EXIF orientation 6 is seen upright, 20x40; its mask saved at the stored
    40x20 is turned the same way, so its box is where the model sees the lesion (it was refused)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to view
    (tmp_path / "imgs").mkdir()
    Image.new("L", (40, 20)).save(tmp_path / "imgs" / "p.jpg", exif=exif)
    mask = np.zeros((20, 40), np.uint8)
    mask[0:5, 0:10] = 1  # top-left of the stored pixels → top-right once upright
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "p.png")
    exs = builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "lesion"}, tasks=("segmentation",))
    assert [t.box for e in exs for t in e.targets] == [[0.75, 0.0, 1.0, 0.25]]


def test_mask_errors(tmp_path):
    save_grey(tmp_path / "imgs" / "s1.png", (32, 32))
    (tmp_path / "masks").mkdir()
    mask = np.zeros((32, 32), np.uint8)
    mask[1:3, 1:3] = 3
    Image.fromarray(mask).save(tmp_path / "masks" / "s1.png")
    with pytest.raises(DataError, match=r"s1.png: record 1: mask value 3 has no label name"):
        builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "liver"})
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "masks" / "s1.png")
    with pytest.raises(DataError, match="mask is 32x16 but the image is 32x32; save the mask at the image's size"):
        builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "liver"})
    Image.fromarray(mask).save(tmp_path / "masks" / "other.png")
    with pytest.raises(DataError, match="no image named other"):
        builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {3: "cyst"})
    with pytest.raises(DataError, match="value=name"):
        builders.parse_label_names("liver")


def test_nifti_label_volume(tmp_path):
    vol = np.full((24, 20, 6), -1000.0, np.float32)
    lab = np.zeros(vol.shape, np.int16)
    vol[3:9, 10:16, 2:4] = 60.0  # a "lesion" at patient's left-anterior (low x = left, high y = anterior)
    lab[3:9, 10:16, 2:4] = 1
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / "seg.nii.gz"))
    out = tmp_path / "n.json"
    assert run_cli("build", "nifti", "--volume", tmp_path / "ct.nii.gz", "--label-volume", tmp_path / "seg.nii.gz",
                   "--labels", "1=lesion", "--image-out", tmp_path / "slices", "--window", "abdomen",
                   "--tasks", "grounding_segmentation", "--out", out) == 0
    recs = records_of(out)
    assert [r.image for r in recs] == ["ct_axial0002.png", "ct_axial0003.png"]
    box = tool_turns(recs[0])[1].outcomes[0].output["boxes"][0]
    img = np.asarray(Image.open(tmp_path / "slices" / recs[0].image))[..., 0]
    h, w = img.shape
    x1, y1, x2, y2 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    assert img[y1:y2, x1:x2].min() > 100 and img.mean() < 60  # the box sits on the lesion in the exported slice
    assert x1 >= w // 2 and y2 <= h // 2  # patient's left on the image right, anterior at the top
    assert_valid(out)


def test_an_analyze_pair_label_volume_builds_as_a_nifti_one_does(tmp_path):
    """SPM's Analyze 7.5 .hdr/.img pairs load as volumes; the builder refused them as "not NIfTI"."""
    vol = np.full((24, 20, 6), -1000.0, np.float32)
    lab = np.zeros(vol.shape, np.int16)
    vol[3:9, 10:16, 2:4], lab[3:9, 10:16, 2:4] = 60.0, 1
    for name, data in (("ct", vol), ("seg", lab)):
        nib.save(nib.AnalyzeImage(data, np.diag([1.5, 1.5, 3.0, 1.0])), str(tmp_path / f"{name}.hdr"))
    out = tmp_path / "a.json"
    assert run_cli("build", "nifti", "--volume", tmp_path / "ct.hdr", "--label-volume", tmp_path / "seg.hdr",
                   "--labels", "1=lesion", "--image-out", tmp_path / "slices", "--window", "abdomen",
                   "--tasks", "grounding_segmentation", "--out", out) == 0
    assert [r.image for r in records_of(out)] == ["ct_axial0002.png", "ct_axial0003.png"]


def test_classification_folder_and_csv(tmp_path):
    for cls in ("chest_X-ray", "brain MRI"):
        for k in range(2):
            save_grey(tmp_path / "cls" / cls / f"{k}.png")
    out = tmp_path / "c.json"
    assert run_cli("build", "classification", "--folder", tmp_path / "cls", "--out", out) == 0
    recs = records_of(out)
    assert len(recs) == 4 and recs[0].image.endswith(".png") and "/" in recs[0].image
    params = recs[0].tool_calls()[0].API_params
    assert params["labels"] == ["brain MRI", "chest X-ray"]
    for r in recs:
        out_ = tool_turns(r)[1].outcomes[0].output
        truth = r.image.split("/")[0].replace("_", " ")
        assert out_["labels"][0] == truth and truth in tool_turns(r)[2].value
        assert abs(sum(out_["probabilities"]) - 1) < 0.03 and out_["probabilities"] == sorted(out_["probabilities"], reverse=True)
    assert_valid(out)
    table = tmp_path / "labels.csv"
    table.write_text("image,label\na.png,brain MRI\nb.png,knee CT\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"labels.csv: record 2: unknown label 'knee CT'"):
        builders.read_classification(table=table, labels=["brain MRI", "chest X-ray"])
    table.write_text("image,label\na.png,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1: missing or empty 'label'"):
        builders.read_classification(table=table)


def test_reports(tmp_path):
    table = tmp_path / "r.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["image", "report"], ["x.png", "No acute findings."], ["y.png", "Small effusion."]])
    for name in ("x.png", "y.png"):  # without --image-root, the images are looked for beside the table
        save_grey(tmp_path / name)
    out = tmp_path / "r.json"
    assert run_cli("build", "reports", "--table", table, "--out", out) == 0
    recs = records_of(out)
    assert recs[0].tool_calls()[0].API_params == {"image": IMAGE_PLACEHOLDER}
    assert tool_turns(recs[1])[1].outcomes[0].output == {"report": "Small effusion."}
    assert "Small effusion." in tool_turns(recs[1])[2].value
    assert_valid(out)
    write_json(tmp_path / "bad.json", [{"image": "x.png", "report": "ok"}, {"image": "y.png", "report": " "}])
    with pytest.raises(DataError, match=r"bad.json: record 2: missing or empty 'report'"):
        builders.read_reports(tmp_path / "bad.json")
    # with --image-root, the images a table names must be there
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"")
    assert run_cli("build", "reports", "--table", table, "--image-root", tmp_path / "imgs", "--out", out) == 2
    assert run_cli("build", "vqa", "--table", write_json(tmp_path / "v.json", [{"image": "x.png", "question": "Q?", "answer": "A."}]),
                   "--image-root", tmp_path / "imgs", "--out", tmp_path / "v_out.json") == 0



def test_reports_with_mimic_cxr_findings_and_impression_keep_both_sections(tmp_path):
    """MIMIC-CXR-style rows give ``findings`` and ``impression``: the report holds both under the headings
    the report tool splits at; a row without findings keeps its impression, one with neither is an error."""
    from mmedagent.tools.report import parse_sections

    for name in ("x.png", "y.png"):
        save_grey(tmp_path / name)
    rows = [{"image": "x.png", "findings": "Lungs are clear.", "impression": "No acute process."},
            {"image": "y.png", "findings": None, "impression": "Right lower lobe pneumonia."}]
    out = tmp_path / "r.json"
    assert run_cli("build", "reports", "--table", write_json(tmp_path / "mimic.json", rows), "--out", out) == 0
    reports = [tool_turns(r)[1].outcomes[0].output["report"] for r in records_of(out)]
    assert reports == ["FINDINGS: Lungs are clear.\nIMPRESSION: No acute process.", "IMPRESSION: Right lower lobe pneumonia."]
    assert parse_sections(reports[0]) == {"findings": "Lungs are clear.", "impression": "No acute process."}
    assert_valid(out)
    write_json(tmp_path / "empty.json", [*rows, {"image": "x.png", "findings": "", "impression": " "}])
    with pytest.raises(DataError, match=r"empty.json: record 3: empty 'findings' and 'impression'"):
        builders.read_reports(tmp_path / "empty.json")

def pleural_corpus(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in [
        {"id": "p1", "text": "Pneumothorax is air in the pleural space."},
        {"id": "p2", "text": "A pleural effusion is fluid in the pleural space."},
        {"id": "p3", "text": "Cardiomegaly means an enlarged heart."}]), encoding="utf-8")
    return corpus


def test_rag(tmp_path):
    corpus = pleural_corpus(tmp_path)
    qa = write_json(tmp_path / "qa.json", [
        {"question": "What is a pleural effusion?", "answer": "Fluid in the pleural space."},
        {"question": "What is cardiomegaly?", "answer": "An enlarged heart.", "passages": ["p3"]}])
    out = tmp_path / "rag.json"
    assert run_cli("build", "rag", "--qa", qa, "--corpus", corpus, "--top-k", "2", "--out", out) == 0
    recs = records_of(out)
    assert recs[0].image is None and not recs[0].conversations[0].value.startswith("<image>")
    assert recs[0].tool_calls()[0].API_params == {"query": "What is a pleural effusion?"}
    passages = tool_turns(recs[0])[1].outcomes[0].output["passages"]
    assert [p["source"] for p in passages] == ["p2", "p1"] and passages[0]["score"] >= passages[1]["score"]
    assert tool_turns(recs[1])[1].outcomes[0].output["passages"][0]["source"] == "p3"
    assert tool_turns(recs[1])[2].value == "An enlarged heart."
    assert_valid(out)
    write_json(tmp_path / "qa2.json", [{"question": "q?", "answer": "a", "passages": ["nope"]}])
    with pytest.raises(DataError, match=r"qa2.json: record 1: passage 'nope' is not in the corpus"):
        builders.read_rag(tmp_path / "qa2.json", corpus)


def test_rag_records_feed_passages_back_as_the_tool_does(tmp_path):
    """Training records carry the passages cut as the retrieval tool feeds them to the model when
    serving (each to a word boundary, as many as fit its total), not whole passages."""
    from mmedagent.tools.rag import MODEL_TEXT_CHARS, MODEL_TOTAL_CHARS

    long = " ".join(["pleural fluid collects between the lung and the chest wall"] * 14)  # ~840 characters
    corpus = write_json(tmp_path / "c.json", [{"id": f"p{i}", "text": f"{i} {long}"} for i in range(12)])
    qa = write_json(tmp_path / "qa.json", [{"question": "What is pleural fluid?", "answer": "Fluid."}])
    assert run_cli("build", "rag", "--qa", qa, "--corpus", corpus, "--top-k", "12", "--out", tmp_path / "r.json") == 0
    out = tool_turns(records_of(tmp_path / "r.json")[0])[1].outcomes[0].output
    texts = [p["text"] for p in out["passages"]]
    assert all(len(t) <= MODEL_TEXT_CHARS and t.endswith("...") for t in texts)
    assert sum(map(len, texts)) <= MODEL_TOTAL_CHARS and out["omitted"] == 12 - len(texts) > 0
    assert ("0 " + long).startswith(texts[0][:-3])


def test_vqa_rows_keep_their_qid_and_answer_type(tmp_path):
    """The evaluation scores closed / open questions by answer_type and names samples by qid: a built VQA
    file keeps both, so it evaluates as the raw table does."""
    from mmedagent.evaluation.readers import load_samples

    vqa = write_json(tmp_path / "v.json", [
        {"qid": 7, "question": "Is there a fracture?", "answer": "No", "answer_type": "CLOSED"},
        {"qid": 8, "question": "Which organ?", "answer": "liver", "answer_type": "OPEN"}])
    assert run_cli("build", "vqa", "--table", vqa, "--out", tmp_path / "vo.json") == 0
    recs = records_of(tmp_path / "vo.json")
    assert [r.id for r in recs] == ["7", "8"] and recs[0].model_extra["answer_type"] == "CLOSED"
    assert [(s.id, s.task) for s in load_samples(tmp_path / "vo.json")] == [("7", "vqa_closed"), ("8", "vqa_open")]
    converted = read_records(vqa)  # `convert` of the raw table names the records by qid too (it wrote vqa-1, …)
    assert [str(r.id) for r in converted] == [r.id for r in recs]


def test_vqa_and_captions_are_direct_answers(tmp_path):
    vqa = write_json(tmp_path / "v.json", [{"image": "a.png", "question": "Is there a fracture?", "answer": "No."},
                                         {"question": "What is HU?", "answer": "Hounsfield units."}])
    caps = write_json(tmp_path / "c.json", [{"image": "a.png", "caption": "Axial CT of the abdomen."}])
    save_grey(tmp_path / "a.png")
    assert run_cli("build", "vqa", "--table", vqa, "--out", tmp_path / "vo.json") == 0
    assert run_cli("build", "captions", "--table", caps, "--out", tmp_path / "co.json") == 0
    v, c = records_of(tmp_path / "vo.json"), records_of(tmp_path / "co.json")
    assert [len(r.conversations) for r in v + c] == [2, 2, 2]
    assert all(r.conversations[1].actions == [] and r.conversations[1].is_tool_turn for r in v + c)
    assert v[0].conversations[0].value == "<image>\nIs there a fracture?" and v[1].image is None
    assert c[0].conversations[1].value == "Axial CT of the abdomen."
    assert_valid(tmp_path / "vo.json")


def _matches(question, bank):
    pats = [re.escape(t).replace(r"\{target\}", ".+").replace(r"\{box\}", r"\[.+\]") for t in bank]
    return any(re.fullmatch(p, question) for p in pats)


def test_heldout_phrasings_are_disjoint(coco):
    root, ann = coco
    ann["annotations"] = ann["annotations"] * 1
    p = write_json(root / "ann.json", ann)
    train_bank, held_bank = templates.bank("grounding", "train"), templates.bank("grounding", "heldout")
    assert not set(train_bank) & set(held_bank) and len(train_bank) >= 8
    for phr, bank in (("train", train_bank), ("heldout", held_bank)):
        qs = set()
        for seed in range(12):
            b = builders.DialogueBuilder(phrasings=phr, seed=seed)
            qs |= {r.first_question() for r in b.build_all(builders.read_coco(p, root / "imgs"))}
        assert all(_matches(q, bank) for q in qs) and len(qs) >= 3
    with pytest.raises(ValueError):
        builders.DialogueBuilder(phrasings="test")
    with pytest.raises(ValueError):
        builders.DialogueBuilder(api_names="llava")


def test_same_seed_same_output(coco):
    root, ann = coco
    p = write_json(root / "ann.json", ann)
    a = [r.to_dict() for r in builders.DialogueBuilder(seed=5).build_all(builders.read_coco(p, root / "imgs"))]
    b = [r.to_dict() for r in builders.DialogueBuilder(seed=5).build_all(builders.read_coco(p, root / "imgs"))]
    assert a == b


def test_run_tools_takes_outputs_from_the_tool(coco, monkeypatch):
    """--run-tools wiring: outputs come from the registered tool via the Dispatcher, not the annotations."""
    from doubles import FakeGrounding

    from mmedagent.tools import registry

    monkeypatch.setitem(registry._extra, "grounding", FakeGrounding)  # replaces the weight-loading tool here
    root, ann = coco
    p = write_json(root / "ann.json", ann)
    runner = builders.ToolRunner(root / "imgs", grounding={"model": "my/dino"}, segmentation={"checkpoint": "my.pth"})
    composite = runner.dispatcher.resolve("grounding dino + MedSAM")  # built, not loaded: its parts' options, as served
    assert composite.options == {"grounding": {"model": "my/dino"}, "segmentation": {"checkpoint": "my.pth"}}
    recs = builders.DialogueBuilder(runner=runner).build_all(builders.read_coco(p, root / "imgs"))
    out = tool_turns(recs[0])[1].outcomes[0].output
    assert out == {"boxes": [[0.12, 0.2, 0.3, 0.4]], "phrases": ["nodule"]}  # FakeGrounding's answer, rounded
    assert "[0.12, 0.2, 0.3, 0.4]" in tool_turns(recs[0])[2].value
    tool = runner.dispatcher.resolve("grounding")
    assert tool.seen_images[0].size in ((40, 20), (32, 32))  # decoded images went to the tool
    ann["images"][0]["file_name"] = "gone.png"
    (root / "imgs" / "gone.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot load image gone.png"):
        builders.DialogueBuilder(runner=runner).build_all(builders.read_coco(write_json(root / "ann.json", ann), root / "imgs"))


class _Chat(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"]
        reply = {"choices": [{"message": {"role": "assistant", "content": "Rephrased: " + question}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_rewriter_through_openai_compatible_endpoint(coco):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root, ann = coco
        p = write_json(root / "ann.json", ann)
        rw = builders.OpenAIRewriter(f"http://127.0.0.1:{server.server_port}/v1", "any-model")
        rec = builders.DialogueBuilder(rewriter=rw).build_all(builders.read_coco(p, root / "imgs"))[0]
        q = rec.first_question()
        assert q.startswith("Rephrased: ") and tool_turns(rec)[1].question == q
    finally:
        server.shutdown()
        server.server_close()
    dead = builders.OpenAIRewriter(f"http://127.0.0.1:{server.server_port}/v1", "m", timeout_s=2)
    assert dead("Where is it?") == "Where is it?"  # optional: failures keep the template


def test_check_reports_bad_records(tmp_path, synth_dir, capsys):
    recs = read_records(synth_dir / "train.json")
    bad = [r.to_dict() for r in recs[:12]]
    seg = next(d for d in bad if d["conversations"][1]["actions"][0]["API_name"] == "segmentation")
    seg["conversations"][1]["actions"][0]["API_params"]["boxes"] = [[0.1, 0.2, 0.3]]
    gr = next(d for d in bad if d["conversations"][1]["actions"][0]["API_name"] == "grounding")
    gr["conversations"][2]["value"] = "no tool output here"
    gr2 = [d for d in bad if d["conversations"][1]["actions"][0]["API_name"] == "grounding"][1]
    gr2["conversations"][1]["actions"][0]["API_params"]["colour"] = "red"
    path = write_json(tmp_path / "bad.json", bad)
    report = check_file(path)
    text = "\n".join(report.problems)
    assert len(report.problems) == 3
    assert f"record {bad.index(seg) + 1}: turn 2: invalid params for segmentation: boxes.0" in text
    assert f"record {bad.index(gr) + 1}: turn 3 should carry the tool output" in text
    assert f"record {bad.index(gr2) + 1}: turn 2: invalid params for grounding: colour" in text
    assert run_cli("--check", path) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and "images not checked: give --image-folder" in out
    assert run_cli("check", synth_dir / "train.json", "--image-folder", synth_dir / "images") == 0
    assert "images not checked" not in capsys.readouterr().out
    # what training refuses, check refuses too, with training's words
    lone = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
    late_system = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "system", "value": "Be brief."},
                                     {"from": "gpt", "value": "Hello."}]}
    report = check_file(write_json(tmp_path / "untrainable.json", [lone, late_system]))
    assert report.problems == [f"{tmp_path / 'untrainable.json'}: record 1: no assistant turn to learn from",
                               f"{tmp_path / 'untrainable.json'}: record 2: a system turn may only come first"]


def test_sharegpt_round_trip_of_every_task(synth_dir, tmp_path):
    recs = read_records(synth_dir / "train.json")
    assert all(from_sharegpt(to_sharegpt(r)).to_dict() == r.to_dict() for r in recs)
    assert run_cli("convert", synth_dir / "train.json", tmp_path / "sg.jsonl", "--to", "sharegpt") == 0
    assert run_cli("convert", tmp_path / "sg.jsonl", tmp_path / "back.json") == 0
    assert json.loads((tmp_path / "back.json").read_text()) == json.loads((synth_dir / "train.json").read_text())
    for r in read_records(tmp_path / "sg.jsonl"):
        for m in r.conversations:
            if m.role == "gpt":
                assert parse_turn(m.text()) == m.assistant_turn()


def test_split_by_image(synth_dir, tmp_path):
    recs = read_records(synth_dir / "train.json")
    parts = builders.split_by_image(recs, (0.6, 0.2, 0.2), seed=1)
    assert sum(len(v) for v in parts.values()) == len(recs)
    images = {k: {i for r in v for i in r.images} for k, v in parts.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"] and not images["val"] & images["test"]
    assert all(parts.values())
    assert run_cli("split", synth_dir / "train.json", "--out", tmp_path / "sp", "--ratios", "0.6,0.2,0.2") == 0
    assert sum(len(records_of(tmp_path / "sp" / f"{k}.json")) for k in ("train", "val", "test")) == len(recs)
    with pytest.raises(ValueError):
        builders.split_by_image(recs, (1.0, 0.0))


def test_hf_caption_dataset_to_split_instruction_json(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(10)],
         "caption": [f"Finding number {i}." for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "radiology_mini"))
    assert run_cli("split", tmp_path / "radiology_mini", "--out", tmp_path / "out", "--image-folder",
                   tmp_path / "images", "--ratios", "0.8,0.1,0.1") == 0
    sizes = {k: len(records_of(tmp_path / "out" / f"{k}.json")) for k in ("train", "val", "test")}
    assert sizes == {"train": 8, "val": 1, "test": 1}
    rec = records_of(tmp_path / "out" / "test.json")[0]
    assert (tmp_path / "images" / rec.image).is_file() and rec.conversations[1].value.startswith("Finding number")
    assert_valid(tmp_path / "out" / "train.json")


def test_table_builders_read_parquet_and_saved_hf_datasets(tmp_path):
    """VQA-RAD's Hugging Face layout (stored images, question, answer) and a saved report dataset build
    like tables: the images exported under the image root and named relative to it, --data-split picking
    rows; --data-split on a JSON table is an error."""
    datasets = pytest.importorskip("datasets")
    img = [Image.new("L", (16, 16), v) for v in (20, 120, 220)]
    datasets.Dataset.from_dict({"image": img, "question": ["Is there a mass?", "Which organ?", "Any fluid?"],
                                "answer": ["no", "liver", "yes"]}).to_parquet(str(tmp_path / "test.parquet"))
    root = tmp_path / "root"
    assert run_cli("build", "vqa", "--table", tmp_path / "test.parquet", "--image-root", root,
                   "--data-split", "test[1:]", "--out", tmp_path / "vqa.json") == 0
    recs = records_of(tmp_path / "vqa.json")
    assert [r.conversations[1].value for r in recs] == ["liver", "yes"]
    assert [r.image for r in recs] == ["test_images/test_1-_00000001.png", "test_images/test_1-_00000002.png"]
    assert Image.open(root / recs[1].image).getpixel((0, 0)) == 220
    assert_valid(tmp_path / "vqa.json")
    # two splits of one dataset into one image root: each record keeps its own image
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": img[:1], "question": ["A?"], "answer": ["a"]}),
                          "test": datasets.Dataset.from_dict({"image": img[2:], "question": ["B?"], "answer": ["b"]})}
                         ).save_to_disk(str(tmp_path / "vqarad"))
    for split in ("train", "test"):
        assert run_cli("build", "vqa", "--table", tmp_path / "vqarad", "--data-split", split, "--out",
                       tmp_path / f"{split}.json") == 0
    pixels = {s: Image.open(tmp_path / records_of(tmp_path / f"{s}.json")[0].image).getpixel((0, 0))
              for s in ("train", "test")}
    assert pixels == {"train": 20, "test": 220}
    datasets.Dataset.from_dict({"image": img[:2], "findings": ["Clear lungs.", "Small effusion."]}).save_to_disk(
        str(tmp_path / "reports_ds"))
    assert run_cli("build", "reports", "--table", tmp_path / "reports_ds", "--out", tmp_path / "rep.json") == 0
    rec = records_of(tmp_path / "rep.json")[1]
    assert rec.image == "reports_ds_images/00000002.png" and (tmp_path / rec.image).is_file()
    assert "Small effusion." in rec.conversations[-1].value
    table = write_json(tmp_path / "v.json", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(DataError, match=r"--data-split 'test' applies to Hugging Face datasets and parquet data only"):
        builders.read_vqa(table, split="test")
    (tmp_path / "cls" / "normal").mkdir(parents=True)
    save_grey(tmp_path / "cls" / "normal" / "a.png")
    assert run_cli("build", "classification", "--folder", tmp_path / "cls", "--data-split", "test",
                   "--out", tmp_path / "c.json") == 2


# --------------------------------------------------------------------------- fixes: tables, errors, folders, rag


def test_table_images_are_checked_beside_the_table_and_outside_ones_are_a_warning(tmp_path, capsys):
    """Training takes an absolute or ``..`` image path, so the builder does too, with a warning; a
    missing image is an error naming the row (and --image-root, when the paths start elsewhere)."""
    save_grey(tmp_path / "t" / "a.png")
    save_grey(tmp_path / "outside.png")
    table = tmp_path / "t" / "r.csv"
    table.write_text("image,report\na.png,Normal.\nmissing.png,Effusion.\n", encoding="utf-8")
    assert run_cli("build", "reports", "--table", table, "--out", tmp_path / "o.json") == 2  # no --image-root needed
    err = capsys.readouterr().err
    assert "r.csv: record 2: image not found" in err and "pass --image-root" in err
    for bad in (str(tmp_path / "outside.png"), "../outside.png"):
        table.write_text(f"image,report\na.png,Normal.\n{bad},Effusion.\n", encoding="utf-8")
        for root in ((), ("--image-root", tmp_path / "t")):
            assert run_cli("build", "reports", "--table", table, *root, "--out", tmp_path / "o.json") == 0
            err = capsys.readouterr().err.strip()
            assert err.startswith("warning: ") and "r.csv: record 2: image " in err and "outside the image root" in err
    table.write_text("image,report\nt/a.png,Normal.\n", encoding="utf-8")  # relative to elsewhere: say where
    assert run_cli("build", "reports", "--table", table, "--image-root", tmp_path, "--out", tmp_path / "o.json") == 0


def test_csv_with_excel_byte_order_mark_keeps_its_first_column(tmp_path):
    table = tmp_path / "bom.csv"
    table.write_bytes("\ufeffimage,report\na.png,Normal chest.\n".encode())
    (ex,) = builders.read_reports(table)
    assert ex.image == "a.png" and ex.report == "Normal chest."


@pytest.mark.parametrize("case, match", [
    ("latin_csv", r"latin\.csv: record 2 \(line 3\): not UTF-8 text \(byte 0xe9\)"),
    ("ratios_two", r"--ratios '0\.8,0\.2': need three"),
    ("ratios_text", r"--ratios '0\.8,x,0\.1': need three"),
    ("coco_category_without_id", r"coco\.json: categories\[2\]: needs id and name"),
    ("coco_list", r"coco\.json: not a COCO detection file .* found a JSON list"),
    ("labels_bad_json", r"labels\.json: invalid JSON at line 1"),
    ("labels_text_keys", r"labels\.json: label key 'one' is not an integer"),
])
def test_bad_inputs_are_one_error_line_not_a_traceback(tmp_path, capsys, case, match):
    save_grey(tmp_path / "a.png")
    save_grey(tmp_path / "imgs" / "a.png")
    save_grey(tmp_path / "masks" / "a.png", value=0, box=(2, 2, 9, 9), box_value=1)
    data = write_json(tmp_path / "d.json", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    coco = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [],
            "categories": [{"id": 1, "name": "nodule"}, {"name": "rib"}]}
    argv = {
        "latin_csv": ("build", "reports", "--table", tmp_path / "latin.csv"),
        "ratios_two": ("split", data, "--ratios", "0.8,0.2", "--out", tmp_path / "sp"),
        "ratios_text": ("split", data, "--ratios", "0.8,x,0.1", "--out", tmp_path / "sp"),
        "coco_category_without_id": ("build", "coco", "--annotations", tmp_path / "coco.json"),
        "coco_list": ("build", "coco", "--annotations", tmp_path / "coco.json"),
        "labels_bad_json": ("build", "masks", "--images", tmp_path / "imgs", "--masks", tmp_path / "masks",
                            "--labels", tmp_path / "labels.json"),
        "labels_text_keys": ("build", "masks", "--images", tmp_path / "imgs", "--masks", tmp_path / "masks",
                             "--labels", tmp_path / "labels.json"),
    }[case]
    if case == "latin_csv":
        (tmp_path / "latin.csv").write_bytes(b"image,report\na.png,Normal.\na.png,Caf\xe9 normal.\n")
    elif case.startswith("coco"):
        write_json(tmp_path / "coco.json", [coco] if case == "coco_list" else coco)
    elif case == "labels_bad_json":
        (tmp_path / "labels.json").write_text('{"1": "liver", "x": 2', encoding="utf-8")
    elif case == "labels_text_keys":
        write_json(tmp_path / "labels.json", {"one": "liver"})
    out = () if case.startswith("ratios") else ("--out", tmp_path / "o.json")
    assert run_cli(*argv, *out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and re.search(match, err), err


def test_classification_folder_skips_hidden_and_non_image_files(tmp_path):
    save_grey(tmp_path / "cls" / "normal" / "a.png")
    save_grey(tmp_path / "cls" / "pneumonia" / "b.png")
    (tmp_path / "cls" / "normal" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "cls" / "normal" / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (tmp_path / "cls" / "pneumonia" / "README.txt").write_text("notes", encoding="utf-8")
    save_grey(tmp_path / "cls" / ".thumbnails" / "c.png")  # a hidden folder is not a class
    exs = builders.read_classification(folder=tmp_path / "cls")
    assert sorted(e.image for e in exs) == ["normal/a.png", "pneumonia/b.png"]
    assert exs[0].labels == ["normal", "pneumonia"]


def test_rag_top_k_limit_and_no_zero_overlap_padding(tmp_path):
    from mmedagent.tools.rag import Retrieval

    Retrieval.Params(k=builders.RAG_MAX_K)  # the builder's limit is the tool's
    with pytest.raises(ValueError):
        Retrieval.Params(k=builders.RAG_MAX_K + 1)
    corpus = tmp_path / "c.txt"
    corpus.write_text("Asthma is a chronic disease of the airways.\nGout is caused by uric acid crystals.\n"
                      "Anaemia is a low haemoglobin.\n", encoding="utf-8")
    qa = write_json(tmp_path / "qa.json", [{"question": "What causes gout?", "answer": "Uric acid crystals."}])
    for k in ("0", "51"):
        assert run_cli("build", "rag", "--qa", qa, "--corpus", corpus, "--top-k", k, "--out", tmp_path / "r.json") == 2
    (ex,) = builders.read_rag(qa, corpus, top_k=3)
    assert ex.sources == ["2"] and ex.scores[0] > 0  # the passages sharing no word are left out


def test_rag_corpus_folder_is_read_as_the_index_reads_it(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "gout.md").write_text("# Gout\nGout is caused by uric acid crystals in the joints.\n", encoding="utf-8")
    (docs / "asthma.txt").write_text("Asthma is a chronic disease\nof the airways.\n", encoding="utf-8")
    from mmedagent.tools._rag_index import load_corpus

    index_sources = sorted(p["source"] for p in load_corpus(docs).passages)
    assert sorted(pid for pid, _ in builders.read_corpus(docs)) == index_sources == ["asthma.txt", "gout.md"]
    qa = write_json(tmp_path / "qa.json", [{"question": "What causes gout?", "answer": "Uric acid.", "passages": ["gout.md"]}])
    (ex,) = builders.read_rag(qa, docs)
    assert ex.sources == ["gout.md"] and ex.passages == ["Gout is caused by uric acid crystals in the joints."]


def test_rag_run_tools_searches_the_given_corpus(tmp_path):
    corpus = pleural_corpus(tmp_path)
    qa = write_json(tmp_path / "qa.json", [{"question": "What is a pleural effusion?", "answer": "Fluid."}])
    out = tmp_path / "rag.json"
    assert run_cli("build", "rag", "--qa", qa, "--corpus", corpus, "--top-k", "2", "--run-tools", "--out", out) == 0
    (rec,) = records_of(out)
    passages = tool_turns(rec)[1].outcomes[0].output["passages"]
    assert len(passages) == 2 and {p["source"] for p in passages} <= {"p1", "p2", "p3"}  # not the ICD-10-CM preset
    assert passages[0]["source"] == "p2"
    assert rec.tool_calls()[0].API_params == {"query": "What is a pleural effusion?"}


# --------------------------------------------------------------------------- fixes: researchers' own sets


def test_json_tables_with_numbers_and_vqa_rad_slake_image_columns(tmp_path):
    """A JSON table's ``"answer": 2`` / ``"label": 0`` are text, and VQA-RAD's ``image_name`` / SLAKE's
    ``img_name`` name the image (as the evaluation readers take them): no traceback, no image lost."""
    save_grey(tmp_path / "synpic1.jpg")
    save_grey(tmp_path / "xmlab1" / "source.jpg")
    vqa = write_json(tmp_path / "vqa.json", [
        {"image_name": "synpic1.jpg", "question": "How many lesions are there?", "answer": 2},
        {"img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes", "q_lang": "en"}])
    out = tmp_path / "vqa_out.json"
    assert run_cli("build", "vqa", "--table", vqa, "--out", out) == 0
    recs = records_of(out)
    assert [r.image for r in recs] == ["synpic1.jpg", "xmlab1/source.jpg"]
    assert recs[0].conversations[-1].value == "2" and recs[0].conversations[0].value.startswith("<image>\n")
    assert check_file(out, image_folder=tmp_path).ok
    cls = write_json(tmp_path / "cls.json", [{"image": "synpic1.jpg", "label": 0}, {"image": "synpic1.jpg", "label": 1}])
    exs = builders.read_classification(table=cls)
    assert [e.label for e in exs] == ["0", "1"] and exs[0].labels == ["0", "1"]  # label 0 is a candidate too
    out = tmp_path / "cls_out.json"
    assert run_cli("build", "classification", "--table", cls, "--out", out) == 0
    assert records_of(out)[0].tool_calls()[0].API_params["labels"] == ["0", "1"]
    assert_valid(out)
    write_json(vqa, [{"question": "Which organs?", "answer": ["liver", "spleen"]}])
    with pytest.raises(DataError, match=r"vqa\.json: record 1: 'answer' must be text or a number, found a JSON array"):
        builders.read_vqa(vqa)



def test_classification_class_indices_take_their_names(tmp_path, caplog):
    """Class indices (a CSV's 0/1, class folders named 0/1, a Hugging Face ClassLabel column) become the class
    names: from --labels in index order, or from the ClassLabel feature; indices alone are a warning."""
    datasets = pytest.importorskip("datasets")
    save_grey(tmp_path / "a.png")
    save_grey(tmp_path / "b.png", value=120)
    table = tmp_path / "idx.csv"
    table.write_text("image,label\na.png,0\nb.png,1\n", encoding="utf-8")
    exs = builders.read_classification(table=table, labels=["normal", "pneumonia"])
    assert [e.label for e in exs] == ["normal", "pneumonia"] and exs[0].labels == ["normal", "pneumonia"]
    with pytest.raises(DataError, match=r"idx.csv: record 2: class index 1 is out of range for the 1 labels given"):
        builders.read_classification(table=table, labels=["normal"])
    with pytest.raises(DataError, match=r"idx.csv: record 1: unknown label '0'"):  # numeric names are not indices
        builders.read_classification(table=table, labels=["1", "2"])
    caplog.clear()
    assert [e.label for e in builders.read_classification(table=table)] == ["0", "1"]
    assert "every label is a number (0, 1): class indices?" in caplog.text and "--labels" in caplog.text
    save_grey(tmp_path / "by_class" / "1" / "c.png")
    assert [e.label for e in builders.read_classification(folder=tmp_path / "by_class", labels=["normal", "tumor"])] == ["tumor"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["normal", "pneumonia"])})
    datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "label": [1, 0]},
                               features=features).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "cls.json"
    assert run_cli("build", "classification", "--table", tmp_path / "train.parquet", "--out", out) == 0
    assert [tool_turns(r)[1].outcomes[0].output["labels"][0] for r in records_of(out)] == ["pneumonia", "normal"]
    assert_valid(out)

def test_table_questions_that_carry_image_markers_get_one(tmp_path):
    """A question written LLaVA-style (``<image>\\nIs there ...?``) is not marked twice: training takes the record."""
    from mmedagent.data.formats import chat_messages

    save_grey(tmp_path / "a.png")
    vqa = write_json(tmp_path / "vqa.json", [{"image": "a.png", "question": "<image>\nIs there a fracture?", "answer": "No."},
                                             {"question": "<image> What is a Hounsfield unit?", "answer": "A CT unit."}])
    out = tmp_path / "o.json"
    assert run_cli("build", "vqa", "--table", vqa, "--out", out) == 0
    for i, rec in enumerate(records_of(out), 1):
        chat_messages(rec, f"record {i}")
    assert [r.conversations[0].value for r in records_of(out)] == ["<image>\nIs there a fracture?",
                                                                   "What is a Hounsfield unit?"]
    assert_valid(out)
    write_json(vqa, [{"image": "a.png", "question": "<image>", "answer": "No."}])
    assert run_cli("build", "vqa", "--table", vqa, "--out", out) == 2


def test_classification_folder_takes_images_in_subfolders_and_refuses_an_empty_class(tmp_path, capsys):
    """``tumor/case01/slice.png`` is a tumor image (torchvision's ImageFolder reads it so); a class folder
    with no image would silently leave the candidate labels."""
    save_grey(tmp_path / "cls" / "tumor" / "case01" / "s1.png")
    save_grey(tmp_path / "cls" / "tumor" / "case01" / ".hidden" / "x.png")
    save_grey(tmp_path / "cls" / "normal" / "n1.png")
    exs = builders.read_classification(folder=tmp_path / "cls")
    assert [(e.image, e.label) for e in exs] == [("normal/n1.png", "normal"), ("tumor/case01/s1.png", "tumor")]
    assert exs[0].labels == ["normal", "tumor"]
    (tmp_path / "cls" / "normal" / "n1.png").unlink()
    assert run_cli("build", "classification", "--folder", tmp_path / "cls", "--out", tmp_path / "o.json") == 2
    assert "class folder 'normal' holds no images" in capsys.readouterr().err


def test_colour_masks_are_refused_and_sidecar_files_are_not_images(tmp_path, capsys):
    save_grey(tmp_path / "imgs" / "c1.png", (16, 16))
    (tmp_path / "imgs" / "c1.json").write_text("{}", encoding="utf-8")  # sorts after c1.png: same stem
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[2:6, 2:6] = (1, 1, 1)
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "c1.png")
    (ex,) = builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "liver"}, ["segmentation"])
    assert ex.image == "c1.png" and ex.targets[0].box == [0.12, 0.12, 0.38, 0.38]  # a grey RGB mask is fine
    mask[8:12, 8:12] = (0, 2, 0)  # a colour-coded label: channel 0 alone would lose it
    Image.fromarray(mask).save(tmp_path / "masks" / "c1.png")
    assert run_cli("build", "masks", "--images", tmp_path / "imgs", "--masks", tmp_path / "masks", "--labels",
                   "1=liver,2=tumor", "--out", tmp_path / "o.json") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "c1.png: record 1: a colour mask" in err and "\n" not in err
    (tmp_path / "masks" / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert run_cli("build", "masks", "--images", tmp_path / "imgs", "--masks", tmp_path / "masks", "--labels",
                   "1=liver", "--out", tmp_path / "o.json") == 2
    assert "record 1: cannot read the mask" in capsys.readouterr().err


def test_masks_with_an_upper_case_suffix_are_read(tmp_path):
    save_grey(tmp_path / "imgs" / "C1.PNG", (16, 16))
    save_grey(tmp_path / "imgs" / "C2.png", (16, 16))
    save_grey(tmp_path / "masks" / "C1.PNG", (16, 16), value=0, box=(2, 2, 6, 6), box_value=1)
    save_grey(tmp_path / "masks" / "C2.png", (16, 16), value=0, box=(8, 8, 12, 12), box_value=1)
    exs = builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "liver"}, ["segmentation"])
    assert [e.image for e in exs] == ["C1.PNG", "C2.png"]


def test_folder_builders_name_images_from_the_image_root(tmp_path):
    """With --image-root the images of --images / --folder / --image-out are named from it, where training
    (--image_folder) and --run-tools look them up."""
    save_grey(tmp_path / "ds" / "imgs" / "c1.png", (16, 16))
    save_grey(tmp_path / "ds" / "masks" / "c1.png", (16, 16), value=0, box=(2, 2, 6, 6), box_value=1)
    save_grey(tmp_path / "ds" / "by_class" / "normal" / "n.png")
    save_grey(tmp_path / "ds" / "by_class" / "tumor" / "t.png")
    out = tmp_path / "m.json"
    assert run_cli("build", "masks", "--images", tmp_path / "ds" / "imgs", "--masks", tmp_path / "ds" / "masks",
                   "--labels", "1=liver", "--image-root", tmp_path / "ds", "--out", out) == 0
    assert {r.image for r in records_of(out)} == {"imgs/c1.png"}
    assert check_file(out, image_folder=tmp_path / "ds").ok
    assert run_cli("build", "classification", "--folder", tmp_path / "ds" / "by_class", "--image-root",
                   tmp_path / "ds", "--out", out) == 0
    assert sorted(r.image for r in records_of(out)) == ["by_class/normal/n.png", "by_class/tumor/t.png"]
    assert check_file(out, image_folder=tmp_path / "ds").ok
    assert run_cli("build", "masks", "--images", tmp_path / "ds" / "imgs", "--masks", tmp_path / "ds" / "masks",
                   "--labels", "1=liver", "--out", out) == 0  # without it: named from --images, as before
    assert {r.image for r in records_of(out)} == {"c1.png"}


def test_nifti_slices_of_another_volume_with_the_same_name_are_not_overwritten(tmp_path, capsys):
    """KiTS-like layouts (``case_00000/imaging.nii.gz``, ``case_00001/imaging.nii.gz``) give the same slice
    names: the second volume must not silently replace the first's slices under its records."""
    for case, value in (("case0", 60.0), ("case1", 300.0)):
        vol = np.full((12, 12, 3), -1000.0, np.float32)
        lab = np.zeros(vol.shape, np.int16)
        vol[2:6, 2:6, 1] = value
        lab[2:6, 2:6, 1] = 1
        (tmp_path / case).mkdir()
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / case / "imaging.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / case / "seg.nii.gz"))

    def build(case):
        return run_cli("build", "nifti", "--volume", tmp_path / case / "imaging.nii.gz", "--label-volume",
                       tmp_path / case / "seg.nii.gz", "--labels", "1=cyst", "--window", "abdomen",
                       "--image-out", tmp_path / "slices", "--out", tmp_path / f"{case}.json")

    assert build("case0") == 0
    before = (tmp_path / "slices" / "imaging_axial0001.png").read_bytes()
    assert build("case0") == 0  # the same slices again: fine
    assert build("case1") == 2
    assert "imaging_axial0001.png: already exists with other content" in capsys.readouterr().err
    assert (tmp_path / "slices" / "imaging_axial0001.png").read_bytes() == before


@pytest.mark.parametrize("case, match", [
    ("coco_normalised", r"coco\.json: every bbox lies within \[0, 1\]: they look normalised"),
    ("coco_nan", r"coco\.json: annotations\[1\]: box \[nan, .* is empty or outside"),
    ("synth_n", r"n must be at least 2"),
    ("out_is_folder", r"o\.json: is a folder; give the output file's name"),
    ("split_out_is_file", r"File exists: .*sp'"),
    ("coco_without_annotations", r"coco\.json: nothing to build \(no annotated object"),
    ("empty_masks", r"masks: nothing to build"),
    ("csv_unquoted_comma", r"r\.csv: record 2 \(line 3\) has 3 cells for the header's 2; quote text"),
])
def test_more_bad_inputs_are_one_error_line(tmp_path, capsys, case, match):
    save_grey(tmp_path / "a.png", (32, 32))
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}], "categories": [{"id": 1, "name": "nodule"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                             "bbox": [0.1, 0.2, 0.3, 0.25] if case == "coco_normalised" else [float("nan"), 2, 4, 4]}]}
    if case == "coco_without_annotations":
        coco["annotations"] = []
    (tmp_path / "coco.json").write_text(json.dumps(coco), encoding="utf-8")
    save_grey(tmp_path / "masks" / "a.png", (32, 32), value=0)  # no labelled pixel
    vqa = write_json(tmp_path / "vqa.json", [{"question": "q?", "answer": "a"}])
    (tmp_path / "r.csv").write_text('image,report\na.png,"Normal, fine."\na.png,Normal heart, clear lungs.\n'
                                    'a.png,Trailing empty cell.,\n', encoding="utf-8")
    data = write_json(tmp_path / "d.json", [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    (tmp_path / "o.json").mkdir()
    (tmp_path / "sp").write_text("a file", encoding="utf-8")
    argv = {
        "coco_normalised": ("build", "coco", "--annotations", tmp_path / "coco.json", "--out", tmp_path / "g.json"),
        "coco_nan": ("build", "coco", "--annotations", tmp_path / "coco.json", "--out", tmp_path / "g.json"),
        "synth_n": ("synth", "--out", tmp_path / "s", "--n", "1"),
        "out_is_folder": ("build", "vqa", "--table", vqa, "--out", tmp_path / "o.json"),
        "split_out_is_file": ("split", data, "--out", tmp_path / "sp"),
        "coco_without_annotations": ("build", "coco", "--annotations", tmp_path / "coco.json", "--out", tmp_path / "g.json"),
        "csv_unquoted_comma": ("build", "reports", "--table", tmp_path / "r.csv", "--out", tmp_path / "g.json"),
        "empty_masks": ("build", "masks", "--images", tmp_path, "--masks", tmp_path / "masks", "--labels", "1=x",
                        "--out", tmp_path / "g.json"),
    }[case]
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and re.search(match, err), err


def test_split_keeps_an_image_in_one_split_across_spellings_and_multi_image_records(tmp_path):
    from mmedagent.protocol import Record

    def rec(rid, image):
        return Record(id=rid, image=image, conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])

    records = [rec(f"r{k}", f"img/{k}.png") for k in range(30)]
    records += [rec("dup", "./img/3.png"), rec("pair", ["img/7.png", "img/8.png"])]
    for seed in range(5):
        parts = builders.split_by_image(records, (0.4, 0.3, 0.3), seed=seed)
        where = {r.id: name for name, recs in parts.items() for r in recs}
        assert len(where) == len(records)
        assert where["dup"] == where["r3"] and where["pair"] == where["r7"] == where["r8"]


@pytest.mark.parametrize("suffix, plane", [(".nii.gz", "axial"), (".nii", "coronal"), (".nii.gz", "sagittal")])
def test_nifti_label_volume_reads_each_file_once_and_slices_as_load_image_does(tmp_path, suffix, plane):
    """Every slice of a .nii.gz read by path inflates the file again (minutes for a CT): each volume is read
    once, and the slices and masks are those ``load_image`` gives of the files, in any orientation."""
    import sys

    from mmedagent.imaging import load_image

    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, (10, 9, 8)).astype(np.int16)
    lab = np.zeros(vol.shape, np.int16)
    lab[2:6, 3:7, 1:7] = 1
    lab[6:8, 1:3, 4:6] = 2
    affine = np.array([[0, 0, -2.0, 40], [-1.5, 0, 0, 20], [0, 1.2, 0, -10], [0, 0, 0, 1]])  # not RAS: reoriented
    image = nib.Nifti1Image(vol, affine)
    image.header.set_slope_inter(0.5, -20)  # stored scaled: the values are the scaled ones
    vol_path, lab_path = tmp_path / f"ct{suffix}", tmp_path / f"seg{suffix}"
    nib.save(image, str(vol_path))
    nib.save(nib.Nifti1Image(lab, affine), str(lab_path))

    opened = []
    watched = {str(vol_path), str(lab_path)}
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and str(args[0]) in watched
                     else None)
    examples = builders.read_nifti_labels(vol_path, lab_path, {1: "liver", 2: "tumor"}, tmp_path / "slices",
                                          window="abdomen", plane=plane, tasks=("segmentation",))
    assert sorted(opened) == sorted(watched)  # each file once
    watched.clear()

    n = load_image(lab_path, plane=plane).metadata["n_slices"]
    labelled = [k for k in range(n) if load_image(lab_path, slice_index=k, plane=plane).array.any()]
    names = [f"ct_{plane}{k:04d}.png" for k in labelled]
    assert sorted(p.name for p in (tmp_path / "slices").iterdir()) == names
    for k, name in zip(labelled, names):
        want = load_image(vol_path, window="abdomen", slice_index=k, plane=plane).image
        assert np.array_equal(np.asarray(Image.open(tmp_path / "slices" / name)), np.asarray(want))
    expected = []
    for k, name in zip(labelled, names):
        mask = np.rint(load_image(lab_path, slice_index=k, plane=plane).array).astype(np.int64)
        expected += builders._mask_examples(mask, {1: "liver", 2: "tumor"}, name, f"{lab_path}: slice {k}",
                                            ("segmentation",))
    assert examples == expected and len({e.image for e in examples}) == len(labelled) > 1


def test_nifti_label_volume_bad_gzip_is_named(tmp_path):
    lab = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.int16), np.eye(4)), str(lab))
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(lab.read_bytes()[:40])  # a truncated download
    with pytest.raises(DataError, match=rf"{bad}: cannot read NIfTI file: "):
        builders.read_nifti_labels(bad, lab, {1: "liver"}, tmp_path / "slices")
