"""What `python -m pilaf_jax.main --help_config` prints: every config field, its default, its meaning.

The meanings are the comments of pilaf_jax/default_config.py (the one place fields are documented):
a field's trailing comment, else the comment lines right above it. Each is shown as its first whole
sentence, never cut mid-sentence.
"""
from __future__ import annotations

import ast
import io
import os
import tokenize
from typing import Any

DEFAULT_CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default_config.py')
_ABBREVIATIONS = ('e.g', 'i.e', 'etc', 'al', 'vs', 'cf')


def first_sentence(text: str) -> str:
  """The first sentence of `text` (whitespace collapsed): up to the first '.', '?' or '!' that is
  followed by a space or the end, outside parentheses and not ending an abbreviation."""
  text = ' '.join(text.split())
  depth = 0
  for i, ch in enumerate(text):
    if ch in '([':
      depth += 1
    elif ch in ')]':
      depth = max(depth - 1, 0)
    elif ch in '.?!' and depth == 0 and (i + 1 == len(text) or text[i + 1] == ' '):
      word = text[:i].rsplit(' ', 1)[-1].lstrip('(')
      if ch == '.' and word.lower() in _ABBREVIATIONS:
        continue
      return text[:i + 1]
  return text


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
  """(line -> comment text, the lines that hold only a comment)."""
  comments, code_lines = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip('#').strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      code_lines.update(range(tok.start[0], tok.end[0] + 1))
  return comments, set(comments) - code_lines


def _meaning(line: int, comments: dict[int, str], comment_only: set[int]) -> str:
  """The trailing comment of `line`, else the block of comment-only lines right above it."""
  if line in comments and line not in comment_only:
    return comments[line]
  above, prev = [], line - 1
  while prev in comment_only:
    above.insert(0, comments[prev])
    prev -= 1
  return ' '.join(above)


def field_lines(source: str) -> dict[str, int]:
  """'section.field' (or 'field', or 'section.sub.field') -> the line that sets it in get_config()."""
  tree = ast.parse(source)
  get_config = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == 'get_config')
  lines = {}

  def keywords(value):  # ConfigDict(dict(a=..., b=...)) -> its keywords, else None.
    if isinstance(value, ast.Call) and value.args and isinstance(value.args[0], ast.Call):
      return value.args[0].keywords
    return None

  def add(prefix: str, fields) -> None:
    for k in fields:
      inner = keywords(k.value)
      if inner is None:
        lines[f'{prefix}{k.arg}'] = k.value.lineno
      else:
        add(f'{prefix}{k.arg}.', inner)

  for node in ast.walk(get_config):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and
            isinstance(node.targets[0], ast.Attribute)):
      continue
    name, fields = node.targets[0].attr, keywords(node.value)
    if fields is None:
      lines[name] = node.lineno
    else:
      add(f'{name}.', fields)
  return lines


def field_docs(path: str = DEFAULT_CONFIG_PATH) -> list[tuple[str, Any, str]]:
  """(field, default, one-sentence meaning) for every field of the default config, in file order."""
  from pilaf_jax import default_config
  with open(path, encoding='utf-8') as f:
    source = f.read()
  comments, comment_only = _comments(source)
  flat = _flatten(default_config.get_config().to_dict())
  lines = field_lines(source)
  out = []
  for name, line in sorted(lines.items(), key=lambda item: item[1]):
    if name in flat:
      out.append((name, flat[name], first_sentence(_meaning(line, comments, comment_only))))
  missing = sorted(set(flat) - set(lines))
  out += [(name, flat[name], '') for name in missing]  # Set some other way: no comment to show.
  return out


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def format_config_help() -> str:
  """The text of --help_config: one line per field, `name = default  meaning`."""
  docs = field_docs()
  entries = [(f'{name} = {default!r}', meaning) for name, default, meaning in docs]
  width = min(max(len(e) for e, _ in entries), 44)
  lines = ['Config fields (override any with --config.<field>=<value>; defaults from '
           'pilaf_jax/default_config.py, which configs/*.py start from):', '']
  section = None
  for (entry, meaning), (name, _, _) in zip(entries, docs):
    head = name.split('.')[0] if '.' in name else ''
    if head != section:
      section = head
      if head:
        lines.append('')
    pad = ' ' * max(width - len(entry), 0)
    lines.append(f'  {entry}{pad}  {meaning}'.rstrip())
  return '\n'.join(lines)
