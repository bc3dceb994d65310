"""SFT of the reference reports progress while it trains (a long one is not silent), and the
progress lines change nothing it computes."""
import jax
import numpy as np
import ml_collections

from pilaf_jax import default_config
from pilaf_jax.learning import sft
from pilaf_jax.model.llama import Llama, LlamaConfig
from pilaf_jax.parallel.mesh import make_mesh
from pilaf_jax.parallel.placement import Placement
from pilaf_jax.tasks.synthetic import SyntheticTask, SyntheticTaskConfig


def _train(steps: int):
  c = default_config.get_config()
  task = SyntheticTask(SyntheticTaskConfig.from_config(c.task), jax.random.key(0))
  model = Llama(LlamaConfig(vocab_size=c.task.vocab_size, hidden_size=16, intermediate_size=32,
                            num_layers=1, num_heads=2, num_kv_heads=1))
  placement = Placement(make_mesh(c.mesh, jax.devices()[:1]), model.cfg)
  sft_cfg = ml_collections.ConfigDict(dict(steps=steps, batch_size=8, learning_rate=3e-3,
                                           warmup_steps=2, weight_decay=0.0))
  lines = []
  params = sft.train_reference(task, model, placement, sft_cfg,
                               lambda stream, i: jax.random.fold_in(jax.random.key(stream), i),
                               lines.append)
  return params, lines


def test_progress_lines_every_interval(monkeypatch):
  monkeypatch.setattr(sft, 'PROGRESS_SECONDS', 1e9)  # Quicker than the interval: the summary alone.
  quiet_params, quiet = _train(5)
  assert len(quiet) == 1 and quiet[0].startswith('Reference policy: SFT on behaviour responses, 5 steps')
  monkeypatch.setattr(sft, 'PROGRESS_SECONDS', 0.0)  # Every step is "slow": a line after each.
  params, lines = _train(5)
  assert [line.split(',')[0] for line in lines[:-1]] == [f'  SFT step {i}/5' for i in range(1, 5)]
  assert all(', loss ' in line for line in lines[:-1])
  assert lines[-1].split(' s, loss ')[1] == quiet[0].split(' s, loss ')[1]  # Same losses...
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(quiet_params)):  # ... and parameters.
    np.testing.assert_array_equal(a, b)
