"""The errors a user fixes: one line naming the problem and the fix, exit code 2 from the CLI.

Every module raises a subclass of `UserError` for bad input (configs, data, adapters, checkpoints,
launch arguments); the CLI turns any of them into one line on stderr and exit status 2. Anything
else is a bug and keeps its traceback. Imports nothing heavy: the CLI and the launcher import it
before torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2  # bad config, data or arguments: the user can fix it


class UserError(ValueError):
    """Bad input the user can fix; the message names what and how, on one line."""


class ConfigError(UserError):
    """An invalid configuration; the message lists every problem on one line."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f"{source}: " if source else ""
        count = f"{len(self.problems)} problems: " if len(self.problems) > 1 else ""
        super().__init__(f"{where}{count}{'; '.join(self.problems)}")


class DataError(UserError):
    """Bad data: a missing file, an empty dataset or a malformed row (the message names it)."""


class AdapterError(UserError):
    """A missing, damaged or mismatched adapter folder."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed from: missing, damaged, foreign or unsafe."""


def read_text(path: str | Path, what: str, error: type[UserError] = UserError) -> str:
    """The UTF-8 text of `path`, or `error` naming the file and the fix.

    Args:
        path: the file to read.
        what: what the file is, for the message ("config", "adapter_config.json").
        error: the UserError subclass to raise.
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist: check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file: name the file itself") from None
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not UTF-8 text (byte {err.start}): re-save it as UTF-8") from None
    except OSError as err:
        raise error(f"{what} {path} cannot be read ({err.strerror}): check its permissions") from None


def print_error(program: str, message: str) -> None:
    """`program: error: message` on stderr, on one line (the message's whitespace, newlines too, folded)."""
    print(f"{program}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line and exit 2, and no abbreviated options.

    The line names the program, the subcommand, the problem and where the usage is
    (`lora-dist: error: bench: argument --steps: invalid int value: 'x' (usage: lora-dist bench --help)`).
    Abbreviations are off: `--num-gpu 2` is a typo to report, not `--num-gpus 2` to run. Subcommands'
    parsers are of this class too (argparse builds them with the parent's class).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        namespace, extras = self.parse_known_args(argv, namespace)
        if extras:  # named by the subcommand they were given to, whose --help lists what it takes
            chosen = self._chosen(namespace)
            command = chosen.prog.rsplit(" ", 1)[-1]
            before = argv[: argv.index(command)] if chosen is not self and command in argv else []
            if any(extra in before for extra in extras):  # typed before the subcommand: the program's own
                chosen = self
            chosen.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _chosen(self, namespace: argparse.Namespace) -> argparse.ArgumentParser:
        """The innermost subcommand's parser that `namespace` chose (this one where none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None))
                if isinstance(chosen, OneLineParser):
                    return chosen._chosen(namespace)
        return self

    def error(self, message: str) -> None:  # type: ignore[override]
        program, _, command = self.prog.partition(" ")
        where = f"{command}: " if command else ""
        print_error(program, f"{where}{message} (usage: {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)
