"""Tests inside private network namespaces (see tests/netns.py).

``HarnessTest`` checks the lab itself: broadcasts cross the virtual LAN, stop
at a pulled link, and nothing is left behind.  ``DefaultDiscoveryTest`` runs
real ``dispynode.py`` processes with NO address options on lab hosts, so that
dispy's default discovery (UDP broadcast on the hosts' interfaces) is
exercised for real, yet only inside the lab.

Everything skips cleanly (unittest.SkipTest) where namespaces can't be made.
"""

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    from tests import netns, support
except ImportError:                         # run from inside tests/
    import netns
    import support

ROOT = support.ROOT
NODE_SCRIPT = support.NODE_SCRIPT
SAMPLE_SCRIPT = os.path.join(ROOT, 'examples', 'sample.py')
READY_RE = support.READY_RE
PORT = 51348

LISTENER = r'''
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(('', int(sys.argv[1])))
sock.settimeout(0.2)
print('listening', flush=True)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        data, addr = sock.recvfrom(4096)
    except socket.timeout:
        continue
    print('got %s from %s' % (data.decode(), addr[0]), flush=True)
'''

SENDER = r'''
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
'''

# For client scripts run in a lab: a cluster_status callback that collects the
# addresses of the nodes set up for the cluster in ``nodes``, under ``cond``.
NODE_WATCH = r'''
import threading
nodes, cond = set(), threading.Condition()

def watch_nodes(status, node, job):
    if status == dispy.DispyNode.Initialized and job is None:
        with cond:
            nodes.add(node.ip_addr)
            cond.notify_all()
'''

LATE_NODE_CLIENT = r'''
import time
import dispy

def compute(i):
    import os, time
    time.sleep(0.5)
    return os.environ.get('DISPY_TEST_NODE')

if __name__ == '__main__':
    cluster = dispy.JobCluster(compute)
    print('cluster created', flush=True)
    jobs = []
    for i in range(20):
        job = cluster.submit(i)
        job.id = i
        jobs.append(job)
        time.sleep(0.05)
    for job in jobs:
        print('job %s ran on %s' % (job.id, job()), flush=True)
    cluster.print_status()
    cluster.close()
'''


class TestTimeout(AssertionError):
    """A test ran past its time limit."""


def time_limit(seconds):
    """Decorator: the test fails (TestTimeout) if it runs over ``seconds``.

    Uses SIGALRM, so it only arms in the main thread (where unittest runs);
    cleanups registered with addCleanup still run afterwards.
    """
    def decorate(method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                return method(*args, **kwargs)

            def expire(signum, frame):
                raise TestTimeout('test exceeded its %ss time limit' % seconds)
            previous = signal.signal(signal.SIGALRM, expire)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                return method(*args, **kwargs)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        return wrapper
    return decorate


def has_address(text, ip):
    """True if ``ip`` appears in ``text`` as a whole address (not a prefix)."""
    return re.search(r'(?<![\d.])%s(?![\d])' % re.escape(ip), text) is not None


def clean_env(**extra):
    """The environment without DISPY_* variables, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('DISPY_')}
    env['PYTHONPATH'] = ROOT
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra)
    return env


class LabTestCase(unittest.TestCase):
    """Builds ``self.lab`` with hosts ``HOSTS`` (or, with ``LANS``, a RoutedLab of
    those LANs); skips if namespaces are unavailable."""

    HOSTS = ('a', 'b')
    LANS = None

    def setUp(self):
        netns.require()
        self.workdir = tempfile.mkdtemp(prefix='dspy-netns-test-')
        self.addCleanup(shutil.rmtree, self.workdir, True)   # runs after lab.close
        self.lab = (netns.RoutedLab([list(hosts) for hosts in self.LANS]) if self.LANS
                    else netns.NetLab(list(self.HOSTS)))
        self.addCleanup(self.lab.close)
        self.spawned = []

    def spawn(self, host, argv, **kwargs):
        proc = self.lab.spawn(host, argv, **kwargs)
        self.spawned.append(proc)
        return proc

    def diagnostics(self):
        """Output of every process this test spawned, for failure messages."""
        return '\n'.join(proc.output() for proc in self.spawned)

    def tempdir(self, name):
        """A fresh folder, removed after the lab's processes are gone."""
        return tempfile.mkdtemp(prefix=name + '-', dir=self.workdir)

    # -- raw datagrams between lab hosts ------------------------------------------------
    def listen(self, host, lifetime=60):
        listener = self.spawn(host, [sys.executable, '-c', LISTENER, PORT, lifetime])
        listener.wait_for('listening', timeout=15)
        return listener

    def send(self, host, address, token):
        result = self.lab.run(host, [sys.executable, '-c', SENDER, address, PORT, token],
                              timeout=15)
        self.assertEqual(result.returncode, 0, result.stderr)

    def assert_delivered(self, listener, sender, address, token, attempts=10):
        """Sends ``token`` until ``listener`` reports it (bounded)."""
        pattern = r'got %s from %s\n' % (re.escape(token), re.escape(self.lab.ip(sender)))
        for _ in range(attempts):
            self.send(sender, address, token)
            try:
                return listener.wait_for(pattern, timeout=0.5)
            except RuntimeError:
                continue
        self.fail('%r to %s never arrived\n%s' % (token, address, self.diagnostics()))


# -- the harness itself -----------------------------------------------------------

class HarnessTest(LabTestCase):

    @time_limit(60)
    def test_broadcast_crosses_lab_and_stops_at_link_down(self):
        listener = self.listen('b')
        self.assert_delivered(listener, 'a', self.lab.broadcast('a'), 'subnet')
        self.assert_delivered(listener, 'a', '255.255.255.255', 'limited')

        self.lab.link_down('b')
        for i in range(5):
            self.send('a', self.lab.broadcast('a'), 'down%d' % i)
            time.sleep(0.1)
        time.sleep(1.0)
        self.assertNotIn('got down', listener.stdout(), 'datagram crossed a downed link')

        self.lab.link_up('b')
        self.assert_delivered(listener, 'a', self.lab.broadcast('a'), 'up-again')

    @time_limit(30)
    def test_hosts_have_their_own_names(self):
        if not self.lab.hostnames:
            self.skipTest('no unshare/hostname here: hosts share the machine name')
        lookup = 'import socket; print(socket.gethostname(), socket.gethostbyname("b"))'
        result = self.lab.run('a', [sys.executable, '-c', lookup], timeout=15)
        self.assertEqual(result.stdout.split(), ['a', self.lab.ip('b')], result.stderr)
        self.assertNotEqual(subprocess.check_output(['hostname'], text=True).strip(), 'a')

    @time_limit(30)
    def test_root_namespace_untouched(self):
        def snapshot():
            return [subprocess.run([netns.IP, '-o'] + args, capture_output=True, text=True,
                                   timeout=10).stdout
                    for args in (['link', 'show'], ['addr', 'show'], ['route', 'show'])]
        before = snapshot()
        with netns.NetLab(['x', 'y']) as lab:
            lab.run('x', ['true'], timeout=15)
            during = snapshot()
        self.assertEqual(strip_counters(before), strip_counters(during))
        self.assertEqual(strip_counters(before), strip_counters(snapshot()))

    @time_limit(60)
    def test_close_kills_processes_and_removes_namespaces(self):
        lab = netns.NetLab(['x', 'y'])
        self.addCleanup(lab.close)
        sleeper = lab.spawn('x', ['sleep', '300'])
        # An orphan that escapes the process tree: found by its namespace.
        lab.run('y', ['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'], timeout=15)
        namespaces = [lab.namespace('x'), lab.namespace('y'), lab.switch]
        orphans = netns._pids_in_netns({netns._netns_inode(n) for n in namespaces})
        self.assertTrue(orphans, 'no process found inside the lab')
        lab.close()
        self.assertEqual(lab.leftovers(), [])
        self.assertFalse([n for n in netns.list_netns() if n.startswith(lab.prefix)])
        self.assertIsNotNone(sleeper.poll())
        self.assertFalse([pid for pid in orphans if netns._pid_alive(pid)])
        for ns in namespaces:
            self.assertFalse(os.path.exists(os.path.join(netns.NETNS_ETC_DIR, ns)))
        self.lab.close()
        self.assertEqual(self.lab.leftovers(), [])


class RoutedHarnessTest(LabTestCase):
    """Two LANs and a router: unicast crosses it, broadcast does not."""

    LANS = (('a', 'a2'), ('b', 'b2'))

    @time_limit(60)
    def test_unicast_is_routed_and_broadcast_stays_on_its_lan(self):
        across, beside = self.listen('b'), self.listen('a2')
        self.assertNotEqual(self.lab.ip('a').split('.')[:3], self.lab.ip('b').split('.')[:3])
        self.assert_delivered(across, 'a', self.lab.ip('b'), 'routed')
        self.assert_delivered(beside, 'a', self.lab.broadcast('a'), 'local')
        self.assert_delivered(beside, 'a', '255.255.255.255', 'limited')
        self.assert_delivered(across, 'b2', self.lab.broadcast('b'), 'other-lan')
        self.assertNotIn('got local', across.stdout(), 'a broadcast crossed the router')
        self.assertNotIn('got limited', across.stdout(), 'a broadcast crossed the router')
        self.assertEqual(self.lab.gateway('b'), self.lab.ip('b').rsplit('.', 1)[0] + '.254')

    @time_limit(60)
    def test_forwarding_is_the_router_namespace_s_own(self):
        def forwarding():
            with open('/proc/sys/net/ipv4/ip_forward') as f:
                return f.read().strip()
        before = forwarding()
        with netns.RoutedLab([['x'], ['y']]) as lab:
            inside = lab.run('x', ['true'], timeout=15)
            self.assertEqual(inside.returncode, 0)
            self.assertEqual(forwarding(), before)
        self.assertEqual(forwarding(), before)

    @time_limit(60)
    def test_close_removes_router_and_switches(self):
        self.lab.run('a', ['true'], timeout=15)
        self.assertEqual(len(self.lab.leftovers()), 1 + 2 + 4)    # router, switches, hosts
        self.lab.close()
        self.assertEqual(self.lab.leftovers(), [])


def strip_counters(outputs):
    """``ip -o`` output without fields that change by themselves."""
    return [re.sub(r'(valid_lft|preferred_lft) \S+', '', text) for text in outputs]


# -- dispy default discovery, end to end ------------------------------------------

class DefaultDiscoveryTest(LabTestCase):
    """Real dispynode.py processes with default discovery, inside the lab."""

    HOSTS = ('client', 'node1', 'node2')

    def start_node(self, host, args=()):
        """``dispynode.py --daemon -d`` with no address options; waits for
        its "serving at" line.  Each node gets its own folder, as if it were
        on its own machine."""
        folder = self.tempdir(host)
        argv = [sys.executable, NODE_SCRIPT, '--daemon', '-d',
                '--dest_path_prefix', os.path.join(folder, 'dest')] + list(args)
        node = self.spawn(host, argv, cwd=folder,
                          env=clean_env(DISPY_TEST_NODE=host, TMPDIR=folder))
        node.wait_for(READY_RE.pattern, timeout=30)
        return node

    def client_env(self):
        folder = self.tempdir('client')
        return folder, clean_env(TMPDIR=folder)

    def fail_with(self, message, result=None):
        text = message
        if result is not None:
            text += '\n--- client stdout:\n%s\n--- client stderr:\n%s' % (result.stdout,
                                                                        result.stderr)
        self.fail(text + '\n' + self.diagnostics())

    @time_limit(150)
    def test_sample_program_with_default_discovery(self):
        self.start_node('node1')
        self.start_node('node2')
        folder, env = self.client_env()
        try:
            result = self.lab.run('client', [sys.executable, SAMPLE_SCRIPT], timeout=60,
                                  env=env, cwd=folder)
        except subprocess.TimeoutExpired as exc:
            self.fail_with('sample.py did not finish in 60 s', exc)
        if result.returncode != 0:
            self.fail_with('sample.py exited with %s' % result.returncode, result)
        lines = re.findall(r'^(\S+) executed job (\d+) at (.+)$', result.stdout, re.M)
        if sorted(int(n) for _, n, _ in lines) != list(range(20)):
            self.fail_with('expected one "executed job N" line for N in 0..19', result)
        if self.lab.hostnames and not {h for h, _, _ in lines} <= {'node1', 'node2'}:
            self.fail_with('jobs did not run on node1/node2', result)
        status = result.stdout.rsplit('executed job', 1)[-1].partition('\n')[2]
        for node in ('node1', 'node2'):
            if not self.lists_node(status, node):
                self.fail_with('%s (%s) missing from print_status output'
                               % (node, self.lab.ip(node)), result)

    def lists_node(self, status, node):
        """True if the print_status text names ``node`` by its IP address (or,
        where lab hosts have their own names, by its host name)."""
        if has_address(status, self.lab.ip(node)):
            return True
        return self.lab.hostnames and re.search(r'\b%s\b' % node, status) is not None

    @time_limit(150)
    def test_node_started_after_client_is_discovered(self):
        self.start_node('node1', ['-c', '1'])
        folder, env = self.client_env()
        script = os.path.join(folder, 'late_node_client.py')
        with open(script, 'w') as f:
            f.write(LATE_NODE_CLIENT)
        client = self.spawn('client', [sys.executable, script], env=env, cwd=folder)
        client.wait_for('cluster created', timeout=30)
        time.sleep(1.0)
        self.start_node('node2', ['-c', '1'])
        try:
            client.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.fail_with('client did not finish in 60 s')
        ran_on = re.findall(r'^job (\d+) ran on (\S+)$', client.stdout(), re.M)
        if client.returncode != 0 or len(ran_on) != 20:
            self.fail_with('client failed (exit %s, %d results)'
                           % (client.returncode, len(ran_on)))
        hosts = {host for _, host in ran_on}
        if not hosts <= {'node1', 'node2'} or 'node2' not in hosts:
            self.fail_with('node2 ran no job (jobs ran on %s)' % sorted(hosts))


IPV6_CLIENT = r'''
import os, sys, time
import dispy

def link_local(ifname='eth0', timeout=20):
    """This host's link-local IPv6 address, once duplicate detection is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open('/proc/net/if_inet6') as f:
            for line in f:
                hexaddr, _index, _plen, scope, flags, name = line.split()
                if name == ifname and scope == '20' and not int(flags, 16) & 0x40:
                    addr = ':'.join(hexaddr[i:i + 4] for i in range(0, 32, 4))
                    return dispy.resolve_host(addr) + '%' + ifname
        time.sleep(0.1)
    sys.exit('no link-local IPv6 address')

def compute(n):
    return n * 2

if __name__ == '__main__':
    cluster = dispy.JobCluster(compute, ip_addr=link_local())
    jobs = [cluster.submit(i) for i in range(4)]
    for job in jobs:
        print('result %s from %s' % (job(timeout=60), job.ip_addr))
    cluster.close()
'''


class IPv6DiscoveryTest(DefaultDiscoveryTest):
    """A client with only an IPv6 link-local address finds a default node by
    multicast (ff02::1) and runs jobs on it over IPv6."""

    HOSTS = ('client', 'node1')

    test_sample_program_with_default_discovery = None
    test_node_started_after_client_is_discovered = None

    @time_limit(120)
    def test_ipv6_multicast_discovery(self):
        self.start_node('node1')
        folder, env = self.client_env()
        script = os.path.join(folder, 'ipv6_client.py')
        with open(script, 'w') as f:
            f.write(IPV6_CLIENT)
        try:
            result = self.lab.run('client', [sys.executable, script], timeout=60, env=env,
                                  cwd=folder)
        except subprocess.TimeoutExpired as exc:
            self.fail_with('IPv6 client did not finish in 60 s', exc)
        results = re.findall(r'^result (\d+) from (\S+)$', result.stdout, re.M)
        if result.returncode != 0 or sorted(int(r) for r, _ in results) != [0, 2, 4, 6]:
            self.fail_with('IPv6 client failed (exit %s)' % result.returncode, result)
        if not all(addr.startswith('fe80:') for _, addr in results):
            self.fail_with('jobs did not run over IPv6', result)

if __name__ == '__main__':
    unittest.main()
