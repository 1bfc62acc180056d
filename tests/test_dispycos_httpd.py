"""The dispycos web monitor (``dispycos.httpd.HTTPServer``, dispyhttpd.DispycosHTTPServer).

Two ``python3 dispycosnode.py`` processes (127.0.0.2 and 127.0.0.3, 2 servers each, as
in test_dispycos.py, run by a Python with psutil when there is one, so that they report
their availability); clients are scripts in subprocesses that make the monitor on
127.0.0.1 and a free port, and report what they saw as ``@key <json>`` lines.  The
tests read the JSON endpoints with http.client and drive the page in a headless
Chromium (``tests/browser_driver.py``'s runner, with the steps of this file: this file
run as ``python test_dispycos_httpd.py --driver SPEC`` by a Python with Playwright).

Classes:

    ModelTest      ComputationMonitor fed status messages in this process (no network):
                   counts, an end before its creation, duplicates, a server that closes
                   with tasks running, text of arguments (str(), cut short, broken str())
    ApiTest        the endpoints against the two nodes: cluster / node / server figures,
                   the nodes' availability, task arguments as text, show_task_args, terminating tasks by POST (the
                   client sees them end terminated), refusals (no token, another Origin,
                   another site, a foreign Host, unknown node / server / task, bad
                   bodies), shutdown(wait=False) and shutdown(wait=True) free the port
    ChainTest      a client with its own status_task: with the monitor chained in, it
                   gets every message exactly once, the same ones as without it
    BrowserTest    the page in Chromium: Cluster (both nodes, sorting by address and by
                   tasks submitted, the Show Task Arguments checkbox), Node (servers,
                   availability), Server (hostile arguments shown as inert text),
                   selecting and terminating a task from the Server page (the client
                   sees it end terminated), a POST without the token refused, a phone's
                   width; no console errors, page errors or CSP violations
    ExamplesTest   dispycos_httpd1.py, dispycos_httpd2.py and dispycos_client2.py run
                   unchanged; their monitor answers while they run

Every wait is bounded; every process a test starts is stopped by a cleanup, by PID.
"""

import collections
import json
import os
import re
import socket
import subprocess
import sys
import time
import unittest

try:
    from tests import support
    from tests.test_dispycos import (CLIENT_IP, EXAMPLES, NODE_A, NODE_B, DispycosNode,
                                     NodePairCase, listening, stop_checked)
    from tests.test_httpd import HTTP
    from tests import test_browser
except ImportError:                         # run from inside tests/ (the browser driver)
    import support
    from test_dispycos import (CLIENT_IP, EXAMPLES, NODE_A, NODE_B, DispycosNode,
                               NodePairCase, listening, stop_checked)
    from test_httpd import HTTP
    import test_browser

import dispycos
import dispyhttpd

wait_until = support.wait_until
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
HERE = os.path.abspath(__file__)


# ================================================================================
# The client script (arguments: one JSON object, see CLIENT_DEFAULTS)
# ================================================================================

CLIENT_DEFAULTS = {
    'port': 0,              # the monitor's port (0: no monitor)
    'quick_at': [],         # addresses: one short task (run_result_at) each, in order
    'hold': 0,              # long tasks (run), with hostile arguments, after the quick ones
    'hold_seconds': 60,
    'show_task_args': True,
    'own_status': True,     # the computation gets a status task of the client's own
    'stop_file': None,      # once closed, the client waits for it before shutdown()
    'shutdown_wait': False,
}

CLIENT = r'''
import os
import dispycos.httpd
from dispycos import Computation, Scheduler, DispycosStatus, MonitorStatus

conf = json.loads(sys.argv[1])
XSS = %r


class Shown:
    """A user class with __str__: the Server page shows str() of each argument."""
    def __init__(self, text):
        self.text = text

    def __str__(self):
        return 'Shown(%%s)' %% self.text


def quick(n, task=None):
    yield task.sleep(0.2)
    return n * n


def hold(seconds, *notes, task=None, **named):
    yield task.sleep(seconds)
    return len(notes)


waiter = []


def status_proc(task=None):
    """The client's own status task: every message, as it arrives."""
    while True:
        msg = yield task.receive()
        if isinstance(msg, MonitorStatus):
            emit('ended', {'task': str(msg.info), 'type': getattr(msg.type, '__name__',
                                                                 str(msg.type))})
            if waiter:
                waiter[0].send(str(msg.info))
        elif isinstance(msg, DispycosStatus):
            info = msg.info
            key = info.task if msg.status == pycos.TaskCreated else getattr(
                info, 'location', info)
            emit('status', [msg.status, str(key)])
        else:
            emit('other', repr(msg))


def client_proc(computation, task=None):
    waiter.append(task)
    if (yield computation.schedule()):
        emit('error', 'not scheduled')
        return
    results = []
    for addr in conf['quick_at']:
        results.append((yield computation.run_result_at(addr, quick, len(results))))
    emit('quick', results)
    held = []
    for _ in range(conf['hold']):
        rtask = yield computation.run(hold, conf['hold_seconds'], XSS, Shown(XSS),
                                      [1, 'two', XSS], label=XSS)
        held.append(str(rtask))
    emit('held', held)
    pending = set(held)
    deadline = time.monotonic() + conf['hold_seconds'] + 30
    while pending and conf['own_status']:
        key = yield task.receive(timeout=max(0.1, deadline - time.monotonic()))
        if key is None:
            emit('error', 'tasks still running: %%s' %% sorted(pending))
            break
        pending.discard(key)
    yield computation.close()
    emit('closed', True)


Scheduler()
status_task = None
if conf['own_status']:
    status_task = pycos.Task(status_proc)
    status_task.set_daemon()
computation = Computation([quick, hold, Shown], status_task=status_task)
http_server = None
if conf['port']:
    http_server = dispycos.httpd.HTTPServer(computation, host='127.0.0.1', port=conf['port'],
                                            poll_sec=1, show_task_args=conf['show_task_args'])
    emit('http', {'port': http_server.port, 'token': http_server.token,
                  # the monitor took the computation's status task (the program's own
                  # is told through it)
                  'chained': computation.status_task not in (None, status_task)})
pycos.Task(client_proc, computation).value()
deadline = time.monotonic() + 60
while conf['stop_file'] and not os.path.exists(conf['stop_file']) and \
        time.monotonic() < deadline:
    time.sleep(0.05)
if http_server is not None:
    started, polls = time.monotonic(), http_server._polls
    http_server.shutdown(wait=conf['shutdown_wait'])
    emit('shutdown', {'seconds': time.monotonic() - started, 'polls_before': polls,
                      'polls_after': http_server._polls,
                      'status_task_back': computation.status_task is status_task})
''' % XSS


def port_freed(port):
    """Nothing listens on the monitor's port, and a new monitor may bind it (as
    MonitorHTTPServer does: SO_REUSEADDR, so connections in TIME_WAIT do not count)."""
    if listening(CLIENT_IP, port):
        return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((CLIENT_IP, port))
        except OSError:
            return False
    return True


def expected_arg_texts(seconds):
    """What the Server page shows of a hold task's arguments (str() of each)."""
    return ([str(seconds), XSS, 'Shown(%s)' % XSS, str([1, 'two', XSS])], {'label': XSS})


def psutil_python():
    """A Python that has psutil (its nodes report their availability), or None."""
    for python in (sys.executable, os.path.join(support.ROOT, '.venv-tests', 'bin', 'python')):
        try:
            if os.path.exists(python) and subprocess.run(
                    [python, '-c', 'import psutil'], stdin=subprocess.DEVNULL,
                    capture_output=True, timeout=30).returncode == 0:
                return python
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


class MonitorClientCase(NodePairCase):
    """NodePairCase's two nodes, run by a Python with psutil when there is one (then
    they report availability); runs the client script with a monitor and reads its
    endpoints."""

    timeout = 150

    @classmethod
    def setUpClass(cls):
        cls.node_python = psutil_python()
        nodes = []
        for ip in (NODE_A, NODE_B):
            node = DispycosNode(ip)
            node.python = cls.node_python or node.python
            cls.addClassCleanup(stop_checked, node)
            nodes.append(node.start())
        cls.node_a, cls.node_b = cls.nodes = tuple(nodes)
        cls.servers = set(cls.node_a.servers + cls.node_b.servers)
        cls.peers = [cls.node_a.location, cls.node_b.location]

    def start_monitored(self, **conf):
        conf = dict(CLIENT_DEFAULTS, **conf)
        if conf['port'] is None:
            conf['port'] = support.free_port(CLIENT_IP)
        if conf['stop_file'] is True:
            conf['stop_file'] = os.path.join(support.temp_folder(self), 'stop')
        client = self.start_client(CLIENT, args=[json.dumps(conf)])
        client.conf = conf
        if conf['port']:
            http = client.wait_record('http', 30)
            self.assertIsNotNone(http, client.output())
            self.assertEqual(http['port'], conf['port'])
            self.assertTrue(http['chained'], client.output())
            client.token = http['token']
            client.http = HTTP(conf['port'], host=CLIENT_IP)
        return client

    def get(self, client, path):
        return client.http.get(path)

    def wait_figures(self, client, predicate, timeout=30, what=''):
        """The /api/cluster data once ``predicate(data)`` holds."""
        box = []

        def check():
            box[:] = [self.get(client, '/api/cluster')]
            return predicate(box[0])
        if not wait_until(check, timeout, 0.1):
            self.fail('the monitor never showed %s: %s\n%s' % (what, box and box[0],
                                                                client.output()))
        return box[0]

    def post(self, client, path, body, headers=None):
        headers = dict({dispyhttpd.TOKEN_HEADER: client.token}, **(headers or {}))
        return client.http.json('POST', path, body, headers)

    def server_tasks(self, client):
        """{server location: [task, ...]} of every server the monitor knows."""
        found = {}
        for node in self.get(client, '/api/cluster')['nodes']:
            info = self.get(client, '/api/node?addr=' + node['addr'])
            for server in info['server_list']:
                found[server['location']] = self.get(
                    client, '/api/server?location=' + server['location'])['tasks']
        return found

    def stop(self, client):
        with open(client.conf['stop_file'], 'w'):
            pass

    def wait_closed(self, client, timeout=30):
        """Until the client reports its computation closed."""
        self.assertTrue(wait_until(lambda: client.records().get('closed'), timeout),
                        client.output())

    def finish(self, client):
        """The client's stop file, then its end (checked)."""
        self.stop(client)
        client.finish(60, self.nodes_output())

    def ended(self, client):
        return {r['task']: r['type'] for r in client.records().get('ended', [])}


# ================================================================================
# 1. The model, in this process
# ================================================================================

class ModelTest(unittest.TestCase):
    """ComputationMonitor.message with the messages a scheduler sends (no network)."""

    timeout = 30

    def setUp(self):
        self.model = dispyhttpd.ComputationMonitor(dispycos, 'c1')

    def send(self, status, info):
        self.model.message(dispycos.DispycosStatus(status, info))

    @staticmethod
    def task(server, tid, name='compute'):
        return dispycos.Task._reference(server, tid, name)

    def node(self, addr, **avail):
        info = dispycos.DispycosNodeAvailInfo(dispycos.Location(addr, 9706), name='n-' + addr,
                                              servers=2, **avail)
        self.send(dispycos.NodeDiscovered, info)
        self.send(dispycos.NodeInitialized, info)
        servers = [dispycos.Location(addr, 9707 + i) for i in range(2)]
        for loc in servers:
            self.send(dispycos.ServerDiscovered, loc)
            self.send(dispycos.ServerInitialized, loc)
        return servers

    def created(self, task, *args, **kwargs):
        self.send(dispycos.TaskCreated, dispycos.TaskInfo(task, args, kwargs, time.time()))

    def ended(self, task, how=StopIteration):
        self.model.message(dispycos.MonitorStatus(task, how, None))

    def test_counts_per_node_and_server(self):
        s1, s2 = self.node('10.0.0.1', cpu=50.0, memory=1 << 30)
        s3, _s4 = self.node('10.0.0.2')
        tasks = [self.task(s1, 1), self.task(s1, 2), self.task(s2, 3), self.task(s3, 4)]
        for t in tasks:
            self.created(t, 1, x=2)
        self.ended(tasks[0])
        self.ended(tasks[1], GeneratorExit)
        self.ended(tasks[3], ZeroDivisionError)
        self.send(dispycos.ComputationScheduled, None)
        c = self.model.cluster()
        self.assertEqual((c['submitted'], c['done'], c['running'], c['terminated'],
                          c['failed']), (4, 3, 1, 1, 1))
        self.assertEqual(c['computation']['state'], 'scheduled')
        nodes = {n['addr']: n for n in c['nodes']}
        self.assertEqual((nodes['10.0.0.1']['submitted'], nodes['10.0.0.1']['done'],
                          nodes['10.0.0.1']['running'], nodes['10.0.0.1']['servers']),
                         (3, 2, 1, 2))
        self.assertEqual(nodes['10.0.0.1']['avail'], {'cpu': 50.0, 'memory': 1 << 30,
                                                      'disk': None, 'swap': None})
        self.assertIsNone(nodes['10.0.0.2']['avail'])
        self.assertEqual(nodes['10.0.0.1']['name'], 'n-10.0.0.1')
        self.assertEqual(nodes['10.0.0.1']['state'], 'ready')
        figures, running = self.model.server(str(s2))
        self.assertEqual((figures['submitted'], figures['done'], figures['running']), (1, 0, 1))
        self.assertEqual([key for key, _entry in running], ['compute/3@10.0.0.1:9708'])
        self.assertIs(self.model.running_task(str(s2), 'compute/3@10.0.0.1:9708'), tasks[2])
        self.assertIsNone(self.model.running_task(str(s1), 'compute/3@10.0.0.1:9708'))
        node = self.model.node('10.0.0.1')
        self.assertEqual([s['location'] for s in node['server_list']], [str(s1), str(s2)])
        self.assertIsNone(self.model.node('10.0.0.9'))

    def test_duplicates_and_order(self):
        """An end before its creation, a repeated message and an end of a task never
        created count each task once."""
        s1, _s2 = self.node('10.0.0.1')
        a, b, c = self.task(s1, 1), self.task(s1, 2), self.task(s1, 3)
        self.ended(a)
        self.created(a)             # late: counted already
        self.created(b)
        self.created(b)
        self.ended(b)
        self.ended(b)
        self.ended(c)               # its TaskCreated never came
        figures = self.model.cluster()
        self.assertEqual((figures['submitted'], figures['done'], figures['running']), (3, 3, 0))

    def test_server_closed_before_its_tasks_end(self):
        """A task's end that comes after its server's ServerClosed still says how it
        ended; tasks whose end never came are done when the computation closes."""
        s1, s2 = self.node('10.0.0.1')
        a, b = self.task(s1, 1), self.task(s2, 2)
        self.created(a)
        self.created(b)
        self.send(dispycos.ServerClosed, s1)
        self.ended(a, GeneratorExit)    # after the close (a close's terminations)
        self.ended(a, GeneratorExit)    # (a repeat is not counted twice)
        c = self.model.cluster()
        self.assertEqual((c['done'], c['running'], c['terminated']), (1, 1, 1))
        self.send(dispycos.NodeClosed, dispycos.DispycosNodeAvailInfo(
            dispycos.Location('10.0.0.1', 9706)))
        self.send(dispycos.ComputationClosed, None)
        c = self.model.cluster()
        self.assertEqual((c['submitted'], c['done'], c['running']), (2, 2, 0))
        self.assertEqual(c['nodes'][0]['state'], 'closed')
        self.assertEqual(c['nodes'][0]['servers'], 1)      # s2 not closed
        self.assertEqual(c['computation']['state'], 'closed')
        self.assertEqual(self.model.server(str(s1))[0]['state'], 'closed')

    def test_other_messages_ignored(self):
        for msg in (None, 'text', dispycos.DispycosStatus('NoSuchStatus', 1),
                    dispycos.DispycosStatus(dispycos.TaskCreated, None),
                    dispycos.MonitorStatus('not a task', StopIteration)):
            self.model.message(msg)
        self.assertEqual(self.model.cluster()['submitted'], 0)

    def test_argument_texts(self):
        class Broken:
            def __str__(self):
                raise ValueError('no')

        class Mine:
            def __str__(self):
                return 'mine!'
        info = dispycos.TaskInfo(None, ('x' * 5000, Broken(), Mine(), list(range(10000)), 3),
                                 {'k': XSS}, 0)
        args, kwargs = dispyhttpd._argument_texts(info)
        self.assertEqual(len(args[0]), dispyhttpd.MAX_SHOWN + 3)
        self.assertEqual(args[1], '<unprintable Broken: no>')
        self.assertEqual(args[2], 'mine!')
        self.assertTrue(args[3].startswith('[0, 1, 2') and args[3].endswith('...]'), args[3])
        self.assertEqual(args[4], '3')
        self.assertEqual(kwargs, {'k': XSS})
        many = dispycos.TaskInfo(None, tuple(range(50)), {}, 0)
        args, _ = dispyhttpd._argument_texts(many)
        self.assertEqual(len(args), dispyhttpd.MAX_ARGS_SHOWN + 1)
        self.assertEqual(args[-1], '... (30 more)')


# ================================================================================
# 2. The endpoints, against real nodes
# ================================================================================

def forwarded_gen(task=None):       # (a component for the in-process Computation below)
    yield task.sleep(0)


class InProcessTest(unittest.TestCase):
    """The monitor's status tasks in this process (no node needed)."""

    timeout = 30

    def test_program_forwarding_to_the_monitor_does_not_loop(self):
        """pycos-era chaining: the program's own status task (the computation's)
        passes each message on to http_server.status_task: each is seen once by
        both, and the monitor's figures take it."""
        seen = []

        def own(task=None):
            for _ in range(100000):
                msg = yield task.receive()
                seen.append(msg)
                server.status_task.send(msg)
        own_task = dispycos.Task(own)
        own_task.set_daemon()
        computation = dispycos.Computation([forwarded_gen], status_task=own_task)
        server = dispyhttpd.DispycosHTTPServer(computation, host=CLIENT_IP,
                                               port=support.free_port(CLIENT_IP))
        self.addCleanup(server.shutdown, False)
        for port in (1, 2):
            computation.status_task.send(dispycos.DispycosStatus(
                dispycos.ServerInitialized, dispycos.Location('127.0.0.9', port)))
        self.assertTrue(support.wait_until(lambda: len(seen) >= 2, 10), seen)
        # a loop would bring them back at once, again and again
        self.assertFalse(support.wait_until(lambda: len(seen) > 2, 1.0), len(seen))
        self.assertEqual(sorted(server.monitor.servers), ['127.0.0.9:1', '127.0.0.9:2'])

    def test_shutdown_wait_from_a_task_holds_up_no_task(self):
        """shutdown(wait=True) in a task returns at once (the wait is a thread's)."""
        computation = dispycos.Computation([forwarded_gen])
        server = dispycos.httpd.HTTPServer(computation, host=CLIENT_IP,
                                           port=support.free_port(CLIENT_IP), poll_sec=5)
        server._server._last_poll = time.monotonic()     # as if a browser polls
        timings = {}

        def stopper(task=None):
            started = time.monotonic()
            server.shutdown(wait=True)
            timings['shutdown'] = time.monotonic() - started
            yield task.sleep(0)

        def sleeper(task=None):
            started = time.monotonic()
            yield task.sleep(0.2)
            timings['sleep'] = time.monotonic() - started
        dispycos.Task(stopper)
        dispycos.Task(sleeper).value(10)
        self.assertLess(timings['shutdown'], 1.0, timings)
        self.assertLess(timings['sleep'], 1.0, timings)     # not held up for poll_sec
        self.assertTrue(support.wait_until(lambda: server._server.stopped, 10))


class ApiTest(MonitorClientCase):

    def test_figures_arguments_terminate_and_shutdown(self):
        client = self.start_monitored(port=None, quick_at=[NODE_A, NODE_A, NODE_B], hold=4,
                                      stop_file=True)
        data = self.wait_figures(client, lambda d: d['running'] == 4 and d['done'] == 3,
                                 what='4 tasks running, 3 done')
        self.assertEqual((data['submitted'], data['terminated'], data['failed']), (7, 0, 0))
        self.assertEqual(data['computation']['state'], 'scheduled')
        self.assertTrue(data['show_task_args'])
        self.assertEqual(data['poll_sec'], 1)
        nodes = {n['addr']: n for n in data['nodes']}
        self.assertEqual(sorted(nodes), sorted([NODE_A, NODE_B]))
        for node, quick in ((self.node_a, 2), (self.node_b, 1)):
            figures = nodes[node.addr]
            self.assertEqual((figures['servers'], figures['submitted'], figures['done'],
                              figures['running'], figures['state'], figures['location']),
                             (2, quick + 2, quick, 2, 'ready', node.location), figures)
            info = self.get(client, '/api/node?addr=' + node.addr)
            self.assertEqual(sorted(s['location'] for s in info['server_list']),
                             sorted(node.servers))
            if self.node_python:        # psutil there: what it reported
                self.assertEqual(sorted(info['avail']), ['cpu', 'disk', 'memory', 'swap'])
                self.assertTrue(all(isinstance(v, (int, float)) and v >= 0
                                    for v in info['avail'].values()), info)
                self.assertEqual(figures['avail'], info['avail'])
            else:
                self.assertIsNone(info['avail'])
            self.assertEqual(sum(s['running'] for s in info['server_list']), 2)
            self.assertEqual(info['name'], node.name)
        # each server runs one hold task: its arguments are str() of each, as text
        tasks = self.server_tasks(client)
        self.assertEqual(sorted(tasks), sorted(self.servers))
        held = client.wait_record('held', 10)
        self.assertEqual(sorted(t['key'] for ts in tasks.values() for t in ts), sorted(held))
        args, kwargs = expected_arg_texts(60)
        for location, running in tasks.items():
            self.assertEqual(len(running), 1, tasks)
            task = running[0]
            self.assertTrue(task['key'].endswith('@' + location), task)
            self.assertTrue(task['name'].startswith('hold/'), task)
            self.assertEqual((task['args'], task['kwargs']), (args, kwargs))
            self.assertLess(abs(task['start_time'] - time.time()), 60)
        # show_task_args: off (no arguments sent), on again
        status, answer = self.post(client, '/api/settings', {'show_task_args': False})
        self.assertEqual((status, answer), (200, {'show_task_args': False}))
        some = sorted(tasks)[0]
        shown = self.get(client, '/api/server?location=' + some)
        self.assertFalse(shown['show_task_args'])
        self.assertNotIn('args', shown['tasks'][0])
        self.assertEqual(self.post(client, '/api/settings', {'show_task_args': True})[0], 200)
        self.assertEqual(self.get(client, '/api/server?location=' + some)['tasks'][0]['args'],
                         args)
        # terminate: one task, then the other three at once (one not running: refused)
        first = tasks[some][0]['key']
        status, answer = self.post(client, '/api/terminate', {'server': some, 'tasks': [first]})
        self.assertEqual((status, answer), (200, {'terminated': [first], 'failed': []}))
        self.assertTrue(wait_until(lambda: self.ended(client).get(first), 15), client.output())
        rest = {loc: ts[0]['key'] for loc, ts in tasks.items() if loc != some}
        for location, key in rest.items():
            status, answer = self.post(client, '/api/terminate',
                                       {'server': location, 'tasks': [key, first]})
            self.assertEqual((status, answer), (200, {'terminated': [key], 'failed': [first]}))
        self.wait_closed(client)
        self.assertEqual({k: self.ended(client)[k] for k in held},
                         {k: 'GeneratorExit' for k in held})
        data = self.get(client, '/api/cluster')
        self.assertEqual((data['submitted'], data['done'], data['running'], data['terminated']),
                         (7, 7, 0, 4))
        self.assertEqual(data['computation']['state'], 'closed')
        self.assertEqual({n['state'] for n in data['nodes']}, {'closed'})
        # shutdown(wait=False): at once, the port is free, the client's status task back
        self.finish(client)
        shutdown = client.record('shutdown')
        self.assertLess(shutdown['seconds'], 3, shutdown)
        self.assertTrue(shutdown['status_task_back'], shutdown)
        self.assertTrue(port_freed(client.conf['port']))
        self.assertNotIn('Traceback', client.stderr(), client.output())

    def test_refusals(self):
        client = self.start_monitored(port=None, hold=1, hold_seconds=20, stop_file=True)
        self.wait_figures(client, lambda d: d['running'] == 1, what='a task running')
        (location, tasks), = [(k, v) for k, v in self.server_tasks(client).items() if v]
        body = {'server': location, 'tasks': [tasks[0]['key']]}
        http = client.http
        origin = 'http://%s:%d' % (CLIENT_IP, client.conf['port'])
        # changes: no token, a wrong one, another site's Origin, a cross-site fetch
        for headers in ({}, {dispyhttpd.TOKEN_HEADER: 'x' * 32}):
            status, _ = http.json('POST', '/api/terminate', body, headers)
            self.assertEqual(status, 403, headers)
        for extra in ({'Origin': 'http://evil.example'}, {'Origin': origin.replace('http:', 'https:')},
                      {'Origin': origin, 'Sec-Fetch-Site': 'cross-site'}):
            status, answer = self.post(client, '/api/terminate', body, extra)
            self.assertEqual(status, 403, (extra, answer))
        status, _ = self.post(client, '/api/settings', {'show_task_args': False},
                              {'Origin': 'http://evil.example'})
        self.assertEqual(status, 403)
        # a foreign Host (DNS rebinding), GET of a change, unknown names, bad bodies
        self.assertEqual(http.json('GET', '/api/cluster', headers={'Host': 'evil.example'})[0],
                         421)
        self.assertEqual(http.json('GET', '/api/terminate')[0], 405)
        self.assertEqual(http.json('GET', '/api/node?addr=10.9.9.9')[0], 404)
        self.assertEqual(http.json('GET', '/api/server?location=10.9.9.9:1')[0], 404)
        self.assertEqual(self.post(client, '/api/terminate', {'server': '10.9.9.9:1',
                                                              'tasks': []})[0], 404)
        for bad in ({'server': location, 'tasks': 'all'}, {'server': location}):
            self.assertEqual(self.post(client, '/api/terminate', bad)[0], 400, bad)
        self.assertEqual(self.post(client, '/api/settings', {'show_task_args': 'yes'})[0], 400)
        status, _headers, _data = http.request('POST', '/api/terminate', b'{',
                                               {'Content-Type': 'application/json',
                                                dispyhttpd.TOKEN_HEADER: client.token})
        self.assertEqual(status, 400)
        self.assertEqual(self.post(client, '/api/terminate', dict(body, tasks=['nope']))[1],
                         {'terminated': [], 'failed': ['nope']})
        # nothing was terminated by all that; the page itself is served with its policy
        self.assertEqual(self.get(client, '/api/cluster')['running'], 1)
        status, headers, page = http.request('GET', '/')
        self.assertEqual(status, 200)
        self.assertIn(b'dispycos monitor', page)
        self.assertIn(client.token.encode(), page)
        self.assertIn("script-src 'self'", headers['Content-Security-Policy'])
        for path in ('/dispycos.js', '/monitor-kit.js', '/monitor.css'):
            self.assertEqual(http.request('GET', path)[0], 200, path)
        self.assertEqual(self.post(client, '/api/terminate', body)[0], 200)
        self.wait_closed(client)
        self.finish(client)

    def test_shutdown_wait_serves_the_last_poll(self):
        """shutdown(wait=True) while a browser polls: one more poll is served, then it
        returns (within poll_sec + 1) and the port is free; with no poll for a while
        it returns at once."""
        for polling in (True, False):
            with self.subTest(polling=polling):
                client = self.start_monitored(port=None, quick_at=[NODE_A], stop_file=True,
                                              shutdown_wait=True)
                self.wait_figures(client, lambda d: d['computation']['state'] == 'closed',
                                  what='the computation closed')
                if not polling:
                    time.sleep(3.3)     # past 2 * poll_sec + 1: nobody is polling
                self.stop(client)
                for _ in range(100 if polling else 0):
                    if client.records().get('shutdown') or client.proc.poll() is not None:
                        break
                    try:
                        self.get(client, '/api/cluster')
                    except (OSError, AssertionError):
                        break           # stopped (refused, or 503 while it stops)
                    time.sleep(0.2)
                client.finish(30, self.nodes_output())
                shutdown = client.record('shutdown')
                if polling:
                    self.assertGreater(shutdown['polls_after'], shutdown['polls_before'],
                                       shutdown)
                    self.assertLess(shutdown['seconds'], 2.5, shutdown)
                else:
                    self.assertLess(shutdown['seconds'], 0.6, shutdown)
                self.assertTrue(port_freed(client.conf['port']))


# ================================================================================
# 3. The client's own status task, chained
# ================================================================================

class ChainTest(MonitorClientCase):

    def statuses(self, monitored):
        client = self.start_monitored(port=None if monitored else 0,
                                      quick_at=[NODE_A, NODE_B, NODE_A, NODE_B], hold=0,
                                      stop_file=True)
        self.wait_closed(client, 60)
        figures = self.get(client, '/api/cluster') if monitored else None
        self.finish(client)
        records = client.records()
        return records.get('status', []), records.get('ended', []), figures, client

    def test_every_message_once(self):
        plain, plain_ended, _, _ = self.statuses(False)
        chained, ended, figures, client = self.statuses(True)
        output = client.output()
        # every message exactly once: no (status, what) twice, the same ones as without
        # the monitor (tasks have other ids in the other run: counted by kind)
        self.assertEqual(len(chained), len({tuple(s) for s in chained}), output)
        self.assertEqual(len(ended), len({e['task'] for e in ended}), output)

        def kinds(statuses):        # tasks, and the scheduler (the client's port), by kind
            by_kind = (dispycos.TaskCreated, dispycos.ComputationScheduled,
                       dispycos.ComputationClosed)
            return collections.Counter(s[0] if s[0] in by_kind else tuple(s) for s in statuses)
        self.assertEqual(kinds(chained), kinds(plain), output)
        self.assertEqual(len(ended), len(plain_ended), output)
        created = [s[1] for s in chained if s[0] == dispycos.TaskCreated]
        self.assertEqual(len(created), 4, output)
        self.assertEqual(sorted(created), sorted(e['task'] for e in ended), output)
        for status in (dispycos.ServerInitialized, dispycos.ServerClosed):
            self.assertEqual(sorted(s[1] for s in chained if s[0] == status),
                             sorted(self.servers), output)
        for status in (dispycos.NodeInitialized, dispycos.NodeClosed):
            self.assertEqual(sorted(s[1] for s in chained if s[0] == status),
                             sorted(self.peers), output)
        self.assertEqual([s[0] for s in chained].count(dispycos.ComputationClosed), 1)
        # the monitor saw the same: its figures are the client's
        self.assertEqual((figures['submitted'], figures['done']), (4, 4))


# ================================================================================
# 4. The page in a real browser
# ================================================================================

NODE_ROWS = 'n => document.querySelectorAll("tr.node-row").length >= n'
NODE_ORDER = 'rows => rows.map(r => r.dataset.addr)'
ARGS_SETTLED = '''want => { const b = document.getElementById("show-args");
  return !b.disabled && b.checked === want; }'''
TERMINATE_ANSWERED = ('() => /^terminated \\d/.test('
                      'document.getElementById("terminate-result").textContent)')


def step_cos_cluster(run):
    """Cluster: both nodes, default order (address descending), sorting, totals; the
    Show Task Arguments checkbox turned off (a change on the server)."""
    spec, obs = run.spec, run.obs
    page = run.page('desktop', _browser_driver().DESKTOP)
    page.goto(spec['url'], wait_until='domcontentloaded')
    page.wait_for_function(NODE_ROWS, arg=2)
    page.wait_for_function('() => document.querySelector(\'span[data-total="running"]\')'
                           '.textContent === "4"')

    def order():
        return page.eval_on_selector_all('tr.node-row', NODE_ORDER)
    obs['order_default'] = order()
    page.click('th[data-col="addr"] button.sort-btn')
    obs['order_addr_asc'] = order()
    page.click('th[data-col="submitted"] button.sort-btn')
    obs['order_submitted_asc'] = order()
    obs['submitted_cells'] = page.eval_on_selector_all(
        'tr.node-row td[data-col="submitted"]', 'cells => cells.map(c => c.textContent)')
    page.click('th[data-col="submitted"] button.sort-btn')
    obs['order_submitted_desc'] = order()
    obs['aria_sort'] = page.get_attribute('th[data-col="submitted"]', 'aria-sort')
    obs['totals'] = {k: page.text_content('span[data-total="%s"]' % k)
                     for k in ('submitted', 'done', 'running')}
    obs['poll_sec_shown'] = page.input_value('#poll-sec')
    page.uncheck('#show-args')
    page.wait_for_function(ARGS_SETTLED, arg=False)
    run.screenshot(page, 'dispycos-cluster.png')


def step_cos_forbidden_post(run):
    run.obs['tokenless_post_status'] = run.pages['desktop'].evaluate('''async (body) => {
      const r = await fetch('/api/terminate', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
      return r.status;
    }''', {'server': run.spec['server'], 'tasks': [run.spec['task_key']]})


def follow(page, obs, link, shown, view):
    """Clicks link, waits for shown; obs gets the view's location.hash and title."""
    page.click(link)
    page.wait_for_selector(shown)
    obs[view + '_hash'] = page.evaluate('location.hash')
    obs[view + '_title'] = page.text_content('#%s-title' % view)


def step_cos_node(run):
    """Cluster → Node (its servers) → Server: no arguments while they are off."""
    spec, obs = run.spec, run.obs
    page = run.pages['desktop']
    server_row = 'tr.server-row[data-location="%s"]' % spec['server']
    follow(page, obs, 'tr.node-row[data-addr="%s"] a.node-link' % spec['node'], server_row,
           'node')
    obs['node_servers'] = page.eval_on_selector_all(
        'tr.server-row', 'rows => rows.map(r => r.dataset.location)')
    obs['node_running'] = page.text_content('#node-figures [data-field="running"]')
    obs['avail_shown'] = page.eval_on_selector_all('#node-avail [data-avail]',
                                                   'els => els.map(e => e.dataset.avail)')
    run.screenshot(page, 'dispycos-node.png')
    follow(page, obs, server_row + ' a.server-link',
           'tr.task-row[data-key="%s"]' % spec['task_key'], 'server')
    obs['args_cells_while_off'] = page.eval_on_selector_all(
        '#server-tasks td[data-col="args"]', 'cells => cells.length')


def step_cos_server(run):
    """Arguments on again (Cluster menu), back to the Server (its menu entry): the
    hostile arguments as text; the task selected and terminated."""
    spec, obs = run.spec, run.obs
    page = run.pages['desktop']
    page.click('#nav-cluster')
    page.wait_for_selector('#cluster-view:not([hidden])')
    page.check('#show-args')
    page.wait_for_function(ARGS_SETTLED, arg=True)
    page.click('#nav-server')
    row = 'tr.task-row[data-key="%s"]' % spec['task_key']
    page.wait_for_selector(row + ' td[data-col="args"] code.task-arg')
    obs['args_texts'] = page.eval_on_selector_all(row + ' code.task-arg',
                                                  'els => els.map(e => e.textContent)')
    obs['task_name'] = page.text_content(row + ' td[data-col="name"]')
    obs['xss_flag'] = page.evaluate('typeof window.__xss === "undefined" ? null : window.__xss')
    obs['injected_elements'] = page.eval_on_selector_all(
        'main script, main img, main [onerror]', 'els => els.map(e => e.outerHTML)')
    run.screenshot(page, 'dispycos-server.png')
    page.check('#server-tasks input.select-all')     # all, then none, then the one
    obs['all_selected'] = page.eval_on_selector_all(
        '#server-tasks input.task-select', 'boxes => boxes.map(b => b.checked)')
    page.uncheck('#server-tasks input.select-all')
    obs['disabled_when_none'] = page.is_disabled('#terminate-tasks')
    page.check(row + ' input.task-select')
    page.wait_for_selector('#terminate-tasks:not([disabled])')
    page.click('#terminate-tasks')
    page.wait_for_function(TERMINATE_ANSWERED)
    obs['terminate_result'] = page.text_content('#terminate-result')
    page.wait_for_selector(row, state='detached')
    obs['row_gone'] = True
    obs['error_banner'] = (None if page.is_hidden('#error')
                           else page.text_content('#error-text'))


def step_cos_phone(run):
    page = run.page('phone', _browser_driver().PHONE)
    page.goto(run.spec['url'], wait_until='domcontentloaded')
    page.wait_for_function(NODE_ROWS, arg=2)
    run.obs['phone_fits'] = page.evaluate(
        'document.documentElement.scrollWidth <= window.innerWidth + 1')
    run.screenshot(page, 'dispycos-phone.png')


COS_STEPS = {'cos_cluster': step_cos_cluster, 'cos_forbidden_post': step_cos_forbidden_post,
             'cos_node': step_cos_node, 'cos_server': step_cos_server,
             'cos_phone': step_cos_phone}
SCREENSHOTS = ('dispycos-cluster.png', 'dispycos-node.png', 'dispycos-server.png',
               'dispycos-phone.png')


def _browser_driver():
    """browser_driver (imported in the driver's process only: it needs Playwright)."""
    import browser_driver
    return browser_driver


class BrowserTest(MonitorClientCase):
    """One browser run through the pages (skipped without Chromium and Playwright)."""

    timeout = 240

    @classmethod
    def setUpClass(cls):
        python, chromium = test_browser.find_playwright_python(), test_browser.find_chromium()
        if python is None or chromium is None:
            raise unittest.SkipTest('browser tests need %s (run .ci/test-tools to install '
                                    'them)' % ' and '.join(
                                        (["Playwright's Python package"] if python is None
                                         else []) + (['Chromium'] if chromium is None else [])))
        cls.python, cls.chromium = python, chromium
        super().setUpClass()

    kill_driver = staticmethod(test_browser.BrowserTest.kill_driver)
    text = staticmethod(test_browser.BrowserTest.text)

    def run_driver(self, spec):
        """Runs this file as the driver (test_browser's way: its own session, its
        files in a temporary folder, killed by PID at cleanup); its observations."""
        folder = support.temp_folder(self, 'dispytest-cosbrowser-')
        spec_file = os.path.join(folder, 'spec.json')
        with open(spec_file, 'w') as f:
            json.dump(spec, f)
        out, err = open(os.path.join(folder, 'stdout'), 'w+'), open(os.path.join(folder,
                                                                                'stderr'), 'w+')
        self.addCleanup(err.close)
        self.addCleanup(out.close)
        proc = subprocess.Popen([self.python, HERE, '--driver', spec_file],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=folder,
                                env=dict(os.environ, TMPDIR=folder), start_new_session=True,
                                preexec_fn=support.die_with_parent)
        self.addCleanup(self.kill_driver, proc)
        try:
            proc.wait(test_browser.DRIVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_driver(proc)
            self.fail('the browser driver did not end:\n%s' % self.text(err))
        lines = [line for line in self.text(out).splitlines() if line.startswith('{')]
        self.assertTrue(lines, 'the browser driver said nothing:\n%s' % self.text(err))
        obs = json.loads(lines[-1])
        with open(os.path.join(spec['artifacts'], 'dispycos-observations.json'), 'w') as f:
            json.dump(obs, f, indent=1)
        return obs

    def test_pages(self):
        client = self.start_monitored(port=None, quick_at=[NODE_A, NODE_A, NODE_A], hold=4,
                                      stop_file=True)
        self.wait_figures(client, lambda d: d['running'] == 4, what='4 tasks running')
        tasks = self.server_tasks(client)
        server = sorted(loc for loc in tasks if loc in self.node_a.servers)[0]
        key = tasks[server][0]['key']
        artifacts = test_browser.ARTIFACTS
        os.makedirs(artifacts, exist_ok=True)
        for name in SCREENSHOTS:
            if os.path.exists(os.path.join(artifacts, name)):
                os.unlink(os.path.join(artifacts, name))
        spec = {'url': 'http://%s:%d/' % (CLIENT_IP, client.conf['port']),
                'chromium': self.chromium, 'node': NODE_A, 'server': server, 'task_key': key,
                'artifacts': artifacts, 'timeout_ms': 20000,
                'steps': ['cos_cluster', 'cos_forbidden_post', 'cos_node', 'cos_server',
                          'cos_phone']}
        obs = self.run_driver(spec)
        report = json.dumps(obs, indent=1)
        self.assertNotIn('failure', obs, report)
        self.assertEqual(obs['steps_done'], spec['steps'], report)
        # Cluster: order by address (descending first), by tasks submitted (A ran 5, B 2)
        self.assertEqual(obs['order_default'], [NODE_B, NODE_A], report)
        self.assertEqual(obs['order_addr_asc'], [NODE_A, NODE_B], report)
        self.assertEqual(obs['order_submitted_asc'], [NODE_B, NODE_A], report)
        self.assertEqual(obs['submitted_cells'], ['2', '5'], report)
        self.assertEqual(obs['order_submitted_desc'], [NODE_A, NODE_B], report)
        self.assertEqual(obs['aria_sort'], 'descending', report)
        self.assertEqual(obs['totals'], {'submitted': '7', 'done': '3', 'running': '4'}, report)
        self.assertEqual(obs['poll_sec_shown'], '1', report)
        # Node, Server with arguments off, then on: text, nothing injected or run
        self.assertEqual(obs['node_hash'], '#node=' + NODE_A, report)
        self.assertTrue(obs['node_title'].startswith('Node ' + NODE_A), report)
        self.assertEqual(sorted(obs['node_servers']), sorted(self.node_a.servers), report)
        self.assertEqual(obs['node_running'], '2', report)
        self.assertEqual(obs['avail_shown'], ['cpu', 'memory', 'disk', 'swap']
                         if self.node_python else [], report)
        self.assertEqual(obs['server_title'], 'Server ' + server, report)
        self.assertEqual(obs['server_hash'], '#server=' + server.replace(':', '%3A'), report)
        self.assertEqual(obs['args_cells_while_off'], 0, report)
        args, kwargs = expected_arg_texts(60)
        self.assertEqual(obs['args_texts'], args + ['label=' + kwargs['label']], report)
        self.assertEqual(obs['task_name'], key.split('@')[0], report)
        self.assertIsNone(obs['xss_flag'], report)
        self.assertEqual(obs['injected_elements'], [], report)
        self.assertEqual(obs['all_selected'], [True], report)
        self.assertTrue(obs['disabled_when_none'], report)
        # the task terminated from the page: the client saw it end so
        self.assertEqual(obs['terminate_result'], 'terminated 1', report)
        self.assertTrue(obs['row_gone'], report)
        self.assertIsNone(obs['error_banner'], report)
        self.assertTrue(wait_until(lambda: self.ended(client).get(key), 15), client.output())
        self.assertEqual(self.ended(client)[key], 'GeneratorExit')
        self.assertEqual(obs['tokenless_post_status'], 403, report)
        self.assertTrue(obs['phone_fits'], report)
        for name in SCREENSHOTS:
            path = os.path.join(artifacts, name)
            self.assertTrue(os.path.getsize(path) > 1000, path)
        errors = [e for e in obs['console_errors'] if not (
            e['phase'] == 'cos_forbidden_post' and '403' in e['text'])]
        self.assertEqual(errors, [], report)
        self.assertEqual(obs['page_errors'], [], report)
        self.assertEqual(obs['csp_violations'], [], report)
        # the rest end by POST; the client closes and stops its monitor
        for location, running in self.server_tasks(client).items():
            for task in running:
                self.post(client, '/api/terminate', {'server': location, 'tasks': [task['key']]})
        self.wait_closed(client)
        self.finish(client)


# ================================================================================
# 5. The examples, unchanged
# ================================================================================

class ExamplesTest(NodePairCase):
    """Each example runs with a few tasks and a free port; its monitor answers while
    the tasks run."""

    timeout = 150

    def example(self, name, ntasks):
        port = support.free_port(CLIENT_IP)
        client = self.start_client(script=os.path.join(EXAMPLES, name), args=[ntasks, port])
        http = HTTP(port, host=CLIENT_IP)
        seen = []

        def watch():
            try:
                data = http.get('/api/cluster')
            except (OSError, AssertionError):
                return client.proc.poll() is not None
            seen.append(data)
            return data['submitted'] >= 1 and data['running'] >= 1
        self.assertTrue(wait_until(watch, 40, 0.2) and seen, client.output())
        self.assertEqual(sorted(n['addr'] for n in seen[-1]['nodes']), sorted([NODE_A, NODE_B]))
        client.finish(90, self.nodes_output())
        self.assertNotIn('Traceback', client.stderr(), client.output())
        self.assertIn('dispycos web monitor: http://%s:%d/' % (CLIENT_IP, port), client.stderr())
        self.assertTrue(port_freed(port))
        self.check_clean(client)
        return client.stdout()

    def test_httpd1(self):
        out = self.example('dispycos_httpd1.py', 6)
        ran = re.findall(r'^task (\d+) ran at (\S+)$', out, re.M)
        self.assertEqual(sorted(int(i) for i, _ in ran), list(range(6)), out)
        self.assertTrue(all(where in self.servers for _, where in ran), out)

    def test_httpd2_status_chained(self):
        """Its own status task, behind the monitor, prints each task's end once."""
        out = self.example('dispycos_httpd2.py', 6)
        finished = re.findall(r'^task (compute/\d+@\S+) finished: (\d+)$', out, re.M)
        self.assertEqual(len(finished), 6, out)
        self.assertEqual(len({t for t, _ in finished}), 6, out)
        self.assertEqual(sorted(int(v) for _, v in finished), [i * i for i in range(6)], out)
        ready = re.findall(r'^server (\S+) is ready$', out, re.M)
        self.assertEqual(sorted(ready), sorted(self.servers), out)

    def test_client2(self):
        out = self.example('dispycos_client2.py', 6)
        results = re.findall(r'^result for ([\d.]+): slept ([\d.]+) s at (\S+)$', out, re.M)
        self.assertEqual(len(results), 6, out)
        for arg, slept, where in results:
            self.assertEqual(arg, slept, out)
            self.assertIn(where, self.servers, out)


if __name__ == '__main__':
    if sys.argv[1:2] == ['--driver']:       # the browser driver, with this file's steps
        driver = _browser_driver()
        driver.STEPS.update(COS_STEPS)
        sys.argv[1:] = sys.argv[2:]
        driver.main()
    else:
        unittest.main()
