"""One rank of the multi-process test job: trains every scenario under real DeepSpeed, writes results.

Usage (the `ds_results` fixture in conftest.py starts the ranks with RANK/WORLD_SIZE/MASTER_* set):
    DS_ACCELERATOR=cpu python ds_worker.py {train|resume|reshard} OUT_DIR

Writes OUT_DIR/<phase>-rank<r>.json ({scenario: {"losses", "report", "error"}}) and, from rank 0,
OUT_DIR/<scenario>.safetensors (the final adapter, gathered). One launch runs many scenarios
because importing DeepSpeed and forming the gloo group costs seconds.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import ds_scenarios as sc  # noqa: E402
from lora_dist import checkpoint, distributed  # noqa: E402

STAGES = (0, 1, 2, 3)


def train(engine, data, rank: int, steps: range, total_steps: int) -> tuple[list[float], dict | None]:
    """Train `steps`; returns (global mean loss per step, shard report in the second step)."""
    engine.train()
    losses, report = [], {}
    for step in steps:
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(sc.ACCUM):
            x, y = sc.micro_batch(data, step, rank, micro)
            loss = sc.loss_fn(engine(x), y)
            engine.backward(loss)
            total += loss.item()
            if step == steps[0] + 1:
                # Optimizer state exists after one step; grads are held now, the step frees them.
                when = "boundary" if engine.is_gradient_accumulation_boundary() else "accumulating"
                report[when] = distributed.shard_report(engine)
            engine.step()  # DeepSpeed counts micro batches: it steps the optimizer on the boundary only
        dist.all_reduce(total)
        losses.append(total.item() / (sc.ACCUM * dist.get_world_size()))
    return losses, report


def make_engine(
    base: str, stage: int, total_steps: int, precision: str = "fp32", dropout: float = 0.0, **options
):
    model = sc.build_model(base, dropout, bias=options.pop("bias", "none"))
    config = distributed.make_ds_config(
        zero_stage=stage,
        micro_batch_size=sc.MICRO,
        grad_accum=sc.ACCUM,
        world_size=dist.get_world_size(),
        grad_clip=sc.GRAD_CLIP,
        precision=precision,
        lr=sc.LR,
        weight_decay=sc.WEIGHT_DECAY,
        warmup_steps=sc.WARMUP,
        total_steps=total_steps,
        schedule="cosine",
        **options,
    )
    return model, distributed.setup_engine(model, config)


def save_adapter(engine, out: Path, name: str, rank: int) -> None:
    state = distributed.gathered_adapter_state_dict(engine)  # collective under ZeRO-3
    if rank == 0:
        save_file({k: v.float().contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))


def phase_train(out: Path, rank: int) -> dict:
    results = {}

    def scenario(name, fn):
        start = time.perf_counter()
        try:
            results[name] = fn()
            results[name]["seconds"] = time.perf_counter() - start
        except Exception:  # record it, so the test names the failing scenario
            results[name] = {"error": traceback.format_exc()}

    def equivalence(base: str, stage: int, precision: str = "fp32", name: str = "", **options) -> dict:
        model, engine = make_engine(base, stage, sc.EQUIV_STEPS, precision, **options)
        data = sc.dataset(sc.EQUIV_STEPS)
        losses, report = train(engine, data, rank, range(sc.EQUIV_STEPS), sc.EQUIV_STEPS)
        save_adapter(engine, out, name or f"{base}-{precision}-z{stage}", rank)
        report["adapter_dtypes"] = sorted({str(p.dtype) for p in model.get_trainable_parameters()})
        return {"losses": losses, "report": report}

    def resume_first_half(stage: int) -> dict:
        # dropout > 0: the resumed run only matches if every rank's RNG state is restored.
        model, engine = make_engine("nf4", stage, sc.RESUME_STEPS, dropout=0.1)
        torch.manual_seed(100 + rank)
        data = sc.dataset(sc.RESUME_STEPS)
        straight, _ = train(engine, data, rank, range(sc.RESUME_STEPS), sc.RESUME_STEPS)
        save_adapter(engine, out, f"straight-z{stage}", rank)

        model, engine = make_engine("nf4", stage, sc.RESUME_STEPS, dropout=0.1)
        torch.manual_seed(100 + rank)
        first, _ = train(engine, data, rank, range(sc.RESUME_AT), sc.RESUME_STEPS)
        checkpoint.save_checkpoint(
            out / f"ckpt-z{stage}", step=sc.RESUME_AT, model=model, engine=engine,
            data_state={"next_step": sc.RESUME_AT}, extra={"stage": stage},
        )  # fmt: skip
        return {"straight": straight, "first": first}

    for base in ("dense", "nf4"):
        for stage in STAGES:
            scenario(f"{base}-fp32-z{stage}", lambda: equivalence(base, stage))
    scenario("int8-fp32-z3", lambda: equivalence("int8", 3))
    # Trained biases live in the base layers: ZeRO-3 must fetch them for the base's forward.
    scenario("bias-z3", lambda: equivalence("dense", 3, name="bias-z3", bias="lora_only"))
    scenario("offload-z2", lambda: equivalence("dense", 2, name="offload-z2", offload_optimizer=True))
    for stage in STAGES:
        scenario(f"dense-bf16-z{stage}", lambda: equivalence("dense", stage, "bf16"))
    for stage in STAGES:
        scenario(f"resume-z{stage}", lambda: resume_first_half(stage))
    return results


def phase_resume(out: Path, rank: int) -> dict:
    """A fresh process group: resume each checkpoint of phase_train and finish the run."""
    results = {}
    for stage in STAGES:
        try:
            model, engine = make_engine("nf4", stage, sc.RESUME_STEPS, dropout=0.1)
            torch.manual_seed(999)  # anything: the checkpoint's RNG state must replace it
            state = checkpoint.load_checkpoint(out / f"ckpt-z{stage}", model=model, engine=engine)
            data = sc.dataset(sc.RESUME_STEPS)
            second, _ = train(engine, data, rank, range(state["data_state"]["next_step"], sc.RESUME_STEPS), 0)
            save_adapter(engine, out, f"resumed-z{stage}", rank)
            results[f"resumed-z{stage}"] = {"second": second, "loaded": state}
        except Exception:
            results[f"resumed-z{stage}"] = {"error": traceback.format_exc()}
    # The optimizer state is saved whole: another ZeRO stage reads it too.
    try:
        model, engine = make_engine("nf4", 1, sc.RESUME_STEPS, dropout=0.1)
        checkpoint.load_checkpoint(out / "ckpt-z2", model=model, engine=engine)
        results["other-stage"] = {"error": None, "global_steps": engine.global_steps}
    except ValueError as err:
        results["other-stage"] = {"error": str(err)}
    results["tampered"] = resume_tampered(out, rank)
    return results


def resume_tampered(out: Path, rank: int) -> dict:
    """Resume a copy of the ZeRO-2 checkpoint with one byte of its optimizer state flipped."""
    path = out / "ckpt-tampered"
    step_dir = path / f"step-{sc.RESUME_AT:08d}"
    target = step_dir / checkpoint.OPTIMIZER_FILE
    if rank == 0:
        shutil.copytree(out / "ckpt-z2", path)
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    dist.barrier()
    model, engine = make_engine("nf4", 2, sc.RESUME_STEPS, dropout=0.1)
    before = distributed.gathered_adapter_state_dict(engine)
    rng = torch.get_rng_state()
    try:
        checkpoint.load_checkpoint(step_dir, model=model, engine=engine)
        error = None
    except Exception as err:  # any other kind reads as a failure in the test, not a dead job
        error = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    after = distributed.gathered_adapter_state_dict(engine)
    return {
        "error": error,
        "step_dir": str(step_dir),
        "adapter_unchanged": all(torch.equal(before[k], after[k]) for k in before),
        "rng_unchanged": torch.equal(rng, torch.get_rng_state()),
        "global_steps": engine.global_steps,
    }


def phase_reshard(out: Path, rank: int) -> dict:
    """Another world size: resume the checkpoints written by WORLD ranks, one step further."""
    results = {}
    for stage in STAGES:
        try:
            model, engine = make_engine("nf4", stage, sc.RESUME_STEPS, dropout=0.1)
            path = out / f"ckpt-z{stage}"
            state = checkpoint.load_checkpoint(path, model=model, engine=engine)
            saved = load_file(str(checkpoint.find_latest(path) / "adapter_model.safetensors"))
            got = distributed.gathered_adapter_state_dict(engine)
            steps = (engine.global_steps, engine.lr_scheduler.last_epoch)
            data = sc.dataset(sc.RESUME_STEPS)
            losses, _ = train(engine, data, rank, range(state["step"], state["step"] + 1), 0)
            results[f"reshard-z{stage}"] = {
                "adapter_equal": all(torch.equal(got[k], saved["base_model.model." + k]) for k in got),
                "global_steps": steps[0],
                "scheduler_steps": steps[1],
                "next_loss": losses[0],
                "files": sorted(p.name for p in checkpoint.find_latest(path).iterdir()),
            }
        except Exception:
            results[f"reshard-z{stage}"] = {"error": traceback.format_exc()}
    return results


PHASES = {"train": phase_train, "resume": phase_resume, "reshard": phase_reshard}


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    rank, world = distributed.init_distributed(backend="gloo")
    sc.finish_worker(out / f"{phase}-rank{rank}.json", PHASES[phase](out, rank))


if __name__ == "__main__":
    main()
