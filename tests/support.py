"""Test harness: real ``dispynode.py`` processes on loopback, real client scripts.

Every helper here is bounded in time and cleans up what it started, by PID:

    NodeProcess   -- a context manager that starts ``python dispynode.py`` on one
                     loopback address, waits for its "serving at" line and stops it
                     (SIGTERM, then SIGKILL) on exit, even when the test failed.
    SchedulerProcess -- the same for ``python dispyscheduler.py``.
    free_port     -- a TCP+UDP port that is free on a given address.
    run_client    -- runs a client script in a fresh interpreter with a timeout.
    wait_until    -- polls a predicate, bounded in time (for state owned by
                     another process, where no event can be waited on).
    close_now, stop_node, read_file, pid_alive, kill_pids, descendants,
    die_with_parent, self_signed_cert --
                     small helpers the test files share.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_SCRIPT = os.path.join(ROOT, 'dispynode.py')
SCHEDULER_SCRIPT = os.path.join(ROOT, 'dispyscheduler.py')
READY_RE = re.compile(r'serving at \[?([^\]\s]+?)\]?:(\d+)')
sys.path.insert(0, ROOT)


def free_port(ip='127.0.0.1'):
    """A port free for both TCP and UDP on ``ip`` (racy by nature, good enough)."""
    family = socket.AF_INET6 if ':' in ip else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((ip, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.bind((ip, port))
            except OSError:
                continue
            return port
    raise RuntimeError('no free port on %s' % ip)


def temp_folder(test, prefix='dispytest-'):
    """A fresh folder, removed when ``test`` (a TestCase) is cleaned up."""
    folder = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, folder, True)
    return folder


def tcp_free(ip, port):
    """Whether a TCP port can be bound on ``ip`` now."""
    with socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Polls ``predicate`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class NodeProcess:
    """``python dispynode.py -i IP -p PORT ...`` as a context manager.

    stdout and stderr go to files in a private temporary folder (``self.dir``), which
    also serves as ``--dest_path_prefix`` unless one is given.  ``output()`` reads them.
    """

    def __init__(self, ip='127.0.0.1', port=None, cpus=2, secret='', args=(),
                 python=None, dest_path_prefix=None, ready_timeout=20.0, env=None,
                 script=None):
        self.ip = ip
        self.port = port if port is not None else free_port(ip)
        self.cpus = cpus
        self.secret = secret
        self.args = list(args)
        self.python = python or sys.executable
        self.dir = tempfile.mkdtemp(prefix='dispytest-node-')
        self.dest_path_prefix = dest_path_prefix or os.path.join(self.dir, 'dest')
        self.ready_timeout = ready_timeout
        self.env = env
        self.script = script        # a copy elsewhere, perhaps under another name
        self.proc = None
        self._stdout = self._stderr = None

    # -- lifecycle --------------------------------------------------------------
    what = 'dispynode'
    ready_re = READY_RE

    def _command(self):
        cmd = [self.python, self.script or NODE_SCRIPT, '-i', self.ip, '-p', str(self.port),
               '--dest_path_prefix', self.dest_path_prefix, '-d']
        if self.cpus is not None:
            cmd += ['-c', str(self.cpus)]
        if self.secret:
            cmd += ['-s', self.secret]
        return cmd + self.args

    def _ready_text(self):
        return self.stdout()

    def start(self):
        cmd = self._command()
        if self.proc is not None and self.proc.stdin:      # started again after it ended
            self.proc.stdin.close()
        for f in (self._stdout, self._stderr):      # started again after kill()
            if f:
                f.close()
        self._stdout = open(os.path.join(self.dir, 'stdout'), 'a+b')
        self._stderr = open(os.path.join(self.dir, 'stderr'), 'a+b')
        mark = len(self._ready_text())
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault('PYTHONUNBUFFERED', '1')
        # If the test process dies (e.g. the watchdog in tests/__init__.py ends a hung
        # run), the node dies with it.  The signal follows the thread that started the
        # node, so only nodes started from the main thread get it.
        die_with_us = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=self._stdout,
                                     stderr=self._stderr, cwd=self.dir, env=env,
                                     start_new_session=True,
                                     preexec_fn=die_with_parent if die_with_us else None)
        if not wait_until(lambda: self.ready_re.search(self._ready_text()[mark:])
                          or self.proc.poll() is not None, self.ready_timeout):
            self.stop()
            raise RuntimeError('%s did not start in %ss:\n%s' % (self.what, self.ready_timeout,
                                                                 self.output()))
        if self.proc.poll() is not None:
            out = self.output()
            self.stop()
            raise RuntimeError('%s exited with %s:\n%s' % (self.what, self.proc.returncode,
                                                           out))
        return self

    def kill(self):
        """SIGKILL, its folder kept (``start()`` again restarts it on it)."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_leftovers()
        if self.proc is not None and self.proc.stdin:
            self.proc.stdin.close()

    def command(self, text):
        """Writes a line to the node's stdin (status, quit, terminate)."""
        self.proc.stdin.write(text.encode() + b'\n')
        self.proc.stdin.flush()

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout=20.0):
        return self.proc.wait(timeout)

    def stop(self, timeout=15.0):
        """SIGTERM, then SIGKILL to the node's session; removes its folder."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.kill(self.proc.pid, signal.SIGCONT)
                    os.kill(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._kill_leftovers()
            for stream in (self.proc.stdin,):
                try:
                    stream.close()
                except OSError:
                    pass
        for f in (self._stdout, self._stderr):
            if f:
                f.close()
        self._stdout = self._stderr = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self):
        """Kills the node and any descendant still alive (found through /proc); a node
        already reaped is not signalled (its PID may be another process's now)."""
        if self.proc.returncode is not None:
            return
        pids = [self.proc.pid] + descendants(self.proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def descendants(self):
        return descendants(self.proc.pid)

    # -- output ------------------------------------------------------------------
    def stdout(self):
        return _read(self._stdout)

    def stderr(self):
        return _read(self._stderr)

    def output(self):
        return 'stdout:\n%s\nstderr:\n%s' % (self.stdout(), self.stderr())

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class SchedulerProcess(NodeProcess):
    """``python dispyscheduler.py -i IP -p PORT --client_port 0 -n NODE ...`` (loopback:
    the nodes named, no announcement port) as a context manager, like NodeProcess."""

    what = 'dispyscheduler'
    ready_re = re.compile(r'dispyscheduler serving at (\S+):(\d+)')

    def __init__(self, ip='127.0.0.1', nodes=(), node_port=None, port=None, args=(), **kw):
        super().__init__(ip, port, cpus=None, args=args, **kw)
        self.nodes = list(nodes)
        self.node_port = node_port

    def _command(self):
        cmd = [self.python, SCHEDULER_SCRIPT, '-i', self.ip, '-p', str(self.port),
               '--client_port', '0', '--dest_path_prefix', self.dest_path_prefix, '-d',
               '--daemon']
        for node in self.nodes:
            cmd += ['-n', node]
        if self.node_port:
            cmd += ['--node_port', str(self.node_port)]
        return cmd + self.args

    def _ready_text(self):
        return self.stderr()


def _libc_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None


_PRCTL = _libc_prctl()      # looked up here: a child forked from threads only calls it


def die_with_parent():
    """In the child before exec (Linux): SIGKILL when the parent thread ends (the
    suite's watchdog may end a hung run)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)       # PR_SET_PDEATHSIG


def _read(f):
    if f is None:
        return ''
    with open(f.name, 'rb') as g:
        return g.read().decode('utf-8', 'replace')


def descendants(pid):
    """PIDs of all live descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    children = {}
    try:
        entries = os.listdir('/proc')
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(')', 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def close_now(cluster):
    """Closes a cluster at once, cancelling whatever still runs (bounded)."""
    cluster.close(timeout=0, terminate=True)


def stop_node(node):
    """Stops a node (its folder and files go too); one that ended is not signalled."""
    node.stop()


def read_file(path):
    with open(path) as f:
        return f.read()


def kill_group(proc, files=()):
    """SIGKILL to the process group of ``proc`` (a client a test started in a session
    of its own), a bounded wait for it, then ``files`` (its output) closed."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    for f in files:
        if not f.closed:
            f.close()


def kill_pids(pids):
    """SIGKILL to each of ``pids`` still alive (processes a test itself started)."""
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def self_signed_cert(folder):
    """A self-signed key+certificate file made with openssl (the spec's usage)."""
    path = os.path.join(folder, 'sskeycert.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-keyout', path,
                    '-nodes', '-out', path, '-sha256', '-days', '2', '-subj', '/CN=dispy-test'],
                   check=True, capture_output=True, timeout=60)
    return path


def pid_alive(pid):
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir('/proc')


def client_env(nodes, ip_addr='127.0.0.1', node_port=None, secret=None, extra=None):
    """Environment that points an unchanged client script at loopback nodes."""
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['DISPY_NODES'] = ','.join(nodes)
    env['DISPY_IP_ADDR'] = ip_addr
    env['DISPY_PORT'] = '0'
    if node_port is not None:
        env['DISPY_NODE_PORT'] = str(node_port)
    if secret is not None:
        env['DISPY_SECRET'] = secret
    env.update(extra or {})
    return env


def run_client(script, env, timeout=60, cwd=None, args=(), python=None):
    """Runs ``script`` (a path, or source text) in a fresh interpreter; returns
    a CompletedProcess with text stdout/stderr.  The process is killed at timeout."""
    tmp = None
    if '\n' in script:
        tmp = tempfile.NamedTemporaryFile('w', suffix='.py', delete=False, dir=cwd)
        tmp.write(script)
        tmp.close()
        script = tmp.name
    try:
        return subprocess.run([python or sys.executable, script] + list(args), env=env,
                              cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    finally:
        if tmp:
            os.unlink(tmp.name)


class Collector:
    """A LoopConnection handler that records what arrives and on which thread."""

    OFFLOAD = ()

    def __init__(self):
        self.msgs = []
        self.threads = set()
        self.closed = threading.Event()
        self.reason = None
        self.cond = threading.Condition()

    def on_messages(self, conn, msgs):
        with self.cond:
            self.msgs.extend(msgs)
            self.threads.add(threading.current_thread().name)
            self.cond.notify_all()

    def on_closed(self, conn, reason):
        self.reason = reason
        self.closed.set()

    def wait_for(self, count, timeout=20):
        with self.cond:
            return self.cond.wait_for(lambda: len(self.msgs) >= count, timeout)


def loop_connection_pair(test, loop, threads, wrap=None):
    """Two authenticated LoopConnections over a real loopback socket pair (``wrap``
    may put TLS around the sockets): [(dialer conn, its Collector), (listener's)];
    closed at the test's cleanup."""
    import dispy
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    test.addCleanup(listener.close)
    dialer = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, _ = listener.accept()
    if wrap is not None:
        dialer, accepted = wrap(dialer, accepted)
    channels = {}

    def listen_side():
        channels['listener'] = dispy.handshake(accepted, 's', False, {})
    t = threading.Thread(target=listen_side)
    t.start()
    channels['dialer'] = dispy.handshake(dialer, 's', True, {})
    t.join(10)
    ends = []
    for name in ('dialer', 'listener'):
        handler = Collector()
        conn = dispy.LoopConnection(channels[name], handler, name, loop, threads).start()
        test.addCleanup(conn.close)
        ends.append((conn, handler))
    return ends
