"""Local multiple-choice data: BIG-bench `target_scores` tasks from the bigbench source package, and
the user's own JSON / JSONL files. Nothing comes from a dataset hub.

BIG-bench tasks (bigbench==1.0.0 sdist, Apache-2.0; cached under ~/.cache/romscale/packages/bigbench).
Eight English tasks with short inputs, chosen to resemble the paper's zero-shot suite (commonsense,
social and physical reasoning, yes/no questions):

| name | BIG-bench task | items | choices | like |
|---|---|---|---|---|
| social_iqa | social_iqa | 1954 | 3 | SIQA |
| goal_inference | goal_step_wikihow/goal_inference | 1703 | 4 | PIQA / HellaSwag |
| step_inference | goal_step_wikihow/step_inference | 2250 | 4 | PIQA / HellaSwag |
| strategyqa | strategyqa | 2290 | 2 | BoolQ |
| hyperbaton | hyperbaton | 50000 | 2 | BLiMP-style grammaticality |
| sports_understanding | sports_understanding | 1000 | 2 | plausibility |
| implicatures | implicatures | 492 | 2 | pragmatic yes/no |
| winowhy | winowhy | 2865 | 2 | WinoGrande / WSC reasons |

Formatting is BIG-bench's own zero-shot format (bigbench/api/json_task.py): context =
task_prefix + example_input_prefix (default "\\nQ: ") + input + example_output_prefix (default
"\\nA: "), with leading whitespace and trailing spaces cut (the scorer's delimiter " " supplies the
space before the answer, lm_eval's convention). Choices are NOT appended to the context, whatever
the task's `append_choices_to_input` says: cloze-style scoring, as lm-evaluation-harness scores the
paper's benchmarks (ARC, PIQA, HellaSwag, ...). The gold choice is the one with the highest target
score; an item whose best score is shared by several choices is skipped (no single right answer).

User files (`load_mc_file`): a .json file holding a list of records (or {"examples": [...]}) or a
.jsonl file with one record per line. A record is either
    {"context": str, "choices": [str, ...], "gold": int | str}   ("query"/"question" for context,
                                                                   "label"/"answer" for gold), or
    {"input": str, "target_scores": {choice: score, ...}}          (BIG-bench style)
with an optional "id".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from romscale.errors import RomscaleError
from romscale.eval.mc import MCItem

__all__ = ["BIGBENCH_MC_TASKS", "MCDataError", "bigbench_item", "load_bigbench_mc", "load_mc_file", "parse_mc_records"]

BIGBENCH = "bigbench==1.0.0"
_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
BIGBENCH_MC_TASKS: dict[str, str] = {
    "social_iqa": "social_iqa",
    "goal_inference": "goal_step_wikihow/goal_inference",
    "step_inference": "goal_step_wikihow/step_inference",
    "strategyqa": "strategyqa",
    "hyperbaton": "hyperbaton",
    "sports_understanding": "sports_understanding",
    "implicatures": "implicatures",
    "winowhy": "winowhy",
}
MAX_FILE_BYTES = 256 << 20  # a local MC file is text; refuse anything absurd before reading it


class MCDataError(RomscaleError):
    """A multiple-choice data file that is missing, malformed or has no usable items."""


# -- BIG-bench ------------------------------------------------------------------------------------
def bigbench_item(task: dict[str, Any], example: dict[str, Any], item_id: str) -> MCItem | None:
    """One BIG-bench `target_scores` example as an MCItem in BIG-bench's zero-shot format, or None
    when it has no single best choice."""
    scores = example.get("target_scores")
    text = example.get("input")
    if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(text, str):
        return None
    choices = tuple(str(c) for c in scores)
    try:
        values = [float(v) for v in scores.values()]
    except (TypeError, ValueError):
        return None
    best = max(values)
    if values.count(best) != 1:
        return None
    context = (str(task.get("task_prefix", "")) + str(task.get("example_input_prefix", "\nQ: ")) + text
               + str(task.get("example_output_prefix", "\nA: ")))
    return MCItem(item_id, context.lstrip().rstrip(" "), choices, values.index(best))


def _cache_name(name: str) -> str:
    return f"bigbench-mc.{name}.task.json"


def _bigbench_files(names: Sequence[str]) -> dict[str, Path]:
    """The chosen tasks' task.json files, extracted once (one pass over the archive for all that are
    missing) into the package cache under names romscale chooses."""
    from romscale.data.packages import fetch_pip, iter_tar_members, package_dir

    folder = package_dir("bigbench") / "extracted"
    files = {n: folder / _cache_name(n) for n in names}
    missing = {f"{_ROOT}/{BIGBENCH_MC_TASKS[n]}/task.json": n for n in names if not files[n].is_file()}
    if missing:
        sdist = fetch_pip(BIGBENCH, sdist=True)
        folder.mkdir(parents=True, exist_ok=True)
        for member, data in iter_tar_members(sdist, lambda m: m in missing):
            tmp = files[missing[member]].with_suffix(".partial")
            tmp.write_bytes(data)
            tmp.replace(files[missing[member]])
        absent = [n for n in missing.values() if not files[n].is_file()]
        if absent:
            raise MCDataError(f"{sdist}: has no task.json for {', '.join(absent)}; is it {BIGBENCH}?")
    return files


def load_bigbench_mc(tasks: Iterable[str] | None = None, limit: int | None = None) -> dict[str, list[MCItem]]:
    """BIG-bench multiple-choice tasks by romscale name (BIGBENCH_MC_TASKS; None: all), each the
    first `limit` usable items in file order."""
    names = list(BIGBENCH_MC_TASKS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in BIGBENCH_MC_TASKS]
    if unknown:
        raise MCDataError(f"unknown BIG-bench MC task(s) {', '.join(unknown)}; known: {', '.join(BIGBENCH_MC_TASKS)}")
    out = {}
    for name, file in _bigbench_files(names).items():
        try:
            task = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MCDataError(f"{file}: not valid JSON ({exc}); delete it to extract it again") from exc
        items = []
        for i, ex in enumerate(task.get("examples", [])):
            it = bigbench_item(task, ex, f"{name}/{i}") if isinstance(ex, dict) else None
            if it is not None:
                items.append(it)
                if limit is not None and len(items) >= limit:
                    break
        if not items:
            raise MCDataError(f"{file}: no multiple-choice examples with a single best target score")
        out[name] = items
    return out


# -- user files -----------------------------------------------------------------------------------
def _gold(value: Any, choices: tuple[str, ...], where: str) -> int:
    if isinstance(value, bool) or value is None:
        raise MCDataError(f"{where}: 'gold' must be a choice index or the text of a choice, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(choices):
            raise MCDataError(f"{where}: gold index {value} is out of range for {len(choices)} choices")
        return value
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    raise MCDataError(f"{where}: gold {value!r} is neither a choice index nor one of the choices {list(choices)}")


def _first(rec: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((rec[k] for k in keys if k in rec), None)


def parse_mc_records(records: Sequence[Any], where: str) -> list[MCItem]:
    """Records (see the module doc) -> MCItems; `where` names the file in errors."""
    items = []
    for i, rec in enumerate(records):
        at = f"{where}: record {i + 1}"
        if not isinstance(rec, dict):
            raise MCDataError(f"{at}: expected a JSON object, got {type(rec).__name__}")
        rid = str(rec.get("id", i))
        if "target_scores" in rec:
            it = bigbench_item({"example_input_prefix": "", "example_output_prefix": ""}, rec, rid)
            if it is None:
                raise MCDataError(f"{at}: 'target_scores' needs >= 2 choices with one highest score, and 'input' a string")
            items.append(it)
            continue
        context = _first(rec, ("context", "query", "question"))
        choices = rec.get("choices")
        if not isinstance(context, str):
            raise MCDataError(f"{at}: needs a string 'context' (or 'query' / 'question'), or 'input' + 'target_scores'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise MCDataError(f"{at}: 'choices' must be a list of at least 2 non-empty strings")
        ch = tuple(choices)
        items.append(MCItem(rid, context, ch, _gold(_first(rec, ("gold", "label", "answer")), ch, at)))
    if not items:
        raise MCDataError(f"{where}: holds no records")
    return items


def load_mc_file(path: str | Path, limit: int | None = None) -> list[MCItem]:
    """A user's multiple-choice file (.json or .jsonl; see the module doc), first `limit` items."""
    path = Path(path)
    if not path.is_file():
        raise MCDataError(f"{path}: is not a file; expected a .json or .jsonl multiple-choice file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise MCDataError(f"{path}: {path.stat().st_size:,} bytes; a multiple-choice file is expected under {MAX_FILE_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MCDataError(f"{path}: is not UTF-8 text ({exc})") from exc
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise MCDataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MCDataError(f"{path}: is not valid JSON ({exc})") from exc
        records = data.get("examples") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise MCDataError(f"{path}: expected a list of records or an object with an 'examples' list")
    else:
        raise MCDataError(f"{path}: unknown suffix {path.suffix!r}; expected .json or .jsonl")
    items = parse_mc_records(records, str(path))
    return items[:limit] if limit is not None else items
