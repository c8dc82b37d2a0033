"""Masked next-token prediction (LLM2Vec): which tokens are masked, the loss against a direct computation with
the causal LM's own head (tied and untied), 2 processes = 1 process, training runs (bidirectional LoRA, loss
falls, masked-token accuracy logged), exact resume, and the settings MNTP refuses."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from llm2emb.train.encode import EncodedBatch
from llm2emb.train.mntp import MaskedNextTokenPrediction, draw_mask, mask_seed, mask_token_id
from test_train_support import (prepare_data, quick_overrides, read_metrics, rewind_to_checkpoint, trainable_state,
                                write_raw_data)
from two_process import process_group, run_two_processes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOS, EOS, PAD = 1, 2, 2


def _embedder(model: Path, **kwargs):
    from llm2emb.model.embedder import Embedder

    torch.manual_seed(0)
    return Embedder.from_pretrained(model, pooling="mean", bidirectional=True, max_length=32, **kwargs)


def _texts(seed: int, rows: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(20, 300, (int(torch.randint(2, 12, (1,), generator=gen)),), generator=gen).tolist()
            + [EOS] for _ in range(rows)]


def _batch(embedder, rows: int = 6, seed: int = 0) -> EncodedBatch:
    queries, passages = _texts(seed, rows), _texts(seed + 1, rows)
    return EncodedBatch(embedder.collate(queries, [3] * rows), embedder.collate(passages), None, 0, True, "d", rows)


def _direct_loss(model_dir: Path, embedder, batch: EncodedBatch, seed: int, probability: float) -> torch.Tensor:
    """The same masks, scored by the causal LM (AutoModelForCausalLM with its own head) made bidirectional
    exactly as the Embedder is: -mean log p(x_i | logits at i-1) over the masked positions."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    lm.model = embedder.backbone  # the Embedder's (bidirectional) decoder under the checkpoint's LM head
    module = MaskedNextTokenPrediction(embedder, str(model_dir), probability)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for part in (batch.queries, batch.passages):
        ids, mask = part["input_ids"], part["attention_mask"]
        chosen = draw_mask(ids, mask, part.get("prefix_lengths"), module.special_ids, probability, generator)
        masked = torch.where(chosen, module.mask_id, ids)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = lm(input_ids=masked, attention_mask=mask, position_ids=position_ids).logits
        for b, i in chosen.nonzero().tolist():
            losses.append(F.cross_entropy(logits[b, i - 1], ids[b, i]))
    return torch.stack(losses).mean()


def test_masks_only_content_tokens_with_a_token_before_them(tiny_model):
    embedder = _embedder(tiny_model)
    for side in ("right", "left"):
        embedder.config.padding_side = side
        batch = _batch(embedder, rows=8)
        ids, mask, prefix = batch.queries["input_ids"], batch.queries["attention_mask"], batch.queries["prefix_lengths"]
        chosen = draw_mask(ids, mask, prefix, [BOS, EOS], 0.999, torch.Generator().manual_seed(1))
        for b in range(ids.size(0)):
            real = mask[b].nonzero().flatten().tolist()
            first = real[0]
            expected = [i for i in real if i >= first + 3 and int(ids[b, i]) not in (BOS, EOS)]
            assert chosen[b].nonzero().flatten().tolist() == expected  # prefix (3 tokens), BOS, EOS, pads left out
    share = draw_mask(ids, mask, None, [BOS, EOS], 0.3, torch.Generator().manual_seed(2)).sum() / (mask.sum() - 16)
    assert 0.1 < float(share) < 0.5
    # same seed, same masks
    a = draw_mask(ids, mask, None, [], 0.3, torch.Generator().manual_seed(mask_seed(5, 7, 0)))
    b = draw_mask(ids, mask, None, [], 0.3, torch.Generator().manual_seed(mask_seed(5, 7, 0)))
    c = draw_mask(ids, mask, None, [], 0.3, torch.Generator().manual_seed(mask_seed(5, 8, 0)))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("tied", [True, False])
def test_loss_equals_the_causal_lm_cross_entropy_at_the_previous_position(tiny_model, untied_model, tied):
    model = tiny_model if tied else untied_model
    embedder = _embedder(model)
    embedder.eval()
    batch = _batch(embedder)
    module = MaskedNextTokenPrediction(embedder, str(model), 0.4)
    assert module.tied is tied
    with torch.no_grad():
        out = module(batch, seed=123)
        expected = _direct_loss(model, embedder, batch, 123, 0.4)
    torch.testing.assert_close(out.total, expected, rtol=1e-5, atol=1e-6)
    assert out.parts["masked_tokens"] > 5 and 0 <= out.parts["mntp_accuracy"] <= 1


def test_mask_token_setting(tiny_model):
    embedder = _embedder(tiny_model)
    tok = embedder.tokenizer
    assert tok.mask_token_id is None and mask_token_id(tok, "auto") == tok.get_vocab()["_"]
    assert mask_token_id(tok, "<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(UserError, match="mntp_mask_token 'two words' is 2 tokens"):
        mask_token_id(tok, "two words")


def _two_process_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """Each process takes its own (uneven) share of the rows and its own masks, as the trainer does."""
    with process_group(rank, world, init_method):
        model = Path(out_dir) / "model"
        embedder = _embedder(model)
        module = torch.nn.parallel.DistributedDataParallel(MaskedNextTokenPrediction(embedder, str(model), 0.4))
        rows = (slice(0, 2), slice(2, 7))[rank]
        whole = _batch(embedder, rows=7)
        part = EncodedBatch(*(_rows(x, rows) for x in (whole.queries, whole.passages)), None, 0, True, "d",
                            rows.stop - rows.start)
        module(part, seed=10 + rank).total.backward()
        torch.save({n: p.grad for n, p in module.module.named_parameters() if p.grad is not None},
                   Path(out_dir) / f"rank{rank}.pt")


def _rows(inputs: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in inputs.items()}


def test_two_processes_give_the_one_process_gradient(tiny_model, tmp_path):
    """One process over all rows, with each row masked as its process masked it, equals DDP's average."""
    shutil.copytree(tiny_model, tmp_path / "model")
    grads = run_two_processes(_two_process_worker, tmp_path)
    averaged = {k: (grads[0][k] + grads[1][k]) / 2 for k in grads[0]}

    embedder = _embedder(tmp_path / "model")
    module = MaskedNextTokenPrediction(embedder, str(tmp_path / "model"), 0.4)
    whole = _batch(embedder, rows=7)
    # the masks each process drew, applied to one process's forward over all rows: concatenating the two
    # processes' masked positions gives one sum over all of them divided by the total count
    parts = [EncodedBatch(*(_rows(x, r) for x in (whole.queries, whole.passages)), None, 0, True, "d", r.stop - r.start)
             for r in (slice(0, 2), slice(2, 7))]
    outs = [module(p, seed=10 + i) for i, p in enumerate(parts)]
    counts = [out.parts["masked_tokens"] for out in outs]
    total = sum(out.total * n for out, n in zip(outs, counts)) / sum(counts)
    total.backward()
    single = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert single.keys() == averaged.keys() and single
    for name in single:
        torch.testing.assert_close(averaged[name], single[name], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


def _train(cfg):
    from llm2emb.train import train

    return train(cfg, show_progress=False)


def test_bidirectional_lora_mntp_run_learns_and_resumes_exactly(tiny_model, prepared, tmp_path):
    extra = dict(steps=6, checkpointing_steps=3, validation_steps=3, lora_enabled=True, lora_dropout=0.0,
                 bi_attn_enabled=True, pooling_mode="mean", mntp_mask_probability=0.3, learning_rate=5e-3,
                 warmup_steps=0, lr_scheduler="constant")
    full = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path / "a", **extra))
    _train(full)
    metrics = read_metrics(full.run_dir)
    train_lines = [m for m in metrics if m["type"] == "train"]
    assert all("mntp_accuracy" in m and m["masked_tokens"] > 0 for m in train_lines)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    validation = [m["loss"] for m in metrics if m["type"] == "validation"]
    assert len(validation) == 2 and validation[1] < validation[0]  # same masks at both validations

    crashed = load_train_config(None, quick_overrides(tiny_model, prepared, tmp_path / "b", **extra))
    _train(crashed)
    run = crashed.run_dir
    rewind_to_checkpoint(run, 6)  # killed after the step-3 checkpoint
    result = _train(crashed)
    assert result.resumed_from == 3
    a, b = trainable_state(full.run_dir / "final"), trainable_state(run / "final")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fields, message", [
    ({"mntp_mask_probability": 1.0}, "field 'mntp_mask_probability' must be in \\[0, 1\\)"),
    ({"mntp_mask_probability": 0.2, "grad_cache_chunk_size": 4}, "field 'grad_cache_chunk_size' is set together"),
])
def test_bad_settings_are_refused_by_the_config(fields, message):
    with pytest.raises(UserError, match=message):
        load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", **fields)


def test_trainable_pooling_and_models_without_lm_head_are_refused(tiny_model, untied_model, tmp_path):
    from llm2emb.model.embedder import Embedder

    with pytest.raises(UserError, match="own trainable pooling"):
        MaskedNextTokenPrediction(Embedder.from_pretrained(tiny_model, pooling="latent_attention"), str(tiny_model),
                                  0.2)
    no_head = tmp_path / "no_head"
    shutil.copytree(untied_model, no_head)
    from safetensors.torch import load_file, save_file

    state = load_file(str(no_head / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(no_head / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match="has no LM head"):
        MaskedNextTokenPrediction(_embedder(no_head), str(no_head), 0.2)
