from __future__ import annotations

import pytest

from tests.tiny import make_model, make_spiky_model


@pytest.fixture(autouse=True)
def _caches_in_tmp(tmp_path_factory, monkeypatch):
    """Tests never write outside their temporary folders (recipekit's hash cache goes there too) and never
    reach the Hub: huggingface_hub is offline unless a test installs its fake Hub."""
    monkeypatch.setenv("RECIPEKIT_CACHE", str(tmp_path_factory.getbasetemp() / "recipekit-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hf-cache"))


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """A 6-layer fp32 Llama in one file, untied embeddings."""
    return make_model(tmp_path_factory.mktemp("models") / "llama", layers=6, seed=1)


@pytest.fixture(scope="session")
def llama_sharded(tmp_path_factory):
    """A 6-layer fp32 Llama in several shards with an index, tied embeddings."""
    return make_model(tmp_path_factory.mktemp("models") / "llama-sharded", layers=6, seed=2, tied=True,
                      shard_size="60KB")


@pytest.fixture(scope="session")
def spiky(tmp_path_factory):
    """A 4-layer random Llama with a planted super weight it depends on and two harmless spikes
    (`tests.tiny.make_spiky_model`); tests read it, never change it."""
    return make_spiky_model(tmp_path_factory.mktemp("models") / "spiky")
