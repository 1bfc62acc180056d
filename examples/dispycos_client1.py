#!/usr/bin/env python3
"""dispycos: remote tasks on dispycos servers, their results back to the client.

Start ``python3 dispycosnode.py`` on one or more machines of the network, then run
this program.  It schedules a computation with a private scheduler, runs ``compute``
as remote tasks (more tasks than servers: they wait for a free server), prints their
results, and closes the computation.
"""

import random

import dispycos as pycos
from dispycos import Computation, Scheduler


def compute(seconds, task=None):
    """Runs on a server: waits ``seconds`` (standing in for work), gives a value."""
    yield task.sleep(seconds)
    return 'slept %.2f s at %s' % (seconds, task.location)


def client_proc(computation, njobs, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    # the results of njobs tasks, in the order of their arguments
    args = [random.uniform(0.1, 0.5) for _ in range(njobs)]
    results = yield computation.run_results(compute, args)
    for arg, result in zip(args, results):
        print('result for %.2f: %s' % (arg, result))
    # one task whose reference we keep: its value comes with finish()
    rtask = yield computation.run(compute, 0.1)
    if isinstance(rtask, pycos.Task):
        print('task %s ended with: %s' % (rtask, (yield rtask.finish())))
    yield computation.close()


if __name__ == '__main__':
    import sys
    # pycos.logger.setLevel(pycos.Logger.DEBUG)
    Scheduler()                     # a private scheduler in this program
    computation = Computation([compute])
    pycos.Task(client_proc, computation, int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    # the program waits here, at its end, until client_proc is done
