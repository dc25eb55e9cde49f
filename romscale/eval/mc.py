"""Zero-shot multiple choice by log-likelihood, scored the way lm-evaluation-harness scores it.

An item is a context and a few choices. Each choice is scored as log p(delimiter + choice | context)
under the model (sum over the continuation's tokens); the prediction is the best choice:
- `acc`: argmax of the summed log-likelihood;
- `acc_norm`: argmax of the log-likelihood divided by the choice's length in characters (the
  choice text without the delimiter), as lm_eval computes it (lm_eval/api/task.py,
  `ConfigurableTask.process_results`, multiple_choice: `lls / completion_len`).
Ties go to the first choice (numpy argmax, as in lm_eval).

Tokenisation follows lm_eval's `TemplateLM._encode_pair` for causal models: trailing whitespace of
the context moves to the continuation, then context + continuation is encoded as one string and the
context's own encoding is cut off its front. Encoding the whole string keeps the tokens at the
boundary the ones the model saw in training (BPE merges across " A" differ from encoding " A"
alone); encoding separately would score token sequences the tokenizer never produces. An empty
context conditions on the BOS token (EOS when there is none), also as lm_eval does. Special tokens
follow lm_eval's HF model (`add_bos_token` unset): the tokenizer's own default, so a BOS is
prepended exactly where the tokenizer prepends one.

Scoring is batched: requests are sorted longest first, right-padded, and each batch is one forward;
log-softmax is taken only at continuation positions (`logits_to_keep` where the model has it), in
float32. Inputs longer than the model's context keep their last `max_length` tokens (lm_eval's rule).

Models: `load_scoring_model` takes a packaged model name (smollm2-135m-instruct), a local Hugging
Face folder or GGUF file (romscale.models), a romscale training run (its final model), a memory
checkpoint (MeKi, PLE, Engram: romscale.meki.io) or a deploy bundle (romscale.rom.runtime).
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from romscale.errors import ModelInputError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MCItem", "MCTaskResult", "ScoringModel", "encode_pair", "encode_request", "evaluate_mc", "load_scoring_model",
    "mc_requests", "model_kind", "model_max_length", "predictions", "resolve_scoring_model", "score_continuations",
]

DEFAULT_MAX_LENGTH = 2048  # lm_eval's HFLM fallback when neither config nor tokenizer says


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: score `choices` as continuations of `context`; `gold` is the
    index of the correct choice."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"item {self.id}: needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"item {self.id}: gold {self.gold} is not a choice index (0..{len(self.choices) - 1})")


# -- tokenisation (lm_eval's rules) ---------------------------------------------------------------
def tok_encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of `text` as lm_eval's HF model encodes them: by default with the tokenizer's own
    special tokens (a BOS where the tokenizer adds one, nothing for GPT-2-style BPEs), but none
    when the text already starts with the prefix token."""
    if add_special_tokens is None:
        tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        add_special_tokens = tid is None or not text.startswith(tokenizer.decode([tid]))
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token an empty context conditions on: BOS, else EOS (lm_eval HFLM.prefix_token_id)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ModelInputError("the tokenizer has neither a BOS nor an EOS token; an empty context needs one to condition on")
    return int(tid)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for a non-empty context: trailing whitespace moves to the
    continuation, the whole string is encoded and split at the context's length (lm_eval, causal)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok_encode(tokenizer, context + continuation)
    ctx = tok_encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def encode_request(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """encode_pair, with lm_eval's empty-context rule (condition on the prefix token)."""
    if context:
        return encode_pair(tokenizer, context, continuation)
    cont = tok_encode(tokenizer, continuation, add_special_tokens=False)
    prefix = prefix_token_id(tokenizer)
    if cont and cont[0] == prefix:
        return cont[:1], cont[1:]
    return [prefix], cont


# -- scoring --------------------------------------------------------------------------------------
def model_max_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The context length, found as lm_eval's HFLM finds it (config, then tokenizer, then 2048)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000_000:  # transformers' "no limit" is a huge sentinel
        return v
    return DEFAULT_MAX_LENGTH


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), unit="req")


def score_continuations(
    model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
    max_length: int | None = None, device: torch.device | str | None = None, progress: bool = False,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether the continuation is the greedy one) per request.

    `requests` are (context ids, continuation ids), the context non-empty (see encode_request).
    Sorted longest first, right-padded, one forward per batch of `batch_size`; results come back in
    request order."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or model_max_length(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seqs: list[tuple[list[int], int]] = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both be non-empty token lists")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: the continuation has {len(cont)} tokens, more than the context length {max_length}")
        full = (list(ctx) + list(cont))[-(max_length + 1):]  # lm_eval: keep the tail, drop the last token
        seqs.append((full, len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    keep_arg = _accepts(model, "logits_to_keep")
    bar = _progress(len(seqs), "log-likelihoods", progress)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs = [seqs[i][0][:-1] for i in idx]
            width = max(len(x) for x in inputs)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            spans = []  # continuation logits positions [a, b) and the continuation tokens
            for r, i in enumerate(idx):
                x, n_cont = inputs[r], seqs[i][1]
                ids[r, :len(x)] = torch.tensor(x)
                mask[r, :len(x)] = 1
                spans.append((len(x) - n_cont, len(x), seqs[i][0][-n_cont:]))
            lo = min(a for a, _, _ in spans)
            kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if keep_arg:  # only the logits at continuation positions (a 1-D index tensor is allowed)
                kwargs["logits_to_keep"] = torch.arange(lo, width, device=device)
            logits = model(**kwargs).logits
            offset = lo if keep_arg else 0
            for r, (a, b, cont) in enumerate(spans):
                lp = torch.log_softmax(logits[r, a - offset:b - offset].float(), dim=-1)
                target = torch.tensor(cont, device=lp.device)
                ll = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all().item())
                out[idx[r]] = (float(ll), greedy)
            bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def mc_requests(tokenizer: PreTrainedTokenizerBase, items: Iterable[MCItem], target_delimiter: str = " ") -> list[tuple[list[int], list[int]]]:
    """One (context ids, continuation ids) request per choice of each item, items in order."""
    return [encode_request(tokenizer, it.context, target_delimiter + c) for it in items for c in it.choices]


def predictions(items: Sequence[MCItem], lls: Sequence[float]) -> list[dict[str, Any]]:
    """Per item: the choices' log-likelihoods, the acc and acc_norm predictions and whether each is right."""
    import numpy as np

    rows, k = [], 0
    for it in items:
        ll = np.asarray(lls[k:k + len(it.choices)], dtype=np.float64)
        k += len(it.choices)
        lengths = np.asarray([float(len(c)) for c in it.choices])
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        rows.append({"id": it.id, "gold": it.gold, "pred": pred, "pred_norm": pred_norm, "acc": float(pred == it.gold),
                     "acc_norm": float(pred_norm == it.gold), "loglikelihoods": [round(float(v), 6) for v in ll]})
    if k != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for {k} choices")
    return rows


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std, ddof=1, over sqrt(n)): lm_eval's mean_stderr."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass
class MCTaskResult:
    """One task's scores (fractions in [0, 1], as lm_eval reports acc) and per-item predictions."""

    name: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    chance: float
    items: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in vars(self).items() if k != "items"}


def evaluate_mc(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: dict[str, Sequence[MCItem]], *, target_delimiter: str = " ",
    batch_size: int = 16, max_length: int | None = None, progress: bool = False,
) -> dict[str, MCTaskResult]:
    """Score every task's items; all tasks' requests share the batches (one pass, longest first)."""
    names = list(tasks)
    reqs: list[tuple[list[int], list[int]]] = []
    bounds = []
    for name in names:
        if not tasks[name]:
            raise ValueError(f"task {name}: no items")
        start = len(reqs)
        reqs += mc_requests(tokenizer, tasks[name], target_delimiter)
        bounds.append((start, len(reqs)))
    scored = score_continuations(model, reqs, batch_size=batch_size, max_length=max_length or model_max_length(model, tokenizer),
                                 progress=progress)
    results = {}
    for name, (a, b) in zip(names, bounds):
        items = list(tasks[name])
        rows = predictions(items, [ll for ll, _ in scored[a:b]])
        acc, acc_se = _mean_stderr([r["acc"] for r in rows])
        accn, accn_se = _mean_stderr([r["acc_norm"] for r in rows])
        chance = sum(1 / len(it.choices) for it in items) / len(items)
        results[name] = MCTaskResult(name, len(items), acc, acc_se, accn, accn_se, chance, rows)
    return results


# -- models ---------------------------------------------------------------------------------------
@dataclass
class ScoringModel:
    """A loaded model, its tokenizer (None when the folder has none) and what it was loaded from."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    path: Path
    kind: str  # "hf", "gguf" or one of ROMSCALE_MODEL_KINDS
    closer: Any = None  # something to close when done (a bundle's ROM table)

    def close(self) -> None:
        if self.closer is not None:
            self.closer.close()
            self.closer = None


ROMSCALE_MODEL_KINDS = ("meki-checkpoint", "meki-bundle", "memory-checkpoint", "memory-bundle")
PLAIN_MODEL_KINDS = ("lm-model", "packaged-model")  # romscale-written transformers folders (trainer, model cache)
EXPECTED_MODEL = ("expected a Hugging Face folder, a .gguf file, a romscale training run, a memory (MeKi / PLE / Engram) "
                  "checkpoint or bundle, or a packaged model name")


def resolve_scoring_model(path: str | Path, option: str = "--model") -> tuple[str, Path | str]:
    """(kind, where) for `path`, checked cheaply (no torch). Kinds: "packaged" (a name in
    romscale.models.PACKAGED_MODELS, built into the cache on first use), the romscale memory kinds
    (ROMSCALE_MODEL_KINDS), "hf" or "gguf". A training run folder (`romscale train`: run.json +
    model/) stands for its final model. Raises ModelInputError naming `option`."""
    from romscale.models import PACKAGED_MODELS, resolve_model_source
    from romscale.utils.outputs import MANIFEST, output_kind

    if str(path) in PACKAGED_MODELS:
        return "packaged", str(path)
    p = Path(path).expanduser()
    if p.is_dir() and not (p / MANIFEST).exists() and _is_train_run(p):
        if not (p / "model").is_dir():
            raise ModelInputError(f"{option} {p}: is a training run without its final model (model/); "
                                  "finish the run, or give a checkpoint")
        p = p / "model"
    if p.is_dir() and (p / MANIFEST).exists():
        kind = output_kind(p)
        if kind in ROMSCALE_MODEL_KINDS:
            return kind, p.resolve()
        if kind not in PLAIN_MODEL_KINDS:
            raise ModelInputError(f"{option} {p}: is a romscale {kind or 'output with an unreadable manifest'}, not a model; "
                                  f"{EXPECTED_MODEL}")
    src = resolve_model_source(p, option)
    return src.kind, src.path


def _is_train_run(folder: Path) -> bool:
    """A `romscale train` run folder: run.json marked as a romscale "train-run" output."""
    from romscale.utils.outputs import JSON_MARKER, read_json

    if not (folder / "run.json").is_file():
        return False
    try:
        obj = read_json(folder / "run.json", ModelInputError)
    except ModelInputError:
        return False
    return isinstance(obj, dict) and obj.get(JSON_MARKER) == "train-run"


def model_kind(path: str | Path, option: str = "--model") -> str:
    """The kind resolve_scoring_model finds (for checks before any loading)."""
    return resolve_scoring_model(path, option)[0]


def _folder_tokenizer(folder: Path, option: str) -> PreTrainedTokenizerBase | None:
    from romscale.models import TOKENIZER_FILES

    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelInputError(f"{option} {folder}: its tokenizer files could not be loaded: {exc}") from exc


def load_scoring_model(path: str | Path, *, dtype: torch.dtype | None = None, option: str = "--model",
                       device: str | None = None) -> ScoringModel:
    """Load what resolve_scoring_model accepts, in eval mode (float32 unless `dtype`), on `device`
    (default: the GPU when there is one, else the CPU; a bundle stays on the CPU, where its runtime
    reads the ROM table). transformers' loading bars show only when stderr is a terminal."""
    import torch
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        sm = _load(path, dtype, option)
        if sm.kind not in ("meki-bundle", "memory-bundle"):
            sm.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return sm
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load(path: str | Path, dtype: torch.dtype | None, option: str) -> ScoringModel:
    import torch

    kind, where = resolve_scoring_model(path, option)
    if kind == "packaged":
        from romscale.models import packaged_model

        where, kind = packaged_model(str(where), option=option), "hf"
    p = Path(where)
    folder = p if p.is_dir() else p.parent
    dt = dtype or torch.float32
    if kind == "meki-checkpoint":
        from romscale.meki.io import load_meki

        return ScoringModel(load_meki(p, dtype=dt), _folder_tokenizer(folder, option), p, kind)
    if kind == "memory-checkpoint":
        from romscale.meki.io import load_memories

        return ScoringModel(load_memories(p, dtype=dt), _folder_tokenizer(folder, option), p, kind)
    if kind in ("meki-bundle", "memory-bundle"):
        from romscale.rom.runtime import load_bundle, load_memory_bundle

        b = (load_bundle if kind == "meki-bundle" else load_memory_bundle)(p, dtype=dt)
        return ScoringModel(b.model, _folder_tokenizer(folder, option), p, kind, closer=b)
    from romscale.models import load_causal_lm

    model, tok = load_causal_lm(p, dtype=dt, option=option)
    return ScoringModel(model.eval(), tok, p, kind)
