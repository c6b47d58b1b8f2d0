"""Filtering the catalogue by backbone, site, architecture, kind and format; `zoo list/show`."""

import pytest

from lightning_interp.cli import main
from lightning_interp.zoo.catalogue import (
    CatalogueSite,
    filter_catalogue,
    list_releases,
    site_matches,
)


def run(*argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code


def releases(**filters):
    return {match.entry.release for match in filter_catalogue(**filters)}


def test_no_filter_is_the_whole_catalogue():
    matches = filter_catalogue()
    assert [m.entry for m in matches] == list_releases()
    assert all(m.sites == m.entry.sites for m in matches)


@pytest.mark.parametrize("pattern", ["gpt2", "GPT2", "gpt?"])
def test_backbone_by_hub_id_name_or_glob(pattern):
    found = releases(backbone=pattern)
    assert {"gpt2-small-res-jb", "gpt2-small-resid-post-v5-32k"} <= found
    assert {e.release for e in list_releases() if e.backbone == "gpt2"} == found


def test_backbone_name_part_matches_but_not_a_longer_model():
    found = releases(backbone="gemma-2-2b")
    assert "gemma-scope-2b-pt-res" in found and "gemma-scope-2b-pt-transcoders" in found
    assert found == releases(backbone="google/gemma-2-2b")
    assert "gemma-scope-9b-it-res" not in found  # gemma-2-9b-it
    assert "gemma-scope-9b-it-res" in releases(backbone="google/gemma-2-9b-*")


def test_site_filter_keeps_only_matching_dictionaries():
    (match,) = [
        m
        for m in filter_catalogue(site="layers.8.resid_pre")
        if m.entry.release == "gpt2-small-res-jb"
    ]
    assert [s.id for s in match.sites] == ["blocks.8.hook_resid_pre"]
    # A site kind matches every layer; a glob matches raw module paths too.
    kinds = {s.site for m in filter_catalogue(site="attn_z") for s in m.sites}
    assert kinds and all(k.endswith(".attn_z") for k in kinds)
    gemma_mlp = releases(site="*post_feedforward_layernorm*")
    assert {"gemma-scope-2b-pt-mlp", "gemma-scope-2-1b-pt-mlp"} <= gemma_mlp
    assert not releases(site="layers.999.resid_post")


def test_site_filter_sees_a_transcoders_output_site():
    site = CatalogueSite("t", "t", site="layers.2.mlp_in", site_out="layers.2.mlp_out")
    assert site_matches(site, "mlp_in") and site_matches(site, "layers.2.mlp_out")
    assert not site_matches(site, "resid_post") and not site_matches(site, "layers.2.mlp")
    assert "sae-pythia-160m-32k" in releases(site="mlp_out")
    assert "gpt2-small-transcoders-dunefsky" in releases(site="layers.4.mlp_out")


def test_architecture_kind_and_format_filters():
    topk = filter_catalogue(architecture="TopK")
    assert topk and all(m.entry.architecture == "topk" for m in topk)
    transcoders = filter_catalogue(kind="transcoder")
    assert {m.entry.kind for m in transcoders} == {"transcoder"}
    assert "gemma-scope-2b-pt-transcoders" in {m.entry.release for m in transcoders}
    assert releases(kind="skip_transcoder") >= {"skip-transcoder-SmolLM2-135M-128x"}
    loadable = filter_catalogue(format="loadable")
    assert loadable and all(m.entry.loadable for m in loadable)
    assert "llama_scope_lxr_8x" not in {m.entry.release for m in loadable}
    assert releases(format="llama_scope") == {
        f"llama_scope_lx{p}_{x}x" for p in "ram" for x in (8, 32)
    }


def test_filters_combine():
    found = filter_catalogue(backbone="gpt2", architecture="topk", site="mlp_out")
    assert {m.entry.release for m in found} == {
        "gpt2-small-mlp-out-v5-32k",
        "gpt2-small-mlp-out-v5-128k",
    }
    assert all(len(m.sites) == 12 for m in found)


def test_zoo_list_prints_one_line_per_matching_release(capsys):
    assert run("zoo", "list", "--backbone", "gpt2") == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[1:-1]
    expected = releases(backbone="gpt2")
    assert {line.split()[0] for line in body} == expected
    assert lines[-1].startswith(f"{len(expected)} releases, ")
    # A foreign-format release is marked in the format column.
    transcoders = next(line for line in body if line.startswith("gpt2-small-transcoders-dunefsky"))
    assert "transcoder_circuits*" in transcoders


def test_zoo_list_site_and_architecture_counts(capsys):
    assert run("zoo", "list", "--site", "layers.8.resid_pre", "--architecture", "standard") == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[1:-1]}
    assert rows == {"gpt2-small-res-jb": 1, "gpt2-small-res-jb-feature-splitting": 8}
    assert run("zoo", "list", "--kind", "crosscoder") == 2  # argparse choices


def test_zoo_show_marks_canonical_and_foreign_formats(capsys):
    assert run("zoo", "show", "gemma-scope-2b-pt-res-canonical") == 0
    out = capsys.readouterr().out
    assert "layer_12/width_16k/canonical *" in out and "gemma-2-2b/12-gemmascope-res-16k" in out
    assert "source: decoderesearch/SAELens@" in out and "load_dictionary('zoo:" in out
    assert run("zoo", "show", "zoo:llama_scope_lxr_8x") == 0
    out = capsys.readouterr().out
    assert "not loadable yet" in out and "load_dictionary(" not in out
