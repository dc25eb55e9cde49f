"""romscale data taskbank: the bank format, the verifying reader, the split builder and the CLI, on
tiny synthetic tasks (no package needed); one real build from the cached django wheel when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_usage_error, resign

from romscale.data import packages, tasksources
from romscale.data.taskbank import Example, TaskBank, TaskBankError, write_task_bank
from romscale.data.tasksources import TaskBuilder, split_rows

SPEC = {"family": "rewriting", "language": "en", "metric": "exact_match", "template": "Plural of:\n\n{input}",
        "labels": None, "max_new_tokens": 8, "source": "synthetic", "license": "CC0"}
WORDS = ["cat", "dog", "house", "tree", "car", "bird", "lamp", "cup", "pen", "box"]


def _splits(prefix: str, n: int = 10) -> dict[str, list[Example]]:
    ex = [Example(f"{prefix}{i}", f"{WORDS[i % len(WORDS)]}{i}", f"{WORDS[i % len(WORDS)]}{i}s") for i in range(n)]
    return {"train": ex[:6], "val": ex[6:8], "test": ex[8:]}


def _sentiment() -> tuple[dict, dict[str, list[Example]]]:
    labels = ["negative", "positive"]
    ex = [Example(f"s{i}", f"review number {i}", labels[i % 2]) for i in range(6)]
    spec = {**SPEC, "name": "sentiment-en", "family": "sentiment", "metric": "accuracy", "labels": labels,
            "template": "Sentiment?\n\n{input}"}
    return spec, {"train": ex[:3], "val": ex[3:4], "test": ex[4:]}


def _bank(tmp_path: Path, name: str = "bank") -> Path:
    tasks = [({**SPEC, "name": "plural-en"}, _splits("p")), ({**SPEC, "name": "plural-de", "language": "de"}, _splits("q")),
             _sentiment()]
    return write_task_bank(tasks, tmp_path / name, subsets={"small": ["plural-de", "sentiment-en"]},
                           packages={"synthetic": {"version": "1", "sha256": "0" * 64, "license": "CC0"}})


def test_round_trip(tmp_path):
    bank = TaskBank.open(_bank(tmp_path))
    assert bank.names == ["plural-en", "plural-de", "sentiment-en"]
    assert bank.subsets == {"all": bank.names, "small": ["plural-de", "sentiment-en"]}
    t = bank.task("plural-en")
    assert t.sizes == {"train": 6, "val": 2, "test": 2} and t.labels is None
    assert t.examples("test") == _splits("p")["test"]
    assert t.examples("train", limit=2) == _splits("p")["train"][:2]
    assert t.prompt(t.examples("val")[0]) == "Plural of:\n\nlamp6"
    assert {t: 1}[TaskBank.open(bank.path, "plural-en").task("plural-en")] == 1  # hashable, equal across opens
    s = bank.task("sentiment-en")
    assert s.labels == ("negative", "positive") and s.spec()["labels"] == ["negative", "positive"]
    line = (bank.path / "tasks" / "plural-en" / "train.jsonl").read_text().splitlines()[0]
    assert json.loads(line) == {"id": "p0", "input": "cat0", "target": "cat0s"}


def test_selection(tmp_path):
    path = _bank(tmp_path)
    assert TaskBank.open(path, "small").names == ["plural-de", "sentiment-en"]
    assert TaskBank.open(path, ["sentiment-en", "plural-en"]).names == ["plural-en", "sentiment-en"]  # bank order
    assert TaskBank.open(path, "plural-de").names == ["plural-de"]
    with pytest.raises(TaskBankError, match="unknown task or subset 'nope'.*small.*plural-en, plural-de, sentiment-en"):
        TaskBank.open(path, "nope")
    with pytest.raises(TaskBankError, match="no task 'plural-en'"):
        TaskBank.open(path, "small").task("plural-en")


def test_writer_is_deterministic(tmp_path):
    a, b = _bank(tmp_path, "a"), _bank(tmp_path, "b")
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.parametrize("bad, needle", [
    ({"name": "../escape"}, "plain folder name"),
    ({"metric": "bleu"}, "metric must be one of"),
    ({"template": "no placeholder"}, "must contain {input}"),
    ({"template": "{input} and {other}"}, "only {input}"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"metric": "accuracy"}, "needs 'labels'"),
])
def test_writer_rejects_bad_specs(tmp_path, bad, needle):
    with pytest.raises(TaskBankError, match=needle):
        write_task_bank([({**SPEC, "name": "t", **bad}, _splits("p"))], tmp_path / "bank")
    assert not (tmp_path / "bank").exists()


def test_writer_rejects_overlap_and_bad_labels(tmp_path):
    splits = _splits("p")
    splits["test"] = [Example("x", splits["train"][0].input, "y")]
    with pytest.raises(TaskBankError, match="appears in both train and test"):
        write_task_bank([({**SPEC, "name": "t"}, splits)], tmp_path / "bank")
    spec, splits = _sentiment()
    splits["test"].append(Example("z", "odd", "neutral"))
    with pytest.raises(TaskBankError, match="not one of the labels"):
        write_task_bank([(spec, splits)], tmp_path / "bank")
    with pytest.raises(TaskBankError, match="names repeated"):
        write_task_bank([({**SPEC, "name": "t"}, _splits("p")), ({**SPEC, "name": "t"}, _splits("q"))], tmp_path / "bank")
    with pytest.raises(TaskBankError, match="unknown or repeated"):
        write_task_bank([({**SPEC, "name": "t"}, _splits("p"))], tmp_path / "bank", subsets={"s": ["u"]})


def _edit(path: Path, file: str, change) -> None:
    f = path / file
    f.write_text(change(f.read_text()))
    resign(path)


@pytest.mark.parametrize("file, change, needle", [
    ("tasks/plural-en/test.jsonl", lambda s: s + '{"id": "p99", "input": "new"}\n', "exactly the string fields"),
    ("tasks/plural-en/test.jsonl", lambda s: s + "not json\n", "line 3 is not valid JSON"),
    ("tasks/plural-en/test.jsonl", lambda s: s + '{"id": "p99", "input": "new", "target": "x"}\n', "3 examples, bank.json says 2"),
    ("tasks/plural-en/val.jsonl", lambda s: s.replace('"lamp6"', '"cat0"'), "appears in both train and val"),
    ("tasks/plural-en/val.jsonl", lambda s: s.replace('"p7"', '"p6"'), "empty or repeated"),
    ("bank.json", lambda s: s.replace('"name": "plural-de"', '"name": "../../etc"'), "plain folder name"),
    ("bank.json", lambda s: s.replace('"romscale-taskbank"', '"other"'), "not a romscale task bank"),
])
def test_reader_names_the_broken_file(tmp_path, file, change, needle):
    path = _bank(tmp_path)
    _edit(path, file, change)
    with pytest.raises(TaskBankError, match=needle) as exc:
        TaskBank.open(path)
    assert Path(file).name in str(exc.value) or Path(file).parent.name in str(exc.value)


def test_reader_checks_the_manifest(tmp_path):
    path = _bank(tmp_path)
    f = path / "tasks" / "plural-en" / "test.jsonl"
    f.write_text(f.read_text().replace("pen", "pan"))  # same size, no resign: the checksum catches it
    with pytest.raises(TaskBankError, match="test.jsonl does not match its sha256"):
        TaskBank.open(path)
    with pytest.raises(TaskBankError, match="not a folder"):
        TaskBank.open(tmp_path / "missing")


# -- the builder ---------------------------------------------------------------------------------
def _builder(name: str = "toy-en", **kw) -> TaskBuilder:
    rows = [(f"r{i}", f"  word{i % 150}   with  spaces " + "x" * (i % 7), f"target {i % 150}") for i in range(400)]
    rows += [("long", "y " * 400, "t"), ("empty", "   ", "t"), ("longtarget", "fine input", "z" * 300)]
    base = dict(name=name, family="toy", language="en", metric="exact_match", template="Do:\n\n{input}", source="toy",
                license="CC0", read=lambda src: rows, input_cap=50, target_cap=200, sizes=(100, 10, 20))
    return TaskBuilder(**{**base, **kw})


def test_split_rows_dedupes_caps_and_is_disjoint():
    splits = split_rows(_builder(), _builder().read(None))
    assert {s: len(v) for s, v in splits.items()} == {"test": 20, "val": 10, "train": 100}
    inputs = [e.input for v in splits.values() for e in v]
    assert len(inputs) == len(set(inputs))  # disjoint and de-duplicated
    assert all(len(i) <= 50 and "  " not in i for i in inputs)
    assert "longtarget" not in {e.id for v in splits.values() for e in v}
    again = split_rows(_builder(), _builder().read(None))
    assert again == splits
    other = split_rows(_builder("toy-de"), _builder().read(None))  # the seed follows the task name
    assert other["test"] != splits["test"]
    with pytest.raises(tasksources.TaskSourceError, match="only .* usable examples"):
        split_rows(_builder(sizes=(10, 200, 500)), _builder().read(None))


@pytest.fixture
def toy_registry(monkeypatch):
    reg = {b.name: b for b in (_builder("toy-en"), _builder("toy-de", language="de"))}
    monkeypatch.setattr(tasksources, "TASKS", reg)
    monkeypatch.setattr(tasksources, "SUBSETS", {"toy-1": ["toy-de"]})
    return reg


def test_build_twice_gives_identical_bytes(tmp_path, toy_registry):
    for out in ("a", "b"):
        tasksources.build_task_bank(["toy-en", "toy-de"], tmp_path / out)
    a, b = tmp_path / "a", tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    bank = TaskBank.open(a, "toy-1")
    assert bank.names == ["toy-de"] and bank.task("toy-de").max_new_tokens == 8  # "target 123": 10 bytes / 3 + 4


def test_cli(tmp_path, cli, toy_registry):
    r = cli("data", "taskbank", "--out", tmp_path / "bank", "--tasks", "toy-1", "--json", tmp_path / "r.json", "--no-progress")
    assert r.exit_code == 0, r
    assert "toy-de" in r.stdout and "1 tasks, 1 families" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["tasks"][0]["sizes"] == {"train": 100, "val": 10, "test": 20}
    assert_usage_error(cli("data", "taskbank", "--out", tmp_path / "bank", "--tasks", "toy-1"), "already exists", "--overwrite")
    assert cli("data", "taskbank", "--out", tmp_path / "bank", "--tasks", "toy-en", "--overwrite").exit_code == 0
    assert TaskBank.open(tmp_path / "bank").names == ["toy-en"]


def test_cli_usage_errors(tmp_path, cli, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("built before the options were checked")

    monkeypatch.setattr(tasksources, "build_task_bank", boom)
    assert_usage_error(cli("data", "taskbank", "--out", tmp_path / "b", "--tasks", "sentiment-xx"),
                       "--tasks", "'sentiment-xx'", "cpu-16", "sentiment-de")
    assert_usage_error(cli("data", "taskbank", "--out", tmp_path / "b", "--tasks", ","), "no tasks selected")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_usage_error(cli("data", "taskbank", "--out", tmp_path / "mine"), "not a romscale output")


def test_registry_shape():
    tasks = list(tasksources.TASKS.values())
    fams: dict[str, set[str]] = {}
    for b in tasks:
        fams.setdefault(b.family, set()).add(b.language)
        assert b.name.startswith(b.family + "-") and "{input}" in b.template
    assert len(tasks) >= 24 and len(fams) >= 5
    assert sum(len(v) >= 6 for v in fams.values()) >= 2
    cpu = [tasksources.TASKS[n] for n in tasksources.SUBSETS["cpu-16"]]
    assert len(cpu) == 16 and len({b.family for b in cpu}) == 4 and all(b.sizes[2] >= 25 for b in cpu)


def test_real_django_task(tmp_path):
    """A cheap real build (two translation tasks from the cached django wheel), twice: same bytes."""
    if not any(packages.package_dir("django").glob("django-5.2.8-*.whl")):
        pytest.skip("django==5.2.8 wheel not in the package cache")
    for out in ("a", "b"):
        tasksources.build_task_bank(["translation-de", "translation-ja"], tmp_path / out)
    a, b = tmp_path / "a", tmp_path / "b"
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in ("bank.json", "tasks/translation-ja/test.jsonl"))
    bank = TaskBank.open(a)
    t = bank.task("translation-de")
    assert t.sizes == {"train": 200, "val": 20, "test": 50} and t.metric == "chrf"
    assert bank.packages["django"]["version"] == "5.2.8" and len(bank.packages["django"]["sha256"]) == 64
    assert all(e.id.startswith("django/") and e.target for e in t.examples("test"))
    assert any(e.target != e.input for e in t.examples("test"))  # translated, not copied


@pytest.mark.parametrize("text, first", [
    ("Der 6. Juni war heiß. Dann kam Regen.", "Der 6. Juni war heiß."),
    ("U.S. troops left. More later.", "U.S. troops left."),
    ("Mr. Smith went home. Then he slept.", "Mr. Smith went home."),
    ("Wait! Now what?", "Wait!"),
    ("Он пришёл. Она ушла.", "Он пришёл."),
    ("猫坐在垫子上。狗跑了。", "猫坐在垫子上。"),
    ("One sentence only", "One sentence only"),
])
def test_first_sentence(text, first):
    assert tasksources._first_sentence(text) == first


def test_parallel_tasks_keep_each_document_in_one_split():
    """Translations of one document (same key) land in the same split in every task of the group,
    even when a row is dropped in one language."""
    docs = [(f"doc{i}", f"target {i}") for i in range(300)]
    rows_en = [(f"en/{d}", f"english text {d}", t) for d, t in docs]
    rows_de = [(f"de/{d}", f"deutscher Text {d}", t) for d, t in docs if d not in ("doc3", "doc7", "doc11")]
    key = lambda e: e.id.split("/")[1]  # noqa: E731
    kw = dict(parallel="toy", parallel_key=key, parallel_fractions=(0.3, 0.1), sizes=(100, 20, 50))
    en = split_rows(_builder("toy-en", **kw), rows_en)
    de = split_rows(_builder("toy-de", **kw), rows_de)
    assert len(en["test"]) == 50 and len(en["val"]) == 20 and len(en["train"]) == 100
    where = {key(e): s for s, v in en.items() for e in v}
    for s, v in de.items():
        for e in v:
            assert where.get(key(e), s) == s, (key(e), s, where.get(key(e)))
    assert split_rows(_builder("toy-de", **kw), rows_de) == de
