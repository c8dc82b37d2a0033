"""Corpus-embedding cache: re-evaluating the same model on the same corpus skips encoding the corpus.

An entry is keyed by sha256 of (model fingerprint, corpus content hash, max length, instruction, dim, and the
compute precision an llm2emb model resolves to, and the backend of an ONNX graph); the model fingerprint
(for an ONNX graph: the graph file's sha256, `encoders.OnnxEncoder`) (`encoders.module_fingerprint`)
changes with the weights, so a trained model never reads its base model's vectors. Entries live under
`$LLM2EMB_HOME/cache/embeddings` as `<key>.npy` plus a small `<key>.json` describing them; writes are
atomic, and the oldest entries are pruned past `max_bytes`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llm2emb.atomic import atomic_path
from llm2emb.eval.data import texts_digest
from llm2emb.model.loading import llm2emb_home

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 4 << 30


def default_cache_dir() -> Path:
    return llm2emb_home() / "cache" / "embeddings"


class EmbeddingCache:
    """Arrays on disk, addressed by a key built from everything that decides them."""

    def __init__(self, root: str | os.PathLike[str] | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = max_bytes

    @staticmethod
    def key(**parts: Any) -> str:
        import hashlib

        blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def load(self, key: str, rows: int | None = None) -> np.ndarray | None:
        """The cached array, or None when absent, unreadable or of another row count."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache entry %s (%s)", path, exc)
            return None
        if rows is not None and array.shape[0] != rows:
            return None
        now = time.time()
        os.utime(path, (now, now))  # least recently used entries are pruned first
        return array

    def save(self, key: str, array: np.ndarray, meta: dict[str, Any] | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        for suffix, write in ((".json", lambda fh: fh.write(json.dumps(meta or {}, indent=1, default=str).encode())),
                              (".npy", lambda fh: np.save(fh, np.ascontiguousarray(array), allow_pickle=False))):
            with atomic_path(target.with_suffix(suffix)) as tmp, open(tmp, "wb") as fh:
                write(fh)
        self.prune()
        return target

    def prune(self) -> None:
        """Delete least recently used entries until the cache is under `max_bytes`."""
        entries = sorted(self.root.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        while entries and total > self.max_bytes:
            oldest = entries.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)
            oldest.with_suffix(".json").unlink(missing_ok=True)


def resolve_cache(cache: "EmbeddingCache | bool | str | os.PathLike[str] | None") -> EmbeddingCache | None:
    """True -> the default cache; False/None -> no cache; a path -> a cache rooted there."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return EmbeddingCache()
    if isinstance(cache, EmbeddingCache):
        return cache
    return EmbeddingCache(cache)


def compute_precision(encoder) -> str | None:
    """fp32 / bf16 / fp16 for an llm2emb model (an `EmbedderEncoder`), None for others. The fingerprint holds
    the setting, but `auto` means bf16 on one machine and fp32 on another: the key needs what it resolved to."""
    resolve = getattr(getattr(encoder, "embedder", None), "compute_precision", None)
    return resolve().name if callable(resolve) else None


def encode_cached(encoder, texts: Sequence[str], *, cache: EmbeddingCache | None, instruction: str | None = None,
                  batch_size: int = 32, max_length: int | None = None, show_progress: bool = False,
                  fingerprint: str | None = None, label: str = "") -> tuple[np.ndarray, bool]:
    """`encoder.encode(texts, ...)` through the cache; returns (vectors, whether they came from the cache)."""
    if cache is None:
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size, max_length=max_length,
                              show_progress=show_progress), False
    effective_length = max_length or getattr(encoder, "default_max_length", None)
    fingerprint = fingerprint or encoder.fingerprint()
    parts: dict[str, Any] = dict(model=fingerprint, texts=texts_digest(texts), n=len(texts),
                                 max_length=effective_length, instruction=instruction or "")
    precision = compute_precision(encoder)
    if precision is not None:  # only llm2emb models have one; other models keep their keys
        parts["precision"] = precision
    backend = getattr(encoder, "backend", None)
    if backend is not None:  # an ONNX graph (its fingerprint hashes the graph file); torch keys stay as they were
        parts["backend"] = backend
    key = cache.key(**parts)
    hit = cache.load(key, rows=len(texts))
    if hit is not None:
        logger.info("%s: %d embeddings read from the cache (%s)", label or "encode", len(texts), cache.path(key))
        return hit, True
    vectors = encoder.encode(texts, instruction=instruction, batch_size=batch_size, max_length=max_length,
                             show_progress=show_progress)
    from llm2emb.eval.distributed import is_main_process

    if not is_main_process():   # data-parallel evaluation: every process holds the vectors, one writes them
        return vectors, False
    cache.save(key, vectors, {"label": label, "model": getattr(encoder, "name", ""), "fingerprint": fingerprint,
                              "rows": len(texts), "max_length": effective_length, "instruction": instruction,
                              "precision": precision,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return vectors, False
