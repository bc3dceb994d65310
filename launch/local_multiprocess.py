r"""Runs N processes of pilaf_jax.main on this machine, as a multi-host job would, on CPU devices.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/some_config.py --workdir=/tmp/run

Everything after `--` goes to every process. Each process gets PILAF_COORDINATOR=localhost:PORT,
PILAF_NUM_PROCESSES and its PILAF_PROCESS_ID (see pilaf_jax/parallel/multihost.py), and
XLA_FLAGS giving it --devices_per_process CPU devices, so the job sees
num_processes x devices_per_process devices in all. Output lines are prefixed with [pN]. If any
process fails the others are stopped, and the exit status is the first failure's.

--module runs another module instead of pilaf_jax.main, --script a Python file.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int,
                devices_per_process: int) -> dict:
  env = dict(base)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  env.update(
      PILAF_COORDINATOR=f'localhost:{port}',
      PILAF_NUM_PROCESSES=str(num_processes),
      PILAF_PROCESS_ID=str(process_id),
      XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={devices_per_process}']),
      JAX_PLATFORMS='cpu',
      PYTHONUNBUFFERED='1',
  )
  # Run from a checkout without installing: put the repository on the path.
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO_ROOT, env.get('PYTHONPATH', '')) if p)
  return env


def _pump(stream: IO[str], prefix: str, lock: threading.Lock) -> None:
  for line in stream:
    with lock:
      sys.stdout.write(f'{prefix} {line}' if line.endswith('\n') else f'{prefix} {line}\n')
      sys.stdout.flush()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int,
           port: Optional[int] = None, timeout: Optional[float] = None) -> int:
  """Starts the processes, streams their output and returns the job's exit status."""
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen(list(command), env=process_env(os.environ, i, num_processes, port,
                                                          devices_per_process),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f'[p{i}]', lock), daemon=True)
    pump.start()
    pumps.append(pump)

  deadline = None if timeout is None else time.monotonic() + timeout
  status = 0
  try:
    while True:
      codes = [p.poll() for p in procs]  # Poll every process (any() would stop at the first).
      if all(c is not None for c in codes):
        break
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed and not status:
        status = failed[0]
        print(f'[launcher] a process exited with status {status}; stopping the others.', flush=True)
        break
      if deadline is not None and time.monotonic() > deadline:
        status = 124
        print(f'[launcher] timed out after {timeout} s; stopping the processes.', flush=True)
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    status = 130
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in pumps:
      t.join(timeout=5)
  if not status:
    status = next((p.returncode for p in procs if p.returncode), 0)
  return status


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = []
  if '--' in argv:
    rest = argv[argv.index('--') + 1:]
    argv = argv[:argv.index('--')]
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_processes', '-n', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--port', type=int, default=0, help='Coordinator port (default: a free one).')
  parser.add_argument('--timeout', type=float, default=0, help='Seconds before stopping (0: none).')
  what = parser.add_mutually_exclusive_group()
  what.add_argument('--module', default='pilaf_jax.main')
  what.add_argument('--script', default='')
  args = parser.parse_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1.')
  target = [args.script] if args.script else ['-m', args.module]
  command = [sys.executable] + target + rest
  print(f'[launcher] {args.num_processes} x: {" ".join(command)}', flush=True)
  return launch(command, args.num_processes, args.devices_per_process, args.port or None,
                args.timeout or None)


if __name__ == '__main__':
  sys.exit(main())
