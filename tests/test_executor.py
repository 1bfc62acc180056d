"""dispy.ClusterExecutor: a concurrent.futures.Executor whose calls run on real nodes.

Nodes are real ``dispynode.py`` processes on loopback (127.0.0.2, 127.0.0.3) started by
``support.NodeProcess``; every executor names its nodes, ``ip_addr='127.0.0.1'`` and
``port=0`` (never discovery) and is ended by a cleanup (its cluster closed at once,
what still runs cancelled, then shutdown); every wait is bounded.

The functions submitted in this process are module-level functions of this module:
they travel by name, so the nodes run with ``PYTHONPATH`` at the repository (the node
must have the module, as for ProcessPoolExecutor's spawned workers).  Functions of a
main script travel as source with what they use: those tests run client scripts in a
fresh interpreter (``support.run_client``).

Classes, by topic:

    FuturesTest        submit/result, as_completed, wait(FIRST_COMPLETED, ALL_COMPLETED),
                       add_done_callback, map (order, several iterables, chunksize: one
                       job per chunk, timeout), different functions on one executor,
                       cancelling a queued future (it never runs), cluster_status passed on
    ExceptionsTest     a remote ValueError re-raised with the node's traceback as its
                       __cause__; exceptions that do not unpickle here or do not pickle
                       there → RemoteError; job_timeout → JobFailed; mistakes refused at
                       once (callback=, max_workers=0 also given first, uncallable fn,
                       unpicklable arguments)
    ShutdownTest       shutdown(wait=True, cancel_futures=True), shutdown(wait=False),
                       submit after shutdown, the with block
    NodeLossTest       the node running a call is killed: reentrant → the call's result
                       comes from the other node; not reentrant → JobFailed (Cancelled)
    MainScriptTest     a script's own functions: module imports, from-imports, constants,
                       a dict, an instance of its class, a helper, an lru_cache function,
                       a dataclass, a global the function assigns, a nested function, a
                       bound method; jobs of two functions on the
                       same workers do not see each other's globals; the script's own
                       exception class re-raised with its source line in the traceback;
                       an unpicklable global (a lock, an open file), an undefined name, a
                       closure and a lambda refused at submit, naming them
    PatternsTest       postponed annotations (``from __future__ import annotations``)
                       naming the class itself, a dotted import used by its path, a
                       static method and a super() method reached through their class,
                       a namedtuple made by a call
    ExitTest           a script that ends without shutdown waits for its calls
    ExampleTest        examples/executor.py, a ProcessPoolExecutor program whose one
                       changed line is its import, prints on the cluster exactly what it
                       prints with the standard ProcessPoolExecutor
"""

import concurrent.futures
import functools
import operator
import os
import signal
import threading
import time
import unittest

try:
    from tests import support
except ImportError:                         # run from inside tests/
    import support

import dispy
from dispy import DispyJob, DispyNode

CLIENT_IP = '127.0.0.1'
NODE_A = '127.0.0.2'
NODE_B = '127.0.0.3'
T = 30.0                # bound for waits that normally take well under a second
EXAMPLE = os.path.join(support.ROOT, 'examples', 'executor.py')


# ================================================================================
# Functions the executors of this process submit (the nodes import this module)
# ================================================================================

def square(x):
    return x * x


def cube(x):
    return x ** 3


def nap(seconds):
    time.sleep(seconds)
    return seconds


def nap_then_cwd(seconds):
    """The job's working directory tells which node ran it (each has its own)."""
    time.sleep(seconds)
    return os.getcwd()


def touch(path):
    with open(path, 'w'):
        pass
    return path


def parse_int(text):
    return int(text)


class TwoArgError(Exception):
    """Pickles (its args are its message) but does not unpickle: __init__ wants two."""

    def __init__(self, a, b):
        super().__init__('%s and %s' % (a, b))


class LockedError(Exception):
    """Does not pickle: it holds a lock."""

    def __init__(self):
        super().__init__('holding a lock')
        self.lock = threading.Lock()


def raise_two_arg():
    raise TwoArgError(1, 2)


def raise_locked():
    raise LockedError()


# ================================================================================
# Helpers
# ================================================================================

def start_node(test, ip, port=None, cpus=2):
    env = dict(os.environ, PYTHONPATH=support.ROOT)
    node = support.NodeProcess(ip, port=port, cpus=cpus, env=env)
    test.addCleanup(support.stop_node, node)
    node.start()
    return node


def end_now(executor):
    """Without waiting for the calls: the cluster closed at once (queued jobs cancelled,
    running ones killed), which ends every future; then the executor shut down."""
    support.close_now(executor.cluster)
    executor.shutdown(wait=True)


def make_executor(test, nodes, port, **options):
    executor = dispy.ClusterExecutor(nodes=list(nodes), ip_addr=CLIENT_IP, port=0,
                                     node_port=port, **options)
    test.addCleanup(end_now, executor)
    return executor


class StatusLog:
    """What a cluster_status callback was told: (status, node address, job id)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.events = []

    def __call__(self, status, node, job):
        with self.cond:
            self.events.append((status, node.ip_addr if node else None,
                                job.id if job else None, job.ip_addr if job else None))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout=T):
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.events), timeout)


class ExecutorTestCase(unittest.TestCase):
    """One node (127.0.0.2, 2 CPUs) for the class; executors made per test."""

    timeout = 120

    @classmethod
    def setUpClass(cls):
        env = dict(os.environ, PYTHONPATH=support.ROOT)
        cls.node = support.NodeProcess(NODE_A, cpus=2, env=env)
        cls.addClassCleanup(support.stop_node, cls.node)
        cls.node.start()

    def executor(self, **options):
        return make_executor(self, [NODE_A], self.node.port, **options)

    def tmpfile(self, name):
        return os.path.join(support.temp_folder(self), name)

    def run_script(self, source):
        """A client script (argv: the node, its port, the client's address) in a fresh
        interpreter; its stdout, once it exited 0."""
        proc = support.run_client(source, dict(os.environ, PYTHONPATH=support.ROOT),
                                  timeout=90, cwd=support.temp_folder(self),
                                  args=[NODE_A, str(self.node.port), CLIENT_IP])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        return proc.stdout


# ================================================================================
# The futures API
# ================================================================================

class FuturesTest(ExecutorTestCase):

    def test_submit_returns_a_standard_future_with_the_result(self):
        executor = self.executor()
        future = executor.submit(square, 7)
        self.assertIsInstance(future, concurrent.futures.Future)
        self.assertEqual(future.result(timeout=T), 49)
        self.assertEqual(executor.submit(pow, 2, exp=10).result(timeout=T), 1024)

    def test_as_completed_and_wait(self):
        executor = self.executor()
        futures = [executor.submit(square, i) for i in range(6)]
        done = list(concurrent.futures.as_completed(futures, timeout=T))
        self.assertEqual(sorted(f.result() for f in done), [i * i for i in range(6)])
        quick, slow = executor.submit(nap, 0.05), executor.submit(nap, 2.0)
        done, not_done = concurrent.futures.wait(
            [quick, slow], timeout=T, return_when=concurrent.futures.FIRST_COMPLETED)
        self.assertIn(quick, done)
        done, not_done = concurrent.futures.wait([quick, slow], timeout=T,
                                                 return_when=concurrent.futures.ALL_COMPLETED)
        self.assertEqual((done, not_done), ({quick, slow}, set()))
        self.assertEqual(slow.result(), 2.0)

    def test_add_done_callback(self):
        executor = self.executor()
        called = threading.Event()
        seen = []

        def callback(future):
            seen.append(future.result())
            called.set()
        future = executor.submit(cube, 3)
        future.add_done_callback(callback)
        self.assertTrue(called.wait(T))
        self.assertEqual(seen, [27])
        late = []          # added once done: called at once, in this thread
        future.add_done_callback(lambda f: late.append(threading.current_thread()))
        self.assertEqual(late, [threading.current_thread()])

    def test_map_in_order_with_chunks_one_job_each(self):
        log = StatusLog()
        executor = self.executor(cluster_status=log)
        self.assertEqual(list(executor.map(square, range(25), chunksize=4, timeout=T)),
                         [i * i for i in range(25)])
        self.assertTrue(log.wait_for(lambda events: sum(
            1 for e in events if e[0] == DispyJob.Finished) == 7),
            'cluster_status: 7 jobs (chunks of 4 calls) expected: %s' % log.events)
        self.assertEqual(list(executor.map(pow, [2, 3, 10], [5, 2], timeout=T)), [32, 9])
        self.assertEqual(list(executor.map(square, [])), [])
        with self.assertRaises(ValueError):
            executor.map(square, range(3), chunksize=0)

    def test_map_timeout(self):
        executor = self.executor()
        results = executor.map(nap, [3.0], timeout=0.2)
        with self.assertRaises(concurrent.futures.TimeoutError):
            next(results)

    def test_different_functions_on_one_executor(self):
        executor = self.executor()
        futures = [executor.submit(square, 3), executor.submit(cube, 3),
                   executor.submit(operator.add, 1, 2), executor.submit(str.upper, 'a'),
                   executor.submit(functools.partial(pow, 3), 2)]
        self.assertEqual([f.result(timeout=T) for f in futures], [9, 27, 3, 'A', 9])

    def test_cancel_a_queued_future(self):
        """Both CPUs busy: a third call is queued; cancelled, it is done at once (for
        wait()), its job is cancelled and the call never runs."""
        executor = self.executor()
        busy = [executor.submit(nap, 1.5) for _ in range(2)]
        path = self.tmpfile('ran')
        queued = executor.submit(touch, path)
        self.assertTrue(queued.cancel())
        self.assertTrue(queued.cancelled())
        done, _ = concurrent.futures.wait([queued], timeout=0)
        self.assertEqual(done, {queued})
        self.assertEqual([f.result(timeout=T) for f in busy], [1.5, 1.5])
        self.assertEqual(executor.submit(square, 2).result(timeout=T), 4)
        self.assertFalse(os.path.exists(path), 'the cancelled call ran')
        with self.assertRaises(concurrent.futures.CancelledError):
            queued.result()
        running = executor.submit(nap, 1.0)
        self.assertTrue(support.wait_until(running.running, T))
        self.assertFalse(running.cancel(), 'a running call cannot be cancelled')
        self.assertEqual(running.result(timeout=T), 1.0)


# ================================================================================
# Exceptions
# ================================================================================

class ExceptionsTest(ExecutorTestCase):

    def test_remote_value_error_with_its_traceback(self):
        executor = self.executor()
        with self.assertRaises(ValueError) as caught:
            executor.submit(parse_int, 'seven').result(timeout=T)
        self.assertIn("'seven'", str(caught.exception))
        cause = caught.exception.__cause__
        self.assertIsInstance(cause, dispy.RemoteTraceback)
        self.assertIn('in parse_int', cause.text)
        self.assertIn('return int(text)', cause.text)
        self.assertIn(NODE_A, str(cause))

    def test_exception_that_does_not_unpickle_here(self):
        executor = self.executor()
        with self.assertRaises(dispy.RemoteError) as caught:
            executor.submit(raise_two_arg).result(timeout=T)
        error = caught.exception
        self.assertEqual(error.type_name, 'TwoArgError')
        self.assertIn('cannot be unpickled here', str(error))
        self.assertIn('TwoArgError: 1 and 2', error.remote_traceback)
        self.assertIsInstance(error.__cause__, dispy.RemoteTraceback)

    def test_exception_that_does_not_pickle_on_the_node(self):
        executor = self.executor()
        with self.assertRaises(dispy.RemoteError) as caught:
            executor.submit(raise_locked).result(timeout=T)
        self.assertEqual(caught.exception.type_name, 'LockedError')
        self.assertIn('cannot be pickled on the node', str(caught.exception))
        self.assertIn('holding a lock', str(caught.exception))

    def test_job_timeout_is_a_job_failure(self):
        executor = self.executor(job_timeout=0.5)
        with self.assertRaises(dispy.JobFailed) as caught:
            executor.submit(nap, 10).result(timeout=T)
        self.assertEqual(caught.exception.status, DispyJob.Terminated)
        self.assertIn('timeout', str(caught.exception))
        self.assertEqual(executor.submit(square, 5).result(timeout=T), 25)

    def test_mistakes_are_refused_at_once(self):
        with self.assertRaisesRegex(TypeError, 'add_done_callback'):
            dispy.ClusterExecutor(nodes=[NODE_A], callback=print)
        with self.assertRaisesRegex(ValueError, 'max_workers'):
            dispy.ClusterExecutor(nodes=[NODE_A], max_workers=0)
        with self.assertRaisesRegex(ValueError, 'max_workers'):
            dispy.ClusterExecutor(0)            # ProcessPoolExecutor(0): its max_workers
        executor = self.executor(max_workers=3)        # accepted, ignored
        with self.assertRaisesRegex(TypeError, 'not callable'):
            executor.submit(42)
        with self.assertRaisesRegex(TypeError, 'cannot be pickled'):
            executor.submit(square, threading.Lock())
        self.assertEqual(executor.submit(square, 3).result(timeout=T), 9)


# ================================================================================
# Shutting down
# ================================================================================

class ShutdownTest(ExecutorTestCase):

    def test_shutdown_cancelling_the_queued_calls(self):
        executor = self.executor()
        running = [executor.submit(nap, 1.0) for _ in range(2)]
        self.assertTrue(support.wait_until(lambda: all(f.running() for f in running), T))
        paths = [self.tmpfile('queued%d' % i) for i in range(3)]
        queued = [executor.submit(touch, path) for path in paths]
        executor.shutdown(wait=True, cancel_futures=True)
        self.assertEqual([f.result(timeout=0) for f in running], [1.0, 1.0])
        self.assertTrue(all(f.cancelled() for f in queued), queued)
        self.assertFalse(any(os.path.exists(p) for p in paths))
        self.assertTrue(executor.cluster.is_closed())
        with self.assertRaisesRegex(RuntimeError, 'after shutdown'):
            executor.submit(square, 2)

    def test_shutdown_without_waiting(self):
        executor = self.executor()
        future = executor.submit(nap, 0.5)
        executor.shutdown(wait=False)
        with self.assertRaisesRegex(RuntimeError, 'after shutdown'):
            executor.submit(square, 2)
        self.assertEqual(future.result(timeout=T), 0.5)
        self.assertTrue(support.wait_until(executor.cluster.is_closed, T))

    def test_with_block_waits_for_the_calls(self):
        with dispy.ClusterExecutor(nodes=[NODE_A], ip_addr=CLIENT_IP, port=0,
                                   node_port=self.node.port) as executor:
            self.addCleanup(end_now, executor)
            futures = [executor.submit(nap, 0.3) for _ in range(3)]
        self.assertTrue(all(f.done() for f in futures))
        self.assertEqual([f.result() for f in futures], [0.3] * 3)
        self.assertTrue(executor.cluster.is_closed())


# ================================================================================
# A node lost while it runs a call
# ================================================================================

class NodeLossTest(unittest.TestCase):
    """Two nodes of one CPU; the one that runs the call is killed (SIGKILL)."""

    timeout = 120

    def run_and_kill(self, reentrant):
        port = support.free_port(NODE_A)
        nodes = {ip: start_node(self, ip, port, cpus=1) for ip in (NODE_A, NODE_B)}
        log = StatusLog()
        executor = make_executor(self, nodes, port, reentrant=reentrant, cluster_status=log)
        self.assertTrue(log.wait_for(lambda events: {e[1] for e in events if
                                                     e[0] == DispyNode.Initialized}
                                     == set(nodes)), 'nodes not set up: %s' % log.events)
        future = executor.submit(nap_then_cwd, 2.0)
        self.assertTrue(log.wait_for(lambda events: any(e[0] == DispyJob.Running
                                                        for e in events)))
        ran_on = [e[3] for e in log.events if e[0] == DispyJob.Running][0]
        victim = nodes[ran_on]
        self.addCleanup(support.kill_pids, victim.descendants())
        victim.signal(signal.SIGKILL)
        other = nodes[NODE_B if ran_on == NODE_A else NODE_A]
        return future, ran_on, other

    def test_reentrant_the_result_comes_from_the_other_node(self):
        future, ran_on, other = self.run_and_kill(reentrant=True)
        cwd = future.result(timeout=60)
        self.assertTrue(cwd.startswith(other.dest_path_prefix), (cwd, other.dest_path_prefix))

    def test_not_reentrant_the_future_gets_job_failed(self):
        future, ran_on, other = self.run_and_kill(reentrant=False)
        with self.assertRaises(dispy.JobFailed) as caught:
            future.result(timeout=60)
        self.assertEqual(caught.exception.status, DispyJob.Cancelled)
        self.assertIn(ran_on, str(caught.exception))


# ================================================================================
# Functions of a main script, and what they use
# ================================================================================

SHIPPING_CLIENT = r'''
import dataclasses
import functools
import json as js
import sys
import threading
from math import sqrt

import dispy

LIMIT = 10
TABLE = {'k': [1, 2, 3]}
LOCK = threading.Lock()
LOG = open(__file__)


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm(self):
        return sqrt(self.x ** 2 + self.y ** 2)


ORIGIN = Point(0, 0)


class ScriptError(Exception):
    pass


@functools.lru_cache(maxsize=None)
def double(n):
    return 2 * n


def helper(x):
    return min(x, LIMIT)


def uses_everything(x):
    p = Point(3, x)
    return js.dumps({'norm': p.norm(), 'capped': helper(x), 'k': TABLE['k'],
                     'double': double(x), 'origin': ORIGIN.norm()}, sort_keys=True)


def sees_others(_):
    return sorted(n for n in ('helper', 'Point', 'TABLE', 'js') if n in globals())


def raises(message):
    raise ScriptError(message)


def locked():
    with LOCK:
        return 1


def reads_log():
    return LOG.read()


def undefined():
    return NOT_DEFINED_ANYWHERE + 1


def make_nested():
    def nested(x):
        return x * 3
    return nested


def make_closure(k):
    def closure(x):
        return x * k
    return closure


@dataclasses.dataclass
class Box:
    side: int = LIMIT

    def area(self):
        return self.side * self.side


calls = 0


def counted():
    global calls
    calls += 1
    return calls, Box().area()


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return x * self.factor * LIMIT


if __name__ == '__main__':
    node, port, ip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with dispy.ClusterExecutor(nodes=[node], node_port=port, ip_addr=ip, port=0) as ex:
        print('EVERYTHING', ex.submit(uses_everything, 4).result(timeout=30), flush=True)
        for f in [ex.submit(uses_everything, i) for i in range(4)]:
            f.result(timeout=30)
        print('ISOLATED', sorted(set(map(tuple, ex.map(sees_others, range(6), timeout=30)))))
        print('NESTED', ex.submit(make_nested(), 5).result(timeout=30))
        print('METHOD', ex.submit(Scaler(2).scale, 3).result(timeout=30))
        print('COUNTED', [ex.submit(counted).result(timeout=30) for _ in range(2)])
        try:
            ex.submit(raises, 'bad input').result(timeout=30)
        except ScriptError as exc:
            print('SCRIPTERROR', exc, type(exc.__cause__).__name__,
                  'raise ScriptError(message)' in str(exc.__cause__), flush=True)
        for fn, args in ((locked, ()), (reads_log, ()), (undefined, ()),
                         (make_closure(2), (1,)), (lambda x: x, (1,))):
            try:
                ex.submit(fn, *args)
                print('ACCEPTED', fn.__name__)
            except (TypeError, NameError) as exc:
                print('REFUSED', fn.__name__, type(exc).__name__, exc, flush=True)
        print('STILL', ex.submit(helper, 20).result(timeout=30))
    LOG.close()
'''


class MainScriptTest(ExecutorTestCase):

    def test_a_scripts_functions_travel_with_what_they_use(self):
        out = self.run_script(SHIPPING_CLIENT)
        self.assertIn('EVERYTHING {"capped": 4, "double": 8, "k": [1, 2, 3], "norm": 5.0, '
                      '"origin": 0.0}', out)
        self.assertIn('ISOLATED [()]', out)
        self.assertIn('NESTED 15', out)
        self.assertIn('METHOD 60', out)
        self.assertIn('COUNTED [(1, 100), (1, 100)]', out)     # each job from the same globals
        self.assertIn('SCRIPTERROR bad input RemoteTraceback True', out)
        refused = {line.split()[1]: line for line in out.splitlines()
                   if line.startswith(('REFUSED', 'ACCEPTED'))}
        self.assertRegex(refused['locked'], r"REFUSED locked TypeError .*'LOCK'.*pickled")
        self.assertRegex(refused['reads_log'], r"REFUSED reads_log TypeError .*'LOG'")
        self.assertRegex(refused['undefined'],
                         r"REFUSED undefined NameError .*'NOT_DEFINED_ANYWHERE'")
        self.assertRegex(refused['closure'], r"REFUSED closure TypeError .*closure.*'k'")
        self.assertRegex(refused['<lambda>'], r'REFUSED <lambda> TypeError .*lambda')
        self.assertIn('STILL 10', out)


# What the review found ProcessPoolExecutor scripts use that had not travelled:
# postponed annotations naming the class itself, a dotted import used by its path, a
# static method and a super() method reached through their class, a namedtuple.
PATTERNS_CLIENT = r'''
from __future__ import annotations

import sys
import xml.etree.ElementTree
from collections import namedtuple
from dataclasses import dataclass

import dispy

Pair = namedtuple('Pair', 'a b', defaults=(0,))


@dataclass
class Vec:
    x: int
    y: int

    def add(self, other: Vec) -> Vec:
        return Vec(self.x + other.x, self.y + other.y)


class Shape:
    @staticmethod
    def unit_area():
        return 1

    def area(self):
        return 0


class Square(Shape):
    def __init__(self, side):
        self.side = side

    def area(self):
        return super().area() + self.side ** 2


def total(n):
    v = Vec(0, 0)
    for i in range(n):
        v = v.add(Vec(i, 1))
    return v


def tag_of(text):
    return xml.etree.ElementTree.fromstring(text).tag


def make_pair(a):
    return Pair(a)


if __name__ == '__main__':
    node, port, ip = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with dispy.ClusterExecutor(nodes=[node], node_port=port, ip_addr=ip, port=0) as ex:
        print('VEC', ex.submit(total, 4).result(timeout=30))
        print('TAG', [ex.submit(tag_of, '<r/>').result(timeout=30) for _ in range(4)])
        print('STATIC', ex.submit(Shape.unit_area).result(timeout=30))
        print('SUPER', ex.submit(Square.area, Square(3)).result(timeout=30))
        print('PAIR', ex.submit(make_pair, 1).result(timeout=30))
'''


class PatternsTest(ExecutorTestCase):

    def test_what_process_pool_scripts_use_travels_too(self):
        out = self.run_script(PATTERNS_CLIENT)
        self.assertIn('VEC Vec(x=6, y=4)', out)
        self.assertIn("TAG ['r', 'r', 'r', 'r']", out)
        self.assertIn('STATIC 1', out)
        self.assertIn('SUPER 9', out)
        self.assertIn('PAIR Pair(a=1, b=0)', out)


EXIT_CLIENT = r'''
import sys
import time

import dispy


def late_touch(path):
    time.sleep(1.0)
    with open(path, 'w') as f:
        f.write('done')


if __name__ == '__main__':
    node, port, ip, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    executor = dispy.ClusterExecutor(nodes=[node], node_port=port, ip_addr=ip, port=0)
    executor.submit(late_touch, path)
    print('SUBMITTED', flush=True)
'''


class ExitTest(ExecutorTestCase):

    def test_a_program_ending_without_shutdown_waits_for_its_calls(self):
        folder = support.temp_folder(self)
        path = os.path.join(folder, 'touched')
        proc = support.run_client(EXIT_CLIENT, dict(os.environ, PYTHONPATH=support.ROOT),
                                  timeout=60, cwd=folder,
                                  args=[NODE_A, str(self.node.port), CLIENT_IP, path])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('SUBMITTED', proc.stdout)
        self.assertEqual(support.read_file(path), 'done')
        self.assertNotIn('was not closed', proc.stderr)


# ================================================================================
# examples/executor.py: one line changed from a ProcessPoolExecutor program
# ================================================================================

class ExampleTest(ExecutorTestCase):

    def test_same_output_as_with_process_pool_executor(self):
        with open(EXAMPLE) as f:
            source = f.read()
        changed = 'from dispy import ClusterExecutor as ProcessPoolExecutor\n'
        original = 'from concurrent.futures import ProcessPoolExecutor\n'
        self.assertEqual(source.count(changed), 1)
        folder = support.temp_folder(self)
        env = support.client_env([NODE_A], node_port=self.node.port)
        on_cluster = support.run_client(EXAMPLE, env, timeout=90, cwd=folder)
        self.assertEqual(on_cluster.returncode, 0, on_cluster.stdout + on_cluster.stderr)
        standard = support.run_client(source.replace(changed, original), env, timeout=90,
                                      cwd=folder)
        self.assertEqual(standard.returncode, 0, standard.stdout + standard.stderr)
        self.assertIn('total: 4203 primes below 40000', on_cluster.stdout)
        self.assertEqual(on_cluster.stdout, standard.stdout)


if __name__ == '__main__':
    unittest.main()
