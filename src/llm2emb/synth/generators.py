"""Generators: the LLMs that write synthetic data, in a registry.

| name           | runs                                                     | status                         |
|----------------|----------------------------------------------------------|--------------------------------|
| `transformers` | `AutoModelForCausalLM.generate`, batched, left padding   | tested (CPU)                   |
| `vllm`         | `vllm.LLM.generate` (pip install 'llm2emb[vllm]')         | written to vLLM's documented   |
|                |                                                          | API, untested here (no GPU)    |

Both build the same prompt tokens: the model's chat template when its tokenizer has one (system + user
message, generation prompt), else plain text; then the template's [reply] start, which the model continues.
A generator returns only the continuation. Sampling: temperature 0 is greedy; otherwise the seed of the call
fixes the draw (transformers: the torch seed before the batch; vLLM: one seed per request).

A model must be a causal LM: an encoder (BERT), an encoder-decoder or a saved llm2emb embedding model is a
UserError before any weights load.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from llm2emb.errors import UserError, did_you_mean
from llm2emb.synth.templates import Prompt

logger = logging.getLogger(__name__)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float   # 0 = greedy
    top_p: float
    seed: int


# Says whether the reply to prompt i of a call (the prompt's [reply] start + what was generated so far) is
# complete, so a backend may stop generating it: it parses, and more text would not change what is read.
Complete = Callable[[int, str], bool]


class Generator:
    """Writes one continuation per prompt."""

    name = "generator"

    def identity(self) -> dict[str, Any]:
        """What decides the model's output (part of the run identity; cheap: no weights are loaded)."""
        raise NotImplementedError

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings, complete: Complete | None = None,
                 ) -> list[str]:
        """One continuation per prompt (without the prompt's [reply] start). A backend may stop a row as soon
        as `complete(i, reply start + continuation)` holds; what it returned up to there must not change."""
        raise NotImplementedError


GENERATORS: dict[str, Callable[..., Generator]] = {}


def register_generator(name: str):
    def wrap(factory: Callable[..., Generator]) -> Callable[..., Generator]:
        GENERATORS[name] = factory
        return factory
    return wrap


def build_generator(name: str, model: str, **options: Any) -> Generator:
    if name not in GENERATORS:
        raise UserError(f"Unknown generator {name!r}; use one of: {', '.join(GENERATORS)}.{did_you_mean(name, GENERATORS)}")
    return GENERATORS[name](model, **options)


def check_causal_lm(model: str) -> tuple[str, Any]:
    """(resolved path, transformers config) of a causal LM; a UserError naming what it is otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llm2emb.model.loading import load_config, resolve_model_path

    resolved = resolve_model_path(model)
    folder = Path(resolved)
    if folder.is_dir() and (folder / "llm2emb_config.json").exists():
        raise UserError(f"{model} is a saved llm2emb embedding model, not a generator; pass a causal LM "
                        "(an instruction-tuned one works best) as --model.")
    config = load_config(resolved)
    architectures = list(getattr(config, "architectures", None) or [])
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures))
    if not causal:
        what = architectures[0] if architectures else f"a {config.model_type} model"
        raise UserError(f"{model} is {what}, not a causal language model that can generate text; pass a "
                        "decoder LLM (e.g. smollm2-135m or a *ForCausalLM folder) as --model.")
    return resolved, config


def _model_fingerprint(resolved: str, config: Any) -> dict[str, Any]:
    folder = Path(resolved)
    if folder.is_dir():
        digest = hashlib.sha256((folder / "config.json").read_bytes())
        for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
        return {"folder": str(folder.resolve()), "sha256": digest.hexdigest()}
    return {"hub": resolved, "commit": getattr(config, "_commit_hash", None)}


class _ChatPrompts:
    """Turns Prompts into token ids the same way for every backend."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def text(self, prompt: Prompt) -> str:
        if self.chat:
            head = self.tokenizer.apply_chat_template(prompt.messages(), tokenize=False, add_generation_prompt=True)
            return head + prompt.reply
        parts = [prompt.system, prompt.user, prompt.reply]
        return "\n\n".join(p for p in parts[:2] if p) + "\n\n" + prompt.reply

    def ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
        return [self.tokenizer(self.text(p), add_special_tokens=not self.chat)["input_ids"] for p in prompts]


@register_generator("transformers")
class TransformersGenerator(Generator):
    """`generate` of a transformers causal LM (local folder, .gguf, built-in alias or hub id)."""

    name = "transformers"

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None) -> None:
        self.model_ref = model
        self.resolved, self.config = check_causal_lm(model)
        self.device = device or "cpu"
        self.dtype = dtype or "float32"
        self._model = None
        self._prompts: _ChatPrompts | None = None

    def identity(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_ref, "dtype": self.dtype,
                **_model_fingerprint(self.resolved, self.config)}

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from llm2emb.model.loading import load_tokenizer

        tokenizer = load_tokenizer(self.resolved, padding_side="left")  # left: new tokens follow every prompt
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise UserError(f"--dtype {self.dtype!r} is not a torch dtype; use float32, bfloat16 or float16.")
        try:
            model = AutoModelForCausalLM.from_pretrained(self.resolved, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"Cannot load {self.model_ref} as a causal LM ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
        self._model = model.to(self.device).eval()
        self._prompts = _ChatPrompts(tokenizer)
        logger.info("generator %s on %s (%s), chat template: %s", self.model_ref, self.device, self.dtype,
                    "yes" if self._prompts.chat else "no")

    @property
    def uses_chat_template(self) -> bool:
        if self._prompts is None:
            self._load()
        return bool(self._prompts and self._prompts.chat)

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings, complete: Complete | None = None,
                 ) -> list[str]:
        import torch

        if not prompts:
            return []
        if self._model is None:
            self._load()
        assert self._model is not None and self._prompts is not None
        tokenizer = self._prompts.tokenizer
        ids = self._prompts.ids(prompts)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        sample = settings.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": settings.max_new_tokens,
                                  "pad_token_id": pad}
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            torch.manual_seed(settings.seed)
        else:  # the model's generation_config may carry sampling defaults that greedy must not see
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if complete is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_rows_complete(tokenizer, width, prompts, complete)])
        with torch.inference_mode():
            out = self._model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def _rows_complete(tokenizer, start: int, prompts: Sequence[Prompt], complete: Complete):
    """A transformers StoppingCriteria (defined here: transformers is imported only when generating)."""
    from transformers import StoppingCriteria

    class RowsComplete(StoppingCriteria):
        """Stops each row once its reply is complete (a row that stopped is padded by `generate`, the other
        rows go on unchanged, so a row's text does not depend on when its neighbours stop). Checked after
        every token: decoding a few dozen tokens costs nothing next to a forward pass."""

        def __init__(self, tokenizer, start: int, prompts: Sequence[Prompt], complete: Complete) -> None:
            self.tokenizer, self.start, self.complete = tokenizer, start, complete
            self.prefixes = [p.reply for p in prompts]
            self.done = [False] * len(prompts)

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            for i in range(input_ids.shape[0]):
                if not self.done[i]:
                    text = self.tokenizer.decode(input_ids[i, self.start:], skip_special_tokens=True)
                    self.done[i] = self.complete(i, self.prefixes[i] + text)
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return RowsComplete(tokenizer, start, prompts, complete)


@register_generator("vllm")
class VLLMGenerator(Generator):
    """vLLM offline inference (`pip install 'llm2emb[vllm]'`, a CUDA machine). UNTESTED in this project: written
    against vLLM's documented API (`LLM(model=..., dtype=..., seed=...)`, `LLM.generate` with
    `{"prompt_token_ids": ...}` prompts and one `SamplingParams(temperature, top_p, max_tokens, seed)` per
    request, `RequestOutput.outputs[0].text`). Prompts are the same tokens the transformers backend uses."""

    name = "vllm"

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None) -> None:
        self.model_ref = model
        self.resolved, self.config = check_causal_lm(model)
        self.dtype = dtype or "auto"
        self._llm = None
        self._prompts: _ChatPrompts | None = None

    def identity(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_ref, "dtype": self.dtype,
                **_model_fingerprint(self.resolved, self.config)}

    def _load(self) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise UserError("The vllm generator needs vLLM: pip install 'llm2emb[vllm]' (Linux with a CUDA GPU), "
                            "or use --generator transformers.") from exc
        from llm2emb.model.loading import load_tokenizer

        self._prompts = _ChatPrompts(load_tokenizer(self.resolved))
        self._llm = LLM(model=self.resolved, tokenizer=self.resolved, dtype=self.dtype, seed=0)

    def generate(self, prompts: Sequence[Prompt], settings: SamplingSettings, complete: Complete | None = None,
                 ) -> list[str]:
        # `complete` is not used: vLLM schedules finished requests out of the batch by itself, and text after
        # the first JSON object is ignored by the parser anyway.
        if not prompts:
            return []
        if self._llm is None:
            self._load()
        from vllm import SamplingParams

        assert self._prompts is not None
        sample = settings.temperature > 0
        params = [SamplingParams(temperature=settings.temperature if sample else 0.0,
                                 top_p=settings.top_p if sample else 1.0, max_tokens=settings.max_new_tokens,
                                 seed=settings.seed + i if sample else None) for i in range(len(prompts))]
        requests = [{"prompt_token_ids": ids} for ids in self._prompts.ids(prompts)]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]
