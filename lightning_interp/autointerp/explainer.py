"""Chat models that explain latents and answer the scorers' yes/no questions.

Two back ends with one interface (:class:`ChatModel`): :class:`LocalChatModel`, any
transformers causal LM (default the packaged SmolLM2-135M-Instruct, ``offline:smollm2``),
and :class:`EndpointChatModel`, any OpenAI-compatible ``/v1/chat/completions`` server (vLLM,
TGI, llama.cpp...) through huggingface_hub's ``InferenceClient(base_url=...)``.

The explainer follows EleutherAI delphi's default explainer
(``delphi/explainers/default/default.py``): highlighted contexts in, a one-line explanation
after ``[EXPLANATION]:`` out, greedy decoding. Yes/no answers are read as
``P(Yes) / (P(Yes) + P(No))`` of the next token, as delphi's classifier reads
``P(1) / (P(0) + P(1))`` from the top log-probabilities (``_parse_logprobs``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from lightning_interp.autointerp.prompts import Context, explain_messages, parse_explanation

YES = ("Yes", " Yes", "yes", " yes", "YES")
NO = ("No", " No", "no", " no", "NO")


class ChatModel(Protocol):
    """What the explainer and the scorers need from a model."""

    name: str

    def generate(self, chats: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        """Greedy answers to each chat."""
        ...

    def yes_probability(self, chats: list[list[dict[str, str]]]) -> list[float]:
        """``P(Yes) / (P(Yes) + P(No))`` of each chat's next token."""
        ...


def _first_ids(tokenizer: Any, words: tuple[str, ...]) -> list[int]:
    ids = {tokenizer.encode(w, add_special_tokens=False)[:1][0] for w in words if w.strip()}
    ids.discard(tokenizer.unk_token_id)
    return sorted(i for i in ids if i is not None)


class LocalChatModel:
    """A transformers causal LM answering chats in batches (left-padded, greedy).

    Args:
        model: A causal LM (``...ForCausalLM``).
        tokenizer: Its tokenizer; its chat template is used when it has one, else
            ``role: content`` lines.
        name: What results record as the model.
        batch_size: Chats per forward.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "local", batch_size: int = 8):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.yes_ids = _first_ids(tokenizer, YES)
        self.no_ids = _first_ids(tokenizer, NO)

    def _prompt(self, chat: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in chat) + "\nassistant:"
        return self.tokenizer.encode(text)

    def _batch(self, chats: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
        """Left-padded ids, mask and positions (so each row's last token is at -1)."""
        rows = [self._prompt(chat) for chat in chats]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @torch.no_grad()
    def generate(self, chats: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        """Greedy answers, ``batch_size`` chats at a time."""
        answers = []
        for start in range(0, len(chats), self.batch_size):
            batch = self._batch(chats[start : start + self.batch_size])
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id
            )
            new = out[:, batch["input_ids"].shape[1] :]
            answers += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return answers

    @torch.no_grad()
    def yes_probability(self, chats: list[list[dict[str, str]]]) -> list[float]:
        """The next token's ``P(Yes) / (P(Yes) + P(No))``, ``batch_size`` chats at a time."""
        probabilities: list[float] = []
        for start in range(0, len(chats), self.batch_size):
            batch = self._batch(chats[start : start + self.batch_size])
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            logits = self.model(**batch, position_ids=positions).logits[:, -1].float()
            p = logits.softmax(-1)
            yes, no = p[:, self.yes_ids].sum(-1), p[:, self.no_ids].sum(-1)
            probabilities += (yes / (yes + no).clamp_min(1e-30)).tolist()
        return probabilities


class EndpointChatModel:
    """An OpenAI-compatible chat endpoint through ``huggingface_hub.InferenceClient``.

    Yes/no answers ask for one token with its top 20 log-probabilities (OpenAI's maximum);
    a server that returns none is read from its text (1.0 for "yes...", else 0.0).

    Args:
        base_url: The server, e.g. ``http://localhost:8000`` (the client adds
            ``/v1/chat/completions``).
        model: Model name sent in each request (servers hosting one model ignore it).
        api_key: Bearer token, if the server wants one.
    """

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None):
        from huggingface_hub import InferenceClient

        self.client = InferenceClient(base_url=base_url, api_key=api_key)
        self.model = model
        self.name = f"{base_url} ({model})" if model else base_url

    def generate(self, chats: list[list[dict[str, str]]], max_new_tokens: int) -> list[str]:
        """Greedy (temperature 0) answers, one request per chat."""
        answers = []
        for chat in chats:
            out = self.client.chat_completion(
                chat, model=self.model, max_tokens=max_new_tokens, temperature=0.0
            )
            answers.append(out.choices[0].message.content or "")
        return answers

    def yes_probability(self, chats: list[list[dict[str, str]]]) -> list[float]:
        """``P(Yes) / (P(Yes) + P(No))`` from the first token's top log-probabilities."""
        out = []
        for chat in chats:
            choice = self.client.chat_completion(
                chat, model=self.model, max_tokens=1, temperature=0.0, logprobs=True,
                top_logprobs=20,
            ).choices[0]  # fmt: skip
            content = choice.logprobs.content if choice.logprobs else None
            if not content:
                answer = (choice.message.content or "").strip().lower()
                out.append(1.0 if answer.startswith("yes") else 0.0)
                continue
            tops = content[0].top_logprobs or []
            yes = sum(math.exp(t.logprob) for t in tops if t.token.strip().lower() == "yes")
            no = sum(math.exp(t.logprob) for t in tops if t.token.strip().lower() == "no")
            first = content[0].token.strip().lower()
            out.append(yes / (yes + no) if yes + no > 0 else float(first == "yes"))
        return out


def load_chat_model(
    model: str = "offline:smollm2", base_url: str | None = None, batch_size: int = 8
) -> ChatModel:
    """A local transformers model by name, or an endpoint when ``base_url`` is given."""
    if base_url:
        return EndpointChatModel(base_url, model=None if model.startswith("offline:") else model)
    from lightning_interp.backbones import load_backbone

    backbone = load_backbone(model, dtype=torch.float32)
    return LocalChatModel(backbone.model, backbone.tokenizer, name=model, batch_size=batch_size)


def explain(
    model: ChatModel,
    examples: list[list[Context]],
    max_new_tokens: int = 48,
    style: str = "contexts",
) -> list[str]:
    """One explanation per latent from its contexts (``style``: see ``explain_messages``)."""
    answers = model.generate([explain_messages(ex, style) for ex in examples], max_new_tokens)
    return [parse_explanation(answer) for answer in answers]
