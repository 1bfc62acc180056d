#!/usr/bin/env python3
"""dispy: distribute Python functions and programs over the processors of many machines.

This module is both the client API (``JobCluster``, ``DispyJob``, ...) and the core that
every program of the project shares: the wire format, authentication, discovery and the
job scheduler.  ``dispynode.py`` imports it for the wire format; ``dispyscheduler.py``
hosts the same ``Scheduler`` for many clients.

Place in the system::

    user script ──► JobCluster ──► Scheduler ──► NodeLink ══ TCP (HMAC frames) ══► dispynode.py
        ▲              │ (one per         (one per node: Connection with           │ workers run
        └── callbacks ◄┘  cluster)         a reader and a writer thread)           ▼ the jobs

Threads of a client process (all daemon threads; none keeps a finished script alive):

    user threads      submit(): pickle the arguments, record the job in its cluster's
                      recover file (RecoverLog), place it on a node's outbox.
    hub loop          one per process (ClientHub): UDP discovery (selectors), timers:
                      pings, re-dials, pulses, liveness, the "no node found" warning,
                      ids and big arguments for the recover files.
    dialer            short-lived, one per TCP connect + handshake.
    conn-writer       one per node: drains the outbox, batching many messages per frame.
    conn-reader       one per node: verifies frames, updates jobs, wakes waiters.
    notifier          one per cluster with callback/cluster_status: calls them in order.

Wire format (shared by every program): see ``Channel``.  A connection starts with a
nonce handshake in which both sides prove knowledge of the secret; every later frame is
``length(4) | body | HMAC-SHA256(session key, sequence number | length | body)``.  Nothing
received is unpickled before its HMAC is verified, and frames are unpickled with a
restricted unpickler that admits only plain data (user objects travel as opaque blobs
that only the job process, or the client that owns them, unpickles).  UDP discovery
datagrams are JSON with an HMAC and are never unpickled.

Receivers (shared by client, node and a relay): ``FileReceiver`` writes the files peers
send under one set of rules (names, modes, size, chunk order, no partial copies, stalled
transfers dropped); ``DiscoveryEndpoint`` owns a program's UDP sockets, verifies what
they read and answers forged pings with a rate-limited NAK.
"""

import argparse
import ast
import atexit
import collections
import errno
import functools
import hashlib
import hmac
import inspect
import io
import itertools
import json
import logging
import mmap
import os
import pickle
import re
import select
import selectors
import shlex
import socket
import ssl
import struct
import sys
import textwrap
import threading
import time
import types
import uuid

__version__ = '5.0.0'
__all__ = ['JobCluster', 'DispyJob', 'DispyNode', 'DispyNodeAvailInfo', 'NodeAllocate',
           'recover_jobs', 'logger', 'MsgTimeout']

# ================================================================================
# Constants
# ================================================================================

PROTOCOL_VERSION = 1          # bump on any incompatible change of the wire format
CLIENT_PORT = 51347           # client (and later dispyscheduler) UDP + TCP
NODE_PORT = 51348             # dispynode UDP + TCP
MAX_HANDSHAKE_MSG = 4096      # limit on anything read from an unauthenticated peer
DEFAULT_MAX_FRAME = 256 << 20  # limit on one authenticated frame (configurable)
# Arguments and results are pickled once, as opaque blobs, with a protocol every
# supported Python (3.4+) reads, so a blob made on one version loads on any other.
BLOB_PICKLE_PROTOCOL = 4
HANDSHAKE_TIMEOUT = 10.0      # a peer that sends nothing is dropped after this
DEFAULT_PULSE_INTERVAL = 5.0  # liveness when the user gives no pulse_interval
DEAD_PULSES = 5               # a peer silent for this many pulses is dead
RECONNECT_DELAYS = (0.1, 0.3, 0.6, 1.0, 2.0)  # retries before a node is declared dead
NO_NODE_WARN_AFTER = 10.0     # first "no node answered" warning, then doubling
# 4.15's name for the seconds a client waits on a node's answer (connect, handshake);
# scripts may raise it for slow networks: ``dispy.MsgTimeout = 30``.
MsgTimeout = HANDSHAKE_TIMEOUT


# ================================================================================
# Logging
# ================================================================================

logger = logging.getLogger('dispy')
# The spec passes ``loglevel=dispy.logger.DEBUG`` etc., so the logger carries the names.
for _level in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'):
    setattr(logger, _level, getattr(logging, _level))


def setup_logging(level=None, name='dispy'):
    """Gives ``logger`` a stderr handler unless the application configured logging."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s ' + name + ' - %(message)s',
                                               '%Y-%m-%d %H:%M:%S'))
        logger.addHandler(handler)
        logger.propagate = False
    if level is not None:
        logger.setLevel(level)


# ================================================================================
# Wire format: keys, handshake, authenticated frames
# ================================================================================

class ProtocolError(Exception):
    """The peer broke the protocol: bad magic, bad HMAC, oversized frame, EOF, ..."""


class AuthError(ProtocolError):
    """The peer does not know our secret (or we do not know its)."""


class VersionError(ProtocolError):
    """The peer speaks another version of the protocol."""


@functools.lru_cache(maxsize=8)
def secret_key(secret):
    """The key every HMAC is derived from; PBKDF2 slows down guessing a weak secret."""
    if isinstance(secret, str):
        secret = secret.encode('utf-8')
    return hashlib.pbkdf2_hmac('sha256', secret or b'', b'dispy-secret-v1', 20000)


def _mac(key, *parts):
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        h.update(part)
    return h.digest()


class FrameUnpickler(pickle.Unpickler):
    """Loads frames: plain data only.  A frame never holds user classes (they travel as
    blobs), so any global reference means a broken or hostile peer."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError('frame refers to %s.%s: only plain data allowed'
                                     % (module, name))


def loads_frame(data, buffers=()):
    return FrameUnpickler(io.BytesIO(data), buffers=buffers).load()


OOB_MIN = 65536     # bytes fields this big travel out of band: sent and received without copies


def out_of_band(msg):
    """The message with its big bytes fields wrapped so pickle (protocol 5) passes them
    to ``buffer_callback`` instead of copying them into the pickle."""
    return tuple(pickle.PickleBuffer(x) if isinstance(x, (bytes, bytearray, memoryview))
                 and len(x) >= OOB_MIN else x for x in msg)


def dumps_oob(obj, protocol):
    """(pickle, [memoryview of each out-of-band buffer])."""
    if protocol < 5:
        return pickle.dumps(obj, protocol), []
    buffers = []
    data = pickle.dumps(obj, protocol, buffer_callback=buffers.append)
    return data, [b.raw() for b in buffers]


def send_parts(sock, parts):
    """Sends byte-like parts with as few copies and system calls as the socket allows."""
    total = sum(len(p) for p in parts)
    if total < 65536:
        sock.sendall(b''.join(parts))
    elif isinstance(sock, ssl.SSLSocket) or not hasattr(sock, 'sendmsg'):
        for part in parts:
            sock.sendall(part)
    else:
        views = [memoryview(p).cast('B') for p in parts if len(p)]
        while views:
            sent = sock.sendmsg(views[:512])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0


def recv_into_exact(sock, view, on_data=None):
    """Fills a memoryview from a blocking socket."""
    have, n = 0, len(view)
    while have < n:
        got = sock.recv_into(view[have:], min(n - have, 1 << 22))
        if not got:
            raise ProtocolError('connection closed by peer')
        have += got
        if on_data is not None:
            on_data()


def dumps_blob(obj):
    return pickle.dumps(obj, BLOB_PICKLE_PROTOCOL)


class _ArgsPickler(pickle.Pickler):
    """Pickles a job's arguments and notes the classes and functions of the client's
    ``__main__`` they refer to: nodes know those only if their source was shipped.
    (``reducer_override`` is not called for ints, strings, bytes, lists, ..., so plain
    arguments cost nothing extra.)"""

    def __init__(self, file):
        super().__init__(file, BLOB_PICKLE_PROTOCOL)
        self.main_refs = []

    def reducer_override(self, obj):
        ref = obj if isinstance(obj, (type, types.FunctionType)) else type(obj)
        if getattr(ref, '__module__', None) == '__main__' and ref not in self.main_refs:
            self.main_refs.append(ref)
        return NotImplemented


# Exact types whose pickles can refer to nothing of the program's __main__.
_PLAIN_TYPES = frozenset((bytes, str, int, float, bool, type(None), complex))


def dumps_args(args):
    """(blob, [classes and functions of __main__ the arguments refer to]) of
    ``(args, kwargs)``.  Plain arguments (bytes, str, numbers) take pickle's fast path."""
    if all(type(a) in _PLAIN_TYPES for a in args[0]) and \
            all(type(v) in _PLAIN_TYPES for v in args[1].values()):
        return pickle.dumps(args, BLOB_PICKLE_PROTOCOL), []
    buf = io.BytesIO()
    pickler = _ArgsPickler(buf)
    pickler.dump(args)
    return buf.getvalue(), pickler.main_refs


def _recv_exact(sock, n, deadline=None):
    """Reads exactly ``n`` bytes from a blocking socket (handshake only), by
    ``deadline`` (monotonic) at the latest: a peer trickling bytes is cut off too."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout('handshake took too long')
            sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError('connection closed by peer during handshake')
        buf += chunk
    return bytes(buf)


def _send_hs(sock, payload):
    sock.sendall(struct.pack('!4sH', b'DSPY', len(payload)) + payload)


def _recv_hs(sock, deadline=None):
    head = _recv_exact(sock, 6, deadline)
    magic, length = struct.unpack('!4sH', head)
    if magic != b'DSPY':
        if head[:1] in (b'\x15', b'\x16'):
            raise ProtocolError('peer speaks TLS but this side is not using TLS '
                                '(give both sides the same certfile)')
        raise ProtocolError('peer is not a dispy program (got %r)' % head[:4])
    if length > MAX_HANDSHAKE_MSG:
        raise ProtocolError('handshake message of %d bytes exceeds %d' % (length, MAX_HANDSHAKE_MSG))
    return _recv_exact(sock, length, deadline)


def handshake(sock, secret, dialer, info, max_frame=DEFAULT_MAX_FRAME, timeout=HANDSHAKE_TIMEOUT,
              version=None):
    """Authenticates both ends of a connected socket; returns a ready ``Channel``.

    1. each side sends a hello (JSON: protocol version, pickle protocol, a fresh
       nonce, its frame limit and ``info``); the listener answers even a mismatched
       version, so both sides can name both versions in their error;
    2. the dialer proves it knows the secret: HMAC(key, "dialer" | both hellos);
    3. only then the listener proves it: HMAC(key, "listener" | both hellos), so an
       unauthenticated dialer learns nothing derived from the secret;
    4. session keys per direction are HMACs of both hellos: fresh per connection, so
       frames of one connection (or direction) cannot be replayed on another.
    """
    key = secret_key(secret)
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    version = PROTOCOL_VERSION if version is None else version
    mine = dict(info, magic='dispy', version=version, pickle=pickle.HIGHEST_PROTOCOL,
                nonce=os.urandom(16).hex(), max_frame=max_frame)
    my_hello = json.dumps(mine, sort_keys=True).encode()
    if dialer:
        _send_hs(sock, my_hello)
        peer_hello = _recv_hs(sock, deadline)
    else:
        peer_hello = _recv_hs(sock, deadline)
        _send_hs(sock, my_hello)
    try:
        peer = json.loads(peer_hello)
        peer_version = int(peer['version'])
        int(peer['pickle']), int(peer['max_frame']), str(peer['nonce'])
    except Exception:       # bad JSON, missing keys, wrong types, inf, deep nesting
        raise ProtocolError('malformed handshake from peer')
    if peer_version != version:
        raise VersionError('peer speaks dispy protocol version %s, this program speaks %s '
                           '(run the same dispy release on both)' % (peer_version, version))
    transcript = (my_hello + peer_hello) if dialer else (peer_hello + my_hello)
    dialer_proof = _mac(key, b'dispy-proof-dialer', transcript)
    listener_proof = _mac(key, b'dispy-proof-listener', transcript)
    if dialer:
        sock.sendall(b'P' + dialer_proof)
        answer = _recv_exact(sock, 33, deadline)
        if answer[:1] == b'F':
            raise AuthError('peer rejected our authentication (secrets differ)')
        if not hmac.compare_digest(answer[1:], listener_proof):
            raise AuthError('peer failed authentication (secrets differ)')
    else:
        answer = _recv_exact(sock, 33, deadline)
        if not hmac.compare_digest(answer[1:], dialer_proof):
            try:
                sock.sendall(b'F' + bytes(32))
            except OSError:
                pass
            raise AuthError('peer failed authentication (secrets differ)')
        sock.sendall(b'P' + listener_proof)
    d2l = _mac(key, b'dispy-key-d2l', transcript)
    l2d = _mac(key, b'dispy-key-l2d', transcript)
    sock.settimeout(None)
    return Channel(sock, send_key=d2l if dialer else l2d, recv_key=l2d if dialer else d2l,
                   max_frame=max_frame, peer_max_frame=int(peer['max_frame']),
                   pickle_protocol=min(pickle.HIGHEST_PROTOCOL, int(peer['pickle'])),
                   peer_info=peer)


class Channel:
    """An authenticated, framed message stream over one connected socket.

    Frame: ``length(4) | body | mac(32)`` where ``mac`` is HMAC-SHA256 with this
    direction's session key over ``sequence(8) | length | body``, and ``body`` is
    ``count(2) | count × size(8) | pickle | buffers``: big bytes fields of a message
    (arguments, results, file chunks) travel as raw buffers after the pickle
    (protocol 5 out-of-band), so they are never copied into or out of it.  The sequence
    number is implicit (counted by both sides), so a replayed, dropped or reordered
    frame fails verification.  The length is checked against our limit before anything
    is allocated.  ``send``/``recv`` are not thread-safe: one writer and one reader.
    """

    def __init__(self, sock, send_key, recv_key, max_frame, peer_max_frame, pickle_protocol,
                 peer_info):
        self.sock = sock
        self.send_key = send_key
        self.recv_key = recv_key
        self.max_frame = max_frame
        self.peer_max_frame = peer_max_frame
        self.pickle_protocol = pickle_protocol
        self.peer_info = peer_info
        self.send_seq = 0
        self.recv_seq = 0
        self.last_recv = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._rbuf = bytearray()
        self._send_mac = hmac.new(send_key, digestmod=hashlib.sha256)
        self._recv_mac = hmac.new(recv_key, digestmod=hashlib.sha256)

    # -- sending -----------------------------------------------------------------------
    def send_body(self, meta, buffers=()):
        table = struct.pack('!H%dQ' % len(buffers), len(buffers), *(len(b) for b in buffers))
        parts = [table, meta]
        parts.extend(buffers)
        length = sum(len(p) for p in parts)
        if length > self.peer_max_frame:
            raise ProtocolError('frame of %d bytes exceeds the peer\'s limit of %d'
                                % (length, self.peer_max_frame))
        header = struct.pack('!I', length)
        mac = self._send_mac.copy()
        mac.update(struct.pack('!Q', self.send_seq))
        mac.update(header)
        for part in parts:
            mac.update(part)
        self.send_seq += 1
        send_parts(self.sock, [header] + parts + [mac.digest()])
        self.bytes_sent += length + 36

    def send(self, obj):
        self.send_body(*dumps_oob(obj, self.pickle_protocol))

    # -- receiving ---------------------------------------------------------------------
    def _read(self, n):
        buf = self._rbuf
        if len(buf) < n and n > (1 << 20):
            # A large frame: read it straight into one buffer of its final size.
            out = bytearray(n)
            view = memoryview(out)
            have = len(buf)
            view[:have] = buf
            buf.clear()
            recv_into_exact(self.sock, view[have:], self._touch)
            return out
        while len(buf) < n:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ProtocolError('connection closed by peer')
            buf += chunk
            self.last_recv = time.monotonic()
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _touch(self):
        self.last_recv = time.monotonic()

    def recv_body(self):
        """(pickle, [buffers]) of the next frame, verified; raises on anything else."""
        header = self._read(4)
        (length,) = struct.unpack('!I', header)
        if length > self.max_frame:
            raise ProtocolError('peer sent a frame of %d bytes, over the limit of %d '
                                '(raise max_frame_size on this side if this is legitimate)'
                                % (length, self.max_frame))
        data = self._read(length + 32)
        body = memoryview(data)[:length]
        mac = self._recv_mac.copy()
        mac.update(struct.pack('!Q', self.recv_seq))
        mac.update(header)
        mac.update(body)
        if not hmac.compare_digest(mac.digest(), bytes(data[length:])):
            raise AuthError('frame failed authentication (corrupted, replayed or forged)')
        self.recv_seq += 1
        self.bytes_received += length + 36
        return _split_body(body)

    def recv(self):
        return loads_frame(*self.recv_body())

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _split_body(body):
    """A verified body → (pickle, [memoryview of each buffer]); malformed → error."""
    if len(body) < 2:
        raise ProtocolError('malformed frame')
    (count,) = struct.unpack_from('!H', body)
    start = 2 + 8 * count
    if start > len(body):
        raise ProtocolError('malformed frame')
    sizes = struct.unpack_from('!%dQ' % count, body, 2)
    end = len(body) - sum(sizes)
    if end < start:
        raise ProtocolError('malformed frame')
    buffers, offset = [], end
    for size in sizes:
        buffers.append(body[offset:offset + size])
        offset += size
    return body[start:end], buffers


class Connection:
    """A ``Channel`` with a writer thread that batches outgoing messages and a reader
    thread that hands incoming ones to ``handler``.

    Messages are tuples ``(KIND, ...)`` of plain data.  ``send`` never blocks on the
    network: the writer pickles everything queued so far into one frame, so a burst of
    small messages costs one frame, and a big transfer on this connection never stalls
    the caller or any other connection.  The handler gets
    ``handler.on_messages(conn, msgs)`` from the reader thread and
    ``handler.on_closed(conn, reason)`` exactly once.
    """

    BATCH_BYTES = 1 << 20     # stop adding messages to a frame past this size hint

    def __init__(self, channel, handler, name):
        self.channel = channel
        self.handler = handler
        self.name = name
        self.peer_info = channel.peer_info
        self._outbox = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closing = False     # no more sends; writer flushes then closes
        self._closed = False
        self._close_reason = None
        self._closed_reported = False
        self._last_send = time.monotonic()
        self.writer = threading.Thread(target=self._write_loop, daemon=True,
                                       name='dispy-writer-%s' % name)
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name='dispy-reader-%s' % name)

    def start(self):
        self.writer.start()
        self.reader.start()
        return self

    @property
    def closed(self):
        return self._closing or self._closed

    @property
    def last_recv(self):
        return self.channel.last_recv

    @property
    def idle_send(self):
        return time.monotonic() - self._last_send

    def send(self, msg, size=None):
        """Queues a message; ``size`` (by default its catalog bulk) guides batching."""
        if size is None:
            size = message_bulk(msg)
        with self._cond:
            if self._closing or self._closed:
                return False
            self._outbox.append((msg, size))
            if len(self._outbox) == 1:
                self._cond.notify()
        return True

    def close(self, reason='closed', flush=False):
        """Closes the connection; with ``flush`` after sending what is queued."""
        with self._cond:
            if self._closed or (self._closing and flush):
                return
            self._close_reason = self._close_reason or reason
            self._closing = True
            if not flush:
                self._closed = True
            self._cond.notify()
        if not flush:
            self.channel.close()

    def _write_loop(self):
        try:
            while True:
                with self._cond:
                    while not self._outbox and not self._closing:
                        self._cond.wait()
                    if self._closed or (self._closing and not self._outbox):
                        break
                    batch, size = [], 0
                    while self._outbox and size < self.BATCH_BYTES:
                        msg, hint = self._outbox.popleft()
                        batch.append(out_of_band(msg) if hint >= OOB_MIN else msg)
                        size += hint
                self._send_batch(batch)
                self._last_send = time.monotonic()
        except (OSError, ProtocolError, ValueError) as exc:
            self._fail('send failed: %s' % exc)
            return
        self._fail(self._close_reason or 'closed')

    def _send_batch(self, batch):
        channel = self.channel
        meta, buffers = dumps_oob(batch, channel.pickle_protocol)
        size = len(meta) + sum(len(b) for b in buffers)
        if size <= channel.peer_max_frame - 65536:
            channel.send_body(meta, buffers)
            return
        for msg in batch:   # too big together: one frame each
            meta, buffers = dumps_oob([msg], channel.pickle_protocol)
            size = len(meta) + sum(len(b) for b in buffers)
            if size > channel.peer_max_frame:
                logger.error('%s: %s message of %d bytes exceeds the peer\'s frame limit of %d;'
                             ' dropped', self.name, msg[0], size, channel.peer_max_frame)
                continue
            channel.send_body(meta, buffers)

    def _read_loop(self):
        reason = 'connection closed by peer'
        try:
            while True:
                msgs = self.channel.recv()
                if not isinstance(msgs, list):
                    raise ProtocolError('malformed frame')
                self.handler.on_messages(self, msgs)
        except AuthError as exc:
            reason = str(exc)
            logger.warning('%s: %s', self.name, reason)
        except (OSError, ProtocolError, EOFError, pickle.UnpicklingError) as exc:
            if not self._closed:
                reason = str(exc) or exc.__class__.__name__
        except Exception:
            logger.exception('%s: error handling a message; closing the connection', self.name)
            reason = 'internal error'
        self._fail(self._close_reason if self._closed else reason)

    def _fail(self, reason):
        with self._cond:
            self._closed = self._closing = True
            self._outbox.clear()
            report = not self._closed_reported
            self._closed_reported = True
            self._cond.notify_all()
        self.channel.close()
        if report:
            try:
                self.handler.on_closed(self, reason)
            except Exception:
                logger.exception('%s: error in close handler', self.name)


# ================================================================================
# Message catalog: every message the programs exchange, with its fields
# ================================================================================
#
# On the wire a message is a plain tuple ``(KIND, field, ...)`` (frames admit only plain
# data); in code it is built and read only through its ``MessageKind`` here, so the
# fields of a kind are written down once.  ``Msg.JOB(key, ...)`` builds one;
# ``Msg.parse(msg)`` checks a received one and gives a record with named fields.
#
#   client → node                              node → client
#   CLIENT        first message: who we are    NODE          first answer: CPUs, jobs held
#   COMPUTE       a computation's spec         BUSY          serving another client
#   FILE          a chunk of one of its files  SETUP         setup done (or failed)
#   JOB           run one job                  STARTED       a job began running
#   CANCEL        kill / drop one job          RESULT        a job ended (kept until ACK)
#   ACK           a result is safe here        PROVISIONAL   dispy_provisional_result
#   SET_CPUS      a computation's CPU share    SEND_FILE     dispy_send_file chunk
#   PUT_FILE      cluster.send_file chunk      PUT_FILE_DONE a send_file ended
#   CLOSE_COMPUTE end a computation (cleanup)  CLOSED        confirms CLOSE_COMPUTE
#   RELEASE       the client is done here      PULSE         liveness (+ availability)
#   PULSE         liveness

class MessageKind:
    """One kind of message: a name, its fields, and the field whose length is the
    message's bulk (the size hint that makes its bytes travel out of band)."""

    def __init__(self, name, fields, bulk=None):
        self.name = name
        self.fields = tuple(fields)
        self.record = collections.namedtuple(name.title().replace('_', ''), self.fields)
        self._bulk = self.fields.index(bulk) + 1 if bulk else None

    def __call__(self, *values):
        if len(values) != len(self.fields):
            raise TypeError('%s takes %d fields (%s), got %d' % (
                self.name, len(self.fields), ', '.join(self.fields), len(values)))
        return (self.name,) + values

    def read(self, msg):
        """The named fields of a received message; malformed → ProtocolError."""
        if len(msg) != len(self.fields) + 1:
            raise ProtocolError('%s message with %d fields, expected %d'
                                % (self.name, len(msg) - 1, len(self.fields)))
        return self.record._make(msg[1:])

    def replace(self, msg, **changes):
        """The message with some fields changed (a node rewriting a result it keeps)."""
        return (self.name,) + tuple(self.read(msg)._replace(**changes))

    def bulk(self, msg):
        data = msg[self._bulk] if self._bulk else None
        return len(data) if data is not None else 0


class Msg:
    """The catalog: every kind of connection message (see the table above)."""
    # client → node
    CLIENT = MessageKind('CLIENT', ['info'])
    COMPUTE = MessageKind('COMPUTE', ['cluster', 'spec'])
    FILE = MessageKind('FILE', ['cluster', 'name', 'mode', 'offset', 'data', 'last'], 'data')
    JOB = MessageKind('JOB', ['key', 'cluster', 'attempt', 'blob', 'options'], 'blob')
    CANCEL = MessageKind('CANCEL', ['key', 'attempt'])
    ACK = MessageKind('ACK', ['key', 'attempt'])
    SET_CPUS = MessageKind('SET_CPUS', ['cluster', 'cpus'])
    PUT_FILE = MessageKind('PUT_FILE', ['cluster', 'name', 'mode', 'offset', 'data', 'last'],
                           'data')
    CLOSE_COMPUTE = MessageKind('CLOSE_COMPUTE', ['cluster'])
    RELEASE = MessageKind('RELEASE', [])
    PULSE = MessageKind('PULSE', ['time'])
    # node → client
    NODE = MessageKind('NODE', ['info'])
    BUSY = MessageKind('BUSY', ['serving'])
    SETUP = MessageKind('SETUP', ['cluster', 'ok', 'error'])
    STARTED = MessageKind('STARTED', ['key', 'attempt', 'start_time'])
    RESULT = MessageKind('RESULT', ['key', 'attempt', 'status', 'blob', 'stdout', 'stderr',
                                    'exception', 'start_time', 'end_time'], 'blob')
    PROVISIONAL = MessageKind('PROVISIONAL', ['key', 'attempt', 'blob'], 'blob')
    SEND_FILE = MessageKind('SEND_FILE', ['key', 'attempt', 'path', 'mode', 'offset', 'data',
                                          'last'], 'data')
    PUT_FILE_DONE = MessageKind('PUT_FILE_DONE', ['cluster', 'name', 'error'])
    CLOSED = MessageKind('CLOSED', ['cluster'])
    NODE_PULSE = MessageKind('PULSE', ['time', 'avail'])

    @classmethod
    def result(cls, key, attempt, status, exception, blob=None, stdout='', stderr='',
               start_time=None, end_time=None):
        """A RESULT, with the fields a job that never ran leaves empty."""
        return cls.RESULT(key, attempt, status, blob, stdout, stderr, exception, start_time,
                          end_time or time.time())


# The kinds each side accepts, by name (PULSE differs by direction).
TO_NODE = {k.name: k for k in (Msg.CLIENT, Msg.COMPUTE, Msg.FILE, Msg.JOB, Msg.CANCEL,
                               Msg.ACK, Msg.SET_CPUS, Msg.PUT_FILE, Msg.CLOSE_COMPUTE,
                               Msg.RELEASE, Msg.PULSE)}
TO_CLIENT = {k.name: k for k in (Msg.NODE, Msg.BUSY, Msg.SETUP, Msg.STARTED, Msg.RESULT,
                                 Msg.PROVISIONAL, Msg.SEND_FILE, Msg.PUT_FILE_DONE,
                                 Msg.CLOSED, Msg.NODE_PULSE)}


def message_bulk(msg):
    """Size hint of any catalogued message (its bulk field's length)."""
    kind = TO_NODE.get(msg[0]) or TO_CLIENT.get(msg[0])
    return kind.bulk(msg) if kind is not None else 0


class Datagram:
    """Discovery datagrams (JSON dicts with an HMAC, never unpickled): ``t`` names the
    kind.  A node's answer always carries the address it is reachable at (``addr``),
    so a relay can forward it unchanged."""

    @staticmethod
    def ping(client, port):
        """client → nodes: who is there?  ``port`` is where to answer."""
        return {'t': 'ping', 'client': client, 'port': port}

    @staticmethod
    def pong(kind, ip, port, name, cpus, busy, instance, addr):
        """node → client: an answer to a ping (``kind='pong'``) or unasked
        (``'announce'``: the node started, or became free).  ``ip`` is the node's
        configured external address (``--ext_ip_addr``) or None: a client answers a
        node without one at the datagram's source address.  ``addr`` is always an
        address of the node: ``ip`` if given, else the one it serves on (bound with
        ``-i``), else the one it reaches the asker from."""
        return {'t': kind, 'ip': ip, 'port': port, 'name': name, 'cpus': cpus,
                'busy': busy, 'instance': instance, 'addr': addr}

    NAK = {'t': 'nak'}      # sent unauthenticated to a peer whose datagram failed the HMAC


# ================================================================================
# Sockets, addresses and TLS
# ================================================================================

def is_loopback(addr):
    return addr.startswith('127.') or addr == '::1' or addr == 'localhost'


def resolve_host(host, family=0):
    """Host name or address → address string (first result), or None."""
    if not host:
        return None
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return None
    if not infos:
        return None
    addr = infos[0][4][0]
    if '%' in host and '%' not in addr:     # keep a link-local address's interface
        addr += '%' + host.split('%', 1)[1]
    return addr


def sockaddr(addr, port):
    """The socket address for bind/connect: a link-local IPv6 address with its
    interface (``fe80::1%eth0``) needs the numeric scope id."""
    if '%' in addr:
        return socket.getaddrinfo(addr, port, socket.AF_INET6, socket.SOCK_DGRAM)[0][4]
    return (addr, port)


def _address_with_scope(addr):
    """The host of a socket address, with ``%interface`` for a link-local IPv6 one."""
    host = addr[0]
    if len(addr) == 4 and addr[3] and '%' not in host:
        try:
            host += '%' + socket.if_indextoname(addr[3])
        except OSError:
            pass
    return host


def interface_addresses():
    """[(family, address, broadcast or None)] of this machine's configured interfaces.

    Uses ``netifaces`` when installed, else Linux ioctls (IPv4) and /proc (IPv6); never
    a host-name lookup, which gives 127.0.1.1 on many distributions.
    """
    try:
        import netifaces
    except ImportError:
        netifaces = None
    found = []
    if netifaces is not None:
        for ifname in netifaces.interfaces():
            addrs = netifaces.ifaddresses(ifname)
            for entry in addrs.get(netifaces.AF_INET, []):
                found.append((socket.AF_INET, entry.get('addr'), entry.get('broadcast')))
            for entry in addrs.get(netifaces.AF_INET6, []):
                found.append((socket.AF_INET6, entry.get('addr', '').split('%')[0], None))
        return [f for f in found if f[1]]
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None and hasattr(socket, 'if_nameindex'):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _index, ifname in socket.if_nameindex():
                req = struct.pack('256s', ifname.encode()[:15])
                try:
                    addr = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, req)[20:24])
                except OSError:
                    continue
                try:
                    bcast = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8919, req)[20:24])
                except OSError:
                    bcast = None
                found.append((socket.AF_INET, addr, bcast if bcast != '0.0.0.0' else None))
    try:
        with open('/proc/net/if_inet6') as f:
            for line in f:
                hexaddr = line.split()[0]
                addr = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hexaddr))
                found.append((socket.AF_INET6, addr, None))
    except OSError:
        pass
    return found


def broadcast_addresses(local_addrs=None):
    """IPv4 broadcast addresses of the interfaces holding ``local_addrs`` (all if None);
    loopback never broadcasts."""
    result = []
    for family, addr, bcast in interface_addresses():
        if family != socket.AF_INET or not bcast or is_loopback(addr):
            continue
        if local_addrs is None or addr in local_addrs:
            if bcast not in result:
                result.append(bcast)
    return result


IPV6_ALL_NODES = 'ff02::1'   # link-local multicast: IPv6's broadcast


def multicast_destinations(port):
    """(ff02::1, port, 0, scope) on every interface but loopback: where IPv6 pings and
    announcements go."""
    try:
        names = socket.if_nameindex()
    except (AttributeError, OSError):
        return []
    return [(IPV6_ALL_NODES, port, 0, index) for index, name in names if name != 'lo']


def bind_udp_any_v6(port):
    """An IPv6-only UDP socket on [::]:port, or None when the host has no IPv6."""
    if not socket.has_ipv6:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(('::', port))
    except OSError:
        sock.close()
        return None
    return sock


def make_ssl_context(server_side, certfile=None, keyfile=None, cafile=None):
    """TLS context for client↔node links, or None when no certificate is given.

    With only ``certfile`` (the spec's usage: the same self-signed file everywhere) that
    certificate is the trust anchor on both sides; with ``cafile`` the peer certificate
    must chain to it.  Peers are machines named by address, so host names are not
    checked: trust comes from the certificate alone.
    """
    if not certfile:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile or certfile)
    return ctx


def node_address_family(addr):
    return socket.AF_INET6 if ':' in addr else socket.AF_INET


# ================================================================================
# Discovery datagrams (JSON + HMAC; never unpickled)
# ================================================================================

UDP_MAGIC = b'DSPYU1'


def pack_datagram(secret, msg):
    payload = json.dumps(msg, sort_keys=True).encode()
    return UDP_MAGIC + _mac(secret_key(secret), b'dispy-udp', payload) + payload


def pack_unauthenticated(msg):
    """For replies to peers that failed authentication: carries no secret-derived bytes."""
    return UDP_MAGIC + bytes(32) + json.dumps(msg, sort_keys=True).encode()


def unpack_datagram(secret, data):
    """(msg, authenticated) for a datagram; msg is None when it is not ours at all."""
    if len(data) > MAX_HANDSHAKE_MSG or not data.startswith(UDP_MAGIC):
        return None, False
    mac, payload = data[6:38], data[38:]
    try:
        msg = json.loads(payload)
    except Exception:       # ValueError, RecursionError on deep nesting, ...
        return None, False
    if not isinstance(msg, dict):
        return None, False
    good = hmac.compare_digest(mac, _mac(secret_key(secret), b'dispy-udp', payload))
    return msg, good


# ================================================================================
# Receivers: files that arrive in chunks, discovery datagrams (client, node, relay)
# ================================================================================
#
# Both are shared by every program that takes files or datagrams from peers, so each
# rule (path check, mode mask, size limit, chunk order, NAK rate limit) is written once.

FILE_STALL_TIMEOUT = 120.0   # a partial file whose next chunk is this late is dropped
_PART_MARK = '.dispy-part-'  # in the temporary name of a file being received


class FileRefused(ValueError):
    """A file, or one chunk of it, breaks a receiver's rules; the text says which."""


class PathRefused(FileRefused):
    """A file's name or path is not allowed (it would leave the folder)."""


class _PartialFile:
    """A file being received: written under a temporary name, renamed when complete."""

    __slots__ = ('final', 'temp', 'file', 'size', 'last_chunk')

    def __init__(self, final, now):
        self.final = final
        head, tail = os.path.split(final)
        self.temp = os.path.join(head, '.%s%s%s' % (tail, _PART_MARK, uuid.uuid4().hex[:8]))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0)
        self.file = os.fdopen(os.open(self.temp, flags, 0o600), 'wb')
        self.size = 0
        self.last_chunk = now

    def discard(self):
        self.file.close()
        try:
            os.unlink(self.temp)
        except OSError:
            pass


class FileReceiver:
    """Writes the files peers send into one folder, under one set of rules:

    * names: ``paths='plain'`` admits only plain base names (a node's computation files,
      ``cluster.send_file``, ``dispy_job_depends``); ``paths='relative'`` admits relative
      paths that stay under the folder, a leading ``/`` dropped (files jobs send back
      to the client), with folders made as needed;
    * mode: ``(mode & 0o755) | 0o600``: never setuid/setgid/sticky, the owner may
      always read and write, the user's other rwx bits kept;
    * size: at most ``max_size`` bytes (0: no limit), counting the bytes received,
      not the offsets claimed;
    * order: each chunk's offset is the number of bytes received so far, so the first
      is 0 and a second "first" chunk of a file being received is refused;
    * a file is written under a temporary name beside its path and renamed there when
      its last chunk arrives: the path only ever holds a whole file, and a refused or
      failed file leaves nothing behind;
    * liveness: a partial file whose next chunk is more than ``stall_timeout`` seconds
      late (its sender vanished) is dropped by ``expire(now)``, which every chunk runs
      too; ``close()`` drops every partial file (its owner is done).

    Files in transit are told apart by ``(source, name)``: two senders of one name
    (jobs of one cluster sending back the same path) never mix their chunks.
    Thread-safe.
    """

    def __init__(self, folder, max_size=0, paths='plain', stall_timeout=FILE_STALL_TIMEOUT):
        if paths not in ('plain', 'relative'):
            raise ValueError('paths must be "plain" or "relative", not %r' % (paths,))
        self.folder = os.path.abspath(folder)
        self.max_size = max_size
        self.paths = paths
        self.stall_timeout = stall_timeout
        self._partial = {}          # (source, name) -> _PartialFile
        self._lock = threading.Lock()

    @staticmethod
    def plain_name(name):
        """``name`` if it is a plain base name, nothing that leaves a folder."""
        if (not isinstance(name, str) or not name or name in ('.', '..') or '/' in name
                or '\\' in name or '\0' in name):
            raise PathRefused('refused file name %r: only plain base names are accepted'
                              % (name,))
        return name

    def path_for(self, name):
        """The absolute path a file of this name is written at; PathRefused if none."""
        if self.paths == 'plain':
            return os.path.join(self.folder, self.plain_name(name))
        if not isinstance(name, str) or '\0' in name:
            raise PathRefused('refused path %r' % (name,))
        path = os.path.normpath(os.path.join(self.folder, name.lstrip('/\\')))
        if os.path.commonpath([self.folder, path]) != self.folder or path == self.folder:
            raise PathRefused('refused path %r: it would leave the destination folder'
                              % (name,))
        return path

    def chunk(self, name, mode, offset, data, last, source=None, now=None):
        """Takes one chunk of a file; returns the file's path once ``last`` arrived,
        else None.  A refused chunk (FileRefused) or a failed write (OSError) drops the
        whole file."""
        now = time.monotonic() if now is None else now
        path = self.path_for(name)      # a refused name never holds a file
        with self._lock:
            self._expire(now)
            key = (source, name)
            try:
                return self._take(key, path, mode, offset, data, last, now)
            except (ValueError, OSError):
                partial = self._partial.pop(key, None)
                if partial is not None:
                    partial.discard()
                raise

    def whole(self, name, mode, data):
        """Takes a file sent in one message; returns its path."""
        return self.chunk(name, mode, 0, data, True, source=object())   # never a partial's

    def _take(self, key, path, mode, offset, data, last, now):
        mode = self._mode(mode)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FileRefused('malformed file chunk')
        partial = self._partial.get(key)
        received = partial.size if partial is not None else 0
        if type(offset) is not int or offset != received:
            raise FileRefused('file chunk out of order')
        if self.max_size and received + len(data) > self.max_size:
            raise FileRefused("file is bigger than this node's --max_file_size (%d bytes)"
                              % self.max_size)
        if partial is None:
            if self.paths == 'relative':
                os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = self._partial[key] = _PartialFile(path, now)
        partial.file.write(data)
        partial.size += len(data)
        partial.last_chunk = now
        if not last:
            return None
        del self._partial[key]
        try:
            partial.file.close()
            os.chmod(partial.temp, mode)
            os.replace(partial.temp, path)
        except OSError:
            partial.discard()
            raise
        return path

    @staticmethod
    def _mode(mode):
        try:
            return (int(mode) & 0o755) | 0o600
        except (TypeError, ValueError, OverflowError):
            raise FileRefused('malformed file mode %r' % (mode,))

    def expire(self, now=None):
        """Drops the partial files whose next chunk is overdue; returns their names."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._expire(now)

    def _expire(self, now):
        late = [key for key, partial in self._partial.items()
                if now - partial.last_chunk > self.stall_timeout]
        for key in late:
            self._partial.pop(key).discard()
        return [name for _source, name in late]

    def close(self):
        """Drops every partial file (the owner of this folder is done)."""
        with self._lock:
            partials, self._partial = list(self._partial.values()), {}
        for partial in partials:
            partial.discard()

    def __len__(self):
        """Files being received."""
        return len(self._partial)


_folder_receivers = {}      # folder -> FileReceiver: files jobs send back (SEND_FILE)
_folder_receivers_lock = threading.Lock()


def folder_receiver(folder):
    """This process's receiver of the files jobs send back into ``folder`` (a
    cluster's working directory; clusters sharing one share its receiver).  Its
    partial files are removed at exit at the latest."""
    folder = os.path.abspath(folder)
    with _folder_receivers_lock:
        receiver = _folder_receivers.get(folder)
        if receiver is None:
            receiver = _folder_receivers[folder] = FileReceiver(folder, paths='relative')
        return receiver


@atexit.register
def _close_folder_receivers():
    with _folder_receivers_lock:
        receivers = list(_folder_receivers.values())
    for receiver in receivers:
        receiver.close()


NAK_INTERVAL = 1.0          # at most one NAK a second to one address ...
NAK_TABLE_LIMIT = 10000     # ... remembered for this many addresses at most


class DiscoveryEndpoint:
    """The UDP sockets of one program's discovery, and the rules for what they read.

    Reading never blocks: ``handle_readable(sock)`` reads what is queued on a socket.
    An authenticated datagram goes to ``on_datagram(msg, addr, sock)``; an
    unauthenticated ping is answered with a bare NAK (no secret-derived bytes; at most
    one a second per address, the table of addresses bounded) when ``nak_pings``; any
    other unauthenticated datagram goes to ``on_unauthenticated(msg, addr, sock)`` if
    given (a client warns on NAKs).  Datagrams that are not ours are dropped.

    Use it in a thread of its own (``serve_forever``, until ``close``), or in a
    caller's selector loop: ``register(selector)`` registers every socket with the
    endpoint as the key's data, and the loop calls ``handle_readable(key.fileobj)``.
    The callbacks run in the reading thread.
    """

    def __init__(self, secret, on_datagram, on_unauthenticated=None, nak_pings=True):
        self.secret = secret
        self.on_datagram = on_datagram
        self.on_unauthenticated = on_unauthenticated
        self.nak_pings = nak_pings
        self.socks = []
        self.closed = False
        self._last_nak = {}         # address -> monotonic time of the last NAK sent to it

    # -- sockets ------------------------------------------------------------------------------
    def bind(self, addr, port):
        """A socket bound on ``addr`` ('' = every IPv4 interface) and ``port`` (0: any
        free one); OSError as the system gave it (the caller words it)."""
        family = node_address_family(addr) if addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(sockaddr(addr, port) if addr else ('', port))
        except OSError:
            sock.close()
            raise
        return self.add_socket(sock)

    def bind_any_v6(self, port):
        """The IPv6 any-address socket beside an all-interfaces IPv4 one, or None when
        the host has no IPv6."""
        sock = bind_udp_any_v6(port)
        return self.add_socket(sock) if sock is not None else None

    def add_socket(self, sock):
        """Takes a bound datagram socket (a relay's, a test's)."""
        sock.setblocking(False)
        self.socks.append(sock)
        return sock

    @property
    def port(self):
        return self.socks[0].getsockname()[1] if self.socks else None

    def register(self, selector, data=None):
        """Registers every socket in a caller's selector (``data`` defaults to self)."""
        for sock in self.socks:
            selector.register(sock, selectors.EVENT_READ, self if data is None else data)

    def unregister(self, selector):
        for sock in self.socks:
            try:
                selector.unregister(sock)
            except (KeyError, ValueError):
                pass

    # -- reading ------------------------------------------------------------------------------
    def handle_readable(self, sock, limit=64):
        """Reads and dispatches up to ``limit`` queued datagrams, without blocking."""
        for _ in range(limit):
            try:
                data, addr = sock.recvfrom(MAX_HANDSHAKE_MSG + 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:         # closed, or an ICMP error reported on this socket
                return
            self._dispatch(data, addr, sock)

    def _dispatch(self, data, addr, sock):
        msg, good = unpack_datagram(self.secret, data)
        if msg is None:
            return
        try:
            if good:
                self.on_datagram(msg, addr, sock)
            elif msg.get('t') == 'ping':
                if self.nak_pings:
                    self._nak(addr, sock)
            elif self.on_unauthenticated is not None:
                self.on_unauthenticated(msg, addr, sock)
        except Exception:           # a bad datagram must not stop discovery
            logger.exception('error handling a datagram from %s', addr[0])

    def _nak(self, addr, sock):
        now = time.monotonic()
        if len(self._last_nak) > NAK_TABLE_LIMIT // 2:
            self._last_nak = {a: t for a, t in self._last_nak.items()
                              if now - t <= NAK_INTERVAL}
        if now - self._last_nak.get(addr[0], 0) <= NAK_INTERVAL or \
                len(self._last_nak) >= NAK_TABLE_LIMIT:
            return
        self._last_nak[addr[0]] = now
        logger.info('ping from %s failed authentication', addr[0])
        self.sendto(pack_unauthenticated(Datagram.NAK), addr, sock)

    def serve_forever(self, poll_interval=0.5):
        """Reads until ``close()`` (in a thread of its own)."""
        with selectors.DefaultSelector() as selector:
            self.register(selector)
            while not self.closed:
                for key, _events in selector.select(poll_interval):
                    self.handle_readable(key.fileobj)

    # -- sending ------------------------------------------------------------------------------
    def pack(self, msg):
        return pack_datagram(self.secret, msg)

    def sock_for(self, host):
        """The first socket of the address family of ``host``, or None."""
        family = node_address_family(host)
        return next((s for s in self.socks if s.family == family), None)

    def sendto(self, data, addr, sock=None):
        """Sends packed ``data``; False (logged at debug level) when it could not go."""
        sock = sock or self.sock_for(addr[0])
        if sock is None:
            return False
        try:
            sock.sendto(data, addr)
            return True
        except OSError as exc:
            logger.debug('UDP send to %s:%s failed: %s', addr[0], addr[1], exc)
            return False

    def broadcast(self, data, port, local_addrs=None):
        """To the IPv4 broadcast address of every interface holding ``local_addrs``
        (all if None), never loopback's."""
        for bcast in broadcast_addresses(local_addrs):
            self.sendto(data, (bcast, port))

    def multicast(self, data, port):
        """To ff02::1 on every interface but loopback (IPv6's broadcast)."""
        for dest in multicast_destinations(port):
            self.sendto(data, dest)

    def close(self):
        self.closed = True
        for sock in self.socks:
            sock.close()


def local_address_towards(addr):
    """The address this host would send from to reach socket address ``addr`` (a
    route lookup: no packet is sent), or None."""
    family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(addr)
            return _address_with_scope(probe.getsockname())
    except OSError:
        return None


# ================================================================================
# Public data classes
# ================================================================================

class DispyJob:
    """A job: one call of the computation.  ``submit`` returns it at once.

    Only ``id`` is for the user to write; it starts as the job's number (process-wide
    integers from 1).  ``job()`` waits for the result.  Jobs carry no Event or lock of
    their own (100,000 pending jobs must stay small): they wait on their cluster's
    condition.  The pickled arguments are dropped when the job ends; ``args`` and
    ``kwargs`` are the objects given to ``submit``.
    """

    Created = 5
    Running = 6
    ProvisionalResult = 7
    Cancelled = 8
    Terminated = 9
    Abandoned = 10
    Finished = 11

    __slots__ = ('id', 'status', 'ip_addr', 'result', 'stdout', 'stderr', 'exception',
                 'submit_time', 'start_time', 'end_time', 'args', 'kwargs', '_key', '_cluster',
                 '_blob', '_attempt', '_node', '_pin', '_options', '__weakref__')

    def __init__(self, key, cluster, blob, pin=None, options=None, args=(), kwargs=None):
        self.id = key
        self.args = args
        self.kwargs = kwargs if kwargs is not None else {}
        self.submit_time = time.time()
        self.status = DispyJob.Created
        self.ip_addr = None
        self.result = self.stdout = self.stderr = self.exception = None
        self.start_time = self.end_time = None
        self._key = key
        self._cluster = cluster
        self._blob = blob          # pickled (args, kwargs); dropped when the job ends
        self._attempt = 0          # dispatch count: replies of older attempts are stale
        self._node = None          # NodeLink it is dispatched to
        self._pin = pin            # node address for submit_node
        self._options = options    # per-job extras for the node (timeout, ...) or None

    def __call__(self, clear=False, timeout=None):
        """Waits for the job to end; returns its result (None on timeout)."""
        self._cluster._wait_job(self, timeout)
        result = self.result
        if clear and self.status in FINAL_STATUSES:
            self.result = None
        return result

    @property
    def finish(self):
        """Compatibility with the original's ``job.finish.wait()`` / ``is_set()``."""
        return _JobFinish(self)

    def __lt__(self, other):
        return self._key < other._key

    def __repr__(self):
        return '<DispyJob %s id=%r status=%s>' % (self._key, self.id,
                                                  STATUS_NAMES.get(self.status, self.status))

    def _snapshot(self):
        snap = DispyJob.__new__(DispyJob)
        for name in DispyJob.__slots__[:-1]:
            setattr(snap, name, getattr(self, name))
        snap._blob = None
        return snap


FINAL_STATUSES = frozenset((DispyJob.Finished, DispyJob.Terminated, DispyJob.Cancelled,
                            DispyJob.Abandoned))


class _JobFinish:
    __slots__ = ('job',)

    def __init__(self, job):
        self.job = job

    def is_set(self):
        return self.job.status in FINAL_STATUSES

    def wait(self, timeout=None):
        return self.job._cluster._wait_job(self.job, timeout)


class DispyNode:
    """A node as one cluster sees it (given to ``cluster_status`` callbacks)."""

    Initialized = 1
    Closed = 2
    AvailInfo = 3

    def __init__(self, ip_addr, name='', cpus=0, platform=''):
        self.ip_addr = ip_addr
        self.name = name
        self.cpus = cpus               # CPUs this cluster uses on the node
        self.avail_cpus = cpus         # CPUs the node offers
        self.busy = 0                  # jobs of this cluster running there
        self.jobs_done = 0
        self.cpu_time = 0.0
        self.platform = platform
        self.avail_info = None
        self.update_time = time.time()
        self.tx = 0
        self.rx = 0

    def __repr__(self):
        return '<DispyNode %s (%s) cpus=%s busy=%s>' % (self.ip_addr, self.name, self.cpus, self.busy)


STATUS_NAMES = {DispyJob.Created: 'Created', DispyJob.Running: 'Running',
                DispyJob.ProvisionalResult: 'ProvisionalResult',
                DispyJob.Cancelled: 'Cancelled', DispyJob.Terminated: 'Terminated',
                DispyJob.Abandoned: 'Abandoned', DispyJob.Finished: 'Finished'}


class DispyNodeAvailInfo:
    """Availability of a node (sent when the node has psutil)."""

    def __init__(self, cpu, memory, disk, swap):
        self.cpu = cpu
        self.memory = memory
        self.disk = disk
        self.swap = swap

    def __repr__(self):
        return ('<DispyNodeAvailInfo cpu=%.1f%% memory=%s disk=%s swap=%.1f%%>'
                % (self.cpu, self.memory, self.disk, self.swap))


class NodeAllocate:
    """Which nodes a cluster uses and how many of their CPUs.

    ``host`` is a host name, an address or a pattern with ``*`` for whole octets
    (``'192.168.3.*'`` matches 192.168.3.x, never 192.168.30.x).  Subclasses override
    ``allocate`` to choose (return 0 to skip the node).
    """

    def __init__(self, host, port=None, cpus=0, depends=(), setup_args=()):
        self.host = str(host)
        self.port = int(port) if port else None
        self.cpus = int(cpus or 0)
        self.depends = list(depends or ())      # extra dependencies for these nodes
        self.setup_args = tuple(setup_args) if setup_args else None
        if '*' in self.host:
            self.ip_addr = None
            self._pattern = re.compile(
                '^' + r'\.'.join('[0-9a-fA-F:.]+' if part == '*' else re.escape(part)
                                 for part in self.host.split('.')) + '$')
        else:
            self.ip_addr = resolve_host(self.host) or self.host
            self._pattern = None

    def matches(self, ip_addr, name=''):
        if self.host == '*':
            return True
        if self._pattern is not None:
            return bool(self._pattern.match(ip_addr))
        return ip_addr == self.ip_addr or (name and name == self.host)

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
        """CPUs to use on the node (0 = don't use it)."""
        if self.cpus > 0:
            return min(self.cpus, cpus)
        if self.cpus < 0:
            return max(cpus + self.cpus, 0)
        return cpus

    def __repr__(self):
        return 'NodeAllocate(%r, port=%r, cpus=%r)' % (self.host, self.port, self.cpus)


def _node_allocations(nodes, default_port):
    """The ``nodes`` argument → list of NodeAllocate (strings, tuples or objects)."""
    if isinstance(nodes, (str, NodeAllocate)):
        nodes = [nodes]
    result = []
    for item in nodes:
        if isinstance(item, NodeAllocate):
            alloc = item
        elif isinstance(item, str):
            alloc = NodeAllocate(item)
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3:
            alloc = NodeAllocate(*item)
        else:
            raise ValueError('nodes: %r is not a host, address, pattern, tuple or NodeAllocate'
                             % (item,))
        if alloc.port is None:
            alloc.port = default_port
        result.append(alloc)
    return result


# ================================================================================
# Shipping computations: sources, dependencies, files
# ================================================================================

class ComputationError(ValueError):
    """A computation or one of its dependencies cannot be shipped."""


def _function_source(func, what):
    if isinstance(func, functools.partial):
        func = func.func
    if not (inspect.isfunction(func) or inspect.isclass(func)):
        raise ComputationError('%s %r is not a Python function or class' % (what, func))
    if getattr(func, '__name__', '') == '<lambda>':
        raise ComputationError('%s is a lambda: give it a name with def so its source can be '
                               'shipped' % what)
    code = getattr(inspect.unwrap(func), '__code__', None)    # the def, not a decorator's
    free = getattr(code, 'co_freevars', ())
    if free:
        names = ', '.join(repr(v) for v in free)
        raise ComputationError(
            '%s %s uses %s of the function it is defined in (a closure); only its source '
            'reaches the nodes, where %s would be undefined: define %s at module level and '
            'pass %s as arguments, or make %s module globals listed in depends'
            % (what, func.__name__, names, names, func.__name__, names, names))
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError) as exc:
        raise ComputationError('cannot find the source of %s %r (%s); define it in a file, '
                               'not interactively' % (what, getattr(func, '__name__', func), exc))
    return textwrap.dedent(source)


def _find_name(obj, frames_globals):
    for ns in frames_globals:
        for name, value in ns.items():
            if value is obj and not name.startswith('__'):
                return name
    return None


class Dependencies:
    """Collects ``depends`` items: functions and classes as source text, class instances
    as a pickled blob (bound to their global names), modules and files as files."""

    def __init__(self, caller_globals=()):
        self.code = []
        self.names = set()         # functions and classes already in ``code``
        self.objects = {}
        self.modules = []
        self.files = []            # (base name, local path)
        self.caller_globals = caller_globals

    def add_all(self, depends):
        for dep in depends or ():
            self.add(dep)
        return self

    def add_source(self, func, what):
        base = func.func if isinstance(func, functools.partial) else func
        if base.__name__ not in self.names:
            self.code.append(_function_source(func, what))
            self.names.add(base.__name__)

    def add_file(self, path):
        name = os.path.basename(path)
        if any(n == name for n, _ in self.files):
            raise ComputationError('two dependencies named %r: files are copied by base name'
                                   % name)
        self.files.append((name, path))

    def add(self, dep):
        if isinstance(dep, str):
            if not os.path.isfile(dep):
                raise ComputationError('dependency file %r not found' % dep)
            self.add_file(os.path.abspath(dep))
        elif isinstance(dep, types.ModuleType):
            path = getattr(dep, '__file__', None)
            if not path or not path.endswith('.py') or os.path.basename(path) == '__init__.py':
                raise ComputationError('module %r has no single source file to ship'
                                       % dep.__name__)
            self.add_file(path)
            self.modules.append(os.path.basename(path)[:-3])
        elif inspect.isfunction(dep) or inspect.isclass(dep):
            self.add_source(dep, 'dependency')
        elif isinstance(dep, functools.partial):
            raise ComputationError('depends: partial functions are only for setup/cleanup')
        else:   # an instance: ship its class (if it is the client's own) and the object
            cls = type(dep)
            if cls.__module__ == '__main__':
                self.add_source(cls, 'class of dependency')
            name = _find_name(dep, self.caller_globals)
            if name is None:
                raise ComputationError('depends: object %r is not bound to a global name, so '
                                       'jobs could not refer to it' % (dep,))
            self.objects[name] = dep

    def source(self):
        source = '\n\n'.join(self.code)
        try:
            compile(source, '<dispy computation>', 'exec')
        except SyntaxError as exc:
            raise ComputationError('computation source does not compile: %s' % exc)
        return source

    def objects_blob(self):
        try:
            return dumps_blob(self.objects) if self.objects else None
        except Exception as exc:
            raise ComputationError('objects in depends cannot be pickled: %s' % exc)

    def job_extra(self):
        """Per-job dependencies as plain data travelling with the job."""
        files = []
        for name, path in self.files:
            with open(path, 'rb') as f:
                files.append((name, os.stat(path).st_mode & 0o777, f.read()))
        return {'code': self.source(), 'objects': self.objects_blob(),
                'modules': self.modules, 'files': files}


class ComputePackage:
    """Everything a node needs to run a computation, built once per cluster.

    ``spec`` is plain data (sent in a frame); ``files`` are (name, path) pairs streamed
    after it.  Python code travels as source text, so client and node may run
    different Python versions.
    """

    def __init__(self, computation, depends=(), setup=None, cleanup=True, dest_path=None,
                 caller_globals=()):
        deps = Dependencies(caller_globals)
        if isinstance(computation, str):
            path = os.path.abspath(computation)
            if not os.path.isfile(path):
                raise ComputationError('program %r not found' % computation)
            self.kind = 'program'
            self.name = os.path.basename(path)
            deps.add_file(path)
        elif inspect.isfunction(computation):
            self.kind = 'function'
            self.name = computation.__name__
        else:
            raise ComputationError('computation must be a Python function or the path of a '
                                   'program, not %r' % (computation,))
        deps.add_all(depends)
        self.setup = self._function_spec(deps, setup, 'setup')
        cleanup_spec = self._function_spec(deps, cleanup, 'cleanup')
        if self.kind == 'function':
            deps.add_source(computation, 'computation')
        self.files = deps.files
        self.names = deps.names         # what the nodes define (job arguments may refer)
        self.caller_globals = caller_globals
        self.spec = {
            'kind': self.kind, 'name': self.name, 'code': deps.source(),
            'objects': deps.objects_blob(), 'modules': deps.modules, 'setup': self.setup,
            'cleanup': cleanup_spec, 'remove_files': cleanup is not False,
            'dest_path': dest_path, 'files': [name for name, _ in self.files],
        }

    @staticmethod
    def _function_spec(deps, func, what):
        """(name, pickled partial arguments) of setup/cleanup, their source added."""
        if func is None or isinstance(func, bool):
            return None
        deps.add_source(func, what)
        base = func.func if isinstance(func, functools.partial) else func
        args = ((func.args, func.keywords or {}) if isinstance(func, functools.partial)
                else ((), {}))
        try:
            return (base.__name__, dumps_blob(args))
        except Exception as exc:
            raise ComputationError('%s arguments cannot be pickled: %s' % (what, exc))

    def for_node(self, alloc):
        """(spec, files) for one node: a NodeAllocate may add ``setup_args`` and
        ``depends`` for its nodes."""
        setup_args = getattr(alloc, 'setup_args', None)
        extra = getattr(alloc, 'depends', None)
        spec, files = dict(self.spec), self.files
        if setup_args is not None and spec['setup']:
            spec['setup'] = (spec['setup'][0], dumps_blob((tuple(setup_args), {})))
        if extra:
            deps = Dependencies(self.caller_globals).add_all(extra)
            spec['code'] = spec['code'] + '\n\n' + deps.source()
            files = files + deps.files
            spec['files'] = [name for name, _ in files]
            spec['modules'] = spec['modules'] + deps.modules
        return spec, files


# ================================================================================
# Helpers for the client side
# ================================================================================

def _env_default(value, env_name, default, convert=str):
    """The user's argument, else an environment override, else the default."""
    if value is not None:
        return value
    text = os.environ.get(env_name)
    if text is None or text == '':
        return default
    return convert(text)


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _split_list(text):
    return [part for part in re.split(r'[,\s]+', text) if part]


# ================================================================================
# Scheduler: jobs ↔ nodes (hosted by JobCluster here, by dispyscheduler.py later)
# ================================================================================

class NodeLink:
    """The scheduler's view of one node: its connection, CPUs, the jobs dispatched to it
    and which clusters are set up there.  It handles the node's messages."""

    def __init__(self, hub, ip_addr, port):
        self.hub = hub
        self.ip_addr = ip_addr
        self.port = port
        self.name = ''
        self.cpus = 0
        self.platform = ''
        self.instance = None      # changes when the node restarts
        self.avail_info = None
        self.conn = None
        self.state = 'new'        # new, connecting, ready, reconnecting, busy, alias, dead
        self.jobs = {}            # job key -> DispyJob dispatched here
        self.setups = {}          # cluster key -> 'pending' | 'ready' | 'failed'
        self.in_flight = collections.Counter()   # cluster key -> jobs dispatched
        self.alloc_cpus = {}      # cluster key -> CPUs the cluster may use here
        self.retry = 0            # index in RECONNECT_DELAYS while reconnecting
        self.put_replies = {}     # (cluster key, file name) -> error or None (send_file)
        self.closing = {}         # cluster key -> re-setup after closing? (close_node)
        self.next_dial = 0.0
        self.lost_reason = None
        self.busy_warned = False
        self.busy_with = ''        # what the node said of the client it serves instead
        self.dialing = False      # a dial thread is running
        self.seen_instance = None # node instance its discovery answer named
        self.silent = False       # closed because no pulse came: dead at once
        self.pulse_interval = None  # what the node was told when it connected
        self.cancels = set()      # (key, attempt) cancelled: sent again after a reconnect

    def __repr__(self):
        return '<NodeLink %s:%s %s>' % (self.ip_addr, self.port, self.state)

    def capacity(self, ckey):
        """Jobs of a cluster that may be in flight here: its CPUs plus a few queued on
        the node, so the node never waits a round trip for its next job."""
        cpus = self.alloc_cpus.get(ckey, 0)
        return cpus + max(2, cpus) if cpus else 0

    def send(self, msg):
        conn = self.conn
        return conn.send(msg) if conn is not None else False

    # -- Connection handler --------------------------------------------------------------
    def on_messages(self, conn, msgs):
        self.hub.scheduler.on_node_messages(self, conn, msgs)

    def on_closed(self, conn, reason):
        self.hub.on_link_closed(self, conn, reason)


class Scheduler:
    """Places jobs of every cluster on the least-loaded node that has the cluster's
    computation set up, and follows each job to its end.

    All state is guarded by one lock, ``self.lock``; each cluster's condition shares it,
    so a reply that ends a job and the user waiting for it see one consistent state.
    A cluster is any object with the small interface used here (``_key``, ``_package``,
    ``_allocs``, ``_pending``, ``_pinned``, ``_reentrant``, ``_job_changed``,
    ``_node_changed``), so dispyscheduler.py can host clusters of remote clients.
    """

    def __init__(self, hub):
        self.hub = hub
        self.lock = threading.RLock()
        self.clusters = {}         # cluster key -> cluster
        self.links = {}            # node address -> NodeLink

    # -- clusters ------------------------------------------------------------------------
    def add_cluster(self, cluster):
        with self.lock:
            self.clusters[cluster._key] = cluster

    def remove_cluster(self, cluster):
        """Closes the cluster's computation on every node (they run cleanup)."""
        with self.lock:
            self.clusters.pop(cluster._key, None)
            links = [link for link in self.links.values() if cluster._key in link.setups]
            for link in links:
                state = link.setups.pop(cluster._key)
                link.alloc_cpus.pop(cluster._key, None)
                if state != 'failed':
                    link.send(Msg.CLOSE_COMPUTE(cluster._key))

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, job):
        with self.lock:
            cluster = job._cluster
            if job._pin is not None:
                cluster._pinned.setdefault(job._pin, collections.deque()).append(job)
            else:
                cluster._pending.append(job)
            cluster._open_jobs += 1
            cluster._job_submitted(job)
            self._dispatch()

    def cancel(self, job, reason='Cancelled'):
        """Cancels a job: queued here → ends now; on a node → the node kills it."""
        with self.lock:
            if job.status in FINAL_STATUSES:
                return -1
            link = job._node
            if link is None:    # still queued here; skipped when popped
                self._end_job(job, DispyJob.Cancelled, exception=reason)
                return 0
            link.cancels.add((job._key, job._attempt))
            link.send(Msg.CANCEL(job._key, job._attempt))
            return 0

    def _dispatch(self):
        """Fills free job slots on ready nodes, least-loaded node first."""
        ready = [link for link in self.links.values() if link.state == 'ready']
        if not ready:
            return
        for cluster in list(self.clusters.values()):
            if not cluster._pending and not cluster._pinned:
                continue
            ckey = cluster._key
            candidates = [l for l in ready if l.setups.get(ckey) == 'ready'
                          and ckey not in l.closing]
            for link in candidates:
                pinned = cluster._pinned.get(link.ip_addr)
                while pinned and link.in_flight[ckey] < link.capacity(ckey):
                    self._send_job(link, pinned.popleft())
            if not cluster._pending:
                continue
            while cluster._pending:
                best, best_load = None, None
                for link in candidates:
                    cap = link.capacity(ckey)
                    if link.in_flight[ckey] >= cap:
                        continue
                    load = link.in_flight[ckey] / cap
                    if best is None or load < best_load:
                        best, best_load = link, load
                if best is None:
                    break
                self._send_job(best, cluster._pending.popleft())

    def _send_job(self, link, job):
        if job.status in FINAL_STATUSES:    # cancelled while queued
            return
        limit = link.conn.channel.peer_max_frame - 65536 if link.conn is not None else None
        if limit is not None and len(job._blob) > limit:
            self._end_job(job, DispyJob.Terminated, exception=(
                'arguments of %d bytes exceed node %s\'s frame limit of %d bytes '
                '(dispynode --max_frame_size)' % (len(job._blob), link.ip_addr, limit + 65536)))
            return
        job._attempt += 1
        job._node = link
        job.ip_addr = link.ip_addr
        ckey = job._cluster._key
        link.jobs[job._key] = job
        link.in_flight[ckey] += 1
        job._cluster._job_dispatched(job, link)
        link.send(Msg.JOB(job._key, ckey, job._attempt, job._blob, job._options))

    # -- node events -------------------------------------------------------------------------
    def node_ready(self, link, info):
        """A node answered (first time, or again after a dropped connection)."""
        with self.lock:
            restarted = link.instance is not None and link.instance != info.get('instance')
            held = {tuple(x) for x in info.get('jobs', ())}
            if restarted:       # running jobs died with it; kept results come again
                self._lose_jobs(link, [j for j in link.jobs.values()
                                       if (j._key, j._attempt) not in held], 'node restarted')
                link.setups.clear()
                link.alloc_cpus.clear()
            else:   # jobs and computations the node no longer has are lost
                lost = [j for j in link.jobs.values() if (j._key, j._attempt) not in held]
                self._lose_jobs(link, lost, 'node lost the job')
                for key, attempt in held:       # attempts superseded while it was away,
                    job = link.jobs.get(key)      # or cancelled while we were cut off
                    if job is None or job._attempt != attempt or (key, attempt) in link.cancels:
                        link.send(Msg.CANCEL(key, attempt))
                kept = set(info.get('computations', ()))
                for ckey in [k for k in link.setups if k not in kept]:
                    del link.setups[ckey]
                    link.alloc_cpus.pop(ckey, None)
                for ckey, state in link.setups.items():   # a SETUP reply may have been lost
                    if state == 'pending':
                        link.send(Msg.COMPUTE(ckey, None))
            link.instance = info.get('instance')
            link.name = info.get('name', '')
            link.cpus = int(info.get('cpus', 1))
            link.platform = info.get('platform', '')
            link.avail_info = _avail_info(info.get('avail'))
            link.state = 'ready'
            link.retry = 0
            for cluster in list(self.clusters.values()):
                if cluster._key not in link.setups:
                    self._setup_on(link, cluster)
            self._dispatch()

    def _setup_on(self, link, cluster):
        """Sends the cluster's computation to a node its ``nodes`` list selects."""
        for alloc in cluster._allocs:
            if alloc.matches(link.ip_addr, link.name):
                break
        else:
            return
        try:
            cpus = alloc.allocate(cluster, link.ip_addr, link.name, link.cpus,
                                  link.avail_info, link.platform)
        except Exception:
            logger.exception('allocate() of %r failed for node %s', alloc, link.ip_addr)
            cpus = 0
        cpus = min(int(cpus or 0), link.cpus)
        if cpus <= 0:
            return
        link.setups[cluster._key] = 'pending'
        link.alloc_cpus[cluster._key] = cpus
        try:
            spec, files = cluster._package.for_node(alloc)
        except (ComputationError, OSError) as exc:
            logger.error('cannot set up %s on node %s: %s', cluster._package.name,
                         link.ip_addr, exc)
            link.setups[cluster._key] = 'failed'
            return
        spec.update(key=cluster._key, cpus=cpus)
        threading.Thread(target=self._send_computation, args=(link, cluster, spec, files),
                         daemon=True, name='dispy-setup-%s' % link.ip_addr).start()

    def _send_computation(self, link, cluster, spec, files):
        """Sends the spec, then streams the files (a thread: files may be big); the
        node runs setup once the last file has arrived."""
        link.send(Msg.COMPUTE(cluster._key, spec))
        try:
            for name, path in files:
                send_file_chunks(link.send, Msg.FILE, cluster._key, name, path)
        except OSError as exc:
            logger.error('cannot send %s to node %s: %s', exc.filename, link.ip_addr, exc)
            with self.lock:
                link.setups[cluster._key] = 'failed'

    def on_node_messages(self, link, conn, msgs):
        with self.lock:
            if conn is not link.conn:
                return      # a connection we already replaced
            for msg in msgs:
                kind = TO_CLIENT.get(msg[0]) if isinstance(msg, tuple) and msg else None
                if kind is None:
                    logger.warning('node %s sent an unknown message', link.ip_addr)
                    continue
                self.handlers[kind.name](self, link, kind.read(msg))
            self._dispatch()

    def _on_node_info(self, link, msg):
        self.hub.on_node_info(link, msg.info)

    def _on_busy(self, link, msg):
        self.hub.on_node_busy(link, msg.serving)

    def _on_setup(self, link, msg):
        ckey, ok, error = msg
        cluster = self.clusters.get(ckey)
        if cluster is None or link.setups.get(ckey) not in ('pending', 'ready'):
            return
        if not ok and link.setups[ckey] == 'ready':   # its host died: no more jobs there
            link.setups[ckey] = 'failed'
            logger.warning('computation %s failed on node %s: %s', cluster._package.name,
                           link.ip_addr, error)
            cluster._node_changed(link, DispyNode.Closed)
            return
        if link.setups[ckey] == 'ready':
            return
        if not ok:
            link.setups[ckey] = 'failed'
            logger.warning('setup of computation %s failed on node %s: %s',
                           cluster._package.name, link.ip_addr, error)
            return
        link.setups[ckey] = 'ready'
        cluster._node_changed(link, DispyNode.Initialized)

    def _on_started(self, link, msg):
        key, attempt, start_time = msg
        job = link.jobs.get(key)
        if job is None or job._attempt != attempt or job.status in FINAL_STATUSES:
            return
        job.status = DispyJob.Running
        job.start_time = start_time
        job._cluster._job_changed(job, DispyJob.Running)

    def _on_result(self, link, msg):
        key, attempt, status, blob, stdout, stderr, exception, start, end = msg
        job = link.jobs.get(key)
        if job is None or job._attempt != attempt:
            link.send(Msg.ACK(key, attempt))
            return      # a stale attempt (the job was resubmitted): already accounted for
        del link.jobs[key]
        link.cancels.discard((key, attempt))
        ckey = job._cluster._key
        link.in_flight[ckey] -= 1
        result = None
        if blob is not None:
            try:
                result = pickle.loads(blob)
            except Exception as exc:
                status = DispyJob.Terminated
                exception = 'result could not be unpickled at the client: %r' % exc
        job.start_time = start or job.start_time
        # Ended (and so written to the recover file) before the node may drop the result.
        self._end_job(job, status, result, stdout, stderr, exception, end)
        link.send(Msg.ACK(key, attempt))

    def _on_provisional(self, link, msg):
        key, attempt, blob = msg
        job = link.jobs.get(key)
        if job is None or job._attempt != attempt or job.status in FINAL_STATUSES:
            return
        try:
            result = pickle.loads(blob)
        except Exception as exc:
            logger.warning('provisional result of job %s could not be unpickled: %r', key, exc)
            return
        job.result = result
        job.status = DispyJob.ProvisionalResult
        job._cluster._job_changed(job, DispyJob.ProvisionalResult)
        job.status = DispyJob.Running

    def _on_closed_compute(self, link, msg):
        pass        # the node confirms CLOSE_COMPUTE; nothing waits for it

    def _on_pulse(self, link, msg):
        avail = _avail_info(msg.avail)
        if avail is not None:
            link.avail_info = avail
            for ckey in link.setups:
                cluster = self.clusters.get(ckey)
                if cluster is not None and link.setups[ckey] == 'ready':
                    cluster._node_changed(link, DispyNode.AvailInfo)

    def _on_send_file(self, link, msg):
        """A file a job sent with dispy_send_file: saved under the client's working
        directory at the same relative path; never outside it."""
        key, attempt, relpath, mode, offset, data, last = msg
        job = link.jobs.get(key)
        if job is None or job._attempt != attempt:
            return
        receiver = folder_receiver(job._cluster._cwd)
        try:
            receiver.chunk(relpath, mode, offset, data, last, source=(link.ip_addr, key, attempt))
        except PathRefused:
            logger.warning('node %s: job %s sent a file with a refused path %r', link.ip_addr,
                           key, relpath)
        except (ValueError, OSError) as exc:
            logger.warning('cannot save file %s sent by job %s: %s', relpath, key, exc)

    def _on_put_file_done(self, link, msg):
        ckey, name, error = msg
        link.put_replies[(ckey, name)] = error
        self.hub.cond.notify_all()

    handlers = {'NODE': _on_node_info, 'BUSY': _on_busy, 'SETUP': _on_setup,
                'SEND_FILE': _on_send_file, 'PUT_FILE_DONE': _on_put_file_done,
                'STARTED': _on_started, 'RESULT': _on_result, 'PROVISIONAL': _on_provisional,
                'CLOSED': _on_closed_compute, 'PULSE': _on_pulse}

    def _end_job(self, job, status, result=None, stdout=None, stderr=None, exception=None,
                 end_time=None):
        """The one place where a job ends (exactly once)."""
        if job.status in FINAL_STATUSES:
            return
        job.status = status
        job.result = result
        job.stdout, job.stderr, job.exception = stdout, stderr, exception
        job.end_time = end_time or time.time()
        job._blob = None            # finished jobs hold no reference to their arguments
        job._options = None
        link, job._node = job._node, None
        if link is not None and link.jobs.get(job._key) is job:
            del link.jobs[job._key]
            link.in_flight[job._cluster._key] -= 1
        job._cluster._job_ended(job, link)
        if link is not None and job._cluster._key in link.closing:
            self.finish_close_node(link, job._cluster)

    # -- per-node control (cluster methods) ------------------------------------------------------
    def close_node(self, link, cluster, terminate, resetup=False):
        """Stops sending the cluster's jobs to a node; once none is in flight there the
        node closes the computation (and sets it up again if ``resetup``)."""
        ckey = cluster._key
        if ckey not in link.setups:
            return -1
        link.closing[ckey] = resetup
        link.alloc_cpus[ckey] = 0 if not resetup else link.alloc_cpus.get(ckey, 0)
        if terminate:
            for job in [j for j in link.jobs.values() if j._cluster is cluster]:
                link.send(Msg.CANCEL(job._key, job._attempt))
        self.finish_close_node(link, cluster)
        return 0

    def finish_close_node(self, link, cluster):
        ckey = cluster._key
        if link.in_flight[ckey] > 0 or ckey not in link.closing:
            return
        resetup = link.closing.pop(ckey)
        state = link.setups.pop(ckey, None)
        link.alloc_cpus.pop(ckey, None)
        if state != 'failed':
            link.send(Msg.CLOSE_COMPUTE(ckey))
        if state == 'ready' and not resetup:
            cluster._node_changed(link, DispyNode.Closed)
        if resetup and link.state == 'ready':
            self._setup_on(link, cluster)

    # -- node loss -----------------------------------------------------------------------------
    def node_lost(self, link, reason):
        """The node is gone for good: its jobs are resubmitted or cancelled."""
        with self.lock:
            link.state = 'dead'
            link.lost_reason = reason
            self._lose_jobs(link, list(link.jobs.values()), reason)
            for ckey, state in list(link.setups.items()):
                cluster = self.clusters.get(ckey)
                if cluster is not None and state == 'ready':
                    cluster._node_changed(link, DispyNode.Closed)
            link.setups.clear()
            link.alloc_cpus.clear()
            link.in_flight.clear()
            link.instance = None
            self._dispatch()

    def _lose_jobs(self, link, jobs, reason):
        for job in sorted(jobs):
            if link.jobs.get(job._key) is job:
                del link.jobs[job._key]
                link.in_flight[job._cluster._key] -= 1
            job._node = None
            cluster = job._cluster
            if cluster._reentrant and job._pin is None and job.status not in FINAL_STATUSES:
                logger.info('job %s: node %s lost (%s); resubmitting', job._key, link.ip_addr,
                            reason)
                job.status = DispyJob.Created
                job.ip_addr = None
                cluster._pending.appendleft(job)
                cluster._job_changed(job, DispyJob.Created)
            else:
                self._end_job(job, DispyJob.Cancelled,
                              exception='Cancelled: node %s lost (%s)' % (link.ip_addr, reason))


def _avail_info(data):
    if not data:
        return None
    try:
        return DispyNodeAvailInfo(*data)
    except TypeError:
        return None


def send_file_chunks(send, kind, ckey, name, path, chunk=1 << 20):
    """Sends a file as ``kind(ckey, name, mode, offset, data, last)`` messages."""
    mode = os.stat(path).st_mode & 0o777
    with open(path, 'rb') as f:
        offset = 0
        while True:
            data = f.read(chunk)
            last = len(data) < chunk
            send(kind(ckey, name, mode, offset, data, last))
            offset += len(data)
            if last:
                return offset


# ================================================================================
# Client hub: one per process — port, discovery, connections, scheduler
# ================================================================================

class ClientHub:
    """Everything a client process shares among its clusters.

    The hub loop thread owns the UDP socket(s) (a ``selectors`` loop) and the timers:
    discovery pings (broadcast on the interfaces in use when a cluster's ``nodes`` has a
    pattern, unicast to every named host), dials of named hosts until they answer,
    reconnects with backoff, pulses and liveness, and the "no node answered" warning.
    Dials (TCP connect + handshake) run in short-lived threads.
    """

    _current = None
    _current_lock = threading.Lock()

    @classmethod
    def acquire(cls, options):
        """The process's hub, created on first use; later clusters must agree with it."""
        with cls._current_lock:
            hub = cls._current
            if hub is not None and not hub.closed:
                for name in ('ip_addrs', 'port', 'secret', 'certfile'):
                    if options[name] != hub.options[name] and options.get('explicit_' + name):
                        raise ValueError('all clusters of one program share one client: %s=%r '
                                         'differs from %r' % (name, options[name],
                                                              hub.options[name]))
                hub.pulse_interval = min(hub.pulse_interval, options['pulse_interval'])
                return hub
            hub = cls._current = ClientHub(options)
            return hub

    def __init__(self, options):
        self.options = options
        self.secret = options['secret']
        self.client_id = uuid.uuid4().hex
        self.scheduler = Scheduler(self)
        self.lock = self.scheduler.lock
        self.cond = threading.Condition(self.lock)     # every cluster waits on this
        self.notifier = None
        self.links = self.scheduler.links
        self.ssl_context = make_ssl_context(False, options['certfile'], options['keyfile'],
                                            options.get('cafile'))
        self.max_frame = options['max_frame']
        self.pulse_interval = options['pulse_interval']
        self.ping_interval = options['ping_interval']
        self.clusters = []
        self.targets = {}          # (address, port) named in some cluster's nodes
        self.broadcast = False     # some cluster has a pattern: ping by broadcast
        self.auth_failures = set()
        self.refused = set()        # nodes that failed the handshake (warned once)
        self.closed = False
        self.started = time.monotonic()
        self.next_ping = 0.0
        self.ping_backoff = 1.0
        self.next_warning = self.started + NO_NODE_WARN_AFTER
        self.selector = selectors.DefaultSelector()
        self.udp_socks = self._bind_udp(options['ip_addrs'], options['port'])
        self.port = self.udp_socks[0].getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        for sock in self.udp_socks:
            self.selector.register(sock, selectors.EVENT_READ, sock)
        self.thread = threading.Thread(target=self._loop, daemon=True, name='dispy-hub')
        self.thread.start()

    def _bind_udp(self, ip_addrs, port):
        socks = []
        for addr in ip_addrs or ['']:
            family = node_address_family(addr) if addr else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.bind(sockaddr(addr, port))
            except OSError as exc:
                sock.close()
                for s in socks:
                    s.close()
                if exc.errno == errno.EADDRINUSE:
                    raise OSError(exc.errno, 'dispy client port %s on %s is in use (another '
                                  'dispy client?); give JobCluster a different port, or '
                                  'port=0 for any free port' % (port, addr or '*'))
                raise OSError(exc.errno, 'cannot bind dispy client to %s:%s: %s'
                              % (addr or '*', port, exc.strerror))
            sock.setblocking(False)
            socks.append(sock)
            port = sock.getsockname()[1]    # port=0: the others take the same one
        if not ip_addrs:        # all interfaces: IPv6 too, where the host has it
            v6 = bind_udp_any_v6(port)
            if v6 is not None:
                v6.setblocking(False)
                socks.append(v6)
        return socks

    def callback_notifier(self):
        with self.lock:
            if self.notifier is None:
                self.notifier = _Notifier(self.cond)
            return self.notifier

    # -- clusters ----------------------------------------------------------------------------
    def add_cluster(self, cluster):
        with self.lock:
            self.clusters.append(cluster)
            self.scheduler.add_cluster(cluster)
        self.add_nodes(cluster, cluster._allocs)

    def add_nodes(self, cluster, allocs):
        """More nodes for a cluster: dial the named ones, ping for patterns, and set
        the cluster up on matching nodes already connected."""
        with self.lock:
            for alloc in allocs:
                if alloc.ip_addr is None:
                    self.broadcast = True
                else:
                    self.targets[(alloc.ip_addr, alloc.port)] = True
                    link = self.links.get(alloc.ip_addr)
                    if link is None or link.state in ('new', 'dead'):
                        self._dial(alloc.ip_addr, alloc.port)
            for link in self.links.values():
                if link.state == 'ready' and cluster._key not in link.setups:
                    self.scheduler._setup_on(link, cluster)
            self.next_ping = 0.0
        self.wake()

    def remove_cluster(self, cluster):
        with self.lock:
            self.scheduler.remove_cluster(cluster)
            if cluster in self.clusters:
                self.clusters.remove(cluster)
            last = not self.clusters
        if last:
            self.shutdown()

    def shutdown(self):
        """Releases every node and stops the hub (the last cluster closed)."""
        with ClientHub._current_lock:
            if ClientHub._current is self:
                ClientHub._current = None
        with self.lock:
            if self.closed:
                return
            self.closed = True
            links = list(self.links.values())
        conns = [link.conn for link in links if link.conn is not None]
        for conn in conns:
            conn.send(Msg.RELEASE())
            conn.close('released', flush=True)
        for conn in conns:
            conn.writer.join(5.0)
        if self.notifier is not None:
            self.notifier.stop()        # after the calls already queued
        self.wake()
        self.thread.join(5.0)

    # -- dialing -------------------------------------------------------------------------------
    def _dial(self, addr, port):
        """Starts a connection to a node (lock held)."""
        link = self.links.get(addr)
        if link is None:
            link = self.links[addr] = NodeLink(self, addr, port)
        if link.state in ('connecting', 'ready') or self.closed:
            return
        link.port = port or link.port
        if link.state != 'reconnecting':
            link.state = 'connecting'
        link.dialing = True
        threading.Thread(target=self._dial_thread, args=(link,), daemon=True,
                         name='dispy-dial-%s' % addr).start()

    def _dial_thread(self, link):
        family = node_address_family(link.ip_addr)
        sock = socket.socket(family, socket.SOCK_STREAM)
        timeout = MsgTimeout
        if link.state == 'reconnecting':
            timeout = min(timeout, max(1.0, 2 * self.pulse_interval))
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr(link.ip_addr, link.port))
        except OSError as exc:
            sock.close()
            self._dial_failed(link, exc)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=False)
            channel = handshake(sock, self.secret, True, {'role': 'client'},
                                self.max_frame, timeout)
        except (OSError, ProtocolError, ValueError) as exc:
            sock.close()
            if not isinstance(exc, ProtocolError):
                # Connected, then dropped during the handshake: the usual cause is TLS on
                # one side only (or a different certificate).
                exc = ProtocolError('node closed the connection during the handshake (%s); '
                                    'is it overloaded, or does it use TLS (certfile) while '
                                    'this client does%s?'
                                    % (exc, '' if self.ssl_context else ' not'))
            self._dial_failed(link, exc)
            return
        with self.lock:
            link.dialing = False
            if self.closed:
                channel.close()
                return
            conn = link.conn = Connection(channel, link, link.ip_addr)
            link.pulse_interval = self.pulse_interval
            conn.start()
            conn.send(Msg.CLIENT({'id': self.client_id, 'name': socket.gethostname(),
                                  'pid': os.getpid(), 'udp_port': self.port,
                                  'pulse_interval': self.pulse_interval}))

    def _dial_failed(self, link, exc):
        now = time.monotonic()
        with self.lock:
            link.dialing = False
            if isinstance(exc, AuthError):
                if link.ip_addr not in self.auth_failures:
                    logger.warning('node %s:%s failed authentication: %s; check that it runs '
                                   'with the same secret', link.ip_addr, link.port, exc)
                self.auth_failures.add(link.ip_addr)
            elif isinstance(exc, ProtocolError):
                if link.ip_addr not in self.refused:
                    logger.warning('cannot use node %s:%s: %s', link.ip_addr, link.port, exc)
                self.refused.add(link.ip_addr)
            else:
                logger.debug('connecting to node %s:%s failed: %s', link.ip_addr, link.port, exc)
            if link.state == 'reconnecting':
                self._retry_reconnect(link, 'reconnect failed: %s' % exc)
            elif link.state == 'connecting':
                link.state = 'new'
                link.retry = min(link.retry + 1, 6)
                link.next_dial = now + min(2 ** link.retry * 0.25, 10.0)

    def _retry_reconnect(self, link, reason):
        link.retry += 1
        if link.retry > len(RECONNECT_DELAYS):
            logger.warning('node %s is lost: %s', link.ip_addr, link.lost_reason or reason)
            link.retry = 0
            self.scheduler.node_lost(link, link.lost_reason or reason)
            link.next_dial = time.monotonic() + 2.0
        else:
            link.next_dial = time.monotonic() + RECONNECT_DELAYS[link.retry - 1]

    # -- events from links ------------------------------------------------------------------
    def on_node_info(self, link, info):
        instance = info.get('instance')
        for other in self.links.values():
            if (other is not link and instance and other.instance == instance
                    and other.state in ('ready', 'reconnecting')):
                # The same node under a second address (two names, IPv4 and IPv6):
                # keep the first; never dial this one again.
                logger.info('node %s is %s under another address; using %s', link.ip_addr,
                            other.ip_addr, other.ip_addr)
                link.state = 'alias'
                link.conn.close('same node as %s' % other.ip_addr)
                return
        if link.state == 'reconnecting':
            logger.info('reconnected to node %s', link.ip_addr)
        link.busy_warned = False
        self.auth_failures.discard(link.ip_addr)
        self.refused.discard(link.ip_addr)
        self.scheduler.node_ready(link, info)

    def on_node_busy(self, link, desc):
        link.busy_with = desc
        if not link.busy_warned:
            logger.warning('node %s is busy with another client: %s; it will be used as soon '
                           'as it is free', link.ip_addr, desc)
            link.busy_warned = True
        link.state = 'busy'
        link.next_dial = time.monotonic() + 2.0
        if link.jobs:       # it restarted and another client took it: our jobs are gone
            self.scheduler.node_lost(link, 'node serves another client now')
            link.state = 'busy'

    def on_link_closed(self, link, conn, reason):
        with self.lock:
            if conn is not link.conn:
                return
            link.conn = None
            if self.closed:
                link.state = 'dead'
                return
            if link.state in ('busy', 'alias'):
                return
            if link.silent:
                # Silent for 5 pulses already: dead now; it is dialed again later and
                # used again if it comes back.
                link.silent = False
                logger.warning('node %s is lost: %s', link.ip_addr, reason)
                self.scheduler.node_lost(link, reason)
                link.next_dial = time.monotonic() + self.pulse_interval
            elif link.state == 'ready' or link.jobs:
                logger.warning('connection to node %s lost (%s); reconnecting', link.ip_addr,
                               reason)
                link.state = 'reconnecting'
                link.lost_reason = reason
                link.retry = 0
                self._retry_reconnect(link, reason)
            else:
                link.state = 'new'
                link.next_dial = time.monotonic() + 1.0
        self.wake()

    # -- the loop ----------------------------------------------------------------------------
    def wake(self):
        try:
            self._wake_w.send(b'x')
        except OSError:
            pass

    def _loop(self):
        try:
            while not self.closed:
                for key, _events in self.selector.select(0.1):
                    if key.data is None:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        self._read_datagrams(key.data)
                self._tick()
        except Exception:
            logger.exception('dispy hub loop failed')
        finally:
            for sock in self.udp_socks + [self._wake_r, self._wake_w]:
                sock.close()
            self.selector.close()

    def _read_datagrams(self, sock):
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(MAX_HANDSHAKE_MSG + 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            msg, good = unpack_datagram(self.secret, data)
            if msg is None:
                continue
            if not good:
                if (msg.get('t') == 'nak' and addr[0] not in self.auth_failures
                        and len(self.auth_failures) < 1024):
                    logger.warning('node %s answered but failed authentication: check that '
                                   'it runs with the same secret', addr[0])
                    self.auth_failures.add(addr[0])
                continue
            if msg.get('t') in ('pong', 'announce'):
                self._found_node(msg, addr)

    def _found_node(self, msg, addr):
        ip = msg.get('ip') or _address_with_scope(addr)
        try:
            port = int(msg.get('port') or NODE_PORT)
        except (TypeError, ValueError):
            return
        name = str(msg.get('name', ''))
        instance = msg.get('instance')
        with self.lock:
            if not any(alloc.matches(ip, name) for cluster in self.clusters
                       for alloc in cluster._allocs):
                return
            # One node answers on each of its addresses (IPv4, IPv6 link-local, ...):
            # use the first address that reached it.
            if instance and any(l.ip_addr != ip and l.seen_instance == instance
                                and l.state not in ('new', 'dead')
                                for l in self.links.values()):
                return
            link = self.links.get(ip)
            if link is not None and link.state in ('connecting', 'ready', 'reconnecting'):
                return
            if link is not None and link.state == 'busy' and msg.get('busy'):
                return
            self._dial(ip, port)
            self.links[ip].seen_instance = instance

    def _tick(self):
        now = time.monotonic()
        deferred = []
        with self.lock:
            if self.closed:
                return
            for cluster in self.clusters:
                if cluster._recover is not None:
                    deferred += cluster._recover.tick(now)
            self._tick_nodes(now)
        for recover, job, blob in deferred:     # big arguments: written outside the lock
            recover.write_args(job, blob)

    def _tick_nodes(self, now):
        if now >= self.next_ping:
            self._ping(now)
        for link in list(self.links.values()):
            self._tick_link(link, now)
        if now >= self.next_warning:
            self._warn_no_nodes(now)

    def _tick_link(self, link, now):
        if link.state == 'ready' and link.conn is not None:
            if link.conn.idle_send >= self.pulse_interval:
                link.send(Msg.PULSE(time.time()))
            silent = time.monotonic() - link.conn.last_recv
            # the node pulses at the interval it was told when it connected
            if silent > DEAD_PULSES * max(self.pulse_interval, link.pulse_interval or 0):
                link.silent = True
                link.conn.close('no message from node for %.1f s' % silent)
        elif link.dialing:
            return
        elif link.state == 'reconnecting' and now >= link.next_dial:
            self._dial(link.ip_addr, link.port)
        elif link.state in ('new', 'busy', 'dead') and now >= link.next_dial and (
                (link.ip_addr, link.port) in self.targets or link.state == 'busy'):
            self._dial(link.ip_addr, link.port)

    def _ping(self, now):
        ready = any(link.state == 'ready' for link in self.links.values())
        if self.ping_interval:
            self.next_ping = now + self.ping_interval
        else:   # no interval given: ping again (backing off) only while nothing answers
            self.next_ping = now + (self.ping_backoff if not ready else 3600)
            self.ping_backoff = min(self.ping_backoff * 2, 30.0)
        data = pack_datagram(self.secret, Datagram.ping(self.client_id, self.port))
        dests = list(self.targets)
        if self.broadcast:
            ip_addrs = self.options['ip_addrs']
            dests += [(bcast, self._node_port())
                      for bcast in broadcast_addresses(ip_addrs or None)]
            if any(':' in a and not is_loopback(a) for a in ip_addrs or ['::']):
                dests += multicast_destinations(self._node_port())
        for dest in dests:
            for sock in self.udp_socks:
                if sock.family != node_address_family(dest[0]):
                    continue
                try:
                    sock.sendto(data, dest)
                except OSError as exc:
                    logger.debug('ping to %s:%s failed: %s', dest[0], dest[1], exc)
                break

    def _node_port(self):
        return self.options['node_port']

    def _warn_no_nodes(self, now):
        self.next_warning = now + max(NO_NODE_WARN_AFTER, (now - self.started))
        if any(link.state == 'ready' for link in self.links.values()) or not self.clusters:
            return
        busy = [l for l in self.links.values() if l.state == 'busy']
        if busy:    # the cause is known: say that first
            msg = ('waiting %.0f s for %d node(s) busy with another client: %s; each is used '
                   'as soon as it is free' % (now - self.started, len(busy), '; '.join(
                       '%s serves %s' % (l.ip_addr, l.busy_with) for l in busy)))
        else:
            where = ', '.join('%s:%s' % t for t in self.targets) or 'broadcast'
            msg = ('no dispy node has answered after %.0f s (looked for: %s). Check that '
                   'dispynode.py runs on the nodes, that the ports (client %s, node %s) are '
                   'open and that ip_addr/nodes are right'
                   % (now - self.started, where, self.port, self._node_port()))
        if self.auth_failures:
            msg += ('; %d node(s) answered but failed authentication (secret mismatch?): %s'
                    % (len(self.auth_failures), ', '.join(sorted(self.auth_failures))))
        logger.warning(msg)


# ================================================================================
# Client crash recovery: the recover file and recover_jobs()
# ================================================================================

RECOVER_MAGIC = b'dispy recover file 2\n'
RECOVER_INLINE = 64 << 10     # arguments up to this size are written by submit() itself
RECOVER_DEFER = 0.5           # bigger ones: written once the job has been open this long


def _plain_id(value, depth=0):
    """Whether a job id survives the recover file as it is (str, int, float, tuples)."""
    if isinstance(value, (str, int, float)):
        return True
    return (isinstance(value, tuple) and depth < 8
            and all(_plain_id(v, depth + 1) for v in value))


def _id_text(value):
    return repr(value).encode('utf-8') if _plain_id(value) else b''


class RecoverLog:
    """One cluster's recover file: what ``recover_jobs`` needs after a crash.

    Created at the cluster's first ``submit`` (mode 0600: it holds the secret) and
    removed when the cluster closes cleanly.  After a magic line, records
    ``length(4) | kind(1) | payload``:

        H  JSON {client, secret, certfile, keyfile, cafile, created, cluster}
        N  JSON [address, port]   a node, written before the first job goes to it
        S  key(8) time(8) id_len(4) size(8) | id | args
                                  a submitted job, written by submit() itself; its
                                  pickled arguments inline when small
        D  key(8) | address       the job was sent to that node
        A  key(8) | args          the arguments of a big job, written by the hub tick
                                  once the job has been open RECOVER_DEFER seconds
        I  key(8) | id            ``job.id`` set after submit (hub tick, and at exit)
        E  key(8)                 a job ended, written before its result is
                                  acknowledged to the node
        0                         (kind 0, length N) a record not written to the end:
                                  skipped; length 0 too: the end

    The file is mapped in memory (``mmap``; its blocks allocated ahead, so a full disk
    is an error here, not a crash), so a record costs a memory copy and no system
    call: a write would release the GIL in the middle of ``submit`` and hand it to a
    busy thread for up to a switch interval (measured: 6% of W3).  The pages are the
    file's own, so a record is in the file the moment it is copied, whatever kills the
    process after.  The length is written when the room is reserved and the kind byte
    last, so an interrupted record reads as one to skip.  Big arguments are written
    with ``pwritev`` (outside every lock) into room reserved for them.
    """

    CHUNK = 1 << 20
    ARGS_PER_TICK = 32 << 20   # big arguments written per hub tick, at most

    def __init__(self, path, header):
        self.path = path
        self.nodes = set()
        self.recent = []           # (job, id text in the file) submitted since the last
        self.older = []            # tick, and in the tick before (an id set a bit late)
        self.deferred = []         # (job, submit time) whose big arguments are not written
        self.lock = threading.Lock()     # the end offset; submit() runs in user threads
        self.map = None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._map(self.CHUNK)
        except (OSError, ValueError, SystemError):
            os.close(self.fd)
            os.unlink(path)
            raise
        self.map[:len(RECOVER_MAGIC)] = RECOVER_MAGIC
        self.end = len(RECOVER_MAGIC)
        self._append(b'H', json.dumps(header).encode())

    @classmethod
    def create(cls, path, header):
        if path is None:
            stamp = time.strftime('%Y%m%d%H%M%S')
            path = '_dispy_' + stamp
            for n in range(1, 1000):
                if not os.path.exists(path):
                    break
                path = '_dispy_%s_%d' % (stamp, n)
        try:
            return cls(os.path.abspath(path), header)
        except (OSError, ValueError, SystemError) as exc:
            logger.warning('cannot create recover file %s (%s): jobs of this cluster cannot '
                           'be recovered after a crash', path, exc)
            return None

    def _map(self, size):
        """(Re)maps the file at ``size`` bytes, its new blocks allocated (lock held)."""
        old = len(self.map) if self.map is not None else 0
        try:
            os.posix_fallocate(self.fd, old, size - old)
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise               # ENOSPC and the like: recording stops, cleanly
            os.ftruncate(self.fd, size)     # no fallocate here: a sparse file
        if self.map is not None:
            self.map.close()
        self.map = mmap.mmap(self.fd, size)

    def _reserve(self, size):
        """Room for a record of ``size`` payload bytes, its length written and its kind
        still 0; returns its offset (lock held)."""
        start = self.end
        if start + 5 + size + 5 > len(self.map):     # keep a 0 0 end mark after it
            self._map(max(2 * len(self.map), start + size + self.CHUNK))
        self.map[start:start + 5] = struct.pack('!I', size) + b'\0'
        self.end = start + 5 + size
        return start

    def _append(self, kind, *parts):
        with self.lock:
            if self.fd is None:
                return
            try:
                data = b''.join(parts) if len(parts) > 1 else parts[0]
                start = self._reserve(len(data))
                self.map[start + 5:start + 5 + len(data)] = data
                self.map[start + 4:start + 5] = kind
            except (OSError, ValueError, SystemError, struct.error) as exc:
                self._failed(exc)

    def _failed(self, exc):
        """Recording is impossible (disk full, ...): say so once and stop (lock held)."""
        logger.warning('recover file %s: %s; no more jobs of this cluster are recorded',
                       self.path, exc)
        self._close_locked(remove=False)

    # -- events (scheduler lock held) --------------------------------------------------
    def submitted(self, job):
        blob = job._blob
        id_text = _custom_id(job)
        inline = len(blob) <= RECOVER_INLINE
        self._append(b'S', struct.pack('!QdIQ', job._key, job.submit_time, len(id_text),
                                       len(blob)), id_text, blob if inline else b'')
        self.recent.append((job, id_text))
        if not inline:
            self.deferred.append((job, time.monotonic()))

    def dispatched(self, job, link):
        if link.ip_addr not in self.nodes:
            self.nodes.add(link.ip_addr)
            self._append(b'N', json.dumps([link.ip_addr, link.port]).encode())
        self._append(b'D', struct.pack('!Q', job._key), link.ip_addr.encode())

    def ended(self, job):
        self._append(b'E', struct.pack('!Q', job._key))

    def write_ids(self, jobs):
        """I records for ``(job, id text in the file)`` whose id has changed; returns
        the pairs with the text now in the file."""
        now_written = []
        for job, written in jobs:
            id_text = _custom_id(job)
            if id_text and id_text != written and job.status not in FINAL_STATUSES:
                self._append(b'I', struct.pack('!Q', job._key), id_text)
                written = id_text
            now_written.append((job, written))
        return now_written

    def tick(self, now):
        """Writes ids set since submit; returns [(self, job, blob)] of big arguments
        now due (at most ARGS_PER_TICK bytes), for the caller to write outside locks."""
        self.write_ids(self.older)
        self.older, self.recent = self.write_ids(self.recent), []
        due, keep, budget = [], [], self.ARGS_PER_TICK
        for job, since in self.deferred:
            if job._blob is None or job.status in FINAL_STATUSES:
                continue
            if now - since >= RECOVER_DEFER and budget > 0:
                due.append((self, job, job._blob))
                budget -= len(job._blob)
            else:
                keep.append((job, since))
        self.deferred = keep
        return due

    def write_args(self, job, blob):
        """An A record for a big blob, copied by the kernel outside every lock."""
        head = struct.pack('!Q', job._key)
        with self.lock:
            if self.fd is None:
                return
            try:
                start = self._reserve(len(head) + len(blob))
                fd = os.dup(self.fd)        # a close() meanwhile cannot reuse its number
            except (OSError, ValueError, SystemError, struct.error) as exc:
                self._failed(exc)
                return
        try:
            parts, at = [memoryview(head), memoryview(blob).cast('B')], start + 5
            while parts:        # a write may be short (over 2 GiB, a signal)
                if hasattr(os, 'pwritev'):
                    written = os.pwritev(fd, parts, at)
                else:
                    written = os.pwrite(fd, parts[0], at)
                at += written
                while parts and written >= len(parts[0]):
                    written -= len(parts.pop(0))
                if parts and written:
                    parts[0] = parts[0][written:]
        except OSError as exc:
            logger.warning('recover file %s: arguments of job %s not saved: %s', self.path,
                           job.id, exc)
            return
        finally:
            os.close(fd)
        with self.lock:
            if self.fd is not None:
                self.map[start + 4:start + 5] = b'A'

    def close(self, remove):
        with self.lock:
            self._close_locked(remove)
            if remove:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    def _close_locked(self, remove):
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            self.map.close()
            if not remove:
                os.ftruncate(fd, self.end)
        except (OSError, ValueError, SystemError):
            pass
        finally:
            os.close(fd)


def _custom_id(job):
    """The id the program gave a job, as text for the recover file (b'' if it kept
    the automatic number or its id is not a plain value)."""
    if type(job.id) is int and job.id == job._key:
        return b''
    return _id_text(job.id)


class _RecoverFile:
    """A recover file as read back: header, nodes and every job not ended."""

    def __init__(self, path, with_args=True):
        self.path = path
        self.header, self.nodes, self.jobs, self.ended = None, {}, {}, set()
        self.end = None            # where the records end (the next one would go)
        with open(path, 'rb') as f:
            if f.read(len(RECOVER_MAGIC)) != RECOVER_MAGIC:
                raise ValueError('%s is not a dispy recover file' % path)
            while self._read_record(f, with_args):
                pass
        if not isinstance(self.header, dict) or 'client' not in self.header:
            raise ValueError('%s is not a dispy recover file (no header)' % path)
        for key in self.ended:
            self.jobs.pop(key, None)

    def _read_record(self, f, with_args):
        self.end = f.tell()
        head = f.read(5)
        if len(head) < 5:
            return False
        length, kind = struct.unpack('!I', head[:4])[0], head[4:]
        if kind == b'\0' and not length:
            return False        # the end
        start = f.tell()
        want = length
        if kind == b'\0' or (not with_args and kind in (b'S', b'A')):
            want = min({b'S': 28, b'A': 8}.get(kind, 0), length)   # skip the rest
        body = f.read(want)
        if len(body) < want:
            return False        # cut short by the end of the file
        try:
            if kind != b'\0':
                self._apply(kind, body, want == length)
        except (ValueError, struct.error, KeyError, IndexError, TypeError, OverflowError,
                RecursionError, AttributeError):
            logger.warning('recover file %s: a malformed record at offset %d skipped',
                           self.path, start - 5)
        f.seek(start + length)
        return True

    def mark_ended(self, keys):
        """Appends E records for jobs a recovery accounted for, so that a later call
        (the file is kept while a node did not answer) does not list them again."""
        if not keys or self.end is None:
            return
        data = b''.join(struct.pack('!I', 8) + b'E' + struct.pack('!Q', k) for k in keys)
        try:
            with open(self.path, 'r+b') as f:
                f.seek(self.end)
                f.write(data + b'\0' * 5)
        except OSError as exc:
            logger.warning('recover file %s: %s', self.path, exc)

    def _apply(self, kind, body, whole):
        if kind == b'H':
            self.header = json.loads(body.decode())
        elif kind == b'N':
            addr, port = json.loads(body.decode())
            self.nodes[addr] = int(port)
        elif kind == b'S':
            key, submitted, id_len, size = struct.unpack('!QdIQ', body[:28])
            id_text = body[28:28 + id_len]
            blob = body[28 + id_len:] if whole and len(body) > 28 + id_len else None
            self.jobs[key] = {'id': _parse_id(id_text, key), 'time': submitted, 'size': size,
                              'blob': blob, 'node': None}
        elif kind in (b'A', b'I', b'D'):
            key = struct.unpack('!Q', body[:8])[0]
            job = self.jobs.get(key)
            if job is None:
                return
            if kind == b'A':
                job['blob'] = body[8:] if whole else None
            elif kind == b'I':
                job['id'] = _parse_id(body[8:], key)
            else:
                job['node'] = body[8:].decode()
        elif kind == b'E':
            self.ended.add(struct.unpack('!Q', body)[0])


def _parse_id(text, key):
    if not text:
        return key
    try:
        value = ast.literal_eval(text.decode('utf-8'))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
        return key
    return value if _plain_id(value) else key


def _newest_recover_file():
    """The newest ``_dispy_*`` file here that still has jobs to account for."""
    names = [f for f in os.listdir('.') if f.startswith('_dispy_') and os.path.isfile(f)]
    for name in sorted(names, key=os.path.getmtime, reverse=True):
        try:
            if _RecoverFile(name, with_args=False).jobs:
                return name
        except (OSError, ValueError, TypeError):
            continue
    raise FileNotFoundError('no _dispy_* recover file with jobs to recover in %s'
                            % os.getcwd())


class _RecoveredCluster:
    """Stands in for the cluster of a recovered job (it has already ended)."""

    @staticmethod
    def _wait_job(job, timeout):
        return True


def recover_jobs(recover_file=None, timeout=None, terminate_pending=False):
    """Accounts for every job of a cluster whose program ended without closing it.

    Reads ``recover_file`` (None: the newest ``_dispy_*`` file in the current folder
    that has jobs to account for), reconnects to its nodes as that program, waits for
    the jobs they still run (at most ``timeout`` seconds; then cancels them if
    ``terminate_pending``), collects the results they kept and returns one DispyJob per
    job the program had not got back, with the id it had.  A job that never ran (it
    never reached a node, or its node lost it) is ``DispyJob.Abandoned``, with its
    ``args`` and ``kwargs`` so that ``cluster.resubmit(jobs)`` can run it again.  A job
    sent to a node that did not answer stays ``Created`` (unknown: it may still be
    there) and the file is kept for another call; otherwise the file is removed once
    every job in it is accounted for.
    """
    setup_logging()
    path = recover_file or _newest_recover_file()
    record = _RecoverFile(path)
    header = record.header
    keys = sorted(record.jobs)
    deadline = None if timeout is None else time.monotonic() + timeout
    ctx = make_ssl_context(False, header.get('certfile'), header.get('keyfile'),
                           header.get('cafile'))
    results, answered, threads = {}, set(), []
    for addr, port in (record.nodes.items() if keys else ()):
        t = threading.Thread(target=_recover_from_node, daemon=True,
                             args=(addr, port, header, ctx, keys, deadline,
                                   terminate_pending, results, answered))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    jobs = [_recovered_job(key, record.jobs[key], results.get(key), answered)
            for key in keys]
    if all(job.status in FINAL_STATUSES for job in jobs):   # nothing left to recover
        try:
            os.unlink(path)
        except OSError:
            pass
    else:
        record.mark_ended([job._key for job in jobs if job.status in FINAL_STATUSES])
    return jobs


def _recovered_job(key, entry, reply, answered):
    job = DispyJob(key, _RecoveredCluster, None)
    job.id = entry['id']
    job.submit_time = entry['time']
    job.args = job.kwargs = None
    if entry['blob'] is not None:
        try:
            job.args, job.kwargs = pickle.loads(entry['blob'])
        except Exception as exc:
            logger.warning('recover_jobs: arguments of job %r cannot be loaded: %r', job.id, exc)
    if reply is not None:
        _fill_recovered(job, reply)
        return job
    if entry['node'] is not None and entry['node'] not in answered:
        job.ip_addr = entry['node']
        job.exception = ('unknown: node %s did not answer the recovery; the job may still '
                         'run or be kept there (the recover file is kept: call recover_jobs '
                         'again when the node is reachable)' % entry['node'])
        return job      # status Created
    job.status = DispyJob.Abandoned
    job.exception = 'Abandoned: the job never ran (no node holds it)'
    if job.args is None:
        job.exception += ('; its arguments (%d bytes) were not saved before the program '
                          'ended, so it cannot be resubmitted' % entry['size'])
    return job


def _fill_recovered(job, reply):
    addr, result = reply
    job.ip_addr = addr
    job.status = result.status
    job.stdout, job.stderr, job.exception = result.stdout, result.stderr, result.exception
    job.start_time, job.end_time = result.start_time, result.end_time
    if result.blob is not None:
        try:
            job.result = pickle.loads(result.blob)
        except Exception as exc:
            job.status = DispyJob.Terminated
            job.exception = 'result could not be unpickled: %r' % exc


def _recover_from_node(addr, port, header, ctx, keys, deadline, terminate, results,
                       answered):
    """Reconnects to one node as the vanished program and collects what it holds of
    ``keys`` (the node keeps whatever else it has); ``addr`` joins ``answered`` if the
    node told everything it holds."""
    try:
        sock = socket.create_connection((addr, port), timeout=MsgTimeout)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=False)
        channel = handshake(sock, header.get('secret', ''), True, {'role': 'client'},
                            timeout=MsgTimeout)
        channel.send([Msg.CLIENT({'id': header['client'], 'name': socket.gethostname(),
                                  'pid': os.getpid(), 'recover': keys})])
        channel.sock.settimeout(MsgTimeout)
        msgs = channel.recv()
    except (OSError, ProtocolError) as exc:
        logger.warning('recover_jobs: node %s:%s: %s', addr, port, exc)
        return
    first, msgs = msgs[0], msgs[1:]     # results may come in the same frame as NODE
    if first[0] != 'NODE':
        logger.warning('recover_jobs: node %s did not answer the recovery (%s)', addr,
                       first[1] if len(first) > 1 else '?')
        channel.close()
        return
    wanted = set(keys)
    waiting = {tuple(x) for x in first[1].get('jobs', ()) if x[0] in wanted}
    cancelled = False
    try:
        while waiting:
            now = time.monotonic()
            if deadline is not None and now >= deadline and not cancelled:
                if not terminate:
                    break
                channel.send([Msg.CANCEL(key, attempt) for key, attempt in waiting])
                cancelled = True
                deadline = now + 10     # bounded wait for the killed jobs' replies
            elif cancelled and now >= deadline:
                break
            if not msgs:
                wait = 1.0 if deadline is None else max(0.05, deadline - now)
                if not channel._rbuf and not select.select([channel.sock], [], [], wait)[0] \
                        and not (hasattr(channel.sock, 'pending') and channel.sock.pending()):
                    continue
                channel.sock.settimeout(None)      # a frame has begun: read it whole
                msgs = channel.recv()
            acks = []
            for msg in msgs:
                if msg[0] == 'RESULT' and msg[1] in wanted:
                    result = Msg.RESULT.read(msg)
                    waiting.discard((result.key, result.attempt))
                    results[result.key] = (addr, result)
                    acks.append(Msg.ACK(result.key, result.attempt))
                elif msg[0] == 'PULSE':
                    acks.append(Msg.PULSE(time.time()))
            msgs = []
            if acks:
                channel.send(acks)
        for key, attempt in waiting:        # still running: reported as such
            results.setdefault(key, (addr, Msg.RESULT.record(
                key, attempt, DispyJob.Running, None, None, None, None, None, None)))
        if not waiting or terminate:
            channel.send([Msg.RELEASE()])
        answered.add(addr)
    except (OSError, ProtocolError) as exc:
        logger.warning('recover_jobs: node %s: %s', addr, exc)
    finally:
        channel.close()


# ================================================================================
# Client API: JobCluster
# ================================================================================

class _Notifier:
    """Calls every cluster's callbacks from one thread, in order, never concurrently,
    outside every lock (one per client process, created with the first callback).

    It shares the hub's condition, and counts the calls queued per cluster, so a
    cluster's ``wait()`` can tell when every callback of its finished jobs has run.
    """

    def __init__(self, cond):
        self.cond = cond
        self.queue = collections.deque()
        self.pending = collections.Counter()     # cluster -> calls queued or running
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True, name='dispy-notifier')
        self.thread.start()

    def put(self, cluster, func, args):
        self.queue.append((cluster, func, args))
        self.pending[cluster] += 1
        self.cond.notify_all()

    def idle(self, cluster):
        return not self.pending[cluster]

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def _run(self):
        with self.cond:
            while True:
                while not self.queue and not self.stopped:
                    self.cond.wait()
                if not self.queue:
                    return
                cluster, func, args = self.queue.popleft()
                self.cond.release()
                try:
                    func(*args)
                except Exception:
                    logger.exception('callback %s raised', getattr(func, '__name__', func))
                finally:
                    self.cond.acquire()
                    self.pending[cluster] -= 1
                    if not self.pending[cluster]:
                        del self.pending[cluster]
                    self.cond.notify_all()


class JobCluster:
    """A computation (Python function or program) distributed to nodes running dispynode.

    ``submit(*args, **kwargs)`` creates a job and returns it at once; the scheduler runs
    it on the least-loaded node that has the computation set up.  See the module
    docstring for the threads involved and README.md for the options.
    """

    _keys = itertools.count(1)

    def __init__(self, computation, nodes=None, depends=[], callback=None, cluster_status=None,
                 ip_addr=None, port=None, node_port=None, ext_ip_addr=None, dest_path=None,
                 recover_file=None, loglevel=None, setup=None, cleanup=True,
                 pulse_interval=None, ping_interval=None, reentrant=False, secret=None,
                 keyfile=None, certfile=None, cafile=None, job_timeout=None,
                 max_frame_size=None, host=None, ext_host=None, job_status=None,
                 dispy_port=None, fresh_process=False):
        if loglevel is not None:
            setup_logging(loglevel)
        else:
            setup_logging(logging.WARNING if logger.level == logging.NOTSET else None)
        caller = sys._getframe(1)
        caller_globals = [caller.f_globals, getattr(sys.modules.get('__main__'), '__dict__', {})]
        if dispy_port is not None:
            port = dispy_port if port is None else port
            node_port = dispy_port + 1 if node_port is None else node_port
        ip_addrs = _as_list(ip_addr if ip_addr is not None else host)
        if not ip_addrs and os.environ.get('DISPY_IP_ADDR'):
            ip_addrs = _split_list(os.environ['DISPY_IP_ADDR'])
        ip_addrs = [self._local_address(a) for a in ip_addrs]
        node_port = int(_env_default(node_port, 'DISPY_NODE_PORT', NODE_PORT, int))
        port = int(_env_default(port, 'DISPY_PORT', CLIENT_PORT, int))
        if nodes is None:
            nodes = _split_list(os.environ['DISPY_NODES']) if os.environ.get('DISPY_NODES') \
                else ['*']
        secret = _env_default(secret, 'DISPY_SECRET', '')
        if pulse_interval is not None:
            pulse_interval = float(pulse_interval)
            if not 0 < pulse_interval <= 600:
                raise ValueError('pulse_interval must be more than 0 and at most 600 seconds '
                                 '(the documented range is 1-600)')
        self._package = ComputePackage(computation, depends, setup, cleanup, dest_path,
                                       caller_globals)
        # Strict isolation: each job in a process of its own, forked from the one that
        # ran setup (slower: ~2 ms more per job), instead of warm reused workers.
        self._package.spec['fresh_process'] = bool(fresh_process)
        self._allocs = _node_allocations(nodes, node_port)
        self._key = next(JobCluster._keys)
        self._reentrant = bool(reentrant)
        self._callback = callback or job_status
        self._status_cb = cluster_status
        self._job_timeout = job_timeout
        self._pending = collections.deque()
        self._pinned = {}
        self._open_jobs = 0
        self._nodes = {}            # address -> DispyNode, for this cluster
        self._closed = False
        self._start_time = time.time()
        self._cwd = os.getcwd()        # where files sent by jobs land
        self._recover_path = recover_file
        self._recover = None           # RecoverLog, created at the first submit
        self._main_sources = {}        # __main__ class/function -> source (job arguments)
        self.name = '%s @ %s' % (self._package.name, ip_addrs[0] if ip_addrs
                                 else socket.gethostname())
        self._hub = ClientHub.acquire({
            'ip_addrs': ip_addrs, 'explicit_ip_addrs': bool(ip_addrs), 'port': port,
            'explicit_port': port != CLIENT_PORT, 'secret': secret, 'explicit_secret': True,
            'certfile': certfile, 'explicit_certfile': bool(certfile), 'keyfile': keyfile,
            'cafile': cafile, 'node_port': node_port,
            'ext_ip_addrs': _as_list(ext_ip_addr if ext_ip_addr is not None else ext_host),
            'max_frame': int(max_frame_size or DEFAULT_MAX_FRAME),
            'pulse_interval': pulse_interval or DEFAULT_PULSE_INTERVAL,
            'ping_interval': ping_interval})
        self._cond = self._hub.cond
        self._notifier = (self._hub.callback_notifier()
                          if (self._callback or self._status_cb) else None)
        _live_clusters.add(self)
        self._hub.add_cluster(self)

    @staticmethod
    def _local_address(addr):
        resolved = resolve_host(addr)
        if resolved is None:
            raise ValueError('ip_addr %r is not a usable address or host name' % addr)
        return resolved

    # -- submitting ------------------------------------------------------------------------
    def submit(self, *args, **kwargs):
        """Schedules a job with these arguments; returns the DispyJob (None on error)."""
        return self._submit(None, None, args, kwargs)

    def submit_node(self, node, *args, **kwargs):
        """Like submit, but runs the job on ``node`` (DispyNode, address or host name)."""
        return self.submit_job_id_node(None, node, *args, **kwargs)

    def submit_job_id(self, job_id, *args, **kwargs):
        """submit, with ``job.id`` set before the job can reach a callback (4.15 API)."""
        return self._submit(job_id, None, args, kwargs)

    def submit_job_id_node(self, job_id, node, *args, **kwargs):
        """submit_node with ``job.id`` set first (4.15 API)."""
        addr = node.ip_addr if isinstance(node, DispyNode) else resolve_host(str(node))
        if addr is None:
            logger.error('submit_node: unknown node %r', node)
            return None
        return self._submit(job_id, addr, args, kwargs)

    def resubmit(self, jobs):
        """Submits again the jobs ``recover_jobs`` handed back as never run (Abandoned,
        with their arguments), with their ids; returns the new jobs."""
        return [self.submit_job_id(job.id, *job.args, **job.kwargs) for job in jobs
                if job.status == DispyJob.Abandoned and job.args is not None]

    def _submit(self, job_id, pin, args, kwargs):
        depends = kwargs.pop('dispy_job_depends', None)
        timeout = kwargs.pop('dispy_job_timeout', self._job_timeout)
        if self._closed:
            logger.error('job not created: cluster %s is closed', self._package.name)
            return None
        if self._package.kind == 'program':
            if kwargs:
                logger.error('job not created: a program takes no keyword arguments')
                return None
            args = tuple(map(str, args))
        try:
            blob, main_refs = dumps_args((args, kwargs))
        except Exception as exc:
            logger.error('job not created: its arguments cannot be pickled: %s', exc)
            return None
        if len(blob) > self._hub.max_frame - 65536:
            logger.error('job not created: its arguments take %d bytes, over the frame limit '
                         'of %d (max_frame_size)', len(blob), self._hub.max_frame)
            return None
        options = {}
        if timeout:
            options['timeout'] = float(timeout)
        if depends or main_refs:
            try:
                options['depends'] = self._job_depends(depends, main_refs)
            except (ComputationError, OSError) as exc:
                logger.error('job not created: %s', exc)
                return None
        job = DispyJob(next(_job_keys), self, blob, pin, options or None, args, kwargs)
        if job_id is not None:
            job.id = job_id
        self._hub.scheduler.submit(job)
        return job

    def _job_depends(self, depends, main_refs):
        """The job's own dependencies: ``dispy_job_depends``, plus the source of the
        classes and functions of the main script that its arguments refer to and that
        the computation did not ship (so their instances load on the node)."""
        deps = Dependencies(self._package.caller_globals)
        deps.add_all(depends)
        extra = []
        # A class needs its bases of the main script too, defined before it.
        refs = [base for ref in main_refs for base in
                (reversed(ref.__mro__) if isinstance(ref, type) else (ref,))
                if getattr(base, '__module__', None) == '__main__']
        for ref in dict.fromkeys(refs):
            if ref.__name__ in self._package.names or ref.__name__ in deps.names:
                continue
            source = self._main_sources.get(ref)
            if source is None:
                try:
                    source = _function_source(ref, 'class' if isinstance(ref, type)
                                              else 'function')
                except ComputationError as exc:
                    raise ComputationError(
                        'an argument refers to %s of the main script, which the nodes do '
                        'not have and which cannot be shipped (%s); add it to depends= of '
                        'the cluster, or define it in a module the nodes can import'
                        % (ref.__name__, exc))
                self._main_sources[ref] = source
            extra.append(source)
        bundle = deps.job_extra()
        if extra:
            bundle['code'] = '\n\n'.join(extra + [bundle['code']])
        return bundle

    def cancel(self, job):
        """Cancels a job: removed if queued, killed (with its processes) if running."""
        return self._hub.scheduler.cancel(job)

    # -- nodes ---------------------------------------------------------------------------------
    def _link(self, node):
        """The NodeLink for a DispyNode, address or host name (None if unknown)."""
        if isinstance(node, (DispyNode, NodeAllocate)):
            node = node.ip_addr if isinstance(node, DispyNode) else node.host
        addr = resolve_host(str(node)) or str(node)
        return self._hub.links.get(addr)

    def allocate_node(self, node):
        """Adds a node (host name, address, pattern or NodeAllocate) to this cluster."""
        try:
            allocs = _node_allocations(node if isinstance(node, list) else [node],
                                       self._allocs[0].port if self._allocs else NODE_PORT)
        except ValueError as exc:
            logger.error('allocate_node: %s', exc)
            return -1
        self._allocs.extend(allocs)
        self._hub.add_nodes(self, allocs)
        return 0

    def discover_nodes(self, nodes):
        """Looks for more nodes (names, addresses, patterns) for this cluster."""
        return self.allocate_node(_as_list(nodes))

    def deallocate_node(self, node):
        """Sends no more jobs of this cluster to the node (running ones finish)."""
        with self._cond:
            link = self._link(node)
            if link is None or self._key not in link.setups:
                return -1
            link.alloc_cpus[self._key] = 0
            return 0

    def close_node(self, node, terminate_pending=False):
        """Closes this cluster's computation on a node (after its jobs there end, or
        cancelling them with ``terminate_pending``)."""
        with self._cond:
            link = self._link(node)
            if link is None:
                return -1
            return self._hub.scheduler.close_node(link, self, terminate_pending)

    def resetup_node(self, node, terminate_pending=False):
        """Runs cleanup and then setup again on a node (after its running jobs end, or
        cancelling them with ``terminate_pending``)."""
        with self._cond:
            link = self._link(node)
            if link is None:
                return -1
            return self._hub.scheduler.close_node(link, self, terminate_pending, resetup=True)

    def set_node_cpus(self, node, cpus):
        """CPUs this cluster uses on a node (negative: leave that many free); returns
        the CPUs now used, or -1."""
        with self._cond:
            link = self._link(node)
            if link is None or link.setups.get(self._key) != 'ready':
                return -1
            cpus = int(cpus)
            cpus = max(0, link.cpus + cpus) if cpus < 0 else min(cpus, link.cpus)
            link.alloc_cpus[self._key] = cpus
            link.send(Msg.SET_CPUS(self._key, cpus))
            node = self._nodes.get(link.ip_addr)
            if node is not None:
                node.cpus = cpus
            self._hub.scheduler._dispatch()
            return cpus

    def node_jobs(self, node, from_node=False):
        """Jobs of this cluster running on a node."""
        with self._cond:
            link = self._link(node)
            if link is None:
                return []
            return [j for j in link.jobs.values()
                    if j._cluster is self and j.status == DispyJob.Running]

    def send_file(self, path, node, timeout=60):
        """Copies a file into the computation's folder on a node (by base name).
        Returns 0 on success, -1 otherwise."""
        link = self._link(node)
        if link is None or link.setups.get(self._key) != 'ready':
            logger.error('send_file: node %s is not set up for this cluster', node)
            return -1
        name = os.path.basename(path)
        with self._cond:
            link.put_replies.pop((self._key, name), None)
        try:
            send_file_chunks(link.send, Msg.PUT_FILE, self._key, name, path)
        except OSError as exc:
            logger.error('send_file: %s', exc)
            return -1
        with self._cond:
            if not self._cond.wait_for(lambda: (self._key, name) in link.put_replies, timeout):
                return -1
            error = link.put_replies.pop((self._key, name))
        if error:
            logger.error('send_file: node %s refused %s: %s', link.ip_addr, name, error)
            return -1
        return 0

    # -- waiting -------------------------------------------------------------------------------
    def _wait_job(self, job, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: job.status in FINAL_STATUSES, timeout)

    def wait(self, timeout=None):
        """Waits until every submitted job has ended and its callbacks have run."""
        if self._notifier is not None and threading.current_thread() is self._notifier.thread:
            raise RuntimeError('cluster.wait() cannot be called from a callback: the callback '
                               'thread would wait for itself')
        with self._cond:
            return self._cond.wait_for(self._all_done, timeout)

    def _all_done(self):
        return self._open_jobs == 0 and (self._notifier is None or self._notifier.idle(self))

    def close(self, timeout=None, terminate=False):
        """Waits for pending jobs (up to ``timeout``), then releases the nodes.

        Returns False if jobs are still pending at the timeout (the cluster stays open)
        unless ``terminate``, in which case they are cancelled and the cluster closes.
        """
        if self._closed:
            return True
        in_callback = (self._notifier is not None
                       and threading.current_thread() is self._notifier.thread)
        if terminate and timeout is None:
            timeout = 0         # terminate without a timeout: cancel now, don't wait
        if in_callback and not terminate:
            with self._cond:
                if self._open_jobs:
                    return False     # a callback cannot wait for the jobs to end
        elif not in_callback and not self.wait(timeout):
            if not terminate:
                return False
        if terminate:
            self._cancel_all()
        self._closed = True
        _live_clusters.discard(self)
        with self._cond:
            if self._recover is not None:
                self._recover.close(remove=True)    # closed cleanly: nothing to recover
        self._hub.remove_cluster(self)
        return True

    def _jobs_open(self):
        """Jobs of this cluster queued here or on nodes (lock held)."""
        jobs = [j for j in self._pending if j.status not in FINAL_STATUSES]
        for queue in self._pinned.values():
            jobs.extend(queue)
        for link in self._hub.links.values():
            jobs.extend(j for j in link.jobs.values() if j._cluster is self)
        return jobs

    def _cancel_all(self, grace=5.0):
        scheduler = self._hub.scheduler
        with self._cond:
            jobs = self._jobs_open()
            for job in jobs:
                scheduler.cancel(job, 'Cancelled: cluster closed')
            # Nodes answer with the killed jobs; one that does not answer in time
            # cannot hold close() hostage.
            self._cond.wait_for(lambda: self._open_jobs == 0, grace)
            for job in jobs:
                scheduler._end_job(job, DispyJob.Cancelled,
                                   exception='Cancelled: cluster closed')

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(terminate=exc_type is not None)
        return False

    # -- scheduler callbacks (lock held) -----------------------------------------------------
    def _dispy_node(self, link):
        node = self._nodes.get(link.ip_addr)
        if node is None:
            node = self._nodes[link.ip_addr] = DispyNode(link.ip_addr, link.name,
                                                          link.alloc_cpus.get(self._key, 0),
                                                          link.platform)
        return node

    def _job_submitted(self, job):
        if self._recover is None and self._recover_path is not False:
            hub = self._hub
            self._recover = RecoverLog.create(self._recover_path, {
                'client': hub.client_id, 'secret': hub.secret,
                'certfile': hub.options.get('certfile'), 'keyfile': hub.options.get('keyfile'),
                'cafile': hub.options.get('cafile'), 'created': time.time(),
                'cluster': self.name})
            if self._recover is None:
                self._recover_path = False      # warned once; not tried again
        if self._recover is not None:
            self._recover.submitted(job)
        if self._status_cb:
            self._job_changed(job, DispyJob.Created)

    def _job_dispatched(self, job, link):
        if self._recover is not None:
            self._recover.dispatched(job, link)

    def _job_changed(self, job, status):
        if self._notifier is None:
            return
        if self._callback and status == DispyJob.ProvisionalResult:
            self._notifier.put(self, self._callback, (job._snapshot(),))
        if self._status_cb:
            node = self._nodes.get(job.ip_addr) if job.ip_addr else None
            if node is not None and status == DispyJob.Running:
                node.busy += 1
            self._notifier.put(self, self._status_cb, (status, node, job._snapshot()))

    def _job_ended(self, job, link):
        self._open_jobs -= 1
        if self._recover is not None:
            self._recover.ended(job)
        node = self._nodes.get(link.ip_addr) if link is not None else None
        if node is not None:
            node.jobs_done += 1
            node.busy = max(0, node.busy - 1) if self._status_cb else node.busy
            if job.start_time and job.end_time:
                node.cpu_time += max(0.0, job.end_time - job.start_time)
            node.update_time = time.time()
        if self._notifier is not None:
            if self._callback:
                self._notifier.put(self, self._callback, (job,))
            if self._status_cb:
                self._notifier.put(self, self._status_cb, (job.status, node, job))
        self._cond.notify_all()

    def _node_changed(self, link, status):
        node = self._dispy_node(link)
        node.name = link.name
        node.avail_cpus = link.cpus
        node.cpus = link.alloc_cpus.get(self._key, node.cpus)
        node.avail_info = link.avail_info
        node.update_time = time.time()
        if status == DispyNode.Initialized:
            logger.debug('node %s (%s) initialized with %s CPUs for %s', link.ip_addr,
                         link.name, node.cpus, self._package.name)
        if self._status_cb:
            self._notifier.put(self, self._status_cb, (status, node, None))
        self._cond.notify_all()

    def _interrupted_text(self):
        """What the program is told when it ends with jobs of this cluster open."""
        on_nodes = sum(1 for link in self._hub.links.values() for job in link.jobs.values()
                       if job._cluster is self)
        queued = self._open_jobs - on_nodes
        text = ('cluster %s was not closed: %d job(s) keep running on nodes, %d never reached '
                'a node' % (self.name, on_nodes, queued))
        if self._recover is None:
            return text + '; they cannot be recovered (no recover file)'
        return text + ('; dispy.recover_jobs(%r) gets them back (results of the first, '
                       'arguments of the others for cluster.resubmit)'
                       % os.path.relpath(self._recover.path, self._cwd))

    # -- status ------------------------------------------------------------------------------
    def status(self):
        """Per-node figures and totals as data (what print_status shows)."""
        with self._cond:
            nodes = []
            for addr, node in sorted(self._nodes.items()):
                link = self._hub.links.get(addr)
                nodes.append({'ip_addr': addr, 'name': node.name, 'cpus': node.cpus,
                              'jobs_done': node.jobs_done, 'cpu_time': node.cpu_time,
                              'sec_per_job': node.cpu_time / node.jobs_done
                              if node.jobs_done else 0.0,
                              'bytes_sent': link.conn.channel.bytes_sent
                              if link is not None and link.conn else 0,
                              'bytes_received': link.conn.channel.bytes_received
                              if link is not None and link.conn else 0})
            total = sum(n['cpu_time'] for n in nodes)
            wall = time.time() - self._start_time
            return {'nodes': nodes, 'total_job_time': total, 'wall_time': wall,
                    'speedup': total / wall if wall > 0 else 0.0,
                    'pending_jobs': self._open_jobs}

    def print_status(self, wall_time=None):
        """Prints, per node, CPUs, jobs done, seconds per job and node time; then totals."""
        status = self.status()
        print('\n%30s | %5s | %8s | %10s | %13s | %9s | %9s' % (
            'Node', 'CPUs', 'Jobs', 'Sec/Job', 'Node Time Sec', 'Sent', 'Rcvd'))
        print('-' * 104)
        for n in status['nodes']:
            label = n['ip_addr'] + (' (%s)' % n['name'] if n['name'] else '')
            print('%-30.30s | %5s | %8s | %10.3f | %13.3f | %9s | %9s' % (
                label, n['cpus'], n['jobs_done'], n['sec_per_job'], n['cpu_time'],
                _human_bytes(n['bytes_sent']), _human_bytes(n['bytes_received'])))
        wall = wall_time if wall_time is not None else status['wall_time']
        print('\nTotal job time: %.3f sec, wall time: %.3f sec, speedup: %.3f\n'
              % (status['total_job_time'], wall,
                 status['total_job_time'] / wall if wall > 0 else 0.0))

    stats = print_status     # the older name


def _human_bytes(n):
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return ('%d %s' if unit == 'B' else '%.1f %s') % (n, unit)
        n /= 1024.0


_job_keys = itertools.count(1)
_live_clusters = set()


def _at_exit():
    """A script that ends without close(): idle clusters are closed cleanly; clusters
    with jobs still open leave them on the nodes, where they finish and keep their
    results, and say how to get everything back (see the recovery docs)."""
    for cluster in list(_live_clusters):
        try:
            with cluster._cond:
                idle = cluster._open_jobs == 0
                if not idle:
                    logger.warning(cluster._interrupted_text())
                    if cluster._recover is not None:     # ids set since the last tick
                        cluster._recover.write_ids([(job, None)
                                                    for job in cluster._jobs_open()])
            if idle:
                cluster.close(timeout=5)
        except Exception:
            pass


atexit.register(_at_exit)


# ================================================================================
# Command line: distribute a program, one job per -a
# ================================================================================

def build_parser():
    parser = argparse.ArgumentParser(
        prog='dispy.py',
        description='Run a program on dispy nodes: the program and its files (-f) are sent '
                    'to the nodes and run once per -a, in parallel; each job\'s node, exit '
                    'status, stdout and stderr are printed.',
        epilog='Example: dispy.py -f /some/file1 -f file2 -a "arg11 arg12" -a "arg21 arg22" '
               '-a "arg3" /some/program.  Exits non-zero if any job failed.  The DISPY_* '
               'environment variables (see README) give defaults for nodes, addresses, '
               'ports and secret.')
    parser.add_argument('program', help='the program to run (a .py file runs with the '
                        'node\'s Python; any other file runs as it is)')
    parser.add_argument('-f', '--file', dest='files', action='append', default=[],
                        help='a file the program needs, copied next to it (repeatable)')
    parser.add_argument('-a', '--args', dest='jobs', action='append', default=[],
                        help='arguments of one job, split like a shell command line '
                        '(repeatable: one job each; none: one job without arguments)')
    parser.add_argument('-n', '--nodes', action='append', default=[],
                        help='node name, address or pattern such as 192.168.1.* (repeatable; '
                        'default: every node that answers a broadcast)')
    parser.add_argument('-i', '--ip_addr', '--host', dest='ip_addr', action='append',
                        default=[], help='client address to use (repeatable)')
    parser.add_argument('--ext_ip_addr', '--ext_host', dest='ext_ip_addr', action='append',
                        default=[], help='address nodes should reach this client at (NAT)')
    parser.add_argument('-p', '--port', type=int, default=None,
                        help='client port (default %d; 0 = any free port)' % CLIENT_PORT)
    parser.add_argument('--node_port', type=int, default=None,
                        help='nodes\' port (default %d)' % NODE_PORT)
    parser.add_argument('-s', '--secret', default=None, help='secret shared with the nodes')
    parser.add_argument('--certfile', help='TLS certificate (may hold the key)')
    parser.add_argument('--keyfile', help='TLS private key, if not in --certfile')
    parser.add_argument('--cafile', help='CA certificates to verify nodes against')
    parser.add_argument('--dest_path', help='folder (under the node\'s prefix) for the files')
    parser.add_argument('-c', '--keep_files', dest='cleanup', action='store_false',
                        help='leave the program and files on the nodes afterwards')
    parser.add_argument('--timeout', type=float, default=None,
                        help='seconds to wait for the jobs (default: no limit); the rest '
                        'are cancelled')
    parser.add_argument('-d', '--debug', action='store_true', help='log debug messages')
    return parser


def main(argv=None):
    """``python dispy.py [options] program``: see ``--help``."""
    opts = build_parser().parse_args(argv)
    try:
        cluster = JobCluster(opts.program, nodes=opts.nodes or None, depends=opts.files,
                             ip_addr=opts.ip_addr or None, ext_ip_addr=opts.ext_ip_addr or None,
                             port=opts.port, node_port=opts.node_port, secret=opts.secret,
                             certfile=opts.certfile, keyfile=opts.keyfile, cafile=opts.cafile,
                             dest_path=opts.dest_path, cleanup=opts.cleanup,
                             loglevel=logger.DEBUG if opts.debug else logger.WARNING)
    except (ValueError, OSError) as exc:
        print('dispy.py: %s' % exc, file=sys.stderr)
        return 2
    jobs = []
    for number, text in enumerate(opts.jobs or [''], 1):
        job = cluster.submit(*shlex.split(text))
        if job is None:
            print('dispy.py: job %d (%s) could not be created' % (number, text), file=sys.stderr)
            cluster.close(terminate=True)
            return 2
        job.id = number
        jobs.append(job)
    cluster.wait(opts.timeout)
    cluster.close(timeout=0, terminate=True)
    failed = 0
    for job, text in zip(jobs, opts.jobs or ['']):
        status = STATUS_NAMES.get(job.status, job.status)
        ok = job.status == DispyJob.Finished and job.result == 0
        failed += not ok
        print('job %s (%s) on %s: %s, exit status %s' % (job.id, text, job.ip_addr, status,
                                                        job.result))
        for label, text_out in (('stdout', job.stdout), ('stderr', job.stderr),
                                ('exception', job.exception)):
            if text_out:
                print('  %s:\n%s' % (label, textwrap.indent(text_out.rstrip('\n'), '    ')))
    print('%d of %d job(s) failed' % (failed, len(jobs)) if failed else
          'all %d job(s) succeeded' % len(jobs))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
