"""Bad input, command by command: every case runs `llm2emb.cli.main(argv)` in-process and must end with a
non-zero exit, no traceback, one message naming the file / field / line at fault (the case's regex), and
nothing new on disk. A new command adds its cases to CASES (see docs/contracts.md, "Bad input").

Each case is (id, build, message): `build(fx, tmp)` writes the case's own files under `tmp` (the working
folder of the case) and returns the argv; `message` is a regex searched in stderr. The fixtures (tiny models,
data, tasks) are built once per module, so the whole table runs in well under a minute on a tiny CPU.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import yaml

from llm2emb.cli import main as cli_main
from test_study import write_tasks
from test_train_support import prepare_data, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]

QUICK = {"train_batch_size": 4, "num_hard_neg": 1, "max_seq_length": 32, "train_steps": 1, "warmup_steps": 0,
         "log_interval": 1, "validation_steps": 0, "validation_fraction": 0.0, "checkpointing_steps": 1,
         "learning_rate": 1e-3, "pooling_mode": "mean", "precision": "fp32"}


# ------------------------------------------------------------------------------------------ fixtures

def _fine_tune(base: Path, out: Path, seed: int, pooling: str) -> Path:
    """An Embedder folder of `base` with every weight moved by seeded noise (a stand-in for a fine-tune)."""
    import torch

    from llm2emb import Embedder

    emb = Embedder.from_pretrained(str(base), pooling=pooling)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in emb.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    emb.save(out)
    return out


@pytest.fixture(scope="module")
def fx(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """Everything the cases read (never written by a case): models, raw and prepared data, eval tasks."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from llm2emb import Embedder

    root = tmp_path_factory.mktemp("bad-input")
    raw = write_raw_data(root / "raw", retrieval_rows=16, classification_rows=8, k=1)
    data = prepare_data(tiny_model, raw, root / "tok", max_seq_length=32)
    beir, sts = write_tasks(root / "tasks")
    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    emb.save(root / "embedder")
    lora = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    lora.add_lora(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    lora.save(root / "lora")
    assert (root / "lora" / "adapter_model.safetensors").is_file()
    ft = [_fine_tune(tiny_model, root / f"ft{i}", seed=i, pooling="mean") for i in range(2)]
    config = AutoConfig.from_pretrained(tiny_model)      # another base model: a wider MLP
    config.intermediate_size = 96
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(root / "wider")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(root / "wider")
    other = _fine_tune(root / "wider", root / "ft-wider", seed=5, pooling="attention")
    notes = root / "notes.txt"
    notes.write_text("just some notes, not a model\n")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"passage number {i} about lists"}) + "\n"
                              for i in range(6)))
    spec = root / "spec.yaml"
    spec.write_text("dataset: s\ntask_type: retrieval\n")
    (root / "eval-result").mkdir()
    return SimpleNamespace(root=root, model=str(tiny_model), raw=str(raw), data=str(data), beir=str(beir),
                           sts=str(sts), emb=str(root / "embedder"), lora=str(root / "lora"),
                           ft=[str(p) for p in ft], other=str(other), notes=str(notes), corpus=str(corpus),
                           spec=str(spec))


# ------------------------------------------------------------------------------------------ helpers

def w(path: Path, content: str | bytes) -> str:
    """Write a case's input file; returns its path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(file: Path, size: int) -> None:
    """Cut `file` to `size` bytes, or to half its size when it is not larger (a tiny adapter)."""
    size = min(size, file.stat().st_size // 2)
    with open(file, "r+b") as fh:
        fh.truncate(size)


def train_config(fx, tmp: Path, **extra) -> dict:
    return {"model_path": fx.model, "train_data_path": fx.data, "output_dir": str(tmp / "runs"),
            "tb_dir": str(tmp / "tb"), "experiment_id": "exp", **QUICK, **extra}


def yaml_config(fx, tmp: Path, text: str = "", name: str = "cfg.yaml", **extra) -> str:
    """A YAML training config; `text` is appended verbatim (duplicate keys, broken syntax)."""
    return w(tmp / name, yaml.safe_dump(train_config(fx, tmp, **extra), sort_keys=False) + text)


def train(fx, tmp: Path, *extra: str, **fields) -> list[str]:
    return ["train", "--config", yaml_config(fx, tmp, **fields), "--no-progress", *extra]


def study_file(fx, tmp: Path, recipes: dict | None = None, text: str | None = None, **extra) -> str:
    spec = {"name": "s", "base": {"model_path": fx.model, **QUICK},
            "recipes": recipes if recipes is not None else {"mean": {}},
            "seeds": [1], "data": {"train_data_path": fx.data},
            "eval": {"tasks": [fx.sts], "batch_size": 8}, **extra}
    return w(tmp / "study.yaml", text if text is not None else yaml.safe_dump(spec, sort_keys=False))


def study(fx, tmp: Path, *extra: str, **kw) -> list[str]:
    return ["study", study_file(fx, tmp, **kw), "--output", str(tmp / "out"), "--dry-run", *extra]


def pipeline_file(fx, tmp: Path, stages: list[dict] | None = None, text: str | None = None, **extra) -> str:
    spec = {"name": "p", "model": fx.model, "base": dict(QUICK), "data": {"max_seq_length": 32},
            "eval": {"tasks": [fx.sts]}, "stages": stages or [{"name": "a", "data": fx.raw}], **extra}
    return w(tmp / "pipeline.yaml", text if text is not None else yaml.safe_dump(spec, sort_keys=False))


def pipeline(fx, tmp: Path, *extra: str, **kw) -> list[str]:
    return ["pipeline", pipeline_file(fx, tmp, **kw), "--output", str(tmp / "out"), "--dry-run", *extra]


def encode(fx, tmp: Path, lines: str | bytes = "a\nb\n", *extra: str, model: str | None = None,
           name: str = "in.txt") -> list[str]:
    return ["encode", "--model", model or fx.emb, "--input", w(tmp / name, lines), "--output",
            str(tmp / "out.npy"), *extra]


def merge(fx, tmp: Path, *extra: str, models: list[str] | None = None) -> list[str]:
    return ["merge", *(models or fx.ft), "--output", str(tmp / "merged"), *extra]


def synth(fx, tmp: Path, *extra: str, corpus: str | None = None, spec: str | None = None,
          model: str | None = None) -> list[str]:
    return ["synth", "--corpus", corpus or fx.corpus, "--spec", spec or fx.spec, "--model", model or fx.model,
            "--output", str(tmp / "out"), "--no-progress", *extra]


def damaged_lora(fx, tmp: Path) -> str:
    folder = copy(fx.lora, tmp / "lora")
    truncate(folder / "adapter_model.safetensors", 5000)
    return str(folder)


def damaged_model(fx, tmp: Path) -> str:
    folder = copy(fx.model, tmp / "model")
    truncate(folder / "model.safetensors", 5000)
    return str(folder)


def torn_config(fx, tmp: Path) -> str:
    folder = copy(fx.emb, tmp / "model")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])
    return str(folder)


def pairs_tree(tmp: Path) -> str:
    w(tmp / "docs" / "guide.md", "# Installing the tool\nRun the installer and follow the prompts on screen.\n")
    return str(tmp / "docs")


def truncated_parquet(fx, tmp: Path) -> str:
    folder = copy(fx.raw, tmp / "raw")
    data = (folder / "facts.parquet").read_bytes()
    (folder / "facts.parquet").write_bytes(data[: len(data) // 2])
    return str(folder)


def no_dropout_model(fx, tmp: Path) -> str:
    folder = copy(fx.model, tmp / "nodrop")
    config = json.loads((folder / "config.json").read_text())
    config.pop("attention_dropout", None)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def raw_with_manifest(fx, tmp: Path, manifest: str) -> str:
    folder = copy(fx.raw, tmp / "raw")
    (folder / "manifest.json").write_text(manifest)
    return str(folder)


def prepare(fx, tmp: Path, raw: str, *extra: str) -> list[str]:
    return ["prepare", "--model", fx.model, "--input", raw, "--output", str(tmp / "tok"), "--no-progress", *extra]


MNTP_MULTI = {"mntp_mask_probability": 0.2, "bi_attn_enabled": True, "representation": "multi_vector"}
DISTILL = {"losses": [{"name": "contrastive"}, {"name": "distill_kl"}]}


@dataclass
class Case:
    id: str
    build: Callable[[SimpleNamespace, Path], list[str]]
    message: str


CASES: list[Case] = [
    # ---- the 14 (and the Latin-1 corpus): each failed before its fix
    Case("export-truncated-adapter", lambda fx, t: ["export", "--model", damaged_lora(fx, t), "--output",
                                                    str(t / "exp")],
         r"lora/adapter_model\.safetensors is damaged \(truncated: \d+ bytes.*re-train the adapter"),
    Case("encode-truncated-adapter", lambda fx, t: encode(fx, t, model=damaged_lora(fx, t)),
         r"adapter_model\.safetensors is damaged \(truncated"),
    Case("encode-truncated-model", lambda fx, t: encode(fx, t, model=damaged_model(fx, t)),
         r"model/model\.safetensors is damaged \(truncated: 5000 bytes.*re-download"),
    Case("export-truncated-model", lambda fx, t: ["export", "--model", damaged_model(fx, t), "--output",
                                                  str(t / "exp")], r"model\.safetensors is damaged"),
    Case("export-torn-config", lambda fx, t: ["export", "--model", torn_config(fx, t), "--output", str(t / "exp")],
         r"model/config\.json is damaged \(not valid JSON"),
    Case("encode-torn-config", lambda fx, t: encode(fx, t, model=torn_config(fx, t)), r"config\.json is damaged"),
    Case("merge-negative-weight", lambda fx, t: merge(fx, t, "--weights", "2", "-0.5"),
         r"the weight of input 2 .* is -0\.5; merge weights .* must be >= 0"),
    Case("merge-dry-run-truncated-input", lambda fx, t: merge(fx, t, "--dry-run", models=[damaged_model(fx, t),
                                                                                         fx.ft[1]]),
         r"input 1 \(.*model\): .*model\.safetensors is damaged \(truncated"),
    Case("merge-ties-weights-sum-zero", lambda fx, t: merge(fx, t, "--method", "ties", "--base", fx.model,
                                                           "--weights", "0", "0"),
         r"--weights 0 0 sum to 0, so no model has a share; give at least one input a positive weight\.$"),
    Case("pairs-overwrite-a-file", lambda fx, t: ["pairs", pairs_tree(t), "--output", w(t / "notes.md", "mine"),
                                                  "--overwrite"], r"notes\.md is an existing file.*never a file"),
    Case("pairs-dry-run-overwrite-a-file", lambda fx, t: ["pairs", pairs_tree(t), "--output",
                                                          w(t / "notes.md", "mine"), "--overwrite", "--dry-run"],
         r"notes\.md is an existing file.*never a file"),
    Case("pairs-overwrite-other-folder", lambda fx, t: ["pairs", pairs_tree(t), "--output",
                                                        str(Path(w(t / "mine" / "keep.txt", "x")).parent),
                                                        "--overwrite"],
         r"mine is a folder of other files, not an earlier pairs output \(it has no _pairs_info\.json\)"),
    Case("encode-nul-bytes", lambda fx, t: encode(fx, t, b"fine\nabc\x00\x01\x02def\n"),
         r"in\.txt line 2 is not text: it holds the control character '\\x00' at column 4"),
    Case("encode-escape-sequence", lambda fx, t: encode(fx, t, "plain\n\x1b[31mred\x1b[0m\n"),
         r"in\.txt line 2 is not text: it holds the control character '\\x1b' at column 1"),
    Case("encode-only-nul", lambda fx, t: encode(fx, t, b"\x00\x00\x00\x00\n"), r"in\.txt line 1 is not text"),
    Case("encode-jsonl-control", lambda fx, t: encode(fx, t, b'{"text": "ok"}\n{"text": "a\\u0007b"}\n',
                                                      name="in.jsonl"),
         r"in\.jsonl field 'text' of line 2 is not text"),
    Case("train-yaml-duplicate-key", lambda fx, t: ["train", "--config", yaml_config(
        fx, t, "pooling_mode: eos\n"), "--no-progress"],
         r"cfg\.yaml: line \d+: 'pooling_mode' is given twice in one mapping"),
    Case("train-json-duplicate-key", lambda fx, t: ["train", "--config", w(
        t / "cfg.json", json.dumps(train_config(fx, t))[:-1] + ', "learning_rate": 0.5}'), "--no-progress"],
         r"cfg\.json: 'learning_rate' is given twice in one mapping"),
    Case("pipeline-duplicate-key", lambda fx, t: ["pipeline", pipeline_file(fx, t, text=(
        f"name: p\nmodel: {fx.model}\nname: q\nstages: []\n")), "--dry-run"],
         r"pipeline\.yaml: line 3: 'name' is given twice"),
    Case("synth-spec-duplicate-key", lambda fx, t: synth(fx, t, spec=w(
        t / "dup.yaml", "dataset: s\ntask_type: retrieval\ndataset: t\n")),
         r"dup\.yaml: line 3: 'dataset' is given twice"),
    Case("prepare-manifest-duplicate-key", lambda fx, t: prepare(fx, t, raw_with_manifest(
        fx, t, '{"facts": {"type": "retrieval", "type": "sts"}}')), r"manifest\.json: 'type' is given twice"),
    Case("train-teacher-without-distill-loss", lambda fx, t: train(fx, t, teacher_model=fx.emb),
         r"field 'teacher_model' is set but no distillation loss uses teacher_model \(its losses are contrastive\)"),
    Case("train-mntp-causal", lambda fx, t: train(fx, t, mntp_mask_probability=0.2),
         r"cfg\.yaml: field 'mntp_mask_probability' is set but bi_attn_enabled is false; masked next-token "
         r"prediction is meant for bidirectional models \(LLM2Vec"),
    # ---- summary-token pooling (pooling_mode cls, issue 25)
    Case("train-cls-causal-token-at-start", lambda fx, t: train(fx, t, pooling_mode="cls",
                                                                summary_token_position="start"),
         r"cfg\.yaml: pooling cls with summary_token_position start needs bi_attn_enabled: under causal attention "
         r"the first token sees none of the text"),
    Case("train-cls-token-is-a-special-token", lambda fx, t: train(fx, t, pooling_mode="cls",
                                                                   summary_token="<|im_end|>"),
         r"'<\|im_end\|>' is already a special token of this tokenizer \(id 2\), so it cannot be the new summary "
         r"token"),
    Case("train-cls-multi-vector", lambda fx, t: train(fx, t, pooling_mode="cls", representation="multi_vector"),
         r"cfg\.yaml: pooling cls reads one summary token per text, but representation multi_vector"),
    Case("train-cls-max-seq-length-2", lambda fx, t: train(fx, t, pooling_mode="cls", max_seq_length=2),
         r"cfg\.yaml: field 'max_seq_length' \(or query / passage_max_length\) is 2, but pooling cls needs at least 3"),
    Case("prepare-summary-token-is-a-special-token", lambda fx, t: prepare(fx, t, fx.raw, "--summary-token",
                                                                           "<|endoftext|>"),
         r"--summary-token: '<\|endoftext\|>' is already a special token of this tokenizer \(id 0\)"),
    Case("eval-cls-causal-token-at-start", lambda fx, t: ["eval", "--model", fx.model, "--tasks", fx.sts,
                                                          "--pooling", "cls", "--config", w(
        t / "c.yaml", "summary_token_position: start\n"), "--output", str(t / "out")],
         r"pooling cls with summary_token_position start needs bi_attn_enabled"),
    Case("study-dry-run-mntp-multi-vector", lambda fx, t: study(fx, t, recipes={"mntp": MNTP_MULTI}),
         r"study\.yaml: recipe 'mntp': field 'representation' is 'multi_vector' together with mntp_mask_probability"),
    Case("pipeline-dry-run-mntp-multi-vector", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "mntp", "data": fx.raw, "set": MNTP_MULTI}]),
         r"stage 'mntp'.*field 'representation' is 'multi_vector' together with mntp_mask_probability"),
    Case("pipeline-dry-run-teacher-text-file", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "d", "data": fx.raw, "teacher": fx.notes, "set": DISTILL}]),
         r"stage 'd': teacher\.model: .*notes\.txt is a file, not a model"),
    Case("merge-different-base-first", lambda fx, t: merge(fx, t, models=[fx.ft[0], fx.other]),
         r"input 2 \(.*ft-wider\) was trained from .*wider.* but input 1 .* from"),
    Case("synth-empty-corpus", lambda fx, t: synth(fx, t, corpus=w(t / "empty.jsonl", "")),
         r"Corpus .*empty\.jsonl is empty"),
    Case("synth-latin1-corpus", lambda fx, t: synth(fx, t, corpus=w(
        t / "latin.txt", "first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))),
         r"latin\.txt: line 3 is not UTF-8 \(byte 0xe9\).*iconv -f latin1 -t utf-8"),
    Case("train-json-trailing-comma", lambda fx, t: ["train", "--config", w(
        t / "cfg.json", '{\n  "model_path": "m",\n  "seed": 1,\n}\n'), "--no-progress"],
         r"cfg\.json: invalid JSON: trailing comma at line 3, column 12"),
    Case("train-json-trailing-comma-list", lambda fx, t: ["train", "--config", w(
        t / "cfg.json", '{"model_path": "m",\n "mrl_dims": [64, 128,]}'), "--no-progress"],
         r"trailing comma at line 2, column 22 \(before the closing '\]'\)"),
    Case("study-budget-bad-value", lambda fx, t: study(fx, t, budget={"train_steps": -3}),
         r"study\.yaml: budget: field 'train_steps' must be a positive number of steps"),
    Case("study-budget-wrong-type", lambda fx, t: study(fx, t, budget={"learning_rate": "fast"}),
         r"study\.yaml: budget: field 'learning_rate' must be a number"),
    Case("study-set-bad-value", lambda fx, t: study(fx, t, "--set", "train_steps=-5"),
         r"--set: field 'train_steps' must be a positive number of steps"),

    # ---- study (all --dry-run: nothing may be computed before every check has passed)
    Case("study-missing-file", lambda fx, t: ["study", str(t / "nope.yaml"), "--dry-run"],
         r"Study file .*nope\.yaml does not exist"),
    Case("study-file-is-a-folder", lambda fx, t: ["study", str(t), "--dry-run"],
         r"Study file .* is a folder, not a file; pass a YAML or JSON file"),
    Case("study-broken-yaml", lambda fx, t: study(fx, t, text="name: s\nrecipes: {a: 1\nseeds: [1]\n"),
         r"study\.yaml: invalid YAML at line \d+"),
    Case("study-unknown-field", lambda fx, t: study(fx, t, recipies={}), r"unknown field 'recipies'.*'recipes'"),
    Case("study-recipe-unknown-config-field", lambda fx, t: study(fx, t, recipes={"a": {"lerning_rate": 1}}),
         r"recipe 'a': unknown config field 'lerning_rate'.*learning_rate"),
    Case("study-seeds-not-a-list", lambda fx, t: study(fx, t, seeds=3), r"seeds must be a non-empty list"),
    Case("study-missing-task", lambda fx, t: study(fx, t, eval={"tasks": [str(t / "missing.tsv")]}),
         r"eval\.tasks\[0\].*missing\.tsv"),
    Case("study-base-config-missing", lambda fx, t: study(fx, t, base=str(t / "base.json")),
         r"Config file .*base\.json does not exist"),
    Case("study-model-is-text-file", lambda fx, t: study(fx, t, recipes={"a": {"model_path": fx.notes}}),
         r"recipe 'a': field 'model_path': .*notes\.txt is a file, not a model"),
    Case("study-data-input-missing", lambda fx, t: study(fx, t, data={"input": str(t / "gone")}),
         r"data\.input .*gone does not exist"),
    Case("study-dry-run-truncated-parquet", lambda fx, t: study(fx, t, data={"input": truncated_parquet(fx, t)}),
         r"study\.yaml: data\.input .*raw: Cannot read .*facts\.parquet .*not a complete parquet file"),
    Case("study-dry-run-manifest-unknown-dataset", lambda fx, t: study(fx, t, data={"input": raw_with_manifest(
        fx, t, '{"fact": {"type": "retrieval"}}')}), r"manifest\.json names dataset 'fact'.*Did you mean 'facts'"),
    Case("study-train-data-path-missing", lambda fx, t: study(fx, t, data={"train_data_path": str(t / "tok")}),
         r"data\.train_data_path .*tok is not a folder"),
    Case("study-teacher-is-text-file", lambda fx, t: study(fx, t, recipes={"a": {"teacher_model": fx.notes,
                                                                                 **DISTILL}}),
         r"recipe 'a': field 'teacher_model': .*notes\.txt is a file, not a model"),
    Case("study-teacher-without-distill", lambda fx, t: study(fx, t, recipes={"a": {"teacher_model": fx.emb}}),
         r"recipe 'a': field 'teacher_model' is set but no distillation loss uses teacher_model"),

    # ---- pipeline
    Case("pipeline-missing-file", lambda fx, t: ["pipeline", str(t / "p.yaml"), "--dry-run"],
         r"Pipeline file .*p\.yaml does not exist"),
    Case("pipeline-file-is-a-folder", lambda fx, t: ["pipeline", str(t), "--dry-run"],
         r"Pipeline file .* is a folder, not a file"),
    Case("pipeline-unknown-stage-field", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": fx.raw, "sett": {}}]), r"unknown field 'sett'.*'set'"),
    Case("pipeline-cycle", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": fx.raw, "from": "b"}, {"name": "b", "data": fx.raw, "from": "a"}]),
         r"stages a -> b -> a form a cycle"),
    Case("pipeline-data-missing", lambda fx, t: pipeline(fx, t, stages=[{"name": "a", "data": "nowhere"}]),
         r"data nowhere does not exist"),
    Case("pipeline-simcse-without-dropout", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": fx.raw, "simcse": True}]), r"stage 'a'.*simcse needs dropout > 0"),
    Case("pipeline-teacher-without-distill", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": fx.raw, "teacher": fx.emb}]), r"stage 'a' has a teacher but no distillation loss"),
    Case("pipeline-model-missing", lambda fx, t: pipeline(fx, t, model=str(t / "no-model")),
         r"pipeline\.yaml: model: Model path .*no-model.* does not exist"),
    Case("pipeline-mntp-causal", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "m", "data": fx.raw, "set": {"mntp_mask_probability": 0.2}}]),
         r"stage 'm'.*field 'mntp_mask_probability' is set but bi_attn_enabled is false"),
    Case("pipeline-dry-run-truncated-parquet", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": truncated_parquet(fx, t)}]), r"stage 'a': data .*raw: Cannot read .*facts\.parquet"),
    Case("pipeline-dry-run-manifest-trailing-comma", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": raw_with_manifest(fx, t, '{"facts": {"type": "retrieval"},\n}')}]),
         r"manifest\.json: invalid JSON: trailing comma at line 1"),
    Case("pipeline-dry-run-dropout-without-setting", lambda fx, t: pipeline(
        fx, t, model=no_dropout_model(fx, t), stages=[{"name": "s", "data": fx.raw, "simcse": True, "dropout": 0.1}]),
         r"stage 's': dropout 0\.1 needs a dropout setting in the config\.json of .*nodrop"),
    Case("pipeline-base-bad-value", lambda fx, t: pipeline(fx, t, base={**QUICK, "learning_rate": 0}),
         r"pipeline\.yaml: base: field 'learning_rate' must be a finite number > 0"),
    Case("pipeline-base-file-wrong-type", lambda fx, t: pipeline(fx, t, base=w(t / "base.yaml", "train_steps: many\n")),
         r"base\.yaml: field 'train_steps' must be an integer, got 'many'"),
    Case("pipeline-set-bad-value", lambda fx, t: pipeline(fx, t, "--set", "temperature=0"),
         r"--set: field 'temperature' must be a finite number > 0"),
    Case("pipeline-stage-set-bad-value", lambda fx, t: pipeline(fx, t, stages=[
        {"name": "a", "data": fx.raw, "set": {"lora_dropout": 1.5}}]),
         r"pipeline\.yaml: stage 'a': set: field 'lora_dropout' must be in \[0, 1\)"),
    Case("pipeline-unknown-baseline", lambda fx, t: pipeline(fx, t, baseline="aa"),
         r"baseline 'aa' is not a stage\. Did you mean 'a'\?"),
    Case("pipeline-json-trailing-comma", lambda fx, t: ["pipeline", w(t / "p.json", '{"name": "p",\n}'), "--dry-run"],
         r"p\.json: invalid JSON: trailing comma at line 1"),

    # ---- merge
    Case("merge-one-input", lambda fx, t: merge(fx, t, models=fx.ft[:1]), r"needs at least 2 inputs, got 1"),
    Case("merge-unknown-method", lambda fx, t: merge(fx, t, "--method", "avg"), r"invalid choice: 'avg'"),
    Case("merge-slerp-weights", lambda fx, t: merge(fx, t, "--method", "slerp", "--weights", "1", "2"),
         r"'slerp' takes no --weights"),
    Case("merge-weights-count", lambda fx, t: merge(fx, t, "--weights", "1"), r"--weights has 1 values but there "
                                                                              r"are 2 inputs"),
    Case("merge-base-with-linear", lambda fx, t: merge(fx, t, "--base", fx.model), r"does not use a base model"),
    Case("merge-missing-input", lambda fx, t: merge(fx, t, models=[fx.ft[0], str(t / "gone")]),
         r"input 2 \(.*gone\): Model path .*gone' does not exist"),
    Case("merge-output-exists", lambda fx, t: ["merge", *fx.ft, "--output",
                                               str(Path(w(t / "taken" / "x", "x")).parent)],
         r"--output .*taken already exists; choose a new folder or pass --overwrite"),
    Case("merge-output-is-a-file", lambda fx, t: ["merge", *fx.ft, "--output", w(t / "m.txt", "x"), "--overwrite"],
         r"m\.txt is an existing file, and merge writes a folder"),
    Case("merge-unknown-param", lambda fx, t: merge(fx, t, "--method", "ties", "--base", fx.model, "--param",
                                                    "normalize=false"), r"has no option 'normalize'"),
    Case("merge-param-out-of-range", lambda fx, t: merge(fx, t, "--method", "slerp", "--param", "t=1.5"),
         r"t must be in \[0, 1\]"),

    # ---- synth
    Case("synth-spec-missing", lambda fx, t: synth(fx, t, spec=str(t / "none.yaml")),
         r"Spec file .*none\.yaml does not exist"),
    Case("synth-spec-broken-yaml", lambda fx, t: synth(fx, t, spec=w(t / "bad.yaml", "dataset: [s\ntask_type: x\n")),
         r"bad\.yaml: invalid YAML at line \d+"),
    Case("synth-spec-unknown-field", lambda fx, t: synth(fx, t, spec=w(t / "s.yaml",
                                                                      "dataset: s\ntask_typ: retrieval\n")),
         r"task_typ.*task_type"),
    Case("synth-corpus-missing", lambda fx, t: synth(fx, t, corpus=str(t / "c.jsonl")),
         r"Corpus .*c\.jsonl does not exist"),
    Case("synth-unknown-builtin-corpus", lambda fx, t: synth(fx, t, corpus="builtin:stdlib-undocumneted"),
         r"Unknown built-in corpus 'builtin:stdlib-undocumneted'.*Did you mean 'stdlib-undocumented'"),
    Case("synth-unknown-text-field", lambda fx, t: synth(fx, t, "--text-field", "body"),
         r"corpus\.jsonl has no text field 'body'"),
    Case("synth-dry-run-latin1-corpus", lambda fx, t: synth(fx, t, "--dry-run", corpus=w(
        t / "latin.txt", "first line\nsecond line\ncaf\xe9 au lait\n".encode("latin-1"))),
         r"latin\.txt: line 3 is not UTF-8 \(byte 0xe9\)"),
    Case("synth-dry-run-embedding-model-as-generator", lambda fx, t: synth(fx, t, "--dry-run", model=fx.emb),
         r"is a saved llm2emb embedding model, not a generator"),
    Case("synth-dry-run-generator-missing", lambda fx, t: synth(fx, t, "--dry-run", model=str(t / "gone")),
         r"--model: Model path .*gone' does not exist"),

    # ---- pairs
    Case("pairs-missing-input", lambda fx, t: ["pairs", str(t / "nothing"), "--output", str(t / "out")],
         r"nothing does not exist"),
    Case("pairs-output-exists", lambda fx, t: ["pairs", pairs_tree(t), "--output",
                                               str(Path(w(t / "out" / "x.txt", "x")).parent)],
         r"--output .*out already exists; choose a new folder or pass --overwrite"),
    Case("pairs-output-inside-input", lambda fx, t: ["pairs", pairs_tree(t), "--output", str(t / "docs" / "out")],
         r"is inside the input folder"),
    Case("pairs-no-pairs", lambda fx, t: ["pairs", str(Path(w(t / "in" / "a.txt", "Hi\nyo")).parent), "--output",
                                          str(t / "out")], r"No pairs found .*a\.txt: no pair long enough"),

    # ---- encode
    Case("encode-model-missing", lambda fx, t: encode(fx, t, model=str(t / "nomodel")), r"nomodel.* does not exist"),
    Case("encode-model-is-text-file", lambda fx, t: encode(fx, t, model=fx.notes),
         r"notes\.txt is a file, not a model"),
    Case("encode-model-folder-without-config", lambda fx, t: encode(fx, t, model=str(Path(
        w(t / "empty" / "readme.md", "x")).parent)), r"empty is a folder with no config\.json, not a model"),
    Case("encode-output-suffix", lambda fx, t: ["encode", "--model", fx.emb, "--input", w(t / "in.txt", "a\n"),
                                                "--output", str(t / "o.csv")], r"o\.csv must end in \.npy"),
    Case("encode-output-exists", lambda fx, t: ["encode", "--model", fx.emb, "--input", w(t / "in.txt", "a\n"),
                                                "--output", w(t / "o.npy", "old")], r"o\.npy already exists"),
    Case("encode-not-utf8", lambda fx, t: encode(fx, t, b"ok\n\xff\xfe bad\n"), r"in\.txt line 2 is not valid UTF-8"),
    Case("encode-jsonl-missing-field", lambda fx, t: encode(fx, t, b'{"text": "a"}\n{"body": "b"}\n', name="in.jsonl"),
         r"in\.jsonl line 2 has no 'text' field"),
    Case("encode-batch-size-zero", lambda fx, t: encode(fx, t, "a\n", "--batch-size", "0"),
         r"--batch-size must be at least 1"),
    Case("encode-input-missing", lambda fx, t: ["encode", "--model", fx.emb, "--input", str(t / "gone.txt"),
                                                "--output", str(t / "o.npy")],
         r"Input file .*gone\.txt does not exist"),
    Case("encode-dim-too-large", lambda fx, t: encode(fx, t, "a\n", "--dim", "65"), r"--dim 65 is out of range"),

    # ---- eval
    Case("eval-task-missing", lambda fx, t: ["eval", "--model", fx.emb, "--tasks", str(t / "gone.tsv"), "--no-cache",
                                             "--output", str(t / "res")], r"Task '.*gone\.tsv' does not exist"),
    Case("eval-unknown-index", lambda fx, t: ["eval", "--model", fx.emb, "--tasks", fx.beir, "--index", "exat",
                                              "--no-cache", "--output", str(t / "res")],
         r"--index 'exat' is not a search index.*Did you mean 'exact'"),
    Case("eval-model-is-text-file", lambda fx, t: ["eval", "--model", fx.notes, "--tasks", fx.sts, "--no-cache",
                                                   "--output", str(t / "res")], r"notes\.txt is a file, not a model"),
    Case("eval-truncated-model", lambda fx, t: ["eval", "--model", damaged_model(fx, t), "--tasks", fx.sts,
                                                "--no-cache", "--output", str(t / "res")],
         r"model\.safetensors is damaged"),
    Case("eval-dry-run-truncated-model", lambda fx, t: ["eval", "--model", damaged_model(fx, t), "--tasks", fx.sts,
                                                        "--output", str(t / "res"), "--dry-run"],
         r"model\.safetensors is damaged"),
    Case("eval-dry-run-torn-embedder-config", lambda fx, t: ["eval", "--model", torn_config(fx, t), "--tasks",
                                                             fx.sts, "--output", str(t / "res"), "--dry-run"],
         r"model/config\.json is damaged \(not valid JSON"),
    Case("eval-dry-run-task-missing", lambda fx, t: ["eval", "--model", fx.emb, "--tasks", str(t / "gone.tsv"),
                                                     "--output", str(t / "res"), "--dry-run"],
         r"Task '.*gone\.tsv' does not exist"),
    Case("eval-broken-sts-file", lambda fx, t: ["eval", "--model", fx.emb, "--tasks", w(t / "sts.tsv", "a\tb\n"),
                                                "--no-cache", "--output", str(t / "res")],
         r"sts\.tsv line 1 has 2 column\(s\)"),

    # ---- export
    Case("export-dry-run-truncated-model", lambda fx, t: ["export", "--model", damaged_model(fx, t), "--output",
                                                          str(t / "exp"), "--dry-run"],
         r"model\.safetensors is damaged"),
    Case("export-dry-run-model-missing", lambda fx, t: ["export", "--model", str(t / "gone"), "--output",
                                                        str(t / "e"), "--dry-run"], r"gone.* does not exist"),
    Case("export-model-missing", lambda fx, t: ["export", "--model", str(t / "gone"), "--output", str(t / "e")],
         r"gone.* does not exist"),
    Case("export-output-is-a-file", lambda fx, t: ["export", "--model", fx.emb, "--output", w(t / "e.txt", "x")],
         r"e\.txt exists and is a file"),
    Case("export-output-exists", lambda fx, t: ["export", "--model", fx.emb, "--output",
                                                str(Path(w(t / "e" / "x", "x")).parent)],
         r"Output folder .*e already exists; pass --overwrite"),
    Case("export-bad-dtype", lambda fx, t: ["export", "--model", fx.emb, "--output", str(t / "e"), "--dtype", "fp8"],
         r"invalid choice: 'fp8'"),
    Case("export-llama-cpp-unmerged-lora", lambda fx, t: ["export", "--model", fx.lora, "--output", str(t / "e"),
                                                          "--llama-cpp", str(t / "l")],
         r"--llama-cpp cannot give llama\.cpp this model \(a LoRA adapter \(add --merge-lora"),
    Case("export-dry-run-llama-cpp-unmerged-lora", lambda fx, t: ["export", "--model", fx.lora, "--output",
                                                                  str(t / "e"), "--llama-cpp", str(t / "l"),
                                                                  "--dry-run"],
         r"--llama-cpp cannot give llama\.cpp this model \(a LoRA adapter"),
    Case("export-llama-cpp-attention-pooling", lambda fx, t: ["export", "--model", fx.other, "--output", str(t / "e"),
                                                              "--llama-cpp", str(t / "l")],
         r"\(attention pooling \(llama\.cpp pools by last token or mean only\)\)"),
    Case("export-llama-cpp-inside-output", lambda fx, t: ["export", "--model", fx.emb, "--output", str(t / "e"),
                                                          "--llama-cpp", str(t / "e" / "gguf")],
         r"--llama-cpp .*gguf overlaps the --output folder .*e; give llama\.cpp's folder a path of its own"),
    Case("export-llama-cpp-exists", lambda fx, t: ["export", "--model", fx.emb, "--output", str(t / "e"),
                                                   "--llama-cpp", str(Path(w(t / "l" / "x", "x")).parent)],
         r"--llama-cpp folder .*l already exists; pass --overwrite"),

    # ---- train
    Case("train-no-config-no-model", lambda fx, t: ["train", "--no-progress"],
         r"llm2emb train needs --config FILE \(see configs/config\.f2llm\.json\)"),
    Case("train-config-missing", lambda fx, t: ["train", "--config", str(t / "c.json")],
         r"Config file .*c\.json does not exist"),
    Case("train-config-is-a-folder", lambda fx, t: ["train", "--config", str(t)], r"is a folder, not a file"),
    Case("train-unknown-set-field", lambda fx, t: train(fx, t, "--set", "lerning_rate=1"),
         r"--set lerning_rate: unknown field 'lerning_rate'.*learning_rate"),
    Case("train-wrong-type", lambda fx, t: train(fx, t, train_batch_size="eight"),
         r"cfg\.yaml: field 'train_batch_size' must be an integer"),
    Case("train-negative-lr", lambda fx, t: train(fx, t, learning_rate=-1.0),
         r"field 'learning_rate' must be a finite number > 0"),
    Case("train-broken-yaml", lambda fx, t: ["train", "--config", w(t / "c.yaml", "model_path: m\nmrl_dims: [1, 2\n")],
         r"c\.yaml: invalid YAML at line \d+"),
    Case("train-unknown-pooling", lambda fx, t: train(fx, t, pooling_mode="meen"),
         r"field 'pooling_mode' is 'meen'.*Did you mean 'mean'"),
    Case("train-data-missing", lambda fx, t: train(fx, t, train_data_path=str(t / "tok")),
         r"Training data folder .*tok does not exist; run `llm2emb prepare"),
    Case("train-data-is-raw", lambda fx, t: train(fx, t, train_data_path=fx.raw), r"raw is raw text \(not tokenised\)"),
    Case("train-teacher-is-text-file", lambda fx, t: train(fx, t, teacher_model=fx.notes, **DISTILL),
         r"field 'teacher_model': .*notes\.txt is a file, not a model"),
    Case("train-teacher-damaged", lambda fx, t: train(fx, t, teacher_model=damaged_model(fx, t), **DISTILL),
         r"field 'teacher_model': .*model\.safetensors is damaged"),
    Case("train-model-is-text-file", lambda fx, t: train(fx, t, model_path=fx.notes), r"notes\.txt is a file"),
    Case("train-config-not-a-mapping", lambda fx, t: ["train", "--config", w(t / "c.json", "[1, 2]")],
         r"c\.json: the config must be a mapping"),
    Case("train-config-latin1", lambda fx, t: ["train", "--config", w(t / "c.yaml", "experiment_id: caf\xe9\n".encode(
        "latin-1"))], r"c\.yaml: line 1 is not UTF-8"),

    # ---- prepare
    Case("prepare-input-missing", lambda fx, t: ["prepare", "--model", fx.model, "--input", str(t / "raw"),
                                                 "--output", str(t / "tok"), "--no-progress"],
         r"Input .*raw does not exist; pass a folder of dataset files"),
    Case("prepare-model-missing", lambda fx, t: ["prepare", "--model", str(t / "m"), "--input", fx.raw, "--output",
                                                 str(t / "tok"), "--no-progress"], r"does not exist"),
    Case("prepare-manifest-trailing-comma", lambda fx, t: prepare(fx, t, raw_with_manifest(
        fx, t, '{"facts": {"type": "retrieval",}}')), r"manifest\.json: invalid JSON: trailing comma at line 1"),
    Case("prepare-truncated-parquet", lambda fx, t: ["prepare", "--model", fx.model, "--input",
                                                     truncated_parquet(fx, t), "--output", str(t / "tok"),
                                                     "--no-progress"],
         r"Cannot read .*facts\.parquet .*not a complete parquet file"),
    Case("prepare-dry-run-model-missing", lambda fx, t: ["prepare", "--model", str(t / "m"), "--input", fx.raw,
                                                         "--output", str(t / "tok"), "--dry-run"], r"does not exist"),
    Case("prepare-dry-run-truncated-parquet", lambda fx, t: ["prepare", "--model", fx.model, "--input",
                                                             truncated_parquet(fx, t), "--output", str(t / "tok"),
                                                             "--dry-run"],
         r"Cannot read .*facts\.parquet .*not a complete parquet file"),
    Case("prepare-dry-run-manifest-duplicate-key", lambda fx, t: prepare(fx, t, raw_with_manifest(
        fx, t, '{"facts": {"type": "retrieval", "type": "sts"}}'), "--dry-run"),
         r"manifest\.json: 'type' is given twice"),
    Case("prepare-bad-format", lambda fx, t: ["prepare", "--model", fx.model, "--input", fx.raw, "--output",
                                              str(t / "tok"), "--format", "csv"], r"invalid choice: 'csv'"),

    # ---- mine
    Case("mine-input-missing", lambda fx, t: ["mine", "--input", str(t / "raw"), "--output", str(t / "m")],
         r"Input .*raw does not exist"),
    Case("mine-num-zero", lambda fx, t: ["mine", "--input", fx.raw, "--output", str(t / "m"), "--num", "0"],
         r"--num must be at least 1, got 0"),
    Case("mine-dry-run-truncated-model", lambda fx, t: ["mine", "--model", damaged_model(fx, t), "--input", fx.raw,
                                                        "--output", str(t / "m"), "--dry-run"],
         r"--model: .*model\.safetensors is damaged \(truncated"),
    Case("mine-dry-run-embedding-without-model", lambda fx, t: ["mine", "--scorer", "embedding", "--input", fx.raw,
                                                                "--output", str(t / "m"), "--dry-run"],
         r"the embedding scorer needs --model"),
    Case("mine-truncated-parquet", lambda fx, t: ["mine", "--input", truncated_parquet(fx, t), "--output",
                                                  str(t / "m")],
         r"Cannot read .*facts\.parquet .*not a complete parquet file"),

    # ---- compare
    Case("compare-missing", lambda fx, t: ["compare", str(t / "none.json")],
         r"Result path .*none\.json does not exist"),
    Case("compare-not-a-result", lambda fx, t: ["compare", w(t / "r.json", '{"x": 1}')],
         r"r\.json is not an llm2emb eval result"),
    Case("compare-broken-json", lambda fx, t: ["compare", w(t / "r.json", '{"x": ')], r"r\.json is not valid JSON"),

    # ---- a shipped study whose data lies outside the repository (../../shared), run from a clone without it
    Case("study-shipped-data-missing", lambda fx, t: ["study", shipped_copy(t, "false_negatives"), "--dry-run",
                                                     "--output", str(t / "out")],
         r"false_negatives\.yaml: eval\.tasks\[1\]: Task '[^']*shared/data/eval/scifact_mini' does not exist"),

    # ---- models
    Case("models-download-unknown", lambda fx, t: ["models", "download", "smollm3-135m"],
         r"'smollm3-135m'.*Did you mean 'smollm2-135m'"),
    Case("models-unknown-action", lambda fx, t: ["models", "dowload"],
         r"unknown command 'dowload'; choose one of: list, download\. Did you mean 'download'\?"),
]


def shipped_copy(tmp: Path, study: str) -> str:
    """studies/<study>.yaml and configs/ copied into tmp/repo, so `../../shared` (tmp/shared) is missing."""
    repo = tmp / "repo"
    shutil.copytree(ROOT / "configs", repo / "configs")
    (repo / "studies").mkdir(parents=True)
    shutil.copy(ROOT / "studies" / f"{study}.yaml", repo / "studies")
    return str(repo / "studies" / f"{study}.yaml")


OUTSIDE = re.compile(r"\.\./\.\./shared/data/([^\s'\",]+)")
SHIPPED_WITH_OUTSIDE_DATA = sorted(
    p.stem for p in (ROOT / "studies").glob("*.yaml")
    if OUTSIDE.search("\n".join(line for line in p.read_text().splitlines() if not line.lstrip().startswith("#"))))


@pytest.mark.parametrize("study", SHIPPED_WITH_OUTSIDE_DATA)
def test_shipped_studies_name_outside_data_and_refuse_without_it(study, tmp_path, monkeypatch, capsys):
    """Each shipped study that reads ../../shared names that data in its header comment, and refuses with one
    sentence naming the study file and the missing path when it is absent (a fresh clone)."""
    text = (ROOT / "studies" / f"{study}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines()[:40] if line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "Data outside the repository" in header, f"studies/{study}.yaml: header does not name its outside data"
    for rel in OUTSIDE.findall(body):
        name = Path(rel).parts[1].removesuffix(".parquet")   # eval/scifact_mini -> scifact_mini
        assert name in header, f"studies/{study}.yaml: header does not name {name}"
    path = shipped_copy(tmp_path, study)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert cli_main(["study", path, "--dry-run", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    assert re.search(r"\S*shared/data/\S+ does not exist|'[^']*shared/data/[^']*' does not exist", lines[0]), err
    assert _snapshot(tmp_path) == before


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_case(case: Case, fx: SimpleNamespace, tmp: Path, capsys) -> str:
    """Build the case, run it through cli.main, check the exit code and that nothing new is on disk; returns
    stderr."""
    argv = [str(a) for a in case.build(fx, tmp)]
    before, fixtures = _snapshot(tmp), _snapshot(fx.root)
    capsys.readouterr()
    try:
        code = cli_main(argv)
    except SystemExit as exc:          # argparse's usage errors
        code = exc.code
    captured = capsys.readouterr()
    assert code not in (0, None), f"{case.id}: exit 0 for {argv}\n{captured.out}"
    assert "Traceback" not in captured.err + captured.out, captured.err
    assert _snapshot(tmp) == before, f"{case.id} left {sorted(_snapshot(tmp) - before)}"
    assert _snapshot(fx.root) == fixtures, f"{case.id} wrote into the fixtures"
    return captured.err


def test_cases_are_many_and_named_once():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 74
    commands = {case.id.split("-")[0] for case in CASES}
    assert commands >= {"study", "pipeline", "merge", "synth", "pairs", "encode", "eval", "export", "train",
                        "prepare", "mine", "compare", "models"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, fx, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)            # default output folders (study_runs/, pipeline_runs/) land here
    err = run_case(case, fx, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    usage = "usage: llm2emb" in err
    assert lines or usage, err
    assert re.search(case.message, err), f"{case.id}: {case.message!r} not in\n{err}"
    if not usage:
        assert len(lines) == 1, err


SUBPROCESS_SAMPLES = ["train-yaml-duplicate-key", "encode-truncated-model", "merge-negative-weight"]


@pytest.mark.parametrize("case_id", SUBPROCESS_SAMPLES)
def test_bad_input_as_a_user_runs_it(case_id, fx, tmp_path):
    """The real command line: exit status 2 and one `error:` line, no traceback, from a fresh process."""
    case = next(c for c in CASES if c.id == case_id)
    argv = [str(a) for a in case.build(fx, tmp_path)]
    before = _snapshot(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "llm2emb.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and re.search(case.message, proc.stderr), proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == \
        [proc.stderr.strip().splitlines()[-1]]
    assert _snapshot(tmp_path) == before
