"""A feature store with planted single-token latents, a tiny yes/no chat model and a reader.

The store is built by the real builder on a tiny random Llama at the ``embeddings`` site
(the token embeddings: one vector per token id), with a TopK (k = 1) dictionary whose latent
``j`` reads the direction of token ``PLANTED[j]`` and whose bias keeps it below zero on every
other token: latent ``j`` fires exactly on that token id, so its meaning is known.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import models, pre_tokenizers

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.features.build import Corpus, build_feature_store
from lightning_interp.features.store import FeatureSettings
from tests.backbones.tiny_models import llama
from tests.data.test_tokens import make_tokenizer, random_texts

PLANTED = [3, 11, 19, 27, 35, 43]  # words w3, w11, ...: latent j fires on PLANTED[j]
SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|im_start|>", "<|im_end|>"]
CHAT_WORDS = [*(f"w{i}" for i in range(8)), "Yes", "No", "user", "assistant", "system"]


def token_id(word: int) -> int:
    """Id of word ``w<word>`` in ``make_tokenizer`` (specials come first)."""
    return 6 + word


def planted_dictionary(backbone: Backbone, d_latent: int = 12):
    """A TopK (k = 1) dictionary on ``embeddings`` whose latent ``j`` fires on ``PLANTED[j]``."""
    embeddings = backbone.model.get_input_embeddings().weight.detach()
    sae = create_dictionary("topk", d_in=32, d_latent=d_latent, k=1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
        for j, word in enumerate(PLANTED):
            direction = embeddings[token_id(word)] / embeddings[token_id(word)].norm()
            on_token = float(embeddings[token_id(word)] @ direction)
            others = embeddings @ direction
            others[token_id(word)] = -float("inf")
            # The bias puts the threshold half-way between the token and its closest rival.
            sae.W_enc[:, j] = direction
            sae.b_enc[j] = -(on_token + float(others.max())) / 2
    return sae


def planted_backbone() -> Backbone:
    """The tiny random Llama (seeded) with the word-level tokenizer."""
    torch.manual_seed(0)
    return Backbone(llama(), make_tokenizer())


def planted_store(folder: Path, d_latent: int = 12) -> Path:
    """Build the planted store at ``folder``; latents ``len(PLANTED)..`` never fire."""
    backbone = planted_backbone()
    sae = planted_dictionary(backbone, d_latent)
    corpus = Corpus(random_texts(60, low=10, high=30), context_size=16, contexts_per_capture=8)
    build_feature_store(
        sae, backbone, corpus, folder, site="embeddings",
        settings=FeatureSettings(top_k=6, window=8), progress=False,
    )  # fmt: skip
    # The word-level tokenizer decodes a token without its separating space; put it back so
    # contexts read as text ("w1 w3 w7", not "w1w3w7"), as a BPE vocabulary's strings do.
    vocab_path = folder / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab_path.write_text(json.dumps({k: " " + v for k, v in vocab.items()}))
    return folder


def explanation(word: int) -> str:
    """The true explanation of the latent planted on ``w<word>``."""
    return f'The token "w{word}".'


class KeywordReader:
    """A literal reader: says Yes when the word an explanation quotes is in the example.

    For fuzzing (the example has ``<<...>>`` marks) it says Yes when every marked span is
    that word. It is the scorer an ideal model would be on single-token latents, so real
    explanations must reach AUROC 1 with it, and a wrong word must not.
    """

    name = "keyword-reader"

    def generate(self, chats, max_new_tokens):  # pragma: no cover - scorers never generate
        raise AssertionError("the scorers only ask yes/no questions")

    def yes_probability(self, chats):
        out = []
        for chat in chats:
            text = chat[-1]["content"]
            word = re.search(r'"(\S+?)"', text).group(1)
            example = text.split("Example: ", 1)[1]
            spans = re.findall(r"<<(.*?)>>", example)
            if spans:
                out.append(float(all(s.strip() == word for s in spans)))
            else:
                out.append(float(word in example.split()))
        return out


WORD = re.compile(r"w\d+")


class PlantedExplainer:
    """An ideal explainer and scorer for single-token latents on the word-level vocabulary.

    It explains a latent by the word marked (or listed) most often (``The token "w3".``) and answers
    Yes when the quoted word is in the example (detection) or when every ``<<...>>`` span
    is that word (fuzzing). Words are read with a regex, not ``split()``, so contexts
    decoded without spaces ("w1w3w7", a store built without :func:`planted_store`'s vocabulary
    fix) read right too.
    """

    name = "planted-explainer"

    def generate(self, chats, max_new_tokens):
        out = []
        for chat in chats:
            content = chat[-1]["content"]  # "WORDS: [...]" or contexts with <<marks>>
            marked = re.findall(r"<<(.*?)>>", content)
            words = WORD.findall(" ".join(marked) if marked else content.split("\n")[0])
            out.append(explanation(int(Counter(words).most_common(1)[0][0][1:])))
        return out

    def yes_probability(self, chats):
        out = []
        for chat in chats:
            text = chat[-1]["content"]
            word = re.search(r'"(w\d+)"', text).group(1)
            example = text.split("Example: ", 1)[1]
            spans = re.findall(r"<<(.*?)>>", example)
            if spans:
                out.append(float(all(WORD.findall(s) == [word] for s in spans)))
            else:
                out.append(float(word in WORD.findall(example)))
        return out


def chat_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 19-token word-level tokenizer with Yes/No and a chat template (fits top_logprobs=20)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + CHAT_WORDS)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
        unk_token="[UNK]", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    tokenizer.chat_template = make_tokenizer().chat_template
    return tokenizer


def chat_model() -> transformers.LlamaForCausalLM:
    """A tiny random Llama over :func:`chat_tokenizer`'s vocabulary, seeded."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(SPECIAL) + len(CHAT_WORDS),
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()
