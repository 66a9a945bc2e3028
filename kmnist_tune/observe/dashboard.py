"""optuna-dashboard over the study storage, showing files from the study's artifact store.

optuna-dashboard has no login, answers any Host header and serves artifacts with a wildcard CORS
header. Here its WSGI app runs behind a guard that answers only the Host names this server is
known by (a web page that rebinds its own name to this address then gets a 403, not the studies),
refuses writes that a foreign page's origin sent, and drops `Access-Control-Allow-Origin`, so no
other origin reads a response. The guard also sets the security headers of every response (its own,
whatever the app or the stored data said): the dashboard's pages run under a Content-Security-Policy
that its own UI works under, everything else under one that runs and loads nothing, and an artifact
(whose content type anyone sharing the database chooses) is always a download, never a page of this
origin. Who may change a study is still the database role's matter: compose and Kubernetes run it
with the read-only dashboard role (storage/initdb).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import logging
import re
import socket
import socketserver
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from optuna.storages import BaseStorage

from ..errors import UserError
from ..service.artifacts import artifact_store
from ..service.listing import BoundedListing

ENV_ALLOW_HOSTS = "KMNIST_TUNE_DASHBOARD_ALLOW_HOSTS"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("0.0.0.0", "[::]", "")
# A DNS name (labels of letters, digits, - and _) or an IPv4 address; IPv6 ones come in brackets.
_NAME = re.compile(r"[a-z0-9_][a-z0-9_-]{0,62}(\.[a-z0-9_][a-z0-9_-]{0,62})*")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

# The policy of the dashboard's own pages (/dashboard/...): the one optuna-dashboard 0.21 sends itself,
# which its UI is built for (MUI and Plotly set inline styles; Plotly's parallel coordinates compile
# WebGL shaders with eval; plots are data: and blob: images), with framing, <base> and form targets
# closed. tests/test_watch.py renders each page in Chromium under it and finds no violation.
PAGE_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-eval'",
        "style-src 'self' data: 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
# Everything else (the API's JSON, static files, artifacts, error pages): opened as a page, it runs
# nothing, loads nothing and has no origin of its own (sandbox).
LOCKED_CSP = "default-src 'none'; sandbox; frame-ancestors 'none'"
# Sent with every response, in place of any the app set.
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),  # no other site embeds a response (an artifact as <img>)
)
# Headers the guard decides alone: dropped from the app's answer (optuna-dashboard's own CSP, an
# artifact's stored encoding, CORS), then set as above.
_REPLACED = frozenset(
    {
        "content-security-policy",
        "content-security-policy-report-only",
        "content-disposition",
        "content-encodings",  # optuna-dashboard's name for an artifact's stored `encoding`
        *(k.lower() for k, _ in _SECURITY_HEADERS),
    }
)
# optuna-dashboard's two artifact routes: /artifacts/STUDY/ID and /artifacts/STUDY/TRIAL/ID.
_ARTIFACT_PATH = re.compile(r"/artifacts/([0-9]{1,18})/(?:([0-9]{1,18})/)?([0-9a-fA-F-]{1,100})/*")
# A media type as `type/subtype` (RFC 6838's characters), without parameters.
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _split(value: str) -> tuple[str, int | None]:
    """'name[:port]' -> (lower-case name, port or None); ValueError when it is neither."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value.partition("]")
        if not bracket:
            raise ValueError(value)
        name += "]"
        ipaddress.IPv6Address(name[1:-1])  # ValueError unless an IPv6 address
    else:
        name, colon, rest = value.partition(":")
        rest = colon + rest
        if not _NAME.fullmatch(name):
            raise ValueError(value)
    if not rest:
        return name, None
    if not re.fullmatch(r":[0-9]{1,5}", rest) or not 1 <= int(rest[1:]) <= 65535:
        raise ValueError(value)
    return name, int(rest[1:])


def _bound_name(host: str) -> str:
    """How a Host header names the bound address: an IPv6 one in brackets."""
    host = host.strip().lower()
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


@dataclass(frozen=True)
class HostPolicy:
    """The Host names (and ports) the dashboard answers to."""

    exact: frozenset[tuple[str, int]]  # name and port
    any_port: frozenset[str]  # names given without a port (a port-forward or published port may differ)

    @classmethod
    def for_server(cls, host: str, port: int, extra: Iterable[str] = ()) -> HostPolicy:
        """The bound address on its port; for loopback and wildcard binds also the loopback names
        (no page elsewhere can make a browser send those); and each of `extra` (NAME or NAME:PORT)."""
        bound = _bound_name(host)
        names = {bound} if bound not in WILDCARDS else set()
        if bound in WILDCARDS or bound in LOOPBACK_NAMES or bound.startswith("127."):
            names |= set(LOOPBACK_NAMES)
        exact = {(n, port) for n in names}
        any_port: set[str] = set()
        for value in extra:
            if not value.strip():
                continue
            try:
                name, p = _split(value)
            except ValueError:
                raise UserError(
                    f"--allow-host {value.strip()!r} is not a host name: give NAME or NAME:PORT "
                    f"(dashboard.example.org, 10.0.0.5:8080, [fd00::5]:8080), no scheme or path ({ENV_ALLOW_HOSTS} too)"
                ) from None
            if p is None:
                any_port.add(name)
            else:
                exact.add((name, p))
        return cls(frozenset(exact), frozenset(any_port))

    def allows(self, header: str | None) -> bool:
        if not header:
            return False
        try:
            name, port = _split(header)
        except ValueError:
            return False
        return name in self.any_port or (name, 80 if port is None else port) in self.exact

    def origin_allowed(self, origin: str) -> bool:
        """An Origin header (scheme://host[:port]) of a page this dashboard served."""
        m = re.fullmatch(r"(https?)://([^/?#@\\]+)", origin.strip().lower())
        if not m:
            return False  # "null" (a sandboxed or file page), another scheme, or not an origin at all
        netloc = m.group(2)
        if ":" not in netloc.rpartition("]")[2]:  # the scheme's own port, which a browser leaves out
            netloc += ":443" if m.group(1) == "https" else ":80"
        return self.allows(netloc)

    def shown(self) -> str:
        return ", ".join(sorted({f"{n}:{p}" for n, p in self.exact} | {f"{n} (any port)" for n in self.any_port}))


def _printable(value: str) -> str:
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in value)[:100]


def safe_filename(name: Any, fallback: str) -> str:
    """A download's file name from stored data: letters, digits, `._-` (others become `_`), no leading
    dot, at most 100 characters; `fallback` when nothing is left."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", name if isinstance(name, str) else "")[:100].lstrip(".")
    return text if text.strip("_") else fallback


def artifact_headers(content_type: str | None, filename: str) -> list[tuple[str, str]]:
    """An artifact's headers: always a download (attachment, under a sandboxing CSP); its content
    type as stored when it is a plain media type, else application/octet-stream."""
    media = (content_type or "").split(";")[0].strip().lower()
    return [
        ("Content-Type", media if _MEDIA_TYPE.fullmatch(media) else "application/octet-stream"),
        ("Content-Disposition", f'attachment; filename="{filename}"'),
    ]


def security_headers(path: str) -> list[tuple[str, str]]:
    page = path.rstrip("/") == "/dashboard" or path.startswith("/dashboard/")
    return [("Content-Security-Policy", PAGE_CSP if page else LOCKED_CSP), *_SECURITY_HEADERS]


def artifact_file_name(storage: BaseStorage, path: str) -> str | None:
    """The stored file name of the artifact at `path` (one of optuna-dashboard's artifact routes),
    made safe for a header; None when `path` is not an artifact's. Read where optuna-dashboard reads
    an artifact's record (the study's or trial's system attributes, Optuna's `artifacts:ID` key)."""
    m = _ARTIFACT_PATH.fullmatch(path)
    if m is None:
        return None
    study, trial, artifact = m.groups()
    key = f"artifacts:{artifact}"
    try:
        attrs = storage.get_trial_system_attrs(int(trial)) if trial else storage.get_study_system_attrs(int(study))
        meta = json.loads(attrs[key]) if isinstance(attrs.get(key), str) else None
    except Exception:  # no such study, trial or record, or a record that is not JSON: the app answers 404
        meta = None
    return safe_filename(meta.get("filename") if isinstance(meta, dict) else None, f"artifact-{artifact}")


def guarded(app: WSGIApp, policy: HostPolicy, file_name: Callable[[str], str | None] | None = None) -> WSGIApp:
    """`app` answering only requests whose Host is one of `policy`'s, with no CORS header and with the
    guard's security headers. `file_name(path)`: an artifact's download name (None: not an artifact)."""

    def refuse(start_response: StartResponse, why: str) -> list[bytes]:
        body = f"{why}\n".encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *security_headers("")],
        )
        return [body]

    def guard(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if not policy.allows(host):
            # Echoed only as printable ASCII, in plain text: it helps the one who sent it, no one else.
            shown = _printable(host) if host else "(none)"
            return refuse(
                start_response,
                f"kmnist-tune dashboard: Host {shown} is not a name of this server; "
                "if it is, start the dashboard with --allow-host NAME[:PORT]",
            )
        origin = environ.get("HTTP_ORIGIN")
        unsafe = environ.get("REQUEST_METHOD", "GET").upper() not in _SAFE_METHODS
        # A page of another origin may still send a form to a right Host (CSRF): writes come from the
        # dashboard's own pages only (or from clients that are no browser, which send no Origin).
        if unsafe and origin is not None and not policy.origin_allowed(origin):
            return refuse(start_response, f"kmnist-tune dashboard: a write from origin {_printable(origin)} is refused")

        path = environ.get("PATH_INFO", "")
        # Whatever optuna-dashboard serves under /artifacts/ (any id form it may accept) is a download.
        download = None
        if path.startswith("/artifacts/"):
            download = (file_name(path) if file_name is not None else None) or "artifact"

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            kept = [(k, v) for k, v in headers if k.lower() not in _REPLACED and not k.lower().startswith("access-control-")]
            if download is not None:  # an artifact: its stored content type decides nothing about how it is opened
                stored = next((v for k, v in kept if k.lower() == "content-type"), None)
                kept = [(k, v) for k, v in kept if k.lower() != "content-type"] + artifact_headers(stored, download)
            kept += security_headers(path)
            return start_response(status, kept, exc_info) if exc_info is not None else start_response(status, kept)

        return app(environ, start)

    return guard


# SQLSTATEs of a write the database refused to this login: a read-only transaction (the dashboard role's
# default) and a missing grant (what stays when a client turns that default off).
_REFUSED_WRITE = {"25006": "read-only transaction", "42501": "permission denied"}


def refused_write(e: BaseException) -> str | None:
    """Why the database refused a write, when `e` (or an error it wraps: Optuna's StorageInternalError
    over SQLAlchemy's over the driver's) is such a refusal; else None."""
    seen: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in seen:
        seen.append(cur)
        state = getattr(cur, "sqlstate", None) or getattr(cur, "pgcode", None)  # psycopg 3, psycopg2
        if state in _REFUSED_WRITE:
            return _REFUSED_WRITE[state]
        cur = getattr(cur, "orig", None) or cur.__cause__ or cur.__context__
    return None


_REFUSED_REASON = "the database refused this change: the dashboard's login may only read"


def _refusing(view: Callable[..., Any]) -> Callable[..., Any]:
    """`view`, with a write its database refused turned into a 403 (bottle.HTTPError) and one log line."""
    import bottle

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return view(*args, **kwargs)
        except Exception as e:
            why = refused_write(e)
            if why is None:
                raise
            environ = bottle.request.environ
            where = f"{environ.get('REQUEST_METHOD', '?')} {_printable(environ.get('PATH_INFO', ''))}"
            environ["wsgi.errors"].write(
                f"kmnist-tune dashboard: {where} refused by the database ({why}): its login may only read\n"
            )
            environ["wsgi.errors"].flush()
            raise bottle.HTTPError(403, _REFUSED_REASON) from None

    return wrapper


def _quiet_refusals(record: logging.LogRecord) -> bool:
    """A logging filter: drops optuna-dashboard's own traceback of a refused write (its rename view logs one
    before it answers), which `_refusing` says in one line."""
    return not (record.exc_info and record.exc_info[1] is not None and refused_write(record.exc_info[1]))


def refused_writes(callback: Callable[..., Any]) -> Callable[..., Any]:
    """A Bottle plugin for optuna-dashboard's routes: a change its database login may not make (compose and
    Kubernetes run it with the read-only role) answers 403 with a short reason, which its UI shows, and
    says one line in the server's log; any other error stays a 500 with its traceback in the log."""
    from ..optuna_internals import dashboard_api_view

    api = dashboard_api_view(callback)
    if api is not None:
        # optuna-dashboard's API views catch every error themselves (a 500, its traceback logged) except
        # bottle.HTTPError, which they answer with its status and {"reason": ...}: the refusal is raised
        # as one inside that wrapper.
        view, json_api_view = api
        return functools.wraps(view)(json_api_view(_refusing(view)))
    return _refusing(callback)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    # A browser loads a page's API calls in parallel; threads that never outlive Ctrl-C.
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


def serve(
    storage: BaseStorage,
    host: str,
    port: int,
    artifacts: str | Path | None = None,
    allow_hosts: Iterable[str] = (),
    on_ready: Callable[[], None] | None = None,
    *,
    workers: int = 1,
    reopen: Callable[[], BaseStorage] | None = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM; `allow_hosts` as HostPolicy.for_server takes them (checked before
    anything binds). `on_ready` runs once the port is bound (the startup line: not before a "port in use").

    With `reopen` given and gunicorn chosen (server_choice), gunicorn serves it: `workers` processes
    (each opens its own storage with `reopen`: database connections are not shared across a fork) of a
    few threads each. Otherwise Python's development server, threaded, in this process."""
    policy = HostPolicy.for_server(host, port, allow_hosts)
    from optuna_dashboard import wsgi

    def app_for(st: BaseStorage) -> WSGIApp:
        # optuna-dashboard lists the studies, and finds each one it shows, through get_all_studies:
        # given a storage that reads their attributes bounded (service/listing.py).
        app = wsgi(BoundedListing(st), artifact_store=artifact_store(st, artifacts))
        app.install(refused_writes)  # type: ignore[attr-defined]  # wsgi() returns its Bottle app
        logging.getLogger("optuna_dashboard._app").addFilter(_quiet_refusals)  # added once: the same object
        return guarded(app, policy, lambda path: artifact_file_name(st, path))

    try:
        ipv6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        ipv6 = False
    if reopen is not None and server_choice(workers).gunicorn:
        listener = _listen(host, port, ipv6)
        from ..service.storage import release

        release(storage)  # the forked workers open their own; none inherits this process's connections
        _serve_gunicorn(lambda: app_for(reopen()), listener, workers, on_ready)
        return
    try:
        server = make_server(host, port, app_for(storage), server_class=_ThreadingServer6 if ipv6 else _ThreadingServer)
    except OSError as e:
        raise _bind_error(e, host, port) from None
    with server:
        if on_ready is not None:
            on_ready()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            sys.stderr.flush()


@dataclass(frozen=True)
class ServerChoice:
    """Which server `serve` runs, decided in one place: the startup line names it."""

    gunicorn: bool
    label: str  # for the startup line
    note: str | None = None  # a line to say first: --workers asked for more than one process can give


def server_choice(workers: int) -> ServerChoice:
    """gunicorn when it is installed and this is the main thread (its master sets signal handlers,
    which only the main thread may: an embedding that serves from a thread gets the development
    server); else Python's development server, in this one process."""
    import importlib.util
    import threading

    installed = importlib.util.find_spec("gunicorn") is not None
    if installed and threading.current_thread() is threading.main_thread():
        return ServerChoice(True, f"gunicorn, {workers} worker(s)")
    label = "Python's development server" + ("" if installed else " (pip install 'kmnist-tune[server]' for gunicorn)")
    note = None
    if workers > 1:
        note = f"--workers {workers} needs gunicorn (installed, and serving from the main thread): serving in this one process"
    return ServerChoice(False, label, note)


def _bind_error(e: OSError, host: str, port: int) -> UserError:
    if e.errno == errno.EADDRINUSE:
        return UserError(f"port {port} on {host} is in use; pick another with --port")
    return UserError(f"cannot serve on {host}:{port}: {e.strerror or e}; check --host and --port")


def _listen(host: str, port: int, ipv6: bool) -> int:
    """The dashboard's socket, bound here and handed to gunicorn by its descriptor (`fd://N`): a port in
    use is one clear line, not gunicorn's 5 s of retries and its own log lines, and nothing can take
    the port between a check and gunicorn's bind. SO_REUSEADDR as gunicorn binds: a port in TIME_WAIT
    is free. gunicorn listens on it and closes this descriptor once it has its own copy."""
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise _bind_error(e, host, port) from None
    return sock.detach()  # gunicorn owns it now: a socket object here would close it a second time


# Threads per gunicorn worker: a browser loads a page's API calls in parallel.
GUNICORN_THREADS = 4


def _serve_gunicorn(make_app: Callable[[], WSGIApp], listener: int, workers: int, on_ready: Callable[[], None] | None) -> None:
    """gunicorn, as optuna-dashboard's documentation runs it, configured here rather than by its command
    line (the app is built in each worker, after the fork). Its own log says warnings and errors only."""
    from gunicorn.app.base import BaseApplication

    class DashboardServer(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings: dict[str, Any] = {
                "bind": [f"fd://{listener}"],
                "workers": workers,
                "worker_class": "gthread",
                "threads": GUNICORN_THREADS,
                "loglevel": "warning",
                "proc_name": "kmnist-tune-dashboard",
                "when_ready": lambda _server: on_ready() if on_ready is not None else None,
            }
            # gunicorn >= 25.1's control server (for its `gunicornc` tool, which nothing here uses) makes
            # ~/.gunicorn/ for its socket: on a read-only root that is an error line at every start.
            if "control_socket_disable" in self.cfg.settings:
                settings["control_socket_disable"] = True
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> WSGIApp:
            return make_app()

    DashboardServer().run()


def hosts_line(host: str, port: int, allow_hosts: Iterable[str] = ()) -> str:
    """The Host names the dashboard will answer to, for its startup line."""
    return HostPolicy.for_server(host, port, allow_hosts).shown()
