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

:func:`open_rgb` is the lazy variant for training loaders: a JPEG stays encoded (an
:class:`EncodedJpeg`) until its pixels are needed, so that a transform that needs only a small
output can decode it at 1/2, 1/4 or 1/8 scale in the DCT domain (:meth:`EncodedJpeg.pixels`),
which costs a fraction of a full decode. Decode errors still name the file in one line.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from typing import NamedTuple

from PIL import JpegImagePlugin

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


DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg's scaled IDCT gives through PIL's draft()


def _decode_full_jpeg(data: bytes):
    """(H, W, 3) uint8 tensor of a JPEG at full size. OpenCV's libjpeg-turbo decoder gives the same
    pixels as PIL's (same library, same defaults; a test checks) in half the time (no RGBX
    buffer), and a tenth sooner than torchvision's; the EXIF orientation is ignored, as PIL does."""
    import cv2
    import numpy as np
    import torch

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        raise ValueError("OpenCV could not decode the JPEG data")
    return torch.from_numpy(pixels)


class EncodedJpeg(JpegImagePlugin.JpegImageFile):
    """A PIL JPEG image whose pixels are decoded on first use, from bytes held in memory.

    Anything PIL does with it decodes it in full (``load``), so it can stand in for the eagerly
    decoded image everywhere; a transform that knows the class asks :meth:`pixels` for a reduced
    decode instead. Failures become one-line DatasetErrors naming the file, as
    :func:`load_image`'s do."""

    def __init__(self, data: bytes, path):
        super().__init__(io.BytesIO(data), filename=str(path))
        self.encoded, self.source_path = data, path
        self._pixel_cache: dict = {}

    def load(self):
        try:
            return super().load()
        except Exception as err:  # noqa: BLE001
            raise image_error(getattr(self, "source_path", self.filename), err, "image") from None

    def pixels(self, reduction: int = 1):
        """``(H', W', 3)`` uint8 tensor decoded at ``1/reduction`` (one of DCT_SCALES), with
        H' = ceil(H / reduction). Cached, as a test-time transform reads one image several
        times. A reduced pixel covers exactly ``reduction`` source pixels, so source coordinates
        map onto it by division."""
        if reduction not in DCT_SCALES:
            raise ValueError(f"reduction must be one of {DCT_SCALES}, got {reduction}")
        cache = self.__dict__.setdefault("_pixel_cache", {})
        if reduction not in cache:
            cache[reduction] = self._decode(reduction)
        return cache[reduction]

    def _decode(self, reduction: int):
        import numpy as np
        import torch

        if not hasattr(self, "encoded"):  # unpickled: the pixels are already here, in full
            if reduction != 1:
                raise ValueError("an unpickled EncodedJpeg holds only its full-size pixels")
            return torch.from_numpy(np.array(self, dtype=np.uint8))
        try:
            if reduction == 1:
                return _decode_full_jpeg(self.encoded)
            small = EncodedJpeg(self.encoded, self.source_path)
            width, height = self.size
            small.draft("RGB", (width // reduction, height // reduction))
            expected = (-(-width // reduction), -(-height // reduction))
            if small.size != expected:  # draft chose another scale: never guess the mapping
                raise RuntimeError(f"draft gave {small.size}, expected {expected}")
            return torch.from_numpy(np.array(small, dtype=np.uint8))
        except DatasetError:
            raise
        except Exception as err:  # noqa: BLE001
            raise image_error(self.source_path, err, "image") from None


def open_rgb(path, what: str = "image"):
    """The RGB image at ``path`` for a training transform: an RGB JPEG comes back as an
    :class:`EncodedJpeg` (header parsed, completeness checked, pixels decoded when needed);
    anything else is decoded now by :func:`load_image`. Missing and truncated files fail here
    with one line naming them, as with :func:`load_image`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if not data.startswith(b"\xff\xd8"):
        return load_image(path, "RGB", what)
    if not jpeg_is_complete(data):
        raise DatasetError(f"{path}: cannot decode {what} (image file is truncated: no end-of-image marker)")
    try:
        image = EncodedJpeg(data, path)
    except Exception as err:  # noqa: BLE001
        raise image_error(path, err, what) from None
    if image.mode != "RGB":  # greyscale / CMYK JPEGs: converted now, as load_image does
        return load_image(path, "RGB", what)
    return image


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
           "image_header", "load_image", "open_rgb", "EncodedJpeg", "DCT_SCALES", "jpeg_is_complete", "check_jpeg_complete", "file_size"]
