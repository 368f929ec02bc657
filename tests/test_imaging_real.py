"""mmedagent.imaging on more real variants: pydicom's and nibabel's sample files, NIfTI pairs, CIFTI,
2-D and colour NIfTI, large volumes, NumPy indices."""

import gzip
import io
import itertools
import json
import re
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from mmedagent.imaging import ImageLoadError, load_image

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def test_12bit_jpeg_the_installed_decoders_cannot_read_says_why_and_what_to_install():
    """Pillow decodes 8-bit JPEG only; 12-bit JPEG Extended (lossy CT/MR archives) needs another decoder."""
    try:
        load_image(get_testdata_file("JPGExtended.dcm"))
    except ImageLoadError as e:
        message = str(e)
    else:
        pytest.skip("a decoder for 12-bit JPEG is installed here")
    assert "12-bit" in message and "JPEG Extended" in message and "pylibjpeg" in message
    assert "truncated" not in message and "\n" not in message


def test_nifti_pair_loads_through_either_file_and_a_lone_header_is_explained(tmp_path):
    single = nib.load(str(NIB_DATA / "anatomical.nii"))
    pair = nib.Nifti1Pair(np.asarray(single.dataobj), single.affine, nib.Nifti1Header.from_header(single.header))
    nib.save(pair, str(tmp_path / "t1.img"))
    expected = load_image(NIB_DATA / "anatomical.nii", plane="coronal")
    for name in ("t1.hdr", "t1.img"):
        m = load_image(tmp_path / name, plane="coronal")
        assert np.array_equal(m.array, expected.array) and m.metadata == expected.metadata
    with pytest.raises(ImageLoadError, match=r"\.hdr of a NIfTI \.hdr/\.img pair.*by its path"):
        load_image((tmp_path / "t1.hdr").read_bytes())
    shutil.copy(NIB_DATA / "nifti1.hdr", tmp_path / "lone.hdr")  # nibabel's header-only sample
    with pytest.raises(ImageLoadError, match=r"\.img file of this \.hdr/\.img pair is missing"):
        load_image(tmp_path / "lone.hdr")


def test_cifti_file_gives_the_same_clear_error_by_path_and_by_bytes():
    path = NIB_DATA / "row_major.dconn.nii"  # CIFTI-2: nibabel's loader picks a class from the name
    for src in (path, path.read_bytes()):
        with pytest.raises(ImageLoadError, match="^NIfTI images with 6 dimensions are not supported$"):
            load_image(src)


def test_colour_nifti_is_refused_clearly():
    rgb = np.zeros((4, 4, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(ImageLoadError, match="^colour .*NIfTI images are not supported"):
        load_image(nib.Nifti1Image(rgb, np.eye(4)).to_bytes())


def test_2d_nifti_with_a_flipped_axis():
    """A single 2-D slice (x, y) stored left-to-right: shown like the same slice of a 3-D volume."""
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = load_image(nib.Nifti1Image(data, np.diag([-2.0, 1, 1, 1])).to_bytes())
    assert m.metadata["original_orientation"] == "LAS" and m.metadata["n_slices"] == 1
    as_3d = load_image(nib.Nifti1Image(data[::-1, :, None], np.diag([2.0, 1, 1, 1])).to_bytes())
    assert np.array_equal(m.array, as_3d.array) and m.metadata["voxel_spacing"] == [2.0, 1.0, 1.0]


def test_numpy_integer_slice_and_volume_indices():
    path = NIB_DATA / "example4d.nii.gz"
    m = load_image(path, slice_index=np.int64(3), volume=np.int32(1))
    assert np.array_equal(m.array, load_image(path, slice_index=3, volume=1).array)
    assert json.loads(json.dumps(m.metadata))["slice_index"] == 3
    with pytest.raises(TypeError, match="slice_index"):
        load_image(path, slice_index=2.5)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_every_voxel_orientation_matches_nibabel_canonical_reorientation(plane):
    """The slice shown is the one of ``nib.as_closest_canonical``: all 48 axis orders and flips of a 4-D series."""
    rng = np.random.default_rng(0)
    series = rng.normal(size=(5, 6, 7, 2)).astype(np.float32)
    axis = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]
    for order, flips in itertools.product(itertools.permutations(range(3)), itertools.product((1, -1), repeat=3)):
        affine = np.eye(4)
        affine[:3, :3] = 0
        for voxel_axis, (world_axis, flip) in enumerate(zip(order, flips)):
            affine[world_axis, voxel_axis] = flip * (voxel_axis + 1.5)
        img = nib.Nifti1Image(series, affine)
        canon = nib.as_closest_canonical(nib.Nifti1Image(series[..., 1], affine))
        expected = np.take(np.asarray(canon.dataobj), 2, axis=axis).T[::-1, ::-1]
        m = load_image(img.to_bytes(), plane=plane, slice_index=2, volume=1)
        assert np.array_equal(m.array, expected), (order, flips)
        assert m.metadata["voxel_spacing"] == [float(z) for z in canon.header.get_zooms()[:3]]


def test_a_large_volume_costs_one_slice_of_memory(tmp_path):
    """Each view of a CT (the web UI's slider, dataset builders slice by slice) reads one slice, not the volume."""
    volume = np.random.default_rng(1).integers(-1024, 2000, (128, 128, 256)).astype(np.int16)
    path = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(volume, np.diag([-0.7, -0.7, 1.25, 1])), str(path))
    tracemalloc.start()
    try:
        m = load_image(path, window="abdomen", slice_index=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(m.array, volume[::-1, ::-1, 100].astype(np.float32).T[::-1, ::-1])  # LPS → RAS, shown
    assert peak < volume.nbytes // 8  # the whole volume as float32 would be 32 MB


def test_an_uploaded_gzipped_volume_costs_its_own_size_once():
    """Uploads and the CLI hand load_image bytes: a .nii.gz is inflated into one buffer, not copied twice more."""
    volume = np.random.default_rng(2).integers(-1024, 2000, (128, 128, 128)).astype(np.int16)  # 4 MB
    raw = nib.Nifti1Image(volume, np.eye(4)).to_bytes()
    gz, size = gzip.compress(raw, 1), len(raw)
    load_image(gzip.compress(nib.Nifti1Image(volume[:4, :4, :4], np.eye(4)).to_bytes()))  # imports done before
    tracemalloc.start()
    try:
        m = load_image(gz, slice_index=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.array_equal(m.array, volume[:, :, 10].astype(np.float32).T[::-1, ::-1])
    assert peak < 1.5 * size  # it was three times the volume


def test_a_multi_member_gzip_volume_loads_from_bytes_as_from_its_path(tmp_path):
    """bgzip (and concatenated gzip files) write several gzip members; nibabel reads them through from a path."""
    raw = (NIB_DATA / "anatomical.nii").read_bytes()
    path = tmp_path / "t1.nii.gz"
    path.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    expected = load_image(raw).array
    assert np.array_equal(load_image(path).array, expected)
    assert np.array_equal(load_image(path.read_bytes()).array, expected)


def test_a_truncated_volume_is_refused_though_only_one_slice_is_read(tmp_path):
    raw = nib.Nifti1Image(np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8), np.eye(4)).to_bytes()
    cut = raw[:-100]  # the first slices are all there, the last is not
    (tmp_path / "cut.nii").write_bytes(cut)
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(cut))
    for src in (tmp_path / "cut.nii", tmp_path / "cut.nii.gz", cut, gzip.compress(cut)):
        with pytest.raises(ImageLoadError, match="truncated"):
            load_image(src, slice_index=0)
    assert load_image(raw, slice_index=0).array.shape == (8, 8)


def test_a_text_mode_file_object_is_a_clear_type_error(tmp_path):
    path = tmp_path / "ct.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    with open(path, "rb") as f:
        assert load_image(f).metadata["modality"] == "CT"
    for encoding in ("latin-1", "utf-8"):  # read as text / not even decodable as text
        with open(path, encoding=encoding) as f, pytest.raises(TypeError, match="mode 'rb'"):
            load_image(f)


@pytest.mark.parametrize("suffixes", [(".hdr", ".img"), (".HDR", ".IMG")])
def test_analyze_pair_loads_through_either_file_in_canonical_view_with_an_orientation_warning(tmp_path, suffixes):
    """SPM's Analyze 7.5 pairs (no NIfTI magic; DOS-era scanners write the suffixes in capitals)."""
    volume = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    nib.save(nib.Spm2AnalyzeImage(volume, np.diag([-2.0, 3, 4, 1])), str(tmp_path / "spm.img"))
    header, voxels = (tmp_path / f"t1{s}" for s in suffixes)
    (tmp_path / "spm.hdr").rename(header)
    (tmp_path / "spm.img").rename(voxels)
    canon = nib.as_closest_canonical(nib.load(str(tmp_path / f"t1{suffixes[0]}")))
    for src in (header, voxels):
        m = load_image(src, plane="coronal", slice_index=2)
        assert np.array_equal(m.array, np.asarray(canon.dataobj)[:, 2, :].T[::-1, ::-1])
        assert m.metadata["format"] == "analyze" and m.metadata["original_orientation"] == "LAS"
        assert "no orientation" in m.warnings[0]
    with pytest.raises(ImageLoadError, match=r"^this is the \.hdr of an Analyze 7\.5 .*by its path"):
        load_image(header.read_bytes())
    with pytest.raises(ImageLoadError, match=r"^Analyze header without its voxel data"):
        load_image(NIB_DATA / "analyze.hdr")  # nibabel ships the header alone


def test_nifti_pair_with_capital_suffixes_loads_through_its_img(tmp_path):
    single = nib.load(str(NIB_DATA / "anatomical.nii"))
    nib.save(nib.Nifti1Pair(np.asarray(single.dataobj), single.affine), str(tmp_path / "t1.img"))
    (tmp_path / "t1.img").rename(tmp_path / "T1.IMG")
    (tmp_path / "t1.hdr").rename(tmp_path / "T1.HDR")
    assert np.array_equal(load_image(tmp_path / "T1.IMG").array, load_image(NIB_DATA / "anatomical.nii").array)


def test_an_img_whose_first_voxels_look_like_another_format_is_read_through_its_header(tmp_path):
    """Voxels 8, 0, 0, … begin like a DICOM data set without preamble; the .hdr beside the .img decides."""
    labels = np.zeros((4, 4, 4), dtype=np.int16)
    labels[0, 0, 0] = 8
    nib.save(nib.Nifti1Pair(labels, np.eye(4)), str(tmp_path / "seg.img"))
    m = load_image(tmp_path / "seg.img", slice_index=0)
    assert m.metadata["format"] == "nifti" and m.array.max() == 8


@pytest.mark.parametrize("path, what", [
    (NIB_DATA / "tiny.mnc", "a MINC-1 volume"),
    (NIB_DATA / "minc2_4d.mnc", "an HDF5 file (a MINC-2 volume?)"),
    (NIB_DATA / "test.mgz", "a FreeSurfer MGZ volume"),
    (NIB_DATA / "tinypet.v", "an ECAT 7 PET file"),
    (NIB_DATA / "T1.PAR", "a Philips PAR header"),
    (NIB_DATA / "example4d+orig.HEAD", "an AFNI .HEAD header"),
    (NIB_DATA / "simple.trk", "a TrackVis tractography file"),
    (get_testdata_file("zipMR.gz"), "a gzip-compressed DICOM file"),
])
def test_a_volume_format_that_is_not_read_is_named_in_one_line(path, what):
    from mmedagent.imaging import image_file_problem

    for src in (path, Path(path).read_bytes()):
        with pytest.raises(ImageLoadError, match=rf"^this is {re.escape(what)}") as e:
            load_image(src)
        assert "\n" not in str(e.value)
    assert image_file_problem(path).startswith(f"this is {what}")


def test_a_zip_of_a_study_says_to_extract_it():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(get_testdata_file("CT_small.dcm"), "DICOM/IM000001")
    with pytest.raises(ImageLoadError, match="^this is a ZIP archive .*extract it"):
        load_image(buffer.getvalue())
