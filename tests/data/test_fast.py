"""FAST (finetuning-aligned sequential training): each templated conversation one sequence.

Tiny random Llama and the word-level tokenizer of ``test_tokens``: sequences are whole
conversations in order (truncated, never spilled), the chat template is applied, padding is
masked and special tokens kept, no activation sees another conversation, resume is exact,
and the default packing is what it was.
"""

import importlib.util

import pytest
import torch
import yaml

from lightning_interp.backbones.special_tokens import special_token_mask
from lightning_interp.cli import build_cli
from lightning_interp.data import lm_datamodule, offline
from lightning_interp.data.lm_datamodule import LanguageModelDataModule
from lightning_interp.data.stream import ActivationStream
from lightning_interp.data.tokens import (
    TextPosition,
    iter_batches,
    iter_conversations,
    iter_packed,
    pack_texts,
    render_chat,
)
from tests.data.test_stream import CONVERSATIONS, SITE, TEXTS, llama, rows
from tests.data.test_tokens import BOS, EOS, IM_END, IM_START, PAD, make_tokenizer, w

USER, ASSISTANT, SYSTEM = (6 + 50 + i for i in range(3))
FAST = dict(batch_size=16, context_size=48, contexts_per_capture=4, buffer_tokens=128)
CHATS = [
    [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}],
    [{"role": "user", "content": "w4"}],
    [{"role": "system", "content": " ".join(["w5"] * 30)}],
    "w6 w7",  # a plain document is one user turn
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def backbone(tokenizer):
    return llama(tokenizer)


def templated(tokenizer, conversation):
    """The chat template's ids for one conversation, computed independently of tokens.py."""
    messages = (
        [{"role": "user", "content": conversation}]
        if isinstance(conversation, str)
        else conversation
    )
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_each_conversation_whole_in_order_with_its_template(tokenizer):
    sequences = list(iter_conversations(CHATS, tokenizer, 12))
    assert [p for p, _, _ in sequences] == [TextPosition(i, 0) for i in range(4)]
    first, second, third, fourth = [ids.tolist() for _, ids, _ in sequences]
    assert first == [IM_START, USER, *w(1, 2), IM_END, IM_START, ASSISTANT, *w(3), IM_END]
    assert second == [IM_START, USER, *w(4), IM_END]  # its own length: no padding
    assert third == [IM_START, SYSTEM, *w(*[5] * 10)]  # truncated, the rest dropped
    assert fourth == [IM_START, USER, *w(6, 7), IM_END]
    assert all(mask.all() for _, _, mask in sequences)
    # Resuming at a conversation gives the same sequences from there on.
    resumed = list(iter_conversations(CHATS, tokenizer, 12, start=TextPosition(2, 0)))
    assert [ids.tolist() for _, ids, _ in resumed] == [third, fourth]


def test_capture_batches_pad_to_the_longest_and_never_mix_conversations(tokenizer):
    batches = list(iter_batches(CONVERSATIONS, tokenizer, 48, 4, sequential_chat=True))
    assert sum(len(ids) for _, ids, _ in batches) == len(CONVERSATIONS)
    seen = 0
    for position, ids, mask in batches:
        assert position == TextPosition(seen, 0)
        assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest only
        for row in range(len(ids)):
            length = int(mask[row].sum())
            assert mask[row, :length].all() and not mask[row, length:].any()  # right padding
            assert ids[row, length:].eq(PAD).all()
            # Exactly one conversation per row, whole (none is longer than 48 here).
            assert ids[row, :length].tolist() == templated(tokenizer, CONVERSATIONS[seen])
            seen += 1


def test_rendered_chat_reads_back_as_the_template(tokenizer):
    # The block-training baseline packs this text: special tokens come back as their ids.
    for conversation, text in zip(CHATS, render_chat(CHATS, tokenizer), strict=True):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == templated(tokenizer, conversation)
    packed = [ids.tolist() for _, ids in iter_packed(render_chat(CHATS, tokenizer), tokenizer, 8)]
    assert any(row.count(IM_START) > 1 for row in packed)  # blocks do cross conversations


def nearest(rows_, reference):
    """Distance from each row to its nearest reference row (exact, not the matmul shortcut)."""
    exact = "donot_use_mm_for_euclid_dist"
    return torch.cdist(rows_, reference, compute_mode=exact).min(dim=1).values


def fast_stream(backbone, **kwargs):
    settings = {**FAST, **kwargs}
    return ActivationStream(backbone, CONVERSATIONS, SITE, sequential_chat=True, **settings)


def alone(backbone, conversation):
    """Activations of one conversation run by itself: no other sequence, no padding."""
    ids = torch.tensor([templated(backbone.tokenizer, conversation)])
    return ids[0], backbone.capture({"input_ids": ids}, [SITE])[SITE][0]


def test_rows_are_each_conversation_run_alone_special_tokens_kept(backbone):
    yielded = torch.cat([rows(batch) for batch in fast_stream(backbone)])
    runs = [alone(backbone, c) for c in CONVERSATIONS]
    expected = torch.cat([acts for _, acts in runs])
    ids = torch.cat([ids for ids, _ in runs])
    # FAST keeps every real token, the template's markers included; padding never.
    assert len(yielded) == len(expected) // 16 * 16
    assert special_token_mask(ids, backbone.tokenizer).any()
    # Every yielded row is the activation its token has when its conversation runs alone
    # (padding to another conversation's length changes only rounding, never the context).
    distance = nearest(yielded, expected)
    assert float(distance.max()) < 1e-4 * float(expected.norm(dim=1).mean())
    # Packing the same conversations into blocks does change them: context crosses over.
    packed = ActivationStream(
        backbone, list(render_chat(CONVERSATIONS, backbone.tokenizer)), SITE, separator=None, **FAST
    )
    crossed = torch.cat([rows(batch) for batch in packed])
    crossed_distance = nearest(crossed, expected)
    assert float(crossed_distance.max()) > 1e-2 * float(expected.norm(dim=1).mean())


def test_special_tokens_can_still_be_excluded(backbone):
    total = sum(len(ids) for ids, _ in (alone(backbone, c) for c in CONVERSATIONS))
    markers = sum(
        int(special_token_mask(ids, backbone.tokenizer).sum())
        for ids, _ in (alone(backbone, c) for c in CONVERSATIONS)
    )
    kept = sum(len(rows(b)) for b in fast_stream(backbone, batch_size=1, buffer_tokens=16))
    dropped = fast_stream(backbone, batch_size=1, buffer_tokens=16, exclude_special_tokens=True)
    assert kept == total and sum(len(rows(b)) for b in dropped) == total - markers
    assert fast_stream(backbone).exclude_special_tokens is False


def test_resume_mid_stream_is_exact(backbone):
    full = [rows(b) for b in fast_stream(backbone)]
    first = fast_stream(backbone)
    iterator = iter(first)
    head = [rows(next(iterator)) for _ in range(3)]
    state = first.state_dict()
    assert state["config"]["sequential_chat"] is True
    again = fast_stream(backbone)
    again.load_state_dict(state)
    tail = [rows(b) for b in again]
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full, strict=True))


def test_default_packing_is_unchanged(backbone, tokenizer):
    # The packed capture batches are pack_texts's contexts, stacked, unpadded, as before.
    batches = list(iter_batches(TEXTS, tokenizer, 16, 4))
    packed = torch.stack(list(pack_texts(TEXTS, tokenizer, 16)))
    assert torch.equal(torch.cat([ids for _, ids, _ in batches]), packed)
    assert all(mask.all() and len(ids) <= 4 for _, ids, mask in batches)
    assert packed[:, 0].eq(BOS).all() and packed.eq(EOS).any()
    stream = ActivationStream(backbone, TEXTS, SITE, **FAST)
    # Special tokens still dropped by default, and a state saved before sequential_chat
    # existed (no such key) still resumes.
    assert stream.exclude_special_tokens is True
    state = stream.state_dict()
    assert "sequential_chat" not in state["config"]
    ActivationStream(backbone, TEXTS, SITE, **FAST).load_state_dict(state)


@pytest.fixture
def chat_source(monkeypatch, tiny_folders):
    # The data module reads conversations from "offline:chat"; tiny ones stand in here.
    monkeypatch.setitem(lm_datamodule.OFFLINE_TEXTS, "offline:chat", lambda: list(CONVERSATIONS))
    return tiny_folders["gpt2"]


def data_module(folder, **kwargs):
    common = dict(context_size=48, batch_size=16, buffer_tokens=64, contexts_per_capture=4)
    return LanguageModelDataModule(
        folder, SITE, text="offline:chat", val_fraction=0.2, **common, **kwargs
    )


def test_data_module_fast_mode(chat_source):
    fast = data_module(chat_source, sequential_chat=True, downstream_contexts=5)
    fast.setup()
    assert fast.train_stream.sequential_chat and not fast.train_stream.exclude_special_tokens
    assert fast.val_texts == CONVERSATIONS[-8:]  # held out whole conversations
    inputs = fast.downstream_inputs()
    assert [len(b["input_ids"]) for b in inputs] == [5]
    for row, conversation in enumerate(CONVERSATIONS[-8:-3]):
        mask = inputs[0]["attention_mask"][row].bool()
        expected = templated(fast.backbone.tokenizer, conversation)
        assert inputs[0]["input_ids"][row][mask].tolist() == expected
    assert "FAST" in fast.provenance["extra"]["sequences"]
    batch = next(iter(fast.train_dataloader()))
    assert batch[SITE].shape == (16, 32)


def test_data_module_packs_rendered_conversations_by_default(chat_source):
    blocks = data_module(chat_source)
    blocks.setup()
    # BT(F): conversations rendered through the template, then packed without separator.
    assert blocks.val_texts == list(render_chat(CONVERSATIONS[-8:], blocks.backbone.tokenizer))
    stream = blocks.train_stream
    assert stream.separator is None and not stream.chat and not stream.sequential_chat
    assert stream.exclude_special_tokens is True
    assert "sequences" not in blocks.provenance["extra"]


@pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None,
    reason="chatterbot-corpus is not installed (make install brings it)",
)
def test_offline_chat_conversations():
    conversations = offline.chat_conversations()
    assert len(conversations) == 898 and conversations == offline.chat_conversations()
    assert len({tuple(m["content"] for m in c) for c in conversations}) == 898  # no duplicates
    for conversation in conversations:
        roles = [m["role"] for m in conversation]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        assert all(isinstance(m["content"], str) for m in conversation)


def test_recipe_and_its_block_baseline_override_parse(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lightning-interp"])  # LightningCLI also reads argv
    recipe = ["fit", "--config", "recipes/smollm2_instruct_fast.yaml"]
    baseline = [
        "--data.init_args.sequential_chat=false",
        "--data.init_args.context_size=256",
        "--data.init_args.exclude_special_tokens=false",
    ]
    printed = []
    for extra in ([], baseline):
        with pytest.raises(SystemExit):
            build_cli([*recipe, *extra, "--print_config"])
        printed.append(yaml.safe_load(capsys.readouterr().out)["data"]["init_args"])
    fast, blocks = printed
    assert fast["sequential_chat"] is True and fast["exclude_special_tokens"] is None
    assert fast["text"] == blocks["text"] == "offline:chat"
    assert blocks["sequential_chat"] is False and blocks["exclude_special_tokens"] is False
    assert blocks["context_size"] == 256
