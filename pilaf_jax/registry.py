"""The registries of named choices in a config (samplers, labelling rules, tasks): one way to fill and read them."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar('T')


def registrar(table: dict) -> Callable[[str], Callable[[T], T]]:
  """A decorator factory: @register('name') adds the decorated object to `table` under that name."""
  def register(name: str) -> Callable[[T], T]:
    def wrap(obj: T) -> T:
      table[name] = obj
      return obj
    return wrap
  return register


def lookup(table: dict, name: str, field: str):
  """table[name], or ValueError naming the config field and the allowed names."""
  if name not in table:
    raise ValueError(f'{field}={name!r} is unknown; allowed: {sorted(table)}.')
  return table[name]
