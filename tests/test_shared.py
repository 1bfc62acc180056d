"""SharedJobCluster through a real ``dispyscheduler.py`` (spec 002 §1.2), on loopback.

The scheduler runs on 127.0.0.1 (``support.SchedulerProcess``: the nodes named with
``-n``, no announcement port), nodes on 127.0.0.2 and 127.0.0.3; clusters run in this
process or in client scripts (``support.run_client``).  Network-namespace tests with
default discovery and ports are in test_shared_netns.py.

Classes, by topic:

    SharedApiTest      a JobCluster script's features through the scheduler: results,
                       callbacks, cluster_status, depends and setup, dispy_send_file,
                       provisional results, submit_node, send_file, NodeAllocate
                       subclasses (allocate() runs here), set_node_cpus, cancel
    SharedPolicyTest   two clusters on one node: --early_cluster_scheduler keeps the
                       first cluster first, the fair policy interleaves; exclusive
                       clusters do not overlap
    SharedFaultTest    wrong secret; malformed, unknown and oversized messages; setup
                       that fails on every node; a node killed (reentrant); a client
                       killed (recover_jobs at the scheduler); the scheduler killed and
                       restarted
"""

import contextlib
import functools
import io
import os
import shutil
import signal
import socket
import tempfile
import textwrap
import threading
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob, DispyNode, NodeAllocate

SCHED_IP = '127.0.0.1'
NODE_IP = '127.0.0.2'
OTHER_IP = '127.0.0.3'
T = 30.0


# ================================================================================
# Computations (shipped as source)
# ================================================================================

def where(x):
    return x, dispy_node_ip_addr  # noqa: F821 (job namespace)


def nap(x, seconds):
    import time
    start = time.time()
    time.sleep(seconds)
    return x, start, time.time(), dispy_node_ip_addr  # noqa: F821


def read_setup(x):
    return x, SETUP_TEXT  # noqa: F821 (made by setup)


def load_text(path):
    global SETUP_TEXT
    with open(path) as f:
        SETUP_TEXT = f.read()
    return 0


def sends_file_and_provisional(name):
    with open(name, 'w') as f:
        f.write('from the node')
    dispy_send_file(name)  # noqa: F821
    dispy_provisional_result('halfway')  # noqa: F821
    return 'done'


def logged_nap(x, seconds, log):
    import time
    with open(log, 'a') as f:
        f.write('%s\n' % x)
    time.sleep(seconds)
    return x


def echo_big(data):
    return data[::-1]


def read_with_depends(name):
    with open(name) as f:
        return f.read()


def read_sent(name):
    with open(name) as f:
        return f.read()


class Recorder:
    """cluster_status calls, in order, from the notifier thread."""

    def __init__(self):
        self.events = []
        self.cond = threading.Condition()

    def __call__(self, status, node, job):
        with self.cond:
            self.events.append((status, node.ip_addr if node else None,
                                job.id if job else None))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout=T):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.events), timeout)


class OnlyFirstNode(NodeAllocate):
    """A subclass: its allocate() must run in this process."""

    calls = []

    def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=''):
        OnlyFirstNode.calls.append((ip_addr, os.getpid(), threading.current_thread().name))
        return 1 if ip_addr == NODE_IP else 0


# ================================================================================
# Test cases
# ================================================================================

class SchedulerTestCase(unittest.TestCase):
    """Nodes on NODE_IP and OTHER_IP (2 CPUs each, one port) and a scheduler using
    both, for the class; ``cluster()`` makes a SharedJobCluster closed at cleanup."""

    node_ips = (NODE_IP, OTHER_IP)
    scheduler_args = ()
    node_cpus = 2

    @classmethod
    def setUpClass(cls):
        port = None
        for _ in range(20):
            port = support.free_port(NODE_IP)
            if all(support.tcp_free(ip, port) for ip in cls.node_ips):
                break
        cls.nodes = []
        try:
            for ip in cls.node_ips:
                cls.nodes.append(support.NodeProcess(ip, port=port, cpus=cls.node_cpus).start())
            cls.sched = support.SchedulerProcess(SCHED_IP, nodes=cls.node_ips, node_port=port,
                                                 args=cls.scheduler_args).start()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for proc in getattr(cls, 'nodes', []) + [getattr(cls, 'sched', None)]:
            if proc is not None:
                proc.stop()

    def cluster(self, computation, **kwargs):
        kwargs.setdefault('nodes', list(self.node_ips))
        kwargs.setdefault('scheduler_node', SCHED_IP)
        kwargs.setdefault('scheduler_port', self.sched.port)
        kwargs.setdefault('recover_file', False)
        cluster = dispy.SharedJobCluster(computation, **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def finished(self, job, timeout=T):
        result = job(timeout=timeout)
        self.assertEqual(job.status, DispyJob.Finished,
                         'job %s: %s %s\n%s' % (job.id, job.status, job.exception,
                                                self.sched.output()[-3000:]))
        return result

    def tmpdir(self):
        return support.temp_folder(self, 'dispytest-shared-')


class SharedApiTest(SchedulerTestCase):

    def test_results_callbacks_and_status(self):
        """Jobs run on both nodes; the callback gets every job, cluster_status sees both
        nodes initialized and each job's Running and Finished; print_status lists the
        nodes; job ids set by submit_job_id stay."""
        done, recorder = [], Recorder()
        cluster = self.cluster(where, callback=done.append, cluster_status=recorder)
        self.assertTrue(recorder.wait_for(lambda ev: {ip for s, ip, _ in ev
                                                      if s == DispyNode.Initialized}
                                          == set(self.node_ips)))
        jobs = [cluster.submit(i) for i in range(30)]
        jobs.append(cluster.submit_job_id('named', 'x'))
        results = [self.finished(job) for job in jobs]
        self.assertEqual([r[0] for r in results], list(range(30)) + ['x'])
        self.assertEqual({r[1] for r in results}, set(self.node_ips))
        self.assertEqual([j.ip_addr for j in jobs], [r[1] for r in results])
        self.assertEqual(jobs[-1].id, 'named')
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(sorted(id(j) for j in done), sorted(id(j) for j in jobs))
        self.assertTrue(recorder.wait_for(lambda ev: {ip for s, ip, _ in ev
                                                      if s == DispyNode.Initialized}
                                          == set(self.node_ips)))
        finished = [e for e in recorder.events if e[0] == DispyJob.Finished]
        self.assertEqual(len(finished), 31)
        status = cluster.status()
        self.assertEqual(sorted(n['ip_addr'] for n in status['nodes']), list(self.node_ips))
        self.assertEqual(sum(n['jobs_done'] for n in status['nodes']), 31)
        self.assertTrue(cluster.close(timeout=T))

    def test_depends_setup_send_file_and_provisional(self):
        """A depends file read by setup into a global the jobs see; a file a job sends
        lands in the client's working folder; a provisional result reaches the
        callback before the final one."""
        folder = self.tmpdir()
        text_file = os.path.join(folder, 'dispytest_setup.txt')
        with open(text_file, 'w') as f:
            f.write('set up from a file')
        cluster = self.cluster(read_setup, depends=[text_file],
                               setup=functools.partial(load_text, 'dispytest_setup.txt'))
        jobs = [cluster.submit(i) for i in range(4)]
        for i, job in enumerate(jobs):
            self.assertEqual(self.finished(job), (i, 'set up from a file'))
        self.assertTrue(cluster.close(timeout=T))

        seen = []
        cwd = os.getcwd()
        os.chdir(folder)
        self.addCleanup(os.chdir, cwd)
        cluster = self.cluster(sends_file_and_provisional,
                               callback=lambda job: seen.append((job.status, job.result)))
        job = cluster.submit('dispytest_from_node.txt')
        self.assertEqual(self.finished(job), 'done')
        self.assertTrue(cluster.wait(timeout=T))
        self.assertIn((DispyJob.ProvisionalResult, 'halfway'), seen)
        self.assertEqual(seen[-1], (DispyJob.Finished, 'done'))
        self.assertEqual(support.read_file(os.path.join(folder, 'dispytest_from_node.txt')),
                         'from the node')
        self.assertTrue(cluster.close(timeout=T))

    def test_submit_node_send_file_and_node_methods(self):
        """submit_node runs there; send_file reaches the node; set_node_cpus changes
        nothing on shared nodes (-1); deallocate_node stops jobs going there."""
        recorder = Recorder()
        folder = self.tmpdir()
        path = os.path.join(folder, 'dispytest_put.txt')
        with open(path, 'w') as f:
            f.write('put by send_file')
        cluster = self.cluster(where, cluster_status=recorder)
        self.assertTrue(recorder.wait_for(lambda ev: {ip for s, ip, _ in ev
                                                      if s == DispyNode.Initialized}
                                          == set(self.node_ips)))
        jobs = [cluster.submit_node(OTHER_IP, i) for i in range(4)]
        self.assertEqual([self.finished(j) for j in jobs], [(i, OTHER_IP) for i in range(4)])
        self.assertEqual(cluster.send_file(path, NODE_IP), 0)
        self.assertEqual(cluster.send_file(path, '127.0.0.9'), -1)
        self.assertEqual(cluster.set_node_cpus(NODE_IP, 1), -1)
        self.assertEqual(cluster.deallocate_node(OTHER_IP), 0)
        jobs = [cluster.submit(i) for i in range(6)]
        self.assertEqual({self.finished(j)[1] for j in jobs}, {NODE_IP})
        self.assertTrue(cluster.close(timeout=T))

        cluster = self.cluster(read_sent)
        job = cluster.submit_node(NODE_IP, 'dispytest_put.txt')
        self.assertEqual(job(timeout=T), None)      # a new computation's folder: not there
        self.assertEqual(job.status, DispyJob.Terminated)

    def test_node_allocate_subclass_runs_in_the_client(self):
        """The scheduler asks this program about each node: allocate() runs here, and
        only the node it accepts (with 1 CPU) gets jobs."""
        OnlyFirstNode.calls = []
        cluster = self.cluster(where, nodes=[OnlyFirstNode('127.0.0.*')])
        jobs = [cluster.submit(i) for i in range(6)]
        self.assertEqual({self.finished(j)[1] for j in jobs}, {NODE_IP})
        self.assertEqual({ip for ip, _, _ in OnlyFirstNode.calls}, set(self.node_ips))
        self.assertEqual({pid for _, pid, _ in OnlyFirstNode.calls}, {os.getpid()})
        status = cluster.status()
        self.assertEqual([(n['ip_addr'], n['cpus']) for n in status['nodes']], [(NODE_IP, 1)])

    def test_big_arguments_and_results_and_job_depends(self):
        """20 MB each way through the scheduler; a per-job dispy_job_depends file."""
        cluster = self.cluster(echo_big)
        data = os.urandom(20 << 20)
        job = cluster.submit(data)
        self.assertEqual(self.finished(job, 60), data[::-1])
        folder = self.tmpdir()
        path = os.path.join(folder, 'dispytest_job_dep.txt')
        with open(path, 'w') as f:
            f.write('per job')
        other = self.cluster(read_with_depends)
        job = other.submit('dispytest_job_dep.txt', dispy_job_depends=[path])
        self.assertEqual(self.finished(job), 'per job')

    def test_cancel_queued_and_running(self):
        """cancel: a running job is killed on its node, a queued one never runs."""
        cluster = self.cluster(nap, nodes=[NODE_IP])
        jobs = [cluster.submit(i, 30) for i in range(8)]
        self.assertTrue(support.wait_until(lambda: jobs[0].status == DispyJob.Running, T))
        for job in jobs:
            self.assertEqual(cluster.cancel(job), 0)
        for job in jobs:
            job(timeout=T)
            self.assertEqual(job.status, DispyJob.Cancelled)
        self.assertTrue(cluster.close(timeout=T))


@unittest.skipUnless(shutil.which('openssl'), 'openssl not installed: no certificate for TLS')
class SharedTlsTest(SchedulerTestCase):
    """TLS both ways: program ↔ scheduler (--cluster_certfile) and scheduler ↔ nodes
    (--node_certfile, the nodes' --certfile)."""

    node_ips = (NODE_IP,)

    @classmethod
    def setUpClass(cls):
        cls.certdir = tempfile.mkdtemp(prefix='dispytest-tls-')
        cls.cert = support.self_signed_cert(cls.certdir)
        port = support.free_port(NODE_IP)
        cls.nodes = [support.NodeProcess(NODE_IP, port=port, cpus=1, secret='n',
                                         args=['--certfile', cls.cert]).start()]
        try:
            cls.sched = support.SchedulerProcess(
                SCHED_IP, nodes=[NODE_IP], node_port=port,
                args=['--node_certfile', cls.cert, '--node_secret', 'n',
                      '--cluster_certfile', cls.cert, '--cluster_secret', 'c']).start()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        shutil.rmtree(cls.certdir, ignore_errors=True)

    def test_jobs_over_tls(self):
        cluster = self.cluster(where, certfile=self.cert, secret='c')
        self.assertEqual(self.finished(cluster.submit(5)), (5, NODE_IP))
        plain = self.cluster(where, secret='c')
        job = plain.submit(6)
        job(timeout=T)
        self.assertEqual(job.status, DispyJob.Terminated, 'a plain program got in')


class ConfigTest(unittest.TestCase):
    """--save_config writes the options (mode 0600: secrets) and exits; --config reads
    them back; the 4.15 option names parse."""

    def test_save_and_load_config(self):
        import dispyscheduler
        folder = support.temp_folder(self, 'dispytest-conf-')
        path = os.path.join(folder, 'sched.conf')
        argv = ['--save_config', path, '--cluster_secret', 's1', '--node_secret', 's2',
                '-n', '127.0.0.2', '--fair_cluster_scheduler', '--zombie_interval', '2',
                '--cooperative', '--cleanup_nodes', '--httpd', '--ipv4_udp_multicast',
                '--pulse_interval', '3', '--ping_interval', '4', '--msg_timeout', '7',
                '--max_file_size', '1m', '-p', '5555', '--daemon', '-d']
        with self.assertRaises(SystemExit) as done:
            dispyscheduler.configure(argv)
        self.assertEqual(done.exception.code, 0)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        config = dispyscheduler.configure(['--config', path])
        self.assertEqual((config.cluster_secret, config.node_secret, config.nodes,
                          config.policy, config.zombie_interval, config.port,
                          config.max_file_size, config.cooperative, config.cleanup_nodes),
                         ('s1', 's2', ['127.0.0.2'], 'fair', 120.0, 5555, 1 << 20, True, True))
        # the command line wins over the file
        self.assertEqual(dispyscheduler.configure(['--config', path, '-p', '6666']).port, 6666)
        with self.assertRaises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            dispyscheduler.configure(['--fair_cluster_scheduler', '--early_cluster_scheduler'])


class CooperativeTest(SchedulerTestCase):
    node_ips = (NODE_IP,)
    scheduler_args = ('--cooperative',)

    def test_set_node_cpus_with_cooperative(self):
        recorder = Recorder()
        cluster = self.cluster(nap, cluster_status=recorder)
        self.assertTrue(recorder.wait_for(lambda ev: any(s == DispyNode.Initialized
                                                         for s, _, _ in ev)))
        self.assertEqual(cluster.set_node_cpus(NODE_IP, 1), 1)
        jobs = [cluster.submit(i, 0.3) for i in range(3)]
        spans = [self.finished(job)[1:3] for job in jobs]
        # one CPU: no two jobs at once
        spans.sort()
        self.assertTrue(all(a[1] <= b[0] + 0.05 for a, b in zip(spans, spans[1:])), spans)


class SharedPolicyTest(unittest.TestCase):
    """One node with one CPU; cluster A queues many jobs, then cluster B a few."""

    def run_policy(self, args):
        port = support.free_port(NODE_IP)
        with support.NodeProcess(NODE_IP, port=port, cpus=1) as node, \
                support.SchedulerProcess(SCHED_IP, nodes=[NODE_IP], node_port=port,
                                         args=args) as sched:
            first = dispy.SharedJobCluster(nap, nodes=[NODE_IP], scheduler_node=SCHED_IP,
                                           scheduler_port=sched.port, recover_file=False)
            self.addCleanup(support.close_now, first)
            a_jobs = [first.submit(('a', i), 0.05) for i in range(16)]
            self.assertEqual(a_jobs[0](timeout=T)[0], ('a', 0), node.output())
            second = dispy.SharedJobCluster(nap, nodes=[NODE_IP], scheduler_node=SCHED_IP,
                                            scheduler_port=sched.port, recover_file=False)
            self.addCleanup(support.close_now, second)
            b_jobs = [second.submit(('b', i), 0.05) for i in range(4)]
            results = [j(timeout=T) for j in a_jobs + b_jobs]
            self.assertTrue(all(j.status == DispyJob.Finished for j in a_jobs + b_jobs),
                            sched.output()[-3000:])
            order = [r[0][0] for r in sorted(results, key=lambda r: r[1])]
            self.assertTrue(first.close(timeout=T) and second.close(timeout=T))
            return ''.join(order)

    def test_early_keeps_first_cluster_first(self):
        order = self.run_policy(['--early_cluster_scheduler'])
        # at most the one slot of the node's window that the first cluster's own window
        # leaves free (B's, not measured yet, is larger) carries a job of B early
        self.assertLessEqual(order[:16].count('b'), 1, order)

    def test_fair_interleaves(self):
        order = self.run_policy(['--fair_cluster_scheduler'])
        # B's jobs run long before A's are done (A had 15 queued when B came)
        self.assertLess(order.rindex('b'), 16, order)

    def test_exclusive_runs_alone(self):
        """An exclusive cluster created while another runs starts only after it closed;
        a cluster created meanwhile waits behind it."""
        port = support.free_port(NODE_IP)
        with support.NodeProcess(NODE_IP, port=port, cpus=2), \
                support.SchedulerProcess(SCHED_IP, nodes=[NODE_IP], node_port=port) as sched:
            def make(exclusive=False):
                cluster = dispy.SharedJobCluster(nap, nodes=[NODE_IP], scheduler_node=SCHED_IP,
                                                 scheduler_port=sched.port, recover_file=False,
                                                 exclusive=exclusive)
                self.addCleanup(support.close_now, cluster)
                return cluster
            first = make()
            a_jobs = [first.submit('a', 0.3) for _ in range(4)]
            self.assertEqual(a_jobs[0](timeout=T)[0], 'a')
            alone = make(exclusive=True)
            x_jobs = [alone.submit('x', 0.1) for _ in range(4)]
            # its turn is taken when the scheduler has it (CLUSTER_READY): before the next
            self.assertTrue(support.wait_until(lambda: alone._scheduler.ready, T))
            late = make()
            c_jobs = [late.submit('c', 0.1) for _ in range(2)]
            for job in a_jobs:
                self.assertEqual(job(timeout=T)[0], 'a')
            closed_at = time.time()
            self.assertTrue(first.close(timeout=T))
            for job in x_jobs:
                job(timeout=T)
            self.assertTrue(all(j.status == DispyJob.Finished for j in x_jobs),
                            [(j.status, j.exception) for j in x_jobs] + [sched.output()[-3000:]])
            spans_x = [job.result[1:3] for job in x_jobs]
            self.assertGreaterEqual(min(s for s, _ in spans_x), closed_at - 0.05)
            self.assertTrue(alone.close(timeout=T))
            spans_c = [job(timeout=T)[1:3] for job in c_jobs]
            self.assertGreaterEqual(min(s for s, _ in spans_c), max(e for _, e in spans_x))
            self.assertTrue(late.close(timeout=T))


class SharedFaultTest(SchedulerTestCase):
    node_ips = (NODE_IP, OTHER_IP)
    scheduler_args = ('--cluster_secret', 'right')

    def test_wrong_secret_is_refused_clearly(self):
        cluster = self.cluster(where, secret='wrong')
        job = cluster.submit(1)
        job(timeout=T)
        self.assertEqual(job.status, DispyJob.Terminated)
        self.assertIn('secret', job.exception)
        good = self.cluster(where, secret='right')
        self.assertEqual(self.finished(good.submit(2))[0], 2)

    def raw(self, secret='right'):
        sock = socket.create_connection((SCHED_IP, self.sched.port), timeout=5)
        channel = dispy.handshake(sock, secret, True, {'role': 'client'}, timeout=5)
        self.addCleanup(channel.close)
        return channel

    def test_malformed_unknown_and_oversized_messages(self):
        """Garbage from an authenticated peer: an unknown kind is ignored, a malformed
        CLUSTER is refused with CLUSTER_READY, an oversized frame closes that one
        connection; the scheduler serves the next cluster as ever."""
        def refusal(*msgs):
            channel = self.raw()
            channel.send([dispy.Msg.CLIENT({'id': 'x', 'cluster': os.urandom(8).hex()})])
            self.assertEqual(channel.recv()[0][0], 'NODE')
            channel.send(list(msgs))
            reply = channel.recv()
            self.assertEqual(reply[0][0], 'CLUSTER_READY')
            return reply[0][1]
        self.assertIn('refused', refusal(('NOT_A_KIND', 1),
                                         dispy.Msg.CLUSTER({'specs': 'nonsense'})))
        self.assertIn('not sent with it', refusal(dispy.Msg.CLUSTER(
            {'name': 'x', 'files': [], 'allocations': [],
             'specs': [{'name': 'x', 'files': ['../../etc/passwd']}]})))
        big = self.raw()
        big.send([dispy.Msg.CLIENT({'id': 'y', 'cluster': 'raw-2'})])
        big.recv()
        big.peer_max_frame = 1 << 40        # lie about the scheduler's limit
        try:
            big.send([('JOB', 1, 0, 0, b'x' * (300 << 20), None)])
            big.sock.settimeout(10)
            self.assertRaises((OSError, dispy.ProtocolError), big.recv)
        except OSError:
            pass        # the scheduler closed the connection while we were still sending
        cluster = self.cluster(where, secret='right')
        self.assertEqual(self.finished(cluster.submit(3))[0], 3)

    def test_bad_job_options_and_arguments_end_that_job_only(self):
        """A JOB whose options or arguments are malformed ends Terminated at once (it
        holds no slot on a node); the cluster's other jobs run."""
        cluster = self.cluster(where, secret='right')
        self.assertEqual(self.finished(cluster.submit(0))[0], 0)     # nodes set up
        conn = cluster._scheduler.conn
        with cluster._scheduler.lock:
            conn.send(dispy.Msg.JOB(10 ** 6, 0, 0, b'not a pickle', {'timeout': 'x'}))
            conn.send(dispy.Msg.JOB(10 ** 6 + 1, 0, 0, None, None))
        replies = []
        original = dispy.RemoteScheduler._on_done

        def spy(scheduler, msg, loaded, acks):
            replies.append(msg)
            return original(scheduler, msg, loaded, acks)
        dispy.RemoteScheduler.handlers['DONE'] = spy
        self.addCleanup(dispy.RemoteScheduler.handlers.__setitem__, 'DONE', original)
        self.assertTrue(support.wait_until(
            lambda: {m.key for m in replies} >= {10 ** 6, 10 ** 6 + 1}, T))
        for msg in replies:
            if msg.key >= 10 ** 6:
                self.assertEqual(msg.status, DispyJob.Terminated)
                self.assertIn('malformed', msg.exception)
        jobs = [cluster.submit(i) for i in range(1, 20)]
        self.assertEqual([self.finished(j)[0] for j in jobs], list(range(1, 20)))

    def test_setup_failing_everywhere_is_reported(self):
        folder = self.tmpdir()
        script = os.path.join(folder, 'client.py')
        with open(script, 'w') as f:
            f.write(textwrap.dedent('''
                import sys, dispy
                def failing_setup():
                    raise RuntimeError('this setup always fails')
                def compute(x):
                    return x
                cluster = dispy.SharedJobCluster(compute, nodes=%r, setup=failing_setup,
                                                 scheduler_node=%r, scheduler_port=%d,
                                                 secret='right', recover_file=False)
                job = cluster.submit(1)
                job(timeout=15)
                print('status', job.status, flush=True)
                cluster.close(terminate=True)
            ''' % (list(self.node_ips), SCHED_IP, self.sched.port)))
        result = support.run_client(script, dict(os.environ, PYTHONPATH=support.ROOT),
                                    timeout=60, cwd=folder)
        text = result.stdout + result.stderr
        for ip in self.node_ips:
            self.assertRegex(text, 'setup .*failed on node %s' % ip.replace('.', r'\.'))
        self.assertIn('this setup always fails', text)

    def test_node_killed_with_reentrant(self):
        """A node killed while jobs run there: they run again elsewhere, exactly once."""
        port = support.free_port('127.0.0.4')
        extra = support.NodeProcess('127.0.0.4', port=port, cpus=2).start()
        self.addCleanup(extra.stop)
        sched = support.SchedulerProcess(SCHED_IP, nodes=['127.0.0.4', NODE_IP],
                                         node_port=port, args=['--pulse_interval', '1'])
        if not support.tcp_free(NODE_IP, port):
            self.skipTest('port %d taken on %s' % (port, NODE_IP))
        other = support.NodeProcess(NODE_IP, port=port, cpus=2).start()
        self.addCleanup(other.stop)
        sched.start()
        self.addCleanup(sched.stop)
        cluster = dispy.SharedJobCluster(nap, nodes=['127.0.0.4', NODE_IP], reentrant=True,
                                         scheduler_node=SCHED_IP, scheduler_port=sched.port,
                                         recover_file=False)
        self.addCleanup(support.close_now, cluster)
        jobs = [cluster.submit(i, 1.0) for i in range(8)]
        self.assertTrue(support.wait_until(
            lambda: any(j.status == DispyJob.Running and j.ip_addr == '127.0.0.4'
                        for j in jobs), T), sched.output()[-2000:])
        extra.kill()
        results = [j(timeout=60) for j in jobs]
        self.assertTrue(all(j.status == DispyJob.Finished for j in jobs),
                        [(j.status, j.exception) for j in jobs])
        self.assertEqual(sorted(r[0] for r in results), list(range(8)))
        self.assertTrue(cluster.close(timeout=T))


class RestartTest(unittest.TestCase):
    """The scheduler killed and started again on its folder; a client killed and its
    jobs recovered through the scheduler."""

    def setUp(self):
        port = support.free_port(NODE_IP)
        self.node = support.NodeProcess(NODE_IP, port=port, cpus=2).start()
        self.addCleanup(self.node.stop)
        self.sched = support.SchedulerProcess(SCHED_IP, nodes=[NODE_IP], node_port=port)
        self.sched.start()
        self.addCleanup(self.sched.stop)

    def through_restart(self, count, seconds, restart):
        """``count`` jobs of ``seconds`` each; once two run, ``restart()``: every job
        still ends Finished with its result, and each ran once (a log on the node)."""
        cluster = dispy.SharedJobCluster(logged_nap, nodes=[NODE_IP], scheduler_node=SCHED_IP,
                                         scheduler_port=self.sched.port, recover_file=False)
        self.addCleanup(support.close_now, cluster)
        log = os.path.join(self.node.dir, 'ran.log')
        jobs = [cluster.submit(i, seconds, log) for i in range(count)]
        self.assertTrue(support.wait_until(lambda: sum(j.status == DispyJob.Running
                                                       for j in jobs) >= 2, T))
        restart()
        results = [j(timeout=60) for j in jobs]
        self.assertTrue(all(j.status == DispyJob.Finished for j in jobs),
                        [(j.status, j.exception) for j in jobs] + [self.sched.output()[-3000:]])
        self.assertEqual(sorted(results), list(range(count)))
        self.assertEqual(sorted(map(int, support.read_file(log).split())), list(range(count)),
                         'a job ran twice or never')
        self.assertTrue(cluster.close(timeout=T))

    def test_scheduler_killed_and_started_again_loses_nothing(self):
        self.through_restart(6, 1.5, lambda: (self.sched.kill(), self.sched.start()))

    def test_restart_with_results_before_their_jobs_come_back(self):
        """The program's upload of its cluster after the restart is slow (a delay in
        _send_cluster stands in for big depends on a slow link): the jobs end on the
        node before the program sends them again; their kept results count."""
        original = dispy.RemoteScheduler._send_cluster
        slow = threading.Event()

        def slow_send(scheduler, conn):
            if slow.is_set():
                time.sleep(4)
            return original(scheduler, conn)
        dispy.RemoteScheduler._send_cluster = slow_send
        self.addCleanup(setattr, dispy.RemoteScheduler, '_send_cluster', original)
        self.through_restart(2, 1.5, lambda: (self.sched.kill(), slow.set(),
                                              self.sched.start()))

    def test_stopped_scheduler_leaves_the_nodes_running_its_jobs(self):
        """SIGTERM (a service stop) does not release the nodes: started again, the
        scheduler goes on with the jobs they ran meanwhile."""
        self.through_restart(4, 1.0, lambda: (self.sched.signal(signal.SIGTERM),
                                              self.sched.wait(T), self.sched.start()))

    def test_client_killed_then_recover_jobs(self):
        folder = support.temp_folder(self, 'dispytest-shared-')
        script = os.path.join(folder, 'client.py')
        with open(script, 'w') as f:
            f.write(textwrap.dedent('''
                import os, dispy
                def compute(x):
                    import time
                    time.sleep(1.5)
                    return x * 10
                cluster = dispy.SharedJobCluster(compute, nodes=[%r], scheduler_node=%r,
                                                 scheduler_port=%d, recover_file='rec.dat')
                jobs = [cluster.submit(i) for i in range(4)]
                while not any(j.status == dispy.DispyJob.Running for j in jobs):
                    import time; time.sleep(0.05)
                print('submitted', flush=True)
                os._exit(3)
            ''' % (NODE_IP, SCHED_IP, self.sched.port)))
        result = support.run_client(script, dict(os.environ, PYTHONPATH=support.ROOT),
                                    timeout=60, cwd=folder)
        self.assertIn('submitted', result.stdout, result.stderr)
        cwd = os.getcwd()
        os.chdir(folder)
        self.addCleanup(os.chdir, cwd)
        jobs = dispy.recover_jobs('rec.dat', timeout=30)
        self.assertEqual(sorted((j.id, j.status, j.result, j.ip_addr) for j in jobs),
                         [(i + 1, DispyJob.Finished, i * 10, NODE_IP) for i in range(4)])
        self.assertFalse(os.path.exists('rec.dat'), 'every job accounted for: file removed')


if __name__ == '__main__':
    unittest.main()
