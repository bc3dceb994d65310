"""Oracles that are a rule on the decoded text: rewards a reader can check by eye in a printed response.

oracle.reward='text_rule' scores each response with the rule named by oracle.text_rule; the reward
is r* = oracle.reward_scale * score, and labels come from it like any other oracle's (Bradley-Terry
or deterministic, oracle.label_rule). No model runs: scoring costs microseconds, so a CPU run
spends its time on the policy.

Rules:
- short_first_sentence: a direct answer first. score = -n, where n is the number of words of the
  response's first sentence, capped at `cap` words; an answer whose first sentence has fewer than
  `floor` words (the empty answer included) scores -cap, as low as the longest. The floor keeps
  the cheap ways out ("Yes.", "1.", an empty reply) at the bottom, so the preference pushes
  towards a short, complete opening sentence rather than towards saying nothing.
  A sentence ends at '.', '!' or '?' followed by a space or the end of the text, or at a line
  break; a word is a whitespace-separated piece holding a letter or a digit (so '-' or an emoji
  alone is not a word). A response cut off by task.response_len before its first sentence ends
  counts all its words (at most `cap`).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from pilaf_jax.errors import ConfigError

_SENTENCE_END = re.compile(r'[.!?](?=\s|$)|\n')
_WORDLIKE = re.compile(r'\w')


def first_sentence(text: str) -> str:
  """The text up to (not including) the end of its first sentence; all of it if none ends."""
  text = text.strip()
  end = _SENTENCE_END.search(text)
  return text if end is None else text[:end.start()]


def count_words(text: str) -> int:
  """Whitespace-separated pieces that hold a letter or a digit."""
  return sum(1 for piece in text.split() if _WORDLIKE.search(piece))


def short_first_sentence(response: str, *, floor: int = 3, cap: int = 20) -> float:
  """-(words of the first sentence), at most `cap`; below `floor` words it is -cap (see the module)."""
  n = count_words(first_sentence(response))
  return -float(cap) if n < floor else -float(min(n, cap))


TEXT_RULES: dict[str, Callable[[str], float]] = {
    'short_first_sentence': short_first_sentence,
}


class TextRuleOracle:
  """fn(conversations, responses) -> rewards [n] (numpy float64): scale * rule(response).

  The conversation is not read: these rules judge the reply alone."""

  def __init__(self, rule: str, scale: float):
    if rule not in TEXT_RULES:
      raise ConfigError(f'oracle.text_rule={rule!r} is unknown; allowed: {sorted(TEXT_RULES)}.')
    self.rule, self.scale, self._fn = rule, scale, TEXT_RULES[rule]

  def __call__(self, conversations: Sequence, responses: Sequence[str]) -> np.ndarray:
    del conversations
    return self.scale * np.asarray([self._fn(r) for r in responses], np.float64)


def make_text_rule_oracle(oracle_cfg) -> TextRuleOracle:
  """The oracle of config.oracle with reward='text_rule'."""
  return TextRuleOracle(oracle_cfg.text_rule, oracle_cfg.reward_scale)
