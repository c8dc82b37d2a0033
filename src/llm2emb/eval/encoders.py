"""What the evaluators need from a model: `encode(texts, instruction=...) -> unit vectors` and a fingerprint.

`as_encoder` wraps an llm2emb `Embedder` or a `sentence_transformers.SentenceTransformer` (anything else
with the `TextEncoder` methods passes through), so every evaluator and the mteb adapter take either.

The fingerprint identifies the vectors a model produces: it hashes the settings that change them and, per
weight tensor, its name, shape, dtype, exact float64 sum and a strided sample of values. Any training step
changes it; loading the same weights again gives the same fingerprint. Used as the embedding cache key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from llm2emb.errors import UserError

#: values sampled per tensor for the fingerprint (besides its exact sum)
FINGERPRINT_SAMPLES = 64


@runtime_checkable
class TextEncoder(Protocol):
    """The interface the evaluators use. Vectors are L2-normalised float32 rows in input order."""

    name: str
    default_max_length: int | None

    def encode(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
               max_length: int | None = None, show_progress: bool = False) -> np.ndarray: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def module_fingerprint(module, extra: dict[str, Any] | None = None) -> str:
    """sha256 over `extra` (JSON) and every tensor of `module.state_dict()`: name, shape, dtype, float64 sum
    and `FINGERPRINT_SAMPLES` strided values. One pass over the weights; no copy of a whole tensor."""
    import torch

    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not isinstance(tensor, torch.Tensor):
                continue
            flat = tensor.detach().reshape(-1)
            if flat.numel() == 0:
                total = 0.0
            elif flat.is_floating_point():
                total = torch.sum(flat, dtype=torch.float64).item()
            else:
                total = float(flat.sum().item())
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            sample = flat[::step][:FINGERPRINT_SAMPLES].float().cpu().numpy().tobytes()
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total!r}|".encode())
            digest.update(sample)
    return digest.hexdigest()


class EmbedderEncoder:
    """An llm2emb `Embedder` as a `TextEncoder`; `dim` truncates (Matryoshka) before normalising."""

    def __init__(self, embedder, dim: int | None = None, name: str | None = None,
                 shared: dict | None = None) -> None:
        self.embedder = embedder
        self.dim = dim
        # Full-size vectors by (texts, instruction, max length), shared by encoders of one model at several
        # Matryoshka dims: truncating a unit vector and re-normalising equals truncating before normalising.
        self.shared = shared
        if dim is not None and (dim <= 0 or dim > embedder.embedding_dim):
            raise UserError(f"--dim {dim} is out of range: this model's embeddings have "
                            f"{embedder.embedding_dim} dimensions.")
        self.name = name or str(embedder.config.base_model or "embedder")
        self.default_max_length = int(embedder.config.max_length)
        self.default_query_instruction = embedder.config.query_instruction

    def encode(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
               max_length: int | None = None, show_progress: bool = False) -> np.ndarray:
        from llm2emb.eval.distributed import encode_data_parallel   # N processes: each encodes its shard

        if self.shared is None:
            return encode_data_parallel(lambda part: self.embedder.encode(
                part, instruction=instruction, batch_size=batch_size, normalize=True, dim=self.dim,
                show_progress=show_progress, max_length=max_length), texts)
        from llm2emb.eval.data import texts_digest

        key = (texts_digest(list(texts)), instruction, max_length)
        if key not in self.shared:
            self.shared[key] = encode_data_parallel(lambda part: self.embedder.encode(
                part, instruction=instruction, batch_size=batch_size, normalize=True, show_progress=show_progress,
                max_length=max_length), texts)
        full = self.shared[key]
        if self.dim is None:
            return full
        out = full[:, :self.dim]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def settings(self) -> dict[str, Any]:
        config = asdict(self.embedder.config)
        config.pop("query_instruction", None)  # only chooses a default; the caller passes the instruction
        if config.get("representation", "dense") == "dense":  # fingerprints of dense models as before the field
            config.pop("representation", None)
            config.pop("representation_options", None)
        from llm2emb.model.summary_token import uses_summary_token

        if not uses_summary_token(config.get("pooling", "eos")):  # fingerprints as before the cls fields
            for name in ("summary_token", "summary_token_position", "summary_token_init", "summary_token_id"):
                config.pop(name, None)
        return config

    def fingerprint(self) -> str:
        tok = self.embedder.tokenizer
        extra = {"kind": "llm2emb", "config": self.settings(), "dim": self.dim,
                 "tokenizer": [type(tok).__name__, len(tok), tok.eos_token_id, tok.pad_token_id,
                               getattr(tok, "padding_side", None)]}
        return module_fingerprint(self.embedder, extra)

    def describe(self) -> dict[str, Any]:
        config = self.embedder.config
        return {"kind": "llm2emb", "base_model": config.base_model, "pooling": config.pooling,
                "bidirectional": config.bidirectional, "skip_instruction": config.skip_instruction,
                "instruction_separator": config.instruction_separator, "head": config.head,
                "max_length": config.max_length, "dtype": config.dtype, "lora": self.embedder.is_lora,
                "embedding_dim": self.dim or self.embedder.embedding_dim, "representation": "dense"}


class OnnxEncoder(EmbedderEncoder):
    """An exported ONNX graph (`llm2emb.model.onnx_embedder.OnnxEmbedder`) as a `TextEncoder`. Its fingerprint
    is the graph file's sha256 with the settings and tokenizer, never the torch weights', so the embedding
    cache keeps ONNX and torch vectors apart."""

    backend = "onnx"

    def fingerprint(self) -> str:
        tok = self.embedder.tokenizer
        extra = {"kind": "llm2emb-onnx", "config": self.settings(), "dim": self.dim, "file": self.embedder.file_name,
                 "graph_sha256": self.embedder.graph_sha256,
                 "tokenizer": [type(tok).__name__, len(tok), tok.eos_token_id, tok.pad_token_id,
                               getattr(tok, "padding_side", None)]}
        return hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        config = self.embedder.config
        return {"kind": "llm2emb", "backend": "onnx", "onnx_file": self.embedder.file_name,
                "graph_sha256": self.embedder.graph_sha256, "base_model": config.base_model,
                "pooling": config.pooling, "bidirectional": config.bidirectional,
                "skip_instruction": config.skip_instruction, "max_length": config.max_length,
                "embedding_dim": self.dim or self.embedder.embedding_dim, "representation": "dense"}


class SentenceTransformerEncoder:
    """A `sentence_transformers.SentenceTransformer` as a `TextEncoder` (instruction prepended as text)."""

    def __init__(self, model, dim: int | None = None, name: str | None = None) -> None:
        self.model = model
        self.dim = dim
        card = getattr(model, "model_card_data", None)
        self.name = name or str(getattr(card, "base_model", None) or "sentence-transformers")
        self.default_max_length = getattr(model, "max_seq_length", None)
        self.default_query_instruction = None

    def encode(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
               max_length: int | None = None, show_progress: bool = False) -> np.ndarray:
        texts = [f"{instruction}{t}" for t in texts] if instruction else list(texts)
        previous = self.model.max_seq_length
        if max_length is not None:
            self.model.max_seq_length = max_length
        try:
            out = self.model.encode(texts, batch_size=batch_size, show_progress_bar=show_progress,
                                    convert_to_numpy=True, normalize_embeddings=self.dim is None,
                                    truncate_dim=self.dim)
        finally:
            self.model.max_seq_length = previous
        out = np.asarray(out, dtype=np.float32)
        if self.dim is not None:  # re-normalise after truncation, as Embedder.encode(dim=...) does
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def fingerprint(self) -> str:
        extra = {"kind": "sentence-transformers", "modules": [type(m).__name__ for m in self.model],
                 "max_seq_length": self.model.max_seq_length, "dim": self.dim}
        return module_fingerprint(self.model, extra)

    def describe(self) -> dict[str, Any]:
        return {"kind": "sentence-transformers", "base_model": self.name, "max_length": self.model.max_seq_length,
                "modules": [type(m).__name__ for m in self.model],
                "embedding_dim": self.dim or self.model.get_sentence_embedding_dimension()}


def as_encoder(model, dim: int | None = None, name: str | None = None) -> TextEncoder:
    """Wrap an `Embedder` or a `SentenceTransformer`; a `TextEncoder` is returned as is."""
    from llm2emb.model.embedder import Embedder

    if isinstance(model, Embedder) and getattr(model, "representation", None) is not None:  # non-dense
        from llm2emb.eval.representations import RepresentationEncoder

        return RepresentationEncoder(model, dim=dim, name=name)
    if isinstance(model, Embedder):
        return EmbedderEncoder(model, dim=dim, name=name)
    if getattr(model, "backend", None) == "onnx" and hasattr(model, "graph_sha256"):   # OnnxEmbedder
        return OnnxEncoder(model, dim=dim, name=name)
    if isinstance(model, (EmbedderEncoder, SentenceTransformerEncoder)) or hasattr(model, "encode_heads"):
        return model
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - optional dependency
        SentenceTransformer = None  # type: ignore[assignment]
    if SentenceTransformer is not None and isinstance(model, SentenceTransformer):
        return SentenceTransformerEncoder(model, dim=dim, name=name)
    if isinstance(model, TextEncoder):
        return model
    raise TypeError(f"cannot evaluate a {type(model).__name__}: pass an llm2emb Embedder, a "
                    "SentenceTransformer, or an object with encode(texts, instruction=...) and fingerprint()")
