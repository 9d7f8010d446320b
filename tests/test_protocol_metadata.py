"""Protocol metadata lives once, in the config fields: every field says where its value comes from,
and what is derived from that (operational fields, the README's chosen table) agrees with it."""
from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from evals.run import TASKS, chosen_table, main as run_main, task_module
from pretrain.prepare import PrepareConfig
from pretrain.train import PRESETS as PRETRAIN_PRESETS
from runtime.config import operational_fields, source_of, sources

README = Path(__file__).resolve().parents[1] / "README.md"
CONFIGS = [task_module(t).PRESETS["paper"] for t in TASKS] + [PRETRAIN_PRESETS["paper"], PrepareConfig()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__module__)
def test_every_config_field_declares_its_source(config):
    for item in fields(config):
        source = source_of(item)  # raises for a field without a declaration
        assert source in ("chosen", "operational") or re.match(r"P\d", source), (item.name, source)


def test_the_readme_table_of_chosen_values_is_the_declared_one():
    text = README.read_text()
    block = text.split("<!-- chosen-values:start -->\n", 1)[1].split("<!-- chosen-values:end -->", 1)[0]
    assert block == chosen_table()


def test_memory_and_path_settings_are_operational_and_protocol_values_are_not():
    seg, det = task_module("voc12_seg").PRESETS["paper"], task_module("voc07_det").PRESETS["paper"]
    assert {"test_chunk", "work_dir", "workers", "checkpoint_every", "data_root"} <= operational_fields(seg)
    assert {"test_roi_chunk", "proposals_dir"} <= operational_fields(det)
    assert sources(seg)["crop"] == "P4" or sources(seg)["crop"].startswith("P4")
    assert "lr" not in operational_fields(seg) and "proposals" not in operational_fields(det)


def test_print_config_names_each_fields_source(capsys):
    import json
    assert run_main(["--task", "in1k_linear", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sources"]["iterations"].startswith("P5") and printed["sources"]["workers"] == "operational"
    assert printed["chosen"]["resize"].startswith("shorter side")
