#!/usr/bin/env python3
"""dispycos: dispycos_client1.py with the HTTP monitor watching it.

Start ``python3 dispycosnode.py`` on one or more machines of the network, then run this
program and open http://127.0.0.1:8181/ while it runs: the remote tasks appear on the
Server pages as they are created and leave them as they end.

Run:  python3 examples/dispycos_client2.py [NJOBS [PORT]]
"""

import os
import random
import sys

import dispycos as pycos
import dispycos.httpd
from dispycos import Computation, Scheduler


def compute(seconds, task=None):
    """Runs on a server: waits ``seconds`` (standing in for work), gives a value."""
    yield task.sleep(seconds)
    return 'slept %.2f s at %s' % (seconds, task.location)


def client_proc(computation, njobs, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    # the results of njobs tasks, in the order of their arguments
    args = [random.uniform(0.5, 2) for _ in range(njobs)]
    results = yield computation.run_results(compute, args)
    for arg, result in zip(args, results):
        print('result for %.2f: %s' % (arg, result))
    yield computation.close()


if __name__ == '__main__':
    njobs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8181
    Scheduler()
    computation = Computation([compute])
    http_server = dispycos.httpd.HTTPServer(computation, host=os.environ.get('DISPYCOS_NODE', ''),
                                            port=port, poll_sec=2)
    pycos.Task(client_proc, computation, njobs).value()
    http_server.shutdown()
