"""The study file: recipes x seeds, the data they train on, and the tasks they are compared on.

    name: seed_configs                 # optional; default the file name. A folder holds one study.
    base: configs/quickstart.json      # a training config (path or inline mapping) shared by every recipe
    recipes:                           # ordered; the first is the baseline the others are compared with
      f2llm: configs/config.f2llm.json           # a config file ...
      bi_mean: {pooling_mode: mean, bi_attn_enabled: true}      # ... or overrides of base ...
      lora: {config: configs/x.json, lora_r: 8}  # ... or both
    seeds: [1, 2, 3]
    budget: {train_steps: 40, train_batch_size: 16}   # forced on every recipe after its config file
    data: {input: builtin:stdlib}      # or {train_data_path: prepared/}; raw input is prepared once per tokenizer
    launcher: {kind: accelerate, config_file: ../configs/accelerate_config.yaml, num_processes: 8}
                                       # how cells run (default local, one after another); see
                                       # llm2emb.experiment.launchers. train_batch_size is then the global batch
    eval:
      tasks: [builtin:stdlib, {task: ../data/stsb_en/dev.tsv, max_length: 64}]
      limits: 200                      # options for every task (a task mapping may override them)
      max_length: 128
      dims: [128, 256]                 # extra Matryoshka rows
      query_instruction: null

A cell's training config is: base <- the recipe's config file <- budget <- the recipe's inline overrides
<- {seed, train_data_path, output_dir, experiment_id} set by the study. Relative paths are relative to the
study file. Everything is validated before anything runs (`load_study`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError, did_you_mean
from llm2emb.experiment.evaluation import (  # noqa: F401 - the eval section is shared with pipelines
    EVAL_FIELDS, TASK_OPTION_FIELDS, EvalSpec, EvalTask, load_eval, parse_precision, task_path,
)
from llm2emb.experiment.fields import (  # noqa: F401
    check_keys, check_seeds, config_hash, int_field, read_experiment_file, resolve_path,
)
from llm2emb.experiment.launchers.base import check_global_batch

STUDY_FIELDS = ("name", "description", "base", "recipes", "seeds", "budget", "data", "eval", "launcher")
DATA_FIELDS = ("train_data_path", "input", "manifest", "max_seq_length", "instruction_separator", "end_token",
               "workers")
#: fields the study sets for every cell (a recipe or budget setting them would be overwritten silently)
CELL_FIELDS = ("seed", "train_data_path", "output_dir", "experiment_id", "tb_dir")


def _builtin_data(item: str) -> bool:
    """Whether `item` names built-in training data with queries (`llm2emb.data.builtin`'s registry)."""
    from llm2emb.data.builtin import builtin_train_data

    found = builtin_train_data(item)
    return found is not None and not found.texts_only


def _builtin_names() -> str:
    from llm2emb.data.builtin import builtin_references

    return ", ".join(builtin_references(with_queries_only=True))


@dataclass(frozen=True)
class Recipe:
    name: str
    config_file: str | None
    overrides: dict[str, Any]


#: eval fields added after studies were first written: left out of the eval hash at their default, so finished
#: studies are not evaluated again because a newer llm2emb knows more settings
LATER_EVAL_DEFAULTS = {"precision": None}


@dataclass
class DataSpec:
    train_data_path: str | None = None
    input: str | list[str] | None = None     # a folder / file of raw datasets, a list of dataset files, builtin
    manifest: dict[str, Any] | None = None    # task types / instructions of the input datasets (manifest.json)
    max_seq_length: int | None = None       # prepare's --max-seq-length (default: the cells' max_seq_length)
    instruction_separator: str | None = None
    end_token: str | None = None
    workers: int | None = None


@dataclass
class Study:
    name: str
    path: Path
    base: dict[str, Any]
    recipes: list[Recipe]
    seeds: list[int]
    budget: dict[str, Any]
    data: DataSpec
    eval: EvalSpec
    description: str = ""
    launcher: Any = None      # llm2emb.experiment.launchers.Launcher (None: local, one cell at a time)

    @property
    def baseline(self) -> str:
        return self.recipes[0].name

    def recipe_config(self, recipe: Recipe) -> dict[str, Any]:
        """base <- recipe file <- budget <- recipe overrides (cell fields are added by the runner)."""
        from llm2emb.config import read_config_file

        merged = dict(self.base)
        if recipe.config_file:
            merged.update({k: v for k, v in read_config_file(recipe.config_file).items() if not k.startswith("_")})
        merged.update(self.budget)
        merged.update(recipe.overrides)
        return merged


def load_study(path: str | Path, extra_budget: Mapping[str, Any] | None = None,
               launcher_kind: str | None = None) -> Study:
    """Read and check a study file: fields, recipes and their configs (every cell's config validated), seeds,
    data and eval tasks. Raises UserError (one sentence, naming the file and field) before anything runs.
    `extra_budget` (the command line's --set) is added to the file's budget; `launcher_kind` (--launcher)
    replaces the launcher section's kind."""
    from llm2emb.experiment.launchers import load_launcher

    from llm2emb.config import FIELD_NAMES, config_from_dict, read_config_file

    path = Path(path).expanduser().resolve()
    raw = read_experiment_file(path, "study", STUDY_FIELDS)
    root = path.parent
    check_keys(raw, STUDY_FIELDS, str(path))
    where = str(path)

    base_value = raw.get("base", {})
    if isinstance(base_value, str):
        base = {k: v for k, v in read_config_file(resolve_path(base_value, root)).items() if not k.startswith("_")}
    elif isinstance(base_value, Mapping):
        base = dict(base_value)
    else:
        raise UserError(f"{where}: base must be a config file path or a mapping of config fields.")

    recipes_raw = raw.get("recipes")
    if not isinstance(recipes_raw, Mapping) or not recipes_raw:
        raise UserError(f"{where}: recipes must be a non-empty mapping of recipe name -> config file or overrides.")
    recipes: list[Recipe] = []
    for name, value in recipes_raw.items():
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise UserError(f"{where}: recipe name {name!r} must be a plain non-empty name (no '/').")
        if isinstance(value, str):
            recipes.append(Recipe(name, resolve_path(value, root), {}))
        elif isinstance(value, Mapping) or value is None:
            overrides = dict(value or {})
            config_file = overrides.pop("config", None)
            if config_file is not None and not isinstance(config_file, str):
                raise UserError(f"{where}: recipes.{name}.config must be a config file path.")
            recipes.append(Recipe(name, resolve_path(config_file, root) if config_file else None, overrides))
        else:
            raise UserError(f"{where}: recipes.{name} must be a config file path or a mapping of overrides.")

    seeds = check_seeds(raw.get("seeds", [42]), where)

    budget = raw.get("budget", {}) or {}
    if not isinstance(budget, Mapping):
        raise UserError(f"{where}: budget must be a mapping of config fields, e.g. {{train_steps: 40}}.")
    budget = {**budget, **(extra_budget or {})}

    data_raw = raw.get("data") or {}
    if not isinstance(data_raw, Mapping):
        raise UserError(f"{where}: data must be a mapping with train_data_path or input.")
    check_keys(data_raw, DATA_FIELDS, f"{where}: data")
    data = DataSpec(**data_raw)
    if bool(data.train_data_path) == bool(data.input):
        raise UserError(f"{where}: data needs exactly one of train_data_path (prepared with `llm2emb prepare`) "
                        "or input (raw data, prepared once per tokenizer by the study).")
    if data.train_data_path:
        data.train_data_path = resolve_path(data.train_data_path, root)
    if isinstance(data.input, list):
        if not data.input or not all(isinstance(item, str) for item in data.input):
            raise UserError(f"{where}: data.input must be a folder, a file, a non-empty list of dataset files, or "
                            f"one of {_builtin_names()}.")
        data.input = [resolve_path(item, root) for item in data.input]
    elif data.input and not data.input.startswith("builtin:"):
        data.input = resolve_path(data.input, root)
    for item in data.input if isinstance(data.input, list) else [data.input] if data.input else []:
        if item.startswith("builtin:") and not _builtin_data(item):
            raise UserError(f"{where}: data.input {item} is not built-in training data with queries; use one of "
                            f"{_builtin_names()} (texts-only data such as builtin:stdlib-undocumented belongs in "
                            "a pipeline's SimCSE or MNTP stage).")
        if not _builtin_data(item) and not Path(item).exists():
            raise UserError(f"{where}: data.input {item} does not exist; give a folder of raw datasets, dataset "
                            f"files, or one of {_builtin_names()}.")
    if data.manifest is not None and not isinstance(data.manifest, Mapping):
        raise UserError(f"{where}: data.manifest must map dataset names to {{type, instruction}}.")

    eval_spec = load_eval(raw.get("eval"), where, root)
    study = Study(name=str(raw.get("name") or path.stem), path=path, base=base, recipes=recipes,
                  seeds=seeds, budget=budget, data=data, eval=eval_spec,
                  description=str(raw.get("description") or ""),
                  launcher=load_launcher(raw.get("launcher"), where, root, launcher_kind))

    # Every recipe's config must be a valid training config; unknown fields get did-you-mean.
    for recipe in recipes:
        merged = study.recipe_config(recipe)
        source = f"{where}: recipe {recipe.name!r}"
        overwritten = [k for k in CELL_FIELDS if k in recipe.overrides or k in budget]
        if overwritten:
            raise UserError(f"{source}: {', '.join(overwritten)} are set by the study for every cell; "
                            "remove them from the recipe and budget (seeds go in `seeds`, data in `data`).")
        unknown = [k for k in merged if k not in FIELD_NAMES]
        if unknown:
            raise UserError(f"{source}: unknown config field {unknown[0]!r}.{did_you_mean(unknown[0], FIELD_NAMES)}")
        cfg = config_from_dict({**merged, "experiment_id": "check", "train_data_path": "check", "seed": seeds[0]},
                               source).validate(source)
        check_global_batch(cfg.train_batch_size, study.launcher.processes, source)
    return study


# the names pipelines and older code imported before the eval section moved to llm2emb.experiment
_load_eval = load_eval
_precision = parse_precision
read_study_file = read_experiment_file
