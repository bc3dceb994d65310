"""The import graph of pilaf_jax, read from the source with `ast` (imports at module level and inside
functions alike: a lazy import still ties two modules together), and its cycles.

  python -m pilaf_jax.tools.import_graph            # each module and what it imports; cycles last
  python -m pilaf_jax.tools.import_graph --cycles   # only the cycles (exit status 1 when any)

Importing a.b.c also runs a/__init__.py and a/b/__init__.py; those implicit edges are left out (every
module would otherwise reach pilaf_jax/__init__.py): an edge here is an import statement.
"""
from __future__ import annotations

import ast
import os
import sys

PACKAGE = 'pilaf_jax'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(root: str = ROOT) -> dict[str, str]:
  """Module name -> file path for every .py file under the package."""
  out = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
        out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def imports_graph(root: str = ROOT) -> dict[str, set[str]]:
  """Module -> the package modules it imports (from x import y: x.y when that is a module, else x)."""
  known = modules(root)
  graph = {}
  for module, path in known.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # Relative: from .x import y.
          base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
        targets.update(f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base for alias in node.names)
    graph[module] = {t for t in targets if t in known and t != module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a -> ... -> a) per strongly connected component of more than one module."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):  # Tarjan's algorithm.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return [_path_within(graph, sorted(c)[0], c) for c in components]


def _path_within(graph, start: str, component: set) -> list[str]:
  """A shortest cycle through `start` inside its component (breadth first)."""
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & component):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
        if w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  return [start]


def main(argv: list[str]) -> int:
  graph = imports_graph()
  found = cycles(graph)
  if '--cycles' not in argv:
    for module in sorted(graph):
      print(f'{module} -> {", ".join(sorted(graph[module])) or "-"}')
    print()
  print(f'{len(found)} import cycle(s)' + ''.join(f'\n  {" -> ".join(c)}' for c in found))
  return 1 if found else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
