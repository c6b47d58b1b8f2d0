"""The Neuronpedia export against SAEDashboard's batch layout (neuronpedia_dashboard.py)."""

from __future__ import annotations

import json

import pytest

from lightning_interp.cli import run_extra_command
from lightning_interp.errors import ConfigError, OutputExistsError
from lightning_interp.features.layout import read_store
from lightning_interp.features.neuronpedia import export_neuronpedia
from tests.features.store_fixture import HOSTILE, write_store

BATCH_KEYS = {"model_id": str, "layer": int, "sae_set": str, "features": list}
FEATURE_KEYS = {
    "feature_index": int,
    "frac_nonzero": float,
    "n_prompts_total": int,
    "n_tokens_in_prompt": int,
    "dataset": str,
    "activations": list,
    **{
        key: list
        for key in (
            "neuron_alignment_indices",
            "neuron_alignment_values",
            "neuron_alignment_l1",
            "correlated_neurons_indices",
            "correlated_neurons_l1",
            "correlated_neurons_pearson",
            "correlated_features_indices",
            "correlated_features_l1",
            "correlated_features_pearson",
            "neg_str",
            "neg_values",
            "pos_str",
            "pos_values",
            "freq_hist_data_bar_values",
            "freq_hist_data_bar_heights",
            "logits_hist_data_bar_heights",
            "logits_hist_data_bar_values",
            "decoder_weights_dist",
            "vector",
        )
    },
}
ACTIVATION_KEYS = {
    "bin_min": (int, float),
    "bin_max": (int, float),
    "bin_contains": (int, float),
    "tokens": list,
    "values": list,
    "qualifying_token_index": int,
}


def _check_keys(record, keys):
    assert set(keys) <= set(record)
    for key, kind in keys.items():
        assert isinstance(record[key], kind), (key, type(record[key]))


def _batches(out):
    names = sorted(out.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    assert [p.name for p in names] == [f"batch-{n}.json" for n in range(len(names))]
    return [json.loads(p.read_text(encoding="utf-8")) for p in names]


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "store", n_latents=7)


def test_export_matches_the_layout_and_the_store(store, tmp_path):
    out = export_neuronpedia(store, tmp_path / "np", features_per_batch=4, sae_set="res-jb")
    data = read_store(store)
    stats, ctx, vocab = data["stats"], data["contexts"], data["vocab"]
    batches = _batches(out)
    assert len(batches) == 2  # 6 live latents in batches of 4; the last latent is dead
    seen = []
    for batch in batches:
        _check_keys(batch, BATCH_KEYS)
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny-random", 0, "res-jb")
        assert batch["sae_id_suffix"] is None
        for feature in batch["features"]:
            _check_keys(feature, FEATURE_KEYS)
            i = feature["feature_index"]
            assert 0 <= i < 7
            seen.append(i)
            assert feature["frac_nonzero"] == pytest.approx(float(stats["density"][i]))
            heights = feature["freq_hist_data_bar_heights"]
            assert heights == [float(n) for n in stats["histogram"][i].tolist()]
            assert len(feature["freq_hist_data_bar_values"]) == len(heights) == 12
            assert feature["pos_str"] == [vocab[str(t)] for t in stats["logit_top_ids"][i].tolist()]
            assert feature["neg_values"] == pytest.approx(stats["logit_bottom_values"][i].tolist())
            assert len(feature["pos_str"]) == len(feature["pos_values"]) == 3
            assert feature["correlated_features_indices"] == stats["correlated_ids"][i].tolist()
            acts = feature["activations"]
            assert len(acts) == 4 + 3 * 2  # top_k + quantile_bins * per_quantile
            for k, act in enumerate(acts):
                _check_keys(act, ACTIVATION_KEYS)
                assert len(act["tokens"]) == len(act["values"]) == 9  # no padding here
                assert all(isinstance(t, str) for t in act["tokens"])
                q = act["qualifying_token_index"]
                assert 0 <= q < len(act["values"])
                prefix, j = ("top_", k) if k < 4 else ("quantile_", k - 4)
                expected = ctx[f"{prefix}activations"][i, j].float().tolist()
                assert act["values"] == pytest.approx(expected, abs=1e-5)
                assert act["tokens"] == [
                    vocab[str(t)] for t in ctx[f"{prefix}tokens"][i, j].tolist()
                ]
                # Neuronpedia's import derives maxValue = max(values); the store keeps
                # windows in float16 and the peak in float32, hence the relative tolerance.
                assert max(act["values"]) == pytest.approx(
                    float(ctx[f"{prefix}values"][i, j]), rel=2e-3
                )
                assert act["values"][q] == max(act["values"])
                if k < 4:
                    assert (act["bin_min"], act["bin_contains"]) == (-1, -1)
                else:
                    assert act["bin_min"] < max(act["values"]) <= act["bin_max"] + 1e-5
                    assert 0.0 <= act["bin_contains"] <= 1.0
    assert seen == list(range(6))
    skipped = json.loads((out / "skipped_indexes.json").read_text(encoding="utf-8"))
    assert skipped["skipped_indexes"] == [6]
    # Corpus strings arrive as plain JSON strings: no HTML escaping belongs in this layout.
    first = batches[0]["features"][0]["activations"][0]["tokens"]
    assert first[:2] == list(HOSTILE)


def test_padding_is_dropped_and_the_qualifying_index_follows(store, tmp_path):
    from safetensors.torch import load_file, save_file

    ctx = load_file(store / "contexts.safetensors")
    ctx["top_tokens"][1, 0, :3] = -1  # a window cut by the start of its text
    save_file(ctx, str(store / "contexts.safetensors"))
    out = export_neuronpedia(store, tmp_path / "np")
    act = _batches(out)[0]["features"][1]["activations"][0]
    assert len(act["tokens"]) == len(act["values"]) == 6
    assert act["qualifying_token_index"] == int(ctx["top_center"][1, 0]) - 3
    assert act["tokens"][act["qualifying_token_index"]] == "PLANTED_1"


def test_export_refuses_existing_output_and_unknown_layer(store, tmp_path):
    (tmp_path / "np").mkdir()
    with pytest.raises(OutputExistsError):
        export_neuronpedia(store, tmp_path / "np")
    meta = json.loads((store / "store.json").read_text())
    meta["dictionary"]["site"] = "encoder_out"
    (store / "store.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="--layer"):
        export_neuronpedia(store, tmp_path / "np2")
    assert not (tmp_path / "np2").exists()
    assert export_neuronpedia(store, tmp_path / "np3", layer=5).is_dir()


def test_command_end_to_end(store, tmp_path, capsys):
    out = tmp_path / "np"
    code = run_extra_command(
        "neuronpedia", [str(store), "--out", str(out), "--model-id", "gpt2-small"]
    )
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert _batches(out)[0]["model_id"] == "gpt2-small"
    code = run_extra_command("neuronpedia", [str(tmp_path), "--out", str(tmp_path / "bad")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a feature store" in err
    assert not (tmp_path / "bad").exists()
