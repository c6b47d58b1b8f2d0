"""A tiny backbone, dictionary and corpus for the feature-store builder, and a dense reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.backbones.special_tokens import special_token_ids
from lightning_interp.data.tokens import batch_contexts, iter_contexts
from lightning_interp.features.build import Corpus
from tests.backbones.tiny_models import llama
from tests.data.test_tokens import make_tokenizer, random_texts

SITE = "layers.1.resid_post"
CONTEXT, PER_CAPTURE = 16, 4


def tiny_setup(d_latent: int = 48, k: int = 3, documents: int = 30):
    """``(backbone, dictionary, corpus)``, seeded."""
    torch.manual_seed(0)
    backbone = Backbone(llama(), make_tokenizer())
    sae = create_dictionary("topk", d_in=32, d_latent=d_latent, k=k)
    with torch.no_grad():  # latents 0 and 1 never fire: dead latents must give zeros
        sae.W_enc[:, :2] = 0
        sae.b_enc[:2] = -1
    corpus = Corpus(random_texts(documents), context_size=CONTEXT, contexts_per_capture=PER_CAPTURE)
    return backbone, sae, corpus


@dataclass
class Dense:
    """Every kept token of the pass with its dense codes."""

    codes: torch.Tensor  # [N, F]
    source: torch.Tensor  # [N] global token index
    ids: torch.Tensor  # [contexts, context] token ids
    kept: torch.Tensor  # [contexts, context] bool


def dense_pass(backbone, sae, corpus) -> Dense:
    """The same capture batches, encoded densely (same shapes, so the same floats)."""
    special = torch.tensor(special_token_ids(backbone.tokenizer))
    contexts = iter_contexts(corpus.documents(), backbone.tokenizer, corpus.context_size)
    codes, sources, all_ids, all_kept = [], [], [], []
    first = 0
    for _, ids, mask in batch_contexts(contexts, corpus.contexts_per_capture):
        keep = mask.bool() & ~torch.isin(ids, special)
        acts = backbone.capture({"input_ids": ids, "attention_mask": mask}, SITE)[SITE]
        rows = acts.reshape(-1, acts.shape[-1])[keep.reshape(-1)]
        with torch.no_grad():
            codes.append(sae.encode(rows))
        sources.append(keep.reshape(-1).nonzero().squeeze(1) + first * ids.shape[1])
        all_ids.append(ids)
        all_kept.append(keep)
        first += len(ids)
    return Dense(torch.cat(codes), torch.cat(sources), torch.cat(all_ids), torch.cat(all_kept))
