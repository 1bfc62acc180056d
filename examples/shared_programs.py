"""Two programs' worth of clusters sharing one node through dispyscheduler (spec 002 §1.2).

SharedJobCluster is JobCluster with its jobs scheduled by a dispyscheduler that many
programs share; here two clusters of one program stand in for two programs.  Run a
scheduler (python dispyscheduler.py) on a host and give it as scheduler_node, or
against a private loopback node and scheduler with:
    python examples/local_cluster.py --scheduler examples/shared_programs.py
"""

def square(n):
    import socket
    return socket.gethostname(), n * n

def cube(n):
    import socket
    return socket.gethostname(), n ** 3

if __name__ == '__main__':
    import dispy, sys
    # scheduler_node defaults to this host (DISPY_SCHEDULER_NODE overrides it)
    squares = dispy.SharedJobCluster(square)
    cubes = dispy.SharedJobCluster(cube)
    jobs = [(squares.submit(i), cubes.submit(i)) for i in range(10)]
    failed = 0
    for i, (sq, cu) in enumerate(jobs):
        sq(), cu()
        if sq.status != dispy.DispyJob.Finished or cu.status != dispy.DispyJob.Finished:
            print('job %d failed: %s %s' % (i, sq.exception, cu.exception))
            failed += 1
            continue
        print('%d: %d on %s, %d on %s' % (i, sq.result[1], sq.result[0], cu.result[1],
                                         cu.result[0]))
    squares.print_status()
    squares.close()
    cubes.close()
    sys.exit(1 if failed else 0)
