"""The labelling server against a hostile client: a list of bad requests sent over real sockets to the
real WSGI server (waitress with the limits of wsgi_server.py) in front of the app. Every one must get
a 4xx with a JSON {'error': ...} body (never a 500, never HTML, never a server path), change nothing
in the store, and leave the server serving. Also: the exact origin check, the trusted-proxy option,
the exact local-host check, an unexpected exception as a JSON 500, and 0600 store files."""
from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import sys
import threading

import pytest

from conftest import queue_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pilaf_jax.label_server import __main__ as server_main  # noqa: E402
from pilaf_jax.label_server import app as server_app  # noqa: E402
from pilaf_jax.label_server import wsgi_server  # noqa: E402
from pilaf_jax.labelling.queue import LabelQueue  # noqa: E402


def queries(n: int) -> list[dict]:
  return [dict(row=i, prompt_id=i, prompt_text=f'Prompt {i}', response_a_text=f'a {i}', response_b_text=f'b {i}',
               source_a=0, source_b=1) for i in range(n)]


class Server:
  """A run's queue (k=2, alice and bob) served by waitress on a free localhost port, in a thread."""

  def __init__(self, workdir: str, trusted_proxy=None, secure_cookie=False):
    self.workdir = workdir
    self.path = os.path.join(workdir, 'labels.sqlite')
    self.queue = LabelQueue(self.path, answers_per_query=2)
    self.queue.enqueue('online/000000', 0, 'pilaf', queries(4))
    self.tokens = {name: self.queue.add_labeller(name) for name in ('alice', 'bob')}
    self.app = server_app.create_app(workdir, secure_cookie=secure_cookie)
    self.owner = server_app.owner_token(workdir)
    self.server = wsgi_server.create_server(self.app, '127.0.0.1', 0, threads=2, trusted_proxy=trusted_proxy)
    self.port = int(self.server.effective_port)
    self.origin = f'http://127.0.0.1:{self.port}'
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._serve, daemon=True)
    self.thread.start()

  def _serve(self):  # waitress's run(), one poll at a time, so that close() can stop it cleanly.
    while not self.stop.is_set():
      self.server.asyncore.loop(timeout=0.05, map=self.server._map, count=1)

  def close(self):
    self.stop.set()
    self.thread.join()
    for channel in list(self.server._map.values()):
      channel.close()
    self.server.task_dispatcher.shutdown()
    self.queue.close()

  def raw(self, data: bytes) -> tuple[int, dict, bytes]:
    """Sends bytes as they are; returns (status, headers, body) of the response."""
    with socket.create_connection(('127.0.0.1', self.port), timeout=10) as sock:
      try:
        sock.sendall(data)
      except (BrokenPipeError, ConnectionResetError):
        pass  # The server answered and closed before reading everything (a refused huge body).
      response = http.client.HTTPResponse(sock)
      response.begin()
      return response.status, dict(response.getheaders()), response.read()

  def request(self, method: str, path: str, headers=None, body: bytes = b'', host=None):
    headers = dict(headers or {})
    lines = [f'{method} {path} HTTP/1.1', f'Host: {host or f"127.0.0.1:{self.port}"}', 'Connection: close']
    if body or method in ('POST', 'PUT', 'PATCH'):
      headers.setdefault('Content-Length', str(len(body)))
    lines += [f'{k}: {v}' for k, v in headers.items()]
    return self.raw(('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1') + body)

  def auth(self, name='alice'):
    return {'Authorization': f'Bearer {self.tokens.get(name, self.owner if name == "owner" else name)}'}

  def state(self):
    return queue_tables(self.path)


@pytest.fixture
def server(tmp_path):
  s = Server(str(tmp_path))
  yield s
  s.close()


JSON = {'Content-Type': 'application/json'}
FORM = {'Content-Type': 'application/x-www-form-urlencoded'}


def answer_body(query_id, choice='left') -> bytes:
  return json.dumps({'query_id': query_id, 'choice': choice}).encode()


def hostile_requests(s: Server, qid: int) -> list[tuple[str, callable, object]]:
  """(name, request, expected status or None for any 4xx). qid: a query assigned to alice."""
  alice, bob, owner = s.auth('alice'), s.auth('bob'), s.auth('owner')
  login = f'token={s.tokens["alice"]}'.encode()
  other_port = s.port + 1 if s.port < 65535 else s.port - 1
  cases = [
      # Login CSRF and cross-site requests: the origin must be exactly this server's.
      ('login, Origin null', lambda: s.request('POST', '/login', {**FORM, 'Origin': 'null'}, login), 403),
      ('login, foreign scheme', lambda: s.request('POST', '/login', {**FORM, 'Origin': f'https://127.0.0.1:{s.port}'},
                                                  login), 403),
      ('login, foreign port', lambda: s.request('POST', '/login', {**FORM, 'Origin': f'http://127.0.0.1:{other_port}'},
                                                login), 403),
      ('login, default port', lambda: s.request('POST', '/login', {**FORM, 'Origin': 'http://127.0.0.1'}, login), 403),
      ('login, foreign host', lambda: s.request('POST', '/login', {**FORM, 'Origin': 'http://evil.example'}, login), 403),
      ('login, localhost for 127.0.0.1', lambda: s.request('POST', '/login', {**FORM, 'Origin': f'http://localhost:{s.port}'},
                                                           login), 403),
      ('login, port suffix trick', lambda: s.request('POST', '/login', {**FORM, 'Origin': f'{s.origin}.evil.example'},
                                                     login), 403),
      ('login, bad port', lambda: s.request('POST', '/login', {**FORM, 'Origin': 'http://127.0.0.1:99999'}, login), 403),
      ('login, Sec-Fetch-Site cross-site', lambda: s.request('POST', '/login', {**FORM, 'Sec-Fetch-Site': 'cross-site'},
                                                             login), 403),
      ('login, Sec-Fetch-Site same-site', lambda: s.request('POST', '/login', {**FORM, 'Sec-Fetch-Site': 'same-site'},
                                                            login), 403),
      ('answer, Origin null', lambda: s.request('POST', '/api/answer', {**alice, **JSON, 'Origin': 'null'},
                                                answer_body(qid)), 403),
      ('logout, Origin null', lambda: s.request('POST', '/logout', {'Origin': 'null'}), 403),
      ('drop, foreign origin', lambda: s.request('POST', '/api/drop', {**owner, **JSON, 'Origin': 'http://evil.example'},
                                                 b'{"query_id": 1}'), 403),
      ('login, wrong token', lambda: s.request('POST', '/login', FORM, b'token=nope'), 401),
      ('login, 3 KiB token', lambda: s.request('POST', '/login', FORM, b'token=' + b'x' * 3000), 401),
      # Bodies: huge (refused before the app reads it, authenticated or not), chunked, nested.
      ('1 GiB Content-Length, no token', lambda: s.request('POST', '/api/answer', {**JSON, 'Content-Length': str(2**30)}),
       413),
      ('1 GiB Content-Length', lambda: s.request('POST', '/api/answer', {**alice, **JSON, 'Content-Length': str(2**30)}),
       413),
      ('64 KiB body', lambda: s.request('POST', '/api/answer', {**alice, **JSON}, b' ' * 65536), 413),
      ('10 KiB body', lambda: s.request('POST', '/api/answer', {**alice, **JSON}, answer_body(qid, 'left' + ' ' * 10000)),
       413),
      ('64 KiB chunked body', lambda: s.request('POST', '/api/answer', {**alice, **JSON, 'Transfer-Encoding': 'chunked'},
                                                b'10000\r\n' + b' ' * 65536 + b'\r\n0\r\n\r\n'), 413),
      ('2,000-deep JSON array', lambda: s.request('POST', '/api/answer', {**alice, **JSON}, b'[' * 2000 + b']' * 2000),
       400),
      ('600-deep JSON object', lambda: s.request('POST', '/api/answer', {**alice, **JSON},
                                                 b'{"a":' * 600 + b'1' + b'}' * 600), 400),
      ('nested query_id', lambda: s.request('POST', '/api/answer', {**alice, **JSON},
                                            b'{"query_id": [[[[[1]]]]], "choice": "left"}'), 400),
      ('brackets in strings are fine', lambda: s.request('POST', '/api/answer', {**alice, **JSON},
                                                         json.dumps({'query_id': qid, 'choice': '[' * 500}).encode()), 400),
      ('4,000-digit number', lambda: s.request('POST', '/api/answer', {**alice, **JSON},
                                               b'{"query_id": ' + b'9' * 4000 + b', "choice": "left"}'), 400),
      ('5,000-digit number', lambda: s.request('POST', '/api/answer', {**alice, **JSON},
                                               b'{"query_id": ' + b'9' * 5000 + b', "choice": "left"}'), 413),
      ('not UTF-8', lambda: s.request('POST', '/api/answer', {**alice, **JSON}, b'{"query_id": 1, "choice": "\xff\xfe"}'), 400),
      ('NaN', lambda: s.request('POST', '/api/answer', {**alice, **JSON}, b'{"query_id": NaN, "choice": "left"}'), 400),
      ('empty body', lambda: s.request('POST', '/api/answer', {**alice, **JSON}), 400),
      # Ids.
      *[(f'query_id {v!r}', (lambda v=v: s.request('POST', '/api/answer', {**alice, **JSON},
                                                   json.dumps({'query_id': v, 'choice': 'left'}).encode())), 400)
        for v in (2**63, 2**64, 10**30, -1, -2**63, '1', 1.5, 1e300, None, True, [1], {'id': 1})],
      ('unknown query', lambda: s.request('POST', '/api/answer', {**alice, **JSON}, answer_body(2**63 - 1)), 404),
      ('drop 2**63', lambda: s.request('POST', '/api/drop', {**owner, **JSON}, b'{"query_id": 9223372036854775808}'),
       400),
      ('drop -1', lambda: s.request('POST', '/api/drop', {**owner, **JSON}, b'{"query_id": -1}'), 400),
      ('drop, extra field', lambda: s.request('POST', '/api/drop', {**owner, **JSON}, b'{"query_id": 1, "x": 2}'), 400),
      ('reassign to nobody', lambda: s.request('POST', '/api/reassign', {**owner, **JSON},
                                               b'{"query_id": 1, "labeller": "nobody"}'), 400),
      ('reassign, name not a string', lambda: s.request('POST', '/api/reassign', {**owner, **JSON},
                                                        b'{"query_id": 1, "labeller": ["alice"]}'), 400),
      # Content types.
      ('answer as text/plain', lambda: s.request('POST', '/api/answer', {**alice, 'Content-Type': 'text/plain'},
                                                 answer_body(qid)), 415),
      ('answer as a form', lambda: s.request('POST', '/api/answer', {**alice, **FORM}, b'query_id=1&choice=left'), 415),
      ('answer as multipart', lambda: s.request('POST', '/api/answer',
                                                {**alice, 'Content-Type': 'multipart/form-data; boundary=x'},
                                                b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n'), 415),
      ('no content type', lambda: s.request('POST', '/api/answer', alice, answer_body(qid)), 415),
      # Methods.
      *[(f'{m} {path}{"" if h else " (no token)"}', (lambda m=m, path=path, h=h: s.request(m, path, h)),
         405 if h else 401)
        for m in ('PUT', 'DELETE', 'PATCH', 'TRACE', 'PROPFIND', 'FOO')
        for path, h in (('/api/answer', alice), ('/', alice), ('/login', {}), ('/api/next', {}))],
      ('GET /api/answer', lambda: s.request('GET', '/api/answer', alice), 405),
      ('GET /login', lambda: s.request('GET', '/login', alice), 405),
      # Traversal (authenticated, so the router sees them; unauthenticated they are a 401).
      *[(f'traversal {path}{"" if h else " (no token)"}', (lambda path=path, h=h: s.request('GET', path, h)),
         404 if h else 401)
        for path in ('/static/../app.py', '/static/../../label_server/app.py', '/static/..%2fapp.py',
                     '/static/%2e%2e/%2e%2e/labelling/queue.py', '/static/..%2F..%2F..%2Fetc%2Fpasswd',
                     '/static//etc/passwd', '/static/%00', '/static/..\\app.py', '/../../etc/passwd',
                     '/static/../../../../' + os.path.basename(s.workdir) + '/labels.sqlite',
                     '/static/label_server_owner_token', '/label_server_owner_token', '/labels.sqlite')
        for h in (alice, {})],
      # Tokens and cookies.
      ('no token', lambda: s.request('POST', '/api/next'), 401),
      ('forged cookie', lambda: s.request('POST', '/api/next', {'Cookie': f'{server_app.COOKIE}=forged'}), 401),
      ('10 KiB cookie', lambda: s.request('POST', '/api/next', {'Cookie': f'{server_app.COOKIE}=' + 'x' * 10000}), 401),
      ('owner token prefix', lambda: s.request('POST', '/api/next', {'Cookie': f'{server_app.COOKIE}={s.owner[:-1]}'}),
       401),
      ('empty cookie', lambda: s.request('GET', '/api/progress', {'Cookie': f'{server_app.COOKIE}='}), 401),
      ('cookie of another name', lambda: s.request('GET', '/api/progress', {'Cookie': f'token={s.tokens["alice"]}'}), 401),
      ('forged bearer', lambda: s.request('GET', '/api/report', {'Authorization': 'Bearer forged'}), 401),
      ('basic auth', lambda: s.request('GET', '/api/report', {'Authorization': f'Basic {s.tokens["alice"]}'}), 401),
      ('empty bearer', lambda: s.request('GET', '/api/report', {'Authorization': 'Bearer '}), 401),
      ('non-latin bearer', lambda: s.raw(f'GET /api/progress HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nAuthorization: Bearer '
                                         .encode() + b'\xff\xfe\r\nConnection: close\r\n\r\n'), 401),
      ('labeller on the owner page', lambda: s.request('GET', '/owner', alice), 403),
      ('labeller reads the report', lambda: s.request('GET', '/api/report', alice), 403),
      ('labeller drops a query', lambda: s.request('POST', '/api/drop', {**bob, **JSON}, b'{"query_id": 1}'), 403),
      ('owner answers', lambda: s.request('POST', '/api/answer', {**owner, **JSON}, answer_body(qid)), 403),
      ("someone else's query", lambda: s.request('POST', '/api/answer', {**bob, **JSON}, answer_body(qid)), 403),
      # Headers and the request itself.
      ('40 KiB header', lambda: s.request('GET', '/api/progress', {**alice, 'X-Big': 'x' * 40000}), 431),
      ('2,000 headers', lambda: s.request('GET', '/api/progress', {**alice, **{f'X-H{i}': 'y' * 20 for i in range(2000)}}),
       431),
      ('foreign Host (DNS rebinding)', lambda: s.request('GET', '/api/progress', alice, host='attacker.example'), 421),
      ('Host 127.evil.example', lambda: s.request('GET', '/api/progress', alice, host='127.evil.example'), 421),
      ('bad Content-Length', lambda: s.request('POST', '/api/answer', {**alice, **JSON, 'Content-Length': 'abc'}), 400),
      ('two Content-Lengths', lambda: s.raw(f'POST /api/answer HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n'
                                            'Content-Length: 2\r\nContent-Length: 4\r\n\r\n{}'.encode()), 400),
      ('unknown page', lambda: s.request('GET', '/wp-admin/', alice), 404),
      ('dot segments', lambda: s.request('POST', '/api/../api/next', alice), 404),
  ]
  return cases


def test_every_hostile_request_gets_a_json_4xx_and_changes_nothing(server):
  qid = json.loads(server.request('POST', '/api/next', server.auth('alice'))[2])['query']['query_id']
  before = server.state()
  cases = hostile_requests(server, qid)
  assert len({name for name, _, _ in cases}) == len(cases)
  statuses = []
  for name, send, want in cases:
    status, headers, body = send()
    statuses.append(status)
    assert 400 <= status < 500, (name, status, body[:300])
    assert want is None or status == want, (name, status, body[:300])
    assert headers.get('Content-Type', '').startswith('application/json'), (name, headers, body[:300])
    error = json.loads(body)['error']
    assert isinstance(error, str) and error, (name, body)
    assert server.workdir not in error and os.path.realpath(server.workdir) not in error, (name, error)
    assert 'Set-Cookie' not in headers, name  # Nothing logs anyone in.
    assert server.state() == before, f'{name} changed the store'
  print(f'\n{len(cases)} hostile requests: all 4xx JSON, 0 responses 5xx; statuses: '
        f'{ {code: statuses.count(code) for code in sorted(set(statuses))} }')
  assert len(cases) >= 100
  # The server still serves, and alice's assignment is still hers.
  status, _, body = server.request('POST', '/api/answer', {**server.auth('alice'), **JSON}, answer_body(qid))
  assert status == 200 and json.loads(body)['ok'] is True


def test_pages_let_the_browser_send_their_own_origin(server):
  """Under Referrer-Policy no-referrer a browser sends `Origin: null` with a page's own POSTs, which
  are then refused: the policy must keep the origin for same-origin requests."""
  status, headers, _ = server.request('GET', '/', server.auth('alice'))
  assert status == 200 and headers['Referrer-Policy'] == 'same-origin'


def test_origin_must_match_scheme_host_and_port_exactly():
  match = server_app.origin_matches
  assert match('http://127.0.0.1:8765', 'http', '127.0.0.1:8765')
  assert match('http://LOCALHOST:80', 'http', 'localhost')
  assert match('https://labels.example', 'https', 'labels.example:443')
  for origin in ('null', 'https://127.0.0.1:8765', 'http://127.0.0.1:8766', 'http://127.0.0.1', 'http://127.0.0.1:8765.x',
                 'http://127.0.0.1:99999', 'file://', 'http://evil@127.0.0.1:8765', 'http://127.0.0.1:8765/path',
                 'ftp://127.0.0.1:8765', '', '127.0.0.1:8765', 'http://[::1]:8765'):
    assert not match(origin, 'http', '127.0.0.1:8765'), origin


def test_local_hosts_are_exactly_loopback():
  for host in ('127.0.0.1', '127.1.2.3', '::1', '[::1]', 'localhost', 'LOCALHOST'):
    assert server_main._is_local(host), host
  for host in ('127.evil.example', '127.0.0.1.nip.io', '0.0.0.0', '10.0.0.1', '::', 'localhost.example', '1270.0.0.1'):
    assert not server_main._is_local(host), host


@pytest.mark.parametrize('trusted', [False, True])
def test_trusted_proxy_sets_secure_and_only_a_trusted_proxy_is_believed(tmp_path, trusted):
  s = Server(str(tmp_path), trusted_proxy='127.0.0.1' if trusted else None, secure_cookie=trusted)
  try:
    login = f'token={s.tokens["alice"]}'.encode()
    https = {**FORM, 'X-Forwarded-Proto': 'https', 'Origin': f'https://127.0.0.1:{s.port}'}
    status, headers, _ = s.request('POST', '/login', https, login)
    if trusted:  # The proxy says the browser is on https: same origin, and the cookie is Secure.
      assert status == 303 and '; Secure' in headers['Set-Cookie'], (status, headers)
    else:  # A client's own X-Forwarded-Proto is dropped: the https origin is foreign.
      assert status == 403 and 'Set-Cookie' not in headers
      status, headers, _ = s.request('POST', '/login', {**FORM, 'X-Forwarded-Proto': 'https', 'Origin': s.origin}, login)
      assert status == 303 and 'Secure' not in headers['Set-Cookie'] and 'HttpOnly' in headers['Set-Cookie']
  finally:
    s.close()
  if trusted:
    assert server_main.main(['--workdir', str(tmp_path), '--trusted-proxy', 'proxy.example']) == 2


def test_an_unexpected_error_is_a_json_500_without_server_details(tmp_path, monkeypatch, capsys):
  s = Server(str(tmp_path))
  try:
    def broken(self, *_):
      raise RuntimeError(f'disk trouble at {s.path}')
    monkeypatch.setattr(LabelQueue, 'progress', broken)
    status, headers, body = s.request('GET', '/api/progress', s.auth('alice'))
    assert status == 500 and headers['Content-Type'] == 'application/json'
    error = json.loads(body)['error']
    assert 'Internal error' in error and str(tmp_path) not in error and 'disk trouble' not in error
  finally:
    s.close()


def test_a_labeller_never_sees_the_owner_token_path(tmp_path):
  s = Server(str(tmp_path))
  try:
    for method, path in (('GET', '/owner'), ('GET', '/api/report'), ('GET', '/api/waiting')):
      status, _, body = s.request(method, path, s.auth('alice'))
      assert status == 403 and b'owner-token' in body and str(tmp_path).encode() not in body
      assert server_app.OWNER_TOKEN_FILE.encode() not in body
  finally:
    s.close()


def test_store_and_secrets_are_private(tmp_path):
  """labels.sqlite (hidden sources and every answer), its WAL, the workdir copy and the secrets: 0600."""
  from pilaf_jax.labelling.label_store import LabelStore
  from pilaf_jax.labelling.store_sync import StoreCopy
  old = os.umask(0o022)
  try:
    local = tmp_path / 'local'
    store = LabelStore(str(local / 'labels.sqlite'), {'x': 1})
    queue = LabelQueue(str(local / 'labels.sqlite'))
    queue.enqueue('b', 0, 'pilaf', queries(1))
    copy = StoreCopy(str(local / 'labels.sqlite'), str(tmp_path / 'workdir'))
    assert copy.upload()
    made = [local / 'labels.sqlite', local / 'labels.sqlite-wal', tmp_path / 'workdir' / 'labels.sqlite']
    server_app.create_app(str(tmp_path / 'workdir'))
    made += [tmp_path / 'workdir' / server_app.OWNER_TOKEN_FILE, tmp_path / 'workdir' / server_app.ORDER_KEY_FILE]
    fresh = LabelQueue(str(tmp_path / 'queue_first' / 'labels.sqlite'))  # The queue may create the file first.
    made.append(tmp_path / 'queue_first' / 'labels.sqlite')
    for path in made:
      assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, (path, oct(os.stat(path).st_mode))
    queue.close()
    fresh.close()
    store.close()
    copy.close()
  finally:
    os.umask(old)
