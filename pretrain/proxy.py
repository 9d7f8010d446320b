"""How well a CPFS network solves its own proxy task, as one number anyone can read.

    python -m pretrain.proxy --ckpt RUN/best.pt --data DIR            # skill on DIR's val split
    python -m pretrain.proxy --ckpt random --data DIR --seed 0 --json # a freshly initialised network

The CPFS loss (eqs. 2-5, ``pretrain.loss.cpfs_loss``) has no natural zero: its value depends on
the number of pixels N, on sigma^2 and on how much motion the flows hold, so "loss 4.37" says
nothing by itself. The skill places the network's loss between two references computed on the
*same* held-out flows at the *same* sigma^2:

    skill = (L_uniform - L_model) / (L_uniform - L_oracle)

* ``L_uniform``: every pixel gets the same embedding, so K_phi is 1/4 off the diagonal and the
  embedding softmax of eq. (5) is (almost) uniform. Its loss is not exactly log N: the replaced
  diagonal (logit -3/4, eq. 5) keeps a little mass on q = p, which gives, per pixel,
  ``log(N - 1 + e^-1) + S_f(p, p)`` (S_f's own diagonal weight, eq. 4). It is computed with
  ``cpfs_loss`` itself, so it follows the code's definition whatever it is. Skill 0.
* ``L_oracle``: free per-pixel embeddings (D = the network's embedding dimension) optimised
  directly against the flows, i.e. what a network that could produce any embedding at each
  pixel would reach. Budget: Adam, lr ``ORACLE_LR``, ``ORACLE_STEPS`` steps from a seeded
  Gaussian start, each image optimised on its own (Adam on the sum of per-image losses). A
  finite budget gives an upper bound on the true optimum, so a network could in principle score
  a little above 1 (see ``ORACLE_STEPS`` for how close it gets). Skill 1.

Over a split the three losses are means over its pairs and the skill is computed from those
means (a ratio of means, not a mean of per-pair ratios). sigma^2 is the checkpoint's learned
value, or the initial ``Config.sigma2_init`` for ``random``.

The skill is defined for CPFS checkpoints only: the direct-regression baseline (§4.5) has no
embedding and no sigma, so ``--ckpt`` of a ``direct`` run is refused.

``pretrain.train`` reports the same skill at every validation (``log.jsonl``, summary,
TensorBoard) through :class:`ValidationReference`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from pretrain.loss import cpfs_loss

__all__ = [
    "ORACLE_STEPS",
    "ORACLE_LR",
    "uniform_loss",
    "oracle_embeddings",
    "oracle_loss",
    "model_loss",
    "skill",
    "ProxyScore",
    "ValidationReference",
    "score_split",
]

# The oracle's budget. Measured on the tiny test flows (eq. (6)-normalised, sigma^2 = 0.01 and
# 0.0067, N = 128 and 512): at lr 0.05 the loss is within 1e-5 of its 600-step value by 150
# steps, and seeds 0-3 agree to 1e-6 (the free problem has no bad local minima there); 200 steps
# leave a margin. Fixed (not "until converged") so that the reference is the same computation
# every time and its cost is known in advance: 200 loss evaluations (forward + backward) over
# the flows, on one CPU thread ~0.1 s for 2 images x 16 pixels, ~1.1 s for 8 x 128 (measured on
# 2 shared cores).
ORACLE_STEPS = 200
ORACLE_LR = 0.05
# The oracle optimises this many images at once; each image's N x N matrices and their gradients
# live for a step, so a chunk bounds the memory (256 x 512^2 float32 ~ 270 MB per matrix).
ORACLE_CHUNK = 256


def uniform_loss(flows: Tensor, sigma2: Tensor | float) -> float:
    """``L_uniform``: the CPFS loss of a constant embedding (every pixel the same vector), mean
    over the B images of ``flows`` (B, N, 2). What a network that learned nothing scores."""
    constant = torch.ones(flows.shape[:2] + (1,), dtype=torch.float32, device=flows.device)
    with torch.no_grad():
        return float(cpfs_loss(constant, flows, sigma2))


def _gaussian_start(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """The oracle's starting embeddings, from a generator of its own: the global torch RNG is
    never touched, so computing a reference during training cannot change the training run."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On CPU, run the oracle on one intra-op thread (restored afterwards). Its steps are loops
    of small, cache-sized operations (``cpfs_loss`` works a few images at a time, issue 16),
    where waking threads costs more than they save: 200 steps over 8 images x 128 pixels took
    16 s on 2 threads and 1.1 s on one (2 shared cores). Nothing else runs meanwhile, so the
    thread count of the caller's own operations is unchanged."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def oracle_embeddings(flows: Tensor, sigma2: Tensor | float, dim: int, steps: int = ORACLE_STEPS,
                      lr: float = ORACLE_LR, seed: int = 0, chunk: int = ORACLE_CHUNK) -> Tensor:
    """Free per-pixel embeddings (B, N, dim) optimised directly against ``flows`` (B, N, 2) under
    the CPFS loss at ``sigma2``: the best a network with ``dim``-dimensional output could do.

    Each image is optimised on its own (Adam on the sum of per-image losses, so one image's
    gradient does not scale another's), ``chunk`` images at a time; the start is drawn for the
    whole batch at once, so the result does not depend on ``chunk``. Runs with gradients
    enabled even inside ``torch.no_grad`` (only these free tensors get gradients)."""
    sigma2 = sigma2.detach() if isinstance(sigma2, Tensor) else sigma2
    flows = flows.detach().float()
    start = _gaussian_start(tuple(flows.shape[:2]) + (dim,), seed, flows.device)
    parts = []
    with torch.enable_grad(), _one_cpu_thread(flows.device):
        for i in range(0, flows.shape[0], chunk):
            emb = start[i:i + chunk].clone().requires_grad_(True)
            optimizer = torch.optim.Adam([emb], lr=lr)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                (cpfs_loss(emb, flows[i:i + chunk], sigma2) * emb.shape[0]).backward()
                optimizer.step()
            parts.append(emb.detach())
    return torch.cat(parts)


def oracle_loss(flows: Tensor, sigma2: Tensor | float, dim: int, steps: int = ORACLE_STEPS,
                lr: float = ORACLE_LR, seed: int = 0) -> float:
    """``L_oracle``: the CPFS loss of :func:`oracle_embeddings`, mean over the B images."""
    emb = oracle_embeddings(flows, sigma2, dim, steps, lr, seed)
    with torch.no_grad():
        return float(cpfs_loss(emb, flows.float(), sigma2))


@torch.no_grad()
def model_loss(net: torch.nn.Module, images: Tensor, positions: Tensor, flows: Tensor,
               sigma2: Tensor | float) -> float:
    """``L_model``: the CPFS loss of ``net``'s embeddings (as it is: call ``net.eval()`` for the
    validation view), mean over the B images."""
    return float(cpfs_loss(net(images, positions).float(), flows.float(), sigma2))


def skill(loss: float, loss_uniform: float, loss_oracle: float) -> float:
    """``(L_uniform - L_model) / (L_uniform - L_oracle)``: 0 for a constant embedding, 1 for the
    oracle. NaN when the two references coincide (flows with no structure to learn, e.g. every
    pixel moving alike: then nothing beats the constant embedding and the score means nothing)."""
    span = loss_uniform - loss_oracle
    if not span > 1e-9 * max(1.0, abs(loss_uniform)):
        return math.nan
    return (loss_uniform - loss) / span


@dataclass
class ProxyScore:
    """The three losses of a split (means over ``pairs`` pairs) and the skill they give."""
    loss: float
    loss_uniform: float
    loss_oracle: float
    pairs: int

    @property
    def skill(self) -> float:
        return skill(self.loss, self.loss_uniform, self.loss_oracle)


class ValidationReference:
    """``L_uniform`` and ``L_oracle`` of a fixed set of validation flows, for ``pretrain.train``.

    The flows are read once (the validation view is deterministic: centre crop, fixed pixels).
    Neither reference depends on the network, only on sigma^2, so both are cached per sigma^2:
    with a frozen sigma they are computed once per run; with a learned sigma (P1) the oracle is
    recomputed from the same seeded start at each validation's sigma^2 (its full budget, no
    warm start, so a value does not depend on the run's history). Cost per validation: the
    oracle's ``ORACLE_STEPS`` loss evaluations (forward + backward) over the validation flows, no
    network pass: ~1 s for the ``demo`` preset's 16 x 128 on one CPU thread. At the paper's
    5,000 x 512 it is ~1e12 kernel entries per validation, not measured on a GPU yet (a
    memory-bound estimate for one H200 is seconds); ``--set val_skill=false`` turns it off.
    Reading the flows the first time decodes each validation pair once in the calling process.
    """

    def __init__(self, flows: Tensor, dim: int, seed: int = 0):
        self.flows, self.dim, self.seed = flows, dim, seed
        self._cache: tuple[float, float, float] | None = None  # (sigma2, uniform, oracle)

    @classmethod
    def from_dataset(cls, dataset, dim: int, device: torch.device, seed: int = 0) -> "ValidationReference":
        """The flows of every item of ``dataset`` (a FlowPairDataset or a Subset of one), read in
        this process without a DataLoader (no loader generator or worker is involved)."""
        flows = torch.stack([dataset[i]["flow"] for i in range(len(dataset))]) if len(dataset) else \
            torch.zeros(0, 2, 2)
        return cls(flows.to(device), dim, seed)

    def __len__(self) -> int:
        return self.flows.shape[0]

    def losses(self, sigma2: float) -> tuple[float, float]:
        """``(L_uniform, L_oracle)`` at ``sigma2``, means over the flows ((0, 0) for none: a DDP
        rank without validation pairs contributes nothing to the count-weighted average)."""
        if not len(self):
            return 0.0, 0.0
        if self._cache is None or self._cache[0] != sigma2:
            self._cache = (sigma2, uniform_loss(self.flows, sigma2),
                           oracle_loss(self.flows, sigma2, self.dim, seed=self.seed))
        return self._cache[1], self._cache[2]


def score_split(net: torch.nn.Module, batches, sigma2: float, dim: int, seed: int = 0,
                device: torch.device | str = "cpu") -> ProxyScore:
    """The :class:`ProxyScore` of ``net`` (in eval mode) over ``batches`` (dicts with ``image``,
    ``positions``, ``flow``, as FlowPairDataset items collated): model and uniform losses batch by
    batch, the oracle once over all the flows (each image is optimised on its own anyway)."""
    net.eval()
    model_sum, uniform_sum, flows = 0.0, 0.0, []
    for batch in batches:
        images, positions, flow = (batch[k].to(device) for k in ("image", "positions", "flow"))
        n = images.shape[0]
        model_sum += model_loss(net, images, positions, flow, sigma2) * n
        uniform_sum += uniform_loss(flow, sigma2) * n
        flows.append(flow)
    pairs = sum(f.shape[0] for f in flows)
    if pairs == 0:
        raise ValueError("no pairs to score")
    oracle = oracle_loss(torch.cat(flows), sigma2, dim, seed=seed)
    return ProxyScore(model_sum / pairs, uniform_sum / pairs, oracle, pairs)


# --- command line ----------------------------------------------------------------------------------

def load_network(ckpt: str, seed: int, device: torch.device):
    """``(net in eval mode, sigma^2, data settings)`` of a pretraining checkpoint, or of a freshly
    initialised CPFS network (``ckpt == "random"``, at ``seed``, with the initial sigma^2). The
    data settings (crop, pixels, M) are the run's, so the skill is measured on what it validated."""
    from pretrain.model import build_model, load_pretrain_checkpoint
    from pretrain.train import Config
    from runtime.errors import ConfigError

    defaults = Config()
    if ckpt == "random":
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
            torch.manual_seed(seed)
            net = build_model("cpfs")
        settings = {k: getattr(defaults, k) for k in ("crop", "num_pixels", "max_magnitude")}
        return net.to(device).eval(), defaults.sigma2_init, settings
    net, sigma2, raw = load_pretrain_checkpoint(ckpt, map_location="cpu")
    if net.method != "cpfs" or sigma2 is None:
        raise ConfigError(f"{ckpt}: a {net.method!r} checkpoint; the skill is defined for CPFS checkpoints only "
                          f"(the direct-regression baseline has no embedding and no sigma)")
    saved = raw.get("config") or {}
    settings = {k: saved.get(k, getattr(defaults, k)) for k in ("crop", "num_pixels", "max_magnitude")}
    return net.to(device), sigma2, settings


def _device(name: str) -> torch.device:
    """``auto``: cuda if available, else cpu; otherwise the named device (a ConfigError if unknown)."""
    from runtime.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r}: {err}") from None


def evaluate(ckpt: str, data: str, split: str = "val", seed: int = 0, pairs: int | None = None,
             batch_size: int = 8, device: str = "auto", num_pixels: int | None = None) -> dict:
    """The skill of ``ckpt`` (a checkpoint path or ``"random"``) on the first ``pairs`` pairs
    (all when None) of ``split`` of the prepared folder ``data`` (``"all"``: every pair), as the
    dict the CLI prints. ``num_pixels`` replaces the run's N (the losses, hence the skill, depend
    on N: compare scores at the same N)."""
    from pretrain.data import FlowPairDataset
    from runtime.errors import ConfigError, DatasetError

    if not os.path.isdir(data):
        raise DatasetError(f"{data}: no such data folder (--data must be a folder written by pretrain.prepare)")
    if pairs is not None and pairs < 1:
        raise ConfigError(f"--pairs must be positive, got {pairs}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if num_pixels is not None and num_pixels < 2:
        raise ConfigError(f"--num-pixels must be at least 2, got {num_pixels}")
    dev = _device(device)
    net, sigma2, settings = load_network(ckpt, seed, dev)
    if num_pixels is not None:
        settings["num_pixels"] = num_pixels
    dataset = FlowPairDataset(data, None if split == "all" else split, train=False, seed=seed, **settings)
    count = len(dataset) if pairs is None else min(pairs, len(dataset))
    if count == 0:
        raise DatasetError(f"{dataset.manifest_path}: no pairs in split {split!r}")
    subset = torch.utils.data.Subset(dataset, list(range(count)))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0)
    score = score_split(net, loader, sigma2, net.embedding_dim, seed=seed, device=dev)
    value = score.skill
    return {"skill": value if math.isfinite(value) else None, "loss": score.loss,
            "loss_uniform": score.loss_uniform, "loss_oracle": score.loss_oracle, "pairs": score.pairs,
            "sigma2": sigma2, "split": split, "ckpt": ckpt, "num_pixels": settings["num_pixels"],
            "oracle_steps": ORACLE_STEPS, "seed": seed}


def describe(result: dict) -> str:
    """The one readable line of the CLI."""
    value = "undefined (no structure in the flows)" if result["skill"] is None else f"{result['skill']:.3f}"
    return (f"skill {value}  (loss {result['loss']:.4f}; constant embedding {result['loss_uniform']:.4f} -> 0, "
            f"oracle {result['loss_oracle']:.4f} -> 1; sigma^2 {result['sigma2']:.4g}; "
            f"{result['pairs']} {result['split']} pairs; {result['ckpt']})")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pretraining checkpoint (RUN/best.pt, RUN/last.pt) or 'random'")
    p.add_argument("--data", required=True, help="folder written by pretrain.prepare")
    p.add_argument("--split", default="val", help="manifest split to score (default val; 'all': every pair)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random network, the sampled pixels and the oracle's start")
    p.add_argument("--pairs", type=int, help="score the first K pairs of the split (default all)")
    p.add_argument("--num-pixels", type=int, help="pixels per image (default: the run's; 512 for random)")
    p.add_argument("--batch-size", type=int, default=8, help="images per network pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the readable one")
    return p


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import print_result

    args = get_args_parser().parse_args(argv)
    return print_result(lambda: evaluate(args.ckpt, args.data, args.split, args.seed, args.pairs, args.batch_size,
                                         args.device, args.num_pixels), describe, args.json)


if __name__ == "__main__":
    sys.exit(main())
