"""mmedagent.imaging on real sample scans shipped in pydicom and nibabel, plus made-up edge cases."""

import gzip
import io
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from doubles import dicom_quoting_a_name
from mmedagent.imaging import (
    WINDOW_PRESETS,
    ImageLoadError,
    Window,
    apply_window,
    deidentify_dataset,
    detect_format,
    load_image,
)

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- Pillow formats


def test_rgb_png_round_trip_and_array():
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    m = load_image(png_bytes(arr))
    assert m.image.mode == "RGB" and m.image.size == (30, 20)
    assert np.array_equal(np.asarray(m.image), arr)
    assert m.array.shape == (20, 30, 3) and m.array.dtype == np.float32
    assert m.metadata["format"] == "png"


def test_16bit_grey_kept_until_windowing(tmp_path):
    arr = np.linspace(1000, 3000, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    m = load_image(path)
    assert m.metadata["bit_depth"] == 16
    assert m.array.min() == 1000 and m.array.max() == 3000  # raw values, not 8-bit
    grey = np.asarray(m.image)[..., 0]
    assert grey.min() == 0 and grey.max() == 255  # min-max by default
    w = load_image(path, window=(2000, 1000)).image
    g = np.asarray(w)[..., 0]
    assert g[0, 0] == 0 and g[-1, -1] == 255 and 100 < g[16, 32] < 155


def _white_is_zero_tiff(arr):
    """``arr`` as a TIFF whose PhotometricInterpretation tag (262) says WhiteIsZero, as CR/DR exports write."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    raw = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", raw, 4)[0]
    for i in range(struct.unpack_from("<H", raw, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", raw, entry)[0] == 262:
            struct.pack_into("<H", raw, entry + 8, 0)
    return bytes(raw)


def test_white_is_zero_tiff_is_inverted_at_every_bit_depth():
    """16-bit WhiteIsZero (a radiograph's MONOCHROME1) shows dark where Pillow's own 8-bit inversion does."""
    eight = load_image(_white_is_zero_tiff(np.array([[0, 255]], np.uint8)))
    assert np.asarray(eight.image)[0, :, 0].tolist() == [255, 0]
    sixteen = load_image(_white_is_zero_tiff(np.array([[0, 4095]], np.uint16)))
    assert sixteen.array.tolist() == [[0, 4095]] and sixteen.metadata["inverted"] is True
    assert np.asarray(sixteen.image)[0, :, 0].tolist() == [255, 0]
    assert "inverted" not in load_image(png_bytes(np.array([[0, 4095]], np.uint16))).metadata


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF"])
def test_other_pillow_formats(fmt):
    arr = np.full((16, 24), 77, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    m = load_image(buf.getvalue())
    assert m.metadata["format"] == fmt.lower() and m.image.mode == "RGB"
    assert abs(int(np.asarray(m.image).mean()) - 77) <= 1


def test_format_detected_from_content_not_extension(tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    fake_png = tmp_path / "scan.png"
    fake_png.write_bytes(ct)
    assert load_image(fake_png).metadata["format"] == "dicom"
    fake_dcm = tmp_path / "photo.dcm"
    fake_dcm.write_bytes(png_bytes(np.zeros((4, 4), np.uint8)))
    assert load_image(fake_dcm).metadata["format"] == "png"
    nii = tmp_path / "volume.bin"
    nii.write_bytes((NIB_DATA / "example4d.nii.gz").read_bytes())
    assert load_image(nii).metadata["format"] == "nifti"
    assert detect_format(b"hello world") is None


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"just some text, not a picture at all", "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "PNG"),
    ],
)
def test_bad_bytes_are_clear_errors(data, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(data)


def test_truncated_png_and_jpeg():
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        data = buf.getvalue()
        with pytest.raises(ImageLoadError, match="truncated|cannot"):
            load_image(data[: len(data) // 2])
        with pytest.raises(ImageLoadError) as cut:  # only the header left: Pillow cannot even identify it
            load_image(data[:40])
        assert ("cut off or damaged" if fmt == "PNG" else "Truncated") in str(cut.value)
        assert "0x" not in str(cut.value)  # not Pillow's "cannot identify image file <_io.BytesIO object at 0x…>"


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(TypeError):
        load_image(12345)
    assert issubclass(ImageLoadError, ValueError)


def test_decompression_bomb_guard(monkeypatch):
    data = png_bytes(np.zeros((100, 100), np.uint8))
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(data, max_pixels=5000)
    assert load_image(data, max_pixels=10_000).image.size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit is honoured too
    with pytest.raises(ImageLoadError):
        load_image(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # where Pillow only warns, the image is refused
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(data)


def test_a_refused_image_names_the_limit_in_force_and_the_setting_that_raises_it(monkeypatch):
    """Raising max_pixels / MMEDAGENT_MAX_PIXELS cannot admit an image over Pillow's own limit: the
    error must not advise it then."""
    data = png_bytes(np.zeros((100, 100), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    for max_pixels in (8000, 10**9):
        with pytest.raises(ImageLoadError, match=r"limit of 5,000 .*raise Pillow's PIL\.Image\.MAX_IMAGE_PIXELS") as e:
            load_image(data, max_pixels=max_pixels)
        assert "MMEDAGENT_MAX_PIXELS" not in str(e.value)
    with pytest.raises(ImageLoadError, match=r"limit of 2,000 .*raise max_pixels / MMEDAGENT_MAX_PIXELS"):
        load_image(data, max_pixels=2000)


def test_a_corrupt_dicom_header_is_an_image_load_error_that_quotes_nothing():
    with pytest.raises(ImageLoadError, match="DICOM") as e:
        load_image(dicom_quoting_a_name(b"Zzyzx^Quixote "))
    assert "Zzyzx" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_gzipped_nifti_is_inflated_only_as_far_as_its_header_declares():
    vol = np.arange(16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    raw = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    bomb = gzip.compress(raw + b"\0" * (8 << 20))  # 8 MB of trailing zeros, past what the header declares
    img = load_image(bomb, max_pixels=16**3)  # the inflated size may not exceed 8 bytes per voxel + 1 MB
    assert img.metadata["shape"] == [16, 16, 16]
    assert np.array_equal(img.array, load_image(raw).array)
    nifti2 = bytearray(nib.Nifti2Image(np.zeros((2, 4, 1), np.float32), np.eye(4)).to_bytes())
    struct.pack_into("<8q", nifti2, 16, 3, 2**62 + 1, 4, 1, 1, 1, 1, 1)  # dims whose int64 product wraps to 4
    for data in (bytes(nifti2), gzip.compress(bytes(nifti2))):
        with pytest.raises(ImageLoadError, match="^NIfTI volume declares .* decompression bomb"):
            load_image(data)


def test_a_4d_nifti_is_inflated_and_read_only_up_to_the_volume_shown():
    """A 4-D series of many volumes (2 MB gzipped can declare gigabytes) costs one volume's memory."""
    series = np.stack([np.full((8, 8, 4), v, np.float32) for v in range(3)], axis=-1)
    series[..., 0] = np.arange(8 * 8 * 4).reshape(8, 8, 4)
    raw = nib.Nifti1Image(series, np.diag([-1.0, 1, 1, 1])).to_bytes()  # LAS: turned to RAS after reading
    first = len(raw) - series[..., 1:].nbytes
    cut = gzip.compress(raw[:first])  # the stream ends after volume 0: later volumes are never inflated
    for volume, data in ((0, cut), (1, gzip.compress(raw))):
        assert np.array_equal(load_image(data, volume=volume).array, load_image(raw, volume=volume).array)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(cut, volume=1)


def test_window_presets_and_bad_window():
    assert set(WINDOW_PRESETS) >= {"brain", "lung", "abdomen", "bone"}
    hu = np.array([-1000, 0, 40, 80, 1000], np.float32)
    brain = apply_window(hu, WINDOW_PRESETS["brain"])
    assert brain[0] == 0 and brain[-1] == 255 and 120 <= brain[2] <= 135
    with pytest.raises(ValueError, match="unknown window preset"):
        load_image(png_bytes(np.zeros((4, 4), np.uint8)), window="liverish")
    with pytest.raises(ValueError):
        Window(0, 0)


# --------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def ct_path():
    return get_testdata_file("CT_small.dcm")


def test_ct_modality_lut_and_presets(ct_path):
    ds = pydicom.dcmread(ct_path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    m = load_image(ct_path, window="abdomen")
    assert np.allclose(m.array, hu)
    expected = apply_window(hu, WINDOW_PRESETS["abdomen"])
    assert np.array_equal(np.asarray(m.image)[..., 0], expected)
    assert m.metadata["window"] == {"center": 40.0, "width": 400.0}
    lung = np.asarray(load_image(ct_path, window="lung").image)[..., 0]
    bone = np.asarray(load_image(ct_path, window="bone").image)[..., 0]
    assert lung.mean() > bone.mean()  # soft tissue is bright in a lung window, mid-grey in bone
    assert m.metadata["modality"] == "CT" and m.metadata["pixel_spacing"] == [0.661468, 0.661468]
    assert m.metadata["slice_thickness"] == 5.0


def test_ct_without_a_window_leaves_the_padding_outside_the_scan_out_of_min_max(ct_path):
    """CT_small declares PixelPaddingValue -2000 (-3024 HU), as scanners pad the corners outside the scanned circle."""
    ds = pydicom.dcmread(ct_path)
    assert int(ds.PixelPaddingValue) == -2000 and "WindowCenter" not in ds
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rows, cols = np.mgrid[:128, :128]
    outside = (rows - 64) ** 2 + (cols - 64) ** 2 > 60**2
    stored = ds.pixel_array.copy()
    stored[outside] = -2000
    ds.PixelData = stored.astype(np.int16).tobytes()
    m = load_image(dicom_bytes(ds))
    assert m.array[outside].max() == -3024 and m.metadata["window_source"] == "min-max"
    inside = hu[~outside]
    lo, hi = inside.min(), inside.max()
    assert m.metadata["window"] == {"center": (lo + hi) / 2 + 0.5, "width": hi - lo + 1}
    grey = np.asarray(m.image)[..., 0]
    assert grey[outside].max() == 0 and grey[~outside].min() == 0 and grey[~outside].max() == 255


def test_dicom_window_tags_first_of_multivalue():
    mr = load_image(get_testdata_file("MR_small.dcm"))
    assert mr.metadata["window"] == {"center": 600.0, "width": 1600.0} and mr.metadata["window_source"] == "dicom"
    ov_path = get_testdata_file("examples_overlay.dcm")
    ds = pydicom.dcmread(ov_path)
    assert len(ds.WindowCenter) == 2  # MultiValue in the file
    ov = load_image(ov_path)
    assert ov.metadata["window"]["center"] == float(ds.WindowCenter[0])
    assert ov.metadata["window"]["width"] == float(ds.WindowWidth[0])


def test_monochrome1_is_inverted(ct_path):
    ds = pydicom.dcmread(ct_path)
    mono2 = np.asarray(load_image(dicom_bytes(ds), window="abdomen").image)[..., 0].astype(int)
    ds.PhotometricInterpretation = "MONOCHROME1"
    m = load_image(dicom_bytes(ds), window="abdomen")
    assert m.metadata["inverted"] is True
    assert np.array_equal(np.asarray(m.image)[..., 0].astype(int), 255 - mono2)


def test_voi_lut_sequence_is_applied(ct_path):
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(ct_path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    item = Dataset()
    n = int(hu.max()) + 1  # maps 0..max HU; values below 0 take the first entry
    item.LUTDescriptor = [n, 0, 16]
    item.add_new(0x00283006, "US", [65535 - (i * 65535) // (n - 1) for i in range(n)])  # an inverting LUTData
    ds.VOILUTSequence = [item]
    m = load_image(dicom_bytes(ds))
    g = np.asarray(m.image)[..., 0].astype(int)
    assert m.metadata["window_source"] == "voi_lut"
    assert g[hu <= 0].min() == 255 and g[hu == hu.max()].max() == 0
    mid = (hu > 500) & (hu < 600)
    assert mid.any() and np.all(np.abs(g[mid] - (255 - hu[mid] * 255 / (n - 1))) <= 1.5)


def test_multiframe_selects_frame():
    path = get_testdata_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array * float(ds.DoseGridScaling)  # an RT dose's stored integers → Gy
    m = load_image(path, slice_index=3)
    assert m.metadata["frame_index"] == 3 and m.metadata["n_frames"] == 15
    assert np.allclose(m.array, frames[3]) and m.metadata["dose_units"] == ds.DoseUnits
    assert load_image(path).metadata["frame_index"] == 7  # middle by default
    assert frames.shape[0] == 15
    with pytest.raises(ImageLoadError, match="out of range"):
        load_image(path, slice_index=15)



def _group(**macros):
    """One functional-group item: keyword → a dict of attributes for that macro's single item."""
    from pydicom.dataset import Dataset

    group = Dataset()
    for sequence, attrs in macros.items():
        item = Dataset()
        for kw, value in attrs.items():
            setattr(item, kw, value)
        setattr(group, sequence, [item])
    return group


def _enhanced_ct(ct_path, frames=1, shared=None, per_frame=None):
    """CT_small recast as an Enhanced CT image: rescale (and no window) only in functional groups."""
    ds = pydicom.dcmread(ct_path)
    raw = ds.pixel_array
    stack = np.stack([raw + 10 * i for i in range(frames)]).astype(raw.dtype)  # frames told apart by value
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    for kw in ("RescaleSlope", "RescaleIntercept", "RescaleType", "PixelSpacing", "SliceThickness"):
        if kw in ds:
            delattr(ds, kw)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.SharedFunctionalGroupsSequence = [_group(**(shared or {}))]
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = [_group(**item) for item in per_frame]
    return ds, stack


def test_enhanced_ct_shared_rescale_gives_hu(ct_path):
    classic = load_image(ct_path, window="abdomen")
    ds, _ = _enhanced_ct(
        ct_path,
        shared={
            "PixelValueTransformationSequence": {"RescaleSlope": 1, "RescaleIntercept": -1024, "RescaleType": "HU"},
            "PixelMeasuresSequence": {"PixelSpacing": [0.661468, 0.661468], "SliceThickness": 5.0},
        },
    )
    m = load_image(dicom_bytes(ds), window="abdomen")
    assert m.array.min() == classic.array.min() == -896 and m.array.max() == classic.array.max() == 1167
    assert np.array_equal(m.array, classic.array)
    assert np.array_equal(np.asarray(m.image), np.asarray(classic.image))  # the preset lands on HU
    assert m.metadata["sop_class"] == "Enhanced CT Image Storage"
    assert m.metadata["pixel_spacing"] == [0.661468, 0.661468] and m.metadata["slice_thickness"] == 5.0


def test_enhanced_ct_per_frame_rescale_follows_the_chosen_frame(ct_path):
    rescales = [(1.0, -1024.0), (2.0, -2048.0), (0.5, 0.0)]
    ds, stack = _enhanced_ct(
        ct_path,
        frames=3,
        shared={  # overridden by every frame's own item
            "PixelValueTransformationSequence": {"RescaleSlope": 1, "RescaleIntercept": 0, "RescaleType": "US"},
            "PixelMeasuresSequence": {"PixelSpacing": [0.5, 0.5], "SliceThickness": 1.0},
        },
        per_frame=[
            {"PixelValueTransformationSequence": {"RescaleSlope": s, "RescaleIntercept": b, "RescaleType": "HU"}}
            for s, b in rescales
        ],
    )
    ds.PerFrameFunctionalGroupsSequence[2].PixelMeasuresSequence = _group(
        PixelMeasuresSequence={"PixelSpacing": [0.25, 0.25], "SliceThickness": 2.0}
    ).PixelMeasuresSequence
    data = dicom_bytes(ds)
    for i, (slope, intercept) in enumerate(rescales):
        m = load_image(data, window="abdomen", slice_index=i)
        hu = stack[i].astype(np.float64) * slope + intercept
        assert m.metadata["frame_index"] == i and m.metadata["n_frames"] == 3
        assert np.allclose(m.array, hu)
        assert np.array_equal(np.asarray(m.image)[..., 0], apply_window(hu, WINDOW_PRESETS["abdomen"]))
    assert load_image(data).metadata["frame_index"] == 1  # middle frame, its own rescale
    assert np.allclose(load_image(data).array, stack[1] * 2.0 - 2048.0)
    assert load_image(data, slice_index=0).metadata["pixel_spacing"] == [0.5, 0.5]  # shared
    frame2 = load_image(data, slice_index=2).metadata
    assert frame2["pixel_spacing"] == [0.25, 0.25] and frame2["slice_thickness"] == 2.0  # the frame's own


def test_enhanced_ct_frame_voi_window_when_no_preset(ct_path):
    pvt = {"RescaleSlope": 1, "RescaleIntercept": -1024}
    windows = [(40.0, 400.0), (-600.0, 1500.0)]
    ds, stack = _enhanced_ct(
        ct_path,
        frames=2,
        shared={
            "PixelValueTransformationSequence": pvt,
            "FrameVOILUTSequence": {"WindowCenter": 400, "WindowWidth": 1800},
        },
        per_frame=[{"FrameVOILUTSequence": {"WindowCenter": c, "WindowWidth": w}} for c, w in windows],
    )
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
    data = dicom_bytes(ds)
    for i, (c, w) in enumerate(windows):
        m = load_image(data, slice_index=i)
        hu = stack[i].astype(np.float64) - 1024
        assert m.metadata["window"] == {"center": c, "width": w} and m.metadata["window_source"] == "dicom"
        assert np.array_equal(np.asarray(m.image)[..., 0], apply_window(hu, Window(c, w)))
    explicit = load_image(data, window="brain", slice_index=0)  # a preset still wins over the file's window
    assert explicit.metadata["window"] == {"center": 40.0, "width": 80.0}

    del ds.PerFrameFunctionalGroupsSequence  # only the shared window left
    ds.PhotometricInterpretation = "MONOCHROME1"
    m = load_image(dicom_bytes(ds), slice_index=1)
    assert m.metadata["window"] == {"center": 400.0, "width": 1800.0} and m.metadata["inverted"] is True
    hu = stack[1].astype(np.float64) - 1024
    assert np.array_equal(np.asarray(m.image)[..., 0], 255 - apply_window(hu, Window(400, 1800)))  # VOI, then invert

    ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0].VOILUTFunction = "SIGMOID"
    m = load_image(dicom_bytes(ds), slice_index=1)
    assert np.array_equal(np.asarray(m.image)[..., 0], 255 - apply_window(hu, Window(400, 1800), sigmoid=True))

def test_rgb_and_ybr_colour():
    rgb = np.asarray(load_image(get_testdata_file("SC_rgb_rle.dcm")).image).astype(int)
    ybr = np.asarray(load_image(get_testdata_file("SC_ybr_full_422_uncompressed.dcm")).image).astype(int)
    jpeg = np.asarray(load_image(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")).image).astype(int)
    assert rgb.shape == ybr.shape == jpeg.shape == (100, 100, 3)
    assert rgb[..., 0].max() == 255 and rgb[..., 0].min() == 0  # real colour bands, not grey
    assert np.abs(rgb - ybr).mean() < 4 and np.abs(rgb - jpeg).mean() < 4
    pal = load_image(get_testdata_file("examples_palette.dcm"))
    assert pal.image.mode == "RGB" and pal.image.size == (800, 350)


def test_compressed_transfer_syntaxes_decode_identically():
    ref = load_image(get_testdata_file("MR_small.dcm"))
    rle = load_image(get_testdata_file("MR_small_RLE.dcm"))
    assert np.array_equal(ref.array, rle.array)
    assert rle.metadata["transfer_syntax"] == "RLE Lossless"


def test_missing_decoder_names_the_packages_for_that_compression():
    """JPEG-LS needs pyjpegls, pylibjpeg-libjpeg or python-gdcm, not a JPEG 2000 decoder: one line naming those."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(ImageLoadError, match="^DICOM pixel data is compressed with 'JPEG-LS Lossless") as e:
        load_image(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    message = str(e.value)
    assert all(f"pip install {p}" in message for p in ("pyjpegls", "pylibjpeg pylibjpeg-libjpeg", "python-gdcm"))
    assert "openjpeg" not in message and "\n" not in message


def test_dicom_without_pixels_and_truncated():
    with pytest.raises(ImageLoadError, match="no pixel data"):
        load_image(get_testdata_file("rtplan.dcm"))
    with pytest.raises(ImageLoadError, match="truncated|corrupt"):
        load_image(get_testdata_file("MR_truncated.dcm"))
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with pytest.raises(ImageLoadError):
        load_image(ct[:1000])


@pytest.mark.parametrize("name, kind", [("test-SR.dcm", r"\(Comprehensive SR Storage, modality SR\)"),
                                        ("waveform_ecg.dcm", r"\(12-lead ECG Waveform Storage, modality ECG\)")])
def test_a_non_image_dicom_says_what_it_is_and_what_to_load(name, kind):
    path = get_testdata_file(name)
    with pytest.raises(ImageLoadError, match=rf"^DICOM file has no pixel data {kind}.*load an image file") as e:
        load_image(path)
    ds = pydicom.dcmread(path)
    identifying = {str(ds.PatientName), str(ds.get("PatientID", ""))} - {""}
    assert identifying and not any(v in str(e.value) for v in identifying)


def test_an_unreadable_number_of_frames_is_named_not_quoted():
    path = get_testdata_file("badVR.dcm")
    assert pydicom.dcmread(path).NumberOfFrames == "1A"  # not an integer string
    with pytest.raises(ImageLoadError, match="^DICOM image lacks valid Rows / Columns / NumberOfFrames$"):
        load_image(path)


def test_a_dicomdir_is_explained_as_the_index_of_the_images():
    with pytest.raises(ImageLoadError, match=r"^this is a DICOMDIR, the index of .* load one of the image files"):
        load_image(get_testdata_file("DICOMDIR"))


def test_dicom_dimension_guard(ct_path):
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(ct_path, max_pixels=128 * 127)


# --------------------------------------------------------------------------- de-identification


def _phi_values(ds):
    vals = set()
    for elem in ds.iterall():
        if elem.VR in ("PN", "DA", "DT", "TM", "UI", "LO", "SH", "LT", "ST") and elem.value not in (None, ""):
            s = str(elem.value).strip()
            if len(s) >= 4 and (elem.VR != "UI" or elem.keyword not in {"SOPClassUID", "TransferSyntaxUID"}):
                if elem.VR in ("PN", "DA", "DT", "TM", "UI") or "Patient" in elem.keyword or "Institution" in elem.keyword:
                    vals.add(s)
    return vals


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "rtdose.dcm"])
def test_no_phi_leaves_the_loader(name):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    phi = _phi_values(ds)
    phi |= {str(ds.PatientName), str(ds.PatientID)} - {""}
    assert phi, "the sample should carry identifying values"
    m = load_image(path)
    blob = json.dumps(m.metadata) + repr(m) + str(m) + repr(m.metadata)
    leaked = [v for v in phi if v in blob]
    assert not leaked


def test_burned_in_annotation_warning(ct_path):
    ds = pydicom.dcmread(ct_path)
    ds.BurnedInAnnotation = "YES"
    m = load_image(dicom_bytes(ds))
    assert any("BurnedInAnnotation" in w for w in m.warnings)
    assert not load_image(ct_path).warnings


def test_deidentify_dataset_removes_basic_profile(ct_path):
    ds = pydicom.dcmread(ct_path)
    phi = _phi_values(ds) | {str(ds.PatientName), str(ds.PatientID)}
    ds.InstitutionName = "St Example Hospital"
    ds.PatientAddress = "1 Example Road"
    phi |= {"St Example Hospital", "1 Example Road"}
    deidentify_dataset(ds)
    remaining = " ".join(str(e.value) for e in ds.iterall() if e.keyword != "PixelData")
    assert not [v for v in phi if v in remaining]
    assert ds.Modality == "CT" and ds.PatientIdentityRemoved == "YES"
    assert "PixelSpacing" in ds and "SOPClassUID" in ds
    m = load_image(dicom_bytes(ds), window="abdomen")  # still a loadable image
    assert m.metadata["modality"] == "CT"


def test_deidentify_dataset_warns_nothing_that_quotes_a_removed_value():
    """pydicom warns while converting the values it removes (rtdose's invalid instance UID, quoted);
    those warnings reach stderr or logs, so none may escape; and its own attributes must be valid."""
    import warnings

    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deidentify_dataset(ds)
    assert [str(w.message) for w in caught] == []
    assert len(ds.DeidentificationMethod) <= 64  # VR LO


# --------------------------------------------------------------------------- NIfTI


def test_anatomical_nifti_reoriented_to_ras():
    path = NIB_DATA / "anatomical.nii"
    raw = nib.load(str(path))
    assert "".join(nib.aff2axcodes(raw.affine)) == "LAS"
    m = load_image(path)
    assert m.metadata["orientation"] == "RAS" and m.metadata["original_orientation"] == "LAS"
    data = np.asarray(raw.dataobj, dtype=np.float32)
    k = m.metadata["slice_index"]
    assert k == data.shape[2] // 2
    ras = data[::-1]  # LAS -> RAS flips the first axis
    expected = ras[:, :, k].T[::-1, ::-1]
    assert np.allclose(m.array, expected)
    assert m.metadata["voxel_spacing"] == [2.0, 2.0, 2.0] and m.metadata["spatial_units"] == "mm"
    g = np.asarray(m.image)[..., 0]
    assert g.std() > 20  # a real picture, not flat


def _marker_volume(affine_codes):
    """A volume with one bright voxel at the patient's right-anterior-superior corner region."""
    shape = (10, 12, 8)
    ras = np.zeros(shape, np.float32)
    ras[8, 10, 6] = 1000.0  # high x = right, high y = anterior, high z = superior
    o = nib.orientations
    ras_to_codes = o.ornt_transform(o.axcodes2ornt("RAS"), o.axcodes2ornt(affine_codes))
    data = o.apply_orientation(ras, ras_to_codes)
    # voxel index in `data` -> index in `ras` (= world position in RAS), then voxel size
    affine = np.diag([2.0, 3.0, 4.0, 1.0]) @ o.inv_ornt_aff(ras_to_codes, ras.shape)
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("P", "R", "I")])
def test_orientation_radiological_display(codes, tmp_path):
    img = _marker_volume(codes)
    assert tuple(nib.aff2axcodes(img.affine)) == codes
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    ax = load_image(path, window=(500, 1000), slice_index=None, plane="axial")
    assert ax.metadata["orientation"] == "RAS"
    # find the marker in each plane at the marker's slice: right -> image left, anterior/superior -> top
    ax = load_image(path, window=(500, 1000), slice_index=6, plane="axial")
    r, c = np.unravel_index(np.argmax(ax.array), ax.array.shape)
    assert ax.array.shape == (12, 10) and (r, c) == (12 - 1 - 10, 10 - 1 - 8)
    co = load_image(path, window=(500, 1000), slice_index=10, plane="coronal")
    r, c = np.unravel_index(np.argmax(co.array), co.array.shape)
    assert co.array.shape == (8, 10) and (r, c) == (8 - 1 - 6, 10 - 1 - 8)
    sa = load_image(path, window=(500, 1000), slice_index=8, plane="sagittal")
    r, c = np.unravel_index(np.argmax(sa.array), sa.array.shape)
    assert sa.array.shape == (8, 12) and (r, c) == (8 - 1 - 6, 12 - 1 - 10)
    assert np.asarray(ax.image)[..., 0].max() == 255
    assert sorted(ax.metadata["voxel_spacing"]) == [2.0, 3.0, 4.0]


def test_4d_nifti_volume_and_bytes():
    path = NIB_DATA / "example4d.nii.gz"
    m0 = load_image(path)
    m1 = load_image(path, volume=1)
    assert m0.metadata["n_volumes"] == 2 and m1.metadata["volume"] == 1
    assert not np.array_equal(m0.array, m1.array)
    from_bytes = load_image(path.read_bytes())
    assert np.array_equal(from_bytes.array, m0.array)
    raw = gzip.decompress(path.read_bytes())
    assert np.array_equal(load_image(raw).array, m0.array)
    with pytest.raises(ImageLoadError, match="volume 2 out of range"):
        load_image(path, volume=2)
    with pytest.raises(ImageLoadError, match="slice 99 out of range"):
        load_image(path, slice_index=99)
    with pytest.raises(ValueError, match="plane"):
        load_image(path, plane="oblique")


def test_nifti_hu_presets_and_guards(tmp_path):
    hu = np.full((16, 16, 4), -1000.0, np.float32)
    hu[4:12, 4:12] = 40.0  # "brain" tissue
    hu[7:9, 7:9] = 1200.0  # "bone"
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(path))
    brain = np.asarray(load_image(path, window="brain").image)[..., 0]
    assert brain.min() == 0 and brain.max() == 255 and 120 <= np.median(brain[4:12, 4:12]) <= 135
    assert load_image(path, window=(40, 80)).metadata["window"] == {"center": 40.0, "width": 80.0}
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path, max_pixels=100)
    with pytest.raises(ImageLoadError, match="decompression bomb|larger"):
        load_image(path.read_bytes(), max_pixels=100)
    data = path.read_bytes()
    with pytest.raises(ImageLoadError):
        load_image(data[: len(data) // 2])


def test_pydicom_log_messages_are_redacted(caplog):
    path = get_testdata_file("rtdose.dcm")  # carries an invalid UID that pydicom warns about, quoting it
    uid = "1.2.123.456.78.9.0123.4567.89012345678901"
    with caplog.at_level("WARNING", logger="pydicom"):
        load_image(path)
        with pytest.warns(UserWarning):
            [e.value for e in pydicom.dcmread(path).iterall()]  # converting raw values warns about the UID
    assert caplog.records, "pydicom should have warned"
    assert uid not in caplog.text and "<redacted>" in caplog.text


def test_a_pydicom_sub_loggers_records_are_redacted_too(caplog):
    """A failed decode is logged by ``pydicom.pixels.decoders.base``, whose records the filter on ``pydicom``
    never saw (a logger's filters apply to its own records only)."""
    import logging

    load_image(get_testdata_file("CT_small.dcm"))  # the filters go on once DICOM is read
    with caplog.at_level("ERROR", logger="pydicom"):
        logging.getLogger("pydicom.pixels.decoders.base").error("cannot decode the data of 'DOE^JANE'")
    assert "DOE^JANE" not in caplog.text and "'<redacted>'" in caplog.text


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_photo_with_an_exif_orientation_loads_upright_as_viewers_show_it(fmt):
    """A phone's photo of a film is stored sideways with EXIF orientation 6 (turn 90° clockwise to view): the
    model, the tools and the overlay must see it as the user does, not lying on its side."""
    stored = np.zeros((40, 60), np.uint8)  # 60 wide, 40 high as stored
    stored[:10, :10] = 255  # top-left as stored → top-right once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, fmt, exif=exif)
    m = load_image(buf.getvalue())
    assert m.image.size == (40, 60) and (m.metadata["width"], m.metadata["height"]) == (40, 60)
    grey = np.asarray(m.image)[..., 0]
    assert grey[:8, -8:].min() > 200 and grey[:8, :8].max() < 50
    assert m.metadata["exif_orientation"] == 6
    assert "exif_orientation" not in load_image(png_bytes(stored)).metadata


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_the_upright_size_read_from_the_header_is_the_loaded_images(fmt):
    """The data builders normalise boxes by :func:`upright_size` (header only); it must be the size of the
    image :func:`load_image` serves (Pillow reports a TIFF's size turned already, a JPEG's not)."""
    from mmedagent.imaging import upright_size

    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("L", (40, 20)).save(buf, fmt, exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert upright_size(im) == load_image(buf.getvalue()).image.size == (20, 40)
