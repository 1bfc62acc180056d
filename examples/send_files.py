"""Sending files to the client (spec 6.7): each job writes 'n.dat' on the node and
sends it with dispy_send_file; the file arrives in the client's working directory.

Run:  python examples/local_cluster.py examples/send_files.py
(the received files are checked, printed and then removed)
"""

def compute(n):
    import time
    # the computation saves its data in file n.dat ...
    with open(str(n) + '.dat', 'w') as fd:
        fd.write('data of job %s computed at %s\n' % (n, time.time()))
    dispy_send_file(str(n) + '.dat') # send file to client
    # ... continue further computations
    return n

if __name__ == '__main__':
    import dispy, os, sys
    cluster = dispy.JobCluster(compute)
    jobs = []
    for i in range(20):
        # the argument names the file, so each job gets its own ('i.dat')
        job = cluster.submit(i)
        job.id = i
        jobs.append(job)
    failed = 0
    for job in jobs:
        job() # wait for job to finish (its file is sent before it returns)
        path = str(job.id) + '.dat'
        if job.status != dispy.DispyJob.Finished or not os.path.isfile(path):
            print('job %s failed: %s' % (job.id, job.exception or 'no file %s' % path))
            failed += 1
            continue
        with open(path) as fd:
            print('job %s results in file %s: %s' % (job.id, path, fd.read().strip()))
        os.remove(path)  # keep the working directory clean
    cluster.close()
    sys.exit(1 if failed else 0)
