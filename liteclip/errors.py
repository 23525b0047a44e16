"""liteclip's error types: one base class, so a script or the CLI catches every problem a user can fix with one
`except LiteclipError`, and each message says what is wrong (file, line, key or value) and what to do.

This module imports nothing, so the CLI can catch these before torch is ever loaded. Each error also derives from
the built-in type it used to be (ValueError, RuntimeError, PermissionError), so existing `except` clauses keep
working.
"""

from __future__ import annotations


class LiteclipError(Exception):
    """A problem the user can fix; the message says where and what to do."""


class ConfigError(LiteclipError, ValueError):
    """A config file, override or config value that cannot be used (a wrong key, type, range or model name)."""


class DataError(LiteclipError, ValueError):
    """A dataset that cannot be read as configured; the message names the file, line and reason."""


class InputError(LiteclipError, ValueError):
    """An argument to the inference API that cannot be used as given: labels, templates, an image array, an index."""


class ModelLoadError(LiteclipError, RuntimeError):
    """A model directory or checkpoint that cannot be loaded; the message says why and what to do."""


class OutputDirectoryError(LiteclipError, PermissionError):
    """A run or model directory that cannot take checkpoints, found before any training starts."""


class RunInUseError(LiteclipError, RuntimeError):
    """Another training process holds the run directory."""


class DiskSpaceError(LiteclipError, OSError):
    """Not enough free space where checkpoints or models go; the message names the path and the sizes."""


class NonFiniteLossError(LiteclipError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class NonFiniteError(LiteclipError, ValueError):
    """Weights, embeddings or scores that hold NaN or infinity: a diverged model, never scored or saved as good."""
