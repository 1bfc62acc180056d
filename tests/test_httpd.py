"""The web monitor (dispyhttpd.py, ``import dispy.httpd``) over real HTTP, on loopback.

Two ``dispynode.py`` processes (127.0.0.2 and 127.0.0.3), a cluster in this process
and a ``DispyHTTPServer`` on 127.0.0.1; requests are made with ``http.client`` as a
browser or a script would.  Checked: what the JSON endpoints show (nodes, counts that
grow, running jobs with their arguments as text), what the actions do to the cluster
(cancel, CPUs, deallocate / allocate / close), the safety rules (token, Origin, Host,
POST only), bad requests (4xx, the server goes on), idle connections and TLS, several
clusters on one server, ``dispyscheduler.py --httpd``, and the progress line.
Browser tests are in test_browser.py; other hosts' access in test_httpd_netns.py.
"""

import http.client
import io
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
import dispyhttpd
from dispy import DispyJob

NODE_IPS = ('127.0.0.2', '127.0.0.3')
SERVER_IP = '127.0.0.1'
SCHED_IP = '127.0.0.1'


def nap(seconds, label=''):
    import time
    time.sleep(seconds)
    return seconds


class HTTP:
    """Requests to one monitor as http.client makes them (one connection each)."""

    def __init__(self, port, tls=False, host=SERVER_IP, source=None):
        self.port, self.tls, self.host = port, tls, host
        self.source = (source, 0) if source else None

    def connection(self, timeout=10):
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=ctx, source_address=self.source)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout,
                                          source_address=self.source)

    def request(self, method, path, body=None, headers=None):
        conn = self.connection()
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = dict({'Content-Type': 'application/json'}, **(headers or {}))
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method, path, body=None, headers=None):
        status, _headers, data = self.request(method, path, body, headers)
        return status, json.loads(data.decode()) if data else None

    def get(self, path):
        status, data = self.json('GET', path)
        if status != 200:
            raise AssertionError('GET %s: %s %s' % (path, status, data))
        return data


class MonitorTestCase(unittest.TestCase):
    """Two nodes for the class; ``cluster()`` and ``monitor()`` clean up after each test."""

    timeout = 120
    node_cpus = 2

    @classmethod
    def setUpClass(cls):
        cls.port = None
        for _ in range(20):
            cls.port = support.free_port(NODE_IPS[0])
            if all(support.tcp_free(ip, cls.port) for ip in NODE_IPS):
                break
        cls.nodes = []
        try:
            for ip in NODE_IPS:
                cls.nodes.append(support.NodeProcess(ip, port=cls.port,
                                                     cpus=cls.node_cpus).start())
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for node in getattr(cls, 'nodes', []):
            node.stop()

    def cluster(self, computation=nap, **kwargs):
        kwargs.setdefault('nodes', list(NODE_IPS))
        cluster = dispy.JobCluster(computation, host=SERVER_IP, port=0, node_port=self.port,
                                   recover_file=False, **kwargs)
        self.addCleanup(support.close_now, cluster)
        return cluster

    def monitor(self, cluster, **kwargs):
        kwargs.setdefault('host', SERVER_IP)
        kwargs.setdefault('port', 0)
        kwargs.setdefault('poll_sec', 1)
        server = dispy.httpd.DispyHTTPServer(cluster, **kwargs)
        self.addCleanup(server.shutdown, False)
        self.http = HTTP(server.port, tls=bool(kwargs.get('certfile')))
        return server

    def post(self, server, path, body, headers=None):
        headers = dict({dispyhttpd.TOKEN_HEADER: server.token}, **(headers or {}))
        return self.http.json('POST', path, body, headers)

    def cluster_status(self, index=0):
        return self.http.get('/api/status')['clusters'][index]

    def wait_nodes(self, count=2):
        self.assertTrue(support.wait_until(
            lambda: len([n for n in self.cluster_status()['nodes'] if n['state'] == 'ready'])
            >= count, 20), 'the monitor never listed %d nodes' % count)

    def running(self, job, timeout=20):
        self.assertTrue(support.wait_until(lambda: job.status == DispyJob.Running, timeout),
                        'job never started: %s' % job.status)


# ================================================================================
# What the endpoints show
# ================================================================================

class StatusTest(MonitorTestCase):

    def test_import_dispy_httpd_is_the_module_beside_dispy(self):
        import dispy.httpd
        self.assertIs(dispy.httpd, dispyhttpd)
        self.assertIs(sys.modules['dispy.httpd'], dispyhttpd)
        with self.assertRaises(ImportError):
            import dispy.nosuchmodule    # noqa: F401

    def test_nodes_and_counts_that_grow(self):
        cluster = self.cluster()
        server = self.monitor(cluster)
        self.wait_nodes()
        jobs = [cluster.submit(0.3) for _ in range(24)]
        first = self.cluster_status()
        self.assertTrue(support.wait_until(lambda: self.cluster_status()['done']
                                           > first['done'], 20), 'done never grew')
        self.assertTrue(cluster.wait(60))
        final = self.cluster_status()
        self.assertEqual((final['submitted'], final['done'], final['running'],
                          final['failed'], final['pending']), (24, 24, 0, 0, 0))
        nodes = {n['ip_addr']: n for n in final['nodes']}
        self.assertEqual(set(nodes), set(NODE_IPS))
        self.assertEqual(sum(n['done'] for n in nodes.values()), 24)
        for job in jobs:
            self.assertEqual(job.status, DispyJob.Finished)
        for ip, node in nodes.items():
            self.assertEqual(node['cpus'], self.node_cpus)
            self.assertEqual(node['done'], sum(1 for j in jobs if j.ip_addr == ip))
        history = final['history']
        self.assertTrue(history and history[-1][1] == 24, history)
        self.assertEqual(history, sorted(history))
        later = self.http.get('/api/status?since=%s' % history[-1][0])['clusters'][0]
        self.assertEqual(later['history'][0], history[-1])     # from since on, no older
        self.assertLessEqual(len(later['history']), 3)
        self.assertEqual(server.poll_sec, 1)

    def test_node_page_shows_running_jobs_with_arguments_as_text(self):
        cluster = self.cluster()
        server = self.monitor(cluster)
        job = cluster.submit(60, label='<script>alert(1)</script>')
        job.id = '<b>job one</b>'
        self.running(job)
        page = self.http.get('/api/node?ip_addr=%s' % job.ip_addr)
        self.assertEqual(page['ip_addr'], job.ip_addr)
        jobs = page['clusters'][0]['jobs']
        self.assertEqual(len(jobs), 1)
        self.assertEqual(jobs[0]['key'], str(job._key))
        self.assertEqual(jobs[0]['id'], '<b>job one</b>')
        self.assertEqual(jobs[0]['args'], '(60,)')
        self.assertIn("'<script>alert(1)</script>'", jobs[0]['kwargs'])
        self.assertAlmostEqual(jobs[0]['start_time'], job.start_time, places=3)
        self.assertEqual(page['clusters'][0]['name'], cluster.name)
        self.assertEqual(page['clusters'][0]['running'], 1)
        status, body = self.post(server, '/api/settings', {'show_job_args': False})
        self.assertEqual((status, body), (200, {'show_job_args': False}))
        jobs = self.http.get('/api/node?ip_addr=%s' % job.ip_addr)['clusters'][0]['jobs']
        self.assertNotIn('args', jobs[0])
        status, body = self.http.json('GET', '/api/node?ip_addr=10.9.9.9')
        self.assertEqual(status, 404)
        cluster.cancel(job)

    def test_monitor_made_after_jobs_ran_shows_them(self):
        cluster = self.cluster()
        for _ in range(6):
            cluster.submit(0.05)
        self.assertTrue(cluster.wait(30))
        blocker = cluster.submit(60)
        self.running(blocker)
        self.monitor(cluster)
        status = self.cluster_status()
        self.assertEqual((status['submitted'], status['done'], status['running'],
                          status['pending']), (7, 6, 1, 0))
        self.assertEqual(sum(n['done'] for n in status['nodes']), 6)
        cluster.cancel(blocker)

    def test_users_cluster_status_callback_keeps_being_called(self):
        events = []
        cluster = self.cluster(cluster_status=lambda status, node, job: events.append(status))
        self.monitor(cluster)
        job = cluster.submit(0.05)
        self.assertTrue(cluster.wait(30))
        self.assertEqual(job.status, DispyJob.Finished)
        for status in (DispyJob.Created, DispyJob.Finished):
            self.assertIn(status, events)
        self.assertEqual(self.cluster_status()['done'], 1)

    def test_several_clusters_on_one_server(self):
        first, second = self.cluster(), self.cluster()
        server = self.monitor(first)
        server.add_cluster(second)
        server.add_cluster(second)          # once only
        second.submit(0.05)
        self.assertTrue(second.wait(30))
        clusters = self.http.get('/api/status')['clusters']
        self.assertEqual([c['id'] for c in clusters], [1, 2])
        self.assertEqual([c['done'] for c in clusters], [0, 1])
        server.del_cluster(first)
        self.assertEqual([c['id'] for c in self.http.get('/api/status')['clusters']], [2])
        self.assertIsNone(first.monitor)    # its events go nowhere now
        self.assertIsNotNone(second.monitor)
        first.close()
        second.close()
        self.assertTrue(self.cluster_status()['closed'])


# ================================================================================
# What the actions do
# ================================================================================

class ActionTest(MonitorTestCase):

    def test_cancel_needs_the_token_and_this_servers_origin(self):
        cluster = self.cluster()
        server = self.monitor(cluster)
        job = cluster.submit(60)
        self.running(job)
        body = {'cluster': 1, 'jobs': [str(job._key)]}
        status, reply = self.http.json('POST', '/api/cancel', body)
        self.assertEqual(status, 403, reply)
        status, reply = self.post(server, '/api/cancel', body, {'X-Dispy-Token': 'wrong'})
        self.assertEqual(status, 403, reply)
        status, reply = self.post(server, '/api/cancel', body,
                                  {'Origin': 'http://evil.example'})
        self.assertEqual(status, 403, reply)
        status, reply = self.post(server, '/api/cancel', body, {'Sec-Fetch-Site': 'cross-site'})
        self.assertEqual(status, 403, reply)
        status, reply = self.http.json('GET', '/api/cancel?cluster=1&jobs=%s' % job._key)
        self.assertEqual(status, 405, reply)
        self.assertEqual(job.status, DispyJob.Running)      # none of them did anything
        origin = 'http://%s:%s' % (SERVER_IP, server.port)
        status, reply = self.post(server, '/api/cancel', body, {'Origin': origin})
        self.assertEqual((status, reply), (200, {'cancelled': [str(job._key)], 'failed': []}))
        job(timeout=20)
        self.assertEqual(job.status, DispyJob.Cancelled)
        figures = self.cluster_status()
        self.assertEqual((figures['done'], figures['failed']), (1, 0))  # cancelled: not failed
        status, reply = self.post(server, '/api/cancel', body)
        self.assertEqual(reply, {'cancelled': [], 'failed': [str(job._key)]})

    def test_node_cpus_deallocate_allocate_close(self):
        cluster = self.cluster()
        server = self.monitor(cluster)
        self.wait_nodes()
        first, other = NODE_IPS

        def op(name, **extra):
            status, reply = self.post(server, '/api/node',
                                      dict({'cluster': 1, 'ip_addr': first, 'op': name}, **extra))
            self.assertEqual(status, 200, reply)
            return reply['result']

        def node():
            return {n['ip_addr']: n for n in self.cluster_status()['nodes']}[first]

        self.assertEqual(op('set_cpus', cpus=1), 1)
        self.assertEqual(node()['cpus'], 1)
        self.assertEqual(op('deallocate'), 0)
        self.assertEqual(node()['cpus'], 0)
        jobs = [cluster.submit(0.05) for _ in range(8)]
        self.assertTrue(cluster.wait(30))
        self.assertEqual({j.ip_addr for j in jobs}, {other})    # none went to the first
        self.assertEqual(op('allocate'), self.node_cpus)        # its CPUs back
        self.assertEqual(node()['cpus'], self.node_cpus)
        self.assertEqual(op('close'), 0)
        self.assertTrue(support.wait_until(lambda: node()['state'] == 'closed', 20))
        for bad, code in (({'op': 'explode'}, 400), ({'op': 'set_cpus', 'cpus': 'x'}, 400),
                          ({'op': 'set_cpus', 'cpus': True}, 400),
                          ({'op': 'close', 'ip_addr': '10.1.1.1'}, 404),
                          ({'op': 'close', 'cluster': 7}, 404),
                          ({'op': 'close', 'cluster': '1'}, 404)):
            body = dict({'cluster': 1, 'ip_addr': first}, **bad)
            status, reply = self.post(server, '/api/node', body)
            self.assertEqual(status, code, (bad, reply))
            self.assertIn('error', reply)


# ================================================================================
# Safety and robustness of the server itself
# ================================================================================

class ServerTest(MonitorTestCase):

    def test_page_files_and_their_headers(self):
        server = self.monitor(self.cluster())
        status, headers, body = self.http.request('GET', '/')
        self.assertEqual(status, 200)
        self.assertIn(b'<meta name="dispy-token" content="%s">' % server.token.encode(), body)
        self.assertIn("script-src 'self'", headers['Content-Security-Policy'])
        self.assertEqual(headers['X-Content-Type-Options'], 'nosniff')
        self.assertEqual(headers['X-Frame-Options'], 'DENY')
        for path, ctype in (('/monitor.js', 'text/javascript'), ('/monitor.css', 'text/css')):
            status, headers, body = self.http.request('GET', path)
            self.assertEqual(status, 200)
            self.assertTrue(headers['Content-Type'].startswith(ctype))
            self.assertGreater(len(body), 500)
        status, headers, body = self.http.request('HEAD', '/')
        self.assertEqual((status, body), (200, b''))

    def test_document_root_replaces_the_built_in_page(self):
        folder = support.temp_folder(self)
        with open(os.path.join(folder, 'monitor.html'), 'w') as f:
            f.write('<html><meta name="dispy-token" content="{{TOKEN}}">mine</html>')
        server = self.monitor(self.cluster(), DocumentRoot=folder)
        body = self.http.request('GET', '/')[2]
        self.assertEqual(body, ('<html><meta name="dispy-token" content="%s">mine</html>'
                                % server.token).encode())
        self.assertGreater(len(self.http.request('GET', '/monitor.js')[2]), 500)   # built in

    def test_host_header_must_name_this_machine(self):
        server = self.monitor(self.cluster(), allowed_hosts=['monitor.lab.example'])
        for host, expected in (('evil.example', 421), ('evil.example:%d' % server.port, 421),
                               ('127.0.0.1:%d' % server.port, 200), ('localhost', 200),
                               ('[::1]:%d' % server.port, 200), ('monitor.lab.example', 200),
                               (socket.gethostname(), 200), ('1.2.3.4', 421),
                               ('a:b:c', 421), ('[::1', 421)):
            status, _headers, body = self.http.request(
                'GET', '/api/status?token=' + server.token, headers={'Host': host})
            self.assertEqual(status, expected, (host, body[:200]))

    def test_bad_requests_get_4xx_and_the_server_goes_on(self):
        server = self.monitor(self.cluster())
        token = {dispyhttpd.TOKEN_HEADER: server.token}
        cases = [
            (('GET', '/no/such/page'), 404),
            (('PUT', '/api/status'), 405),
            (('DELETE', '/'), 405),
            (('GET', '/api/status?since=soon'), 400),
            (('POST', '/api/settings', b'{"show_job_args": ', dict(token, **{
                'Content-Type': 'application/json'})), 400),
            (('POST', '/api/settings', b'[1, 2]', dict(token, **{
                'Content-Type': 'application/json'})), 400),
            (('POST', '/api/settings', b'{}', dict(token, **{'Content-Type': 'text/plain'})),
             415),
            (('POST', '/api/settings', b'{"show_job_args": "yes"}', dict(token, **{
                'Content-Type': 'application/json'})), 400),
            (('POST', '/api/nothing', b'{}', dict(token, **{
                'Content-Type': 'application/json'})), 404),
            (('POST', '/api/status', b'{}', dict(token, **{
                'Content-Type': 'application/json'})), 405),
        ]
        for args, expected in cases:
            status, headers, body = self.http.request(*args)
            self.assertEqual(status, expected, (args, body[:200]))
            self.assertNotIn(b'Traceback', body)
        raw = [b'GARBAGE\r\n\r\n', b'GET / HTTP/9.9\r\n\r\n',
               b'GET /' + b'x' * 70000 + b' HTTP/1.1\r\n\r\n',
               b'POST /api/settings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n'
               b'X-Dispy-Token: ' + server.token.encode() + b'\r\n\r\n',
               b'POST /api/settings HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n',
               b'GET / HTTP/1.1\r\n' + b'X-Long: ' + b'y' * 70000 + b'\r\n\r\n']
        for data in raw:
            with socket.create_connection((SERVER_IP, server.port), timeout=10) as sock:
                sock.sendall(data)
                reply = sock.recv(4096)
            self.assertRegex(reply, rb'^HTTP/1\.[01] (4\d\d|505) ', data[:60])
            self.assertNotIn(b'Traceback', reply)
        self.assertEqual(self.http.get('/api/status')['clusters'][0]['id'], 1)

    def test_idle_connections_never_block_others(self):
        server = self.monitor(self.cluster())
        idle = []
        try:
            for _ in range(dispyhttpd.MAX_PER_ADDRESS - 2):    # open, silent: each holds
                # only its own thread
                idle.append(socket.create_connection((SERVER_IP, server.port), timeout=10))
            half = socket.create_connection((SERVER_IP, server.port), timeout=10)
            idle.append(half)
            half.sendall(b'GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n')   # never ends
            keep_alive = self.http.connection(timeout=5)
            for _ in range(5):      # one keep-alive connection, several requests
                keep_alive.request('GET', '/api/status')
                response = keep_alive.getresponse()
                self.assertEqual(response.status, 200)
                response.read()
            keep_alive.close()
        finally:
            for sock in idle:
                sock.close()

    def test_one_address_cannot_take_every_connection(self):
        server = self.monitor(self.cluster())
        hogs = []
        try:
            for _ in range(dispyhttpd.MAX_PER_ADDRESS):
                hogs.append(socket.create_connection((SERVER_IP, server.port), timeout=10))
            self.assertTrue(support.wait_until(
                lambda: len(server.server.admission) >= dispyhttpd.MAX_PER_ADDRESS, 10))
            with socket.create_connection((SERVER_IP, server.port), timeout=10) as one_more:
                self.assertTrue(one_more.recv(100).startswith(b'HTTP/1.1 503 '))
            # a browser from another address is served meanwhile
            other = HTTP(server.port, source='127.0.0.5')
            self.assertEqual(other.json('GET', '/api/status')[0], 200)
        finally:
            for sock in hogs:
                sock.close()

    def test_a_trickling_request_is_cut_off(self):
        self.addCleanup(setattr, dispyhttpd, 'REQUEST_TIMEOUT', dispyhttpd.REQUEST_TIMEOUT)
        dispyhttpd.REQUEST_TIMEOUT = 1.0
        server = self.monitor(self.cluster())
        with socket.create_connection((SERVER_IP, server.port), timeout=10) as slow:
            slow.sendall(b'GET /api/status HTTP/1.1\r\n')
            started, reply = time.monotonic(), None
            for _ in range(100):        # a header line every 0.1 s, never the end
                try:
                    slow.sendall(b'X-Slow: 1\r\n')
                    reply = slow.recv(100, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    time.sleep(0.1)     # the pace of the trickle, not a wait for a result
                    continue
                except OSError:
                    reply = b''
                break
            self.assertEqual(reply, b'', 'the connection was not cut')
            self.assertLess(time.monotonic() - started, 8)

    def test_a_refused_requests_body_is_never_read_as_a_request(self):
        server = self.monitor(self.cluster())
        smuggled = (b'GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
        cases = [
            b'PUT / HTTP/1.1\r\nHost: evil.example\r\nContent-Length: %d\r\n\r\n'
            % len(smuggled) + smuggled,
            b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n'
            % len(smuggled) + smuggled,
            b'POST /api/settings HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked'
            b'\r\n\r\n%x\r\n' % len(smuggled) + smuggled + b'\r\n0\r\n\r\n',
            b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n' + smuggled,
            b'GET http://evil.example/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n' + smuggled,
            b'GET / HTTP/1.1\r\n\r\n' + smuggled,
            b'POST /api/settings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xc2\xb2'
            b'\r\n\r\n' + smuggled,
        ]
        for data in cases:
            with socket.create_connection((SERVER_IP, server.port), timeout=10) as sock:
                sock.sendall(data)
                reply = b''
                for _ in range(50):     # until the server closes the connection
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            self.assertRegex(reply, rb'^HTTP/1\.1 4\d\d ', data[:80])
            answers = re.findall(rb'(?m)^HTTP/1\.\d \d\d\d ', reply)
            self.assertEqual(len(answers), 1, (data[:80], reply[:300]))
            self.assertIn(b'Connection: close', reply)
        self.assertEqual(self.http.get('/api/status')['clusters'][0]['id'], 1)

    def test_tls(self):
        folder = support.temp_folder(self)
        cert = support.self_signed_cert(folder)
        server = self.monitor(self.cluster(), certfile=cert)
        with socket.create_connection((SERVER_IP, server.port), timeout=10) as silent:
            status, headers, body = self.http.request('GET', '/')   # while one stalls
            self.assertEqual(status, 200)
            self.assertIn(b'dispy-token', body)
            with socket.create_connection((SERVER_IP, server.port), timeout=10) as plain:
                plain.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n')
                try:
                    self.assertNotIn(b'dispy-token', plain.recv(4096))
                except (ConnectionResetError, socket.timeout):
                    pass        # refused: not TLS
            self.assertEqual(self.http.get('/api/status')['clusters'][0]['id'], 1)
            silent.sendall(b'\x16\x03\x01')        # a stalled handshake ends in time
        self.assertTrue(server.urls()[0].startswith('https://'))

    def test_require_token_and_hidden_arguments_stay_hidden(self):
        server = self.monitor(self.cluster(), require_token=True, show_job_args=False)
        status, reply = self.http.json('GET', '/api/status')
        self.assertEqual(status, 403, reply)        # even on this machine
        status, headers, body = self.http.request('GET', '/')
        self.assertEqual(status, 403)
        self.assertNotIn(server.token.encode(), body)
        status, reply = self.http.json('GET', '/api/status', headers={
            dispyhttpd.TOKEN_HEADER: server.token})
        self.assertEqual((status, reply['show_job_args']), (200, False))
        status, reply = self.post(server, '/api/settings', {'show_job_args': True})
        self.assertEqual(status, 403, reply)
        self.assertIn('show_job_args=False', reply['error'])

    def test_shutdown_ends_keep_alive_connections(self):
        server = self.monitor(self.cluster())
        conn = self.http.connection(timeout=10)
        conn.request('GET', '/api/status')
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        response.read()
        server.shutdown(wait=False)
        with self.assertRaises((OSError, http.client.HTTPException)):
            conn.request('POST', '/api/settings', body=b'{"show_job_args": false}', headers={
                'Content-Type': 'application/json', dispyhttpd.TOKEN_HEADER: server.token})
            conn.getresponse().read()
        conn.close()
        self.assertTrue(server.show_job_args)       # nothing was served after shutdown

    def test_shutdown_frees_the_port(self):
        server = self.monitor(self.cluster())
        started = time.monotonic()
        server.shutdown(wait=True)          # nobody polls: nothing to wait for
        self.assertLess(time.monotonic() - started, 5)
        with self.assertRaises(OSError):
            socket.create_connection((SERVER_IP, server.port), timeout=5).close()

    def test_shutdown_wait_serves_a_polling_browser_once_more(self):
        server = self.monitor(self.cluster())
        stop = threading.Event()
        polls = []

        def browser():
            while not stop.is_set() and len(polls) < 200:
                try:
                    polls.append(self.http.json('GET', '/api/status')[0])
                except OSError:
                    return
                stop.wait(0.3)
        thread = threading.Thread(target=browser, daemon=True)
        thread.start()
        self.assertTrue(support.wait_until(lambda: len(polls) >= 2, 10))
        before = len(polls)
        server.shutdown(wait=True)
        stop.set()
        thread.join(10)
        self.assertGreater(len(polls), before)
        self.assertTrue(all(code == 200 for code in polls))


class _Job:
    """What ClusterMonitor reads of a job."""

    def __init__(self, key, ip_addr=None, status=DispyJob.Created):
        self._key, self.ip_addr, self.status = key, ip_addr, status


class _Cluster(dispy.ClusterHooks):
    name = 'fake'

    def __init__(self):
        self.lock = threading.RLock()

    def hooks_lock(self):
        return self.lock


class ClusterMonitorTest(unittest.TestCase):
    """The monitor's bookkeeping from events, as plain logic."""

    def setUp(self):
        self.monitor = dispyhttpd.ClusterMonitor.attach(_Cluster())

    def node(self, ip):
        return {n['ip_addr']: n for n in self.monitor.status()['nodes']}[ip]

    def test_a_job_moved_to_another_node_and_one_whose_start_was_not_seen(self):
        m = self.monitor
        avail = dispy.DispyNodeAvailInfo(12.5, 1 << 30, 1 << 34, 1.5)
        m.node_changed('10.0.0.1', dispy.DispyNode.Initialized, 'a', 2, 4, 'Linux', avail)
        first, second = _Job(1), _Job(2)
        for job in (first, second):
            m.job_submitted(job)
        m.job_dispatched(first, '10.0.0.1')
        first.ip_addr = '10.0.0.1'
        m.job_running(first)
        self.assertEqual(m.running_job(1), first)
        m.job_dispatched(first, '10.0.0.2')     # the node was lost: sent elsewhere
        first.ip_addr = '10.0.0.2'
        m.job_running(first)
        self.assertEqual((self.node('10.0.0.1')['running'], self.node('10.0.0.2')['running']),
                         (0, 1))
        first.status = DispyJob.Finished
        m.job_ended(first, '10.0.0.2')
        second.status = DispyJob.Terminated
        m.job_ended(second, '10.0.0.1')         # started and ended in one report
        status = m.status()
        self.assertEqual((status['submitted'], status['done'], status['running'],
                          status['failed'], status['pending']), (2, 2, 0, 1, 0))
        self.assertEqual((self.node('10.0.0.1')['submitted'], self.node('10.0.0.1')['done']),
                         (2, 1))
        self.assertEqual(self.node('10.0.0.1')['avail'], {'cpu': 12.5, 'memory': 1 << 30,
                                                          'disk': 1 << 34, 'swap': 1.5})
        self.assertIsNone(m.running_job(1))
        m.node_changed('10.0.0.1', dispy.DispyNode.Closed, 'a', 2, 4, 'Linux', None)
        self.assertEqual(self.node('10.0.0.1')['state'], 'closed')

    def test_history_marks_quiet_seconds(self):
        m = self.monitor
        m.done = 5
        m.sample(100.2)
        m.sample(100.9)
        m.done = 9
        m.sample(104.5)
        self.assertEqual([list(p) for p in m.history], [[100, 5], [103, 5], [104, 9]])
        self.assertEqual(m.status(since=104)['history'], [[104, 9]])

    def test_detach_leaves_the_cluster_unwatched(self):
        cluster = self.monitor.cluster
        self.assertIs(cluster.monitor, self.monitor)
        self.assertIs(dispyhttpd.ClusterMonitor.attach(cluster), self.monitor)   # shared
        self.monitor.detach()
        self.assertIs(cluster.monitor, self.monitor)
        self.monitor.detach()
        self.assertIsNone(cluster.monitor)


class AccessRulesTest(unittest.TestCase):
    """The decisions of dispyhttpd.Access, as plain logic."""

    def setUp(self):
        self.access = dispyhttpd.Access('T0ken', allowed_hosts=['Extra.Example.'], port=9999)

    def test_host_header(self):
        allowed = ['localhost', 'LOCALHOST:80', '127.0.0.1', '127.0.0.7:9', '[::1]', '[::1]:8',
                   'extra.example', 'extra.example.:1', socket.gethostname(), None]
        refused = ['evil.example', 'evil.example:9999', '10.255.255.1', '[::1', '[::1]x',
                   'a:b', 'localhost:x', '', '8.8.8.8:53']
        for host in allowed:
            self.assertTrue(self.access.host_allowed(host), host)
        for host in refused:
            self.assertFalse(self.access.host_allowed(host), host)

    def test_token_origin_and_locality(self):
        self.assertTrue(self.access.token_ok('T0ken'))
        for wrong in (None, '', 't0ken', 'T0ken ', 'T0ke'):
            self.assertFalse(self.access.token_ok(wrong), wrong)
        ok = dispyhttpd.Access.origin_ok
        self.assertTrue(ok(None, 'h:1', 'http'))
        self.assertTrue(ok('http://H:1', 'h:1', 'http'))
        self.assertFalse(ok('https://h:1', 'h:1', 'http'))
        self.assertFalse(ok('http://h:1', None, 'http'))
        self.assertFalse(ok('null', 'h:1', 'http'))
        self.assertTrue(self.access.is_local('127.0.0.1'))
        self.assertTrue(self.access.is_local('::ffff:127.0.0.1'))
        self.assertTrue(self.access.is_local('::1'))
        self.assertFalse(self.access.is_local('203.0.113.9'))
        self.assertEqual(self.access.cookie_name, 'dispy_monitor_9999')

    def test_shown_values(self):
        class Broken:
            def __repr__(self):
                raise RuntimeError('no repr')
        self.assertEqual(dispyhttpd.shown((1, '<b>')), "(1, '<b>')")
        self.assertIn('Broken', dispyhttpd.shown(Broken()))     # no exception
        self.assertLess(len(dispyhttpd.shown(list(range(10 ** 6)))), 200)   # cut while walked
        self.assertEqual(len(dispyhttpd.shown('x' * 5000)), dispyhttpd.MAX_SHOWN + 3)


# ================================================================================
# dispyscheduler.py --httpd: every cluster of the scheduler
# ================================================================================

class SchedulerMonitorTest(unittest.TestCase):

    timeout = 150

    @classmethod
    def setUpClass(cls):
        cls.node_port = support.free_port(NODE_IPS[0])
        cls.httpd_port = support.free_port(SCHED_IP)
        cls.procs = []
        try:
            cls.procs.append(support.NodeProcess(NODE_IPS[0], port=cls.node_port,
                                                 cpus=2).start())
            cls.sched = support.SchedulerProcess(
                SCHED_IP, nodes=[NODE_IPS[0]], node_port=cls.node_port,
                args=['--httpd', '--httpd_port', str(cls.httpd_port)]).start()
            cls.procs.append(cls.sched)
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for proc in getattr(cls, 'procs', []):
            proc.stop()

    def test_clusters_of_all_programs_and_a_cancel(self):
        http = HTTP(self.httpd_port, host=SCHED_IP)
        self.assertIn('web monitor: http://127.0.0.1:%d/' % self.httpd_port,
                      self.sched.stderr())
        self.assertEqual(http.get('/api/status')['clusters'], [])
        cluster = dispy.SharedJobCluster(nap, nodes=[NODE_IPS[0]], scheduler_node=SCHED_IP,
                                         scheduler_port=self.sched.port, recover_file=False)
        self.addCleanup(support.close_now, cluster)
        for _ in range(4):
            cluster.submit(0.05)
        self.assertTrue(cluster.wait(30))
        blocker = cluster.submit(60)
        self.assertTrue(support.wait_until(lambda: blocker.status == DispyJob.Running, 20))

        def shown():
            return http.get('/api/status')['clusters']
        self.assertTrue(support.wait_until(lambda: shown() and shown()[0]['running'] == 1, 10))
        status = shown()[0]
        self.assertEqual(status['name'], cluster.name)
        self.assertEqual((status['submitted'], status['done']), (5, 4))
        self.assertEqual([n['ip_addr'] for n in status['nodes']], [NODE_IPS[0]])
        node = http.get('/api/node?ip_addr=%s' % NODE_IPS[0])['clusters'][0]
        self.assertEqual(len(node['jobs']), 1)
        self.assertNotIn('args', node['jobs'][0])       # the scheduler never unpickles them
        token = self.sched.stderr().split('access token ')[1].split(')')[0]
        status, reply = http.json('POST', '/api/cancel', {
            'cluster': shown()[0]['id'], 'jobs': [node['jobs'][0]['key']]},
            {dispyhttpd.TOKEN_HEADER: token})
        self.assertEqual(status, 200, reply)
        self.assertEqual(len(reply['cancelled']), 1)
        blocker(timeout=20)
        self.assertEqual(blocker.status, DispyJob.Cancelled)
        cluster.close()
        self.assertTrue(support.wait_until(lambda: shown() == [], 20))


# ================================================================================
# The progress line
# ================================================================================

class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class ProgressTest(MonitorTestCase):

    def test_plain_lines_elsewhere_and_in_place_on_a_terminal(self):
        stream = io.StringIO()
        line = dispy.ProgressLine(stream, interval=3600)
        line.show(0, 10, 0)
        line.show(5, 10, 1)                 # within the interval: not shown
        line.show(10, 10, 1, final=True)
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith('dispy: 0/10 jobs done (0.0%), 0 failed'), lines)
        self.assertIn('10/10 jobs done (100.0%), 1 failed', lines[1])
        tty = FakeTTY()
        line = dispy.ProgressLine(tty)
        self.assertEqual(line.interval, 0.2)
        line.show(1, 4, 0)
        line.show(4, 4, 0, final=True)
        self.assertEqual(tty.getvalue().count('\r'), 2)
        self.assertIn('\x1b[K', tty.getvalue())
        self.assertTrue(tty.getvalue().endswith('\n'))
        self.assertRegex(dispy.ProgressLine(io.StringIO()).text(0, 9, 0, 1.0), r'ETA \?')

    def test_wait_with_progress(self):
        cluster = self.cluster()
        for _ in range(6):
            cluster.submit(0.1)
        stream = io.StringIO()
        self.assertTrue(cluster.wait(60, progress=dispy.ProgressLine(stream, interval=0.05)))
        self.assertIn('dispy: 6/6 jobs done (100.0%), 0 failed', stream.getvalue())
        blocker = cluster.submit(60)
        stream = io.StringIO()
        self.assertFalse(cluster.wait(0.5, progress=dispy.ProgressLine(stream)))
        self.assertRegex(stream.getvalue(), r'6/7 jobs done .* ETA')
        cluster.cancel(blocker)

    def test_command_line_progress(self):
        folder = support.temp_folder(self)
        program = os.path.join(folder, 'prog.py')
        with open(program, 'w') as f:
            f.write('import sys\nprint("hello", sys.argv[1:])\n')
        proc = subprocess.run([sys.executable, os.path.join(support.ROOT, 'dispy.py'),
                               '--progress', '-n', NODE_IPS[0], '--node_port', str(self.port),
                               '-i', SERVER_IP, '-p', '0', '-a', '1', '-a', '2', program],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn('dispy: 2/2 jobs done (100.0%), 0 failed', proc.stderr)
        self.assertIn('all 2 job(s) succeeded', proc.stdout)


if __name__ == '__main__':
    unittest.main()
