"""In-memory processing (spec 6.5): 'setup' (a functools.partial) loads a file sent
with 'depends' into global variables once per node; jobs checksum that data in memory
and 'cleanup' deletes the globals.

Run:  python examples/local_cluster.py examples/node_setup.py [data_file]
"""

# executed on each node before any jobs are scheduled
def setup(data_file):
    # read data in file to global variable
    global data, algorithms, hashlib

    import hashlib
    data = open(data_file).read()  # read file in to memory; data_file can now be deleted
    data = data.encode() # convert to bytes
    # 'shake_*' digests need a length, so they are left out
    algorithms = sorted(alg for alg in hashlib.algorithms_guaranteed
                        if not alg.startswith('shake'))
    # if running under Windows, modules can't be global, as they are not
    # serializable; instead, they must be loaded in 'compute' (jobs); under
    # Posix (Linux, OS X and other Unix variants), modules declared global in
    # 'setup' will be available in 'compute'

    # 'os' module is already available (loaded by dispynode)
    if os.name == 'nt':  # remove modules under Windows
        del hashlib
    return 0

def cleanup():
    global data, algorithms, hashlib
    del data, algorithms
    if os.name != 'nt':
        del hashlib

def compute(n):
    global hashlib
    if os.name == 'nt': # Under Windows modules must be loaded in jobs
        import hashlib
    # 'data' and 'algorithms' global variables are initialized in 'setup'
    alg = algorithms[n % len(algorithms)]
    csum = getattr(hashlib, alg)()
    csum.update(data)
    return (alg, csum.hexdigest())

if __name__ == '__main__':
    import dispy, sys, os, functools
    # if no data file name is given, use this file as data file
    data_file = sys.argv[1] if len(sys.argv) > 1 else sys.argv[0]
    # the file is transferred to the node's working directory (where 'setup'
    # runs), so 'setup' opens it by its base name
    cluster = dispy.JobCluster(compute, depends=[data_file],
                               setup=functools.partial(setup, os.path.basename(data_file)),
                               cleanup=cleanup)
    jobs = []
    for n in range(10):
        job = cluster.submit(n)
        job.id = n
        jobs.append(job)

    failed = 0
    for job in jobs:
        job() # wait for job to finish
        if job.status == dispy.DispyJob.Finished:
            print('%s: %s : %s' % (job.id, job.result[0], job.result[1]))
        else:
            print('job %s failed: %s' % (job.id, job.exception))
            failed += 1
    cluster.close()
    sys.exit(1 if failed else 0)
