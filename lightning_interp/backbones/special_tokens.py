"""Which token ids are special: the positions training and evaluation leave out.

Knowledge of a tokenizer, so it lives with the backbones: the activation streams
(:mod:`lightning_interp.data`) mask these positions out of training, and the downstream
metrics (:mod:`lightning_interp.metrics.downstream`) out of evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids of every special token: pad, BOS, EOS, UNK, and added tokens marked special.

    Added special tokens include chat-template markers (``<|im_start|>``, Llama 3's
    ``<|start_header_id|>``) that some tokenizers leave out of ``all_special_ids``.
    """
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for which in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{which}_token_id", None)
        if token_id is not None:
            ids.add(int(token_id))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return sorted(ids)


def special_token_mask(input_ids: Tensor, tokenizer: Any) -> Tensor:
    """True where a token is special (pad, BOS, EOS, chat markers, ...).

    Activations at those positions are left out of training: BOS is an attention sink
    with a huge norm, and pad and separators carry no text.

    Args:
        input_ids: Token ids of any shape.
        tokenizer: The tokenizer that produced them.

    Returns:
        A bool tensor shaped like ``input_ids``.
    """
    special = torch.tensor(special_token_ids(tokenizer), dtype=input_ids.dtype)
    return torch.isin(input_ids, special.to(input_ids.device))
