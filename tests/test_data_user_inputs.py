"""Data builders and checker on a user's own inputs: photos with an EXIF orientation, DICOM images, label-name
files, hand-written MMedAgent records."""

import json
import re
import shutil
import warnings

import numpy as np
import pydicom.data
import pytest
from _data_fixtures import save_grey, write_json
from PIL import Image

from mmedagent.data import builders
from mmedagent.data.__main__ import main
from mmedagent.data.check import check_file
from mmedagent.data.formats import DataError


def exif_photo(path, orientation, size=(40, 20)):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size).save(path, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_coco_boxes_drawn_on_a_photos_stored_pixels_are_turned_with_it(tmp_path, orientation, caplog):
    """A COCO file whose width/height are a photo's stored 40x20 (annotated on the stored pixels, as tools that
    ignore EXIF do) gets the box the same region has as a mask on those pixels: where the model sees it
    upright (it was normalised in the stored frame: a box elsewhere on the image the model is shown)."""
    exif_photo(tmp_path / "imgs" / "p.png", orientation)
    x, y, w, h = 2, 3, 10, 5
    ann = {"images": [{"id": 1, "file_name": "p.png", "width": 40, "height": 20}],
           "categories": [{"id": 1, "name": "lesion"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h]}]}
    coco = builders.read_coco(write_json(tmp_path / "ann.json", ann), tmp_path / "imgs")
    mask = np.zeros((20, 40), np.uint8)
    mask[y:y + h, x:x + w] = 1
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "p.png")
    masks = builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "lesion"}, tasks=("segmentation",))
    assert coco[0].targets[0].box == masks[0].targets[0].box
    assert coco[0].targets[0].box != [0.05, 0.15, 0.3, 0.4]  # the stored frame's box
    assert "boxes were turned with the image" in caplog.text


def test_coco_boxes_of_the_upright_size_are_not_turned(tmp_path, caplog):
    exif_photo(tmp_path / "imgs" / "p.png", 6)
    ann = {"images": [{"id": 1, "file_name": "p.png", "width": 20, "height": 40}],
           "categories": [{"id": 1, "name": "lesion"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 4, 10, 8]}]}
    coco = builders.read_coco(write_json(tmp_path / "ann.json", ann), tmp_path / "imgs")
    assert coco[0].targets[0].box == [0.1, 0.1, 0.6, 0.3]
    assert "turned" not in caplog.text


@pytest.mark.parametrize("image, annotation, match", [
    ({"width": 1e400}, {}, r"images\[1\]: width and height must be positive numbers"),
    ({"width": True}, {}, r"images\[1\]: width and height must be positive numbers"),
    ({"width": 0.5}, {}, r"images\[1\]: width and height must be positive numbers"),
    ({}, {"area": 1e400}, r"annotations\[1\]: area must be a number"),
])
def test_coco_non_finite_numbers_are_one_error_line(tmp_path, image, annotation, match, capsys):
    """JSON's 1e400 reads as infinity: it was an OverflowError traceback; ``true`` was taken as a 1-pixel width."""
    save_grey(tmp_path / "imgs" / "a.png", (40, 20))
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20, **image}],
           "categories": [{"id": 1, "name": "lesion"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], **annotation}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann).replace("Infinity", "1e400"), encoding="utf-8")
    with pytest.raises(DataError, match=match):
        builders.read_coco(path, tmp_path / "imgs")
    assert main(["build", "coco", "--annotations", str(path), "--image-root", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def dicom_image(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(pydicom.data.get_testdata_file(name), folder / name)


def test_a_dicom_images_mask_is_checked_against_its_size(tmp_path):
    """A mask of the wrong orientation for a 484x300 DICOM image names the size mismatch (it was "cannot identify
    image file", Pillow asked for the DICOM's EXIF orientation)."""
    dicom_image(tmp_path / "imgs", "examples_overlay.dcm")
    (tmp_path / "masks").mkdir()
    mask = np.zeros((484, 300), np.uint8)
    mask[5:15, 20:40] = 1
    Image.fromarray(mask).save(tmp_path / "masks" / "examples_overlay.png")
    with pytest.raises(DataError, match="mask is 300x484 but the image is 484x300"):
        builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "lesion"})
    Image.fromarray(mask.T.copy()).save(tmp_path / "masks" / "examples_overlay.png")
    exs = builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "lesion"}, tasks=("segmentation",))
    assert exs[0].targets[0].box == [0.01, 0.07, 0.03, 0.13]


def test_a_dicom_image_is_not_opened_as_a_tiff(tmp_path):
    """Pillow took CT_small.dcm's preamble for a TIFF and printed "Corrupt EXIF data" warnings at the user."""
    dicom_image(tmp_path / "imgs", "CT_small.dcm")
    (tmp_path / "masks").mkdir()
    mask = np.zeros((128, 128), np.uint8)
    mask[10:20, 30:50] = 1
    Image.fromarray(mask).save(tmp_path / "masks" / "CT_small.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exs = builders.read_mask_pngs(tmp_path / "imgs", tmp_path / "masks", {1: "lesion"}, tasks=("segmentation",))
    assert exs[0].targets[0].box == [0.23, 0.08, 0.39, 0.16]


@pytest.mark.parametrize("names, shown", [({"1": "liver", "2": ""}, "''"), ({"1": ["liver"]}, "['liver']"),
                                          (["background", None], "None")])
def test_label_names_must_be_text(tmp_path, names, shown):
    """An empty or non-text name became an empty prompt or the text "['liver']" in every record."""
    path = write_json(tmp_path / "labels.json", names)
    match = rf"labels.json: the name of label \d must be non-empty text, found {re.escape(shown)}"
    with pytest.raises(DataError, match=match):
        builders.parse_label_names(str(path))


def test_nifti_step_below_one_is_an_error(tmp_path):
    with pytest.raises(DataError, match="--step 0: give 1"):
        builders.read_nifti_labels(tmp_path / "v.nii", tmp_path / "l.nii", {1: "liver"}, tmp_path / "out", step=0)


OUTPUT = "MedSAM output: {'boxes': [[0.1, 0.1, 0.2, 0.2]]}"


def mmedagent_record(actions, result):
    return {"id": "r", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nSegment the lesion."},
        {"from": "gpt", "thoughts": "I use a tool.", "actions": actions, "value": "Please wait."},
        {"from": "human", "value": f"{result}\n\nAnswer my first question: Segment the lesion."},
        {"from": "gpt", "thoughts": "Done.", "actions": [], "value": "Here it is."}]}


def test_check_flags_tool_output_after_a_turn_without_a_call(tmp_path):
    """A tool output the turn before never asked for (actions [] or null) trained the model to answer from it."""
    for actions in ([], None):
        path = write_json(tmp_path / "d.json", [mmedagent_record(actions, OUTPUT)])
        report = check_file(path)
        assert report.problems == [f"{path}: record 1: turn 3 carries tool output, but the turn before calls no tool"]


def test_check_reports_a_turn_that_does_not_re_parse_once(tmp_path):
    """Its tool output was reported too, as output after a turn that calls no tool."""
    call = {"API_name": "MedSAM", "API_params": {"boxes": [[0.1, 0.1, 0.2, 0.2]]}}
    record = mmedagent_record([call], OUTPUT)
    record["conversations"][1]["thoughts"] = 'I write "value👉" early.'
    path = write_json(tmp_path / "d.json", [record])
    problems = check_file(path).problems
    assert len(problems) == 1 and "turn 2 does not re-parse" in problems[0], problems


def test_check_warns_of_a_real_path_in_a_calls_image_parameter(tmp_path):
    """A path in API_params.image teaches the model to write paths (the agent writes <imagepath>); the path itself,
    which may name a patient, is not quoted."""
    call = {"API_name": "MedSAM", "API_params": {"image": "/data/smith_john/ct.png", "boxes": [[0.1, 0.1, 0.2, 0.2]]}}
    path = write_json(tmp_path / "d.json", [mmedagent_record([call], OUTPUT)])
    report = check_file(path)
    assert report.ok
    assert len(report.warnings) == 1 and "turn 2: MedSAM's image parameter is not '<imagepath>'" in report.warnings[0]
    assert "smith" not in report.warnings[0]
    call["API_params"]["image"] = "<imagepath>"
    path = write_json(tmp_path / "d.json", [mmedagent_record([call], OUTPUT)])
    assert check_file(path).warnings == []


def test_coco_over_an_image_past_pillows_bomb_limit_is_no_traceback(tmp_path, monkeypatch):
    """The EXIF check opened every image with a given size: one past Pillow's decompression-bomb limit ended
    the build in a DecompressionBombError traceback."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 2x that is Pillow's hard limit: 200 pixels
    save_grey(tmp_path / "imgs" / "big.png", (40, 20))
    ann = {"images": [{"id": 1, "file_name": "big.png", "width": 40, "height": 20}],
           "categories": [{"id": 1, "name": "lesion"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8]}]}
    coco = builders.read_coco(write_json(tmp_path / "ann.json", ann), tmp_path / "imgs")
    assert coco[0].targets[0].box == [0.05, 0.1, 0.3, 0.5]


def planning_record(*names):
    return {"id": "r", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nSegment the lesion."},
        {"from": "gpt", "thoughts": "I use a tool.", "value": "Please wait.",
         "actions": [{"API_name": n, "API_params": {"boxes": [[0.1, 0.1, 0.2, 0.2]]}} for n in names]}]}


def test_check_counts_calls_by_tool_and_suggests_the_tool_an_unknown_name_is_a_typo_of(tmp_path, capsys):
    """'segmentaton' was only 'not validated', and MedSAM / SAM / segmentation were three tools in the counts."""
    path = write_json(tmp_path / "d.json", [planning_record("MedSAM", "segmentaton"), planning_record("SAM"),
                                            planning_record("segmentation", "pizza_order")])
    assert main(["--check", str(path)]) == 0  # still no problem: a tool of another installation
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: 3 records, 0 problem(s); tool calls: pizza_order: 1, segmentation: 3, segmentaton: 1"
    assert "not validated (no such tool registered here): pizza_order, segmentaton (did you mean 'segmentation'?)" in out
    tie = write_json(tmp_path / "tie.json", [planning_record("ChatCAD")])  # as close to ChatCAD-G as to ChatCAD-R
    assert main(["--check", str(tie)]) == 0
    assert "not validated (no such tool registered here): ChatCAD" in capsys.readouterr().out.splitlines()


def test_check_keeps_an_image_folder_given_before_the_check_command(tmp_path, capsys):
    """``--image-folder DIR check FILE`` dropped DIR: images went unchecked and a missing one passed."""
    path = write_json(tmp_path / "d.json", [planning_record("segmentation")])
    assert main(["--image-folder", str(tmp_path), "check", str(path)]) == 1
    assert f"{path}: record 1: image not found" in capsys.readouterr().err
