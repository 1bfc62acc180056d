"""dispycos end to end: real ``dispycosnode.py`` processes, real client scripts.

Nodes run on 127.0.0.2 and 127.0.0.3 (each with 2 server processes, a temporary
``--dest_path`` and free ports); clients are pycos-era scripts in subprocesses,
pointed at the nodes through the environment (``DISPYCOS_NODE`` = the client's own
address, ``DISPYCOS_PEERS`` = the nodes to ping; never broadcast).  Test scripts
report what they saw as ``@key <json>`` lines on stdout, which the tests compare
precisely.

Classes:

    ExamplesTest        'dispycos_client1.py', 'dispycos_client3.py' and
                        'dispycos_client8.py' run unchanged on two nodes
    MessagingTest       user-class objects both ways; remote tasks messaging each
                        other across nodes (peers_communicate=True)
    BadInputTest        non-generator function, unpicklable argument, a remote task
                        that raises (MonitorStatus to status_task, TaskError)
    FaultTest           kill -9 of a server mid-task (PeerLost, replacement server);
                        a client killed mid-run (the node frees itself)
    SharedSchedulerTest ``python3 dispycos.py``: two clients served one after the other
    NodeProgramTest     stdin commands status / quit, option spellings (--host,
                        --ext_host, --node_ports ...), kill -9 of a node leaves nothing
    SecretTest          a client with another secret is never served

Every wait is bounded (a deadline, a subprocess timeout); every process a test starts
is stopped by a cleanup, by PID (a node's server processes, its children, are looked
up before it is stopped and must be gone afterwards); every temporary folder is
removed.
"""

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

ROOT = support.ROOT
NODE_SCRIPT = os.path.join(ROOT, 'dispycosnode.py')
SCHEDULER_SCRIPT = os.path.join(ROOT, 'dispycos.py')
EXAMPLES = os.path.join(ROOT, 'examples')
CLIENT_IP = '127.0.0.1'
NODE_A = '127.0.0.2'
NODE_B = '127.0.0.3'
CLIENT_TIMEOUT = 60         # seconds any client script may run, at most
wait_until = support.wait_until


# ================================================================================
# Ports, environment, processes
# ================================================================================

def _bindable(ip, port, kind):
    family = socket.AF_INET6 if ':' in ip else socket.AF_INET
    with socket.socket(family, kind) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def free_ports(ip, count, udp=True):
    """A port P with P .. P+count-1 free for TCP on ``ip`` (and P for UDP): a node
    on P puts its servers on P+1, P+2.  Chosen below the ephemeral range, so that
    no outgoing connection takes a server's port while it restarts."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 32000 - count)
        if all(_bindable(ip, base + i, socket.SOCK_STREAM) for i in range(count)) and \
                (not udp or _bindable(ip, base, socket.SOCK_DGRAM)):
            return base
    raise RuntimeError('no %d free ports on %s' % (count, ip))


def clean_environ():
    env = dict(os.environ)
    for name in list(env):
        if name.startswith('DISPYCOS_'):
            del env[name]
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def client_env(peers, secret=None):
    """Points an unchanged client script at ``peers`` (nodes, "addr:port")."""
    env = clean_environ()
    env['DISPYCOS_NODE'] = CLIENT_IP
    env['DISPYCOS_PEERS'] = ','.join(peers)
    if secret is not None:
        env['DISPYCOS_SECRET'] = secret
    return env


def children(pid):
    """Direct children of ``pid`` (Linux /proc)."""
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def descendants(pid, depth=3):
    """Children of ``pid`` and theirs (a node's setup process forks its servers)."""
    found = children(pid)
    if depth > 1:
        for child in list(found):
            found += descendants(child, depth - 1)
    return found


def wait_gone(pids, timeout):
    """The PIDs of ``pids`` still alive after up to ``timeout`` seconds."""
    wait_until(lambda: not any(support.pid_alive(p) for p in pids), timeout, 0.05)
    return [p for p in pids if support.pid_alive(p)]


def listening(addr, port):
    """Whether a TCP socket listens on addr:port (from /proc/net/tcp: no connection
    made, which a server would have to refuse)."""
    local = '%s:%04X' % (''.join('%02X' % int(b) for b in reversed(addr.split('.'))), port)
    try:
        with open('/proc/net/tcp') as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return True
    return any(row[1] == local and row[3] == '0A' for row in rows)


def files_under(path):
    return sorted(os.path.join(d, f) for d, _dirs, names in os.walk(path) for f in names)


class DispycosNode(support.NodeProcess):
    """``python3 dispycosnode.py -i IP -u PORT -c CPUS --dest_path DIR [--daemon]``.

    stdout / stderr go to files of a private temporary folder, which also holds the
    ``--dest_path`` folder; ``stop()`` (SIGTERM, then SIGKILL) removes it and checks
    that the node's server processes (its children, looked up first) are gone."""

    what = 'dispycosnode'
    ready_re = re.compile(r'^dispycosnode (\S+) at (\S+):(\d+): (\d+) servers at ([\d, ]+)$',
                          re.M)

    def __init__(self, ip=NODE_A, port=None, cpus=2, daemon=True, secret=None, args=(),
                 port_ip=None):
        if port is None:
            port = free_ports(port_ip or ip, cpus + 1)
        super().__init__(ip, port=port, cpus=cpus, args=args, env=clean_environ(),
                         ready_timeout=30)
        os.rmdir(self.dir)              # a name of our own, to tell our folders apart
        self.dir = tempfile.mkdtemp(prefix='dispytest-dispycosnode-')
        self.daemon = daemon
        self.node_secret = secret
        self.dest = os.path.join(self.dir, 'dest')
        os.makedirs(self.dest)
        self.leftovers = []
        self.addr = self.name = None
        self.server_ports = []

    def _command(self):
        cmd = [self.python, NODE_SCRIPT, '-u', str(self.port), '-c', str(self.cpus),
               '--dest_path', self.dest]
        if self.ip:
            cmd[2:2] = ['-i', self.ip]
        if self.node_secret is not None:
            cmd += ['-s', self.node_secret]
        if self.daemon:
            cmd.append('--daemon')
        return cmd + self.args

    def start(self):
        super().start()
        found = self.ready_re.search(self.stdout())
        self.name, self.addr = found.group(1), found.group(2)
        self.announced_port = int(found.group(3))
        self.server_ports = [int(p) for p in found.group(5).split(', ')]
        return self

    @property
    def location(self):
        return '%s:%d' % (self.addr, self.announced_port)

    @property
    def servers(self):
        """'addr:port' of each server, as the node's ready line gives them."""
        return ['%s:%d' % (self.addr, p) for p in self.server_ports]

    def server_pids(self):
        if self.proc is None or self.proc.poll() is not None:
            return []
        return descendants(self.proc.pid)

    def stop(self, timeout=15.0):
        pids = self.server_pids()
        super().stop(timeout)
        self.leftovers = wait_gone(pids, 10)
        support.kill_pids(self.leftovers)
        return self.leftovers


def stop_checked(node):
    """A class cleanup: stops ``node``; processes left behind are an error."""
    left = node.stop()
    if left:
        raise AssertionError('server processes %s of %s outlived it' % (left, node.location))


class SchedulerProgram(support.NodeProcess):
    """``python3 dispycos.py -i 127.0.0.1 -t TPORT -u UPORT --daemon`` (the shared
    scheduler), with DISPYCOS_PEERS naming the nodes it pings."""

    what = 'dispycos scheduler'
    ready_re = re.compile(r'^dispycos scheduler at (\S+):(\d+)$', re.M)

    def __init__(self, peers, ip=CLIENT_IP):
        super().__init__(ip, port=free_ports(ip, 1), cpus=None, env=dict(
            clean_environ(), DISPYCOS_PEERS=','.join(peers)))

    def _command(self):
        return [self.python, SCHEDULER_SCRIPT, '-i', self.ip, '-t', str(self.port),
                '-u', str(self.port), '--daemon']


PRELUDE = '''\
import json, sys, time
import dispycos as pycos


def emit(key, value):
    """One result line for the test: @key <json>."""
    print('@%s %s' % (key, json.dumps(value, default=str)), flush=True)

'''


class Client:
    """A client script in a subprocess (its own session, killed at cleanup).  The
    script and its output files are in a temporary folder; its working directory is
    an empty folder inside (``cwd``), which must stay empty."""

    def __init__(self, test, script, env, args=(), source=None):
        self.base = tempfile.mkdtemp(prefix='dispytest-dispycos-')
        test.addCleanup(shutil.rmtree, self.base, True)
        self.cwd = os.path.join(self.base, 'cwd')
        os.mkdir(self.cwd)
        if source is not None:
            script = os.path.join(self.base, 'client.py')
            with open(script, 'w') as f:
                f.write(PRELUDE + textwrap.dedent(source))
        self.script = script
        self._out = open(os.path.join(self.base, 'stdout'), 'w+b')
        self._err = open(os.path.join(self.base, 'stderr'), 'w+b')
        self.proc = subprocess.Popen([sys.executable, script] + [str(a) for a in args],
                                     cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err,
                                     start_new_session=True,
                                     preexec_fn=support.die_with_parent)
        test.addCleanup(self.kill)

    def stdout(self):
        return support._read(self._out)

    def stderr(self):
        return support._read(self._err)

    def output(self):
        return '--- client stdout:\n%s\n--- client stderr:\n%s' % (self.stdout(),
                                                                    self.stderr()[-4000:])

    def records(self):
        """{key: [value, ...]} of the script's @key lines."""
        found = {}
        for line in self.stdout().splitlines():
            if line.startswith('@'):
                key, _, text = line[1:].partition(' ')
                found.setdefault(key, []).append(json.loads(text))
        return found

    def record(self, key):
        """The one value of @key (an AssertionError if there is not exactly one)."""
        values = self.records().get(key, [])
        if len(values) != 1:
            raise AssertionError('@%s %d times in the output\n%s'
                                 % (key, len(values), self.output()))
        return values[0]

    def wait_record(self, key, timeout):
        """Polls for the @key line (bounded; also ends when the script exits)."""
        wait_until(lambda: key in self.records() or self.proc.poll() is not None, timeout)
        return self.records().get(key, [None])[0]

    def finish(self, timeout=CLIENT_TIMEOUT, context=''):
        """Waits for the exit; exit status 0 or an AssertionError with the output."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError('client %s still running after %ss\n%s%s'
                                 % (os.path.basename(self.script), timeout, self.output(),
                                    context)) from None
        if code != 0:
            raise AssertionError('client %s exited with %s\n%s%s'
                                 % (os.path.basename(self.script), code, self.output(),
                                    context))
        return self

    def kill(self):
        support.kill_group(self.proc, (self._out, self._err))


class NodePairCase(unittest.TestCase):
    """Two nodes (127.0.0.2 and 127.0.0.3, 2 servers each) shared by the class."""

    timeout = 90

    @classmethod
    def setUpClass(cls):
        cls.node_a = DispycosNode(NODE_A)
        cls.addClassCleanup(stop_checked, cls.node_a)
        cls.node_a.start()
        cls.node_b = DispycosNode(NODE_B)
        cls.addClassCleanup(stop_checked, cls.node_b)
        cls.node_b.start()
        cls.nodes = (cls.node_a, cls.node_b)
        cls.servers = set(cls.node_a.servers + cls.node_b.servers)
        cls.peers = [cls.node_a.location, cls.node_b.location]

    def nodes_output(self):
        return ''.join('\n--- node %s:\n%s' % (n.location, n.output()[-3000:])
                       for n in self.nodes)

    def run_client(self, source=None, script=None, peers=None, args=(), secret=None,
                   timeout=CLIENT_TIMEOUT):
        """Runs a client to its end (exit status 0); returns the Client."""
        client = self.start_client(source, script, peers, args, secret)
        return client.finish(timeout, self.nodes_output())

    def start_client(self, source=None, script=None, peers=None, args=(), secret=None):
        env = client_env(self.peers if peers is None else peers, secret)
        return Client(self, script, env, args, source)

    def check_clean(self, client):
        """Nothing left in the client's working directory, no computation's file left
        on the nodes once it closed."""
        self.assertEqual(os.listdir(client.cwd), [])
        for node in self.nodes:
            self.assertTrue(wait_until(lambda: not files_under(node.dest), 5),
                            files_under(node.dest))


# ================================================================================
# 1. The examples, unchanged
# ================================================================================

class ExamplesTest(NodePairCase):
    """examples/dispycos_client*.py, each run unchanged in a fresh working directory."""

    def example(self, name, args=()):
        client = self.run_client(script=os.path.join(EXAMPLES, name), args=args)
        self.assertNotIn('Traceback', client.stderr(), client.output())
        self.check_clean(client)
        return client

    def test_client1_results(self):
        """'dispycos_client1.py': 10 tasks on 4 servers, each result for its own
        argument, from a server of the nodes; then one task's value by finish()."""
        out = self.example('dispycos_client1.py').stdout()
        results = re.findall(r'^result for ([\d.]+): slept ([\d.]+) s at (\S+)$', out, re.M)
        self.assertEqual(len(results), 10, out)
        for arg, slept, where in results:
            self.assertEqual(arg, slept, out)
            self.assertTrue(0.1 <= float(arg) <= 0.5, out)
            self.assertIn(where, self.servers, out)
        finished = re.findall(r'^task (compute/\d+@(\S+)) ended with: slept 0\.10 s at (\S+)$',
                              out, re.M)
        self.assertEqual(len(finished), 1, out)
        _task, task_location, where = finished[0]
        self.assertEqual(task_location, where, out)
        self.assertIn(where, self.servers, out)
        self.assertEqual(len(out.strip().splitlines()), 11, out)

    def test_client3_objects(self):
        """'dispycos_client3.py': 8 objects of the script's class C travel to the
        servers and back as messages, with sqrt applied and the server's location."""
        marks = [len(node.stdout()) for node in self.nodes]
        out = self.example('dispycos_client3.py').stdout()
        results = re.findall(r'^result (\d+): C\((\d+), n=([\d.]+), at (\S+)\)$', out, re.M)
        self.assertEqual(sorted(int(i) for i, _, _, _ in results), list(range(8)), out)
        self.assertNotIn('could not be created', out)
        self.assertNotIn('no result in time', out)
        # what each task printed on its server reaches its node's stdout
        received = {}

        def collect():
            received.clear()
            for node, mark in zip(self.nodes, marks):
                for where, i, n in re.findall(r'^(\S+) received object (\d+) \(n=([\d.]+)\)$',
                                              node.stdout()[mark:], re.M):
                    received[int(i)] = (where, float(n))
            return len(received) == 8
        self.assertTrue(wait_until(collect, 10), (received, self.nodes_output()))
        for i, i2, n, where in results:
            self.assertEqual(i, i2)
            self.assertIn(where, self.servers, out)
            sent_where, sent_n = received[int(i)]
            self.assertEqual(where, sent_where, (out, received))
            self.assertTrue(1 <= sent_n <= 4, received)
            self.assertAlmostEqual(float(n), math.sqrt(sent_n), delta=0.002,
                                   msg='object %s: n=%s, sent %s' % (i, n, sent_n))

    def test_client8_messages_while_busy(self):
        """'dispycos_client8.py': two tasks sleep without yielding (time.sleep) while
        the client sends them 0..9; each has all 10 messages, in order, afterwards."""
        out = self.example('dispycos_client8.py').stdout()
        lines = re.findall(r'^(\S+) received (\[.*\])$', out, re.M)
        self.assertEqual(len(lines), 2, out)
        self.assertEqual(len({where for where, _ in lines}), 2, out)
        for where, received in lines:
            self.assertIn(where, self.servers, out)
            self.assertEqual(json.loads(received), list(range(10)), out)
        self.assertEqual(len(out.strip().splitlines()), 2, out)


# ================================================================================
# 2. Messages
# ================================================================================

USER_CLASS_CLIENT = '''
class Point(object):
    def __init__(self, x, y, where=None):
        self.x, self.y, self.where = x, y, where


def echo(client, task=None):
    """Answers each Point with a new Point, until something else comes."""
    count = 0
    while True:
        msg = yield task.receive(timeout=30)
        if not isinstance(msg, Point):
            break
        count += 1
        client.send(Point(msg.x * 10, msg.y + 1, str(task.location)))
    return count


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    rtask = yield computation.run(echo, task)
    emit('rtask', [isinstance(rtask, pycos.Task), str(rtask.location)])
    for i in range(5):
        rtask.send(Point(i, -i))
    replies = []
    for _ in range(5):
        msg = yield task.receive(timeout=20)
        if isinstance(msg, Point):
            replies.append([type(msg) is Point, msg.x, msg.y, msg.where])
        else:
            replies.append(repr(msg))
    emit('replies', replies)
    rtask.send('stop')
    emit('value', (yield rtask.finish(timeout=20)))
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([echo, Point])
pycos.Task(client_proc, computation)
'''

PEERS_CLIENT = '''
class Item(object):
    def __init__(self, n, origin):
        self.n, self.origin = n, origin


def collector(client, n, task=None):
    """Receives n (sender, Item) from another remote task, acknowledges to that
    task directly, reports to the client."""
    items, sender = [], None
    while len(items) < n:
        msg = yield task.receive(timeout=30)
        if msg is None:
            break
        sender, item = msg
        items.append([type(item).__name__, item.n, item.origin])
    if sender is not None:
        sender.send(Item(-1, str(task.location)))
    client.send(['collected', str(task.location), items])


def producer(peer, n, task=None):
    for i in range(n):
        peer.send((task, Item(i, str(task.location))))
    ack = yield task.receive(timeout=30)
    if isinstance(ack, Item):
        return [type(ack).__name__, ack.n, ack.origin]
    return repr(ack)


def client_proc(computation, node_a, node_b, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    coll = yield computation.run_at(node_a, collector, task, 5)
    prod = yield computation.run_at(node_b, producer, coll, 5)
    emit('tasks', [str(coll.location), str(prod.location)])
    msg = yield task.receive(timeout=30)
    emit('collected', msg)
    emit('producer', (yield prod.finish(timeout=30)))
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([collector, producer, Item], peers_communicate=True)
pycos.Task(client_proc, computation, sys.argv[1], sys.argv[2])
'''


class MessagingTest(NodePairCase):

    def test_user_class_messages_both_ways(self):
        """Objects of the script's class go to a remote task and come back (new
        objects made on the server), in order, as that class."""
        client = self.run_client(USER_CLASS_CLIENT)
        is_task, where = client.record('rtask')
        self.assertTrue(is_task)
        self.assertIn(where, self.servers)
        self.assertEqual(client.record('replies'),
                         [[True, i * 10, -i + 1, where] for i in range(5)], client.output())
        self.assertEqual(client.record('value'), 5)
        self.check_clean(client)

    def test_remote_tasks_message_each_other(self):
        """A task on node B gets a task of node A as an argument, sends it Items
        directly; the task of A answers it directly (peers_communicate=True)."""
        client = self.run_client(PEERS_CLIENT, args=[NODE_A, NODE_B])
        coll, prod = client.record('tasks')
        self.assertIn(coll, self.node_a.servers)
        self.assertIn(prod, self.node_b.servers)
        self.assertEqual(client.record('collected'),
                         ['collected', coll, [['Item', i, prod] for i in range(5)]],
                         client.output())
        self.assertEqual(client.record('producer'), ['Item', -1, coll])


# ================================================================================
# 3. Bad input: a clear result, never a hang
# ================================================================================

BAD_INPUT_CLIENT = '''
import threading

STATUS = []


class MyError(Exception):
    pass


def plain(n):                   # not a generator function
    return n


def fails(n, task=None):
    yield task.sleep(0.05)
    if n == 7:
        raise ValueError('bad value %d' % n)
    raise MyError('my error %d' % n)


def add_one(n, task=None):
    yield task.sleep(0.01)
    return n + 1


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.MonitorStatus):
            STATUS.append({'monitor': str(msg.info),
                           'type': getattr(msg.type, '__name__', str(msg.type)),
                           'class_here': msg.type in (ValueError, MyError),
                           'value': str(msg.value)})
        elif isinstance(msg, pycos.DispycosStatus):
            STATUS.append({'status': msg.status, 'info': str(msg.info)})
        else:
            STATUS.append({'other': repr(msg)})


def describe(value):
    d = {'class': type(value).__name__, 'text': str(value),
         'is_task': isinstance(value, pycos.Task)}
    if isinstance(value, pycos.TaskError):
        d['remote_type'] = getattr(value.remote_type, '__name__', str(value.remote_type))
        d['remote_traceback'] = str(value.remote_traceback)
    return d


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    t0 = time.monotonic()
    emit('plain_run', describe((yield computation.run(plain, 1))))
    emit('plain_result', describe((yield computation.run_result(plain, 1))))
    emit('lock_run', describe((yield computation.run(add_one, threading.Lock()))))
    emit('lock_result', describe((yield computation.run_result(add_one, threading.Lock()))))
    emit('bad_input_seconds', time.monotonic() - t0)
    rtask = yield computation.run(fails, 7)
    emit('fails_task', str(rtask))
    emit('fails_result', describe((yield computation.run_result(fails, 7))))
    emit('myerror_result', describe((yield computation.run_result(fails, 8))))
    emit('after', (yield computation.run_result(add_one, 41)))
    yield computation.close()
    for _ in range(200):            # the status messages: until ComputationClosed
        if any(s.get('status') == 'ComputationClosed' for s in STATUS):
            break
        yield task.sleep(0.05)
    emit('statuses', STATUS)


pycos.Scheduler()
status_task = pycos.Task(status_proc)
computation = pycos.Computation([fails, add_one, MyError], status_task=status_task)
pycos.Task(client_proc, computation)
'''


class BadInputTest(NodePairCase):

    def test_bad_input_and_failing_tasks(self):
        client = self.run_client(BAD_INPUT_CLIENT)
        out = client.output()
        records = client.records()
        # a non-generator function: a TypeError object, nothing raised
        for key in ('plain_run', 'plain_result'):
            value = client.record(key)
            self.assertEqual(value['class'], 'TypeError', out)
            self.assertIn('generator function', value['text'])
            self.assertIn('plain', value['text'])
        # an argument that cannot be pickled: the same
        for key in ('lock_run', 'lock_result'):
            value = client.record(key)
            self.assertEqual(value['class'], 'TypeError', out)
            self.assertIn('could not be pickled', value['text'])
            self.assertIn('lock', value['text'])
        self.assertLess(client.record('bad_input_seconds'), 5)
        # a task that raises: run_result gives a TaskError naming the exception
        failed = client.record('fails_result')
        self.assertEqual(failed['class'], 'TaskError', out)
        self.assertIn('ValueError: bad value 7', failed['text'])
        self.assertEqual(failed['remote_type'], 'ValueError')
        self.assertIn('Traceback', failed['remote_traceback'])
        self.assertIn('File "<dispycos fails>", line 4, in fails\n    raise ValueError(',
                      failed['remote_traceback'])
        self.assertNotIn('dispycos.py', failed['remote_traceback'])
        mine = client.record('myerror_result')
        self.assertEqual(mine['class'], 'TaskError', out)
        self.assertEqual(mine['remote_type'], 'MyError', out)
        self.assertIn('MyError: my error 8', mine['text'])
        # the computation goes on
        self.assertEqual(client.record('after'), 42)
        # status_task: a MonitorStatus with the exception's class and its traceback,
        # for the task made by run() as for those of run_result()
        statuses = records['statuses'][0]
        monitors = {s['monitor']: s for s in statuses if 'monitor' in s}
        fails_task = client.record('fails_task')
        self.assertIn(fails_task, monitors, statuses)
        status = monitors[fails_task]
        self.assertEqual(status['type'], 'ValueError')
        self.assertTrue(status['class_here'])
        self.assertIn('Traceback (most recent call last)', status['value'])
        self.assertIn('ValueError: bad value 7', status['value'])
        types = sorted(s['type'] for s in monitors.values())
        self.assertEqual(types, ['MyError', 'StopIteration', 'ValueError', 'ValueError'],
                         statuses)
        names = [s['status'] for s in statuses if 'status' in s]
        self.assertIn('ServerInitialized', names)
        self.assertEqual(names[-1], 'ComputationClosed', names)
        initialized = {s['info'] for s in statuses if s.get('status') == 'ServerInitialized'}
        self.assertTrue(initialized <= self.servers, initialized)
        self.assertEqual([s for s in statuses if 'other' in s], [])
        self.check_clean(client)


# ================================================================================
# Faults: a server killed mid-task, a client killed mid-run
# ================================================================================

SERVER_KILL_CLIENT = '''
STATUS = []


def victim(client, task=None):
    import os
    client.send(('pid', os.getpid(), str(task.location)))
    yield task.sleep(60)
    return 'not killed'


def where(task=None):
    import os
    yield task.sleep(0.05)
    return [os.getpid(), str(task.location)]


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.MonitorStatus):
            STATUS.append([str(msg.info), getattr(msg.type, '__name__', str(msg.type)),
                           str(msg.value)])


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    client = task

    def waiter(task=None):
        value = yield computation.run_result(victim, client)
        client.send(('result', value))
    pycos.Task(waiter)
    msg = yield task.receive(timeout=30)
    emit('victim', list(msg[1:]) if msg else None)
    msg = yield task.receive(timeout=20)
    value = msg[1] if msg else None
    emit('result', [type(value).__name__, str(value), isinstance(value, pycos.PeerLost)])
    emit('after', (yield computation.run_results(where, [(), (), ()])))
    yield computation.close()
    emit('statuses', STATUS)


pycos.Scheduler()
status_task = pycos.Task(status_proc)
computation = pycos.Computation([victim, where], status_task=status_task)
pycos.Task(client_proc, computation)
'''

REPLACEMENT_CLIENT = '''
def where(task=None):
    import os
    yield task.sleep(0.01)
    return [os.getpid(), str(task.location)]


def client_proc(computation, addr, port, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for _ in range(100):            # up to 10 s: every server of the nodes
        servers = yield computation.servers()
        if len(servers) >= 4:
            break
        yield task.sleep(0.1)
    emit('servers', sorted(str(s) for s in servers))
    emit('replacement', (yield computation.run_result_at(pycos.Location(addr, port), where)))
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([where])
pycos.Task(client_proc, computation, sys.argv[1], int(sys.argv[2]))
'''

KILLED_CLIENT = '''
def sleeper(client, task=None):
    import os
    client.send([os.getpid(), str(task.location)])
    yield task.sleep(60)


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for _ in range(2):
        yield computation.run(sleeper, task)
    got = []
    for _ in range(2):
        got.append((yield task.receive(timeout=30)))
    emit('running', got)
    yield task.sleep(60)            # killed here


pycos.Scheduler()
computation = pycos.Computation([sleeper])
pycos.Task(client_proc, computation)
'''

SECOND_CLIENT = '''
def where(task=None):
    import os
    yield task.sleep(0.2)
    return [os.getpid(), str(task.location)]


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    emit('results', (yield computation.run_results(where, [(), ()])))
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([where])
pycos.Task(client_proc, computation)
'''


class FaultTest(NodePairCase):

    timeout = 120

    def test_server_killed_mid_task(self):
        """kill -9 of the server running a task: run_result gives PeerLost at once,
        status_task gets a MonitorStatus of PeerLost, the computation goes on with
        the other servers, and the node starts a replacement server, which serves
        the next computation."""
        client = self.start_client(SERVER_KILL_CLIENT)
        victim = client.wait_record('victim', 30)
        self.assertIsNotNone(victim, client.output() + self.nodes_output())
        pid, where = victim
        node = [n for n in self.nodes if where in n.servers][0]
        self.assertIn(pid, node.server_pids())
        others = [p for n in self.nodes for p in n.server_pids() if p != pid]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        result = client.wait_record('result', 20)
        latency = time.monotonic() - killed
        self.assertIsNotNone(result, client.output() + self.nodes_output())
        self.assertEqual(result[0], 'PeerLost', client.output())
        self.assertTrue(result[2])
        self.assertLess(latency, 5.0, 'PeerLost came %.1f s after the kill' % latency)
        client.finish(30, self.nodes_output())
        after = client.record('after')
        self.assertEqual(len(after), 3, after)
        for apid, awhere in after:
            self.assertIn(apid, others)         # the surviving servers
            self.assertIn(awhere, self.servers)
        lost = [s for s in client.record('statuses') if s[1] == 'PeerLost']
        self.assertEqual(len(lost), 1, client.record('statuses'))
        self.assertTrue(lost[0][0].startswith('victim/') and lost[0][0].endswith('@' + where),
                        lost)
        # the node replaces the server, on the same port
        def replaced():
            pids = node.server_pids()
            return len(pids) == 2 and pid not in pids
        self.assertTrue(wait_until(replaced, 15), node.output())
        self.assertRegex(node.stderr(), r'server %s ended \(exit status -9\); starting a new '
                         r'one' % re.escape(where))
        new_pid = [p for p in node.server_pids() if p not in others][0]
        addr, port = where.rsplit(':', 1)
        # the new server listens (it says READY to the node right after)
        self.assertTrue(wait_until(lambda: listening(addr, int(port)), 15), node.output())
        second = self.run_client(REPLACEMENT_CLIENT, args=[addr, port])
        self.assertEqual(second.record('servers'), sorted(self.servers))
        self.assertEqual(second.record('replacement'), [new_pid, where])

    def test_client_killed_mid_run(self):
        """A client killed (SIGKILL) with tasks running on node A's two servers: the
        node closes its computation (the servers end its tasks, and stay) and serves
        the next client."""
        client = self.start_client(KILLED_CLIENT, peers=[self.node_a.location])
        running = client.wait_record('running', 30)
        self.assertIsNotNone(running, client.output() + self.nodes_output())
        self.assertEqual(sorted(w for _, w in running), sorted(self.node_a.servers))
        pids = sorted(p for p, _ in running)
        self.assertEqual(pids, sorted(self.node_a.server_pids()))
        mark = len(self.node_a.stderr())
        client.kill()
        self.assertTrue(wait_until(lambda: re.search(
            r'scheduler \S+ lost: computation \w+ closed', self.node_a.stderr()[mark:]), 15),
            self.node_a.output())
        second = self.run_client(SECOND_CLIENT, peers=[self.node_a.location], timeout=30)
        results = second.record('results')
        self.assertEqual(sorted(p for p, _ in results), pids)        # the same servers
        self.assertEqual(sorted(w for _, w in results), sorted(self.node_a.servers))


# ================================================================================
# 4. The shared scheduler program
# ================================================================================

SHARED_CLIENT = '''
def compute(n, task=None):
    yield task.sleep(0.3)
    return n * n


def client_proc(computation, port, task=None):
    emit('id', computation.id)
    start = time.time()
    result = yield computation.schedule(pycos.Location('127.0.0.1', port))
    emit('scheduled', [result, start, time.time()])
    if result == 0:
        emit('results', (yield computation.run_results(compute, range(8))))
        emit('closing', time.time())
        yield computation.close()
        emit('closed', time.time())


computation = pycos.Computation([compute])
pycos.Task(client_proc, computation, int(sys.argv[1]))
'''


class SharedSchedulerTest(NodePairCase):

    def test_two_clients_one_after_the_other(self):
        """Two clients started together on one ``dispycos.py``: one computation runs,
        the other's schedule() returns only once the first closed; both complete."""
        sched = SchedulerProgram(self.peers)
        self.addCleanup(sched.stop)
        sched.start()
        env = client_env([])
        clients = [Client(self, None, env, [sched.port], SHARED_CLIENT) for _ in range(2)]
        for client in clients:
            client.finish(CLIENT_TIMEOUT, self.nodes_output() + '\n--- scheduler:\n'
                          + sched.output())
        for client in clients:
            self.assertEqual(client.record('scheduled')[0], 0)
            self.assertEqual(client.record('results'), [n * n for n in range(8)])
        first, second = sorted(clients, key=lambda c: c.record('scheduled')[2])
        self.assertGreaterEqual(second.record('scheduled')[2], first.record('closing'),
                                (first.output(), second.output()))
        self.assertLess(second.record('scheduled')[1], first.record('closing'))  # together
        # the scheduler queued the second behind the first
        queued = re.findall(r'computation (\w+) queued behind 1', sched.stderr())
        self.assertEqual(queued, [second.record('id')], sched.output())


# ================================================================================
# 5. The node program: stdin commands, option spellings, a node killed
# ================================================================================

HOLD_CLIENT = '''
import os


def hold(task=None):
    msg = yield task.receive(timeout=30)
    return msg


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    rtask = yield computation.run(hold)
    emit('running', [computation.id, str(rtask.location)])
    for _ in range(600):            # until the test says go (at most 30 s)
        if os.path.exists('../go'):
            break
        yield task.sleep(0.05)
    rtask.send('done')
    emit('value', (yield rtask.finish(timeout=20)))
    yield computation.close()
    emit('closed', 1)


pycos.Scheduler()
computation = pycos.Computation([hold])
pycos.Task(client_proc, computation)
'''

WHERE_CLIENT = '''
def where(task=None):
    yield task.sleep(0.01)
    return str(task.location)


def client_proc(computation, addrs, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for addr in addrs:
        rtask = yield computation.run_at(addr, where)
        emit('rtask', [addr, rtask.location.addr, rtask.location.port, (yield rtask.finish())])
    emit('servers', sorted(str(s) for s in (yield computation.servers())))
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([where])
pycos.Task(client_proc, computation, sys.argv[1:])
'''

SERVERS_CLIENT = '''
def client_proc(computation, seconds, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    deadline = time.time() + seconds
    servers = []
    while time.time() < deadline and not servers:
        servers = yield computation.servers()
        yield task.sleep(0.1)
    emit('servers', [str(s) for s in servers])
    yield computation.close()


def compute(task=None):
    yield task.sleep(0)


pycos.Scheduler()
computation = pycos.Computation([compute])
pycos.Task(client_proc, computation, float(sys.argv[1]))
'''


class NodeProgramTest(unittest.TestCase):
    """Nodes started by each test (own options)."""

    timeout = 90

    def start_node(self, ip=NODE_A, **kwargs):
        node = DispycosNode(ip, **kwargs)
        self.addCleanup(stop_checked, node)
        return node.start()

    def client(self, source, peers, args=(), secret=None):
        return Client(self, None, client_env(peers, secret), args, source)

    def status(self, node, servers, timeout=10):
        """Sends ``status``; returns the node's answer (a header line and one line
        per server)."""
        pattern = re.compile(r'^dispycosnode \S+ at %s: 2 servers, .*\n(?:  server .*\n){%d}'
                             % (re.escape(node.location), servers), re.M)
        before = len(pattern.findall(node.stdout()))
        node.command('status')
        self.assertTrue(wait_until(lambda: len(pattern.findall(node.stdout())) > before,
                                   timeout), node.output())
        return pattern.findall(node.stdout())[-1]

    def test_status_and_quit_commands(self):
        """``status`` names the node's state and each server's; ``quit`` with a
        computation running waits for it to close, then the node and its servers
        end."""
        node = self.start_node(daemon=False)
        p1, p2 = node.server_ports
        self.assertEqual((p1, p2), (node.port + 1, node.port + 2))
        text = self.status(node, 2)
        self.assertEqual(text, 'dispycosnode %s at %s: 2 servers, idle\n'
                         '  server %s:%d: 0 task(s) running, 0 done\n'
                         '  server %s:%d: 0 task(s) running, 0 done\n'
                         % (node.name, node.location, NODE_A, p1, NODE_A, p2))
        client = self.client(HOLD_CLIENT, [node.location])
        running = client.wait_record('running', 30)
        self.assertIsNotNone(running, client.output() + node.output())
        comp_id, where = running
        lines = self.status(node, 2).splitlines()
        self.assertEqual(lines[0], 'dispycosnode %s at %s: 2 servers, computation %s'
                         % (node.name, node.location, comp_id[:8]))
        self.assertEqual(sorted(lines[1:]), sorted(
            '  server %s: %d task(s) running, 0 done' % (s, s == where)
            for s in node.servers))
        pids = node.server_pids()
        self.assertEqual(len(pids), 2)
        node.command('quit')
        self.assertTrue(wait_until(lambda: 'quitting once the computation is closed'
                                   in node.stdout(), 10), node.output())
        open(os.path.join(client.base, 'go'), 'w').close()
        client.finish(30, node.output())
        self.assertEqual(client.record('value'), 'done')    # the server was still there
        self.assertEqual(node.wait(15), 0)
        self.assertEqual(wait_gone(pids, 10), [])

    def test_option_spellings(self):
        """--host / --ext_host / --node_ports on one node, -i / --ext_ip_addr /
        --tcp_ports on another: both serve on every address (0.0.0.0), announce the
        external address (their ready line, the client's rtask.location) and put
        their servers on the ports given."""
        spellings = [('--host', '--ext_host', '--node_ports', '127.0.0.4'),
                     ('-i', '--ext_ip_addr', '--tcp_ports', '127.0.0.5')]
        nodes = []
        for host, ext, ports, ext_addr in spellings:
            port = free_ports('0.0.0.0', 1)
            first = port
            while port in (first, first + 1):
                first = free_ports('0.0.0.0', 2, udp=False)
            ports_arg = '%d-%d' % (first, first + 1) if ports == '--tcp_ports' else \
                '%d,%d' % (first, first + 1)
            node = self.start_node(None, port=port, args=[host, '0.0.0.0', ext, ext_addr,
                                                          ports, ports_arg])
            self.assertEqual(node.location, '%s:%d' % (ext_addr, port), node.output())
            self.assertEqual(node.server_ports, [first, first + 1])
            nodes.append(node)
        client = self.client(WHERE_CLIENT, [n.location for n in nodes],
                             args=[ext for _, _, _, ext in spellings])
        client.finish(30, ''.join(n.output() for n in nodes))
        rtasks = client.records()['rtask']
        self.assertEqual(len(rtasks), 2, client.output())
        for (asked, addr, port, value), node in zip(rtasks, nodes):
            self.assertEqual(addr, asked)
            self.assertEqual(addr, node.addr)
            self.assertIn(port, node.server_ports)
            self.assertEqual(value, '%s:%d' % (addr, port))
        self.assertEqual(client.record('servers'),
                         sorted(s for n in nodes for s in n.servers))

    def test_sigkill_of_node_leaves_no_server(self):
        """kill -9 of the node: its servers end when their stdin closes."""
        node = self.start_node(NODE_B)
        pids = node.server_pids()
        self.assertEqual(len(pids), 2)
        os.kill(node.proc.pid, signal.SIGKILL)
        node.wait(10)
        self.assertEqual(wait_gone(pids, 10), [])

    def test_sigterm_of_node_ends_its_servers(self):
        node = self.start_node(NODE_B)
        pids = node.server_pids()
        self.assertEqual(len(pids), 2)
        os.kill(node.proc.pid, signal.SIGTERM)
        node.wait(15)
        self.assertEqual(wait_gone(pids, 10), [])
        self.assertFalse(files_under(node.dest), files_under(node.dest))


# ================================================================================
# 5. Secrets
# ================================================================================

class SecretTest(unittest.TestCase):
    """A node with a secret; clients with another one, and with it."""

    timeout = 60
    SECRET = 'the node secret'

    @classmethod
    def setUpClass(cls):
        cls.node = DispycosNode(NODE_A, secret=cls.SECRET)
        cls.addClassCleanup(stop_checked, cls.node)
        cls.node.start()

    def run_servers_client(self, secret, seconds):
        client = Client(self, None, client_env([self.node.location], secret), [seconds],
                        SERVERS_CLIENT)
        return client.finish(30, self.node.output())

    def test_wrong_secret_never_served(self):
        """A client with another secret: computation.servers() stays empty (3 s) and
        the node never reserves itself for it; with the node's secret, it is served."""
        mark = len(self.node.stderr())
        client = self.run_servers_client('another secret', 3)
        self.assertEqual(client.record('servers'), [])
        self.assertNotIn('uses 2 servers', self.node.stderr()[mark:])
        client = self.run_servers_client(self.SECRET, 10)
        self.assertEqual(sorted(client.record('servers')), sorted(self.node.servers))
        self.assertIn('uses 2 servers', self.node.stderr()[mark:])

    def test_wrong_secret_reported_by_node(self):
        """The node's output says that a client failed authentication."""
        marks = len(self.node.stdout()), len(self.node.stderr())
        self.run_servers_client('another secret', 1)
        self.assertTrue(wait_until(lambda: 'authentication' in self.node.stdout()[marks[0]:]
                                   + self.node.stderr()[marks[1]:], 5), self.node.output())


PEER_CLIENT = '''
def where(task=None):
    yield task.sleep(0)
    return str(task.location)


def client_proc(computation, node, task=None):
    # seed 003 §6.12: a node beyond the LAN, made known with peer() before schedule()
    emit('peer', (yield pycos.Pycos().peer(pycos.Location(*node))))
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    emit('where', (yield computation.run_result(where)))
    yield computation.close()


host, port = sys.argv[1].split(':')
pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([where]), (host, int(port)))
'''


class PeerTest(NodePairCase):
    """``Pycos().peer(Location)``: a node the scheduler was not told of (no
    DISPYCOS_PEERS) is used once peered."""

    def test_peer_makes_a_node_known(self):
        node = self.node_a
        client = self.run_client(PEER_CLIENT, peers=[], args=[node.location])
        self.assertEqual(client.record('peer'), 0, client.output())
        self.assertIn(client.record('where'), node.servers, client.output())


NAMES_CLIENT = '''
def piped(task=None):
    import subprocess, sys
    import pycos                        # what servers provide for pycos-era code
    import pycos.asyncfile
    child = pycos.asyncfile.Popen([sys.executable, '-c', 'import sys; '
                                   'sys.stdout.write(sys.stdin.read().upper())'],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _err = yield pycos.asyncfile.AsyncPipe(child).communicate(b'through a pipe')
    return out.decode()


def listener(client, task=None):
    news = yield pycos.Channel.locate('news', client.location, timeout=10)
    yield news.subscribe(task)
    client.send('subscribed')
    got = []
    for _ in range(3):
        got.append((yield task.receive(timeout=10)))
    client.send(got)
    yield task.receive(timeout=10)      # the file has been sent: where the task runs
    import os
    with open(os.path.join('sub', 'data.txt')) as f:
        client.send((f.read(), os.path.abspath(f.name) ==
                     os.path.join(pycos.Pycos().dest_path, 'sub', 'data.txt')))


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    emit('piped', (yield computation.run_result(piped)))
    news = pycos.Channel('news')
    rtask = yield computation.run_async(listener, task)
    emit('subscribed', (yield task.receive(timeout=10)))
    for i in range(3):
        news.send(i)
    emit('channel', (yield task.receive(timeout=10)))
    with open('data.txt', 'w') as f:
        f.write('file contents')
    emit('send_file', (yield pycos.Pycos().send_file(rtask.location, 'data.txt', dir='sub')))
    os.remove('data.txt')
    rtask.send('read it')
    emit('read', (yield task.receive(timeout=10)))
    yield computation.close()


import os
pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([piped, listener]))
'''


class PycosNamesTest(NodePairCase):
    """What the README lists of pycos's names, through real servers: a pipe to a
    child program (``import pycos.asyncfile`` on a server), a remote task subscribed
    to the client's channel (``Channel.locate``), ``Pycos().send_file``."""

    def test_asyncfile_channel_send_file(self):
        client = self.run_client(NAMES_CLIENT)
        out = client.output() + self.nodes_output()
        self.assertEqual(client.record('piped'), 'THROUGH A PIPE', out)
        self.assertEqual(client.record('subscribed'), 'subscribed', out)
        self.assertEqual(client.record('channel'), [0, 1, 2], out)
        self.assertEqual(client.record('send_file'), 0, out)
        # it landed in the server's folder of the computation (the task's working
        # folder and its Pycos().dest_path), and was removed when it closed
        self.assertEqual(client.record('read'), ['file contents', True], out)
        copies = [os.path.join(d, f) for node in self.nodes for d, _s, files in
                  os.walk(node.dest) for f in files if f == 'data.txt']
        self.assertEqual(copies, [], out)


def _other_pythons():
    from tests.test_cluster import other_pythons
    return other_pythons()


@unittest.skipUnless(_other_pythons(), 'no other CPython 3.9+ under pyenv')
class MixedVersionsTest(unittest.TestCase):
    """A node on each other installed CPython (3.9+), the client on this one:
    'dispycos_client3.py' (instances of the client's class both ways) runs."""

    timeout = 300

    def test_node_on_other_versions(self):
        for python in _other_pythons():
            with self.subTest(node=python):
                node = DispycosNode(NODE_A, cpus=1)
                node.python = python
                self.addCleanup(stop_checked, node)
                node.start()
                proc = subprocess.run(
                    [sys.executable, os.path.join(EXAMPLES, 'dispycos_client3.py'), '3'],
                    env=client_env([node.location]), cwd=node.dir, capture_output=True,
                    text=True, timeout=CLIENT_TIMEOUT)
                self.assertEqual(proc.returncode, 0, proc.stderr + node.output())
                results = re.findall(r'^result (\d+): C\(\d+, n=[\d.]+, at %s\)$'
                                     % re.escape(node.servers[0]), proc.stdout, re.M)
                self.assertEqual(sorted(results), ['0', '1', '2'], proc.stdout)
                stop_checked(node)


if __name__ == '__main__':
    unittest.main()
