"""Hostile input a client controls: a deflated DICOM bomb, and text meant to forge log lines."""

import base64
import io
import logging
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian

from mmedagent.imaging import ImageLoadError, load_image
from mmedagent.serve.security import RedactFilter
from mmedagent.serve.uploads import UploadError, decode_image, image_from_data_url


def deflated_dicom(zeros: int) -> bytes:
    """A DICOM file whose data set is ``zeros`` zero bytes, deflated (Deflated Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    deflate, chunk = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), bytes(1 << 20)
    for _ in range(zeros >> 20):
        out.write(deflate.compress(chunk))
    out.write(deflate.flush())
    return out.getvalue()


def test_a_deflated_dicom_bomb_is_refused_before_pydicom_inflates_it():
    """pydicom inflates a deflated data set whole, unbounded: 1 MB of upload took 2 GB and minutes."""
    bomb = deflated_dicom(300 << 20)
    assert len(bomb) < 400_000  # may inflate to 8 bytes a pixel of its 32 M pixel limit, plus 1 MiB: 257 MiB
    with pytest.raises(UploadError, match=r"deflated DICOM data set inflates to more than [\d,]+ bytes "
                                          r"\(possible decompression bomb\)") as caught:
        decode_image(bomb, "application/dicom")
    assert caught.value.status == 400
    url = "data:application/dicom;base64," + base64.b64encode(bomb).decode()
    with pytest.raises(UploadError, match="possible decompression bomb"):  # the servers' path for client images
        image_from_data_url(url, 20 << 20)
    with pytest.raises(ImageLoadError, match="possible decompression bomb"):  # a file the CLI or a data builder reads
        load_image(bomb, max_pixels=10_000_000)


def test_a_genuine_deflated_dicom_still_loads():
    sample = Path(pydicom.__file__).parent / "data" / "test_files" / "image_dfl.dcm"
    image = decode_image(sample.read_bytes(), "application/dicom")
    assert image.image.size == (512, 512) and image.metadata["format"] == "dicom"


def _logged(filter_: RedactFilter, msg: str, *args, exc_info=None) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(filter_)
    handler.handle(logging.LogRecord("mmedagent.serve.controller", logging.INFO, __file__, 1, msg, args, exc_info))
    return stream.getvalue()


def test_a_client_cannot_forge_log_lines():
    """A worker address, a tool name or an exception's text with a line break wrote a second, forged line."""
    forged = "http://127.0.0.1:9\n2031-01-01 00:00:00 ERROR mmedagent.serve.controller: all good\x1b[2K\u2028"
    text = _logged(RedactFilter(), "worker %s left", forged)
    assert text.count("\n") == 1 and "\x1b" not in text and "\u2028" not in text
    assert text == "worker http://127.0.0.1:9\\n2031-01-01 00:00:00 ERROR mmedagent.serve.controller: all good" \
                   "\\x1b[2K\\u2028 left\n"
    try:
        raise UploadError(400, "first line\nsecond line")
    except UploadError as e:
        error = (type(e), e, e.__traceback__)
    text = _logged(RedactFilter(), "upload failed", exc_info=error)
    assert text.count("\n") == 1 and "first line\\nsecond line" in text
    whole = _logged(RedactFilter(full_tracebacks=True), "upload failed for %s", "a\nb", exc_info=error)
    assert whole.startswith("upload failed for a\\nb\nTraceback")  # the message one line, the traceback whole
