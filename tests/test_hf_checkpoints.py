"""Hugging Face checkpoints: tiny random transformers models load with identical logits and scores
(left-padded batches), save back loadably, and bad checkpoints fail with the path in the message."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pilaf_jax.model.checkpoints import CheckpointError
from pilaf_jax.model.hf import (hf_param_shapes, load_hf_checkpoint, read_hf_config,
                                save_hf_checkpoint)
from pilaf_jax.model.llama import Llama
from pilaf_jax.model.reward_model import judge_score_head, sequence_scores
from pilaf_jax.parallel.partitioning import param_partition_specs

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB, PAD = 97, 0
LEFT_PAD = (0, 3, 7, 12)  # Row lengths 24, 21, 17, 12: positions well past the rope's 16.
LENGTH = 24

# PyTorch and transformers are imported for this file's tests only, not when the suite is collected
# (seconds of every test worker's start, most of which never run these tests).
torch = transformers = None


@pytest.fixture(autouse=True, scope='module')
def _torch_and_transformers():
  global torch, transformers
  import torch  # pylint: disable=redefined-outer-name,import-outside-toplevel
  import transformers  # pylint: disable=redefined-outer-name,import-outside-toplevel


def _randomise(model: 'torch.nn.Module', seed: int) -> 'torch.nn.Module':
  """Every weight random, so norms, biases and the head are all checked (HF inits them constant)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(1.0 + 0.1 * noise if 'norm' in name else 0.1 * noise)
  return model.eval()


def llama31_config(**kw):
  """GQA (4 heads, 2 KV heads, head_dim 16) and Llama 3.1 rope scaling on a 16-token context."""
  kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            rope_theta=10_000.0, max_position_embeddings=128, bos_token_id=1, eos_token_id=[2, 3],
            pad_token_id=PAD, tie_word_embeddings=False,
            rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=16), **kw)
  return transformers.LlamaConfig(**kw)


def qwen2_config():
  return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
                                  max_position_embeddings=128, eos_token_id=2, pad_token_id=PAD)


def make(cls, config, seed=0):
  torch.manual_seed(seed)
  return _randomise(cls._from_config(config, attn_implementation='eager'), seed)


def left_padded_batch(seed=0, left_pad=LEFT_PAD, length=LENGTH):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, VOCAB, size=(len(left_pad), length)).astype(np.int32)  # No PAD inside.
  valid = np.ones_like(tokens, bool)
  for i, pad in enumerate(left_pad):
    tokens[i, :pad], valid[i, :pad] = PAD, False
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  return tokens, positions, valid


def torch_out(model, tokens, positions, valid):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                 attention_mask=torch.as_tensor(valid, dtype=torch.long),
                 position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.float().numpy()


def our_logits(cfg, params, tokens, positions, valid):
  # Jitted: one compilation is much cheaper than dispatching every op of the forward pass.
  logits, _ = jax.jit(Llama(cfg).apply)({'params': params}, jnp.asarray(tokens),
                                        jnp.asarray(positions), jnp.asarray(valid))
  return np.asarray(logits)


def our_scores(cfg, params, tokens, positions, valid):
  score = jax.jit(lambda p, *a: sequence_scores(Llama(cfg), p, *a))
  return np.asarray(score(params, *map(jnp.asarray, (tokens, positions, valid))))


def max_diff_valid(a, b, valid):
  return float(np.abs(a - b)[valid].max())


@pytest.fixture(scope='module')
def llama31(tmp_path_factory):
  model = make(transformers.LlamaForCausalLM, llama31_config())
  path = tmp_path_factory.mktemp('llama31')
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope='module')
def qwen2(tmp_path_factory):
  model = make(transformers.Qwen2ForCausalLM, qwen2_config(), seed=1)
  path = tmp_path_factory.mktemp('qwen2')
  model.save_pretrained(path)
  return model, str(path)


@pytest.fixture(scope='module')
def reward(tmp_path_factory):
  model = make(transformers.LlamaForSequenceClassification, llama31_config(num_labels=1), seed=2)
  path = tmp_path_factory.mktemp('reward')
  model.save_pretrained(path)
  return model, str(path)


def test_llama31_gqa_logits_match_transformers(llama31):
  model, path = llama31
  cfg, info = read_hf_config(path)
  assert (cfg.rope_scaling, cfg.rope_original_max_position, cfg.num_kv_heads, cfg.head_dim) == \
      ('llama3', 16, 2, 16)
  assert info.model_type == 'llama' and info.eos_token_ids == (2, 3) and info.num_labels == 0
  cfg, params = load_hf_checkpoint(path)
  batch = left_padded_batch()
  ref = torch_out(model, *batch)
  diff = max_diff_valid(our_logits(cfg, params, *batch), ref, batch[2])
  assert diff < 1e-4, diff
  # The scaling matters at these positions: without it the logits are far off.
  import dataclasses
  plain = our_logits(dataclasses.replace(cfg, rope_scaling=''), params, *batch)
  assert max_diff_valid(plain, ref, batch[2]) > 1e-2


def test_sharded_index_and_bfloat16_checkpoints(llama31, tmp_path):
  model, _ = llama31
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='30KB')
  assert os.path.exists(tmp_path / 'sharded' / 'model.safetensors.index.json')
  assert len([f for f in os.listdir(tmp_path / 'sharded') if f.endswith('.safetensors')]) > 2
  batch = left_padded_batch(seed=1)
  cfg, params = load_hf_checkpoint(str(tmp_path / 'sharded'))
  ref = torch_out(model, *batch)
  diff = max_diff_valid(our_logits(cfg, params, *batch), ref, batch[2])
  assert diff < 1e-4, diff

  bf16 = make(transformers.LlamaForCausalLM, llama31_config()).to(torch.bfloat16)
  bf16.save_pretrained(tmp_path / 'bf16')
  cfg, params = load_hf_checkpoint(str(tmp_path / 'bf16'), dtype='float32')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  # The same bf16-rounded weights, computed in float32 (.float() would leave inv_freq rounded).
  fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'bf16', dtype=torch.float32,
                                                           attn_implementation='eager').eval()
  ref = torch_out(fp32, *batch)
  diff = max_diff_valid(our_logits(cfg, params, *batch), ref, batch[2])
  assert diff < 1e-4, diff
  # Loading in bfloat16 keeps the exact values.
  cfg16, params16 = load_hf_checkpoint(str(tmp_path / 'bf16'), dtype='bfloat16')
  assert cfg16.param_dtype == 'bfloat16'
  np.testing.assert_array_equal(np.asarray(params16['norm']['scale'], np.float32),
                                np.asarray(params['norm']['scale']))


def test_qwen2_biases_and_tied_embeddings(qwen2):
  model, path = qwen2
  cfg, params = load_hf_checkpoint(path)
  assert cfg.attention_bias and cfg.tie_embeddings and 'lm_head' not in params
  assert np.abs(np.asarray(params['layers_1']['self_attn']['k_proj']['bias'])).max() > 0
  batch = left_padded_batch(seed=2)
  diff = max_diff_valid(our_logits(cfg, params, *batch), torch_out(model, *batch), batch[2])
  assert diff < 1e-4, diff


def test_mistral_logits_match_transformers(tmp_path):
  config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=1, sliding_window=None, pad_token_id=PAD)
  model = make(transformers.MistralForCausalLM, config, seed=3)
  model.save_pretrained(tmp_path)
  cfg, params = load_hf_checkpoint(str(tmp_path))
  batch = left_padded_batch(seed=7)
  diff = max_diff_valid(our_logits(cfg, params, *batch), torch_out(model, *batch), batch[2])
  assert diff < 1e-4, diff


def test_reward_model_scores_match_transformers(reward):
  model, path = reward
  cfg, info = read_hf_config(path)
  assert info.num_labels == 1 and info.pad_token_id == PAD
  cfg, params = load_hf_checkpoint(path)
  assert 'score' in params and 'lm_head' not in params
  assert params['score']['kernel'].shape == (64, 1)
  for left_pad in (LEFT_PAD, (5, 0, 2, 9)):
    batch = left_padded_batch(seed=3, left_pad=left_pad)
    ours = our_scores(cfg, params, *batch)
    ref = torch_out(model, *batch)[:, 0]
    assert ours.shape == (len(left_pad),)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
  # Right padding: HF pools the rightmost non-pad token, so do we.
  tokens, _, valid = left_padded_batch(seed=4)
  tokens, valid = tokens[:, ::-1].copy(), valid[:, ::-1].copy()
  positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
  ours = our_scores(cfg, params, tokens, positions, valid)
  np.testing.assert_allclose(ours, torch_out(model, tokens, positions, valid)[:, 0], atol=1e-4)
  # The score head has a partition rule.
  assert str(param_partition_specs(params)['score']['kernel']) == str(jax.sharding.PartitionSpec('fsdp', None))


@pytest.mark.parametrize('fixture', ['llama31', 'qwen2'])
def test_judge_score_head_is_logit_difference(fixture, request):
  _, path = request.getfixturevalue(fixture)
  cfg, params = load_hf_checkpoint(path)
  batch = left_padded_batch(seed=5)
  judge = judge_score_head(params, cfg, yes_id=7, no_id=11)
  assert 'lm_head' not in judge and judge['score']['kernel'].shape == (cfg.hidden_size, 1)
  scores = our_scores(cfg, judge, *batch)
  last = our_logits(cfg, params, *batch)[:, -1]
  np.testing.assert_allclose(scores, last[:, 7] - last[:, 11], atol=1e-4)


@pytest.mark.parametrize('fixture,auto', [('llama31', 'AutoModelForCausalLM'), ('qwen2', 'AutoModelForCausalLM'),
                                          ('reward', 'AutoModelForSequenceClassification')])
def test_save_round_trip_through_transformers(fixture, auto, request, tmp_path):
  model, path = request.getfixturevalue(fixture)
  cfg, info = read_hf_config(path)
  cfg, params = load_hf_checkpoint(path)
  (tmp_path / 'tok').mkdir()
  (tmp_path / 'tok' / 'tokenizer_config.json').write_text('{}')
  out = str(tmp_path / 'saved')
  save_hf_checkpoint(out, cfg, params, info=info, tokenizer_dir=str(tmp_path / 'tok'))
  assert os.path.exists(os.path.join(out, 'tokenizer_config.json'))
  assert json.load(open(os.path.join(out, 'generation_config.json')))['eos_token_id'] == list(info.eos_token_ids)
  reloaded = getattr(transformers, auto).from_pretrained(out, attn_implementation='eager').eval()
  assert type(reloaded) is type(model)
  batch = left_padded_batch(seed=6)
  ref, got = torch_out(model, *batch), torch_out(reloaded, *batch)
  assert ref.shape == got.shape
  # Causal LMs: every valid position; reward models: one score per row.
  diff = max_diff_valid(got, ref, batch[2]) if ref.ndim == 3 else float(np.abs(got - ref).max())
  assert diff < 1e-5, diff
  # And back into our loader: the same params and info.
  cfg2, params2 = load_hf_checkpoint(out)
  assert cfg2 == cfg and read_hf_config(out)[1].eos_token_ids == info.eos_token_ids
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(a, b)


def test_bfloat16_save(llama31, tmp_path):
  _, path = llama31
  cfg, params = load_hf_checkpoint(path)
  save_hf_checkpoint(str(tmp_path), cfg, params, dtype='bfloat16')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(
      reloaded.model.layers[0].self_attn.q_proj.weight.detach().float().numpy(),
      np.asarray(params['layers_0']['self_attn']['q_proj']['kernel'].astype(jnp.bfloat16).T, np.float32))


# Bad checkpoints.


def _rewrite(src, dst, edit):
  os.makedirs(dst)
  for f in ('config.json', 'generation_config.json'):
    if os.path.exists(os.path.join(src, f)):
      open(os.path.join(dst, f), 'w').write(open(os.path.join(src, f)).read())
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  edit(tensors)
  save_file(tensors, os.path.join(dst, 'model.safetensors'))
  return dst


def test_bad_checkpoints_name_the_path(llama31, tmp_path):
  _, path = llama31
  missing_dir = str(tmp_path / 'nope')
  with pytest.raises(CheckpointError, match='nope'):
    load_hf_checkpoint(missing_dir)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match=r'empty.*config\.json'):
    load_hf_checkpoint(str(tmp_path / 'empty'))
  transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path / 'gpt2')
  with pytest.raises(CheckpointError, match=r"gpt2.*model_type 'gpt2'"):
    load_hf_checkpoint(str(tmp_path / 'gpt2'))
  with pytest.raises(CheckpointError, match='mlp_bias'):
    llama31_config(mlp_bias=True).save_pretrained(tmp_path / 'mlp_bias')
    read_hf_config(str(tmp_path / 'mlp_bias'))
  llama31_config().save_pretrained(tmp_path / 'no_weights')
  with pytest.raises(CheckpointError, match=r'no_weights.*model\.safetensors'):
    load_hf_checkpoint(str(tmp_path / 'no_weights'))

  name = 'model.layers.1.mlp.up_proj.weight'
  dst = _rewrite(path, str(tmp_path / 'missing'), lambda t: t.pop(name))
  with pytest.raises(CheckpointError, match=rf'missing.*{name}'):
    load_hf_checkpoint(dst)
  dst = _rewrite(path, str(tmp_path / 'shape'), lambda t: t.update({name: t[name].T.copy()}))
  with pytest.raises(CheckpointError, match=rf'shape/model\.safetensors.*{name}.*\(96, 64\)'):
    load_hf_checkpoint(dst)
  dst = _rewrite(path, str(tmp_path / 'extra'), lambda t: t.update(
      {'model.layers.2.mlp.up_proj.weight': t[name]}))
  with pytest.raises(CheckpointError, match=r'extra.*unexpected.*layers\.2'):
    load_hf_checkpoint(dst)
  # Known extras are ignored.
  dst = _rewrite(path, str(tmp_path / 'inv_freq'), lambda t: t.update(
      {'model.layers.0.self_attn.rotary_emb.inv_freq': np.ones(8, np.float32)}))
  load_hf_checkpoint(dst)


def test_load_onto_a_mesh_keeps_host_memory_near_one_tensor():
  """The loader never holds the checkpoint: peak host memory < 3 x the largest tensor while the
  checkpoint is ~10 x it (benchmarks/load_memory.py, under 8 forced CPU devices, fsdp=8)."""
  script = os.path.join(os.path.dirname(HERE), 'benchmarks', 'load_memory.py')
  proc = subprocess.run([sys.executable, script, '--json'], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['devices'] == 8 and r['files'] > 2 and r['shardings_ok'] and r['values_ok']
  assert r['loaded_bytes'] == r['total_bytes'] > 8 * r['largest_tensor_bytes']
  assert r['peak_bytes'] < 3 * r['largest_tensor_bytes'], r


def test_param_shapes_for_planning():
  from pilaf_jax.model import presets
  from pilaf_jax.model.llama import LlamaConfig
  cfg = LlamaConfig.from_config(presets.SMOLLM2_135M)
  shapes = hf_param_shapes(cfg, num_labels=1)
  assert 'lm_head' not in shapes and shapes['score']['kernel'].shape == (576, 1)
  assert sum(x.size for x in jax.tree.leaves(hf_param_shapes(cfg))) == 134_515_008
