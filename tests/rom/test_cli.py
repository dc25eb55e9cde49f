"""`romscale export | verify | generate` end to end on a tiny model with a real tokenizer."""

from typer.testing import CliRunner

from romscale.cli import app
from romscale.meki.config import MekiConfig
from romscale.meki.io import save_meki
from romscale.meki.presets import build_model
from romscale.rom.table import TABLE_FILE
from romscale.train.data import train_tokenizer

runner = CliRunner()


def test_export_verify_generate(tmp_path):
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 30], vocab_size=300)
    model = build_model("tiny", MekiConfig(d_mem=8, zero_init_output=False), vocab_size=len(tok), seed=0)
    save_meki(model, tmp_path / "train", tokenizer=tok)
    r = runner.invoke(app, ["export", str(tmp_path / "train"), "--bundle", str(tmp_path / "b"), "--dtype", "int8"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify", "--bundle", str(tmp_path / "b")])
    assert r.exit_code == 0 and "OK" in r.output, r.output
    r = runner.invoke(app, ["generate", "--bundle", str(tmp_path / "b"), "--prompt", "the quick", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    assert "the quick" in r.output
    # A corrupted byte: verify fails with the block named, exit code 2.
    f = tmp_path / "b" / TABLE_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", "--bundle", str(tmp_path / "b")])
    assert r.exit_code == 2 and "checksum mismatch" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "nope"), "--bundle", str(tmp_path / "c")])
    assert r.exit_code == 2 and "not a folder" in r.output
