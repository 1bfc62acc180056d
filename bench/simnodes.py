#!/usr/bin/env python3
"""W7-sim: one client against many simulated nodes (up to thousands) in one process.

    python3 bench/simnodes.py                          # N = 1 and 1000 fake nodes
    python3 bench/simnodes.py --nodes 1,10,100,1000 --jobs 20000 --json-only

A real dispynode is a process with a forkserver, threads and warm workers, so
1,000 of them do not fit on one machine.  Here one process plays every node:
each fake node has its own loopback address (127.0.1.1, 127.0.1.2, ..., 254 per
/24, never 127.0.0.x), all on one port, and speaks the real protocol (dispy.py's
handshake, authenticated frames, message catalog), but runs nothing: a JOB is
answered at once with STARTED and a RESULT of ``2 * n``, built the way dispynode
builds it (the args blob unpickled, the result pickled with ``dumps_blob``).

Process layout::

    driver     python bench/simnodes.py --nodes 1,1000
      ├─ simulator  python bench/simnodes.py --serve --count 1000 --cpus 1
      │     one IOLoop thread (dispy's) for every socket: per fake node a TCP
      │     listener and a UDP socket (pings answered with pongs) on its address,
      │     and the accepted connections; handshakes run on the loop too
      │     (LoopDial's non-blocking driver of handshake_steps, from the
      │     listener's side), so the simulator has 2 threads (+ ≤ 2 idle workers
      │     that dispy's LoopConnection only uses for frames over 256 KB)
      ├─ client     python <tmp>/simnodes_client.py ... N=1     (a fresh interpreter
      ├─ client     ... N=1000                                   per node count)

What each client measures (one JSON line per node count):

- ``setup_s``: from just before ``JobCluster(double, nodes=[N addresses], ...)`` until
  ``cluster_status`` reported ``DispyNode.Initialized`` for every node (target ≤ 5 s
  for 1,000);
- ``client_cpu_us_per_job``: user + system CPU of the client process
  (``getrusage(RUSAGE_SELF)``, every thread) over submitting ``--jobs`` jobs of
  ``double(i)`` and collecting them all, divided by ``--jobs``; the CPU of the
  client's own thread-count sampler is subtracted; ``jobs_per_s`` over the same span;
- ``peak_threads``: ``threading.active_count()`` sampled every 5 ms from before the
  cluster's creation to its close; ``bad_results``: results that are not ``2 * i``.

A last line gives ``client_cpu_us_per_job`` of the largest node count over that of
the smallest (target ≤ 2) and whether the setup target was met.  The simulator's CPU
over each client's run is reported too (``sim_cpu_s``): it shares the machine's
cores with the client but is not what is measured.

Safety: only loopback addresses (127.0.1.1 and up; never 127.0.0.1 for a node; the
client binds 127.0.0.1); every wait is bounded; simulator and clients are stopped by
PID (SIGTERM, then SIGKILL) at the end and on errors or Ctrl-C, and get SIGKILL if
the driver dies (PR_SET_PDEATHSIG); the temporary folder is removed.
"""

import argparse
import functools
import json
import os
import pickle
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench as benchlib       # noqa: E402  (stop_process, _die_with_parent, emit, ...)
import dispy                   # noqa: E402
from dispy import DispyJob, Msg   # noqa: E402

SECRET = 'dispy-simnodes'       # both sides; nothing else on the machine shares it
MAX_NODES = 254 * 250           # 127.0.1.x ... 127.0.250.x


def node_addresses(count):
    """127.0.1.1 ... 127.0.1.254, 127.0.2.1 ...: loopback only, never 127.0.0.x."""
    if not 0 < count <= MAX_NODES:
        raise ValueError('node count must be 1..%d' % MAX_NODES)
    addrs = ['127.0.%d.%d' % (1 + i // 254, 1 + i % 254) for i in range(count)]
    assert all(dispy.is_loopback(a) and not a.startswith('127.0.0.') for a in addrs)
    return addrs


def raise_fd_limit():
    """1,000 nodes need ~3,000 descriptors on each side: the soft limit up to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ======================================================================================
# The fake node's protocol: the only part that knows what nodes say.  Everything else
# below is sockets.  Kinds come from dispy's catalog (dispy.TO_NODE, Msg.*).
# ======================================================================================

class FakeNode:
    """One simulated dispynode: the answers a real node gives, without running anything.

    What a real node does (dispynode.py), and what this one does instead:

    - after the handshake the client sends CLIENT; the node answers NODE with its
      name, CPUs, platform, instance, jobs held, computations set up and
      availability (``SessionRouter._attach_session``, ``NodeServer._node_info``);
    - COMPUTE, then the computation's FILEs: ``SETUP(ckey, ok, error)`` once the last
      file arrived (``_on_compute``/``_on_file``; no process is started here);
    - JOB: STARTED, then ``Msg.result(...)`` with ``dumps_blob(2 * n)`` at once (a
      real node runs the job in a worker and sends the worker's RESULT);
    - ACK, CANCEL, SET_CPUS, PULSE: nothing to do (results are not kept: no
      reconnects happen on loopback; a lost result shows up as a bad result);
    - PUT_FILE: PUT_FILE_DONE on the last chunk (the data is dropped);
    - CLOSE_COMPUTE → CLOSED; RELEASE: the session ends, the connection closes;
    - idle for a pulse interval: NODE_PULSE (``SessionRouter._keep_alive``);
    - a ping datagram: a pong (``NodeDiscovery._on_datagram``).

    ``on_messages``/``on_closed`` are the LoopConnection handler contract; they and
    everything else run on the simulator's one loop thread.
    """

    OFFLOAD = ()        # LoopConnection: no kind is handled off the loop

    def __init__(self, sim, addr, cpus):
        self.sim = sim
        self.addr = addr
        self.cpus = cpus
        self.name = 'sim-%s' % addr
        self.instance = uuid.uuid4().hex
        self.conns = {}         # LoopConnection -> pulse interval its client asked for
        self.files = {}         # computation key -> names of files still to come
        self.ready = set()      # computation keys set up

    # -- TCP (LoopConnection handler) ----------------------------------------------------
    def on_messages(self, conn, msgs):
        for msg in msgs:
            kind = dispy.TO_NODE.get(msg[0]) if isinstance(msg, tuple) and msg else None
            handler = self.HANDLERS.get(kind.name) if kind is not None else None
            if handler is not None:
                handler(self, conn, kind.read(msg))

    def on_closed(self, conn, reason):
        self.conns.pop(conn, None)

    def _on_client(self, conn, msg):
        info = msg.info if isinstance(msg.info, dict) else {}
        self.conns[conn] = max(0.05, float(info.get('pulse_interval')
                                           or dispy.DEFAULT_PULSE_INTERVAL))
        conn.send(Msg.NODE({'name': self.name, 'cpus': self.cpus, 'platform': 'simnodes',
                            'instance': self.instance, 'jobs': [],
                            'computations': sorted(self.ready), 'avail': None}))

    def _on_compute(self, conn, msg):
        files = set(msg.spec.get('files') or ()) if isinstance(msg.spec, dict) else set()
        self.ready.discard(msg.cluster)
        self.files[msg.cluster] = files
        if not files:
            self._set_up(conn, msg.cluster)

    def _on_file(self, conn, msg):
        missing = self.files.get(msg.cluster)
        if missing is not None and msg.last:
            missing.discard(msg.name)
            if not missing:
                self._set_up(conn, msg.cluster)

    def _set_up(self, conn, ckey):
        del self.files[ckey]
        self.ready.add(ckey)
        conn.send(Msg.SETUP(ckey, True, None))

    def _on_job(self, conn, msg):
        self.sim.jobs += 1
        now = time.time()
        if msg.cluster not in self.ready:
            conn.send(Msg.result(msg.key, msg.attempt, DispyJob.Cancelled,
                                 'Cancelled: computation is not set up on this node'))
            return
        conn.send(Msg.STARTED(msg.key, msg.attempt, now))
        try:
            args, kwargs = pickle.loads(msg.blob)   # our own bench client's arguments
            reply = Msg.result(msg.key, msg.attempt, DispyJob.Finished, None,
                               dispy.dumps_blob(2 * args[0]), start_time=now, end_time=now)
        except Exception as exc:
            reply = Msg.result(msg.key, msg.attempt, DispyJob.Terminated,
                               'simnodes: %r' % exc, start_time=now, end_time=now)
        conn.send(reply)

    def _on_put_file(self, conn, msg):
        if msg.last:
            conn.send(Msg.PUT_FILE_DONE(msg.cluster, msg.name, None))

    def _on_close_compute(self, conn, msg):
        self.ready.discard(msg.cluster)
        self.files.pop(msg.cluster, None)
        conn.send(Msg.CLOSED(msg.cluster))

    def _on_release(self, conn, msg):
        self.ready.clear()
        self.files.clear()
        conn.close('released', flush=True)

    def _on_recall(self, conn, msg):
        conn.send(Msg.RECALLED(msg.key, msg.attempt, False))   # every job ran at once

    def _ignore(self, conn, msg):
        pass

    HANDLERS = {'CLIENT': _on_client, 'COMPUTE': _on_compute, 'FILE': _on_file,
                'JOB': _on_job, 'PUT_FILE': _on_put_file, 'CLOSE_COMPUTE': _on_close_compute,
                'RELEASE': _on_release, 'ACK': _ignore, 'CANCEL': _ignore,
                'SET_CPUS': _ignore, 'PULSE': _ignore, 'RECALL': _on_recall,
                'SHUTDOWN': _ignore}

    def keep_alive(self):
        """NODE_PULSE on connections idle for their pulse interval."""
        for conn, interval in list(self.conns.items()):
            if conn.idle_send >= interval:
                conn.send(Msg.NODE_PULSE(time.time(), None))

    # -- UDP (DiscoveryEndpoint callback) --------------------------------------------------
    def pong(self, port):
        return dispy.Datagram.pong('pong', None, port, self.name, self.cpus, False,
                                   self.instance, self.addr)


def catalog_mismatch():
    """Kinds the catalog has and FakeNode does not handle (the protocol changed)."""
    return sorted(set(dispy.TO_NODE) - set(FakeNode.HANDLERS))


# ======================================================================================
# The simulator process: sockets for every fake node, all on one IOLoop
# ======================================================================================

class _Accepted(dispy.LoopDial):
    """dispy's handshake from the listener's side, on the loop, nothing blocking:
    LoopDial drives ``handshake_steps`` on a non-blocking socket; this one starts
    with a socket already connected (accepted) instead of dialing."""

    def __init__(self, loop, sock, steps, done, failed):
        super().__init__(loop, None, None, None, steps, dispy.DEFAULT_MAX_FRAME,
                         dispy.HANDSHAKE_TIMEOUT, done, failed)
        self.sock = sock

    def _connect(self):
        self.loop.add_ticker(self._check_deadline)
        self.connected = True
        self._advance(None)

    def _finish(self, params):
        # The listener's last step is a send (its proof), which a dialer never has:
        # LoopDial would end with it unwritten.  33 bytes into a fresh socket's empty
        # buffer: this never waits.
        if self.out:
            try:
                self.sock.settimeout(5.0)
                self.sock.sendall(self.out)
                self.sock.setblocking(False)
            except OSError as exc:
                self._fail(exc)
                return
            self.out = b''
        super()._finish(params)


class Simulator:
    """Every fake node's sockets on one dispy IOLoop: a TCP listener and a UDP socket
    per address, one port for all, and the connections accepted."""

    def __init__(self, addrs, cpus):
        self.loop = None
        self.threads = dispy.WorkerThreads(2, 'sim-worker')
        self.nodes = [FakeNode(self, addr, cpus) for addr in addrs]
        self.discovery = dispy.DiscoveryEndpoint(SECRET, self._on_datagram)
        self.listeners = []             # (socket, FakeNode)
        self.by_udp = {}                # UDP socket -> FakeNode
        self.port = None
        self.jobs = 0
        self.pongs = 0
        self.accepted = 0
        self.failed = 0
        self._next_pulse = 0.0

    # -- sockets ---------------------------------------------------------------------------
    def bind(self, attempts=20):
        """One port free on every address, TCP and UDP (retried with another port)."""
        for _ in range(attempts):
            try:
                self._bind_all()
                return self.port
            except OSError:
                self._close_sockets()
        raise RuntimeError('no port free on all %d addresses' % len(self.nodes))

    def _bind_all(self):
        port = 0
        for node in self.nodes:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listeners.append((tcp, node))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((node.addr, port))
            port = tcp.getsockname()[1]     # the first picks it; the rest take it
            tcp.listen(128)
            tcp.setblocking(False)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind((node.addr, port))
            except OSError:
                udp.close()
                raise
            self.by_udp[self.discovery.add_socket(udp)] = node
        self.port = port

    def _close_sockets(self):
        for sock, _node in self.listeners:
            sock.close()
        for sock in self.by_udp:
            sock.close()
        self.listeners, self.by_udp = [], {}
        self.discovery.socks = []

    def start(self, timeout=30.0):
        """Starts the loop and registers every socket on it (on its thread)."""
        self.loop = dispy.IOLoop('sim-loop')
        registered = threading.Event()

        def register():
            selector = self.loop.selector
            for sock, node in self.listeners:
                selector.register(sock, 1, functools.partial(self._accept, sock, node))
            for sock in self.by_udp:
                selector.register(sock, 1, functools.partial(self._readable, sock))
            self.loop.add_ticker(self._tick)
            registered.set()
        self.loop.call_soon(register)
        if not registered.wait(timeout):
            raise RuntimeError('the loop did not register the sockets in %s s' % timeout)

    # -- the loop's side ------------------------------------------------------------------
    def _accept(self, lsock, node, _events):
        for _ in range(64):
            try:
                sock, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:          # EMFILE and the like: said, not fatal
                sys.stderr.write('accept on %s failed: %s\n' % (node.addr, exc))
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            steps = dispy.handshake_steps(SECRET, False, {'role': 'node', 'name': node.name},
                                          dispy.DEFAULT_MAX_FRAME)
            _Accepted(self.loop, sock, steps, functools.partial(self._authenticated, node),
                      functools.partial(self._handshake_failed, node)).start()

    def _authenticated(self, node, channel, extra):
        self.accepted += 1
        dispy.LoopConnection(channel, node, node.name, self.loop, self.threads,
                             extra).start()

    def _handshake_failed(self, node, exc):
        self.failed += 1
        sys.stderr.write('handshake on %s failed: %s\n' % (node.addr, exc))

    def _readable(self, sock, _events):
        self.discovery.handle_readable(sock)

    def _on_datagram(self, msg, addr, sock):
        if msg.get('t') == 'ping':
            node = self.by_udp[sock]
            self.pongs += 1
            self.discovery.sendto(self.discovery.pack(node.pong(self.port)), addr, sock)

    def _tick(self):
        now = time.monotonic()
        if now >= self._next_pulse:     # once a second is plenty for 5 s pulses
            self._next_pulse = now + 1.0
            for node in self.nodes:
                if node.conns:
                    node.keep_alive()

    def stats(self):
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {'jobs': self.jobs, 'pongs': self.pongs, 'accepted': self.accepted,
                'handshakes_failed': self.failed,
                'connections': sum(len(n.conns) for n in self.nodes),
                'cpu_s': round(ru.ru_utime + ru.ru_stime, 4)}


def serve_main(args):
    """The simulator process: binds, prints ``serving PORT``, answers ``stats`` lines on
    stdin with a JSON line, and ends at EOF (or SIGTERM)."""
    missing = catalog_mismatch()
    if missing:
        sys.stderr.write('simnodes: dispy.TO_NODE has kinds FakeNode ignores: %s\n'
                         % ', '.join(missing))
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the driver stops us (Ctrl-C reaches both)
    raise_fd_limit()
    sim = Simulator(node_addresses(args.count), args.cpus)
    port = sim.bind()
    sim.start()
    print('serving %d' % port, flush=True)
    for line in sys.stdin:
        if line.strip() == 'stats':
            print(json.dumps(sim.stats()), flush=True)
    sim.loop.stop()
    return 0


# ======================================================================================
# The client (runs in a fresh interpreter: a file, since dispy ships its source)
# ======================================================================================

CLIENT = r'''
import faulthandler, json, resource, signal, sys, threading, time
faulthandler.register(signal.SIGUSR1, all_threads=True)     # the driver's timeout dump
sys.path.insert(0, sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))    # ~3 fds per node
import dispy

def double(n):
    return 2 * n

addrs, port, jobs = sys.argv[2].split(','), int(sys.argv[3]), int(sys.argv[4])
secret, timeout = sys.argv[5], float(sys.argv[6])
deadline = time.monotonic() + timeout
peak, sampler_cpu = [threading.active_count()], [0.0]
done = threading.Event()

def sample():       # its own CPU time is kept, to be left out of the client's
    while not done.wait(0.005):
        peak[0] = max(peak[0], threading.active_count())
        sampler_cpu[0] = time.thread_time()

threading.Thread(target=sample, daemon=True).start()
ready = threading.Semaphore(0)

def status(state, node, job):
    if state == dispy.DispyNode.Initialized:
        ready.release()

def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, sampler_cpu[0]

out = {'nodes': len(addrs), 'jobs': jobs}
t0 = time.perf_counter()
cluster = dispy.JobCluster(double, nodes=addrs, ip_addr='127.0.0.1', port=0,
                           node_port=port, cluster_status=status, secret=secret,
                           loglevel=dispy.logger.WARNING)
out['cluster_s'] = round(time.perf_counter() - t0, 4)
setup = 0
while setup < len(addrs) and ready.acquire(
        timeout=max(0.0, deadline - time.monotonic())):
    setup += 1
out['setup_s'] = round(time.perf_counter() - t0, 4)
out['nodes_set_up'] = setup
if setup < len(addrs):
    out['error'] = '%d of %d nodes set up in %.0f s' % (setup, len(addrs), timeout)
    print(json.dumps(out))
    sys.exit(3)
(c0, s0), t1 = cpu(), time.perf_counter()
submitted = [cluster.submit(i) for i in range(jobs)]
submit_s = time.perf_counter() - t1
bad, first_bad = 0, None
for i, job in enumerate(submitted):
    result = job(timeout=max(0.0, deadline - time.monotonic()))
    if job.status != dispy.DispyJob.Finished or result != 2 * i:
        bad += 1
        first_bad = first_bad or [i, job.status, repr(result)[:80], str(job.exception)[:200]]
wall = time.perf_counter() - t1
(c1, s1) = cpu()
used = len({job.ip_addr for job in submitted})
cluster.close(timeout=max(1.0, deadline - time.monotonic()))
done.set()
out.update(client_cpu_us_per_job=round((c1 - c0 - (s1 - s0)) * 1e6 / jobs, 2),
           jobs_per_s=round(jobs / wall, 1), wall_s=round(wall, 3),
           submit_s=round(submit_s, 3), sampler_cpu_s=round(s1 - s0, 4),
           peak_threads=peak[0], nodes_used=used, bad_results=bad)
if first_bad:
    out['first_bad'] = first_bad
print(json.dumps(out))
sys.exit(3 if bad else 0)
'''


# ======================================================================================
# Driver
# ======================================================================================

class SimProcess:
    """The simulator child: started, asked for stats, stopped by PID."""

    def __init__(self, count, cpus, folder, timeout=60.0):
        self.log_path = os.path.join(folder, 'simulator.log')
        self.log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--serve', '--count', str(count),
             '--cpus', str(cpus)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, bufsize=0, cwd=folder, preexec_fn=benchlib._die_with_parent)
        try:
            line = self._line(timeout)
            if not line.startswith('serving '):
                raise RuntimeError('simulator did not start: %r; log: %s'
                                   % (line, self.output()))
        except BaseException:
            self.stop()
            raise
        self.port = int(line.split()[1])

    def _line(self, timeout):
        """One line of the simulator's stdout, within ``timeout`` seconds."""
        deadline, data = time.monotonic() + timeout, b''
        while not data.endswith(b'\n'):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise RuntimeError('no answer from the simulator in %s s; log: %s'
                                   % (timeout, self.output()))
            chunk = self.proc.stdout.read(1)
            if not chunk:
                raise RuntimeError('simulator exited (%s); log: %s'
                                   % (self.proc.poll(), self.output()))
            data += chunk
        return data.decode()

    def stats(self):
        self.proc.stdin.write(b'stats\n')
        return json.loads(self._line(10.0))

    def output(self):
        try:
            with open(self.log_path, errors='replace') as f:
                return f.read()[-1500:]
        except OSError:
            return ''

    def stop(self):
        try:
            self.proc.stdin.close()     # EOF: it ends by itself
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        benchlib.stop_process(self.proc, grace=5.0)
        self.log.close()


def run_client(args, script, sim, addrs, folder):
    """One client process over ``addrs``; (its JSON result, error text or None)."""
    cmd = [sys.executable, script, ROOT, ','.join(addrs), str(sim.port), str(args.jobs),
           SECRET, str(args.timeout)]
    proc = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=benchlib._die_with_parent)
    try:
        try:
            out, err = proc.communicate(timeout=args.timeout + 30)
        except subprocess.TimeoutExpired:
            try:
                proc.send_signal(signal.SIGUSR1)    # it dumps its threads' stacks
                out, err = proc.communicate(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                out, err = b'', b''
            return None, 'client timed out; stderr: %s' % benchlib._tail(err, 3000)
        lines = [l for l in out.decode('utf-8', 'replace').splitlines() if l.strip()]
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if proc.returncode or result is None or result.get('error'):
            return result, 'client exited with %s: %s; stderr: %s' % (
                proc.returncode, (result or {}).get('error') or (result or {}).get('first_bad'),
                benchlib._tail(err))
        return result, None
    finally:
        if proc.poll() is None:
            benchlib.stop_process(proc, grace=2.0)


def measure(args, script, sim, count, folder):
    addrs = node_addresses(count)
    before = sim.stats()
    result, error = run_client(args, script, sim, addrs, folder)
    after = sim.stats()
    line = {'workload': 'W7-sim', 'nodes': count, 'cpus_per_node': args.cpus}
    for key in ('setup_s', 'client_cpu_us_per_job', 'jobs_per_s', 'peak_threads',
                'bad_results', 'jobs', 'wall_s', 'submit_s', 'cluster_s', 'nodes_used',
                'nodes_set_up', 'sampler_cpu_s'):
        if result and key in result:
            line[key] = result[key]
    line['sim_cpu_s'] = round(after['cpu_s'] - before['cpu_s'], 3)
    for key in ('jobs', 'pongs', 'accepted'):
        line['sim_' + key] = after[key] - before[key]
    if after['handshakes_failed'] > before['handshakes_failed']:
        line['sim_handshakes_failed'] = after['handshakes_failed'] - before['handshakes_failed']
    if error:
        line['error'] = error
    return line


def summary_line(lines):
    """Client CPU per job of the largest node count over the smallest's; setup target."""
    good = [l for l in lines if 'client_cpu_us_per_job' in l and not l.get('error')]
    if len(good) < 2:
        return None
    small = min(good, key=lambda l: l['nodes'])
    big = max(good, key=lambda l: l['nodes'])
    ratio = big['client_cpu_us_per_job'] / small['client_cpu_us_per_job']
    return {'workload': 'W7-sim', 'summary': 'ratio',
            'figure': 'client_cpu_us_per_job(%d)/client_cpu_us_per_job(%d)'
                      % (big['nodes'], small['nodes']),
            'ratio': round(ratio, 3), 'target': '\u2264 2', 'met': ratio <= 2,
            'setup_s': big['setup_s'], 'setup_nodes': big['nodes'],
            'setup_target': '\u2264 5 s', 'setup_met': big['setup_s'] <= 5.0}


def driver_main(args):
    signal.signal(signal.SIGTERM, benchlib._interrupt)
    signal.signal(signal.SIGINT, benchlib._interrupt)
    counts = [int(x) for x in args.nodes.split(',') if x.strip()]
    node_addresses(max(counts))         # refuse a bad count before anything starts
    folder = tempfile.mkdtemp(prefix='dispy-simnodes-')
    sim, lines = None, []
    say = (lambda text: None) if args.json_only else \
        (lambda text: sys.stderr.write('# %s\n' % text))
    try:
        say('starting the simulator: %d fake nodes, %d CPU(s) each' % (max(counts), args.cpus))
        t0 = time.monotonic()
        sim = SimProcess(max(counts), args.cpus, folder)
        say('simulator serving on port %d (%.1f s)' % (sim.port, time.monotonic() - t0))
        script = os.path.join(folder, 'simnodes_client.py')
        with open(script, 'w') as f:
            f.write(CLIENT)
        for count in counts:
            say('client over %d node(s), %d jobs' % (count, args.jobs))
            line = measure(args, script, sim, count, folder)
            lines.append(line)
            benchlib.emit(line)
        summary = summary_line(lines)
        if summary:
            benchlib.emit(summary)
    except KeyboardInterrupt:
        sys.stderr.write('# interrupted\n')
        return 130
    finally:
        if sim is not None:
            sim.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if any(l.get('error') or l.get('bad_results') for l in lines) else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--nodes', default='1,1000', help='node counts, e.g. 1,10,100,1000')
    p.add_argument('--cpus', type=int, default=1, help='CPUs of each fake node')
    p.add_argument('--jobs', type=int, default=20000, help='jobs per client')
    p.add_argument('--timeout', type=float, default=120.0,
                   help='seconds a client may take (set-up and jobs)')
    p.add_argument('--json-only', action='store_true', help='only the JSON lines')
    p.add_argument('--serve', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--count', type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.serve:
        return serve_main(args)
    return driver_main(args)


if __name__ == '__main__':
    sys.exit(main())
