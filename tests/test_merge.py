"""`llm2emb merge`: every method against hand-computed tensors, whole models merged tensor by tensor (trained
pooling included), LoRA inputs folded or merged at adapter level, runs and checkpoints as inputs, bad inputs
refused with one sentence before anything is written, and a merged folder that loads, encodes and exports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm2emb import Embedder
from llm2emb.cli import main
from llm2emb.errors import UserError
from llm2emb.merge import MERGE_METHODS, merge_models, parse_options
from llm2emb.merge.linear import LinearMerge
from llm2emb.merge.model_stock import interpolation_ratio, model_stock
from llm2emb.merge.slerp import slerp
from llm2emb.merge.ties import ties, trim

f64 = dict(dtype=torch.float64)
TEXTS = ["merging embedding models", "a second text, a little longer than the first", "x"]


def t(*values) -> torch.Tensor:
    return torch.tensor(values, **f64)


# ----------------------------------------------------------------------------------- methods, by hand

def test_registry_lists_the_four_methods():
    assert {"linear", "slerp", "ties", "model_stock"} <= set(MERGE_METHODS)


def test_linear_by_hand():
    a, b = t(1.0, 2.0), t(3.0, 6.0)
    merged = LinearMerge(LinearMerge.Options(), [1.0, 3.0]).merge([a, b], None)
    torch.testing.assert_close(merged, t(2.5, 5.0))      # (1*1 + 3*3) / 4, (2 + 18) / 4
    raw = LinearMerge(LinearMerge.Options(normalize=False), [1.0, 3.0]).merge([a, b], None)
    torch.testing.assert_close(raw, t(10.0, 20.0))
    torch.testing.assert_close(a, t(1.0, 2.0))            # inputs untouched


def test_slerp_by_hand():
    s = math.sqrt(2) / 2
    torch.testing.assert_close(slerp(t(1.0, 0.0), t(0.0, 1.0), 0.5), t(s, s))
    # a third of the 90-degree arc: (cos 30, sin 30)
    torch.testing.assert_close(slerp(t(1.0, 0.0), t(0.0, 1.0), 1 / 3), t(math.sqrt(3) / 2, 0.5))
    # norms are interpolated by the same coefficients: sin(pi/4)/sin(pi/2) * (2, 0) + ... * (0, 1)
    torch.testing.assert_close(slerp(t(2.0, 0.0), t(0.0, 1.0), 0.5), t(2 * s, s))
    # the ends are the inputs
    torch.testing.assert_close(slerp(t(2.0, 1.0), t(-1.0, 3.0), 0.0), t(2.0, 1.0))
    torch.testing.assert_close(slerp(t(2.0, 1.0), t(-1.0, 3.0), 1.0), t(-1.0, 3.0))
    # parallel tensors: linear interpolation (sin theta ~ 0)
    torch.testing.assert_close(slerp(t(1.0, 1.0), t(2.0, 2.0), 0.25), t(1.25, 1.25))
    # a zero tensor: linear too
    torch.testing.assert_close(slerp(t(0.0, 0.0), t(2.0, 4.0), 0.5), t(1.0, 2.0))


def test_ties_by_hand():
    base = t(1.0, 1.0, 1.0, 1.0)
    tau = [t(3.0, -1.0, 0.5, -2.0), t(-1.0, 2.0, -0.2, -4.0), t(-2.0, -3.0, 1.0, 0.1)]
    inputs = [base + x for x in tau]
    # density 0.5 of 4 entries keeps 2 per task vector:
    #   (3, 0, 0, -2), (0, 2, 0, -4), (-2, -3, 0, 0); sum (1, -1, 0, -6) -> signs (+, -, + [0 counts +], -)
    #   entry 0: 3 agrees, -2 not -> 3; entry 1: -3 -> -3; entry 2: nothing kept -> 0; entry 3: (-2 - 4) / 2 = -3
    torch.testing.assert_close(trim(tau[0], 0.5), t(3.0, 0.0, 0.0, -2.0))
    torch.testing.assert_close(ties(inputs, base, [1, 1, 1], density=0.5), base + t(3.0, -3.0, 0.0, -3.0))
    # weights (1, 2, 1): weighted (3, 0, 0, -2), (0, 4, 0, -8), (-2, -3, 0, 0); sum (1, 1, 0, -10) -> (+, +, +, -)
    #   entry 0: 3 / 1; entry 1: 4 / 2 = 2; entry 3: (-2 - 8) / (1 + 2); scale 0.5 halves the task vector
    got = ties(inputs, base, [1, 2, 1], density=0.5, scale=0.5)
    torch.testing.assert_close(got, base + 0.5 * t(3.0, 2.0, 0.0, -10 / 3))
    # density 1 keeps everything: entry 2 has (+0.5, -0.2, +1) -> sign +, mean of 0.5 and 1
    full = ties(inputs, base, [1, 1, 1], density=1.0)
    torch.testing.assert_close(full[2], base[2] + 0.75)


def test_model_stock_by_hand():
    base = t(0.0, 0.0)
    # task vectors (1, 0) and (1, 1): cos 1/sqrt(2); t = 2 cos / (1 + cos) = 2 (sqrt 2 - 1)
    ratio = 2 * (math.sqrt(2) - 1)
    assert interpolation_ratio([t(1.0, 0.0), t(1.0, 1.0)], base) == pytest.approx(ratio)
    torch.testing.assert_close(model_stock([t(1.0, 0.0), t(1.0, 1.0)], base), ratio * t(1.0, 0.5))
    # three models, pairwise cosines 0, 1/sqrt 2, 1/sqrt 2 -> mean sqrt(2)/3; t = 3c / (1 + 2c)
    three = [t(1.0, 0.0, 0.0), t(0.0, 1.0, 0.0), t(1.0, 1.0, 0.0)]
    c = math.sqrt(2) / 3
    assert interpolation_ratio(three, t(0.0, 0.0, 0.0)) == pytest.approx(3 * c / (1 + 2 * c))
    # a base away from 0: the ratio is about task vectors, the result interpolates the weights themselves
    shifted = t(5.0, -1.0)
    torch.testing.assert_close(model_stock([shifted + t(1.0, 0.0), shifted + t(1.0, 1.0)], shifted),
                               shifted + ratio * t(1.0, 0.5))
    # opposite task vectors (negative cosine): the base
    torch.testing.assert_close(model_stock([t(1.0, 0.0), t(-1.0, 0.2)], base), base)
    # identical fine-tunes (cos 1): t = 1, the fine-tune itself
    torch.testing.assert_close(model_stock([t(2.0, 3.0), t(2.0, 3.0)], base), t(2.0, 3.0))


def test_options_are_parsed_and_checked():
    assert parse_options(MERGE_METHODS["slerp"], ["t=0.25"]).t == 0.25
    assert parse_options(MERGE_METHODS["linear"], {"normalize": "false"}).normalize is False
    assert parse_options(MERGE_METHODS["ties"], ["density=0.5", "scale=2"]).scale == 2.0
    with pytest.raises(UserError, match=r"t must be in \[0, 1\]"):
        parse_options(MERGE_METHODS["slerp"], ["t=1.5"])
    with pytest.raises(UserError, match="has no option 'densty'.*Did you mean 'density'"):
        parse_options(MERGE_METHODS["ties"], ["densty=0.5"])
    with pytest.raises(UserError, match="density must be in"):
        parse_options(MERGE_METHODS["ties"], ["density=0"])
    with pytest.raises(UserError, match="must be a finite float"):
        parse_options(MERGE_METHODS["ties"], ["density=abc"])
    with pytest.raises(UserError, match="expected key=value"):
        parse_options(MERGE_METHODS["slerp"], ["0.3"])


# ----------------------------------------------------------------------------------- whole models

def fine_tune(tiny_model: Path, out: Path, seed: int, pooling: str = "mean", scale: float = 0.02) -> Path:
    """A stand-in for a fine-tune of `tiny_model`: every weight moved by seeded noise (pooling weights too)."""
    emb = Embedder.from_pretrained(str(tiny_model), pooling=pooling)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in emb.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    emb.save(out)
    return out


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update({f"{file.stem}:{k}": v for k, v in load_file(str(file)).items()})
    return state


@pytest.fixture(scope="module")
def two_fine_tunes(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tunes")
    return [fine_tune(tiny_model, root / f"ft{i}", seed=i, pooling="attention") for i in range(2)]


def test_linear_merge_of_two_models_tensor_by_tensor(two_fine_tunes, tmp_path):
    out = merge_models(two_fine_tunes, tmp_path / "merged", method="linear", weights=[1.0, 3.0]).path
    a, b, m = weights_of(two_fine_tunes[0]), weights_of(two_fine_tunes[1]), weights_of(out)
    assert set(m) == set(a) and any(k.startswith("modules:pooling.") for k in m)   # trained pooling merged too
    for key in m:
        torch.testing.assert_close(m[key], (a[key] + 3 * b[key]) / 4, rtol=0, atol=1e-6)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["method"] == "linear" and info["weights"] == [1.0, 3.0] and len(info["inputs"]) == 2
    config = json.loads((out / "llm2emb_config.json").read_text())
    assert config["pooling"] == "attention" and config["lora_adapter"] is False
    vectors = Embedder.from_pretrained(str(out)).encode(TEXTS)
    assert vectors.shape == (3, 64) and np.isfinite(vectors).all()


def test_slerp_merge_of_two_models(two_fine_tunes, tmp_path):
    out = merge_models(two_fine_tunes, tmp_path / "slerp", method="slerp", options={"t": 0.3}).path
    a, b, m = weights_of(two_fine_tunes[0]), weights_of(two_fine_tunes[1]), weights_of(out)
    for key in ("model:layers.0.self_attn.q_proj.weight", "modules:pooling.query"):
        torch.testing.assert_close(m[key], slerp(a[key].double(), b[key].double(), 0.3).float(), rtol=0, atol=1e-6)


def test_task_vector_methods_use_the_recorded_base(tiny_model, two_fine_tunes, tmp_path):
    base = {f"model:{k}": v for k, v in Embedder.from_pretrained(str(tiny_model)).backbone.state_dict().items()}
    a, b = weights_of(two_fine_tunes[0]), weights_of(two_fine_tunes[1])
    key = "layers.1.mlp.up_proj.weight"
    ties_out = merge_models(two_fine_tunes, tmp_path / "ties", method="ties", options={"density": 0.3})
    assert ties_out.base == str(tiny_model)           # from llm2emb_config.json: base_model
    m = weights_of(ties_out.path)
    expect = ties([a[f"model:{key}"].double(), b[f"model:{key}"].double()], base[f"model:{key}"].double(),
                  [1, 1], density=0.3)
    torch.testing.assert_close(m[f"model:{key}"], expect.float(), rtol=0, atol=1e-6)
    # the raw base has no attention-pooling weights: those are averaged
    assert "pooling.query" in ties_out.linear_fallback
    pooling = "modules:pooling.query"
    torch.testing.assert_close(m[pooling], (a[pooling] + b[pooling]) / 2)
    stock = weights_of(merge_models(two_fine_tunes, tmp_path / "stock", method="model_stock").path)
    expect = model_stock([a[f"model:{key}"].double(), b[f"model:{key}"].double()], base[f"model:{key}"].double())
    torch.testing.assert_close(stock[f"model:{key}"], expect.float(), rtol=0, atol=1e-6)
    # independent noise on top of the same base: the fine-tunes are ~orthogonal, so model stock stays near the
    # base, while the plain average keeps half of each fine-tune's movement
    ratio = interpolation_ratio([a[f"model:{key}"].double(), b[f"model:{key}"].double()], base[f"model:{key}"].double())
    assert 0 <= ratio < 0.2


def test_lora_inputs_are_folded_and_adapter_level_equals_it(tiny_model, tmp_path):
    from test_export import perturb_lora

    folders = []
    for seed in (1, 2):
        emb = Embedder.from_pretrained(str(tiny_model), pooling="mean")
        emb.add_lora(r=4, alpha=8 * seed)                 # different scalings s = alpha / r
        perturb_lora(emb, seed)
        folders.append(emb.save(tmp_path / f"lora{seed}"))
    folded = merge_models(folders, tmp_path / "folded", method="linear", weights=[0.25, 0.75]).path
    assert not (folded / "adapter_config.json").exists()
    adapter = merge_models(folders, tmp_path / "adapter", method="linear", weights=[0.25, 0.75],
                           adapter_level=True).path
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    # the adapter-level merge is the same model as the folded one ...
    want = Embedder.from_pretrained(str(folded)).encode(TEXTS)
    got = Embedder.from_pretrained(str(adapter)).encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=2e-5)
    # ... and that is the average of the two adapted models' weights
    one, two = (Embedder.from_pretrained(str(f)) for f in folders)
    for emb in (one, two):
        emb.merge_lora()
    merged = Embedder.from_pretrained(str(folded)).backbone.state_dict()
    key = "layers.0.self_attn.v_proj.weight"
    want = 0.25 * one.backbone.state_dict()[key] + 0.75 * two.backbone.state_dict()[key]
    torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="adapter-level works with the linear method only"):
        merge_models(folders, tmp_path / "x", method="ties", adapter_level=True)
    # adapters over different bases: refused at adapter level even with --any-base
    settings = json.loads((folders[1] / "llm2emb_config.json").read_text())
    (folders[1] / "llm2emb_config.json").write_text(json.dumps({**settings, "base_model": str(tmp_path / "other")}))
    with pytest.raises(UserError, match=r"input 2 .* is an adapter over .*other.* but input 1 .* over"):
        merge_models(folders, tmp_path / "x", adapter_level=True, any_base=True)
    assert not (tmp_path / "x").exists()


def fake_run(root: Path, checkpoints: dict[int, Path], final: Path | None = None) -> Path:
    """A run folder as the trainer leaves it: config.json, checkpoints/step_N/{model,state,trainer_state.json}."""
    import shutil

    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"config": {"model_path": "x", "experiment_id": root.name}}))
    for step, model in checkpoints.items():
        ckpt = root / "checkpoints" / f"step_{step}"
        shutil.copytree(model, ckpt / "model")
        (ckpt / "state").mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    if final is not None:
        shutil.copytree(final, root / "final")
    return root


def test_checkpoints_of_a_run_and_runs_as_inputs(two_fine_tunes, tmp_path):
    run = fake_run(tmp_path / "run", {10: two_fine_tunes[0], 20: two_fine_tunes[1]})
    other = fake_run(tmp_path / "other", {5: two_fine_tunes[0]}, final=two_fine_tunes[1])
    a, b = weights_of(two_fine_tunes[0]), weights_of(two_fine_tunes[1])
    out = merge_models([run / "checkpoints" / "step_10", run / "checkpoints" / "step_20"], tmp_path / "avg").path
    key = "model:layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(weights_of(out)[key], (a[key] + b[key]) / 2, rtol=0, atol=1e-6)
    # a run means its final model (other), else its newest checkpoint (run -> step_20 = b): both are b
    with pytest.raises(UserError, match=r"input 2 \(.*step_20\) is the same model as input 1 \(.*run\)"):
        merge_models([run, run / "checkpoints" / "step_20"], tmp_path / "dup")
    out = merge_models([run / "checkpoints" / "step_10", other], tmp_path / "runs", weights=[3, 1]).path
    torch.testing.assert_close(weights_of(out)[key], (3 * a[key] + b[key]) / 4, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------- bad input

def test_bad_inputs_are_one_sentence_and_write_nothing(tiny_model, two_fine_tunes, tmp_path):
    fts = two_fine_tunes
    mean = fine_tune(tiny_model, tmp_path / "mean", seed=3, pooling="mean")
    cases = [
        (dict(models=fts, weights=[1.0]), "--weights has 1 values but there are 2 inputs"),
        (dict(models=fts, method="slerp", weights=[1.0, 2.0]), "takes no --weights"),
        (dict(models=fts + [mean], method="slerp"), "takes exactly 2 inputs, got 3"),
        (dict(models=fts[:1]), "needs at least 2 inputs, got 1"),
        (dict(models=[fts[0], mean]), r"input 2 \(.*mean\) has pooling='mean' but input 1 .* has 'attention'"),
        (dict(models=fts, method="avg"), "Unknown merge method 'avg'"),
        (dict(models=fts, base=str(tiny_model)), "does not use a base model"),
        (dict(models=fts, method="linear", weights=[1.0, -1.0]),
         r"the weight of input 2 .* is -1; merge weights .* must be >= 0"),
        (dict(models=fts, method="linear", weights=[0.0, 0.0]), "sum to 0, so no model has a share"),
        (dict(models=fts, adapter_level=True), r"input 1 .* is not a LoRA adapter"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            merge_models(output=tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()


def test_a_different_base_or_shape_is_named(tiny_model, two_fine_tunes, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    config.intermediate_size = 96
    torch.manual_seed(0)
    other = tmp_path / "wider"
    AutoModel.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(other)
    wider = fine_tune(other, tmp_path / "wider-ft", seed=4, pooling="attention")
    with pytest.raises(UserError, match=r"input 2 \(.*wider-ft\) was trained from .*wider.* but input 1"):
        merge_models([two_fine_tunes[0], wider], tmp_path / "out")
    with pytest.raises(UserError, match=r"input 2 .* has tensor 'backbone.layers.0.mlp.gate_proj.weight' of shape "
                                        r"\(96, 64\) but input 1 .* has \(128, 64\)"):
        merge_models([two_fine_tunes[0], wider], tmp_path / "out", any_base=True)
    with pytest.raises(UserError, match=r"Base .*wider has tensor 'backbone.embed_tokens.weight'|Base .*wider has "
                                        r"tensor 'backbone.layers.0.mlp"):
        merge_models(two_fine_tunes, tmp_path / "out", method="ties", base=str(other))
    # raw model folders record no base: a task-vector method needs --base
    with pytest.raises(UserError, match="records none; pass --base"):
        merge_models([tiny_model, other], tmp_path / "out", method="ties", any_base=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        merge_models(two_fine_tunes, tmp_path / "taken")
    with pytest.raises(UserError, match="is input 1"):
        merge_models(two_fine_tunes, two_fine_tunes[0], overwrite=True)


# ----------------------------------------------------------------------------------- CLI and export

def test_cli_merge_then_export(two_fine_tunes, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["merge", *map(str, two_fine_tunes), "--output", str(out), "--method", "ties",
                 "--param", "density=0.5", "--weights", "1", "2"]) == 0
    assert "merged 2 models with ties" in capsys.readouterr().out
    assert main(["merge", *map(str, two_fine_tunes), "--output", str(out), "--method", "slerp",
                 "--param", "t=2"]) == 2
    assert "t must be in [0, 1]" in capsys.readouterr().err
    assert main(["merge", "--list-methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("linear", "slerp", "ties", "model_stock"))
    pytest.importorskip("sentence_transformers")
    assert main(["export", "--model", str(out), "--output", str(tmp_path / "exported")]) == 0
    want = Embedder.from_pretrained(str(out)).encode(TEXTS)
    got = Embedder.from_pretrained(str(tmp_path / "exported")).encode(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
