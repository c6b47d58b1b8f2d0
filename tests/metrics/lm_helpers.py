"""A tiny language model with a real tokenizer, shared by the downstream-metric tests.

Vocabulary of 64 ids: ``<unk>`` 0, BOS ``<s>`` 1, EOS ``</s>`` 2, a chat marker
``<|im_start|>`` 3 (an additional special token), and words ``w4`` ... ``w63``.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 64
UNK, BOS, EOS, MARKER = 0, 1, 2, 3
FIRST_WORD = 4


def word_tokenizer() -> T.PreTrainedTokenizerFast:
    """A real fast tokenizer over the 64 ids (whitespace-split words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS, "<|im_start|>": MARKER}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )


def documents(rows: int, seq: int, seed: int) -> torch.Tensor:
    """``[rows, seq]`` contexts: BOS, words counting up, an EOS between two documents.

    Every context starts with BOS and holds one EOS; about one token in ten is a chat
    marker or ``<unk>``, so every kind of special token occurs.
    """
    generator = torch.Generator().manual_seed(seed)
    words = VOCAB - FIRST_WORD
    starts = torch.randint(0, words, (rows, 1), generator=generator)
    ids = (starts + torch.arange(seq)) % words + FIRST_WORD
    ids[:, 0] = BOS
    ids[torch.arange(rows), torch.randint(3, seq - 2, (rows,), generator=generator)] = EOS
    odd = torch.rand(rows, seq, generator=generator) < 0.1
    odd[:, 0] = False
    other = torch.where(torch.rand(rows, seq, generator=generator) < 0.5, MARKER, UNK)
    return torch.where(odd & (ids != EOS), other, ids)


def trained_gpt2(steps: int = 60) -> T.GPT2LMHeadModel:
    """A 4-layer GPT-2 (width 32) trained briefly on :func:`documents`: it counts."""
    torch.manual_seed(0)
    config = T.GPT2Config(
        n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS
    )
    model = T.GPT2LMHeadModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = documents(16, 16, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
