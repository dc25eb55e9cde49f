"""`romscale bundle export | verify | generate` end to end on a tiny model with a real tokenizer, and
every bad input or destructive target the trust review found: one `error:` line, exit code 2, no
data lost."""

import json

import pytest
import torch

from conftest import assert_usage_error, resign
from romscale.meki.config import MekiConfig
from romscale.meki.io import save_meki
from romscale.meki.presets import build_model
from romscale.rom.table import MANIFEST_FILE, TABLE_FILE
from romscale.train.data import train_tokenizer


def _digest(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 30], vocab_size=300)


@pytest.fixture
def ckpt(tmp_path, tok):
    model = build_model("tiny", MekiConfig(d_mem=8, zero_init_output=False), vocab_size=len(tok), seed=0)
    return save_meki(model, tmp_path / "P" / "train", tokenizer=tok)


@pytest.fixture
def bundle(cli, ckpt, tmp_path):
    r = cli("bundle", "export", ckpt, "--out", tmp_path / "b")
    assert r.exit_code == 0, r
    return tmp_path / "b"


def _row_offset(bundle, row):
    m = json.loads((bundle / MANIFEST_FILE).read_text())
    t = m["tensors"]["table"]
    return m["header_bytes"] + t["data_offsets"][0] + row * t["row_bytes"]


def test_export_verify_generate(cli, ckpt, tmp_path):
    r = cli("bundle", "export", ckpt, "--out", tmp_path / "b", "--dtype", "int8")
    assert r.exit_code == 0, r
    r = cli("bundle", "verify", tmp_path / "b", "--json", tmp_path / "v.json")
    assert r.exit_code == 0 and "OK" in r.stdout, r
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["blocks"] == 3 and v["rows"] == v["vocab_size"]  # table, scales and CRC tensors: one block each
    r = cli("bundle", "generate", tmp_path / "b", "--prompt", "the quick", "--max-new-tokens", "5")
    assert r.exit_code == 0, r
    # The streamer prints the prompt, then 5 new tokens: the output must be longer than the echo.
    assert r.stdout.startswith("the quick") and len(r.stdout.strip()) > len("the quick"), r


def test_generate_samples_reproducibly(cli, bundle):
    args = ("bundle", "generate", bundle, "--prompt", "the", "--max-new-tokens", "6", "--sample", "--seed", "3")
    a, b = cli(*args), cli(*args)
    assert a.exit_code == 0 and a.stdout == b.stdout, (a, b)


@pytest.mark.parametrize("prefetch", ["--prefetch", "--no-prefetch"])
def test_generate_finds_a_corrupted_row(cli, bundle, tok, prefetch):
    row = tok("the")["input_ids"][0]
    f = bundle / TABLE_FILE
    data = bytearray(f.read_bytes())
    data[_row_offset(bundle, row) + 1] ^= 0x01  # one flipped bit in the row the prompt reads
    f.write_bytes(bytes(data))
    r = cli("bundle", "generate", bundle, "--prompt", "the", "--max-new-tokens", "3", prefetch)
    assert r.exit_code == 2 and f"row {row}" in r.stderr and TABLE_FILE in r.stderr, r
    assert "Traceback" not in r.output
    r = cli("bundle", "verify", bundle)
    assert_usage_error(r, "checksum mismatch", "tensor 'table'")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--prompt", ""], ["--prompt"]),
        (["--prompt", "the", "--max-new-tokens", "-5"], ["--max-new-tokens"]),
        (["--prompt", "the", "--max-new-tokens", "abc"], ["--max-new-tokens"]),
        (["--prompt", "the", "--sample", "--temperature", "0"], ["--temperature"]),
        (["--prompt", "the", "--sample", "--top-p", "5"], ["--top-p"]),
        (["--prompt", "the", "--sample", "--top-p", "0"], ["--top-p"]),
        (["--prompt", "the", "--bogus"], ["--bogus"]),
    ],
)
def test_generate_bad_options(cli, bundle, args, needles):
    assert_usage_error(cli("bundle", "generate", bundle, *args), *needles)


def test_bad_options_fail_before_loading(cli, ckpt, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("romscale.meki.io.load_meki", no_load)
    assert_usage_error(cli("bundle", "export", ckpt, "--out", tmp_path / "x", "--dtype", "bogus"), "--dtype", "bogus")
    assert_usage_error(cli("bundle", "export", ckpt, "--out", tmp_path / "x", "--block-rows", "0"), "--block-rows")
    assert_usage_error(cli("bundle", "export", tmp_path / "nope", "--out", tmp_path / "x"), "does not exist")


@pytest.mark.parametrize("target", ["parent", "same", "inside", "user", "file", "dot"])
def test_export_never_destroys(cli, ckpt, tmp_path, monkeypatch, target):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    (tmp_path / "FILE").write_text("a file")
    monkeypatch.chdir(tmp_path)
    out = {"parent": ckpt.parent, "same": ckpt, "inside": ckpt / "b", "user": user, "file": tmp_path / "FILE", "dot": "."}[target]
    before = _digest(tmp_path)
    for extra in ([], ["--overwrite"]):
        r = cli("bundle", "export", ckpt, "--out", out, *extra)
        assert_usage_error(r, "--out")
    assert _digest(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "P", "mine"]


def test_fold_never_deletes_its_input(cli, ckpt):
    before = _digest(ckpt.parent)
    assert_usage_error(cli("meki", "fold", ckpt, "--out", ckpt.parent), "contains the input")
    assert _digest(ckpt.parent) == before


def test_json_never_overwrites_a_users_file_or_an_input(cli, bundle, tmp_path):
    cfg = bundle / "config.json"
    before = cfg.read_bytes()
    assert_usage_error(cli("bundle", "verify", bundle, "--json", cfg, "--overwrite"), "--json")
    other = tmp_path / "theirs.json"
    other.write_text("{}")
    assert_usage_error(cli("bundle", "verify", bundle, "--json", other, "--overwrite"), "not written by romscale")
    assert cfg.read_bytes() == before and other.read_text() == "{}"


def test_export_refuses_unrepresentable_values_unless_clamped(cli, tmp_path, tok):
    model = build_model("tiny", MekiConfig(d_mem=8, zero_init_output=False), vocab_size=len(tok), seed=0)
    from romscale.meki.fold import fold

    fold(model)
    with torch.no_grad():
        model.model.layers[1].meki.table[17, 2] = 1e5
    save_meki(model, tmp_path / "big", tokenizer=tok)
    r = cli("bundle", "export", tmp_path / "big", "--out", tmp_path / "b16")
    assert_usage_error(r, "layer 1", "row (token id) 17", "fp16")
    assert not (tmp_path / "b16").exists()
    assert cli("bundle", "export", tmp_path / "big", "--out", tmp_path / "b16", "--clamp").exit_code == 0
    assert cli("bundle", "export", tmp_path / "big", "--out", tmp_path / "bb", "--dtype", "bf16").exit_code == 0  # bf16 holds 1e5
    with torch.no_grad():
        model.model.layers[0].meki.table[5, 0] = float("nan")
    save_meki(model, tmp_path / "nan", tokenizer=tok)
    for extra in ([], ["--clamp"]):
        assert_usage_error(cli("bundle", "export", tmp_path / "nan", "--out", tmp_path / "i8", "--dtype", "int8", *extra), "NaN", "layer 0")


def test_tampered_bundles_are_refused(cli, bundle):
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (bundle / "config.json").write_text(json.dumps(cfg))
    assert_usage_error(cli("bundle", "generate", bundle, "--prompt", "the"), "config.json", "romscale_manifest.json")
    # Consistent but truncated: the table shortened and every size patched to match.
    cfg["hidden_act"] = "silu"
    (bundle / "config.json").write_text(json.dumps(cfg))
    f = bundle / TABLE_FILE
    f.write_bytes(f.read_bytes()[:-64])
    m = json.loads((bundle / MANIFEST_FILE).read_text())
    m["file_bytes"] = f.stat().st_size
    (bundle / MANIFEST_FILE).write_text(json.dumps(m))
    resign(bundle)
    assert_usage_error(cli("bundle", "verify", bundle), "data_offsets")


def test_commands_moved_under_their_area(cli, bundle):
    assert cli("export", bundle).exit_code == 2  # `export` is `romscale bundle export` now
    assert cli("bundle", "--help").exit_code == 0
    r = cli("bundle", "verify")
    assert_usage_error(r, "Missing argument")


def test_a_bundle_is_not_a_checkpoint_to_fold_or_attach(cli, bundle, tmp_path):
    assert_usage_error(cli("meki", "fold", bundle, "--out", tmp_path / "f"), "meki-bundle")
    assert_usage_error(cli("bundle", "export", bundle, "--out", tmp_path / "e"), "folded MeKi model with its tables in memory")
    assert_usage_error(cli("meki", "attach", "--model", bundle, "--out", tmp_path / "a"), "already has MeKi")
    assert not any((tmp_path / n).exists() for n in ("f", "e", "a"))
