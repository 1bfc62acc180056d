"""The node's job processes (multiprocessing's forkserver → a host per computation →
warm workers).

    NodeDeathTest     a node killed with SIGKILL leaves no process behind: not a host
                      busy in a long setup, not the process a job started itself
    StandaloneTest    a node copied alone beside dispy.py (its forkserver children
                      import it again as ``__mp_main__``) runs jobs

Nodes are real ``dispynode.py`` processes on loopback addresses; every wait is bounded.
"""

import functools
import os
import shutil
import signal
import sys
import tempfile
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob

NODE_IP = '127.0.0.2'
T = 30


def pid_file_setup(folder):
    """Writes the host's pid to ``folder``, then takes its time."""
    tmp = os.path.join(folder, 'setup.pid.tmp')
    with open(tmp, 'w') as f:
        f.write(str(os.getpid()))
    os.rename(tmp, os.path.join(folder, 'setup.pid'))
    time.sleep(60)
    return 0


def square(x):
    return x * x


def child_then_sleep(folder):
    """Starts ``sleep 60``, writes its pid to ``folder``, then sleeps."""
    import subprocess
    child = subprocess.Popen(['sleep', '60'])
    tmp = os.path.join(folder, 'child.pid.tmp')
    with open(tmp, 'w') as f:
        f.write('%d %d' % (os.getpid(), child.pid))
    os.rename(tmp, os.path.join(folder, 'child.pid'))
    time.sleep(60)
    return 'not stopped'


def read_pids(path):
    with open(path) as f:
        return [int(p) for p in f.read().split()]


class NodeDeathTest(unittest.TestCase):

    timeout = 90

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix='dispytest-procs-')
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.node = support.NodeProcess(NODE_IP, cpus=1)
        self.addCleanup(self.node.stop)
        self.node.start()

    def cluster(self, computation, **kwargs):
        cluster = dispy.JobCluster(computation, nodes=[NODE_IP], ip_addr='127.0.0.1', port=0,
                                   node_port=self.node.port, **kwargs)
        self.addCleanup(cluster.close, terminate=True, timeout=2)
        return cluster

    def kill_node_and_check(self, pids):
        processes = self.node.descendants() + pids
        self.addCleanup(support.kill_pids, processes)
        self.node.signal(signal.SIGKILL)
        self.assertTrue(support.wait_until(
            lambda: not any(support.pid_alive(p) for p in processes), 10),
            'alive after the node was killed: %s\n%s'
            % ([p for p in processes if support.pid_alive(p)], self.node.output()))

    def test_sigkill_during_setup(self):
        self.cluster(square, setup=functools.partial(pid_file_setup, self.folder))
        path = os.path.join(self.folder, 'setup.pid')
        self.assertTrue(support.wait_until(lambda: os.path.exists(path), T),
                        'setup never ran\n%s' % self.node.output())
        self.kill_node_and_check(read_pids(path))

    def test_sigkill_takes_the_processes_a_job_started(self):
        cluster = self.cluster(child_then_sleep)
        job = cluster.submit(self.folder)
        self.assertIsNotNone(job)
        path = os.path.join(self.folder, 'child.pid')
        self.assertTrue(support.wait_until(lambda: os.path.exists(path), T),
                        'the job never ran (%s)\n%s' % (job.status, self.node.output()))
        self.kill_node_and_check(read_pids(path))


class StandaloneTest(unittest.TestCase):

    timeout = 90

    def test_node_copied_beside_dispy_runs_jobs(self):
        folder = tempfile.mkdtemp(prefix='dispytest-standalone-')
        self.addCleanup(shutil.rmtree, folder, True)
        for name in ('dispy.py', 'dispynode.py'):
            shutil.copy(os.path.join(support.ROOT, name), folder)
        env = dict(os.environ)
        env.pop('PYTHONPATH', None)
        node = support.NodeProcess(NODE_IP, cpus=2, env=env,
                                   script=os.path.join(folder, 'dispynode.py'))
        self.addCleanup(node.stop)
        node.start()
        cluster = dispy.JobCluster(square, nodes=[NODE_IP], ip_addr='127.0.0.1', port=0,
                                   node_port=node.port)
        self.addCleanup(cluster.close, terminate=True, timeout=2)
        jobs = [cluster.submit(i) for i in range(6)]
        for i, job in enumerate(jobs):
            self.assertEqual(job(timeout=T), i * i, '%s: %s\n%s'
                             % (job.status, job.exception, node.output()))
            self.assertEqual(job.status, DispyJob.Finished)
        self.assertIn(os.path.join(folder, 'dispynode.py'),
                      open('/proc/%d/cmdline' % node.proc.pid, 'rb').read().decode())


if __name__ == '__main__':
    unittest.main(argv=[sys.argv[0]])
