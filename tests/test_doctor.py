"""``python dispy.py --doctor`` and ``dispynode.py --check``, against real programs.

``DoctorLogicTest``   the pure parts (the host-name trap, the addresses check, NODE
                      parsing, the report's format) and usage errors (exit 2).
``DoctorNodesTest``   ``dispy.py --doctor NODE`` against real ``dispynode.py``
                      processes on 127.0.0.2: right, wrong and no secret, a secret
                      given to a node without one, nothing listening, TLS on one side
                      only (both ways), certificates not trusted (both ways), client
                      files that do not load; and a listener in the test that speaks
                      the handshake (another protocol version; TCP only, no UDP).
``NodeCheckTest``     ``dispynode.py --check``: good options; a certificate that does
                      not load or has expired; its port held by another process or by
                      a running node.  It never serves.
``DoctorLabTest``     inside a network namespace lab (tests/netns.py): the no-NODE
                      path (a broadcast ping finds the node; a wrong secret; the
                      host-name trap from the lab host's own /etc/hosts) and a
                      firewall made of nft drop rules in the node's namespace (TCP
                      dropped: "timed out"; UDP dropped: the udp check fails while
                      TCP works).  Skips where namespaces or nft are missing.

Outside the lab only loopback addresses are used, always named: the doctor never
broadcasts here.
"""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    from tests import netns, support
    from tests.test_netns import LabTestCase, clean_env, time_limit
except ImportError:                         # run from inside tests/
    import netns
    import support
    from test_netns import LabTestCase, clean_env, time_limit

import dispy

DISPY_SCRIPT = os.path.join(support.ROOT, 'dispy.py')
NODE_SCRIPT = support.NODE_SCRIPT
NFT = shutil.which('nft') or '/usr/sbin/nft'
NODE_IP = '127.0.0.2'
CHECK_IP = '127.0.0.3'
SECRET = 'doctor secret'
RUN_TIMEOUT = 60
LINE_RE = re.compile(r'^(ok|warn|FAIL)\s+(\S+(?: \S+)?)\s{2,}(.*)$')


# ================================================================================
# Helpers
# ================================================================================

def run_doctor(args, timeout=RUN_TIMEOUT):
    """``python dispy.py --doctor ARGS`` (no DISPY_* variables), bounded."""
    return subprocess.run([sys.executable, DISPY_SCRIPT, '--doctor'] + list(args),
                          capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          cwd=support.ROOT, stdin=subprocess.DEVNULL)


def run_check(args, timeout=RUN_TIMEOUT):
    """``python dispynode.py --check ARGS``, bounded."""
    return subprocess.run([sys.executable, NODE_SCRIPT, '--check', '--daemon'] + list(args),
                          capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          cwd=support.ROOT, stdin=subprocess.DEVNULL)


def checks(out):
    """[(level, name, detail, fix)] of a report."""
    found = []
    for line in out.splitlines():
        match = LINE_RE.match(line)
        if match:
            found.append(list(match.groups()) + [''])
        elif line.startswith('      ') and found:      # the fix, wrapped
            found[-1][3] = (found[-1][3] + ' ' + line.strip()).strip()
    return [tuple(c) for c in found]


def lambda_free_double(x):
    return 2 * x


def self_signed(folder, name):
    """A self-signed key+certificate file of its own name."""
    sub = os.path.join(folder, name)
    os.makedirs(sub)
    return support.self_signed_cert(sub)


CA_CONFIG = '''[ ca ]
default_ca = ca_default
[ ca_default ]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = policy_any
[ policy_any ]
commonName = supplied
'''


def expired_cert(folder):
    """A key+certificate file whose certificate expired in 2020 (openssl ca can date
    one; openssl req cannot), or None where openssl will not make it."""
    work = os.path.join(folder, 'expired')
    os.makedirs(work)
    with open(os.path.join(work, 'ca.cnf'), 'w') as f:
        f.write(CA_CONFIG)
    open(os.path.join(work, 'index.txt'), 'w').close()
    with open(os.path.join(work, 'serial'), 'w') as f:
        f.write('01\n')
    steps = [['openssl', 'req', '-new', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'key.pem',
              '-out', 'req.csr', '-subj', '/CN=dispy-expired'],
             ['openssl', 'ca', '-batch', '-config', 'ca.cnf', '-selfsign', '-keyfile',
              'key.pem', '-in', 'req.csr', '-out', 'cert.pem', '-startdate', '20200101000000Z',
              '-enddate', '20200102000000Z']]
    for step in steps:
        if subprocess.run(step, cwd=work, capture_output=True, timeout=60).returncode != 0:
            return None
    path = os.path.join(work, 'keycert.pem')
    with open(path, 'w') as out:
        for part in ('cert.pem', 'key.pem'):
            out.write(support.read_file(os.path.join(work, part)))
    return path


class ReportAssertions:
    """Reading a doctor's report in a TestCase."""

    def check_of(self, proc, name):
        """(level, name, detail, fix) of the report's first check NAME (asserted)."""
        found = [c for c in checks(proc.stdout) if c[1] == name]
        self.assertTrue(found, 'no %s check:\n%s%s' % (name, proc.stdout, proc.stderr))
        return found[0]

    def assert_check(self, proc, level, name, *texts):
        """Check NAME is at LEVEL and its detail and fix hold ``texts``; a failure has a
        fix and the summary names it."""
        level_found, _name, detail, fix = self.check_of(proc, name)
        self.assertEqual(level_found, level, proc.stdout)
        for text in texts:
            self.assertIn(text, detail + ' fix: ' + fix, proc.stdout)
        if level == 'FAIL':
            self.assertTrue(fix, 'a failure without a fix:\n' + proc.stdout)
            self.assertRegex(proc.stdout.splitlines()[-1], r'checks failed: .*\b%s\b' % name)

    def assert_failed(self, proc, name, *texts):
        """The run exited 1 and check NAME failed, its detail and fix holding ``texts``."""
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assert_check(proc, 'FAIL', name, *texts)


class HandshakeListener:
    """A TCP listener in this process that answers each connection with dispy's
    handshake (as a node would, with ``version``), and has no UDP port: a fake node
    for the version check and the TCP-only case.  Serves until ``close`` (at most a
    minute)."""

    def __init__(self, ip, version=None, secret='', role='node'):
        self.version = version
        self.secret = secret
        self.role = role
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        deadline = time.monotonic() + 60
        while not self.closed.is_set() and time.monotonic() < deadline:
            try:
                conn, _addr = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                try:
                    dispy.handshake(conn, self.secret, False, {'role': self.role, 'name': 'fake'},
                                    timeout=5, version=self.version)
                    conn.settimeout(5)
                    conn.recv(1)        # the doctor hangs up once authenticated
                except (OSError, dispy.ProtocolError):
                    pass

    def close(self):
        self.closed.set()
        self.sock.close()
        self.thread.join(5)


# ================================================================================
# The pure parts
# ================================================================================

LOCAL = ['127.0.0.1', '192.168.7.5', '::1', 'fe80::1']


class DoctorLogicTest(unittest.TestCase):
    timeout = 60

    def test_host_name_trap(self):
        """A host name on 127.0.1.1 while the machine has a LAN address is a warning
        naming both, with the fix; a loopback-only machine, or a name on a LAN address,
        is fine; a name that does not resolve, or resolves elsewhere, is a warning."""
        trap = dispy.host_name_trap('box', ['127.0.1.1'], LOCAL)
        self.assertEqual(trap.level, dispy.CheckResult.WARN)
        self.assertIn("'box' resolves to 127.0.1.1 (loopback)", trap.detail)
        self.assertIn('192.168.7.5', trap.detail)
        self.assertIn('/etc/hosts', trap.fix)
        self.assertIn('192.168.7.5', trap.fix)
        self.assertFalse(trap.failed)
        self.assertEqual(dispy.host_name_trap('box', ['192.168.7.5'], LOCAL).level, 'ok')
        self.assertEqual(dispy.host_name_trap('box', ['127.0.1.1'],
                                              ['127.0.0.1', '::1', 'fe80::1']).level, 'ok')
        missing = dispy.host_name_trap('box', [], LOCAL)
        self.assertEqual((missing.level, missing.detail), ('warn', "'box' does not resolve"))
        elsewhere = dispy.host_name_trap('box', ['10.9.9.9'], LOCAL)
        self.assertEqual(elsewhere.level, 'warn')
        self.assertIn('no address of this machine', elsewhere.detail)

    def test_addresses(self):
        """-i given: a host name that lands on loopback is the trap (FAIL); an address
        not on this machine or a name that does not resolve fails; loopback given
        as such is fine.  None given: every interface, and where it broadcasts."""
        trap = dispy.check_addresses(['box'], ['127.0.1.1'], LOCAL)
        self.assertTrue(trap.failed)
        self.assertIn('host-name trap', trap.detail)
        self.assertIn('-i 192.168.7.5', trap.fix)
        loop = dispy.check_addresses(['127.0.0.2'], ['127.0.0.2'], LOCAL)
        self.assertEqual(loop.level, 'ok')
        self.assertIn('loopback only', loop.detail)
        self.assertEqual(dispy.check_addresses(['localhost'], ['127.0.0.1'], LOCAL).level, 'ok')
        stranger = dispy.check_addresses(['10.1.1.1'], ['10.1.1.1'], LOCAL)
        self.assertTrue(stranger.failed)
        self.assertIn('not an address of this machine', stranger.detail)
        self.assertTrue(dispy.check_addresses(['nowhere'], [None], LOCAL).failed)
        every = dispy.check_addresses([], [], LOCAL, ['192.168.7.255'])
        self.assertEqual(every.level, 'ok')
        self.assertIn('every interface: 192.168.7.5', every.detail)
        self.assertIn('broadcasts to 192.168.7.255', every.detail)

    def test_node_spec(self):
        self.assertEqual(dispy.parse_node_spec('box', 51348), ('box', 51348))
        self.assertEqual(dispy.parse_node_spec('box:4000', 51348), ('box', 4000))
        self.assertEqual(dispy.parse_node_spec('fd00::2', 51348), ('fd00::2', 51348))
        self.assertEqual(dispy.parse_node_spec('[fd00::2]:4000', 1), ('fd00::2', 4000))
        for bad in ('box:port', 'box:0', 'box:70000', '[fd00::2', 'a:b:c', ''):
            with self.assertRaises(ValueError, msg=bad):
                dispy.parse_node_spec(bad, 51348)

    def test_report(self):
        """One line per check (level, name, detail), the fix indented under a warning
        or failure only, a summary naming the failures; exit status 1 only when
        something failed."""
        out = io.StringIO()
        doctor = dispy.Doctor('t', out)
        doctor.add(dispy.CheckResult.ok('tcp', 'connected'))
        doctor.add(None)                    # a check that does not apply
        doctor.add(dispy.CheckResult.warn('host name', 'odd', 'fix the hosts file'))
        self.assertEqual(doctor.finish(), 0)
        doctor.add(dispy.CheckResult.fail('secret', 'refused', 'give the same secret'))
        self.assertEqual(doctor.finish(), 1)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], 'ok    tcp        connected')
        self.assertEqual(lines[1], 'warn  host name  odd')
        self.assertEqual(lines[2], '      fix: fix the hosts file')
        self.assertEqual(lines[3], 't: all 2 checks passed (1 warning)')
        self.assertEqual(lines[4:6], ['FAIL  secret     refused',
                                      '      fix: give the same secret'])
        self.assertEqual(lines[6], 't: 1 of 3 checks failed: secret (1 warning)')

    @time_limit(60)
    def test_usage_errors(self):
        """Bad options: one line on stderr and exit 2, nothing probed; the program's
        own --help names --doctor."""
        for args in (['box:port'], ['--timeout', '0', NODE_IP], ['--no_such_option']):
            proc = run_doctor(args)
            self.assertEqual(proc.returncode, 2, (args, proc.stdout, proc.stderr))
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
            self.assertIn('dispy.py --doctor: ', proc.stderr)
            self.assertEqual(proc.stdout, '')
        proc = subprocess.run([sys.executable, DISPY_SCRIPT, '--help'], capture_output=True,
                              text=True, timeout=RUN_TIMEOUT, env=clean_env())
        self.assertEqual(proc.returncode, 0)
        self.assertIn('--doctor', proc.stdout)


# ================================================================================
# dispy.py --doctor NODE against real nodes
# ================================================================================

class DoctorNodesTest(ReportAssertions, unittest.TestCase):
    """Three nodes on 127.0.0.2: one with a secret, one with none, one with TLS."""

    timeout = 180

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix='dispytest-doctor-')
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        cls.cert = self_signed(cls.dir, 'node')
        cls.other_cert = self_signed(cls.dir, 'other')
        cls.secret_node = support.NodeProcess(NODE_IP, secret=SECRET, cpus=1)
        cls.plain_node = support.NodeProcess(NODE_IP, cpus=1)
        cls.tls_node = support.NodeProcess(NODE_IP, cpus=1, args=['--certfile', cls.cert])
        for node in (cls.secret_node, cls.plain_node, cls.tls_node):
            cls.addClassCleanup(support.stop_node, node)
            node.start()

    def doctor(self, node, *args):
        return run_doctor(list(args) + ['%s:%d' % (NODE_IP, node.port)])

    @time_limit(60)
    def test_right_secret(self):
        """Everything right: exit 0, every check ok, the node's UDP port answers."""
        proc = self.doctor(self.secret_node, '-s', SECRET)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        found = checks(proc.stdout)
        self.assertEqual([c[1] for c in found], ['tcp', 'tls', 'secret', 'version', 'udp'])
        self.assertEqual({c[0] for c in found}, {'ok'}, proc.stdout)
        self.assert_check(proc, 'ok', 'udp', "pong from 127.0.0.2: node", '1 CPUs, free')
        self.assert_check(proc, 'ok', 'version', 'dispy protocol %d' % dispy.PROTOCOL_VERSION)
        self.assertIn('dispy doctor: all 5 checks passed', proc.stdout)
        # the node tells a doctor's probe from a refused client
        self.assertTrue(support.wait_until(
            lambda: 'dispy.py --doctor checked the handshake' in self.secret_node.output()))

    @time_limit(60)
    def test_wrong_secret(self):
        proc = self.doctor(self.secret_node, '-s', 'not the secret')
        self.assert_failed(proc, 'secret', 'the node refused our secret', 'secrets differ',
                           'give both sides the same secret')
        self.assert_check(proc, 'FAIL', 'udp', 'NAK')

    @time_limit(60)
    def test_no_secret_given(self):
        proc = self.doctor(self.secret_node)
        self.assert_failed(proc, 'secret', 'the node wants a secret; none was given',
                           '-s SECRET')

    @time_limit(60)
    def test_secret_given_to_node_without_one(self):
        proc = self.doctor(self.plain_node, '-s', SECRET)
        self.assert_failed(proc, 'secret', 'the node has no secret; this side gave one')

    @time_limit(60)
    def test_nothing_listening(self):
        port = support.free_port(NODE_IP)
        proc = run_doctor(['--timeout', '1', '%s:%d' % (NODE_IP, port)])
        self.assert_failed(proc, 'tcp', 'connection refused',
                           'nothing listens on TCP %d there' % port, 'start dispynode')
        self.assert_check(proc, 'FAIL', 'udp', 'no answer')

    @time_limit(60)
    def test_tls_node_plain_client(self):
        proc = self.doctor(self.tls_node)
        self.assert_failed(proc, 'tls', 'the node uses TLS, this side does not',
                           'give --certfile')

    @time_limit(60)
    def test_tls_client_plain_node(self):
        proc = self.doctor(self.plain_node, '--certfile', self.cert)
        self.assert_check(proc, 'ok', 'tls files', 'verifies against itself')
        self.assert_failed(proc, 'tls', 'the node does not use TLS, this side does',
                           'start the node with --certfile')

    @time_limit(60)
    def test_tls_both_sides(self):
        proc = self.doctor(self.tls_node, '--certfile', self.cert)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assert_check(proc, 'ok', 'tls', 'TLS accepted both ways')

    @time_limit(60)
    def test_tls_certificates_not_trusted(self):
        """Another certificate: the node's is not trusted here; trusting it through
        --cafile, ours is refused by the node."""
        proc = self.doctor(self.tls_node, '--certfile', self.other_cert)
        self.assert_failed(proc, 'tls', "the node's certificate is not trusted", '--cafile')
        proc = self.doctor(self.tls_node, '--certfile', self.other_cert, '--cafile', self.cert)
        self.assert_check(proc, 'warn', 'tls files', 'does not verify against')
        self.assert_failed(proc, 'tls', 'the node refused our certificate')

    @time_limit(60)
    def test_client_tls_files_do_not_load(self):
        """A --certfile that is no certificate: named, and no node is probed with it."""
        garbage = os.path.join(self.dir, 'garbage.pem')
        with open(garbage, 'w') as f:
            f.write('not a certificate\n')
        proc = self.doctor(self.tls_node, '--certfile', garbage)
        self.assert_failed(proc, 'tls files', 'do not load', 'PEM certificate')
        self.assertEqual([c[1] for c in checks(proc.stdout)], ['tls files'])
        proc = self.doctor(self.tls_node, '--certfile', garbage + '.missing')
        self.assert_check(proc, 'FAIL', 'tls files', 'cannot read', 'No such file')

    @time_limit(60)
    def test_protocol_version_mismatch(self):
        listener = HandshakeListener(NODE_IP, version=dispy.PROTOCOL_VERSION + 1)
        self.addCleanup(listener.close)
        proc = run_doctor(['--timeout', '1', '%s:%d' % (NODE_IP, listener.port)])
        self.assert_failed(proc, 'version', 'protocol version %d' % (
            dispy.PROTOCOL_VERSION + 1), 'this program speaks %d' % dispy.PROTOCOL_VERSION,
            'same dispy release')

    @time_limit(60)
    def test_udp_unanswered_where_only_tcp_listens(self):
        """A port where a dispy handshake answers on TCP but nothing on UDP: the TCP
        checks pass, the udp check fails as a blocked UDP port."""
        listener = HandshakeListener(NODE_IP, secret=SECRET)
        self.addCleanup(listener.close)
        proc = run_doctor(['--timeout', '1', '-s', SECRET, '%s:%d' % (NODE_IP, listener.port)])
        self.assert_check(proc, 'ok', 'secret', 'accepts our secret')
        self.assert_check(proc, 'ok', 'version', "named 'fake'")
        self.assert_failed(proc, 'udp', 'no answer to a ping on UDP %d' % listener.port,
                           '(TCP works)', 'UDP %d is blocked' % listener.port, 'name the node')


    @time_limit(90)
    def test_a_node_serving_another_program_is_a_warning(self):
        """A node held by a client (a JobCluster here): exit 0, the udp check warns
        that this program would wait, and the client's job is not disturbed."""
        cluster = dispy.JobCluster(lambda_free_double, nodes=[NODE_IP],
                                   node_port=self.plain_node.port, ip_addr='127.0.0.1',
                                   port=0, recover_file=False)
        self.addCleanup(support.close_now, cluster)
        self.assertEqual(cluster.submit(2)(timeout=30), 4)
        proc = self.doctor(self.plain_node)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assert_check(proc, 'warn', 'udp', 'serving a client')
        self.assertIn('waits until that client is done', proc.stdout)
        self.assertEqual(cluster.submit(3)(timeout=30), 6)

    @time_limit(60)
    def test_a_scheduler_port_is_named_as_such(self):
        """The port of a dispy program that is not a node (dispyscheduler's): named,
        with the way to use it, and no discovery check (it has none there)."""
        listener = HandshakeListener(NODE_IP, role='scheduler')
        self.addCleanup(listener.close)
        proc = run_doctor(['--timeout', '1', '%s:%d' % (NODE_IP, listener.port)])
        self.assert_failed(proc, 'role', 'a dispy scheduler listens here, not a node',
                           'SharedJobCluster(scheduler_node=')
        self.assertNotIn('udp', [c[1] for c in checks(proc.stdout)])

    @time_limit(60)
    def test_a_port_of_another_kind_of_server(self):
        """Something that is neither TLS nor dispy (here: a listener that closes each
        connection at once), with and without our TLS files: named as such, and the
        udp check does not blame a firewall."""
        with socket.socket() as server:
            server.bind((NODE_IP, 0))
            server.listen(8)
            port = server.getsockname()[1]
            stop = threading.Event()

            def close_each():
                server.settimeout(0.1)
                while not stop.is_set():
                    try:
                        server.accept()[0].close()
                    except OSError:
                        continue
            thread = threading.Thread(target=close_each, daemon=True)
            thread.start()
            self.addCleanup(thread.join, 5)
            self.addCleanup(stop.set)
            for tls in ([], ['--certfile', self.cert]):
                proc = run_doctor(['--timeout', '1'] + tls + ['%s:%d' % (NODE_IP, port)])
                self.assertEqual(proc.returncode, 1, proc.stdout)
                self.assertNotIn('(TCP works)', proc.stdout)
                self.assert_check(proc, 'FAIL', 'udp', 'not a dispy node')
            self.assert_check(proc, 'FAIL', 'handshake', 'neither TLS nor dispy')


# ================================================================================
# dispynode.py --check
# ================================================================================

class NodeCheckTest(ReportAssertions, unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.dir = support.temp_folder(self, 'dispytest-check-')
        self.dest = os.path.join(self.dir, 'dest')

    def check(self, *args, port=None):
        self.port = port or support.free_port(CHECK_IP)
        return run_check(['-i', CHECK_IP, '-p', str(self.port), '--dest_path_prefix',
                          self.dest] + list(args))

    @time_limit(90)
    def test_good_options(self):
        """Exit 0; each check of the node's side is reported; it does not serve."""
        cert = self_signed(self.dir, 'cert')
        proc = self.check('-s', SECRET, '--certfile', cert)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        names = [c[1] for c in checks(proc.stdout)]
        self.assertEqual(names, ['addresses', 'host name', 'port', 'secret', 'tls files',
                                 'folder', 'processes'])
        self.assertNotIn('FAIL', [c[0] for c in checks(proc.stdout)])
        self.assert_check(proc, 'ok', 'port', 'TCP and UDP %s:%d are free' % (CHECK_IP,
                                                                              self.port))
        self.assert_check(proc, 'ok', 'processes', 'the fork server started a process')
        self.assert_check(proc, 'ok', 'folder', 'will be made')
        self.assertIn('dispynode --check: all 7 checks passed', proc.stdout)
        self.assertNotIn('serving at', proc.stdout)
        self.assertFalse(os.path.exists(self.dest), 'the check made the folder')
        self.assertTrue(support.tcp_free(CHECK_IP, self.port))

    @time_limit(60)
    def test_certificate_does_not_load(self):
        garbage = os.path.join(self.dir, 'garbage.pem')
        with open(garbage, 'w') as f:
            f.write('-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n')
        proc = self.check('--certfile', garbage)
        self.assert_failed(proc, 'tls files', 'do not load', 'private key')
        self.assertIn('checks failed: tls files', proc.stdout)

    @time_limit(90)
    def test_certificate_expired(self):
        path = expired_cert(self.dir)
        if path is None:
            self.skipTest('openssl cannot make a dated certificate here')
        proc = self.check('--certfile', path)
        self.assert_failed(proc, 'tls files', 'has expired', 'make a new one')

    @time_limit(60)
    def test_port_held_by_another_process(self):
        """A socket this test holds: named with its PID; it answers no handshake."""
        with socket.socket() as holder:
            holder.bind((CHECK_IP, 0))
            holder.listen(1)
            proc = self.check(port=holder.getsockname()[1])
        self.assert_failed(proc, 'port', 'TCP %s:%d is in use (by pid %d:' % (
            CHECK_IP, self.port, os.getpid()), 'does not complete a dispy handshake',
            'another port (-p)')

    @time_limit(90)
    def test_port_held_by_a_running_node(self):
        with support.NodeProcess(CHECK_IP, secret=SECRET, cpus=1) as node:
            proc = self.check('-s', SECRET, port=node.port)
            self.assert_failed(proc, 'port', 'TCP/UDP %s:%d is in use' % (
                CHECK_IP, node.port), 'pid %d:' % node.proc.pid,
                'a dispy node named', 'answers there: it runs already')
            proc = self.check(port=node.port)         # without its secret
            self.assert_check(proc, 'FAIL', 'port', 'a dispy program with another secret')
        # the holder's command line is shown without the secret it was given
        self.assertIn('-s ***', proc.stdout)
        self.assertNotIn(SECRET, proc.stdout)


# ================================================================================
# Inside a network namespace lab: broadcast discovery, the host-name trap, firewalls
# ================================================================================

class DoctorLabTest(ReportAssertions, LabTestCase):
    """Hosts 'client' and 'node' on a private LAN; the node's firewall is nft rules in
    its own namespace."""

    HOSTS = ('client', 'node')
    PORT = 51348                    # the default: the lab is a network of its own
    timeout = 240

    def start_node(self, *args):
        node = self.spawn('node', [sys.executable, NODE_SCRIPT, '-c', '1', '-s', SECRET,
                                   '--daemon', '--dest_path_prefix', self.tempdir('node')]
                          + list(args), env=clean_env())
        node.wait_for(r'serving at', timeout=30)
        return node

    def doctor(self, *args):
        proc = self.lab.run('client', [sys.executable, DISPY_SCRIPT, '--doctor', '--timeout',
                                       '2'] + list(args), timeout=RUN_TIMEOUT, env=clean_env(),
                            cwd=support.ROOT)
        self.assertIn(proc.returncode, (0, 1), proc.stdout + proc.stderr)
        return proc

    def firewall(self, rule):
        """Loads one input rule (e.g. 'tcp dport 51348 drop') in the node's namespace,
        in a table of its own (replaced by the next call)."""
        if not os.path.exists(NFT):
            self.skipTest('no nft (apt-get install nftables)')
        ruleset = ('table inet dspydoctor {\n  chain input {\n    type filter hook input '
                   'priority filter; policy accept;\n    %s\n  }\n}\n' % rule)
        namespace = self.lab.namespace('node')
        subprocess.run([netns.IP, 'netns', 'exec', namespace, NFT, 'delete', 'table', 'inet',
                        'dspydoctor'], capture_output=True, timeout=15)
        proc = subprocess.run([netns.IP, 'netns', 'exec', namespace, NFT, '-f', '-'],
                              input=ruleset, capture_output=True, text=True, timeout=15)
        if proc.returncode != 0:
            self.skipTest('the kernel refuses nft rules here: %s' % proc.stderr.strip())

    def set_host_name_address(self, host, address):
        """Maps ``host``'s own name to ``address`` in its lab /etc/hosts (what the
        next process started there sees)."""
        path = os.path.join(netns.NETNS_ETC_DIR, self.lab.namespace(host), 'hosts')
        with open(path, 'w') as f:
            f.write('127.0.0.1\tlocalhost\n%s\t%s\n' % (address, host))
            f.write(''.join('%s\t%s\n' % (self.lab.ip(h), h)
                            for h in self.lab.hosts if h != host))

    @time_limit(150)
    def test_broadcast_discovery_and_host_name_trap(self):
        """No NODE: addresses, host name and a broadcast ping that finds the node, which
        is then checked (exit 0); a wrong secret is named by the node's NAK; with
        the lab host's name mapped to 127.0.1.1 the trap is a warning, and -i with
        that name a failure."""
        self.start_node()                   # every interface: it hears broadcasts
        node_ip, client_ip = self.lab.ip('node'), self.lab.ip('client')
        proc = self.doctor('-s', SECRET)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr + self.diagnostics())
        self.assert_check(proc, 'ok', 'addresses', 'every interface: %s' % client_ip)
        self.assert_check(proc, 'ok', 'discovery', '1 node(s) answered a broadcast to %s'
                          % self.lab.broadcast(), 'pong from %s' % node_ip)
        self.assert_check(proc, 'ok', 'secret', '%s:%d' % (node_ip, self.PORT))
        self.assert_check(proc, 'ok', 'udp', '%s:%d' % (node_ip, self.PORT))

        proc = self.doctor('-s', 'not the secret')
        self.assert_failed(proc, 'discovery', '%s answered the broadcast but does not know '
                           'our secret' % node_ip)

        if not self.lab.hostnames:
            self.skipTest('no unshare/hostname here: lab hosts have no names of their own')
        self.assert_check(self.doctor('-s', SECRET), 'ok', 'host name', client_ip)
        self.set_host_name_address('client', '127.0.1.1')
        proc = self.doctor('-s', SECRET)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        self.assert_check(proc, 'warn', 'host name', "'client' resolves to 127.0.1.1 "
                          "(loopback), while this machine has %s" % client_ip, '/etc/hosts')
        proc = self.doctor('-s', SECRET, '-i', 'client')
        self.assert_failed(proc, 'addresses', "'client' resolves to 127.0.1.1 (loopback): "
                           "the host-name trap", '-i %s' % client_ip)

    @time_limit(120)
    def test_firewall_drops_tcp(self):
        """TCP SYNs dropped: the tcp check says the connect timed out, a firewall;
        UDP still answers."""
        self.start_node('-i', self.lab.ip('node'))
        self.firewall('tcp dport %d drop' % self.PORT)
        proc = self.doctor('-s', SECRET, self.lab.ip('node'))
        self.assert_failed(proc, 'tcp', 'connect timed out after 2.0 s', 'a firewall',
                           'open TCP and UDP %d' % self.PORT)
        self.assert_check(proc, 'ok', 'udp', 'pong from %s' % self.lab.ip('node'))

    @time_limit(120)
    def test_firewall_drops_udp(self):
        """UDP dropped: every TCP check passes, the udp check fails and says how to
        live without discovery."""
        self.start_node('-i', self.lab.ip('node'))
        self.firewall('udp dport %d drop' % self.PORT)
        proc = self.doctor('-s', SECRET, self.lab.ip('node'))
        for name in ('tcp', 'tls', 'secret', 'version'):
            self.assert_check(proc, 'ok', name)
        self.assert_failed(proc, 'udp', 'no answer to a ping on UDP %d in 2.0 s (TCP works)'
                           % self.PORT, 'blocked', 'name the node')


if __name__ == '__main__':
    unittest.main()
