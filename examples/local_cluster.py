#!/usr/bin/env python3
"""Run a dispy example against a private dispynode on loopback.

    python examples/local_cluster.py examples/sample.py [args...]

starts ``dispynode.py`` (from the repository root) on 127.0.0.1 at a free port with
a temporary ``--dest_path_prefix``, waits until it prints ``serving at
127.0.0.1:PORT``, then runs the example with the same interpreter and with the
environment that points dispy's defaults at that node:

    DISPY_NODES=127.0.0.1  DISPY_IP_ADDR=127.0.0.1  DISPY_PORT=0
    DISPY_NODE_PORT=PORT   PYTHONPATH=<repository root>:...

so the examples, written with default discovery as in the documentation, never
broadcast on the real network.  With ``--scheduler`` it also starts ``dispyscheduler.py``
on 127.0.0.1 (using that node) for examples that use ``SharedJobCluster``, and sets
``DISPY_SCHEDULER_NODE=127.0.0.1`` and ``DISPY_SCHEDULER_PORT``.  When the example ends (or on Ctrl-C, SIGTERM, a
timeout, or if the node dies) the node is stopped by PID -- SIGTERM, up to 10 s,
then SIGKILL -- the temporary folder is removed and the launcher exits with the
example's exit status (124 on timeout, 128+N if killed by signal N).

Standard library only.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST = '127.0.0.1'          # loopback only: never anything else
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE_SCRIPT = os.path.join(ROOT, 'dispynode.py')
SCHEDULER_SCRIPT = os.path.join(ROOT, 'dispyscheduler.py')
POLL = 0.05                 # seconds between checks of the child processes
NODE_STOP_WAIT = 10.0       # seconds between SIGTERM and SIGKILL for the node
EXAMPLE_STOP_WAIT = 5.0     # same, for the example
EXIT_TIMEOUT = 124          # as timeout(1)
EXIT_NODE_FAILED = 125      # node could not start, or died while the example ran


class Stop(Exception):
    """Raised (between steps) after SIGINT / SIGTERM / SIGHUP was received."""


def log(msg):
    print('local_cluster: %s' % msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='local_cluster.py',
        description='Start a dispynode on 127.0.0.1 at a free port, run a dispy example '
                    'program against it (through the DISPY_* environment variables), '
                    'then stop the node and exit with the example\'s exit status.',
        epilog='Exit status: the example\'s; %d if it timed out; %d if the node could '
               'not start or died; 130 on Ctrl-C. Example: python examples/local_cluster.py '
               '--cpus 2 examples/sample.py' % (EXIT_TIMEOUT, EXIT_NODE_FAILED))
    parser.add_argument('--cpus', type=int, metavar='N', default=None,
                        help='number of CPUs the node offers (passed as dispynode -c N); '
                             'default: the node\'s own default (all CPUs)')
    parser.add_argument('--cwd', metavar='DIR', default=None,
                        help='working directory of the example (default: the folder '
                             'that contains the example)')
    parser.add_argument('--timeout', type=float, metavar='SECONDS', default=300.0,
                        help='kill the example if it runs longer than this (default: 300)')
    parser.add_argument('--startup-timeout', type=float, metavar='SECONDS', default=20.0,
                        help='how long to wait for the node to be ready (default: 20)')
    parser.add_argument('--secret', default=None,
                        help='secret shared by node (-s) and client (DISPY_SECRET)')
    parser.add_argument('--scheduler', action='store_true',
                        help='also start dispyscheduler.py on 127.0.0.1 with that node, for '
                             'examples that use SharedJobCluster')
    parser.add_argument('--node-log', metavar='FILE', default=None,
                        help='also copy the node\'s output (stdout and stderr) to FILE')
    parser.add_argument('example', help='the Python program to run (e.g. examples/sample.py)')
    parser.add_argument('args', nargs=argparse.REMAINDER,
                        help='arguments passed to the example unchanged')
    return parser.parse_args(argv)


def free_port(host=HOST):
    """Returns a port that is free on ``host`` for both TCP and UDP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError('no free TCP+UDP port on %s' % host)


def start_node(port, dest_path, log_path, cpus=None, secret=None):
    """Starts dispynode in its own session; its stdout and stderr go to ``log_path``."""
    cmd = [sys.executable, NODE_SCRIPT, '-i', HOST, '-p', str(port),
           '--dest_path_prefix', dest_path, '--daemon']
    if cpus is not None:
        cmd += ['-c', str(cpus)]
    if secret:
        cmd += ['-s', secret]
    env = dict(os.environ, PYTHONUNBUFFERED='1')  # so "serving at" is not held in a buffer
    with open(log_path, 'wb') as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=os.path.dirname(log_path),
                                env=env, start_new_session=True)


def start_scheduler(port, node_port, dest_path, log_path, secret=None):
    """Starts dispyscheduler in its own session for the node (its output to
    ``log_path``): programs on ``port``, no announcement port (loopback only)."""
    cmd = [sys.executable, SCHEDULER_SCRIPT, '-i', HOST, '-p', str(port), '--client_port', '0',
           '-n', HOST, '--node_port', str(node_port), '--dest_path_prefix', dest_path,
           '--daemon']
    if secret:
        cmd += ['--node_secret', secret, '--cluster_secret', secret]
    with open(log_path, 'wb') as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=os.path.dirname(log_path),
                                env=dict(os.environ, PYTHONUNBUFFERED='1'),
                                start_new_session=True)


def read_text(path):
    try:
        with open(path, 'rb') as fd:
            return fd.read().decode('utf-8', 'replace')
    except OSError:
        return ''


def wait_node_ready(node, port, log_path, timeout):
    """Waits until the node's (or scheduler's) output has its "serving at
    127.0.0.1:PORT" line.

    Returns True when ready, False if the node exited or ``timeout`` passed.
    """
    ready = re.compile(r'serving at \[?%s\]?:%d\b' % (re.escape(HOST), port))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.search(read_text(log_path)):
            return True
        if node.poll() is not None:
            return False
        if _stop_signal is not None:
            raise Stop(_stop_signal)
        time.sleep(POLL)
    return False


def example_env(port, secret=None, scheduler_port=None):
    env = dict(os.environ)
    env.update(DISPY_NODES=HOST, DISPY_IP_ADDR=HOST, DISPY_PORT='0',
               DISPY_NODE_PORT=str(port), PYTHONUNBUFFERED='1')
    if scheduler_port:
        env.update(DISPY_SCHEDULER_NODE=HOST, DISPY_SCHEDULER_PORT=str(scheduler_port))
    env.pop('DISPY_SECRET', None)
    if secret:
        env['DISPY_SECRET'] = secret
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in
                                         env.get('PYTHONPATH', '').split(os.pathsep) if p])
    return env


def kill_group(proc, sig):
    """Sends ``sig`` to the session / process group that ``proc`` leads (POSIX only)."""
    if hasattr(os, 'killpg'):
        try:
            os.killpg(proc.pid, sig)  # started with start_new_session: pgid == pid
        except OSError:  # nothing left in the group
            pass


def stop_process(proc, wait):
    """SIGTERM to the PID, up to ``wait`` seconds, then SIGKILL.

    Whatever is left in its process group afterwards (e.g. a job process of the
    node, or a child of the example) is killed as well.
    """
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass
    if hasattr(signal, 'SIGKILL'):
        kill_group(proc, signal.SIGKILL)


def run_example(example, args, cwd, env, node, timeout):
    """Runs the example; returns its exit status (or ours for timeout / dead node)."""
    # own session, so that a timeout or Ctrl-C stops the example together with
    # whatever processes it started
    proc = subprocess.Popen([sys.executable, example] + list(args), cwd=cwd, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = proc.poll()
            if status is not None:
                return 128 - status if status < 0 else status
            if node.poll() is not None:
                log('dispynode exited (status %s) while the example ran' % node.returncode)
                return EXIT_NODE_FAILED
            if time.monotonic() > deadline:
                log('example timed out after %ss' % timeout)
                return EXIT_TIMEOUT
            if _stop_signal is not None:
                if _stop_signal == getattr(signal, 'SIGINT', None):
                    kill_group(proc, _stop_signal)  # pass the Ctrl-C on to the example
                    try:
                        proc.wait(EXAMPLE_STOP_WAIT)
                    except subprocess.TimeoutExpired:
                        pass
                raise Stop(_stop_signal)
            time.sleep(POLL)
    finally:
        stop_process(proc, EXAMPLE_STOP_WAIT)


_stop_signal = None  # set by on_signal; checked between steps, so cleanup always runs


def on_signal(signum, frame):
    global _stop_signal
    _stop_signal = signum


def main(argv=None):
    opts = parse_args(argv)
    example = os.path.abspath(opts.example)
    if not os.path.isfile(example):
        log('no such file: %s' % opts.example)
        return 2
    if not os.path.isfile(NODE_SCRIPT):
        log('dispynode.py not found at %s' % NODE_SCRIPT)
        return 2
    cwd = os.path.abspath(opts.cwd) if opts.cwd else os.path.dirname(example)
    for name in ('SIGINT', 'SIGTERM', 'SIGHUP'):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)

    tmp = tempfile.mkdtemp(prefix='dispy-local-')
    dest_path = os.path.join(tmp, 'dest')
    os.mkdir(dest_path)
    log_path = os.path.join(tmp, 'node.log')
    node = scheduler = None
    try:
        port = free_port()
        node = start_node(port, dest_path, log_path, opts.cpus, opts.secret)
        if not wait_node_ready(node, port, log_path, opts.startup_timeout):
            log('dispynode did not become ready (exit status %s); its output:\n%s'
                % (node.poll(), read_text(log_path)))
            return EXIT_NODE_FAILED
        log('dispynode (pid %s) serving at %s:%s' % (node.pid, HOST, port))
        scheduler_port = None
        if opts.scheduler:
            scheduler_port = free_port()
            sched_log = os.path.join(tmp, 'scheduler.log')
            os.mkdir(os.path.join(tmp, 'sched'))
            scheduler = start_scheduler(scheduler_port, port, os.path.join(tmp, 'sched'),
                                        sched_log, opts.secret)
            if not wait_node_ready(scheduler, scheduler_port, sched_log,
                                   opts.startup_timeout):
                log('dispyscheduler did not become ready (exit status %s); its output:\n%s'
                    % (scheduler.poll(), read_text(sched_log)))
                return EXIT_NODE_FAILED
            log('dispyscheduler (pid %s) serving at %s:%s' % (scheduler.pid, HOST,
                                                              scheduler_port))
        status = run_example(example, opts.args, cwd,
                             example_env(port, opts.secret, scheduler_port), node,
                             opts.timeout)
        if status == EXIT_NODE_FAILED:
            log('node output:\n%s' % read_text(log_path))
        return status
    except Stop as exc:
        log('stopped by signal %s' % exc.args[0])
        return 128 + exc.args[0]
    finally:  # signals only set a flag now, so this always runs to the end
        if scheduler is not None:
            stop_process(scheduler, NODE_STOP_WAIT)
        if node is not None:
            stop_process(node, NODE_STOP_WAIT)
        if opts.node_log:
            try:
                shutil.copyfile(log_path, opts.node_log)
            except OSError as exc:
                log('could not copy the node log: %s' % exc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
