"""Shared fixtures: tiny random models of every supported family (no hub, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

VOCAB = 96
FAMILY_CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_base(family: str = "llama", seed: int = 0, tie: bool = True):
    torch.manual_seed(seed)
    cfg = FAMILY_CONFIGS[family](
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def randomize_meki(model, std: float = 0.5, seed: int = 1) -> None:
    """Give every MeKi parameter a non-trivial value so the branch visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".meki." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() <= 1 else 0.0))


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


# ---- GGUF files as llama.cpp writes them (tests/test_models.py, CLI tests) ----------------------

SPECIALS = ["<pad>", "<|endoftext|>", "<s>"]  # ids 0, 1, 2 = tiny_base's pad, eos, bos


def _vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of exactly VOCAB tokens, with a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spell = bytes_to_unicode()
    chars = [spell[b] for b in b"abcdefghijklmnopqrstuvwxyz .,!?'\nABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"]
    merges = ["h e", "l l", "t h", f"{spell[32]} t"]
    tokens = SPECIALS + chars + [m.replace(" ", "") for m in merges]
    tokens += [f"<unused{i}>" for i in range(VOCAB - len(tokens))]
    assert len(tokens) == VOCAB
    return tokens, merges


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, file, *, tokenizer: bool = True, quantized: bool = False) -> None:
    """Write a tiny Llama as llama.cpp would: GGUF names, permuted q/k, F32 (or Q8_0 matrices)."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(file), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        tokens, merges = _vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
        w.add_token_merges(merges)
        w.add_pad_token_id(0)
        w.add_eos_token_id(1)
        w.add_bos_token_id(2)
    else:
        w.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes output.weight only when it is not the embedding
        base, suffix = key.rsplit(".", 1)
        a = value.float().numpy()
        if key.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        a = np.ascontiguousarray(a)
        if quantized and a.ndim == 2:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = _vocab()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>", bos_token="<s>")


def resign(folder) -> None:
    """Rewrite a romscale folder's manifest entries after a test edited its files: a tampered but
    self-consistent folder, to reach the checks behind the checksums."""
    import hashlib
    import json
    from pathlib import Path

    folder = Path(folder)
    mpath = folder / "romscale_manifest.json"
    m = json.loads(mpath.read_text())
    for name in m["files"]:
        data = (folder / name).read_bytes()
        m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mpath.write_text(json.dumps(m))


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.exit_code, self.stdout, self.stderr = code, out, err

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def cli(capsys):
    """Run `romscale ARGS...` in-process under the real error contract (romscale.cli_common.main)."""

    def run(*args) -> CliResult:
        from romscale.cli import app
        from romscale.cli_common import main

        capsys.readouterr()
        try:
            main(app, [str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def assert_usage_error(r: CliResult, *needles: str) -> None:
    """Exit code 2, one `error:` line on stderr naming what was wrong, no traceback."""
    assert r.exit_code == 2, r
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r
    assert "Traceback" not in r.output, r
    for n in needles:
        assert n in lines[0], (n, r)


# ==== adapter fixtures (tests/adapters) ================================================================
# A tiny random Llama (hidden 64, k/v 32 wide: non-square modules) and real PEFT LoRA folders saved
# from it. The helpers are handed out as fixtures (factories), so no test module imports another.
# CLI tests use the `cli` fixture and assert_usage_error above (`cli("adapters", "merge", ...)`).
import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

ADAPTER_BASE_NAME = "tiny/llama-64"
ADAPTER_VOCAB = 128
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _tiny_llama(seed: int = 0, hidden: int = 64):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=ADAPTER_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def _make_lora(
    out: Path,
    seed: int,
    *,
    r: int = 4,
    alpha: float = 8,
    targets=QKVO,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    base_name: str | None = ADAPTER_BASE_NAME,
    hidden: int = 64,
    shared_A: dict | None = None,
    std: float = 0.2,
    levels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a real PEFT LoRA folder with random A and B (B non-zero so the update is non-trivial).
    `shared_A`: module -> tensor used as lora_A (tasks that truly share A). `levels`: values are
    integers in [-levels, levels] / 8, so magnitudes tie everywhere (in A, B and B @ A, exactly)."""
    from peft import LoraConfig, get_peft_model

    model = _tiny_llama(0, hidden)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {}, lora_dropout=0.0)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                if levels is None:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                else:
                    p.copy_(torch.randint(-levels, levels + 1, p.shape, generator=g).float() / 8)
        if shared_A is not None:
            for name, mod in pm.named_modules():
                key = name.removeprefix("base_model.model.")
                if key in shared_A and hasattr(mod, "lora_A"):
                    mod.lora_A["default"].weight.copy_(shared_A[key])
    pm.to(dtype).save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    d = json.loads(cfg_path.read_text())
    d["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(d, indent=2))
    return out


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny_llama


@pytest.fixture(scope="session")
def make_lora():
    return _make_lora


@pytest.fixture(scope="session")
def tree_hash():
    return _tree_hash


@pytest.fixture(scope="session")
def lib4(tmp_path_factory) -> list[Path]:
    """Four rank-4 fp32 adapters on q/k/v/o (same rank, no rsLoRA)."""
    root = tmp_path_factory.mktemp("lib4")
    return [_make_lora(root / f"task{i}", seed=100 + i, alpha=4 + 2 * i) for i in range(4)]


@pytest.fixture(scope="session")
def lib_fp16_ties(tmp_path_factory) -> list[Path]:
    """Four rank-4 fp16 adapters on q/k/v/o whose factors (and updates) have many exactly tied
    magnitudes; alphas give power-of-two scalings, so every update is exact in fp32: the parity library."""
    root = tmp_path_factory.mktemp("lib_fp16_ties")
    return [_make_lora(root / f"tie{i}", seed=600 + i, alpha=2 ** (i + 1), levels=3, dtype=torch.float16) for i in range(4)]


@pytest.fixture(scope="session")
def lib_mixed(tmp_path_factory) -> list[Path]:
    """Three adapters with different ranks, alphas, rsLoRA and a rank_pattern."""
    root = tmp_path_factory.mktemp("libmixed")
    return [
        _make_lora(root / "a", seed=1, r=4, alpha=8),
        _make_lora(root / "b", seed=2, r=8, alpha=4, use_rslora=True),
        _make_lora(root / "c", seed=3, r=6, alpha=12, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
    ]


@pytest.fixture
def tok_ids() -> torch.Tensor:
    return torch.randint(0, ADAPTER_VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def memory_configs() -> dict:
    """Small configs of every memory for the tiny models (memory bundles, native export)."""
    from romscale.meki.config import MekiConfig
    from romscale.memories.engram import EngramConfig
    from romscale.memories.fat import FatConfig
    from romscale.memories.ple import PleConfig

    return {"ple": PleConfig(d_ple=8), "engram": EngramConfig(layers=(0, 1), rows_per_head=13, heads=2, d_head=4),
            "fat": FatConfig(extra=8), "meki": MekiConfig(d_mem=8)}


def memory_model(*names: str, family: str = "llama"):
    """A tiny model with the named memories attached, their weights random (not the zero-init
    outputs); MeKi folded."""
    from romscale.memories.base import get_memory

    configs = memory_configs()
    model = tiny_base(family)
    g = torch.Generator().manual_seed(4)
    for name in names:
        get_memory(name).attach(model, configs[name])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if set(names) & set(n.split(".")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() <= 1 else 0.0))
    if "meki" in names:
        get_memory("meki").fold(model)
    return model
