"""Input strategies: how a text becomes the model's input and which of its positions are pooled.

`plain` (the default) is the text as given (instruction first) with the end token appended: every pooling mode
reads it as `model/pooling.py` describes. The others wrap the text in a template, for causal models whose
pooled tokens should have seen the whole text:

* `echo` (Springer, Kotha, Fried, Neubig & Raghunathan 2024, "Repetition Improves Language Model Embeddings",
  arXiv 2402.15449): the text given twice, `Rewrite the sentence: {text}, rewritten sentence: {text}` (the
  paper's template), mean-pooled over the second copy's tokens only: a causal model's second copy has seen
  the whole first copy. The instruction (if any) goes before the template; the end token is not appended
  (it is no part of the second copy). Trains like any other: prepared data keeps, for every text (query,
  positive, hard negatives), the tokens before its second copy (`<column>_prefix_length`), and the training
  forward pools over the second copy only, as `Embedder.encode` does.
* `prompteol` (Jiang, Huang, Luan, Wang & Zhuang 2023, "Scaling Sentence Embeddings with Large Language
  Models", arXiv 2307.16645): `This sentence : "{text}" means in one word:"`, and the last token's state
  (eos pooling reads it): the template's closing quote. No end token is appended after it (that would turn
  PromptEOL into EOS pooling after a prompt), nor what the tokenizer's post-processor appends.

The rule that applies a strategy lives in `llm2emb.model.tokenization.encode_texts`, so `prepare`,
`Embedder.encode`, evaluation and export tokenise alike; an Embedder folder records its strategy
(`input_strategy` in llm2emb_config.json). A text that does not fit `max_length` with its template is
shortened inside the template (both copies alike), never cut at the end, so the template's end survives.

Adding one: an `InputStrategy(name, template, ...)` registered with `register_input_strategy`.
"""
from __future__ import annotations

from dataclasses import dataclass

from llm2emb.errors import UserError, did_you_mean

TEXT = "{text}"


@dataclass(frozen=True)
class InputStrategy:
    """One way of turning (instruction, text) into model input; see the module docstring."""

    name: str
    description: str
    #: the model input around the text; `{text}` marks each copy of it (the instruction goes before it)
    template: str = TEXT
    #: pool only the last copy's tokens (the tokens before it count as the prefix the pooling excludes)
    pool_last_copy: bool = False
    #: append the end token (`end_token` setting) after the template
    append_end: bool = True
    #: pooling modes that read the positions this strategy means (None: every mode)
    poolings: tuple[str, ...] | None = None
    #: refused with bidirectional attention (the strategy exists for what causal attention cannot see)
    causal_only: bool = False

    @property
    def is_plain(self) -> bool:
        return self.template == TEXT and self.append_end and not self.pool_last_copy

    @property
    def copies(self) -> int:
        return self.template.count(TEXT)

    def render(self, instruction: str, text: str) -> tuple[str, int]:
        """(model input, character where the pooled span starts: the last copy's start, else 0)."""
        head, _, _ = self.template.rpartition(TEXT)
        rendered = instruction + self.template.replace(TEXT, text)
        if not self.pool_last_copy:
            return rendered, 0
        return rendered, len(instruction) + len(head.replace(TEXT, text))

    def check(self, *, pooling: str, bidirectional: bool, representation: str, source: str) -> None:
        """One sentence for a combination this strategy cannot serve."""
        if self.is_plain:
            return
        if representation != "dense":
            raise UserError(f"{source}: input_strategy {self.name} pools one vector per text, but representation "
                            f"{representation} scores token sets; use representation dense or input_strategy "
                            "plain.")
        if self.poolings is not None and pooling not in self.poolings:
            raise UserError(f"{source}: input_strategy {self.name} needs pooling {' or '.join(self.poolings)} "
                            f"({self.description}), not {pooling}.")
        if self.causal_only and bidirectional:
            raise UserError(f"{source}: input_strategy {self.name} exists for causal attention (its pooled tokens "
                            "see the whole text only through the template); turn bi_attn_enabled off or use "
                            "input_strategy plain.")


INPUT_STRATEGIES: dict[str, InputStrategy] = {}


def register_input_strategy(strategy: InputStrategy) -> InputStrategy:
    INPUT_STRATEGIES[strategy.name] = strategy
    return strategy


def get_input_strategy(name: str | None, source: str = "input_strategy") -> InputStrategy:
    """The registered strategy `name` (None: plain); a typo is one sentence with the choices."""
    name = name or "plain"
    if name not in INPUT_STRATEGIES:
        raise UserError(f"{source}: unknown input strategy {name!r}; choose one of "
                        f"{', '.join(INPUT_STRATEGIES)}.{did_you_mean(name, list(INPUT_STRATEGIES))}")
    return INPUT_STRATEGIES[name]


register_input_strategy(InputStrategy("plain", "the text as given, end token appended"))
register_input_strategy(InputStrategy(
    "echo", "the text twice, mean over the second copy (Springer et al. 2024)",
    template="Rewrite the sentence: {text}, rewritten sentence: {text}", pool_last_copy=True, append_end=False,
    poolings=("mean", "weighted_mean"), causal_only=True))
register_input_strategy(InputStrategy(
    "prompteol", "the last token of 'This sentence : \"text\" means in one word:\"' (Jiang et al. 2023)",
    template='This sentence : "{text}" means in one word:"', append_end=False, poolings=("eos",),
    causal_only=True))
