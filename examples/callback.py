"""Provisional results with a callback (client API 1.7): jobs send candidate results
with dispy_provisional_result; once one is good enough the callback cancels the rest.

Run:  python examples/local_cluster.py examples/callback.py
"""

import random, dispy

def compute(n): # executed on nodes
    import random, time, socket
    name = socket.gethostname()
    cur_best = 1
    for i in range(0, n):
        r = random.uniform(0, 1)
        if r <= cur_best:
            # possible result
            dispy_provisional_result((name, r))
            cur_best = r
        time.sleep(0.02)  # pretend to work
    # final result
    return (name, cur_best)

def job_callback(job): # executed at the client
    if job.status == dispy.DispyJob.ProvisionalResult:
        if job.result[1] < 0.005:
            # acceptable result; terminate jobs
            print('%s computed: %s' % (job.result[0], job.result[1]))
            # 'jobs' and 'cluster' are created in '__main__' below
            for j in jobs:
                if j.status in [dispy.DispyJob.Created, dispy.DispyJob.Running,
                                dispy.DispyJob.ProvisionalResult]:
                    cluster.cancel(j)

if __name__ == '__main__':
    import sys
    cluster = dispy.JobCluster(compute, callback=job_callback)
    jobs = []
    for n in range(4):
        job = cluster.submit(random.randint(50,100))
        if job is None:
            print('creating job %s failed!' % n)
            continue
        job.id = n
        jobs.append(job)
    cluster.wait()
    failed = 0
    for job in jobs:
        if job.status == dispy.DispyJob.Finished:
            print('job %s: best %s' % (job.id, job.result[1]))
        elif job.status == dispy.DispyJob.Cancelled:  # by job_callback
            print('job %s: cancelled' % job.id)
        else:
            print('job %s failed: %s' % (job.id, job.exception))
            failed += 1
    cluster.print_status()
    cluster.close()
    sys.exit(1 if failed else 0)
