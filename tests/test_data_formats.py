"""mmedagent.data.formats: reading MMedAgent/LLaVA, sharegpt, Alpaca and HF data; writers; round trips."""

import json

import numpy as np
import pytest
from PIL import Image

from mmedagent.data.formats import (DataError, convert, from_sharegpt, iter_records, read_records, to_sharegpt,
                                    write_records)
from mmedagent.protocol import IMAGE_TOKEN, Record, parse_tool_results, parse_turn

MMEDAGENT_RECORD = {
    "id": "m1",
    "image": "scans/brain.jpg",
    "conversations": [
        {"from": "human", "value": "<image>\nCan you locate the tumor in this MRI image?"},
        {"from": "gpt", "thoughts": "Grounding finds it.",
         "actions": [{"API_name": "grounding dino", "API_params": {"image": "<imagepath>", "prompts": ["tumor"]}}],
         "value": "I will locate it. Please wait."},
        {"from": "human", "value": "grounding dino output: {'boxes': [[0.41, 0.54, 0.76, 0.75]], 'logits': [0.95], "
                                   "'phrases': ['tumor']}\n\nAnswer my first question: Can you locate the tumor in this MRI image?"},
        {"from": "gpt", "thoughts": "Done.", "actions": [], "value": "The tumor is at [0.41, 0.54, 0.76, 0.75]."},
    ],
}


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_mmedagent_json_array_and_named_jsonl(tmp_path):
    a = write_json(tmp_path / "a.json", [MMEDAGENT_RECORD])
    b = write_json(tmp_path / "b.jsonl", [MMEDAGENT_RECORD])  # MMedAgent's ".jsonl" is a JSON array
    for p in (a, b):
        (rec,) = read_records(p)
        assert rec.id == "m1" and rec.image == "scans/brain.jpg"
        gpt = rec.conversations[1]
        assert gpt.actions[0].API_name == "grounding dino" and gpt.actions[0].API_params["prompts"] == ["tumor"]
        assert parse_tool_results(rec.conversations[2].value).outcomes[0].output["logits"] == [0.95]


def test_jsonl_and_comma_separated_lists(tmp_path):
    lines = tmp_path / "c.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}
            for i in range(3)]
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    a = write_json(tmp_path / "a.json", [MMEDAGENT_RECORD])
    recs = read_records(f"{a},{lines}")
    assert len(recs) == 4
    assert [r.id for r in recs[1:]] == ["c-1", "c-2", "c-3"]  # ids given where missing
    assert recs[1].image is None and recs[1].conversations[1].value == "Answer 0."


def test_sharegpt_messages_with_parts_and_tags(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "<image>What modality is this?"},
                      {"role": "assistant", "content": "A chest X-ray."}], "images": ["x.png"]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A CT slice."}]}],
         "images": ["y.png"]},
        {"messages": [{"role": "user", "content": "Compare."}, {"role": "assistant", "content": "Same."}],
         "images": ["p.png", "q.png"]},
    ]
    recs = read_records(write_json(tmp_path / "s.json", rows))
    assert recs[0].image == "x.png" and recs[0].conversations[0].value.startswith(IMAGE_TOKEN)
    assert recs[1].conversations[0].role == "system"
    assert recs[1].conversations[1].value == f"{IMAGE_TOKEN}\nDescribe it."
    assert recs[2].image == ["p.png", "q.png"] and recs[2].conversations[0].value.count(IMAGE_TOKEN) == 2


def test_a_records_one_image_tag_goes_to_the_start_of_its_turn_as_llava_trains_and_serving_places_it(tmp_path):
    """A question with the tag after it (or inside it) was trained in that layout, while serving puts the image
    first; a tag without an image says the image field is empty."""
    rows = [{"image": "x.png", "conversations": [{"from": "human", "value": "What modality is this? <image>"},
                                                 {"from": "gpt", "value": "CT."}]},
            {"image": "y.png", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."},
                                                 {"from": "human", "value": "Look:\n<image>\nWhat is it?"},
                                                 {"from": "gpt", "value": "An MRI."}]}]
    first, later = read_records(write_json(tmp_path / "t.json", rows))
    assert first.conversations[0].value == f"{IMAGE_TOKEN}\nWhat modality is this?"
    assert later.conversations[2].value == f"{IMAGE_TOKEN}\nLook:\nWhat is it?"  # in its own turn still
    rows[0]["image"] = ""
    with pytest.raises(DataError, match=r"1 <image> tag\(s\) but no image: the record's image field is empty"):
        read_records(write_json(tmp_path / "e.json", rows[:1]))


def test_llamafactory_function_call_and_observation(tmp_path):
    row = {"conversations": [
        {"from": "human", "value": "<image>Where is the nodule?"},
        {"from": "function_call", "value": json.dumps({"name": "grounding", "arguments": {"prompts": ["nodule"]}})},
        {"from": "observation", "value": json.dumps({"boxes": [[0.1, 0.2, 0.3, 0.4]]})},
        {"from": "gpt", "value": "Upper left."}], "images": ["n.png"]}
    (rec,) = read_records(write_json(tmp_path / "f.json", [row]))
    assert rec.conversations[1].actions[0].API_name == "grounding"
    res = parse_tool_results(rec.conversations[2].value)
    assert res.question == "Where is the nodule?" and res.outcomes[0].output == {"boxes": [[0.1, 0.2, 0.3, 0.4]]}


def test_alpaca_and_text_only(tmp_path):
    rows = [{"instruction": "Define anemia.", "input": "", "output": "Low haemoglobin."},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    recs = read_records(write_json(tmp_path / "t.json", rows))
    assert recs[0].conversations[0].value == "Define anemia." and recs[0].image is None
    assert recs[1].conversations[1].value == "Hello"


def test_turn_markers_in_plain_text_become_tool_turns(tmp_path):
    text = '"thoughts🤔" look\n"actions🚀" [{\'API_name\': \'MedSAM\', \'API_params\': {\'boxes\': [[0.1, 0.1, 0.5, 0.5]]}}]\n"value👉" wait'
    rows = [{"conversations": [{"from": "human", "value": "Segment it"}, {"from": "gpt", "value": text}]}]
    (rec,) = read_records(write_json(tmp_path / "p.json", rows))
    gpt = rec.conversations[1]
    assert gpt.actions[0].API_name == "MedSAM" and gpt.thoughts == "look" and gpt.value == "wait"
    bad = [{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": '"actions🚀" [oops\n"value👉" v'}]}]
    with pytest.raises(DataError, match=r"bad\.json: record 1: .*turn markers"):
        read_records(write_json(tmp_path / "bad.json", bad))


@pytest.mark.parametrize(
    "content, match",
    [
        ('[{"conversations": []}, ', r"invalid JSON at line 1"),
        ('[{"conversations": [{"from": "robot", "value": "x"}]}]', r"record 1: turn 1 has unknown role"),
        ('[{"id": 1, "conversations": [{"from": "human", "value": "q"}]}, {"foo": 1}]', r"record 2: no conversations"),
        ('[{"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>q"}]}]', r"record 1: 2 <image> tag"),
        ('[{"image": "a.png", "caption": "  "}]', r"record 1: empty caption"),
        ('[3]', r"record 1: a record must be a JSON object"),
    ],
)
def test_errors_name_file_and_record(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        read_records(p)
    assert "bad.json" in str(e.value)
    assert issubclass(DataError, ValueError)


def test_jsonl_error_names_line(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"conversations": [{"from": "human", "value": "q"}]}\n{broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"l\.jsonl: record 2 \(line 2\)"):
        read_records(p)
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "missing.json")


def test_check_images(tmp_path):
    """A missing image names the file looked for and the folder paths start from: the data file's folder
    (and the flag that says otherwise) or the --image-folder given."""
    p = write_json(tmp_path / "a.json", [MMEDAGENT_RECORD])
    with pytest.raises(DataError, match="record 1: image not found: scans/brain.jpg") as e:
        read_records(p, check_images=True)
    assert f"looked for {tmp_path / 'scans' / 'brain.jpg'}, beside the data file; give --image-folder DIR" in str(e.value)
    with pytest.raises(DataError, match="record 1: image not found: scans/brain.jpg") as e:
        read_records(p, image_folder=tmp_path / "imgs", check_images=True)
    assert f"looked for {tmp_path / 'imgs' / 'scans' / 'brain.jpg'}; is --image-folder {tmp_path / 'imgs'}" in str(e.value)
    (tmp_path / "scans").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "scans" / "brain.jpg")
    assert len(read_records(p, image_folder=tmp_path, check_images=True)) == 1


def test_round_trip_llava_sharegpt_llava(tmp_path):
    rec = Record.from_dict(MMEDAGENT_RECORD)
    sg = to_sharegpt(rec)
    assert sg["images"] == ["scans/brain.jpg"] and sg["messages"][1]["role"] == "assistant"
    assert parse_turn(sg["messages"][1]["content"]).actions[0].API_name == "grounding dino"
    assert from_sharegpt(sg).to_dict() == rec.to_dict()
    # through files, both layouts and both suffixes
    write_records([rec], tmp_path / "sg.jsonl", fmt="sharegpt")
    assert convert(tmp_path / "sg.jsonl", tmp_path / "back.json", fmt="llava") == 1
    back = json.loads((tmp_path / "back.json").read_text())
    assert back == [rec.to_dict()]
    write_records([rec], tmp_path / "ll.json")
    convert(tmp_path / "ll.json", tmp_path / "sg2.json", fmt="sharegpt")
    assert json.loads((tmp_path / "sg2.json").read_text()) == [sg]
    with pytest.raises(ValueError, match="unknown format"):
        write_records([rec], tmp_path / "x.json", fmt="alpaca")


@pytest.fixture(scope="module")
def caption_dataset(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "id": ["a/1", "b 2", "c3"], "caption": ["Chest X-ray, normal.", "Brain MRI.", "Abdomen CT."]},
        features=datasets.Features({"image": datasets.Image(), "id": datasets.Value("string"), "caption": datasets.Value("string")}),
    )
    ds.save_to_disk(str(root / "medtrinity"))
    ds.to_parquet(str(root / "radiology.parquet"))
    return root, images


def test_hf_saved_dataset_image_caption(caption_dataset, tmp_path):
    root, images = caption_dataset
    recs = read_records(root / "medtrinity", image_folder=tmp_path / "img")
    assert [r.conversations[1].value for r in recs] == ["Chest X-ray, normal.", "Brain MRI.", "Abdomen CT."]
    assert recs[0].image == "00000001_a_1.png" and recs[1].image == "00000002_b_2.png"  # row number: unique names
    assert np.array_equal(np.asarray(Image.open(tmp_path / "img" / "00000001_a_1.png")), np.asarray(images[0]))
    assert all(r.conversations[0].value.startswith(IMAGE_TOKEN + "\n") for r in recs)
    assert recs[0].conversations[1].actions == []  # a direct answer: no tool


def test_hf_parquet_default_export_folder(caption_dataset):
    root, _ = caption_dataset
    recs = read_records(root / "radiology.parquet")
    assert len(recs) == 3
    from pathlib import Path

    assert Path(recs[2].image).is_absolute() and Path(recs[2].image).is_file()
    assert Path(recs[2].image).parent.name == "radiology_images"


# --------------------------------------------------------------------------- fixes: reading back, errors, streaming

TEXT_RECORD = {"id": "t1", "conversations": [{"from": "human", "value": "What is\u2028 this?\u0085 And\u000b that?"},
                                             {"from": "gpt", "value": "A line\u2029 separator."}]}


def test_jsonl_with_unicode_line_breaks_in_strings_reads_back(tmp_path):
    src = write_json(tmp_path / "ls.json", [TEXT_RECORD, MMEDAGENT_RECORD])
    assert convert(src, tmp_path / "ls.jsonl", fmt="sharegpt") == 2
    assert "\u2028" in (tmp_path / "ls.jsonl").read_text(encoding="utf-8")  # written raw (ensure_ascii=False)
    back = read_records(tmp_path / "ls.jsonl")
    assert [r.to_dict() for r in back] == [r.to_dict() for r in read_records(src)]
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(("\ufeff" + json.dumps(TEXT_RECORD, ensure_ascii=False) + "\r\n\r\n").encode())
    assert read_records(crlf)[0].conversations[0].value == TEXT_RECORD["conversations"][0]["value"]


def test_syntax_error_in_pretty_printed_object_names_its_line(tmp_path):
    text = json.dumps({"data": [MMEDAGENT_RECORD, MMEDAGENT_RECORD]}, indent=2).splitlines()
    text[30] += " ,,"
    for name in ("wrapped.json", "wrapped.jsonl"):
        p = tmp_path / name
        p.write_text("\n".join(text), encoding="utf-8")
        with pytest.raises(DataError, match=r"invalid JSON at line 31 column") as e:
            read_records(p)
        assert "record 1" not in str(e.value)
    ok = tmp_path / "ok.jsonl"  # a pretty-printed object is read whatever the name
    ok.write_text(json.dumps({"data": [MMEDAGENT_RECORD]}, indent=2), encoding="utf-8")
    assert len(read_records(ok)) == 1
    one_line = write_json(tmp_path / "one.json", {"records": [MMEDAGENT_RECORD, MMEDAGENT_RECORD]})
    assert len(read_records(one_line)) == 2
    bad_first = tmp_path / "bf.jsonl"  # JSON lines whose first line is broken: still JSON lines
    bad_first.write_text('{"broken": \n' + json.dumps(MMEDAGENT_RECORD) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1 \(line 1\): invalid JSON"):
        read_records(bad_first)


def test_convert_streams_jsonl_record_by_record(tmp_path, monkeypatch):
    """convert never holds a JSON-lines file whole: each record is written before the next is parsed."""
    import mmedagent.data.formats as formats

    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({**MMEDAGENT_RECORD, "id": f"r{i}"}) + "\n" for i in range(5)), encoding="utf-8")
    events = []
    real_from_any, real_dict = formats.record_from_any, Record.to_dict
    monkeypatch.setattr(formats, "record_from_any", lambda row, *a, **k: events.append("read") or real_from_any(row, *a, **k))
    monkeypatch.setattr(Record, "to_dict", lambda self, *a, **k: events.append("write") or real_dict(self, *a, **k))
    monkeypatch.setattr(type(src), "read_text", lambda *a, **k: pytest.fail("JSON lines read whole"))
    assert convert(src, src, fmt="llava") == 5  # in place: the output replaces the input at the end
    assert events == ["read", "write"] * 5
    monkeypatch.undo()
    assert [r.id for r in read_records(src)] == [f"r{i}" for i in range(5)]
    assert convert(src, tmp_path / "big.json") == 5  # a JSON array, written record by record as json.dumps would
    assert (tmp_path / "big.json").read_text(encoding="utf-8") == json.dumps(
        [r.to_dict() for r in read_records(src)], ensure_ascii=False, indent=1) + "\n"


def test_check_reports_every_problem_and_counts_records(tmp_path, capsys):
    from mmedagent.data.__main__ import main

    (tmp_path / "imgs" / "scans").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "scans" / "brain.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    lone = {"conversations": [{"from": "human", "value": "Hi"}]}
    rows = [MMEDAGENT_RECORD, {**MMEDAGENT_RECORD, "image": "missing.png"}, lone,
            {**MMEDAGENT_RECORD, "image": str(tmp_path / "outside.png")}, {**MMEDAGENT_RECORD, "image": "../outside.png"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([json.dumps(rows[0]), json.dumps(rows[1]), "{broken", json.dumps(rows[2]),
                            json.dumps(rows[3]), json.dumps(rows[4])]) + "\n", encoding="utf-8")
    from mmedagent.data.check import check_file

    report = check_file(p, image_folder=tmp_path / "imgs")
    assert report.records == 6
    assert report.problems == [f"{p}: record 2: image not found: missing.png (looked for {tmp_path / 'imgs' / 'missing.png'}; "
                               f"is --image-folder {tmp_path / 'imgs'} the folder the data's image paths are relative to?)",
                               f"{p}: record 3 (line 3): invalid JSON at column 2: Expecting property name enclosed in double quotes",
                               f"{p}: record 4: no assistant turn to learn from"]
    assert len(report.warnings) == 2  # training takes these, but they leave the image folder
    assert "record 5: image " in report.warnings[0] and "outside --image-folder" in report.warnings[0]
    assert "record 6: image ../outside.png lies outside" in report.warnings[1]
    assert main(["check", str(p), "--image-folder", str(tmp_path / "imgs")]) == 1
    captured = capsys.readouterr()
    assert "6 records, 3 problem(s), 2 warning(s)" in captured.out
    assert "warning:" in captured.err and "record 2: image not found" in captured.err
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[3]) + "\n", encoding="utf-8")
    assert main(["check", str(good), "--image-folder", str(tmp_path / "imgs")]) == 0  # warnings only


def test_check_with_the_current_folder_as_image_folder_warns_of_nothing(tmp_path, monkeypatch):
    from mmedagent.data.check import check_file

    (tmp_path / "imgs" / "scans").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "scans" / "brain.jpg")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(MMEDAGENT_RECORD) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path / "imgs")
    report = check_file(p, image_folder=".")
    assert report.problems == [] and report.warnings == []


def test_data_cli_reads_the_chosen_split_of_a_saved_dataset_dict(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from mmedagent.data.__main__ import main

    rows = {s: {"instruction": [f"{s} question {i}" for i in range(n)], "output": ["answer"] * n}
            for s, n in (("validation", 2), ("test", 3))}
    datasets.DatasetDict({s: datasets.Dataset.from_dict(r) for s, r in rows.items()}).save_to_disk(str(tmp_path / "dd"))

    assert main(["convert", str(tmp_path / "dd"), str(tmp_path / "test.json"), "--data-split", "test[1:]"]) == 0
    assert [r.first_question() for r in read_records(tmp_path / "test.json")] == ["test question 1", "test question 2"]
    assert [r.first_question() for r in read_records(tmp_path / "dd", split="validation")] == [
        "validation question 0", "validation question 1"]
    # no train split and several others: one is chosen by name, never all of them mixed into one file
    assert main(["check", str(tmp_path / "dd")]) == 1
    assert "no split 'train'; it has validation, test (use --data-split)" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "dd"), "--data-split", "validation"]) == 0
    assert "2 records, 0 problem(s)" in capsys.readouterr().out
    write_json(tmp_path / "plain.json", [{"instruction": "q", "output": "a"}])
    assert main(["convert", str(tmp_path / "plain.json"), str(tmp_path / "o.json"), "--data-split", "test"]) == 2
    assert "--data-split 'test' applies to Hugging Face datasets and parquet data only" in capsys.readouterr().err


def test_the_filled_image_field_is_taken_and_an_empty_one_is_no_image(tmp_path):
    """``"images": null`` beside ``"image": "a.png"`` (pandas / LLaMA-Factory exports) keeps the image, even
    without an ``<image>`` tag; ``"image": ""`` is a text-only record, not an image named ""."""
    turns = [{"from": "human", "value": "Is there a nodule?"}, {"from": "gpt", "value": "No."}]
    p = write_json(tmp_path / "d.json", [{"id": "a", "images": None, "image": "a.png", "conversations": turns},
                                         {"id": "b", "image": "", "conversations": turns},
                                         {"id": "c", "images": [], "image": "c.png", "conversations": turns}])
    a, b, c = read_records(p)
    assert a.images == ["a.png"] and a.conversations[0].value == f"{IMAGE_TOKEN}\nIs there a nodule?"
    assert b.images == [] and b.conversations[0].value == "Is there a nodule?"
    assert c.images == ["c.png"]


def test_check_reports_image_files_that_are_not_images(tmp_path, capsys):
    """A Git LFS pointer (a data set cloned without ``git lfs``) exists but training cannot decode it: a
    problem for ``check --image-folder``, found before training starts. The voxel half of a NIfTI .hdr/.img
    pair is an image (training loads it through its header)."""
    import nibabel as nib

    from mmedagent.data.__main__ import main

    Image.new("L", (8, 8)).save(tmp_path / "ok.png")
    nib.save(nib.Nifti1Pair(np.zeros((8, 8, 3), np.int16), np.eye(4)), tmp_path / "ct.img")
    (tmp_path / "lfs.png").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A scan."}]
    names = ("ok.png", "lfs.png", "lfs.png", "ct.img")
    p = write_json(tmp_path / "d.json", [{"image": name, "conversations": turns} for name in names])
    assert main(["check", str(p), "--image-folder", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{p}: record {k}: a Git LFS pointer, not the image (fetch it: git lfs pull): lfs.png" for k in (2, 3)]


def test_llamafactory_system_column_and_alpaca_history_become_turns(tmp_path):
    """LLaMA-Factory's ``system`` column and Alpaca's ``history`` pairs are part of the dialogue: they become
    turns (training reads a first system turn), not fields that training never sees."""
    from mmedagent.data.formats import chat_messages

    rows = [{"instruction": "And its treatment?", "input": "", "output": "Allopurinol.", "system": "You are a rheumatologist.",
             "history": [["What causes gout?", "Uric acid crystals."]]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "system": "Be brief.",
             "tools": "[]"},
            {"instruction": "q", "output": "a", "history": "q0"}]
    p = write_json(tmp_path / "lf.json", rows)
    with pytest.raises(DataError, match=r"lf\.json: record 3: history must be a list of \[question, answer\] pairs"):
        read_records(p)
    write_json(p, rows[:2])
    alpaca, sharegpt = read_records(p)
    assert chat_messages(alpaca, "alpaca") == [
        {"role": "system", "content": "You are a rheumatologist."}, {"role": "user", "content": "What causes gout?"},
        {"role": "assistant", "content": "Uric acid crystals."}, {"role": "user", "content": "And its treatment?"},
        {"role": "assistant", "content": "Allopurinol."}]
    assert [m["role"] for m in chat_messages(sharegpt, "sharegpt")] == ["system", "user", "assistant"]
    assert "system" not in sharegpt.to_dict() and sharegpt.to_dict()["tools"] == "[]"
    write_records([sharegpt], tmp_path / "sg.json", fmt="sharegpt")  # and back: still one system turn
    (again,) = read_records(tmp_path / "sg.json")
    assert again.to_dict() == sharegpt.to_dict()


def test_null_instruction_fields_are_absent_and_a_missing_answer_names_the_record(tmp_path):
    from mmedagent.data.formats import record_from_any

    with pytest.raises(ValueError, match="no answer: the output field is null or missing"):
        record_from_any({"instruction": "Q", "input": None, "output": None}, "1")
    with pytest.raises(ValueError, match="no question: the instruction and input fields are null or empty"):
        record_from_any({"instruction": None, "output": "A"}, "1")
    rec = record_from_any({"instruction": None, "input": "What is shown?", "output": "A"}, "1")
    assert [m.value for m in rec.conversations] == ["What is shown?", "A"]
    # a table mixing layouts: the caption row's null instruction / output / messages cells are no fields
    rec = record_from_any({"image": "a.png", "caption": "Chest X-ray.", "instruction": None, "output": None,
                           "messages": None}, "1")
    assert rec.conversations[-1].value == "Chest X-ray."
    write_json(tmp_path / "d.json", [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": None}])
    with pytest.raises(DataError, match=r"d\.json: record 2: no answer"):
        read_records(tmp_path / "d.json")


def test_a_split_that_single_split_data_lacks_is_an_error(caption_dataset, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from mmedagent.data.__main__ import main

    root, _ = caption_dataset
    parquet, saved = root / "radiology.parquet", root / "medtrinity"
    for path in (parquet, saved):
        assert len(read_records(path, tmp_path / "img")) == 3  # the default split: the data
        assert len(read_records(path, tmp_path / "img", split="train[1:]")) == 2  # what datasets names it
        with pytest.raises(DataError, match=rf"{path}: no split 'test'; it holds one split, 'train' \(leave out"):
            read_records(path, tmp_path / "img", split="test")
    assert main(["check", str(parquet), "--data-split", "validation"]) == 1
    assert f"{parquet}: no split 'validation'; it holds one split, 'train'" in capsys.readouterr().err
    # data saved as its split, or named by it, is read by that name (and by the default)
    test_only = datasets.Dataset.from_dict({"instruction": ["q0", "q1"], "output": ["a", "b"]}, split="test")
    test_only.save_to_disk(str(tmp_path / "saved_test"))
    test_only.to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    for path in (tmp_path / "saved_test", tmp_path / "test-00000-of-00001.parquet"):
        assert [r.first_question() for r in read_records(path, split="test[1:]")] == ["q1"]
        assert len(read_records(path)) == len(read_records(path, split="train")) == 2
        with pytest.raises(DataError, match=r"no split 'validation'; it holds one split, 'test'"):
            read_records(path, split="validation")


def test_parquet_with_a_plain_binary_image_column_is_exported(tmp_path):
    """pandas / pyarrow write images as raw bytes (no HF Image feature): exported like any stored image;
    bytes that are not an image, or a value of another type, are errors naming the file and the record."""
    import io

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def png(value):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    path = tmp_path / "pandas.parquet"
    pq.write_table(pa.table({"image": pa.array([png(10), png(200)], pa.binary()), "caption": ["dark", "bright"]}),
                   str(path))
    recs = read_records(path, tmp_path / "img")
    assert [r.image for r in recs] == ["00000001.png", "00000002.png"]
    assert [(tmp_path / "img" / r.image).read_bytes() for r in recs] == [png(10), png(200)]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": pa.array([png(10), b"not an image"], pa.binary()), "caption": ["a", "b"]}),
                   str(bad))
    with pytest.raises(DataError, match=rf"{bad}: record 2: the stored image \(12 bytes\) is not an image"):
        read_records(bad, tmp_path / "img")
    problems = []
    assert len(list(iter_records(bad, tmp_path / "img", on_error=lambda e, _: problems.append(str(e))))) == 1
    assert problems == [f"{bad}: record 2: the stored image (12 bytes) is not an image: expected PNG, JPEG, BMP, "
                        "TIFF, GIF, WebP, DICOM or NIfTI content"]
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image": [7], "caption": ["x"]}), str(ints))
    with pytest.raises(DataError, match=rf"{ints}: record 1: cannot export an image of type int"):
        read_records(ints, tmp_path / "img")


def _openai_log():
    """An OpenAI chat-completions function-calling log: two calls in one turn, results out of order."""
    return {"messages": [
        {"role": "developer", "content": "You are a radiology assistant."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ct.png"}},
                                     {"type": "text", "text": "Where is the nodule, and what is it?"}]},
        {"role": "assistant", "content": "Ground it, then classify the image.", "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "grounding", "arguments": json.dumps({"image": "<imagepath>", "prompts": ["nodule"]})}},
            {"id": "call_b", "type": "function", "function": {"name": "BiomedClip", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "lung CT"},
        {"role": "tool", "tool_call_id": "call_a", "content": json.dumps({"boxes": [[0.1, 0.2, 0.3, 0.4]]})},
        {"role": "assistant", "content": "A nodule at [0.1, 0.2, 0.3, 0.4] on a lung CT."}],
        "images": ["ct.png"]}


def test_a_follow_up_questions_tool_results_repeat_that_question_as_the_agent_does(tmp_path):
    """A chat log with a follow-up ("Segment it.") that calls a tool: its results repeat the follow-up, which
    the agent repeats when serving it (training repeated the first question: another prompt than served);
    ``check`` takes either wording and flags a question never asked."""
    from mmedagent.data.check import check_file

    log = _openai_log()
    log["messages"] += [
        {"role": "user", "content": "Segment it."},
        {"role": "assistant", "content": "Segment the nodule.", "tool_calls": [
            {"id": "call_c", "type": "function", "function": {"name": "segmentation", "arguments": json.dumps(
                {"boxes": [[0.1, 0.2, 0.3, 0.4]]})}}]},
        {"role": "tool", "tool_call_id": "call_c", "content": json.dumps({"areas": [120]})},
        {"role": "assistant", "content": "The nodule covers 120 pixels."}]
    (rec,) = read_records(write_json(tmp_path / "log.json", [log]))
    assert parse_tool_results(rec.conversations[3].value).question == "Where is the nodule, and what is it?"
    assert parse_tool_results(rec.conversations[7].value).question == "Segment it."
    p = write_json(tmp_path / "rec.json", [rec.to_dict()])
    assert check_file(p, validate_tools=False).problems == []
    rec.conversations[3].value = rec.conversations[3].value.replace("Where is the nodule, and what is it?", "Hello?")
    rec.conversations[7].value = rec.conversations[7].value.replace("Segment it.", "Where is the nodule, and what is it?")
    problems = check_file(write_json(tmp_path / "bad.json", [rec.to_dict()]), validate_tools=False).problems
    assert len(problems) == 1 and "turn 4 repeats neither the question it answers nor the first" in problems[0]


def test_openai_tool_calls_log_becomes_a_tool_use_record(tmp_path):
    """OpenAI ``tool_calls`` + ``tool`` messages: one planning turn with both calls (its content the thought),
    one tool-result turn with the results in call order (JSON as output, plain text verbatim), the answer."""
    (rec,) = read_records(write_json(tmp_path / "log.json", [_openai_log()]))
    roles = [m.role for m in rec.conversations]
    assert roles == ["system", "human", "gpt", "human", "gpt"]
    plan = rec.conversations[2]
    assert plan.thoughts == "Ground it, then classify the image."
    assert [(a.API_name, a.API_params) for a in plan.actions] == [
        ("grounding", {"image": "<imagepath>", "prompts": ["nodule"]}), ("BiomedClip", {})]
    res = parse_tool_results(rec.conversations[3].value)
    assert res.question == "Where is the nodule, and what is it?"
    assert [(o.tool, o.output, o.text) for o in res.outcomes] == [
        ("grounding", {"boxes": [[0.1, 0.2, 0.3, 0.4]]}, None), ("BiomedClip", None, "lung CT")]
    assert rec.conversations[3].value.splitlines()[1] == "BiomedClip output: lung CT"
    assert rec.conversations[4].value == "A nodule at [0.1, 0.2, 0.3, 0.4] on a lung CT."
    # the legacy single function_call + "function" role reads the same way
    legacy = {"messages": [{"role": "user", "content": "Define I21.0."},
                           {"role": "assistant", "content": None,
                            "function_call": {"name": "retrieval", "arguments": '{"query": "I21.0"}'}},
                           {"role": "function", "name": "retrieval", "content": '{"passages": []}'},
                           {"role": "assistant", "content": "Not found."}]}
    (rec,) = read_records(write_json(tmp_path / "legacy.json", [legacy]))
    assert rec.conversations[1].actions[0].API_params == {"query": "I21.0"}
    assert parse_tool_results(rec.conversations[2].value).outcomes[0].output == {"passages": []}


@pytest.mark.parametrize("change, match", [
    (lambda m: m[3].update(tool_call_id="call_z"), r"record 1: turn 4: tool_call_id 'call_z' names no call"),
    (lambda m: m[2]["tool_calls"][0]["function"].update(arguments="{prompts: nodule"),
     r"turn 3: the arguments of tool call 'grounding' are not JSON"),
    (lambda m: m[2]["tool_calls"][0]["function"].update(arguments="[1]"), r"must be a JSON object"),
    (lambda m: m.pop(4), r"turn 5: no tool result for the call\(s\) to grounding"),
    (lambda m: m.__delitem__(slice(3, 5)), r"turn 4: no tool result for the call\(s\) to grounding, BiomedClip"),
    (lambda m: m.pop(2), r"turn 3: a tool result without a preceding tool call"),
])
def test_openai_tool_calls_log_errors_name_the_turn(tmp_path, change, match):
    log = _openai_log()
    change(log["messages"])
    with pytest.raises(DataError, match=match):
        read_records(write_json(tmp_path / "bad.json", [log]))


def test_vqa_rows_are_direct_answers_from_json_and_parquet(tmp_path):
    """VQA-RAD / SLAKE / PathVQA rows (question, answer, image or img_name) become direct-answer records;
    the HF layout's stored images are exported; an empty answer is an error naming the record."""
    datasets = pytest.importorskip("datasets")
    rows = [{"img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes", "q_lang": "en"},
            {"question": "How many lesions?", "answer": 2}]
    recs = read_records(write_json(tmp_path / "slake.json", rows))
    assert recs[0].image == "xmlab1/source.jpg" and recs[0].model_extra["q_lang"] == "en"
    assert recs[0].conversations[0].value == f"{IMAGE_TOKEN}\nIs this a CT?"
    gpt = recs[0].conversations[1]
    assert gpt.actions == [] and gpt.value == "Yes" and gpt.thoughts
    assert recs[1].image is None and recs[1].conversations[1].value == "2"
    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8), 30), Image.new("L", (8, 8), 90)],
                                     "question": ["Is there a mass?", "Which organ?"], "answer": ["no", "liver"]})
    ds.to_parquet(str(tmp_path / "vqa-rad.parquet"))
    recs = read_records(tmp_path / "vqa-rad.parquet", tmp_path / "img")
    assert [r.image for r in recs] == ["00000001.png", "00000002.png"]
    assert Image.open(tmp_path / "img" / recs[1].image).getpixel((0, 0)) == 90
    assert recs[1].conversations[1].value == "liver"
    with pytest.raises(DataError, match=r"record 1: empty answer"):
        read_records(write_json(tmp_path / "empty.json", [{"question": "Q?", "answer": " "}]))
    medqa = {"question": "Which drug?", "answer": "Aspirin", "options": {"A": "Aspirin", "B": "Heparin"}, "answer_idx": "A"}
    with pytest.raises(DataError, match=r"record 1: a multiple-choice row .* its options would be lost.*dialogue-llama3"):
        read_records(write_json(tmp_path / "medqa.json", [medqa]))


def test_openai_log_images_in_image_url_parts(tmp_path):
    """A chat log carries its image in the message (a data URL, or a path), not in an ``images`` list: the data
    URL's image is exported beside the data (or to image_folder) and named as the record's image; a remote URL
    is an error naming what to do."""
    import base64
    import io

    buf = io.BytesIO()
    Image.new("L", (8, 8), 77).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def log(image_url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                          {"type": "text", "text": "What is it?"}]},
                             {"role": "assistant", "content": "A CT."}]}

    (inline, by_path) = read_records(write_json(tmp_path / "chat.json", [log(url), log("scans/a.png")]))
    assert inline.image == "chat_images/00000001.png" and by_path.image == "scans/a.png"
    assert Image.open(tmp_path / inline.image).getpixel((0, 0)) == 77
    assert inline.conversations[0].value == f"{IMAGE_TOKEN}\nWhat is it?"
    (rec,) = read_records(write_json(tmp_path / "chat2.json", [log(url)]), tmp_path / "imgs")
    assert rec.image == "00000001.png" and (tmp_path / "imgs" / rec.image).is_file()
    with pytest.raises(DataError, match=r"record 1: an image_url part names a remote image \(example.org\); download"):
        read_records(write_json(tmp_path / "remote.json", [log("https://example.org/ct.png")]))


def test_a_report_holding_a_result_shaped_line_checks_and_reads_as_one_output(tmp_path):
    """"Cardiac output: 5.2 L/min" in a report is a line of that report, not a second tool's output."""
    from mmedagent.data.check import check_file
    from mmedagent.evaluation.readers import from_record

    report = "Findings: dilated left ventricle.\nCardiac output: 5.2 L/min"
    question = "Write a report for this chest X-ray."
    record = {"id": "r1", "conversations": [
        {"from": "human", "value": question},
        {"from": "gpt", "thoughts": "The report tool writes it.",
         "actions": [{"API_name": "ChatCAD-R", "API_params": {}}], "value": "Writing it."},
        {"from": "human", "value": f"ChatCAD-R output: {report}\n\nAnswer my first question: {question}"},
        {"from": "gpt", "thoughts": "Done.", "actions": [], "value": report},
    ]}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert check_file(p, validate_tools=False).problems == []
    (outcomes,) = from_record(record, 0).gold_results
    assert [(o.tool, o.text) for o in outcomes] == [("ChatCAD-R", report)]


def test_check_warns_of_tool_outputs_not_in_the_agents_wording_and_convert_rewrites_them(tmp_path, capsys):
    """Training takes a tool-result turn as written (Message.text()), but the agent feeds outputs back as
    render_tool_results writes them (Python's {'boxes': …}): a JSON-worded output in the data is a warning of
    check, and convert --canonical-tool-results rewrites it in the agent's wording."""
    from mmedagent.data.__main__ import main
    from mmedagent.data.check import check_file
    from mmedagent.protocol import render_tool_results

    turns = [dict(t) for t in MMEDAGENT_RECORD["conversations"]]
    question = turns[0]["value"].split("\n", 1)[1]
    turns[2]["value"] = ('grounding dino output: {"boxes": [[0.41, 0.54, 0.76, 0.75]], "logits": [0.95], '
                         f'"phrases": ["tumor"]}}\n\nAnswer my first question: {question}')
    p = write_json(tmp_path / "d.json", [MMEDAGENT_RECORD, {**MMEDAGENT_RECORD, "conversations": turns}])
    report = check_file(p, validate_tools=False)
    assert report.problems == []
    (warning,) = report.warnings
    assert warning.startswith(f"{p}: record 2: turn 3: the tool output is not worded as the agent feeds")
    assert "grounding dino output: {'boxes': [[0.41, 0.54, 0.76, 0.75]]" in warning and "--canonical-tool-results" in warning
    assert main(["convert", str(p), str(tmp_path / "as_given.json")]) == 0  # without the flag: as written
    assert read_records(tmp_path / "as_given.json")[1].conversations[2].value == turns[2]["value"]
    assert main(["convert", str(p), str(tmp_path / "fixed.json"), "--canonical-tool-results"]) == 0
    fixed = read_records(tmp_path / "fixed.json")
    assert fixed[1].conversations[2].value == fixed[0].conversations[2].value == render_tool_results(
        parse_tool_results(turns[2]["value"]).outcomes, question)
    assert check_file(tmp_path / "fixed.json", validate_tools=False).warnings == []


@pytest.mark.parametrize("mode, values", [("I", [-1024, 0, 3071]), ("F", [-0.5, 0.25, 1.75]), ("I;16", [0, 1000, 4095]),
                                          ("I;16L", [0, 1000, 4095]), ("I;16N", [0, 1000, 4095])])
def test_a_decoded_high_bit_depth_image_is_exported_with_its_values(tmp_path, mode, values):
    """A data set whose image column decodes to 16/32-bit pixels (CT, MR) was exported as 8-bit RGB: every
    value above 255 white, negative ones black."""
    from mmedagent.data.formats import export_images
    from mmedagent.imaging import load_image

    pixels = np.array([values * 2] * 4, dtype=np.float32 if mode == "F" else np.int32)
    if mode.startswith("I;16"):
        image = Image.frombytes(mode, pixels.shape[::-1], pixels.astype("<u2").tobytes())
    else:
        image = Image.fromarray(pixels)
    assert image.mode == mode
    row = export_images({"image": image}, 1, tmp_path)
    loaded = load_image(tmp_path / row["image"])
    np.testing.assert_array_equal(loaded.array, pixels.astype(np.float32))
