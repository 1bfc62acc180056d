"""Updating globals (spec 6.6): 'setup' creates a multiprocessing shared integer on
each node; every job on that node adds to it, so later jobs see earlier updates.

Run:  python examples/local_cluster.py examples/node_shvars.py
"""

def setup():
    import multiprocessing, multiprocessing.sharedctypes
    global shvar
    lock = multiprocessing.Lock()
    shvar = multiprocessing.sharedctypes.Value('i', 1, lock=lock)
    return 0

def cleanup():
    global shvar
    del shvar

def compute():
    import random
    r = random.randint(1, 10)
    global shvar
    shvar.value += r  # update 'shvar'; all jobs on this node will
                      # see updated value
    return shvar.value

if __name__ == '__main__':
    import dispy, sys
    cluster = dispy.JobCluster(compute, setup=setup, cleanup=cleanup)
    jobs = []
    for n in range(10):
        job = cluster.submit()
        job.id = n
        jobs.append(job)

    failed = 0
    for job in jobs:
        job() # wait for job to finish
        if job.status != dispy.DispyJob.Finished:
            print('job %s failed: %s' % (job.id, job.exception))
            failed += 1
        else:
            print('%s: %s' % (job.id, job.result))
    cluster.close()
    sys.exit(1 if failed else 0)
