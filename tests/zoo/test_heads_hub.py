"""Concept heads publish to and load from a loopback Hub with the real huggingface_hub client."""

import json
import re

import pytest
import torch
from huggingface_hub import hf_hub_download

from lightning_interp.cli import main
from lightning_interp.concepts import (
    ConceptBank,
    ConceptHead,
    DescriptionClassifier,
    PosthocCBM,
    SupervisedCBM,
)
from lightning_interp.errors import CorruptFileError, DictionaryNotFoundError
from lightning_interp.zoo import load_head
from lightning_interp.zoo.heads import render_head_card
from tests.zoo.helpers import make_sae

CLASSES = ["neither", "only_b", "only_a", "both"]
CONCEPTS = ["striped", "spotted", "has wings", "has | pipe"]
METRICS = {"test/accuracy": 0.875, "concept_auroc": 0.75, "final_layer_sparsity": 0.5}


def make_pcbm(seed=0):
    """A PCBM whose class -> concept weights are set by hand (7 of 16 non-zero)."""
    g = torch.Generator().manual_seed(seed)
    head = PosthocCBM.from_bank(ConceptBank(CONCEPTS, torch.randn(4, 8, generator=g)), CLASSES)
    head.provenance = {"backbone": "openai/clip-vit-base-patch32", "dataset": "cifar10"}
    weight = torch.tensor(
        [
            [0.0, 0.0, 0.5, 0.0],  # neither: has wings
            [0.0, 1.5, 0.0, -1.0],  # only_b: spotted
            [2.0, 0.0, 0.0, 0.0],  # only_a: striped
            [2.0, 1.5, 0.0, 0.25],  # both: striped, spotted, has | pipe
        ]
    )
    with torch.no_grad():
        head.classifier.weight.copy_(weight * (1 + seed))
        head.classifier.bias.copy_(torch.randn(4, generator=g))
    return head.eval()


def readme_of(hub, repo_id, sha):
    return hub.state.repos[repo_id].commits[sha]["README.md"].content.decode()


def run(*argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code


def test_push_then_load_gives_the_same_head(hub):
    head = make_pcbm()
    result = head.push_to_hub("org/pcbm", metrics=METRICS, card_data={"license": "mit"})
    repo = hub.state.repos["org/pcbm"]
    assert result.commit == repo.branches["main"]
    assert set(repo.commits[result.commit]) >= {
        "config.json",
        "model.safetensors",
        "metrics.json",
        "README.md",
    }
    commits = [m for m, p in hub.state.requests if m == "POST" and "/commit/" in p]
    assert len(commits) == 1  # one atomic commit

    loaded = load_head("org/pcbm")
    assert isinstance(loaded, PosthocCBM) and not loaded.training
    assert loaded.concept_names == CONCEPTS and loaded.class_names == CLASSES
    assert loaded.state_dict().keys() == head.state_dict().keys()
    for name, value in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    x = torch.randn(16, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, head(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x).concepts, head(x).concepts, rtol=0, atol=0)
    assert loaded.provenance["revision"] == result.commit
    assert loaded.provenance["hub_repo_id"] == "org/pcbm"
    assert loaded.provenance["backbone"] == "openai/clip-vit-base-patch32"
    # Only the head's two files were downloaded (not the card, not metrics.json).
    downloaded = {p.rsplit("/", 1)[-1] for p in hub.state.downloads()}
    assert downloaded == {"config.json", "model.safetensors"}

    # ConceptHead.from_pretrained takes a Hub id too, and checks the head type.
    again = PosthocCBM.from_pretrained("org/pcbm")
    assert again.concept_names == CONCEPTS
    with pytest.raises(Exception, match="not a SupervisedCBM"):
        SupervisedCBM.from_pretrained("org/pcbm")


def test_a_pinned_revision_loads_the_first_head_after_a_second_commit(hub):
    first, second = make_pcbm(seed=0), make_pcbm(seed=1)
    old = first.push_to_hub("org/pinned", metrics=METRICS).commit
    new = second.push_to_hub("org/pinned").commit
    assert old != new
    x = torch.randn(8, 8)
    with torch.no_grad():
        pinned = load_head("org/pinned", revision=old)
        torch.testing.assert_close(pinned(x).logits, first(x).logits, rtol=0, atol=0)
        latest = load_head("org/pinned")
        torch.testing.assert_close(latest(x).logits, second(x).logits, rtol=0, atol=0)
    assert pinned.provenance["revision"] == old and latest.provenance["revision"] == new
    # The second publication had no metrics: the first one's metrics.json went with it.
    assert "metrics.json" in hub.state.repos["org/pinned"].commits[old]
    assert "metrics.json" not in hub.state.repos["org/pinned"].commits[new]


def test_the_card_lists_concepts_and_class_concept_weights(hub, tmp_path):
    head = make_pcbm()
    result = head.push_to_hub("org/card", metrics=METRICS, card_data={"license": "mit"})
    readme = open(hf_hub_download("org/card", "README.md")).read()
    assert readme == readme_of(hub, "org/card", result.commit)

    # Rendered locally from the saved folder (+ metrics.json), the card is the same text.
    folder = head.save_pretrained(tmp_path / "head")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    local = render_head_card(folder, repo_id="org/card", card_data={"license": "mit"})
    assert local == readme

    assert "library_name: lightning-interp" in readme and "license: mit" in readme
    for tag in ("concept-bottleneck", "interpretability", "pcbm"):
        assert f"- {tag}\n" in readme
    assert "base_model: openai/clip-vit-base-patch32" in readme
    assert "- cifar10" in readme
    assert "model-index:" in readme and "value: 0.875" in readme and "type: roc_auc" in readme
    for i, concept in enumerate(CONCEPTS[:3], 1):
        assert f"{i}. {concept}\n" in readme
    assert "4. has \\| pipe\n" in readme
    assert "| class | #1 | #2 | #3 | #4 |\n|---|---|---|---|---|\n" in readme
    assert "| only_a | striped (+2) | – | – | – |" in readme
    assert "| only_b | spotted (+1.5) | – | – | – |" in readme
    assert "| both | striped (+2) | spotted (+1.5) | has \\| pipe (+0.25) | – |" in readme
    assert "7 of 16 weights are non-zero" in readme

    # The usage snippet runs as written and loads this very head.
    snippet = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    scope: dict = {}
    exec(compile(snippet, "<card usage>", "exec"), scope)
    assert scope["head"].concept_names == CONCEPTS
    assert len(scope["predicted"]) == 4 and set(scope["predicted"]) <= set(CLASSES)


def test_description_classifier_card_lists_descriptors(hub):
    words = ["stripes", "spots", "neck"]
    encode = lambda texts: torch.stack(  # noqa: E731
        [torch.tensor([float(w in t) for w in words]) + 0.1 for t in texts]
    )
    head = DescriptionClassifier.from_descriptors(
        {"zebra": ["has stripes"], "giraffe": ["has spots", "has a long neck"]}, encode
    )
    result = head.push_to_hub("org/describe")
    readme = readme_of(hub, "org/describe", result.commit)
    assert "| zebra | has stripes |" in readme
    assert "| giraffe | has spots; has a long neck |" in readme
    loaded = ConceptHead.from_pretrained("org/describe")
    x = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(loaded(x).logits, head(x).logits, rtol=0, atol=0)
    assert loaded(x).logits.argmax(-1).tolist() == [1, 0]


def test_cli_publishes_and_renders_a_head_folder(hub, tmp_path, capsys):
    folder = make_pcbm().save_pretrained(tmp_path / "head")
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    assert run("publish", str(folder), "--repo-id", "org/cli-head", "--license", "mit") == 0
    sha = hub.state.repos["org/cli-head"].branches["main"]
    assert sha in capsys.readouterr().out
    assert run("card", str(folder), "--repo-id", "org/cli-head", "--license", "mit") == 0
    assert capsys.readouterr().out == readme_of(hub, "org/cli-head", sha)
    assert load_head("org/cli-head").provenance["revision"] == sha


def test_a_loaded_head_loads_again_offline_from_the_cache(hub, offline):
    head = make_pcbm()
    sha = head.push_to_hub("org/cached").commit
    load_head("org/cached")
    offline()
    requests_before = len(hub.state.requests)
    again = load_head("org/cached")
    assert len(hub.state.requests) == requests_before  # not one request reached the Hub
    assert again.provenance["revision"] == sha
    x = torch.randn(4, 8)
    torch.testing.assert_close(again(x).logits, head(x).logits, rtol=0, atol=0)
    with pytest.raises(DictionaryNotFoundError, match="HF_HUB_OFFLINE"):
        load_head("org/never-loaded")


def test_missing_repo_revision_or_head_give_typed_errors(hub):
    with pytest.raises(DictionaryNotFoundError, match="'org/missing' was not found"):
        load_head("org/missing")
    with pytest.raises(DictionaryNotFoundError, match="no local folder 'org/missing'"):
        ConceptHead.from_pretrained("org/missing")
    make_pcbm().push_to_hub("org/here")
    with pytest.raises(DictionaryNotFoundError, match="revision 'v9' does not exist"):
        load_head("org/here", revision="v9")
    with pytest.raises(DictionaryNotFoundError, match="holds no concept head in sub"):
        load_head("org/here", subfolder="sub")
    # A dictionary repo has files of the same names: the config's format tells them apart.
    make_sae().push_to_hub("org/sae")
    with pytest.raises(CorruptFileError, match="load dictionaries with load_dictionary"):
        load_head("org/sae")


def test_load_dictionary_on_a_head_folder_says_what_it_is(tmp_path):
    from lightning_interp import load_dictionary

    make_pcbm().save_pretrained(tmp_path / "head")
    with pytest.raises(CorruptFileError, match="concept-bottleneck head.*load_head"):
        load_dictionary(tmp_path / "head")


def test_a_broken_head_folder_is_a_corrupt_file_error(tmp_path):
    folder = make_pcbm().save_pretrained(tmp_path / "head")
    config = (folder / "config.json").read_bytes()
    (folder / "config.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CorruptFileError, match="config.json is not valid JSON"):
        load_head(folder)
    (folder / "config.json").write_bytes(config)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="not a readable safetensors file"):
        load_head(folder)
    spec = json.loads(config)
    spec["concept_names"] = spec["concept_names"][:-1]
    make_pcbm().save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(spec))
    with pytest.raises(CorruptFileError, match="does not match its config.*config implies"):
        load_head(folder)
