"""romscale.models: local HF folders and GGUF files in, clear one-line errors for everything else."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from conftest import VOCAB, hf_tokenizer, tiny_base, write_tiny_gguf
from romscale.errors import ModelInputError, RomscaleError
from romscale.models import GGUF_EXTRA_HINT, load_causal_lm, resolve_model_source

def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _assert_same_logits(a, b, atol: float = 0.0) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(_ids()).logits, b(_ids()).logits, atol=atol, rtol=0 if atol == 0 else 1e-3)


def _message(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def hf_folder(tmp_path):
    base = tiny_base()
    folder = tmp_path / "hf"
    base.save_pretrained(folder)
    return base, folder


# -- Hugging Face folders ---------------------------------------------------------------------------
def test_hf_folder_loads_with_tokenizer(hf_folder):
    base, folder = hf_folder
    hf_tokenizer().save_pretrained(folder)
    src = resolve_model_source(folder)
    assert src.kind == "hf" and src.path == folder.resolve() and src.folder == folder.resolve()
    model, tok = load_causal_lm(folder, dtype=torch.float32)
    assert model.dtype == torch.float32
    _assert_same_logits(base, model)
    assert tok is not None and tok.decode(tok("hello there").input_ids) == "hello there"


def test_hf_folder_without_tokenizer_gives_none(hf_folder):
    base, folder = hf_folder
    model, tok = load_causal_lm(str(folder))
    assert tok is None
    _assert_same_logits(base, model)


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    tiny_base().config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")  # never opened
    with pytest.raises(ModelInputError) as e:
        load_causal_lm(folder, option="--base-model")
    msg = _message(e)
    assert "--base-model" in msg and str(folder) in msg
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_pickle_file_is_refused(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"x")
    with pytest.raises(ModelInputError, match="pickle weights are never loaded"):
        resolve_model_source(file)


@pytest.mark.parametrize("case", ["missing", "not_gguf", "no_config", "bad_json", "not_object", "no_model_type", "no_weights"])
def test_bad_inputs_name_option_path_and_expectation(tmp_path, case):
    target = tmp_path / "m"
    if case == "missing":
        expect = "does not exist"
    elif case == "not_gguf":
        target = tmp_path / "weights.safetensors"
        target.write_bytes(b"{}")
        expect = "not a .gguf file"
    else:
        target.mkdir()
        (target / "model.safetensors").write_bytes(b"")
        config = {"no_config": None, "bad_json": "{not json", "not_object": "[1, 2]",
                  "no_model_type": json.dumps({"hidden_size": 8}), "no_weights": json.dumps({"model_type": "llama"})}[case]
        if config is not None:
            (target / "config.json").write_text(config)
        if case == "no_weights":
            (target / "model.safetensors").unlink()
        expect = {"no_config": "config.json", "bad_json": "not a valid JSON", "not_object": "not a JSON object",
                  "no_model_type": "model_type", "no_weights": "no *.safetensors"}[case]
    with pytest.raises(ModelInputError) as e:
        resolve_model_source(target, option="--model")
    msg = _message(e)
    assert msg.startswith("--model ") and target.name in msg and expect in msg
    assert isinstance(e.value, RomscaleError)


def test_corrupt_safetensors_is_a_romscale_error(hf_folder):
    _, folder = hf_folder
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelInputError) as e:
        load_causal_lm(folder)
    msg = _message(e)
    assert "--model" in msg and str(folder) in msg


# -- GGUF -------------------------------------------------------------------------------------------
def _assert_plain(model) -> None:
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("_proj", "lm_head")))


def test_gguf_file_loads_with_tokenizer(tmp_path):
    base = tiny_base()
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(base, file)
    src = resolve_model_source(file)
    assert src.kind == "gguf" and src.path == file.resolve() and src.folder == tmp_path.resolve()
    model, tok = load_causal_lm(file)
    _assert_plain(model)
    assert model.config.vocab_size == VOCAB and model.config.tie_word_embeddings
    _assert_same_logits(base, model)
    assert tok is not None and len(tok) == VOCAB
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.decode(tok("hello there").input_ids) == "hello there"
    # no stale quantization state: it saves and reloads as a plain HF folder
    out = tmp_path / "converted"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    again, tok2 = load_causal_lm(out)
    _assert_same_logits(base, again)
    assert tok2 is not None and tok2("hello").input_ids == tok("hello").input_ids


def test_gguf_folder_loads_and_ignores_cwd_namesake(tmp_path, monkeypatch):
    base = tiny_base()
    folder = tmp_path / "gguf_dir"
    folder.mkdir()
    write_tiny_gguf(base, folder / "model.gguf")
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    write_tiny_gguf(tiny_base(seed=5), decoy / "model.gguf")  # same name, other weights, in the cwd
    monkeypatch.chdir(decoy)
    src = resolve_model_source(folder)
    assert src.kind == "gguf" and src.path == (folder / "model.gguf").resolve()
    model, tok = load_causal_lm(folder)
    _assert_plain(model)
    _assert_same_logits(base, model)
    assert tok is not None


def test_gguf_q8_0_is_unpacked_into_a_dense_model(tmp_path):
    base = tiny_base()
    file = tmp_path / "tiny-q8_0.gguf"
    write_tiny_gguf(base, file, quantized=True)
    model, _ = load_causal_lm(file, dtype=torch.float32)
    _assert_plain(model)
    assert model.dtype == torch.float32
    _assert_same_logits(base, model, atol=0.05)


def test_gguf_without_tokenizer_metadata_gives_none(tmp_path):
    base = tiny_base()
    file = tmp_path / "notok.gguf"
    write_tiny_gguf(base, file, tokenizer=False)
    model, tok = load_causal_lm(file)
    assert tok is None
    _assert_same_logits(base, model)


def test_two_gguf_files_in_a_folder_is_an_error(tmp_path):
    (tmp_path / "a-q4.gguf").write_bytes(b"GGUF")
    (tmp_path / "b-f16.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelInputError) as e:
        resolve_model_source(tmp_path, option="--model")
    msg = _message(e)
    assert "a-q4.gguf" in msg and "b-f16.gguf" in msg and "several" in msg and str(tmp_path) in msg


def test_gguf_missing_extra_names_it(tmp_path, monkeypatch):
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" + b"\0" * 20)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    for call in (resolve_model_source, load_causal_lm):
        with pytest.raises(ModelInputError) as e:
            call(file)
        msg = _message(e)
        assert GGUF_EXTRA_HINT in msg and "pip install 'romscale[gguf]'" in msg and str(file) in msg


@pytest.mark.parametrize("content", [b"NOPE" + b"\0" * 40, b"GGUF\x03\x00\x00\x00" + b"\xff" * 7, b"GGUF\x07\x00\x00\x00" + b"\0" * 40])
def test_corrupt_gguf_is_a_romscale_error(tmp_path, content):
    pytest.importorskip("gguf")
    file = tmp_path / "broken.gguf"
    file.write_bytes(content)
    with pytest.raises(ModelInputError) as e:
        load_causal_lm(file, option="--base")
    msg = _message(e)
    assert msg.startswith(f"--base {file}")


def test_truncated_gguf_is_a_romscale_error(tmp_path):
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_base(), file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelInputError) as e:
        load_causal_lm(file)
    assert str(file) in _message(e)
