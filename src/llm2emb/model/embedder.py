"""`Embedder`: a decoder LLM backbone + pooling + optional head, with `encode`, `save` and `from_pretrained`.

Saved folder layout (loads with `Embedder.from_pretrained(path)`):
    llm2emb_config.json        pooling / attention / instruction settings (`EmbedderConfig`)
    config.json, *.safetensors, tokenizer files     the backbone (full or LoRA-merged)
      or adapter_config.json + adapter_model.safetensors with `base_model` in llm2emb_config.json (LoRA)
    modules.safetensors        trainable pooling / head weights, when there are any
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from llm2emb.model.input_strategies import get_input_strategy
from llm2emb.model.tokenization import encode_texts, instruction_prefix_end, resolve_end_tokens
from llm2emb.atomic import atomic_dir
from llm2emb.errors import UserError, did_you_mean
from llm2emb.layout import EMBEDDER_CONFIG, EMBEDDER_MODULES
from llm2emb.model import bidirectional as bidi
from llm2emb.model.heads import build_head
from llm2emb.model.loading import check_model_files, load_config, load_tokenizer, resolve_model_path
from llm2emb.model import varlen
from llm2emb.model.pooling import build_pooling
from llm2emb.model.representations import build_representation
from llm2emb.model import summary_token as summary
from llm2emb.model.summary_token import DEFAULT_SUMMARY_TOKEN
from llm2emb.model.precision import Precision, autocast, canonical_precision, log_choice, resolve_precision

logger = logging.getLogger(__name__)

CONFIG_NAME = EMBEDDER_CONFIG
MODULES_NAME = EMBEDDER_MODULES
ENCODE_FLUSH_BATCHES = 8  # on an accelerator: batches of vectors kept on the device before one host copy
#: what runs an Embedder folder: torch (this class) or its exported ONNX graph (model/onnx_embedder.py)
BACKENDS = ("torch", "onnx")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@contextmanager
def _peft_wrapping():
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, which
    prints a FutureWarning that says nothing to our users; silence just that one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@dataclass
class EmbedderConfig:
    """Everything besides weights that decides what vector a text gets."""

    base_model: str = ""                 # what the backbone came from (alias, hub id, path)
    pooling: str = "eos"
    bidirectional: bool = False
    skip_instruction: bool = False
    instruction_separator: str = "Query:"
    head: str | None = None
    head_dim: int | None = None
    max_length: int = 512
    dtype: str = "float32"
    # compute precision of encode() (llm2emb.model.precision): fp32 by default, so a saved model gives the
    # same vectors on every machine; auto / bf16 are faster where bf16 is native, with vectors close to fp32's
    precision: str = "fp32"
    attn_implementation: str = "sdpa"
    padding_side: str = "right"
    query_instruction: str | None = None  # default instruction for queries (eval, export prompts)
    end_token: str = "auto"               # what ends every text (llm2emb.model.tokenization)
    end_token_ids: list[int] | None = None  # resolved when saved, so a changed tokenizer is noticed
    # how a text becomes model input and which positions are pooled (llm2emb.model.input_strategies)
    input_strategy: str = "plain"
    # pooling cls: the summary token (llm2emb.model.summary_token), its position (auto | start | end; saved
    # resolved), the rule that initialises its new embedding row, and its id (resolved when saved)
    summary_token: str = DEFAULT_SUMMARY_TOKEN
    summary_token_position: str = "auto"
    summary_token_init: str = "mean"
    summary_token_id: int | None = None
    pooling_kwargs: dict[str, Any] = field(default_factory=dict)
    # dense | multi_vector | sparse | hybrid (llm2emb.model.representations) and its options
    representation: str = "dense"
    representation_options: dict[str, Any] = field(default_factory=dict)
    lora_adapter: bool = False            # True: folder holds a peft adapter over `base_model`
    format_version: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EmbedderConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Embedder(nn.Module):
    """Text -> vector with a decoder LLM. Build with `Embedder.from_pretrained`."""

    def __init__(self, backbone: nn.Module, tokenizer, config: EmbedderConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.config = config
        end_tokens = list(resolve_end_tokens(tokenizer, config.end_token))
        if config.end_token_ids is not None and list(config.end_token_ids) != end_tokens:
            logger.warning("this model was saved with end tokens %s but its tokenizer now gives %s for "
                           "end_token=%r; vectors may differ from the saved model's", config.end_token_ids,
                           end_tokens, config.end_token)
        config.end_token_ids = end_tokens
        self.input_strategy = get_input_strategy(config.input_strategy)
        self.input_strategy.check(pooling=config.pooling, bidirectional=config.bidirectional,
                                  representation=config.representation, source="Embedder")
        position = summary.check_settings(
            pooling=config.pooling, bidirectional=config.bidirectional, representation=config.representation,
            input_strategy=config.input_strategy, token=config.summary_token,
            position=config.summary_token_position, init=config.summary_token_init, source="Embedder")
        pooling_extra: dict[str, Any] = {}
        if position is not None:
            self._attach_summary_token(position)
            pooling_extra["index"] = summary.summary_index(tokenizer, position)
        hidden = self.hidden_size
        self.pooling = build_pooling(config.pooling, hidden, **{**config.pooling_kwargs, **pooling_extra})
        self.head = build_head(config.head, hidden, config.head_dim)
        dtype = DTYPES[config.dtype]
        self.pooling.to(dtype)
        if self.head is not None:
            self.head.to(dtype)
        # None for dense: pooling + head above are the whole model (llm2emb.model.representations)
        self.representation = build_representation(config.representation, self, config.representation_options)
        if self.representation is not None:
            config.representation_options = self.representation.options.to_dict()

    def _attach_summary_token(self, position: str) -> None:
        """Add the summary token to the tokenizer and give it an embedding row (see model/summary_token.py)."""
        config = self.config
        token_id, added = summary.add_to_tokenizer(self.tokenizer, config.summary_token, config.summary_token_id,
                                                   source=f"summary_token of {config.base_model or 'the model'}")
        if added or token_id >= self.backbone.get_input_embeddings().num_embeddings:
            summary.init_embedding_row(self.backbone, token_id, config.summary_token_init, self.tokenizer,
                                       source="summary_token_init")
        config.summary_token_position = position
        config.summary_token_id = token_id

    @property
    def summary_token_id(self) -> int | None:
        """The id of the summary token this model inserts into every text (pooling cls), else None."""
        return self.config.summary_token_id if getattr(self.pooling, "uses_summary_token", False) else None

    @property
    def tail_length(self) -> int:
        """How many tokens every plain text ends with (the end tokens, then a summary token placed at the end):
        what a later cut to fewer tokens must keep last."""
        at_end = self.summary_token_id is not None and self.config.summary_token_position == "end"
        return len(self.config.end_token_ids or []) + int(at_end)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_path: str | os.PathLike[str], pooling: str | None = None,
                        bidirectional: bool | None = None, skip_instruction: bool | None = None,
                        instruction_separator: str | None = None, head: str | None = None,
                        head_dim: int | None = None, max_length: int | None = None, dtype: str | None = None,
                        attn_implementation: str | None = None, padding_side: str | None = None,
                        query_instruction: str | None = None, device: str | torch.device | None = None,
                        pooling_kwargs: dict[str, Any] | None = None, end_token: str | None = None,
                        precision: str | None = None, representation: str | None = None,
                        representation_options: dict[str, Any] | None = None, backend: str = "torch",
                        onnx_file: str | None = None, input_strategy: str | None = None,
                        summary_token: str | None = None, summary_token_position: str | None = None,
                        summary_token_init: str | None = None) -> "Embedder":
        """Load a saved Embedder folder, or any decoder LLM (hub id, local folder, .gguf, built-in alias).

        `backend="onnx"` loads the ONNX graph of an `llm2emb export --onnx` folder instead (`onnx_file`, default
        onnx/model.onnx, e.g. onnx/model_qint8_avx512_vnni.onnx) and returns an
        `llm2emb.model.onnx_embedder.OnnxEmbedder` with the same `encode`; only max_length, query_instruction and
        padding_side may then be overridden (the rest is fixed in the graph).

        Arguments left as None keep the saved folder's setting, or the defaults for a raw LLM:
        pooling="eos", bidirectional=False, skip_instruction=False, instruction_separator="Query:",
        head=None, max_length=512, dtype="float32", attn_implementation="sdpa", padding_side="right",
        precision="fp32" (encode's compute precision: auto | fp32 | bf16 | fp16, see llm2emb.model.precision),
        summary_token="<|embed|>", summary_token_position="auto", summary_token_init="mean" (pooling "cls" only,
        see llm2emb.model.summary_token)."""
        if backend not in BACKENDS:
            raise UserError(f"Unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}."
                            + did_you_mean(backend, BACKENDS))
        if backend == "onnx":
            fixed = dict(pooling=pooling, bidirectional=bidirectional, skip_instruction=skip_instruction,
                         instruction_separator=instruction_separator, head=head, head_dim=head_dim, dtype=dtype,
                         attn_implementation=attn_implementation, pooling_kwargs=pooling_kwargs,
                         end_token=end_token, precision=precision, representation=representation,
                         representation_options=representation_options, summary_token=summary_token,
                         summary_token_position=summary_token_position, summary_token_init=summary_token_init)
            given = sorted(k for k, v in fixed.items()
                           if v is not None and not (k == "precision" and v in ("auto", "fp32")))
            if given:
                raise UserError(f"backend='onnx' runs the exported graph as it is; {', '.join(given)} cannot be "
                                "changed there (export again with the setting, or use backend='torch').")
            from llm2emb.model.onnx_embedder import OnnxEmbedder

            return OnnxEmbedder.from_pretrained(model_path, onnx_file, max_length=max_length,
                                                query_instruction=query_instruction, padding_side=padding_side)
        if onnx_file is not None:
            raise UserError("onnx_file applies to backend='onnx' only.")
        overrides = {k: v for k, v in dict(
            pooling=pooling, bidirectional=bidirectional, skip_instruction=skip_instruction,
            instruction_separator=instruction_separator, head=head, head_dim=head_dim, max_length=max_length,
            dtype=dtype, attn_implementation=attn_implementation, padding_side=padding_side,
            query_instruction=query_instruction, pooling_kwargs=pooling_kwargs,
            end_token=end_token, precision=precision, representation=representation,
            representation_options=representation_options, input_strategy=input_strategy,
            summary_token=summary_token, summary_token_position=summary_token_position,
            summary_token_init=summary_token_init).items() if v is not None}
        if precision is not None:
            overrides["precision"] = canonical_precision(precision)
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"Unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
        if padding_side is not None and padding_side not in ("left", "right"):
            raise UserError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        local = Path(str(model_path)).expanduser()
        if (local / CONFIG_NAME).exists():
            check_model_files(local)
            saved = json.loads((local / CONFIG_NAME).read_text())
            if "end_token" in overrides:  # a new setting: the saved resolution no longer applies
                saved.pop("end_token_ids", None)
            if overrides.get("summary_token", saved.get("summary_token")) != saved.get("summary_token"):
                saved.pop("summary_token_id", None)
            config = EmbedderConfig.from_dict({**saved, **overrides})
            if config.lora_adapter:
                return cls._load_with_adapter(local, config, device)
            resolved = str(local)
        else:
            base = str(local.resolve()) if local.exists() else str(model_path)
            config = EmbedderConfig.from_dict({"base_model": base, **overrides})
            resolved = resolve_model_path(model_path)
        embedder = cls._build(resolved, config, device)
        if (local / MODULES_NAME).exists():
            embedder._load_modules(local / MODULES_NAME)
        return embedder

    @classmethod
    def _build(cls, resolved: str, config: EmbedderConfig, device=None) -> "Embedder":
        from transformers import AutoModel

        if config.dtype not in DTYPES:
            raise UserError(f"Unknown dtype {config.dtype!r}; choose one of: {', '.join(DTYPES)}.")
        config.precision = canonical_precision(config.precision, f"{CONFIG_NAME} of {resolved}: field 'precision'")
        hf_config = load_config(resolved)
        if config.bidirectional:
            bidi.make_config_bidirectional(hf_config)
        tokenizer = load_tokenizer(resolved, padding_side=config.padding_side)
        attn_implementation = config.attn_implementation
        if attn_implementation == varlen.USER_NAME:  # padding-free batches (model/varlen.py)
            varlen.check_supported(hf_config, resolved)
            attn_implementation = varlen.register()
        try:
            backbone = AutoModel.from_pretrained(resolved, config=hf_config, dtype=DTYPES[config.dtype],
                                                 attn_implementation=attn_implementation)
        except ValueError as exc:
            raise UserError(f"Could not build the backbone of {resolved!r} "
                            f"(attn_implementation={config.attn_implementation!r}): {exc}") from exc
        if config.bidirectional:
            bidi.make_modules_bidirectional(backbone)
        embedder = cls(backbone, tokenizer, config)
        if embedder.representation is not None:  # e.g. the sparse head's LM head weights
            embedder.representation.attach(embedder, resolved)
        if device is not None:
            embedder.to(device)
        embedder.eval()
        return embedder

    @classmethod
    def _load_with_adapter(cls, folder: Path, config: EmbedderConfig, device=None) -> "Embedder":
        from peft import PeftModel

        embedder = cls._build(resolve_model_path(config.base_model), config, device)
        with _peft_wrapping():
            embedder.backbone = PeftModel.from_pretrained(embedder.backbone, str(folder), is_trainable=False)
        if config.bidirectional:
            bidi.make_modules_bidirectional(embedder.backbone)
        if (folder / MODULES_NAME).exists():
            embedder._load_modules(folder / MODULES_NAME)
        embedder.eval()
        return embedder

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        cfg = self._hf_config
        return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)

    @property
    def _hf_config(self):
        return self.backbone.config

    @property
    def embedding_dim(self) -> int:
        if self.head is None:
            return self.hidden_size
        return self.config.head_dim or self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def is_lora(self) -> bool:
        try:
            from peft import PeftModel
        except ImportError:  # pragma: no cover
            return False
        return isinstance(self.backbone, PeftModel)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: Sequence[str] | str
                 = "all-linear", bias: str = "none", task_type: str = "FEATURE_EXTRACTION") -> None:
        from peft import LoraConfig, get_peft_model

        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        # the summary token's new embedding row trains too: peft's trainable token rows (saved in the adapter)
        trainable_tokens = [self.summary_token_id] if self.summary_token_id is not None else None
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, task_type=task_type,
                          target_modules=targets, trainable_token_indices=trainable_tokens)
        try:
            with _peft_wrapping():
                self.backbone = get_peft_model(self.backbone, lora)
        except ValueError as exc:
            # peft's "Target modules {...} not found" (or "not supported" for a name matching only a block)
            # is a traceback to the user; name the culprits and the names that would work instead. Matching
            # mirrors peft: a list entry matches a module path or its dotted suffix, a string is a regex.
            import re

            linear = [name for name, module in self.backbone.named_modules() if isinstance(module, nn.Linear)]
            if isinstance(targets, str):
                missing = [] if any(re.fullmatch(targets, name) for name in linear) else [targets]
            else:
                missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
            if not missing:
                raise  # some other peft complaint: not a target-name problem
            shown = repr(targets) if isinstance(targets, str) else repr(missing)
            leaves = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear)) or "none"
            raise UserError(f"lora_target_modules {shown} match no linear layer of this model; its linear layers "
                            f"are: {leaves}; use some of those, or leave lora_target_modules empty to adapt all "
                            "linear layers.") from exc
        if self.config.bidirectional:
            bidi.make_modules_bidirectional(self.backbone)

    def load_lora(self, adapter_path: str, is_trainable: bool = True) -> None:
        from peft import PeftModel

        if not (Path(adapter_path) / "adapter_config.json").exists():
            raise UserError(f"lora_adapter_path {adapter_path} has no adapter_config.json.")
        with _peft_wrapping():
            self.backbone = PeftModel.from_pretrained(self.backbone, adapter_path, is_trainable=is_trainable)

    def merge_lora(self) -> None:
        """Fold the adapter into the base weights (same vectors, plain transformers model)."""
        if self.is_lora:
            self.backbone = self.backbone.merge_and_unload()
            self.config.lora_adapter = False

    # ------------------------------------------------------------------ tokenisation and forward
    def tokenize(self, texts: Sequence[str], instruction: str | None = None, max_length: int | None = None):
        """Token ids (end token last) and instruction-prefix lengths, exactly as training data is prepared."""
        if instruction:
            texts = [f"{instruction}{t}" for t in texts]
        # the prefix is the instruction actually prepended: documents never get one, whatever they contain
        separator = self.config.instruction_separator
        given = len(instruction or "")
        if not self.config.skip_instruction:
            instruction = None
        uses_summary = self.summary_token_id is not None
        return encode_texts(self.tokenizer, texts, max_length or self.config.max_length,
                            instruction_prefix_end(instruction, separator), self.config.end_token,
                            self.config.input_strategy, given,
                            summary_token=self.config.summary_token if uses_summary else None,
                            summary_position=self.config.summary_token_position)

    @property
    def pools_after_prefix(self) -> bool:
        """True when `prefix_lengths` reach the pooling: skip-instruction, or a strategy that pools only the
        text's last copy (echo)."""
        return self.config.skip_instruction or self.input_strategy.pool_last_copy

    def collate(self, input_ids: Sequence[Sequence[int]], prefix_lengths: Sequence[int] | None = None,
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Pad a list of id lists to the longest of them (on the configured side)."""
        longest = max(len(ids) for ids in input_ids)
        pad = self.tokenizer.pad_token_id
        batch = torch.full((len(input_ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(input_ids), longest), dtype=torch.long)
        for i, ids in enumerate(input_ids):
            n = len(ids)
            if self.config.padding_side == "left":
                batch[i, longest - n:] = torch.as_tensor(ids)
                mask[i, longest - n:] = 1
            else:
                batch[i, :n] = torch.as_tensor(ids)
                mask[i, :n] = 1
        out = {"input_ids": batch, "attention_mask": mask}
        if prefix_lengths is not None:
            out["prefix_lengths"] = torch.as_tensor(list(prefix_lengths), dtype=torch.long)
        if device is not None:
            # non_blocking: a blocking host-to-device copy would wait for all queued work on the device
            out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
        return out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      padded: bool | None = None) -> torch.Tensor:
        """Backbone's last hidden states; positions come from the mask so left padding is exact.

        `padded=False` says every row is full (a caller that knows the lengths on the host): the backbone then
        gets no mask and no positions, so transformers builds no mask and attention runs with `is_causal`
        (the same result), and nothing waits for an accelerator (transformers checks a device mask for
        padding with a host sync). None: checked here when the mask is on the CPU (free), else assumed."""
        if self.config.attn_implementation == varlen.USER_NAME:
            packed = varlen.pack(input_ids, attention_mask)
            cu, longest = packed["cu_seq_lens"], packed["max_length"]
            out = self.backbone(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                                cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
            return varlen.unpack(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0],
                                 packed["mask"])
        if padded is None and attention_mask.device.type == "cpu":
            padded = not bool(attention_mask.all())
        if padded is False:
            out = self.backbone(input_ids=input_ids, use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        # Fully masked pad rows can be NaN in some kernels; never let them reach a weighted sum.
        return hidden.masked_fill(~attention_mask.bool().unsqueeze(-1), 0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prefix_lengths: torch.Tensor | None = None, padded: bool | None = None) -> torch.Tensor:
        """Un-normalised embeddings (B, embedding_dim); `padded` as in `hidden_states`."""
        hidden = self.hidden_states(input_ids, attention_mask, padded)
        if self.representation is not None:  # multi_vector / sparse / hybrid: a dict of head outputs
            return self.representation(self, hidden, input_ids, attention_mask,
                                       prefix_lengths if self.pools_after_prefix else None)
        pooled = self.pooling(hidden, attention_mask, prefix_lengths if self.pools_after_prefix else None)
        return self.head(pooled) if self.head is not None else pooled

    def compute_precision(self, precision: str | None = None) -> Precision:
        """What `precision` (default: `config.precision`) means on this model's device: fp32, bf16 or fp16."""
        return resolve_precision(precision or self.config.precision, self.device)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
               normalize: bool = True, dim: int | None = None, show_progress: bool = False,
               max_length: int | None = None, precision: str | None = None) -> np.ndarray:
        """Embed texts -> float32 array (len(texts), dim or embedding_dim), rows in input order.

        `instruction` is prepended as f"{instruction}{text}"; `dim` truncates (Matryoshka) before normalising;
        `precision` (auto | fp32 | bf16 | fp16) overrides `config.precision` for this call: bf16 / fp16 run
        the forward pass under autocast on the float32 weights, and the vectors are normalised in float32."""
        if isinstance(texts, str):
            raise UserError("encode() takes a list of texts, not a single string; wrap it in a list.")
        if self.representation is not None and "dense" not in self.representation.head_names:
            raise UserError(f"This model's representation is {self.config.representation}, which has no dense "
                            "vector; use llm2emb.model.representations.encoding.encode_heads() for its output.")
        out_dim = self.embedding_dim
        if dim is not None:
            if dim <= 0 or dim > out_dim:
                raise UserError(f"dim={dim} is out of range: this model's embeddings have {out_dim} dimensions.")
            out_dim = dim
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"Text {i} is {type(text).__name__}, not a string.")
        compute = self.compute_precision(precision)  # before any state changes: fp16 on a CPU is refused
        result = np.zeros((len(texts), out_dim), dtype=np.float32)
        if not texts:
            return result
        log_choice(compute, "encode")
        was_training = self.training
        self.eval()
        encoded = self.tokenize(texts, instruction=instruction, max_length=max_length)
        order = sorted(range(len(texts)), key=lambda i: -len(encoded.input_ids[i]))  # longest first: OOM early
        device = self.device
        progress = None
        if show_progress:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(texts), desc="encode", unit="text")
        # On an accelerator, vectors stay on the device for a few batches: copying each batch to the host
        # would wait for its kernels, so the host could not queue the next batch meanwhile.
        pending: list[tuple[list[int], torch.Tensor]] = []
        flush_every = 1 if device.type == "cpu" else ENCODE_FLUSH_BATCHES
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids = [encoded.input_ids[i] for i in idx]
            batch = self.collate(ids, [encoded.prefix_lengths[i] for i in idx], device=device)
            padded = min(map(len, ids)) != max(map(len, ids))
            with autocast(compute, device):
                emb = self(**batch, padded=padded)
            if isinstance(emb, dict):  # a hybrid model: its dense head
                emb = emb["dense"]
            emb = emb.float()[:, :out_dim]
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            pending.append((idx, emb))
            if len(pending) >= flush_every:
                self._flush_vectors(pending, result)
            if progress is not None:
                progress.update(len(idx))
        self._flush_vectors(pending, result)
        if progress is not None:
            progress.close()
        self.train(was_training)
        return result

    @staticmethod
    def _flush_vectors(pending: list[tuple[list[int], torch.Tensor]], result: np.ndarray) -> None:
        """Copy pending (row indices, device vectors) into `result`, in one host transfer."""
        if not pending:
            return
        rows = [i for idx, _ in pending for i in idx]
        result[rows] = torch.cat([emb for _, emb in pending]).cpu().numpy()
        pending.clear()

    # ------------------------------------------------------------------ persistence
    def _trainable_modules_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for prefix, module in (("pooling", self.pooling), ("head", self.head),
                               ("representation", self.representation)):
            if module is None:
                continue
            for name, tensor in module.state_dict().items():
                state[f"{prefix}.{name}"] = tensor.detach().cpu().contiguous()
        return state

    def _load_modules(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        for prefix, module in (("pooling", self.pooling), ("head", self.head),
                               ("representation", self.representation)):
            sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
            if module is not None and sub:
                module.load_state_dict(sub)

    def save(self, path: str | os.PathLike[str], merge_lora: bool = False) -> Path:
        """Write a folder that `Embedder.from_pretrained` loads back to identical vectors (atomic)."""
        from safetensors.torch import save_file

        target = Path(path)
        config = EmbedderConfig.from_dict(asdict(self.config))
        with atomic_dir(target) as tmp:
            backbone = self.backbone
            if self.is_lora and merge_lora:
                import copy
                backbone = copy.deepcopy(self.backbone).merge_and_unload()
                config.lora_adapter = False
            elif self.is_lora:
                config.lora_adapter = True
            if self.is_lora and not merge_lora and self.summary_token_id is not None:
                # the resized embedding matrix is rebuilt on load (the summary row by its init rule) and the
                # trained row is in the adapter: peft would otherwise store the whole matrix in it
                backbone.save_pretrained(tmp, save_embedding_layers=False)
            else:
                backbone.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            state = self._trainable_modules_state()
            if state:
                save_file(state, str(tmp / MODULES_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2, ensure_ascii=False))
        return target
