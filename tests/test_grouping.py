"""The motion-grouping score (pretrain/grouping.py): its anchors (an oracle feature scores 1, a
constant one 0.5), AUC against a brute-force count, label rules, view alignment, and the CLI on a
small prepared world."""
import json
import math

import numpy as np
import pytest
import torch

from pretrain import grouping, world
from pretrain.data import augment_pair
from pretrain.prepare import PrepareConfig, prepare


def brute_force_auc(scores, labels):
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_the_pair_count_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=200), 1)  # many ties
    labels = rng.random(200) < 0.3
    assert grouping.roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert math.isnan(grouping.roc_auc(scores, np.ones(200, bool)))


def test_oracle_feature_scores_1_and_a_constant_one_half():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, 60)
    i, j, same = grouping.pairs_from_ids(ids)
    oracle = [torch.nn.functional.one_hot(torch.from_numpy(ids), 4).float()]
    constant = [torch.ones(60, 8)]
    assert grouping.grouping_auc([grouping.pair_similarities(oracle, i, j)], [same])[0] == 1.0
    assert grouping.grouping_auc([grouping.pair_similarities(constant, i, j)], [same])[0] == 0.5


def test_flow_as_the_feature_groups_flow_labelled_pairs():
    rng = np.random.default_rng(2)
    motions = np.array([[6.0, 0.0], [0.0, 6.0], [-5.0, -5.0]])  # three directions, far apart
    flow = motions[rng.integers(0, 3, 90)] + rng.normal(0, 0.2, (90, 2))
    i, j, same = grouping.pairs_from_flow(flow)
    assert same.any() and (~same).any()
    sims = grouping.pair_similarities([torch.from_numpy(flow)], i, j)
    assert grouping.grouping_auc([sims], [same])[0] == pytest.approx(1.0, abs=1e-3)
    # still pixels and the in-between band are left out
    still = np.zeros((5, 2))
    assert len(grouping.pairs_from_flow(still)[0]) == 0
    i, j, same = grouping.pairs_from_flow(np.array([[3.0, 0.0], [8.0, 0.0], [3.5, 0.0], [5.0, 0.0]]))
    # |3 - 5| = 2 and |3.5 - 5| = 1.5 fall between NEAR (1) and FAR (4): left out
    assert [(int(a), int(b), bool(c)) for a, b, c in zip(i, j, same)] == [(0, 1, False), (0, 2, True),
                                                                         (1, 2, False)]


def test_label_map_view_matches_the_flow_view():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, (90, 130)).astype(np.uint8)
    image = np.zeros((90, 130, 3), np.uint8)
    flow = np.stack([labels, labels], -1).astype(np.float32)
    _, viewed, _ = augment_pair(image, flow, np.ones((90, 130), bool), None, crop=112)
    scale = max(112, round(130 * 112 / 90)) / 130
    assert np.array_equal(np.rint(viewed[..., 0] / scale).astype(np.uint8), grouping.eval_view_labels(labels, 112))


@pytest.fixture(scope="module")
def world_flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouping")
    world.write_world_videos(root / "videos", count=2, seed=0, frames=12, height=96, width=128, progress=False)
    prepare(PrepareConfig(out=str(root / "flow"), videos=str(root / "videos"), frames_per_video=2,
                          val_fraction=0.0, workers=1, progress=False))
    return root / "flow"


@pytest.mark.slow
def test_cli_json_fields_and_determinism(world_flow, capsys):
    args = ["--ckpt", "random", "--data", str(world_flow), "--split", "train", "--pixels", "48", "--json",
            "--layers", "conv1,pool1"]
    assert grouping.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert {"auc", "pairs", "images", "labels", "auc_layers", "positives"} <= set(first)
    assert first["labels"] == "ids" and first["images"] == 4 and first["pairs"] == 4 * 48 * 47 // 2
    assert 0.5 < first["auc"] <= 1.0
    assert grouping.main(args) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert grouping.main(args[:-2] + ["--labels", "flow", "--layers", "conv1"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == "flow"


def test_cli_errors_are_one_line(world_flow, tmp_path, capsys):
    for args in (["--ckpt", "random-rescaled", "--data", str(world_flow)],
                 ["--ckpt", str(tmp_path / "missing.pt"), "--data", str(world_flow)],
                 ["--ckpt", "random", "--data", str(tmp_path / "nothing")],
                 ["--ckpt", "random", "--data", str(world_flow), "--layers", "conv9"]):
        assert grouping.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
