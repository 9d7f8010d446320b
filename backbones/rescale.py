"""Krähenbühl et al.'s data-dependent initialisation and rescaling (ICLR 2016, arXiv 1511.06856;
protocols.md P9), for the AlexNets of :mod:`backbones.alexnet`.

    python -m backbones.rescale CKPT|random --data-root ROOT --out OUT.pt [--images N] [--seed S]
                                [--steps auto|both|within|between] [--layout caffenet|torchvision] [--size 227]

Why: a PyTorch-default random AlexNet attenuates its signal layer after layer (on the demo data the
rectified conv5 has a standard deviation about 30x below conv1's, fc7 about 100x), so its deep
layers barely train and its "Random" row understates what an untrained network can do. The
paper's *Random-rescaled* row (Table 2) is the same kind of network with the scales fixed by data.

What is done, on a sample of real images (``--images`` VOC2007 *trainval* JPEGs under
``--data-root``, chosen by a permutation seeded by ``--seed``; shorter side resized to ``--size``
and centre-cropped, normalised as every network here expects; never a test image):

1. **Within-layer** (the paper's Algorithm 1). Layer by layer from conv1 to fc7 (fc8 too when the
   network has one), the layer's pre-activation ``z`` on the sample is measured per output channel
   (mean ``mu`` and standard deviation ``sigma`` over images and positions) and the channel is
   mapped to ``(z - mu) / sigma + beta``: its weights are multiplied by ``1/sigma`` and its bias
   becomes ``(b - mu) / sigma + beta``. The next layer is then measured on the corrected
   activations. ``beta = 0`` (:data:`BETA`): zero mean, unit variance, as the paper states the
   goal; magic_init's command line defaults to ``-b 0.1`` instead. The weights' directions are the
   ones the network had (for ``random``: PyTorch's default uniform init under the seed, so
   ``random`` and ``random-rescaled`` of one seed share every filter's direction); the paper draws
   Gaussian weights, which differ only in the distribution of the directions.
2. **Between-layer** (Algorithm 2, magic_init's ``-cs``). The rate at which layer ``k``'s weights
   change under SGD is measured as ``C_k = ||dL/dW_k||^2 / ||W_k||^2`` with ``L = <eta, output>``,
   ``eta`` a standard normal random target over the network's output (rectified fc7, or the fc8
   logits), on the first :data:`BETWEEN_IMAGES` images of the sample. Each layer's weights are then
   scaled by ``r_k = (C_k / C)^(1/4)``, ``C`` the geometric mean of the ``C_k``, and its bias by
   ``r_1 * ... * r_k`` (so the bias keeps pace with the scaled input, as magic_init's bias
   adjustment does). Because ReLU and max pooling are positively homogeneous this maps every
   pre-activation ``z_k`` to ``(r_1...r_k) z_k`` exactly, the output is unchanged
   (``prod r_k = 1``) and, the gradient of layer k scaling by ``1/r_k``, every ``C_k`` becomes
   ``C``: one step solves it. The loop (at most :data:`BETWEEN_ITERATIONS` corrections, the
   paper's "until convergence, roughly 10 iterations") stops when every ``C_k`` is within
   :data:`TOLERANCE` of their geometric mean, normally at the second measurement. ``eta`` is drawn
   once, from the seed: magic_init draws a fresh one per iteration, but one draw's sampling noise
   moves the rates by about 5% (measured on the demo data), so fresh draws would undo the exact
   step each time and never meet a 1% test.

What equal rates leave open: multiplying every layer's weights by one common factor ``lam`` (and
layer k's bias by ``lam**k``) keeps the rates equal and scales layer k's output by ``lam**k``; the
step above fixes ``lam`` by keeping the network's output. Whichever ``lam``, the rates set how far
apart the layers' activation scales end up (x2.4-2.7 on the demo data, where step 1 alone leaves
x1.04; README "Rescaling"). ``--steps within`` applies step 1 alone.

Simplifications, all stated: the paper's per-column rates are averaged per layer through the
squared norms (magic_init's own measure); the paper damps each step (``alpha``), which the exact
one-step solution for these homogeneous networks makes unnecessary. Members with Caffe's LRN
(imported reference-layout networks) are not exactly homogeneous: there the step is approximate and
the loop's further corrections (up to :data:`BETWEEN_ITERATIONS`) do the rest, as in magic_init. A checkpoint (as opposed to ``random``) gets only step 2 by default, as magic_init
does for a loaded network (``-l``): its filters are kept and only the layers' relative scales
change (``--steps both`` applies both).

Determinism: the built-in ``random-rescaled`` checkpoint of ``evals.run`` is built by the grid's
planner and by runs that share no work dir (:func:`random_rescaled_backbone`'s cache), on machines
with other thread counts, and its fingerprint must agree.
So the statistics are computed in float64 and the corrections rounded before use (gains and
factors to a 17-bit mantissa, bias shifts to multiples of 2^-20): float64 rounding noise never
reaches that resolution, and what is applied afterwards is exact or correctly rounded IEEE
arithmetic, the same everywhere.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from backbones.alexnet import ACTIVATIONS, CONV_LAYERS, FC_LAYERS, AlexNet
from backbones.checkpoint import (LoadedBackbone, fingerprint, load_backbone, load_state_dict_strict,
                                  random_backbone, read_checkpoint, save_backbone)
from backbones.inputs import load_batch, sample_paths, voc07_trainval_jpegs
from runtime.errors import CheckpointError, DatasetError, one_line

METHOD = "krahenbuhl-rescale"
BETA = 0.0                # the mean every pre-activation is centred on (paper: beta)
DEFAULT_IMAGES = 160      # magic_init's README: -nit 10 batches of the default -bs 16
BETWEEN_IMAGES = 16       # magic_init measures the change rates on one batch
BETWEEN_ITERATIONS = 10   # "roughly 10 iterations"
TOLERANCE = 0.01          # stop when every rate is within 1% of their geometric mean (as magic_init)
INPUT_SIZE = 227          # the input the evaluated networks see (P2 crop)
CHUNK = 16                # images per forward pass in step 1 (memory only; results do not depend on it)
MANTISSA_BITS = 17        # rounding of gains and factors (see Determinism)
SHIFT_STEP = 2.0 ** -20   # rounding of bias shifts
RECTIFIED = tuple(n for n in ACTIVATIONS if n in CONV_LAYERS + FC_LAYERS)  # conv1..conv5, fc6, fc7


# --- the network as a chain of affine layers -------------------------------------------------------

def parameter_layers(model: AlexNet) -> tuple[str, ...]:
    """The affine layers in order: conv1..conv5, fc6, fc7 and fc8 when there is a head."""
    return CONV_LAYERS + FC_LAYERS + (("fc8",) if model.fc8 is not None else ())


def next_input(model: AlexNet, name: str, z: torch.Tensor) -> torch.Tensor:
    """What the layer after ``name`` reads, from ``name``'s pre-activation ``z`` (eval mode, no
    dropout): the member's ReLU (leaky where it is), the 3x3/2 max pool after conv1, conv2 and conv5, pool5 flattened as
    ``AlexNet.activations`` does. fc8 logits are returned as they are."""
    if name == "fc8":
        return z
    a = model.rectify(z)
    if name in CONV_LAYERS:
        a = model.after_conv(name, a)  # the member's LRN and pooling
    if name == "conv5":
        a = model._flatten_pool5(a)
    return a


def network_output(model: AlexNet, x: torch.Tensor) -> torch.Tensor:
    """The last layer's output (rectified fc7, or fc8 logits), through :func:`next_input`."""
    x = model.prepare_input(x)
    for name in parameter_layers(model):
        x = next_input(model, name, getattr(model, name)(x))
    return x


def _channel_shape(name: str, z: torch.Tensor) -> tuple[int, ...]:
    return (-1, 1, 1) if z.dim() == 4 else (-1,)


# --- exact rounding (see Determinism in the module docstring) ---------------------------------------

def round_mantissa(x: torch.Tensor, bits: int = MANTISSA_BITS) -> torch.Tensor:
    """``x`` with its mantissa rounded to ``bits`` bits, by exact operations only (frexp/ldexp)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2.0 ** bits) / 2.0 ** bits, exponent.to(x.dtype))


def round_shift(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x / SHIFT_STEP) * SHIFT_STEP


# --- step 1: within-layer -----------------------------------------------------------------------------

@torch.no_grad()
def normalise_within(model: AlexNet, images: torch.Tensor, beta: float = BETA) -> dict[str, dict]:
    """Algorithm 1 on ``model`` in place (see the module docstring). Returns, per layer, the mean
    over channels of the pre-activation mean and std it measured before correcting them."""
    measured = {}
    a = images
    for name in parameter_layers(model):
        layer = getattr(model, name)
        z = torch.cat([layer(a[i:i + CHUNK]) for i in range(0, len(a), CHUNK)])
        dims = (0, 2, 3) if z.dim() == 4 else (0,)
        mean, std = z.mean(dims), z.std(dims, unbiased=False)
        alive = std > 1e-12  # a channel constant over the sample cannot be normalised: left as it is
        gain = torch.where(alive, round_mantissa(1.0 / std.clamp_min(1e-12)), torch.ones_like(std))
        shift = torch.where(alive, round_shift(beta - mean * gain), torch.zeros_like(mean))
        layer.weight.mul_(gain.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
        layer.bias.mul_(gain).add_(shift)
        shape = _channel_shape(name, z)
        z.mul_(gain.reshape(shape)).add_(shift.reshape(shape))  # = layer(a) with the new weights
        a = next_input(model, name, z)
        measured[name] = {"mean": float(mean.mean()), "std": float(std.mean()), "dead_channels": int((~alive).sum())}
    return measured


# --- step 2: between-layer ------------------------------------------------------------------------------

RATE_AVERAGES = ("layer", "channel", "column")  # how a layer's rate is pooled (see change_rates)


def change_rates(model: AlexNet, images: torch.Tensor, seed: int, per: str = "layer") -> dict[str, float]:
    """``C_k = ||dL/dW_k||^2 / ||W_k||^2`` per layer, for ``L = <eta, output>`` with a standard
    normal ``eta`` drawn from ``seed`` (the same target for the same seed and output shape).

    ``per``: ``layer`` (the default, magic_init's measure) pools the squared norms over the whole
    layer; ``channel`` and ``column`` average the ratio over output channels or over input
    columns (the paper's per-column mean) instead. The last two are measurement variants
    (benchmarks/rescale_spread.py); the command line uses ``layer``."""
    if per not in RATE_AVERAGES:
        raise ValueError(f"per must be one of {RATE_AVERAGES}, got {per!r}")
    weights = [getattr(model, name).weight for name in parameter_layers(model)]
    with torch.enable_grad():
        output = network_output(model, images)
        eta = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
        grads = torch.autograd.grad((output * eta).sum(), weights)
    rates = {}
    for name, w, g in zip(parameter_layers(model), weights, grads):
        w2, g2 = w.detach().pow(2), g.pow(2)
        if per == "layer":
            rates[name] = float(g2.sum() / w2.sum())
        else:
            if per == "column":
                w2, g2 = w2.transpose(0, 1), g2.transpose(0, 1)
            rates[name] = float((g2.flatten(1).sum(1) / w2.flatten(1).sum(1)).mean())
    return rates


@torch.no_grad()
def _scale_layers(model: AlexNet, factors: torch.Tensor) -> None:
    """Weights of layer k times ``factors[k]``, its bias times the product of factors up to k."""
    cumulative = torch.ones((), dtype=torch.float64)
    for name, factor in zip(parameter_layers(model), factors):
        cumulative = cumulative * factor
        layer = getattr(model, name)
        layer.weight.mul_(factor.to(layer.weight.dtype))
        layer.bias.mul_(cumulative.to(layer.bias.dtype))


def equalise_between(model: AlexNet, images: torch.Tensor, seed: int,
                     iterations: int = BETWEEN_ITERATIONS, tolerance: float = TOLERANCE,
                     per: str = "layer") -> list[dict[str, float]]:
    """Algorithm 2 on ``model`` in place (see the module docstring); returns the rates measured
    at each iteration (the last entry is the converged state unless ``iterations`` ran out).
    ``per``: how each layer's rate is pooled (:func:`change_rates`)."""
    history = []
    for _ in range(iterations):
        rates = change_rates(model, images, seed, per)
        history.append(rates)
        logs = torch.tensor([math.log(r) for r in rates.values()], dtype=torch.float64)
        deviation = logs - logs.mean()
        if float(deviation.abs().max()) <= math.log1p(tolerance):
            break
        _scale_layers(model, round_mantissa(torch.exp(deviation / 4)))
    return history


# --- the whole procedure ----------------------------------------------------------------------------------

def rescale(model: AlexNet, images: torch.Tensor, *, seed: int, within: bool = True, between: bool = True,
            beta: float = BETA, between_images: int = BETWEEN_IMAGES,
            iterations: int = BETWEEN_ITERATIONS, rate_per: str = "layer") -> tuple[AlexNet, dict]:
    """A rescaled copy of the plain ``model`` (``images``: ``N x 3 x H x W``, normalised input) and
    a JSON-able report of what was measured. ``seed`` draws the random targets of step 2;
    ``rate_per`` is :func:`change_rates`' ``per``."""
    if model.has_batchnorm:
        raise ValueError("rescaling needs a plain AlexNet (fold BatchNorm first: backbones.alexnet.fold_batchnorm)")
    if not (within or between):
        raise ValueError("nothing to do: neither the within-layer nor the between-layer step was asked for")
    work = copy.deepcopy(model).double().eval()
    data = images.double()
    report: dict = {"method": METHOD, "within_layer": within, "between_layer": between, "beta": beta,
                    "images": len(images), "input_size": list(images.shape[-2:])}
    if within:
        report["within"] = normalise_within(work, data, beta)
    if between:
        history = equalise_between(work, data[:between_images], seed, iterations, per=rate_per)
        report.update(between_images=min(between_images, len(images)), between_iterations=len(history),
                      rates_first=history[0], rates_last=history[-1])
        if rate_per != "layer":
            report["rate_per"] = rate_per
    out = copy.deepcopy(model)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    state = {k: v.to(dtypes[k]) for k, v in work.state_dict().items()}
    out.load_state_dict(state, strict=True)
    return out, report


def sample_images(data_root, count: int, seed: int, size: int = INPUT_SIZE) -> tuple[torch.Tensor, list[str]]:
    """The rescaling sample: ``count`` VOC2007 trainval JPEGs under ``data_root`` chosen by
    ``seed``, as a batch, and their image ids."""
    paths = sample_paths(voc07_trainval_jpegs(data_root), count, seed)
    return load_batch(paths, size), [p.stem for p in paths]


@torch.no_grad()
def activation_stds(model: AlexNet, images: torch.Tensor, names: Sequence[str] = RECTIFIED) -> dict[str, float]:
    """Standard deviation of each named activation (after its ReLU) over ``images``, all positions
    and channels pooled: the number that shows a signal dying out layer after layer."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(images), CHUNK):
        for name, value in model.activations(images[i:i + CHUNK], names).items():
            parts[name].append(value.double().flatten())
    model.train(was_training)
    return {name: float(torch.cat(parts[name]).std()) for name in names}


def spread(stds: dict[str, float]) -> float:
    """Largest over smallest of :func:`activation_stds`' values: how far apart the layers' scales are."""
    return max(stds.values()) / min(stds.values())


# --- the built-in `random-rescaled` checkpoint of evals.run ----------------------------------------------

def random_rescaled_backbone(seed: int, data_root, *, layout: str = "caffenet", num_classes: int | None = None,
                             dropout: float = 0.5, cache_dir=None) -> LoadedBackbone:
    """The Random-rescaled row: :func:`backbones.checkpoint.random_backbone` under ``seed``, both
    steps on :data:`DEFAULT_IMAGES` VOC2007 trainval images of ``data_root`` sampled by ``seed``.
    The same network as ``python -m backbones.rescale random --data-root ROOT --seed S``. The
    fingerprint is the headless backbone's; a new fc8 (``num_classes``) is initialised afterwards
    from the global RNG, as for ``random``.

    ``cache_dir``: where a built network is kept under a key of everything it depends on
    (:func:`cache_key`), so that the grid's planner and the cells after it, or several harnesses
    on one seed, build it once (about 25 s of a 1-thread run). What is read back is the same
    network a fresh build gives (the build is exact; see Determinism) and is checked against the
    fingerprint stored beside it; an unreadable entry is rebuilt and replaced."""
    base = random_backbone(seed, layout=layout, dropout=dropout).model
    paths = sample_paths(voc07_trainval_jpegs(data_root), DEFAULT_IMAGES, seed)
    cached = None
    if cache_dir is not None:
        entry = Path(cache_dir) / f"random-rescaled-{cache_key(base, paths)}.pt"
        cached = _read_cached(entry, base)
    if cached is not None:
        model, report = cached
    else:
        with torch.random.fork_rng(devices=[]):
            batch = load_batch(paths, INPUT_SIZE)
            model, report = rescale(base, batch, seed=seed)
            report.update(seed=seed, data_root=None, image_ids=[p.stem for p in paths])
        if cache_dir is not None:
            try:  # best effort: a work dir that cannot take it costs only the next run's rebuild
                entry.parent.mkdir(parents=True, exist_ok=True)
                save_backbone(model, entry, meta={"rescale": report})
            except OSError as err:
                print(f"note: random-rescaled not kept in {entry.parent} ({one_line(err)}); "
                      f"later runs rebuild it", file=sys.stderr)
    report["data_root"] = str(data_root)  # the caller's spelling, also for a cached network
    backbone_fp = fingerprint(model.state_dict())
    source = f"random-rescaled(seed={seed})"
    if num_classes:
        full = AlexNet(layout, num_classes=num_classes, dropout=dropout)
        load_state_dict_strict(full, model.state_dict(), source=source, allow_missing=("fc8.*",))
        model = full
    return LoadedBackbone(model, backbone_fp, source, "random-rescaled",
                          {"loaded": [], "missing": list(model.state_dict()), "discarded": [],
                           "folded_batchnorm": False}, {"seed": seed, "rescale": report})


CACHE_SOURCES = ("rescale.py", "alexnet.py", "inputs.py")  # the code a built network depends on


def cache_key(base: AlexNet, paths: Sequence[Path]) -> str:
    """Hex digest of what :func:`random_rescaled_backbone` builds from: the random network's
    fingerprint (seed, layout, init), the sample's file names and bytes, the source of the
    modules that measure and correct it, and the torch version."""
    digest = hashlib.sha256(f"{METHOD} {torch.__version__} {fingerprint(base.state_dict())}".encode())
    here = Path(__file__).resolve().parent
    for name in CACHE_SOURCES:
        digest.update((here / name).read_bytes())
    for path in paths:
        digest.update(path.name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()[:24]


def _read_cached(entry: Path, base: AlexNet) -> tuple[AlexNet, dict] | None:
    """The network and report kept in ``entry`` (loaded into a copy of ``base``: no RNG is drawn),
    or None when there is none or it cannot be read (truncated, edited: :func:`read_checkpoint`
    checks the stored fingerprint)."""
    if not entry.is_file():
        return None
    try:
        ckpt = read_checkpoint(entry)
        model = copy.deepcopy(base)
        load_state_dict_strict(model, ckpt.state_dict, source=str(entry))
    except (CheckpointError, RuntimeError, ValueError, OSError):
        return None
    report = ckpt.meta.get("rescale")
    return (model, dict(report)) if isinstance(report, dict) else None


# --- command line -------------------------------------------------------------------------------------------

def _load_source(ckpt: str, seed: int, layout: str) -> tuple[AlexNet, dict, str]:
    """The network to rescale, the meta to carry over and its fingerprint."""
    if ckpt == "random":
        loaded = random_backbone(seed, layout=layout)
        return loaded.model, {}, loaded.fingerprint
    head = read_checkpoint(ckpt).arch.num_classes  # a head is kept (and rescaled with the rest)
    loaded = load_backbone(ckpt, num_classes=head)
    return loaded.model, dict(loaded.meta), loaded.fingerprint


def output_meta(ckpt: str, source_meta: dict, source_fp: str, report: dict) -> dict:
    """The written checkpoint's meta. The method and its parameters go under ``rescale``: a
    top-level ``method`` is what results.load reads as the *pretraining* method, and the report
    would then mark a rescaled random network as pretrained. A checkpoint source keeps its own
    meta (its pretraining identity) and gets "(rescaled)" after its label."""
    rescale_meta = {**report, "source": ckpt, "source_fingerprint": source_fp}
    if ckpt == "random":
        return {"label": "Random-rescaled", "supervision": "-", "seed": report["seed"], "rescale": rescale_meta}
    label = source_meta.get("label", Path(ckpt).stem)
    return {**source_meta, "label": f"{label} (rescaled)", "rescale": rescale_meta}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m backbones.rescale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", metavar="CKPT|random", help="checkpoint to rescale, or 'random' (seeded init)")
    parser.add_argument("--data-root", required=True, help="folder holding VOCdevkit/VOC2007 (trainval images)")
    parser.add_argument("--out", required=True, help="where to write the rescaled checkpoint")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES,
                        help=f"trainval images in the sample (default {DEFAULT_IMAGES}; all if fewer)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample, the random targets and 'random'")
    parser.add_argument("--steps", choices=("auto", "both", "within", "between"), default="auto",
                        help="auto (default): both steps for 'random', only the between-layer step for a "
                             "checkpoint; within: Algorithm 1 alone (every layer at unit pre-activation variance)")
    parser.add_argument("--layout", choices=("caffenet", "torchvision"), default="caffenet",
                        help="layout of 'random' (a checkpoint has its own)")
    parser.add_argument("--size", type=int, default=INPUT_SIZE, help="side of the centre crops (default 227)")
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.images < 1:
            raise ValueError(f"--images must be at least 1, got {args.images}")
        model, source_meta, source_fp = _load_source(args.ckpt, args.seed, args.layout)
        within = args.steps in ("both", "within") or (args.steps == "auto" and args.ckpt == "random")
        between = args.steps != "within"
        batch, ids = sample_images(args.data_root, args.images, args.seed, args.size)
        rescaled, report = rescale(model, batch, seed=args.seed, within=within, between=between)
        report.update(seed=args.seed, data_root=str(args.data_root), image_ids=ids)
        before, after = activation_stds(model, batch), activation_stds(rescaled, batch)
        fp = save_backbone(rescaled, args.out, meta=output_meta(args.ckpt, source_meta, source_fp, report))
    except (CheckpointError, DatasetError, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    steps = " + ".join(s for s, on in (("within-layer", within), ("between-layer", between)) if on)
    iterations = f", {report['between_iterations']} iteration(s)" if between else ""
    print(f"rescaled {args.ckpt} on {len(batch)} VOC2007 trainval images ({steps}{iterations})")
    print("activation std  " + "  ".join(f"{n:>7}" for n in before) + "   max/min")
    print("  before        " + "  ".join(f"{v:7.4f}" for v in before.values()) + f"  x{spread(before):.2f}")
    print("  after         " + "  ".join(f"{v:7.4f}" for v in after.values()) + f"  x{spread(after):.2f}")
    print(f"wrote {args.out} (fingerprint {fp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
