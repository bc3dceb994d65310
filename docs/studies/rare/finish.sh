#!/bin/bash
# Reports of the three rare-task studies, copied next to their predictions. Run from the repository root.
set -e
export PYTHONPATH=$PWD
for name in win tie loss; do
  python -m pilaf_jax.study report --workdir=workdirs/rare_$name
  cp workdirs/rare_$name/report.md workdirs/rare_$name/study.json docs/studies/rare/$name/
  mkdir -p docs/studies/rare/$name/plots && cp workdirs/rare_$name/plots/*.png docs/studies/rare/$name/plots/ 2>/dev/null || true
done
python -m pilaf_jax.study compare --workdirs=workdirs/rare_win,workdirs/rare_tie,workdirs/rare_loss \
    --out=docs/studies/rare/rare.md
