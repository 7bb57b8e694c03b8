"""The import graph: the CLI's help loads no torch, and nothing imports back up from the job to its entry points."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_dist"
ENTRY_POINTS = {"cli", "__main__", "bench", "launch"}  # the top of the graph: nothing in the package imports them


def _imports(module: str) -> set[str]:
    """The lora_dist modules `module` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_dist"):
            found |= {a.name for a in node.names} if node.module == "lora_dist" else {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lora_dist.")}
    return found


def test_help_imports_no_torch_bitsandbytes_or_deepspeed():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lora_dist", "--help"],
                          capture_output=True, text=True, timeout=120, check=True)
    loaded = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "bitsandbytes", "deepspeed", "transformers")}
    assert "lora_dist.cli" in loaded  # the measurement saw the package at all


# The tools beside the bench reuse its timed training step: the Unsloth side (its own process) and the
# planner's GPU proof (`lora-dist plan --measure`, plan_measure.py). They are commands themselves, never imported by the job.
BENCH_TOOLS = {"bench_unsloth", "plan_measure"}


def test_no_module_imports_an_entry_point():
    modules = [p.stem for p in PACKAGE.glob("*.py")]
    upward = {m: _imports(m) & (ENTRY_POINTS - ({"bench"} if m in BENCH_TOOLS else set()))
              for m in modules if m not in ENTRY_POINTS}
    assert {m: sorted(up) for m, up in upward.items() if up} == {}
    job = {"train", "building", "engine", "checkpoint", "distributed", "config", "data", "loader", "model", "plan"}
    assert not {m for m in job if _imports(m) & BENCH_TOOLS}  # the job never reaches the tools


def test_the_job_and_its_engine_reach_deepspeed_only_through_distributed():
    for module in ("train", "engine", "building", "checkpoint", "tracking", "config"):
        source = (PACKAGE / f"{module}.py").read_text()
        assert "import deepspeed" not in source and "from deepspeed" not in source, module
