"""Watch a cluster in a web browser (the dispy web monitor, 4.15's dispy.httpd).

The program creates the server next to its cluster, prints where to open it and runs
its jobs; the page shows every node, its jobs and a throughput chart, and can cancel
jobs or change a node's CPUs.  Open http://127.0.0.1:8181/ on this machine; from a
phone or another computer use the address with ?token=... that the server prints.

Run:  python examples/local_cluster.py examples/web_monitor.py [PORT] [SECONDS_PER_JOB]
"""

import os, sys, dispy, dispy.httpd

def compute(n, delay):  # executed on nodes
    import time, socket
    time.sleep(delay)
    return (socket.gethostname(), n * n)

if __name__ == '__main__':
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8181
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    cluster = dispy.JobCluster(compute)
    # host='' (the default) serves every address of this machine; the example serves
    # only the client's own address when one is given (DISPY_IP_ADDR)
    host = os.environ.get('DISPY_IP_ADDR', '').split(',')[0]
    http_server = dispy.httpd.DispyHTTPServer(cluster, host=host, port=port, poll_sec=2)
    jobs = [cluster.submit(i, delay) for i in range(20)]
    cluster.wait(progress=True)     # jobs done / total, rate and ETA on stderr
    for job in jobs:
        host_name, square = job()
        print('job %s: %s on %s' % (job.id, square, host_name))
    http_server.shutdown()          # a page still polling gets the final figures first
    cluster.close()
