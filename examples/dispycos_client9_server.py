#!/usr/bin/env python3
"""dispycos: each server set up with a data file of its own, then tasks that use it.

A node runs as many servers as it has CPUs.  With ``disable_servers=True`` a server
waits until the client enables it: when the scheduler says a server is there
(ServerDiscovered), the client sends that server a file of its own and enables it
with the file's name; ``server_setup`` then reads the file into a global on that
server, and the tasks scheduled there later compute on it in memory.

Start ``python3 dispycosnode.py`` on one or more machines, then run this program.
"""

import os
import random
import tempfile

import dispycos as pycos
from dispycos import Computation, DispycosStatus, Scheduler


def server_setup(data_file, task=None):
    """Runs on one server before any of its tasks: its part of the data, in memory."""
    import os
    global data
    with open(data_file) as f:
        data = [int(line) for line in f]
    os.remove(data_file)
    yield task.sleep(0)
    return 0


def compute(task=None):
    """Runs on a server: the total of that server's data."""
    yield task.sleep(0)
    return sum(data)


def server_available(location, folder, totals, task=None):
    """At the client: a file for this server, sent there, then the server enabled."""
    path = os.path.join(folder, 'part-%s-%s.txt' % (location.addr, location.port))
    values = [random.randrange(1000) for _ in range(500)]
    with open(path, 'w') as f:
        f.write('\n'.join(str(v) for v in values))
    totals[location] = sum(values)
    sent = yield pycos.Pycos().send_file(location, path, overwrite=True)
    os.remove(path)
    if sent < 0:
        print('could not send the data to %s' % (location,))
        return -1
    yield computation.enable_server(location, os.path.basename(path))
    return 0


def status_proc(folder, totals, ready, task=None):
    task.set_daemon()
    for _ in iter(int, 1):
        msg = yield task.receive()
        if isinstance(msg, DispycosStatus):
            if msg.status == Scheduler.ServerDiscovered:
                pycos.Task(server_available, msg.info, folder, totals)
            elif msg.status == Scheduler.ServerInitialized:
                ready.append(msg.info)


def client_proc(nservers, folder, totals, ready, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    for _ in range(200):                # until the servers are set up (at most 20 s)
        if len(ready) >= nservers:
            break
        yield task.sleep(0.1)
    for location in sorted(ready, key=str):
        total = yield computation.run_result_at(location, compute)
        print('server %s: total %s, expected %s' % (location, total, totals.get(location)))
    yield computation.close()
    os.rmdir(folder)


if __name__ == '__main__':
    import sys
    Scheduler()
    folder = tempfile.mkdtemp(prefix='client9s-')
    totals, ready = {}, []          # each server's data total; the servers set up
    computation = Computation([compute], server_setup=server_setup, disable_servers=True,
                              status_task=pycos.Task(status_proc, folder, totals, ready))
    # how many servers to wait for (all the nodes' CPUs): the first argument, else 2
    pycos.Task(client_proc, int(sys.argv[1]) if len(sys.argv) > 1 else 2, folder, totals,
               ready)
