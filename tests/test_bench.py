"""`lora-dist bench` end to end on the tiny shape (CPU), and its argument checks."""

import argparse
import contextlib
import importlib.util
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_dist import bench, supervise


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
    assert "ours (ckpt off) vs peft (ckpt off): speed x" in printed


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


def test_lora_dropout_is_refused_outside_0_to_1(capsys):
    for bad in ("1", "-0.1", "nan"):
        rc = bench.main(_args("--shape", "tiny", "--lora-dropout", bad, "--device", "cpu"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "--lora-dropout is a probability in [0, 1)" in err[0], err


def test_lora_dropout_reaches_every_adapter_of_ours_and_peft():
    setup = bench._setup_from_args(_args("--shape", "tiny", "--device", "cpu", "--lora-dropout", "0.05"))
    ours = bench.build_ours(setup, checkpointing=False)
    assert {layer.lora_dropout.p for layer in ours.model.lora_layers.values()} == {0.05}
    peft = bench.build_peft(setup, checkpointing=False)
    drops = [m.lora_dropout["default"] for m in peft.model.modules() if hasattr(m, "lora_dropout")]
    assert len(drops) == len(ours.model.lora_layers) and {d.p for d in drops} == {0.05}


def test_lora_dropout_travels_to_the_unsloth_process_in_the_setup_summary():
    setup = bench._setup_from_args(_args("--shape", "tiny", "--device", "cpu", "--lora-dropout", "0.05"))
    assert bench.Setup.from_summary(json.loads(json.dumps(setup.summary()))) == setup
    assert setup.summary()["dropout"] == 0.05


def test_lora_dropout_leaves_the_first_loss_and_changes_the_second(tiny_run, tmp_path):
    # B starts at 0, so the first forward is the base model's whatever the masks; the first update of
    # B reads the dropped adapter inputs, so the second loss moves (fp32 on the CPU: by far more than
    # rounding, at p = 0.5)
    path = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = bench.main(_args("--shape", "tiny", "--vs", "peft", "--gradient-checkpointing", "off", "--warmup", "0",
                              "--steps", "2", "--lora-dropout", "0.5", "--json", str(path)))
    report = json.loads(path.read_text())
    assert rc == 0 and report["setup"]["dropout"] == 0.5
    for plain, dropped in zip(tiny_run[2]["results"], report["results"], strict=True):
        assert dropped["losses"][0] == pytest.approx(plain["losses"][0], abs=1e-5), dropped["side"]
        assert abs(dropped["losses"][1] - plain["losses"][1]) > 1e-4, dropped["side"]


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


# ------------------------------------------------------------------------------------ activation offload


def test_bench_offload_row_trains_to_bitwise_the_same_losses_as_checkpointing(tmp_path):
    # ours with checkpointing, then with its layer inputs offloaded: the copies are exact
    path = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = bench.main(_args("--shape", "tiny", "--gradient-checkpointing", "on", "--activation-offload", "both",
                              "--warmup", "0", "--steps", "2", "--json", str(path)))
    rows = json.loads(path.read_text())["results"]
    assert rc == 0
    assert [(r["side"], r["checkpointing"]) for r in rows] == [("ours", "on"), ("ours", "offload")]
    assert rows[0]["losses"] == rows[1]["losses"]


def test_activation_offload_without_checkpointing_is_refused(capsys):
    rc = bench.main(_args("--shape", "tiny", "--gradient-checkpointing", "off", "--activation-offload", "on"))
    assert rc == 2
    assert "--activation-offload offloads checkpointed layer inputs" in capsys.readouterr().err


def test_fp8_base_is_recorded_and_switched_off_after_the_run(tmp_path):
    from lora_dist import kernels

    out = tmp_path / "r.json"
    assert bench.main(_args("--shape", "tiny", "--steps", "1", "--warmup", "0", "--fp8-base", "--json", str(out))) == 0
    assert json.loads(out.read_text())["fp8_base"] is True
    assert not kernels._FP8_BASE


def test_fp8_forward_only_is_recorded_and_needs_fp8_base(tmp_path, capsys):
    from lora_dist import kernels

    out = tmp_path / "r.json"
    args = ("--shape", "tiny", "--steps", "1", "--warmup", "0", "--fp8-base", "--fp8-forward-only", "--json", str(out))
    assert bench.main(_args(*args)) == 0
    report = json.loads(out.read_text())
    assert report["fp8_base"] is True and report["fp8_backward"] is False
    assert not kernels._FP8_BASE and kernels._FP8_GRAD  # both switches as they were
    assert bench.main(_args("--shape", "tiny", "--fp8-forward-only")) == 2
    assert "--fp8-forward-only narrows --fp8-base: add --fp8-base" in capsys.readouterr().err


def test_fp8_backward_only_is_recorded_and_excludes_forward_only(tmp_path, capsys):
    from lora_dist import kernels

    out = tmp_path / "r.json"
    args = ("--shape", "tiny", "--steps", "1", "--warmup", "0", "--fp8-base", "--fp8-backward-only", "--json", str(out))
    assert bench.main(_args(*args)) == 0
    report = json.loads(out.read_text())
    assert (report["fp8_base"], report["fp8_backward"], report["fp8_forward"]) == (True, True, False)
    assert kernels.fp8_switches() == (False, True, True)  # as they were
    assert bench.main(_args("--shape", "tiny", "--fp8-base", "--fp8-forward-only", "--fp8-backward-only")) == 2
    assert "--fp8-forward-only and --fp8-backward-only exclude each other: keep one" in capsys.readouterr().err


def test_fp8_base_on_the_plain_path_is_refused(capsys):
    rc = bench.main(_args("--shape", "tiny", "--fp8-base", "--plain"))
    assert rc == 2
    assert "--fp8-base runs in our fused kernels: drop --plain" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Unsloth side

PEER = '''
import json, sys, time
spec_path, result_path = sys.argv[1:]
spec = json.load(open(spec_path))
mode = spec["mode"]
if mode == "ok":
    row = {"side": "unsloth", "tokens_per_s": 123.0, "losses": [2.0, 1.5], "seen_steps": spec["steps"]}
    open(result_path, "w").write(json.dumps(row))
    sys.exit(0)
elif mode == "exit-code":
    open(result_path, "w").write(json.dumps({"tokens_per_s": 1.0}))
elif mode == "error":
    open(result_path, "w").write(json.dumps({"error": "boom", "failed_stage": "train"}))
    sys.exit(1)
elif mode == "garbage":
    open(result_path, "w").write("{not json")
elif mode == "sleep":
    time.sleep(30)
sys.exit(3)
'''


@pytest.fixture
def peer(tmp_path):
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    return lambda mode, timeout=60.0: bench.run_peer_process(
        [sys.executable, str(script)], {"side": "unsloth", "checkpointing": True, "mode": mode, "steps": 7}, timeout)


def test_peer_process_row_comes_back_with_the_spec_it_was_given(peer):
    row = peer("ok")
    assert row["tokens_per_s"] == 123.0 and row["losses"] == [2.0, 1.5] and row["seen_steps"] == 7
    assert row["side"] == "unsloth" and row["gradient_checkpointing"] is True and "error" not in row


@pytest.mark.parametrize("mode, message", [
    ("error", "boom"),
    ("garbage", "unreadable result"),
    ("nothing", "exited with code 3 without writing a result"),
    ("exit-code", "exited with code 3"),
])
def test_peer_process_failures_become_error_rows(peer, mode, message):
    row = peer(mode)
    assert message in row["error"] and row["side"] == "unsloth" and row["checkpointing"] == "offload"


def test_peer_process_past_its_timeout_is_stopped(peer):
    row = peer("sleep", timeout=1.0)
    assert "ran past --peer-timeout 1 s" in row["error"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be read


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc (Linux)")
def test_peer_process_ends_when_the_bench_is_killed(tmp_path):
    # `timeout 300 lora-dist bench --vs unsloth` at its limit: the bench dies, its Unsloth process must not go on
    # holding the GPU under the next command (SIGKILL: no handler of the bench's can run)
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    code = ("import sys; from lora_dist import bench; "
            f"bench.run_peer_process([sys.executable, {str(script)!r}], {{'mode': 'sleep'}}, 60)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while not (children := supervise.descendants(parent.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert children, "the peer process never started"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


def test_unsloth_side_without_gpu_comes_back_as_an_error_row(tmp_path):
    # the real Unsloth process, given the real spec, on this CPU-only machine: it stops before
    # importing unsloth and says why, and the bench gets that as the row's error
    args = _args("--shape", "tiny", "--device", "cpu", "--unsloth-site", str(tmp_path), "--peer-timeout", "300")
    setup = bench._setup_from_args(args)
    row = bench.run_unsloth(setup, True, args, tmp_path / "model")
    assert row["side"] == "unsloth" and row["checkpointing"] == "offload"
    assert row["failed_stage"] == "import" and "no CUDA device" in row["error"]


def test_unsloth_process_module_imports_no_library_unsloth_must_precede():
    code = ("import sys, lora_dist.bench_unsloth; "
            "print(sorted(m for m in ('transformers', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_vs_unsloth_without_gpu_or_unsloth_is_refused_one_line_each(capsys):
    assert importlib.util.find_spec("unsloth") is None  # this machine: no GPU, no unsloth
    rc = bench.main(_args("--shape", "tiny", "--vs", "unsloth", "--device", "cpu", "--quant", "fp4"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 3 and all(line.startswith("lora-dist bench: --vs unsloth") for line in err)
    assert "needs a CUDA GPU" in err[0]
    assert "unsloth is not importable in this Python" in err[1]
    assert "NF4 + double quant" in err[2]


def test_unsloth_site_is_searched_without_importing_unsloth(tmp_path):
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    assert bench.unsloth_importable(str(tmp_path))
    assert not bench.unsloth_importable(str(tmp_path / "empty"))
    assert "unsloth" not in sys.modules


def test_saved_dense_model_is_our_base_before_quantization_and_is_reused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_dist import shapes

    setup = bench._setup_from_args(_args("--shape", "tiny", "--device", "cpu"))
    folder = tmp_path / "model"
    assert bench.save_dense_model(setup, folder)
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ours = shapes.build_random_model("tiny", bits=None, compute_dtype=torch.bfloat16, seed=setup.seed)
    theirs = loaded.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    assert loaded.config.pad_token_id is None  # no padding_idx: Unsloth has no pad row to zero
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 512 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (509, 510, 511)
    assert not bench.save_dense_model(setup, folder)  # same spec: reused
    other = bench.Setup(**{**setup.__dict__, "seed": 1})
    assert bench.save_dense_model(other, folder)  # another model: written again


def test_llama3_tokenizer_has_every_id_and_llama3_special_ids():
    tok = bench.build_tokenizer(128256)
    assert len(tok) == 128256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128001, 128004)


def _row(side, ckpt, tok_s, gib, losses=(2.0, 1.0)):
    return {"side": side, "gradient_checkpointing": ckpt != "off", "checkpointing": ckpt, "tokens_per_s": tok_s,
            "step_s": 1.0, "host_issue_s": 0.5, "peak_allocated_gib": gib, "peak_reserved_gib": gib, "mfu": 0.5,
            "hfu": 0.5, "losses": list(losses)}


def test_ratios_put_each_of_ours_beside_the_peer_rows_with_the_same_checkpointing():
    results = [_row("ours", "on", 120.0, 9.0), _row("ours", "offload", 110.0, 7.0), _row("ours", "off", 160.0, 40.0),
               _row("unsloth", "offload", 100.0, 8.0), {"side": "unsloth", "gradient_checkpointing": False,
                                                         "checkpointing": "off", "error": "out of GPU memory"}]
    ratios = bench._ratios(results)
    assert [(r["ours_checkpointing"], r["vs"], r["vs_checkpointing"]) for r in ratios] == [
        ("on", "unsloth", "offload"), ("offload", "unsloth", "offload")]
    assert ratios[1]["speedup"] == pytest.approx(1.1) and ratios[1]["memory_ratio"] == pytest.approx(7 / 8)
    text = bench.format_report({"setup": {}, "results": results, "ratios": ratios})
    assert "unsloth     off      FAILED: out of GPU memory" in text
    assert "ours (ckpt offload) vs unsloth (ckpt offload): speed x1.10, memory x0.88" in text


def test_busy_time_is_the_union_of_overlapping_device_intervals():
    # a copy on a side stream (5-12) overlapping kernels (0-10, 11-20), and a gap (20-30)
    assert bench.busy_time([(0, 10), (5, 12), (11, 20), (30, 35)]) == 25
    assert bench.busy_time([]) == 0


def test_rows_past_the_time_budget_are_listed_as_not_run(tmp_path):
    path = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = bench.main(_args("--shape", "tiny", "--gradient-checkpointing", "both", "--warmup", "0", "--steps", "1",
                              "--time-budget", "0", "--json", str(path)))
    rows = json.loads(path.read_text())["results"]
    assert rc == 1
    assert [(r["checkpointing"], r["error"]) for r in rows] == [("on", "not run: --time-budget 0 s spent"),
                                                               ("off", "not run: --time-budget 0 s spent")]


def test_offload_attention_is_on_by_default_with_activation_offload_and_needs_it(tmp_path, capsys):
    # as the job's model.offload_attention: on unless turned off; exact either way (the saved tensors are
    # the ones a recompute would make), so both rows train to the same losses bit for bit
    reports = {}
    for flag in ((), ("--offload-attention", "off")):
        out = tmp_path / f"r{len(flag)}.json"
        args = ("--shape", "tiny", "--steps", "2", "--warmup", "0", "--gradient-checkpointing", "on",
                "--activation-offload", "on", *flag, "--json", str(out))
        assert bench.main(_args(*args)) == 0
        reports[flag] = json.loads(out.read_text())
    on, off = reports[()], reports[("--offload-attention", "off")]
    assert on["offload_attention"] is True and off["offload_attention"] is False
    assert on["results"][0]["checkpointing"] == "offload"
    assert on["results"][0]["losses"] == off["results"][0]["losses"]
    assert bench.main(_args("--shape", "tiny", "--offload-attention", "on")) == 2
    assert "--offload-attention changes what --activation-offload keeps on the host" in capsys.readouterr().err


