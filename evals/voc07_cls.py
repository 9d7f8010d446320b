"""VOC2007 classification fine-tuning (protocols.md P2; Krähenbühl et al.'s voc-classification).

Train a new 20-way fc8 (and, depending on ``train_layers``, the layers below it) on VOC07
trainval with a per-class sigmoid cross-entropy that ignores "difficult" labels; test on VOC07
test by summing the raw fc8 logits of 10 random views per image; report scikit-learn's AP per
class and their mean. No selection on the test set: the schedule is fixed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from evals import engine, metrics
from evals.common import CommonConfig, random_scaled_view
from evals.datasets.preflight import preflight_datasets
from evals.datasets.voc import VOC_CLASSES, VOCClassificationDataset

TASK = "voc07_cls"
TRAIN_LAYERS = {"all": None, "fc6-8": ("fc6", "fc7", "fc8"), "fc8": ("fc8",)}
# values a config may take (engine.validate_config checks them before any data is read)
CHECKS = {"choices": {"train_layers": tuple(TRAIN_LAYERS)}, "minimum": {"crop": 64}}


@dataclass
class Config(CommonConfig):
    train_split: str = "trainval"         # P2
    test_split: str = "test"              # P2
    train_layers: str = "all"             # P2: "all" is the paper's Table 1 setting; also fc6-8, fc8
    iterations: int = 80_000              # P2
    batch_size: int = 16                  # P2
    lr: float = 1e-3                      # P2
    lr_step: int = 10_000                 # P2: x0.5 every 10k iterations
    lr_gamma: float = 0.5                 # P2
    momentum: float = 0.9                 # P2
    weight_decay: float = 1e-6            # P2
    grad_clip: float = 10.0               # P2: gradient norm clipped at 10
    crop: int = 227                       # P2
    scale_range: tuple[float, float] = (0.5, 2.0)  # P2: source side / crop side
    test_views: int = 10                  # P2: 10 random views, logits summed
    head_init_std: float = 0.01           # P2: re-initialised layers N(0, 0.01)
    head_init_bias: float = 0.1           # P2: bias 0.1
    dropout: float = 0.5                  # AlexNet's fc6/fc7 dropout
    checkpoint_every: int = 2_000


PRESETS = {
    "paper": Config(),
    # CPU-sized: the same protocol on the generated data, with a schedule that fits minutes.
    "demo": Config(preset="demo", data_root="demo_output/data", crop=112, iterations=100, lr=0.01,
                   lr_step=40, test_views=3, checkpoint_every=50, workers=1),
}


def build_model(config: Config, loaded) -> torch.nn.Module:
    model = loaded.model
    with torch.no_grad():
        model.fc8.weight.normal_(0.0, config.head_init_std)
        model.fc8.bias.fill_(config.head_init_bias)
    trainable = TRAIN_LAYERS[config.train_layers]
    for name, param in model.named_parameters():
        param.requires_grad = trainable is None or name.split(".")[0] in trainable
    return model


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class sigmoid cross-entropy; labels 1 positive, 0 negative, -1 difficult (ignored).
    Summed over classes and averaged over images, as Caffe's SigmoidCrossEntropyLoss."""
    keep = (labels >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, (labels == 1).to(logits.dtype), weight=keep,
                                              reduction="sum")
    return loss / logits.shape[0]


@torch.no_grad()
def evaluate(model, dataset, config: Config, device) -> tuple[np.ndarray, np.ndarray]:
    """Summed fc8 logits of ``test_views`` random views per image, and the labels."""
    model.eval()
    scores = np.zeros((len(dataset), len(VOC_CLASSES)), np.float64)
    labels = np.zeros((len(dataset), len(VOC_CLASSES)), np.int64)
    view_seed = config.seed + 1_000_003  # test views are random but fixed given the seed
    for index in tqdm(range(len(dataset)), desc="voc07_cls test", unit="img", mininterval=1.0):
        image, target = dataset[index]
        rngs = [engine.sample_rng(view_seed, view, index) for view in range(config.test_views)]
        views = torch.stack([random_scaled_view(image, rng, config.crop, config.scale_range) for rng in rngs])
        scores[index] = model(views.to(device)).sum(0).double().cpu().numpy()
        labels[index] = np.asarray(target)
    return scores, labels


def load_data(config: Config) -> tuple[VOCClassificationDataset, VOCClassificationDataset, dict]:
    """The train and test sets and their id lists (the run's data identity)."""
    voc_root = Path(config.data_root) / "VOCdevkit" / "VOC2007"
    train_set = VOCClassificationDataset(voc_root, config.train_split)
    test_set = VOCClassificationDataset(voc_root, config.test_split)
    return train_set, test_set, {config.train_split: train_set.ids, config.test_split: test_set.ids}


def run(config: Config) -> dict:
    engine.validate_config(config, **CHECKS)
    train_set, test_set, splits = load_data(config)
    begun = engine.begin_run(TASK, config, splits=splits, num_classes=len(VOC_CLASSES), new_head=True,
                             dropout=config.dropout)
    if begun.finished is not None:
        return begun.finished
    # the data is checked before training: a bad file stops the run now, in one line
    preflight_datasets({config.train_split: train_set, config.test_split: test_set}, log=begun.log)
    info, device, loaded = begun.info, begun.device, begun.loaded

    model = build_model(config, loaded).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    net = DistributedDataParallel(model) if info.world_size > 1 else model
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = engine.step_lr(optimizer, config.lr_step, config.lr_gamma)
    trainer = engine.Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=config.iterations,
                             work_dir=begun.work_dir, checkpoint_every=config.checkpoint_every,
                             grad_clip=config.grad_clip, info=info, description=TASK, trainable=trainable,
                             identity=begun.identity)
    if config.resume and trainer.resume():
        print(f"[{TASK}] resumed from {trainer.checkpoint_path} at step {trainer.state.step}")

    def transform(sample, rng):
        image, target = sample
        return random_scaled_view(image, rng, config.crop, config.scale_range), torch.as_tensor(target)

    train_data = engine.Augmented(train_set, transform, config.seed)
    per_rank_batch = config.batch_size // info.world_size

    make_loader = engine.loader_factory(train_data, per_rank_batch, config, info)

    def step_fn(batch):
        images, targets = batch
        return multilabel_loss(net(images.to(device)), targets.to(device)), {}

    t0 = time.monotonic()
    trainer.run(make_loader, step_fn, per_rank_batch, len(train_set))
    train_seconds = time.monotonic() - t0
    if not info.is_main:
        return {}
    scores, labels = evaluate(model, test_set, config, device)
    per_class, mean_ap = metrics.voc_classification_ap(scores, labels)
    positive_rate = (labels == 1).sum(0) / np.maximum((labels >= 0).sum(0), 1)
    result = {
        "mAP": 100.0 * mean_ap,
        # chance level: scoring at random gives an expected AP equal to the positive rate
        "chance_mAP": 100.0 * float(positive_rate[~np.isnan(per_class)].mean()),
        # None where a class has no positive test image (AP undefined, left out of the mean)
        "per_class_AP": {c: None if np.isnan(v) else 100.0 * float(v) for c, v in zip(VOC_CLASSES, per_class)},
        "chance_AP": {c: 100.0 * float(r) for c, r in zip(VOC_CLASSES, positive_rate)},
        "train_seconds": train_seconds,
        "model_selection": "none: fixed schedule, last iterate evaluated once on the test split",
    }
    path = engine.save_record(task=TASK, metrics=result,
                              metric_definitions={"AP": metrics.CLASSIFICATION_AP_DEFINITION,
                                                  "mAP": "mean of per-class AP over classes with positives"},
                              begun=begun, config=config, splits=splits)
    print(f"[{TASK}] mAP {result['mAP']:.1f} (chance {result['chance_mAP']:.1f}; {loaded.source}); record: {path}")
    return result
