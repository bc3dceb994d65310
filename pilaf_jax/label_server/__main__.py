"""python -m pilaf_jax.label_server: serve the labelling page, or manage its tokens.

  python -m pilaf_jax.label_server --workdir=<run> [--host=127.0.0.1] [--port=8765]
  python -m pilaf_jax.label_server add-labeller --workdir=<run> --name=alice   # prints alice's token
  python -m pilaf_jax.label_server owner-token --workdir=<run>                 # prints the owner's token

The server binds to localhost unless --host names another interface, which also needs
--allow-remote (tokens then travel in clear over HTTP unless a TLS proxy sits in front).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

DEFAULT_HOST = '127.0.0.1'
DEFAULT_PORT = 8765


def _serve_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m pilaf_jax.label_server', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='The run directory (holds labels.sqlite).')
  p.add_argument('--store_path', default='', help="The run's labelling.store_path, if it set one.")
  p.add_argument('--host', default=DEFAULT_HOST, help='Interface to bind (default %(default)s).')
  p.add_argument('--port', type=int, default=DEFAULT_PORT, help='Port (default %(default)s; 0 picks a free one).')
  p.add_argument('--allow-remote', '--allow_remote', dest='allow_remote', action='store_true',
                 help='Required to bind to anything but localhost.')
  p.add_argument('--threads', type=int, default=8, help='Worker threads of the WSGI server (default %(default)s).')
  p.add_argument('--trusted-proxy', '--trusted_proxy', dest='trusted_proxy', default='',
                 help='Address of the TLS reverse proxy in front (e.g. 127.0.0.1): its X-Forwarded-Proto is '
                      "believed and the login cookie is marked Secure. Other peers' proxy headers are dropped.")
  return p


def _token_parser(command: str, help_text: str, name: bool) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f'python -m pilaf_jax.label_server {command}', description=help_text)
  p.add_argument('--workdir', required=True, help='The run directory (holds labels.sqlite).')
  p.add_argument('--store_path', default='', help="The run's labelling.store_path, if it set one.")
  if name:
    p.add_argument('--name', required=True, help="The labeller's name (1-64 printable characters; 'oracle:...' is reserved).")
  return p


def _is_local(host: str) -> bool:
  """Whether `host` is a loopback address (127.0.0.0/8, ::1) or 'localhost', exactly: a name such as
  '127.example.com' is not."""
  if host.lower() == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False


def serve(args: argparse.Namespace) -> int:
  """Runs the server until interrupted; returns the exit status."""
  from pilaf_jax.label_server.app import LOCAL_HOSTS, OWNER_TOKEN_FILE, create_app, store_path
  from pilaf_jax.label_server.wsgi_server import create_server
  local = _is_local(args.host)
  if not local and not args.allow_remote:
    print(f'error: --host={args.host} would serve other machines; add --allow-remote to confirm '
          '(labellers\' tokens then travel in clear over HTTP unless a TLS proxy sits in front).',
          file=sys.stderr)
    return 2
  if args.trusted_proxy:
    try:
      ipaddress.ip_address(args.trusted_proxy)
    except ValueError:
      print(f'error: --trusted-proxy={args.trusted_proxy!r} is not an IP address (the proxy\'s address as '
            'this server sees it, e.g. 127.0.0.1).', file=sys.stderr)
      return 2
  if not local and not args.trusted_proxy:
    print(f'WARNING: serving on {args.host}, reachable from other machines. Tokens travel in clear over '
          'plain HTTP: put a TLS reverse proxy in front (and pass --trusted-proxy), or bind to 127.0.0.1 '
          'and use an SSH tunnel.', file=sys.stderr, flush=True)
  app = create_app(args.workdir, configured_store=args.store_path,
                   allowed_hosts=LOCAL_HOSTS | {args.host} if local else None,
                   secure_cookie=bool(args.trusted_proxy))
  store = store_path(args.workdir, args.store_path)
  server = create_server(app, args.host, args.port, threads=args.threads, trusted_proxy=args.trusted_proxy or None)
  shown = f'[{args.host}]' if ':' in args.host else args.host
  print(f'Serving the labelling page on http://{shown}:{server.effective_port}/ '
        f'(owner token in {os.path.join(os.path.dirname(store), OWNER_TOKEN_FILE)}).', flush=True)
  if not os.path.exists(store):
    print(f'{store} does not exist yet: pages answer 503 until the run creates its queue.', flush=True)
  try:
    server.run()
  except KeyboardInterrupt:
    pass
  finally:
    server.close()
  return 0


def main(argv: list[str]) -> int:
  if argv and argv[0] == 'add-labeller':
    args = _token_parser('add-labeller', 'Adds a labeller and prints their token (shown once).',
                         name=True).parse_args(argv[1:])
    from pilaf_jax.label_server.app import open_queue, store_path
    from pilaf_jax.labelling.queue import QueueError
    try:
      token = open_queue(store_path(args.workdir, args.store_path)).add_labeller(args.name)
    except QueueError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    print(token)
    return 0
  if argv and argv[0] == 'owner-token':
    args = _token_parser('owner-token', "Prints the run owner's token (made on first use).",
                         name=False).parse_args(argv[1:])
    from pilaf_jax.label_server.app import owner_token, store_path
    print(owner_token(os.path.dirname(store_path(args.workdir, args.store_path))))
    return 0
  if argv and not argv[0].startswith('-'):
    print(f'error: unknown command {argv[0]!r}; commands: add-labeller, owner-token (or none, to serve).',
          file=sys.stderr)
    return 2
  return serve(_serve_parser().parse_args(argv))


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
