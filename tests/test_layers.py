"""The layer rules of docs/architecture.md, checked on every module's imports (module level and inside functions,
read with `ast`, so a lazy import that breaks a rule is caught too; imports under `if TYPE_CHECKING:` are for
type hints only and never run, so they are not counted)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llm2emb

PACKAGE = Path(llm2emb.__file__).parent

# (importing layer, layers it must never import, why)
FORBIDDEN = [
    ("model", {"data", "train", "eval", "config", "study", "pipeline", "commands", "cli"},
     "an Embedder must be usable on its own"),
    ("eval", {"train", "commands", "cli"}, "evaluating a model must not need the training stack"),
    ("config", {"train", "data", "eval", "study", "pipeline", "experiment", "commands", "cli"},
     "validating a config must not load the training stack"),
    ("trackers", {"train", "config", "model", "data", "eval", "commands", "cli"},
     "the tracker registry sits below config"),
]
# layers whose llm2emb imports are limited to an allow-list
ONLY = [
    ("losses", {"losses", "errors"}, "a loss is a pure function of embeddings"),
    ("errors", set(), "a leaf every layer may use"),
    ("layout", {"errors"}, "a leaf every layer may use"),
    ("atomic", {"errors"}, "a leaf every layer may use"),
    ("trackers", {"errors"}, "a leaf below config"),
]


def _layer(module: str) -> str:
    """'llm2emb.model.pooling' -> 'model'; 'llm2emb.config' -> 'config'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports() -> dict[str, set[str]]:
    """module -> the llm2emb modules it imports (`from llm2emb import x` counts as llm2emb.x)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:   # relative import: resolve against this module's package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets.add(name)
                if name == "llm2emb":
                    targets.update(f"llm2emb.{a.name}" for a in node.names)
        found[module] = {t for t in targets if t.startswith("llm2emb.")}
    return found


IMPORTS = _imports()


def test_the_walk_sees_the_package():
    assert "llm2emb.config" in IMPORTS and "llm2emb.model.embedder" in IMPORTS
    assert "llm2emb.trackers" in IMPORTS["llm2emb.config"]     # the walk sees real imports
    assert any(_layer(t) == "model" for t in IMPORTS["llm2emb.train.trainer"])


@pytest.mark.parametrize("layer,forbidden,why", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_lower_layers_never_import_higher_ones(layer, forbidden, why):
    bad = sorted(f"{m} imports {t}" for m, targets in IMPORTS.items() if _layer(m) == layer
                 for t in targets if _layer(t) in forbidden)
    assert not bad, f"{layer} must not import {sorted(forbidden)} ({why}): {bad}"


@pytest.mark.parametrize("layer,allowed,why", ONLY, ids=[o[0] for o in ONLY])
def test_leaf_layers_import_only_their_allow_list(layer, allowed, why):
    bad = sorted(f"{m} imports {t}" for m, targets in IMPORTS.items() if _layer(m) == layer
                 for t in targets if _layer(t) not in allowed | {layer})
    assert not bad, f"{layer} may import only {sorted(allowed)} ({why}): {bad}"


def test_only_the_cli_imports_commands():
    bad = sorted(f"{m} imports {t}" for m, targets in IMPORTS.items()
                 if _layer(m) not in {"commands", "cli", "__main__"} for t in targets if _layer(t) in {"commands", "cli"})
    assert not bad, bad
