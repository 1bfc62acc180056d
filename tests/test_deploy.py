"""The deployment recipes in deploy/, run for real on loopback.

    SystemdUnitTest   systemd-analyze verify accepts dispynode.service (paths moved to a
                      temporary folder); the unit's ExecStart command line, run as it is
                      but on loopback, serves a client and stops on SIGTERM with status 0
    DockerTest        the Dockerfile's ENTRYPOINT options start a node that serves one
                      client, then exits; docker-loop.sh (with DISPYNODE_CMD running
                      dispynode.py itself: no Docker here) serves two clients with two
                      fresh nodes and ends after LOOP_COUNT runs; SIGTERM stops it; a
                      failing command is retried after LOOP_DELAY; its default command
                      is a well-formed "docker run" line (a stand-in docker records it)
    CheckNodesTest    check_nodes.py: two live nodes are ok (exit 0), a missing one is
                      named within --timeout (exit 1), a wrong secret and a busy node
                      are told apart
    StartNodesTest    start-nodes.sh: bash -n; with a stand-in ssh that runs the remote
                      command here, it starts a node that check_nodes.py finds, and
                      leaves a running one alone

Every node gets -i 127.0.0.N and -p; every client names its nodes and 127.0.0.1;
every process started here is stopped by its PID, also when a test fails.
"""

import grp
import inspect
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob

DEPLOY = os.path.join(support.ROOT, 'deploy')
UNIT = os.path.join(DEPLOY, 'dispynode.service')
DOCKERFILE = os.path.join(DEPLOY, 'Dockerfile')
LOOP = os.path.join(DEPLOY, 'docker-loop.sh')
CHECK_NODES = os.path.join(DEPLOY, 'check_nodes.py')
START_NODES = os.path.join(DEPLOY, 'start-nodes.sh')
T = 20                                      # seconds for one step (a node to start, a job)


def node_pid():
    """The job: the pid of the dispynode process it runs under (its nearest ancestor
    whose command line names dispynode.py)."""
    import os
    pid = os.getpid()
    for _ in range(10):
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            if b'dispynode.py' in f.read():
                return pid
        with open('/proc/%d/stat' % pid) as f:
            pid = int(f.read().rsplit(')', 1)[1].split()[1])
    return None


def square(x):
    return x * x


CLIENT_SCRIPT = '''
import sys
import dispy

''' + inspect.getsource(node_pid) + '''

if __name__ == '__main__':
    cluster = dispy.JobCluster(node_pid)
    job = cluster.submit()
    print('node pid', job(timeout=20), job.status == dispy.DispyJob.Finished)
    cluster.close(timeout=10)
'''


class CommandNode(support.NodeProcess):
    """A node started with exactly ``command`` (NodeProcess's readiness wait, output
    files and cleanup, not its options)."""

    def __init__(self, command, ip, port, env=None):
        super().__init__(ip, port, cpus=None, env=env)
        self.command_line = list(command)

    def _command(self):
        return self.command_line

    def _kill_leftovers(self):
        # NodeProcess.stop() calls this also when the node has exited and been reaped:
        # its PID may belong to another process by then.
        if self.proc.poll() is None:
            super()._kill_leftovers()


def udp_free(ip, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def common_free_port(ips):
    """A port free for TCP and UDP on every address of ``ips``."""
    for _ in range(50):
        port = support.free_port(ips[0])
        if all(support.tcp_free(ip, port) and udp_free(ip, port) for ip in ips[1:]):
            return port
    raise RuntimeError('no port free on all of %s' % ips)


def plain_env(**extra):
    """This environment without PYTHONPATH and DISPY_* (a script finds dispy itself)."""
    env = {k: v for k, v in os.environ.items()
           if k != 'PYTHONPATH' and not k.startswith('DISPY')}
    env.update(extra)
    return env


def write_secret(path, secret):
    with open(path, 'w') as f:
        f.write(secret + '\n')
    os.chmod(path, 0o600)
    return path


def copy_node_files(folder):
    """dispy.py and dispynode.py copied into ``folder``, as the recipes install them."""
    os.makedirs(folder, exist_ok=True)
    for name in ('dispy.py', 'dispynode.py'):
        shutil.copy(os.path.join(support.ROOT, name), folder)
    return folder


def rewrite_node_command(argv, python, script, values, extra):
    """A dispynode command line with its interpreter, script and the values of the
    options in ``values`` replaced; -i/-p dropped (``extra``, appended, gives them)."""
    out = [python, script]
    drop = {'-i', '--ip_addr', '--host', '-p', '--node_port', '--port'}
    args = iter(argv[2:])
    for arg in args:
        name = arg.split('=', 1)[0]
        if name in drop:
            if '=' not in arg:
                next(args, None)
            continue
        if name in values:
            if '=' not in arg:
                next(args, None)
            out += [name, values[name]]
            continue
        out.append(arg)
    return out + list(extra)


def exec_start(unit_text):
    """The unit's ExecStart= command as a list (systemd's prefixes -@:+! dropped)."""
    lines = [l.split('=', 1)[1].strip() for l in unit_text.splitlines()
             if l.startswith('ExecStart=')]
    if len(lines) != 1:
        raise AssertionError('expected one ExecStart= line, found %d' % len(lines))
    return shlex.split(lines[0].lstrip('-@:+!'))


def serving_lines(text):
    return support.READY_RE.findall(text)


class SystemdUnitTest(unittest.TestCase):

    timeout = 90

    def setUp(self):
        self.tmp = support.temp_folder(self, 'dispytest-deploy-')
        with open(UNIT) as f:
            self.unit = f.read()

    def test_systemd_analyze_verify(self):
        if not shutil.which('systemd-analyze'):
            self.skipTest('systemd-analyze is not installed')
        opt = copy_node_files(os.path.join(self.tmp, 'opt-dispy'))
        secret = write_secret(os.path.join(self.tmp, 'secret'), 'unit-secret')
        argv = exec_start(self.unit)
        # verify checks that ExecStart's program exists: point it at this Python.
        text = self.unit.replace('ExecStart=%s ' % argv[0],
                                 'ExecStart=%s ' % sys.executable)
        for old, new in (('/opt/dispy', opt), ('/var/lib/dispy', os.path.join(self.tmp, 'state')),
                         ('/etc/dispy/secret', secret)):
            text = text.replace(old, new)
        # Some systemd versions warn about a User= that does not exist (no "dispy" here).
        me = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        text = re.sub(r'(?m)^User=.*$', 'User=' + me, text)
        text = re.sub(r'(?m)^Group=.*$', 'Group=' + group, text)
        path = os.path.join(self.tmp, 'dispynode.service')
        with open(path, 'w') as f:
            f.write(text)
        proc = subprocess.run(['systemd-analyze', 'verify', '--man=no', path],
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        # verify exits 0 on unknown keys and bad values ("..., ignoring"): any line about
        # our unit is a mistake in it.
        about_unit = [l for l in output.splitlines()
                      if 'dispynode.service' in l or self.tmp in l]
        if proc.returncode != 0 and not about_unit:
            self.skipTest('systemd-analyze verify does not work here (status %d): %s'
                          % (proc.returncode, output.strip()[:500]))
        self.assertEqual(about_unit, [], output)
        self.assertEqual(proc.returncode, 0, output)

    def test_unit_command_line_runs_a_node(self):
        argv = exec_start(self.unit)
        self.assertTrue(argv[0].endswith('python3') and argv[1].endswith('/dispynode.py'),
                        argv)
        for option in ('--daemon', '--secret_file', '--dest_path_prefix'):
            self.assertIn(option, argv)
        self.assertIn('WorkingDirectory=%s' % os.path.dirname(argv[1]), self.unit)
        opt = copy_node_files(os.path.join(self.tmp, 'opt-dispy'))
        secret = 'unit secret %d' % os.getpid()
        secret_file = write_secret(os.path.join(self.tmp, 'secret'), secret)
        port = support.free_port('127.0.0.2')
        # The unit's options, on loopback and in the temporary folder; -c 2 keeps it light.
        command = rewrite_node_command(
            argv, sys.executable, os.path.join(opt, 'dispynode.py'),
            {'--secret_file': secret_file,
             '--dest_path_prefix': os.path.join(self.tmp, 'state')},
            ['-i', '127.0.0.2', '-p', str(port), '-c', '2'])
        node = CommandNode(command, '127.0.0.2', port, env=plain_env())
        self.addCleanup(node.stop)      # also closes its files when it exited already
        node.start()
        with open('/proc/%d/cmdline' % node.proc.pid, 'rb') as f:
            self.assertNotIn(secret.encode(), f.read())     # --secret_file: not in ps
        cluster = dispy.JobCluster(square, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                                   node_port=port, secret=secret)
        self.addCleanup(cluster.close, terminate=True, timeout=2)
        jobs = [cluster.submit(i) for i in range(4)]
        for i, job in enumerate(jobs):
            self.assertEqual(job(timeout=T), i * i, '%s: %s\n%s'
                             % (job.status, job.exception, node.output()))
        cluster.close(timeout=10)
        processes = node.descendants()
        self.addCleanup(support.kill_pids, processes)
        node.signal(signal.SIGTERM)
        self.assertEqual(node.wait(T), 0, node.output())
        self.assertIn('dispynode: stopped', node.stdout())
        self.assertNotIn('can be read by other users', node.stderr())
        self.assertTrue(support.wait_until(
            lambda: not any(support.pid_alive(p) for p in processes), 10),
            'left behind: %s' % [p for p in processes if support.pid_alive(p)])


class LoopProcess:
    """deploy/docker-loop.sh started with ``env``, its output in files of ``folder``;
    ``stop()`` (a cleanup) kills it and whatever it started, by PID."""

    def __init__(self, folder, env):
        self.out = open(os.path.join(folder, 'loop.out'), 'w+b')
        self.err = open(os.path.join(folder, 'loop.err'), 'w+b')
        self.proc = subprocess.Popen(['bash', LOOP], env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=self.err,
                                     start_new_session=True,
                                     preexec_fn=support.die_with_parent)
        self.seen = set()       # processes it started, for stop()

    def children(self):
        pids = support.descendants(self.proc.pid)
        self.seen.update(pids)
        return pids

    def node_pids(self):
        return [p for p in self.children() if b'dispynode.py' in _cmdline(p)]

    def stdout(self):
        return support.read_file(self.out.name)

    def stderr(self):
        return support.read_file(self.err.name)

    def output(self):
        return 'stdout:\n%s\nstderr:\n%s' % (self.stdout(), self.stderr())

    def stop(self):
        if self.proc.poll() is None:
            self.children()
            support.kill_pids([self.proc.pid])
            self.proc.wait(5)
        support.kill_pids(sorted(self.seen))
        self.out.close()
        self.err.close()


def _cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read()
    except OSError:
        return b''


class DockerTest(unittest.TestCase):

    timeout = 90

    def setUp(self):
        self.tmp = support.temp_folder(self, 'dispytest-deploy-')

    def dockerfile(self):
        """{instruction: [its lines' arguments]} of deploy/Dockerfile."""
        found = {}
        with open(DOCKERFILE) as f:
            for line in f:
                if line.strip() and not line.lstrip().startswith('#'):
                    word, _, rest = line.strip().partition(' ')
                    found.setdefault(word.upper(), []).append(rest.strip())
        return found

    def loop(self, **env):
        loop = LoopProcess(self.tmp, plain_env(**env))
        self.addCleanup(loop.stop)
        return loop

    def node_command(self, port, *extra):
        return shlex.join([sys.executable, support.NODE_SCRIPT, '-i', '127.0.0.2',
                           '-p', str(port), '--daemon', '--serve', '1', '--dest_path_prefix',
                           os.path.join(self.tmp, 'dest'), '-c', '1'] + list(extra))

    def test_dockerfile_entrypoint_options(self):
        found = self.dockerfile()
        self.assertTrue(found['FROM'][0].startswith('python:3.11-slim'), found['FROM'])
        entry = json.loads(found['ENTRYPOINT'][-1])
        cmd = json.loads(found['CMD'][-1]) if 'CMD' in found else []
        self.assertEqual(entry[0], 'python3')
        copied = found['COPY'][0].split()
        self.assertEqual(set(copied[:-1]), {'dispy.py', 'dispynode.py'})
        self.assertEqual(os.path.dirname(entry[1]), copied[-1].rstrip('/'))
        for port in ('51348', '51348/udp'):
            self.assertIn(port, found['EXPOSE'][0].split())
        self.assertIn('--daemon', entry)
        port = support.free_port('127.0.0.2')
        command = ([sys.executable, support.NODE_SCRIPT] + entry[2:] + cmd +
                   ['-i', '127.0.0.2', '-p', str(port), '-c', '1',
                    '--dest_path_prefix', os.path.join(self.tmp, 'dest')])
        node = CommandNode(command, '127.0.0.2', port)
        self.addCleanup(node.stop)
        node.start()
        # --serve 1: one client, then the node exits by itself (the container ends).
        cluster = dispy.JobCluster(square, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                                   node_port=port)
        self.addCleanup(cluster.close, terminate=True, timeout=2)
        job = cluster.submit(7)
        self.assertEqual(job(timeout=T), 49, '%s: %s\n%s' % (job.status, job.exception,
                                                             node.output()))
        cluster.close(timeout=10)
        self.assertEqual(node.wait(T), 0, node.output())

    def test_loop_gives_each_client_a_fresh_node(self):
        port = support.free_port('127.0.0.2')
        loop = self.loop(DISPYNODE_CMD=self.node_command(port), LOOP_COUNT='2')
        self.assertTrue(support.wait_until(lambda: serving_lines(loop.stdout()), T),
                        loop.output())
        # The first client: a cluster of this process.
        cluster = dispy.JobCluster(node_pid, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                   port=0, node_port=port)
        self.addCleanup(cluster.close, terminate=True, timeout=2)
        job = cluster.submit()
        first = job(timeout=T)
        self.assertEqual(job.status, DispyJob.Finished, '%s\n%s' % (job.exception,
                                                                    loop.output()))
        self.assertIn(first, loop.node_pids())
        cluster.close(timeout=10)
        # Its node exits once that client is done; the loop starts another one.
        self.assertTrue(support.wait_until(
            lambda: len(serving_lines(loop.stdout())) >= 2 and not support.pid_alive(first),
            T), loop.output())
        # The second client: another program.
        proc = support.run_client(CLIENT_SCRIPT, support.client_env(['127.0.0.2'],
                                                                    node_port=port), timeout=40)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr + loop.output())
        match = re.search(r'node pid (\d+) True', proc.stdout)
        self.assertTrue(match, proc.stdout + proc.stderr)
        self.assertNotEqual(int(match.group(1)), first)
        # LOOP_COUNT=2: that node's exit ends the loop.
        self.assertEqual(loop.proc.wait(T), 0, loop.output())
        self.assertEqual(len(serving_lines(loop.stdout())), 2, loop.output())
        self.assertEqual(loop.stdout().count('dispynode: stopped'), 2, loop.output())
        self.assertIn('done after 2 run(s), last status 0', loop.stderr())

    def test_sigterm_stops_node_and_loop(self):
        port = support.free_port('127.0.0.2')
        loop = self.loop(DISPYNODE_CMD=self.node_command(port))     # no LOOP_COUNT: forever
        self.assertTrue(support.wait_until(lambda: serving_lines(loop.stdout()), T),
                        loop.output())
        nodes = loop.node_pids()
        self.assertEqual(len(nodes), 1, loop.output())
        processes = loop.children()
        loop.proc.send_signal(signal.SIGTERM)
        self.assertEqual(loop.proc.wait(T), 0, loop.output())
        self.assertIn('dispynode: stopped', loop.stdout())
        self.assertIn('done after 1 run(s)', loop.stderr())
        self.assertTrue(support.wait_until(
            lambda: not any(support.pid_alive(p) for p in processes), 10),
            'left behind: %s' % [p for p in processes if support.pid_alive(p)])

    def test_failing_command_is_retried_after_a_delay(self):
        start = time.monotonic()
        loop = self.loop(DISPYNODE_CMD='false', LOOP_COUNT='2', LOOP_DELAY='1')
        self.assertEqual(loop.proc.wait(T), 1, loop.output())
        self.assertGreaterEqual(time.monotonic() - start, 1.0)
        self.assertEqual(loop.stderr().count('next run in 1s'), 1, loop.output())
        self.assertIn('done after 2 run(s), last status 1', loop.stderr())
        bad = self.loop(LOOP_COUNT='forever')
        self.assertEqual(bad.proc.wait(T), 2, bad.output())

    def test_default_command_is_docker_run(self):
        # A stand-in docker on PATH records its arguments (no Docker engine here).
        bin_dir = os.path.join(self.tmp, 'bin')
        os.makedirs(bin_dir)
        record = os.path.join(self.tmp, 'docker-args')
        fake = os.path.join(bin_dir, 'docker')
        with open(fake, 'w') as f:
            f.write('#!/bin/sh\nprintf "%%s\\n" "$@" > %s\n' % shlex.quote(record))
        os.chmod(fake, 0o755)
        secret_file = write_secret(os.path.join(self.tmp, 'my secret'), 'docker secret')
        loop = self.loop(PATH=bin_dir + os.pathsep + os.environ.get('PATH', ''),
                         LOOP_COUNT='1', DISPY_SECRET_FILE=secret_file,
                         DISPYNODE_ARGS='-c 4 --name gpu1')
        self.assertEqual(loop.proc.wait(T), 0, loop.output())
        with open(record) as f:
            args = f.read().splitlines()
        st = os.stat(secret_file)
        self.assertEqual(args, ['run', '--rm', '--init', '--network', 'host', '--user',
                                '%d:%d' % (st.st_uid, st.st_gid), '-v',
                                secret_file + ':/run/secrets/dispy:ro', 'dispynode',
                                '--secret_file', '/run/secrets/dispy', '-c', '4', '--name',
                                'gpu1'])


class CheckNodesTest(unittest.TestCase):

    timeout = 90
    SECRET = 'check nodes secret'
    TIMEOUT = 5         # check_nodes.py --timeout

    @classmethod
    def setUpClass(cls):
        cls.port = common_free_port(['127.0.0.2', '127.0.0.3', '127.0.0.4'])
        cls.nodes = []
        try:
            for ip in ('127.0.0.2', '127.0.0.3'):
                node = support.NodeProcess(ip, cls.port, cpus=2, secret=cls.SECRET)
                cls.nodes.append(node)
                node.start()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for node in cls.nodes:
            support.stop_node(node)

    def check(self, *args, secret_args=None):
        tmp = support.temp_folder(self, 'dispytest-deploy-')
        if secret_args is None:
            secret_args = ['--secret_file', write_secret(os.path.join(tmp, 'secret'),
                                                         self.SECRET)]
        # No PYTHONPATH: check_nodes.py finds dispy.py in the folder above deploy/.
        start = time.monotonic()
        proc = support.run_client(CHECK_NODES, plain_env(), timeout=60, cwd=tmp, args=[
            '-i', '127.0.0.1', '--client_port', '0', '--node_port', str(self.port),
            '--timeout', str(self.TIMEOUT)] + secret_args + list(args))
        return proc, time.monotonic() - start

    def lines(self, proc):
        return dict(line.split(': ', 1) for line in proc.stdout.splitlines() if ': ' in line)

    def assert_ok(self, lines, host):
        self.assertRegex(lines.get(host, ''), r'^ok, 2 CPUs, \S+, Python \d+\.\d+', lines)

    def test_all_nodes_answer(self):
        proc, elapsed = self.check('127.0.0.2', '127.0.0.3')
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        lines = self.lines(proc)
        self.assertEqual(len(proc.stdout.splitlines()), 2, proc.stdout)
        self.assert_ok(lines, '127.0.0.2')
        self.assert_ok(lines, '127.0.0.3')
        self.assertLess(elapsed, self.TIMEOUT, 'all answered: no need to wait')

    def test_missing_node_is_named(self):
        self.assertTrue(support.tcp_free('127.0.0.4', self.port))     # nothing there
        proc, elapsed = self.check('127.0.0.2', '127.0.0.3', '127.0.0.4')
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        lines = self.lines(proc)
        self.assert_ok(lines, '127.0.0.2')
        self.assert_ok(lines, '127.0.0.3')
        self.assertTrue(lines.get('127.0.0.4', '').startswith('no answer'), proc.stdout)
        # --timeout, plus the interpreter's start and the cluster's close.
        self.assertLess(elapsed, self.TIMEOUT + 4, proc.stdout)

    def test_wrong_secret_and_busy_node(self):
        proc, _ = self.check('127.0.0.2', secret_args=['-s', 'not the secret'])
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn('wrong secret', self.lines(proc).get('127.0.0.2', ''), proc.stdout)
        # A node serving another program (this one) says so.
        cluster = dispy.JobCluster(square, nodes=['127.0.0.3'], ip_addr='127.0.0.1', port=0,
                                   node_port=self.port, secret=self.SECRET)
        self.addCleanup(cluster.close, terminate=True, timeout=2)
        self.assertEqual(cluster.submit(3)(timeout=T), 9)
        proc, _ = self.check('127.0.0.3', '127.0.0.2')
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        lines = self.lines(proc)
        self.assertIn('busy with another client', lines.get('127.0.0.3', ''), proc.stdout)
        self.assert_ok(lines, '127.0.0.2')
        self.assertEqual(list(lines), ['127.0.0.3', '127.0.0.2'])    # the order given


class StartNodesTest(unittest.TestCase):

    timeout = 90

    def test_syntax(self):
        for script in (START_NODES, LOOP):
            proc = subprocess.run(['bash', '-n', script], capture_output=True, text=True,
                                  timeout=30)
            self.assertEqual(proc.returncode, 0, '%s: %s' % (script, proc.stderr))
            self.assertTrue(os.stat(script).st_mode & stat.S_IXUSR, '%s: not executable'
                            % script)

    def test_starts_a_node_through_ssh(self):
        tmp = support.temp_folder(self, 'dispytest-deploy-')
        # A stand-in ssh that runs the remote command here, in a home of its own.
        bin_dir = os.path.join(tmp, 'bin')
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, 'ssh'), 'w') as f:
            f.write('#!/bin/sh\nfor last; do :; done\nexec bash -c "$last"\n')
        os.chmod(os.path.join(bin_dir, 'ssh'), 0o755)
        home = os.path.join(tmp, 'home')
        os.makedirs(home)
        write_secret(os.path.join(home, '.dispy-secret'), 'ssh secret')
        opt = copy_node_files(os.path.join(tmp, 'opt dispy'))
        port = support.free_port('127.0.0.2')
        env = plain_env(PATH=bin_dir + os.pathsep + os.environ.get('PATH', ''), HOME=home,
                        DISPY_DIR=opt, DISPY_PYTHON=sys.executable,
                        DISPYNODE_ARGS='-i 127.0.0.2 -p %d -c 1 --dest_path_prefix %s'
                        % (port, shlex.quote(os.path.join(tmp, 'state'))))
        pid_file = os.path.join(opt, 'dispynode.pid')

        def node_pid():
            try:
                return int(support.read_file(pid_file))
            except (OSError, ValueError):
                return None

        def stop_started_node():
            pid = node_pid()
            if pid and b'dispynode.py' in _cmdline(pid):
                processes = [pid] + support.descendants(pid)
                os.kill(pid, signal.SIGTERM)
                if not support.wait_until(lambda: not support.pid_alive(pid), 15):
                    support.kill_pids(processes)
        self.addCleanup(stop_started_node)

        proc = subprocess.run(['bash', START_NODES, 'node-a'], env=env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
        log = support.read_file(os.path.join(opt, 'dispynode.log')) if os.path.exists(
            os.path.join(opt, 'dispynode.log')) else ''
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr + log)
        self.assertRegex(proc.stdout, r'^node-a: dispynode \S+ serving at 127\.0\.0\.2:%d'
                         % port)
        pid = node_pid()
        self.assertTrue(pid and support.pid_alive(pid), log)
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            self.assertNotIn(b'ssh secret', f.read())
        # Started again: the running node is left alone.
        again = subprocess.run(['bash', START_NODES, 'node-a'], env=env, capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
        self.assertIn('node-a: dispynode already running (pid %d)' % pid, again.stdout)
        # check_nodes.py, as start-nodes.sh's header says, finds it.
        check = support.run_client(CHECK_NODES, plain_env(), timeout=60, cwd=tmp, args=[
            '-i', '127.0.0.1', '--client_port', '0', '--node_port', str(port), '--timeout',
            '10', '--secret_file', os.path.join(home, '.dispy-secret'), '127.0.0.2'])
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr + log)
        self.assertRegex(check.stdout, r'^127\.0\.0\.2: ok, 1 CPUs, ')
        # A host where ssh fails is reported and makes the exit status 1.
        with open(os.path.join(bin_dir, 'ssh'), 'w') as f:
            f.write('#!/bin/sh\necho "ssh: connect to host node-b port 22: '
                    'Connection refused" >&2\nexit 255\n')
        failed = subprocess.run(['bash', START_NODES, 'node-b'], env=env, capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(failed.returncode, 1, failed.stdout + failed.stderr)
        self.assertIn('node-b: FAILED: ssh: connect to host node-b', failed.stdout)


if __name__ == '__main__':
    unittest.main(argv=[sys.argv[0]])
