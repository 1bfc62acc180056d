"""dispynode operations (issue 15): every 4.15 option, service windows, configs, stdin.

Each test starts ``python dispynode.py`` as a user would (tests/support.py NodeProcess,
loopback addresses) and drives it with a real client or its stdin.  Service windows
use times the test computes from its own clock; for transitions the node's clock is
shifted (``DISPY_NODE_CLOCK_OFFSET``, a test hook) so that a boundary is a few
seconds away: start (the node comes in and serves a waiting client), stop (queued
jobs go elsewhere, running ones finish), end (running jobs killed: a reentrant
cluster runs them on another node), and a window across midnight.
``ServiceWindowTest`` checks the window's arithmetic as plain logic.
"""

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob, ServiceWindow

NODE_A, NODE_B, CLIENT = '127.0.0.2', '127.0.0.3', '127.0.0.1'
LEAD = 4.0          # seconds before a shifted node clock reaches its window's boundary


def nap(seconds):
    import time
    time.sleep(seconds)
    return seconds


def where(x):
    return dispy_node_ip_addr, x    # noqa: F821 (a name the node gives its jobs)


def where_after(x, seconds=0):
    import time
    time.sleep(seconds)
    return dispy_node_ip_addr, x    # noqa: F821


def hhmm(epoch):
    return time.strftime('%H:%M', time.localtime(epoch))


def boundary_soon():
    """(clock offset, epoch of the boundary): a node started with this offset sees a
    whole minute LEAD seconds from now."""
    now = time.time()
    boundary = (int(now // 60) + 2) * 60          # any whole minute: the offset moves it
    return boundary - LEAD - now, boundary


def run_node(*args, timeout=30):
    """dispynode.py run to its end (bad values): (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, support.NODE_SCRIPT] + list(args),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, cwd=support.ROOT)
    return proc.returncode, proc.stdout, proc.stderr


class NodeOpsCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.port = None
        for _ in range(20):
            self.port = support.free_port(NODE_A)
            if support.tcp_free(NODE_B, self.port):
                break

    def node(self, ip=NODE_A, cpus=1, args=(), env=None, start=True, **kwargs):
        node = support.NodeProcess(ip, port=self.port, cpus=cpus, args=list(args),
                                   env=env, **kwargs)
        self.addCleanup(node.stop)
        return node.start() if start else node

    def cluster(self, computation=nap, nodes=(NODE_A,), **kwargs):
        cluster = dispy.JobCluster(computation, nodes=list(nodes), host=CLIENT, port=0,
                                   node_port=self.port, recover_file=False, **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def shifted(self, offset):
        return dict(os.environ, DISPY_NODE_CLOCK_OFFSET=repr(offset))

    def ask(self, node, command, pattern, timeout=10):
        """Sends a stdin command; waits for its answer on stdout (a regex)."""
        mark = len(node.stdout())
        node.command(command)
        self.assertTrue(support.wait_until(
            lambda: re.search(pattern, node.stdout()[mark:]), timeout),
            '%r: no %r in:\n%s' % (command, pattern, node.output()[-3000:]))
        return node.stdout()[mark:]

    def wait_status(self, node, pattern, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:      # bounded: each ask waits for its answer
            text = self.ask(node, 'status', r'service: ')
            if re.search(pattern, text):
                return text
        self.fail('node status never matched %r:\n%s' % (pattern, node.output()[-3000:]))


# ================================================================================
# Options
# ================================================================================

class OptionsTest(NodeOpsCase):

    def test_every_4_15_option_is_accepted(self):
        folder = support.temp_folder(self)
        init = os.path.join(folder, 'init.py')
        with open(init, 'w') as f:
            f.write('import os\nHERE = %r\n'
                    'def init():\n    open(os.path.join(HERE, "init-ran"), "w").close()\n'
                    'def close():\n    open(os.path.join(HERE, "close-ran"), "w").close()\n'
                    % folder)
        node = self.node(args=[
            '--ext_host', NODE_A, '--name', 'every-option', '--serve', '5',
            '--msg_timeout', '12', '--ping_interval', '30', '--scheduler_host', CLIENT,
            '--client_shutdown', '--force_cleanup', '--admin_secret', 'reserved',
            '--unsafe_setup', '--ipv4_udp_multicast', '--zombie_interval', '1',
            '--max_file_size', '1m', '--init', init, '--daemon'])
        self.assertTrue(os.path.exists(os.path.join(folder, 'init-ran')))
        cluster = self.cluster(where)
        job = cluster.submit(7)
        self.assertEqual(job(timeout=30), (NODE_A, 7), job.exception)
        cluster.close()
        node.signal(15)
        self.assertEqual(node.wait(20), 0)
        self.assertTrue(os.path.exists(os.path.join(folder, 'close-ran')))

    def test_dispy_port_is_the_base_port_and_c_0_means_all(self):
        base = self.port - 1 if support.tcp_free(NODE_A, self.port - 1) else self.port
        node = support.NodeProcess(NODE_A, port=base + 1, cpus=0)
        node._command = lambda: [sys.executable, support.NODE_SCRIPT, '--host', NODE_A,
                                 '--dispy_port', str(base), '-c', '0', '--dest_path_prefix',
                                 node.dest_path_prefix, '-d']
        self.addCleanup(node.stop)
        node.start()
        self.assertIn('serving at %s:%d with %d CPUs' % (NODE_A, base + 1, os.cpu_count()),
                      node.stdout())

    def test_bad_values_get_one_line_and_exit_2(self):
        folder = support.temp_folder(self)
        for args in (['--service_start', '25:00'], ['--service_end', '7'],
                     ['--config', os.path.join(folder, 'missing.json')], ['--cpus', 'abc'],
                     ['--serve', '-1'], ['-i', 'no-such-host.invalid'],
                     ['--secret_file', os.path.join(folder, 'missing')],
                     ['--init', os.path.join(folder, 'missing.py')], ['--bogus']):
            status, out, err = run_node(*args, '--daemon', '--dest_path_prefix', folder)
            self.assertEqual(status, 2, (args, out, err))
            self.assertEqual(len(err.strip().splitlines()), 1, (args, err))
            self.assertTrue(err.startswith('dispynode'), (args, err))

    def test_save_config_then_config(self):
        folder = support.temp_folder(self)
        path = os.path.join(folder, 'node.json')
        # a window from an hour ago to an hour from now: serving whenever the test runs
        start, stop = (time.localtime(time.time() + d * 3600) for d in (-1, 1))
        status, out, err = run_node('--save_config', path, '-s', 'sekrit', '--name', 'saved',
                                    '-c', '1',
                                    '--service_start', '%02d:%02d' % (start.tm_hour, start.tm_min),
                                    '--service_stop', '%02d:%02d' % (stop.tm_hour, stop.tm_min),
                                    '--daemon', '--dest_path_prefix', 'relative/folder')
        self.assertEqual(status, 0, err)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)    # holds the secret
        with open(path) as f:
            saved = json.load(f)
        self.assertEqual((saved['secret'], saved['name'], saved['service_stop']),
                         ('sekrit', 'saved', stop.tm_hour * 60 + stop.tm_min))
        self.assertEqual(saved['dest_path_prefix'],            # works from any folder
                         os.path.join(support.ROOT, 'relative', 'folder'))
        node = self.node(args=['--config', path, '--name', 'command-line-wins'], secret='')
        self.assertIn('dispynode command-line-wins serving', node.stdout())
        cluster = self.cluster(where, secret='sekrit')      # the saved secret
        self.assertEqual(cluster.submit(1)(timeout=30), (NODE_A, 1))

    def test_config_values_are_checked_and_the_command_line_wins(self):
        folder = support.temp_folder(self)
        saved = os.path.join(folder, 'saved.json')

        def config_with(**values):
            path = os.path.join(folder, 'in.json')
            with open(path, 'w') as f:
                json.dump(values, f)
            return path
        for values in ({'cpus': 'x'}, {'cpus': 1.5}, {'cpus': None}, {'ip_addrs': '127.0.0.2'},
                       {'service_start': '25:00'}, {'daemon': 'yes'}, {'no_such': 1}):
            status, out, err = run_node('--config', config_with(**values), '--daemon')
            self.assertEqual(status, 2, (values, err))
            self.assertEqual(len(err.strip().splitlines()), 1, (values, err))
        path = config_with(ip_addrs=['127.0.0.5'], name='from-file', clean=False)
        status, out, err = run_node('--config', path, '-i', NODE_B, '--clean',
                                    '--save_config', saved)
        self.assertEqual(status, 0, err)
        with open(saved) as f:
            again = json.load(f)
        self.assertEqual((again['ip_addrs'], again['name']), ([NODE_B], 'from-file'))
        self.assertNotIn('clean', again)        # a one-time clean-up is never saved

    def test_secret_file_keeps_the_secret_out_of_ps(self):
        folder = support.temp_folder(self)
        secret_file = os.path.join(folder, 'secret')
        with open(secret_file, 'w') as f:
            f.write('file-secret-123\n')
        os.chmod(secret_file, 0o600)
        node = self.node(args=['--secret_file', secret_file])
        with open('/proc/%d/cmdline' % node.proc.pid, 'rb') as f:
            self.assertNotIn(b'file-secret-123', f.read())
        cluster = self.cluster(where, secret='file-secret-123')
        self.assertEqual(cluster.submit(2)(timeout=30), (NODE_A, 2))
        empty = os.path.join(folder, 'empty')
        open(empty, 'w').close()
        for args in (['--secret_file', empty], ['--secret_file', secret_file, '-s', 'x']):
            status, out, err = run_node(*args, '--daemon')
            self.assertEqual(status, 2, (args, err))

    def test_second_node_is_told_who_holds_the_port_and_clean_after_kill_9(self):
        node = self.node()
        status, out, err = run_node('-i', NODE_A, '-p', str(self.port), '--daemon',
                                    '--dest_path_prefix', support.temp_folder(self))
        self.assertNotEqual(status, 0)
        self.assertIn('Address already in use (by pid %d: ' % node.proc.pid, err)
        self.assertIn('dispynode.py', err)
        stale = os.path.join(node.dest_path_prefix, 'stale-from-before')
        os.makedirs(stale)
        node.kill()                                 # kill -9: nothing cleaned up
        node.args.append('--clean')
        node.start()
        self.assertFalse(os.path.exists(stale))
        cluster = self.cluster(where)
        self.assertEqual(cluster.submit(3)(timeout=30), (NODE_A, 3))

    def test_serve_1_exits_after_its_client(self):
        node = self.node(args=['--serve', '1', '--daemon'])
        cluster = self.cluster(where)
        self.assertEqual(cluster.submit(4)(timeout=30), (NODE_A, 4))
        cluster.close()
        self.assertEqual(node.wait(20), 0, node.output())
        self.assertIn('served 1 client(s) (--serve)', node.stderr())

    def test_client_shutdown(self):
        refusing = self.node(NODE_B, args=['--daemon'])
        allowing = self.node(args=['--client_shutdown', '--daemon'])
        cluster = self.cluster(where, nodes=[NODE_A, NODE_B])
        jobs = [cluster.submit_node(ip, ip) for ip in (NODE_A, NODE_B)]
        for job in jobs:
            job(timeout=30)
            self.assertEqual(job.status, DispyJob.Finished, job.exception)
        self.assertTrue(cluster.shutdown(timeout=30))
        self.assertEqual(allowing.wait(20), 0, allowing.output())
        self.assertTrue(support.wait_until(
            lambda: 'refused (start it with --client_shutdown' in refusing.stderr(), 10))
        self.assertIsNone(refusing.proc.poll())     # still serving

    def test_force_cleanup(self):
        kept = self.node(NODE_B)
        forced = self.node(args=['--force_cleanup'])
        for node in (kept, forced):
            cluster = self.cluster(where, nodes=[node.ip], cleanup=False, dest_path='mine')
            self.assertEqual(cluster.submit(5)(timeout=30), (node.ip, 5))
            cluster.close()
        self.assertTrue(os.path.isdir(os.path.join(kept.dest_path_prefix, 'mine')))
        self.assertTrue(support.wait_until(
            lambda: not os.path.isdir(os.path.join(forced.dest_path_prefix, 'mine')), 10))

    def test_scheduler_host_and_ping_interval_announce_the_node(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
            listener.bind((CLIENT, 0))
            listener.settimeout(10)
            self.node(args=['--scheduler_host', CLIENT, '--client_port',
                            str(listener.getsockname()[1]), '--ping_interval', '0.5'])
            seen = []
            for _ in range(2):          # at start, then again 0.5 s later (no client)
                data, _addr = listener.recvfrom(65536)
                msg, authentic = dispy.unpack_datagram('', data)
                self.assertTrue(authentic)
                seen.append(msg)
        self.assertEqual([m.get('t') for m in seen], ['announce', 'announce'])
        self.assertEqual(seen[0].get('port'), self.port)


# ================================================================================
# Service windows
# ================================================================================

class ServiceWindowNodeTest(NodeOpsCase):

    def test_outside_its_window_a_node_serves_nobody(self):
        now = time.time()
        out = self.node(args=['--service_start', hhmm(now + 3600), '--service_stop',
                              hhmm(now + 7200), '--service_end', hhmm(now + 7260)])
        inside = self.node(NODE_B, args=['--service_start', hhmm(now - 3600),
                                         '--service_stop', hhmm(now + 3600)])
        self.wait_status(out, r'service: out')
        self.wait_status(inside, r'service: serving')
        cluster = self.cluster(where, nodes=[NODE_A, NODE_B])
        jobs = [cluster.submit(i) for i in range(6)]
        self.assertEqual({job(timeout=30)[0] for job in jobs}, {NODE_B})
        self.assertTrue(support.wait_until(
            lambda: 'not serving: out of its service hours' in out.stderr(), 10),
            out.output())

    def test_a_waiting_client_is_served_when_the_window_starts(self):
        offset, start = boundary_soon()
        node = self.node(args=['--service_start', hhmm(start), '--service_stop',
                               hhmm(start + 3600), '--service_end', hhmm(start + 3660)],
                         env=self.shifted(offset))
        self.wait_status(node, r'service: out')
        cluster = self.cluster(where)
        job = cluster.submit(8)
        self.assertEqual(job(timeout=LEAD + 20), (NODE_A, 8), job.exception)
        self.assertGreaterEqual(job.start_time, time.time() - 20)
        self.wait_status(node, r'service: serving')

    def test_after_stop_no_new_jobs_and_running_ones_finish(self):
        offset, stop = boundary_soon()
        stopping = self.node(args=['--service_start', hhmm(stop - 3600), '--service_stop',
                                   hhmm(stop)], env=self.shifted(offset))
        self.node(NODE_B)
        cluster = self.cluster(where, nodes=[NODE_A, NODE_B])
        running = cluster.submit_node(NODE_A, 0)       # warm: the node is set up
        running()
        long_job = cluster.submit_node(NODE_A, 'long')
        self.wait_status(stopping, r'service: stopped', timeout=LEAD + 15)
        later = [cluster.submit(i) for i in range(6)]
        self.assertEqual({job(timeout=30)[0] for job in later}, {NODE_B})
        self.assertEqual(long_job(timeout=30), (NODE_A, 'long'))

    def test_at_end_running_jobs_are_killed_and_a_reentrant_cluster_reruns_them(self):
        offset, end = boundary_soon()
        ending = self.node(args=['--service_start', hhmm(end - 3600), '--service_stop',
                                 hhmm(end), '--service_end', hhmm(end)],
                           env=self.shifted(offset))
        self.node(NODE_B)
        cluster = self.cluster(nodes=[NODE_A, NODE_B], reentrant=True)
        first = cluster.submit_node(NODE_A, 0)
        first()
        job = cluster.submit(LEAD + 6)          # runs past the end on whichever node
        other = cluster.submit(LEAD + 6)
        self.assertTrue(support.wait_until(lambda: job.status == other.status ==
                                           DispyJob.Running, 15))
        self.assertEqual({job.ip_addr, other.ip_addr}, {NODE_A, NODE_B})
        on_a = job if job.ip_addr == NODE_A else other
        self.wait_status(ending, r'service: out', timeout=LEAD + 15)
        for each in (job, other):
            each(timeout=3 * (LEAD + 6) + 20)
            self.assertEqual(each.status, DispyJob.Finished, each.exception)
        self.assertEqual(on_a.ip_addr, NODE_B)  # killed on A at its end, run again on B
        self.assertIn('serving → out', ending.stderr())

    def test_at_end_queued_jobs_go_to_other_nodes(self):
        offset, end = boundary_soon()
        ending = self.node(args=['--service_start', hhmm(end - 3600), '--service_stop',
                                 hhmm(end), '--service_end', hhmm(end)],
                           env=self.shifted(offset))
        self.node(NODE_B)
        cluster = self.cluster(nodes=[NODE_A, NODE_B])      # not reentrant
        warm = [cluster.submit_node(ip, 0) for ip in (NODE_A, NODE_B)]
        for job in warm:
            job()
        jobs = [cluster.submit(60) for _ in range(6)]       # some queued on each node
        self.assertTrue(support.wait_until(
            lambda: sum(1 for j in jobs if j.ip_addr == NODE_A) >= 2, 15))
        self.wait_status(ending, r'service: out', timeout=LEAD + 15)

        def killed(job):        # the one running on A at its end: lost with the node
            return job.status in dispy.FINAL_STATUSES and 'not serving' in (job.exception or '')

        def settled():
            return all(killed(j) or (
                j.ip_addr == NODE_B and j.status in (DispyJob.Created, DispyJob.Running))
                for j in jobs)
        report = lambda: [(j.status, j.ip_addr, j.exception) for j in jobs]   # noqa: E731
        self.assertTrue(support.wait_until(settled, 20), report())
        self.assertEqual(sum(1 for j in jobs if killed(j)), 1, report())   # queued: not lost

    def test_a_window_across_midnight(self):
        now = time.time()
        midnight = (int(now // 86400) + 1) * 86400 + time.timezone   # local midnight
        while midnight - now > 86400:
            midnight -= 86400
        offset = midnight - LEAD - now
        node = self.node(args=['--service_start', '23:58', '--service_stop', '00:02'],
                         env=self.shifted(offset))
        self.wait_status(node, r'service: serving; window 23:58-00:02-\.\., node clock 23:59')
        self.wait_status(node, r'service: serving; window 23:58-00:02-\.\., node clock 00:00',
                         timeout=LEAD + 15)
        cluster = self.cluster(where)
        self.assertEqual(cluster.submit(9)(timeout=30), (NODE_A, 9))


# ================================================================================
# stdin commands
# ================================================================================

class StdinCommandsTest(NodeOpsCase):

    def test_help_status_stop_start_cpus_release(self):
        node = self.node(cpus=2)
        self.node(NODE_B)
        text = self.ask(node, 'help', r'terminate')
        for command in ('status', 'stop', 'start', 'cpus N', 'release', 'quit, exit',
                        'terminate', 'help'):
            self.assertIn(command, text)
        self.ask(node, 'cpus 1', r'using 1 CPUs')
        self.wait_status(node, r'1 CPUs')
        self.ask(node, 'stop', r'taking no new jobs')
        self.wait_status(node, r'service: stopped \(stopped by its operator\)')
        cluster = self.cluster(where, nodes=[NODE_A, NODE_B])
        jobs = [cluster.submit(i) for i in range(4)]
        self.assertEqual({job(timeout=30)[0] for job in jobs}, {NODE_B})
        self.ask(node, 'start', r'taking jobs')
        pinned = cluster.submit_node(NODE_A, 'after start')
        self.assertEqual(pinned(timeout=30), (NODE_A, 'after start'))
        self.ask(node, 'release', r'client %s released' % CLIENT)
        self.wait_status(node, r'no client')
        self.ask(node, 'start', r'taking jobs')     # the released client may come back
        self.wait_status(node, r'no client')
        self.ask(node, 'quit', r'finishing running jobs')
        self.assertEqual(node.wait(20), 0)


class HandBackTest(NodeOpsCase):
    """What a node that stops taking jobs hands back, and more CPUs given at run time."""

    def test_a_pinned_job_handed_back_waits_for_its_node(self):
        node = self.node()
        self.node(NODE_B)
        cluster = self.cluster(where_after, nodes=[NODE_A, NODE_B])
        running = cluster.submit_node(NODE_A, 'running', 5)
        queued = cluster.submit_node(NODE_A, 'queued')
        self.assertTrue(support.wait_until(lambda: running.status == DispyJob.Running
                                           and queued.ip_addr == NODE_A, 15))
        self.ask(node, 'stop', r'taking no new jobs')
        self.assertTrue(support.wait_until(lambda: queued.ip_addr is None, 15),
                        'the queued job was not handed back')
        others = [cluster.submit(i) for i in range(4)]      # time for a wrong dispatch
        self.assertEqual({job(timeout=30)[0] for job in others}, {NODE_B})
        self.assertEqual((queued.status, queued.ip_addr), (DispyJob.Created, None))
        self.ask(node, 'start', r'taking jobs')
        self.assertEqual(queued(timeout=30), (NODE_A, 'queued'))
        self.assertEqual(running(timeout=30), (NODE_A, 'running'))

    def test_more_cpus_reach_a_computation_already_set_up(self):
        node = self.node(cpus=1)
        cluster = self.cluster()
        cluster.submit(0)()                                 # set up with 1 CPU
        self.ask(node, 'cpus 2', r'using 2 CPUs')
        jobs = [cluster.submit(2) for _ in range(2)]
        for job in jobs:
            job(timeout=30)
            self.assertEqual(job.status, DispyJob.Finished, job.exception)
        first, second = jobs
        self.assertLess(max(first.start_time, second.start_time),
                        min(first.end_time, second.end_time), 'the two jobs did not overlap')


# ================================================================================
# Availability, with the real psutil
# ================================================================================

def python_with_psutil():
    """A Python that has psutil (.venv-tests/, made by .ci/test-tools), or None."""
    for python in (os.path.join(support.ROOT, '.venv-tests', 'bin', 'python'), sys.executable):
        if os.path.exists(python) and subprocess.run(
                [python, '-c', 'import psutil'], capture_output=True, timeout=60).returncode == 0:
            return python
    return None


class AvailabilityTest(NodeOpsCase):

    def test_a_node_with_psutil_reports_cpu_memory_disk_and_swap(self):
        python = python_with_psutil()
        if python is None:
            raise unittest.SkipTest('psutil is not installed (run .ci/test-tools: it puts it '
                                    'in .venv-tests/)')
        self.node(python=python, args=['--daemon'])
        seen = []
        cluster = self.cluster(where, pulse_interval=0.5, cluster_status=lambda status, node,
                               job: seen.append(node.avail_info) if node is not None and
                               node.avail_info is not None else None)
        self.assertEqual(cluster.submit(1)(timeout=30), (NODE_A, 1))
        self.assertTrue(support.wait_until(lambda: len(seen) >= 2, 15),
                        'no availability reported')
        info = seen[-1]
        self.assertIsInstance(info, dispy.DispyNodeAvailInfo)
        self.assertTrue(0.0 <= info.cpu <= 100.0, info)
        self.assertGreater(info.memory, 1 << 20)
        self.assertGreater(info.disk, 0)
        self.assertTrue(0.0 <= info.swap <= 100.0, info)
        self.assertEqual(cluster.status()['nodes'][0]['ip_addr'], NODE_A)


# ================================================================================
# The window's arithmetic
# ================================================================================

class ServiceWindowTest(unittest.TestCase):

    def test_states_through_a_day(self):
        w = ServiceWindow(start=8 * 60, stop=17 * 60, end=18 * 60)
        for minute, state in ((7 * 60 + 59, 'out'), (8 * 60, 'serving'), (16 * 60 + 59.9,
                              'serving'), (17 * 60, 'stopped'), (18 * 60, 'out'), (0, 'out')):
            self.assertEqual(w.state(minute), state, minute)

    def test_across_midnight(self):
        w = ServiceWindow(start=22 * 60, stop=6 * 60, end=6 * 60 + 30)
        for minute, state in ((21 * 60, 'out'), (22 * 60, 'serving'), (23 * 60 + 59,
                              'serving'), (0, 'serving'), (5 * 60 + 59, 'serving'),
                              (6 * 60, 'stopped'), (6 * 60 + 30, 'out')):
            self.assertEqual(w.state(minute), state, minute)

    def test_partial_windows(self):
        self.assertEqual(ServiceWindow().state(3), 'serving')
        stop_only = ServiceWindow(stop=12 * 60)          # no end: jobs never killed
        self.assertEqual([stop_only.state(m) for m in (0, 11 * 60, 12 * 60, 23 * 60)],
                         ['serving', 'serving', 'stopped', 'stopped'])
        end_only = ServiceWindow(end=12 * 60)
        self.assertEqual([end_only.state(m) for m in (0, 12 * 60)], ['serving', 'out'])
        start_only = ServiceWindow(start=9 * 60)         # waits for 9:00, then for good
        self.assertEqual([start_only.state(m) for m in (8 * 60, 9 * 60, 8 * 60)],
                         ['out', 'serving', 'serving'])
        same = ServiceWindow(start=9 * 60, stop=17 * 60, end=17 * 60)   # killed at stop
        self.assertEqual(same.state(17 * 60), 'out')

    def test_time_of_day_values(self):
        self.assertEqual(dispy.parse_time_of_day('7:05'), 425)
        self.assertEqual(dispy.parse_time_of_day('23:59'), 1439)
        for bad in ('24:00', '12:60', '7', 'noon', '-1:00'):
            with self.assertRaises(Exception):
                dispy.parse_time_of_day(bad)


if __name__ == '__main__':
    unittest.main()
