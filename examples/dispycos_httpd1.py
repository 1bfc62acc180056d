#!/usr/bin/env python3
"""dispycos: watch a computation in a web browser (the HTTP monitor, dispycos.httpd).

Start ``python3 dispycosnode.py`` on one or more machines of the network, then run this
program and open http://127.0.0.1:8181/ (from another computer or a phone, the address
with ?token=... that the monitor prints).  The Cluster page lists the nodes and the
tasks they ran; a node's page lists its servers; a server's page lists the tasks
running there, with their arguments, and can terminate them.

Run:  python3 examples/dispycos_httpd1.py [NTASKS [PORT]]
(the monitor serves the address in DISPYCOS_NODE when it is set, else every address)
"""

import os
import random
import sys

import dispycos as pycos
import dispycos.httpd
from dispycos import Computation, Scheduler


def compute(i, seconds, task=None):
    """Runs on a server: task number ``i`` waits ``seconds`` (standing in for work)."""
    yield task.sleep(seconds)
    return (i, str(task.location))


def client_proc(computation, ntasks, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    # more tasks than servers: each waits for a free server, as the pages show
    rtasks = []
    for i in range(ntasks):
        rtask = yield computation.run(compute, i, random.uniform(1, 3))
        if isinstance(rtask, pycos.Task):
            rtasks.append(rtask)
        else:
            print('task %d could not be created: %s' % (i, rtask))
    for rtask in rtasks:
        i, where = yield rtask.finish()
        print('task %d ran at %s' % (i, where))
    yield computation.close()


if __name__ == '__main__':
    ntasks = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8181
    Scheduler()                     # a private scheduler in this program
    computation = Computation([compute])
    # Before schedule(): the monitor becomes the computation's status_task.
    http_server = dispycos.httpd.HTTPServer(computation, host=os.environ.get('DISPYCOS_NODE', ''),
                                            port=port, poll_sec=2)
    client = pycos.Task(client_proc, computation, ntasks)
    client.value()                  # waits for client_proc to end
    http_server.shutdown()          # a browser still polling gets the final figures first
