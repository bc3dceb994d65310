"""The error a user's config or command line causes, in a module that imports nothing, so that any
layer (tasks, oracles, the loop) can raise it without importing the config checks."""
from __future__ import annotations


class ConfigError(ValueError):
  """A user mistake in the config or command line; main prints it without a traceback."""


def one_line(error: BaseException) -> str:
  """A library's (possibly multi-line) error message as one line."""
  return ' '.join(str(error).split())


def require(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless ok (message: the field, its value, what is allowed)."""
  if not ok:
    raise ConfigError(message)
