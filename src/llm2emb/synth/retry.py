"""Generator calls with bounded retries, and the seeds they sample with."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from llm2emb.synth.generators import Generator, SamplingSettings
from llm2emb.synth.replies import ReplyError
from llm2emb.synth.spec import SynthSpec
from llm2emb.synth.templates import Prompt


def stable_int(*parts: object) -> int:
    """A 32-bit number from `parts`, the same in every process (Python's str hash is salted)."""
    return int(hashlib.sha256("\0".join(map(str, parts)).encode("utf-8")).hexdigest()[:8], 16)


def cut(text: str, limit: int) -> str:
    """`text` cut to `limit` characters for a prompt (the stored passage stays whole)."""
    return text if len(text) <= limit else text[:limit].rstrip() + "\n..."


@dataclass
class Outcome:
    parsed: Any = None
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    reply: str = ""


def parses(parse: Callable[[int, str], Any], i: int, reply: str) -> bool:
    try:
        parse(i, reply)
    except ReplyError:
        return False
    return True


def generate_with_retries(generator: Generator, prompts: Sequence[Prompt], parse: Callable[[int, str], Any],
                          spec: SynthSpec, seed_parts: tuple) -> list[Outcome]:
    """Generate for every prompt, asking again (bounded) for replies that `parse(prompt index, reply)` rejects
    with a ReplyError. The first attempt uses the spec's temperature; retries sample (a greedy retry would
    repeat the failure), each attempt with its own seed from `seed_parts`."""
    gen = spec.generation
    outcomes = [Outcome() for _ in prompts]
    pending = list(range(len(prompts)))
    for attempt in range(gen.retries + 1):
        if not pending:
            break
        temperature = gen.temperature if attempt == 0 else (gen.temperature or gen.retry_temperature)
        settings = SamplingSettings(gen.max_new_tokens, temperature, gen.top_p,
                                    stable_int(*seed_parts, attempt))
        replies = generator.generate([prompts[i] for i in pending], settings,
                                     lambda j, text, batch=tuple(pending): parses(parse, batch[j], text))
        if len(replies) != len(pending):
            raise RuntimeError(f"generator {generator.name} returned {len(replies)} replies for {len(pending)} "
                               "prompts")
        still = []
        for i, reply in zip(pending, replies):
            out = outcomes[i]
            out.attempts += 1
            out.reply = prompts[i].reply + reply
            try:
                out.parsed = parse(i, out.reply)
            except ReplyError as exc:
                out.reasons.append(exc.reason)
                still.append(i)
        pending = still
    return outcomes
