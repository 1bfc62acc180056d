"""Efficient job submission (spec 6.9): a job callback keeps between lower_bound and
upper_bound jobs pending, so the client never holds all jobs (and arguments) at once.

Run:  python examples/local_cluster.py examples/bounded_submit.py
"""

def compute(n):  # executed on nodes
    import time
    time.sleep(n)
    return n

# dispy calls this function to indicate change in job status
def job_callback(job): # executed at the client
    global pending_jobs, jobs_cond, done, failed
    if (job.status == dispy.DispyJob.Finished  # most usual case
        or job.status in (dispy.DispyJob.Terminated, dispy.DispyJob.Cancelled,
                          dispy.DispyJob.Abandoned)):
        # 'pending_jobs' is shared between two threads, so access it with
        # 'jobs_cond' (see below)
        jobs_cond.acquire()
        done += 1
        if job.status != dispy.DispyJob.Finished:
            failed += 1
        if job.id: # job may have finished before 'main' assigned id
            pending_jobs.pop(job.id, None)  # None: 'main' saw it done already
            # dispy.logger.info('job "%s" done with %s: %s', job.id, job.result, len(pending_jobs))
            if len(pending_jobs) <= lower_bound:
                jobs_cond.notify()
        jobs_cond.release()

if __name__ == '__main__':
    import dispy, threading, random, sys

    # set lower and upper bounds as appropriate; assuming there are 2
    # processors in a cluster, bounds are set to 10 to 20 (the documentation
    # uses 50 to 100 for 30 processors)
    lower_bound, upper_bound = 10, 20
    # use Condition variable to protect access to pending_jobs, as
    # 'job_callback' is executed in another thread
    jobs_cond = threading.Condition()
    done = failed = 0
    cluster = dispy.JobCluster(compute, callback=job_callback)
    pending_jobs = {}
    # submit 200 jobs (1000 in the documentation), each sleeping 10 to 30 ms
    i = 0
    while i < 200:
        i += 1
        job = cluster.submit(random.uniform(0.01, 0.03))
        jobs_cond.acquire()
        job.id = i
        # there is a chance the job may have finished and job_callback called by
        # this time, so put it in 'pending_jobs' only if job is pending
        if job.status == dispy.DispyJob.Created or job.status == dispy.DispyJob.Running:
            pending_jobs[i] = job
            # dispy.logger.info('job "%s" submitted: %s', i, len(pending_jobs))
            if len(pending_jobs) >= upper_bound:
                while len(pending_jobs) > lower_bound:
                    jobs_cond.wait()
        jobs_cond.release()

    cluster.wait()
    cluster.print_status()
    cluster.close()
    print('%s jobs submitted, %s done, %s failed' % (i, done, failed))
    sys.exit(1 if failed else 0)
