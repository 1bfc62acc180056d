"""Wire format, authentication and hostile input: unit tests on socket pairs, then the
same properties against real ``dispynode.py`` processes on loopback."""

import json
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

from tests import support
from tests.support import NodeProcess, client_env, free_port, run_client, wait_until

import dispy

TIMEOUT = 30


def _pair_handshake(secret_a, secret_b, info_a=None, max_frame=dispy.DEFAULT_MAX_FRAME):
    """Runs both ends of a handshake on a socket pair; returns (result_a, result_b),
    each a Channel or the exception raised."""
    a, b = socket.socketpair()
    results = [None, None]

    def side(index, sock, secret, dialer):
        try:
            results[index] = dispy.handshake(sock, secret, dialer, info_a or {}, max_frame,
                                             timeout=5)
        except Exception as exc:       # recorded for the assertions
            results[index] = exc
            sock.close()

    threads = [threading.Thread(target=side, args=(0, a, secret_a, True)),
               threading.Thread(target=side, args=(1, b, secret_b, False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


class HandshakeTest(unittest.TestCase):

    def test_same_secret_authenticates_and_frames_flow_both_ways(self):
        dialer, listener = _pair_handshake('s3cret', 's3cret')
        self.assertIsInstance(dialer, dispy.Channel)
        self.assertIsInstance(listener, dispy.Channel)
        dialer.send([('PING', 1)])
        self.assertEqual(listener.recv(), [('PING', 1)])
        sender = threading.Thread(target=listener.send, args=([('PONG', b'x' * 3000000)],))
        sender.start()      # 3 MB does not fit in a socket buffer: send from a thread
        self.assertEqual(dialer.recv(), [('PONG', b'x' * 3000000)])
        sender.join(10)
        dialer.close()
        listener.close()

    def test_wrong_secret_fails_on_both_sides(self):
        dialer, listener = _pair_handshake('one', 'two')
        self.assertIsInstance(dialer, dispy.AuthError)
        self.assertIsInstance(listener, dispy.AuthError)
        self.assertIn('secrets differ', str(dialer))

    def test_secret_never_on_the_wire(self):
        """What a listener sends before the dialer proved itself contains nothing
        derived from the secret: its hello is JSON with a random nonce."""
        a, b = socket.socketpair()
        a.settimeout(5)
        t = threading.Thread(target=lambda: self._silent_listener(b))
        t.start()
        dispy._send_hs(a, json.dumps({'version': dispy.PROTOCOL_VERSION, 'pickle': 4,
                                      'nonce': '00', 'max_frame': 10}).encode())
        hello = json.loads(dispy._recv_hs(a))
        self.assertEqual(set(hello) - {'magic', 'version', 'pickle', 'nonce', 'max_frame',
                                       'role'}, set())
        a.sendall(b'P' + bytes(32))          # a wrong proof
        self.assertEqual(a.recv(33)[:1], b'F')
        t.join(10)
        a.close()

    def _silent_listener(self, sock):
        try:
            dispy.handshake(sock, 'topsecret', False, {'role': 'node'}, timeout=5)
        except dispy.AuthError:
            pass
        finally:
            sock.close()

    def test_version_mismatch_names_both_versions(self):
        a, b = socket.socketpair()
        errors = []

        def old_listener():
            try:
                dispy.handshake(b, '', False, {}, timeout=5, version=7)
            except dispy.ProtocolError as exc:
                errors.append(exc)
            finally:
                b.close()

        t = threading.Thread(target=old_listener)
        t.start()
        with self.assertRaises(dispy.VersionError) as ctx:
            dispy.handshake(a, '', True, {}, timeout=5, version=8)
        t.join(10)
        a.close()
        self.assertIn('version 7, this program speaks 8', str(ctx.exception))
        self.assertIn('version 8, this program speaks 7', str(errors[0]))

    def test_not_a_dispy_peer_and_tls_peer_are_named(self):
        a, b = socket.socketpair()
        a.sendall(b'\x16\x03\x01\x02\x00\x01\x00\x01')
        with self.assertRaisesRegex(dispy.ProtocolError, 'TLS'):
            dispy.handshake(b, '', False, {}, timeout=5)
        a.close()
        b.close()
        a, b = socket.socketpair()
        a.sendall(b'GET / HTTP/1.0\r\n')
        with self.assertRaisesRegex(dispy.ProtocolError, 'not a dispy program'):
            dispy.handshake(b, '', False, {}, timeout=5)
        a.close()
        b.close()

    def test_silent_peer_times_out(self):
        a, b = socket.socketpair()
        start = time.monotonic()
        with self.assertRaises(OSError):
            dispy.handshake(b, '', False, {}, timeout=0.3)
        self.assertLess(time.monotonic() - start, 5)
        a.close()
        b.close()


class FrameTest(unittest.TestCase):

    def setUp(self):
        self.dialer, self.listener = _pair_handshake('k', 'k', max_frame=1 << 20)
        self.addCleanup(self.dialer.close)
        self.addCleanup(self.listener.close)

    def _raw_frames(self, *objs):
        """Frames as the dialer would send them, captured instead of sent."""
        sent = []
        real = self.dialer.sock

        class Capture:
            def sendall(self, data):
                sent.append(bytes(data))
        self.dialer.sock = Capture()
        for obj in objs:
            self.dialer.send(obj)
        self.dialer.sock = real
        return sent      # small frames go out in one sendall each

    def test_replayed_frame_is_rejected(self):
        (frame,) = self._raw_frames([('A',)])
        self.dialer.sock.sendall(frame + frame)
        self.assertEqual(self.listener.recv(), [('A',)])
        with self.assertRaises(dispy.AuthError):
            self.listener.recv()

    def test_reordered_frames_are_rejected(self):
        first, second = self._raw_frames([('A',)], [('B',)])
        self.dialer.sock.sendall(second)
        with self.assertRaises(dispy.AuthError):
            self.listener.recv()

    def test_tampered_frame_is_rejected(self):
        (frame,) = self._raw_frames([('A', 'hello')])
        tampered = bytearray(frame)
        tampered[10] ^= 1
        self.dialer.sock.sendall(bytes(tampered))
        with self.assertRaises(dispy.AuthError):
            self.listener.recv()

    def test_oversized_length_rejected_before_allocation(self):
        self.dialer.sock.sendall(struct.pack('!I', 0xFFFFFFF0))
        with self.assertRaisesRegex(dispy.ProtocolError, 'over the limit'):
            self.listener.recv()

    def test_truncated_frame_is_an_error_not_a_hang(self):
        (frame,) = self._raw_frames([('A', 'x' * 100)])
        self.dialer.sock.sendall(frame[:20])
        self.dialer.sock.shutdown(socket.SHUT_WR)
        with self.assertRaisesRegex(dispy.ProtocolError, 'closed'):
            self.listener.recv()

    def test_authenticated_frame_never_loads_code(self):
        """Even a frame with a valid HMAC cannot make the receiver import or call."""
        class Evil:
            def __reduce__(self):
                return (os.system, ('touch /tmp/dispy-pwned',))
        self.dialer.send_body(pickle.dumps([Evil()]))
        with self.assertRaisesRegex(pickle.UnpicklingError, 'only plain data'):
            self.listener.recv()
        self.assertFalse(os.path.exists('/tmp/dispy-pwned'))


class DatagramTest(unittest.TestCase):

    def test_authenticated_round_trip(self):
        data = dispy.pack_datagram('s', {'t': 'ping', 'port': 1})
        self.assertEqual(dispy.unpack_datagram('s', data), ({'t': 'ping', 'port': 1}, True))
        msg, good = dispy.unpack_datagram('other', data)
        self.assertFalse(good)

    def test_garbage_is_ignored(self):
        for junk in (b'', b'x' * 50, dispy.UDP_MAGIC + bytes(32) + b'{bad json',
                     dispy.UDP_MAGIC + bytes(32) + b'[1, 2]',
                     dispy.UDP_MAGIC + bytes(32) + pickle.dumps({'t': 'ping'}),
                     dispy.UDP_MAGIC + b'x' * 100000):
            self.assertEqual(dispy.unpack_datagram('s', junk)[1], False)

    def test_wildcards_match_whole_octets(self):
        alloc = dispy.NodeAllocate('192.168.3.*')
        self.assertTrue(alloc.matches('192.168.3.24'))
        self.assertFalse(alloc.matches('192.168.30.24'))
        self.assertTrue(dispy.NodeAllocate('*').matches('10.1.2.3'))
        exact = dispy.NodeAllocate('192.168.3.24')
        self.assertFalse(exact.matches('192.168.3.246'))


def compute_double(n):
    return n * 2


def compute_blob(size):
    return b'r' * size


class NodeSecurityTest(unittest.TestCase):
    """Real node processes facing wrong secrets, garbage and oversized frames."""

    @classmethod
    def setUpClass(cls):
        cls.node = NodeProcess('127.0.0.2', secret='right', cpus=2,
                               args=['--max_frame_size', '2m'])
        cls.node.start()
        cls.addClassCleanup(cls.node.stop)

    def cluster(self, secret='right', **kw):
        c = dispy.JobCluster(compute_double, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                             node_port=self.node.port, secret=secret, **kw)
        self.addCleanup(c.close, terminate=True)
        return c

    def test_wrong_secret_warns_naming_the_node(self):
        with self.assertLogs('dispy', 'WARNING') as logs:
            c = self.cluster(secret='wrong')
            job = c.submit(1)
            self.assertIsNone(job(timeout=1.5))
        self.assertTrue(any('127.0.0.2' in line and 'authentication' in line
                            for line in logs.output), logs.output)
        self.assertTrue(wait_until(lambda: 'failed authentication' in self.node.stderr(), 10))

    def test_no_node_warning_counts_auth_failures(self):
        saved = dispy.NO_NODE_WARN_AFTER
        dispy.NO_NODE_WARN_AFTER = 0.5
        try:
            with self.assertLogs('dispy', 'WARNING') as logs:
                c = self.cluster(secret='wrong')
                wait_until(lambda: any('no dispy node' in l for l in logs.output), 10)
        finally:
            dispy.NO_NODE_WARN_AFTER = saved
        warnings = [l for l in logs.output if 'no dispy node' in l]
        self.assertTrue(warnings, logs.output)
        self.assertIn('failed authentication', warnings[0])
        self.assertIn('127.0.0.2', warnings[0])
        self.assertNotEqual(c._pool.links['127.0.0.2'].state, 'ready')

    def test_garbage_connections_do_not_hurt_the_node(self):
        for payload in (b'', b'GET / HTTP/1.1\r\n\r\n', b'DSPY\xff\xff' + b'x' * 100,
                        b'DSPY\x00\x05{}}}}', os.urandom(5000)):
            with socket.create_connection(('127.0.0.2', self.node.port), timeout=5) as s:
                s.settimeout(5)
                try:    # the node may refuse and reset before we are done
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(4096):
                        pass
                except OSError:
                    pass
        c = self.cluster()
        self.assertEqual(c.submit(21)(timeout=TIMEOUT), 42)
        self.assertIn('refused', self.node.stderr())

    def test_oversized_frame_from_authenticated_peer_is_dropped(self):
        sock = socket.create_connection(('127.0.0.2', self.node.port), timeout=5)
        channel = dispy.handshake(sock, 'right', True, {'role': 'client'})
        channel.send([('CLIENT', {'id': 'rogue', 'pid': 1})])
        self.assertEqual(channel.recv()[0][0], 'NODE')
        channel.peer_max_frame = 1 << 30      # lie to ourselves: send past its limit
        try:
            channel.send_body(b'x' * (3 << 20))
        except OSError:
            pass
        self.assertTrue(wait_until(lambda: 'over the limit' in self.node.stderr(), 10),
                        self.node.output())
        channel.close()
        c = self.cluster()      # the node serves again once the rogue is gone
        self.assertEqual(c.submit(5)(timeout=TIMEOUT), 10)

    def test_arguments_over_the_node_frame_limit_fail_that_job(self):
        c = self.cluster()
        big = c.submit(b'x' * (3 << 20))
        small = c.submit(2)
        self.assertEqual(small(timeout=TIMEOUT), 4)
        big(timeout=TIMEOUT)
        self.assertEqual(big.status, dispy.DispyJob.Terminated)
        self.assertIn('frame limit', big.exception)

    def test_result_over_the_client_frame_limit_fails_that_job(self):
        c = dispy.JobCluster(compute_blob, nodes=['127.0.0.2'], ip_addr='127.0.0.1', port=0,
                             node_port=self.node.port, secret='right', max_frame_size=1 << 20)
        self.addCleanup(c.close, terminate=True)
        big, small = c.submit(2 << 20), c.submit(100)
        self.assertEqual(small(timeout=TIMEOUT), b'r' * 100)
        self.assertIsNone(big(timeout=TIMEOUT))
        self.assertEqual(big.status, dispy.DispyJob.Terminated)
        self.assertIn("exceeds the client's frame limit", big.exception)


class NodeProcessTest(unittest.TestCase):
    """dispynode.py as a program: command line, stdin commands, signals, ports."""

    def test_help_lists_the_options(self):
        out = subprocess.run([sys.executable, support.NODE_SCRIPT, '--help'],
                             capture_output=True, text=True, timeout=TIMEOUT).stdout
        for option in ('--cpus', '--ip_addr', '--ext_ip_addr', '--node_port', '--name',
                       '--dest_path_prefix', '--max_file_size', '--secret', '--certfile',
                       '--keyfile', '--debug', '--daemon', '--clean', '--zombie_interval'):
            self.assertIn(option, out)

    def test_sizes(self):
        self.assertEqual(dispy.parse_size('10m'), 10 << 20)
        self.assertEqual(dispy.parse_size('512k'), 512 << 10)
        self.assertEqual(dispy.parse_size('2g'), 2 << 30)
        self.assertEqual(dispy.parse_size('0'), 0)

    def test_port_in_use_is_a_clear_error(self):
        with NodeProcess('127.0.0.2') as node:
            proc = subprocess.run([sys.executable, support.NODE_SCRIPT, '-i', '127.0.0.2',
                                   '-p', str(node.port), '--daemon'],
                                  capture_output=True, text=True, timeout=TIMEOUT)
            self.assertNotEqual(proc.returncode, 0)
            self.assertIn('cannot listen on 127.0.0.2:%s' % node.port, proc.stderr)

    def test_client_port_in_use_is_a_clear_error(self):
        port = free_port('127.0.0.1')
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(('127.0.0.1', port))
            with self.assertRaisesRegex(OSError, 'port=0'):
                dispy.JobCluster(compute_double, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                                 port=port)

    def test_status_quit_and_no_leftover_processes(self):
        node = NodeProcess('127.0.0.2', cpus=1)
        node.start()
        self.addCleanup(node.stop)
        c = dispy.JobCluster(compute_double, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                             port=0, node_port=node.port)
        self.addCleanup(c.close, terminate=True)
        self.assertEqual(c.submit(1)(timeout=TIMEOUT), 2)
        node.command('status')
        self.assertTrue(wait_until(lambda: '1 done' in node.stdout(), 10), node.output())
        self.assertTrue(node.descendants())         # forkserver, host, worker
        c.close(timeout=TIMEOUT)
        node.command('quit')
        self.assertEqual(node.wait(TIMEOUT), 0)
        self.assertEqual(support.descendants(node.proc.pid), [])

    def test_sigterm_stops_node_and_its_job_processes(self):
        node = NodeProcess('127.0.0.2', cpus=1)
        node.start()
        self.addCleanup(node.stop)
        c = dispy.JobCluster(compute_double, nodes=['127.0.0.2'], ip_addr='127.0.0.1',
                             port=0, node_port=node.port)
        self.addCleanup(c.close, timeout=2, terminate=True)
        self.assertEqual(c.submit(1)(timeout=TIMEOUT), 2)
        children = node.descendants()
        self.assertGreaterEqual(len(children), 3)
        node.signal(signal.SIGTERM)
        self.assertEqual(node.wait(TIMEOUT), 0)
        self.assertTrue(wait_until(lambda: not any(support.pid_alive(p) for p in children), 10))

    def test_node_without_secret_on_loopback_does_not_warn(self):
        with NodeProcess('127.0.0.2') as node:
            self.assertNotIn('no secret given', node.stderr())


if __name__ == '__main__':
    unittest.main()
