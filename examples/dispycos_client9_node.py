#!/usr/bin/env python3
"""dispycos: a node set up once with its own data, then tasks that use it in memory.

Each node gets a data file of its own, sent by the client when the scheduler says
the node is there (NodeDiscovered).  ``node_setup`` then runs on that node, in the
node's folder and in a process of its own with no network: it reads the file into a
global, ``data``.  The node's servers are made from that process (it forks them), so
every task on that node finds ``data`` in memory without reading anything.  Nodes
that cannot fork (Windows) are left out by a DispycosNodeAllocate on the platform.

Start ``python3 dispycosnode.py`` on one or more machines, then run this program
(``dispycos_client9_node.py 3`` waits for three nodes; two by default).
"""

import os
import random
import tempfile

import dispycos as pycos
from dispycos import (Computation, DispycosNodeAllocate, DispycosStatus, Scheduler,
                      MonitorStatus)


def node_setup(data_file, task=None):
    """Runs once on each node before its servers start: the data stays in memory."""
    import os                   # remote code has only what it imports (and pycos)
    global data
    with open(data_file) as f:
        data = [int(line) for line in f]
    os.remove(data_file)        # in memory now; the file is not needed any more
    yield task.sleep(0)
    return 0                    # 0: the node is used


def compute(lo, hi, task=None):
    """Runs on a server of a node: sums the values of that node's data in a range."""
    yield task.sleep(0)
    picked = [v for v in data if lo <= v < hi]
    return (task.location.addr, len(data), sum(picked))


def node_available(avail_info, folder, expected, task=None):
    """At the client: makes the node its data file, sends it, then lets node_setup
    run there with the file's name."""
    addr = avail_info.location.addr
    values = [random.randrange(100) for _ in range(1000)]   # a stand-in for real data
    path = os.path.join(folder, 'data-%s.txt' % addr)
    with open(path, 'w') as f:
        f.write('\n'.join(str(v) for v in values))
    expected[addr] = sum(values)
    sent = yield pycos.Pycos().send_file(avail_info.location, path, overwrite=True)
    os.remove(path)
    if sent < 0:
        print('could not send %s to %s' % (path, addr))
        return -1
    yield computation.enable_node(addr, os.path.basename(path))
    return 0


def status_proc(folder, expected, ready, task=None):
    task.set_daemon()
    for _ in iter(int, 1):
        msg = yield task.receive()
        if isinstance(msg, DispycosStatus):
            if msg.status == Scheduler.NodeDiscovered:
                pycos.Task(node_available, msg.info, folder, expected)
            elif msg.status == Scheduler.NodeInitialized:
                print('node %s set up' % msg.info.location.addr)
            elif msg.status == Scheduler.ServerInitialized:
                ready.add(msg.info.addr)
        elif isinstance(msg, MonitorStatus) and msg.type is not StopIteration:
            print('a task failed: %s' % (msg.value,))


def client_proc(nnodes, folder, expected, ready, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    for _ in range(200):                # until the nodes are set up (at most 20 s)
        if len(ready) >= nnodes:
            break
        yield task.sleep(0.1)
    # at each node, its data in ten ranges, each a task on one of its servers
    for addr in sorted(ready):
        tasks = [pycos.Task(part_at, computation, addr, lo, lo + 10)
                 for lo in range(0, 100, 10)]
        parts = []
        for part in tasks:
            parts.append((yield part.finish()))
        total = sum(part[2] for part in parts if isinstance(part, tuple))
        print('node %s: %s values, total %s, expected %s'
              % (addr, set(part[1] for part in parts if isinstance(part, tuple)), total,
                 expected.get(addr)))
    yield computation.close()
    os.rmdir(folder)


def part_at(computation, addr, lo, hi, task=None):
    """At the client: one range of one node's data, summed there."""
    value = yield computation.run_result_at(addr, compute, lo, hi)
    return value


if __name__ == '__main__':
    import sys
    Scheduler()
    folder = tempfile.mkdtemp(prefix='client9-')
    expected, ready = {}, set()     # each node's data total; the nodes set up
    # node_setup needs os.fork: Windows nodes are left out (cpus=0: not used)
    computation = Computation([compute], node_setup=node_setup, disable_nodes=True,
                              status_task=pycos.Task(status_proc, folder, expected, ready),
                              node_allocations=[DispycosNodeAllocate('*', platform='Windows',
                                                                     cpus=0)])
    # how many nodes to wait for: the first argument, else 2
    pycos.Task(client_proc, int(sys.argv[1]) if len(sys.argv) > 1 else 2, folder, expected,
               ready)
