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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from evals import metrics
from evals.common import CommonConfig, Execution, collate_views, random_scaled_view, stack_views, weight_and_bias_groups
from evals.datasets.preflight import preflight_datasets
from evals.datasets.voc import VOC_CLASSES, VOCClassificationDataset, official_main_sizes
from evals.run import run_task
from runtime.config import chosen, operational, protocol
from runtime.data import Augmented, loader_factory, sample_rng
from runtime.loop import Trainer, step_lr

TASK = "voc07_cls"
TRAIN_LAYERS = {"all": None, "fc6-8": ("fc6", "fc7", "fc8"), "fc8": ("fc8",)}
# values a config may take (checked by evals.run before any data is read)
CHECKS = {"choices": {"train_layers": tuple(TRAIN_LAYERS), "scale_sampling": ("uniform",)}, "minimum": {"crop": 64}}


@dataclass
class Config(CommonConfig):
    train_split: str = protocol("trainval", "P2")
    test_split: str = protocol("test", "P2")
    train_layers: str = protocol("all", "P2: all is the paper's Table 1 setting; also fc6-8, fc8")
    iterations: int = protocol(80_000, "P2")
    batch_size: int = protocol(16, "P2")
    lr: float = protocol(1e-3, "P2")
    lr_step: int = protocol(10_000, "P2: x0.5 every 10k iterations")
    lr_gamma: float = protocol(0.5, "P2")
    momentum: float = protocol(0.9, "P2")
    weight_decay: float = protocol(1e-6, "P2")
    bias_lr_mult: float = protocol(2.0, "P2: voc-cls src/train_cls.py setLR(t, 1, 2): biases at 2x the lr")
    bias_decay_mult: float = protocol(1.0, "P2: voc-cls src/train_cls.py setDecay(t, 1, 1): biases decayed "
                                           "like the weights")
    grad_clip: float = protocol(10.0, "P2: gradient norm clipped at 10")
    crop: int = protocol(227, "P2")
    scale_range: tuple[float, float] = protocol((0.5, 2.0), "P2: source side / crop side")
    scale_sampling: str = chosen("uniform", "the scale ratio is drawn uniformly in scale_range; P2 gives only "
                                            "the range, the reference draws it uniformly")
    test_views: int = protocol(10, "P2: 10 random views, logits summed")
    head_init_std: float = protocol(0.01, "P2: re-initialised layers N(0, 0.01)")
    head_init_bias: float = protocol(0.1, "P2: bias 0.1")
    dropout: float = protocol(0.5, "P2: AlexNet's fc6/fc7 dropout")
    checkpoint_every: int = operational(2_000)
    decode_device: str = operational("cpu", "where the JPEGs are decoded: cpu (the loader workers) or cuda (nvJPEG "
                                            "on the GPU, a batch of file bytes per step; the workers only draw "
                                            "the windows)")


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


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.SGD:
    """SGD over the trainable parameters with the reference's per-blob multipliers: weights at
    ``lr`` and ``weight_decay``, biases at ``bias_lr_mult`` x lr and ``bias_decay_mult`` x decay
    (P2: ``setLR(t, 1, 2)``, ``setDecay(t, 1, 1)`` in voc-cls's ``src/train_cls.py``)."""
    groups = weight_and_bias_groups(model, config.lr, config.weight_decay, config.bias_lr_mult,
                                    config.bias_decay_mult)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class sigmoid cross-entropy; labels 1 positive, 0 negative, -1 difficult (ignored).
    Summed over classes and averaged over images, as Caffe's SigmoidCrossEntropyLoss."""
    keep = (labels >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, (labels == 1).to(logits.dtype), weight=keep,
                                              reduction="sum")
    return loss / logits.shape[0]


@torch.no_grad()
def evaluate(model, dataset, config: Config, execution: Execution) -> tuple[np.ndarray, np.ndarray]:
    """Summed fc8 logits (float32) of ``test_views`` random views per image, and the labels."""
    model.eval()
    scores = np.zeros((len(dataset), len(VOC_CLASSES)), np.float64)
    labels = np.zeros((len(dataset), len(VOC_CLASSES)), np.int64)
    view_seed = config.seed + 1_000_003  # test views are random but fixed given the seed
    for index in tqdm(range(len(dataset)), desc="voc07_cls test", unit="img", mininterval=1.0):
        image, target = dataset[index]
        rngs = [sample_rng(view_seed, view, index) for view in range(config.test_views)]
        views = stack_views([random_scaled_view(image, rng, config.crop, config.scale_range, normalise=False,
                                                decode_device=config.decode_device) for rng in rngs])
        with execution.autocast():
            logits = model(execution.images(views))
        scores[index] = logits.float().sum(0).double().cpu().numpy()
        labels[index] = np.asarray(target)
    return scores, labels


class Data(NamedTuple):
    train: VOCClassificationDataset
    test: VOCClassificationDataset
    splits: dict  # split name -> image ids: the run's data identity


def load_data(config: Config) -> Data:
    """The train and test sets and their id lists."""
    voc_root = Path(config.data_root) / "VOCdevkit" / "VOC2007"
    train_set = VOCClassificationDataset(voc_root, config.train_split)
    test_set = VOCClassificationDataset(voc_root, config.test_split)
    return Data(train_set, test_set, {config.train_split: train_set.ids, config.test_split: test_set.ids})


def official_sizes(config: Config) -> dict[str, int]:
    """The image count of each split the ``paper`` preset must read: VOC2007 trainval 5,011 and test 4,952 (P2). ``evals.run`` compares
    them with the loaded split lists before training (``--allow-subset`` to run on others)."""
    return official_main_sizes(2007, (config.train_split, config.test_split))


def backbone_options(config: Config) -> dict:
    """How the checkpoint is loaded: a new 20-way fc8 on top."""
    return {"num_classes": len(VOC_CLASSES), "new_head": True, "dropout": config.dropout}


def preflight(data: Data, config: Config, log) -> None:
    preflight_datasets({config.train_split: data.train, config.test_split: data.test}, log=log)


METRIC_DEFINITIONS = {"AP": metrics.CLASSIFICATION_AP_DEFINITION,
                      "mAP": "mean of per-class AP over classes with positives"}


def train_and_evaluate(config: Config, data: Data, begun) -> dict:
    """Fine-tune (P2) and test with summed logits of random views; the metrics (main rank)."""
    info, device, loaded = begun.info, begun.device, begun.loaded
    execution = Execution.of(config, device)
    model = execution.model(build_model(config, loaded))
    trainable = [p for p in model.parameters() if p.requires_grad]
    net = DistributedDataParallel(model) if info.world_size > 1 else model
    optimizer = make_optimizer(model, config)
    scheduler = step_lr(optimizer, config.lr_step, config.lr_gamma)
    trainer = Trainer(model=net, optimizer=optimizer, scheduler=scheduler, total_steps=config.iterations,
                             work_dir=begun.work_dir, checkpoint_every=config.checkpoint_every,
                             grad_clip=config.grad_clip, info=info, description=TASK, trainable=trainable,
                             identity=begun.identity, amp_dtype=execution.amp_dtype, scaler=execution.scaler())
    if config.resume:
        trainer.resume()  # prints where it resumed

    def transform(sample, rng):
        image, target = sample
        # uint8 views: normalised per batch in step_fn, on the device
        view = random_scaled_view(image, rng, config.crop, config.scale_range, normalise=False,
                                  decode_device=config.decode_device)
        return view, torch.as_tensor(target)

    per_rank_batch = config.batch_size // info.world_size
    make_loader = loader_factory(Augmented(data.train, transform, config.seed), per_rank_batch, config, info,
                                 collate_fn=collate_views)

    def step_fn(batch):
        images, targets = batch
        return multilabel_loss(net(execution.images(images)).float(), targets.to(device)), {}

    t0 = time.monotonic()
    trainer.run(make_loader, step_fn, per_rank_batch, len(data.train))
    train_seconds = time.monotonic() - t0
    if not info.is_main:
        return {}
    scores, labels = evaluate(model, data.test, config, execution)
    per_class, mean_ap = metrics.voc_classification_ap(scores, labels)
    positive_rate = (labels == 1).sum(0) / np.maximum((labels >= 0).sum(0), 1)
    return {
        "mAP": 100.0 * mean_ap,
        # chance level: scoring at random gives an expected AP equal to the positive rate
        "chance_mAP": 100.0 * float(positive_rate[~np.isnan(per_class)].mean()),
        # None where a class has no positive test image (AP undefined, left out of the mean)
        "per_class_AP": {c: None if np.isnan(v) else 100.0 * float(v) for c, v in zip(VOC_CLASSES, per_class)},
        "chance_AP": {c: 100.0 * float(r) for c, r in zip(VOC_CLASSES, positive_rate)},
        "train_seconds": train_seconds,
        "model_selection": "none: fixed schedule, last iterate evaluated once on the test split",
    }


def summary(result: dict) -> str:
    return f"mAP {result['mAP']:.1f} (chance {result['chance_mAP']:.1f})"


def run(config: Config) -> dict:
    """Evaluate ``config.ckpt`` on VOC07 classification and write its record (evals.run.run_task)."""
    return run_task(TASK, config)
