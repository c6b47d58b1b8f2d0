"""Foreign hook names mapped to canonical site names, where the mapping is unambiguous.

Each function returns ``None`` when a name has no single canonical equivalent (e.g.
TransformerLens ``hook_embed``, which excludes GPT-2's position embeddings); readers then
keep only the raw name, in ``provenance.extra``.
"""

from __future__ import annotations

import re

# TransformerLens ``blocks.{i}.<hook>`` -> canonical ``layers.{i}.<kind>``.
_TL_HOOKS = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "hook_z": "attn_z",
    "attn.hook_z": "attn_z",
    "ln2.hook_normalized": "mlp_in",
    "hook_mlp_in": "mlp_in",
}
# The inverse, for writing SAELens configs (one TransformerLens name per kind).
_TL_NAMES = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "mlp_out": "hook_mlp_out",
    "attn_out": "hook_attn_out",
    "attn_z": "attn.hook_z",
    "mlp_in": "ln2.hook_normalized",
}
_CANONICAL = re.compile(r"^layers\.(\d+)\.(\w+)$")


def from_transformerlens(hook: str | None) -> str | None:
    """``blocks.8.hook_resid_post`` -> ``layers.8.resid_post`` (``None`` if ambiguous)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook or "")
    if not match or match.group(2) not in _TL_HOOKS:
        return None
    return f"layers.{match.group(1)}.{_TL_HOOKS[match.group(2)]}"


def to_transformerlens(site: str | None) -> str | None:
    """``layers.8.resid_post`` -> ``blocks.8.hook_resid_post`` (``None`` if not canonical)."""
    if site == "embeddings":
        return "blocks.0.hook_resid_pre"
    match = _CANONICAL.match(site or "")
    if not match or match.group(2) not in _TL_NAMES:
        return None
    return f"blocks.{match.group(1)}.{_TL_NAMES[match.group(2)]}"


def from_sparsify(hookpoint: str, *, transcode: bool) -> tuple[str | None, str | None]:
    """A sparsify hookpoint (module path relative to the base model) -> ``(site, site_out)``.

    sparsify reads a module's output; a transcoder reads its input and predicts its output.
    ``layers.8`` / ``h.8`` -> ``layers.8.resid_post``; ``layers.8.mlp`` ->
    ``layers.8.mlp_out`` (a transcoder: ``mlp_in`` -> ``mlp_out``); ``layers.8.self_attn`` /
    ``h.8.attn`` -> ``layers.8.attn_out``; ``embed_tokens`` -> ``embeddings``.
    """
    if hookpoint == "embed_tokens" and not transcode:
        return "embeddings", None
    match = re.fullmatch(r"(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn))?", hookpoint)
    if not match:
        return None, None
    layer, part = match.groups()
    if part is None:
        return (None, None) if transcode else (f"layers.{layer}.resid_post", None)
    kind = "mlp" if part == "mlp" else "attn"
    if transcode:
        # Only the MLP's input has a canonical name; attention inputs are pre-norm streams.
        return (
            (f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out") if kind == "mlp" else (None, None)
        )
    return f"layers.{layer}.{kind}_out", None


def from_hf_module(hook: str | None) -> str | None:
    """A Hugging Face module hook (Gemma Scope 2 ``hf_hook_point_in/out``) -> a site.

    ``model.layers.8.output`` -> ``layers.8.resid_post``;
    ``...pre_feedforward_layernorm.output`` -> ``mlp_in``; ``...self_attn.o_proj.input`` ->
    ``attn_z``; ``...mlp.output`` -> ``mlp_out``. Anything else becomes a raw site path
    (``model.layers.8.post_feedforward_layernorm:output``), which site resolution accepts.
    """
    if not hook:
        return None
    match = re.fullmatch(
        r"model\.(?:language_model\.)?layers\.(\d+)(?:\.(.+))?\.(input|output)", hook
    )
    known = {
        (None, "output"): "resid_post",
        ("pre_feedforward_layernorm", "output"): "mlp_in",
        ("mlp", "input"): "mlp_in",
        ("mlp", "output"): "mlp_out",
        ("self_attn.o_proj", "input"): "attn_z",
        ("self_attn", "output"): "attn_out",
    }
    if match and (match.group(2), match.group(3)) in known:
        return f"layers.{match.group(1)}.{known[(match.group(2), match.group(3))]}"
    path, _, direction = hook.rpartition(".")
    return f"{path}:{direction}" if direction in ("input", "output") else hook


def from_dictionary_learning(submodule_name: str | None) -> str | None:
    """dictionary_learning ``submodule_name``: ``resid_post_layer_3`` -> ``layers.3.resid_post``."""
    match = re.fullmatch(
        r"(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)", submodule_name or ""
    )
    if match:
        return f"layers.{match.group(2)}.{match.group(1)}"
    return None
