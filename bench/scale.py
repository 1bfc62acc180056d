#!/usr/bin/env python3
"""W1 (many tiny jobs) over many loopback nodes, and the client's peak thread count.

    python3 bench/scale.py --nodes 48 --cpus 1          # this tree
    python3 bench/scale.py --tree /tmp/old --nodes 48   # another checkout, to compare

Starts ``--nodes`` dispynode processes of the tree on 127.0.0.11, 127.0.0.12, ... (one
port), then for each of ``--runs`` fresh client processes: a JobCluster over all of
them, a wait until every node is set up, ``--jobs`` jobs of ``double(i)`` submitted and
collected (timed), and the peak of ``threading.active_count()`` sampled every 2 ms
from the cluster's creation to its close.  Prints one JSON line per run and one with
the medians.

The nodes, the client (workload W7 of bench/bench.py: ``w7_scale``) and the stopping
of processes are bench.py's; ``bench.py --workloads W7`` runs the same client over 48
nodes and over 1 node, alternately, and compares them.  Only loopback addresses are
used; the nodes are stopped by PID at the end, also after an error or an interrupt.
"""

import argparse
import os
import signal
import statistics
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (bench/bench.py)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--tree', default=os.path.dirname(HERE), help='checkout to measure')
    p.add_argument('--nodes', type=int, default=bench.W7_NODES)
    p.add_argument('--cpus', type=int, default=1, help='CPUs of each node')
    p.add_argument('--jobs', type=int, default=2000)
    p.add_argument('--runs', type=int, default=3)
    p.add_argument('--timeout', type=float, default=300.0,
                   help='seconds before a client process is killed (default 300)')
    args = p.parse_args()
    tree = os.path.abspath(args.tree)
    if not os.path.isfile(os.path.join(tree, 'dispynode.py')):
        p.error('no dispynode.py in %s' % tree)
    try:
        addrs = bench.w7_addrs(args.nodes)
    except ValueError as exc:
        p.error('--nodes: %s' % exc)
    signal.signal(signal.SIGTERM, bench._interrupt)
    impl = bench.Impl('this', sys.executable, 'this', tree=tree)
    nodes = bench.NodeSet(impl, [(addr, args.cpus, None) for addr in addrs])
    client_args = types.SimpleNamespace(timeout=args.timeout, quick=False)
    where = dict(tree=tree, nodes=args.nodes, cpus=args.cpus)
    try:
        nodes.start()
        runs = []
        for _ in range(args.runs):
            result, error = bench.run_client(client_args, impl, nodes, 'W7', args.jobs)
            if error:
                raise SystemExit('client failed: %s' % error)
            runs.append({key: bench._num(result[key]) for key in (
                'jobs_per_s', 'wall_s', 'peak_threads', 'nodes_used', 'bad_results')})
            bench.emit(dict(runs[-1], **where))
        summary = {key: statistics.median(r[key] for r in runs)
                   for key in ('jobs_per_s', 'peak_threads')}
        bench.emit(dict(summary, summary='median', runs=len(runs), **where))
    except KeyboardInterrupt:
        sys.stderr.write('# interrupted\n')
        return 130
    finally:
        nodes.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
