"""An eval results JSON as a model card's ``model-index`` entries.

``build_card(entries, repo_id=..., eval_results=[...])``
(:func:`~lightning_interp.zoo.card.build_card`) appends the list :func:`eval_results`
returns to the training metrics' results: each headline number becomes one
``huggingface_hub.EvalResult`` naming the eval, its dataset and its settings' source, as
SAEBench names them. The conversion lives in :mod:`lightning_interp.zoo.card_evals` (the
card builder needs it, and the zoo may not import this package); it is re-exported here.
"""

from __future__ import annotations

from lightning_interp.zoo.card_evals import HEADLINES, eval_results

__all__ = ["HEADLINES", "eval_results"]
