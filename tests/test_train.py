"""The training loop on the tiny model, in process: loss normalization, NaN guard, exact resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_dist import cli, shapes, tiny, train
from lora_dist.config import ConfigError, load_config
from lora_dist.data import IGNORE_INDEX
from lora_dist.tracking import read_metrics
from wandb_reader import find_wandb_run_file, read_wandb_history

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _config(tiny_dir, out, *overrides):
    return load_config(TINY, [
        f"model.path={tiny_dir}", f"train.output_dir={out}", "wandb.mode=disabled", "train.log_interval=100",
        "train.eval_interval=0", "train.save_interval=0", "train.warmup_steps=1", *overrides,
    ])


def _window(run):
    batches = train._batch_stream(run)
    return [next(batches) for _ in range(run.accum)]


def _adapter_snapshot(run):
    return {n: t.clone() for n, t in run.model.adapter_state_dict().items()}


def _reference_loss(run, window) -> tuple[float, torch.Tensor]:
    """One cross entropy over every labelled (shifted) token of all micro batches, and those targets."""
    with torch.no_grad():
        logits = [run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in window]
        pred = torch.cat([lg[:, :-1].reshape(-1, lg.shape[-1]) for lg in logits]).float()
        target = torch.cat([b["labels"][:, 1:].reshape(-1) for b in window])
        return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX).item(), target


def test_step_loss_is_the_mean_over_all_response_tokens_of_the_global_batch(tiny_dir, tmp_path, capsys):
    run = train.setup(_config(tiny_dir, tmp_path))
    window = _window(run)
    assert len(window) == 2  # global batch 16 = 2 micro batches of 8: their token counts differ
    # Reference: one cross entropy over every labelled (shifted) token of both micro batches.
    expected, target = _reference_loss(run, window)
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


def test_inf_gradient_with_a_finite_loss_skips_the_update_and_counts_it(tiny_dir, tmp_path, capsys):
    run = train.setup(_config(tiny_dir, tmp_path, "train.max_steps=2", "train.max_skipped_steps=5"))
    before = _adapter_snapshot(run)
    # An overflow in the backward pass only: the loss is finite, one adapter's gradient is inf.
    param = next(iter(run.model.lora_layers.values())).lora_B.weight
    hook = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    stats = train.train_step(run, _window(run))
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] == float("inf") and stats["skipped"]
    assert all(torch.equal(before[k], t) for k, t in run.model.adapter_state_dict().items())
    assert all(p.grad is None for p in run.model.get_trainable_parameters())
    train.fit(run)  # the loop counts it, as it counts a non-finite loss
    hook.remove()
    assert run.skipped_steps == 2 and "non-finite gradient norm (inf), update skipped" in capsys.readouterr().out


INF_GRADIENT_UNDER_DEEPSPEED = """
import json, sys, torch
from lora_dist import train
from lora_dist.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
run = train.setup(cfg)  # distributed.engine=deepspeed without a launcher: a process group of one
before = {n: t.clone() for n, t in run.model.adapter_state_dict().items()}
hook = next(iter(run.model.lora_layers.values())).lora_B.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
lr = train._current_lr(run)
try:
    stats = train.train_step(run, [next(train._batch_stream(run)) for _ in range(run.accum)])
except train.TrainingStopped as err:
    print(json.dumps({"stopped": str(err)}))
    sys.exit(0)
after = run.model.adapter_state_dict()
print(json.dumps({"skipped": stats["skipped"], "grad_norm": stats["grad_norm"], "loss": stats["loss"],
                  "unchanged": all(torch.equal(before[k], after[k]) for k in before),
                  "lr": [lr, train._current_lr(run)]}))
"""


def _deepspeed_process(script: str, tiny_dir, out, *overrides: str, **env: str) -> dict:
    """Run `script` (it sets up the job: a DeepSpeed process group of one) on the tiny config in a fresh
    process on DeepSpeed's CPU accelerator; returns the JSON its last line prints."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_", "WORLD_", "RANK"))}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(TINY), f"model.path={tiny_dir}", f"train.output_dir={out}",
         "wandb.mode=disabled", "distributed.engine=deepspeed", *overrides],
        env={**clean, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inf_gradient_under_deepspeed(tiny_dir, out, stage):
    return _deepspeed_process(INF_GRADIENT_UNDER_DEEPSPEED, tiny_dir, out, f"distributed.zero_stage={stage}",
                              "train.max_steps=3", "train.warmup_steps=0", "train.schedule=linear")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_inf_gradient_under_zero_is_skipped_and_the_schedule_still_advances(tiny_dir, tmp_path, stage):
    # DeepSpeed 0.19.8's ZeRO optimizers skip a step whose gradient norm is not finite (norm reads inf)
    # and do not step their schedule then; the loop counts the skip and advances it, as without DeepSpeed.
    result = _inf_gradient_under_deepspeed(tiny_dir, tmp_path, stage)
    assert result["skipped"] and result["grad_norm"] == float("inf") and math.isfinite(result["loss"])
    assert result["unchanged"]
    assert result["lr"][1] == pytest.approx(result["lr"][0] * 2 / 3)  # linear decay to 0 over 3 steps, one taken


SHM_AFTER_SETUP = """
import json, sys
from deepspeed import comm
from lora_dist import distributed, train
from lora_dist.config import load_config
run = train.setup(load_config(sys.argv[1], sys.argv[2:]))
print(json.dumps({"shm_op": comm.comm.cdb.shm_comm_op is not None,
                  "left": (distributed.SHM_DIR / distributed.shm_buffer_name(0)).exists()}))
"""


@pytest.mark.distributed
def test_deepspeed_cpu_comm_buffer_does_not_outlive_the_job(tiny_dir, tmp_path):
    # DeepSpeed's CPU accelerator creates a 66 MiB /dev/shm file per rank and never removes it: each CPU
    # run left one behind (RAM until reboot). The job unlinks it once every rank has mapped it.
    # LOCAL_SIZE: set by the deepspeed launcher; DeepSpeed creates the buffers when it equals the world size.
    result = _deepspeed_process(SHM_AFTER_SETUP, tiny_dir, tmp_path, LOCAL_SIZE="1")
    assert result == {"shm_op": True, "left": False}


@pytest.mark.distributed
def test_inf_gradient_without_zero_stops_once_it_reaches_the_adapters(tiny_dir, tmp_path):
    # ZeRO stage 0 in fp32 checks nothing: the update applies the nan, and the run stops saying so.
    result = _inf_gradient_under_deepspeed(tiny_dir, tmp_path, 0)
    assert "reached the adapter weights" in result["stopped"]


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
    # dropout > 0: the resumed run only matches if the RNG state is restored too.
    train.train(_config(tiny_dir, whole, "train.max_steps=6", "train.save_interval=3", "lora.dropout=0.1"))
    resumed = tmp_path / "resumed"
    checkpoint = whole / "checkpoints" / "step-00000003"
    train.train(_config(tiny_dir, resumed, "train.max_steps=6", f"train.resume={checkpoint}", "lora.dropout=0.1"))

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


def test_resume_continues_the_wandb_run_and_drops_the_steps_logged_after_its_checkpoint(tiny_dir, tmp_path, capsys):
    settings = ("train.max_steps=4", "train.save_interval=2", "wandb.mode=offline")
    run = train.setup(_config(tiny_dir, tmp_path, *settings))
    first_id = run.tracker.wandb_run_id
    forwards = []

    def crash_in_step_4(module, inputs, out):  # 2 micro batches per step: forward 7 is step 4's first
        forwards.append(1)
        if len(forwards) == 7:
            raise RuntimeError("node lost")
        return out

    hook = run.model.base_model.model.norm.register_forward_hook(crash_in_step_4)
    with pytest.raises(RuntimeError, match="node lost"):
        train.fit(run)
    hook.remove()
    run.tracker.run.finish(exit_code=1)  # what wandb does for a process that dies
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 3]

    train.train(_config(tiny_dir, tmp_path, *settings, "train.resume=auto"))
    # Step 3 was logged after the step-2 checkpoint: the resumed run logs it again, once.
    assert [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2, 3, 4]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and [find_wandb_run_file(r).name for r in runs] == [f"run-{first_id}.wandb"] * 2
    resumed = [r["_step"] for r in read_wandb_history(runs[1]) if "train/loss" in r]
    assert resumed == [3, 4]  # `wandb sync` of both folders: one run, steps 1-2 then 3-4


def test_fresh_run_into_an_output_dir_with_checkpoints_exits_2(tiny_dir, tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")
    code = cli.main(["train", str(TINY), f"model.path={tiny_dir}", f"train.output_dir={tmp_path}",
                     "wandb.mode=disabled"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-dist: error:")]
    assert code == 2 and len(errors) == 1
    assert "already holds checkpoints" in errors[0] and "train.overwrite_output_dir=true" in errors[0]
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_overwrite_output_dir_deletes_the_old_checkpoints_before_a_fresh_run(tiny_dir, tmp_path, capsys):
    (tmp_path / "checkpoints" / "step-00000009").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")
    run = train.setup(_config(tiny_dir, tmp_path, "train.overwrite_output_dir=true"))
    assert run.step == 0 and not (tmp_path / "checkpoints").exists()


def test_fp16_compute_without_deepspeed_is_refused_naming_what_to_use(tiny_dir, tmp_path):
    # No GradScaler on the single-process path: fp16 gradients of small adapters underflow to 0.
    with pytest.raises(ConfigError, match="use model.compute_dtype=bf16, or DeepSpeed's fp16"):
        train.setup(_config(tiny_dir, tmp_path, "model.compute_dtype=fp16"))


def test_eval_without_an_eval_split_exits_2(tiny_dir, tmp_path, capsys):
    code = cli.main(["eval", str(TINY), f"model.path={tiny_dir}", f"train.output_dir={tmp_path}",
                     "wandb.mode=disabled", "data.eval_fraction=0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-dist: error:")]
    assert code == 2
    assert errors == ["lora-dist: error: no eval split: set data.eval_fraction or data.eval_path"]


# ============================================================ random bases, random tokens, fused kernels

RANDOM = ["model.path=random:tiny", "data.path=random-tokens", "data.max_seq_len=64", "model.compute_dtype=fp32",
          "train.max_steps=3", "train.micro_batch_size=2", "train.grad_accum=2", "train.warmup_steps=0",
          "train.eval_interval=0", "train.save_interval=0", "train.log_interval=100", "wandb.mode=disabled"]


def test_run_without_eval_split_reports_no_eval_fields(tmp_path):
    summary = train.train(load_config(None, [*RANDOM, f"train.output_dir={tmp_path}"]))
    assert summary["steps"] == 3
    assert not any(key.startswith("eval_") for key in summary)  # no nan placeholders for an eval never run


def test_random_base_is_the_same_for_a_seed_and_changes_with_another():
    def weights(seed):
        model = shapes.build_random_model("tiny", bits=4, compute_dtype=torch.float32, seed=seed)
        return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # ranks building it agree bit for bit
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_random_base_computes_its_rotary_frequencies_instead_of_leaving_them_empty():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = shapes.build_random_model("tiny", bits=None, compute_dtype=torch.float32)
    expected = LlamaRotaryEmbedding(shapes.shape("tiny").hf_config()).inv_freq
    assert torch.equal(model.model.rotary_emb.inv_freq, expected)


def test_random_tokens_rows_are_deterministic_and_every_token_is_a_target():
    from lora_dist.loader import RandomTokens

    rows = RandomTokens(8, 16, 512, seed=3)[[5, 1]]
    again = RandomTokens(8, 16, 512, seed=3)[[1, 5]]
    assert rows["input_ids"][0] == again["input_ids"][1] and rows["input_ids"][1] == again["input_ids"][0]
    assert rows["labels"] == rows["input_ids"]
    assert all(len(r) == 16 and 0 <= min(r) and max(r) < 512 for r in rows["input_ids"])
    assert RandomTokens(8, 16, 512, seed=4)[[5]]["input_ids"] != rows["input_ids"][:1]


def test_random_run_has_the_rows_its_steps_need_and_no_tokenizer(tmp_path, capsys):
    run = train.setup(load_config(None, [*RANDOM, f"train.output_dir={tmp_path}"]))
    assert run.tokenizer is None and run.eval_dataset is None
    assert len(run.train_loader) == 3 * 2  # max_steps x grad_accum micro batches, each row seen once
    batch = next(iter(run.train_loader))
    assert batch["input_ids"].shape == (2, 64) and torch.equal(batch["labels"], batch["input_ids"])


def test_fused_kernels_follow_the_plain_forward_step_for_step(tmp_path, capsys):
    plain = train.train(load_config(None, [*RANDOM, f"train.output_dir={tmp_path / 'plain'}",
                                           "model.fused_kernels=off"]))
    fused = train.train(load_config(None, [*RANDOM, f"train.output_dir={tmp_path / 'fused'}",
                                           "model.fused_kernels=on"]))
    assert plain["steps"] == fused["steps"] == 3
    one = [m for m in read_metrics(tmp_path / "plain") if m["kind"] == "train"]
    two = [m for m in read_metrics(tmp_path / "fused") if m["kind"] == "train"]
    # Both paths dequantize the same 4-bit weights and multiply in fp32 on the CPU; they differ only in
    # summation order (grouped GEMMs, chunked log-sum-exp): fp32 rounding of sums over <= 512 terms,
    # <= 512 * 2**-24 ~ 3e-5 relative in the worst case, ~1e-7 observed. A wrong loss scale or a lost
    # adapter gradient moves the loss (or the norm) by far more than 1e-4 from step 1 or 2.
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert [m["grad_norm"] for m in two] == pytest.approx([m["grad_norm"] for m in one], rel=1e-4)


def test_activation_offload_keeps_attention_on_the_host_as_configured_and_the_step_exact(tmp_path, capsys):
    # model.offload_attention (default on): the job's offloader saves the attention blocks' tensors on
    # the host; off: it recomputes them. Both compute the same values (a recompute is the same forward),
    # and the offloaded inputs are copies: the same losses and adapters as the model's own checkpointing,
    # bit for bit.
    runs = {}
    for name, extra in (("saved", []), ("recomputed", ["model.offload_attention=false"]), ("ckpt", None)):
        offload = [] if extra is None else ["model.activation_offload=true", *extra]
        cfg = load_config(None, [*RANDOM, f"train.output_dir={tmp_path / name}", "model.fused_kernels=on", *offload])
        run = train.setup(cfg)
        offloaders = {getattr(m, "_lora_dist_offloader", None) for m in run.model.modules()} - {None}
        assert len(offloaders) == (0 if extra is None else 1)
        if offloaders:
            assert offloaders.pop().save_attention == (name == "saved")
        runs[name] = [train.train_step(run, _window(run))["loss"] for _ in range(2)], _adapter_snapshot(run)
    for name in ("saved", "recomputed"):
        assert runs[name][0] == runs["ckpt"][0]
        assert all(torch.equal(runs[name][1][k], v) for k, v in runs["ckpt"][1].items())


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_fp8_base_backward_keeps_the_loss_and_changes_the_gradients_all_changes_both(tmp_path, capsys):
    # model.fp8_base on the CPU's reference FP8 (torch._scaled_mm there): "backward" leaves the loss's
    # forward in bf16, so the first step's loss is the bf16 run's bit for bit while its gradient (taken
    # through e4m3-rounded products, ~2^-4 relative per element) is not; "all" rounds the forward too.
    # A run after them with fp8_base=off finds the process-wide switch off again.
    from lora_dist import kernels

    def first_step(name, fp8):
        cfg = load_config(None, [*RANDOM, f"train.output_dir={tmp_path / name}", "model.fused_kernels=on",
                                 "model.compute_dtype=bf16", "distributed.precision=bf16", f"model.fp8_base={fp8}",
                                 f"lora.target_modules=[{','.join(ALL_LINEARS)}]"])  # every group fused
        run = train.setup(cfg)
        assert kernels.fp8_switches() == {"off": (False, True, True), "backward": (True, True, False),
                                          "all": (True, True, True)}[fp8]
        return train.train_step(run, _window(run))

    off, backward, every = (first_step(f, f) for f in ("off", "backward", "all"))
    assert backward["loss"] == off["loss"] and backward["grad_norm"] != off["grad_norm"]
    assert every["loss"] != off["loss"]
    # the same model and data: the FP8 gradient is within e4m3's rounding of the bf16 one, not far off
    assert backward["grad_norm"] == pytest.approx(off["grad_norm"], rel=0.1)
    assert first_step("off-again", "off")["loss"] == off["loss"]


def test_fp8_base_needs_bf16_compute_and_the_fused_path(tmp_path):
    with pytest.raises(ConfigError, match="model.fp8_base=backward runs in bf16 compute"):
        load_config(None, [*RANDOM, f"train.output_dir={tmp_path}", "model.fp8_base=backward"])
    with pytest.raises(ConfigError, match="model.fp8_base=all runs in the fused kernels"):
        load_config(None, [*RANDOM, f"train.output_dir={tmp_path}", "model.fp8_base=all", "model.compute_dtype=bf16",
                           "distributed.precision=bf16", "model.fused_kernels=off"])
    out = tmp_path / "run"
    cfg = load_config(None, [*RANDOM, f"train.output_dir={out}", "model.fp8_base=all", "model.compute_dtype=bf16",
                             "distributed.precision=bf16"])  # fused_kernels=auto: not on the CPU
    with pytest.raises(ConfigError, match="runs in the fused kernels, which do not take this run"):
        train.setup(cfg)
    assert not out.exists()  # refused before the output folder or any weight


def test_fused_loss_is_the_mean_over_all_response_tokens_of_the_global_batch(tiny_dir, tmp_path, capsys):
    # The fused chunked loss divides its summed token loss by num_items_in_batch, the global token
    # count, as the plain forward does (micro batches of unequal counts).
    run = train.setup(_config(tiny_dir, tmp_path, "model.fused_kernels=on",
                              "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"))
    assert run.fused and hasattr(run.model.base_model, "_lora_dist_original_forward")  # the chunked loss is on
    window = _window(run)
    expected, _ = _reference_loss(run, window)  # without labels the patched forward returns full logits
    stats = train.train_step(run, window)
    # fp32 on both sides, sums in another order: ~1e-6 relative (as in the plain test above).
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)


def test_fused_run_with_an_adapter_on_the_head_keeps_the_models_own_loss_scale(tiny_dir, tmp_path, capsys):
    # The tiny default trains lm_head too: the fused path then keeps the model's own logits and loss,
    # which already divides by num_items_in_batch. The loop rescaled every fused loss as if it were a
    # per-batch mean: the step-0 eval loss of `lora-dist train configs/tiny-cpu.yaml
    # model.fused_kernels=on` read 417 instead of 6.64, and training steps were scaled alike.
    run = train.setup(_config(tiny_dir, tmp_path, "model.fused_kernels=on"))
    assert run.fused and "_lora_dist_original_forward" not in run.model.base_model.__dict__  # own loss
    window = _window(run)
    expected, _ = _reference_loss(run, window)
    stats = train.train_step(run, window)
    # fp32 on both sides, sums in another order: ~1e-6 relative (as in the plain test above).
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)


def test_diagnostics_record_profile_steps_and_the_fused_flag(tmp_path, capsys):
    train.train(load_config(None, [*RANDOM, f"train.output_dir={tmp_path}", "train.diagnostics=true",
                                   "train.profile_steps=[2,2]"]))
    record = json.loads((tmp_path / "diagnostics" / "rank-0.json").read_text())
    assert record["rank"] == 0 and record["fused_kernels"] is False  # auto: off on the CPU
    assert record["profile"]["steps"] == [2, 2] and record["profile"]["comm_ms_per_step"] == 0.0  # one process


# ============================================================ the scaling study, rehearsed on CPU processes

SCALING_STEPS = 6


@pytest.fixture(scope="module")
def scaling_study(tmp_path_factory):
    """launch/gpu-scaling.sh exactly as on the GPUs, on random:tiny with 1 and 2 CPU processes (gloo)."""
    import os
    from pathlib import Path

    out = tmp_path_factory.mktemp("scaling")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MASTER_"))}
    env.update(LORA_DIST_PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", SCALING_RUN_TIMEOUT="240")
    # fused kernels on: their ZeRO-3 path (adapters read outside their modules) runs on the CPU too
    done = subprocess.run(
        [str(root / "launch" / "gpu-scaling.sh"), str(out), "model.path=random:tiny", "data.max_seq_len=64",
         "model.compute_dtype=fp32", "train.micro_batch_size=2", "train.global_batch_size=4",
         f"train.max_steps={SCALING_STEPS}", "train.profile_steps=[4,4]", "model.fused_kernels=on",
         "distributed.timeout_s=60"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["run"]: r for r in json.loads((out / "summary.json").read_text())}


@pytest.mark.distributed
def test_scaling_study_runs_one_process_then_zero2_and_zero3_on_two(scaling_study):
    assert {name: (r["exit"], r["world_size"], r["steps"]) for name, r in scaling_study.items()} == {
        "gpu1-zero2": (0, 1, SCALING_STEPS), "gpu2-zero2": (0, 2, SCALING_STEPS), "gpu2-zero3": (0, 2, SCALING_STEPS)}
    assert scaling_study["gpu2-zero3"]["profile"]["collective"] == "gloo ops"
    assert scaling_study["gpu2-zero3"]["comm_ms_per_step"] > 0


@pytest.mark.distributed
def test_two_ranks_with_fused_kernels_follow_one_process_under_zero2_and_zero3(scaling_study):
    # Same global batch, fp32 compute: the 2-rank sums run in another order (a few ulps, ~1e-7 relative,
    # which Adam can grow over steps; as in test_launch). Under ZeRO-3 the fused kernels read the
    # adapters outside their modules: a shard read before its gather, or a gradient lost on the way
    # back, moves the loss by >1e-2 from the second step on.
    one = scaling_study["gpu1-zero2"]["losses"]
    for name in ("gpu2-zero2", "gpu2-zero3"):
        assert scaling_study[name]["losses"] == pytest.approx(one, rel=1e-5), name


@pytest.mark.distributed
def test_zero_partitions_adapter_state_and_never_the_4bit_base(scaling_study):
    alone = scaling_study["gpu1-zero2"]["shards"][0]
    zero2, zero3 = scaling_study["gpu2-zero2"]["shards"], scaling_study["gpu2-zero3"]["shards"]
    for shards in (zero2, zero3):
        for s in shards:  # gradients, fp32 masters and Adam moments: halved on each of 2 ranks
            assert s["adapter_grad_bytes"] == alone["adapter_grad_bytes"] // 2
            assert s["master_param_bytes"] == alone["master_param_bytes"] // 2
            assert s["optimizer_state_bytes"] - 4 == (alone["optimizer_state_bytes"] - 4) // 2  # + the step
            assert s["base_bytes"] == alone["base_bytes"] and s["base_partitioned"] is False
    assert [s["adapter_param_bytes"] for s in zero2] == [alone["adapter_param_bytes"]] * 2
    assert [s["adapter_param_bytes"] for s in zero3] == [alone["adapter_param_bytes"] // 2] * 2


@pytest.mark.distributed
def test_cluster_info_reaches_the_run_record(scaling_study):
    import socket

    assert scaling_study["gpu2-zero2"]["hostnames"] == [socket.gethostname()]


def test_setup_binds_the_device_before_its_first_collective(tmp_path, capsys, monkeypatch):
    # On GPUs NCCL runs a collective on the current CUDA device: cluster_info's all_gather_object before
    # torch.cuda.set_device put every rank's tensors on cuda:0 and failed on rank 1 (seen on 2 H200s).
    from lora_dist import building, distributed

    calls = []
    device, info = building.device, distributed.cluster_info
    monkeypatch.setattr(building, "device", lambda: calls.append("device") or device())
    monkeypatch.setattr(distributed, "cluster_info", lambda: calls.append("cluster_info") or info())
    train.setup(load_config(None, [*RANDOM, f"train.output_dir={tmp_path}"]))
    assert calls == ["device", "cluster_info"]


def test_steady_state_and_whole_run_tokens_per_s_count_only_this_launch(tmp_path, monkeypatch, capsys):
    import signal
    import statistics

    from lora_dist import building
    from lora_dist.preemption import Preempted
    from preempt_hook import signalling

    settings = [*RANDOM, f"train.output_dir={tmp_path}", "train.max_steps=8"]
    with monkeypatch.context() as patch:
        # 2 micro batches per step: forward 5 is step 3's first
        patch.setattr(building, "build_model", signalling(building.build_model, 5, signal.SIGTERM))
        with pytest.raises(Preempted):
            train.train(load_config(None, settings))
    resumed = train.train(load_config(None, [*settings, "train.resume=auto"]))
    records = read_metrics(tmp_path)
    first = [r for r in records if r["kind"] == "summary"][0]
    rows = {r["step"]: r for r in records if r["kind"] == "train"}
    for summary, steps in ((first, [1, 2, 3]), (resumed, [4, 5, 6, 7, 8])):
        rates = [rows[s]["tokens_per_s"] for s in steps]
        # The median after each launch's first train.WARMUP_STEPS steps (those pay for allocation).
        assert summary["tokens_per_s_steady"] == round(statistics.median(rates[train.WARMUP_STEPS:]), 1)
        tokens = rows[steps[-1]]["tokens_seen"] - (rows[steps[0] - 1]["tokens_seen"] if steps[0] > 1 else 0)
        # Whole launch: its own tokens over its own wall time (start-up included), which the summary shows
        # rounded to 0.1 s: the rate lies between the ones that rounding allows.
        wall = summary["wall_time_s"]
        assert tokens / (wall + 0.05) <= summary["tokens_per_s"] <= tokens / max(wall - 0.05, 1e-9)
    assert [r for r in records if r["kind"] == "summary"][-1]["tokens_per_s_steady"] == resumed["tokens_per_s_steady"]
    assert "tokens_per_s_steady" in capsys.readouterr().out  # the console summary shows it
