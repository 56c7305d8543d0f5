"""Errors that featx reports to its users as one sentence and an exit code."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "first_line",
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


def first_line(error: BaseException | str, limit: int = 160) -> str:
    """The first line of an error's message (the error's type name when it has none), cut at
    `limit` characters: what featx quotes inside its one-sentence messages."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if not text:
        return type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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


def check_range(
    flag: str,
    value: float | None,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
) -> None:
    """UsageError naming `--flag` unless `minimum <= value <= maximum` (strictly, with `above`
    or `below`); None passes (the flag was not given)."""
    if value is None:
        return
    low_ok = minimum is None or (value > minimum if above else value >= minimum)
    high_ok = maximum is None or (value < maximum if below else value <= maximum)
    if low_ok and high_ok:
        return
    low = None if minimum is None else f"{'above' if above else 'at least'} {minimum:g}"
    high = None if maximum is None else f"{'below' if below else 'at most'} {maximum:g}"
    rule = " and ".join(r for r in (low, high) if r)
    if above and below:
        rule = f"between {minimum:g} and {maximum:g}"
    raise UsageError(f"--{flag} must be {rule}, not {value:g}.")


class WeightsUnavailable(FeatxError):
    """Pretrained weights are neither cached nor downloadable."""


class StoreLocked(FeatxError):
    """Another featx process is writing the same store."""


class DiskFull(FeatxError):
    """The disk (or quota) ran out while writing; what was finished before is kept."""


class Interrupted(FeatxError):
    """Ctrl-C or SIGTERM stopped the run; finished work is kept and the same command resumes."""

    exit_code = EXIT_INTERRUPTED
