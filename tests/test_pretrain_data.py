"""pretrain/data.py: joint scale/crop/flip geometry, valid-only pixel sampling, determinism (protocols.md P1)."""

import json
import os

import cv2
import numpy as np
import pytest
import torch

from pretrain.data import FlowPairDataset, augment_pair, read_manifest, sample_pixels
from pretrain.flow import decode_flow_png, encode_flow_png, normalize_flow

H, W = 100, 120  # source size; with s in {0.8, 1.5} the scaled size is whole: 80x96, 150x180


def coordinate_image():
    """Float image whose channels are the source pixel's x and y: tells where an output pixel came from."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    return np.stack([x, y, np.zeros_like(x)], axis=2)


def linear_flow(x, y):
    return 2.0 + 0.05 * x, -1.0 + 0.03 * y


@pytest.mark.parametrize("s", [0.8, 1.5])
def test_augment_matches_analytic_flow(s):
    image = coordinate_image()
    u, v = linear_flow(image[..., 0], image[..., 1])
    flow = np.stack([u, v], axis=2).astype(np.float32)
    valid = image[..., 0] < 50  # left part valid: checks the mask moves with the pixels
    seen_flip = set()
    for seed in range(12):
        img, fl, val = augment_pair(image, flow, valid, np.random.default_rng(seed), crop=64,
                                    scale_range=(s, s), flip=True)
        assert img.shape == (64, 64, 3) and fl.shape == (64, 64, 2) and val.shape == (64, 64)
        xs, ys = img[..., 0], img[..., 1]  # source coordinates of each output pixel (bilinear of a ramp)
        flipped = bool(xs[0, 0] > xs[0, -1])
        seen_flip.add(flipped)
        # The output grid steps 1/s source pixels (mirrored under flip).
        np.testing.assert_allclose(np.diff(xs, axis=1), (-1 if flipped else 1) / s, atol=1e-4)
        np.testing.assert_allclose(np.diff(ys, axis=0), 1 / s, atol=1e-4)
        inside = (xs >= 1) & (xs <= W - 2) & (ys >= 1) & (ys <= H - 2)  # away from bilinear edge clamping
        eu, ev = linear_flow(xs, ys)
        eu = s * eu * (-1 if flipped else 1)  # resize by s scales vectors; flip negates u
        ev = s * ev
        # Nearest-neighbour flow: at most half a source pixel from the continuous position.
        np.testing.assert_allclose(fl[..., 0][inside], eu[inside], atol=s * 0.05 * 0.5 + 1e-3)
        np.testing.assert_allclose(fl[..., 1][inside], ev[inside], atol=s * 0.03 * 0.5 + 1e-3)
        away = inside & (np.abs(xs - 49.5) > 0.6)
        np.testing.assert_array_equal(val[away], (xs < 49.5)[away])
    assert seen_flip == {True, False}


def test_augment_constant_translation_exact():
    image = coordinate_image()
    flow = np.broadcast_to(np.array([3.0, -2.0], np.float32), (H, W, 2)).copy()
    valid = np.ones((H, W), bool)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        img, fl, _ = augment_pair(image, flow, valid, rng, crop=48, scale_range=(0.8, 0.8), flip=True)
        sign = -1.0 if img[0, 0, 0] > img[0, -1, 0] else 1.0
        np.testing.assert_allclose(fl[..., 0], sign * 3.0 * 0.8, rtol=1e-6)
        np.testing.assert_allclose(fl[..., 1], -2.0 * 0.8, rtol=1e-6)


def test_augment_scales_up_small_images_and_eval_view():
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    flow = np.ones((40, 60, 2), np.float32)
    valid = np.ones((40, 60), bool)
    img, fl, val = augment_pair(image, flow, valid, np.random.default_rng(0), crop=64, scale_range=(0.5, 0.6))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and val.all()
    np.testing.assert_allclose(np.abs(fl[..., 1]), 64 / 40, rtol=1e-6)  # s raised to crop / shorter side
    # Evaluation view (rng=None): scale 1, centre crop, no flip.
    big = np.arange(100 * 80, dtype=np.float32).reshape(100, 80, 1).repeat(3, 2)
    img, fl, _ = augment_pair(big, np.ones((100, 80, 2), np.float32), np.ones((100, 80), bool), None, crop=32)
    np.testing.assert_array_equal(img, big[34:66, 24:56])
    np.testing.assert_array_equal(fl, 1.0)


def test_sample_pixels_only_valid():
    rng = np.random.default_rng(0)
    valid = rng.random((64, 64)) < 0.02  # ~80 valid pixels, fewer than N: drawn with replacement
    for _ in range(50):
        pos = sample_pixels(valid, 512, rng)
        assert pos.shape == (512, 2) and pos.dtype == np.int64
        assert valid[pos[:, 0], pos[:, 1]].all()
    valid = rng.random((64, 64)) < 0.5
    pos = sample_pixels(valid, 512, rng)
    assert valid[pos[:, 0], pos[:, 1]].all()
    assert len({tuple(p) for p in pos}) == 512  # enough valid pixels: no repeats
    few = np.zeros((8, 8), bool)
    few[[1, 2, 5, 7], [0, 3, 5, 6]] = True
    counts = np.bincount(np.ravel_multi_index(sample_pixels(few, 4000, rng).T, few.shape), minlength=64)
    assert set(np.flatnonzero(counts)) == set(np.flatnonzero(few))
    assert counts[few.ravel()].min() > 850  # uniform over the 4 valid pixels (1000 each expected)
    with pytest.raises(ValueError, match="no valid"):
        sample_pixels(np.zeros((4, 4), bool), 8, rng)


# --------------------------------------------------------------------------- #
# Dataset over a small synthetic prepared folder
# --------------------------------------------------------------------------- #
def write_folder(root, n=4, size=(90, 110), flow_scale=1.0, invalid_all=()):
    os.makedirs(os.path.join(root, "frames"), exist_ok=True)
    os.makedirs(os.path.join(root, "flow"), exist_ok=True)
    rng = np.random.default_rng(123)
    records = []
    for i in range(n):
        h, w = size
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        flow = (rng.normal(size=(h, w, 2)) * 20 * flow_scale).astype(np.float32)
        valid = rng.random((h, w)) < 0.7
        if i in invalid_all:
            valid[:] = False
        name = f"vid-{i:02d}_{i:06d}"
        cv2.imwrite(os.path.join(root, "frames", name + ".png"), image[..., ::-1])
        encode_flow_png(os.path.join(root, "flow", name + ".png"), flow, valid)
        records.append({"video": None, "video_key": f"vid-{i:02d}", "frame": i, "height": h, "width": w,
                        "split": "train", "frame_path": f"frames/{name}.png", "flow_path": f"flow/{name}.png",
                        "flow_method": "synthetic"})
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k]


def test_dataset_item_shapes_and_normalisation(tmp_path):
    write_folder(tmp_path, flow_scale=10.0)  # flows of hundreds of pixels: eq. (6) must saturate at 1
    ds = FlowPairDataset(tmp_path, crop=64, num_pixels=128, return_flow_map=True)
    assert len(ds) == 4 and len(read_manifest(tmp_path / "manifest.jsonl")) == 4
    item = ds[1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["positions"].shape == (128, 2) and item["positions"].dtype == torch.int64
    assert item["flow"].shape == (128, 2) and item["flow"].dtype == torch.float32
    assert item["flow"].abs().max() <= 1.0 and item["flow"].abs().max() == 1.0
    assert item["flow_map"].shape == (2, 64, 64) and item["flow_map"].abs().max() <= 1.0
    pos = item["positions"]
    assert pos.min() >= 0 and pos.max() < 64
    assert item["valid_map"][pos[:, 0], pos[:, 1]].all()  # only valid pixels sampled
    torch.testing.assert_close(item["flow"], item["flow_map"][:, pos[:, 0], pos[:, 1]].T)
    # ImageNet normalisation: uniform uint8 noise has mean ~127.5/255.
    mean = item["image"].mean(dim=(1, 2)) * torch.tensor([0.229, 0.224, 0.225]) + torch.tensor([0.485, 0.456, 0.406])
    assert torch.allclose(mean, torch.full((3,), 0.5), atol=0.03)


def test_dataset_eval_view_reads_stored_flow(tmp_path):
    write_folder(tmp_path, size=(64, 64))
    ds = FlowPairDataset(tmp_path, crop=64, num_pixels=256, train=False)
    item = ds[2]
    flow, valid = decode_flow_png(tmp_path / "flow" / "vid-02_000002.png")
    pos = item["positions"].numpy()
    assert valid[pos[:, 0], pos[:, 1]].all()
    np.testing.assert_allclose(item["flow"].numpy(), normalize_flow(flow[pos[:, 0], pos[:, 1]]), rtol=1e-6)
    ds.set_epoch(5)  # validation items do not change with the epoch
    assert_same(item, ds[2])


def test_dataset_determinism(tmp_path):
    write_folder(tmp_path)
    a = FlowPairDataset(tmp_path, crop=64, num_pixels=64, seed=7)
    b = FlowPairDataset(tmp_path, crop=64, num_pixels=64, seed=7)
    for i in (3, 0, 2):  # order does not matter
        assert_same(a[i], b[i])
    assert not torch.equal(a[0]["positions"], a[1]["positions"])
    first = a[0]
    a.set_epoch(1)
    assert not torch.equal(first["positions"], a[0]["positions"])
    b.set_epoch(1)
    assert_same(a[0], b[0])
    c = FlowPairDataset(tmp_path, crop=64, num_pixels=64, seed=8)
    assert not torch.equal(first["positions"], c[0]["positions"])

    # Same batches with 0 or 2 DataLoader workers.
    def batches(workers):
        ds = FlowPairDataset(tmp_path, crop=64, num_pixels=64, seed=7)
        ds.set_epoch(3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
        return list(loader)

    for x, y in zip(batches(0), batches(2)):
        assert_same(x, y)


def test_dataset_errors_name_files(tmp_path):
    write_folder(tmp_path, invalid_all=(3,))
    ds = FlowPairDataset(tmp_path, crop=64)
    with pytest.raises(ValueError, match="vid-03_000003"):
        ds[3]  # no valid pixel anywhere
    os.remove(tmp_path / "frames" / "vid-00_000000.png")
    with pytest.raises(FileNotFoundError, match="vid-00_000000.png"):
        ds[0]
    (tmp_path / "frames" / "vid-01_000001.png").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="vid-01_000001.png"):
        ds[1]
    (tmp_path / "flow" / "vid-02_000002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="vid-02_000002.png"):
        ds[2]
    with pytest.raises(FileNotFoundError, match="manifest"):
        FlowPairDataset(tmp_path / "nowhere")
