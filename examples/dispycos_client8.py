#!/usr/bin/env python3
"""dispycos: a long computation without yields, while messages still arrive.

The remote task calls ``time.sleep`` (standing in for a computation that never
yields): no other task of that server runs meanwhile, yet the server keeps receiving
(its I/O runs on a thread of its own) and keeps its connections alive.  The messages
the client sends during that time are all in the task's mailbox afterwards.
"""

import dispycos as pycos
from dispycos import Computation, Scheduler


def compute(seconds, task=None):
    import time
    client = yield task.receive()           # first message: who to answer
    time.sleep(seconds)                     # no yield: the server is busy
    received = []
    while True:
        msg = yield task.receive(timeout=0)     # what came in meanwhile
        if msg is None:
            break
        received.append(msg)
    client.send((str(task.location), received))


def client_proc(computation, seconds, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    servers = yield computation.servers()
    for _ in range(100):                    # wait (up to 10 s) for two servers
        if len(servers) >= 2:
            break
        yield task.sleep(0.1)
        servers = yield computation.servers()
    rtasks = []
    for _ in range(min(2, len(servers))):
        rtask = yield computation.run(compute, seconds)
        rtask.send(task)
        rtasks.append(rtask)
    for i in range(10):                     # sent while the tasks sleep
        for rtask in rtasks:
            rtask.send(i)
        yield task.sleep(seconds / 20)
    for _ in rtasks:
        where, received = yield task.receive(timeout=seconds + 30)
        print('%s received %s' % (where, received))
    yield computation.close()


if __name__ == '__main__':
    import sys
    Scheduler()
    computation = Computation([compute])
    pycos.Task(client_proc, computation, float(sys.argv[1]) if len(sys.argv) > 1 else 3)
