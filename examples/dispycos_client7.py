#!/usr/bin/env python3
"""dispycos: dispycos_client1.py driven by the scheduler's status messages.

The computation's ``status_task`` gets every status message of the scheduler
(``DispycosStatus``: NodeDiscovered, NodeInitialized, ServerDiscovered,
ServerInitialized, TaskCreated, ServerClosed, NodeClosed, ComputationClosed) and a
``MonitorStatus`` when each remote task ends.  It schedules the work itself: when a
server is initialized it runs a task there (``run_at`` that server), and when a
task ends it takes its result and runs the next job on the server just freed.  A
job whose task is lost with its server (MonitorStatus with PeerLost) runs again on
the next free server.  Once every job is done it closes the computation, and it
ends with ComputationClosed.
Every message is printed once, as it comes (``status NAME INFO`` or ``monitor TASK
TYPE VALUE``).
"""

import random

import dispycos as pycos
from dispycos import Computation, Scheduler


def compute(seconds, task=None):
    """Runs on a server: waits ``seconds`` (standing in for work), gives a value."""
    yield task.sleep(seconds)
    return 'slept %.2f s at %s' % (seconds, task.location)


def status_proc(njobs, longest, task=None):
    computation = yield task.receive()      # the first message: the computation
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    jobs = [(i, random.uniform(longest / 5, longest)) for i in range(njobs)]
    pending = list(jobs)
    running = {}                            # remote task -> its job
    idle = []                               # servers initialized, with no job of ours
    results = {}
    closing = False

    def submit(where):
        """Runs the next job at ``where`` (a server's Location)."""
        job = pending.pop(0)
        rtask = yield computation.run_at(where, compute, job[1])
        if isinstance(rtask, pycos.Task):
            running[rtask] = job
            print('job %d (%.2f) submitted at %s as %s' % (job[0], job[1], where, rtask))
        else:
            print('job %d could not run at %s: %s' % (job[0], where, rtask))
            pending.append(job)

    while True:
        msg = yield task.receive(timeout=120)
        if msg is None:
            print('no status message in 120 s')
            break
        if isinstance(msg, pycos.DispycosStatus):
            info = msg.info.task if msg.status == pycos.TaskCreated else (
                msg.info.location if isinstance(msg.info, pycos.DispycosNodeAvailInfo)
                else msg.info)
            print('status %s %s' % (msg.status, info))
            if msg.status == pycos.ServerInitialized:
                if pending and not closing:
                    yield submit(msg.info)
                else:
                    idle.append(msg.info)
            elif msg.status == pycos.ServerClosed and msg.info in idle:
                idle.remove(msg.info)
            elif msg.status == pycos.ComputationClosed:
                break
        elif isinstance(msg, pycos.MonitorStatus):
            rtask = msg.info
            kind = getattr(msg.type, '__name__', str(msg.type))
            print('monitor %s %s %s' % (rtask, kind, msg.value if kind == 'StopIteration'
                                        else str(msg.value).strip().splitlines()[-1:]))
            job = running.pop(rtask, None)
            if job is None:
                print('  (not a task of this program)')
                continue
            if msg.type is StopIteration:
                results[job[0]] = msg.value
                idle.append(rtask.location)     # the server just freed
            else:                               # lost with its server: once more
                print('job %d lost: it runs again' % job[0])
                pending.append(job)
            while pending and idle and not closing:
                yield submit(idle.pop())
            if not running and not pending and not closing:
                closing = True
                for i, seconds in jobs:
                    print('result for %.2f: %s' % (seconds, results.get(i)))
                yield computation.close()       # its statuses are still to come here
        else:
            print('other message %r' % (msg,))


if __name__ == '__main__':
    import sys
    Scheduler()
    # the number of jobs, the longest a job takes (s)
    status_task = pycos.Task(status_proc, int(sys.argv[1]) if len(sys.argv) > 1 else 10,
                             float(sys.argv[2]) if len(sys.argv) > 2 else 0.5)
    computation = Computation([compute], status_task=status_task)
    status_task.send(computation)
