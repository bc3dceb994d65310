"""The programmatic text reward of the SmolLM2 demo (labelling/text_rules.py): its rule on hand-made
replies, its floor, its scale, and its config checks. Plain Python: no model is loaded."""
import numpy as np
import pytest

from pilaf_jax import default_config
from pilaf_jax.config_validation import validate
from pilaf_jax.errors import ConfigError
from pilaf_jax.labelling.text_rules import (TextRuleOracle, count_words, first_sentence,
                                            make_text_rule_oracle, short_first_sentence)


@pytest.mark.parametrize('text, first', [
    ('Paris is the capital. It is big.', 'Paris is the capital'),
    ('  Sure! Here it is.', 'Sure'),
    ('What is it? A cat.', 'What is it'),
    ('A list:\n1. one', 'A list:'),
    ('Version 3.5 is out. Yes.', 'Version 3.5 is out'),  # A point inside a number ends nothing.
    ('e.g. this one', 'e.g'),  # A plain rule: an abbreviation's point ends a sentence too.
    ('Cut off before the end', 'Cut off before the end'),
    ('', ''),
])
def test_first_sentence(text, first):
  assert first_sentence(text) == first


def test_words_hold_a_letter_or_digit():
  assert count_words("It's 3 o'clock - 🎉 now!") == 4
  assert count_words('  ') == 0


@pytest.mark.parametrize('text, score', [
    ('Paris is the capital of France. It is big.', -6.0),
    ('The capital is Paris.', -4.0),
    ('Go to bed early.', -4.0),
    ('It is.', -20.0),  # Under the floor of 3 words: as low as the cap.
    ('Yes.', -20.0),
    ('', -20.0),  # The empty reply.
    ('1. Sleep well.', -20.0),  # A list marker alone is a first "sentence" of 1 word.
    (' '.join(['word'] * 30), -20.0),  # Capped at 20 words.
    (' '.join(['word'] * 19) + '.', -19.0),
])
def test_short_first_sentence(text, score):
  assert short_first_sentence(text) == score


def test_shorter_first_sentences_score_higher_above_the_floor():
  replies = [' '.join(['w'] * n) + '. More text follows here.' for n in range(3, 21)]
  scores = [short_first_sentence(r) for r in replies]
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_oracle_scales_and_ignores_the_conversation():
  oracle = TextRuleOracle('short_first_sentence', 0.25)
  rewards = oracle([[{'role': 'user', 'content': 'x'}]] * 3, ['A b c.', 'A b c d e f g h.', ''])
  assert rewards.dtype == np.float64
  np.testing.assert_array_equal(rewards, [-0.75, -2.0, -5.0])


def _chat_config(**oracle):
  c = default_config.get_config()
  c.task.name = 'chat'
  c.task.chat.update(dataset='hh_rlhf', source_dir='/nonexistent', subset='flat')
  c.model.checkpoint = 'model.gguf'
  c.oracle.update(oracle)
  return c


def test_config_accepts_a_rule_without_an_oracle_checkpoint():
  c = _chat_config(reward='text_rule', checkpoint='')
  from pilaf_jax.tasks.chat_config import check_config
  check_config(c)  # No oracle.checkpoint needed.
  assert make_text_rule_oracle(c.oracle).rule == 'short_first_sentence'


def test_unknown_rule_is_one_line_naming_the_field():
  c = _chat_config(reward='text_rule', text_rule='longest_word')
  from pilaf_jax.tasks.chat_config import check_config
  with pytest.raises(ConfigError, match=r"oracle.text_rule='longest_word' is unknown; allowed: \['short_first"):
    check_config(c)
  with pytest.raises(ConfigError, match='oracle.text_rule'):
    TextRuleOracle('longest_word', 1.0)


def test_demo_config_uses_the_rule_and_validates():
  import importlib.util, os
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', 'smollm2_demo.py')
  spec = importlib.util.spec_from_file_location('smollm2_demo', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert (c.oracle.reward, c.oracle.text_rule) == ('text_rule', 'short_first_sentence')
  validate(c)
