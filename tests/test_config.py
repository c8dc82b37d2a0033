"""The training config: seed field names, JSON/YAML, --set typing, validation messages, and the schedule."""
from __future__ import annotations

import json
import math

import pytest

from llm2emb.config import (FIELD_NAMES, TrainConfig, field_docs, load_train_config, parse_override_value,
                            read_config_file)
from llm2emb.errors import UserError
from test_train_support import CONFIGS, SEED_CONFIGS

REQUIRED = ["model_path=m", "experiment_id=e", "train_data_path=d"]

# Every field the seed (seed.md, "配置字段说明") and issue 4 list, by the seed's names.
SEED_FIELDS = """model_path experiment_id train_data_path output_dir tb_dir cache_dir num_hard_neg max_seq_length
train_batch_size train_epochs train_steps checkpointing_steps validation_steps log_interval learning_rate min_lr
weight_decay warmup_steps mrl_enabled mrl_dims mrl_dim_weights spread_enabled spread_weight spread_t lora_enabled
lora_r lora_alpha lora_dropout lora_bias lora_task_type lora_target_modules lora_adapter_path bi_attn_enabled
attn_implementation pooling_mode skip_instruction instruction_separator temperature seed head head_dim
gradient_checkpointing inbatch_hard_negatives""".split()


def test_every_seed_field_exists_and_is_documented():
    assert set(SEED_FIELDS) <= set(FIELD_NAMES)
    docs = {row["name"]: row for row in field_docs()}
    assert all(docs[name]["help"] for name in FIELD_NAMES)


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_seed_configs_load_and_validate(name):
    cfg = load_train_config(CONFIGS / name)
    assert cfg.model_path == "Qwen/Qwen3-0.6B"
    data = json.loads((CONFIGS / name).read_text())
    assert {k for k in data if not k.startswith("_")} >= set(SEED_FIELDS) - {"head", "head_dim",
                                                                           "inbatch_hard_negatives"}
    assert cfg.mrl_enabled == ("mrl" in name) and cfg.spread_enabled == ("spread" in name)
    assert cfg.bi_attn_enabled == ("bi_mean" in name) and cfg.lora_enabled == ("lora" in name)
    assert cfg.pooling_mode == ("mean" if "bi_mean" in name else "eos")
    assert cfg.run_dir.name == cfg.experiment_id and cfg.tb_run_dir.name == cfg.experiment_id


def test_yaml_and_json_give_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text("model_path: m\nexperiment_id: e\ntrain_data_path: d\nmrl_enabled: true\n"
                                     "mrl_dims: [64, 128]\nlearning_rate: 3.0e-4\nhead: null\n")
    (tmp_path / "c.json").write_text(json.dumps({"model_path": "m", "experiment_id": "e", "train_data_path": "d",
                                                 "mrl_enabled": True, "mrl_dims": [64, 128],
                                                 "learning_rate": 3e-4, "_comment": "ignored"}))
    assert load_train_config(tmp_path / "c.yaml") == load_train_config(tmp_path / "c.json")


def test_malformed_json_and_yaml_report_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "model_path": "m",\n  "learning_rate": 1e-4\n  "seed": 1\n}')
    with pytest.raises(UserError, match=r"bad.json: invalid JSON at line 4, column 3"):
        read_config_file(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model_path: m\nmrl_dims: [1, 2\nseed: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml: invalid YAML at line \d+, column \d+"):
        read_config_file(bad_yaml)
    with pytest.raises(UserError, match="does not exist"):
        read_config_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must be a mapping"):
        read_config_file(tmp_path / "list.json")


def test_unknown_fields_get_did_you_mean(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_path": "m", "lora_rank": 8}))
    with pytest.raises(UserError, match=r"c.json: unknown field 'lora_rank'\. Did you mean 'lora_r'\?"):
        load_train_config(tmp_path / "c.json")
    with pytest.raises(UserError, match="unknown field 'warmup_step'.*Did you mean 'warmup_steps'"):
        load_train_config(None, REQUIRED + ["warmup_step=10"])
    with pytest.raises(UserError, match="expected key=value"):
        load_train_config(None, REQUIRED + ["warmup_steps"])


def test_mistyped_values_in_files_are_named(tmp_path):
    for value, expected in (("\"1e-4\"", "learning_rate' must be a number, got '1e-4'"),
                            ("true", "learning_rate' must be a number, got True")):
        (tmp_path / "c.json").write_text(f'{{"model_path": "m", "learning_rate": {value}}}')
        with pytest.raises(UserError, match=expected):
            load_train_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"mrl_dims": [128, "x"]}')
    with pytest.raises(UserError, match="'mrl_dims' must be a list of integers"):
        load_train_config(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"lora_enabled": "yes"}')
    with pytest.raises(UserError, match="'lora_enabled' must be true or false"):
        load_train_config(tmp_path / "c.json")


@pytest.mark.parametrize("name,text,expected", [
    ("learning_rate", "3e-4", 3e-4), ("train_steps", "100", 100), ("train_steps", "1e3", 1000),
    ("train_steps", "-1", -1), ("lora_enabled", "true", True), ("lora_enabled", "No", False),
    ("mrl_dims", "128,256", [128, 256]), ("mrl_dims", "[64, 128]", [64, 128]), ("mrl_dims", "[]", []),
    ("mrl_dim_weights", "1,0.5", [1.0, 0.5]), ("lora_target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
    ("lora_target_modules", '["q_proj"]', ["q_proj"]), ("head", "null", None), ("head", "linear", "linear"),
    ("head_dim", "none", None), ("instruction_separator", '"Query: "', "Query: "),
    ("experiment_id", "run 1", "run 1"),
])
def test_set_values_are_parsed_by_field_type(name, text, expected):
    assert parse_override_value(name, text) == expected


@pytest.mark.parametrize("item,message", [
    ("train_steps=1.5", "train_steps must be an integer"), ("learning_rate=fast", "must be a number"),
    ("lora_enabled=maybe", "must be true or false"), ("mrl_dims=128,x", "must be a list of integers"),
    ("mrl_dims=[128,", "not a valid JSON list"),
])
def test_bad_set_values_are_explained(item, message):
    with pytest.raises(UserError, match=message):
        load_train_config(None, REQUIRED + [item])


@pytest.mark.parametrize("item,message", [
    ("model_path=", "'model_path' is required"),
    ("experiment_id=a/b", "plain folder name"),
    ("train_batch_size=0", "'train_batch_size' must be >= 1"),
    ("learning_rate=0", "'learning_rate' must be a finite number > 0"),
    ("min_lr=1", r"'min_lr' \(1.0\) must not exceed learning_rate"),
    ("train_steps=0", "'train_steps' must be a positive number of steps or -1"),
    ("lora_dropout=1", r"'lora_dropout' must be in \[0, 1\)"),
    ("pooling_mode=meen", "choose one of: eos, mean.*Did you mean 'mean'"),
    ("lora_bias=some", "'lora_bias' is 'some'; choose one of: none, all, lora_only"),
    ("attn_implementation=flashy", "'attn_implementation' is 'flashy'"),
    ("head=conv", "'head' is 'conv'"),
    ("head_dim=32", "head_dim' is set but head is null"),
    ("temperature=-1", "'temperature' must be a finite number > 0"),
    ("lora_adapter_path=/x", "lora_adapter_path' is set but lora_enabled is false"),
    ("max_seq_length=1", "must be >= 2"),
])
def test_validation_messages_name_the_field(item, message):
    with pytest.raises(UserError, match=message):
        load_train_config(None, REQUIRED + [item])


def test_mrl_rules():
    with pytest.raises(UserError, match="'mrl_dims' is empty but mrl_enabled is true"):
        load_train_config(None, REQUIRED + ["mrl_enabled=true"])
    with pytest.raises(UserError, match="'mrl_dim_weights' has 1 values but mrl_dims has 2"):
        load_train_config(None, REQUIRED + ["mrl_enabled=true", "mrl_dims=64,128", "mrl_dim_weights=1"])
    with pytest.raises(UserError, match="lists a dimension twice"):
        load_train_config(None, REQUIRED + ["mrl_enabled=true", "mrl_dims=64,64"])
    with pytest.raises(UserError, match="larger than head_dim 32"):
        load_train_config(None, REQUIRED + ["mrl_enabled=true", "mrl_dims=64", "head=linear", "head_dim=32"])
    cfg = load_train_config(None, REQUIRED + ["mrl_enabled=true", "mrl_dims=64,128"])
    with pytest.raises(UserError, match="'mrl_dims' has 128, but 'm' gives 64-dimensional embeddings"):
        cfg.validate_for_model(64)
    cfg.validate_for_model(128)
    with pytest.raises(UserError, match="spread_weight' is 0 but spread_enabled is true"):
        load_train_config(None, REQUIRED + ["spread_enabled=true"])


def test_aliases_and_derived_values():
    cfg = load_train_config(None, REQUIRED + ["attn_implementation=flash", "max_seq_length=256",
                                              "query_max_length=64", "head=none"])
    assert cfg.attn_implementation == "flash_attention_2" and cfg.head is None
    assert (cfg.query_length, cfg.passage_length) == (64, 256)
    # the seed's Args used null for empty lists
    assert load_train_config(None, REQUIRED, mrl_dims=None).mrl_dims == []
    assert TrainConfig().to_dict()["lora_target_modules"] == []


def test_overrides_win_over_the_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model_path": "m", "experiment_id": "e", "train_data_path": "d",
                                                 "learning_rate": 1e-5, "seed": 1}))
    cfg = load_train_config(tmp_path / "c.json", ["learning_rate=2e-4"], seed=7)
    assert (cfg.learning_rate, cfg.seed) == (2e-4, 7)


def test_warmup_cosine_schedule_ends_at_min_lr():
    import torch

    from llm2emb.train.schedule import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1e-3)
    sched = build_scheduler(opt, "cosine", warmup_steps=4, total_steps=20, learning_rate=1e-3, min_lr=1e-5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[3] == pytest.approx(4e-3 / 5)
    assert lrs[4] == pytest.approx(1e-3)  # peak right after warmup
    assert lrs[-1] == pytest.approx(1e-5)  # the last step trains at min_lr
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay
    mid = 4 + (20 - 4 - 1) / 2
    assert lrs[int(mid)] > 1e-5 and math.isfinite(lrs[int(mid)])
    # the scheduler state round-trips (resume)
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = build_scheduler(opt2, "cosine", 4, 20, 1e-3, 1e-5)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
