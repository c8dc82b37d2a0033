"""A model name that is neither a local path nor a Hub model: one sentence, no retries, offline detected once."""
from __future__ import annotations

import os
import time

import pytest

from llm2emb.errors import UserError
from llm2emb.model import loading


@pytest.fixture(autouse=True)
def fresh_hub_state(monkeypatch):
    """Each test starts as a new process would: Hub state unknown, offline mode as the environment says."""
    from huggingface_hub import constants

    monkeypatch.setattr(loading, "_HUB_REACHABLE", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    monkeypatch.setenv("HF_HOME", os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")))


ONE_SENTENCE = r"^No local folder runs/nope, and the Hub (has no model runs/nope|is unreachable)"


def test_missing_local_path_is_one_sentence_without_retries():
    """Real request (no mock): this machine has no Hub access, a networked one gets 'the Hub has no model'."""
    start = time.monotonic()
    with pytest.raises(UserError, match=ONE_SENTENCE) as exc:
        loading.resolve_model_path("runs/nope")
    assert time.monotonic() - start < 30  # one request with a 10 s timeout, never transformers' 5 retries
    assert "\n" not in str(exc.value)


def test_unreachable_hub_is_detected_once(monkeypatch):
    from huggingface_hub import HfApi, constants

    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    for name in ("org/first", "org/second"):
        with pytest.raises(UserError, match=f"^No local folder {name}, and the Hub is unreachable"):
            loading.resolve_model_path(name)
    assert calls == ["org/first"]          # asked once per process
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"  # transformers won't retry


def test_hub_without_the_model(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self, repo_id, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the Hub's 404 raises it
        Exception.__init__(error, f"404 Client Error: Repository Not Found for {repo_id}")
        raise error

    monkeypatch.setattr(HfApi, "model_info", not_found)
    with pytest.raises(UserError, match="^No local folder runs/nope, and the Hub has no model runs/nope"):
        loading.resolve_model_path("runs/nope")


def test_offline_mode_without_a_cached_copy(monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("offline mode must not ask the Hub"))
    with pytest.raises(UserError, match=r"^No local folder org/model, and Hub access is off \(HF_HUB_OFFLINE\)"):
        loading.resolve_model_path("org/model")


def test_cli_export_of_a_mistyped_run(tmp_path, monkeypatch, capsys):
    from llm2emb.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export", "-m", "runs/nope", "-o", "out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs/nope" in err[0], err
    assert not (tmp_path / "out").exists()
