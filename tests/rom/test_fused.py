"""The fused decode FFN: its C kernel and its eager fallback give the hook path's numbers."""

import warnings

import pytest
import torch

from conftest import randomize_meki, tiny_base
from romscale.errors import RomscaleError
from romscale.meki.attach import attach_meki, meki_branches
from romscale.meki.config import MekiConfig
from romscale.meki.fold import fold
from romscale.rom import fused as fused_mod
from romscale.rom import kernel as kernel_mod
from romscale.rom.fused import FusedMekiMLP, fuse_dense_ffn, fuse_meki_ffn
from romscale.rom.runtime import export_bundle, load_bundle

FUSIONS = ["add_sigmoid", "mul_sigmoid", "add_silu", "mul_silu"]
needs_kernel = pytest.mark.skipif(kernel_mod.ffn_kernel() is None, reason="no C compiler on this machine")


def _bundle(tmp_path, fusion="add_sigmoid", zero_post=False, d_mem=8):
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=d_mem, fusion=fusion))
    randomize_meki(model)
    if zero_post:  # a post-norm weight with zeros (some output channels switched off)
        with torch.no_grad():
            for _, b in meki_branches(model):
                b.post_norm.weight[::3] = 0.0
    return export_bundle(fold(model), tmp_path / f"b-{fusion}-{zero_post}", dtype="fp16")


def _fused(path, kernel: bool):
    b = load_bundle(path)
    assert fuse_meki_ffn(b.model) == 2
    mods = [m for m in b.model.modules() if isinstance(m, FusedMekiMLP)]
    for m in mods:
        if not kernel:
            m.kernel = None
    return b, mods


@needs_kernel
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("zero_post", [False, True])
def test_kernel_and_eager_match_the_hook_path(tmp_path, ids, fusion, zero_post):
    path = _bundle(tmp_path, fusion, zero_post)
    ref = load_bundle(path)
    (with_kernel, mods), (eager, _) = _fused(path, True), _fused(path, False)
    assert all(m.kernel is not None for m in mods)
    with torch.no_grad():
        want = ref.model(ids).logits
        for b in (with_kernel, eager):
            assert (b.model(ids).logits - want).abs().max() <= 1e-5  # prefill: several tokens
            assert (b.model(ids[:1, :1]).logits - want[:1, :1]).abs().max() <= 1e-5  # one token


@needs_kernel
def test_kernel_is_exact_on_extreme_gate_logits(tmp_path):
    """-ffast-math must not break the saturated ends of sigmoid/SiLU."""
    path = _bundle(tmp_path, "mul_silu")
    (kb, kmods), (eb, emods) = _fused(path, True), _fused(path, False)
    for km, em in zip(kmods, emods):
        km.w_in[-8:].mul_(400.0), em.w_in[-8:].mul_(400.0)  # gate logits in the hundreds, both signs
    x = torch.randint(3, 96, (1, 6))
    with torch.no_grad():
        got, want = kb.model(x).logits, eb.model(x).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-4


@needs_kernel
def test_fused_dense_ffn_keeps_the_logits(ids):
    base = tiny_base("qwen3")
    fused = tiny_base("qwen3")
    assert fuse_dense_ffn(fused) == 2
    with torch.no_grad():
        assert (fused(ids).logits - base(ids).logits).abs().max() <= 1e-5


def test_fusing_drops_the_branch_projections(tmp_path):
    b, mods = _fused(_bundle(tmp_path, d_mem=16), True)
    assert all(br.gate is None and br.out is None for _, br in meki_branches(b.model))
    m = mods[0]
    assert m.w_in.shape == (2 * 64 + 16, 32) and m.w_down.shape == (32, 64) and m.w_out.shape == (32, 16)


def test_fused_path_is_inference_only(tmp_path):
    b, _ = _fused(_bundle(tmp_path), True)
    emb = b.model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    with pytest.raises(RomscaleError, match="inference-only"):
        b.model(torch.tensor([[5, 6]]))


class _Calls:
    """Forwards to `fn` and counts the calls."""

    def __init__(self, fn) -> None:
        self.fn, self.n = fn, 0

    def __call__(self, *args):
        self.n += 1
        return self.fn(*args)


@pytest.fixture
def eager_calls(monkeypatch) -> _Calls:
    """Counts the fused module's eager-path calls: only that path calls `fuse` (the kernel does it in C)."""
    spy = _Calls(fused_mod.fuse)
    monkeypatch.setattr(fused_mod, "fuse", spy)
    return spy


def _logits(b, ids, dtype=torch.float32):
    with torch.no_grad():
        return b.model(ids).logits.to(dtype), b.model(ids[:1, :1]).logits.to(dtype)  # prefill, one token


def _close(got, want, tol: float) -> None:
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= tol


def _check_eager_fallback(tmp_path, monkeypatch, ids, eager_calls, disable_kernel) -> None:
    """Under `disable_kernel()`, ffn_kernel() is None without building anything, the fused modules
    hold no kernel, their forward runs the eager path, and the logits are the hook path's and the
    kernel path's (where this machine has a kernel)."""
    path = _bundle(tmp_path)
    want = _logits(load_bundle(path), ids)  # the hook path
    kernel_out = _logits(_fused(path, True)[0], ids) if kernel_mod.ffn_kernel() is not None else None
    assert eager_calls.n == 0  # neither reference ran the eager path
    built = []
    monkeypatch.setattr(kernel_mod, "_build", lambda *a: built.append(a))
    monkeypatch.setenv("ROMSCALE_CACHE", str(tmp_path / "cache"))
    kernel_mod.ffn_kernel.cache_clear()  # ffn_kernel() is decided afresh under disable_kernel()
    try:
        disable_kernel()
        assert kernel_mod.ffn_kernel() is None
        b = load_bundle(path)
        assert fuse_meki_ffn(b.model) == 2
        assert all(m.kernel is None for m in b.model.modules() if isinstance(m, FusedMekiMLP))
        got = _logits(b, ids)
    finally:
        kernel_mod.ffn_kernel.cache_clear()  # the next test sees the real kernel again
    assert not built and not (tmp_path / "cache").exists()  # no build was attempted
    assert eager_calls.n == 2 * 2  # both fused layers, both forward calls, ran the eager path
    _close(got, want, 1e-5)
    if kernel_out is not None:
        _close(got, kernel_out, 1e-5)


def test_missing_compiler_falls_back_to_eager(tmp_path, monkeypatch, ids, eager_calls):
    def no_compiler():
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setattr(kernel_mod.shutil, "which", lambda name: None)

    _check_eager_fallback(tmp_path, monkeypatch, ids, eager_calls, no_compiler)


@needs_kernel  # a compiler is here: only the variable explains the fallback
def test_no_kernel_variable_falls_back_to_eager(tmp_path, monkeypatch, ids, eager_calls):
    _check_eager_fallback(tmp_path, monkeypatch, ids, eager_calls, lambda: monkeypatch.setenv("ROMSCALE_NO_KERNEL", "1"))


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.bfloat16, 3e-2)])
def test_non_fp32_model_runs_eager_beside_a_loaded_kernel(tmp_path, ids, eager_calls, dtype, tol):
    path = _bundle(tmp_path)
    ref, ref_mods = _fused(path, True)  # fp32: the kernel path
    b = load_bundle(path, dtype=dtype)
    assert fuse_meki_ffn(b.model) == 2
    mods = [m for m in b.model.modules() if isinstance(m, FusedMekiMLP)]
    for m in mods + ref_mods:
        assert m.kernel is not None
        m.kernel = _Calls(m.kernel)
    want = _logits(ref, ids)
    assert all(m.kernel.n == 2 for m in ref_mods) and eager_calls.n == 0  # the spies see the kernel path
    got = _logits(b, ids, torch.float32)
    assert all(m.kernel.n == 0 for m in mods)  # the kernel is loaded but never called for this dtype
    assert eager_calls.n == 2 * 2
    assert all(t.dtype == dtype for t in b.model.parameters())
    _close(got, want, tol)


def test_failed_build_warns_and_leaves_no_library(tmp_path, monkeypatch):
    bad_cc = tmp_path / "bad-cc"
    bad_cc.write_text("#!/bin/sh\necho 'cc: broken on purpose' >&2\nexit 1\n")
    bad_cc.chmod(0o755)
    monkeypatch.setenv("ROMSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(bad_cc))
    kernel_mod.ffn_kernel.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernel_mod.ffn_kernel() is None
        assert any("broken on purpose" in str(w.message) for w in caught)
        assert not list((tmp_path / "cache" / "kernels").glob("*"))  # no half-written library
    finally:
        kernel_mod.ffn_kernel.cache_clear()


def test_rows_of_the_wrong_shape_are_refused_before_the_kernel_reads_them(tmp_path):
    b, _ = _fused(_bundle(tmp_path), True)
    from romscale.meki.attach import meki_state

    meki_state(b.model).row_source = lambda ids: torch.zeros(*ids.shape, 1, 8)  # one layer, not two
    with torch.no_grad(), pytest.raises(RomscaleError, match="expected"):
        b.model(torch.tensor([[5, 6]]))
