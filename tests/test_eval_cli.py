"""`llm2emb eval` and `llm2emb compare` end to end on a tiny random model and hand-made task files, model
resolution (run dirs, checkpoints, training configs, sentence-transformers folders), and CLI errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.eval.loading import load_eval_model


def _beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = ["the cat sat on the mat", "dogs bark loudly", "rain falls in spring", "stocks went up today"]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                               for i, t in enumerate(docs)))
    queries = ["where did the cat sit", "what do dogs do", "when does rain fall"]
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(queries)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\nq2\td2\t1\n")
    return root


@pytest.fixture
def task_files(tmp_path) -> dict[str, Path]:
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat\ta kitten\t4.5\na dog\ta car\t0.5\nthe sun\tthe moon\t2.0\n"
                   "red apple\tgreen apple\t3.0\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("how old are you\twhat is your age\t1\nhow old are you\twhere do you live\t0\n"
                     "is it raining\tis it wet outside\t1\nbuy a car\tsell a house\t0\n")
    return {"beir": _beir(tmp_path / "mini"), "sts": sts, "pairs": pairs}


def test_eval_writes_one_json_per_task_and_compare_reports(tiny_model, task_files, tmp_path, capsys):
    out = tmp_path / "results"
    tasks = ",".join(str(task_files[k]) for k in ("beir", "sts", "pairs"))
    common = ["--tasks", tasks, "--output", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--max-length", "32", "--limits", "2"]
    assert main(["eval", "--model", str(tiny_model), "--pooling", "mean",
                 "--query_instruction", "Instruct: find\\nQuery: ", *common]) == 0  # the seed spelling
    assert main(["eval", "--model", str(tiny_model), "--pooling", "eos", "--name", "tiny-eos", *common]) == 0
    files = sorted(out.glob("*.json"))
    assert len(files) == 6
    label = f"{tiny_model.name} [mean]"  # default row label: model folder name and pooling
    record = json.loads((out / f"mini__{tiny_model.name}-mean.json").read_text())
    assert record["label"] == label
    assert record["task"] == {"name": "mini", "kind": "retrieval", "target": str(task_files["beir"]), "split": "test"}
    assert record["main_score"] == "ndcg_at_10" and 0 <= record["metrics"]["ndcg_at_10"] <= 1
    assert record["limits"] == 2 and record["info"]["n_queries"] == 2 and record["info"]["n_docs"] == 4
    assert record["query_instruction"] == "Instruct: find\nQuery: "   # \n typed in a shell becomes a newline
    assert record["model"]["pooling"] == "mean" and len(record["model"]["fingerprint"]) == 64
    assert {"torch", "transformers", "llm2emb"} <= set(record["versions"])
    sts_record = json.loads((out / f"{tmp_path.name}-sts__{tiny_model.name}-mean.json").read_text())
    assert sts_record["task"]["kind"] == "sts" and "cosine_spearman" in sts_record["metrics"]
    pair_record = json.loads((out / f"{tmp_path.name}-pairs__tiny-eos.json").read_text())
    assert pair_record["task"]["kind"] == "pairs" and "max_ap" in pair_record["metrics"]

    capsys.readouterr()
    report, plot = tmp_path / "report.md", tmp_path / "report.png"
    assert main(["compare", str(out), "--output", str(report), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    table = report.read_text()
    assert table.splitlines()[0].startswith("| model | mini (limits=2) nDCG@10 | mini (limits=2) MRR@10")
    assert "| tiny-eos |" in table and f"| {label} |" in table
    assert f"{tmp_path.name}/sts Spearman" in table  # limits apply to retrieval only
    assert f"{tmp_path.name}/pairs max AP" in table
    assert printed.startswith(table.splitlines()[0])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("argv, expected", [
    (["--limits", "0"], "--limits must be a positive number"),
    (["--tasks", "T2Retreival"], "Did you mean 'T2Retrieval'"),
    (["--tasks", "no/such/dir"], "does not exist"),
])
def test_eval_bad_input_is_one_sentence(tiny_model, task_files, tmp_path, capsys, argv, expected):
    args = ["eval", "--model", str(tiny_model), "--tasks", str(task_files["beir"]), "--output", str(tmp_path / "o")]
    args += argv
    assert main(args) == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_compare_bad_input(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{}")
    assert main(["compare", str(tmp_path / "x.json")]) == 2
    assert "not an llm2emb eval result" in _one_line_error(capsys)


# ----------------------------------------------------------------------------- model resolution

def test_run_dir_checkpoint_and_config(tiny_model, tmp_path):
    from llm2emb import Embedder

    emb = Embedder.from_pretrained(tiny_model, pooling="mean")
    run_dir = tmp_path / "out" / "exp1"
    emb.save(run_dir / "checkpoints" / "step_5" / "model")
    from llm2emb.train.checkpoint import STATE_DIR, TRAINER_STATE

    (run_dir / "checkpoints" / "step_5" / TRAINER_STATE).write_text(json.dumps({"step": 5}))
    (run_dir / "checkpoints" / "step_5" / STATE_DIR).mkdir()  # what makes a checkpoint complete
    # a run without final/ means its newest complete checkpoint, for eval as for export and encode
    from llm2emb.layout import resolve_model_source

    newest = load_eval_model(str(run_dir))
    assert newest.source == resolve_model_source(str(run_dir)).model_path == str(
        run_dir / "checkpoints" / "step_5" / "model")
    ckpt = load_eval_model(str(run_dir / "checkpoints" / "step_5"))
    assert ckpt.label == "exp1/step_5 [mean]" and ckpt.model.config.pooling == "mean"

    emb.save(run_dir / "final")
    final = load_eval_model(str(run_dir))
    assert final.source == str(run_dir / "final") and final.label == "exp1 [mean]"

    config = tmp_path / "cfg.yaml"
    config.write_text("model_path: x\npooling_mode: weighted_mean\nbi_attn_enabled: true\nmax_seq_length: 64\n"
                      "attn_implementation: flash\nlearning_rate: 0.001\n")
    loaded = load_eval_model(config=str(config), ckpt=str(run_dir / "checkpoints" / "step_5"))
    assert (loaded.model.config.pooling, loaded.model.config.bidirectional, loaded.model.config.max_length) == (
        "weighted_mean", True, 64)
    # explicit flags beat the config
    assert load_eval_model(config=str(config), ckpt=str(tiny_model), pooling="eos",
                           bidirectional=False).model.config.pooling == "eos"

    with pytest.raises(UserError, match="holds no llm2emb_config.json"):
        load_eval_model(str(tmp_path))


def test_sentence_transformers_folder(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(tiny_model), max_seq_length=32)
    st = SentenceTransformer(modules=[transformer, Pooling(64, pooling_mode="mean")], device="cpu")
    st.save(str(tmp_path / "st"))
    loaded = load_eval_model(str(tmp_path / "st"))
    assert loaded.kind == "sentence-transformers"
    from llm2emb.eval.sts import evaluate_sts

    sts = tmp_path / "s.tsv"
    sts.write_text("a\tb\t1\nc\td\t2\ne\tf\t3\n")
    assert -1 <= evaluate_sts(loaded.model, sts, show_progress=False)["cosine_spearman"] <= 1
    with pytest.raises(UserError, match="sentence-transformers folder"):
        load_eval_model(str(tmp_path / "st"), pooling="mean")


def test_mteb_builtin_models_resolve_offline_and_need_mteb_tasks(tiny_model, task_files, tmp_path, capsys):
    loaded = load_eval_model("mteb:intfloat/multilingual-e5-large-instruct")
    assert loaded.kind == "mteb" and loaded.label == "intfloat/multilingual-e5-large-instruct"
    with pytest.raises(UserError, match="Did you mean 'intfloat/multilingual-e5-large-instruct'"):
        load_eval_model("mteb:intfloat/multilingual-e5-large-instrct")
    assert main(["eval", "--model", "mteb:BAAI/bge-m3", "--tasks", str(task_files["sts"]),
                 "--output", str(tmp_path / "o")]) == 2
    assert "runs on MTEB tasks only" in _one_line_error(capsys)
