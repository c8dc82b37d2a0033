"""The pipeline file: ordered stages, each training from the previous stage's result (or merging results).

    name: demo_staged                    # optional; default the file name. An output folder holds one pipeline.
    model: smollm2-135m                  # what the first stage starts from (default: base's model_path)
    base: ../configs/quickstart.json     # a training config (path or mapping) shared by every training stage
    data: {max_seq_length: 160}          # prepare settings for every stage's data (optional)
    baseline: quickstart                 # optional: every row's change from this stage (or start), with a
                                         # paired-bootstrap 95% interval over queries / pairs
    seeds: [1, 2, 3]                     # optional: the whole pipeline once per seed (each training stage's
                                         # seed), rows reported as mean +- std over seeds
    launcher: {kind: accelerate, config_file: ../configs/accelerate_config.yaml, num_processes: 4}
                                         # optional: how training stages run (default local: inside the driver);
                                         # train_batch_size is then the global batch
    eval:                                # the tasks every stage's result is evaluated on (as in a study file)
      tasks: [builtin:stdlib]
      limits: 200
      start: true                        # also evaluate the starting model (row "start"; default true)
    stages:
      - name: simcse                     # unsupervised SimCSE: every text twice, under dropout
        data: [builtin:stdlib, builtin:stdlib-undocumented]   # raw data: folders, files, built-in data (a list
                                         # is linked into one folder, manifests merged)
        simcse: true                     # rows (text, text) from the data's queries and passages, no instruction
        dropout: 0.1                     # attention / hidden dropout set in the stage's model config
        set: {train_steps: 40, learning_rate: 3.0e-5, lora_enabled: false}
      - name: mntp                       # LLM2Vec's masked next-token prediction (bidirectional, LoRA)
        data: builtin:stdlib             # every query and passage text is an MNTP input
        set: {mntp_mask_probability: 0.2, bi_attn_enabled: true, train_steps: 40}
      - name: supervised
        data: builtin:stdlib
        config: ../configs/x.json        # optional: a config file between base and `set`
        set: {train_steps: 80}
        start: merge                     # after a LoRA stage: merge | continue (the adapter) -- required then
      - name: big                        # a stage may start from another model than the pipeline's
        model: qwen2.5-coder-0.5b
        data: builtin:stdlib
      - name: distilled
        from: supervised
        data: pairs_out/
        teacher: {model: ../teacher, instructions: true}   # teacher_* columns for distill_kl / margin_mse / ...
                                         # (on_the_fly: true runs the teacher at every step instead;
                                         # teacher: {stage: big} makes an earlier stage's result the teacher)
        set: {losses: [{name: contrastive}, {name: distill_kl}]}
      - name: soup                       # a merge stage
        merge: {method: linear, stages: [simcse, supervised], weights: [1, 2]}

A training stage starts from `from` (default: the stage before it; `start`: the pipeline's model; or any
earlier stage's name), or from `model` (another model; merging its descendants with the pipeline model's is
refused). Built-in data is a registry (`llm2emb.data.builtin`); texts-only data (builtin:stdlib-undocumented)
is accepted in SimCSE and MNTP stages only. Its config is base <- config file <- set <- {model_path, train_data_path, output_dir,
experiment_id, tb_dir, lora_adapter_path} filled in by the runner. A merge stage merges the named stages'
results (`method`, `weights`, `options`, `base`: a stage name, `start` or a model; default the inputs'
recorded base). Relative paths are relative to the pipeline file. Everything is checked before any stage
runs (`load_pipeline`): fields, names (unique, no cycle, no reference to a later stage), configs, data,
teacher, merge options, eval tasks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm2emb.errors import UserError, did_you_mean
from llm2emb.model.loading import check_model_reference
from llm2emb.experiment.fields import check_keys as _check_keys

PIPELINE_FIELDS = ("name", "description", "model", "base", "data", "eval", "stages", "baseline", "seeds", "launcher")
STAGE_FIELDS = ("name", "from", "model", "config", "set", "data", "simcse", "dropout", "teacher", "start", "merge")
MERGE_FIELDS = ("method", "stages", "weights", "options", "base", "adapter_level")
TEACHER_FIELDS = ("model", "stage", "instructions", "batch_size", "max_length", "precision", "on_the_fly")
DATA_FIELDS = ("max_seq_length", "instruction_separator", "end_token", "workers")
#: training fields every stage gets from the runner
RUNNER_FIELDS = ("model_path", "train_data_path", "output_dir", "experiment_id", "tb_dir", "lora_adapter_path")
#: what each field means: `llm2emb pipeline --list-fields` and the docs' generated reference print these
FIELD_HELP: dict[str, dict[str, str]] = {
    "pipeline": {
        "name": "the pipeline's name (default: the file name); an output folder holds one pipeline",
        "description": "free text shown in the report",
        "model": "what the first stage starts from (default: base's model_path)",
        "base": "a training config (path or mapping) shared by every training stage",
        "data": "prepare settings for every stage's data (see [data])",
        "eval": "the tasks every stage's result is evaluated on, as in a study file, plus start: false to skip "
                "evaluating the starting model",
        "stages": "the ordered list of stages (see [stage])",
        "baseline": "a stage name or start: every row's change from it, with a paired-bootstrap 95% interval",
        "seeds": "run the whole pipeline once per seed (each training stage's seed); rows as mean +- std",
    },
    "data": {
        "max_seq_length": "prepare's max tokens per text",
        "instruction_separator": "end of the instruction prefix in queries",
        "end_token": "token that ends every text",
        "workers": "tokenizer processes",
    },
    "stage": {
        "name": "the stage's unique name",
        "from": "the stage it starts from (default: the stage before it; start: the pipeline's model)",
        "model": "start from another model instead (e.g. a teacher)",
        "config": "a training config file applied between base and set",
        "set": "training-config overrides for this stage",
        "data": "raw data: a folder, a file, built-in data, or a list of these",
        "simcse": "true: unsupervised SimCSE rows (text, text) from the data's texts",
        "dropout": "attention / hidden dropout set in the stage's model config (SimCSE needs > 0)",
        "teacher": "add teacher_* columns for distillation losses (see [teacher])",
        "start": "after a LoRA stage: merge (fold the adapter in) or continue (train the adapter on)",
        "merge": "makes this a merge stage (see [merge])",
    },
    "merge": {
        "method": "linear | slerp | ties | model_stock (`llm2emb merge` methods)",
        "stages": "the stages whose results are merged",
        "weights": "one weight per merged stage",
        "options": "the method's own options",
        "base": "a stage name, start, or a model (default: the inputs' recorded base)",
        "adapter_level": "merge LoRA adapters instead of full weights",
    },
    "teacher": {
        "model": "the teacher model (anything `llm2emb eval --model` loads)",
        "stage": "an earlier stage whose result is the teacher",
        "instructions": "give the teacher the data's instructions (default true)",
        "batch_size": "teacher encode batch size (default 32)",
        "max_length": "teacher max tokens per text",
        "precision": "the teacher's encode precision (auto | fp32 | bf16 | fp16)",
        "on_the_fly": "run the teacher at every training step instead of adding columns once",
    },
}


def field_sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section, [(field, meaning)])] for every part of a pipeline file (--list-fields, docs)."""
    order = {"pipeline": PIPELINE_FIELDS, "data": DATA_FIELDS, "stage": STAGE_FIELDS, "merge": MERGE_FIELDS,
             "teacher": TEACHER_FIELDS}
    return [(section, [(name, FIELD_HELP[section][name]) for name in names]) for section, names in order.items()]


START = "start"           # the name of the pipeline's starting model as a stage reference
LORA_STARTS = ("merge", "continue")


def builtin_names() -> str:
    from llm2emb.data.builtin import builtin_references

    return ", ".join(builtin_references())


@dataclass
class TeacherSpec:
    model: str                       # the teacher model; for `stage`, filled in by the runner with its result
    instructions: bool = True
    batch_size: int = 32
    max_length: int | None = None
    #: run the teacher at every training step (the training config's teacher_model) instead of adding
    #: teacher_* columns to the prepared data once
    on_the_fly: bool = False
    #: an earlier stage whose result is the teacher (e.g. the same recipe trained on a larger model)
    stage: str | None = None
    #: the teacher's encode precision for the columns (auto | fp32 | bf16 | fp16; None: auto)
    precision: str | None = None


@dataclass
class MergeSpec:
    method: str
    stages: list[str]
    weights: list[float] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    base: str | None = None          # a stage name, "start", or a model (made absolute when a local path)
    adapter_level: bool = False
    base_is_stage: bool = False      # decided once all stage names are known


@dataclass
class Stage:
    name: str
    source: str | None = None        # stage the training starts from ("start": the pipeline's model)
    model: str | None = None         # or another model than the pipeline's (the stage then starts from it)
    config: dict[str, Any] = field(default_factory=dict)   # base <- config file <- set (runner fields added later)
    data: str | list[str] | None = None
    simcse: bool = False
    dropout: float | None = None
    teacher: TeacherSpec | None = None
    start: str | None = None         # merge | continue, when the source is a LoRA adapter
    merge: MergeSpec | None = None
    #: where each config field's value came from (the pipeline's base, the stage's config file, its set, --set),
    #: so that a bad value is reported at the place to fix it; not part of the stage's key
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return "merge" if self.merge is not None else "train"

    @property
    def trains_lora(self) -> bool:
        return self.merge is None and bool(self.config.get("lora_enabled"))

    def references(self) -> list[str]:
        """The stages (or "start") this stage uses."""
        if self.merge is not None:
            return list(self.merge.stages) + ([self.merge.base] if self.merge.base_is_stage else [])
        refs = [self.source] if self.source and self.model is None else []
        return refs + ([self.teacher.stage] if self.teacher is not None and self.teacher.stage else [])


@dataclass
class Pipeline:
    name: str
    path: Path
    model: str
    stages: list[Stage]
    eval: Any                        # llm2emb.experiment.evaluation.EvalSpec
    eval_start: bool = True
    data: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    baseline: str | None = None      # a stage name or "start": report rows compared with it
    seeds: list[int] | None = None   # run the whole pipeline once per seed (every training stage's seed)
    launcher: Any = None             # llm2emb.experiment.launchers.Launcher of the training stages (None: local,
                                     # inside the driver process)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _resolve(value: str, root: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (root / path).resolve())


def _model_ref(value: str, root: Path) -> str:
    """A model reference: a path relative to the file when it exists there, else as given (alias, hub id)."""
    candidate = Path(value).expanduser()
    if not candidate.is_absolute() and (root / candidate).exists():
        return str((root / candidate).resolve())
    return value


def _data_input(value: Any, where: str, root: Path) -> str | list[str]:
    from llm2emb.data.builtin import builtin_references, builtin_train_data

    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise UserError(f"{where}: data must be a folder, a file, a list of folders and dataset files, or one of "
                        f"{builtin_names()}.")
    resolved = []
    for item in items:
        if item.startswith("builtin:"):
            if builtin_train_data(item) is None:
                raise UserError(f"{where}: unknown built-in data {item!r}." + did_you_mean(item, builtin_references())
                                + f" Built-in data: {builtin_names()}.")
            resolved.append(item)
            continue
        path = _resolve(item, root)
        if not Path(path).exists():
            raise UserError(f"{where}: data {item} does not exist ({path}); give a folder of raw datasets, dataset "
                            f"files, or one of {builtin_names()}.")
        from llm2emb.data.formats import check_raw_input

        # a file in a list is linked on its own (its folder's manifest is not read); anything else as prepare reads it
        check_raw_input(path, f"{where}: data {item}", manifest=not isinstance(value, list) or Path(path).is_dir())
        resolved.append(path)
    return resolved if isinstance(value, list) else resolved[0]


def texts_only_data(data: str | list[str]) -> str | None:
    """The first built-in data of a stage that holds texts only (no queries), or None."""
    from llm2emb.data.builtin import builtin_train_data

    for item in data if isinstance(data, list) else [data]:
        found = builtin_train_data(item)
        if found is not None and found.texts_only:
            return item
    return None


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A cycle in a name -> [names it uses] graph, as [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt in edges and state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in edges:
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def _stage(raw: Any, i: int, where: str, root: Path, base: dict[str, Any], forced: Mapping[str, Any],
           base_source: str = "") -> Stage:
    from llm2emb.config import read_config_file
    from llm2emb.experiment.evaluation import parse_precision

    here = f"{where}: stages[{i}]"
    if not isinstance(raw, Mapping):
        raise UserError(f"{here} must be a mapping with name and data (a training stage) or merge (a merge stage).")
    _check_keys(raw, STAGE_FIELDS, here)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith(".") or name == START:
        raise UserError(f"{here}: name {name!r} must be a plain non-empty name (no '/', not {START!r}).")
    here = f"{where}: stage {name!r}"
    if "merge" in raw:
        extra = [k for k in raw if k not in ("name", "merge")]
        if extra:
            raise UserError(f"{here} is a merge stage and cannot also have {extra[0]!r}; give a merge stage only "
                            "name and merge.")
        value = raw["merge"]
        if not isinstance(value, Mapping):
            raise UserError(f"{here}: merge must be a mapping with method and stages.")
        _check_keys(value, MERGE_FIELDS, f"{here}: merge")
        stages = value.get("stages")
        if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
            raise UserError(f"{here}: merge.stages must be a list of earlier stage names.")
        weights = value.get("weights")
        if weights is not None and (not isinstance(weights, list) or
                                    not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
            raise UserError(f"{here}: merge.weights must be a list of numbers, one per merged stage.")
        options = value.get("options") or {}
        if not isinstance(options, Mapping):
            raise UserError(f"{here}: merge.options must be a mapping, e.g. {{t: 0.5}}.")
        merge_base = value.get("base")
        if merge_base is not None and not isinstance(merge_base, str):
            raise UserError(f"{here}: merge.base must be a stage name, {START!r} or a model.")
        from llm2emb.merge.registry import get_method, parse_options

        method = value.get("method", "linear")
        try:
            cls = get_method(method)
            parse_options(cls, dict(options))
        except UserError as exc:
            raise UserError(f"{here}: {exc}") from None
        if weights is not None and len(weights) != len(stages):
            raise UserError(f"{here}: merge.weights has {len(weights)} values for {len(stages)} stages; give one "
                            "weight per stage.")
        return Stage(name, merge=MergeSpec(method, list(stages), [float(w) for w in weights] if weights else None,
                                           dict(options), merge_base, bool(value.get("adapter_level", False))))
    if raw.get("data") is None:
        raise UserError(f"{here} has no data; give a training stage its raw data (folder, file or builtin:stdlib), "
                        "or make it a merge stage with merge.")
    config = dict(base)
    sources = {k: base_source or f"{where}: base" for k in base}
    if raw.get("config") is not None:
        if not isinstance(raw["config"], str):
            raise UserError(f"{here}: config must be a training config file path.")
        path = _resolve(raw["config"], root)
        from_file = {k: v for k, v in read_config_file(path).items() if not k.startswith("_")}
        config.update(from_file)
        sources.update({k: str(path) for k in from_file})
    overrides = raw.get("set") or {}
    if not isinstance(overrides, Mapping):
        raise UserError(f"{here}: set must be a mapping of training config fields, e.g. {{train_steps: 40}}.")
    config.update(overrides)
    config.update(forced)
    sources.update({k: f"{here}: set" for k in overrides})
    sources.update({k: "--set" for k in forced})
    taken = [k for k in RUNNER_FIELDS if k in overrides or k in forced]
    if taken:
        raise UserError(f"{here}: {taken[0]} is set by the pipeline for every stage; remove it from set (the model "
                        "comes from `from`, the data from `data`).")
    dropout = raw.get("dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise UserError(f"{here}: dropout must be a number in [0, 1), got {dropout!r}.")
    simcse = raw.get("simcse", False)
    if not isinstance(simcse, bool):
        raise UserError(f"{here}: simcse must be true or false.")
    if simcse and not dropout:
        raise UserError(f"{here}: simcse needs dropout > 0 (decoder LLMs ship with dropout 0, and SimCSE's two "
                        "views of a text differ only by dropout); set e.g. dropout: 0.1.")
    teacher = None
    if raw.get("teacher") is not None:
        value = raw["teacher"]
        if isinstance(value, str):
            value = {"model": value}
        if not isinstance(value, Mapping) or (isinstance(value.get("model"), str) == isinstance(value.get("stage"), str)):
            raise UserError(f"{here}: teacher must be a model, or a mapping with either model or stage (an earlier "
                            "stage whose result teaches; and instructions, batch_size, max_length, on_the_fly).")
        _check_keys(value, TEACHER_FIELDS, f"{here}: teacher")
        teacher_stage = value.get("stage")
        if not teacher_stage:
            check_model_reference(_model_ref(value["model"], root), f"{here}: teacher.model")
        teacher = TeacherSpec(model="" if teacher_stage else _model_ref(value["model"], root), stage=teacher_stage,
                              instructions=bool(value.get("instructions", True)),
                              batch_size=int(value.get("batch_size", 32)), max_length=value.get("max_length"),
                              on_the_fly=bool(value.get("on_the_fly", False)),
                              precision=parse_precision(value.get("precision"), here, "teacher.precision"))
    start = raw.get("start")
    if start is not None and start not in LORA_STARTS:
        raise UserError(f"{here}: start must be {' or '.join(LORA_STARTS)} (what to do with the previous stage's LoRA "
                        f"adapter), got {start!r}.")
    source = raw.get("from")
    if source is not None and not isinstance(source, str):
        raise UserError(f"{here}: from must be a stage name or {START!r}.")
    model = raw.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise UserError(f"{here}: model must be a model (built-in alias, folder or hub id) to start from.")
        if source is not None:
            raise UserError(f"{here} has both from and model; a stage starts from one of them.")
        if start is not None:
            raise UserError(f"{here}: start applies to a LoRA adapter of an earlier stage, but the stage starts from "
                            "model; remove start.")
        model = _model_ref(model, root)
        check_model_reference(model, f"{here}: model")
    data = _data_input(raw["data"], here, root)
    texts = texts_only_data(data)
    if texts and not simcse and not config.get("mntp_mask_probability"):
        raise UserError(f"{here}: {texts} holds texts without queries; use it in a SimCSE (simcse: true) or MNTP "
                        "(set: {mntp_mask_probability: 0.2}) stage, or give the stage query-passage data.")
    return Stage(name, source=START if model is not None else source, model=model, config=config, data=data,
                 simcse=simcse, dropout=float(dropout) if dropout is not None else None, teacher=teacher, start=start,
                 sources=sources)


def _check_dropout(model: str, dropout: float, here: str) -> None:
    """A stage's `dropout` needs dropout fields in its model's config.json (checked for local models; the runner
    checks the others once they are prepared)."""
    from llm2emb.layout import resolve_model_source
    from llm2emb.pipeline.models import DROPOUT_FIELDS, HF_CONFIG, dropout_values

    path = Path(model).expanduser()
    if not path.is_dir():
        return
    folder = Path(resolve_model_source(path).model_path)
    if (folder / HF_CONFIG).is_file() and not dropout_values(folder):
        raise UserError(f"{here}: dropout {dropout} needs a dropout setting in the config.json of {folder}, which has "
                        f"none of {', '.join(DROPOUT_FIELDS)}; drop dropout (and simcse) for this model.")


def root_model(stages: list[Stage], name: str, start_model: str) -> str:
    """The model a stage's result grew from (its chain of `from` back to a `model` or the pipeline's)."""
    if name == START:
        return start_model
    stage = next(s for s in stages if s.name == name)
    if stage.kind == "merge":
        return root_model(stages, stage.merge.stages[0], start_model)
    if stage.model is not None:
        return stage.model
    return root_model(stages, stage.source, start_model)


def load_pipeline(path: str | Path, overrides: Mapping[str, Any] | None = None,
                  eval_tasks: list[str] | None = None, seeds: list[int] | None = None,
                  launcher_kind: str | None = None) -> Pipeline:
    """Read and check a pipeline file (see the module docstring); a UserError before anything runs.
    `overrides` (the command line's --set) are applied to every training stage, after its own `set`;
    `eval_tasks` (--eval-task) are evaluated on every result besides the file's tasks; `seeds` (--seeds)
    replaces the file's seeds; `launcher_kind` (--launcher) replaces the launcher section's kind."""
    from llm2emb.experiment.launchers import load_launcher
    from llm2emb.experiment.launchers.base import check_global_batch
    from llm2emb.config import FIELD_NAMES, config_from_dict, read_config_file
    from llm2emb.losses import LOSS_REGISTRY
    from llm2emb.experiment.evaluation import load_eval
    from llm2emb.experiment.fields import check_seeds, read_experiment_file

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"Pipeline file {path} {what}; pass a YAML or JSON file such as pipelines/demo_staged.yaml.")
    raw = read_experiment_file(path, "pipeline", PIPELINE_FIELDS)   # YAML / JSON with duplicate keys refused
    root, where = path.parent, str(path)
    _check_keys(raw, PIPELINE_FIELDS, where)
    if seeds is not None or raw.get("seeds") is not None:
        seeds = check_seeds(seeds if seeds is not None else raw["seeds"], where if seeds is None else "--seeds")
        if "seed" in (overrides or {}):
            raise UserError("--set seed=... and seeds both set every stage's seed; give one of them.")
        for i, stage_raw in enumerate(raw.get("stages") or []):
            if isinstance(stage_raw, Mapping) and "seed" in (stage_raw.get("set") or {}):
                raise UserError(f"{where}: stage {stage_raw.get('name', i)!r} sets seed, but the pipeline's seeds "
                                "set every stage's seed; remove seed from the stage's set.")
    base_value = raw.get("base", {}) or {}
    if isinstance(base_value, str):
        base = {k: v for k, v in read_config_file(_resolve(base_value, root)).items() if not k.startswith("_")}
    elif isinstance(base_value, Mapping):
        base = dict(base_value)
    else:
        raise UserError(f"{where}: base must be a training config file path or a mapping of config fields.")
    model = raw.get("model") or base.get("model_path")
    if not isinstance(model, str) or not model:
        raise UserError(f"{where}: model (what the first stage starts from) is missing; set model: or base's "
                        "model_path.")
    model = _model_ref(model, root)
    check_model_reference(model, f"{where}: model")
    base = {k: v for k, v in base.items() if k not in RUNNER_FIELDS}
    data = raw.get("data") or {}
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: data must be a mapping of prepare settings ({', '.join(DATA_FIELDS)}).")
    _check_keys(data, DATA_FIELDS, f"{where}: data")
    eval_raw = raw.get("eval")
    eval_start = True
    if isinstance(eval_raw, Mapping) and "start" in eval_raw:
        eval_start = bool(eval_raw["start"])
        eval_raw = {k: v for k, v in eval_raw.items() if k != "start"}
    if eval_tasks and isinstance(eval_raw, Mapping) and isinstance(eval_raw.get("tasks"), list):
        extra = [str(Path(t).expanduser().resolve()) if Path(t).expanduser().exists() else t for t in eval_tasks]
        eval_raw = {**eval_raw, "tasks": list(eval_raw["tasks"]) + extra}
    eval_spec = load_eval(eval_raw, where, root)

    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UserError(f"{where}: stages must be a non-empty list of stages.")
    names = [s.get("name") if isinstance(s, Mapping) else None for s in stages_raw]
    twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if twice:
        raise UserError(f"{where}: two stages are named {twice[0]!r}; give every stage its own name.")
    base_source = str(_resolve(base_value, root)) if isinstance(base_value, str) else f"{where}: base"
    stages = [_stage(s, i, where, root, base, overrides or {}, base_source) for i, s in enumerate(stages_raw)]
    order = {s.name: i for i, s in enumerate(stages)}
    for stage in stages:
        if stage.merge is not None and stage.merge.base is not None:
            stage.merge.base_is_stage = stage.merge.base in order or stage.merge.base == START
            if not stage.merge.base_is_stage:
                stage.merge.base = _model_ref(stage.merge.base, root)
    for i, stage in enumerate(stages):
        if stage.kind == "train" and stage.source is None:
            stage.source = stages[i - 1].name if i > 0 else START
    for stage in stages:
        for ref in stage.references():
            if ref != START and ref not in order:
                raise UserError(f"{where}: stage {stage.name!r} uses stage {ref!r}, which does not exist."
                                + did_you_mean(ref, list(order)) + f" Stages: {', '.join(order)}.")
    cycle = find_cycle({s.name: [r for r in s.references() if r != START] for s in stages})
    if cycle:
        raise UserError(f"{where}: stages {' -> '.join(cycle)} form a cycle; a stage can only start from or merge "
                        "stages before it.")
    for stage in stages:
        for ref in stage.references():
            if ref != START and order[ref] >= order[stage.name]:
                raise UserError(f"{where}: stage {stage.name!r} uses stage {ref!r}, which comes after it; move "
                                f"{ref!r} before {stage.name!r}.")
    for stage in stages:
        if stage.teacher is not None and stage.teacher.stage == START:
            raise UserError(f"{where}: stage {stage.name!r}: teacher.stage must name an earlier stage; for the "
                            "starting model give teacher.model.")
        if stage.kind == "merge":
            roots = {name: root_model(stages, name, model) for name in stage.merge.stages}
            if len(set(roots.values())) > 1:
                a = stage.merge.stages[0]
                b = next(n for n in stage.merge.stages if roots[n] != roots[a])
                raise UserError(f"{where}: stage {stage.name!r} merges {a!r} (grown from {roots[a]}) with {b!r} (grown "
                                f"from {roots[b]}); merged models must share a base model.")
    launcher = load_launcher(raw.get("launcher"), where, root, launcher_kind)
    if launcher.max_parallel > 1:
        raise UserError(f"{where}: launcher.max_parallel is for studies; a pipeline's stages run one after another "
                        "(each from the previous result), so remove it.")
    for stage in stages:
        here = f"{where}: stage {stage.name!r}"
        if stage.kind == "merge":
            continue
        if stage.dropout:
            _check_dropout(root_model(stages, stage.name, model), stage.dropout, here)
        unknown = [k for k in stage.config if k not in FIELD_NAMES]
        if unknown:
            raise UserError(f"{here}: unknown config field {unknown[0]!r}.{did_you_mean(unknown[0], FIELD_NAMES)}")
        check = {**stage.config, "model_path": model, "experiment_id": stage.name, "train_data_path": "check"}
        for key, value in stage.config.items():
            config_from_dict({key: value}, stage.sources.get(key, here))     # a wrong type names its source
        cfg = config_from_dict(check, here).validate(here, stage.sources)
        check_global_batch(cfg.train_batch_size, launcher.processes, here)
        source = None if stage.source == START else next(s for s in stages if s.name == stage.source)
        source_lora = source is not None and (source.trains_lora or
                                              (source.kind == "merge" and source.merge.adapter_level))
        if source_lora and stage.start is None:
            raise UserError(f"{here} starts from stage {source.name!r}, which trains a LoRA adapter; say what to do "
                            "with it: start: merge (fold it into the weights) or start: continue (train the adapter "
                            "on).")
        if stage.start == "continue" and not stage.trains_lora:
            raise UserError(f"{here}: start: continue trains the previous stage's adapter on, so the stage needs "
                            "lora_enabled: true in its config.")
        if stage.start is not None and not source_lora:
            raise UserError(f"{here}: start: {stage.start} applies to a LoRA adapter, but it starts from "
                            f"{stage.source!r}, which has full weights; remove start.")
        if stage.teacher is not None and not any(
                getattr(LOSS_REGISTRY.get((entry or {}).get("name")), "uses_teacher", False)
                for entry in stage.config.get("losses") or []):
            raise UserError(f"{here} has a teacher but no distillation loss; add one to set.losses, e.g. "
                            "[{name: contrastive}, {name: distill_kl}].")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in order and not (baseline == START and eval_start):
        raise UserError(f"{where}: baseline {baseline!r} is not a stage." + did_you_mean(str(baseline), list(order))
                        + f" Give a stage name{' or start' if eval_start else ''}.")
    return Pipeline(name=str(raw.get("name") or path.stem), path=path, model=model, stages=stages, eval=eval_spec,
                    eval_start=eval_start, data=dict(data), description=str(raw.get("description") or ""),
                    baseline=baseline, seeds=seeds, launcher=launcher)


def seeded(pipeline: Pipeline, seed: int) -> Pipeline:
    """The pipeline with every training stage's seed set to `seed` (one run of a seeds pipeline)."""
    from dataclasses import replace

    stages = [stage if stage.merge is not None else replace(stage, config={**stage.config, "seed": seed})
              for stage in pipeline.stages]
    return replace(pipeline, stages=stages, seeds=None)
