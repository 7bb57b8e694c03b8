"""The errors a user fixes: one line naming the problem and the fix, exit code 2 from the CLI.

Every module raises a subclass of `UserError` for bad input (configs, data, adapters, checkpoints,
launch arguments); the CLI turns any of them into one line on stderr and exit status 2. Anything
else is a bug and keeps its traceback. Imports nothing heavy: the CLI and the launcher import it
before torch.
"""

from __future__ import annotations

from pathlib import Path


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
