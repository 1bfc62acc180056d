"""dispynetrelay.py in a routed lab: nodes of another network found through a relay.

Two LANs joined by a router that forwards unicast and no broadcast (tests/netns.py
``RoutedLab``)::

    LAN 0:  client (the program, or a dispyscheduler), node1
    LAN 1:  relay (python dispynetrelay.py), node2, node3, node4

The client names node1, the relay host and LAN 1's pattern in ``nodes``, as seed 002
says.  Default ports everywhere; broadcast only inside the lab.  Each job returns the
lab host name of its node (``DISPY_TEST_NODE``); the client prints how long it took
until every node was set up.
"""

import json
import os
import re
import signal
import sys
import unittest

try:
    from tests import support
    from tests.test_netns import NODE_WATCH, LabTestCase, clean_env, time_limit
except ImportError:                         # run from inside tests/
    import support
    from test_netns import NODE_WATCH, LabTestCase, clean_env, time_limit

NODE_SCRIPT = support.NODE_SCRIPT
RELAY_SCRIPT = os.path.join(support.ROOT, 'dispynetrelay.py')
SCHEDULER_SCRIPT = os.path.join(support.ROOT, 'dispyscheduler.py')
SECRET = 'lab secret'

# argv[1]: JSON {nodes, want (node count to wait for), count, late (print 'waiting'
# after want nodes and wait for want + 1), shared (scheduler address)}
CLIENT = r'''
import json, sys, time
import dispy
''' + NODE_WATCH + r'''
def compute(n):
    import os
    return os.environ.get('DISPY_TEST_NODE', '?')

cfg = json.loads(sys.argv[1])
status = watch_nodes
start = time.monotonic()
if cfg.get('shared'):
    cluster = dispy.SharedJobCluster(compute, nodes=cfg['nodes'], cluster_status=status,
                                     scheduler_node=cfg['shared'], secret=cfg['secret'],
                                     recover_file=False)
else:
    cluster = dispy.JobCluster(compute, nodes=cfg['nodes'], cluster_status=status,
                               secret=cfg['secret'], recover_file=False)
with cond:
    cond.wait_for(lambda: len(nodes) >= cfg['want'], cfg.get('wait', 40))
    print('found %d node(s) in %.2f s' % (len(nodes), time.monotonic() - start), flush=True)
    if cfg.get('late'):
        print('waiting for a late node', flush=True)
        ok = cond.wait_for(lambda: len(nodes) > cfg['want'], 40)
        print('late node %s' % ('found' if ok else 'missing'), flush=True)
jobs = [cluster.submit(i) for i in range(cfg['count'])]
print('RAN ' + json.dumps(sorted(set(job(timeout=60) or '?' for job in jobs))), flush=True)
cluster.close(timeout=30, terminate=True)
'''


class RelayTest(LabTestCase):
    LANS = (('client', 'node1'), ('relay', 'node2', 'node3', 'node4'))

    def setUp(self):
        super().setUp()
        self.script = os.path.join(self.tempdir('client'), 'client.py')
        with open(self.script, 'w') as f:
            f.write(CLIENT)
        self.far = re.sub(r'\.\d+$', '.*', self.lab.ip('node2'))    # LAN 1's pattern

    def node(self, host):
        folder = self.tempdir(host)
        node = self.spawn(host, [sys.executable, NODE_SCRIPT, '--daemon', '-d', '-c', '1',
                                 '-s', SECRET, '--dest_path_prefix',
                                 os.path.join(folder, 'dest')],
                          cwd=folder, env=clean_env(DISPY_TEST_NODE=host, TMPDIR=folder))
        node.wait_for(support.READY_RE.pattern, timeout=30)
        return node

    def relay(self, host='relay', secret=SECRET, args=()):
        relay = self.spawn(host, [sys.executable, RELAY_SCRIPT, '-d', '-s', secret] + list(args),
                           env=clean_env())
        relay.wait_for('dispynetrelay relaying at', timeout=20)
        return relay

    def client(self, want, count=16, late=False, shared=None, wait=40):
        cfg = {'nodes': [self.lab.ip('node1'), self.lab.ip('relay'), self.far], 'want': want,
               'count': count, 'late': late, 'secret': SECRET, 'wait': wait}
        if shared:
            cfg['shared'] = shared
        return self.spawn('client', [sys.executable, self.script, json.dumps(cfg)],
                          env=clean_env(), cwd=os.path.dirname(self.script))

    def ran_on(self, client):
        client.wait_for(r'RAN \[', timeout=120)
        return set(json.loads(re.search(r'^RAN (.*)$', client.stdout(), re.M).group(1)))

    def check(self, client, hosts):
        try:
            ran = self.ran_on(client)
        except RuntimeError:
            self.fail('the client did not finish\n' + self.diagnostics())
        self.assertEqual(ran, set(hosts), self.diagnostics())
        found = re.search(r'found \d+ node\(s\) in ([\d.]+) s', client.stdout())
        if found:
            print('RELAY-TIMING %s discovery_s=%s' % (self.id().rsplit('.', 1)[-1],
                                                      found.group(1)))

    @time_limit(150)
    def test_relay_on_its_own_host_finds_the_far_nodes(self):
        for host in ('node1', 'node2', 'node3', 'node4'):
            self.node(host)
        self.relay()
        self.check(self.client(4), ['node1', 'node2', 'node3', 'node4'])

    @time_limit(150)
    def test_without_relay_only_listed_nodes(self):
        for host in ('node1', 'node2', 'node3'):
            self.node(host)
        self.check(self.client(1, count=8), ['node1'])

    @time_limit(150)
    def test_node_started_later_is_found(self):
        for host in ('node1', 'node2', 'node3'):
            self.node(host)
        self.relay()
        client = self.client(3, late=True)
        client.wait_for('waiting for a late node', timeout=60)
        self.node('node4')
        client.wait_for('late node found', timeout=60)
        self.check(client, ['node1', 'node2', 'node3', 'node4'])

    @time_limit(150)
    def test_relay_with_wrong_secret_relays_nothing(self):
        for host in ('node1', 'node2'):
            self.node(host)
        relay = self.relay(secret='not the secret')
        self.check(self.client(2, count=8, wait=8), ['node1'])
        self.assertNotIn('relaying discovery', relay.output())

    @time_limit(150)
    def test_relay_beside_a_node(self):
        self.beside_a_node(relay_first=False)

    @time_limit(150)
    def test_relay_started_before_the_node_beside_it(self):
        self.beside_a_node(relay_first=True)

    def beside_a_node(self, relay_first):
        for host in ('node1', 'node3', 'node4'):
            self.node(host)
        relay = self.relay(host='node2') if relay_first else None
        self.node('node2')
        if not relay_first:
            relay = self.relay(host='node2')
            self.assertIn('beside a dispynode', relay.stdout())
        cfg_nodes = [self.lab.ip('node1'), self.lab.ip('node2'), self.far]
        cfg = {'nodes': cfg_nodes, 'want': 4, 'count': 16, 'secret': SECRET}
        client = self.spawn('client', [sys.executable, self.script, json.dumps(cfg)],
                            env=clean_env(), cwd=os.path.dirname(self.script))
        self.check(client, ['node1', 'node2', 'node3', 'node4'])

    @time_limit(150)
    def test_scheduler_node_option_and_sigterm(self):
        """A relay told --scheduler_node searches its network for that scheduler, which
        does not name the relay host; SIGTERM stops the relay."""
        for host in ('node1', 'node2', 'node3'):
            self.node(host)
        folder = self.tempdir('sched')
        sched = self.spawn('client', [sys.executable, SCHEDULER_SCRIPT, '--daemon', '-d',
                                      '--node_secret', SECRET, '--cluster_secret', SECRET,
                                      '-n', self.lab.ip('node1'), '-n', self.far,
                                      '--dest_path_prefix', folder], env=clean_env())
        sched.wait_for(r'dispyscheduler serving at', timeout=30, stream='stderr')
        relay = self.relay(args=['--scheduler_node', self.lab.ip('client')])
        client = self.client(3, count=12, shared='127.0.0.1')
        self.check(client, ['node1', 'node2', 'node3'])
        os.kill(relay.pid, signal.SIGTERM)
        self.assertEqual(relay.wait(15), 0, relay.output())

    @time_limit(180)
    def test_through_a_dispyscheduler(self):
        for host in ('node1', 'node2', 'node3', 'node4'):
            self.node(host)
        self.relay()
        folder = self.tempdir('sched')
        sched = self.spawn('client', [sys.executable, SCHEDULER_SCRIPT, '--daemon', '-d',
                                      '--node_secret', SECRET, '--cluster_secret', SECRET,
                                      '-n', self.lab.ip('node1'), '-n', self.lab.ip('relay'),
                                      '-n', self.far, '--dest_path_prefix', folder],
                           env=clean_env())
        sched.wait_for(r'dispyscheduler serving at', timeout=30, stream='stderr')
        self.check(self.client(4, shared='127.0.0.1'), ['node1', 'node2', 'node3', 'node4'])


if __name__ == '__main__':
    unittest.main()
