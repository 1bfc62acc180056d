#!/usr/bin/env python3
"""dispycos: an external program at remote servers, fed by messages, read by pipes.

``dispycos_client5_proc.py`` (a filter: numbers on stdin, a line of statistics per
line on stdout) is a component file, so it is in each node's folder, the parent of
each server's working directory.  Each remote task starts it with
``pycos.asyncfile.Popen``, writes to its stdin what the client sends as messages,
and, in a second task on the same server, reads its stdout asynchronously through a
``pycos.asyncfile.AsyncPipe``, relaying each line to the client as it comes.  A
``None`` message ends the input; the task's value is the program's exit status.
"""

import os
import random

import dispycos as pycos
from dispycos import Computation, Scheduler


def relay(client, program, task=None):
    """Runs on a server: the program's input from messages, its output to client."""
    import os, subprocess, sys
    import pycos.asyncfile
    path = os.path.join(os.path.dirname(os.getcwd()), program)     # the node's folder
    proc = pycos.asyncfile.Popen([sys.executable, path], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
    pipe = pycos.asyncfile.AsyncPipe(proc)
    me = task

    def reader(task=None):
        count = 0
        while True:
            line = yield pipe.readline()
            if not line:
                break
            count += 1
            client.send(('line', me, line.decode().rstrip('\n')))
        return count

    reader_task = pycos.Task(reader)
    while True:
        msg = yield task.receive(timeout=60)
        if msg is None:
            break
        yield pipe.write(msg.encode() + b'\n', full=True)
    pipe.stdin.close()              # end of input: the program prints its totals
    lines = yield reader_task.finish()
    status = yield pipe.wait()
    client.send(('done', me, lines, status))
    return status


def client_proc(computation, program, ntasks, nlines, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    sums = {}
    rtasks = []
    for _ in range(ntasks):
        rtask = yield computation.run_async(relay, task, program)
        if isinstance(rtask, pycos.Task):
            rtasks.append(rtask)
            sums[rtask] = []
        else:
            print('task could not be created: %s' % rtask)
    # the data: lines of integers, sent to each task as messages
    for _ in range(nlines):
        for rtask in rtasks:
            values = [random.randint(-50, 100) for _ in range(random.randint(1, 6))]
            sums[rtask].append(sum(values))
            rtask.send(' '.join(str(v) for v in values))
        yield task.sleep(0.01)
    for rtask in rtasks:
        rtask.send(None)
    running = set(rtasks)
    seen = {rtask: 0 for rtask in rtasks}
    while running:
        msg = yield task.receive(timeout=60)
        if msg is None:
            print('no output in time')
            break
        if msg[0] == 'line':
            _, rtask, line = msg
            if line.startswith('line '):
                n = seen[rtask]
                seen[rtask] += 1
                want = sum(sums[rtask][:n + 1])
                ok = ' sum %g ' % sums[rtask][n] in line and line.endswith(' total %g' % want)
                print('%s %s: %s' % (rtask, line, 'ok' if ok else 'MISMATCH'))
            else:
                print('%s %s' % (rtask, line))
        elif msg[0] == 'done':
            _, rtask, lines, status = msg
            print('%s done: %d lines relayed, program exit status %s' % (rtask, lines, status))
            running.discard(rtask)
    yield computation.close()


if __name__ == '__main__':
    import sys
    program = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'dispycos_client5_proc.py')
    Scheduler()
    computation = Computation([relay, program])
    pycos.Task(client_proc, computation, os.path.basename(program),
               int(sys.argv[1]) if len(sys.argv) > 1 else 2,
               int(sys.argv[2]) if len(sys.argv) > 2 else 10)
