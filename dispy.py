#!/usr/bin/env python3
"""dispy: distribute Python functions and programs over the processors of many machines.

This module is both the client API (``JobCluster``, ``DispyJob``, ...) and the core that
every program of the project shares: the wire format and message catalog, the I/O loop,
the node pool and the job scheduler.  ``dispynode.py`` imports it for the wire format
and the listener; ``dispyscheduler.py`` hosts the same ``Scheduler`` and ``NodePool`` for
many programs, whose ``SharedJobCluster``s reach it through a ``RemoteScheduler``.

The path a job takes (who owns each queue, which thread moves it)::

    user thread   cluster.submit(args): pickles them, records the job in the recover
        │         file (RecoverLog), Scheduler.submit: queue of its cluster
        │         (_ClusterQueue.pending, a JobQueue: FIFO, or by dispy_job_priority)
        │         → _dispatch: a NodeLink with a free slot (a job that outranks one
        ▼         sent there but not started takes its place: _jump)
    LoopConnection.send: the connection's outbox → one frame; written by the caller
        │         itself when the connection is idle (a small message), else by the
        │         I/O loop
        ▼  TCP, HMAC-authenticated frames (Channel)
    dispynode     its session's queue → a CPU → a warm worker process runs the job;
        │         the result is kept on the node until acknowledged
        ▼  RESULT frame
    I/O loop      reads and verifies the frame, hands it to NodePool.on_messages →
        │         Scheduler.node_messages: unpickles the result (outside the lock; big
        │         frames on a worker thread, in order), then under the lock ends the
        ▼         jobs (ClusterHooks.job_ended; or queues a failed one again:
                  _retry), sends one ACK and the next jobs
    user thread   job() / cluster.wait() wake on the scheduler's condition; callbacks
                  run on the notifier thread

Threads of a client process (all daemon threads; none keeps a finished script alive):

    user threads    submit(), job(), wait(), cluster methods
    dispy-hub       the IOLoop: every node connection, the UDP discovery socket(s),
                    and timers every 0.1 s (pings, pulses, liveness, re-dials, the
                    "no node answered" warning, the recover files' ids and big args)
    dispy-worker-N  at most 8 (WorkerThreads): big frames and files jobs send (per
                    connection, in order), allocate() and shipping a computation's
                    files.  Dials (connect, TLS and dispy handshakes) run on the
                    loop without blocking (LoopDial).
    dispy-notifier  one per scheduler whose clusters have callbacks (or stream_output:
                    live lines of jobs): calls them in order

So a client with 48 nodes has the same threads as one with one node.  Layers, each a
section below::

    JobCluster (ClusterHooks) ──► Scheduler ──► NodePool ──► NodeLink ──► LoopConnection
         one per computation      one per        dialing,     one node    on the IOLoop
                                  NodePool       liveness,
                                                 discovery
    ClientHub: per process; the IOLoop, the WorkerThreads, the UDP port, and one
    Scheduler + NodePool per (secret, TLS files) its clusters use
    ClusterExecutor: a concurrent.futures.Executor over one JobCluster (its futures
    resolve on the notifier thread; see its section for the path of a call)

Wire format (shared by every program): see ``Channel``.  A connection starts with a
nonce handshake in which both sides prove knowledge of the secret; every later frame is
``length(4) | body | HMAC-SHA256(session key, sequence number | length | body)``.  Nothing
received is unpickled before its HMAC is verified, and frames are unpickled with a
restricted unpickler that admits only plain data (user objects travel as opaque blobs
that only the job process, or the client that owns them, unpickles).  Every message is
listed in the message catalog (``Msg``).  UDP discovery datagrams are JSON with an HMAC
and are never unpickled.

Receivers (shared by client, node, scheduler and relay): ``FileReceiver``
writes the files peers send under one set of rules (names, modes, size, chunk order, no
partial copies, stalled transfers dropped); ``DiscoveryEndpoint`` owns a program's UDP
sockets, verifies what they read and answers forged pings with a rate-limited NAK.
"""

import argparse
import ast
import atexit
import builtins
import collections
import concurrent.futures
import errno
import functools
import hashlib
import heapq
import hmac
import importlib.abc
import importlib.util
import inspect
import io
import itertools
import json
import math
import logging
import mmap
import os
import pickle
import re
import select
import selectors
import shlex
import shutil
import socket
import socketserver
import ssl
import struct
import sys
import textwrap
import threading
import time
import types
import uuid

__version__ = '5.0.0'
__all__ = ['JobCluster', 'SharedJobCluster', 'DispyJob', 'DispyNode', 'DispyNodeAvailInfo', 'NodeAllocate',
           'recover_jobs', 'logger', 'MsgTimeout', 'ClusterExecutor', 'JobFailed', 'RemoteError',
           'RemoteTraceback']

# ================================================================================
# Constants
# ================================================================================

PROTOCOL_VERSION = 2          # bump on any incompatible change of the wire format
CLIENT_PORT = 51347           # client (and later dispyscheduler) UDP + TCP
NODE_PORT = 51348             # dispynode UDP + TCP
RELAY_PORT = 51350            # dispynetrelay beside a node: the node hands it pings (loopback)
MAX_HANDSHAKE_MSG = 4096      # limit on anything read from an unauthenticated peer
DEFAULT_MAX_FRAME = 256 << 20  # limit on one authenticated frame (configurable)
# Arguments and results are pickled once, as opaque blobs, with a protocol every
# supported Python (3.4+) reads, so a blob made on one version loads on any other
# (parted blobs of big bytes arguments use protocol 5: Python 3.8+, as every node is).
BLOB_PICKLE_PROTOCOL = 4
HANDSHAKE_TIMEOUT = 10.0      # a peer that sends nothing is dropped after this
NOT_SERVING = 'not serving: '  # a node's BUSY for no client (service window, operator)
NOT_SERVING_REDIAL = 60.0     # ... dialed again after this (it announces when it serves)
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


def _oob_field(x):
    if isinstance(x, (bytes, bytearray, memoryview)):
        return pickle.PickleBuffer(x) if len(x) >= OOB_MIN else x
    if type(x) is tuple and x and isinstance(x[0], (bytes, memoryview)):   # a parted blob
        return tuple(_oob_field(part) for part in x)
    return x


def out_of_band(msg):
    """The message with its big bytes fields (and the big parts of a parted blob)
    wrapped so pickle (protocol 5) passes them to ``buffer_callback`` instead of
    copying them into the pickle."""
    return tuple(_oob_field(x) for x in msg)


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


# A job's pickled arguments (its "blob") are bytes; or, when an argument is a big bytes
# object, a *parted blob*: a tuple (pickle, data, ...) of a protocol-5 pickle and those
# bytes objects themselves, out of band, so they reach the worker without being copied
# into a pickle at the client (5 MB copied into fresh memory costs more than sending
# it).  A big bytes result travels the same way from the worker (dumps_result).  The
# recover file stores one as PARTED_MARK and the layout of a frame's body (see
# ``Channel``): count | sizes | pickle | data...; a pickle never starts with 0.
PARTED_MARK = b'\0'
PARTED_MAX = 1000       # big arguments out of band at most (the rest go in the pickle)


class _OutOfBand:
    """A big bytes argument, pickled as a reference to itself (out of band)."""
    __slots__ = ('data',)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return bytes, (pickle.PickleBuffer(self.data),)


def _big_bytes(x):
    return type(x) is bytes and len(x) >= OOB_MIN


def _dumps_parted(args):
    pos, kwargs = args
    wrappers = {}       # one per object: an argument given twice travels once

    def wrap(x):
        if not _big_bytes(x) or len(wrappers) >= PARTED_MAX:
            return x
        return wrappers.setdefault(id(x), _OutOfBand(x))
    wrapped = (tuple(map(wrap, pos)), {k: wrap(v) for k, v in kwargs.items()})
    meta, views = dumps_oob(wrapped, 5)
    return (meta,) + tuple(view.obj for view in views)     # the bytes objects themselves


def dumps_result(obj):
    """A job's result as a blob: a big bytes result travels out of band too."""
    if _big_bytes(obj):
        return (dumps_oob(_OutOfBand(obj), 5)[0], obj)
    return dumps_blob(obj)


def blob_size(blob):
    """Bytes of a blob, parted or not."""
    if type(blob) is tuple:
        return sum(len(part) for part in blob)
    return len(blob)


def stored_blob(blob):
    """Byte parts of a blob as the recover file keeps it."""
    if type(blob) is not tuple:
        return [blob]
    meta, buffers = blob[0], blob[1:]
    return [PARTED_MARK + _buffer_table(buffers), meta] + list(buffers)


def checked_blob(blob):
    """A JOB's arguments as received: bytes, or a parted blob (pickle, buffers...)
    whose parts can go on as they are; anything else → ValueError."""
    if isinstance(blob, (bytes, bytearray, memoryview)):
        return blob         # a big one came out of band: a slice of the frame
    if (type(blob) is not tuple or not blob
            or not all(isinstance(p, (bytes, memoryview)) for p in blob)):
        raise ValueError('malformed job arguments')
    # a small part came in band as bytes; a memoryview is a slice of the frame
    return tuple(p if isinstance(p, bytes) or len(p) >= OOB_MIN else bytes(p) for p in blob)


# What a JOB's options may hold (each only when it is not the default).
JOB_OPTIONS = frozenset(('timeout', 'depends', 'node', 'priority', 'retries'))


def checked_job_options(options):
    """A JOB's options as received (None, or a dict of ``timeout`` seconds,
    ``depends``: a job's own dependencies, ``node``: the address submit_node chose,
    ``priority`` (int: higher runs first), ``retries`` (int: runs again after it
    raised, this many times)); anything else → ValueError."""
    if options is None:
        return None
    if not isinstance(options, dict) or not set(options) <= JOB_OPTIONS:
        raise ValueError('malformed job options')
    for name in ('priority', 'retries'):
        if type(options.get(name, 0)) is not int:
            raise ValueError('malformed job %s %r' % (name, options[name]))
    timeout = options.get('timeout')
    if timeout is not None and (type(timeout) not in (int, float) or not timeout > 0):
        raise ValueError('malformed job timeout %r' % (timeout,))
    depends = options.get('depends')
    if depends is not None and (not isinstance(depends, dict)
                                or not isinstance(depends.get('files', []), list)):
        raise ValueError('malformed dispy_job_depends')
    if not isinstance(options.get('node', ''), str):
        raise ValueError('malformed job node')
    return options


def loads_blob(blob):
    """The object of a blob: bytes, a parted blob, or a stored parted blob."""
    if type(blob) is tuple:
        return pickle.loads(blob[0], buffers=blob[1:])
    view = memoryview(blob)
    if view[:1] != PARTED_MARK:
        return pickle.loads(view)
    meta, buffers = _split_body(view[1:])
    return pickle.loads(meta, buffers=buffers)


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
        if any(map(_big_bytes, args[0])) or any(map(_big_bytes, args[1].values())):
            return _dumps_parted(args), []
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


def _hello_frame(payload):
    return struct.pack('!4sH', b'DSPY', len(payload)) + payload


def _peer_hello_steps():
    """Steps that read the peer's hello (see ``handshake_steps``)."""
    head = yield ('recv', 6)
    magic, length = struct.unpack('!4sH', head)
    if magic != b'DSPY':
        if head[:1] in (b'\x15', b'\x16'):
            raise ProtocolError('peer speaks TLS but this side is not using TLS '
                                '(give both sides the same certfile)')
        raise ProtocolError('peer is not a dispy program (got %r)' % head[:4])
    if length > MAX_HANDSHAKE_MSG:
        raise ProtocolError('handshake message of %d bytes exceeds %d' % (length, MAX_HANDSHAKE_MSG))
    return (yield ('recv', length))


def handshake_steps(secret, dialer, info, max_frame=DEFAULT_MAX_FRAME, version=None):
    """The handshake without I/O: a generator that yields ``('send', data)``,
    ``('send_quietly', data)`` (errors ignored) and ``('recv', n)`` (the driver sends
    the n bytes back in), and returns the ``Channel`` keyword arguments.  ``handshake``
    drives it on a blocking socket, ``LoopDial`` on the I/O loop.

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
    version = PROTOCOL_VERSION if version is None else version
    mine = dict(info, magic='dispy', version=version, pickle=pickle.HIGHEST_PROTOCOL,
                nonce=os.urandom(16).hex(), max_frame=max_frame)
    my_hello = json.dumps(mine, sort_keys=True).encode()
    if dialer:
        yield ('send', _hello_frame(my_hello))
        peer_hello = yield from _peer_hello_steps()
    else:
        peer_hello = yield from _peer_hello_steps()
        yield ('send', _hello_frame(my_hello))
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
        yield ('send', b'P' + dialer_proof)
        answer = yield ('recv', 33)
        if answer[:1] == b'F':
            raise AuthError('peer rejected our authentication (secrets differ)')
        if not hmac.compare_digest(answer[1:], listener_proof):
            raise AuthError('peer failed authentication (secrets differ)')
    else:
        answer = yield ('recv', 33)
        if not hmac.compare_digest(answer[1:], dialer_proof):
            yield ('send_quietly', b'F' + bytes(32))
            raise AuthError('peer failed authentication (secrets differ)')
        yield ('send', b'P' + listener_proof)
    d2l = _mac(key, b'dispy-key-d2l', transcript)
    l2d = _mac(key, b'dispy-key-l2d', transcript)
    return dict(send_key=d2l if dialer else l2d, recv_key=l2d if dialer else d2l,
                max_frame=max_frame, peer_max_frame=int(peer['max_frame']),
                pickle_protocol=min(pickle.HIGHEST_PROTOCOL, int(peer['pickle'])),
                peer_info=peer)


def handshake(sock, secret, dialer, info, max_frame=DEFAULT_MAX_FRAME, timeout=HANDSHAKE_TIMEOUT,
              version=None):
    """Authenticates both ends of a connected blocking socket (``handshake_steps``)
    within ``timeout`` seconds; returns a ready ``Channel``."""
    sock.settimeout(timeout)
    params = _run_steps(sock, handshake_steps(secret, dialer, info, max_frame, version),
                        time.monotonic() + timeout)
    sock.settimeout(None)
    return Channel(sock, **params)


def _run_steps(sock, steps, deadline=None):
    """Drives handshake steps on a blocking socket; returns what they return."""
    reply = None
    try:
        while True:
            op, arg = steps.send(reply)
            reply = None
            if op == 'recv':
                reply = _recv_exact(sock, arg, deadline)
            elif op == 'send':
                sock.sendall(arg)
            else:
                try:
                    sock.sendall(arg)
                except OSError:
                    pass
    except StopIteration as done:
        return done.value


def _send_hs(sock, payload):
    sock.sendall(_hello_frame(payload))


def _recv_hs(sock, deadline=None):
    return _run_steps(sock, _peer_hello_steps(), deadline)


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
    def frame(self, meta, buffers=()):
        """The byte parts of the next frame (its sequence number is taken)."""
        parts = [_buffer_table(buffers), meta]
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
        self.bytes_sent += length + 36
        return [header] + parts + [mac.digest()]

    def send_body(self, meta, buffers=()):
        send_parts(self.sock, self.frame(meta, buffers))

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

    def take_buffered(self):
        """Bytes read past the last frame, for whatever serves the socket next."""
        data, self._rbuf = bytes(self._rbuf), bytearray()
        return data

    def begin_frame(self, header):
        """(body length, running MAC) for a received frame header; refuses one over
        our limit before anything is allocated for it."""
        (length,) = struct.unpack('!I', header)
        if length > self.max_frame:
            raise ProtocolError('peer sent a frame of %d bytes, over the limit of %d '
                                '(raise max_frame_size on this side if this is legitimate)'
                                % (length, self.max_frame))
        mac = self._recv_mac.copy()
        mac.update(struct.pack('!Q', self.recv_seq))
        mac.update(header)
        return length, mac

    def end_frame(self, mac, body, tag):
        """(pickle, [buffers]) of a frame whose body ``mac`` has seen; raises unless
        ``tag`` proves it."""
        if not hmac.compare_digest(mac.digest(), bytes(tag)):
            raise AuthError('frame failed authentication (corrupted, replayed or forged)')
        self.recv_seq += 1
        self.bytes_received += len(body) + 36
        self.last_recv = time.monotonic()
        return _split_body(body)

    def recv_body(self):
        """(pickle, [buffers]) of the next frame, verified; raises on anything else."""
        length, mac = self.begin_frame(self._read(4))
        data = self._read(length + 32)
        body = memoryview(data)[:length]
        mac.update(body)
        return self.end_frame(mac, body, data[length:])

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


def _buffer_table(buffers):
    """count(2) | count × size(8) of a body's out-of-band buffers (see Channel)."""
    return struct.pack('!H%dQ' % len(buffers), len(buffers), *(len(b) for b in buffers))


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


class _ConnectionBase:
    """The half of ``LoopConnection`` that does not touch the loop: liveness figures,
    and how queued messages become frames within the peer's limit.  The subclass has
    ``channel``, ``name``, ``_outbox`` (a deque of (message, size hint)), ``_closing``,
    ``_closed`` and ``_last_send``."""

    BATCH_BYTES = 1 << 20     # stop adding messages to a frame past this size hint

    @property
    def closed(self):
        return self._closing or self._closed

    @property
    def last_recv(self):
        return self.channel.last_recv

    @property
    def idle_send(self):
        return time.monotonic() - self._last_send

    compact = None      # optional: batch -> batch, what of a frame need not be sent

    def _take_batch(self):
        """Queued messages for one frame (lock held); big bytes fields out of band."""
        batch, size = [], 0
        while self._outbox and size < self.BATCH_BYTES:
            msg, hint = self._outbox.popleft()
            batch.append(out_of_band(msg) if hint >= OOB_MIN else msg)
            size += hint
        return self.compact(batch) if self.compact is not None else batch

    def _frames_of(self, batch):
        """The byte parts of the frame(s) of a batch: one frame, or one per message
        when together they exceed the peer's limit (a message over it alone is
        dropped, logged)."""
        channel = self.channel
        meta, buffers = dumps_oob(batch, channel.pickle_protocol)
        if len(meta) + sum(len(b) for b in buffers) <= channel.peer_max_frame - 65536:
            return channel.frame(meta, buffers)
        parts = []
        for msg in batch:
            meta, buffers = dumps_oob([msg], channel.pickle_protocol)
            size = len(meta) + sum(len(b) for b in buffers)
            if size > channel.peer_max_frame:
                logger.error('%s: %s message of %d bytes exceeds the peer\'s frame limit of %d;'
                             ' dropped', self.name, msg[0], size, channel.peer_max_frame)
                continue
            parts += channel.frame(meta, buffers)
        return parts


# ================================================================================
# Message catalog: every message the programs exchange, with its fields
# ================================================================================
#
# On the wire a message is a plain tuple ``(KIND, field, ...)`` (frames admit only plain
# data); in code it is built and read only through its ``MessageKind`` here, so the
# fields of a kind are written down once.  ``Msg.JOB(key, ...)`` builds one;
# ``Msg.JOB.read(msg)`` checks a received one and gives a record with named fields.
#
#   client → node                              node → client
#   CLIENT        first message: who we are    NODE          first answer: CPUs, jobs held
#   COMPUTE       a computation's spec         BUSY          serving another client
#   FILE          a chunk of one of its files  SETUP         setup done (or failed)
#   JOB           run one job                  STARTED       a job began running
#   CANCEL        kill / drop one job          RESULT        a job ended (kept until ACK)
#   ACK           results safe here (a list)   PROVISIONAL   dispy_provisional_result
#   SET_CPUS      a computation's CPU share    SEND_FILE     dispy_send_file chunk
#   PUT_FILE      cluster.send_file chunk      PUT_FILE_DONE a send_file ended
#   CLOSE_COMPUTE end a computation (cleanup)  CLOSED        confirms CLOSE_COMPUTE
#   RELEASE       the client is done here      PULSE         liveness (+ availability)
#   PULSE         liveness                     RECALLED      answers RECALL (given back?)
#   RECALL        a queued job, back please                  (or hands a job back unasked)
#   SHUTDOWN      cluster.shutdown(): stop     SERVICE       takes jobs or not now (its
#                 once I am done (if allowed)                service window, stdin stop),
#                                                            and its CPUs
#                                              OUTPUT        live lines of a running job
#                                                            (stream_output), and how many
#                                                            were dropped before them
#
#   SharedJobCluster → dispyscheduler          dispyscheduler → SharedJobCluster
#   (one connection per cluster)
#   CLIENT        who we are (+ cluster uid)   NODE          first answer (cluster known?)
#   CLUSTER       computation, nodes, options  CLUSTER_READY files in, or why refused
#   FILE          a chunk of one of its files  STATE         a job runs (on which node) or
#   JOB, CANCEL, ACK, PULSE  as to a node                    is queued again
#   NODE_OP       a cluster method on a node   DONE          a job ended (kept until ACK)
#   PUT_FILE      send_file chunk (cluster     PROVISIONAL, SEND_FILE, PUT_FILE_DONE, PULSE,
#                 field: the node's address)   OUTPUT        as from a node
#   ALLOCATED     answers ALLOCATE             NODE_STATUS   a node joined, left, ...
#   RELEASE       the cluster is closed        ALLOCATE      asks a NodeAllocate subclass
#                                              OP_DONE       answers NODE_OP
#   recover_jobs talks to a scheduler as to a node (CLIENT, NODE, ACK, RELEASE), and
#   takes its DONEs for RESULTs.

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
        return blob_size(data) if data is not None else 0


class Msg:
    """The catalog: every kind of connection message (see the table above)."""
    # client → node
    CLIENT = MessageKind('CLIENT', ['info'])
    COMPUTE = MessageKind('COMPUTE', ['cluster', 'spec'])
    FILE = MessageKind('FILE', ['cluster', 'name', 'mode', 'offset', 'data', 'last'], 'data')
    JOB = MessageKind('JOB', ['key', 'cluster', 'attempt', 'blob', 'options'], 'blob')
    CANCEL = MessageKind('CANCEL', ['key', 'attempt'])
    ACK = MessageKind('ACK', ['jobs'])     # [(key, attempt), ...] of results recorded
    SET_CPUS = MessageKind('SET_CPUS', ['cluster', 'cpus'])
    PUT_FILE = MessageKind('PUT_FILE', ['cluster', 'name', 'mode', 'offset', 'data', 'last'],
                           'data')
    CLOSE_COMPUTE = MessageKind('CLOSE_COMPUTE', ['cluster'])
    RELEASE = MessageKind('RELEASE', [])
    PULSE = MessageKind('PULSE', ['time'])
    RECALL = MessageKind('RECALL', ['key', 'attempt'])
    SHUTDOWN = MessageKind('SHUTDOWN', [])
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
    RECALLED = MessageKind('RECALLED', ['key', 'attempt', 'given'])
    SERVICE = MessageKind('SERVICE', ['accepting', 'cpus', 'why'])
    OUTPUT = MessageKind('OUTPUT', ['key', 'attempt', 'stream', 'text', 'dropped'], 'text')
    # SharedJobCluster ↔ dispyscheduler
    CLUSTER = MessageKind('CLUSTER', ['info'])
    NODE_OP = MessageKind('NODE_OP', ['token', 'op', 'node', 'arg'])
    ALLOCATED = MessageKind('ALLOCATED', ['token', 'cpus'])
    CLUSTER_READY = MessageKind('CLUSTER_READY', ['error'])
    STATE = MessageKind('STATE', ['key', 'status', 'ip', 'start_time'])
    DONE = MessageKind('DONE', ['key', 'ip', 'status', 'blob', 'stdout', 'stderr',
                                'exception', 'start_time', 'end_time', 'retried'], 'blob')
    NODE_STATUS = MessageKind('NODE_STATUS', ['status', 'node'])
    ALLOCATE = MessageKind('ALLOCATE', ['token', 'index', 'node'])
    OP_DONE = MessageKind('OP_DONE', ['token', 'value'])

    @classmethod
    def result(cls, key, attempt, status, exception, blob=None, stdout='', stderr='',
               start_time=None, end_time=None):
        """A RESULT, with the fields a job that never ran leaves empty."""
        return cls.RESULT(key, attempt, status, blob, stdout, stderr, exception, start_time,
                          end_time or time.time())


# The kinds each side accepts, by name (PULSE differs by direction).
TO_NODE = {k.name: k for k in (Msg.CLIENT, Msg.COMPUTE, Msg.FILE, Msg.JOB, Msg.CANCEL,
                               Msg.ACK, Msg.SET_CPUS, Msg.PUT_FILE, Msg.CLOSE_COMPUTE,
                               Msg.RELEASE, Msg.PULSE, Msg.RECALL, Msg.SHUTDOWN)}
TO_CLIENT = {k.name: k for k in (Msg.NODE, Msg.BUSY, Msg.SETUP, Msg.STARTED, Msg.RESULT,
                                 Msg.PROVISIONAL, Msg.SEND_FILE, Msg.PUT_FILE_DONE,
                                 Msg.CLOSED, Msg.NODE_PULSE, Msg.RECALLED, Msg.SERVICE,
                                 Msg.OUTPUT)}


TO_SCHEDULER = {k.name: k for k in (Msg.CLIENT, Msg.CLUSTER, Msg.FILE, Msg.JOB, Msg.CANCEL,
                                    Msg.ACK, Msg.NODE_OP, Msg.PUT_FILE, Msg.ALLOCATED,
                                    Msg.PULSE, Msg.RELEASE)}
FROM_SCHEDULER = {k.name: k for k in (Msg.NODE, Msg.CLUSTER_READY, Msg.STATE, Msg.DONE,
                                      Msg.PROVISIONAL, Msg.SEND_FILE, Msg.PUT_FILE_DONE,
                                      Msg.NODE_STATUS, Msg.ALLOCATE, Msg.OP_DONE,
                                      Msg.NODE_PULSE, Msg.OUTPUT)}


def message_bulk(msg):
    """Size hint of any catalogued message (its bulk field's length)."""
    kind = TO_NODE.get(msg[0]) or TO_CLIENT.get(msg[0]) or FROM_SCHEDULER.get(msg[0])
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


def bind_udp_any_v6(port, reuse=False):
    """An IPv6-only UDP socket on [::]:port, or None when the host has no IPv6."""
    if not socket.has_ipv6:
        return None
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
# Receivers: files that arrive in chunks, discovery datagrams (client and node)
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
    def bind(self, addr, port, reuse=False):
        """A socket bound on ``addr`` ('' = every IPv4 interface) and ``port`` (0: any
        free one), shared with other programs' sockets with ``reuse``; OSError as the
        system gave it (the caller words it)."""
        family = node_address_family(addr) if addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(sockaddr(addr, port) if addr else ('', port))
        except OSError:
            sock.close()
            raise
        return self.add_socket(sock)

    def bind_any_v6(self, port, reuse=False):
        """The IPv6 any-address socket beside an all-interfaces IPv4 one, or None when
        the host has no IPv6."""
        sock = bind_udp_any_v6(port, reuse)
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
            self.dispatch(data, addr, sock)

    def dispatch(self, data, addr, sock):
        """Verifies one datagram and hands it on (a hook: a client with several
        secrets offers it to each of its node pools instead)."""
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
# Listener: authenticated TCP connections (socketserver), for nodes and schedulers
# ================================================================================

class HandshakeAdmission:
    """Bounds the handshakes in progress: a flood of connections must not become a
    flood of threads, and one address cannot take every slot."""

    def __init__(self, total=32, per_address=16):
        self.total = total
        self.per_address = per_address
        self._from = collections.Counter()      # address -> handshakes in progress
        self._lock = threading.Lock()

    def admit(self, host):
        with self._lock:
            if self._from[host] >= self.per_address or sum(self._from.values()) >= self.total:
                return False
            self._from[host] += 1
            return True

    def release(self, host):
        with self._lock:
            self._from[host] -= 1
            if self._from[host] <= 0:
                del self._from[host]

    def __len__(self):
        with self._lock:
            return sum(self._from.values())


class SocketDeadlines:
    """Connections that must finish a phase (a handshake, a request) by a deadline.
    ``cut_overdue()``, called from a server's ``service_actions``, shuts down those
    past it, so a peer trickling bytes cannot hold a thread however it paces them.

    Each is kept as a duplicate descriptor: shutting that down reaches the connection
    even after TLS took the socket over, and its number cannot be reused meanwhile.
    A key may be re-armed (``watch`` again) or paused; ``forget`` ends it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._watched = {}          # key -> [monotonic deadline or None, dup socket]

    def watch(self, key, seconds, sock=None):
        """Arms ``key``'s deadline (``sock``: its socket, the first time)."""
        deadline = time.monotonic() + seconds
        with self._lock:
            entry = self._watched.get(key)
            if entry is not None:
                entry[0] = deadline
                return
        dup = sock.dup()
        with self._lock:
            self._watched[key] = [deadline, dup]

    def pause(self, key):
        with self._lock:
            entry = self._watched.get(key)
            if entry is not None:
                entry[0] = None

    def forget(self, key):
        with self._lock:
            entry = self._watched.pop(key, None)
        if entry is not None:
            entry[1].close()

    def cut_overdue(self, everything=False):
        """Shuts down the connections past their deadline (or every one)."""
        now = time.monotonic()
        with self._lock:
            cut = [dup for deadline, dup in self._watched.values()
                   if everything or (deadline is not None and now > deadline)]
        for dup in cut:
            try:
                dup.shutdown(socket.SHUT_RDWR)      # the peer's thread's read fails at once
            except OSError:
                pass


class _ListenerHandshake(socketserver.BaseRequestHandler):
    """One accepted connection, in a thread of its own: TLS, ``handshake`` and
    the first CLIENT message; then the channel goes to ``owner.attach``."""

    def handle(self):
        threading.current_thread().name = self.server.thread_name
        listener, addr = self.server, self.client_address
        authenticated = listener.authenticate(self.request, addr)
        if authenticated is None:
            return
        channel, info = authenticated
        listener.hand_off(self.request)     # the channel owns the socket now
        try:
            listener.owner.attach(channel, addr, info)
        except Exception:
            channel.close()
            raise


class Listener(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A TCP listener on one address (a node's, a scheduler's): each connection is
    admitted (see ``HandshakeAdmission``, shared by every listener of the program),
    authenticated in a daemon thread within ``HANDSHAKE_TIMEOUT`` in all, and handed
    to ``owner.attach(channel, addr, CLIENT info)``.

    Hooks: ``credentials()`` -> (ssl context or None, secret, max frame, hello info),
    by default the owner's ``ssl_context``, ``secret``, ``max_frame`` and ``name``.

    ``serve_forever`` in a thread of its own; ``close()`` stops and closes it.
    """

    daemon_threads = True
    block_on_close = False      # closing never waits on handshakes in progress
    allow_reuse_address = True
    request_queue_size = 128
    poll_interval = 0.5         # also how often overdue handshakes are cut off

    thread_name = 'dispy-handshake'

    def __init__(self, owner, addr, port, admission, v6only=False):
        self.owner = owner
        self.admission = admission
        self.v6only = v6only
        self.address_family = node_address_family(addr) if addr else socket.AF_INET
        self._handed_off = set()    # accepted sockets that belong to a channel now
        self._deadlines = SocketDeadlines()     # sockets in their handshake
        self._lock = threading.Lock()
        self._serving = False
        super().__init__(sockaddr(addr, port) if addr else ('', port),
                         _ListenerHandshake, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    @property
    def port(self):
        return self.server_address[1]

    def server_bind(self):
        if self.v6only:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    # -- socketserver hooks ------------------------------------------------------------------
    def verify_request(self, request, client_address):
        if self.admission.admit(client_address[0]):
            return True
        logger.warning('connection from %s dropped: too many handshakes in progress',
                       client_address[0])
        return False            # socketserver closes it

    def finish_request(self, request, client_address):
        try:
            self._deadlines.watch(request, HANDSHAKE_TIMEOUT, request)
            super().finish_request(request, client_address)
        finally:
            self._deadlines.forget(request)
            self.admission.release(client_address[0])

    def shutdown_request(self, request):
        with self._lock:
            if request in self._handed_off:
                self._handed_off.discard(request)
                return
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        logger.warning('connection from %s refused: %r', client_address[0], sys.exc_info()[1])

    def service_actions(self):
        """Runs in the serving thread every ``poll_interval``: a handshake past its
        deadline is shut down, so a peer trickling bytes (TLS records, a hello, a first
        frame) cannot hold a slot however it paces them."""
        self._deadlines.cut_overdue()

    def serve_forever(self, poll_interval=None):
        self._serving = True
        super().serve_forever(poll_interval or self.poll_interval)

    def close(self):
        """Stops serving and closes the listening socket (like a socket's close)."""
        if self._serving:
            self.shutdown()
        self.server_close()

    def credentials(self):
        owner = self.owner
        return (owner.ssl_context, owner.secret, owner.max_frame,
                {'role': 'scheduler', 'name': owner.name})

    # -- the handshake -----------------------------------------------------------------------
    def hand_off(self, request):
        """The socket is the channel's now: no deadline on it any more (the session
        may take long to attach), and socketserver must not close it."""
        self._deadlines.forget(request)
        with self._lock:
            self._handed_off.add(request)

    def authenticate(self, sock, addr):
        """(channel, CLIENT info) of an authenticated client, or None (logged, closed)."""
        ssl_context, secret, max_frame, hello = self.credentials()
        channel = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock.settimeout(HANDSHAKE_TIMEOUT)
                sock = ssl_context.wrap_socket(sock, server_side=True)
            channel = handshake(sock, secret, False, hello, max_frame)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            info = self._client_info(channel.recv())
            sock.settimeout(None)
            return channel, info
        except Exception as exc:     # never a socket left open by a failed handshake
            try:
                sock.close()
            except OSError:
                pass
            if not isinstance(exc, self.REFUSALS):
                raise       # handle_error logs it
            if channel is not None and channel.peer_info.get('role') == 'doctor':
                logger.info('connection from %s: dispy.py --doctor checked the handshake',
                            addr[0])    # it hangs up once authenticated: no refusal
                return None
            logger.warning('connection from %s refused: %s', addr[0], exc)
            return None

    # what a hostile or mismatched peer causes (anything else is logged with its type)
    REFUSALS = (OSError, ProtocolError, ValueError, TypeError, EOFError,
                pickle.UnpicklingError)

    @staticmethod
    def _client_info(first):
        """The info of the first frame, which must hold just a well-formed CLIENT."""
        if (not isinstance(first, list) or len(first) != 1
                or not isinstance(first[0], tuple) or first[0][:1] != ('CLIENT',)):
            raise ProtocolError('first message is not CLIENT')
        info = Msg.CLIENT.read(first[0]).info
        if not isinstance(info, dict):
            raise ProtocolError('malformed CLIENT message')
        float(info.get('pulse_interval') or 1)
        if not isinstance(info.get('id', ''), str):
            raise ProtocolError('malformed CLIENT message')
        return info


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

    __slots__ = ('_id', 'status', 'ip_addr', 'result', 'stdout', 'stderr', 'exception',
                 'submit_time', 'start_time', 'end_time', 'args', '_kwargs', '_key',
                 '_cluster', '_blob', '_attempt', '_node', '_pin', '_options', '_tries',
                 '__weakref__')

    def __init__(self, key, cluster, blob, pin=None, options=None, args=(), kwargs=None):
        self._id = key
        self.args = args
        self._kwargs = kwargs if kwargs else _NO_KWARGS    # made when first read
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
        self._tries = None         # JobAttempts of its runs that failed and were retried

    @property
    def id(self):
        return self._id

    @id.setter
    def id(self, value):
        """The program names the job: written to the recover file at once."""
        self._id = value
        recover = getattr(self._cluster, '_recover', None)
        if recover is not None and self._key is not None and self.status not in FINAL_STATUSES:
            recover.write_ids([self])

    @property
    def kwargs(self):
        if self._kwargs is _NO_KWARGS:
            self._kwargs = {}
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value):
        self._kwargs = value

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

    @property
    def attempts(self):
        """Its runs so far, oldest first (``JobAttempt`` records): those that failed
        and were retried (``dispy_job_retries``), then, once it has ended, its last."""
        tries = list(self._tries or ())
        if self.status in FINAL_STATUSES and self.start_time is not None:
            tries.append(JobAttempt(self.ip_addr, self.status, self.exception, self.stdout,
                                    self.stderr, self.start_time, self.end_time))
        return tries

    def __lt__(self, other):
        return self._key < other._key

    def __repr__(self):
        return '<DispyJob %s id=%r status=%s>' % (self._key, self.id,
                                                  STATUS_NAMES.get(self.status, self.status))

    def _ended(self, status, result, stdout, stderr, exception, end_time):
        """Its final state (a scheduler's ``_end_job`` says when)."""
        self.status = status
        self.result = result
        self.stdout, self.stderr, self.exception = stdout, stderr, exception
        self.end_time = end_time or time.time()
        self._blob = None           # finished jobs hold no reference to their arguments
        self._options = None

    def _snapshot(self):
        snap = DispyJob.__new__(DispyJob)
        for name in DispyJob.__slots__[:-1]:
            setattr(snap, name, getattr(self, name))
        snap._blob = None
        snap._tries = list(self._tries) if self._tries else None
        return snap


_NO_KWARGS = object()      # a job submitted without keyword arguments (no dict each)

# One run of a job (``DispyJob.attempts``): where, how it ended and what it printed.
JobAttempt = collections.namedtuple('JobAttempt', ['ip_addr', 'status', 'exception', 'stdout',
                                                   'stderr', 'start_time', 'end_time'])

FINAL_STATUSES = frozenset((DispyJob.Finished, DispyJob.Terminated, DispyJob.Cancelled,
                            DispyJob.Abandoned))
# ended by an error (raised, killed, timed out, or its node lost): not Cancelled
FAILED_STATUSES = frozenset((DispyJob.Terminated, DispyJob.Abandoned))


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
        self.object_names = set(deps.objects)       # globals bound to depends objects
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
# Client core: the I/O loop, worker threads and connections on the loop
# ================================================================================
#
# A client process runs one ``IOLoop`` thread for every connection and datagram socket
# it has, so its thread count does not grow with its nodes.  The loop reads, verifies
# and decodes frames itself (each hand-off between threads costs 50-60 µs); work that
# must not stall it goes to ``WorkerThreads``, in order per connection (a ``Strand``):
# big frames (unpickling large results, saving files jobs send), shipping a
# computation's files, user code such as ``allocate()``.  Connections are made on the
# loop too, without blocking (``LoopDial``).
#
# Lock order (outer first): Scheduler.lock → LoopConnection._lock → WorkerThreads._cond
# and Strand._lock (the IOLoop's call queue is a deque: no lock).  Nothing takes the
# scheduler's lock while it holds a connection's.

LOOP_TICK = 0.1             # timers of the loop (pings, pulses, re-dials) run this often
BIG_FRAME = 256 << 10       # frames bigger than this are handled on the worker threads
POOL_THREADS = 8            # bound of a client's worker threads


def _coalesce(parts, small=65536):
    """Byte parts with every run of small ones joined into one."""
    out, run = [], []
    for part in parts:
        if len(part) < small:
            run.append(part)
            continue
        if run:
            out.append(b''.join(run))
            run = []
        out.append(part)
    if run:
        out.append(b''.join(run))
    return out


def _run_guarded(func, args):
    """Runs a task of the loop or the worker threads; an error is logged, never lets
    the thread die."""
    try:
        func(*args)
    except Exception:
        logger.exception('dispy: %s failed', getattr(func, '__qualname__', func))


class WorkerThreads:
    """A bounded pool of daemon threads, started on demand and ended when idle.

    Not ``concurrent.futures.ThreadPoolExecutor``: its threads are joined when the
    interpreter exits, so a dial waiting out ``MsgTimeout`` would keep a finished
    script alive; these are daemon threads.
    """

    IDLE_EXIT = 30.0        # an idle thread ends after this many seconds

    def __init__(self, size, name):
        self.size = size
        self.name = name
        self._tasks = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._threads = 0
        self._idle = 0

    def submit(self, func, *args):
        with self._cond:
            self._tasks.append((func, args))
            if self._idle:
                self._cond.notify()
            # an idle thread notified but not yet awake still counts as idle: a burst
            # of tasks gets more threads, not a queue behind that one
            if len(self._tasks) > self._idle and self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, daemon=True,
                                 name='%s-%d' % (self.name, self._threads)).start()

    def _work(self):
        while True:
            with self._cond:
                self._idle += 1
                if not self._tasks:
                    self._cond.wait(self.IDLE_EXIT)
                self._idle -= 1
                if not self._tasks:
                    self._threads -= 1
                    return
                func, args = self._tasks.popleft()
            _run_guarded(func, args)


class Strand:
    """Tasks started in the order given on a WorkerThreads pool, at most ``width`` at
    a time: with width 1 (one at a time, in order) what one connection hands off stays
    in order without a thread of its own; a wider strand bounds the threads a burst
    of tasks takes (setting up 1,000 nodes at once)."""

    def __init__(self, threads, width=1):
        self._threads = threads
        self._width = width
        self._tasks = collections.deque()
        self._lock = threading.Lock()
        self._running = 0

    @property
    def busy(self):
        return self._running > 0

    def submit(self, func, *args):
        with self._lock:
            self._tasks.append((func, args))
            if self._running >= self._width:
                return
            self._running += 1
        self._threads.submit(self._drain)

    def _drain(self):
        while True:
            with self._lock:
                if not self._tasks:
                    self._running -= 1
                    return
                func, args = self._tasks.popleft()
            _run_guarded(func, args)


class IOLoop:
    """One thread and one ``selectors`` selector: sockets call back when ready, other
    threads hand it calls (``call_soon``), and tickers run every LOOP_TICK seconds.
    Registrations are changed only on the loop thread (``in_loop``)."""

    def __init__(self, name):
        self.selector = selectors.DefaultSelector()
        self._calls = collections.deque()
        self._tickers = []
        self._timers = []           # heap of (due, sequence, func, args); loop thread only
        self._timer_seq = itertools.count()
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)
        self.thread.start()

    def on_loop(self):
        return threading.current_thread() is self.thread

    def call_soon(self, func, *args):
        """Runs ``func`` on the loop thread after the events being handled."""
        self._calls.append((func, args))
        if not self.on_loop() and not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b'x')
            except OSError:
                pass

    def in_loop(self, func, *args):
        """Runs ``func`` now if on the loop thread, else soon on it."""
        if self.on_loop():
            func(*args)
        else:
            self.call_soon(func, *args)

    def call_later(self, delay, func, *args):
        """Runs ``func`` on the loop thread in ``delay`` seconds (call it there)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq),
                                      func, args))

    def add_ticker(self, func):
        self.call_soon(self._tickers.append, func)

    def remove_ticker(self, func):
        self.call_soon(self._drop_ticker, func)

    def _drop_ticker(self, func):
        if func in self._tickers:
            self._tickers.remove(func)

    def stop(self):
        self._stopped = True
        self.call_soon(lambda: None)

    def _drain_wake(self, _events):
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass
        # Cleared after the drain: a caller that saw it set left its call in the
        # queue, which runs right after this (a byte sent meanwhile wakes us again).
        self._woken = False

    def _run(self):
        next_tick = time.monotonic()
        try:
            while not self._stopped:
                due = min(next_tick, self._timers[0][0]) if self._timers else next_tick
                timeout = 0 if self._calls else max(0.0, due - time.monotonic())
                for key, events in self.selector.select(timeout):
                    _run_guarded(key.data, (events,))
                    self._run_calls()   # the replies to a frame leave before the next is read
                self._run_calls()
                self._run_timers()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + LOOP_TICK
                    for ticker in list(self._tickers):
                        _run_guarded(ticker, ())
        finally:
            for key in list(self.selector.get_map().values()):
                if key.fileobj is not self._wake_r:
                    try:
                        key.fileobj.close()
                    except OSError:
                        pass
            self._wake_r.close()
            self._wake_w.close()
            self.selector.close()

    def _run_calls(self):
        for _ in range(len(self._calls)):
            func, args = self._calls.popleft()
            _run_guarded(func, args)

    def _run_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, func, args = heapq.heappop(self._timers)
            _run_guarded(func, args)



class LoopDial:
    """A connection being made on the I/O loop, nothing blocking: a non-blocking
    ``connect``, the TLS handshake (``do_handshake`` until it stops asking for
    ``SSLWantReadError``/``SSLWantWriteError``), then dispy's own handshake
    (``handshake_steps``), all within ``timeout``.  Ends with ``done(channel, extra)``
    (``extra``: bytes read past the handshake) or ``failed(exc)``, on the loop thread.
    """

    def __init__(self, loop, addr, port, ssl_context, steps, max_frame, timeout, done,
                 failed, peer='node'):
        self.loop = loop
        self.peer = peer            # what is dialed, for the errors' text
        self.addr = (addr, port)
        self.ssl_context = ssl_context
        self.steps = steps
        self.max_frame = max_frame
        self.deadline = time.monotonic() + timeout
        self.done = done
        self.failed = failed
        self.sock = None
        self.connected = False
        self.stage = None           # the readiness handler of the current stage
        self.out = b''              # handshake bytes not written yet
        self.inbuf = b''
        self.need = 0               # bytes the current 'recv' step waits for
        self.over = False

    def start(self):
        self.loop.in_loop(self._connect)
        return self

    # -- stages ------------------------------------------------------------------------
    def _connect(self):
        self.loop.add_ticker(self._check_deadline)
        try:
            self.sock = socket.socket(node_address_family(self.addr[0]), socket.SOCK_STREAM)
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = self.sock.connect_ex(sockaddr(*self.addr))
        except OSError as exc:
            self._fail(exc)
            return
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            self._fail(OSError(err, os.strerror(err)))
            return
        self._wait(selectors.EVENT_WRITE, self._on_connected)

    def _on_connected(self, _events):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return
        self.connected = True
        if self.ssl_context is None:
            self._advance(None)
            return
        try:
            self.sock = self.ssl_context.wrap_socket(self.sock, server_side=False,
                                                     do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            self._fail(exc)
            return
        self._tls_handshake(None)

    def _tls_handshake(self, _events):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(selectors.EVENT_READ, self._tls_handshake)
        except ssl.SSLWantWriteError:
            self._wait(selectors.EVENT_WRITE, self._tls_handshake)
        except (OSError, ValueError) as exc:
            self._fail(exc)
        else:
            self._advance(None)

    def _advance(self, reply):
        """Runs the handshake steps until one needs bytes that have not come yet."""
        while True:
            try:
                op, arg = self.steps.send(reply)
            except StopIteration as end:
                self._finish(end.value)
                return
            except (ProtocolError, ValueError) as exc:
                self._fail(exc)
                return
            reply = None
            if op != 'recv':
                self.out += arg
                continue
            self.need = arg
            if len(self.inbuf) >= arg:
                reply, self.inbuf = self.inbuf[:arg], self.inbuf[arg:]
                continue
            break
        self._exchange(None)

    def _exchange(self, _events):
        """Writes pending handshake bytes, reads what the current step waits for."""
        try:
            while self.out:
                sent = self.sock.send(self.out)
                self.out = self.out[sent:]
            while len(self.inbuf) < self.need:
                chunk = self.sock.recv(self.need - len(self.inbuf))
                if not chunk:
                    raise ProtocolError('connection closed by peer during handshake')
                self.inbuf += chunk
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            self._wait(selectors.EVENT_WRITE if self.out else selectors.EVENT_READ,
                       self._exchange)
            return
        except ssl.SSLWantWriteError:
            self._wait(selectors.EVENT_WRITE, self._exchange)
            return
        except (OSError, ProtocolError) as exc:
            self._fail(exc)
            return
        reply, self.inbuf = self.inbuf[:self.need], self.inbuf[self.need:]
        self._advance(reply)

    # -- bookkeeping ---------------------------------------------------------------------
    def _wait(self, events, stage):
        selector = self.loop.selector
        if self.stage is None:
            selector.register(self.sock, events, self._on_ready)
        else:
            selector.modify(self.sock, events, self._on_ready)
        self.stage = stage

    def _on_ready(self, events):
        if not self.over:
            self.stage(events)

    def _unwatch(self):
        self.over = True
        self.loop.remove_ticker(self._check_deadline)
        if self.stage is not None:
            try:
                self.loop.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass

    def _check_deadline(self):
        if not self.over and time.monotonic() > self.deadline:
            self._fail(socket.timeout('no answer in time'))

    def _finish(self, params):
        self._unwatch()
        self.done(Channel(self.sock, **params), self.inbuf)

    def _fail(self, exc):
        if self.over:
            return
        self._unwatch()
        if self.sock is not None:
            self.sock.close()
        if self.connected and not isinstance(exc, ProtocolError):
            # Connected, then dropped during the handshake: the usual cause is TLS on
            # one side only (or a different certificate).
            exc = ProtocolError('%s closed the connection during the handshake (%s); is '
                                'it overloaded, or does it use TLS (certfile) while this '
                                'client does%s?' % (self.peer, exc,
                                                    '' if self.ssl_context else ' not'))
        self.failed(exc)


class LoopConnection(_ConnectionBase):
    """A ``Channel`` served by the IOLoop instead of threads of its own.

    Reading (loop thread): bytes are gathered into frames (a big frame straight into a
    buffer of its final size, its HMAC computed as it arrives), verified, decoded and
    given to ``handler.on_messages(conn, msgs)`` there; a frame over BIG_FRAME, and
    every later one until the strand is idle again, is given on the connection's
    Strand instead, so the loop never waits on a big result and order is kept.

    Writing: ``send`` queues a message; everything queued packs into one frame.  A
    caller on another thread writes a small message's frame itself when the
    connection is idle (nothing queued, nothing left unwritten); otherwise, and on
    the loop thread, the loop flushes after the events at hand, so the replies to one
    frame leave in one; a message sent with ``hold`` may wait up to HOLD seconds for
    company.  Bytes the socket does not take at once are written when it is writable.
    ``handler.on_closed(conn, reason)`` is called exactly once.

    TLS works the same way: an ``SSLSocket`` in non-blocking mode raises
    ``SSLWantReadError``/``SSLWantWriteError`` where a plain one would block, and
    decrypted bytes waiting in it (``pending()``) are read before the loop selects again.
    """

    def __init__(self, channel, handler, name, loop, threads, received=b''):
        self.channel = channel
        self.handler = handler
        self.name = name
        self.peer_info = channel.peer_info
        self.sock = channel.sock
        self._loop = loop
        self._strand = Strand(threads)
        self._offload = getattr(handler, 'OFFLOAD', ())     # kinds handled off the loop
        self._tls = isinstance(self.sock, ssl.SSLSocket)
        self._lock = threading.Lock()       # outbox, flags, the channel's send state
        self._outbox = collections.deque()
        self._unsent = []                   # byte parts of frames the socket did not take
        self._flush_due = None              # None, 'held' (a timer flushes), 'soon'
        self._want_write = False
        self._closing = False               # no more sends; flush, then close
        self._closed = False
        self._close_reason = None
        self._last_send = time.monotonic()
        self._rbuf = bytearray(received)    # bytes read past the handshake
        self._big = None                    # (body buffer, bytes in, length, mac)
        self._ended = threading.Event()

    # -- life -------------------------------------------------------------------------------
    def start(self):
        self.sock.setblocking(False)
        self._loop.in_loop(self._register)
        return self

    def _register(self):
        if not self._closed:
            self._loop.selector.register(self.sock, selectors.EVENT_READ, self._on_ready)
            if self._tls and self.sock.pending():
                self._loop.call_soon(self._on_ready, selectors.EVENT_READ)
            elif self._rbuf:
                self._loop.call_soon(self._read, False)

    def wait_closed(self, timeout):
        return self._ended.wait(max(0.0, timeout))

    def close(self, reason='closed', flush=False):
        """Closes the connection; with ``flush`` after sending what is queued."""
        with self._lock:
            if self._closed or self._closing and flush:
                return
            self._close_reason = self._close_reason or reason
            self._closing = True
            pending = bool(self._outbox or self._unsent)
        if flush and pending:
            self._schedule_flush()
        else:
            self._loop.in_loop(self._fail, reason)

    # -- sending ----------------------------------------------------------------------------
    HOLD = 0.001        # seconds a held message may wait for others to share its frame
    HOLD_MAX = 256      # messages held at most

    def send(self, msg, size=None, hold=False):
        """Queues a message; ``size`` (by default its catalog bulk) guides batching.
        With ``hold`` (on the loop thread) it may wait up to HOLD seconds for more
        messages to share its frame: a node's results and job starts while other jobs
        of its client run.  Any send without ``hold`` flushes what is held."""
        if size is None:
            size = message_bulk(msg)
        on_loop = self._loop.on_loop()
        with self._lock:
            if self._closing or self._closed:
                return False
            self._outbox.append((msg, size))
            if self._unsent or self._flush_due == 'soon':
                return True     # a flush is on its way
            if self._flush_due == 'held':
                if hold and on_loop and len(self._outbox) < self.HOLD_MAX:
                    return True
                self._flush_due = action = 'soon'
            elif len(self._outbox) > 1:
                return True     # another thread's direct flush is under way: it takes this
            elif on_loop or size > BIG_FRAME:
                # a big message is framed (its HMAC) and written by the loop, while the
                # caller goes on (pickling the next job's arguments, say)
                self._flush_due = action = 'held' if hold and on_loop else 'soon'
            else:
                action = 'direct'
        if action == 'direct':
            self._flush()
        elif action == 'held':
            self._loop.call_later(self.HOLD, self._flush)
        else:
            self._loop.call_soon(self._flush)
        return True

    def send_alone(self, msg):
        """Queues ``msg`` and writes its frame now, so no later message shares it
        (the first message a Listener reads must come alone); on the loop thread."""
        with self._lock:
            self._outbox.append((msg, message_bulk(msg)))
        self._flush()

    def congested(self, limit):
        """Whether the peer does not keep up: more than ``limit`` bytes wait to be
        written (frames the socket has not taken, and the size hints of messages not
        framed yet), or more than HOLD_MAX messages.  For what may be dropped then
        (live output); looks at HOLD_MAX queued messages at most."""
        with self._lock:
            if len(self._outbox) > self.HOLD_MAX:
                return True
            waiting = sum(len(part) for part in self._unsent)
            return waiting + sum(size for _, size in self._outbox) > limit

    def _schedule_flush(self):
        with self._lock:
            if self._flush_due == 'soon':
                return
            self._flush_due = 'soon'
        self._loop.call_soon(self._flush)

    def _flush(self):
        """Packs what is queued into frames and writes what the socket takes."""
        try:
            with self._lock:
                self._flush_due = None
                if self._closed:
                    return
                while self._outbox and not self._unsent:
                    self._unsent = self._frames_of(self._take_batch())
                    if self._tls:       # one TLS record for the small parts, not one each
                        self._unsent = _coalesce(self._unsent)
                done = self._write_unsent()
                more = bool(self._outbox)
                finished = done and not more and self._closing
        except (OSError, ProtocolError, ValueError) as exc:
            self._loop.in_loop(self._fail, 'send failed: %s' % exc)
            return
        if finished:
            self._loop.in_loop(self._fail, self._close_reason or 'closed')
        elif not done:
            self._loop.in_loop(self._watch_writable, True)
        elif more:
            self._schedule_flush()

    def _write_unsent(self):
        """Writes queued parts without blocking; True when all are written."""
        parts = self._unsent
        while parts:
            try:
                if self._tls:
                    sent = self.sock.send(memoryview(parts[0])[:1 << 20])
                else:
                    sent = self.sock.sendmsg(parts[:512])
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError,
                    ssl.SSLWantReadError):
                return False
            self._last_send = time.monotonic()
            while sent and parts:
                first = parts[0]
                if sent >= len(first):
                    sent -= len(first)
                    parts.pop(0)
                else:
                    parts[0] = memoryview(first).cast('B')[sent:]
                    sent = 0
        return True

    def _watch_writable(self, on):
        if self._closed or on == self._want_write:
            return
        self._want_write = on
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        self._loop.selector.modify(self.sock, events, self._on_ready)

    # -- the loop's side ----------------------------------------------------------------
    def _on_ready(self, events):
        if events & selectors.EVENT_WRITE:
            self._watch_writable(False)
            self._flush()
        if events & selectors.EVENT_READ and not self._closed:
            self._read()

    def _read(self, receive=True):
        """One read per readiness event: what it brings is handled, and the replies
        flushed, before the loop reads again (from this socket or another).  Without
        ``receive``: only the frames already in the buffer."""
        try:
            if not receive:
                self._frames()
            elif self._read_big() and self._tls and self.sock.pending():
                self._loop.call_soon(self._on_ready, selectors.EVENT_READ)
        except AuthError as exc:
            logger.warning('%s: %s', self.name, exc)
            self._fail(str(exc))
        except (OSError, ProtocolError, EOFError, pickle.UnpicklingError) as exc:
            self._fail(str(exc) or exc.__class__.__name__)

    def _read_big(self, limit=64):
        """One read; more while a big frame is still arriving (nothing to answer
        before its end); False when the socket has nothing more for now."""
        for _ in range(limit):
            if not self._read_once():
                return False
            if self._big is None:
                return True
        return True

    def _read_once(self):
        """Reads what the socket has and handles every complete frame; False when
        the socket has nothing more for now."""
        big = self._big
        try:
            if big is not None:
                view = memoryview(big[0])
                got = self.sock.recv_into(view[big[1]:], min(len(view) - big[1], 1 << 22))
            else:
                data = self.sock.recv(262144)
                got = len(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            return False
        if not got:
            raise ProtocolError('connection closed by peer')
        self.channel.last_recv = time.monotonic()
        if big is not None:
            self._big_received(view, got)
        else:
            self._rbuf += data
        self._frames()
        return not self._closed

    def _big_received(self, view, got):
        buf, have, length, mac = self._big
        end = min(have + got, length)
        if end > have:
            mac.update(view[have:end])      # the HMAC keeps pace with the bytes
        have += got
        self._big = (buf, have, length, mac)
        if have == length + 32:
            self._big = None
            body = view[:length]
            self._deliver(self.channel.end_frame(mac, body, view[length:]), length)

    def _frames(self):
        buf = self._rbuf
        while len(buf) >= 4 and self._big is None and not self._closed:
            length, mac = self.channel.begin_frame(bytes(buf[:4]))
            if len(buf) < 4 + length + 32:
                if length > (1 << 20):     # a large frame: into one buffer of its size
                    body = bytearray(length + 32)
                    have = len(buf) - 4
                    body[:have] = buf[4:]
                    del buf[:]
                    self._big = (body, 0, length, mac)
                    self._big_received(memoryview(body), have)
                return
            with memoryview(buf) as view:
                body = memoryview(bytes(view[4:4 + length + 32]))
            del buf[:4 + length + 32]
            mac.update(body[:length])
            self._deliver(self.channel.end_frame(mac, body[:length], body[length:]), length)

    def _deliver(self, frame, length):
        msgs = loads_frame(*frame)
        if not isinstance(msgs, list):
            raise ProtocolError('malformed frame')
        offload = self._offload
        if length > BIG_FRAME or self._strand.busy or offload and any(
                isinstance(m, tuple) and m and m[0] in offload for m in msgs):
            self._strand.submit(self._handle, msgs)
        else:
            self._handle(msgs)

    def _handle(self, msgs):
        if self._closed:
            return
        try:
            self.handler.on_messages(self, msgs)
        except Exception:
            logger.exception('%s: error handling a message; closing the connection', self.name)
            self._loop.in_loop(self._fail, 'internal error')

    def _fail(self, reason):
        """Closes the socket and reports once (loop thread); the report comes after
        the messages already handed to the strand (which, the connection closed, are
        then dropped: a node sends every unacknowledged result again when its client
        reconnects)."""
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            self._outbox.clear()
            self._unsent = []
            reason = self._close_reason or reason
        try:
            self._loop.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.channel.close()
        self._ended.set()
        if self._strand.busy:
            self._strand.submit(self._report_closed, reason)
        else:
            self._report_closed(reason)

    def _report_closed(self, reason):
        try:
            self.handler.on_closed(self, reason)
        except Exception:
            logger.exception('%s: error in close handler', self.name)



# ================================================================================
# Node pool: dialing, liveness and discovery of a set of nodes
# ================================================================================

class NodeLink:
    """One node as a pool and its scheduler see it: its address and connection, what
    it said of itself, and (the scheduler's part) the jobs dispatched to it and the
    clusters set up there.

    Its life is a few transitions, each a method called by the pool (lock held)::

        NEW ─dial─► CONNECTING ─NODE─► READY ─connection lost─► RECONNECTING ─NODE─► READY
         ▲             │ failed          │ silent                 │ retries spent
         └─ backoff ───┘ (or closed      ▼                        ▼
                         before NODE)   DEAD ◄────────────────────┘  (dialed again later)
        BUSY: serving another client (dialed again every 2 s); ALIAS: another address
        of a node already connected (never dialed again)
    """

    NEW, CONNECTING, READY, RECONNECTING = 'new', 'connecting', 'ready', 'reconnecting'
    BUSY, ALIAS, DEAD = 'busy', 'alias', 'dead'

    def __init__(self, ip_addr, port):
        self.ip_addr = ip_addr
        self.port = port
        self.name = ''
        self.cpus = 0
        self.platform = ''
        self.instance = None      # changes when the node restarts
        self.avail_info = None
        self.conn = None
        self.connected_at = 0.0   # when conn was made (its NODE answer is due)
        self.state = NodeLink.NEW
        self.dialing = False      # a dial is under way
        self.retry = 0            # index in RECONNECT_DELAYS while reconnecting
        self.next_dial = 0.0
        self.lost_reason = None
        self.silent = False       # closed because no pulse came: dead at once
        self.busy_warned = False
        self.busy_with = ''       # what the node said of the client it serves instead
        self.seen_instance = None  # node instance its discovery answer named
        self.pulse_interval = None  # what the node was told when it connected
        # the scheduler's part
        self.jobs = {}            # job key -> DispyJob dispatched here
        self.setups = {}          # cluster key -> 'allocating'|'pending'|'ready'|'failed'
        self.in_flight = collections.Counter()   # cluster key -> jobs dispatched
        self.alloc_cpus = {}      # cluster key -> CPUs the cluster may use here
        self.service = {}         # cluster key -> mean seconds its jobs run here
        self.put_replies = {}     # (cluster key, file name) -> error or None (send_file)
        self.closing = {}         # cluster key -> re-setup after closing? (close_node)
        self.cancels = set()      # (key, attempt) cancelled: sent again after a reconnect
        self.acks = []            # (key, attempt) of results recorded, for the next ACK
        self.recalling = set()    # keys of jobs asked back (RECALL), not answered yet
        self.jumps = {}           # key recalled -> (JobQueue, the job to take its slot)
        self.paused = False       # the node said it takes no jobs now (SERVICE)

    def __repr__(self):
        return '<NodeLink %s:%s %s>' % (self.ip_addr, self.port, self.state)

    @property
    def ready(self):
        return self.state == NodeLink.READY

    # Jobs queued on a node beyond those running cover LEAD seconds of its work: the
    # round trip of its next job and the node's hold on results (LoopConnection.HOLD);
    # few for long jobs (a node that falls behind holds little that others could have
    # run), many for tiny ones (so every frame carries many results and jobs).
    LEAD = 0.003
    MAX_QUEUED_PER_CPU = 32

    def capacity(self, ckey):
        """Jobs of a cluster that may be in flight here: its CPUs plus those queued on
        the node, so that it never waits a round trip for its next job."""
        cpus = self.alloc_cpus.get(ckey, 0)
        if not cpus or self.paused:
            return 0
        service = self.service.get(ckey)
        if service is None:     # nothing measured yet
            return cpus + max(2, cpus)
        queued = math.ceil(cpus * self.LEAD / max(service, 1e-6))
        return cpus + max(1, min(queued, cpus * self.MAX_QUEUED_PER_CPU))

    def job_took(self, ckey, seconds):
        """A job of the cluster ran this long here (the node's clock): the mean the
        window follows, weighted to recent jobs."""
        old = self.service.get(ckey)
        self.service[ckey] = seconds if old is None else old + 0.25 * (seconds - old)

    shared = False      # dispyscheduler: the clusters share the node's window

    def shared_room(self):
        """Whether the node takes one more job of any cluster: always, unless the
        clusters share it (dispyscheduler), and then while the jobs in flight of all
        of them are fewer than the largest window of one."""
        if not self.shared:
            return True
        caps = [self.capacity(k) for k, state in self.setups.items() if state == 'ready']
        return sum(self.in_flight.values()) < max(caps, default=0)

    def takes_jobs(self, ckey):
        """Whether the cluster's jobs may be sent here now (room aside)."""
        return (self.conn is not None and self.state == NodeLink.READY and not self.paused
                and self.setups.get(ckey) == 'ready' and ckey not in self.closing)

    def send(self, msg):
        conn = self.conn
        return conn.send(msg) if conn is not None else False

    # -- transitions ----------------------------------------------------------------------
    def dial_started(self, port):
        self.port = port or self.port
        if self.state != NodeLink.RECONNECTING:
            self.state = NodeLink.CONNECTING
        self.dialing = True

    def dial_failed(self, now):
        """A dial of a node not connected before failed: try again, backing off."""
        self.dialing = False
        if self.state == NodeLink.CONNECTING:
            self.state = NodeLink.NEW
            self.retry = min(self.retry + 1, 6)
            self.next_dial = now + min(2 ** self.retry * 0.25, 10.0)

    def connected(self, conn, pulse_interval):
        self.dialing = False
        self.conn = conn
        self.connected_at = time.monotonic()
        self.pulse_interval = pulse_interval

    def answered(self, info):
        """The node's NODE message: it is ready (again); True if it restarted since."""
        restarted = self.instance is not None and self.instance != info.get('instance')
        self.instance = info.get('instance')
        self.name = info.get('name', '')
        self.cpus = int(info.get('cpus', 1))
        self.platform = info.get('platform', '')
        self.avail_info = _avail_info(info.get('avail'))
        self.paused = info.get('accepting', True) is False     # out of its service hours
        self.state = NodeLink.READY
        self.retry = 0
        self.busy_warned = False
        return restarted

    def turned_away(self, desc, now, redial_after=2.0):
        self.busy_with = desc
        self.state = NodeLink.BUSY
        self.next_dial = now + redial_after

    def aliased(self):
        self.state = NodeLink.ALIAS

    def went_silent(self):
        self.silent = True

    def connection_closed(self, now):
        """The connection ended: 'lost' (dead now), 'reconnect', or None (nothing to
        do: it is busy, an alias, or never became ready)."""
        self.conn = None
        if self.state in (NodeLink.BUSY, NodeLink.ALIAS):
            return None
        if self.silent:
            self.silent = False
            return 'lost'
        if self.state == NodeLink.READY or self.jobs:
            if self.state == NodeLink.READY:    # else: one more failed attempt
                self.retry = 0
            self.state = NodeLink.RECONNECTING
            return 'reconnect'
        self.state = NodeLink.NEW
        self.next_dial = now + 1.0
        return None

    def reconnect_failed(self, now):
        """One more reconnect attempt failed; True when they are all spent."""
        self.dialing = False
        self.retry += 1
        if self.retry > len(RECONNECT_DELAYS):
            self.retry = 0
            return True
        self.next_dial = now + RECONNECT_DELAYS[self.retry - 1]
        return False

    def lost(self, reason, redial_after):
        """Dead: its jobs were given back; it is dialed again after ``redial_after``."""
        self.state = NodeLink.DEAD
        self.lost_reason = reason
        self.instance = None
        self.next_dial = time.monotonic() + redial_after
        self.forget_work()

    def forget_work(self):
        """Its jobs and set-up clusters are gone (lost, or another client took it)."""
        self.jobs.clear()
        self.setups.clear()
        self.alloc_cpus.clear()
        self.service.clear()
        self.in_flight.clear()
        self.closing.clear()
        self.cancels.clear()
        self.recalling.clear()
        self.jumps.clear()
        self.put_replies.clear()


class NodePool:
    """Dials, watches and finds the nodes of one secret and TLS setting, and reports
    them to its owner (the scheduler) through these hooks::

        owner.wants_node(ip, name)            -> bool   a discovered node: dial it?
        owner.node_ready(link, restarted, info)          NODE received (lock held)
        owner.node_messages(link, conn, msgs)            any other message (no lock)
        owner.node_lost(link, reason)                    gone for good (lock held)
        owner.has_clusters()                  -> bool   worth warning when no node?

    A client program has one pool per (secret, TLS files) its clusters use;
    dispyscheduler has one towards its nodes.  Dials (TCP
    connect, TLS, handshake) and connections live on the I/O loop; so does ``tick``:
    pulses, liveness, re-dials, pings and the "no node answered" warning.  The lock
    is the owner's (``lock``): NodeLinks are shared state of both.
    """

    OFFLOAD = frozenset(('SEND_FILE',))    # frames with these are handled off the loop

    def __init__(self, owner, lock, secret, ssl_context, options, loop, threads, client,
                 sendto):
        self.owner = owner
        self.lock = lock
        self.secret = secret
        self.ssl_context = ssl_context
        self.max_frame = options['max_frame']
        self.pulse_interval = options['pulse_interval']
        self.ping_interval = options['ping_interval']
        self.node_port = options['node_port']
        self.ip_addrs = options['ip_addrs']
        self.loop = loop
        self.threads = threads
        self.client = client        # who we are: id, name, pid, udp_port
        self.sendto = sendto        # (data, (addr, port)) -> sends a datagram
        self.links = {}             # node address -> NodeLink
        self.targets = {}           # (address, port) named by a cluster's nodes
        self.broadcast = False      # some cluster has a pattern: ping by broadcast
        self.auth_failures = set()
        self.refused = set()        # nodes that failed the handshake (warned once)
        self.closed = False
        self.started = time.monotonic()
        self.next_ping = 0.0
        self.ping_backoff = 1.0
        self.next_warning = self.started + NO_NODE_WARN_AFTER

    # -- what to look for --------------------------------------------------------------------
    def add_allocations(self, allocs):
        """Dials the hosts named in ``allocs``; patterns make the pings broadcast."""
        with self.lock:
            for alloc in allocs:
                if alloc.ip_addr is None:
                    self.broadcast = True
                else:
                    other = [p for a, p in self.targets if a == alloc.ip_addr and p != alloc.port]
                    if other:
                        logger.warning('nodes: %s is named with ports %s and %s; a client uses '
                                       'one node per address (only %s): give each node (or '
                                       'ssh tunnel) an address of its own (127.0.0.2, ...)',
                                       alloc.ip_addr, other[0], alloc.port, other[0])
                    self.targets[(alloc.ip_addr, alloc.port)] = True
                    link = self.links.get(alloc.ip_addr)
                    if link is None or link.state in (NodeLink.NEW, NodeLink.DEAD):
                        self._dial(alloc.ip_addr, alloc.port)
            self.next_ping = 0.0

    def ready_links(self):
        return [link for link in self.links.values() if link.ready]

    def link(self, addr):
        return self.links.get(addr)

    # -- dialing -----------------------------------------------------------------------------
    def _dial(self, addr, port):
        """Starts a connection to a node (lock held)."""
        link = self.links.get(addr)
        if link is None:
            link = self.links[addr] = NodeLink(addr, port)
        if link.state in (NodeLink.CONNECTING, NodeLink.READY) or link.dialing or self.closed:
            return
        link.dial_started(port)
        self.loop.in_loop(self._start_dial, link)

    def _start_dial(self, link):
        timeout = MsgTimeout
        if link.state == NodeLink.RECONNECTING:
            timeout = min(timeout, max(1.0, 2 * self.pulse_interval))
        steps = handshake_steps(self.secret, True, {'role': 'client'}, self.max_frame)
        LoopDial(self.loop, link.ip_addr, link.port, self.ssl_context, steps, self.max_frame,
                 timeout, functools.partial(self._dialed, link),
                 functools.partial(self._dial_failed, link)).start()

    def _dialed(self, link, channel, extra):
        with self.lock:
            if self.closed:
                channel.close()
                return
            conn = LoopConnection(channel, self, link.ip_addr, self.loop, self.threads, extra)
            old = link.conn
            link.connected(conn, self.pulse_interval)
            if old is not None:             # never two connections to one node
                old.close('replaced by a new connection')
            conn.send(Msg.CLIENT(dict(self.client, pulse_interval=self.pulse_interval)))
            conn.start()

    def _dial_failed(self, link, exc):
        with self.lock:
            self._warn_dial_failure(link, exc)
            if link.state == NodeLink.RECONNECTING:
                self._reconnect_failed(link, 'reconnect failed: %s' % exc)
            else:
                link.dial_failed(time.monotonic())

    def _warn_dial_failure(self, link, exc):
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

    def _reconnect_failed(self, link, reason):
        if link.reconnect_failed(time.monotonic()):
            reason = link.lost_reason or reason
            logger.warning('node %s is lost: %s', link.ip_addr, reason)
            self._lose(link, reason, 2.0)

    def _lose(self, link, reason, redial_after):
        self.owner.node_lost(link, reason)
        link.lost(reason, redial_after)

    # -- a connection's messages and end (LoopConnection handler) ---------------------------
    def on_messages(self, conn, msgs):
        link = self.links.get(conn.name)
        if link is None or conn is not link.conn:
            return      # a connection already replaced
        first = msgs[0] if msgs and isinstance(msgs[0], tuple) and msgs[0] else None
        if first is not None and first[0] in ('NODE', 'BUSY'):
            with self.lock:
                if conn is not link.conn:
                    return
                if first[0] == 'BUSY':
                    self._node_busy(link, Msg.BUSY.read(first).serving)
                    return
                if not self._node_answered(link, Msg.NODE.read(first).info):
                    return
            msgs = msgs[1:]
        if msgs:
            self.owner.node_messages(link, conn, msgs)

    def _node_answered(self, link, info):
        instance = info.get('instance')
        for other in self.links.values():
            if (other is not link and instance and other.instance == instance
                    and other.state in (NodeLink.READY, NodeLink.RECONNECTING)):
                # The same node under a second address (two names, IPv4 and IPv6):
                # keep the first; never dial this one again.
                logger.info('node %s is %s under another address; using %s', link.ip_addr,
                            other.ip_addr, other.ip_addr)
                link.aliased()
                link.conn.close('same node as %s' % other.ip_addr)
                return False
        if link.state == NodeLink.RECONNECTING:
            logger.info('reconnected to node %s', link.ip_addr)
        self.auth_failures.discard(link.ip_addr)
        self.refused.discard(link.ip_addr)
        restarted = link.answered(info)
        self.owner.node_ready(link, restarted, info)
        return True

    def _node_busy(self, link, desc):
        not_serving = desc.startswith(NOT_SERVING)
        if not link.busy_warned and not_serving:
            logger.warning('node %s is not serving now (%s); it will be used once it is',
                           link.ip_addr, desc[len(NOT_SERVING):])
        elif not link.busy_warned:
            logger.warning('node %s is busy with another client: %s; it will be used as soon '
                           'as it is free', link.ip_addr, desc)
        link.busy_warned = True
        had_jobs = bool(link.jobs)
        # a node out of its service hours announces itself when it serves again: no need
        # to knock every 2 s meanwhile
        link.turned_away(desc, time.monotonic(), NOT_SERVING_REDIAL if not_serving else 2.0)
        if had_jobs:       # it restarted and another client took it: our jobs are gone
            self.owner.node_lost(link, 'node is not serving now (%s)' % desc[len(NOT_SERVING):]
                                 if not_serving else 'node serves another client now')
            link.forget_work()

    def on_closed(self, conn, reason):
        with self.lock:
            link = self.links.get(conn.name)
            if link is None or conn is not link.conn:
                return
            if self.closed:
                link.conn = None
                link.state = NodeLink.DEAD
                return
            what = link.connection_closed(time.monotonic())
            if what == 'lost':
                # Silent for 5 pulses already: dead now; dialed again later and used
                # again if it comes back.
                logger.warning('node %s is lost: %s', link.ip_addr, reason)
                self._lose(link, reason, self.pulse_interval)
            elif what == 'reconnect':
                logger.warning('connection to node %s lost (%s); reconnecting', link.ip_addr,
                               reason)
                link.lost_reason = reason
                self._reconnect_failed(link, reason)

    # -- discovery -----------------------------------------------------------------------------
    def datagram(self, msg, good, addr):
        """A discovery datagram that this pool's secret does (``good``) or does not
        authenticate (loop thread)."""
        if not good:
            if (msg.get('t') == 'nak' and addr[0] not in self.auth_failures
                    and len(self.auth_failures) < 1024):
                logger.warning('node %s answered but failed authentication: check that '
                               'it runs with the same secret', addr[0])
                self.auth_failures.add(addr[0])
            return
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
            if not self.owner.wants_node(ip, name):
                return
            # One node answers on each of its addresses (IPv4, IPv6 link-local, ...):
            # use the first address that reached it.
            if instance and any(l.ip_addr != ip and l.seen_instance == instance
                                and l.state not in (NodeLink.NEW, NodeLink.DEAD)
                                for l in self.links.values()):
                return
            link = self.links.get(ip)
            if link is not None and link.state in (NodeLink.CONNECTING, NodeLink.READY,
                                                   NodeLink.RECONNECTING):
                return
            if link is not None and link.state == NodeLink.BUSY and msg.get('busy'):
                return
            self._dial(ip, port)
            self.links[ip].seen_instance = instance

    # -- timers (loop thread) ------------------------------------------------------------------
    def tick(self, now):
        with self.lock:
            if self.closed:
                return
            if now >= self.next_ping:
                self._ping(now)
            for link in list(self.links.values()):
                self._tick_link(link, now)
            if now >= self.next_warning:
                self._warn_no_nodes(now)

    def _tick_link(self, link, now):
        if link.ready and link.conn is not None:
            if link.conn.idle_send >= self.pulse_interval:
                link.send(Msg.PULSE(time.time()))
            silent = now - link.conn.last_recv
            # the node pulses at the interval it was told when it connected
            if silent > DEAD_PULSES * max(self.pulse_interval, link.pulse_interval or 0):
                link.went_silent()
                link.conn.close('no message from node for %.1f s' % silent)
        elif link.dialing:
            return
        elif link.conn is not None:     # connected: the node's NODE (or BUSY) is due
            if not link.ready and now - link.connected_at > MsgTimeout:
                link.conn.close('no answer from node %.0f s after connecting' % MsgTimeout)
        elif link.state == NodeLink.RECONNECTING and now >= link.next_dial:
            self._dial(link.ip_addr, link.port)
        elif link.state in (NodeLink.NEW, NodeLink.BUSY, NodeLink.DEAD) and \
                now >= link.next_dial and ((link.ip_addr, link.port) in self.targets
                                           or link.state == NodeLink.BUSY):
            self._dial(link.ip_addr, link.port)

    def _ping(self, now):
        if self.ping_interval:
            self.next_ping = now + self.ping_interval
        else:   # no interval given: ping again (backing off) only while nothing answers
            ready = any(link.ready for link in self.links.values())
            self.next_ping = now + (self.ping_backoff if not ready else 3600)
            self.ping_backoff = min(self.ping_backoff * 2, 30.0)
        data = pack_datagram(self.secret, Datagram.ping(self.client['id'],
                                                        self.client['udp_port']))
        dests = list(self.targets)
        if self.broadcast:
            dests += [(bcast, self.node_port)
                      for bcast in broadcast_addresses(self.ip_addrs or None)]
            if any(':' in a and not is_loopback(a) for a in self.ip_addrs or ['::']):
                dests += multicast_destinations(self.node_port)
        for dest in dests:
            self.sendto(data, dest)

    def _warn_no_nodes(self, now):
        self.next_warning = now + max(NO_NODE_WARN_AFTER, (now - self.started))
        if any(link.ready for link in self.links.values()) or not self.owner.has_clusters():
            return
        busy = [l for l in self.links.values() if l.state == NodeLink.BUSY]
        if busy:    # the cause is known: say that first
            msg = ('waiting %.0f s for %d node(s) busy with another client: %s; each is used '
                   'as soon as it is free' % (now - self.started, len(busy), '; '.join(
                       '%s serves %s' % (l.ip_addr, l.busy_with) for l in busy)))
        else:
            where = ', '.join('%s:%s' % t for t in self.targets) or 'broadcast'
            msg = ('no dispy node has answered after %.0f s (looked for: %s). Check that '
                   'dispynode.py runs on the nodes, that the ports (client %s, node %s) are '
                   'open and that ip_addr/nodes are right'
                   % (now - self.started, where, self.client['udp_port'], self.node_port))
        if self.auth_failures:
            msg += ('; %d node(s) answered but failed authentication (secret mismatch?): %s'
                    % (len(self.auth_failures), ', '.join(sorted(self.auth_failures))))
        logger.warning(msg)

    # -- the end -------------------------------------------------------------------------------
    def close(self, grace=5.0, release=True):
        """Releases every node: RELEASE, then the connection closes once flushed.
        Without ``release`` the nodes keep what they run for us (a dispyscheduler
        that stops and starts again finds it)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            conns = [link.conn for link in self.links.values() if link.conn is not None]
        for conn in conns:
            if release:
                conn.send(Msg.RELEASE())
            conn.close('released' if release else 'client stopping', flush=True)
        deadline = time.monotonic() + grace
        for conn in conns:      # bounded: a node that takes nothing cannot hold us
            conn.wait_closed(deadline - time.monotonic())

# ================================================================================
# Scheduler: jobs ↔ nodes (hosted by JobCluster here, and by dispyscheduler.py)
# ================================================================================

class ClusterHooks:
    """What the Scheduler asks of each cluster it hosts, as hook methods in the manner
    of ``socketserver.BaseRequestHandler``: ``JobCluster`` implements them in a
    program; dispyscheduler's ``RemoteCluster`` forwards them to its program (a
    ``SharedJobCluster``).

    Attributes read: ``allocations`` (NodeAllocate list), ``reentrant`` (resubmit the
    jobs of a lost node), ``name``; ``key`` is set by ``Scheduler.add_cluster``.

    Called with the scheduler's lock held; they must not block or run user code:
        job_submitted(job), job_dispatched(job, link), job_changed(job, status),
        job_ended(job, link), node_changed(link, status), setup_failed(link, error)
    Called without the lock on a worker thread; they may block and run user code:
        allocate(alloc, link) -> CPUs for this cluster on the node (0: not used)
        computation(alloc)    -> (spec, [(file name, path)]) to set up on a node
        job_file(job, path, mode, offset, data, last)   a chunk of a file a job sent
    Called with the lock held, for clusters whose spec asks for live output:
        job_output(job, stream, text, dropped)   lines a running job printed

    ``monitor``: a web monitor's ``ClusterMonitor`` (dispyhttpd.py) or None; an
    implementation passes it the same events (lock held), so a cluster nobody watches
    pays one attribute test per event.  ``attach_monitor`` / ``detach_monitor`` change
    it under ``hooks_lock()``, the lock the scheduler holds while calling the hooks.
    """

    key = None
    allocations = ()
    reentrant = False
    name = ''
    monitor = None

    def is_closed(self):
        return False

    def hooks_lock(self):
        raise NotImplementedError

    def attach_monitor(self, make):
        """The cluster's monitor, made by ``make(cluster)`` (and told what the cluster
        knows: ``seed_monitor``) if it has none; one more server uses it."""
        with self.hooks_lock():
            if self.monitor is None:
                monitor = make(self)
                self.seed_monitor(monitor)
                self.monitor = monitor
            self.monitor.servers += 1
            return self.monitor

    def detach_monitor(self, monitor):
        with self.hooks_lock():
            monitor.servers -= 1
            if monitor.servers <= 0 and self.monitor is monitor:
                self.monitor = None

    def seed_monitor(self, monitor):
        """A new monitor learns what the cluster knows already (lock held)."""

    def job_submitted(self, job):
        pass

    def job_dispatched(self, job, link):
        pass

    def job_changed(self, job, status):
        pass

    def job_ended(self, job, link):
        pass

    def node_changed(self, link, status):
        pass

    def setup_failed(self, link, error):
        pass

    def allocate(self, alloc, link):
        return link.cpus

    def computation(self, alloc):
        raise NotImplementedError

    def job_file(self, job, path, mode, offset, data, last):
        pass

    def job_output(self, job, stream, text, dropped):
        pass


class JobQueue:
    """Jobs waiting for a slot, first in first out, until one has a priority: then
    higher priorities first and FIFO among equals.  The client's queues and the
    node's queue are JobQueues.

    A queue of jobs that never had a priority is a plain deque (no cost to anyone who
    does not use priorities); the first job with one turns it into a heap of
    ``(-priority, sequence, job)``, which turns back into a deque once it empties.
    ``appendleft`` puts a job first among those of its priority (a job given back by
    a node, or queued again)."""
    __slots__ = ('_fifo', '_heap', '_back', '_front', 'tried')

    def __init__(self):
        self._fifo = collections.deque()
        self._heap = None
        self._back = self._front = 0    # sequence numbers of the heap's last and first
        self.tried = None       # the owner's mark: the first job it last looked at

    @property
    def prioritized(self):
        return self._heap is not None

    def append(self, job, priority=0):
        if self._heap is None:
            if not priority:
                self._fifo.append(job)
                return
            self._to_heap()
        self._back += 1
        heapq.heappush(self._heap, (-priority, self._back, job))

    def appendleft(self, job, priority=0):
        if self._heap is None:
            if not priority:
                self._fifo.appendleft(job)
                return
            self._to_heap()
        self._front -= 1
        heapq.heappush(self._heap, (-priority, self._front, job))

    def _to_heap(self):
        # a sorted list is a heap: the deque's jobs keep their order, at priority 0
        self._heap = [(0, seq, job) for seq, job in enumerate(self._fifo)]
        self._back, self._front = len(self._heap), 0
        self._fifo.clear()

    def popleft(self):
        if self._heap is None:
            return self._fifo.popleft()
        job = heapq.heappop(self._heap)[2]
        if not self._heap:
            self._heap = None
        return job

    def first(self):
        """The job ``popleft`` would return (IndexError when empty)."""
        return self._fifo[0] if self._heap is None else self._heap[0][2]

    def first_priority(self):
        return 0 if self._heap is None else -self._heap[0][0]

    def remove(self, job):
        """Takes a job out (ValueError if it is not here)."""
        if self._heap is None:
            self._fifo.remove(job)
            return
        for i, entry in enumerate(self._heap):
            if entry[2] is job:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                if not self._heap:
                    self._heap = None
                return
        raise ValueError('job not queued')

    def __len__(self):
        return len(self._fifo) if self._heap is None else len(self._heap)

    def __bool__(self):
        return bool(self._fifo) if self._heap is None else True

    def __iter__(self):
        """The jobs, in no particular order once priorities are used."""
        if self._heap is None:
            return iter(self._fifo)
        return (entry[2] for entry in self._heap)


def job_priority(job):
    """A queued job's ``dispy_job_priority`` (0 when it has none)."""
    options = job._options
    return options.get('priority', 0) if options else 0


class _ClusterQueue:
    """A hosted cluster's jobs not yet on a node, and the nodes with room for them.

    ``free`` is a heap of (load, stamp, link): a link is pushed with its load (jobs in
    flight / capacity) whenever that changes and it has room, and only its latest
    entry counts; so finding the least-loaded node costs no more with 1,000 nodes than
    with one, and nothing at all while every node is full."""
    __slots__ = ('cluster', 'key', 'pending', 'pinned', 'free', 'stamps', 'slow',
                 'rebalanced', 'rebalance_due', 'served', 'blocked')

    def __init__(self, cluster, key):
        self.cluster = cluster
        self.key = key
        self.pending = JobQueue()
        self.pinned = {}            # node address -> JobQueue of jobs for submit_node
        self.free = []
        self.stamps = {}            # link -> stamp of its latest entry in ``free``
        self.slow = set()           # links where its jobs take LEAD or longer
        self.rebalanced = 0.0       # when _rebalance last looked
        self.rebalance_due = False  # a later look is planned
        self.served = 0             # when it last got a slot (dispyscheduler's fair policy)
        self.blocked = False        # no node has room for it now (in one dispatch)

    def put(self, job, first=False):
        """Queues a job here (its node's queue for submit_node), by its priority;
        ``first``: first among the jobs of its priority (given back, or lost)."""
        waiting = (self.pending if job._pin is None
                   else self.pinned.setdefault(job._pin, JobQueue()))
        (waiting.appendleft if first else waiting.append)(job, job_priority(job))

    def offer(self, link, stamp):
        """The link may have room now (lock held)."""
        cap = link.capacity(self.key)
        in_flight = link.in_flight[self.key]
        if in_flight < cap and link.takes_jobs(self.key) and link.shared_room():
            self.stamps[link] = stamp
            heapq.heappush(self.free, (in_flight / cap, stamp, link))
        if len(self.free) > 2 * len(self.stamps) + 64:
            self._compact()

    def _compact(self):
        """Only the latest entry of each link that may take jobs stays (a cluster
        never full leaves stale entries below its top)."""
        live = [e for e in self.free if self.stamps.get(e[2]) == e[1]
                and e[2].takes_jobs(self.key)]
        self.stamps = {e[2]: e[1] for e in live}
        heapq.heapify(live)
        self.free = live

    def least_loaded(self):
        """The ready link with room and the lowest load, or None."""
        free = self.free
        while free:
            _, stamp, link = free[0]
            if (self.stamps.get(link) == stamp and link.takes_jobs(self.key)
                    and link.in_flight[self.key] < link.capacity(self.key)
                    and link.shared_room()):
                return link
            heapq.heappop(free)
            if self.stamps.get(link) == stamp:
                del self.stamps[link]
        return None


class _NodeMessages:
    """The Scheduler's handling of what ready nodes send (a mixin of Scheduler: it
    uses the scheduler's ``lock`` and ``queues`` and its ``_end_job`` and
    ``_dispatch``).  Each handler gets the node's link, the message's record and its
    pickled blob already loaded, outside the lock: ``(object, None)`` or ``(None,
    error)``."""

    def node_messages(self, link, conn, msgs):
        """Messages of a ready node (loop thread, or the connection's strand for big
        frames): results are unpickled and files saved before the lock is taken."""
        records = []
        for msg in msgs:
            kind = TO_CLIENT.get(msg[0]) if isinstance(msg, tuple) and msg else None
            if kind is None:
                logger.warning('node %s sent an unknown message', link.ip_addr)
                continue
            record = kind.read(msg)
            if kind is Msg.SEND_FILE:
                self._save_file(link, record)
                continue
            records.append((kind.name, record, self.load_blob(record)))
        with self.lock:
            if conn is not link.conn:
                return      # a connection we already replaced
            for name, record, loaded in records:
                self.handlers[name](self, link, record, loaded)
            if link.acks:   # one ACK for every result of the frame, beside the next jobs
                link.send(Msg.ACK(link.acks))
                link.acks = []
            self._dispatch()

    def _save_file(self, link, msg):
        """A file a job sent with dispy_send_file: its cluster saves it (no lock)."""
        with self.lock:
            job = link.jobs.get(msg.key)
            if job is None or job._attempt != msg.attempt:
                return
        job._cluster.job_file(job, msg.path, msg.mode, msg.offset, msg.data, msg.last)

    def _on_setup(self, link, msg, _loaded):
        ckey, ok, error = msg
        queue = self.queues.get(ckey)
        if queue is None or link.setups.get(ckey) not in ('pending', 'ready'):
            return
        cluster = queue.cluster
        if not ok and link.setups[ckey] == 'ready':   # its host died: no more jobs there
            link.setups[ckey] = 'failed'
            logger.warning('computation %s failed on node %s: %s', cluster.name,
                           link.ip_addr, error)
            cluster.node_changed(link, DispyNode.Closed)
            return
        if link.setups[ckey] == 'ready':
            return
        if not ok:
            link.setups[ckey] = 'failed'
            logger.warning('setup of computation %s failed on node %s: %s', cluster.name,
                           link.ip_addr, error)
            cluster.setup_failed(link, error)
            return
        link.setups[ckey] = 'ready'
        self._room_changed(link, ckey)
        cluster.node_changed(link, DispyNode.Initialized)

    def _on_started(self, link, msg, _loaded):
        job = link.jobs.get(msg.key)
        if job is None or job._attempt != msg.attempt or job.status in FINAL_STATUSES:
            return
        job.status = DispyJob.Running
        job.start_time = msg.start_time
        job._cluster.job_changed(job, DispyJob.Running)

    def load_blob(self, msg):
        """What a handler gets for a message's blob (a hook: dispyscheduler passes
        blobs on to its clients unopened)."""
        return _load_blob(msg)

    def _on_result(self, link, msg, loaded):
        job = link.jobs.get(msg.key)
        if job is None or job._attempt != msg.attempt:
            self._unknown_result(link, msg, loaded)
            return
        del link.jobs[msg.key]
        cancelled = (msg.key, msg.attempt) in link.cancels     # its result crossed the CANCEL
        link.cancels.discard((msg.key, msg.attempt))
        ckey = job._cluster.key
        if msg.start_time and msg.end_time:
            self._job_took(link, ckey, max(0.0, msg.end_time - msg.start_time))
        self._slot_freed(link, ckey)
        status, exception = msg.status, msg.exception
        result, error = loaded
        if error is not None:
            status = DispyJob.Terminated
            exception = 'result could not be unpickled at the client: %s' % error
        job.start_time = msg.start_time or job.start_time
        if job.status == DispyJob.Created and msg.start_time:
            # its STARTED was folded into this frame (the node leaves it out)
            job.status = DispyJob.Running
            job._cluster.job_changed(job, DispyJob.Running)
        # a result that could not be unpickled would fail the same way again
        retry = status == DispyJob.Terminated and not cancelled and error is None
        if not retry or not self._retry(job, link, exception, msg):
            # Ended (and so written to the recover file) before the node may drop it.
            self._end_job(job, status, result, msg.stdout, msg.stderr, exception,
                          msg.end_time)
        self._result_recorded(link, job, msg)

    def _retry(self, job, link, exception, msg):
        """A job that failed on its node (raised, timed out, its process died) runs
        again if it has retries left (``dispy_job_retries``): queued behind the jobs of
        its priority waiting now, its failed run kept in ``job.attempts``.  Distinct from
        ``reentrant``, which reruns the jobs of a lost node.  True if it was queued."""
        options = job._options
        retries = options.get('retries', 0) if options else 0
        done = len(job._tries) if job._tries else 0
        queue = self.queues.get(job._cluster.key)
        if done >= retries or queue is None:
            return False
        failed = JobAttempt(link.ip_addr, DispyJob.Terminated, exception, msg.stdout,
                            msg.stderr, job.start_time, msg.end_time)
        job._tries = (job._tries or []) + [failed]
        logger.info('job %s failed on node %s; running it again (retry %d of %d)', job.id,
                    link.ip_addr, done + 1, retries)
        job.status = DispyJob.Created
        job._node = job.ip_addr = job.start_time = None
        queue.put(job)
        job._cluster.job_changed(job, DispyJob.Created)
        self._finish_close_node(link, job._cluster)     # it was the last one there?
        return True

    # Hooks of the result's acknowledgement (dispyscheduler acknowledges a result to the
    # node only once its client has it, and keeps results of jobs it does not know).
    def _result_recorded(self, link, job, msg):
        """The result is safe here: the node may drop it (sent with the next ACK)."""
        link.acks.append((msg.key, msg.attempt))

    def _unknown_result(self, link, msg, loaded):
        """A result of a stale attempt (the job was resubmitted): accounted for."""
        link.acks.append((msg.key, msg.attempt))

    def _on_recalled(self, link, msg, _loaded):
        """The node's answer to RECALL: a job it had not started is queued here
        again, first; one it has started runs on there.  Given back unasked: the node
        takes no jobs now (its SERVICE message is on its way, or lost with it)."""
        if msg.key not in link.recalling and msg.given:
            link.paused = True
            self._room_changed(link, None)
        link.recalling.discard(msg.key)
        job = link.jobs.get(msg.key)
        if msg.given and job is not None and job._attempt == msg.attempt:
            self._take_back(link, job)
        if link.jumps:
            self._jumped(link, msg.key)

    def _take_back(self, link, job):
        """A job the node no longer has, that never ran there: queued again."""
        del link.jobs[job._key]
        self._slot_freed(link, job._cluster.key)
        job._node = job.ip_addr = None
        queue = self.queues.get(job._cluster.key)
        if (job._key, job._attempt) in link.cancels or queue is None:
            link.cancels.discard((job._key, job._attempt))
            self._end_job(job, DispyJob.Cancelled, exception='Cancelled')
        elif job.status not in FINAL_STATUSES:
            queue.put(job, first=True)
        self._finish_close_node(link, job._cluster)     # it was the last one there?

    def _on_provisional(self, link, msg, loaded):
        job = link.jobs.get(msg.key)
        if job is None or job._attempt != msg.attempt or job.status in FINAL_STATUSES:
            return
        result, error = loaded
        if error is not None:
            logger.warning('provisional result of job %s could not be unpickled: %s',
                           msg.key, error)
            return
        if job.status == DispyJob.Created:      # its STARTED shares this frame, folded
            job.status = DispyJob.Running
            job._cluster.job_changed(job, DispyJob.Running)
        _provisional(job, result)

    def _on_output(self, link, msg, _loaded):
        """Live lines of a running job (its cluster's ``stream_output``)."""
        job = link.jobs.get(msg.key)
        if job is None or job._attempt != msg.attempt or job.status in FINAL_STATUSES:
            return
        try:
            checked_output(msg)
        except ValueError as exc:
            logger.warning('node %s: %s', link.ip_addr, exc)
            return
        job._cluster.job_output(job, msg.stream, msg.text, msg.dropped)

    def _on_closed_compute(self, link, msg, _loaded):
        pass        # the node confirms CLOSE_COMPUTE; nothing waits for it

    def _on_pulse(self, link, msg, _loaded):
        avail = _avail_info(msg.avail)
        if avail is not None:
            link.avail_info = avail
            for ckey, state in link.setups.items():
                queue = self.queues.get(ckey)
                if queue is not None and state == 'ready':
                    queue.cluster.node_changed(link, DispyNode.AvailInfo)

    def _on_service(self, link, msg, _loaded):
        """The node takes jobs again, or not (a service window, its operator); its
        CPUs may have changed: a cluster given all of them gets all the new ones."""
        paused = not msg.accepting
        if paused and not link.paused:
            logger.info('node %s takes no jobs now%s', link.ip_addr,
                        ': %s' % msg.why if msg.why else '')
        link.paused = paused
        cpus = int(msg.cpus or 0)
        if cpus > 0 and cpus != link.cpus:
            for ckey, used in list(link.alloc_cpus.items()):
                link.alloc_cpus[ckey] = cpus if used >= link.cpus else min(used, cpus)
            link.cpus = cpus
        self._room_changed(link)
        self._dispatch()

    def _on_put_file_done(self, link, msg, _loaded):
        link.put_replies[(msg.cluster, msg.name)] = msg.error
        self.cond.notify_all()

    def _on_unexpected(self, link, msg, _loaded):
        logger.warning('node %s sent an unexpected message', link.ip_addr)

    handlers = {'SETUP': _on_setup, 'STARTED': _on_started, 'RESULT': _on_result,
                'RECALLED': _on_recalled, 'SERVICE': _on_service,
                'PROVISIONAL': _on_provisional, 'CLOSED': _on_closed_compute,
                'PULSE': _on_pulse, 'PUT_FILE_DONE': _on_put_file_done,
                'OUTPUT': _on_output, 'NODE': _on_unexpected, 'BUSY': _on_unexpected}


class _NodeControl:
    """What a cluster's methods do to one node through the Scheduler (a mixin of
    Scheduler: it uses the scheduler's ``lock``, ``cond``, ``pool`` and ``queues``):
    CPUs, deallocation, closing or setting up again, files, traffic figures."""

    def _link_of(self, cluster, addr, state=None):
        link = self.pool.links.get(addr)
        if link is None or cluster.key not in link.setups:
            return None
        if state is not None and link.setups[cluster.key] != state:
            return None
        return link

    def deallocate(self, cluster, addr):
        """Sends no more of the cluster's jobs to the node (running ones finish)."""
        with self.lock:
            link = self._link_of(cluster, addr)
            if link is None:
                return -1
            link.alloc_cpus[cluster.key] = 0
            return 0

    def set_node_cpus(self, cluster, addr, cpus):
        """CPUs the cluster uses on a node (negative: leave that many free); returns
        the CPUs now used, or -1."""
        with self.lock:
            link = self._link_of(cluster, addr, 'ready')
            if link is None:
                return -1
            cpus = int(cpus)
            cpus = max(0, link.cpus + cpus) if cpus < 0 else min(cpus, link.cpus)
            link.alloc_cpus[cluster.key] = cpus
            link.send(Msg.SET_CPUS(cluster.key, cpus))
            self._room_changed(link, cluster.key)
            self._dispatch()
            return cpus

    def node_jobs(self, cluster, addr):
        """The cluster's jobs running on a node."""
        with self.lock:
            link = self.pool.links.get(addr)
            if link is None:
                return []
            return [j for j in link.jobs.values()
                    if j._cluster is cluster and j.status == DispyJob.Running]

    def close_node(self, cluster, addr, terminate, resetup=False):
        """Stops sending the cluster's jobs to a node; once none is in flight there the
        node closes the computation (and sets it up again if ``resetup``)."""
        with self.lock:
            link = self._link_of(cluster, addr)
            if link is None:
                return -1
            ckey = cluster.key
            link.closing[ckey] = resetup
            link.alloc_cpus[ckey] = 0 if not resetup else link.alloc_cpus.get(ckey, 0)
            if terminate:
                for job in [j for j in link.jobs.values() if j._cluster is cluster]:
                    link.send(Msg.CANCEL(job._key, job._attempt))
            self._finish_close_node(link, cluster)
            return 0

    def _finish_close_node(self, link, cluster):
        ckey = cluster.key
        if link.in_flight[ckey] > 0 or ckey not in link.closing:
            return
        resetup = link.closing.pop(ckey)
        state = link.setups.pop(ckey, None)
        link.alloc_cpus.pop(ckey, None)
        if state in ('pending', 'ready'):
            link.send(Msg.CLOSE_COMPUTE(ckey))
        if state == 'ready' and not resetup:
            cluster.node_changed(link, DispyNode.Closed)
        queue = self.queues.get(ckey)
        if resetup and link.ready and queue is not None:
            self._offer(link, queue)

    def send_file(self, cluster, addr, path, timeout):
        """Copies a file into the cluster's folder on a node; 0, or -1 (logged)."""
        name = os.path.basename(path)
        with self.lock:
            link = self._link_of(cluster, addr, 'ready')
            if link is None:
                logger.error('send_file: node %s is not set up for this cluster', addr)
                return -1
            link.put_replies.pop((cluster.key, name), None)
        try:
            send_file_chunks(link.send, Msg.PUT_FILE, cluster.key, name, path)
        except OSError as exc:
            logger.error('send_file: %s', exc)
            return -1
        with self.lock:
            if not self.cond.wait_for(lambda: (cluster.key, name) in link.put_replies,
                                      timeout):
                return -1
            error = link.put_replies.pop((cluster.key, name))
        if error:
            logger.error('send_file: node %s refused %s: %s', link.ip_addr, name, error)
            return -1
        return 0

    def shutdown_nodes(self, cluster):
        """Asks the nodes set up for a cluster to stop after this client (SHUTDOWN)."""
        with self.lock:
            for link in self.pool.links.values():
                if cluster.key in link.setups:
                    link.send(Msg.SHUTDOWN())

    def traffic(self, addr):
        """(bytes sent, bytes received) on the connection to a node now."""
        with self.lock:
            link = self.pool.links.get(addr)
            if link is None or link.conn is None:
                return 0, 0
            return link.conn.channel.bytes_sent, link.conn.channel.bytes_received


class Scheduler(_NodeMessages, _NodeControl):
    """Places the jobs of every hosted cluster on the least-loaded node that has the
    cluster's computation set up, and follows each job to its end.

    Hosts: a client program's ``ClientHub`` (one scheduler per node pool), and
    dispyscheduler.py (its ``SharedScheduler`` subclass).  Cluster and job keys come
    from the counters it is given (or from the cluster and job, when they bring
    their own: dispyscheduler's), so they are unique among every cluster it hosts.

    One lock, ``self.lock`` (reentrant), guards the scheduler, its node pool's links
    and every job's state; ``self.cond`` shares it: the user waiting for a job and the
    reply that ends it see one state.  Outside it run: unpickling results, saving files
    jobs send, ``allocate()``, reading a computation's files (see ClusterHooks).
    """

    def __init__(self, threads, cluster_keys=None, job_keys=None):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.threads = threads
        self.pool = None            # NodePool, given by the host (attach_pool)
        self.queues = {}            # cluster key -> _ClusterQueue
        self._cluster_keys = cluster_keys or itertools.count(1)
        self._job_keys = job_keys or itertools.count(1)
        self._stamps = itertools.count()
        # allocate() and shipping computations: four nodes at a time, so many nodes
        # found at once take four threads, not the pool (allocate() should be quick)
        self._setups = Strand(threads, width=4)

    def _room_changed(self, link, ckey=None):
        """A link's load or capacity changed (for one cluster, or all): it is offered
        again to the clusters' queues (lock held)."""
        keys = (ckey,) if ckey is not None else list(link.setups)
        for key in keys:
            queue = self.queues.get(key)
            if queue is not None:   # newest first among equals: the node that just sent
                queue.offer(link, -next(self._stamps))  # a result gets the next job with its ACK

    def attach_pool(self, pool):
        self.pool = pool

    # -- clusters ------------------------------------------------------------------------
    def add_cluster(self, cluster):
        """Hosts a cluster: gives it its key and offers it every matching node."""
        with self.lock:
            if cluster.key is None:     # dispyscheduler gives a returning cluster its own
                cluster.key = next(self._cluster_keys)
            self.queues[cluster.key] = _ClusterQueue(cluster, cluster.key)
        self.add_allocations(cluster, cluster.allocations)
        return cluster.key

    def add_allocations(self, cluster, allocs):
        """More nodes for a cluster (already in ``cluster.allocations``)."""
        self.pool.add_allocations(allocs)
        with self.lock:
            queue = self.queues.get(cluster.key)
            for link in self.pool.ready_links():
                if queue is not None and cluster.key not in link.setups:
                    self._offer(link, queue)

    def remove_cluster(self, cluster):
        """Closes the cluster's computation on every node (they run cleanup)."""
        with self.lock:
            self.queues.pop(cluster.key, None)
            for link in self.pool.links.values():
                state = link.setups.pop(cluster.key, None)
                link.alloc_cpus.pop(cluster.key, None)
                if state in ('pending', 'ready'):
                    link.send(Msg.CLOSE_COMPUTE(cluster.key))

    def has_clusters(self):
        return bool(self.queues)

    def close(self, release=True):
        """Releases the nodes (the host's last cluster of this pool closed)."""
        self.pool.close(release=release)

    # -- jobs ------------------------------------------------------------------------------
    def submit(self, job):
        """Queues a job (its key is given here); returns it."""
        with self.lock:
            queue = self.queues[job._cluster.key]
            if job._key is None:
                job._key = next(self._job_keys)
            if job._id is None:
                job._id = job._key
            queue.put(job)
            job._cluster.job_submitted(job)
            self._dispatch()
        return job

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

    def open_jobs(self, cluster):
        """The cluster's jobs not ended: queued here or on nodes."""
        with self.lock:
            queue = self.queues.get(cluster.key)
            jobs = []
            if queue is not None:
                jobs = [j for j in queue.pending if j.status not in FINAL_STATUSES]
                for pinned in queue.pinned.values():
                    jobs.extend(pinned)
            for link in self.pool.links.values():
                jobs.extend(j for j in link.jobs.values() if j._cluster is cluster)
            return jobs

    def jobs_on_nodes(self, cluster):
        with self.lock:
            return sum(1 for link in self.pool.links.values() for job in link.jobs.values()
                       if job._cluster is cluster)

    def abort(self, cluster, reason, grace=5.0):
        """Cancels every open job of a cluster; nodes that do not confirm within
        ``grace`` seconds cannot hold it up: those jobs end here."""
        with self.lock:
            jobs = self.open_jobs(cluster)
            for job in jobs:
                self.cancel(job, reason)
            self.cond.wait_for(lambda: all(j.status in FINAL_STATUSES for j in jobs), grace)
            for job in jobs:
                self._end_job(job, DispyJob.Cancelled, exception=reason)

    def _dispatch(self):
        """Fills free job slots, least-loaded node first (lock held).  Costs nothing
        per node: only links whose room changed are looked at (_ClusterQueue.free)."""
        queues = self.queues.values()
        for queue in queues:
            if queue.pinned:
                self._dispatch_pinned(queue)
        self._fill(queues)
        for queue in queues:
            if not queue.pending and queue.slow:
                self._rebalance(queue)
            elif queue.pending.prioritized or queue.pinned:
                self._jump_queues(queue)

    def _fill(self, queues):
        """Sends queued jobs to nodes with room, each cluster's in turn (a hook:
        dispyscheduler picks the cluster of each job by its policy)."""
        for queue in queues:
            while queue.pending:
                link = queue.least_loaded()
                if link is None:
                    break
                self._send_job(link, queue.pending.popleft())

    def _job_took(self, link, ckey, seconds):
        link.job_took(ckey, seconds)
        queue = self.queues.get(ckey)
        if queue is not None:
            if link.service[ckey] >= NodeLink.LEAD:
                queue.slow.add(link)
            else:
                queue.slow.discard(link)

    def _rebalance_later(self, queue):
        with self.lock:
            queue.rebalance_due = False
            if self.queues.get(queue.key) is queue:
                self._dispatch()

    @staticmethod
    def _finish_estimate(link, ckey, place, service=None):
        """When the job ``place``-th in line on a link (its running ones first) would
        end, in seconds from now: a coarse estimate from its mean job time (or
        ``service``, for a node that has run none yet)."""
        cpus = max(1, link.alloc_cpus.get(ckey, 1))
        return math.ceil(place / cpus) * link.service.get(ckey, service or 0.0)

    def _rebalance(self, queue):
        """The cluster has nothing queued here and a node has room: a job still waiting
        on another node (slow, or with much queued) that this one would finish clearly
        sooner is asked back (RECALL); the node gives it back unless it has started it
        (RECALLED), and it is sent here.  Only nodes whose jobs take LEAD or longer
        are looked at: tiny jobs gain nothing from moving."""
        ckey = queue.key
        now = time.monotonic()
        if now < queue.rebalanced + NodeLink.LEAD:
            # at most once per LEAD (it looks at every job on the slow nodes); and
            # once more after it, as no frame may come to call it before long
            if not queue.rebalance_due:
                queue.rebalance_due = True
                loop = self.pool.loop
                loop.call_soon(loop.call_later, NodeLink.LEAD, self._rebalance_later, queue)
            return
        queue.rebalanced = now
        idle = queue.least_loaded()
        if idle is None:
            return
        best = None
        for link in list(queue.slow):
            if not link.takes_jobs(ckey):
                queue.slow.discard(link)
                continue
            if link is idle:
                continue
            mine = [j for j in link.jobs.values() if j._cluster is queue.cluster]
            running = sum(1 for j in mine if j.status == DispyJob.Running)
            asked = sum(1 for j in mine if j._key in link.recalling)
            waiting = [j for j in mine if j.status == DispyJob.Created and j._pin is None
                       and j._key not in link.recalling]
            if not waiting:
                continue
            there = self._finish_estimate(link, ckey, running + asked + len(waiting))
            # a node that has run none of its jobs yet: as fast as this one, say
            here = self._finish_estimate(idle, ckey, idle.in_flight[ckey] + 1,
                                         link.service[ckey])
            if there > here + NodeLink.LEAD and (best is None or there > best[0]):
                best = (there, link, max(waiting, key=lambda j: j._key))
        if best is not None:
            _, link, job = best
            link.recalling.add(job._key)
            link.send(Msg.RECALL(job._key, job._attempt))

    def _jump_queues(self, queue):
        """Jobs queued here with priorities take the places of lower ones waiting on
        the nodes (``_jump``): the cluster's queue on any node, a submit_node queue
        on its node."""
        if queue.pending.prioritized:
            self._jump(queue.pending, queue.cluster, self.pool.links.values())
        for addr, pinned in queue.pinned.items():
            link = self.pool.links.get(addr)
            if pinned.prioritized and link is not None:
                self._jump(pinned, queue.cluster, (link,))

    def _jump(self, waiting, cluster, links):
        """Every node is full and the first job of ``waiting`` outranks a job of the
        cluster that waits on one of ``links``, sent but not started: that one is
        asked back (RECALL), and the first job takes its slot when the node gives it
        back (``_on_recalled`` → ``_jumped``); a job the node has started meanwhile
        runs on.  Looked for once per first job (a scan of the jobs on the nodes), so
        a first job that cannot jump costs nothing more."""
        top = waiting.first()
        if top is waiting.tried or top.status in FINAL_STATUSES:    # (cancelled queued)
            return
        waiting.tried = top
        rank = waiting.first_priority()
        best = None
        for link in links:
            for job in link.jobs.values():
                if (job._cluster is cluster and job.status == DispyJob.Created
                        and job._key not in link.recalling):
                    prio = job_priority(job)
                    if prio < rank and (best is None or (prio, -job._key) < best[:2]):
                        best = (prio, -job._key, link, job)
        if best is not None:
            _, _, link, job = best
            link.recalling.add(job._key)
            link.jumps[job._key] = (waiting, top)
            link.send(Msg.RECALL(job._key, job._attempt))

    def _jumped(self, link, key):
        """The node answered a RECALL: if it was asked for a job that jumps the queue
        (``_jump``) and that job is still first, it goes in the slot given back (before
        any other job, of any cluster, can take it)."""
        waiting, top = link.jumps.pop(key, (None, None))
        if (top is not None and waiting and waiting.first() is top
                and top.status not in FINAL_STATUSES and link.takes_jobs(top._cluster.key)
                and link.in_flight[top._cluster.key] < link.capacity(top._cluster.key)):
            waiting.popleft()
            self._send_job(link, top)

    def _dispatch_pinned(self, queue):
        """Jobs of submit_node, each to its node when that has room."""
        ckey = queue.key
        for addr, pinned in list(queue.pinned.items()):
            link = self.pool.links.get(addr)
            while (pinned and link is not None and link.takes_jobs(ckey)
                   and link.in_flight[ckey] < link.capacity(ckey) and link.shared_room()):
                self._send_job(link, pinned.popleft())
            if not pinned:
                del queue.pinned[addr]

    def _send_job(self, link, job):
        if job.status in FINAL_STATUSES:    # cancelled while queued
            return
        limit = link.conn.channel.peer_max_frame - 65536 if link.conn is not None else None
        if limit is not None and blob_size(job._blob) > limit:
            self._end_job(job, DispyJob.Terminated, exception=(
                'arguments of %d bytes exceed node %s\'s frame limit of %d bytes '
                '(dispynode --max_frame_size)' % (blob_size(job._blob), link.ip_addr,
                                                   limit + 65536)))
            return
        job._attempt += 1
        job._node = link
        job.ip_addr = link.ip_addr
        ckey = job._cluster.key
        link.jobs[job._key] = job
        link.in_flight[ckey] += 1
        self._room_changed(link, ckey)
        job._cluster.job_dispatched(job, link)
        link.send(Msg.JOB(job._key, ckey, job._attempt, job._blob, job._options))

    def _slot_freed(self, link, ckey):
        link.in_flight[ckey] -= 1
        self._room_changed(link, ckey)

    def _end_job(self, job, status, result=None, stdout=None, stderr=None, exception=None,
                 end_time=None):
        """The one place where a job ends (exactly once)."""
        if job.status in FINAL_STATUSES:
            return
        job._ended(status, result, stdout, stderr, exception, end_time)
        link, job._node = job._node, None
        if link is not None and link.jobs.get(job._key) is job:
            del link.jobs[job._key]
            self._slot_freed(link, job._cluster.key)
        job._cluster.job_ended(job, link)
        if link is not None and job._cluster.key in link.closing:
            self._finish_close_node(link, job._cluster)

    # -- setting clusters up on nodes -----------------------------------------------------
    def _offer(self, link, queue):
        """Offers a node to a cluster whose ``nodes`` select it (lock held): its
        ``allocate()`` decides, on a worker thread, how many CPUs it takes."""
        for alloc in queue.cluster.allocations:
            if alloc.matches(link.ip_addr, link.name):
                break
        else:
            return
        link.setups[queue.key] = 'allocating'
        self._setups.submit(self._allocate_and_set_up, link, queue, alloc, link.instance)

    def _allocate_and_set_up(self, link, queue, alloc, instance):
        cluster = queue.cluster
        try:
            cpus = cluster.allocate(alloc, link)
        except Exception:
            logger.exception('allocate() of %r failed for node %s', alloc, link.ip_addr)
            cpus = 0
        cpus = min(int(cpus or 0), link.cpus)
        spec = files = error = None
        if cpus > 0:
            try:
                spec, files = cluster.computation(alloc)
            except (ComputationError, OSError) as exc:
                error = exc
        with self.lock:
            if (link.setups.get(queue.key) != 'allocating' or link.instance != instance
                    or self.queues.get(queue.key) is not queue):
                return      # the node went, restarted, or the cluster closed meanwhile
            if cpus <= 0:
                del link.setups[queue.key]
                return
            if error is not None:
                logger.error('cannot set up %s on node %s: %s', cluster.name, link.ip_addr,
                             error)
                link.setups[queue.key] = 'failed'
                return
            link.setups[queue.key] = 'pending'
            link.alloc_cpus[queue.key] = cpus
            conn = link.conn    # the files follow on this connection, or not at all
            link.send(Msg.COMPUTE(queue.key, dict(spec, key=queue.key, cpus=cpus)))
        try:    # queued on the connection; the node runs setup after the last file
            for name, path in files:
                if conn is None or not send_file_chunks(conn.send, Msg.FILE, queue.key,
                                                        name, path):
                    return      # connection lost: offered again after the reconnect
        except OSError as exc:
            logger.error('cannot send %s to node %s: %s', exc.filename, link.ip_addr, exc)
            with self.lock:
                link.setups[queue.key] = 'failed'

    # -- node events (NodePool hooks) -------------------------------------------------------
    def wants_node(self, ip, name):
        return any(alloc.matches(ip, name) for queue in self.queues.values()
                   for alloc in queue.cluster.allocations)

    def node_ready(self, link, restarted, info):
        """A node answered: first time, or again after a dropped connection (lock held)."""
        held = {tuple(x) for x in info.get('jobs', ())}
        for job in [j for j in link.jobs.values() if j._key in link.recalling]:
            if not restarted and (job._key, job._attempt) not in held:
                self._take_back(link, job)      # given back; the answer was lost
        link.recalling.clear()
        link.jumps.clear()
        lost = [j for j in link.jobs.values() if (j._key, j._attempt) not in held]
        if restarted:       # running jobs died with it; kept results come again
            self._lose_jobs(link, lost, 'node restarted')
            link.setups.clear()
            link.alloc_cpus.clear()
            link.closing.clear()
            link.cancels.clear()
        else:   # jobs and computations the node no longer has are lost
            self._lose_jobs(link, lost, 'node lost the job')
            self._resync(link, held, set(info.get('computations', ())))
        for queue in list(self.queues.values()):
            if queue.key not in link.setups:
                self._offer(link, queue)
        self._room_changed(link)
        self._dispatch()

    def _resync(self, link, held, kept):
        """After a reconnect: cancels attempts superseded while the node was away (or
        cancelled while cut off); forgets computations it no longer has, and those
        still being set up: files of theirs may have been lost with the connection, so
        they are offered again (the node answers one it has ready, or starts over)."""
        for key, attempt in held:
            job = link.jobs.get(key)
            if job is None and (key, attempt) not in link.cancels:
                self._unknown_job(link, key, attempt)
            elif job is None or job._attempt != attempt or (key, attempt) in link.cancels:
                link.send(Msg.CANCEL(key, attempt))
        for ckey in [k for k, state in link.setups.items()
                     if state == 'pending' or (k not in kept and state != 'allocating')]:
            del link.setups[ckey]
            link.alloc_cpus.pop(ckey, None)

    def _unknown_job(self, link, key, attempt):
        """The node holds a job this scheduler does not know (a hook): cancelled."""
        link.send(Msg.CANCEL(key, attempt))

    def node_lost(self, link, reason):
        """The node is gone for good: its jobs are resubmitted or cancelled (lock
        held; the pool then clears the link)."""
        self._lose_jobs(link, list(link.jobs.values()), reason)
        for ckey, state in list(link.setups.items()):
            queue = self.queues.get(ckey)
            if queue is not None and state == 'ready':
                queue.cluster.node_changed(link, DispyNode.Closed)
        link.setups.clear()
        self._dispatch()

    def _lose_jobs(self, link, jobs, reason):
        for job in sorted(jobs):
            if link.jobs.get(job._key) is job:
                del link.jobs[job._key]
                self._slot_freed(link, job._cluster.key)
            job._node = None
            cluster = job._cluster
            queue = self.queues.get(cluster.key)
            if (cluster.reentrant and queue is not None and job._pin is None
                    and job.status not in FINAL_STATUSES):
                logger.info('job %s: node %s lost (%s); resubmitting', job._key, link.ip_addr,
                            reason)
                job.status = DispyJob.Created
                job.ip_addr = None
                queue.put(job, first=True)      # (never a submit_node job: see above)
                cluster.job_changed(job, DispyJob.Created)
            else:
                self._end_job(job, DispyJob.Cancelled,
                              exception='Cancelled: node %s lost (%s)' % (link.ip_addr, reason))


def _provisional(job, result):
    """A running job's provisional result, reported as its own status (lock held)."""
    job.result = result
    job.status = DispyJob.ProvisionalResult
    job._cluster.job_changed(job, DispyJob.ProvisionalResult)
    job.status = DispyJob.Running


def _load_blob(msg):
    """(object, None) or (None, error text) for a message's pickled ``blob``; (None,
    None) for a message without one.  User classes may run code as they load: never
    under the scheduler's lock."""
    blob = getattr(msg, 'blob', None)
    if blob is None:
        return None, None
    try:
        return loads_blob(blob), None
    except Exception as exc:
        return None, repr(exc)


def _avail_info(data):
    if not data:
        return None
    try:
        return DispyNodeAvailInfo(*data)
    except TypeError:
        return None


def send_file_chunks(send, kind, ckey, name, path, chunk=1 << 20):
    """Sends a file as ``kind(ckey, name, mode, offset, data, last)`` messages; True
    when every chunk was queued (``send`` returns False once its connection closed)."""
    mode = os.stat(path).st_mode & 0o777
    with open(path, 'rb') as f:
        offset = 0
        while True:
            data = f.read(chunk)
            last = len(data) < chunk
            if send(kind(ckey, name, mode, offset, data, last)) is False:
                return False
            offset += len(data)
            if last:
                return True

# ================================================================================
# Client hub: one per process — the loop, the port, a pool and scheduler per secret
# ================================================================================

class ClientHub:
    """What a client process shares among its clusters: the I/O loop thread (the
    hub), the worker threads, the client's UDP port and identity; and one
    ``Scheduler`` with its ``NodePool`` per (secret, TLS files) its clusters use, so
    clusters with different secrets or certificates each reach their own nodes.

    The loop serves the UDP socket(s) (a ``DiscoveryEndpoint``): a datagram is offered
    to every pool, each checking it with its own secret; each pool sends its own pings.  Cluster and job
    keys are process-wide, so a job's default ``id`` is unique in the program.
    """

    _current = None
    _current_lock = threading.Lock()

    @classmethod
    def acquire(cls, options):
        """The process's hub, created on first use; clusters share its address and
        port (the nodes know a client by them)."""
        with cls._current_lock:
            hub = cls._current
            if hub is not None and not hub.closed:
                if hub.discovery is None:   # no node pool yet (SharedJobClusters only)
                    return hub
                for name in ('ip_addrs', 'port'):
                    if options[name] != hub.options[name] and options.get('explicit_' + name):
                        raise ValueError('all clusters of one program share one client '
                                         'address and port: %s=%r differs from %r'
                                         % (name, options[name], hub.options[name]))
                return hub
            hub = cls._current = ClientHub(options)
            return hub

    def __init__(self, options):
        self.options = options
        self.client_id = uuid.uuid4().hex
        self.discovery = None       # the UDP port: bound with the first node pool
        self.port = None
        self.client = {'id': self.client_id, 'name': socket.gethostname(),
                       'pid': os.getpid(), 'udp_port': None}
        self.threads = WorkerThreads(POOL_THREADS, 'dispy-worker')
        self.lock = threading.Lock()        # pools, clusters, notifiers (leaf lock)
        self.schedulers = {}        # (secret, certfile, keyfile, cafile) -> Scheduler
        self.notifiers = {}         # Scheduler -> _Notifier
        self.clusters = []
        self.keys = (itertools.count(1), itertools.count(1))   # cluster, job keys
        self.closed = False
        self.loop = IOLoop('dispy-hub')
        self.thread = self.loop.thread
        self.loop.add_ticker(self._tick)
        if options.get('port') is not None:     # a program's clusters reach nodes
            try:
                self._bind_discovery(options)
            except OSError:
                self.closed = True      # never handed out (acquire holds its lock)
                self.loop.stop()
                raise

    def _bind_discovery(self, options):
        """The client's UDP port (a SharedJobCluster needs none: it only dials its
        scheduler, so it can run beside a dispyscheduler on 51347)."""
        self.discovery = self._bind_udp(options['ip_addrs'], options['port'],
                                        options.get('explicit_port')
                                        or bool(options.get('ext_ip_addrs')))
        self.options = options
        self.port = self.client['udp_port'] = self.discovery.port
        self.loop.call_soon(self._register_udp)

    def _bind_udp(self, ip_addrs, port, exclusive=True):
        """The client's UDP sockets.  ``exclusive`` (a port given, or NAT): pings
        leave from ``port`` and answers come to it, as a forwarded port needs.
        Otherwise pings leave from a port of this program's own (any free one) and
        the broadcasts nodes send to ``port`` when they start are heard on sockets
        that share it (SO_REUSEADDR): a dispyscheduler and client programs on one
        host all hear them, and each gets its own answers."""
        endpoint = _HubDiscovery(self)
        shared, port = (None, port) if exclusive or not port else (port, 0)
        try:
            for addr in ip_addrs or ['']:
                endpoint.bind(addr, port)
                port = endpoint.port        # port=0: the others take the same one
            for addr in (ip_addrs or ['']) if shared else ():
                endpoint.bind(addr, shared, reuse=True)
        except OSError as exc:
            endpoint.close()
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, 'dispy client port %s on %s is in use (another '
                              'dispy client?); give JobCluster a different port, or '
                              'port=0 for any free port' % (port, addr or '*'))
            raise OSError(exc.errno, 'cannot bind dispy client to %s:%s: %s'
                          % (addr or '*', port, exc.strerror))
        if not ip_addrs:        # all interfaces: IPv6 too, where the host has it
            endpoint.bind_any_v6(port)
            if shared:
                endpoint.bind_any_v6(shared, reuse=True)
        return endpoint

    # -- schedulers and clusters -----------------------------------------------------------
    def scheduler_for(self, options, scheduler_class=None):
        """The scheduler (and node pool) for a cluster's secret and TLS files
        (dispyscheduler asks for its own ``Scheduler`` subclass)."""
        scheduler_class = scheduler_class or Scheduler
        key = (options['secret'], options['certfile'], options['keyfile'],
               options.get('cafile'))
        with self.lock:
            if self.discovery is None:
                self._bind_discovery(options)
            scheduler = self.schedulers.get(key)
            if scheduler is not None:
                pool = scheduler.pool
                pool.pulse_interval = min(pool.pulse_interval, options['pulse_interval'])
                return scheduler
            scheduler = scheduler_class(self.threads, *self.keys)
            context = make_ssl_context(False, options['certfile'], options['keyfile'],
                                       options.get('cafile'))
            scheduler.attach_pool(NodePool(scheduler, scheduler.lock, options['secret'],
                                           context, dict(options, ip_addrs=self.options[
                                               'ip_addrs']), self.loop, self.threads,
                                           self.client, self.discovery.sendto))
            self.schedulers[key] = scheduler
            return scheduler

    def notifier_for(self, scheduler):
        """The callback thread of a scheduler's clusters (created on first use)."""
        with self.lock:
            notifier = self.notifiers.get(scheduler)
            if notifier is None:
                notifier = self.notifiers[scheduler] = _Notifier(scheduler.cond)
            return notifier

    def add_cluster(self, cluster, scheduler):
        with self.lock:
            self.clusters.append(cluster)
        scheduler.add_cluster(cluster)      # its pings go out at the loop's next tick

    def remove_cluster(self, cluster, scheduler):
        scheduler.remove_cluster(cluster)
        with self.lock:
            if cluster in self.clusters:
                self.clusters.remove(cluster)
            last = not self.clusters
            # a scheduler without clusters releases its nodes for other programs
            unused = not scheduler.has_clusters()
            notifier = None
            if unused:
                for key in [k for k, v in self.schedulers.items() if v is scheduler]:
                    del self.schedulers[key]
                if not last:
                    notifier = self.notifiers.pop(scheduler, None)
        if unused:
            scheduler.close()
        if notifier is not None:
            notifier.stop()
        if last:
            self.shutdown()

    def shutdown(self, release=True):
        """Releases every node and stops the hub (the last cluster closed)."""
        with ClientHub._current_lock:
            if ClientHub._current is self:
                ClientHub._current = None
        with self.lock:
            if self.closed:
                return
            self.closed = True
            schedulers = list(self.schedulers.values())
            notifiers = list(self.notifiers.values())
        for scheduler in schedulers:
            scheduler.close(release)
        for notifier in notifiers:
            notifier.stop()        # after the calls already queued
        self.loop.stop()
        self.loop.thread.join(5.0)

    # -- datagrams and timers (loop thread) --------------------------------------------------
    def _register_udp(self):
        for sock in self.discovery.socks:
            self.loop.selector.register(sock, selectors.EVENT_READ, functools.partial(
                lambda sock, _events: self.discovery.handle_readable(sock), sock))

    def _tick(self):
        now = time.monotonic()
        for scheduler in list(self.schedulers.values()):
            scheduler.pool.tick(now)
        deferred = []
        for cluster in list(self.clusters):
            deferred += cluster._recover_tick(now)
        if deferred:    # big arguments: written outside the lock, off the loop
            self.threads.submit(self._write_args, deferred)

    @staticmethod
    def _write_args(deferred):
        for recover, job, blob in deferred:
            recover.write_args(job, blob)


class _HubDiscovery(DiscoveryEndpoint):
    """A client's discovery endpoint: every datagram is offered to each node pool,
    verified with that pool's secret (a pool warns about NAKs itself)."""

    def __init__(self, hub):
        super().__init__(None, None, nak_pings=False)
        self.hub = hub

    def dispatch(self, data, addr, sock):
        for scheduler in list(self.hub.schedulers.values()):
            pool = scheduler.pool
            msg, good = unpack_datagram(pool.secret, data)
            if msg is None:
                return
            pool.datagram(msg, good, addr)


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
        I  key(8) | id            ``job.id`` set after submit (when set, and at exit)
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
        inline = type(blob) is not tuple and len(blob) <= RECOVER_INLINE
        self._append(b'S', struct.pack('!QdIQ', job._key, job.submit_time, len(id_text),
                                       blob_size(blob)), id_text, blob if inline else b'')
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
        """I records of the jobs' ids (``job.id`` set after submit: at once, and for
        every open job at exit); the last record of a job counts."""
        for job in jobs:
            id_text = _custom_id(job)
            if id_text and job.status not in FINAL_STATUSES:
                self._append(b'I', struct.pack('!Q', job._key), id_text)

    def tick(self, now):
        """[(self, job, blob)] of big arguments now due (at most ARGS_PER_TICK
        bytes), for the caller to write outside locks."""
        due, keep, budget = [], [], self.ARGS_PER_TICK
        for job, since in self.deferred:
            if job._blob is None or job.status in FINAL_STATUSES:
                continue
            if now - since >= RECOVER_DEFER and budget > 0:
                due.append((self, job, job._blob))
                budget -= blob_size(job._blob)
            else:
                keep.append((job, since))
        self.deferred = keep
        return due

    def write_args(self, job, blob):
        """An A record for a big blob, copied by the kernel outside every lock."""
        head = struct.pack('!Q', job._key)
        stored = stored_blob(blob)
        with self.lock:
            if self.fd is None:
                return
            try:
                start = self._reserve(len(head) + sum(len(p) for p in stored))
                fd = os.dup(self.fd)        # a close() meanwhile cannot reuse its number
            except (OSError, ValueError, SystemError, struct.error) as exc:
                self._failed(exc)
                return
        try:
            parts = [memoryview(p).cast('B') for p in [head] + stored if len(p)]
            at = start + 5
            while parts:        # a write may be short (over 2 GiB, a signal)
                if hasattr(os, 'pwritev'):
                    written = os.pwritev(fd, parts[:1024], at)     # IOV_MAX
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
            job.args, job.kwargs = loads_blob(entry['blob'])
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
            job.result = loads_blob(result.blob)
        except Exception as exc:
            job.status = DispyJob.Terminated
            job.exception = 'result could not be unpickled: %r' % exc


def _recovered_result(addr, msg):
    """(node address, RESULT record) of a node's RESULT, or of a dispyscheduler's DONE
    (which names the node that ran the job)."""
    if msg[0] == 'RESULT':
        return addr, Msg.RESULT.read(msg)
    done = Msg.DONE.read(msg)
    return done.ip or addr, Msg.RESULT.record(done.key, 0, done.status, done.blob, done.stdout,
                                              done.stderr, done.exception, done.start_time,
                                              done.end_time)


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
            acks, replies = [], []
            for msg in msgs:
                if msg[0] in ('RESULT', 'DONE') and msg[1] in wanted:
                    where, result = _recovered_result(addr, msg)
                    waiting.discard((result.key, result.attempt))
                    results[result.key] = (where, result)
                    acks.append((result.key, result.attempt))
                elif msg[0] == 'PULSE':
                    replies.append(Msg.PULSE(time.time()))
            msgs = []
            if acks:
                replies.append(Msg.ACK(acks))
            if replies:
                channel.send(replies)
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
# Live job output (stream_output): what workers, nodes, dispyscheduler and clients share
# ================================================================================
#
# A streamed job's lines go worker → node → (dispyscheduler →) client as OUTPUT
# messages, each with the number of the stream's lines dropped before it.  Every hop
# holds at most LIVE_BACKLOG characters waiting to go on and drops what comes past that
# (LiveOutputLosses counts it), so a job printing gigabytes cannot exhaust anyone's
# memory; the counts travel on, and the client shows them as one notice line.

OUTPUT_STREAMS = ('stdout', 'stderr')
LIVE_LINE_MAX = 64 << 10    # characters: a longer line goes on in pieces this long
LIVE_BACKLOG = 1 << 20      # characters (bytes at a connection) waiting at one hop, at most
LIVE_BATCH = 64 << 10       # a worker sends its lines at once when this many wait ...
LIVE_DELAY = 0.03           # ... else this long (seconds) after the first of them
LIVE_KEEP = 16 << 20        # characters job.stdout / job.stderr keep of a streamed job


def live_keep(max_frame):
    """Characters of each stream a streamed job's result keeps: LIVE_KEEP, less for a
    small ``max_frame_size`` (both streams, UTF-8, stay within half a frame)."""
    return max(1024, min(LIVE_KEEP, max_frame // 16))


def split_lines(text):
    """The lines of an OUTPUT's text (its last line may lack the newline)."""
    lines = text.split('\n')
    if lines[-1] == '':
        lines.pop()
    return lines


def count_lines(text):
    return text.count('\n') + (1 if text and not text.endswith('\n') else 0)


def lost_notice(lines):
    """The line a client shows where live lines were dropped (documented: callbacks
    may recognise it)."""
    return '[dispy: %d line%s of live output dropped]' % (lines, '' if lines == 1 else 's')


def checked_output(msg):
    """An OUTPUT record as received: its stream, text and count checked (ValueError)."""
    if msg.stream not in OUTPUT_STREAMS or not isinstance(msg.text, str) or \
            type(msg.dropped) is not int or msg.dropped < 0:
        raise ValueError('malformed OUTPUT message')
    return msg


class LiveOutputLosses:
    """The live lines one hop dropped, per job and stream (its way on was congested),
    not yet reported: the next piece of that stream that does go on carries the count,
    and what is left when the job ends is told before its result.  ``lost`` is empty
    while nothing is dropped (what the hot path tests)."""

    def __init__(self):
        self.lost = {}          # (job, stream) -> lines dropped, not yet reported

    def admit(self, job, stream, text, dropped, room):
        """The count of lines lost before ``text`` (``dropped`` of them by earlier hops)
        if it goes on now (``room``), else None: it is counted as lost too."""
        lost = self.lost.pop((job, stream), 0) + dropped if self.lost else dropped
        if room:
            return lost
        lost += count_lines(text)
        if lost:
            self.lost[(job, stream)] = lost
        return None

    def take_lost(self, job):
        """[(stream, lines)] lost of ``job`` and not reported; forgotten here."""
        if not self.lost:
            return []
        return [(stream, lines) for stream in OUTPUT_STREAMS
                if (lines := self.lost.pop((job, stream), 0))]


class LiveOutputRelay(LiveOutputLosses):
    """A hop that passes live output on over a connection (a node to its client,
    dispyscheduler to a program): OUTPUT messages, held briefly to share frames, unless
    the connection is congested past LIVE_BACKLOG bytes or there is none (the receiver
    is away): then the lines are dropped and counted, and the count goes with the next
    piece of that stream that does go, or just before the job's result (lock held, on
    the I/O loop)."""

    def pass_on(self, conn, key, attempt, stream, text, dropped):
        room = conn is not None and not conn.congested(LIVE_BACKLOG)
        lost = self.admit((key, attempt), stream, text, dropped, room)
        if lost is not None:
            conn.send(Msg.OUTPUT(key, attempt, stream, text, lost), hold=True)

    def job_ended(self, conn, key, attempt):
        """Before the job's result: the count of its lines lost and not told yet."""
        for stream, lost in self.take_lost((key, attempt)):
            if conn is not None:
                conn.send(Msg.OUTPUT(key, attempt, stream, '', lost), hold=True)


class LiveOutputSink(LiveOutputLosses):
    """Where a cluster's live output ends (``stream_output``): ``True`` prints each
    line on the client's stdout or stderr as ``<job id> @ <node>: <line>``; a callable
    is called ``f(job, stream, line)``.  Both on the cluster's notifier thread (never
    the I/O loop: a blocked terminal or a slow callback stalls no connection), in order
    with the cluster's callbacks, so a job's lines come before its callback, and
    ``job()`` and ``cluster.wait()`` return after they are shown.  At most LIVE_BACKLOG
    characters wait for that thread; more is dropped, counted, and shown as one notice
    line."""

    def __init__(self, target, cluster, notifier, cond):
        super().__init__()
        self.target = target
        self.cluster = cluster
        self.notifier = notifier
        self.cond = cond            # the notifier's (the scheduler's): guards the counts
        self.queued = 0             # characters waiting for the notifier thread
        self.showing = collections.Counter()    # job -> its pieces not shown yet

    def put(self, job, stream, text, dropped):
        """A piece of a job's output arrived (scheduler lock held)."""
        lost = self.admit(job, stream, text, dropped,
                          self.queued + len(text) <= LIVE_BACKLOG)
        if lost is not None:
            self._queue(job, stream, text, lost)

    def job_ended(self, job):
        """Before the job's callback: a notice of the lines of it that were lost."""
        for stream, lost in self.take_lost(job):
            self._queue(job, stream, '', lost)

    def _queue(self, job, stream, text, lost):
        self.queued += len(text)
        self.showing[job] += 1
        self.notifier.put(self.cluster, self._show, (job, stream, text, lost))

    def _show(self, job, stream, text, lost):
        try:
            lines = split_lines(text)
            if lost:
                lines.insert(0, lost_notice(lost))
            if self.target is True:
                self._print(job, stream, lines)
            else:
                for line in lines:
                    self.target(job, stream, line)
        finally:
            with self.cond:
                self.queued -= len(text)
                self.showing[job] -= 1
                if not self.showing[job]:
                    del self.showing[job]

    @staticmethod
    def _print(job, stream, lines):
        out = sys.stdout if stream == 'stdout' else sys.stderr
        prefix = '%s @ %s: ' % (job.id, job.ip_addr)
        try:
            out.write(''.join(prefix + line + '\n' for line in lines))
            out.flush()
        except (OSError, ValueError):
            pass        # a closed or broken stream does not stop the cluster


def checked_stream_output(value):
    """``stream_output`` as given to a cluster: False, True or a callable."""
    if value is None or value is False or value is True or callable(value):
        return value or False
    raise ValueError('stream_output must be False, True or a callable f(job, stream, line), '
                     'not %r' % (value,))


# ================================================================================
# Client API: JobCluster
# ================================================================================

class _Notifier:
    """Calls the callbacks of a scheduler's clusters from one thread, in order, never
    concurrently, outside every lock (one per scheduler, made with its first callback).

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


class ProgressLine:
    """Jobs done / total, failures, rate and ETA on one line while a program waits
    (``cluster.wait(progress=True)``, ``DISPY_PROGRESS=1``, ``dispy.py --progress``):
    redrawn in place on a terminal, at most 5 times a second; elsewhere (a log file,
    a pipe) a plain line every 10 seconds and one at the end."""

    RATE_WINDOW = 30.0          # seconds the rate is measured over

    def __init__(self, stream=None, interval=None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.samples = collections.deque()      # (monotonic time, jobs done)
        self.shown_at = None

    def text(self, done, total, failed, now):
        samples = self.samples
        samples.append((now, done))
        while len(samples) > 2 and now - samples[1][0] >= self.RATE_WINDOW:
            samples.popleft()
        span = now - samples[0][0]
        rate = (done - samples[0][1]) / span if span > 0 else 0.0
        parts = ['dispy: %d/%d jobs done' % (done, total)]
        if total:
            parts[0] += ' (%.1f%%)' % (100.0 * done / total)
        parts.append('%d failed' % failed)
        parts.append('%.1f jobs/s' % rate)
        if done < total:
            parts.append('ETA %s' % (_clock(int((total - done) / rate)) if rate > 0 else '?'))
        return ', '.join(parts)

    def show(self, done, total, failed, final=False):
        now = time.monotonic()
        if not final and self.shown_at is not None and now - self.shown_at < self.interval:
            self.samples.append((now, done))
            return
        self.shown_at = now
        line = self.text(done, total, failed, now)
        try:
            if self.tty:
                self.stream.write('\r' + line + '\x1b[K' + ('\n' if final else ''))
            else:
                self.stream.write(line + '\n')
            self.stream.flush()
        except (OSError, ValueError):
            pass        # a closed stream does not stop the wait


def _clock(seconds):
    return '%d:%02d:%02d' % (seconds // 3600, seconds // 60 % 60, seconds % 60)


class JobCluster(ClusterHooks):
    """A computation (Python function or program) distributed to nodes running dispynode.

    ``submit(*args, **kwargs)`` creates a job and returns it at once; the scheduler runs
    it on the least-loaded node that has the computation set up.  See the module
    docstring for the threads involved and README.md for the options.  The cluster is
    the host of its jobs for the Scheduler: it implements ``ClusterHooks``.
    """

    def __init__(self, computation, nodes=None, depends=[], callback=None, cluster_status=None,
                 ip_addr=None, port=None, node_port=None, ext_ip_addr=None, dest_path=None,
                 recover_file=None, loglevel=None, setup=None, cleanup=True,
                 pulse_interval=None, ping_interval=None, reentrant=False, secret=None,
                 keyfile=None, certfile=None, cafile=None, job_timeout=None,
                 max_frame_size=None, host=None, ext_host=None, job_status=None,
                 dispy_port=None, fresh_process=False, job_retries=0, stream_output=False):
        stream_output = checked_stream_output(stream_output)
        if loglevel is not None:
            setup_logging(loglevel)
        else:
            setup_logging(logging.WARNING if logger.level == logging.NOTSET else None)
        caller = sys._getframe(1)
        while caller.f_back is not None and caller.f_globals is globals():
            caller = caller.f_back      # the user's frame, not a subclass's or wrapper's
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
        self.allocations = _node_allocations(nodes, node_port)
        self.reentrant = bool(reentrant)
        self._callback = callback or job_status
        self._status_cb = cluster_status
        self._job_timeout = job_timeout
        self._job_retries = _checked_count(job_retries, 'job_retries')
        self._open_jobs = 0
        self._jobs_submitted = 0    # ever (the progress line's total)
        self._jobs_failed = 0       # ended in FAILED_STATUSES (not Finished, not Cancelled)
        self._nodes = {}            # address -> DispyNode, for this cluster
        self._busy_on = {}          # job key -> DispyNode its Running made busy (cluster_status)
        self._closed = False
        self._start_time = time.time()
        self._cwd = os.getcwd()        # where files sent by jobs land
        self._receiver = FileReceiver(self._cwd, paths='relative')
        self._recover_path = recover_file
        self._recover = None           # RecoverLog, created at the first submit
        self._main_sources = {}        # __main__ class/function -> source (job arguments)
        self.name = '%s @ %s' % (self._package.name, ip_addrs[0] if ip_addrs
                                 else socket.gethostname())
        self._options = {
            'ip_addrs': ip_addrs, 'explicit_ip_addrs': bool(ip_addrs), 'port': port,
            'explicit_port': port != CLIENT_PORT, 'secret': secret, 'certfile': certfile,
            'keyfile': keyfile, 'cafile': cafile, 'node_port': node_port,
            'ext_ip_addrs': _as_list(ext_ip_addr if ext_ip_addr is not None else ext_host),
            'max_frame': int(max_frame_size or DEFAULT_MAX_FRAME),
            'pulse_interval': pulse_interval or DEFAULT_PULSE_INTERVAL,
            'ping_interval': ping_interval}
        self._max_frame = self._options['max_frame']
        if stream_output:   # live lines of its jobs (the nodes then send OUTPUT messages)
            self._package.spec.update(stream_output=True,
                                      output_keep=live_keep(self._max_frame))
        self._hub = ClientHub.acquire(self._hub_options())
        self._scheduler = self._make_scheduler()
        self._pool = self._scheduler.pool
        self._cond = self._scheduler.cond
        self._notifier = (self._hub.notifier_for(self._scheduler)
                          if (self._callback or self._status_cb or stream_output) else None)
        self._live = (LiveOutputSink(stream_output, self, self._notifier, self._cond)
                      if stream_output else None)
        _live_clusters.add(self)
        self._hub.add_cluster(self, self._scheduler)

    def _hub_options(self):
        return self._options

    def _make_scheduler(self):
        """The scheduler of this cluster's jobs: the hub's for its secret and TLS files
        (a hook: a SharedJobCluster's is a dispyscheduler)."""
        return self._hub.scheduler_for(self._options)

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
        retries = kwargs.pop('dispy_job_retries', self._job_retries)
        priority = kwargs.pop('dispy_job_priority', 0)
        try:
            retries = _checked_count(retries, 'dispy_job_retries')
            if type(priority) is not int:   # bool is refused too: a slip, not a rank
                raise TypeError('dispy_job_priority must be an int, not %r' % (priority,))
        except (TypeError, ValueError) as exc:
            logger.error('job not created: %s', exc)
            return None
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
        if blob_size(blob) > self._max_frame - 65536:
            logger.error('job not created: its arguments take %d bytes, over the frame limit '
                         'of %d (max_frame_size)', blob_size(blob), self._max_frame)
            return None
        options = {}
        if timeout:
            options['timeout'] = float(timeout)
        if retries:
            options['retries'] = retries
        if priority:
            options['priority'] = priority
        if depends or main_refs:
            try:
                options['depends'] = self._job_depends(depends, main_refs)
            except (ComputationError, OSError) as exc:
                logger.error('job not created: %s', exc)
                return None
        job = DispyJob(None, self, blob, pin, options or None, args, kwargs)
        job._id = job_id
        self._open_recover_file()
        return self._scheduler.submit(job)

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
        return self._scheduler.cancel(job)

    # -- nodes ---------------------------------------------------------------------------------
    @staticmethod
    def _node_addr(node):
        """The address of a DispyNode, NodeAllocate, address or host name."""
        if isinstance(node, (DispyNode, NodeAllocate)):
            node = node.ip_addr if isinstance(node, DispyNode) else node.host
        return resolve_host(str(node)) or str(node)

    def allocate_node(self, node):
        """Adds a node (host name, address, pattern or NodeAllocate) to this cluster."""
        try:
            allocs = _node_allocations(node if isinstance(node, list) else [node],
                                       self.allocations[0].port if self.allocations
                                       else NODE_PORT)
        except ValueError as exc:
            logger.error('allocate_node: %s', exc)
            return -1
        with self._cond:
            self.allocations.extend(allocs)
        self._scheduler.add_allocations(self, allocs)
        return 0

    def discover_nodes(self, nodes):
        """Looks for more nodes (names, addresses, patterns) for this cluster."""
        return self.allocate_node(_as_list(nodes))

    def deallocate_node(self, node):
        """Sends no more jobs of this cluster to the node (running ones finish)."""
        addr = self._node_addr(node)
        result = self._scheduler.deallocate(self, addr)
        if result == 0 and (monitor := self.monitor) is not None:
            monitor.node_cpus(addr, 0)
        return result

    def close_node(self, node, terminate_pending=False):
        """Closes this cluster's computation on a node (after its jobs there end, or
        cancelling them with ``terminate_pending``)."""
        return self._scheduler.close_node(self, self._node_addr(node), terminate_pending)

    def resetup_node(self, node, terminate_pending=False):
        """Runs cleanup and then setup again on a node (after its running jobs end, or
        cancelling them with ``terminate_pending``)."""
        return self._scheduler.close_node(self, self._node_addr(node), terminate_pending,
                                          resetup=True)

    def set_node_cpus(self, node, cpus):
        """CPUs this cluster uses on a node (negative: leave that many free); returns
        the CPUs now used, or -1."""
        addr = self._node_addr(node)
        with self._cond:
            cpus = self._scheduler.set_node_cpus(self, addr, cpus)
            known = self._nodes.get(addr)
            if cpus >= 0 and known is not None:
                known.cpus = cpus
                if (monitor := self.monitor) is not None:
                    monitor.node_cpus(addr, cpus)
            return cpus

    def node_jobs(self, node, from_node=False):
        """Jobs of this cluster running on a node."""
        return self._scheduler.node_jobs(self, self._node_addr(node))

    def send_file(self, path, node, timeout=60):
        """Copies a file into the computation's folder on a node (by base name).
        Returns 0 on success, -1 otherwise."""
        return self._scheduler.send_file(self, self._node_addr(node), path, timeout)

    # -- waiting -------------------------------------------------------------------------------
    def _wait_job(self, job, timeout):
        with self._cond:
            if self._live is not None and threading.current_thread() is not \
                    self._notifier.thread:      # and its live lines shown
                return self._cond.wait_for(lambda: job.status in FINAL_STATUSES and
                                           job not in self._live.showing, timeout)
            return self._cond.wait_for(lambda: job.status in FINAL_STATUSES, timeout)

    def wait(self, timeout=None, progress=None):
        """Waits until every submitted job has ended and its callbacks have run.

        ``progress=True`` (default: the DISPY_PROGRESS environment variable) shows a
        ProgressLine on stderr meanwhile."""
        if self._notifier is not None and threading.current_thread() is self._notifier.thread:
            raise RuntimeError('cluster.wait() cannot be called from a callback: the callback '
                               'thread would wait for itself')
        if progress is None:
            progress = os.environ.get('DISPY_PROGRESS', '0') not in ('', '0')
        if not progress:
            with self._cond:
                return self._cond.wait_for(self._all_done, timeout)
        line = progress if isinstance(progress, ProgressLine) else ProgressLine()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            with self._cond:
                done = self._cond.wait_for(self._all_done, 0.2 if left is None
                                           else min(0.2, left))
                figures = (self._jobs_submitted - self._open_jobs, self._jobs_submitted,
                           self._jobs_failed)
            if done or left == 0.0:
                line.show(*figures, final=True)
                return done
            line.show(*figures)

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
        elif not in_callback and not self.wait(timeout, progress=False):
            if not terminate:
                return False
        if terminate:
            self._cancel_all()
        self._closed = True
        _live_clusters.discard(self)
        with self._cond:
            recover, self._recover = self._recover, None
        if recover is not None:
            recover.close(remove=True)    # closed cleanly: nothing to recover
        self._hub.remove_cluster(self, self._scheduler)
        self._receiver.close()            # a file a job did not finish sending: removed
        return True

    def is_closed(self):
        return self._closed

    def hooks_lock(self):
        return self._cond

    def seed_monitor(self, monitor):
        monitor.seed(self._jobs_submitted, self._jobs_submitted - self._open_jobs,
                     self._jobs_failed, list(self._nodes.values()),
                     [j for j in self._scheduler.open_jobs(self)
                      if j.status == DispyJob.Running])

    def shutdown(self, timeout=None, terminate=False):
        """4.15's ``cluster.shutdown()``: closes the cluster and asks its nodes to
        stop once this program is done with them (nodes started with
        ``--client_shutdown`` do; others log that they refused)."""
        if not self._closed and self._pool is not None:
            self._scheduler.shutdown_nodes(self)
        elif self._pool is None:
            logger.warning('shutdown: a SharedJobCluster does not stop the shared nodes')
        return self.close(timeout, terminate)

    def _jobs_open(self):
        """Jobs of this cluster queued here or on nodes."""
        return self._scheduler.open_jobs(self)

    def _cancel_all(self, grace=5.0):
        # Nodes answer with the killed jobs; one that does not answer in time cannot
        # hold close() hostage.
        self._scheduler.abort(self, 'Cancelled: cluster closed', grace)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(terminate=exc_type is not None)
        return False

    # -- ClusterHooks: what the scheduler asks of this cluster ---------------------------------
    def allocate(self, alloc, link):
        """CPUs for this cluster on a new node: its NodeAllocate's ``allocate()``."""
        return alloc.allocate(self, link.ip_addr, link.name, link.cpus, link.avail_info,
                              link.platform)

    def computation(self, alloc):
        return self._package.for_node(alloc)

    def job_output(self, job, stream, text, dropped):
        if self._live is not None:
            self._live.put(job, stream, text, dropped)

    def job_file(self, job, path, mode, offset, data, last):
        """A file a job sent with dispy_send_file: saved under the client's working
        directory at the same relative path; never outside it."""
        try:
            self._receiver.chunk(path, mode, offset, data, last,
                                 source=(job.ip_addr, job._key, job._attempt))
        except PathRefused:
            logger.warning('node %s: job %s sent a file with a refused path %r', job.ip_addr,
                           job.id, path)
        except (ValueError, OSError) as exc:
            logger.warning('cannot save file %s sent by job %s: %s', path, job.id, exc)

    # -- ClusterHooks: events (scheduler lock held) -------------------------------------------
    def _dispy_node(self, link):
        node = self._nodes.get(link.ip_addr)
        if node is None:
            node = self._nodes[link.ip_addr] = DispyNode(link.ip_addr, link.name,
                                                          link.alloc_cpus.get(self.key, 0),
                                                          link.platform)
        return node

    def _open_recover_file(self):
        """The recover file, created at the first submit (outside the scheduler lock)."""
        if self._recover is not None or self._recover_path is False:
            return
        options = self._options
        recover = RecoverLog.create(self._recover_path, {
            'client': self._hub.client_id, 'secret': options['secret'],
            'certfile': options['certfile'], 'keyfile': options['keyfile'],
            'cafile': options['cafile'], 'created': time.time(), 'cluster': self.name})
        with self._cond:
            if recover is None:
                self._recover_path = False      # warned once; not tried again
            elif self._recover is None:
                self._recover = recover
                return
        if recover is not None:     # another thread's submit made one first
            recover.close(remove=True)

    def _recover_tick(self, now):
        """Big arguments due (written by the caller, outside the lock)."""
        with self._cond:
            return self._recover.tick(now) if self._recover is not None else []

    def job_submitted(self, job):
        self._open_jobs += 1
        self._jobs_submitted += 1
        if self._recover is not None:
            self._recover.submitted(job)
        if (monitor := self.monitor) is not None:
            monitor.job_submitted(job)
        if self._status_cb:
            self.job_changed(job, DispyJob.Created)

    def job_dispatched(self, job, link):
        if self._recover is not None:
            self._recover.dispatched(job, link)
        # (sent to a node; a SharedJobCluster's "link" is the dispyscheduler)
        if (monitor := self.monitor) is not None and self._pool is not None:
            monitor.job_dispatched(job, link.ip_addr)

    def job_changed(self, job, status):
        if (monitor := self.monitor) is not None and status == DispyJob.Running:
            monitor.job_running(job)
        if self._notifier is None:
            return
        if self._callback and status == DispyJob.ProvisionalResult:
            self._notifier.put(self, self._callback, (job._snapshot(),))
        if self._status_cb:
            node = self._nodes.get(job.ip_addr) if job.ip_addr else None
            if status in (DispyJob.Running, DispyJob.Created):    # runs, or runs no more
                self._not_busy(job)
            if node is not None and status == DispyJob.Running:
                node.busy += 1
                self._busy_on[job._key] = node
            self._notifier.put(self, self._status_cb, (status, node, job._snapshot()))

    def _not_busy(self, job):
        """The job no longer runs where cluster_status counted it busy (lock held):
        it ended, or is queued again (retried, or its node was lost)."""
        node = self._busy_on.pop(job._key, None)
        if node is not None:
            node.busy = max(0, node.busy - 1)

    def job_ended(self, job, link):
        self._open_jobs -= 1
        self._jobs_failed += job.status in FAILED_STATUSES
        if self._recover is not None:
            self._recover.ended(job)
        if (monitor := self.monitor) is not None:
            monitor.job_ended(job, link.ip_addr if link is not None else job.ip_addr)
        node = self._nodes.get(link.ip_addr) if link is not None else None
        if node is not None:
            node.jobs_done += 1
            if job.start_time and job.end_time:
                node.cpu_time += max(0.0, job.end_time - job.start_time)
            node.update_time = time.time()
        if self._status_cb:
            self._not_busy(job)
        if self._live is not None and self._live.lost:     # before the job's callback
            self._live.job_ended(job)
        if self._notifier is not None:
            if self._callback:
                self._notifier.put(self, self._callback, (job,))
            if self._status_cb:
                self._notifier.put(self, self._status_cb, (job.status, node, job))
        self._cond.notify_all()

    def node_changed(self, link, status):
        node = self._dispy_node(link)
        node.name = link.name
        node.avail_cpus = link.cpus
        node.cpus = link.alloc_cpus.get(self.key, node.cpus)
        node.avail_info = link.avail_info
        node.update_time = time.time()
        if status == DispyNode.Initialized:
            logger.debug('node %s (%s) initialized with %s CPUs for %s', link.ip_addr,
                         link.name, node.cpus, self._package.name)
        if (monitor := self.monitor) is not None:
            monitor.node_changed(node.ip_addr, status, node.name, node.cpus,
                                      node.avail_cpus, node.platform, node.avail_info)
        if self._status_cb:
            self._notifier.put(self, self._status_cb, (status, node, None))
        self._cond.notify_all()

    def _interrupted_text(self):
        """What the program is told when it ends with jobs of this cluster open."""
        on_nodes = self._scheduler.jobs_on_nodes(self)
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
                sent, received = self._scheduler.traffic(addr)
                nodes.append({'ip_addr': addr, 'name': node.name, 'cpus': node.cpus,
                              'jobs_done': node.jobs_done, 'cpu_time': node.cpu_time,
                              'sec_per_job': node.cpu_time / node.jobs_done
                              if node.jobs_done else 0.0,
                              'bytes_sent': sent, 'bytes_received': received})
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


def _checked_count(value, name):
    """A count of retries given by the user: an int from 0 up."""
    if type(value) is not int or value < 0:
        raise ValueError('%s must be an int of 0 or more, not %r' % (name, value))
    return value


def _human_bytes(n):
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return ('%d %s' if unit == 'B' else '%.1f %s') % (n, unit)
        n /= 1024.0


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
                    if cluster._recover is not None:     # ids changed in place too
                        cluster._recover.write_ids(cluster._jobs_open())
            if idle:
                cluster.close(timeout=5)
            else:
                cluster._receiver.close()
        except Exception:
            pass


atexit.register(_at_exit)


# ================================================================================
# Client API: SharedJobCluster (its jobs go through a dispyscheduler)
# ================================================================================

SCHEDULER_PORT = 51349          # dispyscheduler's TCP port for SharedJobClusters
SCHEDULER_REDIAL = (0.5, 1.0, 2.0, 5.0)    # seconds between dials of a lost scheduler
SETUP_FAILED = -1               # NODE_STATUS: the cluster's setup failed on that node


class _NodeView:
    """A node as a dispyscheduler describes it: what ``ClusterHooks`` events read
    of a ``NodeLink`` (address, name, CPUs, platform, availability)."""

    __slots__ = ('ip_addr', 'port', 'name', 'cpus', 'platform', 'avail_info', 'alloc_cpus')

    def __init__(self, ip_addr, port=None, name='', cpus=0, platform='', avail=None,
                 used=None, key=None):
        self.ip_addr = ip_addr
        self.port = port
        self.name = name
        self.cpus = cpus
        self.platform = platform
        self.avail_info = _avail_info(avail)
        self.alloc_cpus = {key: used} if used is not None else {}

    @staticmethod
    def describe(link, key):
        """A NodeLink as the dict NODE_STATUS and ALLOCATE carry."""
        avail = link.avail_info
        return {'ip_addr': link.ip_addr, 'name': link.name, 'cpus': link.cpus,
                'platform': link.platform, 'used': link.alloc_cpus.get(key),
                'avail': None if avail is None else [avail.cpu, avail.memory, avail.disk,
                                                     avail.swap]}

    @classmethod
    def read(cls, node, key):
        if not isinstance(node, dict) or not isinstance(node.get('ip_addr'), str):
            raise ProtocolError('malformed node description')
        return cls(node['ip_addr'], None, str(node.get('name') or ''),
                   int(node.get('cpus') or 0), str(node.get('platform') or ''),
                   node.get('avail'), node.get('used'), key)


class RemoteScheduler:
    """A SharedJobCluster's scheduler: a dispyscheduler, over one authenticated
    connection on the process's I/O loop.  It offers the cluster what a ``Scheduler``
    does (submit, cancel, the node methods), so ``JobCluster``'s code serves both; the
    scheduler's reports become the same ``ClusterHooks`` calls::

        JobCluster._submit ─► submit: JOB ─────────► dispyscheduler ─► its nodes
        job_changed / job_ended ◄─ STATE, DONE ◄────┘   (ACK once the result is here:
                                                         only then does the node drop it)

    A lost connection is dialed again (SCHEDULER_REDIAL) for as long as the cluster
    is open; a scheduler that still has the cluster goes on with it, one that
    restarted gets the cluster again and every job not ended (a job its nodes still
    hold is not run twice: the scheduler finds it by its key).
    """

    OFFLOAD = frozenset(('SEND_FILE',))    # files jobs send are saved off the loop

    def __init__(self, hub, options, addr, port):
        self.hub = hub
        self.loop = hub.loop
        self.threads = hub.threads
        self.addr, self.port = addr, port
        self.secret = options['secret']
        self.ssl_context = make_ssl_context(False, options['certfile'], options['keyfile'],
                                            options.get('cafile'))
        self.max_frame = options['max_frame']
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.pool = None            # no node pool of its own
        self.view = _NodeView(addr, port, 'dispyscheduler')  # where the recover file points
        self.cluster = None
        self.uid = uuid.uuid4().hex
        self.number = None          # the scheduler's number for the cluster (its key there)
        self.jobs = {}              # key -> DispyJob not ended
        self.conn = None
        self.ready = False          # the scheduler has the cluster and its files
        self.closing = False
        self.error = None           # why the scheduler refused the cluster
        self.replies = {}           # token -> answer of NODE_OP / PUT_FILE
        self.cancels = set()        # keys of jobs cancelled that have not ended yet
        self.failures = 0           # dials failed before the scheduler ever answered
        self.tokens = itertools.count(1)
        self.nodes = {}             # address -> _NodeView
        self.retry = 0
        self.next_dial = 0.0
        self.dialing = False
        self.warned = False
        self.pulse_interval = DEFAULT_PULSE_INTERVAL   # the scheduler's (its NODE says)

    # -- the cluster -------------------------------------------------------------------------
    def add_cluster(self, cluster):
        self.cluster = cluster
        cluster.key = 0             # one cluster per connection
        self.loop.add_ticker(self._tick)
        self.loop.call_soon(self._dial)
        return cluster.key

    def has_clusters(self):
        return self.cluster is not None and not self.closing

    def remove_cluster(self, cluster, grace=5.0):
        with self.lock:
            self.closing = True
            conn = self.conn if self.ready else None
        self.loop.remove_ticker(self._tick)
        if conn is not None:
            conn.send(Msg.RELEASE())
            conn.close('cluster closed', flush=True)
            conn.wait_closed(grace)
        elif self.number is not None and self.error is None:
            self._release_by_dial(min(grace, MsgTimeout))

    @staticmethod
    def _drain(channel, deadline):
        """Reads until the peer closes (it has what we sent then) or the deadline."""
        try:
            while time.monotonic() < deadline:
                channel.recv()
        except (OSError, ProtocolError):
            pass

    def _release_by_dial(self, timeout):
        """The scheduler has the cluster but no connection now: one short dial to say
        it is closed (else its jobs would run on there for --zombie_interval)."""
        try:
            sock = socket.create_connection((self.addr, self.port), timeout=timeout)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=False)
            channel = handshake(sock, self.secret, True, {'role': 'client'}, timeout=timeout)
            try:
                channel.send([Msg.CLIENT(dict(self.hub.client, cluster=self.uid,
                                              number=self.number))])
                channel.sock.settimeout(timeout)
                channel.recv()
                channel.send([Msg.RELEASE()])
                channel.sock.shutdown(socket.SHUT_WR)
                self._drain(channel, time.monotonic() + timeout)
            finally:
                channel.close()
        except (OSError, ProtocolError) as exc:
            logger.warning('cluster %s closed while dispyscheduler %s:%s is unreachable '
                           '(%s): it ends there after --zombie_interval', self.cluster.name,
                           self.addr, self.port, exc)

    def close(self):
        with self.lock:
            self.closing = True
            conn = self.conn
        if conn is not None:
            conn.close('closed')

    def add_allocations(self, cluster, allocs):
        self._node_op('allocate', None, [self._alloc_entry(cluster, a) for a in allocs])

    # -- jobs ---------------------------------------------------------------------------------
    def submit(self, job):
        with self.lock:
            job._key = next(self.hub.keys[1])
            if job._id is None:
                job._id = job._key
            self.jobs[job._key] = job
            job._cluster.job_submitted(job)
            if self.error is not None:
                self._end_job(job, DispyJob.Terminated, exception=self.error)
            elif self.ready:
                self._send_job(job)
        return job

    def _send_job(self, job):
        """To the scheduler (lock held).  ``_attempt``: 0 never sent, 1 sent on this
        connection, 2 sent before but perhaps lost (sent again when ready)."""
        conn = self.conn
        if conn is None:
            return
        if blob_size(job._blob) > conn.channel.peer_max_frame - 65536:
            self._end_job(job, DispyJob.Terminated, exception=(
                'arguments of %d bytes exceed dispyscheduler\'s frame limit of %d bytes '
                '(its --max_frame_size)' % (blob_size(job._blob), conn.channel.peer_max_frame)))
            return
        options = dict(job._options or {})
        if job._pin is not None:
            options['node'] = job._pin
        if conn.send(Msg.JOB(job._key, 0, 0, job._blob, options or None)):
            job._attempt = 1
            job._cluster.job_dispatched(job, self.view)

    def cancel(self, job, reason='Cancelled'):
        with self.lock:
            if job.status in FINAL_STATUSES:
                return -1
            if job._attempt == 0:       # the scheduler never had it
                self._end_job(job, DispyJob.Cancelled, exception=reason)
                return 0
            self.cancels.add(job._key)  # sent again after a reconnect until the job ends
            if self.conn is not None and self.ready:
                self.conn.send(Msg.CANCEL(job._key, 0))
            return 0

    def open_jobs(self, cluster):
        with self.lock:
            return list(self.jobs.values())

    def jobs_on_nodes(self, cluster):
        with self.lock:
            return sum(1 for job in self.jobs.values() if job.status == DispyJob.Running)

    def abort(self, cluster, reason, grace=5.0):
        with self.lock:
            jobs = list(self.jobs.values())
            for job in jobs:
                self.cancel(job, reason)
            self.cond.wait_for(lambda: all(j.status in FINAL_STATUSES for j in jobs), grace)
            for job in jobs:
                self._end_job(job, DispyJob.Cancelled, exception=reason)

    def _end_job(self, job, status, result=None, stdout=None, stderr=None, exception=None,
                 end_time=None, ip=None):
        if job.status in FINAL_STATUSES:
            return
        self.jobs.pop(job._key, None)
        self.cancels.discard(job._key)
        job._ended(status, result, stdout, stderr, exception, end_time)
        job.ip_addr = ip or job.ip_addr
        view = self.nodes.get(job.ip_addr) if job.ip_addr else None
        job._cluster.job_ended(job, view)

    # -- node methods: asked of the scheduler -------------------------------------------------
    def _node_op(self, op, addr, arg, timeout=None):
        """Sends NODE_OP and waits for its OP_DONE (-1 when none comes in time)."""
        token = next(self.tokens)
        with self.lock:
            if self.conn is None or not self.ready:
                logger.error('%s: not connected to dispyscheduler %s:%s', op, self.addr,
                             self.port)
                return -1
            self.conn.send(Msg.NODE_OP(token, op, addr, arg))
            if not self.cond.wait_for(lambda: token in self.replies, timeout or 2 * MsgTimeout):
                return -1
            return self.replies.pop(token)

    def deallocate(self, cluster, addr):
        return self._node_op('deallocate', addr, None)

    def set_node_cpus(self, cluster, addr, cpus):
        cpus = self._node_op('set_cpus', addr, int(cpus))
        if cpus == -2:
            logger.warning('set_node_cpus(%s): the nodes of a SharedJobCluster are shared with '
                           'other programs, so their CPUs stay as they are (dispyscheduler '
                           'changes them only when started with --cooperative)', addr)
            return -1
        return cpus

    def node_jobs(self, cluster, addr):
        with self.lock:
            return [j for j in self.jobs.values()
                    if j.ip_addr == addr and j.status == DispyJob.Running]

    def close_node(self, cluster, addr, terminate, resetup=False):
        return self._node_op('resetup' if resetup else 'close', addr, bool(terminate))

    def send_file(self, cluster, addr, path, timeout):
        name = os.path.basename(path)
        token = ('put', addr, name)
        with self.lock:
            conn = self.conn if self.ready else None
            self.replies.pop(token, None)
        if conn is None:
            logger.error('send_file: not connected to dispyscheduler %s:%s', self.addr,
                         self.port)
            return -1
        try:
            if not send_file_chunks(conn.send, Msg.PUT_FILE, addr, name, path):
                return -1
        except OSError as exc:
            logger.error('send_file: %s', exc)
            return -1
        with self.lock:
            if not self.cond.wait_for(lambda: token in self.replies, timeout):
                return -1
            error = self.replies.pop(token)
        if error:
            logger.error('send_file: %s refused by node %s: %s', name, addr, error)
            return -1
        return 0

    def traffic(self, addr):
        return 0, 0     # the scheduler's connections to nodes are its own

    # -- the connection (loop thread) --------------------------------------------------------
    def _dial(self):
        with self.lock:
            if self.closing or self.dialing or self.conn is not None:
                return
            self.dialing = True
        steps = handshake_steps(self.secret, True, {'role': 'client'}, self.max_frame)
        LoopDial(self.loop, self.addr, self.port, self.ssl_context, steps, self.max_frame,
                 MsgTimeout, self._dialed, self._dial_failed, 'dispyscheduler').start()

    def _dialed(self, channel, extra):
        with self.lock:
            self.dialing = False
            if self.closing:
                channel.close()
                return
            self.conn = LoopConnection(channel, self, 'dispyscheduler', self.loop,
                                       self.threads, extra)
            self.conn.send(Msg.CLIENT(dict(self.hub.client, cluster=self.uid,
                                           number=self.number)))
            self.pulse_interval = DEFAULT_PULSE_INTERVAL
            self.conn.start()

    def _dial_failed(self, exc):
        with self.lock:
            self.dialing = False
            # a scheduler not up yet (refused, unreachable) is waited for; one that keeps
            # failing the handshake is not a scheduler this cluster can use
            self.failures = self.failures + 1 if isinstance(exc, ProtocolError) else 0
            final = isinstance(exc, (AuthError, VersionError, ssl.SSLError)) or (
                isinstance(exc, ProtocolError) and self.failures >= self.REFUSALS)
            if final and self.number is None:
                # never got in: a wrong secret or TLS file, or not a dispyscheduler there
                self._refused('dispyscheduler %s:%s refused the connection: %s%s' % (
                    self.addr, self.port, exc, ' (the cluster\'s secret must be the '
                    'scheduler\'s --cluster_secret)' if isinstance(exc, AuthError) else ''))
                return
            self._redial_later('cannot connect to dispyscheduler %s:%s: %s'
                               % (self.addr, self.port, exc), exc)

    def _refused(self, text):
        """The cluster cannot run (lock held): its jobs, and any submitted later, end
        Terminated with ``text``; nothing is dialed again."""
        if self.error is None:
            logger.error('cluster %s: %s', self.cluster.name, text)
        self.error = text
        self.closing = True
        for job in list(self.jobs.values()):
            self._end_job(job, DispyJob.Terminated, exception=text)
        self.cond.notify_all()

    REFUSALS = 5    # handshakes that fail before the first answer: the cluster cannot run

    def _redial_later(self, text, exc=None):
        self.next_dial = time.monotonic() + SCHEDULER_REDIAL[min(self.retry,
                                                                 len(SCHEDULER_REDIAL) - 1)]
        self.retry += 1
        if isinstance(exc, AuthError):
            text += ' (is cluster_secret of dispyscheduler the secret of this cluster?)'
        if not self.warned or self.retry % 20 == 0:
            logger.warning('%s; trying again', text)
            self.warned = True

    def on_closed(self, conn, reason):
        with self.lock:
            if conn is not self.conn:
                return
            self.conn = None
            self.ready = False
            if not self.closing:
                self.retry = 0
                self._redial_later('connection to dispyscheduler %s:%s lost (%s)'
                                   % (self.addr, self.port, reason))

    def _tick(self):
        now = time.monotonic()
        with self.lock:
            conn = self.conn
            if conn is None:
                if not self.dialing and not self.closing and now >= self.next_dial:
                    self.loop.call_soon(self._dial)
                return
        if conn.idle_send >= DEFAULT_PULSE_INTERVAL:
            conn.send(Msg.PULSE(time.time()))
        if now - conn.last_recv > DEAD_PULSES * max(self.pulse_interval, DEFAULT_PULSE_INTERVAL):
            conn.close('no message from dispyscheduler for %.0f s' % (now - conn.last_recv))

    # -- what the scheduler sends ----------------------------------------------------------
    def on_messages(self, conn, msgs):
        loaded = []
        for msg in msgs:
            kind = FROM_SCHEDULER.get(msg[0]) if isinstance(msg, tuple) and msg else None
            if kind is None:
                logger.warning('dispyscheduler sent an unknown message')
                continue
            try:
                record = kind.read(msg)
                if kind is Msg.SEND_FILE:
                    self._save_file(record)
                    continue
                loaded.append((kind.name, record, _load_blob(record)))
            except (ProtocolError, TypeError, ValueError) as exc:
                logger.warning('dispyscheduler sent a malformed %s: %s', msg[0], exc)
        acks = []
        with self.lock:
            if conn is not self.conn:
                return
            for name, record, blob in loaded:
                try:
                    self.handlers[name](self, record, blob, acks)
                except (ProtocolError, TypeError, ValueError, KeyError) as exc:
                    logger.warning('dispyscheduler sent a malformed %s: %s', name, exc)
            if acks:
                conn.send(Msg.ACK(acks))

    def _save_file(self, msg):
        with self.lock:
            job = self.jobs.get(msg.key)
        if job is not None:
            self.cluster.job_file(job, msg.path, msg.mode, msg.offset, msg.data, msg.last)

    def _on_node(self, msg, _blob, _acks):
        info = msg.info if isinstance(msg.info, dict) else {}
        self.retry = 0
        if self.warned:
            logger.warning('connected to dispyscheduler %s:%s again', self.addr, self.port)
            self.warned = False
        self.number = info.get('number', self.number)
        received = info.get('received') if info.get('known') else 0
        for job in self.jobs.values():  # lost with a connection, or with the scheduler
            if job._attempt and (type(received) is not int or job._key > received):
                job._attempt = 2
        try:
            self.pulse_interval = float(info.get('pulse_interval') or DEFAULT_PULSE_INTERVAL)
        except (TypeError, ValueError):
            pass
        if info.get('known'):       # it kept the cluster: what it never got follows
            self._cluster_ready()
            return
        self.threads.submit(self._send_cluster, self.conn)

    def _send_cluster(self, conn):
        """CLUSTER and its files (a worker thread: files may be big)."""
        cluster = self.cluster
        package = cluster._package
        info = cluster._shared_info()
        specs, files, entries = [package.spec], dict(package.files), []
        for alloc in list(cluster.allocations):
            index = 0       # the common spec, unless the NodeAllocate adds its own parts
            if getattr(alloc, 'setup_args', None) is not None or getattr(alloc, 'depends', None):
                spec, alloc_files = package.for_node(alloc)
                files.update(alloc_files)
                specs.append(spec)
                index = len(specs) - 1
            entries.append(self._alloc_entry(cluster, alloc, index))
        info.update(specs=specs, allocations=entries, files=sorted(files))
        conn.send(Msg.CLUSTER(info))
        try:
            for name in info['files']:
                if not send_file_chunks(conn.send, Msg.FILE, 0, name, files[name]):
                    return
        except OSError as exc:
            logger.error('cannot send %s to dispyscheduler: %s', exc.filename, exc)
            conn.close('cannot send the computation\'s files')

    @staticmethod
    def _alloc_entry(cluster, alloc, spec=0):
        """A NodeAllocate as the scheduler gets it: host, port, CPUs, whether the
        scheduler must ask this program (a subclass's own ``allocate``), its index
        here, and which of the cluster's specs its nodes get."""
        custom = type(alloc).allocate is not NodeAllocate.allocate
        port = alloc.port if (cluster._explicit_node_port
                              or alloc.port != cluster._options['node_port']) else None
        return [alloc.host, port, alloc.cpus, custom,
                cluster.allocations.index(alloc) if alloc in cluster.allocations else -1,
                spec]

    def _on_cluster_ready(self, msg, _blob, _acks):
        if msg.error:
            self._refused('dispyscheduler %s:%s refused the cluster: %s'
                          % (self.addr, self.port, msg.error))
            return
        self._cluster_ready()

    def _cluster_ready(self):
        self.ready = True
        for job in sorted(self.jobs.values()):     # in key order (see _on_node)
            if job._attempt != 1:
                self._send_job(job)
        for key in self.cancels:
            self.conn.send(Msg.CANCEL(key, 0))
        self.cond.notify_all()

    def _on_state(self, msg, _blob, _acks):
        job = self.jobs.get(msg.key)
        if job is None:
            return
        job.status = msg.status
        job.ip_addr = msg.ip
        job.start_time = msg.start_time or job.start_time
        job._cluster.job_changed(job, msg.status)

    def _on_done(self, msg, loaded, acks):
        acks.append((msg.key, 0))
        job = self.jobs.get(msg.key)
        if job is None:
            return      # had it already (sent again after a reconnect)
        result, error = loaded
        status, exception = msg.status, msg.exception
        if error is not None:
            status = DispyJob.Terminated
            exception = 'result could not be unpickled at the client: %s' % error
        job.start_time = msg.start_time or job.start_time
        if msg.retried:     # its failed runs, retried by the scheduler (plain tuples)
            try:
                job._tries = [JobAttempt(*attempt) for attempt in msg.retried]
            except TypeError:
                logger.warning('dispyscheduler sent malformed attempts of job %s', job.id)
        self._end_job(job, status, result, msg.stdout, msg.stderr, exception, msg.end_time,
                      msg.ip)

    def _on_provisional(self, msg, loaded, _acks):
        job = self.jobs.get(msg.key)
        result, error = loaded
        if job is None or error is not None:
            return
        _provisional(job, result)

    def _on_output(self, msg, _blob, _acks):
        job = self.jobs.get(msg.key)
        if job is not None:
            job._cluster.job_output(job, *checked_output(msg)[2:])

    def _on_node_status(self, msg, _blob, _acks):
        if msg.status == SETUP_FAILED:
            logger.error('setup of cluster %s failed on node %s: %s', self.cluster.name,
                         msg.node.get('ip_addr'), msg.node.get('error'))
            return
        view = _NodeView.read(msg.node, self.cluster.key)
        self.nodes[view.ip_addr] = view
        self.cluster.node_changed(view, msg.status)

    def _on_allocate(self, msg, _blob, _acks):
        self.threads.submit(self._allocate, self.conn, msg.token, msg.index,
                            _NodeView.read(msg.node, self.cluster.key))

    def _allocate(self, conn, token, index, view):
        """A NodeAllocate subclass's ``allocate()`` (user code: here, not at the
        scheduler), on a worker thread."""
        cpus = 0
        try:
            alloc = self.cluster.allocations[index]
            cpus = int(alloc.allocate(self.cluster, view.ip_addr, view.name, view.cpus,
                                      view.avail_info, view.platform) or 0)
        except Exception:
            logger.exception('allocate() failed for node %s', view.ip_addr)
        conn.send(Msg.ALLOCATED(token, cpus))

    def _on_op_done(self, msg, _blob, _acks):
        self.replies[msg.token] = msg.value
        self.cond.notify_all()

    def _on_put_file_done(self, msg, _blob, _acks):
        self.replies[('put', msg.cluster, msg.name)] = msg.error
        self.cond.notify_all()

    def _on_pulse(self, msg, _blob, _acks):
        pass

    handlers = {'NODE': _on_node, 'CLUSTER_READY': _on_cluster_ready, 'STATE': _on_state,
                'DONE': _on_done, 'PROVISIONAL': _on_provisional, 'OUTPUT': _on_output,
                'NODE_STATUS': _on_node_status, 'ALLOCATE': _on_allocate,
                'OP_DONE': _on_op_done, 'PUT_FILE_DONE': _on_put_file_done,
                'PULSE': _on_pulse}


class SharedJobCluster(JobCluster):
    """A JobCluster whose jobs a dispyscheduler places on nodes that many programs
    share (``scheduler_node``, default this host; ``scheduler_port``, default 51349).

    Every JobCluster keyword and method works; the program talks only to the
    scheduler (one outgoing connection: it listens on no port).  ``exclusive=True``:
    the scheduler runs this cluster's jobs alone, once the clusters running before it
    have closed.  ``pulse_interval`` and ``ping_interval`` belong to the scheduler's
    command line here; ``set_node_cpus`` changes nothing unless the scheduler runs
    ``--cooperative`` (the nodes are shared).
    """

    def __init__(self, computation, nodes=None, depends=[], callback=None,
                 cluster_status=None, ip_addr=None, port=None, scheduler_node=None,
                 scheduler_port=None, ext_ip_addr=None, dest_path=None, recover_file=None,
                 loglevel=None, setup=None, cleanup=True, reentrant=False, exclusive=False,
                 secret=None, keyfile=None, certfile=None, cafile=None, job_timeout=None,
                 max_frame_size=None, job_status=None, fresh_process=False,
                 pulse_interval=None, ping_interval=None, node_port=None, job_retries=0,
                 stream_output=False, **ignored):
        for name, value in (('pulse_interval', pulse_interval), ('ping_interval',
                            ping_interval), ('port', port), ('ip_addr', ip_addr),
                            ('ext_ip_addr', ext_ip_addr)):
            if value is not None:
                logger.warning('SharedJobCluster: %s is not used: %s', name,
                               self._IGNORED_WHY.get(name))
        for name in ignored:
            if name not in ('host', 'ext_host', 'dispy_port'):
                raise TypeError('SharedJobCluster() got an unexpected keyword argument %r'
                                % name)
            logger.warning('SharedJobCluster: %s is not used: %s', name, self._IGNORED_WHY[
                {'host': 'ip_addr', 'ext_host': 'ext_ip_addr', 'dispy_port': 'port'}[name]])
        self._exclusive = bool(exclusive)
        host = scheduler_node or os.environ.get('DISPY_SCHEDULER_NODE') or socket.gethostname()
        self._scheduler_addr = resolve_host(host)
        if self._scheduler_addr is None:
            raise ValueError('scheduler_node %r is not a usable address or host name' % host)
        self._scheduler_port = int(_env_default(scheduler_port, 'DISPY_SCHEDULER_PORT',
                                                SCHEDULER_PORT, int))
        self._explicit_node_port = (node_port is not None
                                    or bool(os.environ.get('DISPY_NODE_PORT')))
        JobCluster.__init__(self, computation, nodes=nodes, depends=depends,
                            callback=callback, cluster_status=cluster_status,
                            node_port=node_port, dest_path=dest_path,
                            recover_file=recover_file, loglevel=loglevel, setup=setup,
                            cleanup=cleanup, reentrant=reentrant, secret=secret,
                            keyfile=keyfile, certfile=certfile, cafile=cafile,
                            job_timeout=job_timeout, max_frame_size=max_frame_size,
                            job_status=job_status, fresh_process=fresh_process,
                            job_retries=job_retries, stream_output=stream_output)

    _IGNORED_WHY = {
        'pulse_interval': 'dispyscheduler watches the nodes (its --pulse_interval)',
        'ping_interval': 'dispyscheduler looks for nodes (its --ping_interval)',
        'port': 'a SharedJobCluster listens on no port (it connects to the scheduler)',
        'ip_addr': 'a SharedJobCluster listens on no address (it connects to the scheduler)',
        'ext_ip_addr': 'nodes never connect to a SharedJobCluster (only to the scheduler)'}

    def _make_scheduler(self):
        return RemoteScheduler(self._hub, self._options, self._scheduler_addr,
                               self._scheduler_port)

    def _hub_options(self):
        return dict(self._options, port=None, explicit_port=False, explicit_ip_addrs=False)

    def _shared_info(self):
        """What CLUSTER tells the scheduler of this cluster (specs filled by the caller)."""
        return {'name': self.name, 'exclusive': self._exclusive, 'reentrant': self.reentrant,
                'status': bool(self._status_cb), 'specs': []}


# ================================================================================
# Client API: ClusterExecutor (a concurrent.futures.Executor over a cluster)
# ================================================================================
#
# The path of one call::
#
#     user thread   executor.submit(fn, *args): _pickle_with_refs pickles (fn, calls) and
#         │         notes the functions and classes of the client's __main__ it refers
#         │         to; _CallShipping.bundle: their source and the globals they use, as
#         │         steps (made once per function, cached) → one job of the executor's
#         ▼         JobCluster, whose computation is dispy_executor_run(bundle, call)
#     node          dispy_executor_run runs the steps into the job's globals (compiled
#         │         once per worker process), unpickles the call and makes it: one
#         ▼         outcome per call, (True, value) or (False, type, traceback, ...)
#     notifier      ClusterExecutor._job_status (Running: futures set running) and
#                   _job_ended: set_result / set_exception on the call's futures
#
# The job's globals are the node's usual per-job copy: what one job's steps define is
# gone before the next job, so jobs of different functions never see each other's.

def dispy_executor_run(bundle, call, _compiled={}):
    """The computation of every ClusterExecutor, run on the nodes (shipped as source: it
    uses nothing of dispy).  Runs the steps of ``bundle`` in the job's globals (sources
    of the client's functions and classes, import lines, pickled globals), then the calls
    that ``call`` holds.  One outcome per call: (True, value), or (False, type name,
    traceback text, pickled exception or None, why it is None).  ``_compiled`` keeps the
    code of the steps for the worker's later jobs."""
    import linecache
    import pickle
    import traceback

    def failed(exc):
        text = ''.join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        try:
            blob, why = pickle.dumps(exc, 4), None
        except Exception as error:
            blob, why = None, 'it cannot be pickled on the node (%r)' % error
        return (False, type(exc).__qualname__, text, blob, why)

    def compiled(source, filename, flags):
        code = _compiled.get((source, filename, flags))
        if code is None:
            if len(_compiled) > 256:
                _compiled.clear()
            # flags: the client module's `from __future__ import annotations`, if any
            code = _compiled[source, filename, flags] = compile(source, filename, 'exec',
                                                                flags, True)
            entry = linecache.cache.get(filename)       # tracebacks show the client's lines
            lines = list(entry[2]) if entry and entry[1] is None else []
            new = source.splitlines(True)
            lines.extend([''] * (len(new) - len(lines)))
            for i, line in enumerate(new):
                lines[i] = line if line.strip() else lines[i]
            linecache.cache[filename] = (len(lines), None, lines, filename)
        return code

    ns = globals()
    try:
        for step in (pickle.loads(bundle) if bundle else ()):
            if step[0] == 'value':
                ns[step[1]] = pickle.loads(step[2])
            else:
                exec(compiled(*step[1:]), ns)
        target, calls = pickle.loads(call)
        fn = ns[target] if isinstance(target, str) else target
    except BaseException as exc:
        return [failed(exc)]
    outcomes = []
    for args, kwargs in calls:
        try:
            outcomes.append((True, fn(*args, **kwargs)))
        except BaseException as exc:
            outcomes.append(failed(exc))
    return outcomes


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a node, as text (``text``; ``node``: its
    address).  A ClusterExecutor attaches it as the ``__cause__`` of the exception that
    ``Future.result()`` raises, so the traceback printed shows both."""

    def __init__(self, text, node=None):
        super().__init__(text)
        self.text = text
        self.node = node

    def __str__(self):
        return '\n"""\n%s%s"""' % ('on node %s:\n' % self.node if self.node else '', self.text)


class RemoteError(Exception):
    """An exception raised on a node that cannot be raised here as itself (it does not
    pickle on the node, or does not unpickle here): ``type_name``, ``remote_traceback``
    (text; also the ``__cause__``) and ``reason``."""

    def __init__(self, message, type_name=None, remote_traceback=None, reason=None):
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        self.reason = reason


class JobFailed(Exception):
    """A call that the cluster could not complete: its job ended without a result
    (its node was lost and the executor is not ``reentrant``, it ran past
    ``job_timeout``, it was cancelled by the cluster, its result did not pickle or
    unpickle).  ``status`` is the job's (``DispyJob.Cancelled``, ``Terminated``,
    ``Abandoned``), ``reason`` dispy's text, ``job`` the DispyJob (ip_addr, stdout, ...)."""

    def __init__(self, message, status=None, reason=None, job=None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.job = job

    @classmethod
    def of(cls, job):
        where = ' on node %s' % job.ip_addr if job.ip_addr else ''
        return cls('the job of this call ended %s%s: %s' % (
            STATUS_NAMES.get(job.status, job.status), where, job.exception or 'no reason given'),
            job.status, job.exception, job)


def _remote_exception(outcome, node):
    """The exception to raise for a failed call: the node's own, its traceback attached,
    or a RemoteError saying why it cannot be."""
    _, type_name, text, blob, why = outcome
    cause = RemoteTraceback(text, node)
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception as error:
            why = 'it cannot be unpickled here (%r)' % error
        else:
            if isinstance(exc, BaseException):
                exc.__cause__ = cause
                return exc
            why = 'it unpickled as %r, not an exception' % (exc,)
    last = text.strip().splitlines()[-1] if text.strip() else type_name
    error = RemoteError('%s raised on node %s cannot be raised here as itself: %s; it was: %s'
                        % (type_name, node, why, last), type_name, text, why)
    error.__cause__ = cause
    return error


# -- what the nodes need to run the client's own functions ---------------------------------

_GLOBAL_LOADS = frozenset(('LOAD_NAME', 'LOAD_FROM_DICT_OR_GLOBALS'))   # also class bodies'
_GLOBAL_STORES = frozenset(('STORE_GLOBAL', 'DELETE_GLOBAL'))
_NODE_PROVIDED = frozenset(('os', 'sys', 'time'))    # every job's globals have these
_EXECUTOR_FILE = '<dispy executor>'


def _code_names(code):
    """(names its code and nested code load as globals for sure, names that may be
    globals (class bodies), names it assigns as globals, every name it uses: attribute
    names too)."""
    import dis      # here: only executors need it (3 ms of every program's start)
    sure, maybe, stored, every = set(), set(), set(), set()
    todo = [code]
    while todo:
        co = todo.pop()
        every.update(co.co_names)
        for ins in dis.get_instructions(co):
            if ins.opname == 'LOAD_GLOBAL':
                sure.add(ins.argval)
            elif ins.opname in _GLOBAL_LOADS:
                maybe.add(ins.argval)
            elif ins.opname in _GLOBAL_STORES:
                stored.add(ins.argval)
        todo.extend(c for c in co.co_consts if isinstance(c, types.CodeType))
    return sure, maybe, stored, every


def _statement_names(source):
    """Names that a def or class statement evaluates when it runs (decorators,
    defaults, annotations, bases, class bodies), not those of the function bodies."""
    names = set()
    todo = list(ast.parse(source).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            todo.extend(args.defaults)
            todo.extend(d for d in args.kw_defaults if d is not None)
            if not isinstance(node, ast.Lambda):
                todo.extend(node.decorator_list)
                every = args.posonlyargs + args.args + args.kwonlyargs + [args.vararg,
                                                                          args.kwarg]
                todo.extend(a.annotation for a in every if a is not None and a.annotation)
                todo.extend([node.returns] if node.returns else [])
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        todo.extend(ast.iter_child_nodes(node))
    return names


def _is_main_definition(value):
    """A function or class of the client's __main__ (or a callable wrapping one, like
    functools.lru_cache's): pickled by name, so the nodes need its source."""
    if getattr(value, '__module__', None) != '__main__':
        return False
    return (inspect.isfunction(value) or inspect.isclass(value)
            or (callable(value) and inspect.isfunction(getattr(value, '__wrapped__', None))))


def _class_functions(cls, filename):
    """The functions a class statement of ``filename`` defined (methods, static and
    class methods, properties, those of nested classes); not generated ones."""
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        found = ([value.fget, value.fset, value.fdel] if isinstance(value, property)
                 else [value])
        for func in found:
            if inspect.isclass(func) and func.__qualname__.startswith(cls.__qualname__ + '.'):
                yield from _class_functions(func, filename)
            elif inspect.isfunction(func):
                func = inspect.unwrap(func)
                if func.__code__.co_filename == filename:
                    yield func


_FUTURE_ANNOTATIONS = 0x1000000     # __future__.annotations.compiler_flag (3.7+)
BIG_BUNDLE = 1 << 20                # what a call's functions and globals take: warned past


def _definition(obj, what):
    """(step defining it, names it needs for sure, names it may need, its module's
    globals, every name its code uses) of a function or class shipped by source."""
    base = obj if inspect.isclass(obj) else inspect.unwrap(obj)
    rebuilt = _namedtuple_step(base)
    if rebuilt is not None:
        return rebuilt, set(), set(), {}, set()
    try:
        source = _function_source(base, what)
    except ComputationError as exc:
        made_by_call = (' (if %s was made by a call, such as Enum() or type(), it has no '
                        'source: define it with a class statement, e.g. class %s(enum.Enum))'
                        % (base.__name__, base.__name__) if inspect.isclass(base) else '')
        raise TypeError('ClusterExecutor: %s%s' % (exc, made_by_call)) from None
    if inspect.isclass(base):
        filename = inspect.getsourcefile(base) or _EXECUTOR_FILE
        lineno = inspect.getsourcelines(base)[1]
        module_globals = vars(sys.modules[base.__module__])
        codes = [func.__code__ for func in _class_functions(base, filename)]
    else:
        filename, lineno = base.__code__.co_filename, base.__code__.co_firstlineno
        module_globals, codes = base.__globals__, [base.__code__]
    sure, maybe, stored, every = set(), _statement_names(source), set(), set()
    for code in codes:
        names = _code_names(code)
        sure |= names[0]
        maybe |= names[1]
        stored |= names[2]
        every |= names[3]
    import __future__
    future = (_FUTURE_ANNOTATIONS if module_globals.get('annotations')
              is __future__.annotations else 0)
    # blank lines first: the line numbers of tracebacks on the node are the client's
    step = ('code', '\n' * (lineno - 1) + source, filename, future)
    sure -= stored              # assigned by the definition: need not exist yet
    return step, sure, (maybe | stored) - sure, module_globals, every


def _namedtuple_step(cls):
    """The step that makes a namedtuple class of the client's on a node (it was made
    by a call: there is no source), or None for anything else."""
    fields = getattr(cls, '_fields', None)
    if not (inspect.isclass(cls) and issubclass(cls, tuple) and isinstance(fields, tuple)
            and cls.__bases__ == (tuple,)):
        return None
    defaults = tuple(getattr(cls, '_field_defaults', {}).values())
    try:
        if ast.literal_eval(repr(defaults)) != defaults:
            return None
    except (ValueError, SyntaxError):
        return None
    return ('code', '%s = __import__(%r).namedtuple(%r, %r, defaults=%r, module=%r)' % (
        cls.__name__, 'collections', cls.__name__, fields, defaults, '__main__'),
        _EXECUTOR_FILE, 0)


def _outer_class(obj):
    """The top-level class of __main__ that a function (or class) defined inside it
    belongs to (a static method, a method used as Shape.area), or None."""
    qualname = getattr(obj, '__qualname__', '')
    if (not isinstance(qualname, str) or '.' not in qualname or '<locals>' in qualname
            or getattr(obj, '__module__', None) != '__main__'):
        return None
    outer = getattr(sys.modules.get('__main__'), qualname.split('.')[0], None)
    return outer if inspect.isclass(outer) else None


def _import_line(module, name):
    if module.__name__ == '__main__':
        return None
    if module.__name__ == name:
        return 'import %s' % name
    return 'import %s as %s' % (module.__name__, name)


def _from_import_line(value, name):
    """'from mod import f as name' for a function or class another module defines (the
    nodes must have that module), else None."""
    if not (inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value)):
        return None
    module, qualname = getattr(value, '__module__', None), getattr(value, '__qualname__', '')
    if (not isinstance(module, str) or module == '__main__' or not isinstance(qualname, str)
            or not qualname.isidentifier()
            or getattr(sys.modules.get(module), qualname, None) is not value):
        return None
    return 'from %s import %s' % (module, qualname) + (' as %s' % name if name != qualname
                                                        else '')


class _CallPickler(_ArgsPickler):
    """_ArgsPickler that notes the client's decorated callables too (lru_cache & co.
    pickle by name as well)."""

    def reducer_override(self, obj):
        if (not isinstance(obj, (type, types.FunctionType)) and _is_main_definition(obj)
                and obj not in self.main_refs):
            self.main_refs.append(obj)
            return NotImplemented
        return super().reducer_override(obj)


def _pickle_with_refs(obj):
    """(pickle of obj, the client's own functions and classes it refers to)."""
    buf = io.BytesIO()
    pickler = _CallPickler(buf)
    pickler.dump(obj)
    return buf.getvalue(), pickler.main_refs


class _Shipment:
    """The steps that define on a node the client's own functions and classes given,
    and the globals they use, in an order that runs (what a definition needs, first).

    For each global name a definition uses: a module → an import line; a function or
    class of __main__ → its source (recursively; cycle-safe); one of another module →
    a from-import line; any other value → pickled (bound on the node).  A name it needs
    that is nowhere → NameError; a value that does not pickle → TypeError (naming it).
    """

    def __init__(self, node_names):
        self.node_names = node_names    # what the cluster's depends and setup define there
        self.steps = {}                 # step -> None: ordered, without duplicates
        self.seen = set()               # ids of the definitions visited

    def define(self, obj, what):
        if id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        outer = _outer_class(obj)
        if outer is not None:       # Shape.area pickles as Shape's attribute: ship Shape
            self.define(outer, 'class %s of %s' % (outer.__name__, what))
            return
        step, sure, maybe, module_globals, every = _definition(obj, what)
        owner = '%s %s' % ('class' if inspect.isclass(obj) else 'function',
                           getattr(obj, '__qualname__', obj))
        for name in sorted(sure | maybe):
            self.need(owner, name, module_globals, name in sure, every)
        self.steps[step] = None

    def need(self, owner, name, module_globals, sure, every=()):
        if name in self.node_names or (name.startswith('__') and name.endswith('__')):
            return
        if name not in module_globals:
            if (sure and name not in vars(builtins) and name not in _NODE_PROVIDED
                    and not name.startswith('dispy_')):
                raise NameError('ClusterExecutor: %s uses the name %r, which is neither a '
                                'global of its module nor a builtin, so the call would fail '
                                'on the node: define %s (at module level) before submit, or '
                                'pass it as an argument' % (owner, name, name))
            return
        value = module_globals[name]
        if isinstance(value, types.ModuleType):
            self.line(_import_line(value, name))
            # `import xml.etree.ElementTree` binds xml: what the code reaches of it
            # by attribute is loaded too (a package does not load its submodules)
            prefix = value.__name__ + '.'
            for sub in sorted(m for m in list(sys.modules) if m.startswith(prefix)):
                if all(part in every for part in sub[len(prefix):].split('.')):
                    self.line('__import__(%r)' % sub)
        elif _is_main_definition(value):
            self.define(value, 'global %r of %s' % (name, owner))
            if value.__name__ != name:
                self.line('%s = %s' % (name, value.__name__))
        elif not self.line(_from_import_line(value, name)):
            self.value(owner, name, value)

    def line(self, text):
        if text:
            self.steps[('code', text, _EXECUTOR_FILE, 0)] = None
        return text

    def value(self, owner, name, value):
        try:
            blob, refs = _pickle_with_refs(value)
        except Exception as exc:
            raise TypeError('ClusterExecutor: %s uses the global %r (%s), which cannot be '
                            'pickled to send it to the nodes (%s): create it inside the '
                            'function or in setup=, or pass what it holds as an argument'
                            % (owner, name, type(value).__name__, exc)) from None
        for ref in refs:
            self.define(ref, 'class or function of the global %r of %s' % (name, owner))
        self.steps[('value', name, blob)] = None


class _CallShipping:
    """One executor's bundles: the pickled steps for each set of the client's functions
    and classes that calls refer to, made at the first call that needs them.  Globals
    shipped by value are those at that first call."""

    def __init__(self, node_names):
        self.node_names = node_names
        self._bundles = {}      # tuple of definitions -> pickled steps

    def bundle(self, definitions):
        key = tuple(definitions)
        blob = self._bundles.get(key)
        if blob is None:
            shipment = _Shipment(self.node_names)
            for obj in definitions:
                shipment.define(obj, 'function' if not inspect.isclass(obj) else 'class')
            if len(self._bundles) > 1000:
                self._bundles.clear()
            blob = self._bundles[key] = dumps_blob(list(shipment.steps))
            if blob_size(blob) > BIG_BUNDLE:
                logger.warning('ClusterExecutor: %s and the globals it uses take %s, sent '
                               'with every job: load big data in setup= (or ship it in '
                               'depends=) to send it once per node',
                               ', '.join(getattr(d, '__qualname__', str(d)) for d in key),
                               _human_bytes(blob_size(blob)))
        return blob


def _names_on_nodes(package, setup):
    """Globals the nodes define for every job of the cluster: depends (functions,
    classes, objects, modules) and what setup assigns with ``global``."""
    names = set(package.names) | set(package.spec['modules']) | package.object_names
    base = setup.func if isinstance(setup, functools.partial) else setup
    if inspect.isfunction(base):
        names |= _code_names(inspect.unwrap(base).__code__)[2]
    return frozenset(names)


def _call_target(fn):
    """(what the job pickles for ``fn``, definitions shipped by source for it): a
    nested function or a lambda cannot pickle by name, so it goes by source and name."""
    if inspect.isfunction(fn) and ('<locals>' in fn.__qualname__ or fn.__name__ == '<lambda>'):
        return fn.__name__, [fn]
    return fn, []


# -- the executor ----------------------------------------------------------------------------

class _CallBatch:
    """The futures of one job's calls (one for submit, a chunk for map), in order."""
    __slots__ = ('futures', 'job', 'notified')

    def __init__(self, count):
        self.futures = [concurrent.futures.Future() for _ in range(count)]
        self.job = None
        self.notified = set()       # futures given set_running_or_notify_cancel (once each)

    def all_cancelled(self):
        return all(f.cancelled() for f in self.futures)


_live_executors = set()
_EXECUTOR_REFUSED = {
    'computation': 'the executor runs the functions given to submit() and map()',
    'callback': 'use Future.add_done_callback', 'job_status': 'use Future.add_done_callback',
    'initializer': 'use setup= (it runs once per node, before the jobs)',
    'initargs': 'use setup=functools.partial(func, *args)',
    'mp_context': 'the calls run in processes on the nodes'}


class ClusterExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on the nodes of a cluster.

    ``ClusterExecutor(nodes=['*'], **options)``: the options are JobCluster's (secret,
    ip_addr, port, node_port, depends, setup, cleanup, reentrant, job_timeout, ...;
    ``cluster_status`` is called as well).  ``submit(fn, *args, **kwargs)`` returns a
    ``concurrent.futures.Future``; each call is one job (``map(chunksize=n)``: n calls a
    job).  A function of the client's main script travels as source, with the modules,
    functions, classes and values it uses; a function of another module is imported by
    name on the node.  ``max_workers`` (also an int given first, as ProcessPoolExecutor
    takes it) is accepted and ignored: the nodes' CPUs decide how many calls run at
    once.  ``cluster`` is the JobCluster (print_status, node operations).
    """

    def __init__(self, nodes=None, max_workers=None, **options):
        if isinstance(nodes, int) and not isinstance(nodes, bool) and max_workers is None:
            nodes, max_workers = None, nodes    # ProcessPoolExecutor(4): its max_workers
        if max_workers is not None and max_workers <= 0:
            raise ValueError('max_workers must be greater than 0')
        for name in options:
            if name in _EXECUTOR_REFUSED:
                raise TypeError('ClusterExecutor does not take %s: %s'
                                % (name, _EXECUTOR_REFUSED[name]))
        self._user_status = options.pop('cluster_status', None)
        self._cond = threading.Condition()
        self._batches = {}          # job id -> _CallBatch whose job has not ended
        self._ids = itertools.count(1)
        self._shutdown = False
        self._closing = threading.Lock()
        self.cluster = JobCluster(dispy_executor_run, nodes=nodes, callback=self._job_ended,
                                  cluster_status=self._job_status, **options)
        self._shipping = _CallShipping(_names_on_nodes(self.cluster._package,
                                                       options.get('setup')))
        _live_executors.add(self)

    # -- submitting ----------------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs):
        """Schedules ``fn(*args, **kwargs)`` on a node; returns its Future.  A function
        that cannot be shipped raises here (TypeError, NameError naming what)."""
        return self._submit_calls(fn, [(args, kwargs)])[0]

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """``fn`` over the iterables, results in order (lazily), like the standard
        executors; ``chunksize`` calls travel in one job."""
        if chunksize < 1:
            raise ValueError('chunksize must be >= 1.')
        end = None if timeout is None else time.monotonic() + timeout
        calls = ((args, {}) for args in zip(*iterables))
        futures = []
        try:
            while True:
                chunk = list(itertools.islice(calls, chunksize))
                if not chunk:
                    break
                futures.extend(self._submit_calls(fn, chunk))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return self._in_order(futures, end)

    @staticmethod
    def _in_order(futures, end):
        futures.reverse()
        try:
            while futures:
                future = futures.pop()
                try:
                    yield future.result(None if end is None else end - time.monotonic())
                finally:
                    future.cancel()         # (a no-op once done) the iterator was dropped
                    del future
        finally:
            for future in futures:
                future.cancel()

    def _submit_calls(self, fn, calls):
        if not callable(fn):
            raise TypeError('ClusterExecutor: %r is not callable' % (fn,))
        if self._shutdown:
            raise RuntimeError('cannot schedule new futures after shutdown')
        target, definitions = _call_target(fn)
        try:
            call, refs = _pickle_with_refs((target, calls))
        except Exception as exc:
            raise TypeError('ClusterExecutor: the call of %r cannot be pickled to send it to '
                            'a node: %s' % (fn, exc)) from None
        definitions += [ref for ref in refs if ref not in definitions]
        bundle = self._shipping.bundle(definitions) if definitions else None
        size = len(call) + len(bundle or b'')
        if size > self.cluster._max_frame - 65536:
            raise ValueError('ClusterExecutor: the call takes %d bytes pickled, over the frame '
                             'limit of %d (max_frame_size)' % (size, self.cluster._max_frame))
        batch = _CallBatch(len(calls))
        for future in batch.futures:
            future.add_done_callback(functools.partial(self._future_done, batch))
        job_id = next(self._ids)
        with self._cond:
            if self._shutdown:
                raise RuntimeError('cannot schedule new futures after shutdown')
            self._batches[job_id] = batch
        job = self.cluster.submit_job_id(job_id, bundle, call)
        if job is None:
            with self._cond:
                self._batches.pop(job_id, None)
                self._cond.notify_all()
            raise RuntimeError('ClusterExecutor: the job was not created (see the log)')
        batch.job = job
        if batch.all_cancelled():         # shutdown(cancel_futures=True) came meanwhile
            self.cluster.cancel(job)
        return batch.futures

    # -- futures and jobs (the notifier thread, or the thread cancelling) ----------------
    def _notify(self, batch, futures):
        """set_running_or_notify_cancel, once per future (lock held)."""
        for future in futures:
            if future not in batch.notified:
                batch.notified.add(future)
                future.set_running_or_notify_cancel()

    def _future_done(self, batch, future):
        """A future was cancelled (or resolved): its job goes when all its calls have."""
        if not future.cancelled():
            return
        with self._cond:
            self._notify(batch, [future])       # wait() and as_completed() see it now
            job = batch.job if batch.all_cancelled() else None
        if job is not None and job.status not in FINAL_STATUSES:
            self.cluster.cancel(job)

    def _job_status(self, status, node, job):
        if status == DispyJob.Running and job is not None:
            with self._cond:
                batch = self._batches.get(job.id)
                if batch is not None:
                    self._notify(batch, batch.futures)
        if self._user_status is not None:
            self._user_status(status, node, job)

    def _job_ended(self, job):
        if job.status not in FINAL_STATUSES:
            return                  # a provisional result
        with self._cond:
            batch = self._batches.pop(job.id, None)
            if batch is None:
                return
            self._notify(batch, batch.futures)
            self._cond.notify_all()
        live = [f for f in batch.futures if not f.cancelled()]
        if not live:
            return
        outcomes = job.result if job.status == DispyJob.Finished else None
        if not isinstance(outcomes, list):
            for future in live:
                future.set_exception(JobFailed.of(job))
            return
        if len(outcomes) != len(batch.futures):     # the bundle failed: every call did
            outcomes = outcomes[:1] * len(batch.futures)
        for future, outcome in zip(batch.futures, outcomes):
            if future.cancelled():
                continue
            if outcome[0]:
                future.set_result(outcome[1])
            else:
                future.set_exception(_remote_exception(outcome, job.ip_addr))
        job.result = None

    # -- ending ----------------------------------------------------------------------------
    def shutdown(self, wait=True, *, cancel_futures=False):
        """No more calls; ``cancel_futures``: those not started are cancelled.  The
        cluster closes once every call has ended: now (``wait``), or from a thread
        that the program's exit waits for."""
        with self._cond:
            self._shutdown = True
            pending = [f for b in self._batches.values() for f in b.futures]
        if cancel_futures:
            for future in pending:
                future.cancel()
        if not wait:
            threading.Thread(target=self._close_when_done, name='dispy-executor-close').start()
            return
        notifier = self.cluster._notifier
        if notifier is not None and threading.current_thread() is notifier.thread:
            raise RuntimeError('ClusterExecutor.shutdown(wait=True) cannot be called from a '
                               'done callback: use shutdown(wait=False)')
        self._close_when_done()

    def _close_when_done(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._batches)
        with self._closing:
            if not self.cluster.is_closed():
                self.cluster.close()
            _live_executors.discard(self)


def _executors_at_exit():
    """Like the standard executors: a program ends once its calls have (registered after
    ``_at_exit``, so it runs before the clusters are looked at)."""
    for executor in list(_live_executors):
        try:
            executor.shutdown(wait=True)
        except Exception:
            logger.exception('ClusterExecutor: shutdown at exit failed')


atexit.register(_executors_at_exit)


# ================================================================================
# Program command lines: what dispynode and dispyscheduler parse alike
# ================================================================================

def parse_size(text):
    """'10m' → 10485760; k, m, g suffixes; 0 means unlimited (an argparse type)."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)[bB]?\s*', str(text))
    if not match:
        raise argparse.ArgumentTypeError('%r is not a size (e.g. 10m, 512k, 2g, 0)' % text)
    scale = {'': 1, 'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


class ProgramArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (not the whole usage) and exit 2."""

    def error(self, message):
        exit_usage(self.prog, '%s (see --help)' % message)


def empty_folder(path, keep=()):
    """Removes what is under ``path`` (``--clean``), the folder itself (and its
    mode) staying; names in ``keep`` stay too."""
    for name in os.listdir(path) if os.path.isdir(path) else ():
        if name in keep:
            continue
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.unlink(entry)


def exit_usage(program, text):
    """A bad option value: one line on stderr, exit status 2 (as argparse does)."""
    print('%s: %s' % (program, text), file=sys.stderr, flush=True)
    raise SystemExit(2)


def resolve_or_exit(host, program):
    addr = resolve_host(host)
    if addr is None:
        exit_usage(program, '%r is not an address or a known host name' % host)
    return addr


def parse_time_of_day(text):
    """'HH:MM' (24-hour clock) → minutes after midnight (an argparse type)."""
    match = re.fullmatch(r'\s*([01]?\d|2[0-3]):([0-5]\d)\s*', str(text))
    if not match:
        raise argparse.ArgumentTypeError('%r is not a time of day HH:MM (00:00 to 23:59)'
                                         % text)
    return int(match.group(1)) * 60 + int(match.group(2))


def add_config_options(add):
    """``--config`` and ``--save_config`` (``add``: a parser's add_argument), which
    ``parse_program_args`` reads."""
    add('--config', metavar='FILE',
        help='read options from this JSON file (written by --save_config)')
    add('--save_config', metavar='FILE',
        help='write the options to this file (mode 0600: it may hold a secret) and exit')


def parse_program_args(parser, argv, program, secret_files=()):
    """``parser.parse_args(argv)`` with the options every program has:
    ``--config FILE`` (options saved earlier; what the command line gives wins, a
    repeatable option's list included), ``--save_config FILE`` (written as JSON, mode
    0600 as it may hold a secret, then exit 0; ``--clean`` is never saved: a
    one-time clean-up), and ``secret_files`` pairs (dest of a file option, dest of
    the secret it holds: ``--secret_file`` keeps a secret out of ``ps``)."""
    config = parser.parse_args(argv)
    if config.config:
        given = config
        parser.set_defaults(**_saved_options(parser, config.config, program))
        config = parser.parse_args(argv)
        for action in parser._actions:      # a list given on the command line replaces
            if isinstance(action, argparse._AppendAction) and getattr(given, action.dest):
                setattr(config, action.dest, getattr(given, action.dest))
    if config.save_config:
        values = {k: os.path.abspath(v) if v and isinstance(v, str) and _PATH_OPTION.search(k)
                  else v for k, v in vars(config).items()
                  if k not in ('config', 'save_config', 'clean', 'check')}  # paths: anywhere
        try:
            fd = os.open(config.save_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)        # an existing file too
            with os.fdopen(fd, 'w') as f:
                json.dump(values, f, indent=2)
        except OSError as exc:
            exit_usage(program, 'cannot write --save_config %s: %s' % (config.save_config,
                                                                      exc.strerror))
        print('%s: options saved in %s' % (program, config.save_config), flush=True)
        raise SystemExit(0)
    for file_dest, secret_dest in secret_files:
        path = getattr(config, file_dest, None)
        if path:
            setattr(config, secret_dest, _read_secret_file(path, program,
                                                           getattr(config, secret_dest)))
    return config


_PATH_OPTION = re.compile(r'(file|_prefix)$|^init$')   # options naming files or folders


def _saved_options(parser, path, program):
    """The options of a --config file, each checked as the command line would be."""
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError('not a JSON object of options')
    except (OSError, ValueError) as exc:
        exit_usage(program, 'cannot read --config %s: %s' % (
            path, getattr(exc, 'strerror', None) or exc))
    actions = {action.dest: action for action in parser._actions}
    checked = {}
    for name, value in saved.items():
        action = actions.get(name)
        if action is None or name in ('config', 'save_config', 'help'):
            exit_usage(program, '--config %s: unknown option %r' % (path, name))
        try:
            checked[name] = _checked_option(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            exit_usage(program, '--config %s: %s: %s' % (path, name, exc))
    return checked


def _checked_option(action, value):
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError('a list of strings is expected')
        return value
    if action.nargs == 0:                   # store_true / store_false
        if not isinstance(value, bool):
            raise TypeError('true or false is expected')
        return value
    if value is None:
        if action.default is not None:
            raise TypeError('a value is expected')
        return None
    if isinstance(value, (dict, list, bool)):
        raise TypeError('%r is not a value of this option' % (value,))
    convert = action.type or str
    if convert is int and isinstance(value, float) and value != int(value):
        raise TypeError('%r is not a whole number' % value)
    if isinstance(value, int) and not isinstance(value, bool) and convert is not str:
        return convert(value) if convert in (int, float) else value     # parsed already
    return convert(str(value))


def _read_secret_file(path, program, given):
    if given:
        exit_usage(program, 'give the secret either on the command line or in a file, '
                   'not both')
    try:
        with open(path) as f:
            secret = f.readline().rstrip('\r\n')
        if os.stat(path).st_mode & 0o077:
            logger.warning('%s: %s can be read by other users of this machine (chmod 600 '
                           'it)', program, path)
    except OSError as exc:
        exit_usage(program, 'cannot read the secret file %s: %s' % (path, exc.strerror))
    if not secret:
        exit_usage(program, 'the secret file %s is empty (its first line is the secret)'
                   % path)
    return secret


class ServiceWindow:
    """When a node serves, each day (times in minutes after midnight, local time;
    a window may cross midnight): from ``start`` (default midnight) to ``stop`` it
    takes jobs; from ``stop`` to ``end`` it takes no new ones and lets running ones
    finish; from ``end`` to the next ``start`` it is out of service (running jobs
    killed, clients turned away).  Without ``end`` it stays STOPPED until the next
    start; without ``stop`` it serves until ``end``; with ``start`` alone it starts
    serving at that time (at once if it has passed today) and then serves for good.

    ``clock_offset`` (seconds) shifts the node's idea of now: tests use it
    (DISPY_NODE_CLOCK_OFFSET) to reach a transition in seconds."""

    SERVING, STOPPED, OUT = 'serving', 'stopped', 'out'

    def __init__(self, start=None, stop=None, end=None, clock_offset=0.0):
        self.start, self.stop, self.end = start, stop, end
        self.clock_offset = clock_offset
        self.opened = False         # start alone: its first start has come

    @property
    def always(self):
        return self.start is None and self.stop is None and self.end is None

    def minute_now(self):
        now = time.localtime(time.time() + self.clock_offset)
        return now.tm_hour * 60 + now.tm_min + now.tm_sec / 60.0

    @staticmethod
    def _within(minute, begin, finish):
        if begin == finish:
            return False
        if begin < finish:
            return begin <= minute < finish
        return minute >= begin or minute < finish       # across midnight

    def state(self, minute=None):
        if self.always:
            return self.SERVING
        minute = self.minute_now() if minute is None else minute
        start = self.start if self.start is not None else 0
        stop = self.stop if self.stop is not None else self.end
        if stop is None:                    # start alone
            self.opened = self.opened or minute >= start
            return self.SERVING if self.opened else self.OUT
        if self._within(minute, start, stop):
            return self.SERVING
        if self.end is None or self._within(minute, stop, self.end):
            return self.STOPPED
        return self.OUT

    def next_start_text(self):
        start = self.start if self.start is not None else 0
        return '%02d:%02d' % (start // 60, start % 60)


def add_service_window_options(add, work, users):
    """``--service_start/stop/end HH:MM`` (dispynode, dispycosnode): ``work`` is
    what a node takes ('jobs'), ``users`` who it sends away ('clients')."""
    add('--service_start', type=parse_time_of_day, default=None, metavar='HH:MM',
        help='time of day the node starts serving (default: at once)')
    add('--service_stop', type=parse_time_of_day, default=None, metavar='HH:MM',
        help='time of day after which no new %s are taken (running ones finish)' % work)
    add('--service_end', type=parse_time_of_day, default=None, metavar='HH:MM',
        help='time of day running %s are ended and %s sent away, until the next start'
        % (work, users))


def check_service_window(config, program):
    """A service window that would never serve, or never end, is a mistake."""
    start = config.service_start if config.service_start is not None else 0
    stop = config.service_stop if config.service_stop is not None else config.service_end
    if stop is None:
        return
    if stop == start:
        exit_usage(program, 'the service window is empty: it stops when it '
                   'starts (%02d:%02d)' % (start // 60, start % 60))
    if (config.service_end is not None and config.service_stop is not None
            and ServiceWindow._within(config.service_end, start, stop)):
        exit_usage(program, '--service_end comes before --service_stop: give an '
                   'end at or after the stop')


def finish_program_config(config, program):
    """The options every program has, in the form the code uses: addresses resolved,
    --zombie_interval in seconds, --max_frame_size as ``max_frame``, an absolute
    --dest_path_prefix."""
    config.ip_names = list(config.ip_addrs)      # as given (the doctor names host names)
    config.ip_addrs = [resolve_or_exit(a, program) for a in config.ip_addrs]
    config.ext_ip_addrs = [resolve_or_exit(a, program) for a in config.ext_ip_addrs]
    config.zombie_interval = max(0.0, config.zombie_interval) * 60
    config.max_frame = config.max_frame_size
    config.dest_path_prefix = os.path.abspath(config.dest_path_prefix)
    return config


# ================================================================================
# Submodule names of the 4.15 package (dispy.httpd) for a one-file module
# ================================================================================

class SubmoduleAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import PACKAGE.NAME`` import a flat module beside it: ``import
    dispy.httpd`` is ``dispyhttpd.py``, as 4.15's package had ``dispy/httpd.py``.
    The package module gets an empty ``__path__`` (so Python allows submodules) and
    the alias is one module object under both names, never a second copy."""

    def __init__(self, package, aliases):
        self.aliases = {package.__name__ + '.' + name: flat for name, flat in aliases.items()}
        if not hasattr(package, '__path__'):
            package.__path__ = []
        sys.meta_path.append(self)

    def find_spec(self, name, path=None, target=None):
        if name in self.aliases:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(self.aliases[spec.name])

    def exec_module(self, module):
        pass        # imported as itself by create_module


if __name__ != '__main__':
    SubmoduleAliases(sys.modules[__name__], {'httpd': 'dispyhttpd'})


# ================================================================================
# Doctor: what usually goes wrong, checked
# ================================================================================
#
# ``python dispy.py --doctor [NODE ...]`` (doctor_main: a client's view of its nodes)
# and ``dispynode.py --check`` (program_checks: a node about to serve) share these
# checks.  Each check gives a CheckResult; a Doctor prints each as it comes, one line
# (ok / warn / FAIL, the check's name, what was found) with the fix under a warning
# or failure, then a summary, and gives the exit status: 1 if anything failed.
# Nothing here runs unless one of those commands is given.
#
#   doctor_main ─┬─ NODE given:   NodeProbe per node: resolve → tcp → tls → dispy
#                │                handshake (secret, version) → udp ping
#                └─ none given:   addresses, host-name trap, a broadcast ping
#                                 (discover_nodes), then NodeProbe of who answered
#   dispynode --check: addresses, host-name trap, ports (and who holds them), secret,
#                TLS files, --dest_path_prefix; dispynode adds its fork server

DOCTOR_TIMEOUT = 3.0            # seconds each probe (connect, handshake, ping) may take
DOCTOR_HELLO = {'role': 'doctor'}
DOCTOR_MAX_FOUND = 16           # nodes found by broadcast that are probed further


class CheckResult(collections.namedtuple('CheckResult', 'name level detail fix')):
    """The outcome of one check: ``level`` is OK, WARN (advisory: the run still
    passes) or FAIL; ``detail`` says what was found, ``fix`` what to do about it."""

    __slots__ = ()
    OK, WARN, FAIL = 'ok', 'warn', 'FAIL'

    @classmethod
    def ok(cls, name, detail):
        return cls(name, cls.OK, detail, '')

    @classmethod
    def warn(cls, name, detail, fix):
        return cls(name, cls.WARN, detail, fix)

    @classmethod
    def fail(cls, name, detail, fix):
        return cls(name, cls.FAIL, detail, fix)

    @property
    def failed(self):
        return self.level == self.FAIL


class Doctor:
    """Prints CheckResults as they come (to ``out``) and keeps them: ``finish()``
    prints the summary and returns the exit status (0: nothing failed)."""

    def __init__(self, title, out=None):
        self.title = title
        self.out = out or sys.stdout
        self.results = []

    def add(self, result):
        if result is None:          # a check that does not apply
            return
        self.results.append(result)
        print('%-4s  %-9s  %s' % (result.level, result.name, result.detail), file=self.out,
              flush=True)
        if result.fix and result.level != CheckResult.OK:
            print(textwrap.fill(result.fix, 92, initial_indent='      fix: ',
                                subsequent_indent='           '), file=self.out, flush=True)

    def add_all(self, results):
        for result in results:
            self.add(result)

    def finish(self):
        failed = [r.name for r in self.results if r.failed]
        warned = sum(r.level == CheckResult.WARN for r in self.results)
        warnings = ' (%d warning%s)' % (warned, 's' * (warned != 1)) if warned else ''
        if failed:
            text = '%d of %d checks failed: %s%s' % (len(failed), len(self.results),
                                                     ', '.join(failed), warnings)
        else:
            text = 'all %d checks passed%s' % (len(self.results), warnings)
        print('%s: %s' % (self.title, text), file=self.out, flush=True)
        return 1 if failed else 0


# -- this machine's addresses ------------------------------------------------------

def _is_address(text):
    """True if ``text`` is an IPv4 or IPv6 address (not a host name)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text.split('%', 1)[0])
            return True
        except (OSError, ValueError):
            continue
    return False


def _lan_addresses(addrs):
    """The addresses other machines could reach: neither loopback nor link-local."""
    return [a for a in addrs if not is_loopback(a) and not a.lower().startswith('fe80:')]


def host_name_trap(host_name, host_addrs, local_addrs):
    """The host-name trap, from what ``host_name`` resolves to (``host_addrs``) and
    this machine's interface addresses (``local_addrs``).  Many distributions map
    the host name to 127.0.1.1 in /etc/hosts, so a program told to use "this host"
    by name gets loopback, which no other machine reaches.  Advisory (WARN): dispy
    takes its own addresses from the interfaces; only what is given the host name
    (``-i $(hostname)``, dispyscheduler's default scheduler_node, a peer naming this
    machine) is caught."""
    name = 'host name'
    lan = _lan_addresses(local_addrs)
    if not host_addrs:
        return CheckResult.warn(name, '%r does not resolve' % host_name,
                                'map it to this machine\'s address in /etc/hosts (or DNS): '
                                'whatever is given the host name fails (-i %s, '
                                'SharedJobCluster\'s default scheduler_node)' % host_name)
    shown = '%r resolves to %s' % (host_name, ', '.join(host_addrs))
    if not lan:
        return CheckResult.ok(name, shown + '; this machine has loopback only')
    if all(is_loopback(a) for a in host_addrs):
        return CheckResult.warn(
            name, '%s (loopback), while this machine has %s' % (shown, ', '.join(lan)),
            'give ip_addr= (client) or -i (node) the address other machines reach (e.g. '
            '%s), not the host name; or map %r to it in /etc/hosts' % (lan[0], host_name))
    if not any(a in local_addrs for a in host_addrs):
        return CheckResult.warn(
            name, '%s: no address of this machine (%s)' % (shown, ', '.join(lan)),
            'fix /etc/hosts or DNS: peers that name this machine reach another one')
    return CheckResult.ok(name, shown)


def check_addresses(names, addrs, local_addrs, broadcasts=()):
    """The addresses a program would use: ``names`` as given (``-i``) and ``addrs``
    the same resolved (None: does not resolve); none given: every interface
    (``local_addrs``, broadcasting to ``broadcasts``)."""
    name = 'addresses'
    lan = _lan_addresses(local_addrs)
    if not names:
        return CheckResult.ok(name, 'every interface: %s; broadcasts to %s' % (
            ', '.join(lan + [a for a in local_addrs if is_loopback(a)]) or 'none',
            ', '.join(broadcasts) or 'none (loopback only)'))
    for given, addr in zip(names, addrs):
        if addr is None:
            return CheckResult.fail(name, '%r does not resolve' % given,
                                    'give an address of this machine (%s)'
                                    % ', '.join(lan or local_addrs))
        if addr.split('%')[0] not in local_addrs and not is_loopback(addr):
            return CheckResult.fail(name, '%s is not an address of this machine' % given,
                                    'give one of its addresses: %s' % ', '.join(
                                        lan or local_addrs))
        if is_loopback(addr) and not _is_address(given) and given != 'localhost' and lan:
            return CheckResult.fail(
                name, '%r resolves to %s (loopback): the host-name trap' % (given, addr),
                'give the address other machines reach instead (e.g. -i %s), or map %r '
                'to it in /etc/hosts' % (lan[0], given))
    used = ', '.join(n if n == a else '%s (%s)' % (n, a) for n, a in zip(names, addrs))
    if all(is_loopback(a) for a in addrs):
        used += ': loopback only, so only programs on this machine'
    return CheckResult.ok(name, used)


# -- files -------------------------------------------------------------------------

def check_tls_files(certfile, keyfile=None, cafile=None, server_side=False):
    """The TLS files load (certificate and key match) and the certificate verifies
    against the trust anchor peers use (``cafile``, else itself): not expired, not
    yet to come.  None without any TLS option."""
    name = 'tls files'
    if not certfile:
        if keyfile or cafile:
            return CheckResult.fail(name, '--keyfile / --cafile without --certfile: TLS '
                                    'is off', 'give --certfile too (or neither)')
        return None
    try:
        make_ssl_context(server_side, certfile, keyfile, cafile)
    except ssl.SSLError as exc:
        return CheckResult.fail(name, 'the TLS files do not load: %s' % exc,
                                'certfile must be a PEM certificate with its private key '
                                'in it or in --keyfile (the key of that certificate); '
                                'cafile PEM CA certificates')
    except OSError as exc:
        files = exc.filename or ', '.join(f for f in (certfile, keyfile, cafile) if f)
        return CheckResult.fail(name, 'cannot read %s: %s' % (files, exc.strerror or exc),
                                'check the path and that this user may read it')
    error = _tls_self_check(certfile, keyfile, cafile)
    if error is None:
        return CheckResult.ok(name, '%s loads and verifies against %s' % (
            certfile, cafile or 'itself'))
    return _tls_verify_failure(name, error, certfile, cafile)


def _tls_self_check(certfile, keyfile, cafile, timeout=10.0):
    """Our certificate shown to ourselves over a socket pair (no network): None if
    both ends accept it, as peers with the same trust anchor would, else the error."""
    server = make_ssl_context(True, certfile, keyfile, cafile)
    client = make_ssl_context(False, certfile, keyfile, cafile)
    ends = socket.socketpair()
    errors = []

    def serve():
        try:
            with server.wrap_socket(ends[0], server_side=True) as sock:
                sock.recv(1)        # TLS 1.3: the client's certificate is checked here
        except OSError as exc:
            errors.append(exc)
    try:
        for end in ends:
            end.settimeout(timeout)
        thread = threading.Thread(target=serve, daemon=True, name='dispy-doctor-tls')
        thread.start()
        try:
            with client.wrap_socket(ends[1], server_side=False) as sock:
                sock.sendall(b'x')
        except OSError as exc:
            errors.insert(0, exc)
        thread.join(timeout)
    finally:
        for end in ends:
            end.close()
    return errors[0] if errors else None


def _tls_verify_failure(name, error, certfile, cafile):
    code = getattr(error, 'verify_code', None)
    if code in (9, 10):         # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
        return CheckResult.fail(name, 'the certificate in %s %s' % (
            certfile, 'has expired' if code == 10 else 'is not valid yet (check the clock)'),
            'make a new one and give it to every side, e.g. openssl req -x509 -newkey '
            'rsa:2048 -nodes -days 365 -subj /CN=dispy -keyout kc.pem -out kc.pem')
    detail = 'the certificate in %s does not verify against %s: %s' % (
        certfile, cafile or 'itself', getattr(error, 'verify_message', None) or error)
    if cafile:                  # peers may trust it through another CA of their own
        return CheckResult.warn(name, detail, 'peers must trust this certificate through '
                                'their --cafile; usually the same CA signs every side')
    return CheckResult.fail(name, detail, 'without --cafile peers trust exactly this '
                            'certificate: give every side the same self-signed file, or '
                            'give --cafile the CA that signed it')


def check_folder(path, option='--dest_path_prefix'):
    """``path`` is a folder this user may write in, or may be made."""
    name = 'folder'
    existing = path
    for _ in range(path.count(os.sep) + 1):        # the nearest folder that exists
        if os.path.exists(existing):
            break
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return CheckResult.fail(name, '%s: %s is not a folder' % (path, existing),
                                'give %s a folder' % option)
    if existing != path:
        if os.access(existing, os.W_OK | os.X_OK):
            return CheckResult.ok(name, '%s will be made (in %s)' % (path, existing))
        return CheckResult.fail(name, '%s cannot be made: %s is not writable' % (
            path, existing), 'give %s a folder this user may write' % option)
    probe = os.path.join(path, '.dispy-check-%s' % uuid.uuid4().hex[:12])
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        return CheckResult.fail(name, 'cannot write in %s: %s' % (path, exc.strerror),
                                'give %s a folder this user may write (or fix its '
                                'permissions)' % option)
    return CheckResult.ok(name, '%s is writable' % path)


# -- a node, as a client sees it -----------------------------------------------------

class NodeProbe:
    """Checks one node as a client reaches it: its name resolves; its TCP port takes
    connections; TLS and dispy's handshake succeed with our files and secret (and if
    not, which side is wrong); its UDP port answers an authenticated ping.
    ``checks()`` yields a CheckResult as each is known."""

    def __init__(self, host, port, secret='', ssl_context=None, timeout=DOCTOR_TIMEOUT,
                 ip_addr=None):
        self.host = host
        self.port = port
        self.secret = secret or ''
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.ip_addr = ip_addr
        self.addr = host if _is_address(host) else None     # checks() resolves a name
        self.where = '%s:%d' % (host, port)

    def checks(self):
        self.addr = resolve_host(self.host)
        if self.addr is None:
            yield CheckResult.fail('resolve', '%s does not resolve' % self.host,
                                   'check the name, or give the node\'s address')
            return
        if self.addr != self.host:
            yield CheckResult.ok('resolve', '%s is %s' % (self.host, self.addr))
        self.where = '%s:%d' % ('[%s]' % self.addr if ':' in self.addr else self.addr,
                                self.port)
        tcp = yield from self._tcp_checks()
        if tcp != 'other program':      # no discovery to check on another program's port
            yield self._udp_check(tcp)

    # -- TCP: connect, TLS, handshake ------------------------------------------------
    def connect(self):
        return socket.create_connection((self.addr, self.port), self.timeout)

    def attempt(self, secret, sock=None):
        """One connection (``sock``, else a new one) through our TLS (if any) and the
        dispy handshake with ``secret``: (channel, None), or (None, (stage,
        exception)), stage 'tcp', 'tls' or 'handshake'."""
        stage = 'tcp'
        try:
            sock = sock or self.connect()
            stage = 'tls'
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=False,
                                                    do_handshake_on_connect=False)
                sock.do_handshake()
            stage = 'handshake'
            return handshake(sock, secret, True, DOCTOR_HELLO, timeout=self.timeout), None
        except (OSError, ProtocolError) as exc:
            if sock is not None:
                sock.close()
            logger.debug('doctor: %s: %s failed: %r', self.where, stage, exc)
            return None, (stage, exc)

    def _tcp_checks(self):
        """Yields the TCP checks; returns how far they got: None (no connection),
        'connected' (something listens, the handshake failed), 'dispy' (a node
        took our handshake) or 'other program' (a dispy program that is not a node)."""
        try:
            sock = self.connect()
        except OSError as exc:
            yield self._connect_failure(exc)
            return None
        yield CheckResult.ok('tcp', '%s: connected (from %s)' % (self.where,
                                                                  sock.getsockname()[0]))
        channel, error = self.attempt(self.secret, sock)
        if channel is None:
            yield self._handshake_failure(*error)
            return 'connected'
        info = channel.peer_info
        channel.close()
        role = info.get('role')
        if role != 'node':
            yield CheckResult.fail('role', '%s: a dispy %s listens here, not a node' % (
                self.where, role or 'program'), 'this is dispyscheduler\'s port for programs: '
                'use it through SharedJobCluster(scheduler_node=, scheduler_port=), or give '
                'the nodes\' own address and port' if role == 'scheduler' else
                'give the dispy node\'s address and port (NODE:PORT, --node_port)')
            return 'other program'
        yield CheckResult.ok('tls', '%s: %s' % (self.where, 'TLS accepted both ways'
                                                if self.ssl_context is not None else
                                                'not used (by either side)'))
        yield CheckResult.ok('secret', '%s: %s' % (self.where, 'the node accepts our '
                                                   'secret' if self.secret else
                                                   'none needed (by either side)'))
        yield CheckResult.ok('version', '%s: dispy protocol %s; a dispy %s named %r' % (
            self.where, info.get('version'), info.get('role', 'program'), info.get('name')))
        return 'dispy'

    def _connect_failure(self, exc):
        port = self.port
        if isinstance(exc, ConnectionRefusedError):
            return CheckResult.fail('tcp', '%s: connection refused' % self.where,
                                    'nothing listens on TCP %d there: start dispynode on '
                                    'that host, or give the port it serves on (NODE:PORT, '
                                    '--node_port)' % port)
        if isinstance(exc, socket.timeout):
            return CheckResult.fail('tcp', '%s: connect timed out after %.1f s' % (
                self.where, self.timeout), 'packets to TCP %d are dropped on the way: a '
                'firewall (on the node\'s host or between) - open TCP and UDP %d there; '
                'or the host is down' % (port, port))
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return CheckResult.fail('tcp', '%s: unreachable (%s)' % (self.where,
                                                                     exc.strerror),
                                    'no route from here to %s: check the address, this '
                                    'machine\'s network and routes (a firewall that rejects '
                                    'with "host unreachable" looks the same)' % self.addr)
        return CheckResult.fail('tcp', '%s: %s' % (self.where, exc),
                                'check the address and the port')

    def _handshake_failure(self, stage, exc):
        """The CheckResult of a failed TLS or dispy handshake, probing again where that
        tells which side is wrong."""
        where = self.where
        if isinstance(exc, VersionError):
            return CheckResult.fail('version', '%s: %s' % (where, exc),
                                    'run the same dispy release on clients and nodes')
        if isinstance(exc, AuthError):
            return self._secret_failure(exc)
        text = str(exc)
        if stage == 'tls' or isinstance(exc, ssl.SSLError) or (
                self.ssl_context is not None and _connection_dropped(exc)):
            return self._tls_failure(exc, tls_done=stage == 'handshake')
        if self.ssl_context is None and self._wants_tls(exc):
            return CheckResult.fail('tls', '%s: the node uses TLS, this side does not' % where,
                                    'give --certfile (and --keyfile): the node\'s '
                                    'certificate, or one its --cafile trusts')
        if 'not a dispy program' in text:
            return CheckResult.fail('handshake', '%s: %s' % (where, text),
                                    'something else listens on this port: give the dispy '
                                    'node\'s port (NODE:PORT, --node_port)')
        if isinstance(exc, socket.timeout):
            return CheckResult.fail('handshake', '%s: no answer to the handshake in %.1f s'
                                    % (where, self.timeout), 'the node may be overloaded, '
                                    'or what listens there is not dispy')
        return CheckResult.fail('handshake', '%s: the node ended the handshake (%s)' % (
            where, text), 'the node\'s log says why ("connection from ... refused: ...")')

    def _tls_failure(self, exc, tls_done=False):
        """``tls_done``: the TLS handshake ended here and the first read failed: with
        TLS 1.3 that is how a server refuses the client's certificate."""
        where, reason = self.where, str(exc)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return CheckResult.fail('tls', '%s: the node\'s certificate is not trusted: %s'
                                    % (where, exc.verify_message), 'give this side the '
                                    'node\'s certificate (the same --certfile on both '
                                    'sides) or the CA that signed it (--cafile)')
        if tls_done or 'ALERT' in reason.upper():
            return CheckResult.fail('tls', '%s: the node refused our certificate (%s)' % (
                where, reason), 'the node\'s --cafile (or, without one, its --certfile) '
                'must trust this side\'s certificate')
        if self._speaks_plain_dispy():
            return CheckResult.fail('tls', '%s: the node does not use TLS, this side does'
                                    % where, 'start the node with --certfile (and '
                                    '--keyfile), or give no --certfile here')
        if not self._speaks_tls():
            return CheckResult.fail('handshake', '%s: what listens there speaks neither TLS '
                                    'nor dispy (%s)' % (where, reason), 'something else '
                                    'listens on this port: give the dispy node\'s port '
                                    '(NODE:PORT, --node_port)')
        return CheckResult.fail('tls', '%s: TLS handshake failed: %s' % (where, reason),
                                'check that both sides use certificates they trust')

    def _secret_failure(self, exc):
        where = self.where
        if 'rejected' not in str(exc):      # the node's proof failed, not ours
            return CheckResult.fail('secret', '%s: the node could not prove it knows our '
                                    'secret' % where, 'this may not be the node you think '
                                    '(another program, or something in between)')
        if not self.secret:
            return CheckResult.fail('secret', '%s: the node wants a secret; none was given'
                                    % where, 'give the node\'s secret: -s SECRET or '
                                    '--secret_file FILE (secret= of JobCluster, DISPY_SECRET)')
        channel, _error = self.attempt('')
        if channel is not None:
            channel.close()
            return CheckResult.fail('secret', '%s: the node has no secret; this side gave '
                                    'one' % where, 'give no secret here, or start the node '
                                    'with -s SECRET (or --secret_file)')
        return CheckResult.fail('secret', '%s: the node refused our secret (the secrets '
                                'differ)' % where, 'give both sides the same secret '
                                '(dispynode -s / --secret_file; secret= of JobCluster)')

    def _wants_tls(self, exc):
        """Whether the node that ended our plain handshake with ``exc`` speaks TLS."""
        if 'peer speaks TLS' in str(exc):
            return True
        return not isinstance(exc, socket.timeout) and self._speaks_tls()

    def _speaks_tls(self):
        """Whether the node answers a TLS client hello (certificates not checked)."""
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        try:
            with self.connect() as raw, probe.wrap_socket(raw, server_side=False,
                                                          do_handshake_on_connect=False) as sock:
                sock.do_handshake()
            return True
        except ssl.SSLError as exc:      # an alert: TLS spoken (it wants a certificate)
            return 'ALERT' in str(exc).upper()
        except OSError:
            return False

    def _speaks_plain_dispy(self):
        """Whether the node answers a dispy hello sent without TLS."""
        steps = handshake_steps(self.secret, True, DOCTOR_HELLO)
        try:
            with self.connect() as sock:
                sock.sendall(next(steps)[1])
                head = _recv_exact(sock, 6, time.monotonic() + self.timeout)
            return head[:4] == b'DSPY'
        except (OSError, ProtocolError):
            return False

    # -- UDP: discovery -----------------------------------------------------------------
    def _udp_check(self, tcp):
        source = self.ip_addr if self.ip_addr and (
            is_loopback(self.ip_addr) == is_loopback(self.addr)) else None
        answer, src = _ping_and_wait(self.secret, [sockaddr(self.addr, self.port)],
                                     self.timeout, source, first_only=True)
        where, port = self.where, self.port
        if answer is None:
            if tcp == 'dispy':
                return CheckResult.fail(
                    'udp', '%s: no answer to a ping on UDP %d in %.1f s (TCP works)' % (
                        where, port, self.timeout),
                    'UDP %d is blocked on the way (a firewall): open it for discovery, or '
                    'name the node (nodes= of JobCluster: a named node is dialed over TCP). '
                    'Or the node is out of its service hours (its console says "not '
                    'serving"): it takes no client until they start' % port)
            if tcp == 'connected':
                return CheckResult.fail('udp', '%s: no answer to a ping on UDP %d either'
                                        % (where, port), 'see the checks above: what '
                                        'listens there is not a dispy node that takes us')
            return CheckResult.fail('udp', '%s: no answer to a ping on UDP %d either'
                                    % (where, port), 'see the tcp check: the node does not '
                                    'run there, or its host is not reachable')
        if answer.get('t') == 'nak':
            return CheckResult.fail('udp', '%s: the node answered the ping with a NAK: it '
                                    'does not know our secret' % where,
                                    'give both sides the same secret (see the secret check)')
        if answer.get('busy'):
            return CheckResult.warn('udp', '%s: %s' % (where, describe_pong(answer, src)),
                                    'a node serves one program at a time: this one waits '
                                    'until that client is done (share nodes between programs '
                                    'with dispyscheduler and SharedJobCluster)')
        return CheckResult.ok('udp', '%s: %s' % (where, describe_pong(answer, src)))


def _connection_dropped(exc):
    """Whether ``exc`` says the peer reset or closed the connection (not a timeout,
    not something it said)."""
    return isinstance(exc, ConnectionError) or 'connection closed' in str(exc)


def describe_pong(msg, src):
    """A node's answer to a ping, in words."""
    text = 'pong from %s: node %r, %s CPUs, %s' % (
        src[0], msg.get('name'), msg.get('cpus'),
        'serving a client' if msg.get('busy') else 'free')
    if msg.get('ip'):
        text += ', advertised as %s:%s' % (msg.get('ip'), msg.get('port'))
    return text


def _ping_and_wait(secret, dests, timeout, ip_addr=None, first_only=False):
    """Sends an authenticated ping to ``dests`` (socket addresses: a node, or
    broadcast addresses) up to three times in ``timeout`` seconds, from a port of its
    own, and collects answers: a pong, or a NAK from a node with another secret.
    ``first_only``: (first answer, its source) or (None, None); else [(answer,
    source)] of everything that came."""
    family = node_address_family(dests[0][0])
    any_addr = '' if family == socket.AF_INET else '::'
    answers = []
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        bind_to = ip_addr if ip_addr and node_address_family(ip_addr) == family else any_addr
        sock.bind(sockaddr(bind_to, 0))
        # the node answers where the ping came from; no dispynetrelay repeats a probe
        ping = pack_datagram(secret, dict(Datagram.ping('dispy-doctor', sock.getsockname()[1]),
                                          relayed=True))
        start = time.monotonic()
        deadline, sent = start + timeout, 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if sent < 3 and now >= start + sent * timeout / 3:
                for dest in dests:
                    try:
                        sock.sendto(ping, dest)
                    except OSError as exc:
                        logger.debug('doctor: ping to %s failed: %s', dest[0], exc)
                sent += 1
            sock.settimeout(max(0.01, min(deadline, start + sent * timeout / 3) - now))
            try:
                data, src = sock.recvfrom(MAX_HANDSHAKE_MSG + 64)
            except socket.timeout:
                continue
            except OSError:         # an ICMP error on this socket: no answer from there
                continue
            msg, good = unpack_datagram(secret, data)
            if msg is None or (msg.get('t') != 'pong' if good else msg.get('t') != 'nak'):
                continue
            if first_only:
                return msg, src
            if src[0] not in [s[0] for _m, s in answers]:
                answers.append((msg, src))
    return (None, None) if first_only else answers


def discover_nodes(secret, port, ip_addrs, timeout):
    """A broadcast discovery ping: (CheckResult, [(host, port) of nodes that answered
    with a pong])."""
    name = 'discovery'
    bcasts = broadcast_addresses(ip_addrs or None)
    if not bcasts:
        return CheckResult.warn(name, 'no interface to broadcast on (%s)' % (
            'loopback only' if not ip_addrs else '-i ' + ', '.join(ip_addrs)),
            'name the nodes: dispy.py --doctor NODE ... (nodes= of JobCluster)'), []
    answers = _ping_and_wait(secret, [(b, port) for b in bcasts], timeout,
                             ip_addrs[0] if ip_addrs else None)
    pongs = [(m, s) for m, s in answers if m.get('t') == 'pong']
    naks = [s[0] for m, s in answers if m.get('t') == 'nak']
    if naks:
        return CheckResult.fail(name, '%s answered the broadcast but do%s not know our '
                                'secret' % (', '.join(naks), 'es' * (len(naks) == 1)),
                                'give both sides the same secret (-s / --secret_file)'), \
            _found(pongs, port)
    if not pongs:
        return CheckResult.fail(
            name, 'no node answered a ping broadcast to %s on UDP %d in %.1f s' % (
                ', '.join(bcasts), port, timeout),
            'start dispynode on the nodes (with the same port: --node_port); broadcasts '
            'stay in this network: name nodes beyond a router (dispy.py --doctor NODE, '
            'nodes= of JobCluster) or run dispynetrelay there; a firewall may drop UDP %d'
            % port), []
    return CheckResult.ok(name, '%d node(s) answered a broadcast to %s: %s' % (
        len(pongs), ', '.join(bcasts), '; '.join(describe_pong(m, s) for m, s in pongs))), \
        _found(pongs, port)


def _found(pongs, port):
    found = []
    for msg, src in pongs[:DOCTOR_MAX_FOUND]:
        try:
            found.append((msg.get('ip') or src[0], int(msg.get('port') or port)))
        except (TypeError, ValueError):
            continue
    return found


# -- a program about to serve (dispynode --check) ----------------------------------------

def check_listen_port(addr, port, secret, ssl_context, port_owner=None,
                      timeout=DOCTOR_TIMEOUT):
    """TCP and UDP ``port`` can be bound on ``addr`` ('' = every interface) as a
    node binds them; if not, who holds them and whether a dispy program answers."""
    name = 'port'
    where = '%s:%d' % (addr or '*', port)
    if port == 0:
        return CheckResult.ok(name, 'any free port (0): clients must be told which')
    problems = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        family = node_address_family(addr) if addr else socket.AF_INET
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:      # as the listener: TIME_WAIT is no conflict
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr(addr, port) if addr else ('', port))
            except OSError as exc:
                problems.append(('TCP' if kind == socket.SOCK_STREAM else 'UDP', exc))
    if not problems:
        return CheckResult.ok(name, 'TCP and UDP %s are free' % where)
    proto, exc = problems[0]
    if exc.errno == errno.EADDRNOTAVAIL:
        return CheckResult.fail(name, '%s: %s is not an address of this machine' % (
            where, addr), 'give -i one of this machine\'s addresses')
    if exc.errno != errno.EADDRINUSE:
        return CheckResult.fail(name, 'cannot bind %s %s: %s' % (proto, where, exc.strerror),
                                'choose another port (-p); ports below 1024 need root')
    owner = port_owner(port) if port_owner is not None else None
    held = '%s %s is in use%s' % ('/'.join(p for p, _e in problems), where,
                                  ' (by %s)' % owner if owner else '')
    if proto == 'UDP':
        return CheckResult.warn(name, held + '; TCP is free',
                                'a dispynetrelay started before the node gives the UDP '
                                'port up: fine; anything else: stop it, or choose another '
                                'port (-p)')
    answer = identify_listener(addr or '127.0.0.1', port, secret, ssl_context, timeout)
    return CheckResult.fail(name, '%s; %s' % (held, answer),
                            'stop that program, or give this node another port (-p)')


def identify_listener(addr, port, secret, ssl_context, timeout=DOCTOR_TIMEOUT):
    """What answers on TCP ``addr:port``, in words (a dispy node already running?)."""
    channel, error = NodeProbe(addr, port, secret, ssl_context, timeout).attempt(secret)
    if channel is not None:
        info = channel.peer_info
        channel.close()
        return 'a dispy %s named %r answers there: it runs already' % (
            info.get('role', 'program'), info.get('name'))
    exc = error[1]
    if isinstance(exc, AuthError):
        return 'a dispy program with another secret answers there'
    if isinstance(exc, VersionError):
        return 'a dispy program of another protocol version answers there'
    return 'what answers there does not complete a dispy handshake (%s)' % exc


def check_program_secret(secret, ip_addrs):
    """A program serving beyond loopback without a secret runs anyone's code."""
    name = 'secret'
    if secret:
        return CheckResult.ok(name, 'given (clients must give the same)')
    if ip_addrs and all(is_loopback(a) for a in ip_addrs):
        return CheckResult.ok(name, 'none: serving on loopback only')
    return CheckResult.warn(name, 'none: anyone who reaches this node can run code on it as '
                            'this user', 'give -s SECRET or --secret_file FILE (and the same '
                            'secret to clients)')


def program_checks(config, port_owner=None):
    """The checks of a node (or any program with its options: ip_addrs, ip_names,
    ext_ip_addrs, port, secret, TLS files, dest_path_prefix) before it serves."""
    interfaces = interface_addresses()
    local = [addr for _family, addr, _bcast in interfaces]
    names = getattr(config, 'ip_names', None) or config.ip_addrs
    result = check_addresses(names, config.ip_addrs, local,
                             broadcast_addresses(config.ip_addrs or None))
    if config.ext_ip_addrs and not result.failed:
        result = result._replace(detail=result.detail + '; advertised as %s' % ', '.join(
            config.ext_ip_addrs))
    yield result
    yield host_name_trap(socket.gethostname(), _host_addresses(socket.gethostname()), local)
    tls = check_tls_files(config.certfile, config.keyfile, config.cafile, server_side=True)
    # a program already on the port is dialed as a client would, with our files
    dial_context = None if tls is None or tls.failed else make_ssl_context(
        False, config.certfile, config.keyfile, config.cafile)
    for addr in config.ip_addrs or ['']:
        yield check_listen_port(addr, config.port, config.secret, dial_context, port_owner)
    yield check_program_secret(config.secret, config.ip_addrs)
    yield tls
    yield check_folder(config.dest_path_prefix)


def _host_addresses(host):
    """Every address ``host`` resolves to (none if it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    found = []
    for info in infos:
        if info[4][0] not in found:
            found.append(info[4][0])
    return found


# -- the command line: dispy.py --doctor ----------------------------------------------------

def doctor_parser():
    parser = ProgramArgumentParser(
        prog='dispy.py --doctor',
        description='Check what usually goes wrong between a dispy client and its nodes: '
                    'addresses, discovery (UDP), the TCP port, the secret, TLS and protocol '
                    'versions. Prints one line per check and how to fix each failure; exits '
                    '0 when nothing failed, 1 otherwise.',
        epilog='Without NODE, this machine\'s addresses and host name are checked and a '
               'discovery ping is broadcast on its networks; every node that answers is '
               'checked. DISPY_SECRET, DISPY_NODE_PORT and DISPY_IP_ADDR give defaults.')
    add = parser.add_argument
    add('nodes', nargs='*', metavar='NODE',
        help='node address or host name, optionally with :PORT ([IPv6]:PORT)')
    add('-s', '--secret', default=None, help='the nodes\' secret')
    add('--secret_file', help='read the secret from the first line of this file')
    add('-i', '--ip_addr', dest='ip_addrs', action='append', default=[],
        help='client address to use (repeatable)')
    add('--node_port', type=int, default=None,
        help='nodes\' port (default %d)' % NODE_PORT)
    add('--certfile', help='TLS certificate (may hold the key)')
    add('--keyfile', help='TLS private key, if not in --certfile')
    add('--cafile', help='CA certificates to verify nodes against')
    add('--timeout', type=float, default=DOCTOR_TIMEOUT,
        help='seconds each probe may take (default %(default)s)')
    add('-d', '--debug', action='store_true', help='log debug messages')
    return parser


def _doctor_options(argv):
    program = 'dispy.py --doctor'
    opts = doctor_parser().parse_args(argv)
    if opts.secret_file:
        opts.secret = _read_secret_file(opts.secret_file, program, opts.secret)
    opts.secret = _env_default(opts.secret, 'DISPY_SECRET', '')
    if not opts.ip_addrs and os.environ.get('DISPY_IP_ADDR'):
        opts.ip_addrs = _split_list(os.environ['DISPY_IP_ADDR'])
    try:
        opts.node_port = int(_env_default(opts.node_port, 'DISPY_NODE_PORT', NODE_PORT, int))
        opts.targets = [parse_node_spec(text, opts.node_port) for text in opts.nodes]
    except ValueError as exc:
        exit_usage(program, str(exc))
    if not 0 < opts.node_port < 65536:
        exit_usage(program, '--node_port must be a port number')
    if not opts.timeout > 0:
        exit_usage(program, '--timeout must be positive')
    return opts


def parse_node_spec(text, default_port):
    """'host', 'host:port', '[IPv6]:port' or an IPv6 address → (host, port)."""
    match = re.fullmatch(r'\[([^\]]+)\](?::(\d+))?|([^:\[\]]+):(\d+)', text)
    if match:
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or default_port)
    elif text and '[' not in text and (':' not in text or _is_address(text)):
        host, port = text, default_port
    else:
        raise ValueError('%r is not a node (host, host:port or [IPv6]:port)' % text)
    if not 0 < port < 65536:
        raise ValueError('%r: the port must be 1 to 65535' % text)
    return host, port


def doctor_main(argv):
    """``python dispy.py --doctor [options] [NODE ...]``: see ``--help``; returns the
    exit status."""
    opts = _doctor_options(argv)
    setup_logging(logger.DEBUG if opts.debug else logger.WARNING)
    doctor = Doctor('dispy doctor')
    interfaces = interface_addresses()
    local = [addr for _family, addr, _bcast in interfaces]
    ip_addrs = [resolve_host(name) for name in opts.ip_addrs]
    if opts.ip_addrs or not opts.targets:
        doctor.add(check_addresses(opts.ip_addrs, ip_addrs, local,
                                   broadcast_addresses([a for a in ip_addrs if a] or None)))
    if not opts.targets:
        host = socket.gethostname()
        doctor.add(host_name_trap(host, _host_addresses(host), local))
    tls = check_tls_files(opts.certfile, opts.keyfile, opts.cafile)
    doctor.add(tls)
    if (tls is not None and tls.failed) or any(a is None for a in ip_addrs):
        return doctor.finish()      # every probe would fail the same way
    ssl_context = make_ssl_context(False, opts.certfile, opts.keyfile, opts.cafile)
    targets = opts.targets
    if not targets:
        result, targets = discover_nodes(opts.secret, opts.node_port, ip_addrs, opts.timeout)
        doctor.add(result)
    for host, port in targets:
        probe = NodeProbe(host, port, opts.secret, ssl_context, opts.timeout,
                          ip_addrs[0] if ip_addrs else None)
        doctor.add_all(probe.checks())
    return doctor.finish()


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
    parser.add_argument('--progress', action='store_true',
                        help='show jobs done / total, rate and ETA on stderr while waiting')
    parser.add_argument('-d', '--debug', action='store_true', help='log debug messages')
    parser.add_argument('--doctor', action='store_true', help='instead, check the nodes, '
                        'network, secret and TLS setup (dispy.py --doctor --help)')
    return parser


def main(argv=None):
    """``python dispy.py [options] program``: see ``--help``; ``python dispy.py
    --doctor ...``: ``doctor_main``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--doctor' in argv:
        return doctor_main([arg for arg in argv if arg != '--doctor'])
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
    cluster.wait(opts.timeout, progress=opts.progress or None)
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
