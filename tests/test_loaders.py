"""The fast image path (lazy JPEGs, DCT-domain reduced decodes, fused resize + crop) keeps the
protocol's augmentation: same rng -> same windows as the reference code, outputs close to the
full-decode path, and no reduced decode where it would upsample."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.alexnet import IMAGENET_MEAN, IMAGENET_STD
from evals import common
from evals.common import center_crop, dct_reduction, random_crop_mirror, random_scaled_view, resize_shorter
from runtime.errors import DatasetError
from runtime.images import EncodedJpeg, open_rgb

ROOT = Path(__file__).resolve().parents[1]
ONE_LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)  # one grey level in normalised units


# ----------------------------------------------------------------------------- the reference code


def ref_to_tensor(image):
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def ref_window(size, rng, crop, scale_range, mirror=True):
    """The reference random_scaled_view's draws: (box, mirrored)."""
    width, height = size
    side = min(crop * rng.uniform(*scale_range), width, height)
    x0, y0 = rng.uniform(0, width - side), rng.uniform(0, height - side)
    return (x0, y0, x0 + side, y0 + side), bool(mirror and rng.random() < 0.5)


def ref_scaled_view(image, rng, crop, scale_range):
    box, flip = ref_window(image.size, rng, crop, scale_range)
    view = image.resize((crop, crop), Image.BILINEAR, box=box)
    return ref_to_tensor(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view)


def ref_resize_shorter(image, side):
    width, height = image.size
    scale = side / min(width, height)
    return image.resize((max(side, round(width * scale)), max(side, round(height * scale))), Image.BILINEAR)


def ref_crop_mirror(image, rng, crop):
    width, height = image.size
    x0, y0 = int(rng.integers(0, width - crop + 1)), int(rng.integers(0, height - crop + 1))
    view = image.crop((x0, y0, x0 + crop, y0 + crop))
    return ref_to_tensor(view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view)


# ----------------------------------------------------------------------------- fixtures


def _photo(size) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee()).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module", params=[(500, 375), (375, 500), (1200, 900)], ids=lambda s: f"{s[0]}x{s[1]}")
def jpeg(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jpeg") / "image.jpg"
    _photo(request.param).save(path, "JPEG", quality=90)
    return path


def _full(path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


# ----------------------------------------------------------------------------- tests


def test_open_rgb_is_lazy_and_decodes_like_pil(jpeg):
    image = open_rgb(jpeg)
    assert isinstance(image, EncodedJpeg) and image.size == _full(jpeg).size and image.mode == "RGB"
    assert np.array_equal(image.pixels(1).numpy(), np.asarray(_full(jpeg)))  # OpenCV == PIL decode
    assert np.array_equal(np.asarray(image), np.asarray(_full(jpeg)))  # PIL use decodes in full
    for reduction in (2, 4, 8):
        small = image.pixels(reduction)
        assert small.shape[:2] == (-(-image.height // reduction), -(-image.width // reduction))


def test_open_rgb_errors_name_the_file(tmp_path, jpeg):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:2000])
    with pytest.raises(DatasetError, match="cut.jpg: cannot decode image .*truncated"):
        open_rgb(truncated)
    with pytest.raises(DatasetError, match="missing.jpg: image file not found"):
        open_rgb(tmp_path / "missing.jpg")
    png = tmp_path / "a.png"
    _photo((40, 30)).save(png)
    assert not isinstance(open_rgb(png), EncodedJpeg) and open_rgb(png).size == (40, 30)


def test_same_rng_same_windows_as_reference():
    """The windows (and mirror coins) are drawn exactly as the reference code draws them: a
    spy on the resampling sees the reference's box for every draw, and the rng ends in the
    same state."""
    seen = []
    real = common._resampled_view

    def spy(image, box, size, mirror):
        seen.append((box, mirror))
        return real(image, box, size, mirror)

    image = _photo((500, 375))
    common._resampled_view = spy
    try:
        for seed in range(200):
            rng, ref = np.random.default_rng(seed), np.random.default_rng(seed)
            random_scaled_view(image, rng, 64, (0.5, 2.0))
            box, flip = ref_window(image.size, ref, 64, (0.5, 2.0))
            assert seen[-1] == (box, flip)
            assert rng.random() == ref.random()
    finally:
        common._resampled_view = real


def test_scale_and_position_distribution_unchanged():
    """Over many draws the side / crop ratios and positions are the reference's, draw for draw
    (so the distributions are equal), including the cap at the shorter side."""
    ours, ref = [], []
    seen = []
    real = common._resampled_view
    common._resampled_view = lambda image, box, size, mirror: seen.append(box) or torch.zeros(1)
    try:
        image = _photo((500, 375))
        for seed in range(2000):
            random_scaled_view(image, np.random.default_rng([seed, 1]), 227, (0.5, 2.0))
            ref.append(ref_window(image.size, np.random.default_rng([seed, 1]), 227, (0.5, 2.0))[0])
    finally:
        common._resampled_view = real
    ours = np.array(seen)
    ref = np.array(ref)
    assert np.array_equal(ours, ref)
    ratio = (ours[:, 2] - ours[:, 0]) / 227
    assert ratio.max() <= 375 / 227 + 1e-9 and abs(np.mean(ratio <= 1.0) - (0.5 / 1.5)) < 0.05


def test_random_crop_mirror_after_resize_matches_reference(jpeg):
    for seed in range(5):
        ours = random_crop_mirror(resize_shorter(open_rgb(jpeg), 256), np.random.default_rng(seed), 227)
        ref = ref_crop_mirror(ref_resize_shorter(_full(jpeg), 256), np.random.default_rng(seed), 227)
        assert ours.shape == ref.shape == (3, 227, 227)
        assert _mad(ours, ref) < 0.5 * ONE_LEVEL  # same pixels up to rounding (and DCT scaling if large)
    ours = center_crop(resize_shorter(open_rgb(jpeg), 256), 227)
    ref = ref_to_tensor(ref_resize_shorter(_full(jpeg), 256).crop(_centre_box(_full(jpeg), 256, 227)))
    assert _mad(ours, ref) < 0.5 * ONE_LEVEL


def _centre_box(image, side, crop):
    w, h = ref_resize_shorter(image, side).size
    x0, y0 = (w - crop) // 2, (h - crop) // 2
    return x0, y0, x0 + crop, y0 + crop


def test_scaled_view_close_to_full_decode(jpeg):
    """Outputs stay within a grey level or two of the full decode, reduced decodes included."""
    image = open_rgb(jpeg)
    for seed in range(10):
        ours = random_scaled_view(image, np.random.default_rng(seed), 112, (0.5, 2.0))
        ref = ref_scaled_view(_full(jpeg), np.random.default_rng(seed), 112, (0.5, 2.0))
        assert _mad(ours, ref) < 2.0 * ONE_LEVEL


def test_plain_pil_images_take_the_reference_path_exactly_but_for_rounding():
    image = _photo((300, 200))
    for seed in range(5):
        ours = random_scaled_view(image, np.random.default_rng(seed), 64, (0.5, 2.0))
        ref = ref_scaled_view(image, np.random.default_rng(seed), 64, (0.5, 2.0))
        assert float((ours - ref).abs().max()) < 1e-5
    assert float((common.to_tensor(image) - ref_to_tensor(image)).abs().max()) < 1e-5


def test_reduction_never_upsamples(jpeg):
    """dct_reduction picks the largest factor at which the window still spans the output, and
    the decoded pixels at that factor are what the resampling reads (no upsampling)."""
    image = open_rgb(jpeg)
    rng = np.random.default_rng(0)
    for _ in range(500):
        side = rng.uniform(10, min(image.size))
        out = int(rng.integers(16, 300))
        r = dct_reduction(image, (side, side), (out, out))
        assert r in (1, 2, 4, 8)
        if r > 1:
            assert side / r >= out
        if r < 8:
            assert side / (2 * r) < out  # the next factor would upsample
    assert dct_reduction(_full(jpeg), (5000, 5000), (10, 10)) == 1  # decoded images: never
    # PIL's draft at the chosen factor gives exactly 1/r of the image (ceil), never less
    for r in (2, 4, 8):
        draft = Image.open(jpeg)
        draft.draft("RGB", (image.width // r, image.height // r))
        assert draft.size == (-(-image.width // r), -(-image.height // r))


def test_reduced_decode_used_when_it_pays(monkeypatch):
    image = open_rgb(_write(_photo((1200, 900))))
    calls = []
    real = EncodedJpeg.pixels
    monkeypatch.setattr(EncodedJpeg, "pixels", lambda self, r=1: calls.append(r) or real(self, r))
    random_scaled_view(image, np.random.default_rng(3), 227, (2.0, 2.0))  # window 454 -> 1/2 scale
    center_crop(resize_shorter(image, 256), 227)  # 900 -> 256: 1/2 scale (1/4 would upsample)
    assert calls == [2, 2]


def _write(image) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    path = Path(__import__("tempfile").mkdtemp()) / "x.jpg"
    path.write_bytes(buffer.getvalue())
    return path


def test_resized_image_behaves_as_the_eager_resize():
    image = _photo((500, 375))
    lazy, eager = resize_shorter(image, 256), ref_resize_shorter(image, 256)
    assert lazy.size == eager.size
    assert np.array_equal(np.asarray(lazy), np.asarray(eager))
    assert np.array_equal(np.asarray(lazy.crop((3, 4, 50, 60))), np.asarray(eager.crop((3, 4, 50, 60))))


def _read_box(box, size, out):
    """The window resample_window reads for ``box`` (the drawn one shifted onto the pixel grid),
    or None where it hands the window to PIL (a shift above MAX_WINDOW_SHIFT)."""
    side = box[2] - box[0]
    axes = [common._window_axis(start, end, out, limit) for start, end, limit in
            ((box[0], box[2], size[0]), (box[1], box[3], size[1]))]
    if max(a[3] for a in axes) > common.MAX_WINDOW_SHIFT:
        return None
    x0, y0 = (first + lead * side / out for first, _, lead, _ in axes)
    return x0, y0, x0 + side, y0 + side


def test_resample_window_is_pils_filter_on_its_grid():
    """resample_window (torch's uint8 kernel) gives PIL's resize of the window it actually reads
    within one grey level on 99 % of the values or more; PIL's own resize of the drawn window
    where no origin on the pixel grid is close enough."""
    image = _photo((500, 375))
    pixels = torch.from_numpy(np.asarray(image).copy())
    rng = np.random.default_rng(0)
    handed_to_pil = 0
    for _ in range(60):
        box, _ = common.scaled_window(image.size, rng, 227, (0.5, 2.0))
        ours = common.resample_window(pixels, box, (227, 227)).numpy().astype(int)
        read = _read_box(box, image.size, 227)
        handed_to_pil += read is None
        ref = np.asarray(image.resize((227, 227), Image.BILINEAR, box=read or box)).astype(int)
        if read is None:
            assert np.array_equal(ours, ref)
        else:
            assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 0.01
    assert handed_to_pil < 10
    box = (100.3, 50.0, 100.3 + 227.0, 50.0 + 227.0)  # scale 1, origin off the grid: no lead helps
    assert _read_box(box, image.size, 227) is None
    assert np.array_equal(common.resample_window(pixels, box, (227, 227)).numpy(),
                          np.asarray(image.resize((227, 227), Image.BILINEAR, box=box)))


def test_resample_window_shift_is_subpixel_and_the_view_close_to_pil():
    """The window read is the drawn one moved by at most MAX_WINDOW_SHIFT (0.25 px; well under
    0.05 px on average), its scale exact, its filter support PIL's; the views stay within a grey
    level of PIL's on the drawn box."""
    image = _photo((500, 375))
    pixels = torch.from_numpy(np.asarray(image).copy())
    rng = np.random.default_rng(1)
    shifts, mads = [], []
    for _ in range(300):
        box, _ = common.scaled_window(image.size, rng, 227, (0.5, 2.0))
        axes = []
        for start, end, limit in ((box[0], box[2], 500), (box[1], box[3], 375)):
            first, last, lead, shift = common._window_axis(start, end, 227, limit)
            support = max((end - start) / 227, 1.0)
            assert first >= 0 and last <= limit and last >= min(limit, end + support)
            assert abs(first + lead * (end - start) / 227 - start) == pytest.approx(shift) or shift == np.inf
            assert first <= max(0.0, start - support) + 0.5 or shift > common.MAX_WINDOW_SHIFT
            axes.append(shift)
        if max(axes) <= common.MAX_WINDOW_SHIFT:
            shifts += axes
        if len(mads) < 40:
            ours = common.resample_window(pixels, box, (227, 227)).numpy().astype(float)
            mads.append(np.abs(ours - np.asarray(image.resize((227, 227), Image.BILINEAR, box=box))).mean())
    assert max(shifts) <= common.MAX_WINDOW_SHIFT and np.mean(shifts) < 0.05 and len(shifts) > 0.9 * 600
    assert np.mean(mads) < 1.0


def test_uint8_views_normalise_to_the_float_views(jpeg):
    """The harnesses take uint8 views and normalise the batch on the step's device: bit for bit
    the per-sample float path."""
    image = open_rgb(jpeg)
    raw = [random_scaled_view(image, np.random.default_rng(s), 112, (0.5, 2.0), normalise=False) for s in range(4)]
    ref = [random_scaled_view(image, np.random.default_rng(s), 112, (0.5, 2.0)) for s in range(4)]
    assert all(v.dtype == torch.uint8 and v.shape == (3, 112, 112) for v in raw)
    assert torch.equal(common.normalise_images(torch.stack(raw)), torch.stack(ref))
    for shared in (False, True):  # the harnesses' collate: a channels-last uint8 batch, same values
        batch, labels = common.collate_views([(v, k) for k, v in enumerate(raw)], shared=shared)
        assert torch.equal(batch, torch.stack(raw)) and batch.is_shared() == shared and labels.tolist() == [0, 1, 2, 3]
        assert torch.equal(common.normalise_images(batch), torch.stack(ref))
    lazy = resize_shorter(image, 160)
    assert torch.equal(common.normalise_images(random_crop_mirror(lazy, np.random.default_rng(2), 128, normalise=False)),
                       random_crop_mirror(lazy, np.random.default_rng(2), 128))
    assert torch.equal(common.normalise_images(center_crop(lazy, 128, normalise=False)), center_crop(lazy, 128))


def test_deferred_views_decode_to_the_cpu_views(jpeg):
    """decode_device=cuda's path (the worker draws the windows, the step decodes the batch's bytes
    and resamples): run here with torchvision's CPU decoder it gives the CPU path's views bit for
    bit, so geometry, mirror and batching are the same; each JPEG is decoded once per batch."""
    image = open_rgb(jpeg)
    rngs = lambda: [np.random.default_rng(s) for s in range(6)]  # noqa: E731
    deferred = [random_scaled_view(image, r, 64, (0.5, 2.0), normalise=False, decode_device="cuda") for r in rngs()]
    assert all(isinstance(v, common.EncodedView) for v in deferred)
    assert len({id(v.data) for v in deferred}) == 1
    cpu = torch.stack([random_scaled_view(image, r, 64, (0.5, 2.0), normalise=False) for r in rngs()])
    batch = common.stack_views(deferred)
    assert isinstance(batch, common.ViewBatch)
    assert torch.equal(common.decode_views(batch, torch.device("cpu")), cpu)
    lazy = resize_shorter(image, 160)
    view = random_crop_mirror(lazy, np.random.default_rng(1), 128, normalise=False, decode_device="cuda")
    views, labels = common.collate_views([(view, 3), (view, 4)])
    assert labels.tolist() == [3, 4]
    ref = random_crop_mirror(lazy, np.random.default_rng(1), 128, normalise=False)
    # the window read from the original, not the crop of the whole resize: within a grey level or two
    assert (common.decode_views(views, torch.device("cpu"))[0].float() - ref.float()).abs().mean() < 2.0


def test_decode_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from evals.run import main as run_main

    for task in ("voc07_cls", "in1k_linear"):
        args = ["--task", task, "--preset", "demo", "--data-root", str(tmp_path), "--results-dir",
                str(tmp_path / "results"), "--set", "decode_device=cuda"]
        assert run_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: decode_device=cuda needs a GPU (no CUDA device here); use decode_device=cpu"


@pytest.mark.slow
def test_bench_loaders_json_runs():
    out = subprocess.run([sys.executable, "benchmarks/bench_loaders.py", "--json", "--images", "8", "--reps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    import json

    result = json.loads(out.stdout)
    for key in ("in1k_linear_train", "voc07_cls_train"):
        assert set(result["pipelines"][key]) == {"ours", "baseline", "ratio"}


@pytest.mark.slow
def test_gpu_check_without_cuda_prints_its_plan_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure")
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "no CUDA device here" in out.stdout and "would run" in out.stdout
    for item in ("CPFS loss", "bf16 vs fp32", "step throughput", "data wait", "channels_last"):
        assert item in out.stdout, item
