"""`lora-dist`: train, eval, merge, inspect, bench.

    lora-dist train configs/tiny-cpu.yaml [section.key=value ...]
    lora-dist eval  configs/tiny-cpu.yaml [section.key=value ...] [--adapter DIR]
    lora-dist merge --base BASE --adapter DIR --out DIR [--dtype bf16] [--overwrite]
    lora-dist inspect DIR

Under `deepspeed` (`deepspeed --num_gpus N --module lora_dist train ...`) the launcher adds
`--local_rank=N`; it is accepted anywhere and ignored (LOCAL_RANK in the environment says the same).

Exit status:
    0    done.
    1    training stopped on purpose (a non-finite loss or gradient under nan_policy "stop", too many
         skipped steps), or a crash (with its traceback).
    2    bad config, data, adapter, checkpoint or arguments: one line on stderr says what and how to fix it.
    75   preempted (EX_TEMPFAIL): SIGTERM, SIGINT or SIGUSR1 arrived during training; every rank finished
         its optimizer step and a complete checkpoint was written. Run the same command again with
         train.resume=auto to continue (launch/slurm.sbatch requeues itself on 75). A second Ctrl-C
         stops at once without that checkpoint (exit 130).
    130  interrupted outside training (Ctrl-C while loading), or Ctrl-C twice.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import NoReturn

from lora_dist.choices import DTYPES
from lora_dist.errors import EXIT_USAGE, OneLineParser, UserError, print_error
from lora_dist.preemption import EXIT_PREEMPTED, Preempted

EXIT_FAILED = 1  # training stopped or crashed
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `lora-dist` parser; `command` (the subcommand about to run) lets `bench` load only when used."""
    parser = OneLineParser(
        prog="lora-dist",
        description="LoRA / QLoRA fine-tuning on bitsandbytes-quantized bases, one CPU to DeepSpeed ZeRO clusters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune with a YAML config", description="Fine-tune with a YAML config.")
    _config_arguments(train)

    evaluate = sub.add_parser("eval", help="eval loss / perplexity of base + adapter", description=(
        "Eval loss and perplexity on the config's eval split, with the adapter in <train.output_dir>/adapter."
    ))
    _config_arguments(evaluate)
    evaluate.add_argument("--adapter", help="adapter folder (default: <train.output_dir>/adapter)")

    merge = sub.add_parser("merge", help="fold an adapter into its base and export a standalone model")
    merge.add_argument("--base", required=True, help="base model folder or hub id")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--dtype", default="bf16", choices=DTYPES, help="dtype of the export")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    inspect = sub.add_parser("inspect", help="describe an adapter folder")
    inspect.add_argument("path", help="adapter folder")

    bench_parser = sub.add_parser("bench", help="throughput / memory benchmark against PEFT")
    if command == "bench":  # its imports are heavy: only when it runs
        from lora_dist import bench

        bench.add_arguments(bench_parser)

    plan_parser = sub.add_parser("plan", help="predict peak GPU memory of a config (no weights, no GPU)")
    if command == "plan":
        from lora_dist import plan

        plan.add_arguments(plan_parser)

    generate_parser = sub.add_parser("generate", help="generate text with a base model and an adapter")
    if command == "generate":
        from lora_dist import generate

        generate.add_arguments(generate_parser)
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", default=(), metavar="section.key=value",
                        help="override a config value, e.g. train.lr=2e-4 lora.target_modules=[q_proj,v_proj]")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit status."""
    argv = _without_local_rank(sys.argv[1:] if argv is None else list(argv))
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as err:
        _fail(str(err))
        return EXIT_USAGE
    except FileNotFoundError as err:  # a model folder or adapter that is not there
        _fail(str(err))
        return EXIT_USAGE
    except Preempted as err:
        _fail(str(err))
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except Exception as err:
        from lora_dist.train import TrainingStopped

        if isinstance(err, TrainingStopped):
            _fail(str(err))
            return EXIT_FAILED
        raise


def entry() -> NoReturn:
    """The `lora-dist` console script and `python -m lora_dist` (what the deepspeed launcher runs)."""
    exit_with(main())


def exit_with(code: int) -> NoReturn:
    """End this process with `code`, past the interpreter's teardown where that teardown can only do harm.

    A rank of a multi-process job that finished (0) or stopped after a complete checkpoint (75) has
    written everything: the adapter, the checkpoint, metrics.jsonl (closed), W&B (finished). Python's
    teardown of DeepSpeed's engine and gloo's threads after that can still abort ("terminate called
    without an active exception": SIGABRT, status -6, seen on 2 CPU ranks under ZeRO-3), and a
    launcher or SLURM would then report the complete run as failed. Such a rank flushes its output and
    leaves through os._exit; every other exit (errors, Ctrl-C, a process outside a process group: no
    launcher) is the normal one.
    """
    if code in (0, EXIT_PREEMPTED) and _in_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _in_process_group() -> bool:
    dist = sys.modules.get("torch.distributed")  # never imported: no process group (and no torch import here)
    return dist is not None and dist.is_available() and dist.is_initialized()


def _without_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` the deepspeed launcher inserts (LOCAL_RANK in the environment says the same).

    The launcher puts it before the subcommand (`python -m lora_dist --local_rank=0 train ...`), other
    launchers after; removing it up front accepts every position.
    """
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            out.append(arg)
    return out


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("train", "eval"):
        from lora_dist import train
        from lora_dist.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            train.train(cfg)
        else:
            train.evaluate_only(cfg, args.adapter)
        return 0
    if args.command == "merge":
        from lora_dist.adapters import run_merge

        with _user_errors():
            out = run_merge(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"merged model written to {out}")
        return 0
    if args.command == "inspect":
        from lora_dist.adapters import describe_adapter

        with _user_errors():
            text = describe_adapter(args.path)
        print(text)
        return 0
    if args.command == "bench":
        from lora_dist import bench

        return int(bench.main(args) or 0)
    if args.command == "plan":
        if args.measure:
            from lora_dist import plan_measure

            return int(plan_measure.measure(args.out, quick=args.quick) or 0)
        from lora_dist import plan

        return int(plan.main(args) or 0)
    if args.command == "generate":
        from lora_dist import generate

        return int(generate.main(args) or 0)
    raise AssertionError(f"unhandled command {args.command}")


@contextlib.contextmanager
def _user_errors():
    """adapters.py reports a wrong folder or a mismatched adapter as ValueError: the user's to fix."""
    from lora_dist.errors import ConfigError

    try:
        yield
    except ValueError as err:
        raise ConfigError([str(err)]) from None


def _fail(message: str) -> None:
    # One line, no traceback: the message itself names the problem and the fix.
    print_error("lora-dist", message)


if __name__ == "__main__":
    entry()
