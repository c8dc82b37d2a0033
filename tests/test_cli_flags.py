"""The shared flags' behaviour on the commands that gained them (tests/test_cli_vocabulary.py checks which
commands have them): --dry-run writes nothing, --no-progress prints no progress bar. encode's are in
tests/test_encode.py."""
from __future__ import annotations

import sys

import pytest

from llm2emb.cli import main
from test_train_support import prepare_data, quick_overrides, write_raw_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BAR_MARKS = ("it/s", "step/s", "text/s", "s/it", "100%|")


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_train_dry_run_says_what_it_would_do_and_writes_nothing(tiny_model, tmp_path, capsys):
    data = prepare_data(tiny_model, write_raw_data(tmp_path / "raw", 16, 8, k=2), tmp_path / "tok")
    overrides = quick_overrides(tiny_model, data, tmp_path, steps=2)
    before = _files(tmp_path)
    assert main(["train", "--set", *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"dry run: would train 2 steps into {tmp_path / 'runs' / 'exp'}; nothing written" in out
    assert _files(tmp_path) == before
    # the same checks as a real run: a missing data folder is refused
    bad = [o for o in overrides if not o.startswith("train_data_path=")] + [f"train_data_path={tmp_path / 'nope'}"]
    assert main(["train", "--set", *bad, "--dry-run"]) == 2
    assert "nope" in capsys.readouterr().err
    # after a finished run it says so, and --overwrite would start over
    assert main(["train", "--set", *overrides, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--set", *overrides, "--dry-run"]) == 0
    assert "is already complete; nothing would train" in capsys.readouterr().out
    finished = _files(tmp_path)
    assert main(["train", "--set", *overrides, "--dry-run", "--overwrite"]) == 0
    assert "would delete" in capsys.readouterr().out and _files(tmp_path) == finished


def test_mine_no_progress(tiny_model, tmp_path, capsys, monkeypatch):
    raw = write_raw_data(tmp_path / "raw", 24, 4, k=0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # as on a terminal, where bars show
    args = ["mine", "-m", str(tiny_model), "-i", str(raw), "--num", "2", "--max-length", "32", "--precision", "fp32"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert any(mark in capsys.readouterr().err for mark in BAR_MARKS)   # the bar this test would catch
    assert main([*args, "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not any(mark in err for mark in BAR_MARKS), err


def test_demo_no_progress(tiny_model, tmp_path, capsys, monkeypatch):
    """Training and both evaluations run with no bar (on a terminal they show one each; checked by hand)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ["demo", "-o", str(tmp_path / "demo"), "-m", str(tiny_model), "--steps", "2", "--eval-limits", "20",
            "--no-plot"]
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not any(mark in err for mark in BAR_MARKS), err


def test_eval_dry_run_names_tasks_result_files_and_label_as_a_real_run(tiny_model, tmp_path, capsys):
    from test_study import write_tasks

    from llm2emb import Embedder

    beir, sts = write_tasks(tmp_path / "tasks")
    Embedder.from_pretrained(str(tiny_model), pooling="mean").save(tmp_path / "emb")
    out_dir = tmp_path / "results"
    args = ["eval", "-m", str(tmp_path / "emb"), "--tasks", f"{beir},{sts}", "-o", str(out_dir),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--precision", "fp32"]
    before = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert _files(tmp_path) == before                                    # no results, no cache, no folder
    planned = [line.split(" -> ")[1].rsplit(" (", 1)[0] for line in out.splitlines() if " -> " in line]
    assert len(planned) == 2 and out.count("(new)") == 2, out
    assert str(tmp_path / "cache") in out and "nothing loaded or written" in out
    # the files it names are the files a real run writes (same label: pooling read from the saved folder)
    assert main(args) == 0
    capsys.readouterr()
    assert sorted(str(p) for p in out_dir.iterdir()) == sorted(planned)
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("exists, would be replaced") == 2
    # a raw LLM with a pooling flag: the label a real run would give, without loading the weights
    assert main(["eval", "-m", str(tiny_model), "--tasks", str(sts), "-o", str(out_dir), "--pooling", "mean",
                 "--dry-run"]) == 0
    assert f"__{tiny_model.name}-mean.json (new)" in capsys.readouterr().out


def test_export_dry_run_prints_the_plan_and_writes_nothing(tiny_model, tmp_path, capsys):
    from llm2emb import Embedder

    emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    emb.add_lora(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    emb.save(tmp_path / "lora")
    out = tmp_path / "exported"
    before = _files(tmp_path)
    assert main(["export", "-m", str(tmp_path / "lora"), "-o", str(out), "--dtype", "bfloat16", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"would export {tmp_path / 'lora'} -> {out}\n" in text
    assert "dtype bfloat16, LoRA kept as an adapter over" in text and "nothing loaded or written" in text
    assert _files(tmp_path) == before
    # the real run's checks: an existing output is refused without --overwrite, and named with it
    out.mkdir()
    assert main(["export", "-m", str(tmp_path / "lora"), "-o", str(out), "--dry-run"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "-m", str(tmp_path / "lora"), "-o", str(out), "--dry-run", "--overwrite",
                 "--merge-lora"]) == 0
    text = capsys.readouterr().out
    assert "--overwrite would replace it" in text and "LoRA merged into the weights" in text
    assert _files(tmp_path) == sorted([*before, "exported"]) and not any(out.iterdir())


def test_prepare_dry_run_lists_datasets_to_tokenise_or_skip_and_writes_nothing(tiny_model, tmp_path, capsys):
    raw = write_raw_data(tmp_path / "raw", 16, 8, k=2)
    out = tmp_path / "tok"
    args = ["prepare", "-m", str(tiny_model), "-i", str(raw), "-o", str(out), "--max-length", "32", "--workers", "1",
            "--no-progress"]
    before = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"would tokenise 2 dataset(s) of {raw} into {out} with tokenizer {tiny_model}, max 32 tokens" in text
    assert "facts: retrieval, f2llm format, 16 rows, 2 hard negative(s) per row -> facts.parquet" in text
    assert "labels: classification" in text and _files(tmp_path) == before
    assert main(args) == 0
    capsys.readouterr()
    prepared = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.count("already prepared, would be skipped") == 2
    assert main([*args, "--dry-run", "--overwrite"]) == 0
    assert capsys.readouterr().out.count("(replacing its earlier output)") == 2
    # the real run's refusal of other settings over existing output
    assert main([*args[:-5], "--max-length", "16", "--dry-run"]) == 2
    assert "holds data prepared with a different max_seq_length" in capsys.readouterr().err
    assert _files(tmp_path) == prepared


def test_merge_dry_run_names_inputs_weights_and_base_and_writes_nothing(tiny_model, tmp_path, capsys):
    from llm2emb import Embedder

    for name in ("a", "b"):
        Embedder.from_pretrained(str(tiny_model), pooling="mean").save(tmp_path / name)
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]
    out = tmp_path / "merged"
    before = _files(tmp_path)
    assert main(["merge", *inputs, "-o", str(out), "--method", "ties", "--weights", "1", "3", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"would merge 2 models with ties into an Embedder folder at {out}\n" in text
    assert f"input 2 ({inputs[1]}): {inputs[1]} (full weights, weight 3)" in text
    assert f"base of the task vectors: {tiny_model}" in text and "density=" in text
    assert _files(tmp_path) == before
    # the real run's checks, and the base model's files, which a real run reads only after the inputs' weights
    assert main(["merge", *inputs, "-o", str(out), "--method", "slerp", "--weights", "1", "3", "--dry-run"]) == 2
    assert "takes no --weights" in capsys.readouterr().err
    assert main(["merge", *inputs, "-o", str(out), "--method", "ties", "--base", str(tmp_path / "gone"),
                 "--dry-run"]) == 2
    assert "--base: Model path" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_mine_dry_run_says_what_each_dataset_gets_and_writes_nothing(tiny_model, tmp_path, capsys):
    raw = write_raw_data(tmp_path / "raw", 24, 4, k=0)
    out = tmp_path / "mined"
    args = ["mine", "-m", str(tiny_model), "-i", str(raw), "-o", str(out), "--num", "2"]
    before = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"would mine 2 hard negatives per row with the embedding scorer ({tiny_model}) from {raw}" in text
    assert "facts: 24 rows, mined from a corpus of" in text
    assert "labels: 4 rows, copied (type classification is not mined)" in text
    assert _files(tmp_path) == before
    # what mining itself would refuse, found without a model: a corpus too small for --num
    assert main([*args[:-1], "40", "--dry-run"]) == 2
    assert "too few to mine 40 negatives per row; lower --num" in capsys.readouterr().err
    assert main([*args, "--scorer", "bm25", "--dry-run"]) == 0
    assert "with the bm25 scorer" in capsys.readouterr().out
    assert _files(tmp_path) == before


def test_pairs_dry_run_counts_the_pairs_it_would_write_and_writes_nothing(tmp_path, capsys):
    from test_pairs import write_tree

    root = write_tree(tmp_path / "in")
    out = tmp_path / "pairs"
    args = ["pairs", str(root), "-o", str(out), "--min-query-chars", "5", "--min-passage-chars", "10"]
    before = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would write pairs from" in text and f"to {out}\n" in text
    assert "text_pairs.parquet: 4 pairs (" in text and "code_pairs.parquet: 4 pairs (" in text
    assert _files(tmp_path) == before
    # the counts are the real run's
    assert main(args) == 0
    assert "text_pairs: 4, code_pairs: 4 pairs" in capsys.readouterr().out
    written = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--dry-run", "--overwrite"]) == 0
    assert "--overwrite would replace it" in capsys.readouterr().out and _files(tmp_path) == written


def test_synth_dry_run_plans_the_run_and_sees_an_earlier_one_without_writing(tiny_model, tmp_path, capsys):
    import json

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"A passage about topic {i} and its facts."})
                              + "\n" for i in range(12)))
    spec = tmp_path / "spec.yaml"
    spec.write_text("dataset: s\ntask_type: retrieval\ngeneration: {max_new_tokens: 4, retries: 0}\n")
    out = tmp_path / "synth"
    args = ["synth", "--corpus", str(corpus), "--spec", str(spec), "-m", str(tiny_model), "-o", str(out),
            "--limit", "6", "--batch-size", "4", "--filter", "none", "--no-progress"]
    before = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would generate retrieval data for 6 of 12 passages of" in text and "(2 chunk(s) of 4)" in text
    assert f"{out} holds no synth run: a new run" in text and f"would write {out / 's.parquet'}" in text
    assert _files(tmp_path) == before
    # a real run (random weights: no reply parses, so no row survives, but the log of the chunks is kept)
    assert main(args) == 2
    assert "No generated row survived" in capsys.readouterr().err
    after = _files(tmp_path)
    assert main([*args, "--dry-run"]) == 0
    assert "holds this run: 2 of 2 chunk(s) done" in capsys.readouterr().out
    assert main([*args, "--seed", "1", "--dry-run"]) == 2          # the real run's refusal of another run
    assert "holds a different synth run (its seed differs)" in capsys.readouterr().err
    assert _files(tmp_path) == after


def test_eval_dry_run_plan_gives_the_label_loading_gives(tiny_model, tmp_path):
    """`plan_eval_model` (no weights) and `load_eval_model` agree on source and row label, hence on the result
    file names eval --dry-run prints, for each kind of model folder and with label-changing flags."""
    from llm2emb import Embedder
    from llm2emb.eval.loading import load_eval_model, plan_eval_model

    Embedder.from_pretrained(str(tiny_model), pooling="mean", bidirectional=True).save(tmp_path / "emb")
    lora = Embedder.from_pretrained(str(tiny_model), pooling="mean")
    lora.add_lora(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    lora.save(tmp_path / "lora")
    cases = [(str(tmp_path / "emb"), {}), (str(tmp_path / "emb"), {"pooling": "eos", "dim": 32}),
             (str(tmp_path / "lora"), {"precision": "fp32"}), (str(tiny_model), {}),
             (str(tiny_model), {"pooling": "mean", "skip_instruction": True})]
    for model, flags in cases:
        planned = plan_eval_model(model, **flags)
        loaded = load_eval_model(model, device="cpu", **flags)
        assert (planned.kind, planned.source, planned.label) == (loaded.kind, loaded.source, loaded.label), flags
