"""Bad model inputs give one clear UserError, not a traceback: LoRA target modules the model lacks, and a
model path that exists but is a plain file or a folder that is not a model."""
from __future__ import annotations

import json
import re

import pytest

from llm2emb.cli import main as cli_main
from llm2emb.errors import UserError
from llm2emb.model.loading import resolve_model_path
from test_train_support import prepare_data, quick_overrides, write_raw_data

LLAMA_LINEAR = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("targets, named", [(["qkv"], "['qkv']"), (["qkv", "dense"], "['qkv', 'dense']"),
                                            ("qkv", "'qkv'"), (["layers"], "['layers']")])
def test_add_lora_with_unknown_target_modules(tiny_model, targets, named):
    from llm2emb import Embedder

    emb = Embedder.from_pretrained(str(tiny_model))
    with pytest.raises(UserError) as err:
        emb.add_lora(r=2, alpha=4, target_modules=targets)
    message = str(err.value)
    assert message.startswith(f"lora_target_modules {named} match no linear layer of this model")
    assert f"its linear layers are: {LLAMA_LINEAR};" in message


def test_train_with_unknown_target_modules_exits_with_message(tiny_model, tmp_path, capsys):
    data = prepare_data(tiny_model, write_raw_data(tmp_path / "raw"), tmp_path / "tok")
    args = ["train", "--no-progress"]
    for item in quick_overrides(tiny_model, data, tmp_path, steps=1, lora_enabled=True,
                                lora_target_modules=["qkv"]):
        args += ["--set", item]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "error: lora_target_modules ['qkv'] match no linear layer" in err and "Traceback" not in err
    assert LLAMA_LINEAR in err


@pytest.mark.parametrize("name", ["notes.txt", "config.json", "weights.safetensors"])
def test_model_path_that_is_a_file(tmp_path, monkeypatch, name):
    file = tmp_path / name
    file.write_text(json.dumps({"hidden_size": 8}))
    expected = rf"^{re.escape(str(file))} is a file, not a model: pass a model folder \(with config.json\)"
    with pytest.raises(UserError, match=expected):
        resolve_model_path(file)
    monkeypatch.chdir(tmp_path)  # a relative name is not taken for a hub id either
    with pytest.raises(UserError, match=rf"^{re.escape(name)} is a file, not a model"):
        resolve_model_path(name)


def test_embedder_on_a_text_file(tmp_path):
    from llm2emb import Embedder

    file = tmp_path / "notes.txt"
    file.write_text("hello")
    with pytest.raises(UserError, match="is a file, not a model"):
        Embedder.from_pretrained(file)


def test_model_path_that_is_a_folder_without_config(tmp_path):
    from llm2emb import Embedder

    empty = tmp_path / "empty"
    empty.mkdir()
    expected = rf"^{re.escape(str(empty))} is a folder with no config.json, not a model: pass a model folder \("
    with pytest.raises(UserError, match=expected + r"with config.json\).*\.$"):
        Embedder.from_pretrained(empty)
    # a training run folder: the message points at the model inside it
    run = tmp_path / "runs" / "exp"
    (run / "final").mkdir(parents=True)
    (run / "final" / "llm2emb_config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    expected = rf"is a folder with no config.json.* Did you mean {re.escape(str(run / 'final'))}\?$"
    with pytest.raises(UserError, match=expected):
        resolve_model_path(run)
