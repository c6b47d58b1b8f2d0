"""Real packaged weights over real offline text: MiniLM (BERT) and SmolLM2 (Llama, GGUF)."""

import pytest
import torch

from lightning_interp.backbones import Backbone
from lightning_interp.data.offline import (
    minilm_folder,
    news_articles,
    wikipedia_articles,
)
from lightning_interp.errors import TokenIdError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    return Backbone.from_pretrained("offline:minilm")  # the name recipes record


@pytest.fixture(scope="module")
def smollm2():
    return Backbone.from_pretrained("offline:smollm2")


def test_offline_names_load_the_packaged_weights_and_name_the_hub_models(minilm, smollm2):
    assert minilm.name == "offline:minilm"
    assert minilm.hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert smollm2.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    by_path = Backbone.from_pretrained(str(minilm_folder()))
    assert by_path.hub_id == minilm.hub_id
    for name, weights in minilm.model.state_dict().items():
        assert torch.equal(weights, by_path.model.state_dict()[name]), name
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"  # the GGUF file was found


def test_real_models_refuse_ids_beyond_their_vocabulary(minilm, smollm2):
    for backbone, size in ((minilm, 30522), (smollm2, 49152)):
        with pytest.raises(TokenIdError, match=f"max id {size}.*vocab size {size}"):
            backbone.capture({"input_ids": torch.tensor([[1, 2, size]])}, "layers.0.resid_post")


def test_minilm_sites_on_real_news(minilm):
    texts = sorted(news_articles(), key=len)[-3:]  # the longest exceed 512 tokens
    inputs = minilm.encode(texts)
    assert inputs["input_ids"].shape[1] == 512  # long articles truncated to the model's limit
    acts = minilm.capture(inputs, ["layers.2.resid_post", "layers.2.mlp_out"])
    states = minilm(inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["layers.2.resid_post"], states[3], rtol=0, atol=0)
    assert minilm.site_width("layers.2.mlp_out") == 384
    calls = []
    handles = [
        layer.register_forward_hook(lambda *_: calls.append(1))
        for layer in minilm.model.encoder.layer
    ]
    minilm.capture(inputs, "layers.2.resid_post")
    assert len(calls) == 3  # of 6 layers
    for handle in handles:
        handle.remove()


def test_smollm2_is_a_real_language_model_and_splices(smollm2):
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert smollm2.site_map.towers[0].num_layers == 30
    text = next(iter(wikipedia_articles()))[:2000]
    ids = smollm2.encode(text)["input_ids"][:, :128]
    clean = smollm2({"input_ids": ids}, labels=ids).loss
    assert float(clean) < 4.0  # real English under a real LM (random weights: ~10.8)
    acts = smollm2.capture({"input_ids": ids}, ["layers.5.resid_post", "layers.5.attn_z"])
    states = smollm2({"input_ids": ids}, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["layers.5.resid_post"], states[6], rtol=0, atol=0)
    assert acts["layers.5.attn_z"].shape == (1, 128, 576)
    with smollm2.splice("layers.5.resid_post", lambda a: a):
        same = smollm2({"input_ids": ids}, labels=ids).loss
    with smollm2.splice("layers.5.resid_post", torch.zeros_like):
        ablated = smollm2({"input_ids": ids}, labels=ids).loss
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert float(ablated) > float(clean) + 1.0  # erasing the residual stream destroys it


def test_smollm2_chat_template_is_available(smollm2):
    ids = smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is a sparse autoencoder?"}], tokenize=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert len(ids) > 5


def test_minilm_stream_packs_with_cls_and_sep(minilm):
    from lightning_interp.data import ActivationStream, pack_texts

    tokenizer = minilm.tokenizer
    contexts = list(pack_texts(news_articles()[:5], tokenizer, 64))
    assert all(int(c[0]) == tokenizer.cls_token_id for c in contexts)
    assert any((c[1:] == tokenizer.sep_token_id).any() for c in contexts)  # between articles
    stream = ActivationStream(
        minilm,
        news_articles()[:5],
        "layers.1.resid_post",
        batch_size=64,
        context_size=64,
        buffer_tokens=256,
    )
    rows = torch.cat([batch["layers.1.resid_post"] for batch in stream])  # {site: rows}
    specials = sum(
        int(torch.isin(c, torch.tensor(tokenizer.all_special_ids)).sum()) for c in contexts
    )
    # Every non-special token of every context, rounded down to whole batches.
    assert rows.shape[0] == (len(contexts) * 64 - specials) // 64 * 64


def test_smollm2_chat_stream_keeps_conversations_apart(smollm2):
    from lightning_interp.data import ActivationStream, chat_contexts

    sentences = [s for a in news_articles()[:6] for s in a.split(". ")[:2]]
    conversations = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in zip(sentences[::2], sentences[1::2], strict=False)
    ]
    contexts = list(chat_contexts(conversations, smollm2.tokenizer, 96))
    assert len(contexts) == len(conversations)  # one context each, never packed together
    stream = ActivationStream(
        smollm2,
        conversations,
        "layers.3.resid_post",
        chat=True,
        batch_size=32,
        context_size=96,
        contexts_per_capture=3,
        buffer_tokens=128,
    )
    batches = [batch["layers.3.resid_post"] for batch in stream]  # {site: rows}
    assert batches and all(b.shape == (32, 576) for b in batches)
    assert all(torch.isfinite(b).all() for b in batches)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smollm2_data_module_runs_its_forward_on_the_gpu():
    from lightning_interp.data import LanguageModelDataModule
    from tests.data.test_placement import fit_two_steps

    autocast = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    data = LanguageModelDataModule(
        "offline:smollm2",
        "layers.6.resid_post",
        context_size=128,
        batch_size=1024,
        buffer_tokens=4096,
        train_tokens=4096,
        val_tokens=1024,
        contexts_per_capture=8,
        autocast_dtype=autocast,
    )
    probe, root = fit_two_steps(data, 576, "gpu")
    assert root.type == "cuda" and data.backbone.device == root
    assert probe.batch_devices and all(device == root for device in probe.batch_devices)
    assert probe.forwards and all(dev == root and on for dev, on, _ in probe.forwards)
