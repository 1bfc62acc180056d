"""The client API (spec 002 §1.1, §1.3–§1.8) against real ``dispynode.py`` processes.

Every node runs on a loopback address (127.0.0.1, 127.0.0.2, 127.0.0.3) started by
``support.NodeProcess``; every cluster names its nodes and ``ip_addr='127.0.0.1'``
explicitly (never default discovery), is closed in a cleanup, and every blocking call has
a timeout.  State owned by another process is polled with ``support.wait_until``.

Classes, by topic:

    ProgramTest           computations that are programs: Python and shell scripts,
                          exit status as result, output, string-only arguments
    JobDependsTest        submit(..., dispy_job_depends=[file, function, class, module])
                          and the removal of those files after the job
    SendFileFromJobTest   dispy_send_file inside jobs; dispy_node_name & co.
    MaxFileSizeTest       a node with --max_file_size 1k (both directions)
    TwoNodesApiTest       submit_node, send_file, node_jobs, set_node_cpus,
                          deallocate_node, close_node, resetup_node, allocate_node,
                          discover_nodes, submit_job_id, job(clear=True), status,
                          print_status/stats, NodeAllocate (subclasses, tuples,
                          wildcards, per-node setup_args and depends)
    LocalhostTest         a host name in nodes
    NodeAllocateMatchTest wildcard matching (no network)
    DispyNodeTest         the DispyNode given to cluster_status; avail_info without and
                          with (a fake) psutil
    AliasesTest           host, ext_host, job_status, dispy_port, DispyJob.Abandoned
    Api415Test            4.15 API: automatic ids, submit_time, cluster.name, Created,
                          submit_job_id_node, MsgTimeout, NodeAllocate keywords, a
                          recover file per cluster
    MistakesTest          closures refused; main-script classes in arguments travel
    CommandLineTest       python dispy.py -f FILE -a ARGS program

Computation functions are module-level (their source is shipped to the node) and use
only what the job namespace provides or import what they need inside.
"""

import contextlib
import errno
import functools
import importlib
import io
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import unittest
import uuid

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob, DispyNode, DispyNodeAvailInfo, NodeAllocate

CLIENT_IP = '127.0.0.1'
NODE_IP = '127.0.0.2'
OTHER_IP = '127.0.0.3'
T = 30.0              # bound for waits that normally take well under a second
DISPY_PY = os.path.join(support.ROOT, 'dispy.py')


# ================================================================================
# Computations (shipped as source: module level, self-contained)
# ================================================================================

def where(x):
    return x, dispy_node_ip_addr  # noqa: F821 (job namespace)


def nap(seconds):
    time.sleep(seconds)
    return seconds


def read_named_file(name):
    with open(name) as f:
        return f.read()


def wait_for_release(release, limit=30.0):
    """Runs until the test creates ``release`` (bounded)."""
    deadline = time.time() + limit
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.02)
    return os.path.exists(release)


def depends_helper(x):
    return 'helper %d' % (x * 10)


class DependsClass:
    def __init__(self, n):
        self.n = n

    def value(self):
        return 'class %d' % (self.n + 1)


def use_job_depends(name, probe=False):
    """Uses the job's dependencies; with ``probe``, reports whether any is still there."""
    if probe:
        return ('depends_helper' in globals(), 'DependsClass' in globals(),
                'dispytest_jobmod' in globals(), os.path.exists(name))
    with open(name) as f:
        text = f.read()
    return (text, depends_helper(4), DependsClass(5).value(),
            dispytest_jobmod.quadruple(6), os.getcwd())  # noqa: F821 (job depends)


def send_relative(token):
    os.makedirs('out', exist_ok=True)
    path = os.path.join('out', 'rel-%s.txt' % token)
    with open(path, 'w') as f:
        f.write('relative %s' % token)
    return dispy_send_file(path)  # noqa: F821 (job namespace)


def send_parent(name):
    """Writes ``name`` in the parent of the computation's folder and tries to send it
    as ``../name``; removes it again."""
    path = os.path.join('..', name)
    with open(path, 'w') as f:
        f.write('must not leave the node')
    try:
        return dispy_send_file(path)  # noqa: F821 (job namespace)
    finally:
        os.remove(path)


def send_absolute(token):
    path = os.path.join(os.getcwd(), 'abs-%s.txt' % token)
    with open(path, 'w') as f:
        f.write('absolute %s' % token)
    return dispy_send_file(path), path  # noqa: F821 (job namespace)


def send_sized(name, size):
    with open(name, 'wb') as f:
        f.write(b'x' * size)
    return dispy_send_file(name)  # noqa: F821 (job namespace)


def job_globals():
    return (dispy_node_name, dispy_node_ip_addr, dispy_job_path,  # noqa: F821
            os.getcwd())


def count_setup(folder):
    """setup: appends a line to a per-node file in ``folder`` (on this machine)."""
    with open(os.path.join(folder, 'setup-%s' % dispy_node_ip_addr), 'a') as f:  # noqa: F821
        f.write('setup\n')
    return 0


def slow_setup():
    import time
    time.sleep(0.5)
    return 0


def store_tag(tag):
    global node_tag
    node_tag = tag
    return 0


def per_node_extra(x):
    return 'extra %d' % x


def report_tag():
    return node_tag, ('per_node_extra' in globals()  # noqa: F821 (setup)
                      and per_node_extra(2))  # noqa: F821 (per-node depends)


def identity(x):
    return x


# ================================================================================
# Helpers
# ================================================================================

class StatusRecorder:
    """A cluster_status callback that records (status, node ip, node, job)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.events = []

    def __call__(self, status, node, job):
        with self.cond:
            self.events.append((status, node.ip_addr if node is not None else None, node, job))
            self.cond.notify_all()

    def node_event(self, status, ip, timeout=T, predicate=None):
        """The DispyNode of the first (status, ip) node event (waits up to timeout)."""
        def find():
            for s, addr, node, job in self.events:
                if s == status and addr == ip and job is None and \
                        (predicate is None or predicate(node)):
                    return node
            return None
        with self.cond:
            self.cond.wait_for(lambda: find() is not None, timeout)
            return find()

    def node_statuses(self, ip):
        with self.cond:
            return [s for s, addr, _node, job in self.events if addr == ip and job is None]


def assert_no_overlap(test, jobs):
    """The jobs' [start_time, end_time] intervals do not overlap."""
    jobs = sorted(jobs, key=lambda j: j.start_time)
    for before, after in zip(jobs, jobs[1:]):
        test.assertLessEqual(before.end_time, after.start_time,
                             'jobs ran at once: %s' % [(round(j.start_time - jobs[0].start_time, 2),
                                                        round(j.end_time - jobs[0].start_time, 2))
                                                       for j in jobs])


class ApiTestCase(unittest.TestCase):
    """Starts the nodes listed in ``node_ips`` (same port) for the class."""

    timeout = 120
    node_ips = (NODE_IP,)
    cpus = 2
    node_args = ()
    node_env = None

    @classmethod
    def setUpClass(cls):
        cls.port = support.free_port(cls.node_ips[0])
        cls.nodes = {}
        for ip in cls.node_ips:
            node = support.NodeProcess(ip, port=cls.port, cpus=cls.cpus, args=cls.node_args,
                                       env=cls.node_env)
            cls.addClassCleanup(support.stop_node, node)
            node.start()
            cls.nodes[ip] = node

    def cluster(self, computation, nodes=None, **kwargs):
        kwargs.setdefault('ip_addr', CLIENT_IP)
        kwargs.setdefault('port', 0)
        kwargs.setdefault('node_port', self.port)
        cluster = dispy.JobCluster(computation, nodes=list(nodes or self.node_ips), **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def tmpdir(self):
        return support.temp_folder(self, 'dispytest-api-')

    def chdir_tmp(self):
        """Makes a temporary folder the working directory (before creating clusters)."""
        folder = self.tmpdir()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(folder)
        return os.getcwd()

    def finished(self, job, timeout=T):
        self.assertIsNotNone(job, 'submit returned None')
        result = job(timeout=timeout)
        self.assertEqual(job.status, DispyJob.Finished,
                         'job ended %s: %s' % (dispy.STATUS_NAMES.get(job.status, job.status),
                                               job.exception))
        return result


# ================================================================================
# Programs as computations
# ================================================================================

PROGRAM = '''\
import sys
print('stdout args %r' % (sys.argv[1:],))
print('stderr args %r' % (sys.argv[1:],), file=sys.stderr)
sys.exit(int(sys.argv[1]))
'''

SHELL_PROGRAM = '''\
#!/bin/sh
echo "shell got $1 $2"
echo "shell err $1" >&2
exit 5
'''


class ProgramTest(ApiTestCase):

    def write_program(self, name, text, executable=False):
        path = os.path.join(self.tmpdir(), name)
        with open(path, 'w') as f:
            f.write(text)
        if executable:
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def test_python_program_exit_status_and_output(self):
        """JobCluster('/path/prog.py'): the result is the exit status; stdout and
        stderr are the program's."""
        cluster = self.cluster(self.write_program('dispytest_prog.py', PROGRAM))
        job = cluster.submit('3', 'x')
        zero = cluster.submit('0')
        self.assertEqual(self.finished(job), 3)
        self.assertIn("stdout args ['3', 'x']", job.stdout)
        self.assertIn("stderr args ['3', 'x']", job.stderr)
        self.assertNotIn('stderr args', job.stdout)
        self.assertNotIn('stdout args', job.stderr)
        self.assertEqual(job.ip_addr, NODE_IP)
        self.assertEqual(self.finished(zero), 0)
        self.assertIn("stdout args ['0']", zero.stdout)
        self.assertTrue(cluster.close(timeout=T))

    def test_non_string_arguments_are_converted(self):
        """As in seed 000 §6.2 (``cluster.submit(i)``) and 4.15: a program's arguments
        go through str(); keyword arguments are refused (None, logged at ERROR)."""
        cluster = self.cluster(self.write_program('dispytest_prog.py', PROGRAM))
        job = cluster.submit(3, 2.5)
        self.assertEqual(self.finished(job), 3)
        self.assertIn("stdout args ['3', '2.5']", job.stdout)
        self.assertEqual(job.args, ('3', '2.5'))
        with self.assertLogs('dispy', 'ERROR'):
            self.assertIsNone(cluster.submit('1', flag=True))
        self.assertEqual(self.finished(cluster.submit('7')), 7)

    def test_shell_script_runs_as_it_is(self):
        """An executable #!/bin/sh script is run by its interpreter line."""
        cluster = self.cluster(self.write_program('dispytest_prog.sh', SHELL_PROGRAM,
                                                  executable=True))
        job = cluster.submit('a1', 'b2')
        self.assertEqual(self.finished(job), 5)
        self.assertIn('shell got a1 b2', job.stdout)
        self.assertIn('shell err a1', job.stderr)


# ================================================================================
# dispy_job_depends
# ================================================================================

JOB_MODULE = '''
def quadruple(x):
    return 4 * x
'''


class JobDependsTest(ApiTestCase):

    cpus = 1          # one warm worker: the second job runs where the first ran

    def test_file_function_class_module_and_their_removal(self):
        """dispy_job_depends: a file (read by base name), a function, a class and a
        module are there for that job only; afterwards the files are gone from the
        computation's folder even with cleanup=False, and the next job (same warm
        worker) sees none of them."""
        folder = self.tmpdir()
        data = os.path.join(folder, 'dispytest_jobdata.txt')
        with open(data, 'w') as f:
            f.write('job data')
        with open(os.path.join(folder, 'dispytest_jobmod.py'), 'w') as f:
            f.write(JOB_MODULE)
        sys.path.insert(0, folder)
        self.addCleanup(sys.modules.pop, 'dispytest_jobmod', None)
        self.addCleanup(sys.path.remove, folder)
        module = importlib.import_module('dispytest_jobmod')
        cluster = self.cluster(use_job_depends, cleanup=False)
        job = cluster.submit('dispytest_jobdata.txt',
                             dispy_job_depends=[data, depends_helper, DependsClass, module])
        text, helper, obj, mod, cwd = self.finished(job)
        self.assertEqual((text, helper, obj, mod), ('job data', 'helper 40', 'class 6', 24))
        prefix = os.path.realpath(self.nodes[NODE_IP].dest_path_prefix) + os.sep
        self.assertTrue(os.path.realpath(cwd).startswith(prefix), cwd)
        self.assertTrue(support.wait_until(
            lambda: not os.path.exists(os.path.join(cwd, 'dispytest_jobdata.txt')), T),
            'the dispy_job_depends file is still in %s' % cwd)
        self.assertTrue(support.wait_until(
            lambda: not os.path.exists(os.path.join(cwd, 'dispytest_jobmod.py')), T),
            'the dispy_job_depends module is still in %s' % cwd)
        self.assertTrue(os.path.isdir(cwd), 'cleanup=False: the folder itself stays')
        probe = cluster.submit('dispytest_jobdata.txt', probe=True)
        self.assertEqual(self.finished(probe), (False, False, False, False))
        self.assertTrue(cluster.close(timeout=T))
        self.assertTrue(os.path.isdir(cwd), 'cleanup=False: the folder stays after close')
        self.assertFalse(os.path.exists(os.path.join(cwd, 'dispytest_jobdata.txt')))


# ================================================================================
# dispy_send_file and the job's globals
# ================================================================================

class SendFileFromJobTest(ApiTestCase):

    def test_relative_path_lands_under_client_folder(self):
        """dispy_send_file('out/rel-T.txt') returns 0 and the file is at the same
        relative path under the client's working directory when the job ends."""
        cwd = self.chdir_tmp()
        cluster = self.cluster(send_relative)
        token = uuid.uuid4().hex[:8]
        self.assertEqual(self.finished(cluster.submit(token)), 0)
        path = os.path.join(cwd, 'out', 'rel-%s.txt' % token)
        self.assertTrue(os.path.isfile(path), os.listdir(cwd))
        self.assertEqual(support.read_file(path), 'relative %s' % token)

    def test_parent_path_is_refused(self):
        """A path with '..' returns -1 and writes nothing outside the client folder."""
        cwd = self.chdir_tmp()
        cluster = self.cluster(send_parent)
        name = 'dispytest-escape-%s.txt' % uuid.uuid4().hex[:8]
        job = cluster.submit(name)
        self.assertEqual(self.finished(job), -1)
        self.assertIn('dispy_send_file', job.stderr)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(cwd), name)))
        # (the client's recover file, _dispy_*, is the only file it keeps there)
        found = [os.path.join(d, f) for d, _, files in os.walk(cwd) for f in files
                 if not f.startswith('_dispy_')]
        self.assertEqual(found, [])

    def test_absolute_path_is_saved_relative_to_client_folder(self):
        """An absolute path on the node is saved under the client folder at that path."""
        cwd = self.chdir_tmp()
        cluster = self.cluster(send_absolute)
        token = uuid.uuid4().hex[:8]
        status, node_path = self.finished(cluster.submit(token))
        self.assertEqual(status, 0)
        self.assertTrue(os.path.isabs(node_path))
        path = os.path.join(cwd, node_path.lstrip(os.sep))
        self.assertTrue(os.path.isfile(path), path)
        self.assertEqual(support.read_file(path), 'absolute %s' % token)

    def test_node_name_address_and_job_path(self):
        """dispy_node_name, dispy_node_ip_addr and dispy_job_path exist in jobs: the
        node's name and address, and the computation's folder (the job's cwd)."""
        cluster = self.cluster(job_globals)
        name, ip, job_path, cwd = self.finished(cluster.submit())
        self.assertEqual(name, socket.gethostname())
        self.assertEqual(ip, NODE_IP)
        self.assertEqual(os.path.realpath(job_path), os.path.realpath(cwd))
        prefix = os.path.realpath(self.nodes[NODE_IP].dest_path_prefix) + os.sep
        self.assertTrue(os.path.realpath(job_path).startswith(prefix), job_path)


class MaxFileSizeTest(ApiTestCase):
    """A node started with --max_file_size 1k."""

    node_ips = (OTHER_IP,)
    node_args = ('--max_file_size', '1k')

    def test_dispy_send_file_over_limit(self):
        """A file over the node's limit: dispy_send_file returns -1 and nothing lands;
        one under it is sent."""
        cwd = self.chdir_tmp()
        cluster = self.cluster(send_sized)
        big = cluster.submit('big.dat', 2000)
        self.assertEqual(self.finished(big), -1)
        self.assertIn('max_file_size', big.stderr)
        self.assertEqual(self.finished(cluster.submit('small.dat', 100)), 0)
        self.assertFalse(os.path.exists(os.path.join(cwd, 'big.dat')))
        self.assertEqual(os.path.getsize(os.path.join(cwd, 'small.dat')), 100)

    def test_cluster_send_file_over_limit(self):
        """cluster.send_file of a file over the node's limit returns -1; under it, 0."""
        folder = self.tmpdir()
        big, small = os.path.join(folder, 'big.dat'), os.path.join(folder, 'small.dat')
        with open(big, 'wb') as f:
            f.write(b'y' * 2000)
        with open(small, 'wb') as f:
            f.write(b'z' * 100)
        recorder = StatusRecorder()
        cluster = self.cluster(read_named_file, cluster_status=recorder)
        self.assertIsNotNone(recorder.node_event(DispyNode.Initialized, OTHER_IP))
        with self.assertLogs('dispy', 'ERROR'):
            self.assertEqual(cluster.send_file(big, OTHER_IP), -1)
        self.assertEqual(cluster.send_file(small, OTHER_IP), 0)
        self.assertEqual(self.finished(cluster.submit('small.dat')), 'z' * 100)


# ================================================================================
# Cluster methods on two nodes
# ================================================================================

class RecordingAllocate(NodeAllocate):
    """Records every allocate call; uses the node only if ``accept(ip)``."""

    def __init__(self, host, calls, accept=lambda ip: True, **kwargs):
        super().__init__(host, **kwargs)
        self.calls = calls
        self.accept = accept

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
        self.calls.append({'cluster': cluster, 'ip_addr': ip_addr, 'name': name, 'cpus': cpus,
                           'avail_info': avail_info, 'platform': platform})
        return cpus if self.accept(ip_addr) else 0


class PerNodeAllocate(NodeAllocate):
    """Gives each node its own setup arguments; only 127.0.0.3 gets per_node_extra."""

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
        self.setup_args = ('tag-%s' % ip_addr,)
        self.depends = [per_node_extra] if ip_addr == OTHER_IP else []
        return cpus


class TwoNodesApiTest(ApiTestCase):
    """Nodes on 127.0.0.2 and 127.0.0.3 (same port), 2 CPUs each."""

    node_ips = (NODE_IP, OTHER_IP)

    def both_ready(self, recorder):
        for ip in self.node_ips:
            self.assertIsNotNone(recorder.node_event(DispyNode.Initialized, ip),
                                 'node %s not initialized' % ip)

    # -- submit_node ---------------------------------------------------------------------
    def test_submit_node_with_dispynode_and_address(self):
        """submit_node with a DispyNode from cluster_status or an address: every job
        runs on the chosen node."""
        recorder = StatusRecorder()
        cluster = self.cluster(where, cluster_status=recorder)
        node3 = recorder.node_event(DispyNode.Initialized, OTHER_IP)
        self.assertIsInstance(node3, DispyNode)
        jobs = [cluster.submit_node(node3, i) for i in range(4)]
        jobs += [cluster.submit_node(NODE_IP, i) for i in range(4, 8)]
        for i, job in enumerate(jobs):
            ip = OTHER_IP if i < 4 else NODE_IP
            self.assertEqual(self.finished(job), (i, ip))
            self.assertEqual(job.ip_addr, ip)
        self.assertTrue(cluster.close(timeout=T))

    def test_submit_node_waits_for_node_being_set_up(self):
        """submit_node right after JobCluster (setup still running on the node): the job
        waits for the setup and runs there."""
        cluster = self.cluster(where, setup=slow_setup)
        job = cluster.submit_node(OTHER_IP, 'early')
        self.assertEqual(self.finished(job), ('early', OTHER_IP))

    # -- send_file, node_jobs ----------------------------------------------------------------
    def test_send_file_to_node(self):
        """send_file(path, node) returns 0 once the node is set up; jobs there read the
        file by its base name.  An unknown node gives -1."""
        folder = self.tmpdir()
        path = os.path.join(folder, 'dispytest_sent.txt')
        with open(path, 'w') as f:
            f.write('sent after setup')
        recorder = StatusRecorder()
        cluster = self.cluster(read_named_file, cluster_status=recorder)
        node2 = recorder.node_event(DispyNode.Initialized, NODE_IP)
        self.assertIsNotNone(node2)
        self.assertEqual(cluster.send_file(path, node2), 0)
        job = cluster.submit_node(NODE_IP, 'dispytest_sent.txt')
        self.assertEqual(self.finished(job), 'sent after setup')
        self.assertIsNotNone(recorder.node_event(DispyNode.Initialized, OTHER_IP))
        self.assertEqual(cluster.send_file(path, OTHER_IP), 0)
        job = cluster.submit_node(OTHER_IP, 'dispytest_sent.txt')
        self.assertEqual(self.finished(job), 'sent after setup')
        with self.assertLogs('dispy', 'ERROR'):
            self.assertEqual(cluster.send_file(path, '127.0.0.9'), -1)

    def test_node_jobs_lists_running_jobs(self):
        """node_jobs(node) lists the cluster's jobs running on that node, and no longer
        once they ended."""
        folder = self.tmpdir()
        release = os.path.join(folder, 'release')
        cluster = self.cluster(wait_for_release)
        job = cluster.submit_node(NODE_IP, release)
        self.assertTrue(support.wait_until(lambda: job in cluster.node_jobs(NODE_IP), T),
                        'the running job is not listed (status %s)' % job.status)
        self.assertEqual(cluster.node_jobs(OTHER_IP), [])
        open(release, 'w').close()
        self.assertTrue(self.finished(job))
        self.assertEqual(cluster.node_jobs(NODE_IP), [])

    # -- CPUs --------------------------------------------------------------------------------
    def test_set_node_cpus_return_values(self):
        """set_node_cpus returns the CPUs now used: 1 for 1, all but one for -1, at most
        the node's CPUs, and -1 for a node it does not know."""
        cluster = self.cluster(identity, nodes=[NODE_IP])
        self.assertEqual(self.finished(cluster.submit(1)), 1)   # the node is set up
        self.assertEqual(cluster.set_node_cpus(NODE_IP, 1), 1)
        self.assertEqual(cluster.set_node_cpus(NODE_IP, -1), 1)
        self.assertEqual(cluster.set_node_cpus(NODE_IP, 2), 2)
        self.assertEqual(cluster.set_node_cpus('127.0.0.9', 1), -1)
        self.assertEqual(self.finished(cluster.submit(2)), 2)

    def test_set_node_cpus_one_runs_one_job_at_a_time(self):
        """After set_node_cpus(node, 1) at most one job runs there at once."""
        cluster = self.cluster(nap, nodes=[NODE_IP])
        self.finished(cluster.submit(0))
        self.assertEqual(cluster.set_node_cpus(NODE_IP, 1), 1)
        jobs = [cluster.submit(0.3) for _ in range(4)]
        for job in jobs:
            self.finished(job)
        assert_no_overlap(self, jobs)

    def test_set_node_cpus_negative_leaves_cpus_free(self):
        """set_node_cpus(node, -1) on a 2-CPU node: one job at a time."""
        cluster = self.cluster(nap, nodes=[NODE_IP])
        self.finished(cluster.submit(0))
        self.assertEqual(cluster.set_node_cpus(NODE_IP, -1), 1)
        jobs = [cluster.submit(0.3) for _ in range(3)]
        for job in jobs:
            self.finished(job)
        assert_no_overlap(self, jobs)

    # -- deallocate, close, resetup -----------------------------------------------------------
    def test_deallocate_node(self):
        """deallocate_node(node): later jobs all run on the other node."""
        recorder = StatusRecorder()
        cluster = self.cluster(where, cluster_status=recorder)
        self.both_ready(recorder)
        self.assertEqual(cluster.deallocate_node(NODE_IP), 0)
        jobs = [cluster.submit(i) for i in range(8)]
        for i, job in enumerate(jobs):
            self.assertEqual(self.finished(job), (i, OTHER_IP))
        self.assertEqual(cluster.deallocate_node('127.0.0.9'), -1)

    def test_close_node(self):
        """close_node(node): cluster_status gets DispyNode.Closed for it and later jobs
        run on the other node."""
        recorder = StatusRecorder()
        cluster = self.cluster(where, cluster_status=recorder)
        self.both_ready(recorder)
        self.assertEqual(cluster.close_node(NODE_IP), 0)
        self.assertIsNotNone(recorder.node_event(DispyNode.Closed, NODE_IP),
                             'no DispyNode.Closed for %s' % NODE_IP)
        jobs = [cluster.submit(i) for i in range(6)]
        for i, job in enumerate(jobs):
            self.assertEqual(self.finished(job), (i, OTHER_IP))
        self.assertNotIn(DispyNode.Closed, recorder.node_statuses(OTHER_IP))

    def test_resetup_node_runs_setup_again(self):
        """resetup_node(node) runs setup again on that node only; jobs still run there."""
        folder = self.tmpdir()
        recorder = StatusRecorder()
        cluster = self.cluster(where, setup=functools.partial(count_setup, folder),
                               cluster_status=recorder)
        self.both_ready(recorder)

        def setups(ip):
            path = os.path.join(folder, 'setup-%s' % ip)
            return support.read_file(path).count('setup\n') if os.path.exists(path) else 0

        self.assertEqual((setups(NODE_IP), setups(OTHER_IP)), (1, 1))
        self.assertEqual(cluster.resetup_node(NODE_IP), 0)
        self.assertTrue(support.wait_until(lambda: setups(NODE_IP) == 2, T),
                        'setup ran %d time(s) on %s' % (setups(NODE_IP), NODE_IP))
        self.assertEqual(self.finished(cluster.submit_node(NODE_IP, 'after')),
                         ('after', NODE_IP))
        self.assertEqual(self.finished(cluster.submit_node(OTHER_IP, 'other')),
                         ('other', OTHER_IP))
        self.assertEqual(setups(OTHER_IP), 1)
        self.assertEqual(setups(NODE_IP), 2)

    # -- adding nodes --------------------------------------------------------------------------
    def _add_node(self, add):
        recorder = StatusRecorder()
        cluster = self.cluster(where, nodes=[NODE_IP], cluster_status=recorder)
        self.assertEqual(self.finished(cluster.submit('before')), ('before', NODE_IP))
        self.assertEqual(recorder.node_statuses(OTHER_IP), [])
        self.assertEqual(add(cluster), 0)
        self.assertIsNotNone(recorder.node_event(DispyNode.Initialized, OTHER_IP))
        self.assertEqual(self.finished(cluster.submit_node(OTHER_IP, 'added')),
                         ('added', OTHER_IP))

    def test_allocate_node_adds_a_node(self):
        """allocate_node(address) adds a node that was not in nodes; jobs run there."""
        self._add_node(lambda cluster: cluster.allocate_node(OTHER_IP))

    def test_discover_nodes_adds_a_node(self):
        """discover_nodes([address]) does the same."""
        self._add_node(lambda cluster: cluster.discover_nodes([OTHER_IP]))

    # -- jobs ----------------------------------------------------------------------------------
    def test_submit_job_id_and_clear(self):
        """submit_job_id sets job.id; job(clear=True) returns the result and clears it."""
        cluster = self.cluster(identity)
        job = cluster.submit_job_id('my-id', {'value': 7})
        self.assertEqual(job.id, 'my-id')
        self.assertEqual(job(clear=True, timeout=T), {'value': 7})
        self.assertEqual(job.status, DispyJob.Finished)
        self.assertIsNone(job.result)
        self.assertEqual(job.id, 'my-id')

    # -- status --------------------------------------------------------------------------------
    def test_status_print_status_and_stats(self):
        """status() has per-node figures and totals; print_status() and stats() print a
        table naming both nodes."""
        cluster = self.cluster(nap)
        jobs = [cluster.submit_node(ip, 0.05) for ip in self.node_ips for _ in range(3)]
        for job in jobs:
            self.finished(job)
        status = cluster.status()
        nodes = {n['ip_addr']: n for n in status['nodes']}
        self.assertEqual(set(nodes), set(self.node_ips))
        for ip, node in nodes.items():
            for key in ('ip_addr', 'cpus', 'jobs_done', 'cpu_time', 'bytes_sent',
                        'bytes_received'):
                self.assertIn(key, node)
            self.assertEqual(node['jobs_done'], 3)
            self.assertEqual(node['cpus'], 2)
            self.assertGreaterEqual(node['cpu_time'], 0.1)
            self.assertGreater(node['bytes_sent'], 0)
            self.assertGreater(node['bytes_received'], 0)
        self.assertAlmostEqual(status['total_job_time'],
                               sum(n['cpu_time'] for n in nodes.values()), places=6)
        self.assertGreater(status['wall_time'], 0)
        for method in (cluster.print_status, cluster.stats):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                method()
            for ip in self.node_ips:
                self.assertIn(ip, out.getvalue())

    # -- NodeAllocate --------------------------------------------------------------------------
    def test_allocate_subclass_filters_nodes(self):
        """A NodeAllocate subclass whose allocate returns 0 for one node: no job runs
        there; allocate gets the cluster, address, name, CPUs and platform."""
        calls = []
        allocs = [RecordingAllocate(ip, calls, accept=lambda ip: ip == OTHER_IP)
                  for ip in self.node_ips]
        recorder = StatusRecorder()
        cluster = self.cluster(where, nodes=allocs, cluster_status=recorder)
        self.assertTrue(support.wait_until(
            lambda: {c['ip_addr'] for c in calls} == set(self.node_ips), T), calls)
        jobs = [cluster.submit(i) for i in range(6)]
        for i, job in enumerate(jobs):
            self.assertEqual(self.finished(job), (i, OTHER_IP))
        self.assertEqual(recorder.node_statuses(NODE_IP), [])
        for call in calls:
            self.assertIs(call['cluster'], cluster)
            self.assertEqual(call['cpus'], 2)
            self.assertEqual(call['name'], socket.gethostname())
            self.assertIsInstance(call['platform'], str)
            self.assertTrue(call['platform'])

    def test_per_node_setup_args_and_depends(self):
        """setup_args and depends set on the NodeAllocate in allocate apply to that
        node: setup runs with them instead of the partial's arguments, and only the
        node given the extra function has it."""
        cluster = self.cluster(report_tag, nodes=[PerNodeAllocate(ip) for ip in self.node_ips],
                               setup=functools.partial(store_tag, 'default'),
                               depends=[store_tag])
        self.assertEqual(self.finished(cluster.submit_node(NODE_IP)),
                         ('tag-%s' % NODE_IP, False))
        self.assertEqual(self.finished(cluster.submit_node(OTHER_IP)),
                         ('tag-%s' % OTHER_IP, 'extra 2'))

    def test_node_allocate_object_with_default_port(self):
        """NodeAllocate(host, port=None, cpus=1): the cluster's node_port is used and
        the node gets 1 CPU for this cluster."""
        recorder = StatusRecorder()
        cluster = self.cluster(where, nodes=[NodeAllocate(NODE_IP, port=None, cpus=1)],
                               cluster_status=recorder)
        self.assertEqual(self.finished(cluster.submit('x')), ('x', NODE_IP))
        node = recorder.node_event(DispyNode.Initialized, NODE_IP)
        self.assertEqual(node.cpus, 1)
        self.assertEqual(node.avail_cpus, 2)

    def test_tuple_host_port_cpus(self):
        """(host, port, cpus) tuples: the tuple's port is used (the cluster's node_port
        is wrong on purpose) and the cluster gets that many CPUs there."""
        recorder = StatusRecorder()
        wrong_port = support.free_port(OTHER_IP)
        cluster = self.cluster(where, nodes=[(OTHER_IP, self.port, 1)], node_port=wrong_port,
                               cluster_status=recorder)
        self.assertEqual(self.finished(cluster.submit('t')), ('t', OTHER_IP))
        self.assertEqual(recorder.node_event(DispyNode.Initialized, OTHER_IP).cpus, 1)
        self.assertEqual(cluster.status()['nodes'][0]['cpus'], 1)

    def test_tuple_cpus_one_runs_one_job_at_a_time(self):
        """A node allocated with cpus=1 runs this cluster's jobs one at a time."""
        cluster = self.cluster(nap, nodes=[(OTHER_IP, self.port, 1)])
        jobs = [cluster.submit(0.3) for _ in range(4)]
        for job in jobs:
            self.finished(job)
        assert_no_overlap(self, jobs)

    def test_wildcard_matches_node(self):
        """'127.0.0.*' (listed first, with the explicit address since loopback has no
        broadcast) is the NodeAllocate that matches 127.0.0.2."""
        # Safety: a wildcard makes the client broadcast on its own interfaces; with
        # ip_addr 127.0.0.1 there must be no broadcast address at all.
        if dispy.broadcast_addresses([CLIENT_IP]):
            self.skipTest('127.0.0.1 has a broadcast address here: would broadcast')
        calls = []
        cluster = self.cluster(where, nodes=[RecordingAllocate('127.0.0.*', calls), NODE_IP])
        self.assertEqual(self.finished(cluster.submit('w')), ('w', NODE_IP))
        self.assertIn(NODE_IP, [c['ip_addr'] for c in calls])


class LocalhostTest(ApiTestCase):
    """A node on 127.0.0.1, named 'localhost' in nodes."""

    node_ips = (CLIENT_IP,)

    def test_host_name_in_nodes(self):
        cluster = self.cluster(where, nodes=['localhost'])
        job = cluster.submit('by name')
        self.assertEqual(self.finished(job), ('by name', '127.0.0.1'))
        self.assertEqual(job.ip_addr, '127.0.0.1')


class NodeAllocateMatchTest(unittest.TestCase):
    """Matching of addresses against NodeAllocate hosts (no network)."""

    def test_wildcard_matches_whole_octets(self):
        alloc = NodeAllocate('192.168.3.*')
        self.assertTrue(alloc.matches('192.168.3.7'))
        self.assertTrue(alloc.matches('192.168.3.246'))
        self.assertFalse(alloc.matches('192.168.30.7'))
        self.assertFalse(alloc.matches('192.168.2.7'))
        self.assertFalse(alloc.matches('10.192.168.3.7'))

    def test_last_octet_never_matches_a_longer_one(self):
        self.assertFalse(NodeAllocate('192.168.3.24').matches('192.168.3.246'))
        self.assertTrue(NodeAllocate('192.168.3.24').matches('192.168.3.24'))
        self.assertFalse(NodeAllocate('192.168.*.24').matches('192.168.1.246'))
        self.assertTrue(NodeAllocate('192.168.*.24').matches('192.168.1.24'))
        self.assertFalse(NodeAllocate('10.0.0.2').matches('10.0.0.24'))

    def test_default_allocate(self):
        self.assertEqual(NodeAllocate('10.0.0.1', cpus=1).allocate(None, '10.0.0.1', 'n', 4), 1)
        self.assertEqual(NodeAllocate('10.0.0.1').allocate(None, '10.0.0.1', 'n', 4), 4)
        self.assertEqual(NodeAllocate('10.0.0.1', cpus=8).allocate(None, '10.0.0.1', 'n', 4), 4)


# ================================================================================
# DispyNode and DispyNodeAvailInfo
# ================================================================================

NO_PSUTIL = "raise ImportError('psutil hidden by the test')\n"

FAKE_PSUTIL = '''\
"""A stand-in for psutil with fixed figures (tests only)."""

class _Figures:
    def __init__(self, **kw):
        self.__dict__.update(kw)

def cpu_percent(interval=None, percpu=False):
    return 25.0

def virtual_memory():
    return _Figures(available=123, total=1000, percent=87.7)

def disk_usage(path):
    return _Figures(free=456, total=1000, used=544, percent=54.4)

def swap_memory():
    return _Figures(percent=7.0, free=93, total=100, used=7)
'''


def psutil_env(source):
    """Environment whose PYTHONPATH has a folder with ``psutil.py`` = ``source``."""
    folder = tempfile.mkdtemp(prefix='dispytest-psutil-')
    with open(os.path.join(folder, 'psutil.py'), 'w') as f:
        f.write(source)
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (folder, support.ROOT,
                                                    env.get('PYTHONPATH')) if p)
    return folder, env


class DispyNodeTest(ApiTestCase):
    """Node without psutil (a psutil.py that raises ImportError hides any real one)."""

    @classmethod
    def setUpClass(cls):
        folder, cls.node_env = psutil_env(NO_PSUTIL)
        cls.addClassCleanup(shutil.rmtree, folder, True)
        super().setUpClass()

    def test_dispynode_attributes(self):
        recorder = StatusRecorder()
        before = time.time()
        cluster = self.cluster(identity, cluster_status=recorder)
        node = recorder.node_event(DispyNode.Initialized, NODE_IP)
        self.assertIsInstance(node, DispyNode)
        for name in ('ip_addr', 'name', 'cpus', 'avail_cpus', 'busy', 'jobs_done', 'cpu_time',
                     'platform', 'avail_info', 'update_time'):
            self.assertTrue(hasattr(node, name), name)
        self.assertEqual(node.ip_addr, NODE_IP)
        self.assertEqual(node.name, socket.gethostname())
        self.assertEqual((node.cpus, node.avail_cpus), (2, 2))
        self.assertIsInstance(node.platform, str)
        self.assertTrue(node.platform)
        self.assertIsNone(node.avail_info)
        self.assertGreaterEqual(node.update_time, before - 1)
        self.assertEqual(self.finished(cluster.submit(3)), 3)
        self.assertTrue(cluster.wait(timeout=T))
        with recorder.cond:
            finished = [n for s, ip, n, j in recorder.events if s == DispyJob.Finished]
        self.assertEqual(len(finished), 1)
        self.assertEqual(finished[0].jobs_done, 1)


class AvailInfoTest(ApiTestCase):
    """Node with a fake psutil module: fixed availability figures."""

    @classmethod
    def setUpClass(cls):
        folder, cls.node_env = psutil_env(FAKE_PSUTIL)
        cls.addClassCleanup(shutil.rmtree, folder, True)
        super().setUpClass()

    def check_info(self, info):
        self.assertIsInstance(info, DispyNodeAvailInfo)
        self.assertEqual((info.cpu, info.memory, info.disk, info.swap), (75.0, 123, 456, 7.0))

    def test_avail_info_reaches_cluster_status_and_allocate(self):
        """With pulse_interval=0.3, cluster_status receives DispyNode.AvailInfo with a
        DispyNodeAvailInfo (cpu 75 = 100 - cpu_percent, memory, disk, swap); allocate
        also gets it."""
        recorder = StatusRecorder()
        calls = []
        cluster = self.cluster(identity, nodes=[RecordingAllocate(NODE_IP, calls)],
                               cluster_status=recorder, pulse_interval=0.3)
        initialized = recorder.node_event(DispyNode.Initialized, NODE_IP)
        self.assertIsNotNone(initialized)
        self.assertTrue(calls)
        self.check_info(calls[0]['avail_info'])
        self.assertEqual(self.finished(cluster.submit(1)), 1)
        node = recorder.node_event(DispyNode.AvailInfo, NODE_IP,
                                   predicate=lambda n: n.avail_info is not None, timeout=5)
        self.assertIsNotNone(node, 'no DispyNode.AvailInfo in 5 s (pulse_interval 0.3): %s'
                             % recorder.events)
        self.check_info(node.avail_info)


# ================================================================================
# Aliases
# ================================================================================

def udp_port_in_use(ip, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class AliasesTest(ApiTestCase):

    def test_host_ext_host_and_job_status(self):
        """host= is ip_addr, ext_host= is accepted, job_status= is the callback (see
        test_dispy_port for where the client binds with host=)."""
        done = []
        cluster = self.cluster(identity, ip_addr=None, host=CLIENT_IP, ext_host=CLIENT_IP,
                               job_status=done.append)
        job = cluster.submit('alias')
        self.assertEqual(self.finished(job), 'alias')
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual([j.result for j in done], ['alias'])

    def test_dispy_port(self):
        """dispy_port=P: the client uses port P and the nodes' port P + 1."""
        for _ in range(50):
            port = support.free_port(CLIENT_IP)
            if support.tcp_free(NODE_IP, port + 1) and not udp_port_in_use(NODE_IP, port + 1):
                break
        else:
            self.skipTest('no free pair of ports P, P + 1')
        with support.NodeProcess(NODE_IP, port=port + 1, cpus=1) as node:
            self.assertEqual(node.port, port + 1)
            # the class's node also listens on 127.0.0.2: name only the new one's port
            cluster = dispy.JobCluster(where, nodes=[NODE_IP], host=CLIENT_IP, dispy_port=port)
            self.addCleanup(support.close_now, cluster)
            self.assertEqual(self.finished(cluster.submit('p')), ('p', NODE_IP))
            self.assertTrue(udp_port_in_use(CLIENT_IP, port), 'client is not on port %d' % port)
            self.assertFalse(udp_port_in_use(NODE_IP, port),
                             'client bound every interface: host= was ignored')
            self.assertTrue(cluster.close(timeout=T))

    def test_abandoned_status_exists(self):
        statuses = {DispyJob.Created, DispyJob.Running, DispyJob.ProvisionalResult,
                    DispyJob.Finished, DispyJob.Cancelled, DispyJob.Terminated}
        self.assertTrue(hasattr(DispyJob, 'Abandoned'))
        self.assertNotIn(DispyJob.Abandoned, statuses)
        self.assertEqual(len({DispyNode.Initialized, DispyNode.Closed, DispyNode.AvailInfo}), 3)


# ================================================================================
# The 4.15 API surface real scripts use; mistakes caught where they are made
# ================================================================================

def make_closure_computation(factor):
    def scaled(x):
        return x * factor
    return scaled


def setup_with_offset(offset):
    global job_offset
    job_offset = offset
    return 0


def add_offset(x):
    return x + job_offset + offset_helper(0)  # noqa: F821 (setup, NodeAllocate depends)


def offset_helper(x):
    return x + 1000


class Api415Test(ApiTestCase):

    def test_automatic_ids_submit_time_and_name(self):
        """job.id is a process-wide number from 1 unless set; submit_time is set at
        submit; cluster.name is 'computation @ client address'."""
        first, second = self.cluster(identity), self.cluster(nap)
        jobs = [first.submit(1), second.submit(0), first.submit(2)]
        ids = [job.id for job in jobs]
        self.assertTrue(all(isinstance(i, int) and i >= 1 for i in ids), ids)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), 3)
        for job in jobs:
            self.finished(job)
            self.assertLessEqual(job.submit_time, job.start_time)
        self.assertEqual(first.name, 'identity @ %s' % CLIENT_IP)
        self.assertEqual(second.name, 'nap @ %s' % CLIENT_IP)
        self.assertEqual(jobs[0].args, (1,))
        self.assertEqual(jobs[0].kwargs, {})

    def test_submit_job_id_reaches_created_callback_with_its_id(self):
        """submit_job_id(id, ...) sets the id before cluster_status hears of the job
        (Created); submit_job_id_node runs it on the node given."""
        recorder = StatusRecorder()
        cluster = self.cluster(where, cluster_status=recorder)
        job = cluster.submit_job_id('mine', 3)
        pinned = cluster.submit_job_id_node(('pinned', 1), NODE_IP, 4)
        self.assertEqual(self.finished(job)[0], 3)
        self.assertEqual(self.finished(pinned), (4, NODE_IP))
        self.assertEqual(pinned.id, ('pinned', 1))
        self.assertTrue(cluster.wait(timeout=T))
        with recorder.cond:
            created = [j.id for s, _ip, _node, j in recorder.events
                       if j is not None and s == DispyJob.Created]
        self.assertEqual(created, ['mine', ('pinned', 1)])

    def test_msg_timeout_and_node_allocate_keywords(self):
        """dispy.MsgTimeout exists (4.15 scripts set it); NodeAllocate(host, port=,
        cpus=, depends=, setup_args=) gives that node its own setup arguments and
        dependencies."""
        self.assertEqual(dispy.MsgTimeout, 10)
        alloc = NodeAllocate(NODE_IP, port=self.port, cpus=1, depends=[offset_helper],
                             setup_args=(5,))
        self.assertEqual((alloc.port, alloc.cpus, alloc.setup_args), (self.port, 1, (5,)))
        cluster = self.cluster(add_offset, nodes=[alloc],
                               setup=functools.partial(setup_with_offset, 0))
        self.assertEqual(self.finished(cluster.submit(2)), 1007)
        self.assertEqual(cluster.status()['nodes'][0]['cpus'], 1)

    def test_each_cluster_has_its_own_recover_file(self):
        """recover_file of every cluster is honoured; a clean close removes it."""
        folder = self.chdir_tmp()
        first = self.cluster(identity, recover_file='first.rec')
        second = self.cluster(identity, recover_file='second.rec')
        self.assertEqual(os.listdir(folder), [], 'recover file made before any submit')
        self.finished(first.submit(1))
        self.finished(second.submit(2))
        self.assertEqual(sorted(os.listdir(folder)), ['first.rec', 'second.rec'])
        self.assertEqual(stat.S_IMODE(os.stat('first.rec').st_mode), 0o600)
        self.assertTrue(first.close(timeout=T))
        self.assertEqual(os.listdir(folder), ['second.rec'])
        self.assertTrue(second.close(timeout=T))
        self.assertEqual(os.listdir(folder), [])


class MistakesTest(ApiTestCase):

    def test_closure_is_refused_naming_the_variable(self):
        with self.assertRaises(ValueError) as caught:
            self.cluster(make_closure_computation(3))
        self.assertIn("'factor'", str(caught.exception))
        self.assertIn('closure', str(caught.exception))

    def test_main_script_classes_in_arguments(self):
        """Instances of a class of the main script, not in depends, reach the node
        (the class travels with the job) and come back as results; a class whose
        source cannot be found is refused at submit, naming the fix."""
        env = dict(os.environ, PYTHONPATH=support.ROOT)
        proc = support.run_client(MAIN_CLASS_CLIENT, env, timeout=60, cwd=self.tmpdir(),
                                  args=[NODE_IP, str(self.port), CLIENT_IP])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('NORM 25', proc.stdout)
        self.assertIn('MOVED Point(4, 6) True', proc.stdout)
        self.assertIn('DYNAMIC None', proc.stdout)
        self.assertRegex(proc.stderr, r'refers to Dynamic of the main script.*add it to '
                                      r'depends=')


MAIN_CLASS_CLIENT = r"""
import sys
import dispy

class Shape:                    # a base class of the main script travels too
    def norm2(self):
        return self.x * self.x + self.y * self.y

class Point(Shape):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __repr__(self):
        return 'Point(%d, %d)' % (self.x, self.y)

def norm(p, shift=None):
    if shift is not None:
        return shift(p)
    return p.norm2()

def moved(p):
    return Point(p.x + 1, p.y + 2)

Dynamic = type('Dynamic', (), {})

if __name__ == '__main__':
    node, port, ip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cluster = dispy.JobCluster(norm, nodes=[node], node_port=port, ip_addr=ip, port=0)
    print('NORM %s' % cluster.submit(Point(3, 4))(timeout=30), flush=True)
    result = cluster.submit(Point(3, 4), shift=moved)(timeout=30)
    print('MOVED %r %s' % (result, isinstance(result, Point)), flush=True)
    print('DYNAMIC %s' % cluster.submit(Dynamic()), flush=True)
    cluster.close(timeout=30)
"""


# ================================================================================
# Command line
# ================================================================================

CLI_PROGRAM = '''\
import sys
with open('data.txt') as f:
    data = f.read().strip()
print('prog args %r data %s' % (sys.argv[1:], data))
sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
'''


class CommandLineTest(ApiTestCase):

    def write_files(self):
        folder = self.tmpdir()
        with open(os.path.join(folder, 'data.txt'), 'w') as f:
            f.write('data-for-cli\n')
        with open(os.path.join(folder, 'prog.py'), 'w') as f:
            f.write(CLI_PROGRAM)
        return folder

    def run_cli(self, args, env, cwd):
        return support.run_client(DISPY_PY, env, timeout=60, cwd=cwd, args=args)

    def test_program_with_files_and_arguments(self):
        """dispy.py -f data.txt -a "arg11 'arg 12'" -a arg3 prog.py: one job per -a,
        each printed with its node, exit status and stdout; exit status 0."""
        folder = self.write_files()
        env = support.client_env([NODE_IP], node_port=self.port)
        proc = self.run_cli(['-f', 'data.txt', '-a', "arg11 'arg 12'", '-a', 'arg3',
                             '--timeout', '30', 'prog.py'], env, folder)
        out = proc.stdout
        self.assertEqual(proc.returncode, 0, out + proc.stderr)
        self.assertIn("prog args ['arg11', 'arg 12'] data data-for-cli", out)
        self.assertIn("prog args ['arg3'] data data-for-cli", out)
        self.assertIn(NODE_IP, out)
        self.assertEqual(out.count('exit status 0'), 2, out)

    def test_failing_job_gives_nonzero_exit_and_nodes_option(self):
        """A job whose program exits 1 makes dispy.py exit non-zero; -n names the node
        (overriding DISPY_NODES, which points nowhere here)."""
        folder = self.write_files()
        env = support.client_env(['127.0.0.9'], node_port=self.port)
        proc = self.run_cli(['-n', NODE_IP, '-f', 'data.txt', '-a', '1', '-a', '0',
                             '--timeout', '30', 'prog.py'], env, folder)
        self.assertNotEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('exit status 1', proc.stdout)
        self.assertIn('exit status 0', proc.stdout)
        self.assertIn("prog args ['1'] data data-for-cli", proc.stdout)

    def test_help_lists_options(self):
        proc = self.run_cli(['--help'], dict(os.environ), support.ROOT)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        for option in ('-f', '-a', '-n', '--ip_addr', '--secret', '--certfile', '--keyfile',
                       '-c', '-d'):
            self.assertRegex(proc.stdout, r'(^|[\s,\[])%s\b' % option, option)


if __name__ == '__main__':
    unittest.main()
