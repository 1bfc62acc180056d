"""The shared receivers, as units: ``FileReceiver`` (path checks, mode mask, size
limit, chunk order, no partial copies, the liveness rule), ``DiscoveryEndpoint`` and
the node's ``NodeListener`` (admission limits, the handshake deadline) on loopback."""

import os
import queue
import random
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
import types
import unittest
import unittest.mock

from tests.support import wait_until

import dispy


class FileReceiverTest(unittest.TestCase):

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix='dispytest-receiver-')
        self.addCleanup(shutil.rmtree, self.folder, True)

    def receiver(self, **rules):
        receiver = dispy.FileReceiver(self.folder, **rules)
        self.addCleanup(receiver.close)
        return receiver

    def listing(self):
        return sorted(os.path.relpath(os.path.join(d, f), self.folder)
                      for d, _, files in os.walk(self.folder) for f in files)

    def test_chunks_in_order_make_one_file_at_its_path_when_complete(self):
        receiver = self.receiver(max_size=100)
        self.assertIsNone(receiver.chunk('a.dat', 0o644, 0, b'x' * 40, False))
        self.assertNotIn('a.dat', self.listing(), 'a partial file is at the final path')
        self.assertEqual(len(receiver), 1)
        path = receiver.chunk('a.dat', 0o644, 40, b'y' * 10, True)
        self.assertEqual(path, os.path.join(self.folder, 'a.dat'))
        self.assertEqual(self.listing(), ['a.dat'])
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'x' * 40 + b'y' * 10)
        self.assertEqual(len(receiver), 0)

    def test_mode_mask(self):
        receiver = self.receiver()
        for name, mode, want in (('s', 0o6755, 0o755), ('t', 0o1777, 0o755),
                                 ('r', 0o444, 0o644), ('n', 0, 0o600)):
            path = receiver.whole(name, mode, b'#!/bin/sh\n')
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), want, name)
        with self.assertRaises(dispy.FileRefused):
            receiver.whole('m', 'rwx', b'')

    def test_refused_chunks_leave_nothing(self):
        """Out of order (a gap, a repeat, a negative or claimed offset), over the size
        limit, malformed: the whole file is dropped, temporary copy included."""
        cases = [[(0, b'a' * 10), (20, b'b')], [(0, b'a' * 10), (0, b'a' * 10)],
                 [(0, b'a' * 10), (-10, b'a')], [(5, b'a')], [(0, b'a' * 60), (60, b'b' * 60)],
                 [(0, b'a'), (1, 'text')], [(True, b'a')]]
        for chunks in cases:
            receiver = self.receiver(max_size=100)
            with self.assertRaises(dispy.FileRefused, msg=chunks):
                for offset, data in chunks:
                    receiver.chunk('f', 0o644, offset, data, False)
            self.assertEqual(self.listing(), [], chunks)
            self.assertEqual(len(receiver), 0)

    def test_size_limit_text(self):
        with self.assertRaisesRegex(dispy.FileRefused, 'max_file_size'):
            self.receiver(max_size=10).whole('big', 0o644, b'x' * 11)

    def test_plain_names_only(self):
        receiver = self.receiver()
        for name in ('', '.', '..', '../x', 'a/b', '/abs', 'a\\b', 'x\0y', None, ['a'], 3):
            with self.assertRaisesRegex(dispy.PathRefused, 'plain base names', msg=name):
                receiver.chunk(name, 0o644, 0, b'x', True)
        self.assertEqual(self.listing(), [])

    def test_relative_paths_stay_in_the_folder(self):
        receiver = self.receiver(paths='relative')
        self.assertEqual(receiver.whole('out/a.txt', 0o644, b'a'),
                         os.path.join(self.folder, 'out', 'a.txt'))
        self.assertEqual(receiver.whole('/abs/b.txt', 0o644, b'b'),
                         os.path.join(self.folder, 'abs', 'b.txt'))
        for name in ('', '.', '..', '../x', 'a/../../x', 'x\0y', None):
            with self.assertRaises(dispy.PathRefused, msg=name):
                receiver.whole(name, 0o644, b'x')
        self.assertEqual(self.listing(), ['abs/b.txt', 'out/a.txt'])

    def test_senders_of_one_name_do_not_mix(self):
        receiver = self.receiver()
        receiver.chunk('same', 0o644, 0, b'1' * 5, False, source='job1')
        receiver.chunk('same', 0o644, 0, b'2' * 5, False, source='job2')
        receiver.chunk('same', 0o644, 5, b'2', True, source='job2')
        path = receiver.chunk('same', 0o644, 5, b'1', True, source='job1')
        with open(path, 'rb') as f:
            self.assertEqual(f.read(), b'111111')

    def test_a_stalled_file_is_dropped_by_expire_and_by_the_next_chunk(self):
        receiver = self.receiver(stall_timeout=10)
        receiver.chunk('slow', 0o644, 0, b'x', False, now=100.0)
        receiver.chunk('other', 0o644, 0, b'y', False, now=105.0)
        self.assertEqual(receiver.expire(now=109.0), [])
        self.assertEqual(receiver.expire(now=111.0), ['slow'])
        self.assertEqual(len(receiver), 1)
        # a chunk arriving late finds its file gone: refused, not appended to nothing
        receiver.chunk('late', 0o644, 0, b'z', False, now=112.0)
        with self.assertRaisesRegex(dispy.FileRefused, 'out of order'):
            receiver.chunk('late', 0o644, 1, b'z', True, now=123.0)
        self.assertEqual(len(receiver), 0, 'the next chunk expires the others too')
        self.assertEqual(self.listing(), [])

    def test_close_drops_every_partial_file(self):
        receiver = self.receiver()
        receiver.chunk('a', 0o644, 0, b'x', False)
        receiver.whole('done', 0o644, b'kept')
        receiver.close()
        self.assertEqual(self.listing(), ['done'])

    def test_a_file_that_cannot_be_renamed_leaves_nothing(self):
        os.mkdir(os.path.join(self.folder, 'dir'))
        with self.assertRaises(OSError):
            self.receiver().whole('dir', 0o644, b'x')
        self.assertEqual(self.listing(), [])


SECRET = 'receivers-test'


def udp_socket(ip='127.0.0.1'):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((ip, 0))
    sock.settimeout(2)
    return sock


class DiscoveryEndpointTest(unittest.TestCase):
    """On loopback only: the endpoint's sockets, in a caller's selector or its own loop."""

    def setUp(self):
        self.got, self.unauthenticated = [], []
        self.endpoint = dispy.DiscoveryEndpoint(
            SECRET, lambda msg, addr, sock: self.got.append((msg, addr)),
            lambda msg, addr, sock: self.unauthenticated.append(msg))
        self.addCleanup(self.endpoint.close)
        self.endpoint.bind('127.0.0.1', 0)
        self.addr = ('127.0.0.1', self.endpoint.port)

    def peer(self, ip='127.0.0.1'):
        sock = udp_socket(ip)
        self.addCleanup(sock.close)
        return sock

    def pump(self, until, timeout=2.0):
        """Runs a caller's selector loop (as the client hub does) until ``until()``."""
        with selectors.DefaultSelector() as selector:
            self.endpoint.register(selector)
            deadline = time.monotonic() + timeout
            while not until() and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    self.assertIs(key.data, self.endpoint)
                    key.data.handle_readable(key.fileobj)
            self.endpoint.unregister(selector)
        return until()

    def test_authenticated_datagrams_reach_the_callback(self):
        peer = self.peer()
        peer.sendto(b'not ours', self.addr)
        peer.sendto(dispy.UDP_MAGIC + b'[' * 3000, self.addr)
        peer.sendto(dispy.pack_datagram(SECRET, dispy.Datagram.ping('c', 9)), self.addr)
        self.assertTrue(self.pump(lambda: self.got))
        msg, addr = self.got[0]
        self.assertEqual(msg, dispy.Datagram.ping('c', 9))
        self.assertEqual(addr, peer.getsockname())

    def test_forged_pings_get_one_bare_nak_a_second(self):
        peer = self.peer('127.0.0.%d' % random.randint(20, 250))
        forged = dispy.pack_datagram('wrong', dispy.Datagram.ping('c', 9))
        for _ in range(20):
            peer.sendto(forged, self.addr)
        peer.sendto(dispy.pack_datagram(SECRET, {'t': 'marker'}), self.addr)
        self.assertTrue(self.pump(lambda: self.got))
        self.assertEqual(self.got[0][0], {'t': 'marker'})
        self.assertEqual(dispy.unpack_datagram(SECRET, peer.recv(100)), ({'t': 'nak'}, False))
        peer.settimeout(0.2)
        with self.assertRaises(socket.timeout):
            peer.recv(100)
        self.assertEqual(self.unauthenticated, [], 'pings are answered, not passed on')

    def test_other_unauthenticated_datagrams_go_to_their_callback(self):
        self.peer().sendto(dispy.pack_unauthenticated(dispy.Datagram.NAK), self.addr)
        self.assertTrue(self.pump(lambda: self.unauthenticated))
        self.assertEqual(self.unauthenticated, [{'t': 'nak'}])
        self.assertEqual(self.got, [])

    def test_a_failing_callback_does_not_stop_reading(self):
        self.endpoint.on_datagram = lambda msg, addr, sock: 1 / 0
        peer = self.peer()
        with self.assertLogs('dispy', 'ERROR'):
            peer.sendto(dispy.pack_datagram(SECRET, {'t': 'x'}), self.addr)
            self.pump(lambda: False, 0.3)
        self.endpoint.on_datagram = lambda msg, addr, sock: self.got.append((msg, addr))
        peer.sendto(dispy.pack_datagram(SECRET, {'t': 'y'}), self.addr)
        self.assertTrue(self.pump(lambda: self.got))

    def test_serve_forever_answers_until_closed(self):
        def answer(msg, addr, sock):
            self.endpoint.sendto(self.endpoint.pack({'t': 'pong'}), addr, sock)
        self.endpoint.on_datagram = answer
        thread = threading.Thread(target=self.endpoint.serve_forever, args=(0.1,), daemon=True)
        thread.start()
        peer = self.peer()
        peer.sendto(dispy.pack_datagram(SECRET, dispy.Datagram.ping('c', 9)), self.addr)
        self.assertEqual(dispy.unpack_datagram(SECRET, peer.recv(4096)), ({'t': 'pong'}, True))
        self.endpoint.close()
        thread.join(2)
        self.assertFalse(thread.is_alive())

    def test_send_picks_a_socket_of_the_family(self):
        peer = self.peer()
        self.assertTrue(self.endpoint.sendto(b'x', peer.getsockname()))
        self.assertEqual(peer.recv(10), b'x')
        self.assertFalse(self.endpoint.sendto(b'x', ('::1', 9)), 'no IPv6 socket bound')


class _StubNode:
    """What a NodeListener uses of NodeServer."""

    ssl_context = None
    name = 'stub'
    config = types.SimpleNamespace(secret=SECRET, max_frame=dispy.DEFAULT_MAX_FRAME)

    def __init__(self):
        self.attached = queue.Queue()

    def attach(self, channel, addr, info):
        self.attached.put((channel, addr, info))


def closed_soon(sock, timeout=3.0):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b''
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


class NodeListenerTest(unittest.TestCase):
    """The node's listener with a stub node, on loopback: admission limits (16 from one
    address, 32 in all), the whole-handshake deadline, hand-off, close."""

    def setUp(self):
        import dispynode
        self.node = _StubNode()
        self.listener = dispynode.NodeListener(self.node, '127.0.0.1', 0,
                                               dispynode.HandshakeAdmission(32, 16))
        self.listener.poll_interval = 0.1
        self.thread = threading.Thread(target=self.listener.serve_forever, daemon=True)
        self.thread.start()
        self.addCleanup(self.close)

    def close(self):
        self.listener.close()
        self.thread.join(2)
        self.assertFalse(self.thread.is_alive(), 'close() did not stop serve_forever')

    def connect(self, source):
        sock = socket.create_connection(('127.0.0.1', self.listener.port), timeout=5,
                                        source_address=(source, 0))
        self.addCleanup(sock.close)
        return sock

    def client(self, source):
        sock = self.connect(source)
        channel = dispy.handshake(sock, SECRET, True, {'role': 'client'}, timeout=5)
        channel.send([dispy.Msg.CLIENT({'id': 'x'})])
        self.client_channel = channel
        return self.node.attached.get(timeout=5)

    def idle(self, source, count):
        socks = [self.connect(source) for _ in range(count)]
        self.assertTrue(wait_until(lambda: len(self.listener.admission) >= count, 5))
        return socks

    def test_authenticated_client_is_handed_to_the_node(self):
        channel, addr, info = self.client('127.0.0.2')
        self.addCleanup(channel.close)
        self.assertEqual(addr[0], '127.0.0.2')
        self.assertEqual(info, {'id': 'x'})
        self.assertTrue(wait_until(lambda: len(self.listener.admission) == 0, 2),
                        'its slot is not free again')
        # once the handshake thread has ended (socketserver's shutdown_request ran),
        # the socket must still be the channel's
        self.assertTrue(wait_until(lambda: not any(
            t.name == 'dispynode-handshake' for t in threading.enumerate()), 5))
        channel.send([dispy.Msg.NODE_PULSE(1.0, None)])
        self.client_channel.sock.settimeout(5)
        self.assertEqual(self.client_channel.recv(), [dispy.Msg.NODE_PULSE(1.0, None)])

    def test_sixteen_from_one_address_then_refused(self):
        self.idle('127.0.0.2', 16)
        with self.assertLogs('dispy', 'WARNING') as logs:
            extra = self.connect('127.0.0.2')
            self.assertTrue(closed_soon(extra), 'the 17th connection from one address was kept')
        self.assertIn('connection from 127.0.0.2 dropped: too many handshakes in progress',
                      '\n'.join(logs.output))
        channel, _addr, _info = self.client('127.0.0.3')     # other addresses still served
        channel.close()

    def test_thirty_two_in_all_then_refused(self):
        self.idle('127.0.0.2', 16)
        self.idle('127.0.0.4', 16)
        with self.assertLogs('dispy', 'WARNING'):
            self.assertTrue(closed_soon(self.connect('127.0.0.5')))

    def test_whole_handshake_has_one_deadline(self):
        """Idle, a handshake ends at HANDSHAKE_TIMEOUT and frees its slot (the
        listener's watchdog: dispy.handshake's own timeout is 10 s here)."""
        with unittest.mock.patch.object(dispy, 'HANDSHAKE_TIMEOUT', 1.0), \
                self.assertLogs('dispy', 'WARNING') as logs:
            started = time.monotonic()
            socks = [self.connect('127.0.0.2') for _ in range(16)]
            self.assertTrue(all(closed_soon(s, 6) for s in socks))
            self.assertLess(time.monotonic() - started, 6)
            # each refusal is logged by its handshake thread, once it saw the close
            self.assertTrue(wait_until(lambda: len(logs.output) >= 16, 5), logs.output)
        self.assertTrue(wait_until(lambda: len(self.listener.admission) == 0, 2))
        channel, _addr, _info = self.client('127.0.0.2')
        channel.close()

    def test_refused_handshake_is_closed_and_logged(self):
        sock = self.connect('127.0.0.2')
        with self.assertLogs('dispy', 'WARNING') as logs:
            sock.sendall(b'HTTP/1.0 GET /\r\n\r\n')
            self.assertTrue(closed_soon(sock))
        self.assertIn('refused', '\n'.join(logs.output))


if __name__ == '__main__':
    unittest.main()
