"""The zoo catalogue: every entry passes the schema, ids resolve, the wheel ships it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lightning_interp import load_dictionary
from lightning_interp.errors import CatalogueError
from lightning_interp.zoo.catalogue import (
    CATALOGUE_DIR,
    get_release,
    parse_entry,
    resolve_catalogue_id,
)
from lightning_interp.zoo.formats import write_folder
from tests.zoo.helpers import assert_same_weights, make_sae

ROOT = Path(__file__).resolve().parents[2]
YAML_FILES = sorted((ROOT / "zoo").glob("*.yaml"))


def test_the_package_sees_the_top_level_zoo_folder():
    assert sorted(p.name for p in CATALOGUE_DIR.glob("*.yaml")) == [p.name for p in YAML_FILES]
    assert len(YAML_FILES) >= 5


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.stem)
def test_every_entry_passes_the_schema(path):
    entry = parse_entry(yaml.safe_load(path.read_text()), str(path))
    assert entry.release == path.stem
    for site in entry.sites:
        assert site.path and not site.path.startswith("/")
        if site.variance_explained is not None:
            assert 0 <= site.fvu <= 1
        # Every id resolves to its own folder.
        target = resolve_catalogue_id(f"zoo:{entry.release}/{site.id}")
        assert (target.repo, target.path, target.format) == (entry.repo, site.path, entry.format)


def test_published_numbers_are_the_ones_saelens_lists():
    # Spot checks against SAELens's pretrained_saes.yaml (gpt2-small-res-jb).
    gpt2 = get_release("gpt2-small-res-jb")
    layer8 = gpt2.find("blocks.8.hook_resid_pre")
    assert (layer8.l0, layer8.variance_explained, layer8.site) == (60.0, 0.9, "layers.8.resid_pre")
    assert gpt2.find("layers.8.resid_pre") is layer8
    gemma = get_release("gemma-scope-2b-pt-res").find("layers.12.resid_post")
    assert gemma.path == "layer_12/width_16k/average_l0_82" and gemma.l0 == 82


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
        ({"sites": [{"id": "a"}]}, "needs id and path"),
        ({"sites": [{"id": "a", "path": "a", "l0": -1}]}, "l0 must be"),
        ({"sites": [{"id": "a", "path": "a", "variance_explained": 1.5}]}, "variance_explained"),
        ({"sites": [{"id": "a", "path": "a"}, {"id": "a", "path": "b"}]}, "duplicate site ids"),
        ({"colour": "red"}, "unknown keys"),
    ],
)
def test_the_schema_rejects_bad_entries(change, message):
    parse_entry(dict(VALID), "ok.yaml")
    with pytest.raises(CatalogueError, match=message):
        parse_entry({**VALID, **change}, "bad.yaml")


def test_unknown_ids_get_suggestions():
    with pytest.raises(CatalogueError, match="Did you mean gpt2-small-res-jb"):
        resolve_catalogue_id("zoo:gpt2-small-res-j/blocks.8.hook_resid_pre")
    with pytest.raises(CatalogueError, match="blocks.8.hook_resid_pre"):
        resolve_catalogue_id("zoo:gpt2-small-res-jb/blocks.8.hook_resid_pr")
    with pytest.raises(CatalogueError, match="add one of its ids"):
        resolve_catalogue_id("zoo:gpt2-small-res-jb")


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
