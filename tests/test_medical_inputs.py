"""DICOM and NIfTI scans go everywhere a PNG goes: `train/train_mem.py` and the web UI's upload."""

import json
import shutil
from pathlib import Path

import nibabel
import pytest
from _train_fixtures import base_args, losses, run_training
from pydicom.data import get_testdata_file

NIFTI = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    shutil.copy(NIFTI, folder / "brain.nii.gz")
    return folder


def test_train_mem_trains_on_dicom_and_nifti(tiny_models, scans, tmp_path):
    turn = {"from": "gpt", "thoughts": "I can answer directly.", "actions": [], "value": "This is a {}."}
    records = [{"id": name, "image": name,
                "conversations": [{"from": "human", "value": "<image>\nWhat kind of scan is this?"},
                                  {**turn, "value": turn["value"].format(kind)}]}
               for name, kind in (("ct.dcm", "CT"), ("mr.dcm", "MRI"), ("brain.nii.gz", "brain MRI"))]
    data = tmp_path / "scans.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "run"
    run_training(base_args(tiny_models("llava"), data, out, "--image_folder", str(scans), "--version", "v1",
                           "--max_steps", "3", "--save_strategy", "no"))
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3] and all(v == v and v > 0 for v in steps.values())
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name, fmt", [("ct.dcm", "dicom"), ("brain.nii.gz", "nifti")])
def test_web_upload_accepts_dicom_and_nifti(scans, name, fmt, tmp_path):
    """...and Gradio's copy of the upload (a DICOM names the patient) is deleted once read."""
    from mmedagent.serve.web import WebChat

    web = WebChat("http://127.0.0.1:9", api_key=None, max_upload_bytes=50 * 2**20)
    upload = tmp_path / "a1b2c3" / name  # Gradio keeps each upload in a folder of its own
    upload.parent.mkdir()
    shutil.copy(scans / name, upload)
    web.uploads.update([str(upload)])  # as Gradio's upload route hands the path out
    preview, image, chat, history, note, scan = web.load(str(upload))
    assert not upload.parent.exists() and scan == (scans / name).read_bytes()  # kept in memory, for another view
    assert image is not None and image.mode == "RGB" and min(image.size) > 8
    assert preview is not None and chat == [] and history == []
    assert note.lower().startswith(f"loaded {fmt}") and "px" in note
    if fmt == "dicom":
        assert "CT" in note  # modality from the de-identified metadata
    else:  # the middle slice by default (the page sends -1), then another view: slice, plane, volume, window
        assert "axial slice 12 (of 0–23), volume 0 (of 0–1)" in note
        preview, image, chat, history, note = web.view(scan, "brain", 0, "coronal", 1)
        assert image is not None and chat == [] and "coronal slice 0 (of 0–95), volume 1 (of 0–1), window 40/80 (explicit)" in note
        assert "slice 99 out of range: the axial plane has 24 slice(s), 0 to 23" in web.view(scan, "auto", 99, "axial", 0)[4]
