#!/usr/bin/env python3
"""dispynode: runs jobs for a dispy client on this machine's processors.

Copy ``dispy.py`` and this file to a machine and run ``python dispynode.py``; clients
find the node by UDP (port 51348) and connect to it over TCP (same port).  The wire
format and authentication are dispy.py's (``handshake``, ``Channel``, ``LoopConnection``),
so are the rules for the files clients send (``FileReceiver``) and for discovery
datagrams (``DiscoveryEndpoint``); the TCP listener is a ``socketserver`` server
(``NodeListener``) that admits, authenticates and hands each client to the node's
``SessionRouter``.

The path a job takes (who owns each queue, which thread moves it)::

    I/O loop (client frame)    JOB → NodeServer._on_job: NodeJob into ``queue`` (the
        │                      node's JobQueue: arrival order, higher dispy_job_priority
        │                      first) → _pump: a free CPU and the
        │                      computation's share → its WorkerPool: an idle warm
        ▼                      worker, or a new one forked (the job waits in the pool)
    worker process             'run' over its LocalLink: the job runs in a fresh copy
        │                      of the computation's globals; 'result' back
        ▼
    I/O loop (worker link)     _on_worker_message → _finish: RESULT kept in the
        │                      session's ``results`` (on disk too if the client is
        ▼                      away) and queued on the client's LoopConnection; the
    I/O loop (flush)           CPU is freed, _pump runs the next job; what the event
                               queued leaves in one frame (held up to 1 ms while other
                               jobs of the client run, so results share frames); the
                               client's ACK drops it

Processes (jobs never run inside the node process, so a crash cannot take it down)::

    dispynode  ── threads: main (stdin commands), udp (NodeDiscovery.serve_forever),
     │            listen (one NodeListener.serve_forever per bound address), handshake
     │            (one per connection being authenticated, at most 32), io (the I/O
     │            loop: every client connection and every worker's link), work (at
     │            most 8, on demand: setting computations up, files, frames over
     │            256 KiB and those after them, big job arguments to a worker, a
     │            worker's end), per computation host a reader, manager (timers;
     │            partial files of a vanished sender dropped)
     ├─ forkserver   multiprocessing's fork server, started with the node (its own
     │  │            interpreter: it never inherits a lock held by a node thread)
     │  └─ host      one per computation, a forkserver ``Process`` (``WorkerPool``):
     │     │         loads the shipped code, runs ``setup`` in the computation's
     │     │         folder, then forks workers (``fork`` context) that inherit its
     │     │         globals, as many as its CPUs once setup ends; ends them all if
     │     │         the node is gone; cleanup at close
     │     └─ worker one job at a time, warm (reused); its own process group, so a
     │               cancel kills the job and every process it started; a thread
     │               that sends a streamed job's lines (``LiveOutput``, stream_output)
     └─ resource tracker   multiprocessing's (dispy registers nothing with it)

The node talks to each host and each worker over its own ``multiprocessing`` Pipe
(``LocalLink``); the node makes each worker's Pipe and passes one end through the host
(``multiprocessing.reduction.send_handle``), so job messages go straight between node
and worker.  No job process outlives the node: a host whose node link closes kills its
workers' process groups and exits (a watcher thread covers the time setup runs), and a
worker dies with its host (``PR_SET_PDEATHSIG``).

A node serves one client program at a time (``ClientSession``, chosen by the
``SessionRouter``: the program in session, a ``recover_jobs`` beside it, or another
program turned away until the node is free).  Results stay on the
node until the client acknowledges them, so a dropped connection loses nothing; a client
that reconnects gets them again.  A client that vanishes leaves a detached session: its
jobs run to the end (at most ``--zombie_interval``), their results go to disk
(``ResultStore``), and once nothing is left to run for it the node serves the next
program.  ``recover_jobs`` of a vanished program is answered at any time: by its session
if it still has one here, else by a ``RecoveryHandler`` beside the current session.

When it serves (``ServiceControl``: the daily ``--service_start/stop/end`` window, the
operator's stdin ``stop``/``start``/``release``, ``--serve N``)::

    SERVING ──stop──► STOPPED ──end──► OUT ──next start──► SERVING
    STOPPED: no new clients or jobs; a JOB, and the queued jobs, are handed back
    (RECALLED unasked, after SERVICE tells the client) and run on its other nodes
    OUT: the client sees the node leave as if it had died; pings go unanswered;
    at the next start the node announces itself (to the clients it turned away too)
"""

import collections
import errno
import io
import importlib
import importlib.machinery
import linecache
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.reduction as reduction
import os
import pickle
import platform
import re
import runpy
import select
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid

import dispy
from dispy import DispyJob, Msg, logger

__version__ = dispy.__version__

# A vanished client that left jobs or unacknowledged results here keeps this node this
# long (seconds) after the last of its jobs ended, so a client that only lost its
# connection reconnects to its computations and results; then the node is free for
# other programs (a client that left nothing frees the node at once).  Longer than a client's reconnect attempts
# (dispy.RECONNECT_DELAYS, 4 s in all), after which the client gives the node up anyway.
DETACHED_GRACE = sum(dispy.RECONNECT_DELAYS) + 1.0
MAX_RECOVERIES = 16         # recover_jobs connections served at once
RECOVERY_IDLE = 60.0        # a recover_jobs connection silent this long is closed


# ================================================================================
# Local links: pickled messages over multiprocessing Connections (Unix socket pairs;
# trusted: same machine, our own processes), with optional descriptor passing
# ================================================================================

FORKSERVER = multiprocessing.get_context('forkserver')   # starts computation hosts
FORK = multiprocessing.get_context('fork')               # a host starts its workers


class LocalLink:
    """Messages over a ``multiprocessing.connection.Connection``: one ``send_bytes`` of
    ``fd?(1) | count(2) | count × size(8) | pickle``, then each big bytes field of the
    message (arguments, results) out of band, one ``send_bytes`` each, read straight
    into its own bytearray (``_recv_buffer``); then, if the message carries one, a file
    descriptor (``multiprocessing.reduction.send_handle``).  Reads never go past the current
    message, so a descriptor that follows one arrives intact."""

    def __init__(self, conn):
        self.conn = conn
        self.send_lock = threading.Lock()

    def send(self, msg, fd=None):
        data, buffers = dispy.dumps_oob(dispy.out_of_band(msg), pickle.HIGHEST_PROTOCOL)
        head = struct.pack('!?H%dQ' % len(buffers), fd is not None, len(buffers),
                           *(len(b) for b in buffers))
        with self.send_lock:
            self.conn.send_bytes(head + data)
            for buf in buffers:
                self.conn.send_bytes(buf)
            if fd is not None:
                reduction.send_handle(self.conn, fd, None)

    def recv(self):
        """(message, fd or None); raises EOFError when the peer is gone."""
        try:
            has_fd, sizes, data = split_link_head(self.conn.recv_bytes())
            buffers = [self._recv_buffer(size) for size in sizes]
            fd = reduction.recv_handle(self.conn) if has_fd else None
        except (OSError, RuntimeError) as exc:
            raise EOFError(str(exc))
        if fd is not None:
            os.set_inheritable(fd, False)
        return pickle.loads(data, buffers=buffers), fd

    def _recv_buffer(self, size):
        """One ``send_bytes`` of ``size`` bytes, read straight into a new bytearray
        (``recv_bytes_into`` copies it twice on the way, through a BytesIO: big
        arguments and results went a fifth slower with it).  Connection frames are a
        ``!i`` size, or -1 then a ``!Q`` size from 2 GiB on; a size other than the one
        announced means the stream is not what we think: the link is broken."""
        fd = self.conn.fileno()
        framed, = struct.unpack('!i', _read_exact(fd, 4))
        if framed == -1:
            framed, = struct.unpack('!Q', _read_exact(fd, 8))
        if framed != size:
            raise EOFError('link out of step: %d bytes framed, %d announced' % (framed, size))
        buf = bytearray(size)
        view, have = memoryview(buf), 0
        while have < size:
            got = os.readv(fd, [view[have:]])
            if not got:
                raise EOFError('peer closed')
            have += got
        return buf

    def close(self):
        with self.send_lock:    # not while another thread writes (a big job's arguments)
            try:
                self.conn.close()
            except OSError:
                pass


def split_link_head(head):
    """(descriptor follows?, sizes of the buffers that follow, pickle) of the first
    ``send_bytes`` of a LocalLink message."""
    has_fd, count = struct.unpack_from('!?H', head)
    sizes = struct.unpack_from('!%dQ' % count, head, 3)
    return has_fd, sizes, memoryview(head)[3 + 8 * count:]


class LinkReader:
    """LocalLink messages read as their bytes arrive (the node's I/O loop reads the
    workers' links with it): each readiness event takes what the socket has, with
    ``MSG_DONTWAIT`` (the link stays blocking for the node's writes), and yields the
    messages it completed.  So a worker that stops in the middle of a message (killed
    while a child it forked keeps the link open) cannot stall the loop.  A big buffer
    is read straight into a bytearray of its size."""

    BIG = 1 << 20
    BUDGET = 16         # reads per call (a fast stream of file chunks must not hog the loop)

    def __init__(self, conn):
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self._buf = bytearray()
        self._big = None            # [bytearray, bytes in] of a big frame arriving
        self._head = None           # (pickle view, buffer sizes) of the message read
        self._buffers = []
        self.ended = None           # why the link ended, once it has
        self.broken = False         # ... if by bytes that are not our messages

    def close(self):
        self.sock.close()

    def read(self):
        """The messages completed now; EOFError once the link has closed (or is out
        of step: a worker's end is only ever written by our LocalLink), after the
        messages that came before the end have been returned."""
        if self.ended is not None:
            raise EOFError(self.ended)
        msgs, budget = [], self.BUDGET
        try:
            while budget > 0 and len(msgs) < 256:   # then the loop serves others first
                budget -= 1
                if self._big is not None:
                    buf, have = self._big
                    got = self.sock.recv_into(memoryview(buf)[have:], 0, socket.MSG_DONTWAIT)
                    if not got:
                        raise EOFError('worker link closed')
                    self._big[1] = have = have + got
                    if have == len(buf):
                        self._big = None
                        self._frame(buf, msgs)
                    continue
                data = self.sock.recv(262144, socket.MSG_DONTWAIT)
                if not data:
                    raise EOFError('worker link closed')
                self._buf += data
                self._frames(msgs)
            return msgs
        except (BlockingIOError, InterruptedError):
            return msgs
        except Exception as exc:    # the end, or bytes that are not our messages
            self.broken = not isinstance(exc, EOFError)
            self.ended = 'worker link broken: %r' % exc if self.broken else str(exc)
            if msgs:
                return msgs     # a worker's last result, then its end (the next read)
            raise EOFError(self.ended)

    def _frames(self, msgs):
        """Whole multiprocessing frames (``!i`` size, or -1 and a ``!Q`` size) of the
        buffer; the start of a big one becomes ``_big``."""
        buf = self._buf
        while len(buf) >= 4:
            size, = struct.unpack_from('!i', buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    return
                size, = struct.unpack_from('!Q', buf, 4)
                start = 12
            if len(buf) - start >= size:
                frame = bytes(buf[start:start + size])
                del buf[:start + size]
                self._frame(frame, msgs)
            elif size > self.BIG:
                big = bytearray(size)
                have = len(buf) - start
                big[:have] = buf[start:]
                del buf[:]
                self._big = [big, have]
                return
            else:
                return

    def _frame(self, frame, msgs):
        if self._head is None:          # a message's first frame: its table, its pickle
            has_fd, sizes, data = split_link_head(frame)
            if has_fd:
                raise ValueError('a descriptor on a worker link')
            self._head = (data, sizes)
            self._buffers = []
        else:
            if len(frame) != self._head[1][len(self._buffers)]:
                raise ValueError('buffer of %d bytes, %d announced'
                                 % (len(frame), self._head[1][len(self._buffers)]))
            self._buffers.append(frame)
        data, sizes = self._head
        if len(self._buffers) == len(sizes):
            self._head = None
            msgs.append(pickle.loads(data, buffers=self._buffers))


def _read_exact(fd, n):
    data = b''
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError('peer closed')
        data += chunk
    return data


def _set_parent_death_signal():
    """Linux: die with the parent process (a worker with its host)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def _describe_exit(exitcode):
    """How a process ended, from its multiprocessing exit code (-N: killed by signal N)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return 'killed by signal %s (%s)' % (-exitcode, name)
    return 'exited with status %s' % exitcode


class _NodeWatch:
    """While a host runs user code before it has a loop (setup), a thread ends the host
    when the node's end of its link closes (the node died); stopped before the host
    forks a worker, so the host is single-threaded then."""

    def __init__(self, conn):
        self.fd = conn.fileno()
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        poller = select.poll()
        poller.register(self.fd, 0)             # hang-up and errors only, never data
        poller.register(self.stop_r, select.POLLIN)
        if any(fd == self.fd for fd, _events in poller.poll()):
            os._exit(1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        os.write(self.stop_w, b'x')
        self.thread.join()
        os.close(self.stop_r)
        os.close(self.stop_w)


# ================================================================================
# Job processes: forkserver → computation host → workers
# ================================================================================

def host_main(conn, spec):
    """A computation host, started by the forkserver: loads the computation and runs
    its setup in the computation's folder, then serves the node (``_serve_workers``).
    It always ends with ``os._exit``: nothing of multiprocessing's exit handling (which
    would wait for the workers) runs in it."""
    try:
        _run_host(conn, spec)
    except Exception:
        traceback.print_exc()
    finally:
        os._exit(1)


def _run_host(conn, spec):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDONLY)        # jobs never read the node's console
    os.dup2(devnull, 0)
    os.close(devnull)
    os.set_inheritable(conn.fileno(), False)          # programs a job runs never get it
    link = LocalLink(conn)
    os.chdir(spec['dir'])
    sys.path.insert(0, spec['dir'])
    with _NodeWatch(conn):
        ns, error = _load_computation(spec)
    link.send(('setup', error is None, error))
    if error is not None:
        os._exit(1)
    _serve_workers(link, ns, spec)


def _serve_workers(link, ns, spec):
    """The host's loop (single-threaded): forks a warm worker for each ``fork`` request,
    with the worker's end of its link to the node that came along; reports how each
    worker ended; runs cleanup when asked.  When the node is gone (its end of the link
    closed) every worker is killed with the processes it started."""
    workers = {}        # sentinel -> worker Process
    while True:
        for ready in multiprocessing.connection.wait([link.conn] + list(workers)):
            if ready is not link.conn:
                _report_exit(link, workers.pop(ready))
                continue
            try:
                msg, fd = link.recv()
            except EOFError:
                _stop_workers(None, workers)
                os._exit(0)
            if msg[0] == 'fork' and fd is not None:
                worker = _start_worker(fd, link, ns, spec)
                if worker is not None:
                    workers[worker.sentinel] = worker
            elif msg[0] == 'cleanup':
                _stop_workers(link, workers)
                error = _run_cleanup(ns, spec)
                try:
                    link.send(('cleaned', error))
                except OSError:
                    pass
                os._exit(0)


def _start_worker(fd, link, ns, spec):
    """Forks a worker (it inherits the computation's globals); None if that fails (the
    node then sees the worker's end of its link close)."""
    worker = FORK.Process(target=worker_main, args=(fd, link, ns, spec),
                          name='dispy-worker')
    try:
        worker.start()
    except OSError:
        return None
    finally:
        os.close(fd)            # the worker has its copy
    return worker


def _report_exit(link, worker):
    worker.join()
    try:
        link.send(('exited', worker.pid, _describe_exit(worker.exitcode)))
    except OSError:
        pass                    # the node is gone: the loop sees the link's end next
    worker.close()


def _stop_workers(link, workers):
    """Kills every worker with the processes it started (their process group); reports
    how they ended when ``link`` is given."""
    for worker in workers.values():
        for kill in (os.killpg, os.kill):   # a worker not yet in its own group: by pid
            try:
                kill(worker.pid, signal.SIGKILL)
            except OSError:
                pass
    for worker in workers.values():
        if link is not None:
            _report_exit(link, worker)
        else:
            worker.join()
    workers.clear()


class _JobContext:
    """What the functions available inside a computation need to know."""
    link = None
    key = None
    attempt = None
    max_file_size = 0


def dispy_provisional_result(result, timeout=None):
    """Sends ``result`` to the client now; the job goes on.  Returns 0 (-1 on error)."""
    ctx = _JobContext
    if ctx.link is None:
        return -1
    try:
        blob = dispy.dumps_blob(result)
    except Exception as exc:
        print('dispy_provisional_result: result cannot be pickled: %s' % exc, file=sys.stderr)
        return -1
    ctx.link.send(('provisional', ctx.key, ctx.attempt, blob))
    return 0


def dispy_send_file(path, timeout=None):
    """Sends a file to the client, which saves it under its working directory at the
    same relative path (an absolute path is taken relative to that directory).
    Returns 0 when sent, -1 (with the reason on stderr) when refused."""
    ctx = _JobContext
    try:
        relpath = os.path.normpath(path).lstrip(os.sep)
        if relpath == '..' or relpath.startswith('..' + os.sep) or not relpath or \
                relpath == '.':
            raise ValueError('path %r leaves the folder' % path)
        size = os.path.getsize(path)
        if ctx.max_file_size and size > ctx.max_file_size:
            raise ValueError('%s has %d bytes, over the node\'s --max_file_size of %d'
                             % (path, size, ctx.max_file_size))
        mode = os.stat(path).st_mode & 0o777
        with open(path, 'rb') as f:
            offset = 0
            while True:
                data = f.read(1 << 20)
                last = len(data) < (1 << 20)
                ctx.link.send(('send_file', ctx.key, ctx.attempt, relpath, mode, offset, data,
                               last))
                offset += len(data)
                if last:
                    return 0
    except (OSError, ValueError) as exc:
        print('dispy_send_file: %s' % exc, file=sys.stderr)
        return -1


def _make_namespace(spec):
    """The computation's global namespace: a fresh ``__main__`` module, so objects the
    client pickled from its own ``__main__`` load here."""
    module = types.ModuleType('__main__')
    module.__file__ = os.path.join(spec['dir'], spec['name'])
    sys.modules['__main__'] = module
    ns = module.__dict__
    ns.update(os=os, sys=sys, time=time, dispy_provisional_result=dispy_provisional_result,
              dispy_send_file=dispy_send_file,
              dispy_node_name=spec['node_name'], dispy_node_ip_addr=spec['node_ip'],
              dispy_job_path=spec['dir'])
    return ns


def _load_code(ns, bundle, filename):
    """Modules, source and objects of a computation or of one job's dependencies."""
    for name in bundle['modules']:
        importlib.invalidate_caches()
        ns[name] = importlib.import_module(name)
    if bundle['code']:
        # Tracebacks of jobs then show the lines of the shipped source.
        linecache.cache[filename] = (len(bundle['code']), None,
                                     bundle['code'].splitlines(True), filename)
        exec(compile(bundle['code'], filename, 'exec'), ns)
    if bundle['objects']:
        ns.update(pickle.loads(bundle['objects']))


def _load_computation(spec):
    """Runs in the host: shipped code, objects, modules, then setup.  → (ns, error)."""
    ns = _make_namespace(spec)
    try:
        _load_code(ns, spec, '<dispy computation %s>' % spec['name'])
        if spec['setup']:
            func_name, args_blob = spec['setup']
            args, kwargs = pickle.loads(args_blob)
            ret = ns[func_name](*args, **kwargs)
            if ret not in (0, None):
                return ns, 'setup returned %r (0 means success)' % (ret,)
    except BaseException:
        return ns, traceback.format_exc()
    return ns, None


def _run_cleanup(ns, spec):
    if not spec['cleanup']:
        return None
    try:
        func_name, args_blob = spec['cleanup']
        args, kwargs = pickle.loads(args_blob)
        ns[func_name](*args, **kwargs)
    except BaseException:
        return traceback.format_exc()
    return None


def worker_main(fd, host_link, ns, spec):
    """A warm worker (forked by its host): runs jobs one at a time, each from a fresh
    copy of the computation's globals, talking straight to the node over its own link.
    Its own process group, so killing the group kills the job and all it started."""
    try:
        _run_worker(fd, host_link, ns, spec)
    except OSError:
        pass                    # the node is gone
    except Exception:
        traceback.print_exc()
    finally:
        os._exit(0)


def _run_worker(fd, host_link, ns, spec):
    os.setpgid(0, 0)
    _set_parent_death_signal()
    if os.getppid() != multiprocessing.parent_process().pid:
        os._exit(1)                     # the host died before we could follow it
    host_link.close()                   # the host's own link stays the host's
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    link = LocalLink(multiprocessing.connection.Connection(fd))
    _JobContext.link = link
    _JobContext.max_file_size = spec.get('max_file_size', 0)
    link.send(('ready', os.getpid()))
    run = _run_program if spec['kind'] == 'program' else _run_function
    while True:
        try:
            msg, _fd = link.recv()
        except EOFError:
            os._exit(0)
        if msg[0] == 'run':
            _, key, attempt, blob, extra = msg
            _JobContext.key, _JobContext.attempt = key, attempt
            link.send(run(key, attempt, blob, ns, spec, extra))
            if spec.get('fresh_process'):
                os._exit(0)        # strict isolation: one job per process


def _environ_snapshot():
    """The environment as ``os.environ`` keeps it underneath (encoded keys and values):
    copied and compared at C speed, where ``dict(os.environ)`` decodes every entry
    (measured: ~95 µs a job, most of a tiny job's cost in the worker)."""
    data = getattr(os.environ, '_data', None)
    return dict(data) if data is not None else dict(os.environ)


def _restore_environ(snapshot):
    """Puts back the environment a job changed (through ``os.environ``, so the C
    environment that later subprocesses inherit follows)."""
    decode = (os.environ.decodekey, os.environ.decodevalue) \
        if hasattr(os.environ, '_data') else (str, str)
    os.environ.clear()
    os.environ.update({decode[0](k): decode[1](v) for k, v in snapshot.items()})


def _run_function(key, attempt, blob, ns, spec, extra):
    saved_globals = dict(ns)
    saved_environ = _environ_snapshot()
    live = LiveOutput.streams(key, attempt, spec) if spec.get('stream_output') else None
    out, err = live or (io.StringIO(), io.StringIO())
    real_out, real_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    start = time.time()
    result_blob, exception, status = None, None, DispyJob.Finished
    try:
        if extra:       # this job's own dependencies: gone with the globals after it
            _load_code(ns, extra, '<dispy job %s depends>' % key)
        args, kwargs = dispy.loads_blob(blob)
        result = ns[spec['name']](*args, **kwargs)
        try:    # now, while classes the job brought along are still defined
            result_blob = dispy.dumps_result(result)
        except Exception as exc:
            status = DispyJob.Terminated
            exception = 'the result cannot be pickled: %r' % exc
        del result
    except BaseException:
        exc_type, exc, tb = sys.exc_info()
        exception = ''.join(traceback.format_exception(exc_type, exc, tb.tb_next))
        status = DispyJob.Terminated
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        if live:
            LiveOutput.instance.finish(live)    # all it wrote goes before its result
        end = time.time()
        # The next job starts from the globals setup left (rebinding does not leak);
        # in-place changes to objects setup created do persist in this worker.
        ns.clear()
        ns.update(saved_globals)
        if _environ_snapshot() != saved_environ:
            _restore_environ(saved_environ)
        try:
            os.chdir(spec['dir'])
        except OSError:
            pass
    return ('result', key, attempt, status, result_blob, out.getvalue(), err.getvalue(),
            exception, start, end)


def _run_program(key, attempt, blob, ns, spec, extra):
    import subprocess
    args, _kwargs = dispy.loads_blob(blob)
    path = os.path.join(spec['dir'], spec['name'])
    argv = ([sys.executable, path] if path.endswith('.py') else [path]) + list(args)
    start = time.time()
    try:
        if spec.get('stream_output'):
            code, out, err = _run_program_live(argv, spec, key, attempt)
        else:
            proc = subprocess.run(argv, cwd=spec['dir'], capture_output=True)
            code = proc.returncode
            out, err = proc.stdout.decode('utf-8', 'replace'), proc.stderr.decode('utf-8',
                                                                                 'replace')
    except OSError as exc:
        return ('result', key, attempt, DispyJob.Terminated, None, '', '',
                'cannot run program %s: %s' % (spec['name'], exc), start, time.time())
    return ('result', key, attempt, DispyJob.Finished, dispy.dumps_blob(code), out, err,
            None, start, time.time())


# ================================================================================
# Live output (stream_output): a worker's side (the node passes it on: _live_output)
# ================================================================================
#
#   job's print ──► LiveStream.write (under LiveOutput.cond): the text kept (_KeptText,
#        │          for job.stdout) and gathered; its complete lines taken (take_lines)
#        ▼          once LIVE_BATCH gathered, else by the flusher LIVE_DELAY later
#   LiveOutput.pending   at most LIVE_BACKLOG characters (more: dropped, counted)
#        │  sent by the flusher thread (or the writer, past LIVE_BATCH); at the job's
#        ▼  end (``finish``) the rest, then the RESULT
#   worker link ('output', key, attempt, [(stream, text, dropped)])
#        ▼
#   NodeServer._live_output (I/O loop) → dispy.LiveOutputRelay: OUTPUT to the client,
#   held to share frames, unless its connection is congested (then dropped, counted)

def _line_pieces(line):
    """A line cut into pieces of LIVE_LINE_MAX characters (an empty line: itself)."""
    size = dispy.LIVE_LINE_MAX
    return [line[i:i + size] for i in range(0, len(line), size)] or ['']


def _cut_long_lines(text):
    """Lines, each one over LIVE_LINE_MAX cut into pieces, each a line of its own."""
    if len(text) <= dispy.LIVE_LINE_MAX:
        return text
    lines = text.split('\n')
    if max(map(len, lines)) <= dispy.LIVE_LINE_MAX:
        return text
    return '\n'.join(piece for line in lines for piece in _line_pieces(line))


class _KeptText:
    """What ``job.stdout`` (or ``stderr``) keeps of a streamed job's stream: all of it
    up to ``limit`` characters; past that the first and the last half of the limit,
    with a line between that says how much was left out."""

    def __init__(self, name, limit):
        self.name = name
        self.half = max(1, limit // 2)
        self.head, self.head_size = [], 0
        self.tail, self.tail_size = collections.deque(), 0
        self.tail_skip = 0          # characters of tail[0] already left out
        self.left_out = 0

    def add(self, text):
        if self.head_size + len(text) <= self.half:
            self.head.append(text)
            self.head_size += len(text)
        else:
            self._add_past_head(text)

    def _add_past_head(self, text):
        room = self.half - self.head_size
        if room > 0:
            self.head.append(text[:room])
            self.head_size = self.half
            text = text[room:]
        self.tail.append(text)
        self.tail_size += len(text)
        excess = self.tail_size - self.half
        while excess > 0:
            first = len(self.tail[0]) - self.tail_skip
            cut = min(first, excess)
            if cut == first:
                self.tail.popleft()
                self.tail_skip = 0
            else:
                self.tail_skip += cut
            self.tail_size -= cut
            self.left_out += cut
            excess -= cut

    def text(self):
        head = ''.join(self.head)
        tail = ''.join(self.tail)[self.tail_skip:]
        if not self.left_out:
            return head + tail
        return ('%s\n[dispy: %d characters of %s left out here; kept: the first and the '
                'last %d]\n%s' % (head, self.left_out, self.name, self.half, tail))


class LiveStream(io.TextIOBase):
    """A streamed job's ``sys.stdout`` or ``sys.stderr``: keeps what the job writes
    (``getvalue()``: job.stdout) and gathers it (``raw``) for the worker's LiveOutput,
    which takes the complete lines of it (``take_lines``) when LIVE_BATCH characters
    have gathered or its flusher comes by.  A line without its newline waits for it
    (or goes in pieces once LIVE_LINE_MAX long, or at the job's end).  The job's
    threads may write at once; after the job's end their writes are ignored."""

    encoding = 'utf-8'
    errors = 'strict'

    def __init__(self, live, name, keep):
        super().__init__()
        self.live = live
        self.stream = name
        self.kept = _KeptText(name, keep)
        self.raw = []               # written since the last take_lines
        self.raw_size = 0
        self.ended = False

    def writable(self):
        return True

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError('write() argument must be str, not %s' % type(text).__name__)
        live = self.live
        with live.lock:
            if self.ended or not text:
                return len(text)
            kept = self.kept
            if kept.head_size + len(text) <= kept.half:    # (kept.add, inlined: hot)
                kept.head.append(text)
                kept.head_size += len(text)
            else:
                kept.add(text)
            self.raw.append(text)
            self.raw_size += len(text)
            if self.raw_size >= dispy.LIVE_BATCH:
                self.take_lines()
            elif not live.gathering:        # the flusher comes by LIVE_DELAY from now
                live.gathering = True
                live.cond.notify()
        return len(text)

    def take_lines(self, last=False):
        """The complete lines written go to the LiveOutput (``last``: all of it; cond
        held)."""
        if not self.raw:
            return
        text = ''.join(self.raw) if len(self.raw) > 1 else self.raw[0]
        end = len(text) if last else text.rfind('\n') + 1
        if not end and len(text) >= dispy.LIVE_LINE_MAX:    # a long line: its pieces
            end = len(text) - len(text) % dispy.LIVE_LINE_MAX
            lines = '\n'.join(_line_pieces(text[:end])) + '\n'
        else:
            lines = _cut_long_lines(text[:end])
        rest = text[end:]
        self.raw, self.raw_size = ([rest], len(rest)) if rest else ([], 0)
        if lines:
            self.live.add(self.stream, lines)

    def flush(self):
        pass        # what the job wrote goes within LIVE_DELAY anyway

    def getvalue(self):
        with self.live.cond:
            return self.kept.text()


class LiveOutput:
    """The live output of the jobs a worker runs (one at a time), on its way to the
    node (one per worker, made by its first streamed job).  Lines wait in ``pending``
    (at most LIVE_BACKLOG characters: when the node does not read fast enough more are
    dropped and counted); a flusher thread sends them LIVE_DELAY after the job wrote
    (at once when LIVE_BATCH wait), so a line printed before a long computation arrives
    promptly and lines printed together share a message.
    ``finish`` sends the rest before the job's result is sent."""

    instance = None             # the one of this worker process

    @classmethod
    def streams(cls, key, attempt, spec):
        """(stdout, stderr) LiveStreams of the job starting now."""
        if cls.instance is None:
            cls.instance = cls(_JobContext.link)
        return cls.instance.start(key, attempt, int(spec.get('output_keep')
                                                  or dispy.LIVE_KEEP))

    def __init__(self, link):
        self.link = link
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.sending = threading.Lock()     # one batch at a time: they leave in order
        self.job = None                     # (key, attempt) of the job running
        self.current = ()                   # its LiveStreams
        self.pending = []                   # [stream, [texts], characters, dropped before]
        self.pending_size = 0
        self.dropped = dict.fromkeys(dispy.OUTPUT_STREAMS, 0)
        self.gathering = False              # written since the flusher last came by
        threading.Thread(target=self._flush_loop, daemon=True,
                         name='dispy-live-output').start()
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self):
        """In a process the job forked (multiprocessing, say): no flusher runs here, and
        it may have held the locks at the fork, so they are new; what this process
        writes is ignored (as the output of a function job's children always was)."""
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.sending = threading.Lock()
        for stream in self.current:
            stream.ended = True
        self.current, self.pending, self.pending_size = (), [], 0

    def start(self, key, attempt, keep):
        with self.cond:
            self.job = (key, attempt)
            self.current = (LiveStream(self, 'stdout', keep),
                            LiveStream(self, 'stderr', keep))
            return self.current

    def add(self, stream, text):
        """Complete lines of the job (cond held): they wait for the flusher if there
        is room; what there is no room for is dropped, counted."""
        room = dispy.LIVE_BACKLOG - self.pending_size
        if len(text) > room:
            cut = text.rfind('\n', 0, room) + 1
            self.dropped[stream] += dispy.count_lines(text[cut:])
            text = text[:cut]
            if not text:
                return
        last = self.pending[-1] if self.pending else None
        if last is not None and last[0] == stream and not self.dropped[stream] and \
                last[2] + len(text) <= dispy.LIVE_BATCH:
            last[1].append(text)
            last[2] += len(text)
        else:
            self.pending.append([stream, [text], len(text), self.dropped[stream]])
            self.dropped[stream] = 0
        self.pending_size += len(text)
        if self.pending_size >= dispy.LIVE_BATCH:
            self.cond.notify()

    def finish(self, streams):
        """The job ended: all it wrote, and the count of what was dropped, go now."""
        with self.cond:
            for stream in streams:
                stream.take_lines(last=True)
                stream.ended = True
            for name, lines in self.dropped.items():
                if lines:
                    self.pending.append([name, [], 0, lines])
                    self.dropped[name] = 0
            self.current = ()
        self.send_pending()

    def send_pending(self):
        with self.sending:
            with self.cond:
                batch = [(name, ''.join(texts), dropped)
                         for name, texts, _, dropped in self.pending]
                self.pending, self.pending_size = [], 0
                key, attempt = self.job
            if batch:
                try:
                    self.link.send(('output', key, attempt, batch))
                except OSError:
                    pass        # the node is gone: the worker ends with the job's result

    def _flush_loop(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.gathering or self.pending)
                self.cond.wait_for(lambda: self.pending_size >= dispy.LIVE_BATCH,
                                   dispy.LIVE_DELAY)
                self.gathering = False
                for stream in self.current:
                    stream.take_lines()
            self.send_pending()


def _run_program_live(argv, spec, key, attempt):
    """A program job whose output streams: its pipes are read as it runs, decoded as
    UTF-8 (errors replaced) into LiveStreams.  → (exit status, stdout, stderr)."""
    import codecs
    import subprocess
    streams = LiveOutput.streams(key, attempt, spec)
    # a Python program's print() then reaches its pipe at once, not when a buffer fills
    env = dict(os.environ, PYTHONUNBUFFERED='1') if argv[0] == sys.executable else None
    try:
        proc = subprocess.Popen(argv, cwd=spec['dir'], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        with proc, selectors.DefaultSelector() as pipes:
            for pipe, stream in zip((proc.stdout, proc.stderr), streams):
                pipes.register(pipe, selectors.EVENT_READ,
                               (stream, codecs.getincrementaldecoder('utf-8')('replace')))
            while pipes.get_map():
                for ready, _ in pipes.select():
                    stream, decoder = ready.data
                    data = os.read(ready.fd, 65536)
                    stream.write(decoder.decode(data, final=not data))
                    if not data:
                        pipes.unregister(ready.fileobj)
            code = proc.wait()
    finally:
        LiveOutput.instance.finish(streams)
    return code, streams[0].getvalue(), streams[1].getvalue()


# ================================================================================
# Node side: records
# ================================================================================

class NodeJob:
    """A job on this node, from arrival to acknowledged result."""

    __slots__ = ('key', 'attempt', 'comp', 'blob', 'worker', 'cancelled', 'start_time',
                 'timeout', 'timed_out', 'depends', 'files', 'priority')

    def __init__(self, key, attempt, comp, blob, timeout=None, priority=0):
        self.key = key
        self.attempt = attempt
        self.comp = comp
        self.blob = blob
        self.worker = None
        self.cancelled = False
        self.start_time = None
        self.timeout = timeout          # seconds the job may run, or None
        self.timed_out = False
        self.depends = None             # the job's own dependencies, if any
        self.files = ()                 # files written for it, removed after it
        self.priority = priority        # dispy_job_priority: higher runs first here


class Worker:
    """The node's handle on one worker process: its link, its pid (known once it is
    ready) and the job it runs."""

    def __init__(self, link):
        self.link = link
        self.reader = LinkReader(link.conn)     # read on the node's I/O loop
        self.pid = None
        self.job = None

    def kill(self):
        """SIGKILL to its process group: the job and every process it started."""
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass


class WorkerPool:
    """One computation's processes: its host (a forkserver child that loaded the code and
    ran setup) and the warm workers the host forks; which workers are idle, which jobs
    hold a CPU waiting for one, how many are being started, how each one ended.

    Called with the server's lock held.  What reads its links (the host's reader
    thread; the node's I/O loop for the workers) takes that lock to call the server
    back: ``_start_job``, ``_on_worker_message``, ``_on_worker_lost``,
    ``_on_host_message``, ``_on_host_ended``."""

    def __init__(self, server, session, comp):
        self.server = server
        self.session = session          # whose computation it is (for the callbacks)
        self.comp = comp
        self.host = None                # multiprocessing Process
        self.host_link = None
        self.ended = False              # the host has exited (after cleanup, or died)
        self.workers = []               # ready workers, idle or not
        self.idle = []
        self.waiting = collections.deque()
        self.spawning = 0
        self.exits = {}                 # worker pid -> how it ended (from the host)
        self.exit_cond = threading.Condition()
        self.host_gone = False          # no more exits will be reported
        self._when_warm = None          # start_workers' callback, until they are ready

    def start(self, spec):
        """Starts the host through the forkserver; raises OSError if it cannot."""
        node_end, host_end = multiprocessing.Pipe()
        self.host = FORKSERVER.Process(target=HOST_TARGET, args=(host_end, spec),
                                       name='dispy-host')
        try:
            self.host.start()
        except Exception as exc:
            node_end.close()
            self.ended = True
            raise OSError(str(exc)) from exc
        finally:
            host_end.close()
        self.host_link = LocalLink(node_end)
        self._thread(self._read_host, 'host')

    def take_worker(self, job):
        """An idle worker for ``job``, else None: the job waits for the next ready worker
        and one is started if the computation's share allows."""
        if self.idle:
            return self.idle.pop()
        self.waiting.append(job)
        if len(self.workers) + self.spawning < self.comp.cpus:
            self._spawn()
        return None

    def start_workers(self, then):
        """Forks workers up to the computation's CPUs, so its first jobs need not
        wait for a fork each; ``then()`` once the first is ready (or none is being
        forked any more)."""
        self._when_warm = then
        while len(self.workers) + self.spawning < self.comp.cpus:
            before = self.spawning
            self._spawn()
            if self.spawning == before:
                break       # the host cannot fork (logged)
        self._check_warm()

    def _check_warm(self):
        if (self.workers or self.spawning == 0) and self._when_warm is not None:
            then, self._when_warm = self._when_warm, None
            then()

    def drop_waiting(self, job):
        """Whether ``job`` was waiting for a worker (it no longer is)."""
        if job in self.waiting:
            self.waiting.remove(job)
            return True
        return False

    def take_waiting(self):
        """The jobs still waiting for a worker (the computation has ended)."""
        jobs = list(self.waiting)
        self.waiting.clear()
        return jobs

    def job_done(self, worker):
        """The worker sent its job's result: its job, and the worker is idle again
        (unless each job gets a fresh process)."""
        job, worker.job = worker.job, None
        if self.comp.state == 'ready' and not self.comp.spec.get('fresh_process'):
            self.idle.append(worker)
        return job

    def close(self):
        """Asks the host to kill the workers and run cleanup, then exit."""
        if self.host_link is None:
            self.ended = True
            return
        try:
            self.host_link.send(('cleanup',))
        except OSError:
            pass

    def kill(self):
        """Kills the workers and the host at once (the node is stopping)."""
        for worker in self.workers:
            worker.kill()
        if self.host is not None and not self.ended:
            self.host.kill()

    # -- internals --------------------------------------------------------------------
    def _thread(self, target, name, *args):
        threading.Thread(target=target, args=args, daemon=True,
                         name='dispynode-' + name).start()

    def _spawn(self):
        try:
            node_end, worker_end = multiprocessing.Pipe()
        except OSError as exc:      # out of descriptors, say
            logger.warning('cannot start a worker for %s: %s', self.comp.spec['name'], exc)
            return
        try:
            worker = Worker(LocalLink(node_end))
            self.host_link.send(('fork',), fd=worker_end.fileno())
        except OSError as exc:
            logger.warning('cannot start a worker for %s: %s', self.comp.spec['name'], exc)
            node_end.close()
            return
        finally:
            worker_end.close()
        self.spawning += 1
        self.server.loop.in_loop(self._watch_worker, worker)

    # A worker's link is read on the node's I/O loop (no thread per worker, and no
    # hand-off between threads per result), without blocking (LinkReader).
    def _watch_worker(self, worker):
        self.server.loop.selector.register(worker.reader.sock, selectors.EVENT_READ,
                                           lambda _events: self._read_worker(worker))

    def _read_worker(self, worker):
        try:
            msgs = worker.reader.read()
        except EOFError:
            self._link_ended(worker)
            return
        with self.server.lock:
            for msg in msgs:
                try:
                    if msg[0] == 'ready':
                        self._on_ready(worker, msg[1])
                    else:
                        self.server._on_worker_message(self.comp, worker, msg)
                except Exception:
                    logger.exception('worker %s: unexpected error; killed', worker.pid)
                    worker.kill()       # its link then ends: _worker_ended reports its job
        if worker.reader.ended:     # ended after these messages: no event may follow
            if worker.reader.broken:
                logger.warning('worker %s: %s; killed', worker.pid, worker.reader.ended)
                worker.kill()
            self._link_ended(worker)

    def _link_ended(self, worker):
        self.server.loop.selector.unregister(worker.reader.sock)
        worker.reader.close()
        self.server.threads.submit(self._worker_ended, worker)   # may wait for its exit

    def _on_ready(self, worker, pid):
        worker.pid = pid
        self.spawning -= 1
        self.workers.append(worker)
        if self.waiting:
            self.server._start_job(self.waiting.popleft(), worker)
        else:
            self.idle.append(worker)
        self._check_warm()

    def _worker_ended(self, worker):
        how = self._exit_of(worker)
        with self.server.lock:
            if worker in self.workers:
                self.workers.remove(worker)
            if worker in self.idle:
                self.idle.remove(worker)
            if worker.pid is None:
                self.spawning -= 1
                self._check_warm()
            job, worker.job = worker.job, None
            worker.link.close()
            if job is not None:
                self.server._on_worker_lost(self.comp, job, worker.pid, how)
            elif self.waiting and self.comp.state == 'ready':
                self._spawn()

    def _exit_of(self, worker):
        """How the worker ended, as its host reports it (waited for only if it had a job:
        its link may close before the host has seen it end)."""
        if worker.pid is None:
            return None
        with self.exit_cond:
            if worker.job is not None:
                self.exit_cond.wait_for(lambda: worker.pid in self.exits or self.host_gone,
                                        2.0)
            return self.exits.pop(worker.pid, None)

    def _read_host(self):
        while True:
            try:
                msg, _ = self.host_link.recv()
            except EOFError:
                break
            if msg[0] == 'exited':
                with self.exit_cond:
                    self.exits[msg[1]] = msg[2]
                    self.exit_cond.notify_all()
                continue
            with self.server.lock:
                self.server._on_host_message(self.session, self.comp, msg)
        with self.exit_cond:
            self.host_gone = True
            self.exit_cond.notify_all()
        self.host.join(5.0)
        with self.server.lock:
            self.host_link.close()
            self.ended = True
            remove_files = self.server._on_host_ended(self.session, self.comp)
        if self.host.exitcode is not None:
            self.host.close()
        if remove_files:        # the host has run cleanup and exited: the files can go
            self.server._remove_files(self.comp)


class NodeComputation:
    """One computation of the current client: its folder, state and processes."""

    def __init__(self, key, spec, directory):
        self.key = key
        self.spec = spec
        self.dir = directory
        self.missing_files = set(spec.get('files') or ())
        self.state = 'files'       # files, setup, ready, failed, closing
        self.pool = None           # WorkerPool, once its files are all here
        self.cpus = int(spec.get('cpus') or 1)   # the client's share of this node
        self.running = 0

    @property
    def ended(self):
        """Whether no process of it is left (or none was ever started)."""
        return self.pool is None or self.pool.ended


class ClientSession:
    """The client program this node serves.

    Its life, when the client vanishes (crash, Ctrl-C, kill -9, a dropped link)::

        attached ──connection lost──► detached: the jobs it left run to the end
           ▲                            │      (at most --zombie_interval), results
           └──── same client back ──────┤      go to disk as they come
                                        ▼
                     nothing left to run (and DETACHED_GRACE passed): session ends,
                     the node is free for another program; kept results wait on
                     disk for recover_jobs (ResultStore, RecoveryHandler)
    """

    def __init__(self, client_id, info, address):
        self.client_id = client_id
        self.info = info
        self.address = address
        self.conn = None
        self.jobs = {}              # key -> NodeJob not yet finished
        self.results = {}           # (key, attempt) -> RESULT message until acknowledged
        self.stored = set()         # (key, attempt) of results also kept on disk
        self.comps = {}             # cluster key -> NodeComputation
        self.disconnected_at = None
        self.idle_since = None      # detached and with no job left, since (monotonic)
        self.wanted = None          # attached by recover_jobs: the job keys it collects
        self.pulse_interval = max(0.05, float(info.get('pulse_interval')
                                              or dispy.DEFAULT_PULSE_INTERVAL))

    def describe(self):
        return '%s (%s, pid %s)' % (self.address, self.info.get('name', '?'),
                                    self.info.get('pid', '?'))

    def wants(self, key):
        """Whether the attached connection collects this job's result."""
        return self.wanted is None or key in self.wanted

    def busy_text(self, zombie_interval):
        """What a client turned away is told about this session."""
        text = self.describe()
        if self.conn is None and self.disconnected_at is not None and not self.jobs:
            text += (', which disconnected and has no job left here; this node is free for '
                     'others within seconds')
        elif self.conn is None and self.disconnected_at is not None:
            gone = time.monotonic() - self.disconnected_at
            left = max(0.0, zombie_interval - gone)
            text += (', which disconnected %.0f s ago; this node finishes its %d job(s) '
                     'first (at most %.0f more minutes, --zombie_interval) and is then free'
                     % (gone, len(self.jobs), left / 60))
        return text


class ResultStore:
    """Results of clients that went away, on disk under ``--dest_path_prefix`` until the
    client (or ``recover_jobs``) comes back for them; they survive a node restart and
    are removed only when acknowledged or by ``--clean``.  Files are 0600 pickles of
    plain-data RESULT messages, loaded with the frame unpickler."""

    def __init__(self, prefix):
        self.dir = os.path.join(prefix, '.dispy_results')

    def _client_dir(self, client_id):
        if not re.fullmatch(r'[0-9a-f]{8,64}', client_id or ''):
            return None
        return os.path.join(self.dir, client_id)

    def save(self, client_id, reply):
        folder = self._client_dir(client_id)
        if folder is None:
            return False
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            result = Msg.RESULT.read(reply)
            path = os.path.join(folder, '%d-%d' % (result.key, result.attempt))
            if result.blob is not None:        # received buffers: store plain bytes
                reply = Msg.RESULT.replace(reply,
                                           blob=b''.join(dispy.stored_blob(result.blob)))
            fd = os.open(path + '.tmp', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, 'wb') as f:
                f.write(pickle.dumps(reply, pickle.HIGHEST_PROTOCOL))
            os.replace(path + '.tmp', path)
            return True
        except OSError as exc:
            logger.warning('cannot keep a result on disk: %s', exc)
            return False

    def load(self, client_id, keys=None):
        """The kept results of a client (only those of ``keys``, if given)."""
        folder = self._client_dir(client_id)
        replies = []
        if folder is None or not os.path.isdir(folder):
            return replies
        try:
            names = os.listdir(folder)
        except OSError:         # removed meanwhile: its last result was acknowledged
            return replies
        for name in names:
            match = re.fullmatch(r'(\d+)-\d+', name)
            if not match or (keys is not None and int(match.group(1)) not in keys):
                continue
            try:
                with open(os.path.join(folder, name), 'rb') as f:
                    reply = dispy.loads_frame(f.read())
                Msg.RESULT.read(reply)
                replies.append(reply)
            except Exception as exc:
                logger.warning('stored result %s unreadable: %s', name, exc)
        return replies

    def remove(self, client_id, key, attempt):
        folder = self._client_dir(client_id)
        if folder is None:
            return
        try:
            os.unlink(os.path.join(folder, '%d-%d' % (key, attempt)))
        except OSError:
            return
        try:
            os.rmdir(folder)        # only if that was the last one
        except OSError:
            pass


def _recover_keys(value):
    """The job keys a recover_jobs connection collects (None: a normal client)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in value):
        raise ValueError('malformed recovery request')
    return set(value)


class RecoveryHandler:
    """``recover_jobs`` of a program this node no longer serves (its session ended:
    nothing was left to run for it).  Sends the kept results it asks for, from the
    ResultStore, and removes each one it acknowledges; results of other jobs (another
    recover file's) stay.  Runs on its own connection, beside whatever program the
    node serves meanwhile."""

    def __init__(self, router, channel, address, client_id, wanted):
        self.router = router
        self.address = address
        self.client_id = client_id
        self.wanted = wanted
        self.conn = router.node.loop_connection(channel, self, 'recover-%s' % address)

    def start(self):
        replies = self.router.node.store.load(self.client_id, self.wanted)
        logger.info('recover_jobs from %s: %d kept result(s) of %d job(s) asked for',
                    self.address, len(replies), len(self.wanted))
        self.conn.start()
        held = [list(Msg.RESULT.read(r)[:2]) for r in replies]
        self.conn.send(self.router.node._node_info(held, []))
        for reply in replies:
            self.conn.send(reply)

    # -- connection handler (the node's I/O loop) ---------------------------------------
    def on_messages(self, conn, msgs):
        for msg in msgs:
            kind = msg[0] if isinstance(msg, tuple) and msg else None
            if kind == 'ACK':
                try:
                    acked = acked_jobs(Msg.ACK.read(msg))
                except (ValueError, TypeError, dispy.ProtocolError) as exc:
                    logger.warning('recover_jobs from %s: malformed ACK: %s', self.address, exc)
                    continue
                for key, attempt in acked:
                    if key in self.wanted:
                        with self.router.lock:
                            self.router.node.store.remove(self.client_id, key, attempt)
            elif kind == 'RELEASE':
                conn.close('recovery done', flush=True)
                return
            # PULSE, CANCEL (nothing of this client runs here any more): nothing to do

    def on_closed(self, conn, reason):
        with self.router.lock:
            self.router.recoveries.discard(self)


def acked_jobs(msg):
    """The (key, attempt) pairs of an ACK; malformed → ValueError."""
    jobs = msg.jobs
    if not isinstance(jobs, (list, tuple)):
        raise ValueError('ACK without a list of jobs')
    return [(int(key), int(attempt)) for key, attempt in jobs]


def fold_started(batch):
    """A frame's messages without the STARTED of a job whose RESULT is in it: the
    client marks such a job Running from its RESULT."""
    ended = {(m[1], m[2]) for m in batch if m[0] == 'RESULT'}
    if not ended:
        return batch
    return [m for m in batch if m[0] != 'STARTED' or (m[1], m[2]) not in ended]


def _safe_relative(path):
    if not isinstance(path, str) or not path:
        raise ValueError('refused path %r' % (path,))
    norm = os.path.normpath(path)
    if (os.path.isabs(norm) or norm in ('.', '..') or norm.startswith('..' + os.sep)
            or norm.split(os.sep)[0].startswith('.dispy') or '\0' in norm):
        raise ValueError('refused path %r: it would leave the destination folder' % (path,))
    return norm


# ================================================================================
# Node side: the TCP listener (dispy.Listener, a socketserver server)
# ================================================================================

HandshakeAdmission = dispy.HandshakeAdmission


class NodeListener(dispy.Listener):
    """The node's listener on one address: clients are authenticated with the node's
    secret and TLS files and handed to ``node.attach`` (its SessionRouter)."""

    thread_name = 'dispynode-handshake'

    def credentials(self):
        node = self.owner
        return (node.ssl_context, node.config.secret, node.config.max_frame,
                {'role': 'node', 'name': node.name})


# ================================================================================
# Node side: the session router
# ================================================================================

class SessionRouter:
    """Which client program each authenticated connection belongs to.

    The node serves one program at a time (its ``ClientSession``)::

        NodeListener ──channel──► attach ─┬─ the program in session (again): its
                                          │  LoopConnection; messages → NodeServer.handlers
                                          ├─ recover_jobs of a program no longer
                                          │  served → RecoveryHandler beside it
                                          └─ another program → BUSY, closed; told by
                                             datagram when the node is free

    It also keeps each session alive or ends it: pulses and liveness of the
    connection, and a detached session's end (``tick``).  Shares the node's lock.
    """

    def __init__(self, node):
        self.node = node
        self.lock = node.lock
        self.session = None          # the ClientSession served now
        self.recoveries = set()      # RecoveryHandler of recover_jobs beside the session
        self.turned_away = {}        # client address -> udp port, told when we are free
        self.released = set()        # client ids the operator let go (until "start")
        self.avail_sent = 0.0

    # -- connections ----------------------------------------------------------------------
    def attach(self, channel, addr, info):
        client_id = str(info.get('id', ''))
        wanted = _recover_keys(info.get('recover'))
        with self.lock:
            session = self.session
            if wanted is not None and (session is None or session.client_id != client_id):
                # recover_jobs of a program this node no longer serves: its results are
                # on disk; served beside whatever program the node serves now.
                recovery = self._new_recovery(channel, addr[0], client_id, wanted)
            else:
                recovery = None
                self._attach_session(channel, addr, info, client_id, wanted)
        if recovery is not None:
            try:
                recovery.start()        # reads the disk: outside the lock
            except Exception as exc:
                logger.warning('recover_jobs from %s failed: %r', addr[0], exc)
                with self.lock:
                    self.recoveries.discard(recovery)
                recovery.conn.close('recovery failed')

    def _refusal(self, session, client_id):
        """Why a client is turned away (BUSY), or None (lock held)."""
        if session is not None and session.client_id != client_id:
            return session.busy_text(self.node.config.zombie_interval)
        if client_id in self.released:
            return dispy.NOT_SERVING + 'released by its operator (until "start")'
        service = self.node.service
        if session is None and self.node.quitting:
            return dispy.NOT_SERVING + 'exiting'
        if session is None and service.current != ServiceControl.SERVING:
            return dispy.NOT_SERVING + service.why()
        return None

    def _new_recovery(self, channel, address, client_id, wanted):
        """A RecoveryHandler, unless too many run already (lock held)."""
        if len(self.recoveries) >= MAX_RECOVERIES:
            logger.warning('recover_jobs from %s refused: %d recoveries in progress',
                           address, len(self.recoveries))
            channel.close()
            return None
        recovery = RecoveryHandler(self, channel, address, client_id, wanted)
        self.recoveries.add(recovery)
        return recovery

    def _attach_session(self, channel, addr, info, client_id, wanted):
        """A client (or recover_jobs of the client in session) connects (lock held)."""
        session = self.session
        conn = self.node.loop_connection(channel, self, 'client-%s' % addr[0])
        desc = self._refusal(session, client_id)
        if desc is not None:
            logger.info('client %s turned away: %s', addr[0], desc)
            self.turned_away[addr[0]] = info.get('udp_port')
            conn.start()
            conn.send(Msg.BUSY(desc))
            conn.close('busy', flush=True)
            return
        if session is None:
            session = self.session = ClientSession(client_id, info, addr[0])
            for reply in self.node.store.load(client_id):    # kept from before
                key = tuple(Msg.RESULT.read(reply)[:2])
                session.results[key] = reply
                session.stored.add(key)
            logger.info('serving client %s%s', session.describe(),
                        ' (%d result(s) kept for it)' % len(session.results)
                        if session.results else '')
        elif session.conn is not None:
            session.conn.close('replaced by a new connection')
        session.conn = conn
        if wanted is None:      # the client is back (a recovery keeps its clocks running)
            session.disconnected_at = session.idle_since = None
        session.wanted = wanted
        conn.start()
        held = [[j.key, j.attempt] for j in session.jobs.values() if session.wants(j.key)]
        held += [list(k) for k in session.results if session.wants(k[0])]
        conn.send(self.node._node_info(held, list(session.comps)))
        for key, msg in session.results.items():   # not acknowledged yet: send again
            if session.wants(key[0]):
                conn.send(msg)

    # -- connection handler (the node's I/O loop; OFFLOAD kinds on its strand) ------------
    # Setting a computation up (starting its host, writing its files) takes long: off the
    # loop, in order with the connection's other messages.
    OFFLOAD = ('COMPUTE', 'FILE', 'PUT_FILE')

    def on_messages(self, conn, msgs):
        with self.lock:
            session = self.session
            if session is None or session.conn is not conn:
                return
            for msg in msgs:
                kind = msg[0] if isinstance(msg, tuple) and msg else None
                kind = dispy.TO_NODE.get(kind) if isinstance(kind, str) else None
                if kind is None or kind.name == 'CLIENT':
                    logger.warning('client %s sent an unknown message; ignored', session.address)
                    continue
                try:
                    self.node.handlers[kind.name](self.node, session, kind.read(msg))
                except (ValueError, TypeError, IndexError, KeyError,
                        dispy.ProtocolError) as exc:
                    logger.warning('client %s sent a malformed %s message: %s',
                                   session.address, msg[0], exc)
                except Exception:
                    logger.exception('error handling %s from client %s', msg[0],
                                     session.address)

    def on_closed(self, conn, reason):
        with self.lock:
            session = self.session
            if session is None or session.conn is not conn:
                return
            self.detach(session, reason)

    def detach(self, session, reason):
        """The client's connection is gone: what it left runs on (see ClientSession)."""
        if session.conn is not None:
            session.conn.close(reason, flush=True)
        session.conn = None
        session.wanted = None
        session.disconnected_at = session.disconnected_at or time.monotonic()
        self.store_results(session)
        if session.jobs:
            logger.warning('client %s disconnected (%s); its %d job(s) run to the end and '
                           'their results are kept; this node is free once they end',
                           session.address, reason, len(session.jobs))
        elif session.results:
            session.idle_since = session.idle_since or time.monotonic()
            logger.info('client %s disconnected (%s); %d result(s) kept for it',
                        session.address, reason, len(session.results))
        else:   # nothing to keep for it: free for other clients now
            logger.info('client %s disconnected (%s)', session.address, reason)
            self.end_session(session)

    def store_results(self, session):
        for key, reply in session.results.items():
            if key not in session.stored and self.node.store.save(session.client_id, reply):
                session.stored.add(key)

    def end_session(self, session):
        for comp in list(session.comps.values()):
            self.node._close_computation(session, comp)
        session.comps.clear()
        if session.conn is not None:
            session.conn.close('released', flush=True)
        if self.session is session:
            self.session = None
            node = self.node
            if node.service.session_ended() or node.stop_after_session:
                logger.info('dispynode %s: %s; exiting once idle', node.name,
                            'asked to stop by its client' if node.stop_after_session
                            else 'served %d client(s) (--serve)' % node.service.served)
                node.quitting = True
            elif node.service.current == ServiceControl.SERVING:
                node.discovery.announce(to_waiting=True)

    # -- timers (manager thread, lock held) --------------------------------------------------
    def tick(self, now):
        for recovery in list(self.recoveries):     # silent both ways: the client is gone
            if (now - recovery.conn.last_recv > RECOVERY_IDLE
                    and recovery.conn.idle_send > RECOVERY_IDLE):
                recovery.conn.close('recover_jobs connection idle')
        session = self.session
        if session is None:
            return
        conn = session.conn
        if conn is not None:
            self._keep_alive(session, conn, now)
        elif session.disconnected_at is not None:
            self._tick_detached(session, now)

    def _keep_alive(self, session, conn, now):
        avail_fn = self.node.avail_fn
        if conn.idle_send >= session.pulse_interval or (
                avail_fn.psutil and now - self.avail_sent >= session.pulse_interval):
            self.avail_sent = now
            conn.send(Msg.NODE_PULSE(time.time(), avail_fn()))
        silent = now - conn.last_recv
        if silent > dispy.DEAD_PULSES * session.pulse_interval:
            conn.close('no message from client for %.1f s' % silent)

    def _tick_detached(self, session, now):
        """A vanished client's session ends once nothing is left to run for it."""
        zombie_interval = self.node.config.zombie_interval
        if session.jobs:
            running = [job for job in session.jobs.values() if not job.cancelled]
            if running and now - session.disconnected_at > zombie_interval:
                logger.warning('client %s did not come back in %.1f minutes: its %d job(s) '
                               'are cancelled (results kept)', session.address,
                               zombie_interval / 60, len(running))
                for job in running:
                    self.node._cancel_job(session, job)
            return
        if session.idle_since is None or now - session.idle_since < DETACHED_GRACE:
            return      # a client that only lost its connection comes back by then
        logger.warning('client %s is gone and nothing runs for it any more: this node is '
                       'free (%d result(s) kept on disk under %s for recover_jobs)',
                       session.address, len(session.stored), self.node.store.dir)
        self.end_session(session)

    def close_recoveries(self, reason):
        for recovery in list(self.recoveries):
            recovery.conn.close(reason)


# ================================================================================
# Node side: discovery answers
# ================================================================================

class NodeDiscovery(dispy.DiscoveryEndpoint):
    """The node's discovery endpoint: it answers clients' pings and announces the node
    (at start, and, once it is free, to the clients it turned away).  Every answer
    carries the address the asker can reach the node at (``addr``), so a relay can
    forward it as it is.  Its datagrams are read in the endpoint's own thread."""

    def __init__(self, node):
        super().__init__(node.config.secret, self._on_datagram)
        self.node = node
        self._relay_sock = None

    def _on_datagram(self, msg, addr, sock):
        """An authenticated datagram: a client's ping gets our pong, and a
        dispynetrelay on this host (if one runs) gets the ping to repeat on our
        network (not one it repeated itself)."""
        if msg.get('t') == 'ping':
            if self.node.service.current != ServiceControl.SERVING or self.node.quitting:
                return      # not taking clients: not here, for them
            pong = self._pong('pong', self.own_address(sock, addr))
            self.sendto(self.pack(pong), addr, sock)
            if not msg.get('relayed') and not dispy.is_loopback(addr[0]):
                self._hand_to_relay(msg, addr)

    def _hand_to_relay(self, msg, addr):
        try:
            if self._relay_sock is None:    # its own: a relay not running is no error
                self._relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self._relay_sock.setblocking(False)
            self._relay_sock.sendto(self.pack({'t': 'relay', 'from': [addr[0], addr[1]],
                                               'ping': msg}),
                                    ('127.0.0.1', dispy.RELAY_PORT))
        except OSError:
            pass

    def _pong(self, kind, own_address):
        return dispy.Datagram.pong(kind, (self.node.config.ext_ip_addrs or [None])[0],
                                   self.node.config.ext_port or self.node.config.port, self.node.name,
                                   self.node.config.cpus, self.node.session is not None, self.node.instance,
                                   own_address)

    def own_address(self, sock=None, peer=None, local=None):
        """Our address as a peer (or a relay forwarding our answer) can reach it: the
        external one if configured, else the one ``sock`` is bound to (``-i``), else
        ``local``, else the one the route to ``peer`` leaves from, else our first."""
        if self.node.config.ext_ip_addrs:
            return self.node.config.ext_ip_addrs[0]
        if sock is not None and self.node.config.ip_addrs:
            return dispy._address_with_scope(sock.getsockname())
        return (local or (peer and dispy.local_address_towards(peer))
                or self.node.addresses()[0])

    def announce(self, to_waiting=False):
        """Tells clients we are here: broadcast at start; unicast to clients that were
        turned away when we become free."""
        endpoint, port = self, self.node.config.client_port
        if to_waiting:
            for addr, udp_port in list(self.node.router.turned_away.items()):
                if isinstance(udp_port, int) and 0 < udp_port < 65536:
                    peer = (addr, udp_port)
                    pong = self._pong('announce', self.own_address(peer=peer))
                    endpoint.sendto(endpoint.pack(pong), peer)
            self.node.router.turned_away.clear()
            return
        for local, bcast in self._broadcast_interfaces():
            pong = self._pong('announce', self.own_address(local=local))
            endpoint.sendto(endpoint.pack(pong), (bcast, port))
        for host in self.node.config.scheduler_hosts:   # a client or dispyscheduler beyond
            peer = (host, port)                         # our broadcasts
            endpoint.sendto(endpoint.pack(self._pong('announce', self.own_address(peer=peer))),
                            peer)
        if not self.node.config.ip_addrs:
            endpoint.multicast(endpoint.pack(self._pong('announce', self.own_address())), port)

    def _broadcast_interfaces(self):
        """(our address, its broadcast address) of the IPv4 interfaces we serve on;
        loopback never broadcasts."""
        ours = self.node.config.ip_addrs
        found = {}
        for family, addr, bcast in dispy.interface_addresses():
            if (family == socket.AF_INET and bcast and not dispy.is_loopback(addr)
                    and (not ours or addr in ours)):
                found.setdefault(bcast, addr)
        return [(addr, bcast) for bcast, addr in found.items()]


# ================================================================================
# Node side: the server
# ================================================================================

class ServiceControl:
    """Whether the node takes clients and jobs now: its daily service window
    (``--service_start/stop/end``, a ``dispy.ServiceWindow``), the operator's ``stop``
    / ``start`` on stdin, and ``--serve N``.  ``state()`` is SERVING (clients and jobs
    welcome), STOPPED (no new jobs or clients; running jobs finish) or OUT (nothing
    runs, clients are turned away, pings unanswered); NodeServer._tick applies each
    change (NodeServer._service_changed)."""

    SERVING, STOPPED, OUT = (dispy.ServiceWindow.SERVING, dispy.ServiceWindow.STOPPED,
                             dispy.ServiceWindow.OUT)

    def __init__(self, config):
        offset = float(os.environ.get('DISPY_NODE_CLOCK_OFFSET') or 0)    # tests only
        self.window = dispy.ServiceWindow(config.service_start, config.service_stop,
                                          config.service_end, offset)
        self.held = False           # the operator's "stop", until "start"
        self.serve = config.serve   # clients to serve before exiting (0: no limit)
        self.served = 0
        self.current = self.SERVING

    def state(self):
        state = self.window.state()
        if state == self.SERVING and self.held:
            return self.STOPPED
        return state

    def why(self):
        """Why the node is not serving (what clients are told)."""
        if self.held:
            return 'stopped by its operator'
        return 'out of its service hours until %s' % self.window.next_start_text()

    def window_text(self):
        window = self.window
        if window.always:
            return ''
        text = '-'.join('%02d:%02d' % (t // 60, t % 60) if t is not None else '..'
                        for t in (window.start, window.stop, window.end))
        clock = time.strftime('%H:%M:%S', time.localtime(time.time() + window.clock_offset))
        return '; window %s, node clock %s' % (text, clock)

    def session_ended(self):
        """True when --serve N clients have been served."""
        self.served += 1
        return bool(self.serve) and self.served >= self.serve


class NodeServer:
    """Sets up the computations of the client in session and runs their jobs on the
    computations' WorkerPools; the listener, the discovery endpoint and the
    SessionRouter (which client is served) are its parts.

    One lock (``self.lock``) guards the session, the job queue and the worker pools.
    ``running`` counts the CPUs in use: a job takes one when it is given to a worker
    (or to a worker being forked for it) and frees it when its result arrives.
    """

    def __init__(self, config):
        self.config = config
        self.lock = threading.RLock()
        self.instance = uuid.uuid4().hex
        self.router = SessionRouter(self)
        self.attach = self.router.attach     # where the listener hands each client
        self.queue = dispy.JobQueue()     # by priority once a job has one
        self.running = 0
        self.jobs_done = 0
        self.stopping = False
        self.quitting = False
        self.done = threading.Event()
        self.ssl_context = dispy.make_ssl_context(True, config.certfile, config.keyfile,
                                                  config.cafile)
        self.listeners = []          # NodeListener per bound address
        self.discovery = NodeDiscovery(self)
        self.admission = HandshakeAdmission(total=32, per_address=16)
        self.name = config.name or socket.gethostname()
        self.avail_fn = _avail_info_function(config.dest_path_prefix)
        self.store = ResultStore(config.dest_path_prefix)
        self.pools = set()           # WorkerPool of every computation whose host runs
        self.hosts_done = threading.Condition(self.lock)
        self.receivers = {}          # NodeComputation -> FileReceiver of its folder
        self.live = dispy.LiveOutputRelay()     # streamed jobs' lines, on to the client
        self.loop = dispy.IOLoop('dispynode-io')     # client connections, worker links
        self.threads = dispy.WorkerThreads(dispy.POOL_THREADS, 'dispynode-work')
        self.service = ServiceControl(config)
        self.stop_after_session = False     # a client's cluster.shutdown() (--client_shutdown)
        self.announced_at = 0.0

    def loop_connection(self, channel, handler, name):
        """An authenticated client channel served by the node's I/O loop; bytes the
        handshake read past its first frame are handed over with it."""
        conn = dispy.LoopConnection(channel, handler, name, self.loop, self.threads,
                                    channel.take_buffered())
        conn.compact = fold_started
        return conn

    @property
    def session(self):
        """The client program served now (the router's)."""
        return self.router.session

    # -- startup ---------------------------------------------------------------------------
    def bind(self):
        """A listener and a discovery socket on each address (``-i``), on the same port;
        on all interfaces (IPv4, and IPv6 where the host has it) without ``-i``."""
        for addr in self.config.ip_addrs or ['']:
            try:
                listener = NodeListener(self, addr, self.config.port, self.admission)
            except OSError as exc:
                self._cannot_listen(addr, exc)
            self.listeners.append(listener)
            self.config.port = listener.port        # port 0: every socket takes this one
            try:
                self._bind_discovery(addr)
            except OSError as exc:
                self._cannot_listen(addr, exc)
        if not self.config.ip_addrs:
            self._bind_any_v6()

    def _bind_discovery(self, addr):
        """The UDP port, ours alone; shared only with a dispynetrelay that took it
        before us (it gives it up at once; the TCP listener, bound first, keeps a
        second node away)."""
        try:
            self.discovery.bind(addr, self.config.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            self.discovery.bind(addr, self.config.port, reuse=True)

    def _cannot_listen(self, addr, exc):
        self.shutdown_network()
        owner = ''
        if exc.errno == errno.EADDRINUSE:
            owner = _port_owner(self.config.port) or 'another program (not found: it may be '\
                'another user\'s)'
            owner = ' (by %s)' % owner
        raise SystemExit('dispynode: cannot listen on %s:%s: %s%s'
                         % (addr or '*', self.config.port, exc.strerror, owner))

    def _bind_any_v6(self):
        """All interfaces: serve IPv6 clients too (pinged by multicast), if the host
        has IPv6."""
        if not socket.has_ipv6:
            return
        try:
            listener = NodeListener(self, '::', self.config.port, self.admission, v6only=True)
        except OSError as exc:
            logger.info('no IPv6 service: %s', exc)
            return
        if self.discovery.bind_any_v6(self.config.port) is None:
            listener.close()
            return
        self.listeners.append(listener)

    def shutdown_network(self):
        """Closes the listeners and the discovery sockets."""
        for listener in self.listeners:
            listener.close()
        self.discovery.close()
        if self.discovery._relay_sock is not None:
            self.discovery._relay_sock.close()

    def addresses(self):
        """Addresses to show and announce."""
        if self.config.ip_addrs:
            return list(self.config.ip_addrs)
        found = [a for f, a, _ in dispy.interface_addresses()
                 if f == socket.AF_INET and not dispy.is_loopback(a)]
        return found or ['0.0.0.0']

    def start(self):
        threads = [(listener.serve_forever, 'listen') for listener in self.listeners]
        threads += [(self.discovery.serve_forever, 'udp'), (self._manager_loop, 'manager')]
        for target, name in threads:
            threading.Thread(target=target, daemon=True, name='dispynode-' + name).start()
        with self.lock:
            self.service.current = self.service.state()
            if self.service.current != ServiceControl.SERVING:
                logger.info('dispynode %s: %s', self.name, self.service.why())
        self._announce()

    def _announce(self):
        """Tells clients we are here (broadcast, and --scheduler_host) unless out of
        service; again every --ping_interval while no client is served."""
        self.announced_at = time.monotonic()
        if self.service.current == ServiceControl.SERVING and not self.quitting:
            self.discovery.announce()

    def _node_info(self, held, computations):
        return Msg.NODE({'name': self.name, 'cpus': self.config.cpus,
                         'platform': platform.platform(), 'instance': self.instance,
                         'jobs': held, 'computations': computations,
                         'avail': self.avail_fn(),
                         'accepting': self.service.current == ServiceControl.SERVING})

    # -- client messages (lock held) ---------------------------------------------------------
    def _on_compute(self, session, msg):
        ckey, spec = msg
        comp = session.comps.get(ckey)
        if comp is not None and comp.state == 'files' and isinstance(spec, dict):
            # Offered again after a dropped connection that may have lost some of its
            # files: start over.
            session.comps.pop(ckey)
            self._close_computation(session, comp)
            comp = None
        if comp is not None:
            # The client lost track of it (it thought this node dead): answer again.
            if comp.state in ('ready', 'failed') and session.conn is not None:
                session.conn.send(Msg.SETUP(ckey, comp.state == 'ready',
                                            None if comp.state == 'ready'
                                            else 'setup failed earlier'))
            return
        if not isinstance(spec, dict):
            return
        prefix = self.config.dest_path_prefix
        if spec.get('dest_path'):
            try:
                directory = os.path.join(prefix, _safe_relative(spec['dest_path']))
            except ValueError as exc:
                logger.warning('client %s: %s', session.address, exc)
                session.conn.send(Msg.SETUP(ckey, False, str(exc)))
                return
        else:
            directory = tempfile.mkdtemp(prefix='%s_' % re.sub(r'[^\w.-]', '_', spec['name']),
                                         dir=prefix)
        os.makedirs(directory, exist_ok=True)
        if self.config.force_cleanup:
            spec['remove_files'] = True      # whatever the client's cleanup=False says
        try:
            comp = NodeComputation(ckey, spec, directory)
            for name in comp.missing_files:
                dispy.FileReceiver.plain_name(name)
        except Exception as exc:    # a malformed spec leaves nothing behind
            shutil.rmtree(directory, ignore_errors=True)
            logger.warning('client %s: computation refused: %s', session.address, exc)
            session.conn.send(Msg.SETUP(ckey, False, 'refused: %s' % exc))
            return
        session.comps[ckey] = comp
        if not comp.missing_files:
            self._start_host(session, comp)

    def _on_file(self, session, msg):
        """A chunk of one of a computation's files; the last one lets its setup start."""
        ckey, name, mode, offset, data, last = msg
        comp = session.comps.get(ckey)
        if comp is None or comp.state != 'files':
            return
        receiver = self._receiver(comp)
        try:
            if dispy.FileReceiver.plain_name(name) not in comp.missing_files:
                raise ValueError('not a file of this computation')
            receiver.chunk(name, mode, offset, data, last)
        except (ValueError, OSError) as exc:
            logger.warning('client %s: file %r refused: %s', session.address, name, exc)
            comp.state = 'failed'
            receiver.close()        # its other files are of no use now
            session.conn.send(Msg.SETUP(ckey, False, 'file %r refused: %s' % (name, exc)))
            return
        if last:
            comp.missing_files.discard(name)
            if not comp.missing_files:
                self._start_host(session, comp)

    def _receiver(self, comp):
        """The FileReceiver of a computation's folder, made with its first file."""
        receiver = self.receivers.get(comp)
        if receiver is None:
            receiver = self.receivers[comp] = dispy.FileReceiver(comp.dir,
                                                                 self.config.max_file_size)
        return receiver

    def _expire_files(self):
        """Partial files whose sender went quiet are dropped (FileReceiver.expire;
        lock held)."""
        now = time.monotonic()
        session = self.session
        for comp, receiver in list(self.receivers.items()):
            for name in receiver.expire(now):
                logger.warning('file %r of %s dropped: no chunk of it for %.0f s', name,
                               comp.spec.get('name'), receiver.stall_timeout)
                if comp.state == 'files':   # it cannot be set up without that file
                    comp.state = 'failed'
                    if session is not None and session.conn is not None:
                        session.conn.send(Msg.SETUP(comp.key, False,
                                                    'file %r stopped arriving' % name))

    def _start_host(self, session, comp):
        comp.state = 'setup'
        spec = dict(comp.spec, dir=comp.dir, node_name=self.name,
                    max_file_size=self.config.max_file_size,
                    node_ip=(self.config.ext_ip_addrs or self.addresses())[0])
        comp.pool = WorkerPool(self, session, comp)
        try:
            comp.pool.start(spec)
        except OSError as exc:
            logger.error('cannot start a process for %s: %s', spec['name'], exc)
            comp.state = 'failed'
            if session.conn is not None:
                session.conn.send(Msg.SETUP(comp.key, False, 'node cannot start processes: '
                                            '%s' % exc))
            return
        self.pools.add(comp.pool)

    def _on_job(self, session, msg):
        key, ckey, attempt, blob, options = msg
        try:
            blob = dispy.checked_blob(blob)
            options = dispy.checked_job_options(options)
        except ValueError as exc:
            self._finish(session, None, Msg.result(key, attempt, DispyJob.Terminated,
                                                   'Terminated: %s' % exc))
            return
        if self.quitting:
            self._finish(session, None, Msg.result(key, attempt, DispyJob.Cancelled,
                                                   'Cancelled: node is shutting down'))
            return
        if self.service.current != ServiceControl.SERVING:
            session.conn.send(Msg.RECALLED(key, attempt, True))   # the client runs it elsewhere
            return
        timeout = float(options['timeout']) if options and options.get('timeout') else None
        comp = session.comps.get(ckey)
        if comp is None or comp.state != 'ready':
            self._finish(session, None, Msg.result(
                key, attempt, DispyJob.Cancelled,
                'Cancelled: computation is not set up on this node'))
            return
        old = session.jobs.get(key)
        if old is not None:          # a resubmission supersedes an older attempt
            self._cancel_job(session, old)
        priority = options.get('priority', 0) if options else 0
        job = session.jobs[key] = NodeJob(key, attempt, comp, blob, timeout, priority)
        job.depends = options.get('depends') if options else None
        self.queue.append(job, priority)
        self._pump()

    def _on_recall(self, session, msg):
        """The client would rather run a queued job elsewhere: given back if it has
        not started (else it runs here, and its STARTED is on the way); answered
        either way, so the client knows."""
        job = session.jobs.get(msg.key)
        given = False
        if job is not None and job.attempt == msg.attempt and job.worker is None:
            try:
                self.queue.remove(job)      # not if it holds a CPU, waiting for a worker
                given = True
            except ValueError:
                pass
        if given:
            del session.jobs[job.key]
        session.conn.send(Msg.RECALLED(msg.key, msg.attempt, given))

    def _on_cancel(self, session, msg):
        key, attempt = msg
        job = session.jobs.get(key)
        if job is not None and job.attempt == attempt:
            self._cancel_job(session, job)

    def _on_put_file(self, session, msg):
        """cluster.send_file: a file for a computation that is already set up."""
        ckey, name, mode, offset, data, last = msg
        comp = session.comps.get(ckey)
        error = None
        try:
            if comp is None or comp.state != 'ready':
                raise ValueError('computation is not set up here')
            self._receiver(comp).chunk(name, mode, offset, data, last)
        except (ValueError, OSError) as exc:
            error = str(exc)
            logger.warning('client %s: file %r refused: %s', session.address, name, exc)
        if (last or error) and session.conn is not None:
            session.conn.send(Msg.PUT_FILE_DONE(ckey, name, error))

    def _on_set_cpus(self, session, msg):
        comp = session.comps.get(msg.cluster)
        if comp is not None:
            comp.cpus = max(0, min(int(msg.cpus), self.config.cpus))
            self._pump()

    def _on_ack(self, session, msg):
        for key in acked_jobs(msg):
            session.results.pop(key, None)
            if key in session.stored:
                session.stored.discard(key)
                self.store.remove(session.client_id, *key)

    def _on_close_compute(self, session, msg):
        comp = session.comps.pop(msg.cluster, None)
        if comp is not None:
            self._close_computation(session, comp)
        if session.conn is not None:
            session.conn.send(Msg.CLOSED(msg.cluster))

    def _on_release(self, session, msg):
        if session.wanted is not None:      # recover_jobs is done: other jobs go on
            self.router.detach(session, 'recovery done')
            return
        logger.info('client %s released this node', session.address)
        self.router.end_session(session)

    def _on_pulse(self, session, msg):
        pass

    def _on_shutdown(self, session, msg):
        """4.15's cluster.shutdown(): this node stops once the client is done here."""
        if self.config.client_shutdown:
            logger.info('client %s asked this node to stop after it', session.address)
            self.stop_after_session = True
        else:
            logger.warning('client %s asked this node to stop: refused (start it with '
                           '--client_shutdown to allow that)', session.address)

    handlers = {'COMPUTE': _on_compute, 'FILE': _on_file, 'JOB': _on_job,
                'PUT_FILE': _on_put_file, 'SET_CPUS': _on_set_cpus,
                'CANCEL': _on_cancel, 'ACK': _on_ack, 'CLOSE_COMPUTE': _on_close_compute,
                'RELEASE': _on_release, 'PULSE': _on_pulse, 'RECALL': _on_recall,
                'SHUTDOWN': _on_shutdown}

    # -- running jobs (lock held) --------------------------------------------------------------
    def _pump(self):
        """Gives queued jobs to workers while CPUs are free: at most ``cpus`` jobs of
        the node at once, and at most the CPUs its client gave each computation."""
        skipped = []
        while self.queue and self.running < self.config.cpus and not self.stopping:
            job = self.queue.popleft()
            comp = job.comp
            if job.cancelled:
                continue
            if comp.state != 'ready':
                self._end_unrunnable(job)
                continue
            if comp.running >= comp.cpus:
                skipped.append(job)     # its computation is at its share: keep its place
                continue
            self._take_cpu(comp)
            worker = comp.pool.take_worker(job)
            if worker is not None:
                self._start_job(job, worker)
        for job in reversed(skipped):
            self.queue.appendleft(job, job.priority)

    def _end_unrunnable(self, job):
        session = self.session
        if session is not None and session.jobs.get(job.key) is job:
            self._finish(session, job, Msg.result(
                job.key, job.attempt, DispyJob.Terminated, 'Terminated: the computation '
                'ended on this node (its setup process died)'))

    def _take_cpu(self, comp):
        self.running += 1
        comp.running += 1

    def _release_cpu(self, comp):
        self.running -= 1
        comp.running -= 1

    def _start_job(self, job, worker):
        job.worker = worker
        worker.job = job
        job.start_time = time.time()
        extra = None
        if job.depends:
            extra = job.depends
            try:
                job.files = self._write_job_files(job.comp, extra.pop('files', ()))
            except (ValueError, OSError) as exc:
                extra = dict(extra, code='raise RuntimeError(%r)' % (
                    'dispy_job_depends refused: %s' % exc), objects=None, modules=[])
        run = ('run', job.key, job.attempt, job.blob, extra)
        if dispy.blob_size(job.blob) > dispy.BIG_FRAME:
            self.threads.submit(self._send_run, worker, run)   # a big copy: off the lock
        else:
            self._send_run(worker, run)
        job.blob = job.depends = None
        session = self.session
        if session is not None and session.conn is not None:    # may share a later frame
            session.conn.send(Msg.STARTED(job.key, job.attempt, job.start_time), hold=True)

    @staticmethod
    def _send_run(worker, run):
        try:
            worker.link.send(run)
        except OSError:
            pass        # the worker died: its reader reports the job (_on_worker_lost)

    def _write_job_files(self, comp, files):
        """A job's dispy_job_depends files, whole, in its computation's folder; all or
        none of them."""
        receiver = self._receiver(comp)
        written = []
        try:
            for name, mode, data in files:
                try:
                    written.append(receiver.whole(name, mode, data))
                except dispy.PathRefused:
                    raise
                except dispy.FileRefused as exc:      # the text names the file
                    raise ValueError('%s: %s' % (name, exc))
        except (ValueError, OSError):
            for path in written:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        return written

    def _cancel_job(self, session, job):
        job.cancelled = True
        if job.worker is not None:       # running: kill it with every process it started
            job.worker.kill()
            return
        comp = job.comp
        if comp.pool is not None and comp.pool.drop_waiting(job):
            self._release_cpu(comp)
        self._finish(session, job, Msg.result(job.key, job.attempt, DispyJob.Cancelled,
                                              'Cancelled'))
        self._pump()

    def _finish(self, session, job, reply):
        """Records a job's result (kept until the client acknowledges it) and sends it."""
        if job is not None and session.jobs.get(job.key) is job:
            del session.jobs[job.key]
        if job is not None and job.files:     # dispy_job_depends go with the job
            for path in job.files:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            job.files = ()
        result = Msg.RESULT.read(reply)
        conn = session.conn
        if result.blob is not None and conn is not None and \
                dispy.blob_size(result.blob) > conn.channel.peer_max_frame - 65536:
            reply = Msg.RESULT.replace(
                reply, status=DispyJob.Terminated, blob=None, exception=(
                    'result of %d bytes exceeds the client\'s frame limit of %d '
                    '(max_frame_size); send big data with dispy_send_file'
                    % (dispy.blob_size(result.blob), conn.channel.peer_max_frame)))
        key = (result.key, result.attempt)
        session.results[key] = reply
        self.jobs_done += 1
        if conn is not None and session.wants(result.key):
            conn.send(reply, hold=bool(session.jobs))   # more results are coming: share frames
        elif self.store.save(session.client_id, reply):  # client away (or another
            session.stored.add(key)                      # recover file's job): keep on disk
        if conn is None and not session.jobs:
            session.idle_since = time.monotonic()

    # -- what a WorkerPool reports (lock held) ---------------------------------------------
    def _on_worker_message(self, comp, worker, msg):
        session = self.session
        kind = msg[0]
        if kind == 'result':
            job = comp.pool.job_done(worker)
            self._release_cpu(comp)
            if self.live.lost and job is not None:     # its live lines, then its result
                self._live_output_ended(session, job)
            if session is not None and job is not None and session.jobs.get(job.key) is job:
                reply = Msg.RESULT(*msg[1:])
                if job.cancelled:
                    reply = Msg.RESULT.replace(reply, status=DispyJob.Cancelled)
                self._finish(session, job, reply)
            self._pump()
        elif kind == 'provisional' and session is not None and session.conn is not None:
            session.conn.send(Msg.PROVISIONAL(*msg[1:]))
        elif kind == 'send_file' and session is not None and session.conn is not None:
            session.conn.send(Msg.SEND_FILE(*msg[1:]))
        elif kind == 'output':
            self._live_output(session, worker.job, msg)

    # Live output (stream_output): what a worker sends of its job's lines goes on to the
    # client in session, but not to a recover_jobs connection (it collects results).
    def _live_output(self, session, job, msg):
        _, key, attempt, chunks = msg
        if job is None or (job.key, job.attempt) != (key, attempt):
            return
        conn = self._live_conn(session)
        for stream, text, dropped in chunks:
            self.live.pass_on(conn, key, attempt, stream, text, dropped)

    def _live_output_ended(self, session, job):
        self.live.job_ended(self._live_conn(session), job.key, job.attempt)

    @staticmethod
    def _live_conn(session):
        return session.conn if session is not None and session.wanted is None else None

    def _on_worker_lost(self, comp, job, pid, how):
        """The worker running ``job`` ended without its result (killed, crashed)."""
        self._release_cpu(comp)
        if self.live.lost:
            self._live_output_ended(self.session, job)
        session = self.session
        if session is not None and session.jobs.get(job.key) is job:
            if job.timed_out:
                status = DispyJob.Terminated
                text = 'Terminated: the job ran past its timeout of %s s' % job.timeout
            elif job.cancelled:
                status, text = DispyJob.Cancelled, 'Cancelled'
            else:
                status = DispyJob.Terminated
                text = 'job process %s %s' % (pid, how or 'died')
            self._finish(session, job, Msg.result(job.key, job.attempt, status, text,
                                                  start_time=job.start_time))
        self._pump()

    def _on_host_message(self, session, comp, msg):
        if msg[0] == 'setup':
            _, ok, error = msg
            if comp.state != 'setup':
                return
            comp.state = 'ready' if ok else 'failed'
            if not ok:
                logger.warning('setup of %s failed: %s', comp.spec['name'], error)
                self._setup_done(session, comp, ok, error)
            else:   # told once its workers are forked: its first jobs find them warm
                comp.pool.start_workers(lambda: self._setup_done(session, comp, ok, error))
        elif msg[0] == 'cleaned' and msg[1]:
            logger.warning('cleanup of %s failed: %s', comp.spec['name'], msg[1])

    def _setup_done(self, session, comp, ok, error):
        if session.comps.get(comp.key) is not comp or comp.state != ('ready' if ok else
                                                                     'failed'):
            return      # closed meanwhile
        if session.conn is not None:
            session.conn.send(Msg.SETUP(comp.key, ok, error))
        self._pump()

    def _on_host_ended(self, session, comp):
        """The computation's host has exited: whether its files can go now."""
        if comp.state in ('files', 'setup', 'ready'):
            logger.warning('computation %s: its host process ended', comp.spec['name'])
            comp.state = 'failed'
            for job in comp.pool.take_waiting():
                self._release_cpu(comp)
                self._end_unrunnable(job)
            if session.conn is not None and self.session is session:
                session.conn.send(Msg.SETUP(comp.key, False, 'its setup process ended'))
            self._pump()
        self.pools.discard(comp.pool)
        self.hosts_done.notify_all()
        return comp.state == 'closing'

    # -- closing ----------------------------------------------------------------------------------
    def _close_computation(self, session, comp):
        """Ends a computation: its jobs are killed, its cleanup runs, its files go."""
        comp.state = 'closing'
        receiver = self.receivers.pop(comp, None)
        if receiver is not None:        # a file still arriving: its partial copy goes
            receiver.close()
        if any(other.dir == comp.dir for other in session.comps.values() if other is not comp):
            # Another live computation shares this dest_path (as the docs suggest for
            # clusters using the same files): its files stay.
            comp.spec['remove_files'] = False
        if comp.spec.get('remove_files', True):
            # Out of the way at once, so a new computation with the same dest_path
            # (resetup_node) never sees these files removed under it; the host keeps
            # running its cleanup in the renamed folder.
            closing = '%s.closing-%s' % (comp.dir, uuid.uuid4().hex[:8])
            try:
                os.rename(comp.dir, closing)
                comp.dir = closing
            except OSError:
                pass
        for job in [j for j in session.jobs.values() if j.comp is comp]:
            self._cancel_job(session, job)
        if comp.ended:          # no host (or it died): nothing runs cleanup
            self._remove_files(comp)
            return
        comp.pool.close()

    @staticmethod
    def _remove_files(comp):
        if comp.spec.get('remove_files', True):
            shutil.rmtree(comp.dir, ignore_errors=True)

    # -- timers -----------------------------------------------------------------------------------
    def _manager_loop(self):
        while not self.done.wait(0.2):
            with self.lock:
                self._tick()
                self._expire_files()

    def _tick(self):
        session = self.session
        if session is not None:
            self._kill_overdue(session)
        now = time.monotonic()
        self.router.tick(now)
        state = self.service.state()
        if state != self.service.current:
            self._service_changed(state)
        if (self.config.ping_interval and self.session is None
                and now - self.announced_at >= self.config.ping_interval):
            self._announce()
        if self.quitting and not self.queue and self.running == 0:
            self.done.set()

    # -- service: the window, the operator's commands (lock held) ---------------------------
    def _service_changed(self, state):
        old, self.service.current = self.service.current, state
        logger.info('dispynode %s: %s → %s%s', self.name, old, state,
                    '' if state == ServiceControl.SERVING else ' (%s)' % self.service.why())
        session = self.session
        if state == ServiceControl.OUT:
            if session is not None:
                self._tell_service(session)     # first: the client stops sending jobs
                self._leave(session, self.service.why())
            return
        self._tell_service(session)         # first: the client stops sending jobs
        if state == ServiceControl.STOPPED and session is not None:
            self._give_back_queued(session, self.service.why())
        if state == ServiceControl.SERVING:
            self._pump()
            self.discovery.announce(to_waiting=True)
            self._announce()

    def _tell_service(self, session):
        if session is not None and session.conn is not None:
            session.conn.send(Msg.SERVICE(self.service.current == ServiceControl.SERVING,
                                          self.config.cpus, self.service.why()))

    def _give_back_queued(self, session, reason):
        """Jobs queued here, not started: handed back for the client to run elsewhere
        (a client that is away gets them Cancelled, kept for recover_jobs)."""
        for job in [j for j in self.queue if not j.cancelled and j.worker is None]:
            self.queue.remove(job)
            if session.conn is not None:
                session.jobs.pop(job.key, None)
                session.conn.send(Msg.RECALLED(job.key, job.attempt, True))
            else:
                self._finish(session, job, Msg.result(
                    job.key, job.attempt, DispyJob.Cancelled, 'Cancelled: node %s is not '
                    'serving (%s)' % (self.name, reason)))

    def _leave(self, session, reason):
        """The client sees the node go as if it had died (out of service, or released
        by the operator): queued jobs are handed back (the unasked RECALLED pauses the
        node at the client), running ones killed (a reentrant cluster runs them
        elsewhere); results are kept on disk for recover_jobs."""
        self._give_back_queued(session, reason)
        conn, session.conn = session.conn, None
        if conn is not None:
            conn.close('node %s' % reason, flush=True)
        for job in session.jobs.values():
            job.cancelled = True            # all marked first: no queued job starts now
        self.router.end_session(session)    # kills them; their results go to disk
        self.router.store_results(session)

    def set_cpus(self, cpus):
        """The operator's ``cpus N`` (negative: leave that many free)."""
        total = os.cpu_count() or 1
        with self.lock:
            old, self.config.cpus = self.config.cpus, max(1, min(total, cpus if cpus > 0
                                                                 else total + cpus))
            for comp in (self.session.comps.values() if self.session else ()):
                # a computation given all CPUs gets all the new ones, others at most them
                comp.cpus = (self.config.cpus if comp.cpus >= old
                             else min(comp.cpus, self.config.cpus))
            self._tell_service(self.session)
            self._pump()
            return self.config.cpus

    def hold(self, held):
        """The operator's ``stop`` (no new jobs) and ``start``."""
        with self.lock:
            self.service.held = held
            if not held:
                self.router.released.clear()
            self._tick()

    def release(self):
        """The operator's ``release``: the client served now sees the node go (as at
        the end of a service window) and is turned away until ``start``."""
        with self.lock:
            session = self.session
            if session is None:
                return None
            self.router.released.add(session.client_id)
            self._leave(session, 'released by its operator')
            return session.address

    def _kill_overdue(self, session):
        now = time.time()
        for job in session.jobs.values():
            if (job.timeout and job.worker is not None and not job.cancelled
                    and now - job.start_time > job.timeout):
                logger.info('job %s ran past its timeout of %s s: killed', job.key, job.timeout)
                job.timed_out = True
                self._cancel_job(session, job)

    # -- shutdown ---------------------------------------------------------------------------------
    def shutdown(self, grace=5.0):
        """Kills running jobs, lets each computation run its cleanup (bounded), closes."""
        with self.lock:
            self.stopping = True
            session = self.session
            if session is not None:
                for job in list(session.jobs.values()):
                    self._cancel_job(session, job)
                self.router.end_session(session)
            self.hosts_done.wait_for(lambda: not self.pools, grace)
            for pool in list(self.pools):       # still in cleanup after the grace time
                pool.kill()
            self.router.close_recoveries('node stopping')
        self.shutdown_network()

    def status_text(self):
        with self.lock:
            lines = ['dispynode %s: %d CPUs, %d running, %d queued, %d done'
                     % (self.name, self.config.cpus, self.running, len(self.queue),
                        self.jobs_done)]
            session = self.session
            if session is None:
                lines.append('  no client')
            else:
                lines.append('  client %s%s: %d job(s) pending, %d result(s) unacknowledged'
                             % (session.describe(), '' if session.conn else ' (disconnected)',
                                len(session.jobs), len(session.results)))
            lines.append('  service: %s%s%s' % (
                self.service.current, '' if self.service.current == ServiceControl.SERVING
                else ' (%s)' % self.service.why(), self.service.window_text()))
            return '\n'.join(lines)


def _port_owner(port):
    """'pid N: its command line' of the process listening on TCP ``port`` or bound
    to UDP ``port`` (Linux /proc: the socket's inode, then the process holding it),
    or None."""
    inodes = set()
    for table in ('tcp', 'tcp6', 'udp', 'udp6'):
        try:
            with open('/proc/net/' + table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            listening = fields[3] == '0A' if table.startswith('tcp') else True  # 0A: LISTEN
            if len(fields) > 9 and listening and int(fields[1].rsplit(':', 1)[1], 16) == port:
                inodes.add('socket:[%s]' % fields[9])
    for pid in (p for p in os.listdir('/proc') if p.isdigit()) if inodes else ():
        try:
            fds = os.listdir('/proc/%s/fd' % pid)
            if not any(os.readlink('/proc/%s/fd/%s' % (pid, fd)) in inodes for fd in fds):
                continue
            with open('/proc/%s/cmdline' % pid, 'rb') as f:
                argv = f.read().decode(errors='replace').split('\0')
            return 'pid %s: %s' % (pid, ' '.join(_without_secrets(argv)).strip()[:200])
        except OSError:
            continue
    return None


def _without_secrets(argv):
    """A command line to show (in an error, or --check's report): the values of its
    secret options (-s, --secret, --admin_secret, --node_secret, ...) hidden."""
    shown, hide_next = [], False
    for arg in argv:
        if hide_next:
            shown.append('***')
            hide_next = False
        elif arg == '-s' or (arg.startswith('--') and arg.split('=')[0].endswith('secret')):
            shown.append(arg.split('=')[0] + ('=***' if '=' in arg else ''))
            hide_next = '=' not in arg
        elif arg.startswith('-s') and len(arg) > 2 and not arg.startswith('--'):
            shown.append('-s***')
        else:
            shown.append(arg)
    return shown


def _avail_info_function(path):
    """A function returning (cpu %, memory, disk, swap %) with psutil, else None."""
    try:
        import psutil
    except ImportError:
        def no_info():
            return None
        no_info.psutil = False
        return no_info

    def avail():
        try:
            return (100.0 - psutil.cpu_percent(), psutil.virtual_memory().available,
                    psutil.disk_usage(path).free, psutil.swap_memory().percent)
        except Exception:
            return None
    avail.psutil = True
    return avail


# ================================================================================
# Command line
# ================================================================================

def build_parser():
    parser = dispy.ProgramArgumentParser(
        prog='dispynode.py', description='Run jobs for dispy clients on this machine.',
        epilog='Without --daemon, commands are read on stdin (help lists them). Every '
               'option of dispynode 4.15 is accepted; --save_config writes the options to '
               'a file that --config reads back.')
    add = parser.add_argument
    add('-c', '--cpus', type=int, default=0,
        help='CPUs to use (default 0: all; negative: leave that many free)')
    add('-i', '--ip_addr', '--host', dest='ip_addrs', action='append', default=[],
        help='address or host name to serve on (repeatable; default all interfaces)')
    add('--ext_ip_addr', '--ext_host', dest='ext_ip_addrs', action='append', default=[],
        help='address to advertise to clients (behind NAT: the forwarding address)')
    add('-p', '--node_port', '--port', dest='port', type=int, default=None,
        help='UDP and TCP port (default %d; 0 = any free port)' % dispy.NODE_PORT)
    add('--dispy_port', type=int, default=None,
        help='4.15\'s base port P: clients announce on P and this node serves on P + 1 '
        '(unless -p says otherwise)')
    add('--client_port', type=int, default=None,
        help='clients\' port for announcements (default %d)' % dispy.CLIENT_PORT)
    add('--ext_port', type=int, default=0, help='port to advertise, if forwarded to another one')
    add('--name', default='', help='name of this node (default host name)')
    add('--dest_path_prefix', default=os.path.join(tempfile.gettempdir(), 'dispy', 'node'),
        help='folder for computations\' files (default %(default)s)')
    add('--max_file_size', type=dispy.parse_size, default=10 << 20,
        help='largest file accepted or sent, with k/m/g suffix (default 10m; 0 = unlimited)')
    add('--max_frame_size', type=dispy.parse_size, default=dispy.DEFAULT_MAX_FRAME,
        help='largest message accepted from an authenticated client (default 256m)')
    add('-s', '--secret', default='', help='shared secret clients must know (visible in '
        '"ps": --secret_file keeps it out)')
    add('--secret_file', help='read the secret from the first line of this file')
    add('--certfile', help='TLS certificate (may hold the key too)')
    add('--keyfile', help='TLS private key, if not in --certfile')
    add('--cafile', help='CA certificates to verify clients against (default: the '
        '--certfile itself)')
    add('--zombie_interval', type=float, default=60.0,
        help='minutes to keep serving a vanished client before freeing this node '
        '(fractions allowed; default %(default)s)')
    add('--msg_timeout', type=float, default=dispy.MsgTimeout,
        help='seconds a client\'s handshake may take (default %(default)s)')
    add('--ping_interval', type=float, default=0,
        help='announce this node again every so many seconds while it has no client '
        '(default: only at start and when it becomes free)')
    add('--scheduler_host', '--scheduler_node', dest='scheduler_hosts', action='append',
        default=[], help='a client or dispyscheduler host to announce this node to (beyond '
        'broadcast: another network); repeatable')
    add('--serve', type=int, default=0,
        help='exit after serving this many clients (0: never; 1 for a container loop)')
    dispy.add_service_window_options(add, 'jobs', 'clients')
    add('--client_shutdown', action='store_true',
        help='a client may stop this node (cluster.shutdown())')
    add('--force_cleanup', action='store_true',
        help='remove clients\' files at the end even if they asked cleanup=False')
    add('--init', metavar='FILE',
        help='Python file whose init() runs when the node starts and close() when it stops')
    add('--admin_secret', default='',
        help='accepted (4.15); reserved: there is no admin program yet')
    add('--unsafe_setup', action='store_true',
        help='accepted (4.15); no effect: setup always runs in a process of its own here')
    add('--ipv4_udp_multicast', action='store_true',
        help='accepted (4.15); IPv4 discovery uses broadcast')
    dispy.add_config_options(add)
    add('-d', '--debug', action='store_true', help='log debug messages')
    add('--daemon', action='store_true', help='do not read commands on stdin')
    add('--clean', action='store_true',
        help='remove everything under --dest_path_prefix at start (after a crash)')
    add('--check', action='store_true',
        help='check these options (addresses, ports, secret, TLS files, folder, processes), '
        'print what is wrong and how to fix it, and exit (0: all good) without serving')
    return parser


def configure(argv=None):
    config = dispy.parse_program_args(build_parser(), argv, 'dispynode',
                                      [('secret_file', 'secret')])
    if config.port is None:
        config.port = (config.dispy_port + 1 if config.dispy_port is not None
                       else dispy.NODE_PORT)
    if config.client_port is None:
        config.client_port = (config.dispy_port if config.dispy_port is not None
                              else dispy.CLIENT_PORT)
    for name in ('port', 'client_port', 'ext_port'):
        if not 0 <= getattr(config, name) < 65536:
            dispy.exit_usage('dispynode', '--%s must be a port number' % name)
    if config.serve < 0:
        dispy.exit_usage('dispynode', '--serve must be 0 (no limit) or more')
    if config.msg_timeout <= 0 or config.ping_interval < 0:
        dispy.exit_usage('dispynode', '--msg_timeout must be positive, --ping_interval 0 '
                         'or more')
    total = os.cpu_count() or 1
    if config.cpus <= 0:
        config.cpus = max(1, total + config.cpus)
    config.scheduler_hosts = [dispy.resolve_or_exit(h, 'dispynode')
                              for h in config.scheduler_hosts]
    dispy.check_service_window(config, 'dispynode')
    return dispy.finish_program_config(config, 'dispynode')


def _host_target():
    """What the fork server's child runs for a computation host: this file's
    ``host_main`` as the module ``dispynode``, imported once by the fork server, when
    that module is this very file (dispynode.py beside dispy.py: the fork server
    starts in dispy.py's folder); else ``host_main`` as it is here, and the child runs
    the main script again (multiprocessing's way, 15-20 ms a host)."""
    here = os.path.realpath(__file__)
    if (os.path.basename(here) != 'dispynode.py'
            or os.path.dirname(here) != os.path.dirname(os.path.realpath(dispy.__file__))):
        return host_main
    try:
        module = sys.modules.get('dispynode') or importlib.import_module('dispynode')
    except ImportError:
        return host_main
    if os.path.realpath(module.__file__) != here:
        return host_main
    return module.host_main


HOST_TARGET = host_main     # set when the fork server starts (_start_forkserver)


def _start_forkserver():
    """Starts multiprocessing's fork server now, while this process has one thread
    (computation hosts are forked from it, never from the node), with dispy imported
    (started in dispy.py's folder, it finds dispy there), and this file too where
    ``_host_target`` can use it.

    A fork server's child runs the parent's main script again (15-20 ms of compiling
    2,300 lines, a third of a new cluster's time to its first result) unless the main
    module has a spec named ``__main__`` (multiprocessing.spawn._fixup_main_from_name);
    so, when hosts start as ``dispynode.host_main``, the script gets one.  (Preloading
    ``'__main__'`` does not help: the fork server is never told the main path.)"""
    global HOST_TARGET
    HOST_TARGET = _host_target()
    preload = ['dispy']
    if HOST_TARGET.__module__ == 'dispynode':
        preload.append('dispynode')
        main = sys.modules.get('__main__')
        if getattr(main, '__file__', None) and getattr(main, '__spec__', 1) is None and \
                os.path.realpath(main.__file__) == os.path.realpath(__file__):
            main.__spec__ = importlib.machinery.ModuleSpec('__main__', None)
    multiprocessing.set_forkserver_preload(preload)
    here = os.getcwd()
    os.chdir(os.path.dirname(os.path.abspath(dispy.__file__)))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.chdir(here)


def check(config):
    """``dispynode.py --check``: the doctor's checks of these options (dispy's
    ``program_checks``) and of the fork server; nothing is served.  The exit status."""
    doctor = dispy.Doctor('dispynode --check')
    doctor.add_all(dispy.program_checks(config, _port_owner))
    doctor.add(_check_processes())
    return doctor.finish()


def _check_processes(timeout=30.0):
    """The fork server starts and starts a process, as every computation host needs."""
    name = 'processes'
    try:
        _start_forkserver()
        proc = FORKSERVER.Process(target=os.getpid, name='dispynode-check', daemon=True)
        proc.start()
        proc.join(timeout)
    except Exception as exc:
        return dispy.CheckResult.fail(name, 'the fork server cannot start a process: %r' % exc,
                                      'jobs cannot run here: check that this user may start '
                                      'processes (ulimit -u) and write in %s'
                                      % tempfile.gettempdir())
    if proc.exitcode != 0:
        if proc.exitcode is None:
            proc.kill()
        return dispy.CheckResult.fail(name, 'a process of the fork server %s' % (
            'did not end in %.0f s' % timeout if proc.exitcode is None else
            _describe_exit(proc.exitcode)),
            'jobs cannot run here: run with -d, and look for errors of multiprocessing')
    return dispy.CheckResult.ok(name, 'the fork server started a process')


COMMANDS = (
    ('status', 'what the node is doing'),
    ('stop', 'take no new jobs (running ones finish)'),
    ('start', 'take jobs again (and clients let go by release)'),
    ('cpus N', 'use N CPUs (negative: leave that many free)'),
    ('release', 'let the client served now go (it sees the node leave; until start)'),
    ('quit, exit', 'finish running jobs, then exit'),
    ('terminate', 'kill running jobs and exit'),
    ('help', 'this list'),
)


def run_command(server, line):
    """One stdin command; returns the text to print, or None to stop reading."""
    words = line.strip().split()
    cmd = words[0].lower() if words else ''
    if cmd == 'status':
        return server.status_text()
    if cmd in ('stop', 'start'):
        server.hold(cmd == 'stop')
        return 'dispynode: %s' % ('taking no new jobs (start to resume)' if cmd == 'stop'
                                  else 'taking jobs')
    if cmd == 'cpus':
        try:
            return 'dispynode: using %d CPUs' % server.set_cpus(int(words[1]))
        except (IndexError, ValueError):
            return 'usage: cpus N (a whole number; negative leaves that many free)'
    if cmd == 'release':
        address = server.release()
        return ('dispynode: client %s released' % address if address
                else 'dispynode: no client to release')
    if cmd in ('quit', 'exit'):
        server.quitting = True
        return None
    if cmd == 'terminate':
        server.done.set()
        return None
    if not cmd:
        return ''
    return 'commands:\n' + '\n'.join('  %-11s %s' % c for c in COMMANDS)


def _read_commands(server):
    """stdin commands; EOF (e.g. started with no terminal) just stops reading."""
    for line in sys.stdin:
        text = run_command(server, line)
        if text is None:
            print('dispynode: %s' % ('finishing running jobs, then exiting'
                                     if not server.done.is_set() else 'terminating'),
                  flush=True)
            return
        if text:
            print(text, flush=True)


def _load_init(path):
    """--init FILE: its globals (its init() is called at start, close() at the end)."""
    try:
        return runpy.run_path(path, run_name='dispynode_init')
    except Exception as exc:
        dispy.exit_usage('dispynode', '--init %s failed: %s: %s' % (path, type(exc).__name__,
                                                                   exc))


def _call_init(init, name):
    func = (init or {}).get(name)
    if not callable(func):
        return
    try:
        func()
    except Exception:
        logger.exception('--init file: %s() raised', name)
        if name == 'init':
            raise SystemExit(2)


def main(argv=None):
    config = configure(argv)
    dispy.setup_logging(dispy.logger.DEBUG if config.debug else dispy.logger.INFO,
                        name='dispynode')
    dispy.MsgTimeout = dispy.HANDSHAKE_TIMEOUT = config.msg_timeout   # its peers' answers
    if config.check:
        raise SystemExit(check(config))
    init = _load_init(config.init) if config.init else None
    if config.clean:
        dispy.empty_folder(config.dest_path_prefix)
    os.makedirs(config.dest_path_prefix, exist_ok=True)
    _start_forkserver()
    server = NodeServer(config)
    server.bind()
    if not config.secret and not all(dispy.is_loopback(a) for a in config.ip_addrs or ['*']):
        logger.warning('WARNING: no secret given (-s): anyone who can reach this node can run '
                       'code on it as this user')
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.done.set())
    _call_init(init, 'init')
    server.start()
    advertised = ''
    if config.ext_ip_addrs or config.ext_port:
        advertised = ' (advertised as %s:%s)' % ((config.ext_ip_addrs or ['its address'])[0],
                                                 config.ext_port or config.port)
    for addr in server.addresses():
        print('dispynode %s serving at %s:%s with %d CPUs%s' % (
            server.name, '[%s]' % addr if ':' in addr else addr, config.port, config.cpus,
            advertised), flush=True)
    if not config.daemon and sys.stdin is not None and not sys.stdin.closed:
        threading.Thread(target=_read_commands, args=(server,), daemon=True,
                         name='dispynode-stdin').start()
    while not server.done.wait(1.0):
        pass
    server.shutdown()
    _call_init(init, 'close')
    print('dispynode: stopped', flush=True)


if __name__ == '__main__':
    main()
