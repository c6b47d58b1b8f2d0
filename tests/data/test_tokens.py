"""Packing, chat contexts and special-token masks, with a word-level tokenizer built offline."""

import itertools

import pytest
import tokenizers
import torch
import transformers
from tokenizers import models, pre_tokenizers

from lightning_interp.backbones.special_tokens import special_token_ids, special_token_mask
from lightning_interp.data.tokens import (
    TextPosition,
    chat_contexts,
    iter_chat,
    iter_packed,
    pack_texts,
)
from lightning_interp.errors import ConfigError

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = [f"w{i}" for i in range(50)] + ["user", "assistant", "system"]
PAD, BOS, EOS, UNK, IM_START, IM_END = range(6)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
)


def make_tokenizer(bos: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer: specials 0-5, then w0..w49 (ids 6..55), then chat roles."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]" if bos else None,
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def w(*indices: int) -> list[int]:
    """Token ids of words w{i}."""
    return [6 + i for i in indices]


def random_texts(n: int, seed: int = 0, low: int = 3, high: int = 40) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=generator).tolist()
    return [
        " ".join(f"w{i}" for i in torch.randint(0, 50, (length,), generator=generator).tolist())
        for length in lengths
    ]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_pack_bos_separator_and_dropped_tail(tokenizer):
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    contexts = [c.tolist() for c in pack_texts(texts, tokenizer, 4)]
    # No separator right after BOS; the document spilling over continues after a new BOS;
    # the tail (w9) that cannot fill a context is dropped.
    assert contexts == [
        [BOS, *w(1, 2, 3)],
        [BOS, *w(4, 5), EOS],
        [BOS, *w(6, 7, 8)],
    ]


@pytest.mark.parametrize(
    ("prepend_bos", "separator", "sep_id"),
    [(True, "eos", EOS), (True, "bos", BOS), (False, "eos", EOS), (False, None, None)],
)
def test_pack_matches_a_reference(tokenizer, prepend_bos, separator, sep_id):
    texts = random_texts(60)
    size = 16
    contexts = list(
        pack_texts(texts, tokenizer, size, prepend_bos=prepend_bos, separator=separator)
    )
    # Reference: join the documents with the separator, cut into bodies, drop a separator
    # that would open a body.
    body_size = size - prepend_bos
    stream = []
    for i, text in enumerate(texts):
        if i and sep_id is not None:
            stream.append(sep_id)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    bodies, body = [], []
    for token in stream:
        if not body and sep_id is not None and token == sep_id:
            continue
        body.append(token)
        if len(body) == body_size:
            bodies.append(body)
            body = []
    expected = [([BOS] if prepend_bos else []) + b for b in bodies]
    assert all(c.shape == (size,) and c.dtype == torch.long for c in contexts)
    assert [c.tolist() for c in contexts] == expected
    assert len(contexts) >= 40


def test_pack_is_lazy_on_endless_text(tokenizer):
    endless = itertools.cycle(["w1 w2 w3 w4 w5"])
    contexts = list(itertools.islice(pack_texts(endless, tokenizer, 8), 5))
    assert len(contexts) == 5
    assert contexts[0].tolist() == [BOS, *w(1, 2, 3, 4, 5), EOS, *w(1)]


def test_pack_resumes_from_any_position(tokenizer):
    texts = random_texts(30, seed=1) + ["", "w3"] + random_texts(10, seed=2)
    full = list(iter_packed(texts, tokenizer, 8, chunk_size=4))
    for k in (0, 1, 7, len(full) // 2, len(full) - 1):
        resumed = list(iter_packed(texts, tokenizer, 8, start=full[k][0], chunk_size=3))
        assert [p for p, _ in resumed] == [p for p, _ in full[k:]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[k:], strict=True))


def test_pack_errors(tokenizer):
    with pytest.raises(ConfigError, match="BOS"):
        list(pack_texts(["w1 w2"], make_tokenizer(bos=False), 4))
    assert list(pack_texts(["w1 w2 w3"], make_tokenizer(bos=False), 3, prepend_bos=False))
    with pytest.raises(ConfigError, match="separator"):
        list(pack_texts(["w1"], tokenizer, 4, separator="pad"))
    with pytest.raises(ConfigError, match="not a string"):
        list(pack_texts([{"text": "w1"}], tokenizer, 4))
    with pytest.raises(ConfigError, match="context_size"):
        list(pack_texts(["w1"], tokenizer, 1))


CONVERSATIONS = [
    [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}],
    [{"role": "user", "content": "w4"}],
    [{"role": "system", "content": " ".join(["w5"] * 30)}],
]


def test_chat_one_conversation_per_context_with_template(tokenizer):
    contexts = list(chat_contexts(CONVERSATIONS, tokenizer, 12))
    assert len(contexts) == len(CONVERSATIONS)  # never packed together
    user, assistant, system = (6 + 50 + i for i in range(3))
    ids, mask = contexts[0]
    templated = [IM_START, user, *w(1, 2), IM_END, IM_START, assistant, *w(3), IM_END]
    assert ids.tolist() == templated + [PAD] * (12 - len(templated))
    assert mask.tolist() == [1] * len(templated) + [0] * (12 - len(templated))
    ids, mask = contexts[1]
    assert ids[:4].tolist() == [IM_START, user, *w(4), IM_END][:4]
    assert int(mask.sum()) == 4 and ids[4:].eq(PAD).all()
    ids, mask = contexts[2]  # truncated, not spilled into a next context
    assert ids.tolist() == [IM_START, system] + w(*[5] * 10) and mask.all()


def test_chat_positions_and_resume(tokenizer):
    full = list(iter_chat(CONVERSATIONS, tokenizer, 12))
    assert [p for p, _, _ in full] == [TextPosition(i, 0) for i in range(3)]
    resumed = list(iter_chat(CONVERSATIONS, tokenizer, 12, start=TextPosition(1, 0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, full[1:], strict=True))


def test_chat_needs_a_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="chat_template"):
        list(chat_contexts(CONVERSATIONS, tokenizer, 8))


def test_special_token_mask(tokenizer):
    assert set(special_token_ids(tokenizer)) == {PAD, BOS, EOS, UNK, IM_START, IM_END}
    ids = torch.tensor([[BOS, *w(1, 2), EOS, PAD], [IM_START, 56, *w(3), IM_END, *w(49)]])
    expected = torch.tensor([[1, 0, 0, 1, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(special_token_mask(ids, tokenizer), expected)
