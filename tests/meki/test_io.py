"""Save/load of both forms, and clear errors for every broken folder."""

import hashlib
import json

import pytest
import torch

from conftest import randomize_meki, resign, tiny_base
from romscale.errors import CheckpointError, RomscaleError
from romscale.meki.attach import attach_meki, meki_state
from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.io import MANIFEST_FILE, WEIGHTS_FILE, load_meki, save_meki


def _model(family="llama", tie=True):
    model = tiny_base(family, tie=tie)
    attach_meki(model, MekiConfig(d_mem=8, position="after_attn", fusion="mul_silu"))
    randomize_meki(model)
    return model


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_identical_logits(tmp_path, ids, family, folded, tie):
    model = _model(family, tie=tie)
    if folded:
        fold(model)
    save_meki(model, tmp_path / "ck")
    loaded = load_meki(tmp_path / "ck")
    assert meki_state(loaded).folded is folded
    assert meki_state(loaded).cfg == meki_state(model).cfg
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # safetensors + JSON only: nothing pickled.
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(["config.json", MANIFEST_FILE, WEIGHTS_FILE])


def test_save_replaces_atomically_and_keeps_no_temp(tmp_path):
    save_meki(_model(), tmp_path / "ck")
    with pytest.raises(RomscaleError, match="--overwrite"):
        save_meki(_model("qwen3"), tmp_path / "ck")
    save_meki(_model("qwen3"), tmp_path / "ck", overwrite=True)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "qwen3"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.fixture
def saved(tmp_path):
    save_meki(_model(), tmp_path / "ck")
    return tmp_path / "ck"


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}


def test_truncated_weights(saved):
    f = saved / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_meki(saved)


def test_flipped_byte_is_caught_by_checksum(saved):
    f = saved / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_meki(saved)


def test_corrupt_header_without_manifest_check(saved):
    # Even with a manifest that agrees, a file that is not safetensors gives a clear error.
    f = saved / WEIGHTS_FILE
    f.write_bytes(b"not a safetensors file at all" * 10)
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_meki(saved)


def test_d_mem_mismatch_names_the_tensor(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["meki"]["d_mem"] = 16
    (saved / "config.json").write_text(json.dumps(cfg))
    resign(saved)
    with pytest.raises(CheckpointError, match=r"meki.*shape"):
        load_meki(saved)


def test_vocab_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["vocab_size"] = 200
    (saved / "config.json").write_text(json.dumps(cfg))
    resign(saved)
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_meki(saved)


def test_folded_flag_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["meki"]["folded"] = True
    (saved / "config.json").write_text(json.dumps(cfg))
    resign(saved)
    with pytest.raises(CheckpointError, match="folded"):
        load_meki(saved)


@pytest.mark.parametrize("name", ["config.json", WEIGHTS_FILE, MANIFEST_FILE])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_meki(saved)


def test_not_a_meki_checkpoint_and_bad_json(saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["meki"]
    (saved / "config.json").write_text(json.dumps(cfg))
    resign(saved)
    with pytest.raises(CheckpointError, match="no 'meki' section"):
        load_meki(saved)
    (saved / "config.json").write_text("{not json")
    resign(saved)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_meki(saved)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_meki(tmp_path / "nowhere")


def test_unknown_manifest_version(saved):
    m = json.loads((saved / MANIFEST_FILE).read_text())
    m["version"] = 99
    (saved / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="version"):
        load_meki(saved)


def test_loading_never_modifies_the_folder(saved):
    before = _digest(saved)
    load_meki(saved)
    assert _digest(saved) == before


def test_failed_save_leaves_previous_folder(tmp_path, monkeypatch):
    save_meki(_model(), tmp_path / "ck")
    before = _digest(tmp_path / "ck")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("romscale.meki.io.save_file", boom)
    with pytest.raises(OSError):
        save_meki(_model("qwen2"), tmp_path / "ck", overwrite=True)
    assert _digest(tmp_path / "ck") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


# ---- the trust review's cases ------------------------------------------------------------------


def test_manifest_with_no_files_is_refused(saved):
    m = json.loads((saved / MANIFEST_FILE).read_text())
    m["files"] = {}
    (saved / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="'files' must list every file"):
        load_meki(saved)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(hidden_act="gelu"),
        lambda c: c["meki"].update(fusion="add_silu"),
        lambda c: c.update(rope_theta=1.0),
    ],
)
def test_any_config_edit_is_caught(saved, edit):
    cfg = json.loads((saved / "config.json").read_text())
    edit(cfg)
    (saved / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    with pytest.raises(CheckpointError, match="config.json"):
        load_meki(saved)


def test_tokenizer_files_are_covered(tmp_path):
    from romscale.train.data import train_tokenizer

    tok = train_tokenizer(["a b c d e f g " * 20], vocab_size=120)
    save_meki(_model(), tmp_path / "ck", tokenizer=tok)
    m = json.loads((tmp_path / "ck" / MANIFEST_FILE).read_text())
    assert "tokenizer.json" in m["files"] and "config.json" in m["files"]
    f = tmp_path / "ck" / "tokenizer.json"
    f.write_text(f.read_text().replace('"a"', '"z"', 1))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_meki(tmp_path / "ck")


def test_huge_sizes_in_config_are_refused_before_allocating(saved):
    import resource

    cfg = json.loads((saved / "config.json").read_text())
    cfg["meki"]["d_mem"] = 10**8  # 96 x 1e8 x 2 layers in fp32 would be 77 GB
    (saved / "config.json").write_text(json.dumps(cfg))
    resign(saved)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="shape"):
        load_meki(saved)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024  # KiB: nothing large allocated


def test_loading_builds_no_random_weights(saved, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.init, "normal_", lambda t, *a, **k: calls.append(t.device.type) or t)
    load_meki(saved)
    assert all(d == "meta" for d in calls)  # initialisers only ever touch meta tensors


def test_weights_symlinked_out_of_the_folder_are_refused(saved, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (saved / WEIGHTS_FILE).rename(outside)
    (saved / WEIGHTS_FILE).symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_meki(saved)


@pytest.mark.parametrize("name", ["/etc/passwd", "../ck/config.json"])
def test_manifest_names_are_confined(saved, name):
    m = json.loads((saved / MANIFEST_FILE).read_text())
    m["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (saved / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="leaves the folder") as exc:
        load_meki(saved)
    assert "bytes" not in str(exc.value).split("leaves")[1]  # nothing about the outside file is reported
