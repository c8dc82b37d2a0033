"""Compute precision (`auto | fp32 | bf16 | fp16`): resolution from mocked CPU flags / CUDA checks, fp16
refused on a CPU, bf16 encoding and training on tiny models (close to fp32, not equal to it), the resolved
precision in the run record, exact resume under bf16 (also when `auto` would choose otherwise on the resuming
machine), and the eval cache keyed by the resolved precision."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2emb import Embedder
from llm2emb.config import load_train_config
from llm2emb.errors import UserError
from llm2emb.model import precision as P
from test_train_support import prepare_data, quick_overrides, trainable_state, write_raw_data

TEXTS = ["how are sorting lists handled?", "hashing files is done by the hashing module in step 3.",
         "a somewhat longer text about parsing dates, tokens and graphs in several steps", "five"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads (and CPU kernels are deterministic per thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    return prepare_data(tiny_model, write_raw_data(tmp_path_factory.mktemp("raw")), tmp_path_factory.mktemp("tok"))


def _flags(monkeypatch, flags: set[str]) -> None:
    """Pretend this machine's /proc/cpuinfo reports `flags`."""
    monkeypatch.setattr(P, "cpu_flags", lambda cpuinfo=P.CPUINFO: frozenset(flags))


# ---------------------------------------------------------------------------------------------- resolution
def test_settings_and_aliases():
    assert [P.canonical_precision(v) for v in ("AUTO", "float32", "bfloat16", "fp16")] == \
        ["auto", "fp32", "bf16", "fp16"]
    with pytest.raises(UserError, match="choose one of: auto, fp32, bf16, fp16. Did you mean 'bf16'"):
        P.canonical_precision("bf61")
    with pytest.raises(UserError, match="field 'precision'"):
        load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", precision="half")
    cfg = load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", precision="bfloat16")
    assert cfg.precision == "bf16"


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                                             ({"avx2", "avx512f", "avx512_vnni"}, "fp32"), (set(), "fp32")])
def test_auto_on_cpu_follows_the_bf16_flags(monkeypatch, caplog, flags, expected):
    _flags(monkeypatch, flags)
    chosen = P.resolve_precision("auto", "cpu")
    assert (chosen.name, chosen.setting) == (expected, "auto")
    named = [f for f in P.CPU_BF16_FLAGS if f in flags]
    assert (named[0] in chosen.reason) if named else ("neither" in chosen.reason)
    with caplog.at_level(logging.INFO, logger="llm2emb.model.precision"):
        P.log_choice(chosen, f"test-{expected}-{len(flags)}")
        P.log_choice(chosen, f"test-{expected}-{len(flags)}")
    assert len([r for r in caplog.records if chosen.reason in r.getMessage()]) == 1  # one line, not one per call


def test_explicit_settings_on_cpu(monkeypatch):
    _flags(monkeypatch, {"avx2"})
    assert P.resolve_precision("fp32", "cpu").name == "fp32"
    emulated = P.resolve_precision("bf16", "cpu")  # allowed, but the reason says it is not native
    assert emulated.name == "bf16" and "neither" in emulated.reason
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        P.resolve_precision("fp16", "cpu")


def test_cpuinfo_flags_are_read_and_torch_is_the_fallback(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert P.cpu_flags(info) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert P.cpu_flags(tmp_path / "absent") is None
    monkeypatch.setattr(P, "cpu_flags", lambda cpuinfo=P.CPUINFO: None)  # e.g. macOS / Windows
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    native, why = P.cpu_bf16_native()
    assert native and "amx_bf16" in why and "torch" in why


def test_auto_on_cuda_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, n=native: n or including_emulation)
        chosen = P.resolve_precision("auto", "cuda")
        assert chosen.name == expected and "Test GPU" in chosen.reason
    assert P.resolve_precision("fp16", "cuda").name == "fp16"
    assert P.resolve_precision("auto", "mps").name == "fp32"


# ---------------------------------------------------------------------------------------------- encode
@pytest.fixture(scope="module")
def embedder(tiny_model) -> Embedder:
    return Embedder.from_pretrained(str(tiny_model), pooling="mean")


def test_encode_bf16_is_close_to_fp32_but_computed_in_bf16(embedder):
    assert embedder.config.precision == "fp32"  # the default: the same vectors on every machine
    fp32 = embedder.encode(TEXTS, batch_size=2)
    bf16 = embedder.encode(TEXTS, batch_size=2, precision="bf16")
    assert bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(1)
    assert cosine.min() > 0.99
    assert np.abs(fp32 - bf16).max() > 1e-6  # autocast really ran: bf16 rounding shows
    assert np.allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)  # normalised in float32
    np.testing.assert_array_equal(embedder.encode(TEXTS, batch_size=2), fp32)  # the override was per call


def test_precision_is_saved_and_fp16_on_cpu_is_refused(embedder, tiny_model, tmp_path):
    loaded = Embedder.from_pretrained(str(tiny_model), pooling="mean", precision="bfloat16")
    assert loaded.config.precision == "bf16"
    loaded.save(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "llm2emb_config.json").read_text())["precision"] == "bf16"
    again = Embedder.from_pretrained(str(tmp_path / "model"))
    np.testing.assert_array_equal(again.encode(TEXTS), embedder.encode(TEXTS, precision="bf16"))
    assert Embedder.from_pretrained(str(tmp_path / "model"), precision="fp32").config.precision == "fp32"
    with pytest.raises(UserError, match="precision"):
        Embedder.from_pretrained(str(tiny_model), precision="half")
    embedder.train()
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        embedder.encode(TEXTS, precision="fp16")
    assert embedder.training  # refused before encode changed anything
    embedder.eval()


def test_eval_cache_is_keyed_by_the_resolved_precision(embedder, tmp_path, monkeypatch):
    from llm2emb.eval.cache import EmbeddingCache, encode_cached
    from llm2emb.eval.encoders import as_encoder

    cache = EmbeddingCache(tmp_path / "cache")
    encoder = as_encoder(embedder)
    fp32, hit = encode_cached(encoder, TEXTS, cache=cache)
    assert not hit
    embedder.config.precision = "auto"
    try:
        _flags(monkeypatch, {"avx512_bf16"})  # auto -> bf16: must not read the fp32 vectors
        auto_bf16, hit = encode_cached(encoder, TEXTS, cache=cache)
        assert not hit and np.abs(auto_bf16 - fp32).max() > 1e-6
        _flags(monkeypatch, set())  # auto -> fp32 on a machine without bf16: its own entry
        auto_fp32, hit = encode_cached(encoder, TEXTS, cache=cache)
        assert not hit
        np.testing.assert_array_equal(auto_fp32, fp32)
        _flags(monkeypatch, {"avx512_bf16"})
        again, hit = encode_cached(encoder, TEXTS, cache=cache)
        assert hit
        np.testing.assert_array_equal(again, auto_bf16)
    finally:
        embedder.config.precision = "fp32"
    metas = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert sorted(m["precision"] for m in metas) == ["bf16", "fp32", "fp32"]


def test_encode_command_precision_flag(tiny_model, tmp_path):
    from llm2emb.cli import main

    model = tmp_path / "model"
    Embedder.from_pretrained(str(tiny_model), pooling="mean").save(model)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for flag in ("fp32", "bf16"):
        assert main(["encode", "--model", str(model), "--input", str(src), "--output", str(tmp_path / f"{flag}.npy"),
                     "--precision", flag]) == 0
    fp32, bf16 = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "bf16.npy")
    assert (fp32 * bf16).sum(1).min() > 0.99 and np.abs(fp32 - bf16).max() > 1e-6
    assert main(["encode", "--model", str(model), "--input", str(src), "--output", str(tmp_path / "x.npy"),
                 "--precision", "fp16"]) == 2
    assert not (tmp_path / "x.npy").exists()


def test_eval_command_precision_flag(tiny_model, tmp_path, monkeypatch):
    from llm2emb.cli import main

    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat\ta kitten\t4.5\na dog\ta car\t0.5\nthe sun\tthe moon\t2.0\n"
                   "red apple\tgreen apple\t3.0\n")
    common = ["eval", "--model", str(tiny_model), "--pooling", "mean", "--tasks", str(sts), "--no-progress",
              "--cache-dir", str(tmp_path / "cache")]
    _flags(monkeypatch, {"avx512_bf16"})
    for flag in ("fp32", "auto"):
        assert main([*common, "--precision", flag, "--output", str(tmp_path / flag)]) == 0
    records = {flag: json.loads(next((tmp_path / flag).glob("*.json")).read_text()) for flag in ("fp32", "auto")}
    assert records["fp32"]["model"]["precision"] == "fp32"
    assert records["auto"]["model"]["precision"] == "bf16"  # what auto resolved to, not the setting
    assert records["auto"]["model"]["overrides"]["precision"] == "auto" and "auto" in records["auto"]["label"]
    assert records["fp32"]["model"]["fingerprint"] != records["auto"]["model"]["fingerprint"]
    assert main([*common, "--precision", "fp16", "--output", str(tmp_path / "fp16")]) == 2
    assert not (tmp_path / "fp16").exists()


def test_commands_encode_in_auto_by_default(tiny_model, tmp_path, monkeypatch):
    """A saved model (precision fp32 in its folder, as every trained run saves it) is evaluated and encoded by the
    commands in auto, i.e. bf16 on a CPU with AMX / AVX512_BF16 (issue: a 0.5B evaluation took 18 min in fp32)."""
    from llm2emb.cli import main

    model = tmp_path / "model"
    Embedder.from_pretrained(str(tiny_model), pooling="mean").save(model)
    assert json.loads((model / "llm2emb_config.json").read_text())["precision"] == "fp32"
    sts = tmp_path / "sts.tsv"
    sts.write_text("sentence1\tsentence2\tscore\na cat\ta kitten\t4.5\na dog\ta car\t0.5\nthe sun\tthe moon\t2.0\n")
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    for flags, expected in (({"amx_bf16"}, "bf16"), (set(), "fp32")):
        _flags(monkeypatch, flags)
        out = tmp_path / f"eval-{expected}"
        assert main(["eval", "--model", str(model), "--tasks", str(sts), "--no-progress", "--no-cache",
                     "--output", str(out)]) == 0
        record = json.loads(next(out.glob("*.json")).read_text())
        assert record["model"]["precision"] == expected
        assert "auto" not in record["label"].rpartition("[")[2]  # the default is not a user override: labels stay as they were
        assert main(["encode", "--model", str(model), "--input", str(src), "--output",
                     str(tmp_path / f"{expected}.npy")]) == 0
    _flags(monkeypatch, {"amx_bf16"})
    assert main(["encode", "--model", str(model), "--input", str(src), "--output", str(tmp_path / "bf16-flag.npy"),
                 "--precision", "bf16"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "bf16.npy"), np.load(tmp_path / "bf16-flag.npy"))
    assert np.abs(np.load(tmp_path / "bf16.npy") - np.load(tmp_path / "fp32.npy")).max() > 1e-6


def test_evaluation_identity_includes_the_resolved_precision(monkeypatch):
    """Study cells and pipeline stages evaluated in fp32 are evaluated again (not mixed with bf16 ones) when auto
    resolves to bf16 here; an explicit fp32 keeps its key on every machine."""
    from llm2emb.study.spec import EvalSpec, config_hash, eval_identity

    keys = {}
    for flags in ({"amx_bf16"}, set()):
        _flags(monkeypatch, flags)
        auto, fp32 = eval_identity(EvalSpec(tasks=[])), eval_identity(EvalSpec(tasks=[], precision="fp32"))
        keys[frozenset(flags)] = (config_hash(auto), config_hash(fp32))
        assert auto["precision"] == "auto" and fp32["resolved_precision"] == "fp32"
        assert auto["resolved_precision"] == ("bf16" if flags else "fp32")
    (auto_bf16, fp32_a), (auto_fp32, fp32_b) = keys.values()
    assert auto_bf16 != auto_fp32 and fp32_a == fp32_b


# ---------------------------------------------------------------------------------------------- training
def _cfg(tiny_model, prepared, out: Path, **extra):
    values = dict(steps=8, checkpointing_steps=3, validation_steps=4, lora_enabled=True, lora_dropout=0.1)
    values.update(extra)
    return load_train_config(None, quick_overrides(tiny_model, prepared, out, **values))


def _train(cfg):
    from llm2emb.train import train

    return train(cfg, show_progress=False)


def _launch(out: Path) -> dict:
    return json.loads((out / "runs" / "exp" / "config.json").read_text())["launch"]


def test_bf16_training_is_finite_and_close_to_fp32(tiny_model, prepared, tmp_path):
    results = {}
    for name in ("fp32", "bf16", "fp32"):  # fp32 again: switching precision inside one process works
        out = tmp_path / f"{name}-{len(results)}"
        result = _train(_cfg(tiny_model, prepared, out, precision=name, checkpointing_steps=0))
        assert np.isfinite(result.last_train["loss"]) and np.isfinite(result.last_validation["loss"])
        assert result.skipped_steps == 0
        launch = _launch(out)
        assert (launch["precision"], launch["mixed_precision"]) == (name, {"fp32": "no", "bf16": "bf16"}[name])
        results.setdefault(name, result.final_dir)
    assert trainable_state(results["fp32"]).keys() == trainable_state(results["bf16"]).keys()
    vectors = {name: Embedder.from_pretrained(str(folder)).encode(TEXTS) for name, folder in results.items()}
    assert (vectors["fp32"] * vectors["bf16"]).sum(1).min() > 0.99
    assert np.abs(vectors["fp32"] - vectors["bf16"]).max() > 1e-6
    # the trained model keeps encoding in fp32 unless asked: training precision is a property of the run
    assert Embedder.from_pretrained(str(results["bf16"])).config.precision == "fp32"


def test_fp16_training_on_cpu_is_refused(tiny_model, prepared, tmp_path):
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        _train(_cfg(tiny_model, prepared, tmp_path, precision="fp16"))
    assert not (tmp_path / "runs" / "exp").exists()


def test_resume_is_exact_under_bf16_and_keeps_the_recorded_precision(tiny_model, prepared, tmp_path, monkeypatch,
                                                                     caplog):
    from llm2emb.train import Trainer

    reference = _train(_cfg(tiny_model, prepared, tmp_path / "reference", precision="bf16"))

    # auto on a machine with AVX512_BF16 -> bf16; interrupted after its step-6 checkpoint
    _flags(monkeypatch, {"avx512_bf16"})
    cfg = _cfg(tiny_model, prepared, tmp_path / "resumed", precision="auto")
    trainer = Trainer(cfg, show_progress=False)
    real_step = trainer._train_step

    def step_then_crash(batch, running):
        if trainer.step == 7:
            raise RuntimeError("simulated crash")
        real_step(batch, running)

    trainer._train_step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    assert _launch(tmp_path / "resumed")["precision"] == "bf16"
    assert not (cfg.run_dir / "final").exists()

    # resumed where auto would choose fp32: the run keeps bf16 (with a warning) and ends bit for bit as the
    # uninterrupted bf16 run
    _flags(monkeypatch, set())
    with caplog.at_level(logging.WARNING, logger="llm2emb.train.trainer"):
        result = _train(_cfg(tiny_model, prepared, tmp_path / "resumed", precision="auto"))
    assert result.resumed_from == 6 and result.steps == 8
    assert any("auto would choose fp32" in r.getMessage() for r in caplog.records)
    expected, got = trainable_state(reference.final_dir), trainable_state(result.final_dir)
    assert expected.keys() == got.keys() and expected
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def test_runs_from_before_the_setting_resume_in_fp32(tmp_path):
    from llm2emb.train.trainer import recorded_precision

    run = tmp_path / "run"
    run.mkdir()
    assert recorded_precision(run) is None
    (run / "config.json").write_text(json.dumps({"config": {}, "launch": {"mixed_precision": "no"}}))
    assert recorded_precision(run) == "fp32"
    (run / "config.json").write_text(json.dumps({"config": {}, "launch": {"mixed_precision": "bf16"}}))
    assert recorded_precision(run) == "bf16"
    (run / "config.json").write_text(json.dumps({"launch": {"mixed_precision": "no", "precision": "bf16"}}))
    assert recorded_precision(run) == "bf16"


def test_a_resume_keeps_the_recorded_precision_or_is_refused(monkeypatch, caplog, tmp_path):
    from llm2emb.train.trainer import training_precision

    cfg = load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", output_dir=str(tmp_path))
    _flags(monkeypatch, {"avx512_bf16"})
    assert training_precision(cfg).name == "bf16"  # a new run: auto on this machine
    with caplog.at_level(logging.WARNING, logger="llm2emb.train.trainer"):
        kept = training_precision(cfg, recorded="fp32")  # e.g. a run from before the setting
    assert kept.name == "fp32" and "resumed" in kept.reason
    assert any("auto would choose bf16" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="trained in fp16, which this machine cannot run"):
        training_precision(cfg, recorded="fp16")
    # an explicit setting is what check_run_dir compares; the trainer uses it as set
    explicit = load_train_config(None, model_path="m", experiment_id="e", train_data_path="d", precision="fp32")
    assert training_precision(explicit, recorded="fp32").name == "fp32"
