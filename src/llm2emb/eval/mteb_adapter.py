"""Run llm2emb models inside `mteb` (2.x), and local BEIR folders as mteb tasks.

* `MtebEncoder`: an `mteb.models.AbsEncoder` around any llm2emb `TextEncoder` (an `Embedder` is wrapped
  automatically). The prompt type decides the text: queries get the query instruction, documents and
  symmetric tasks (STS, pair classification) none. Documents go through the embedding cache.
* `LocalRetrievalTask`: an `AbsTaskRetrieval` whose data come from a local BEIR folder (offline), with the
  same `--limits` draw and `self_doc_id` handling as `llm2emb.eval.retrieval`, so both give equal metrics.
* `run_mteb_task`: evaluate on an MTEB task by name (`T2Retrieval`, ...); the data come from the Hugging
  Face Hub, so this needs network access the first time. The model may also be an mteb `ModelMeta`
  (`get_mteb_model_meta`): mteb's own implementation of a published model, the seed's baselines.

    import mteb
    from llm2emb.eval.mteb_adapter import MtebEncoder
    result = mteb.evaluate(MtebEncoder(embedder, query_instruction="Instruct: ...\\nQuery: "),
                           mteb.get_task("T2Retrieval"), cache=None)
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any

import numpy as np

from llm2emb.errors import UserError

try:
    import mteb
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import EncoderProtocol, SearchEncoderWrapper, SearchProtocol
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
    raise UserError("MTEB tasks need the mteb package; install it with: pip install 'llm2emb[mteb]'.") from exc

from llm2emb.eval.cache import EmbeddingCache, encode_cached, resolve_cache
from llm2emb.eval.data import RetrievalData, load_beir, sample_queries
from llm2emb.eval.encoders import as_encoder

logger = logging.getLogger(__name__)


def _meta_name(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_") or "model"
    return f"llm2emb/{slug[-80:]}"


class MtebEncoder(AbsEncoder):
    """An llm2emb model as an mteb encoder (cosine similarity on unit vectors)."""

    def __init__(self, model, query_instruction: str | None = None, dim: int | None = None,
                 max_length: int | None = None, cache: EmbeddingCache | bool | str | None = None,
                 show_progress: bool = False, name: str | None = None) -> None:
        self.model = as_encoder(model, dim=dim)
        if query_instruction is None:
            query_instruction = getattr(self.model, "default_query_instruction", None)
        self.query_instruction = query_instruction
        self.max_length = max_length
        self.cache = resolve_cache(cache)
        self.show_progress = show_progress
        self.documents_from_cache = 0
        describe = self.model.describe()
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=_meta_name(name or self.model.name), revision="local", framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.COSINE, embed_dim=describe.get("embedding_dim"),
            max_tokens=max_length or getattr(self.model, "default_max_length", None),
            use_instructions=bool(query_instruction)))

    def instruction_for(self, prompt_type: PromptType | None) -> str | None:
        return self.query_instruction if prompt_type == PromptType.query else None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        batch_size = int(kwargs.get("batch_size") or 32)
        instruction = self.instruction_for(prompt_type)
        if prompt_type == PromptType.document and self.cache is not None:
            vectors, hit = encode_cached(self.model, texts, cache=self.cache, instruction=instruction,
                                         batch_size=batch_size, max_length=self.max_length,
                                         show_progress=self.show_progress, label=f"{task_metadata.name} corpus")
            self.documents_from_cache += len(texts) if hit else 0
            return vectors
        return self.model.encode(texts, instruction=instruction, batch_size=batch_size, max_length=self.max_length,
                                 show_progress=self.show_progress and prompt_type == PromptType.document)

    def similarity(self, embeddings1, embeddings2):
        import torch

        a = torch.as_tensor(np.asarray(embeddings1, dtype=np.float32))
        b = torch.as_tensor(np.asarray(embeddings2, dtype=np.float32))
        return a @ b.T  # unit vectors: dot product is cosine


class _IgnoreSelfDocsSearch(SearchEncoderWrapper):
    """MTEB's search, then each query's `self_doc_id` removed from its results (`ignore_identical_ids`
    compares ids, but local folders name the query's own copy in the corpus explicitly)."""

    def __init__(self, model, self_doc_ids: dict[str, str]) -> None:
        super().__init__(model)
        self.self_doc_ids = self_doc_ids

    def search(self, queries, **kwargs: Any):
        results = super().search(queries, **kwargs)
        for qid, doc in self.self_doc_ids.items():
            if qid in results:
                results[qid].pop(doc, None)
        return results


_TASK_DEFAULTS: dict[str, Any] = dict(
    description="A local BEIR-layout retrieval folder evaluated with llm2emb.",
    reference=None, category="t2t", eval_langs=["eng-Latn"], date=None, dialect=[], domains=[],
    task_subtypes=[], license="not specified", annotations_creators="derived", modalities=["text"],
    sample_creation="found", bibtex_citation="",
)


class LocalRetrievalTask(AbsTaskRetrieval):
    """A BEIR folder as an mteb retrieval task, offline. `limits` keeps that many queries (seeded draw,
    the same as `llm2emb.eval.retrieval`) and the whole corpus."""

    def __init__(self, path: str | os.PathLike[str] | RetrievalData, split: str | None = None,
                 limits: int | None = None, seed: int = 42, name: str | None = None) -> None:
        self.source = path if isinstance(path, RetrievalData) else load_beir(path, split=split)
        self.limits = limits
        self.sample_seed = seed
        task_name = name or f"Local_{re.sub(r'[^A-Za-z0-9_]+', '_', self.source.name)}"
        self.metadata = TaskMetadata(type="Retrieval", name=task_name, main_score="ndcg_at_10",
                                     dataset={"path": str(self.source.path), "revision": "local"},
                                     eval_splits=[self.source.split], **_TASK_DEFAULTS)
        super().__init__(seed=seed)

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        from datasets import Dataset

        data = self.source
        chosen = sample_queries(data.evaluable_query_ids(), self.limits, self.sample_seed)
        position = {qid: i for i, qid in enumerate(data.query_ids)}
        queries = Dataset.from_dict({"id": chosen, "text": [data.query_texts[position[q]] for q in chosen]})
        corpus = Dataset.from_dict({"id": data.corpus_ids, "title": data.corpus_titles,
                                    "text": data.corpus_bodies})
        self.dataset = {"default": {data.split: {
            "queries": queries, "corpus": corpus, "relevant_docs": {q: dict(data.qrels[q]) for q in chosen},
            "top_ranked": None}}}
        self.data_loaded = True

    def _evaluate_subset(self, model, data_split, **kwargs: Any):
        if self.source.self_doc_ids and isinstance(model, EncoderProtocol) and not isinstance(model, SearchProtocol):
            model = _IgnoreSelfDocsSearch(model, self.source.self_doc_ids)
        return super()._evaluate_subset(model, data_split, **kwargs)


def get_mteb_task(name: str):
    """An MTEB task by name; an unknown name raises a `UserError` suggesting close names (offline)."""
    try:
        return mteb.get_task(name)
    except KeyError:
        names = sorted({task.metadata.name for task in mteb.get_tasks()})
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        if not close:  # case and separators differ, e.g. "t2-retrieval"
            squash = {re.sub(r"[^a-z0-9]", "", n.lower()): n for n in names}
            key = re.sub(r"[^a-z0-9]", "", name.lower())
            matches = [key] if key in squash else difflib.get_close_matches(key, list(squash), n=3)
            close = [squash[m] for m in matches]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"Unknown task {name!r}: not a local file or folder, and not one of mteb's "
                        f"{len(names)} task names.{hint}") from None


def get_mteb_model_meta(name: str):
    """MTEB's own implementation of a published model (the seed's "MTEB内置" baselines: e5, bge-m3,
    Qwen3-Embedding, ...), with its prompts; weights load from the Hub when evaluated."""
    try:
        return mteb.get_model_meta(name)
    except KeyError:
        names = sorted(m.name for m in mteb.get_model_metas() if m.name)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UserError(f"Unknown MTEB model {name!r}: not one of mteb's {len(names)} registered "
                        f"models.{hint}") from None


def limit_retrieval_queries(task, limits: int | None, seed: int = 42) -> None:
    """Apply the `--limits` draw to a loaded mteb retrieval task (every subset and split)."""
    if limits is None:
        return
    task.convert_v1_dataset_format_to_v2(num_proc=None)
    for subset in task.dataset.values():
        for split in subset.values():
            qrels = split["relevant_docs"]
            evaluable = [q for q in split["queries"]["id"] if qrels.get(q)]
            chosen = sample_queries(evaluable, limits, seed)
            keep = set(chosen)
            split["queries"] = split["queries"].select([i for i, q in enumerate(split["queries"]["id"]) if q in keep])
            split["relevant_docs"] = {q: qrels[q] for q in chosen}


def scores_of(result, task_name: str) -> tuple[dict[str, float], str]:
    """(numeric metrics, split) of one task in an mteb `ModelResult`; several subsets are averaged."""
    task_result = next(r for r in result.task_results if r.task_name == task_name)
    split, entries = next(iter(task_result.scores.items()))
    numeric: dict[str, list[float]] = {}
    for entry in entries:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                numeric.setdefault(key, []).append(float(value))
    return {k: float(np.mean(v)) for k, v in numeric.items() if k != "main_score"}, split


def run_mteb_task(model, task, *, limits: int | None = None, seed: int = 42, query_instruction: str | None = None,
                  batch_size: int = 32, max_length: int | None = None, dim: int | None = None,
                  cache: EmbeddingCache | bool | str | None = True, show_progress: bool = True
                  ) -> dict[str, Any]:
    """Evaluate with `mteb.evaluate` on `task` (an mteb task object or a task name); returns
    {"metrics", "split", "main_score", "task", "n_queries"}. mteb's own result cache is not used."""
    if isinstance(task, str):
        task = get_mteb_task(task)
    if isinstance(model, ModelMeta):  # mteb's own implementation: its prompts, its max length
        if query_instruction or dim or max_length:
            logger.warning("%s runs as mteb implements it: --query-instruction, --dim and --max-length are ignored",
                           model.name)
        encoder = model
    else:
        encoder = MtebEncoder(model, query_instruction=query_instruction, dim=dim, max_length=max_length,
                              cache=cache, show_progress=show_progress)
    n_queries = None
    if isinstance(task, AbsTaskRetrieval):
        if not isinstance(task, LocalRetrievalTask):
            try:
                task.load_data()
            except Exception as exc:  # the hub is unreachable, the dataset is gated, ...
                raise UserError(f"Could not load MTEB task {task.metadata.name!r} from the Hugging Face Hub "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                "MTEB tasks by name need network access the first time.") from exc
            limit_retrieval_queries(task, limits, seed)
        else:
            task.load_data()
        n_queries = sum(len(split["queries"]) for subset in task.dataset.values() for split in subset.values())
    elif limits is not None:
        logger.warning("--limits applies to retrieval tasks only; %s runs in full", task.metadata.name)
    try:
        result = mteb.evaluate(encoder, task, encode_kwargs={"batch_size": batch_size}, cache=None,
                               show_progress_bar=show_progress, overwrite_strategy="always")
    except UserError:
        raise
    except Exception as exc:
        if "hub" in type(exc).__name__.lower() or "connection" in str(exc).lower():
            raise UserError(f"MTEB task {task.metadata.name!r} needs the Hugging Face Hub, which is unreachable "
                            f"({type(exc).__name__}).") from exc
        raise
    metrics, split = scores_of(result, task.metadata.name)
    return {"metrics": metrics, "split": split, "main_score": task.metadata.main_score,
            "task": task.metadata.name, "n_queries": n_queries,
            "documents_from_cache": getattr(encoder, "documents_from_cache", 0)}
