"""Text to fixed-size token contexts: packed documents, or one chat conversation a context.

Packing follows SAELens: documents are tokenized without the tokenizer's own special
tokens, joined with a separator token (EOS by default), cut into contexts of
``context_size`` tokens, and every context starts with BOS (a document that spills over
continues after the next context's BOS). The tail that does not fill a whole context is
dropped.

Chat mode keeps each conversation in its own context (never packed with another one):
SAEs for instruct models train better on whole, templated conversations.

Sequential chat mode is FAST, the *Finetuning-aligned Sequential Training* of Li et al.,
"Training Superior Sparse Autoencoders for Instruct Models" (arXiv:2506.07691, sec. 3.1
and 4.1; from the paper's text, not its released code, which was not consulted): each
conversation goes through the model's chat template and is one sequence of its own, whole
and in order, with no context size but a truncation length (8,192 in the paper;
``context_size`` here). Sequences are not padded to that length, only to the longest one
of a capture batch (:func:`batch_contexts`), and the padding is masked out. Which token
positions train is the stream's choice (FAST keeps the template's special tokens:
:class:`~lightning_interp.data.stream.ActivationStream`). The block-training baseline on
the same conversations (the paper's BT(F)) is :func:`render_chat` followed by packing.

Both come in a plain form (:func:`pack_texts`, :func:`chat_contexts`) and a positioned
form (:func:`iter_packed`, :func:`iter_chat`) that also says where each context starts in
the text and can start at such a position. Resumable streams use the latter to skip to a
context without re-tokenizing what came before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_interp.errors import ConfigError

Separator = Literal["eos", "bos"] | int | None


class TextPosition(NamedTuple):
    """Where a context starts: a document (or conversation) index and a token offset in it."""

    document: int
    token: int = 0


START = TextPosition(0, 0)


# BERT-style encoders have no BOS/EOS; their [CLS]/[SEP] play those roles.
_ENCODER_FALLBACK = {"bos": "cls", "eos": "sep"}


def _token_id(tokenizer: Any, which: str) -> int:
    token_id = getattr(tokenizer, f"{which}_token_id", None)
    if token_id is None:
        token_id = getattr(tokenizer, f"{_ENCODER_FALLBACK[which]}_token_id", None)
    if token_id is None:
        raise ConfigError(
            f"the tokenizer has no {which.upper()} token; choose another separator, pass "
            f"prepend_bos=False, or set tokenizer.{which}_token"
        )
    return int(token_id)


def _separator_id(tokenizer: Any, separator: Separator) -> int | None:
    if separator is None or isinstance(separator, int):
        return separator
    if separator not in ("eos", "bos"):
        raise ConfigError(f"separator must be 'eos', 'bos', a token id or None, got {separator!r}")
    return _token_id(tokenizer, separator)


def _tokenized(
    texts: Iterable[str], tokenizer: Any, start: int, chunk_size: int
) -> Iterator[tuple[int, list[int]]]:
    """``(document index, token ids)`` from ``start`` on, tokenizing ``chunk_size`` at a time."""
    documents = itertools.islice(iter(texts), start, None)
    index = start
    while chunk := list(itertools.islice(documents, chunk_size)):
        for position, text in enumerate(chunk):
            if not isinstance(text, str):
                raise ConfigError(
                    f"document {index + position} is a {type(text).__name__}, not a string; "
                    f"pick the text column of a dataset of records"
                )
        # verbose=False: long documents are fine here, they are cut into contexts below.
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            yield index, ids
            index += 1


def iter_packed(
    texts: Iterable[str],
    tokenizer: Any,
    context_size: int,
    *,
    prepend_bos: bool = True,
    separator: Separator = "eos",
    start: TextPosition = START,
    chunk_size: int = 64,
) -> Iterator[tuple[TextPosition, Tensor]]:
    """Packed contexts with the position of their first (non-BOS) token.

    Starting at a position a previous pass reported gives exactly the contexts that pass
    gave from there on; documents before it are skipped without being tokenized.

    Args:
        texts: Documents.
        tokenizer: A Hugging Face tokenizer.
        context_size: Tokens per context, BOS included.
        prepend_bos: Start every context with the BOS token.
        separator: Token put between two documents: ``"eos"``, ``"bos"``, a token id, or
            ``None`` for none. It is left out at the start of a context, where BOS (or
            nothing) already marks the boundary.
        start: Where to start.
        chunk_size: Documents tokenized per call of the tokenizer.

    Yields:
        ``(position, input_ids)`` with ``input_ids`` a ``[context_size]`` long tensor.
    """
    bos = _token_id(tokenizer, "bos") if prepend_bos else None
    body_size = context_size - (bos is not None)
    if body_size < 1:
        raise ConfigError(f"context_size must leave room for a token after BOS, got {context_size}")
    separator_id = _separator_id(tokenizer, separator)
    prefix = [] if bos is None else [bos]
    body: list[int] = []
    position = start
    for document, ids in _tokenized(texts, tokenizer, start.document, chunk_size):
        offset = start.token if document == start.document else 0
        if offset >= len(ids):
            continue
        if body and separator_id is not None:
            body.append(separator_id)
            if len(body) == body_size:
                yield position, torch.tensor(prefix + body, dtype=torch.long)
                body = []
        while offset < len(ids):
            if not body:
                position = TextPosition(document, offset)
            taken = ids[offset : offset + body_size - len(body)]
            body.extend(taken)
            offset += len(taken)
            if len(body) == body_size:
                yield position, torch.tensor(prefix + body, dtype=torch.long)
                body = []


def pack_texts(
    texts: Iterable[str],
    tokenizer: Any,
    context_size: int,
    *,
    prepend_bos: bool = True,
    separator: Separator = "eos",
) -> Iterator[Tensor]:
    """Tokenize documents lazily and pack them into fixed-size contexts, as SAELens does.

    Args:
        texts: Documents (any iterable; tokenized in chunks, so it may be huge or endless).
        tokenizer: A Hugging Face tokenizer.
        context_size: Tokens per context, the BOS included.
        prepend_bos: Start every context with BOS.
        separator: Token between documents (``"eos"``, ``"bos"``, a token id, or ``None``).

    Yields:
        ``[context_size]`` long tensors of token ids. With ``context_size=4``, BOS
        ``<s>`` and separator ``</s>``, documents ``"a b c d e"`` and ``"f g"`` give
        ``<s> a b c``, ``<s> d e </s>``, and ``f g`` waits for more text.
    """
    for _, ids in iter_packed(
        texts, tokenizer, context_size, prepend_bos=prepend_bos, separator=separator
    ):
        yield ids


def _pad_id(tokenizer: Any) -> int:
    for which in ("pad", "eos"):
        token_id = getattr(tokenizer, f"{which}_token_id", None)
        if token_id is not None:
            return int(token_id)
    raise ConfigError("chat contexts are right-padded: the tokenizer needs a pad or EOS token")


def _messages(conversation: str | Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    # A plain document is one user turn, so text sources work in the chat modes too.
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    return conversation


def _chat_ids(tokenizer: Any, conversation: str | Sequence[Mapping[str, Any]]) -> list[int]:
    ids = tokenizer.apply_chat_template(_messages(conversation), tokenize=True)
    # transformers 5 returns a BatchEncoding, 4.x a plain list.
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return list(ids)


def _templated(
    conversations: Iterable[Any], tokenizer: Any, max_tokens: int, start: TextPosition
) -> Iterator[tuple[int, list[int]]]:
    """``(conversation index, templated ids truncated to max_tokens)``, empty ones skipped."""
    if max_tokens < 1:
        raise ConfigError(f"context_size must be positive, got {max_tokens}")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat mode needs a tokenizer with a chat_template")
    remaining = itertools.islice(iter(conversations), start.document, None)
    for index, conversation in enumerate(remaining, start.document):
        ids = _chat_ids(tokenizer, conversation)[:max_tokens]
        if ids:
            yield index, ids


def iter_chat(
    conversations: Iterable[Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    context_size: int,
    *,
    start: TextPosition = START,
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """Chat contexts with their position ``(conversation index, 0)``.

    Args:
        conversations: Lists of ``{"role": ..., "content": ...}`` messages (a plain string
            is one user message).
        tokenizer: A Hugging Face tokenizer with a chat template.
        context_size: Tokens per context; longer conversations are truncated.
        start: Position to start from (earlier conversations are skipped untemplated).

    Yields:
        ``(position, input_ids, attention_mask)``, both tensors ``[context_size]``.
    """
    pad = _pad_id(tokenizer)
    for index, ids in _templated(conversations, tokenizer, context_size, start):
        input_ids = torch.full((context_size,), pad, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask = torch.zeros(context_size, dtype=torch.long)
        attention_mask[: len(ids)] = 1
        yield TextPosition(index, 0), input_ids, attention_mask


def iter_conversations(
    conversations: Iterable[Any],
    tokenizer: Any,
    max_tokens: int,
    *,
    start: TextPosition = START,
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """FAST sequences: each templated conversation whole, in order, unpadded.

    Takes what :func:`iter_chat` takes, with ``max_tokens``, the truncation length (the
    paper's 8,192), in place of ``context_size``: shorter conversations keep their length.

    Yields:
        ``(position, input_ids, attention_mask)``: ``position`` is ``(conversation index,
        0)``, ``input_ids`` the templated conversation (special tokens included) and the
        mask all ones, both ``[min(length, max_tokens)]``.
    """
    for index, ids in _templated(conversations, tokenizer, max_tokens, start):
        input_ids = torch.tensor(ids, dtype=torch.long)
        yield TextPosition(index, 0), input_ids, torch.ones_like(input_ids)


def render_chat(conversations: Iterable[Any], tokenizer: Any) -> Iterator[str]:
    """Each conversation as the text of its chat template, special tokens written out.

    Packing these (:func:`iter_packed`) is the block-training baseline on chat data, the
    paper's BT(F): the same templated conversations as FAST, concatenated into blocks.
    The tokenizer reads the written-out special tokens back as their ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("rendering chat needs a tokenizer with a chat_template")
    for conversation in conversations:
        yield tokenizer.apply_chat_template(_messages(conversation), tokenize=False)


def chat_contexts(
    conversations: Iterable[Sequence[Mapping[str, Any]]], tokenizer: Any, context_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """One chat-templated conversation per context, truncated and right-padded.

    Conversations are never packed together, unlike :func:`pack_texts`.

    Args:
        conversations: Lists of ``{"role": ..., "content": ...}`` messages.
        tokenizer: A Hugging Face tokenizer with a ``chat_template``.
        context_size: Tokens per context.

    Yields:
        ``(input_ids, attention_mask)``, each a ``[context_size]`` long tensor; padding
        has mask 0.
    """
    for _, input_ids, attention_mask in iter_chat(conversations, tokenizer, context_size):
        yield input_ids, attention_mask


def iter_contexts(
    texts: Iterable[Any],
    tokenizer: Any,
    context_size: int,
    *,
    chat: bool = False,
    sequential_chat: bool = False,
    prepend_bos: bool = True,
    separator: Separator = "eos",
    start: TextPosition = START,
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """Packed documents or chat conversations, as ``(position, input_ids, attention_mask)``.

    One interface for the three modes (:func:`iter_packed`, whose contexts have no padding;
    :func:`iter_chat`; and with ``sequential_chat``, whatever ``chat`` says,
    :func:`iter_conversations`, whose sequences have their own lengths);
    ``prepend_bos`` and ``separator`` apply to packing only.
    """
    if sequential_chat:
        yield from iter_conversations(texts, tokenizer, context_size, start=start)
        return
    if chat:
        yield from iter_chat(texts, tokenizer, context_size, start=start)
        return
    for position, ids in iter_packed(
        texts, tokenizer, context_size, prepend_bos=prepend_bos, separator=separator, start=start
    ):
        yield position, ids, torch.ones_like(ids)


def batch_contexts(
    contexts: Iterable[tuple[TextPosition, Tensor, Tensor]], size: int, pad_id: int = 0
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """Group ``(position, ids, mask)`` contexts by ``size`` (the last group may be smaller).

    Contexts of unequal lengths (FAST sequences) are right-padded with ``pad_id`` to the
    longest of their group, mask 0: a causal model's outputs at the real tokens do not
    depend on padding after them.

    Yields:
        ``(position of the first context, input_ids [n, context], attention_mask [n, context])``.
    """
    contexts = iter(contexts)
    while group := list(itertools.islice(contexts, size)):
        longest = max(len(g[1]) for g in group)
        if all(len(g[1]) == longest for g in group):
            yield (
                group[0][0],
                torch.stack([g[1] for g in group]),
                torch.stack([g[2] for g in group]),
            )
            continue
        input_ids = torch.full((len(group), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), longest), dtype=torch.long)
        for row, (_, ids, mask) in enumerate(group):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = mask
        yield group[0][0], input_ids, attention_mask


def iter_batches(
    texts: Iterable[Any], tokenizer: Any, context_size: int, size: int, **options: Any
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """:func:`iter_contexts` (``options`` are its keywords) grouped ``size`` at a time.

    Grouped by :func:`batch_contexts`; FAST sequences are padded with the tokenizer's pad
    token (EOS without one).
    """
    contexts = iter_contexts(texts, tokenizer, context_size, **options)
    pad = _pad_id(tokenizer) if options.get("sequential_chat") else 0
    yield from batch_contexts(contexts, size, pad_id=pad)
