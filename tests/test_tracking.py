"""Reporting: W&B offline runs read back from their files, rank gating, wandb only imported when on."""

import os
import subprocess
import sys

from lora_dist.config import BUILTIN_DATASET, load_config
from lora_dist.tracking import Tracker, format_summary, read_metrics
from wandb_reader import read_wandb_artifacts, read_wandb_config, read_wandb_history


def _config(tmp_path, *overrides):
    return load_config(None, ["model.path=m", f"data.path={BUILTIN_DATASET}",
                              f"train.output_dir={tmp_path}", *overrides])


def test_offline_history_reads_back_every_step_across_32k_blocks(tmp_path, capsys):
    # 400 steps x 6 metrics write well over one 32 KiB block, so records split across blocks are read too.
    tracker = Tracker(_config(tmp_path, "wandb.mode=offline"), rank=0, total_steps=400)
    logged = []
    for step in range(1, 401):
        metrics = {"loss": 10.0 / step, "lr": 1e-3, "grad_norm": 0.5 + step, "tokens_per_s": 1000.0 + step,
                   "tokens_seen": 64.0 * step, "step_time_s": 0.01}
        logged.append(metrics["loss"])
        tracker.log_step(step, metrics)
    tracker.log_eval(400, {"loss": 1.5, "perplexity": 4.48})
    run_dir = tracker.wandb_run_dir()
    tracker.finish({"steps": 400})
    run_file = next(run_dir.glob("run-*.wandb"))
    assert run_file.stat().st_size > 32 * 1024
    rows = read_wandb_history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in train] == list(range(1, 401))
    # JSON round trip of a float64 is exact.
    assert [r["train/loss"] for r in train] == logged
    assert [r["eval/loss"] for r in rows if "eval/loss" in r] == [1.5]


def test_adapter_artifact_is_recorded_in_the_offline_run(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    tracker = Tracker(_config(tmp_path, "wandb.mode=offline"), rank=0, total_steps=1)
    tracker.log_adapter(adapter)
    run_dir = tracker.wandb_run_dir()
    tracker.finish({})
    (artifact,) = read_wandb_artifacts(run_dir)
    assert artifact["type"] == "model" and artifact["files"] == ["adapter_config.json"]


def test_ranks_other_than_zero_write_and_print_nothing(tmp_path, capsys):
    tracker = Tracker(_config(tmp_path / "out", "wandb.mode=offline"), rank=1, total_steps=2)
    tracker.log_step(1, {"loss": 1.0, "lr": 1e-3})
    tracker.log_eval(1, {"loss": 1.0, "perplexity": 2.7})
    tracker.finish({"steps": 1})
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "out").exists()


def test_metrics_file_holds_train_eval_and_summary_records(tmp_path, capsys):
    tracker = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=0, total_steps=2)
    tracker.log_step(1, {"loss": 2.0, "lr": 1e-3})
    tracker.log_step(2, {"loss": 1.0, "lr": 1e-3})
    tracker.log_eval(2, {"loss": 1.5, "perplexity": 4.48})
    tracker.finish({"steps": 2})
    kinds = [(r["kind"], r.get("step")) for r in read_metrics(tmp_path)]
    assert kinds == [("train", 1), ("train", 2), ("eval", 2), ("summary", None)]
    assert tracker.wandb_run_dir() is None and not (tmp_path / "wandb").exists()


def test_summary_table_lists_every_entry_on_its_own_row():
    table = format_summary({"eval_loss_end": 3.25, "adapter": "runs/x/adapter"})
    assert "eval_loss_end  3.2500" in table and "adapter        runs/x/adapter" in table


def test_reporting_off_never_imports_wandb(tmp_path):
    code = f"""
import sys
from lora_dist.config import load_config
from lora_dist.tracking import Tracker
cfg = load_config(None, ["model.path=m", "data.path={BUILTIN_DATASET}", "train.output_dir={tmp_path}",
                         "wandb.mode=disabled"])
t = Tracker(cfg, rank=0, total_steps=1)
t.log_step(1, {{"loss": 1.0}})
t.finish({{}})
print("wandb" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "WANDB_API_KEY": ""})
    assert out.stdout.strip().splitlines()[-1] == "False"


CLUSTER = {"world_size": 16, "num_nodes": 2, "hostnames": ["node-a", "node-b"]}


def test_offline_run_config_records_the_cluster(tmp_path, capsys):
    tracker = Tracker(_config(tmp_path, "wandb.mode=offline"), rank=0, total_steps=1, cluster=CLUSTER)
    run_dir = tracker.wandb_run_dir()
    tracker.finish({"steps": 1})
    config = read_wandb_config(run_dir)
    assert config["cluster"] == CLUSTER
    assert config["train"]["output_dir"] == str(tmp_path)  # beside the full resolved config


def test_metrics_record_starts_with_the_cluster(tmp_path, capsys):
    tracker = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=0, total_steps=1, cluster=CLUSTER)
    tracker.log_step(1, {"loss": 1.0})
    tracker.finish({"steps": 1})
    records = read_metrics(tmp_path)
    assert records[0] == {"kind": "cluster", **CLUSTER}
    assert [r["kind"] for r in records[1:]] == ["train", "summary"]


def test_cluster_of_a_rank_other_than_0_is_not_recorded(tmp_path, capsys):
    tracker = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=1, total_steps=1, cluster=CLUSTER)
    tracker.log_step(1, {"loss": 1.0})
    tracker.finish({"steps": 1})
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resumed_tracker_drops_the_records_after_the_resumed_step_and_appends(tmp_path, capsys):
    crashed = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=0, total_steps=4)
    for step in (1, 2, 3):  # the checkpoint was at step 2; step 3 was logged, then the process died
        crashed.log_step(step, {"loss": float(step)})
    crashed.log_eval(3, {"loss": 3.5})
    crashed._metrics_file.write('{"kind": "train", "st')  # a line torn by the crash
    crashed._metrics_file.close()
    resumed = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=0, total_steps=4, resume_step=2)
    resumed.log_step(3, {"loss": 30.0})
    resumed.finish({"steps": 3})
    records = [(r["kind"], r.get("step"), r.get("loss")) for r in read_metrics(tmp_path)]
    assert records == [("train", 1, 1.0), ("train", 2, 2.0), ("train", 3, 30.0), ("summary", None, None)]


def test_tracker_continues_the_wandb_run_it_is_given(tmp_path, capsys):
    first = Tracker(_config(tmp_path, "wandb.mode=offline"), rank=0, total_steps=2)
    run_id, first_dir = first.wandb_run_id, first.wandb_run_dir()
    first.log_step(1, {"loss": 1.0})
    first.finish({})
    second = Tracker(_config(tmp_path, "wandb.mode=offline"), rank=0, total_steps=2, resume_step=1,
                     wandb_run_id=run_id)
    second.log_step(2, {"loss": 0.5})
    second_dir = second.wandb_run_dir()
    second.finish({})
    assert second.wandb_run_id == run_id and second_dir != first_dir  # one folder per launch, one run id
    # The folder is offline-run-<time>-<id>, with "-1" added when two launches start in the same second.
    assert (second_dir / f"run-{run_id}.wandb").is_file()
    assert [r["_step"] for r in read_wandb_history(second_dir) if "train/loss" in r] == [2]


def test_tracker_writes_the_resolved_config_beside_the_metrics(tmp_path, capsys):
    cfg = _config(tmp_path, "wandb.mode=disabled", "train.lr=3e-4")
    Tracker(cfg, rank=0, total_steps=1).finish({})
    assert load_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, then renamed


def test_data_report_reaches_the_console_and_the_record(tmp_path, capsys):
    from lora_dist.data import DataStats

    stats = DataStats(rows_read=120, train_samples=100, eval_samples=16, train_sequences=100,
                      train_tokens=9000, train_target_tokens=4321)
    stats.skip("missing_field", 3, first_row=17, source="train.jsonl")
    tracker = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=0, total_steps=1)
    tracker.log_data(stats)
    tracker.finish({"steps": 1})
    (record,) = [r for r in read_metrics(tmp_path) if r["kind"] == "data"]
    assert record == {"kind": "data", **stats.as_dict(prefix="")}
    assert record["rows_read"] == 120 and record["skipped/missing_field"] == 3
    assert record["skipped/missing_field/first_row"] == 17 and record["train_target_tokens"] == 4321
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data: "))
    assert line == stats.summary() and "120 rows read" in line and "3 skipped" in line


def test_progress_on_a_terminal_is_a_tqdm_bar_with_loss_and_tokens_per_s(tmp_path):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    tracker = Tracker(_config(tmp_path, "wandb.mode=disabled"), rank=0, total_steps=4, stream=screen)
    for step in (1, 2):
        tracker.log_step(step, {"loss": 2.5, "lr": 1e-4, "tokens_per_s": 12345.0})
    tracker.message("between steps")  # closes the bar, prints the line, the next step opens a new one
    tracker.log_step(3, {"loss": 2.0, "lr": 1e-4, "tokens_per_s": 23456.0})
    tracker.finish({"steps": 3})
    shown = screen.getvalue()
    assert "2/4" in shown and "3/4" in shown and "tok/s=12,345" in shown and "loss=2.5000" in shown
    assert "between steps\n" in shown
