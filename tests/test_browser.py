"""The web monitor's page (dispyhttpd.py) in a real browser, on loopback.

Two ``dispynode.py`` processes (127.0.0.2 and 127.0.0.3), a cluster in this process and
a ``DispyHTTPServer`` on 127.0.0.1, as in test_httpd.py; then a headless Chromium,
driven through Playwright's automation channel by ``tests/browser_driver.py`` (run with
a Python that has Playwright: the suite's own interpreter is standard library only),
opens the page as a user would.  Checked: the page lists both nodes and updates its
Done figure by itself, draws the throughput chart, shows a job's arguments as text (an
argument with markup stays text: nothing injected, no script run), cancels a job from
the node view (the job ends Cancelled in this process), refuses a change its own
origin sends without the token header, fits a phone's width without page-wide
horizontal scrolling, and logs no console errors, page errors or CSP violations.
Screenshots go to ``$DISPY_TEST_ARTIFACTS`` or ``.test-artifacts/``.

Skipped, with a message, when Chromium or Playwright is missing (``.ci/test-tools``
installs them).
"""

import json
import os
import shutil
import subprocess
import sys
import time
import unittest

try:
    from tests import support
    from tests.test_httpd import NODE_IPS, SERVER_IP, MonitorTestCase
except ImportError:                         # run from inside tests/
    import support
    from test_httpd import NODE_IPS, SERVER_IP, MonitorTestCase

from dispy import DispyJob

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, 'browser_driver.py')
ARTIFACTS = os.environ.get('DISPY_TEST_ARTIFACTS') or os.path.join(support.ROOT,
                                                                    '.test-artifacts')
SCREENSHOTS = ('monitor-cluster.png', 'monitor-node.png', 'monitor-phone.png')
# Markup in a job's argument: shown as text, it neither runs nor sets the flag.
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
DRIVER_TIMEOUT = 120        # the whole browser run; each wait inside it is <= 20 s
SHORT_JOBS = 40


# -- the tools (found once, at import: a missing one makes the tests skip) --------------------

def _has_playwright(python):
    try:
        return subprocess.run([python, '-c', 'import playwright.sync_api'],
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_playwright_python():
    """A Python that can import Playwright, or None."""
    chosen = os.environ.get('DISPY_TEST_PLAYWRIGHT_PYTHON')
    if chosen:
        return chosen if _has_playwright(chosen) else None
    for python in (os.path.join(support.ROOT, '.venv-tests', 'bin', 'python'), sys.executable):
        if os.path.exists(python) and _has_playwright(python):
            return python
    return None


def find_chromium():
    if os.access('/usr/bin/chromium', os.X_OK):
        return '/usr/bin/chromium'
    return shutil.which('chromium')


def _png(path):
    with open(path, 'rb') as f:
        return f.read(8) == b'\x89PNG\r\n\x1a\n'


class BrowserTest(MonitorTestCase):
    """Two nodes for the class (MonitorTestCase); one browser run per test."""

    timeout = 180

    @classmethod
    def setUpClass(cls):
        missing = []
        cls.python = find_playwright_python()
        cls.chromium = find_chromium()
        if cls.python is None:
            chosen = os.environ.get('DISPY_TEST_PLAYWRIGHT_PYTHON')
            missing.append("Playwright's Python package (%s cannot import playwright)" % (
                '$DISPY_TEST_PLAYWRIGHT_PYTHON=%s' % chosen if chosen else
                'neither .venv-tests/bin/python nor %s' % sys.executable))
        if cls.chromium is None:
            missing.append('Chromium (no /usr/bin/chromium, no chromium on PATH)')
        if missing:
            raise unittest.SkipTest('browser tests need %s (run .ci/test-tools to install '
                                    'them)' % ' and '.join(missing))
        super().setUpClass()

    def artifacts(self):
        os.makedirs(ARTIFACTS, exist_ok=True)
        for name in SCREENSHOTS:        # so a stale file from an earlier run cannot pass
            try:
                os.unlink(os.path.join(ARTIFACTS, name))
            except FileNotFoundError:
                pass
        return ARTIFACTS

    # -- the browser run -----------------------------------------------------------------------
    def start_driver(self, spec):
        """Starts the driver on ``spec``; its processes are killed at cleanup if alive."""
        folder = support.temp_folder(self, 'dispytest-browser-')
        spec_file = os.path.join(folder, 'spec.json')
        with open(spec_file, 'w') as f:
            json.dump(spec, f)
        out = open(os.path.join(folder, 'stdout'), 'w+')
        err = open(os.path.join(folder, 'stderr'), 'w+')
        self.addCleanup(err.close)
        self.addCleanup(out.close)
        env = dict(os.environ, TMPDIR=folder)   # Playwright's profile dirs go in `folder`
        proc = subprocess.Popen([self.python, DRIVER, spec_file], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, cwd=folder, env=env,
                                start_new_session=True, preexec_fn=support.die_with_parent)
        self.addCleanup(self.kill_driver, proc)
        return proc, out, err

    @staticmethod
    def kill_driver(proc):
        """SIGKILL to the driver and what it started (Playwright's node, Chromium), by PID."""
        if proc.poll() is None:
            support.kill_pids(support.descendants(proc.pid) + [proc.pid])
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def finish_driver(self, proc, out, err):
        """The driver's observations (its one JSON line), after it ended by itself."""
        try:
            proc.wait(DRIVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill_driver(proc)
            self.fail('the browser driver did not end in %ss:\n%s' % (DRIVER_TIMEOUT,
                                                                       self.text(err)))
        lines = [line for line in self.text(out).splitlines() if line.startswith('{')]
        if not lines:
            self.fail('the browser driver said nothing (exit %s):\n%s'
                      % (proc.returncode, self.text(err)))
        obs = json.loads(lines[-1])
        obs['stderr'] = self.text(err)[-4000:]
        with open(os.path.join(ARTIFACTS, 'monitor-observations.json'), 'w') as f:
            json.dump(obs, f, indent=1)     # beside the screenshots, for a failed run
        return obs

    @staticmethod
    def text(f):
        f.flush()
        f.seek(0)
        return f.read()

    # -- the test ------------------------------------------------------------------------------
    def test_page_shows_updates_cancels_and_stays_safe(self):
        started = time.monotonic()
        cluster = self.cluster()
        server = self.monitor(cluster)
        # The long job first, so it runs at once; it stays running until cancelled.
        long_job = cluster.submit(60, label=XSS)
        self.assertTrue(support.wait_until(lambda: long_job.status == DispyJob.Running, 30),
                        'the long job never started: %s' % long_job.status)
        folder = support.temp_folder(self, 'dispytest-browser-run-')
        first_look = os.path.join(folder, 'first-look')
        spec = {'url': 'http://%s:%d/' % (SERVER_IP, server.port), 'chromium': self.chromium,
                'nodes': len(NODE_IPS), 'node_ip': long_job.ip_addr,
                'job_key': str(long_job._key), 'artifacts': self.artifacts(),
                'first_look_file': first_look, 'timeout_ms': 20000,
                'steps': ['cluster', 'forbidden_post', 'node', 'phone']}
        proc, out, err = self.start_driver(spec)
        # The short jobs only once the page has read its first Done figure, so the
        # figure must grow afterwards however slowly the browser started.
        support.wait_until(lambda: os.path.exists(first_look) or proc.poll() is not None,
                           60, 0.05)
        for _ in range(SHORT_JOBS):
            cluster.submit(0.4)
        obs = self.finish_driver(proc, out, err)
        self.check(obs, long_job)
        sys.stderr.write('(browser test: %.1f s) ' % (time.monotonic() - started))

    def check(self, obs, long_job):
        report = json.dumps(obs, indent=1)
        self.assertNotIn('failure', obs, report)
        self.assertEqual(obs['steps_done'], ['cluster', 'forbidden_post', 'node', 'phone'],
                         report)
        # the cluster view
        self.assertEqual(sorted(obs['node_ips']), sorted(NODE_IPS), report)
        self.assertEqual(obs['poll_sec_shown'], '1', report)    # the server's poll_sec
        self.assertGreater(obs['done_later'], obs['done_first'], report)
        self.assertTrue(obs['chart']['svg'] and obs['chart']['line'], report)
        self.assertTrue(obs['chart']['d'].startswith('M'), report)
        # the node view: arguments as text, nothing injected, the job cancelled
        self.assertEqual(obs['node_hash'], '#node=' + long_job.ip_addr, report)
        self.assertIn('<script>window.__xss=1</script>', obs['args_text'], report)
        self.assertIn('onerror=', obs['args_text'], report)
        self.assertIsNone(obs['xss_flag'], report)
        self.assertEqual(obs['injected_elements'], [], report)
        self.assertEqual(obs['cancel_result'], 'cancelled 1', report)
        self.assertTrue(obs['row_gone'], report)
        self.assertIsNone(obs['error_banner'], report)
        long_job(timeout=20)
        self.assertEqual(long_job.status, DispyJob.Cancelled)
        # a change without the token, sent by a script of the page's own origin
        self.assertEqual(obs['tokenless_post_status'], 403, report)
        # a phone: tables scroll inside their box, never the page
        self.assertTrue(obs['phone']['fits'], report)
        for name in SCREENSHOTS:
            path = os.path.join(ARTIFACTS, name)
            self.assertTrue(os.path.getsize(path) > 1000 and _png(path), path)
        # no errors: only the refused POST may log its 403 (Chromium logs failed loads)
        errors = [e for e in obs['console_errors'] if not (
            e['phase'] == 'forbidden_post' and e['url'].endswith('/api/cancel')
            and '403' in e['text'])]
        self.assertEqual(errors, [], report)
        self.assertEqual(obs['page_errors'], [], report)
        self.assertEqual(obs['csp_violations'], [], report)


if __name__ == '__main__':
    unittest.main()
