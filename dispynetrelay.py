#!/usr/bin/env python3
"""dispynetrelay: finds the nodes of another network for clients and dispyschedulers.

Broadcast does not cross routers, so a client's discovery reaches only the nodes of its
own LAN.  Run ``python dispynetrelay.py`` on one host of a remote network and name that
host in the client's ``nodes`` (with a pattern for the network, as seed 002 says:
``nodes=['relay-host', '10.2.0.*']``); the relay repeats the client's discovery there,
and the nodes' answers and announcements go back to the client, which then connects to
each node directly (unicast is routed)::

    client ──ping (unicast to relay-host:51348)──► relay ──ping (broadcast, relayed)──► nodes
       ▲                                            │ ◄─────────── pong / announce ───────┘
       └──────── pong / announce (unicast) ─────────┘
    client ══════════════ TCP to each node it wants ══════════════════════════════► nodes

Beside a dispynode on the same host the node port is the node's (a relay started
first gives it up when the node comes); the node hands every ping it authenticates to
the relay over loopback (UDP 51350, ``dispy.RELAY_PORT``), so the spec's recipe works
unchanged there too.

Every datagram is dispy's (``dispy.DiscoveryEndpoint``: JSON with an HMAC, never
unpickled); the relay needs the nodes' secret (``-s``) and relays nothing it cannot
authenticate.  It is no amplifier and makes no loops (see ``NetRelay``): one repeat per
client a second at most, clients remembered for an hour after their last ping (at most
256), answers forwarded only to the clients that pinged in the last 3 s, a node's
announcements once every 2 s to the clients it knows.  ``--scheduler_node`` makes a
client or dispyscheduler known from the start, so the relay's network is searched for
it without a ping (and again every 30 s).

Threads: main (waits for SIGINT/SIGTERM; looks for a node started beside it every
second), udp (``serve_forever`` of the endpoint).
"""

import argparse
import errno
import os
import signal
import socket
import struct
import threading
import time

import dispy
from dispy import logger

__version__ = dispy.__version__

RELAY_PORT = dispy.RELAY_PORT   # a node beside the relay hands it pings here (loopback)
SCHEDULER_REPEAT = 30.0         # --scheduler_node: its network searched again this often
CLIENT_TTL = 3600.0             # seconds a client is known after its last ping
MAX_CLIENTS = 256
REPEAT_INTERVAL = 1.0           # a client's ping is repeated at most this often
ANSWER_WINDOW = 3.0             # nodes' answers go to the clients that pinged this lately
ANNOUNCE_INTERVAL = 2.0         # a node's announcement is forwarded this often at most
REPEATS_PER_S = 20              # pings repeated, and datagrams forwarded, a second at most
FORWARDS_PER_S = 5000
NODE_CHECK_INTERVAL = 1.0       # how often the relay looks for a node started beside it


# ================================================================================
# The relay
# ================================================================================

class _Client:
    __slots__ = ('addr', 'last_ping', 'last_repeat', 'permanent')

    def __init__(self, addr, permanent=False):
        self.addr = addr                # (host, udp port) where its answers go
        self.last_ping = time.monotonic()
        self.last_repeat = 0.0
        self.permanent = permanent      # --scheduler_node: never forgotten


class _Budget:
    """A token bucket: at most ``rate`` events a second, ``rate`` at once."""

    def __init__(self, rate):
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = time.monotonic()

    def take(self, count=1):
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < count:
            return False
        self.tokens -= count
        return True


class NetRelay(dispy.DiscoveryEndpoint):
    """The relay's discovery endpoint.  Its sockets: its own port (repeats leave from
    it; the nodes' answers come back to it), the node port (clients' pings, when no
    node serves on this host), the shared client port (node announcements broadcast on
    this network) and the loopback relay port (pings a node beside it hands over).

    No loops: a repeated ping is marked ``relayed`` (no node hands it over, no relay
    repeats it) and a forwarded answer ``via`` (no relay forwards it again); answers
    count only on the relay's own port, announcements only from this network."""

    def __init__(self, config):
        super().__init__(config.secret, self._on_datagram, nak_pings=True)
        self.config = config
        self.instance = os.urandom(6).hex()
        self.clients = {}               # (host, port) -> _Client
        self.lock = threading.Lock()
        self.beside_node = False
        self.own_socks = set()          # where the nodes' answers come
        self.node_socks = []            # the node port's, given up when a node comes
        self.networks = []              # (network, mask) of this host's IPv4 interfaces
        self.announced = {}             # (node instance, kind) -> when last forwarded
        self.repeats = _Budget(REPEATS_PER_S)
        self.forwards = _Budget(FORWARDS_PER_S)

    def bind_all(self):
        """Binds the sockets (see the class docstring); beside a dispynode the node
        port is the node's, and the node hands the relay its pings."""
        config = self.config
        self.networks = _local_networks(config.ip_addrs)
        for addr in config.ip_addrs or ['']:
            self.own_socks.add(self.bind(addr, 0))
        self.beside_node = any(_tcp_in_use(a, config.node_port)
                               for a in config.ip_addrs or [''])
        for addr in self._listen_addresses():
            if not self.beside_node:
                self.node_socks.append(self.bind(addr, config.node_port, reuse=True))
            self.bind(addr, config.client_port, reuse=True)
        self.bind('127.0.0.1', config.relay_port)
        if self.beside_node:
            logger.info('a dispynode serves here: it hands the relay the pings it gets')

    def _listen_addresses(self):
        """'' for all interfaces; with -i, each address and its broadcast address (a
        socket bound to a unicast address hears no broadcast)."""
        if not self.config.ip_addrs:
            return ['']
        found = []
        for family, addr, bcast in dispy.interface_addresses():
            if family == socket.AF_INET and addr in self.config.ip_addrs:
                found.append(addr)
                if bcast and bcast not in found:
                    found.append(bcast)
        return found or list(self.config.ip_addrs)

    def node_started_beside(self):
        """A dispynode started on this host since (checked now and then): the node
        port is its own from now on."""
        if self.node_socks and any(_tcp_in_use(a, self.config.node_port)
                                   for a in self.config.ip_addrs or ['']):
            for sock in self.node_socks:
                self.socks.remove(sock)
                sock.close()
            self.node_socks = []
            self.beside_node = True
            logger.info('a dispynode started here: it hands the relay the pings it gets')

    def _on_link(self, host):
        try:
            value = struct.unpack('!I', socket.inet_aton(host))[0]
        except (OSError, TypeError):
            return False
        return any(value & mask == network for network, mask in self.networks)

    # -- datagrams (the endpoint's thread) ---------------------------------------------
    def _on_datagram(self, msg, addr, sock):
        kind = msg.get('t')
        if kind == 'ping' and not msg.get('relayed') and not self._on_link(addr[0]):
            self._client_ping(msg, addr)        # one of this network's pings: not ours
        elif kind == 'relay' and dispy.is_loopback(addr[0]):
            inner, source = msg.get('ping'), msg.get('from')
            if (isinstance(inner, dict) and isinstance(source, list) and len(source) == 2
                    and isinstance(source[0], str) and isinstance(source[1], int)
                    and not self._on_link(source[0])):
                self._client_ping(inner, tuple(source))
        elif msg.get('via'):
            return                              # forwarded by a relay already
        elif kind == 'pong' and sock in self.own_socks:
            self._forward(msg, addr, recent=True)
        elif kind == 'announce' and self._on_link(addr[0]) and self._fresh(msg):
            self._forward(msg, addr, recent=False)

    def _fresh(self, msg):
        """A node's announcement forwarded once every 2 s at most (bounded table)."""
        key = (str(msg.get('instance')), msg.get('busy'))
        now = time.monotonic()
        if now - self.announced.get(key, -ANNOUNCE_INTERVAL) < ANNOUNCE_INTERVAL:
            return False
        if len(self.announced) >= MAX_CLIENTS * 4:
            self.announced.clear()
        self.announced[key] = now
        return True

    def _client_ping(self, msg, addr):
        """A client's ping: remembered, and repeated on this network (rate-limited)."""
        try:
            port = int(msg.get('port') or addr[1])
        except (TypeError, ValueError):
            return
        key = (addr[0], port if 0 < port < 65536 else addr[1])
        now = time.monotonic()
        with self.lock:
            client = self.clients.get(key)
            if client is None:
                self._expire(now)
                if len(self.clients) >= MAX_CLIENTS:
                    self._evict_one()
                client = self.clients[key] = _Client(key)
                logger.info('relaying discovery for %s:%s', *key)
            client.last_ping = now
            if now - client.last_repeat < REPEAT_INTERVAL or not self.repeats.take():
                return
            client.last_repeat = now
        self._repeat(msg)

    def _repeat(self, msg):
        ping = dict(msg, relayed=True)      # nodes answer the relay; no relay repeats it
        data = self.pack(ping)
        for bcast in dispy.broadcast_addresses(self.config.ip_addrs or None):
            self.sendto(data, (bcast, self.config.node_port))

    def _forward(self, msg, addr, recent):
        """A node's answer (to the clients that pinged lately) or announcement (to
        every client known), naming the node's own address (the client would take the
        relay's for it otherwise)."""
        msg = dict(msg, via=self.instance)
        if msg.get('ip') is None:
            msg['ip'] = msg.get('addr') or addr[0]
        data = self.pack(msg)
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            targets = [c.addr for c in self.clients.values()
                       if not recent or c.permanent or now - c.last_ping <= ANSWER_WINDOW]
            if not self.forwards.take(len(targets)):
                return
        for target in targets:
            self.sendto(data, target)

    def _expire(self, now):
        for key in [k for k, c in self.clients.items()
                    if not c.permanent and now - c.last_ping > CLIENT_TTL]:
            del self.clients[key]

    def _evict_one(self):
        """The table is full: the client that pinged least recently makes room."""
        free = [c for c in self.clients.values() if not c.permanent]
        if free:
            del self.clients[min(free, key=lambda c: c.last_ping).addr]

    # -- --scheduler_node ----------------------------------------------------------------
    def add_scheduler(self, host, port):
        """A client or dispyscheduler known from the start: the network is searched for
        it now (its nodes answer it through the relay)."""
        with self.lock:
            self.clients[(host, port)] = _Client((host, port), permanent=True)
        self._repeat(dispy.Datagram.ping('dispynetrelay', port))

    def repeat_for_schedulers(self):
        """Searched again now and then: a scheduler started after the relay, or one
        that missed the answers, hears of the nodes too."""
        with self.lock:
            ports = {c.addr[1] for c in self.clients.values() if c.permanent}
        for port in ports:
            self._repeat(dispy.Datagram.ping('dispynetrelay', port))


def _local_networks(ip_addrs):
    """(network, mask) of this host's IPv4 interfaces (those of ``ip_addrs`` if given),
    from each address and its broadcast address: the longest prefix they share."""
    networks = []
    for family, addr, bcast in dispy.interface_addresses():
        if family != socket.AF_INET or not bcast or (ip_addrs and addr not in ip_addrs):
            continue
        a = struct.unpack('!I', socket.inet_aton(addr))[0]
        b = struct.unpack('!I', socket.inet_aton(bcast))[0]
        bits = 32 - (a ^ b).bit_length()
        mask = (0xffffffff << (32 - bits)) & 0xffffffff if bits else 0
        networks.append((a & mask, mask))
    return networks


def _tcp_in_use(addr, port):
    """Whether a dispynode (a TCP listener) has ``port`` on ``addr`` (informational)."""
    with socket.socket() as sock:
        try:
            sock.bind((addr, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


# ================================================================================
# Command line
# ================================================================================

def build_parser():
    parser = argparse.ArgumentParser(
        prog='dispynetrelay.py',
        description='Relay dispy discovery to this network: clients and dispyschedulers on '
                    'other networks that name this host in their nodes find the nodes here.',
        epilog='Without --daemon it runs until Ctrl-C or SIGTERM all the same (it reads no '
               'commands).')
    add = parser.add_argument
    add('-d', '--debug', action='store_true', help='log debug messages')
    add('-i', '--ip_addr', '--host', dest='ip_addrs', action='append', default=[],
        help='address of this host on the network to relay to (repeatable; default all)')
    add('--scheduler_node', action='append', default=[],
        help='client or dispyscheduler host to find this network\'s nodes for from the '
        'start (repeatable)')
    add('--scheduler_port', type=int, default=dispy.CLIENT_PORT,
        help='UDP port of --scheduler_node (default %(default)s)')
    add('-p', '--dispy_port', type=int, default=dispy.CLIENT_PORT,
        help='dispy\'s base port: clients on it, nodes on the next (default %(default)s)')
    add('--relay_port', type=int, default=RELAY_PORT,
        help='loopback UDP port where a dispynode on this host hands over pings '
        '(default %(default)s)')
    add('-s', '--secret', default='', help='the nodes\' secret (nothing else is relayed)')
    add('--certfile', help='accepted for 4.15 scripts (the relay carries no TLS traffic)')
    add('--keyfile', help='accepted for 4.15 scripts (the relay carries no TLS traffic)')
    add('--ipv4_udp_multicast', action='store_true',
        help='accepted for 4.15 scripts (IPv4 discovery uses broadcast here)')
    add('--daemon', action='store_true', help='accepted (the relay reads no commands)')
    return parser


def configure(argv=None):
    config = build_parser().parse_args(argv)
    config.ip_addrs = [_ipv4(a) for a in config.ip_addrs]
    config.scheduler_node = [_ipv4(a) for a in config.scheduler_node]
    config.client_port = config.dispy_port
    config.node_port = config.dispy_port + 1
    return config


def _ipv4(host):
    addr = dispy.resolve_or_exit(host, 'dispynetrelay')
    if ':' in addr:
        raise SystemExit('dispynetrelay: %s is IPv6; the relay repeats IPv4 discovery only '
                         '(IPv6 nodes are found by multicast where routing allows)' % host)
    return addr


def main(argv=None):
    config = configure(argv)
    dispy.setup_logging(logger.DEBUG if config.debug else logger.INFO, 'dispynetrelay')
    relay = NetRelay(config)
    try:
        relay.bind_all()
    except OSError as exc:
        relay.close()
        raise SystemExit('dispynetrelay: cannot bind: %s' % exc)
    threading.Thread(target=relay.serve_forever, daemon=True, name='dispynetrelay-udp').start()
    for host in config.scheduler_node:
        relay.add_scheduler(host, config.scheduler_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if relay.beside_node and config.relay_port != RELAY_PORT:
        logger.warning('--relay_port %s: a dispynode here hands pings to %s only',
                       config.relay_port, RELAY_PORT)
    print('dispynetrelay relaying at %s (node port %s, relay port %s)%s'
          % (', '.join(config.ip_addrs) or '*', config.node_port, config.relay_port,
             ' beside a dispynode' if relay.beside_node else ''), flush=True)
    last_repeat = time.monotonic()
    while not stop.wait(NODE_CHECK_INTERVAL):
        relay.node_started_beside()
        if time.monotonic() - last_repeat >= SCHEDULER_REPEAT:
            last_repeat = time.monotonic()
            relay.repeat_for_schedulers()
    relay.close()


if __name__ == '__main__':
    main()
