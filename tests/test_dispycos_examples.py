"""dispycos's file, pipe, streaming and status examples, run unchanged.

``examples/dispycos_client4.py`` (files both ways), ``dispycos_client5.py`` (an
external program fed by messages), ``dispycos_client6.py`` and
``dispycos_client6_channel.py`` (streamed data, live analytics),
``dispycos_client7.py`` (scheduling driven by status messages) each run as a script
in a subprocess against two ``dispycosnode.py`` processes on 127.0.0.2 and 127.0.0.3
(2 servers each; tests/test_dispycos.py's helpers).  The tests read what the
examples print and the files they leave, not only their exit status.

``SendFileChecksTest`` checks the rules ``Pycos().send_file`` runs under, both ways
(client to server, server to client): a ``dir`` that leaves dest_path is refused,
an existing file is kept without ``overwrite``, a file over the receiver's
``max_file_size`` is refused, each with a warning that says why; files a server
received are gone once the computation closed.

The ``check_*`` functions read an example's output; tests/test_dispycos_lan.py uses
them for the same examples run on a network-namespace LAN.

Every wait is bounded; nodes are stopped by PID at the end of their class (their
servers must be gone too), clients killed at the end of their test, folders removed.
"""

import collections
import os
import re
import shutil
import tempfile
import unittest

try:
    from tests import support
    from tests.test_dispycos import (CLIENT_TIMEOUT, EXAMPLES, NODE_A, Client,
                                     DispycosNode, NodePairCase, client_env, files_under,
                                     stop_checked)
except ImportError:                         # run from inside tests/
    import support
    from test_dispycos import (CLIENT_TIMEOUT, EXAMPLES, NODE_A, Client, DispycosNode,
                               NodePairCase, client_env, files_under, stop_checked)

wait_until = support.wait_until
TASK = r'(\w+/\d+@(\S+):(\d+))'           # a remote task as printed: name/id@addr:port


def example_path(name):
    return os.path.join(EXAMPLES, name)


class ExampleScriptsTest(NodePairCase):
    """Each example, unchanged, in a fresh working directory (which must stay empty),
    with TMPDIR a folder of the test's (the client's Pycos().dest_path is in it)."""

    timeout = 90

    def example(self, name, args=()):
        tmp = tempfile.mkdtemp(prefix='dispytest-dispycos-tmp-')
        self.addCleanup(shutil.rmtree, tmp, True)
        env = dict(client_env(self.peers), TMPDIR=tmp)
        client = Client(self, example_path(name), env, args)
        client.finish(CLIENT_TIMEOUT, self.nodes_output())
        self.assertNotIn('Traceback', client.stderr(), client.output())
        self.assertNotIn('MISMATCH', client.stdout(), client.output())
        self.check_clean(client)
        client.tmp = tmp
        return client

    # -- client4: files ------------------------------------------------------------------
    def test_client4_files_both_ways(self):
        """6 data files to 6 remote tasks (send_file to each task's server, dir=...);
        each result file comes back to the client's dest_path/dispycos_client4 with
        the checksum, counts and the words of the component file counted, written
        by the server that says it; nothing stays on the nodes."""
        client = self.example('dispycos_client4.py', ['6'])
        check_client4(self, client.stdout(), client.tmp, self.servers, 6)

    # -- client5: an external program -----------------------------------------------------
    def test_client5_external_program_through_pipes(self):
        """3 remote tasks each run dispycos_client5_proc.py (a component file, found in
        the node's folder), feed it the 12 lines the client sends, and relay its output
        line by line: each line's sum and the running total match what the client sent;
        the program ends with its totals and exit status 0."""
        client = self.example('dispycos_client5.py', ['3', '12'])
        check_client5(self, client.stdout(), self.servers, 3, 12)

    # -- client6: streaming ---------------------------------------------------------------
    def test_client6_streaming_live_analytics(self):
        """500 readings per sensor, one message each, to two remote tasks; alerts
        (each crossing once, alternating) and progress reports reach the client's
        task while it still streams, and agree with the local computation."""
        client = self.example('dispycos_client6.py', ['500'])
        check_client6(self, client.stdout(), self.servers, 500)

    def test_client6_channel_broadcast(self):
        """Three remote tasks locate the client's channel and subscribe; each reading
        is sent once to the channel and reaches all three, each analysing it its own
        way, alerts coming while the stream flows."""
        client = self.example('dispycos_client6_channel.py', ['400'])
        check_client6_channel(self, client.stdout(), self.servers, 400)

    # -- client7: status messages -----------------------------------------------------------
    def test_client7_status_driven_each_event_once(self):
        """The status task schedules 12 jobs itself (run_at the server just initialized
        or just freed) and sees every event exactly once: each node discovered,
        initialized and closed once, each server discovered, initialized and closed
        once, each task created once and ended (MonitorStatus) once,
        ComputationScheduled once, ComputationClosed once and last."""
        client = self.example('dispycos_client7.py', ['12'])
        check_client7(self, client.stdout(), {n.location for n in self.nodes}, self.servers,
                      12)


# ================================================================================
# What each example prints (also used by tests/test_dispycos_lan.py)
# ================================================================================

def check_client4(test, out, tmp, servers, nfiles):
    """'dispycos_client4.py NFILES' with TMPDIR=tmp: every result file, where it says."""
    results = re.findall(r'^result (data\d+\.txt) from (\S+): sha1 ([0-9a-f]{40}), '
                         r'(\d+) lines, (\d+) words: ok\n  arrived at (\S+)$', out, re.M)
    test.assertEqual(sorted(r[0] for r in results),
                     sorted('data%d.txt' % i for i in range(nfiles)), out)
    dest = os.path.join(tmp, 'pycos', 'dispycos_client4')
    test.assertEqual(sorted(os.listdir(dest)),
                     sorted('data%d.result' % i for i in range(nfiles)))
    test.assertEqual(files_under(tmp), sorted(os.path.join(dest, 'data%d.result' % i)
                                              for i in range(nfiles)))   # inputs removed
    for name, where, sha1, lines, words, path in results:
        test.assertIn(where, servers, out)
        test.assertEqual(path, os.path.join(dest, name.replace('.txt', '.result')))
        with open(path) as f:
            text = f.read().splitlines()
        fields = dict(line.split(' ', 1) for line in text if not line.startswith('count'))
        test.assertEqual(fields['file'], name)
        test.assertEqual(fields['sha1'], sha1)
        test.assertEqual(fields['server'], where)
        test.assertEqual((fields['lines'], fields['words']), (lines, words))
        test.assertTrue(20 <= int(lines) <= 60, text)
        test.assertEqual(int(words), 9 * int(lines), text)      # 8 words and a number
        # the component file (rules.txt, in the node's folder) said what to count
        counted = [line.split()[1] for line in text if line.startswith('count ')]
        test.assertEqual(counted, ['alpha', 'pycos', 'dispy'], text)
        test.assertLessEqual(sum(int(line.split()[2]) for line in text
                                 if line.startswith('count ')), int(words))
        test.assertRegex(fields['upper'], r'^[A-Z ]+ 0$')
    test.assertEqual(len(out.strip().splitlines()), 2 * nfiles, out)
    test.assertNotIn('MISMATCH', out)


def check_client5(test, out, servers, ntasks, nlines):
    """'dispycos_client5.py NTASKS NLINES': each task's lines relayed, in order."""
    lines = re.findall(r'^%s line (\d+): count (\d+) sum (-?\d+) min \S+ max \S+ '
                       r'total (-?\d+): ok$' % TASK, out, re.M)
    by_task = collections.defaultdict(list)
    for task, addr, port, n, _count, _sum, total in lines:
        test.assertIn('%s:%s' % (addr, port), servers, out)
        by_task[task].append((int(n), int(total)))
    test.assertEqual(len(by_task), ntasks, out)
    for task, seen in by_task.items():
        test.assertEqual([n for n, _ in seen], list(range(1, nlines + 1)), out)
        total = seen[-1][1]
        test.assertIn('%s end: %d lines, total %d' % (task, nlines, total), out)
        test.assertIn('%s done: %d lines relayed, program exit status 0' % (task, nlines + 1),
                      out)
    test.assertEqual(len(out.strip().splitlines()), ntasks * (nlines + 2), out)
    test.assertNotIn('MISMATCH', out)


def check_alerts(test, out, servers, names, readings):
    """The alert and summary lines of 'dispycos_client6*.py'."""
    alerts = re.findall(r'^alert (\S+): moving average ([\d.]+) went (above|below)'
                        r'(?: [\d.]+)? at reading (\d+)( \(while streaming: (\d+) readings '
                        r'sent\))?$', out, re.M)
    by_name = collections.defaultdict(list)
    live = 0
    for name, _average, direction, seq, streaming, sent in alerts:
        by_name[name].append(direction)
        if streaming:
            live += 1
            test.assertGreater(int(sent), int(seq), out)     # after its reading
    test.assertEqual(sorted(by_name), sorted(names), out)
    for name in names:
        test.assertRegex(out, r'(?m)^%s: %d alerts, as computed here$'
                         % (re.escape(name), len(by_name[name])))
        test.assertGreater(len(by_name[name]), 2, out)
        # up, down, up, ...: each crossing reported once
        test.assertEqual(by_name[name][::2], ['above'] * len(by_name[name][::2]), out)
        test.assertEqual(by_name[name][1::2], ['below'] * len(by_name[name][1::2]), out)
        summary = re.search(r'(?m)^summary %s at (\S+): %d readings, .*\b(\d+) alerts$'
                            % (re.escape(name), readings), out)
        test.assertIsNotNone(summary, out)
        test.assertIn(summary.group(1), servers)
        test.assertEqual(int(summary.group(2)), len(by_name[name]), out)
    # the analytics came while the data was still being sent (most of them: the
    # stream lasts a second or so, an alert takes milliseconds)
    test.assertGreater(live, len(alerts) // 3, out)
    test.assertNotIn('MISMATCH', out)
    return alerts


def check_client6(test, out, servers, readings):
    """'dispycos_client6.py READINGS'."""
    check_alerts(test, out, servers, ['sensor-a', 'sensor-b'], readings)
    progress = re.findall(r'^progress (\S+): reading (\d+), ', out, re.M)
    test.assertEqual(sorted(progress), sorted(
        (s, str(n)) for s in ('sensor-a', 'sensor-b') for n in range(99, readings, 100)))


def check_client6_channel(test, out, servers, readings):
    """'dispycos_client6_channel.py READINGS'."""
    names = ['long-60', 'long-70', 'short-70']
    subscribed = re.findall(r'^(\S+) subscribed at (\S+)$', out, re.M)
    test.assertEqual(sorted(n for n, _ in subscribed), names, out)
    for _name, where in subscribed:
        test.assertIn(where, servers)
    test.assertIn('\n3 subscribers\n', out)
    check_alerts(test, out, servers, names, readings)


def check_client7(test, out, nodes, servers, njobs, restarted=()):
    """What 'dispycos_client7.py NJOBS' printed: every event exactly once, every job's
    result.  ``restarted``: servers killed and replaced (same location) during the
    run: each of their server events twice (the dead one's, the replacement's).
    Returns the MonitorStatus lines (task, addr, port, type, value)."""
    statuses = re.findall(r'^status (\w+) (\S+)$', out, re.M)
    count = collections.Counter(statuses)
    for (name, info), n in sorted(count.items()):
        if name == 'TaskCreated':
            continue
        want = 2 if name.startswith('Server') and info in restarted else 1
        test.assertEqual(n, want, 'status %s %s seen %d times\n%s' % (name, info, n, out))
    names = collections.defaultdict(set)
    for name, info in statuses:
        names[name].add(info)
    test.assertEqual(len(names['ComputationScheduled']), 1, out)
    test.assertEqual(statuses[0][0], 'ComputationScheduled', out)
    test.assertEqual(statuses[-1][0], 'ComputationClosed', out)
    test.assertEqual(names['ComputationClosed'], names['ComputationScheduled'], out)
    for kind in ('NodeDiscovered', 'NodeInitialized', 'NodeClosed'):
        test.assertEqual(names[kind], set(nodes), (kind, out))
    for kind in ('ServerDiscovered', 'ServerInitialized', 'ServerClosed'):
        test.assertEqual(names[kind], set(servers), (kind, out))
    # each task created once, ended once (a MonitorStatus), as submitted
    created = collections.Counter(info for name, info in statuses if name == 'TaskCreated')
    monitors = re.findall(r'^monitor %s (\w+) (.*)$' % TASK, out, re.M)
    ended = collections.Counter(m[0] for m in monitors)
    submitted = re.findall(r'^job (\d+) \(([\d.]+)\) submitted at (\S+) as %s$' % TASK,
                           out, re.M)
    made = collections.Counter(s[3] for s in submitted)
    test.assertEqual(created, ended, out)
    test.assertEqual(created, made, out)
    for task, n in created.items():
        # B3 (/tmp/helperB/bugs.md): a replacement server's tasks may take the names
        # of the dead one's; elsewhere a name is one task's
        if task.split('@')[1] not in restarted:
            test.assertEqual(n, 1, 'task %s created %d times\n%s' % (task, n, out))
    for job, _arg, where, _task, addr, port in submitted:
        test.assertEqual(where, '%s:%s' % (addr, port), out)     # run_at that server
    results = re.findall(r'^result for ([\d.]+): slept ([\d.]+) s at (\S+)$', out, re.M)
    test.assertEqual(len(results), njobs, out)
    for arg, slept, where in results:
        test.assertEqual(arg, slept, out)
        test.assertIn(where, servers, out)
    ok = [m for m in monitors if m[3] == 'StopIteration']
    test.assertEqual(len(ok), njobs, out)
    for _task, addr, port, _kind, value in ok:
        test.assertRegex(value, r'^slept [\d.]+ s at %s:%s$' % (re.escape(addr), port))
    # a job runs again (once more) for each task lost
    lost = [m for m in monitors if m[3] != 'StopIteration']
    for m in lost:
        test.assertEqual(m[3], 'PeerLost', out)
    again = re.findall(r'^job (\d+) lost: it runs again$', out, re.M)
    test.assertEqual(len(again), len(lost), out)
    jobs = collections.Counter(int(s[0]) for s in submitted)
    test.assertEqual(sorted(jobs), list(range(njobs)), out)
    test.assertEqual(sum(jobs.values()), njobs + len(lost), out)
    test.assertNotIn('not a task of this program', out)
    test.assertNotIn('other message', out)
    test.assertNotIn('could not run', out)
    return monitors


# ================================================================================
# send_file's rules
# ================================================================================

SEND_FILE_CLIENT = '''
import os


def hold(task=None):
    """Keeps a server busy until told; lists what it received, sends files back."""
    import os
    while True:
        msg = yield task.receive(timeout=30)
        if not isinstance(msg, tuple):
            return msg
        if msg[0] == 'list':
            dest = pycos.Pycos().dest_path
            msg[1].send(['files', dest, os.getcwd(), sorted(
                os.path.relpath(os.path.join(d, f), dest)
                for d, _dirs, files in os.walk(dest) for f in files)])
            continue
        client, size, folder = msg
        with open('back.bin', 'wb') as f:
            f.write(b'b' * size)
        sent = yield pycos.Pycos().send_file(client.location, 'back.bin', dir=folder,
                                             overwrite=True)
        os.remove('back.bin')
        client.send(['back', size, folder, sent])


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    rtask = yield computation.run(hold)
    emit('server', str(rtask.location))
    emit('dest', pycos.Pycos().dest_path)
    for size in (1000, 1001, 3000):
        with open('../f%d.bin' % size, 'wb') as f:
            f.write(b'x' * size)
    sent = {}
    for key, path, folder, overwrite in [
            ('plain', '../f1000.bin', None, True), ('sub', '../f1000.bin', 'sub/deeper', True),
            ('dotdot', '../f1000.bin', '..', True), ('escape', '../f1000.bin', '../escape', True),
            ('inner_escape', '../f1000.bin', 'a/../../escape', True),
            ('again_no_overwrite', '../f1000.bin', None, False),
            ('too_big', '../f1001.bin', None, True), ('much_too_big', '../f3000.bin', 'sub', True),
            ('missing', '../nonexistent.bin', None, True)] + [
            ('absolute', '../f1000.bin', '/abs', True)] * ('absolute' in sys.argv):
        sent[key] = yield pycos.Pycos().send_file(rtask.location, path, dir=folder,
                                                  overwrite=overwrite)
    emit('sent', sent)
    rtask.send(('list', task))
    emit('received', (yield task.receive(timeout=20)))
    back = {}
    for size, folder in ((500, 'in'), (500, '..'), (500, '../../x'), (2000, 'in')):
        rtask.send((task, size, folder))
        msg = yield task.receive(timeout=20)
        back['%d %s' % (size, folder)] = msg[3] if msg else None
    emit('back', back)
    rtask.send('done')
    yield rtask.finish(timeout=20)
    yield computation.close()
    for size in (1000, 1001, 3000):
        os.remove('../f%d.bin' % size)


pycos.Pycos(max_file_size=1500)     # what this client accepts from peers
pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([hold]))
'''

CLOSE_CLIENT = '''
def hold(task=None):
    msg = yield task.receive(timeout=30)
    return msg


def client_proc(computation, task=None):
    if (yield computation.schedule()):
        raise Exception('not scheduled')
    rtask = yield computation.run(hold)
    with open('../sent.txt', 'w') as f:
        f.write('sent to a server')
    emit('sent', (yield pycos.Pycos().send_file(rtask.location, '../sent.txt', dir='sub')))
    rtask.send('done')
    yield rtask.finish(timeout=20)
    yield computation.close()


pycos.Scheduler()
pycos.Task(client_proc, pycos.Computation([hold]))
'''


class SendFileChecksTest(unittest.TestCase):
    """One node, --max_file_size 1000, one server; send_file both ways."""

    timeout = 60

    @classmethod
    def setUpClass(cls):
        cls.node = DispycosNode(NODE_A, cpus=1, args=['--max_file_size', '1000'])
        cls.addClassCleanup(stop_checked, cls.node)
        cls.node.start()

    def empty_dest(self):
        """Whatever a test's computation left in the node's --dest_path (nothing,
        since a server's files go at close; B2 was this), not the node's folder."""
        for name in os.listdir(self.node.dest):
            if name != 'dispycos':
                path = os.path.join(self.node.dest, name)
                (shutil.rmtree if os.path.isdir(path) else os.remove)(path)

    def run_client(self, source, args=()):
        tmp = tempfile.mkdtemp(prefix='dispytest-dispycos-tmp-')
        self.addCleanup(shutil.rmtree, tmp, True)
        client = Client(self, None, dict(client_env([self.node.location]), TMPDIR=tmp),
                        args, source)
        client.finish(30, self.node.output())
        client.tmp = tmp
        return client

    def test_send_file_rules_both_ways(self):
        self.addCleanup(self.empty_dest)
        client = self.run_client(SEND_FILE_CLIENT)
        out = client.output() + self.node.output()
        sent, back = client.record('sent'), client.record('back')
        # to the server: under its Pycos().dest_path, inside the node's --dest_path
        _files, dest, _cwd, received = client.record('received')
        self.assertTrue(dest.startswith(self.node.dest + os.sep), (dest, self.node.dest))
        self.assertEqual(sent['plain'], 0, out)
        self.assertEqual(sent['sub'], 0, out)
        self.assertEqual(received, ['f1000.bin', os.path.join('sub', 'deeper', 'f1000.bin')],
                         out)
        # a dir that leaves dest_path: refused, nothing written outside it
        for key in ('dotdot', 'escape', 'inner_escape'):
            self.assertEqual(sent[key], -1, (key, out))
        stderr = client.stderr()
        for path in ('../f1000.bin', '../escape/f1000.bin', 'a/../../escape/f1000.bin'):
            self.assertIn("refused path %r: it would leave the destination folder" % path,
                          stderr)
        leaked = [p for p in files_under(self.node.dir) if 'escape' in p
                  or os.path.dirname(p) in (os.path.dirname(dest), self.node.dir)
                  and os.path.basename(p) not in ('stdout', 'stderr')]
        self.assertEqual(leaked, [], files_under(self.node.dir))
        # an existing file without overwrite: kept, said so
        self.assertEqual(sent['again_no_overwrite'], -1, out)
        self.assertIn('f1000.bin exists at %s' % client.record('server'), stderr)
        # the node's --max_file_size (1000): 1000 bytes pass, 1001 do not
        self.assertEqual(sent['too_big'], -1, out)
        self.assertEqual(sent['much_too_big'], -1, out)
        self.assertEqual(stderr.count("file is bigger than this node's --max_file_size "
                                      "(1000 bytes)"), 2, stderr)
        self.assertFalse([p for p in files_under(self.node.dir) if 'f1001' in p
                          or 'f3000' in p], files_under(self.node.dir))
        # no such file at the sender: -1, said so
        self.assertEqual(sent['missing'], -1, out)
        self.assertIn('No such file or directory', stderr)
        # back to the client: its dest_path, its own max_file_size (1500), no escape
        self.assertEqual(back, {'500 in': 0, '500 ..': -1, '500 ../../x': -1, '2000 in': -1},
                         out)
        cdest = client.record('dest')
        self.assertEqual(cdest, os.path.join(client.tmp, 'pycos'))
        self.assertEqual(files_under(client.tmp), [os.path.join(cdest, 'in', 'back.bin')])
        with open(os.path.join(cdest, 'in', 'back.bin'), 'rb') as f:
            self.assertEqual(f.read(), b'b' * 500)
        self.assertIn("file is bigger than this node's --max_file_size (1500 bytes)",
                      self.node.output())

    def test_absolute_dir_refused(self):
        self.addCleanup(self.empty_dest)
        client = self.run_client(SEND_FILE_CLIENT, ['absolute'])
        self.assertEqual(client.record('sent')['absolute'], -1, client.output())
        self.assertEqual(client.record('received')[3],
                         ['f1000.bin', os.path.join('sub', 'deeper', 'f1000.bin')])
        self.assertFalse([p for p in files_under(self.node.dir) if 'abs' in p.split(os.sep)])

    def test_sent_files_removed_at_close(self):
        self.addCleanup(self.empty_dest)
        client = self.run_client(CLOSE_CLIENT)
        self.assertEqual(client.record('sent'), 0, client.output())
        self.assertTrue(wait_until(lambda: not files_under(self.node.dest), 5),
                        files_under(self.node.dest))


if __name__ == '__main__':
    unittest.main()
