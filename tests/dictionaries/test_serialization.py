"""save_pretrained -> load_dictionary round trips, and every way a folder can be bad."""

import json
import os
import signal
import stat
import warnings
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_interp import (
    CorruptFileError,
    Dictionary,
    DictionaryNotFoundError,
    UnknownArchitectureError,
    load_dictionary,
)
from lightning_interp.dictionaries import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    TopKSAE,
    list_architectures,
)
from tests.helpers import small_dictionary
from tests.zoo.helpers import KILL_POINTS

ARCHITECTURES = list_architectures()
WEIGHTS = "model.safetensors"


def trained_like(architecture, **kwargs):
    """A dictionary whose every tensor differs from its initial value."""
    torch.manual_seed(0)
    dictionary = small_dictionary(architecture, d_in=8, d_latent=32, **kwargs)
    with torch.no_grad():
        for p in dictionary.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if isinstance(dictionary, BatchTopKSAE):  # and its subclasses: estimate the threshold
        dictionary.train().forward_train(torch.randn(64, 8))
        dictionary.eval()
    return dictionary


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_gives_identical_outputs(architecture, tmp_path):
    dictionary = trained_like(architecture)
    dictionary.save_pretrained(tmp_path)
    loaded = load_dictionary(tmp_path)
    x = torch.randn(20, 8)
    expected = dictionary.to_inference()
    assert type(loaded) is type(expected)
    assert loaded.config == expected.config
    torch.testing.assert_close(loaded.encode(x), expected.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), expected(x), rtol=0, atol=0)
    assert not loaded.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_files_use_saelens_names_and_layout(tmp_path):
    trained_like("jumprelu").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (8, 32),
        "b_enc": (32,),
        "W_dec": (32, 8),
        "b_dec": (8,),
        "threshold": (32,),
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "jumprelu"
    assert config["d_in"] == 8 and config["d_latent"] == 32
    assert "device" not in config  # where it runs is not a property of the dictionary


def test_batchtopk_saves_as_jumprelu_unless_asked_not_to(tmp_path):
    dictionary = trained_like("batchtopk")
    dictionary.save_pretrained(tmp_path / "inference")
    dictionary.save_pretrained(tmp_path / "training", inference_form=False)
    assert isinstance(load_dictionary(tmp_path / "inference"), JumpReLUSAE)
    again = load_dictionary(tmp_path / "training")
    assert again.architecture == "batchtopk"
    torch.testing.assert_close(again.threshold, dictionary.threshold)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_preserved_and_can_be_overridden(dtype, tmp_path):
    dictionary = trained_like("topk").to(dtype)
    dictionary.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["W_enc"].dtype == dtype
    loaded = load_dictionary(tmp_path)
    assert loaded.dtype == dtype and loaded.config.dtype == str(dtype).removeprefix("torch.")
    torch.testing.assert_close(loaded.W_dec, dictionary.W_dec, rtol=0, atol=0)
    as_fp32 = load_dictionary(tmp_path, dtype="float32")
    assert as_fp32.dtype == torch.float32 and as_fp32.config.dtype == "float32"


def test_from_pretrained_checks_the_class(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    assert isinstance(Dictionary.from_pretrained(tmp_path), TopKSAE)
    assert isinstance(TopKSAE.from_pretrained(tmp_path), TopKSAE)
    with pytest.raises(ValueError, match="holds a TopKSAE .*not a GatedSAE"):
        GatedSAE.from_pretrained(tmp_path)


def test_overwrite_replaces_files_and_keeps_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    trained_like("standard").save_pretrained(tmp_path)
    trained_like("gated").save_pretrained(tmp_path)
    assert isinstance(load_dictionary(tmp_path), GatedSAE)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_failure_keeps_the_previous_dictionary_loadable(tmp_path, monkeypatch):
    trained_like("topk").save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lightning_interp._weights.save_file", broken_save)
    with pytest.raises(OSError):
        trained_like("standard").save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert isinstance(load_dictionary(tmp_path), TopKSAE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    with pytest.raises(DictionaryNotFoundError, match="is not a local folder"):
        load_dictionary(tmp_path / "nope")


def test_folder_without_config_lists_what_is_there(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DictionaryNotFoundError, match="no config.json .*weights.bin"):
        load_dictionary(tmp_path)


def test_missing_weights(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(DictionaryNotFoundError, match="model.safetensors is missing"):
        load_dictionary(tmp_path)


def test_corrupt_json(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"architecture": "topk", ')
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_dictionary(tmp_path)


def test_config_without_architecture(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"d_in": 8}')
    with pytest.raises(CorruptFileError, match="no 'architecture' key"):
        load_dictionary(tmp_path)


def test_unknown_architecture_in_file(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architecture"] = "matryoshka-deluxe"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownArchitectureError, match="matryoshka-deluxe"):
        load_dictionary(tmp_path)


def test_invalid_config_value_in_file(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["k"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="config.json: k must be"):
        load_dictionary(tmp_path)


@pytest.mark.parametrize("cut", [4, 100, -7])
def test_truncated_or_garbage_safetensors(tmp_path, cut):
    trained_like("topk").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CorruptFileError, match="not a readable safetensors file"):
        load_dictionary(tmp_path)


def test_header_that_lies_about_shapes_is_refused(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["W_enc"]["shape"] = [8, 64]  # claims twice the bytes it has
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(text) == header_len
    data[8 : 8 + header_len] = text
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        load_dictionary(tmp_path)


def test_tensor_shapes_that_contradict_the_config(tmp_path):
    trained_like("topk").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["W_dec"] = torch.zeros(32, 9)
    tensors["extra"] = torch.zeros(1)
    del tensors["b_enc"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CorruptFileError) as info:
        load_dictionary(tmp_path)
    message = str(info.value)
    assert "missing tensors ['b_enc']" in message
    assert "unexpected tensors ['extra']" in message
    assert "W_dec has shape (32, 9), config implies (32, 8)" in message


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_activation_scale_is_folded_at_save_time(architecture, tmp_path):
    dictionary = trained_like(architecture)
    scale = 0.37
    provenance = dictionary.config.provenance
    dictionary.config = dictionary.config.replace(
        provenance=type(provenance)(normalization="expected_norm", activation_scale=scale)
    )
    x = torch.randn(20, 8)
    expected = dictionary.to_inference()(scale * x) / scale
    dictionary.save_pretrained(tmp_path)
    loaded = load_dictionary(tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        loaded.encode(x), dictionary.to_inference().encode(scale * x), rtol=1e-5, atol=1e-5
    )
    assert loaded.config.provenance.activation_scale == 1.0
    assert loaded.config.provenance.extra["folded_activation_scale"] == scale


def test_a_concept_head_folder_is_named_as_such(tmp_path):
    from lightning_interp.concepts._storage import HEAD_FORMAT
    from lightning_interp.dictionaries.serialization import read_config

    tmp_path.joinpath("config.json").write_text(json.dumps({"format": HEAD_FORMAT}))
    with pytest.raises(CorruptFileError, match="concept-bottleneck head.*load_head"):
        read_config(tmp_path)


# ---------------------------------------------------------------- crash consistency

FORMAT_FILES = {
    "native": ("config.json", "model.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
}


def _write(dictionary, folder, fmt):
    from lightning_interp.zoo.formats import write_folder

    return write_folder(dictionary, folder, format=fmt)


def _same_dictionary(loaded, reference):
    expected = reference.to_inference()
    assert loaded.config.k == expected.config.k
    for name, tensor in expected.export_tensors().items():
        torch.testing.assert_close(loaded.export_tensors()[name], tensor, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer for real")
@pytest.mark.parametrize("fmt", sorted(FORMAT_FILES))
@pytest.mark.parametrize(("when", "which", "survivor"), KILL_POINTS)
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_dictionary(
    tmp_path, fmt, when, which, survivor
):
    from tests.zoo.helpers import write_then_kill

    torch.set_num_threads(1)
    config_name, weights_name = FORMAT_FILES[fmt]
    # Same shapes, different k and weights: the silent mix the pairing must prevent.
    old, new = trained_like("topk", k=2), trained_like("topk", k=5)
    with torch.no_grad():
        new.W_enc.mul_(-1)
    folder = tmp_path / "sae"
    _write(old, folder, fmt)
    (folder / "metrics.json").write_text('{"fvu": 0.5}')  # a neighbour the writes keep

    target = (config_name, weights_name)[which]
    status = write_then_kill(lambda: _write(new, folder, fmt), when=when, target=target)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    expected = {"old": old, "new": new}[survivor]
    mixed = survivor == "new" and target == weights_name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same_dictionary(load_dictionary(folder), expected)
    assert any("a save was interrupted" in str(w.message) for w in caught) == mixed
    strays = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert bool(strays) == (when == "before")  # the killed writer's complete temporary

    # The next write clears what the killed one left, and leaves a consistent pair.
    _write(old, folder, fmt)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FORMAT_FILES[fmt], "metrics.json"])
    _same_dictionary(load_dictionary(folder), old)
    assert (folder / "metrics.json").read_text() == '{"fvu": 0.5}'


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer for real")
def test_a_head_half_saved_over_a_dictionary_is_a_typed_error(tmp_path):
    from lightning_interp.concepts import SupervisedCBM
    from tests.zoo.helpers import write_then_kill

    trained_like("topk").save_pretrained(tmp_path)
    head = SupervisedCBM(8, ["a", "b"], ["x", "y"])  # same file names as a dictionary
    write_then_kill(partial(head.save_pretrained, tmp_path), when="after", target=WEIGHTS)
    with pytest.warns(UserWarning, match="a save was interrupted"):
        with pytest.raises(CorruptFileError, match="holds a concept-bottleneck head"):
            load_dictionary(tmp_path)


def test_a_config_edited_by_hand_after_a_complete_save_is_read_as_written(tmp_path):
    trained_like("topk", k=2).save_pretrained(tmp_path)
    trained_like("topk", k=3).save_pretrained(tmp_path)  # its weights replace the k=2 config
    config = json.loads((tmp_path / "config.json").read_text())
    config["k"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_dictionary(tmp_path).config.k == 4


# ---------------------------------------------------------------- what reaches a file


@pytest.mark.parametrize("fmt", sorted(FORMAT_FILES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_never_written(tmp_path, fmt, bad):
    from lightning_interp.errors import NonFiniteError

    good = trained_like("topk")
    _write(good, tmp_path, fmt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = trained_like("topk")
    with torch.no_grad():
        broken.b_dec[3] = bad
    with pytest.raises(NonFiniteError, match=r"b_dec \(\d NaN, \d Inf of 8\).*learning rate"):
        _write(broken, tmp_path, fmt)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _same_dictionary(load_dictionary(tmp_path), good)


def test_convert_of_a_non_finite_source_writes_nothing(tmp_path):
    from lightning_interp.zoo.formats import convert

    trained_like("topk").save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    tensors["W_dec"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"non-finite weights in W_dec \(1 NaN"):
        convert(tmp_path / "src", tmp_path / "dst", to_format="saelens")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_float_weights_in_a_native_folder_are_refused(tmp_path, dtype):
    trained_like("topk").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["W_enc"] = tensors["W_enc"].to(dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CorruptFileError, match=rf"W_enc \({name}\) must hold floating-point"):
        load_dictionary(tmp_path)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_have_ordinary_permissions(tmp_path, umask_022):
    from lightning_interp.zoo.publish import write_metrics

    sae = trained_like("topk")
    sae.save_pretrained(tmp_path / "native")
    _write(sae, tmp_path / "saelens", "saelens")
    write_metrics(tmp_path / "native", {"fvu": 0.1})
    files = [*(tmp_path / "native").iterdir(), *(tmp_path / "saelens").iterdir()]
    assert len(files) == 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}
    # An existing file keeps the mode its owner gave it, as an ordinary write would.
    (tmp_path / "native" / "config.json").chmod(0o640)
    sae.save_pretrained(tmp_path / "native")
    assert stat.S_IMODE((tmp_path / "native" / "config.json").stat().st_mode) == 0o640
