"""Errors that featx reports to its users as one sentence and an exit code."""

from __future__ import annotations

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


class WeightsUnavailable(FeatxError):
    """Pretrained weights are neither cached nor downloadable."""


class StoreLocked(FeatxError):
    """Another featx process is writing the same store."""
