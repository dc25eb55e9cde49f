"""Presets on the meta device, `romscale meki info` and `romscale meki fold`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import randomize_meki, tiny_base
from romscale.cli import app
from romscale.meki.attach import attach_meki
from romscale.meki.config import MekiConfig
from romscale.meki.io import load_meki, save_meki
from romscale.meki.params import parameter_report
from romscale.meki.presets import build_model

runner = CliRunner()


@pytest.mark.parametrize(
    "preset, rom_b, ram_b", [("meki-0.6b", 0.54, 0.60), ("meki-1.7b", 1.09, 1.75), ("meki-4b", 2.80, 4.12)]
)
def test_info_reproduces_the_papers_counts(preset, rom_b, ram_b):
    result = runner.invoke(app, ["meki", "info", "--preset", preset, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert round(report["rom_params"] / 1e9, 2) == rom_b
    assert round(report["ram_params"] / 1e9, 2) == ram_b


def test_meta_device_allocates_nothing():
    model = build_model("meki-4b", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    r = parameter_report(model)
    assert r["rom_params"] == 36 * 151680 * 512


def test_info_unknown_preset_is_a_clear_error():
    result = runner.invoke(app, ["meki", "info", "--preset", "huge"])
    assert result.exit_code == 2
    assert "unknown preset 'huge'" in result.output


def test_fold_command(tmp_path, ids):
    model = tiny_base("qwen3")
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    save_meki(model, tmp_path / "train")
    result = runner.invoke(app, ["meki", "fold", str(tmp_path / "train"), str(tmp_path / "deploy")])
    assert result.exit_code == 0, result.output
    folded = load_meki(tmp_path / "deploy")
    assert folded.config.meki["folded"] is True
    with torch.no_grad():
        assert (folded(ids).logits - model(ids).logits).abs().max() <= 1e-5
    same = runner.invoke(app, ["meki", "fold", str(tmp_path / "train"), str(tmp_path / "train")])
    assert same.exit_code == 2 and "must differ" in same.output
    missing = runner.invoke(app, ["meki", "fold", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert missing.exit_code == 2 and "not a folder" in missing.output


def test_attach_command_retrofits_a_saved_hf_model(tmp_path, ids):
    base = tiny_base("mistral")
    base.save_pretrained(tmp_path / "hf")
    result = runner.invoke(app, ["meki", "attach", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "mk"), "--d-mem", "8"])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        assert (load_meki(tmp_path / "mk")(ids).logits - base(ids).logits).abs().max() <= 1e-6
