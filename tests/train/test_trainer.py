"""The trainer (romscale.train): schedule, stream, accumulation, kill -9 + resume, DDP, CLI, on a tiny
Llama (2 layers, d 32) and a tiny synthetic corpus written in the corpus format."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_usage_error, hf_tokenizer

from romscale.data.corpus import (
    CORPUS_FILE,
    CORPUS_FORMAT,
    CORPUS_KIND,
    CORPUS_VERSION,
    open_corpus,
)
from romscale.errors import CheckpointError
from romscale.train.config import config_from_dict
from romscale.train.stream import TokenBlocks, TrainStream, slice_start, val_batches
from romscale.train.trainer import lr_at, train
from romscale.utils.outputs import output_dir

REPO = Path(__file__).resolve().parents[2]
VOCAB = 96


def write_tiny_corpus(folder: Path, train_tokens: int = 6000, val_tokens: int = 800, shard_tokens: int = 2500) -> Path:
    """A corpus folder as `romscale data corpus` writes it: uint16 shards (train split over several),
    corpus.json and the tokenizer. The text is a noisy repeating pattern, so a model can learn it."""
    rng = np.random.default_rng(0)

    def tokens(n: int) -> np.ndarray:
        base = np.arange(n) * 7 % 41 + 3
        noise = rng.integers(3, VOCAB, n)
        return np.where(rng.random(n) < 0.2, noise, base).astype("<u2")

    with output_dir(folder, kind=CORPUS_KIND) as o:
        hf_tokenizer().save_pretrained(o.path / "tokenizer")
        splits = {}
        for name, n in (("train", train_tokens), ("val", val_tokens)):
            ids, shards = tokens(n), []
            for k, s in enumerate(range(0, n, shard_tokens)):
                part = ids[s:s + shard_tokens]
                (o.path / f"{name}-{k:05d}.bin").write_bytes(part.tobytes())
                shards.append({"name": f"{name}-{k:05d}.bin", "tokens": int(part.size)})
            splits[name] = {"docs": 1, "tokens": n, "shards": shards}
        info = {"format": CORPUS_FORMAT, "version": CORPUS_VERSION, "dtype": "<u2", "vocab_size": VOCAB, "eos_id": 1,
                "eos_token": "<|endoftext|>", "tokenizer": {"kind": "bpe", "folder": "tokenizer"}, "splits": splits}
        (o.path / CORPUS_FILE).write_text(json.dumps(info))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses (OMP_NUM_THREADS=1): the kill test compares
    bits across processes, and on a shared 2-core machine one thread is also much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "c")


def tiny_cfg(corpus: Path, **over) -> dict:
    cfg = {
        "seed": 3, "steps": 12, "precision": "fp32", "log_every": 2, "eval_every": 4, "save_every": 4, "progress": False,
        "model": {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "kv_heads": 2},
        "data": {"corpus": str(corpus), "seq_len": 16, "batch_size": 4, "grad_accum": 1, "val_blocks": 8, "val_batch_size": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "min_lr_ratio": 0.1},
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg


def curve(run: Path) -> list[dict]:
    """The metrics rows without the wall-clock fields (which no two runs share)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "step_seconds")} for r in rows]


def final_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoint" / "model.safetensors"))


def quiet(_msg: str) -> None:
    pass


# -- pieces -----------------------------------------------------------------------------------------
def test_schedule_warmup_cosine_floor(corpus):
    cfg = config_from_dict(tiny_cfg(corpus, steps=21, optim={"lr": 1.0, "warmup_steps": 4, "min_lr_ratio": 0.25}))
    lrs = [lr_at(s, cfg) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and math.isclose(lrs[-1], 0.25)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # monotone after warm-up
    assert math.isclose(lrs[12], 0.625)  # half-way through the cosine: half-way between peak and floor


def test_stream_is_deterministic_sliced_and_spans_shards(corpus):
    c = open_corpus(corpus)
    blocks = TokenBlocks(c.train, 16)
    assert len(c.train) == 3 and blocks.n_blocks == 6000 // 16
    flat = np.concatenate([np.asarray(m) for m in c.train]).astype(np.int64)
    i = 2500 // 16  # block 156 covers tokens 2496..2511: it spans the first two shards
    assert np.array_equal(blocks.block(i), flat[i * 16:(i + 1) * 16])
    a, b = TrainStream(blocks, seed=5), TrainStream(blocks, seed=5)
    ids = a.block_ids(0, 2 * blocks.n_blocks)
    assert np.array_equal(ids, b.block_ids(0, 2 * blocks.n_blocks))
    assert sorted(ids[:blocks.n_blocks]) == list(range(blocks.n_blocks))  # an epoch visits each block once
    assert not np.array_equal(ids[:blocks.n_blocks], ids[blocks.n_blocks:])  # a new order each epoch
    assert not np.array_equal(ids[:50], TrainStream(blocks, seed=6).block_ids(0, 50))
    # the slices of 2 processes x 2 micro-batches of 2 tile the global batch of 8 exactly once
    starts = sorted(slice_start(m, 2, r, 2) for m in range(2) for r in range(2))
    assert starts == [0, 2, 4, 6]
    a.samples = 8
    got = torch.cat([a.step_batch(8, m, 2, r, 2) for m in range(2) for r in range(2)])
    want = blocks.batch(b.block_ids(8, 8))  # global samples 8..15
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    # validation: the same first blocks, an equal share per process (collective forwards stay in step)
    val = TokenBlocks(c.val, 16)
    shares = [torch.cat(val_batches(val, 8, 3, r, 3)) for r in range(3)]
    assert [len(x) for x in shares] == [2, 2, 2]
    assert torch.equal(torch.cat(shares), val.batch(range(6)))
    assert torch.equal(torch.cat(val_batches(val, 8, 3, 0, 1)), val.batch(range(8)))


def test_weight_decay_groups_nanogpt_rule(corpus):
    from romscale.train.build import build_model, param_groups

    cfg = config_from_dict(tiny_cfg(corpus, model={"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "kv_heads": 2,
                                                   "memory": "meki", "meki": {"d_mem": 8}}))
    model = build_model(cfg, VOCAB, 1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, decay_tables=True))
    assert "model.embed_tokens.weight" in decay and "model.layers.0.self_attn.q_proj.weight" in decay
    assert "model.layers.0.meki.memory.static.weight" in decay
    assert "model.norm.weight" in no_decay and "model.layers.0.meki.memory.alpha" in no_decay
    decay2, no_decay2 = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, decay_tables=False))
    assert {"model.embed_tokens.weight", "model.layers.0.meki.memory.static.weight"} <= no_decay2
    assert "model.layers.0.self_attn.q_proj.weight" in decay2
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


# -- the loop ---------------------------------------------------------------------------------------
def test_train_learns_writes_run_and_loads(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from romscale.train.checkpoint import load_trained_model

    run = tmp_path / "run"
    s = train(config_from_dict(tiny_cfg(corpus, steps=30, eval_every=10, optim={"lr": 1e-2, "warmup_steps": 3})), run, log=quiet)
    rows = curve(run)
    assert [r["step"] for r in rows] == list(range(2, 31, 2))
    assert {"step", "loss", "lr", "tokens", "grad_norm"} <= set(rows[0]) and rows[-1]["tokens"] == 30 * 4 * 16
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.3 and vals[0] < math.log(VOCAB) + 0.5
    assert s["final_val_loss"] == vals[-1]
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["romscale_output"] == "train-run" and run_json["status"] == "done"
    # the checkpoint's model and the exported transformers folder are the trained model
    m = load_trained_model(run)
    hf = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    x = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        assert torch.allclose(m(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-6)
    # a finished run is not silently reused
    with pytest.raises(Exception, match="--resume"):
        train(config_from_dict(tiny_cfg(corpus)), run, log=quiet)


def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
    a = train(config_from_dict(tiny_cfg(corpus, steps=6, data__batch_size=4, data__grad_accum=2)), tmp_path / "a", log=quiet)
    b = train(config_from_dict(tiny_cfg(corpus, steps=6, data__batch_size=8, data__grad_accum=1)), tmp_path / "b", log=quiet)
    assert a["global_batch"] == b["global_batch"] == 8
    sa, sb = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5, rtol=1e-4), k
    la, lb = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert np.allclose([r["loss"] for r in la], [r["loss"] for r in lb], atol=1e-5)
    # and a different batch really changes the result (the comparison can fail)
    c = train(config_from_dict(tiny_cfg(corpus, steps=6, data__batch_size=4)), tmp_path / "c", log=quiet)
    assert not np.allclose([r["loss"] for r in curve(tmp_path / "c")], [r["loss"] for r in la], atol=1e-5)
    assert c["global_batch"] == 4


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("ROMSCALE_DEBUG", None)
    return env


def test_kill9_and_resume_reproduces_the_curve(corpus, tmp_path):
    import yaml

    from romscale.train.checkpoint import run_status
    from romscale.utils.outputs import OutputError

    over = dict(steps=60, log_every=1, eval_every=5, save_every=5, data__batch_size=2)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_cfg(corpus, **over)))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train(config_from_dict(tiny_cfg(corpus, **over)), ref, log=quiet)  # uninterrupted, in this process

    cmd = [sys.executable, "-m", "romscale", "train", str(cfg_file), "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "checkpoint" / "romscale_manifest.json"
    deadline = time.time() + 90
    while not manifest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    k = json.loads(manifest.read_text())["step"]
    assert 5 <= k < 60, k  # killed mid-run, after at least one checkpoint
    assert not (killed / "model").exists()
    with pytest.raises(OutputError, match="--resume"):  # an unfinished run is not restarted by accident
        run_status(killed, resume=False, overwrite=False)

    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming at step {k}" in r.stderr
    assert curve(killed) == curve(ref)  # bitwise: every loss, lr, grad norm and val loss
    a, b = final_state(ref), final_state(killed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_a_changed_config(corpus, tmp_path):
    run = tmp_path / "run"
    train(config_from_dict(tiny_cfg(corpus, steps=4)), run, log=quiet)
    with pytest.raises(CheckpointError, match="optim.lr"):
        train(config_from_dict(tiny_cfg(corpus, steps=4, optim={"lr": 1e-2, "warmup_steps": 3})), run, resume=True, log=quiet)
    # --overwrite starts again; what romscale did not write in the folder is kept
    (run / "notes.txt").write_text("mine")
    train(config_from_dict(tiny_cfg(corpus, steps=2, save_every=1)), run, overwrite=True, log=quiet)
    assert [r["step"] for r in curve(run)] == [2] and (run / "notes.txt").read_text() == "mine"


def test_ddp_two_processes_match_one(corpus, tmp_path):
    import yaml

    two = tmp_path / "cfg2.yaml"
    two.write_text(yaml.safe_dump(tiny_cfg(corpus, steps=6, data__batch_size=2)))
    train(config_from_dict(tiny_cfg(corpus, steps=6, data__batch_size=4)), tmp_path / "r1", log=quiet)  # 1 process x 4
    port = 29500 + os.getpid() % 2000
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", str(port), "-m", "romscale", "train", str(two), "--out", str(tmp_path / "r2")],
                        env=_env(), capture_output=True, text=True, timeout=180)
    assert r2.returncode == 0, r2.stderr[-3000:]
    s2 = json.loads((tmp_path / "r2" / "run.json").read_text())
    assert s2["processes"] == 2 and s2["global_batch"] == 4
    a, b = final_state(tmp_path / "r1"), final_state(tmp_path / "r2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert np.allclose([r["loss"] for r in curve(tmp_path / "r1")], [r["loss"] for r in curve(tmp_path / "r2")], atol=1e-5)


def test_meki_model_trains_and_exports_a_meki_checkpoint(corpus, tmp_path):
    from romscale.meki.io import load_meki

    cfg = tiny_cfg(corpus, steps=4, model={"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "kv_heads": 2,
                                           "memory": "meki", "meki": {"d_mem": 8, "layers": [1]}})
    s = train(config_from_dict(cfg), tmp_path / "run", log=quiet)
    assert s["memory"] == "meki" and math.isfinite(s["final_val_loss"])
    loaded = load_meki(tmp_path / "run" / "model")
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    assert any(".meki." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("memory", ["ple", "engram", "fat"])
def test_every_memory_trains_at_a_matched_rom_budget(corpus, tmp_path, memory):
    """The same trainer for PLE / Engram / fat: sized by model.rom_params (the matched-arms knob),
    trained, exported as a memory checkpoint whose ROM is within a few % of the budget."""
    from romscale.meki.io import load_memories
    from romscale.memories.base import attached_memories

    budget = 2400  # below the fat embedding's ceiling |V| x d on this tiny model
    model_cfg = {"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "kv_heads": 2, "memory": memory, "rom_params": budget}
    s = train(config_from_dict(tiny_cfg(corpus, steps=3, model=model_cfg)), tmp_path / "run", log=quiet)
    assert s["memory"] == memory and math.isfinite(s["final_val_loss"])
    model = load_memories(tmp_path / "run" / "model")
    (mem,) = attached_memories(model)
    assert mem.name == memory
    rom = mem.rom_params(mem.config_of(model), model.config)
    assert abs(rom - budget) / budget < 0.1, rom


def test_retrofit_continues_a_pretrained_model_with_meki(corpus, tmp_path):
    """model.init_from: the pretrained weights are the starting point (a MeKi branch with
    zero-initialised output leaves its first loss equal to the pretrained model's), and a corpus in
    another vocabulary is refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from romscale.utils.config import ConfigError

    torch.manual_seed(5)
    pre = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    pre.save_pretrained(tmp_path / "pre")
    runs = {}
    for memory in ("none", "meki"):
        model = {"init_from": str(tmp_path / "pre"), "memory": memory, "meki": {"d_mem": 8, "zero_init_output": True}}
        cfg = tiny_cfg(corpus, steps=2, log_every=1, eval_every=2, model=model)
        runs[memory] = train(config_from_dict(cfg), tmp_path / f"run-{memory}", log=quiet)
    first = [json.loads(line) for line in (tmp_path / "run-none" / "metrics.jsonl").read_text().splitlines()][0]
    first_meki = [json.loads(line) for line in (tmp_path / "run-meki" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] == pytest.approx(first_meki["loss"], rel=1e-6)  # same start: the retrofit is exact at step 0
    pre.resize_token_embeddings(VOCAB + 8)
    pre.save_pretrained(tmp_path / "pre2")
    cfg = tiny_cfg(corpus, steps=2, model={"init_from": str(tmp_path / "pre2")})
    with pytest.raises(ConfigError, match="vocabulary"):
        train(config_from_dict(cfg), tmp_path / "run-bad", log=quiet)


def test_memory_options_are_checked(corpus, tmp_path):
    from romscale.utils.config import ConfigError

    bad = tiny_cfg(corpus, steps=2, model={"layers": 2, "hidden": 32, "ffn": 64, "heads": 4, "kv_heads": 2,
                                           "memory": "ple", "memory_options": {"d_plee": 4}})
    with pytest.raises(ConfigError, match="d_plee"):
        train(config_from_dict(bad), tmp_path / "run", log=quiet)


# -- CLI --------------------------------------------------------------------------------------------
def test_cli_train_and_usage_errors(cli, corpus, tmp_path):
    import yaml

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_cfg(corpus, steps=2)))
    r = cli("train", cfg_file, "--out", tmp_path / "run", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["romscale_output"] == "report" and s["steps"] == 2 and s["global_batch"] == 4
    assert_usage_error(cli("train", cfg_file, "--out", tmp_path / "run"), "--resume")
    assert_usage_error(cli("train", cfg_file), "--out")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x.txt").write_text("x")
    assert_usage_error(cli("train", cfg_file, "--out", mine), "not a romscale training run")
    assert_usage_error(cli("train", cfg_file, "--out", corpus / "run"), "lies inside the input")
    assert not (corpus / "run").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_cfg(corpus), "data": {**tiny_cfg(corpus)["data"], "corpus": str(tmp_path / "nope")}}))
    assert_usage_error(cli("train", bad, "--out", tmp_path / "r3"), "data.corpus")
