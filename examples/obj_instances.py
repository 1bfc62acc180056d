"""Distributing objects (spec 6.4): class C is sent with 'depends' so that instances
created at the client can be arguments of 'compute' on the nodes.

Run:  python examples/local_cluster.py examples/obj_instances.py
"""

class C(object):
    def __init__(self, i, n):
        self.i = i
        self.n = n

    def show(self):
        print('%s: %.2f' % (self.i, self.n))

def compute(obj):
    # obj is an instance of C
    import time
    time.sleep(obj.n / 5.0)  # pretend to work (scaled down from the usual obj.n seconds)
    obj.show()  # the output is stored in job.stdout
    return obj.n

if __name__ == '__main__':
    import random, dispy, sys
    # 'compute' needs definition of class C, so include in 'depends'
    cluster = dispy.JobCluster(compute, depends=[C])
    jobs = []
    for i in range(10):
        c = C(i, random.uniform(1, 3)) # create object of C
        job = cluster.submit(c) # it is sent to a node for executing 'compute'
        job.id = c # store this object for later use
        jobs.append(job)
    failed = 0
    for job in jobs:
        job() # wait for job to finish
        if job.status != dispy.DispyJob.Finished:
            print('job %s failed: %s' % (job.id.i, job.exception))
            failed += 1
            continue
        print('%s: %.2f / %s' % (job.id.i, job.result, job.stdout))
    cluster.close()
    sys.exit(1 if failed else 0)
