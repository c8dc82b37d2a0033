"""A sentence-transformers input module that runs a whole llm2emb `Embedder` (tokenise, backbone, pooling,
head), for exports whose recipe plain sentence-transformers modules cannot express (`st_format`'s
`native_route_blockers`): attention and latent-attention pooling, linear/MLP heads, an unmerged LoRA adapter
over a bidirectional model, or skip-instruction pooling with a query instruction whose sentence-transformers
prompt length differs from llm2emb's instruction prefix (text after the separator, e.g. "...Query: ").

It is referenced from an export's modules.json as `llm2emb.export.st_module.LLM2EmbModule`; the folder's
root is an ordinary Embedder folder, so the module simply loads it with `Embedder.from_pretrained`.
sentence-transformers >= 6 imports classes outside its own namespace only with `trust_remote_code=True`:

    SentenceTransformer(export_dir, trust_remote_code=True)   # needs `pip install llm2emb`

Sparse and multi-vector models take this route too (a decoder's LM-head SPLADE weights and llm2emb's token
sets have no plain-module equivalent): the folder then says `SparseEncoder` / `MultiVectorEncoder` and the module
fills what those classes read: `sentence_embedding` = the (B, vocab) weights, pruned to the query / document
top-k by the `task` that `encode_query` / `encode_document` pass; or `token_embeddings` = the unit token
vectors with `attention_mask` = the token set (instruction prefix and special tokens out), which
`MultiVectorEncoder.encode` uses to cut each text's vectors.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from sentence_transformers.base.modules.input_module import InputModule

from llm2emb.model.embedder import Embedder

CLASS_REF = "llm2emb.export.st_module.LLM2EmbModule"


class LLM2EmbModule(InputModule):
    """Texts -> `sentence_embedding` (un-normalised; a Normalize module follows), exactly as `Embedder.encode`.

    The ST prompt (e.g. the "query" prompt) is passed to `Embedder.tokenize` as the instruction, so the
    instruction is prepended as f"{prompt}{text}" and, with skip-instruction pooling, excluded from pooling
    up to the instruction separator, as in training."""

    save_in_root = True

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder
        if embedder.representation is not None:
            self.forward_kwargs = {"task"}  # "query" from encode_query: the query side's sparse top-k

    # ------------------------------------------------------------------ what sentence-transformers asks for
    @property
    def tokenizer(self):  # type: ignore[override]
        return self.embedder.tokenizer

    @property
    def max_seq_length(self) -> int:
        return self.embedder.config.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.embedder.config.max_length = int(value)

    def get_embedding_dimension(self) -> int:
        representation = self.embedder.representation
        if representation is None:
            return self.embedder.embedding_dim
        if "sparse" in representation.head_names:
            return representation.vocab_size
        return representation.options.token_dim

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        texts = list(inputs)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"LLM2EmbModule embeds text only; input {i} is a {type(text).__name__}.")
        encoded = self.embedder.tokenize(texts, instruction=prompt or None)
        return self.embedder.collate(encoded.input_ids, encoded.prefix_lengths)

    def forward(self, features: dict[str, Any], task: str | None = None, **kwargs: Any) -> dict[str, Any]:
        out = self.embedder(features["input_ids"], features["attention_mask"], features.get("prefix_lengths"))
        representation = self.embedder.representation
        if representation is None:
            features["sentence_embedding"] = out
        elif "sparse" in out:
            from llm2emb.model.representations.encoding import prune_top_k

            options = representation.options
            weights = out["sparse"]
            values, indices = prune_top_k(weights, options.sparse_query_top_k if task == "query"
                                          else options.sparse_doc_top_k)
            # no pruning (k = 0): prune_top_k hands the weights back as they are
            features["sentence_embedding"] = (weights if values is weights
                                              else torch.zeros_like(weights).scatter(1, indices, values))
        else:
            features["token_embeddings"] = out["multi_vector"]
            features["attention_mask"] = out["multi_vector_mask"]
        return features

    # ------------------------------------------------------------------ persistence
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the Embedder files into `output_path`, leaving the other modules' files there alone."""
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.llm2emb-"))
        try:
            self.embedder.save(staging / "model")
            for item in (staging / "model").iterdir():
                target = out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None,
             cache_folder: str | None = None, revision: str | None = None, local_files_only: bool = False,
             **kwargs: Any) -> "LLM2EmbModule":
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                   revision=revision, local_files_only=local_files_only)
        model_kwargs = kwargs.get("model_kwargs") or {}
        dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        return cls(Embedder.from_pretrained(folder, dtype=dtype if isinstance(dtype, str) and dtype != "auto"
                                            else None))

    def __repr__(self) -> str:
        cfg = self.embedder.config
        return (f"LLM2EmbModule(base_model={cfg.base_model!r}, pooling={cfg.pooling!r}, "
                f"bidirectional={cfg.bidirectional}, skip_instruction={cfg.skip_instruction}, head={cfg.head!r}, "
                f"dim={self.embedder.embedding_dim}, max_length={cfg.max_length})")
