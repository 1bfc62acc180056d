#!/usr/bin/env python3
"""dispycos: messages with objects of a user class, client ↔ remote tasks.

Each remote task gets an instance of ``C`` and the client's task as arguments,
computes, and delivers the updated instance back as a message; the client receives
them as they come.  ``C`` is a component, so servers know the class too.
"""

import random

import dispycos as pycos
from dispycos import Computation, Scheduler


class C(object):
    def __init__(self, i):
        self.i = i
        self.n = None
        self.where = None

    def __repr__(self):
        return 'C(%d, n=%.3f, at %s)' % (self.i, self.n, self.where)


def compute(obj, client, task=None):
    import math         # a server has only what the components and tasks import
    print('%s received object %d (n=%.3f)' % (task.location, obj.i, obj.n))
    yield task.sleep(obj.n / 10)
    obj.n = math.sqrt(obj.n)
    obj.where = str(task.location)
    # deliver: the message is in the client's mailbox when this returns 1
    yield client.deliver(obj, timeout=10)


def client_proc(computation, njobs, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    client = task

    def submit(task=None):
        for i in range(njobs):
            obj = C(i)
            obj.n = random.uniform(1, 4)
            rtask = yield computation.run(compute, obj, client)
            if not isinstance(rtask, pycos.Task):
                print('task %d could not be created: %s' % (i, rtask))
    pycos.Task(submit)
    for _ in range(njobs):
        obj = yield task.receive(timeout=60)
        if isinstance(obj, C):
            print('result %d: %r' % (obj.i, obj))
        else:
            print('no result in time')
            break
    yield computation.close()


if __name__ == '__main__':
    import sys
    Scheduler()
    computation = Computation([compute, C])
    pycos.Task(client_proc, computation, int(sys.argv[1]) if len(sys.argv) > 1 else 8)
