#!/bin/bash
# The three rare-task studies, grown two seeds at a time so that a study stopped early still holds
# complete, paired seeds for every sampler. Resumable: rerun this script; finished runs are skipped.
# Run from the repository root.
set -e
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-workdirs/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export PYTHONPATH=$PWD
SAMPLERS=vanilla,pilaf,t_pilaf,t_pilaf_half,best_of_n
declare -A EXTRA=([win]="" [tie]="--config.task.rare.start_lambda=0.25" [loss]="--config.task.rare.reward_scale=4")
for seeds in 0-1 0-3 0-5 0-7; do
  for name in win loss tie; do
    nice -n 5 python -m pilaf_jax.study --config=configs/rare.py --samplers=$SAMPLERS --seeds=$seeds \
        --workdir=workdirs/rare_$name ${EXTRA[$name]}
  done
done
