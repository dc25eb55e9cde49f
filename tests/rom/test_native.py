"""The native runtime: ONNX exports of dense models and MeKi bundles (every fusion, the other
positions), run by ONNX Runtime with the rows read from the bundle's table; prefill, decode, batch 2
with left padding; the fused MeKi layout (its size against the dense and the hook-form programs, the
caller's model left as it was); int8 / fp16 weights; bad exports and bad inputs."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, memory_model, randomize_meki, tiny_base
from romscale.errors import RomscaleError
from romscale.meki.attach import attach_meki
from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.meki.io import save_meki
from romscale.meki.presets import build_model
from romscale.rom.onnx_export import DECODE_FILE, NATIVE_FILE, PROGRAM_FILE, WEIGHTS_FILE, export_native, read_native
from romscale.rom.ort_runtime import OrtDecoder
from romscale.rom.runtime import export_bundle, load_bundle

pytest.importorskip("onnxruntime")


def _prompt():
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded
    return ids, mask


def _reference(model, ids, mask, n):
    """Greedy tokens of the PyTorch model, never stopping early (EOS off)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        logits = model(ids, attention_mask=mask).logits[:, -1]
    return out[:, ids.shape[1]:].numpy(), logits.numpy()


def _check_same(dec: OrtDecoder, model, n=8):
    ids, mask = _prompt()
    ref_tokens, ref_logits = _reference(model, ids, mask, n)
    logits, _ = dec._run(ids.numpy(), mask.numpy(), dec._empty_cache(2))
    assert np.abs(logits - ref_logits).max() < 1e-4
    got = dec.generate(ids.numpy(), mask.numpy(), max_new_tokens=n)
    np.testing.assert_array_equal(got.tokens, ref_tokens)
    assert got.steps == n and got.ttft_s > 0 and got.decode_s > 0
    # Batch 1 without padding equals row 0 of the batch.
    one = dec.generate(ids[:1].numpy(), max_new_tokens=n)
    np.testing.assert_array_equal(one.tokens[0], ref_tokens[0])
    return got


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dense_export_matches_pytorch(tmp_path, family):
    model = tiny_base(family).eval()
    dec = OrtDecoder(export_native(model, tmp_path / "n"))
    got = _check_same(dec, model)
    assert got.row_bytes_read == 0 and dec.table is None
    dec.close()


def _bundle(tmp_path, name="b", seed=1, **kw):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8, **kw))
    randomize_meki(model, seed=seed)
    return export_bundle(fold(model), tmp_path / name, dtype="fp16")


@pytest.mark.parametrize("kw", [{"fusion": f} for f in ("add_sigmoid", "mul_sigmoid", "add_silu", "mul_silu")]
                         + [{"position": p} for p in ("parallel_attn", "after_attn", "after_ffn")]
                         + [{"layers": (1,), "fusion": "mul_silu"}])  # layer 1 reads slot 0 of the rows
def test_meki_export_reads_rows_and_matches_the_bundle(tmp_path, kw):
    path = _bundle(tmp_path, **kw)
    b = load_bundle(path)
    dec = OrtDecoder(export_native(b.model, tmp_path / "n", bundle=path))
    meta = json.loads((tmp_path / "n" / NATIVE_FILE).read_text())
    layers = len(kw.get("layers", (0, 1)))
    assert meta["rows"] == {"layers": layers, "d_mem": 8, "width": 8 * layers}
    # MeKi on the FFN is exported in the fused layout; the other placements in their hook form.
    assert meta["fused_layers"] == (layers if kw.get("position", "parallel_ffn") == "parallel_ffn" else 0)
    got = _check_same(dec, b.model)
    # The rows came from the table on storage: one row per token of each call (prefill + decode steps).
    assert got.row_bytes_read == (2 * 6 + 2 * 7) * dec.table.row_bytes
    dec.close()
    b.close()


def test_the_table_is_an_input_not_part_of_the_program(tmp_path):
    path = _bundle(tmp_path)
    b = load_bundle(path)
    n = export_native(b.model, tmp_path / "n", bundle=path)
    table_bytes = b.table.table_bytes
    import onnx

    proto = onnx.load(str(n / PROGRAM_FILE))
    names = [i.name for i in proto.graph.input]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_k", "past_v", "rows"]
    # No initialiser has the table's shape (vocab x d_mem per layer).
    assert not any(tuple(t.dims)[-2:] == (96, 8) or tuple(t.dims) == (96, 16) for t in proto.graph.initializer)
    assert table_bytes > 0
    b.close()


def _weight_matmuls(program) -> dict[str, int]:
    """Op type -> count of the program's MatMul-like nodes whose weight is an initialiser."""
    import onnx

    graph = onnx.load(str(program)).graph
    weights = {t.name for t in graph.initializer}
    ops = [n.op_type for n in graph.node if n.op_type.startswith("MatMul") and n.input[1] in weights]
    return {op: ops.count(op) for op in set(ops)}


def test_batch_one_decode_runs_the_static_program_on_shared_weights(tmp_path):
    import onnx

    model = tiny_base("llama").eval()
    folder = export_native(model, tmp_path / "n")
    meta = json.loads((folder / NATIVE_FILE).read_text())
    assert meta["decode_program"] == DECODE_FILE and meta["shared_weights"]["inline_in_decode"] == 0
    assert meta["shared_weights"]["shared_by_decode"] >= 4 * model.config.num_hidden_layers
    decode = onnx.load(str(folder / DECODE_FILE), load_external_data=False).graph
    # both programs keep their weights in one file: nothing of 1 KiB or more stays in either graph
    for prog in (decode, onnx.load(str(folder / PROGRAM_FILE), load_external_data=False).graph):
        assert all(len(t.raw_data) < 1024 for t in prog.initializer)
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in decode.input}
    assert dims["input_ids"] == [1, 1] and dims["past_k"][3] == "past"
    dec = OrtDecoder(folder)
    used = []
    real = dec.decode_session.io_binding
    dec.decode_session = type("Spy", (), {"io_binding": lambda self: used.append(1) or real(),
                                          "run_with_iobinding": lambda self, io: real.__self__.run_with_iobinding(io)})()
    ids, _ = _prompt()
    ref, _ = _reference(model, ids[:1], torch.ones_like(ids[:1]), 6)
    np.testing.assert_array_equal(dec.generate(ids[:1].numpy(), max_new_tokens=6).tokens, ref)
    assert len(used) == 5  # every step after the prefill
    dec.generate(ids.numpy(), max_new_tokens=3)  # batch 2: the general program only
    assert len(used) == 5


def test_a_program_pointing_outside_its_weights_is_refused(tmp_path):
    import onnx

    folder = export_native(tiny_base("llama").eval(), tmp_path / "n")
    proto = onnx.load(str(folder / DECODE_FILE), load_external_data=False)
    t = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location":
            e.value = "../../etc/passwd"
    onnx.save_model(proto, str(folder / DECODE_FILE))
    with pytest.raises(RomscaleError, match="points outside"):
        from romscale.rom.onnx_export import _check_external_data

        _check_external_data(folder, [PROGRAM_FILE, DECODE_FILE])
    with pytest.raises(RomscaleError):
        read_native(folder)  # the manifest's hash of the program no longer matches either


@pytest.mark.parametrize("meki", [False, True])
@pytest.mark.parametrize("weights", ["int8", "fp16"])
def test_reduced_precision_weights_stay_close(tmp_path, weights, meki):
    bundle = _bundle(tmp_path) if meki else None
    loaded = load_bundle(bundle) if meki else None
    model = loaded.model if meki else tiny_base("llama").eval()
    ref = OrtDecoder(export_native(model, tmp_path / "f32", bundle=bundle))
    low = OrtDecoder(export_native(model, tmp_path / weights, weights=weights, bundle=bundle))
    ids, mask = _prompt()
    a, _ = ref._run(ids.numpy(), mask.numpy(), ref._empty_cache(2))
    c, _ = low._run(ids.numpy(), mask.numpy(), low._empty_cache(2))
    rel = np.linalg.norm(a - c) / np.linalg.norm(a)
    assert 0 < rel < 0.05
    assert (tmp_path / weights / WEIGHTS_FILE).stat().st_size < (tmp_path / "f32" / WEIGHTS_FILE).stat().st_size
    assert low.generate(ids.numpy(), mask.numpy(), max_new_tokens=3).steps == 3
    if weights == "int8":  # every weight matmul quantised, the fused [W_gate; W_up; W_gate_mem] one too
        n = sum(_weight_matmuls(tmp_path / "f32" / PROGRAM_FILE).values())
        assert _weight_matmuls(tmp_path / weights / PROGRAM_FILE) == {"MatMulNBits": n}
    if loaded is not None:
        loaded.close()


def _node_counts(program, scratch) -> tuple[int, int]:
    """Nodes of the exported program, and of the graph ONNX Runtime runs after its fusions (the
    extended level has them all; the level above only adds layout transforms, and a warning)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(scratch)
    ort.InferenceSession(str(program), opts, providers=["CPUExecutionProvider"])
    return (len(onnx.load(str(program), load_external_data=False).graph.node),
            len(onnx.load(str(scratch), load_external_data=False).graph.node))


def test_fused_meki_program_is_the_dense_one_plus_a_few_ops_per_layer(tmp_path):
    path = _bundle(tmp_path)
    b = load_bundle(path)
    dense = _node_counts(export_native(tiny_base("llama"), tmp_path / "d") / PROGRAM_FILE, tmp_path / "d.onnx")
    fused = _node_counts(export_native(b.model, tmp_path / "f", bundle=path) / PROGRAM_FILE, tmp_path / "f.onnx")
    hooks = export_native(b.model, tmp_path / "h", bundle=path, fused=False)
    unfolded = _node_counts(hooks / PROGRAM_FILE, tmp_path / "h.onnx")
    assert json.loads((hooks / NATIVE_FILE).read_text())["fused_layers"] == 0
    assert fused[0] < unfolded[0] and fused[1] < unfolded[1]
    # Per layer: the Split of the fused gates' MatMul, the fusion's two ops, the post-norm and the
    # Add of y (the branch's gate shares the FFN's MatMul); once: the Split of the rows input.
    assert fused[1] <= dense[1] + 5 * 2 + 1
    # The hook form stays a correct program (the other placements use it).
    dec = OrtDecoder(hooks)
    _check_same(dec, b.model)
    dec.close()
    b.close()


def test_export_leaves_the_callers_model_as_it_was(tmp_path, monkeypatch):
    path = _bundle(tmp_path, fusion="add_silu")
    b = load_bundle(path)
    ids, mask = _prompt()
    modules = dict(b.model.named_modules())
    with torch.no_grad():
        before = b.model(ids, attention_mask=mask).logits
    export_native(b.model, tmp_path / "n", bundle=path)
    assert dict(b.model.named_modules()) == modules  # the same names and the same module objects
    with torch.no_grad():
        assert torch.equal(b.model(ids, attention_mask=mask).logits, before)  # rows still from the table, hooks on

    def fail(*_a, **_k):
        assert any(type(m).__name__ == "OnnxFusedMLP" for m in b.model.modules())  # swapped in during the trace
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_native(b.model, tmp_path / "m", bundle=path)
    assert dict(b.model.named_modules()) == modules
    b.close()


def test_a_changed_table_or_export_is_refused(tmp_path):
    path = _bundle(tmp_path)
    b = load_bundle(path)
    n = export_native(b.model, tmp_path / "n", bundle=path)
    b.close()
    other = _bundle(tmp_path, name="other", seed=2)  # other MeKi weights: another table
    with pytest.raises(RomscaleError, match="another ROM table"):
        OrtDecoder(n, bundle=other)
    with open(n / PROGRAM_FILE, "r+b") as f:  # flip one byte of the program
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(RomscaleError, match="sha256"):
        OrtDecoder(n)


def test_bad_prompts_are_refused(tmp_path):
    dec = OrtDecoder(export_native(tiny_base("llama").eval(), tmp_path / "n"))
    with pytest.raises(RomscaleError, match="out of range"):
        dec.generate(np.array([[5, 999]]))
    with pytest.raises(RomscaleError, match="shape"):
        dec.generate(np.zeros((1, 0), np.int64))


def test_export_refuses_a_model_with_tables_in_memory(tmp_path):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8))
    with pytest.raises(RomscaleError, match="bundle"):
        export_native(fold(model), tmp_path / "n")
    with pytest.raises(RomscaleError, match="--weights"):
        export_native(tiny_base("llama"), tmp_path / "n", weights="fp8")


# ---- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def tok():
    from romscale.train.data import train_tokenizer

    return train_tokenizer(["the quick brown fox jumps over the lazy dog " * 30], vocab_size=300)


@pytest.fixture
def cli_bundle(cli, tmp_path, tok):
    model = build_model("tiny", MekiConfig(d_mem=8, zero_init_output=False), vocab_size=len(tok), seed=0)
    ckpt = save_meki(model, tmp_path / "ckpt", tokenizer=tok)
    assert cli("bundle", "export", ckpt, "--out", tmp_path / "b").exit_code == 0
    return tmp_path / "b"


def test_cli_generate_with_onnxruntime_matches_torch(cli, cli_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ROMSCALE_CACHE", str(tmp_path / "cache"))
    args = ("bundle", "generate", cli_bundle, "--prompt", "the quick brown", "--max-new-tokens", "8")
    torch_run = cli(*args, "--no-prefetch")
    native_run = cli(*args, "--runtime", "onnxruntime")
    assert torch_run.exit_code == 0 and native_run.exit_code == 0, native_run
    assert native_run.stdout.strip().endswith(torch_run.stdout.strip())  # the same greedy text
    assert "exporting" in native_run.stdout
    again = cli(*args, "--runtime", "onnxruntime")  # the cached export is reused
    assert again.exit_code == 0 and "exporting" not in again.stdout


def test_cli_native_export_and_its_bad_inputs(cli, cli_bundle, tmp_path):
    r = cli("bundle", "native", cli_bundle, "--out", tmp_path / "n")
    assert r.exit_code == 0, r
    r = cli("bundle", "generate", tmp_path / "n", "--prompt", "the lazy", "--max-new-tokens", "3", "--runtime", "onnxruntime")
    assert r.exit_code == 0, r
    assert_usage_error(cli("bundle", "native", tmp_path / "missing", "--out", tmp_path / "m"), "SOURCE")
    assert_usage_error(cli("bundle", "native", cli_bundle, "--out", tmp_path / "m", "--weights", "fp8"), "--weights")
    assert_usage_error(cli("bundle", "native", cli_bundle, "--out", tmp_path / "n"), "--out")  # exists: no --overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_usage_error(cli("bundle", "native", cli_bundle, "--out", tmp_path / "mine", "--overwrite"), "--out")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert_usage_error(cli("bundle", "generate", cli_bundle, "--prompt", "x", "--runtime", "tvm"), "--runtime")


def test_cli_native_bench_checks_its_options_before_any_work(cli, tmp_path):
    args = ("bundle", "bench", "decode", "--runtime", "onnxruntime", "--json", tmp_path / "r.json")
    assert_usage_error(cli(*args, "--d-mem", "72", "--d-mem", "8"), "--d-mem")
    assert_usage_error(cli(*args, "--weights", "int4"), "--weights")
    assert_usage_error(cli(*args, "--min-pairs", "1"), "--min-pairs")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:  # without the bench extra the anchor is refused up front, naming the extra
        assert_usage_error(cli(*args), "romscale[bench]")
    assert not (tmp_path / "r.json").exists()


def test_dense_only_native_bench_on_a_tiny_model(tmp_path):
    """The main job's short comparison (dense arms only, no table): no MeKi export, no memory probes,
    the paired ratio against HF eager; tokens of the two arms agree (same weights, greedy)."""
    from romscale.bench.native import NativeBenchConfig, bench_native

    model = tiny_base("llama")
    model.save_pretrained(tmp_path / "hf")
    from conftest import hf_tokenizer

    hf_tokenizer().save_pretrained(tmp_path / "hf")
    cfg = NativeBenchConfig(model=str(tmp_path / "hf"), rounds=2, new_tokens=6, prompt_tokens=4, meki=False,
                            llamacpp=False, hf_eager=True)
    r = bench_native(cfg, tmp_path / "work", log=lambda *_: None)
    assert set(r["arms"]) == {"ort dense", "hf eager"} and r["memory"] == {} and r["targets"] == {}
    assert set(r["ratios"]) == {"ort dense / hf eager"} and r["ratios"]["ort dense / hf eager"]["n"] == 2
    assert r["greedy_agreement_with_ort_dense"]["hf eager"] == 1.0
    assert not any(p.name.startswith("meki") for p in (tmp_path / "work").iterdir())


def test_greedy_steps_are_the_greedy_generation_one_step_at_a_time(tmp_path):
    model = tiny_base("llama")
    export_native(model, tmp_path / "x")
    ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(1)).numpy()
    dec = OrtDecoder(tmp_path / "x")
    try:
        ref = dec.generate(ids, max_new_tokens=7).tokens[0].tolist()
        steps = list(dec.greedy_steps(ids, 7))
        assert [t for t, _ in steps] == ref and all(dt > 0 for _, dt in steps)
        with pytest.raises(RomscaleError, match="one prompt"):
            next(dec.greedy_steps(np.zeros((2, 3), np.int64), 2))
    finally:
        dec.close()


def test_meki_native_bench_on_a_tiny_model_pairs_runs_and_lockstep_steps(tmp_path):
    from conftest import hf_tokenizer

    from romscale.bench.native import NativeBenchConfig, bench_native

    tiny_base("llama").save_pretrained(tmp_path / "hf")
    hf_tokenizer().save_pretrained(tmp_path / "hf")
    cfg = NativeBenchConfig(model=str(tmp_path / "hf"), d_mem=8, rounds=2, new_tokens=5, prompt_tokens=4, memory_tokens=8,
                            llamacpp=False, hf_eager=False)
    r = bench_native(cfg, tmp_path / "work", log=lambda *_: None)
    assert set(r["arms"]) == {"ort dense", "ort MeKi"}
    lock = r["lockstep_tok_s"]
    assert len(lock["ort dense"]) == len(lock["ort MeKi"]) == 2
    # one round in a process that opened the dense decoder first, one in a process that opened MeKi first
    by = lock["by_open_order"]
    assert set(by) == {"ort dense opened first", "ort MeKi opened first"}
    assert sorted(by["ort dense opened first"]["ort MeKi"] + by["ort MeKi opened first"]["ort MeKi"]) == sorted(lock["ort MeKi"])
    assert r["ratios"]["ort MeKi / ort dense (lockstep)"]["n"] == 2
    assert {"meki_ge_0.97x_dense", "meki_ge_0.97x_dense_lockstep", "table_residency_le_2x_touched"} <= set(r["targets"])


_model = memory_model


@pytest.mark.parametrize("names", [("ple",), ("fat",), ("ple", "fat", "meki")])
def test_memory_bundle_export_reads_each_table_and_matches_the_bundle(tmp_path, names):
    """PLE, the fat embedding, and MeKi among them: one rows input per memory, read by the host from
    that memory's ROM table; greedy tokens and logits match the PyTorch memory bundle."""
    from romscale.rom.runtime import export_memory_bundle, load_memory_bundle

    path = export_memory_bundle(_model(*names), tmp_path / "b", dtype="fp16")
    mb = load_memory_bundle(path)
    try:
        export_native(mb.model, tmp_path / "x", bundle=path)
        meta = read_native(tmp_path / "x")
        assert sorted(m["name"] for m in meta["memories"]) == sorted(names) and meta["rows"] is None
        dec = OrtDecoder(tmp_path / "x")
        try:
            assert set(dec.tables) == {f"rows_{n}" for n in names}
            _check_same(dec, mb.model)
            assert dec.row_bytes_read > 0
        finally:
            dec.close()
        # the caller's model still reads its own tables
        ids = torch.randint(3, 90, (1, 5), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            mb.model(ids)
    finally:
        mb.close()


def test_engram_and_changed_memory_tables_are_refused(tmp_path):
    from romscale.rom.runtime import export_memory_bundle, load_memory_bundle, memory_table_files

    path = export_memory_bundle(_model("engram"), tmp_path / "e")
    mb = load_memory_bundle(path)
    try:
        with pytest.raises(RomscaleError, match="addressed by"):
            export_native(mb.model, tmp_path / "x")
    finally:
        mb.close()
    assert not (tmp_path / "x").exists()
    path = export_memory_bundle(_model("ple"), tmp_path / "p")
    mb = load_memory_bundle(path)
    try:
        export_native(mb.model, tmp_path / "y", bundle=path)
    finally:
        mb.close()
    changed = _model("ple")
    with torch.no_grad():
        changed.ple.table.weight.add_(1.0)
    other = export_memory_bundle(changed, tmp_path / "p2")  # another table, same layout
    with pytest.raises(RomscaleError, match="sha256 differs"):
        OrtDecoder(tmp_path / "y", bundle=other)
    assert memory_table_files("ple")[0] in {p.name for p in other.iterdir()}


def test_cli_native_exports_a_memory_bundle_and_refuses_engram(cli, tmp_path):
    from romscale.rom.runtime import export_memory_bundle

    ple = export_memory_bundle(_model("ple"), tmp_path / "p")
    r = cli("bundle", "native", str(ple), "--out", str(tmp_path / "x"))
    assert r.exit_code == 0, r.output
    assert [m["name"] for m in read_native(tmp_path / "x")["memories"]] == ["ple"]
    eng = export_memory_bundle(_model("engram"), tmp_path / "e")
    assert_usage_error(cli("bundle", "native", str(eng), "--out", str(tmp_path / "y")), "addressed by")
    assert not (tmp_path / "y").exists()
