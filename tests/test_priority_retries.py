"""Job priorities (``dispy_job_priority``) and retries (``dispy_job_retries``,
``job_retries=``) against real ``dispynode.py`` processes on loopback.

    JobQueueTest          the queue both the client and the node keep (pure logic)
    PriorityTest          a 1-CPU node held busy by a job waiting at a gate (a file the
                          test creates): jobs submitted later with a higher priority
                          run before the queued ones, wherever those wait (in the
                          client, or sent to the node: asked back so the higher one
                          takes their place); equal priorities keep their order
    RetryTest             a job that raises runs again up to its retries, its runs in
                          ``job.attempts``; a cluster default and a per-job override;
                          a timed-out run is retried; a cancelled one is not
    RetryRaceTest         a failed result crossing a cancel; resetup_node during a
                          retried job; cluster_status's busy count
    LostNodeRetryTest     a lost node is reentrant's business, not retries'
    SharedRetryTest       the same through dispyscheduler (SharedJobCluster)

Jobs count their runs in files under a folder of the test's (node and client share
this machine), so a job "fails the first N times" without any state in the node.
"""

import os
import sys
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob, DispyNode

NODE_IP = '127.0.0.2'
LOSS_NODE_IP = '127.0.0.3'
SCHED_IP = '127.0.0.4'
CLIENT_IP = '127.0.0.1'
T = 30.0


# ================================================================================
# Computations (shipped as source: module level, self-contained)
# ================================================================================

def gated(n, gate):
    """Waits (bounded) until the file ``gate`` exists; returns n."""
    deadline = time.time() + 60
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.02)            # start times of consecutive jobs differ clearly
    return n


def flaky(name, folder, failures, sleep_first=0.0):
    """Fails (raises) its first ``failures`` runs; counts runs in ``folder``."""
    runs = len([f for f in os.listdir(folder) if f.startswith(name + '.')])
    open(os.path.join(folder, '%s.%d' % (name, runs)), 'w').close()
    print('run %d of %s' % (runs, name))
    if runs == 0 and sleep_first:
        time.sleep(sleep_first)
    if runs < failures:
        raise ValueError('%s failed on run %d' % (name, runs))
    return runs


def fails_after(name, folder, seconds):
    """Runs ``seconds``, then says so in a file and raises (every run)."""
    runs = len([f for f in os.listdir(folder) if f.startswith(name + '.')])
    open(os.path.join(folder, '%s.%d' % (name, runs)), 'w').close()
    time.sleep(seconds)
    open(os.path.join(folder, 'raised-%d' % runs), 'w').close()
    raise ValueError('%s failed' % name)


def runs_of(folder, name):
    return len([f for f in os.listdir(folder) if f.startswith(name + '.')])


def last_line(text):
    return (text or '').strip().splitlines()[-1] if (text or '').strip() else ''


# ================================================================================
# The queue (pure logic)
# ================================================================================

class JobQueueTest(unittest.TestCase):

    def test_fifo_until_a_priority_then_by_priority(self):
        q = dispy.JobQueue()
        for name in 'abc':
            q.append(name)
        self.assertFalse(q.prioritized)
        q.append('urgent', 5)
        q.append('d')
        q.append('also urgent', 5)
        q.append('more urgent', 9)
        self.assertTrue(q.prioritized)
        self.assertEqual(len(q), 7)
        self.assertEqual(q.first(), 'more urgent')
        self.assertEqual(q.first_priority(), 9)
        order = [q.popleft() for _ in range(len(q))]
        self.assertEqual(order, ['more urgent', 'urgent', 'also urgent', 'a', 'b', 'c', 'd'])
        self.assertFalse(q.prioritized, 'an emptied queue is a plain deque again')
        self.assertFalse(q)
        with self.assertRaises(IndexError):
            q.popleft()

    def test_appendleft_is_first_of_its_priority_and_remove(self):
        q = dispy.JobQueue()
        q.append('a')
        q.append('b')
        q.appendleft('back')            # a job given back by a node: first again
        self.assertEqual(list(q), ['back', 'a', 'b'])
        q.append('high', 3)
        q.appendleft('back2')
        q.appendleft('high-back', 3)
        q.remove('a')
        with self.assertRaises(ValueError):
            q.remove('missing')
        self.assertEqual(sorted(q), sorted(['back2', 'back', 'b', 'high', 'high-back']))
        order = [q.popleft() for _ in range(len(q))]
        self.assertEqual(order, ['high-back', 'high', 'back2', 'back', 'b'])

    def test_negative_priority_runs_after_the_rest(self):
        q = dispy.JobQueue()
        q.append('later', -1)
        q.append('normal')
        self.assertEqual([q.popleft(), q.popleft()], ['normal', 'later'])


# ================================================================================
# Real nodes
# ================================================================================

class NodeTestCase(unittest.TestCase):
    """One node of ``cpus`` CPUs on NODE_IP for the class."""

    cpus = 1

    @classmethod
    def setUpClass(cls):
        cls.node = support.NodeProcess(NODE_IP, cpus=cls.cpus).start()

    @classmethod
    def tearDownClass(cls):
        cls.node.stop()

    def cluster(self, computation, **kwargs):
        kwargs.setdefault('nodes', [NODE_IP])
        kwargs.setdefault('node_port', self.node.port)
        cluster = dispy.JobCluster(computation, ip_addr=CLIENT_IP, port=0,
                                   recover_file=False, **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def folder(self):
        return support.temp_folder(self, 'dispytest-retry-')


def start_order(jobs):
    return [job.result for job in sorted(jobs, key=lambda j: j.start_time)]


class PriorityTest(NodeTestCase):

    def test_higher_priority_jumps_the_queue_here_and_on_the_node(self):
        """Job 0 holds the node's only CPU at a gate; jobs 1-7 wait (some sent to
        the node, the rest here).  Jobs submitted then with priorities 10, 10 and 5
        run right after job 0, in that order (equal priorities in submission order),
        then jobs 1-7 in theirs."""
        gate = os.path.join(self.folder(), 'gate')
        cluster = self.cluster(gated)
        low = [cluster.submit(n, gate) for n in range(8)]
        self.assertTrue(support.wait_until(lambda: low[0].status == DispyJob.Running, T))
        on_node = [j.id for j in low if j.ip_addr]
        self.assertGreater(len(on_node), 1, 'jobs are queued on the node too')
        high = [cluster.submit(100, gate, dispy_job_priority=10),
                cluster.submit(101, gate, dispy_job_priority=10),
                cluster.submit(50, gate, dispy_job_priority=5)]
        # the node takes them in place of the low jobs it had not started
        self.assertTrue(support.wait_until(lambda: all(j.ip_addr for j in high[:2]), T),
                        [(j.id, j.ip_addr) for j in low + high])
        open(gate, 'w').close()
        self.assertTrue(cluster.wait(timeout=T))
        jobs = low + high
        self.assertTrue(all(j.status == DispyJob.Finished for j in jobs),
                        [(j.id, j.status, j.exception) for j in jobs])
        self.assertEqual(start_order(jobs), [0, 100, 101, 50, 1, 2, 3, 4, 5, 6, 7])

    def test_a_higher_job_takes_the_place_of_a_submit_node_job(self):
        """Lower jobs pinned to the node (submit_node) are asked back too: the higher
        job takes the slot given back (the pinned one must not go straight back)."""
        gate = os.path.join(self.folder(), 'gate')
        cluster = self.cluster(gated)
        low = [cluster.submit_node(NODE_IP, n, gate) for n in range(3)]
        self.assertTrue(support.wait_until(lambda: low[0].status == DispyJob.Running, T))
        self.assertTrue(all(j.ip_addr for j in low), 'the window holds all three')
        high = cluster.submit(100, gate, dispy_job_priority=1)
        self.assertTrue(support.wait_until(lambda: high.ip_addr, T))
        open(gate, 'w').close()
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(start_order(low + [high]), [0, 100, 1, 2])

    def test_priority_of_submit_node_jobs_and_bad_priorities(self):
        """Jobs pinned to a node (submit_node) follow priorities too; a priority that is
        not an int makes no job."""
        gate = os.path.join(self.folder(), 'gate')
        cluster = self.cluster(gated)
        first = cluster.submit_node(NODE_IP, 0, gate)
        self.assertTrue(support.wait_until(lambda: first.status == DispyJob.Running, T))
        pinned = [cluster.submit_node(NODE_IP, n, gate) for n in (1, 2, 3, 4, 5)]
        urgent = cluster.submit_node(NODE_IP, 9, gate, dispy_job_priority=1)
        self.assertIsNone(cluster.submit(7, gate, dispy_job_priority='high'))
        self.assertIsNone(cluster.submit(7, gate, dispy_job_priority=1.5))
        self.assertTrue(support.wait_until(lambda: urgent.ip_addr, T))
        open(gate, 'w').close()
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(start_order([first, urgent] + pinned), [0, 9, 1, 2, 3, 4, 5])


class RetryTest(NodeTestCase):

    cpus = 2

    def test_retries_until_success_and_until_spent(self):
        folder = self.folder()
        cluster = self.cluster(flaky)
        ok = cluster.submit('ok', folder, 2, dispy_job_retries=2)
        spent = cluster.submit('spent', folder, 5, dispy_job_retries=1)
        plain = cluster.submit('plain', folder, 1)
        self.assertEqual(ok(timeout=T), 2)
        self.assertEqual(ok.status, DispyJob.Finished)
        self.assertEqual([a.status for a in ok.attempts],
                         [DispyJob.Terminated, DispyJob.Terminated, DispyJob.Finished])
        self.assertEqual([last_line(a.exception) for a in ok.attempts[:2]],
                         ['ValueError: ok failed on run 0', 'ValueError: ok failed on run 1'])
        self.assertEqual([a.stdout for a in ok.attempts], ['run 0 of ok\n', 'run 1 of ok\n',
                                                          'run 2 of ok\n'])
        self.assertEqual({a.ip_addr for a in ok.attempts}, {NODE_IP})
        self.assertTrue(all(a.start_time <= a.end_time for a in ok.attempts))
        spent(timeout=T)
        self.assertEqual(spent.status, DispyJob.Terminated)
        self.assertEqual(len(spent.attempts), 2)
        self.assertIn('spent failed on run 1', spent.exception)
        plain(timeout=T)
        self.assertEqual(plain.status, DispyJob.Terminated)
        self.assertEqual(len(plain.attempts), 1)
        self.assertEqual(runs_of(folder, 'ok'), 3)
        self.assertEqual(runs_of(folder, 'spent'), 2)
        self.assertEqual(runs_of(folder, 'plain'), 1)

    def test_cluster_default_and_per_job_override(self):
        folder = self.folder()
        events = []
        cluster = self.cluster(flaky, job_retries=1,
                               cluster_status=lambda status, node, job: events.append(
                                   (status, job.id if job is not None else None)))
        default = cluster.submit('default', folder, 1)
        off = cluster.submit('off', folder, 1, dispy_job_retries=0)
        self.assertEqual(default(timeout=T), 1)
        off(timeout=T)
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(default.status, DispyJob.Finished)
        self.assertEqual(len(default.attempts), 2)
        self.assertEqual(off.status, DispyJob.Terminated)
        self.assertEqual(len(off.attempts), 1)
        # cluster_status saw the retried job queued again between its two runs
        mine = [s for s, jid in events if jid == default.id]
        self.assertIn(DispyJob.Created, mine[1:], mine)
        self.assertEqual(mine[-1], DispyJob.Finished)
        with self.assertRaises(ValueError):
            self.cluster(flaky, job_retries=-1)
        self.assertIsNone(cluster.submit('bad', folder, 0, dispy_job_retries='2'))

    def test_a_timed_out_run_is_retried_a_cancelled_one_is_not(self):
        folder = self.folder()
        cluster = self.cluster(flaky)
        slow = cluster.submit('slow', folder, 0, 30.0, dispy_job_timeout=1.0,
                              dispy_job_retries=1)
        self.assertEqual(slow(timeout=T), 1)
        self.assertEqual(slow.status, DispyJob.Finished)
        self.assertEqual(len(slow.attempts), 2)
        self.assertEqual(slow.attempts[0].status, DispyJob.Terminated)
        self.assertIn('timeout', slow.attempts[0].exception)
        victim = cluster.submit('victim', folder, 0, 30.0, dispy_job_retries=3)
        self.assertTrue(support.wait_until(lambda: runs_of(folder, 'victim') == 1, T))
        cluster.cancel(victim)
        victim(timeout=T)
        self.assertEqual(victim.status, DispyJob.Cancelled)
        self.assertEqual(runs_of(folder, 'victim'), 1)


class RetryRaceTest(NodeTestCase):
    """Retries meeting a cancel, a resetup_node and cluster_status's busy counts."""

    def test_a_result_that_crosses_a_cancel_is_not_retried(self):
        """The job raises just as the program cancels it: its Terminated result is
        on its way when the CANCEL leaves (made certain by holding the scheduler's
        lock until the job has raised).  It is not run again."""
        folder = self.folder()
        cluster = self.cluster(fails_after)
        job = cluster.submit('crossed', folder, 0.5, dispy_job_retries=2)
        self.assertTrue(support.wait_until(lambda: job.status == DispyJob.Running, T))
        with cluster._scheduler.lock:       # the result waits for the lock
            self.assertTrue(support.wait_until(
                lambda: os.path.exists(os.path.join(folder, 'raised-0')), T))
            self.assertEqual(cluster.cancel(job), 0)
        job(timeout=T)
        self.assertIn(job.status, (DispyJob.Cancelled, DispyJob.Terminated))
        self.assertTrue(cluster.wait(timeout=T))
        self.assertEqual(runs_of(folder, 'crossed'), 1)
        self.assertEqual(len(job.attempts), 1)

    def test_resetup_node_waits_for_a_retried_job_then_sets_up_again(self):
        """resetup_node while a job with a retry runs: the failed run ends the last
        job there, so the node is set up again and the retry runs there."""
        folder = self.folder()
        events = []
        cluster = self.cluster(flaky, cluster_status=lambda status, node, job: events.append(
            (status, node.busy if node is not None else None, job is None)))
        job = cluster.submit('resetup', folder, 1, 1.0, dispy_job_retries=1)
        self.assertTrue(support.wait_until(lambda: job.status == DispyJob.Running, T))
        self.assertEqual(cluster.resetup_node(NODE_IP), 0)
        self.assertEqual(job(timeout=T), 1, (job.status, job.exception))
        self.assertEqual(len(job.attempts), 2)
        self.assertTrue(cluster.wait(timeout=T))
        node_events = [s for s, _, no_job in events if no_job]
        self.assertGreaterEqual(node_events.count(DispyNode.Initialized), 2, events)
        # cluster_status's DispyNode.busy: one job ran twice, none runs now
        self.assertEqual(cluster._nodes[NODE_IP].busy, 0)


class LostNodeRetryTest(unittest.TestCase):
    """A node lost mid-job is reentrant's business: retries do not rerun it."""

    def test_lost_node_is_not_a_retry(self):
        folder = support.temp_folder(self, 'dispytest-retry-')
        with support.NodeProcess(LOSS_NODE_IP, cpus=1) as node:
            cluster = dispy.JobCluster(flaky, nodes=[LOSS_NODE_IP], node_port=node.port,
                                       ip_addr=CLIENT_IP, port=0, recover_file=False,
                                       pulse_interval=1)
            self.addCleanup(support.close_now, cluster)
            job = cluster.submit('lost', folder, 0, 60.0, dispy_job_retries=3)
            self.assertTrue(support.wait_until(lambda: runs_of(folder, 'lost') == 1, T))
            node.kill()
            job(timeout=T)
        self.assertEqual(job.status, DispyJob.Cancelled, job.exception)
        self.assertIn('lost', job.exception)
        self.assertEqual([a.status for a in job.attempts], [DispyJob.Cancelled])
        self.assertEqual(runs_of(folder, 'lost'), 1)


class SharedRetryTest(unittest.TestCase):
    """Retries and priorities through dispyscheduler: the scheduler reruns the job
    (the same Scheduler code) and the program gets every attempt with the result."""

    @classmethod
    def setUpClass(cls):
        cls.node = support.NodeProcess(NODE_IP, cpus=1).start()
        try:
            cls.sched = support.SchedulerProcess(SCHED_IP, nodes=[NODE_IP],
                                                 node_port=cls.node.port).start()
        except Exception:
            cls.node.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.sched.stop()
        cls.node.stop()

    def cluster(self, computation, **kwargs):
        cluster = dispy.SharedJobCluster(computation, nodes=[NODE_IP], scheduler_node=SCHED_IP,
                                         scheduler_port=self.sched.port, recover_file=False,
                                         **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def test_shared_retries_and_priority(self):
        folder = support.temp_folder(self, 'dispytest-retry-')
        cluster = self.cluster(flaky, job_retries=2)
        job = cluster.submit('shared', folder, 2)
        self.assertEqual(job(timeout=T), 2, (job.status, job.exception,
                                             self.sched.output()[-2000:]))
        self.assertEqual([a.status for a in job.attempts],
                         [DispyJob.Terminated, DispyJob.Terminated, DispyJob.Finished])
        self.assertEqual(last_line(job.attempts[1].exception),
                         'ValueError: shared failed on run 1')
        self.assertEqual(job.attempts[0].ip_addr, NODE_IP)
        cluster.close()
        gate = os.path.join(folder, 'gate')
        cluster = self.cluster(gated)
        low = [cluster.submit(n, gate) for n in range(6)]
        self.assertTrue(support.wait_until(lambda: low[0].status == DispyJob.Running, T))
        high = cluster.submit(100, gate, dispy_job_priority=3)
        open(gate, 'w').close()
        self.assertTrue(cluster.wait(timeout=T))
        # The program cannot see when the scheduler has the high job on the node (in
        # place of a low one it asked back), so only this is certain: it runs before
        # every job still waiting at the scheduler (3 of the 1-CPU node's window of 3),
        # and the low jobs keep their order.
        order = start_order(low + [high])
        self.assertLess(order.index(100), order.index(3), order)
        self.assertEqual([n for n in order if n != 100], [0, 1, 2, 3, 4, 5])


if __name__ == '__main__':
    unittest.main()
