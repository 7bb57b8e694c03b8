"""Metric reporting: console progress, metrics.jsonl and Weights & Biases, all on rank 0 only.

The training loop calls `Tracker` methods on every rank; the rank check lives here, so call sites stay
plain (STYLE rule 8). On a terminal the progress is a tqdm bar (step, loss, tokens/s, ETA); in a log
file it is one plain line every `train.log_interval` steps. wandb is imported only when reporting is
on (`wandb.mode` not "disabled"), and it runs offline when no WANDB_API_KEY is set (`wandb sync
<run folder>` uploads one later). A resumed run continues its W&B run (same id, `resume="allow"`) and
its metrics.jsonl (records past the resumed step, written after the checkpoint, are dropped first).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from lora_dist.config import Config, dump_config
from lora_dist.files import atomic_write_text


class Tracker:
    """Reports one run. On ranks other than 0 every method does nothing.

    Args:
        config: the resolved run configuration (recorded in full on W&B and in `<output_dir>/config.yaml`,
            `<job>-config.yaml` for other jobs).
        rank: this process's rank.
        total_steps: optimizer steps the run will take (for the progress line).
        job: "train" or "eval": the W&B job type, and the local record `<output_dir>/<job>-metrics.jsonl`
            ("metrics.jsonl" for training).
        stream: where console progress goes (stdout by default).
        cluster: `world_size`, `num_nodes` and `hostnames` (`distributed.cluster_info()`), recorded under
            `cluster` in the W&B config and as the first line of the metrics record.
        resume_step: the step of the checkpoint this run resumes (None: a fresh run). The metrics record
            is kept up to that step and appended to; records of later steps (a crash after the checkpoint)
            are dropped, since the resumed run logs those steps again.
        wandb_run_id: the W&B run to continue (saved in the resumed checkpoint), or None for a new one.
    """

    def __init__(
        self,
        config: Config,
        *,
        rank: int,
        total_steps: int,
        job: str = "train",
        stream: TextIO | None = None,
        cluster: dict[str, Any] | None = None,
        resume_step: int | None = None,
        wandb_run_id: str | None = None,
    ):
        self.active = rank == 0
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.log_interval = config.train.log_interval
        self.output_dir = config.output_dir
        self.wandb_mode = config.wandb.resolved_mode()
        self.run = None
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self._start = time.perf_counter()
        self._interactive = self.stream.isatty()
        self._metrics_file: TextIO | None = None
        self._metrics_mode = "w" if resume_step is None else "a"  # a new run starts the file afresh
        self.metrics_path = config.folder.metrics(job)
        self.config_path = config.folder.config(job)
        self.cluster = cluster
        self._bar: Any = None  # the tqdm bar on a terminal
        self._first_step = resume_step or 0
        self._shown_step = self._first_step  # the last step the progress showed
        if not self.active:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, dump_config(config))
        if resume_step is not None:
            _truncate_metrics(self.metrics_path, resume_step)
        if self.wandb_mode != "disabled":
            self.run = _start_wandb(config, self.wandb_mode, job, cluster, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id (keep it in checkpoints, so a resume continues the run), or None."""
        return None if self.run is None else self.run.id

    # -------------------------------------------------------------------------------- per step
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Record one optimizer step's metrics (`loss`, `lr`, `grad_norm`, `tokens_per_s`, ...)."""
        if not self.active:
            return
        self.history.append({"step": step, **metrics})
        self._write({"kind": "train", "step": step, **metrics})
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if step % self.log_interval == 0 or step == self.total_steps:
            self._progress(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record an evaluation (`loss`, `perplexity`, ...) taken after `step` optimizer steps."""
        if not self.active:
            return
        self.evals.append({"step": step, **metrics})
        self._write({"kind": "eval", "step": step, **metrics})
        if self.run is not None:
            self.run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        self._clear_progress()
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        print(f"eval @ step {step}: {shown}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line on the console (rank 0)."""
        if self.active:
            self._clear_progress()
            print(text, file=self.stream, flush=True)

    def log_data(self, stats: Any) -> None:
        """Report what the data pipeline kept and dropped (a `data.DataStats`): console, record, W&B summary."""
        if not self.active:
            return
        self._write({"kind": "data", **stats.as_dict(prefix="")})
        if self.run is not None:
            for key, value in stats.as_dict().items():
                self.run.summary[key] = value
        self.message(stats.summary())

    # -------------------------------------------------------------------------------- the end
    def log_adapter(self, path: Path, name: str = "adapter") -> None:
        """Attach the saved adapter folder to the W&B run as a model artifact."""
        if not self.active or self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=_artifact_name(self.run, name), type="model")
        artifact.add_dir(str(path))
        self.run.log_artifact(artifact)

    def finish(self, summary: dict[str, Any]) -> None:
        """Print the final summary table, record it on W&B, and close the run."""
        if not self.active:
            return
        self._clear_progress()
        if self.run is not None:
            import wandb

            for key, value in summary.items():
                self.run.summary[key] = value
            self.run.finish()
            # wandb 0.31 returns from finish() before its service has written the run file;
            # teardown waits for it, so the file is complete when we say where it is.
            wandb.teardown()
        self._write({"kind": "summary", **{k: v for k, v in summary.items() if _plain(v)}})
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        print(format_summary(summary), file=self.stream, flush=True)

    def wandb_run_dir(self) -> Path | None:
        """The local folder of the W&B run (offline runs: `wandb/offline-run-*`), if there is one."""
        return None if self.run is None else Path(self.run.dir).parent

    # -------------------------------------------------------------------------------- internals
    def _write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        if self._metrics_file is None:
            self._metrics_file = open(self.metrics_path, self._metrics_mode, buffering=1)  # line-buffered
            if self.cluster is not None:  # first line of every launch's record: where it ran
                self._metrics_file.write(json.dumps({"kind": "cluster", **self.cluster}) + "\n")
        self._metrics_file.write(json.dumps(record) + "\n")

    def _progress(self, step: int, metrics: dict[str, float]) -> None:
        shown = {"loss": _fmt(metrics.get("loss")), "lr": f"{metrics.get('lr', 0.0):.2e}",
                 "tok/s": f"{metrics.get('tokens_per_s', 0.0):,.0f}"}
        if self._interactive:  # a tqdm bar on a terminal, redrawn in place
            if self._bar is None:
                from tqdm import tqdm

                # Its rate and ETA count from here: a resumed run's earlier steps are not timed again.
                self._bar = tqdm(total=self.total_steps, initial=self._shown_step, unit="step", file=self.stream,
                                 dynamic_ncols=True, leave=False)
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
            self._bar.refresh()  # called every log_interval steps only: draw each time
            self._shown_step = step
            return
        # Plain lines in a log file: the ETA from this launch's pace.
        done = step - self._first_step
        elapsed = time.perf_counter() - self._start
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        line = "  ".join([f"step {step}/{self.total_steps}", *(f"{k} {v}" for k, v in shown.items()),
                          f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"])
        print(line, file=self.stream, flush=True)

    def _clear_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()  # the next log_step opens a fresh bar below the printed line
            self._bar = None


def _truncate_metrics(path: Path, step: int) -> None:
    """Cut the record at its first train/eval line past `step` (those steps are about to be logged again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the crash
            break
        if record.get("kind") in ("train", "eval") and record.get("step", 0) > step:
            break
        kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _start_wandb(
    config: Config, mode: str, job: str, cluster: dict[str, Any] | None = None, run_id: str | None = None
):
    import wandb  # only here: a run with reporting off never loads it

    cfg = config.wandb
    settings = wandb.Settings(
        console="off",  # our own progress lines are the console record
        quiet=True,
        x_save_requirements=False,
    )
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name,
        tags=cfg.tags or None,
        job_type=job,
        config={**config.to_dict(), **({"cluster": cluster} if cluster is not None else {})},
        dir=str(config.output_dir),
        mode=mode,
        settings=settings,
        # resume="allow": continue the run with this id, or start it when W&B has never seen it (offline)
        **({"id": run_id, "resume": "allow"} if run_id else {}),
    )


def _artifact_name(run: Any, name: str) -> str:
    # Artifact names are per project; the run id keeps two runs' adapters apart.
    return f"{name}-{run.id}"


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_summary(summary: dict[str, Any]) -> str:
    """A two-column table of the run's final numbers and where its outputs went."""
    rows = [(str(k), _fmt(v)) for k, v in summary.items()]
    width = max((len(k) for k, _ in rows), default=0)
    rule = "-" * (width + 2 + max((len(v) for _, v in rows), default=0))
    lines = ["", "run summary", rule]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)


def read_metrics(output_dir: str | Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The records of `<output_dir>/metrics.jsonl` (cluster, data, train, eval and summary lines)."""
    path = Path(output_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["Tracker", "format_summary", "read_metrics"]
