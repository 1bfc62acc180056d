"""Live job output (stream_output): what the jobs print reaches this program while they
run, line by line, prefixed by job id and node; job.stdout still holds all of it at the
end.  The second cluster gives each line to a function instead (here: a progress table).

Run:  python examples/local_cluster.py examples/live_output.py
"""

import sys
import dispy


def compute(n):     # runs on the nodes
    import time
    for i in range(n):
        print('step %d of %d' % (i + 1, n))
        time.sleep(0.1)             # pretend to work
    print('job of %d steps done' % n, file=sys.stderr)
    return n * n


progress = {}       # job id -> the last line it printed on stdout


def on_line(job, stream, line):     # on the cluster's callback thread, in order
    if stream == 'stdout':
        progress[job.id] = line


if __name__ == '__main__':
    cluster = dispy.JobCluster(compute, stream_output=True)
    jobs = [cluster.submit(n) for n in (3, 4)]
    for job in jobs:
        job()       # returns once the job's lines are printed too
        print('job %s: %s (its stdout: %d lines)' % (job.id, job.result,
                                                     job.stdout.count('\n')))
    cluster.close()

    cluster = dispy.JobCluster(compute, stream_output=on_line)
    jobs = [cluster.submit(n) for n in (2, 5)]
    cluster.wait()  # returns once every line was given to on_line
    for job in jobs:
        print('job %s: last line %r' % (job.id, progress[job.id]))
    cluster.close()
