"""Prompt templates: editable text files with `{placeholder}`s, rendered per passage with seeded choices.

A template file has up to three sections, each opened by a line holding only its name in brackets:

    [system]            optional system message
    [user]              the request (text before any section header belongs here too)
    [reply]             optional start of the model's answer, written for it (e.g. `{"query": "`): a small
                        model then only continues the JSON instead of having to begin it correctly

`{name}` is replaced by a value; `{{` and `}}` are literal braces. Any other brace is literal as well, so
JSON examples such as `{"query": "..."}` need no escaping. Names are the sampled placeholders (`PLACEHOLDERS`
plus any the spec defines) and the context a template role provides (`ROLES`); a name that is neither is
a UserError naming the template and the placeholder, raised when the spec is loaded, before any model runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from llm2emb.errors import UserError, did_you_mean

TEMPLATE_SUFFIX = ".txt"
_SECTION = re.compile(r"^\[(system|user|reply)\][ \t]*$", re.MULTILINE)
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Placeholder:
    """A sampled placeholder: one of `values` is drawn per passage unless the spec gives its own list."""

    name: str
    values: tuple[str, ...]
    description: str


PLACEHOLDERS: dict[str, Placeholder] = {}


def register_placeholder(placeholder: Placeholder) -> Placeholder:
    PLACEHOLDERS[placeholder.name] = placeholder
    return placeholder


# Defaults in the spirit of e5-mistral's brainstormed attributes (Wang et al. 2024, "Improving Text Embeddings
# with Large Language Models"): diversity comes from sampling them, not from the model.
register_placeholder(Placeholder("task", ("Given a query, retrieve the passage that answers it",),
                                 "the task the data is for (the task type's own default when left out)"))
register_placeholder(Placeholder("persona", ("a student", "a software engineer", "a curious reader",
                                             "a domain expert"), "who writes the query"))
register_placeholder(Placeholder("query_type", ("a question", "a short keyword phrase", "a one-sentence request"),
                                 "the form of the query"))
register_placeholder(Placeholder("length", ("fewer than 8 words", "8 to 15 words", "15 to 25 words"),
                                 "how long the query is"))
register_placeholder(Placeholder("difficulty", ("high school", "university", "expert"),
                                 "the reader's level"))
register_placeholder(Placeholder("language", ("English",), "the language of the generated text"))
register_placeholder(Placeholder("document", ("passage",), "what a corpus entry is called in the prompt"))


@dataclass(frozen=True)
class Role:
    """What a template is used for, and the context placeholders the pipeline fills in for it."""

    name: str
    context: tuple[str, ...]
    description: str


ROLES: dict[str, Role] = {
    "generate": Role("generate", ("passage", "labels"), "writes the training text for one passage"),
    "relabel": Role("relabel", ("query", "candidates", "num_candidates"),
                    "judges retrieved candidates for a generated query (Gecko)"),
}


@dataclass(frozen=True)
class Template:
    name: str          # file name or shipped name, for messages
    source: str        # the file's text, exactly (part of the run identity)
    system: str
    user: str
    reply: str

    def placeholders(self) -> list[str]:
        """Every placeholder name used, in order of first use."""
        seen: dict[str, None] = {}
        for text in (self.system, self.user, self.reply):
            for m in _TOKEN.finditer(text):
                if m.group(1):
                    seen.setdefault(m.group(1))
        return list(seen)

    def check(self, role: str, sampled: Sequence[str]) -> None:
        """A UserError for the first placeholder that neither `sampled` nor the role's context provides."""
        known = [*sampled, *ROLES[role].context]
        for name in self.placeholders():
            if name not in known:
                raise UserError(f"Template {self.name}: unknown placeholder {{{name}}}; use one of "
                                f"{', '.join('{' + k + '}' for k in known)}, define it under 'placeholders:' in "
                                f"the spec, or write literal braces as {{{{ and }}}}.{did_you_mean(name, known)}")

    def render(self, values: Mapping[str, str]) -> Prompt:
        return Prompt(_fill(self.system, values), _fill(self.user, values), _fill(self.reply, values))


@dataclass(frozen=True)
class Prompt:
    """A rendered template: what a generator sends (chat messages, or plain text without a chat template)."""

    system: str
    user: str
    reply: str

    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": self.user}]


def _fill(text: str, values: Mapping[str, str]) -> str:
    def sub(m: re.Match) -> str:
        token = m.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return values[m.group(1)]  # checked when the spec was loaded
    return _TOKEN.sub(sub, text)


def parse_template(text: str, name: str) -> Template:
    sections = {"system": "", "user": "", "reply": ""}
    parts = _SECTION.split(text)
    # parts = [before, name1, body1, name2, body2, ...]; text before any header is the user message
    bodies: list[tuple[str, str]] = [("user", parts[0])] + list(zip(parts[1::2], parts[2::2]))
    for section, body in bodies:
        if section != "user" or body.strip():
            if sections[section].strip() and body.strip():
                raise UserError(f"Template {name}: section [{section}] appears twice; keep one.")
            # Newlines around a section belong to the file layout; the reply's trailing spaces are kept
            # (a reply prefix may end in one on purpose).
            sections[section] = body.strip("\n") if section == "reply" else body.strip()
    if not sections["user"]:
        raise UserError(f"Template {name} has no request text; write it under a [user] line.")
    return Template(name, text, sections["system"], sections["user"], sections["reply"])


def shipped_templates() -> list[str]:
    """Names of the templates shipped with llm2emb (files in llm2emb/synth/templates/)."""
    folder = resources.files("llm2emb.synth") / "templates"
    return sorted(p.name[:-len(TEMPLATE_SUFFIX)] for p in folder.iterdir() if p.name.endswith(TEMPLATE_SUFFIX))


def load_template(ref: str, base_dir: Path | None = None) -> Template:
    """A template by shipped name (`retrieval`) or by path (relative paths from `base_dir`, the spec's folder)."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        try:
            return parse_template(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"Cannot read template {path} ({exc}).") from exc
    shipped = shipped_templates()
    if ref in shipped:
        resource = resources.files("llm2emb.synth") / "templates" / f"{ref}{TEMPLATE_SUFFIX}"
        return parse_template(resource.read_text(encoding="utf-8"), f"{ref} (shipped)")
    raise UserError(f"Template {ref!r} is neither a file nor a shipped template ({', '.join(shipped)})."
                    f"{did_you_mean(ref, shipped)}")
