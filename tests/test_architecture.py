"""The package's shape: no import cycles (lazy imports inside functions count), no module over 400
lines. The graph: python -m pilaf_jax.tools.import_graph."""
import os

from pilaf_jax.tools import import_graph

MAX_LINES = 400


def test_the_import_graph_has_no_cycle():
  found = import_graph.cycles(import_graph.imports_graph())
  assert not found, f'{len(found)} import cycle(s):\n  ' + \
      '\n  '.join(' -> '.join(c) for c in found)


def test_no_module_is_over_400_lines():
  over = {}
  for module, path in import_graph.modules().items():
    with open(path) as f:
      lines = sum(1 for _ in f)
    if lines > MAX_LINES:
      over[module] = lines
  assert not over, f'modules over {MAX_LINES} lines:\n  ' + '\n  '.join(
      f'{m}: {n} ({os.path.relpath(import_graph.modules()[m])})' for m, n in sorted(over.items()))


def test_the_cycle_finder_finds_a_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'd'}, 'd': set(), 'e': {'e'} - {'e'}}
  assert import_graph.cycles(graph) == [['a', 'b', 'c', 'a']]
  assert import_graph.cycles({'a': {'b'}, 'b': set()}) == []
