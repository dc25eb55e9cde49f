"""Data preparation and the trainer, on tiny inputs."""

import pytest
import torch

from conftest import tiny_base
from romscale.errors import RomscaleError
from romscale.meki.attach import attach_meki
from romscale.meki.config import MekiConfig
from romscale.train.data import make_blocks, train_tokenizer
from romscale.train.loop import TrainConfig, evaluate_loss, train_lm

TEXTS = [
    "To be, or not to be, that is the question. " * 20,
    "Whether 'tis nobler in the mind to suffer the slings and arrows. " * 20,
    "Now is the winter of our discontent made glorious summer. " * 20,
    "All the world's a stage, and all the men and women merely players. " * 20,
]


def test_tokenizer_and_blocks_split_by_document(tmp_path):
    tok = train_tokenizer(TEXTS, vocab_size=300, out_dir=tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    assert tok.decode(tok("To be, or not")["input_ids"]) == "To be, or not"
    blocks = make_blocks(TEXTS, tok, block_size=16, val_fraction=0.25)
    assert blocks.train.shape[1] == blocks.val.shape[1] == 16
    assert blocks.train.max() < len(tok)
    with pytest.raises(RomscaleError, match="shorter than one block"):
        make_blocks(["hi", "yo"], tok, block_size=512, val_fraction=0.5)


def test_train_lm_lowers_validation_loss():
    torch.manual_seed(0)
    data = torch.randint(3, 20, (64, 16))  # a small vocabulary subset: learnable quickly
    model = tiny_base("llama")
    attach_meki(model, MekiConfig(d_mem=8))
    start = evaluate_loss(model, data[:8])
    res = train_lm(model, data[8:], data[:8], TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=10, progress=False))
    assert len(res.losses) == 30 and [s for s, _ in res.val] == [10, 20, 30]
    assert res.final_val_loss < start - 0.5
