"""How jobs flow between a client and its nodes, now that messages share frames: what
users see is unchanged (every job reports Running, ``node_jobs()`` lists running
jobs), the window of jobs sent ahead follows the measured job time, the scheduler
finds the least-loaded node with room without looking at every node, and jobs
waiting on a node that falls behind move to one that would finish them sooner."""

import collections
import os
import threading
import time
import unittest

from tests import support
from tests.support import NodeProcess

import dispy
import dispynode
from dispy import DispyJob, Msg

TIMEOUT = 90


def double(n):
    return 2 * n


def nap(i, base):
    import os
    import time
    time.sleep(base * float(os.environ.get('DISPY_TEST_SLOWDOWN', '1')))
    return i


def digest_kinds(data, more=None, again=None):
    import hashlib
    return (type(data).__name__, hashlib.sha256(data).hexdigest(), type(more).__name__,
            len(more or b''), again is data)


def big_result(seed, size):
    import random
    return random.Random(seed).randbytes(size)


def _ready_link(ip, ckey, cpus):
    link = dispy.NodeLink(ip, 0)
    link.state = dispy.NodeLink.READY
    link.conn = object()        # takes_jobs() only asks that there is one
    link.cpus = cpus
    link.setups[ckey] = 'ready'
    link.alloc_cpus[ckey] = cpus
    return link


class WindowTest(unittest.TestCase):
    """Jobs in flight per node: a few before anything is measured, many for tiny
    jobs, one beyond the CPUs for long ones."""

    def test_window_follows_the_job_time(self):
        link = _ready_link('127.0.0.9', 1, 2)
        self.assertEqual(link.capacity(1), 4)           # nothing measured: cpus + 2
        link.job_took(1, 50e-6)
        self.assertEqual(link.capacity(1), 2 + 2 * dispy.NodeLink.MAX_QUEUED_PER_CPU)
        for _ in range(40):                             # the mean follows recent jobs
            link.job_took(1, 1.0)
        self.assertEqual(link.capacity(1), 3)
        self.assertEqual(link.capacity(2), 0)           # a cluster not set up there


class FreeSlotsTest(unittest.TestCase):
    """_ClusterQueue's heap: the least-loaded link with room; stale entries and links
    that cannot take jobs are skipped; among equals the newest offer wins."""

    def test_least_loaded_with_stale_entries(self):
        queue = dispy._ClusterQueue(None, 1)
        links = [_ready_link('127.0.0.%d' % (10 + i), 1, 1) for i in range(3)]
        stamps = iter(range(0, -100, -1))
        for link in links:
            queue.offer(link, next(stamps))
        self.assertIs(queue.least_loaded(), links[2])   # all empty: the newest offer
        links[2].in_flight[1] = 3                       # full (capacity 1 + 2)
        queue.offer(links[2], next(stamps))
        links[1].in_flight[1] = 1
        queue.offer(links[1], next(stamps))
        self.assertIs(queue.least_loaded(), links[0])
        links[0].state = dispy.NodeLink.RECONNECTING    # cannot take jobs now
        self.assertIs(queue.least_loaded(), links[1])
        links[1].closing[1] = False                     # being closed for this cluster
        self.assertIsNone(queue.least_loaded())
        self.assertEqual(queue.free, [])

    def test_a_full_pool_costs_nothing_per_node(self):
        queue = dispy._ClusterQueue(None, 1)
        links = [_ready_link('127.0.%d.%d' % (1 + i // 200, 1 + i % 200), 1, 1)
                 for i in range(1000)]
        for n, link in enumerate(links):
            link.in_flight[1] = link.capacity(1)        # every node full
            queue.offer(link, -n)
        self.assertEqual(queue.free, [])                # nothing to look at
        self.assertIsNone(queue.least_loaded())
        links[500].in_flight[1] -= 1                    # one slot frees
        queue.offer(links[500], -1000)
        self.assertIs(queue.least_loaded(), links[500])


class _Cluster:
    key = 1
    reentrant = False


class RebalanceTest(unittest.TestCase):
    """_rebalance on a scheduler without a network: what is asked back, and what the
    answer does."""

    def setUp(self):
        self.sent = collections.defaultdict(list)
        self.scheduler = dispy.Scheduler(None)
        self.queue = dispy._ClusterQueue(_Cluster, 1)
        self.scheduler.queues = {1: self.queue}
        self.slow = self.link('127.0.0.3', 1.0)
        self.fast = self.link('127.0.0.2', 0.05)
        self.queue.slow.update((self.slow, self.fast))
        self.queue.offer(self.fast, -1)

    def link(self, ip, seconds):
        link = _ready_link(ip, 1, 1)
        link.send = lambda msg: self.sent[ip].append(msg)
        link.job_took(1, seconds)
        return link

    def jobs_on_slow(self, pin=None):
        jobs = []
        for key in (1, 2, 3):           # one running, two waiting
            job = DispyJob(key, _Cluster, b'x', pin=pin)
            job._attempt, job._node, job.ip_addr = 1, self.slow, self.slow.ip_addr
            job.status = DispyJob.Running if key == 1 else DispyJob.Created
            self.slow.jobs[key] = job
            self.slow.in_flight[1] += 1
            jobs.append(job)
        return jobs

    def test_waiting_job_asked_back_and_queued_again(self):
        jobs = self.jobs_on_slow()
        self.scheduler._rebalance(self.queue)
        self.assertEqual(self.sent['127.0.0.3'], [Msg.RECALL(3, 1)])
        self.assertEqual(self.slow.recalling, {3})
        self.scheduler._on_recalled(self.slow, Msg.RECALLED.read(Msg.RECALLED(3, 1, True)),
                                    None)
        self.assertEqual(list(self.queue.pending), [jobs[2]])
        self.assertIsNone(jobs[2].ip_addr)
        self.assertEqual((self.slow.in_flight[1], self.slow.recalling), (2, set()))

    def test_refused_recall_leaves_the_job_and_forgets_the_ask(self):
        jobs = self.jobs_on_slow()
        self.scheduler._rebalance(self.queue)
        self.scheduler._on_recalled(self.slow, Msg.RECALLED.read(Msg.RECALLED(3, 1, False)),
                                    None)
        self.assertEqual(self.slow.recalling, set())
        self.assertIs(self.slow.jobs[3], jobs[2])
        self.assertEqual(list(self.queue.pending), [])

    def test_submit_node_jobs_stay_on_their_node(self):
        self.jobs_on_slow(pin='127.0.0.3')
        self.scheduler._rebalance(self.queue)
        self.assertEqual(self.sent['127.0.0.3'], [])

    def test_heap_stays_small_when_never_full(self):
        for n in range(5000):       # one job at a time: the link is never full
            self.fast.in_flight[1] = n % 2
            self.queue.offer(self.fast, -10 - n)
        self.assertLess(len(self.queue.free), 200)
        self.assertIs(self.queue.least_loaded(), self.fast)


class LinkReaderTest(unittest.TestCase):
    """The node's reader of worker links never blocks: half a message gives nothing
    (at once), the rest gives the message; big buffers arrive whole; EOF ends it."""

    def test_partial_messages_and_big_buffers(self):
        import multiprocessing
        import struct
        node_end, worker_end = multiprocessing.Pipe()
        self.addCleanup(node_end.close)
        reader = dispynode.LinkReader(node_end)
        self.addCleanup(reader.close)
        self.assertEqual(reader.read(), [])             # nothing yet: no wait
        big = os.urandom(3 << 20)
        data, _ = dispy.dumps_oob(dispy.out_of_band(('ready', 7)), 5)
        head = struct.pack('!?H', False, 0) + data
        raw = struct.pack('!i', len(head)) + head

        def write():    # as a worker does: a big message, then half of a small one
            dispynode.LocalLink(worker_end).send(('result', 1, big, 'x' * 10))
            worker_end._send(raw[:5])
        writer = threading.Thread(target=write)
        writer.start()
        self.addCleanup(writer.join, 10)
        msgs = []
        self.assertTrue(support.wait_until(lambda: msgs.extend(reader.read()) or msgs, 10))
        writer.join(10)
        self.assertEqual(len(msgs), 1)
        self.assertEqual(msgs[0][:2], ('result', 1))
        self.assertEqual(bytes(msgs[0][2]), big)
        self.assertEqual(reader.read(), [])             # the half message waits
        worker_end._send(raw[5:])
        self.assertTrue(support.wait_until(lambda: msgs.extend(reader.read()) or
                                           len(msgs) == 2, 5))
        self.assertEqual(msgs[1], ('ready', 7))
        worker_end._send(raw)       # a last message, then the end, both already in the
        worker_end.close()          # socket (a Unix socket pair delivers as it is written)
        self.assertEqual(reader.read(), [('ready', 7)])     # the message comes first
        self.assertTrue(support.wait_until(lambda: self._eof(reader), 5))

    @staticmethod
    def _eof(reader):
        try:
            reader.read()
        except EOFError:
            return True
        return False


class NodeFramingTest(unittest.TestCase):
    """The node's side: a STARTED whose RESULT shares the frame is left out, and an
    ACK names many results or is refused whole."""

    def test_fold_started(self):
        batch = [Msg.STARTED(1, 1, 5.0), Msg.STARTED(2, 1, 5.0),
                 Msg.result(1, 1, DispyJob.Finished, None, start_time=5.0),
                 Msg.STARTED(1, 2, 6.0)]
        self.assertEqual(dispynode.fold_started(batch), batch[1:])
        self.assertEqual(dispynode.fold_started(batch[:2]), batch[:2])

    def test_acked_jobs(self):
        self.assertEqual(dispynode.acked_jobs(Msg.ACK.read(Msg.ACK([(1, 2), [3, 4]]))),
                         [(1, 2), (3, 4)])
        for bad in (5, [(1,)], [('x', 1)], None):
            with self.assertRaises((ValueError, TypeError)):
                dispynode.acked_jobs(Msg.ACK.read(Msg.ACK(bad)))


class HoldTest(unittest.TestCase):
    """LoopConnection.send(hold=True): messages wait (at most HOLD) to share a frame,
    a send without hold takes them along at once, order is kept."""

    def test_held_messages_share_one_frame_in_order(self):
        loop = dispy.IOLoop('test-hold')
        self.addCleanup(loop.stop)
        threads = dispy.WorkerThreads(2, 'test-hold-worker')
        a, b = support.loop_connection_pair(self, loop, threads)
        (conn, _), (_, got) = a, b
        frames_before = conn.channel.send_seq
        done = threading.Event()

        def on_loop():
            for i in range(50):
                conn.send(Msg.CANCEL(i, 1), hold=True)
            done.set()
        loop.call_soon(on_loop)
        self.assertTrue(done.wait(10))
        self.assertTrue(got.wait_for(50), len(got.msgs))       # the timer flushed them
        self.assertEqual(conn.channel.send_seq - frames_before, 1)
        loop.call_soon(lambda: (conn.send(Msg.CANCEL(50, 1), hold=True),
                                conn.send(Msg.CANCEL(51, 1))))
        self.assertTrue(got.wait_for(52), len(got.msgs))
        self.assertEqual([m[1] for m in got.msgs], list(range(52)))


class StatusTest(unittest.TestCase):
    """Batched frames keep what the program sees: every job passes through Running
    (a STARTED folded into its RESULT included), and node_jobs() lists running
    jobs."""

    timeout = TIMEOUT

    def test_every_job_reports_running_then_finished(self):
        node = NodeProcess('127.0.0.2', cpus=2)
        self.addCleanup(node.stop)
        node.start()
        seen = collections.defaultdict(list)
        lock = threading.Lock()

        def status(state, _node, job):
            if job is not None:
                with lock:
                    seen[job.id].append(state)
        cluster = dispy.JobCluster(double, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                   port=0, node_port=node.port, cluster_status=status)
        self.addCleanup(support.close_now, cluster)
        jobs = [cluster.submit(i) for i in range(500)]
        self.assertEqual([j() for j in jobs], [2 * i for i in range(500)])
        cluster.wait(timeout=30)        # every callback of the finished jobs has run
        for job in jobs:
            states = [s for s in seen[job.id] if s != DispyJob.Created]
            self.assertEqual(states, [DispyJob.Running, DispyJob.Finished], job.id)
        self.assertLess(cluster._pool.links["127.0.0.2"].conn.channel.recv_seq,
                        250, 'results did not share frames')

    def test_node_jobs_lists_running_jobs(self):
        node = NodeProcess('127.0.0.2', cpus=2)
        self.addCleanup(node.stop)
        node.start()
        cluster = dispy.JobCluster(nap, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                                   node_port=node.port)
        self.addCleanup(support.close_now, cluster)
        jobs = [cluster.submit(i, 1.5) for i in range(2)]
        self.assertTrue(support.wait_until(
            lambda: all(j.status == DispyJob.Running for j in jobs), 30),
            [j.status for j in jobs])
        self.assertEqual(sorted(j.id for j in cluster.node_jobs('127.0.0.2')),
                         sorted(j.id for j in jobs))
        self.assertEqual([j() for j in jobs], [0, 1])


class RecallTest(unittest.TestCase):
    """A node ten times slower than another: the jobs still waiting there when the
    fast node runs out of work are asked back and run on the fast node."""

    timeout = TIMEOUT

    def test_jobs_waiting_on_a_slow_node_move(self):
        fast = NodeProcess('127.0.0.2', cpus=1)
        env = dict(os.environ, DISPY_TEST_SLOWDOWN='20')
        slow = NodeProcess('127.0.0.3', port=fast.port, cpus=1, env=env)
        for node in (fast, slow):
            self.addCleanup(node.stop)
            node.start()
        recalled = []
        handler = dispy.Scheduler.handlers['RECALLED']

        def counting(scheduler, link, msg, loaded):
            recalled.append((link.ip_addr, msg.key))
            return handler(scheduler, link, msg, loaded)
        dispy.Scheduler.handlers['RECALLED'] = counting
        self.addCleanup(dispy.Scheduler.handlers.__setitem__, 'RECALLED', handler)
        ready = threading.Semaphore(0)

        def status(state, _node, _job):
            if state == dispy.DispyNode.Initialized:
                ready.release()
        cluster = dispy.JobCluster(nap, nodes=['127.0.0.2', '127.0.0.3'],
                                   ip_addr='127.0.0.1', port=0, node_port=fast.port,
                                   cluster_status=status)
        self.addCleanup(support.close_now, cluster)
        for _ in range(2):
            self.assertTrue(ready.acquire(timeout=30), 'a node was not set up')
        jobs = [cluster.submit(i, 0.05) for i in range(30)]
        self.assertEqual([j(timeout=60) for j in jobs], list(range(30)))
        on_slow = [j.id for j in jobs if j.ip_addr == '127.0.0.3']
        self.assertTrue(recalled, 'no job was asked back from the slow node')
        self.assertEqual({addr for addr, _ in recalled}, {'127.0.0.3'})
        # the slow node (1 s a job) kept only what it had started: its first job and
        # the one it started when that ended; the fast one ran the other 28 meanwhile
        self.assertLessEqual(len(on_slow), 2, on_slow)
        for key in (key for _, key in recalled):
            job = [j for j in jobs if j._key == key][0]
            self.assertEqual(job.ip_addr, '127.0.0.2')
            self.assertEqual(job.status, DispyJob.Finished)


class PartedArgumentsTest(unittest.TestCase):
    """A big bytes argument is not copied into the pickle at the client: the blob is
    (pickle, the bytes object itself, ...); it is framed out of band, stored in the
    recover file as one record, and the job gets plain bytes back."""

    timeout = TIMEOUT

    def test_blob_parts_round_trip(self):
        data = os.urandom(300000)
        blob, _ = dispy.dumps_args(((data, 1), {'more': data, 'small': b'x'}))
        self.assertIsInstance(blob, tuple)
        self.assertIs(blob[1], data)                 # the caller's object, not a copy
        self.assertEqual(len(blob), 2)               # given twice, travels once
        self.assertEqual(dispy.loads_blob(blob), ((data, 1), {'more': data, 'small': b'x'}))
        stored = b''.join(dispy.stored_blob(blob))
        self.assertEqual(dispy.loads_blob(stored), dispy.loads_blob(blob))
        self.assertEqual(dispy.message_bulk(Msg.JOB(1, 1, 1, blob, None)),
                         dispy.blob_size(blob))
        small, _ = dispy.dumps_args(((b'x' * 100,), {}))
        self.assertIsInstance(small, bytes)

    def test_big_result_out_of_band_and_kept_on_disk(self):
        import tempfile
        data = os.urandom(200000)
        blob = dispy.dumps_result(data)
        self.assertIsInstance(blob, tuple)
        self.assertIs(blob[1], data)
        self.assertEqual(dispy.loads_blob(blob), data)
        self.assertIsInstance(dispy.dumps_result(b'small'), bytes)
        folder = tempfile.mkdtemp(prefix='dispytest-flow-')
        self.addCleanup(__import__('shutil').rmtree, folder, True)
        store = dispynode.ResultStore(folder)
        reply = Msg.result(7, 1, DispyJob.Finished, None, blob=(blob[0], memoryview(data)))
        self.assertTrue(store.save('ab' * 8, reply))
        kept = Msg.RESULT.read(store.load('ab' * 8)[0])
        self.assertEqual(dispy.loads_blob(kept.blob), data)

    def test_big_arguments_reach_the_job_as_bytes(self):
        node = NodeProcess('127.0.0.2', cpus=2)
        self.addCleanup(node.stop)
        node.start()
        cluster = dispy.JobCluster(digest_kinds, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                   port=0, node_port=node.port)
        self.addCleanup(support.close_now, cluster)
        import hashlib
        datas = [os.urandom(1 << 20) for _ in range(4)]
        jobs = [cluster.submit(d, more=d[:70000], again=d) for d in datas]
        for data, job in zip(datas, jobs):
            self.assertEqual(job(timeout=60), ('bytes', hashlib.sha256(data).hexdigest(),
                                               'bytes', 70000, True),
                             (job.status, job.exception))
        maker = dispy.JobCluster(big_result, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                 port=0, node_port=node.port)
        self.addCleanup(support.close_now, maker)
        made = [maker.submit(i, 1 << 20) for i in range(3)]
        for i, job in enumerate(made):
            result = job(timeout=60)
            self.assertIs(type(result), bytes, (job.status, job.exception))
            self.assertEqual(result, big_result(i, 1 << 20))


class SimulatedNodesTest(unittest.TestCase):
    """bench/simnodes.py (many fake nodes in one process, the real protocol) still
    speaks what the client speaks: every fake node is set up and every result right."""

    timeout = 120

    def test_simulator_serves_a_real_client(self):
        import json
        import subprocess
        import sys
        proc = subprocess.run([sys.executable, os.path.join(support.ROOT, 'bench',
                                                           'simnodes.py'),
                               '--nodes', '1,20', '--jobs', '500', '--json-only'],
                              capture_output=True, text=True, timeout=100)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        lines = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
        runs = {l['nodes']: l for l in lines if 'nodes' in l and l.get('nodes')}
        self.assertEqual(sorted(runs), [1, 20], lines)
        for n, run in runs.items():
            self.assertEqual((run['bad_results'], run['nodes_set_up']), (0, n), run)
        sys.path.insert(0, os.path.join(support.ROOT, 'bench'))
        try:
            import simnodes
        finally:
            sys.path.pop(0)
        self.assertEqual(simnodes.catalog_mismatch(), [], 'FakeNode misses message kinds')


class NodeCopyTest(unittest.TestCase):
    """The node works as a renamed copy in a folder of its own, beside its own
    dispy.py (its computation hosts then run that file, not another dispynode.py),
    and big arguments that are not bytes (a 1 MB str) reach the job."""

    timeout = TIMEOUT

    def test_renamed_copy_runs_jobs(self):
        import shutil
        import tempfile
        folder = tempfile.mkdtemp(prefix='dispytest-copy-')
        self.addCleanup(shutil.rmtree, folder, True)
        for name, as_name in (('dispy.py', 'dispy.py'), ('dispynode.py', 'node.py')):
            shutil.copy(os.path.join(support.ROOT, name), os.path.join(folder, as_name))
        node = NodeProcess('127.0.0.2', cpus=1, script=os.path.join(folder, 'node.py'))
        self.addCleanup(node.stop)
        node.start()
        cluster = dispy.JobCluster(double, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                   port=0, node_port=node.port)
        self.addCleanup(support.close_now, cluster)
        text = 'x' * (1 << 20)
        jobs = [cluster.submit(3), cluster.submit(text)]
        self.assertEqual(jobs[0](timeout=60), 6, (jobs[0].status, jobs[0].exception))
        self.assertEqual(jobs[1](timeout=60), text * 2, (jobs[1].status, jobs[1].exception))


class StrandWidthTest(unittest.TestCase):
    """A strand of width 2 runs at most two tasks at once, started in order."""

    def test_width_bounds_concurrency(self):
        threads = dispy.WorkerThreads(8, 'test-strand')
        strand = dispy.Strand(threads, width=2)
        lock = threading.Lock()
        state = {'now': 0, 'peak': 0, 'order': []}
        done = threading.Semaphore(0)

        def task(i):
            with lock:
                state['now'] += 1
                state['peak'] = max(state['peak'], state['now'])
                state['order'].append(i)
            time.sleep(0.01)        # overlap, so that a wider strand would show
            with lock:
                state['now'] -= 1
            done.release()
        for i in range(10):
            strand.submit(task, i)
        for _ in range(10):
            self.assertTrue(done.acquire(timeout=10))
        self.assertEqual(state['peak'], 2)
        self.assertEqual(sorted(state['order']), list(range(10)))
        self.assertEqual(state['order'][:2], [0, 1])


if __name__ == '__main__':
    unittest.main()
