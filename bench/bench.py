#!/usr/bin/env python3
"""Benchmark driver for the dispy reimplementation (standard library only).

Process layout::

    driver (python bench/bench.py ...)
      |-- node process:    python <repo>/dispynode.py -i 127.0.0.1 -p PORT -c CPUS
      |                       --dest_path_prefix TMPDIR --daemon
      |                    (one per implementation, started once, stopped by PID at the end)
      |-- client process:  python bench/bench.py --run-workload W1 --impl this --node-port PORT ...
      |-- client process:  (a FRESH interpreter for every run of every workload)
      ...

Every client process creates its own ``dispy.JobCluster`` against the one node on
127.0.0.1, runs one warm-up job (except W5, which measures the cold start of a
cluster), times the workload, verifies every result, closes the cluster and prints
one JSON object on its last stdout line.  The driver collects the runs and prints
one JSON line per workload figure (median/min/max over the runs).

W7 and W8 have nodes of their own (``NodeSet``: several nodes on one port, each on
its own loopback address, started and stopped together): W7 48 nodes of 1 CPU on
127.0.0.11-58 and 1 node of 2 CPUs on 127.0.0.11 (another port), its runs alternating
between the two; W8 a fast node on 127.0.0.21 and a slow one on 127.0.0.22.  Their
clients wait (``cluster_status``) until every node is set up before timing.

W1s and W2s are W1 and W2 through a dispyscheduler: the driver starts
``dispyscheduler.py -i 127.0.0.1 -p PORT --client_port 0 -n 127.0.0.31 --node_port P
--daemon --dest_path_prefix TMPDIR`` and a node of its own on 127.0.0.31 (the scheduler
is that node's one client for as long as it runs); each run is a pair of fresh clients,
the direct W1 / W2 on the 127.0.0.1 node and a ``dispy.SharedJobCluster`` client through
the scheduler, one right after the other, and a ratio line compares the two.

With ``--original PYTHON`` the driver re-executes itself as
``unshare -n <python> bench/bench.py --inside-netns ...``: a network namespace whose
only interface is ``lo`` (the original dispy node broadcasts on every interface when
it starts, so it must never run anywhere else).  Inside it the driver runs both
implementations one after the other, each with its own node, then prints a ratio
line per figure.  The original (dispy 4.15.2 installed for interpreter PYTHON) runs
its node as ``PYTHON <venv>/bin/dispynode.py`` (or ``PYTHON -m dispy.dispynode``) and
its clients as ``PYTHON bench/bench.py --run-workload ... --impl original``.

Safety: only loopback addresses (127.0.0.0/8) are used; every wait is bounded; the driver stops only the
processes it started, by PID (SIGTERM, wait, SIGKILL, then any descendant left),
also on Ctrl-C / SIGTERM; node and client processes also get SIGKILL if the driver
dies (PR_SET_PDEATHSIG).  Temporary folders are removed.
"""

import argparse
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import types

BENCH_FILE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(BENCH_FILE))
MB = 1000 * 1000           # MB and MB/s are decimal (10**6 bytes)
W3_JOB_BYTES = 5 * MB      # size of one W3 argument / result

# -- targets ---------------------------------------------------------------------------
# workload -> figures it reports: (line id, result key, unit, comparison, target, extras)
# 'extras' are further keys of the client result whose median over the runs is added
# to the line.
FIGURES = {
    'W1': [('W1', 'jobs_per_s', 'jobs/s', '>=', 10000, ('wall_s', 'jobs'))],
    # W1s / W2s: W1 / W2 through a dispyscheduler (SharedJobCluster), each run a pair of
    # clients (direct on W1's node, then through the scheduler to a node of its own, or
    # the other way round); targets: 0.6 x W1's, W2's 0.5 ms / 0.6, and the pair ratio
    'W1s': [('W1s', 'jobs_per_s', 'jobs/s', '>=', 6000,
             ('wall_s', 'jobs', 'jobs_per_s_direct')),
            ('W1s-ratio', 'ratio', 'x', '>=', 0.6, ('jobs_per_s', 'jobs_per_s_direct'),
             ('jobs_per_s', 'jobs_per_s_direct'))],
    # W1m: W1 with the web monitor on the cluster and a page polling it every second
    # (10 times the default poll_sec), against W1 without, alternating in one client
    'W1m': [('W1m', 'jobs_per_s', 'jobs/s', '>=', 9000,
             ('jobs_per_s_plain', 'polls', 'jobs')),
            ('W1m-ratio', 'ratio', 'x', '>=', 0.9, ('jobs_per_s', 'jobs_per_s_plain'),
             ('ratio',))],
    # W1f: W1 with each opt-in feature of issue 18 (priorities, retries, live output,
    # ClusterExecutor) against plain W1, alternating in one client; the ratios are the
    # figures (a feature on should cost little: 0.9 of plain)
    'W1f': [('W1f', 'jobs_per_s', 'jobs/s', '>=', 10000,
             ('priority_ratio', 'retries_ratio', 'stream_ratio', 'print_jobs_per_s',
              'stream_print_ratio', 'executor_ratio', 'jobs'),
             ('plain_jobs_per_s', 'priority_jobs_per_s', 'retries_jobs_per_s',
              'stream_jobs_per_s', 'print_jobs_per_s', 'stream_print_jobs_per_s',
              'executor_jobs_per_s'))],
    'W2': [('W2', 'median_ms', 'ms', '<=', 0.5, ('p90_ms', 'mean_ms', 'max_ms', 'jobs'))],
    'W2s': [('W2s', 'median_ms', 'ms', '<=', 0.83,
             ('p90_ms', 'mean_ms', 'max_ms', 'jobs', 'median_ms_direct')),
            ('W2s-ratio', 'ratio', 'x', '>=', 0.6,
             ('median_ms', 'median_ms_direct', 'slowdown'),
             ('median_ms', 'median_ms_direct'))],
    'W3': [('W3-up', 'up_MBps', 'MB/s', '>=', 700, ('up_s', 'jobs', 'job_MB')),
           ('W3-down', 'down_MBps', 'MB/s', '>=', 700, ('down_s', 'jobs', 'job_MB'))],
    'W4': [('W4', 'speedup', 'x', '>=', 1.85, ('local_s', 'wall_s', 'loops', 'jobs'))],
    'W5': [('W5', 'first_result_ms', 'ms', '<=', 20, ('cluster_ms', 'import_ms'))],
    'W6': [('W6', 'bytes_per_job', 'bytes/job', '<=', 350,
            ('jobs', 'jobs_per_s', 'submit_s', 'rss_before_MB', 'rss_after_submit_MB',
             'rss_after_collect_MB', 'rss_after_drop_MB', 'after_drop_bytes_per_job',
             'returned_fraction', 'live_jobs_after_drop'))],
    # W7 and W8 have their own nodes (MULTI_NODE); a W7 "run" is a pair of clients, one
    # over 48 nodes and one over 1 node, and its figures compare the two.  A 7th
    # element lists extras whose per-run values are also shown, as '<extra>_runs'.
    'W7': [('W7-ratio', 'ratio', 'x', '>=', 0.8,
            ('nodes', 'jobs_per_s_48', 'jobs_per_s_1', 'wall_s_48', 'wall_s_1',
             'nodes_used_48', 'jobs'), ('jobs_per_s_48', 'jobs_per_s_1')),
           ('W7-threads', 'thread_diff', 'threads', '<=', 4,
            ('peak_threads_48', 'peak_threads_1'),
            ('peak_threads_48', 'peak_threads_1', 'peak_thread_names_48'))],
    'W8': [('W8', 'makespan_ratio', 'x', '<=', 1.15,
            ('makespan_s', 'ideal_s', 'tail_s', 'jobs_fast', 'jobs_slow', 'jobs', 'base_s'),
            ('makespan_s', 'jobs_fast', 'jobs_slow', 'tail_s'))],
}
# workload -> (full size, --quick size): number of jobs
SIZES = {'W1': (2000, 200), 'W2': (200, 50), 'W3': (20, 3), 'W4': (8, 4),
         'W1s': (2000, 200), 'W2s': (200, 50), 'W1m': (2000, 200), 'W1f': (2000, 200),
         'W5': (1, 1), 'W6': (100000, 5000), 'W7': (2000, 300), 'W8': (200, 60)}
W4_JOB_SECONDS = (0.5, 0.2)  # (full, --quick) target duration of one W4 job
ORIGINAL_NAME = 'dispy-4.15.2'
MULTI_NODE = ('W7', 'W8')   # workloads with nodes of their own (not the one on 127.0.0.1)
# not run for the original: 4.15.2 refuses every cluster_status callback under Python
# 3.11+ (its check calls inspect.getargspec), and both wait through one for their nodes
# W1s / W2s: the workload through a dispyscheduler -> the direct workload it compares
# with.  The scheduler listens on 127.0.0.1 and holds a node of its own, on SHARED_NODE
# (a node serves one client at a time and the scheduler is that client from its start),
# with W1's CPUs; the direct half of a run uses W1's node on 127.0.0.1.
SHARED = {'W1s': 'W1', 'W2s': 'W2'}
SHARED_NODE, SCHEDULER_ADDR = '127.0.0.31', '127.0.0.1'
ORIGINAL_SKIPS = MULTI_NODE + tuple(SHARED) + ('W1m', 'W1f')   # the original's scheduler and monitor are not run
# W7: 48 nodes of 1 CPU on 127.0.0.11 ... 127.0.0.58 (one port) versus 1 node of 2 CPUs
# on 127.0.0.11 (another port): the same 2 CPUs of this machine either way
W7_NODES, W7_FIRST_ADDR = 48, 11
# W8: a fast and a slow node (the slow one's jobs sleep W8_SLOWDOWN times longer)
W8_FAST, W8_SLOW, W8_CPUS, W8_SLOWDOWN, W8_BASE = '127.0.0.21', '127.0.0.22', 2, 10, 0.01
NODE_SETUP_TIMEOUT = 60.0   # a multi-node client waits at most this for every node's setup
SIGN = {'>=': '\u2265', '<=': '\u2264'}


# ======================================================================================
# Computations.  dispy ships the *source* of these functions to the node, so each one
# is self-contained (imports inside).
# ======================================================================================

def double(n):
    return n * 2


def burn(loops):
    x = 0
    for i in range(loops):
        x = (x * 31 + i) % 1000003
    return x


def nap(i, base):
    import os, time
    time.sleep(base * float(os.environ.get('DISPY_BENCH_SLOWDOWN', '1')))
    return i


def transfer(data, size, seed):
    """With ``data``: returns its length (upload).  Without: returns ``size`` bytes
    of a seeded, incompressible pattern (download) that the client can regenerate."""
    if data is not None:
        return len(data)
    import random
    block = random.Random(seed).getrandbits(65536 * 8).to_bytes(65536, 'little')
    return (block * (size // 65536 + 1))[:size]


# ======================================================================================
# Client side (runs in a fresh process: bench.py --run-workload W --impl I ...)
# ======================================================================================

def original_setup():
    """The original's setup function (see make_cluster); the global it sets is what
    makes dispynode 4.15.2 keep its set-up process and fork each job from it."""
    global bench_set_up
    bench_set_up = True
    return 0


def make_cluster(dispy, impl, computation, node_port, nodes=('127.0.0.1',),
                 scheduler_port=None, **extra):
    """The only per-implementation difference in the client code.  With
    ``scheduler_port``: a SharedJobCluster through the dispyscheduler on
    SCHEDULER_ADDR:scheduler_port (W1s, W2s), to ``nodes`` on ``node_port``."""
    common = dict(nodes=list(nodes), loglevel=dispy.logger.WARNING, **extra)
    if scheduler_port:
        if impl == 'original':
            raise SystemExit('W1s / W2s are not run for the original')
        return dispy.SharedJobCluster(computation, scheduler_node=SCHEDULER_ADDR,
                                      scheduler_port=scheduler_port, node_port=node_port,
                                      **common)
    if impl == 'original':
        # dispy 4.15.2: the client listens on dispy_port and nodes on dispy_port + 1;
        # 'host' is 4.15.2's name for the deprecated 'ip_addr' (same meaning).
        # With a setup function that sets a global, its node forks each job from the
        # set-up process; otherwise many short jobs hit a race in dispynode 4.15.2
        # (jobs Terminated with "'NoneType' object has no attribute 'pid'").
        return dispy.JobCluster(computation, host='127.0.0.1', dispy_port=node_port - 1,
                                setup=original_setup, **common)
    return dispy.JobCluster(computation, ip_addr='127.0.0.1', port=0, node_port=node_port,
                            **common)


class Checker:
    """Counts wrong results; the client exits non-zero if there was any."""

    def __init__(self):
        self.bad = 0
        self.first = None

    def __call__(self, got, expected, job, what):
        if got == expected:
            return
        self.bad += 1
        if self.first is None:
            shown = got if not isinstance(got, bytes) else '<%d bytes>' % len(got)
            self.first = '%s: got %.80r, expected %.80r (status %s, exception %.300s)' % (
                what, shown, expected if not isinstance(expected, bytes) else
                '<%d bytes>' % len(expected), getattr(job, 'status', None),
                getattr(job, 'exception', None))

    def summary(self):
        out = {'bad_results': self.bad}
        if self.first:
            out['first_bad'] = self.first
        return out


class _Closing:
    """Closes the cluster at the end; after an error, without waiting for long."""

    def __init__(self, cluster):
        self.cluster = cluster

    def __enter__(self):
        return self.cluster

    def __exit__(self, exc_type, *rest):
        if exc_type is None:
            self.cluster.close()
        else:
            try:
                self.cluster.close(timeout=10, terminate=True)
            except Exception:
                pass


def warm_up(cluster, check, args, expected):
    """One job, so that the node is known to be usable before timing starts."""
    job = cluster.submit(*args)
    check(job(), expected, job, 'warm-up job')


def _cluster(ctx, computation):
    """W1-W6 (and the warm-up client): one node, ``ctx.node_addrs`` (127.0.0.1, or the
    scheduler's node); through the scheduler if the driver gave its port."""
    return make_cluster(ctx.dispy, ctx.impl, computation, ctx.node_port,
                        nodes=ctx.node_addrs, scheduler_port=ctx.scheduler_port)


class ThreadPeak:
    """Samples ``threading.active_count()`` every 2 ms on a thread of its own (counted
    in the peak, the same for every setup) until ``stop()``."""

    def __init__(self):
        import threading
        self.peak = threading.active_count()
        self.names = []         # of the threads at the peak (what a report can name)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(threading,),
                                        daemon=True)
        self._thread.start()

    def _sample(self, threading):
        while not self._done.wait(0.002):
            count = threading.active_count()
            if count > self.peak:
                self.peak = count
                self.names = sorted(t.name for t in threading.enumerate())

    def stop(self):
        self._done.set()
        self._thread.join(5)
        return self.peak

    def census(self):
        """The threads at the peak by name, numbers folded: 'dispy-worker x8, ...'."""
        import collections
        import re
        counts = collections.Counter(re.sub(r'[-_ ]?\d+$', '', n) for n in self.names)
        return ', '.join('%s x%d' % kv if kv[1] > 1 else kv[0] for kv in sorted(counts.items()))


def ready_cluster(ctx, computation):
    """A cluster over all of ``ctx.node_addrs``, returned once every one of them has been
    set up (its DispyNode.Initialized reached ``cluster_status``), at most
    NODE_SETUP_TIMEOUT s."""
    import threading
    cond, ready = threading.Condition(), set()

    def status(state, node, job):
        if state == ctx.dispy.DispyNode.Initialized:
            with cond:
                ready.add(node.ip_addr)
                cond.notify_all()

    cluster = make_cluster(ctx.dispy, ctx.impl, computation, ctx.node_port,
                           nodes=ctx.node_addrs, cluster_status=status)
    deadline = time.monotonic() + NODE_SETUP_TIMEOUT
    with cond:
        while not ready.issuperset(ctx.node_addrs):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(ctx.node_addrs) - ready)
                try:
                    cluster.close(timeout=10, terminate=True)
                except Exception:
                    pass
                raise RuntimeError('%d of %d nodes not set up in %ss: %s' % (
                    len(missing), len(ctx.node_addrs), NODE_SETUP_TIMEOUT,
                    ', '.join(missing[:10])))
            cond.wait(left)
    return cluster


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100.0 * len(ordered)) - 1)]


def rss_bytes():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError('no VmRSS in /proc/self/status')


def w1_throughput(ctx, n):
    """n x double(i): submit all, then job() on each; jobs/s over submit+collect."""
    check = Checker()
    with _Closing(_cluster(ctx, double)) as cluster:
        warm_up(cluster, check, (-1,), -2)
        t0 = time.perf_counter()
        jobs = [cluster.submit(i) for i in range(n)]
        results = [job() for job in jobs]
        wall = time.perf_counter() - t0
    for i, (job, result) in enumerate(zip(jobs, results)):
        check(result, 2 * i, job, 'job %d' % i)
    return dict(jobs_per_s=n / wall, wall_s=wall, jobs=n, **check.summary())


POLLER = '''
import json, sys, time, urllib.request
base, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
polls = 0
while time.monotonic() < until:
    for path in ('/api/status?since=0', '/api/node?ip_addr=127.0.0.1'):
        try:
            urllib.request.urlopen(base + path, timeout=5).read()
            polls += 1
        except OSError:
            pass
    time.sleep(1.0)
print(polls)
'''


def w1_monitored(ctx, n):
    """W1 with a DispyHTTPServer on the cluster and a page (another process) polling
    its status and node endpoints every second, against plain W1: three pairs of
    fresh clusters in this process, alternating which half goes first."""
    import dispyhttpd
    plain, watched, polls = [], [], 0
    for round_ in range(3):
        for monitored in ((False, True) if round_ % 2 == 0 else (True, False)):
            check = Checker()
            with _Closing(_cluster(ctx, double)) as cluster:
                server = poller = None
                if monitored:
                    server = dispyhttpd.DispyHTTPServer(cluster, host='127.0.0.1', port=0,
                                                        poll_sec=1)
                    poller = subprocess.Popen(
                        [sys.executable, '-c', POLLER, 'http://127.0.0.1:%d' % server.port,
                         '600'], stdout=subprocess.PIPE, text=True)
                    deadline = time.monotonic() + 30    # the page is open before timing
                    while server._polls < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)
                warm_up(cluster, check, (-1,), -2)
                t0 = time.perf_counter()
                jobs = [cluster.submit(i) for i in range(n)]
                results = [job() for job in jobs]
                wall = time.perf_counter() - t0
                if monitored:
                    poller.terminate()
                    polls += int(poller.communicate(timeout=10)[0].strip() or 0)
                    server.shutdown(wait=False)
            for i, (job, result) in enumerate(zip(jobs, results)):
                check(result, 2 * i, job, 'job %d' % i)
            if check.bad:
                return dict(jobs_per_s=0.0, jobs=n, **check.summary())
            (watched if monitored else plain).append(n / wall)
    with_m, without = statistics.median(watched), statistics.median(plain)
    return dict(jobs_per_s=with_m, jobs_per_s_plain=without, ratio=with_m / without,
                polls=polls, jobs=n, bad_results=0)


# W1f: W1 with each of issue 18's opt-in features, against W1 without, in one client:
# rounds of fresh clusters alternating their order.  A variant the checkout lacks (an
# older one, under --compare) is left out.  'stream' prints nothing (what streaming
# costs a job that does not print); 'stream_print' and 'print' print one line a job,
# with and without streaming.
def _w1_jobs(cluster, n, check, submit):
    warm_up(cluster, check, (-1,), -2)
    t0 = time.perf_counter()
    jobs = [submit(cluster, i) for i in range(n)]
    results = [job() for job in jobs]
    wall = time.perf_counter() - t0
    for i, (job, result) in enumerate(zip(jobs, results)):
        check(result, 2 * i, job, 'job %d' % i)
    return n / wall


def double_printing(n):
    print('line of job', n)
    return n * 2


def _w1f_variants(dispy):
    plain = lambda cluster, i: cluster.submit(i)
    variants = {'plain': ({}, double, plain), 'print': ({}, double_printing, plain)}
    if hasattr(dispy, 'JobQueue'):
        variants['priority'] = ({}, double,
                                lambda cluster, i: cluster.submit(i, dispy_job_priority=i % 3))
        variants['retries'] = ({'job_retries': 2}, double, plain)
    if 'stream_output' in inspect_params(dispy.JobCluster):
        sink = lambda job, stream, line: None
        variants['stream'] = ({'stream_output': sink}, double, plain)
        variants['stream_print'] = ({'stream_output': sink}, double_printing, plain)
    return variants


def inspect_params(func):
    import inspect
    return inspect.signature(func).parameters


def _w1_executor(ctx, n, check):
    """W1 through dispy.ClusterExecutor: submit(double, i) then result() of each."""
    with ctx.dispy.ClusterExecutor(nodes=list(ctx.node_addrs), node_port=ctx.node_port,
                                   loglevel=ctx.dispy.logger.WARNING) as executor:
        check(executor.submit(double, -1).result(), -2, None, 'warm-up job')
        t0 = time.perf_counter()
        futures = [executor.submit(double, i) for i in range(n)]
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
    for i, result in enumerate(results):
        check(result, 2 * i, None, 'job %d' % i)
    return n / wall


def w1_features(ctx, n):
    variants = _w1f_variants(ctx.dispy)
    names = sorted(variants) + (['executor'] if hasattr(ctx.dispy, 'ClusterExecutor') else [])
    rates = {name: [] for name in names}
    check = Checker()
    for round_ in range(3):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            if name == 'executor':
                rates[name].append(_w1_executor(ctx, n, check))
                continue
            options, computation, submit = variants[name]
            cluster = make_cluster(ctx.dispy, ctx.impl, computation, ctx.node_port,
                                   nodes=ctx.node_addrs, **options)
            with _Closing(cluster):
                rates[name].append(_w1_jobs(cluster, n, check, submit))
    result = {'jobs': n, 'jobs_per_s': statistics.median(rates['plain'])}
    for name, values in rates.items():
        result['%s_jobs_per_s' % name] = statistics.median(values)
        result['%s_ratio' % name] = statistics.median(values) / result['jobs_per_s']
    result.update(check.summary())
    return result


def w2_latency(ctx, n):
    """n x (submit one trivial job, wait for it): per-job round-trip latency."""
    check = Checker()
    latencies = []
    with _Closing(_cluster(ctx, double)) as cluster:
        warm_up(cluster, check, (-1,), -2)
        for i in range(n):
            t0 = time.perf_counter()
            job = cluster.submit(i)
            result = job()
            latencies.append((time.perf_counter() - t0) * 1000.0)
            check(result, 2 * i, job, 'job %d' % i)
    return dict(median_ms=statistics.median(latencies), p90_ms=percentile(latencies, 90),
                mean_ms=statistics.mean(latencies), max_ms=max(latencies), jobs=n,
                **check.summary())


def w3_transfer(ctx, n):
    """n jobs with a 5 MB argument (returning its length), then n jobs returning 5 MB."""
    check = Checker()
    size = W3_JOB_BYTES
    payload = transfer(None, size, -1)
    with _Closing(_cluster(ctx, transfer)) as cluster:
        warm_up(cluster, check, (b'warm', 0, 0), 4)
        t0 = time.perf_counter()
        jobs = [cluster.submit(payload, 0, i) for i in range(n)]
        ups = [job() for job in jobs]
        up_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jobs2 = [cluster.submit(None, size, i) for i in range(n)]
        downs = [job() for job in jobs2]
        down_s = time.perf_counter() - t0
    for i, (job, result) in enumerate(zip(jobs, ups)):
        check(result, size, job, 'upload job %d' % i)
    for i, (job, result) in enumerate(zip(jobs2, downs)):
        check(result, transfer(None, size, i), job, 'download job %d' % i)
    total = n * size / MB
    return dict(up_MBps=total / up_s, down_MBps=total / down_s, up_s=up_s, down_s=down_s,
                jobs=n, job_MB=size / MB, **check.summary())


def w4_cpu(ctx, n):
    """n CPU-bound jobs of ~0.5 s each; speedup = n * local single-job time / wall."""
    check = Checker()
    job_seconds = W4_JOB_SECONDS[1 if ctx.quick else 0]
    # calibrate before the cluster exists, so that nothing else runs in this process
    loops = 20000
    for _ in range(20):
        t0 = time.perf_counter()
        burn(loops)
        elapsed = time.perf_counter() - t0
        if elapsed >= 0.1:
            break
        loops *= 4
    loops = max(1, int(loops * job_seconds / elapsed))
    local_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        expected = burn(loops)
        local_times.append(time.perf_counter() - t0)
    local_s = min(local_times)   # the faster local run: a conservative speedup
    with _Closing(_cluster(ctx, burn)) as cluster:
        warm_up(cluster, check, (1,), burn(1))
        t0 = time.perf_counter()
        jobs = [cluster.submit(loops) for _ in range(n)]
        results = [job() for job in jobs]
        wall = time.perf_counter() - t0
    for i, (job, result) in enumerate(zip(jobs, results)):
        check(result, expected, job, 'job %d' % i)
    return dict(speedup=n * local_s / wall, local_s=local_s, wall_s=wall, loops=loops,
                jobs=n, **check.summary())


def w5_cold_start(ctx, n):
    """Time from just before JobCluster(...) to the first job() result (no warm-up)."""
    check = Checker()
    t0 = time.perf_counter()
    cluster = _cluster(ctx, double)
    t1 = time.perf_counter()
    with _Closing(cluster):
        job = cluster.submit(21)
        result = job()
        t2 = time.perf_counter()
        check(result, 42, job, 'first job')
    return dict(first_result_ms=(t2 - t0) * 1000.0, cluster_ms=(t1 - t0) * 1000.0,
                import_ms=ctx.import_ms, **check.summary())


def w6_many_pending(ctx, n):
    """n trivial jobs submitted at once, then collected; client RSS per pending job."""
    check = Checker()
    with _Closing(_cluster(ctx, double)) as cluster:
        warm_up(cluster, check, (-1,), -2)
        gc.collect()
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        jobs = [cluster.submit(i) for i in range(n)]
        t1 = time.perf_counter()
        rss1 = rss_bytes()
        for i, job in enumerate(jobs):
            check(job(), 2 * i, job, 'job %d' % i)
        t2 = time.perf_counter()
        rss2 = rss_bytes()
        del jobs, job
        gc.collect()
        rss3 = rss_bytes()     # measured with the cluster still open
        # jobs that something (e.g. the cluster) still refers to after the drop
        live = sum(1 for o in gc.get_objects() if type(o).__name__ == 'DispyJob')
    grown = rss1 - rss0
    return dict(bytes_per_job=grown / n, jobs=n, jobs_per_s=n / (t2 - t0), submit_s=t1 - t0,
                rss_before_MB=rss0 / MB, rss_after_submit_MB=rss1 / MB,
                rss_after_collect_MB=rss2 / MB, rss_after_drop_MB=rss3 / MB,
                after_drop_bytes_per_job=(rss3 - rss0) / n, live_jobs_after_drop=live,
                returned_fraction=((rss2 - rss3) / (rss2 - rss0)) if rss2 > rss0 else 1.0,
                **check.summary())


def w7_scale(ctx, n):
    """W1 over all of ``ctx.node_addrs`` once every node is set up (the client of W7 and
    of bench/scale.py): n x double(i) submitted, then collected; jobs/s and the peak
    thread count of this process from the cluster's creation to its close."""
    check = Checker()
    peak = ThreadPeak()
    try:
        with _Closing(ready_cluster(ctx, double)) as cluster:
            t0 = time.perf_counter()
            jobs = [cluster.submit(i) for i in range(n)]
            results = [job() for job in jobs]
            wall = time.perf_counter() - t0
    finally:
        peak_threads = peak.stop()
    for i, (job, result) in enumerate(zip(jobs, results)):
        check(result, 2 * i, job, 'job %d' % i)
    return dict(jobs_per_s=n / wall, wall_s=wall, peak_threads=peak_threads,
                peak_thread_names=peak.census(),
                nodes_used=len({job.ip_addr for job in jobs}), nodes=len(ctx.node_addrs),
                jobs=n, **check.summary())


def w8_balance(ctx, n):
    """n x nap(i, base) over a fast and a slow node (``ctx.node_addrs``), all submitted
    at once when both are set up; makespan against the ideal share of the work."""
    check = Checker()
    fast, slow = ctx.node_addrs
    base = W8_BASE
    with _Closing(ready_cluster(ctx, nap)) as cluster:
        t0 = time.perf_counter()
        jobs = [cluster.submit(i, base) for i in range(n)]
        results = [job() for job in jobs]
        makespan = time.perf_counter() - t0
        end_wall = time.time()
    for i, (job, result) in enumerate(zip(jobs, results)):
        check(result, i, job, 'job %d' % i)
    # the ideal: work spread in proportion to the speeds, no gaps, no overhead
    ideal = n / (W8_CPUS / base + W8_CPUS / (W8_SLOWDOWN * base))
    on_fast = [job for job in jobs if job.ip_addr == fast]
    starts = [job.start_time for job in on_fast if job.start_time]
    out = dict(makespan_ratio=makespan / ideal, makespan_s=makespan, ideal_s=ideal,
               jobs_fast=len(on_fast), jobs_slow=sum(1 for j in jobs if j.ip_addr == slow),
               jobs=n, base_s=base, **check.summary())
    if starts:   # node clocks: this machine's, like end_wall
        out['tail_s'] = end_wall - max(starts)
    return out


def warmup_client(ctx, n):
    """Not a workload: creates and closes one cluster so that the node has served a
    client before W5's cold starts are timed."""
    check = Checker()
    with _Closing(_cluster(ctx, double)) as cluster:
        warm_up(cluster, check, (1,), 2)
    return check.summary()


WORKLOADS = {'W1': w1_throughput, 'W2': w2_latency, 'W3': w3_transfer, 'W4': w4_cpu,
             'W5': w5_cold_start, 'W6': w6_many_pending, 'W7': w7_scale, 'W8': w8_balance,
             'warmup': warmup_client,
             # the same clients; _cluster makes a SharedJobCluster (--scheduler-port)
             'W1s': w1_throughput, 'W2s': w2_latency, 'W1m': w1_monitored,
             'W1f': w1_features}


def client_main(args):
    """Entry point of a client process; prints one JSON object on its last line."""
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # the driver's timeout dump
    if args.impl == 'this':
        sys.path.insert(0, args.repo)
    else:   # make sure the installed original is imported, not this repository's
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != args.repo]
    t0 = time.perf_counter()
    import dispy
    import_ms = (time.perf_counter() - t0) * 1000.0
    module = os.path.abspath(dispy.__file__)
    if (os.path.dirname(module) == args.repo) != (args.impl == 'this'):
        raise SystemExit('wrong dispy imported for impl %s: %s' % (args.impl, module))
    if args.run_workload in SHARED and not args.scheduler_port:
        raise SystemExit('%s needs --scheduler-port' % args.run_workload)
    if args.scheduler_port and args.run_workload not in tuple(SHARED) + ('warmup',):
        raise SystemExit('%s takes no --scheduler-port' % args.run_workload)
    ctx = types.SimpleNamespace(dispy=dispy, impl=args.impl, node_port=args.node_port,
                                node_addrs=args.node_addrs.split(','), quick=args.quick,
                                import_ms=import_ms, scheduler_port=args.scheduler_port)
    result = WORKLOADS[args.run_workload](ctx, args.size)
    result['dispy_module'] = module
    sys.stdout.flush()
    print(json.dumps(result))
    sys.stdout.flush()
    return 3 if result.get('bad_results') else 0


# ======================================================================================
# Driver side
# ======================================================================================

def log(args, text):
    if not args.json_only:
        sys.stderr.write('# %s\n' % text)
        sys.stderr.flush()


def emit(obj):
    try:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + '\n')
    except UnicodeEncodeError:     # a non-UTF-8 stdout: same JSON, escaped
        sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()


def _port_free(port, addr='127.0.0.1'):
    """True if TCP and UDP ``port`` can both be bound on ``addr``."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def free_port(also_previous=False, addrs=('127.0.0.1',)):
    """A port free for TCP and UDP on every one of ``addrs`` (loopback addresses), and
    port - 1 too, if asked."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addrs[0], 0))
            port = s.getsockname()[1]
        if all(_port_free(port, a) and (not also_previous or
                                        (port > 1024 and _port_free(port - 1, a)))
               for a in addrs):
            return port
    raise RuntimeError('no free port on %s' % ', '.join(addrs[:3]))


def _load_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None


_PRCTL = _load_prctl()


def _die_with_parent():
    """preexec_fn: the child gets SIGKILL if the driver dies (Linux PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)


def _descendants(pid):
    """PIDs of the live descendants of ``pid`` (through /proc)."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/stat' % entry) as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process(proc, grace=10.0):
    """SIGTERM ``proc``, wait up to ``grace`` s, then SIGKILL it and its descendants."""
    stop_processes([proc], grace)


def stop_processes(procs, grace=10.0):
    """stop_process for many processes at once: SIGTERM to all, one shared wait of at
    most ``grace`` s, then SIGKILL to what is left and to their descendants."""
    procs = [p for p in procs if p is not None]
    kids = {}
    for proc in procs:
        try:
            kids[proc.pid] = _descendants(proc.pid)
        except OSError:
            kids[proc.pid] = []
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        for pid in [proc.pid] + kids[proc.pid]:
            if pid == proc.pid and proc.poll() is not None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Impl:
    """How to run the node and the clients of one implementation."""

    def __init__(self, name, python, label, tree=ROOT):
        self.name = name          # 'this' or 'original'
        self.python = python
        self.label = label        # "impl" value in the JSON lines
        self.tree = tree          # checkout whose dispy.py / dispynode.py 'this' runs

    def node_command(self, port, cpus, dest, addr='127.0.0.1'):
        if self.name == 'this':
            return [self.python, os.path.join(self.tree, 'dispynode.py'), '-i', addr,
                    '-p', str(port), '-c', str(cpus), '--dest_path_prefix', dest, '--daemon']
        # the original: node listens on dispy_port + 1, so give it port - 1.  Its node
        # script is installed beside the interpreter (venv); else '-m' (the node's cwd
        # is its temporary folder, so this repository's dispy.py is not picked up)
        script = os.path.join(os.path.dirname(self.python), 'dispynode.py')
        start = [self.python, script] if os.path.isfile(script) else \
            [self.python, '-m', 'dispy.dispynode']
        return start + ['-i', addr, '-p', str(port - 1), '-c', str(cpus),
                        '--dest_path_prefix', dest, '--daemon']

    def ready_re(self, port, addr='127.0.0.1'):
        if self.name == 'this':
            return re.compile(r'serving at \[?%s\]?:%d\b' % (re.escape(addr), port))
        return re.compile(r'serving \d+ cpus')


class Node:
    """The node process of one implementation, with its temporary folder."""

    def __init__(self, impl, cpus, ready_timeout=20.0, addr='127.0.0.1', port=None,
                 env=None):
        self.impl = impl
        self.cpus = cpus
        self.ready_timeout = ready_timeout
        self.addr = addr
        self.addrs = [addr]    # what its clients are given as nodes
        self.env = env or {}   # added to the node's environment (its workers inherit it)
        self.dir = tempfile.mkdtemp(prefix='dispy-bench-%s-' % impl.name)
        try:
            self.port = port or free_port(also_previous=(impl.name == 'original'),
                                          addrs=(addr,))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.proc = None
        self.out = None
        self.suspect = False   # set when a client run failed without a result

    def start(self):
        self.launch()
        return self.wait_ready(time.monotonic() + self.ready_timeout)

    def launch(self):
        dest = os.path.join(self.dir, 'dest')
        os.makedirs(dest)
        self.out = open(os.path.join(self.dir, 'node.out'), 'w+b')
        env = dict(os.environ, PYTHONUNBUFFERED='1', **self.env)
        self.proc = subprocess.Popen(
            self.impl.node_command(self.port, self.cpus, dest, self.addr),
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
            cwd=self.dir, env=env, start_new_session=True, preexec_fn=_die_with_parent)

    def wait_ready(self, deadline):
        ready = self.impl.ready_re(self.port, self.addr)
        while True:
            if ready.search(self.output()):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError('node %s exited with %s:\n%s' % (
                    self.addr, self.proc.returncode, self.output()[-2000:]))
            if time.monotonic() >= deadline:
                raise RuntimeError('node %s not ready in time:\n%s' % (
                    self.addr, self.output()[-2000:]))
            time.sleep(0.05)

    def output(self):
        if self.out is None:
            return ''
        with open(self.out.name, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def stop(self):
        stop_nodes([self])


def stop_nodes(nodes, grace=10.0):
    """Stops the nodes' processes (all at once, by PID) and removes their folders."""
    stop_processes([n.proc for n in nodes], grace)
    for n in nodes:
        if n.out:
            n.out.close()
        shutil.rmtree(n.dir, ignore_errors=True)


class NodeSet:
    """Several nodes of one implementation on one port, each on its own loopback
    address, started together and stopped together (by PID); a client of the set is
    given all of their addresses."""

    def __init__(self, impl, specs, ready_timeout=60.0):
        """``specs``: (address, cpus, extra environment or None) per node."""
        self.impl = impl
        self.specs = specs
        self.ready_timeout = ready_timeout
        self.addrs = [addr for addr, _, _ in specs]
        self.port = None
        self.nodes = []
        self.suspect = False

    def start(self):
        self.port = free_port(also_previous=(self.impl.name == 'original'),
                              addrs=self.addrs)
        try:
            for addr, cpus, env in self.specs:
                self.nodes.append(Node(self.impl, cpus, addr=addr, port=self.port, env=env))
                self.nodes[-1].launch()
            deadline = time.monotonic() + self.ready_timeout
            for node in self.nodes:
                node.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        self.suspect = False
        return self

    def output(self):
        """The end of every node's output, for error messages."""
        return ''.join('[%s] %s\n' % (n.addr, n.output()[-300:]) for n in self.nodes)

    def stop(self):
        nodes, self.nodes = self.nodes, []
        stop_nodes(nodes)


class Scheduler:
    """A ``dispyscheduler.py`` process of ``impl``'s tree serving programs on
    SCHEDULER_ADDR, using only the nodes it is given (``-n``, so it dials them and never
    broadcasts; ``--client_port 0``: no announcement port), with a temporary folder of
    its own; stopped by PID."""

    def __init__(self, impl, node_addrs, node_port, ready_timeout=20.0):
        self.impl = impl
        self.node_addrs = list(node_addrs)
        self.node_port = node_port
        self.ready_timeout = ready_timeout
        self.dir = tempfile.mkdtemp(prefix='dispy-bench-scheduler-')
        self.port = None
        self.proc = None
        self.out = None

    def command(self, port, dest):
        cmd = [self.impl.python, os.path.join(self.impl.tree, 'dispyscheduler.py'),
               '-i', SCHEDULER_ADDR, '-p', str(port), '--client_port', '0']
        for addr in self.node_addrs:
            cmd += ['-n', addr]
        return cmd + ['--node_port', str(self.node_port), '--daemon',
                      '--dest_path_prefix', dest]

    def start(self):
        port = free_port(addrs=(SCHEDULER_ADDR,))
        dest = os.path.join(self.dir, 'dest')
        os.makedirs(dest)
        self.out = open(os.path.join(self.dir, 'scheduler.out'), 'w+b')
        self.proc = subprocess.Popen(
            self.command(port, dest), stdin=subprocess.DEVNULL, stdout=self.out,
            stderr=subprocess.STDOUT, cwd=self.dir, env=dict(os.environ, PYTHONUNBUFFERED='1'),
            start_new_session=True, preexec_fn=_die_with_parent)
        # its stderr line once it listens (the port it reports is the one it bound)
        ready = re.compile(r'dispyscheduler serving at \[?%s\]?:(\d+)\b'
                           % re.escape(SCHEDULER_ADDR))
        deadline = time.monotonic() + self.ready_timeout
        while True:
            found = ready.search(self.output())
            if found:
                self.port = int(found.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError('dispyscheduler exited with %s:\n%s' % (
                    self.proc.returncode, self.output()[-2000:]))
            if time.monotonic() >= deadline:
                raise RuntimeError('dispyscheduler not ready in %ss:\n%s' % (
                    self.ready_timeout, self.output()[-2000:]))
            time.sleep(0.05)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def output(self):
        if self.out is None:
            return ''
        with open(self.out.name, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def stop(self, grace=10.0):
        stop_processes([self.proc], grace)
        self.proc = None
        if self.out:
            self.out.close()
            self.out = None
        shutil.rmtree(self.dir, ignore_errors=True)


class SharedSetup:
    """W1s / W2s: a node on SHARED_NODE with ``cpus`` CPUs (as W1's node) and a
    dispyscheduler that uses it, started and stopped together (the scheduler first);
    to ``run_client`` it is a node with a ``scheduler_port``."""

    def __init__(self, impl, cpus):
        self.impl = impl
        self.nodes = NodeSet(impl, [(SHARED_NODE, cpus, None)], ready_timeout=20.0)
        self.addrs = self.nodes.addrs
        self.scheduler = None
        self.suspect = False

    @property
    def port(self):            # the node's: what SharedJobCluster's node_port names
        return self.nodes.port

    @property
    def scheduler_port(self):
        return self.scheduler.port if self.scheduler else None

    def start(self):
        try:
            self.nodes.start()
            self.scheduler = Scheduler(self.impl, self.addrs, self.nodes.port)
            self.scheduler.start()
        except BaseException:
            self.stop()
            raise
        self.suspect = False
        return self

    def alive(self):
        return (self.scheduler is not None and self.scheduler.alive() and
                all(n.proc.poll() is None for n in self.nodes.nodes))

    def output(self):
        return '%s[dispyscheduler] %s\n' % (
            self.nodes.output(), self.scheduler.output()[-600:] if self.scheduler else '')

    def stop(self):
        scheduler, self.scheduler = self.scheduler, None
        try:
            if scheduler is not None:
                scheduler.stop()
        finally:
            self.nodes.stop()


def run_client(args, impl, node, workload, size):
    """Runs one workload in a fresh client process; returns (result dict, error)."""
    cwd = tempfile.mkdtemp(prefix='dispy-bench-client-')   # recover files etc. land here
    cmd = [impl.python, BENCH_FILE, '--run-workload', workload, '--impl', impl.name,
           '--node-port', str(node.port), '--node-addrs', ','.join(node.addrs),
           '--size', str(size), '--repo', impl.tree]
    if getattr(node, 'scheduler_port', None):    # W1s / W2s: through the scheduler
        cmd += ['--scheduler-port', str(node.scheduler_port)]
    if args.quick:
        cmd.append('--quick')
    proc = None
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_die_with_parent)
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            try:
                proc.send_signal(signal.SIGUSR1)   # the client dumps its threads' stacks
                out, err = proc.communicate(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
            stop_process(proc, grace=2.0)
            out, err = proc.communicate()
            return None, 'timeout after %ss; client stderr: %s; node output: %s' % (
                args.timeout, _tail(err, 2500), node.output()[-600:])
        result = None
        lines = [l for l in out.decode('utf-8', 'replace').splitlines() if l.strip()]
        if lines:
            try:
                result = json.loads(lines[-1])
            except ValueError:
                result = None
        if proc.returncode != 0 or result is None:
            why = 'client exited with %s' % proc.returncode
            if result and result.get('bad_results'):
                why = '%d wrong results (first: %s)' % (result['bad_results'],
                                                        result.get('first_bad'))
            tail = _tail(err)
            return result, ('%s; stderr: %s' % (why, tail)) if tail else why
        return result, None
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc, grace=2.0)
        shutil.rmtree(cwd, ignore_errors=True)


def _tail(data, n=1500):
    text = data.decode('utf-8', 'replace').strip() if data else ''
    return text[-n:]


def _num(x):
    if isinstance(x, float):
        return float('%.5g' % x)
    return x


def aggregate(workload, impl, runs, errors, size, args):
    """The JSON lines of one workload from its runs' result dicts."""
    lines = []
    for line_id, key, unit, cmp_, target, extras, *listed in FIGURES[workload]:
        values = [r[key] for r in runs if r and isinstance(r.get(key), (int, float))]
        line = {'workload': line_id, 'unit': unit}
        if values:
            med = statistics.median(values)
            line.update(median=_num(med), min=_num(min(values)), max=_num(max(values)))
        else:
            line.update(median=None, min=None, max=None)
        line.update(runs=[_num(v) for v in values], target='%s %s' % (SIGN[cmp_], target),
                    impl=impl.label)
        for extra in extras:
            xs = [r[extra] for r in runs if r and isinstance(r.get(extra), (int, float))]
            if xs:
                med = statistics.median(xs)
                if all(isinstance(x, int) for x in xs) and med == int(med):
                    med = int(med)
                line[extra] = _num(med)
        for extra in (listed[0] if listed else ()):
            line[extra + '_runs'] = [_num(r.get(extra)) for r in runs if r]
        met = bool(values) and not errors and (
            line['median'] >= target if cmp_ == '>=' else line['median'] <= target)
        line['met'] = met
        line['size'] = size
        if args.quick:
            line['quick'] = True
        if errors:
            line['error'] = '; '.join(errors)[:3000]
        lines.append(line)
    return lines


def start_node(args, impl):
    """A new node of ``impl``, already used once by a throwaway client process (so that
    W5 times a fresh client against a node that is running and has served a client
    before); returns (node, None) or (None, error)."""
    node = Node(impl, args.cpus)
    try:
        log(args, '%s: starting node on 127.0.0.1:%d' % (impl.label, node.port))
        node.start()
        result, error = run_client(args, impl, node, 'warmup', 1)
        if error:
            log(args, '%s: warm-up client failed: %s' % (impl.label, error))
        return node, None
    except Exception as exc:
        node.stop()
        return None, 'node did not start: %s' % exc
    except BaseException:
        node.stop()
        raise


def bench_impl(args, impl, workloads):
    """Runs the workloads of ``impl`` against its node (or, W7 and W8, their own
    nodes); returns the JSON lines."""
    all_lines = []
    node = node_error = None

    def direct_node():
        """The 127.0.0.1 node: started when first needed, replaced if the previous
        client was killed or crashed (it may still hold the node); (node, error)."""
        nonlocal node, node_error
        if node is not None and node.suspect:
            node.stop()
            node, node_error = start_node(args, impl)
        elif node is None and node_error is None:
            node, node_error = start_node(args, impl)
        return node, node_error

    try:
        for w in workloads:
            size = _size(w, args)
            if w in SHARED:
                if impl.name == 'original' and w in ORIGINAL_SKIPS:
                    log(args, '%s: %s skipped (not run for the original)' % (impl.label, w))
                    continue
                if not os.path.isfile(os.path.join(impl.tree, 'dispyscheduler.py')):
                    log(args, '%s: %s skipped (no dispyscheduler.py in %s)' % (
                        impl.label, w, impl.tree))
                    continue
                runs, errors = bench_shared(args, impl, w, size, direct_node)
                for line in aggregate(w, impl, runs, errors, size, args):
                    emit(line)
                    all_lines.append(line)
                continue
            if w in MULTI_NODE:
                if impl.name == 'original' and w in ORIGINAL_SKIPS:
                    log(args, '%s: %s skipped (not run for the original)' % (impl.label, w))
                    continue
                runs, errors = bench_multi(args, impl, w, size)
                for line in aggregate(w, impl, runs, errors, size, args):
                    emit(line)
                    all_lines.append(line)
                continue
            if w == 'W1m' and (impl.name == 'original' or not os.path.isfile(
                    os.path.join(impl.tree, 'dispyhttpd.py'))):
                log(args, '%s: W1m skipped (no web monitor, dispyhttpd.py, in %s)' % (
                    impl.label, impl.tree))
                continue
            runs, errors = [], []
            for i in range(args.runs):
                direct_node()
                if node is None:
                    errors.append('run %d: %s' % (i + 1, node_error))
                    continue
                t0 = time.monotonic()
                result, error = run_client(args, impl, node, w, size)
                runs.append(result)
                if error:
                    errors.append('run %d: %s' % (i + 1, error))
                shown = ', '.join('%s=%s' % (f[1], _num(result.get(f[1])))
                                  for f in FIGURES[w]) if result else ''
                log(args, '%s %s run %d/%d (%.1f s): %s%s' % (
                    impl.label, w, i + 1, args.runs, time.monotonic() - t0, shown,
                    (' ERROR ' + error[:300]) if error else ''))
                node.suspect = result is None
            for line in aggregate(w, impl, runs, errors, size, args):
                emit(line)
                all_lines.append(line)
    finally:
        if node is not None:
            node.stop()
    return all_lines


def _size(workload, args):
    return SIZES[workload][1 if args.quick else 0]


def w7_addrs(count=W7_NODES):
    """127.0.0.11, 127.0.0.12, ...: the addresses of W7's (and bench/scale.py's) nodes."""
    if not 1 <= count <= 255 - W7_FIRST_ADDR:
        raise ValueError('1 to %d nodes' % (255 - W7_FIRST_ADDR))
    return ['127.0.0.%d' % (W7_FIRST_ADDR + i) for i in range(count)]


def multi_setups(impl, workload):
    """(name, NodeSet) of each setup a run of W7 / W8 uses (not started yet)."""
    if workload == 'W7':
        addrs = w7_addrs()
        return [('48', NodeSet(impl, [(a, 1, None) for a in addrs])),
                ('1', NodeSet(impl, [(addrs[0], 2, None)]))]
    slowdown = {'DISPY_BENCH_SLOWDOWN': '1'}, {'DISPY_BENCH_SLOWDOWN': str(W8_SLOWDOWN)}
    return [('', NodeSet(impl, [(W8_FAST, W8_CPUS, slowdown[0]),
                                (W8_SLOW, W8_CPUS, slowdown[1])]))]


def restarted(setup, run_errors, what):
    """Stops and starts a bench setup (nodes, a scheduler) again; False, with the
    error noted, if it does not start."""
    setup.stop()
    try:
        setup.start()
    except Exception as exc:
        run_errors.append('%s did not start: %s' % (what, exc))
        return False
    return True


def combine_runs(workload, parts):
    """The result dict of one W7 / W8 run from its clients' results (setup -> dict)."""
    if workload != 'W7':
        return parts.get('')
    many, one = parts.get('48'), parts.get('1')
    out = {}
    for name, part in (('48', many), ('1', one)):
        for key in ('jobs_per_s', 'wall_s', 'peak_threads', 'peak_thread_names',
                    'nodes_used'):
            if part and key in part:
                out['%s_%s' % (key, name)] = part[key]
        if part:
            out['jobs'] = part.get('jobs')
    if many:
        out['nodes'] = many.get('nodes')
    if many and one:
        out['ratio'] = many['jobs_per_s'] / one['jobs_per_s']
        out['thread_diff'] = many['peak_threads'] - one['peak_threads']
    return out or None


def bench_multi(args, impl, workload, size):
    """W7 / W8: starts the workload's node sets (all of them, for all its runs); each
    run is one fresh client per setup, the order of the setups alternating from run to
    run; returns (runs, errors) for ``aggregate``.  The nodes are stopped at the end,
    also after an error or an interrupt."""
    setups = multi_setups(impl, workload)
    runs, errors = [], []
    warm_size = {'W7': 4 * W7_NODES, 'W8': 10}[workload]
    try:
        for name, nodes in setups:
            log(args, '%s %s: starting %d node(s) on %s%s' % (
                impl.label, workload, len(nodes.addrs), nodes.addrs[0],
                ' ... %s' % nodes.addrs[-1] if len(nodes.addrs) > 1 else ''))
            try:
                nodes.start()
            except Exception as exc:
                return runs, ['nodes did not start: %s' % exc]
            # a throwaway client first, as for the single node (start_node)
            result, error = run_client(args, impl, nodes, workload, warm_size)
            if error:
                log(args, '%s %s: warm-up client failed: %s' % (impl.label, workload,
                                                                error[:500]))
            nodes.suspect = result is None
        for i in range(args.runs):
            parts, run_errors, t0 = {}, [], time.monotonic()
            for name, nodes in (setups if i % 2 == 0 else setups[::-1]):
                if nodes.suspect and not restarted(nodes, run_errors, 'nodes'):
                    continue        # a client was killed or crashed: fresh nodes, or none
                result, error = run_client(args, impl, nodes, workload, size)
                nodes.suspect = result is None
                parts[name] = result
                if error:
                    run_errors.append(('%s node(s): %s' % (len(nodes.addrs), error))
                                      if name else error)
            combined = combine_runs(workload, parts)
            runs.append(combined)
            errors.extend('run %d: %s' % (i + 1, e) for e in run_errors)
            shown = ', '.join('%s=%s' % (k, _num(combined[k])) for k in (
                'ratio', 'jobs_per_s_48', 'jobs_per_s_1', 'thread_diff', 'peak_threads_48',
                'peak_threads_1', 'makespan_ratio', 'makespan_s', 'jobs_fast', 'jobs_slow',
                'tail_s') if combined and k in combined)
            log(args, '%s %s run %d/%d (%.1f s): %s%s' % (
                impl.label, workload, i + 1, args.runs, time.monotonic() - t0, shown,
                (' ERROR ' + '; '.join(run_errors)[:300]) if run_errors else ''))
    finally:
        for _, nodes in setups:
            nodes.stop()
    return runs, errors


def combine_shared(workload, parts):
    """The result dict of one W1s / W2s run from its two clients' results: the one
    through the scheduler's keys, the direct one's figures as '<key>_direct', and
    ``ratio``, the scheduler's speed over the direct one's: jobs/s through / jobs/s
    direct (W1s), latency direct / latency through (W2s; ``slowdown`` is its inverse)."""
    shared, direct = parts.get('shared'), parts.get('direct')
    out = dict(shared) if shared else {}
    key = FIGURES[SHARED[workload]][0][1]         # jobs_per_s, median_ms
    if direct:
        for k in (key, 'wall_s', 'p90_ms', 'mean_ms'):
            if k in direct:
                out[k + '_direct'] = direct[k]
    if shared and direct and shared.get(key) and direct.get(key):
        if key == 'jobs_per_s':
            out['ratio'] = shared[key] / direct[key]
        else:
            out['ratio'] = direct[key] / shared[key]
            out['slowdown'] = shared[key] / direct[key]
    return out or None


def bench_shared(args, impl, workload, size, direct_node):
    """W1s / W2s: starts the scheduler's setup (SharedSetup), then every run is a pair
    of fresh clients one right after the other, the direct workload (W1 / W2) on the
    127.0.0.1 node from ``direct_node()`` and the same workload through the scheduler,
    the order alternating from run to run; returns (runs, errors) for ``aggregate``.
    The scheduler and its node are stopped at the end, also after an error or an
    interrupt."""
    base = SHARED[workload]
    setup = SharedSetup(impl, args.cpus)
    runs, errors = [], []
    try:
        log(args, '%s %s: starting a node on %s and dispyscheduler on %s' % (
            impl.label, workload, SHARED_NODE, SCHEDULER_ADDR))
        try:
            setup.start()
        except Exception as exc:
            return runs, ['scheduler or its node did not start: %s' % exc]
        # a throwaway client first, as for the single node (start_node)
        result, error = run_client(args, impl, setup, 'warmup', 1)
        if error:
            log(args, '%s %s: warm-up client failed: %s' % (impl.label, workload, error[:500]))
        setup.suspect = result is None
        for i in range(args.runs):
            parts, run_errors, t0 = {}, [], time.monotonic()
            for side in (('direct', 'shared') if i % 2 == 0 else ('shared', 'direct')):
                if side == 'direct':
                    node, node_error = direct_node()
                    if node is None:
                        run_errors.append('direct: %s' % node_error)
                        continue
                    result, error = run_client(args, impl, node, base, size)
                    node.suspect = result is None
                else:
                    if ((setup.suspect or not setup.alive())     # fresh scheduler and node
                            and not restarted(setup, run_errors, 'scheduler')):
                        continue
                    result, error = run_client(args, impl, setup, workload, size)
                    setup.suspect = result is None
                parts[side] = result
                if error:
                    run_errors.append('%s: %s' % (side, error))
            combined = combine_shared(workload, parts)
            runs.append(combined)
            errors.extend('run %d: %s' % (i + 1, e) for e in run_errors)
            shown = ', '.join('%s=%s' % (k, _num(combined[k])) for k in (
                'jobs_per_s', 'jobs_per_s_direct', 'median_ms', 'median_ms_direct',
                'ratio') if combined and k in combined)
            log(args, '%s %s run %d/%d (%.1f s): %s%s' % (
                impl.label, workload, i + 1, args.runs, time.monotonic() - t0, shown,
                (' ERROR ' + '; '.join(run_errors)[:300]) if run_errors else ''))
    finally:
        setup.stop()
    return runs, errors


def ratio_lines(this_lines, orig_lines, other_name='original'):
    """this / other per figure; 'this_better' reads the direction of the target."""
    out = []
    orig = {l['workload']: l for l in orig_lines}
    for line in this_lines:
        other = orig.get(line['workload'])
        if not other:
            continue
        a, b = line.get('median'), other.get('median')
        higher = line['target'].startswith(SIGN['>='])
        entry = {'workload': line['workload'], 'impl': 'ratio', 'unit': line['unit'],
                 'this': a, other_name: b, 'higher_is_better': higher}
        if a is not None and b:
            entry['ratio'] = _num(a / b)    # this / other
            entry['this_better'] = (a > b) if higher else (a < b)
        else:
            entry['ratio'] = None
        if line.get('error') or other.get('error'):
            entry['note'] = 'a side had errors; see its line'
        out.append(entry)
    return out


def print_summary(lines):
    sys.stdout.write('# %-10s %-14s %12s %12s %12s  %-10s %s\n' % (
        'figure', 'impl', 'median', 'min', 'max', 'target', 'status'))
    for l in lines:
        if l.get('impl') == 'ratio':
            sys.stdout.write('# %-10s %-14s %12s  (this/original%s)\n' % (
                l['workload'], 'ratio', l.get('ratio'),
                '' if l.get('ratio') is None else
                ', this better' if l.get('this_better') else ', original better'))
            continue
        status = 'ERROR' if l.get('error') else ('met' if l.get('met') else 'MISSED')
        sys.stdout.write('# %-10s %-14s %12s %12s %12s  %-10s %s %s\n' % (
            l['workload'], l['impl'], l['median'], l['min'], l['max'], l['target'],
            status, l['unit']))
    sys.stdout.flush()


def check_loopback_only():
    """Refuses to go on unless this process is in its own network namespace whose only
    interface is lo."""
    names = sorted(name for _, name in socket.if_nameindex())
    if names != ['lo']:
        raise SystemExit('refusing to run the original dispy: interfaces here are %s, '
                         'expected only lo' % names)
    try:
        if os.stat('/proc/self/ns/net').st_ino == os.stat('/proc/1/ns/net').st_ino:
            raise SystemExit('refusing to run the original dispy: not in a new network '
                             'namespace')
    except OSError:
        pass


def bring_up_lo():
    ip = shutil.which('ip') or next((p for p in ('/usr/sbin/ip', '/sbin/ip', '/bin/ip')
                                     if os.path.exists(p)), None)
    if not ip:
        raise SystemExit('"ip" (iproute2) is needed to bring up lo in the namespace')
    subprocess.run([ip, 'link', 'set', 'lo', 'up'], check=True, timeout=10)


def _interpreter(python):
    """PYTHON as given to --original: a path, or a command name found on PATH (not
    resolved through symlinks: a venv's bin/python must stay the venv's)."""
    if os.sep not in python:
        found = shutil.which(python)
        if not found:
            raise SystemExit('--original: %s not found on PATH' % python)
        return found
    if not os.path.isfile(python):
        raise SystemExit('--original: no such interpreter: %s' % python)
    return os.path.abspath(python)


def reexec_in_netns(args):
    """Runs this driver again inside ``unshare -n``; relays its exit status."""
    if os.geteuid() != 0:
        raise SystemExit('--original needs root (unshare -n)')
    unshare = shutil.which('unshare')
    if not unshare:
        raise SystemExit('--original needs unshare (util-linux)')
    cmd = [unshare, '-n', sys.executable, BENCH_FILE] + sys.argv[1:] + ['--inside-netns']
    pairs = ('W7',) + tuple(SHARED)     # a run of these is two client processes
    n_clients = (sum(2 if w in pairs else 1 for w in args.workloads) * args.runs + 1) * 2
    bound = n_clients * (args.timeout + 30) + 300
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        return proc.wait(bound)
    except subprocess.TimeoutExpired:
        sys.stderr.write('# inner driver exceeded %ss; stopping it\n' % bound)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if proc.poll() is None:
            stop_process(proc, grace=60.0)


def _interrupt(signum, frame):
    """First SIGINT/SIGTERM: interrupt the driver; later ones are ignored so that the
    cleanup (stopping processes, removing folders) runs to its end."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt('signal %d' % signum)


def driver_main(args):
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt)
    unknown = [w for w in args.workloads if w not in FIGURES]
    if unknown:
        raise SystemExit('unknown workloads: %s (known: %s)' % (unknown, ', '.join(FIGURES)))
    if args.original and not args.inside_netns:
        _interpreter(args.original)      # fail early, before the namespace
        return reexec_in_netns(args)
    impls = [Impl('this', sys.executable, 'this')]
    if args.compare:    # another checkout, right after this one, same workloads
        tree = os.path.abspath(args.compare)
        if not os.path.isfile(os.path.join(tree, 'dispynode.py')):
            raise SystemExit('no dispynode.py in %s' % tree)
        impls.append(Impl('this', sys.executable, 'before', tree=tree))
    if args.original:
        bring_up_lo()
        check_loopback_only()
        impls.append(Impl('original', _interpreter(args.original), ORIGINAL_NAME))
    elif not os.path.isfile(os.path.join(ROOT, 'dispynode.py')):
        raise SystemExit('no dispynode.py in %s' % ROOT)
    results = {}
    try:
        for impl in impls:
            results[impl.label] = bench_impl(args, impl, args.workloads)
        lines = [line for impl in impls for line in results[impl.label]]
        for other in [impl.label for impl in impls[1:]]:
            ratios = ratio_lines(results['this'], results[other],
                                 'original' if other == ORIGINAL_NAME else other)
            for r in ratios:
                emit(r)
            lines += ratios
    except KeyboardInterrupt:
        sys.stderr.write('# interrupted\n')
        return 130
    if not args.json_only:
        print_summary(lines)
    bad = [l for l in lines if l.get('error')]
    if bad:
        return 1
    if args.check_targets and any(not l['met'] for l in lines if l.get('impl') == 'this'):
        return 2
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Benchmark the dispy reimplementation (loopback nodes only); '
                    'prints one JSON line per workload figure.')
    p.add_argument('--workloads', default=','.join(FIGURES),
                   help='comma-separated subset of %s (default: all)' % ','.join(FIGURES))
    p.add_argument('--runs', type=int, default=3, help='fresh client processes per workload')
    p.add_argument('--cpus', type=int, default=2, help='CPUs of the node (default 2)')
    p.add_argument('--quick', action='store_true', help='scaled-down sizes (smoke test)')
    p.add_argument('--compare', metavar='DIR',
                   help='also run the same workloads on the checkout in DIR (labelled '
                        '"before"), right after this one, and print ratios')
    p.add_argument('--original', metavar='PYTHON',
                   help='also run dispy 4.15.2 installed for interpreter PYTHON, in a '
                        'loopback-only network namespace (needs root and unshare)')
    p.add_argument('--json-only', action='store_true',
                   help='print only the JSON lines (no progress, no summary)')
    p.add_argument('--timeout', type=float, default=300.0,
                   help='seconds before a client process is killed (default 300)')
    p.add_argument('--check-targets', action='store_true',
                   help='exit 2 if a figure of this implementation misses its target')
    # internal: the client side and the namespace re-execution
    p.add_argument('--run-workload', help=argparse.SUPPRESS)
    p.add_argument('--impl', default='this', choices=('this', 'original'),
                   help=argparse.SUPPRESS)
    p.add_argument('--node-port', type=int, help=argparse.SUPPRESS)
    p.add_argument('--node-addrs', default='127.0.0.1', help=argparse.SUPPRESS)
    p.add_argument('--scheduler-port', type=int, help=argparse.SUPPRESS)
    p.add_argument('--size', type=int, help=argparse.SUPPRESS)
    p.add_argument('--repo', default=ROOT, help=argparse.SUPPRESS)
    p.add_argument('--inside-netns', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = {w.upper(): w for w in FIGURES}       # case-insensitive: w1s -> W1s
    args.workloads = [known.get(w.strip().upper(), w.strip())
                      for w in args.workloads.split(',') if w.strip()]
    if args.runs < 1:
        p.error('--runs must be at least 1')
    return args


def main():
    args = parse_args()
    if args.run_workload:
        return client_main(args)
    return driver_main(args)


if __name__ == '__main__':
    sys.exit(main())
