"""Live job output: ``JobCluster(..., stream_output=True | callable)``.

The parts first, in this process (no node): what job.stdout keeps past its cap, how a
worker's LiveStream cuts lines and bounds what waits for a slow node, how a hop counts
what it drops.  Then through real ``dispynode.py`` processes on loopback
(``support.NodeProcess``), clients in this process (explicit ``nodes=`` and
``ip_addr=``) or as scripts (``support.run_client``), and through a real
``dispyscheduler.py``.

Classes, by topic:

    LiveOutputPartsTest   _KeptText, LiveStream / LiveOutput with a fake link (lines,
                          long lines, the last partial line, a blocked link, a child
                          the job forks), the relay's drop counts, stream_output
                          values refused
    StreamNodeTest        lines reach the client while the job runs (callback and
                          printed with their prefix, stdout to stdout, stderr to
                          stderr); job.stdout whole at the end; a program job streams;
                          a job printing hundreds of MB leaves the client's memory
                          bounded and every line accounted for; a cluster without
                          stream_output gets no OUTPUT message; examples/live_output.py
    StreamSchedulerTest   the same lines through dispyscheduler (SharedJobCluster)

Every wait is bounded (``job(timeout=)``, events with timeouts, the jobs' own waits for
a file the test creates have deadlines); processes are stopped by PID at cleanup.
"""

import collections
import json
import os
import re
import sys
import threading
import unittest
from unittest import mock

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
import dispynode
from dispy import DispyJob

NODE_IP = '127.0.0.2'
SCHED_NODE_IP = '127.0.0.3'
CLIENT_IP = '127.0.0.1'
T = 30.0


# ================================================================================
# Computations (shipped as source: module level, self-contained)
# ================================================================================

def print_then_wait(path):
    """Prints a line on each stream, waits (at most 30 s) for ``path``, prints again."""
    import time
    print('first line')
    print('to stderr', file=sys.stderr)
    deadline = time.time() + 30
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)
    print('after the wait')
    return os.path.exists(path)


def echo_lines(n):
    for i in range(n):
        print('line %d' % i)
    return n


PROGRAM = '''
import os, sys, time
print('program started')
print('program stderr', file=sys.stderr)
deadline = time.time() + 30
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.01)
print('program done')
'''


# ================================================================================
# The parts, in this process
# ================================================================================

class FakeLink:
    """A worker's link to the node: records what is sent; ``gate`` (an Event) held
    clear blocks the sender, as a node that does not read would."""

    def __init__(self, gate=None):
        self.sent = []
        self.gate = gate

    def send(self, msg):
        if self.gate is not None:
            self.gate.wait(T)
        self.sent.append(msg)

    def lines(self):
        """{stream: [lines]} of what was sent, and {stream: lines dropped}."""
        lines, dropped = collections.defaultdict(list), collections.Counter()
        for kind, _key, _attempt, chunks in self.sent:
            assert kind == 'output', kind
            for stream, text, lost in chunks:
                lines[stream].extend(dispy.split_lines(text))
                dropped[stream] += lost
        return lines, dropped


class FakeConn:
    """A connection as a relay sees it: congested or not; records what is sent."""

    def __init__(self):
        self.busy = False
        self.sent = []

    def congested(self, limit):
        return self.busy

    def send(self, msg, hold=False):
        self.sent.append(dispy.Msg.OUTPUT.read(msg))


def reaped(pid):
    """(pid, wait status) once the child ``pid`` has ended (reaped), else None."""
    done = os.waitpid(pid, os.WNOHANG)
    return done if done[0] else None


class LiveOutputPartsTest(unittest.TestCase):

    def live(self, link):
        live = dispynode.LiveOutput(link)
        return live, live.start(7, 1, 1 << 20)

    def test_kept_text_keeps_head_and_tail_past_its_limit(self):
        """Under the limit everything is kept; past it the first and last halves, and
        a line saying how many characters were left out between them."""
        kept = dispynode._KeptText('stdout', 100)
        kept.add('a' * 30)
        kept.add('b' * 10)
        self.assertEqual(kept.text(), 'a' * 30 + 'b' * 10)
        kept.add('c' * 200)
        kept.add('d' * 20)
        self.assertEqual(kept.text(), 'a' * 30 + 'b' * 10 + 'c' * 10 +
                         '\n[dispy: 160 characters of stdout left out here; kept: the first '
                         'and the last 50]\n' + 'c' * 30 + 'd' * 20)

    def test_lines_long_lines_and_the_last_partial_line(self):
        """Lines written in pieces arrive whole; a line over LIVE_LINE_MAX arrives in
        pieces; the last line without its newline arrives at the job's end; getvalue
        has everything, in order."""
        link = FakeLink()
        live, (out, err) = self.live(link)
        long_line = 'y' * (2 * dispy.LIVE_LINE_MAX + 5)
        out.write('one\ntw')
        err.write('warning\n')
        out.write('o\n' + long_line + '\n')
        out.write('no newline')
        live.finish((out, err))
        lines, dropped = link.lines()
        self.assertEqual(lines['stdout'], ['one', 'two', 'y' * dispy.LIVE_LINE_MAX,
                                           'y' * dispy.LIVE_LINE_MAX, 'yyyyy', 'no newline'])
        self.assertEqual(lines['stderr'], ['warning'])
        self.assertEqual(sum(dropped.values()), 0)
        self.assertEqual(out.getvalue(), 'one\ntwo\n' + long_line + '\nno newline')
        self.assertTrue(all(msg[1:3] == (7, 1) for msg in link.sent))
        out.write('after the end\n')      # a thread of the job that outlived it
        self.assertNotIn('after the end', out.getvalue())

    def test_a_node_that_does_not_read_bounds_what_waits(self):
        """While the link is blocked at most LIVE_BACKLOG characters wait; the rest is
        dropped and counted, and every line written is either sent or counted."""
        gate = threading.Event()
        link = FakeLink(gate)
        live, (out, err) = self.live(link)
        line = 'z' * 99 + '\n'
        written = 0
        for _ in range(3 * dispy.LIVE_BACKLOG // len(line)):
            out.write(line)
            written += 1
            self.assertLessEqual(live.pending_size, dispy.LIVE_BACKLOG)
        gate.set()
        live.finish((out, err))
        lines, dropped = link.lines()
        self.assertGreater(dropped['stdout'], 0)
        self.assertEqual(len(lines['stdout']) + dropped['stdout'], written)
        self.assertTrue(all(text == 'z' * 99 for text in lines['stdout']))

    def test_a_process_the_job_forks_does_not_hang_on_its_output(self):
        """A child forked while the flusher held the lock can still print (its output
        is ignored, as a function job's children's always was)."""
        live, (out, err) = self.live(FakeLink())
        with live.lock:
            pid = os.fork()
            if pid == 0:
                try:
                    print('from the child', file=out)
                    out.flush()
                finally:
                    os._exit(0 if 'from the child' not in out.getvalue() else 1)
        self.addCleanup(support.kill_pids, [pid])
        ended = support.wait_until(lambda: reaped(pid), T, 0.01)
        self.assertTrue(ended, 'the forked child hangs')
        self.assertEqual(os.waitstatus_to_exitcode(ended[1]), 0)
        live.finish((out, err))

    def test_relay_counts_what_it_drops_and_reports_it(self):
        """A congested connection drops OUTPUT; the next piece that goes carries the
        count (with what earlier hops dropped); what is left is told at the job's end."""
        relay, conn = dispy.LiveOutputRelay(), FakeConn()
        relay.pass_on(conn, 5, 1, 'stdout', 'a\nb\n', 0)
        conn.busy = True
        relay.pass_on(conn, 5, 1, 'stdout', 'c\nd\ne', 2)
        relay.pass_on(conn, 5, 1, 'stderr', 'x\n', 0)
        conn.busy = False
        relay.pass_on(conn, 5, 1, 'stdout', 'f\n', 1)
        relay.pass_on(None, 5, 1, 'stdout', 'g\n', 0)       # the client is away
        relay.job_ended(conn, 5, 1)
        self.assertEqual([(m.stream, m.text, m.dropped) for m in conn.sent],
                         [('stdout', 'a\nb\n', 0), ('stdout', 'f\n', 6),
                          ('stdout', '', 1), ('stderr', '', 1)])
        self.assertEqual(relay.lost, {})

    def test_bad_stream_output_values_are_refused(self):
        for value in ('yes', 3, ['print']):
            with self.assertRaises(ValueError):
                dispy.JobCluster(echo_lines, nodes=[NODE_IP], ip_addr=CLIENT_IP,
                                 stream_output=value)


# ================================================================================
# Through real nodes
# ================================================================================

class LineRecorder:
    """A stream_output callable: records (job, stream, line, job status, thread), and
    sets an event when a line it waits for arrives."""

    def __init__(self, wanted=None):
        self.calls = []
        self.wanted = wanted
        self.seen = threading.Event()

    def __call__(self, job, stream, line):
        self.calls.append((job, stream, line, job.status, threading.current_thread().name))
        if line == self.wanted:
            self.seen.set()

    def lines(self):
        return [(stream, line) for _job, stream, line, _s, _t in self.calls]


class StreamTestCase(unittest.TestCase):

    def tmpdir(self):
        return support.temp_folder(self, 'dispytest-stream-')

    def wait_file(self):
        """A path a job waits for; created at cleanup too, so no job waits for long."""
        path = os.path.join(self.tmpdir(), 'go')
        self.addCleanup(lambda: os.path.exists(os.path.dirname(path)) and
                        open(path, 'w').close())
        return path

    def check_live_then_whole(self, job, recorder, go, first='first line',
                              last='after the wait', err='to stderr'):
        """The first line arrives while the job is still running (it waits for ``go``);
        after ``go`` the job ends with every line given, each stream's in order, and
        whole in job.stdout / job.stderr."""
        self.assertTrue(recorder.seen.wait(T), recorder.calls)
        self.assertEqual(job.status, DispyJob.Running)
        self.assertEqual(recorder.calls[0][3], DispyJob.Running)
        open(go, 'w').close()
        job(timeout=T)
        self.assertEqual(job.status, DispyJob.Finished, job.exception)
        lines = recorder.lines()
        self.assertEqual([line for stream, line in lines if stream == 'stdout'], [first, last])
        self.assertEqual([line for stream, line in lines if stream == 'stderr'], [err])
        self.assertEqual(lines[-1], ('stdout', last))
        self.assertTrue(all(call[0] is job for call in recorder.calls))
        self.assertEqual({call[4] for call in recorder.calls}, {'dispy-notifier'})
        self.assertEqual(job.stdout, '%s\n%s\n' % (first, last))
        self.assertEqual(job.stderr, err + '\n')


class StreamNodeTest(StreamTestCase):
    """One node on NODE_IP (2 CPUs) for the class."""

    timeout = 240

    @classmethod
    def setUpClass(cls):
        cls.node = support.NodeProcess(ip=NODE_IP, cpus=2)
        cls.addClassCleanup(support.stop_node, cls.node)
        cls.node.start()

    def cluster(self, computation, **kwargs):
        cluster = dispy.JobCluster(computation, nodes=[NODE_IP], ip_addr=CLIENT_IP, port=0,
                                   node_port=self.node.port, recover_file=False, **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def client(self, source, timeout=120):
        """Runs a client script against the node; asserts it exits 0."""
        proc = support.run_client(source, support.client_env([NODE_IP], CLIENT_IP,
                                                             self.node.port),
                                  timeout=timeout, cwd=self.tmpdir())
        self.assertEqual(proc.returncode, 0, 'stdout:\n%s\nstderr:\n%s\nnode:\n%s' % (
            proc.stdout[-3000:], proc.stderr[-3000:], self.node.output()[-3000:]))
        return proc

    def test_callback_gets_lines_while_the_job_runs(self):
        """The callable gets (job, stream, line) on the callback thread while the job
        is Running; job.stdout and job.stderr are whole at the end."""
        go = self.wait_file()
        recorder = LineRecorder('first line')
        cluster = self.cluster(print_then_wait, stream_output=recorder)
        job = cluster.submit(go)
        self.check_live_then_whole(job, recorder, go)
        self.assertTrue(job.result)

    def test_printed_with_prefix_stdout_to_stdout_stderr_to_stderr(self):
        """stream_output=True in a script: each line on the script's own stdout or
        stderr as '<job id> @ <node>: <line>', before job() returns."""
        proc = self.client('''
import sys, dispy

def job(n):
    for i in range(n):
        print('out %d' % i)
        print('err %d' % i, file=sys.stderr)
    return n

cluster = dispy.JobCluster(job, stream_output=True, recover_file=False)
j = cluster.submit_job_id('job-a', 3)
assert j(timeout=30) == 3, (j.status, j.exception)
print('job() returned')
cluster.close(timeout=30)
''')
        prefix = 'job-a @ %s: ' % NODE_IP
        self.assertEqual(proc.stdout.splitlines(), [prefix + 'out 0', prefix + 'out 1',
                                                    prefix + 'out 2', 'job() returned'])
        for i in range(3):
            self.assertIn(prefix + 'err %d\n' % i, proc.stderr)

    def test_program_job_streams(self):
        """JobCluster('prog.py', stream_output=...): the program's lines arrive as it
        runs (read from its pipes; a Python program runs unbuffered)."""
        folder = self.tmpdir()
        program = os.path.join(folder, 'live_prog.py')
        with open(program, 'w') as f:
            f.write(PROGRAM)
        go = self.wait_file()
        recorder = LineRecorder('program started')
        cluster = self.cluster(program, stream_output=recorder)
        job = cluster.submit(go)
        self.check_live_then_whole(job, recorder, go, 'program started', 'program done',
                                   'program stderr')
        self.assertEqual(job.result, 0)

    def test_a_flood_of_output_leaves_the_client_bounded(self):
        """A job printing 600 MB at full speed: the client's peak resident memory stays
        far below that, the job finishes with its result, job.stdout is capped with a
        marker, and every line printed was either given to the callback or counted in
        a notice."""
        proc = self.client('''
import json, re, sys, dispy
NOTICE = re.compile(r'\\[dispy: (\\d+) lines? of live output dropped\\]$')
got = {'lines': 0, 'lost': 0, 'other': 0}

def flood(megabytes):
    line = 'x' * 999 + '\\n'
    chunk = line * 64
    count = megabytes * 1000 * 1000 // len(chunk)
    for _ in range(count):
        sys.stdout.write(chunk)
    return count * 64

def count(job, stream, line):
    notice = NOTICE.match(line)
    if notice:
        got['lost'] += int(notice.group(1))
    elif line == 'x' * 999:
        got['lines'] += 1
    else:
        got['other'] += 1

def peak_kb():
    with open('/proc/self/status') as f:
        return int([l for l in f if l.startswith('VmHWM:')][0].split()[1])

cluster = dispy.JobCluster(flood, stream_output=count, recover_file=False)
job = cluster.submit(600)
printed = job(timeout=150)
cluster.wait(timeout=30)
print(json.dumps(dict(got, printed=printed, status=job.status, exception=job.exception,
                      stdout_len=len(job.stdout), marker='characters of stdout left out'
                      in job.stdout, peak_kb=peak_kb())))
cluster.close(timeout=30)
''', timeout=200)
        report = json.loads(proc.stdout.splitlines()[-1])
        self.assertEqual(report['status'], DispyJob.Finished, report)
        self.assertEqual(report['printed'], 600 * 1000 * 1000 // 64000 * 64)
        self.assertEqual(report['lines'] + report['lost'], report['printed'], report)
        self.assertEqual(report['other'], 0, report)
        self.assertTrue(report['marker'], report)
        self.assertLess(report['stdout_len'], dispy.LIVE_KEEP + 200)
        self.assertLess(report['peak_kb'], 200 * 1024, report)     # printed: 600 MB

    def test_no_output_messages_without_stream_output(self):
        """A cluster without stream_output gets no OUTPUT message (its job's output
        comes whole with the result); the same job with it does (the counter works)."""
        counts = collections.Counter()
        handle = dispy._NodeMessages.handlers['OUTPUT']

        def counting(scheduler, link, msg, loaded):
            counts[msg.key] += 1
            handle(scheduler, link, msg, loaded)

        with mock.patch.dict(dispy._NodeMessages.handlers, OUTPUT=counting):
            plain = self.cluster(echo_lines)
            job = plain.submit(50)
            self.assertEqual(job(timeout=T), 50, job.exception)
            self.assertEqual(job.stdout, ''.join('line %d\n' % i for i in range(50)))
            self.assertEqual(counts[job._key], 0)
            plain.close(timeout=T)
            recorder = LineRecorder()
            streamed = self.cluster(echo_lines, stream_output=recorder)
            live_job = streamed.submit(50)
            self.assertEqual(live_job(timeout=T), 50, live_job.exception)
            self.assertGreater(counts[live_job._key], 0)
            self.assertEqual(len(recorder.calls), 50)
            self.assertEqual(live_job.stdout, job.stdout)

    def test_example_live_output(self):
        """examples/live_output.py: prefixed lines of both jobs, then each result;
        the callback cluster's last stdout lines."""
        proc = self.client(os.path.join(support.ROOT, 'examples', 'live_output.py'))
        out = proc.stdout
        for n in (3, 4):
            for step in range(1, n + 1):
                self.assertRegex(out, r'(?m)^\d+ @ %s: step %d of %d$' % (
                    re.escape(NODE_IP), step, n))
            self.assertRegex(out, r'(?m)^job \d+: %d \(its stdout: %d lines\)$' % (n * n, n))
            self.assertRegex(proc.stderr, r'(?m)^\d+ @ %s: job of %d steps done$' % (
                re.escape(NODE_IP), n))
        for n in (2, 5):
            self.assertIn("last line 'step %d of %d'" % (n, n), out)


class StreamSchedulerTest(StreamTestCase):
    """A node on SCHED_NODE_IP and a dispyscheduler on CLIENT_IP using it."""

    @classmethod
    def setUpClass(cls):
        cls.node = support.NodeProcess(ip=SCHED_NODE_IP, cpus=2)
        cls.addClassCleanup(support.stop_node, cls.node)
        cls.node.start()
        cls.sched = support.SchedulerProcess(CLIENT_IP, nodes=[SCHED_NODE_IP],
                                             node_port=cls.node.port)
        cls.addClassCleanup(support.stop_node, cls.sched)
        cls.sched.start()

    def test_lines_through_the_scheduler(self):
        """A SharedJobCluster with stream_output gets the lines while the job runs,
        forwarded by dispyscheduler; job.stdout and job.stderr whole at the end."""
        go = self.wait_file()
        recorder = LineRecorder('first line')
        cluster = dispy.SharedJobCluster(print_then_wait, nodes=[SCHED_NODE_IP],
                                         scheduler_node=CLIENT_IP,
                                         scheduler_port=self.sched.port, recover_file=False,
                                         stream_output=recorder)
        self.addCleanup(support.close_now, cluster)
        job = cluster.submit(go)
        self.check_live_then_whole(job, recorder, go)
        self.assertEqual(job.ip_addr, SCHED_NODE_IP)


if __name__ == '__main__':
    unittest.main()
