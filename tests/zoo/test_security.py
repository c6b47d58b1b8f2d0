"""Nothing from disk is unpickled; files that lie about themselves are refused."""

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lightning_interp
from lightning_interp.errors import CorruptFileError, UnsafeFileError
from lightning_interp.zoo.formats import read_folder
from tests.zoo import foreign_layouts as fl

PACKAGE = Path(lightning_interp.__file__).parent


class WritesMarker:
    """Unpickling this runs code: ``exec`` writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def crafted_pt(path: Path, marker: Path) -> None:
    torch.save({"encoder.weight": torch.zeros(4, 2), "payload": WritesMarker(marker)}, path)


def test_crafted_pickle_really_runs_code_when_unpickled(tmp_path):
    # The control: the payload is live; only weights_only keeps it from running.
    marker = tmp_path / "marker"
    crafted_pt(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("layout", ["dictionary_learning", "openai"])
def test_crafted_pt_is_refused_and_never_runs(tmp_path, layout):
    marker = tmp_path / "marker"
    folder = tmp_path / "dictionary"
    folder.mkdir()
    if layout == "dictionary_learning":
        fl.write_dictionary_learning(folder, "AutoEncoder", {})
        crafted_pt(folder / "ae.pt", marker)
    else:
        crafted_pt(folder / "6.pt", marker)
    with pytest.raises(UnsafeFileError, match="refused") as info:
        read_folder(folder)
    assert isinstance(info.value, CorruptFileError)
    assert not marker.exists()


def _edit_header(path: Path, old: str, new: str) -> None:
    """Replace text in a safetensors JSON header, keeping its length (and so the offsets)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size].decode()
    assert header.count(old) == 1, header
    path.write_bytes(data[:8] + header.replace(old, new).encode() + data[8 + size :])


def _saelens_folder(tmp_path: Path) -> Path:
    return fl.write_saelens_v6(tmp_path / "sae", "standard", fl.saelens_tensors("standard"))


def test_header_shape_that_does_not_fit_the_data_is_refused(tmp_path):
    folder = _saelens_folder(tmp_path)
    _edit_header(folder / "sae_weights.safetensors", '"shape":[8,32]', '"shape":[8,31]')
    with pytest.raises(CorruptFileError, match="sae_weights.safetensors"):
        read_folder(folder)


def test_header_shape_that_fits_the_bytes_but_not_the_config_is_refused(tmp_path):
    folder = _saelens_folder(tmp_path)
    _edit_header(folder / "sae_weights.safetensors", '"shape":[8,32]', '"shape":[4,64]')
    with pytest.raises(CorruptFileError, match=r"W_enc has shape \(4, 64\)"):
        read_folder(folder)


def test_truncated_safetensors_is_refused(tmp_path):
    folder = _saelens_folder(tmp_path)
    path = folder / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="not a readable safetensors"):
        read_folder(folder)


def test_npz_with_object_arrays_is_refused(tmp_path):
    arrays = {k: v.numpy() for k, v in fl.saelens_tensors("jumprelu").items()}
    arrays["threshold"] = np.array([{"a": 1}], dtype=object)
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(UnsafeFileError):
        read_folder(tmp_path)


def test_config_json_is_data_not_code(tmp_path):
    folder = _saelens_folder(tmp_path)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="cfg.json is not valid JSON"):
        read_folder(folder)
    (folder / "cfg.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CorruptFileError, match="not an object"):
        read_folder(folder, format="saelens")


def _unsafe_calls(path: Path) -> list[str]:
    """``pickle.load(s)``, ``torch.load`` without ``weights_only=True``, ``allow_pickle=True``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        where = f"{path}:{node.lineno}"
        if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load"):
            found.append(f"{where} {name}")
        if name == "torch.load" and keywords.get("weights_only") != "True":
            found.append(f"{where} torch.load without weights_only=True")
        if keywords.get("allow_pickle") == "True":
            found.append(f"{where} allow_pickle=True")
    return found


def test_package_source_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [hit for path in files for hit in _unsafe_calls(path)]
    assert found == []
    # Plain text too, in case a call is spelled in a way the AST check misses.
    text = {p: p.read_text(encoding="utf-8") for p in files}
    assert [p for p, s in text.items() if "pickle.load" in s or "allow_pickle=True" in s] == []


def test_unsafe_call_check_catches_each_pattern(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pickle, torch, numpy as np\n"
        "pickle.load(open('f', 'rb'))\n"
        "torch.load('f')\n"
        "torch.load('f', weights_only=False)\n"
        "np.load('f', allow_pickle=True)\n"
        "torch.load('f', weights_only=True)\n"
    )
    assert len(_unsafe_calls(sample)) == 4


def test_safe_state_dict_still_loads(tmp_path):
    # weights_only=True is not a blanket refusal: tensors, ints, strings and dicts load.
    state = fl.openai_state("ReLU")
    torch.save(state, tmp_path / "3.pt")
    sae = read_folder(tmp_path)
    assert sae.d_in == fl.D and sae.d_latent == fl.F
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unrelated.safetensors"))  # ignored file
    assert read_folder(tmp_path).d_latent == fl.F
