"""Token blocks streamed from a corpus's memory-mapped shards (romscale.data.corpus.open_corpus).

A split's shards are one virtual token array cut into non-overlapping blocks of `seq_len` tokens
(a block may span two shards; the tail shorter than a block is unused). Training visits the blocks
in epochs, each a permutation drawn from numpy's PCG64 seeded with (seed, epoch), so the block seen
at global sample index g is a pure function of (seed, g): the data position is one integer, the
number of samples consumed, and resuming or changing the number of processes cannot change the
order. Each optimiser step takes global samples [step * B, (step + 1) * B) (B = global batch);
micro-batch m of process r reads the slice `slice_indices` gives it, and only those blocks' pages
are read from disk. Only the permutation of block indices (8 bytes per block) is held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from romscale.errors import RomscaleError


class TokenBlocks:
    """Blocks of `seq_len` tokens over a list of memmaps, read on demand."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, what: str = "split") -> None:
        self.shards, self.seq_len = shards, seq_len
        sizes = np.array([s.shape[0] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # token offset of each shard
        self.tokens = int(self.starts[-1])
        self.n_blocks = self.tokens // seq_len
        if self.n_blocks == 0:
            raise RomscaleError(f"the corpus's {what} split has {self.tokens:,} tokens, fewer than one block of "
                                f"data.seq_len = {seq_len}; use a larger corpus or a shorter seq_len")

    def block(self, i: int) -> np.ndarray:
        """Tokens [i * seq_len, (i + 1) * seq_len) as int64, read across shard boundaries."""
        lo = i * self.seq_len
        out = np.empty(self.seq_len, dtype=np.int64)
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        pos = 0
        while pos < self.seq_len:
            a = lo + pos - int(self.starts[k])
            take = min(self.seq_len - pos, self.shards[k].shape[0] - a)
            out[pos:pos + take] = self.shards[k][a:a + take]
            pos += take
            k += 1
        return out

    def batch(self, blocks: np.ndarray | list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.block(int(i)) for i in blocks]))


@dataclass
class StreamState:
    """Where the training stream stands: the next global sample index (plus what it depends on)."""

    samples: int = 0
    seed: int = 0
    seq_len: int = 0
    n_blocks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class TrainStream:
    """The deterministic, resumable order of training blocks."""

    def __init__(self, blocks: TokenBlocks, seed: int, samples: int = 0) -> None:
        self.blocks, self.seed, self.samples = blocks, seed, samples
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.blocks.n_blocks)
            self._epoch = epoch
        return self._perm

    def block_ids(self, first: int, count: int) -> np.ndarray:
        """Block indices of global samples first .. first + count - 1."""
        n = self.blocks.n_blocks
        out = np.empty(count, dtype=np.int64)
        for j, g in enumerate(range(first, first + count)):
            out[j] = self._order(g // n)[g % n]
        return out

    def step_batch(self, global_batch: int, micro: int, micro_batch: int, rank: int, world: int) -> torch.Tensor:
        """This process's micro-batch `micro` of the step starting at `self.samples`."""
        first = self.samples + slice_start(micro, micro_batch, rank, world)
        return self.blocks.batch(self.block_ids(first, micro_batch))

    def advance(self, global_batch: int) -> None:
        self.samples += global_batch

    @property
    def epoch(self) -> float:
        return self.samples / self.blocks.n_blocks

    def state(self) -> StreamState:
        return StreamState(self.samples, self.seed, self.blocks.seq_len, self.blocks.n_blocks)

    def restore(self, state: dict[str, Any], where: str) -> None:
        mine = self.state().to_dict()
        for key in ("seed", "seq_len", "n_blocks"):
            if state.get(key) != mine[key]:
                raise RomscaleError(f"{where}: the checkpoint's data stream has {key} = {state.get(key)!r}, this run "
                                    f"{mine[key]!r}; resume with the same corpus, data.seq_len and seed")
        if not isinstance(state.get("samples"), int) or state["samples"] < 0:
            raise RomscaleError(f"{where}: data position 'samples' must be a non-negative integer")
        self.samples = state["samples"]


def slice_start(micro: int, micro_batch: int, rank: int, world: int) -> int:
    """Offset, inside a step's global batch, of process `rank`'s micro-batch `micro`."""
    return (micro * world + rank) * micro_batch


def val_batches(blocks: TokenBlocks, count: int, batch_size: int, rank: int, world: int) -> list[torch.Tensor]:
    """This process's share of the fixed validation set: the first `count` blocks (at most all of
    them, rounded down to a multiple of `world`), in order, an equal share per process, so that every
    process runs the same number of forwards (DDP and FSDP forwards are collective)."""
    per = min(count, blocks.n_blocks) // world
    if per == 0:
        raise RomscaleError(f"the corpus's validation split has {blocks.n_blocks} block(s) of {blocks.seq_len} tokens, fewer "
                            f"than the {world} processes; use a larger corpus or a shorter data.seq_len")
    mine = list(range(rank * per, (rank + 1) * per))
    return [blocks.batch(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
