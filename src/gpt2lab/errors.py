"""Errors a user can fix. The CLI prints their message without a traceback and exits non-zero."""


class GPT2LabError(Exception):
    """Base class for every error caused by input (a path, a config value, a prompt)."""


class ConfigError(GPT2LabError, ValueError):
    """A configuration value or combination that cannot work."""


class CheckpointError(GPT2LabError):
    """A checkpoint that is missing, corrupt, unsafe or does not match the model."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
