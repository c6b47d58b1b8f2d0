"""Fixtures for the zoo tests: a loopback Hub and a private Hugging Face cache per test.

huggingface_hub reads its environment into ``huggingface_hub.constants`` at import time, so
Xet is disabled here, before anything imports it in this test session (when another test
module imported it first, the monkeypatching in ``hub`` still applies the same settings).
Endpoint, cache and offline flag are then patched per test in ``constants``, where the
client looks them up at call time.
"""

import os

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub import constants  # noqa: E402

from tests.zoo.hub_server import HubServer  # noqa: E402


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running loopback Hub; huggingface_hub points at it and caches under tmp_path."""
    torch.set_num_threads(1)
    server = HubServer().start()
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        server.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    yield server
    server.stop()


@pytest.fixture
def offline(monkeypatch):
    """Switch huggingface_hub (and so the loader) to offline mode for the rest of a test."""

    def switch(on: bool = True) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)

    return switch
