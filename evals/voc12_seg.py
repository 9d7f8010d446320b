"""VOC2012 semantic segmentation with a sparse hypercolumn head (protocols.md P4; paper §4.5,
Larsson et al.'s two-stage fine-tuning).

* Data: train on train_aug (VOC12 seg train + SBD train/val, without VOC12 seg val; SBD masks
  from ``.mat``), test on VOC12 seg val; label 255 is ignored everywhere.
* Model: the checkpoint's AlexNet run densely (fc6/fc7 as convolutions) and a hypercolumn of
  conv1..conv5, fc6, fc7 sampled bilinearly with the shared sampler
  :func:`backbones.hypercolumn.sparse_hypercolumn`, then FC 1024 + ReLU + dropout 0.5 + FC 21.
* Training: a random crop + mirror per image and 128 random labelled pixels per crop (at least
  32 px from its border; "labelled" is a chosen value, ``sample_labelled_only``); softmax
  cross-entropy over those pixels. Stage 1 trains the head with
  the backbone frozen, stage 2 the whole network (P4's schedule); each stage is its own
  :class:`Trainer` with its own checkpoint, so a restart resumes inside the right stage.
* Test: the head on a stride-4 grid of input pixels, logits bilinearly upsampled to the image,
  one confusion matrix over the whole val set, per-class IoU and mIoU (percent).

Small inputs: fc6 is a 6x6 convolution over pool5, which is empty for images under ~220 px.
Every input is therefore padded (bottom/right, with the mean colour, i.e. 0 after
normalisation) to at least ``min_input`` px per side; padded pixels carry label 255 during
training and are cropped away from the prediction at test time.

The head is :class:`backbones.hypercolumn.HypercolumnHead`, the module the pretraining MLP is
(same sampler, same code): layers whose maps have fewer units than there are points are
projected to the hidden width *before* sampling (and at test time all layers are, once per
image). The result equals ``head(sparse_hypercolumn(...))`` up to float rounding (tested)
without materialising 9,568 channels per pixel.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from backbones.alexnet import AlexNet, layer_geometry
from backbones.checkpoint import fingerprint
from backbones.hypercolumn import HypercolumnHead, layer_channels, sample_layer
from evals import engine, metrics
from evals.common import CommonConfig, Execution, to_tensor
from evals.datasets.preflight import preflight_datasets
from evals.datasets import sbd, voc
from evals.datasets.sbd import train_aug_items, voc12_val_items
from evals.datasets.voc import VOC_CLASSES, VOC_PALETTE, VOID_LABEL, VOCSegmentationDataset
from evals.run import run_task
from results import store
from runtime.atomic import atomic_write
from runtime.config import chosen, operational, protocol
from runtime.errors import DatasetError
from runtime.data import Augmented, loader_factory
from runtime.loop import TrainState, Trainer

TASK = "voc12_seg"
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")  # P4 / §4.5
CHECKS = {"choices": {"layers": LAYERS}, "minimum": {"crop": 64}}
CLASS_NAMES = ("background",) + tuple(VOC_CLASSES)
NUM_CLASSES = len(CLASS_NAMES)  # 21, P4


@dataclass
class Config(CommonConfig):
    layers: tuple[str, ...] = protocol(LAYERS, "P4 / §4.5: conv1..conv5, fc6, fc7")
    crop: int = protocol(448, "P4: random crop (448 in the reference) + mirror")
    points_per_image: int = protocol(128, "P4: random pixels per image (reference)")
    sample_border: int = protocol(32, "P4: sampled pixels at least 32 px from the crop's border")
    sample_labelled_only: bool = chosen(True, "P4 says 128 random pixels, not whether void (255) ones may be drawn: "
                                              "drawing among labelled pixels gives every crop 128 pixels that count "
                                              "in the loss (void ones would be masked out of it)")
    hidden: int = protocol(1024, "P4: FC 1024 + ReLU + dropout 0.5 + FC 21")
    head_dropout: float = protocol(0.5, "P4")
    batch_size: int = protocol(10, "P4")
    momentum: float = protocol(0.9, "P4")
    weight_decay: float = protocol(5e-4, "P4")
    # stage 2 (whole network) is P4's reference schedule, counted from the stage's first step
    lr: float = protocol(1e-3, "P4")
    lr_milestones: tuple[int, ...] = protocol((22_500, 30_000), "P4: x0.1 at 22.5k and 30k")
    lr_gamma: float = protocol(0.1, "P4")
    stage2_iterations: int = protocol(40_000, "P4: stop at 40k")
    # stage 1 (head only, backbone frozen): P4 says the lengths are not published for AlexNet
    stage1_iterations: int = chosen(10_000, "head only, backbone frozen: ~9.5 epochs of train_aug at batch 10 to fit "
                                            "a fresh head on fixed features; stage 2 then runs P4's schedule")
    stage1_lr: float = chosen(1e-3, "P4's base lr, constant, for the head-only stage")
    head_init_std: float = chosen(0.01, "new layers N(0, 0.01), bias 0, as P2's re-initialised layers")
    grad_clip: float | None = protocol(None, "P4 does not clip (the demo preset does, for its large lr)")
    min_input: int = chosen(227, "fc6 (6x6 over pool5) needs inputs of ~220 px or more: smaller images are "
                                 "padded (mean colour, label 255) and the padding cropped from the prediction")
    test_stride: int = protocol(4, "P4: dense prediction at stride 4, bilinear upsampling")
    test_chunk: int = operational(8192, "grid points per head evaluation (memory only)")
    dropout: float = protocol(0.5, "P4: AlexNet's own dropout (after fc6 in the CaffeNet layout)")
    example_images: int = operational(4, "val images drawn as image / ground truth / prediction")
    checkpoint_every: int = operational(2_000)


PRESETS = {
    "paper": Config(),
    # CPU-sized for the generated `small` data (250 train_aug / 80 val images of 160-256 px), about
    # 1.5 minutes on one core: the smallest crop with a non-empty fc6, 80 head-only steps at a large lr
    # (the head must move far in few steps; clipped, as pretrained features are large), then a
    # short, gentle whole-network stage.
    "demo": Config(preset="demo", data_root="demo_output/data", crop=227, sample_border=16, batch_size=8,
                   stage1_iterations=80, stage1_lr=0.2, grad_clip=1.0, stage2_iterations=10, lr=0.01,
                   lr_milestones=(6,), checkpoint_every=20, workers=1),
}


# --- the model ---------------------------------------------------------------------------------------

class HypercolumnSegmenter(nn.Module):
    """AlexNet (dense fc6/fc7) + sparse hypercolumn head: logits at chosen pixels of each image."""

    def __init__(self, backbone: AlexNet, layers: Sequence[str] = LAYERS, hidden: int = 1024,
                 num_classes: int = NUM_CLASSES, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.geometry = layer_geometry(backbone.arch)
        self.head = HypercolumnHead({l: layer_channels(backbone, l) for l in self.layers}, hidden, num_classes,
                                    dropout)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone.activations(images, self.layers, dense=True)

    def forward(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), positions (B, N, 2) as (y, x) -> logits (B, N, classes)."""
        return self.head.forward_sampled(self.features(images), positions, self.geometry)

    def set_backbone_trainable(self, trainable: bool) -> None:
        for param in self.backbone.parameters():
            param.requires_grad = trainable


def build_model(config: Config, loaded) -> HypercolumnSegmenter:
    model = HypercolumnSegmenter(loaded.model, config.layers, config.hidden, NUM_CLASSES, config.head_dropout)
    with torch.no_grad():
        for fc in (model.head.fc1, model.head.fc2):
            fc.weight.normal_(0.0, config.head_init_std)
            fc.bias.zero_()
    return model


def pad_to(image: torch.Tensor, height: int, width: int, value: float = 0.0) -> torch.Tensor:
    """Pad ``(..., H, W)`` at the bottom/right to at least ``height`` x ``width``."""
    h, w = image.shape[-2:]
    if h >= height and w >= width:
        return image
    return F.pad(image, (0, max(width - w, 0), 0, max(height - h, 0)), value=value)


def grid_positions(height: int, width: int, stride: int, device=None) -> torch.Tensor:
    """(gh * gw, 2) (y, x) input pixels ``(stride * i, stride * j)`` covering ``height`` x ``width``."""
    ys = torch.arange(0, height, stride, device=device, dtype=torch.float32)
    xs = torch.arange(0, width, stride, device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


@torch.no_grad()
def dense_grid_logits(model: HypercolumnSegmenter, image: torch.Tensor, stride: int = 4, chunk: int = 8192,
                      min_input: int = 227) -> torch.Tensor:
    """Head logits on the stride-``stride`` grid of one image (3, H, W): (classes, gh, gw), grid
    point (i, j) at input pixel (stride * i, stride * j). The image is padded to ``min_input`` for
    the backbone only; the grid covers the original pixels. The head runs ``chunk`` points at a time."""
    height, width = image.shape[-2:]
    acts = model.features(pad_to(image[None], min_input, min_input))
    projected = model.head.project(acts, model.layers)  # once per image, then sampled per chunk
    positions = grid_positions(height, width, stride, image.device)
    logits = torch.cat([model.head.forward_sampled(acts, part[None], model.geometry, projected)[0]
                        for part in positions.split(chunk)])
    gh, gw = len(range(0, height, stride)), len(range(0, width, stride))
    return logits.T.reshape(-1, gh, gw)


def upsample_logits(grid_logits: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """Bilinear upsampling of (classes, gh, gw) grid logits to (classes, height, width): pixel (y, x)
    lies at grid coordinate (y / stride, x / stride) (clamped past the last grid point)."""
    pixels = grid_positions(height, width, 1, grid_logits.device)
    values = sample_layer(grid_logits[None], pixels[None], float(stride), 0.0)[0]
    return values.T.reshape(-1, height, width)


@torch.no_grad()
def predict(model: HypercolumnSegmenter, image: torch.Tensor, config: Config,
            execution: Execution | None = None) -> np.ndarray:
    """(H, W) int64 class map of one normalised image (3, H, W) (P4's dense test); the network under
    ``execution``'s autocast, the upsampling of its logits in float32."""
    with execution.autocast() if execution else contextlib.nullcontext():
        grid = dense_grid_logits(model, image, config.test_stride, config.test_chunk, config.min_input)
    logits = upsample_logits(grid.float(), image.shape[-2], image.shape[-1], config.test_stride)
    return logits.argmax(0).cpu().numpy().astype(np.int64)


# --- training data -----------------------------------------------------------------------------------

def training_sample(image: Image.Image, mask: np.ndarray, rng: np.random.Generator, crop: int, points: int,
                    border: int, labelled_only: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P4's augmentation and sparse sampling: pad to ``crop`` (mean colour / label 255), random
    ``crop`` x ``crop`` window, mirror with probability 1/2 (image and mask together), then
    ``points`` pixels drawn uniformly among the pixels at least ``border`` px from the window's
    edge -- only the labelled (!= 255) ones when ``labelled_only`` (the chosen value; P4 does not
    say) -- with replacement if there are fewer. Returns the image (3, crop, crop), positions
    (points, 2) as (y, x) and labels (points,); labels are all 255 (ignored) when no pixel
    qualifies."""
    tensor = pad_to(to_tensor(image), crop, crop)
    labels = torch.from_numpy(np.asarray(mask, dtype=np.int64))
    labels = pad_to(labels, crop, crop, value=VOID_LABEL)
    height, width = labels.shape
    y0, x0 = int(rng.integers(0, height - crop + 1)), int(rng.integers(0, width - crop + 1))
    tensor, labels = tensor[:, y0:y0 + crop, x0:x0 + crop], labels[y0:y0 + crop, x0:x0 + crop]
    if rng.random() < 0.5:
        tensor, labels = tensor.flip(-1), labels.flip(-1)
    eligible = labels != VOID_LABEL if labelled_only else torch.ones_like(labels, dtype=torch.bool)
    if 0 < border < crop // 2:
        inner = torch.zeros_like(eligible)
        inner[border:crop - border, border:crop - border] = True
        eligible &= inner
    candidates = np.flatnonzero(eligible.numpy())
    if candidates.size == 0:
        return (tensor.contiguous(), torch.zeros(points, 2),
                torch.full((points,), VOID_LABEL, dtype=torch.int64))
    chosen = rng.choice(candidates, points, replace=candidates.size < points)
    positions = torch.from_numpy(np.stack(np.divmod(chosen, crop), axis=1).astype(np.float32))
    return tensor.contiguous(), positions, labels.reshape(-1)[torch.from_numpy(chosen)]


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over the points whose label is not 255 (0 if none)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=VOID_LABEL,
                           reduction="sum")
    return loss / (labels != VOID_LABEL).sum().clamp(min=1)


# --- evaluation and pictures -------------------------------------------------------------------------

def evaluate(model: HypercolumnSegmenter, dataset: VOCSegmentationDataset, config: Config, execution: Execution,
             keep: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray, dict[int, tuple]]:
    """Confusion matrices of the model and of the all-background prediction over the whole set
    (P4: one matrix per set), and ``{index: (image, mask, prediction)}`` for the ``keep`` indices."""
    model.eval()
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    background = np.zeros_like(confusion)
    kept = {}
    for index in tqdm(range(len(dataset)), desc=f"{TASK} test", unit="img", mininterval=1.0):
        image, mask = dataset[index]
        prediction = predict(model, execution.images(to_tensor(image)), config, execution)
        confusion += metrics.confusion_matrix(prediction, mask, NUM_CLASSES, VOID_LABEL)
        background += metrics.confusion_matrix(np.zeros_like(prediction), mask, NUM_CLASSES, VOID_LABEL)
        if index in keep:
            kept[index] = (image, mask, prediction)
    return confusion, background, kept


def example_picture(examples: Sequence[tuple[Image.Image, np.ndarray, np.ndarray]], height: int = 200) -> Image.Image:
    """Rows of image / ground truth / prediction, masks in the VOC palette (255 in VOC's void colour)."""
    gap, header = 6, 18
    rows = []
    for image, mask, prediction in examples:
        width = max(1, round(image.width * height / image.height))
        cells = [image.convert("RGB").resize((width, height), Image.BILINEAR)]
        for labels in (mask, prediction):
            coloured = Image.fromarray(VOC_PALETTE[np.asarray(labels, dtype=np.uint8)])
            cells.append(coloured.resize((width, height), Image.NEAREST))
        rows.append(cells)
    column_width = max((row[0].width for row in rows), default=height)
    canvas = Image.new("RGB", (3 * column_width + 4 * gap, header + len(rows) * (height + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((gap + c * (column_width + gap), 3), title, fill="black")
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            canvas.paste(cell, (gap + c * (column_width + gap), header + r * (height + gap)))
    return canvas


def save_png_atomic(picture: Image.Image, path: Path) -> Path:
    """The PNG, written whole or not at all (runtime.atomic)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write(path, buffer.getbuffer())


def pictures_path(config: Config, begun) -> Path:
    """``<record path without .json>_examples.png``, beside the record."""
    record = store.record_path(engine.results_dir_of(config), TASK, begun.loaded.fingerprint, config.seed,
                               config.preset, begun.key)
    return record.with_name(record.stem + "_examples.png")


# --- the harness -------------------------------------------------------------------------------------

class FrozenWeightsChanged(RuntimeError):
    """The backbone changed during stage 1 (head only): the schedule is not what it claims."""


def stage_factor(milestones: Sequence[int], gamma: float):
    return lambda it: gamma ** sum(it >= m for m in milestones)


class Data(NamedTuple):
    train: VOCSegmentationDataset
    val: VOCSegmentationDataset
    splits: dict  # split name -> image ids: the run's data identity


def load_data(config: Config) -> Data:
    """train_aug and VOC12 val, and their id lists."""
    train_items, val_items = train_aug_items(config.data_root), voc12_val_items(config.data_root)
    val_ids = {i for i, _, _ in val_items}
    if any(i in val_ids for i, _, _ in train_items):  # P4: train_aug never holds a val image
        raise DatasetError(f"{config.data_root}: train_aug overlaps VOC12 val (SBD lists VOC12 val images)")
    splits = {"train_aug": [i for i, _, _ in train_items], "val": [i for i, _, _ in val_items]}
    return Data(VOCSegmentationDataset(train_items), VOCSegmentationDataset(val_items), splits)


def official_sizes(config: Config) -> dict[str, int]:
    """The image count of each split the ``paper`` preset must read: train_aug 10,582 and VOC2012 val 1,449 (P4). ``evals.run`` compares
    them with the loaded split lists before training (``--allow-subset`` to run on others)."""
    return {"train_aug": sbd.OFFICIAL_COUNTS["train_aug"], "val": voc.OFFICIAL_COUNTS[("VOC2012", "Segmentation", "val")]}


def backbone_options(config: Config) -> dict:
    """The checkpoint's AlexNet without its classifier (the hypercolumn head is new)."""
    return {"num_classes": None, "new_head": True, "dropout": config.dropout}


def preflight(data: Data, config: Config, log) -> None:
    preflight_datasets({"train_aug": data.train, "val": data.val}, log=log)


METRIC_DEFINITIONS = {
    "IoU": "per class TP / (TP + FP + FN) from one confusion matrix over all val pixels, label 255 ignored",
    "mIoU": "nan-mean of per-class IoU over the 21 classes (background included), percent",
    "all_background_mIoU": "mIoU of predicting background everywhere, same val set and matrix rule",
    "pictures": "PNG beside this record: val images / ground truth / prediction in the VOC palette",
}


def train_and_evaluate(config: Config, data: Data, begun) -> dict:
    """The two stages (head only, then the whole network; P4) and the dense test; the metrics (main rank)."""
    train_set, val_set = data.train, data.val
    info, device, loaded = begun.info, begun.device, begun.loaded
    execution = Execution.of(config, device)
    model = execution.model(build_model(config, loaded))
    backbone_fp = fingerprint(model.backbone.state_dict())
    work_dir = begun.work_dir
    per_rank_batch = config.batch_size // info.world_size

    def sample(item, rng):
        image, mask = item
        return training_sample(image, mask, rng, config.crop, config.points_per_image, config.sample_border,
                               config.sample_labelled_only)

    train_data = Augmented(train_set, sample, config.seed)

    make_loader = loader_factory(train_data, per_rank_batch, config, info)

    def make_trainer(stage: int, params, lr: float, factor, steps: int):
        net = DistributedDataParallel(model) if info.world_size > 1 else model  # registers trainable params only
        optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        name = "head only, backbone frozen" if stage == 1 else "whole network"
        trainer = Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=steps,
                                 work_dir=work_dir / f"stage{stage}", checkpoint_every=config.checkpoint_every,
                                 grad_clip=config.grad_clip, info=info, description=f"{TASK} stage {stage} ({name})",
                                 trainable=params, identity=begun.identity, amp_dtype=execution.amp_dtype,
                                 scaler=execution.scaler())

        def step_fn(batch):
            images, positions, labels = batch
            logits = net(execution.images(images), positions.to(device))
            return masked_cross_entropy(logits.float(), labels.to(device)), {}

        return trainer, step_fn

    t0 = time.monotonic()
    # Stage 2 starts only after stage 1 finished and passed its check, so a stage-2 checkpoint
    # means stage 1 is done.
    stage2_started = config.resume and (work_dir / "stage2" / "checkpoint.pt").exists()
    data_position = (0, 0)
    if not stage2_started:
        model.set_backbone_trainable(False)
        trainer, step_fn = make_trainer(1, list(model.head.parameters()), config.stage1_lr, lambda it: 1.0,
                                        config.stage1_iterations)
        if config.resume:
            trainer.resume()  # prints where it resumed
        state = trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
        data_position = (state.epoch, state.offset)
        if fingerprint(model.backbone.state_dict()) != backbone_fp:
            raise FrozenWeightsChanged(f"the backbone changed during stage 1 (head only); see {trainer.work_dir}")
        del trainer, step_fn  # drops stage 1's DDP wrapper (and its gradient hooks) before stage 2 wraps again
    model.set_backbone_trainable(True)
    trainer, step_fn = make_trainer(2, list(model.parameters()), config.lr,
                                    stage_factor(config.lr_milestones, config.lr_gamma), config.stage2_iterations)
    if not (stage2_started and trainer.resume()):  # the data stream continues where stage 1 left it
        trainer.state = TrainState(0, *data_position)
    trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
    train_seconds = time.monotonic() - t0
    if not info.is_main:
        return {}

    keep = sorted({int(round(i)) for i in np.linspace(0, len(val_set) - 1, min(config.example_images, len(val_set)))})
    confusion, background, kept = evaluate(model, val_set, config, execution, keep)
    per_class, miou = metrics.mean_iou(confusion)
    background_per_class, background_miou = metrics.mean_iou(background)
    pictures = None
    if kept:
        pictures = save_png_atomic(example_picture([kept[i] for i in keep]), pictures_path(config, begun))
    return {
        "mIoU": 100.0 * miou,
        # None where a class is absent from both ground truth and prediction (left out of the mean)
        "per_class_IoU": {c: None if np.isnan(v) else 100.0 * float(v) for c, v in zip(CLASS_NAMES, per_class)},
        "all_background_mIoU": 100.0 * background_miou,
        "pixel_accuracy": 100.0 * float(np.trace(confusion) / max(confusion.sum(), 1)),
        "val_pixels": int(confusion.sum()),
        "train_seconds": train_seconds,
        "stage1_backbone_frozen_check": "passed",
        "pictures": pictures.name if pictures else None,
        "model_selection": "none: fixed schedule, last iterate evaluated once on the val split",
    }


def summary(result: dict) -> str:
    return (f"mIoU {result['mIoU']:.1f} (all-background {result['all_background_mIoU']:.1f}); "
            f"pictures: {result['pictures']}")


def run(config: Config) -> dict:
    """Evaluate ``config.ckpt`` on VOC12 segmentation and write its record (evals.run.run_task)."""
    return run_task(TASK, config)
