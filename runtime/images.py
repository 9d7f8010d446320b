"""Image files checked cheaply, and decoded with one-line errors.

Shared by the transfer benchmarks (``evals.datasets``) and pretraining (``pretrain.data``), which
must not import each other. Three levels of cost:

* :func:`read_png_header` parses a PNG's IHDR chunk (33 bytes): size, bit depth and colour
  type, exactly, without decoding. That is what a KITTI flow PNG needs (16-bit RGB).
* :func:`image_header` opens any image with PIL, which reads only the header (format, size,
  mode); garbage bytes and unknown formats fail here.
* :func:`load_image` decodes fully. PIL decodes lazily, so the full load happens inside the
  ``try``: a truncated or corrupt file raises :class:`DatasetError` naming it, never a raw PIL
  traceback (which a DataLoader worker would wrap in pages of text).

:func:`jpeg_is_complete` finds a JPEG cut short, which OpenCV decodes silently (grey fill).
"""
from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple

from runtime.errors import DatasetError, MissingFileError, one_line

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (PNG spec, 11.2.2)
PNG_COLOUR_NAMES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}


class PngHeader(NamedTuple):
    width: int
    height: int
    bit_depth: int
    colour_type: int

    @property
    def channels(self) -> int:
        return PNG_CHANNELS.get(self.colour_type, 0)

    def describe(self) -> str:
        name = PNG_COLOUR_NAMES.get(self.colour_type, f"colour type {self.colour_type}")
        return f"{self.bit_depth}-bit {name} ({self.channels} channel{'s' if self.channels != 1 else ''})"


def _read_prefix(path, count: int, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read {what} ({err.strerror or err})") from None


def read_png_header(path, what: str = "PNG") -> PngHeader:
    """The IHDR fields of a PNG file, from its first 33 bytes (signature, IHDR with CRC).

    Exact and cheap: OpenCV cannot read a header without decoding, and PIL reports a 16-bit RGB
    PNG as mode 'RGB' (8-bit), hiding the bit depth this check exists for.
    """
    head = _read_prefix(path, 33, what)
    if not head.startswith(PNG_SIGNATURE):
        raise DatasetError(f"{path}: not a PNG file (no PNG signature)")
    if len(head) < 33:
        raise DatasetError(f"{path}: truncated PNG ({len(head)} bytes, no complete IHDR chunk)")
    length, kind = struct.unpack(">I4s", head[8:16])
    if kind != b"IHDR" or length != 13:
        raise DatasetError(f"{path}: malformed PNG (first chunk is {kind!r}, expected IHDR)")
    data, (crc,) = head[16:29], struct.unpack(">I", head[29:33])
    if zlib.crc32(kind + data) != crc:
        raise DatasetError(f"{path}: malformed PNG (IHDR checksum mismatch)")
    width, height, depth, colour = struct.unpack(">IIBB", data[:10])
    if width == 0 or height == 0:
        raise DatasetError(f"{path}: PNG has an empty size {width}x{height}")
    return PngHeader(width, height, depth, colour)


def check_flow_png_header(path, size: tuple[int, int] | None = None) -> PngHeader:
    """A KITTI flow PNG's header: 16-bit, RGB (u, v, valid), and ``size`` = (width, height) if
    given. Raises DatasetError naming the file."""
    header = read_png_header(path, "flow PNG")
    if header.bit_depth != 16:
        raise DatasetError(f"{path}: flow PNG must be 16-bit, got {header.describe()} "
                           f"(an ordinary 8-bit image?)")
    if header.colour_type != 2:
        raise DatasetError(f"{path}: flow PNG must have 3 channels (u, v, valid), got {header.describe()}")
    if size is not None and (header.width, header.height) != tuple(size):
        raise DatasetError(f"{path}: flow PNG is {header.width}x{header.height}, expected {size[0]}x{size[1]}")
    return header


def image_error(path, err: BaseException, what: str = "image") -> DatasetError:
    """The one-line DatasetError for a PIL/OpenCV failure on ``path``."""
    if isinstance(err, DatasetError):
        return err
    if isinstance(err, FileNotFoundError):
        return MissingFileError(f"{path}: {what} file not found")
    name = type(err).__name__
    if name == "UnidentifiedImageError":  # PIL's message repeats the path
        return DatasetError(f"{path}: cannot decode {what} (not a recognised image format)")
    reason = one_line(err) if str(err).strip() else name
    return DatasetError(f"{path}: cannot decode {what} ({reason})")


def image_header(path, what: str = "image") -> tuple[str, int, int, str]:
    """``(format, width, height, mode)`` of an image, reading only its header (PIL)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format or "", image.width, image.height, image.mode
    except Exception as err:  # noqa: BLE001 -- PIL raises many types (OSError, SyntaxError, ...)
        raise image_error(path, err, what) from None


def load_image(path, mode: str | None = "RGB", what: str = "image"):
    """The fully decoded PIL image (converted to ``mode`` unless None); any failure is a one-line
    DatasetError naming ``path``."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # PIL decodes lazily: make truncation fail here, inside the try
            return image.convert(mode) if mode else image.copy()
    except Exception as err:  # noqa: BLE001
        raise image_error(path, err, what) from None


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first start-of-scan marker, walking the segments (so that an EXIF thumbnail,
    itself a JPEG inside APP1, is skipped whole); None when the markers are malformed."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return pos
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        pos += 2 + length
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """False for a JPEG without an end-of-image marker after its first scan (cut short); True
    for anything that is not a JPEG (other formats are left to their decoders)."""
    if not data.startswith(b"\xff\xd8"):
        return True
    start = _jpeg_scan_start(data)
    return start is not None and data.rfind(b"\xff\xd9") > start


def check_jpeg_complete(path, what: str = "image") -> None:
    """Raise DatasetError if ``path`` is a JPEG cut short (see :func:`jpeg_is_complete`)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} file not found") from None
    if not jpeg_is_complete(data):
        raise DatasetError(f"{path}: truncated JPEG (no end-of-image marker after the image data)")


def file_size(path, what: str = "file") -> int:
    """``os.stat`` size; a missing path is a MissingFileError naming it."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot stat {what} ({err.strerror or err})") from None


__all__ = ["PNG_SIGNATURE", "PngHeader", "read_png_header", "check_flow_png_header", "image_error",
           "image_header", "load_image", "jpeg_is_complete", "check_jpeg_complete", "file_size"]
