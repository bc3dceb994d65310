"""A GGUF file's tokenizer, built from its own metadata with the `tokenizers` library (no PyTorch).

A GGUF stores its vocabulary (`tokenizer.ggml.tokens`, `token_type`, `merges`), its special token ids
and the name of llama.cpp's pre-tokenizer (`tokenizer.ggml.pre`) as metadata. For byte-level BPE
vocabularies (`tokenizer.ggml.model = 'gpt2'`: SmolLM2, Llama 3, GPT-2-style models) this builds the
same `tokenizers.Tokenizer` that transformers' GGUF path builds, without its reader (which imports
torch), and wraps it in a transformers fast tokenizer for the chat template:

- BPE over the file's tokens and merges (tokens outside the byte alphabet re-spelled byte by byte);
- tokens typed CONTROL (3) as special added tokens, USER_DEFINED (4) as plain added tokens;
- the pre-tokenizer llama.cpp applies for the file's `tokenizer.ggml.pre`, ByteLevel decoding.

One deliberate difference: for `smollm` (and llama.cpp's other StarCoder-style types) llama.cpp, and
SmolLM2's own tokenizer.json, first split every digit off on its own (the `\\p{N}` regex, Digits in
tokenizers), and this does too; transformers' GGUF path skips that split, which only shows when
whitespace runs into a digit ("a\\n\\n1." gives 'ĊĊ', '1' here and in llama.cpp, 'Ċ', 'Ċ', '1' there).

Other tokenizer types (sentencepiece 'llama', unknown pre-tokenizers) fall back to transformers'
GGUF path, which needs torch installed.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from pilaf_jax.model.gguf_file import GGUFFile, read_gguf_file

CONTROL, USER_DEFINED = 3, 4

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), grouped as llama.cpp groups them.
_GPT2_TYPES = ('gpt2', 'mpt', 'olmo', 'jais', 'trillion')
_DIGITS_THEN_GPT2_TYPES = ('smollm', 'starcoder', 'refact', 'command-r', 'codeshell', 'exaone',
                           'minerva')
_LLAMA3_TYPES = ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0',
                 'lfm2', 'dbrx', 'smaug-bpe')
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE_TOKENIZERS = _GPT2_TYPES + _DIGITS_THEN_GPT2_TYPES + _LLAMA3_TYPES


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map: printable Latin-1 maps to itself, the rest above 255."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  chars = list(keep)
  extra = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(keep, map(chr, chars)))


def can_build(file: GGUFFile) -> bool:
  """Whether build_tokenizer handles this file (byte-level BPE with a known pre-tokenizer)."""
  return (file.get('tokenizer.ggml.model') == 'gpt2' and
          file.get('tokenizer.ggml.pre') in SUPPORTED_PRE_TOKENIZERS and
          file.get('tokenizer.ggml.tokens') is not None and
          file.get('tokenizer.ggml.merges') is not None)


def _pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers
  if pre in _GPT2_TYPES:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGITS_THEN_GPT2_TYPES:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r'\p{N}'), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(file: GGUFFile):
  """The file's tokenizer as a `tokenizers.Tokenizer` (byte-level BPE files only, see can_build)."""
  from tokenizers import AddedToken, Tokenizer, decoders
  from tokenizers.models import BPE
  if not can_build(file):
    raise ValueError(f'{file.path}: tokenizer.ggml.model={file.get("tokenizer.ggml.model")!r}, '
                     f'tokenizer.ggml.pre={file.get("tokenizer.ggml.pre")!r}; expected byte-level '
                     f'BPE ("gpt2") with one of {SUPPORTED_PRE_TOKENIZERS}.')
  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  tokens = file.get('tokenizer.ggml.tokens')
  spelled = [t if set(t) <= letters else ''.join(alphabet[b] for b in t.encode('utf-8'))
             for t in tokens]
  vocab = {t: i for i, t in enumerate(spelled)}
  merges = [tuple(m.split(' ')) for m in file.get('tokenizer.ggml.merges')]
  tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix='',
                            end_of_word_suffix='', fuse_unk=False))
  tokenizer.pre_tokenizer = _pre_tokenizer(file.get('tokenizer.ggml.pre'))
  tokenizer.decoder = decoders.ByteLevel()
  types = file.get('tokenizer.ggml.token_type') or ()
  # A CONTROL token spelled outside the byte alphabet is a converter's mislabel (adding it would
  # grow the vocabulary past the model's), so it is left as an ordinary token.
  tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types)
                                if kind == CONTROL and set(t) <= letters])
  tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
  return tokenizer


def _token(file: GGUFFile, key: str) -> str | None:
  index = file.get(f'tokenizer.ggml.{key}')
  tokens = file.get('tokenizer.ggml.tokens')
  return None if index is None or not 0 <= index < len(tokens) else tokens[index]


def load_gguf_tokenizer(path: str | os.PathLike) -> Any:
  """The tokenizer embedded in a .gguf file, as a transformers fast tokenizer with the chat template.

  Byte-level BPE files are built here from the metadata (one parse of the file, shared with the
  model loader; no torch); other files go through transformers' GGUF reader (needs torch).
  """
  import transformers
  path = os.path.abspath(os.fspath(path))
  file = read_gguf_file(path)
  if not can_build(file):
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
  kwargs = dict(bos_token=_token(file, 'bos_token_id'), eos_token=_token(file, 'eos_token_id'),
                unk_token=_token(file, 'unknown_token_id'), pad_token=_token(file, 'padding_token_id'),
                add_bos_token=bool(file.get('tokenizer.ggml.add_bos_token', False)))
  if file.get('tokenizer.ggml.add_eos_token') is not None:
    kwargs['add_eos_token'] = bool(file.get('tokenizer.ggml.add_eos_token'))
  if file.get('tokenizer.chat_template') is not None:
    kwargs['chat_template'] = file.get('tokenizer.chat_template')
  return transformers.PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(file),
                                              name_or_path=path, **kwargs)
