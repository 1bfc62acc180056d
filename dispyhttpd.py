#!/usr/bin/env python3
"""dispyhttpd: the web monitors of dispy and dispycos (``import dispy.httpd`` is this
module; ``dispycos.httpd.HTTPServer`` makes a DispycosHTTPServer).

A program (or ``dispyscheduler.py --httpd``) creates ``DispyHTTPServer(cluster)``; a
browser on any device opens ``http://HOST:8181/`` and sees the cluster's nodes and jobs,
cancels jobs and changes nodes.  A dispycos client creates
``dispycos.httpd.HTTPServer(computation)`` before scheduling it and sees its nodes, their
servers and the tasks running there, and terminates tasks.  Standard library only; the
pages (HTML, CSS and JavaScript, at the end of this file, the parts both pages use
shared) ship inside it and fetch nothing else.

Where dispy's data comes from (who owns what, which thread moves it)::

    Scheduler (dispy.py)  ──ClusterHooks events, scheduler lock held──►  JobCluster
                                                                         (or dispyscheduler's
                                                                          RemoteCluster)
                                       cluster.monitor.job_ended(...)  ◄──────┘
    ClusterMonitor   one per cluster: counters per node, the running jobs, the jobs-done
                     history (a point a second, taken by the server's thread); its own
                     lock, taken for a few dict operations per event
         ▲
         │ snapshot (monitor lock only: never the scheduler's)
    DispyHTTPServer  the JSON endpoints (/api/status, /api/node, POST /api/...) and the
                     page; actions call the cluster's own methods (cancel, set_node_cpus,
                     allocate_node, deallocate_node, close_node: they take the scheduler's
                     lock, and a SharedJobCluster's wait for its dispyscheduler)
         ▲
    MonitorHTTPServer  http.server in threads: one per connection (ThreadingMixIn), so a
                       connection holds up only its own thread; at most MAX_CONNECTIONS,
                       MAX_PER_ADDRESS from one address, each request REQUEST_TIMEOUT in
                       all (a trickling peer is cut off); TLS handshakes run in the
                       connection's thread too

Where dispycos's data comes from: only the computation's status messages::

    dispycos scheduler  DispycosStatus (nodes, servers, TaskCreated) and MonitorStatus
          │             (a task ended), sent to the computation's status_task
          ▼
    the computation's status task: DispycosHTTPServer.status_task (a daemon dispycos
          │             Task, the runner thread pycos-tasks: each message updates the
          │             ComputationMonitor), or, if the program gave the computation a
          │             status task of its own, a chaining task that updates the
          ▼             monitor and then passes the message on to that one
    ComputationMonitor  nodes by address, their servers by location, each server's
          ▲             running tasks (Task references, their arguments' text made when
          │             they started, while shown); its own lock
          │ snapshot (the lock only)
    DispycosHTTPServer  /api/cluster, /api/node, /api/server, POST /api/terminate
                        (Task.terminate(): for any thread, a notice the runner sends)
                        and /api/settings; served by MonitorHTTPServer as dispy's

Who makes what: ``DispyHTTPServer.add_cluster`` → ``ClusterMonitor.attach`` →
``cluster.attach_monitor`` (dispy.ClusterHooks: under the scheduler's lock the monitor is
made, told what the cluster knows, and set as ``cluster.monitor``); ``del_cluster`` and
``shutdown`` detach it, and the last server to let go sets ``cluster.monitor`` back to None.

Class hierarchy::

    socketserver.ThreadingMixIn + http.server.HTTPServer ─► MonitorHTTPServer
    http.server.BaseHTTPRequestHandler ─► MonitorHandler     (parsing, limits, errors)
    WebMonitor  (access, page files, routing, the serving thread; hook methods
      │          get_routes / post_routes: what a product serves; ARGS_SETTING: the
      │          name of the show-arguments setting its /api/settings changes)
      ├─► DispyHTTPServer  (dispy's clusters; ClusterMonitor per cluster)
      └─► DispycosHTTPServer  (a dispycos computation; its ComputationMonitor)

Who may see and act (``Access``): a browser on this machine (any of its own addresses)
may view and act; a browser elsewhere (a phone) needs the access token, which the
server prints on stderr when it starts (``http://HOST:8181/?token=...``: kept in a
cookie after the first visit).  Every request must name one of this machine's names or
addresses in its Host header (a DNS-rebinding page names its own).  A change (POST)
must carry the token in an ``X-Dispy-Token`` header, which the page reads from its own
HTML (a page of another site can neither read it nor send that header without a CORS
preflight, which is never granted), and a browser's Origin must be this server's.
"""

import collections
import hmac
import html
import http.client
import http.server
import ipaddress
import itertools
import json
import os
import re
import reprlib
import secrets
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse

import dispy
from dispy import DispyNode, logger

__version__ = dispy.__version__
__all__ = ['DispyHTTPServer', 'DispycosHTTPServer']

# One module under both names, whichever is imported first (dispy.SubmoduleAliases).
sys.modules.setdefault('dispy.httpd', sys.modules[__name__])
dispy.httpd = sys.modules[__name__]

# ================================================================================
# Constants
# ================================================================================

DEFAULT_PORT = 8181
HISTORY_SECONDS = 3600      # jobs-done history kept per cluster (one point a second)
MAX_BODY = 64 * 1024        # largest POST body
MAX_HEAD_BYTES = 32 * 1024  # largest request head (its header lines)
MAX_CONNECTIONS = 128       # connections served at once (more are answered 503)
MAX_PER_ADDRESS = 32        # ... from one address (a browser opens about 6)
REQUEST_TIMEOUT = 30.0      # a request (or an idle keep-alive connection's wait) in all
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_SHOWN = 1000            # characters of a job's id / arguments, a task's argument, shown
TOKEN_HEADER = 'X-Dispy-Token'
SECURITY_HEADERS = (
    ('Content-Security-Policy', "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                "form-action 'none'"),
    ('X-Content-Type-Options', 'nosniff'),
    ('X-Frame-Options', 'DENY'),
    ('Referrer-Policy', 'no-referrer'),
    ('Cache-Control', 'no-store'),
)


# ================================================================================
# ClusterMonitor: a cluster's figures, kept from its events
# ================================================================================

class _NodeFigures:
    """One node as the monitor shows it for one cluster."""

    __slots__ = ('ip_addr', 'name', 'cpus', 'avail_cpus', 'platform', 'state', 'avail',
                 'submitted', 'done', 'running', 'update_time')

    def __init__(self, ip_addr):
        self.ip_addr = ip_addr
        self.name = ''
        self.cpus = 0               # CPUs the cluster uses there
        self.avail_cpus = 0         # CPUs the node has
        self.platform = ''
        self.state = 'ready'
        self.avail = None           # DispyNodeAvailInfo (nodes with psutil)
        self.submitted = 0          # jobs sent there
        self.done = 0
        self.running = {}           # job key -> DispyJob running there
        self.update_time = time.time()

    def as_dict(self):
        avail = self.avail
        return {'ip_addr': self.ip_addr, 'name': self.name, 'cpus': self.cpus,
                'avail_cpus': self.avail_cpus, 'platform': self.platform,
                'state': self.state, 'submitted': self.submitted, 'done': self.done,
                'running': len(self.running), 'update_time': self.update_time,
                'avail': None if avail is None else {
                    'cpu': avail.cpu, 'memory': avail.memory, 'disk': avail.disk,
                    'swap': avail.swap}}


def _entry(table, key, make):
    """table[key] (a node's or a server's figures), made by make() the first time."""
    entry = table.get(key)
    if entry is None:
        entry = table[key] = make()
    return entry


class ClusterMonitor:
    """What the web monitor knows of one cluster, kept from the ``ClusterHooks``
    events the cluster passes on (``cluster.monitor``).  The events come with the
    scheduler's lock held and take this monitor's own lock for a few dict operations;
    reading the figures takes only this lock, so a page polling never waits for the
    scheduler, nor the scheduler for it."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.lock = threading.Lock()
        self.nodes = {}             # address -> _NodeFigures
        self.placed = {}            # job key -> address of the node it was sent to
        self.submitted = self.done = self.failed = 0
        self.history = collections.deque(maxlen=HISTORY_SECONDS)   # [second, done]
        self.start_time = time.time()
        self.servers = 0            # WebMonitors showing it (the cluster's lock)

    @classmethod
    def attach(cls, cluster):
        """The cluster's monitor (``ClusterHooks.attach_monitor``: made, and told what
        the cluster knows, by the first server that shows it)."""
        return cluster.attach_monitor(cls)

    def detach(self):
        self.cluster.detach_monitor(self)

    # -- events (scheduler lock held) --------------------------------------------------------
    def job_submitted(self, job):
        with self.lock:
            self.submitted += 1

    def job_dispatched(self, job, ip_addr):
        with self.lock:
            self._place(job, ip_addr)

    def job_running(self, job):
        with self.lock:
            node = self._place(job, job.ip_addr)
            if node is not None:
                node.running[job._key] = job

    def job_ended(self, job, ip_addr):
        with self.lock:
            self.done += 1
            self.failed += job.status in dispy.FAILED_STATUSES
            addr = self.placed.pop(job._key, None)
            if addr is None and ip_addr:        # its start was not reported: count it now
                addr = ip_addr
                self._node(addr).submitted += 1
            node = self.nodes.get(addr) if addr else None
            if node is not None:
                node.running.pop(job._key, None)
                node.done += 1

    def node_changed(self, ip_addr, status, name, cpus, avail_cpus, platform, avail_info):
        with self.lock:
            node = self._node(ip_addr)
            node.name, node.cpus, node.avail_cpus = name, cpus, avail_cpus
            node.platform, node.avail = platform, avail_info
            if status == DispyNode.Initialized:
                node.state = 'ready'
            elif status == DispyNode.Closed:
                node.state = 'closed'
            node.update_time = time.time()

    def seed(self, submitted, done, failed, nodes, running):
        """What the cluster knew before the monitor came (DispyNodes, running jobs)."""
        with self.lock:
            self.submitted, self.done, self.failed = submitted, done, failed
        for node in nodes:
            self.node_changed(node.ip_addr, DispyNode.Initialized, node.name, node.cpus,
                              node.avail_cpus, node.platform, node.avail_info)
            with self.lock:
                self.nodes[node.ip_addr].done = self.nodes[node.ip_addr].submitted = \
                    node.jobs_done
        for job in running:
            self.job_running(job)
        self.sample(time.time())

    def node_cpus(self, ip_addr, cpus):
        with self.lock:
            node = self.nodes.get(ip_addr)
            if node is not None:
                node.cpus = cpus

    def _node(self, ip_addr):
        return _entry(self.nodes, ip_addr, lambda: _NodeFigures(ip_addr))

    def _place(self, job, ip_addr):
        """The node a job is on; counted as sent there once (a job moved to another
        node by ``reentrant`` is counted at both)."""
        if not ip_addr:
            return None
        node = self._node(ip_addr)
        old = self.placed.get(job._key)
        if old != ip_addr:
            if old is not None and old in self.nodes:
                self.nodes[old].running.pop(job._key, None)
            self.placed[job._key] = ip_addr
            node.submitted += 1
        return node

    def sample(self, now):
        """A history point for this second (the server's thread, about once a second:
        a job's end costs no clock read).  Seconds the thread missed get the point
        before them, so the page draws no jobs there rather than a slow average."""
        second = int(now)
        with self.lock:
            history = self.history
            if history and history[-1][0] >= second:
                history[-1][1] = self.done
                return
            if history and second > history[-1][0] + 1:
                history.append([second - 1, history[-1][1]])
            history.append([second, self.done])

    # -- what the server reads ---------------------------------------------------------------
    def status(self, since=0.0):
        with self.lock:
            running = sum(len(node.running) for node in self.nodes.values())
            return {'start_time': self.start_time, 'submitted': self.submitted,
                    'done': self.done, 'running': running, 'failed': self.failed,
                    'pending': max(0, self.submitted - self.done - running),   # queued
                    'nodes': [node.as_dict() for node in self.nodes.values()],
                    # from since on: the point of since's second may have grown
                    'history': [list(p) for p in self.history if p[0] >= since]}

    def node(self, ip_addr):
        """(figures of the node, its running jobs) or None."""
        with self.lock:
            node = self.nodes.get(ip_addr)
            if node is None:
                return None
            return node.as_dict(), list(node.running.values())

    def running_job(self, key):
        with self.lock:
            addr = self.placed.get(key)
            node = self.nodes.get(addr) if addr is not None else None
            return node.running.get(key) if node is not None else None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxtuple, _REPR.maxlist, _REPR.maxdict = 4, 20, 20, 20
_REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = _REPR.maxarray = 20
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_SHOWN


def shown(value):
    """A value as the page shows it: its repr (containers cut short as they are
    walked, so a huge argument costs little), at most MAX_SHOWN characters; a value
    whose repr raises is shown as such (user classes may have broken reprs)."""
    try:
        text = value if isinstance(value, str) else _REPR.repr(value)
    except Exception as exc:
        text = '<unprintable %s: %s>' % (type(value).__name__, exc)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + '...'


# ================================================================================
# Access: who may view and act
# ================================================================================

class Access:
    """The rules of the module docstring, as plain decisions (no I/O per request)."""

    ADDRESS_TTL = 30.0          # this machine's addresses are looked up again after this

    def __init__(self, token, allowed_hosts=(), bound_host='', port=DEFAULT_PORT):
        self.token = token
        self.cookie_name = 'dispy_monitor_%d' % port    # cookies ignore ports
        names = {'localhost', 'localhost.localdomain'}
        for name in (socket.gethostname(), bound_host) + tuple(allowed_hosts or ()):
            if name and name not in ('0.0.0.0', '::'):      # "any address" names nothing
                names.add(name.lower().rstrip('.'))
        self.names = names
        self._addresses = None
        self._addresses_at = 0.0

    def local_addresses(self):
        now = time.monotonic()
        if self._addresses is None or now - self._addresses_at > self.ADDRESS_TTL:
            addrs = {'127.0.0.1', '::1'}
            try:
                addrs.update(_canonical(a[1]) for a in dispy.interface_addresses() if a[1])
            except OSError:
                pass
            self._addresses, self._addresses_at = addrs, now
        return self._addresses

    def is_local(self, client_ip):
        ip = _canonical(client_ip)
        return dispy.is_loopback(ip) or ip in self.local_addresses()

    def host_allowed(self, host_header):
        """Whether a Host header names this machine (by a name, or an address of its
        own); no header (HTTP/1.0 tools) is allowed: browsers always send one."""
        if host_header is None:
            return True
        host = _host_part(host_header)
        if host is None:
            return False
        if host in self.names:
            return True
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            return False
        return dispy.is_loopback(ip) or ip in self.local_addresses()

    def token_ok(self, presented):
        return bool(presented) and hmac.compare_digest(str(presented).encode(),
                                                       self.token.encode())

    @staticmethod
    def origin_ok(origin, host_header, scheme):
        """A browser's Origin must be this server as the browser named it."""
        if origin is None:
            return True     # not a browser's cross-site request (they send Origin on POST)
        return host_header is not None and origin.lower() == (
            '%s://%s' % (scheme, host_header)).lower()


def _canonical(ip):
    ip = ip.split('%')[0]
    if ip.startswith('::ffff:') and '.' in ip:
        ip = ip[7:]
    return ip


def _host_part(host_header):
    """The host of a Host header, lower case ('[::1]:8181' -> '::1'); None if malformed."""
    host = host_header.strip().lower()
    if host.startswith('['):
        end = host.find(']')
        if end < 0 or (host[end + 1:] and not host[end + 1:].startswith(':')):
            return None
        return host[1:end]
    if host.count(':') == 1:
        host, port = host.split(':')
        if not port.isdigit():
            return None
    elif ':' in host:
        return None
    return host.rstrip('.') or None


# ================================================================================
# The HTTP server: threads per connection, TLS in the connection's thread
# ================================================================================

class HTTPError(Exception):
    """A request refused: its status and the text the client is told."""

    def __init__(self, status, text, headers=()):
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers


class Request:
    """What a handler passes to the WebMonitor: parsed, size-checked."""

    __slots__ = ('method', 'path', 'query', 'headers', 'body', 'client_ip', 'scheme',
                 'cookies')

    def __init__(self, method, path, query, headers, body, client_ip, scheme, cookies):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.body, self.client_ip, self.scheme, self.cookies = body, client_ip, scheme, cookies

    def json(self):
        ctype = (self.headers.get('Content-Type') or '').split(';')[0].strip().lower()
        if ctype != 'application/json':
            raise HTTPError(415, 'changes are sent as application/json')
        try:
            data = json.loads(self.body.decode('utf-8'))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise HTTPError(400, 'malformed JSON: %s' % str(exc)[:200]) from None
        if not isinstance(data, dict):
            raise HTTPError(400, 'a JSON object is expected')
        return data


class Response:
    __slots__ = ('status', 'body', 'content_type', 'headers')

    def __init__(self, status, body, content_type, headers=()):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers = list(headers)

    @classmethod
    def json(cls, data, status=200):
        return cls(status, json.dumps(data, separators=(',', ':')).encode(),
                   'application/json')

    @classmethod
    def text_page(cls, status, title, text, headers=()):
        body = ('<!DOCTYPE html><html><head><meta charset="utf-8"><meta name="viewport" '
                'content="width=device-width, initial-scale=1"><title>%s</title></head>'
                '<body><h1>%s</h1><p>%s</p></body></html>'
                % (html.escape(title), html.escape(title), html.escape(text)))
        return cls(status, body.encode(), 'text/html; charset=utf-8', headers)


class _HeadLimit:
    """The connection's reader, counting the bytes of a request's header lines: past
    MAX_HEAD_BYTES http.server answers 431 (its own limits allow 100 lines of 64 KiB)."""

    def __init__(self, raw):
        self.raw = raw
        self.left = None            # bytes the header lines may still take; None: no count

    def readline(self, size=-1):
        line = self.raw.readline(size)
        if self.left is not None:
            self.left -= len(line)
            if self.left < 0:
                raise http.client.LineTooLong('request head over %d bytes' % MAX_HEAD_BYTES)
        return line

    def read(self, size=-1):
        return self.raw.read(size)

    def close(self):
        self.raw.close()


class MonitorHandler(http.server.BaseHTTPRequestHandler):
    """One connection (keep-alive: many requests).  Everything it reads is bounded (the
    head's size; the whole request's time, REQUEST_TIMEOUT, cut by the server); a
    request it cannot parse gets a 4xx; an error of ours gets a 500 without details
    (they go to the log).  Any answer but a success closes the connection: bytes of
    a refused request are never read as the next one's."""

    protocol_version = 'HTTP/1.1'
    default_request_version = 'HTTP/1.0'   # an unparsable request line still gets a status
    server_version = 'dispy-monitor/' + __version__
    ONE_HEADER = ('Host', 'Content-Length', 'Content-Type', 'Origin', TOKEN_HEADER, 'Cookie')

    def setup(self):
        super().setup()
        self.rfile = _HeadLimit(self.rfile)

    def handle_one_request(self):
        # The time allowed for this request (or the wait for it, when idle) starts now.
        self.server.deadlines.watch(threading.get_ident(), REQUEST_TIMEOUT)
        super().handle_one_request()

    def parse_request(self):
        self.rfile.left = MAX_HEAD_BYTES
        try:
            return super().parse_request()
        finally:
            self.rfile.left = None

    def do_GET(self):
        self._serve('GET')

    def do_HEAD(self):
        self._serve('HEAD')

    def do_POST(self):
        self._serve('POST')

    def _method_not_allowed(self):
        self.close_connection = True        # its body, if any, is never read
        self._send(Response.json({'error': 'method not allowed'}, 405),
                   head=False, extra=[('Allow', 'GET, HEAD, POST')])

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    def _serve(self, method):
        try:
            request = self._request(method)
            self.server.deadlines.pause(threading.get_ident())    # read: no more deadline
            response = self.server.app.respond(request)
        except HTTPError as exc:
            response = Response.json({'error': exc.text}, exc.status)
            response.headers.extend(exc.headers)
        except Exception:
            logger.warning('web monitor: %s %s failed', method, self._plain_path(),
                           exc_info=True)
            response = Response.json({'error': 'internal error (see the program\'s log)'}, 500)
        self._send(response, head=method == 'HEAD')

    def _request(self, method):
        """The request, once its framing is beyond doubt (one Host, one length, no
        transfer coding, a path, no body on a GET)."""
        headers = self.headers
        for name in self.ONE_HEADER:
            if len(headers.get_all(name, ())) > 1:
                raise HTTPError(400, 'more than one %s header' % name)
        if headers.get('Transfer-Encoding') is not None:
            raise HTTPError(400, 'transfer codings are not accepted: send a Content-Length')
        if headers.get('Host') is None and self.request_version == 'HTTP/1.1':
            raise HTTPError(400, 'an HTTP/1.1 request needs a Host header')
        if not self.path.startswith('/'):
            raise HTTPError(400, 'the request target must be a path')
        length = headers.get('Content-Length')
        if length is not None and not re.fullmatch(r'[0-9]{1,9}', length.strip()):
            raise HTTPError(400, 'malformed Content-Length')
        length = int(length) if length is not None else None
        body = b''
        if method != 'POST':
            if length:
                raise HTTPError(400, 'a %s request has no body' % method)
        elif length is None:
            raise HTTPError(411, 'a POST needs a Content-Length')
        elif length > MAX_BODY:
            raise HTTPError(413, 'request body over %d bytes' % MAX_BODY)
        else:
            body = self.rfile.read(length)
            if len(body) < length:
                raise HTTPError(400, 'request body cut short')
        parsed = urllib.parse.urlsplit(self.path)
        try:
            query = dict(urllib.parse.parse_qsl(parsed.query, max_num_fields=20))
        except ValueError:
            raise HTTPError(400, 'malformed query') from None
        cookies = {}
        for part in (headers.get('Cookie') or '').split(';'):
            name, _, value = part.strip().partition('=')
            if name:
                cookies[name] = value
        return Request(method, parsed.path, query, headers, body, self.client_address[0],
                       'https' if self.server.ssl_context else 'http', cookies)

    def _send(self, response, head, extra=()):
        if response.status >= 400:
            self.close_connection = True
        self.send_response(response.status)
        self.send_header('Content-Type', response.content_type)
        self.send_header('Content-Length', str(len(response.body)))
        for name, value in SECURITY_HEADERS + tuple(response.headers) + tuple(extra):
            self.send_header(name, value)
        if self.close_connection:
            self.send_header('Connection', 'close')
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, a head too big, ...):
        the same JSON and headers as every other answer."""
        self.close_connection = True
        text = message or self.responses.get(code, ('error',))[0]
        self._send(Response.json({'error': text}, code),
                   head=self.command == 'HEAD' or code < 200 or code in (204, 304))

    def _plain_path(self):
        """The path without its query: a token in the query never reaches the log."""
        return urllib.parse.urlsplit(getattr(self, 'path', '') or '').path[:200]

    def version_string(self):
        return self.server_version

    def log_request(self, code='-', size='-'):
        logger.debug('web monitor %s: %s %s -> %s', self.client_address[0],
                     getattr(self, 'command', None), self._plain_path(), code)

    def log_message(self, format, *args):
        pass                # what http.server logs (request lines: tokens) is not wanted


class MonitorHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """``http.server`` with a thread per connection (none waits for another), at most
    MAX_CONNECTIONS at once and MAX_PER_ADDRESS from one address (more are answered
    503), every request's time bounded (``SocketDeadlines``, also for TLS
    handshakes, which run off the accepting thread), and errors logged, never
    printed as tracebacks."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64
    allow_reuse_address = True

    def __init__(self, addr, app, ssl_context=None):
        self.address_family = dispy.node_address_family(addr[0])
        self.app = app
        self.ssl_context = ssl_context
        self.admission = dispy.HandshakeAdmission(MAX_CONNECTIONS, MAX_PER_ADDRESS)
        self.deadlines = dispy.SocketDeadlines()    # one per connection, by thread
        super().__init__(addr, MonitorHandler)

    def server_bind(self):
        # HTTPServer.server_bind asks DNS for the host's full name: slow or hanging
        # where DNS is unreachable; nothing here uses it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def verify_request(self, request, client_address):
        if self.admission.admit(client_address[0]):
            return True
        logger.warning('web monitor: too many connections; %s turned away', client_address[0])
        if self.ssl_context is None:
            try:        # a fresh socket's buffer takes this without blocking
                request.sendall(b'HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n'
                                b'Connection: close\r\nRetry-After: 5\r\n\r\n')
            except OSError:
                pass
        return False

    def finish_request(self, request, client_address):
        key = threading.get_ident()
        self.deadlines.watch(key, TLS_HANDSHAKE_TIMEOUT, request)
        try:
            if self.ssl_context is None:
                return super().finish_request(request, client_address)
            try:
                tls = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                logger.debug('web monitor: TLS handshake with %s failed: %s',
                             client_address[0], exc)
                return None
            try:
                return super().finish_request(tls, client_address)
            finally:
                tls.close()
        finally:
            self.deadlines.forget(key)
            self.admission.release(client_address[0])

    def handle_error(self, request, client_address):
        logger.debug('web monitor: connection from %s failed', client_address[0],
                     exc_info=True)

    def service_actions(self):
        """Between requests, 4 times a second: requests past their time are cut off,
        and the monitor's own tick (never allowed to end the serving loop)."""
        self.deadlines.cut_overdue()
        try:
            self.app.tick()
        except Exception:
            logger.warning('web monitor: tick failed', exc_info=True)

    def close_connections(self):
        self.deadlines.cut_overdue(everything=True)


# ================================================================================
# WebMonitor: access, page files, routes (products add their own routes)
# ================================================================================

class WebMonitor:
    """A web monitor's server: binds at once, serves on a thread of its own until
    ``shutdown()``.  Subclasses give ``get_routes()`` / ``post_routes()``: path ->
    method(request) returning a JSON-able dict (or a Response); ``ARGS_SETTING``, the
    name of their show-arguments setting (an attribute), which ``api_settings`` sets."""

    PAGE_FILES = {'/': 'monitor.html', '/index.html': 'monitor.html',
                  '/monitor.html': 'monitor.html', '/monitor.js': 'monitor.js',
                  '/monitor-kit.js': 'monitor-kit.js', '/monitor.css': 'monitor.css'}
    CONTENT_TYPES = {'.html': 'text/html; charset=utf-8',
                     '.js': 'text/javascript; charset=utf-8',
                     '.css': 'text/css; charset=utf-8'}

    def __init__(self, host='', port=DEFAULT_PORT, poll_sec=10, DocumentRoot=None,
                 keyfile=None, certfile=None, allowed_hosts=(), token=None, name='dispy',
                 require_token=False):
        self.poll_sec = max(1, int(poll_sec))
        self.document_root = DocumentRoot
        if token is not None and not re.fullmatch(r'[A-Za-z0-9_-]{16,200}', token):
            raise ValueError('token: 16 to 200 letters, digits, "-" or "_"')
        self.token = token or secrets.token_urlsafe(24)
        self.name = name
        self.require_token = bool(require_token)    # even on this machine (shared hosts)
        self.stopped = False
        ssl_context = None
        if certfile:
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
            ssl_context.load_cert_chain(certfile, keyfile)
        bind = (dispy.resolve_host(host) or host) if host else ''
        self.server = MonitorHTTPServer((bind or '0.0.0.0', int(port)), self, ssl_context)
        self.port = self.server.server_address[1]
        self.access = Access(self.token, allowed_hosts, host or '', self.port)
        self.get = self.get_routes()
        self.post = self.post_routes()
        self._polled = threading.Condition()
        self._last_poll = None          # monotonic time of the last data request
        self._polls = 0
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={
            'poll_interval': 0.25}, daemon=True, name='%s-httpd' % name)
        self.thread.start()
        self._announce()

    # -- hooks -----------------------------------------------------------------------------
    def get_routes(self):
        return {}

    def tick(self):
        """Called on the serving thread a few times a second."""

    def post_routes(self):
        return {}

    ARGS_SETTING = None     # the setting of whether the pages show arguments: its name
    args_allowed = True     # False: the program hid them for good (the page cannot show them)

    # -- starting and stopping -----------------------------------------------------------------
    def urls(self):
        """(URL for this machine, URL with the token for other hosts)."""
        scheme = 'https' if self.server.ssl_context else 'http'
        bound = self.server.server_address[0]
        local = bound if bound not in ('0.0.0.0', '::') else '127.0.0.1'
        other = bound
        if bound in ('0.0.0.0', '::'):
            addrs = [a for a in self.access.local_addresses() if not dispy.is_loopback(a)
                     and ':' not in a]
            towards = dispy.local_address_towards(('192.0.2.1', 9))  # default route's (no packet)
            other = towards if towards in addrs else (
                sorted(addrs)[0] if addrs else socket.gethostname())

        def url(h):
            return '%s://%s:%d/' % (scheme, '[%s]' % h if ':' in h else h, self.port)
        return url(local), url(other) + '?token=' + self.token

    def _announce(self):
        local, other = self.urls()
        # On stderr whatever the log level: the user needs it to open the page elsewhere.
        if dispy.is_loopback(self.server.server_address[0]):
            text = '%s (this machine only: a loopback address; access token %s)' % (
                local, self.token)
        elif self.require_token:
            text = '%s?token=%s (the token is needed on this machine too)' % (local, self.token)
        else:
            text = '%s (this machine); from other hosts: %s' % (local, other)
        print('%s web monitor: %s' % (self.name, text), file=sys.stderr, flush=True)

    def shutdown(self, wait=True):
        """Stops serving.  ``wait``: if a browser is polling, its next poll (within
        poll_sec) is served first, so it shows the final state."""
        if self.stopped:
            return
        if wait:
            with self._polled:
                last, polls = self._last_poll, self._polls
                if last is not None and time.monotonic() - last < 2 * self.poll_sec + 1:
                    self._polled.wait_for(lambda: self._polls > polls, self.poll_sec + 1)
        self.stopped = True
        self.server.shutdown()
        self.server.server_close()
        self.server.close_connections()     # keep-alive ones too: nothing served after
        self.thread.join(5)
        self.closed()

    def closed(self):
        """Hook: the server has stopped."""

    # -- one request ---------------------------------------------------------------------------
    def respond(self, request):
        access = self.access
        host = request.headers.get('Host')
        if not access.host_allowed(host):
            raise HTTPError(421, 'this server does not answer to the name %r; if it is a '
                            'name of this machine, start the monitor with '
                            'allowed_hosts=[%r]' % (host, _host_part(host or '') or host))
        in_query = access.token_ok(request.query.get('token'))
        has_token = in_query or any(access.token_ok(t) for t in (
            request.headers.get(TOKEN_HEADER), request.cookies.get(access.cookie_name)))
        if self.stopped:
            raise HTTPError(503, 'the monitor has stopped')
        if not (has_token or (access.is_local(request.client_ip) and not self.require_token)):
            return self._needs_token(request)
        if request.method == 'POST':
            return self._change(request)
        if request.path in self.PAGE_FILES:
            if in_query:            # first visit: keep it in a cookie, out of the address bar
                return self._keep_token(request)
            return self._page_file(self.PAGE_FILES[request.path])
        if request.path == '/favicon.ico':
            return Response(204, b'', 'image/x-icon')
        route = self.get.get(request.path)
        if route is None:
            if request.path in self.post:
                raise HTTPError(405, 'changes are POST requests', [('Allow', 'POST')])
            raise HTTPError(404, 'no such page: %s' % request.path[:200])
        self._data_served()
        return self._as_response(route(request))

    def _change(self, request):
        route = self.post.get(request.path)
        if route is None:
            raise HTTPError(404 if request.path not in self.get else 405,
                            'no such action: %s' % request.path[:200])
        if not self.access.token_ok(request.headers.get(TOKEN_HEADER)):
            raise HTTPError(403, 'a change needs the page\'s token in the %s header'
                            % TOKEN_HEADER)
        if not Access.origin_ok(request.headers.get('Origin'), request.headers.get('Host'),
                                request.scheme):
            raise HTTPError(403, 'a change from another site\'s page is refused')
        if (request.headers.get('Sec-Fetch-Site') or 'same-origin') not in ('same-origin',
                                                                          'none'):
            raise HTTPError(403, 'a change from another site\'s page is refused')
        return self._as_response(route(request, request.json()))

    def _needs_token(self, request):
        text = ('This monitor answers browsers on other hosts only with its access token. '
                'Open the address that the program printed on its standard error when the '
                'monitor started (it ends with ?token=...); the browser keeps it afterwards.')
        if request.path.startswith('/api/'):
            raise HTTPError(403, text)
        return Response.text_page(403, '%s monitor: access token needed' % self.name, text)

    def _keep_token(self, request):
        # Lax: a link to the page (from mail, a chat) carries it; changes need the header
        cookie = '%s=%s; Path=/; HttpOnly; SameSite=Lax%s' % (
            self.access.cookie_name, self.token, '; Secure' if request.scheme == 'https'
            else '')
        return Response(303, b'', 'text/plain', [('Location', request.path),
                                                 ('Set-Cookie', cookie)])

    def _page_file(self, name):
        data = None
        if self.document_root:
            try:
                with open(os.path.join(self.document_root, name), 'rb') as f:
                    data = f.read()
            except OSError:
                data = None     # the built-in copy
        if data is None:
            data = PAGE[name].encode()
        if name.endswith('.html'):
            data = data.replace(b'{{TOKEN}}', html.escape(self.token).encode())
        return Response(200, data, self.CONTENT_TYPES[os.path.splitext(name)[1]])

    def _data_served(self):
        with self._polled:
            self._last_poll = time.monotonic()
            self._polls += 1
            self._polled.notify_all()

    @staticmethod
    def _as_response(result):
        return result if isinstance(result, Response) else Response.json(result)

    # -- what both products' actions share ------------------------------------------------------
    def api_settings(self, request, data):
        """POST /api/settings {ARGS_SETTING: bool}: the setting (an attribute of the
        same name) becomes that; the answer is its value."""
        name = self.ARGS_SETTING
        if name in data:
            if not isinstance(data[name], bool):
                raise HTTPError(400, '%s: true or false' % name)
            if data[name] and not self.args_allowed:
                raise HTTPError(403, 'the program started the monitor with '
                                '%s=False: arguments stay hidden' % name)
            setattr(self, name, data[name])
        return {name: getattr(self, name)}

    @staticmethod
    def _act_on_keys(data, field, width, act):
        """A POST's data[field]: a list of keys (at most 10000; each becomes str, at most
        width characters); act(key) is true where it succeeded: (succeeded, failed)."""
        keys = data.get(field)
        if not isinstance(keys, list) or len(keys) > 10000:
            raise HTTPError(400, '%s: a list of %s keys is expected' % (field, field[:-1]))
        succeeded, failed = [], []
        for key in keys:
            key = str(key)[:width]
            (succeeded if act(key) else failed).append(key)
        return succeeded, failed


# ================================================================================
# DispyHTTPServer: dispy's clusters
# ================================================================================

class DispyHTTPServer(WebMonitor):
    """The dispy web monitor of one or more clusters (4.15's interface).

    ``cluster``: a JobCluster / SharedJobCluster, a list of them, or None (add them
    with ``add_cluster``).  The cluster's own ``cluster_status`` callback keeps being
    called: the monitor takes the cluster's events beside it.  ``show_job_args=False``
    hides job arguments for good (the page may hide them, never show them then).
    Ours: ``allowed_hosts`` (more names this machine answers to, see ``Access``),
    ``token`` (default: a new random one, printed on stderr), ``require_token`` (even
    browsers on this machine need it: a machine many people log in to).

    Locks: the cluster's (the scheduler's) lock, then a ClusterMonitor's; this server's
    ``_lock`` only guards its list of clusters and is never held while taking another."""

    NODE_OPS = ('set_cpus', 'allocate', 'deallocate', 'close')
    ARGS_SETTING = 'show_job_args'

    def __init__(self, cluster, host='', port=DEFAULT_PORT, poll_sec=10, DocumentRoot=None,
                 keyfile=None, certfile=None, show_job_args=True, allowed_hosts=(),
                 token=None, require_token=False):
        self.args_allowed = self.show_job_args = bool(show_job_args)
        self._clusters = collections.OrderedDict()     # id -> ClusterMonitor
        self._ids = itertools.count(1)
        self._sampled = 0               # the second of the last history point
        self._lock = threading.Lock()
        super().__init__(host, port, poll_sec, DocumentRoot, keyfile, certfile,
                         allowed_hosts, token, 'dispy', require_token)
        for one in (cluster if isinstance(cluster, (list, tuple)) else [cluster]):
            if one is not None:     # once the port is bound: a failed bind attaches none
                self.add_cluster(one)

    def add_cluster(self, cluster):
        """Shows one more cluster."""
        with self._lock:
            if self.stopped or any(m.cluster is cluster for m in self._clusters.values()):
                return
        monitor = ClusterMonitor.attach(cluster)    # takes the cluster's lock: not ours
        with self._lock:
            if not self.stopped and all(m.cluster is not cluster
                                        for m in self._clusters.values()):
                self._clusters[next(self._ids)] = monitor
                return
        monitor.detach()        # stopped, or added by another thread meanwhile

    def del_cluster(self, cluster):
        """Stops showing a cluster."""
        with self._lock:
            gone = [(cid, m) for cid, m in self._clusters.items() if m.cluster is cluster]
            for cid, _monitor in gone:
                del self._clusters[cid]
        for _cid, monitor in gone:
            monitor.detach()

    def closed(self):
        with self._lock:
            monitors = list(self._clusters.values())
            self._clusters.clear()
        for monitor in monitors:
            monitor.detach()

    def get_routes(self):
        return {'/api/status': self.api_status, '/api/node': self.api_node}

    def tick(self):
        now = time.time()
        if int(now) != self._sampled:
            self._sampled = int(now)
            for _cid, monitor in self._monitors():
                monitor.sample(now)

    def post_routes(self):
        return {'/api/cancel': self.api_cancel, '/api/node': self.api_node_op,
                '/api/settings': self.api_settings}

    def _monitors(self):
        with self._lock:
            return list(self._clusters.items())

    def _monitor(self, data):
        cid = data.get('cluster')
        with self._lock:
            monitor = self._clusters.get(cid) if type(cid) is int else None   # not True
        if monitor is None:
            raise HTTPError(404, 'no cluster %r' % (cid,))
        return monitor

    @staticmethod
    def _cluster_info(cid, monitor):
        return {'id': cid, 'name': shown(monitor.cluster.name),
                'closed': bool(monitor.cluster.is_closed())}

    # -- GET ---------------------------------------------------------------------------------
    def api_status(self, request):
        try:
            since = float(request.query.get('since') or 0)
        except ValueError:
            raise HTTPError(400, 'since: a number of seconds is expected') from None
        clusters, now = [], time.time()
        for cid, monitor in self._monitors():
            monitor.sample(now)         # the history is up to date at each poll
            info = self._cluster_info(cid, monitor)
            info.update(monitor.status(since))
            clusters.append(info)
        return {'time': time.time(), 'poll_sec': self.poll_sec,
                'show_job_args': self.show_job_args, 'version': __version__,
                'clusters': clusters}

    def api_node(self, request):
        ip_addr = request.query.get('ip_addr') or ''
        clusters, name = [], ''
        for cid, monitor in self._monitors():
            found = monitor.node(ip_addr)
            if found is None:
                continue
            figures, jobs = found
            node_name = figures.pop('name')
            name = name or node_name
            figures.pop('ip_addr')
            info = dict(figures, **self._cluster_info(cid, monitor))
            info['jobs'] = [self._job_info(job) for job in jobs]
            clusters.append(info)
        if not clusters:
            raise HTTPError(404, 'no cluster knows node %r' % ip_addr[:100])
        return {'ip_addr': ip_addr, 'name': name, 'time': time.time(),
                'show_job_args': self.show_job_args, 'clusters': clusters}

    def _job_info(self, job):
        info = {'key': str(job._key), 'id': shown(job.id), 'start_time': job.start_time}
        args = getattr(job, 'args', None)
        if self.show_job_args and args is not None:     # dispyscheduler has no arguments
            info['args'] = shown(tuple(args))
            info['kwargs'] = shown(dict(job.kwargs or {}))
        return info

    # -- POST --------------------------------------------------------------------------------
    def api_cancel(self, request, data):
        monitor = self._monitor(data)

        def cancel(key):
            job = monitor.running_job(int(key)) if key.isascii() and key.isdigit() else None
            return job is not None and monitor.cluster.cancel(job) == 0
        cancelled, failed = self._act_on_keys(data, 'jobs', 30, cancel)
        if cancelled:
            logger.info('web monitor: %d job(s) of %s cancelled by %s', len(cancelled),
                        monitor.cluster.name, request.client_ip)
        return {'cancelled': cancelled, 'failed': failed}

    def api_node_op(self, request, data):
        monitor, op, ip_addr = self._monitor(data), data.get('op'), data.get('ip_addr')
        if op not in self.NODE_OPS:
            raise HTTPError(400, 'op: one of %s' % ', '.join(self.NODE_OPS))
        if not isinstance(ip_addr, str) or monitor.node(ip_addr) is None:
            raise HTTPError(404, 'cluster has no node %r' % (str(ip_addr)[:100],))
        cluster = monitor.cluster
        if op == 'set_cpus':
            cpus = data.get('cpus')
            if not isinstance(cpus, int) or isinstance(cpus, bool):
                raise HTTPError(400, 'cpus: a whole number is expected')
            result = cluster.set_node_cpus(ip_addr, cpus)     # (the monitor hears of it)
        elif op == 'deallocate':
            result = cluster.deallocate_node(ip_addr)
        elif op == 'close':
            result = cluster.close_node(ip_addr)
        else:
            result = self._allocate(monitor, ip_addr)
        logger.info('web monitor: %s %s of %s by %s: %s', op, ip_addr, cluster.name,
                    request.client_ip, result)
        return {'op': op, 'ip_addr': ip_addr, 'result': result}

    @staticmethod
    def _allocate(monitor, ip_addr):
        """A node the cluster deallocated gets its CPUs back; another is set up (again)."""
        figures, _jobs = monitor.node(ip_addr)
        if figures['state'] == 'ready' and figures['cpus'] == 0 and figures['avail_cpus']:
            result = monitor.cluster.set_node_cpus(ip_addr, figures['avail_cpus'])
            if result >= 0:
                return result
        return monitor.cluster.allocate_node(ip_addr)



# ================================================================================
# ComputationMonitor: a dispycos computation's figures, kept from its status messages
# ================================================================================

MAX_TASKS_SHOWN = 1000      # running tasks of one server sent to the page
MAX_ARGS_SHOWN = 20         # arguments (and as many keyword arguments) shown per task
MAX_TASK_TEXT = 4000        # characters of one task's arguments kept, in all
FINISHED_KEPT = 100000      # keys of ended tasks remembered (a late duplicate is ignored)


class _RunningTask:
    """A remote task as the monitor shows it: the Task reference and the text of its
    arguments (made on the runner thread when it started, if arguments are shown
    then; the arguments themselves are not kept)."""

    __slots__ = ('task', 'name', 'start_time', 'texts')

    def __init__(self, task, info, texts):
        self.task = task
        self.name = str(task.name)
        start = getattr(info, 'start_time', None)
        self.start_time = start if isinstance(start, (int, float)) else time.time()
        self.texts = texts          # ([arg text], {name: text}), or None: not kept


class _ServerFigures:
    __slots__ = ('location', 'addr', 'state', 'submitted', 'done', 'running')

    def __init__(self, location, addr):
        self.location, self.addr = location, addr
        self.state = 'discovered'
        self.submitted = self.done = 0
        self.running = {}           # task key -> _RunningTask

    def as_dict(self):
        return {'location': self.location, 'addr': self.addr, 'state': self.state,
                'submitted': self.submitted, 'done': self.done, 'running': len(self.running)}


class _CosNodeFigures:
    __slots__ = ('addr', 'location', 'name', 'state', 'avail', 'node_servers', 'servers')

    def __init__(self, addr):
        self.addr = addr
        self.location = self.name = ''
        self.state = 'discovered'
        self.avail = None           # {'cpu', 'memory', 'disk', 'swap'} (psutil on the node)
        self.node_servers = 0       # servers the node runs (the computation may use fewer)
        self.servers = {}           # location text -> _ServerFigures

    def as_dict(self):
        servers = self.servers.values()
        return {'addr': self.addr, 'location': self.location, 'name': self.name,
                'state': self.state, 'avail': self.avail, 'node_servers': self.node_servers,
                'servers': sum(s.state != 'closed' for s in servers),
                'submitted': sum(s.submitted for s in servers),
                'done': sum(s.done for s in servers),
                'running': sum(len(s.running) for s in servers)}


def _task_key(task):
    """A remote task's key: its name and its server ('compute/12@10.0.0.5:9707')."""
    return '%s@%s' % (task.name, task.location)


class ComputationMonitor:
    """What the dispycos monitor knows of one computation, kept from the messages its
    status task receives (``message``, on the dispycos runner thread): nodes by
    address, their servers by location, each server's running tasks.  The page's
    requests (HTTP threads) read snapshots under ``lock``; a message takes it for a
    few dict operations."""

    def __init__(self, dispycos, computation_id):
        self.cos = dispycos             # the dispycos module (status names, classes)
        self.computation_id = computation_id
        self.lock = threading.Lock()
        self.keep_args = True           # make the text of new tasks' arguments
        self.nodes = {}                 # address -> _CosNodeFigures
        self.servers = {}               # location text -> _ServerFigures
        self.finished = collections.OrderedDict()   # keys of tasks counted as done
        self.submitted = self.done = self.terminated = self.failed = 0
        self.state = 'not scheduled'
        self.scheduled_time = self.closed_time = None
        cos = dispycos
        self._handlers = {
            cos.NodeDiscovered: self._node, cos.NodeInitialized: self._node,
            cos.NodeClosed: self._node, cos.ServerDiscovered: self._server,
            cos.ServerInitialized: self._server, cos.ServerClosed: self._server,
            cos.TaskCreated: self._task_created,
            cos.ComputationScheduled: self._computation,
            cos.ComputationClosed: self._computation}
        self._states = {cos.NodeDiscovered: 'discovered', cos.NodeInitialized: 'ready',
                        cos.NodeClosed: 'closed', cos.ServerDiscovered: 'discovered',
                        cos.ServerInitialized: 'ready', cos.ServerClosed: 'closed'}

    # -- messages (the runner thread) -------------------------------------------------------
    def message(self, msg):
        """One status message: a DispycosStatus, a MonitorStatus (a task ended) or a
        DispycosNodeAvailInfo; anything else is not the monitor's."""
        cos = self.cos
        if isinstance(msg, cos.DispycosStatus):
            handler = self._handlers.get(msg.status)
            if handler is not None:
                handler(msg.status, msg.info)
        elif isinstance(msg, cos.MonitorStatus):
            # (a task of this program that the status task monitors is not ours)
            if isinstance(msg.info, cos.Task) and msg.info._remote is not None:
                self._task_ended(msg.info, msg.type)
        elif isinstance(msg, cos.DispycosNodeAvailInfo):
            self._node(None, msg)

    def _node(self, status, info):
        location = getattr(info, 'location', None)
        addr = getattr(location, 'addr', None)
        if addr is None:
            return
        avail = {name: getattr(info, name, None) for name in ('cpu', 'memory', 'disk', 'swap')}
        with self.lock:
            node = self._node_at(str(addr))
            node.location = str(location)
            node.name = str(getattr(info, 'name', None) or node.name or '')
            node.node_servers = getattr(info, 'servers', 0) or node.node_servers
            if any(v is not None for v in avail.values()):
                node.avail = avail
            if status is not None:
                node.state = self._states[status]

    def _server(self, status, location):
        addr = getattr(location, 'addr', None)
        if addr is None:
            return
        with self.lock:
            server = self._server_at(str(location), str(addr))
            server.state = self._states[status]
            # (a closed server's tasks stay running until their ends come, which may
            # be after its ServerClosed; those never told end with the computation)

    def _task_created(self, _status, info):
        task = getattr(info, 'task', None)
        if not isinstance(task, self.cos.Task):
            return
        key, location = _task_key(task), task.location
        texts = _argument_texts(info) if self.keep_args else None
        with self.lock:
            if key in self.finished:
                return                  # its end came first: counted then
            server = self._server_at(str(location), str(location.addr))
            if key not in server.running:
                server.running[key] = _RunningTask(task, info, texts)
                server.submitted += 1
                self.submitted += 1

    def _task_ended(self, task, how):
        key, location = _task_key(task), task.location
        with self.lock:
            if key in self.finished:
                return
            server = self._server_at(str(location), str(location.addr))
            if key not in server.running:       # its creation was never told: count it
                server.submitted += 1
                self.submitted += 1
            self._count_done(server, key)
            if how is GeneratorExit:
                self.terminated += 1
            elif how is not StopIteration:
                self.failed += 1

    def _computation(self, status, _info):
        with self.lock:
            if status == self.cos.ComputationScheduled:
                self.state, self.scheduled_time = 'scheduled', time.time()
            else:
                self.state, self.closed_time = 'closed', time.time()
                for server in self.servers.values():    # their ends never came
                    for key in list(server.running):
                        self._count_done(server, key)

    # -- lock held ----------------------------------------------------------------------------
    def _node_at(self, addr):
        return _entry(self.nodes, addr, lambda: _CosNodeFigures(addr))

    def _server_at(self, location, addr):
        def made():
            server = _ServerFigures(location, addr)
            self._node_at(addr).servers[location] = server
            return server
        return _entry(self.servers, location, made)

    def _count_done(self, server, key):
        server.running.pop(key, None)
        server.done += 1
        self.done += 1
        self.finished[key] = None
        if len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    # -- what the server reads (HTTP threads) -------------------------------------------------
    def cluster(self):
        with self.lock:
            running = sum(len(s.running) for s in self.servers.values())
            return {'computation': {'id': self.computation_id, 'state': self.state,
                                    'scheduled_time': self.scheduled_time,
                                    'closed_time': self.closed_time},
                    'submitted': self.submitted, 'done': self.done, 'running': running,
                    'terminated': self.terminated, 'failed': self.failed,
                    'nodes': [node.as_dict() for node in self.nodes.values()]}

    def node(self, addr):
        with self.lock:
            node = self.nodes.get(addr)
            if node is None:
                return None
            info = node.as_dict()
            info['server_list'] = [s.as_dict() for s in node.servers.values()]
            return info

    def server(self, location, limit=MAX_TASKS_SHOWN):
        """(figures of the server, its first ``limit`` running tasks) or None."""
        with self.lock:
            server = self.servers.get(location)
            if server is None:
                return None
            tasks = list(itertools.islice(server.running.items(), limit))
            return server.as_dict(), tasks

    def running_task(self, location, key):
        with self.lock:
            server = self.servers.get(location)
            entry = server.running.get(key) if server is not None else None
            return entry.task if entry is not None else None


def shown_str(value):
    """A task argument as the page shows it: its str() (the seed: a user class may
    give ``__str__``), containers cut short as ``shown`` cuts them, at most MAX_SHOWN
    characters; one whose str() raises is shown as such."""
    try:
        if isinstance(value, str):
            text = value
        elif isinstance(value, (tuple, list, dict, set, frozenset, collections.deque)) or \
                type(value).__str__ is object.__str__:
            text = _REPR.repr(value)
        else:
            text = str(value)
            if not isinstance(text, str):
                raise TypeError('__str__ returned %s' % type(text).__name__)
    except Exception as exc:
        text = '<unprintable %s: %s>' % (type(value).__name__, exc)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + '...'


def _argument_texts(info):
    """([text of each argument], {name: text}) of a TaskInfo, at most MAX_ARGS_SHOWN
    of each and about MAX_TASK_TEXT characters in all (reading ``args`` unpickles
    them)."""
    try:
        args, kwargs = tuple(info.args), dict(info.kwargs)
    except Exception as exc:
        return ['<arguments not readable: %s>' % shown_str(exc)], {}
    budget = [MAX_TASK_TEXT]

    def text(value, limit=None):
        shown = shown_str(value)[:limit]
        if len(shown) > budget[0]:
            shown = shown[:max(0, budget[0])] + '...'
        budget[0] -= len(shown)
        return shown
    texts = [text(a) for a in args[:MAX_ARGS_SHOWN]]
    if len(args) > MAX_ARGS_SHOWN:
        texts.append('... (%d more)' % (len(args) - MAX_ARGS_SHOWN))
    named = {text(k, 100): text(v) for k, v in itertools.islice(kwargs.items(), MAX_ARGS_SHOWN)}
    return texts, named


# ================================================================================
# DispycosHTTPServer: a dispycos computation (dispycos.httpd.HTTPServer)
# ================================================================================

class DispycosHTTPServer(WebMonitor):
    """The dispycos web monitor of one computation (seed 003 §6.8; ``dispycos.HTTPServer``
    makes one).  Create it before ``yield computation.schedule()``: it becomes the
    computation's ``status_task``: with no status task of its own, the monitor's
    (``self.status_task``, a daemon dispycos Task on the runner thread); with one, a
    chaining task that gives each message to the monitor, then to it, in order, once.
    A program may also send messages to ``self.status_task`` (as pycos's did): they
    update the monitor and go nowhere else.  ``show_task_args``: whether the Server
    page shows tasks' arguments (their str(), at most MAX_TASK_TEXT characters a task,
    made on the runner thread when the task starts and shown; a task that started
    while it was off has none); the Cluster page may turn it on or off.  ``DocumentRoot``: a folder whose
    dispycos.html, dispycos.js, monitor-kit.js or monitor.css replace the built-in
    ones.  ``allowed_hosts``, ``token`` and ``require_token`` are DispyHTTPServer's.
    ``shutdown()`` gives the computation its own status task back (the monitor's task
    keeps passing messages on to it: the scheduler has its address).

    Endpoints: GET /api/cluster (the computation, totals, a row per node), /api/node
    ?addr= (its figures, availability, servers), /api/server?location= (its figures,
    at most MAX_TASKS_SHOWN running tasks: key, name, start_time, and args / kwargs as
    text while show_task_args); POST /api/terminate {server, tasks: [key]} and
    /api/settings {show_task_args}."""

    PAGE_FILES = {'/': 'dispycos.html', '/index.html': 'dispycos.html',
                  '/dispycos.html': 'dispycos.html', '/dispycos.js': 'dispycos.js',
                  '/monitor-kit.js': 'monitor-kit.js', '/monitor.css': 'monitor.css'}
    ARGS_SETTING = 'show_task_args'

    def __init__(self, computation, host='', port=DEFAULT_PORT, poll_sec=10, DocumentRoot=None,
                 keyfile=None, certfile=None, show_task_args=True, allowed_hosts=(),
                 token=None, require_token=False):
        import dispycos     # here: dispy.httpd alone never loads the dispycos runtime
        self.computation = computation
        self.monitor = ComputationMonitor(dispycos, str(getattr(computation, 'id', '')))
        self.show_task_args = bool(show_task_args)
        self.status_task = self._client_status = self._chain_task = None
        super().__init__(host, port, poll_sec, DocumentRoot, keyfile, certfile,
                         allowed_hosts, token, 'dispycos', require_token)
        try:
            self._take_status(dispycos, computation)
        except BaseException:
            self.shutdown(wait=False)
            raise

    def _take_status(self, dispycos, computation):
        """Becomes the computation's status task; the one it had is told after us."""
        if getattr(computation, '_scheduler', None) is not None:
            logger.warning('dispycos web monitor: the computation is scheduled already; '
                           'create the HTTPServer before computation.schedule() to see '
                           'its status')
        self._client_status = computation.status_task
        self.status_task = dispycos.Task(self._status_proc)
        self.status_task.set_daemon()
        if self._client_status is None:
            computation.status_task = self.status_task
        else:
            self._chain_task = dispycos.Task(self._chain_proc)
            self._chain_task.set_daemon()
            computation.status_task = self._chain_task

    @property
    def show_task_args(self):
        return self.monitor.keep_args

    @show_task_args.setter
    def show_task_args(self, value):
        self.monitor.keep_args = bool(value)

    def _status_proc(self, task=None):
        """``self.status_task``: every message updates the figures (and goes no
        further: a program's status task may pass its messages on to this one)."""
        while True:
            self._update((yield task.receive()))

    def _chain_proc(self, task=None):
        """The computation's status task when the program had one: the monitor
        reads each message, then the program's task gets it."""
        while True:
            msg = yield task.receive()
            self._update(msg)
            self._client_status.send(msg)

    def _update(self, msg):
        if not self.stopped:
            try:
                self.monitor.message(msg)
            except Exception:
                logger.warning('dispycos web monitor: status %r not understood', msg,
                               exc_info=True)

    def closed(self):
        if self.computation.status_task in (self.status_task, self._chain_task) and \
                self.status_task is not None:
            self.computation.status_task = self._client_status

    def get_routes(self):
        return {'/api/cluster': self.api_cluster, '/api/node': self.api_node,
                '/api/server': self.api_server}

    def post_routes(self):
        return {'/api/terminate': self.api_terminate, '/api/settings': self.api_settings}

    def _common(self):
        return {'time': time.time(), 'poll_sec': self.poll_sec,
                'show_task_args': self.show_task_args, 'version': __version__}

    # -- GET ---------------------------------------------------------------------------------
    def api_cluster(self, request):
        return dict(self._common(), **self.monitor.cluster())

    def api_node(self, request):
        addr = request.query.get('addr') or ''
        info = self.monitor.node(addr)
        if info is None:
            raise HTTPError(404, 'no node %r in this computation' % addr[:100])
        return dict(self._common(), **info)

    def api_server(self, request):
        location = request.query.get('location') or ''
        found = self.monitor.server(location)
        if found is None:
            raise HTTPError(404, 'no server %r in this computation' % location[:100])
        figures, tasks = found
        show = self.show_task_args
        figures['tasks'] = [self._task_info(key, entry, show) for key, entry in tasks]
        return dict(self._common(), **figures)

    @staticmethod
    def _task_info(key, entry, show_args):
        info = {'key': key, 'name': entry.name, 'start_time': entry.start_time}
        if show_args:
            info['args'], info['kwargs'] = entry.texts or (
                ['(not kept: arguments were not shown when it started)'], {})
        return info

    # -- POST --------------------------------------------------------------------------------
    def api_terminate(self, request, data):
        location = data.get('server')
        if not isinstance(location, str) or self.monitor.server(location, 0) is None:
            raise HTTPError(404, 'no server %r in this computation' % (str(location)[:100],))

        def terminate(key):
            task = self.monitor.running_task(location, key)
            # Task.terminate is for any thread: a remote task's is a notice the runner sends
            return task is not None and task.terminate() == 0
        terminated, failed = self._act_on_keys(data, 'tasks', 300, terminate)
        if terminated:
            logger.info('web monitor: %d task(s) at %s terminated by %s', len(terminated),
                        location, request.client_ip)
        return {'terminated': terminated, 'failed': failed}


# ================================================================================
# The pages (dispy's at /, /monitor.js; dispycos's at /, /dispycos.js; both use
# /monitor-kit.js and /monitor.css; DocumentRoot may replace any of them)
# ================================================================================

# The pages' own files, as the browser gets them.  A placeholder {{TOKEN}} in the HTML
# becomes the access token (HTML-escaped).  Everything a page shows is set with
# textContent: nothing received is ever parsed as HTML.  What both pages share is
# shared, not copied: the HTML around their views (_page_html), the styles, and the
# browser code of monitor-kit.js (DOM builders, the fetch wrapper, the error banner,
# the poll loop, the sorted node table, the table of running jobs / tasks with its
# selection, the routing by location.hash and the menu, the show-arguments setting).

PAGE = {}

_PAGE_HTML = r'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="dispy-token" content="{{TOKEN}}">
<title>%(product)s monitor</title>
<link rel="stylesheet" href="/monitor.css">
<script src="/monitor-kit.js" defer></script>
<script src="/%(script)s" defer></script>
</head>
<body>
<header class="topbar">
  <h1 class="brand">%(product)s monitor</h1>
  <nav class="menu" aria-label="Views">
%(menu)s
  </nav>
  <label class="poll">Poll every
    <input id="poll-sec" type="number" min="1" max="3600" step="1" value="10" inputmode="numeric"> s</label>
  <span id="last-update"></span>
</header>
<div id="error" class="error" role="alert" hidden>
  <span id="error-text"></span>
  <button type="button" id="error-dismiss" class="dismiss" aria-label="Dismiss">&times;</button>
</div>
<main>
%(views)s
</main>
<footer class="foot"><span id="version"></span></footer>
</body>
</html>
'''


def _page_html(product, script, views, menu):
    """A monitor's page: the shared head (styles, MonitorKit, then ``script``), top bar
    (menu: the views' names, the first one always enabled; the poll interval), error
    banner and footer, around ``views`` (HTML of the product's views)."""
    links = ['    <a id="nav-%s" href="#%s">%s</a>' % (menu[0].lower(), menu[0].lower(), menu[0])]
    links += ['    <a id="nav-%s" class="disabled" aria-disabled="true">%s</a>' % (name.lower(), name)
              for name in menu[1:]]
    return _PAGE_HTML % {'product': product, 'script': script, 'menu': '\n'.join(links),
                         'views': views.strip('\n')}


PAGE['monitor.html'] = _page_html('dispy', 'monitor.js', menu=('Cluster', 'Node'), views='''
  <div id="cluster-view" hidden>
    <div class="toolbar">
      <label class="check"><input type="checkbox" id="show-args"> Show job arguments</label>
    </div>
    <div id="clusters"><p class="empty">Loading&hellip;</p></div>
  </div>
  <div id="node-view" hidden>
    <h2 id="node-title">Node</h2>
    <p id="node-unknown" hidden><span id="node-unknown-text"></span> <a href="#cluster">Back to cluster view</a></p>
    <p id="node-empty" class="empty" hidden>This node is not used by any cluster.</p>
    <div id="node-clusters"></div>
    <div id="node-actions" class="actions">
      <button type="button" id="cancel-jobs" disabled>Cancel selected jobs</button>
      <span id="cancel-result" aria-live="polite"></span>
    </div>
  </div>
''')


def _item_view(view, body):
    '''A view of one item (#<view>=<id>, dispycos's page): its title, the note that it
    is not known (yet), its body (the ids MonitorKit's page script and dispycos.js use).'''
    return '''  <div id="%(v)s-view" hidden>
    <h2 id="%(v)s-title" class="view-title">%(t)s</h2>
    <p id="%(v)s-unknown" hidden><span id="%(v)s-unknown-text"></span> <a href="#cluster">Back to cluster view</a></p>
    <section id="%(v)s-body" class="node-cluster">
%(body)s
    </section>
  </div>''' % {'v': view, 't': view.capitalize(), 'body': body.strip('\n')}


PAGE['dispycos.html'] = _page_html('dispycos', 'dispycos.js', menu=('Cluster', 'Node', 'Server'),
                                   views='''
  <div id="cluster-view" hidden>
    <div class="toolbar">
      <label class="check"><input type="checkbox" id="show-args"> Show task arguments</label>
    </div>
    <section class="cluster">
      <div class="cluster-head"><h2>Computation</h2> <span id="computation-state" class="state"></span>
        <span id="computation-meta" class="meta"></span></div>
      <div id="cluster-figures" class="figures"></div>
      <div id="nodes"><p class="empty">Loading&hellip;</p></div>
    </section>
  </div>
''' + _item_view('node', '''
      <div id="node-figures" class="figures"></div>
      <h4>Availability</h4>
      <div id="node-avail"></div>
      <h4>Servers</h4>
      <div id="node-servers"></div>
''') + '\n' + _item_view('server', '''
      <p class="meta">On <a id="server-node" href="#cluster">its node</a></p>
      <div id="server-figures" class="figures"></div>
      <h4>Running tasks <span id="tasks-more" class="meta"></span></h4>
      <div id="server-tasks"></div>
      <div class="actions">
        <button type="button" id="terminate-tasks" class="danger" disabled>Terminate selected tasks</button>
        <span id="terminate-result" aria-live="polite"></span>
      </div>
''') + '\n')

PAGE['monitor.css'] = r'''/* The monitors' styles (dispy's page and dispycos's): light, system fonts, usable down
   to 360px wide. */
:root {
  --fg: #1d2430; --muted: #5f6b7a; --bg: #f5f6f8; --card: #fff; --line: #dde2e8;
  --head: #f1f3f6; --accent: #2457d6; --accent-weak: #dfe8fc;
  --bad: #b42318; --bad-bg: #fdecea; --ok: #067647; --ok-bg: #e3f6ec;
}
*, *::before, *::after { box-sizing: border-box; }
[hidden] { display: none !important; }
html { font-size: 16px; -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body {
  margin: 0; color: var(--fg); background: var(--bg); line-height: 1.4;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
a { color: var(--accent); }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }

/* header bar */
.topbar {
  position: sticky; top: 0; z-index: 2;
  display: flex; flex-wrap: wrap; align-items: center; gap: .5rem 1rem;
  padding: .5rem 1rem; background: var(--card); border-bottom: 1px solid var(--line);
}
.brand { margin: 0; font-size: 1.15rem; font-weight: 650; white-space: nowrap; }
.menu { display: flex; gap: .25rem; }
.menu a {
  display: inline-flex; align-items: center; min-height: 36px; padding: 0 .75rem;
  border-radius: 6px; text-decoration: none;
}
.menu a:hover { background: var(--accent-weak); }
.menu a.active { background: var(--accent); color: #fff; }
.menu a.disabled { color: #9aa4b1; pointer-events: none; cursor: default; }
.poll { display: inline-flex; align-items: center; gap: .35rem; color: var(--muted); white-space: nowrap; }
#poll-sec { width: 5.5em; }
#last-update { margin-left: auto; color: var(--muted); font-size: .875rem; white-space: nowrap; }

/* form controls */
input[type="number"] {
  font: inherit; color: inherit; min-height: 36px; padding: 0 .45rem;
  border: 1px solid var(--line); border-radius: 6px; background: #fff;
}
input.invalid { border-color: var(--bad); background: var(--bad-bg); }
input[type="checkbox"] { width: 1.15rem; height: 1.15rem; margin: 0; accent-color: var(--accent); }
button {
  font: inherit; color: var(--fg); min-height: 36px; padding: 0 .9rem;
  border: 1px solid #c9d0d9; border-radius: 6px; background: #fff; cursor: pointer;
}
button:hover:not(:disabled) { border-color: var(--accent); background: #f7f9ff; }
button:disabled { opacity: .5; cursor: default; }
button.close-node { color: var(--bad); }
#cancel-jobs:not(:disabled), button.danger:not(:disabled) { color: #fff; background: var(--bad); border-color: var(--bad); }

/* error banner */
.error {
  display: flex; align-items: center; gap: .75rem; padding: .5rem 1rem;
  color: var(--bad); background: var(--bad-bg); border-bottom: 1px solid #f3b8b2;
}
#error-text { flex: 1; overflow-wrap: anywhere; }
.error .dismiss { min-width: 36px; padding: 0; border-color: transparent; background: transparent; color: inherit; font-size: 1.25rem; }

main { max-width: 1200px; margin: 0 auto; padding: 1rem; }
.toolbar { margin-bottom: .75rem; }
.check { display: inline-flex; align-items: center; gap: .5rem; min-height: 36px; cursor: pointer; }
.empty { color: var(--muted); }
#node-title, .view-title { margin: .25rem 0 .75rem; font-size: 1.3rem; overflow-wrap: anywhere; }
.node-name { margin-left: .5rem; color: var(--muted); font-weight: 400; }

/* cluster cards */
section.cluster, section.node-cluster {
  margin-bottom: 1rem; padding: .75rem 1rem 1rem;
  background: var(--card); border: 1px solid var(--line); border-radius: 8px;
}
.cluster-head { display: flex; flex-wrap: wrap; align-items: baseline; gap: .25rem .6rem; }
.cluster-head h2, .cluster-head h3 { margin: 0; font-size: 1.15rem; overflow-wrap: anywhere; }
h4 { margin: .75rem 0 .4rem; font-size: .95rem; color: var(--muted); }
.meta { color: var(--muted); font-size: .875rem; }
.badge, .state {
  display: inline-block; padding: .05rem .5rem; border-radius: 999px; font-size: .75rem;
  text-transform: uppercase; letter-spacing: .03em; background: #eef0f3; color: var(--muted);
}
.badge-closed { background: #fde7d9; color: #9a3412; }
.state-ready { background: var(--ok-bg); color: var(--ok); }
.figures { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; margin: .6rem 0; }
.figure { display: flex; flex-direction: column; min-width: 4.5rem; }
.figure-label { font-size: .75rem; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
.figure-value { font-size: 1.25rem; font-weight: 600; font-variant-numeric: tabular-nums; }

/* throughput chart */
.chart { width: 100%; margin: .25rem 0 .75rem; }
svg.throughput { display: block; width: 100%; height: 160px; }
.throughput .chart-bg { fill: #fbfcfd; stroke: var(--line); }
.throughput .grid { stroke: #e6e9ee; stroke-width: 1; }
.throughput .axis-label { fill: var(--muted); font-size: 11px; }
.throughput .no-data { fill: var(--muted); font-size: 13px; }
.throughput .area { fill: var(--accent-weak); opacity: .8; }
.throughput .line { fill: none; stroke: var(--accent); stroke-width: 2; stroke-linejoin: round; }

/* tables */
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; border: 1px solid var(--line); border-radius: 6px; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .4rem .6rem; text-align: left; white-space: nowrap; border-bottom: 1px solid var(--line); }
thead th { background: var(--head); font-size: .875rem; font-weight: 600; }
tbody tr:hover { background: #f8fafc; }
tbody tr.selected { background: var(--accent-weak); }
tfoot td { font-weight: 600; background: #f8f9fb; border-bottom: 0; }
table.nodes th { padding: 0; }
.sort-btn {
  display: block; width: 100%; min-height: 36px; padding: 0 .6rem; border: 0; border-radius: 0;
  background: transparent; font-weight: inherit; text-align: inherit; white-space: nowrap;
}
.sort-btn:hover:not(:disabled) { background: #e7ebf1; }
.sort-mark { color: var(--accent); }
table.nodes [data-col="submitted"], table.nodes [data-col="done"], table.nodes [data-col="running"],
table.nodes [data-col="cpu"], table.nodes [data-col="memory"], table.nodes [data-col="disk"],
table.nodes [data-col="servers"], table.servers [data-col="submitted"], table.servers [data-col="done"],
table.servers [data-col="running"] { text-align: right; }
.server-link { display: inline-block; padding: .3rem 0; }
.node-link { display: inline-block; padding: .3rem 0; }
td.select, th.select { width: 1%; padding: 0 .25rem; }
.cb { display: inline-flex; align-items: center; justify-content: center; min-width: 36px; min-height: 36px; cursor: pointer; }
td.args { white-space: normal; min-width: 12rem; }
td.args code {
  display: block; max-width: 40rem; white-space: pre-wrap; overflow-wrap: anywhere;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem;
}
td.args .job-kwargs { color: var(--muted); }

/* node controls and actions */
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: .5rem; margin: .5rem 0; }
.cpus-group { display: inline-flex; gap: .35rem; }
.cpus-input { width: 5em; }
.op-result, #cancel-result, #terminate-result { color: var(--muted); font-size: .875rem; }
.actions { display: flex; flex-wrap: wrap; align-items: center; gap: .75rem; margin-top: .5rem; }
.foot { padding: 1rem; text-align: center; color: var(--muted); font-size: .8rem; }

@media (max-width: 600px) {
  .topbar { padding: .4rem .6rem; gap: .35rem .75rem; }
  #last-update { margin-left: 0; }
  main { padding: .6rem; }
  section.cluster, section.node-cluster { padding: .6rem; }
  .figures { gap: .4rem 1rem; }
  .figure-value { font-size: 1.1rem; }
}
'''

PAGE['monitor-kit.js'] = r'''/* The monitors' shared browser code (dispy's page and dispycos's page), plain ES2017.
 *
 * window.MonitorKit is loaded before the page's own script and gives it:
 *   DOM        el/svg/append/setChildren: text only ever goes through textContent
 *              (nothing received is parsed as HTML); figure(), stateBadge(),
 *              sortHeader() and selection() (check boxes kept across polls)
 *   tables     cellsRow(); nodeSort() (the node table, sorted by its headers, the
 *              sort kept in localStorage); runningTable() (the running jobs or tasks,
 *              selectable); itemFigures(), nodeTitle() (a node's or server's view)
 *   format     fmtClock, fmtNum, fmtBytes; compareIp (addresses sort numerically)
 *   storage    load/save (localStorage, when the browser allows it)
 *   api()      the fetch wrapper: JSON both ways, the page's token on changes
 *   errors     the banner: showError/clearError/reportActionError
 *   polling    startPolling(fetch): fetch(seq) for the current view, then ONE
 *              setTimeout for the next poll (slow answers never pile up); isCurrent(seq)
 *              drops stale answers; the "Poll every" input (kept in localStorage) and
 *              the server's poll_sec (serverPollSec) set the interval
 *   the page   startPage({product, argsSetting, views, fetch, route, init}): the views
 *              and their routes (#<view>=<id>: parseHash, href), the menu (the item
 *              each view showed last: remember), the show-arguments setting (the
 *              #show-args box, the server's argsSetting: show_job_args or
 *              show_task_args), what every answer carries (applyServerInfo: the
 *              setting, poll_sec, the version); fetchData(seq, path, unknown) (an
 *              answer for a poll, null once stale), action() (a change's progress)
 */
'use strict';
window.MonitorKit = (function () {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === 'number' && isFinite(v);
  const str = (v) => (v === null || v === undefined ? '' : String(v));

  // ---------- DOM ----------
  function el(tag, attrs) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => {
      if (v === null || v === undefined || v === false) return;
      if (k === 'text') node.textContent = str(v);
      else if (k === 'class') node.className = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    });
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }
  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach((c) => append(node, c));
    else node.appendChild(typeof child === 'object' ? child : document.createTextNode(String(child)));
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, String(v)));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function setChildren(node, children) {
    node.textContent = '';
    append(node, children);
  }
  function activeFocusKey() {
    const a = document.activeElement;
    return a && a.dataset ? a.dataset.focusKey || null : null;
  }
  function restoreFocus(key) {
    if (!key) return;
    const target = document.querySelector('[data-focus-key="' + CSS.escape(key) + '"]');
    if (target && target !== document.activeElement) target.focus({ preventScroll: true });
  }
  function figure(label, key, value, attr) {
    return el('div', { class: 'figure' }, el('span', { class: 'figure-label', text: label }),
      el('span', { class: 'figure-value', [attr || 'data-total']: key, text: value }));
  }
  function stateBadge(s) {
    const cls = s === 'ready' ? 'state-ready' : s === 'closed' ? 'state-closed' : 'state-other';
    return el('span', { class: 'state ' + cls, text: s });
  }
  // A column header that sorts: sort is {col, dir}; onSort(key) when clicked.
  function sortHeader(focusKey, key, label, sort, onSort) {
    const active = sort.col === key, asc = sort.dir > 0;
    const btn = el('button', { type: 'button', class: 'sort-btn', 'data-focus-key': focusKey }, label,
      el('span', { class: 'sort-mark', 'aria-hidden': 'true', text: active ? (asc ? ' ▲' : ' ▼') : '' }));
    btn.addEventListener('click', () => onSort(key));
    return el('th', { scope: 'col', 'data-col': key, 'aria-sort': active ? (asc ? 'ascending' : 'descending') : null }, btn);
  }
  const nextSort = (sort, col) => (sort.col === col ? { col: col, dir: -sort.dir } : { col: col, dir: 1 });
  function loadSort(key, cols, dflt) {
    try {
      const s = JSON.parse(load(key));
      if (s && cols.some((c) => c[0] === s.col) && (s.dir === 1 || s.dir === -1)) return s;
    } catch (e) { /* ignore bad stored value */ }
    return dflt;
  }
  // Check boxes of table rows, one more for all of them; sel (a Set of keys) outlives
  // the rows (they are rebuilt each poll) and loses the keys no longer listed.
  // opts: {boxClass, allLabel, allFocusKey, onChange}
  function selection(sel, keys, opts) {
    const listed = new Set(keys);
    Array.from(sel).forEach((k) => { if (!listed.has(k)) sel.delete(k); });
    const boxes = [];
    const all = el('input', { type: 'checkbox', class: 'select-all', 'aria-label': opts.allLabel, 'data-focus-key': opts.allFocusKey });
    const mark = (b) => { const row = b.closest('tr'); if (row) row.classList.toggle('selected', b.checked); };
    const sync = () => {
      all.checked = sel.size > 0 && sel.size === keys.length;
      all.indeterminate = sel.size > 0 && sel.size < keys.length;
      opts.onChange();
    };
    all.addEventListener('change', () => {
      boxes.forEach((b) => {
        b.checked = all.checked;
        if (b.checked) sel.add(b.value); else sel.delete(b.value);
        mark(b);
      });
      sync();
    });
    function box(key, label, focusKey) {
      const b = el('input', { type: 'checkbox', class: opts.boxClass, value: key, 'aria-label': label, 'data-focus-key': focusKey });
      b.checked = sel.has(key);
      boxes.push(b);
      b.addEventListener('change', () => {
        if (b.checked) sel.add(key); else sel.delete(key);
        mark(b);
        sync();
      });
      return b;
    }
    return { all: all, box: box, sync: sync };
  }
  // A menu link that is disabled until it has somewhere to go.
  function menuLink(a, active, href, title) {
    a.classList.toggle('active', active);
    if (active) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    if (href) {
      a.setAttribute('href', href);
      a.classList.remove('disabled');
      a.removeAttribute('aria-disabled');
      if (title) a.title = title;
    } else {
      a.removeAttribute('href');
      a.classList.add('disabled');
      a.setAttribute('aria-disabled', 'true');
    }
  }

  // ---------- formatting ----------
  const pad2 = (n) => String(n).padStart(2, '0');
  function fmtClock(sec) {
    const d = new Date(sec * 1000);
    return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  }
  const fmtNum = (v) => (isNum(v) ? String(v) : '—');
  function fmtBytes(n) {
    if (!isNum(n)) return '—';
    const units = ['B', 'KB', 'MB', 'GB', 'TB', 'PB'];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
  }
  function ipValue(ip) {
    const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(str(ip));
    return m ? ((+m[1] * 256 + +m[2]) * 256 + +m[3]) * 256 + +m[4] : null;
  }
  function compareIp(a, b) {
    const x = ipValue(a), y = ipValue(b);
    return x !== null && y !== null ? x - y : str(a).localeCompare(str(b));
  }

  // ---------- storage ----------
  function load(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; }
  }
  function save(key, value) {
    try { window.localStorage.setItem(key, value); } catch (e) { /* storage unavailable */ }
  }

  // ---------- api ----------
  let token = null;
  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }
  async function api(method, path, body) {
    if (token === null) {
      const meta = document.querySelector('meta[name="dispy-token"]');
      token = meta ? meta.getAttribute('content') || '' : '';
    }
    const opts = { method: method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.headers['X-Dispy-Token'] = token;
      opts.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      throw new ApiError('cannot reach the server: ' + (e && e.message ? e.message : e), 0);
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) throw new ApiError((data && data.error) || ('HTTP error ' + resp.status), resp.status);
    if (!data || typeof data !== 'object') throw new ApiError('invalid response from the server', resp.status);
    return data;
  }

  // ---------- error banner ----------
  let errorKind = null;
  function showError(message, kind) {
    $('error-text').textContent = str(message);
    $('error').hidden = false;
    errorKind = kind;
  }
  function clearError(kind) {
    if (kind && errorKind !== kind) return;
    $('error').hidden = true;
    errorKind = null;
  }
  // Network failures are cleared by the next successful poll, server refusals stay.
  const reportActionError = (e) => showError(e.message, e.status ? 'action' : 'poll');

  // ---------- polling ----------
  const poll = { sec: 10, userSet: false, timer: null, seq: 0, fetch: null, key: '' };
  function schedule() {
    clearTimeout(poll.timer);
    poll.timer = setTimeout(pollNow, poll.sec * 1000);
  }
  async function pollNow() {
    clearTimeout(poll.timer);
    const seq = ++poll.seq;
    try {
      await poll.fetch(seq);
      if (seq === poll.seq) {
        clearError('poll');
        $('last-update').textContent = 'updated ' + fmtClock(Date.now() / 1000);
      }
    } catch (e) {
      if (seq === poll.seq) showError(e.message, 'poll');
    } finally {
      if (seq === poll.seq) schedule();
    }
  }
  const isCurrent = (seq) => seq === poll.seq;
  // The server's poll_sec, unless the user chose an interval in this browser.
  function serverPollSec(sec) {
    if (poll.userSet || !isNum(sec) || sec < 1) return;
    poll.sec = Math.min(3600, sec);
    if (document.activeElement !== $('poll-sec')) $('poll-sec').value = poll.sec;
  }
  function setupPollInput() {
    const inp = $('poll-sec');
    const stored = Number(load(poll.key));
    if (Number.isInteger(stored) && stored >= 1 && stored <= 3600) {
      poll.sec = stored;
      poll.userSet = true;
    }
    inp.value = poll.sec;
    inp.addEventListener('input', () => {
      const v = Number(inp.value);
      const ok = inp.value !== '' && Number.isInteger(v) && v >= 1 && v <= 3600;
      inp.classList.toggle('invalid', !ok);
      if (!ok) return;
      poll.sec = v;
      poll.userSet = true;
      save(poll.key, String(v));
      schedule();
    });
    inp.addEventListener('blur', () => {
      if (!inp.classList.contains('invalid')) return;
      inp.value = poll.sec;
      inp.classList.remove('invalid');
    });
  }
  // Wires the poll input (its value kept under storageKey) and the error banner;
  // fetch(seq) gets and shows the current view's data.  The first poll is the
  // page's to start (pollNow), once its view is set.
  function startPolling(storageKey, fetch) {
    poll.key = storageKey;
    poll.fetch = fetch;
    setupPollInput();
    $('error-dismiss').addEventListener('click', () => clearError());
  }
  const pollUserSet = () => poll.userSet;

  // ---------- tables ----------
  // A row of cells: cells[key] (a node, text or a number) for each column [key, label].
  const cellsRow = (attrs, cols, cells) => el('tr', attrs, cols.map((c) => el('td', { 'data-col': c[0] }, cells[c[0]])));
  // The node table's sort, kept in storage under key: cols ([key, label]; the first is
  // the addresses', whose order also breaks ties), number(n, col) a column's number
  // (else the node's own field), onChange() after a click on a header.
  function nodeSort(key, cols, number, onChange) {
    const addr = cols[0][0];
    const ns = { sort: loadSort(key, cols, { col: addr, dir: -1 }) };
    function value(n, col) {
      if (col === 'name' || col === 'state') return str(n[col]);
      const v = number ? number(n, col) : n[col];
      return isNum(v) ? v : -Infinity;
    }
    function compare(a, b) {
      const col = ns.sort.col;
      let r;
      if (col === addr) r = compareIp(a[addr], b[addr]);
      else {
        const x = value(a, col), y = value(b, col);
        r = typeof x === 'string' ? x.localeCompare(y) : (x < y ? -1 : x > y ? 1 : 0);
      }
      return r * ns.sort.dir || compareIp(a[addr], b[addr]);
    }
    function setSort(col) {
      ns.sort = nextSort(ns.sort, col);
      save(key, JSON.stringify(ns.sort));
      onChange();
    }
    // The table of nodes, sorted: row(n) a node's row; opts: {empty (the text without
    // nodes), focusPrefix (of the headers' focus keys), foot(nodes) (a last row)}.
    ns.table = (nodes, row, opts) => {
      const rows = nodes.slice().sort(compare);
      const body = rows.length ? rows.map(row)
        : el('tr', { class: 'empty-row' }, el('td', { colspan: cols.length, text: opts.empty }));
      return el('div', { class: 'table-wrap' }, el('table', { class: 'nodes' },
        el('thead', null, el('tr', null, cols.map((c) =>
          sortHeader(opts.focusPrefix + c[0], c[0], c[1], ns.sort, setSort)))),
        el('tbody', null, body), opts.foot ? el('tfoot', null, opts.foot(rows)) : null));
    };
    return ns;
  }
  // The running jobs or tasks in holder: a check box a row (sel: a Set of keys, kept
  // across polls), the id (idCol), the arguments (while the server shows them: opts.args(item)),
  // the start.  opts: {what ('job', 'task'), idCol, idHeader, focusPrefix, allFocusKey,
  // args, onChange}; d: the answer they came in (its time and the setting).
  function runningTable(holder, items, sel, d, opts) {
    const what = opts.what, idCol = opts.idCol;
    const pick = selection(sel, items.map((t) => str(t.key)), { boxClass: what + '-select',
      allLabel: 'Select all ' + what + 's', allFocusKey: opts.allFocusKey, onChange: opts.onChange });
    if (!items.length) {
      setChildren(holder, el('p', { class: 'empty', text: 'No running ' + what + 's' }));
      pick.sync();
      return;
    }
    const focusKey = activeFocusKey(), showArgs = d[page.argsSetting] !== false;
    const now = isNum(d.time) ? d.time : Date.now() / 1000;
    const rows = items.map((t) => {
      const key = str(t.key);
      const box = pick.box(key, 'Select ' + what + ' ' + str(t[idCol]), opts.focusPrefix + key);
      return el('tr', { class: what + '-row' + (box.checked ? ' selected' : ''), 'data-key': key },
        el('td', { class: 'select' }, el('label', { class: 'cb' }, box)), el('td', { 'data-col': idCol, text: t[idCol] }),
        showArgs ? el('td', { class: 'args', 'data-col': 'args' }, opts.args(t)) : null,
        el('td', { 'data-col': 'start_time', text: isNum(t.start_time)
          ? fmtClock(t.start_time) + ' (' + Math.max(0, Math.round(now - t.start_time)) + 's ago)' : '—' }));
    });
    pick.sync();
    setChildren(holder, el('div', { class: 'table-wrap' }, el('table', { class: what + 's' },
      el('thead', null, el('tr', null, el('th', { class: 'select' }, el('label', { class: 'cb' }, pick.all)),
        el('th', { text: opts.idHeader }), showArgs ? el('th', { text: 'Arguments' }) : null, el('th', { text: 'Started' }))),
      el('tbody', null, rows))));
    restoreFocus(focusKey);
  }
  // A node's or a server's figures: first (if any), its counts, its state.
  function itemFigures(d, first) {
    return [first || null, [['submitted', 'Submitted'], ['done', 'Done'], ['running', 'Running']].map(
      (f) => figure(f[1], f[0], fmtNum(d[f[0]]), 'data-field')),
      el('div', { class: 'figure' }, el('span', { class: 'figure-label', text: 'State' }),
        el('span', { class: 'figure-value', 'data-field': 'state' }, stateBadge(str(d.state))))];
  }
  function nodeTitle(addr, name) {
    setChildren($('node-title'), ['Node ' + str(addr),
      name ? [' ', el('span', { class: 'node-name', text: name })] : null]);
  }

  // ---------- the page: settings, views, menu ----------
  const page = { product: '', argsSetting: '', argsBusy: false, views: [], view: 'cluster',
    last: {}, route: null };
  // What every answer of the server may carry: the setting (page.argsSetting: shown
  // unless the user is changing it), its poll_sec, its version.
  function applyServerInfo(d) {
    if (typeof d[page.argsSetting] === 'boolean' && !page.argsBusy) $('show-args').checked = d[page.argsSetting];
    serverPollSec(d.poll_sec);
    if (d.version) $('version').textContent = page.product + ' ' + d.version;
  }
  async function toggleShowArgs() {
    const box = $('show-args'), want = box.checked;
    page.argsBusy = true;
    box.disabled = true;
    try {
      const r = await api('POST', '/api/settings', { [page.argsSetting]: want });
      box.checked = typeof r[page.argsSetting] === 'boolean' ? r[page.argsSetting] : want;
    } catch (e) {
      box.checked = !want;
      reportActionError(e);
    } finally {
      page.argsBusy = false;
      box.disabled = false;
      pollNow();
    }
  }
  // The data at path for poll seq, or null when a newer poll has begun; a 404 (an item
  // not known, yet) calls unknown() when given (if still current), else it is an error.
  async function fetchData(seq, path, unknown) {
    let data;
    try {
      data = await api('GET', path);
    } catch (e) {
      if (e.status !== 404 || !unknown) throw e;
      if (isCurrent(seq)) unknown();
      return null;
    }
    if (!isCurrent(seq)) return null;
    applyServerInfo(data);
    return data;
  }
  // A change the page asks for: busy(true) and out says working; run() resolves to the
  // text of its result, failed() gives the text of a failure; then busy(false), a poll.
  async function action(out, working, run, failed, busy) {
    busy(true);
    out.textContent = working;
    try {
      out.textContent = await run();
    } catch (e) {
      out.textContent = failed();
      reportActionError(e);
    } finally {
      busy(false);
      pollNow();
    }
  }
  const href = (view, id) => '#' + view + '=' + encodeURIComponent(str(id));
  // location.hash as {view, id}: #<view>=<id> for a view with items, else the cluster.
  function parseHash() {
    const m = /^#(\w+)=(.+)$/.exec(location.hash || '');
    if (!m || page.views.indexOf(m[1]) < 1) return { view: 'cluster', id: null };
    let id = m[2];
    try { id = decodeURIComponent(id); } catch (e) { /* keep raw text */ }
    return { view: m[1], id: id };
  }
  // The menu: the cluster, and each other view's item shown last (once there is one).
  function updateMenu() {
    menuLink($('nav-cluster'), page.view === 'cluster', '#cluster');
    page.views.slice(1).forEach((v) => {
      const last = page.last[v], title = v.charAt(0).toUpperCase() + v.slice(1) + ' ';
      menuLink($('nav-' + v), page.view === v, last && href(v, last), last && title + last);
    });
  }
  // The item a view showed last (kept in storage, under product.last_<view>).
  function remember(view, id) {
    if (page.last[view] === id) return;
    page.last[view] = id;
    save(page.product + '.last_' + view, id);
    updateMenu();
  }
  function route() {
    const r = parseHash();
    page.route(r);
    page.view = r.view;
    page.views.forEach((v) => { $(v + '-view').hidden = v !== r.view; });
    updateMenu();
    pollNow();
  }
  // Runs the page once the document is ready.  opts: product ('dispy', 'dispycos': the
  // version's prefix and the storage keys'), argsSetting (the server's setting that
  // #show-args changes), views (['cluster', ...]: each one's #<view>-view, #nav-<view>;
  // the ones after 'cluster' show one item, #<view>=<id>), fetch(seq) (polls the
  // current view), route(r) (the page's part of going to r = {view, id}), init() (the
  // page's own events; the first route and poll follow).
  function startPage(opts) {
    Object.assign(page, { product: opts.product, argsSetting: opts.argsSetting,
      views: opts.views, route: opts.route });
    const start = () => {
      page.views.slice(1).forEach((v) => { page.last[v] = load(page.product + '.last_' + v) || null; });
      startPolling(page.product + '.poll_sec', opts.fetch);
      $('show-args').addEventListener('change', toggleShowArgs);
      window.addEventListener('hashchange', route);
      opts.init();
      route();
    };
    if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
    else start();
  }
  const view = () => page.view;
  const lastSeen = (v) => page.last[v];

  return {
    $: $, isNum: isNum, str: str, el: el, append: append, svg: svg, setChildren: setChildren,
    activeFocusKey: activeFocusKey, restoreFocus: restoreFocus, figure: figure,
    stateBadge: stateBadge, sortHeader: sortHeader, nextSort: nextSort, loadSort: loadSort,
    selection: selection, menuLink: menuLink, fmtClock: fmtClock, fmtNum: fmtNum,
    fmtBytes: fmtBytes, compareIp: compareIp, load: load, save: save, api: api,
    showError: showError, clearError: clearError, reportActionError: reportActionError,
    startPolling: startPolling, pollNow: pollNow, isCurrent: isCurrent,
    serverPollSec: serverPollSec, pollUserSet: pollUserSet, cellsRow: cellsRow,
    nodeSort: nodeSort, runningTable: runningTable, itemFigures: itemFigures,
    nodeTitle: nodeTitle, applyServerInfo: applyServerInfo, fetchData: fetchData,
    action: action, href: href, parseHash: parseHash, remember: remember,
    startPage: startPage, view: view, lastSeen: lastSeen,
  };
})();
'''

PAGE['monitor.js'] = r'''/* dispy monitor: browser side (plain ES2017, no libraries; the shared parts are
 * MonitorKit's, in monitor-kit.js, loaded first).
 *
 * Structure:
 *   state     - one object: the node shown, the job selections, the last server
 *               data and the throughput history accumulated between polls (the
 *               view, the table's sort and the poll interval are MonitorKit's).
 *   poll      - pollView(seq) fetches the data of the current view and renders it
 *               (MonitorKit's loop calls it, one poll at a time; actions and hash
 *               changes poll at once; stale answers are dropped).
 *   renderers - renderClusters()/drawChart() for #cluster, renderNode() for #node=<ip>.
 *   actions   - node operations, job cancellation (the show-args setting, the
 *               routing by location.hash and the menu are MonitorKit's).
 *   init      - wires this page's events; K.startPage() routes and starts polling.
 */
'use strict';
(function (K) {
  const { $, isNum, str, el, svg, setChildren, fmtClock, fmtNum, fmtBytes,
    activeFocusKey, restoreFocus, api, figure, stateBadge } = K;
  const MAX_POINTS = 3600;   // history points kept per cluster
  const CHART_SPAN = 900;    // seconds shown in a throughput chart
  const CHART_BINS = 60;
  const NODE_COLS = [['ip_addr', 'Node'], ['name', 'Name'], ['cpus', 'CPUs'],
    ['submitted', 'Submitted'], ['done', 'Done'], ['running', 'Running'], ['cpu', 'CPU %'],
    ['memory', 'Memory free'], ['disk', 'Disk free'], ['state', 'State']];
  const TOTALS = [['submitted', 'Submitted'], ['done', 'Done'], ['running', 'Running'],
    ['failed', 'Failed'], ['pending', 'Pending']];

  const state = {
    nodeIp: null, cancelBusy: false,
    status: null,            // last /api/status response
    history: new Map(),      // cluster id -> [[time, done], ...]
    needFull: false,         // next status poll must use since=0
    charts: [],              // [{holder, id}] of the rendered cluster view
    nodeParts: new Map(),    // String(cluster id) -> persistent DOM of node view
    selected: new Map(),     // String(cluster id) -> Set of selected job keys
  };

  // ---------- helpers ----------
  function fmtRate(r) {
    if (!(r > 0)) return '0';
    return r < 1 ? r.toFixed(2) : r < 10 ? r.toFixed(1) : String(Math.round(r));
  }

  // ---------- polling ----------
  async function pollView(seq) {
    if (K.view() === 'node') await pollNode(seq);
    else await pollClusters(seq);
  }

  // ---------- cluster view ----------
  function historySince() {
    if (state.needFull) return 0;
    let since = 0;
    state.history.forEach((h) => { if (h.length) since = Math.max(since, h[h.length - 1][0]); });
    return since;
  }
  function mergeHistory(clusters, since) {
    const seen = new Set();
    let newCluster = false;
    clusters.forEach((c) => {
      seen.add(c.id);
      let h = state.history.get(c.id);
      if (!h || since === 0) {
        if (!h && since !== 0) newCluster = true;   // refetch its full history next time
        h = [];
        state.history.set(c.id, h);
      }
      (Array.isArray(c.history) ? c.history : []).forEach((p) => {
        if (!Array.isArray(p) || !isNum(p[0]) || !isNum(p[1])) return;
        const last = h[h.length - 1];
        if (!last || p[0] > last[0]) h.push([p[0], p[1]]);
        else if (p[0] === last[0]) last[1] = p[1];   // that second's point grew since
      });
      if (h.length > MAX_POINTS) h.splice(0, h.length - MAX_POINTS);
    });
    Array.from(state.history.keys()).forEach((id) => { if (!seen.has(id)) state.history.delete(id); });
    state.needFull = newCluster;
  }
  async function pollClusters(seq) {
    const since = historySince();
    const data = await K.fetchData(seq, '/api/status?since=' + encodeURIComponent(since));
    if (!data) return;
    mergeHistory(Array.isArray(data.clusters) ? data.clusters : [], since);
    state.status = data;
    renderClusters();
  }
  const serverNow = () => (state.status && isNum(state.status.time) ? state.status.time : Date.now() / 1000);

  // Jobs done at time t (step function over the history points).
  function doneAt(h, t) {
    if (!h.length) return 0;
    if (t < h[0][0]) return h[0][1];
    let lo = 0, hi = h.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (h[mid][0] <= t) lo = mid; else hi = mid - 1;
    }
    return h[lo][1];
  }
  function recentRate(h, now) {
    if (!h.length) return 0;
    const start = Math.max(now - 30, h[0][0]);
    return Math.max(0, doneAt(h, now) - doneAt(h, start)) / Math.max(now - start, 1);
  }
  // Rates per time bin over the chart span, lightly smoothed: [[time, rate], ...].
  function rateSeries(h, now) {
    const span = Math.max(60, Math.min(CHART_SPAN, now - h[0][0]));
    const start = now - span, w = span / CHART_BINS, raw = [];
    for (let i = 0; i < CHART_BINS; i++) {
      raw.push(Math.max(0, doneAt(h, start + (i + 1) * w) - doneAt(h, start + i * w)) / w);
    }
    const points = raw.map((r, i) => {
      const prev = raw[Math.max(0, i - 1)], next = raw[Math.min(raw.length - 1, i + 1)];
      return [start + (i + 0.5) * w, (prev + 2 * r + next) / 4];
    });
    return { start: start, span: span, points: points };
  }
  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    return [1, 2, 2.5, 5, 10].map((m) => m * p).find((x) => x >= v) || v;
  }
  function drawChart(holder, id, h, now) {
    const W = Math.max(240, Math.round(holder.clientWidth || 600)), H = 160;
    const L = 52, R = 12, T = 12, B = 24, pw = W - L - R, ph = H - T - B;
    const chart = svg('svg', { id: 'throughput-' + id, class: 'throughput', viewBox: '0 0 ' + W + ' ' + H,
      role: 'img', 'aria-label': 'jobs done per second' });
    chart.appendChild(svg('rect', { class: 'chart-bg', x: L, y: T, width: pw, height: ph }));
    if (!h.length) {
      chart.appendChild(svg('text', { class: 'no-data', x: L + pw / 2, y: T + ph / 2, 'text-anchor': 'middle' }, 'No jobs done yet'));
      setChildren(holder, chart);
      return;
    }
    const series = rateSeries(h, now);
    const max = niceCeil(Math.max.apply(null, series.points.map((p) => p[1])));
    const x = (t) => L + ((t - series.start) / series.span) * pw;
    const y = (r) => T + ph - (r / max) * ph;
    [0, max / 2, max].forEach((r, i) => {
      chart.appendChild(svg('line', { class: 'grid', x1: L, x2: L + pw, y1: y(r), y2: y(r) }));
      const label = i === 2 ? fmtRate(r) + '/s' : fmtRate(r);
      chart.appendChild(svg('text', { class: 'axis-label', x: L - 6, y: y(r) + 4, 'text-anchor': 'end' }, label));
    });
    let step = [60, 120, 180, 300, 600, 900].find((s) => series.span / s <= 6 && (pw * s) / series.span >= 70) || 900;
    for (let ago = step; ago <= series.span + 0.001; ago += step) {
      const tx = x(now - ago);
      chart.appendChild(svg('line', { class: 'grid', x1: tx, x2: tx, y1: T, y2: T + ph }));
      chart.appendChild(svg('text', { class: 'axis-label', x: tx, y: H - 6, 'text-anchor': 'middle' }, (ago / 60) + ' min ago'));
    }
    chart.appendChild(svg('text', { class: 'axis-label', x: L + pw, y: H - 6, 'text-anchor': 'end' }, 'now'));
    const coords = series.points.map((p) => x(p[0]).toFixed(1) + ' ' + y(p[1]).toFixed(1));
    const line = 'M' + coords.join(' L');
    chart.appendChild(svg('path', { class: 'area', d: line + ' L' + x(series.points[series.points.length - 1][0]).toFixed(1) + ' ' + y(0) + ' L' + x(series.points[0][0]).toFixed(1) + ' ' + y(0) + ' Z' }));
    chart.appendChild(svg('path', { class: 'line', d: line }));
    setChildren(holder, chart);
  }
  function drawAllCharts() {
    const now = serverNow();
    state.charts.forEach((c) => drawChart(c.holder, c.id, state.history.get(c.id) || [], now));
  }

  const sorter = K.nodeSort('dispy.sort', NODE_COLS,
    (n, col) => ((col === 'cpu' || col === 'memory' || col === 'disk') ? (n.avail || {})[col] : n[col]),
    () => { if (state.status) renderClusters(); });
  function nodeRow(n) {
    const a = n.avail && typeof n.avail === 'object' ? n.avail : null;
    const cells = {
      ip_addr: el('a', { class: 'node-link', href: K.href('node', n.ip_addr), text: n.ip_addr }),
      name: str(n.name),
      cpus: fmtNum(n.cpus) + ' / ' + fmtNum(n.avail_cpus),
      submitted: fmtNum(n.submitted), done: fmtNum(n.done), running: fmtNum(n.running),
      cpu: a && isNum(a.cpu) ? a.cpu.toFixed(1) + ' %' : '—',
      memory: fmtBytes(a && a.memory), disk: fmtBytes(a && a.disk),
      state: stateBadge(str(n.state)),
    };
    return K.cellsRow({ class: 'node-row', 'data-ip': str(n.ip_addr) }, NODE_COLS, cells);
  }
  function totalsRow(nodes) {
    const sum = (get) => nodes.reduce((s, n) => s + (isNum(get(n)) ? get(n) : 0), 0);
    const withAvail = (f) => nodes.filter((n) => n.avail && isNum(n.avail[f]));
    const bytes = (f) => (withAvail(f).length ? fmtBytes(sum((n) => (n.avail || {})[f])) : '—');
    const cpuNodes = withAvail('cpu');
    const cells = {
      ip_addr: 'Total (' + nodes.length + ')', name: '',
      cpus: sum((n) => n.cpus) + ' / ' + sum((n) => n.avail_cpus),
      submitted: sum((n) => n.submitted), done: sum((n) => n.done), running: sum((n) => n.running),
      cpu: cpuNodes.length ? (cpuNodes.reduce((s, n) => s + n.avail.cpu, 0) / cpuNodes.length).toFixed(1) + ' % avg' : '—',
      memory: bytes('memory'), disk: bytes('disk'),
      state: nodes.filter((n) => n.state === 'ready').length + ' ready',
    };
    return K.cellsRow({ class: 'totals-row' }, NODE_COLS, cells);
  }
  const nodesTable = (c) => sorter.table(Array.isArray(c.nodes) ? c.nodes : [], nodeRow,
    { empty: 'No nodes', focusPrefix: 'sort:' + c.id + ':', foot: totalsRow });
  function clusterSection(c, now) {
    const hist = state.history.get(c.id) || [];
    const holder = el('div', { class: 'chart' });
    state.charts.push({ holder: holder, id: c.id });
    return el('section', { class: 'cluster', 'data-cluster-id': c.id },
      el('div', { class: 'cluster-head' }, el('h2', { text: c.name }),
        c.closed ? el('span', { class: 'badge badge-closed', text: 'closed' }) : null,
        isNum(c.start_time) ? el('span', { class: 'meta', text: 'started ' + fmtClock(c.start_time) }) : null),
      el('div', { class: 'figures' }, TOTALS.map((t) => figure(t[1], t[0], fmtNum(c[t[0]]))),
        figure('Jobs/s', 'rate', fmtRate(recentRate(hist, now)))),
      holder, nodesTable(c));
  }
  function renderClusters() {
    const box = $('clusters'), focusKey = activeFocusKey();
    const clusters = Array.isArray(state.status.clusters) ? state.status.clusters : [];
    state.charts = [];
    if (!clusters.length) {
      setChildren(box, el('p', { class: 'empty', text: 'No clusters' }));
      return;
    }
    const now = serverNow();
    setChildren(box, clusters.map((c) => clusterSection(c, now)));
    drawAllCharts();   // after insertion, so the holders have a width
    restoreFocus(focusKey);
  }

  // ---------- node view ----------
  function resetNodeView(ip) {
    state.nodeParts.clear();
    state.selected.clear();
    setChildren($('node-clusters'), null);
    $('node-title').textContent = 'Node ' + ip;
    $('cancel-result').textContent = '';
    $('node-unknown').hidden = true;
    $('node-empty').hidden = true;
    updateCancelButton();
  }
  async function pollNode(seq) {
    const ip = state.nodeIp;
    const data = await K.fetchData(seq, '/api/node?ip_addr=' + encodeURIComponent(ip),
      () => renderUnknownNode(ip));
    if (data) renderNode(data);
  }
  function renderUnknownNode(ip) {
    resetNodeView(ip);
    $('node-unknown-text').textContent = 'Unknown node ' + ip;
    $('node-unknown').hidden = false;
    $('node-actions').hidden = true;
  }
  function renderNode(d) {
    K.nodeTitle(d.ip_addr || state.nodeIp, d.name);
    K.remember('node', state.nodeIp);   // remember only nodes the server knows
    const clusters = Array.isArray(d.clusters) ? d.clusters : [];
    const box = $('node-clusters');
    const ids = new Set(clusters.map((c) => String(c.id)));
    state.nodeParts.forEach((p, id) => {
      if (ids.has(id)) return;
      p.section.remove();
      state.nodeParts.delete(id);
      state.selected.delete(id);
    });
    clusters.forEach((c, i) => {
      let p = state.nodeParts.get(String(c.id));
      if (!p) { p = buildNodeCluster(c); state.nodeParts.set(String(c.id), p); }
      if (box.children[i] !== p.section) box.insertBefore(p.section, box.children[i] || null);
      updateNodeCluster(p, c, d);
    });
    $('node-unknown').hidden = true;
    $('node-empty').hidden = clusters.length > 0;
    $('node-actions').hidden = clusters.length === 0;
    updateCancelButton();
  }
  function buildNodeCluster(c) {
    const p = { cluster: c, name: el('h3'), badge: el('span', { class: 'badge badge-closed', text: 'closed' }),
      figures: el('div', { class: 'figures' }), jobs: el('div', { class: 'jobs-wrap' }),
      result: el('span', { class: 'op-result', 'aria-live': 'polite' }),
      cpusInput: el('input', { type: 'number', class: 'cpus-input', step: '1', inputmode: 'numeric', 'aria-label': 'CPUs to use' }) };
    p.cpusInput.addEventListener('input', () => { p.cpusInput.dataset.edited = '1'; });
    p.cpusInput.addEventListener('keydown', (e) => { if (e.key === 'Enter') nodeOp(p, 'set_cpus'); });
    const button = (label, cls, op) => {
      const b = el('button', { type: 'button', class: cls, text: label });
      b.addEventListener('click', () => nodeOp(p, op));
      return b;
    };
    p.buttons = [button('Set CPUs', 'set-cpus', 'set_cpus'), button('Allocate', 'allocate', 'allocate'),
      button('Deallocate', 'deallocate', 'deallocate'), button('Close', 'close-node', 'close')];
    p.section = el('section', { class: 'node-cluster', 'data-cluster-id': c.id },
      el('div', { class: 'cluster-head' }, p.name, p.badge), p.figures,
      el('div', { class: 'controls' }, el('span', { class: 'cpus-group' }, p.cpusInput, p.buttons[0]),
        p.buttons.slice(1), p.result),
      el('h4', { text: 'Running jobs' }), p.jobs);
    return p;
  }
  function updateNodeCluster(p, c, d) {
    p.cluster = c;
    p.name.textContent = str(c.name);
    p.badge.hidden = !c.closed;
    setChildren(p.figures, K.itemFigures(c,
      figure('CPUs used / available', 'cpus', fmtNum(c.cpus) + ' / ' + fmtNum(c.avail_cpus), 'data-field')));
    if (document.activeElement !== p.cpusInput && !p.cpusInput.dataset.edited && isNum(c.cpus)) p.cpusInput.value = c.cpus;
    renderJobs(p, c, d);
  }
  function renderJobs(p, c, d) {
    const ckey = String(c.id), jobs = Array.isArray(c.jobs) ? c.jobs : [];
    const sel = state.selected.get(ckey) || new Set();
    state.selected.set(ckey, sel);
    K.runningTable(p.jobs, jobs, sel, d, { what: 'job', idCol: 'id', idHeader: 'Job id',
      focusPrefix: 'job:' + ckey + ':', allFocusKey: 'all:' + ckey, onChange: updateCancelButton,
      args: (j) => [el('code', { class: 'job-args', text: j.args }),
        j.kwargs !== undefined && j.kwargs !== '{}' ? el('code', { class: 'job-kwargs', text: j.kwargs }) : null] });
  }
  function selectedCount() {
    let n = 0;
    state.selected.forEach((s) => { n += s.size; });
    return n;
  }
  function updateCancelButton() {
    $('cancel-jobs').disabled = state.cancelBusy || selectedCount() === 0;
  }

  // ---------- actions ----------
  function describeOp(op, result) {
    if (result === -1) return 'refused';
    if (op === 'set_cpus') return 'CPUs now ' + str(result);
    return { allocate: 'allocated', deallocate: 'deallocated', close: 'closed' }[op] || 'done';
  }
  async function nodeOp(p, op) {
    const body = { cluster: p.cluster.id, ip_addr: state.nodeIp, op: op };
    if (op === 'set_cpus') {
      const n = Number(p.cpusInput.value);
      if (p.cpusInput.value === '' || !Number.isInteger(n)) {
        p.result.textContent = 'enter a whole number of CPUs';
        return;
      }
      body.cpus = n;
    }
    await K.action(p.result, 'working…', async () => {
      const r = await api('POST', '/api/node', body);
      if (op === 'set_cpus') delete p.cpusInput.dataset.edited;
      return describeOp(op, r.result);
    }, () => 'failed', (busy) => p.buttons.forEach((b) => { b.disabled = busy; }));
  }
  async function cancelSelected() {
    let cancelled = 0, failed = 0;
    await K.action($('cancel-result'), 'cancelling…', async () => {
      for (const [ckey, sel] of Array.from(state.selected.entries())) {
        const p = state.nodeParts.get(ckey);
        if (!p || !sel.size) continue;
        const jobs = Array.from(sel);
        const r = await api('POST', '/api/cancel', { cluster: p.cluster.id, jobs: jobs });
        cancelled += Array.isArray(r.cancelled) ? r.cancelled.length : 0;
        failed += Array.isArray(r.failed) ? r.failed.length : 0;
        jobs.forEach((k) => sel.delete(k));
      }
      return 'cancelled ' + cancelled + (failed ? ', ' + failed + ' failed' : '');
    }, () => 'cancelled ' + cancelled, (busy) => { state.cancelBusy = busy; updateCancelButton(); });
  }

  // ---------- routing, init ----------
  function route(r) {
    if (r.view === 'node') {
      if (r.id !== state.nodeIp) resetNodeView(r.id);
      state.nodeIp = r.id;
    }
  }
  function init() {
    $('cancel-jobs').addEventListener('click', cancelSelected);
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { if (K.view() === 'cluster' && state.status) drawAllCharts(); }, 150);
    });
    if (!K.pollUserSet() && K.parseHash().view === 'node') {
      // The node view never fetches /api/status: ask once for the server's poll interval.
      api('GET', '/api/status?since=' + Math.floor(Date.now() / 1000 + 86400)).then(K.applyServerInfo, () => {});
    }
  }
  K.startPage({ product: 'dispy', argsSetting: 'show_job_args', views: ['cluster', 'node'],
    fetch: pollView, route: route, init: init });
})(window.MonitorKit);
'''

PAGE['dispycos.js'] = r'''/* dispycos monitor: browser side (plain ES2017, no libraries; the shared parts are
 * MonitorKit's, in monitor-kit.js, loaded first).
 *
 * Structure:
 *   state     - the node and server shown (#node=<addr>, #server=<location>), the
 *               tasks selected on the server view, the last data (the view and the
 *               node table's sort are MonitorKit's).
 *   poll      - pollView(seq): /api/cluster, /api/node or /api/server for the view,
 *               rendered when it is still the current poll (MonitorKit's loop).
 *   renderers - renderCluster(), renderNode(), renderServer(); every text is set
 *               with textContent (task arguments are the user's strings).
 *   actions   - terminating the selected tasks (the show-arguments setting, the
 *               routing by location.hash and the menu are MonitorKit's).
 *   init      - wires this page's events; K.startPage() routes and starts polling.
 */
'use strict';
(function (K) {
  const { $, isNum, str, el, setChildren, fmtClock, fmtNum, fmtBytes,
    activeFocusKey, restoreFocus, api, figure, stateBadge } = K;
  const NODE_COLS = [['addr', 'Node'], ['name', 'Name'], ['servers', 'Servers'],
    ['submitted', 'Submitted'], ['done', 'Done'], ['running', 'Running'], ['state', 'State']];
  const TOTALS = [['submitted', 'Submitted'], ['done', 'Done'], ['running', 'Running'],
    ['terminated', 'Terminated'], ['failed', 'Failed']];
  const SERVER_COLS = [['location', 'Server'], ['submitted', 'Submitted'], ['done', 'Done'],
    ['running', 'Running'], ['state', 'State']];

  const state = {
    nodeAddr: null, serverLoc: null, cluster: null, terminateBusy: false,
    selected: new Set(),     // keys of the tasks selected on the server view
  };

  // ---------- polling ----------
  async function pollView(seq) {
    const view = K.view();
    if (view === 'node') await pollOne(seq, '/api/node?addr=', state.nodeAddr, renderNode);
    else if (view === 'server') await pollOne(seq, '/api/server?location=', state.serverLoc, renderServer);
    else {
      const data = await K.fetchData(seq, '/api/cluster');
      if (!data) return;
      state.cluster = data;
      renderCluster();
    }
  }
  // A node or server view: 404 shows "unknown" (it may come later); others are errors.
  async function pollOne(seq, path, id, render) {
    const view = K.view();
    const data = await K.fetchData(seq, path + encodeURIComponent(id), () => renderUnknown(view, id));
    if (data) render(data);
  }
  function renderUnknown(view, id) {
    $(view + '-title').textContent = (view === 'node' ? 'Node ' : 'Server ') + id;
    $(view + '-unknown-text').textContent = 'Not known (yet) to this computation: ' + id;
    $(view + '-unknown').hidden = false;
    $(view + '-body').hidden = true;
  }
  function known(view) {
    $(view + '-unknown').hidden = true;
    $(view + '-body').hidden = false;
  }

  // ---------- cluster view ----------
  const sorter = K.nodeSort('dispycos.sort', NODE_COLS, null,
    () => { if (state.cluster) renderCluster(); });
  function nodeRow(n) {
    const cells = {
      addr: el('a', { class: 'node-link', href: K.href('node', n.addr), text: n.addr }),
      name: str(n.name), servers: fmtNum(n.servers), submitted: fmtNum(n.submitted),
      done: fmtNum(n.done), running: fmtNum(n.running), state: stateBadge(str(n.state)),
    };
    return K.cellsRow({ class: 'node-row', 'data-addr': str(n.addr) }, NODE_COLS, cells);
  }
  const nodesTable = (nodes) => sorter.table(nodes, nodeRow, { empty: 'No nodes yet', focusPrefix: 'sort:' });
  function renderCluster() {
    const d = state.cluster, c = d.computation || {}, focusKey = activeFocusKey();
    $('computation-state').textContent = str(c.state);
    $('computation-state').className = 'state ' + (c.state === 'scheduled' ? 'state-ready' : 'state-other');
    $('computation-meta').textContent = [c.id ? 'id ' + c.id : '',
      isNum(c.scheduled_time) ? 'scheduled ' + fmtClock(c.scheduled_time) : '',
      isNum(c.closed_time) ? 'closed ' + fmtClock(c.closed_time) : ''].filter(Boolean).join(' · ');
    setChildren($('cluster-figures'), TOTALS.map((t) => figure(t[1], t[0], fmtNum(d[t[0]]))));
    setChildren($('nodes'), nodesTable(Array.isArray(d.nodes) ? d.nodes : []));
    restoreFocus(focusKey);
  }

  // ---------- node view ----------
  function renderNode(d) {
    known('node');
    K.nodeTitle(d.addr, d.name);
    K.remember('node', d.addr);
    setChildren($('node-figures'), K.itemFigures(d, figure('Servers', 'servers', fmtNum(d.servers), 'data-field')));
    setChildren($('node-avail'), availFigures(d.avail && typeof d.avail === 'object' ? d.avail : {}));
    setChildren($('node-servers'), serversTable(Array.isArray(d.server_list) ? d.server_list : []));
  }
  function availFigures(a) {
    const shown = [['cpu', 'CPU free', isNum(a.cpu) ? a.cpu.toFixed(1) + ' %' : null],
      ['memory', 'Memory free', isNum(a.memory) ? fmtBytes(a.memory) : null],
      ['disk', 'Disk free', isNum(a.disk) ? fmtBytes(a.disk) : null],
      ['swap', 'Swap free', isNum(a.swap) ? fmtBytes(a.swap) : null]].filter((f) => f[2] !== null);
    return shown.length ? el('div', { class: 'figures' }, shown.map((f) => figure(f[1], f[0], f[2], 'data-avail')))
      : el('p', { class: 'empty', text: 'Not reported (the node has no psutil)' });
  }
  function serverRow(s) {
    const cells = {
      location: el('a', { class: 'server-link', href: K.href('server', s.location), text: s.location }),
      submitted: fmtNum(s.submitted), done: fmtNum(s.done), running: fmtNum(s.running),
      state: stateBadge(str(s.state)),
    };
    return K.cellsRow({ class: 'server-row', 'data-location': str(s.location) }, SERVER_COLS, cells);
  }
  function serversTable(servers) {
    if (!servers.length) return el('p', { class: 'empty', text: 'No servers of this computation' });
    return el('div', { class: 'table-wrap' }, el('table', { class: 'servers' },
      el('thead', null, el('tr', null, SERVER_COLS.map((c) => el('th', { scope: 'col', 'data-col': c[0], text: c[1] })))),
      el('tbody', null, servers.map(serverRow))));
  }

  // ---------- server view ----------
  function taskArgs(t) {
    const args = (Array.isArray(t.args) ? t.args : []).map(str);
    const kwargs = t.kwargs && typeof t.kwargs === 'object' ? t.kwargs : {};
    Object.keys(kwargs).forEach((k) => args.push(k + '=' + str(kwargs[k])));
    return args.map((a) => el('code', { class: 'task-arg', text: a }));
  }
  function renderServer(d) {
    known('server');
    $('server-title').textContent = 'Server ' + str(d.location);
    K.remember('server', d.location);
    const up = $('server-node');
    up.href = K.href('node', d.addr);
    up.textContent = 'node ' + str(d.addr);
    setChildren($('server-figures'), K.itemFigures(d));
    renderTasks(d);
  }
  function renderTasks(d) {
    const tasks = Array.isArray(d.tasks) ? d.tasks : [];
    $('tasks-more').textContent = isNum(d.running) && d.running > tasks.length
      ? 'showing ' + tasks.length + ' of ' + d.running + ' running tasks' : '';
    K.runningTable($('server-tasks'), tasks, state.selected, d, { what: 'task', idCol: 'name',
      idHeader: 'Task', focusPrefix: 'task:', allFocusKey: 'all-tasks', onChange: updateTerminateButton,
      args: taskArgs });
  }
  function updateTerminateButton() {
    $('terminate-tasks').disabled = state.terminateBusy || state.selected.size === 0;
  }

  // ---------- actions ----------
  async function terminateSelected() {
    const keys = Array.from(state.selected);
    await K.action($('terminate-result'), 'terminating…', async () => {
      const r = await api('POST', '/api/terminate', { server: state.serverLoc, tasks: keys });
      const done = Array.isArray(r.terminated) ? r.terminated.length : 0;
      const failed = Array.isArray(r.failed) ? r.failed.length : 0;
      keys.forEach((k) => state.selected.delete(k));
      return 'terminated ' + done + (failed ? ', ' + failed + ' not running' : '');
    }, () => 'not terminated', (busy) => { state.terminateBusy = busy; updateTerminateButton(); });
  }

  // ---------- routing, init ----------
  function route(r) {
    if (r.view === 'server' && r.id !== state.serverLoc) {
      state.selected.clear();
      setChildren($('server-tasks'), null);
      $('terminate-result').textContent = '';
      updateTerminateButton();
    }
    if (r.view === 'node') state.nodeAddr = r.id;
    if (r.view === 'server') state.serverLoc = r.id;
  }
  K.startPage({ product: 'dispycos', argsSetting: 'show_task_args', views: ['cluster', 'node', 'server'],
    fetch: pollView, route: route,
    init: () => $('terminate-tasks').addEventListener('click', terminateSelected) });
})(window.MonitorKit);
'''
