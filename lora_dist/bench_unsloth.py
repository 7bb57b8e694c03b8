"""The Unsloth side of `lora-dist bench --vs unsloth`, in a process of its own.

    python -m lora_dist.bench_unsloth SPEC.json RESULT.json      (run by lora_dist.bench)

`import unsloth` patches transformers, peft and trl when it is imported, so it must come before
them, and a process that has run our side or PEFT's has them imported already. Here it comes
first: nothing this module imports at the top (nor the lora_dist package) imports those three;
`lora_dist.bench` is imported after unsloth, for the same setup, batch, adapter init, timing and
report row as the other sides.

SPEC.json (from `bench.run_unsloth`): the run's setup, the folder holding the saved dense model,
checkpointing on/off, warm-up and timed steps. RESULT.json: one report row, or one with an
"error" field and the stage that failed; the exit code is 0 only for a row without error.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from lora_dist import files


def train(spec: dict[str, Any], stage: list[str]) -> dict[str, Any]:
    """Load the saved model through Unsloth, put LoRA on it, and time the steps; returns the report row.

    `stage` holds the stage reached, for the error row when one fails.
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device; Unsloth trains on CUDA only")
    # unsloth before transformers, peft and trl (it patches them on import); our bench after it
    import unsloth
    from unsloth import FastLanguageModel

    from lora_dist import bench

    setup = bench.Setup.from_summary(spec["setup"])
    checkpointing = bool(spec["checkpointing"])
    # "unsloth": its checkpointing with the layer inputs offloaded to host memory, double-buffered
    mode = "unsloth" if checkpointing else False
    alpha = int(setup.alpha) if float(setup.alpha).is_integer() else setup.alpha

    stage[0] = "from_pretrained"
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=setup.seq, dtype=setup.dtype, load_in_4bit=True,
        use_gradient_checkpointing=mode,
        offload_embedding=False,  # the embedding stays on the GPU, as on the other sides
    )
    stage[0] = "get_peft_model"
    model = FastLanguageModel.get_peft_model(
        model, r=setup.rank, lora_alpha=alpha, lora_dropout=setup.dropout, target_modules=spec["targets"], bias="none",
        use_gradient_checkpointing=mode, random_state=setup.seed, use_rslora=False, max_seq_length=setup.seq,
    )
    FastLanguageModel.for_training(model)
    pairs = bench.peft_adapter_pairs(model)
    expected = setup.layers * len(spec["targets"])
    if len(pairs) != expected:
        raise RuntimeError(f"Unsloth made {len(pairs)} LoRA layers where {expected} were asked for")
    bench._init_adapters(pairs, setup.seed)  # the same A as ours (per-name generator), B = 0

    stage[0] = "train"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0, fused=True)  # as ours on CUDA
    side = bench.Side("unsloth", model, optimizer, params)
    batch = bench.make_batch(setup, model.config.vocab_size)
    bench._free()
    res = bench.time_steps(side, batch, setup, spec["warmup"], spec["steps"])  # peak: after the load
    row = bench.result_row(side, setup, checkpointing, res, spec["peak_tflops"], offload=checkpointing)
    row["version"] = getattr(unsloth, "__version__", None)
    row["lora_dtype"] = str(pairs[0][1].dtype).replace("torch.", "")
    return row


def main(argv: list[str]) -> int:
    """Read SPEC.json, train, write RESULT.json (also on failure); 0 when the row has no error."""
    if len(argv) != 2:
        print("usage: python -m lora_dist.bench_unsloth SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    row: dict[str, Any] = {"side": "unsloth", "gradient_checkpointing": bool(spec.get("checkpointing")),
                           "checkpointing": "offload" if spec.get("checkpointing") else "off"}
    stage = ["import"]
    try:
        row.update(train(spec, stage))
        rc = 0
    except Exception as err:  # noqa: BLE001 - every failure becomes the row's error, for the bench's table
        traceback.print_exc()
        oom = type(err).__name__ == "OutOfMemoryError"
        row.update(error="out of GPU memory" if oom else f"{type(err).__name__}: {err}"[:500], failed_stage=stage[0])
        rc = 1
    files.atomic_write_text(result_path, json.dumps(row) + "\n")  # the parent reads a whole row or none
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
