"""Cross-layer transcoder folders: the native layout and circuit-tracer's, read into a CLT.

A CLT is not one :class:`~lightning_interp.dictionaries.Dictionary`, so these layouts are
not in the dictionary format registry (:data:`~lightning_interp.zoo.formats.FORMATS`,
whose readers return dictionaries); they have this small registry of their own,
:data:`CLT_LAYOUTS`, with detection by file names as there.

- ``native``: ``config.json`` + ``clt.safetensors``
  (:meth:`~lightning_interp.circuits.CrossLayerTranscoder.save`).
- ``circuit_tracer``: what circuit-tracer's ``CrossLayerTranscoder.to_safetensors`` writes
  and its ``load_clt`` reads (``circuit_tracer/transcoder/cross_layer_transcoder.py``), the
  layout of the ``mntss/clt-*`` Hub releases: per layer ``W_enc_{i}.safetensors`` holding
  ``W_enc_{i} [d_transcoder, d_model]`` (transposed here), ``b_enc_{i}``, ``b_dec_{i}``
  (the output bias of layer ``i``) and, for JumpReLU, ``threshold_{i}``; and
  ``W_dec_{i}.safetensors`` holding ``W_dec_{i} [d_transcoder, n_layers - i, d_model]``
  (our layout already). An optional ``config.yaml`` (``model_kind:
  cross_layer_transcoder``) names ``feature_input_hook`` / ``feature_output_hook``
  (TransformerLens hooks, mapped to canonical sites where unambiguous) and
  ``model_name``. Without thresholds circuit-tracer applies a ReLU, read here as a JumpReLU
  at threshold 0 (the same function). SAELens has no CLT layout of its own: its
  ``mntss_clt_layer_transcoder`` loader reads these same files one layer at a time,
  summing each feature's decoders over target layers (lossy, for activations only), so
  this reader covers the CLTs SAELens loads too.

Not read: skip connections (circuit-tracer's ``W_skip``, which ``to_safetensors`` does not
write, and Gemma Scope 2's affine skips): the transcoder-set protocol has no skip term.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from lightning_interp.circuits.clt import CONFIG_NAME, WEIGHTS_NAME, CrossLayerTranscoder
from lightning_interp.circuits.clt_config import CLTConfig
from lightning_interp.errors import CorruptFileError, DictionaryNotFoundError, UnknownFormatError
from lightning_interp.zoo.formats.sitenames import from_transformerlens

_ENC = re.compile(r"^W_enc_(\d+)\.safetensors$")
_DEC = re.compile(r"^W_dec_(\d+)\.safetensors$")
Reader = Callable[[Path, "str | torch.device"], CrossLayerTranscoder]


def _is_native(names: set[str]) -> bool:
    return {CONFIG_NAME, WEIGHTS_NAME} <= names


def _is_circuit_tracer(names: set[str]) -> bool:
    return "W_enc_0.safetensors" in names and "W_dec_0.safetensors" in names


def _layer_files(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    found = {}
    for path in folder.iterdir():
        match = pattern.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _tensor(tensors: dict[str, Tensor], name: str, path: Path, ndim: int) -> Tensor:
    if name not in tensors:
        raise CorruptFileError(
            f"{path} lacks tensor {name!r} (it holds {sorted(tensors)}); the file is not a "
            f"circuit-tracer CLT layer, or is damaged: re-download it"
        )
    tensor = tensors[name]
    if tensor.ndim != ndim or not tensor.is_floating_point():
        raise CorruptFileError(
            f"{path}: {name!r} should be a {ndim}-d float tensor, got {tuple(tensor.shape)} "
            f"{tensor.dtype}; re-download the file"
        )
    return tensor


def _hook_sites(config: dict, key: str, n_layers: int) -> list[str] | None:
    hook = config.get(key)
    if not isinstance(hook, str):
        return None
    # Canonical where the hook maps one to one, else the TransformerLens name as given.
    names = [f"blocks.{i}.{hook}" for i in range(n_layers)]
    return [from_transformerlens(name) or name for name in names]


def read_circuit_tracer(folder: Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a circuit-tracer CLT folder (see the module docstring) into a native CLT.

    Raises:
        DictionaryNotFoundError: a layer's encoder or decoder file is missing.
        CorruptFileError: a tensor is missing or its shape contradicts the others.
    """
    encoders, decoders = _layer_files(folder, _ENC), _layer_files(folder, _DEC)
    n_layers = len(encoders)
    for what, files in (("W_enc", encoders), ("W_dec", decoders)):
        missing = sorted(set(range(n_layers)) - set(files))
        if missing or len(files) != n_layers:
            raise DictionaryNotFoundError(
                f"{folder} has {sorted(encoders)} encoder files and {sorted(decoders)} decoder "
                f"files; a circuit-tracer CLT needs {what}_0..{what}_{n_layers - 1}"
                f".safetensors for every layer: download the whole folder"
            )
    state: dict[str, Tensor] = {}
    biases, widths, jump = [], [], None
    for i in range(n_layers):
        enc = load_file(str(encoders[i]), device=str(device))
        w_enc = _tensor(enc, f"W_enc_{i}", encoders[i], 2)
        state[f"W_enc.{i}"] = w_enc.T.contiguous()
        state[f"b_enc.{i}"] = _tensor(enc, f"b_enc_{i}", encoders[i], 1)
        biases.append(_tensor(enc, f"b_dec_{i}", encoders[i], 1))
        has_threshold = f"threshold_{i}" in enc
        if jump is not None and has_threshold != jump:
            raise CorruptFileError(f"{encoders[i]}: some layers have thresholds and some not")
        jump = has_threshold
        # circuit-tracer's ReLU is a JumpReLU at 0: log(0) = -inf gives exactly that.
        threshold = enc[f"threshold_{i}"].reshape(-1) if jump else torch.zeros(w_enc.shape[0])
        state[f"log_threshold.{i}"] = threshold.to(w_enc).clamp_min(0).log()
        widths.append(w_enc.shape[0])
        dec = load_file(str(decoders[i]), device=str(device))
        state[f"W_dec.{i}"] = _tensor(dec, f"W_dec_{i}", decoders[i], 3)
    state["b_dec"] = torch.stack(biases)
    d_model = state["W_enc.0"].shape[0]
    yaml_path = folder / "config.yaml"
    meta = yaml.safe_load(yaml_path.read_text()) if yaml_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    config = CLTConfig(
        n_layers=n_layers,
        d_in=d_model,
        d_out=state["b_dec"].shape[1],
        d_latent=widths if len(set(widths)) > 1 else widths[0],
        activation="jumprelu",
        input_sites=_hook_sites(meta, "feature_input_hook", n_layers),
        output_sites=_hook_sites(meta, "feature_output_hook", n_layers),
        dtype=str(state["W_enc.0"].dtype).removeprefix("torch."),
        backbone=meta.get("model_name") if isinstance(meta.get("model_name"), str) else None,
    )
    with torch.device("meta"):
        clt = CrossLayerTranscoder(config)
    expected = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
    wrong = {k: tuple(v.shape) for k, v in state.items() if expected.get(k) != tuple(v.shape)}
    if wrong:
        raise CorruptFileError(
            f"{folder}: tensor shapes {wrong} contradict a {n_layers}-layer CLT of width "
            f"{widths[0]} over d_model={d_model} (W_dec_i must be [d_transcoder, n_layers - i, "
            f"d_model]); the files come from different CLTs"
        )
    clt.load_state_dict(state, strict=True, assign=True)
    return clt.eval()


def _read_native(folder: Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    return CrossLayerTranscoder.load(folder, device=device)


#: Layout name -> (detector on file names, reader).
CLT_LAYOUTS: dict[str, tuple[Callable[[set[str]], bool], Reader]] = {
    "native": (_is_native, _read_native),
    "circuit_tracer": (_is_circuit_tracer, read_circuit_tracer),
}


def detect_clt_layout(filenames: Iterable[str]) -> str:
    """The layout of a folder holding ``filenames`` (base names).

    Raises:
        UnknownFormatError: no layout, or several, match.
    """
    names = {os.path.basename(n) for n in filenames}
    found = [name for name, (detect, _) in CLT_LAYOUTS.items() if detect(names)]
    if len(found) != 1:
        raise UnknownFormatError(
            f"cannot tell the CLT layout of files {sorted(names)[:6]} (matches: {found}); "
            f"known layouts: native ({CONFIG_NAME} + {WEIGHTS_NAME}), circuit_tracer "
            f"(W_enc_N.safetensors + W_dec_N.safetensors); pass layout= to choose"
        )
    return found[0]


def read_clt_folder(
    folder: str | os.PathLike[str],
    *,
    layout: str = "auto",
    device: str | torch.device = "cpu",
) -> CrossLayerTranscoder:
    """Read a CLT folder of any known layout into a native CLT (in eval mode).

    Args:
        folder: The folder.
        layout: ``"native"``, ``"circuit_tracer"`` or ``"auto"`` (detected from file names).
        device: Where to put the weights.

    Raises:
        DictionaryNotFoundError: the folder or a file is missing.
        UnknownFormatError: the layout is unknown or cannot be told.
        CorruptFileError: the files contradict each other.
    """
    path = Path(folder)
    if not path.is_dir():
        raise DictionaryNotFoundError(f"CLT folder {path} does not exist or is not a folder")
    if layout == "auto":
        layout = detect_clt_layout(p.name for p in path.iterdir())
    if layout not in CLT_LAYOUTS:
        raise UnknownFormatError(f"unknown CLT layout {layout!r}; known: {sorted(CLT_LAYOUTS)}")
    return CLT_LAYOUTS[layout][1](path, device)
