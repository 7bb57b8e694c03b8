"""`lora-dist bench` end to end on the tiny shape (CPU), and its argument checks."""

import argparse
import contextlib
import io
import json
import math

import pytest
import torch

from lora_dist import bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of ours vs PEFT without checkpointing: (exit code, printed table, JSON report)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = bench.main(_args("--shape", "tiny", "--vs", "peft", "--gradient-checkpointing", "off",
                              "--warmup", "0", "--steps", "2", "--json", str(path)))
    return rc, out.getvalue(), json.loads(path.read_text())


def test_bench_tiny_vs_peft_reports_sane_fields_per_side(tiny_run):
    rc, _, report = tiny_run
    assert rc == 0
    assert [r["side"] for r in report["results"]] == ["ours", "peft"]
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert 0 < r["mfu"] and 0 < r["hfu"] <= r["mfu"]  # no checkpointing: 4N done of the 6N counted
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
    assert report["results"][0]["trainable"] == report["results"][1]["trainable"]


def test_bench_sides_train_to_the_same_loss_in_fp32(tiny_run):
    # Same base bytes, same adapter init, same batch, fp32 on the CPU: the two sides differ only in
    # summation order (~1e-7 relative per op), so two AdamW steps agree to far better than 1e-4.
    _, _, report = tiny_run
    (ratio,) = report["ratios"]
    ours, peft = report["results"]
    assert ratio["vs"] == "peft" and ratio["speedup"] == pytest.approx(ours["tokens_per_s"] / peft["tokens_per_s"])
    assert abs(ratio["first_loss_diff"]) < 1e-4 and abs(ratio["final_loss_diff"]) < 1e-4


def test_bench_prints_a_table_with_both_sides_and_the_ratio(tiny_run):
    _, printed, _ = tiny_run
    assert "tokens/s" in printed
    assert "\nours " in printed and "\npeft " in printed
    assert "ours vs peft (ckpt off): speed x" in printed


def test_matmul_weight_count_matches_the_built_model():
    setup = bench._setup_from_args(_args("--shape", "tiny", "--quant", "none", "--device", "cpu"))
    model = bench.build_base(setup)
    # 2 layers of (q,o: 128x128; k,v: 128x64; gate,up,down: 128x256) plus the 512x128 head
    assert bench._count_n(setup, model) == bench._matmul_weights(model) == 2 * (2 * 128 * 128 + 2 * 128 * 64
                                                                                 + 3 * 128 * 256) + 512 * 128


def test_bench_rejects_bad_arguments_with_one_line_each(capsys):
    rc = bench.main(_args("--shape", "tiny", "--seq", "0", "--extrapolate-layers", "4,2", "--device", "cpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert any("--seq must be positive" in line for line in err)
    assert any("--extrapolate-layers takes two depths" in line for line in err)


def test_memory_studies_refuse_to_run_without_cuda(capsys):
    rc = bench.main(_args("--shape", "tiny", "--fit-memory", "24", "--device", "cpu"))
    assert rc == 2
    assert "run them on a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_memory_studies_run_on_cuda(tmp_path):
    path = tmp_path / "bench.json"
    rc = bench.main(_args("--shape", "tiny", "--steps", "1", "--warmup", "0", "--fit-memory", "2",
                          "--fit-seqs", "64", "--extrapolate-layers", "1,2", "--json", str(path)))
    report = json.loads(path.read_text())
    assert rc == 0
    assert report["fit_memory"][0]["largest_micro_batch_per_seq"]["64"] >= 1
    (peak,) = report["extrapolated_peak"]
    assert peak["computed_full_peak_gib"] >= peak["measured_peak_gib"]["2"] > 0
