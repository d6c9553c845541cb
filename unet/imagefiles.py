"""Image files read by their content: one reader for train.py and predict.py.

A file's format is told by its first bytes, not by its name (a PNG named ``.jpg`` is a PNG, and OpenCV
decodes it as one). A JPEG or PNG cut short is found by walking its structure to its end marker:
OpenCV decodes the part that is there without a word and fills the rest with grey. Data after the end
marker (a camera's trailer, zero padding) does no harm, and OpenCV ignores it too.

A palette PNG (PNG colour type 3, as PASCAL VOC stores its masks) holds one index per pixel and a
colour table; OpenCV always expands it to the table's colours. ``palette_indices`` gets the indices
back by decoding a copy of the file whose table is replaced by a grey ramp (entry i = (i, i, i)):
the decoded colours are then the indices themselves, with no PNG decoder of our own.
"""
from __future__ import annotations

import os
import zlib

import cv2 as cv
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = ((PNG_SIGNATURE, "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
# Chunks that would change a palette PNG's decoded values: transparency (an alpha channel) and colour
# corrections. Dropped from the grey-ramp copy, so that the decoder returns the bare indices.
_VALUE_CHANGING_CHUNKS = (b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT")


class ImageFileError(ValueError):
    """An image file that cannot be read or decoded; ``reason`` says why, the message names ``path``."""

    def __init__(self, path, reason):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path}: {reason}")


def file_format(data):
    """"PNG", "JPEG", "GIF", "BMP", "TIFF" or "WebP" from a file's first bytes; None for anything else."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def png_chunks(data):
    """``(type, start, end)`` of every chunk of a PNG up to IEND (its payload is ``data[start:end]``),
    or None if the file ends before its IEND chunk."""
    data = bytes(data)
    chunks, position = [], len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind, start = data[position + 4:position + 8], position + 8
        if start + length + 4 > len(data):        # the payload or its CRC is cut off
            return None
        chunks.append((kind, start, start + length))
        if kind == b"IEND":
            return chunks
        position = start + length + 4
    return None


def _jpeg_is_complete(data):
    """True if a JPEG's segments and scans run to its EOI marker.

    Segments after SOI carry their length, so an EXIF thumbnail (with its own EOI) inside APP1 is
    stepped over. After each segment the next marker is the next 0xFF followed by a marker code: in a
    scan's entropy-coded data 0xFF is always followed by 0x00 (a stuffed byte) or a restart marker
    RST0..7, and several 0xFF in a row are fill bytes, so none of those ends a scan. Stray bytes
    between segments are skipped as libjpeg skips them.
    """
    data = np.frombuffer(bytes(data), np.uint8)
    size = len(data)
    ff = np.flatnonzero(data[:-1] == 0xFF)
    code = data[ff + 1]
    markers = ff[(code != 0x00) & (code != 0xFF) & ((code < 0xD0) | (code > 0xD7))]
    position = 2                                       # after SOI
    while True:
        index = np.searchsorted(markers, position)
        if index == len(markers):
            return False
        marker = int(markers[index])
        code = data[marker + 1]
        if code == 0xD9:                               # EOI
            return True
        if code == 0x01 or code == 0xD8:               # TEM, SOI: no length
            position = marker + 2
            continue
        if marker + 4 > size:
            return False
        position = marker + 2 + (int(data[marker + 2]) << 8 | int(data[marker + 3]))
        if position > size:
            return False


def read_checked(path):
    """The bytes of an image file (uint8 array) and its format, after the checks a decoder skips:
    missing, unreadable, empty, or a JPEG or PNG that ends before its end marker."""
    try:
        data = np.fromfile(os.fspath(path), np.uint8)
    except FileNotFoundError:
        raise ImageFileError(path, "missing") from None
    except OSError as error:
        raise ImageFileError(path, f"unreadable ({error.strerror or error})") from None
    if data.size == 0:
        raise ImageFileError(path, "corrupt (an empty file)")
    kind = file_format(data)
    if (kind == "JPEG" and not _jpeg_is_complete(data)) or (kind == "PNG" and png_chunks(data) is None):
        raise ImageFileError(path, f"corrupt (truncated: the {kind} data ends before its end marker)")
    return data, kind


def decode_bytes(path, data, flags):
    """``cv.imdecode`` of ``data`` (from ``read_checked``), or an ImageFileError naming ``path``."""
    image = cv.imdecode(data, flags)
    if image is None:
        raise ImageFileError(path, "not an image OpenCV can decode (corrupt or wrong format)")
    return image


def read_image(path, flags=cv.IMREAD_COLOR):
    """The one reader: an image file decoded by ``cv.imdecode(flags)``, or an ImageFileError saying why not."""
    data, _ = read_checked(path)
    return decode_bytes(path, data, flags)


def _chunk(kind, payload):
    return (len(payload).to_bytes(4, "big") + kind + payload
            + zlib.crc32(kind + payload).to_bytes(4, "big"))


def is_palette_png(data):
    """True for a PNG of colour type 3 (palette indices): byte 25 is IHDR's colour type."""
    return file_format(data) == "PNG" and len(data) > 25 and data[25] == 3


def palette_indices(path, data):
    """The palette index of every pixel of a palette PNG, uint8 (H, W); ``data`` from ``read_checked``.

    The PLTE chunk is replaced by a grey ramp of the same length, which keeps the file valid, and the
    chunks that would add alpha or correct the colours are dropped; OpenCV then decodes the indices.
    """
    data = bytes(data)
    parts = [PNG_SIGNATURE]
    for kind, start, end in png_chunks(data):
        if kind == b"PLTE":
            entries = (end - start) // 3
            parts.append(_chunk(b"PLTE", np.repeat(np.arange(entries, dtype=np.uint8), 3).tobytes()))
        elif kind not in _VALUE_CHANGING_CHUNKS:
            parts.append(data[start - 8:end + 4])
    image = decode_bytes(path, np.frombuffer(b"".join(parts), np.uint8), cv.IMREAD_UNCHANGED)
    return image if image.ndim == 2 else image[:, :, 0]


def with_png_text(png, keyword, text):
    """An encoded PNG with a tEXt chunk ``keyword``=``text`` added after its IHDR chunk."""
    png = bytes(png)
    ihdr_end = png_chunks(png)[0][2] + 4
    return png[:ihdr_end] + _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")) + png[ihdr_end:]


def png_text(data):
    """The tEXt entries of a PNG as {keyword: text}; {} for a file that is no complete PNG."""
    data = bytes(data)
    chunks = png_chunks(data) if file_format(data) == "PNG" else None
    entries = {}
    for kind, start, end in chunks or []:
        if kind == b"tEXt" and b"\0" in data[start:end]:
            keyword, text = data[start:end].split(b"\0", 1)
            entries[keyword.decode("latin-1")] = text.decode("latin-1")
    return entries
