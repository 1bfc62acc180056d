"""Whole-system tests: unchanged client programs against real nodes on loopback
addresses, a busy node, a node killed mid-job, mixed Python versions, IPv6 and TLS."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

from tests import support
from tests.support import NodeProcess, client_env, run_client, wait_until

import dispy

TIMEOUT = 60
EXAMPLES = os.path.join(support.ROOT, 'examples')
PYENV = os.path.expanduser('~/.pyenv/versions')


def other_pythons():
    """Installed CPython interpreters (3.9+) other than the running one."""
    found = []
    if os.path.isdir(PYENV):
        for name in sorted(os.listdir(PYENV)):
            match = re.match(r'^3\.(\d+)\.\d+$', name)
            exe = os.path.join(PYENV, name, 'bin', 'python')
            if match and int(match.group(1)) >= 9 and os.path.exists(exe) and \
                    not sys.version.startswith(name):
                found.append(exe)
    return found


class TwoNodesTest(unittest.TestCase):
    """Two nodes on 127.0.0.2 and 127.0.0.3, as on two machines."""

    timeout = 240

    @classmethod
    def setUpClass(cls):
        port = support.free_port('127.0.0.2')
        cls.nodes = [NodeProcess('127.0.0.2', port=port, cpus=2),
                     NodeProcess('127.0.0.3', port=port, cpus=2)]
        for node in cls.nodes:
            cls.addClassCleanup(node.stop)
            node.start()
        cls.env = client_env(['127.0.0.2', '127.0.0.3'], node_port=port)

    def run_example(self, name, args=()):
        proc = run_client(os.path.join(EXAMPLES, name), self.env, timeout=TIMEOUT,
                          cwd=EXAMPLES, args=args)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        return proc.stdout

    def test_canonical_program_prints_every_result_from_both_nodes(self):
        out = self.run_example('sample.py')
        lines = re.findall(r'executed job (\d+) at ([\d.]+) with (\d+)', out)
        self.assertEqual(sorted(int(i) for i, _, _ in lines), list(range(20)))
        self.assertTrue(all(5 <= int(n) <= 20 for _, _, n in lines))
        self.assertIn('127.0.0.2', out)        # print_status lists both nodes
        self.assertIn('127.0.0.3', out)

    def test_distributing_objects(self):
        out = self.run_example('obj_instances.py')
        self.assertEqual(len(re.findall(r'^\d+: [\d.]+ / \d+: [\d.]+', out, re.M)), 10, out)

    def test_in_memory_processing_with_setup(self):
        out = self.run_example('node_setup.py')
        self.assertEqual(len(re.findall(r'^\d+: \w+ : [0-9a-f]+$', out, re.M)), 10, out)

    def test_updating_globals_with_shared_memory(self):
        out = self.run_example('node_shvars.py')
        values = [int(v) for v in re.findall(r'^\d+: (\d+)$', out, re.M)]
        self.assertEqual(len(values), 10, out)
        # each node's jobs see a shared value that only grows
        self.assertGreater(max(values), 10)

    def test_mapreduce_with_two_clusters_sharing_nodes(self):
        out = self.run_example('mapreduce.py')
        self.assertTrue(out.strip(), out)


def compute_pid(n):
    import os
    import time
    time.sleep(n)
    return os.getpid()


class NodeSharingTest(unittest.TestCase):

    timeout = 120

    def test_busy_node_warns_then_serves_second_client(self):
        with NodeProcess('127.0.0.2', cpus=1) as node:
            first = dispy.JobCluster(compute_pid, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                     port=0, node_port=node.port)
            self.addCleanup(first.close, terminate=True)
            self.assertIsNotNone(first.submit(0)(timeout=TIMEOUT))
            script = '''
import dispy
def compute(n):
    return n + 1
cluster = dispy.JobCluster(compute)
print('result', cluster.submit(41)(timeout=60))
cluster.close()
'''
            env = client_env(['127.0.0.2'], node_port=node.port)
            path = os.path.join(node.dir, 'second_client.py')
            with open(path, 'w') as f:
                f.write(script)
            proc = subprocess.Popen([sys.executable, path], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.addCleanup(_kill, proc)
            # the second client is turned away while the first holds the node
            self.assertTrue(wait_until(lambda: 'turned away' in node.stderr(), 30),
                            node.output())
            first.close(timeout=TIMEOUT)
            out, err = proc.communicate(timeout=TIMEOUT)
            self.assertIn('result 42', out, err)
            self.assertRegex(err, r'node 127\.0\.0\.2 is busy with another client: 127\.0\.0\.1')


class NodeAliasTest(unittest.TestCase):

    timeout = 60

    def test_one_node_listed_under_two_addresses_is_used_once(self):
        """A node serving 127.0.0.2 and 127.0.0.3, named twice in ``nodes``: the
        client keeps one connection (two would keep replacing each other)."""
        with NodeProcess('127.0.0.2', args=['-i', '127.0.0.3']) as node:
            cluster = dispy.JobCluster(compute_square, nodes=['127.0.0.2', '127.0.0.3'],
                                       ip_addr='127.0.0.1', port=0, node_port=node.port)
            self.addCleanup(cluster.close, terminate=True)
            jobs = [cluster.submit(i) for i in range(30)]
            self.assertEqual([job(timeout=TIMEOUT) for job in jobs], [i * i for i in range(30)])
            self.assertEqual(len({job.ip_addr for job in jobs}), 1)
            self.assertTrue(all(job.status == dispy.DispyJob.Finished for job in jobs))


class NodeCrashTest(unittest.TestCase):

    timeout = 120

    def test_node_killed_mid_job_cancels_its_jobs(self):
        node = NodeProcess('127.0.0.2', cpus=2)
        node.start()
        self.addCleanup(node.stop)
        cluster = dispy.JobCluster(compute_pid, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                   port=0, node_port=node.port)
        self.addCleanup(cluster.close, terminate=True)
        jobs = [cluster.submit(30) for _ in range(3)]
        self.assertTrue(wait_until(lambda: jobs[0].status == dispy.DispyJob.Running, 30))
        node.signal(signal.SIGKILL)
        for job in jobs:
            job(timeout=TIMEOUT)
            self.assertEqual(job.status, dispy.DispyJob.Cancelled)
            self.assertIn('127.0.0.2', job.exception)
        self.assertTrue(cluster.wait(timeout=5))


@unittest.skipUnless(other_pythons(), 'no other CPython 3.9+ under pyenv')
class MixedVersionsTest(unittest.TestCase):
    """Node on one CPython version, client on another (and the reverse)."""

    timeout = 300

    def test_node_on_other_versions(self):
        script = '''
import sys, dispy
def compute(n):
    import sys
    return (sys.version_info[:2], n * 3)
cluster = dispy.JobCluster(compute)
jobs = [cluster.submit(i) for i in range(6)]
print([job(timeout=60) for job in jobs])
cluster.close()
'''
        for python in other_pythons():
            with self.subTest(node=python):
                with NodeProcess('127.0.0.2', python=python) as node:
                    env = client_env(['127.0.0.2'], node_port=node.port)
                    proc = run_client(script, env, timeout=TIMEOUT)
                    self.assertEqual(proc.returncode, 0, proc.stderr)
                    version = tuple(int(x) for x in
                                    re.search(r'/3\.(\d+)', python).group(0)[1:].split('.'))
                    self.assertIn('((3, %d), 15)' % version[1], proc.stdout)

    def test_scheduler_on_other_version(self):
        """A dispyscheduler on one version between a SharedJobCluster on this one and
        a node on a third (or this) one: blobs pass through it unopened."""
        pythons = other_pythons()
        node_python = pythons[-1] if len(pythons) > 1 else sys.executable
        with NodeProcess('127.0.0.2', python=node_python) as node, \
                support.SchedulerProcess('127.0.0.1', nodes=['127.0.0.2'], node_port=node.port,
                                         python=pythons[0]) as sched:
            cluster = dispy.SharedJobCluster(compute_version, nodes=['127.0.0.2'],
                                             scheduler_node='127.0.0.1',
                                             scheduler_port=sched.port, recover_file=False)
            self.addCleanup(support.close_now, cluster)
            jobs = [cluster.submit(i) for i in range(4)]
            results = [job(timeout=TIMEOUT) for job in jobs]
            version = re.search(r'/3\.(\d+)', node_python)
            expected = (3, int(version.group(1))) if version else tuple(sys.version_info[:2])
            self.assertEqual(results, [(expected, i * 3) for i in range(4)],
                             [(j.status, j.exception) for j in jobs])
            self.assertTrue(cluster.close(timeout=TIMEOUT))

    def test_client_on_other_version(self):
        python = other_pythons()[0]
        with NodeProcess('127.0.0.2') as node:
            env = client_env(['127.0.0.2'], node_port=node.port)
            proc = run_client(os.path.join(EXAMPLES, 'obj_instances.py'), env,
                              timeout=TIMEOUT, cwd=EXAMPLES, python=python)
            self.assertEqual(proc.returncode, 0, proc.stderr)


def compute_square(n):
    return n * n


def compute_version(n):
    import sys
    return tuple(sys.version_info[:2]), n * 3


class IPv6Test(unittest.TestCase):

    def test_node_on_ipv6_loopback(self):
        try:
            support.free_port('::1')
        except OSError:
            self.skipTest('no IPv6 loopback')
        with NodeProcess('::1') as node:
            cluster = dispy.JobCluster(compute_square, nodes=['::1'], ip_addr='::1', port=0,
                                       node_port=node.port)
            self.addCleanup(cluster.close, terminate=True)
            job = cluster.submit(7)
            self.assertEqual(job(timeout=TIMEOUT), 49)
            self.assertEqual(job.ip_addr, '::1')


@unittest.skipUnless(shutil.which('openssl'), 'openssl command not available')
class TLSTest(unittest.TestCase):
    """The spec's usage: one self-signed key+certificate file on client and node."""

    timeout = 120

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix='dispytest-tls-')
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        cls.certfile = support.self_signed_cert(cls.dir)

    def test_same_certificate_on_both_sides(self):
        with NodeProcess('127.0.0.2', args=['--certfile', self.certfile]) as node:
            cluster = dispy.JobCluster(compute_square, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                       port=0, node_port=node.port, certfile=self.certfile)
            self.addCleanup(cluster.close, terminate=True)
            self.assertEqual(cluster.submit(9)(timeout=TIMEOUT), 81)

    def test_tls_with_nodes_on_other_python_versions(self):
        for python in other_pythons():
            with self.subTest(node=python):
                with NodeProcess('127.0.0.2', python=python,
                                 args=['--certfile', self.certfile]) as node:
                    cluster = dispy.JobCluster(compute_square, nodes=['127.0.0.2'],
                                               ip_addr='127.0.0.1', port=0,
                                               node_port=node.port, certfile=self.certfile)
                    try:
                        self.assertEqual(cluster.submit(5)(timeout=TIMEOUT), 25)
                    finally:
                        cluster.close(terminate=True)

    def test_ca_signed_certificates_and_required_client_certificate(self):
        ca, node_cert, client_cert, stranger = self.make_ca_certificates()
        with NodeProcess('127.0.0.2', args=['--certfile', node_cert, '--cafile', ca]) as node:
            good = dispy.JobCluster(compute_square, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                    port=0, node_port=node.port, certfile=client_cert,
                                    cafile=ca)
            try:
                self.assertEqual(good.submit(4)(timeout=TIMEOUT), 16)
            finally:
                good.close(terminate=True)
            # a client whose certificate the CA did not sign is refused by the node
            with self.assertLogs('dispy', 'WARNING') as logs:
                bad = dispy.JobCluster(compute_square, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                       port=0, node_port=node.port, certfile=stranger,
                                       cafile=ca)
                self.addCleanup(bad.close, terminate=True)
                self.assertIsNone(bad.submit(4)(timeout=2))
            self.assertTrue(any('127.0.0.2' in l for l in logs.output), logs.output)
            self.assertTrue(wait_until(lambda: 'refused' in node.stderr(), 20), node.output())

    def make_ca_certificates(self):
        """A CA, a node and a client certificate it signed, and a self-signed stranger
        (each file holds key and certificate)."""
        d = tempfile.mkdtemp(prefix='dispytest-ca-', dir=self.dir)

        def openssl(*args):
            subprocess.run(['openssl'] + list(args), check=True, capture_output=True,
                           timeout=60, cwd=d)
        openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out',
                'ca.pem', '-days', '2', '-subj', '/CN=dispy-test-ca')
        paths = []
        for name in ('node', 'client'):
            openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', name + '.key', '-out',
                    name + '.csr', '-subj', '/CN=dispy-' + name)
            openssl('x509', '-req', '-in', name + '.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key',
                    '-CAcreateserial', '-out', name + '.crt', '-days', '2')
            path = os.path.join(d, name + '.pem')
            with open(path, 'w') as out:
                for part in (name + '.key', name + '.crt'):
                    with open(os.path.join(d, part)) as f:
                        out.write(f.read())
            paths.append(path)
        stranger = os.path.join(d, 'stranger.pem')
        openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', stranger, '-out',
                stranger, '-days', '2', '-subj', '/CN=stranger')
        return [os.path.join(d, 'ca.pem')] + paths + [stranger]

    def test_tls_client_meets_plain_node_with_clear_errors(self):
        with NodeProcess('127.0.0.2') as node:
            with self.assertLogs('dispy', 'WARNING') as logs:
                cluster = dispy.JobCluster(compute_square, nodes=['127.0.0.2'],
                                           ip_addr='127.0.0.1', port=0, node_port=node.port,
                                           certfile=self.certfile)
                self.addCleanup(cluster.close, terminate=True)
                wait_until(lambda: any('127.0.0.2' in l for l in logs.output), 20)
            self.assertTrue(any('TLS' in l for l in logs.output), logs.output)
            self.assertTrue(wait_until(lambda: 'TLS' in node.stderr(), 20), node.output())

    def test_plain_client_meets_tls_node_with_clear_errors(self):
        with NodeProcess('127.0.0.2', args=['--certfile', self.certfile]) as node:
            with self.assertLogs('dispy', 'WARNING') as logs:
                cluster = dispy.JobCluster(compute_square, nodes=['127.0.0.2'],
                                           ip_addr='127.0.0.1', port=0, node_port=node.port)
                self.addCleanup(cluster.close, terminate=True)
                wait_until(lambda: any('127.0.0.2' in l for l in logs.output), 20)
            self.assertTrue(any('TLS' in l for l in logs.output), logs.output)
            self.assertTrue(wait_until(lambda: 'refused' in node.stderr(), 20))


def _kill(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


if __name__ == '__main__':
    unittest.main()
