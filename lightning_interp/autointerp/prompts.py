"""Prompts of the explainer and the scorers, and delphi's ``<<token>>`` highlighting.

Follows EleutherAI delphi (``delphi/explainers/default/prompts.py``,
``delphi/explainers/explainer.py``: ``_highlight``, ``parse_explanation``;
``delphi/scorers/classifier/prompts/{detection,fuzz}_prompt.py``;
``delphi/scorers/classifier/sample.py``): activating tokens are those at or above
``0.3 x`` the example's maximum, consecutive ones share one ``<<...>>``, and an explanation
given after ``[EXPLANATION]:`` is taken from there. The wording is ours and shorter (a 135M
model reads it), with no worked example (a 135M model copies it). Deviation on purpose:
delphi's scorers show several examples per prompt and parse a Python list of 0/1; here
each prompt shows one example and asks for ``Yes`` or ``No``, so a local model's answer is
read from its next-token probabilities (no free text to parse).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Fraction of an example's maximum at which a token counts as activating (delphi's 0.3).
THRESHOLD = 0.3

EXPLAIN_SYSTEM = (
    "You are a meticulous AI researcher studying patterns in language. In each text example "
    "below, special words are marked between delimiters like <<this>>. Describe in one short "
    "sentence what the marked words have in common. Do not mention the markers."
)
EXPLAIN_QUESTION = "What do the marked words have in common? Answer in one short sentence."
# delphi's single-token explainer (SYSTEM_SINGLE_TOKEN): only the activating words.
WORDS_SYSTEM = (
    "Your job is to look for patterns in text. You will be given a list of WORDS; describe in "
    "a few words what they have in common (their meaning, topic or grammar)."
)
WORDS_QUESTION = "What do these words have in common?"
#: Explainer prompt styles: highlighted contexts (delphi's default) or the marked words only.
STYLES = ("contexts", "words")

SCORER_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You are given an "
    "explanation of a feature of text and one text example. {task} Answer with Yes or No only."
)
DETECTION_TASK = "Does the example contain the feature described by the explanation?"
FUZZ_TASK = (
    "Words between << and >> are marked as showing the feature. Is every marked word a "
    "correct instance of the feature described by the explanation?"
)


@dataclass
class Context:
    """One context of a latent: its tokens (decoded strings) and the latent's activations."""

    tokens: list[str]
    activations: list[float]

    def text(self) -> str:
        """The plain text."""
        return "".join(self.tokens)

    def marks(self, threshold: float = THRESHOLD) -> list[bool]:
        """Which tokens are activating: at or above ``threshold`` x the example's maximum."""
        top = max(self.activations, default=0.0)
        if top <= 0:
            return [False] * len(self.tokens)
        return [a >= threshold * top for a in self.activations]


def highlight(tokens: list[str], marks: list[bool]) -> str:
    """Join ``tokens``, wrapping each run of marked tokens in ``<<`` ``>>`` (delphi)."""
    out: list[str] = []
    for i, token in enumerate(tokens):
        if marks[i] and (i == 0 or not marks[i - 1]):
            out.append("<<")
        out.append(token)
        if marks[i] and (i + 1 == len(tokens) or not marks[i + 1]):
            out.append(">>")
    return "".join(out)


def explain_messages(examples: list[Context], style: str = "contexts") -> list[dict[str, str]]:
    """The explainer's chat for one latent.

    ``"contexts"``: each context with its activating tokens as ``<<...>>`` (delphi's default
    explainer); ``"words"``: the list of marked words only (delphi's single-token explainer),
    a much shorter prompt that a 135M model answers better. No worked example: a 135M model
    copies a worked example's answer instead of reading the latent's contexts.
    """
    if style == "words":
        words = ["".join(t for t, m in zip(c.tokens, c.marks(), strict=True) if m).strip()
                 for c in examples]  # fmt: skip
        user = f"WORDS: {words}\n{WORDS_QUESTION}"
        return [{"role": "system", "content": WORDS_SYSTEM}, {"role": "user", "content": user}]
    body = "\n".join(
        f"Example {i + 1}: {highlight(c.tokens, c.marks())}" for i, c in enumerate(examples)
    )
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": f"{body}\n\n{EXPLAIN_QUESTION}"},
    ]


def parse_explanation(answer: str) -> str:
    """The text after ``[EXPLANATION]:`` (delphi's tag); else the answer's first line.

    delphi returns "Explanation could not be parsed." when the tag is missing; our prompts
    ask for one sentence without the tag, so the first non-empty line is the explanation.
    """
    match = re.search(r"\[EXPLANATION\]:\s*(.*)", answer, re.DOTALL)
    text = match.group(1) if match else answer
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0][:300]


def scorer_messages(task: str, explanation: str, example: str) -> list[dict[str, str]]:
    """A yes/no question about one example (``task`` is DETECTION_TASK or FUZZ_TASK)."""
    return [
        {"role": "system", "content": SCORER_SYSTEM.format(task=task)},
        {"role": "user", "content": f"Explanation: {explanation}\n\nExample: {example}"},
    ]
