"""The format registry's contract, checked on every registered format (``list_formats()``).

A format registered with ``register_format`` is picked up here with no test edit (a
read-only one adds a folder writer to tests/zoo/format_cases.py). Detection keeps the most
specific matches: formats known by file names of their own beat a bare pattern, and a tie is
an ambiguity error naming the candidates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_interp import create_dictionary
from lightning_interp.errors import UnknownFormatError, UnsupportedFormatError
from lightning_interp.zoo.formats import (
    FORMATS,
    FormatAdapter,
    detect_format,
    get_format,
    list_formats,
    read_folder,
    register_format,
    write_folder,
)
from lightning_interp.zoo.formats._common import build_dictionary, read_json
from lightning_interp.zoo.formats.base import PATTERN, is_pattern
from lightning_interp.zoo.layout import find_dictionary_folders
from tests.zoo import foreign_layouts as fl
from tests.zoo.format_cases import READ_ONLY_EXAMPLES

BUILT_IN = {"native", "saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai"}


def _example(name: str) -> str:
    """A file name a pattern such as ``*.pt`` matches (an exact name is itself)."""
    return name.replace("*", "5").replace("?", "x") if is_pattern(name) else name


def _layouts(adapter: FormatAdapter) -> list[list[str]]:
    """Each way to meet the required entries: one file per entry, each alternative in turn."""
    entries = [(e,) if isinstance(e, str) else tuple(e) for e in adapter.required_files]
    widest = max(len(e) for e in entries)
    return [[_example(e[min(i, len(e) - 1)]) for e in entries] for i in range(widest)]


def test_the_built_in_formats_are_registered_in_order():
    assert BUILT_IN <= set(list_formats()) and list_formats() == sorted(list_formats())
    assert list(FORMATS)[:6] == [
        "native",
        "saelens",
        "sparsify",
        "dictionary_learning",
        "gemma_scope",
        "openai",
    ]


@pytest.mark.parametrize("name", list_formats())
def test_each_format_is_detected_from_its_own_files(name):
    adapter = get_format(name)
    assert adapter.required_files, f"{name} declares no required_files"
    for files in _layouts(adapter):
        assert detect_format(files) == name
        assert detect_format(f"a/b/{f}" for f in files) == name
        extra = [_example(f) for f in (*adapter.optional_files, *adapter.companion_files)]
        assert detect_format(files + extra) == name
    # The Hub loader downloads what the reader needs: the required files, then the optional.
    assert set(_layouts(adapter)[0]) <= {_example(p) for p in adapter.allow_patterns}


@pytest.mark.parametrize("name", list_formats())
def test_each_format_reads_a_small_folder(name, tmp_path):
    adapter = get_format(name)
    folder = tmp_path / "run" / "layers.3"  # sparsify keeps its run config one level up
    x = torch.randn(16, fl.D)
    if adapter.can_write:
        sae = create_dictionary("topk", d_in=fl.D, d_latent=fl.F, k=4)
        with torch.no_grad():
            for param in sae.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        write_folder(sae, folder, format=name)
        loaded = read_folder(folder)
        torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=0)
    elif name in READ_ONLY_EXAMPLES:
        READ_ONLY_EXAMPLES[name](folder)
        loaded = read_folder(folder)
        with pytest.raises(UnsupportedFormatError, match="read-only"):
            write_folder(loaded, tmp_path / "out", format=name)
    else:
        pytest.fail(f"format {name!r} is read-only: add a writer to tests/zoo/format_cases.py")
    assert detect_format(p.name for p in folder.iterdir()) == name
    assert loaded.config.d_in == fl.D and not loaded.training
    assert torch.isfinite(loaded(x)).all()
    if not adapter.can_write:
        assert loaded.config.provenance.trained_as.startswith(f"{name}:")


# ---------------------------------------------------------------- the registry itself
class ToyFormat(FormatAdapter):
    """A made-up format: ``toy.json`` (d_in, d_latent, k) + ``toy.safetensors`` (our names)."""

    name = "toy"
    required_files = ("toy.json", "toy.safetensors")
    companion_files = ("toy_notes.pt",)

    def read(self, folder, *, device=None, dtype=None):
        config_path, weights_path = folder / "toy.json", folder / "toy.safetensors"
        fields = {**read_json(config_path), "normalize_decoder": False}
        return build_dictionary(
            "topk",
            fields,
            load_file(weights_path),
            weights_path=weights_path,
            config_path=config_path,
            device=device,
            dtype=dtype,
        ).eval()


class AnyBin(FormatAdapter):
    """A made-up catch-all format: any ``*.bin`` file."""

    name = "any_bin"
    required_files = ("*.bin",)
    specificity = PATTERN


@pytest.fixture
def registered():
    """Register the toy formats for one test, then restore the registry as it was."""
    saved = dict(FORMATS)
    register_format(ToyFormat)
    register_format(AnyBin())
    yield
    FORMATS.clear()
    FORMATS.update(saved)


def _toy_folder(folder: Path):
    sae = create_dictionary("topk", d_in=4, d_latent=8, k=2, normalize_decoder=False)
    folder.mkdir(parents=True)
    save_file(dict(sae.export_tensors()), str(folder / "toy.safetensors"))
    (folder / "toy.json").write_text(json.dumps({"d_in": 4, "d_latent": 8, "k": 2}))
    return sae.eval()


def test_a_new_format_is_one_class_and_a_registration(registered, tmp_path):
    assert {"toy", "any_bin"} <= set(list_formats())
    sae = _toy_folder(tmp_path / "toy")
    assert detect_format(["toy.json", "toy.safetensors"]) == "toy"
    x = torch.randn(5, 4)
    torch.testing.assert_close(read_folder(tmp_path / "toy")(x), sae(x), rtol=0, atol=0)
    # The tree loader finds it and downloads only its declared files.
    (found,) = find_dictionary_folders(["site/toy.json", "site/toy.safetensors", "site/README"])
    assert (found.format, found.files) == ("toy", ("site/toy.json", "site/toy.safetensors"))
    with pytest.raises(UnsupportedFormatError, match="read-only"):
        write_folder(sae, tmp_path / "out", format="toy")


def test_the_most_specific_match_wins_and_a_tie_is_ambiguous(registered):
    assert detect_format(["w.bin"]) == "any_bin"
    # Named files beat a bare pattern; an equally specific format leaves the folder ambiguous.
    assert detect_format(["toy.json", "toy.safetensors", "w.bin"]) == "toy"
    assert detect_format(["config.json", "model.safetensors", "w.bin"]) == "native"
    both = ["toy.json", "toy.safetensors", "config.json", "model.safetensors"]
    with pytest.raises(UnknownFormatError, match=r"several formats \['native', 'toy'\]"):
        detect_format(both)
    # A file another format names is never taken by a pattern: toy's companion, OpenAI's *.pt.
    with pytest.raises(UnknownFormatError, match="matches no known format"):
        detect_format(["toy_notes.pt"])
    assert detect_format(["toy_notes.pt", "3.pt"]) == "openai"
    assert get_format("openai").own_files("*.pt", ["toy_notes.pt", "ae.pt", "3.pt"]) == ["3.pt"]


def test_registering_a_taken_name_or_no_name_is_refused(registered):
    class Impostor(FormatAdapter):
        name = "native"
        required_files = ("x.json",)

    with pytest.raises(ValueError, match="already registered"):
        register_format(Impostor)
    with pytest.raises(ValueError, match="has no name"):
        register_format(FormatAdapter())
    with pytest.raises(UnknownFormatError, match="known formats: .*'toy'"):
        get_format("toys")


# ---------------------------------------------------------------- lazy head support
def test_importing_the_zoo_does_not_import_concept_heads():
    code = (
        "import sys, lightning_interp.zoo as zoo\n"
        "assert not [m for m in sys.modules if m.startswith('lightning_interp.concepts')]\n"
        "zoo.load_head\n"  # first use imports head support
        "assert 'lightning_interp.concepts' in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
