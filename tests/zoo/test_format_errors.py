"""Bad input to the format adapters: typed errors that name the file and the fix, no debris."""

import json

import pytest
import torch

from lightning_interp import create_dictionary
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
