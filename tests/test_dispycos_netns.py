"""dispycos end to end with default discovery, inside a network-namespace lab.

Real ``dispycosnode.py``, ``dispycos.py`` (the shared scheduler) and client programs
run on hosts of a private virtual LAN (see tests/netns.py): a bridge and one network
namespace per host, addresses 10.213.N.0/24.  dispycos discovery is UDP broadcast
(schedulers ping nodes at <LAN broadcast>:9706, nodes announce themselves at
<LAN broadcast>:9705), so it may only ever run inside such a lab: nothing here sends
or binds anything on the machine's real interfaces, and every port is dispycos's
default one (each namespace has its own).

    client    examples/dispycos_client1.py unchanged (a private Scheduler()), or
              CLIENT below (a private Scheduler() or the shared one)
    sched     python dispycos.py -i <its address> --daemon          (SharedSchedulerTest)
    node1/2   python dispycosnode.py [-i <its address>] -c 2 --daemon --dest_path DIR

Client programs get no DISPYCOS_* variable unless a test says so (DISPYCOS_SCHEDULER,
DISPYCOS_PULSE), so their address is their host's lab address (the first
non-loopback IPv4 one) and their scheduler pings that interface's LAN.

A node that starts BEFORE a scheduler is found by the scheduler's broadcast ping (with
``-i ADDR`` too: it also listens on its interface's broadcast address); nodes that start
AFTER the scheduler are found by their start announcement.  Some nodes are started
without ``-i`` (their default address is the same lab address), most with it.

Every wait is bounded, every process is killed by PID when the test ends (the lab
does it, also on failure), namespaces are deleted and folders removed.  Everything
skips (unittest.SkipTest) where network namespaces can't be made.
"""

import json
import os
import re
import subprocess
import sys
import time
import unittest

try:
    from tests import support
    from tests.test_netns import LabTestCase, time_limit
except ImportError:                         # run from inside tests/
    import support
    from test_netns import LabTestCase, time_limit

ROOT = support.ROOT
NODE_SCRIPT = os.path.join(ROOT, 'dispycosnode.py')
SCHEDULER_SCRIPT = os.path.join(ROOT, 'dispycos.py')
CLIENT1_SCRIPT = os.path.join(ROOT, 'examples', 'dispycos_client1.py')
NODE_READY = r'dispycosnode \S+ at (\S+):9706: 2 servers at 9707, 9708\n'
SCHEDULER_READY = r'dispycos scheduler at (\S+):9705\n'
SERVER_PORTS = (9707, 9708)
TAIL = 6000                                 # characters of each log in a failure message

# examples/dispycos_client1.py's lines
RESULT_RE = re.compile(r'^result for (\d+\.\d+): slept \1 s at (\S+):(\d+)$', re.M)
ENDED_RE = re.compile(r'^task \S+ ended with: slept 0\.10 s at (\S+):(\d+)$', re.M)

# One client program for the tests, configured by the JSON in argv[1]:
#   private     True: a Scheduler() in this program; False: schedule() finds the shared
#               one (DISPYCOS_SCHEDULER)
#   wait_addrs  wait (bounded by 'wait') until computation.servers() has servers at
#               each of these addresses; prints 'servers ADDR:PORT ...'
#   count       run_results of compute over this many short delays; prints one
#               'result N: slept ... at ADDR:PORT' line each
#   at          run_result_at each of these addresses; prints 'at ADDR: ...'
#   cut         {'at': ADDR, 'mark': PATH}: run_result_at ADDR of a 60 s task that
#               first writes PATH, prints 'long result TYPE: VALUE' when it returns
#   after       run_result_at this address after the cut; prints 'after: ...'
# Prints 'created TASK' for each task made, 'scheduled' after schedule(), 'closed' at
# the end, and exits 0; on a failure
# it prints 'FAILED why' and exits 1 at once.
CLIENT = r'''
import json, os, sys, time
import dispycos as pycos
from dispycos import Computation, Scheduler


def compute(seconds, mark=None, task=None):
    import os           # a server has only what the components and tasks import
    if mark:
        with open(mark + '.tmp', 'w') as f:
            f.write(str(task.location))
        os.rename(mark + '.tmp', mark)
    yield task.sleep(seconds)
    return 'slept %.2f s at %s' % (seconds, task.location)


def fail(why):
    print('FAILED %s' % why, flush=True)
    sys.stdout.flush()
    os._exit(1)


def show(value):
    return '%s: %s' % (type(value).__name__, value)


def status_proc(task=None):
    task.set_daemon()
    while True:
        msg = yield task.receive()
        if isinstance(msg, pycos.DispycosStatus) and msg.status == pycos.TaskCreated:
            print('created %s' % msg.info.task, flush=True)


def main(cfg, task=None):
    computation = Computation([compute], status_task=pycos.Task(status_proc))
    if (yield computation.schedule()) != 0:
        fail('the computation could not be scheduled')
    print('scheduled', flush=True)
    if cfg.get('wait_addrs'):
        deadline = time.monotonic() + cfg.get('wait', 30)
        while True:
            servers = yield computation.servers()
            addrs = {s.addr for s in servers} if isinstance(servers, list) else set()
            if set(cfg['wait_addrs']) <= addrs:
                break
            if time.monotonic() > deadline:
                fail('servers after %s s: %s' % (cfg.get('wait', 30), servers))
            yield task.sleep(0.1)
        print('servers %s' % ' '.join(sorted(str(s) for s in servers)), flush=True)
    if cfg.get('count'):
        args = [0.2 + 0.05 * (i % 4) for i in range(cfg['count'])]
        results = yield computation.run_results(compute, args)
        for n, value in enumerate(results):
            print('result %d: %s' % (n, value if isinstance(value, str) else show(value)),
                  flush=True)
    for addr in cfg.get('at', ()):
        value = yield computation.run_result_at(addr, compute, 0.1)
        print('at %s: %s' % (addr, value if isinstance(value, str) else show(value)),
              flush=True)
    if cfg.get('cut'):
        start = time.monotonic()
        value = yield computation.run_result_at(cfg['cut']['at'], compute, 60,
                                                cfg['cut']['mark'])
        print('long result %s (after %.1f s)' % (show(value), time.monotonic() - start),
              flush=True)
    if cfg.get('after'):
        value = yield computation.run_result_at(cfg['after'], compute, 0.1)
        print('after: %s' % (value if isinstance(value, str) else show(value)), flush=True)
    yield computation.close()
    print('closed', flush=True)
    return 0


if __name__ == '__main__':
    cfg = json.loads(sys.argv[1])
    if cfg.get('private', True):
        Scheduler()
    status = pycos.Task(main, cfg).value(timeout=cfg.get('limit', 60))
    if status != 0:
        fail('main ended with %r' % (status,))
'''


def lab_env(**extra):
    """The environment without any DISPY_* / DISPYCOS_* variable, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('DISPY')}
    env['PYTHONPATH'] = ROOT
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


def tail(text, size=TAIL):
    return text if len(text) <= size else '[...]\n' + text[-size:]


class DispycosLabTestCase(LabTestCase):
    """A lab of a client host and two node hosts (subclasses may add a scheduler)."""

    HOSTS = ('client', 'node1', 'node2')
    timeout = 120                   # the suite's watchdog, per test
    ENV = {}                        # more environment for every process of a test

    def setUp(self):
        super().setUp()
        self.client_dir = self.tempdir('client')
        with open(os.path.join(self.client_dir, 'client.py'), 'w') as f:
            f.write(CLIENT)

    def env(self, folder, **extra):
        return lab_env(TMPDIR=folder, **dict(self.ENV, **extra))

    # -- processes ----------------------------------------------------------------------------
    def start_node(self, host, ip_option=True, wait=True):
        """``dispycosnode.py [-i ADDR] -c 2 --daemon --dest_path DIR``, in a folder of
        its own (as if on its own machine); waits for its ready line."""
        folder = self.tempdir(host)
        argv = [sys.executable, NODE_SCRIPT, '-c', '2', '--daemon',
                '--dest_path', os.path.join(folder, 'dest')]
        if ip_option:
            argv[2:2] = ['-i', self.lab.ip(host)]
        node = self.spawn(host, argv, cwd=folder, env=self.env(folder))
        node.name = host
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node):
        try:
            match = node.wait_for(NODE_READY, timeout=30)
        except RuntimeError as exc:
            self.fail_with('node %s did not start: %s' % (node.name, str(exc)[:300]))
        self.assertEqual(match.group(1), self.lab.ip(node.host), self.diagnostics())
        return node

    def client(self, cfg, name='client', **env):
        """Starts CLIENT with ``cfg`` on the client host; returns its LabProcess."""
        proc = self.spawn('client', [sys.executable, os.path.join(self.client_dir, 'client.py'),
                                     json.dumps(cfg)],
                          cwd=self.client_dir, env=self.env(self.client_dir, **env))
        proc.name = name
        return proc

    def finish(self, proc, timeout):
        """Waits (bounded) for a client to exit 0 after printing 'closed'."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail_with('%s did not finish in %s s' % (proc.name, timeout))
        if proc.returncode != 0 or 'closed' not in proc.stdout().splitlines():
            self.fail_with('%s failed (exit %s)' % (proc.name, proc.returncode))
        return proc.stdout()

    def wait_line(self, proc, pattern, timeout):
        """Waits (bounded) for a line matching ``pattern`` (multi-line: ^ and $ are a
        line's) in ``proc``'s stdout; fails the test with every log if none comes."""
        try:
            return proc.wait_for('(?m)' + pattern, timeout=timeout)
        except RuntimeError as exc:
            self.fail_with('%s: no %r in %s s (%s)' % (getattr(proc, 'name', proc.host),
                                                     pattern, timeout, str(exc)[:200]))

    # -- checks ---------------------------------------------------------------------------------
    def node_addrs(self):
        return {self.lab.ip('node1'), self.lab.ip('node2')}

    def assert_servers(self, locations, what):
        """Every (addr, port) is a server of a lab node, and both nodes are among them."""
        locations = set(locations)
        bad = {loc for loc in locations if loc[0] not in self.node_addrs()
               or int(loc[1]) not in SERVER_PORTS}
        if bad:
            self.fail_with('%s: not servers of the lab nodes: %s' % (what, sorted(bad)))
        used = {addr for addr, _port in locations}
        if used != self.node_addrs():
            self.fail_with('%s: servers of %s only, not of both %s'
                           % (what, sorted(used), sorted(self.node_addrs())))

    def diagnostics(self):
        return '\n'.join('--- %s pid %s %s\n--- stdout:\n%s\n--- stderr:\n%s' % (
            proc.host, proc.pid, getattr(proc, 'name', ''), tail(proc.stdout()),
            tail(proc.stderr())) for proc in self.spawned)

    def fail_with(self, message, result=None):
        text = message
        if result is not None:
            text += '\n--- client stdout:\n%s\n--- client stderr:\n%s' % (
                tail(result.stdout or ''), tail(result.stderr or ''))
        self.fail(text + '\n' + self.diagnostics())


class Client1DefaultDiscoveryTest(DispycosLabTestCase):
    """examples/dispycos_client1.py, unchanged, with default discovery."""

    def run_client1(self, timeout):
        folder = self.tempdir('client1')
        try:
            result = self.lab.run('client', [sys.executable, CLIENT1_SCRIPT], timeout=timeout,
                                  env=self.env(folder), cwd=folder)
        except subprocess.TimeoutExpired as exc:
            self.fail_with('dispycos_client1.py did not finish in %s s (nodes not found?)'
                           % timeout, exc)
        if result.returncode != 0:
            self.fail_with('dispycos_client1.py exited with %s' % result.returncode, result)
        results = RESULT_RE.findall(result.stdout)
        ended = ENDED_RE.findall(result.stdout)
        if len(results) != 10 or len(ended) != 1:
            self.fail_with('expected 10 "result for" lines and one "task ... ended with" '
                           'line, got %d and %d' % (len(results), len(ended)), result)
        self.assert_servers([(addr, port) for _arg, addr, port in results] + ended,
                            'dispycos_client1.py results')
        return result

    @time_limit(90)
    def test_client1_finds_both_nodes_by_default_discovery(self):
        # Nodes without -i: their address is their lab address, their UDP port
        # listens on every interface, so the client's scheduler's broadcast ping,
        # sent after the nodes started, reaches them.
        self.start_node('node1', ip_option=False, wait=False)
        self.start_node('node2', ip_option=False, wait=False)
        for node in self.spawned:
            self.wait_ready(node)
        self.run_client1(timeout=40)

    # The same with -i: a node's UDP socket bound to its address does not get the
    # LAN's broadcasts; the one it binds on its interface's broadcast address does.
    @time_limit(60)
    def test_client1_finds_nodes_started_with_ip_option(self):
        self.start_node('node1', wait=False)
        self.start_node('node2', wait=False)
        for node in self.spawned:
            self.wait_ready(node)
        self.run_client1(timeout=15)


class LateNodeTest(DispycosLabTestCase):
    """A node started after the client's (private) scheduler is up is found by its
    start announcement, and its servers are used."""

    @time_limit(90)
    def test_node_started_after_client_scheduled_is_found(self):
        self.start_node('node1')
        client = self.client({'private': True, 'wait_addrs': sorted(self.node_addrs()),
                              'wait': 30, 'count': 8, 'at': [self.lab.ip('node2')]})
        # its scheduler's pings (at its start and at schedule()) went before 'scheduled'
        self.wait_line(client, r'^scheduled$', 30)
        self.start_node('node2')    # with -i: found by its announcement
        out = self.finish(client, 60)
        servers = re.search(r'^servers (.*)$', out, re.M).group(1).split()
        self.assert_servers([tuple(s.rsplit(':', 1)) for s in servers], 'servers()')
        results = re.findall(r'^result (\d+): slept \S+ s at (\S+):(\d+)$', out, re.M)
        if sorted(int(n) for n, _a, _p in results) != list(range(8)):
            self.fail_with('expected "result N" for N in 0..7')
        self.assert_servers([(a, p) for _n, a, p in results] + [
            tuple(s.rsplit(':', 1)) for s in servers], 'results and servers')
        node2 = self.lab.ip('node2')
        if not re.search(r'^at %s: slept 0\.10 s at %s:\d+$' % (re.escape(node2),
                                                               re.escape(node2)), out, re.M):
            self.fail_with('run_result_at the late node did not run there')


class SharedSchedulerTest(DispycosLabTestCase):
    """``python dispycos.py`` on its own host, nodes on two others, clients on a
    fourth reaching it with DISPYCOS_SCHEDULER: everything crosses the LAN."""

    HOSTS = ('client', 'sched', 'node1', 'node2')

    def start_lab(self):
        """node1 runs before the scheduler (found by its ping: no -i, see the module
        docstring), node2 starts after it (found by its announcement, with -i).
        Returns the scheduler's process."""
        self.start_node('node1')
        folder = self.tempdir('sched')
        sched_addr = self.lab.ip('sched')
        sched = self.spawn('sched', [sys.executable, SCHEDULER_SCRIPT, '-i', sched_addr,
                                     '--daemon', '--dest_path', os.path.join(folder, 'dest')],
                           cwd=folder, env=self.env(folder))
        sched.name = 'scheduler'
        match = self.wait_line(sched, SCHEDULER_READY, 30)
        self.assertEqual(match.group(1), sched_addr, self.diagnostics())
        self.start_node('node2')
        return sched

    def run_client(self, name, wait=30):
        """A client of the shared scheduler that needs servers of both nodes, runs
        tasks on them and closes; checks its output."""
        client = self.client({'private': False, 'wait_addrs': sorted(self.node_addrs()),
                              'wait': wait, 'count': 8, 'at': sorted(self.node_addrs())},
                             name=name, DISPYCOS_SCHEDULER='%s:9705' % self.lab.ip('sched'))
        out = self.finish(client, wait + 30)
        results = re.findall(r'^result (\d+): slept \S+ s at (\S+):(\d+)$', out, re.M)
        if sorted(int(n) for n, _a, _p in results) != list(range(8)):
            self.fail_with('%s: expected "result N" for N in 0..7' % name)
        servers = re.search(r'^servers (.*)$', out, re.M).group(1).split()
        self.assert_servers([(a, p) for _n, a, p in results] + [
            tuple(s.rsplit(':', 1)) for s in servers], '%s: results, servers' % name)
        for addr in sorted(self.node_addrs()):
            if not re.search(r'^at %s: slept 0\.10 s at %s:\d+$' % (
                    re.escape(addr), re.escape(addr)), out, re.M):
                self.fail_with('%s: run_result_at %s did not run there' % (name, addr))

    @time_limit(90)
    def test_shared_scheduler_across_the_lan(self):
        sched = self.start_lab()
        self.run_client('client')
        if sched.poll() is not None:
            self.fail_with('the shared scheduler ended (exit %s)' % sched.returncode)

    # A node released while a computation closes must not be reserved again for it:
    # each of the clients gets both nodes.
    @time_limit(100)
    def test_shared_scheduler_serves_clients_one_after_another(self):
        sched = self.start_lab()
        for n in range(3):
            self.run_client('client %d' % (n + 1), wait=10 if n else 30)
        if sched.poll() is not None:
            self.fail_with('the shared scheduler ended (exit %s)' % sched.returncode)


class LinkCutTest(DispycosLabTestCase):
    """A node unplugged from the LAN while it runs a task: the client's run_result_at
    gives a PeerLost / TaskError within a bounded time, and the computation goes on
    with the other node.  Pulses every second in every process (a peer silent for 5
    pulses is dropped), so this takes seconds, not minutes."""

    ENV = {'DISPYCOS_PULSE': '1'}
    DETECT = 25                     # seconds from the cut to run_result's return, at most

    @time_limit(100)
    def test_run_result_returns_when_node_link_is_cut_mid_task(self):
        self.start_node('node1', ip_option=False, wait=False)
        self.start_node('node2', ip_option=False, wait=False)
        for node in self.spawned:
            self.wait_ready(node)
        mark = os.path.join(self.tempdir('marks'), 'long-task-started')
        client = self.client({'private': True, 'wait_addrs': sorted(self.node_addrs()),
                              'wait': 30, 'cut': {'at': self.lab.ip('node2'), 'mark': mark},
                              'after': self.lab.ip('node1'), 'limit': 90})
        self.wait_line(client, r'^servers ', 40)
        deadline = time.monotonic() + 30
        while not os.path.exists(mark):
            if time.monotonic() > deadline or client.poll() is not None:
                self.fail_with('the long task never started on node2')
            time.sleep(0.05)
        with open(mark) as f:
            self.assertEqual(f.read().rsplit(':', 1)[0], self.lab.ip('node2'))
        # the task's creation is known at the client (TaskCreated) before the cut
        self.wait_line(client, r'^created compute/\d+@%s:' % re.escape(self.lab.ip('node2')), 10)
        self.lab.link_down('node2')
        cut = time.monotonic()
        match = self.wait_line(client, r'^long result (\w+): (.*)\n', self.DETECT)
        took = time.monotonic() - cut
        if match.group(1) not in ('PeerLost', 'TaskError'):
            self.fail_with('run_result_at gave %s, not PeerLost / TaskError' % match.group(0))
        self.assertGreater(took, 2.0, 'the task ended before the link was cut?\n'
                           + self.diagnostics())
        out = self.finish(client, 30)
        node1 = self.lab.ip('node1')
        if not re.search(r'^after: slept 0\.10 s at %s:\d+$' % re.escape(node1), out, re.M):
            self.fail_with('the computation did not go on with node1 after the cut')


if __name__ == '__main__':
    unittest.main()
