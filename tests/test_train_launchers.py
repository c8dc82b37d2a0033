"""Launcher-level guarantees of the trainer (issue 11): the non-finite guard decides before backward and
alike on every process (DeepSpeed steps inside backward), FSDP saves gather full weights on every process,
FSDP on CPU is refused, a checkpoint of another world size is refused before any collective load, and
`--overwrite` with several processes deletes the old run before any process looks at it.

The 2-process cases run this file as a torchrun worker (`python -m torch.distributed.run ... this_file MODE`),
two CPU processes over gloo; each writes what it saw to OUT/rank{N}.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_support import CONFIGS, ROOT, prepare_data, quick_overrides, trainable_state, write_raw_data

HERE = Path(__file__).resolve()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory) -> Path:
    raw = write_raw_data(tmp_path_factory.mktemp("raw"))
    return prepare_data(tiny_model, raw, tmp_path_factory.mktemp("tok"))


def _overrides(tiny_model, prepared, out: Path, **extra) -> list[str]:
    extra.setdefault("validation_steps", 0)  # the NaN injection counts training calls of the objective only
    return quick_overrides(tiny_model, prepared, out, **extra)


def _train(overrides: list[str]):
    from llm2emb.config import load_train_config
    from llm2emb.train import train

    return train(load_train_config(None, overrides), show_progress=False)


def _torchrun(args: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Two CPU processes; `timeout` only guards against a hang (a hang is itself the failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    try:
        return subprocess.run(cmd, check=False, env=full_env, capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process run did not finish in {timeout}s (a process waits for another): "
                    f"{(exc.stderr or b'')[-3000:]!r}")


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_finite_weights(folder: Path) -> None:
    state = trainable_state(folder)
    assert state and all(torch.isfinite(v.float()).all() for v in state.values())


def _patch_nan_and_record(monkeypatch, nan_call: int, record: list[bool]) -> None:
    """The objective's `nan_call`-th training call returns a NaN loss; every backward records whether its
    loss was finite (under DeepSpeed backward() also steps the optimizer, so a NaN must never get there)."""
    from accelerate import Accelerator

    from llm2emb.losses import EmbeddingObjective

    forward, backward = EmbeddingObjective.forward, Accelerator.backward
    calls = {"n": 0}

    def objective(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == nan_call:
                out.total = out.total * float("nan")
        return out

    def recording_backward(self, loss, **kwargs):
        record.append(bool(torch.isfinite(loss.detach()).all()))
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(EmbeddingObjective, "forward", objective)
    monkeypatch.setattr(Accelerator, "backward", recording_backward)


# ---------------------------------------------------------------------------------------------- 1 process
def test_nan_loss_is_skipped_before_backward(tiny_model, prepared, tmp_path, monkeypatch):
    """Step 2's loss is NaN: no backward runs for it, and the weights after step 2 are those of step 1."""
    record: list[bool] = []
    _patch_nan_and_record(monkeypatch, nan_call=2, record=record)
    result = _train(_overrides(tiny_model, prepared, tmp_path, steps=2, checkpointing_steps=1))
    assert result.skipped_steps == 1 and result.steps == 2
    assert record == [True]  # step 1 only
    final, step1 = trainable_state(result.final_dir), trainable_state(result.run_dir / "checkpoints/step_1/model")
    assert final.keys() == step1.keys() and all(torch.equal(final[k], step1[k]) for k in final)


def test_deepspeed_engine_skip_and_applied_nan_update(tiny_model, prepared, tmp_path, monkeypatch):
    """DeepSpeed's contract, emulated on one CPU process: its engine steps inside backward(), reports an
    update it skipped for overflow through `step_was_skipped` (then its grad norm is stale), and an update
    it applied with a NaN gradient only through the norm. The first is a skipped step; after the second the
    weights are NaN, so the run stops at once."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from llm2emb.train import Trainer, TrainingDiverged

    monkeypatch.setattr(Trainer, "_deepspeed", property(lambda self: True), raising=False)
    calls = {"n": 0}
    clip = Accelerator.clip_grad_norm_

    def norm(self, *args, **kwargs):
        calls["n"] += 1
        real = clip(self, *args, **kwargs)
        return 1.5 if calls["n"] == 2 else float(real)  # a stale, finite norm on the skipped step

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", norm)
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: calls["n"] == 2))
    result = _train(_overrides(tiny_model, prepared, tmp_path / "skip", steps=3))
    assert result.skipped_steps == 1 and result.steps == 3

    def nan_norm_applied(self, *args, **kwargs):
        calls["n"] += 1
        real = clip(self, *args, **kwargs)
        return float("nan") if calls["n"] == 2 else float(real)

    calls["n"] = 0
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", nan_norm_applied)
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: False))
    with pytest.raises(TrainingDiverged, match="DeepSpeed applied an update"):
        _train(_overrides(tiny_model, prepared, tmp_path / "applied", steps=3))


def test_deepspeed_bf16_overflow_check_is_turned_on(monkeypatch):
    from importlib import metadata

    from llm2emb.train.trainer import _enable_deepspeed_overflow_skip

    version = {"v": "0.18.0"}
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: version["v"] if name == "deepspeed" else real(name))
    config = {"bf16": {"enabled": True}}
    _enable_deepspeed_overflow_skip(config)
    assert config["bf16"]["check_grad_overflow"] is True
    kept = {"bf16": {"enabled": True, "check_grad_overflow": False}}
    _enable_deepspeed_overflow_skip(kept)
    assert kept["bf16"]["check_grad_overflow"] is False  # the user's explicit choice
    version["v"] = "0.16.9"  # the key does not exist there
    old = {"bf16": {"enabled": True}}
    _enable_deepspeed_overflow_skip(old)
    assert "check_grad_overflow" not in old["bf16"]


def test_resume_with_another_world_size_stops_before_loading(tiny_model, prepared, tmp_path, monkeypatch):
    """The process-count check reads trainer_state.json before `load_state`, which is collective under
    FSDP / DeepSpeed and would fail on some processes only, leaving the others waiting."""
    from accelerate import Accelerator

    from llm2emb.errors import UserError

    overrides = _overrides(tiny_model, prepared, tmp_path, steps=4, checkpointing_steps=2)
    result = _train(overrides)
    run = result.run_dir
    (run / "train_summary.json").unlink()  # an interrupted run: resumes from checkpoints/step_2
    state_file = run / "checkpoints/step_2/trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "num_processes": 2}))

    def no_collective_load(self, *args, **kwargs):
        raise AssertionError("load_state ran before the checkpoint was checked against this launch")

    monkeypatch.setattr(Accelerator, "load_state", no_collective_load)
    with pytest.raises(UserError, match="written by 2 process"):
        _train(overrides)
    state_file.write_text(json.dumps({**state, "total_steps": 40}))
    with pytest.raises(UserError, match="run of 40 steps"):
        _train(overrides)


def test_fsdp_without_cuda_is_refused(monkeypatch):
    """accelerate drops FSDP for cpu=True (and would train with DDP); the trainer says so instead."""
    from llm2emb.config import TrainConfig
    from llm2emb.errors import UserError
    from llm2emb.train.trainer import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="FSDP needs CUDA GPUs"):
        build_accelerator(TrainConfig())


def test_fsdp_wraps_each_decoder_layer(tiny_model):
    """accelerate's FSDP2 TRANSFORMER_BASED_WRAP shards the layer classes the prepared module names."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    from llm2emb.model.embedder import Embedder
    from llm2emb.train.trainer import build_encoder

    encoder = build_encoder(Embedder.from_pretrained(str(tiny_model)))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, encoder)
    wrapped = [m for m in encoder.modules() if policy(m)]
    layers = encoder.embedder.backbone.layers
    assert len(layers) > 0 and wrapped == list(layers)


# ---------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_nan_loss_on_one_process_is_skipped_on_both(tiny_model, prepared, tmp_path):
    """Only process 1 has a NaN loss at step 2: both skip step 2 without backward; weights stay those of
    step 1 (DDP keeps the processes equal; final/ is written by process 0)."""
    out = tmp_path / "out"
    overrides = _overrides(tiny_model, prepared, tmp_path, steps=2, checkpointing_steps=1, train_batch_size=2)
    done = _torchrun([str(HERE), "nan", str(out), json.dumps(overrides)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = _ranks(out)
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert [r["backward_finite"] for r in ranks] == [[True], [True]]
    run = tmp_path / "runs" / "exp"
    final, step1 = trainable_state(run / "final"), trainable_state(run / "checkpoints/step_1/model")
    assert all(torch.equal(final[k], step1[k]) for k in final)
    _assert_finite_weights(run / "final")


@pytest.mark.slow
def test_overwrite_with_two_processes_starts_over_on_both(tiny_model, prepared, tmp_path):
    """A finished run, then the same command with --overwrite and a changed config: both processes train
    from step 0. TORCH_GLOO_LAZY_INIT makes the gloo group form as lazily as NCCL's, so creating the
    Accelerator is no barrier; process 0 also takes a moment to delete (see the worker): a process that
    looked at the run folder before the deletion saw the old run (another experiment) and failed."""
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    base = _overrides(tiny_model, prepared, tmp_path, steps=2, checkpointing_steps=1, train_batch_size=2)
    cli = ["--no-progress"] + [a for item in base for a in ("--set", item)]
    done = _torchrun([str(HERE), "cli", str(out1), *cli])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert [r["resumed_from"] for r in _ranks(out1)] == [None, None]

    changed = cli + ["--set", "learning_rate=0.0003", "--overwrite"]
    done = _torchrun([str(HERE), "cli", str(out2), *changed], env={"TORCH_GLOO_LAZY_INIT": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = _ranks(out2)
    assert [(r["resumed_from"], r["already_complete"], r["steps"]) for r in ranks] == [(None, False, 2)] * 2
    run = tmp_path / "runs" / "exp"
    assert json.loads((run / "config.json").read_text())["config"]["learning_rate"] == pytest.approx(3e-4)
    assert json.loads((run / "train_summary.json").read_text())["resumed_from"] is None


@pytest.mark.slow
def test_fsdp2_save_gathers_full_weights(tiny_model, prepared, tmp_path):
    """torch's FSDP2 (`fully_shard`) runs on CPU over gloo, though accelerate will not launch it there: the
    trainer's save helper is run on a sharded TripletEncoder directly. The saved folder loads to the
    vectors of the trained, sharded model (not of the base model), and training goes on after the save."""
    out = tmp_path / "out"
    overrides = _overrides(tiny_model, prepared, tmp_path, head="linear")
    done = _torchrun([str(HERE), "fsdp_save", str(out), json.dumps(overrides)])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = _ranks(out)
    assert ranks[0]["some_sharded_before"] and not ranks[0]["all_sharded_before"]
    assert all(r["sharded_after"] and r["step_after_save"] for r in ranks)
    assert ranks[0]["diff_to_trained"] < 1e-5 < ranks[0]["diff_to_base"]
    assert (out / "final" / "modules.safetensors").exists()  # the head, saved with the backbone


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_by_the_launcher(tiny_model, prepared, tmp_path):
    """`accelerate launch --config_file configs/accelerate_fsdp.yaml` on CPU stops with the message (exit
    code 2 of a UserError, no llm2emb traceback, no process left waiting) instead of training with DDP."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(CONFIGS / "accelerate_fsdp.yaml"), "--num_processes",
           "2", "--mixed_precision", "no", str(ROOT / "run.py"), "--no-progress"]
    for item in _overrides(tiny_model, prepared, tmp_path):
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("the FSDP launch on CPU did not stop")
    assert done.returncode != 0
    # The first process to stop makes torchrun end the other, which may not get to print; the traceback
    # in the output is the launcher's own (a child failed), none comes from llm2emb.
    assert "error: FSDP needs CUDA GPUs" in done.stderr and "exitcode  : 2" in done.stderr, done.stderr[-3000:]
    assert "llm2emb/" not in done.stderr
    assert not (tmp_path / "runs" / "exp").exists()


# ---------------------------------------------------------------------------------------------- workers
def _dump(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(data))


def _worker_nan(out: Path, overrides: list[str]) -> None:
    record: list[bool] = []
    patch = pytest.MonkeyPatch()
    rank = int(os.environ["RANK"])
    _patch_nan_and_record(patch, nan_call=2 if rank == 1 else -1, record=record)
    result = _train(overrides)
    _dump(out, {"skipped": result.skipped_steps, "backward_finite": record})


def _worker_cli(out: Path, argv: list[str]) -> int:
    import shutil
    import time

    from llm2emb.commands.train import main
    from llm2emb.train import Trainer

    train = Trainer.train

    def recording_train(self):
        result = train(self)
        _dump(out, {"resumed_from": result.resumed_from, "already_complete": result.already_complete,
                    "steps": result.steps})
        return result

    Trainer.train = recording_train
    if os.environ["RANK"] == "0":
        rmtree = shutil.rmtree

        def slow_rmtree(path, *args, **kwargs):
            # Widen the window in which an unsynchronised process would look at the old run folder.
            if Path(path).name == "exp" and Path(path).parent.name == "runs":
                time.sleep(3)
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = slow_rmtree
    return main(argv)


def _worker_fsdp_save(out: Path, overrides: list[str]) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from llm2emb.config import load_train_config
    from llm2emb.model.embedder import Embedder
    from llm2emb.train import checkpoint as ckpt
    from llm2emb.train.encode import EncodedBatch
    from llm2emb.train.trainer import build_embedder, build_encoder

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    embedder = build_embedder(load_train_config(None, overrides))  # same seed: same head on both processes
    embedder.eval()  # no dropout: vectors are comparable
    inputs = embedder.collate([[5, 6, 7, 8, 9], [10, 11, 12]])
    with torch.no_grad():
        base = embedder(**inputs)
    encoder = build_encoder(embedder)
    for layer in embedder.backbone.layers:
        fully_shard(layer)
    fully_shard(encoder)
    batch = EncodedBatch(inputs, inputs, None, 0, True, "x", 2)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)

    def step():
        q, p, _ = encoder(batch)
        (q * p.roll(1, 0)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    with torch.no_grad():  # a forward without backward leaves FSDP's root parameters unsharded
        trained, _, _ = encoder(batch)
    # the decoder layers are sharded; the root's parameters are the unsharded ones after that forward
    sharded_before = [isinstance(p, DTensor) for p in encoder.parameters()]

    class Main:
        is_main_process = rank == 0

    ckpt.save_embedder(Main, encoder, embedder, out / "final")
    sharded_after = all(isinstance(p, DTensor) for p in encoder.parameters())
    step()  # the shards are back in place: training goes on
    result = {"sharded_after": sharded_after, "step_after_save": True}
    if rank == 0:
        loaded = Embedder.from_pretrained(str(out / "final"))
        loaded.eval()
        with torch.no_grad():
            vectors = loaded(**inputs)
        result.update(some_sharded_before=any(sharded_before), all_sharded_before=all(sharded_before),
                      diff_to_trained=float((vectors - trained).abs().max()),
                      diff_to_base=float((vectors - base).abs().max()))
    _dump(out, result)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, out_dir, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if mode == "nan":
        _worker_nan(out_dir, json.loads(rest[0]))
    elif mode == "cli":
        sys.exit(_worker_cli(out_dir, rest))
    elif mode == "fsdp_save":
        _worker_fsdp_save(out_dir, json.loads(rest[0]))
    else:
        raise SystemExit(f"unknown worker mode {mode}")
