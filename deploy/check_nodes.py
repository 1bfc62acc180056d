#!/usr/bin/env python3
"""check_nodes.py: is dispynode up and usable on these hosts?

    python3 deploy/check_nodes.py --secret_file ~/.dispy-secret node1 node2 10.0.0.7

A small dispy client: it creates a JobCluster over the hosts named, waits (at most
--timeout seconds) for each node to take the cluster, runs one job on each, and prints
one line per host:

    node1: ok, 8 CPUs, node1, Python 3.11.2
    node2: no answer (firewall? dispynode not running? wrong secret?)

Exit status 0 if every host answered, 1 otherwise (2: bad command line). Copy it
anywhere beside dispy.py, or run it from the deploy/ folder of the repository:
dispy.py is looked for in this file's folder, then in its parent's.
"""

import argparse
import logging
import os
import sys
import threading
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
for _folder in (_HERE, os.path.dirname(_HERE)):
    if os.path.exists(os.path.join(_folder, 'dispy.py')):
        sys.path.insert(0, _folder)
        break

import dispy  # noqa: E402  (after the path above)

NO_ANSWER = 'no answer (firewall? dispynode not running? wrong secret?)'


def node_info():
    """The test job: what the node runs jobs with."""
    import platform
    implementation = platform.python_implementation()
    return '%s %s' % ('Python' if implementation == 'CPython' else implementation,
                      platform.python_version())


class Warnings(logging.Handler):
    """Keeps dispy's warnings: they say why a node that answered cannot be used."""

    def __init__(self, echo):
        super().__init__(logging.WARNING)
        self.messages = []
        self.echo = echo

    def emit(self, record):
        message = record.getMessage()
        self.messages.append(message)
        if self.echo:
            sys.stderr.write('dispy: %s\n' % message)

    def reason(self, addr):
        """Why node ``addr`` did not take the cluster, from what dispy logged."""
        for message in reversed(self.messages):
            if ('node %s ' % addr) not in message and ('node %s:' % addr) not in message:
                continue
            if 'failed authentication' in message:
                return 'answered, but failed authentication (wrong secret?)'
            if 'busy with another client' in message:
                return 'busy with another client (%s)' % message.split(': ', 1)[-1].split(
                    '; it will be used')[0]
            if 'not serving now' in message:
                return 'answered, but not serving now (--service_start/stop/end?)'
            if 'cannot use node' in message:
                return 'answered, but cannot be used: %s' % message.split(': ', 1)[-1]
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='check_nodes.py', description='Check that dispynode answers on each host and '
        'runs a job; exit status 0 if all do.')
    parser.add_argument('hosts', nargs='+', metavar='HOST', help='node host name or address')
    parser.add_argument('-s', '--secret', default=None,
                        help='the nodes\' secret (default: DISPY_SECRET, else none)')
    parser.add_argument('--secret_file', help='read the secret from the first line of this file')
    parser.add_argument('--node_port', type=int, default=None,
                        help='the nodes\' port (default: DISPY_NODE_PORT, else 51348)')
    parser.add_argument('-i', '--ip_addr', default=None,
                        help='this machine\'s address to use (default: all of them)')
    parser.add_argument('--client_port', type=int, default=None,
                        help='this client\'s UDP port (default 51347; 0 = any free port)')
    parser.add_argument('--certfile', help='TLS certificate, if the nodes use TLS')
    parser.add_argument('--keyfile', help='TLS private key, if not in --certfile')
    parser.add_argument('--cafile', help='CA certificates to verify the nodes against')
    parser.add_argument('--timeout', type=float, default=10.0,
                        help='seconds to wait for all nodes, jobs included (default 10)')
    parser.add_argument('-d', '--debug', action='store_true', help='show dispy\'s warnings')
    args = parser.parse_args(argv)
    if args.secret_file:
        try:
            with open(os.path.expanduser(args.secret_file)) as f:
                args.secret = f.readline().rstrip('\r\n')
        except OSError as exc:
            parser.error('cannot read --secret_file %s: %s' % (args.secret_file, exc.strerror))
    if args.timeout <= 0:
        parser.error('--timeout must be positive')
    return args


def check(args):
    """Returns ({host: line}, all_ok)."""
    deadline = time.monotonic() + args.timeout
    addrs, targets = {}, {}           # host -> address; address -> host as first named
    for host in args.hosts:
        addrs[host] = dispy.resolve_host(host)
        if addrs[host] is not None:
            targets.setdefault(addrs[host], host)
    results = {}                      # address -> line
    if targets:
        results = _check_addresses(args, targets, deadline)
    lines = {host: results[addr] if addr is not None else 'cannot resolve this name'
             for host, addr in addrs.items()}
    return lines, all(addr is not None and results[addr].startswith('ok,')
                      for addr in addrs.values())


def _check_addresses(args, targets, deadline):
    # Our handler on dispy's logger keeps its warnings from going straight to stderr:
    # what they say ends up in the per-host lines instead.
    warnings = Warnings(args.debug)
    dispy.logger.addHandler(warnings)
    cond = threading.Condition()
    nodes = {}                                  # address -> DispyNode once initialized

    def cluster_status(status, node, job):
        if status == dispy.DispyNode.Initialized and node is not None:
            with cond:
                addr = node.ip_addr if node.ip_addr in targets else next(
                    (a for a, h in targets.items() if h.lower() == str(node.name).lower()),
                    node.ip_addr)
                nodes.setdefault(addr, node)
                cond.notify_all()

    def finished():
        return len(jobs) == len(targets) and all(
            job.status not in (dispy.DispyJob.Created, dispy.DispyJob.Running,
                               dispy.DispyJob.ProvisionalResult) for job in jobs.values())

    jobs = {}                                   # address -> DispyJob
    cluster = dispy.JobCluster(
        node_info, nodes=list(targets), cluster_status=cluster_status, ip_addr=args.ip_addr,
        port=args.client_port, node_port=args.node_port, secret=args.secret,
        certfile=args.certfile, keyfile=args.keyfile, cafile=args.cafile,
        loglevel=logging.WARNING)
    try:
        # One job per node as soon as it is set up, while the others are still awaited.
        while True:
            with cond:
                ready = [(a, n) for a, n in nodes.items() if a in targets and a not in jobs]
            for addr, node in ready:
                jobs[addr] = cluster.submit_node(node)
            left = deadline - time.monotonic()
            if finished() or left <= 0:
                break
            with cond:
                cond.wait(min(left, 0.1))       # short: job ends are polled, not notified
    finally:
        cluster.close(timeout=1, terminate=True)
        dispy.logger.removeHandler(warnings)

    results = {}
    for addr in targets:
        node, job = nodes.get(addr), jobs.get(addr)
        if node is None:
            results[addr] = warnings.reason(addr) or NO_ANSWER
        elif job is None:
            results[addr] = 'answered, but the test job could not be submitted'
        elif job.status == dispy.DispyJob.Finished:
            results[addr] = 'ok, %s CPUs, %s, %s' % (node.avail_cpus, node.name, job.result)
        elif job.status == dispy.DispyJob.Terminated:
            results[addr] = 'answered, but the test job failed: %s' % (
                str(job.exception or '').strip().splitlines() or ['?'])[-1]
        else:
            results[addr] = 'answered, but the test job did not finish in %ss' % args.timeout
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        lines, all_ok = check(args)
    except (ValueError, OSError) as exc:        # e.g. a bad -i, a missing --certfile
        print('check_nodes.py: %s' % exc, file=sys.stderr)
        return 2
    for host in args.hosts:
        print('%s: %s' % (host, lines[host]), flush=True)
    return 0 if all_ok else 1


if __name__ == '__main__':
    sys.exit(main())
