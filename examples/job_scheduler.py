"""Scheduling jobs with cluster_status and submit_node (spec 6.8): whenever a node is
initialized or one of its jobs is done, the next data file is sent (dispy_job_depends)
to that node and its sha1 checksum computed there, so at most one job runs per node.

Run:  python examples/local_cluster.py examples/job_scheduler.py
(the data files data000..data009 are created in a temporary folder)
"""

# job computation runs at dispynode servers
def compute(path):
    import hashlib, time, os
    csum = hashlib.sha1()
    with open(os.path.basename(path), 'rb') as fd:
        while True:
            data = fd.read(1024000)
            if not data:
                break
            csum.update(data)
    return csum.hexdigest()

# 'cluster_status' callback function. It is called by dispy (client)
# to indicate node / job status changes. Here node initialization and
# job done status are used to schedule jobs, so at most one job is
# running on a node (even if a node has more than one processor). Data
# files are assumed to be 'data000', 'data001' etc.
def status_cb(status, node, job):
    global processed, failed
    if status == dispy.DispyJob.Finished:
        print('sha1sum for %s: %s' % (job.id, job.result))
        if job.result != expected[job.id]:
            print('  ... but expected %s' % expected[job.id])
            failed += 1
        processed += 1
    elif status in (dispy.DispyJob.Terminated, dispy.DispyJob.Cancelled,
                    dispy.DispyJob.Abandoned):
        print('sha1sum for %s failed: %s' % (job.id, job.exception))
        failed += 1
        processed += 1
    elif status == dispy.DispyNode.Initialized:
        print('node %s with %s CPUs available' % (node.ip_addr, node.avail_cpus))
    else:  # ignore other status messages
        return

    if processed == len(expected):  # all files done: let the main program finish
        all_done.set()
    global submitted
    cluster_created.wait()  # the status may arrive before 'cluster' below is assigned
    data_file = 'data%03d' % submitted
    if os.path.isfile(data_file):
        submitted += 1
        # 'node' and 'dispy_job_depends' are consumed by dispy;
        # 'compute' is called with only 'data_file' as argument(s)
        job = cluster.submit_node(node, data_file, dispy_job_depends=[data_file])
        job.id = data_file

if __name__ == '__main__':
    import dispy, sys, os, hashlib, shutil, tempfile, threading
    # create the data files (here 10 files of 1 MB) in a temporary folder
    cwd = os.getcwd()
    tmp = tempfile.mkdtemp(prefix='job_scheduler-')
    os.chdir(tmp)
    expected = {}  # data file -> its sha1 checksum computed locally
    for i in range(10):
        data_file = 'data%03d' % i
        data = os.urandom(1024 * 1024)
        with open(data_file, 'wb') as fd:
            fd.write(data)
        expected[data_file] = hashlib.sha1(data).hexdigest()
    processed = failed = 0
    all_done, cluster_created = threading.Event(), threading.Event()

    submitted = 0
    cluster = dispy.JobCluster(compute, cluster_status=status_cb)
    cluster_created.set()
    # the documentation's version reads commands ('quit') from stdin; this one
    # stops once all files are processed (or on Ctrl-C)
    while True:
        try:
            if all_done.wait(0.5):
                break
        except KeyboardInterrupt:
            break
    cluster.wait()
    cluster.print_status()
    cluster.close()
    os.chdir(cwd)
    shutil.rmtree(tmp, ignore_errors=True)
    print('%s of %s files processed, %s failed' % (processed, len(expected), failed))
    sys.exit(1 if failed or processed < len(expected) else 0)
