"""Recovering jobs after a client crash (spec 6.11): a client submits jobs and 'crashes'
(exits without closing its cluster); then dispy.recover_jobs() reads the recover file
that client left in the current directory and collects the results from the nodes.

Run:  python examples/local_cluster.py examples/recover_jobs.py
(to recover after a real crash, run the spec's lines below in the crashed client's folder)
"""

import os, shutil, subprocess, sys, tempfile, time

def compute(n):
    import time
    time.sleep(2)
    return n * n

def crashing_client(njobs):
    # a client that submits jobs, waits until they run on nodes and then
    # crashes; its cluster keeps the recover file '_dispy_YYYYMMDDHHMMSS'
    import dispy
    cluster = dispy.JobCluster(compute)
    jobs = [cluster.submit(n) for n in range(njobs)]
    start = time.time()
    while True:
        running = sum(job.status == dispy.DispyJob.Running for job in jobs)
        # all jobs running, or (if the node has fewer CPUs) at least one
        if running == njobs or (running and time.time() > start + 5):
            break
        if time.time() > start + 15:
            print('client: jobs did not start running')
            os._exit(2)
        time.sleep(0.05)
    print('client: %s jobs running; crashing now' % running)
    sys.stdout.flush()
    os._exit(3)  # no cleanup, no cluster.close()

if __name__ == '__main__':
    if sys.argv[1:2] == ['--crash']:
        crashing_client(int(sys.argv[2]))
    # run the crashing client in a temporary folder, where its recover file goes
    script = os.path.abspath(__file__)
    cwd, tmp = os.getcwd(), tempfile.mkdtemp(prefix='recover_jobs-')
    os.chdir(tmp)
    try:
        njobs = 2
        if subprocess.call([sys.executable, script, '--crash', str(njobs)]) != 3:
            sys.exit(1)

        # the documentation's program: wait for the jobs that were running when
        # the client crashed and get their results
        import dispy
        jobs = dispy.recover_jobs()
        for job in jobs:
            print('Job result: %s' % job.result)
        # to free the nodes quickly instead, terminating jobs still running:
        #   jobs = dispy.recover_jobs(timeout=1, terminate_pending=True)
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)
    ok = jobs and all(job.result in [n * n for n in range(njobs)] for job in jobs)
    sys.exit(0 if ok else 1)
