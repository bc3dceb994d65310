#!/usr/bin/env bash
# Issue 9 must-reach: a 4 samplers x 8 seeds study at the default scale, SIGKILLed mid-way, resumed.
cd <repo>; export PYTHONPATH=<repo>
W=studies/full_kill
cmd="nice -n 10 python -m pilaf_jax.study --config=configs/default.py --samplers=vanilla,pilaf,hybrid,best_of_n --seeds=0-7 --workdir=$W"
date +%s > $W.t0
$cmd > $W.log1 2>&1 &
pid=$!
sleep 420
echo "killing study pid $pid at $(date)" > $W.kill
kill -9 $pid
sleep 2
pgrep -f "workdir=$W/runs" >> $W.kill && echo "child still alive" >> $W.kill
python -m pilaf_jax.study status --workdir=$W > $W.status_after_kill 2>&1
$cmd > $W.log2 2>&1
date +%s > $W.t1
python -m pilaf_jax.study report --workdir=$W > $W.report.log 2>&1
