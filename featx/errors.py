"""Errors that featx reports to its users as one sentence and an exit code."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "FeatxError",
    "Interrupted",
    "StoreLocked",
    "UsageError",
    "WeightsUnavailable",
    "check_choice",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3
EXIT_INTERRUPTED = 130


class FeatxError(Exception):
    """A failure the user can act on; the CLI prints the message and exits with `exit_code`."""

    exit_code = EXIT_USAGE


class UsageError(FeatxError):
    """Bad input: a wrong option, a missing file, a store that does not match."""


def check_choice(flag: str, value: object, choices: Iterable[str]) -> None:
    """UsageError naming `--flag` and its choices unless `value` is one of them."""
    choices = list(choices)
    if value not in choices:
        raise UsageError(f"--{flag} must be one of {', '.join(choices)}, not {value!r}.")


class WeightsUnavailable(FeatxError):
    """Pretrained weights are neither cached nor downloadable."""


class StoreLocked(FeatxError):
    """Another featx process is writing the same store."""


class Interrupted(FeatxError):
    """Ctrl-C or SIGTERM stopped the run; finished work is kept and the same command resumes."""

    exit_code = EXIT_INTERRUPTED
