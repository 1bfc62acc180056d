"""dispycos node and server setup end to end: real ``dispycosnode.py`` processes.

``node_setup`` runs in a setup process of the node's (no network) that then forks the
node's servers for the computation, so what it made (globals) is theirs; the node's
own servers come back when the computation closes.  Nodes on 127.0.0.2 / 127.0.0.3,
clients are scripts in subprocesses reporting ``@key <json>`` lines (the helpers are
tests/test_dispycos.py's).

Classes:

    SetupExamplesTest   examples/dispycos_client9_node.py and _client9_server.py
                        unchanged: each node's / server's data total comes back from
                        tasks there as the client computed it
    NodeSetupTest       the setup process forks the servers (their parent, the same
                        for a node's servers; globals there); a forked server killed
                        mid-task: the task ends with PeerLost, a new one is forked with
                        the globals and joins; a node whose node_setup fails is not
                        used (NodeClosed), the other is, and both serve the next
                        computation with their own servers; enable_node of an unknown
                        node is -1; an overridden DispycosNodeAllocate.allocate
    NodeKilledTest      kill -9 of a node running a node_setup computation: its setup
                        process and forked servers end, the client's task there ends
                        with PeerLost, the other node goes on
    SetupProcessFaultTest  node_setup hangs: the client closes (the setup process and a
                        program it started end at once, no warning, the node's own
                        server back; node_setup saw no network and the node's folder
                        as dest_path); the node is killed (both end); the setup process
                        is killed after setup (the task there: PeerLost; own server back)
    AllocationRulesTest DispycosNodeAllocate rules (the seed's, and 4.12's cpus=0)
    AvailabilityTest    a node with psutil: DispycosNodeAvailInfo every pulse_interval

check_client9_node / check_client9_server are also tests/test_dispycos_lan.py's.
"""

import os
import signal
import unittest

try:
    from tests import support
    from tests.test_dispycos import (Client, DispycosNode, NODE_A, NODE_B, NodePairCase,
                                     client_env, descendants, stop_checked, wait_gone,
                                     wait_until, EXAMPLES)
    from tests.test_dispycos_httpd import psutil_python
except ImportError:                         # run from inside tests/
    import support
    from test_dispycos_httpd import psutil_python
    from test_dispycos import (Client, DispycosNode, NODE_A, NODE_B, NodePairCase,
                               client_env, descendants, stop_checked, wait_gone,
                               wait_until, EXAMPLES)


def check_client9_node(test, out, addrs):
    """Each node was set up, and its tasks summed the data node_setup read there."""
    for addr in addrs:
        test.assertIn('node %s set up' % addr, out)
        found = [line for line in out.splitlines()
                 if line.startswith('node %s: {1000} values, total ' % addr)]
        test.assertEqual(len(found), 1, out)
        words = found[0].split()
        test.assertEqual(words[-3].rstrip(','), words[-1], found[0])


def check_client9_server(test, out, servers):
    """Each server's task summed the data its server_setup read."""
    lines = [line for line in out.splitlines() if line.startswith('server ')]
    test.assertEqual(sorted(line.split()[1].rstrip(':') for line in lines), sorted(servers),
                     out)
    for line in lines:
        words = line.split()
        test.assertEqual(words[3].rstrip(','), words[5], line)


class SetupExamplesTest(NodePairCase):

    def test_client9_node(self):
        client = self.run_client(script=os.path.join(EXAMPLES, 'dispycos_client9_node.py'))
        check_client9_node(self, client.output(), [n.addr for n in self.nodes])
        self.check_clean(client)

    def test_client9_server(self):
        client = self.run_client(script=os.path.join(EXAMPLES, 'dispycos_client9_server.py'),
                                 args=['4'])
        check_client9_server(self, client.output(), self.servers)
        self.check_clean(client)


SETUP_CLIENT = '''
import os


def node_setup(task=None):
    import os
    global made_by, setup_pid
    made_by, setup_pid = 'node_setup', os.getpid()
    yield task.sleep(0)
    return 0


def info(task=None):
    import os
    yield task.sleep(0)
    return [str(task.location), os.getpid(), os.getppid(), made_by, setup_pid]


def hold(seconds, task=None):
    import os
    task.location       # (its reference, before it waits)
    yield task.sleep(seconds)
    return 'held'


def infos(computation, servers, task=None):
    found = []
    for server in servers:
        found.append((yield computation.run_result_at(server, info)))
    return found


def wait_servers(computation, count, task=None):
    servers = []
    for _ in range(300):                # at most 30 s
        servers = yield computation.servers()
        if len(servers) >= count:
            break
        yield task.sleep(0.1)
    return sorted(servers, key=str)


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    servers = yield pycos.Task(wait_servers, computation, 4).finish()
    emit('before', (yield pycos.Task(infos, computation, servers).finish()))
    victim = servers[0]
    rtask = yield computation.run_at(victim, hold, 60)
    beside = yield computation.run_async_at(victim, info)      # next to hold
    emit('held', (yield beside.finish()))
    # the test kills that server now
    emit('lost', type((yield rtask.finish())).__name__)
    for _ in range(300):                # the forked replacement joins (at most 30 s)
        back = yield computation.servers()
        if victim in back:
            break
        yield task.sleep(0.1)
    emit('after', (yield computation.run_result_at(victim, info)))
    yield computation.close()


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([info, hold], node_setup=node_setup))
'''

FAILING_SETUP_CLIENT = '''
def node_setup(good, task=None):
    import pycos
    yield task.sleep(0)
    return 0 if pycos.Pycos().dest_path and good else 'no data here'


def where(task=None):
    yield task.sleep(0)
    return task.location.addr


SEEN = []


def status_proc(task=None):
    task.set_daemon()
    for _ in range(10000):
        msg = yield task.receive()
        if isinstance(msg, pycos.DispycosStatus) and msg.status in (
                pycos.Scheduler.NodeInitialized, pycos.Scheduler.NodeClosed):
            emit('status', [msg.status, msg.info.location.addr])
            SEEN.append([msg.status, msg.info.location.addr])


def enable(computation, task=None):
    for _ in range(300):
        nodes = yield computation.nodes()
        if len(nodes) >= 2:
            break
        yield task.sleep(0.1)
    for addr in sorted(nodes):
        emit('enabled', [addr, (yield computation.enable_node(addr, addr == GOOD))])
    emit('unknown', (yield computation.enable_node('127.0.0.99')))
    emit('again', (yield computation.enable_node(GOOD, True)))       # enabled already
    emit('unpicklable', type((yield computation.enable_node(GOOD, lambda: 0))).__name__)
    for _ in range(300):                # node_setup runs (and fails at one node)
        if len((yield computation.servers())) >= 2 and len(SEEN) >= 2:
            break
        yield task.sleep(0.1)


def client_proc(task=None):
    first = pycos.Computation([where], node_setup=node_setup, disable_nodes=True,
                              status_task=pycos.Task(status_proc))
    if (yield first.schedule()):
        raise Exception('not scheduled')
    yield pycos.Task(enable, first).finish()
    addrs = yield first.run_results(where, [() for _ in range(6)])
    emit('first', sorted(set(addrs)))
    emit('first_servers', len((yield first.servers())))
    yield first.close()
    second = pycos.Computation([where])
    if (yield second.schedule()):
        raise Exception('not scheduled')
    for _ in range(300):
        servers = yield second.servers()
        if len(servers) >= 4:
            break
        yield task.sleep(0.1)
    emit('second_servers', sorted(str(s) for s in servers))
    yield second.close()


import sys
GOOD = sys.argv[1]
pycos.Scheduler()
pycos.Task(client_proc)
'''

ALLOCATE_CLIENT = '''
class OneServerAt(pycos.DispycosNodeAllocate):
    """Overridden in a private scheduler: one server of one node, none elsewhere."""
    def allocate(self, ip_addr, name, platform, cpus, memory, disk):
        return 1 if ip_addr == self.node else 0


def where(task=None):
    yield task.sleep(0)
    return str(task.location)


SEEN = []


def status_proc(task=None):
    task.set_daemon()
    for _ in range(10000):
        msg = yield task.receive()
        if isinstance(msg, pycos.DispycosStatus):
            SEEN.append((msg.status, getattr(msg.info, 'addr', None)))


def client_proc(addr, task=None):
    computation = pycos.Computation([where], node_allocations=[OneServerAt(addr)],
                                    status_task=pycos.Task(status_proc))
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    # both nodes discovered, the chosen one's server loaded: the allocation is made
    for _ in range(300):
        if len([s for s in SEEN if s[0] == 'NodeDiscovered']) >= 2 and \
                ('ServerInitialized', addr) in SEEN:
            break
        yield task.sleep(0.1)
    emit('servers', [str(s) for s in (yield computation.servers())])
    emit('ran', sorted(set((yield computation.run_results(where, [() for _ in range(4)])))))
    yield computation.close()


import sys
pycos.Scheduler()
pycos.Task(client_proc, sys.argv[1])
'''


class NodeSetupTest(NodePairCase):

    def test_forked_servers_and_a_killed_one(self):
        client = self.start_client(SETUP_CLIENT)
        held = client.wait_record('held', 40)
        self.assertIsNotNone(held, client.output() + self.nodes_output())
        before = client.record('before')
        self.assertEqual(sorted(i[0] for i in before), sorted(self.servers))
        for node in self.nodes:
            mine = [i for i in before if i[0].startswith(node.addr + ':')]
            parents = set(i[2] for i in mine)
            self.assertEqual(len(parents), 1, mine)       # one setup process a node
            parent = parents.pop()
            self.assertNotEqual(parent, node.proc.pid)
            self.assertIn(parent, descendants(node.proc.pid))
            self.assertEqual([i[3:] for i in mine], [['node_setup', parent]] * len(mine))
        os.kill(held[1], signal.SIGKILL)
        client.finish(60, self.nodes_output())
        self.assertEqual(client.record('lost'), 'PeerLost', client.output())
        after = client.record('after')
        self.assertEqual(after[0], held[0])
        self.assertNotEqual(after[1], held[1])          # a new process, forked again
        self.assertEqual(after[2:], held[2:])           # by the same setup process
        for node in self.nodes:                         # the node's own servers back
            self.assertTrue(wait_until(lambda: len(set(descendants(node.proc.pid))) == 2,
                                       15), descendants(node.proc.pid))
        self.check_clean(client)

    def test_failing_setup_and_enable_node(self):
        client = self.run_client(FAILING_SETUP_CLIENT, args=[NODE_A])
        out = client.output() + self.nodes_output()
        records = client.records()
        self.assertEqual(sorted(records['enabled']), [[NODE_A, 0], [NODE_B, 0]], out)
        self.assertEqual(client.record('unknown'), -1, out)
        self.assertEqual(client.record('again'), -1, out)
        self.assertEqual(client.record('unpicklable'), 'TypeError', out)
        statuses = records['status']
        self.assertIn(['NodeInitialized', NODE_A], statuses, out)
        self.assertNotIn(['NodeInitialized', NODE_B], statuses, out)
        self.assertIn(['NodeClosed', NODE_B], statuses, out)
        self.assertEqual(client.record('first'), [NODE_A], out)
        self.assertEqual(client.record('first_servers'), 2, out)
        self.assertEqual(client.record('second_servers'), sorted(self.servers), out)
        self.assertIn("no data here", out)              # the node says why

    def test_allocate_overridden(self):
        client = self.run_client(ALLOCATE_CLIENT, args=[NODE_B])
        out = client.output()
        servers = client.record('servers')
        self.assertEqual(len(servers), 1, out)
        self.assertTrue(servers[0].startswith(NODE_B + ':'), out)
        self.assertEqual(client.record('ran'), servers, out)


# node_setup that succeeds at once, and a task that holds its server (client scripts)
QUICK_SETUP = '''
def node_setup(task=None):
    yield task.sleep(0)
    return 0


def hold(seconds, task=None):
    import os
    yield task.sleep(seconds)
    return os.getpid()
'''

KILLED_CLIENT = QUICK_SETUP + '''

def pid(task=None):
    import os
    yield task.sleep(0)
    return [task.location.addr, os.getpid(), os.getppid()]


def client_proc(computation, victim, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for _ in range(300):
        servers = yield computation.servers()
        if len(servers) >= 2:
            break
        yield task.sleep(0.1)
    pids = []
    for server in sorted(servers, key=str):
        pids.append((yield computation.run_result_at(server, pid)))
    emit('pids', pids)
    held = pycos.Task(lambda task=None: (yield computation.run_result_at(victim, hold, 60)))
    yield task.sleep(0.5)
    emit('holding', True)
    value = yield held.finish()
    emit('lost', type(value).__name__)
    others = [s for s in servers if s.addr != victim]
    emit('other', type((yield computation.run_result_at(others[0], hold, 0))).__name__)
    yield computation.close()


import sys
pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([hold, pid], node_setup=node_setup), sys.argv[1])
'''


class NodeKilledTest(unittest.TestCase):
    timeout = 90

    def test_kill_node_of_a_setup_computation(self):
        nodes = []
        for ip in (NODE_A, NODE_B):
            node = DispycosNode(ip, cpus=1)
            self.addCleanup(node.stop)
            node.start()
            nodes.append(node)
        client = Client(self, None, client_env([n.location for n in nodes]), [NODE_A],
                        KILLED_CLIENT)
        self.assertTrue(client.wait_record('holding', 40), client.output())
        victim = nodes[0]
        pids = [p for p in client.record('pids') if p[0] == NODE_A]
        doomed = descendants(victim.proc.pid)
        self.assertIn(pids[0][1], doomed)               # its forked server
        self.assertIn(pids[0][2], doomed)               # its setup process
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        self.assertEqual(wait_gone(doomed, 15), [])     # no process of it left
        client.finish(60)
        self.assertEqual(client.record('lost'), 'PeerLost', client.output())
        self.assertEqual(client.record('other'), 'int', client.output())
        stop_checked(nodes[1])


HANGING_CLIENT = '''
def node_setup(task=None):
    import os, subprocess
    import pycos
    child = subprocess.Popen(['sleep', '1234'])     # a program node_setup starts
    try:
        pycos.Pycos().location
        network = 'up'
    except RuntimeError as exc:
        network = str(exc)
    print('SETUP RUNNING %d %d %s %s' % (os.getpid(), child.pid, pycos.Pycos().dest_path,
                                         network), flush=True)
    yield task.sleep(3600)
    return 0


def client_proc(computation, go_file, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for _ in range(600):                # until the test says so (at most 60 s)
        if os.path.exists(go_file):
            break
        yield task.sleep(0.1)
    emit('closing', time.time())
    yield computation.close()
    emit('closed', time.time())


import os
pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([node_setup], node_setup=node_setup), sys.argv[1])
'''

LOST_SETUP_CLIENT = QUICK_SETUP + '''

def pid(task=None):
    import os
    yield task.sleep(0)
    return [os.getpid(), os.getppid()]


def client_proc(computation, addr, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    for _ in range(300):
        if addr in [s.addr for s in (yield computation.servers())]:
            break
        yield task.sleep(0.1)
    emit('pid', (yield computation.run_result_at(addr, pid)))
    value = yield computation.run_result_at(addr, hold, 60)    # the test kills its parent
    emit('lost', type(value).__name__)
    yield computation.close()


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([hold, pid], node_setup=node_setup), sys.argv[1])
'''


def setup_line(node, timeout=30):
    """The 'SETUP RUNNING pid child dest network' line node_setup prints (relayed)."""
    wait_until(lambda: 'SETUP RUNNING' in node.stdout(), timeout)
    for line in node.stdout().splitlines():
        if line.startswith('SETUP RUNNING '):
            words = line.split(None, 5)
            return int(words[2]), int(words[3]), words[4], words[5]
    raise AssertionError('node_setup did not start\n' + node.output())


class SetupProcessFaultTest(unittest.TestCase):
    """The setup process while node_setup runs (it hangs here) and after: the node
    letting go of it, the node dying, the setup process dying."""

    timeout = 90

    def node(self, ip=NODE_A):
        node = DispycosNode(ip, cpus=1)
        self.addCleanup(node.stop)
        node.start()
        return node

    def test_close_during_node_setup(self):
        node = self.node()
        own = descendants(node.proc.pid)
        go = os.path.join(support.temp_folder(self), 'go')
        client = Client(self, None, client_env([node.location]), [go], HANGING_CLIENT)
        setup_pid, child, dest, network = setup_line(node)
        self.assertEqual(network, 'this process has no network (node_setup)')
        self.assertEqual(os.path.realpath(dest), os.path.realpath(os.path.join(
            node.dest, 'dispycos', '%s_%d' % (node.addr, node.announced_port))))
        self.assertNotIn(own[0], descendants(node.proc.pid))    # its server lent
        open(go, 'w').close()
        client.finish(30)
        self.assertEqual(wait_gone([setup_pid, child], 10), [], node.output())
        # its own server back, and nothing else of the computation's
        self.assertTrue(wait_until(lambda: len(descendants(node.proc.pid)) == 1, 15),
                        descendants(node.proc.pid))
        self.assertIn('node_setup given up', node.stderr(), node.output())
        self.assertNotIn('not served', node.stderr(), node.output())  # not a failure

    def test_node_killed_during_node_setup(self):
        node = self.node()
        go = os.path.join(support.temp_folder(self), 'go')
        Client(self, None, client_env([node.location]), [go], HANGING_CLIENT)
        setup_pid, child, _dest, _network = setup_line(node)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        self.assertEqual(wait_gone([setup_pid, child], 10), [])

    def test_setup_process_killed(self):
        node_a, node_b = self.node(NODE_A), self.node(NODE_B)
        client = Client(self, None, client_env([node_a.location, node_b.location]), [NODE_A],
                        LOST_SETUP_CLIENT)
        pids = client.wait_record('pid', 40)
        self.assertIsNotNone(pids, client.output())
        server_pid, setup_pid = pids
        self.assertIn(setup_pid, descendants(node_a.proc.pid))
        os.kill(setup_pid, signal.SIGKILL)
        client.finish(40)
        self.assertEqual(client.record('lost'), 'PeerLost', client.output())
        self.assertEqual(wait_gone([server_pid], 10), [])
        self.assertIn('setup process of computation', node_a.stderr())
        # the node's own server is back
        self.assertTrue(wait_until(lambda: len(descendants(node_a.proc.pid)) == 1, 15),
                        node_a.output())


class AllocationRulesTest(unittest.TestCase):
    """DispycosNodeAllocate lists as the scheduler applies them (pure logic): the
    seed's filters and 4.12's exclusion idiom (cpus=0) both hold."""

    timeout = 10

    def servers_for(self, allocations, addr='10.1.2.3', platform='Linux-6.1-x86_64'):
        import types
        import dispycos
        comp = types.SimpleNamespace(spec={'node_allocations': allocations})
        node = types.SimpleNamespace(location=dispycos.Location(addr, 9706), info={
            'name': 'n', 'platform': platform, 'servers': [1, 2, 3, 4],
            'avail': {'memory': 1 << 30, 'disk': 1 << 30}})
        return dispycos.Scheduler._allocation(None, comp, node)

    def test_rules(self):
        from dispycos import DispycosNodeAllocate as Alloc
        self.assertEqual(self.servers_for([]), 4)
        self.assertEqual(self.servers_for([Alloc('*', platform='Linux')]), 4)
        self.assertEqual(self.servers_for([Alloc('*', platform='Windows')]), 0)
        self.assertEqual(self.servers_for([Alloc('10.1.*')]), 4)
        self.assertEqual(self.servers_for([Alloc('10.9.*')]), 0)        # no rule took it
        self.assertEqual(self.servers_for([Alloc('10.1.*', cpus=2)]), 2)
        self.assertEqual(self.servers_for([Alloc('10.1.*', cpus=8)]), 0)
        self.assertEqual(self.servers_for([Alloc('10.1.*', cpus=-1)]), 3)  # 4.12
        self.assertEqual(self.servers_for([Alloc('*', memory=1 << 40)]), 0)
        # 4.12's client9: leave Windows out (cpus=0), use the rest
        windows_out = [Alloc('*', platform='Windows', cpus=0)]
        self.assertEqual(self.servers_for(windows_out), 4)
        self.assertEqual(self.servers_for(windows_out, platform='Windows-10'), 0)
        # first rule that decides wins
        self.assertEqual(self.servers_for([Alloc('10.9.*', cpus=1), Alloc('*', cpus=2)]), 2)


AVAIL_CLIENT = '''
def status_proc(task=None):
    task.set_daemon()
    for _ in range(10000):
        msg = yield task.receive()
        if isinstance(msg, pycos.DispycosNodeAvailInfo):
            emit('avail', [msg.location.addr, msg.cpu is not None, msg.memory > 0,
                           msg.disk > 0])


def busy(seconds, task=None):
    yield task.sleep(seconds)
    return 0


def client_proc(task=None):
    computation = pycos.Computation([busy], status_task=pycos.Task(status_proc))
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    yield computation.run_result(busy, 3)
    yield computation.close()


pycos.Scheduler()
pycos.Task(client_proc)
'''


class AvailabilityTest(unittest.TestCase):
    """A node with psutil: its DispycosNodeAvailInfo reaches status_task every
    pulse_interval (DISPYCOS_PULSE=0.5 here, on both sides)."""

    timeout = 60

    def test_periodic_availability(self):
        python = psutil_python()
        if python is None:
            self.skipTest('psutil is not installed (.ci/test-tools installs it in '
                          '.venv-tests)')
        node = DispycosNode(NODE_A, cpus=1)
        node.python = python
        node.env['DISPYCOS_PULSE'] = '0.5'
        self.addCleanup(stop_checked, node)
        node.start()
        env = client_env([node.location])
        env['DISPYCOS_PULSE'] = '0.5'
        client = Client(self, None, env, (), AVAIL_CLIENT).finish(40)
        reports = client.records().get('avail', [])
        self.assertGreaterEqual(len(reports), 3, client.output())    # about 6 in 3 s
        self.assertEqual(set(map(tuple, reports)), {(NODE_A, True, True, True)})


if __name__ == '__main__':
    unittest.main()
