"""SharedJobCluster and dispyscheduler.py end to end, inside a network-namespace lab.

Real processes on five lab hosts (see tests/netns.py), with DEFAULT ports and
default discovery: the scheduler finds its nodes by UDP broadcast, which is only
ever sent inside the lab::

    client   one or two client programs: dispy.SharedJobCluster(compute,
             scheduler_node=<sched's lab address>) (and recover_jobs)
    sched    python dispyscheduler.py --daemon -d --dest_path_prefix <its folder>
    node1..3 python dispynode.py --daemon -d -c 1 --dest_path_prefix <its folder>

Client programs are small scripts written to a per-test folder (one generic
program, ``CLIENT``, configured by a JSON argument); each job returns
``(n, node name, start, end)`` with the node's ``time.time()`` (the lab hosts
share the machine's clock), and optionally leaves a "start" mark file in a
folder of the test's (the lab hosts share the file system), so the test can see
when and where jobs run, and whether one ran twice.

Every wait is on a line a process printed or on a file a job wrote, bounded in
time; every process is killed by PID when the test ends (the lab does it), and
every folder removed.  Everything skips (unittest.SkipTest) where network
namespaces can't be made.
"""

import json
import os
import re
import subprocess
import sys
import time
import unittest

try:
    from tests import support
    from tests.test_netns import NODE_WATCH, LabTestCase, clean_env, time_limit
except ImportError:                         # run from inside tests/
    import support
    from test_netns import NODE_WATCH, LabTestCase, clean_env, time_limit

ROOT = support.ROOT
NODE_SCRIPT = support.NODE_SCRIPT
SCHEDULER_SCRIPT = os.path.join(ROOT, 'dispyscheduler.py')
NODE_READY = support.READY_RE.pattern
SCHEDULER_READY = r'dispyscheduler serving at \S+:\d+'
NODES = ('node1', 'node2', 'node3')
TAIL = 6000                                 # characters of each log in a failure message

# One client program for every test, configured by the JSON in argv[1]:
#   kind        'shared' (SharedJobCluster, default) or 'job' (JobCluster)
#   scheduler   the scheduler's address (shared)
#   kwargs      more keywords for the cluster (secret, exclusive, reentrant, nodes, ...)
#   wait_nodes  wait (bounded) until this many nodes are initialized, before submitting
#   count, delay, marks, gate   jobs compute(n, delay, marks, gate) for n in range(count):
#               each waits (bounded) for the file ``gate`` if given, marks its start in
#               the folder ``marks`` if given, then sleeps ``delay`` s
#   running     after submitting, wait (bounded) until this many jobs run, print 'running'
#   job_timeout seconds each job() may take
# Prints 'cluster created', 'nodes ...', 'submitted N', 'running N', one 'RESULT {json}'
# per job, then 'closed'.
CLIENT = r'''
import json, os, sys, threading, time
import dispy
''' + NODE_WATCH + r'''

def compute(n, delay, marks, gate):
    import os, time
    node = os.environ.get('DISPY_TEST_NODE', '?')
    if gate:                    # held until the test creates this file (at most 60 s)
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
    start = time.time()
    if marks:
        name = 'start-%d-%s-%d-%d' % (n, node, os.getpid(), int(start * 1e6))
        with open(os.path.join(marks, name + '.tmp'), 'w') as f:
            f.write('%r\n' % start)
        os.rename(os.path.join(marks, name + '.tmp'), os.path.join(marks, name))
    time.sleep(delay)
    return (n, node, start, time.time())

STATUS = {dispy.DispyJob.Created: 'Created', dispy.DispyJob.Running: 'Running',
          dispy.DispyJob.Cancelled: 'Cancelled', dispy.DispyJob.Terminated: 'Terminated',
          dispy.DispyJob.Abandoned: 'Abandoned', dispy.DispyJob.Finished: 'Finished',
          dispy.DispyJob.ProvisionalResult: 'ProvisionalResult'}

def report(job):
    value = job.result
    print('RESULT ' + json.dumps({
        'n': job.id, 'status': STATUS.get(job.status, job.status),
        'value': list(value) if isinstance(value, tuple) else repr(value),
        'ip': job.ip_addr, 'exception': None if job.exception is None
        else str(job.exception)[-2000:]}), flush=True)

def main():
    cfg = json.loads(sys.argv[1])
    kwargs = dict(cfg.get('kwargs', {}), cluster_status=watch_nodes)
    if cfg.get('kind', 'shared') == 'shared':
        cluster = dispy.SharedJobCluster(compute, scheduler_node=cfg['scheduler'], **kwargs)
    else:
        cluster = dispy.JobCluster(compute, **kwargs)
    print('cluster created', flush=True)
    if cfg.get('wait_nodes'):
        with cond:
            ok = cond.wait_for(lambda: len(nodes) >= cfg['wait_nodes'], 40)
            print('nodes %s' % ' '.join(sorted(nodes)), flush=True)
        if not ok:
            sys.exit('only %d node(s) initialized in 40 s' % len(nodes))
    jobs = []
    for n in range(cfg['count']):
        job = cluster.submit(n, cfg['delay'], cfg.get('marks'), cfg.get('gate'))
        job.id = n
        jobs.append(job)
    print('submitted %d' % len(jobs), flush=True)
    if cfg.get('running'):
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            running = sum(1 for j in jobs if j.status == dispy.DispyJob.Running)
            if running >= cfg['running']:
                print('running %d' % running, flush=True)
                break
            time.sleep(0.02)
        else:
            sys.exit('not %d jobs running in 40 s' % cfg['running'])
    for job in jobs:
        job(timeout=cfg.get('job_timeout', 60))
        report(job)
    cluster.close()
    print('closed', flush=True)

if __name__ == '__main__':
    main()
'''

RECOVER = r'''
import json, sys
import dispy
import client

jobs = dispy.recover_jobs(sys.argv[1], timeout=float(sys.argv[2]))
print('recovered %d' % len(jobs), flush=True)
for job in sorted(jobs, key=lambda j: j.id):
    client.report(job)
'''


def parse_results(text):
    """The RESULT records a client printed, as dicts."""
    return [json.loads(line[len('RESULT '):]) for line in text.splitlines()
            if line.startswith('RESULT ')]


def tail(text, size=TAIL):
    return text if len(text) <= size else '[...]\n' + text[-size:]


class SharedLabTestCase(LabTestCase):
    """A lab of a client host, a scheduler host and three node hosts."""

    HOSTS = ('client', 'sched') + NODES

    def setUp(self):
        super().setUp()
        self.marks = self.tempdir('marks')
        self.client_dir = self.tempdir('client')
        with open(os.path.join(self.client_dir, 'client.py'), 'w') as f:
            f.write(CLIENT)
        with open(os.path.join(self.client_dir, 'recover.py'), 'w') as f:
            f.write(RECOVER)
        self.nodes = {}

    # -- processes ----------------------------------------------------------------------------
    def start_node(self, host, args=('-c', '1'), wait=True):
        """``dispynode.py --daemon -d`` with no address options, in a folder of its own."""
        folder = self.tempdir(host)
        argv = [sys.executable, NODE_SCRIPT, '--daemon', '-d',
                '--dest_path_prefix', os.path.join(folder, 'dest')] + list(args)
        node = self.spawn(host, argv, cwd=folder,
                          env=clean_env(DISPY_TEST_NODE=host, TMPDIR=folder))
        self.nodes[host] = node
        if wait:
            node.wait_for(NODE_READY, timeout=30)
        return node

    def start_nodes(self, hosts=NODES):
        nodes = [self.start_node(host, wait=False) for host in hosts]
        for node in nodes:
            node.wait_for(NODE_READY, timeout=30)
        return nodes

    def scheduler_argv(self, folder, args=()):
        return [sys.executable, SCHEDULER_SCRIPT, '--daemon', '-d',
                '--dest_path_prefix', os.path.join(folder, 'dest')] + list(args)

    def start_scheduler(self, args=(), host='sched', folder=None):
        """``dispyscheduler.py --daemon -d`` (default ports); waits for its ready line.
        Returns (process, folder): the same folder restarts it as the same scheduler."""
        folder = folder or self.tempdir('scheduler')
        proc = self.spawn(host, self.scheduler_argv(folder, args), cwd=folder,
                          env=clean_env(TMPDIR=folder))
        proc.wait_for(SCHEDULER_READY, timeout=30, stream='stderr')
        return proc, folder

    def client(self, name, host='client', **cfg):
        """Starts the client program on ``host`` with ``cfg``; returns its LabProcess."""
        cfg.setdefault('scheduler', self.lab.ip('sched'))
        proc = self.spawn(host, [sys.executable, os.path.join(self.client_dir, 'client.py'),
                                 json.dumps(cfg)],
                          cwd=self.client_dir, env=clean_env(TMPDIR=self.client_dir))
        proc.name = name
        return proc

    def finish(self, proc, timeout):
        """Waits (bounded) for a client to exit 0 and print 'closed'; its results."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail_with('client %s did not finish in %s s' % (proc.name, timeout))
        if proc.returncode != 0 or 'closed' not in proc.stdout().splitlines():
            self.fail_with('client %s failed (exit %s)' % (proc.name, proc.returncode))
        return parse_results(proc.stdout())

    def kill(self, proc, what):
        """SIGKILL to exactly this process (the program itself, not a wrapper)."""
        with open('/proc/%d/cmdline' % proc.pid, 'rb') as f:
            cmdline = f.read().replace(b'\0', b' ').decode('utf-8', 'replace')
        self.assertIn(what, cmdline, 'pid %d is not %s: %s' % (proc.pid, what, cmdline))
        proc.popen.kill()
        proc.wait(timeout=10)

    # -- observations ---------------------------------------------------------------------------
    def start_marks(self, with_time=False):
        """(n, node) of every job start seen in the marks folder (with its
        ``time.time()`` as a third item if ``with_time``)."""
        found = []
        for name in os.listdir(self.marks):
            match = re.match(r'^start-(\d+)-(\w+)-\d+-(\d+)$', name)
            if match:
                mark = (int(match.group(1)), match.group(2))
                found.append(mark + (int(match.group(3)) / 1e6,) if with_time else mark)
        return found

    def wait_marks(self, predicate, timeout, what):
        """Polls the marks folder (files the jobs write) until ``predicate(marks)``."""
        deadline = time.monotonic() + timeout
        while True:
            marks = self.start_marks()
            if predicate(marks):
                return marks
            if time.monotonic() >= deadline:
                self.fail_with('%s: not seen in %s s (marks %s)' % (what, timeout,
                                                                    sorted(marks)))
            time.sleep(0.05)

    def diagnostics(self):
        return '\n'.join('--- %s pid %s %s\n--- stdout:\n%s\n--- stderr:\n%s' % (
            proc.host, proc.pid, getattr(proc, 'name', ''), tail(proc.stdout()),
            tail(proc.stderr())) for proc in self.spawned)

    def fail_with(self, message):
        self.fail(message + '\n' + self.diagnostics())

    def check_results(self, results, count, name, nodes=NODES, check_ip=True):
        """Every n in range(count) exactly once, Finished, with the right value from a
        node among ``nodes`` whose address the job reports (``check_ip``)."""
        ns = sorted(r['n'] for r in results)
        if ns != list(range(count)):
            self.fail_with('%s: results for %s, expected each of 0..%d once'
                           % (name, ns, count - 1))
        for r in results:
            value = r['value']
            if (r['status'] != 'Finished' or not isinstance(value, list) or value[0] != r['n']
                    or value[1] not in nodes
                    or (check_ip and r['ip'] != self.lab.ip(value[1]))):
                self.fail_with('%s: wrong result %r' % (name, r))

    @staticmethod
    def ran_on(results):
        return {r['value'][1] for r in results}


# -- the tests --------------------------------------------------------------------------------

class SharedClusterTest(SharedLabTestCase):

    @time_limit(120)
    def test_two_programs_share_every_node(self):
        self.start_nodes()
        self.start_scheduler()
        programs = [self.client(name, wait_nodes=3, count=30, delay=0.05)
                    for name in ('A', 'B')]
        for proc in programs:
            results = self.finish(proc, 90)
            self.check_results(results, 30, proc.name)
            if self.ran_on(results) != set(NODES):
                self.fail_with('jobs of %s ran on %s only, not on all of %s'
                               % (proc.name, sorted(self.ran_on(results)), NODES))

    @time_limit(120)
    def test_exclusive_cluster_runs_alone(self):
        self.start_nodes()
        self.start_scheduler()
        # B1 (not exclusive) holds every CPU until the gate opens; A (exclusive) and
        # then B2 (not exclusive) submit meanwhile.  Job counts leave CPUs free in the
        # last round of B1 and of A, which a non-exclusive neighbour would take.
        gate = os.path.join(self.marks, 'gate')
        b1 = self.client('B1', wait_nodes=3, count=10, delay=0.3, gate=gate, running=3)
        b1.wait_for(r'running \d', timeout=60)
        a = self.client('A', count=5, delay=0.5, kwargs={'exclusive': True})
        a.wait_for('submitted', timeout=60)
        b2 = self.client('B2', count=5, delay=0.3)
        b2.wait_for('submitted', timeout=60)
        if 'RESULT' in b1.stdout():
            self.fail_with('B1 got a result before its gate opened')
        open(gate, 'w').close()
        runs = {}
        for proc, count in ((b1, 10), (a, 5), (b2, 5)):
            results = self.finish(proc, 90)
            self.check_results(results, count, proc.name)
            runs[proc.name] = sorted((r['value'][2], r['value'][3]) for r in results)
        spans = {name: (min(s for s, _ in run), max(e for _, e in run))
                 for name, run in runs.items()}
        if not spans['B1'][1] <= spans['A'][0]:
            self.fail_with('exclusive A started (%.3f) before B1 ended (%.3f): %r'
                           % (spans['A'][0], spans['B1'][1], runs))
        if not (spans['A'][1] <= spans['B2'][0] or spans['B2'][1] <= spans['A'][0]):
            self.fail_with('jobs of exclusive A and of B2 interleave: %r' % runs)

    @time_limit(90)
    def test_wrong_secret_is_refused_and_a_good_client_still_works(self):
        self.start_nodes()
        self.start_scheduler(['--cluster_secret', 'right'])
        bad = self.client('wrong-secret', count=3, delay=0.05, job_timeout=30,
                          kwargs={'secret': 'wrong'})
        results = self.finish(bad, 40)
        if sorted(r['n'] for r in results) != [0, 1, 2]:
            self.fail_with('wrong-secret client: results %r' % results)
        for r in results:
            text = r['exception'] or ''
            if r['status'] != 'Terminated' or 'secret' not in text or 'refused' not in text:
                self.fail_with('wrong-secret client: job %r not Terminated with a text '
                               'naming the refusal and the secret' % r)
        print('\n  wrong secret: %s' % results[0]['exception'], file=sys.stderr)
        good = self.client('right-secret', wait_nodes=3, count=6, delay=0.05,
                           kwargs={'secret': 'right'})
        self.check_results(self.finish(good, 60), 6, 'right-secret client')

    @time_limit(120)
    def test_node_killed_mid_run_reentrant_jobs_finish_once(self):
        self.start_nodes()
        self.start_scheduler()
        delay = 1.5
        proc = self.client('reentrant', wait_nodes=3, count=9, delay=delay, marks=self.marks,
                           kwargs={'reentrant': True})
        self.wait_marks(lambda m: any(node == 'node2' for _, node in m), 60,
                        'a job running on node2')
        self.kill(self.nodes['node2'], 'dispynode.py')
        killed_at = time.time()
        marks = self.start_marks(with_time=True)
        killed = {n for n, node, _ in marks if node == 'node2'}
        if not any(node == 'node2' and killed_at - start < delay - 0.1
                   for _, node, start in marks):
            self.fail_with('this machine is too slow: node2 was killed %.2f s after its job '
                           'started, not mid-job' % (killed_at - max(
                               start for _, node, start in marks if node == 'node2')))
        results = self.finish(proc, 90)
        self.check_results(results, 9, 'reentrant client')
        by_n = {r['n']: r['value'][1] for r in results}
        if any(by_n[n] == 'node2' for n in killed):
            self.fail_with('a job of the killed node2 got a result from it: %r' % by_n)
        marks = self.start_marks()
        for n in killed:        # it ran again, elsewhere
            if not any(m == n and node != 'node2' for m, node in marks):
                self.fail_with('job %d of the killed node2 was not run again: %s'
                               % (n, sorted(marks)))

    @time_limit(120)
    def test_killed_client_recovers_jobs_through_scheduler(self):
        self.start_nodes()
        self.start_scheduler()
        proc = self.client('doomed', wait_nodes=3, count=6, delay=2.0, running=3,
                           kwargs={'recover_file': 'rec.dat'})
        proc.wait_for(r'running \d', timeout=60)
        self.kill(proc, 'client.py')
        self.assertTrue(os.path.exists(os.path.join(self.client_dir, 'rec.dat')))
        try:
            result = self.lab.run('client', [sys.executable, 'recover.py', 'rec.dat', '60'],
                                  timeout=90, cwd=self.client_dir,
                                  env=clean_env(TMPDIR=self.client_dir))
        except subprocess.TimeoutExpired as exc:
            self.fail_with('recover_jobs did not return in 90 s\n%s\n%s'
                           % (exc.stdout, exc.stderr))
        if result.returncode != 0:
            self.fail_with('recover.py exited %s\n%s\n%s' % (result.returncode,
                                                             result.stdout, result.stderr))
        results = parse_results(result.stdout)
        self.check_results(results, 6, 'recover_jobs', check_ip=False)
        if os.path.exists(os.path.join(self.client_dir, 'rec.dat')):
            self.fail_with('rec.dat kept although every job was accounted for')
        wrong = [r for r in results if r['ip'] != self.lab.ip(r['value'][1])]
        if wrong:
            self.fail_with('recover_jobs: job.ip_addr is not the node that ran the job '
                           '(%s is the scheduler): %r' % (self.lab.ip('sched'), wrong))

    @time_limit(150)
    def test_scheduler_killed_and_restarted_jobs_finish_once(self):
        self.start_nodes()
        sched, folder = self.start_scheduler()
        proc = self.client('survivor', wait_nodes=3, count=9, delay=2.0, marks=self.marks,
                           job_timeout=100)
        self.wait_marks(lambda m: {node for _, node in m} == set(NODES), 60,
                        'jobs running on every node')
        self.kill(sched, 'dispyscheduler.py')
        if len(parse_results(proc.stdout())) >= 9:
            self.fail_with('every job had ended before the scheduler was killed')
        restarted = self.spawn('sched', self.scheduler_argv(folder), cwd=folder,
                               env=clean_env(TMPDIR=folder))
        restarted.wait_for(SCHEDULER_READY, timeout=30, stream='stderr')
        results = self.finish(proc, 110)
        self.check_results(results, 9, 'client of the restarted scheduler')
        starts = sorted(n for n, _ in self.start_marks())
        if starts != list(range(9)):
            self.fail_with('jobs started %s: some ran twice or never' % starts)

    @time_limit(120)
    def test_scheduler_node_and_job_cluster_side_by_side(self):
        self.start_nodes(('sched',) + NODES)
        self.start_scheduler(['-n', self.lab.ip('node1'), '-n', self.lab.ip('node2'),
                              '-n', self.lab.ip('sched')])
        # A plain JobCluster on the scheduler's host (UDP 51347 there too) uses node3.
        plain = self.client('JobCluster', host='sched', kind='job', wait_nodes=1, count=8,
                            delay=0.5, kwargs={'nodes': [self.lab.ip('node3')]})
        shared = self.client('SharedJobCluster', wait_nodes=3, count=12, delay=0.5)
        plain_results = self.finish(plain, 90)
        shared_results = self.finish(shared, 90)
        self.check_results(plain_results, 8, 'JobCluster', nodes=('node3',))
        self.check_results(shared_results, 12, 'SharedJobCluster',
                           nodes=('sched', 'node1', 'node2'))
        if self.ran_on(shared_results) != {'sched', 'node1', 'node2'}:
            self.fail_with('shared jobs ran on %s only' % sorted(self.ran_on(shared_results)))
        spans = [(min(r['value'][2] for r in rs), max(r['value'][3] for r in rs))
                 for rs in (plain_results, shared_results)]
        if not (spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]):
            self.fail_with('the two programs did not run at the same time: %r' % spans)


if __name__ == '__main__':
    unittest.main()
