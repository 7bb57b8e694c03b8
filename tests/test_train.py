"""The training loop on the tiny model, in process: loss normalization, NaN guard, exact resume."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora_dist import tiny, train
from lora_dist.config import load_config
from lora_dist.data import IGNORE_INDEX
from lora_dist.tracking import read_metrics


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _config(tiny_dir, out, *overrides):
    return load_config("configs/tiny-cpu.yaml", [
        f"model.path={tiny_dir}", f"train.output_dir={out}", "wandb.mode=disabled", "train.log_interval=100",
        "train.eval_interval=0", "train.save_interval=0", "train.warmup_steps=1", *overrides,
    ])


def _window(run):
    batches = train._batch_stream(run)
    return [next(batches) for _ in range(run.accum)]


def _adapter_snapshot(run):
    return {n: t.clone() for n, t in run.model.adapter_state_dict().items()}


def test_step_loss_is_the_mean_over_all_response_tokens_of_the_global_batch(tiny_dir, tmp_path, capsys):
    run = train.setup(_config(tiny_dir, tmp_path))
    window = _window(run)
    assert len(window) == 2  # global batch 16 = 2 micro batches of 8: their token counts differ
    # Reference: one cross entropy over every labelled (shifted) token of both micro batches.
    with torch.no_grad():
        logits = [run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in window]
        pred = torch.cat([lg[:, :-1].reshape(-1, lg.shape[-1]) for lg in logits]).float()
        target = torch.cat([b["labels"][:, 1:].reshape(-1) for b in window])
        expected = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX).item()
    stats = train.train_step(run, window)
    # Same forward in fp32 summed in a different order: float32 rounding, ~1e-6 relative.
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["label_tokens"] == int((target != IGNORE_INDEX).sum())


def test_non_finite_loss_skips_the_update_and_counts_it(tiny_dir, tmp_path, capsys):
    run = train.setup(_config(tiny_dir, tmp_path, "train.nan_policy=skip"))
    before = _adapter_snapshot(run)
    poison = run.model.base_model.model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))
    stats = train.train_step(run, _window(run))
    poison.remove()
    assert stats["skipped"] and math.isnan(stats["loss"])
    after = _adapter_snapshot(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in run.model.get_trainable_parameters())
    # The next, clean step trains.
    assert not train.train_step(run, _window(run))["skipped"]
    assert any(not torch.equal(before[k], t) for k, t in run.model.adapter_state_dict().items())


def test_fit_counts_skipped_steps_and_stops_past_the_limit(tiny_dir, tmp_path, capsys):
    run = train.setup(_config(tiny_dir, tmp_path, "train.max_steps=4", "train.max_skipped_steps=1"))
    run.model.base_model.model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(train.TrainingStopped, match="2 steps skipped"):
        train.fit(run)
    assert run.skipped_steps == 2 and run.step == 2


def test_nan_policy_stop_stops_at_the_first_bad_step(tiny_dir, tmp_path, capsys):
    run = train.setup(_config(tiny_dir, tmp_path, "train.max_steps=4", "train.nan_policy=stop"))
    run.model.base_model.model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(train.TrainingStopped, match="non-finite loss .* at step 1"):
        train.fit(run)


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(tiny_dir, tmp_path, capsys):
    whole = tmp_path / "whole"
    train.train(_config(tiny_dir, whole, "train.max_steps=6", "train.save_interval=3"))
    resumed = tmp_path / "resumed"
    checkpoint = whole / "checkpoints" / "step-00000003"
    train.train(_config(tiny_dir, resumed, "train.max_steps=6", f"train.resume={checkpoint}"))

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out) if r["kind"] == "train"}

    assert sorted(losses(resumed)) == [4, 5, 6]
    # Same data position, optimizer moments, schedule and RNG: the same float operations in the same
    # order, so the losses agree to float64 printing precision (1e-12 leaves room for nothing else).
    for step in (4, 5, 6):
        assert losses(resumed)[step] == pytest.approx(losses(whole)[step], rel=1e-12)


def test_activation_checkpointing_leaves_the_step_unchanged(tiny_dir, tmp_path, capsys):
    stats = []
    for flag in ("true", "false"):
        run = train.setup(_config(tiny_dir, tmp_path / flag, f"model.gradient_checkpointing={flag}"))
        checkpointed = [m.gradient_checkpointing for m in run.model.modules() if hasattr(m, "gradient_checkpointing")]
        assert any(checkpointed) == (flag == "true")
        stats.append(train.train_step(run, _window(run)))
    # Recomputation repeats the same fp32 forward: identical up to float32 rounding (~1e-6).
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], rel=1e-6)
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-5)


def test_resume_auto_after_a_stopped_run_continues_from_its_last_checkpoint(tiny_dir, tmp_path, capsys):
    settings = ("train.max_steps=4", "train.save_interval=2", "train.nan_policy=stop")
    reference = tmp_path / "reference"
    train.train(_config(tiny_dir, reference, *settings))

    crashed = tmp_path / "crashed"
    run = train.setup(_config(tiny_dir, crashed, *settings))
    forwards = []

    def nan_from_step_3(module, inputs, out):  # 2 micro batches per step: forwards 5+ are step 3
        forwards.append(1)
        return out * float("nan") if len(forwards) > 4 else out

    run.model.base_model.model.norm.register_forward_hook(nan_from_step_3)
    with pytest.raises(train.TrainingStopped, match="Last good checkpoint: .*step-00000002"):
        train.fit(run)

    train.train(_config(tiny_dir, crashed, *settings, "train.resume=auto"))
    resumed = {r["step"]: r["loss"] for r in read_metrics(crashed) if r["kind"] == "train"}
    expected = {r["step"]: r["loss"] for r in read_metrics(reference) if r["kind"] == "train"}
    # The resumed run appends to the crashed run's record; steps 3 and 4 are those of the clean run.
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-12)
