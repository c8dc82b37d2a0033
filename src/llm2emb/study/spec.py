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
    EVAL_FIELDS, TASK_OPTION_FIELDS, EvalSpec, EvalTask, eval_identity, load_eval, parse_precision, task_path,
)
from llm2emb.experiment.fields import (  # noqa: F401
    check_keys, check_seeds, config_hash, int_field, read_experiment_file, resolve_path,
)
from llm2emb.experiment.launchers.base import check_global_batch

STUDY_FIELDS = ("name", "description", "base", "recipes", "seeds", "budget", "data", "eval", "launcher")
DATA_FIELDS = ("train_data_path", "input", "manifest", "max_seq_length", "instruction_separator", "end_token",
               "workers")
#: what each field means: `llm2emb study --list-fields` and the docs' generated reference print these
FIELD_HELP: dict[str, dict[str, str]] = {
    "study": {
        "name": "the study's name (default: the file name); the output folder holds one study",
        "description": "free text shown in the report",
        "base": "a training config (path or inline mapping) shared by every recipe",
        "recipes": "ordered mapping name -> config file, inline overrides of base, or {config: FILE, ...overrides}; "
                   "the first recipe is the baseline",
        "seeds": "list of random seeds; every recipe trains once per seed (a cell)",
        "budget": "training fields forced on every recipe after its config file (e.g. train_steps, "
                  "train_batch_size)",
        "data": "the training data: raw input prepared once per tokenizer, or train_data_path (see [data])",
        "eval": "the tasks every cell is evaluated on and their options (see [eval])",
        "launcher": "how cells / training stages run: {kind: local | accelerate | slurm | ray, ...} (docs: Scale); "
                    "--launcher replaces the kind",
    },
    "data": {
        "train_data_path": "data prepared already (`llm2emb prepare` output); excludes input",
        "input": "raw data: a folder, a dataset file, a list of files, or built-in data (builtin:stdlib)",
        "manifest": "task types / instructions of the input datasets (as manifest.json)",
        "max_seq_length": "prepare's max tokens per text (default: the cells' max_seq_length)",
        "instruction_separator": "end of the instruction prefix in queries (prepare's --instruction-separator)",
        "end_token": "token that ends every text (prepare's --end-token)",
        "workers": "tokenizer processes (prepare's --workers)",
    },
    "eval": {
        "tasks": "anything `llm2emb eval --tasks` takes, or mappings {task: ..., name, limits, max_length, ...}",
        "limits": "keep a seeded sample of this many queries / pairs per task",
        "max_length": "max tokens per text at evaluation",
        "query_instruction": "instruction prepended to queries (default: the trained model's)",
        "batch_size": "encode batch size (default 32)",
        "dims": "extra Matryoshka rows: evaluate the first d coordinates too",
        "seed": "seed of the --limits sample (default 42)",
        "split": "the task split to evaluate",
        "precision": "encode precision auto | fp32 | bf16 | fp16 (default: auto, bf16 where the device computes it natively)",
    },
    "eval.tasks[i] (a task mapping)": {
        "task": "the task (anything `llm2emb eval --tasks` takes)",
        "name": "the task's name in the report",
        "limits": "overrides eval.limits for this task",
        "max_length": "overrides eval.max_length for this task",
        "query_instruction": "overrides eval.query_instruction for this task",
        "batch_size": "overrides eval.batch_size for this task",
        "split": "overrides eval.split for this task",
    },
}


def field_sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section, [(field, meaning)])] in the order the study file checks them (--list-fields, docs)."""
    order = {"study": STUDY_FIELDS, "data": DATA_FIELDS, "eval": EVAL_FIELDS,
             "eval.tasks[i] (a task mapping)": TASK_OPTION_FIELDS}
    return [(section, [(name, FIELD_HELP[section][name]) for name in names]) for section, names in order.items()]


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




@dataclass
class DataSpec:
    train_data_path: str | None = None
    input: str | list[str] | None = None     # a folder / file of raw datasets, a list of dataset files, builtin
    manifest: dict[str, Any] | None = None    # task types / instructions of the input datasets (manifest.json)
    max_seq_length: int | None = None       # prepare's --max-length (default: the cells' max_seq_length)
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
        if not Path(data.train_data_path).is_dir():
            raise UserError(f"{where}: data.train_data_path {data.train_data_path} is not a folder; give the output "
                            "of `llm2emb prepare`, or raw data as data.input.")
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
        if not _builtin_data(item):
            from llm2emb.data.formats import check_raw_input

            check_raw_input(item, f"{where}: data.input {item}",
                            manifest=not isinstance(data.input, list) or Path(item).is_dir())
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
        sources = _field_sources(study, recipe, where, base_value, extra_budget)
        for key in merged:
            config_from_dict({key: merged[key]}, sources.get(key, source))     # a wrong type names its source
        if untrained(merged):
            check_untrained(study, recipe, source)
        cfg = config_from_dict({**merged, "experiment_id": "check", "train_data_path": "check", "seed": seeds[0]},
                               source).validate(source, sources, untrained=untrained(merged))
        check_global_batch(cfg.train_batch_size, study.launcher.processes, source)
        from llm2emb.model.loading import check_model_reference

        for name in ("model_path", "teacher_model"):
            if isinstance(merged.get(name), str) and merged[name]:
                check_model_reference(merged[name], f"{sources.get(name, source)}: field {name!r}")
    return study


def untrained(config: Mapping[str, Any]) -> bool:
    """A `train_steps: 0` recipe: the base model evaluated once (one cell, the first seed: nothing is random)."""
    return config.get("train_steps") == 0


def check_untrained(study: "Study", recipe: Recipe, source: str) -> None:
    """An untrained recipe sets only how texts are tokenised and pooled (config.UNTRAINED_FIELDS), and no
    pooling or head with weights (they would stay random)."""
    from llm2emb.config import UNTRAINED_FIELDS, read_config_file
    from llm2emb.model.pooling import POOLING_REGISTRY

    own = dict(recipe.overrides)
    if recipe.config_file:
        own.update({k: v for k, v in read_config_file(recipe.config_file).items() if not k.startswith("_")})
    extra = sorted(k for k in own if k not in UNTRAINED_FIELDS)
    if extra:
        raise UserError(f"{source}: train_steps 0 evaluates the base model untrained, so {extra[0]!r} (a training "
                        f"field) means nothing there; remove it, or give the recipe training steps.")
    merged = study.recipe_config(recipe)
    pooling = merged.get("pooling_mode", "eos")
    if getattr(POOLING_REGISTRY.get(pooling), "trainable", False) or merged.get("head") not in (None, "", "none"):
        raise UserError(f"{source}: train_steps 0 evaluates the base model untrained, but "
                        f"{'pooling ' + pooling if pooling in POOLING_REGISTRY else 'the head'} has weights that "
                        "only training sets; use eos, mean or weighted_mean pooling without a head.")


def _field_sources(study: Study, recipe: Recipe, where: str, base_value: Any,
                   extra_budget: Mapping[str, Any] | None) -> dict[str, str]:
    """Where each field of a recipe's config came from (the last of base <- recipe file <- budget <- --set <-
    recipe overrides that sets it), so that a bad value is reported at the place to fix it."""
    from llm2emb.config import read_config_file

    sources = {k: (str(resolve_path(base_value, study.path.parent)) if isinstance(base_value, str)
                   else f"{where}: base") for k in study.base}
    if recipe.config_file:
        sources.update({k: recipe.config_file for k in read_config_file(recipe.config_file)})
    file_budget = {k for k in study.budget if k not in (extra_budget or {})}
    sources.update({k: f"{where}: budget" for k in file_budget})
    sources.update({k: "--set" for k in (extra_budget or {})})
    sources.update({k: f"{where}: recipe {recipe.name!r}" for k in recipe.overrides})
    return sources

