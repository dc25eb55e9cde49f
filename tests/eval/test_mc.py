"""Zero-shot multiple choice: lm_eval's tokenisation rule, batched scoring against a one-by-one
reference, acc / acc_norm, local MC files, BIG-bench formatting, MeKi checkpoints, the CLI."""

import json

import pytest
import torch

from conftest import assert_usage_error, hf_tokenizer, randomize_meki, tiny_base
from romscale.eval.mc import (
    MCItem, encode_pair, encode_request, evaluate_mc, load_scoring_model, mc_requests, predictions, score_continuations,
)
from romscale.eval.mc_data import BIGBENCH_MC_TASKS, MCDataError, bigbench_item, load_mc_file, parse_mc_records

WORDS = ["the cat", "a dog", "sat on", "the mat", "hello there", "quick brown", "fox jumps", "over it"]


def _items(n=9):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        w = [WORDS[j] for j in torch.randint(0, len(WORDS), (3,), generator=g).tolist()]
        choices = ("yes", "no", w[2] + " " + w[0])[: 2 + i % 2]
        out.append(MCItem(f"q{i}", f"{w[0]} {w[1]}, {i}?", choices, i % len(choices)))
    return out


def _reference(model, ctx, cont):
    """log p(cont | ctx) from one unpadded forward of ctx + cont."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding():
    tok = hf_tokenizer()
    ctx, cont = encode_pair(tok, "the cat ", "sat")
    assert ctx == tok.encode("the cat", add_special_tokens=False)
    assert ctx + cont == tok.encode("the cat sat", add_special_tokens=False)
    # a merge across the boundary (" t" is one token): split of the whole string, not " t" alone
    whole = tok.encode("ab the", add_special_tokens=False)
    ctx, cont = encode_pair(tok, "ab", " the")
    assert ctx + cont == whole and cont == whole[len(ctx):]
    # empty context: conditioned on BOS
    ctx, cont = encode_request(tok, "", "hello")
    assert ctx == [tok.bos_token_id] and cont == tok.encode("hello", add_special_tokens=False)


def test_batched_scores_equal_one_by_one_reference_in_any_batch_size():
    model, tok = tiny_base(), hf_tokenizer()
    reqs = mc_requests(tok, _items())
    ref = [_reference(model, c, x) for c, x in reqs]
    for bs in (1, 4, 64):
        got = score_continuations(model, reqs, batch_size=bs)
        assert [round(g, 4) for g, _ in got] == [round(r, 4) for r in ref], bs
    # is_greedy: a continuation made of the greedy tokens is greedy
    ctx = reqs[0][0]
    with torch.no_grad():
        nxt = model(torch.tensor([ctx])).logits[0, -1].argmax().item()
    assert score_continuations(model, [(ctx, [nxt])])[0][1] is True
    assert score_continuations(model, [(ctx, [(nxt + 1) % 96])])[0][1] is False


def test_long_inputs_keep_their_tail_as_lm_eval_does():
    model = tiny_base()
    ctx, cont = list(range(3, 40)), [5, 6, 7]
    got = score_continuations(model, [(ctx, cont)], max_length=10)[0][0]
    tail = (ctx + cont)[-11:]
    assert got == pytest.approx(_reference(model, tail[:-3], cont), abs=1e-5)


def test_acc_and_acc_norm_follow_lm_eval():
    items = [MCItem("a", "q", ("a", "bbbbbb"), 1), MCItem("b", "q", ("x", "y", "z"), 0)]
    rows = predictions(items, [-3.0, -6.0, -1.0, -1.0, -2.0])
    assert (rows[0]["pred"], rows[0]["pred_norm"]) == (0, 1)  # -3/1 < -6/6: length normalisation flips it
    assert (rows[0]["acc"], rows[0]["acc_norm"]) == (0.0, 1.0)
    assert rows[1]["pred"] == 0 and rows[1]["acc"] == 1.0  # a tie goes to the first choice
    with pytest.raises(ValueError):
        predictions(items, [-1.0] * 4)


def test_tasks_scored_together_equal_tasks_scored_alone():
    model, tok = tiny_base(), hf_tokenizer()
    items = _items(8)
    together = evaluate_mc(model, tok, {"a": items[:5], "b": items[5:]}, batch_size=3)
    alone = evaluate_mc(model, tok, {"b": items[5:]}, batch_size=2)
    assert together["b"].items == alone["b"].items
    r = together["a"]
    assert r.n == 5 and r.acc == sum(x["acc"] for x in r.items) / 5
    assert r.chance == pytest.approx(sum(1 / len(i.choices) for i in items[:5]) / 5)


def test_local_files_json_and_jsonl(tmp_path):
    recs = [{"context": "c1", "choices": ["a", "b"], "gold": 1},
            {"query": "c2", "choices": ["x", "y", "z"], "label": "z", "id": "k"},
            {"input": "c3", "target_scores": {"p": 0, "q": 1}}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    (tmp_path / "m.json").write_text(json.dumps({"examples": recs}))
    for f in ("m.jsonl", "m.json"):
        items = load_mc_file(tmp_path / f)
        assert [(i.context, i.choices, i.gold) for i in items] == [("c1", ("a", "b"), 1), ("c2", ("x", "y", "z"), 2),
                                                                   ("c3", ("p", "q"), 1)]
        assert items[1].id == "k"
    assert len(load_mc_file(tmp_path / "m.json", limit=2)) == 2


@pytest.mark.parametrize("content, needle", [
    ('{"context": "c", "choices": ["a", "b"], "gold": 1}\nnot json', "line 2"),
    ('{"context": "c", "choices": ["a"], "gold": 0}', "at least 2"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 5}', "out of range"),
    ('{"context": "c", "choices": ["a", "b"], "gold": "c"}', "neither"),
    ('{"choices": ["a", "b"], "gold": 0}', "context"),
    ('{"input": "c", "target_scores": {"a": 1, "b": 1}}', "one highest"),
    ("", "no records"),
])
def test_bad_local_files_name_the_file_and_record(tmp_path, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(MCDataError) as e:
        load_mc_file(f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_bigbench_format_and_ties():
    task = {"task_prefix": "Decide. ", "example_output_prefix": "\nAnswer: "}
    it = bigbench_item(task, {"input": "Is it?", "target_scores": {"yes": 0, "no": 1}}, "t/0")
    assert it.context == "Decide. \nQ: Is it?\nAnswer:" and it.choices == ("yes", "no") and it.gold == 1
    assert bigbench_item({}, {"input": "x", "target_scores": {"a": 1, "b": 1}}, "t/1") is None
    assert bigbench_item({}, {"input": "x", "target": "a"}, "t/2") is None
    assert parse_mc_records([{"input": "x", "target_scores": {"a": 0.2, "b": 0.9}}], "w")[0].context == "x"


def test_bigbench_tasks_from_the_package_cache():
    from romscale.data.packages import package_dir
    from romscale.eval.mc_data import load_bigbench_mc

    cached = package_dir("bigbench")
    if not (any(cached.glob("bigbench-1.0.0.tar.gz")) or len(list(cached.glob("extracted/bigbench-mc.*"))) == len(BIGBENCH_MC_TASKS)):
        pytest.skip("bigbench==1.0.0 sdist not in the package cache (romscale fetches it with pip on first use)")
    data = load_bigbench_mc(limit=4)
    assert list(data) == list(BIGBENCH_MC_TASKS)
    for name, items in data.items():
        assert len(items) == 4
        for it in items:
            assert len(it.choices) >= 2 and not it.context.endswith(" ") and not it.context.startswith("\n"), name
    assert data["strategyqa"][0].context.startswith("Q: ") and data["strategyqa"][0].context.endswith("\nA:")


def _save_hf(model, folder):
    model.save_pretrained(folder)
    hf_tokenizer().save_pretrained(folder)
    return folder


def test_meki_checkpoint_scores_like_the_model_in_memory(tmp_path):
    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.io import save_meki

    model = tiny_base()
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    save_meki(model, tmp_path / "ck", tokenizer=hf_tokenizer())
    sm = load_scoring_model(tmp_path / "ck")
    assert sm.kind == "meki-checkpoint" and sm.tokenizer is not None
    items = {"t": _items(5)}
    got = evaluate_mc(sm.model, sm.tokenizer, items)["t"].items
    want = evaluate_mc(model, hf_tokenizer(), items)["t"].items
    assert got == want
    # the deploy bundle (folded, ROM table in fp16) scores as the folded model with fp16-rounded tables
    from romscale.meki.fold import fold
    from romscale.rom.runtime import export_bundle

    export_bundle(fold(model), tmp_path / "bundle", dtype="fp16", tokenizer=hf_tokenizer())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".meki.table"):
                p.copy_(p.half().float())
    want = evaluate_mc(model, hf_tokenizer(), items)["t"].items
    sb = load_scoring_model(tmp_path / "bundle")
    try:
        assert sb.kind == "meki-bundle"
        lls = [r["loglikelihoods"] for r in evaluate_mc(sb.model, sb.tokenizer, items)["t"].items]
    finally:
        sb.close()
    assert lls == [pytest.approx(r["loglikelihoods"], abs=1e-4) for r in want]


def test_engram_memory_checkpoint_scores_like_the_model_in_memory(tmp_path):
    from romscale.memories.base import get_memory
    from romscale.memories.engram import EngramConfig
    from romscale.meki.io import save_memories

    model = tiny_base()
    get_memory("engram").attach(model, EngramConfig(rows_per_head=31, heads=2, d_head=4, zero_init_output=False, init_std=0.5))
    save_memories(model, tmp_path / "eg", tokenizer=hf_tokenizer())
    sm = load_scoring_model(tmp_path / "eg")
    assert sm.kind == "memory-checkpoint"
    items = {"t": _items(4)}
    want = evaluate_mc(model, hf_tokenizer(), items)["t"].items
    assert evaluate_mc(sm.model, sm.tokenizer, items)["t"].items == want
    get_memory("engram").detach(model)  # the memory changes the scores: the comparison above is not vacuous
    assert evaluate_mc(model, hf_tokenizer(), items)["t"].items != want


def test_romscale_model_folders_resolve(tmp_path):
    from romscale.errors import ModelInputError
    from romscale.eval.mc import resolve_scoring_model
    from romscale.utils.outputs import output_dir, write_json_output

    model = tiny_base()
    run = tmp_path / "run"
    run.mkdir()
    write_json_output(run / "run.json", {"status": "done"}, kind="train-run")
    with output_dir(run / "model", kind="lm-model") as o:  # the trainer's dense output
        _save_hf(model, o.path)
    assert resolve_scoring_model(run) == ("hf", (run / "model").resolve())
    sm = load_scoring_model(run)
    assert sm.kind == "hf" and sm.tokenizer is not None
    items = {"t": _items(3)}
    assert evaluate_mc(sm.model, sm.tokenizer, items)["t"].items == evaluate_mc(model, hf_tokenizer(), items)["t"].items
    with output_dir(tmp_path / "other", kind="corpus") as o:
        (o.path / "x.txt").write_text("x")
    with pytest.raises(ModelInputError, match="romscale corpus, not a model"):
        resolve_scoring_model(tmp_path / "other")
    (tmp_path / "bare").mkdir()
    write_json_output(tmp_path / "bare" / "run.json", {}, kind="train-run")
    with pytest.raises(ModelInputError, match="without its final model"):
        resolve_scoring_model(tmp_path / "bare")


def test_cli_mc_on_a_local_file(cli, tmp_path):
    model = tiny_base()
    folder = _save_hf(model, tmp_path / "m")
    data = tmp_path / "quiz.jsonl"
    data.write_text("\n".join(json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold}) for i in _items(6)))
    out = tmp_path / "mc.json"
    r = cli("eval", "mc", "--model", folder, "--file", data, "--limit", 5, "--json", out)
    assert r.exit_code == 0, r
    rep = json.loads(out.read_text())
    assert rep["romscale_output"] == "mc-eval" and list(rep["tasks"]) == ["quiz"]
    want = evaluate_mc(model, hf_tokenizer(), {"quiz": load_mc_file(data, limit=5)})["quiz"]
    assert rep["tasks"]["quiz"]["acc"] == want.acc and rep["tasks"]["quiz"]["acc_norm"] == want.acc_norm
    assert rep["tasks"]["quiz"]["n"] == 5 and len(rep["items"]["quiz"]) == 5
    assert cli("eval", "mc", "--model", folder, "--file", data, "--json", out).exit_code == 2  # exists: needs --overwrite
    assert cli("eval", "mc", "--model", folder, "--file", data, "--json", out, "--overwrite").exit_code == 0


def test_cli_mc_usage_errors(cli, tmp_path):
    folder = _save_hf(tiny_base(), tmp_path / "m")
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"context": "c", "choices": ["a", "b"], "gold": 0}]))
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    base = ("eval", "mc", "--model", folder, "--json", tmp_path / "o.json")
    assert_usage_error(cli(*base, "--tasks", "nope"), "--tasks", "nope")
    assert_usage_error(cli(*base, "--file", data, "--limit", 0), "--limit")
    assert_usage_error(cli(*base, "--file", tmp_path / "missing.jsonl"), "--file", "missing.jsonl")
    assert_usage_error(cli(*base, "--file", tmp_path), "--file")
    assert_usage_error(cli("eval", "mc", "--model", tmp_path / "nomodel", "--file", data, "--json", tmp_path / "o.json"), "--model")
    assert_usage_error(cli("eval", "mc", "--model", folder, "--file", data, "--json", mine), "--json", "not written by romscale")
    assert_usage_error(cli("eval", "mc", "--model", folder, "--file", data, "--json", folder / "r.json"), "--json", "inside the input")
    assert mine.read_text() == "{}" and not (tmp_path / "o.json").exists()
