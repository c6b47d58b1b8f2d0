"""The zoo catalogue: every entry passes the schema, ids resolve, the wheel ships it."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lightning_interp import load_dictionary
from lightning_interp.backbones.sites import SITE_KINDS
from lightning_interp.errors import CatalogueError, UnsupportedFormatError
from lightning_interp.zoo.catalogue import (
    CATALOGUE_DIR,
    FOREIGN_FORMATS,
    get_release,
    list_releases,
    parse_entry,
    resolve_catalogue_id,
)
from lightning_interp.zoo.formats import FORMATS, write_folder
from lightning_interp.zoo.formats.sitenames import from_transformerlens
from tests.zoo.helpers import assert_same_weights, make_sae

ROOT = Path(__file__).resolve().parents[2]
YAML_FILES = sorted((ROOT / "zoo").glob("*.yaml"))
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# A canonical site, or a raw module path with its direction (Gemma's post-norm MLP output).
SITE = re.compile(rf"^(embeddings|layers\.\d+\.({'|'.join(SITE_KINDS)})|[\w.]+:(input|output))$")
TL_ID = re.compile(r"^blocks\.\d+\.(attn\.)?hook_[a-z_]+?(?=_\d|__|$)")


def test_the_package_sees_the_top_level_zoo_folder():
    assert sorted(p.name for p in CATALOGUE_DIR.glob("*.yaml")) == [p.name for p in YAML_FILES]


def test_the_catalogue_holds_at_least_60_releases_from_every_family():
    """One YAML file is one release; the families the catalogue promises are all present."""
    releases = list_releases()
    assert len(releases) == len(YAML_FILES) >= 60
    assert len({e.release for e in releases}) == len(releases)
    assert sum(len(e.sites) for e in releases) > 5000
    names = {e.release for e in releases}
    for family in (
        r"^gpt2-small-",  # GPT-2 small: Bloom, OpenAI v5 copies, feature splitting, ...
        r"^pythia-70m-deduped-(res|mlp|att)-sm$",  # Marks et al. (SAELens copies)
        r"^gemma-scope-(2b|9b|27b)-",  # Gemma Scope 1
        r"^gemma-scope-2-",  # Gemma Scope 2
        r"^llama_scope_lx[ram]_(8|32)x$",  # Llama Scope
        r"^sae-(llama|pythia)",  # EleutherAI sparsify
        r"transcoder",  # transcoder releases
    ):
        assert len([n for n in names if re.search(family, n)]) >= 2, family
    assert {e.format for e in releases} >= {"saelens", "sparsify", "gemma_scope"}
    assert any(e.format == "dictionary_learning" for e in releases)
    assert sum(e.loadable for e in releases) >= 60


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_every_entry_passes_the_schema(path):
    entry = parse_entry(yaml.load(path.read_text(), Loader=LOADER), str(path))
    assert entry.release == path.stem
    assert entry.sources, "every release names where its facts come from"
    assert entry.format in FORMATS or entry.format in FOREIGN_FORMATS
    for site in entry.sites:
        assert site.path and not site.path.startswith("/")
        assert entry.find(site.id) is site
        for where in (site.site, site.site_out):
            assert where is None or SITE.match(where), where
        if site.variance_explained is not None:
            assert 0 <= site.fvu <= 1
        assert site.width is None or site.width > 0
        # Sites named from TransformerLens hooks agree with the format readers' mapping.
        hook = TL_ID.match(site.id)
        if hook and from_transformerlens(hook.group(0)) is not None:
            assert site.site == from_transformerlens(hook.group(0))
    first = entry.sites[0]
    if entry.loadable:
        target = resolve_catalogue_id(f"zoo:{entry.release}/{first.id}")
        assert (target.repo, target.path, target.format) == (entry.repo, first.path, entry.format)
    else:
        with pytest.raises(UnsupportedFormatError, match=entry.format):
            resolve_catalogue_id(f"zoo:{entry.release}/{first.id}")


def test_a_neuronpedia_id_names_one_dictionary_across_the_catalogue():
    seen: dict[str, tuple[str, str]] = {}
    for entry in list_releases():
        for site in entry.sites:
            if site.neuronpedia:
                where = (entry.repo, site.path)
                assert seen.setdefault(site.neuronpedia, where) == where, site.neuronpedia
    assert len(seen) > 1000


def test_published_numbers_are_the_ones_saelens_lists():
    # Spot checks against decoderesearch/SAELens@468b9cc sae_lens/pretrained_saes.yaml.
    gpt2 = get_release("gpt2-small-res-jb")
    layer8 = gpt2.find("blocks.8.hook_resid_pre")
    assert (layer8.l0, layer8.variance_explained, layer8.site) == (60.0, 0.9, "layers.8.resid_pre")
    assert layer8.neuronpedia == "gpt2-small/8-res-jb"
    assert gpt2.find("layers.8.resid_pre") is layer8
    # The full Gemma Scope release: a bare site resolves to the canonical 16k dictionary.
    gemma = get_release("gemma-scope-2b-pt-res").find("layers.12.resid_post")
    assert gemma.path == "layer_12/width_16k/average_l0_82" and gemma.l0 == 82
    assert gemma.canonical and gemma.width == 16384
    canonical = get_release("gemma-scope-2b-pt-res-canonical").find("layer_12/width_16k/canonical")
    assert (
        canonical.path == gemma.path and canonical.neuronpedia == "gemma-2-2b/12-gemmascope-res-16k"
    )
    oai = get_release("gpt2-small-resid-post-v5-32k").find("blocks.8.hook_resid_post")
    assert (oai.l0, oai.variance_explained, oai.width) == (32.0, 0.74, 32768)
    llama = get_release("llama_scope_lxr_8x").find("l15r_8x")
    assert (llama.site, llama.l0, llama.width) == ("layers.15.resid_post", 50.0, 32768)
    gs2 = get_release("gemma-scope-2-1b-pt-res").find("layer_13_width_16k_l0_medium")
    assert (gs2.l0, gs2.neuronpedia) == (60.0, "gemma-3-1b/13-gemmascope-2-res-16k")


def test_gemma_mlp_outputs_are_read_after_the_post_norm():
    """TransformerLens's Gemma hook_mlp_out (and Gemma Scope 2's config) is post-RMSNorm."""
    mlp = get_release("gemma-scope-2b-pt-mlp").find("layer_3/width_16k/average_l0_21")
    assert mlp.site == "model.layers.3.post_feedforward_layernorm:output"
    transcoder = get_release("gemma-scope-2b-pt-transcoders").sites[5]
    assert (transcoder.site, transcoder.site_out) == (
        "layers.5.mlp_in",
        "model.layers.5.post_feedforward_layernorm:output",
    )


VALID = {
    "release": "x",
    "title": "t",
    "repo": "org/name",
    "revision": "main",
    "format": "saelens",
    "backbone": "gpt2",
    "sites": [{"id": "a", "path": "a"}],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"repo": "not a repo"}, "not org/name"),
        ({"format": "pickle"}, "format must be one of"),
        ({"sites": []}, "non-empty list"),
        ({"sites": [{"path": "a"}]}, "needs an id"),
        ({"sites": [{"id": "a", "path": "a", "l0": -1}]}, "l0 must be"),
        ({"sites": [{"id": "a", "path": "a", "variance_explained": 1.5}]}, "variance_explained"),
        ({"sites": [{"id": "a", "path": "a"}, {"id": "a", "path": "b"}]}, "duplicate site ids"),
        ({"colour": "red"}, "unknown keys"),
        ({"sites": [{"id": "a", "width": 16.5}]}, "width must be an integer"),
        ({"sites": [{"id": "a", "width": True}]}, "width must be an integer"),
        ({"width": -4}, "width must be an integer"),
        ({"sites": [{"id": "a", "neuronpedia": "no-slash"}]}, "neuronpedia must be"),
        ({"sites": [{"id": "a", "site": ""}]}, "site must be a string"),
        ({"sites": [{"id": "a", "canonical": "yes"}]}, "canonical must be true or false"),
        ({"sites": [{"id": "a", "canonical": True}]}, "a canonical dictionary needs a site"),
        (
            {"sites": [{"id": i, "site": "layers.0.resid_post", "canonical": True} for i in "ab"]},
            "several canonical dictionaries",
        ),
        ({"kind": "crosscoder"}, "kind must be one of"),
        ({"architecture": "Top K"}, "architecture must be"),
        ({"sources": "SAELens"}, "sources must be a list"),
    ],
)
def test_the_schema_rejects_bad_entries(change, message):
    parse_entry(dict(VALID), "ok.yaml")
    with pytest.raises(CatalogueError, match=message):
        parse_entry({**VALID, **change}, "bad.yaml")


def test_optional_fields_default_sensibly():
    old = parse_entry(dict(VALID), "old.yaml")  # a file written before the new fields
    assert (old.kind, old.architecture, old.sources, old.sites[0].width) == ("sae", None, (), None)
    entry = parse_entry(
        {
            **VALID,
            "width": 4096,
            "kind": "transcoder",
            "sources": ["org/repo@abc:file.yaml"],
            "sites": [{"id": "layers.1"}, {"id": "b", "path": "x/b", "width": 8192}],
        },
        "new.yaml",
    )
    assert entry.kind == "transcoder" and entry.sources == ("org/repo@abc:file.yaml",)
    assert [(s.path, s.width) for s in entry.sites] == [("layers.1", 4096), ("x/b", 8192)]


def test_a_site_read_by_several_dictionaries_needs_an_id_or_a_canonical_one():
    two = [{"id": i, "site": "layers.3.resid_post"} for i in ("w16k", "w65k")]
    entry = parse_entry({**VALID, "sites": two}, "two.yaml")
    with pytest.raises(CatalogueError, match=r"2 dictionaries at 'layers.3.resid_post' \(w16k"):
        entry.find("layers.3.resid_post")
    two[0]["canonical"] = True
    assert parse_entry({**VALID, "sites": two}, "two.yaml").find("layers.3.resid_post").id == "w16k"
    # Real releases: canonical SAEs of several widths at one layer resolve to the narrowest; a sweep
    # of many trainers at one site has no default and asks for an id.
    gemma = get_release("gemma-scope-2b-pt-res-canonical")
    assert len([s for s in gemma.sites if s.site == "layers.12.resid_post"]) >= 2
    assert gemma.find("layers.12.resid_post").id == "layer_12/width_16k/canonical"
    sweep = get_release("sae_bench_gemma-2-2b_topk_width-2pow14_date-1109")
    with pytest.raises(CatalogueError, match="name one by its id"):
        sweep.find("layers.12.resid_post")


def test_unknown_ids_get_suggestions():
    with pytest.raises(CatalogueError, match="Did you mean gpt2-small-res-jb"):
        resolve_catalogue_id("zoo:gpt2-small-res-j/blocks.8.hook_resid_pre")
    with pytest.raises(CatalogueError, match="blocks.8.hook_resid_pre"):
        resolve_catalogue_id("zoo:gpt2-small-res-jb/blocks.8.hook_resid_pr")
    with pytest.raises(CatalogueError, match="add one of its ids"):
        resolve_catalogue_id("zoo:gpt2-small-res-jb")


def test_resolving_one_id_reads_one_file():
    from lightning_interp.zoo import catalogue

    catalogue._load_all.cache_clear()
    catalogue._load_file.cache_clear()
    assert resolve_catalogue_id("zoo:sae-llama-3-8b-32x/layers.10").path == "layers.10"
    assert catalogue._load_file.cache_info().currsize == 1
    assert catalogue._load_all.cache_info().currsize == 0
    # Names are matched exactly, also on a case-insensitive file system.
    with pytest.raises(CatalogueError, match="Did you mean sae-llama-3-8b-32x"):
        get_release("SAE-llama-3-8b-32x")


def test_a_release_in_a_foreign_format_is_listed_but_refuses_to_load():
    entry = get_release("llama_scope_lxr_8x")
    assert not entry.loadable and entry.format == "llama_scope"
    # Refused while resolving: no Hub request is made (none is reachable in this test).
    with pytest.raises(UnsupportedFormatError, match=r"'llama_scope' format .*hyperparams.json"):
        load_dictionary("zoo:llama_scope_lxr_8x/layers.15.resid_post")


def test_a_zoo_id_loads_through_the_hub(hub, tmp_path):
    # The catalogued repo, served by the loopback Hub in the release's (SAELens) layout.
    entry = get_release("gpt2-small-res-jb")
    sae = make_sae("layers.8.resid_pre", seed=8)
    folder = write_folder(sae, tmp_path / "blocks.8.hook_resid_pre", format="saelens")
    files = {f"blocks.8.hook_resid_pre/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["blocks.9.hook_resid_pre/cfg.json"] = files["blocks.8.hook_resid_pre/cfg.json"]
    hub.add_files(entry.repo, files)
    loaded = load_dictionary("zoo:gpt2-small-res-jb/layers.8.resid_pre")
    assert_same_weights(loaded, sae)
    assert loaded.config.provenance.revision == hub.state.repos[entry.repo].branches["main"]
    assert all("blocks.8" in p for p in hub.state.downloads())


def test_the_wheel_ships_the_catalogue(tmp_path):
    """Build a wheel from a copy of the sources and load the catalogue from it alone."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(
        ROOT / "lightning_interp", src / "lightning_interp", symlinks=True, ignore=ignore
    )
    shutil.copytree(ROOT / "zoo", src / "zoo")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"lightning_interp/catalogue/{p.name}" for p in YAML_FILES} <= set(names)
    assert "lightning_interp/py.typed" in names  # PEP 561 marker (pyproject package-data)

    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = (
        "import lightning_interp;"
        "from lightning_interp.zoo.catalogue import resolve_catalogue_id as r;"
        "print(lightning_interp.__file__);"
        "print(r('zoo:gpt2-small-res-jb/layers.8.resid_pre').path)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "site")},
        check=True,
        capture_output=True,
        text=True,
    )
    module_file, path = out.stdout.split()
    assert Path(module_file).is_relative_to(tmp_path / "site")  # the wheel's copy, not the tree
    assert path == "blocks.8.hook_resid_pre"
