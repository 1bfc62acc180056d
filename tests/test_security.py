"""Every program survives a hostile network.

Real ``dispynode.py`` processes (and in-process clients) on loopback face what an
attacker on the network can send: a seeded fuzz of malformed handshakes, frames and
datagrams; floods of idle and drip-fed connections; hostile file transfers; replayed
frames and handshake proofs; forged and pickled datagrams; and a hostile "node" that
answers a client with malformed handshakes.  Afterwards the node must not have leaked
descriptors, threads or memory, must not have written outside its folder, must never
have run code it was sent, must never have logged the secret, and must keep serving a
legitimate client.  test_wire.py holds the unit-level wire tests; this file goes wider.

Only loopback addresses are used.
"""

import collections
import json
import logging
import os
import pickle
import random
import re
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest

from tests.support import NodeProcess, free_port, wait_until

import dispy

SECRET = 'hostile-network-secret'
NODE_IP = '127.0.0.2'
CLIENT_IP = '127.0.0.1'
JOB_TIMEOUT = 30


def compute_double(n):
    return n * 2


# ================================================================================
# Helpers
# ================================================================================

def proc_stats(pid):
    """(open descriptors, threads, RSS bytes) of a process, from /proc."""
    fds = len(os.listdir('/proc/%d/fd' % pid))
    threads = rss = 0
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('Threads:'):
                threads = int(line.split()[1])
            elif line.startswith('VmRSS:'):
                rss = int(line.split()[1]) * 1024
    return fds, threads, rss


def udp_rx_queue(port, hex_ip='0100007F'):
    """Bytes waiting in the receive queue of the UDP socket bound to 127.0.0.1:port
    (from /proc/net/udp), or None when no such socket exists."""
    try:
        with open('/proc/net/udp') as f:
            lines = f.readlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        ip, _, hexport = fields[1].partition(':')
        if ip == hex_ip and int(hexport, 16) == port:
            return int(fields[4].split(':')[1], 16)
    return None


def wait_closed(sock, timeout):
    """True when the peer closed (EOF or reset) within ``timeout`` (0: what is known
    now); drains any data the peer sent."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            readable, _, _ = select.select([sock], [], [], remaining)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except BlockingIOError:
            pass
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def evil_pickles(marker):
    """Pickles that would create ``marker`` if anything loaded them."""
    cmd = 'touch %s' % marker
    out = [pickle.dumps(_Evil(cmd), proto) for proto in (0, 2, 4, 5)]
    out.append(pickle.dumps([_Evil(cmd)], 4))
    out.append(pickle.dumps([('JOB', 1, 1, 0, _Evil(cmd), None)], 4))
    out.append(("cos\nsystem\n(S'%s'\ntR." % cmd).encode())
    out.append(("cposix\nsystem\n(S'%s'\ntR." % cmd).encode())
    out.append(("cbuiltins\nexec\n(S'import os; os.system(\"%s\")'\ntR." % cmd).encode())
    return out


class _Capture:
    def __init__(self):
        self.data = []

    def sendall(self, data):
        self.data.append(bytes(data))


def raw_frame(channel, obj):
    """The bytes ``channel.send(obj)`` would write (the sequence number advances)."""
    real, cap = channel.sock, _Capture()
    channel.sock = cap
    try:
        channel.send(obj)
    finally:
        channel.sock = real
    return b''.join(cap.data)


class _Recorder:
    """A socket wrapper that records what is sent and received."""

    def __init__(self, sock):
        self._sock = sock
        self.sent = []
        self.received = []

    def sendall(self, data):
        self.sent.append(bytes(data))
        return self._sock.sendall(data)

    def recv(self, n, *args):
        data = self._sock.recv(n, *args)
        self.received.append(data)
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


def authenticate(node, secret=SECRET, client_id='rogue', info=None, wrap=None, timeout=10):
    """An authenticated Channel to ``node`` that sent CLIENT (as a client would)."""
    sock = socket.create_connection((node.ip, node.port), timeout=5)
    try:
        if wrap is not None:
            sock = wrap(sock)
        channel = dispy.handshake(sock, secret, True, {'role': 'client'}, timeout=5)
        sock.settimeout(timeout)
        channel.send([('CLIENT', dict({'id': client_id, 'pid': os.getpid()}, **(info or {})))])
    except BaseException:
        sock.close()
        raise
    return channel


def recv_until(channel, predicate, timeout=10.0):
    """Reads messages until one satisfies ``predicate``; returns it, or None on timeout
    or when the node closed the connection."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        channel.sock.settimeout(remaining)
        try:
            msgs = channel.recv()
        except (OSError, dispy.ProtocolError, EOFError):
            return None
        for msg in msgs:
            if predicate(msg):
                return msg


def function_spec(ckey, files=(), dest_path=None):
    return {'kind': 'function', 'name': 'f', 'code': 'def f(): return 1', 'objects': None,
            'modules': [], 'setup': None, 'cleanup': None, 'remove_files': True,
            'dest_path': dest_path, 'files': list(files), 'key': ckey, 'cpus': 1}


def is_setup(ckey):
    return lambda m: isinstance(m, tuple) and len(m) >= 3 and m[0] == 'SETUP' and m[1] == ckey


_EXC_LINE = re.compile(r'^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt))\b(: .*)?')
_THREAD = re.compile(r'Exception in thread ([A-Za-z_-]+)')
_TIMESTAMP = re.compile(r'\d{4}-\d\d-\d\d \d\d:.*')


def uncaught_exceptions(text):
    """One line per 'Exception in thread' report in a node's stderr: the thread and the
    exception that ended it (log lines of other threads may be interleaved, even within
    a line, so timestamps are cut off)."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = _THREAD.search(line)
        if not match:
            continue
        last = '?'
        for follow in lines[i + 1:i + 60]:
            if _EXC_LINE.match(follow):
                last = _TIMESTAMP.sub('', follow).strip()
                break
        found.append('thread %s: %s' % (match.group(1), last))
    return found


def cluster_for(test, node, secret=SECRET, **kw):
    c = dispy.JobCluster(compute_double, nodes=[node.ip], ip_addr=CLIENT_IP, port=0,
                         node_port=node.port, secret=secret, **kw)
    test.addCleanup(c.close, timeout=10, terminate=True)
    return c


# ================================================================================
# 1. Fuzz
# ================================================================================

HELLO_KEYS = ('magic', 'version', 'pickle', 'nonce', 'max_frame', 'role')
KNOWN_KINDS = ('COMPUTE', 'FILE', 'JOB', 'PUT_FILE', 'SET_CPUS', 'CANCEL', 'ACK', 'CLOSE_COMPUTE',
               'PULSE')
WORDS = ('', '.', '..', '../../etc/passwd', '/tmp/x', 'CLIENT', 'NODE', 'x' * 300,
         '\0', 'dispy', '\u2603', 'a/b')


class Fuzzer:
    """Seeded generators of malformed input and the loops that send them.

    Every generator draws from the ``random.Random`` it is given, so each stream of
    input is reproducible; ``counts`` records how many inputs of each kind were sent
    and ``problems`` what the node did wrong (deduplicated, with a count)."""

    def __init__(self, node, marker, outside):
        self.node = node
        self.addr = (node.ip, node.port)
        self.marker = marker
        self.outside = outside
        self.evil = evil_pickles(marker)
        self.counts = collections.Counter()
        self.problems = collections.Counter()
        self.lock = threading.Lock()
        self.hangs = 0
        self.auth_hangs = 0
        self.node_udp_alive = True

    def count(self, kind, n=1):
        with self.lock:
            self.counts[kind] += n

    def problem(self, text):
        with self.lock:
            self.problems[text] += 1

    def total(self, prefix=''):
        with self.lock:
            return sum(n for k, n in self.counts.items() if k.startswith(prefix))

    # -- random plain values ---------------------------------------------------------
    def plain(self, rng, depth=0):
        kind = rng.randrange(10 if depth < 2 else 7)
        if kind == 0:
            return rng.randint(-(1 << 70), 1 << 70)
        if kind == 1:
            return rng.choice((0.5, -1.0, float('nan'), float('inf'), 1e308, 0.0))
        if kind == 2:
            return ''.join(chr(rng.randint(1, 0x3000)) for _ in range(rng.randint(0, 12)))
        if kind == 3:
            return rng.randbytes(rng.randint(0, 64))
        if kind == 4:
            return rng.choice((None, True, False, 0, -1, 1 << 40))
        if kind in (5, 6):
            return rng.choice(WORDS)
        if kind == 7:
            return [self.plain(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        if kind == 8:
            return tuple(self.plain(rng, depth + 1) for _ in range(rng.randint(0, 4)))
        keys = [self.plain(rng, 2) for _ in range(rng.randint(0, 4))]
        return {k: self.plain(rng, depth + 1) for k in keys if not isinstance(k, (list, dict))}

    def json_value(self, rng, depth=0):
        kind = rng.randrange(8 if depth < 2 else 6)
        if kind == 0:
            return rng.randint(-(1 << 80), 1 << 80)
        if kind == 1:       # non-finite numbers are rare: they are one input among many
            return rng.choice((0.5, -3.25, 1e300, float('nan'))) if rng.random() < 0.97 \
                else float('inf')
        if kind == 2:
            return ''.join(chr(rng.randint(32, 0x2000)) for _ in range(rng.randint(0, 20)))
        if kind == 3:
            return rng.choice((None, True, False))
        if kind in (4, 5):
            return rng.choice((1, 0, -1, 4, 'dispy', '00', 1 << 64))
        if kind == 6:
            return [self.json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {str(rng.randint(0, 9)): self.json_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}

    # -- unauthenticated TCP ---------------------------------------------------------------
    def unauth_payload(self, rng):
        kind = rng.randrange(9)
        if kind == 0:
            return 'random-bytes', rng.randbytes(rng.randint(0, 2000))
        if kind == 1:
            n = rng.randint(1, dispy.MAX_HANDSHAKE_MSG)
            return 'truncated-hello', b'DSPY' + struct.pack('!H', n) + rng.randbytes(
                rng.randint(0, n - 1))
        if kind == 2:
            n = rng.randint(dispy.MAX_HANDSHAKE_MSG + 1, 0xFFFF)
            return 'oversized-hello', b'DSPY' + struct.pack('!H', n) + rng.randbytes(
                rng.randint(0, 3000))
        if kind == 3:
            junk = rng.randbytes(rng.randint(0, 600))
            return 'junk-hello', b'DSPY' + struct.pack('!H', len(junk)) + junk
        if kind == 4:
            hello = {k: (self.json_value(rng) if rng.random() < 0.5 else
                         {'magic': 'dispy', 'version': dispy.PROTOCOL_VERSION, 'pickle': 4,
                          'nonce': '00', 'max_frame': 1000, 'role': 'client'}[k])
                     for k in HELLO_KEYS if rng.random() < 0.85}
            body = json.dumps(hello).encode()[:dispy.MAX_HANDSHAKE_MSG]
            return 'json-hello-wrong-types', b'DSPY' + struct.pack('!H', len(body)) + body
        if kind == 5:
            choice = rng.randrange(5)
            if choice == 0:
                body = b'[' * rng.randint(1, 3000)
            elif choice == 1:
                body = json.dumps([self.json_value(rng) for _ in range(3)]).encode()
            elif choice == 2:
                body = json.dumps(self.json_value(rng)).encode()
            elif choice == 3:
                body = b'null'
            else:
                body = b'{"version": 1, "pickle": 4, "nonce": "00", "max_frame": 1e400}'
            return 'json-hello-not-a-hello', b'DSPY' + struct.pack('!H', len(body)) + body
        if kind == 6:
            evil = rng.choice(self.evil)
            if rng.random() < 0.5:
                return 'evil-pickle-raw', evil
            return 'evil-pickle-as-hello', b'DSPY' + struct.pack('!H', len(evil)) + evil
        if kind == 7:
            return 'foreign-protocol', rng.choice((
                b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03' + rng.randbytes(40),
                b'GET / HTTP/1.1\r\nHost: x\r\n\r\n', b'SSH-2.0-OpenSSH_9.0\r\n',
                b'\x15\x03\x03\x00\x02\x02\x28'))
        hello = json.dumps({'magic': 'dispy', 'version': rng.choice((0, 2, -1, 1 << 40)),
                            'pickle': 4, 'nonce': '00', 'max_frame': 10}).encode()
        return 'wrong-version-hello', b'DSPY' + struct.pack('!H', len(hello)) + hello

    def unauth_once(self, rng):
        if rng.random() < 0.12:
            return self.bad_proof_once(rng)
        kind, data = self.unauth_payload(rng)
        with socket.create_connection(self.addr, timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass       # the node may close before reading everything: fine
            closed = wait_closed(sock, 1.5 if self.hangs < 10 else 0.3)
        self.count('tcp-unauth:' + kind)
        if not closed:
            self.hangs += 1
            self.problem('node left an unauthenticated connection open after a %s' % kind)

    def bad_proof_once(self, rng):
        """A well-formed hello, then a wrong (or truncated) proof."""
        with socket.create_connection(self.addr, timeout=5) as sock:
            hello = json.dumps({'magic': 'dispy', 'version': dispy.PROTOCOL_VERSION,
                                'pickle': 4, 'nonce': rng.randbytes(16).hex(),
                                'max_frame': 1 << 20, 'role': 'client'}).encode()
            dispy._send_hs(sock, hello)
            node_hello = dispy._recv_hs(sock)
            choice = rng.randrange(4)
            if choice == 0:
                proof, kind = b'P' + rng.randbytes(32), 'bad-proof-random'
            elif choice == 1:      # right structure, wrong secret
                key = dispy.secret_key('not-' + SECRET)
                proof = b'P' + dispy._mac(key, b'dispy-proof-dialer', hello + node_hello)
                kind = 'bad-proof-wrong-secret'
            elif choice == 2:
                proof, kind = b'P' + node_hello[:32].ljust(32, b'\0'), 'bad-proof-reflected'
            else:
                proof, kind = rng.randbytes(rng.randint(0, 32)), 'bad-proof-truncated'
            try:
                sock.sendall(proof)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if len(proof) == 33:
                try:
                    answer = dispy._recv_exact(sock, 33)
                except (OSError, dispy.ProtocolError):
                    answer = b''
                if answer != b'F' + bytes(32):
                    self.problem('node answered a wrong proof with %r, not a bare F' % answer[:4])
            closed = wait_closed(sock, 2.0)
        self.count('tcp-unauth:' + kind)
        if not closed:
            self.problem('node left a connection open after a wrong proof')

    # -- authenticated TCP ------------------------------------------------------------------
    def soft_message(self, rng):
        """A message the node should reject one by one, keeping the connection."""
        r = rng.random()
        if r < 0.08:
            return self.plain(rng, 1)                      # not a tuple at all
        if r < 0.16:
            kind = rng.choice(('NODE', 'CLIENT', 'RESULT', 'SETUP', 'BUSY', 'job', '', 5,
                               None, b'JOB', 3.5, ('JOB',)))
            return (kind,) + tuple(self.plain(rng, 1) for _ in range(rng.randint(0, 6)))
        if r < 0.2:
            return ()
        if r < 0.4:
            abs_dest = os.path.join(self.outside, 'abs-dest')
            curated = [('JOB', 'x'), ('JOB',),
                       ('FILE', 1, '../../etc/passwd', 0o4777, 0, b'x', True), ('COMPUTE', 5, {}), ('COMPUTE', 6, {'name': 5}),
                       ('COMPUTE', 7, {'name': 'f', 'dest_path': '../../up'}),
                       ('COMPUTE', 8, {'name': 'f', 'dest_path': abs_dest}),
                       ('COMPUTE', 9, {'name': 'f', 'files': ['../../x', '/etc/passwd']}),
                       ('FILE', 9, '../../x', 0o6755, 0, b'data', True),
                       ('COMPUTE', 10, {'name': 'f', 'files': 5}),
                       ('CANCEL', 1, 0), ('ACK', 1, 0), ('ACK', [(1, 0)]), ('ACK', 5),
                       ('JOB', 5, 1, 1, (1, 2), None), ('JOB', 5, 1, 1, [b'x'], None),
                       ('JOB', 5, 1, 1, (), None), ('RECALL', 'x', None),
                       ('ACK', [(1,), 'x']), ('PULSE', float('nan'))]
            if rng.random() < 0.03:     # these end the connection today: keep them rare
                curated = [('COMPUTE', 11, {'name': 'n' * 300}), ('COMPUTE', 12, 'not a dict'),
                           ([1], 2)]
            return curated[rng.randrange(len(curated))]
        kind = rng.choice(KNOWN_KINDS)
        arity = rng.randint(0, 8)
        if kind == 'JOB' and arity == 5:
            arity = 6      # a well-formed JOB would leave a result held for the rogue
        return (kind,) + tuple(self.plain(rng, 1) for _ in range(arity))

    def first_frame(self, rng):
        """(kind, body) sent instead of the CLIENT message."""
        cases = (
            ('non-list', pickle.dumps(('CLIENT', {}))), ('list-of-int', pickle.dumps([5])),
            ('empty-tuple', pickle.dumps([()])), ('list-of-dict', pickle.dumps([{}])),
            ('client-no-info', pickle.dumps([('CLIENT',)])),
            ('client-info-int', pickle.dumps([('CLIENT', 5)])),
            ('client-bad-pulse', pickle.dumps([('CLIENT', {'id': 'r', 'pulse_interval': 'x'})])),
            ('client-list-pulse', pickle.dumps([('CLIENT', {'pulse_interval': [1]})])),
            ('two-messages', pickle.dumps([('CLIENT', {}), ('JOB', 'x')])),
            ('job-first', pickle.dumps([('JOB', 'x')])),
            ('evil-pickle', rng.choice(self.evil)),
            ('random-bytes', rng.randbytes(rng.randint(0, 300))),
            ('huge-bytearray-length', b'\x80\x05\x96' + struct.pack('<Q', 1 << 62)))
        return cases[rng.randrange(len(cases))]

    def terminal(self, channel, rng):
        """Ends an authenticated connection with something the node must reject."""
        kind = rng.choice(('bad-hmac', 'flipped-bit', 'skipped-seq', 'replayed', 'truncated',
                           'oversized-length', 'non-pickle', 'non-list', 'evil-pickle',
                           'release'))
        sock = channel.sock
        if kind == 'bad-hmac':
            frame = raw_frame(channel, [('PULSE', 1)])
            sock.sendall(frame[:-32] + rng.randbytes(32))
        elif kind == 'flipped-bit':
            frame = bytearray(raw_frame(channel, [('ACK', 1, 2)]))
            pos = rng.randrange(len(frame))
            frame[pos] ^= 1 << rng.randrange(8)
            sock.sendall(bytes(frame))
        elif kind == 'skipped-seq':
            channel.send_seq += rng.randint(1, 5)
            channel.send([('PULSE', 1)])
        elif kind == 'replayed':
            frame = raw_frame(channel, [('PULSE', 2)])
            sock.sendall(frame + frame)
        elif kind == 'truncated':
            frame = raw_frame(channel, [('PULSE', 'x' * rng.randint(0, 500))])
            sock.sendall(frame[:rng.randrange(len(frame))])
            sock.shutdown(socket.SHUT_WR)
        elif kind == 'oversized-length':
            sock.sendall(struct.pack('!I', rng.randint(dispy.DEFAULT_MAX_FRAME + 1, 0xFFFFFFFF))
                         + rng.randbytes(rng.randint(0, 100)))
        elif kind == 'non-pickle':
            channel.send_body(b'\xff' + rng.randbytes(rng.randint(0, 300)))
        elif kind == 'non-list':
            channel.send_body(pickle.dumps(rng.choice((('CLIENT', {}), {'a': 1}, 5, 'x', None))))
        elif kind == 'evil-pickle':
            channel.send_body(rng.choice(self.evil))
        else:
            channel.send([('RELEASE',)])
        return kind

    def auth_once(self, rng):
        sock = socket.create_connection(self.addr, timeout=5)
        try:
            channel = dispy.handshake(sock, SECRET, True, {'role': 'client'}, timeout=5)
            sock.settimeout(5)
            if rng.random() < 0.15:
                kind, body = self.first_frame(rng)
                channel.send_body(body)
                self.count('frame-first:' + kind)
            else:
                channel.send([('CLIENT', {'id': 'rogue', 'pid': 1})])
                for _ in range(rng.randint(30, 60)):
                    channel.send([self.soft_message(rng) for _ in range(rng.randint(1, 3))])
                    self.count('frame-soft')
                kind = self.terminal(channel, rng)
                self.count('frame-terminal:' + kind)
            # The node must read up to the bad frame and close; waiting for that also
            # keeps our close from resetting the connection before the node read it all.
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if not wait_closed(sock, 2.0 if self.auth_hangs < 5 else 0.3):
                self.auth_hangs += 1
                self.problem('node left an authenticated connection open after %s' % kind)
        except (OSError, dispy.ProtocolError):
            pass        # the node closed on us (an input that ends the connection)
        finally:
            try:
                sock.close()
            except OSError:
                pass

    # -- UDP ----------------------------------------------------------------------------------
    def datagram(self, rng):
        kind = rng.randrange(8)
        if kind == 0:
            return 'random-bytes', rng.randbytes(rng.randint(0, 1400))
        if kind == 1:
            return 'magic-junk', dispy.UDP_MAGIC + rng.randbytes(rng.randint(0, 600))
        if kind == 2:
            msg = {'t': rng.choice(('ping', 'pong', 'announce', 'nak', 'x')),
                   'port': self.json_value(rng), 'ip': self.json_value(rng),
                   'client': self.json_value(rng), 'busy': self.json_value(rng)}
            return 'json-bad-mac', dispy.UDP_MAGIC + rng.randbytes(32) + json.dumps(msg).encode()
        if kind == 3:
            msg = {'t': rng.choice(('ping', 'pong', 'announce')), 'port': 1, 'ip': '127.0.0.9'}
            return 'wrong-secret', dispy.pack_datagram('not-' + SECRET, msg)
        if kind == 4:
            return 'oversized', dispy.UDP_MAGIC + bytes(32) + b' ' * rng.randint(
                dispy.MAX_HANDSHAKE_MSG, 60000)
        if kind == 5:
            evil = rng.choice(self.evil)
            return 'evil-pickle', evil if rng.random() < 0.5 else dispy.UDP_MAGIC + bytes(32) + evil
        if kind == 6:
            if rng.random() < 0.01:
                body = b'[' * rng.randint(1000, 4000)
            else:
                body = json.dumps(self.json_value(rng)).encode()
            return 'json-not-object', dispy.UDP_MAGIC + rng.randbytes(32) + body
        return 'empty', rng.choice((b'', dispy.UDP_MAGIC, dispy.UDP_MAGIC + bytes(32)))

    def node_ping_ok(self, sock):
        """A valid ping gets an authenticated pong (after any naks).  The node's queue
        is drained first and the ping retried, so a datagram the kernel dropped from a
        full buffer is not taken for a deaf node."""
        hex_ip = socket.inet_aton(self.addr[0])[::-1].hex().upper()
        wait_until(lambda: not udp_rx_queue(self.addr[1], hex_ip), 3.0, 0.005)
        ping = dispy.pack_datagram(SECRET, {'t': 'ping', 'client': 'fuzz', 'port': 1})
        for _ in range(3):
            sock.sendto(ping, self.addr)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = sock.recv(65536)
                except OSError:
                    break
                msg, good = dispy.unpack_datagram(SECRET, data)
                if good and msg.get('t') == 'pong':
                    return True
        return False

    def udp_node(self, rng, deadline, quota):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((CLIENT_IP, 0))
            sent = 0
            while sent < quota and time.monotonic() < deadline:
                batch = []
                for _ in range(25):
                    kind, data = self.datagram(rng)
                    try:
                        sock.sendto(data, self.addr)
                    except OSError:
                        continue
                    batch.append(kind)
                    self.count('udp-node:' + kind)
                sent += len(batch)
                if self.node_udp_alive and not self.node_ping_ok(sock):
                    self.node_udp_alive = False
                    self.problem('node stopped answering valid pings after datagrams of kinds '
                                 '%s' % sorted(set(batch)))

    def udp_hub(self, rng, port, deadline, quota):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((CLIENT_IP, 0))
            sent = 0
            while sent < quota and time.monotonic() < deadline:
                for _ in range(50):
                    kind, data = self.datagram(rng)
                    try:
                        sock.sendto(data, (CLIENT_IP, port))
                    except OSError:
                        continue
                    sent += 1
                    self.count('udp-hub:' + kind)
                # the hub reads what arrived before the next batch (no drops, no sleep)
                wait_until(lambda: not udp_rx_queue(port), 3.0, 0.005)


class FuzzTest(unittest.TestCase):
    """Seeded fuzz (random.Random(1234)) of a running node (TCP and UDP) and of a
    client hub's UDP port; the node must leak nothing and keep serving."""

    timeout = 150
    FUZZ_SECONDS = 40         # hard cap on time spent sending, whatever the count
    HUB_SECONDS = 8           # of which the client hub's share
    MIN_INPUTS = 5000
    NODE_QUOTA = {'udp': 3000, 'unauth': 1200, 'auth': 300}
    HUB_QUOTA = 1500

    def test_fuzz_node_and_client_hub(self):
        node = NodeProcess(NODE_IP, secret=SECRET, cpus=2)
        node.start()
        self.addCleanup(node.stop)
        outside = tempfile.mkdtemp(prefix='dispytest-fuzz-')
        self.addCleanup(shutil.rmtree, outside, True)
        marker = os.path.join(outside, 'pwned')
        fuzz = Fuzzer(node, marker, outside)
        master = random.Random(1234)
        streams = [random.Random(master.getrandbits(64)) for _ in range(6)]
        pid = node.proc.pid
        base_fds, base_threads, base_rss = proc_stats(pid)
        start = time.monotonic()
        deadline = start + self.FUZZ_SECONDS - self.HUB_SECONDS     # the node's share

        # -- the node: UDP and unauthenticated TCP in threads, authenticated here ------
        def unauth_worker(rng, quota):
            for _ in range(quota):
                if time.monotonic() >= deadline:
                    return
                try:
                    fuzz.unauth_once(rng)
                except (OSError, dispy.ProtocolError) as exc:
                    fuzz.count('tcp-unauth:connect-error')
                    fuzz.problem('unauthenticated connection failed: %s' % exc.__class__.__name__)

        workers = [threading.Thread(target=fuzz.udp_node,
                                    args=(streams[0], deadline, self.NODE_QUOTA['udp']))]
        workers += [threading.Thread(target=unauth_worker,
                                     args=(streams[1 + i], self.NODE_QUOTA['unauth'] // 3))
                    for i in range(3)]
        for t in workers:
            t.daemon = True
            t.start()
        try:
            for _ in range(self.NODE_QUOTA['auth']):
                if time.monotonic() >= deadline:
                    break
                fuzz.auth_once(streams[4])
        finally:
            for t in workers:
                t.join(max(1.0, deadline - time.monotonic() + 5))
        node_time = time.monotonic() - start

        # -- the node recovers: descriptors, threads, memory, files ------------------------
        problems = ['%s (x%d)' % item for item in sorted(fuzz.problems.items())]
        recovered = wait_until(lambda: (lambda s: s[0] <= base_fds + 2 and
                                        s[1] <= base_threads + 2)(proc_stats(pid)), 10)
        fds, threads, rss = proc_stats(pid)
        if not recovered:
            problems.append('node did not recover: %d fds (baseline %d), %d threads (baseline '
                            '%d) 10 s after the fuzz' % (fds, base_fds, threads, base_threads))
        if rss - base_rss > 30 << 20:
            problems.append('node RSS grew by %d MB' % ((rss - base_rss) >> 20))
        if not wait_until(lambda: not os.listdir(node.dest_path_prefix), 5):
            left = sorted(os.listdir(node.dest_path_prefix))
            problems.append('%d folder(s) left in --dest_path_prefix after the rogue sessions '
                            'ended, e.g. %s' % (len(left), left[:3]))
        if os.path.exists(os.path.join(outside, 'abs-dest')):
            problems.append('an absolute dest_path was created outside the prefix')
        escapes = [p for p in os.listdir(node.dir) if p not in ('stdout', 'stderr', 'dest')]
        if escapes:
            problems.append('files written outside --dest_path_prefix: %s' % escapes)
        uncaught = uncaught_exceptions(node.stderr())
        if uncaught:
            threads_hit = collections.Counter(u.split(':')[0] for u in uncaught)
            problems.append('%d uncaught exception(s) ended node threads: %s (see '
                            'EscapingExceptionsTest for the inputs and exception types)'
                            % (len(uncaught), dict(threads_hit)))

        # -- a legitimate client; then its hub's UDP port is fuzzed too ------------------
        cluster = cluster_for(self, node)
        hub = cluster._hub
        fuzz.udp_hub(streams[5], hub.port, time.monotonic() + self.HUB_SECONDS, self.HUB_QUOTA)
        if not hub.thread.is_alive():
            problems.append('client hub thread died during the UDP fuzz')
        jobs = [cluster.submit(i) for i in range(20)]
        results = [job(timeout=JOB_TIMEOUT) for job in jobs]
        if results != [2 * i for i in range(20)]:
            problems.append('legitimate client after the fuzz got %r (statuses %r)'
                            % (results, [j.status for j in jobs]))
        if os.path.exists(marker):
            problems.append('a pickled payload was executed: %s exists' % marker)

        total = fuzz.total()
        log = node.stderr()
        summary = ('inputs: %d in %.1f s at the node; node logged %d "refused", %d "unknown '
                   'message", %d "malformed", %d "failed authentication"; by kind: %s' % (
                       total, node_time, log.count('refused'), log.count('unknown message'),
                       log.count('malformed'), log.count('failed authentication'),
                       dict(sorted(fuzz.counts.items()))))
        if os.environ.get('DISPY_TEST_VERBOSE'):
            print('\n' + summary, file=sys.stderr)
        self.assertFalse(os.path.exists(marker))
        self.assertGreaterEqual(total, self.MIN_INPUTS, summary)
        if problems:
            self.fail('the node mishandled hostile input:\n  ' + '\n  '.join(problems)
                      + '\n' + summary)


# ================================================================================
# 2. Floods of idle and drip-fed connections
# ================================================================================

class FloodTest(unittest.TestCase):
    timeout = 90
    FLOOD = 200

    def test_flood_of_idle_and_drip_fed_connections(self):
        node = NodeProcess(NODE_IP, secret=SECRET, cpus=2)
        node.start()
        self.addCleanup(node.stop)
        pid = node.proc.pid
        base_fds = proc_stats(pid)[0]
        drip = {'closed_after': None}
        drip_started = threading.Event()
        limit = dispy.HANDSHAKE_TIMEOUT + 4

        def drip_feed():
            """A hello sent one byte a second: the node must cut it off at its handshake
            timeout however the bytes trickle in."""
            with socket.create_connection((node.ip, node.port), timeout=5) as sock:
                t0 = time.monotonic()
                drip_started.set()
                payload = b'DSPY' + struct.pack('!H', 300) + b'{' * 300
                for byte in payload:
                    if time.monotonic() - t0 > limit:
                        return
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:
                        drip['closed_after'] = time.monotonic() - t0
                        return
                    if wait_closed(sock, 1.0):         # paces the drip: one byte a second
                        drip['closed_after'] = time.monotonic() - t0
                        return

        dripper = threading.Thread(target=drip_feed, daemon=True)
        dripper.start()
        self.assertTrue(drip_started.wait(5))
        socks = []
        try:
            for _ in range(self.FLOOD):
                socks.append(socket.create_connection((node.ip, node.port), timeout=5))
            flood_start = time.monotonic()
            cluster = cluster_for(self, node)
            self.assertEqual(cluster.submit(21)(timeout=JOB_TIMEOUT), 42,
                             'no result while %d idle connections were open' % self.FLOOD)
            served_after = time.monotonic() - flood_start
            if os.environ.get('DISPY_TEST_VERBOSE'):
                print('\nserved %.1f s after %d idle connections opened'
                      % (served_after, self.FLOOD), file=sys.stderr)
            closed = set()

            def all_closed():
                for i, s in enumerate(socks):
                    if i not in closed and wait_closed(s, 0):
                        closed.add(i)
                return len(closed) == len(socks)
            self.assertTrue(wait_until(all_closed, dispy.HANDSHAKE_TIMEOUT + 8, 0.1),
                            '%d of %d idle connections still open %.0f s after the flood'
                            % (len(socks) - len(closed), len(socks),
                               time.monotonic() - flood_start))
            cluster.close(timeout=10)
        finally:
            for s in socks:
                s.close()
        dripper.join(limit + 5)
        self.assertTrue(wait_until(lambda: proc_stats(pid)[0] <= base_fds + 2, 25),
                        'node has %d fds, baseline %d' % (proc_stats(pid)[0], base_fds))
        self.assertIn('refused', node.stderr())
        self.assertLess(served_after, JOB_TIMEOUT)
        self.assertIsNotNone(drip['closed_after'],
                             'a hello drip-fed one byte a second was still open after %.0f s: '
                             'the handshake timeout restarts with every byte, so a few such '
                             'connections hold every handshake slot' % limit)
        self.assertLess(drip['closed_after'], dispy.HANDSHAKE_TIMEOUT + 3)


# ================================================================================
# 3. Hostile file transfers
# ================================================================================

class FileTransferTest(unittest.TestCase):
    """COMPUTE + FILE messages from an authenticated peer with hostile names, folders,
    modes and sizes, against a node started with ``--max_file_size 1k``."""

    timeout = 60

    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess(NODE_IP, secret=SECRET, cpus=1, args=['--max_file_size', '1k'])
        cls.node.start()
        cls.addClassCleanup(cls.node.stop)
        cls.ckeys = iter(range(1000, 100000))

    def setUp(self):
        self.outside = tempfile.mkdtemp(prefix='dispytest-outside-')
        self.addCleanup(shutil.rmtree, self.outside, True)
        self.tag = os.urandom(4).hex()
        # the previous test's session ended: its folders go (observed, bounded)
        wait_until(lambda: not os.listdir(self.prefix), 10)
        self.channel = authenticate(self.node, client_id='hostile-files')
        self.addCleanup(self.channel.close)
        self.assertIsNotNone(recv_until(self.channel, lambda m: m[0] == 'NODE'))

    @property
    def prefix(self):
        return self.node.dest_path_prefix

    def send_file(self, name, data, mode=0o644, offset=0, last=True, ckey=None):
        ckey = ckey or next(self.ckeys)
        self.channel.send([('COMPUTE', ckey, function_spec(ckey, [name]))])
        self.channel.send([('FILE', ckey, name, mode, offset, data, last)])
        return ckey

    def setup_reply(self, ckey, timeout=10):
        return recv_until(self.channel, is_setup(ckey), timeout)

    def comp_files(self):
        """{computation folder: [files]} under the prefix."""
        out = {}
        for d in os.listdir(self.prefix):
            path = os.path.join(self.prefix, d)
            try:
                out[d] = sorted(os.listdir(path)) if os.path.isdir(path) else None
            except FileNotFoundError:       # a closed computation's folder, going away
                pass
        return out

    def assert_nothing_outside(self, targets):
        for path in targets:
            self.assertFalse(os.path.lexists(path), '%s was written' % path)
        self.assertEqual(sorted(os.listdir(self.node.dir)), ['dest', 'stderr', 'stdout'])
        self.assertEqual(os.listdir(self.outside), [])

    def assert_still_serving(self):
        ckey = self.send_file('ok.txt', b'fine')
        reply = self.setup_reply(ckey)
        self.assertEqual(reply and reply[2], True, reply)

    def test_file_names_that_leave_the_folder_are_refused(self):
        abs_target = os.path.join(self.outside, 'abs-target')
        names = [abs_target, '../x-' + self.tag, '../../x-' + self.tag, 'a/../../x-' + self.tag,
                 'sub/x-' + self.tag, '', '.', '..', 'x\0y', '..\\x-' + self.tag]
        for name in names:
            ckey = self.send_file(name, b'hostile', mode=0o755)
            reply = self.setup_reply(ckey)
            self.assertIsNotNone(reply, 'no SETUP reply for file name %r' % name)
            self.assertFalse(reply[2], 'file name %r accepted' % name)
            self.assertIn('refused', reply[3])
        self.assert_nothing_outside([abs_target, os.path.join(self.prefix, 'x-' + self.tag),
                                     os.path.join(self.node.dir, 'x-' + self.tag)])
        for folder, files in self.comp_files().items():
            self.assertEqual(files, [], 'computation folder %s holds %s' % (folder, files))
        self.assertIn('refused', self.node.stderr())
        self.assert_still_serving()

    def test_dest_path_outside_the_prefix_is_refused(self):
        parent = os.path.dirname(self.node.dir)
        escape = 'escape-' + self.tag
        self.addCleanup(shutil.rmtree, os.path.join(parent, escape), True)
        dests = {'../../' + escape: os.path.join(parent, escape),
                 os.path.join(self.outside, 'abs-dest'): os.path.join(self.outside, 'abs-dest'),
                 'a/../../' + escape: os.path.join(self.node.dir, escape),
                 '..': self.node.dir}
        for dest in dests:
            ckey = next(self.ckeys)
            self.channel.send([('COMPUTE', ckey, function_spec(ckey, ['f.txt'], dest))])
            self.channel.send([('FILE', ckey, 'f.txt', 0o644, 0, b'hostile', True)])
        self.assertTrue(wait_until(lambda: self.node.stderr().count('refused path')
                                   >= len(dests), 10), self.node.stderr()[-3000:])
        self.assert_still_serving()
        self.assert_nothing_outside([p for p in dests.values() if p != self.node.dir])
        for path in dests.values():
            self.assertFalse(os.path.exists(os.path.join(path, 'f.txt')))

    def test_refused_dest_path_is_reported_to_the_client(self):
        """A client (hostile or merely misconfigured: dest_path='../x') must hear that
        its computation was refused, or its jobs wait forever."""
        ckey = next(self.ckeys)
        self.channel.send([('COMPUTE', ckey, function_spec(ckey, [], '../../escape-' + self.tag))])
        reply = self.setup_reply(ckey, timeout=5)
        self.assertIsNotNone(reply, 'the node logged "refused path" but sent the client no '
                             'SETUP failure for computation %s' % ckey)
        self.assertFalse(reply[2])

    def test_setuid_setgid_sticky_bits_are_never_set(self):
        ckey = next(self.ckeys)
        modes = {'t1': 0o6755, 't2': 0o4777, 't3': 0o2755, 't4': 0o1777, 't5': 0o7777}
        self.channel.send([('COMPUTE', ckey, function_spec(ckey, sorted(modes)))])
        for name, mode in sorted(modes.items()):
            self.channel.send([('FILE', ckey, name, mode, 0, b'#!/bin/sh\n', True)])
        reply = self.setup_reply(ckey)
        self.assertEqual(reply and reply[2], True, reply)
        folders = [d for d, files in self.comp_files().items() if files and 't1' in files]
        self.assertEqual(len(folders), 1, self.comp_files())
        for name in modes:
            st = os.stat(os.path.join(self.prefix, folders[0], name))
            self.assertEqual(st.st_mode & 0o7000, 0, '%s has mode %o' % (name, st.st_mode))
            self.assertEqual(st.st_mode & 0o600, 0o600)

    def test_file_over_max_file_size_is_refused(self):
        ckey = self.send_file('big-' + self.tag, b'x' * 2000)
        reply = self.setup_reply(ckey)
        self.assertEqual(reply and reply[2], False, reply)
        self.assertIn('max_file_size', reply[3])
        # in chunks with true offsets: the second chunk passes the limit
        ckey = next(self.ckeys)
        name = 'big2-' + self.tag
        self.channel.send([('COMPUTE', ckey, function_spec(ckey, [name]))])
        self.channel.send([('FILE', ckey, name, 0o644, 0, b'y' * 600, False)])
        self.channel.send([('FILE', ckey, name, 0o644, 600, b'y' * 600, True)])
        reply = self.setup_reply(ckey)
        self.assertEqual(reply and reply[2], False, reply)
        self.assertIn('max_file_size', reply[3])
        for folder, files in self.comp_files().items():
            self.assertNotIn('big-' + self.tag, files or [])
            self.assertNotIn(name, files or [], 'partial file left in %s' % folder)
        self.assertIn('max_file_size', self.node.stderr())
        self.assert_still_serving()

    def test_put_file_to_a_running_computation_is_confined(self):
        """PUT_FILE (cluster.send_file) into a computation that is set up: the same
        rules for names, modes and --max_file_size, whatever the offsets claim."""
        ckey = next(self.ckeys)
        dest = 'put-dest-' + self.tag
        self.channel.send([('COMPUTE', ckey, function_spec(ckey, [], dest))])
        reply = self.setup_reply(ckey, 20)
        self.assertEqual(reply and reply[2], True, reply)
        folder = os.path.join(self.prefix, dest)
        abs_target = os.path.join(self.outside, 'put-abs')
        cases = [(abs_target, 0, b'x'), ('../put-' + self.tag, 0, b'x'), ('', 0, b'x'),
                 ('..', 0, b'x'), ('big', 0, b'b' * 2000), ('sparse', 1000, b's' * 100),
                 ('negative', -100, b'n' * 10)]
        for name, offset, data in cases:
            self.channel.send([('PUT_FILE', ckey, name, 0o644, offset, data, True)])
            done = recv_until(self.channel, lambda m: m[0] == 'PUT_FILE_DONE' and m[2] == name)
            self.assertIsNotNone(done, 'no PUT_FILE_DONE for %r' % name)
            self.assertTrue(done[3], 'PUT_FILE of %r at offset %d accepted' % (name, offset))
        self.channel.send([('PUT_FILE', ckey, 'tool', 0o6755, 0, b'#!/bin/sh\n', True)])
        done = recv_until(self.channel, lambda m: m[0] == 'PUT_FILE_DONE' and m[2] == 'tool')
        self.assertEqual(done and done[3], None, done)
        self.assert_nothing_outside([abs_target, os.path.join(self.prefix, 'put-' + self.tag)])
        sizes = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
        self.assertTrue(all(size <= 1024 for size in sizes.values()), sizes)
        self.assertEqual(os.stat(os.path.join(folder, 'tool')).st_mode & 0o7000, 0)

    def test_file_size_limit_counts_bytes_received_not_claimed_offsets(self):
        """The limit must hold when a peer lies about offsets (each chunk claims offset
        0, or a negative one): the node appends every chunk whatever its offset."""
        for offsets in ((0, 0, 0), (0, -600, -1200)):
            ckey = next(self.ckeys)
            name = 'liar-%s-%d' % (self.tag, ckey)
            self.channel.send([('COMPUTE', ckey, function_spec(ckey, [name]))])
            for i, offset in enumerate(offsets):
                self.channel.send([('FILE', ckey, name, 0o644, offset, b'z' * 600,
                                    i == len(offsets) - 1)])
            reply = self.setup_reply(ckey)
            sizes = {f: os.path.getsize(os.path.join(self.prefix, d, f))
                     for d, files in self.comp_files().items() for f in files or [] if f == name}
            self.assertEqual(reply and reply[2], False,
                             'offsets %s: %d bytes accepted past a 1024-byte --max_file_size '
                             '(file sizes on the node: %s)' % (offsets, 600 * len(offsets), sizes))
            self.assertEqual(sizes, {}, 'offsets %s: the transfer was refused but its partial '
                             'file remains (sizes %s)' % (offsets, sizes))


class SecretNodeTestCase(unittest.TestCase):
    """One 1-CPU node with the secret, started for the class."""

    timeout = 60

    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess(NODE_IP, secret=SECRET, cpus=1)
        cls.node.start()
        cls.addClassCleanup(cls.node.stop)


# ================================================================================
# 4. Replay across connections
# ================================================================================

class ReplayTest(SecretNodeTestCase):

    def record_session(self, dest):
        """A complete, legitimate session, recorded: hello, proof, then frames
        CLIENT, COMPUTE (creates ``dest``), CLOSE_COMPUTE."""
        recorder = []

        def wrap(sock):
            recorder.append(_Recorder(sock))
            return recorder[0]
        channel = authenticate(self.node, client_id='replayer', wrap=wrap)
        try:
            self.assertTrue(recv_until(channel, lambda m: m[0] == 'NODE'))
            channel.send([('COMPUTE', 1, function_spec(1, [], dest))])
            reply = recv_until(channel, is_setup(1), 20)
            self.assertEqual(reply and reply[2], True, reply)
            self.assertTrue(os.path.isdir(os.path.join(self.node.dest_path_prefix, dest)))
            channel.send([('CLOSE_COMPUTE', 1)])
            self.assertTrue(recv_until(channel, lambda m: m[:2] == ('CLOSED', 1), 20))
        finally:
            channel.close()
        sent = recorder[0].sent
        self.assertEqual(len(sent), 5, [s[:8] for s in sent])   # hello, proof, 3 frames
        self.assertTrue(wait_until(lambda: not os.path.exists(
            os.path.join(self.node.dest_path_prefix, dest)), 15))
        return sent

    def fresh_channel(self, wrap=None):
        sock = socket.create_connection((self.node.ip, self.node.port), timeout=5)
        if wrap:
            sock = wrap(sock)
        try:
            channel = dispy.handshake(sock, SECRET, True, {'role': 'client'}, timeout=5)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(10)
        return channel

    def session_channel(self, client_id, wrap=None, recorders=None):
        """A fresh channel whose CLIENT the node took (it answered NODE).  The session
        of the test before may not have ended yet (the node answers BUSY and closes):
        then it is tried again, for at most 15 s.  ``recorders``: the list ``wrap``
        appends its recorder to; what it received before the answer is dropped."""
        taken = []

        def attempt():
            if recorders:
                recorders.clear()
            channel = self.fresh_channel(wrap)
            channel.send([('CLIENT', {'id': client_id, 'pid': os.getpid()})])
            if recorders:
                recorders[-1].received.clear()
            answer = recv_until(channel, lambda m: m[0] in ('NODE', 'BUSY'), 5)
            if answer is None or answer[0] != 'NODE':
                channel.close()
                return False
            taken.append(channel)
            return True
        return taken[0] if wait_until(attempt, 15, 0.1) else None

    def test_frames_replayed_on_a_new_connection_are_rejected(self):
        dest = 'replayed-' + os.urandom(4).hex()
        target = os.path.join(self.node.dest_path_prefix, dest)
        hello, proof, client, compute, close = self.record_session(dest)
        refusals = self.node.stderr().count('frame failed authentication')

        # a. the whole recorded session, after a fresh handshake
        channel = self.fresh_channel()
        try:
            channel.sock.sendall(client + compute + close)
            self.assertTrue(wait_closed(channel.sock, 10), 'replayed frames not rejected')
        finally:
            channel.close()
        self.assertFalse(os.path.exists(target))

        # b. a fresh, valid CLIENT, then the recorded COMPUTE frame
        channel = self.session_channel('replayer')
        self.assertIsNotNone(channel, 'the node took no new client')
        try:
            channel.sock.sendall(compute)
            self.assertTrue(wait_closed(channel.sock, 10), 'replayed COMPUTE not rejected')
        finally:
            channel.close()
        self.assertFalse(os.path.exists(target))
        self.assertTrue(wait_until(lambda: self.node.stderr().count(
            'frame failed authentication') >= refusals + 2, 10), self.node.stderr()[-2000:])

    def test_node_frame_reflected_back_is_rejected(self):
        holder = []

        def wrap(sock):
            holder.append(_Recorder(sock))
            return holder[-1]
        channel = self.session_channel('reflector', wrap, holder)
        self.assertIsNotNone(channel, 'the node took no new client')
        try:
            raw = b''.join(holder[-1].received)
            (length,) = struct.unpack('!I', raw[:4])
            channel.sock.sendall(raw[:4 + length + 32])     # the node's own frame, back
            self.assertTrue(wait_closed(channel.sock, 10), 'reflected frame not rejected')
        finally:
            channel.close()
        self.assertIn('frame failed authentication', self.node.stderr())

    def test_replayed_handshake_proof_fails_authentication(self):
        hello, proof = self.record_session('proof-' + os.urandom(4).hex())[:2]
        before = self.node.stderr().count('failed authentication')
        with socket.create_connection((self.node.ip, self.node.port), timeout=5) as sock:
            sock.sendall(hello)                     # same hello, same nonce
            dispy._recv_hs(sock)                    # the node's hello has a fresh nonce
            sock.sendall(proof)
            self.assertEqual(dispy._recv_exact(sock, 33), b'F' + bytes(32))
            self.assertTrue(wait_closed(sock, 5))
        self.assertTrue(wait_until(lambda: self.node.stderr().count('failed authentication')
                                   > before, 10))


# ================================================================================
# 5. UDP
# ================================================================================

class UdpTest(SecretNodeTestCase):

    def udp(self, ip=CLIENT_IP):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((ip, 0))
        sock.settimeout(5)
        return sock

    def ping(self, secret=SECRET):
        return dispy.pack_datagram(secret, {'t': 'ping', 'client': 'x', 'port': 1})

    def node_addr(self):
        return (self.node.ip, self.node.port)

    def test_authenticated_ping_gets_authenticated_pong(self):
        sock = self.udp()
        sock.sendto(self.ping(), self.node_addr())
        msg, good = dispy.unpack_datagram(SECRET, sock.recv(65536))
        self.assertTrue(good)
        self.assertEqual(msg['t'], 'pong')
        self.assertEqual(msg['port'], self.node.port)
        # bound with -i: it says where it serves (for a relay); ip is only --ext_ip_addr's
        self.assertEqual((msg['addr'], msg['ip']), (self.node.ip, None))

    def test_bad_mac_gets_bare_nak_and_naks_are_rate_limited(self):
        sock = self.udp('127.0.0.%d' % random.Random().randint(20, 250))   # fresh limiter
        forged = dispy.UDP_MAGIC + os.urandom(32) + json.dumps(
            {'t': 'ping', 'client': 'x', 'port': 1}).encode()
        sock.sendto(forged, self.node_addr())
        data = sock.recv(65536)
        self.assertEqual(data[:6], dispy.UDP_MAGIC)
        self.assertEqual(data[6:38], bytes(32), 'a nak must carry no secret-derived bytes')
        self.assertEqual(json.loads(data[38:]), {'t': 'nak'})
        self.assertFalse(dispy.unpack_datagram(SECRET, data)[1])
        for _ in range(100):
            sock.sendto(self.ping('wrong'), self.node_addr())
        sock.sendto(self.ping(), self.node_addr())      # a marker: its pong comes last
        naks = 1
        for _ in range(200):
            msg, good = dispy.unpack_datagram(SECRET, sock.recv(65536))
            if good:
                self.assertEqual(msg['t'], 'pong')
                break
            self.assertEqual(msg, {'t': 'nak'})
            naks += 1
        self.assertLessEqual(naks, 3, 'nak replies are not rate limited')
        self.assertIn('failed authentication', self.node.stderr())

    def test_datagrams_are_never_unpickled(self):
        tmp = tempfile.mkdtemp(prefix='dispytest-udp-')
        self.addCleanup(shutil.rmtree, tmp, True)
        marker = os.path.join(tmp, 'pwned')
        sock = self.udp()
        for evil in evil_pickles(marker):
            for data in (evil, dispy.UDP_MAGIC + bytes(32) + evil,
                         dispy.UDP_MAGIC + dispy._mac(dispy.secret_key(SECRET), b'dispy-udp', evil)
                         + evil):
                sock.sendto(data, self.node_addr())
        sock.sendto(dispy.UDP_MAGIC + bytes(32) + pickle.dumps({'t': 'ping'}), self.node_addr())
        sock.sendto(dispy.UDP_MAGIC + b' ' * 60000, self.node_addr())
        sock.sendto(self.ping(), self.node_addr())
        msg, good = dispy.unpack_datagram(SECRET, sock.recv(65536))
        self.assertTrue(good, 'the first reply after the pickles must be the pong')
        self.assertEqual(msg['t'], 'pong')
        self.assertFalse(os.path.exists(marker))


# ================================================================================
# Inputs that raise exceptions outside the ValueError family
# ================================================================================

DEEP_JSON = b'[' * 3000
HOSTILE_HELLOS = {
    'max_frame Infinity': b'{"magic": "dispy", "version": 1, "pickle": 4, "nonce": "00", '
                          b'"max_frame": Infinity}',
    'version 1e999': b'{"magic": "dispy", "version": 1e999, "pickle": 4, "nonce": "00", '
                     b'"max_frame": 10}',
    'nested 3000 deep': DEEP_JSON,
}


class EscapingExceptionsTest(unittest.TestCase):
    """Input whose parsing raises OverflowError, RecursionError, MemoryError, TypeError,
    IndexError or KeyError: each must be refused like any other bad input, not kill the
    thread that read it (leaving its socket open, or a program deaf)."""

    timeout = 60

    def setUp(self):
        self.node = NodeProcess(NODE_IP, secret=SECRET, cpus=1)
        self.node.start()
        self.addCleanup(self.node.stop)

    def test_hostile_hellos_are_refused_and_closed(self):
        pid = self.node.proc.pid
        base = proc_stats(pid)[0]
        for name, body in HOSTILE_HELLOS.items():
            with self.subTest(hello=name):
                with socket.create_connection((self.node.ip, self.node.port), timeout=5) as s:
                    s.sendall(b'DSPY' + struct.pack('!H', len(body)) + body)
                    self.assertTrue(wait_closed(s, 1.5), 'connection left open after a hello '
                                    'with %s (unauthenticated)' % name)
        with self.subTest('no uncaught exceptions'):
            self.assertEqual(uncaught_exceptions(self.node.stderr()), [])
        with self.subTest('descriptors'):
            self.assertTrue(wait_until(lambda: proc_stats(pid)[0] <= base, 5),
                            'node holds %d fds, baseline %d' % (proc_stats(pid)[0], base))

    def test_malformed_first_frames_are_refused_and_closed(self):
        bodies = {'[5]': pickle.dumps([5]), '[()]': pickle.dumps([()]),
                  '[{}]': pickle.dumps([{}]), "[('CLIENT',)]": pickle.dumps([('CLIENT',)]),
                  "pulse_interval 'x'": pickle.dumps([('CLIENT', {'pulse_interval': 'x'})]),
                  'BYTEARRAY8 of 2**62': b'\x80\x05\x96' + struct.pack('<Q', 1 << 62)}
        for name, body in bodies.items():
            with self.subTest(first_frame=name):
                sock = socket.create_connection((self.node.ip, self.node.port), timeout=5)
                try:
                    channel = dispy.handshake(sock, SECRET, True, {'role': 'client'}, timeout=5)
                    channel.send_body(body)
                    self.assertTrue(wait_closed(sock, 1.5), 'connection left open after a '
                                    'first frame %s' % name)
                finally:
                    sock.close()
        with self.subTest('no uncaught exceptions'):
            self.assertEqual(uncaught_exceptions(self.node.stderr()), [])

    def test_deeply_nested_json_datagram_does_not_stop_discovery(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((CLIENT_IP, 0))
            sock.settimeout(3)
            addr = (self.node.ip, self.node.port)
            sock.sendto(dispy.UDP_MAGIC + bytes(32) + DEEP_JSON, addr)
            sock.sendto(dispy.pack_datagram(SECRET, {'t': 'ping', 'client': 'x', 'port': 1}),
                        addr)
            try:
                msg, good = dispy.unpack_datagram(SECRET, sock.recv(65536))
            except socket.timeout:
                self.fail('the node stopped answering pings after one datagram of nested '
                          'JSON (its UDP thread died):\n' + self.node.stderr()[-1500:])
            self.assertTrue(good)

    def test_client_hub_survives_deeply_nested_json_datagram(self):
        cluster = cluster_for(self, self.node)
        hub = cluster._hub
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((CLIENT_IP, 0))
            sock.sendto(dispy.UDP_MAGIC + bytes(32) + DEEP_JSON, (CLIENT_IP, hub.port))
        wait_until(lambda: not udp_rx_queue(hub.port), 5)
        self.assertFalse(wait_until(lambda: not hub.thread.is_alive(), 1.0),
                         'the client hub loop died on one datagram of nested JSON')
        self.assertEqual(cluster.submit(3)(timeout=JOB_TIMEOUT), 6)


class HostileNodeTest(unittest.TestCase):
    """A client dialing a hostile "node" that answers with malformed hellos keeps its
    hub alive and dials again (a crashed dial thread would leave the node unusable)."""

    timeout = 60

    def test_client_redials_after_malformed_handshakes(self):
        ip = '127.0.0.3'
        port = free_port(ip)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind((ip, port))
            listener.listen(8)
            listener.settimeout(8)
            cluster = dispy.JobCluster(compute_double, nodes=[ip], ip_addr=CLIENT_IP, port=0,
                                       node_port=port, secret=SECRET)
            self.addCleanup(cluster.close, timeout=5, terminate=True)
            answers = [('garbage', b'HTTP/1.0 400 Bad Request\r\n\r\n')]
            answers += [(name, b'DSPY' + struct.pack('!H', len(body)) + body)
                        for name, body in HOSTILE_HELLOS.items()]
            previous = None
            for name, answer in answers + [('(last)', b'')]:
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    self.fail('the client did not dial again after a hello with %s' % previous)
                with conn:
                    conn.settimeout(5)
                    dispy._recv_hs(conn)
                    if answer:
                        conn.sendall(answer)
                previous = name
        self.assertTrue(cluster._hub.thread.is_alive())


# ================================================================================
# 6. No secret leaks
# ================================================================================

class SecretLeakTest(unittest.TestCase):
    timeout = 90

    def test_secret_never_logged(self):
        secret = 'leak-canary-' + os.urandom(8).hex()
        wrong = 'wrong-canary-' + os.urandom(8).hex()
        node = NodeProcess(NODE_IP, secret=secret, cpus=1)
        node.start()
        self.addCleanup(node.stop)
        with self.assertLogs('dispy', logging.DEBUG) as logs:
            bad = dispy.JobCluster(compute_double, nodes=[NODE_IP], ip_addr=CLIENT_IP, port=0,
                                   node_port=node.port, secret=wrong)
            try:
                bad.submit(1)
                self.assertTrue(wait_until(lambda: NODE_IP in bad._pool.auth_failures, 15))
                self.assertTrue(wait_until(lambda: 'failed authentication' in node.stderr(), 10))
            finally:
                bad.close(timeout=5, terminate=True)
            good = dispy.JobCluster(compute_double, nodes=[NODE_IP], ip_addr=CLIENT_IP, port=0,
                                    node_port=node.port, secret=secret)
            try:
                self.assertEqual(good.submit(4)(timeout=JOB_TIMEOUT), 8)
            finally:
                good.close(timeout=10)
        texts = {'node stdout': node.stdout(), 'node stderr': node.stderr(),
                 'client log': '\n'.join(logs.output)}
        self.assertTrue(any('authentication' in line for line in logs.output), logs.output)
        for where, text in texts.items():
            for label, canary in (('secret', secret), ('wrong secret', wrong),
                                  ('derived key', dispy.secret_key(secret).hex()),
                                  ('wrong derived key', dispy.secret_key(wrong).hex())):
                self.assertNotIn(canary, text, 'the %s appears in the %s' % (label, where))


if __name__ == '__main__':
    unittest.main()
