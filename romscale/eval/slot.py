"""AdapterSlot: one PEFT LoRA slot in a loaded base model that any adapter is copied into.

    slot = AdapterSlot(model, rank=16)     # wraps `model` with PEFT once (in place)
    slot.set(adapter)                      # factors copied in: trained, merged or HydraOpt adapters alike
    slot.set(None)                         # the base model, exactly (LoRA layers switched off)
    with slot.merged_into_weights(adapter):   # the plain path: W + s*B@A in the weights, restored after
        ...

The slot has rank R and scaling 1 (lora_alpha = R); an adapter of rank r <= R is copied in with its
scaling folded into B and zero-padded to R (the padded rows and columns add exactly zero), so
adapters of any rank and alpha, rank_pattern and rsLoRA included, run in factored form without
reloading the model or re-injecting layers. Modules the adapter does not adapt get zero factors.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from romscale.errors import AdapterError

if TYPE_CHECKING:
    from peft import PeftModel

    from romscale.adapters.peft_io import LoraAdapter

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_SLOT = "default"


class AdapterSlot:
    """A rank-`rank` LoRA slot on `target_modules` of `model` (wrapped in place, once)."""

    def __init__(self, model: torch.nn.Module, target_modules: Sequence[str] = QKVO, rank: int = 16) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model
        from peft.tuners.lora import LoraLayer

        if isinstance(model, PeftModel) or any(isinstance(m, LoraLayer) for m in model.modules()):
            raise AdapterError("the model already holds LoRA layers; give AdapterSlot the plain base model")
        if rank < 1:
            raise AdapterError(f"the slot rank must be >= 1; got {rank}")
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), lora_dropout=0.0,
                         init_lora_weights=True, inference_mode=True)
        try:
            self.peft_model: PeftModel = get_peft_model(model, cfg)
        except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
            raise AdapterError(f"cannot put a LoRA slot on {list(target_modules)}: {exc}") from exc
        self.base: torch.nn.Module = self.peft_model.get_base_model()
        self.rank = rank
        self.target_modules = tuple(target_modules)
        self.layers: dict[str, LoraLayer] = {n: m for n, m in self.base.named_modules() if isinstance(m, LoraLayer)}
        self.current: str | None = None
        self.set(None)

    # -- setting adapters ---------------------------------------------------------------------
    def _check(self, adapter: LoraAdapter) -> None:
        where = adapter.source or adapter.name
        extra = sorted(set(adapter.modules) - set(self.layers))
        if extra:
            raise AdapterError(
                f"adapter {where}: adapts modules the base model's slot does not have ({extra[:3]}"
                f"{'...' if len(extra) > 3 else ''}); the slot covers {list(self.target_modules)} of this base model: "
                "was the adapter trained on another base model or other target modules?"
            )
        for name, lm in adapter.modules.items():
            base = self.layers[name].get_base_layer()
            if (lm.d_out, lm.d_in) != (base.out_features, base.in_features):
                raise AdapterError(
                    f"adapter {where}: module {name} is {lm.d_out}x{lm.d_in} (d_out x d_in) but the base model's is "
                    f"{base.out_features}x{base.in_features}; the adapter belongs to another base model"
                )
            if lm.r > self.rank:
                raise AdapterError(f"adapter {where}: module {name} has rank {lm.r}, more than the slot's {self.rank}; "
                                   "make the slot with a larger rank (AdapterSlot(rank=...))")

    @torch.no_grad()
    def set(self, adapter: LoraAdapter | None) -> None:
        """Put `adapter` in the slot (factors copied in place), or None for the base model."""
        if adapter is None:
            self.peft_model.base_model.disable_adapter_layers()
            self.current = None
            return
        self._check(adapter)
        for name, layer in self.layers.items():
            A = layer.lora_A[_SLOT].weight  # (R, d_in)
            B = layer.lora_B[_SLOT].weight  # (d_out, R)
            A.zero_()
            B.zero_()
            lm = adapter.modules.get(name)
            if lm is not None:
                A[: lm.r].copy_(lm.A.to(torch.float32))
                B[:, : lm.r].copy_(lm.B.to(torch.float32) * lm.scaling)
        self.peft_model.base_model.enable_adapter_layers()
        self.current = adapter.name

    @contextlib.contextmanager
    def merged_into_weights(self, adapter: LoraAdapter) -> Iterator[None]:
        """Run the base model with `adapter`'s dense update added to its weights (the slot off);
        every weight is restored bit for bit afterwards, and the slot's previous state with it."""
        self._check(adapter)
        saved: dict[str, torch.Tensor] = {}
        enabled = self.current is not None
        self.peft_model.base_model.disable_adapter_layers()
        try:
            with torch.no_grad():
                for name, lm in adapter.modules.items():
                    w = self.layers[name].get_base_layer().weight
                    saved[name] = w.detach().clone()
                    w.add_(lm.delta(torch.float32).to(device=w.device, dtype=w.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, w0 in saved.items():
                    self.layers[name].get_base_layer().weight.copy_(w0)
            if enabled:
                self.peft_model.base_model.enable_adapter_layers()
