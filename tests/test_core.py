"""The shared core: the message catalog, the worker threads, connections on the I/O
loop (plain and TLS, small and big frames, in order), a client whose thread count does
not grow with its nodes, clusters with their own secrets and certificates in one
program, and the Scheduler hosting a cluster that is not a JobCluster."""

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import unittest

from tests import support
from tests.support import NodeProcess, client_env, run_client

import dispy

TIMEOUT = 60


def echo_digest(data):
    import hashlib
    return hashlib.sha256(data).hexdigest(), len(data)


def compute_square(n):
    return n * n


class CatalogTest(unittest.TestCase):
    """Every message is built and read through its kind."""

    def test_build_read_replace_and_bulk(self):
        msg = dispy.Msg.JOB(7, 1, 2, b'x' * 10, None)
        self.assertEqual(msg, ('JOB', 7, 1, 2, b'x' * 10, None))
        job = dispy.Msg.JOB.read(msg)
        self.assertEqual((job.key, job.cluster, job.attempt), (7, 1, 2))
        self.assertEqual(dispy.message_bulk(msg), 10)
        result = dispy.Msg.result(3, 1, dispy.DispyJob.Cancelled, 'Cancelled')
        changed = dispy.Msg.RESULT.replace(result, status=dispy.DispyJob.Terminated)
        self.assertEqual(dispy.Msg.RESULT.read(changed).status, dispy.DispyJob.Terminated)
        self.assertEqual(dispy.Msg.RESULT.read(changed).exception, 'Cancelled')

    def test_wrong_arity_is_refused_both_ways(self):
        with self.assertRaises(TypeError):
            dispy.Msg.ACK(1, 2)
        with self.assertRaises(dispy.ProtocolError):
            dispy.Msg.ACK.read(('ACK', 1, 2, 3))

    def test_each_side_knows_every_kind_once(self):
        for table in (dispy.TO_NODE, dispy.TO_CLIENT):
            for name, kind in table.items():
                self.assertEqual(kind.name, name)
                self.assertEqual(len(set(kind.fields)), len(kind.fields))


class WorkerThreadsTest(unittest.TestCase):

    def test_bounded_and_strand_keeps_order(self):
        pool = dispy.WorkerThreads(3, 'test-pool')
        running, peak, lock = [0], [0], threading.Lock()
        release = threading.Event()
        done = threading.Semaphore(0)

        def task():
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            release.wait(5)
            with lock:
                running[0] -= 1
            done.release()
        for _ in range(10):
            pool.submit(task)
        self.assertTrue(support.wait_until(lambda: running[0] == 3, 10))
        with pool._cond:    # three threads, the other seven tasks wait for them
            self.assertEqual((pool._threads, len(pool._tasks)), (3, 7))
        release.set()
        for _ in range(10):
            self.assertTrue(done.acquire(timeout=10))
        self.assertEqual(peak[0], 3)
        strand, seen = dispy.Strand(pool), []
        for i in range(200):
            strand.submit(seen.append, i)
        strand.submit(done.release)
        self.assertTrue(done.acquire(timeout=10))
        self.assertEqual(seen, list(range(200)))


class LoopConnectionTest(unittest.TestCase):
    """Two authenticated ends over real sockets, each on an I/O loop."""

    def setUp(self):
        self.loop = dispy.IOLoop('test-loop')
        self.addCleanup(self.loop.stop)
        self.threads = dispy.WorkerThreads(4, 'test-worker')

    def pair(self, wrap=None):
        return support.loop_connection_pair(self, self.loop, self.threads, wrap)

    def exchange(self, ends):
        (a, _), (_b, got) = ends
        big = os.urandom(5 << 20)
        sent = []
        for i in range(300):
            sent.append(dispy.Msg.CANCEL(i, 1))
            if i == 100:
                sent.append(dispy.Msg.JOB(i, 1, 1, big, None))
        for msg in sent:
            self.assertTrue(a.send(msg))
        self.assertTrue(got.wait_for(len(sent)), len(got.msgs))
        self.assertEqual([m[:2] for m in got.msgs], [m[:2] for m in sent])
        job = [m for m in got.msgs if m[0] == 'JOB'][0]
        self.assertEqual(hashlib.sha256(job[4]).digest(), hashlib.sha256(big).digest())
        # the big frame (and what followed it) went to a worker thread, the rest not
        self.assertIn('test-loop', got.threads)
        self.assertTrue(any(name.startswith('test-worker') for name in got.threads))

    def test_small_and_big_frames_arrive_in_order(self):
        self.exchange(self.pair())

    @unittest.skipUnless(shutil.which('openssl'), 'openssl command not available')
    def test_tls_on_the_loop(self):
        folder = tempfile.mkdtemp(prefix='dispytest-core-tls-')
        self.addCleanup(shutil.rmtree, folder, True)
        cert = support.self_signed_cert(folder)
        server = dispy.make_ssl_context(True, cert)
        client = dispy.make_ssl_context(False, cert)

        def wrap(dialer, accepted):
            out = {}
            t = threading.Thread(target=lambda: out.setdefault(
                'a', server.wrap_socket(accepted, server_side=True)))
            t.start()
            d = client.wrap_socket(dialer, server_side=False)
            t.join(10)
            return d, out['a']
        ends = self.pair(wrap)
        self.assertIsInstance(ends[0][0].sock, dispy.ssl.SSLSocket)
        self.exchange(ends)

    def test_close_is_reported_once_to_both_ends(self):
        (a, ha), (_b, hb) = self.pair()
        a.send(dispy.Msg.RELEASE())
        a.close('done', flush=True)
        self.assertTrue(hb.closed.wait(10))
        self.assertTrue(ha.closed.wait(10))
        self.assertEqual(ha.reason, 'done')
        self.assertEqual(hb.msgs, [('RELEASE',)])
        self.assertFalse(a.send(dispy.Msg.RELEASE()))


class ThreadCountTest(unittest.TestCase):
    """The client's threads do not grow with its nodes (the I/O loop serves them all)."""

    timeout = 240
    NODES = 12

    def run_script(self, nodes, port):
        """The W7 client of bench/bench.py (and scale.py): 300 jobs over ``nodes`` once
        each is set up, and the client's peak thread count."""
        folder = tempfile.mkdtemp(prefix='dispytest-core-')
        self.addCleanup(shutil.rmtree, folder, True)
        proc = run_client(os.path.join(support.ROOT, 'bench', 'bench.py'),
                          client_env(nodes, node_port=port), timeout=120, cwd=folder,
                          args=['--run-workload', 'W7', '--impl', 'this', '--node-port',
                                str(port), '--node-addrs', ','.join(nodes), '--size', '300',
                                '--repo', support.ROOT])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        self.assertEqual(result['bad_results'], 0, result)
        return result

    def test_twelve_nodes_cost_no_more_threads_than_the_bound(self):
        addrs = ['127.0.0.%d' % (40 + i) for i in range(self.NODES)]
        port = support.free_port(addrs[0])
        nodes = [NodeProcess(addr, port=port, cpus=1) for addr in addrs]
        for node in nodes:
            self.addCleanup(node.stop)
            node.start()
        one = self.run_script(addrs[:1], port)
        many = self.run_script(addrs, port)
        self.assertEqual(many['nodes_used'], self.NODES)
        # main, sampler, hub loop, notifier, and at most POOL_THREADS workers
        self.assertLessEqual(many['peak_threads'], 4 + dispy.POOL_THREADS, many)
        self.assertLessEqual(many['peak_threads'], one['peak_threads'] + dispy.POOL_THREADS,
                             (one, many))


TWO_SECRETS_SCRIPT = r'''
import sys
import dispy

def where(n):
    return dispy_node_name, n * 2

ports = dict(zip(('alpha', 'beta'), map(int, sys.argv[1:3])))
certfile = sys.argv[3]
a = dispy.JobCluster(where, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                     node_port=ports['alpha'], secret='alpha')
b = dispy.JobCluster(where, nodes=['127.0.0.3'], ip_addr='127.0.0.1', port=0,
                     node_port=ports['beta'], secret='beta', certfile=certfile)
ja = [a.submit(i) for i in range(5)]
jb = [b.submit(i) for i in range(5)]
for name, jobs in (('alpha', ja), ('beta', jb)):
    for i, job in enumerate(jobs):
        assert job(timeout=60) is not None, (name, job.status, job.exception)
        print(name, job.ip_addr, job.result[1] == 2 * i)
a.close()
# with b still open, a's node is released: another program gets it at once
other = sys.argv[4]
proc = __import__('subprocess').run([sys.executable, other, str(ports['alpha'])],
                                    capture_output=True, text=True, timeout=90)
print(proc.stdout.strip() or proc.stderr[-2000:])
print('beta after', b.submit(21)(timeout=60)[1])
b.close()
'''

OTHER_PROGRAM_SCRIPT = r'''
import sys
import dispy

def where(n):
    return dispy_node_name, n * 2

c = dispy.JobCluster(where, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                     node_port=int(sys.argv[1]), secret='alpha')
job = c.submit(5)
print('other program', job(timeout=60) and job.result[1], job.ip_addr)
c.close()
'''


class ClusterParametersTest(unittest.TestCase):
    """Two clusters of one program, each with its own secret (and one with TLS),
    each reaching its own node; closing one frees its node while the other runs."""

    timeout = 180

    @unittest.skipUnless(shutil.which('openssl'), 'openssl command not available')
    def test_clusters_with_different_secrets_and_tls(self):
        folder = tempfile.mkdtemp(prefix='dispytest-core-')
        self.addCleanup(shutil.rmtree, folder, True)
        cert = support.self_signed_cert(folder)
        alpha = NodeProcess('127.0.0.2', secret='alpha')
        beta = NodeProcess('127.0.0.3', secret='beta', args=['--certfile', cert])
        for node in (alpha, beta):
            self.addCleanup(node.stop)
            node.start()
        env = client_env(['127.0.0.2'])
        for name in ('DISPY_NODES', 'DISPY_IP_ADDR', 'DISPY_PORT'):
            env.pop(name)
        other = os.path.join(folder, 'other_program.py')
        with open(other, 'w') as f:
            f.write(OTHER_PROGRAM_SCRIPT)
        proc = run_client(TWO_SECRETS_SCRIPT, env, timeout=150,
                          args=[str(alpha.port), str(beta.port), cert, other])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        lines = proc.stdout.split('\n')
        self.assertEqual(lines.count('alpha 127.0.0.2 True'), 5, proc.stdout + proc.stderr)
        self.assertEqual(lines.count('beta 127.0.0.3 True'), 5, proc.stdout + proc.stderr)
        self.assertIn('other program 10 127.0.0.2', lines, proc.stdout + proc.stderr)
        self.assertIn('beta after 42', lines, proc.stdout + proc.stderr)


class _HostedCluster(dispy.ClusterHooks):
    """A cluster that is not a JobCluster: what dispyscheduler hosts for a remote
    client.  It records the hook calls and whether the scheduler's lock was held."""

    def __init__(self, scheduler, node, port):
        self.scheduler = scheduler
        self.name = 'hosted'
        self.allocations = [dispy.NodeAllocate(node, port)]
        self.package = dispy.ComputePackage(compute_square, [], None, True, None,
                                            [globals()])
        self.events = []
        self.cond = scheduler.cond

    def _locked(self):
        return self.scheduler.lock._is_owned()

    def allocate(self, alloc, link):
        self.events.append(('allocate', self._locked()))
        return 1

    def computation(self, alloc):
        self.events.append(('computation', self._locked()))
        return self.package.for_node(alloc)

    def job_ended(self, job, link):
        self.events.append(('ended', job.result))
        self.cond.notify_all()

    def _wait_job(self, job, timeout):
        with self.cond:
            return self.cond.wait_for(lambda: job.status in dispy.FINAL_STATUSES, timeout)


class HostedSchedulerTest(unittest.TestCase):
    """The Scheduler and NodePool hosted outside a JobCluster (as dispyscheduler will):
    jobs run, keys come from the scheduler, user-code hooks run without its lock."""

    timeout = 120

    def test_scheduler_hosts_a_plain_cluster(self):
        node = NodeProcess('127.0.0.2')
        self.addCleanup(node.stop)
        node.start()
        loop = dispy.IOLoop('test-hosted-loop')
        self.addCleanup(loop.stop)
        threads = dispy.WorkerThreads(4, 'test-hosted')
        scheduler = dispy.Scheduler(threads, job_keys=iter(range(1000, 2000)))
        options = {'max_frame': dispy.DEFAULT_MAX_FRAME, 'pulse_interval': 5.0,
                   'ping_interval': None, 'node_port': node.port, 'ip_addrs': ['127.0.0.1']}
        client = {'id': os.urandom(16).hex(), 'name': 'test', 'pid': os.getpid(),
                  'udp_port': 0}
        pool = dispy.NodePool(scheduler, scheduler.lock, '', None, options, loop, threads,
                              client, lambda data, dest: None)
        scheduler.attach_pool(pool)
        loop.add_ticker(lambda: pool.tick(time.monotonic()))
        self.addCleanup(pool.close)
        cluster = _HostedCluster(scheduler, '127.0.0.2', node.port)
        scheduler.add_cluster(cluster)
        blob, _refs = dispy.dumps_args(((7,), {}))
        job = scheduler.submit(dispy.DispyJob(None, cluster, blob))
        self.assertEqual(job._key, 1000)
        self.assertEqual(job.id, 1000)
        self.assertTrue(cluster._wait_job(job, TIMEOUT), job.status)
        self.assertEqual(job.result, 49)
        self.assertIn(('allocate', False), cluster.events)
        self.assertIn(('computation', False), cluster.events)
        self.assertIn(('ended', 49), cluster.events)


class _CuttingProxy:
    """A TCP proxy on loopback between a client and a node that can cut every
    connection through it once a given number of client bytes has passed."""

    def __init__(self, listen_ip, target, cut_after):
        self.target = target
        self.cut_after = cut_after
        self.forwarded = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.socks = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen_ip, 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(self.target, timeout=10)
            except OSError:
                return
            up.settimeout(None)
            with self.lock:
                self.socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src, dst, from_client):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if from_client:
                    with self.lock:
                        self.forwarded += len(data)
                        cut = self.cuts == 0 and self.forwarded >= self.cut_after
                        if cut:
                            self.cuts = 1
                    if cut:
                        self.cut()
                        return
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            socks, self.socks = self.socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def close(self):
        self.closed = True
        self.listener.close()
        self.cut()


def nap(seconds):
    import time
    time.sleep(seconds)
    return seconds


def file_digest(name):
    import hashlib
    with open(name, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


class ReconnectDuringSetupTest(unittest.TestCase):
    """The connection drops while a computation's file is on its way, and the node
    keeps the session (another cluster's job runs there): after the reconnect the
    computation is set up again, whole, and its job runs."""

    timeout = 120

    def test_file_cut_in_transit_is_sent_again(self):
        node = NodeProcess('127.0.0.2', args=['--max_file_size', '64m'])
        self.addCleanup(node.stop)
        node.start()
        proxy = _CuttingProxy('127.0.0.7', ('127.0.0.2', node.port), cut_after=8 << 20)
        self.addCleanup(proxy.close)
        folder = tempfile.mkdtemp(prefix='dispytest-core-')
        self.addCleanup(shutil.rmtree, folder, True)
        data = os.urandom(1 << 20) * 40          # 40 MB: still in transit at the cut
        path = os.path.join(folder, 'big.bin')
        with open(path, 'wb') as f:
            f.write(data)
        node_alloc = dispy.NodeAllocate('127.0.0.7', proxy.port)
        sleeper = dispy.JobCluster(nap, nodes=[node_alloc], ip_addr='127.0.0.1', port=0)
        self.addCleanup(sleeper.close, terminate=True)
        napping = sleeper.submit(3)
        self.assertTrue(support.wait_until(lambda: napping.status == dispy.DispyJob.Running,
                                           30), napping.status)
        cluster = dispy.JobCluster(file_digest, nodes=[node_alloc], depends=[path],
                                   ip_addr='127.0.0.1', port=0)
        self.addCleanup(cluster.close, terminate=True)
        job = cluster.submit('big.bin')
        self.assertEqual(job(timeout=90), hashlib.sha256(data).hexdigest(),
                         (job.status, job.exception))
        self.assertEqual(proxy.cuts, 1, 'the connection was not cut during the transfer')
        self.assertEqual(napping(timeout=30), 3, (napping.status, napping.exception))


if __name__ == '__main__':
    unittest.main()
