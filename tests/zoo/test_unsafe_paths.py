"""Paths from configs, arguments and Hub listings never leave their folder; failures are loud."""

import tempfile

import pytest

from lightning_interp import load_dictionary
from lightning_interp.cli import main
from lightning_interp.errors import CatalogueError, HubError, UnsafePathError
from lightning_interp.zoo import load_head
from lightning_interp.zoo.catalogue import parse_entry
from lightning_interp.zoo.publish import publish_run
from tests.zoo.helpers import make_sae
from tests.zoo.hub_server import Fault

NATIVE_FILES = ("config.json", "model.safetensors")


def run(*argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code


def files_under(root):
    """Every file under ``root`` except the Hugging Face cache the hub fixture keeps there."""
    return {p for p in root.rglob("*") if p.is_file() and "hf_home" not in p.parts}


@pytest.fixture
def nested_tmp(tmp_path, monkeypatch):
    """Make temporary (staging) folders live three levels inside tmp_path.

    A staged path that climbs out (``../../x``) then lands inside tmp_path, where the test
    can see it, instead of somewhere in /tmp.
    """
    staging = tmp_path / "a" / "b" / "tmp"
    staging.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    return staging


@pytest.mark.parametrize("site", ["../../escaped", "ABSOLUTE", "ok/../../escaped", ".."])
def test_hostile_site_from_a_pulled_config_through_card_and_publish(
    hub, tmp_path, nested_tmp, capsys, site
):
    if site == "ABSOLUTE":
        site = str(tmp_path / "absolute" / "target")
    source = tmp_path / "attacker"
    make_sae(site).save_pretrained(source)  # provenance.site is the attacker's text
    hub.add_files("evil/sae", {name: (source / name).read_bytes() for name in NATIVE_FILES})

    pulled = tmp_path / "pulled"
    assert run("pull", "evil/sae", str(pulled)) == 0  # a site is data: pulling is harmless
    assert load_dictionary(pulled).config.provenance.site == site
    capsys.readouterr()
    before = files_under(tmp_path)

    for command in ("card", "publish"):
        assert run(command, str(pulled), "--repo-id", "me/victim") == 2
        err = capsys.readouterr().err
        assert "cannot be used as a folder name" in err and "provenance.site" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(UnsafePathError, match="set a plain site name"):
        publish_run(pulled, "me/victim")

    assert files_under(tmp_path) == before  # nothing written anywhere, in or out of staging
    assert "me/victim" not in hub.state.repos  # refused before the Hub was touched


@pytest.mark.parametrize("site", ["../../escaped", "/etc/cron.d", "a\\..\\b", ".hidden", "a//b"])
def test_push_to_hub_refuses_a_hostile_site_before_touching_the_hub(
    hub, tmp_path, nested_tmp, site
):
    before = files_under(tmp_path)
    with pytest.raises(UnsafePathError, match="cannot be used as a folder name"):
        make_sae().push_to_hub("me/victim", site=site)
    with pytest.raises(UnsafePathError):
        publish_run({site: make_sae()}, "me/victim")
    assert files_under(tmp_path) == before
    assert "me/victim" not in hub.state.repos


def test_nested_plain_sites_still_publish(hub):
    result = make_sae().push_to_hub("me/nested", site="layer_3/width_16k")
    files = hub.state.repos["me/nested"].commits[result.commit]
    assert {"layer_3/width_16k/config.json", "layer_3/width_16k/model.safetensors"} <= set(files)


def test_a_commit_that_loses_the_weights_is_an_error_not_a_success(hub):
    # The Hub answers 200 but keeps only the regular (non-LFS) files of the commit.
    hub.state.faults.append(Fault("POST", "/commit/", "lose-lfs", times=1))
    with pytest.raises(HubError, match=r"lacks \['model.safetensors'\].*publish again"):
        make_sae().push_to_hub("me/lossy")
    assert (
        "model.safetensors"
        not in hub.state.repos["me/lossy"].commits[hub.state.repos["me/lossy"].branches["main"]]
    )
    make_sae().push_to_hub("me/lossy")  # a retry on a healthy Hub succeeds


def test_hub_listing_with_paths_that_climb_out_is_refused(hub, tmp_path):
    source = tmp_path / "sae"
    make_sae().save_pretrained(source)
    hub.add_files("evil/listing", {f"../x/{n}": (source / n).read_bytes() for n in NATIVE_FILES})
    with pytest.raises(UnsafePathError, match=r"'../x/config.json' would leave"):
        load_dictionary("evil/listing")
    with pytest.raises(UnsafePathError):
        make_sae().push_to_hub("evil/listing", site="ok")  # the card would list that folder
    assert not (tmp_path / "hf_home" / "hub" / "x").exists()


def test_subfolder_and_revision_arguments_cannot_climb_out(hub, tmp_path, offline):
    folder = tmp_path / "tree" / "sae"
    make_sae().save_pretrained(folder)
    (tmp_path / "outside").mkdir()
    make_sae().save_pretrained(tmp_path / "outside" / "sae")
    with pytest.raises(UnsafePathError):
        load_head(tmp_path / "tree", subfolder="../outside/sae")
    make_sae().push_to_hub("org/cached")
    load_dictionary("org/cached")  # cache it
    offline()
    with pytest.raises(UnsafePathError):
        load_dictionary("org/cached", revision="../../../../outside")


def test_pull_default_folder_is_built_from_checked_names(hub, tmp_path, monkeypatch, capsys):
    make_sae().push_to_hub("org/solo")
    monkeypatch.chdir(tmp_path / "..")
    for argv in (("org/solo", "--site", ".."), ("org/solo", "--subfolder", "../..")):
        assert run("pull", *argv) == 2
        assert "cannot be used as a folder name" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert run("pull", "org/solo") == 0
    assert (tmp_path / "solo" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("release", "path"), [("../up", "blocks.0"), ("ok", "../../x"), ("ok", "/abs/x")]
)
def test_catalogue_entries_with_climbing_names_are_refused(release, path):
    entry = {
        "release": release,
        "title": "t",
        "repo": "org/name",
        "revision": "main",
        "format": "saelens",
        "backbone": "gpt2",
        "sites": [{"id": "a", "path": path}],
    }
    with pytest.raises(CatalogueError, match="cannot be used as a folder name"):
        parse_entry(entry, "test.yaml")
