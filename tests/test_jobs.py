"""Job semantics against real ``dispynode.py`` processes on loopback addresses.

Each TestCase class starts one node (``support.NodeProcess``) in ``setUpClass`` and
stops it in a class cleanup; clients run in this process (``dispy.JobCluster`` with
``nodes=[...]`` and ``ip_addr='127.0.0.1'`` given explicitly), except where the
semantics depend on the client being a script (classes defined in ``__main__``), which
runs as a real client script through ``support.run_client``.

Classes, by topic:

    ResultTest            results, output capture, job attributes, failures, crashes,
                          unpicklable arguments, several clusters at once
    SetupCleanupTest      setup / cleanup functions and the job's global namespace
    DependsTest           depends: functions, classes, objects, modules, files; cleanup
                          of the computation's folder on the node
    UnshippableTest       computations whose source cannot be shipped; logger levels
    CancelAndCpusTest     cancel (running / queued) and the node's CPU limit
    TimeoutAndCloseTest   timeouts of job(), wait(), close(); close(terminate=True);
                          the ``with`` statement
    CallbackTest          callback and cluster_status semantics, provisional results
    NodeLossTest          a node stopped while it runs a job

Computation functions are module-level (their source is shipped to the node); they
use only what the node's job namespace provides (``os``, ``sys``, ``time``,
``dispy_provisional_result``) or import what else they need inside.

Every wait is bounded: each ``job()``, ``wait()`` and ``close()`` has a timeout, and
state owned by another process is polled with ``support.wait_until``.
"""

import functools
import importlib
import json
import logging
import os
import queue
import select
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob, DispyNode

NODE_IP = '127.0.0.2'
LOSS_NODE_IP = '127.0.0.3'       # a node used (and stopped) by one test only
CLIENT_IP = '127.0.0.1'
T = 30.0                          # bound for waits that normally take well under a second


# ================================================================================
# Computations (shipped as source: module level, self-contained)
# ================================================================================

def echo_job(x):
    print('stdout of job %s' % x)
    print('stderr of job %s' % x, file=sys.stderr)
    return {'double': 2 * x, 'pid': os.getpid()}


def failing_job(x):
    print('before the failure')
    value = x * 2
    raise ValueError('bad value %d' % value)


def exiting_job(how):
    import signal
    if how == 'exit':
        os._exit(3)
    if how == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    return 'survived %s' % how


def square_after(x, seconds):
    time.sleep(seconds)
    return x * x


def label_after(x, seconds):
    time.sleep(seconds)
    return 'label-%d' % x


def nap(seconds, marker=None):
    """Sleeps; first creates ``marker`` (a path) so the test sees the job has started."""
    if marker:
        open(marker, 'w').close()
    time.sleep(seconds)
    return seconds


def spawn_and_sleep(seconds):
    """Starts a child process, reports both PIDs provisionally, then sleeps."""
    import subprocess
    child = subprocess.Popen(['sleep', str(seconds)])
    dispy_provisional_result((os.getpid(), child.pid))  # noqa: F821 (job namespace)
    time.sleep(seconds)
    child.wait()
    return 'slept %s' % seconds


def identity(x):
    return x


def provisional_job(n):
    for i in range(n):
        dispy_provisional_result(('step', i))  # noqa: F821 (job namespace)
    return ('done', n)


def namespace_probe():
    # No imports: os, sys and time come from the job namespace.
    return os.getpid(), list(sys.version_info[:2]), time.time()


def setup_globals():
    global base, table
    base = 100
    table = {'key': 'value'}
    return 0


def setup_with_arg(value, scale=1):
    global base
    base = value * scale
    return 0


def setup_failing():
    return 1


def read_base(x):
    return base + x  # noqa: F821 (defined by setup)


def read_table(key):
    return table[key]  # noqa: F821 (defined by setup)


def rebind_base(x):
    global base
    seen = base  # noqa: F821 (defined by setup)
    base = 99
    return seen, os.getpid()


def mutate_table(key):
    table[key] = table.get(key, 0) + 1      # noqa: F821 (in place: persists per worker)
    return table[key], os.getpid()


def set_env_and_cwd(x):
    import subprocess
    # what a program the job starts sees: the C environment, not only os.environ
    inherited = subprocess.run(['/bin/sh', '-c', 'printf "%s|%s" "$DISPY_TEST_VAR" "$PATH"'],
                               capture_output=True, text=True).stdout
    seen = (os.environ.get('DISPY_TEST_VAR'), os.getcwd(), 'PATH' in os.environ, inherited,
            os.getpid())
    os.environ['DISPY_TEST_VAR'] = 'leaked'
    del os.environ['PATH']
    os.chdir('/')
    return seen


def cleanup_marker(folder):
    """Runs on the node at close: writes the value of a setup global into ``folder``."""
    with open(os.path.join(folder, 'cleanup-ran'), 'w') as f:
        f.write(str(base))  # noqa: F821 (defined by setup)


def square_helper(x):
    return x * x


def use_helper(x):
    return square_helper(x) + 1


def use_tiny_module(x):
    return dispytest_tinymod.triple(x), dispytest_tinymod.__file__  # noqa: F821


def read_data_file(name):
    with open(name) as f:
        return f.read(), os.getcwd()


def where_am_i():
    return os.getcwd()


# ================================================================================
# Helpers
# ================================================================================

class Background:
    """Runs a call in a daemon thread, so a test can bound how long it may block."""

    def __init__(self, func, *args, **kwargs):
        self.result = self.error = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True,
                         name='test-background').start()

    def _run(self, func, args, kwargs):
        try:
            self.result = func(*args, **kwargs)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout):
        return self.done.wait(timeout)


class Recorder:
    """Records callback / cluster_status calls; tests wait on its condition."""

    def __init__(self):
        self.cond = threading.Condition()
        self.jobs = []           # callback: (status, result, snapshot object)
        self.statuses = []       # cluster_status: (status, node ip or None, job or None, node)

    def callback(self, job):
        with self.cond:
            self.jobs.append((job.status, job.result, job))
            self.cond.notify_all()

    def cluster_status(self, status, node, job):
        with self.cond:
            self.statuses.append((status, node.ip_addr if node is not None else None,
                                  job, node))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout=T):
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def node_events(self):
        with self.cond:
            return [(s, ip, node) for s, ip, job, node in self.statuses if job is None]


class NodeTestCase(unittest.TestCase):
    """Starts one node for the class; ``self.cluster(...)`` makes a cluster using it
    that is closed (cancelling its jobs) when the test ends."""

    cpus = 2
    node_ip = NODE_IP

    @classmethod
    def setUpClass(cls):
        cls.node = support.NodeProcess(ip=cls.node_ip, cpus=cls.cpus)
        cls.addClassCleanup(support.stop_node, cls.node)
        cls.node.start()

    def cluster(self, computation, node=None, **kwargs):
        node = node or self.node
        cluster = dispy.JobCluster(computation, nodes=[node.ip], ip_addr=CLIENT_IP, port=0,
                                   node_port=node.port, **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def tmpdir(self):
        path = tempfile.mkdtemp(prefix='dispytest-jobs-')
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def assertFinished(self, job, timeout=T):
        result = job(timeout=timeout)
        self.assertEqual(job.status, DispyJob.Finished,
                         'job ended %s: %s' % (dispy.STATUS_NAMES.get(job.status, job.status),
                                               job.exception))
        return result


# ================================================================================
# Results, output, failures
# ================================================================================

class ResultTest(NodeTestCase):

    def test_result_output_and_attributes(self):
        """job() returns the result; stdout/stderr are captured; id is the user's;
        ip_addr is the node; start_time <= end_time; status Finished."""
        cluster = self.cluster(echo_job)
        jobs = []
        for i in range(4):
            job = cluster.submit(i)
            job.id = 'job-%d' % i
            jobs.append(job)
        for i, job in enumerate(jobs):
            result = job(timeout=T)
            self.assertEqual(job.status, DispyJob.Finished, job.exception)
            self.assertIs(result, job.result)
            self.assertEqual(result['double'], 2 * i)
            self.assertNotEqual(result['pid'], os.getpid())
            self.assertEqual(job.id, 'job-%d' % i)
            self.assertIn('stdout of job %d\n' % i, job.stdout)
            self.assertIn('stderr of job %d\n' % i, job.stderr)
            self.assertNotIn('stderr', job.stdout)
            self.assertIsNone(job.exception)
            self.assertEqual(job.ip_addr, NODE_IP)
            self.assertIsNotNone(job.start_time)
            self.assertLessEqual(job.start_time, job.end_time)
        self.assertTrue(cluster.close(timeout=T))

    def test_exception_terminates_job_with_traceback(self):
        """A job that raises ends Terminated with no result; its exception text is the
        traceback with the message and the computation's source line."""
        cluster = self.cluster(failing_job)
        job = cluster.submit(7)
        self.assertIsNone(job(timeout=T))
        self.assertEqual(job.status, DispyJob.Terminated)
        self.assertIsNone(job.result)
        self.assertIn('Traceback', job.exception)
        self.assertIn('ValueError: bad value 14', job.exception)
        self.assertIn("raise ValueError('bad value %d' % value)", job.exception)
        self.assertIn('failing_job', job.exception)
        self.assertIn('before the failure', job.stdout)

    def test_job_killing_its_process_is_terminated_and_node_survives(self):
        """os._exit(3) and SIGKILL of the job's own process end the job Terminated with
        the exit status / signal; the node lives on and runs the next jobs."""
        cluster = self.cluster(exiting_job)
        exited = cluster.submit('exit')
        self.assertIsNone(exited(timeout=T))
        self.assertEqual(exited.status, DispyJob.Terminated)
        self.assertRegex(exited.exception, r'(?i)exit\w*\D*\b3\b')
        killed = cluster.submit('kill')
        self.assertIsNone(killed(timeout=T))
        self.assertEqual(killed.status, DispyJob.Terminated)
        self.assertRegex(killed.exception, r'SIGKILL|signal 9\b')
        self.assertIsNone(self.node.proc.poll(), 'the node died')
        jobs = [cluster.submit('run-%d' % i) for i in range(4)]
        for i, job in enumerate(jobs):
            self.assertEqual(self.assertFinished(job), 'survived run-%d' % i)
        self.assertTrue(cluster.close(timeout=T))

    def test_unpicklable_argument_is_refused(self):
        """submit() with an unpicklable argument returns None and logs why at ERROR;
        the cluster stays usable."""
        cluster = self.cluster(identity)
        with self.assertLogs('dispy', 'ERROR') as logs:
            job = cluster.submit(threading.Lock())
        self.assertIsNone(job)
        self.assertTrue(any('pickle' in line for line in logs.output), logs.output)
        self.assertEqual(self.assertFinished(cluster.submit(5)), 5)

    def test_two_clusters_on_one_node_interleave(self):
        """Two JobClusters with different computations share the node at once; each
        gets its own correct results, and their jobs run interleaved."""
        squares = self.cluster(square_after)
        labels = self.cluster(label_after)
        square_jobs = [squares.submit(i, 0.1) for i in range(8)]
        label_jobs = [labels.submit(i, 0.1) for i in range(8)]
        for i, job in enumerate(square_jobs):
            self.assertEqual(self.assertFinished(job), i * i)
        for i, job in enumerate(label_jobs):
            self.assertEqual(self.assertFinished(job), 'label-%d' % i)
        # Interleaved: each cluster had a job start before the other's last job ended.
        self.assertLess(min(j.start_time for j in label_jobs),
                        max(j.end_time for j in square_jobs))
        self.assertLess(min(j.start_time for j in square_jobs),
                        max(j.end_time for j in label_jobs))
        self.assertTrue(squares.close(timeout=T))
        self.assertTrue(labels.close(timeout=T))


# ================================================================================
# setup, cleanup, the job namespace
# ================================================================================

class SetupCleanupTest(NodeTestCase):

    cpus = 1          # one worker: consecutive jobs run in the same (warm) process

    def test_setup_function_defines_globals(self):
        """Globals that a plain setup function defines are seen by every job."""
        cluster = self.cluster(read_base, setup=setup_globals, depends=[read_table])
        jobs = [cluster.submit(i) for i in range(3)]
        for i, job in enumerate(jobs):
            self.assertEqual(self.assertFinished(job), 100 + i)
        self.assertTrue(cluster.close(timeout=T))

    def test_setup_partial_with_arguments(self):
        """setup given as functools.partial runs with its arguments."""
        cluster = self.cluster(read_base, setup=functools.partial(setup_with_arg, 7, scale=3))
        self.assertEqual(self.assertFinished(cluster.submit(1)), 22)
        self.assertTrue(cluster.close(timeout=T))

    def test_rebinding_a_global_does_not_leak_to_next_job(self):
        """A job that rebinds a setup global (global x; x = 99) leaves the next job —
        in the same reused worker process — seeing setup's value."""
        cluster = self.cluster(rebind_base, setup=setup_globals)
        jobs = [cluster.submit(i) for i in range(12)]
        results = [self.assertFinished(job) for job in jobs]
        self.assertEqual([seen for seen, _pid in results], [100] * len(jobs))
        self.assertEqual(len({pid for _seen, pid in results}), 1,
                         'jobs did not run in one reused worker: %s' % results)

    def test_in_place_change_persists_within_a_worker(self):
        """As documented: changing a setup object in place persists in that worker."""
        cluster = self.cluster(mutate_table, setup=setup_globals)
        results = [self.assertFinished(cluster.submit('n')) for _ in range(3)]
        self.assertEqual([count for count, _pid in results], [1, 2, 3])

    def test_environment_and_working_directory_are_restored(self):
        """A job that changes os.environ or the working directory leaves the next job
        its computation folder and the original environment."""
        cluster = self.cluster(set_env_and_cwd)
        first, second = (self.assertFinished(cluster.submit(i)) for i in range(2))
        self.assertEqual(first, second)
        self.assertIsNone(first[0])
        self.assertTrue(first[1].startswith(self.node.dest_path_prefix))
        self.assertTrue(first[2])
        self.assertEqual(first[3], '|' + os.environ['PATH'])
        self.assertEqual(first[4], second[4], 'both jobs ran in one warm worker')

    def test_fresh_process_per_job(self):
        """fresh_process=True: every job in its own process, still seeing setup's
        globals, and an in-place change does not carry over."""
        cluster = self.cluster(mutate_table, setup=setup_globals, fresh_process=True)
        results = [self.assertFinished(cluster.submit('n')) for _ in range(4)]
        self.assertEqual([count for count, _pid in results], [1, 1, 1, 1])
        self.assertEqual(len({pid for _count, pid in results}), 4)

    def test_failed_setup_runs_no_job(self):
        """setup returning non-zero: no job runs on that node; the job stays Created
        until the cluster is closed with terminate=True, which cancels it."""
        with self.assertLogs('dispy', 'WARNING') as logs:
            cluster = self.cluster(read_base, setup=setup_failing)
            job = cluster.submit(1)
            self.assertTrue(support.wait_until(
                lambda: any('setup' in r.getMessage() for r in logs.records), T),
                'no warning about the failed setup')
        self.assertTrue(any(NODE_IP in r.getMessage() for r in logs.records
                            if 'setup' in r.getMessage()), logs.output)
        self.assertIsNone(job(timeout=2))
        self.assertEqual(job.status, DispyJob.Created)
        self.assertIsNone(job.start_time)
        self.assertTrue(cluster.close(timeout=1, terminate=True))
        self.assertEqual(job.status, DispyJob.Cancelled)

    def test_cleanup_function_runs_at_close(self):
        """A cleanup partial runs on the node when the cluster closes, in the
        computation's namespace (it sees setup's globals)."""
        folder = self.tmpdir()
        cluster = self.cluster(read_base, setup=functools.partial(setup_with_arg, 5),
                               cleanup=functools.partial(cleanup_marker, folder))
        self.assertEqual(self.assertFinished(cluster.submit(1)), 6)
        marker = os.path.join(folder, 'cleanup-ran')
        self.assertFalse(os.path.exists(marker))
        self.assertTrue(cluster.close(timeout=T))
        self.assertTrue(support.wait_until(lambda: os.path.exists(marker), T),
                        'cleanup did not run')
        self.assertTrue(support.wait_until(lambda: support.read_file(marker) == '5', 5))

    def test_job_namespace_has_os_sys_time(self):
        """Jobs can use os, sys and time without importing them."""
        cluster = self.cluster(namespace_probe)
        pid, version, now = self.assertFinished(cluster.submit())
        self.assertNotEqual(pid, os.getpid())
        self.assertEqual(version, list(sys.version_info[:2]))
        self.assertLess(abs(now - time.time()), 60)


# ================================================================================
# depends and the computation's folder
# ================================================================================

CLASS_CLIENT = r'''
import json, sys
import dispy


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def shifted(self, dx):
        return Point(self.x + dx, self.y)


class Scaler:
    def __init__(self, factor):
        self.factor = factor


scaler = Scaler(3)


def compute(point):
    return point.shifted(scaler.factor), type(point).__name__, type(scaler).__name__


if __name__ == '__main__':
    node_ip, node_port = sys.argv[1], int(sys.argv[2])
    cluster = dispy.JobCluster(compute, nodes=[node_ip], ip_addr='127.0.0.1', port=0,
                               node_port=node_port, depends=[Point, scaler])
    out = []
    try:
        jobs = [cluster.submit(Point(i, -i)) for i in range(3)]
        for job in jobs:
            result = job(timeout=30)
            if job.status != dispy.DispyJob.Finished:
                out.append({'status': job.status, 'exception': job.exception})
                continue
            moved, point_class, scaler_class = result
            out.append({'is_point': isinstance(moved, Point), 'x': moved.x, 'y': moved.y,
                        'point_class': point_class, 'scaler_class': scaler_class})
    finally:
        cluster.close(timeout=30, terminate=True)
    print('RESULT ' + json.dumps(out), flush=True)
'''

TINY_MODULE = '''
def triple(x):
    return 3 * x
'''


class DependsTest(NodeTestCase):

    def test_helper_function(self):
        """A function in depends is defined for jobs (and without it, it is not)."""
        cluster = self.cluster(use_helper)
        job = cluster.submit(3)
        self.assertIsNone(job(timeout=T))
        self.assertEqual(job.status, DispyJob.Terminated)
        self.assertIn('square_helper', job.exception)
        self.assertTrue(cluster.close(timeout=T))
        cluster = self.cluster(use_helper, depends=[square_helper])
        self.assertEqual(self.assertFinished(cluster.submit(3)), 10)
        self.assertTrue(cluster.close(timeout=T))

    def test_class_and_bound_instance_from_client_script(self):
        """A class in depends: jobs receive instances as arguments and return them, and
        the client gets instances of its own class back; an instance bound to a global
        name in depends is seen by jobs under that name (client script: __main__)."""
        proc = support.run_client(CLASS_CLIENT, support.client_env([NODE_IP],
                                                                   node_port=self.node.port),
                                  timeout=90, cwd=self.tmpdir(),
                                  args=[NODE_IP, str(self.node.port)])
        lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual(len(lines), 1, proc.stdout + proc.stderr)
        results = json.loads(lines[0][len('RESULT '):])
        self.assertEqual(results, [{'is_point': True, 'x': i + 3, 'y': -i,
                                    'point_class': 'Point', 'scaler_class': 'Scaler'}
                                   for i in range(3)])

    def test_module_dependency(self):
        """A module in depends is shipped (its file lands in the computation's folder
        on the node) and jobs refer to it by its name."""
        folder = self.tmpdir()
        with open(os.path.join(folder, 'dispytest_tinymod.py'), 'w') as f:
            f.write(TINY_MODULE)
        sys.path.insert(0, folder)
        self.addCleanup(sys.modules.pop, 'dispytest_tinymod', None)
        self.addCleanup(sys.path.remove, folder)
        module = importlib.import_module('dispytest_tinymod')
        cluster = self.cluster(use_tiny_module, depends=[module])
        value, path = self.assertFinished(cluster.submit(5))
        self.assertEqual(value, 15)
        prefix = os.path.realpath(self.node.dest_path_prefix) + os.sep
        self.assertTrue(os.path.realpath(path).startswith(prefix),
                        '%s is not under %s' % (path, prefix))
        self.assertTrue(cluster.close(timeout=T))

    def test_data_file_in_working_directory(self):
        """A file in depends is in the job's working directory, by its base name."""
        folder = self.tmpdir()
        path = os.path.join(folder, 'dispytest_data.txt')
        with open(path, 'w') as f:
            f.write('data for the jobs\n')
        cluster = self.cluster(read_data_file, depends=[path])
        text, cwd = self.assertFinished(cluster.submit('dispytest_data.txt'))
        self.assertEqual(text, 'data for the jobs\n')
        self.assertNotEqual(os.path.realpath(cwd), os.path.realpath(folder))
        self.assertTrue(os.path.realpath(cwd).startswith(
            os.path.realpath(self.node.dest_path_prefix) + os.sep))
        self.assertTrue(cluster.close(timeout=T))

    def test_shared_dest_path_survives_closing_one_cluster(self):
        """Two clusters with the same dest_path (the docs' way to share files): closing
        one leaves the folder and its files to the other."""
        folder = self.tmpdir()
        data = os.path.join(folder, 'shared.txt')
        with open(data, 'w') as f:
            f.write('shared data')
        first = self.cluster(read_data_file, depends=[data], dest_path='shared_folder')
        second = self.cluster(read_data_file, depends=[data], dest_path='shared_folder')
        self.assertEqual(self.assertFinished(first.submit('shared.txt'))[0], 'shared data')
        self.assertEqual(self.assertFinished(second.submit('shared.txt'))[0], 'shared data')
        self.assertTrue(first.close(timeout=T))
        # A job of the other cluster after the close: the node has handled the close
        # (one connection, in order), so the shared folder must still be in place.
        self.assertEqual(self.assertFinished(second.submit('shared.txt'))[0], 'shared data')
        self.assertTrue(os.path.isfile(os.path.join(self.node.dest_path_prefix,
                                                    'shared_folder', 'shared.txt')))

    def test_cleanup_true_removes_folder_false_keeps_it(self):
        """After close(), the computation's folder under --dest_path_prefix is removed
        with cleanup=True (the default) and kept with cleanup=False."""
        folder = self.tmpdir()
        data = os.path.join(folder, 'dispytest_kept.txt')
        with open(data, 'w') as f:
            f.write('x')
        removed = self.cluster(where_am_i, depends=[data])
        kept = self.cluster(where_am_i, depends=[data], cleanup=False)
        removed_dir = self.assertFinished(removed.submit())
        kept_dir = self.assertFinished(kept.submit())
        prefix = os.path.realpath(self.node.dest_path_prefix) + os.sep
        for path in (removed_dir, kept_dir):
            self.assertTrue(os.path.realpath(path).startswith(prefix), path)
        self.assertNotEqual(removed_dir, kept_dir)
        self.assertTrue(os.path.exists(os.path.join(removed_dir, 'dispytest_kept.txt')))
        self.assertTrue(kept.close(timeout=T))
        self.assertTrue(removed.close(timeout=T))
        self.assertTrue(support.wait_until(lambda: not os.path.exists(removed_dir), T),
                        'folder of the cleanup=True computation was not removed')
        # Both computation hosts have ended: only multiprocessing's forkserver and
        # resource tracker are left under the node.
        self.assertTrue(support.wait_until(lambda: len(self.node.descendants()) <= 2, T),
                        self.node.descendants())
        self.assertTrue(os.path.isdir(kept_dir), 'cleanup=False folder was removed')
        self.assertTrue(os.path.exists(os.path.join(kept_dir, 'dispytest_kept.txt')))


# ================================================================================
# Computations that cannot be shipped; logger levels
# ================================================================================

def _exec_made_function():
    ns = {}
    exec('def made_by_exec(x):\n    return x + 1\n', ns)
    return ns['made_by_exec']


class UnshippableTest(unittest.TestCase):

    def test_computation_without_source_is_refused_before_any_network(self):
        """A builtin, a lambda or a function made by exec → JobCluster raises a
        ValueError (subclass) naming the problem, and nothing is sent to the node."""
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(tcp.close)
        self.addCleanup(udp.close)
        port = support.free_port(NODE_IP)
        tcp.bind((NODE_IP, port))
        tcp.listen(8)
        udp.bind((NODE_IP, port))
        hub_before = dispy.ClientHub._current
        cases = [(len, r'len'), (lambda x: x, r'lambda'),
                 (_exec_made_function(), r'made_by_exec.*source|source.*made_by_exec')]
        for computation, pattern in cases:
            with self.subTest(computation=computation):
                try:
                    cluster = dispy.JobCluster(computation, nodes=[NODE_IP], ip_addr=CLIENT_IP,
                                               port=0, node_port=port)
                except ValueError as exc:
                    self.assertRegex(str(exc), pattern)
                else:
                    support.close_now(cluster)
                    self.fail('JobCluster accepted %r' % (computation,))
        self.assertIs(dispy.ClientHub._current, hub_before, 'a client hub was started')
        readable, _, _ = select.select([tcp, udp], [], [], 0.5)
        self.assertEqual(readable, [], 'the client contacted the node')

    def test_logger_has_level_names(self):
        """dispy.logger.DEBUG ... CRITICAL exist and equal the logging constants."""
        for name in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'):
            self.assertEqual(getattr(dispy.logger, name), getattr(logging, name))


# ================================================================================
# cancel and the CPU limit
# ================================================================================

class CancelAndCpusTest(NodeTestCase):

    cpus = 1

    def test_cancel_running_job_kills_its_process_group(self):
        """cancel() of a running job: Cancelled quickly, the worker and the processes it
        started are killed, and the freed CPU runs the next job."""
        pids = queue.Queue()

        def callback(job):
            if job.status == DispyJob.ProvisionalResult:
                pids.put(job.result)

        cluster = self.cluster(spawn_and_sleep, callback=callback)
        job = cluster.submit(60)
        worker_pid, child_pid = pids.get(timeout=T)
        self.assertTrue(support.pid_alive(worker_pid) and support.pid_alive(child_pid))
        started = time.monotonic()
        self.assertEqual(cluster.cancel(job), 0)
        self.assertIsNone(job(timeout=T))
        self.assertEqual(job.status, DispyJob.Cancelled)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertTrue(support.wait_until(lambda: not support.pid_alive(child_pid), 10),
                        'the job\'s child process %d survived the cancel' % child_pid)
        self.assertTrue(support.wait_until(lambda: not support.pid_alive(worker_pid), 10),
                        'the job\'s worker process %d survived the cancel' % worker_pid)
        self.assertEqual(self.assertFinished(cluster.submit(0)), 'slept 0')
        self.assertEqual(cluster.cancel(job), -1, 'cancel of an ended job')

    def test_cancel_queued_jobs(self):
        """cancel() of jobs still queued (on the node, and in the client) ends them
        Cancelled without ever running them; later jobs still run."""
        folder = self.tmpdir()

        def marker(i):
            return os.path.join(folder, 'started-%d' % i)

        cluster = self.cluster(nap)
        jobs = [cluster.submit(60, marker(i)) for i in range(5)]
        last = cluster.submit(0, marker(5))
        self.assertTrue(support.wait_until(lambda: os.path.exists(marker(0)), T))
        # With one CPU, job 2 waits in the node's queue (the scheduler keeps a few jobs
        # there) and job 4 still in the client's.
        for i in (2, 4):
            started = time.monotonic()
            self.assertEqual(cluster.cancel(jobs[i]), 0)
            self.assertIsNone(jobs[i](timeout=T))
            self.assertEqual(jobs[i].status, DispyJob.Cancelled)
            self.assertLess(time.monotonic() - started, 5.0)
        # Cancel the others one by one as each starts; the queue moves past 2 and 4.
        for i in (0, 1, 3):
            self.assertTrue(support.wait_until(lambda: os.path.exists(marker(i)), T),
                            'job %d did not start' % i)
            cluster.cancel(jobs[i])
            jobs[i](timeout=T)
            self.assertEqual(jobs[i].status, DispyJob.Cancelled)
        self.assertEqual(self.assertFinished(last), 0)
        for i in (2, 4):
            self.assertFalse(os.path.exists(marker(i)), 'cancelled job %d ran' % i)
            self.assertIsNone(jobs[i].start_time)

    def test_cpus_limit_serialises_jobs(self):
        """On a node started with -c 1, jobs run one at a time: their
        [start_time, end_time] intervals do not overlap."""
        cluster = self.cluster(nap)
        jobs = [cluster.submit(0.3) for _ in range(3)]
        for job in jobs:
            self.assertFinished(job)
        jobs.sort(key=lambda j: j.start_time)
        for before, after in zip(jobs, jobs[1:]):
            self.assertLessEqual(before.end_time, after.start_time)
        self.assertGreaterEqual(jobs[-1].end_time - jobs[0].start_time, 0.9)


# ================================================================================
# Timeouts, close, the with statement
# ================================================================================

class TimeoutAndCloseTest(NodeTestCase):

    cpus = 1

    def test_job_and_wait_timeouts(self):
        """job(timeout) returns None and wait(timeout) False promptly while a job runs."""
        cluster = self.cluster(nap)
        job = cluster.submit(60)
        started = time.monotonic()
        self.assertIsNone(job(timeout=0.2))
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertNotIn(job.status, dispy.FINAL_STATUSES)
        started = time.monotonic()
        self.assertFalse(cluster.wait(timeout=0.2))
        self.assertLess(time.monotonic() - started, 2.0)

    def test_close_timeout_keeps_cluster_usable(self):
        """close(timeout) with a job still running returns False and the cluster stays
        open: jobs can still be cancelled, submitted and collected."""
        cluster = self.cluster(nap)
        job = cluster.submit(60)
        started = time.monotonic()
        self.assertFalse(cluster.close(timeout=0.2))
        self.assertLess(time.monotonic() - started, 2.0)
        cluster.cancel(job)
        job(timeout=T)
        self.assertEqual(job.status, DispyJob.Cancelled)
        self.assertEqual(self.assertFinished(cluster.submit(0.01)), 0.01)
        self.assertTrue(cluster.close(timeout=T))

    def test_close_terminate_cancels_running_and_queued_jobs(self):
        """close(terminate=True) with jobs running and queued returns (promptly) and
        every job ends Cancelled."""
        folder = self.tmpdir()
        marker = os.path.join(folder, 'started')
        cluster = self.cluster(nap)
        jobs = [cluster.submit(60, marker)] + [cluster.submit(60) for _ in range(4)]
        self.assertTrue(support.wait_until(lambda: os.path.exists(marker), T))
        closing = Background(cluster.close, terminate=True)
        self.assertTrue(closing.wait(15), 'close(terminate=True) did not return in 15 s')
        self.assertIsNone(closing.error)
        self.assertTrue(closing.result)
        self.assertEqual([j.status for j in jobs], [DispyJob.Cancelled] * len(jobs))

    def test_with_statement_closes_cluster(self):
        """``with JobCluster(...) as c`` gives the cluster and closes it on exit."""
        with dispy.JobCluster(identity, nodes=[self.node.ip], ip_addr=CLIENT_IP, port=0,
                              node_port=self.node.port) as cluster:
            self.addCleanup(support.close_now, cluster)
            self.assertIsInstance(cluster, dispy.JobCluster)
            self.assertEqual(self.assertFinished(cluster.submit('in with')), 'in with')
        with self.assertLogs('dispy', 'ERROR'):
            self.assertIsNone(cluster.submit('after with'))

    def test_with_statement_exception_cancels_jobs(self):
        """Leaving the with block by an exception cancels running jobs and re-raises."""
        folder = self.tmpdir()
        marker = os.path.join(folder, 'started')
        cluster = self.cluster(nap)
        jobs = [cluster.submit(60, marker), cluster.submit(60)]
        self.assertTrue(support.wait_until(lambda: os.path.exists(marker), T))

        def leave_by_exception():
            with cluster:
                raise KeyError('leaving the block')

        leaving = Background(leave_by_exception)
        self.assertTrue(leaving.wait(15), 'leaving the with block did not return in 15 s')
        self.assertIsInstance(leaving.error, KeyError)
        self.assertEqual([j.status for j in jobs], [DispyJob.Cancelled] * len(jobs))


# ================================================================================
# callback and cluster_status
# ================================================================================

class CallbackTest(NodeTestCase):

    def test_callbacks_one_thread_never_concurrent_and_wait_covers_them(self):
        """callback runs for every job from one thread (not the caller's), never two at
        once, and wait() returns only after all callbacks ran."""
        lock = threading.Lock()
        state = {'active': 0, 'overlaps': 0, 'calls': 0, 'threads': set()}

        def callback(job):
            with lock:
                state['active'] += 1
                state['overlaps'] += state['active'] > 1
                state['threads'].add(threading.get_ident())
            time.sleep(0.01)    # widens the window in which an overlapping call shows
            with lock:
                state['active'] -= 1
                state['calls'] += 1

        cluster = self.cluster(identity, callback=callback)
        jobs = [cluster.submit(i) for i in range(20)]
        self.assertTrue(cluster.wait(timeout=T))
        with lock:
            self.assertEqual(state['calls'], len(jobs))
            self.assertEqual(state['overlaps'], 0)
            self.assertEqual(len(state['threads']), 1)
            self.assertNotIn(threading.get_ident(), state['threads'])
        self.assertEqual([j.result for j in jobs], list(range(20)))

    def test_callback_can_submit(self):
        """A callback may submit the next job (no deadlock); wait() covers the chain."""
        results, clusters = [], []

        def callback(job):
            results.append(job.result)
            if job.result < 5:
                clusters[0].submit(job.result + 1)

        cluster = self.cluster(identity, callback=callback)
        clusters.append(cluster)
        cluster.submit(0)
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(results, [0, 1, 2, 3, 4, 5])

    def test_wait_in_callback_raises(self):
        """cluster.wait() called from a callback raises RuntimeError (instead of
        waiting for itself forever)."""
        outcome, clusters = [], []

        def callback(job):
            try:
                clusters[0].wait(timeout=5)
            except RuntimeError as exc:
                outcome.append(exc)
            else:
                outcome.append('no error')

        cluster = self.cluster(identity, callback=callback)
        clusters.append(cluster)
        cluster.submit(1)
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], RuntimeError)

    def test_provisional_results(self):
        """dispy_provisional_result(x) → callback sees a snapshot with status
        ProvisionalResult and result x, each in order, then the final Finished call."""
        recorder = Recorder()
        cluster = self.cluster(provisional_job, callback=recorder.callback)
        job = cluster.submit(3)
        self.assertEqual(self.assertFinished(job), ('done', 3))
        self.assertTrue(cluster.wait(timeout=T))
        calls = [(status, result) for status, result, _ in recorder.jobs]
        self.assertEqual(calls, [(DispyJob.ProvisionalResult, ('step', 0)),
                                 (DispyJob.ProvisionalResult, ('step', 1)),
                                 (DispyJob.ProvisionalResult, ('step', 2)),
                                 (DispyJob.Finished, ('done', 3))])
        first = recorder.jobs[0][2]
        self.assertEqual((first.status, first.result),
                         (DispyJob.ProvisionalResult, ('step', 0)), 'not a snapshot')

    def test_cluster_status_sequence(self):
        """cluster_status gets DispyNode.Initialized for the node (its address, CPUs
        available) before any job runs, and Created (no node yet), Running and a
        final status for every job, in that order."""
        recorder = Recorder()
        cluster = self.cluster(identity, cluster_status=recorder.cluster_status)
        jobs = [cluster.submit(i) for i in range(4)]
        for job in jobs:
            self.assertFinished(job)
        self.assertTrue(cluster.wait(timeout=T))
        with recorder.cond:
            statuses = list(recorder.statuses)
        node_events = [(i, s, ip, n) for i, (s, ip, j, n) in enumerate(statuses) if j is None]
        first_index, first_status, first_ip, first_node = node_events[0]
        self.assertEqual(first_status, DispyNode.Initialized)
        self.assertEqual(first_ip, NODE_IP)
        self.assertIsInstance(first_node, DispyNode)
        self.assertGreater(first_node.avail_cpus, 0)
        per_job = {}
        for index, (s, ip, j, _) in enumerate(statuses):
            if j is not None:
                per_job.setdefault(j.id, []).append((s, ip))
                if s == DispyJob.Running:
                    self.assertGreater(index, first_index, 'a job ran before Initialized')
        self.assertEqual(sorted(per_job), [job.id for job in jobs])
        for job in jobs:
            self.assertEqual(per_job[job.id], [(DispyJob.Created, None),
                                               (DispyJob.Running, NODE_IP),
                                               (DispyJob.Finished, NODE_IP)], job.id)


class NodeLossTest(NodeTestCase):
    """Uses its own node, stopped in the middle of a job."""

    node_ip = LOSS_NODE_IP
    cpus = 1

    def test_node_stopped_mid_run(self):
        """When the node stops while a job runs: cluster_status gets DispyNode.Closed
        and the job ends Cancelled with an exception naming the node, within 20 s."""
        recorder = Recorder()
        cluster = self.cluster(nap, cluster_status=recorder.cluster_status)
        job = cluster.submit(60)
        self.assertTrue(recorder.wait_for(lambda: any(
            s == DispyJob.Running for s, _ip, j, _n in recorder.statuses if j is not None)),
            'the job did not start')
        initialized = [n for s, ip, n in recorder.node_events() if s == DispyNode.Initialized]
        self.assertEqual([n.ip_addr for n in initialized], [LOSS_NODE_IP])
        self.node.stop()
        self.assertIsNone(job(timeout=20))
        self.assertEqual(job.status, DispyJob.Cancelled)
        self.assertIn(LOSS_NODE_IP, job.exception or '')
        self.assertTrue(recorder.wait_for(lambda: any(
            s == DispyNode.Closed and ip == LOSS_NODE_IP and j is None
            for s, ip, j, _n in recorder.statuses), 20), 'no DispyNode.Closed')


if __name__ == '__main__':
    unittest.main()
