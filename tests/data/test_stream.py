"""ActivationStream on tiny random GPT-2 and Llama backbones: shapes, masking, determinism,
sharding and exact resume."""

import io
from collections import Counter

import lightning as L
import pytest
import torch
import transformers as T
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_interp.backbones import Backbone
from lightning_interp.backbones.special_tokens import special_token_mask
from lightning_interp.data.stream import ActivationStream, _StreamIterator
from lightning_interp.data.tokens import iter_chat, pack_texts
from lightning_interp.errors import ConfigError
from tests.data.test_tokens import BOS, EOS, make_tokenizer, random_texts

SITE = "layers.1.resid_post"
PAIR = ["layers.0.mlp_in", "layers.0.mlp_out"]
SMALL = dict(batch_size=16, context_size=16, contexts_per_capture=4, buffer_tokens=128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: a second thread only adds contention (50x slower on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def gpt2(tokenizer):
    torch.manual_seed(0)
    config = T.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=BOS, eos_token_id=EOS
    )
    return Backbone(T.GPT2LMHeadModel(config), tokenizer)


def llama(tokenizer):
    torch.manual_seed(0)
    config = T.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return Backbone(T.LlamaForCausalLM(config), tokenizer)


@pytest.fixture(scope="module")
def backbones(tokenizer):
    return {"gpt2": gpt2(tokenizer), "llama": llama(tokenizer)}


TEXTS = random_texts(80, seed=0)
CONVERSATIONS = [
    [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    for text, answer in zip(
        random_texts(40, seed=1, high=12), random_texts(40, seed=2, high=20), strict=True
    )
]


def kept_rows(backbone, contexts_per_capture, ids, mask, sites, exclude=True):
    """Activations at kept positions, captured by hand in the stream's capture batches."""
    rows = []
    for start in range(0, len(ids), contexts_per_capture):
        part = slice(start, start + contexts_per_capture)
        acts = backbone.capture({"input_ids": ids[part], "attention_mask": mask[part]}, sites)
        keep = mask[part].bool()
        if exclude:
            keep &= ~special_token_mask(ids[part], backbone.tokenizer)
        rows.append(torch.cat([acts[s][keep] for s in sites], dim=-1))
    return torch.cat(rows)


def multiset(rows):
    return Counter(row.numpy().tobytes() for row in rows)


def rows(batch):
    """A batch ``{site: rows}`` as one tensor, the sites' rows side by side in batch order."""
    return torch.cat(list(batch.values()), dim=-1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shapes_for_one_two_and_three_sites(backbones, family):
    backbone = backbones[family]
    # Every batch is {site: rows}, keyed by canonical site name in the order given.
    (one,) = next(iter(ActivationStream(backbone, TEXTS, SITE, **SMALL))).items()
    assert one[0] == SITE and one[1].shape == (16, 32)
    assert one[1].dtype == torch.float32 and not one[1].requires_grad
    pair = next(iter(ActivationStream(backbone, TEXTS, PAIR, **SMALL)))
    assert list(pair) == PAIR and all(t.shape == (16, 32) for t in pair.values())
    assert not torch.equal(*pair.values())
    sites = ["layers.0.resid_post", "layers.1.mlp_in", "layers.1.resid_post"]
    three = next(iter(ActivationStream(backbone, TEXTS, sites, **SMALL)))
    assert list(three) == sites and all(t.shape == (16, 32) for t in three.values())
    glob = next(iter(ActivationStream(backbone, TEXTS, "layers.*.resid_post", **SMALL)))
    assert list(glob) == ["layers.0.resid_post", "layers.1.resid_post"]
    wide = next(iter(ActivationStream(backbone, TEXTS, SITE, dtype=torch.float64, **SMALL)))
    assert wide[SITE].dtype == torch.float64


def test_batch_format_is_deprecated_and_ignored(backbones):
    with pytest.warns(DeprecationWarning, match="batch_format is deprecated and ignored"):
        stream = ActivationStream(backbones["gpt2"], TEXTS, PAIR, batch_format="auto", **SMALL)
    assert list(next(iter(stream))) == PAIR


@pytest.mark.parametrize("exclude", [True, False])
def test_yields_exactly_the_kept_activations(backbones, exclude):
    backbone = backbones["gpt2"]
    stream = ActivationStream(backbone, TEXTS, PAIR, exclude_special_tokens=exclude, **SMALL)
    batches = [rows(batch) for batch in stream]
    ids = torch.stack(list(pack_texts(TEXTS, backbone.tokenizer, 16)))
    expected = kept_rows(backbone, 4, ids, torch.ones_like(ids), PAIR, exclude)
    specials = int(special_token_mask(ids, backbone.tokenizer).sum())
    assert len(expected) == ids.numel() - (specials if exclude else 0)
    # Every kept row once, shuffled; only the last partial batch is dropped.
    assert len(batches) == len(expected) // 16
    yielded = torch.cat(batches)
    assert not multiset(yielded) - multiset(expected)
    # BOS (an attention sink) has one activation at position 0, the same in every context.
    bos_row = (
        expected[0] if not exclude else kept_rows(backbone, 4, ids, ids * 0 + 1, PAIR, False)[0]
    )
    assert bool((yielded == bos_row).all(dim=1).any()) == (not exclude)


def test_chat_mode_keeps_conversations_apart(backbones):
    backbone = backbones["llama"]
    stream = ActivationStream(backbone, CONVERSATIONS, SITE, chat=True, **SMALL)
    yielded = torch.cat([rows(batch) for batch in stream])
    contexts = list(iter_chat(CONVERSATIONS, backbone.tokenizer, 16))
    ids = torch.stack([c[1] for c in contexts])
    mask = torch.stack([c[2] for c in contexts])
    expected = kept_rows(backbone, 4, ids, mask, [SITE])
    # No padding, no template markers: only the words of each conversation and its roles.
    assert len(expected) == int((mask.bool() & ~special_token_mask(ids, backbone.tokenizer)).sum())
    assert len(yielded) == len(expected) // 16 * 16
    assert not multiset(yielded) - multiset(expected)


def test_deterministic_under_seed(backbones):
    backbone = backbones["gpt2"]
    first = list(ActivationStream(backbone, TEXTS, SITE, seed=3, **SMALL))
    again = list(ActivationStream(backbone, lambda: iter(TEXTS), SITE, seed=3, **SMALL))
    other = list(ActivationStream(backbone, TEXTS, SITE, seed=4, **SMALL))
    assert same_batches(first, again)
    assert not torch.equal(rows(first[0]), rows(other[0]))


def test_total_tokens_and_length(backbones):
    stream = ActivationStream(backbones["gpt2"], TEXTS, SITE, total_tokens=16 * 10 + 5, **SMALL)
    assert len(stream) == 10 and len(list(stream)) == 10
    with pytest.raises(TypeError):
        len(ActivationStream(backbones["gpt2"], TEXTS, SITE, **SMALL))


def same_batches(first, second):
    """Bitwise equal sequences of batches (dicts by site, or tensors)."""
    flat = [
        [t for b in batches for t in (b.values() if isinstance(b, dict) else (b,))]
        for batches in (first, second)
    ]
    return len(flat[0]) == len(flat[1]) and all(map(torch.equal, *flat))


def roundtrip(state):
    """Through torch.save and a weights-only load, as a checkpoint would go."""
    file = io.BytesIO()
    torch.save(state, file)
    file.seek(0)
    return torch.load(file, weights_only=True), file.getbuffer().nbytes


def counting_capture(monkeypatch, backbone):
    calls = []
    capture = backbone.capture

    def counted(inputs, *args, **kwargs):
        calls.append(inputs["input_ids"].shape[0])
        return capture(inputs, *args, **kwargs)

    monkeypatch.setattr(backbone, "capture", counted)
    return calls


RESUME_CASES = {
    "gpt2-pack": ("gpt2", TEXTS, SITE, {}),
    "llama-pair": ("llama", TEXTS, PAIR, {"separator": None}),
    "llama-chat": ("llama", CONVERSATIONS, SITE, {"chat": True}),
    "gpt2-limit": ("gpt2", TEXTS, SITE, {"total_tokens": 16 * 120}),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_mid_stream_is_exact(backbones, monkeypatch, case):
    family, texts, sites, options = RESUME_CASES[case]
    backbone = backbones[family]

    def make():
        return ActivationStream(backbone, texts, sites, seed=7, **SMALL, **options)

    full = list(make())
    calls = counting_capture(monkeypatch, backbone)
    captures_in_full = len(calls) if list(make()) else 0
    recaptured = []
    recapture = _StreamIterator._recapture

    def counted_recapture(self, ids):
        before = len(calls)
        content = recapture(self, ids)
        recaptured.append(len(calls) - before)
        return content

    monkeypatch.setattr(_StreamIterator, "_recapture", counted_recapture)
    assert len(full) > 30
    for k in (0, 1, 9, len(full) // 2, len(full) - 1, len(full)):
        interrupted = make()
        iterator = iter(interrupted)
        for _ in range(k):
            next(iterator)
        state, size = roundtrip(interrupted.state_dict())
        resumed = make()
        resumed.load_state_dict(state)
        rest = list(resumed)
        # Restoring ran the backbone on the capture batches with rows still held, no others.
        count = recaptured.pop() if recaptured else 0
        assert count == len(state["captures"]) < max(captures_in_full, 2)
        if case == "gpt2-pack" and k >= len(full) // 2:  # a few buffer-fulls, not the past
            assert count <= captures_in_full // 3
        assert len(rest) == len(full) - k
        assert same_batches(rest, full[k:])
        # Small: ids of buffered rows (int32) and RNG state, no activations.
        floats = [t for t in _tensors(state) if t.is_floating_point()]
        assert not floats and size < 4 * SMALL["buffer_tokens"] * 2 + 12_000


def test_resume_from_a_resumed_stream(backbones):
    def make():
        return ActivationStream(backbones["gpt2"], TEXTS, PAIR, seed=2, **SMALL)

    full = list(make())
    state = None
    for stop in (13, 40, 41, 90):  # interrupt, resume, interrupt again...
        stream = make()
        if state is not None:
            stream.load_state_dict(roundtrip(state)[0])
        iterator = iter(stream)
        start = stream.state_dict()["yielded"]
        assert same_batches([next(iterator) for _ in range(start, stop)], full[start:stop])
        state = stream.state_dict()
    stream = make()
    stream.load_state_dict(state)
    assert same_batches(list(stream), full[90:])


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def test_state_before_iterating_and_after_the_end(backbones):
    backbone = backbones["gpt2"]
    stream = ActivationStream(backbone, TEXTS, SITE, total_tokens=16 * 5, **SMALL)
    fresh = stream.state_dict()
    assert fresh["yielded"] == 0 and fresh["anchor"] is None
    done = list(stream)
    resumed = ActivationStream(backbone, TEXTS, SITE, total_tokens=16 * 5, **SMALL)
    resumed.load_state_dict(stream.state_dict())
    assert list(resumed) == []
    resumed.load_state_dict(fresh)
    assert same_batches(list(resumed), done)


def test_workers_capture_disjoint_batches(backbones):
    backbone = backbones["gpt2"]
    single = torch.cat([rows(b) for b in ActivationStream(backbone, TEXTS, SITE, **SMALL)])
    stream = ActivationStream(backbone, TEXTS, SITE, **SMALL)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    sharded = torch.cat([rows(b) for b in loader])
    ids = torch.stack(list(pack_texts(TEXTS, backbone.tokenizer, 16)))
    expected = kept_rows(backbone, 4, ids, torch.ones_like(ids), [SITE])
    # Each capture batch went to one worker: no row twice, at most one partial batch lost each.
    assert not multiset(sharded) - multiset(expected)
    assert len(sharded) >= len(expected) - 2 * 16 and len(single) >= len(expected) - 16
    limited = ActivationStream(backbone, TEXTS, SITE, total_tokens=16 * 9, **SMALL)
    assert len(list(DataLoader(limited, batch_size=None, num_workers=2))) == len(limited) == 9


def test_errors(backbones, tokenizer):
    backbone = backbones["gpt2"]
    with pytest.raises(ConfigError, match="one-shot"):
        ActivationStream(backbone, iter(TEXTS), SITE, **SMALL)
    with pytest.raises(ConfigError, match="tokenizer"):
        ActivationStream(Backbone(backbone.model), TEXTS, SITE, **SMALL)
    with pytest.raises(ConfigError, match="buffer_tokens"):
        ActivationStream(backbone, TEXTS, SITE, **{**SMALL, "buffer_tokens": 8})
    stream = ActivationStream(backbone, TEXTS, SITE, **SMALL)
    iterator = iter(stream)
    for _ in range(20):
        next(iterator)
    state = stream.state_dict()
    with pytest.raises(ConfigError, match="seed"):
        ActivationStream(backbone, TEXTS, SITE, seed=1, **SMALL).load_state_dict(state)
    changed = ActivationStream(backbone, ["w1 w2"] + TEXTS, SITE, **SMALL)
    changed.load_state_dict(state)
    iterator = iter(changed)  # a probing iter() restores nothing yet
    assert changed.state_dict()["yielded"] == 20
    with pytest.raises(ConfigError, match="changed"):
        next(iterator)


class Recorder(L.LightningModule):
    """Records the batches it trains on."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        batch = rows(batch)
        self.seen.append(batch.clone())
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_lightning_resume_neither_repeats_nor_skips(backbones, tmp_path, trainer_kwargs):
    backbone = backbones["gpt2"]

    def make():
        return ActivationStream(backbone, TEXTS, SITE, total_tokens=16 * 40, **SMALL)

    every_15 = ModelCheckpoint(tmp_path, every_n_train_steps=15, save_top_k=-1)
    options = {
        **trainer_kwargs,
        "enable_checkpointing": True,
        "max_epochs": 1,
        "default_root_dir": tmp_path,  # the resumed run's own checkpoints stay out of the repo
    }
    whole = Recorder()
    L.Trainer(callbacks=[every_15], **options).fit(whole, make())
    resumed = Recorder()
    checkpoint = tmp_path / "epoch=0-step=15.ckpt"
    L.Trainer(**options).fit(resumed, make(), ckpt_path=checkpoint)
    assert len(whole.seen) == 40 and len(resumed.seen) == 25
    assert same_batches(resumed.seen, whole.seen[15:])
