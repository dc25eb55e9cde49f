"""lm-evaluation-harness through romscale.eval.harness.RomscaleLM, offline: simple_evaluate on a local
JSON multiple-choice task agrees with romscale's own scorer and with lm_eval's HF model."""

import json
import os
import socket

import pytest

pytest.importorskip("lm_eval")

from conftest import hf_tokenizer, tiny_base  # noqa: E402
from romscale.eval.mc import MCItem, evaluate_mc  # noqa: E402
from romscale.eval.mc_data import load_mc_file  # noqa: E402


@pytest.fixture
def offline(monkeypatch):
    """No hub, no network: the env flags for anything imported later, the libraries' own flags for
    what is already imported, and a socket that refuses to connect."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*_a, **_k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


WORDS = ["the cat", "a dog", "sat on", "the mat", "hello there", "quick brown", "fox", "over it", "zz", "a b c d e"]


def _records(n=24):
    import random

    rng = random.Random(5)
    out = []
    for i in range(n):
        k = 2 + i % 3
        choices = rng.sample(WORDS, k)
        out.append({"context": f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}:", "choices": choices, "gold": rng.randrange(k)})
    return out


def _task(folder, records):
    data = folder / "quiz.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (folder / "quiz.yaml").write_text(
        "task: romscale_quiz\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf-datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return data


def _evaluate(lm, folder):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(folder), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["romscale_quiz"], task_manager=tm, num_fewshot=0, log_samples=True,
                                  bootstrap_iters=0)
    return out["results"]["romscale_quiz"], out["samples"]["romscale_quiz"]


def test_simple_evaluate_offline_matches_romscale_mc_and_lm_eval_hf(tmp_path, offline):
    from lm_eval.models.huggingface import HFLM

    from romscale.eval.harness import RomscaleLM

    model, tok = tiny_base(), hf_tokenizer()
    data = _task(tmp_path, _records())
    ours = evaluate_mc(model, tok, {"quiz": load_mc_file(data)})["quiz"]
    res, samples = _evaluate(RomscaleLM(model, tok, batch_size=5), tmp_path)
    assert res["acc,none"] == pytest.approx(ours.acc, abs=1e-12)
    assert res["acc_norm,none"] == pytest.approx(ours.acc_norm, abs=1e-12)
    assert ours.acc != ours.acc_norm  # the data separates the two rules, so both are checked
    by_doc = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}  # (ll, is_greedy)
    for i, row in enumerate(ours.items):
        assert by_doc[i] == pytest.approx(row["loglikelihoods"], abs=1e-5)
    # lm_eval's own HF model on the same data: an independent implementation, the same scores
    ref, _ = _evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu"), tmp_path)
    assert (ref["acc,none"], ref["acc_norm,none"]) == (res["acc,none"], res["acc_norm,none"])


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _bos_tokenizer():
    """The test tokenizer, but prepending <s> as Llama's tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = hf_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok.encode("ab")[0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("bos", [False, True])
def test_request_types_equal_lm_eval_hf_model(offline, bos):
    from lm_eval.models.huggingface import HFLM

    from romscale.eval.harness import RomscaleLM

    model, tok = tiny_base(), (_bos_tokenizer() if bos else hf_tokenizer())
    ours = RomscaleLM(model, tok, batch_size=3, max_length=24)
    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", max_length=24)
    ll = _instances("loglikelihood", [("the cat ", "sat"), ("", "hello there"), ("a dog", " over it"),
                                      ("fox " * 12, "jumps over the mat")])  # the last is longer than max_length
    for (a, ga), (b, gb) in zip(ours.loglikelihood(ll), ref.loglikelihood(ll)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    docs = _instances("loglikelihood_rolling", [("hello there the cat sat on the mat " * 6,), ("abc",)])
    assert ours.loglikelihood_rolling(docs) == pytest.approx(ref.loglikelihood_rolling(docs), abs=1e-3)
    gen = _instances("generate_until", [("the cat", {"until": ["e"], "max_gen_toks": 6, "do_sample": False}),
                                        ("a much longer prompt here", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}),
                                        ("fox", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False})])
    assert ours.generate_until(gen) == ref.generate_until(gen)


def test_registered_by_name_and_loaded_from_a_meki_checkpoint(tmp_path, offline):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from romscale.eval.harness import RomscaleLM

    from conftest import randomize_meki
    from romscale.meki.attach import attach_meki
    from romscale.meki.config import MekiConfig
    from romscale.meki.io import save_meki

    assert get_model("romscale") is RomscaleLM
    model, tok = tiny_base(), hf_tokenizer()  # a romscale model: a MeKi checkpoint with its tokenizer
    attach_meki(model, MekiConfig(d_mem=8))
    randomize_meki(model)
    save_meki(model, tmp_path / "m", tokenizer=tok)
    recs = _records(8)
    _task(tmp_path, recs)
    out = lm_eval.simple_evaluate(model="romscale", model_args=f"pretrained={tmp_path / 'm'},batch_size=4",
                                  tasks=["romscale_quiz"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                                  bootstrap_iters=0)
    items = {"q": [MCItem(str(i), r["context"], tuple(r["choices"]), r["gold"]) for i, r in enumerate(recs)]}
    assert out["results"]["romscale_quiz"]["acc,none"] == pytest.approx(evaluate_mc(model, tok, items)["q"].acc)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
