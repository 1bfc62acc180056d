#!/usr/bin/env python3
"""W9: dispycos's task runtime design, one runner thread against a thread per task.

dispycos.py runs every task (a generator function) on ONE runner thread, which takes
turns between tasks at their yields.  The other design would be a thread per task
passing a baton at its yields.  This file measures both, with the same task code:

* ``BatonTask`` below is that other design, a comparison prototype the product
  never uses.  Each task is a ``threading.Thread`` that drives the generator through
  a trampoline.  One global lock, the baton, is held while task code runs and is let
  go at every yield, so, as with the runner, only one task's code runs at a time and
  the code between two yields is atomic.  ``receive`` / ``send`` use a mailbox and a
  condition of each task's own, ``finish`` / ``value`` a ``threading.Event``.
* The cases, each timed end-to-end in a fresh interpreter (``--child``) so that one
  design's threads, heap and memory figures do not affect the other's:

  spawn     N tasks, each ``msg = yield task.receive(); return msg``, are created, sent
            one message each, and waited for with ``value()``: tasks/s.
  pingpong  two tasks send 20,000 messages in all (10,000 round trips): switches/s,
            one switch for each message.
  memory    the growth of VmRSS (/proc/self/status) while N tasks are all blocked in
            ``receive()``, checked on each task's own state with a time limit, then
            released.  The C heap is trimmed (malloc_trim) before the baseline, so
            memory freed earlier is not reused unseen.  Also reported: the thread
            count, Python heap blocks per task, and the growth of the system-wide
            KernelStack (/proc/meminfo): a thread's kernel stack is not in RSS.  If
            the thread design cannot start all N threads, it reports how many it
            started and the error.

  Rounds alternate runner, thread, runner, thread, ... (3 rounds).  Each child has
  120 s.  Output is one JSON line per measurement and round, then one summary line per
  case with the medians and the runner/thread ratio.

Usage (from the repository root)::

    python3 bench/runtime_designs.py            # N = 10,000, 3 rounds
    python3 bench/runtime_designs.py --quick    # N = 2,000 (a smoke run)
    python3 bench/runtime_designs.py --rounds 5 --cases spawn,memory

Only in-process objects are used (no networking: a task's ``location`` is never asked).
"""

import argparse
import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import types

BENCH_FILE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(BENCH_FILE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CHILD_TIMEOUT = 120.0       # seconds, each child process
WAIT_LIMIT = 60.0           # seconds, every wait inside a child
PINGPONG_MESSAGES = 20000

# ======================================================================================
# The thread-per-task ("baton") runtime: a comparison prototype, not used by the product
# ======================================================================================

_baton = threading.Lock()   # held by the one task whose code runs between two yields


class _Receive:
    __slots__ = ('timeout', 'alarm_value')

    def __init__(self, timeout, alarm_value):
        self.timeout, self.alarm_value = timeout, alarm_value


class _Finish:
    __slots__ = ('task', 'timeout')

    def __init__(self, task, timeout):
        self.task, self.timeout = task, timeout


def _accepts_task(func):
    """The same rule as dispycos's runner (``task=`` is passed when taken)."""
    import dispycos
    return dispycos._accepts_task(func)


class BatonTask:
    """``BatonTask(genfunc, *args, **kwargs)``: a thread that runs ``genfunc`` (given
    ``task=`` when it takes it) with the baton held, and lets the baton go at each
    yield.  It has the same calls as dispycos.Task, limited to what W9 uses:
    ``yield task.receive(timeout)``, ``send`` (any thread), ``yield other.finish()``,
    ``value(timeout)`` (non-task threads).  A yielded generator runs as a sub-task
    whose return value is the yield's value.  Any other yielded value is a plain
    switch point and comes back as the yield's value.  ``thread.start()`` errors
    (RuntimeError: can't start new thread) reach the caller."""

    def __init__(self, target, *args, **kwargs):
        self._mailbox = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._done = threading.Event()
        self._value = self._exc = None
        self.receiving = False              # blocked in receive() (for the memory case)
        if _accepts_task(target):
            kwargs['task'] = self
        self._thread = threading.Thread(target=self._main, args=(target, args, kwargs),
                                        daemon=True, name='baton-task')
        self._thread.start()

    # -- the trampoline (the task's own thread) -------------------------------------------
    def _main(self, target, args, kwargs):
        _baton.acquire()
        try:
            gen = target(*args, **kwargs)
            if not isinstance(gen, types.GeneratorType):
                self._value = gen
                return
            stack, value, exc = [gen], None, None
            while stack:
                try:
                    if exc is not None:
                        exc, pending = None, exc
                        yielded = stack[-1].throw(pending)
                    else:
                        yielded = stack[-1].send(value)
                except StopIteration as stop:       # a (sub-)generator returned
                    stack.pop()
                    value = stop.value
                    continue
                except BaseException as error:      # into the caller, or the task failed
                    stack.pop()
                    if not stack:
                        raise
                    exc = error
                    continue
                if isinstance(yielded, types.GeneratorType):
                    stack.append(yielded)
                    value = None
                    continue
                value = self._switch(yielded)       # the baton goes to another task here
            self._value = value
        except BaseException as error:
            self._exc = error
        finally:
            with self._cond:
                self._mailbox.clear()
                self._done.set()
            _baton.release()

    def _switch(self, yielded):
        """At a yield: lets the baton go, waits for what the yield asked for, takes the
        baton back and returns the value the yield gives."""
        _baton.release()
        try:
            if type(yielded) is _Receive:
                deadline = (None if yielded.timeout is None
                            else time.monotonic() + yielded.timeout)
                with self._cond:
                    while not self._mailbox:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            return yielded.alarm_value
                        self.receiving = True
                        self._cond.wait(left)
                        self.receiving = False
                    return self._mailbox.popleft()
            if type(yielded) is _Finish:
                if not yielded.task._done.wait(yielded.timeout):
                    return None
                return yielded.task._result()
            return yielded
        finally:
            _baton.acquire()

    # -- the calls ------------------------------------------------------------------------
    def _check_self(self, what):
        if threading.current_thread() is not self._thread:
            raise RuntimeError('%s() must be called by the task itself, with yield' % what)

    def receive(self, timeout=None, alarm_value=None):
        self._check_self('receive')
        return _Receive(timeout, alarm_value)

    def send(self, message):
        with self._cond:
            if self._done.is_set():
                return 0                    # to a finished task: dropped
            self._mailbox.append(message)
            self._cond.notify()
        return 0

    def finish(self, timeout=None):
        if threading.current_thread() is self._thread:
            raise RuntimeError('a task cannot wait for itself to finish')
        return _Finish(self, timeout)

    def value(self, timeout=None):
        if threading.current_thread() is self._thread:
            raise RuntimeError('value() of the task itself')
        if not self._done.wait(timeout):
            return None
        return self._result()

    def _result(self):
        return self._exc if self._exc is not None else self._value

    def is_alive(self):
        return not self._done.is_set()


# ======================================================================================
# The task code both designs run
# ======================================================================================

def waiter(task=None):
    msg = yield task.receive()
    return msg


def pong(task=None):
    peer = yield task.receive()
    count = 0
    while True:
        msg = yield task.receive()
        if msg is None:
            return count
        count += 1
        peer.send(msg)


def ping(partner, round_trips, task=None):
    partner.send(task)
    for i in range(round_trips):
        partner.send(i)
        msg = yield task.receive()
        if msg != i:
            raise ValueError('ping: got %r, expected %r' % (msg, i))
    partner.send(None)
    return round_trips


# ======================================================================================
# One measurement in a child process
# ======================================================================================

def proc_status():
    """VmRSS and VmSize in bytes and Threads, from /proc/self/status."""
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, rest = line.partition(':')
            if key in ('VmRSS', 'VmSize'):
                out[key] = int(rest.split()[0]) * 1024
            elif key == 'Threads':
                out[key] = int(rest.split()[0])
    return out


def kernel_stack():
    """KernelStack of /proc/meminfo in bytes (system-wide: a thread's kernel stack is
    not in its process's RSS), or None."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('KernelStack:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def trim_heap():
    """Gives the C heap's free pages back (glibc malloc_trim), so that memory freed
    before the baseline (dispycos's import, the warm-up) is not reused unseen."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def task_class(design):
    if design == 'runner':
        import dispycos
        return dispycos.Task
    return BatonTask


def blocked_in_receive(design, task):
    """Whether ``task`` is suspended in receive() (read only, from another thread)."""
    if design == 'runner':
        return getattr(task, '_waiting', None) == 'receive'
    return task.receiving


def create(Task, n, *args):
    """Up to ``n`` tasks of ``waiter``: (tasks, error text or None)."""
    tasks = []
    try:
        for _ in range(n):
            tasks.append(Task(waiter, *args))
    except Exception as exc:            # RuntimeError: can't start new thread, MemoryError
        return tasks, '%s: %s' % (type(exc).__name__, exc)
    return tasks, None


def release(tasks, deadline):
    """Sends each task its index and checks the values it returns; the count of tasks
    that did not give theirs back in time."""
    for i, t in enumerate(tasks):
        t.send(i)
    bad = 0
    for i, t in enumerate(tasks):
        if t.value(max(0.01, deadline - time.monotonic())) != i:
            bad += 1
    return bad


def warm_up(Task):
    t = Task(waiter)
    t.send('warm')
    if t.value(WAIT_LIMIT) != 'warm':
        raise RuntimeError('warm-up task did not finish')


def child(case, design, n):
    Task = task_class(design)
    warm_up(Task)           # the runner thread (and dispycos's import) are fixed costs
    gc.collect()
    res = {'case': case, 'design': design}
    if case == 'spawn':
        t0 = time.perf_counter()
        tasks, error = create(Task, n)
        bad = release(tasks, time.monotonic() + WAIT_LIMIT)
        wall = time.perf_counter() - t0
        res.update(value=len(tasks) / wall if not error else None, unit='tasks/s',
                   tasks=len(tasks), wall_s=round(wall, 4), wrong_values=bad)
        if error:
            res['error'] = 'created %d of %d: %s' % (len(tasks), n, error)
    elif case == 'pingpong':
        round_trips = PINGPONG_MESSAGES // 2
        t0 = time.perf_counter()
        b = Task(pong)
        a = Task(ping, b, round_trips)
        got_a, got_b = a.value(WAIT_LIMIT), b.value(WAIT_LIMIT)
        wall = time.perf_counter() - t0
        ok = got_a == round_trips and got_b == round_trips
        res.update(value=2 * round_trips / wall if ok else None, unit='switches/s',
                   messages=2 * round_trips, wall_s=round(wall, 4))
        if not ok:
            res['error'] = 'ping gave %r, pong %r' % (got_a, got_b)
    elif case == 'memory':
        trim_heap()
        before, ks_before, blocks_before = proc_status(), kernel_stack(), \
            sys.getallocatedblocks()
        tasks, error = create(Task, n)
        deadline = time.monotonic() + WAIT_LIMIT
        blocked = 0
        while time.monotonic() < deadline:
            blocked = sum(1 for t in tasks if blocked_in_receive(design, t))
            if blocked == len(tasks):
                break
            time.sleep(0.02)
        gc.collect()
        during, ks_during, blocks_during = proc_status(), kernel_stack(), \
            sys.getallocatedblocks()
        bad = release(tasks, time.monotonic() + WAIT_LIMIT)
        growth = during['VmRSS'] - before['VmRSS']
        res.update(value=round(growth / 1e6, 3) if not error else None, unit='MB',
                   tasks=len(tasks), blocked=blocked,
                   bytes_per_task=round(growth / len(tasks)) if tasks else None,
                   rss_before_mb=round(before['VmRSS'] / 1e6, 2),
                   rss_blocked_mb=round(during['VmRSS'] / 1e6, 2),
                   vmsize_growth_mb=round((during['VmSize'] - before['VmSize']) / 1e6, 1),
                   python_blocks_per_task=(round((blocks_during - blocks_before) / len(tasks),
                                                 1) if tasks else None),
                   kernel_stack_growth_mb=(round((ks_during - ks_before) / 1e6, 1)
                                           if ks_before is not None else None),
                   threads=during['Threads'], wrong_values=bad)
        if error:
            res['error'] = 'created %d of %d: %s' % (len(tasks), n, error)
        elif blocked != len(tasks):
            res['error'] = 'only %d of %d tasks were blocked in receive() after %gs' % (
                blocked, len(tasks), WAIT_LIMIT)
    if res.get('wrong_values'):
        res.setdefault('error', '%d tasks gave a wrong value' % res['wrong_values'])
    return res


def child_main(case, design, n):
    try:
        res = child(case, design, n)
    except BaseException as exc:
        res = {'case': case, 'design': design, 'value': None,
               'error': '%s: %s' % (type(exc).__name__, exc)}
    sys.stdout.write(json.dumps(res) + '\n')
    sys.stdout.flush()
    os._exit(0)             # no atexit wait for tasks a failed run may have left


# ======================================================================================
# The driver
# ======================================================================================

UNITS = {'spawn': 'tasks/s', 'pingpong': 'switches/s', 'memory': 'MB'}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()


def log(text):
    sys.stderr.write('# %s\n' % text)
    sys.stderr.flush()


def run_child(case, design, n):
    cmd = [sys.executable, BENCH_FILE, '--child', case, design, str(n)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=CHILD_TIMEOUT, text=True)
    except subprocess.TimeoutExpired:      # subprocess.run kills the child
        return {'value': None, 'error': 'child timed out after %gs' % CHILD_TIMEOUT}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        return {'value': None, 'error': 'child exit %s: %s' % (
            proc.returncode, (proc.stderr.strip().splitlines() or ['no output'])[-1])}


def wait_for_dispycos(limit=240.0):
    """dispycos.py may be mid-edit: retries its import for up to ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        proc = subprocess.run([sys.executable, '-c', 'import dispycos; dispycos.Task'],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, timeout=CHILD_TIMEOUT)
        if proc.returncode == 0:
            return None
        error = (proc.stderr.strip().splitlines() or ['?'])[-1]
        if time.monotonic() >= deadline:
            return error
        log('dispycos does not import (%s); retrying in 15 s' % error)
        time.sleep(15)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='N = 2,000 tasks (smoke run)')
    ap.add_argument('--n', type=int, help='tasks for spawn and memory (default 10,000)')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--cases', default='spawn,pingpong,memory')
    ap.add_argument('--child', nargs=3, metavar=('CASE', 'DESIGN', 'N'),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1], int(args.child[2]))
    n = args.n or (2000 if args.quick else 10000)
    cases = [c for c in args.cases.split(',') if c]
    error = wait_for_dispycos()
    if error:
        log('dispycos does not import: %s (runner runs will fail)' % error)
    results = {(c, d): [] for c in cases for d in ('runner', 'thread')}
    for rnd in range(1, args.rounds + 1):
        for case in cases:
            for design in ('runner', 'thread'):
                res = run_child(case, design, n)
                line = {'bench': 'W9', 'case': case, 'design': design, 'round': rnd,
                        'value': res.get('value'), 'unit': UNITS[case], 'n': n}
                line.update((k, v) for k, v in res.items()
                            if k not in line and k not in ('case', 'design'))
                results[(case, design)].append(res)
                emit(line)
    for case in cases:
        summary = {'bench': 'W9', 'case': case, 'design': 'summary', 'n': n,
                   'unit': UNITS[case], 'rounds': args.rounds}
        for design in ('runner', 'thread'):
            runs = results[(case, design)]
            summary['%s_median' % design] = median(r.get('value') for r in runs)
            for extra in ('bytes_per_task', 'threads', 'tasks', 'kernel_stack_growth_mb'):
                if any(extra in r for r in runs):
                    summary['%s_%s' % (design, extra)] = median(r.get(extra) for r in runs)
            errors = [r['error'] for r in runs if r.get('error')]
            if errors:
                summary['%s_errors' % design] = errors
        r_med, t_med = summary['runner_median'], summary['thread_median']
        summary['ratio_runner_over_thread'] = (round(r_med / t_med, 3)
                                               if r_med is not None and t_med else None)
        emit(summary)


if __name__ == '__main__':
    main()
