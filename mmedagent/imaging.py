"""Medical images in: one loader for PNG/JPEG/BMP/TIFF, DICOM and NIfTI.

:func:`load_image` detects the format from the content (PNG/JPEG/BMP/TIFF signatures, the DICOM
``DICM`` preamble or a bare DICOM data set, the NIfTI-1/2 header, gzip), decodes the pixels,
applies the modality LUT and a display window, and returns a :class:`MedicalImage`: the RGB
picture models see, the raw values (``array``) and **de-identified** metadata.

De-identification is by construction: metadata is built from an allow-list of non-identifying
attributes (modality, body part, spacing, geometry, window), never from the header as a whole,
and error messages never quote header values. :func:`deidentify_dataset` removes the PS3.15
basic-profile attributes from a pydicom data set for callers that must keep or forward a DICOM
file.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import operator
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "MedicalImage",
    "Window",
    "WINDOW_PRESETS",
    "MAX_PIXELS",
    "detect_format",
    "load_image",
    "parse_window",
    "describe_view",
    "deidentify_dataset",
    "apply_window",
]

log = logging.getLogger(__name__)

MAX_PIXELS = int(os.environ.get("MMEDAGENT_MAX_PIXELS", 1 << 28))
"""Largest number of pixels (2-D) or voxels (volumes) a file may declare before it is refused
(decompression-bomb guard). Override per call with ``max_pixels=`` or with the
``MMEDAGENT_MAX_PIXELS`` environment variable."""
EXIF_ORIENTATION = 0x0112
"""The EXIF tag of how a photo is to be turned to show upright; the decoded image is turned so."""

Plane = Literal["axial", "coronal", "sagittal"]
Format = Literal["png", "jpeg", "bmp", "tiff", "gif", "webp", "dicom", "nifti"]


class ImageLoadError(ValueError):
    """The input is not a usable image (wrong format, truncated, empty, too large, undecodable)."""


@dataclass(frozen=True)
class Window:
    """A display window in the image's value units (Hounsfield units for CT)."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.center) and np.isfinite(self.width)) or self.width <= 0:
            raise ValueError(f"window width must be a positive finite number, got center={self.center}, width={self.width}")


WINDOW_PRESETS: dict[str, Window] = {
    "brain": Window(40, 80),
    "lung": Window(-600, 1500),
    "abdomen": Window(40, 400),
    "bone": Window(400, 1800),
}
"""Common CT windows (centre, width in HU)."""

WindowSpec = None | str | Window | tuple[float, float]


@dataclass
class MedicalImage:
    """A decoded image: ``image`` (PIL RGB, what models see), ``array`` (float32 values after the
    modality LUT, before windowing; H×W or H×W×3) and ``metadata`` (de-identified)."""

    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)
    array: np.ndarray | None = field(default=None, repr=False)

    @property
    def warnings(self) -> list[str]:
        return list(self.metadata.get("warnings", []))

    def __repr__(self) -> str:
        m = self.metadata
        extra = "".join(f", {k}={m[k]!r}" for k in ("modality", "plane", "slice_index", "frame_index") if k in m)
        return f"MedicalImage(format={m.get('format')!r}, size={self.image.size}{extra})"

    __str__ = __repr__


# --------------------------------------------------------------------------- detection

_PIL_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return int.from_bytes(head[:4], "little") == 348 or int.from_bytes(head[:4], "big") == 348
    if len(head) >= 12 and head[4:12] in (b"n+2\x00\r\n\x1a\n", b"ni2\x00\r\n\x1a\n"):
        return int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
    return False


def _is_bare_dicom(head: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble: starts with a group 0002/0008 element."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[:2], "little")
    elem = int.from_bytes(head[2:4], "little")
    if group not in (0x0002, 0x0008) or elem > 0x0100:
        return False
    vr = head[4:6]
    # explicit VR: two upper-case letters; implicit VR: a 4-byte length that is small
    return (vr.isalpha() and vr.isupper()) or int.from_bytes(head[4:8], "little") < 1 << 16


def _inflated_head(head: bytes) -> bytes | None:
    """The first bytes of a file, inflated when gzipped (``None`` for a corrupt gzip stream)."""
    if head[:2] != b"\x1f\x8b":
        return head
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 600)
    except zlib.error:
        return None


def detect_format(head: bytes) -> Format | None:
    """The format of a file from its first bytes (at least 600 are best; gzip is looked into)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":
        inner = _inflated_head(head)
        return "nifti" if inner is not None and _is_nifti_header(inner) else None
    if _is_nifti_header(head):
        return "nifti"
    for sig, fmt in _PIL_SIGNATURES:
        if head.startswith(sig):
            return fmt  # type: ignore[return-value]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if _is_bare_dicom(head):
        return "dicom"
    return None


def _is_analyze_header(head: bytes) -> bool:
    """An Analyze 7.5 header (SPM's .hdr of a .hdr/.img pair): NIfTI-1's layout without its magic."""
    if len(head) < 348 or _is_nifti_header(head):
        return False
    order = "little" if int.from_bytes(head[:4], "little") == 348 else "big"
    return int.from_bytes(head[:4], order) == 348 and 1 <= int.from_bytes(head[40:42], order) <= 7  # dim[0]


def _pair_header(path: Path) -> tuple[Path, bytes] | None:
    """(header file, its first bytes) when ``path`` is the ``.img`` (voxel) half of a NIfTI or Analyze 7.5
    .hdr/.img pair, or the ``.hdr`` of an Analyze one (either suffix case, as DOS-era scanners write them)."""
    suffix = path.suffix
    if suffix.lower() == ".hdr":
        candidates = [path]
    elif suffix.lower() == ".img":
        candidates = [path.with_suffix(".hdr" if suffix.islower() else ".HDR"), path.with_suffix(".HDR" if suffix.islower() else ".hdr")]
    else:
        return None
    for header in candidates:
        try:
            with open(header, "rb") as f:
                head = f.read(1024)
        except OSError:
            continue
        if _is_analyze_header(head) or (header != path and _is_nifti_header(head)):
            return header, head
    return None


_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive (a study exported from a PACS?): extract it and load one of the image files in it"),
    (b"CDF\x01", "a MINC-1 volume, which is not read here: convert it to NIfTI (e.g. `mnc2nii`)"),
    (b"CDF\x02", "a MINC-1 volume, which is not read here: convert it to NIfTI (e.g. `mnc2nii`)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a MINC-2 volume?), which is not read here: convert it to NIfTI (e.g. `mnc2nii`)"),
    (b"MATRIX7", "an ECAT 7 PET file, which is not read here: convert it to NIfTI or DICOM"),
    (b"# === DATA DESCRIPTION FILE", "a Philips PAR header, which is not read here: convert the PAR/REC pair to NIfTI "
                                     "(e.g. nibabel's `parrec2nii`)"),
    (b"\ntype = string-attribute", "an AFNI .HEAD header, which is not read here: convert it to NIfTI (e.g. `3dAFNItoNIFTI`)"),
    (b"TRACK", "a TrackVis tractography file (streamlines), not an image"),
    (b"mrtrix tracks", "an MRtrix tractography file (streamlines), not an image"),
)


def _other_format(head: bytes) -> str | None:
    """What a file is that :func:`load_image` does not read, when its first bytes say (a ZIP archive, a
    MINC/MGZ/ECAT/PAR/AFNI volume, a gzipped DICOM, an Analyze header without its path), else ``None``."""
    for sig, what in _OTHER_FORMATS:
        if head.startswith(sig):
            return f"this is {what}"
    if _is_analyze_header(head):
        return ("this is the .hdr of an Analyze 7.5 .hdr/.img pair: its voxels are in the .img file; "
                "load the .hdr by its path, with the .img beside it")
    if head[:2] != b"\x1f\x8b":
        return None
    inner = _inflated_head(head)
    if not inner:
        return "the gzip stream is corrupt or cut off"
    if detect_format(inner) == "dicom":
        return "this is a gzip-compressed DICOM file: decompress it (gunzip) and load the file inside"
    if inner[:4] == b"\x00\x00\x00\x01":  # MGH format version 1, big-endian
        return "this is a FreeSurfer MGZ volume, which is not read here: convert it to NIfTI (e.g. `mri_convert`)"
    return "this is gzip-compressed data but not a NIfTI volume: decompress it (gunzip) and load the file inside"


def image_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded as an image, judged from its first bytes only (nothing is decoded):
    missing, unreadable, empty, a Git LFS pointer, an HTML page or no image format. ``None`` if it looks
    loadable (the ``.img`` half of a NIfTI pair included)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except FileNotFoundError:
        return "image not found"
    except OSError as e:
        return f"cannot read the image ({e.strerror or type(e).__name__})"
    if detect_format(head) or _pair_header(path) is not None:
        return None
    if not head:
        return "empty file, not an image"
    if other := _other_format(head):
        return other
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the image (fetch it: git lfs pull)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not an image"
    return "not an image file (no PNG/JPEG/BMP/TIFF/GIF/WebP/DICOM/NIfTI content)"


# --------------------------------------------------------------------------- windowing


def parse_window(spec: str) -> Window:
    """A window from text, as a command line gives it: a preset name or ``CENTER,WIDTH``."""
    if "," in spec:
        try:
            center, width = (float(v) for v in spec.split(","))
        except ValueError:
            raise ValueError(f"window {spec!r}: expected a preset or CENTER,WIDTH numbers") from None
        return Window(center, width)
    try:
        return WINDOW_PRESETS[spec.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown window preset {spec!r}: give a preset ({', '.join(WINDOW_PRESETS)}) or "
                         "CENTER,WIDTH in the scan's units, e.g. 40,400") from None


def _of(index: int, count: Any) -> str:
    """``index`` as the slice/frame/volume options count it, from 0, with their range: ``12 (of 0–23)``."""
    return f"{index} (of 0–{count - 1})" if isinstance(count, int) else str(index)


def describe_view(meta: dict[str, Any]) -> str:
    """What of an image a :class:`MedicalImage` shows, from its metadata: format, modality, plane and
    slice, frame, volume (counted from 0, as the options that choose them), window."""
    parts = [str(meta[k]) for k in ("format", "modality") if meta.get(k)]
    if "slice_index" in meta:
        parts.append(f"{meta.get('plane', '')} slice {_of(meta['slice_index'], meta.get('n_slices'))}".strip())
    if "frame_index" in meta:
        parts.append(f"frame {_of(meta['frame_index'], meta.get('n_frames'))}")
    if "n_volumes" in meta:
        parts.append(f"volume {_of(meta.get('volume', 0), meta['n_volumes'])}")
    window = meta.get("window")
    if isinstance(window, dict) and "center" in window:
        parts.append(f"window {window['center']:g}/{window['width']:g} ({meta.get('window_source', '?')})")
    return ", ".join(parts)


def _resolve_window(window: WindowSpec) -> Window | None:
    if window is None or isinstance(window, Window):
        return window
    if isinstance(window, str):
        return parse_window(window)
    try:
        center, width = window
        return Window(float(center), float(width))
    except (TypeError, ValueError) as e:
        raise ValueError(f"window must be a preset name, a Window or (center, width): {e}") from None


def apply_window(values: np.ndarray, window: Window, sigmoid: bool = False) -> np.ndarray:
    """Map values to 0..255 with a DICOM linear (PS3.3 C.11.2.1.2) or sigmoid VOI function."""
    v = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    if sigmoid:
        out = 255.0 / (1.0 + np.exp(-4.0 * (v - c) / w))
    elif w <= 1:
        out = np.where(v > c - 0.5, 255.0, 0.0)
    else:
        out = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def _auto_window(values: np.ndarray, lo_pct: float = 0.0, hi_pct: float = 100.0) -> Window | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = (np.percentile(finite, [lo_pct, hi_pct]) if (lo_pct, hi_pct) != (0, 100) else (finite.min(), finite.max()))
    if hi <= lo:
        return None
    # a linear window whose first and last grey levels land on lo and hi
    return Window(center=float(lo + hi) / 2 + 0.5, width=float(hi - lo) + 1)


def _to_display(values: np.ndarray, window: Window | None, sigmoid: bool = False) -> np.ndarray:
    if window is None:  # constant image
        return np.zeros(values.shape, dtype=np.uint8)
    return apply_window(np.nan_to_num(values), window, sigmoid)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _window_meta(window: Window | None, source: str) -> dict[str, Any]:
    if window is None:
        return {"window": None, "window_source": source}
    return {"window": {"center": round(window.center, 3), "width": round(window.width, 3)}, "window_source": source}


# --------------------------------------------------------------------------- input handling


def _check_pixels(n: int, max_pixels: int, what: str, knob: str = "max_pixels / MMEDAGENT_MAX_PIXELS") -> None:
    """Refuse an image that declares more than ``max_pixels``; ``knob`` is the setting that raises that limit."""
    if n <= 0:
        raise ImageLoadError(f"{what} declares no pixels")
    if n > max_pixels:
        raise ImageLoadError(
            f"{what} declares {n:,} pixels, more than the limit of {max_pixels:,} "
            f"(possible decompression bomb; raise {knob} if the file is trusted)"
        )


def _read_input(src: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO) -> tuple[bytes | None, Path | None]:
    """(bytes, None) for in-memory input, (None, path) for a file path."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), None
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageLoadError("image file not found" if not path.exists() else "image path is not a regular file")
        return None, path
    if hasattr(src, "read"):
        try:
            data = src.read()
        except UnicodeDecodeError:  # a text-mode file of binary content
            data = None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("load_image reads binary file objects: open the file with mode 'rb'")
        return bytes(data), None
    raise TypeError(f"load_image expects a path, bytes or a binary file object, not {type(src).__name__}")


# --------------------------------------------------------------------------- Pillow formats


def _load_pil(data: bytes, fmt: str, window: WindowSpec, frame: int | None, max_pixels: int) -> MedicalImage:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's message names only the in-memory buffer's address
        raise ImageLoadError(f"cannot read {fmt.upper()} image: the file is cut off or damaged") from None
    except (OSError, SyntaxError) as e:
        raise ImageLoadError(f"cannot read {fmt.upper()} image: {e}") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit
        raise ImageLoadError(f"image refused by Pillow's decompression-bomb limit: {e}") from None
    pil_limit = Image.MAX_IMAGE_PIXELS or max_pixels  # where Pillow starts warning of a bomb
    if pil_limit < max_pixels:  # Pillow's limit is the one in force: raising ours would not help
        _check_pixels(im.size[0] * im.size[1], pil_limit, f"{fmt.upper()} image", "Pillow's PIL.Image.MAX_IMAGE_PIXELS")
    _check_pixels(im.size[0] * im.size[1], max_pixels, f"{fmt.upper()} image")
    n_frames = getattr(im, "n_frames", 1)
    index = 0 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageLoadError(f"frame {index} out of range: the image has {n_frames} frame(s), 0 to {n_frames - 1}")
    try:
        if index:
            im.seek(index)
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"image refused by Pillow's decompression-bomb limit: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageLoadError(f"cannot decode {fmt.upper()} image (truncated or corrupt): {e}") from None

    white_is_zero = fmt == "tiff" and getattr(im, "tag_v2", {}).get(262) == 0
    orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    if orientation != 1:  # a phone's photo of a film: upright, as viewers and browsers show it
        im = ImageOps.exif_transpose(im)
    meta: dict[str, Any] = {"format": fmt, "mode": im.mode, "width": im.size[0], "height": im.size[1]}
    if orientation != 1:
        meta["exif_orientation"] = orientation
    if n_frames > 1:
        meta.update(frame_index=index, n_frames=n_frames)
    spec = _resolve_window(window)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(im, dtype=np.float32)
        meta["bit_depth"] = 16 if im.mode.startswith("I;16") else 32
        win = spec if spec is not None else _auto_window(values)
        meta.update(_window_meta(win, "explicit" if spec is not None else "min-max"))
        grey = _to_display(values, win)
        if white_is_zero:  # TIFF WhiteIsZero (a radiograph's MONOCHROME1): Pillow inverts it for 8-bit images only
            grey = 255 - grey
            meta["inverted"] = True
        return MedicalImage(_grey_to_rgb(grey), meta, values)
    if im.mode in ("L", "1") or (im.mode == "P" and _palette_is_grey(im)):
        grey = im.convert("L")
        values = np.asarray(grey, dtype=np.float32)
        meta["bit_depth"] = 8
        if spec is not None:
            meta.update(_window_meta(spec, "explicit"))
            return MedicalImage(_grey_to_rgb(apply_window(values, spec)), meta, values)
        return MedicalImage(grey.convert("RGB"), meta, values)
    rgb = im.convert("RGB")
    meta["bit_depth"] = 8
    return MedicalImage(rgb, meta, np.asarray(rgb, dtype=np.float32))


EXIF_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}
"""What turns the stored pixels of an image of each EXIF orientation upright (as ``ImageOps.exif_transpose``)."""


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened PIL image as :func:`load_image` gives it: turned upright by its EXIF
    orientation (5-8 turn it a quarter), read from the header alone."""
    w, h = im.size
    if im.format == "TIFF":  # Pillow reports a TIFF's size upright already (and turns it when loading)
        return w, h
    return (h, w) if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image file at ``path`` as :func:`load_image` gives it: from the header where
    Pillow reads the format (upright by its EXIF orientation), else by loading it (DICOM, NIfTI); an
    :class:`ImageLoadError` if it cannot be read."""
    with open(path, "rb") as f:
        fmt = detect_format(f.read(1024))
    if fmt not in (None, "dicom", "nifti"):
        try:
            with Image.open(path) as im:
                return upright_size(im)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            pass  # load_image names the problem
    return load_image(path).image.size


def _palette_is_grey(im: Image.Image) -> bool:
    pal = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
    return bool(pal.size) and bool(np.all(pal[:, 0] == pal[:, 1]) and np.all(pal[:, 1] == pal[:, 2]))


# --------------------------------------------------------------------------- DICOM

# PS3.15 Annex E basic application level confidentiality profile: attributes removed (or blanked)
# beyond those caught by VR (person names, dates, times, instance UIDs) and private tags.
_PHI_KEYWORDS = frozenset(
    """AccessionNumber AdmittingDiagnosesDescription AdditionalPatientHistory Allergies BranchOfService
    CountryOfResidence CurrentPatientLocation DeviceSerialNumber DerivationDescription EthnicGroup
    FillerOrderNumberImagingServiceRequest ImageComments InstitutionAddress InstitutionName
    InstitutionalDepartmentName IssuerOfPatientID MedicalAlerts MedicalRecordLocator MilitaryRank
    Occupation OtherPatientIDs OtherPatientIDsSequence OtherPatientNames PatientAddress PatientAge
    PatientBirthName PatientComments PatientID PatientInsurancePlanCodeSequence PatientMotherBirthName
    PatientReligiousPreference PatientSex PatientSize PatientState PatientTelephoneNumbers PatientWeight
    PerformedProcedureStepDescription PerformedProcedureStepID PlacerOrderNumberImagingServiceRequest
    PregnancyStatus ProtocolName RegionOfResidence RequestAttributesSequence RequestedProcedureDescription
    RequestedProcedureID ResponsibleOrganization ScheduledProcedureStepDescription ScheduledProcedureStepID
    SeriesDescription SmokingStatus SpecialNeeds StationName StudyComments StudyDescription StudyID
    TextComments TextString VisitComments AdmissionID PatientTransportArrangements InterpretationText
    ContentSequence OperatorIdentificationSequence PhysicianApprovingInterpretation
    ReferencedPatientSequence ReferencedStudySequence ReferencedImageSequence SourceImageSequence
    RequestingService ReasonForStudy OrderEnteredBy OrderEntererLocation PersonAddress
    PersonTelephoneNumbers DetectorID GantryID PlateID CassetteID ModifiedAttributesSequence
    OriginalAttributesSequence DigitalSignaturesSequence""".split()
)
_KEEP_UIDS = frozenset({"SOPClassUID", "TransferSyntaxUID", "MediaStorageSOPClassUID", "ReferencedSOPClassUID"})


_TYPE2_BLANKED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "AccessionNumber", "StudyID")


def deidentify_dataset(ds: Any, uid_map: dict[str, str] | None = None) -> Any:
    """Apply the PS3.15 basic confidentiality profile to a pydicom ``Dataset``, in place.

    Removes person names (PN), dates and times (DA/DT/TM), the identifying attributes the profile
    lists (IDs, addresses, institution, descriptions, comments, ...) and every private tag,
    recursing into sequences; replaces instance UIDs (UI other than SOP class / transfer syntax)
    with new ones, consistently through ``uid_map`` (pass the same dict for every file of a study
    to keep series together); leaves the mandatory patient/study attributes present but empty;
    sets ``PatientIdentityRemoved`` = ``YES``. Pixels are not touched (see BurnedInAnnotation).
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    uids = {} if uid_map is None else uid_map

    def new_uid(old: Any) -> str:
        key = str(old)
        if key not in uids:
            uids[key] = generate_uid()
        return uids[key]

    def walk(d: Dataset) -> None:
        d.remove_private_tags()
        for elem in list(d):
            kw = elem.keyword
            if kw in _KEEP_UIDS or kw == "PixelData":
                continue
            if elem.VR == "UI" and elem.value:
                elem.value = [new_uid(v) for v in elem.value] if elem.VM > 1 else new_uid(elem.value)
            elif elem.VR in ("PN", "DA", "DT", "TM") or kw in _PHI_KEYWORDS:
                del d[elem.tag]
            elif elem.VR == "SQ":
                for item in elem.value:
                    walk(item)

    with warnings.catch_warnings():  # pydicom's validation warnings quote the values being removed
        warnings.simplefilter("ignore")
        walk(ds)
    for kw in _TYPE2_BLANKED:
        setattr(ds, kw, "")
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID if "SOPInstanceUID" in ds else new_uid(meta.MediaStorageSOPInstanceUID)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "PS3.15 Basic Application Confidentiality Profile (mmedagent)"  # LO: <= 64 chars
    return ds


class _RedactQuotedValues(logging.Filter):
    """pydicom logs warnings that quote header values (names, UIDs); keep those out of logs."""

    _quoted = re.compile(r"'[^']*'")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._quoted.sub("'<redacted>'", record.getMessage())
        record.args = ()
        return True


_REDACT = _RedactQuotedValues()


def _redact_pydicom_logs() -> None:
    """The filter on pydicom's logger and each of its sub-loggers (``pydicom.pixels.decoders.base`` logs a failed
    decode): a logger's filter does not see its children's records."""
    import pydicom  # noqa: F401  - creates its sub-loggers

    for name in ["pydicom", *[n for n in logging.root.manager.loggerDict if n.startswith("pydicom.")]]:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


_DICOM_DECODER_HINT = (
    "install a decoder for it: `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg` "
    "(JPEG, JPEG-LS, JPEG 2000), `pip install pyjpegls` (JPEG-LS) or `pip install python-gdcm`"
)
_PIP_NAMES = {"gdcm": "python-gdcm"}  # import name → PyPI name, where they differ


def _decoder_hint(ts: Any) -> str:
    """What to install to decode pixel data of transfer syntax ``ts``: the packages of each of pydicom's
    plugins for it, e.g. ``pip install pylibjpeg pylibjpeg-openjpeg`` for JPEG 2000 (the generic hint
    when pydicom names none)."""
    from pydicom.pixels import get_decoder

    try:
        needs = get_decoder(ts).missing_dependencies  # "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
    except Exception:  # noqa: BLE001 - no decoder class for it, or an uncompressed syntax
        needs = []
    commands = []
    for need in needs:
        packages = [_PIP_NAMES.get(n, n) for n in re.findall(r"([A-Za-z][\w.-]*)>=", need.partition(" requires ")[2])]
        if packages:
            commands.append(f"`pip install {' '.join(packages)}`")
    if not commands:
        return _DICOM_DECODER_HINT
    return "install a decoder for it: " + (", ".join(commands[:-1]) + " or " if len(commands) > 1 else "") + commands[-1]


def _num(v: Any) -> float | None:
    """First value of a possibly multi-valued numeric DICOM element (MultiValue → first)."""
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        if len(v) == 0:
            return None
        v = v[0]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _floats(v: Any) -> list[float] | None:
    if v is None or v == "":
        return None
    seq = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
    try:
        out = [round(float(x), 6) for x in seq]
    except (TypeError, ValueError):
        return None
    return out or None


def _frame_group(ds: Any, frame: int, sequence: str) -> Any:
    """The item of functional-group macro ``sequence`` (``PixelMeasuresSequence``,
    ``PixelValueTransformationSequence``, ``FrameVOILUTSequence``…) that applies to ``frame`` of an
    enhanced (multi-frame) image: from the frame's PerFrameFunctionalGroupsSequence item, else from
    SharedFunctionalGroupsSequence. ``None`` when neither has it, as in classic single-frame files,
    which keep these attributes at the top level (pydicom's LUT functions read only those)."""
    from pydicom.dataset import Dataset

    for groups, i in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = ds.get(groups)[i].get(sequence)[0]
        except (TypeError, IndexError, KeyError, AttributeError):
            continue  # absent, empty or malformed here: try the shared groups
        if isinstance(item, Dataset):
            return item
    return None


def _dicom_window(item: Any) -> Window | None:
    """The first WindowCenter/WindowWidth pair of a data set or a FrameVOILUTSequence item, if usable."""
    center, width = _num(item.get("WindowCenter")), _num(item.get("WindowWidth"))
    return Window(center, width) if center is not None and width is not None and width > 0 else None


def _padding_mask(arr: np.ndarray, ds: Any) -> np.ndarray | None:
    """The pixels outside the scanned area (stored values equal to PixelPaddingValue, or between it
    and PixelPaddingRangeLimit), which PS3.3 C.7.5.1.1.2 keeps out of a window's computation: a CT's
    -2000 / -3024 padding circle would otherwise stretch min-max to a flat grey. ``None`` if none."""
    value = _num(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _num(ds.get("PixelPaddingRangeLimit"))
    lo, hi = sorted((value, value if limit is None else limit))
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() and not mask.all() else None


def _modality_values(arr: np.ndarray, ds: Any, frame: int) -> np.ndarray:
    """Stored values → modality values (HU for CT) for ``frame``. Enhanced CT/MR/PET keep Rescale
    Slope/Intercept in the frame's PixelValueTransformationSequence (per-frame, else shared), which
    pydicom's ``apply_modality_lut`` (top-level attributes only) does not read; those win, else the
    top-level Modality LUT Sequence or rescale through pydicom. An RT dose is scaled by its
    DoseGridScaling (stored integers → Gy), which pydicom leaves to the caller."""
    from pydicom.pixels import apply_modality_lut

    item = _frame_group(ds, frame, "PixelValueTransformationSequence")
    if item is not None:
        slope, intercept = _num(item.get("RescaleSlope")), _num(item.get("RescaleIntercept"))
        if slope is not None and intercept is not None:
            return arr.astype(np.float64) * slope + intercept
    values = apply_modality_lut(arr, ds)
    dose_scaling = _num(ds.get("DoseGridScaling")) if ds.get("Modality") == "RTDOSE" else None
    return values if dose_scaling is None else values * dose_scaling


def _dicom_meta(ds: Any, frame: int = 0) -> dict[str, Any]:
    """Allow-listed, non-identifying attributes only (spacing and thickness of ``frame`` for enhanced images)."""
    from pydicom.uid import UID

    meta: dict[str, Any] = {"format": "dicom"}
    for key, kw in (
        ("modality", "Modality"),
        ("body_part", "BodyPartExamined"),
        ("photometric_interpretation", "PhotometricInterpretation"),
        ("patient_position", "PatientPosition"),
        ("view_position", "ViewPosition"),
        ("laterality", "ImageLaterality"),
        ("dose_units", "DoseUnits"),
    ):
        val = ds.get(kw)
        if val not in (None, ""):
            meta[key] = str(val)
    for key, kw in (("rows", "Rows"), ("columns", "Columns"), ("bits_stored", "BitsStored"), ("samples_per_pixel", "SamplesPerPixel")):
        val = ds.get(kw)
        if val not in (None, ""):
            meta[key] = int(val)
    measures = _frame_group(ds, frame, "PixelMeasuresSequence")
    spacing = _floats(ds.get("PixelSpacing")) or _floats(ds.get("ImagerPixelSpacing"))
    if spacing is None and measures is not None:
        spacing = _floats(measures.get("PixelSpacing"))
    if spacing:
        meta["pixel_spacing"] = spacing  # (row, column) mm
    thickness = _num(ds.get("SliceThickness"))
    if thickness is None and measures is not None:
        thickness = _num(measures.get("SliceThickness"))
    if thickness is not None:
        meta["slice_thickness"] = round(thickness, 6)
    sop = ds.get("SOPClassUID")
    if sop:
        meta["sop_class"] = UID(str(sop)).name
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:
        meta["transfer_syntax"] = UID(str(ts)).name
    return meta


def _no_pixels_message(ds: Any) -> str:
    """Why a DICOM file without pixel data cannot be shown: what it is (its SOP class, a standard name,
    and modality; never a header value that identifies anyone) and what to load instead."""
    from pydicom.uid import UID, MediaStorageDirectoryStorage

    sop = UID(str(ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")))
    if sop == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        return ("this is a DICOMDIR, the index of a DICOM disc or folder, not an image: "
                "load one of the image files it lists (in the folders beside it)")
    kind = [sop.name] if sop.name != str(sop) else []  # a standard SOP class's name; no private or made-up UID
    if ds.get("Modality"):
        kind.append(f"modality {ds.Modality}")
    return (f"DICOM file has no pixel data ({', '.join(kind) or 'kind unknown'}), so it is not an image: "
            "load an image file of the study")


DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
"""Deflated Explicit VR Little Endian: the whole data set after the file meta is one deflate stream,
which pydicom inflates at once, without a limit (1 MB can declare gigabytes of zeros)."""


def _check_deflated_dicom(data: bytes, max_pixels: int) -> None:
    """An :class:`ImageLoadError` for a deflated DICOM whose data set inflates past 8 bytes a pixel at
    ``max_pixels`` (a float64 one) plus 1 MiB of header, counted piece by piece before pydicom inflates it whole. Any other
    transfer syntax, or file meta pydicom cannot read, is left to the decoder."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = io.BytesIO(data)
    try:  # where and how dcmread finds them: the preamble (if any), then the group 0002 elements
        read_preamble(stream, True)
        syntax = str(_read_file_meta_info(stream).get("TransferSyntaxUID", "")).strip("\0 ")
    except Exception:  # noqa: BLE001 - no readable file meta: dcmread reports the file
        return
    if syntax != DEFLATED_DICOM:
        return
    limit, size, piece = 8 * max_pixels + (1 << 20), 0, 1 << 20
    inflater, body = zlib.decompressobj(-zlib.MAX_WBITS), memoryview(data)[stream.tell():]
    try:
        for start in range(0, len(body), piece):  # the input a slice at a time: linear in its size
            pending = body[start:start + piece]
            while pending and not inflater.eof:
                size += len(inflater.decompress(pending, piece))
                if size > limit:
                    raise ImageLoadError(f"the deflated DICOM data set inflates to more than {limit:,} bytes "
                                         "(possible decompression bomb)")
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    except zlib.error:
        return  # a corrupt stream: dcmread says so


def _load_dicom(data: bytes, window: WindowSpec, frame: int | None, max_pixels: int) -> MedicalImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_voi, get_decoder

    _redact_pydicom_logs()
    _check_deflated_dicom(data, max_pixels)
    # pydicom's warnings can quote header values; they must not reach logs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
            raise ImageLoadError(f"cannot parse DICOM file ({type(e).__name__})") from None

        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise ImageLoadError(_no_pixels_message(ds))
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = ds.get("NumberOfFrames")
            if frames not in (None, "") and _num(frames) is None:  # pydicom's own error would quote it
                raise ValueError
            n_frames = int(_num(frames) or 1)
            spp = int(ds.get("SamplesPerPixel", 1) or 1)
        except (AttributeError, TypeError, ValueError):
            raise ImageLoadError("DICOM image lacks valid Rows / Columns / NumberOfFrames") from None
        _check_pixels(rows * cols * max(n_frames, 1) * max(spp, 1), max_pixels, "DICOM image (all frames and samples)")

        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed:
            try:
                decoder = get_decoder(ts)
            except NotImplementedError:
                raise ImageLoadError(f"DICOM transfer syntax {ts.name!r} is not supported by pydicom") from None
            if not decoder.is_available:
                raise ImageLoadError(f"DICOM pixel data is compressed with {ts.name!r} and no decoder is installed; {_decoder_hint(ts)}")

        index = (n_frames // 2 if frame is None else frame)
        if not 0 <= index < n_frames:
            raise ImageLoadError(f"frame {index} out of range: the DICOM image has {n_frames} frame(s), 0 to {n_frames - 1}")
        meta = _dicom_meta(ds, index)
        try:
            arr = ds.pixel_array if n_frames == 1 else pydicom.pixels.pixel_array(ds, index=index)
        except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, OSError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            if isinstance(e, RuntimeError) and "missing dependencies" in str(e):
                raise ImageLoadError(f"no decoder for this DICOM pixel data; {_decoder_hint(ts)}") from None
            if isinstance(e, RuntimeError) and lines[0].startswith("Unable to decode") and len(lines) > 1:
                # every installed plugin failed (e.g. Pillow and 12-bit JPEG): their reasons, not the header line
                reasons = "; ".join(lines[1:])[:300]
                ts_name = ts.name if ts is not None else "uncompressed"
                raise ImageLoadError(
                    f"the installed decoders cannot decode this {ts_name} pixel data ({reasons}); "
                    f"unless the file is corrupt, {_decoder_hint(ts)}"
                ) from None
            raise ImageLoadError(f"cannot decode DICOM pixel data (truncated or corrupt): {lines[0][:200]}") from None
        if n_frames > 1:
            meta.update(frame_index=index, n_frames=n_frames)

        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        spec = _resolve_window(window)
        if spp == 3 or photometric == "PALETTE COLOR":
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
            bits = int(ds.get("BitsStored", 8) or 8) if photometric != "PALETTE COLOR" else 16
            rgb = arr.astype(np.float64)
            if arr.dtype != np.uint8:
                rgb = rgb / max(float(2**bits - 1), 1.0) * 255.0
            rgb8 = np.clip(rgb, 0, 255).astype(np.uint8)
            return MedicalImage(Image.fromarray(rgb8, mode="RGB"), meta, arr.astype(np.float32))

        values = _modality_values(arr, ds, index).astype(np.float32)
        # enhanced images keep the frame's window in FrameVOILUTSequence (per-frame, else shared)
        frame_voi = _frame_group(ds, index, "FrameVOILUTSequence")
        function = (frame_voi.get("VOILUTFunction") if frame_voi is not None else None) or ds.get("VOILUTFunction")
        sigmoid = str(function or "LINEAR").upper() == "SIGMOID"
        if spec is not None:
            grey = apply_window(values, spec, sigmoid)
            meta.update(_window_meta(spec, "explicit"))
        elif "VOILUTSequence" in ds:
            lut_out = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float64)
            desc = ds.VOILUTSequence[0].LUTDescriptor
            top = float(2 ** int(desc[2]) - 1)
            grey = np.clip(lut_out / top * 255.0, 0, 255).astype(np.uint8)
            meta.update(window=None, window_source="voi_lut")
        elif (win := (_dicom_window(frame_voi) if frame_voi is not None else None) or _dicom_window(ds)) is not None:
            grey = apply_window(values, win, sigmoid)
            meta.update(_window_meta(win, "dicom"))
        else:
            padding = _padding_mask(arr, ds)
            win = _auto_window(values if padding is None else values[~padding])
            grey = _to_display(values, win)
            meta.update(_window_meta(win, "min-max"))
        if photometric == "MONOCHROME1":
            grey = 255 - grey
            meta["inverted"] = True

        burned = str(ds.get("BurnedInAnnotation", "")).upper()
        if burned == "YES":
            meta.setdefault("warnings", []).append(
                "BurnedInAnnotation is YES: the pixels may show patient-identifying text; review before sharing"
            )
        return MedicalImage(_grey_to_rgb(grey), meta, values)


# --------------------------------------------------------------------------- NIfTI


def _nifti_class(head: bytes) -> Any:
    """The nibabel class for an (inflated) NIfTI header: NIfTI-1 or -2, single file or .hdr/.img pair."""
    import nibabel as nib

    if _is_analyze_header(head):
        return nib.Spm2AnalyzeImage  # as nib.load reads it: SPM's scale factor and origin
    nifti2 = 540 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))  # sizeof_hdr
    pair = (head[4:8] if nifti2 else head[344:348]) == (b"ni2\x00" if nifti2 else b"ni1\x00")
    return {(False, False): nib.Nifti1Image, (True, False): nib.Nifti2Image,
            (False, True): nib.Nifti1Pair, (True, True): nib.Nifti2Pair}[nifti2, pair]


def _gunzip_nifti(data: bytes, max_pixels: int, volume: int = 0) -> bytes:
    """Inflate a gzipped NIfTI only as far as its header declares, and of a 4-D image only up to the
    volume read: trailing data (a decompression bomb's payload) is never inflated, and an oversized
    declaration is refused before any of it is. Streamed in pieces into one buffer, so a volume costs
    its own size once; multi-member streams (bgzip) are read through, as nibabel reads them from a path."""
    out = io.BytesIO()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            head = f.read(540)  # the longest header (NIfTI-2)
            header = _nifti_class(head).header_class.from_fileobj(io.BytesIO(head))
            shape = tuple(map(int, header.get_data_shape()))  # Python ints: no overflow
            _check_pixels(math.prod(shape[:3]), max_pixels, "NIfTI volume")
            volumes = min(volume + 1, shape[3]) if len(shape) == 4 else math.prod(shape[3:])
            size = int(header.get_data_offset()) + math.prod(shape[:3]) * volumes * header.get_data_dtype().itemsize
            limit = max_pixels * 8 + (1 << 20)
            if size > limit:
                raise ImageLoadError(
                    f"NIfTI data declares {size:,} bytes, larger than {limit:,} (possible decompression bomb)")
            out.write(head)
            while out.tell() < size and (chunk := f.read(min(size - out.tell(), 1 << 18))):
                out.write(chunk)
    except (zlib.error, gzip.BadGzipFile) as e:
        raise ImageLoadError(f"corrupt gzip stream: {e}") from None
    except EOFError:
        raise ImageLoadError("gzip stream is truncated") from None
    if out.tell() < size:
        raise ImageLoadError("gzip stream is truncated")
    return out.getvalue()  # the buffer itself, not a copy


_PLANE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # of a RAS+ volume


def _ras_slice(
    img: Any, shape: tuple[int, ...], plane: str, index: int | None, volume: int
) -> tuple[np.ndarray, int, int, list[float]]:
    """Slice ``index`` (default middle) of ``plane`` of the volume turned to RAS+ (as
    ``nibabel.as_closest_canonical`` turns it), reading only that slice of ``volume`` from the file, in
    radiological display (patient's right on the image's left, anterior / superior at the top).
    Returns (slice, index, number of slices, RAS voxel spacing)."""
    import nibabel as nib

    ornt = nib.io_orientation(img.affine)  # per voxel axis: (RAS axis, +1 / -1)
    if np.isnan(ornt).any():  # a degenerate affine: the voxel axes as they are
        ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    ras_axes = [int(a) for a in ornt[:, 0]]
    shape3 = (shape + (1,))[:3]
    normal = ras_axes.index(_PLANE_AXES[plane])  # the voxel axis across the plane
    n = shape3[normal]
    k = n // 2 if index is None else index
    if not 0 <= k < n:
        raise ImageLoadError(f"slice {k} out of range: the {plane} plane has {n} slice(s), 0 to {n - 1}")
    where: list[Any] = [slice(None)] * 3
    where[normal] = k if ornt[normal, 1] > 0 else n - 1 - k
    if len(shape) == 4:
        where.append(volume)
    source = img.dataobj if len(shape) > 2 else np.asarray(img.dataobj)[:, :, None]
    sl = np.asarray(source[tuple(where)], dtype=np.float32)  # the two other voxel axes, in file order
    rest = [a for a in range(3) if a != normal]
    for j, a in enumerate(rest):
        if ornt[a, 1] < 0:
            sl = np.flip(sl, j)
    if ras_axes[rest[0]] > ras_axes[rest[1]]:
        sl = sl.T  # now (lower RAS axis, higher RAS axis): rows of the display are the higher one
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - min(len(shape), 3))
    ras_zooms = [0.0] * 3
    for a in range(3):
        ras_zooms[ras_axes[a]] = round(zooms[a], 6)
    return np.ascontiguousarray(sl.T[::-1, ::-1]), k, n, ras_zooms


def _available_bytes(img: Any, data: bytes | None, wanted: int) -> int:
    """How many bytes (up to ``wanted``) the voxel file of ``img`` holds: ``data`` when read from
    memory, else the file's size, or for a compressed file what inflates (streamed, never held)."""
    from nibabel.openers import ImageOpener

    if data is not None:
        return len(data)
    filename = img.file_map["image"].filename
    if os.path.splitext(filename)[1].lower() not in ImageOpener.compress_ext_map:  # as nibabel opens it
        return os.path.getsize(filename)
    got = 0
    try:
        with ImageOpener(filename) as f:
            while got < wanted and (chunk := f.read(min(wanted - got, 1 << 22))):
                got += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # a truncated or corrupt stream: what inflated before it
    return got


def _load_nifti(
    data: bytes | None, path: Path | None, window: WindowSpec, index: int | None, plane: str, volume: int, max_pixels: int
) -> MedicalImage:
    """``path`` (read by nibabel, which maps uncompressed files) or else ``data``; a .hdr/.img pair
    only by path."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        if path is not None:
            with open(path, "rb") as f:
                cls = _nifti_class(_inflated_head(f.read(600)) or b"")
            img = cls.from_filename(str(path))  # the header's class, not nib.load's guess (CIFTI-2, ...)
            if not Path(img.file_map["image"].filename).is_file():
                kind = "Analyze" if cls is nib.Spm2AnalyzeImage else "NIfTI"
                raise ImageLoadError(f"{kind} header without its voxel data: the .img file of this .hdr/.img pair is missing")
        else:
            assert data is not None
            if data[:2] == b"\x1f\x8b":
                data = _gunzip_nifti(data, max_pixels, volume)
            cls = _nifti_class(data)
            if "header" in dict(cls.files_types):
                raise ImageLoadError(
                    "this is the .hdr of a NIfTI .hdr/.img pair: its voxels are in the .img file; "
                    "load the .hdr by its path, with the .img beside it"
                )
            img = cls.from_bytes(data)
    except ImageLoadError:
        raise
    except (ImageFileError, OSError, ValueError, EOFError, gzip.BadGzipFile) as e:
        raise ImageLoadError(f"cannot read NIfTI file: {e}") from None
    if img.get_data_dtype().names:
        raise ImageLoadError("colour (RGB24/RGBA32) NIfTI images are not supported: only single-valued voxels")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise ImageLoadError(f"NIfTI image has {len(shape)} dimension(s); need at least 2")
    _check_pixels(math.prod(shape[:3]), max_pixels, "NIfTI volume")
    if len(shape) > 4 or (len(shape) == 4 and not 0 <= volume < shape[3]):
        if len(shape) > 4:
            raise ImageLoadError(f"NIfTI images with {len(shape)} dimensions are not supported")
        raise ImageLoadError(f"volume {volume} out of range: the image has {shape[3]} volume(s), 0 to {shape[3] - 1}")
    # only one slice is read: make sure the file holds the whole volume shown, as a full read would
    end = int(img.dataobj.offset) + math.prod(shape[:3]) * (volume + 1) * img.get_data_dtype().itemsize
    if _available_bytes(img, data, end) < end:
        raise ImageLoadError("cannot read NIfTI voxel data (truncated or corrupt): the file ends inside the volume")

    original = "".join(code or "?" for code in nib.aff2axcodes(img.affine))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sl, k, n, zooms = _ras_slice(img, shape, plane, index, volume)
        except ImageLoadError:
            raise
        except (OSError, ValueError, EOFError, zlib.error) as e:
            raise ImageLoadError(f"cannot read NIfTI voxel data (truncated or corrupt): {e}") from None
    in_plane = {"axial": (zooms[1], zooms[0]), "coronal": (zooms[2], zooms[0]), "sagittal": (zooms[2], zooms[1])}[plane]
    analyze = isinstance(img, nib.Spm2AnalyzeImage)
    meta: dict[str, Any] = {
        "format": "analyze" if analyze else "nifti",
        "shape": list(shape),
        "orientation": "RAS",
        "original_orientation": original,
        "voxel_spacing": zooms,
        "pixel_spacing": list(in_plane),
        "plane": plane,
        "slice_index": k,
        "n_slices": n,
    }
    if len(shape) == 4:
        meta.update(volume=volume, n_volumes=shape[3])
    units = img.header.get_xyzt_units()[0] if not analyze else None  # Analyze 7.5 headers have no units
    if units and units != "unknown":
        meta["spatial_units"] = units
    if analyze:
        meta["warnings"] = ["Analyze 7.5 stores no orientation: left and right are as SPM assumes (stored "
                            "radiologically); check them against a marker before relying on them"]
    spec = _resolve_window(window)
    if spec is not None:
        win, source = spec, "explicit"
    else:
        win, source = _auto_window(sl, 0.5, 99.5), "percentile 0.5-99.5"
    meta.update(_window_meta(win, source))
    return MedicalImage(_grey_to_rgb(_to_display(sl, win)), meta, np.ascontiguousarray(sl, dtype=np.float32))


# --------------------------------------------------------------------------- entry point


def load_image(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO,
    window: WindowSpec = None,
    slice_index: int | None = None,
    plane: Plane = "axial",
    *,
    volume: int = 0,
    max_pixels: int | None = None,
) -> MedicalImage:
    """Load a PNG/JPEG/BMP/TIFF/GIF/WebP, DICOM or NIfTI image, detecting the format from content
    (a NIfTI .hdr/.img pair by the path of either file; of a volume, only the slice shown is read).

    ``window``: ``None`` (DICOM: the file's VOI LUT or first window centre/width (enhanced images: the
    frame's FrameVOILUTSequence), else min-max;
    NIfTI: 0.5-99.5 percentile of the slice; 16-bit images: min-max; 8-bit images unchanged),
    a preset name (:data:`WINDOW_PRESETS`) or ``(center, width)`` in the image's units.
    ``slice_index``: the NIfTI slice in ``plane`` (volumes reoriented to RAS+; default middle), the
    frame of a multi-frame DICOM (default middle) or of a multi-page TIFF/GIF (default first).
    ``volume``: which volume of a 4-D NIfTI. ``max_pixels``: refuse larger images
    (default :data:`MAX_PIXELS`). Raises :class:`ImageLoadError` for anything unusable.
    """
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    data, path = _read_input(path_or_bytes)
    if path is not None:
        with open(path, "rb") as f:
            head = f.read(1024)
    else:
        head = data[:1024]  # type: ignore[index]
    if not head:
        raise ImageLoadError("empty file: no bytes to decode")
    pair = _pair_header(path) if path is not None else None
    if pair is not None:  # by its header, also when the first voxels happen to look like another format
        path, head = pair
    fmt = "nifti" if pair is not None else detect_format(head)
    if fmt is None:
        raise ImageLoadError(_other_format(head) or
                             "not a recognised image: expected PNG, JPEG, BMP, TIFF, GIF, WebP, DICOM or NIfTI content")
    if plane not in _PLANE_AXES:
        raise ValueError(f"plane must be axial, coronal or sagittal, not {plane!r}")
    try:  # NumPy integers too, as plain ints (they end up in JSON-able metadata)
        slice_index = None if slice_index is None else operator.index(slice_index)
        volume = operator.index(volume)
    except TypeError:
        raise TypeError("slice_index must be an int or None, and volume an int") from None
    _resolve_window(window)  # a bad window is the caller's error, not the file's
    try:
        if fmt == "nifti":
            gz = head[:2] == b"\x1f\x8b"
            name = path.name.lower() if path is not None else ""
            pair = "header" in dict(_nifti_class(_inflated_head(head) or b"").files_types)
            direct = path is not None and name.endswith((".hdr" if pair else ".nii") + (".gz" if gz else ""))
            if path is not None and not direct:
                data = path.read_bytes()
            return _load_nifti(None if direct else data, path if direct else None, window, slice_index, plane, volume, limit)
        if data is None:
            data = path.read_bytes()  # type: ignore[union-attr]
        if fmt == "dicom":
            return _load_dicom(data, window, slice_index, limit)
        return _load_pil(data, fmt, window, slice_index, limit)
    except ImageLoadError:
        raise
    except Exception as e:  # a decoder's own error on corrupt data: its text may quote the file's bytes
        log.debug("decoding failed", exc_info=True)  # for debugging, off by default
        raise ImageLoadError(f"cannot decode the {fmt.upper()} data: corrupt or unsupported ({type(e).__name__})") from None

