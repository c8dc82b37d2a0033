"""Hard-negative mining for pair data ("难负样本" in the seed).

F2LLM's recipe (arXiv:2510.02294): retrieve the top-100 passages for each query with an embedding model,
skip the top few (likely unlabelled positives), and keep only candidates whose score is below an absolute
threshold (0.8) and below a fraction (95%) of the positive's score: the "positive-aware" filter of
NV-Retriever (arXiv:2407.15831, TopK-PercPos). The hardest `num` survivors become negative_1..negative_num.

Scorers are a registry: `embedding` (any model `Embedder.from_pretrained` loads; cosine scores) and `bm25`
(a model-free lexical baseline through `bm25s`; its scores are unbounded, so the absolute threshold does not
apply to it). The corpus of a dataset is its distinct passages (plus any negatives it already has); a query's
own positives, and a text identical to the query, are never its negatives. When fewer than `num` candidates
survive, the rest are filled with random corpus passages (counted in the report) so every row has `num`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from llm2emb.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class MiningSettings:
    num: int = 24                    # negatives per row
    skip_top: int = 5                # highest-ranked non-positive candidates skipped (likely false negatives)
    max_score: float | None = 0.8    # keep candidates scoring below this (cosine; ignored by unbounded scorers)
    max_ratio: float | None = 0.95   # keep candidates scoring below max_ratio * the positive's score
    candidates: int = 100            # ranked candidates considered per query
    seed: int = 0                    # random fill when too few candidates survive

    def check(self) -> None:
        if self.num < 1:
            raise UserError(f"--num must be at least 1, got {self.num}.")
        if self.skip_top < 0:
            raise UserError(f"--skip-top must be 0 or more, got {self.skip_top}.")
        if self.candidates < 1:
            raise UserError(f"--candidates must be at least 1, got {self.candidates}.")
        if self.max_ratio is not None and self.max_ratio <= 0:
            raise UserError(f"--max-ratio must be positive, got {self.max_ratio}.")


# --------------------------------------------------------------------------------------------- scorers

class Scorer:
    """Scores queries against a corpus. `bounded`: scores are cosines in [-1, 1] (absolute threshold applies)."""

    name = "scorer"
    bounded = False

    def index(self, corpus: Sequence[str]) -> None:
        raise NotImplementedError

    def search(self, queries: Sequence[str], k: int, targets: Sequence[Sequence[int]], instruction: str = "",
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """-> (scores (Q, k) descending, corpus ids (Q, k), per query the scores of its `targets` corpus ids)."""
        raise NotImplementedError


SCORERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
    def wrap(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        SCORERS[name] = factory
        return factory
    return wrap


_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_STOPWORDS = frozenset("a an and are as at be by for from in is it of on or that the this to with".split())


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased words for BM25: identifiers split at underscores and camelCase (so `get_close_matches`
    matches "close matches"), CJK text as single characters (no word segmenter needed), English stopwords
    dropped."""
    return [w for w in (m.lower() for m in _WORD.findall(text)) if w not in _STOPWORDS]


@register_scorer("bm25")
class BM25Scorer(Scorer):
    """Okapi BM25 (Robertson & Zaragoza, 2009) via `bm25s`, on `lexical_tokens`."""

    name = "bm25"
    bounded = False

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b

    def index(self, corpus: Sequence[str]) -> None:
        import bm25s

        self.retriever = bm25s.BM25(k1=self.k1, b=self.b)
        tokens = [lexical_tokens(t) or ["\u2400"] for t in corpus]  # bm25s needs a token in every document
        self.retriever.index(tokens, show_progress=False)
        self.size = len(corpus)

    def search(self, queries, k, targets, instruction=""):
        k = min(k, self.size)
        top_scores = np.zeros((len(queries), k), np.float32)
        top_ids = np.zeros((len(queries), k), np.int64)
        target_scores = []
        for i, query in enumerate(queries):  # the instruction is not lexical evidence: left out
            ids = self.retriever.get_tokens_ids(lexical_tokens(query))
            scores = self.retriever.get_scores_from_ids(ids) if ids else np.zeros(self.size, np.float32)
            top = np.argpartition(-scores, k - 1)[:k] if k < self.size else np.arange(self.size)
            top = top[np.lexsort((top, -scores[top]))]  # by score, ties by corpus id: deterministic
            top_scores[i], top_ids[i] = scores[top], top
            target_scores.append(np.asarray(scores[np.asarray(targets[i], np.int64)], np.float32))
        return top_scores, top_ids, target_scores


@register_scorer("embedding")
class EmbeddingScorer(Scorer):
    """Cosine similarity of `Embedder` embeddings (normalised), exact search in chunks."""

    name = "embedding"
    bounded = True

    def __init__(self, model, pooling: str | None = None, batch_size: int = 32, max_length: int = 512,
                 show_progress: bool = False, precision: str | None = None) -> None:
        from llm2emb.model.embedder import Embedder
        from llm2emb.model.precision import encode_setting

        if isinstance(model, Embedder):
            self.embedder = model
        else:
            if pooling is None and not _is_llm2emb_folder(model):
                pooling = "mean"  # a raw LLM: EOS pooling is near random before training, mean is not
            # the commands' default (auto): bf16 where native shifts cosines by ~1e-3, which can reorder near-ties
            self.embedder = Embedder.from_pretrained(model, pooling=pooling, precision=encode_setting(precision))
        self.batch_size, self.max_length, self.show_progress = batch_size, max_length, show_progress

    def _encode(self, texts: Sequence[str], instruction: str = "") -> np.ndarray:
        return self.embedder.encode(list(texts), instruction=instruction or None, batch_size=self.batch_size,
                                    max_length=self.max_length, show_progress=self.show_progress)

    def index(self, corpus: Sequence[str]) -> None:
        self.corpus_emb = self._encode(corpus)

    def search(self, queries, k, targets, instruction=""):
        import torch

        q = torch.from_numpy(self._encode(queries, instruction))
        c = torch.from_numpy(self.corpus_emb)
        k = min(k, c.shape[0])
        scores_out, ids_out = [], []
        for start in range(0, q.shape[0], 1024):
            s, i = torch.topk(q[start:start + 1024] @ c.T, k, dim=1)
            scores_out.append(s.numpy())
            ids_out.append(i.numpy())
        target_scores = [(c[torch.as_tensor(list(t), dtype=torch.long)] @ q[i]).numpy() for i, t in enumerate(targets)]
        return np.concatenate(scores_out), np.concatenate(ids_out).astype(np.int64), target_scores


def _is_llm2emb_folder(model) -> bool:
    path = Path(str(model)).expanduser()
    return path.is_dir() and (path / "llm2emb_config.json").exists()


def build_scorer(name: str, model=None, **kwargs) -> Scorer:
    if name not in SCORERS:
        raise UserError(f"Unknown scorer {name!r}; use one of: {', '.join(SCORERS)}.")
    if name == "embedding":
        if model is None:
            raise UserError("Mining with the embedding scorer needs --model (or use --scorer bm25).")
        return SCORERS[name](model, **kwargs)
    return SCORERS[name](**kwargs)


# ---------------------------------------------------------------------------------------------- mining

@dataclass
class MiningCorpus:
    """The candidates of one dataset: every distinct passage (positives and existing negatives), and which of
    them are each distinct query's positives."""

    queries: list
    passages: list
    old_negatives: list[str]          # existing negative_* columns (dropped; their texts stay candidates)
    index: pd.Index                   # corpus text -> id
    corpus: list
    positive_ids: np.ndarray          # per row
    unique_queries: np.ndarray
    row_query: np.ndarray             # per row: its distinct query
    positives_of: dict[int, set[int]]
    most_positives: int


def mining_corpus(frame: pd.DataFrame, settings: MiningSettings, source: str = "dataset") -> MiningCorpus:
    """The corpus `mine_negatives` ranks for `frame`; refuses one too small for `settings.num` negatives per
    row. Needs no model (`llm2emb mine --dry-run` runs it on every dataset it would mine)."""
    queries = frame["query"].tolist()
    passages = frame["passage"].tolist()
    old_negatives = [c for c in frame.columns if str(c).startswith("negative_")]
    extra = [t for c in old_negatives for t in frame[c].tolist()]
    corpus_index = pd.Index(pd.unique(pd.Series(passages + extra, dtype=object)))
    corpus = corpus_index.tolist()
    positive_ids = corpus_index.get_indexer(passages)
    unique_queries, row_query = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    # all positives of each distinct query text (a query may have several rows)
    positives_of: dict[int, set[int]] = {}
    for r, qi in enumerate(row_query):
        positives_of.setdefault(int(qi), set()).add(int(positive_ids[r]))
    most_positives = max(len(v) for v in positives_of.values())
    if len(corpus) < settings.num + most_positives:
        raise UserError(f"{source}: the corpus has only {len(corpus)} distinct passages, too few to mine "
                        f"{settings.num} negatives per row; lower --num.")
    return MiningCorpus(queries, passages, old_negatives, corpus_index, corpus, positive_ids, unique_queries,
                        row_query, positives_of, most_positives)


def mine_negatives(frame: pd.DataFrame, scorer: Scorer, settings: MiningSettings, instruction: str = "",
                   source: str = "dataset") -> tuple[pd.DataFrame, dict]:
    """Return `frame`'s query/passage with negative_1..negative_num mined, and a report.

    Existing negative columns are dropped, but their texts stay in the corpus as candidates."""
    settings.check()
    c = mining_corpus(frame, settings, source)
    queries, passages, old_negatives, corpus_index, corpus = c.queries, c.passages, c.old_negatives, c.index, c.corpus
    positive_ids, unique_queries, row_query = c.positive_ids, c.unique_queries, c.row_query
    positives_of, most_positives = c.positives_of, c.most_positives
    query_as_doc = corpus_index.get_indexer(unique_queries.tolist())  # symmetric data: the query is a passage

    scorer.index(corpus)
    targets = [sorted(positives_of[qi]) for qi in range(len(unique_queries))]
    k = min(len(corpus), settings.candidates + most_positives + 1)
    top_scores, top_ids, target_scores = scorer.search(unique_queries.tolist(), k, targets, instruction)
    row_pos_scores = np.array([float(target_scores[qi][targets[qi].index(int(positive_ids[r]))])
                               for r, qi in enumerate(row_query)], np.float32)

    rng = np.random.default_rng(settings.seed)
    use_abs = settings.max_score is not None and scorer.bounded
    negatives = np.zeros((len(frame), settings.num), np.int64)
    filled, fully_mined, kept_scores = 0, 0, []
    for r in range(len(frame)):
        qi = int(row_query[r])
        banned = positives_of[qi] | ({int(query_as_doc[qi])} if query_as_doc[qi] >= 0 else set())
        ranked = [(float(s), int(d)) for s, d in zip(top_scores[qi], top_ids[qi]) if int(d) not in banned]
        ranked = ranked[settings.skip_top:settings.candidates]  # skip the top few of the top-`candidates`
        limit = np.inf
        if use_abs:
            limit = settings.max_score
        if settings.max_ratio is not None:
            limit = min(limit, settings.max_ratio * float(row_pos_scores[r]))
        chosen = [d for s, d in ranked if s < limit][:settings.num]
        kept_scores.extend(s for s, d in ranked if s < limit and d in chosen)
        if len(chosen) < settings.num:
            filled += settings.num - len(chosen)
            taken = set(chosen) | banned
            while len(chosen) < settings.num:
                d = int(rng.integers(len(corpus)))
                if d not in taken:
                    chosen.append(d)
                    taken.add(d)
        else:
            fully_mined += 1
        negatives[r] = chosen
    out = pd.DataFrame({"query": queries, "passage": passages})
    corpus_arr = np.asarray(corpus, dtype=object)
    for j in range(settings.num):
        out[f"negative_{j + 1}"] = corpus_arr[negatives[:, j]]
    report = {"rows": len(frame), "distinct_queries": len(unique_queries), "corpus": len(corpus),
              "scorer": scorer.name, "negatives": settings.num, "rows_fully_mined": fully_mined,
              "random_fill": filled, "replaced_negative_columns": len(old_negatives),
              "mean_negative_score": round(float(np.mean(kept_scores)), 4) if kept_scores else None,
              "mean_positive_score": round(float(np.mean(row_pos_scores)), 4), "settings": asdict(settings)}
    return out, report


# ------------------------------------------------------------------------------------------ a folder

@dataclass
class MinePlan:
    """The inputs `mine_folder` would read, after its checks that need no model and no dataset in memory."""

    input_dir: Path
    output_dir: Path
    files: list
    manifest: dict
    manifest_dir: Path


def plan_mine(input_dir: str | Path, output_dir: str | Path, settings: MiningSettings,
              overwrite: bool = False) -> MinePlan:
    """`mine_folder`'s checks before it reads any dataset: settings, output vs input folder, inputs and their
    parquet footers, the manifest, files already in `output_dir`."""
    from llm2emb.data.formats import check_readable, list_datasets
    from llm2emb.data.manifest import MANIFEST_NAME, read_manifest, resolve_manifest

    settings.check()      # before anything is read: a bad option is wrong even for data that only gets copied
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    manifest_dir = input_dir if input_dir.is_dir() else input_dir.parent
    if output_dir.resolve() == manifest_dir.resolve():
        raise UserError(f"--output {output_dir} is the input folder; choose a separate folder.")
    files = list_datasets(input_dir)
    check_readable(files)
    manifest = read_manifest(manifest_dir)
    resolve_manifest(manifest, [f.name for f in files], str(manifest_dir / MANIFEST_NAME))  # typo check first
    if not overwrite:
        existing = [f.name for f in files if (output_dir / f"{f.name}.parquet").exists()]
        if existing:
            raise UserError(f"{output_dir} already has {', '.join(existing)}; pass --overwrite or choose another "
                            "--output.")
    return MinePlan(input_dir, output_dir, files, manifest, manifest_dir)


def copy_reason(spec, num_negatives: int, remine: bool) -> str | None:
    """Why a dataset is copied unchanged rather than mined, or None when it is mined."""
    if not spec.task.minable:
        return f"type {spec.type} is not mined"
    if num_negatives and not remine:
        return f"already has {num_negatives} negatives (--remine to replace)"
    return None


def mine_folder(input_dir: str | Path, output_dir: str | Path, scorer: Scorer, settings: MiningSettings,
                format: str | None = None, remine: bool = False, overwrite: bool = False) -> dict:
    """Mine every minable dataset of `input_dir` into `output_dir` (F2LLM raw layout, plus the resolved
    manifest.json and mine_info.json). Datasets that already have negatives are copied unless `remine`;
    task types where mining makes no sense (classification, clustering, sts) are copied unchanged."""
    from llm2emb.data.formats import atomic_write_json, load_dataset, write_raw
    from llm2emb.data.manifest import MANIFEST_NAME, manifest_to_json, resolve_spec

    plan = plan_mine(input_dir, output_dir, settings, overwrite)
    input_dir, output_dir, files, manifest = plan.input_dir, plan.output_dir, plan.files, plan.manifest
    reports: dict[str, dict] = {}
    resolved = {}
    for file in files:
        dataset = load_dataset(file, format)
        spec = resolve_spec(manifest, dataset.name, dataset.defaults)
        resolved[dataset.name] = spec
        frame = dataset.frame
        reason = copy_reason(spec, dataset.num_negatives, remine)
        if reason is not None:
            reports[dataset.name] = {"rows": len(frame), "copied": reason}
        else:
            logger.info("%s: mining %d negatives for %d rows with %s", dataset.name, settings.num, len(frame),
                        scorer.name)
            frame, reports[dataset.name] = mine_negatives(frame, scorer, settings, spec.instruction,
                                                          str(file.path))
        dataset.frame = frame
        write_raw(dataset, output_dir / f"{dataset.name}.parquet")
    atomic_write_json(manifest_to_json(resolved), output_dir / MANIFEST_NAME)
    info = {"input": str(input_dir), "scorer": scorer.name, "settings": asdict(settings), "datasets": reports}
    atomic_write_json(info, output_dir / "mine_info.json")
    return info
