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

Beside a dispynode on the same host both hold UDP 51348 (SO_REUSEADDR, whichever
starts first) and a ping sent to the host reaches one of them: the relay repeats it,
or the node answers and hands it to the relay over loopback (``--relay_port``, default
51350), so the spec's recipe works unchanged there too.

Every datagram is dispy's (``dispy.DiscoveryEndpoint``: JSON with an HMAC, never
unpickled); the relay needs the nodes' secret (``-s``) and relays nothing it cannot
authenticate.  It is no amplifier: one repeat per client a second at most, clients
remembered for an hour after their last ping (at most 256), answers forwarded only to
the clients that pinged in the last 10 s, announcements to the clients it knows.  ``--scheduler_node`` makes a client or dispyscheduler known from the
start, so the relay's network is searched for it without a ping.

Threads: main (waits for SIGINT/SIGTERM), udp (``serve_forever`` of the endpoint).
"""

import argparse
import errno
import signal
import socket
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
ANSWER_WINDOW = 10.0            # nodes' answers go to the clients that pinged this lately


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


class NetRelay(dispy.DiscoveryEndpoint):
    """The relay's discovery endpoint.  Its sockets: the node port (when no node holds
    it), the loopback relay port (pings a node beside it hands over), and the shared
    client port (node announcements broadcast on this network)."""

    def __init__(self, config):
        super().__init__(config.secret, self._on_datagram, nak_pings=True)
        self.config = config
        self.clients = {}               # (host, port) -> _Client
        self.lock = threading.Lock()
        self.beside_node = False

    def bind_all(self):
        """Repeats leave from a port of the relay's own (the nodes' answers come back
        there); the node port and the client port are shared (SO_REUSEADDR) with a
        dispynode, clients and a dispyscheduler on this host, whichever starts first."""
        config = self.config
        for addr in config.ip_addrs or ['']:
            self.bind(addr, 0)
        for addr in config.ip_addrs or ['']:
            self.bind(addr, config.node_port, reuse=True)
            self.bind(addr, config.client_port, reuse=True)
            self.beside_node = self.beside_node or _tcp_in_use(addr, config.node_port)
        self.bind('127.0.0.1', config.relay_port)
        if self.beside_node:
            logger.info('a dispynode serves here: it hands the relay the pings it gets')

    # -- datagrams (the endpoint's thread) ---------------------------------------------
    def _on_datagram(self, msg, addr, sock):
        kind = msg.get('t')
        if kind == 'ping' and not msg.get('relayed'):
            self._client_ping(msg, addr)
        elif kind == 'relay' and dispy.is_loopback(addr[0]):
            inner, source = msg.get('ping'), msg.get('from')
            if (isinstance(inner, dict) and isinstance(source, list) and len(source) == 2
                    and isinstance(source[0], str) and isinstance(source[1], int)):
                self._client_ping(inner, tuple(source))
        elif kind in ('pong', 'announce'):
            self._forward(msg, addr)

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
                    return
                client = self.clients[key] = _Client(key)
                logger.info('relaying discovery for %s:%s', *key)
            client.last_ping = now
            if now - client.last_repeat < REPEAT_INTERVAL:
                return
            client.last_repeat = now
        self._repeat(msg)

    def _repeat(self, msg):
        ping = dict(msg, relayed=True)      # nodes answer the relay; no relay repeats it
        data = self.pack(ping)
        for bcast in dispy.broadcast_addresses(self.config.ip_addrs or None):
            self.sendto(data, (bcast, self.config.node_port))

    def _forward(self, msg, addr):
        """A node's answer (to the clients that pinged lately) or announcement (to
        every client known), naming the node's own address (the client would take the
        relay's for it otherwise)."""
        if msg.get('ip') is None:
            msg = dict(msg, ip=msg.get('addr') or addr[0])
        data = self.pack(msg)
        now = time.monotonic()
        recent = msg.get('t') == 'pong'
        with self.lock:
            self._expire(now)
            targets = [c.addr for c in self.clients.values()
                       if not recent or c.permanent or now - c.last_ping <= ANSWER_WINDOW]
        for target in targets:
            self.sendto(data, target)

    def _expire(self, now):
        for key in [k for k, c in self.clients.items()
                    if not c.permanent and now - c.last_ping > CLIENT_TTL]:
            del self.clients[key]

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
    config.ip_addrs = [dispy.resolve_or_exit(a, 'dispynetrelay') for a in config.ip_addrs]
    config.client_port = config.dispy_port
    config.node_port = config.dispy_port + 1
    return config


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
        relay.add_scheduler(dispy.resolve_or_exit(host, 'dispynetrelay'),
                            config.scheduler_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print('dispynetrelay relaying at %s (node port %s, relay port %s)%s'
          % (', '.join(config.ip_addrs) or '*', config.node_port, config.relay_port,
             ' beside a dispynode' if relay.beside_node else ''), flush=True)
    while not stop.wait(SCHEDULER_REPEAT):
        relay.repeat_for_schedulers()
    relay.close()


if __name__ == '__main__':
    main()
