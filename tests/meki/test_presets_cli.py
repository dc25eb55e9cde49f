"""Presets on the meta device, `romscale meki info` and `romscale meki fold`."""

import json

import pytest
import torch
from conftest import assert_usage_error, randomize_meki, tiny_base
from romscale.meki.attach import attach_meki
from romscale.meki.config import MekiConfig
from romscale.meki.io import load_meki, save_meki
from romscale.meki.params import parameter_report
from romscale.meki.presets import build_model


@pytest.mark.parametrize(
    "preset, rom_b, ram_b", [("meki-0.6b", 0.54, 0.60), ("meki-1.7b", 1.09, 1.75), ("meki-4b", 2.80, 4.12)]
)
def test_info_reproduces_the_papers_counts(cli, tmp_path, preset, rom_b, ram_b):
    result = cli("meki", "info", "--preset", preset, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result
    report = json.loads((tmp_path / "r.json").read_text())
    assert round(report["rom_params"] / 1e9, 2) == rom_b
    assert round(report["ram_params"] / 1e9, 2) == ram_b


def test_meta_device_allocates_nothing():
    model = build_model("meki-4b", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    r = parameter_report(model)
    assert r["rom_params"] == 36 * 151680 * 512


def test_info_unknown_preset_is_a_clear_error(cli):
    assert_usage_error(cli("meki", "info", "--preset", "huge"), "--preset", "'huge'")


def test_fold_command(cli, tmp_path, ids):
    model = tiny_base("qwen3")
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    save_meki(model, tmp_path / "train")
    result = cli("meki", "fold", tmp_path / "train", "--out", tmp_path / "deploy")
    assert result.exit_code == 0, result
    folded = load_meki(tmp_path / "deploy")
    assert folded.config.meki["folded"] is True
    with torch.no_grad():
        assert (folded(ids).logits - model(ids).logits).abs().max() <= 1e-5
    assert_usage_error(cli("meki", "fold", tmp_path / "train", "--out", tmp_path / "train"), "is the input")
    assert_usage_error(cli("meki", "fold", tmp_path / "nope", "--out", tmp_path / "out"), "not a folder")


def test_attach_command_retrofits_a_saved_hf_model(cli, tmp_path, ids):
    base = tiny_base("mistral")
    base.save_pretrained(tmp_path / "hf")
    result = cli("meki", "attach", "--model", tmp_path / "hf", "--out", tmp_path / "mk", "--d-mem", "8")
    assert result.exit_code == 0, result
    with torch.no_grad():
        assert (load_meki(tmp_path / "mk")(ids).logits - base(ids).logits).abs().max() <= 1e-6


@pytest.mark.parametrize("preset", ["tiny", "demo", "smollm2-135m", "meki-0.6b", "meki-1.7b", "meki-4b"])
@pytest.mark.parametrize("cfg", [MekiConfig(d_mem=24), MekiConfig(d_mem=8, memory="static", position="after_ffn", layers=(0, 1))])
def test_info_counts_equal_the_built_model(preset, cfg):
    """`meki info` counts without building; it must agree exactly with the model transformers builds."""
    from romscale.meki.params import preset_report
    from romscale.meki.presets import get_preset

    built = parameter_report(build_model(preset, cfg, device="meta"))
    assert preset_report(get_preset(preset), cfg) == built


def test_attach_refuses_pickle_weights(cli, tmp_path):
    base = tiny_base("llama")
    base.config.save_pretrained(tmp_path / "pkl")
    torch.save(base.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")  # a pickle: never loaded
    r = cli("meki", "attach", "--model", tmp_path / "pkl", "--out", tmp_path / "mk")
    assert_usage_error(r, "--model", "pickle")
    assert not (tmp_path / "mk").exists()


def test_attach_takes_a_gguf_file_or_folder(cli, tmp_path, ids):
    from conftest import write_tiny_gguf

    pytest.importorskip("gguf")
    base = tiny_base("llama")
    (tmp_path / "g").mkdir()
    write_tiny_gguf(base, tmp_path / "g" / "tiny.gguf")
    for src, out in ((tmp_path / "g" / "tiny.gguf", "mk1"), (tmp_path / "g", "mk2")):
        r = cli("meki", "attach", "--model", src, "--out", tmp_path / out, "--d-mem", "8")
        assert r.exit_code == 0, r
        loaded = load_meki(tmp_path / out)
        assert "quantization_config" not in json.loads((tmp_path / out / "config.json").read_text())
        with torch.no_grad():
            assert (loaded(ids).logits - base(ids).logits).abs().max() <= 1e-5
    assert_usage_error(cli("meki", "attach", "--model", tmp_path / "g", "--out", tmp_path / "g" / "x"), "input")
