r"""Executes the notebooks in colabs/ top to bottom and fails on the first cell that raises.

  python -m pilaf_jax.tools.run_notebooks [--write] [--timeout=600] [NAME_OR_PATH ...]

Each notebook runs in a fresh `python3` Jupyter kernel (nbclient) whose working directory is the
repository root (where the notebooks find configs/ and docs/, as they do in Colab after their
install cell), with this checkout first on PYTHONPATH. A cell that raises stops that notebook; the
command then names the notebook, the cell and the error, and exits with status 1.

--write stores the outputs back into the .ipynb files (this is how the committed outputs are
made), together with the measured wall and CPU time (written into the first markdown cell between
<!--runtime--> and <!--/runtime-->) and a hash of the executed code, which the tests compare with
the code in the file so that outputs cannot silently belong to other code. Nothing is written for
a notebook that failed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLABS = os.path.join(ROOT, 'colabs')
RUNTIME_MARK = re.compile(r'<!--runtime-->.*?<!--/runtime-->', re.S)
_ANSI = re.compile(r'\x1b\[[0-9;]*m')


class NotebookError(RuntimeError):
  """A notebook cell raised: the message names the notebook, the cell and the error."""


def notebook_paths(directory: str = COLABS) -> list[str]:
  """Every .ipynb in directory, sorted by name."""
  if not os.path.isdir(directory):
    raise NotebookError(f'No notebook directory at {directory} (run from a checkout of the repository).')
  return sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith('.ipynb'))


def code_hash(nb) -> str:
  """sha256 of the notebook's code cells, in order: what the committed outputs were produced by."""
  h = hashlib.sha256()
  for cell in nb.cells:
    if cell.cell_type == 'code':
      h.update(cell.source.encode())
      h.update(b'\0')
  return h.hexdigest()


def _first_line(source: str) -> str:
  lines = [line for line in source.splitlines() if line.strip()]
  return (lines[0][:80] if lines else '(empty)')


def _children_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def execute_notebook(path: str, *, timeout: int = 600, kernel_name: str = 'python3'):
  """Runs every cell of the notebook at `path` in a fresh kernel; returns (notebook, seconds,
  cpu_seconds): the wall time, and the CPU time of the kernel process (user + system, counted once
  the kernel has exited; far less sensitive than wall time to other work on a shared machine).

  Raises NotebookError naming the cell (1-based index among all cells, and its first line) that
  raised, with the exception's type and message.
  """
  import nbformat
  from nbclient import NotebookClient
  from nbclient.exceptions import CellExecutionError, CellTimeoutError
  nb = nbformat.read(path, as_version=4)
  name = os.path.basename(path)
  client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, record_timing=False,
                          resources={'metadata': {'path': ROOT}})
  # The kernel inherits this environment: put this checkout first, so the notebooks run its code
  # even where pilaf_jax is not installed, or installed from another copy.
  saved = os.environ.get('PYTHONPATH')
  os.environ['PYTHONPATH'] = os.pathsep.join([ROOT] + ([saved] if saved else []))
  start, cpu_start = time.perf_counter(), _children_cpu_seconds()
  try:
    with client.setup_kernel():
      for index, cell in enumerate(nb.cells):
        try:
          client.execute_cell(cell, index)
        except (CellExecutionError, CellTimeoutError) as e:
          what = (f'{e.ename}: {_ANSI.sub("", str(e.evalue))}' if isinstance(e, CellExecutionError)
                  else f'timed out after {timeout} s')
          where = f'cell {index + 1} ({_first_line(cell.source)!r})'
          raise NotebookError(f'{name}: {where} raised {what}') from None
  finally:
    if saved is None:
      os.environ.pop('PYTHONPATH', None)
    else:
      os.environ['PYTHONPATH'] = saved
  return nb, time.perf_counter() - start, _children_cpu_seconds() - cpu_start


def runtime_text(seconds: float, cpu_seconds: float) -> str:
  """What the first markdown cell states between the runtime marks."""
  return f'<!--runtime-->{seconds:.0f} s wall ({cpu_seconds:.0f} s of CPU time)<!--/runtime-->'


def write_notebook(nb, path: str, seconds: float, cpu_seconds: float) -> None:
  """Stores an executed notebook: outputs, the measured run time and the hash of its code."""
  import nbformat
  seconds, cpu_seconds = round(seconds, 1), round(cpu_seconds, 1)  # As stored, so text and metadata agree.
  for cell in nb.cells:
    if cell.cell_type == 'markdown' and RUNTIME_MARK.search(cell.source):
      cell.source = RUNTIME_MARK.sub(runtime_text(seconds, cpu_seconds), cell.source, count=1)
      break
  nb.metadata['pilaf_jax'] = {'code_sha256': code_hash(nb), 'seconds': seconds, 'cpu_seconds': cpu_seconds,
                              'executed_by': 'python -m pilaf_jax.tools.run_notebooks --write'}
  nbformat.write(nb, path)


def _resolve(names: Sequence[str]) -> list[str]:
  if not names:
    return notebook_paths()
  out = []
  for n in names:
    path = n if os.path.exists(n) else os.path.join(COLABS, n if n.endswith('.ipynb') else n + '.ipynb')
    if not os.path.exists(path):
      raise NotebookError(f'No notebook {n!r}; available: '
                          f'{[os.path.basename(p) for p in notebook_paths()]}.')
    out.append(path)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('notebooks', nargs='*', help='names in colabs/ or paths (default: every notebook)')
  parser.add_argument('--write', action='store_true', help='store the outputs in the .ipynb files')
  parser.add_argument('--timeout', type=int, default=600, help='seconds per cell')
  args = parser.parse_args(argv)
  try:
    paths = _resolve(args.notebooks)
  except NotebookError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  failed = 0
  for path in paths:
    try:
      nb, seconds, cpu_seconds = execute_notebook(path, timeout=args.timeout)
    except NotebookError as e:
      print(f'FAILED {e}', file=sys.stderr)
      failed += 1
      continue
    if args.write:
      write_notebook(nb, path, seconds, cpu_seconds)
    print(f'ok {os.path.basename(path)}: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU'
          + (' (outputs written)' if args.write else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
