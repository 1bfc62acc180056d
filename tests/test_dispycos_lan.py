"""dispycos's examples 4-7 and node / server faults on a network-namespace LAN.

A lab of three hosts (tests/netns.py): ``client`` runs an example unchanged, with
default discovery (no DISPYCOS_* variable: its private scheduler broadcasts on the
lab's LAN), ``node1`` and ``node2`` run ``dispycosnode.py -c 2 --daemon`` (node1
with ``-i``, node2 without: both ways of hearing the broadcast), on dispycos's
default ports (9706, servers 9707 and 9708; each namespace has its own).

    LanExamplesTest   dispycos_client4.py (files both ways), 5 (an external program
                      through pipes), 6 and 6_channel (streaming, live analytics), 7
                      (status-driven; every event once), each checked as in
                      tests/test_dispycos_examples.py
    LanFaultTest      kill -9 of node2's process mid-run: its servers end (their stdin
                      closes), the tasks there end with MonitorStatus PeerLost at
                      once, their jobs run again on node1 and the computation closes
                      normally; kill -9 of one server of node2 mid-task: PeerLost for
                      its task, the node starts a replacement on the same port, which
                      joins the computation (ServerInitialized again) and runs jobs

Nothing is sent or bound outside the lab; every wait is bounded; the lab kills every
process it started (by PID, also on failure), deletes its namespaces and folders.
Skipped where network namespaces can't be made.
"""

import os
import re
import signal
import subprocess
import sys
import time
import unittest

try:
    from tests import support
    from tests.test_dispycos import children, files_under, wait_gone
    from tests.test_dispycos_examples import (check_client4, check_client5, check_client6,
                                              check_client6_channel, check_client7)
    from tests.test_dispycos_netns import SERVER_PORTS, DispycosLabTestCase
    from tests.test_dispycos_setup import check_client9_node, check_client9_server
    from tests.test_netns import time_limit
except ImportError:                         # run from inside tests/
    import support
    from test_dispycos import children, files_under, wait_gone
    from test_dispycos_examples import (check_client4, check_client5, check_client6,
                                        check_client6_channel, check_client7)
    from test_dispycos_netns import SERVER_PORTS, DispycosLabTestCase
    from test_dispycos_setup import check_client9_node, check_client9_server
    from test_netns import time_limit

EXAMPLES = os.path.join(support.ROOT, 'examples')
wait_until = support.wait_until


class LanCase(DispycosLabTestCase):
    """Both nodes started (and ready) for each test."""

    timeout = 120

    def setUp(self):
        super().setUp()
        self.node1 = self.start_node('node1', wait=False)
        self.node2 = self.start_node('node2', ip_option=False, wait=False)
        for node in (self.node1, self.node2):
            self.wait_ready(node)
            node.dest = self.node_dest(node)
        self.servers = {'%s:%d' % (self.lab.ip(host), port)
                        for host in ('node1', 'node2') for port in SERVER_PORTS}
        self.nodes = {'%s:9706' % self.lab.ip(host) for host in ('node1', 'node2')}

    def node_dest(self, node):
        """The node's --dest_path (DispycosLabTestCase.start_node chose it)."""
        with open('/proc/%d/cmdline' % node.pid, 'rb') as f:
            argv = f.read().split(b'\0')
        return argv[argv.index(b'--dest_path') + 1].decode()

    def example_argv(self, name, args):
        return [sys.executable, os.path.join(EXAMPLES, name)] + [str(a) for a in args]

    def example_dirs(self, name):
        """(TMPDIR, working directory) for one run of an example on the client host."""
        tmp = self.tempdir(name.replace('.py', ''))
        cwd = os.path.join(tmp, 'cwd')
        os.mkdir(cwd)
        return tmp, cwd

    def check_nodes_clean(self):
        """No file of a closed computation left under either node's --dest_path."""
        for node in (self.node1, self.node2):
            if not wait_until(lambda: not files_under(node.dest), 5):
                self.fail_with('files left on %s: %s' % (node.name, files_under(node.dest)))


class LanExamplesTest(LanCase):
    """Each example, unchanged, with default discovery."""

    def run_example(self, name, args=(), timeout=45):
        tmp, cwd = self.example_dirs(name)
        try:
            result = self.lab.run('client', self.example_argv(name, args), timeout=timeout,
                                  env=self.env(tmp), cwd=cwd)
        except subprocess.TimeoutExpired as exc:
            self.fail_with('%s did not finish in %s s (nodes not found?)' % (name, timeout),
                           exc)
        if result.returncode != 0 or 'Traceback' in result.stderr:
            self.fail_with('%s exited with %s' % (name, result.returncode), result)
        self.assertEqual(os.listdir(cwd), [])
        self.check_nodes_clean()
        self.result = result
        return result.stdout, tmp

    def check(self, checker, *args):
        try:
            checker(self, *args)
        except AssertionError as exc:
            self.fail_with('%s: %s' % (checker.__name__, str(exc)[:3000]), self.result)

    @time_limit(60)
    def test_client4_files_both_ways(self):
        out, tmp = self.run_example('dispycos_client4.py', [6])
        self.check(check_client4, out, tmp, self.servers, 6)

    @time_limit(60)
    def test_client5_external_program_through_pipes(self):
        out, _tmp = self.run_example('dispycos_client5.py', [4, 12])
        self.check(check_client5, out, self.servers, 4, 12)

    @time_limit(60)
    def test_client6_streaming_live_analytics(self):
        out, _tmp = self.run_example('dispycos_client6.py', [500])
        self.check(check_client6, out, self.servers, 500)

    @time_limit(60)
    def test_client6_channel_broadcast(self):
        out, _tmp = self.run_example('dispycos_client6_channel.py', [400])
        self.check(check_client6_channel, out, self.servers, 400)

    @time_limit(60)
    def test_client7_status_driven_each_event_once(self):
        out, _tmp = self.run_example('dispycos_client7.py', [12])
        self.check(check_client7, out, self.nodes, self.servers, 12)

    @time_limit(60)
    def test_client9_node_setup_per_node(self):
        out, _tmp = self.run_example('dispycos_client9_node.py', [2])
        self.check(check_client9_node, out, [n.split(':')[0] for n in self.nodes])

    @time_limit(60)
    def test_client9_server_setup_per_server(self):
        out, _tmp = self.run_example('dispycos_client9_server.py', [len(self.servers)])
        self.check(check_client9_server, out, self.servers)


TASK_AT = r'^status TaskCreated (\w+/\d+@%s:(\d+))$'


class LanFaultTest(LanCase):
    """dispycos_client7.py (16 jobs of 0.6 to 3 s; a job whose task is lost runs
    again) while a node or a server of node2 is killed."""

    NJOBS, LONGEST = 16, 3.0
    DETECT = 5.0            # seconds from a kill to the client's PeerLost, at most

    def start_client7(self):
        tmp, cwd = self.example_dirs('client7')
        client = self.spawn('client', self.example_argv(
            'dispycos_client7.py', [self.NJOBS, self.LONGEST]), cwd=cwd, env=self.env(tmp))
        client.name = 'dispycos_client7.py'
        return client

    def wait_tasks_at(self, client, host, count, timeout=40):
        """Waits until ``count`` servers of ``host`` run a task of the client (their
        TaskCreated lines); returns those tasks."""
        pattern = re.compile(TASK_AT % re.escape(self.lab.ip(host)), re.M)

        def running():
            return {port: task for task, port in pattern.findall(client.stdout())}
        if not wait_until(lambda: len(running()) >= count or client.poll() is not None,
                          timeout, 0.05) or len(running()) < count:
            self.fail_with('no task on %d servers of %s in %s s' % (count, host, timeout))
        return set(running().values())

    def node_server_pids(self, node):
        pids = children(node.pid)
        if len(pids) != 2:
            self.fail_with('%s: servers %s, not 2 processes' % (node.name, pids))
        return pids

    def wait_peer_lost(self, client, host, killed_at):
        pattern = r'^monitor \w+/\d+@%s:\d+ PeerLost ' % re.escape(self.lab.ip(host))
        self.wait_line(client, pattern, self.DETECT)
        return time.monotonic() - killed_at

    def finish_client(self, client, timeout=60):
        try:
            client.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail_with('%s did not finish in %s s' % (client.name, timeout))
        if client.returncode != 0 or 'Traceback' in client.stderr():
            self.fail_with('%s exited with %s' % (client.name, client.returncode))
        return client.stdout()

    @time_limit(90)
    def test_node_killed_mid_run(self):
        client = self.start_client7()
        tasks = self.wait_tasks_at(client, 'node2', 2)
        pids = self.node_server_pids(self.node2)
        os.kill(self.node2.pid, signal.SIGKILL)
        killed = time.monotonic()
        self.wait_peer_lost(client, 'node2', killed)
        # the node's servers end when their stdin closes
        left = wait_gone(pids, 10)
        if left:
            self.fail_with('servers %s of the killed node still run' % left)
        out = self.finish_client(client)
        try:
            monitors = check_client7(self, out, self.nodes, self.servers, self.NJOBS)
        except AssertionError as exc:
            self.fail_with('check_client7: %s' % str(exc)[:3000])
        lost = {m[0] for m in monitors if m[3] == 'PeerLost'}
        # tasks running on node2 at the kill, and only tasks of node2, were lost
        self.assertTrue(tasks & lost, (tasks, out))
        for task in lost:
            self.assertEqual(task.split('@')[1].rsplit(':', 1)[0], self.lab.ip('node2'), out)
        # node2 closed at the loss (before the computation's close), nothing after it
        lines = out.splitlines()
        closed = lines.index('status NodeClosed %s:9706' % self.lab.ip('node2'))
        self.assertLess(closed, lines.index('status NodeClosed %s:9706'
                                            % self.lab.ip('node1')), out)
        later = [line for line in lines[closed:]
                 if re.search(r'(submitted at|TaskCreated \S+@)%s:'
                              % re.escape(self.lab.ip('node2')), line)]
        self.assertEqual(later, [], out)
        # every lost job ran again, on node1
        again = re.findall(r'^job (\d+) lost: it runs again$', out, re.M)
        self.assertEqual(len(again), len(lost), out)
        for job in again:
            where = re.findall(r'^job %s \([\d.]+\) submitted at (\S+):\d+ ' % job, out, re.M)
            self.assertEqual(where[-1], self.lab.ip('node1'), out)
        self.check_nodes_clean()

    @time_limit(90)
    def test_server_killed_mid_task(self):
        client = self.start_client7()
        self.wait_tasks_at(client, 'node2', 2)
        pids = self.node_server_pids(self.node2)
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        self.wait_peer_lost(client, 'node2', killed)
        # the node says which server ended, and starts a new one on its port
        try:
            found = self.node2.wait_for(r'server (\S+):(\d+) ended \(exit status -9\); '
                                        r'starting a new one', timeout=10, stream='stderr')
        except RuntimeError as exc:
            self.fail_with('node2 did not restart its server: %s' % str(exc)[:300])
        where = '%s:%s' % (found.group(1), found.group(2))
        self.assertIn(where, self.servers)

        def replaced():
            now = children(self.node2.pid)
            return len(now) == 2 and victim not in now
        if not wait_until(replaced, 15):
            self.fail_with('node2 did not start a replacement server')
        out = self.finish_client(client)
        try:
            monitors = check_client7(self, out, self.nodes, self.servers, self.NJOBS,
                                     restarted={where})
        except AssertionError as exc:
            self.fail_with('check_client7: %s' % str(exc)[:3000])
        lost = [m for m in monitors if m[3] == 'PeerLost']
        self.assertEqual(['%s:%s' % (m[1], m[2]) for m in lost], [where], out)
        # the replacement joined the computation and ran jobs
        lines = out.splitlines()
        rejoined = [i for i, line in enumerate(lines)
                    if line == 'status ServerInitialized %s' % where][1]
        self.assertTrue(any(re.match(r'^job \d+ \([\d.]+\) submitted at %s ' % re.escape(where),
                                     line) for line in lines[rejoined:]), out)
        self.check_nodes_clean()


if __name__ == '__main__':
    unittest.main()
