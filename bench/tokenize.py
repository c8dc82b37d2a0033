"""Tokenisation speed: `llm2emb prepare` against F2LLM's `tokenize_data_qwen.py`, at identical output.

    python bench/tokenize.py                                  # ../shared/data/train, qwen2.5-coder-0.5b
    python bench/tokenize.py --data RAW_DIR --model M --workers 2 --rounds 3

Both sides tokenise every dataset of `--data` with the same tokenizer and the same number of worker
processes, each side in its own fresh process (tokenizer loading is not timed), alternating A B B A ...:

- llm2emb: `llm2emb.data.tokenize.prepare` (distinct texts of a dataset over all its columns tokenised once,
  batched fast-tokenizer calls in a process pool, id lists assembled with numpy).
- F2LLM: a faithful re-implementation of `F2LLM/tokenize_data_qwen.py` (codefuse-ai/CodeFuse-Embeddings):
  `tokenizer(text, max_length, truncation=True)` per row through `pandas.Series.apply`, split over a
  `multiprocessing.Pool` per column group; queries per row, passages + negatives de-duplicated per dataset;
  the whole frame written with `DataFrame.to_parquet`. The one change: F2LLM hard-codes 24 (or 1) negative
  columns; here it uses the dataset's own k, as our data has k in {0, 1, 7}.

F2LLM truncates the text to `max_length` tokens and then appends EOS, so its `max_length=1023` equals
llm2emb's `--max-seq-length 1024` (EOS included); the bench asserts that every output column is identical.
Prints a markdown table; writes bench/results/tokenize.json (records {"name","unit","ours","theirs","ratio"}).
"""
from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `tokenize`, which linecache / inspect import: keep the
# bench folder off the front of sys.path so they get the real one.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.append(str(_BENCH))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from multiprocessing import Pool  # noqa: E402

import _common as C  # noqa: E402

SCRIPT = "tokenize"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


# ---------------------------------------------------------------------------------- F2LLM, faithfully
# Module globals, as in tokenize_data_qwen.py: the Pool's forked workers inherit them.
_F2_TOKENIZER = None
_F2_MAX_LENGTH = 1023


def _f2_process_sent(sentence):
    import numpy as np

    # We make sure there's always an eos token at the end of each sequence
    out = _F2_TOKENIZER(sentence, max_length=_F2_MAX_LENGTH, truncation=True, add_special_tokens=False)
    return np.array(out.input_ids + [_F2_TOKENIZER.eos_token_id])


def _f2_process_sent_batch(s):
    return s.apply(_f2_process_sent)


def _f2_parallelize(data, func, num_of_processes):
    import numpy as np
    import pandas as pd

    indices = np.array_split(data.index, num_of_processes)
    data_split = [data.iloc[idx] for idx in indices]
    with Pool(num_of_processes) as pool:
        data = pd.concat(pool.map(func, data_split))
    return data


def f2llm_tokenize(root_dir: Path, out_dir: Path, workers: int) -> dict[str, float]:
    """tokenize_data_qwen.py's loop; returns seconds per dataset."""
    import pandas as pd

    seconds = {}
    for ds_name in sorted(os.listdir(root_dir)):
        if not ds_name.endswith(".parquet"):
            continue
        started = time.perf_counter()
        df = pd.read_parquet(f"{root_dir}/{ds_name}")
        df["query_input_ids"] = _f2_parallelize(df["query"], _f2_process_sent_batch, workers)
        num_neg = sum(1 for c in df.columns if c.startswith("negative_") and not c.endswith("_input_ids"))
        ls = df.passage.to_list()
        for i in range(1, num_neg + 1):
            ls += df[f"negative_{i}"].to_list()
        ls = list(set(ls))
        df_tmp = pd.DataFrame({"text": ls})
        df_tmp["input_ids"] = _f2_parallelize(df_tmp["text"], _f2_process_sent_batch, workers)
        df_tmp = df_tmp.set_index("text")
        df["passage_input_ids"] = df.passage.map(df_tmp.input_ids)
        for i in range(1, num_neg + 1):
            df[f"negative_{i}_input_ids"] = df[f"negative_{i}"].map(df_tmp.input_ids)
        df.to_parquet(f"{out_dir}/{ds_name}", index=False)
        seconds[ds_name.removesuffix(".parquet")] = time.perf_counter() - started
    return seconds


# ------------------------------------------------------------------------------------------- workers

def _worker(args: argparse.Namespace) -> None:
    """One timed run of one side; prints a JSON line."""
    global _F2_TOKENIZER, _F2_MAX_LENGTH
    from llm2emb.model.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if args.worker == "ours":
        from llm2emb.data.tokenize import prepare

        cpu0 = _cpu_seconds()
        started = time.perf_counter()
        result = prepare(args.model, args.data, out, max_seq_length=args.max_seq_length, workers=args.workers,
                         progress=False, tokenizer=tokenizer)
        total = time.perf_counter() - started
        per_dataset = {name: s["seconds"] for name, s in result["datasets"].items()}
    else:
        _F2_TOKENIZER, _F2_MAX_LENGTH = tokenizer, args.max_seq_length - 1  # text tokens; EOS appended after
        cpu0 = _cpu_seconds()
        started = time.perf_counter()
        per_dataset = f2llm_tokenize(Path(args.data), out, args.workers)
        total = time.perf_counter() - started
    print(json.dumps({"seconds": total, "cpu_seconds": _cpu_seconds() - cpu0, "per_dataset": per_dataset}))


def _cpu_seconds() -> float:
    """CPU time of this process, its threads and its finished child processes (the pools): the work done,
    which unlike wall time does not depend on what else the machine is running."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compare_outputs(ours: Path, theirs: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Assert identical token ids in every column; returns rows and tokens per dataset."""
    import pyarrow.parquet as pq

    rows, tokens = {}, {}
    for path in sorted(ours.glob("*.parquet")):
        a = pq.read_table(path)
        b = pq.read_table(theirs / path.name)
        n_tokens = 0
        for column in a.column_names:
            if not column.endswith("_input_ids"):
                continue
            mine, other = a.column(column).to_pylist(), b.column(column).to_pylist()
            if mine != other:
                bad = next(i for i, (x, y) in enumerate(zip(mine, other)) if x != y)
                raise SystemExit(f"{path.stem}.{column} row {bad} differs: llm2emb {mine[bad][:10]}... "
                                 f"vs F2LLM {other[bad][:10]}...")
            n_tokens += sum(len(x) for x in mine)
        rows[path.stem] = a.num_rows
        tokens[path.stem] = n_tokens
    return rows, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(C.SHARED_DATA / "train"), help="raw F2LLM-layout parquet folder")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer: alias, hub id, folder or .gguf")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes, both sides")
    parser.add_argument("--max-seq-length", type=int, default=1024, help="tokens incl. EOS (F2LLM: 1023 + EOS)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--output", default=None, help="results JSON (default bench/results/tokenize.json)")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"--data {data} does not exist (the shared data folder is ../shared/data/train)")
    from llm2emb.model.loading import resolve_model_path

    resolve_model_path(args.model)  # download / convert once, outside the timed workers
    tmp = Path(tempfile.mkdtemp(prefix="llm2emb-bench-tokenize-"))
    try:
        common = ["--data", str(data), "--model", args.model, "--workers", str(args.workers),
                  "--max-seq-length", str(args.max_seq_length)]
        sides = {side: (lambda r, side=side: C.run_worker(Path(__file__), [
            *common, "--worker", side, "--out", str(tmp / side)])) for side in ("ours", "theirs")}
        print(f"tokenising {data} with {args.model}, {args.workers} workers, {args.rounds} rounds per side")
        runs = C.alternate(sides, args.rounds)
        rows, tokens = compare_outputs(tmp / "ours", tmp / "theirs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_rows, n_tokens = sum(rows.values()), sum(tokens.values())
    ours_s = [r["seconds"] for r in runs["ours"]]
    theirs_s = [r["seconds"] for r in runs["theirs"]]
    records = [
        C.record("rows/s", "rows/s", n_rows / C.median(ours_s), n_rows / C.median(theirs_s)),
        C.record("tokens/s", "tokens/s", n_tokens / C.median(ours_s), n_tokens / C.median(theirs_s)),
        C.record("wall time", "s", C.median(ours_s), C.median(theirs_s), higher_is_better=False),
        C.record("CPU time (all processes)", "s", C.median([r["cpu_seconds"] for r in runs["ours"]]),
                 C.median([r["cpu_seconds"] for r in runs["theirs"]]), higher_is_better=False),
    ]
    records[0]["ratio"] = records[1]["ratio"] = round(C.paired_ratio(theirs_s, ours_s), 3)
    for name in sorted(rows):
        o = C.median([r["per_dataset"][name] for r in runs["ours"]])
        t = C.median([r["per_dataset"][name] for r in runs["theirs"]])
        records.append(C.record(f"{name} ({rows[name]} rows, {tokens[name]} tokens)", "s", o, t,
                                higher_is_better=False))
    records.append(C.meta_record(data=str(data), model=args.model, workers=args.workers, rounds=args.rounds,
                                 max_seq_length=args.max_seq_length, rows=n_rows, tokens=n_tokens,
                                 identical_output=True, ours_seconds=ours_s, theirs_seconds=theirs_s))
    path = C.save_results(SCRIPT, records, args.output)
    print(f"\nidentical output: {n_rows} rows, {n_tokens} tokens in {len(rows)} datasets")
    print(C.markdown_table(records, "llm2emb prepare", "F2LLM per-sentence"))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
