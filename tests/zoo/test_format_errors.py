"""Bad input to the format adapters: typed errors that name the file and the fix, no debris."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.errors import (
    CorruptFileError,
    DictionaryNotFoundError,
    UnknownFormatError,
    UnsupportedFormatError,
)
from lightning_interp.zoo.formats import convert, detect_format, read_folder, write_folder
from tests.zoo import foreign_layouts as fl


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def test_no_known_format_lists_files_and_formats(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnknownFormatError, match=r"weights\.bin.*matches no known format.*saelens"):
        detect_format(p.name for p in tmp_path.iterdir())
    # read_folder reports the missing native file first, then every other format's files.
    with pytest.raises(DictionaryNotFoundError, match=r"no config.json .*weights\.bin.*saelens"):
        read_folder(tmp_path)


def test_half_copied_native_folder_names_the_missing_file(tmp_path):
    create_dictionary("topk", d_in=4, d_latent=8, k=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DictionaryNotFoundError, match="model.safetensors is missing"):
        read_folder(tmp_path)


def test_ambiguous_folder_names_the_candidates():
    with pytest.raises(
        UnknownFormatError, match=r"several formats \['native', 'dictionary_learning'\]"
    ):
        detect_format({"config.json", "model.safetensors", "ae.pt"})


def test_unknown_format_name(tmp_path):
    with pytest.raises(UnknownFormatError, match="unknown dictionary format 'safetensor'.*native"):
        read_folder(tmp_path, format="safetensor")
    with pytest.raises(UnknownFormatError):
        write_folder(
            create_dictionary("topk", d_in=4, d_latent=8, k=2), tmp_path, format="sae-lens"
        )


def test_missing_folder(tmp_path):
    with pytest.raises(DictionaryNotFoundError, match="does not exist"):
        read_folder(tmp_path / "nope")


def test_missing_weights_file_names_it(tmp_path):
    fl.write_saelens_v6(tmp_path, "standard", fl.saelens_tensors("standard"))
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(
        DictionaryNotFoundError, match=r"sae_weights\.safetensors is missing .*re-download"
    ):
        read_folder(tmp_path, format="saelens")


def test_contradictory_d_in_names_both_files_and_the_fix(tmp_path):
    fl.write_saelens_v6(tmp_path, "standard", fl.saelens_tensors("standard"), d_in=12)
    with pytest.raises(CorruptFileError) as info:
        read_folder(tmp_path)
    message = str(info.value)
    assert "sae_weights.safetensors" in message and "cfg.json" in message
    assert "W_enc has shape (8, 32), config implies (12, 32)" in message
    assert "correct the config" in message


def test_sparsify_contradictory_k_and_missing_tensor(tmp_path):
    folder = tmp_path / "layers.1"
    fl.write_sparsify(folder, k=40)  # k > num_latents
    with pytest.raises(CorruptFileError, match=r"cfg\.json.*k must be"):
        read_folder(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "k": 2, "activation": "groupmax"}))
    with pytest.raises(UnsupportedFormatError, match="groupmax"):
        read_folder(folder)


def test_dictionary_learning_k_disagreement(tmp_path):
    state = fl.dictionary_learning_state("AutoEncoderTopK", k=3)
    fl.write_dictionary_learning(tmp_path, "AutoEncoderTopK", state, k=5)
    with pytest.raises(CorruptFileError, match="k=5 but ae.pt's k buffer is 3"):
        read_folder(tmp_path)


def test_dictionary_learning_unknown_class(tmp_path):
    fl.write_dictionary_learning(tmp_path, "CrossCoder", {"W_enc": torch.zeros(2, 2)})
    with pytest.raises(UnsupportedFormatError, match="'CrossCoder' is not supported"):
        read_folder(tmp_path)


def test_saelens_unknown_architecture(tmp_path):
    fl.write_saelens_v6(tmp_path, "standard", fl.saelens_tensors("standard"))
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "temporal"}))
    with pytest.raises(UnsupportedFormatError, match="'temporal' is not supported"):
        read_folder(tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    topk_transcoder = create_dictionary(
        "topk", d_in=4, d_latent=8, k=2, d_out=3, apply_b_dec_to_input=False
    )
    with pytest.raises(UnsupportedFormatError, match="no architecture for a topk"):
        write_folder(topk_transcoder, tmp_path / "out", format="saelens")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedFormatError, match="read-only"):
        write_folder(topk_transcoder, tmp_path / "out", format="sparsify")
    assert not (tmp_path / "out").exists()


def test_failed_convert_leaves_nothing(tmp_path):
    src = fl.write_saelens_v6(tmp_path / "src", "standard", fl.saelens_tensors("standard"), d_in=12)
    with pytest.raises(CorruptFileError):
        convert(src, tmp_path / "dst", to_format="native")
    with pytest.raises(UnsupportedFormatError):
        convert(src, tmp_path / "dst", to_format="gemma_scope")
    assert not (tmp_path / "dst").exists()


def test_convert_saelens_to_native_then_load(tmp_path):
    t = fl.saelens_tensors("jumprelu")
    src = fl.write_saelens_v6(tmp_path / "src", "jumprelu", t)
    out = convert(src, tmp_path / "dst")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    x = torch.randn(8, fl.D)
    torch.testing.assert_close(read_folder(out)(x), read_folder(src)(x), rtol=0, atol=0)
    assert read_folder(out).config.provenance.trained_as == "saelens:jumprelu"


# ---------------------------------------------------------------- ambiguous folders in a tree


def _ambiguous(folder):
    """A native folder with a stray ae.pt + config.json: native and dictionary_learning match."""
    from tests.zoo.helpers import make_sae

    make_sae("layers.0.resid_post", seed=1).save_pretrained(folder)
    torch.save(fl.dictionary_learning_state("AutoEncoder"), folder / "ae.pt")
    return folder


def test_an_ambiguous_folder_in_a_tree_is_named_not_skipped(tmp_path):
    from lightning_interp.errors import SiteSelectionError
    from tests.zoo.helpers import assert_same_weights, make_sae

    _ambiguous(tmp_path / "a")
    good = make_sae("layers.1.resid_post", seed=2)
    good.save_pretrained(tmp_path / "b")
    # Before: "a" was dropped silently and "b", the only unambiguous folder, was loaded.
    with pytest.raises(
        SiteSelectionError,
        match=r"a \(ambiguous: matches native, dictionary_learning\), b .*needs format=",
    ):
        load_dictionary(tmp_path)
    with pytest.raises(UnknownFormatError, match=r"folder a .*several formats.*format=\.\.\."):
        load_dictionary(tmp_path, site="a")
    assert load_dictionary(tmp_path, site="a", format="native").config.provenance.site == (
        "layers.0.resid_post"
    )
    assert_same_weights(load_dictionary(tmp_path, site="b"), good)


def test_a_tree_whose_only_folder_is_ambiguous(tmp_path):
    _ambiguous(tmp_path / "only")
    with pytest.raises(UnknownFormatError, match=r"folder only .*native, dictionary_learning"):
        load_dictionary(tmp_path)


def test_an_ambiguous_folder_on_the_hub_is_named(hub, tmp_path):
    folder = _ambiguous(tmp_path / "x")
    hub.add_files("org/amb", {f"s/{p.name}": p.read_bytes() for p in folder.iterdir()})
    with pytest.raises(UnknownFormatError, match=r"folder s of Hub repo org/amb.*format="):
        load_dictionary("org/amb")
    assert load_dictionary("org/amb", format="native").d_latent == 32


# ---------------------------------------------------------------- wrong values in foreign configs


def _saelens(folder, **changes):
    fl.write_saelens_v6(folder, "topk", fl.saelens_tensors("topk"), k=3)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _saelens_metadata(folder, **changes):
    fl.write_saelens_v6(folder, "standard", fl.saelens_tensors("standard"))
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"].update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _sparsify(folder, **changes):
    fl.write_sparsify(folder, k=3)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _dictionary_learning(folder, *, trainer=None, state=None):
    fl.write_dictionary_learning(
        folder, "BatchTopKSAE", {**fl.dictionary_learning_state("BatchTopKSAE"), **(state or {})}
    )
    cfg = json.loads((folder / "config.json").read_text())
    if trainer is not None and not isinstance(trainer, dict):
        cfg["trainer"] = trainer
    else:
        cfg["trainer"].update(trainer or {})
    (folder / "config.json").write_text(json.dumps(cfg))


def _gemma_v2(folder, **changes):
    fl.write_gemma_scope_v2(folder, affine=False)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def _openai(folder, **act_state):
    state = fl.openai_state("TopK")
    state["activation_state_dict"] = act_state.pop("whole", None) or {
        **state["activation_state_dict"],
        **act_state,
    }
    torch.save(state, folder / "5.pt")


UNSET = torch.tensor(-1.0)  # dictionary_learning's "no threshold yet": batch top-k, k is read
BAD_VALUES = [
    (lambda f: _saelens(f, k="four"), "k must be an integer, got 'four'"),
    (lambda f: _saelens(f, k=2.9), "k must be an integer, got 2.9"),
    (lambda f: _saelens(f, apply_b_dec_to_input="false"), "apply_b_dec_to_input must be true"),
    (lambda f: _saelens(f, d_in="8"), "d_in must be an integer, got '8'"),
    (lambda f: _saelens(f, norm_scaling_factor=0, normalize_activations="expected_average_only_in"),
     "norm_scaling_factor must be a finite number > 0, got 0"),
    (lambda f: _saelens(f, metadata="gpt2"), "metadata must be a JSON object, got str"),
    (lambda f: _saelens(f, architecture=["topk"]), "architecture must be a string"),
    (lambda f: _saelens_metadata(f, context_size="long"), "metadata.context_size must be an"),
    (lambda f: _saelens_metadata(f, hook_name=5), "metadata.hook_name must be a string"),
    (lambda f: _sparsify(f, k="four"), "k must be an integer, got 'four'"),
    (lambda f: _sparsify(f, normalize_decoder="false"), "normalize_decoder must be true or false"),
    (lambda f: _sparsify(f, num_latents=2.5), "num_latents must be an integer, got 2.5"),
    (lambda f: _sparsify(f, transcode=1), "transcode must be true or false, got 1"),
    (lambda f: _dictionary_learning(f, state={"threshold": torch.tensor(float("nan"))}),
     "threshold must be a finite number, got nan"),
    (lambda f: _dictionary_learning(f, trainer={"k": "four"}, state={"threshold": UNSET}),
     "trainer.k must be an integer"),
    (lambda f: _dictionary_learning(f, trainer={"activation_dim": "8"}),
     "trainer.activation_dim must be an integer"),
    (lambda f: _dictionary_learning(f, trainer=["BatchTopKSAE"]), "trainer must be a JSON object"),
    (lambda f: _gemma_v2(f, hf_hook_point_in=5), "hf_hook_point_in must be a string, got 5"),
    (lambda f: _gemma_v2(f, width="16k"), "width must be an integer, got '16k'"),
    (lambda f: _openai(f, k="four"), "activation_state_dict.k must be an integer, got 'four'"),
    (lambda f: _openai(f, whole=[3]), "activation_state_dict must be a JSON object, got list"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "message"), BAD_VALUES)
def test_a_wrong_value_in_a_foreign_config_is_a_one_line_typed_error(tmp_path, make, message):
    folder = tmp_path / "layers.1"  # a sparsify hookpoint name; any name suits the others
    folder.mkdir()
    make(folder)
    with pytest.raises(CorruptFileError) as info:
        read_folder(folder)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert "fix that field or re-download" in text or "re-download" in text
    assert str(folder) in text  # names the file


@pytest.mark.parametrize("where", ["native", "saelens", "gemma_scope_v1"])
def test_integer_weights_are_refused_in_every_format(tmp_path, where):
    sae = create_dictionary("topk", d_in=fl.D, d_latent=fl.F, k=2)
    if where == "gemma_scope_v1":
        import numpy as np

        arrays = {k: v.numpy() for k, v in fl.jumprelu_params().items()}
        arrays["W_enc"] = arrays["W_enc"].astype(np.int32)
        np.savez(tmp_path / "params.npz", **arrays)
    else:
        write_folder(sae, tmp_path, format=where)
        name = "model.safetensors" if where == "native" else "sae_weights.safetensors"
        tensors = load_file(tmp_path / name)
        tensors["W_enc"] = tensors["W_enc"].to(torch.int32)
        save_file(tensors, tmp_path / name)
    with pytest.raises(CorruptFileError, match=r"W_enc \(int32\) must hold floating-point"):
        read_folder(tmp_path)


def test_bad_config_value_through_the_cli_is_one_line_exit_2(tmp_path, capsys):
    from lightning_interp.cli import main

    _sparsify(tmp_path / "layers.1", normalize_decoder="false")
    with pytest.raises(SystemExit) as info:
        main(["convert", str(tmp_path / "layers.1"), str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "normalize_decoder must be true or false, got 'false'" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["", "   "])
def test_an_empty_source_is_refused_not_the_working_folder(tmp_path, monkeypatch, source):
    from lightning_interp.zoo import load_head

    monkeypatch.chdir(tmp_path)
    create_dictionary("topk", d_in=4, d_latent=8, k=2).save_pretrained(tmp_path)
    with pytest.raises(DictionaryNotFoundError, match="is empty; pass a dictionary folder"):
        load_dictionary(source)
    with pytest.raises(DictionaryNotFoundError, match="is empty"):
        load_head(source)


def _gemma_v1_with(folder, name, array):
    import numpy as np

    arrays = {k: v.numpy() for k, v in fl.jumprelu_params().items()}
    arrays[name] = np.asarray(array)
    np.savez(folder / "params.npz", **arrays)


def _openai_with(folder, name, tensor):
    torch.save({**fl.openai_state("ReLU"), name: tensor}, folder / "5.pt")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: _gemma_v1_with(f, "W_enc", [0.5] * 8), r"W_enc must be a matrix \(2-D\)"),
        (
            lambda f: _gemma_v1_with(f, "threshold", ["a"] * 32),
            "holds an array that is not numeric",
        ),
        (lambda f: _openai_with(f, "encoder.weight", torch.zeros(2, 32, 8)), "must be a matrix"),
        (lambda f: _openai_with(f, "decoder.weight", torch.zeros(8)), "decoder.weight must be a"),
    ],
)
def test_tensors_of_the_wrong_rank_or_kind_are_typed_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CorruptFileError, match=message):
        read_folder(tmp_path)
