"""User-facing errors: one clear sentence, printed by the CLI without a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input from the user (file, field, row). The CLI prints the message and exits with status 2."""


#: how similar (difflib's ratio, 0..1) a choice must be to be suggested
DID_YOU_MEAN_CUTOFF = 0.6


def _spelling(text: str) -> str:
    """What a name is compared by: no leading dashes (every option has them, so `--lr` would look like
    `--help`), case and `_` vs `-` ignored (`--max_length` is `--max-length`)."""
    return text.lstrip("-").lower().replace("_", "-")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean X?' for the closest choice, or '' when nothing is close.

    Names are compared without their leading dashes, so that a short unknown option (`--lr`, `--gpu`) is not
    matched to an unrelated one through the shared `--`."""
    wanted = _spelling(name)
    best, best_ratio = None, DID_YOU_MEAN_CUTOFF
    for choice in dict.fromkeys(choices):   # first of equally close choices wins, as with difflib
        ratio = difflib.SequenceMatcher(None, wanted, _spelling(choice)).ratio()
        if ratio > best_ratio or (ratio == best_ratio and best is None):
            best, best_ratio = choice, ratio
    return f" Did you mean {best!r}?" if best is not None else ""
