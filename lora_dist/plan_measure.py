"""`lora-dist plan --measure`: the planner's predictions against measured peaks on a CUDA GPU.

Kept apart from plan.py, which the training job imports (`train.micro_batch_size=auto`): this module
builds models through the bench's training step (`lora_dist.bench`), a tool the job never reaches.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from lora_dist import kernels
from lora_dist.config import Config, load_config
from lora_dist.errors import ConfigError
from lora_dist.plan import GiB, ModelFacts, auto_micro_batch, describe_model, device_budget_bytes, plan_memory

# ------------------------------------------------------------------------------------ GPU proof


def measure(out: str | None, quick: bool = False) -> int:
    """Predicted vs measured peak of the bench's training step (lora_dist.bench build_ours/train_step).

    Each model is built once (checkpointing on), then every (seq, micro batch) runs one warm-up and
    one measured step with checkpointing on, then again with it off (`gradient_checkpointing_disable`).
    Peak = torch.cuda.max_memory_allocated after a reset taken before the measured step (the model,
    adapters and optimizer state are already there). Cases the plan predicts above the card are not
    run. First, on the 8B model: an emulated 24 GiB card where `auto_micro_batch` picks the micro
    batch and accumulation keeps the global batch; two optimizer steps must run without out-of-memory.
    """
    import gc
    import os
    import time

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not torch.cuda.is_available():
        raise ConfigError(["--measure needs a CUDA GPU"])
    from lora_dist import bench

    total = torch.cuda.get_device_properties(0).total_memory
    cases = [  # shape, layers (None: all), seqs, micro batches
        ("llama3-8b", None, (2048, 8192), (1, 4, 8)),
        ("llama3.2-1b", None, (2048,), (4, 16)),
    ]
    for extra in ("qwen2.5-7b", "mistral-7b"):
        from lora_dist.shapes import SHAPES

        if extra in SHAPES:
            cases.append((extra, 8, (2048,), (2, 8)))
    if quick:
        cases = [(s, 2, (512,), (1, 2)) for s, *_ in cases]
    rows: list[dict[str, Any]] = []
    fit: dict[str, Any] | None = None
    # card GiB, seq, global batch: 36 has divisors (micro 18) that come close to a 24 GiB card; with 32
    # the largest micro batch that fits, 16, fills 80% of it at best
    fit_case = (24.0, 2048, 36) if not quick else (4.0, 512, 8)
    started = time.perf_counter()
    for shape_name, layers, seqs, micros in cases:
        cfg = _bench_config(shape_name, layers, max(seqs), max(micros))
        facts = describe_model(cfg, num_layers=layers)
        setup = bench.Setup(shape=shape_name, model_path=None, layers=len(facts.layers), seq=seqs[0],
                            micro_batch=micros[0], rank=16, alpha=32.0, quant="nf4", double_quant=True,
                            lr=1e-4, seed=0, device="cuda")
        side = bench.build_ours(setup, checkpointing=True)
        if fit is None:  # the first (8B) model also proves micro_batch_size=auto on an emulated card
            fit = _measure_auto_fit(side, facts, *fit_case)
        for ckpt in (True, False):
            if not ckpt:
                side.model.base_model.gradient_checkpointing_disable()
            for seq in seqs:
                for micro in micros:
                    plan = plan_memory(cfg, micro_batch=micro, seq_len=seq, checkpointing=ckpt, facts=facts)
                    row = {"shape": shape_name, "layers": len(facts.layers), "seq": seq, "micro_batch": micro,
                           "checkpointing": ckpt, "predicted_gib": plan.peak_bytes / GiB, "phase": plan.peak_phase}
                    if plan.peak_bytes > 0.92 * total:
                        row["measured_gib"] = None
                        row["skipped"] = "predicted above the card"
                    else:
                        batch = torch.randint(0, facts.vocab, (micro, seq), device="cuda")
                        bench.train_step(side, batch)
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        bench.train_step(side, batch)
                        torch.cuda.synchronize()
                        row["measured_gib"] = torch.cuda.max_memory_allocated() / GiB
                        row["error"] = row["predicted_gib"] / row["measured_gib"] - 1
                        del batch
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del side
        gc.collect()
        torch.cuda.empty_cache()
    report = {"rows": rows, "auto_fit": fit, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "wall_s": time.perf_counter() - started,
              "max_abs_error": max((abs(r["error"]) for r in rows if "error" in r), default=None)}
    print(_format_measure(report))
    if out:
        from lora_dist.files import atomic_write_text

        atomic_write_text(out, json.dumps(report, indent=1))
    return 0


def _bench_config(shape_name: str, layers: int | None, seq: int, micro: int, global_batch: int | None = None) -> Config:
    """The job config equivalent to bench.build_ours: NF4 + double quant, bf16, r=16 on every linear of a layer."""
    from lora_dist import families
    from lora_dist.shapes import shape

    targets = families.lora_targets(shape(shape_name).model_type)
    targets = targets if isinstance(targets, str) else f"[{','.join(targets)}]"
    overrides = [f"model.path=random:{shape_name}", "model.bits=4", "model.compute_dtype=bf16",
                 "model.fused_kernels=on", "data.path=random-tokens", f"data.max_seq_len={seq}", "train.max_steps=2",
                 f"train.micro_batch_size={micro}", "lora.rank=16", "lora.alpha=32", "lora.dropout=0.0",
                 f"lora.target_modules={targets}"]
    if global_batch is not None:
        overrides.append(f"train.global_batch_size={global_batch}")
    return load_config(None, overrides)


def _measure_auto_fit(side: Any, facts: ModelFacts, gib: float, seq: int, global_batch: int) -> dict[str, Any]:
    """micro_batch_size=auto on an emulated card of `gib` GiB, with `side` (built, checkpointing on).

    The cap (`set_per_process_memory_fraction`) is set after the build: a real card loads the base
    quantized as it streams in, the random build allocates it dense first. `device_budget_bytes` (what
    the job reads) gives the budget, `auto_micro_batch` the split; two optimizer steps of `accum`
    micro batches each must run, their peak is compared with the budget.
    """
    import gc

    cfg = _bench_config(facts.name.removeprefix("random:"), len(facts.layers), seq, 1, global_batch)
    total = torch.cuda.get_device_properties(0).total_memory
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(gib * GiB / total)
    budget = device_budget_bytes()
    micro, accum = auto_micro_batch(cfg, budget, 1, facts)
    result: dict[str, Any] = {"budget_gib": gib, "device_budget_gib": budget / GiB, "seq": seq,
                              "global_batch": global_batch, "micro_batch": micro, "accumulation": accum,
                              "predicted_gib": plan_memory(cfg, micro_batch=micro, facts=facts).peak_bytes / GiB}
    try:
        torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):  # two optimizer steps of `accum` micro batches each, as the job runs them
            for _ in range(accum):
                batch = torch.randint(0, facts.vocab, (micro, seq), generator=gen).cuda()
                with kernels.adapter_copies():
                    (side.model(input_ids=batch, labels=batch).loss / accum).backward()
            side.optimizer.step()
            side.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        result["oom"] = False
        result["measured_gib"] = torch.cuda.max_memory_allocated() / GiB
        result["used_fraction"] = result["measured_gib"] * GiB / budget
    except torch.OutOfMemoryError as err:
        result["oom"] = True
        result["error"] = str(err).splitlines()[0]
    finally:
        side.optimizer.zero_grad(set_to_none=True)
        torch.cuda.set_per_process_memory_fraction(1.0)
    print(json.dumps(result), flush=True)
    return result


def _format_measure(report: dict[str, Any]) -> str:
    lines = [f"{'shape':<13}{'layers':>7}{'seq':>6}{'micro':>6}{'ckpt':>6}{'predicted':>11}{'measured':>10}{'error':>8}"]
    for r in report["rows"]:
        measured = f"{r['measured_gib']:.2f}" if r.get("measured_gib") is not None else "-"
        err = f"{r['error']:+.1%}" if "error" in r else r.get("skipped", "")
        lines.append(f"{r['shape']:<13}{r['layers']:>7}{r['seq']:>6}{r['micro_batch']:>6}"
                     f"{'on' if r['checkpointing'] else 'off':>6}{r['predicted_gib']:>11.2f}{measured:>10}{err:>8}")
    f = report["auto_fit"]
    lines.append(f"auto on {f['budget_gib']:g} GiB: micro {f['micro_batch']} x accum {f['accumulation']}, predicted "
                 f"{f['predicted_gib']:.2f} GiB, " + ("OUT OF MEMORY" if f["oom"] else
                                                     f"measured {f['measured_gib']:.2f} GiB ({f['used_fraction']:.0%})"))
    return "\n".join(lines)
