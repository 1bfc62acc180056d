"""The web monitor's access rules (dispyhttpd.py), tested from another host of a lab LAN.

A NetLab LAN (tests/netns.py) of three hosts::

    monitor  10.213.N.1   a program: a JobCluster of node's CPUs, two jobs run, then
                          DispyHTTPServer(cluster, host='', port=8181) (all addresses of
                          its namespace); it prints its port and token and serves
    phone    10.213.N.2   another machine: http.client requests to monitor's lab address
    node     10.213.N.3   python dispynode.py (so /api/status shows one real cluster)

The rules checked (the module docstring of dispyhttpd.py):

* the server's stderr line names the lab address, with the token, for other hosts;
* on the monitor host itself (its lab address, not only loopback) no token is needed;
* from phone without the token: the page is a 403 HTML page that tells about
  ``?token=``, the API a 403 JSON error; a wrong token (query, cookie, header) too;
* ``/?token=T`` answers 303 to ``/`` with the cookie; with it the API and the page
  (which carries the token in a meta tag) are served; ``X-Dispy-Token`` works for GETs;
* a POST needs the ``X-Dispy-Token`` header (the cookie is not enough, nor is being on
  the machine) and, if an Origin is sent, the server's own;
* a Host header that names no name or address of the monitor host gets 421, even with
  the token (DNS rebinding).

Everything skips cleanly (unittest.SkipTest) where network namespaces can't be made.
"""

import json
import os
import sys
import unittest

try:
    from tests import support
    from tests.test_netns import LabTestCase, clean_env, time_limit
except ImportError:                         # run from inside tests/
    import support
    from test_netns import LabTestCase, clean_env, time_limit

PORT = 8181                                 # fixed: the lab's namespaces are private
LIFETIME = 90                               # seconds the monitor program serves at most

# argv[1]: JSON {nodes, port, lifetime}.  Prints 'MONITOR {port, token}' once
# serving; stops at SIGTERM (what the lab sends) or after ``lifetime`` seconds.
MONITOR = r'''
import json, signal, sys, threading
import dispy, dispyhttpd

def compute(n):
    return n * n

cfg = json.loads(sys.argv[1])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *args: stop.set())
cluster = dispy.JobCluster(compute, nodes=cfg['nodes'], recover_file=False)
jobs = [cluster.submit(i) for i in range(2)]
print('RESULTS %s' % json.dumps([job(timeout=40) for job in jobs]), flush=True)
server = dispyhttpd.DispyHTTPServer(cluster, host='', port=cfg['port'], poll_sec=2)
print('MONITOR ' + json.dumps({'port': server.port, 'token': server.token}), flush=True)
stop.wait(cfg['lifetime'])
server.shutdown(wait=False)
cluster.close(timeout=10, terminate=True)
print('MONITOR DONE', flush=True)
'''

# argv[1]: JSON {ip, port, requests: [{method, path, headers, body}]}; each request on a
# connection of its own (http.client: a Host header given is sent as is, and redirects
# are not followed).  Prints one JSON list: status, the headers of interest, the body
# cut to 300 characters, the parsed JSON body, the page's meta token and, for each
# string of the request's ``look_for``, whether the whole body has it.
CLIENT = r'''
import http.client, json, re, sys

WANTED = ('content-type', 'location', 'set-cookie')
cfg = json.loads(sys.argv[1])
results = []
for req in cfg['requests']:
    headers, body = dict(req.get('headers') or {}), req.get('body')
    if body is not None:
        body = json.dumps(body).encode()
        headers.setdefault('Content-Type', 'application/json')
    conn = http.client.HTTPConnection(cfg['ip'], cfg['port'], timeout=10)
    try:
        conn.request(req.get('method', 'GET'), req['path'], body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read().decode('utf-8', 'replace')
    except (OSError, http.client.HTTPException) as exc:
        results.append({'error': repr(exc)})
        continue
    finally:
        conn.close()
    found = {k.lower(): v for k, v in resp.getheaders() if k.lower() in WANTED}
    try:
        parsed = json.loads(data) if 'json' in found.get('content-type', '') else None
    except ValueError:
        parsed = None
    meta = re.search(r'<meta name="dispy-token" content="([^"]*)">', data)
    results.append({'status': resp.status, 'headers': found, 'body': data[:300],
                    'json': parsed, 'meta_token': meta.group(1) if meta else None,
                    'has': {text: text in data for text in req.get('look_for', ())}})
print(json.dumps(results), flush=True)
'''


def get(path, **headers):
    return {'method': 'GET', 'path': path, 'headers': headers}


def post(path, body, **headers):
    return {'method': 'POST', 'path': path, 'body': body, 'headers': headers}


def header_names(**headers):
    """Keyword arguments to HTTP header names: x_dispy_token -> X-Dispy-Token."""
    return {'-'.join(part.capitalize() for part in name.split('_')): value
            for name, value in headers.items()}


class MonitorAccessTest(LabTestCase):
    HOSTS = ('monitor', 'phone', 'node')

    def setUp(self):
        super().setUp()
        self.start_node()
        self.monitor, info = self.start_monitor()
        self.token = info['token']
        self.base = 'http://%s:%d' % (self.lab.ip('monitor'), PORT)
        self.cookie = 'dispy_monitor_%d=%s' % (PORT, self.token)

    # -- the lab's programs -------------------------------------------------------------
    def start_node(self):
        folder = self.tempdir('node')
        node = self.spawn('node', [sys.executable, support.NODE_SCRIPT, '--daemon', '-d',
                                   '-c', '1', '--dest_path_prefix',
                                   os.path.join(folder, 'dest')],
                          cwd=folder, env=clean_env(TMPDIR=folder))
        node.wait_for(support.READY_RE.pattern, timeout=30)

    def start_monitor(self):
        folder = self.tempdir('monitor')
        script = os.path.join(folder, 'monitor.py')
        with open(script, 'w') as f:
            f.write(MONITOR)
        cfg = {'nodes': [self.lab.ip('node')], 'port': PORT, 'lifetime': LIFETIME}
        proc = self.spawn('monitor', [sys.executable, script, json.dumps(cfg)],
                          cwd=folder, env=clean_env(TMPDIR=folder))
        try:
            match = proc.wait_for(r'MONITOR (\{.*\})\n', timeout=60)
        except RuntimeError as exc:
            self.fail('the monitor program did not start serving: %s' % exc)
        info = json.loads(match.group(1))
        self.assertEqual(info['port'], PORT)
        return proc, info

    def requests(self, host, *requests, ip=None):
        """Runs ``requests`` from lab host ``host`` against ``ip`` (default: the
        monitor's lab address); returns one result dict per request."""
        cfg = {'ip': ip or self.lab.ip('monitor'), 'port': PORT, 'requests': list(requests)}
        result = self.lab.run(host, [sys.executable, '-c', CLIENT, json.dumps(cfg)],
                              timeout=60, env=clean_env())
        if result.returncode != 0:
            self.fail('client on %s failed (%s):\n%s\n%s' % (
                host, result.returncode, result.stderr, self.diagnostics()))
        answers = json.loads(result.stdout.strip().splitlines()[-1])
        for request, answer in zip(requests, answers):
            self.assertNotIn('error', answer, '%s: %s' % (request, answer))
        return answers

    def request(self, host, request):
        return self.requests(host, request)[0]

    def assert_status(self, answer, status, what):
        self.assertEqual(answer['status'], status, '%s: %s' % (what, answer))

    def assert_one_cluster(self, answer):
        self.assert_status(answer, 200, '/api/status')
        clusters = answer['json']['clusters']
        self.assertEqual(len(clusters), 1, answer)
        self.assertEqual(clusters[0]['done'], 2, answer)

    # -- the tests ------------------------------------------------------------------------
    @time_limit(120)
    def test_announcement_and_own_addresses(self):
        """The stderr line names the lab address with the token; the monitor host
        needs no token, by its lab address as by loopback."""
        line = self.monitor.wait_for(r'dispy web monitor: .*\n', timeout=5, stream='stderr')
        self.assertIn('http://127.0.0.1:%d/ (this machine)' % PORT, line.group(0))
        self.assertIn('from other hosts: %s/?token=%s' % (self.base, self.token),
                      line.group(0))
        status, page = self.requests('monitor', get('/api/status'), get('/'))
        self.assert_one_cluster(status)
        self.assertEqual(status['json']['show_job_args'], True, status)
        self.assert_status(page, 200, 'GET / from the monitor host')
        self.assertEqual(page['meta_token'], self.token, page)
        # the same machine by loopback (the server is bound to every address)
        self.assert_one_cluster(self.requests('monitor', get('/api/status'),
                                              ip='127.0.0.1')[0])

    @time_limit(120)
    def test_other_host_without_token_is_refused(self):
        page, api, bad_query, bad_cookie, bad_header = self.requests(
            'phone', dict(get('/'), look_for=['?token=']), get('/api/status'),
            get('/?token=not-the-token'),
            get('/api/status', Cookie='dispy_monitor_%d=not-the-token' % PORT),
            get('/api/status', **header_names(x_dispy_token='not-the-token')))
        self.assert_status(page, 403, 'GET / without the token')
        self.assertIn('text/html', page['headers']['content-type'], page)
        self.assertIn('access token', page['body'], page)
        self.assertEqual(page['has'], {'?token=': True}, page)
        self.assertIsNone(page['meta_token'], 'the refusal page gives the token away')
        self.assert_status(api, 403, 'GET /api/status without the token')
        self.assertIn('error', api['json'], api)
        self.assertNotIn('clusters', api['json'], api)
        for answer, what in ((bad_query, 'wrong ?token='), (bad_cookie, 'wrong cookie'),
                             (bad_header, 'wrong X-Dispy-Token')):
            self.assert_status(answer, 403, what)
            self.assertNotIn('set-cookie', answer['headers'], answer)
            self.assertIsNone(answer['meta_token'], answer)

    @time_limit(120)
    def test_token_link_keeps_the_token_in_a_cookie(self):
        first, status, page, scripted = self.requests(
            'phone', get('/?token=%s' % self.token),
            get('/api/status', Cookie=self.cookie), get('/', Cookie=self.cookie),
            get('/api/status', **header_names(x_dispy_token=self.token)))
        # the token leaves the address bar at once: 303 to the page without it
        self.assert_status(first, 303, 'GET /?token=T')
        self.assertEqual(first['headers'].get('location'), '/', first)
        self.assertEqual(first['headers'].get('set-cookie'),
                         '%s; Path=/; HttpOnly; SameSite=Lax' % self.cookie, first)
        self.assert_one_cluster(status)
        self.assert_status(page, 200, 'GET / with the cookie')
        self.assertIn('text/html', page['headers']['content-type'], page)
        self.assertEqual(page['meta_token'], self.token, page)
        self.assert_one_cluster(scripted)

    @time_limit(120)
    def test_changes_need_the_token_header_and_our_origin(self):
        body = {'show_job_args': False}
        token = header_names(x_dispy_token=self.token)
        host = '%s:%d' % (self.lab.ip('monitor'), PORT)
        cookie_only, bad_origin, no_origin, our_origin, after = self.requests(
            'phone', post('/api/settings', body, Cookie=self.cookie),
            post('/api/settings', body, Cookie=self.cookie, Origin='http://evil.example',
                 **token),
            post('/api/settings', body, **token),
            post('/api/settings', body, Origin='http://' + host, Cookie=self.cookie,
                 **token),
            get('/api/status', Cookie=self.cookie))
        self.assert_status(cookie_only, 403, 'POST with the cookie only')
        self.assertIn('X-Dispy-Token', cookie_only['json']['error'], cookie_only)
        self.assert_status(bad_origin, 403, 'POST from another Origin')
        for answer, what in ((no_origin, 'POST with the header'),
                             (our_origin, 'POST with the header and our Origin')):
            self.assert_status(answer, 200, what)
            self.assertEqual(answer['json'], body, answer)
        self.assertEqual(after['json']['show_job_args'], False, after)
        # on the machine itself, too, a change needs the header (a page of another site
        # open in this machine's browser could POST otherwise)
        local = self.request('monitor', post('/api/settings', {'show_job_args': True}))
        self.assert_status(local, 403, 'POST without the header from the monitor host')

    @time_limit(120)
    def test_foreign_host_header_is_refused(self):
        evil = 'evil.example:%d' % PORT
        token = header_names(x_dispy_token=self.token)
        answers = self.requests('phone', get('/api/status', Host=evil, **token),
                                get('/?token=%s' % self.token, Host=evil),
                                post('/api/settings', {'show_job_args': False}, Host=evil,
                                     Origin='http://' + evil, **token))
        for answer in answers:
            self.assert_status(answer, 421, 'Host: %s' % evil)
            self.assertNotIn('set-cookie', answer['headers'], answer)
        # not even the machine itself answers to a name it does not have
        local = self.request('monitor', get('/api/status', Host=evil))
        self.assert_status(local, 421, 'Host: %s from the monitor host' % evil)
        # ... but it does to its own names and addresses
        own = ['%s:%d' % (self.lab.ip('monitor'), PORT), 'localhost:%d' % PORT]
        if self.lab.hostnames:
            own.append('monitor:%d' % PORT)     # the lab host's name (UTS namespace)
        for name, answer in zip(own, self.requests(
                'phone', *[get('/api/status', Host=name, **token) for name in own])):
            self.assert_status(answer, 200, 'Host: %s' % name)


if __name__ == '__main__':
    unittest.main()
