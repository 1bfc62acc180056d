"""dispynetrelay's rules without a network: what it repeats, to whom it forwards, and
its bounds (the routed-lab tests are in test_relay_netns.py)."""

import types
import unittest

try:
    from tests import support  # noqa: F401 (puts the repository on sys.path)
except ImportError:                         # run from inside tests/
    import support  # noqa: F401

import dispy
import dispynetrelay


class RelayRulesTest(unittest.TestCase):

    def setUp(self):
        config = types.SimpleNamespace(secret='s', ip_addrs=[], node_port=51348,
                                       client_port=51347, relay_port=dispy.RELAY_PORT)
        self.relay = dispynetrelay.NetRelay(config)
        self.repeats, self.sent = [], []
        self.relay._repeat = self.repeats.append
        self.relay.sendto = lambda data, addr, sock=None: self.sent.append((data, addr))
        self.relay.own_socks = {'own'}          # the socket the relay's repeats leave from
        self.relay.networks = [(0x0a090000, 0xffffff00)]     # this host's LAN: 10.9.0.0/24
        self.addCleanup(self.relay.close)

    def ping(self, host, port=51347, **extra):
        self.relay._on_datagram(dict(dispy.Datagram.ping('c', port), **extra), (host, port),
                                None)

    def test_one_repeat_a_second_per_client(self):
        for _ in range(50):
            self.ping('10.0.0.1')
        self.ping('10.0.0.2')
        self.assertEqual(len(self.repeats), 2)
        self.assertTrue(all(not r.get('relayed') for r in self.repeats))

    def test_relayed_pings_are_not_repeated_and_handed_pings_are(self):
        self.ping('10.0.0.1', relayed=True)
        self.assertEqual(self.repeats, [])
        inner = dispy.Datagram.ping('c', 4000)
        self.relay._on_datagram({'t': 'relay', 'from': ['10.0.0.9', 4000], 'ping': inner},
                                ('127.0.0.1', 5555), None)
        self.assertEqual(len(self.repeats), 1)
        self.assertIn(('10.0.0.9', 4000), self.relay.clients)
        self.relay._on_datagram({'t': 'relay', 'from': ['10.0.0.8', 1], 'ping': inner},
                                ('10.1.1.1', 5555), None)      # not from this host: ignored
        self.assertNotIn(('10.0.0.8', 1), self.relay.clients)

    def test_clients_are_bounded_and_repeats_budgeted(self):
        for i in range(dispynetrelay.MAX_CLIENTS + 50):
            self.ping('10.%d.%d.1' % (i // 250, i % 250))
        self.assertEqual(len(self.relay.clients), dispynetrelay.MAX_CLIENTS)
        self.assertIn(('10.1.55.1', 51347), self.relay.clients, 'the newest has room')
        self.assertLessEqual(len(self.repeats), dispynetrelay.REPEATS_PER_S + 1)

    def test_pings_of_its_own_network_are_not_repeated(self):
        self.ping('10.9.0.7')
        self.assertEqual((self.repeats, self.relay.clients), ([], {}))

    def test_answers_name_the_node_and_go_to_recent_clients(self):
        self.ping('10.0.0.1')
        self.relay.clients[('10.0.0.1', 51347)].last_ping -= 3 * dispynetrelay.ANSWER_WINDOW
        self.ping('10.0.0.2')
        pong = dispy.Datagram.pong('pong', None, 51348, 'n', 1, False, 'i', '10.9.0.5')
        self.relay._on_datagram(pong, ('10.9.0.5', 51348), 'other')   # not its own port
        self.assertEqual(self.sent, [])
        self.relay._on_datagram(pong, ('10.9.0.5', 51348), 'own')
        self.assertEqual([addr for _, addr in self.sent], [('10.0.0.2', 51347)])
        msg, good = dispy.unpack_datagram('s', self.sent[0][0])
        self.assertTrue(good)
        self.assertEqual(msg['ip'], '10.9.0.5')
        del self.sent[:]
        announce = dict(pong, t='announce')
        for _ in range(5):      # once per node in ANNOUNCE_INTERVAL
            self.relay._on_datagram(announce, ('10.9.0.5', 51348), None)
        self.assertEqual(sorted(addr for _, addr in self.sent),
                         [('10.0.0.1', 51347), ('10.0.0.2', 51347)])
        del self.sent[:]
        self.relay._on_datagram(dict(announce, instance='j'), ('10.7.7.7', 51348), None)
        self.assertEqual(self.sent, [], 'an announcement from another network')

    def test_forwarded_copies_are_never_forwarded_again(self):
        """No loop between relays (or a relay told its own host as --scheduler_node)."""
        self.relay.add_scheduler('10.0.0.1', 51347)
        pong = dispy.Datagram.pong('announce', None, 51348, 'n', 1, False, 'k', '10.9.0.5')
        self.relay._on_datagram(pong, ('10.9.0.5', 51348), None)
        self.assertEqual(len(self.sent), 1)
        forwarded, good = dispy.unpack_datagram('s', self.sent[0][0])
        self.assertTrue(good and forwarded['via'])
        del self.sent[:]
        self.relay._on_datagram(forwarded, ('10.9.0.1', 51347), None)
        self.relay._on_datagram(dict(forwarded, t='pong'), ('10.9.0.1', 51347), 'own')
        self.assertEqual(self.sent, [])

    def test_unauthenticated_datagrams_are_not_relayed(self):
        data = dispy.pack_datagram('wrong', dispy.Datagram.ping('c', 51347))
        self.relay.dispatch(data, ('10.0.0.1', 51347), None)
        self.assertEqual((self.repeats, self.relay.clients), ([], {}))


if __name__ == '__main__':
    unittest.main()
