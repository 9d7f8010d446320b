"""Dataset readers (VOC07/12, SBD, ImageNet), the `check` command and the demo generator,
on a `tiny` generated data set and on deliberately broken copies of it (protocols.md P2-P5)."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from evals import data as data_cli
from evals.datasets import (
    VOC_CLASSES,
    VOC_PALETTE,
    DatasetError,
    ImageNetDataset,
    VOCClassificationDataset,
    VOCSegmentationDataset,
    classification_labels,
    detection_annotations,
    imagenet_classes,
    imagenet_samples,
    parse_annotation,
    read_sbd_mask,
    read_segmentation_mask,
    read_split,
    train_aug_items,
    voc12_val_items,
    write_sbd_mat,
    write_segmentation_mask,
)
from evals.datasets import demo
from evals.datasets.voc import labels_from_annotation
from evals.detection.data import VOCDetectionDataset
from tests.helpers import voc07

SEED = 0
TINY = demo.SCALES["tiny"]


def voc12(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def sbd(root: Path) -> Path:
    return root / "benchmark_RELEASE" / "dataset"


# ----------------------------------------------------------------------------- constants


def test_voc_constants():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_CLASSES.index("person") == 14
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for index, colour in expected.items():
        assert tuple(VOC_PALETTE[index]) == colour
    assert len({tuple(c) for c in VOC_PALETTE}) == 256


# ----------------------------------------------------------------------------- VOC07 classification / detection


@pytest.mark.parametrize("split, count", [("trainval", TINY.voc07_trainval), ("test", TINY.voc07_test)])
def test_voc07_labels_agree_with_xml(tiny, split, count):
    ids, labels = classification_labels(voc07(tiny), split)
    assert len(ids) == count and ids == sorted(ids) and labels.shape == (count, 20) and labels.dtype == np.int64
    annotations = detection_annotations(voc07(tiny), split)
    assert list(annotations) == ids
    for k, i in enumerate(ids):
        ann = annotations[i]
        for c, name in enumerate(VOC_CLASSES):
            objs = [o for o in ann.objects if o.name == name]
            want = 1 if any(not o.difficult for o in objs) else (-1 if objs else 0)
            assert labels[k, c] == want, (i, name)
        assert np.array_equal(labels_from_annotation(ann), labels[k])


def test_voc07_trainval_is_train_plus_val_and_disjoint_from_test(tiny):
    main = voc07(tiny) / "ImageSets" / "Main"
    train, val, trainval, test = (set(read_split(main / f"{s}.txt")) for s in ("train", "val", "trainval", "test"))
    assert train | val == trainval and not train & val and not trainval & test


def test_tiny_set_exercises_every_label_and_flag(tiny):
    annotations = {**detection_annotations(voc07(tiny), "trainval"), **detection_annotations(voc07(tiny), "test")}
    objects = [o for a in annotations.values() for o in a.objects]
    assert any(o.difficult for o in objects) and any(o.truncated for o in objects)
    assert any(not o.difficult and not o.truncated for o in objects)
    _, labels = classification_labels(voc07(tiny), "trainval")
    assert set(np.unique(labels)) == {-1, 0, 1}
    counts = {(a.width, a.height) for a in annotations.values()}
    assert len(counts) > 10 and all(160 <= w <= 256 and 160 <= h <= 256 for w, h in counts)


def test_annotations_match_generated_scenes_and_boxes_are_tight(tiny):
    for i, ann in list(detection_annotations(voc07(tiny), "trainval").items())[:10]:
        scene = demo.voc_scene(SEED, 2007, int(i))
        assert (ann.height, ann.width) == scene.sbd_mask.shape
        assert [(o.name, o.box, o.difficult, o.truncated) for o in ann.objects] == \
               [(o.name, o.box, o.difficult, o.truncated) for o in scene.objects]
        names = [o.name for o in ann.objects]
        for obj in ann.objects:
            x1, y1, x2, y2 = obj.box
            assert 1 <= x1 <= x2 <= ann.width and 1 <= y1 <= y2 <= ann.height
            if names.count(obj.name) == 1:  # the class's pixels are this object's visible pixels
                ys, xs = np.nonzero(scene.sbd_mask == VOC_CLASSES.index(obj.name) + 1)
                assert obj.box == (xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1)


def test_voc_torch_datasets(tiny):
    cls = VOCClassificationDataset(voc07(tiny), "test", transform=lambda im: torch.zeros(3, 4, 4))
    image, labels = cls[0]
    assert len(cls) == TINY.voc07_test and image.shape == (3, 4, 4)
    assert labels.dtype == torch.int64 and labels.shape == (20,)
    annotations = detection_annotations(voc07(tiny), "trainval")
    det = VOCDetectionDataset(voc07(tiny), list(annotations), annotations, {i: np.zeros((0, 4)) for i in annotations})
    image, gt_boxes, gt_labels, proposals = det[3]
    ann = annotations[det.ids[3]]
    assert image.mode == "RGB" and image.size == (ann.width, ann.height)
    assert len(gt_boxes) == len(gt_labels) == sum(not o.difficult for o in ann.objects) and proposals.shape == (0, 4)


def test_parse_annotation_details(tmp_path):
    path = tmp_path / "2011_000001.xml"
    path.write_text("<annotation><size><width>50</width><height>40</height></size>"
                    "<object><name>dog</name><bndbox><xmin>1.5</xmin><ymin>2</ymin><xmax>50</xmax><ymax>40</ymax>"
                    "</bndbox></object></annotation>")
    ann = parse_annotation(path)
    # no <difficult>/<truncated> (as in some VOC2012 files) -> False; decimal coordinates rounded
    assert ann.image_id == "2011_000001" and ann.objects[0].box == (2, 2, 50, 40)
    assert not ann.objects[0].difficult and not ann.objects[0].truncated
    path.write_text(path.read_text().replace("<xmax>50</xmax>", "<xmax>51</xmax>"))
    with pytest.raises(DatasetError, match="outside the 50x40 image"):
        parse_annotation(path)


# ----------------------------------------------------------------------------- VOC12 masks, SBD, train_aug


def test_voc12_masks_read_back_equal_the_drawn_ones(tiny):
    items = voc12_val_items(tiny)
    assert len(items) == TINY.voc12_seg_val
    seen = set()
    train = read_split(voc12(tiny) / "ImageSets/Segmentation/train.txt")
    for image_id, _, mask_path in items + [(i, None, voc12(tiny) / "SegmentationClass" / f"{i}.png") for i in train]:
        mask = read_segmentation_mask(mask_path)
        scene = demo.voc_scene(SEED, 2012, int(image_id.split("_")[1]))
        np.testing.assert_array_equal(mask, scene.voc_mask)
        seen |= set(np.unique(mask).tolist())
    assert 0 in seen and 255 in seen and seen - {0, 255}
    with Image.open(mask_path) as png:
        assert png.mode == "P" and np.array_equal(np.array(png.getpalette()).reshape(-1, 3), VOC_PALETTE)


def test_voc_masks_void_borders_and_difficult(tiny):
    for i in read_split(voc12(tiny) / "ImageSets/Segmentation/train.txt"):
        scene = demo.voc_scene(SEED, 2012, int(i.split("_")[1]))
        void = scene.voc_mask == 255
        # SBD masks carry no void; where VOC is not void they agree
        assert scene.sbd_mask.max() <= 20
        np.testing.assert_array_equal(scene.voc_mask[~void], scene.sbd_mask[~void])


def test_write_segmentation_mask_round_trip_and_rejects_bad_values(tmp_path):
    mask = np.random.default_rng(0).integers(0, 21, (7, 9)).astype(np.uint8)
    mask[0, :] = 255
    write_segmentation_mask(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_segmentation_mask(tmp_path / "m.png"), mask)
    with pytest.raises(DatasetError, match="mask value 21"):
        write_segmentation_mask(tmp_path / "bad.png", np.full((3, 3), 21, np.uint8))


def test_sbd_mat_round_trip(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 3:15], mask[10:28, 20:39] = 7, 15
    write_sbd_mat(tmp_path / "a.mat", mask)
    np.testing.assert_array_equal(read_sbd_mask(tmp_path / "a.mat"), mask)
    gt = scipy.io.loadmat(tmp_path / "a.mat", struct_as_record=False, squeeze_me=True)["GTcls"]
    assert list(np.atleast_1d(gt.CategoriesPresent)) == [7, 15] and len(gt.Boundaries) == 20
    assert gt.Boundaries[6].nnz > 0 and gt.Boundaries[0].nnz == 0
    write_sbd_mat(tmp_path / "b.mat", mask)  # fixed header: equal masks, equal bytes
    assert (tmp_path / "a.mat").read_bytes() == (tmp_path / "b.mat").read_bytes()


def test_sbd_mat_written_by_hand_in_both_struct_styles(tmp_path):
    mask = np.zeros((12, 10), np.uint8)
    mask[2:8, 1:6] = 3
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(np.zeros((12, 10), bool))
    # a MATLAB-style 1x1 struct array, as SBD's own files hold it
    record = np.zeros((1, 1), dtype=[("Segmentation", "O"), ("Boundaries", "O"), ("CategoriesPresent", "O")])
    record[0, 0] = (mask, boundaries, np.array([[3.0]]))
    scipy.io.savemat(tmp_path / "record.mat", {"GTcls": record})
    np.testing.assert_array_equal(read_sbd_mask(tmp_path / "record.mat"), mask)
    # a dict-style struct, Segmentation stored as double (still integral)
    scipy.io.savemat(tmp_path / "dict.mat", {"GTcls": {"Segmentation": mask.astype(float), "CategoriesPresent": 3}})
    np.testing.assert_array_equal(read_sbd_mask(tmp_path / "dict.mat"), mask)
    assert read_sbd_mask(tmp_path / "dict.mat").dtype == np.uint8


def test_train_aug_excludes_val_and_prefers_voc_masks(tiny):
    items = train_aug_items(tiny)
    ids = [i for i, _, _ in items]
    val = set(read_split(voc12(tiny) / "ImageSets/Segmentation/val.txt"))
    train = set(read_split(voc12(tiny) / "ImageSets/Segmentation/train.txt"))
    sbd_ids = set(read_split(sbd(tiny) / "train.txt")) | set(read_split(sbd(tiny) / "val.txt"))
    assert ids == sorted(ids) and not set(ids) & val
    assert sbd_ids & val, "the tiny set must exercise the exclusion"
    assert set(ids) == (train | sbd_ids) - val and len(ids) == TINY.voc12_seg_train + TINY.sbd_extra
    for image_id, image, mask in items:
        assert image.is_file()
        assert mask.suffix == (".png" if image_id in train else ".mat")
    assert train & sbd_ids, "the tiny set must have ids with both a PNG and a .mat"
    dataset = VOCSegmentationDataset(items)
    for k in (0, len(items) - 1):
        image, mask = dataset[k]
        assert mask.dtype == np.uint8 and mask.shape == (image.height, image.width)
    # an SBD-only id: its .mat holds the scene's void-free mask
    sbd_only = next(i for i, _, m in items if m.suffix == ".mat")
    np.testing.assert_array_equal(read_sbd_mask(sbd(tiny) / "cls" / f"{sbd_only}.mat"),
                                  demo.voc_scene(SEED, 2012, int(sbd_only.split("_")[1])).sbd_mask)


def test_segmentation_dataset_joint_transform_and_callable_masks(tiny):
    image_id, image_path, mask_path = voc12_val_items(tiny)[0]
    mask = read_segmentation_mask(mask_path)
    ds = VOCSegmentationDataset([(image_path, lambda: mask)], transform=lambda im, m: (im.size, m.sum()))
    assert ds[0] == ((mask.shape[1], mask.shape[0]), mask.sum())


# ----------------------------------------------------------------------------- ImageNet


def test_imagenet_flat_val_and_class_folders_agree(tiny, tmp_path):
    root = tiny / "imagenet"
    classes = imagenet_classes(root)
    assert classes == sorted(classes) and len(classes) == TINY.imagenet_classes
    train = imagenet_samples(root, "train")
    assert len(train) == TINY.imagenet_classes * TINY.imagenet_train
    assert all(path.parent.name == classes[c] for path, c in train)
    flat = imagenet_samples(root, "val")
    assert len(flat) == TINY.imagenet_classes * TINY.imagenet_val
    # the same val set re-laid out in class folders
    folders = tmp_path / "imagenet"
    shutil.copytree(root / "train", folders / "train")
    for path, c in flat:
        (folders / "val" / classes[c]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folders / "val" / classes[c] / path.name)
    foldered = imagenet_samples(folders, "val")
    assert sorted((p.name, c) for p, c in foldered) == sorted((p.name, c) for p, c in flat)
    dataset = ImageNetDataset(folders, "val")
    image, target = dataset[0]
    assert image.mode == "RGB" and target == foldered[0][1]


def test_imagenet_devkit_ground_truth(tiny, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(tiny / "imagenet", root)
    (root / "val_labels.txt").unlink()
    flat = {p.name: c for p, c in imagenet_samples(tiny / "imagenet", "val")}
    classes = imagenet_classes(root)
    # devkit ILSVRC2012_IDs are not in wnid order: use a reversed numbering
    id_of = {wnid: len(classes) - k for k, wnid in enumerate(classes)}
    synsets = np.zeros((len(classes) + 1,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for k, wnid in enumerate(classes):
        synsets[k] = (id_of[wnid], wnid, 0)
    synsets[-1] = (len(classes) + 1, "n99999999", 3)  # a non-leaf synset
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    names = sorted(flat)
    assert names[0] == "ILSVRC2012_val_00000001.JPEG"
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{id_of[classes[flat[n]]]}\n" for n in names))
    assert {p.name: c for p, c in imagenet_samples(root, "val")} == flat


# ----------------------------------------------------------------------------- check


def test_check_on_tiny_set(tiny, capsys):
    report = data_cli.check(tiny)
    assert report.ok and report.demo
    statuses = {(r.dataset, r.split): r for r in report.rows}
    assert all(r.status == "DEMO-SIZED" for r in report.rows)
    assert statuses[("VOC2007", "Main trainval")].found == TINY.voc07_trainval
    assert statuses[("VOC2007", "Main trainval")].official == 5011
    assert statuses[("SBD+VOC2012", "train_aug")].found == len(train_aug_items(tiny))
    assert data_cli.main(["check", "--data-root", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "DEMO-SIZED (found 24, official 5011)" in out and "DEMO-SIZED (found 8, official 1449)" in out


def test_check_reports_missing_without_failing(tmp_path, capsys):
    (tmp_path / "VOCdevkit").mkdir()
    report = data_cli.check(tmp_path)
    assert report.ok and {r.status for r in report.rows} == {"MISSING"}
    assert data_cli.main(["check", "--data-root", str(tmp_path)]) == 0
    assert "MISSING" in capsys.readouterr().out


def test_check_count_mismatch_without_marker(tiny_copy):
    (tiny_copy / demo.MARKER).unlink()
    report = data_cli.check(tiny_copy)
    assert report.ok and report.rows[0].status_text() == "COUNT MISMATCH (found 24, official 5011)"


# ----------------------------------------------------------------------------- broken copies


def _first_trainval_id(root: Path) -> str:
    return read_split(voc07(root) / "ImageSets/Main/trainval.txt")[0]


def _truncate_xml(root):
    path = voc07(root) / "Annotations" / f"{_first_trainval_id(root)}.xml"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    line = text[: len(text) // 2].count("\n") + 1  # expat reports the end of the data
    return path, rf":{line}: malformed XML", lambda: parse_annotation(path)


def _missing_jpeg(root):
    path = voc07(root) / "JPEGImages" / f"{_first_trainval_id(root)}.jpg"
    path.unlink()
    return path, "image file not found", lambda: VOCClassificationDataset(voc07(root), "trainval")


def _unknown_class(root):
    for path in sorted((voc07(root) / "Annotations").glob("*.xml")):
        lines = path.read_text().splitlines()
        k = next((k for k, line in enumerate(lines) if "<name>" in line), None)
        if k is not None and path.stem in read_split(voc07(root) / "ImageSets/Main/trainval.txt"):
            lines[k] = re.sub(r"<name>\w+</name>", "<name>spaceship</name>", lines[k])
            path.write_text("\n".join(lines) + "\n")
            message = rf":{k + 1}: unknown class name 'spaceship'"
            return path, message, lambda: detection_annotations(voc07(root), "trainval")
    raise AssertionError("no object found")


def _bad_label_value(root):
    path = voc07(root) / "ImageSets/Main/cat_trainval.txt"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].split()[0] + "  2"
    path.write_text("\n".join(lines) + "\n")
    return path, r":3: bad label '2'", lambda: classification_labels(voc07(root), "trainval")


def _wrong_palette(root):
    _, _, path = voc12_val_items(root)[0]
    mask = read_segmentation_mask(path)
    image = Image.fromarray(mask, mode="P")
    image.putpalette(bytes(np.repeat(np.arange(256, dtype=np.uint8), 3)))  # a grey ramp
    image.save(path)
    return path, "not the VOC colour", lambda: VOCSegmentationDataset(voc12_val_items(root))[0]


def _mask_value_57(root):
    _, _, path = voc12_val_items(root)[1]
    mask = read_segmentation_mask(path)
    mask[3, 4] = 57
    image = Image.fromarray(mask, mode="P")
    image.putpalette(VOC_PALETTE.tobytes())
    image.save(path)
    return path, r"mask value 57 at \(row 3, col 4\)", lambda: read_segmentation_mask(path)


def _mat_without_gtcls(root):
    image_id = read_split(sbd(root) / "train.txt")[0]
    path = sbd(root) / "cls" / f"{image_id}.mat"
    scipy.io.savemat(path, {"GTinst": {"Segmentation": np.zeros((4, 4), np.uint8)}})
    return path, "no GTcls.Segmentation", lambda: read_sbd_mask(path)


def _unknown_wnid(root):
    path = root / "imagenet" / "val_labels.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].split()[0] + " n01440764"
    path.write_text("\n".join(lines) + "\n")
    return path, r":2: unknown wnid 'n01440764'", lambda: imagenet_samples(root / "imagenet", "val")


@pytest.mark.parametrize("breakage", [_truncate_xml, _missing_jpeg, _unknown_class, _bad_label_value,
                                      _wrong_palette, _mask_value_57, _mat_without_gtcls, _unknown_wnid])
def test_broken_copies_raise_dataset_error_naming_the_file(tiny_copy, breakage, capsys):
    path, message, read = breakage(tiny_copy)
    with pytest.raises(DatasetError) as err:
        read()
    assert str(path) in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)
    assert isinstance(err.value, ValueError)
    report = data_cli.check(tiny_copy)
    assert not report.ok
    malformed = [r for r in report.rows if r.status == "MALFORMED"]
    assert malformed and all(str(path) in r.notes for r in malformed)
    assert data_cli.main(["check", "--data-root", str(tiny_copy)]) == 1
    assert "MALFORMED" in capsys.readouterr().out


# ----------------------------------------------------------------------------- make-demo


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_demo_is_deterministic(tiny, tmp_path, capsys):
    assert data_cli.main(["make-demo", "--out", str(tmp_path / "again"), "--scale", "tiny"]) == 0
    assert "VOC2007 trainval" in capsys.readouterr().out
    first, second = _hashes(tiny), _hashes(tmp_path / "again")
    assert first == second
    kinds = {Path(name).suffix for name in first}
    assert {".jpg", ".JPEG", ".xml", ".png", ".mat", ".txt"} <= kinds
    other = demo.voc_scene(SEED + 1, 2007, 1).image
    assert other.shape != demo.voc_scene(SEED, 2007, 1).image.shape or \
        not np.array_equal(other, demo.voc_scene(SEED, 2007, 1).image)


def test_make_demo_refuses_foreign_or_existing_folders(tiny, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    assert data_cli.main(["make-demo", "--out", str(tmp_path), "--scale", "tiny"]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError):
        demo.make_demo(tiny, scale="tiny", progress=False)
