"""The labelling web app (Flask): people answer the loop's pending preference queries.

Labellers see the conversation and the two responses side by side, in an order drawn per
(labeller, query) by a keyed hash, so neither the order nor anything else on the page tells them
which distribution produced a response; they answer with the keyboard. The run owner sees
per-labeller counts, agreement between labellers and with the function oracle, and progress.

Everything lives in the queue (pilaf_jax/labelling/queue.py), in the run's label store file: this
app keeps no state of its own beyond two small secrets beside that file (the owner token and the key
of the display order, both 0600). Every answer is committed by LabelQueue.answer() before the
response is sent.

Security model (see README, "Labelling by people"):
  * every request carries a token: `Authorization: Bearer <token>` (JSON API) or the HttpOnly,
    SameSite=Strict cookie set by the login form; without a valid one the answer is 401 (for a
    browser page, the login form itself, served with status 401);
  * labeller tokens are made by `add-labeller` and stored by the queue only as hashes; the owner
    token is a 0600 file beside the label store (the workdir by default);
  * state-changing requests are POSTs with a JSON body; a browser Origin of another site is refused,
    and (when bound to localhost) so is a Host header that is not localhost (DNS rebinding);
  * all text is escaped (Jinja autoescape on the server, textContent in the page's script), and a
    strict Content-Security-Policy forbids inline scripts and styles.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
import threading
from typing import Callable, Optional
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, redirect, render_template, request

from pilaf_jax.labelling import queue as label_queue

COOKIE = 'pilaf_label_token'
OWNER_TOKEN_FILE = 'label_server_owner_token'
ORDER_KEY_FILE = 'label_server_order_key'
LOCAL_HOSTS = frozenset({'127.0.0.1', 'localhost', '::1'})
# What the page posts (display order) -> what the queue stores (storage order), before any swap.
DISPLAY_CHOICES = ('left', 'right', 'tie', 'skip')
_UNSWAPPED = {'left': 'a', 'right': 'b', 'tie': 'tie', 'skip': 'skip'}
_SWAPPED = {'left': 'b', 'right': 'a', 'tie': 'tie', 'skip': 'skip'}
_MAX_BODY = 4096  # An answer is ~50 bytes; anything far larger is not one.


class BadRequest(ValueError):
  """A malformed request (400 unless told otherwise), reported as {'error': message}."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


# --- secrets beside the label store------------------------------------------------------------------

def _read_or_create_secret(path: str, make: Callable[[], str]) -> str:
  """The secret in `path`; on first use a new one, written to a 0600 temporary file and linked into
  place (atomic: two processes starting at once agree on one secret, and none reads a partial file)."""
  if not os.path.exists(path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.' + os.path.basename(path))
    try:  # mkstemp makes the file 0600.
      with os.fdopen(fd, 'w') as f:
        f.write(make() + '\n')
        f.flush()
        os.fsync(f.fileno())
      try:
        os.link(tmp, path)
      except FileExistsError:
        pass  # Another process made it first: use theirs.
    finally:
      os.unlink(tmp)
  with open(path) as f:
    value = f.read().strip()
  if not value:
    raise RuntimeError(f'{path} is empty; delete it to make a new one.')
  return value


def owner_token(directory: str) -> str:
  """The run owner's token (<directory>/label_server_owner_token, 0600), made on first use."""
  os.makedirs(directory, exist_ok=True)
  return _read_or_create_secret(os.path.join(directory, OWNER_TOKEN_FILE), lambda: secrets.token_urlsafe(32))


def order_key(directory: str) -> bytes:
  """The key of the per-(labeller, query) display order. It must survive restarts: an answer is
  mapped back to storage order with the same key that ordered the page the labeller saw."""
  os.makedirs(directory, exist_ok=True)
  return bytes.fromhex(_read_or_create_secret(os.path.join(directory, ORDER_KEY_FILE),
                                              lambda: secrets.token_hex(32)))


def is_swapped(key: bytes, labeller: str, query_id: int) -> bool:
  """Whether `labeller` sees response b on the left for `query_id`: a keyed hash, so the order is
  fixed per (labeller, query), differs between labellers, and cannot be predicted without the key."""
  digest = hmac.new(key, f'{labeller}\0{int(query_id)}'.encode(), hashlib.sha256).digest()
  return bool(digest[0] & 1)


def storage_choice(display_choice: str, swapped: bool) -> str:
  """'left' / 'right' / 'tie' / 'skip' as the page posts it -> 'a' / 'b' / 'tie' / 'skip'."""
  return (_SWAPPED if swapped else _UNSWAPPED)[display_choice]


# --- the app ----------------------------------------------------------------------------------------

def store_path(workdir: str, configured: str = '') -> str:
  """The run's label store (labelling.store_path when set, else <workdir>/labels.sqlite)."""
  from pilaf_jax import paths
  return paths.label_store_path(workdir, configured)


def open_queue(path: str) -> 'label_queue.LabelQueue':
  """The run's queue, with the settings the run stored; QueueError when the run has not made it."""
  return label_queue.LabelQueue.open_existing(path)


def create_app(workdir: str, *, configured_store: str = '',
               allowed_hosts: Optional[frozenset] = LOCAL_HOSTS) -> Flask:
  """The Flask app serving the label queue of the run in `workdir`.

  configured_store: the run's labelling.store_path ('' = <workdir>/labels.sqlite). The owner token
  and the display-order key live beside the store. allowed_hosts: the host names accepted in the
  Host header (None accepts any: a server bound to a public interface on purpose). The queue is
  opened on the first request that needs it, so the server may start before the run; until the
  run has created its queue, requests get 503.
  """
  path = store_path(workdir, configured_store)
  secrets_dir = os.path.dirname(path)
  owner = owner_token(secrets_dir)
  key = order_key(secrets_dir)
  opened: list = []  # The LabelQueue, once open (it keeps one SQLite connection per thread).
  open_lock = threading.Lock()
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'login.css')) as f:
    login_css = f.read()
  login_css_hash = base64.b64encode(hashlib.sha256(login_css.encode()).digest()).decode()

  def get_queue() -> 'label_queue.LabelQueue':
    if not opened:
      with open_lock:
        if not opened:
          try:
            opened.append(open_queue(path))
          except label_queue.QueueError as e:
            raise BadRequest(f'The labelling queue is not there yet: {e}', 503) from e
    return opened[0]

  app = Flask(__name__)
  app.config.update(MAX_CONTENT_LENGTH=_MAX_BODY)
  app.json.sort_keys = False  # Keep the order the handlers build.
  app.extensions['pilaf_label_server'] = {'store': path, 'queue': get_queue}

  # --- who is asking ---
  def identify() -> None:
    """Sets g.role ('owner' | 'labeller' | None) and g.name from the request's token (the
    Authorization header if there is one, else the cookie)."""
    g.role, g.name = None, None
    header = request.headers.get('Authorization', '')
    token = None
    if header:
      scheme, _, value = header.partition(' ')
      if scheme.lower() != 'bearer' or not value.strip():
        raise BadRequest('The Authorization header must be "Bearer <token>".', 401)
      token = value.strip()
    elif request.cookies.get(COOKIE):
      token = request.cookies[COOKIE]
    if token is None:
      return
    if hmac.compare_digest(token.encode(), owner.encode()):
      g.role, g.name = 'owner', 'owner'
      return
    try:
      g.name = get_queue().labeller_for_token(token)
    except label_queue.UnknownLabeller:
      return
    g.role = 'labeller'

  def wants_html() -> bool:
    return not request.path.startswith('/api/') and request.method == 'GET'

  def login_page(message: str) -> Response:
    return Response(render_template('login.html', message=message, login_css=login_css), 401,
                    mimetype='text/html')

  def unauthorized(message: str):
    if wants_html():
      return login_page(message)
    return jsonify(error=message), 401

  @app.before_request
  def guard():
    host = urlsplit('//' + (request.host or '')).hostname or ''
    if allowed_hosts is not None and host not in allowed_hosts:
      raise BadRequest(f'Host {request.host!r} is not served here (the server is bound to localhost; '
                       'start it with --allow-remote to serve other host names).', 421)
    if request.method == 'POST':
      origin = request.headers.get('Origin')
      if origin and origin != 'null' and urlsplit(origin).netloc != request.host:
        raise BadRequest(f'Cross-site request from {origin} refused.', 403)
    identify()
    if request.endpoint == 'login' and request.method == 'POST':
      return None  # The token is in the form; checked there.
    if g.role is None:
      return unauthorized('A valid labeller token is required: log in with the token that '
                          '`python -m pilaf_jax.label_server add-labeller` printed.')
    return None

  def require(role: str):
    if g.role != role:
      if role == 'owner':
        raise BadRequest('This page is for the run owner (the token in '
                         f'{os.path.join(secrets_dir, OWNER_TOKEN_FILE)}).', 403)
      raise BadRequest('The owner token does not label; add a labeller with `python -m '
                       'pilaf_jax.label_server add-labeller --workdir=... --name=...`.', 403)

  @app.errorhandler(BadRequest)
  def bad_request(e: BadRequest):
    if e.status == 401:
      return unauthorized(str(e))
    return jsonify(error=str(e)), e.status

  @app.errorhandler(label_queue.QueueError)
  def queue_error(e):
    return jsonify(error=str(e), kind=type(e).__name__), e.http_status

  @app.errorhandler(413)
  def too_large(_):
    return jsonify(error=f'Request body too large (at most {_MAX_BODY} bytes).'), 413

  @app.errorhandler(404)
  def not_found(_):
    return jsonify(error=f'No such page: {request.path}'), 404

  @app.errorhandler(405)
  def bad_method(_):
    return jsonify(error=f'{request.method} is not allowed on {request.path}.'), 405

  @app.after_request
  def security_headers(response: Response) -> Response:
    response.headers['Content-Security-Policy'] = (
        f"default-src 'none'; script-src 'self'; style-src 'self' 'sha256-{login_css_hash}'; "
        "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
    response.headers['X-Content-Type-Options'] = 'nosniff'
    response.headers['X-Frame-Options'] = 'DENY'
    response.headers['Referrer-Policy'] = 'no-referrer'
    response.headers['Cache-Control'] = 'no-store'
    return response

  # --- pages ---
  @app.post('/login')
  def login():
    token = (request.form.get('token') or '').strip()
    role = None
    if token and hmac.compare_digest(token.encode(), owner.encode()):
      role = 'owner'
    elif token:
      try:
        get_queue().labeller_for_token(token)
        role = 'labeller'
      except label_queue.UnknownLabeller:
        pass
    if role is None:
      return login_page('Unknown token.')
    response = redirect('/owner' if role == 'owner' else '/', code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite='Strict', secure=request.is_secure, path='/')
    return response

  @app.post('/logout')
  def logout():
    response = redirect('/', code=303)
    response.delete_cookie(COOKIE, path='/', httponly=True, samesite='Strict')
    return response

  @app.get('/')
  def label_page():
    if g.role == 'owner':
      return redirect('/owner', code=303)
    q = get_queue()
    return render_template('label.html', name=g.name, allow_ties=bool(q.allow_ties),
                           progress=_progress(q, g.name))

  @app.get('/owner')
  def owner_page():
    require('owner')
    q = get_queue()
    report = q.labeller_report()
    return render_template('owner.html', progress=q.progress(), report=report,
                           answers_per_query=q.answers_per_query, allow_ties=bool(q.allow_ties))

  # --- JSON API ---
  def _progress(q, name: Optional[str]) -> dict:
    progress = dict(q.progress())
    if name is not None:
      progress['mine'] = q.answer_count(name)
    return progress

  @app.post('/api/next')
  def next_query():
    require('labeller')
    q = get_queue()
    query = q.next_query(g.name)
    out = {'query': None, 'allow_ties': bool(q.allow_ties)}
    if query is not None:
      # Only the text and the id: never the sources, sampler, batch or storage order.
      left, right = query.response_a_text, query.response_b_text
      if is_swapped(key, g.name, query.query_id):
        left, right = right, left
      out['query'] = {'query_id': query.query_id, 'prompt': query.prompt_text, 'left': left, 'right': right}
    return jsonify(out)

  @app.post('/api/answer')
  def answer():
    require('labeller')
    query_id, choice = _parse_answer()
    q = get_queue()
    swapped = is_swapped(key, g.name, query_id)
    result = q.answer(query_id, g.name, storage_choice(choice, swapped))  # Committed on return.
    # No progress figures here: counting the whole queue on every answer would cost more than the
    # answer itself on a big queue; the page asks /api/progress every few seconds instead.
    return jsonify(ok=True, query_id=query_id, choice=choice, resolved=bool(result['resolved']))

  @app.get('/api/progress')
  def progress():
    q = get_queue()
    return jsonify(_progress(q, g.name if g.role == 'labeller' else None))

  @app.get('/api/report')
  def report():
    require('owner')
    q = get_queue()
    return jsonify(progress=q.progress(), **q.labeller_report())

  return app


def _parse_answer() -> tuple[int, str]:
  """(query_id, display choice) from the JSON body, or a 4xx that says what is wrong."""
  if not request.is_json:
    raise BadRequest('Send the answer as JSON (Content-Type: application/json): '
                     '{"query_id": <int>, "choice": "left" | "right" | "tie" | "skip"}.', 415)
  body = request.get_json(silent=True)
  if not isinstance(body, dict):
    raise BadRequest('The body is not a JSON object; expected {"query_id": <int>, "choice": '
                     '"left" | "right" | "tie" | "skip"}.')
  extra = sorted(set(body) - {'query_id', 'choice'})
  if extra:
    raise BadRequest(f'Unexpected fields {extra}; an answer has exactly "query_id" and "choice".')
  query_id, choice = body.get('query_id'), body.get('choice')
  if not isinstance(query_id, int) or isinstance(query_id, bool) or query_id < 0:
    raise BadRequest(f'"query_id" must be a non-negative integer, got {query_id!r}.')
  if choice not in DISPLAY_CHOICES:
    raise BadRequest(f'"choice" must be one of {list(DISPLAY_CHOICES)}, got {choice!r}.')
  return query_id, choice
