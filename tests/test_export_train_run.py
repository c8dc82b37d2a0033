"""Export of a real `llm2emb train` run (tiny model, the seed's LoRA + bidirectional + mean + skip-instruction
config): the run resolves to final/, the LoRA merge keeps the trained vectors, sentence-transformers gives the
same vectors as a plain folder (skip-instruction pooling is Pooling(include_prompt=False), no remote code), and
the card shows the run's data and config. Slow only because training is (about a minute on 2 busy cores)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llm2emb import Embedder
from llm2emb.cli import main
from test_train_support import CONFIGS, prepare_data, quick_overrides, write_raw_data

st = pytest.importorskip("sentence_transformers")

TEXTS = ["how are sorting lists handled?", "sorting lists is done by the list sorting module in step 0.",
         "今天的文件很好", "x"]


@pytest.mark.slow
def test_export_trained_lora_run(tiny_model, tmp_path, capsys):
    data = prepare_data(tiny_model, write_raw_data(tmp_path / "raw"), tmp_path / "tok")
    args = ["train", "--config", str(CONFIGS / "config.mrl_spread.lora.bi_mean.json"), "--no-progress"]
    for item in quick_overrides(tiny_model, data, tmp_path, steps=4, mrl_dims=[16, 32]):
        args += ["--set", item]
    assert main(args) == 0
    run = tmp_path / "runs" / "exp"
    trained = Embedder.from_pretrained(str(run / "final"))
    assert trained.is_lora and trained.config.bidirectional and trained.config.skip_instruction
    base = Embedder.from_pretrained(str(tiny_model), pooling="mean", bidirectional=True).encode(TEXTS)
    want = trained.encode(TEXTS)
    assert np.abs(want - base).max() > 1e-4   # training changed the model

    sts = tmp_path / "sts_tiny.tsv"
    pairs = [("sorting lists", "sorting the lists", 5), ("hashing files", "file hashing", 4),
             ("parsing dates", "caching urls", 0), ("logging events", "events are logged", 4),
             ("routing graphs", "tables packing", 1), ("testing tokens", "tokens tested", 5)]
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in pairs))
    assert main(["eval", "--model", str(run), "--tasks", str(sts), "--output", str(run / "eval"),
                 "--no-progress"]) == 0

    out = tmp_path / "shipped"
    assert main(["export", "--model", str(run), "--output", str(out), "--merge-lora"]) == 0
    printed = capsys.readouterr().out
    assert "final model of run" in printed and "LoRA merged" in printed and "min cosine" in printed
    assert "route: native" in printed and "include_prompt=False" in printed
    assert not (out / "adapter_config.json").exists()
    model = st.SentenceTransformer(str(out), device="cpu")
    got = model.encode(TEXTS, show_progress_bar=False)
    assert ((got * want).sum(1) > 0.9999).all()
    # a prompt that ends at the separator: sentence-transformers excludes exactly llm2emb's prefix
    queries = model.encode(TEXTS[:1], prompt="Instruct: find the module.\nQuery:", show_progress_bar=False)
    assert (queries * trained.encode(TEXTS[:1], instruction="Instruct: find the module.\nQuery:")).sum() > 0.9999

    card = (out / "README.md").read_text()
    saved = json.loads((run / "config.json").read_text())["config"]
    assert f"base model | {tiny_model}" in card and "include_prompt=False" in card
    assert "| facts | retrieval | 48 | 3 | Instruct: find the module.\\nQuery:  |" in card
    assert "| labels | classification |" in card
    assert json.dumps(saved["lora_r"]) in card and "4 training steps" in card
    eval_rows = [line for line in card.splitlines() if "sts_tiny" in line]
    assert len(eval_rows) == 1 and "cosine_spearman" in card
