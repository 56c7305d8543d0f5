"""Image URLs in manifests (`https://`, and `s3://`, `gs://`, `az://` when their fsspec
filesystems are installed), read through fsspec with a timeout and bounded retries.

A row whose URL cannot be read is skipped at decoding with a one-line reason, as an
unreadable image file is. A URL row is identified by its URL alone: nothing is fetched to
open the dataset. `FEATX_URL_TIMEOUT` sets the seconds one attempt may take (default 30).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from featx.data.folders import ImageFolder
from featx.data.sources.location import PackedRoot, UnreadableRow
from featx.errors import UsageError

__all__ = ["ATTEMPTS", "UrlReader", "is_url", "with_urls"]

ATTEMPTS = 3  # per URL: a timeout, a dropped connection or a server error is tried again


def is_url(path: str) -> bool:
    return "://" in path


def _timeout() -> float:
    text = os.environ.get("FEATX_URL_TIMEOUT", "30")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise UsageError(f"FEATX_URL_TIMEOUT={text} is not a number of seconds.")
    return value


def _options(protocol: str, timeout: float) -> dict:
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
    return {}


def _reason(error: BaseException) -> tuple[str, bool]:
    """(one-line reason, whether trying again may help)."""
    status = getattr(error, "status", None)
    if isinstance(error, FileNotFoundError):
        return "not found (HTTP 404 or no such object)", False
    if isinstance(error, PermissionError):
        return "access denied", False
    if isinstance(status, int):
        return f"HTTP {status} {getattr(error, 'message', '')}".strip(), status >= 500
    if isinstance(error, TimeoutError):
        return "timed out", True
    if getattr(error, "host", None) and isinstance(error, OSError):  # aiohttp's connect errors
        return f"cannot connect to {error.host}:{getattr(error, 'port', '')}", True
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200], isinstance(error, OSError)


@dataclass
class UrlReader:
    """Reads whole objects by URL, each protocol through its fsspec filesystem."""

    timeout: float = 30.0
    _filesystems: dict = field(default_factory=dict, repr=False, compare=False)
    _pid: int = field(default=0, repr=False, compare=False)

    def _filesystem(self, protocol: str):
        if self._pid != os.getpid():  # a forked decoding process makes its own sessions
            self._filesystems, self._pid = {}, os.getpid()
        if protocol not in self._filesystems:
            import fsspec

            options = _options(protocol, self.timeout)
            self._filesystems[protocol] = fsspec.filesystem(
                protocol, skip_instance_cache=True, **options
            )
        return self._filesystems[protocol]

    def read(self, name: str) -> bytes:
        fs = self._filesystem(name.split("://", 1)[0].lower())
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fs.cat_file(name)
            except Exception as error:  # noqa: BLE001 - each filesystem raises its own kinds
                reason, again = _reason(error)
                if not again or attempt == ATTEMPTS:
                    tries = f" ({attempt} attempts)" if attempt > 1 else ""
                    raise UnreadableRow(f"{reason}{tries}") from None
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def __getstate__(self) -> dict:
        return {"timeout": self.timeout}

    def __setstate__(self, state: dict) -> None:
        self.timeout, self._filesystems, self._pid = state["timeout"], {}, 0

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


def _check_protocols(protocols: set[str], manifest: Path) -> None:
    """Refuse, in one sentence, URLs whose filesystem is not installed."""
    import fsspec

    for protocol in sorted(protocols):
        try:
            cls = fsspec.get_filesystem_class(protocol)
            if protocol in ("http", "https"):
                import aiohttp  # noqa: F401 - fsspec's http filesystem needs it
        except (ImportError, ValueError) as error:
            hint = str(error).splitlines()[0] if str(error) else "not installed"
            if protocol in ("http", "https"):
                hint = "install fsspec's http support: pip install 'fsspec[http]'"
            raise UsageError(
                f"manifest {manifest} has {protocol}:// URLs, which cannot be read here ({hint})."
            ) from None
        del cls


def with_urls(folder: ImageFolder, manifest: str | os.PathLike) -> ImageFolder:
    """A manifest's dataset whose URL rows are read through fsspec (unchanged without)."""
    protocols = {f.path.split("://", 1)[0].lower() for f in folder.files if is_url(f.path)}
    if not protocols:
        return folder
    manifest = Path(manifest)
    _check_protocols(protocols, manifest)
    root = PackedRoot(str(manifest.resolve()), UrlReader(_timeout()), local_root=folder.root)
    return dataclasses.replace(folder, root=root)
