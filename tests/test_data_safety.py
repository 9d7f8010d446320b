"""Reliability and security of the data edge (issue 11): paths stay inside their roots, bad files
fail as one line naming them (also from DataLoader workers), the pre-flight stops a run before
training, and pool workers die with their parent.

Every test first breaks real-format data (the generated demo set, a prepared pairs folder) the
way it breaks in practice, then checks the failure is caught and named."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from evals.detection import proposals
from evals.datasets import (
    DatasetError,
    ImageNetDataset,
    VOCClassificationDataset,
    VOCSegmentationDataset,
    demo,
    read_split,
    train_aug_items,
    voc12_val_items,
)
from evals.datasets.preflight import preflight, preflight_datasets, preflight_voc_split
from evals.datasets.voc import detection_annotations
from evals.detection.data import VOCDetectionDataset
from pretrain.data import FlowPairDataset, preflight_flow_pairs, read_manifest
from pretrain.flow import encode_flow_png
from runtime.errors import one_line
from runtime.images import jpeg_is_complete, read_png_header
from tests.helpers import voc07

REPO = Path(__file__).resolve().parents[1]


def _append_line(path: Path, line: str) -> int:
    """Append ``line`` to a split file; returns its line number."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text += "\n"
    path.write_text(text + line + "\n")
    return len((text + line).splitlines())


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _single_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ----------------------------------------------------------------------------- paths stay inside


def test_dotdot_id_in_test_split_is_refused_with_file_and_line(tiny_copy, tmp_path):
    split = voc07(tiny_copy) / "ImageSets/Main/test.txt"
    line = _append_line(split, "../../../../ESC")
    expected = f"{split}:{line}: '../../../../ESC' leaves its folder ('..' is not allowed)"
    with pytest.raises(DatasetError) as err:
        read_split(split)
    assert str(err.value) == expected

    cache = tmp_path / "cache"
    before = _files(tmp_path)
    with pytest.raises(DatasetError, match=re.escape(expected)):
        proposals.compute_proposals(voc07(tiny_copy), "test", cache, workers=0, progress=False)
    assert proposals.main(["--voc-root", str(voc07(tiny_copy)), "--split", "test", "--out", str(cache),
                           "--workers", "0"]) == 2
    # Ids handed over directly (not from a split file) are refused by the cache itself.
    with pytest.raises(DatasetError, match="leaves its folder"):
        proposals.compute_proposals(voc07(tiny_copy), "test", cache, workers=0, ids=["../../../../ESC"], progress=False)
    with pytest.raises(DatasetError, match="absolute path"):
        proposals.save_boxes(proposals.cache_path(cache, "fast", "/tmp/ESC"), np.zeros((1, 4)))
    assert _files(tmp_path) - before <= {p for p in _files(tmp_path) if cache in p.parents or p == cache}
    assert not list(tmp_path.rglob("ESC*")) and not (tmp_path.parent / "ESC.npy").exists()


def test_dotdot_and_absolute_ids_everywhere_ids_are_read(tiny_copy, tmp_path):
    cls_file = voc07(tiny_copy) / "ImageSets/Main/cat_trainval.txt"
    line = _append_line(cls_file, "/etc/passwd 1")
    with pytest.raises(DatasetError, match=re.escape(f"{cls_file}:{line}: absolute path '/etc/passwd'")):
        VOCClassificationDataset(voc07(tiny_copy), "trainval")

    seg_val = tiny_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    clean = seg_val.read_text()
    line = _append_line(seg_val, "..")
    with pytest.raises(DatasetError, match=re.escape(f"{seg_val}:{line}: '..' leaves its folder")):
        voc12_val_items(tiny_copy)
    seg_val.write_text(clean)

    sbd_train = tiny_copy / "benchmark_RELEASE/dataset/train.txt"
    line = _append_line(sbd_train, "a/../../b")
    with pytest.raises(DatasetError, match=re.escape(f"{sbd_train}:{line}:")):
        train_aug_items(tiny_copy)

    labels = tiny_copy / "imagenet/val_labels.txt"
    first = labels.read_text().splitlines()[0].split()[1]
    line = _append_line(labels, f"../train/{first}/{first}_1.JPEG {first}")
    with pytest.raises(DatasetError, match=re.escape(f"{labels}:{line}:") + ".*leaves its folder"):
        ImageNetDataset(tiny_copy / "imagenet", "val")

    mat = tmp_path / "voc_2007_test.mat"
    cells = np.empty((1, 1), dtype=object)
    cells[0, 0] = np.array([[1, 1, 5, 5]], np.float64)
    names = np.empty((1, 1), dtype=object)
    names[0, 0] = "../../ESC"
    scipy.io.savemat(mat, {"images": names, "boxes": cells})
    with pytest.raises(DatasetError, match=re.escape(f"{mat}: images[0]: '../../ESC' leaves its folder")):
        proposals.import_mat(mat, tmp_path / "cache")
    assert not (tmp_path / "ESC.npy").exists() and not (tmp_path.parent / "ESC.npy").exists()


def write_pairs(root: Path, n: int = 3, size=(40, 48)) -> list[dict]:
    """A prepared pairs folder (JPEG frames, KITTI flow PNGs, manifest.jsonl) as pretrain.prepare
    writes it."""
    (root / "frames").mkdir(parents=True, exist_ok=True)
    (root / "flow").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    records = []
    for i in range(n):
        name = f"vid-{i}_{i:06d}"
        image = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        cv2.imwrite(str(root / "frames" / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
        encode_flow_png(root / "flow" / f"{name}.png", rng.normal(size=size + (2,)).astype(np.float32) * 4)
        records.append({"video": "/videos/v.mp4", "video_key": f"vid-{i}", "frame": i, "split": "train",
                        "height": size[0], "width": size[1],
                        "frame_path": f"frames/{name}.jpg", "flow_path": f"flow/{name}.png"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.mark.parametrize("field,value,message", [
    ("frame_path", "/etc/passwd", "absolute path '/etc/passwd'"),
    ("flow_path", "../../outside.png", "'../../outside.png' leaves its folder"),
])
def test_manifest_paths_outside_the_folder_are_refused(tmp_path, field, value, message):
    records = write_pairs(tmp_path)
    records[1][field] = value
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DatasetError) as err:
        FlowPairDataset(tmp_path, crop=32)
    assert str(err.value) == f"{manifest}:2: {field}: {message}" + \
        (" not allowed (names must be relative to their folder)" if "absolute" in message else
         " ('..' is not allowed)")
    with pytest.raises(DatasetError, match=re.escape(f"{manifest}:2")):
        read_manifest(manifest)


# ----------------------------------------------------------------------------- one line per bad file


def _corrupt(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8).tobytes())
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _test_image(root: Path, k: int = 0) -> tuple[VOCClassificationDataset, Path]:
    dataset = VOCClassificationDataset(voc07(root), "test")
    return dataset, dataset.paths[k]


@pytest.mark.parametrize("break_file,problem", [(_corrupt, "not a recognised image format"),
                                                (_truncate, "image file is truncated")])
def test_bad_test_image_stops_the_preflight_with_one_line(tiny_copy, break_file, problem):
    dataset, path = _test_image(tiny_copy, 2)
    break_file(path)
    with pytest.raises(DatasetError) as err:
        dataset[2]
    assert _single_line(err.value).startswith(f"{path}: cannot decode image (") and problem in str(err.value)
    with pytest.raises(DatasetError) as err:
        preflight_datasets({"trainval": VOCClassificationDataset(voc07(tiny_copy), "trainval"), "test": dataset},
                           log=None)
    assert str(path) in _single_line(err.value)
    with pytest.raises(DatasetError, match=re.escape(str(path))):  # the detection harness's view
        preflight_voc_split(voc07(tiny_copy), "test")


def test_dataloader_worker_failure_is_one_line_naming_the_file(tiny_copy):
    dataset, path = _test_image(tiny_copy, 1)
    _corrupt(path)
    with pytest.raises(DatasetError) as direct:
        dataset[1]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, [1]), batch_size=None, num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # what the user would otherwise see
    assert one_line(err.value) == str(direct.value) == \
        f"{path}: cannot decode image (not a recognised image format)"


def test_missing_image_is_a_dataset_error_and_a_file_not_found_error(tiny_copy):
    dataset, path = _test_image(tiny_copy, 0)
    path.unlink()
    with pytest.raises(DatasetError) as err:
        dataset[0]
    assert isinstance(err.value, FileNotFoundError) and str(err.value) == f"{path}: image file not found"
    with pytest.raises(DatasetError, match=re.escape(f"{path}: image file not found")):
        preflight(dataset, "test")


def test_bad_sbd_mat_and_non_image_imagenet_file(tiny_copy):
    items = train_aug_items(tiny_copy)
    mat = next(Path(m) for _, _, m in items if str(m).endswith(".mat"))
    _truncate(mat)
    with pytest.raises(DatasetError) as err:
        VOCSegmentationDataset(items)[[str(m) for _, _, m in items].index(str(mat))]
    assert _single_line(err.value).startswith(f"{mat}: cannot read MATLAB file")
    with pytest.raises(DatasetError, match=re.escape(str(mat))):
        preflight(VOCSegmentationDataset(items), "train_aug")

    dataset = ImageNetDataset(tiny_copy / "imagenet", "train")
    path = dataset.samples[3][0]
    path.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(DatasetError) as err:
        dataset[3]
    assert _single_line(err.value) == f"{path}: cannot decode image (not a recognised image format)"


# ----------------------------------------------------------------------------- pre-flight


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_preflight_passes_clean_demo_data_and_writes_nothing(tiny):
    before = _hashes(tiny)
    lines = []
    voc_root = voc07(tiny)
    test_annotations = detection_annotations(voc_root, "test")
    no_proposals = {i: np.zeros((0, 4)) for i in test_annotations}
    reports = preflight_datasets({
        "voc07 trainval": VOCClassificationDataset(voc_root, "trainval"),
        "voc07 test": VOCDetectionDataset(voc_root, list(test_annotations), test_annotations, no_proposals),
        "train_aug": VOCSegmentationDataset(train_aug_items(tiny)),
        "voc12 val": VOCSegmentationDataset(voc12_val_items(tiny)),
        "imagenet train": ImageNetDataset(tiny / "imagenet", "train"),
        "imagenet val": ImageNetDataset(tiny / "imagenet", "val"),
    }, log=lines.append)
    assert len(lines) == 6 and all(line.startswith("[preflight] ") for line in lines)
    for report in reports.values():  # small sets: every item decoded
        assert report.items > 0 and report.decoded == report.items and report.headers >= report.items
    assert preflight_voc_split(voc_root, "test").decoded == len(read_split(voc_root / "ImageSets/Main/test.txt"))
    assert _hashes(tiny) == before


@pytest.mark.slow
def test_preflight_sees_through_wrappers_and_id_only_datasets(tiny):
    class Wrapped(torch.utils.data.Dataset):  # like runtime.data.Augmented
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

    class ByIds:  # like evals.detection.data.VOCDetectionDataset
        voc_root, ids = voc07(tiny), read_split(voc07(tiny) / "ImageSets/Main/test.txt")[:3]

    assert preflight(Wrapped(ImageNetDataset(tiny / "imagenet", "val")), "val").decoded > 0
    assert preflight(ByIds(), "test").decoded == 3
    with pytest.raises(TypeError, match="does not know"):
        preflight(object(), "x")


def test_empty_split_stops_the_preflight_naming_the_split_file(tiny_copy):
    val = tiny_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    val.write_text("")
    with pytest.raises(DatasetError) as err:
        preflight(VOCSegmentationDataset(voc12_val_items(tiny_copy)), "voc12 val")
    assert _single_line(err.value) == f"{val}: split is empty"

    main_test = voc07(tiny_copy) / "ImageSets/Main/test.txt"
    main_test.write_text("\n")
    with pytest.raises(DatasetError) as err:
        preflight_voc_split(voc07(tiny_copy), "test")
    assert str(err.value) == f"{main_test}: split is empty"


def test_empty_imagenet_class_folder_stops_the_preflight(tiny_copy):
    empty = tiny_copy / "imagenet" / "train" / "n99999999"
    empty.mkdir()
    dataset = ImageNetDataset(tiny_copy / "imagenet", "train")
    assert len(dataset.classes) == demo.SCALES["tiny"].imagenet_classes + 1  # silently one class more
    with pytest.raises(DatasetError) as err:
        preflight(dataset, "imagenet train")
    assert _single_line(err.value).startswith(f"{empty}: class folder is empty")


def test_flow_pairs_preflight(tmp_path):
    write_pairs(tmp_path, n=4)
    dataset = FlowPairDataset(tmp_path, crop=32)
    report = preflight_flow_pairs(dataset, log=None)
    assert report.decoded == 4 and report.headers == 8 and report.files_stated == 8

    # An ordinary 8-bit PNG under a flow name (e.g. a visualisation saved in the wrong folder).
    eight = tmp_path / "flow" / "vid-2_000002.png"
    cv2.imwrite(str(eight), np.zeros((40, 48, 3), np.uint8))
    assert read_png_header(eight).bit_depth == 8
    with pytest.raises(DatasetError) as err:
        preflight_flow_pairs(dataset, log=None)
    assert _single_line(err.value) == f"{eight}: flow PNG must be 16-bit, got 8-bit RGB (3 channels) " \
                                      f"(an ordinary 8-bit image?)"
    with pytest.raises(DatasetError, match=re.escape(f"{eight}: flow PNG must be 16-bit")):
        dataset[2]

    # A frame cut short: OpenCV decodes it without complaint (grey fill); the pre-flight does not.
    write_pairs(tmp_path, n=4)
    frame = _truncate(tmp_path / "frames" / "vid-1_000001.jpg")
    assert cv2.imread(str(frame)) is not None and not jpeg_is_complete(frame.read_bytes())
    with pytest.raises(DatasetError) as err:
        preflight_flow_pairs(dataset, log=None)
    assert _single_line(err.value) == f"{frame}: truncated JPEG (no end-of-image marker after the image data)"

    write_pairs(tmp_path, n=4)
    (tmp_path / "flow" / "vid-3_000003.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'flow' / 'vid-3_000003.png'}: flow PNG not found")):
        preflight_flow_pairs(dataset, log=None)

    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'manifest.jsonl'}: split is empty")):
        preflight_flow_pairs(FlowPairDataset(tmp_path, split="val", crop=32), log=None)
    assert preflight_flow_pairs(FlowPairDataset(tmp_path, split="val", crop=32), allow_empty=True, log=None).items == 0


@pytest.mark.slow
def test_preflight_of_a_5000_image_split_takes_seconds(tmp_path):
    voc_root = tmp_path / "VOC2007"
    (voc_root / "JPEGImages").mkdir(parents=True)
    (voc_root / "ImageSets" / "Main").mkdir(parents=True)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    ids = [f"{k:06d}" for k in range(5000)]
    for image_id in ids:
        (voc_root / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
    (voc_root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    start = time.perf_counter()
    report = preflight_voc_split(voc_root, "trainval")
    seconds = time.perf_counter() - start
    print(f"\npre-flight of 5,000 images: {seconds:.2f} s ({report.summary()})")
    assert report.headers == 5000 and report.files_stated == 5000 and report.decoded == 32


# ----------------------------------------------------------------------------- workers die with the parent


def _spawned_children(pid: int) -> list[int]:
    """Pids of the multiprocessing 'spawn' workers whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_parent_and_watch_workers(command: list[str], workers: int = 2) -> list[int]:
    """Start ``command``, wait for its pool workers, SIGKILL it; returns the workers still alive
    5 s later (each is then killed by its pid, so a failing test leaves nothing running)."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    children: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(children) < workers and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            children = _spawned_children(process.pid)
        assert len(children) == workers, f"pool workers did not start (exit status {process.poll()})"
        time.sleep(2.0)  # let them take their tasks
        assert all(_alive(pid) for pid in children)
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [pid for pid in children if _alive(pid)]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_proposal_workers_die_with_a_killed_parent(tmp_path):
    voc_root = tmp_path / "VOC2007"
    (voc_root / "JPEGImages").mkdir(parents=True)
    (voc_root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in ("a", "b"):  # noise at 1200 px: a minute of Selective Search 'quality' each
        Image.fromarray(rng.integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(
            voc_root / "JPEGImages" / f"{image_id}.jpg", quality=90)
    (voc_root / "ImageSets" / "Main" / "test.txt").write_text("a\nb\n")
    survivors = _kill_parent_and_watch_workers(
        [sys.executable, "-m", "evals.detection.proposals", "--voc-root", str(voc_root), "--split", "test",
         "--out", str(tmp_path / "cache"), "--mode", "quality", "--workers", "2"])
    assert survivors == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_prepare_workers_die_with_a_killed_parent(tmp_path):
    # Two "videos" that block their reader forever (FIFOs without a writer), like a hung network mount.
    for name in ("a.mp4", "b.mp4"):
        os.mkfifo(tmp_path / name)
    (tmp_path / "videos.txt").write_text("a.mp4\nb.mp4\n")
    survivors = _kill_parent_and_watch_workers(
        [sys.executable, "-m", "pretrain.prepare", "--videos", str(tmp_path / "videos.txt"),
         "--out", str(tmp_path / "out"), "--workers", "2", "--no-progress"])
    assert survivors == []


def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    """The race the initializer closes: the parent died before the worker set up its signal."""
    code = "from runtime.lifetime import die_with_parent; die_with_parent(2**22 + 12345); print('alive')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1 and "alive" not in result.stdout
