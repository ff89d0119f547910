"""The project's own errors: one line, naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class Pix2RepError(Exception):
    """Base class of every error pix2rep raises on purpose."""


class DataError(Pix2RepError, ValueError):
    """Input data that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputExistsError(Pix2RepError):
    """An output folder already exists and neither --resume nor --overwrite was given."""


class ConfigError(Pix2RepError, ValueError):
    """A configuration that cannot be used: an unknown preset, key or value, a wrong type, a YAML
    syntax error, or a command-line value out of range. The message names where it came from."""
