"""Python script (spec 6.2): distribute the standalone program dispy_program.py and run
it with the numbers 0..49 as arguments; print each run's exit status and output.

Run:  python examples/local_cluster.py examples/python_script.py
"""

import os, sys
import dispy

program = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dispy_program.py')
cluster = dispy.JobCluster(program)
jobs = []
for i in range(50):
    job = cluster.submit(str(i))  # a program's arguments must be strings
    job.id = i
    jobs.append(job)
failed = 0
for job in jobs:
    status = job()  # for a program, the result is its exit status
    print('job %s: exit status %s, output: %s' % (job.id, status, (job.stdout or '').strip()))
    if status != 0:
        print('job %s failed: %s %s' % (job.id, job.stderr, job.exception))
        failed += 1
cluster.print_status()
cluster.close()
sys.exit(1 if failed else 0)
