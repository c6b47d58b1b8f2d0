"""Text to fixed-size token contexts: packed documents, or one chat conversation a context.

Packing follows SAELens: documents are tokenized without the tokenizer's own special
tokens, joined with a separator token (EOS by default), cut into contexts of
``context_size`` tokens, and every context starts with BOS (a document that spills over
continues after the next context's BOS). The tail that does not fill a whole context is
dropped.

Chat mode keeps each conversation in its own context (never packed with another one):
SAEs for instruct models train better on whole, templated conversations.

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


def _chat_ids(tokenizer: Any, conversation: Sequence[Mapping[str, Any]]) -> list[int]:
    ids = tokenizer.apply_chat_template(conversation, tokenize=True)
    # transformers 5 returns a BatchEncoding, 4.x a plain list.
    if isinstance(ids, Mapping):
        ids = ids["input_ids"]
    if isinstance(ids, Tensor):
        ids = ids.tolist()
    return list(ids)


def iter_chat(
    conversations: Iterable[Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    context_size: int,
    *,
    start: TextPosition = START,
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """Chat contexts with their position ``(conversation index, 0)``.

    Args:
        conversations: Lists of ``{"role": ..., "content": ...}`` messages.
        tokenizer: A Hugging Face tokenizer with a chat template.
        context_size: Tokens per context; longer conversations are truncated.
        start: Position to start from (earlier conversations are skipped untemplated).

    Yields:
        ``(position, input_ids, attention_mask)``, both tensors ``[context_size]``.
    """
    if context_size < 1:
        raise ConfigError(f"context_size must be positive, got {context_size}")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat mode needs a tokenizer with a chat_template")
    pad = _pad_id(tokenizer)
    remaining = itertools.islice(iter(conversations), start.document, None)
    for index, conversation in enumerate(remaining, start.document):
        ids = _chat_ids(tokenizer, conversation)[:context_size]
        if not ids:
            continue
        input_ids = torch.full((context_size,), pad, dtype=torch.long)
        input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask = torch.zeros(context_size, dtype=torch.long)
        attention_mask[: len(ids)] = 1
        yield TextPosition(index, 0), input_ids, attention_mask


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
    prepend_bos: bool = True,
    separator: Separator = "eos",
    start: TextPosition = START,
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """Packed documents or chat conversations, as ``(position, input_ids, attention_mask)``.

    One interface for both modes (:func:`iter_packed`, whose contexts have no padding, and
    :func:`iter_chat`); ``prepend_bos`` and ``separator`` apply to packing only.
    """
    if chat:
        yield from iter_chat(texts, tokenizer, context_size, start=start)
        return
    for position, ids in iter_packed(
        texts, tokenizer, context_size, prepend_bos=prepend_bos, separator=separator, start=start
    ):
        yield position, ids, torch.ones_like(ids)


def batch_contexts(
    contexts: Iterable[tuple[TextPosition, Tensor, Tensor]], size: int
) -> Iterator[tuple[TextPosition, Tensor, Tensor]]:
    """Group ``(position, ids, mask)`` contexts by ``size`` (the last group may be smaller).

    Yields:
        ``(position of the first context, input_ids [n, context], attention_mask [n, context])``.
    """
    contexts = iter(contexts)
    while group := list(itertools.islice(contexts, size)):
        yield group[0][0], torch.stack([g[1] for g in group]), torch.stack([g[2] for g in group])
