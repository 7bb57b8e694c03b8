"""One rank of the checkpoint resume job: write checkpoints at one world size, resume them at another.

Usage (tests/distributed/test_resume.py starts the ranks with RANK/WORLD_SIZE/MASTER_* set):
    DS_ACCELERATOR=cpu python resume_worker.py {write|resume} OUT_DIR

The global batch is the same at every world size (accumulation = ACCUM * WORLD / world size) and samples
are laid out rank-major, so 1 and 2 ranks train on the same sequence of global batches.
"write" trains RESUME_AT steps of each setting and saves a checkpoint under OUT_DIR/ckpt-w<world>-<setting>.
"resume" loads every checkpoint both world sizes wrote, re-gathers the whole optimizer state (it must equal
the saved one bit for bit), then trains to RESUME_STEPS. Writes OUT_DIR/<phase>-w<world>-rank<r>.json.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import ds_scenarios as sc
from lora_dist import checkpoint, distributed, optim_state

SETTINGS = {"fp32-z0": ("fp32", 0), "fp32-z1": ("fp32", 1), "fp32-z2": ("fp32", 2), "fp32-z3": ("fp32", 3),
            "bf16-z0": ("bf16", 0), "bf16-z2": ("bf16", 2), "bf16-z3": ("bf16", 3)}
WORLDS = (1, 2)


def make_engine(precision: str, stage: int):
    world = dist.get_world_size()
    model = sc.build_model("nf4")
    config = distributed.make_ds_config(
        zero_stage=stage, micro_batch_size=sc.MICRO, grad_accum=sc.ACCUM * sc.WORLD // world, world_size=world,
        grad_clip=sc.GRAD_CLIP, precision=precision, lr=sc.LR, weight_decay=sc.WEIGHT_DECAY,
        warmup_steps=sc.WARMUP, total_steps=sc.RESUME_STEPS, schedule="cosine",
    )
    return model, distributed.setup_engine(model, config)


def train(engine, steps: range) -> list[float]:
    world, rank = dist.get_world_size(), dist.get_rank()
    accum = sc.ACCUM * sc.WORLD // world
    data = sc.dataset(sc.RESUME_STEPS)
    engine.train()
    losses = []
    for step in steps:
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(accum):
            i = rank * accum + micro  # this micro batch's place in the global batch
            x, y = sc.micro_batch(data, step, i // sc.ACCUM, i % sc.ACCUM)
            loss = sc.loss_fn(engine(x), y)
            engine.backward(loss)
            total += loss.item()
            engine.step()
        dist.all_reduce(total)
        losses.append(total.item() / (accum * world))
    return losses


def phase_write(out: Path) -> dict:
    results = {}
    for name, (precision, stage) in SETTINGS.items():
        try:
            model, engine = make_engine(precision, stage)
            losses = train(engine, range(sc.RESUME_AT))
            checkpoint.save_checkpoint(out / f"ckpt-w{dist.get_world_size()}-{name}", step=sc.RESUME_AT, model=model,
                                       engine=engine, data_state={"next_step": sc.RESUME_AT})
            results[name] = {"losses": losses}
        except Exception:  # noqa: BLE001 (recorded: the test names the failing setting)
            results[name] = {"error": traceback.format_exc()}
    return results


def phase_resume(out: Path) -> dict:
    results = {}
    for source in WORLDS:
        for name, (precision, stage) in SETTINGS.items():
            key = f"w{source}-{name}"
            try:
                model, engine = make_engine(precision, stage)
                root = out / f"ckpt-w{source}-{name}"
                state = checkpoint.load_checkpoint(root, model=model, engine=engine)
                saved = load_file(str(checkpoint.find_latest(root) / checkpoint.OPTIMIZER_FILE))
                names = optim_state.trainable_names(model)
                again, _ = distributed.full_optimizer_state(engine, names)
                per_param = {k: v for k, v in saved.items() if not k.startswith("group")}
                equal = per_param.keys() == {k for k in again if not k.startswith("group")} and all(
                    torch.equal(again[k], v) for k, v in per_param.items())
                with distributed.gathered(engine):
                    weights_equal = all(torch.equal(p.detach().float(), saved[f"{names[id(p)]}::fp32"].to(p.dtype).float())
                                        for p in model.get_trainable_parameters())
                counters = (engine.global_steps, engine.lr_scheduler.last_epoch)
                losses = train(engine, range(state["step"], sc.RESUME_STEPS))
                adapter = distributed.gathered_adapter_state_dict(engine)
                if dist.get_rank() == 0:
                    from safetensors.torch import save_file

                    save_file({k: v.float().contiguous() for k, v in adapter.items()},
                              str(out / f"resumed-w{dist.get_world_size()}-from-{key}.safetensors"))
                results[key] = {"state_equal": equal, "weights_equal": weights_equal, "counters": counters,
                                "losses": losses}
            except Exception:  # noqa: BLE001 (recorded: the test names the failing setting)
                results[key] = {"error": traceback.format_exc()}
    return results


def main() -> None:
    phase, out = sys.argv[1], Path(sys.argv[2])
    rank, world = distributed.init_distributed(backend="gloo")
    sc.finish_worker(out / f"{phase}-w{world}-rank{rank}.json", {"write": phase_write, "resume": phase_resume}[phase](out))


if __name__ == "__main__":
    main()
