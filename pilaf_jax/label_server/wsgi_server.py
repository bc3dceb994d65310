"""The WSGI server in front of the labelling app: waitress, with limits that apply before the app
(and so before any authentication) and its own errors as JSON like every other answer.

waitress buffers a whole request body before calling the app (up to 1 GiB by default), so the app's
own 4 KiB cap (MAX_CONTENT_LENGTH) would only be checked after an unauthenticated client had made
the server hold a gigabyte. Here the body is refused at 16 KiB (a Content-Length beyond it is
refused before a byte is read) and the header block at 32 KiB.
"""
from __future__ import annotations

import json
from typing import Optional

import waitress
from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

MAX_BODY_BYTES = 16 * 1024  # The app answers 413 above 4 KiB itself; this bounds what waitress buffers.
MAX_HEADER_BYTES = 32 * 1024  # Browsers send a few KiB (cookie, user agent, accept headers).


class JsonErrorTask(ErrorTask):
  """waitress's own error responses (413 body too large, 431 headers too large, 400 malformed
  request) as {'error': message}, like the app's."""

  def execute(self):
    error = self.request.error
    self.status = f'{error.code} {error.reason}'
    body = json.dumps({'error': f'{error.reason}: {error.body}.'}).encode()
    self.response_headers.extend([('Content-Type', 'application/json'), ('X-Content-Type-Options', 'nosniff'),
                                  ('Cache-Control', 'no-store')])
    self.set_close_on_finish()
    self.content_length = len(body)
    self.write(body)


class JsonErrorChannel(HTTPChannel):
  error_task_class = JsonErrorTask


def create_server(app, host: str, port: int, *, threads: int = 8, trusted_proxy: Optional[str] = None):
  """A waitress server for `app` on host:port (port 0 picks a free one; see .effective_port).

  trusted_proxy: the address of a TLS reverse proxy whose X-Forwarded-Proto is believed (the request
  is then https as the browser sees it); from any other peer the header is removed, so a client
  cannot make plain HTTP look secure.
  """
  kw = dict(host=host, port=port, threads=threads, ident='pilaf_jax', clear_untrusted_proxy_headers=True,
            max_request_body_size=MAX_BODY_BYTES, max_request_header_size=MAX_HEADER_BYTES)
  if trusted_proxy:
    kw.update(trusted_proxy=trusted_proxy, trusted_proxy_count=1, trusted_proxy_headers={'x-forwarded-proto'})
  server = waitress.create_server(app, **kw)
  for s in [server, *getattr(server, 'map', {}).values()]:
    if hasattr(s, 'channel_class'):
      s.channel_class = JsonErrorChannel
  return server
