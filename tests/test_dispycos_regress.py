"""dispycos regressions: each test checks one bug a review found (and that is now
fixed), the way the reviewer's reproduction showed it.

Classes:

    SharedSchedulerClassesTest  ``python3 dispycos.py --node ...``: a task's value of
                                the client's own class, an exception of its own class
                                (the shared scheduler has none of them)
    OneServerNodeTest           a node with one server: too many arguments (the CPU
                                slot is not lost), a monitored task whose value does
                                not pickle, a computation closed while its
                                server_setup runs
    TwoServerNodeTest           a node with two servers: 400 tasks through
                                run_results, a module component changed between two
                                computations
    DoubleDialTest              two programs that dial each other at the same moment
    RuntimeRegressTest          no network: Semaphore / Lock / Condition used from a
                                plain thread, waiter lists of polled waits

Client scripts are built like those of test_dispycos.py (its ``Client``: ``@key
<json>`` lines on stdout); each wait in them is bounded (``within``), so a hang of
the old behaviour is a failure, not a stall.  Nodes, the shared scheduler and the
clients are stopped by PID at cleanup, their folders removed; loopback only.
"""

import os
import textwrap
import threading
import time
import unittest
import uuid

try:
    from tests import support
    from tests.test_dispycos import (CLIENT_TIMEOUT, Client, DispycosNode, NODE_A,
                                     NODE_B, SchedulerProgram, clean_environ,
                                     client_env, free_ports, stop_checked)
except ImportError:                         # run from inside tests/
    import support
    from test_dispycos import (CLIENT_TIMEOUT, Client, DispycosNode, NODE_A, NODE_B,
                               SchedulerProgram, clean_environ, client_env, free_ports,
                               stop_checked)

import dispycos

# Helpers every client script here starts with (after test_dispycos's PRELUDE, which
# gives ``emit``).
HELPERS = '''
def within(seconds, step):
    """What ``yield step`` gives, run in a task of its own: 'TIMEOUT' if that takes
    longer than ``seconds`` (the old behaviour hung there)."""
    box = []

    def runner(task=None):
        box.append((yield step))
    helper = pycos.Task(runner)
    helper.set_daemon()
    value = yield helper.finish(timeout=seconds)
    if box:
        return box[0]
    return 'TIMEOUT' if helper.is_alive() else value


def describe(value, seconds=None):
    d = {'class': type(value).__name__, 'text': str(value),
         'v': getattr(value, 'v', None)}
    if isinstance(value, pycos.TaskError):
        d['remote_type'] = getattr(value.remote_type, '__name__', str(value.remote_type))
    if seconds is not None:
        d['seconds'] = seconds
    return d


def type_name(t):
    return getattr(t, '__name__', str(t))

'''


def script(source):
    """A client script's source: the helpers, then ``source``."""
    return HELPERS + textwrap.dedent(source)


def nodes_output(*nodes):
    return ''.join('\n--- node %s:\n%s' % (n.location, n.output()[-3000:]) for n in nodes)


class NodeCase(unittest.TestCase):
    """One node shared by the class (``CPUS`` servers, at ``IP``); clients with a
    private scheduler pointed at it."""

    timeout = 90
    IP = NODE_A
    CPUS = 2

    @classmethod
    def setUpClass(cls):
        cls.node = DispycosNode(cls.IP, cpus=cls.CPUS)
        cls.addClassCleanup(stop_checked, cls.node)
        cls.node.start()

    def run_client(self, source, args=(), timeout=CLIENT_TIMEOUT, env=None):
        """Runs a client script to its end (exit status 0); returns the Client."""
        if env is None:
            env = client_env([self.node.location])
        client = Client(self, None, env, args, script(source))
        return client.finish(timeout, nodes_output(self.node))


# ================================================================================
# 1. The shared scheduler and the client's own classes
# ================================================================================

CLASSES_CLIENT = '''
STATUS = []


class Result(object):
    def __init__(self, v):
        self.v = v


class MyError(Exception):
    pass


def compute(n, task=None):
    yield task.sleep(0.1)
    if n < 0:
        raise MyError('negative %d' % n)
    return Result(n * 2)


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.MonitorStatus):
            STATUS.append({'type': type_name(msg.type), 'my_error': msg.type is MyError,
                           'result': isinstance(msg.value, Result),
                           'v': getattr(msg.value, 'v', None), 'value': str(msg.value)})


def client_proc(computation, port, task=None):
    emit('scheduled', (yield within(20, computation.schedule(
        pycos.Location('127.0.0.1', port)))))
    for n in (21, -1):
        t0 = time.monotonic()
        value = yield within(20, computation.run_result(compute, n))
        d = describe(value, time.monotonic() - t0)
        d['is_result'] = isinstance(value, Result)
        emit('result_%d' % abs(n), d)
    for _ in range(200):            # both MonitorStatus (at most 10 s)
        if len(STATUS) >= 2:
            break
        yield task.sleep(0.05)
    emit('statuses', STATUS)
    emit('closed', (yield within(20, computation.close())))


status_task = pycos.Task(status_proc)
computation = pycos.Computation([compute, Result, MyError], status_task=status_task)
pycos.Task(client_proc, computation, int(sys.argv[1]))
'''


class NodeSchedulerProgram(SchedulerProgram):
    """``python3 dispycos.py -i 127.0.0.1 -t P -u P --daemon --node ADDR:PORT``."""

    def __init__(self, node):
        super().__init__([])
        self.node_arg = node

    def _command(self):
        return super()._command() + ['--node', self.node_arg]


class SharedSchedulerClassesTest(NodeCase):

    IP = NODE_A

    def test_client_classes_through_shared_scheduler(self):
        """A value of the script's class and an exception of its class, through a
        shared scheduler (which cannot unpickle them): run_result gives the object /
        a TaskError naming MyError at once; status_task gets both MonitorStatus with
        the script's classes.  (Before, the scheduler failed to unpickle the task's
        status and run_result hung.)"""
        sched = NodeSchedulerProgram(self.node.location)
        self.addCleanup(sched.stop)
        sched.start()
        env = client_env([])
        client = Client(self, None, env, [sched.port], script(CLASSES_CLIENT))
        client.finish(CLIENT_TIMEOUT, nodes_output(self.node) + '\n--- scheduler:\n'
                      + sched.output())
        out = client.output() + '\n--- scheduler:\n' + sched.output()
        self.assertEqual(client.record('scheduled'), 0, out)
        ok = client.record('result_21')
        self.assertEqual(ok['class'], 'Result', out)
        self.assertTrue(ok['is_result'], out)
        self.assertEqual(ok['v'], 42, out)
        self.assertLess(ok['seconds'], 5, out)
        failed = client.record('result_1')
        self.assertEqual(failed['class'], 'TaskError', out)
        self.assertIn('MyError', failed['text'], out)
        self.assertIn('negative -1', failed['text'], out)
        self.assertEqual(failed['remote_type'], 'MyError', out)
        self.assertLess(failed['seconds'], 5, out)
        statuses = sorted(client.record('statuses'), key=lambda s: s['type'])
        self.assertEqual(len(statuses), 2, out)
        mine, done = statuses
        self.assertEqual(mine['type'], 'MyError', out)
        self.assertTrue(mine['my_error'], out)
        self.assertIn('negative -1', mine['value'], out)
        self.assertEqual(done['type'], 'StopIteration', out)
        self.assertTrue(done['result'], out)
        self.assertEqual(done['v'], 42, out)
        self.assertEqual(client.record('closed'), 0, out)


# ================================================================================
# 2. A node with one server
# ================================================================================

ARITY_CLIENT = '''
def compute(n, task=None):
    yield task.sleep(0.1)
    return n * 2


def client_proc(computation, task=None):
    if (yield within(20, computation.schedule())):
        raise Exception('not scheduled')
    t0 = time.monotonic()
    bad = yield within(20, computation.run_result(compute, 1, 2, 3))
    emit('bad', describe(bad, time.monotonic() - t0))
    t0 = time.monotonic()
    after = yield within(20, computation.run_result(compute, 21))
    emit('after', [after, time.monotonic() - t0])
    emit('closed', (yield within(20, computation.close())))


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([compute]))
'''

UNPICKLABLE_CLIENT = '''
def compute(n, task=None):
    import threading
    yield task.sleep(1)
    return threading.Lock()         # a value that does not pickle


def add_one(n, task=None):
    yield task.sleep(0.05)
    return n + 1


def client_proc(computation, task=None):
    if (yield within(20, computation.schedule())):
        raise Exception('not scheduled')
    rtask = yield computation.run(compute, 1)
    emit('rtask', str(rtask))
    yield task.monitor(rtask)
    msg = yield task.receive(timeout=10)
    if isinstance(msg, pycos.MonitorStatus):
        emit('monitor', {'info': str(msg.info), 'type': type_name(msg.type),
                         'value_class': type(msg.value).__name__, 'value': str(msg.value)})
    else:
        emit('monitor', repr(msg))
    t0 = time.monotonic()
    after = yield within(20, computation.run_result(add_one, 41))
    emit('after', [after, time.monotonic() - t0])
    emit('closed', (yield within(20, computation.close(timeout=5, terminate=True))))


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([compute, add_one]))
'''

SETUP_CLOSED_CLIENT = '''
def setup(task=None):
    yield task.sleep(2)
    return 0


def compute(n, task=None):
    yield task.sleep(0.1)
    return n * 2


def client_proc(task=None):
    first = pycos.Computation([compute], server_setup=setup)
    emit('first_scheduled', (yield within(20, first.schedule())))
    yield task.sleep(0.5)           # its server is loading: server_setup runs
    emit('first_closed', (yield within(20, first.close())))
    second = pycos.Computation([compute])
    emit('second_scheduled', (yield within(20, second.schedule())))
    t0 = time.monotonic()
    servers = []
    while time.monotonic() - t0 < 20 and not servers:
        servers = yield second.servers()
        yield task.sleep(0.1)
    emit('second_servers', [str(s) for s in servers])
    emit('second_result', [(yield within(20, second.run_result(compute, 21))),
                           time.monotonic() - t0])
    emit('second_closed', (yield within(20, second.close())))


pycos.Scheduler()
pycos.Task(client_proc)
'''


SERVER_ONLY_CLASS_CLIENT = '''
def compute(task=None):
    import sys, types
    module = types.ModuleType('serveronly')     # a library only the servers have
    sys.modules['serveronly'] = module

    class Foo(object):
        pass
    Foo.__module__, Foo.__qualname__ = 'serveronly', 'Foo'
    module.Foo = Foo
    yield task.sleep(0.1)
    return Foo()


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.MonitorStatus):
            emit('status', [type_name(msg.type), str(msg.value)])


def client_proc(computation, task=None):
    if (yield within(20, computation.schedule())):
        raise Exception('not scheduled')
    t0 = time.monotonic()
    value = yield within(20, computation.run_result(compute))
    emit('value', describe(value, time.monotonic() - t0))
    emit('closed', (yield within(20, computation.close())))


status = pycos.Task(status_proc)
pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([compute], status_task=status))
'''


class OneServerNodeTest(NodeCase):

    IP = NODE_B
    CPUS = 1

    def test_value_of_a_class_only_servers_have(self):
        """A task returns an object of a module only the servers have, with a
        status_task: run_result gives a TaskError saying so, promptly, and the
        status_task gets a TaskError status.  (Before, unpickling it for the
        status_task stopped the task_done handler: run_result hung.)"""
        client = self.run_client(SERVER_ONLY_CLASS_CLIENT)
        out = client.output() + nodes_output(self.node)
        value = client.record('value')
        self.assertEqual(value['class'], 'TaskError', out)
        self.assertIn('could not be unpickled', value['text'], out)
        self.assertLess(value['seconds'], 5, out)
        kind, text = client.record('status')
        self.assertEqual(kind, 'TaskError', out)
        self.assertIn('serveronly', text, out)
        self.assertEqual(client.record('closed'), 0, out)

    def test_too_many_arguments(self):
        """run_result(compute, 1, 2, 3) for compute(n): a TaskError naming the
        TypeError at once, and the only server takes the next task.  (Before, the
        task ended as it was made, unseen: run_result hung, the CPU slot was lost.)"""
        client = self.run_client(ARITY_CLIENT)
        out = client.output() + nodes_output(self.node)
        bad = client.record('bad')
        self.assertEqual(bad['class'], 'TaskError', out)
        self.assertIn('TypeError', bad['text'], out)
        self.assertEqual(bad['remote_type'], 'TypeError', out)
        self.assertLess(bad['seconds'], 5, out)
        after, seconds = client.record('after')
        self.assertEqual(after, 42, out)
        self.assertLess(seconds, 5, out)
        self.assertEqual(client.record('closed'), 0, out)

    def test_monitored_task_value_does_not_pickle(self):
        """A remote task monitored by a client task returns threading.Lock(): the
        monitor gets a MonitorStatus whose value is a TaskError describing it, and
        the server serves the next task.  (Before, the send to the monitor raised in
        the server's runner.)"""
        client = self.run_client(UNPICKLABLE_CLIENT)
        out = client.output() + nodes_output(self.node)
        rtask = client.record('rtask')
        monitor = client.record('monitor')
        self.assertIsInstance(monitor, dict, out)
        self.assertEqual(monitor['info'], rtask, out)
        self.assertEqual(monitor['type'], 'StopIteration', out)     # it ended normally
        self.assertEqual(monitor['value_class'], 'TaskError', out)
        self.assertIn('could not be pickled', monitor['value'], out)
        self.assertIn('lock', monitor['value'].lower(), out)
        after, seconds = client.record('after')
        self.assertEqual(after, 42, out)
        self.assertLess(seconds, 5, out)
        self.assertEqual(client.record('closed'), 0, out)

    def test_computation_closed_while_server_setup_runs(self):
        """A computation closed 0.5 s into its server_setup (2 s): the next
        computation gets the node's server and runs a task.  (Before, the server
        finished loading the closed computation and kept it.)"""
        client = self.run_client(SETUP_CLOSED_CLIENT)
        out = client.output() + nodes_output(self.node)
        self.assertEqual(client.record('first_scheduled'), 0, out)
        self.assertEqual(client.record('first_closed'), 0, out)
        self.assertEqual(client.record('second_scheduled'), 0, out)
        self.assertEqual(client.record('second_servers'), self.node.servers, out)
        result, seconds = client.record('second_result')
        self.assertEqual(result, 42, out)
        self.assertLess(seconds, 15, out)
        self.assertEqual(client.record('second_closed'), 0, out)


# ================================================================================
# 3. A node with two servers
# ================================================================================

MANY_CLIENT = '''
# The private scheduler runs here: how often it looks for a server for a waiting run
# (each wake-up of one does) is counted, if it still has that method.
PICKS = [0]
_pick_server = getattr(pycos.Scheduler, '_pick_server', None)
if _pick_server is not None:
    def counting_pick_server(self, *args):
        PICKS[0] += 1
        return _pick_server(self, *args)
    pycos.Scheduler._pick_server = counting_pick_server


def compute(n, task=None):
    yield task.sleep(0.01)
    return n


def client_proc(computation, count, task=None):
    if (yield within(20, computation.schedule())):
        raise Exception('not scheduled')
    t0 = time.monotonic()
    results = yield within(90, computation.run_results(compute, range(count)))
    emit('results', [results, time.monotonic() - t0])
    emit('picks', PICKS[0] if _pick_server is not None else None)
    emit('closed', (yield within(20, computation.close())))


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([compute]), int(sys.argv[1]))
'''

MODULE_CLIENT = '''
sys.path.insert(0, sys.argv[1])
import mymod


def compute(n, task=None):
    yield task.sleep(0.05)
    return mymod.VALUE


def client_proc(computation, task=None):
    if (yield within(20, computation.schedule())):
        raise Exception('not scheduled')
    emit('value', mymod.VALUE)
    emit('results', (yield within(30, computation.run_results(compute, range(4)))))
    emit('closed', (yield within(20, computation.close())))


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([compute, mymod]))
'''


class TwoServerNodeTest(NodeCase):

    IP = NODE_A
    CPUS = 2

    def test_400_tasks_through_run_results(self):
        """run_results of 400 short tasks on two servers: every result, in order,
        within 60 s, and a bounded number of wake-ups of waiting runs.  (Before,
        each free place woke every waiting run: the scheduler's work grew with the
        square of the tasks waiting.)"""
        count = 400
        client = self.run_client(MANY_CLIENT, args=[count], timeout=100)
        out = client.output()[-6000:]
        results, seconds = client.record('results')
        self.assertEqual(results, list(range(count)), out)
        self.assertLess(seconds, 60, out)
        # The herd is not visible from outside (400 tasks take the same time), but it
        # is in the client's private scheduler: about 2 looks for a server per task
        # now, about 320 per task before (128,000 for 400).
        picks = client.record('picks')
        if picks is not None:
            self.assertLess(picks, 10 * count, out)
        self.assertEqual(client.record('closed'), 0, out)

    def test_module_component_is_not_kept_by_servers(self):
        """A module component (mymod.py) with VALUE changed between two computations,
        one after the other, on the same servers: each gets its own VALUE back.
        (Before, a server kept the first computation's module in sys.modules.)"""
        folder = support.temp_folder(self, 'dispytest-mymod-')
        env = dict(client_env([self.node.location]), PYTHONDONTWRITEBYTECODE='1')
        for value in ('first', 'the second value %s' % uuid.uuid4().hex):
            with open(os.path.join(folder, 'mymod.py'), 'w') as f:
                f.write('VALUE = %r\n' % value)
            client = self.run_client(MODULE_CLIENT, args=[folder], env=env)
            out = client.output() + nodes_output(self.node)
            self.assertEqual(client.record('value'), value, out)
            self.assertEqual(client.record('results'), [value] * 4, out)
            self.assertEqual(client.record('closed'), 0, out)


# ================================================================================
# 4. Two programs dialing each other at the same moment
# ================================================================================

DIAL_CLIENT = '''
import os

me_ip, me_port, peer_ip, peer_port, t0 = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                          int(sys.argv[4]), float(sys.argv[5]))
COUNT = 40

# network latency: the accepting side learns of a connection 0.3 s after it came
_attach = pycos._Peers.attach


def slow_attach(self, channel, addr, info):
    time.sleep(0.3)
    return _attach(self, channel, addr, info)


pycos._Peers.attach = slow_attach
pycos.Pycos(node=me_ip, tcp_port=me_port)
got = []
events = []


def sink(task=None):
    task.set_daemon()
    task.register('sink')
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.PeerStatus):
            events.append([str(msg.location), 'Online' if msg.status else 'Offline',
                           round(time.time() - t0, 2)])
        else:
            got.append(msg)


def sender(task=None):
    peer = pycos.Task._reference(pycos.Location(peer_ip, peer_port), 'sink', 'sink')
    yield task.sleep(max(0, t0 - time.time()))
    for i in range(COUNT):
        peer.send(i)
        yield task.sleep(0.2)
    for _ in range(40):             # what is still on its way (at most 2 s)
        if len(got) >= COUNT:
            break
        yield task.sleep(0.05)
    yield task.sleep(max(0, t0 + 0.2 * COUNT + 2.5 - time.time()))
    emit('got', got)
    emit('events', events)
    # both programs have reported before either ends (its end is the other's Offline)
    yield task.sleep(max(0, t0 + 0.2 * COUNT + 4 - time.time()))


s = pycos.Task(sink)
pycos.Pycos.instance().peer_status(s)
pycos.Task(sender)
'''


class DoubleDialTest(unittest.TestCase):

    timeout = 90

    def test_double_dial_keeps_one_connection(self):
        """Two programs (127.0.0.7 and 127.0.0.8, pulse every 0.4 s, connections
        accepted 0.3 s late) each send 40 messages to the other's task, starting at
        the same moment: each receives all 40 and sees the other go Online once and
        never Offline.  (Before, each side kept a connection of its own, the peer
        flapped Offline / Online and messages were lost.)"""
        ips = ['127.0.0.7', '127.0.0.8']
        ports = [free_ports(ip, 1) for ip in ips]
        env = dict(clean_environ(), DISPYCOS_PULSE='0.4')
        start = time.time() + 3             # both started, their network up
        clients = []
        for me, other in ((0, 1), (1, 0)):
            clients.append(Client(self, None, env, [ips[me], ports[me], ips[other],
                                                    ports[other], start],
                                  script(DIAL_CLIENT)))
        for client in clients:
            client.finish(CLIENT_TIMEOUT)
        for client, other in zip(clients, (1, 0)):
            out = client.output()
            got = client.record('got')
            self.assertEqual(len(got), 40, out)
            self.assertEqual(sorted(got), list(range(40)), out)
            events = client.record('events')
            self.assertEqual([e[:2] for e in events],
                             [['%s:%d' % (ips[other], ports[other]), 'Online']], out)


TWO_NAMES_B = '''
# B serves on one address and announces another (--ext_ip_addr); it talks to A first
node, ext, a_addr, a_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pycos.Pycos(node=node, tcp_port=0, ext_ip_addr=ext)
emit('port', pycos.Pycos.instance().location.port)


def main(task=None):
    a = pycos.Task._reference(pycos.Location(a_addr, a_port), 'sink', 'sink')
    for _ in range(100):
        a.send('hello from B')
        yield task.sleep(0.1)


pycos.Task(main)
'''

TWO_NAMES_A = '''
# A hears from B (under B's announced location), then peers B at its real address
me, me_port = sys.argv[1], int(sys.argv[2])
pycos.Pycos(node=me, tcp_port=me_port)


def sink(task=None):
    task.register('sink')
    emit('got', (yield task.receive(timeout=20)))
    b_addr, b_port = sys.argv[3], int(sys.argv[4])
    t0 = time.monotonic()
    result = yield pycos.Pycos().peer(pycos.Location(b_addr, b_port))
    emit('peer', [result, time.monotonic() - t0])


pycos.Task(sink)
'''


class TwoNamesTest(unittest.TestCase):

    timeout = 90

    def test_peer_known_under_two_locations_answers(self):
        """B (serving on 127.0.0.43, announcing 127.0.0.42) sends to A first; A then
        peers B at 127.0.0.43: B answers on the connection A knows under the other
        location, and the answer counts.  (Before, answers were taken only from the
        location asked: peer() gave -1 after 10 s.)"""
        a_port = free_ports('127.0.0.44', 1)
        env = clean_environ()
        a = Client(self, None, env, ['127.0.0.44', a_port, '127.0.0.43', 0],
                   script(TWO_NAMES_A))
        b = Client(self, None, env, ['127.0.0.43', '127.0.0.42', '127.0.0.44', a_port],
                   script(TWO_NAMES_B))
        b_port = b.wait_record('port', 20)
        self.assertIsNotNone(b_port, b.output())
        a.kill()                        # A again, now that B's port is known
        a = Client(self, None, env, ['127.0.0.44', a_port, '127.0.0.43', b_port],
                   script(TWO_NAMES_A))
        a.finish(CLIENT_TIMEOUT)
        self.assertEqual(a.record('got'), 'hello from B', a.output())
        result, seconds = a.record('peer')
        self.assertEqual(result, 0, a.output())
        self.assertLess(seconds, 5, a.output())


# ================================================================================
# 5. The runtime, without the network
# ================================================================================

WAIT = 10.0


class RuntimeRegressTest(unittest.TestCase):

    timeout = 60

    def spawn(self, target, *args):
        task = dispycos.Task(target, *args)
        self.addCleanup(task.terminate)
        return task

    def from_thread(self, func, delay=0.3):
        """Calls ``func`` from a plain thread (not the runner), ``delay`` s from now
        (the task waits by then)."""
        thread = threading.Thread(target=lambda: (time.sleep(delay), func()),
                                  name='plain thread', daemon=True)
        thread.start()
        self.addCleanup(thread.join, WAIT)

    def test_channel_subscribe_then_send_from_a_thread(self):
        """subscribe() then send() from a plain thread: the subscriber gets it (a
        subscription handed to the runner later would miss it)."""
        def sub(task=None):
            return (yield task.receive(timeout=WAIT))
        task = self.spawn(sub)
        channel = dispycos.Channel('from-a-thread-%d' % id(task))
        self.addCleanup(channel.close)
        self.assertEqual(channel.subscribe(task), 0)
        self.assertEqual(channel.send('hi'), 1)
        self.assertEqual(task.value(WAIT), 'hi')

    def test_semaphore_release_from_a_thread_wakes_the_task(self):
        """(Before, the wake-up from another thread went into the runner's ready
        list without waking the runner: the task slept on.)"""
        sem = dispycos.Semaphore(0)
        woken = threading.Event()

        def waiter(task=None):
            ok = yield sem.acquire()
            woken.set()
            return ok

        task = self.spawn(waiter)
        self.from_thread(sem.release)
        self.assertTrue(woken.wait(5), 'Semaphore.release from a thread did not wake')
        self.assertTrue(task.value(timeout=WAIT))

    def test_lock_release_from_a_thread_wakes_the_task(self):
        lock = dispycos.Lock()
        held, woken = threading.Event(), threading.Event()

        def holder(task=None):
            yield lock.acquire()
            held.set()                  # ends holding the lock

        def waiter(task=None):
            ok = yield lock.acquire()
            woken.set()
            lock.release()
            return ok

        self.spawn(holder)
        self.assertTrue(held.wait(WAIT))
        task = self.spawn(waiter)
        self.from_thread(lock.release)
        self.assertTrue(woken.wait(5), 'Lock.release from a thread did not wake')
        self.assertTrue(task.value(timeout=WAIT))
        self.assertFalse(lock.locked())

    def test_condition_notify_from_a_thread_wakes_the_task(self):
        cond = dispycos.Condition()
        woken = threading.Event()

        def waiter(task=None):
            yield cond.acquire()
            notified = yield cond.wait()
            cond.release()
            woken.set()
            return notified

        task = self.spawn(waiter)
        self.from_thread(cond.notify)
        self.assertTrue(woken.wait(5), 'Condition.notify from a thread did not wake')
        self.assertTrue(task.value(timeout=WAIT))

    def test_polled_waits_leave_short_waiter_lists(self):
        """20,000 ``ev.wait(0)`` and 20,000 ``other.finish(timeout=0)``: the event's
        and the task's waiter lists stay short.  (Before, every timed-out wait
        stayed in them.)"""
        ev = dispycos.Event()
        polls = 20000

        def long(task=None):
            yield task.sleep(60)

        def poller(other, task=None):
            for _ in range(polls):
                yield ev.wait(0)
            for _ in range(polls):
                yield other.finish(timeout=0)
            return [len(ev._waiters), len(other._finish_waiters)]

        other = self.spawn(long)
        task = self.spawn(poller, other)
        event_waiters, finish_waiters = task.value(timeout=40)
        self.assertLess(event_waiters, 200)
        self.assertLess(finish_waiters, 200)
        self.assertFalse(task.is_alive())


if __name__ == '__main__':
    unittest.main()
