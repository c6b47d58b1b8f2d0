"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption").

Follows SAEBench's ``absorption_first_letter`` eval (adamkarvonen/SAEBench,
``sae_bench/evals/absorption/``: ``vocab.py``, ``k_sparse_probing.py``,
``feature_absorption_calculator.py``, ``main.py``), with any tokenizer:

1. Words: single vocabulary tokens made only of ASCII letters (a leading space allowed),
   ``get_alpha_tokens``. Each becomes an in-context prompt
   ``"<10 examples, one per line>{word} has the first letter:"`` (examples answered `` X``), and the
   activation is read at the word's token (SAEBench's ``prompt_token_pos``). Words are
   split into train and test (seeded).
2. Ground truth: one-vs-rest logistic-regression probes for each first letter on the
   activations; a letter is evaluated when its probe's test F1 exceeds 0.6
   (``min_GT_probe_f1``).
3. Main latents: k-sparse probes on the codes for k = 1..10; the latents of the largest k
   whose F1 still rose by more than 0.03 over k - 1 (``add_feature_splits_to_metrics_df``).
   Deviation: SAEBench ranks candidate latents by the weights of an L1-regularised probe on
   all codes; we rank them by the difference of class means of the codes (the selection
   SAEBench's sparse-probing eval uses), which needs no probe on ``d_latent`` inputs.
4. For every test word the probe detects (score > 0): the *absorption fraction*
   (Demian Till's variant, SAEBench ``mean_absorption_fraction_score``) and *full
   absorption* (Chanin et al.'s, SAEBench ``mean_full_absorption_score``), computed from
   each latent's projection onto the unit probe direction, ``code_i * cos(W_dec[i], probe)``,
   exactly as ``FeatureAbsorptionCalculator.calculate_absorption`` does (thresholds: cosine
   0.025 for full, 0.1 for fractional absorption, projection share 0.4, at most 3
   absorbing latents). Each letter's rates are averaged over letters; ``valid`` is false
   when fewer than 20 letters pass the F1 gate (SAEBench's ``min_feats_for_eval``, under
   which SAEBench reports no score; we report the numbers and the flag).

SAEBench warns that the task needs a model that can spell (>= 1B parameters) and a wide
dictionary (>= 16k latents); on small models few letters pass the F1 gate and the numbers
are reported with the count of letters they cover.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_interp.errors import ConfigError
from lightning_interp.evals.registry import EvalContext, register_eval

FULL_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionSettings:
    """SAEBench's defaults, and our size limits for a CPU run."""

    max_words: int = 1500
    icl_examples: int = 10
    test_fraction: float = 0.2
    max_k: int = 10
    f1_jump: float = 0.03
    min_probe_f1: float = 0.6
    min_letters: int = 20
    template: str = "{word} has the first letter:"


def alpha_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """``(id, text)`` of single tokens made of ASCII letters, a leading space allowed."""
    letters = set(string.ascii_letters)
    words = []
    for token_id in sorted(set(tokenizer.get_vocab().values())):
        text = tokenizer.decode([token_id])
        word = text[1:] if text.startswith(" ") else text
        if word and set(word) <= letters:
            words.append((token_id, text))
    return words


def absorption_for_word(
    probe_projection: float, codes: Tensor, cos: Tensor, main: Sequence[int]
) -> tuple[float, bool]:
    """SAEBench's absorption fraction and full-absorption flag for one word.

    Args:
        probe_projection: ``activation @ unit_probe``.
        codes: The word's codes, ``[d_latent]``.
        cos: Cosine of each decoder row with the probe, ``[d_latent]``.
        main: The letter's main latents.
    """
    if probe_projection == 0:
        return 0.0, False
    latent_projections = codes * cos
    main_idx = torch.tensor(list(main), dtype=torch.long)
    main_proj = float(latent_projections[main_idx].sum())
    candidates = torch.ones_like(cos, dtype=torch.bool)
    candidates[main_idx] = False
    candidates &= (cos >= FRACTION_COS) & (latent_projections > 0)
    values = latent_projections[candidates]
    absorbers = float(values.topk(min(MAX_ABSORBERS, values.numel())).values.sum())
    if main_proj >= probe_projection or absorbers / probe_projection < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbers, probe_projection - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(latent_projections.argmax())
    full = (
        bool((codes[main_idx] < EPS).all())
        and float(cos[top]) >= FULL_COS
        and probe_projection >= 0
        and float(latent_projections[top]) / probe_projection >= PROJECTION_SHARE
    )
    return fraction, full


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(truth, pred, zero_division=0.0))


def main_latents(
    train_codes: Tensor,
    train_y: Tensor,
    test_codes: Tensor,
    test_y: Tensor,
    settings: AbsorptionSettings,
) -> list[int]:
    """The letter's main latents: grow k while the k-sparse probe's F1 jumps (SAEBench)."""
    from sklearn.linear_model import LogisticRegression

    ranked = (train_codes[train_y == 1].mean(0) - train_codes[train_y == 0].mean(0)).argsort(
        descending=True
    )
    best, chosen = -100.0, []
    for k in range(1, settings.max_k + 1):
        feats = ranked[:k]
        probe = LogisticRegression(max_iter=1000, class_weight="balanced")
        probe.fit(train_codes[:, feats].double().numpy(), train_y.numpy())
        pred = probe.decision_function(test_codes[:, feats].double().numpy()) > 0
        score = _f1(pred, test_y.numpy())
        if score <= best + settings.f1_jump:
            break
        best, chosen = score, feats.tolist()
    return chosen


def score_letters(
    train: tuple[Tensor, Tensor, Tensor],
    test: tuple[Tensor, Tensor, Tensor],
    decoder: Tensor,
    settings: AbsorptionSettings,
) -> dict[str, Any]:
    """The absorption metrics from ``(activations, codes, letter index)`` train/test sets.

    Args:
        train: ``([n, d] activations, [n, d_latent] codes, [n] letter index 0..25)``.
        test: The same for the test words.
        decoder: ``W_dec``, ``[d_latent, d]``.
        settings: Thresholds and ``max_k``.
    """
    from sklearn.linear_model import LogisticRegression

    (xtr, ctr, ytr), (xte, cte, yte) = train, test
    per_letter: dict[str, dict[str, Any]] = {}
    for index, letter in enumerate(string.ascii_lowercase):
        if (ytr == index).sum() < 2 or (yte == index).sum() < 1:
            continue
        btr, bte = (ytr == index).long(), (yte == index).long()
        probe = LogisticRegression(max_iter=1000, class_weight="balanced")
        probe.fit(xtr.double().numpy(), btr.numpy())
        scores = probe.decision_function(xte.double().numpy())
        f1 = _f1(scores > 0, bte.numpy())
        if f1 <= settings.min_probe_f1:
            continue
        main = main_latents(ctr, btr, cte, bte, settings)
        direction = torch.from_numpy(probe.coef_[0]).to(decoder.dtype)
        direction = direction / direction.norm()
        cos = torch.nn.functional.cosine_similarity(decoder, direction[None], dim=-1).double()
        detected = ((bte == 1) & torch.from_numpy(scores > 0)).nonzero().squeeze(1)
        fractions, fulls = [], []
        for row in detected.tolist():
            projection = float(xte[row].double() @ direction.double())
            fraction, full = absorption_for_word(projection, cte[row].double(), cos, main)
            fractions.append(fraction)
            fulls.append(full)
        per_letter[letter] = {
            "probe_f1": f1,
            "main_latents": main,
            "probe_true_positives": len(detected),
            "mean_absorption_fraction": float(np.mean(fractions)) if fractions else 0.0,
            "full_absorption_rate": float(np.mean(fulls)) if fulls else 0.0,
        }
    letters = list(per_letter.values())

    def mean(key: str) -> float | None:
        return float(np.mean([r[key] for r in letters])) if letters else None

    return {
        "mean_absorption_fraction_score": mean("mean_absorption_fraction"),
        "mean_full_absorption_score": mean("full_absorption_rate"),
        "mean_num_split_features": (
            float(np.mean([len(r["main_latents"]) for r in letters])) if letters else None
        ),
        "letters_evaluated": len(letters),
        # SAEBench reports nothing unless min_feats_for_eval (20) letters pass the F1 gate.
        "valid": len(letters) >= settings.min_letters,
        "per_letter": per_letter,
    }


@torch.no_grad()
def word_activations(
    context: EvalContext,
    words: Sequence[tuple[int, str]],
    icl: Sequence[str],
    template: str,
    batch_size: int = 32,
) -> Tensor:
    """Activations ``[n, d]`` at each word's token in its in-context first-letter prompt."""
    tokenizer = getattr(context.backbone.tokenizer, "tokenizer", context.backbone.tokenizer)
    head, tail = template.split("{word}")
    examples = "".join(f"{head}{w}{tail} {w.strip()[0].upper()}\n" for w in icl) + head
    prefix = tokenizer(examples)["input_ids"]
    suffix = tokenizer(tail, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*prefix, token_id, *suffix] for token_id, _ in words])
    out = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        acts = context.backbone.capture({"input_ids": batch}, context.site)[context.site]
        out.append(acts[:, len(prefix)].float())
    return torch.cat(out)


@register_eval("absorption")
def run(context: EvalContext, settings: AbsorptionSettings | None = None) -> dict:
    """The first-letter absorption eval on the backbone's own vocabulary."""
    from dataclasses import asdict

    from lightning_interp.evals.core import reconstruct

    settings = settings or AbsorptionSettings()
    tokenizer = getattr(context.backbone.tokenizer, "tokenizer", context.backbone.tokenizer)
    vocab = alpha_tokens(tokenizer)
    if len(vocab) < 2 * settings.icl_examples:
        raise ConfigError(
            f"the tokenizer has {len(vocab)} single alphabetic tokens; the first-letter task "
            f"needs at least {2 * settings.icl_examples}: use a backbone with word tokens"
        )
    order = torch.randperm(len(vocab), generator=torch.Generator().manual_seed(context.seed))
    chosen = [vocab[i] for i in order[: settings.max_words + settings.icl_examples].tolist()]
    icl, words = [w for _, w in chosen[: settings.icl_examples]], chosen[settings.icl_examples :]
    acts = word_activations(context, words, icl, settings.template)
    codes = reconstruct(context.dictionary, acts)[0].float().cpu()
    letters = torch.tensor([string.ascii_lowercase.index(w.strip()[0].lower()) for _, w in words])
    cut = round(len(words) * (1 - settings.test_fraction))
    decoder = context.dictionary.W_dec.detach().float().cpu()
    metrics = score_letters(
        (acts[:cut], codes[:cut], letters[:cut]),
        (acts[cut:], codes[cut:], letters[cut:]),
        decoder,
        settings,
    )
    return {
        "metrics": metrics,
        "settings": {
            **asdict(settings),
            "variant": "SAEBench absorption_first_letter (absorption fraction and full absorption)",
            "vocabulary": f"{len(vocab)} single alphabetic tokens of the backbone's tokenizer",
            "words": len(words),
            "icl_examples_words": icl,
            "evaluated_words": [w for _, w in words],
            "latent_ranking": "class-mean difference of codes (SAEBench: L1 probe weights)",
        },
    }
