"""Deploy bundles: export, the storage-backed runtime, the fused decode path, and every bad bundle."""

import json
import os
import struct

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_meki, resign, tiny_base
from romscale.errors import CheckpointError, RomscaleError
from romscale.meki.attach import attach_meki, meki_branches, meki_state
from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.io import WEIGHTS_FILE, save_meki
from romscale.rom.fused import FusedMekiMLP, fuse_meki_ffn
from romscale.rom.runtime import export_bundle, load_bundle
from romscale.rom.table import MANIFEST_FILE, TABLE_FILE, RomTable


def _folded(family="llama", **kw):
    model = tiny_base(family)
    attach_meki(model, MekiConfig(d_mem=8, **kw))
    randomize_meki(model)
    return fold(model)


@pytest.fixture
def folded():
    return _folded()


@pytest.fixture
def bundle_dir(tmp_path, folded):
    return export_bundle(folded, tmp_path / "bundle", dtype="fp16")


@pytest.mark.parametrize("dtype, tol", [("fp16", 2e-2), ("bf16", 1e-1), ("int8", 1e-1)])
def test_bundle_matches_the_folded_model(tmp_path, folded, ids, dtype, tol):
    b = load_bundle(export_bundle(folded, tmp_path / dtype, dtype=dtype))
    with torch.no_grad():
        ref, got = folded(ids).logits, b.model(ids).logits
    assert (got - ref).abs().max().item() <= tol
    # Rows dequantise to the folded table within the dtype's rounding.
    table = torch.stack([br.table for _, br in meki_branches(folded)], 1)
    rows = b.table.rows(torch.arange(96))
    rel = ((rows - table).norm() / table.norm()).item()
    assert rel < {"fp16": 1e-3, "bf16": 1e-2, "int8": 1e-2}[dtype]
    b.close()


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
def test_numpy_rows_are_the_stored_values_widened_to_fp32(tmp_path, folded, dtype):
    """rows_np (the native host's read) decodes each stored dtype exactly: the values the file
    holds, widened to float32 (int8 times its fp16 scale), in the ids' shape."""
    t = RomTable(export_bundle(folded, tmp_path / dtype, dtype=dtype))
    ids = np.array([[3, 95, 3], [0, 7, 50]])
    got = t.rows_np(ids)
    assert got.dtype == np.float32 and got.shape == (2, 3, 2, 8)
    from safetensors.torch import load_file

    stored = load_file(str(t.path))  # torch widens bf16 / fp16 / int8 to fp32 exactly
    want = stored["table"].float().numpy().reshape(96, 2, 8)
    if dtype == "int8":
        want = want * stored["scales"].float().numpy()[..., None]
    np.testing.assert_array_equal(got, want[ids])
    assert torch.equal(t.rows(torch.from_numpy(ids)), torch.from_numpy(got))
    assert t.rows_np(np.zeros((1, 0), np.int64)).shape == (1, 0, 2, 8)
    t.close()


def test_table_layout_is_token_major_and_sizes_are_exact(bundle_dir):
    t = RomTable(bundle_dir)
    assert t.table_bytes == 96 * 2 * 8 * 2  # vocab x layers x d_mem x fp16
    assert t.row_bytes == 2 * 8 * 2 + 4  # + the row's CRC-32
    m = t.manifest
    assert m["tensors"]["table"]["shape"] == [96, 16] and m["layers"] == [0, 1]
    t.close()
    int8 = RomTable(export_bundle(_folded(), bundle_dir.parent / "i8", dtype="int8"))
    assert int8.table_bytes * 2 == t.table_bytes  # half the size of fp16
    assert int8.row_bytes == 16 + 2 * 2 + 4  # int8 row + one fp16 scale per layer + CRC-32
    int8.close()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_drop_cache_makes_rows_this_reader_read_cold_again(tmp_path, folded):
    """drop_cache evicts the pages of rows the open reader has already mapped; dropping the file's
    cache alone leaves them resident (mapped pages cannot be evicted)."""
    import mmap as mmap_mod

    from romscale.rom.pagecache import drop_file_cache

    t = RomTable(export_bundle(folded, tmp_path / "b", dtype="fp16"))
    probe = tmp_path / "probe.bin"  # can this filesystem evict at all? (tmpfs cannot)
    probe.write_bytes(b"x" * mmap_mod.PAGESIZE)
    with probe.open("rb") as f:
        os.fsync(f.fileno())
    drop_file_cache(probe)
    t.rows_np(np.array([[5]]))
    assert t.resident_bytes() > 0
    drop_file_cache(t.path)
    if t.resident_bytes() == 0:
        t.close()
        pytest.skip("the file's pages were not mapped-resident here")
    assert t.resident_bytes() > 0  # the reader's mapped pages survived the plain drop
    t.drop_cache()
    resident = t.resident_bytes()
    t.close()
    fd = os.open(probe, os.O_RDONLY)
    try:
        m = mmap_mod.mmap(fd, 0, access=mmap_mod.ACCESS_READ)
        from romscale.rom.pagecache import resident_bytes

        evictable = resident_bytes(m) == 0
        m.close()
    finally:
        os.close(fd)
    if not evictable:
        pytest.skip("this filesystem keeps dropped pages (tmpfs?)")
    assert resident == 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_close_unmaps_the_table(bundle_dir):
    """close() releases the mapping at once (a closed table's pages could not be dropped from the
    page cache while it stayed mapped: the memory benchmark saw 65x the touched rows resident)."""
    def mapped() -> bool:
        return any(str(t.path) in line for line in Path("/proc/self/maps").read_text().splitlines())

    t = RomTable(bundle_dir)
    t.rows(torch.arange(5))
    assert mapped()
    t.close()
    assert not mapped()
    t.close()  # a second close is a no-op


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_generate_greedy_batch_and_cache(bundle_dir, prefetch, fused):
    ref = load_bundle(bundle_dir)
    b = load_bundle(bundle_dir, prefetch=prefetch)
    if fused:
        assert fuse_meki_ffn(b.model) == 2
        assert all(isinstance(layer.mlp, FusedMekiMLP) for layer in b.model.model.layers)
    batch = torch.tensor([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(b.model.generate(batch, **kw), ref.model.generate(batch, **kw))
    with torch.no_grad():
        assert (b.model(batch).logits - ref.model(batch).logits).abs().max() <= 1e-5
    b.close(), ref.close()


def test_sampling_runs_and_is_seeded(bundle_dir):
    b = load_bundle(bundle_dir, prefetch=True)
    prompt = torch.tensor([[5, 6, 7]])
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(b.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=0.9, max_new_tokens=6, pad_token_id=0))
    assert outs[0].shape == (1, 9) and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("fusion", ["add_sigmoid", "mul_silu"])
def test_fused_path_matches_hooks_for_fusions(tmp_path, ids, fusion):
    path = export_bundle(_folded("mistral", fusion=fusion), tmp_path / "b")
    ref, b = load_bundle(path), load_bundle(path)
    assert fuse_meki_ffn(b.model) == 2
    with torch.no_grad():
        assert (b.model(ids).logits - ref.model(ids).logits).abs().max() <= 1e-5


def test_fusing_leaves_other_positions_alone(tmp_path):
    b = load_bundle(export_bundle(_folded(position="after_ffn"), tmp_path / "b"))
    assert fuse_meki_ffn(b.model) == 0


def test_rows_are_read_on_demand(bundle_dir):
    b = load_bundle(bundle_dir)
    calls = []
    source = meki_state(b.model).row_source
    meki_state(b.model).row_source = lambda ids: calls.append(ids.clone()) or source(ids)
    prompt = torch.tensor([[4, 5, 6]])
    b.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0)
    # One fetch per forward: the whole prompt once, then exactly one new token per decode step.
    assert [c.shape[1] for c in calls] == [3, 1, 1]
    b.close()


def test_export_needs_a_folded_model(tmp_path):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8))
    with pytest.raises(RomscaleError, match="fold"):
        export_bundle(model, tmp_path / "b")
    with pytest.raises(RomscaleError, match="dtype"):
        export_bundle(fold(model), tmp_path / "b", dtype="fp8")
    assert not (tmp_path / "b").exists()


# ---- bad bundles -------------------------------------------------------------------------------


def _edit_manifest(bundle_dir, fn):
    path = bundle_dir / MANIFEST_FILE
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))
    resign(bundle_dir)


def test_verify_finds_a_flipped_byte(bundle_dir):
    f = bundle_dir / TABLE_FILE
    m = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    data = bytearray(f.read_bytes())
    data[m["header_bytes"] + m["tensors"]["table"]["data_offsets"][1] - 3] ^= 0x40
    f.write_bytes(bytes(data))
    b = load_bundle(bundle_dir)  # loading checks structure; rows are checked as they are read
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor 'table'"):
        b.table.verify()


def test_truncated_table(bundle_dir):
    f = bundle_dir / TABLE_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_bundle(bundle_dir)


def test_corrupt_table_header(bundle_dir):
    f = bundle_dir / TABLE_FILE
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"{" + b"x" * (n - 1)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["meki"].update(fusion="mul_silu"), "does not match the RAM part"),
        (lambda m: m.update(vocab_size=97), r"must be F16 \[97, 16\]"),
        (lambda m: m.update(layers=[1, 0]), "does not match the RAM part"),
        (lambda m: m.update(version=99), "unknown format version"),
        (lambda m: m.update(format="other"), "not a romscale ROM manifest"),
        (lambda m: m.pop("tensors"), "'tensors' must hold exactly"),
        (lambda m: m.update(dtype="int8"), "'tensors' must hold exactly"),
    ],
)
def test_wrong_manifest(bundle_dir, edit, match):
    _edit_manifest(bundle_dir, edit)
    with pytest.raises(CheckpointError, match=match):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", [TABLE_FILE, MANIFEST_FILE, WEIGHTS_FILE, "config.json"])
def test_missing_file(bundle_dir, name):
    (bundle_dir / name).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_bundle(bundle_dir)


def test_inline_checkpoint_is_not_a_bundle(tmp_path, folded):
    save_meki(folded, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="'meki-checkpoint', expected a meki-bundle"):
        load_bundle(tmp_path / "ck")


def test_token_out_of_range(bundle_dir):
    t = RomTable(bundle_dir)
    with pytest.raises(CheckpointError, match="out of range"):
        t.rows(torch.tensor([96]))
    t.close()


def test_ram_part_alone_needs_its_table(bundle_dir, ids):
    from romscale.meki.io import load_meki

    model = load_meki(bundle_dir)  # the RAM part loads, in the external form
    with pytest.raises(RomscaleError, match="no ROM table is connected"):
        model(ids)


def test_fused_single_token_path_matches_hooks(bundle_dir):
    ref, b = load_bundle(bundle_dir), load_bundle(bundle_dir)
    fuse_meki_ffn(b.model)
    prompt = torch.tensor([[3, 9, 27, 81 % 96]])
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    got, want = b.model.generate(prompt, **kw), ref.model.generate(prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for s_got, s_want in zip(got.scores, want.scores):  # decode steps run the batch-1 scalar path
        assert (s_got - s_want).abs().max() <= 1e-5


# ---- rows are verified as they are read (the trust review's cases) -------------------------------


def _flip(bundle_dir, tensor, row, byte=0):
    m = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    t = m["tensors"][tensor]
    f = bundle_dir / TABLE_FILE
    data = bytearray(f.read_bytes())
    data[m["header_bytes"] + t["data_offsets"][0] + row * t["row_bytes"] + byte] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("dtype, tensor", [("fp16", "table"), ("int8", "table"), ("int8", "scales")])
def test_a_flipped_byte_stops_generation_naming_the_row(tmp_path, folded, prefetch, dtype, tensor):
    path = export_bundle(folded, tmp_path / "b", dtype=dtype)
    _flip(path, tensor, row=42, byte=1)
    b = load_bundle(path, prefetch=prefetch)
    prompt = torch.tensor([[5, 42]])
    with pytest.raises(CheckpointError, match=r"row 42 .*rom_tables.safetensors|rom_tables.safetensors: row 42"):
        b.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        b.model(torch.tensor([[5, 6]]))  # untouched rows still read fine
    b.close()


def test_nan_scales_are_caught_on_read(tmp_path, folded, monkeypatch):
    import romscale.rom.table as table_mod

    real = table_mod.pack_tables

    def nan_scales(*a, **k):  # a writer that skipped the range checks
        out = real(*a, **k)
        out["scales"][7, 1] = float("nan")
        return out

    monkeypatch.setattr(table_mod, "pack_tables", nan_scales)
    path = export_bundle(folded, tmp_path / "b", dtype="int8")
    b = load_bundle(path)
    with pytest.raises(CheckpointError, match="row 7 .*NaN"):
        with torch.no_grad():
            b.model(torch.tensor([[3, 7]]))
    b.close()


def test_out_of_range_ids_are_a_clear_error_with_prefetch(bundle_dir):
    b = load_bundle(bundle_dir, prefetch=True)
    with pytest.raises(RomscaleError, match="token id 500 is out of range"):
        with torch.no_grad():
            b.model(torch.tensor([[3, 500]]))
    b.close()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["tensors"]["table"].update(block_sha256=[]), "needs 1 block checksums"),
        (lambda m: m["tensors"]["table"]["block_sha256"].append("0" * 64), "needs 1 block checksums"),
        (lambda m: m.update(block_rows=0), "'block_rows' must be a positive integer"),
        (lambda m: m.update(file="/etc/passwd"), "leaves the folder"),
        (lambda m: m.update(file="../x"), "leaves the folder"),
        (lambda m: m.update(d_mem=10**8), "must be F16"),
    ],
)
def test_tampered_rom_manifest(bundle_dir, edit, match):
    _edit_manifest(bundle_dir, edit)
    with pytest.raises(CheckpointError, match=match):
        load_bundle(bundle_dir)


def test_verify_bundle_checks_everything(bundle_dir):
    from romscale.rom.runtime import verify_bundle

    s = verify_bundle(bundle_dir)
    assert s["blocks"] == 2 and s["rows"] == 96  # table + CRC tensors, one block each
    _flip(bundle_dir, "row_crc32", row=3)
    with pytest.raises(CheckpointError, match="row_crc32"):
        verify_bundle(bundle_dir)


def test_bundle_lists_every_file(bundle_dir):
    from romscale.utils.outputs import MANIFEST

    m = json.loads((bundle_dir / MANIFEST).read_text())
    assert m["kind"] == "meki-bundle"
    assert set(m["files"]) == {"config.json", WEIGHTS_FILE, MANIFEST_FILE, TABLE_FILE}
    (bundle_dir / "README.txt").write_text("extra")
    with pytest.raises(CheckpointError, match="not listed"):
        load_bundle(bundle_dir)
