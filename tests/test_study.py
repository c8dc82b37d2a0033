"""`llm2emb study` on a tiny random model: cells, skipping, re-running on a config change, failure
isolation, reports with paired-bootstrap intervals, determinism and bad study files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llm2emb.cli import main as cli_main
from llm2emb.errors import UserError
from test_train_support import write_raw_data

TRAIN = {"train_steps": 2, "train_batch_size": 4, "num_hard_neg": 1, "max_seq_length": 32, "log_interval": 1,
         "warmup_steps": 0, "validation_steps": 0, "validation_fraction": 0.0, "checkpointing_steps": 1,
         "learning_rate": 1e-3, "min_lr": 0.0, "pooling_mode": "mean"}


def write_tasks(folder: Path) -> tuple[Path, Path]:
    """A small BEIR folder and an STS file (texts from the training vocabulary)."""
    beir = folder / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [f"{s} lists is done by the list {s} module in step {i}." for i, s in
            enumerate(["sorting", "hashing", "parsing", "caching", "logging", "routing"])]
    with open(beir / "corpus.jsonl", "w") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"_id": f"d{i}", "title": "", "text": d}) + "\n")
    with open(beir / "queries.jsonl", "w") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"how are {d.split(' is ')[0]} handled?"}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                            "".join(f"q{i}\td{i}\t1\n" for i in range(len(docs))))
    sts = folder / "sts.tsv"
    rows = [("sorting lists", "sorting the lists", 4.5), ("hashing files", "parsing dates", 0.5),
            ("caching tokens", "cached tokens", 4.0), ("routing urls", "logging events", 1.0),
            ("merging tables", "tables merged", 4.2), ("tracing graphs", "packing images", 0.2)]
    sts.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    return beir, sts


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("study")
    raw = write_raw_data(root / "raw", retrieval_rows=24, classification_rows=8, k=1)
    beir, sts = write_tasks(root)
    return root, raw, beir, sts


def write_study(path: Path, tiny_model, raw: Path, beir: Path, sts: Path, recipes: dict | None = None,
                seeds=(1, 2), name: str = "tiny", **extra) -> Path:
    spec = {"name": name, "base": {"model_path": str(tiny_model), **TRAIN},
            "recipes": recipes or {"mean": {}, "eos": {"pooling_mode": "eos"}},
            "seeds": list(seeds), "data": {"input": str(raw)},
            "eval": {"tasks": [str(beir), str(sts)], "dims": [16], "batch_size": 8}, **extra}
    path.write_text(json.dumps(spec))
    return path


def run_study(path: Path, out: Path, *extra: str) -> int:
    return cli_main(["study", str(path), "--output", str(out), *extra])


def test_study_runs_cells_skips_them_and_reports(study_inputs, tiny_model, tmp_path, capsys):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts)
    out = tmp_path / "out"
    assert run_study(spec, out) == 0
    study = json.loads((out / "study.json").read_text())
    assert [c["cell"] for c in study["cells"]] == ["mean.seed1", "eos.seed1", "mean.seed2", "eos.seed2"]
    cell = study["cells"][0]
    assert cell["status"] == "done" and cell["steps"] == 2 and cell["peak_rss_mib"] > 0
    sts_row = f"{root.name}/sts"   # a file task's name is folder/stem, as `llm2emb eval` names it
    assert set(cell["main"]) == {"beir", "beir@16", sts_row, f"{sts_row}@16"}
    assert len(cell["per_item"]["beir"]["scores"]) == 6 and len(cell["per_item"][sts_row]["gold"]) == 6
    # the summary is the mean / sample std of the cells' main scores
    values = [c["main"]["beir"]["value"] for c in study["cells"] if c["recipe"] == "eos"]
    summary = study["summary"]["eos"]["tasks"]["beir"]
    assert summary["mean"] == pytest.approx(np.mean(values)) and summary["std"] == pytest.approx(np.std(values, ddof=1))
    comparison = study["comparisons"]["eos"]["beir"]
    assert comparison["low"] <= comparison["diff"] <= comparison["high"]
    report = (out / "report.md").read_text()
    assert "| mean |" in report and "| eos |" in report and "paired-bootstrap" in report and " ± " in report
    assert (out / "report.png").stat().st_size > 0
    # each cell's eval records are in its run's eval/ folder (what `llm2emb compare` and export read)
    assert list((out / "runs" / "mean.seed1" / "eval").glob("*.json"))

    capsys.readouterr()
    assert run_study(spec, out) == 0    # everything done: skipped, nothing retrained
    printed = capsys.readouterr().out
    assert printed.count("done (skipped)") == 4 and "training" not in printed and "evaluating" not in printed
    assert cli_main(["compare", str(out), "--output", str(tmp_path / "cmp.md")]) == 0


@pytest.mark.slow
def test_changed_config_reruns_only_that_recipe_and_failures_are_isolated(study_inputs, tiny_model, tmp_path,
                                                                           capsys):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1,))
    out = tmp_path / "out"
    assert run_study(spec, out) == 0
    first = json.loads((out / "cells" / "mean.seed1.json").read_text())
    # change the eos recipe only (and break nothing else): mean is skipped, eos retrains from scratch
    write_study(spec, tiny_model, raw, beir, sts, seeds=(1,),
                recipes={"mean": {}, "eos": {"pooling_mode": "eos", "learning_rate": 5e-4}})
    capsys.readouterr()
    assert run_study(spec, out) == 0
    printed = capsys.readouterr().out
    assert "mean.seed1: done (skipped)" in printed and "eos.seed1: training 2 steps" in printed
    assert json.loads((out / "cells" / "mean.seed1.json").read_text()) == first
    eos_config = json.loads((out / "runs" / "eos.seed1" / "config.json").read_text())["config"]
    assert eos_config["learning_rate"] == 5e-4

    # other eval settings: every cell is evaluated again, none retrained
    data = json.loads(spec.read_text())
    data["eval"]["dims"] = []
    spec.write_text(json.dumps(data))
    capsys.readouterr()
    assert run_study(spec, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("trained already, evaluating") == 2 and "training" not in printed
    assert "beir@16" not in json.loads((out / "cells" / "mean.seed1.json").read_text())["main"]

    # a recipe whose training fails (mrl dims larger than the embedding) is reported; the other still runs
    write_study(spec, tiny_model, raw, beir, sts, seeds=(1,),
                recipes={"mean": {}, "broken": {"mrl_enabled": True, "mrl_dims": [4096]}})
    assert run_study(spec, out) == 1
    study = json.loads((out / "study.json").read_text())
    broken = next(c for c in study["cells"] if c["recipe"] == "broken")
    assert broken["status"] == "failed" and "4096" in broken["error"]
    assert "Failed cells" in (out / "report.md").read_text()


@pytest.mark.slow
def test_same_cell_twice_gives_identical_metrics(study_inputs, tiny_model, tmp_path):
    root, raw, beir, sts = study_inputs
    results = []
    for name in ("a", "b"):
        spec = write_study(tmp_path / f"{name}.json", tiny_model, raw, beir, sts, seeds=(3,),
                           recipes={"mean": {}})
        assert run_study(spec, tmp_path / name) == 0
        cell = json.loads((tmp_path / name / "cells" / "mean.seed3.json").read_text())
        results.append((cell["metrics"], cell["per_item"], cell["final_loss"]))
    assert results[0] == results[1]


@pytest.mark.slow
def test_killed_cell_resumes_inside_the_run(study_inputs, tiny_model, tmp_path):
    """A cell whose process died after a checkpoint continues from it (the trainer's exact resume)."""
    from llm2emb.study.runner import StudyRunner
    from llm2emb.study.spec import load_study
    from llm2emb.train.trainer import train
    from llm2emb.config import config_from_dict

    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1,), recipes={"mean": {}},
                       budget={"train_steps": 4, "checkpointing_steps": 2})
    runner = StudyRunner(load_study(spec), tmp_path / "out")
    runner.claim_output()
    (cell,) = runner.cells(prepare=True)
    # simulate a study killed after the checkpoint of step 2: the run exists with step_2 but no final/
    cfg = config_from_dict({**cell.config, "train_steps": 4}).validate()
    import llm2emb.train.trainer as trainer_module

    class Killed(Exception):
        pass

    original = trainer_module.Trainer._train_step

    def stop_after_two(self, batch, running):
        if self.step == 2:
            raise Killed()
        return original(self, batch, running)

    trainer_module.Trainer._train_step = stop_after_two
    try:
        with pytest.raises(Killed):
            train(cfg, show_progress=False)
    finally:
        trainer_module.Trainer._train_step = original
    assert (tmp_path / "out" / "runs" / "mean.seed1" / "checkpoints" / "step_2").is_dir()
    runner.run()
    log = (tmp_path / "out" / "logs" / "mean.seed1.log").read_text()
    assert "resumed from" in log and "step 2 of 4" in log
    assert json.loads((tmp_path / "out" / "cells" / "mean.seed1.json").read_text())["steps"] == 4


def test_dry_run_validates_and_estimates_without_training(study_inputs, tiny_model, tmp_path, capsys):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts)
    assert run_study(spec, tmp_path / "out", "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "4 cell(s)" in printed and "mean.seed1" in printed and "estimated training time" in printed
    assert not (tmp_path / "out" / "runs").exists() and not (tmp_path / "out" / "study.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"recipe": {"mean": {}}}, "unknown field 'recipe'.*Did you mean 'recipes'"),
    ({"recipes": {"mean": {"poling_mode": "eos"}}}, "recipe 'mean': unknown config field 'poling_mode'"),
    ({"recipes": {"mean": "missing.json"}}, "missing.json does not exist"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"eval": {"tasks": ["nope/none"]}}, r"eval.tasks\[0\]: Task .* does not exist"),
    ({"recipes": {"mean": {"seed": 3}}}, "seed are set by the study for every cell"),
    ({"data": {"input": "builtin:stdlib-undocumented"}}, "not built-in training data with queries; use one of builtin:stdlib "),
])
def test_bad_study_files_fail_before_training(study_inputs, tiny_model, tmp_path, change, message):
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts)
    data = {**json.loads(spec.read_text()), **change}
    if "recipe" in change:
        data.pop("recipes")
    spec.write_text(json.dumps(data))
    from llm2emb.study.spec import load_study

    with pytest.raises(UserError, match=message):
        load_study(spec)
    assert run_study(spec, tmp_path / "out") == 2
    assert not (tmp_path / "out").exists()


def test_duplicate_recipe_names_and_another_study_in_the_folder(study_inputs, tiny_model, tmp_path):
    root, raw, beir, sts = study_inputs
    yaml_spec = tmp_path / "dup.yaml"
    yaml_spec.write_text(f"base: {{model_path: {tiny_model}}}\nrecipes:\n  a: {{}}\n  a: {{pooling_mode: eos}}\n"
                         f"seeds: [1]\ndata: {{input: {raw}}}\neval: {{tasks: [{beir}]}}\n")
    from llm2emb.study.spec import load_study

    with pytest.raises(UserError, match="'a' is given twice"):
        load_study(yaml_spec)
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps({"name": "other"}))
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts)
    assert run_study(spec, out) == 2
    assert not (out / "runs").exists()


def test_prepared_data_for_another_tokenizer_is_refused(study_inputs, tiny_model, tmp_path, qwen_like_tokenizer_dir):
    """data.train_data_path prepared with one tokenizer, a recipe training a model with another."""
    from llm2emb.data.tokenize import prepare

    root, raw, beir, sts = study_inputs
    prepared = tmp_path / "tok"
    prepare(str(qwen_like_tokenizer_dir), raw, prepared, max_seq_length=32, workers=1, progress=False)
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts)
    data = json.loads(spec.read_text())
    data["data"] = {"train_data_path": str(prepared)}
    spec.write_text(json.dumps(data))
    assert run_study(spec, tmp_path / "out", "--dry-run") == 2
    assert run_study(spec, tmp_path / "out") == 2
    assert not (tmp_path / "out" / "runs").exists()


@pytest.fixture(scope="module")
def qwen_like_tokenizer_dir(tmp_path_factory, tiny_model):
    """The tiny model's files with a tokenizer whose post-processor appends a different end token."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("other-tokenizer")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="$A <|endoftext|>",
                                                              special_tokens=[("<|endoftext|>", 0)])
    tok.save_pretrained(folder)
    return folder


def test_matryoshka_rows_share_one_encoding(tiny_model, monkeypatch):
    """Cells evaluate every dim from one full-size encoding: equal to encoding at that dim directly."""
    from llm2emb import Embedder
    from llm2emb.eval.encoders import EmbedderEncoder

    emb = Embedder.from_pretrained(tiny_model, pooling="mean")
    texts = ["sorting lists", "hashing files in steps", "a"]
    direct = {d: emb.encode(texts, dim=d) for d in (None, 16, 32)}
    calls = {"n": 0}
    original = Embedder.encode

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Embedder, "encode", counting)
    shared: dict = {}
    for d in (None, 16, 32):
        got = EmbedderEncoder(emb, dim=d, shared=shared).encode(texts)
        np.testing.assert_allclose(got, direct[d], atol=1e-6)
    assert calls["n"] == 1


def test_fields_at_their_default_do_not_change_a_cells_hash():
    """A field a newer llm2emb adds (at its default) leaves finished cells finished; setting it re-runs them."""
    from llm2emb.config import TrainConfig
    from llm2emb.study.runner import result_hash

    config = TrainConfig(model_path="m", experiment_id="e", train_data_path="d").to_dict()
    older = {k: v for k, v in config.items() if k not in ("mntp_mask_probability", "teacher_model")}
    assert result_hash(older) == result_hash(config)
    assert result_hash({**config, "mntp_mask_probability": 0.2}) != result_hash(config)
    assert result_hash({**config, "log_interval": 3}) == result_hash(config)  # bookkeeping never counts


def test_eval_precision_setting(study_inputs, tiny_model, tmp_path, capsys):
    """eval.precision encodes the cells' models in that precision; absent, auto, and what it resolves to here is
    part of the eval hash (cells evaluated in another precision are evaluated again); a bad value is one sentence."""
    from dataclasses import asdict

    from llm2emb.model.precision import resolved_encode_precision
    from llm2emb.study.runner import _eval_dict
    from llm2emb.study.spec import load_study

    root, raw, beir, sts = study_inputs
    plain = load_study(write_study(tmp_path / "a.json", tiny_model, raw, beir, sts))
    assert _eval_dict(plain) == {**asdict(plain.eval), "precision": "auto",
                                 "resolved_precision": resolved_encode_precision("auto")}
    path = write_study(tmp_path / "b.json", tiny_model, raw, beir, sts)
    spec = json.loads(path.read_text())
    spec["eval"]["precision"] = "bfloat16"
    path.write_text(json.dumps(spec))
    assert _eval_dict(load_study(path))["precision"] == "bf16"
    spec["eval"]["precision"] = "int4"
    path.write_text(json.dumps(spec))
    assert run_study(path, tmp_path / "out", "--dry-run") == 2
    assert "eval.precision" in capsys.readouterr().err


def test_only_keeps_every_finished_cell_in_the_report(study_inputs, tiny_model, tmp_path, monkeypatch):
    """`--only R` runs R's cells, but report.md / study.json still hold every finished cell of the study
    (the other recipes' rows and their comparisons with the baseline)."""
    from types import SimpleNamespace

    from llm2emb.atomic import write_json_atomic
    from llm2emb.experiment.launchers.local import LocalLauncher

    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1, 2),
                       recipes={"mean": {}, "eos": {"pooling_mode": "eos"}, "wm": {"pooling_mode": "weighted_mean"}})
    out = tmp_path / "out"
    ran: list[str] = []

    def fake_cell(self, job, slot, procs):   # a finished cell without training: scores drawn from its name
        from llm2emb.experiment.launchers.base import Outcome

        spec = json.loads(job.spec_path.read_text())
        cell = SimpleNamespace(name=spec["cell"], recipe=spec["recipe"], seed=spec["seed"], hash=spec["hash"],
                               eval_hash=spec["eval_hash"])
        ran.append(cell.name)
        rng = np.random.default_rng(sum(map(ord, cell.name)))
        scores = {f"q{i}": float(v) for i, v in enumerate(rng.random(6))}
        record = {"cell": cell.name, "recipe": cell.recipe, "seed": cell.seed, "hash": cell.hash,
                  "eval_hash": cell.eval_hash, "status": "done", "steps": 2,
                  "main": {"beir": {"metric": "ndcg_at_10", "kind": "retrieval",
                                    "value": float(np.mean(list(scores.values())))}},
                  "per_item": {"beir": {"scores": scores}}}
        write_json_atomic(job.result_path, record)
        return Outcome(job, 0, 0.0, 0.0)

    monkeypatch.setattr(LocalLauncher, "_run_one", fake_cell)
    assert run_study(spec, out, "--only", "mean,eos") == 0
    assert run_study(spec, out, "--only", "wm") == 0
    assert ran == ["mean.seed1", "eos.seed1", "mean.seed2", "eos.seed2", "wm.seed1", "wm.seed2"]
    study = json.loads((out / "study.json").read_text())
    assert [c["cell"] for c in study["cells"]] == ["mean.seed1", "eos.seed1", "wm.seed1", "mean.seed2", "eos.seed2",
                                                   "wm.seed2"]
    assert set(study["summary"]) == {"mean", "eos", "wm"} and set(study["comparisons"]) == {"eos", "wm"}
    report = (out / "report.md").read_text()
    assert "(no finished cell)" not in report and "| eos | " in report
    # re-running the baseline alone keeps the others' comparisons too
    ran.clear()
    (out / "cells" / "mean.seed1.json").unlink()
    assert run_study(spec, out, "--only", "mean") == 0
    assert ran == ["mean.seed1"]
    assert set(json.loads((out / "study.json").read_text())["comparisons"]) == {"eos", "wm"}


def test_untrained_recipes_evaluate_the_base_model_once(study_inputs, tiny_model, tmp_path, capsys):
    """`train_steps: 0` recipes: one cell each (no seed changes an untrained model), nothing trained or
    prepared for them (no echo data for the untrained echo recipe), compared with the baseline like any
    recipe: their one cell against both of its seeds."""
    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, seeds=(1, 2), recipes={
        "eos": {"pooling_mode": "eos"},
        "mean0": {"train_steps": 0, "pooling_mode": "mean"},
        "echo0": {"train_steps": 0, "pooling_mode": "mean", "input_strategy": "echo"}})
    out = tmp_path / "out"
    assert cli_main(["study", str(spec), "--output", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "mean0.seed1" in printed and "mean0.seed2" not in printed
    assert run_study(spec, out) == 0
    printed = capsys.readouterr().out
    assert "mean0.seed1: untrained base model" in printed
    study = json.loads((out / "study.json").read_text())
    assert [c["cell"] for c in study["cells"]] == ["eos.seed1", "mean0.seed1", "echo0.seed1", "eos.seed2"]
    assert [p.name for p in (out / "data").iterdir() if p.name != "raw"] == ["tiny-llama0-auto"]
    assert not (out / "runs" / "mean0.seed1" / "final").exists()
    assert study["summary"]["echo0"]["steps"] == 0 and set(study["comparisons"]) == {"mean0", "echo0"}
    # the untrained vectors are the base model's
    from llm2emb.model.embedder import Embedder
    from llm2emb.eval.retrieval import run_retrieval

    base = Embedder.from_pretrained(str(tiny_model), pooling="mean", input_strategy="echo", max_length=32)
    want = run_retrieval(base, beir, batch_size=8, cache=False, show_progress=False).metrics["ndcg_at_10"]
    cell = next(c for c in study["cells"] if c["recipe"] == "echo0")
    assert cell["main"]["beir"]["value"] == pytest.approx(want)


@pytest.mark.parametrize("recipe, message", [
    ({"train_steps": 0, "learning_rate": 1e-4}, "'learning_rate' \\(a training field\\) means nothing there"),
    ({"train_steps": 0, "pooling_mode": "attention"}, "pooling attention has weights that only training sets"),
    ({"pooling_mode": "eos", "input_strategy": "echo"}, "input_strategy echo needs pooling mean or weighted_mean"),
])
def test_bad_untrained_recipes_are_one_sentence(study_inputs, tiny_model, tmp_path, recipe, message):
    from llm2emb.study.spec import load_study

    root, raw, beir, sts = study_inputs
    spec = write_study(tmp_path / "s.json", tiny_model, raw, beir, sts, recipes={"mean": {}, "bad": recipe})
    with pytest.raises(UserError, match=message):
        load_study(spec)
