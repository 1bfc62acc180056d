#!/usr/bin/env python3
"""dispycos: distributed communicating tasks, and the pycos names its programs use.

Where dispy runs independent jobs, dispycos runs *tasks*: generator functions that
``yield`` whenever they wait (``yield task.sleep(1)``, ``msg = yield task.receive()``,
``rtask = yield computation.run(...)``), on long-lived server processes that exchange
messages with the client and with each other.  This module is the task runtime of
every such process (client, scheduler, node, server), the client API
(``Computation``, 4.12's ``Client``), the scheduler (``Scheduler()`` in a client, or
``python dispycos.py`` shared by many), and the pycos names pycos-era scripts use
(``import dispycos as pycos``).  ``dispycosnode.py`` is the node: it starts one
server process per CPU, each hosting this same runtime.

Threads of a process::

    pycos-tasks   the runner: the one thread that runs task code.  It takes turns
                  between tasks at their yields (code between two yields is atomic,
                  as pycos promises), keeps the timers of sleep / receive timeouts,
                  and handles every message for a task or a service (_Runner).
    pycos-io      dispy's IOLoop: every peer connection (reading, verifying and
                  decoding frames, writing), UDP discovery, pulses.  It never runs
                  task code, so a task that blocks without yielding (time.sleep in a
                  computation) delays no message reception and no pulse.
    pycos-listen  dispy's Listener (socketserver): accepts peers; handshakes run in
                  short-lived threads of their own.
    pycos-worker  dispy's WorkerThreads (at most 4): big frames, off the loop.
    pycos-blocking  one per AsyncPipe call while it blocks (a child program's pipes).
    the user's    may create tasks, send messages, ``task.value()``; calls that touch
    threads       task state are handed to the runner (``_Runner.post``).

Why one runner thread and not a thread per task: a task waiting in ``receive()`` is a
suspended generator (a few hundred bytes) rather than a thread (its stack, a kernel
task), and switching tasks is a function call rather than two thread wake-ups;
``bench/runtime_designs.py`` (W9) measures both (tasks per second, memory of 10,000 tasks
waiting in ``receive()``) against a thread-per-task runtime built for the comparison.

The path of a remote task (``rtask = yield computation.run(compute, n)``)::

    client task   Computation.run → a call (C) to the scheduler (a direct call when
        │         the scheduler is private, in this process) → queued until a server
        │         of the computation is free (one CPU-bound task running per server;
        ▼         once its tasks are known to be short, one more may wait there)
    scheduler     a call server.run(computation, function, args) to that server
        ▼  TCP, HMAC-authenticated frames (dispy's Channel), one connection per peer
    server        the runner makes a Task of the computation's function, in the
        │         namespace the computation's components were loaded into; the task
        │         reference (location + id) goes back; messages to and from it travel
        ▼         the same connections (T frames)
    server        when the task ends: sched.task_done (N, no answer) with its
                  MonitorStatus pickled → the scheduler frees the server, passes the
                  status on to status_task unopened, wakes run_result waiters (the
                  Computation unpickles it: a shared scheduler has none of the
                  client's classes)

Wire format: dispy's (handshake proving the secret, then HMAC-authenticated frames,
nothing unpickled before its HMAC is verified, frames decoded by dispy's restricted
unpickler).  User objects (messages, arguments, results) travel as pickled blobs
inside frames and are unpickled by the runner of the receiving process only.  A
message is a tuple (see "Peer messages" below).  Discovery datagrams are dispy's
HMAC'd JSON, never unpickled.

Sections: constants · logging · records (Location, MonitorStatus, ...) · the runner ·
Task · synchronisation (Event, Lock, Condition, Semaphore) · Channel · peers
(connections, calls) · Pycos · asyncfile · the scheduler · Computation · the
scheduler program.
"""

import atexit
import collections
import functools
import heapq
import inspect
import itertools
import logging
import os
import pickle
import queue
import re
import reprlib
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid

import dispy

__version__ = dispy.__version__
# ``from dispycos import *`` (4.12's ``from pycos.dispycos import *``) gives these.
__all__ = ['Task', 'Location', 'Channel', 'Pycos', 'MonitorStatus', 'MonitorException',
           'PeerStatus', 'Event', 'Lock', 'RLock', 'Condition', 'Semaphore',
           'BoundedSemaphore', 'logger', 'Logger', 'Computation', 'Client', 'Scheduler',
           'DispycosStatus', 'DispycosNodeAvailInfo', 'DispycosNodeAllocate', 'TaskInfo',
           'TaskError', 'PeerLost', 'MinPulseInterval', 'MaxPulseInterval', 'AsyncPipe',
           'NodeDiscovered', 'NodeInitialized', 'NodeClosed', 'ServerDiscovered',
           'ServerInitialized', 'ServerClosed', 'ServerAbandoned', 'TaskCreated',
           'ComputationScheduled', 'ComputationClosed', 'ClientScheduled', 'ClientClosed']

# ================================================================================
# Constants
# ================================================================================

SCHEDULER_PORT = 9705       # the shared scheduler (TCP), and schedulers' discovery (UDP)
NODE_PORT = 9706            # dispycosnode (TCP and UDP); its servers take the next ports
MinPulseInterval = 10       # seconds; bounds of a computation's pulse_interval
MaxPulseInterval = 10 * MinPulseInterval
DEAD_PULSES = 5             # a peer silent for this many pulse intervals is gone
MsgTimeout = dispy.MsgTimeout
BLOB_PROTOCOL = pickle.HIGHEST_PROTOCOL     # peers of one cluster run Python 3.8+
FLUSH_BYTES = 1 << 20       # messages queued for a peer leave in frames of about this


# ================================================================================
# Logging
# ================================================================================

class Logger:
    """pycos's level names: ``pycos.logger.setLevel(pycos.Logger.DEBUG)``."""
    DEBUG, INFO, WARNING, WARN = logging.DEBUG, logging.INFO, logging.WARNING, logging.WARNING
    ERROR, CRITICAL = logging.ERROR, logging.CRITICAL


def _make_logger():
    log = logging.getLogger('dispycos')
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s dispycos %(levelname)s: '
                                               '%(message)s', '%H:%M:%S'))
        log.addHandler(handler)
        log.propagate = False
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO if os.environ.get('DISPYCOS_DEBUG') is None
                     else logging.DEBUG)
    for name in ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'):
        setattr(log, name, getattr(logging, name))
    return log


logger = _make_logger()


# ================================================================================
# Records: what tasks receive and what scripts compare against
# ================================================================================

class Location:
    """Where a Pycos instance (and its tasks) is: an address and a TCP port."""

    __slots__ = ('addr', 'port')

    def __init__(self, addr, port):
        self.addr = addr
        self.port = int(port)

    def __eq__(self, other):
        return (isinstance(other, Location) and self.port == other.port
                and self.addr == other.addr)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((self.addr, self.port))

    def __str__(self):
        return '%s:%s' % (self.addr, self.port)

    __repr__ = __str__

    def __reduce__(self):
        return (Location, (self.addr, self.port))

    def key(self):
        return (self.addr, self.port)


class MonitorStatus:
    """What a monitor receives when a task it monitors ends: ``info`` is the task,
    ``type`` StopIteration (it finished; ``value`` is its value), GeneratorExit
    (terminated) or the exception's class (``value``: the traceback text)."""

    __slots__ = ('info', 'type', 'value')

    def __init__(self, info, type, value=None):
        self.info = info
        self.type = type
        self.value = value

    def __reduce__(self):
        return (MonitorStatus, (self.info, self.type, self.value))

    def __repr__(self):
        return 'MonitorStatus(%r, %s, %r)' % (self.info, getattr(self.type, '__name__', self.type),
                                              self.value)


MonitorException = MonitorStatus        # the seed's name


class PeerStatus:
    """Sent to the task given to ``Pycos.peer_status``: a peer came or went."""

    Online, Offline = 1, 0
    __slots__ = ('location', 'name', 'status')

    def __init__(self, location, name, status):
        self.location, self.name, self.status = location, name, status

    def __reduce__(self):
        return (PeerStatus, (self.location, self.name, self.status))

    def __repr__(self):
        return 'PeerStatus(%s, %s, %s)' % (self.location, self.name,
                                           'Online' if self.status else 'Offline')


class TaskError(Exception):
    """A remote task's failure as its caller sees it: the remote exception's text and
    traceback (its class may not exist here)."""

    def __init__(self, message, remote_type=None, remote_traceback=None):
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class PeerLost(ConnectionError):
    """A call could not be answered: the peer vanished or could not be reached."""


# ================================================================================
# The runner: the one thread that runs task code
# ================================================================================
#
# Task state (ready deque, mailboxes, timers, waiters) is touched only on the runner
# thread, so it needs no locks.  Other threads hand the runner calls through a
# SimpleQueue (``post``); the runner drains it between task steps.

_WAIT_RECEIVE, _WAIT_SLEEP, _WAIT_SUSPEND, _WAIT_OTHER = 'receive', 'sleep', 'suspend', 'other'
_wait_ids = itertools.count(1)


class _Runner:

    def __init__(self):
        self.inbox = queue.SimpleQueue()    # (func, args) from any thread
        self.calls = collections.deque()    # (func, args) posted from the runner itself
        self.ready = collections.deque()    # tasks to step
        self.timers = []                    # heap of (due, seq, handle, func, args)
        self.cancelled = 0                  # entries whose handle was cancelled
        self.seq = itertools.count()
        self.current = None                 # the task being stepped
        self.after_turn = []                # hooks run when the runner goes idle (flushes)
        self.live = 0                       # non-daemon tasks not finished
        self.idle = threading.Condition(threading.Lock())
        self.thread = threading.Thread(target=self._run, daemon=True, name='pycos-tasks')
        self.thread.start()

    def on_runner(self):
        return threading.current_thread() is self.thread

    def post(self, func, *args):
        """Runs ``func(*args)`` on the runner, after what it is doing (any thread)."""
        if threading.current_thread() is self.thread:
            self.calls.append((func, args))
        else:
            self.inbox.put((func, args))

    def call(self, func, *args):
        """Runs ``func`` now when on the runner, else posts it."""
        if threading.current_thread() is self.thread:
            func(*args)
        else:
            self.inbox.put((func, args))

    def call_later(self, delay, func, *args):
        """Runs ``func`` on the runner in ``delay`` seconds (runner only); returns a
        handle whose ``cancel`` is a flag set (the entry is skipped when due)."""
        handle = [True]
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.seq), handle,
                                     func, args))
        return handle

    # -- the loop ----------------------------------------------------------------------
    INBOX_BATCH = 256       # handed-over calls taken in before the tasks' turn

    def _run(self):
        inbox, ready = self.inbox, self.ready
        while True:
            for _ in range(self.INBOX_BATCH):       # what other threads handed over
                try:
                    func, args = inbox.get_nowait()
                except queue.Empty:
                    break
                self._guarded(func, args)
            self._run_calls()
            if self.timers:
                self._due_timers()
            for _ in range(len(ready)):
                task = ready.popleft()
                try:
                    task._step()
                except Exception:   # the runner's own fault: the task is lost, not us
                    logger.exception('dispycos: stepping task %s failed', task)
                    task._lost()
                self._run_calls()
            for hook in self.after_turn:            # what the tasks sent leaves now
                self._guarded(hook, ())
            if ready or self.calls or not inbox.empty():
                continue
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                func, args = inbox.get(timeout=timeout)
            except queue.Empty:
                continue
            self._guarded(func, args)

    def _run_calls(self):
        calls = self.calls
        while calls:
            func, args = calls.popleft()
            self._guarded(func, args)

    def _due_timers(self):
        now = time.monotonic()
        timers = self.timers
        while timers and timers[0][0] <= now:
            _due, _seq, handle, func, args = heapq.heappop(timers)
            if handle[0]:
                self._guarded(func, args)
            else:
                self.cancelled -= 1

    def timer_cancelled(self):
        """A timer's handle was cancelled: the heap is compacted when most of it is."""
        self.cancelled += 1
        if self.cancelled > 1024 and self.cancelled * 2 > len(self.timers):
            self.timers = [entry for entry in self.timers if entry[2][0]]
            heapq.heapify(self.timers)
            self.cancelled = 0

    @staticmethod
    def _guarded(func, args):
        try:
            func(*args)
        except Exception:
            logger.exception('dispycos: %s failed', getattr(func, '__qualname__', func))

    # -- non-daemon tasks keep a finished script alive (pycos's behaviour) -------------
    def task_started(self, task):
        if not task._daemon:
            with self.idle:
                self.live += 1

    def task_ended(self, task):
        if not task._daemon:
            with self.idle:
                self.live -= 1
                if self.live <= 0:
                    self.idle.notify_all()

    def daemon_changed(self, task, daemon):
        with self.idle:
            self.live += -1 if daemon else 1
            if self.live <= 0:
                self.idle.notify_all()

    def wait_idle(self, timeout=None):
        """Waits until no non-daemon task is left; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.idle:
            while self.live > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.idle.wait(left if left is not None else 1.0)
        return True


_runner = None
_runner_lock = threading.Lock()


def _the_runner():
    global _runner
    if _runner is None:
        with _runner_lock:
            if _runner is None:
                _runner = _Runner()
    return _runner


def run_without_network(func, args, dest_path=None, alive=None):
    """Runs generator function ``func(*args)`` as a task of this process with no
    network (a node's setup process: node_setup; ``Pycos().dest_path`` is
    ``dest_path``, and anything that needs the network fails), gives its value (or
    the exception it failed with), then stops the runner: the process has one thread
    again and may fork; the first task a child makes starts a fresh runtime.
    ``alive()``, if given, is asked every half second; False gives up the wait
    (None, the task left as it is)."""
    global _runner
    given_up = False
    pycos = Pycos()
    if dest_path:
        pycos.dest_path = dest_path
    pycos._no_network = 'this process has no network (node_setup)'
    try:
        task = Task(func, *args)
        for _ in itertools.count():
            value = task.value(0.5)
            if task._done:
                return value
            if alive is not None and not alive():
                given_up = True         # (the task may block its thread: not waited for)
                return None
    finally:
        runner = _runner
        if runner is not None and not given_up:
            runner.post(sys.exit)           # SystemExit ends the runner's loop
            runner.thread.join(10)
        _runner = None
        Pycos._instance = None
        _live_tasks.clear()


def _wait_for_tasks():
    """At exit: a script that created tasks and fell off its end waits for them."""
    if _runner is None or _runner.on_runner():
        return
    try:
        _runner.wait_idle()
    except KeyboardInterrupt:
        logger.info('interrupted while waiting for tasks to finish')


atexit.register(_wait_for_tasks)


# ================================================================================
# Task
# ================================================================================

def _accepts_task(func):
    """True when ``func`` takes a ``task`` argument (pycos passes the task itself);
    asked once a function (inspect.signature costs more than making the task)."""
    try:
        return _takes_task(func)
    except TypeError:                   # an unhashable callable
        return _takes_task.__wrapped__(func)


@functools.lru_cache(maxsize=1024)
def _takes_task(func):
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return 'task' in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _user_frames(exc):
    """A task's traceback without the runner's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def _returned_value(exc):
    """The value a generator ended with: ``return x``, or pycos 2-style ``raise
    StopIteration(x)``, which Python 3.7+ turns into RuntimeError (PEP 479)."""
    if isinstance(exc, StopIteration):
        return exc.args[0] if exc.args else _NO_VALUE
    cause = exc.__cause__
    if (isinstance(exc, RuntimeError) and isinstance(cause, StopIteration)
            and 'raised StopIteration' in str(exc)):
        return cause.args[0] if cause.args else _NO_VALUE
    return None


_NO_VALUE = object()


class Task:
    """A task: a generator function run by the runner, or a reference to a task of
    another process (``location`` tells which; both are ``Task``, so
    ``isinstance(rtask, pycos.Task)`` holds for remote ones).

    ``Task(genfunc, *args, **kwargs)`` starts it; ``genfunc`` receives ``task=`` (the
    task itself) when it takes that argument.  A plain function works too: it runs
    as one step.  Within the task, every blocking call is used with ``yield`` and
    gives its value: ``msg = yield task.receive(timeout)``.
    """

    _ids = None             # see _fresh_task_ids
    _registry = {}          # name -> local task (``register``)
    # slots: 10,000 tasks waiting in receive() are 10,000 of these (W9 measures it)
    __slots__ = ('_runner', '_remote', '_id', '_name', '_target', '_stack', '_mailbox',
                 '_waiting', '_wait_id', '_ending', '_wait_timer', '_wait_alarm',
                 '_resume_value', '_resume_exc', '_scheduled', '_value', '_exception',
                 '_done', '_done_event', '_finish_waiters', '_monitors', '_daemon',
                 '_location', '_terminated', '_end_status', '_registered', '_held_call',
                 '__weakref__')

    def __init__(self, target, *args, **kwargs):
        self._prepare(target, kwargs)
        self._runner.call(self._start, args, kwargs)

    @classmethod
    def _held(cls, target, args, kwargs):
        """A task made but not started: ``release()`` starts it (a server's
        CPU-bound task queued behind the one running)."""
        task = cls.__new__(cls)
        task._prepare(target, kwargs)
        task._held_call = (args, kwargs)
        return task

    def _release_held(self):
        args, kwargs = self._held_call
        del self._held_call
        if not self._done:
            self._runner.call(self._start, args, kwargs)

    def _prepare(self, target, kwargs):
        self._runner = _the_runner()
        self._remote = None             # Location of a remote task's process
        self._id = next(Task._ids)
        self._name = getattr(target, '__name__', 'task')
        self._target = target
        self._stack = []
        self._mailbox = None            # a deque once a message waits (most never do)
        self._waiting = None            # one of _WAIT_* while suspended
        self._wait_id = 0               # which suspension (see _wait_for)
        self._ending = False
        self._wait_timer = None
        self._wait_alarm = None
        self._resume_value = None
        self._resume_exc = None
        self._scheduled = False
        self._value = None
        self._exception = None          # (type, traceback text) of a failed task
        self._done = False
        self._done_event = None         # threading.Event for value() from other threads
        self._finish_waiters = ()       # tasks in yield finish(), callbacks (a list then)
        self._monitors = ()             # tasks (local or remote) told when this ends
        self._daemon = False
        self._location = None
        self._terminated = False
        _live_tasks[self._id] = self
        if _accepts_task(target):
            kwargs['task'] = self
        Pycos.instance()
        self._runner.task_started(self)

    @classmethod
    def _reference(cls, location, tid, name):
        """A reference to task ``tid`` of the process at ``location``."""
        task = cls.__new__(cls)
        task._remote = location
        task._id = tid
        task._name = name
        task._location = location
        task._runner = None
        task._done = False
        task._daemon = True
        return task

    def __reduce__(self):
        return (_task_from_reference, (self.location.addr, self.location.port, self._id,
                                       self._name))

    # -- identity -----------------------------------------------------------------------
    @property
    def location(self):
        if self._location is None:
            self._location = Pycos.instance().location
        return self._location

    @property
    def name(self):
        return '%s/%s' % (self._name, self._id)

    def __str__(self):
        loc = self._location if self._location is not None else (
            Pycos._instance._location if Pycos._instance is not None else None)
        return '%s/%s@%s' % (self._name, self._id, loc) if loc else self.name

    __repr__ = __str__

    def __eq__(self, other):
        if not isinstance(other, Task):
            return False
        if self is other:
            return True
        return self._id == other._id and self._key_location() == other._key_location()

    def __hash__(self):
        return hash(self._id)

    def _key_location(self):
        if self._remote is not None:
            return self._remote
        return Pycos._instance._location if Pycos._instance is not None else None

    @property
    def is_remote(self):
        return self._remote is not None

    def is_alive(self):
        return self._remote is not None or not self._done

    # -- running (runner thread) ------------------------------------------------------------
    def _start(self, args, kwargs):
        try:
            gen = self._target(*args, **kwargs)
        except BaseException as exc:
            self._end(exc)
            return
        if inspect.isgenerator(gen):
            self._stack.append(gen)
            self._schedule(None)
        else:
            self._value = gen
            self._end(None)

    def _schedule(self, value=None, exc=None):
        self._resume_value, self._resume_exc = value, exc
        if not self._scheduled:
            self._scheduled = True
            self._runner.ready.append(self)

    def _step(self):
        self._scheduled = False
        if self._done or not self._stack:
            return
        gen = self._stack[-1]
        value, exc = self._resume_value, self._resume_exc
        self._resume_value = self._resume_exc = None
        runner = self._runner
        runner.current = self
        try:
            if exc is not None:
                yielded = gen.throw(exc)
            else:
                yielded = gen.send(value)
        except BaseException as exc2:
            runner.current = None
            self._stack.pop()
            returned = _returned_value(exc2)
            if returned is not None:
                if returned is not _NO_VALUE:
                    self._value = returned
                if self._stack:
                    self._schedule(None if returned is _NO_VALUE else returned)
                else:
                    self._end(None)
            elif self._stack and not isinstance(exc2, GeneratorExit):
                self._schedule(exc=exc2)        # into the calling generator
            else:
                self._end(exc2)
            return
        runner.current = None
        if self._waiting is not None:
            return                              # a blocking call suspended it
        if inspect.isgenerator(yielded):
            self._stack.append(yielded)         # a sub-generator: run it, give its value
            self._schedule(None)
        else:
            self._value = yielded
            self._schedule(yielded)

    def _end(self, exc):
        """The task is over: record how, tell monitors and waiters.  It counts as
        done only once that is recorded (its finally blocks have run by then)."""
        if self._done or self._ending:
            return
        self._ending = True
        for gen in reversed(self._stack):
            try:
                gen.close()
            except BaseException:
                pass
        self._stack = []
        self._cancel_wait()
        self._mailbox = None
        if exc is None:
            status = MonitorStatus(self, StopIteration, self._value)
        elif isinstance(exc, GeneratorExit):
            status = MonitorStatus(self, GeneratorExit, 'terminated')
        else:
            text = ''.join(traceback.format_exception(type(exc), exc, _user_frames(exc)))
            self._exception = (type(exc), text, exc)
            status = MonitorStatus(self, type(exc), text)
            if not self._monitors and not self._finish_waiters:
                logger.warning('task %s failed:\n%s', self, text.rstrip())
        self._end_status = status
        self._done = True
        for monitor in self._monitors:
            _tell_monitor(monitor, status)
        self._monitors = ()
        for waiter in self._finish_waiters:
            if callable(waiter):
                _Runner._guarded(waiter, (self,))
            else:
                waiter[0]._wake_wait(waiter[1], self._result())
        self._finish_waiters = ()
        if self._done_event is not None:
            self._done_event.set()
        name = getattr(self, '_registered', None)
        if name is not None and Task._registry.get(name) is self:
            del Task._registry[name]
        _live_tasks.pop(self._id, None)
        _remember_ended(self)
        self._runner.task_ended(self)

    def _lost(self):
        """The end of a task whose step failed in the runner itself (not in its
        code): counted as ended, so the program's exit does not wait for it."""
        if not self._done:
            self._done = True
            _live_tasks.pop(self._id, None)
            self._runner.task_ended(self)

    def _result(self):
        """What finish() / value() give: the value, or the exception it failed with."""
        if self._exception is not None:
            return self._exception[2]
        return self._value

    # -- suspending and waking (runner thread) --------------------------------------------
    def _check_self(self, what):
        if self._remote is not None:
            raise RuntimeError('%s() is for a task of this process, not %s' % (what, self))
        if self._runner.current is not self:
            raise RuntimeError('%s() must be called by the task itself (task %s), with yield'
                               % (what, self))

    def _suspend(self, kind, timeout, alarm):
        self._wait_id = next(_wait_ids)
        self._waiting = kind
        self._wait_alarm = alarm
        if timeout is not None:
            self._wait_timer = self._runner.call_later(max(0.0, timeout), self._alarm, kind)

    def _alarm(self, kind):
        if self._waiting == kind:
            self._wait_timer = None
            self._wake(self._wait_alarm)

    def _wake_wait(self, wait_id, value=None, exc=None):
        """Wakes the task if it is still in the wait ``wait_id``; True if so (a
        thread that is not the runner hands it over, and gets True)."""
        if not self._runner.on_runner():
            self._runner.post(self._wake_wait, wait_id, value, exc)
            return True
        if self._waiting == _WAIT_OTHER and self._wait_id == wait_id and not self._done:
            self._wake(value, exc)
            return True
        return False

    def _cancel_wait(self):
        self._waiting = None
        if self._wait_timer is not None:
            self._wait_timer[0] = False
            self._wait_timer = None
            self._runner.timer_cancelled()

    def _wake(self, value=None, exc=None):
        if not self._runner.on_runner():
            self._runner.post(self._wake, value, exc)
            return
        if self._done:
            return
        self._cancel_wait()
        self._schedule(value, exc)

    # -- the calls a task makes on itself, with yield ---------------------------------------
    def receive(self, timeout=None, alarm_value=None):
        """``msg = yield task.receive(timeout)``: the next message, or ``alarm_value``
        once ``timeout`` seconds passed without one."""
        self._check_self('receive')
        if self._mailbox:
            return self._mailbox.popleft()
        # timeout 0 still lets the runner take in what arrived while this task ran
        # (a long step without yields): messages come before the zero-delay alarm.
        self._suspend(_WAIT_RECEIVE, None if timeout is None else max(0.0, timeout),
                      alarm_value)
        return None

    recv = receive

    def sleep(self, timeout=None):
        """``yield task.sleep(seconds)``: messages do not end it, ``resume`` does."""
        self._check_self('sleep')
        if timeout is not None and timeout <= 0:
            return 0
        self._suspend(_WAIT_SLEEP, timeout, 0)
        return None

    def suspend(self, timeout=None, alarm_value=None):
        """``value = yield task.suspend(timeout)``: until ``resume(value)``."""
        self._check_self('suspend')
        self._suspend(_WAIT_SUSPEND, timeout, alarm_value)
        return None

    hibernate = suspend

    def _wait_for(self, timeout=None, alarm_value=None):
        """Suspends for a wake from something else (an event, a call's answer);
        the waker keeps ``(task, wait id)`` and wakes with ``_wake_wait``, so a wait
        that timed out is never ended by what it no longer waits for."""
        self._check_self('wait')
        self._suspend(_WAIT_OTHER, timeout, alarm_value)
        return (self, self._wait_id)

    def resume(self, update=None):
        """Wakes a task in ``sleep`` or ``suspend`` with ``update``; 0, or -1."""
        if self._remote is not None:
            return -1
        if self._runner.on_runner():
            return self._resume(update)
        self._runner.post(self._resume, update)
        return 0

    wakeup = resume

    def _resume(self, update):
        if self._waiting in (_WAIT_SLEEP, _WAIT_SUSPEND):
            self._wake(update)
            return 0
        return -1

    # -- messages -------------------------------------------------------------------------
    def send(self, message):
        """Queues ``message`` for the task (any picklable object to a remote task);
        returns 0.  Never blocks."""
        if self._remote is not None:
            Pycos.instance().peers.send_task(self, message)
            return 0
        self._runner.call(self._deliver_local, message)
        return 0

    def _deliver_local(self, message):
        if self._done:
            logger.debug('message to finished task %s dropped', self)
            return False
        if self._waiting == _WAIT_RECEIVE:
            self._wake(message)
        else:
            if self._mailbox is None:
                self._mailbox = collections.deque()
            self._mailbox.append(message)
        return True

    def deliver(self, message, timeout=None, n=1):
        """``n = yield task.deliver(message, timeout)``: like send, but waits until the
        message is in the task's mailbox; 1 once it is, 0 if it could not be, or
        -1 on timeout."""
        if self._remote is None:
            if self._done:
                return 0
            self._runner.call(self._deliver_local, message)
            return 1
        return Pycos.instance().peers.deliver_task(self, message, timeout)

    # -- ending ------------------------------------------------------------------------------
    def finish(self, timeout=None):
        """``value = yield other.finish(timeout)``: waits until ``other`` ends and gives
        its value (the exception it raised, if it failed)."""
        if self._remote is not None:
            # the remote side waits ``timeout``; the call allows for the trip on top
            return Pycos.instance().peers.call(
                self._remote, 'task.wait', (self._id, timeout),
                timeout=None if timeout is None else timeout + MsgTimeout)
        current = self._runner.current if self._runner.on_runner() else None
        if current is None:
            raise RuntimeError('finish() is used with yield in a task; use value() elsewhere')
        if current is self:
            raise RuntimeError('a task cannot wait for itself to finish')
        if self._done:
            return self._result()
        self._add_finish_waiter(current._wait_for(timeout))
        return None

    def value(self, timeout=None):
        """The task's value once it ended (blocks the calling thread; not for tasks:
        they use ``yield task.finish()``)."""
        if self._remote is not None:
            return Pycos.instance().peers.call_blocking(
                self._remote, 'task.wait', (self._id, timeout),
                None if timeout is None else timeout + MsgTimeout)
        if self._runner.on_runner():
            if self._done:
                return self._result()
            raise RuntimeError('value() would block the tasks: use yield task.finish()')
        if not self._done:
            with _runner_lock:
                if self._done_event is None:
                    self._done_event = threading.Event()
            if self._done:
                self._done_event.set()
            if not self._done_event.wait(timeout):
                return None
        return self._result()

    def terminate(self):
        """Ends the task (it may be blocked): GeneratorExit at its yield, its
        ``finally`` blocks run, monitors get MonitorStatus(task, GeneratorExit).
        0, or -1 if it had ended."""
        if self._remote is not None:
            Pycos.instance().peers.notify(self._remote, 'task.terminate', (self._id,))
            return 0
        if self._done:
            return -1
        self._runner.post(self._terminate)
        return 0

    def _terminate(self):
        if self._done:
            return
        self._terminated = True
        self._value = None              # a terminated task has no value
        self._end(GeneratorExit('terminated'))

    def throw(self, *args):
        """Raises an exception in the task at its yield: ``throw(exc_type, exc)``."""
        if not args:
            raise TypeError('throw() needs an exception')
        exc = args[1] if len(args) > 1 and isinstance(args[1], BaseException) else args[0]
        if isinstance(exc, type):
            exc = exc(*args[1:2]) if len(args) > 1 else exc()
        if self._remote is not None:
            Pycos.instance().peers.notify(self._remote, 'task.throw', (self._id, exc))
            return 0
        if self._done:
            return -1
        self._runner.call(self._wake, None, exc)
        return 0

    # -- monitors, names, daemons ----------------------------------------------------------------
    def monitor(self, observe):
        """``yield task.monitor(other)``: ``task`` receives MonitorStatus when ``other``
        ends (other may be remote)."""
        if observe._remote is not None:
            return Pycos.instance().peers.call(observe._remote, 'task.monitor',
                                                (observe._id, self))
        self._runner.call(observe._add_monitor, self)
        return 0

    def _add_monitor(self, monitor):
        if self._done:
            monitor.send(MonitorStatus(self, *(self._exception[:2] if self._exception
                                               else (StopIteration, self._value))))
        elif monitor not in self._monitors:
            self._monitors = list(self._monitors) + [monitor]

    def _add_finish_waiter(self, waiter):
        """A (task, wait id) in finish(), or a callable(task), told when this ends."""
        if not self._finish_waiters:
            self._finish_waiters = []
        self._finish_waiters.append(waiter)
        if isinstance(waiter, tuple):
            waiters = [w for w in self._finish_waiters if isinstance(w, tuple)]
            if len(waiters) >= 64 and len(waiters) & (len(waiters) - 1) == 0:
                callbacks = [w for w in self._finish_waiters if not isinstance(w, tuple)]
                _prune(waiters)
                self._finish_waiters = callbacks + waiters

    def register(self, name=None):
        """Registers the task under ``name`` (default: its function's name) so other
        processes find it with ``Task.locate(name)``; 0, or -1 if taken."""
        if self._remote is not None:
            return -1
        name = name or self._name
        other = Task._registry.get(name)
        if other is not None and other is not self and not other._done:
            return -1
        Task._registry[name] = self
        self._registered = name
        return 0

    def unregister(self, name=None):
        name = name or getattr(self, '_registered', None)
        if name and Task._registry.get(name) is self:
            del Task._registry[name]
            return 0
        return -1

    @staticmethod
    def locate(name, location=None, timeout=None):
        """``rtask = yield Task.locate(name, location)``: the task registered under
        ``name`` at ``location`` (or at any known peer), or None."""
        return Pycos.instance()._locate('task', name, location, timeout)

    def set_daemon(self, flag=True):
        """A daemon task does not keep the program alive at its end."""
        if self._remote is None:
            self._runner.call(self._set_daemon, bool(flag))

    def _set_daemon(self, flag):
        if flag != self._daemon and not self._done:
            self._daemon = flag
            self._runner.daemon_changed(self, flag)


def _tell_monitor(monitor, status):
    """Sends a MonitorStatus; one whose value does not pickle (for a remote monitor)
    goes with a description of it instead."""
    try:
        monitor.send(status)
    except Exception:
        try:
            monitor.send(MonitorStatus(status.info, status.type, _portable(status.value)))
        except Exception:
            logger.exception('the end of task %s could not be told to %s', status.info, monitor)


def _fresh_task_ids():
    """Task ids start at a random number in each process (and each forked one): a
    server restarted on the same port makes no task whose reference equals one of
    the process before it."""
    Task._ids = itertools.count(1 + int.from_bytes(os.urandom(4), 'big') * 1000)


_fresh_task_ids()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_fresh_task_ids)


def _task_from_reference(addr, port, tid, name):
    """Unpickles a task reference: the task itself in its own process."""
    inst = Pycos._instance
    location = Location(addr, port)
    if inst is not None and inst._location == location:
        task = inst._tasks_by_id(tid)
        if task is not None:
            return task
    return Task._reference(location, tid, name)


def current_task():
    runner = _runner
    return runner.current if runner is not None and runner.on_runner() else None


# ================================================================================
# Synchronisation: generator-aware Event, Lock, RLock, Condition, Semaphore
# ================================================================================
#
# Used with yield in tasks (``yield lock.acquire()``); their state is the runner's.

def _prune(waiters):
    """Drops the entries of waits that ended otherwise (timed out), once there are
    many: a list polled with short timeouts does not grow for ever."""
    if len(waiters) >= 64 and len(waiters) & (len(waiters) - 1) == 0:     # 64, 128, ...
        live = [w for w in waiters if w[0]._waiting == _WAIT_OTHER and w[0]._wait_id == w[1]]
        waiters.clear()
        waiters.extend(live)


def _waiter(what):
    task = current_task()
    if task is None:
        raise RuntimeError('%s is used with yield in a task' % what)
    return task


class Event:
    """``yield event.wait(timeout)`` until ``event.set()``; True, or False on timeout."""

    def __init__(self):
        self._flag = False
        self._waiters = []

    def is_set(self):
        return self._flag

    isSet = is_set

    def set(self):
        _the_runner().call(self._set)

    def _set(self):
        self._flag = True
        waiters, self._waiters = self._waiters, []
        for task, wait_id in waiters:
            task._wake_wait(wait_id, True)

    def clear(self):
        self._flag = False          # a flag only: no task state, any thread may

    def wait(self, timeout=None):
        if self._flag:
            return True
        task = _waiter('Event.wait')
        self._waiters.append(task._wait_for(timeout, False))
        _prune(self._waiters)
        return None


class Lock:
    """``yield lock.acquire()`` ... ``lock.release()``."""

    def __init__(self):
        self._owner = None
        self._depth = 0
        self._waiters = collections.deque()

    _reentrant = False

    def acquire(self, blocking=True, timeout=None):
        task = _waiter('Lock.acquire')
        if self._owner is None:
            self._owner, self._depth = task, 1
            return True
        if self._owner is task and self._reentrant:
            self._depth += 1
            return True
        if not blocking:
            return False
        self._waiters.append(task._wait_for(timeout, False))
        _prune(self._waiters)
        return None

    def release(self):
        runner = _the_runner()
        if not runner.on_runner():          # from a plain thread: on the runner
            runner.post(self.release)
            return
        task = current_task()
        if self._owner is None or (task is not None and self._owner is not task
                                   and self._reentrant):
            raise RuntimeError('release of a lock not held')
        self._depth -= 1
        if self._depth > 0:
            return
        self._owner = None
        while self._waiters:
            nxt, wait_id = self._waiters.popleft()
            if nxt._wake_wait(wait_id, True):
                self._owner, self._depth = nxt, 1
                return

    def locked(self):
        return self._owner is not None


class RLock(Lock):
    _reentrant = True


class Condition:
    """``yield cond.acquire()``, ``yield cond.wait(timeout)``, ``cond.notify(n)``,
    ``cond.release()``."""

    def __init__(self, lock=None):
        self._lock = lock or Lock()
        self._waiters = collections.deque()

    def acquire(self, blocking=True, timeout=None):
        return self._lock.acquire(blocking, timeout)

    def release(self):
        self._lock.release()

    def wait(self, timeout=None):
        """Releases the lock, waits for notify (or timeout), takes the lock again;
        True when notified."""
        task = _waiter('Condition.wait')
        self._lock.release()
        return self._wait(task, timeout)

    def _wait(self, task, timeout):
        entry = task._wait_for(timeout, False)
        self._waiters.append(entry)
        notified = yield None
        if entry in self._waiters:
            self._waiters.remove(entry)
        yield self._lock.acquire()
        return bool(notified)

    def notify(self, n=1):
        runner = _the_runner()
        if not runner.on_runner():
            runner.post(self.notify, n)
            return
        while n > 0 and self._waiters:
            task, wait_id = self._waiters.popleft()
            if task._wake_wait(wait_id, True):
                n -= 1

    def notify_all(self):
        self.notify(len(self._waiters))

    notifyAll = notify_all


class Semaphore:
    """``yield sem.acquire()`` ... ``sem.release()``."""

    def __init__(self, value=1):
        if value < 0:
            raise ValueError('semaphore value must be >= 0')
        self._value = value
        self._waiters = collections.deque()

    def acquire(self, blocking=True, timeout=None):
        if self._value > 0:
            self._value -= 1
            return True
        if not blocking:
            return False
        task = _waiter('Semaphore.acquire')
        self._waiters.append(task._wait_for(timeout, False))
        _prune(self._waiters)
        return None

    def release(self):
        runner = _the_runner()
        if not runner.on_runner():
            runner.post(self.release)
            return
        while self._waiters:
            task, wait_id = self._waiters.popleft()
            if task._wake_wait(wait_id, True):
                return
        self._value += 1


class BoundedSemaphore(Semaphore):
    def __init__(self, value=1):
        super().__init__(value)
        self._bound = value

    def release(self):
        if self._value >= self._bound and not self._waiters:
            raise ValueError('semaphore released too many times')
        super().release()


# ================================================================================
# Channel: one message to every subscriber (tasks or channels, local or remote)
# ================================================================================

class Channel:
    """A named broadcast: ``channel.send(msg)`` reaches every subscriber.  A remote
    channel (``yield Channel.locate(name)``) is used the same way."""

    _registry = {}

    def __init__(self, name, transform=None):
        self._name = name
        self._transform = transform
        self._subscribers = []
        self._remote = None
        self._location = None
        Channel._registry[name] = self
        Pycos.instance()

    @classmethod
    def _reference(cls, location, name):
        ch = cls.__new__(cls)
        ch._name, ch._remote, ch._location = name, location, location
        ch._subscribers, ch._transform = [], None
        return ch

    def __reduce__(self):
        return (_channel_from_reference, (self.location.addr, self.location.port, self._name))

    @property
    def name(self):
        return self._name

    @property
    def location(self):
        if self._location is None:
            self._location = Pycos.instance().location
        return self._location

    def __repr__(self):
        return 'Channel(%s@%s)' % (self._name, self._location or 'here')

    def subscribe(self, subscriber, timeout=None):
        """``yield channel.subscribe(task)``; 0."""
        if self._remote is not None:
            return Pycos.instance().peers.call(self._remote, 'channel.subscribe',
                                                (self._name, subscriber), timeout=timeout)
        if subscriber not in self._subscribers:
            self._subscribers.append(subscriber)
        return 0

    def unsubscribe(self, subscriber, timeout=None):
        if self._remote is not None:
            return Pycos.instance().peers.call(self._remote, 'channel.unsubscribe',
                                                (self._name, subscriber), timeout=timeout)
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            return 0
        return -1

    def subscribers(self):
        return list(self._subscribers)

    def send(self, message):
        """Sends ``message`` to every subscriber; their number."""
        if self._remote is not None:
            Pycos.instance().peers.notify(self._remote, 'channel.send', (self._name, message))
            return 0
        if self._transform is not None:
            message = self._transform(self._name, message)
            if message is None:
                return 0
        for subscriber in list(self._subscribers):
            subscriber.send(message)
        return len(self._subscribers)

    def deliver(self, message, timeout=None, n=0):
        """``count = yield channel.deliver(msg)``: sent to every subscriber now."""
        return self.send(message)

    def close(self):
        self._subscribers = []
        if Channel._registry.get(self._name) is self:
            del Channel._registry[self._name]

    @staticmethod
    def locate(name, location=None, timeout=None):
        """``channel = yield Channel.locate(name, location)``, or None."""
        return Pycos.instance()._locate('channel', name, location, timeout)


def _channel_from_reference(addr, port, name):
    inst = Pycos._instance
    location = Location(addr, port)
    if inst is not None and inst._location == location and name in Channel._registry:
        return Channel._registry[name]
    return Channel._reference(location, name)


# ================================================================================
# Peers: connections to other processes, messages to their tasks, calls
# ================================================================================
#
# Peer messages (plain tuples inside dispy's authenticated frames; user objects are
# pickled blobs that only the receiving runner unpickles):
#
#   CLIENT  info                 first message of a dialer: its location and name
#   T       task, blob           a message for a task (id or registered name)
#   TD      task, blob, token    the same, answered with R (deliver)
#   C       token, op, blob      a call of a service (op) with pickled arguments;
#                                answered with R token, pickled (ok, value)
#   N       op, blob             a call that wants no answer
#   R       token, blob          an answer
#   B       [message, ...]       messages queued together by the runner
#   PULSE   time                 liveness on an idle connection
#
# A connection is used both ways: an accepted one is registered under the location
# its dialer gives, so answers and messages go back on it.

PULSE_INTERVAL = float(os.environ.get('DISPYCOS_PULSE', MinPulseInterval))


class _Reply:
    """The answer to one call: ``reply.send(value)`` (once)."""

    def __init__(self, peers, location, token):
        self._peers, self._location, self._token = peers, location, token
        self.sent = False

    def send(self, value, ok=True):
        if self.sent:
            return
        self.sent = True
        self._peers._answer(self._location, self._token, ok, value)


class _PeerLink:
    """The LoopConnection handler of one peer connection."""

    def __init__(self, peers, location=None):
        self.peers = peers
        self.location = location

    def on_messages(self, conn, msgs):
        self.peers.runner.inbox.put((self.peers._on_messages, (self, conn, msgs)))

    def on_closed(self, conn, reason):
        self.peers.runner.inbox.put((self.peers._on_closed, (self, conn, reason)))


class _Peers:
    """This process's connections to other Pycos instances: dials on demand, queues
    what the runner sends until the runner goes idle (one frame for many messages),
    and carries calls (``call``) with their answers.  Runner thread, except the
    listener's ``attach`` and the loop's callbacks, which hand over to it."""

    def __init__(self, pycos, addr, port, secret, certfile, keyfile, ext_addr):
        self.pycos = pycos
        self.runner = _the_runner()
        self.secret = secret or ''
        self.name = pycos.name
        self.max_frame = dispy.DEFAULT_MAX_FRAME
        try:
            self.ssl_context = dispy.make_ssl_context(True, certfile, keyfile)
            self.dial_context = dispy.make_ssl_context(False, certfile, keyfile)
        except (OSError, ValueError) as exc:
            raise ValueError('cannot load the TLS certificate %s (key %s): %s'
                             % (certfile, keyfile or 'in it', exc)) from None
        self.loop = dispy.IOLoop('pycos-io')
        self.threads = dispy.WorkerThreads(4, 'pycos-worker')
        self.admission = dispy.HandshakeAdmission(128, 32)
        self.listener = dispy.Listener(self, addr, port, self.admission)
        self.listener.thread_name = 'pycos-handshake'
        threading.Thread(target=self.listener.serve_forever, daemon=True,
                         name='pycos-listen').start()
        self.location = Location(ext_addr or addr, self.listener.port)
        self.conns = {}             # Location -> LoopConnection (runner's view)
        self.spare = set()          # second connections of peers (see _connected)
        self.dialing = {}           # Location -> [messages waiting for the connection]
        self.outq = {}              # Location -> [messages, bytes] to flush
        self.calls = {}             # token -> (Location, callback(ok, value))
        self.tokens = itertools.count(1)
        self.lost_hooks = []        # callables(location) told when a peer is lost
        self.found_hooks = []       # callables(location, info) told of a new peer
        self.runner.after_turn.append(self.flush)
        self.loop.add_ticker(self._pulse_ticker)
        self._last_pulse_check = time.monotonic()

    # -- the listener's side (handshake thread) -----------------------------------------------
    def attach(self, channel, addr, info):
        loc = info.get('location')
        try:
            location = Location(str(loc[0]), int(loc[1]))
        except Exception:
            raise dispy.ProtocolError('peer %s gave no location' % addr[0])
        link = _PeerLink(self, location)
        conn = dispy.LoopConnection(channel, link, 'peer %s' % location, self.loop,
                                    self.threads, channel.take_buffered())
        conn.peer_name = info.get('name')
        conn.dialed_here = False
        self.runner.inbox.put((self._connected, (location, conn, info)))
        conn.start()

    # -- sending (runner thread) ----------------------------------------------------------------
    def queue(self, location, msg, size=64):
        entry = self.outq.get(location)
        if entry is None:
            entry = self.outq[location] = [[], 0]
        entry[0].append(msg)
        entry[1] += size
        if entry[1] >= FLUSH_BYTES:
            self._flush_one(location)

    def flush(self):
        if self.outq:
            for location in list(self.outq):
                self._flush_one(location)

    def _flush_one(self, location):
        msgs, size = self.outq.pop(location)
        conn = self.conns.get(location)
        if conn is None or conn.closed:
            self._dial(location).extend(msgs)
            return
        conn.send(msgs[0] if len(msgs) == 1 else ('B', msgs), size)

    def send_task(self, task, message):
        if not self.runner.on_runner():
            self.runner.post(self.send_task, task, message)
            return
        blob = pickle.dumps(message, BLOB_PROTOCOL)
        self.queue(task._remote, ('T', task._id, blob), len(blob))

    # -- calls ------------------------------------------------------------------------------
    def call(self, location, op, args, timeout=None):
        """``value = yield peers.call(...)``: a generator for a task to yield; gives
        the service's answer, or the exception that stopped it (PeerLost on a lost
        peer, TimeoutError on ``timeout``)."""
        task = current_task()
        if task is None:
            raise RuntimeError('a call to another process is used with yield in a task')
        if location == self.location:
            result = yield from self._serve_local(op, args)
            return result
        token = next(self.tokens)
        blob = pickle.dumps(args, BLOB_PROTOCOL)
        wait = task._wait_for(timeout, TimeoutError('no answer from %s to %s in %s s'
                                                     % (location, op, timeout)))

        def answered(ok, value):
            wait[0]._wake_wait(wait[1], value if ok else _as_exception(value))
        self.calls[token] = (location, answered)
        self.queue(location, ('C', token, op, blob))
        value = yield None
        self.calls.pop(token, None)
        return value

    def call_back(self, location, op, args, callback):
        """Calls ``op`` at ``location`` and runs ``callback(ok, value)`` on the
        runner with the answer (no task needed)."""
        if location == self.location:
            Task(_call_into, self, op, args, callback).set_daemon()
            return
        token = next(self.tokens)
        self.calls[token] = (location, callback)
        self.queue(location, ('C', token, op, pickle.dumps(args, BLOB_PROTOCOL)))

    def call_blocking(self, location, op, args, timeout=None):
        """A call from a thread that is not the runner (``value()`` of a remote task)."""
        done = threading.Event()
        box = []

        def callback(ok, value):
            box.append(value if ok else _as_exception(value))
            done.set()
        self.runner.post(self.call_back, location, op, args, callback)
        if not done.wait(timeout):
            return None
        return box[0]

    def notify(self, location, op, args):
        if not self.runner.on_runner():
            self.runner.post(self.notify, location, op, args)
            return
        if location == self.location:
            Task(_call_into, self, op, args, None).set_daemon()
            return
        self.queue(location, ('N', op, pickle.dumps(args, BLOB_PROTOCOL)))

    def deliver_task(self, task, message, timeout):
        """``yield rtask.deliver(msg)``: 1 once it is in the task's mailbox."""
        me = current_task()
        if me is None:
            raise RuntimeError('deliver() is used with yield in a task')
        token = next(self.tokens)
        blob = pickle.dumps(message, BLOB_PROTOCOL)
        wait = me._wait_for(timeout, -1)

        def answered(ok, value):
            wait[0]._wake_wait(wait[1], value if ok else 0)
        self.calls[token] = (task._remote, answered)
        self.queue(task._remote, ('TD', task._id, blob, token), len(blob))
        value = yield None
        self.calls.pop(token, None)
        return value

    def _answer(self, location, token, ok, value):
        try:
            blob = pickle.dumps((ok, value), BLOB_PROTOCOL)
        except Exception as exc:
            blob = pickle.dumps((False, TaskError('answer could not be pickled: %s' % exc)),
                                BLOB_PROTOCOL)
        self.queue(location, ('R', token, blob), len(blob))

    def _serve_local(self, op, args):
        """A call to this process itself: the service's value, without the network."""
        handler = self.pycos._services.get(op)
        if handler is None:
            return TaskError('no service %r here' % op)
        try:
            result = handler(self.location, *args)
            if inspect.isgenerator(result):
                result = yield result
            return result
        except Exception as exc:
            return exc

    # -- receiving (runner thread) ----------------------------------------------------------
    def _on_messages(self, link, conn, msgs):
        for msg in msgs:
            try:
                self._on_message(link, conn, msg)
            except Exception:
                logger.exception('bad message %r from %s', msg[:1], link.location)

    def _on_message(self, link, conn, msg):
        kind = msg[0]
        if kind == 'T':
            self._to_task(msg[1], msg[2], link.location)
        elif kind == 'B':
            for sub in msg[1]:
                self._on_message(link, conn, sub)
        elif kind == 'R':
            # by token alone: a peer known under two locations (its own, and the
            # address dialed) may answer on either connection
            entry = self.calls.pop(msg[1], None)
            if entry is not None:
                ok, value = _loads_answer(msg[2])
                entry[1](ok, value)
        elif kind == 'C':
            self._serve(link.location, msg[1], msg[2], msg[3])
        elif kind == 'N':
            self._serve(link.location, None, msg[1], msg[2])
        elif kind == 'TD':
            ok = self._to_task(msg[1], msg[2], link.location)
            self._answer(link.location, msg[3], True, 1 if ok else 0)
        elif kind == 'PULSE':
            pass
        else:
            logger.warning('unknown message %r from %s', kind, link.location)

    def _to_task(self, tid, blob, source):
        task = self.pycos._tasks_by_id(tid)
        if task is None:
            logger.debug('message from %s for %s: no such task here', source, tid)
            return False
        try:
            message = pickle.loads(blob)
        except Exception as exc:
            logger.warning('message from %s for task %s could not be unpickled (%s: %s); '
                           'dropped', source, task, type(exc).__name__, exc)
            return False
        return task._deliver_local(message)

    def _serve(self, location, token, op, blob):
        handler = self.pycos._services.get(op)
        reply = _Reply(self, location, token) if token is not None else None
        if handler is None:
            if reply:
                reply.send(TaskError('no service %r at %s' % (op, self.location)), False)
            return
        try:
            args = pickle.loads(blob)
            result = handler(location, *args)
        except Exception as exc:
            if reply:
                reply.send(exc, False)
            else:
                logger.warning('%s from %s failed: %s', op, location, exc)
            return
        if inspect.isgenerator(result):
            Task(_serve_generator, result, reply).set_daemon()
        elif reply:
            reply.send(result)

    # -- connections (runner thread) -------------------------------------------------------------
    def _dial(self, location):
        waiting = self.dialing.get(location)
        if waiting is not None:
            return waiting
        waiting = self.dialing[location] = []
        info = {'role': 'pycos', 'name': self.name}
        steps = dispy.handshake_steps(self.secret, True, info, self.max_frame)

        def done(channel, extra):
            link = _PeerLink(self, location)
            conn = dispy.LoopConnection(channel, link, 'peer %s' % location, self.loop,
                                        self.threads, extra)
            conn.dialed_here = True
            conn.start()        # on the loop thread: registered at once
            conn.send_alone(dispy.Msg.CLIENT({'location': list(self.location.key()),
                                              'name': self.name,
                                              'pulse_interval': PULSE_INTERVAL,
                                              'id': self.pycos.instance_id}))
            self.runner.inbox.put((self._connected, (location, conn, None)))

        def failed(exc):
            self.runner.inbox.put((self._dial_failed, (location, exc)))
        dispy.LoopDial(self.loop, location.addr, location.port, self.dial_context, steps,
                       self.max_frame, MsgTimeout, done, failed, peer='peer').start()
        return waiting

    def _connected(self, location, conn, info):
        old = self.conns.get(location)
        if old is not None and not old.closed and old is not conn:
            # Both sides dialed at once: each sends on the connection the lower
            # location dialed, so both use the same one.  The other stays open, read
            # and pulsed (never closed by this side: a peer that knows this process
            # under another location may use it), at most one a peer.
            lower_is_me = self.location.key() < location.key()
            keep, spare = (conn, old) if conn.dialed_here == lower_is_me else (old, conn)
            self.conns[location] = keep
            self.spare.add(spare)       # still read and pulsed (the peer may send on it)
        else:
            self.conns[location] = conn
        waiting = self.dialing.pop(location, None)
        if waiting:
            self.conns[location].send(waiting[0] if len(waiting) == 1 else ('B', waiting))
        if old is None or old.closed:
            for hook in self.found_hooks:
                hook(location, info)

    def _dial_failed(self, location, exc):
        waiting = self.dialing.pop(location, None) or []
        if self.is_connected(location):     # the peer dialed us meanwhile: use that
            logger.debug('dial to %s failed (%s), but it is connected', location, exc)
            if waiting:
                self.conns[location].send(waiting[0] if len(waiting) == 1 else ('B', waiting))
            return
        if isinstance(exc, dispy.ProtocolError):     # a wrong secret, TLS on one side
            logger.warning('could not connect to %s: %s', location, exc)
        else:
            logger.debug('could not reach %s: %s', location, exc)
        self._fail_calls(location, PeerLost('%s could not be reached: %s' % (location, exc)))
        if waiting:
            logger.warning('%d message(s) for %s dropped: it could not be reached (%s)',
                           len(waiting), location, exc)
        for hook in self.lost_hooks:
            hook(location)

    def _on_closed(self, link, conn, reason):
        self.spare.discard(conn)
        if self.conns.get(link.location) is not conn:
            return                      # a second connection of the same peer
        del self.conns[link.location]
        logger.debug('connection to %s closed: %s', link.location, reason)
        self._fail_calls(link.location, PeerLost('%s lost: %s' % (link.location, reason)))
        for hook in self.lost_hooks:
            hook(link.location)

    def _fail_calls(self, location, exc):
        for token, (loc, callback) in list(self.calls.items()):
            if loc == location:
                del self.calls[token]
                callback(False, exc)

    def is_connected(self, location):
        conn = self.conns.get(location)
        return conn is not None and not conn.closed

    def disconnect(self, location):
        conn = self.conns.get(location)
        if conn is not None:
            conn.close('closed by this side', flush=True)

    # -- liveness (loop thread) -----------------------------------------------------------------
    def _pulse_ticker(self):
        now = time.monotonic()
        if now - self._last_pulse_check < 1.0:
            return
        self._last_pulse_check = now
        for conn in list(self.conns.values()) + list(self.spare):
            if conn.closed:
                continue
            if now - conn.last_recv > DEAD_PULSES * PULSE_INTERVAL:
                conn.close('silent for %.0f s' % (now - conn.last_recv))
            elif conn.idle_send >= PULSE_INTERVAL:
                conn.send(('PULSE', time.time()))

    def close(self):
        for conn in list(self.conns.values()) + list(self.spare):
            conn.close('closing', flush=True)
        self.listener.close()
        self.loop.stop()


def _as_exception(value):
    return value if isinstance(value, BaseException) else TaskError(str(value))


def _loads_answer(blob):
    try:
        ok, value = pickle.loads(blob)
    except Exception as exc:
        return False, TaskError('answer could not be unpickled here: %s: %s'
                                % (type(exc).__name__, exc))
    return ok, value


def _serve_generator(gen, reply, task=None):
    """Runs a service that waits (a generator) as a task; answers with its value."""
    try:
        value = yield gen
    except Exception as exc:
        if reply:
            reply.send(exc, False)
        else:
            logger.warning('service failed: %s', exc)
        return
    if reply:
        reply.send(value)


def _call_into(peers, op, args, callback, task=None):
    value = yield from peers._serve_local(op, args)
    if callback is not None:
        callback(not isinstance(value, BaseException), value)


# ================================================================================
# Pycos: this process's runtime and its place on the network (a singleton)
# ================================================================================

def default_address():
    """The address a Pycos serves on when none is given: DISPYCOS_NODE, else this
    machine's first non-loopback IPv4 address (never a host-name lookup, which gives
    127.0.1.1 on many systems), else 127.0.0.1."""
    env = os.environ.get('DISPYCOS_NODE')
    if env:
        return dispy.resolve_host(env) or env
    for family, addr, _bcast in dispy.interface_addresses():
        if family == socket.AF_INET and not dispy.is_loopback(addr):
            return addr
    return '127.0.0.1'


class Pycos:
    """The runtime of this process: ``Pycos(node=, tcp_port=, ...)`` configures it
    before the first task or channel (later calls give the same instance), and
    ``Pycos.instance()`` is it.  The network part (listener, connections) starts
    when first needed: a task's location asked, a peer, a scheduler."""

    _instance = None
    _lock = threading.Lock()

    def __new__(cls, *args, **kwargs):
        with cls._lock:
            if cls._instance is None:
                inst = super().__new__(cls)
                inst._configured = False
                cls._instance = inst
            return cls._instance

    def __init__(self, node=None, tcp_port=0, udp_port=None, ext_ip_addr=None, name=None,
                 secret='', certfile=None, keyfile=None, dest_path=None, max_file_size=0,
                 discover_peers=True, **_ignored):
        if self._configured:
            if node is not None or tcp_port or secret or certfile:
                if self._peers is None:
                    self._configure(node, tcp_port, udp_port, ext_ip_addr, name, secret,
                                    certfile, keyfile, dest_path, max_file_size)
                    if node is not None or tcp_port:
                        self.peers
                else:
                    logger.debug('Pycos() options ignored: the network is already up')
            return
        self._configured = True
        self._peers = None
        self._location = None
        self._services = {}
        self._peer_status_tasks = []
        self.instance_id = uuid.uuid4().hex
        self._configure(node, tcp_port, udp_port, ext_ip_addr, name, secret, certfile,
                        keyfile, dest_path, max_file_size)
        self._runner = _the_runner()
        _install_task_services(self)
        if node is not None or tcp_port:    # pycos starts listening when configured
            self.peers

    def _configure(self, node, tcp_port, udp_port, ext_ip_addr, name, secret, certfile,
                   keyfile, dest_path, max_file_size):
        if isinstance(node, (list, tuple)):
            node = node[0] if node else None
        if isinstance(ext_ip_addr, (list, tuple)):
            ext_ip_addr = ext_ip_addr[0] if ext_ip_addr else None
        self._node = node
        self._tcp_port = int(tcp_port or 0)
        self._udp_port = udp_port
        self._ext_ip_addr = ext_ip_addr
        self.name = name or socket.gethostname()
        self._secret = secret if secret else os.environ.get('DISPYCOS_SECRET', '')
        self._certfile, self._keyfile = certfile, keyfile
        self._dest_path = dest_path
        self.max_file_size = dispy.parse_size(max_file_size) if isinstance(
            max_file_size, str) else int(max_file_size or 0)

    @classmethod
    def instance(cls, *args, **kwargs):
        inst = cls._instance
        if inst is None or not inst._configured:
            inst = cls(*args, **kwargs)
        return inst

    # -- the network, started on demand ----------------------------------------------------
    @property
    def peers(self):
        return self._peers if self._peers is not None else self._start_network()

    _no_network = None          # why this process may not have one (run_without_network)

    def _start_network(self):
        if self._no_network:
            raise RuntimeError(self._no_network)
        with Pycos._lock:
            if self._peers is None:
                node = self._node
                addr = (dispy.resolve_host(node) or node) if node else default_address()
                ext = dispy.resolve_host(self._ext_ip_addr) if self._ext_ip_addr else None
                try:
                    peers = _Peers(self, addr, self._tcp_port, self._secret, self._certfile,
                                   self._keyfile, ext)
                except OSError as exc:
                    raise OSError(exc.errno, 'dispycos could not listen on %s:%s: %s' % (
                        addr, self._tcp_port, exc.strerror or exc)) from None
                self._location = peers.location
                self._peers = peers
                logger.debug('pycos %s at %s', self.name, self._location)
        return self._peers

    @property
    def location(self):
        self.peers
        return self._location

    @property
    def dest_path(self):
        path = self._dest_path or os.path.join(tempfile.gettempdir(), 'pycos')
        os.makedirs(path, exist_ok=True)
        return path

    @dest_path.setter
    def dest_path(self, path):
        self._dest_path = path

    @property
    def secret(self):
        return self._secret

    # -- services: what other processes may call here -----------------------------------------
    def add_service(self, op, handler):
        """``handler(caller_location, *args)`` runs on the runner: its value (or a
        generator's, run as a task) answers the call."""
        self._services[op] = handler

    def _tasks_by_id(self, tid):
        task = Task._registry.get(tid) if isinstance(tid, str) else _live_tasks.get(tid)
        return task if task is not None and not task._done else None

    def _locate(self, kind, name, location, timeout):
        """``yield``: the task or channel registered under ``name`` (here, at
        ``location``, or at any connected peer), or None."""
        if location is None or location == self._location:
            registry = Task._registry if kind == 'task' else Channel._registry
            found = registry.get(name)
            if found is not None and (kind != 'task' or not found._done):
                return found
            if location is not None:
                return None
        peers = self.peers
        places = [location] if location is not None else list(peers.conns)
        for place in places:
            found = yield peers.call(place, '%s.locate' % kind, (name,), timeout=timeout)
            if isinstance(found, (Task, Channel)):
                return found
        return None

    # -- pycos's Pycos methods -----------------------------------------------------------------
    def peer(self, location, udp_port=0, stream_send=False, broadcast=False):
        """``yield Pycos().peer(Location(host, port))``: connects to that process;
        0 when it answers, -1 otherwise."""
        peers = self.peers
        return self._peer(peers, location)

    def _peer(self, peers, location):
        if not isinstance(location, Location):
            raise TypeError('peer() takes a Location')
        addr = dispy.resolve_host(location.addr) or location.addr
        location = Location(addr, location.port)
        info = yield peers.call(location, 'pycos.hello', (), timeout=MsgTimeout)
        if not isinstance(info, dict):
            return -1
        if info.get('role') == 'node' and Scheduler._local is not None:
            Scheduler._local.add_node(location)     # a node beyond the LAN (seed §6.12)
        return 0

    def peer_status(self, task):
        """``task`` receives a PeerStatus whenever a peer connects or is lost."""
        peers = self.peers
        self._runner.call(self._add_peer_status, peers, task)

    def _add_peer_status(self, peers, task):
        if not self._peer_status_tasks:
            peers.found_hooks.append(lambda loc, info: self._tell_peer_status(
                loc, (info or {}).get('name'), PeerStatus.Online))
            peers.lost_hooks.append(lambda loc: self._tell_peer_status(
                loc, None, PeerStatus.Offline))
        self._peer_status_tasks.append(task)

    def _tell_peer_status(self, location, name, status):
        for task in self._peer_status_tasks:
            task.send(PeerStatus(location, name, status))

    def locations(self):
        return list(self.peers.conns) if self._peers is not None else []

    def send_file(self, location, file, dir=None, overwrite=False, timeout=MsgTimeout):
        """``yield Pycos().send_file(location, path, dir)``: copies a file to that
        process's dest_path (under ``dir``); 0 on success, -1 otherwise."""
        return self._send_file(self.peers, location, file, dir, overwrite, timeout)

    def _send_file(self, peers, location, path, folder, overwrite, timeout):
        try:
            mode = os.stat(path).st_mode & 0o777
            f = open(path, 'rb')
        except OSError as exc:
            logger.warning('send_file: %s', exc)
            return -1
        name = os.path.basename(path)
        if folder:
            if os.path.isabs(folder):
                logger.warning('send_file %s: dir must be relative to the receiver\'s '
                               'dest_path, not %r', path, folder)
                return -1
            name = os.path.join(folder, name)
        offset = 0
        with f:
            while True:
                data = f.read(1 << 20)
                last = len(data) < (1 << 20)
                answer = yield peers.call(location, 'pycos.file',
                                          (name, mode, offset, data, last, overwrite),
                                          timeout=timeout)
                if answer != 0:
                    logger.warning('send_file %s to %s: %s', path, location, answer)
                    return -1
                offset += len(data)
                if last:
                    return 0

    def discover_peers(self, port=None):
        """Asks schedulers and nodes of the local networks to make themselves known."""
        hub = getattr(self, '_discovery', None)
        if hub is not None:
            hub.ping(port)

    def finish(self):
        """Waits until every non-daemon task ended."""
        _the_runner().wait_idle()

    join = finish

    def terminate(self):
        """Ends every task and the network."""
        for task in list(_live_tasks.values()):
            task.terminate()
        if self._peers is not None:
            self._peers.close()

    def __repr__(self):
        return 'Pycos(%s@%s)' % (self.name, self._location or 'not networked')


NetPycos = Pycos

# Tasks of this process that have not ended, by id: messages from elsewhere find them
# here, and a task waiting with nothing else referring to it stays alive.
_live_tasks = {}


def _install_task_services(pycos):
    """The calls every process answers about its tasks, channels and files."""
    def task_of(tid):
        task = pycos._tasks_by_id(tid)
        if task is None:
            raise TaskError('no task %s at %s (it ended or never was)' % (tid, pycos._location))
        return task

    def wait(_caller, tid, timeout=None):
        task = _live_tasks.get(tid) if not isinstance(tid, str) else Task._registry.get(tid)
        if task is None:
            task = _ended_tasks.get(tid)
            if task is None:
                raise TaskError('no task %s at %s' % (tid, pycos._location))
        if task._done:
            return _portable(task._result())
        return _wait_portable(task, timeout)

    def monitor(_caller, tid, monitor_task):
        task_of(tid)._add_monitor(monitor_task)
        return 0

    def subscribe(_caller, name, subscriber):
        channel = Channel._registry.get(name)
        return -1 if channel is None else channel.subscribe(subscriber)

    def unsubscribe(_caller, name, subscriber):
        channel = Channel._registry.get(name)
        return -1 if channel is None else channel.unsubscribe(subscriber)

    def channel_send(_caller, name, message):
        channel = Channel._registry.get(name)
        if channel is not None:
            channel.send(message)

    def receive_file(_caller, name, mode, offset, data, last, overwrite):
        if not isinstance(name, str) or os.path.isabs(name):
            raise ValueError('refused path %r: not relative to dest_path' % (name,))
        receiver = getattr(pycos, '_file_receiver', None)
        folder = pycos.dest_path        # a server's moves to its computation's folder
        if receiver is None or receiver.folder != os.path.abspath(folder):
            receiver = pycos._file_receiver = dispy.FileReceiver(
                folder, pycos.max_file_size, paths='relative')
        path = receiver.path_for(name)
        if offset == 0 and os.path.exists(path) and not overwrite:
            raise FileExistsError('%s exists at %s' % (name, pycos._location))
        receiver.chunk(name, mode, offset, data, last, source=_caller)
        return 0

    services = {
        'pycos.hello': lambda caller: {'name': pycos.name, 'location': pycos._location,
                                       'role': getattr(pycos, 'role', 'pycos')},
        'task.wait': wait,
        'task.terminate': lambda caller, tid: task_of(tid).terminate(),
        'task.throw': lambda caller, tid, exc: task_of(tid).throw(exc),
        'task.monitor': monitor,
        'task.locate': lambda caller, name: pycos._tasks_by_id(name),
        'channel.locate': lambda caller, name: Channel._registry.get(name),
        'channel.subscribe': subscribe,
        'channel.unsubscribe': unsubscribe,
        'channel.send': channel_send,
        'pycos.file': receive_file,
    }
    for op, handler in services.items():
        pycos.add_service(op, handler)


# The last tasks that ended, so a remote finish() that comes late still gets a value.
_ended_tasks = collections.OrderedDict()
ENDED_TASKS_KEPT = 1000


def _remember_ended(task):
    _ended_tasks[task._id] = task
    if len(_ended_tasks) > ENDED_TASKS_KEPT:
        _ended_tasks.popitem(last=False)


def _portable(value):
    """``value`` if it pickles, else a TaskError that describes it (a result must
    always reach the asker)."""
    try:
        pickle.dumps(value, BLOB_PROTOCOL)
        return value
    except Exception as exc:
        return TaskError('the value %s could not be pickled: %s' % (reprlib.repr(value), exc))


def _wait_portable(task, timeout=None):
    value = yield task.finish(timeout)
    return _portable(value)


# ================================================================================
# asyncfile: pipes to a child program that tasks use with yield
# ================================================================================

class AsyncPipe:
    """A child program's pipes for tasks: ``yield pipe.write(data)``,
    ``line = yield pipe.readline()``, ``data = yield pipe.read(n)``,
    ``out, err = yield pipe.communicate(input)``.  The blocking part runs on a
    worker thread; the task waits without holding up the others."""

    def __init__(self, popen, stdout=None, stderr=None):
        self.popen = popen
        self.stdin = popen.stdin
        self.stdout = stdout or popen.stdout
        self.stderr = stderr or popen.stderr

    def _blocking(self, func, *args):
        return _in_thread(func, *args)

    def write(self, data, full=False):
        def write():
            self.stdin.write(data)
            self.stdin.flush()
            return len(data)
        return self._blocking(write)

    def read(self, size=-1):
        return self._blocking(self.stdout.read, size)

    def readline(self, size=-1):
        return self._blocking(self.stdout.readline, size)

    def communicate(self, input=None):
        return self._blocking(self.popen.communicate, input)

    def close(self):
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass

    def wait(self, timeout=None):
        return self._blocking(self.popen.wait, timeout)

    def poll(self):
        return self.popen.poll()

    def terminate(self):
        self.popen.terminate()


def _in_thread(func, *args):
    """``value = yield _in_thread(f, x)``: runs a blocking call off the runner."""
    task = current_task()
    if task is None:
        return func(*args)
    wait = task._wait_for()

    def work():
        try:
            box = (func(*args), None)
        except Exception as exc:
            box = (None, exc)
        task._runner.post(task._wake_wait, wait[1], box[0], box[1])
    threading.Thread(target=work, daemon=True, name='pycos-blocking').start()
    return None


asyncfile = types.ModuleType('dispycos.asyncfile', 'pycos.asyncfile: AsyncPipe, Popen')
asyncfile.AsyncPipe = AsyncPipe
asyncfile.Popen = subprocess.Popen
asyncfile.PIPE = subprocess.PIPE
asyncfile.STDOUT = subprocess.STDOUT
asyncfile.DEVNULL = subprocess.DEVNULL


# ================================================================================
# Records of the scheduler (seed 003 §6.5-§6.7)
# ================================================================================

class DispycosStatus:
    """A status message to a computation's status_task: ``status`` (NodeDiscovered,
    ServerInitialized, ...) and ``info`` (a DispycosNodeAvailInfo, a Location or a
    TaskInfo)."""

    __slots__ = ('status', 'info')

    def __init__(self, status, info):
        self.status, self.info = status, info

    def __reduce__(self):
        return (DispycosStatus, (self.status, self.info))

    def __repr__(self):
        return 'DispycosStatus(%s, %r)' % (self.status, self.info)


class DispycosNodeAvailInfo:
    """A node's availability: location, cpu (% free), memory, disk, swap (None
    without psutil on the node).  ``avail_info`` is itself (4.12's spelling)."""

    __slots__ = ('location', 'cpu', 'memory', 'disk', 'swap', 'name', 'servers')

    def __init__(self, location, cpu=None, memory=None, disk=None, swap=None, name=None,
                 servers=0):
        self.location, self.cpu, self.memory, self.disk, self.swap = (location, cpu, memory,
                                                                      disk, swap)
        self.name, self.servers = name, servers

    def __reduce__(self):
        return (DispycosNodeAvailInfo, (self.location, self.cpu, self.memory, self.disk,
                                        self.swap, self.name, self.servers))

    @property
    def avail_info(self):
        return self

    @property
    def addr(self):
        return self.location.addr

    def __repr__(self):
        return 'DispycosNodeAvailInfo(%s, cpu=%s, memory=%s, disk=%s)' % (
            self.location, self.cpu, self.memory, self.disk)


class TaskInfo:
    """A task created at a server: the task, its args / kwargs and start time.

    The scheduler makes it with the arguments still pickled (a shared scheduler has
    none of the client's classes); they are unpickled where they are first read."""

    __slots__ = ('task', '_args_blob', '_args', 'start_time')

    def __init__(self, task, args, kwargs, start_time):
        self.task, self.start_time = task, start_time
        self._args, self._args_blob = (tuple(args), dict(kwargs)), None

    def _arguments(self):
        if self._args is None:
            try:
                self._args = pickle.loads(self._args_blob)
            except Exception as exc:
                self._args = (('<arguments not unpicklable here: %s>' % exc,), {})
        return self._args

    @property
    def args(self):
        return self._arguments()[0]

    @property
    def kwargs(self):
        return self._arguments()[1]

    def __reduce__(self):
        if self._args is None:
            return (_packed_task_info, (self.task, self._args_blob, self.start_time))
        return (TaskInfo, (self.task, self._args[0], self._args[1], self.start_time))

    def __repr__(self):
        return 'TaskInfo(%s)' % (self.task,)


def _packed_task_info(task, args_blob, start_time):
    """A TaskInfo whose arguments are still pickled (also how one unpickles)."""
    info = TaskInfo(task, (), {}, start_time)
    info._args, info._args_blob = None, args_blob
    return info


_REGEX_CHARS = re.compile(r'[*?\[\]\\(){}|+^$]')


def _address_pattern(node):
    """A DispycosNodeAllocate's ``node`` as a regular expression of addresses: '*'
    any; a name or address (resolved) that one; '10.1.*' a wildcard; else the
    expression given."""
    if node == '*':
        return '.*'
    if not _REGEX_CHARS.search(node):
        return re.escape(dispy.resolve_host(node) or node)
    if '*' in node and '.*' not in node:
        return node.replace('.', r'\.').replace('*', '.*')
    return node


class DispycosNodeAllocate:
    """Which nodes a computation uses, and how many of their servers (seed 003
    §6.7): ``node`` (a name, an address or a regular expression of addresses),
    ``platform`` (a regular expression searched in the node's platform string, case
    ignored), and the least ``cpus``, ``memory`` and ``disk`` it must have.
    ``allocate()`` may be overridden (in a private scheduler): a positive number of
    servers to use, 0 not to use the node, negative to try the next allocation.

    ``cpus``: positive, at least that many servers (that many used); negative, that
    many fewer than the node has (4.12); 0 given explicitly makes it a rule that
    leaves out the nodes it matches (4.12's ``DispycosNodeAllocate('*',
    platform='Windows', cpus=0)``: a node of another platform goes to the next
    rule).  A node no rule takes is not used, unless every rule is such an
    exclusion."""

    def __init__(self, node='*', platform='', cpus=None, memory=0, disk=0, **_ignored):
        self.node = node if node else '*'
        self.ip_rex = _address_pattern(self.node)
        self.platform = platform or ''
        self.cpus = None if cpus is None else int(cpus)
        self.memory, self.disk = int(memory or 0), int(disk or 0)

    @property
    def excludes(self):
        """True for a rule that only leaves nodes out (cpus=0)."""
        return self.cpus == 0

    def allocate(self, ip_addr, name, platform, cpus, memory, disk):
        if not re.match(self.ip_rex + '$', ip_addr):
            return -1
        if self.platform and not re.search(self.platform, platform or '', re.IGNORECASE):
            return -1 if self.excludes else 0
        if self.memory and memory is not None and memory < self.memory:
            return 0
        if self.disk and disk is not None and disk < self.disk:
            return 0
        if not self.cpus:
            return 0 if self.excludes else cpus
        if self.cpus > 0:
            return self.cpus if cpus >= self.cpus else 0
        return max(0, cpus + self.cpus)

    def __reduce__(self):
        return (DispycosNodeAllocate, (self.node, self.platform, self.cpus, self.memory,
                                       self.disk))


# ================================================================================
# The scheduler: nodes, servers, computations one at a time, remote tasks
# ================================================================================
#
# It lives on the runner of the process that hosts it: the client's with a private
# ``Scheduler()``, or the program ``python dispycos.py``.  Clients reach it through
# calls (sched.*), a private one directly.  Nodes make themselves known by calling
# sched.node_here (after a discovery datagram or at their start).
#
#   Computation             scheduler                 node / servers
#   sched.schedule    ──►   queue; when first:  ──►   node.reserve → its servers
#                                                     server.load (components)
#   sched.run         ──►   a free server       ──►   server.run → the task (ref);
#                     ◄──   the task            ◄──   with wait: when it ended
#                           sched.task_done     ◄──   (N) every task's end
#   sched.close       ──►   server.close, node.release; the next computation

NodeDiscovered, NodeInitialized, NodeClosed, NodeIgnore, NodeDisconnected = (
    'NodeDiscovered', 'NodeInitialized', 'NodeClosed', 'NodeIgnore', 'NodeDisconnected')
ServerDiscovered, ServerInitialized, ServerClosed, ServerIgnore, ServerDisconnected = (
    'ServerDiscovered', 'ServerInitialized', 'ServerClosed', 'ServerIgnore',
    'ServerDisconnected')
ServerAbandoned, TaskCreated, TaskAbandoned, TaskStarted, TaskFinished = (
    'ServerAbandoned', 'TaskCreated', 'TaskAbandoned', 'TaskStarted', 'TaskFinished')
ComputationScheduled, ComputationClosed, AbandonZombie = (
    'ComputationScheduled', 'ComputationClosed', 'AbandonZombie')
ClientScheduled, ClientClosed = ComputationScheduled, ComputationClosed     # 4.12 names

STATUS_NAMES = ('NodeDiscovered', 'NodeInitialized', 'NodeClosed', 'NodeIgnore',
                'NodeDisconnected', 'ServerDiscovered', 'ServerInitialized', 'ServerClosed',
                'ServerIgnore', 'ServerDisconnected', 'ServerAbandoned', 'TaskCreated',
                'TaskAbandoned', 'TaskStarted', 'TaskFinished', 'ComputationScheduled',
                'ComputationClosed', 'ClientScheduled', 'ClientClosed', 'AbandonZombie')


PREFETCH_BELOW = 0.02   # s: CPU-bound tasks shorter than this may queue on a server
PREFETCH_DEPTH = 2      # ... at most one running and one waiting there


class _ServerState:
    __slots__ = ('location', 'node', 'cpu_tasks', 'tasks', 'ready', 'closed')

    def __init__(self, location, node):
        self.location, self.node = location, node
        self.cpu_tasks = 0          # run / run_at tasks running (one at a time)
        self.tasks = {}             # task id -> (task, cpu?, monotonic start) running
        self.ready = False          # the computation's components are loaded
        self.closed = False


class _NodeState:
    __slots__ = ('location', 'info', 'servers', 'computation', 'allocated', 'reserving',
                 'initialized', 'enable_args')

    def __init__(self, location, info):
        self.location, self.info = location, info
        self.servers = {}           # Location -> _ServerState
        self.computation = None     # the id of the computation it serves
        self.allocated = 0
        self.reserving = False      # node.reserve sent, not answered yet
        self.initialized = False    # reserved and set up: its servers may be taken
        self.enable_args = None     # node_setup's arguments once enabled (set up when
                                    # reserved: enable_node may come first)


class _ComputationState:
    def __init__(self, comp_id, spec, client):
        self.id = comp_id
        self.spec = spec
        self.client = client                # Location of the client process
        self.status_task = spec.get('status_task')
        self.waiting_runs = collections.deque()     # tasks waiting for a free server
        self.active = Event()
        self.closed = False
        self.servers_ready = Event()        # at least one server is ready
        self.result_waiters = {}            # (server, task id) -> task in run_result
        self.ended_early = {}               # (server, task id) -> (blob, failure, task)
        self.mean_duration = None           # of CPU-bound tasks (moving average), s
        self.durations = 0
        self.failed_nodes = set()           # nodes whose setup failed: not asked again

    def needs_node_setup(self):
        """Its nodes are set up (node_setup) or enabled (disable_nodes) before their
        servers are taken."""
        return bool(self.spec['server'].get('node_setup') or self.spec.get('disable_nodes'))

    def note_duration(self, seconds):
        self.durations += 1
        mean = self.mean_duration
        self.mean_duration = seconds if mean is None else 0.8 * mean + 0.2 * seconds

    def short_tasks(self):
        """True once this computation's CPU-bound tasks are known to be short."""
        return self.durations >= 3 and self.mean_duration < PREFETCH_BELOW


class Scheduler:
    """The dispycos scheduler.  ``Scheduler()`` in a client starts a private one (in
    this process); ``python dispycos.py`` runs a shared one.  Status names are its
    attributes too (``Scheduler.ServerInitialized``)."""

    _local = None           # the private scheduler of this process, if any

    def __init__(self, nodes=None, zombie_period=None, **pycos_options):
        if Scheduler._local is not None:
            raise RuntimeError('this process has a scheduler already')
        pycos = Pycos(**pycos_options) if pycos_options else Pycos.instance()
        self.pycos = pycos
        self.peers = pycos.peers
        pycos.role = 'scheduler'
        self.location = pycos.location
        self.zombie_period = zombie_period
        self.nodes = {}             # node Location -> _NodeState
        self.servers = {}           # server Location -> _ServerState
        self.computations = collections.deque()    # in order; the first is active
        self.by_id = {}
        self.node_addrs = list(nodes or [])
        for name in ('schedule', 'run', 'task_done', 'close', 'nodes', 'servers',
                     'node_here', 'node_closed', 'server_closing', 'enable_server',
                     'enable_node', 'status'):
            pycos.add_service('sched.' + name, getattr(self, '_op_' + name))
        self.peers.lost_hooks.append(lambda loc: self.pycos._runner.post(self._peer_lost, loc))
        Scheduler._local = self
        self.discovery = _SchedulerDiscovery(self)
        pycos._discovery = self.discovery
        self.discovery.start(self.node_addrs)

    # -- nodes and servers ----------------------------------------------------------------
    def _op_node_here(self, caller, info):
        """A node makes itself known (after a ping, or at its start)."""
        location = Location(*info['location'])
        node = self.nodes.get(location)
        if node is None:
            node = self.nodes[location] = _NodeState(location, info)
            logger.debug('node %s (%s) with %d servers', location, info.get('name'),
                         len(info.get('servers', ())))
        else:
            node.info = info
        comp = self._active()
        if comp is None or comp.closed:
            return 0        # (a node released by a closing computation: the next one)
        if node.computation is None:
            self._reserve(comp, node)
        elif node.computation == comp.id and node.initialized:
            self._new_servers(comp, node, info.get('servers', ()))
        return 0

    def _new_servers(self, comp, node, servers):
        """Takes the node's servers not known yet (all of a node just reserved, or a
        server restarted), up to its allocation."""
        for loc in servers:
            location = Location(*loc)
            if location in node.servers or len(node.servers) >= node.allocated:
                continue
            server = node.servers[location] = _ServerState(location, node)
            self.servers[location] = server
            self._status(comp, ServerDiscovered, location)
            if not comp.spec.get('disable_servers'):
                self._load_server(comp, server, ())

    def add_node(self, location):
        """Asks the node at ``location`` to make itself known (``Pycos.peer``)."""
        self.peers.call_back(location, 'node.info', (),
                             lambda ok, info: ok and isinstance(info, dict)
                             and self._op_node_here(location, info))

    def _avail_of(self, node):
        info = node.info
        avail = info.get('avail') or {}
        return DispycosNodeAvailInfo(node.location, avail.get('cpu'), avail.get('memory'),
                                     avail.get('disk'), avail.get('swap'), info.get('name'),
                                     len(info.get('servers', ())))

    def _allocation(self, comp, node):
        """How many of the node's servers the computation takes (0: none)."""
        info = node.info
        servers = len(info.get('servers', ()))
        allocations = comp.spec.get('node_allocations') or []
        avail = info.get('avail') or {}
        for alloc in allocations:
            try:
                cpus = alloc.allocate(node.location.addr, info.get('name'),
                                      info.get('platform'), servers, avail.get('memory'),
                                      avail.get('disk'))
            except Exception as exc:
                logger.warning('allocate() of %r failed: %s', alloc, exc)
                return 0
            if cpus is None or cpus < 0:
                continue
            return min(int(cpus), servers)
        if all(getattr(alloc, 'excludes', False) for alloc in allocations):
            return servers          # no rule but exclusions left it out
        return 0

    def _reserve(self, comp, node):
        if node.location in comp.failed_nodes:
            return
        cpus = self._allocation(comp, node)
        self._status(comp, NodeDiscovered, self._avail_of(node))
        if cpus <= 0:
            return
        node.computation = comp.id
        node.allocated = cpus
        node.reserving = True
        node.initialized = False
        node.enable_args = None
        self.peers.call_back(node.location, 'node.reserve',
                             (comp.id, self.location, comp.client, comp.spec['server'],
                              comp.spec['files'], cpus),
                             lambda ok, value: self._reserved(comp, node, ok, value))

    def _reserved(self, comp, node, ok, value):
        node.reserving = False
        if not ok or not isinstance(value, list):
            if 'serves another computation' in str(value):
                logger.info('node %s is busy with another computation; it will make '
                            'itself known when free', node.location)
            else:
                logger.warning('node %s not used: %s', node.location, value)
            node.computation = None
            return
        if comp.closed:
            self.peers.notify(node.location, 'node.release', (comp.id,))
            node.computation = None
            return
        if not comp.needs_node_setup():
            self._initialized(comp, node, value)
        elif not comp.spec.get('disable_nodes'):
            node.enable_args = pickle.dumps((), BLOB_PROTOCOL)
            self._setup_node(comp, node, node.enable_args)
        elif node.enable_args is not None:      # enable_node came first
            self._setup_node(comp, node, node.enable_args)

    def _setup_node(self, comp, node, args_blob):
        """node_setup(*args) at the node (in a process of its own, which then makes
        the node's servers for the computation); then its servers are taken."""
        self.peers.call_back(node.location, 'node.setup', (comp.id, args_blob),
                             lambda ok, value: self._node_set_up(comp, node, ok, value))

    def _node_set_up(self, comp, node, ok, value):
        if comp.closed or node.computation != comp.id:
            return
        if ok and isinstance(value, list):
            self._initialized(comp, node, value)
            return
        logger.warning('node %s not used: its setup failed: %s', node.location, value)
        comp.failed_nodes.add(node.location)
        node.computation = None
        self.peers.notify(node.location, 'node.release', (comp.id,))
        self._status(comp, NodeClosed, self._avail_of(node))

    def _initialized(self, comp, node, servers):
        node.initialized = True
        self._status(comp, NodeInitialized, self._avail_of(node))
        self._new_servers(comp, node, servers)

    def _load_server(self, comp, server, setup_args):
        self.peers.call_back(server.location, 'server.load',
                             (comp.id, comp.spec['server'], self.location, setup_args),
                             lambda ok, value: self._loaded(comp, server, ok, value))

    def _loaded(self, comp, server, ok, value):
        if not ok or value != 0:
            logger.warning('server %s not used: %s', server.location, value)
            server.closed = True
            self._status(comp, ServerClosed, server.location)
            return
        if comp.closed:             # closed while loading: undone there too
            self.peers.notify(server.location, 'server.close', (comp.id,))
            return
        server.ready = True
        self._status(comp, ServerInitialized, server.location)
        comp.servers_ready.set()
        if comp.spec.get('peers_communicate'):
            others = [s.location for s in self.servers.values() if s.ready and not s.closed]
            for other in others:
                self.peers.notify(other, 'server.peers', (others,))
        self._dispatch(comp)

    def _peer_lost(self, location):
        server = self.servers.get(location)
        if server is not None and not server.closed:
            self._server_gone(server, 'server %s lost' % location)
            return
        node = self.nodes.get(location)
        if node is not None:
            for server in list(node.servers.values()):
                if not server.closed and not self.peers.is_connected(server.location):
                    self._server_gone(server, 'node %s lost' % location)
            comp = self.by_id.get(node.computation)
            if comp is not None:
                self._status(comp, NodeClosed, self._avail_of(node))
            del self.nodes[location]
            return
        for comp in list(self.computations):
            if comp.client == location and location != self.location:
                logger.info('client %s of computation %s lost: closing it', location, comp.id)
                Task(self._close_gen, comp, True, 0).set_daemon()

    def _op_server_closing(self, caller, comp_id):
        """A server closes itself (dispycos_close_server): no more tasks there."""
        server = self.servers.get(caller)
        if server is not None and server.node.computation == comp_id:
            self._server_gone(server, 'server %s closed by its computation' % caller)

    def _op_node_closed(self, caller, comp_id, why):
        """A node ended the computation on its own (its service window, its
        operator): its servers are gone for it."""
        node = self.nodes.get(caller)
        if node is None or node.computation != comp_id:
            return
        for server in list(node.servers.values()):
            self._server_gone(server, 'node %s: %s' % (caller, why))
        node.computation = None
        comp = self.by_id.get(comp_id)
        if comp is not None:
            self._status(comp, NodeClosed, self._avail_of(node))

    def _server_gone(self, server, why):
        """A server vanished: its tasks end with PeerLost, the computation goes on."""
        server.closed = True
        server.ready = False
        comp = self._active()
        for tid, (task, _cpu, _since) in list(server.tasks.items()):
            if comp is not None:
                blob = pickle.dumps(MonitorStatus(task, PeerLost, why), BLOB_PROTOCOL)
                self._task_status(comp, blob, why, task)
                waiter = comp.result_waiters.pop((server.location, tid), None)
                if waiter is not None:
                    waiter[0]._wake_wait(waiter[1], ('ended', blob))
        server.tasks.clear()
        server.cpu_tasks = 0
        self.servers.pop(server.location, None)
        server.node.servers.pop(server.location, None)
        if comp is not None:
            self._status(comp, ServerClosed, server.location)
            self._dispatch(comp)

    # -- computations -----------------------------------------------------------------------
    def _active(self):
        return self.computations[0] if self.computations else None

    def _op_schedule(self, caller, comp_id, spec):
        comp = self.by_id.get(comp_id)
        if comp is None:
            comp = _ComputationState(comp_id, spec, caller)
            self.by_id[comp_id] = comp
            self.computations.append(comp)
            if len(self.computations) == 1:
                self._activate(comp)
            else:
                logger.info('computation %s queued behind %d', comp_id,
                            len(self.computations) - 1)
        return self._wait_active(comp)

    def _wait_active(self, comp):
        yield comp.active.wait()
        return 0

    def _activate(self, comp):
        logger.debug('computation %s scheduled', comp.id)
        comp.active.set()
        self.pycos._runner.call_later(dispy.NO_NODE_WARN_AFTER, self._warn_no_server, comp,
                                      dispy.NO_NODE_WARN_AFTER)
        self._status(comp, ComputationScheduled, self.location)
        if comp.status_task is not None:
            self.pycos._runner.call_later(self._avail_every(comp), self._send_avail, comp)
        for node in list(self.nodes.values()):
            if node.computation is None:
                self._reserve(comp, node)
        self.discovery.ping()

    @staticmethod
    def _avail_every(comp):
        """Seconds between availability reports: the computation's pulse_interval
        (DISPYCOS_PULSE, when set lower, for tests)."""
        return min(comp.spec['server'].get('pulse_interval') or MinPulseInterval,
                   PULSE_INTERVAL)

    def _send_avail(self, comp):
        """Each node's availability (a DispycosNodeAvailInfo) to status_task, every
        pulse_interval, from nodes that measure it (psutil there, seed 003 §6.6)."""
        if comp.closed or comp not in self.computations:
            return
        for node in self.nodes.values():
            if node.computation == comp.id and node.initialized:
                self.peers.call_back(node.location, 'node.info', (),
                                     functools.partial(self._avail_came, comp, node))
        self.pycos._runner.call_later(self._avail_every(comp), self._send_avail, comp)

    def _avail_came(self, comp, node, ok, info):
        if not ok or not isinstance(info, dict) or comp.closed or node.computation != comp.id:
            return
        node.info = info
        if (info.get('avail') or {}).get('cpu') is not None:
            try:
                comp.status_task.send(self._avail_of(node))
            except Exception as exc:
                logger.debug('availability of %s not sent: %s', node.location, exc)

    def _warn_no_server(self, comp, after):
        """Says so while a computation has no server (doubling the interval)."""
        if comp.closed or comp.servers_ready.is_set():
            return
        logger.warning('no dispycos server for the computation after %.0f s (%d node(s) '
                       'known): is dispycosnode running there, with the same secret and '
                       'TLS settings, and reachable (DISPYCOS_PEERS, --peer)?',
                       after, len(self.nodes))
        self.pycos._runner.call_later(after, self._warn_no_server, comp, 2 * after)

    def _op_run(self, caller, comp_id, where, mode, func, args_blob, wait):
        comp = self.by_id.get(comp_id)
        if comp is None or comp.closed or not comp.active.is_set():
            raise TaskError('computation %s is not scheduled' % comp_id)
        return self._run_gen(comp, where, mode, func, args_blob, wait)

    def _run_gen(self, comp, where, mode, func, args_blob, wait):
        """Waits for a server (one CPU-bound task running per server), creates the
        task there; with ``wait``, gives ``('ended', status blob)`` once it ended
        (the scheduler never unpickles a task's status: a shared one has none of the
        client's classes; the Computation does, see _ended_value)."""
        me = current_task()
        while True:
            if comp.closed:
                return TaskError('computation %s closed' % comp.id)
            server = self._pick_server(comp, where, mode)
            if server is not None:
                break
            if where is not None and not self._may_serve(comp, where):
                return TaskError('no server of this computation at %s' % (where,))
            comp.waiting_runs.append((me._wait_for(), where, mode))
            yield None
        cpu = mode == 'cpu'
        if cpu:
            server.cpu_tasks += 1
        task = yield self.peers.call(server.location, 'server.run',
                                     (comp.id, func, args_blob, cpu))
        if not isinstance(task, Task):
            if cpu and server.cpu_tasks > 0:
                server.cpu_tasks -= 1
            self._dispatch(comp)
            return task if isinstance(task, BaseException) else TaskError(str(task))
        if server.closed:       # lost while the answer was on its way
            return PeerLost('server %s lost' % server.location)
        key = (server.location, task._id)
        self._status(comp, TaskCreated, _packed_task_info(task, args_blob, time.time()))
        ended = comp.ended_early.pop(key, None)
        if ended is not None:
            self._task_status(comp, *ended)
            return ('ended', ended[0]) if wait else task
        server.tasks[task._id] = (task, cpu, time.monotonic())
        if not wait:
            return task
        comp.result_waiters[key] = me._wait_for()
        return (yield None)

    def _may_serve(self, comp, where):
        """False when no server at ``where`` is or may become the computation's."""
        if isinstance(where, Location):
            server = self.servers.get(where)
            return server is None or not server.closed
        return True

    def _pick_server(self, comp, where, mode):
        candidates = [s for s in self.servers.values()
                      if s.ready and not s.closed and s.node.computation == comp.id]
        if where is not None:
            if isinstance(where, Location):
                candidates = [s for s in candidates if s.location == where]
            else:
                addr = dispy.resolve_host(str(where)) or str(where)
                candidates = [s for s in candidates if s.node.location.addr == addr]
        if mode == 'cpu':
            free = [s for s in candidates if s.cpu_tasks == 0]
            if not free and comp.short_tasks():
                # Short tasks: one more may wait on a busy server, started there when
                # the one running ends; the round trip in between would otherwise
                # bound the rate (a long task never has one queued behind it).
                free = [s for s in candidates if s.cpu_tasks < PREFETCH_DEPTH]
            candidates = free
        if not candidates:
            return None
        return min(candidates, key=lambda s: (s.cpu_tasks, len(s.tasks)))

    def _dispatch(self, comp):
        """Wakes runs waiting for a server, first come first served, as many as
        there are free places (a run placed at a node or server, when that one is
        free)."""
        waiting = comp.waiting_runs
        free = None                 # free places for runs placed anywhere, counted once
        for _ in range(len(waiting)):
            (task, wait_id), where, mode = waiting.popleft()
            if task._done or task._waiting != _WAIT_OTHER or task._wait_id != wait_id:
                continue
            if where is None:
                if free is None:
                    free = self._free_places(comp)
                if free.get(mode, 0) > 0:
                    free[mode] -= 1
                    task._wake_wait(wait_id)
                    continue
            elif self._pick_server(comp, where, mode) is not None:
                task._wake_wait(wait_id)
                continue
            waiting.append(((task, wait_id), where, mode))

    def _free_places(self, comp):
        """{'cpu': places for CPU-bound runs, 'async': 1 if any server} now."""
        servers = [s for s in self.servers.values()
                   if s.ready and not s.closed and s.node.computation == comp.id]
        depth = PREFETCH_DEPTH if comp.short_tasks() else 1
        return {'cpu': sum(max(0, depth - s.cpu_tasks) for s in servers),
                'async': len(comp.waiting_runs) + 1 if servers else 0}

    def _op_task_done(self, caller, comp_id, task, cpu, blob, failure):
        """A server says one of its tasks ended: ``blob`` is its pickled
        MonitorStatus (passed on unopened), ``failure`` a line of text if it failed."""
        comp = self.by_id.get(comp_id)
        server = self.servers.get(caller)
        if server is not None and cpu and server.cpu_tasks > 0:
            server.cpu_tasks -= 1
        entry = server.tasks.pop(task._id, None) if server is not None else None
        if entry is not None and cpu and comp is not None:
            comp.note_duration(time.monotonic() - entry[2])
        if comp is None:
            return None
        key = (caller, task._id)
        if entry is None and server is not None:
            comp.ended_early[key] = (blob, failure, task)   # its creation's answer is due
            if cpu:
                comp.note_duration(0.0)         # it ended before that answer: short
        else:
            waiter = comp.result_waiters.pop(key, None)
            if waiter is not None:
                waiter[0]._wake_wait(waiter[1], ('ended', blob))
            self._task_status(comp, blob, failure, task)
        self._dispatch(comp)
        return None

    def _task_status(self, comp, blob, failure, task):
        """A task's MonitorStatus (a blob) to status_task; a failure nobody watches
        is logged."""
        target = comp.status_task
        if target is None:
            if failure:
                logger.warning('remote task %s failed: %s', task, failure)
        elif target._remote is not None:
            self.peers.queue(target._remote, ('T', target._id, blob), len(blob))
        else:                                   # a private scheduler: the client itself
            try:
                status = pickle.loads(blob)
            except Exception as exc:            # e.g. a class only the servers have
                status = MonitorStatus(task, TaskError, 'the status could not be unpickled '
                                       'here: %s: %s' % (type(exc).__name__, exc))
            target.send(status)

    def _status(self, comp, status, info=None):
        target = comp.status_task
        if target is None:
            return
        try:
            target.send(status if info is None else DispycosStatus(status, info))
        except Exception as exc:
            logger.warning('status for %s could not be sent: %s', comp.id, exc)

    def _op_nodes(self, caller, comp_id):
        return [n.location.addr for n in self.nodes.values() if n.computation == comp_id]

    def _op_servers(self, caller, comp_id):
        return [s.location for s in self.servers.values()
                if s.ready and not s.closed and s.node.computation == comp_id]

    def _op_enable_server(self, caller, comp_id, location, args):
        comp = self.by_id.get(comp_id)
        server = self.servers.get(location)
        if comp is None or server is None:
            return -1
        self._load_server(comp, server, tuple(args))
        return 0

    def _op_enable_node(self, caller, comp_id, addr, args):
        """Sets up a node of a ``disable_nodes`` computation: node_setup(*args)
        there (before its reserve is answered: once it is); -1 if no such node."""
        comp = self.by_id.get(comp_id)
        if isinstance(addr, Location):
            addr = addr.addr
        addr = dispy.resolve_host(str(addr)) or str(addr)
        if comp is None or comp.closed:
            return -1
        try:
            blob = pickle.dumps(tuple(args), BLOB_PROTOCOL)
        except Exception as exc:
            raise TypeError('enable_node(%s): the arguments could not be pickled: %s: %s'
                            % (addr, type(exc).__name__, exc)) from None
        enabled = 0
        for node in self.nodes.values():
            if node.location.addr != addr or node.computation != comp_id or \
                    node.enable_args is not None:   # (a second enable_node: -1)
                continue
            node.enable_args = blob
            if not node.reserving:
                self._setup_node(comp, node, blob)
            enabled += 1
        return 0 if enabled else -1

    def _op_status(self, caller):
        return {'nodes': len(self.nodes), 'servers': len(self.servers),
                'computations': [c.id for c in self.computations]}

    def _op_close(self, caller, comp_id, await_async, timeout, terminate):
        comp = self.by_id.get(comp_id)
        if comp is None:
            return 0
        return self._close_gen(comp, terminate, timeout)

    def _close_gen(self, comp, terminate, timeout, task=None):
        if comp.closed:
            return 0
        deadline = None if timeout is None else time.monotonic() + timeout
        if not terminate:
            for _ in itertools.count():      # until the CPU-bound tasks are done
                busy = [s for s in self.servers.values() if s.node.computation == comp.id
                        and s.cpu_tasks > 0]
                if not busy or (deadline is not None and time.monotonic() > deadline):
                    break
                yield current_task().sleep(0.05)
        comp.closed = True
        for (waiter, wait_id), _where, _mode in comp.waiting_runs:
            waiter._wake_wait(wait_id)
        comp.waiting_runs.clear()
        nodes = [n for n in self.nodes.values() if n.computation == comp.id]
        for node in nodes:
            for server in list(node.servers.values()):
                if not server.closed:       # loaded, loading or not: it is closed
                    yield self.peers.call(server.location, 'server.close', (comp.id,),
                                          timeout=MsgTimeout)
                self._status(comp, ServerClosed, server.location)
                self.servers.pop(server.location, None)
            node.servers.clear()
            yield self.peers.call(node.location, 'node.release', (comp.id,), timeout=MsgTimeout)
            node.computation = None
            self._status(comp, NodeClosed, self._avail_of(node))
        for waiter in comp.result_waiters.values():     # their servers never answered
            waiter[0]._wake_wait(waiter[1], TaskError('the computation closed before the '
                                                      'task\'s end was known'))
        comp.result_waiters.clear()
        self._status(comp, ComputationClosed, self.location)
        if comp in self.computations:
            first = self.computations[0] is comp
            self.computations.remove(comp)
            self.by_id.pop(comp.id, None)
            for node in self.nodes.values():
                if node.computation == comp.id:
                    node.computation = None
            if first and self.computations:
                self._activate(self.computations[0])
        return 0

    def close(self):
        for comp in list(self.computations):
            Task(self._close_gen, comp, True, 0).set_daemon()
        self.discovery.close()


for _name in STATUS_NAMES:
    setattr(Scheduler, _name, globals()[_name])


class _SchedulerDiscovery:
    """The scheduler's UDP side: pings nodes (broadcast on its networks, unicast to
    the nodes it is given) and hears nodes announce themselves; a node that hears a
    ping calls sched.node_here."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        pycos = scheduler.pycos
        self.endpoint = dispy.DiscoveryEndpoint(pycos.secret, self._on_datagram,
                                                self._on_unauthenticated)
        self.refused_by = set()
        addr = scheduler.location.addr
        self.bind_addr = pycos._peers.listener.server_address[0]
        self.node_port = int(os.environ.get('DISPYCOS_NODE_PORT', NODE_PORT))
        try:
            port = int(pycos._udp_port) if pycos._udp_port else SCHEDULER_PORT
            self.endpoint.bind('' if not dispy.is_loopback(addr) else addr, port, reuse=True)
        except OSError:
            self.endpoint.bind(self.bind_addr, 0)
        self.loop = pycos._peers.loop
        self.targets = []

    def start(self, nodes):
        for entry in nodes + _split_env('DISPYCOS_PEERS'):
            host, _, port = str(entry).rpartition(':') if ':' in str(entry) and \
                str(entry).count(':') == 1 else (str(entry), '', '')
            addr = dispy.resolve_host(host)
            if addr:
                self.targets.append((addr, int(port) if port else self.node_port))
        watch_endpoint(self.loop, self.endpoint)
        self.ping()

    def _ping_msg(self):
        return self.endpoint.pack({'t': 'ping', 'scheduler': list(self.scheduler.location.key()),
                                   'port': self.endpoint.port})

    def ping(self, port=None):
        data = self._ping_msg()
        for target in self.targets:
            self.endpoint.sendto(data, target)
        addr = self.scheduler.location.addr
        if not dispy.is_loopback(addr):
            self.endpoint.broadcast(data, port or self.node_port, [addr])

    def _on_unauthenticated(self, msg, addr, sock):
        if msg.get('t') == 'nak' and addr[0] not in self.refused_by:
            if len(self.refused_by) < 1024:     # said once per node (bounded)
                self.refused_by.add(addr[0])
            logger.warning('the node at %s refused this scheduler\'s ping: its secret is '
                           'not this one', addr[0])

    def _on_datagram(self, msg, addr, sock):
        if msg.get('t') == 'announce' and isinstance(msg.get('port'), int):
            target = (msg.get('addr') or addr[0], msg['port'])
            self.endpoint.sendto(self._ping_msg(), target)

    def close(self):
        unwatch_endpoint(self.loop, self.endpoint)


def watch_endpoint(loop, endpoint):
    """Reads a DiscoveryEndpoint's sockets on an IOLoop."""
    def register():
        for sock in endpoint.socks:
            loop.selector.register(sock, selectors.EVENT_READ,
                                   functools.partial(_readable, endpoint, sock))
    loop.in_loop(register)


def _readable(endpoint, sock, _events):
    endpoint.handle_readable(sock)


def unwatch_endpoint(loop, endpoint):
    def unregister():
        endpoint.unregister(loop.selector)
        endpoint.close()
    loop.in_loop(unregister)


def _ended_value(result):
    """What a run method gives for the scheduler's answer: ``('ended', blob)`` is a
    task's end (its MonitorStatus, unpickled here, in the client)."""
    if type(result) is tuple and len(result) == 2 and result[0] == 'ended':
        try:
            return _status_value(pickle.loads(result[1]))
        except Exception as exc:
            return TaskError('the task\'s result could not be unpickled here: %s: %s'
                             % (type(exc).__name__, exc))
    return result


def _status_value(status):
    """What run_result gives for a task's MonitorStatus: its value, or a TaskError
    that says how it ended."""
    if status.type is StopIteration:
        return status.value
    task = status.info
    if status.type is GeneratorExit:
        return TaskError('task %s was terminated' % task, GeneratorExit)
    if status.type is PeerLost:
        return PeerLost(str(status.value))
    text = str(status.value or '')
    last = text.strip().splitlines()[-1] if text.strip() else getattr(status.type, '__name__', '')
    return TaskError('task %s failed: %s' % (task, last), status.type, text)


def _split_env(name):
    return [p for p in re.split(r'[,\s]+', os.environ.get(name, '')) if p]


# ================================================================================
# Computation (4.12's Client): what a client program schedules and runs tasks of
# ================================================================================

class Computation:
    """Code and data for remote servers, and the calls that run tasks there (seed
    003 §6.4).  Every method is used with yield in a task:
    ``rtask = yield computation.run(compute, n)``."""

    def __init__(self, components, pulse_interval=2 * MinPulseInterval, node_allocations=None,
                 nodes=None, status_task=None, node_setup=None, server_setup=None,
                 disable_nodes=False, disable_servers=False, peers_communicate=False,
                 restart_servers=False, zombie_period=None, abandon_zombie_nodes=False,
                 **_ignored):
        if not isinstance(components, (list, tuple)):
            components = [components]
        if not (MinPulseInterval <= pulse_interval <= MaxPulseInterval):
            raise ValueError('pulse_interval must be between %s and %s (MinPulseInterval, '
                             'MaxPulseInterval), not %s' % (MinPulseInterval,
                                                            MaxPulseInterval, pulse_interval))
        if status_task is not None and not isinstance(status_task, Task):
            raise ValueError('status_task must be a Task, not %r' % (status_task,))
        allocations = list(node_allocations or []) + list(nodes or [])
        allocations = [a if isinstance(a, DispycosNodeAllocate) else DispycosNodeAllocate(str(a))
                       for a in allocations]
        self.id = uuid.uuid4().hex
        self._components = {}       # name -> the object, for run's function references
        sources, files = [], []
        if (disable_nodes or disable_servers) and status_task is None:
            raise ValueError('disable_nodes / disable_servers need a status_task (it '
                             'enables them: enable_node / enable_server)')
        for setup, what in ((node_setup, 'node_setup'), (server_setup, 'server_setup')):
            if setup is not None and not inspect.isgeneratorfunction(setup):
                raise ValueError('%s must be a generator function, not %r' % (what, setup))
        for comp in list(components) + [f for f in (node_setup, server_setup) if f]:
            self._add_component(comp, sources, files)
        self._scheduler = None
        self.status_task = status_task
        self.pulse_interval = pulse_interval
        self._server_spec = {
            'id': self.id, 'sources': sources,
            'modules': [name for name, _data, _mode, kind in files if kind == 'module'],
            'server_setup': server_setup.__name__ if server_setup else None,
            'node_setup': node_setup.__name__ if node_setup else None,
            'disable_servers': bool(disable_servers), 'restart_servers': bool(restart_servers),
            'pulse_interval': pulse_interval}
        self._files = [(name, data, mode) for name, data, mode, _kind in files]
        self._options = {'node_allocations': allocations, 'disable_nodes': bool(disable_nodes),
                         'disable_servers': bool(disable_servers),
                         'peers_communicate': bool(peers_communicate),
                         'zombie_period': zombie_period}

    def _add_component(self, comp, sources, files):
        if inspect.isfunction(comp) or inspect.isclass(comp):
            try:
                source = dispy._function_source(comp, 'component')
            except dispy.ComputationError as exc:
                raise ValueError(str(exc)) from None
            if comp.__name__ not in self._components:
                sources.append((comp.__name__, source))
                self._components[comp.__name__] = comp
        elif inspect.ismodule(comp):
            path = getattr(comp, '__file__', None)
            if not path or not path.endswith('.py'):
                raise ValueError('module component %s has no Python source file to send'
                                 % comp.__name__)
            files.append(self._file(path, 'module'))
        elif isinstance(comp, str):
            if not os.path.isfile(comp):
                raise ValueError('component %r is not a file (nor a function, class or '
                                 'module)' % comp)
            files.append(self._file(comp, 'file'))
        else:
            raise ValueError('component %r is not a function, class, module or file' % (comp,))

    @staticmethod
    def _file(path, kind):
        with open(path, 'rb') as f:
            data = f.read()
        name = os.path.basename(path)
        return (name, data, os.stat(path).st_mode & 0o777, kind)

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self, location=None, timeout=None):
        """``yield computation.schedule()``: 0 once the scheduler runs it (a shared
        scheduler may first finish computations queued before it); -1 on failure."""
        return self._schedule(location, timeout)

    def _schedule(self, location, timeout):
        pycos = Pycos.instance()
        peers = pycos.peers
        if location is None:
            location = _scheduler_location()
        elif not isinstance(location, Location):
            raise TypeError('schedule() takes the scheduler\'s Location')
        self._scheduler = location
        spec = dict(self._options, server=self._server_spec, files=self._files,
                    status_task=self.status_task)
        result = yield peers.call(location, 'sched.schedule', (self.id, spec), timeout=timeout)
        if result != 0:
            logger.warning('computation could not be scheduled at %s: %s', location, result)
            self._scheduler = None
            return -1
        return 0

    def _call(self, op, *args, timeout=None):
        if self._scheduler is None:
            return _error_result(TaskError('the computation is not scheduled: yield '
                                           'computation.schedule() first'))
        return Pycos.instance().peers.call(self._scheduler, op, (self.id,) + args,
                                           timeout=timeout)

    # -- running tasks ----------------------------------------------------------------------
    def _run(self, where, mode, gen, args, kwargs, wait):
        if not inspect.isgeneratorfunction(gen):
            return _error_result(TypeError(
                'a remote task needs a generator function (one that yields), not %r' % (gen,)))
        name = gen.__name__
        if self._components.get(name) is gen:
            func = (name, None)
        else:
            try:
                func = (name, dispy._function_source(gen, 'task function'))
            except dispy.ComputationError as exc:
                return _error_result(TypeError(str(exc)))
        try:
            blob = pickle.dumps((args, kwargs), BLOB_PROTOCOL)
        except Exception as exc:
            return _error_result(TypeError('the arguments of %s could not be pickled: %s: %s'
                                           % (name, type(exc).__name__, exc)))
        return self._run_call(where, mode, func, blob, wait)

    def _run_call(self, where, mode, func, blob, wait):
        result = yield self._call('sched.run', where, mode, func, blob, wait)
        return _ended_value(result)

    def run_at(self, where, gen, *args, **kwargs):
        """``rtask = yield computation.run_at(where, gen, ...)``: a task at a server
        (a Location) or a node (an address), once one is free; an exception object
        if it could not be created."""
        return self._run(where, 'cpu', gen, args, kwargs, False)

    def run(self, gen, *args, **kwargs):
        return self._run(None, 'cpu', gen, args, kwargs, False)

    def run_result_at(self, where, gen, *args, **kwargs):
        """``value = yield computation.run_result_at(...)``: the task's value once it
        ended (a TaskError / PeerLost if it failed)."""
        return self._run(where, 'cpu', gen, args, kwargs, True)

    def run_result(self, gen, *args, **kwargs):
        return self._run(None, 'cpu', gen, args, kwargs, True)

    def run_async_at(self, where, gen, *args, **kwargs):
        """Like run_at, but on a server even while it runs other tasks (for tasks
        that mostly wait)."""
        return self._run(where, 'async', gen, args, kwargs, False)

    def run_async(self, gen, *args, **kwargs):
        return self._run(None, 'async', gen, args, kwargs, False)

    def run_results(self, gen, iterable):
        """``results = yield computation.run_results(gen, items)``: run_result for
        each item (a tuple is several arguments), at once, results in order."""
        return self._run_results(gen, list(iterable))

    def _run_results(self, gen, items):
        def one(item, task=None):
            args = item if isinstance(item, tuple) else (item,)
            value = yield self.run_result(gen, *args)
            return value
        tasks = [Task(one, item) for item in items]
        results = []
        for task in tasks:
            task.set_daemon()
            results.append((yield task.finish()))
        return results

    # -- the computation's cluster --------------------------------------------------------------
    def nodes(self):
        """``addrs = yield computation.nodes()``"""
        return self._call('sched.nodes')

    def servers(self):
        """``locations = yield computation.servers()``"""
        return self._call('sched.servers')

    def enable_node(self, ip_addr, *setup_args):
        """Lets a node of a ``disable_nodes`` computation be used: node_setup runs
        there with ``setup_args`` (0, or -1 if the computation has no such node)."""
        return self._call('sched.enable_node', ip_addr, setup_args)

    def enable_server(self, location, *setup_args):
        """Lets a server of a ``disable_servers`` computation start, running
        server_setup with ``setup_args``."""
        return self._call('sched.enable_server', location, setup_args)

    def close(self, await_async=False, timeout=None, terminate=False):
        """``yield computation.close()``: waits for the run / run_at tasks (all, with
        ``terminate`` none), then ends the computation on every server."""
        return self._close(await_async, timeout, terminate)

    def _close(self, await_async, timeout, terminate):
        if self._scheduler is None:
            return 0
        result = yield self._call('sched.close', await_async, timeout, terminate)
        self._scheduler = None
        return result

    # 4.12's names
    rtask_at, rtask = run_at, run
    rtask_result_at, rtask_result, rtask_results = run_result_at, run_result, run_results
    io_rtask_at, io_rtask = run_async_at, run_async
    run_results_at = run_result_at


Client = Computation


def _error_result(exc):
    """A generator giving ``exc`` (what a run method gives for bad input), logged."""
    logger.warning('%s', exc)
    yield None
    return exc


def _scheduler_location():
    """Where ``schedule()`` without a location finds a scheduler: this process's
    private one, DISPYCOS_SCHEDULER (host[:port]), else the default address's 9705."""
    if Scheduler._local is not None:
        return Scheduler._local.location
    env = os.environ.get('DISPYCOS_SCHEDULER')
    if env:
        host, _, port = env.rpartition(':') if env.count(':') == 1 else (env, '', '')
        return Location(dispy.resolve_host(host) or host, int(port or SCHEDULER_PORT))
    return Location(Pycos.instance().location.addr, SCHEDULER_PORT)


# ================================================================================
# pycos-style names: dispycos.dispycos, dispycos.httpd, dispycos.asyncfile, ...
# ================================================================================

class HTTPServer:
    """``dispycos.httpd.HTTPServer(computation, host='', port=8181, poll_sec=10,
    DocumentRoot=None, keyfile=None, certfile=None, show_task_args=True)``: the web
    monitor of a computation (seed 003 §6.8), made before ``yield
    computation.schedule()``; it takes the computation's status messages and passes
    each on to the status task the computation had, if any.  ``status_task`` (what
    is sent there updates the monitor) and ``shutdown(wait=True)`` are the seed's;
    ``dispyhttpd.DispycosHTTPServer`` is the server itself (loaded only when a
    monitor is made)."""

    def __init__(self, computation, host='', port=8181, poll_sec=10, DocumentRoot=None,
                 keyfile=None, certfile=None, show_task_args=True, **options):
        import dispyhttpd
        self._server = dispyhttpd.DispycosHTTPServer(
            computation, host=host, port=port, poll_sec=poll_sec, DocumentRoot=DocumentRoot,
            keyfile=keyfile, certfile=certfile, show_task_args=show_task_args, **options)

    @property
    def status_task(self):
        return self._server.status_task

    def shutdown(self, wait=True):
        """Stops serving (with ``wait``, after a polling browser's next poll).  Called
        from a task it returns at once and the wait happens in a thread of its own
        (the process stays until it is over), so no task is held up."""
        if wait and current_task() is not None:
            threading.Thread(target=self._server.shutdown, args=(True,),
                             name='dispycos-httpd-shutdown').start()
        else:
            self._server.shutdown(wait)

    def __getattr__(self, name):        # port, token, urls(), show_task_args ...
        if name == '_server':
            raise AttributeError(name)
        return getattr(self._server, name)


def _install_aliases(module):
    """``import dispycos.httpd`` / ``dispycos.asyncfile`` / ``dispycos.netpycos`` /
    ``dispycos.dispycos`` give this module's parts; on servers also ``pycos.*``."""
    module.dispycos = module
    module.netpycos = module
    module.httpd = module
    aliases = dispy.SubmoduleAliases(module, {'dispycos': __name__, 'netpycos': __name__,
                                              'httpd': __name__})
    aliases.aliases[module.__name__ + '.asyncfile'] = __name__ + '._asyncfile_module'
    sys.modules[__name__ + '._asyncfile_module'] = asyncfile
    return aliases


def provide_pycos_name():
    """On a server: ``import pycos``, ``import pycos.asyncfile`` etc. give dispycos."""
    module = sys.modules[__name__]
    sys.modules.setdefault('pycos', module)
    for name in ('dispycos', 'netpycos', 'httpd'):
        sys.modules.setdefault('pycos.' + name, module)
    sys.modules.setdefault('pycos.asyncfile', asyncfile)


if __name__ != '__main__':
    _aliases = _install_aliases(sys.modules[__name__])


# ================================================================================
# The scheduler program: python dispycos.py (shared by many clients)
# ================================================================================

def add_common_options(add, what):
    """The options dispycos.py and dispycosnode.py share (seed 003 §6.2, §6.3.2, in
    both their spellings); ``add`` is a parser's add_argument."""
    add('-i', '--ip_addr', '--host', dest='ip_addr', action='append', default=[],
        help='address to serve on (repeatable; the first is used)')
    add('--ext_ip_addr', '--ext_host', dest='ext_ip_addr', action='append', default=[],
        help='address announced instead (NAT, cloud)')
    add('-n', '--name', default=None, help='name of this %s (default: host name)' % what)
    add('--dest_path', default=None, help='folder for files')
    add('--max_file_size', type=dispy.parse_size, default=0,
        help='largest file a peer may send (0: no limit; k/m/g suffixes)')
    add('-s', '--secret', default='', help='secret shared with clients, schedulers, nodes')
    add('--secret_file', default=None, help='read the secret from this file')
    add('--certfile', default=None, help='TLS certificate (with key, or --keyfile)')
    add('--keyfile', default=None, help='TLS key')
    add('--msg_timeout', type=float, default=MsgTimeout,
        help='seconds to wait for a peer\'s answer')
    add('--ping_interval', type=float, default=None, help='seconds between pings')
    add('--ipv4_udp_multicast', action='store_true',
        help='accepted for pycos 4.12 scripts; IPv4 discovery uses broadcast')
    add('--clean', action='store_true', help='remove files of an earlier run')
    add('--daemon', action='store_true', help='do not read commands from stdin')
    add('-d', '--debug', action='store_true', help='debug messages')
    dispy.add_config_options(add)


def build_parser():
    parser = dispy.ProgramArgumentParser(
        prog='dispycos.py', description='Run the shared dispycos scheduler: clients\' '
        'computations one at a time, in the order they are scheduled.')
    add = parser.add_argument
    add_common_options(add, 'scheduler')
    add('-u', '--udp_port', type=int, default=SCHEDULER_PORT,
        help='UDP port for node announcements (default %(default)s)')
    add('-t', '--tcp_port', '--scheduler_port', dest='tcp_port', type=int,
        default=SCHEDULER_PORT, help='TCP port clients and nodes reach (default %(default)s)')
    add('--node', action='append', default=[],
        help='a node beyond the local network: host or host:port (repeatable)')
    add('--relay_nodes', action='store_true', help='accepted for pycos 4.12 scripts')
    add('--zombie_period', type=float, default=10 * MaxPulseInterval,
        help='accepted (dispycos part 2: idle computations closed); a client that '
        'vanishes frees its nodes at once')
    add('--pulse_interval', type=float, default=None, help='accepted for pycos 4.12 scripts')
    return parser


def main(argv=None):
    global MsgTimeout
    config = dispy.parse_program_args(build_parser(), argv, 'dispycos',
                                      secret_files=(('secret_file', 'secret'),))
    if config.debug:
        logger.setLevel(logging.DEBUG)
    dispy.setup_logging(logging.DEBUG if config.debug else logging.INFO, 'dispycos')
    MsgTimeout = config.msg_timeout
    addr = config.ip_addr[0] if config.ip_addr else default_address()
    addr = dispy.resolve_or_exit(addr, 'dispycos')
    try:
        Pycos(node=addr, tcp_port=config.tcp_port, udp_port=config.udp_port,
              ext_ip_addr=config.ext_ip_addr or None, name=config.name, secret=config.secret,
              certfile=config.certfile, keyfile=config.keyfile, dest_path=config.dest_path,
              max_file_size=config.max_file_size)
        scheduler = Scheduler(nodes=config.node, zombie_period=config.zombie_period or None)
    except (OSError, ValueError) as exc:
        print('dispycos: %s' % exc, file=sys.stderr)
        return 1
    print('dispycos scheduler at %s' % scheduler.location, flush=True)
    done = threading.Event()
    if not config.daemon and sys.stdin is not None:
        def commands():
            for line in sys.stdin:
                cmd = line.strip().lower()
                if cmd in ('quit', 'exit'):
                    break
                if cmd == 'status':
                    print(_scheduler_status(scheduler), flush=True)
                elif cmd:
                    print('commands: status, quit (or exit)', flush=True)
            done.set()
        threading.Thread(target=commands, daemon=True, name='dispycos-stdin').start()
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    scheduler.close()
    return 0


def _scheduler_status(scheduler):
    box = []
    ready = threading.Event()

    def look():
        box.append('%d node(s), %d server(s), computations: %s' % (
            len(scheduler.nodes), len(scheduler.servers),
            ', '.join(c.id[:8] for c in scheduler.computations) or 'none'))
        ready.set()
    _the_runner().post(look)
    ready.wait(5)
    return box[0] if box else 'no answer'


if __name__ == '__main__':
    import dispycos as _module      # the program uses the module, never a second copy
    sys.exit(_module.main())
