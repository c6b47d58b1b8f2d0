"""Evaluation suite: ``lightning-interp evaluate SOURCE --evals core,sparse_probing,...``.

Each eval is one module registered with :func:`register_eval` (SAEBench's core, sparse
probing, first-letter absorption and auto-interpretation evals, see each module); importing
this package registers them all. Results are JSON (:mod:`lightning_interp.evals.commands`)
and become a model card's ``model-index`` through :func:`eval_results`.
"""

from lightning_interp.evals import absorption, autointerp, core, sparse_probing
from lightning_interp.evals.model_index import eval_results
from lightning_interp.evals.registry import (
    EvalContext,
    available_evals,
    get_eval,
    parse_eval_names,
    register_eval,
)

__all__ = [
    "EvalContext",
    "absorption",
    "autointerp",
    "available_evals",
    "core",
    "eval_results",
    "get_eval",
    "parse_eval_names",
    "register_eval",
    "sparse_probing",
]
