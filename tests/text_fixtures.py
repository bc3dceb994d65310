"""Tiny text fixtures built offline: a word-level chat tokenizer saved in the HF layout."""
from __future__ import annotations

import os

# ChatML, as many instruct models use it; BOS opens the conversation.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ('<pad>', '<unk>', '<s>', '<|im_start|>', '<|im_end|>')
SENTENCES = (
    'what is the capital of france ?',
    'the capital of france is paris .',
    'how do i boil an egg ?',
    'put the egg in boiling water for nine minutes .',
    'tell me a short story about a cat .',
    'system user assistant you are a helpful assistant .',
    'one two three four five six seven eight nine ten',
)


def make_tiny_chat_tokenizer(directory: str | os.PathLike,
                             chat_template: str | None = CHATML_TEMPLATE, extra_words=()) -> str:
  """Saves a word-level tokenizer (whitespace-split words of SENTENCES) to `directory`.

  Ids: the SPECIAL_TOKENS first (pad 0, unk 1, bos 2, <|im_start|> 3, eos <|im_end|> 4), then the
  words in sorted order. Words are split on whitespace only, so text made of known words round-trips
  exactly through encode/decode. chat_template=None saves a tokenizer without one. extra_words get
  the ids after those (so the ids above do not move). Returns the path.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  import transformers

  words = sorted({w for s in SENTENCES for w in s.split()})
  words += [w for w in extra_words if w not in words]
  vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + words)}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token='<unk>'))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.decoder = decoders.WordPiece(prefix='##', cleanup=False)  # Joins words with spaces.
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token='<pad>', unk_token='<unk>', bos_token='<s>',
      eos_token='<|im_end|>', additional_special_tokens=['<|im_start|>'])
  if chat_template is not None:
    tokenizer.chat_template = chat_template
  path = os.fspath(directory)
  tokenizer.save_pretrained(path)
  return path
