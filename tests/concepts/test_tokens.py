"""Token embeddings (``pooling="tokens"``) train the token heads end to end."""

import json
import shutil
from functools import partial

import lightning as L
import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_interp.concepts import ConceptSlotAttention, ConceptTransformer
from lightning_interp.data.embedding_datamodule import (
    EmbeddingDataModule,
    TokenDataset,
    collate_tokens,
)
from lightning_interp.errors import ConfigError
from lightning_interp.modules import ConceptBottleneckModule
from tests.backbones import tiny_models as tm
from tests.concepts.planted import QUIET
from tests.data.test_tokens import make_tokenizer

N_TEXTS = 64
EPOCHS = 20


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with a tokenizer, and labelled sentences of 2 to 9 words.

    The label word (``w1`` for yes, ``w2`` for no) sits at a random position among
    random words ``w10..w39``.
    """
    root = tmp_path_factory.mktemp("tiny_bert")
    tm.build("bert").save_pretrained(root / "bert")
    make_tokenizer().save_pretrained(root / "bert")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(N_TEXTS):
        label = i % 2
        length = int(torch.randint(1, 9, (1,), generator=g))
        words = [f"w{w}" for w in torch.randint(10, 40, (length,), generator=g).tolist()]
        words.insert(int(torch.randint(len(words) + 1, (1,), generator=g)), f"w{2 - label}")
        lines.append(f"{'yes' if label else 'no'}\t" + " ".join(words))
    (root / "data.tsv").write_text("\n".join(lines) + "\n")
    return root


def token_data(root, **kwargs) -> EmbeddingDataModule:
    defaults = dict(pooling="tokens", batch_size=16, embed_batch_size=16, test_fraction=0.25)
    return EmbeddingDataModule(str(root / "bert"), str(root / "data.tsv"), **defaults | kwargs)


def test_token_data_module_keeps_every_token_and_masks_padding(tiny_bert, tmp_path):
    data = token_data(tiny_bert, cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    texts = [ln.split("\t")[1] for ln in (tiny_bert / "data.tsv").read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert / "bert")
    model = transformers.AutoModel.from_pretrained(tiny_bert / "bert").eval()
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
    longest = max(lengths)
    assert len(set(lengths)) > 3  # real padding, across embed batches of different widths
    order = torch.randperm(N_TEXTS, generator=torch.Generator().manual_seed(0))
    rows = {"test": order[:16], "val": order[16:22], "train": order[22:]}
    for split, (x, y, mask) in data.splits.items():
        assert x.shape == (len(rows[split]), longest, 32) and x.dtype == torch.float32
        assert mask.dtype == torch.bool and mask.shape == x.shape[:2]
        for i, row in enumerate(rows[split].tolist()):
            n = lengths[row]
            assert mask[i].tolist() == [True] * n + [False] * (longest - n)
            assert not x[i, n:].any()  # padding rows are zeros, and masked
            with torch.no_grad():
                hidden = model(**tokenizer(texts[row], return_tensors="pt")).last_hidden_state
            torch.testing.assert_close(x[i, :n], hidden[0], atol=1e-5, rtol=1e-4)
            assert int(y[i]) == (texts[row].split().count("w1") > 0)
    assert data.class_names == ["no", "yes"] and data.concept_count is None
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["embeddings", "labels", "mask"]
    assert batch["embeddings"].shape[:2] == batch["mask"].shape
    assert batch["mask"][:, -1].any()  # trimmed to the batch's longest input
    # The token cache reads back as written; a pooled module refuses it.
    again = token_data(tiny_bert, cache_dir=str(tmp_path / "cache"))
    again.setup("fit")
    for a, b in zip(again.splits["train"], data.splits["train"], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="token embeddings"):
        token_data(tiny_bert, pooling="mean", cache_dir=str(tmp_path / "cache")).setup()


def test_embedding_cache_refuses_other_settings_and_data(tiny_bert, tmp_path):
    cache = str(tmp_path / "cache")
    data = tmp_path / "data.tsv"
    shutil.copy(tiny_bert / "data.tsv", data)
    model = str(tiny_bert / "bert")

    def module(**kwargs):
        defaults = dict(
            model=model, data=str(data), pooling="mean", embed_batch_size=16, cache_dir=cache
        )
        return EmbeddingDataModule(**defaults | kwargs)

    first = module()
    first.setup("fit")
    again = module()
    again.setup("fit")
    assert torch.equal(again.splits["train"][0], first.splits["train"][0])
    with pytest.raises(ConfigError, match="normalize=True but .* normalize=False.*delete"):
        module(normalize=False).setup()
    with pytest.raises(ConfigError, match="pooling='mean' but .* pooling='cls'.*cache_dir"):
        module(pooling="cls").setup()
    other = tmp_path / "other.tsv"
    shutil.copy(data, other)
    with pytest.raises(ConfigError, match="was written with data=.*delete"):
        module(data=str(other)).setup()
    shutil.copytree(tiny_bert / "bert", tmp_path / "bert")
    with pytest.raises(ConfigError, match="was written with model=.*delete"):
        module(model=str(tmp_path / "bert")).setup()
    # Same path, fewer inputs: the row count gives the change away.
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(ConfigError, match=f"holds {N_TEXTS} embeddings but .* {N_TEXTS - 3} "):
        module().setup()


def test_a_cache_hit_does_not_load_the_backbone(tiny_bert, tmp_path):
    shutil.copytree(tiny_bert / "bert", tmp_path / "bert")
    kwargs = dict(pooling="mean", embed_batch_size=16, cache_dir=str(tmp_path / "cache"))
    first = EmbeddingDataModule(str(tmp_path / "bert"), str(tiny_bert / "data.tsv"), **kwargs)
    first.setup("fit")
    assert first.backbone is not None
    shutil.rmtree(tmp_path / "bert")  # no weights left to load
    again = EmbeddingDataModule(str(tmp_path / "bert"), str(tiny_bert / "data.tsv"), **kwargs)
    again.setup("fit")
    assert again.backbone is None
    for a, b in zip(again.splits["train"], first.splits["train"], strict=True):
        assert torch.equal(a, b)
    assert again.class_names == ["no", "yes"]


class LossLog(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_concept_transformer_trains_by_name_on_token_batches(tiny_bert):
    data = token_data(tiny_bert)
    module = ConceptBottleneckModule(
        head_name="concept_transformer",
        head_kwargs={"heads": 2},
        concepts=["label word", "filler"],
        optimizer=partial(torch.optim.Adam, lr=3e-2),
    )
    log = LossLog()
    trainer = L.Trainer(max_epochs=12, callbacks=[log], **QUIET)
    trainer.fit(module, datamodule=data)
    head = module.head
    assert isinstance(head, ConceptTransformer) and head.d_in == 32
    assert head.concept_names == ["label word", "filler"] and head.class_names == ["no", "yes"]
    first, last = sum(log.losses[:3]) / 3, sum(log.losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f}")
    assert len(log.losses) == 36 and last < 0.7 * first, (first, last)
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    assert tested["test/accuracy"] >= 0.5


def test_heads_that_need_phrase_directions_refuse_token_data(tiny_bert):
    module = ConceptBottleneckModule(head_name="pcbm", concepts=["w1", "w2"])
    with pytest.raises(ConfigError, match="pooling='tokens'"):
        L.Trainer(max_epochs=1, **QUIET).fit(module, datamodule=token_data(tiny_bert))
    module = ConceptBottleneckModule(head_name="concept_transformer")
    with pytest.raises(ConfigError, match="give concept names"):
        L.Trainer(max_epochs=1, **QUIET).fit(module, datamodule=token_data(tiny_bert))


def planted_marker_tokens(n=600, tokens=8, d=16, k=4, noise=0.3, seed=0):
    """Concepts present on random tokens; the class is ``2 * c_0 + c_1``.

    Each of ``k`` concepts is present (probability 1/2) as a planted direction on one
    random real token. Sequences have 3 to ``tokens`` real tokens; padding is masked and
    carries a decoy, the direction of an absent concept, so a head that read padding would
    find that concept.

    Returns:
        ``(x [n, tokens, d], mask [n, tokens], c [n, k], y [n], where [n, k])``, ``where``
        the token holding each concept (-1: absent).
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, k, generator=g))[0].T * 3.0
    x = noise * torch.randn(n, tokens, d, generator=g)
    lengths = torch.randint(3, tokens + 1, (n,), generator=g)
    mask = torch.arange(tokens) < lengths[:, None]
    c = (torch.rand(n, k, generator=g) > 0.5).float()
    where = torch.where(c > 0, (torch.rand(n, k, generator=g) * lengths[:, None]).long(), -1)
    for i, j in torch.nonzero(c).tolist():
        x[i, where[i, j]] += directions[j]
    absent = torch.multinomial(1 - c + 1e-6, 1, generator=g).squeeze(1)
    x += (~mask).unsqueeze(-1) * directions[absent][:, None]
    return x, mask, c, (2 * c[:, 0] + c[:, 1]).long(), where


def test_concept_slots_find_the_planted_tokens():
    x, mask, c, y, where = planted_marker_tokens()
    classes = ["neither", "only_b", "only_a", "both"]
    torch.manual_seed(0)
    head = ConceptSlotAttention(16, [f"concept_{i}" for i in range(4)], classes, d_attn=16)
    module = ConceptBottleneckModule(head=head, optimizer=partial(torch.optim.Adam, lr=2e-2))
    train = DataLoader(
        TokenDataset(x[:480], y[:480], mask[:480], c[:480]),
        batch_size=64,
        shuffle=True,
        collate_fn=collate_tokens,
        generator=torch.Generator().manual_seed(0),
    )
    test = TokenDataset(x[480:], y[480:], mask[480:], c[480:])
    trainer = L.Trainer(max_epochs=EPOCHS, **QUIET)
    trainer.fit(module, train)
    tested = trainer.test(module, DataLoader(test, 120, collate_fn=collate_tokens), verbose=False)
    with torch.no_grad():
        out = head(x[480:], mask[480:])
    # Each present concept's slot peaks on the token that carries its direction.
    present = where[480:] >= 0
    peak = float((out.attention.argmax(-1)[present] == where[480:][present]).float().mean())
    accuracy, concepts = tested[0]["test/accuracy"], tested[0]["test/concept_accuracy"]
    print(
        f"planted tokens: accuracy {accuracy:.3f} (chance 0.25), concept accuracy "
        f"{concepts:.3f}, attention peak on the planted token {peak:.3f} (chance ~0.18)"
    )
    assert accuracy > 0.75, accuracy  # three times chance
    assert peak > 0.9, peak
    assert out.attention.masked_select(~mask[480:, None, :]).abs().max() == 0


def test_clip_vision_tokens_are_cls_and_patches(tmp_path):
    tm.build("clip").save_pretrained(tmp_path / "clip")
    make_tokenizer().save_pretrained(tmp_path / "clip")
    pixels = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    meta = {"class_names": json.dumps(["red", "blue"])}
    tensors = {"pixel_values": pixels, "labels": torch.arange(12) % 2}
    save_file(tensors, str(tmp_path / "images.safetensors"), meta)
    data = EmbeddingDataModule(
        str(tmp_path / "clip"), str(tmp_path / "images.safetensors"), pooling="tokens"
    )
    data.setup("fit")
    x, y, mask = data.splits["train"]
    assert x.shape == (len(y), 1 + (32 // 8) ** 2, 32) and mask.all()  # CLS + 16 patches
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = data.backbone.model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(x, hidden[order[3:]], atol=1e-5, rtol=1e-4)
