"""The model-backed loss D2C optimises: mean target-token cross-entropy of a task's first n
validation examples under an adapter, through one loaded base model (romscale.eval).

- mode="factored" (default): the adapter goes into the AdapterSlot as factors (`slot.set`), and
  every task asked for in one call is scored in shared batches (the adapter is the same) or, with
  `share_prefix` (the default on a CPU), task by task with each task's common prompt prefix run
  once (romscale.eval.prefix): on a CPU tokens cost, on an accelerator batches pay;
- mode="plain": the reference path: the slot off, the adapter's dense update added to the base
  weights and removed again, one task at a time (`slot.merged_into_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from romscale.adapters.clusterers import LossFn
from romscale.errors import RomscaleError

if TYPE_CHECKING:
    from romscale.adapters.peft_io import LoraAdapter

Mode = Literal["factored", "plain"]


def loss_examples(bank: Any, tasks: Sequence[str], n: int, split: str = "val") -> dict[str, list]:
    """The first `n` examples of each task's `split` (file order); a task with none is an error."""
    if n < 1:
        raise RomscaleError(f"the number of loss examples per task must be >= 1; got {n}")
    out = {}
    for name in tasks:
        exs = list(bank.task(name).examples(split, limit=n))
        if not exs:
            raise RomscaleError(f"task {name!r} has no {split} examples in the task bank {getattr(bank, 'path', '')}; "
                                f"D2C needs a few labelled examples per task")
        out[name] = exs
    return out


def model_loss(evaluator: Any, bank: Any, n: int = 10, mode: Mode = "factored", tasks: Sequence[str] | None = None,
               split: str = "val", share_prefix: bool | None = None) -> LossFn:
    """loss(tasks, adapter) -> [mean CE per task] on each task's first n `split` examples, for
    D2C's ClusterProblem. `evaluator` is a romscale.eval.generate.TaskEvaluator (its `.slot` is
    used); `bank` a romscale.data.taskbank.TaskBank. Examples are read once, here. `share_prefix`
    (factored mode only; None: on when the evaluator runs on the CPU) runs each task's shared
    prompt prefix once per call."""
    if mode not in ("factored", "plain"):
        raise RomscaleError(f"loss mode must be 'factored' or 'plain'; got {mode!r}")
    names = list(tasks) if tasks is not None else list(bank.names)
    examples = loss_examples(bank, names, n, split)
    task_of = {name: bank.task(name) for name in names}
    slot = evaluator.slot
    if share_prefix is None:
        share_prefix = getattr(evaluator, "device", torch.device("cpu")).type == "cpu"

    def items(which: Sequence[str]) -> list[tuple[Any, list]]:
        unknown = [t for t in which if t not in examples]
        if unknown:
            raise RomscaleError(f"no loss examples for tasks {unknown}; known: {names}")
        return [(task_of[t], examples[t]) for t in which]

    def factored(which: list[str], adapter: LoraAdapter) -> list[float]:
        slot.set(adapter)
        return list(evaluator.losses(items(which), share_prefix=share_prefix))

    def plain(which: list[str], adapter: LoraAdapter) -> list[float]:
        slot.set(None)
        out: list[float] = []
        for item in items(which):
            with slot.merged_into_weights(adapter):
                out.extend(evaluator.losses([item]))
        return out

    return factored if mode == "factored" else plain
