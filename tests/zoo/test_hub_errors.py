"""Server errors become typed, clear errors, and never leave a half-written cache."""

import http.client
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants, file_download

from lightning_interp import load_dictionary
from lightning_interp.errors import DictionaryNotFoundError, HubError, LightningInterpError
from tests.zoo.helpers import assert_same_weights, make_sae
from tests.zoo.hub_server import Fault, HubServer


@pytest.fixture
def published(hub):
    sae = make_sae()
    sae.push_to_hub("org/sae")
    return sae


@pytest.fixture
def no_retry_wait(monkeypatch):
    # huggingface_hub sleeps between its (bounded) retries; the tests need no pause. This
    # patches time.sleep for the test's duration; the server thread never sleeps.
    monkeypatch.setattr(file_download.time, "sleep", lambda seconds: None)


def snapshot_files():
    root = Path(constants.HF_HUB_CACHE)
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if "snapshots" in p.parts and p.is_file()
    )


def incomplete_blobs():
    return sorted(p.name for p in Path(constants.HF_HUB_CACHE).rglob("*.incomplete"))


def test_missing_repo(hub):
    with pytest.raises(DictionaryNotFoundError, match="'org/nope' was not found"):
        load_dictionary("org/nope")


def test_missing_revision(hub, published):
    with pytest.raises(
        DictionaryNotFoundError, match="revision 'v9' does not exist in Hub repo 'org/sae'"
    ):
        load_dictionary("org/sae", revision="v9")


def test_missing_file_on_the_hub(hub, published):
    # The listing names the weights but the server no longer serves them (deleted between
    # listing and download, or a broken mirror).
    hub.state.faults.append(Fault("HEAD", "model.safetensors", "404"))
    hub.state.faults.append(Fault("GET", "model.safetensors", "404"))
    with pytest.raises(DictionaryNotFoundError, match="missing on the Hub"):
        load_dictionary("org/sae")
    assert not any(f.endswith("model.safetensors") for f in snapshot_files())
    hub.state.faults.clear()
    assert_same_weights(load_dictionary("org/sae"), published)


def test_server_error_is_a_hub_error_and_a_retry_works(hub, published, no_retry_wait):
    hub.state.faults.append(Fault("GET", "api/models/org/sae", "500", times=1))
    with pytest.raises(HubError, match="HTTP 500"):
        load_dictionary("org/sae")
    assert_same_weights(load_dictionary("org/sae"), published)


def test_server_error_during_download(hub, published, no_retry_wait):
    hub.state.faults.append(Fault("HEAD", "model.safetensors", "500"))
    with pytest.raises(HubError, match="500"):
        load_dictionary("org/sae")
    hub.state.faults.clear()
    assert not any(f.endswith("model.safetensors") for f in snapshot_files())
    assert_same_weights(load_dictionary("org/sae"), published)


def test_connection_dropped_mid_download(hub, published, no_retry_wait):
    hub.state.faults.append(Fault("GET", "model.safetensors", "drop"))
    with pytest.raises(HubError, match="lost the connection") as info:
        load_dictionary("org/sae")
    assert isinstance(info.value, LightningInterpError)
    drops = [p for m, p in hub.state.requests if m == "GET" and p.endswith("model.safetensors")]
    assert 1 < len(drops) <= 7  # huggingface_hub's bounded resume attempts, then our error
    # Nothing half-written under the snapshot: the weights never appeared there.
    assert not any(f.endswith("model.safetensors") for f in snapshot_files())

    hub.state.faults.clear()
    assert_same_weights(load_dictionary("org/sae"), published)
    assert not incomplete_blobs()


def test_connection_dropped_once_resumes(hub, published, no_retry_wait):
    hub.state.faults.append(Fault("GET", "model.safetensors", "drop", times=1))
    assert_same_weights(load_dictionary("org/sae"), published)
    ranges = [p for m, p in hub.state.requests if m == "GET" and p.endswith("model.safetensors")]
    assert len(ranges) == 2


def test_the_server_leaves_no_thread_behind():
    before = set(threading.enumerate())
    server = HubServer().start()
    client = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    client.request("GET", "/api/models/org/none")  # HTTP/1.1: the connection stays open
    response = client.getresponse()
    assert response.status == 404 and response.read()
    server.stop()  # while the client still holds the connection open
    new = [t for t in threading.enumerate() if t not in before]
    for thread in new:
        thread.join(timeout=2)
    assert not [t for t in new if t.is_alive()]
    client.close()
