"""Flow codec (protocols.md P6), eq. (6) normalisation, Middlebury colour coding."""

import math
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch

from pretrain import flow as flowlib
from pretrain.flow import (
    color_wheel_image,
    decode_flow_png,
    encode_flow_png,
    flow_to_color,
    make_color_wheel,
    normalize_flow,
)


# --------------------------------------------------------------------------- #
# A PNG writer/reader independent of OpenCV (zlib + struct, PNG spec), used to
# check the codec against KITTI's layout without sharing its channel-order logic.
# --------------------------------------------------------------------------- #
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_rgb16(path, rgb: np.ndarray) -> None:
    """16-bit RGB PNG, channels in file order R, G, B (colour type 2), filter 0."""
    h, w, _ = rgb.shape
    rows = rgb.astype(">u2").reshape(h, w * 3)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def read_png_rgb16(path) -> np.ndarray:
    """Read a non-interlaced 16-bit RGB PNG (any filter types) -> uint16 (H, W, 3) RGB."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, ctype, interlace) == (16, 2, 0), (depth, ctype, interlace)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    bpp, stride = 6, w * 6
    out = np.zeros((h, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        cur = np.zeros(stride, dtype=np.int64)
        for x in range(stride):
            a = cur[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ftype == 0:
                pred = 0
            elif ftype == 1:
                pred = a
            elif ftype == 2:
                pred = b
            elif ftype == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
            cur[x] = (line[x] + pred) & 0xFF
        out[y] = cur
        prev = cur
    bytes_ = out.astype(np.uint8).reshape(h, w * 3, 2)
    return ((bytes_[..., 0].astype(np.uint16) << 8) | bytes_[..., 1]).reshape(h, w, 3)


# --------------------------------------------------------------------------- #
# Eq. (6)
# --------------------------------------------------------------------------- #
def test_normalize_flow_hand_values():
    f = np.array([0.0, 56.0, -56.0, 57.0, 1000.0, -1e6, 7.0, -7.0])
    got = normalize_flow(f)
    # log(7+1)/log(56+1) = log 8 / log 57 = 2.0794415 / 4.0430513 = 0.5143248
    mid = math.log(8.0) / math.log(57.0)
    assert abs(mid - 0.5143248) < 1e-7
    np.testing.assert_allclose(got, [0.0, 1.0, -1.0, 1.0, 1.0, -1.0, mid, -mid], rtol=0, atol=1e-12)


def test_normalize_flow_symmetry_range_and_custom_m():
    rng = np.random.default_rng(0)
    f = rng.normal(scale=30.0, size=(5, 6, 2))
    g = normalize_flow(f)
    np.testing.assert_array_equal(normalize_flow(-f), -g)
    assert g.shape == f.shape and np.all(np.abs(g) <= 1.0)
    # M = e - 1 makes the denominator 1: f' = log(|f|+1) for |f| <= M
    np.testing.assert_allclose(normalize_flow(np.array([0.5, -1.0]), max_magnitude=math.e - 1),
                               [math.log(1.5), -math.log(2.0)], rtol=1e-12)
    with pytest.raises(ValueError):
        normalize_flow(f, max_magnitude=0.0)


def test_normalize_flow_torch_matches_numpy_and_has_grad():
    rng = np.random.default_rng(1)
    f = rng.normal(scale=40.0, size=(3, 4, 2))
    t = torch.tensor(f, requires_grad=True)
    out = normalize_flow(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), normalize_flow(f), rtol=0, atol=1e-15)
    out.sum().backward()
    assert torch.isfinite(t.grad).all()
    # float32 numpy input stays float32
    assert normalize_flow(f.astype(np.float32)).dtype == np.float32


# --------------------------------------------------------------------------- #
# KITTI PNG codec (P6)
# --------------------------------------------------------------------------- #
def test_round_trip_random_flows(tmp_path):
    rng = np.random.default_rng(2)
    flow = rng.uniform(-500.0, 500.0, size=(37, 53, 2))
    valid = rng.random((37, 53)) > 0.2
    path = tmp_path / "flow.png"
    encode_flow_png(path, flow, valid)
    dec, dec_valid = decode_flow_png(path)
    assert dec.dtype == np.float32 and dec.shape == flow.shape
    assert dec_valid.dtype == np.bool_
    np.testing.assert_array_equal(dec_valid, valid)
    assert np.abs(dec - flow)[valid].max() <= 1.0 / 128 + 1e-9
    assert np.all(dec[~valid] == 0.0)
    assert os.listdir(tmp_path) == ["flow.png"]  # no temporary left behind


def test_encoded_file_has_kitti_layout(tmp_path):
    flow = np.array([[[1.5, -2.25], [0.0, 0.0], [np.nan, 3.0]],
                     [[600.0, -600.0], [-0.0078125, 0.0078125], [10.0, 20.0]]])
    valid = np.isfinite(flow).all(axis=2)
    valid[1, 2] = False  # finite but marked invalid: must be zeroed
    path = tmp_path / "f.png"
    encode_flow_png(path, flow, valid)
    rgb = read_png_rgb16(path)  # independent reader, file order R, G, B
    expected = np.array([[[32864, 32624, 1], [32768, 32768, 1], [0, 0, 0]],
                         [[65535, 0, 1], [32768, 32768, 1], [0, 0, 0]]])
    # +-600 px clip to [0, 65535]; +-1/128 px is half a tick: 32767.5 and
    # 32768.5 both round (half to even) to 32768.
    np.testing.assert_array_equal(rgb, expected.astype(np.uint16))


def test_default_valid_is_finite_pixels(tmp_path):
    flow = np.zeros((2, 2, 2))
    flow[0, 1, 0] = np.inf
    flow[1, 0, 1] = np.nan
    encode_flow_png(tmp_path / "f.png", flow)
    _, valid = decode_flow_png(tmp_path / "f.png")
    np.testing.assert_array_equal(valid, [[True, False], [False, True]])


def test_decode_independently_written_kitti_png(tmp_path):
    # Built by hand per the devkit: R = u*64 + 2^15, G = v*64 + 2^15, B = valid.
    rgb = np.zeros((2, 3, 3), dtype=np.uint16)
    rgb[0, 0] = [32768 + 96, 32768 - 144, 1]   # u = 1.5, v = -2.25
    rgb[0, 1] = [32768, 32768, 1]              # zero flow, valid
    rgb[0, 2] = [40000, 30000, 0]              # invalid: decoded as 0
    rgb[1, 0] = [0, 65535, 1]                  # u = -512, v = 511.984375
    rgb[1, 1] = [32769, 32767, 1]              # +-1/64
    rgb[1, 2] = [32768 + 64 * 100, 32768 - 64 * 7, 7]  # any nonzero B is valid
    path = tmp_path / "kitti.png"
    write_png_rgb16(path, rgb)
    flow, valid = decode_flow_png(path)
    np.testing.assert_array_equal(valid, [[True, True, False], [True, True, True]])
    expected = np.array([[[1.5, -2.25], [0.0, 0.0], [0.0, 0.0]],
                         [[-512.0, 65535 / 64 - 512], [1 / 64, -1 / 64], [100.0, -7.0]]], dtype=np.float32)
    np.testing.assert_array_equal(flow, expected)

    # The same array written with OpenCV (BGR on disk order reversed) decodes identically.
    cv2.imwrite(str(tmp_path / "cv.png"), np.ascontiguousarray(rgb[..., ::-1]))
    flow_cv, valid_cv = decode_flow_png(tmp_path / "cv.png")
    np.testing.assert_array_equal(flow_cv, expected)
    np.testing.assert_array_equal(valid_cv, valid)


def test_decode_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        decode_flow_png(missing)

    eight = tmp_path / "eight_bit.png"
    cv2.imwrite(str(eight), np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"eight_bit\.png.*16-bit"):
        decode_flow_png(eight)

    gray = tmp_path / "gray16.png"
    cv2.imwrite(str(gray), np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"gray16\.png.*3 channels"):
        decode_flow_png(gray)

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="junk.png"):
        decode_flow_png(junk)


def test_encode_validates_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W, 2\)"):
        encode_flow_png(tmp_path / "a.png", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="valid"):
        encode_flow_png(tmp_path / "a.png", np.zeros((4, 4, 2)), np.ones((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="bool"):
        encode_flow_png(tmp_path / "a.png", np.zeros((4, 4, 2)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        encode_flow_png(tmp_path / "a.png", np.full((4, 4, 2), np.nan), np.ones((4, 4), dtype=bool))
    assert os.listdir(tmp_path) == []


def test_encode_is_atomic(tmp_path, monkeypatch):
    from runtime import atomic

    path = tmp_path / "f.png"
    encode_flow_png(path, np.ones((3, 3, 2)))
    before = path.read_bytes()

    def interrupted(fd):  # the bytes are in the temporary file, not yet published
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_flow_png(path, np.zeros((3, 3, 2)))
    monkeypatch.undo()
    assert path.read_bytes() == before  # old file untouched
    assert os.listdir(tmp_path) == ["f.png"]  # temporary cleaned up

    monkeypatch.setattr(flowlib.cv2, "imencode", lambda ext, img, params=(): (False, None))
    with pytest.raises(OSError, match="f.png"):
        encode_flow_png(path, np.zeros((3, 3, 2)))
    assert os.listdir(tmp_path) == ["f.png"]


def test_encoded_bytes_equal_cv2_imwrite(tmp_path):
    """The in-memory encoder writes the bytes cv2.imwrite wrote before (format unchanged)."""
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(9, 11, 2)).astype(np.float32) * 30
    encode_flow_png(tmp_path / "a.png", flow)
    cv2.imwrite(str(tmp_path / "b.png"), np.ascontiguousarray(flowlib.flow_to_png_array(flow)[..., ::-1]))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    flowlib.write_image_atomic(tmp_path / "a.jpg", rgb, (cv2.IMWRITE_JPEG_QUALITY, 95))
    cv2.imwrite(str(tmp_path / "b.jpg"), np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert (tmp_path / "a.jpg").read_bytes() == (tmp_path / "b.jpg").read_bytes()


# --------------------------------------------------------------------------- #
# Colour coding (Baker et al.)
# --------------------------------------------------------------------------- #
def test_color_wheel_definition():
    wheel = make_color_wheel()
    assert wheel.shape == (55, 3)  # 15 + 6 + 4 + 11 + 13 + 6
    np.testing.assert_array_equal(wheel[0], [255, 0, 0])     # red
    np.testing.assert_array_equal(wheel[15], [255, 255, 0])  # yellow
    np.testing.assert_array_equal(wheel[21], [0, 255, 0])    # green
    np.testing.assert_array_equal(wheel[25], [0, 255, 255])  # cyan
    np.testing.assert_array_equal(wheel[36], [0, 0, 255])    # blue
    np.testing.assert_array_equal(wheel[49], [255, 0, 255])  # magenta
    np.testing.assert_array_equal(wheel[1], [255, 17, 0])    # floor(255/15)


def test_flow_to_color_directions():
    flow = np.array([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [3.0, 0.0]]])
    img = flow_to_color(flow, max_norm=1.0)
    assert img.dtype == np.uint8 and img.shape == (1, 6, 3)
    white, right, left, down, up, beyond = img[0].astype(int)
    np.testing.assert_array_equal(white, [255, 255, 255])   # centre of the wheel
    assert right[0] > 200 and right[1] < 60 and right[2] < 60  # red
    assert left[0] < 60 and left[1] > 150 and left[2] > 150    # cyan
    assert down[0] > 200 and down[1] > 100 and down[2] < 60    # orange/yellow
    assert up[2] > 200 and up[1] < 60                           # blue/violet
    np.testing.assert_array_equal(beyond, np.floor(0.75 * right + 0.5))  # saturated, darkened

    zero = flow_to_color(np.zeros((4, 5, 2)))  # max_norm=None on zero flow: all white
    assert np.all(zero == 255)
    # default max_norm = largest magnitude: same picture as passing it explicitly
    rng = np.random.default_rng(3)
    f = rng.normal(size=(6, 7, 2))
    np.testing.assert_array_equal(flow_to_color(f), flow_to_color(f, np.hypot(f[..., 0], f[..., 1]).max()))
    f[0, 0] = np.nan
    assert np.all(flow_to_color(f)[0, 0] == 0)


def test_color_wheel_image():
    img = color_wheel_image(65)
    assert img.shape == (65, 65, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[32, 32], [255, 255, 255])  # centre: zero flow
    assert img[32, 63, 0] > 200 and img[32, 63, 1] < 60          # right edge: red
    assert np.all(img[0, 0] == 0)                                # outside the disc
