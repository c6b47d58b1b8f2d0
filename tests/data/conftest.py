"""Fixtures shared by the data tests."""

import pytest

from tests.backbones.tiny_models import build
from tests.data.test_tokens import BOS, EOS, make_tokenizer, random_texts


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Tiny GPT-2 and BERT (with a tokenizer) and CLIP saved to disk, a text and a .tsv."""
    root = tmp_path_factory.mktemp("tiny-folders")
    paths = {}
    for family in ("gpt2", "bert", "clip"):
        model = build(family)
        model.config.bos_token_id, model.config.eos_token_id = BOS, EOS
        model.save_pretrained(root / family)
        if family != "clip":
            make_tokenizer().save_pretrained(root / family)
        paths[family] = str(root / family)
    texts = random_texts(60, seed=0)
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    (root / "labelled.tsv").write_text("".join(f"{i % 2}\t{t}\n" for i, t in enumerate(texts)))
    paths["text"], paths["tsv"] = str(root / "texts.txt"), str(root / "labelled.tsv")
    return paths
