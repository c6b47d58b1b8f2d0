"""Loading from the loopback Hub: partial downloads, pinned revisions, offline mode."""

import pytest
import torch

from lightning_interp import load_dictionary
from lightning_interp.errors import DictionaryNotFoundError, SiteSelectionError
from lightning_interp.zoo.publish import publish_run
from tests.zoo.helpers import assert_same_weights, make_sae

SITES = ["layers.0.resid_post", "layers.1.resid_post", "layers.2.resid_post"]


@pytest.fixture
def multi_site(hub):
    saes = {site: make_sae(site, seed=i) for i, site in enumerate(SITES)}
    result = publish_run(saes, "org/multi")
    return saes, result


def test_site_chooses_one_folder_and_only_it_is_downloaded(hub, multi_site):
    saes, _ = multi_site
    hub.state.requests.clear()
    loaded = load_dictionary("org/multi", site="layers.1.resid_post")
    assert_same_weights(loaded, saes["layers.1.resid_post"])
    downloaded = sorted(p.split("/resolve/")[1].split("/", 1)[1] for p in hub.state.downloads())
    assert downloaded == [
        "layers.1.resid_post/config.json",
        "layers.1.resid_post/model.safetensors",
    ]


def test_multi_site_repo_without_site_lists_the_sites(hub, multi_site):
    with pytest.raises(SiteSelectionError) as info:
        load_dictionary("org/multi")
    assert all(site in str(info.value) for site in SITES)
    with pytest.raises(SiteSelectionError, match="site='layers.9.resid_post' matches no"):
        load_dictionary("org/multi", site="layers.9.resid_post")
    assert not hub.state.downloads()  # nothing fetched before the choice is known


def test_subfolder_chooses_like_site(hub, multi_site):
    saes, _ = multi_site
    assert_same_weights(
        load_dictionary("org/multi", subfolder="layers.2.resid_post"), saes["layers.2.resid_post"]
    )


def test_pinned_revision_returns_the_old_weights(hub, multi_site):
    saes, first = multi_site
    newer = make_sae("layers.0.resid_post", seed=99)
    second = newer.push_to_hub("org/multi", site="layers.0.resid_post")
    assert second.commit != first.commit

    latest = load_dictionary("org/multi", site="layers.0.resid_post")
    assert_same_weights(latest, newer)
    assert latest.config.provenance.revision == second.commit

    pinned = load_dictionary("org/multi", site="layers.0.resid_post", revision=first.commit)
    assert_same_weights(pinned, saes["layers.0.resid_post"])
    assert pinned.config.provenance.revision == first.commit
    assert not torch.equal(pinned.W_enc, latest.W_enc)

    # The second commit kept the other sites and listed them all in the regenerated card.
    readme = hub.state.repos["org/multi"].commits[second.commit]["README.md"].content.decode()
    assert all(f"| {site} |" in readme for site in SITES)


def test_branch_revision(hub):
    main = make_sae(seed=1)
    main.push_to_hub("org/branchy")
    other = make_sae(seed=2)
    result = other.push_to_hub("org/branchy", revision="experiment")
    assert_same_weights(load_dictionary("org/branchy"), main)
    loaded = load_dictionary("org/branchy", revision="experiment")
    assert_same_weights(loaded, other)
    assert loaded.config.provenance.revision == result.commit


def test_offline_mode_loads_from_the_cache(hub, multi_site, offline):
    saes, first = multi_site
    online = load_dictionary("org/multi", site="layers.1.resid_post")
    hub.state.requests.clear()
    offline(True)
    cached = load_dictionary("org/multi", site="layers.1.resid_post")
    assert_same_weights(cached, online)
    assert cached.config.provenance.revision == first.commit
    assert hub.state.requests == []  # not one request reached the server

    # A site never downloaded is not in the cache: a clear error, still no request.
    with pytest.raises(DictionaryNotFoundError, match="HF_HUB_OFFLINE"):
        load_dictionary("org/multi", site="layers.2.resid_post")
    with pytest.raises(DictionaryNotFoundError, match="HF_HUB_OFFLINE"):
        load_dictionary("org/never-downloaded")
    assert hub.state.requests == []


def test_hub_down_falls_back_to_the_cache(hub, multi_site):
    saes, _ = multi_site
    load_dictionary("org/multi", site="layers.0.resid_post")
    hub.stop()  # the endpoint now refuses connections
    cached = load_dictionary("org/multi", site="layers.0.resid_post")
    assert_same_weights(cached, saes["layers.0.resid_post"])


def test_local_tree_with_one_folder_per_site(tmp_path):
    saes = {site: make_sae(site, seed=i) for i, site in enumerate(SITES[:2])}
    for site, sae in saes.items():
        sae.save_pretrained(tmp_path / site)
    with pytest.raises(SiteSelectionError, match="layers.0.resid_post, layers.1.resid_post"):
        load_dictionary(tmp_path)
    assert_same_weights(load_dictionary(tmp_path, site="layers.1.resid_post"), saes[SITES[1]])
    assert load_dictionary(tmp_path / SITES[0]).config.provenance.revision is None


def test_a_missing_repo_also_says_there_is_no_such_local_folder(hub):
    with pytest.raises(DictionaryNotFoundError, match="no local folder 'runs/sae' exists either"):
        load_dictionary("runs/sae")
