"""Test ordering and tiers.

Tests that need a real SLURM cluster (the ``slurm_cluster`` fixture, which installs and starts
one) run last, so every other test — the dry runs among them — runs on a machine without SLURM
first, as on a fresh clone. ``-m "not slow"`` leaves out end-to-end runs and the real-SLURM tests.
"""
from __future__ import annotations

import shutil

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs and real-SLURM tests (left out by -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    needs_cluster = [item for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())]
    for item in needs_cluster:
        item.add_marker("slow")
    others = [item for item in items if item not in needs_cluster]
    items[:] = others + needs_cluster


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny generated VOC/SBD/ImageNet-format data set (seed 0), shared read-only: tests that
    break files copy it first."""
    from evals.datasets import demo
    root = tmp_path_factory.mktemp("demo") / "data"
    demo.make_demo(root, seed=0, scale="tiny", progress=False)
    return root


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    """A private copy of :func:`tiny`, for a test to break."""
    root = tmp_path / "data"
    shutil.copytree(tiny, root)
    return root
