"""What the label server checks in a request before it reaches the queue: the Origin (CSRF), the
JSON body's shape and nesting, the query id and the answer; each refusal is a BadRequest that says
what to send instead."""
from __future__ import annotations

import json
from urllib.parse import urlsplit

from flask import request

from pilaf_jax.label_server.secret_files import DISPLAY_CHOICES
from pilaf_jax.labelling.queue_records import MAX_QUERY_ID

MAX_BODY = 4096  # An answer is ~50 bytes; anything far larger is not one.
MAX_JSON_DEPTH = 4  # An answer is one flat object.
_DEFAULT_PORTS = {'http': 80, 'https': 443}


class BadRequest(ValueError):
  """A malformed request (400 unless told otherwise), reported as {'error': message}."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def json_depth(raw: bytes) -> int:
  """How deeply the JSON text nests arrays and objects (brackets inside strings do not count)."""
  depth = deepest = 0
  in_string = escaped = False
  for byte in raw:
    if in_string:
      if escaped:
        escaped = False
      elif byte == 0x5C:  # backslash
        escaped = True
      elif byte == 0x22:  # quote
        in_string = False
    elif byte == 0x22:
      in_string = True
    elif byte in (0x5B, 0x7B):  # [ {
      depth += 1
      deepest = max(deepest, depth)
    elif byte in (0x5D, 0x7D):
      depth -= 1
  return deepest


def origin_matches(origin: str, scheme: str, host: str) -> bool:
  """Whether a browser's Origin header names exactly this server: scheme, host name and port
  (default ports filled in). 'null' (sandboxed frames, data: URLs, some redirects) never does."""
  try:
    theirs, ours = urlsplit(origin), urlsplit(f'{scheme}://{host}')
    their_port = theirs.port or _DEFAULT_PORTS.get(theirs.scheme.lower())
    our_port = ours.port or _DEFAULT_PORTS.get(scheme)
  except ValueError:  # A malformed port.
    return False
  return (theirs.scheme.lower() == scheme and theirs.hostname is not None and theirs.hostname == ours.hostname
          and their_port is not None and their_port == our_port and theirs.username is None
          and not theirs.path and not theirs.query)


def json_object(expected: str) -> dict:
  """The request's JSON object body, or a 4xx that says what is wrong (`expected` shows the shape).
  The nesting is checked before parsing: a deep array would exhaust Python's recursion limit."""
  if not request.is_json:
    raise BadRequest(f'Send JSON (Content-Type: application/json): {expected}.', 415)
  raw = request.get_data(cache=True)  # At most MAX_CONTENT_LENGTH bytes, else 413.
  if json_depth(raw) > MAX_JSON_DEPTH:
    raise BadRequest(f'The body nests deeper than {MAX_JSON_DEPTH} levels; expected {expected}.')
  try:
    body = json.loads(raw)
  except ValueError:  # Not JSON, not UTF-8, or a number beyond Python's limits.
    body = None
  if not isinstance(body, dict):
    raise BadRequest(f'The body is not a JSON object; expected {expected}.')
  return body


def short(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def query_id_of(body: dict) -> int:
  query_id = body.get('query_id')
  if (not isinstance(query_id, int) or isinstance(query_id, bool)
      or not 0 <= query_id <= MAX_QUERY_ID):
    raise BadRequest(f'"query_id" must be an integer in [0, 2**63), got {short(query_id)}.')
  return query_id


_ANSWER_SHAPE = '{"query_id": <int>, "choice": "left" | "right" | "tie" | "skip"}'


def parse_answer() -> tuple[int, str]:
  """(query_id, display choice) from the JSON body, or a 4xx that says what is wrong."""
  body = json_object(_ANSWER_SHAPE)
  extra = sorted(set(body) - {'query_id', 'choice'})
  if extra:
    raise BadRequest(f'Unexpected fields {short(extra)}; an answer has exactly "query_id" and "choice".')
  query_id, choice = query_id_of(body), body.get('choice')
  if choice not in DISPLAY_CHOICES:
    raise BadRequest(f'"choice" must be one of {list(DISPLAY_CHOICES)}, got {short(choice)}.')
  return query_id, choice
