"""lm-evaluation-harness drives a romscale model: `RomscaleLM`, an lm_eval `TemplateLM`.

Needs the optional extra: `pip install 'romscale[eval]'` (lm-eval). Importing this module registers
the model under the name "romscale", so lm_eval can build it from a path too:

    import lm_eval
    from romscale.eval.harness import RomscaleLM

    lm = RomscaleLM.from_path("runs/meki-ckpt")          # HF folder, .gguf, MeKi checkpoint or bundle
    out = lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=...)
    # or: simple_evaluate(model="romscale", model_args="pretrained=runs/meki-ckpt,batch_size=8", ...)

The three request types:
- `loglikelihood`: lm_eval's own TemplateLM tokenisation (context/continuation split, empty
  context), then romscale.eval.mc.score_continuations (batched, one forward per batch): the same
  code `romscale eval mc` scores with, so both give the same numbers on the same data;
- `loglikelihood_rolling`: lm_eval's rolling windows (utils.get_rolling_token_windows with
  context_len=1, made disjoint), each window scored as a continuation, summed per document;
- `generate_until`: batched greedy or sampled `model.generate` with left padding and lm_eval's stop
  sequences (its stopping criteria and post-processing), `max_gen_toks` tokens at most.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from romscale.errors import RomscaleError

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.models.utils_hf import stop_sequences_criteria
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise RomscaleError(f"romscale.eval.harness needs lm-evaluation-harness: pip install 'romscale[eval]' ({exc})") from exc

from romscale.eval.mc import (
    ScoringModel, load_scoring_model, model_max_length, prefix_token_id, score_continuations, tok_encode,
)

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = ["RomscaleLM"]


@register_model("romscale")
class RomscaleLM(TemplateLM):
    """A loaded causal LM (any HF model, MeKi included) as an lm_eval model."""

    def __init__(
        self, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None, *,
        pretrained: str | os.PathLike | None = None, dtype: str | None = None, batch_size: int | str = 16,
        max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
    ) -> None:
        """`model` + `tokenizer`, or `pretrained` (a path load_scoring_model takes; `dtype` e.g.
        "bfloat16", default float32). `batch_size`: requests per forward ("auto" and lm_eval's
        `max_batch_size` are accepted and mean the default, 16)."""
        super().__init__()
        self._owned: ScoringModel | None = None
        if model is None:
            if pretrained is None:
                raise RomscaleError("RomscaleLM needs a model (and tokenizer) or pretrained=PATH")
            import torch

            dt = getattr(torch, dtype, None) if dtype else None
            if dtype and not isinstance(dt, torch.dtype):
                raise RomscaleError(f"RomscaleLM: dtype={dtype!r} is not a torch dtype (float32, bfloat16, float16)")
            self._owned = load_scoring_model(pretrained, dtype=dt, option="pretrained")
            model, tokenizer = self._owned.model, self._owned.tokenizer
        if tokenizer is None:
            raise RomscaleError("RomscaleLM needs a tokenizer (the model folder has none)")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        # lm_eval passes batch_size from its CLI as a string
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.max_gen_toks = max_gen_toks
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_path(cls, path: str | os.PathLike, **kwargs: Any) -> RomscaleLM:
        """Load what romscale.eval.mc.load_scoring_model takes: a packaged model name, an HF
        folder, a .gguf file, a training run, a memory checkpoint or a deploy bundle."""
        return cls(pretrained=path, **kwargs)

    def close(self) -> None:
        """Release what loading opened (a deploy bundle's ROM table)."""
        if self._owned is not None:
            self._owned.close()

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_token_id is None:
            raise RomscaleError("the tokenizer has no EOS token; lm_eval needs one to end documents and generations")
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return tok_encode(self.tokenizer, string, add_special_tokens)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        scored = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size,
                                     max_length=self.max_length, progress=not disable_tqdm)
        for (key, _, _), result in zip(requests, scored):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scored):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import torch

        results: list[str | None] = [None] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        # Batch requests that share generation settings, longest context first.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise RomscaleError(f"max_gen_toks {max_gen} leaves no room for a context in {self.max_length} tokens")
            if not kwargs.get("do_sample"):
                kwargs.pop("temperature", None)
                kwargs["do_sample"] = False
            encoded = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] for i in idx}
            order = sorted(idx, key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for r, i in enumerate(batch):  # left padding: every row's next token comes at the end
                    n = len(encoded[i])
                    ids[r, width - n:] = torch.tensor(encoded[i])
                    mask[r, width - n:] = 1
                stopping = stop_sequences_criteria(self.tokenizer, until, width, len(batch))
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                              max_new_tokens=max_gen, stopping_criteria=stopping,
                                              pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **kwargs)
                for r, i in enumerate(batch):
                    text = self.tok_decode(out[r, width:].tolist())
                    results[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results  # type: ignore[return-value]
