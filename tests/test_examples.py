"""Every program in examples/ runs, unchanged, in the suite (spec 000 §6.1–§6.13).

``ExamplesTest`` runs the examples as client scripts (``support.run_client``) against one
shared node on 127.0.0.2, pointed at it through the DISPY_* environment
(``support.client_env``), each in a temporary working directory.  ``LocalClusterTest``
runs ``examples/local_cluster.py`` itself, which starts and stops its own node on
127.0.0.1.  sample.py, obj_instances.py, node_setup.py, node_shvars.py and
mapreduce.py also run on two nodes in tests/test_cluster.py (TwoNodesTest);
``test_every_example_is_run`` checks that no example is left out.
"""

import glob
import os
import re
import shutil
import tempfile
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy

EXAMPLES = os.path.join(support.ROOT, 'examples')
LOCAL_CLUSTER = os.path.join(EXAMPLES, 'local_cluster.py')
NODE_IP = '127.0.0.2'
TIMEOUT = 90


class ExamplesTest(unittest.TestCase):
    """The examples against one node (127.0.0.2, 2 CPUs) shared by the class."""

    timeout = 150

    @classmethod
    def setUpClass(cls):
        cls.node = support.NodeProcess(NODE_IP, cpus=2)
        cls.addClassCleanup(support.stop_node, cls.node)
        cls.node.start()
        cls.env = support.client_env([NODE_IP], node_port=cls.node.port)

    def tmpdir(self):
        path = tempfile.mkdtemp(prefix='dispytest-examples-')
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def run_example(self, name, args=(), cwd=None):
        """Runs examples/NAME in ``cwd`` (default: a fresh temporary folder); asserts
        exit status 0; returns (stdout, working directory)."""
        cwd = cwd or self.tmpdir()
        proc = support.run_client(os.path.join(EXAMPLES, name), self.env, timeout=TIMEOUT,
                                  cwd=cwd, args=args)
        self.assertEqual(proc.returncode, 0, 'stdout:\n%s\nstderr:\n%s\nnode:\n%s'
                         % (proc.stdout, proc.stderr, self.node.output()[-3000:]))
        return proc.stdout, cwd

    def test_web_monitor(self):
        """web_monitor.py (dispy.httpd): the monitor serves while the jobs run and says
        where; the progress line reaches the end; every job's result is printed."""
        port = support.free_port('127.0.0.1')
        proc = support.run_client(os.path.join(EXAMPLES, 'web_monitor.py'), self.env,
                                  timeout=TIMEOUT, cwd=self.tmpdir(), args=[str(port), '0.05'])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('dispy web monitor: http://127.0.0.1:%d/' % port, proc.stderr)
        self.assertIn('dispy: 20/20 jobs done (100.0%), 0 failed', proc.stderr)
        squares = re.findall(r'^job (\d+): (\d+) on ', proc.stdout, re.M)
        self.assertEqual(sorted(int(s) for _i, s in squares), [i * i for i in range(20)])

    def test_send_files(self):
        """send_files.py (6.7): each job's n.dat arrives in the client's folder."""
        out, cwd = self.run_example('send_files.py')
        received = re.findall(r'^job (\d+) results in file (\d+)\.dat: data of job (\d+) '
                              r'computed at', out, re.M)
        self.assertEqual(sorted(int(i) for i, _, _ in received), list(range(20)), out)
        self.assertTrue(all(a == b == c for a, b, c in received), out)
        self.assertNotIn('failed', out)
        # the example removes each file after reading it, and the cluster's recover
        # file goes with the clean close: nothing is left behind
        self.assertEqual(os.listdir(cwd), [])

    def test_job_scheduler(self):
        """job_scheduler.py (6.8): cluster_status + submit_node send each data file to
        the node and get its sha1 checksum."""
        out, _cwd = self.run_example('job_scheduler.py')
        self.assertIn('node %s with 2 CPUs available' % NODE_IP, out)
        sums = re.findall(r'^sha1sum for (data\d{3}): ([0-9a-f]{40})$', out, re.M)
        self.assertEqual(sorted(name for name, _ in sums),
                         ['data%03d' % i for i in range(10)], out)
        self.assertNotIn('but expected', out)
        self.assertIn('10 of 10 files processed, 0 failed', out)
        self.assertIn(NODE_IP, out.split('sha1sum for')[-1])     # print_status

    def test_bounded_submit(self):
        """bounded_submit.py (6.9): 200 jobs through a callback-bounded pipeline."""
        out, _cwd = self.run_example('bounded_submit.py')
        self.assertIn('200 jobs submitted, 200 done, 0 failed', out)
        self.assertRegex(out, r'%s.*\|\s+2\s+\|\s+200\s+\|' % re.escape(NODE_IP))

    def test_recover_jobs_then_node_is_free(self):
        """recover_jobs.py (6.11): a client crashes with 2 jobs running; recover_jobs()
        collects their results; the node is free again for the next client."""
        out, cwd = self.run_example('recover_jobs.py')
        self.assertRegex(out, r'client: \d jobs running; crashing now')
        results = sorted(int(r) for r in re.findall(r'^Job result: (\d+)$', out, re.M))
        self.assertEqual(results, [0, 1], out)
        self.assertEqual(os.listdir(cwd), [])
        # recover_jobs released the node: a new client gets it at once
        cluster = dispy.JobCluster(square, nodes=[NODE_IP], ip_addr='127.0.0.1', port=0,
                                   node_port=self.node.port)
        self.addCleanup(cluster.close, timeout=0, terminate=True)
        job = cluster.submit(9)
        self.assertEqual(job(timeout=30), 81, job.exception)

    def test_python_script(self):
        """python_script.py (6.2): the standalone dispy_program.py runs 50 times."""
        out, _cwd = self.run_example('python_script.py')
        runs = re.findall(r"^job (\d+): exit status 0, output: .*dispy_program called with "
                          r"\['(\d+)'\]$", out, re.M)
        self.assertEqual(sorted(int(i) for i, _ in runs), list(range(50)), out)
        self.assertTrue(all(i == arg for i, arg in runs))
        self.assertNotIn('failed', out)

    def test_callback_with_provisional_results(self):
        """callback.py (1.7): every job ends with a best value or cancelled by the
        callback once one job found a value below 0.005."""
        out, _cwd = self.run_example('callback.py')
        ends = re.findall(r'^job (\d+): (best ([\d.e-]+)|cancelled)$', out, re.M)
        self.assertEqual(sorted(int(i) for i, _, _ in ends), [0, 1, 2, 3], out)
        for _i, _end, best in ends:
            if best:
                self.assertTrue(0 <= float(best) <= 1, out)
        if any(end == 'cancelled' for _, end, _ in ends):
            self.assertRegex(out, r'computed: [\d.e-]+', 'cancelled without a good result')
        self.assertIn(NODE_IP, out)     # print_status


def square(n):
    return n * n


class LocalClusterTest(unittest.TestCase):
    """examples/local_cluster.py: its own node on 127.0.0.1, stopped afterwards."""

    timeout = 120

    def run_local(self, args, cwd=None, timeout=TIMEOUT):
        env = dict(os.environ)
        for name in list(env):
            if name.startswith('DISPY_'):
                del env[name]
        return support.run_client(LOCAL_CLUSTER, env, timeout=timeout, cwd=cwd, args=args)

    def test_sample_program(self):
        """local_cluster.py examples/sample.py: the canonical program (6.3) prints 20
        results and the node table for 127.0.0.1."""
        proc = self.run_local(['--cpus', '2', os.path.join(EXAMPLES, 'sample.py')])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        lines = re.findall(r'^\S+ executed job (\d+) at [\d.]+ with (\d+)$', proc.stdout, re.M)
        self.assertEqual(sorted(int(i) for i, _ in lines), list(range(20)), proc.stdout)
        self.assertTrue(all(5 <= int(n) <= 20 for _, n in lines))
        self.assertRegex(proc.stdout, r'127\.0\.0\.1.*\|\s+2\s+\|\s+20\s+\|')
        self.assertIn('serving at 127.0.0.1:', proc.stderr)

    def test_shared_clusters_through_a_scheduler(self):
        """local_cluster.py --scheduler examples/shared_programs.py: two SharedJobClusters
        through a private dispyscheduler get every result from the node."""
        proc = self.run_local(['--scheduler', os.path.join(EXAMPLES, 'shared_programs.py')])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        lines = re.findall(r'^(\d+): (\d+) on \S+, (\d+) on \S+$', proc.stdout, re.M)
        self.assertEqual([tuple(map(int, l)) for l in lines],
                         [(i, i * i, i ** 3) for i in range(10)], proc.stdout)
        self.assertIn('dispyscheduler (pid', proc.stderr)

    def test_command_line_tool(self):
        """local_cluster.py dispy.py -a "arg11 arg12" -a arg3 examples/dispy_program.py
        (6.1): one run per -a, each with its arguments."""
        proc = self.run_local(['dispy.py', '-a', 'arg11 arg12', '-a', 'arg3',
                               'examples/dispy_program.py'], cwd=support.ROOT)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn("dispy_program called with ['arg11', 'arg12']", proc.stdout)
        self.assertIn("dispy_program called with ['arg3']", proc.stdout)
        self.assertEqual(proc.stdout.count('exit status 0'), 2, proc.stdout)
        self.assertIn('127.0.0.1', proc.stdout)

    def test_environment_and_exit_status(self):
        """The example sees the DISPY_* variables of the private node; local_cluster.py
        exits with the example's status; no node process is left."""
        folder = tempfile.mkdtemp(prefix='dispytest-examples-')
        self.addCleanup(shutil.rmtree, folder, True)
        script = os.path.join(folder, 'show_env.py')
        with open(script, 'w') as f:
            f.write('import os, sys\n'
                    'for name in ("DISPY_NODES", "DISPY_IP_ADDR", "DISPY_PORT", '
                    '"DISPY_NODE_PORT"):\n'
                    '    print(name, os.environ.get(name))\n'
                    'print("cwd", os.getcwd())\n'
                    'sys.exit(7)\n')
        proc = self.run_local([script])
        self.assertEqual(proc.returncode, 7, proc.stdout + proc.stderr)
        self.assertIn('DISPY_NODES 127.0.0.1\n', proc.stdout)
        self.assertIn('DISPY_IP_ADDR 127.0.0.1\n', proc.stdout)
        self.assertIn('DISPY_PORT 0\n', proc.stdout)
        port = re.search(r'DISPY_NODE_PORT (\d+)', proc.stdout)
        self.assertIsNotNone(port, proc.stdout)
        self.assertIn('serving at 127.0.0.1:%s' % port.group(1), proc.stderr)
        self.assertIn('cwd %s\n' % os.path.realpath(folder), proc.stdout)
        pid = re.search(r'dispynode \(pid (\d+)\)', proc.stderr)
        self.assertIsNotNone(pid, proc.stderr)
        self.assertTrue(support.wait_until(lambda: not support.pid_alive(int(pid.group(1))), 10),
                        'the node of local_cluster.py is still running')

    def test_help(self):
        proc = self.run_local(['--help'])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        for option in ('--cpus', '--cwd', '--timeout', '--secret', 'example'):
            self.assertIn(option, proc.stdout)


class CoverageTest(unittest.TestCase):

    def test_every_example_is_run(self):
        """Each examples/*.py is run by this file, tests/test_cluster.py,
        tests/test_stream.py, tests/test_executor.py or one of the dispycos test files."""
        sources = ''
        for name in ('test_examples.py', 'test_cluster.py', 'test_dispycos.py',
                     'test_dispycos_examples.py', 'test_dispycos_setup.py',
                     'test_dispycos_httpd.py', 'test_stream.py', 'test_executor.py'):
            with open(os.path.join(support.ROOT, 'tests', name)) as f:
                sources += f.read()
        examples = sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXAMPLES, '*.py')))
        self.assertTrue(examples)
        # X_proc.py is a program X.py runs on its servers (dispycos_client5_proc.py)
        named = [name.replace('_proc.py', '.py') for name in examples]
        missing = [name for name in named if "'%s'" % name not in sources
                   and '/%s' % name not in sources]
        self.assertEqual(missing, [], 'examples not run by any test')


if __name__ == '__main__':
    unittest.main()
