"""falcon-serve's OpenAI-compatible HTTP server (FastAPI); `python -m server --help` for the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("falcon-serve")
except PackageNotFoundError:  # running from a source tree that was never pip-installed
    __version__ = "unknown"
