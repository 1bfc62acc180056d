"""dispycosnode features end to end: real ``dispycosnode.py`` processes on loopback.

Nodes run on 127.0.0.2 / 127.0.0.3 with free ports and a temporary ``--dest_path``;
clients are scripts in subprocesses (``DISPYCOS_NODE=127.0.0.1``,
``DISPYCOS_PEERS=addr:port``) that report what they saw as ``@key <json>`` lines.
The helpers (node and client processes, ports, cleanups) are tests/test_dispycos.py's.

Classes:

    CloseServerTest     ``dispycos_close_server()`` from a remote task
                        (``restart_servers=True``): the task's value reaches the client,
                        the server exits (status 0, INFO), a fresh process on the same
                        port joins the running computation; tasks run right after do
                        not fail (expected failure)
    ServeOnceTest       ``--serve 1``: the node exits 0, servers gone, after one
                        computation closed
    ServiceWindowTest   outside the window nobody is served; a window that ends closes
                        the running computation (its task ends, not with its value),
                        and the client sees the node's servers go (expected failure);
                        a bad HH:MM is one line and exit status 2
    ConfigFileTest      ``--save_config`` (mode 0600) then ``--config``: the options come
                        back (name, server count, secret)
    TerminateTest       stdin ``terminate`` while a task runs: the client gets a
                        TaskError saying terminated (not PeerLost); the node exits
    ServerStatusTest    each server's ServerDiscovered / ServerInitialized once

The node's service window is placed with ``DISPY_NODE_CLOCK_OFFSET`` (seconds added to
the node's clock, read at its start); the node looks at its window every
``dispycosnode.WINDOW_CHECK`` seconds from its start.
"""

import json
import os
import re
import stat
import subprocess
import sys
import time
import unittest

try:
    from tests import support
    from tests.test_dispycos import (CLIENT_TIMEOUT, Client, DispycosNode, NODE_A, NODE_B,
                                     NODE_SCRIPT, SERVERS_CLIENT, clean_environ, client_env,
                                     free_ports, listening, stop_checked, wait_gone)
except ImportError:                         # run from inside tests/
    import support
    from test_dispycos import (CLIENT_TIMEOUT, Client, DispycosNode, NODE_A, NODE_B,
                               NODE_SCRIPT, SERVERS_CLIENT, clean_environ, client_env,
                               free_ports, listening, stop_checked, wait_gone)

import dispycosnode

wait_until = support.wait_until


def hhmm(epoch):
    """Local time of day HH:MM of an epoch."""
    return time.strftime('%H:%M', time.localtime(epoch))


class Node(DispycosNode):
    """A DispycosNode with an environment of its own (``DISPY_NODE_CLOCK_OFFSET``), or
    a command line of its own (``--config FILE`` alone)."""

    def __init__(self, ip=NODE_A, env_extra=None, command=None, **kwargs):
        super().__init__(ip, **kwargs)
        self.env.update(env_extra or {})
        self.own_command = command
        self.started_at = None

    def _command(self):
        if self.own_command is not None:
            return [self.python, NODE_SCRIPT] + list(self.own_command)
        return super()._command()

    def start(self):
        self.started_at = time.time()
        return super().start()


class NodeCase(unittest.TestCase):
    timeout = 60

    def start_node(self, ip=NODE_A, **kwargs):
        node = Node(ip, **kwargs)
        self.addCleanup(stop_checked, node)
        return node.start()

    def client(self, source, node, args=(), secret=None):
        return Client(self, None, client_env([node.location], secret), args, source)

    def ended(self, node, timeout=20):
        """The node's exit status (it must end by itself within ``timeout``)."""
        try:
            return node.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail('node %s still running after %ss\n%s' % (node.location, timeout,
                                                                node.output()))


# ================================================================================
# 1. dispycos_close_server() from a remote task
# ================================================================================

CLOSE_SERVER_CLIENT = '''
def close_me(task=None):
    import os
    yield task.sleep(0.05)
    dispycos_close_server()         # a name of every server's namespace
    yield task.sleep(0.05)          # the server goes only once this task ended
    return [os.getpid(), str(task.location), 'closing']


def where(task=None):
    import os
    yield task.sleep(0.01)
    return [os.getpid(), str(task.location)]


def describe(value):
    return [type(value).__name__, value if isinstance(value, list) else str(value)]


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    me = task
    for _ in range(100):            # up to 10 s: both servers
        servers = yield computation.servers()
        if len(servers) >= 2:
            break
        yield task.sleep(0.1)
    emit('servers', sorted(str(s) for s in servers))
    first = yield computation.run_result(close_me)
    emit('first', describe(first))
    if not isinstance(first, list):
        yield computation.close()
        return
    addr, port = first[1].rsplit(':', 1)
    location = pycos.Location(addr, int(port))

    def attempt(task=None):
        value = yield computation.run_result_at(location, where)
        me.send(('at', value))

    # bounded: each attempt waits at most until the deadline; a TaskError or PeerLost
    # (the old server, while it goes) is retried
    deadline = time.time() + 20
    attempts, value = [], None
    while time.time() < deadline:
        pycos.Task(attempt)
        msg = yield task.receive(timeout=max(0.1, deadline - time.time()))
        if msg is None:
            attempts.append('no answer in time')
            break
        value = msg[1]
        attempts.append(describe(value))
        if isinstance(value, list) and value[0] != first[0]:
            break
        yield task.sleep(0.2)
    emit('attempts', attempts)
    emit('after', describe(value))
    emit('servers_after', sorted(str(s) for s in (yield computation.servers())))
    yield computation.close()
    emit('closed', 1)


pycos.Scheduler()
computation = pycos.Computation([close_me, where], restart_servers=True)
pycos.Task(client_proc, computation)
'''


RIGHT_AFTER_CLIENT = '''
def close_me(task=None):
    import os
    yield task.sleep(0.05)
    dispycos_close_server()
    return os.getpid()


def where(task=None):
    import os
    yield task.sleep(0.01)
    return os.getpid()


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for _ in range(100):            # up to 10 s: both servers
        if len((yield computation.servers())) >= 2:
            break
        yield task.sleep(0.1)
    first = yield computation.run_result(close_me)
    emit('first', [type(first).__name__, str(first)])
    values = []
    for _ in range(3):              # at once: the other server is free
        values.append((yield computation.run_result(where)))
    emit('after', [[type(v).__name__ for v in values],
                   [str(v) for v in values if not isinstance(v, int)]])
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([close_me, where], restart_servers=True)
pycos.Task(client_proc, computation)
'''


class CloseServerTest(NodeCase):

    def test_close_server_from_a_task(self):
        """The task that calls dispycos_close_server() returns its value; then its
        server process exits, the node starts a fresh one on the same port, which
        joins the same computation (run_result_at there: a new PID); the node says,
        at INFO, that the server closed itself."""
        node = self.start_node(NODE_A)
        pids = node.server_pids()
        self.assertEqual(len(pids), 2)
        client = self.client(CLOSE_SERVER_CLIENT, node)
        first = client.wait_record('first', 30)
        self.assertIsNotNone(first, client.output() + node.output())
        self.assertEqual(first[0], 'list', client.output() + node.output())
        old_pid, where, word = first[1]
        self.assertEqual(word, 'closing')
        self.assertIn(old_pid, pids)
        self.assertIn(where, node.servers)
        client.finish(CLIENT_TIMEOUT, node.output())
        self.assertEqual(client.record('servers'), sorted(node.servers))
        kind, after = client.record('after')
        self.assertEqual(kind, 'list', client.output() + node.output())
        new_pid, new_where = after
        self.assertEqual(new_where, where)              # the same port
        self.assertNotEqual(new_pid, old_pid)           # another process
        self.assertEqual(client.record('servers_after'), sorted(node.servers))
        # the node: the old process gone, the new one its child, the other untouched
        self.assertEqual(wait_gone([old_pid], 5), [])
        now = node.server_pids()
        self.assertEqual(sorted(now), sorted([p for p in pids if p != old_pid] + [new_pid]))
        err = node.stderr()
        self.assertRegex(err, r'dispycos INFO: server %s closed by its computation'
                         % re.escape(where))
        self.assertRegex(err, r'dispycos INFO: server %s ended \(exit status 0\); '
                         r'starting a new one' % re.escape(where))
        self.assertNotRegex(err, r'(WARNING|ERROR).*server %s' % re.escape(where))
        self.assertNotIn('Traceback', err)

    def test_tasks_right_after_close_server_do_not_fail(self):
        node = self.start_node(NODE_A)
        client = self.client(RIGHT_AFTER_CLIENT, node)
        client.finish(CLIENT_TIMEOUT, node.output())
        first = client.record('first')
        self.assertEqual(first[0], 'int', client.output())
        self.assertEqual(client.record('after'), [['int'] * 3, []], client.output())


# ================================================================================
# 2. --serve 1
# ================================================================================

ONE_COMPUTATION_CLIENT = '''
def where(task=None):
    import os
    yield task.sleep(0.05)
    return [os.getpid(), str(task.location)]


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    emit('results', (yield computation.run_results(where, [(), ()])))
    yield computation.close()
    emit('closed', 1)


pycos.Scheduler()
computation = pycos.Computation([where])
pycos.Task(client_proc, computation)
'''


class ServeOnceTest(NodeCase):

    def test_serve_1_exits_after_one_computation(self):
        node = self.start_node(NODE_B, args=['--serve', '1'])
        pids = node.server_pids()
        self.assertEqual(len(pids), 2)
        client = self.client(ONE_COMPUTATION_CLIENT, node)
        client.finish(CLIENT_TIMEOUT, node.output())
        results = client.record('results')
        self.assertEqual(len(results), 2, client.output())
        for pid, where in results:
            self.assertIn(pid, pids)
            self.assertIn(where, node.servers)
        self.assertEqual(self.ended(node), 0, node.output())
        self.assertEqual(wait_gone(pids, 10), [])
        self.assertIn('served 1 computation(s): quitting', node.stderr())
        for port in node.server_ports + [node.port]:
            self.assertFalse(listening(node.addr, port), port)


# ================================================================================
# 3. The service window
# ================================================================================

LONG_TASK_CLIENT = '''
def long_task(client, task=None):
    import os
    client.send(('running', os.getpid(), str(task.location)))
    yield task.sleep(60)
    return 'its value'


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    me = task

    def waiter(task=None):
        value = yield computation.run_result(long_task, me)
        me.send(('result', value))
    pycos.Task(waiter)
    msg = yield task.receive(timeout=30)
    emit('running', [time.time()] + list(msg[1:]) if msg else None)
    msg = yield task.receive(timeout=30)
    value = msg[1] if msg else None
    emit('result', [type(value).__name__, str(value), isinstance(value, pycos.PeerLost),
                    isinstance(value, pycos.TaskError), time.time()])
    if len(sys.argv) > 1:           # how long the node's servers stay listed (bounded)
        deadline = time.time() + float(sys.argv[1])
        servers = yield computation.servers()
        while servers and time.time() < deadline:
            yield task.sleep(0.1)
            servers = yield computation.servers()
        emit('servers_after', [str(s) for s in servers])
    yield computation.close(timeout=5, terminate=True)
    emit('closed', 1)


pycos.Scheduler()
computation = pycos.Computation([long_task])
pycos.Task(client_proc, computation)
'''


class ServiceWindowTest(NodeCase):

    LEAD = 3.0      # seconds from the node's start to its window's end (< WINDOW_CHECK)

    def test_outside_the_window_no_server(self):
        """A window an hour from now (and a clock offset of 0): the client gets no
        server for 3 s, the node never reserves itself."""
        now = time.time()
        node = self.start_node(NODE_A, args=[
            '--service_start', hhmm(now + 3600), '--service_stop', hhmm(now + 7200),
            '--service_end', hhmm(now + 7260)], env_extra={'DISPY_NODE_CLOCK_OFFSET': '0'})
        client = self.client(SERVERS_CLIENT, node, args=[3])
        client.finish(30, node.output())
        self.assertEqual(client.record('servers'), [])
        self.assertNotIn('uses 2 servers', node.stderr())
        self.assertNotRegex(node.stderr(), r'computation \w+ of')
        # an hour back in the node's clock, its window is open: the same client is served
        later = self.start_node(NODE_B, args=[
            '--service_start', hhmm(now + 3600), '--service_stop', hhmm(now + 7200),
            '--service_end', hhmm(now + 7260)],
            env_extra={'DISPY_NODE_CLOCK_OFFSET': '3700'})
        client = self.client(SERVERS_CLIENT, later, args=[10])
        client.finish(30, later.output())
        self.assertEqual(sorted(client.record('servers')), sorted(later.servers))

    def ending_node(self):
        """A node whose clock reaches its --service_end LEAD s from now (the window
        started an hour before; stop = end: serving, then out); (node, our clock's
        time of that end)."""
        self.assertGreater(dispycosnode.WINDOW_CHECK, self.LEAD)
        now = time.time()
        end = (int(now // 60) + 2) * 60             # a whole minute; the offset moves it
        offset = end - self.LEAD - now              # the node's clock: end at now + LEAD
        node = self.start_node(NODE_A, args=[
            '--service_start', hhmm(end - 3600), '--service_stop', hhmm(end),
            '--service_end', hhmm(end)], env_extra={'DISPY_NODE_CLOCK_OFFSET': repr(offset)})
        # it read its window in it, before its end: it serves until its first look
        self.assertLess(time.time(), now + self.LEAD, 'the node took too long to start')
        return node, now + self.LEAD

    def test_window_end_closes_the_running_computation(self):
        """The node's clock reaches --service_end LEAD s after its start; at its next
        look at the window (WINDOW_CHECK s after its start) it closes the computation:
        the long task's run_result is a TaskError or PeerLost, not its value."""
        node, end_seen = self.ending_node()
        client = self.client(LONG_TASK_CLIENT, node)
        running = client.wait_record('running', 20)
        self.assertIsNotNone(running, client.output() + node.output())
        self.assertIn(running[2], node.servers)
        client.finish(40, node.output())
        kind, text, peer_lost, task_error, at = client.record('result')
        self.assertNotEqual(text, 'its value')
        self.assertTrue(peer_lost or task_error, (kind, text))
        self.assertGreaterEqual(at, end_seen - 0.5)
        self.assertLess(at, node.started_at + 2 * dispycosnode.WINDOW_CHECK + 5)
        err = node.stderr()
        self.assertRegex(err, r'dispycos INFO: service window ended: closing computation '
                         r'\w+', node.output())
        # the node stays, out of service: it serves nobody now
        self.assertIsNone(node.proc.poll())
        client = self.client(SERVERS_CLIENT, node, args=[2])
        client.finish(30, node.output())
        self.assertEqual(client.record('servers'), [])

    def test_window_end_the_client_sees_the_servers_go(self):
        node, _end_seen = self.ending_node()
        client = self.client(LONG_TASK_CLIENT, node, args=[5])
        client.finish(40, node.output())
        self.assertTrue(client.record('result')[3], client.output())      # TaskError
        self.assertEqual(client.record('servers_after'), [], client.output())

    def test_bad_time_of_day(self):
        """``--service_stop 25:00``: one line on stderr, exit status 2, nothing on
        stdout."""
        for args in (['--service_stop', '25:00'], ['--service_start', '7'],
                     ['--service_end', '12:60']):
            with self.subTest(args=args):
                proc = subprocess.run(
                    [sys.executable, NODE_SCRIPT, '-i', NODE_A, '-u',
                     str(free_ports(NODE_A, 1)), '--daemon'] + args,
                    stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                    env=clean_environ(), cwd=support.ROOT)
                self.assertEqual(proc.returncode, 2, proc)
                self.assertEqual(proc.stdout, '')
                lines = proc.stderr.strip().splitlines()
                self.assertEqual(len(lines), 1, proc.stderr)
                self.assertIn(args[1], lines[0])
                self.assertNotIn('Traceback', proc.stderr)


# ================================================================================
# 4. --save_config / --config
# ================================================================================

class ConfigFileTest(NodeCase):

    SECRET = 'a saved secret'

    def test_save_config_then_config(self):
        folder = support.temp_folder(self, 'dispytest-dispycosconfig-')
        path = os.path.join(folder, 'node.json')
        port = free_ports(NODE_A, 2)
        dest = os.path.join(folder, 'dest')
        os.makedirs(dest)
        proc = subprocess.run(
            [sys.executable, NODE_SCRIPT, '--save_config', path, '-i', NODE_A, '-u',
             str(port), '-c', '1', '--name', 'saved-node', '--dest_path', dest,
             '-s', self.SECRET],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            env=clean_environ(), cwd=folder)
        self.assertEqual(proc.returncode, 0, proc)
        self.assertIn('options saved in %s' % path, proc.stdout)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual(saved['cpus'], 1)
        self.assertEqual(saved['name'], 'saved-node')
        self.assertEqual(saved['secret'], self.SECRET)
        self.assertNotIn('save_config', saved)
        self.assertFalse(listening(NODE_A, port))   # it only saved: no node ran
        # the options come back from the file alone
        node = self.start_node(NODE_A, port=port, command=['--config', path])
        self.assertEqual(node.name, 'saved-node')
        self.assertEqual(node.location, '%s:%d' % (NODE_A, port))
        self.assertEqual(node.server_ports, [port + 1])
        self.assertEqual(len(node.server_pids()), 1)
        mark = len(node.stdout())
        node.command('status')
        self.assertTrue(wait_until(lambda: re.search(
            r'^dispycosnode saved-node at %s: 1 servers, idle$' % re.escape(node.location),
            node.stdout()[mark:], re.M), 10), node.output())
        # with the saved secret it serves (its one server); without, nobody
        client = self.client(SERVERS_CLIENT, node, args=[10], secret=self.SECRET)
        client.finish(30, node.output())
        self.assertEqual(client.record('servers'), node.servers)
        client = self.client(SERVERS_CLIENT, node, args=[1])
        client.finish(30, node.output())
        self.assertEqual(client.record('servers'), [])


# ================================================================================
# Found on the way: each server discovered and initialized once
# ================================================================================

STATUS_CLIENT = '''
STATUS = []


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.DispycosStatus):
            STATUS.append([msg.status, str(msg.info)])


def where(task=None):
    yield task.sleep(0.01)
    return 1


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    emit('value', (yield computation.run_result(where)))
    yield computation.close()
    emit('statuses', STATUS)


pycos.Scheduler()
computation = pycos.Computation([where], status_task=pycos.Task(status_proc))
pycos.Task(client_proc, computation)
'''


class ServerStatusTest(NodeCase):

    def test_each_server_discovered_and_initialized_once(self):
        node = self.start_node(NODE_B)
        client = self.client(STATUS_CLIENT, node)
        client.finish(CLIENT_TIMEOUT, node.output())
        self.assertEqual(client.record('value'), 1)
        statuses = client.record('statuses')
        for name in ('ServerDiscovered', 'ServerInitialized', 'ServerClosed'):
            self.assertEqual(sorted(info for status, info in statuses if status == name),
                             sorted(node.servers), (name, statuses))


IDLE_CLIENT = '''
STATUS = []


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.DispycosStatus):
            STATUS.append([msg.status, str(msg.info)])


def where(seconds, task=None):
    yield task.sleep(seconds)
    return 1


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    # a task longer than the zombie period keeps the computation: it is not idle
    emit('value', (yield computation.run_result(where, 3)))
    t0 = time.monotonic()
    for _ in range(300):                # then idle: the node closes it (at most 30 s)
        if not (yield computation.servers()):
            break
        yield task.sleep(0.1)
    emit('idle_closed_after', time.monotonic() - t0)
    emit('servers', (yield computation.servers()))
    emit('statuses', STATUS)
    yield computation.close()


pycos.Scheduler()
computation = pycos.Computation([where], status_task=pycos.Task(status_proc))
pycos.Task(client_proc, computation)
'''


class ZombiePeriodTest(NodeCase):

    def test_idle_computation_is_closed(self):
        """--zombie_period 2: a 3 s task does not count as idle; 2 s after it ended
        with nothing running, the node closes the computation, says why, and its
        scheduler sees the servers go (ServerClosed, NodeClosed)."""
        node = self.start_node(NODE_B, args=['--zombie_period', '2'])
        client = self.client(IDLE_CLIENT, node)
        client.finish(CLIENT_TIMEOUT, node.output())
        out = client.output() + node.output()
        self.assertEqual(client.record('value'), 1, out)
        self.assertEqual(client.record('servers'), [], out)
        self.assertLess(client.record('idle_closed_after'), 10, out)
        self.assertGreater(client.record('idle_closed_after'), 1, out)
        statuses = client.record('statuses')
        self.assertEqual(sorted(info for status, info in statuses if status == 'ServerClosed'),
                         sorted(node.servers), out)
        self.assertTrue([info for status, info in statuses
                         if status == 'NodeClosed' and node.location in info], out)
        self.assertRegex(node.stderr(), r'computation \w+ idle for \d+ s \(--zombie_period\)'
                         r': closing it')


# ================================================================================
# 5. stdin terminate while a task runs
# ================================================================================

class TerminateTest(NodeCase):

    def test_terminate_while_a_task_runs(self):
        node = self.start_node(NODE_B, daemon=False)
        pids = node.server_pids()
        client = self.client(LONG_TASK_CLIENT, node)
        running = client.wait_record('running', 30)
        self.assertIsNotNone(running, client.output() + node.output())
        self.assertIn(running[1], pids)
        node.command('terminate')
        client.finish(40, node.output())
        kind, text, peer_lost, task_error, _at = client.record('result')
        self.assertFalse(peer_lost, (kind, text, node.output()))
        self.assertTrue(task_error, (kind, text))
        self.assertIn('terminated', text)
        self.assertIn('long_task', text)
        self.assertEqual(self.ended(node), 0, node.output())
        self.assertIn('terminating', node.stdout())
        self.assertEqual(wait_gone(pids, 10), [])


if __name__ == '__main__':
    unittest.main()
