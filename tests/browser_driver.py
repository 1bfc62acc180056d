"""Drives the web monitor's page in a real Chromium, through Playwright (test_browser.py).

Run by test_browser.py with a Python that has Playwright (not the suite's interpreter,
which is standard library only)::

    python browser_driver.py SPEC_JSON_FILE

The spec names the page's address, the steps to perform (in order) and what they need;
the driver prints ONE JSON line of what it observed on stdout, also when a step failed
(``failure`` then says which step and why).  Every wait is bounded (``timeout_ms``, at
most ~20 s each); the test also bounds the whole run.

Steps (each is a function below):
    cluster         the cluster view on a desktop viewport: the nodes table, the Done
                    figure before and after the page's own polls, the chart, a screenshot
    forbidden_post  a change POSTed from the page without the token header (status)
    node            the node view of the long job's node: its arguments as text, no
                    injected markup, select it, cancel it, a screenshot
    phone           the cluster view on a phone-sized touch viewport: page-wide
                    horizontal scrolling, a screenshot
Console errors, page errors and CSP violations are collected on every page.
"""

import json
import os
import sys

from playwright.sync_api import sync_playwright

# Without the background-networking flags Chromium tries to reach the internet.
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-proxy-server']
DESKTOP = {'viewport': {'width': 1280, 'height': 800}}
PHONE = {'viewport': {'width': 390, 'height': 844}, 'is_mobile': True, 'has_touch': True,
         'device_scale_factor': 2}

# Registered in every document before the page's own script: CSP violations would show
# markup that got parsed as HTML (an inline script or handler the policy then blocked).
RECORD_CSP = '''
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || '') + ' '
                              + (e.sourceFile || '') + ':' + (e.lineNumber || ''));
});
'''


class Run:
    """One run: the spec, the browser, what was observed so far."""

    def __init__(self, spec, browser):
        self.spec = spec
        self.browser = browser
        self.timeout = min(int(spec.get('timeout_ms', 20000)), 20000)
        self.obs = {'console_errors': [], 'page_errors': [], 'csp_violations': []}
        self.phase = 'start'
        self.pages = {}             # name -> page (a context each)

    def page(self, name, options):
        """A new page in a fresh context; its errors are recorded with the phase."""
        context = self.browser.new_context(**options)
        context.set_default_timeout(self.timeout)
        context.add_init_script(RECORD_CSP)
        page = context.new_page()
        page.on('console', lambda msg: self._console(name, msg))
        page.on('pageerror', lambda exc: self.obs['page_errors'].append(
            {'page': name, 'phase': self.phase, 'text': str(exc)}))
        self.pages[name] = page
        return page

    def _console(self, name, msg):
        if msg.type == 'error':
            location = msg.location or {}
            self.obs['console_errors'].append({'page': name, 'phase': self.phase,
                                               'text': msg.text,
                                               'url': location.get('url', '')})

    def screenshot(self, page, name):
        path = os.path.join(self.spec['artifacts'], name)
        page.screenshot(path=path, full_page=True, timeout=self.timeout)
        self.obs.setdefault('screenshots', []).append(path)

    def collect_csp(self):
        for name, page in self.pages.items():
            try:
                found = page.evaluate('window.__cspViolations || []')
            except Exception as exc:    # a closed page: say so rather than hide it
                found = ['(not read: %s)' % exc]
            self.obs['csp_violations'].extend('%s: %s' % (name, v) for v in found)


# -- steps -----------------------------------------------------------------------------------
# (Waits use the context's default timeout, Run.timeout.)

DONE = 'section.cluster span[data-total="done"]'
NODE_ROWS_SHOWN = 'n => document.querySelectorAll("tr.node-row").length >= n'
DONE_IS_NUMBER = '() => /^\\d+$/.test((document.querySelector(%r) || {}).textContent)' % DONE
DONE_GREW = 'first => +document.querySelector(%r).textContent > first' % DONE
CHART = '''() => {
  const svg = document.querySelector('section.cluster svg.throughput');
  const line = svg && svg.querySelector('path.line, polyline');
  return {svg: !!svg, line: !!line,
          d: line ? line.getAttribute('d') || line.getAttribute('points') || '' : ''};
}'''
CANCEL_ANSWERED = ('() => /^cancelled \\d/.test('
                   'document.getElementById("cancel-result").textContent)')


def done_figure(page):
    """The first cluster's Done figure as a number (None while not a number)."""
    text = page.text_content(DONE)
    return int(text) if text and text.strip().isdigit() else None


def step_cluster(run):
    spec, obs = run.spec, run.obs
    page = run.page('desktop', DESKTOP)
    page.goto(spec['url'], wait_until='domcontentloaded')
    page.wait_for_function(NODE_ROWS_SHOWN, arg=spec['nodes'])
    obs['node_ips'] = page.eval_on_selector_all('tr.node-row',
                                                'rows => rows.map(r => r.dataset.ip)')
    page.wait_for_function(DONE_IS_NUMBER)
    obs['done_first'] = done_figure(page)
    obs['poll_sec_shown'] = page.input_value('#poll-sec')
    # The test submits the short jobs only now: Done can only grow from here on.
    with open(spec['first_look_file'], 'w') as f:
        f.write(str(obs['done_first']))
    # The page refreshes itself each poll_sec: no reload, only waiting for a later look.
    page.wait_for_function(DONE_GREW, arg=obs['done_first'])
    obs['done_later'] = done_figure(page)
    page.wait_for_selector('section.cluster svg.throughput path.line', state='attached')
    obs['chart'] = page.evaluate(CHART)
    run.screenshot(page, 'monitor-cluster.png')


def step_forbidden_post(run):
    page = run.pages['desktop']
    # A script of the page's own origin, without the token header: must be refused.
    run.obs['tokenless_post_status'] = page.evaluate('''async () => {
      const r = await fetch('/api/cancel', {method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({cluster: 1, jobs: ['1']})});
      return r.status;
    }''')


def step_node(run):
    spec, obs = run.spec, run.obs
    page = run.pages['desktop']
    page.click('tr.node-row[data-ip="%s"] a.node-link' % spec['node_ip'])
    row = 'tr.job-row[data-key="%s"]' % spec['job_key']
    page.wait_for_selector(row)
    obs['node_hash'] = page.evaluate('location.hash')
    obs['node_title'] = page.text_content('#node-title')
    obs['args_text'] = page.text_content(row + ' td[data-col="args"]')
    obs['xss_flag'] = page.evaluate('typeof window.__xss === "undefined" ? null : window.__xss')
    obs['injected_elements'] = page.eval_on_selector_all(
        '#node-clusters script, #node-clusters img', 'els => els.map(e => e.outerHTML)')
    run.screenshot(page, 'monitor-node.png')
    # The rows are rebuilt on each poll; the page keeps the selection by job key, and
    # Playwright re-finds the box if it was replaced in between.
    page.check(row + ' input.job-select')
    page.wait_for_selector('#cancel-jobs:not([disabled])')
    page.click('#cancel-jobs')
    page.wait_for_function(CANCEL_ANSWERED)
    obs['cancel_result'] = page.text_content('#cancel-result')
    page.wait_for_selector(row, state='detached')
    obs['row_gone'] = True
    obs['error_banner'] = (None if page.is_hidden('#error')
                           else page.text_content('#error-text'))


def step_phone(run):
    spec, obs = run.spec, run.obs
    page = run.page('phone', PHONE)
    page.goto(spec['url'], wait_until='domcontentloaded')
    page.wait_for_function(NODE_ROWS_SHOWN, arg=spec['nodes'])
    page.wait_for_selector('section.cluster svg.throughput', state='attached')
    obs['phone'] = page.evaluate('''() => ({
      scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
      fits: document.documentElement.scrollWidth <= window.innerWidth + 1,
      tableScrolls: Array.from(document.querySelectorAll('.table-wrap')).map(
        (w) => w.scrollWidth > w.clientWidth)})''')
    run.screenshot(page, 'monitor-phone.png')


STEPS = {'cluster': step_cluster, 'forbidden_post': step_forbidden_post, 'node': step_node,
         'phone': step_phone}


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    obs = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=spec['chromium'], args=CHROMIUM_FLAGS,
                                         headless=True, timeout=20000)
            run = Run(spec, browser)
            obs = run.obs
            try:
                for name in spec['steps']:
                    run.phase = name
                    STEPS[name](run)
                    obs.setdefault('steps_done', []).append(name)
            except Exception as exc:
                obs['failure'] = '%s: %s: %s' % (run.phase, type(exc).__name__, exc)
            finally:
                run.phase = 'end'
                run.collect_csp()
                browser.close()
    except Exception as exc:                    # the browser did not start, or closed badly
        obs.setdefault('failure', 'browser: %s: %s' % (type(exc).__name__, exc))
    print(json.dumps(obs), flush=True)


if __name__ == '__main__':
    main()
