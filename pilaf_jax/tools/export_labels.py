r"""Exports a run's label store for analysis: python -m pilaf_jax.tools.export_labels --workdir=<dir>.

Writes one JSON object per labelled pair (JSON lines; --format=csv for a flat table of the scalar
columns and space-separated token lists) to --out (default <workdir>/labels.jsonl). Reads only.
The workdir may be a gs:// URL: its labels.sqlite (the copy refreshed at every checkpoint and at the
end of the run) is downloaded to a temporary file first. --store=<file> reads a local store directly
(e.g. labelling.store_path on the machine that ran the run, which may hold labels newer than the
last checkpoint).
"""
import csv
import json
import os
import sys
import tempfile

from absl import app, flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (local or gs://) holding labels.sqlite.')
_STORE = flags.DEFINE_string('store', '', 'A local label store file to read instead of <workdir>/labels.sqlite.')
_OUT = flags.DEFINE_string('out', '', 'Output path, local or gs:// (default: <workdir>/labels.<format>).')
_FORMAT = flags.DEFINE_enum('format', 'jsonl', ['jsonl', 'csv'], 'Output format.')


def main(argv):
  del argv
  from pilaf_jax import paths
  with tempfile.TemporaryDirectory(prefix='export_labels_') as scratch:
    path = _STORE.value or paths.join(_WORKDIR.value or '', paths.LABEL_STORE)
    if (not _WORKDIR.value and not _STORE.value) or not paths.exists(path):
      print(f'error: no label store at {path!r}; pass --workdir=<a run directory> or --store=<file>.',
            file=sys.stderr)
      sys.exit(2)
    if paths.is_remote(path):
      paths.copy_file(path, os.path.join(scratch, paths.LABEL_STORE))
      path = os.path.join(scratch, paths.LABEL_STORE)
    out = _OUT.value or paths.join(_WORKDIR.value or os.path.dirname(os.path.abspath(path)),
                                   f'labels.{_FORMAT.value}')
    local_out = os.path.join(scratch, os.path.basename(out)) if paths.is_remote(out) else out
    n, counts = _export(path, local_out)
    if local_out != out:
      paths.copy_file(local_out, out)
  print(f'Exported {n} labelled pairs to {out} ({counts["queried_twice"]} queried twice).')


def _export(path: str, out: str) -> tuple[int, dict]:
  """Writes the store at `path` to the local file `out`; returns (pairs written, store counts)."""
  from pilaf_jax.labelling.label_store import LabelStore
  # Open with the store's own fingerprint: exporting must never refuse or modify a store.
  from pilaf_jax.labelling import sqlite_db
  db = sqlite_db.connect(path, create=False)  # Read-write: after a crash, reading may need recovery.
  try:
    fingerprint = json.loads(db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()[0])
  finally:
    db.close()
  store = LabelStore(path, fingerprint)
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
  store.close()
  return n, counts


if __name__ == '__main__':
  app.run(main)
