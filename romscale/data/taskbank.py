"""The task bank on disk: format, writer and verifying reader (docs/taskbank.md).

    DIR/bank.json                      {"format": "romscale-taskbank", "version": 1, "tasks": [TaskSpec...],
                                        "subsets": {name: [task names]}, "packages": {name: {version, sha256, license}}}
    DIR/tasks/<name>/{train,val,test}.jsonl   one {"id", "input", "target"} object per line

The folder is a romscale output of kind "task-bank" (romscale.utils.outputs): its manifest lists every
file with its sha256, and `TaskBank.open` checks it before reading anything. Tests and users build
banks of their own with `write_task_bank`; `romscale data taskbank` builds the packaged one
(romscale.data.tasksources).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from romscale.errors import RomscaleError
from romscale.utils.outputs import member, output_dir, read_json, read_manifest

FORMAT = "romscale-taskbank"
VERSION = 1
KIND = "task-bank"
BANK_FILE = "bank.json"
SPLITS = ("train", "val", "test")
METRIC_NAMES = ("accuracy", "chrf", "exact_match", "rougeL")  # romscale.eval.metrics.METRICS (a test checks they agree)
ALL = "all"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")  # a task name is a folder name: no '/', no '..'
_SPEC_KEYS = ("name", "family", "language", "metric", "template", "labels", "max_new_tokens", "sizes", "source", "license")


class TaskBankError(RomscaleError):
    """A task bank folder (or a task spec given to the writer) that is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    target: str


@dataclass(frozen=True)
class Task:
    """One task of a bank; `examples` reads its verified JSONL files."""

    name: str
    family: str
    language: str
    metric: str
    template: str
    labels: tuple[str, ...] | None
    max_new_tokens: int
    sizes: Mapping[str, int]
    source: str
    license: str
    _examples: Mapping[str, tuple[Example, ...]] = field(default_factory=dict, repr=False, compare=False)

    def __hash__(self) -> int:  # usable as a dict key (sizes is a dict, so the generated hash would fail)
        return hash((self.name, self.family, self.language, self.metric, self.template, self.labels,
                     self.max_new_tokens, tuple(sorted(self.sizes.items())), self.source, self.license))

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        """The examples of `split` in file order (the first `limit` when given)."""
        if split not in SPLITS:
            raise TaskBankError(f"task {self.name}: split must be one of {', '.join(SPLITS)}; got {split!r}")
        if limit is not None and limit < 0:
            raise TaskBankError(f"task {self.name}: limit must be >= 0; got {limit}")
        rows = self._examples.get(split, ())
        return list(rows if limit is None else rows[:limit])

    def prompt(self, example: Example) -> str:
        """The user message: the template with `{input}` replaced by the example's input."""
        return self.template.format(input=example.input)

    def spec(self) -> dict[str, Any]:
        """The TaskSpec dict, as bank.json stores it."""
        return {"name": self.name, "family": self.family, "language": self.language, "metric": self.metric,
                "template": self.template, "labels": list(self.labels) if self.labels is not None else None,
                "max_new_tokens": self.max_new_tokens, "sizes": {s: self.sizes[s] for s in SPLITS},
                "source": self.source, "license": self.license}


def check_spec(spec: Mapping[str, Any], where: str, error: type[Exception] = TaskBankError) -> dict[str, Any]:
    """A TaskSpec with every field of the right type; raises `error` naming `where` and the field."""
    if not isinstance(spec, Mapping):
        raise error(f"{where}: a task spec must be an object; got {type(spec).__name__}")
    missing = [k for k in _SPEC_KEYS if k not in spec]
    if missing:
        raise error(f"{where}: task spec lacks {', '.join(missing)}")
    name = spec["name"]
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise error(f"{where}: task name {name!r} must be lower-case letters, digits, '.', '_' or '-' (a plain folder name)")
    at = f"{where}: task {name}"
    for key in ("family", "language", "template", "source", "license"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise error(f"{at}: {key!r} must be a non-empty string")
    if spec["metric"] not in METRIC_NAMES:
        raise error(f"{at}: metric must be one of {', '.join(METRIC_NAMES)}; got {spec['metric']!r}")
    template = spec["template"]
    if "{input}" not in template:
        raise error(f"{at}: the template must contain {{input}}")
    try:
        template.format(input="")
    except (KeyError, IndexError, ValueError) as exc:
        raise error(f"{at}: the template must use only {{input}} (write other braces as {{{{ }}}}): {exc}") from None
    labels = spec["labels"]
    if labels is not None:
        if (not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) and x for x in labels)
                or len(set(labels)) != len(labels)):
            raise error(f"{at}: 'labels' must be null or a list of distinct non-empty strings")
        labels = tuple(labels)
    elif spec["metric"] == "accuracy":
        raise error(f"{at}: an accuracy task needs 'labels'")
    mnt = spec["max_new_tokens"]
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
        raise error(f"{at}: 'max_new_tokens' must be an integer >= 1; got {mnt!r}")
    sizes = spec["sizes"]
    if (not isinstance(sizes, Mapping) or sorted(sizes) != sorted(SPLITS)
            or not all(isinstance(sizes[s], int) and not isinstance(sizes[s], bool) and sizes[s] >= 0 for s in SPLITS)):
        raise error(f"{at}: 'sizes' must map exactly {', '.join(SPLITS)} to integers >= 0; got {sizes!r}")
    out = {k: spec[k] for k in _SPEC_KEYS}
    out.update(labels=labels, sizes={s: sizes[s] for s in SPLITS})
    return out


def _check_examples(name: str, split: str, rows: Sequence[Any], labels: tuple[str, ...] | None, where: str,
                    error: type[Exception]) -> None:
    ids: set[str] = set()
    for i, ex in enumerate(rows, start=1):
        if not isinstance(ex, Example) or not all(isinstance(v, str) for v in (ex.id, ex.input, ex.target)):
            raise error(f"{where}: item {i} of {name}/{split} must be an Example of three strings")
        if not ex.id or ex.id in ids:
            raise error(f"{where}: id {ex.id!r} in {name}/{split} (line {i}) is empty or repeated")
        if labels is not None and ex.target not in labels:
            raise error(f"{where}: target {ex.target!r} in {name}/{split} (line {i}) is not one of the labels {list(labels)}")
        ids.add(ex.id)


def _check_disjoint(name: str, splits: Mapping[str, Sequence[Example]], where: str, error: type[Exception]) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for ex in splits[split]:
            other = seen.get(ex.input)
            if other is not None and other != split:
                raise error(f"{where}: task {name}: input of {ex.id!r} appears in both {other} and {split}; splits must be disjoint")
            seen[ex.input] = split


def write_task_bank(
    tasks: Sequence[tuple[Mapping[str, Any], Mapping[str, Sequence[Example]]]], out: str | os.PathLike, overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (), *, subsets: Mapping[str, Sequence[str]] | None = None,
    packages: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write a bank folder: every (TaskSpec-like, {split: [Example]}) pair, `subsets` (name -> task
    names; "all" is added) and `packages` (provenance). Sizes are taken from the examples. Returns
    the folder. Bytes depend only on the arguments (fixed key order, no timestamps)."""
    specs: list[dict[str, Any]] = []
    data: list[dict[str, Sequence[Example]]] = []
    for i, (spec, splits) in enumerate(tasks):
        where = f"write_task_bank: task {i}"
        if not isinstance(splits, Mapping) or sorted(splits) != sorted(SPLITS):
            raise TaskBankError(f"{where}: examples must map exactly {', '.join(SPLITS)} to lists")
        spec = check_spec({**spec, "sizes": {s: len(splits[s]) for s in SPLITS}}, where)
        for s in SPLITS:
            _check_examples(spec["name"], s, splits[s], spec["labels"], where, TaskBankError)
        _check_disjoint(spec["name"], splits, where, TaskBankError)
        specs.append(spec)
        data.append(splits)
    names = [s["name"] for s in specs]
    if not names:
        raise TaskBankError("write_task_bank: no tasks given")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskBankError(f"write_task_bank: task names repeated: {', '.join(dup)}")
    subsets = {k: list(v) for k, v in (subsets or {}).items()}
    subsets[ALL] = names
    for sub, members in subsets.items():
        _check_subset(sub, members, names, "write_task_bank", TaskBankError)
    bank = {"format": FORMAT, "version": VERSION,
            "tasks": [{**s, "labels": list(s["labels"]) if s["labels"] is not None else None} for s in specs],
            "subsets": {k: subsets[k] for k in sorted(subsets)},
            "packages": {k: dict(sorted(v.items())) for k, v in sorted((packages or {}).items())}}
    with output_dir(out, kind=KIND, inputs=inputs, overwrite=overwrite, what="task bank",
                    meta={"tasks": len(names)}) as o:
        (o.path / BANK_FILE).write_text(json.dumps(bank, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for spec, splits in zip(specs, data):
            folder = o.path / "tasks" / spec["name"]
            folder.mkdir(parents=True)
            for s in SPLITS:
                lines = (json.dumps({"id": e.id, "input": e.input, "target": e.target}, ensure_ascii=False) + "\n"
                         for e in splits[s])
                (folder / f"{s}.jsonl").write_text("".join(lines), encoding="utf-8")
        return o.target


def _check_subset(sub: Any, members: Any, names: Sequence[str], where: str, error: type[Exception]) -> None:
    if not isinstance(sub, str) or not _NAME.match(sub):
        raise error(f"{where}: subset name {sub!r} must be lower-case letters, digits, '.', '_' or '-'")
    if sub in names:
        raise error(f"{where}: subset {sub!r} has the name of a task")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise error(f"{where}: subset {sub!r} must be a non-empty list of task names")
    unknown = [m for m in members if m not in names]
    if unknown or len(set(members)) != len(members):
        raise error(f"{where}: subset {sub!r} names unknown or repeated tasks: {unknown or members}")


def _read_jsonl(file: Path, error: type[Exception]) -> list[Example]:
    rows: list[Example] = []
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{file}: not UTF-8 ({exc})") from None
    for i, line in enumerate(text.split("\n"), start=1):
        if not line:
            if i == text.count("\n") + 1:
                break  # the final newline
            raise error(f"{file}: line {i} is empty; expected one JSON object per line")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{file}: line {i} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or sorted(obj) != ["id", "input", "target"] or not all(isinstance(v, str) for v in obj.values()):
            raise error(f"{file}: line {i} must be an object with exactly the string fields id, input, target")
        rows.append(Example(obj["id"], obj["input"], obj["target"]))
    return rows


class TaskBank:
    """A verified task bank folder (or a selection of its tasks)."""

    def __init__(self, path: Path, tasks: list[Task], subsets: dict[str, list[str]], packages: dict[str, Any],
                 all_names: list[str]) -> None:
        self.path = path
        self.tasks = tasks
        self.subsets = subsets
        self.packages = packages
        self.all_names = all_names  # every task in the folder, selected or not

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise TaskBankError(f"task bank {self.path}: no task {name!r} here; tasks: {', '.join(self.names)}")

    @classmethod
    def open(cls, path: str | os.PathLike, tasks: Sequence[str] | str | None = None) -> "TaskBank":
        """Open and verify a bank (manifest and checksums, bank.json, every selected JSONL file).
        `tasks`: None for all, a subset name or a task name, or a list of task names."""
        path = Path(path)
        read_manifest(path, KIND, TaskBankError)
        file = member(path, BANK_FILE, TaskBankError, str(path))
        bank = read_json(file, TaskBankError)
        if not isinstance(bank, dict) or bank.get("format") != FORMAT:
            raise TaskBankError(f"{file}: not a romscale task bank (format {FORMAT!r} expected)")
        if bank.get("version") != VERSION:
            raise TaskBankError(f"{file}: version {bank.get('version')!r}; this romscale reads version {VERSION}")
        raw_tasks, subsets, packages = bank.get("tasks"), bank.get("subsets"), bank.get("packages")
        if not isinstance(raw_tasks, list) or not raw_tasks:
            raise TaskBankError(f"{file}: 'tasks' must be a non-empty list of task specs")
        if not isinstance(subsets, dict) or not isinstance(packages, dict):
            raise TaskBankError(f"{file}: 'subsets' and 'packages' must be objects")
        specs = [check_spec(s, f"{file}: tasks[{i}]") for i, s in enumerate(raw_tasks)]
        names = [s["name"] for s in specs]
        if len(set(names)) != len(names):
            raise TaskBankError(f"{file}: task names repeated")
        for sub, members in subsets.items():
            _check_subset(sub, members, names, str(file), TaskBankError)
        chosen = select_tasks(tasks, names, subsets, f"task bank {path}", TaskBankError)
        by_name = {s["name"]: s for s in specs}
        loaded = []
        for name in chosen:
            spec = by_name[name]
            splits = {}
            for s in SPLITS:
                f = member(path, f"tasks/{name}/{s}.jsonl", TaskBankError, str(file))
                rows = _read_jsonl(f, TaskBankError)
                if len(rows) != spec["sizes"][s]:
                    raise TaskBankError(f"{f}: {len(rows)} examples, {BANK_FILE} says {spec['sizes'][s]}")
                _check_examples(name, s, rows, spec["labels"], str(f), TaskBankError)
                splits[s] = tuple(rows)
            _check_disjoint(name, splits, str(path / "tasks" / name), TaskBankError)
            loaded.append(Task(**spec, _examples=splits))
        return cls(path, loaded, {k: list(v) for k, v in subsets.items()}, packages, names)


def select_tasks(tasks: Sequence[str] | str | None, names: Sequence[str], subsets: Mapping[str, Sequence[str]],
                 where: str, error: type[Exception]) -> list[str]:
    """Task names (in bank order) for a selection: None = all; a subset or task name; a comma-separated
    string or list of task and subset names. Unknown names raise `error` listing the valid ones."""
    if tasks is None:
        return list(names)
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    items = [t for t in items if t]
    if not items:
        raise error(f"{where}: no tasks selected")
    wanted: set[str] = set()
    for item in items:
        if item in subsets:
            wanted.update(subsets[item])
        elif item in names:
            wanted.add(item)
        else:
            raise error(f"{where}: unknown task or subset {item!r}; subsets: {', '.join(sorted(subsets))}; "
                        f"tasks: {', '.join(names)}")
    return [n for n in names if n in wanted]
