"""The `featx` command line: thin typer commands over the library."""

from featx.cli.main import app

__all__ = ["app"]
