"""The `featx` typer app: one-line errors, exit codes, and the stop on SIGTERM.

Exit codes: 0 done; 2 bad input (usage, data, weights, store mismatch, store locked);
3 done, but some image files could not be read and were skipped; 130 interrupted (resumable).
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from featx.cli.helptext import polish
from featx.errors import EXIT_SKIPPED, EXIT_USAGE, FeatxError

__all__ = [
    "app",
    "command_line",
    "echo_err",
    "fail",
    "main",
    "printable",
    "report_skipped",
    "reported",
]


def printable(text: str, keep: str = "") -> str:
    """`text` with control and format characters (newlines, terminal escapes) written as
    Python escapes, so a file name or class name cannot split a line or drive the terminal;
    characters in `keep` (e.g. newlines of a multi-line table) stay."""
    out = []
    for char in text:
        category = unicodedata.category(char)
        if char not in keep and (category[0] == "C" or category in ("Zl", "Zp")):
            out.append(repr(char)[1:-1])
        else:
            out.append(char)
    return "".join(out)


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print `featx: message` as one line on stderr; returns the Exit to raise."""
    typer.echo(f"featx: {printable(message)}", err=True)
    return typer.Exit(code)


def echo_err(text: str) -> None:
    typer.echo(printable(text, keep="\n\t"), err=True)


class FeatxGroup(TyperGroup):
    """Parser errors (unknown option, missing argument, bad number) as one `featx:` line
    with exit 2, instead of a box; help polished (`featx.cli.helptext.polish`)."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else polish(command)

    def main(
        self, args: Sequence[str] | None = None, *pos: Any, standalone_mode: bool = True, **kw: Any
    ) -> Any:
        polish(self)
        if not pos:
            kw.setdefault("prog_name", "featx")
        try:
            result = super().main(args, *pos, standalone_mode=False, **kw)
        except typer.TyperException as error:  # the parser's errors
            if not standalone_mode:
                raise
            if type(error).__name__ == "NoArgsIsHelpError":  # the help is already printed
                sys.exit(EXIT_USAGE)
            message = error.format_message() if hasattr(error, "format_message") else str(error)
            message = message.replace("Value error, ", "").rstrip(".") + "."
            ctx = getattr(error, "ctx", None)
            if ctx is not None:
                command = " ".join(["featx", *ctx.command_path.split()[1:]])
                message += f" See `{command} --help`."
            sys.exit(fail(message, getattr(error, "exit_code", EXIT_USAGE)).exit_code)
        except typer.Abort:
            if not standalone_mode:
                raise
            sys.exit(fail("interrupted.", 130).exit_code)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=FeatxGroup,
    help="Extract frozen-backbone features once into HDF5 stores; train classifiers on them.\n\n"
    "Example: featx extract data/flowers --backbone vgg16 --layer block4_pool, then\n\n"
    "featx fit --store stores/flowers-vgg16-default-std.h5 --layer block4_pool --clf logreg\n\n"
    "Exit codes: 0 ok, 2 bad input, 3 finished with skipped image files, 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(value: bool) -> None:
    if value:
        from featx import __version__

        typer.echo(f"featx {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Extract frozen-backbone features once into HDF5 stores; train classifiers on them."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # a batch scheduler's stop: the same clean, resumable stop as Ctrl-C


@contextlib.contextmanager
def reported():
    """Turn library errors into one line on stderr and their exit code; SIGTERM stops the
    command like Ctrl-C (exit 130)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        yield
    except FeatxError as error:
        raise fail(str(error), error.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted.", 130) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def command_line() -> str:
    """The command as typed, for the provenance records."""
    return "featx " + shlex.join(sys.argv[1:])


def report_skipped(skipped: list[tuple[Any, str]], limit: int | None = 20) -> None:
    """List the unreadable files on stderr and exit 3."""
    if not skipped:
        return
    echo_err(f"{len(skipped)} file(s) could not be read and were skipped:")
    for path, reason in skipped[:limit]:
        echo_err(f"  {printable(str(path))}: {printable(str(reason))}")
    if limit is not None and len(skipped) > limit:
        echo_err(f"  ... and {len(skipped) - limit} more (see `featx info`)")
    raise typer.Exit(EXIT_SKIPPED)
