#!/usr/bin/env python3
"""W10: dispycos remote tasks and messages, against the issue's targets.

    python3 bench/dispycos_bench.py [--rounds 3] [--quick]

Process layout: this driver starts one ``dispycosnode.py -i 127.0.0.41 -c 2`` (its
own ports, a temporary dest_path), then for each round a fresh client process
(``--client``) with a private ``Scheduler()`` on 127.0.0.1 that waits for both
servers and times, in order:

    seq_run_result  ``yield computation.run_result(trivial)``, one after the other
    run_results     100 trivial tasks through ``run_results`` (CPU-bound tasks: one at
                    a time per server, so bound by the round trip), tasks/s
    pipelined       100 trivial tasks in flight at once: 100 client tasks, each
                    ``run_async`` then ``rtask.finish()``, tasks/s
    round_trip      a client task ↔ remote task message exchange (send, receive)
    one_way         ``rtask.send(i)`` in a loop, until the remote task counted all

Each figure is one JSON line per round, then a summary line per case with the
median and its ratio to pycos 4.12.2's figure on this machine (from the issue) and
to the target.  Loopback only; every wait bounded; the node is stopped by PID.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_IP = '127.0.0.41'
CLIENT_IP = '127.0.0.1'

# case: (unit, pycos 4.12.2 here, target, higher is better)
CASES = {
    'seq_run_result': ('ms', 13.6, 2.0, False),
    'pipelined': ('tasks/s', 862, 5000, True),
    'run_results': ('tasks/s', 862, 5000, True),
    'round_trip': ('ms', 0.72, 0.4, False),
    'one_way': ('msg/s', 6950, 50000, True),
}


def free_port_pair():
    """A UDP+TCP port for the node with the next two TCP ports free for servers."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((NODE_IP, 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        ok = True
        for p in (port, port + 1, port + 2):
            with socket.socket() as s:
                try:
                    s.bind((NODE_IP, p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError('no free ports')


# ================================================================================
# The client (a fresh process per round)
# ================================================================================

def client_main(node_port, quick):
    sys.path.insert(0, ROOT)
    import dispycos as pycos
    from dispycos import Computation, Scheduler

    def trivial(x, task=None):
        return x
        yield

    def echo(task=None):
        while True:
            msg = yield task.receive()
            if msg is None:
                return 0
            msg[0].send(msg[1])

    def counter(n, reply_to, task=None):
        for _ in range(n):
            yield task.receive()
        reply_to.send(n)

    n_seq = 50 if quick else 300
    n_rt = 200 if quick else 2000
    n_one = 5000 if quick else 50000
    out = {}

    def client(computation, task=None):
        if (yield computation.schedule()) != 0:
            raise RuntimeError('schedule failed')
        for _ in range(400):                # both servers ready (bounded: 20 s)
            servers = yield computation.servers()
            if isinstance(servers, list) and len(servers) >= 2:
                break
            yield task.sleep(0.05)
        for i in range(20):                 # warm-up
            yield computation.run_result(trivial, i)
        start = time.perf_counter()
        for i in range(n_seq):
            value = yield computation.run_result(trivial, i)
            assert value == i, value
        out['seq_run_result'] = (time.perf_counter() - start) / n_seq * 1e3
        start = time.perf_counter()
        values = yield computation.run_results(trivial, list(range(100)))
        out['run_results'] = 100 / (time.perf_counter() - start)
        assert values == list(range(100)), values
        def one(i, task=None):
            rtask = yield computation.run_async(trivial, i)
            return (yield rtask.finish())
        start = time.perf_counter()
        waiters = [pycos.Task(one, i) for i in range(100)]
        values = []
        for waiter in waiters:
            values.append((yield waiter.finish()))
        out['pipelined'] = 100 / (time.perf_counter() - start)
        assert values == list(range(100)), values
        rtask = yield computation.run_async(echo)
        for i in range(50):
            rtask.send((task, i))
            yield task.receive()
        start = time.perf_counter()
        for i in range(n_rt):
            rtask.send((task, i))
            got = yield task.receive()
            assert got == i
        out['round_trip'] = (time.perf_counter() - start) / n_rt * 1e3
        rtask.send(None)
        rtask = yield computation.run_async(counter, n_one, task)
        start = time.perf_counter()
        for i in range(n_one):
            rtask.send(i)
            if i % 1000 == 999:
                yield task.sleep(0)         # let the runner flush now and then
        count = yield task.receive(timeout=60)
        out['one_way'] = n_one / (time.perf_counter() - start)
        assert count == n_one, count
        yield computation.close()

    pycos.Pycos(node=CLIENT_IP)
    os.environ['DISPYCOS_PEERS'] = '%s:%d' % (NODE_IP, node_port)
    Scheduler()
    computation = Computation([trivial, echo, counter])
    task = pycos.Task(client, computation)
    task.value(timeout=180)
    print(json.dumps(out))


# ================================================================================
# The driver
# ================================================================================

def start_node(port, tmp):
    cmd = [sys.executable, os.path.join(ROOT, 'dispycosnode.py'), '-i', NODE_IP, '-c', '2',
           '-u', str(port), '--dest_path', tmp, '--daemon']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            break
        if 'servers at' in line:
            return proc
    stop(proc)
    raise RuntimeError('node did not start')


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--client', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        client_main(args.client, args.quick)
        return
    tmp = tempfile.mkdtemp(prefix='dispycos-bench-')
    port = free_port_pair()
    node = start_node(port, tmp)
    results = {case: [] for case in CASES}
    try:
        for rnd in range(args.rounds):
            cmd = [sys.executable, os.path.abspath(__file__), '--client', str(port)]
            if args.quick:
                cmd.append('--quick')
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError('client failed:\n%s%s' % (proc.stdout, proc.stderr[-3000:]))
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            for case, value in figures.items():
                results[case].append(value)
                print(json.dumps({'bench': 'W10', 'case': case, 'round': rnd,
                                  'value': round(value, 4), 'unit': CASES[case][0]}),
                      flush=True)
    finally:
        stop(node)
        shutil.rmtree(tmp, ignore_errors=True)
    for case, values in results.items():
        unit, pycos, target, higher = CASES[case]
        median = statistics.median(values)
        print(json.dumps({
            'bench': 'W10', 'case': case, 'summary': True, 'median': round(median, 4),
            'min': round(min(values), 4), 'max': round(max(values), 4), 'unit': unit,
            'pycos_4_12': pycos, 'target': target,
            'speedup_vs_pycos': round(median / pycos if higher else pycos / median, 2),
            'meets_target': median >= target if higher else median <= target}), flush=True)


if __name__ == '__main__':
    main()
