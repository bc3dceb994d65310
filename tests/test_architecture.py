"""The package's shape: no import cycles (lazy imports inside functions count), no module over 400
lines. The graph: python -m pilaf_jax.tools.import_graph."""
import os

from pilaf_jax.tools import import_graph

MAX_LINES = 400
# Modules whose split was under way on other branches when these checks were added (the label queue
# and store, the checkpoint loaders, the label server, the model and the AOT tool): until those
# branches are merged, a failure that names only these is theirs.
ELSEWHERE = ('pilaf_jax.labelling.queue', 'pilaf_jax.labelling.label_store', 'pilaf_jax.model.',
             'pilaf_jax.data.gguf_tokenizer', 'pilaf_jax.label_server.', 'pilaf_jax.tools.aot')


def _note(names) -> str:
  if names and all(n.startswith(ELSEWHERE) for n in names):
    return ' (all in modules being split on other branches: expected to pass once they are merged)'
  return ''


def test_the_import_graph_has_no_cycle():
  found = import_graph.cycles(import_graph.imports_graph())
  assert not found, f'{len(found)} import cycle(s){_note({m for c in found for m in c})}:\n  ' + \
      '\n  '.join(' -> '.join(c) for c in found)


def test_no_module_is_over_400_lines():
  over = {}
  for module, path in import_graph.modules().items():
    with open(path) as f:
      lines = sum(1 for _ in f)
    if lines > MAX_LINES:
      over[module] = lines
  assert not over, f'modules over {MAX_LINES} lines{_note(over)}:\n  ' + '\n  '.join(
      f'{m}: {n} ({os.path.relpath(import_graph.modules()[m])})' for m, n in sorted(over.items()))


def test_the_cycle_finder_finds_a_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'd'}, 'd': set(), 'e': {'e'} - {'e'}}
  assert import_graph.cycles(graph) == [['a', 'b', 'c', 'a']]
  assert import_graph.cycles({'a': {'b'}, 'b': set()}) == []
