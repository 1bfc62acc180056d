#!/usr/bin/env python3
"""W1 (many tiny jobs) over many loopback nodes, and the client's peak thread count.

    python3 bench/scale.py --nodes 48 --cpus 1          # this tree
    python3 bench/scale.py --tree /tmp/old --nodes 48   # another checkout, to compare

Starts ``--nodes`` dispynode processes of the tree on 127.0.0.2, 127.0.0.3, ... (one
port), then for each of ``--runs`` fresh client processes: a JobCluster over all of
them, a wait until every node is set up, ``--jobs`` jobs of ``double(i)`` submitted and
collected (timed), and the peak of ``threading.active_count()`` sampled every 2 ms
from the cluster's creation to its close.  Prints one JSON line per run and one with
the medians.  Only loopback addresses are used; the nodes are stopped by PID at the
end, also after an error.
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

HERE = os.path.dirname(os.path.abspath(__file__))

CLIENT = r'''
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import dispy

def double(n):
    return 2 * n

addrs, port, jobs = sys.argv[2].split(','), int(sys.argv[3]), int(sys.argv[4])
peak = [threading.active_count()]
done = threading.Event()

def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], threading.active_count())

threading.Thread(target=sample, daemon=True).start()
ready = threading.Semaphore(0)

def status(state, node, job):
    if state == dispy.DispyNode.Initialized:
        ready.release()

cluster = dispy.JobCluster(double, nodes=addrs, ip_addr='127.0.0.1', port=0,
                           node_port=port, cluster_status=status)
deadline = time.monotonic() + 60
for _ in addrs:
    if not ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
        sys.exit('not every node was set up in 60 s')
t0 = time.perf_counter()
submitted = [cluster.submit(i) for i in range(jobs)]
bad = sum(1 for i, job in enumerate(submitted) if job() != 2 * i)
wall = time.perf_counter() - t0
used = len({job.ip_addr for job in submitted})
cluster.close()
done.set()
print(json.dumps({'jobs_per_s': round(jobs / wall, 1), 'wall_s': round(wall, 3),
                  'peak_threads': peak[0], 'nodes_used': used, 'bad_results': bad}))
'''


def free_port(addr):
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind((addr, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((addr, port))
            except OSError:
                continue
            return port
    raise RuntimeError('no free port')


def start_nodes(tree, addrs, port, cpus, folder):
    procs = []
    for addr in addrs:
        dest = os.path.join(folder, addr)
        os.makedirs(dest)
        log = open(os.path.join(dest, 'node.log'), 'wb')
        procs.append((subprocess.Popen(
            [sys.executable, os.path.join(tree, 'dispynode.py'), '-i', addr, '-p', str(port),
             '-c', str(cpus), '--dest_path_prefix', dest, '--daemon'],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True), log))
    deadline = time.monotonic() + 60
    for (proc, log), addr in zip(procs, addrs):
        while 'serving at' not in open(log.name, errors='replace').read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError('node %s did not start' % addr)
            time.sleep(0.05)
    return procs


def stop_nodes(procs):
    for proc, _log in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc, log in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tree', default=os.path.dirname(HERE), help='checkout to measure')
    p.add_argument('--nodes', type=int, default=48)
    p.add_argument('--cpus', type=int, default=1, help='CPUs of each node')
    p.add_argument('--jobs', type=int, default=2000)
    p.add_argument('--runs', type=int, default=3)
    args = p.parse_args()
    tree = os.path.abspath(args.tree)
    addrs = ['127.0.0.%d' % (2 + i) for i in range(args.nodes)]
    port = free_port(addrs[0])
    folder = tempfile.mkdtemp(prefix='dispy-scale-')
    procs = []
    try:
        procs = start_nodes(tree, addrs, port, args.cpus, folder)
        client = os.path.join(folder, 'scale_client.py')   # a file: dispy ships its source
        with open(client, 'w') as f:
            f.write(CLIENT)
        runs = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, client, tree, ','.join(addrs),
                                  str(port), str(args.jobs)], capture_output=True,
                                 text=True, timeout=300, cwd=folder)
            if out.returncode:
                raise RuntimeError('client failed: %s' % out.stderr[-2000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(dict(runs[-1], tree=tree, nodes=args.nodes, cpus=args.cpus)))
        summary = {key: statistics.median(r[key] for r in runs)
                   for key in ('jobs_per_s', 'peak_threads')}
        print(json.dumps(dict(summary, summary='median', tree=tree, nodes=args.nodes,
                              cpus=args.cpus, runs=len(runs))))
    finally:
        stop_nodes(procs)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
