"""A distillation teacher run at every step (`teacher_model`), instead of teacher columns computed once into the
prepared data (`llm2emb.pipeline.teacher`).

The teacher is anything `llm2emb eval --model` loads (an llm2emb run or Embedder folder, a sentence-transformers
model, a built-in alias), frozen and in eval mode. Each step it embeds the batch's texts: the student's token ids
decoded back to text (special tokens dropped), the query with its dataset's instruction (`teacher_instructions`,
as the precomputed columns have it) or without. The instruction is handed to the teacher's `encode(...,
instruction=...)` separately from the query, so a teacher with skip-instruction pooling excludes it as it does
in evaluation (one string would have it pool over its instruction). The vectors are L2-normalised, as in the precomputed columns,
and reach the losses as the same `TeacherBatch`, so distill_kl / margin_mse / embedding_mse behave the same
either way. It costs a teacher forward per step (no disk, no preparation); a fixed teacher over many epochs
is cheaper precomputed.

Decoding is exact for the byte-level BPE tokenizers of the built-in models; a tokenizer that normalises text
(lower-casing, accents) hands the teacher the normalised text.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from llm2emb.errors import UserError
from llm2emb.losses.registry import TeacherBatch

logger = logging.getLogger(__name__)


class OnTheFlyTeacher:
    """teacher(batch: TrainBatch) -> TeacherBatch of L2-normalised teacher embeddings (CPU float32)."""

    def __init__(self, source: str, student_tokenizer, *, instructions: bool = True, max_length: int | None = None,
                 batch_size: int = 64, device: str | None = None,
                 dataset_instructions: dict[str, str] | None = None) -> None:
        from llm2emb.eval.encoders import as_encoder
        from llm2emb.eval.loading import load_eval_model

        logger.info("loading the on-the-fly teacher %s", source)
        from llm2emb.model.precision import ENCODE_DEFAULT

        loaded = load_eval_model(source, device=device, default_precision=ENCODE_DEFAULT)
        if loaded.kind == "mteb":
            raise UserError(f"teacher_model {source!r} is an mteb model reference; a teacher must be a local or hub "
                            "model that encodes texts (an llm2emb run or Embedder folder, a sentence-transformers "
                            "model).")
        model = loaded.model
        if hasattr(model, "eval"):
            model.eval()
        for param in getattr(model, "parameters", lambda: [])():
            param.requires_grad_(False)
        self.encoder = as_encoder(model)
        self.tokenizer = student_tokenizer
        self.instructions = instructions
        #: dataset -> the instruction its queries were prepared with (the prepared data's manifest)
        self.dataset_instructions = dict(dataset_instructions or {})
        self._warned: set[str] = set()
        self.max_length = max_length
        self.batch_size = batch_size

    def texts(self, id_lists: Sequence[Sequence[int]], prefix_lengths: Sequence[int] | None = None) -> list[str]:
        """The student's token ids as text; without the instruction prefix when `prefix_lengths` is given."""
        if prefix_lengths is not None:
            id_lists = [ids[p:] for ids, p in zip(id_lists, prefix_lengths)]
        return self.tokenizer.batch_decode([list(ids) for ids in id_lists], skip_special_tokens=True)

    def _embed(self, texts: list[str], instruction: str | None = None) -> torch.Tensor:
        distinct = list(dict.fromkeys(texts))
        vectors = self.encoder.encode(distinct, instruction=instruction or None, batch_size=self.batch_size,
                                      max_length=self.max_length)
        row = {text: i for i, text in enumerate(distinct)}
        return torch.from_numpy(vectors[[row[t] for t in texts]]).float()

    def queries(self, batch) -> tuple[list[str], str | None]:
        """(query texts, the instruction to hand the teacher separately) of a batch; see the module docstring."""
        if not self.instructions:
            return self.texts(batch.query_ids, batch.query_prefix_lengths), None
        texts = self.texts(batch.query_ids)
        instruction = self.dataset_instructions.get(getattr(batch, "dataset", ""), "")
        if instruction and all(t.startswith(instruction) for t in texts):
            return [t[len(instruction):] for t in texts], instruction
        if instruction and batch.dataset not in self._warned:
            self._warned.add(batch.dataset)
            logger.warning("on-the-fly teacher: the decoded queries of %s do not start with its instruction %r "
                           "(the tokenizer normalises text); the teacher gets instruction and query as one text",
                           batch.dataset, instruction)
        return texts, None

    def __call__(self, batch) -> TeacherBatch:
        queries, instruction = self.queries(batch)
        q = self._embed(queries, instruction)
        p = self._embed(self.texts(batch.passage_ids))
        n = None
        k = batch.num_negatives if batch.negative_ids else 0
        if k:
            n = self._embed(self.texts(batch.negative_ids)).view(len(queries), k, -1)
        return TeacherBatch(q=q, p=p, n=n)
