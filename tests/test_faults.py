"""Real faults, each bounded in time: the product must stay correct under them.

Every job ends exactly once (one final-status callback per job) and nothing hangs,
whatever breaks: a node killed (SIGKILL) or frozen (SIGSTOP / SIGCONT), a client
closing with jobs running, a client that crashes (uncaught exception, ``os._exit``,
SIGKILL), a network partition (inside network namespaces), a job that runs past its
timeout.  Nodes are real ``dispynode.py`` processes on loopback addresses
(``support.NodeProcess``); clients run in this process (explicit ``nodes=`` and
``ip_addr=``) or as scripts in subprocesses (``support.client_env``).

Classes, by fault:

    NodeKillTest          SIGKILL of one of two nodes mid-run, with and without reentrant
    NodeStopTest          SIGSTOP of a node past 5 x pulse_interval, then SIGCONT: late
                          replies change nothing and the node serves the cluster again
    CloseTerminateTest    close(terminate=True) with running jobs, in process and in a
                          client subprocess (which must then exit at once)
    ClientCrashTest       a client script dies of an uncaught exception mid-run
    PartitionTest         a node's link pulled mid-run inside a NetLab, then restored
                          (skipped where network namespaces cannot be made)
    JobTimeoutTest        per-job (dispy_job_timeout) and cluster-wide (job_timeout) limits
    RecoverJobsTest       dispy.recover_jobs() after a client crash (also across a
                          node restart, and with terminate_pending)

A vanished client's node being freed, --zombie_interval, and jobs that never reached a
node are in test_interrupted.py.

Measured figures go to stderr as ``FAULT-TIMING name=seconds`` lines.

Every wait is bounded (``job(timeout=)``, ``wait(timeout=)``, ``support.wait_until`` on
state owned by another process); every process a test starts is stopped by a cleanup.
"""

import collections
import json
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

import dispy
from dispy import DispyJob, DispyNode

NodeProcess, client_env = support.NodeProcess, support.client_env
free_port, wait_until = support.free_port, support.wait_until

CLIENT_IP = '127.0.0.1'
NODE_A = '127.0.0.2'
NODE_B = '127.0.0.3'
FINAL = (DispyJob.Finished, DispyJob.Cancelled, DispyJob.Terminated, DispyJob.Abandoned)
PULSE = 0.4                  # pulse_interval of the SIGSTOP test: dead after 5 x 0.4 s
DETECT_BOUND = 15.0          # how long a test waits for a frozen/cut-off node to be declared dead
DETECT_SLACK = 5.0           # accepted delay beyond 5 x pulse_interval


def timing(name, value):
    """Prints a measured figure in the one form the lead greps for."""
    text = ('%.2f' % value) if isinstance(value, float) else str(value)
    print('FAULT-TIMING %s=%s' % (name, text), file=sys.stderr, flush=True)


def status_name(status):
    return dispy.STATUS_NAMES.get(status, status)


# ================================================================================
# Computations (shipped as source: module level, self-contained)
# ================================================================================

def sleep_square(i, seconds):
    time.sleep(seconds)
    return i * i


def spawn_child_and_sleep(folder, seconds):
    """Starts ``sleep 60`` and records its PID in ``folder``, then sleeps."""
    import subprocess
    if folder is None:
        return 'warm'
    child = subprocess.Popen(['sleep', '60'])
    tmp = os.path.join(folder, 'child.pid.tmp')
    with open(tmp, 'w') as f:
        f.write(str(child.pid))
    os.rename(tmp, os.path.join(folder, 'child.pid'))
    time.sleep(seconds)
    return 'not stopped'


# ================================================================================
# Helpers
# ================================================================================

class Recorder:
    """Counts final-status callbacks per job (by ``job.id``) and records node events."""

    def __init__(self):
        self.cond = threading.Condition()
        self.finals = collections.Counter()      # job id -> final-status callbacks
        self.final_status = {}                   # job id -> status of the last one
        self.running = []                        # (monotonic, job id, node ip)
        self.node_events = []                    # (monotonic, status, node ip)

    def callback(self, job):
        with self.cond:
            if job.status in FINAL:
                self.finals[job.id] += 1
                self.final_status[job.id] = job.status
            self.cond.notify_all()

    def cluster_status(self, status, node, job):
        with self.cond:
            now = time.monotonic()
            ip = node.ip_addr if node is not None else None
            if job is None:
                self.node_events.append((now, status, ip))
            elif status == DispyJob.Running:
                self.running.append((now, job.id, job.ip_addr or ip))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout):
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def running_on(self, ip):
        return [jid for _, jid, where in self.running if where == ip]

    def node_event(self, status, ip, after=0.0):
        """Time of the first ``status`` event of node ``ip`` after ``after``, or None."""
        for when, s, where in self.node_events:
            if s == status and where == ip and when >= after:
                return when
        return None


def start_node(test, ip, port=None, cpus=2, args=(), dest_path_prefix=None):
    node = NodeProcess(ip, port=port, cpus=cpus, args=args, dest_path_prefix=dest_path_prefix)
    test.addCleanup(node.stop)
    node.start()
    return node


def make_cluster(test, computation, nodes, port, **kwargs):
    cluster = dispy.JobCluster(computation, nodes=list(nodes), ip_addr=CLIENT_IP, port=0,
                               node_port=port, **kwargs)
    test.addCleanup(cluster.close, terminate=True)
    return cluster


def tempdir(test, prefix='dispytest-faults-'):
    path = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, path, True)
    return path


def kill_sleep_child(path):
    """Kills the ``sleep 60`` whose PID a job wrote to ``path`` (if it still runs)."""
    try:
        with open(path) as f:
            pid = int(f.read())
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            if not f.read().startswith(b'sleep'):
                return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


STATUS_RE = re.compile(r'^dispynode .*: \d+ CPUs, \d+ running, \d+ queued, \d+ done\n'
                       r'  (?:no client|client .*)$', re.M)


def node_status(node, timeout=10.0):
    """Sends ``status`` to the node's stdin; returns its (two-line) answer, or ''."""
    before = len(STATUS_RE.findall(node.stdout()))
    try:
        node.command('status')
    except (OSError, ValueError):
        return ''
    if not wait_until(lambda: len(STATUS_RE.findall(node.stdout())) > before, timeout, 0.05):
        return ''
    return STATUS_RE.findall(node.stdout())[-1]


def wait_node_status(node, pattern, timeout):
    """Polls the node's ``status`` until it matches ``pattern``; returns (match, last text)."""
    regex = re.compile(pattern)
    last = ['']

    def check():
        last[0] = node_status(node)
        return regex.search(last[0])
    return wait_until(check, timeout, 0.2), last[0]


class ClientScript:
    """A client program in a subprocess; stdout and stderr go to files in ``cwd``."""

    _count = 0

    def __init__(self, test, source, env, cwd, args=()):
        ClientScript._count += 1
        base = os.path.join(cwd, 'client%d' % ClientScript._count)
        self.path = base + '.py'
        with open(self.path, 'w') as f:
            f.write(source)
        self._out = open(base + '.out', 'w+b')
        self._err = open(base + '.err', 'w+b')
        env = dict(env, PYTHONUNBUFFERED='1')
        self.proc = subprocess.Popen([sys.executable, self.path] + [str(a) for a in args],
                                     cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err,
                                     start_new_session=True)
        self.pid = self.proc.pid
        test.addCleanup(self.kill)

    def stdout(self):
        return support._read(self._out)

    def stderr(self):
        return support._read(self._err)

    def output(self):
        return '--- client stdout:\n%s\n--- client stderr:\n%s' % (self.stdout(), self.stderr())

    def wait_for(self, pattern, timeout):
        """The first match of ``pattern`` in stdout, or None at timeout / exit."""
        regex = re.compile(pattern, re.M)
        found = wait_until(lambda: regex.search(self.stdout()) or self.proc.poll() is not None,
                           timeout, 0.02)
        return regex.search(self.stdout()) if found else None

    def wait(self, timeout):
        """Exit status, or None if still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        support.kill_group(self.proc, (self._out, self._err))


# ================================================================================
# 1, 2. A node killed (SIGKILL) mid-run
# ================================================================================

class NodeKillTest(unittest.TestCase):
    """Two nodes (127.0.0.2, 127.0.0.3, same port); node A is killed while it runs jobs."""

    timeout = 90
    N_JOBS = 12
    SECONDS = 1.0

    def run_jobs_and_kill(self, reentrant):
        port = free_port(NODE_A)
        node_a = start_node(self, NODE_A, port)
        start_node(self, NODE_B, port)
        rec = Recorder()
        cluster = make_cluster(self, sleep_square, [NODE_A, NODE_B], port, reentrant=reentrant,
                               callback=rec.callback, cluster_status=rec.cluster_status)
        jobs = []
        for i in range(self.N_JOBS):
            job = cluster.submit(i, self.SECONDS)
            self.assertIsNotNone(job)
            job.id = i
            jobs.append(job)
        self.assertTrue(rec.wait_for(lambda: rec.running_on(NODE_A), 30),
                        'no job ran on %s\n%s' % (NODE_A, node_a.output()))
        processes = node_a.descendants()          # forkserver, resource tracker, host, workers
        self.addCleanup(support.kill_pids, processes)
        on_a = [job for job in jobs if job.ip_addr == NODE_A and job.status not in FINAL]
        t_kill = time.monotonic()
        node_a.signal(signal.SIGKILL)
        self.assertTrue(cluster.wait(timeout=45), 'cluster.wait() timed out: %s' % [
            (job.id, status_name(job.status), job.ip_addr) for job in jobs])
        closed = rec.node_event(DispyNode.Closed, NODE_A, t_kill)
        timing('sigkill_%s_all_jobs_done_s' % ('reentrant' if reentrant else 'plain'),
               time.monotonic() - t_kill)
        if closed is not None:
            timing('sigkill_detection_s', closed - t_kill)
        # every job ended exactly once
        with rec.cond:
            finals = dict(rec.finals)
        self.assertEqual(finals, {i: 1 for i in range(self.N_JOBS)},
                         'final-status callbacks per job')
        # no process of the killed node survives it
        self.assertTrue(wait_until(lambda: not any(support.pid_alive(p) for p in processes), 10),
                        'processes of the killed node still alive: %s'
                        % [p for p in processes if support.pid_alive(p)])
        return jobs, on_a, closed

    def test_sigkill_without_reentrant_cancels_the_nodes_jobs(self):
        jobs, on_a, closed = self.run_jobs_and_kill(reentrant=False)
        cancelled = [job for job in jobs if job.status == DispyJob.Cancelled]
        self.assertTrue(cancelled, 'no job was cancelled although node %s was killed while '
                        'running jobs' % NODE_A)
        for job in jobs:
            if job.status == DispyJob.Cancelled:
                self.assertEqual(job.ip_addr, NODE_A, 'job %s cancelled' % job.id)
                self.assertIn(NODE_A, str(job.exception), 'job %s' % job.id)
            else:
                self.assertEqual(job.status, DispyJob.Finished,
                                 'job %s ended %s: %s' % (job.id, status_name(job.status),
                                                          job.exception))
                self.assertEqual(job.result, job.id * job.id)
        self.assertIsNotNone(closed, 'cluster_status got no DispyNode.Closed for %s' % NODE_A)

    def test_sigkill_with_reentrant_finishes_every_job_elsewhere(self):
        jobs, on_a, closed = self.run_jobs_and_kill(reentrant=True)
        for job in jobs:
            self.assertEqual(job.status, DispyJob.Finished,
                             'job %s ended %s: %s' % (job.id, status_name(job.status),
                                                      job.exception))
            self.assertEqual(job.result, job.id * job.id)
        self.assertTrue(on_a, 'no job was on %s when it was killed' % NODE_A)
        self.assertTrue(any(job.ip_addr == NODE_B for job in on_a),
                        'no job of the killed node was resubmitted to %s: %s'
                        % (NODE_B, [(job.id, job.ip_addr) for job in on_a]))


# ================================================================================
# 3. A node frozen (SIGSTOP) past 5 x pulse_interval, then thawed (SIGCONT)
# ================================================================================

class NodeStopTest(unittest.TestCase):

    timeout = 150
    N_JOBS = 8
    SECONDS = 1.5

    def run_stop_cont(self, reentrant):
        port = free_port(NODE_A)
        node_a = start_node(self, NODE_A, port)
        start_node(self, NODE_B, port)
        rec = Recorder()
        cluster = make_cluster(self, sleep_square, [NODE_A, NODE_B], port, reentrant=reentrant,
                               pulse_interval=PULSE, callback=rec.callback,
                               cluster_status=rec.cluster_status)
        jobs = []
        for i in range(self.N_JOBS):
            job = cluster.submit(i, self.SECONDS)
            self.assertIsNotNone(job)
            job.id = i
            jobs.append(job)
        self.assertTrue(rec.wait_for(lambda: rec.running_on(NODE_A), 30),
                        'no job ran on %s\n%s' % (NODE_A, node_a.output()))
        on_a = [job for job in jobs if job.ip_addr == NODE_A and job.status not in FINAL]

        t_stop = time.monotonic()
        node_a.signal(signal.SIGSTOP)
        self.addCleanup(node_a.signal, signal.SIGCONT)
        detected = rec.wait_for(lambda: rec.node_event(DispyNode.Closed, NODE_A, t_stop),
                                DETECT_BOUND)
        delay = (rec.node_event(DispyNode.Closed, NODE_A, t_stop) - t_stop) if detected else None
        timing('sigstop_detection_s', delay if delay is not None else '>%.0f' % DETECT_BOUND)
        done_while_stopped = None
        if detected:    # the frozen node's jobs are resubmitted / cancelled: all end now
            done_while_stopped = cluster.wait(timeout=30)
            timing('sigstop_all_jobs_done_s', time.monotonic() - t_stop)

        t_cont = time.monotonic()
        node_a.signal(signal.SIGCONT)
        self.assertTrue(cluster.wait(timeout=40), 'cluster.wait() timed out: %s' % [
            (job.id, status_name(job.status), job.ip_addr) for job in jobs])
        # The thawed node finishes the jobs it held; once the client is connected to it
        # again and acknowledged every result, its late replies have all arrived.
        settled, text = wait_node_status(
            node_a, r'client \S+ \([^)]*\): 0 job\(s\) pending, 0 result\(s\) unacknowledged',
            40)
        timing('sigcont_late_replies_settled_s', time.monotonic() - t_cont)
        with rec.cond:
            finals = dict(rec.finals)
            final_status = dict(rec.final_status)
        self.assertEqual(finals, {i: 1 for i in range(self.N_JOBS)},
                         'final-status callbacks per job')
        for job in jobs:        # the late replies changed nothing
            self.assertEqual(final_status[job.id], job.status, 'job %s' % job.id)
            if job.status == DispyJob.Finished:
                self.assertEqual(job.result, job.id * job.id, 'job %s' % job.id)
        self.assertTrue(settled, 'node %s did not settle with the client after SIGCONT; '
                        'last status:\n%s\n%s' % (NODE_A, text, node_a.output()))
        self.assertIsNone(node_a.proc.poll(), 'node %s died:\n%s' % (NODE_A, node_a.output()))
        return jobs, on_a, rec, cluster, delay, done_while_stopped

    def check_detection(self, delay, done_while_stopped):
        self.assertIsNotNone(delay, 'cluster_status got no DispyNode.Closed for the frozen '
                             'node within %.0f s (pulse_interval=%s: dead after %.1f s)'
                             % (DETECT_BOUND, PULSE, 5 * PULSE))
        self.assertLessEqual(delay, 5 * PULSE + DETECT_SLACK)
        self.assertTrue(done_while_stopped, 'jobs did not all end while the node was frozen')

    def check_node_serves_again(self, cluster):
        """After SIGCONT the node is usable again by the same cluster."""
        job = cluster.submit_node(NODE_A, 9, 0.1)
        self.assertIsNotNone(job)
        job(timeout=10)
        self.assertEqual((job.status, job.result, job.ip_addr),
                         (DispyJob.Finished, 81, NODE_A),
                         'a job pinned to the thawed node: %s %s'
                         % (status_name(job.status), job.exception))

    def test_sigstop_with_reentrant_resubmits_then_ignores_late_replies(self):
        jobs, on_a, rec, cluster, delay, done = self.run_stop_cont(reentrant=True)
        for job in jobs:
            self.assertEqual(job.status, DispyJob.Finished,
                             'job %s ended %s: %s' % (job.id, status_name(job.status),
                                                      job.exception))
        self.check_detection(delay, done)
        self.assertTrue(all(job.ip_addr == NODE_B for job in on_a),
                        'jobs of the frozen node did not all finish on %s: %s'
                        % (NODE_B, [(job.id, job.ip_addr) for job in on_a]))
        self.check_node_serves_again(cluster)

    def test_sigstop_without_reentrant_cancels_then_ignores_late_replies(self):
        jobs, on_a, rec, cluster, delay, done = self.run_stop_cont(reentrant=False)
        self.check_detection(delay, done)
        cancelled = [job for job in jobs if job.status == DispyJob.Cancelled]
        self.assertTrue(cancelled, 'no job of the frozen node was cancelled')
        for job in jobs:
            if job.status == DispyJob.Cancelled:
                self.assertEqual(job.ip_addr, NODE_A)
                self.assertIn(NODE_A, str(job.exception))
            else:
                self.assertEqual(job.status, DispyJob.Finished, job.exception)
        self.check_node_serves_again(cluster)


# Client scripts below start this way: a cluster whose status callback notes the
# first running job.
CLIENT_PRELUDE = r'''
import sys, threading, time
import dispy

def compute(n):
    time.sleep(n)
    return n

if __name__ == '__main__':
    started = threading.Event()

    def status(st, node, job):
        if job is not None and st == dispy.DispyJob.Running:
            started.set()

    cluster = dispy.JobCluster(compute, cluster_status=status)
'''


# ================================================================================
# 4. close(terminate=True) with running jobs
# ================================================================================

TERMINATE_CLIENT = CLIENT_PRELUDE + r'''
    jobs = [cluster.submit(60) for _ in range(4)]
    print('STARTED %s' % started.wait(30), flush=True)
    t0 = time.monotonic()
    cluster.close(terminate=True)
    print('CLOSE_S %.3f' % (time.monotonic() - t0))
    print('STATUSES %s' % [job.status for job in jobs])
    print('CLOSED_AT %.6f' % time.time(), flush=True)
'''


class CloseTerminateTest(unittest.TestCase):

    timeout = 90

    def setUp(self):
        self.node = start_node(self, NODE_A, cpus=2)

    def test_close_terminate_in_process(self):
        rec = Recorder()
        cluster = dispy.JobCluster(sleep_square, nodes=[NODE_A], ip_addr=CLIENT_IP, port=0,
                                   node_port=self.node.port, callback=rec.callback,
                                   cluster_status=rec.cluster_status)
        self.addCleanup(cluster.close, terminate=True)
        jobs = []
        for i in range(5):
            job = cluster.submit(i, 60)
            job.id = i
            jobs.append(job)
        self.assertTrue(rec.wait_for(lambda: len(rec.running) >= 2, 30),
                        self.node.output())
        t0 = time.monotonic()
        self.assertTrue(cluster.close(terminate=True))
        elapsed = time.monotonic() - t0
        timing('close_terminate_in_process_s', elapsed)
        self.assertLess(elapsed, 3.0, 'close(terminate=True) took %.2f s' % elapsed)
        for job in jobs:
            t1 = time.monotonic()
            job(timeout=5)
            self.assertLess(time.monotonic() - t1, 1.0, 'job() did not return at once')
            self.assertEqual(job.status, DispyJob.Cancelled,
                             'job %s ended %s' % (job.id, status_name(job.status)))
        with rec.cond:
            finals = dict(rec.finals)
        self.assertEqual(finals, {i: 1 for i in range(5)}, 'final-status callbacks per job')
        # the node killed the jobs and is free again
        ok, text = wait_node_status(self.node, r'0 running, 0 queued.*\n  no client', 15)
        self.assertTrue(ok, 'node not released after close(terminate=True):\n%s' % text)

    def test_close_terminate_then_client_subprocess_exits(self):
        cwd = tempdir(self)
        client = ClientScript(self, TERMINATE_CLIENT, client_env([NODE_A],
                              node_port=self.node.port), cwd)
        self.assertTrue(client.wait_for(r'^STARTED True$', 30), client.output())
        rc = client.wait(30)
        t_exit = time.time()
        self.assertEqual(rc, 0, client.output())
        out = client.stdout()
        close_s = float(re.search(r'CLOSE_S ([\d.]+)', out).group(1))
        closed_at = float(re.search(r'CLOSED_AT ([\d.]+)', out).group(1))
        timing('close_terminate_subprocess_s', close_s)
        timing('client_exit_after_close_s', t_exit - closed_at)
        self.assertLess(close_s, 3.0, out)
        self.assertLess(t_exit - closed_at, 3.0, 'the client took %.2f s to exit after '
                        'close() returned (a non-daemon thread?)' % (t_exit - closed_at))
        self.assertRegex(out, r'STATUSES \[%s\]' % ', '.join([str(DispyJob.Cancelled)] * 4))
        ok, text = wait_node_status(self.node, r'0 running, 0 queued.*\n  no client', 15)
        self.assertTrue(ok, 'node not released after the client closed:\n%s' % text)


# ================================================================================
# 5. A client that dies of an uncaught exception with jobs running
# ================================================================================

CRASHING_CLIENT = CLIENT_PRELUDE + r'''
    jobs = [cluster.submit(float(sys.argv[1])) for _ in range(4)]
    print('STARTED %s' % started.wait(30), flush=True)
    print('RAISING_AT %.6f' % time.time(), flush=True)
    raise RuntimeError('client crashed on purpose')
'''


class ClientCrashTest(unittest.TestCase):

    timeout = 60

    def test_uncaught_exception_exits_promptly_and_node_keeps_the_jobs(self):
        node = start_node(self, NODE_A, cpus=2)
        cwd = tempdir(self)
        client = ClientScript(self, CRASHING_CLIENT, client_env([NODE_A], node_port=node.port),
                              cwd, args=[1.5])
        self.assertTrue(client.wait_for(r'^STARTED True$', 30), client.output())
        rc = client.wait(20)
        t_exit = time.time()
        self.assertIsNotNone(rc, 'client did not exit after an uncaught exception')
        raised_at = float(re.search(r'RAISING_AT ([\d.]+)', client.stdout()).group(1))
        timing('client_exit_after_uncaught_exception_s', t_exit - raised_at)
        self.assertLess(t_exit - raised_at, 5.0)
        self.assertEqual(rc, 1, client.output())
        self.assertIn('client crashed on purpose', client.stderr())
        # the node holds the 4 jobs of the vanished client ...
        held = r'client 127\.0\.0\.1 \([^)]*pid %d\) \(disconnected\): (\d+) job\(s\) pending, ' \
               r'(\d+) result\(s\) unacknowledged' % client.pid
        match, text = wait_node_status(node, held, 10)
        self.assertTrue(match, 'node status after the client died:\n%s\n%s'
                        % (text, node.output()))
        self.assertEqual(int(match.group(1)) + int(match.group(2)), 4, text)
        # ... and runs them all to the end, keeping their results
        done = held.replace(r'(\d+) job', '0 job').replace(r'(\d+) result', '4 result')
        match, text = wait_node_status(node, done, 20)
        self.assertTrue(match, 'node did not finish the jobs of the vanished client:\n%s' % text)


# ================================================================================
# 6. A network partition (network namespaces)
# ================================================================================

PARTITION_CLIENT = r'''
import collections, json, os, sys, threading, time
import dispy

def compute(i):
    time.sleep(1.0)
    return i * i

FINAL = (dispy.DispyJob.Finished, dispy.DispyJob.Cancelled, dispy.DispyJob.Terminated,
         dispy.DispyJob.Abandoned)
lock = threading.Lock()
finals = collections.Counter()

def callback(job):
    if job.status in FINAL:
        with lock:
            finals[job.id] += 1

def cluster_status(status, node, job):
    if job is None and status == dispy.DispyNode.Closed:
        print('NODE_CLOSED %s %.6f' % (node.ip_addr, time.time()), flush=True)
    elif job is None and status == dispy.DispyNode.Initialized:
        print('NODE_INITIALIZED %s' % node.ip_addr, flush=True)
    elif job is not None and status == dispy.DispyJob.Running:
        print('RUNNING %s %s' % (job.id, job.ip_addr), flush=True)

def main():
    ip1, ip2, me = sys.argv[1:4]
    cluster = dispy.JobCluster(compute, nodes=[ip1, ip2], ip_addr=me, pulse_interval=0.5,
                               reentrant=True, callback=callback, cluster_status=cluster_status)
    jobs = []
    for i in range(10):
        job = cluster.submit(i)
        job.id = i
        jobs.append(job)
    print('WAIT_DONE %s' % cluster.wait(timeout=90), flush=True)
    for job in jobs:
        print('JOB ' + json.dumps({'id': job.id, 'status': job.status, 'result': job.result,
                                   'ip': job.ip_addr, 'exception': str(job.exception)}),
              flush=True)
    # The test restores the link, then says so with a file: the node comes back
    # (its late replies must change nothing) and serves this cluster again.
    deadline = time.monotonic() + 60
    while not os.path.exists('healed') and time.monotonic() < deadline:
        time.sleep(0.1)
    pinned = cluster.submit_node(ip1, 100)
    if pinned is not None:
        pinned.id = 'pinned'
    result = pinned(timeout=10) if pinned is not None else None
    print('PINNED %s %s' % (pinned.status if pinned is not None else None, result), flush=True)
    cluster.close(timeout=5, terminate=True)
    with lock:
        print('FINALS ' + json.dumps(dict(finals)), flush=True)

if __name__ == '__main__':
    main()
'''


class PartitionTest(unittest.TestCase):
    """Client + 2 nodes in a NetLab; node1's link is pulled mid-run, then restored."""

    timeout = 180

    def setUp(self):
        netns.require()
        self.workdir = tempdir(self, 'dspy-faults-netns-')     # removed after lab.close
        self.lab = netns.NetLab(['client', 'node1', 'node2'])
        self.addCleanup(self.lab.close)
        self.procs = []

    def env(self, folder):
        env = {k: v for k, v in os.environ.items() if not k.startswith('DISPY_')}
        env.update(PYTHONPATH=support.ROOT, PYTHONUNBUFFERED='1', TMPDIR=folder)
        return env

    def start_node(self, host):
        folder = tempfile.mkdtemp(prefix=host + '-', dir=self.workdir)
        argv = [sys.executable, support.NODE_SCRIPT, '-i', self.lab.ip(host), '-d', '--daemon',
                '-c', '2', '--dest_path_prefix', os.path.join(folder, 'dest')]
        proc = self.lab.spawn(host, argv, env=self.env(folder), cwd=folder)
        self.procs.append(proc)
        proc.wait_for(support.READY_RE.pattern, timeout=30)
        return proc

    def diagnostics(self):
        return '\n'.join(proc.output() for proc in self.procs)

    def test_partitioned_node_rejoins_and_every_job_ends_once(self):
        ip1, ip2, ipc = (self.lab.ip(h) for h in ('node1', 'node2', 'client'))
        self.start_node('node1')
        self.start_node('node2')
        folder = tempfile.mkdtemp(prefix='client-', dir=self.workdir)
        script = os.path.join(folder, 'partition_client.py')
        with open(script, 'w') as f:
            f.write(PARTITION_CLIENT)
        client = self.lab.spawn('client', [sys.executable, script, ip1, ip2, ipc],
                                env=self.env(folder), cwd=folder)
        self.procs.append(client)
        try:
            client.wait_for(r'RUNNING \S+ %s\n' % re.escape(ip1), timeout=40)
        except RuntimeError as exc:
            self.fail('no job ran on node1: %s\n%s' % (exc, self.diagnostics()))
        t_down = time.monotonic()
        self.lab.link_down('node1')
        try:
            try:
                client.wait_for(r'NODE_CLOSED %s ' % re.escape(ip1), timeout=DETECT_BOUND)
                detection = time.monotonic() - t_down
            except RuntimeError:
                detection = None
            timing('partition_detection_s',
                   detection if detection is not None else '>%.0f' % DETECT_BOUND)
            if detection is not None:   # jobs go on on node2 while node1 is cut off
                try:
                    client.wait_for(r'WAIT_DONE', timeout=30)
                except RuntimeError:
                    pass
        finally:
            self.lab.link_up('node1')
            open(os.path.join(folder, 'healed'), 'w').close()
        try:
            rc = client.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.fail('client did not finish\n' + self.diagnostics())
        timing('partition_client_total_after_link_down_s', time.monotonic() - t_down)
        out = client.stdout()
        self.assertEqual(rc, 0, self.diagnostics())
        self.assertIn('WAIT_DONE True', out, self.diagnostics())
        jobs = [json.loads(line[4:]) for line in out.splitlines() if line.startswith('JOB ')]
        self.assertEqual(sorted(j['id'] for j in jobs), list(range(10)), out)
        for j in jobs:
            self.assertEqual((j['status'], j['result']), (DispyJob.Finished, j['id'] ** 2),
                             'job %s: %s\n%s' % (j['id'], j, self.diagnostics()))
        finals = json.loads(re.search(r'^FINALS (.*)$', out, re.M).group(1))
        self.assertLessEqual(finals.pop('pinned', 0), 1, 'final callbacks of the pinned job')
        self.assertEqual(finals, {str(i): 1 for i in range(10)},
                         'final-status callbacks per job')
        self.assertIsNotNone(detection, 'the client did not declare node1 dead within %.0f s '
                             'of the partition (pulse_interval=0.5)\n%s'
                             % (DETECT_BOUND, out))
        self.assertLessEqual(detection, 5 * 0.5 + DETECT_SLACK)
        self.assertIn('PINNED %s 10000' % DispyJob.Finished, out,
                      'node1 does not serve the cluster after the partition healed\n%s'
                      % self.diagnostics())


# ================================================================================
# 7a. Job timeouts (dispy_job_timeout per job, job_timeout per cluster)
# ================================================================================

class JobTimeoutTest(unittest.TestCase):

    timeout = 90

    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess(NODE_A, cpus=2)
        cls.addClassCleanup(cls.node.stop)
        cls.node.start()

    def check_timed_out(self, job, folder, t0, what):
        job(timeout=15)
        elapsed = time.monotonic() - t0
        timing('%s_end_s' % what, elapsed)
        pidfile = os.path.join(folder, 'child.pid')
        self.assertTrue(os.path.exists(pidfile), 'the job never ran (%s: %s)'
                        % (status_name(job.status), job.exception))
        self.assertEqual(job.status, DispyJob.Terminated,
                         'job ended %s: %s' % (status_name(job.status), job.exception))
        self.assertIn('timeout', str(job.exception).lower())
        self.assertLess(elapsed, 5.0)
        with open(pidfile) as f:
            child = int(f.read())
        self.assertTrue(wait_until(lambda: not support.pid_alive(child), 10),
                        'the child process %d of the timed-out job still runs' % child)

    def run_timeout(self, cluster, what, **submit_kwargs):
        self.assertEqual(cluster.submit(None, 0)(timeout=30), 'warm')    # set up, warm worker
        folder = tempdir(self)
        self.addCleanup(kill_sleep_child, os.path.join(folder, 'child.pid'))
        t0 = time.monotonic()
        job = cluster.submit(folder, 30, **submit_kwargs)
        self.assertIsNotNone(job, 'submit refused the job')
        self.check_timed_out(job, folder, t0, what)
        # the node goes on serving the cluster
        after = cluster.submit(None, 0)
        self.assertEqual(after(timeout=15), 'warm', after.exception)

    def test_per_job_timeout(self):
        cluster = make_cluster(self, spawn_child_and_sleep, [NODE_A], self.node.port)
        self.run_timeout(cluster, 'dispy_job_timeout', dispy_job_timeout=0.5)

    def test_cluster_job_timeout(self):
        cluster = make_cluster(self, spawn_child_and_sleep, [NODE_A], self.node.port,
                               job_timeout=0.5)
        self.run_timeout(cluster, 'job_timeout')


# ================================================================================
# 7b. recover_jobs after a client crash
# ================================================================================

RECOVER_CRASH_CLIENT = r'''
import os, sys, threading, time
import dispy

def compute(i, seconds):
    time.sleep(seconds)
    return 'value-%d' % (i * 7)

if __name__ == '__main__':
    seconds = float(sys.argv[1])
    lock = threading.Lock()
    started = threading.Event()
    running = []

    def status(st, node, job):
        if job is not None and st == dispy.DispyJob.Running:
            with lock:
                running.append(job)
                if len(running) >= 4:
                    started.set()

    cluster = dispy.JobCluster(compute, cluster_status=status)
    for i in range(4):
        cluster.submit(i, seconds).id = i
    print('STARTED %s' % started.wait(30), flush=True)
    os._exit(1)
'''

RECOVER_SCRIPT = r'''
import json, sys, time
import dispy

if __name__ == '__main__':
    kwargs = json.loads(sys.argv[1])
    t0 = time.monotonic()
    jobs = dispy.recover_jobs(**kwargs)
    print('ELAPSED %.3f' % (time.monotonic() - t0))
    print('JOBS ' + json.dumps([{'status': job.status, 'result': job.result,
                                 'exception': None if job.exception is None
                                 else str(job.exception)[:300]} for job in jobs]))
'''

RECOVER_FILE_RE = re.compile(r'^_dispy_\d{14}')


class RecoverJobsTest(unittest.TestCase):

    timeout = 90

    def setUp(self):
        self.dest = tempdir(self, 'dispytest-faults-dest-')    # survives a node restart
        self.port = free_port(NODE_A)
        self.node = self.start_node()
        self.cwd = tempdir(self)
        self.env = client_env([NODE_A], node_port=self.port)

    def start_node(self):
        node = start_node(self, NODE_A, self.port, cpus=4, dest_path_prefix=self.dest)
        self.nodes = getattr(self, 'nodes', []) + [node]
        return node

    def diagnostics(self):
        return '\n'.join('--- node %d:\n%s' % (i, node.output())
                         for i, node in enumerate(self.nodes))

    def crash_client(self, seconds):
        client = ClientScript(self, RECOVER_CRASH_CLIENT, self.env, self.cwd, args=[seconds])
        self.assertTrue(client.wait_for(r'^STARTED True$', 30), client.output())
        self.assertEqual(client.wait(10), 1, client.output())
        files = [name for name in os.listdir(self.cwd) if RECOVER_FILE_RE.match(name)]
        self.assertTrue(files, 'no recover file _dispy_YYYYMMDDHHMMSS in the client\'s folder: '
                        '%s' % sorted(os.listdir(self.cwd)))
        return client

    def recover(self, limit=60, **kwargs):
        """Runs ``dispy.recover_jobs(**kwargs)`` in a subprocess (killed after ``limit``
        seconds); returns (jobs as dicts, seconds recover_jobs took)."""
        recovery = ClientScript(self, RECOVER_SCRIPT, self.env, self.cwd,
                                args=[json.dumps(kwargs)])
        rc = recovery.wait(limit)
        self.assertEqual(rc, 0, 'recover_jobs(%s): %s\n%s\n%s' % (
            kwargs, 'still running after %s s' % limit if rc is None else 'exit %s' % rc,
            recovery.output(), self.diagnostics()))
        out = recovery.stdout()
        elapsed = float(re.search(r'^ELAPSED ([\d.]+)$', out, re.M).group(1))
        jobs = json.loads(re.search(r'^JOBS (.*)$', out, re.M).group(1))
        return jobs, elapsed

    def check_recovered(self, jobs):
        self.assertEqual(len(jobs), 4, jobs)
        for job in jobs:
            self.assertEqual(job['status'], DispyJob.Finished, job)
        self.assertEqual(sorted(job['result'] for job in jobs),
                         sorted('value-%d' % (i * 7) for i in range(4)))

    def check_node_free(self, node):
        ok, text = wait_node_status(node, r'0 running, 0 queued.*\n  no client', 15)
        self.assertTrue(ok, 'node not released after recover_jobs:\n%s\n%s'
                        % (text, self.diagnostics()))
        cluster = make_cluster(self, sleep_square, [NODE_A], self.port)
        job = cluster.submit(5, 0)
        self.assertEqual(job(timeout=20), 25, 'a new client did not get the node (%s)'
                         % status_name(job.status))

    def test_recover_results_after_client_crash(self):
        self.crash_client(1.5)
        jobs, elapsed = self.recover()
        timing('recover_jobs_wait_s', elapsed)
        self.check_recovered(jobs)
        self.check_node_free(self.node)

    def test_recover_after_the_jobs_finished(self):
        # The usual case: recover_jobs runs after the crashed client's jobs ended, so
        # the node answers with every result at once.
        self.crash_client(1.0)
        ok, text = wait_node_status(self.node, r'\(disconnected\): 0 job\(s\) pending, '
                                    r'4 result\(s\) unacknowledged', 20)
        self.assertTrue(ok, 'the jobs did not finish on the node:\n%s' % text)
        jobs, elapsed = self.recover(limit=20)
        timing('recover_jobs_finished_results_s', elapsed)
        self.check_recovered(jobs)
        self.check_node_free(self.node)

    def test_recover_with_timeout_and_terminate_pending(self):
        self.crash_client(30)
        jobs, elapsed = self.recover(limit=20, timeout=0.5, terminate_pending=True)
        timing('recover_jobs_terminate_pending_s', elapsed)
        self.assertLess(elapsed, 5.0)
        self.assertLessEqual(len(jobs), 4, jobs)
        for job in jobs:
            self.assertNotEqual(job['status'], DispyJob.Finished, job)
        self.check_node_free(self.node)

    def test_recover_after_node_restart(self):
        self.crash_client(1.0)
        ok, text = wait_node_status(self.node, r'\(disconnected\): 0 job\(s\) pending, '
                                    r'4 result\(s\) unacknowledged', 20)
        self.assertTrue(ok, 'the jobs did not finish on the node:\n%s' % text)
        self.node.signal(signal.SIGTERM)
        self.assertEqual(self.node.wait(20), 0, self.node.output())
        node = self.start_node()
        jobs, elapsed = self.recover(limit=20)
        timing('recover_jobs_after_node_restart_s', elapsed)
        self.check_recovered(jobs)
        self.check_node_free(node)


if __name__ == '__main__':
    unittest.main()
