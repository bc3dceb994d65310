r"""Exports a run's label store for analysis: python -m pilaf_jax.tools.export_labels --workdir=<dir>.

Writes one JSON object per labelled pair (JSON lines; --format=csv for a flat table of the scalar
columns and space-separated token lists) to --out (default <workdir>/labels.jsonl). Reads only.
"""
import csv
import json
import os
import sqlite3
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory holding labels.sqlite.')
_OUT = flags.DEFINE_string('out', '', 'Output path (default: <workdir>/labels.<format>).')
_FORMAT = flags.DEFINE_enum('format', 'jsonl', ['jsonl', 'csv'], 'Output format.')


def main(argv):
  del argv
  from pilaf_jax.labelling.label_store import LabelStore
  path = os.path.join(_WORKDIR.value or '', 'labels.sqlite')
  if not _WORKDIR.value or not os.path.exists(path):
    print(f'error: no label store at {path!r}; pass --workdir=<a run directory>.', file=sys.stderr)
    sys.exit(2)
  # Open with the store's own fingerprint: exporting must never refuse or modify a store.
  fingerprint = json.loads(sqlite3.connect(path).execute(
      "SELECT value FROM meta WHERE key='fingerprint'").fetchone()[0])
  store = LabelStore(path, fingerprint)
  out = _OUT.value or os.path.join(_WORKDIR.value, f'labels.{_FORMAT.value}')
  n = 0
  with open(out, 'w', newline='') as f:
    writer = None
    for row in store.iter_rows():
      if _FORMAT.value == 'jsonl':
        f.write(json.dumps(row) + '\n')
      else:
        flat = {k: ' '.join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()
                if not k.endswith('logprobs_a') and not k.endswith('logprobs_b')}
        if writer is None:
          writer = csv.DictWriter(f, fieldnames=list(flat))
          writer.writeheader()
        writer.writerow(flat)
      n += 1
  counts = store.counts()
  print(f'Exported {n} labelled pairs to {out} ({counts["queried_twice"]} queried twice).')


if __name__ == '__main__':
  app.run(main)
