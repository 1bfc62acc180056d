"""A client program that dies or is interrupted: its nodes are freed, no job is lost.

Real ``dispynode.py`` processes on loopback addresses and client scripts in
subprocesses that are killed (SIGKILL), interrupted (SIGINT, as Ctrl-C) or end with
``os._exit``; then ``dispy.recover_jobs`` runs in another subprocess, as a user would.

Classes:

    FreedNodeTest        kill -9 mid-run: the node finishes the jobs it holds, then
                         serves a second program within seconds (whose first warning
                         names the busy node's client); recover_jobs, run while the
                         second program holds the node, accounts for every job
    OwnJobsOnlyTest      two clusters of one program, two recover files: each recovery
                         collects its own jobs; the other's stay on the node
    ZombieCapTest        --zombie_interval still caps how long the node works for a
                         vanished client: its jobs are cancelled, the node freed
    UnansweredNodeTest   a node down at recovery: its jobs stay unknown, the file kept
    RecordTest           torn and malformed records of the recover file
    InterruptTest        Ctrl-C (SIGINT): the exit warning is exact and names the
                         recover_jobs call
    NeverReachedTest     jobs that never reached a node come back Abandoned with their
                         arguments (big ones too, once saved) and run again through
                         cluster.resubmit
    RecoverFileTest      no recover file left by a program that submitted nothing or
                         closed its cluster; recover_jobs() takes the newest file that
                         still has jobs

Every wait is bounded; every process is stopped by a cleanup (``ClientScript.kill``,
``NodeProcess.stop``).
"""

import json
import os
import re
import signal
import time
import unittest

try:
    from tests import support
    from tests.test_faults import (ClientScript, make_cluster, sleep_square, start_node,
                                   tempdir, timing, wait_node_status)
except ImportError:                         # run from inside tests/
    import support
    from test_faults import (ClientScript, make_cluster, sleep_square, start_node, tempdir,
                             timing, wait_node_status)

import dispy
from dispy import DispyJob

NODE_A = '127.0.0.2'
NODE_B = '127.0.0.3'
NOBODY = '127.0.0.4'         # no node ever listens here
RECOVER_FILE_RE = re.compile(r'^_dispy_\d{14}')


# ================================================================================
# Client scripts
# ================================================================================

RUNNING_WATCH = r'''
import os, signal, sys, threading, time
import dispy

def running_watch(count):
    """A cluster_status callback, and an Event set once ``count`` jobs run."""
    lock, running, started = threading.Lock(), set(), threading.Event()

    def status(st, node, job):
        if job is not None and st == dispy.DispyJob.Running:
            with lock:
                running.add(job.id)
                if len(running) >= count:
                    started.set()
    return status, started


def ids_in_recover_file(cluster, count, limit=10):
    """Waits (bounded) until ``count`` ids set after submit are in the recover file."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        jobs = dispy._RecoverFile(cluster._recover.path).jobs.values()
        if sum(not isinstance(job['id'], int) for job in jobs) >= count:
            return True
        time.sleep(0.02)
    return False
'''

# argv: seconds per job, number of jobs, how it ends (kill | wait).  Ids: a tuple, a
# string, or an object (not a plain value: recovered as the automatic number).
WORKING_CLIENT = RUNNING_WATCH + r'''
class Token:
    pass

def compute(i, seconds, scale=1):
    time.sleep(seconds)
    return 'value-%d' % (i * scale)

if __name__ == '__main__':
    seconds, count, how = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    status, started = running_watch(2)
    cluster = dispy.JobCluster(compute, cluster_status=status)
    for i in range(count):
        job = cluster.submit(i, seconds, scale=7)
        job.id = ('job', i) if i % 3 == 0 else 'job-%d' % i if i % 3 == 1 else Token()
    print('STARTED %s' % started.wait(30), flush=True)
    # ids set after submit reach the recover file with the hub's next tick (0.1 s)
    plain_ids = sum(1 for i in range(count) if i % 3 != 2)
    print('IDS %s' % ids_in_recover_file(cluster, plain_ids), flush=True)
    if how == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    print('WAITING', flush=True)
    cluster.wait()          # interrupted by the test (SIGINT)
'''

TWO_CLUSTERS_CLIENT = RUNNING_WATCH + r'''
def first(i):
    time.sleep(1.0)
    return 'first-%d' % i

def second(i):
    time.sleep(4.0)
    return 'second-%d' % i

if __name__ == '__main__':
    status, started = running_watch(4)
    a = dispy.JobCluster(first, cluster_status=status, recover_file='first.rec')
    b = dispy.JobCluster(second, cluster_status=status, recover_file='second.rec')
    for i in range(2):
        a.submit_job_id('a%d' % i, i)
        b.submit_job_id('b%d' % i, i)
    print('STARTED %s' % started.wait(30), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
'''

# Jobs for a node nobody runs: 2 small, one big (saved after RECOVER_DEFER), one big
# submitted right before the end (its arguments are not saved).
UNREACHED_CLIENT = r'''
import os, sys, time
import dispy

def compute(i, data=b''):
    return i * 10 + len(data)

if __name__ == '__main__':
    cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]])
    cluster.submit_job_id('small-0', 0)
    cluster.submit_job_id('small-1', 1, data=b'xy')
    saved = cluster.submit_job_id('big-saved', 2, data=b'z' * 300000)
    deadline = time.monotonic() + 20        # until the hub wrote its arguments
    while time.monotonic() < deadline and dispy._RecoverFile(
            cluster._recover.path).jobs[saved._key]['blob'] is None:
        time.sleep(0.05)
    cluster.submit_job_id('big-unsaved', 3, data=b'w' * 300000)
    print('SUBMITTED', flush=True)
    os._exit(1)
'''

# argv: JSON kwargs of recover_jobs; then, if given, a node to resubmit the abandoned
# jobs to (with the computation of UNREACHED_CLIENT).
RECOVER_SCRIPT = r'''
import json, sys, time
import dispy

def compute(i, data=b''):
    return i * 10 + len(data)

def plain(value):
    return list(value) if isinstance(value, tuple) else value

if __name__ == '__main__':
    jobs = dispy.recover_jobs(**json.loads(sys.argv[1]))
    print('JOBS ' + json.dumps([{
        'id': plain(job.id), 'id_type': type(job.id).__name__, 'status': job.status,
        'result': job.result, 'exception': None if job.exception is None
        else str(job.exception)[:300],
        'args': None if job.args is None else [a if not isinstance(a, bytes) else len(a)
                                               for a in job.args],
        'kwargs': None if job.kwargs is None else {k: v if not isinstance(v, bytes)
                                                   else len(v)
                                                   for k, v in job.kwargs.items()},
        'submit_time': job.submit_time, 'end_time': job.end_time} for job in jobs]),
        flush=True)
    if len(sys.argv) > 2:
        cluster = dispy.JobCluster(compute, nodes=[sys.argv[2]])
        again = cluster.resubmit(jobs)
        print('AGAIN ' + json.dumps(sorted([job.id, job()] for job in again)), flush=True)
        cluster.close()
'''


def recover(test, cwd, env, limit=30, resubmit_to=None, **kwargs):
    """Runs RECOVER_SCRIPT; returns its jobs (dicts, by id) and its stdout."""
    args = [json.dumps(kwargs)] + ([resubmit_to] if resubmit_to else [])
    script = ClientScript(test, RECOVER_SCRIPT, env, cwd, args=args)
    rc = script.wait(limit)
    test.assertEqual(rc, 0, 'recover_jobs(%s): %s\n%s' % (
        kwargs, 'still running' if rc is None else 'exit %s' % rc, script.output()))
    out = script.stdout()
    jobs = json.loads(re.search(r'^JOBS (.*)$', out, re.M).group(1))
    return {(tuple(j['id']) if isinstance(j['id'], list) else j['id']): j for j in jobs}, out


def launch(test, script, cpus=2, args=(), node_args=()):
    """A node on NODE_A and a client script using it: (node, cwd, env, client)."""
    node = start_node(test, NODE_A, cpus=cpus, args=node_args)
    cwd = tempdir(test)
    env = support.client_env([NODE_A], node_port=node.port)
    return node, cwd, env, ClientScript(test, script, env, cwd, args=args)


def recover_files(cwd):
    return sorted(name for name in os.listdir(cwd) if RECOVER_FILE_RE.match(name))


# ================================================================================
# Tests
# ================================================================================

class FreedNodeTest(unittest.TestCase):

    timeout = 90

    def test_killed_client_frees_the_node_and_every_job_is_accounted_for(self):
        # default --zombie_interval: 60 minutes
        node, cwd, env, client = launch(self, WORKING_CLIENT, args=[1.5, 8, 'kill'])
        self.assertTrue(client.wait_for(r'^IDS True$', 30), client.output())
        self.assertEqual(client.wait(10), -signal.SIGKILL, client.output())
        t_kill = time.monotonic()
        self.assertEqual(len(recover_files(cwd)), 1, os.listdir(cwd))

        # A second program started right away waits for the node, saying why ...
        with self.assertLogs('dispy', 'WARNING') as logs:
            cluster = make_cluster(self, sleep_square, [NODE_A], node.port)
            job = cluster.submit(5, 0)
            self.assertEqual(job(timeout=40), 25, 'the second program did not get the node '
                             '(%s):\n%s' % (dispy.STATUS_NAMES.get(job.status), node.output()))
        served = time.monotonic() - t_kill
        job_started = job.start_time
        timing('second_program_served_after_kill_s', served)
        first = logs.output[0]
        self.assertIn('busy with another client', first)
        self.assertIn('pid %d' % client.pid, first)
        self.assertIn('finishes its', first)
        # ... and gets it once the 4 jobs the node held (2 rounds of 1.5 s) ended, plus
        # the short grace for a reconnect: seconds, not the 60 minutes of zombie_interval.
        self.assertLess(served, 30)

        # recover_jobs while the second program holds the node: every job is there.
        jobs, _ = recover(self, cwd, env)
        self.assertEqual(len(jobs), 8, jobs)
        ran = {jid: j for jid, j in jobs.items() if j['status'] == DispyJob.Finished}
        abandoned = {jid: j for jid, j in jobs.items() if j['status'] == DispyJob.Abandoned}
        self.assertEqual((len(ran), len(abandoned)), (4, 4), jobs)
        for i in range(8):
            jid = ('job', i) if i % 3 == 0 else 'job-%d' % i if i % 3 == 1 else i + 1
            self.assertIn(jid, jobs, 'job %d lost its id' % i)
            job = jobs[jid]
            self.assertEqual(job['args'], [i, 1.5], job)
            self.assertEqual(job['kwargs'], {'scale': 7}, job)
            self.assertIsNotNone(job['submit_time'])
            if job['status'] == DispyJob.Finished:
                self.assertEqual(job['result'], 'value-%d' % (i * 7))
            else:
                self.assertIn('never ran', job['exception'])
        self.assertEqual(sorted(j['args'][0] for j in ran.values()), [0, 1, 2, 3])
        self.assertGreaterEqual(job_started, max(j['end_time'] for j in ran.values()),
                                'the second program ran before the vanished one\'s jobs ended')
        self.assertEqual(recover_files(cwd), [], 'recover file kept after full recovery')
        job = cluster.submit(6, 0)       # the second program was not disturbed
        self.assertEqual(job(timeout=20), 36)


class OwnJobsOnlyTest(unittest.TestCase):

    timeout = 90

    def test_each_recovery_collects_only_its_recover_file_jobs(self):
        """The first cluster's jobs (1 s) are recovered while the second's (4 s) still
        run for the vanished session; the second's, later, from disk beside no one."""
        node, cwd, env, client = launch(self, TWO_CLUSTERS_CLIENT, cpus=4)
        self.assertTrue(client.wait_for(r'^STARTED True$', 30), client.output())
        client.wait(10)
        for name in ('first.rec', 'second.rec'):
            self.assertTrue(os.path.exists(os.path.join(cwd, name)), os.listdir(cwd))
        self.assertEqual(recover_files(cwd), [], 'default recover file made besides')
        first, _ = recover(self, cwd, env, recover_file='first.rec')
        self.assertEqual({jid: j['result'] for jid, j in first.items()},
                         {'a0': 'first-0', 'a1': 'first-1'})
        text = node.stdout() + node.stderr()
        self.assertNotIn('nothing runs for it any more', text,
                         'the first recovery did not meet the session still running jobs')
        ok, text = wait_node_status(node, r'0 running, 0 queued.*\n  no client', 20)
        self.assertTrue(ok, 'node not free after the jobs ended:\n%s\n%s' % (text, node.output()))
        second, _ = recover(self, cwd, env, recover_file='second.rec')
        self.assertEqual({jid: j['result'] for jid, j in second.items()},
                         {'b0': 'second-0', 'b1': 'second-1'})
        for job in list(first.values()) + list(second.values()):
            self.assertEqual(job['status'], DispyJob.Finished, job)


class UnansweredNodeTest(unittest.TestCase):

    timeout = 90

    def test_jobs_of_a_node_that_does_not_answer_stay_unknown(self):
        """A node down at recovery: its jobs are not called Abandoned (status Created,
        the reason in exception) and the file is kept; once the node is back, the next
        recover_jobs gets their results."""
        dest = tempdir(self)
        node = start_node(self, NODE_A, cpus=2, dest_path_prefix=dest)
        cwd = tempdir(self)
        env = support.client_env([NODE_A], node_port=node.port)
        client = ClientScript(self, WORKING_CLIENT, env, cwd, args=[0.5, 2, 'kill'])
        self.assertTrue(client.wait_for(r'^STARTED True$', 30), client.output())
        client.wait(10)
        ok, text = wait_node_status(node, r'0 running, 0 queued.*\n  no client', 20)
        self.assertTrue(ok, text)
        node.signal(signal.SIGTERM)
        self.assertEqual(node.wait(20), 0, node.output())
        jobs, _ = recover(self, cwd, env)
        self.assertEqual([j['status'] for j in jobs.values()], [DispyJob.Created] * 2, jobs)
        for job in jobs.values():
            self.assertIn('did not answer', job['exception'])
        self.assertEqual(len(recover_files(cwd)), 1, 'recover file removed too early')
        start_node(self, NODE_A, port=node.port, cpus=2, dest_path_prefix=dest)
        jobs, _ = recover(self, cwd, env)
        self.assertEqual(sorted(j['result'] for j in jobs.values()), ['value-0', 'value-7'])
        self.assertEqual(recover_files(cwd), [])


class RecordTest(unittest.TestCase):
    """The recover file's records, without a network: torn and malformed ones."""

    def setUp(self):
        self.path = os.path.join(tempdir(self), 'rec')
        self.log = dispy.RecoverLog.create(self.path, {'client': 'ab' * 8})
        self.jobs = [dispy.DispyJob(key, None, b'args-%d' % key) for key in (1, 2, 3)]
        for job in self.jobs:
            self.log.submitted(job)

    def test_interrupted_and_malformed_records_are_skipped(self):
        with self.log.lock:
            self.log._reserve(40)         # as if Ctrl-C hit a record half written
        self.log._append(b'E', b'short')  # an E record too short to read
        self.log.ended(self.jobs[0])
        self.jobs[1].id = ('mine', 2.5)
        self.log.write_ids(self.jobs)
        self.log.close(remove=False)
        with self.assertLogs('dispy', 'WARNING'):
            record = dispy._RecoverFile(self.path)
        self.assertEqual(sorted(record.jobs), [2, 3])
        self.assertEqual(record.jobs[2]['id'], ('mine', 2.5))
        self.assertEqual(record.jobs[3]['id'], 3)
        self.assertEqual(record.jobs[3]['blob'], b'args-3')

    def test_a_partial_recovery_marks_what_it_accounted_for(self):
        self.log.close(remove=False)
        record = dispy._RecoverFile(self.path)
        record.mark_ended([1, 3])
        self.assertEqual(sorted(dispy._RecoverFile(self.path).jobs), [2])

    def test_not_a_recover_file(self):
        self.log.close(remove=True)
        with open(self.path, 'wb') as f:
            f.write(b'{"client": "x"}\n')
        with self.assertRaises(ValueError):
            dispy._RecoverFile(self.path)


class ZombieCapTest(unittest.TestCase):

    timeout = 60

    def test_zombie_interval_caps_the_work_for_a_vanished_client(self):
        node, cwd, env, client = launch(self, WORKING_CLIENT, args=[60, 2, 'kill'],
                                        node_args=['--zombie_interval', '0.02'])
        self.assertTrue(client.wait_for(r'^STARTED True$', 30), client.output())
        t_kill = time.monotonic()
        client.wait(10)
        ok, text = wait_node_status(node, r'0 running, 0 queued.*\n  no client', 20)
        freed = time.monotonic() - t_kill
        timing('zombie_node_free_after_client_kill_s', freed)
        self.assertTrue(ok, 'node still serves the killed client:\n%s\n%s'
                        % (text, node.output()))
        self.assertGreaterEqual(freed, 1.0, 'node freed before zombie_interval (1.2 s)')
        cluster = make_cluster(self, sleep_square, [NODE_A], node.port)
        job = cluster.submit(6, 0)
        self.assertEqual(job(timeout=20), 36)
        jobs, _ = recover(self, cwd, env)
        self.assertEqual(sorted(j['status'] for j in jobs.values()),
                         [DispyJob.Cancelled] * 2, jobs)


class InterruptTest(unittest.TestCase):

    timeout = 60

    def test_ctrl_c_warning_is_exact(self):
        node, cwd, env, client = launch(self, WORKING_CLIENT, args=[3, 8, 'wait'])
        self.assertTrue(client.wait_for(r'^WAITING$', 30), client.output())
        os.kill(client.pid, signal.SIGINT)
        # Python ends a KeyboardInterrupt by SIGINT itself (exit status -2)
        self.assertIn(client.wait(15), (1, -signal.SIGINT), client.output())
        self.assertIn('KeyboardInterrupt', client.stderr())
        files = recover_files(cwd)
        self.assertEqual(len(files), 1, os.listdir(cwd))
        match = re.search(r'(\d+) job\(s\) keep running on nodes, (\d+) never reached a node; '
                          r"dispy\.recover_jobs\('([^']+)'\) gets them back", client.stderr())
        self.assertTrue(match, client.stderr())
        on_nodes, queued, name = int(match.group(1)), int(match.group(2)), match.group(3)
        self.assertEqual(name, files[0])
        self.assertEqual(on_nodes + queued, 8)
        self.assertEqual(on_nodes, 4, 'a 2-CPU node holds 4 jobs (2 running, 2 queued)')
        jobs, _ = recover(self, cwd, env, recover_file=name)
        self.assertEqual(len(jobs), 8, jobs)
        statuses = [j['status'] for j in jobs.values()]
        self.assertEqual(statuses.count(DispyJob.Abandoned), queued, jobs)
        self.assertEqual(statuses.count(DispyJob.Finished), on_nodes, jobs)


class NeverReachedTest(unittest.TestCase):

    timeout = 60

    def test_jobs_that_never_reached_a_node_come_back_with_their_arguments(self):
        cwd = tempdir(self)
        env = support.client_env([NOBODY])
        client = ClientScript(self, UNREACHED_CLIENT, env, cwd, args=[NOBODY])
        self.assertEqual(client.wait(30), 1, client.output())
        self.assertEqual(len(recover_files(cwd)), 1, os.listdir(cwd))
        node = start_node(self, NODE_B, cpus=2)
        env = support.client_env([NODE_B], node_port=node.port)
        jobs, out = recover(self, cwd, env, resubmit_to=NODE_B)
        self.assertEqual(sorted(jobs), ['big-saved', 'big-unsaved', 'small-0', 'small-1'])
        for job in jobs.values():
            self.assertEqual(job['status'], DispyJob.Abandoned, job)
        self.assertEqual((jobs['small-0']['args'], jobs['small-0']['kwargs']), ([0], {}))
        self.assertEqual((jobs['small-1']['args'], jobs['small-1']['kwargs']), ([1], {'data': 2}))
        self.assertEqual(jobs['big-saved']['kwargs'], {'data': 300000})
        self.assertIsNone(jobs['big-unsaved']['args'])
        self.assertIn('were not saved', jobs['big-unsaved']['exception'])
        again = json.loads(re.search(r'^AGAIN (.*)$', out, re.M).group(1))
        self.assertEqual(again, [['big-saved', 300020], ['small-0', 0], ['small-1', 12]])
        self.assertEqual(recover_files(cwd), [])


NOTHING_SUBMITTED = r'''
import os, sys
import dispy

def compute(i):
    return i

if __name__ == '__main__':
    cluster = dispy.JobCluster(compute, nodes=[sys.argv[1]])
    if sys.argv[2] == 'closed':
        cluster.submit(1)
        cluster.close(timeout=0, terminate=True)
    elif sys.argv[2] == 'ended':        # all its jobs ended, then it crashed
        job = cluster.submit(1)
        cluster.cancel(job)
        print('STATUS %s' % job(timeout=10), flush=True)
        os._exit(1)
    else:
        os._exit(1)
'''


class RecoverFileTest(unittest.TestCase):

    timeout = 60

    def run_client(self, cwd, how, args=None):
        client = ClientScript(self, NOTHING_SUBMITTED, support.client_env([NOBODY]), cwd,
                              args=args or [NOBODY, how])
        rc = client.wait(20)
        self.assertIsNotNone(rc, client.output())
        return client

    def test_no_file_without_jobs_to_recover(self):
        cwd = tempdir(self)
        self.run_client(cwd, 'nothing')
        self.run_client(cwd, 'closed')
        self.assertEqual(recover_files(cwd), [])

    def test_recover_jobs_takes_the_newest_file_with_jobs(self):
        cwd = tempdir(self)
        client = ClientScript(self, UNREACHED_CLIENT, support.client_env([NOBODY]), cwd,
                              args=[NOBODY])
        self.assertEqual(client.wait(30), 1, client.output())
        with_jobs = recover_files(cwd)
        self.run_client(cwd, 'ended')       # newer, but every job of it ended
        files = recover_files(cwd)
        self.assertEqual(len(files), 2, files)
        jobs, _ = recover(self, cwd, support.client_env([NOBODY]))
        self.assertEqual(sorted(jobs), ['big-saved', 'big-unsaved', 'small-0', 'small-1'])
        self.assertEqual(recover_files(cwd), sorted(set(files) - set(with_jobs)))


if __name__ == '__main__':
    unittest.main()
