"""The real-text path end to end, on tiny checkpoints the test writes: a Hugging Face policy and
reward model, a chat tokenizer, HH-RLHF-format prompt files built through TFDS.

Checks: a chat run trains, evaluates and stores labels whose prompt ids find their prompt text (the
oracle's stored reward equals a recomputation from the text); the judge oracle scores
logit(Yes) - logit(No); each kind of bad input stops early with one line naming what to change.
"""
import gzip
import json
import os
import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from text_fixtures import SENTENCES, make_tiny_chat_tokenizer
from pilaf_jax import default_config
from pilaf_jax.model.checkpoints import CheckpointInfo
from pilaf_jax.model.hf import save_hf_checkpoint
from pilaf_jax.model.llama import Llama, LlamaConfig, init_params

EOS_ID = 4  # <|im_end|> in the tiny tokenizer.


def _write_prompts(directory, split: str, n: int, offset: int) -> None:
  """HH-RLHF-format lines: a one- or two-turn conversation ending in an assistant turn."""
  os.makedirs(directory, exist_ok=True)
  with gzip.open(os.path.join(directory, f'{split}.jsonl.gz'), 'wt') as f:
    for i in range(n):
      question, answer = SENTENCES[(i + offset) % 5], SENTENCES[(i + offset + 1) % 5]
      turns = f'\n\nHuman: {question}\n\nAssistant: {answer}'
      if i % 3 == 0:  # Multi-turn: the prompt keeps the earlier exchange.
        turns = f'\n\nHuman: {SENTENCES[6]}\n\nAssistant: {SENTENCES[5]}' + turns
      f.write(json.dumps({'chosen': turns, 'rejected': turns.rsplit(': ', 1)[0] + ': ' + question}) + '\n')


def _checkpoint(directory, tokenizer_dir, vocab: int, seed: int, *, reward_model: bool = False) -> str:
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                    num_kv_heads=1)
  params = init_params(cfg, jax.random.key(seed))
  params = jax.tree.map(lambda x: 4 * x if x.ndim == 2 else x, params)  # Less uniform distributions.
  if reward_model:
    params.pop('lm_head')
    params['score'] = {'kernel': jax.random.normal(jax.random.key(seed + 1), (32, 1))}
  save_hf_checkpoint(str(directory), cfg, params, tokenizer_dir=tokenizer_dir,
                     info=CheckpointInfo(path='', model_type='llama', eos_token_ids=(EOS_ID,), pad_token_id=0))
  return str(directory)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('chat')
  tok = make_tiny_chat_tokenizer(root / 'tokenizer', extra_words=('Yes', 'No'))
  vocab = len(json.load(open(os.path.join(tok, 'tokenizer.json')))['model']['vocab'])
  _write_prompts(root / 'prompts', 'train', 12, 0)
  _write_prompts(root / 'prompts', 'test', 8, 2)
  return dict(
      root=root, tokenizer=tok, vocab=vocab, prompts=str(root / 'prompts'),
      policy=_checkpoint(root / 'policy', tok, vocab, 0),
      reward_model=_checkpoint(root / 'reward_model', tok, vocab, 10, reward_model=True),
      other_vocab=_checkpoint(root / 'other_vocab', tok, vocab + 8, 0))


def _config(world, **overrides):
  c = default_config.get_config()
  c.task.update(name='chat', prompt_len=24, response_len=6)
  c.task.chat.update(dataset='hh_rlhf', subset='flat', source_dir=world['prompts'])
  c.model.checkpoint = world['policy']
  c.oracle.update(reward='reward_model', checkpoint=world['reward_model'], max_len=40)
  c.dpo.update(batch_size=4, learning_rate=1e-3, warmup_steps=1)
  c.sft.batch_size = 4
  c.online.steps = 3
  c.eval.update(every_steps=3, num_prompts=8, batch_size=8)
  c.checkpoint.update(every_steps=3, async_save=False)
  c.runtime.progress_bar = False
  for key, value in overrides.items():
    *sections, field = key.split('.')
    section = c
    for name in sections:
      section = section[name]
    section[field] = value
  return c


def _run(config, workdir):
  from pilaf_jax.main import run
  return run(config, str(workdir))


def test_chat_run_stores_labels_that_find_their_prompts(world, tmp_path, capsys):
  from pilaf_jax.data.prompts import HHRLHFPrompts
  from pilaf_jax.data.tokenization import ChatTokenizer
  from pilaf_jax.labelling.text_oracles import make_text_oracle
  from pilaf_jax.parallel.mesh import make_mesh
  config = _config(world)
  config.sampler.name = 'pilaf'  # Reorders prompts inside the batch: ids must follow them.
  assert _run(config, tmp_path / 'run') == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [0, 3] and rows[1]['labels_used'] == 12
  assert all(np.isfinite(r[k]) for r in rows for k in ('reward', 'kl', 'J'))
  saved = json.load(open(tmp_path / 'run' / 'config.json'))['config']
  assert saved['model']['vocab_size'] == world['vocab'] and saved['task']['vocab_size'] == world['vocab']

  # Every stored pair names its prompt: the prompt tokens are that prompt's rendering, and the stored
  # reward is the oracle's reward of (that prompt's text, the response's text).
  source = HHRLHFPrompts(str(tmp_path / 'run' / 'tfds'), 'train', 'flat')
  tokenizer = ChatTokenizer(world['policy'], extra_eos_ids=(EOS_ID,))
  oracle = make_text_oracle(config.oracle, make_mesh(config.mesh))
  db = sqlite3.connect(str(tmp_path / 'run' / 'labels.sqlite'))
  stored = db.execute('SELECT prompt_id, prompt, response_a, mask_a, oracle_reward_a FROM pairs').fetchall()
  assert len(stored) == 12 and len({r[0] for r in stored}) == 12  # One epoch: 12 distinct prompts.
  ids = [r[0] for r in stored]
  tokens, _ = tokenizer.encode_prompts([source.messages(i) for i in ids], 24)
  for row, expected in zip(stored, tokens):
    np.testing.assert_array_equal(np.frombuffer(row[1], np.int32), expected)
  responses = np.stack([np.frombuffer(r[2], np.int32) for r in stored])
  masks = np.stack([np.frombuffer(r[3], np.bool_) for r in stored])
  recomputed = oracle([source.messages(i) for i in ids], tokenizer.decode_responses(responses, masks))
  np.testing.assert_allclose([r[4] for r in stored], recomputed, rtol=1e-5, atol=1e-5)
  assert np.std(recomputed) > 0  # The reward model tells responses apart.

  # The trained policy exports to the Hugging Face layout: transformers reads the same weights.
  import torch
  import transformers
  from pilaf_jax.model.hf import load_hf_checkpoint
  from pilaf_jax.tools.export_policy import export_policy
  assert export_policy(str(tmp_path / 'run'), str(tmp_path / 'export')) == 3
  _, trained = load_hf_checkpoint(str(tmp_path / 'export'))
  _, initial = load_hf_checkpoint(world['policy'])
  kernel = lambda p: np.asarray(p['layers_1']['mlp']['down_proj']['kernel'])
  assert not np.allclose(kernel(trained), kernel(initial))  # Three DPO steps moved it.
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'export'))
  torch_kernel = torch_model.model.layers[1].mlp.down_proj.weight.detach().numpy().T
  np.testing.assert_array_equal(torch_kernel, kernel(trained))
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'export')).chat_template
  del torch


def test_judge_scores_yes_minus_no_logits(world):
  from pilaf_jax.labelling.text_oracles import make_text_oracle
  from pilaf_jax.model.hf import load_hf_checkpoint
  from pilaf_jax.parallel.mesh import make_mesh
  config = _config(world, **{'oracle.reward': 'judge', 'oracle.checkpoint': world['policy'], 'oracle.max_len': 48})
  oracle = make_text_oracle(config.oracle, make_mesh(config.mesh))
  conversations = [[{'role': 'user', 'content': SENTENCES[0]}], [{'role': 'user', 'content': SENTENCES[2]}]]
  responses = [SENTENCES[1], SENTENCES[3]]
  scores = oracle(conversations, responses)
  tokens, valid = oracle.encode(conversations, responses)
  assert not valid[0, 0] or not valid[1, 0] or valid.all()  # Left-padded (or exactly full).
  cfg, params = load_hf_checkpoint(world['policy'])
  positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
  logits, _ = Llama(cfg).apply({'params': params}, jnp.asarray(tokens), positions, jnp.asarray(valid))
  tok = oracle.tokenizer
  yes, no = tok.convert_tokens_to_ids('Yes'), tok.convert_tokens_to_ids('No')
  np.testing.assert_allclose(scores, np.asarray(logits[:, -1, yes] - logits[:, -1, no]), rtol=1e-4, atol=1e-4)


def test_text_rule_oracle_labels_evaluates_and_prints_responses(world, tmp_path, capsys):
  """oracle.reward='text_rule' needs no oracle model: stored rewards and evaluation rewards are the
  rule of the decoded text, and the shown held-out responses are printed at the end."""
  from pilaf_jax.data.tokenization import ChatTokenizer
  from pilaf_jax.labelling.text_rules import short_first_sentence
  config = _config(world, **{'oracle.reward': 'text_rule', 'oracle.checkpoint': '', 'oracle.reward_scale': 0.5,
                             'eval.show_responses': 3})
  assert _run(config, tmp_path / 'run') == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  rows = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
  assert [len(r['responses']) for r in rows] == [3, 3]
  for row in rows:
    for shown in row['responses']:
      assert shown['reward'] == 0.5 * short_first_sentence(shown['response'])
      assert shown['prompt'].startswith('user: ')
      assert repr(shown['response']) in out
  tokenizer = ChatTokenizer(world['policy'], extra_eos_ids=(EOS_ID,))
  db = sqlite3.connect(str(tmp_path / 'run' / 'labels.sqlite'))
  stored = db.execute('SELECT response_a, mask_a, oracle_reward_a FROM pairs').fetchall()
  responses = np.stack([np.frombuffer(r[0], np.int32) for r in stored])
  masks = np.stack([np.frombuffer(r[1], np.bool_) for r in stored])
  texts = tokenizer.decode_responses(responses, masks)
  np.testing.assert_array_equal([r[2] for r in stored], [0.5 * short_first_sentence(t) for t in texts])


@pytest.mark.parametrize('case', ['no_chat_template', 'no_dataset', 'reference_vocab', 'missing_weights',
                                  'overlong_prompt', 'not_a_reward_model', 'no_checkpoint'])
def test_bad_input_stops_with_one_line(world, tmp_path, capsys, case):
  overrides, expected = {
      'no_chat_template': ({'task.chat.tokenizer': make_tiny_chat_tokenizer(tmp_path / 'plain', chat_template=None)},
                           ['task.chat.tokenizer', 'chat_template']),
      'no_dataset': ({'task.chat.source_dir': str(tmp_path)}, ['task.chat.source_dir', str(tmp_path)]),
      'reference_vocab': ({'model.reference_checkpoint': world['other_vocab']}, ['vocab_size']),
      'missing_weights': ({'model.checkpoint': _config_only(world, tmp_path)}, ['safetensors']),
      'overlong_prompt': ({'task.chat.overlong_prompts': 'error', 'task.prompt_len': 8}, ['task.prompt_len']),
      'not_a_reward_model': ({'oracle.checkpoint': world['policy']}, ['oracle.checkpoint', 'judge']),
      'no_checkpoint': ({'model.checkpoint': ''}, ['model.checkpoint']),
  }[case]
  code = _run(_config(world, **overrides), tmp_path / 'run')
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert err.startswith('error: ') and 'Traceback' not in err, err
  for word in expected:
    assert word in err, (word, err)


def _config_only(world, tmp_path) -> str:
  """A checkpoint directory with config.json but no weights."""
  directory = tmp_path / 'config_only'
  directory.mkdir()
  with open(os.path.join(world['policy'], 'config.json')) as f:
    (directory / 'config.json').write_text(f.read())
  return str(directory)
