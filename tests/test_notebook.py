"""The walkthrough notebook is valid and its code compiles (its run is in the README's figures)."""
import ast
import json
import os

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'colabs',
                        'pilaf_walkthrough.ipynb')


def test_notebook_code_compiles():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb['nbformat'] == 4
  code = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']
  assert len(code) >= 5
  ast.parse('\n\n'.join(code))
  assert 'mix_logits' in code[0] and 'run_online' in code[-1]
