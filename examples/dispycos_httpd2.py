#!/usr/bin/env python3
"""dispycos: the HTTP monitor and a status task of the program's own.

As dispycos_httpd1.py, and the program also reads the scheduler's status messages
itself: its ``status_proc`` prints each remote task's end.  The computation is made
with that status task; the HTTP server, made afterwards, takes the computation's
messages first and passes every one on to it (seed 003 §6.8: the monitor chains them).

Run:  python3 examples/dispycos_httpd2.py [NTASKS [PORT]]
"""

import os
import random
import sys

import dispycos as pycos
import dispycos.httpd
from dispycos import Computation, Scheduler, DispycosStatus, MonitorStatus


def compute(i, seconds, task=None):
    """Runs on a server: task number ``i`` waits ``seconds``."""
    yield task.sleep(seconds)
    return i * i


def status_proc(task=None):
    """Every status message of the scheduler, after the HTTP monitor saw it."""
    while True:
        msg = yield task.receive()
        if isinstance(msg, MonitorStatus):          # a remote task ended
            if msg.type == StopIteration:
                print('task %s finished: %s' % (msg.info, msg.value))
            else:
                print('task %s ended with %s' % (msg.info, msg.type.__name__))
        elif isinstance(msg, DispycosStatus) and msg.status == pycos.ServerInitialized:
            print('server %s is ready' % msg.info)


def client_proc(computation, ntasks, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    rtasks = []
    for i in range(ntasks):
        rtask = yield computation.run(compute, i, random.uniform(1, 3))
        if isinstance(rtask, pycos.Task):
            rtasks.append(rtask)
    for rtask in rtasks:
        yield rtask.finish()
    yield computation.close()


if __name__ == '__main__':
    ntasks = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 8181
    Scheduler()
    status_task = pycos.Task(status_proc)
    status_task.set_daemon()        # the program's end does not wait for it
    computation = Computation([compute], status_task=status_task)
    http_server = dispycos.httpd.HTTPServer(computation, host=os.environ.get('DISPYCOS_NODE', ''),
                                            port=port, poll_sec=2)
    client = pycos.Task(client_proc, computation, ntasks)
    client.value()
    http_server.shutdown()
