"""The labelling web app (Flask): people answer the loop's pending preference queries.

Labellers see the conversation and the two responses side by side, in an order drawn per
(labeller, query) by a keyed hash, so neither the order nor anything else on the page tells them
which distribution produced a response; they answer with the keyboard. The run owner sees
per-labeller counts, agreement between labellers and with the function oracle, and progress.

Everything lives in the queue (pilaf_jax/labelling/queue.py), in the run's label store file: this
app keeps no state of its own beyond two small secrets beside that file (the owner token and the key
of the display order, both 0600). Every answer is committed by LabelQueue.answer() before the
response is sent. Beside this module: secret_files.py (the owner token, the display-order key and
the order itself) and request_checks.py (what a request must look like before it reaches the queue).

Security model (see README, "Labelling by people"):
  * every request carries a token: `Authorization: Bearer <token>` (JSON API) or the HttpOnly,
    SameSite=Strict cookie set by the login form; without a valid one the answer is 401 (for a
    browser page, the login form itself, served with status 401);
  * labeller tokens are made by `add-labeller` and stored by the queue only as hashes; the owner
    token is a 0600 file beside the label store (the workdir by default);
  * state-changing requests are POSTs with a JSON body (the login form aside); a browser request
    whose Origin is not exactly this server's scheme, host and port (`null` included) or whose
    Sec-Fetch-Site says another site is refused (CSRF, login CSRF), and (when bound to localhost) so
    is a Host header that is not localhost (DNS rebinding);
  * every error is a JSON body {'error': message} with a 4xx/5xx status (an unexpected exception is
    a 500 whose traceback goes to the server's log, not to the client); no server path is shown;
    bodies are capped (4 KiB here, 16 KiB in the WSGI server before any authentication, see
    wsgi_server.py), and so are JSON nesting and query ids;
  * behind a TLS proxy (`--trusted-proxy`), the cookie is marked Secure;
  * all text is escaped (Jinja autoescape on the server, textContent in the page's script), and a
    strict Content-Security-Policy forbids inline scripts and styles.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import threading
from typing import Optional
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, redirect, render_template, request
from werkzeug.exceptions import HTTPException

from pilaf_jax.label_server.request_checks import (MAX_BODY, BadRequest, json_object, origin_matches,  # noqa: F401
                                                   parse_answer, query_id_of, short)
from pilaf_jax.label_server.secret_files import (ORDER_KEY_FILE, OWNER_TOKEN_FILE, is_swapped,  # noqa: F401
                                                 order_key, owner_token, storage_choice)
from pilaf_jax.labelling import queue as label_queue

COOKIE = 'pilaf_label_token'
LOCAL_HOSTS = frozenset({'127.0.0.1', 'localhost', '::1'})
_SAFE_METHODS = frozenset({'GET', 'HEAD', 'OPTIONS'})
_HTTP_MESSAGES = {
    404: 'No such page.',
    405: '{method} is not allowed here.',
    413: f'Request body too large (at most {MAX_BODY} bytes).',
}


# --- the app ----------------------------------------------------------------------------------------

def store_path(workdir: str, configured: str = '') -> str:
  """The run's label store (labelling.store_path when set, else <workdir>/labels.sqlite)."""
  from pilaf_jax import paths
  return paths.label_store_path(workdir, configured)


def open_queue(path: str) -> 'label_queue.LabelQueue':
  """The run's queue, with the settings the run stored; QueueError when the run has not made it."""
  return label_queue.LabelQueue.open_existing(path)


def create_app(workdir: str, *, configured_store: str = '',
               allowed_hosts: Optional[frozenset] = LOCAL_HOSTS, secure_cookie: bool = False) -> Flask:
  """The Flask app serving the label queue of the run in `workdir`.

  configured_store: the run's labelling.store_path ('' = <workdir>/labels.sqlite). The owner token
  and the display-order key live beside the store. allowed_hosts: the host names accepted in the
  Host header (None accepts any: a server bound to a public interface on purpose). secure_cookie:
  mark the login cookie Secure whatever the request's scheme (behind a TLS proxy). The queue is
  opened on the first request that needs it, so the server may start before the run; until the
  run has created its queue, requests get 503.
  """
  path = store_path(workdir, configured_store)
  secrets_dir = os.path.dirname(path)
  # Directories never shown to a client (an error message that names one is rewritten).
  hidden_dirs = sorted({d for d in (os.path.abspath(secrets_dir), os.path.abspath(workdir), secrets_dir, workdir)
                        if d and d not in ('.', '/')}, key=len, reverse=True)

  def scrub(message: str) -> str:
    for d in hidden_dirs:
      message = message.replace(d, '<run directory>')
    return message

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
            raise BadRequest('The labelling queue is not there yet: start the run '
                             '(python -m pilaf_jax.main) first.', 503) from e
    return opened[0]

  app = Flask(__name__)
  app.config.update(MAX_CONTENT_LENGTH=MAX_BODY)
  app.json.sort_keys = False  # Keep the order the handlers build.
  app.url_map.merge_slashes = False  # '//x' is no page: a 404, not a redirect to '/x'.
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
    return request.method == 'GET' and request.path in ('/', '/owner')

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
    if request.method not in _SAFE_METHODS:
      origin = request.headers.get('Origin')
      if origin is not None and not origin_matches(origin, request.scheme, request.host):
        raise BadRequest(f'Cross-site request from {origin[:100]!r} refused (this server is '
                         f'{request.scheme}://{request.host}; behind a TLS proxy, start it with '
                         '--trusted-proxy and have the proxy send X-Forwarded-Proto and Host).', 403)
      if request.headers.get('Sec-Fetch-Site', '').lower() in ('cross-site', 'same-site'):
        raise BadRequest('Cross-site request refused (Sec-Fetch-Site).', 403)
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
        raise BadRequest('This page is for the run owner (the token that `python -m '
                         'pilaf_jax.label_server owner-token --workdir=...` prints).', 403)
      raise BadRequest('The owner token does not label; add a labeller with `python -m '
                       'pilaf_jax.label_server add-labeller --workdir=... --name=...`.', 403)

  @app.errorhandler(BadRequest)
  def bad_request(e: BadRequest):
    if e.status == 401:
      return unauthorized(scrub(str(e)))
    return jsonify(error=scrub(str(e))), e.status

  @app.errorhandler(label_queue.QueueError)
  def queue_error(e):
    return jsonify(error=scrub(str(e)), kind=type(e).__name__), e.http_status

  @app.errorhandler(HTTPException)
  def http_error(e: HTTPException):
    if e.code is None or e.code < 400:  # Routing redirects (a missing trailing slash).
      return e
    message = _HTTP_MESSAGES.get(e.code, f'{e.name}.').format(method=request.method[:20])
    response = jsonify(error=message)
    if e.code == 405 and e.valid_methods:
      response.headers['Allow'] = ', '.join(e.valid_methods)
    return response, e.code

  @app.errorhandler(Exception)
  def internal_error(e: Exception):
    if isinstance(e, sqlite3.OperationalError) and 'locked' in str(e):
      return jsonify(error='The label store is busy; try again in a moment.'), 503
    # The traceback goes to the server's log; the client learns nothing about the server.
    app.logger.exception('Unexpected error on %s %s', request.method, request.path[:200])
    return jsonify(error='Internal error; the run owner finds the details in the server log.'), 500

  @app.after_request
  def security_headers(response: Response) -> Response:
    response.headers['Content-Security-Policy'] = (
        f"default-src 'none'; script-src 'self'; style-src 'self' 'sha256-{login_css_hash}'; "
        "img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
    response.headers['X-Content-Type-Options'] = 'nosniff'
    response.headers['X-Frame-Options'] = 'DENY'
    # Not 'no-referrer': under it a browser sends `Origin: null` with the page's own POSTs (form and
    # fetch alike), which the origin check must refuse. 'same-origin' sends nothing to other sites.
    response.headers['Referrer-Policy'] = 'same-origin'
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
    if role is None:  # The form again for a browser; JSON for anything else.
      return login_page('Unknown token.') if request.accept_mimetypes.accept_html else (
          jsonify(error='Unknown token.'), 401)
    response = redirect('/owner' if role == 'owner' else '/', code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite='Strict',
                        secure=secure_cookie or request.is_secure, path='/')
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
    people = [n for n in q.labellers() if not n.startswith(label_queue.ORACLE_PREFIX)]
    return render_template('owner.html', progress=q.progress(), report=report, waiting=q.waiting(limit=20),
                           people=people, answers_per_query=q.answers_per_query,
                           allow_ties=bool(q.allow_ties))

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
      out['offered_again'] = q.skipped(query.query_id, g.name)  # A skip nobody else may answer.
    return jsonify(out)

  @app.post('/api/answer')
  def answer():
    require('labeller')
    query_id, choice = parse_answer()
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

  @app.get('/api/waiting')
  def waiting():
    require('owner')
    return jsonify(waiting=get_queue().waiting(limit=200))

  @app.post('/api/drop')
  def drop():
    """The owner stops waiting for a query: it is resolved from the answers it has (see LabelQueue.drop)."""
    require('owner')
    body = json_object('{"query_id": <int>}')
    if set(body) != {'query_id'}:
      raise BadRequest('Send exactly {"query_id": <int>}.')
    return jsonify(ok=True, **get_queue().drop(query_id_of(body)))

  @app.post('/api/reassign')
  def reassign():
    """The owner hands a query to a labeller (they get it on their next fetch)."""
    require('owner')
    body = json_object('{"query_id": <int>, "labeller": <name>}')
    if set(body) != {'query_id', 'labeller'} or not isinstance(body['labeller'], str):
      raise BadRequest('Send exactly {"query_id": <int>, "labeller": <name>}.')
    query_id = query_id_of(body)
    try:
      get_queue().reassign(query_id, body['labeller'])
    except label_queue.UnknownLabeller as e:  # Not a 401: the owner is logged in.
      raise BadRequest(f'No labeller {short(body["labeller"])}.', 400) from e
    return jsonify(ok=True, query_id=query_id, labeller=body['labeller'])

  return app
