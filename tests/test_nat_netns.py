"""dispy behind NAT and over SSH tunnels, in routed labs (seed 002 §1.10 "NAT/Firewall
Forwarding", §1.11 "SSH Port Forwarding", §1.13 "Cloud Computing"; seed 000 §6.10;
the README's ports section).

Each lab is a ``RoutedLab`` (tests/netns.py) of two LANs whose router namespace
becomes a NAT gateway: an nftables table loaded only inside that namespace::

      "public" LAN 0: 10.213.N.0/24              "private" LAN 1: 10.214.N.0/24
    +----------------+                           +----------------+
    | hosts .1, .2   |-- sw0 --+       +-- sw1 --| host .1        |
    +----------------+         |       |         +----------------+
                          eth0 .254  eth1 .254
                    +---- router namespace: the NAT gateway ----
                    | masquerade: what leaves the private LAN has the router's
                    |   public address (10.213.N.254, "<public>" below)
                    | forward filter: nothing from the public LAN enters the
                    |   private one unless it answers a connection made from
                    |   inside, or was DNATed (a forwarded port)
                    | DNAT: the test's forwarded ports (TCP and UDP)
                    | ssh_only: the private LAN reaches the public hosts on
                    |   the ssh port (2222) alone
                    +-------------------------------------------

``NodeBehindNatTest``: ``client`` public, ``natnode`` private; the router forwards the
node's port.  ``dispynode.py --ext_host <public> -i <node private>``, the client names
``<public>``.  Checked: the private address is unreachable from the client (the NAT is
real); every job runs on ``natnode`` (its ``DISPY_TEST_NODE`` and host name); the
client (``job.ip_addr``) and the jobs (``dispy_node_ip_addr``) know the node as
``<public>``.  Also: a public port other than the node's (``--ext_port``,
``node_port=``), a named node without ``--ext_host``, a node that starts after the
client.

``ClientBehindNatTest`` and ``SshTunnelTest``: ``sshnode`` and ``sshnode2`` public (a
dispynode each, maybe a dispyscheduler, and an sshd of the test's own: port 2222, host
and user keys, config and authorized keys in a temp folder), ``natclient`` private (the
program: nodes cannot reach it, as seed 002 §1.11 supposes).  Checked:

- no forwarding and no option at all (a client dials its nodes; the nodes' answers to
  its pings come back through the NAT's connection tracking), and seed 002 §1.10 as
  written (51347 forwarded to the client, ``ext_ip_addr=<public>``);
- seed 002 §1.11 / seed 000 §6.10: ``ssh -R 51347:127.0.0.1:51347`` from the client
  host to the node host, ``dispynode.py -i <node address>``, the client with
  ``ip_addr='127.0.0.1'`` or ``ext_ip_addr='127.0.0.1'``: the jobs run.  A node never
  connects to its client here, so the tunnel carries nothing (each test prints
  ``tunnel_connections=``); the same for a SharedJobCluster with the seed's
  ``ssh -R 2345:...``, ``port=2345, ext_ip_addr=`` (both ignored with a warning);
- only ssh reaches the node host: ``ssh -L 51348:127.0.0.1:51348`` and a node on
  ``-i 127.0.0.1``, the client naming ``127.0.0.1``; two nodes, one tunnel each on a
  loopback address of its own (``ssh -L 127.0.0.2:51348:127.0.0.1:51348``, ...); and
  the README's ``ssh -L 51349:localhost:51349 sched-host`` with
  ``scheduler_node='127.0.0.1'``: the jobs go through the tunnels (ssh's log shows the
  forwarded connections).

Nothing of the machine's ssh setup is read or changed (``ssh -F /dev/null``, no agent,
no known hosts; ``sshd -f`` a temp config; ``/run/sshd`` is a tmpfs in a private mount
namespace).  Everything skips cleanly where namespaces, ``nft`` NAT rules or
``ssh``/``sshd`` are not available.  Each test prints one ``NAT-SSH <test> ...
run_s=`` line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest

try:
    from tests import netns, support
    from tests.test_netns import NODE_WATCH, LabTestCase, clean_env, time_limit
except ImportError:                         # run from inside tests/
    import netns
    import support
    from test_netns import NODE_WATCH, LabTestCase, clean_env, time_limit

NODE_SCRIPT = support.NODE_SCRIPT
SCHEDULER_SCRIPT = support.SCHEDULER_SCRIPT
NFT = shutil.which('nft') or '/usr/sbin/nft'
SSHD = shutil.which('sshd') or '/usr/sbin/sshd'
SSH = shutil.which('ssh') or '/usr/bin/ssh'
SSH_KEYGEN = shutil.which('ssh-keygen') or '/usr/bin/ssh-keygen'
SECRET = 'lab secret'
NODE_PORT = 51348
CLIENT_PORT = 51347
SCHEDULER_PORT = 51349
SSH_PORT = 2222
JOBS = 6

# argv[1]: JSON {nodes, options (JobCluster keyword arguments), count, secret, shared
# (a scheduler_node: a SharedJobCluster then), want (nodes to wait for before
# submitting), sleep (each job's seconds)}.  Each job returns where it ran: the lab
# host's DISPY_TEST_NODE, its host name and the address the node gives its jobs
# (dispy_node_ip_addr).
CLIENT = r'''
import json, sys, threading, time
import dispy

def compute(seconds):
    import os, socket, time
    time.sleep(seconds)
    return [os.environ.get('DISPY_TEST_NODE', '?'), socket.gethostname(),
            globals().get('dispy_node_ip_addr')]

''' + NODE_WATCH + r'''
cfg = json.loads(sys.argv[1])
start = time.monotonic()
kind = dispy.SharedJobCluster if cfg.get('shared') else dispy.JobCluster
if cfg.get('shared'):
    cfg['options']['scheduler_node'] = cfg['shared']
cluster = kind(compute, nodes=cfg['nodes'], secret=cfg['secret'], recover_file=False,
               cluster_status=watch_nodes, **cfg['options'])
with cond:
    cond.wait_for(lambda: len(nodes) >= cfg.get('want', 0), 20)
jobs = [cluster.submit(cfg.get('sleep', 0)) for i in range(cfg['count'])]
ran = []
for job in jobs:
    result = job(timeout=30)
    ran.append({'result': result, 'ip_addr': job.ip_addr, 'status': job.status,
                'exception': job.exception})
print('RAN ' + json.dumps(ran), flush=True)
print('took %.2f s' % (time.monotonic() - start), flush=True)
cluster.close(timeout=10, terminate=True)
'''

# argv: host port timeout -> prints 'open', 'refused' (the host answered: reachable)
# or 'blocked <reason>' (a bounded TCP connect)
PROBE = r'''
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
    print('open')
except ConnectionRefusedError:
    print('refused')
except OSError as exc:
    print('blocked %s' % exc)
'''


# -- the NAT gateway ------------------------------------------------------------------

def nat_rules(public, private_net, forwards=(), ssh_only_to=None):
    """The router's nftables ruleset (one table of its own; eth0 is its public leg,
    eth1 its private one).

    ``forwards``: (public port, private address, private port) forwarded for TCP and
    UDP.  ``ssh_only_to``: public hosts that the private LAN may reach on the ssh
    port only (a firewall that lets nothing else out).
    """
    dnat = ['iifname "eth0" ip daddr %s meta l4proto { tcp, udp } th dport %d '
            'dnat to %s:%d' % (public, port, addr, to_port) for port, addr, to_port in forwards]
    outward = ('iifname "eth1" oifname "eth0" accept' if not ssh_only_to else
               'iifname "eth1" oifname "eth0" ip daddr { %s } tcp dport %d accept'
               % (', '.join(ssh_only_to), SSH_PORT))
    chains = [
        ('prerouting', 'type nat hook prerouting priority dstnat; policy accept;', dnat),
        ('postrouting', 'type nat hook postrouting priority srcnat; policy accept;',
         ['oifname "eth0" ip saddr %s masquerade' % private_net]),
        ('forward', 'type filter hook forward priority filter; policy drop;',
         ['ct state established,related accept', outward,
          'iifname "eth0" oifname "eth1" ct status dnat accept'])]
    return 'table ip dspynat {\n%s}\n' % ''.join(
        '    chain %s {\n        %s\n%s    }\n' % (name, hook, ''.join(
            '        %s\n' % rule for rule in rules)) for name, hook, rules in chains)


def load_nat(lab, rules):
    """Loads ``rules`` in the lab's router namespace (never anywhere else); skips
    the test if nft is missing or the kernel refuses NAT rules."""
    if not os.path.exists(NFT):
        raise unittest.SkipTest('no nft (apt-get install nftables)')
    proc = subprocess.run([netns.IP, 'netns', 'exec', lab.router, NFT, '-f', '-'],
                          input=rules, capture_output=True, text=True, timeout=15)
    if proc.returncode != 0:
        raise unittest.SkipTest('the kernel refuses the NAT rules: %s' % proc.stderr.strip())


# -- ssh ------------------------------------------------------------------------------

SSHD_CONFIG = '''\
Port {port}
ListenAddress {addr}
HostKey {dir}/host_key
PidFile none
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
UseDNS no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
'''

# sshd needs its privilege separation folder /run/sshd: a tmpfs on /run in a private
# mount namespace gives it one without creating anything on the machine.
SSHD_WRAPPER = 'mount -t tmpfs -o mode=0755 dspy-sshd /run && mkdir -m 0755 /run/sshd && exec "$@"'


def require_ssh():
    for path, package in ((SSHD, 'openssh-server'), (SSH, 'openssh-client'),
                          (SSH_KEYGEN, 'openssh-client'), (netns.UNSHARE, 'util-linux')):
        if not path or not os.path.exists(path):
            raise unittest.SkipTest('no %s (apt-get install %s)' % (path, package))
    if os.geteuid() != 0:
        raise unittest.SkipTest('sshd needs root')


def keygen(path):
    subprocess.run([SSH_KEYGEN, '-q', '-t', 'ed25519', '-N', '', '-C', 'dispy-lab', '-f', path],
                   check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def ssh_options(key):
    """Options that keep ssh away from the machine's and the user's configuration."""
    return ['-F', '/dev/null', '-i', key, '-o', 'IdentitiesOnly=yes', '-o', 'BatchMode=yes',
            '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
            '-o', 'GlobalKnownHostsFile=/dev/null', '-o', 'ExitOnForwardFailure=yes',
            '-o', 'ConnectTimeout=10', '-o', 'ServerAliveInterval=5', '-p', str(SSH_PORT)]


def ssh_env():
    env = clean_env()
    env.pop('SSH_AUTH_SOCK', None)          # no agent: only the lab's key is offered
    return env


# -- the tests -------------------------------------------------------------------------

class NatLabCase(LabTestCase):
    """A RoutedLab of (public LAN, private LAN) with helpers to run dispy in it."""

    def setUp(self):
        super().setUp()
        self.started = time.monotonic()
        self.script = os.path.join(self.tempdir('client'), 'client.py')
        with open(self.script, 'w') as f:
            f.write(CLIENT)

    def public_ip(self):
        """The router's address on the public LAN (the NAT's outside)."""
        return self.lab.gateway(self.lab.lans[0][0])

    def node(self, host, args):
        folder = self.tempdir(host)
        node = self.spawn(host, [sys.executable, NODE_SCRIPT, '--daemon', '-d', '-c', '2',
                                 '-s', SECRET, '--dest_path_prefix',
                                 os.path.join(folder, 'dest')] + list(args),
                          cwd=folder, env=clean_env(DISPY_TEST_NODE=host, TMPDIR=folder))
        node.wait_for(support.READY_RE.pattern, timeout=30)
        return node

    def run_client(self, host, nodes, shared=None, want=0, sleep=0, **options):
        """Runs the client script in ``host``; returns the list of its jobs' reports."""
        cfg = {'nodes': nodes, 'options': options, 'count': JOBS, 'secret': SECRET,
               'shared': shared, 'want': want, 'sleep': sleep}
        return self.results(self.start_client(host, cfg))

    def start_client(self, host, cfg):
        self.client = self.spawn(host, [sys.executable, self.script, json.dumps(cfg)],
                                 env=clean_env(), cwd=os.path.dirname(self.script))
        return self.client

    def results(self, client, timeout=60):
        """The client's jobs' reports, once it has printed them."""
        try:
            client.wait_for(r'took [\d.]+ s', timeout=timeout)
        except RuntimeError:
            self.fail('the client did not finish\n' + self.diagnostics())
        return json.loads(re.search(r'^RAN (.*)$', client.stdout(), re.M).group(1))

    def assert_ran_on(self, ran, host, node_addr):
        """Every job finished on lab host ``host``, known by the client (``job.ip_addr``)
        and by itself (``dispy_node_ip_addr``) as ``node_addr``."""
        self.assertEqual(len(ran), JOBS, self.diagnostics())
        for job in ran:
            self.assertEqual(job['result'], [host, host if self.lab.hostnames else
                                             job['result'][1], node_addr],
                             '%s\n%s' % (job, self.diagnostics()))
            self.assertEqual(job['ip_addr'], node_addr, self.diagnostics())

    def probe(self, host, addr, port, timeout=1.0):
        """'open', 'refused' or 'blocked ...': a TCP connect from ``host``."""
        result = self.lab.run(host, [sys.executable, '-c', PROBE, addr, port, timeout],
                              timeout=timeout + 15)
        return result.stdout.strip()

    def report(self, **fields):
        print('NAT-SSH %s %s run_s=%.1f' % (self.id().rsplit('.', 1)[-1], ' '.join(
            '%s=%s' % item for item in fields.items()), time.monotonic() - self.started))


class NodeBehindNatTest(NatLabCase):
    """A node on a private LAN behind a port-forwarding NAT router (seed 002 §1.10, §1.13)."""

    LANS = (('client',), ('natnode',))

    def forward(self, public_port):
        private = self.lab.ip('natnode')
        load_nat(self.lab, nat_rules(self.public_ip(), self.lab.subnet_of(1),
                                     forwards=[(public_port, private, NODE_PORT)]))
        # The NAT is real: the node's own address cannot be reached from outside.
        self.assertTrue(self.probe('client', private, NODE_PORT).startswith('blocked'),
                        'the private LAN is reachable from the public one')

    @time_limit(60)
    def test_node_behind_nat_reached_through_ext_host(self):
        self.forward(NODE_PORT)
        public = self.public_ip()
        self.node('natnode', ['--ext_host', public, '-i', self.lab.ip('natnode')])
        self.assertEqual(self.probe('client', public, NODE_PORT), 'open')
        self.assert_ran_on(self.run_client('client', [public]), 'natnode', public)
        self.report(node=public)

    @time_limit(60)
    def test_forwarded_to_another_port(self):
        """The router's public port 61348 goes to the node's 51348: the node says so
        with --ext_port, the client names the port with node_port=."""
        self.forward(61348)
        public = self.public_ip()
        self.node('natnode', ['--ext_host', public, '--ext_port', '61348',
                              '-i', self.lab.ip('natnode')])
        self.assert_ran_on(self.run_client('client', [public], node_port=61348),
                           'natnode', public)
        self.report(node='%s:61348' % public)

    @time_limit(60)
    def test_named_node_without_ext_host(self):
        """A node the client names needs no --ext_host: the client keeps the address
        it dialed (its pongs come back from the router's address too); only the jobs
        see the private address as dispy_node_ip_addr.  --ext_host is what makes the
        node advertise the public one (in its pongs and announcements, to its jobs)."""
        self.forward(NODE_PORT)
        public = self.public_ip()
        self.node('natnode', ['-i', self.lab.ip('natnode')])
        ran = self.run_client('client', [public])
        self.assertEqual({job['ip_addr'] for job in ran}, {public}, self.diagnostics())
        self.assertEqual({job['result'][2] for job in ran}, {self.lab.ip('natnode')})
        self.report(node=public)

    @time_limit(60)
    def test_node_started_after_the_client(self):
        """The client keeps dialing the node it names; a node behind the NAT that
        starts later is used as soon as it serves."""
        self.forward(NODE_PORT)
        public = self.public_ip()
        cfg = {'nodes': [public], 'options': {}, 'count': JOBS, 'secret': SECRET}
        client = self.start_client('client', cfg)
        time.sleep(1.5)     # the client's first dials find nothing behind the NAT
        self.node('natnode', ['--ext_host', public, '-i', self.lab.ip('natnode')])
        served = time.monotonic()
        self.assert_ran_on(self.results(client, timeout=45), 'natnode', public)
        self.report(node=public, used_after_s='%.1f' % (time.monotonic() - served))


class ClientBehindNatCase(NatLabCase):
    """The client on the private LAN behind the NAT router, the node (and a
    dispyscheduler) on the public one: nodes cannot reach the client."""

    LANS = (('sshnode', 'sshnode2'), ('natclient',))

    def nat(self, ssh_only=False, forwards=()):
        public_hosts = [self.lab.ip(host) for host in self.lab.lans[0]]
        load_nat(self.lab, nat_rules(self.public_ip(), self.lab.subnet_of(1), forwards,
                                     ssh_only_to=public_hosts if ssh_only else None))
        if not forwards:    # the client is behind NAT: the node host cannot reach it
            self.assertTrue(self.probe('sshnode', self.lab.ip('natclient'), SSH_PORT)
                            .startswith('blocked'), 'the private LAN is reachable')

    def scheduler(self, node_ip):
        folder = self.tempdir('sched')
        sched = self.spawn('sshnode', [sys.executable, SCHEDULER_SCRIPT, '--daemon', '-d',
                                       '--node_secret', SECRET, '--cluster_secret', SECRET,
                                       '-n', node_ip, '--dest_path_prefix', folder],
                           env=clean_env(), cwd=folder)
        sched.wait_for(r'dispyscheduler serving at', timeout=30, stream='stderr')
        return sched


class ClientBehindNatTest(ClientBehindNatCase):
    """Seed 002 §1.10 for a client behind NAT, and what this dispy needs of it."""

    @time_limit(60)
    def test_client_behind_nat_needs_no_forwarding(self):
        """The client dials its nodes, and their answers to its pings come back
        through the NAT's connection tracking: nothing to forward, no option."""
        self.nat()
        node_ip = self.lab.ip('sshnode')
        self.node('sshnode', ['-i', node_ip])
        self.assert_ran_on(self.run_client('natclient', [node_ip]), 'sshnode', node_ip)
        self.report(node=node_ip)

    @time_limit(60)
    def test_seed_recipe_forwarded_client_port_and_ext_ip_addr(self):
        """Seed 002 §1.10 as written: UDP+TCP 51347 forwarded to the client and
        ``ext_ip_addr`` the gateway's address (pings then leave from 51347 alone)."""
        self.nat(forwards=[(CLIENT_PORT, self.lab.ip('natclient'), CLIENT_PORT)])
        node_ip = self.lab.ip('sshnode')
        self.node('sshnode', ['-i', node_ip])
        self.assert_ran_on(self.run_client('natclient', [node_ip],
                                           ext_ip_addr=self.public_ip()), 'sshnode', node_ip)
        self.report(ext_ip_addr=self.public_ip())


class SshTunnelTest(ClientBehindNatCase):
    """ssh tunnels from the client behind NAT (seed 002 §1.11, seed 000 §6.10, README
    "ports"): sshd of the test's own on the node host, port 2222."""

    def setUp(self):
        require_ssh()
        super().setUp()
        self.keys = self.tempdir('ssh')
        os.chmod(self.keys, 0o700)
        self.key = os.path.join(self.keys, 'user_key')
        keygen(os.path.join(self.keys, 'host_key'))
        keygen(self.key)
        shutil.copy(self.key + '.pub', os.path.join(self.keys, 'authorized_keys'))

    def sshd(self, host):
        cfg = os.path.join(self.keys, 'sshd_config-' + host)
        with open(cfg, 'w') as f:
            f.write(SSHD_CONFIG.format(port=SSH_PORT, addr=self.lab.ip(host), dir=self.keys))
        sshd = self.spawn(host, [netns.UNSHARE, '--mount', '--', 'sh', '-c',
                                 SSHD_WRAPPER, 'sshd', SSHD, '-D', '-e', '-f', cfg],
                          env=ssh_env())
        try:
            sshd.wait_for(r'Server listening on', timeout=20, stream='stderr')
        except RuntimeError as exc:
            raise unittest.SkipTest('sshd cannot run in a namespace here: %s' % exc)
        return sshd

    def tunnel(self, forward, host='sshnode'):
        """``ssh -N <forward> root@<host>`` from the client host, once it is up."""
        self.sshd(host)
        ssh = self.spawn('natclient', [SSH, '-v', '-N'] + ssh_options(self.key) + forward
                         + ['root@%s' % self.lab.ip(host)], env=ssh_env())
        ssh.wait_for(r'remote forward success|Local forwarding listening on', timeout=20,
                     stream='stderr')
        return ssh

    @staticmethod
    def remote_forwards(ssh):
        """Connections the sshd sent back through an ``ssh -R`` tunnel."""
        return ssh.stderr().count('forwarded-tcpip')

    @staticmethod
    def local_forwards(ssh, port):
        """Connections made through an ``ssh -L`` tunnel to ``port``."""
        return len(re.findall(r'Connection to port %d forwarding' % port, ssh.stderr()))

    def ssh_R_recipe(self, **options):
        """Seed 002 §1.11 / 000 §6.10: the client's port forwarded from the node host
        with ``ssh -R``, dispynode on the node's (external) address, the client
        naming it."""
        self.nat()
        ssh = self.tunnel(['-R', '%d:127.0.0.1:%d' % (CLIENT_PORT, CLIENT_PORT)])
        node_ip = self.lab.ip('sshnode')
        self.node('sshnode', ['-i', node_ip])
        self.assert_ran_on(self.run_client('natclient', [node_ip], **options),
                           'sshnode', node_ip)
        # A node never connects to its client, so nothing needs the tunnel.
        self.report(tunnel_connections=self.remote_forwards(ssh), options=','.join(
            '%s=%s' % item for item in options.items()))

    @time_limit(60)
    def test_ssh_R_recipe_with_client_ip_addr_localhost(self):
        self.ssh_R_recipe(ip_addr='127.0.0.1')

    @time_limit(60)
    def test_ssh_R_recipe_with_client_ext_ip_addr_localhost(self):
        self.ssh_R_recipe(ext_ip_addr='127.0.0.1')

    @time_limit(60)
    def test_ssh_L_when_only_ssh_reaches_the_node(self):
        """Only ssh gets through to the node host, and the node serves on loopback
        alone: the client reaches it through ``ssh -L`` and names 127.0.0.1."""
        self.nat(ssh_only=True)
        self.assertTrue(self.probe('natclient', self.lab.ip('sshnode'), NODE_PORT)
                        .startswith('blocked'), 'the firewall lets more than ssh through')
        ssh = self.tunnel(['-L', '%d:127.0.0.1:%d' % (NODE_PORT, NODE_PORT)])
        self.node('sshnode', ['-i', '127.0.0.1'])
        self.assert_ran_on(self.run_client('natclient', ['127.0.0.1']), 'sshnode',
                           '127.0.0.1')
        carried = self.local_forwards(ssh, NODE_PORT)
        self.assertGreaterEqual(carried, 1, ssh.output())
        self.report(tunnel_connections=carried)

    @time_limit(60)
    def test_ssh_L_to_several_nodes_on_loopback_addresses_of_their_own(self):
        """One tunnel a node, each on a loopback address of its own (a client keeps one
        node per address: two tunnels on 127.0.0.1 with two ports would be one node)."""
        self.nat(ssh_only=True)
        tunnels = {}
        for host, local in (('sshnode', '127.0.0.2'), ('sshnode2', '127.0.0.3')):
            tunnels[host] = self.tunnel(['-L', '%s:%d:127.0.0.1:%d' % (local, NODE_PORT,
                                                                      NODE_PORT)], host)
            self.node(host, ['-i', '127.0.0.1'])
        ran = self.run_client('natclient', ['127.0.0.2', '127.0.0.3'], want=2, sleep=0.2)
        self.assertEqual(len(ran), JOBS, self.diagnostics())
        self.assertEqual({(job['result'][0], job['ip_addr']) for job in ran},
                         {('sshnode', '127.0.0.2'), ('sshnode2', '127.0.0.3')},
                         self.diagnostics())
        carried = [self.local_forwards(ssh, NODE_PORT) for ssh in tunnels.values()]
        self.assertTrue(all(carried), self.diagnostics())
        self.report(tunnel_connections=carried)

    @time_limit(60)
    def test_shared_cluster_through_ssh_L_to_the_scheduler(self):
        """README: ``ssh -L 51349:localhost:51349 sched-host``, then
        ``scheduler_node='127.0.0.1'``; only ssh reaches the scheduler's host."""
        self.nat(ssh_only=True)
        node_ip = self.lab.ip('sshnode')
        ssh = self.tunnel(['-L', '%d:127.0.0.1:%d' % (SCHEDULER_PORT, SCHEDULER_PORT)])
        self.node('sshnode', ['-i', node_ip])
        self.scheduler(node_ip)
        self.assert_ran_on(self.run_client('natclient', [node_ip], shared='127.0.0.1'),
                           'sshnode', node_ip)
        carried = self.local_forwards(ssh, SCHEDULER_PORT)
        self.assertGreaterEqual(carried, 1, ssh.output())
        self.report(tunnel_connections=carried)

    @time_limit(60)
    def test_seed_shared_cluster_ssh_R_recipe(self):
        """Seed 002 §1.11 for a SharedJobCluster: ``ssh -R 2345:...`` to the scheduler's
        host, ``port=2345, ext_ip_addr=``; the program only dials the scheduler, so
        both options are ignored with a warning saying why, and the jobs run."""
        self.nat()
        node_ip = self.lab.ip('sshnode')
        ssh = self.tunnel(['-R', '2345:127.0.0.1:2345'])
        self.node('sshnode', ['-i', node_ip])
        self.scheduler(node_ip)
        self.assert_ran_on(self.run_client('natclient', [node_ip], shared=node_ip, port=2345,
                                           ext_ip_addr='127.0.0.1'), 'sshnode', node_ip)
        warnings = self.client.stderr()
        for option in ('port', 'ext_ip_addr'):
            self.assertIn('SharedJobCluster: %s is not used' % option, warnings)
        self.report(tunnel_connections=self.remote_forwards(ssh))


if __name__ == '__main__':
    unittest.main()
