"""dispycos's task runtime without the network: the runner (code between two yields is
atomic), Task (receive, sleep, suspend/resume, finish/value, terminate, throw,
sub-generators, monitors, names), the generator-aware Event, Lock, Condition and
Semaphore, Channel fan-out, and a script's exit waiting for its non-daemon tasks.

Nothing here asks for a task's ``location`` (which would start the network).  Every
wait is bounded: ``value(timeout=...)``, ``receive(timeout)``, threading events.
"""

import logging
import os
import subprocess
import sys
import threading
import time
import unittest
import uuid

from tests import support

import dispycos

WAIT = 10.0         # seconds any single wait in these tests may take, at most
NOT_DONE = object()


def unique(prefix):
    return '%s-%s' % (prefix, uuid.uuid4().hex[:12])


class RuntimeCase(unittest.TestCase):
    """Tasks made with ``self.spawn`` are terminated when the test ends (a test that
    fails half-way leaves no non-daemon task to hold the suite's exit)."""

    timeout = 60

    def setUp(self):
        log = logging.getLogger('dispycos')
        level = log.level
        log.setLevel(logging.ERROR)      # failing tasks on purpose: no warnings
        self.addCleanup(log.setLevel, level)

    def spawn(self, target, *args, **kwargs):
        task = dispycos.Task(target, *args, **kwargs)
        self.addCleanup(task.terminate)
        return task

    def result(self, task, timeout=WAIT):
        """The task's value, failing the test if it did not end within ``timeout``."""
        done = threading.Event()
        box = []

        def wait():
            box.append(task.value(timeout=timeout))
            done.set()

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        self.assertTrue(done.wait(timeout + 5), 'value() did not return')
        self.assertFalse(task.is_alive(), 'task %s did not end in %ss' % (task, timeout))
        return box[0]

    def outcome(self, task, timeout=WAIT):
        """The task's value as ``yield task.finish()`` gives it to another task (its
        waiters are woken once the task's end is fully recorded; ``value()`` from a
        thread may come earlier: see test_value_of_failed_task_is_final_once_not_alive)."""
        def finisher(task_=None):
            return (yield task.finish(timeout))

        return self.result(self.spawn(finisher), timeout + 1)


# ====================================================================================
# The runner: atomic steps
# ====================================================================================

class AtomicityTest(RuntimeCase):

    def test_read_modify_write_between_yields_never_loses_updates(self):
        shared = {'count': 0}
        rounds, workers = 2000, 3

        def worker(n, task=None):
            for i in range(rounds):
                value = shared['count']          # read ...
                if i % 7 == 0:
                    time.sleep(0)                # (a thread switch here would race)
                shared['count'] = value + 1      # ... modify-write, no yield between
                yield                            # then let the others run
            return n

        tasks = [self.spawn(worker, n) for n in range(workers)]
        self.assertEqual([self.result(t, 30) for t in tasks], list(range(workers)))
        self.assertEqual(shared['count'], rounds * workers)

    def test_blocking_step_delays_others_but_is_not_interleaved(self):
        state = {'in_step': False, 'seen_inside': 0, 'done': False, 'b_times': [],
                 'a_start': None, 'a_end': None}

        def blocker(task=None):
            yield task.receive(timeout=WAIT)         # the looper is looping by then
            state['in_step'] = True
            state['a_start'] = time.monotonic()
            time.sleep(0.3)                          # blocks the runner, no yield
            state['a_end'] = time.monotonic()
            state['in_step'] = False
            state['done'] = True
            return 'blocked'

        def looper(other, task=None):
            deadline = time.monotonic() + WAIT
            other.send('go')
            steps = 0
            while True:                              # one time stamp per step
                now = time.monotonic()
                if state['in_step']:
                    state['seen_inside'] += 1
                state['b_times'].append(now)
                steps += 1
                if state['done'] or now > deadline:
                    return steps
                yield

        a = self.spawn(blocker)
        b = self.spawn(looper, a)
        self.assertEqual(self.result(a), 'blocked')
        self.assertGreater(self.result(b), 1)
        self.assertTrue(state['done'])
        self.assertEqual(state['seen_inside'], 0, 'another task ran inside the step')
        times = state['b_times']
        # The looper did not step while the blocker slept: no step time falls inside
        # its step, and two consecutive steps of the looper span the whole sleep.
        self.assertFalse([t for t in times if state['a_start'] < t < state['a_end']])
        gaps = [later - earlier for earlier, later in zip(times, times[1:])]
        self.assertTrue(gaps and max(gaps) >= 0.28, max(gaps) if gaps else gaps)


# ====================================================================================
# Task: messages, sleeping, suspending
# ====================================================================================

class ReceiveTest(RuntimeCase):

    def test_receive_timeout_gives_alarm_value(self):
        def receiver(task=None):
            start = time.monotonic()
            first = yield task.receive(timeout=0.2)
            mid = time.monotonic()
            second = yield task.receive(timeout=0.1, alarm_value='alarm')
            now = yield task.receive(timeout=0, alarm_value='empty')
            return first, second, now, mid - start, time.monotonic() - mid

        first, second, now, waited1, waited2 = self.result(self.spawn(receiver))
        self.assertIsNone(first)
        self.assertEqual(second, 'alarm')
        self.assertEqual(now, 'empty')
        self.assertGreaterEqual(waited1, 0.19)
        self.assertGreaterEqual(waited2, 0.09)
        self.assertLess(waited1 + waited2, WAIT)

    def test_message_before_timeout_is_received(self):
        def receiver(task=None):
            return (yield task.receive(timeout=WAIT, alarm_value='alarm'))

        task = self.spawn(receiver)
        task.send('hello')
        self.assertEqual(self.result(task), 'hello')

    def test_messages_queued_before_receive_arrive_in_order(self):
        gate = dispycos.Event()

        def receiver(task=None):
            ok = yield gate.wait(WAIT)
            got = []
            for _ in range(20):
                msg = yield task.receive(timeout=WAIT, alarm_value=NOT_DONE)
                if msg is NOT_DONE or msg == 'end':
                    break
                got.append(msg)
            return ok, got

        task = self.spawn(receiver)
        for i in range(10):
            task.send(i)
        task.send('end')
        gate.set()      # after the sends: they are all queued before it receives
        self.assertEqual(self.result(task), (True, list(range(10))))

    def test_deliver_queues_the_message(self):
        def receiver(task=None):
            return (yield task.receive(timeout=WAIT))

        def deliverer(other, task=None):
            n = yield other.deliver('delivered')
            return n

        rec = self.spawn(receiver)
        self.assertEqual(self.result(self.spawn(deliverer, rec)), 1)
        self.assertEqual(self.result(rec), 'delivered')

    def test_receive_by_another_task_raises_runtime_error(self):
        def target(task=None):
            return (yield task.receive(timeout=WAIT, alarm_value='alarm'))

        def intruder(other, task=None):
            errors = []
            for call in (lambda: other.receive(), lambda: other.sleep(1),
                         lambda: other.suspend(1), lambda: other.value()):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(type(exc).__name__)
            yield task.sleep(0)
            return errors

        victim = self.spawn(target)
        self.assertEqual(self.result(self.spawn(intruder, victim)), ['RuntimeError'] * 4)
        # And from a thread that is not the runner at all.
        with self.assertRaises(RuntimeError):
            victim.receive()
        with self.assertRaises(RuntimeError):
            victim.finish()
        victim.send('still mine')
        self.assertEqual(self.result(victim), 'still mine')


class SleepSuspendTest(RuntimeCase):

    def test_sleep_is_not_ended_by_messages(self):
        def helper(task=None):
            sleeper = yield task.receive(timeout=WAIT)
            for i in range(3):
                sleeper.send(i)
            return 'sent'

        def sleeper(helper_task, task=None):
            helper_task.send(task)          # the messages come while it sleeps
            start = time.monotonic()
            slept = yield task.sleep(0.3)
            elapsed = time.monotonic() - start
            got = []
            for _ in range(3):
                got.append((yield task.receive(timeout=0, alarm_value='none')))
            return slept, elapsed, got

        h = self.spawn(helper)
        s = self.spawn(sleeper, h)
        self.assertEqual(self.result(h), 'sent')
        slept, elapsed, got = self.result(s)
        self.assertEqual(slept, 0)
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertEqual(got, [0, 1, 2])

    def test_suspend_resume_gives_the_update(self):
        def resumer(task=None):
            other = yield task.receive(timeout=WAIT)
            return other.resume('update')

        def suspender(res, task=None):
            res.send(task)                  # atomic with the suspend below
            value = yield task.suspend()
            return value

        r = self.spawn(resumer)
        s = self.spawn(suspender, r)
        self.assertEqual(self.result(r), 0)
        self.assertEqual(self.result(s), 'update')

    def test_suspend_timeout_gives_alarm_value(self):
        def suspender(task=None):
            start = time.monotonic()
            value = yield task.suspend(0.2, alarm_value='timed out')
            return value, time.monotonic() - start

        value, elapsed = self.result(self.spawn(suspender))
        self.assertEqual(value, 'timed out')
        self.assertGreaterEqual(elapsed, 0.19)

    def test_resume_ends_a_sleep_early_and_fails_on_a_running_task(self):
        def waker(task=None):
            other = yield task.receive(timeout=WAIT)
            first = other.resume('woken')
            second = task.resume('me')      # not sleeping: -1
            return first, second

        def sleeper(w, task=None):
            w.send(task)
            start = time.monotonic()
            value = yield task.sleep(30)
            return value, time.monotonic() - start

        w = self.spawn(waker)
        s = self.spawn(sleeper, w)
        self.assertEqual(self.result(w), (0, -1))
        value, elapsed = self.result(s)
        self.assertEqual(value, 'woken')
        self.assertLess(elapsed, WAIT)

    def test_resume_from_another_thread(self):
        suspended = threading.Event()

        def suspender(task=None):
            suspended.set()                 # the step ends in the suspend below
            return (yield task.suspend(WAIT, alarm_value='alarm'))

        s = self.spawn(suspender)
        self.assertTrue(suspended.wait(WAIT))
        self.assertEqual(s.resume('from main'), 0)
        self.assertEqual(self.result(s), 'from main')


# ====================================================================================
# Task: values, failures, ending
# ====================================================================================

class ValueTest(RuntimeCase):

    def test_finish_and_value_of_a_finished_task(self):
        def child(task=None):
            yield task.sleep(0.05)
            return 'child value'

        def parent(c, task=None):
            first = yield c.finish(WAIT)
            again = yield c.finish(WAIT)    # already ended: at once
            return first, again

        c = self.spawn(child)
        p = self.spawn(parent, c)
        self.assertEqual(self.result(p), ('child value', 'child value'))
        self.assertEqual(c.value(timeout=WAIT), 'child value')
        self.assertEqual(c.value(), 'child value')

    def test_value_of_a_failed_task_is_the_exception(self):
        def failing(task=None):
            yield task.sleep(0.01)
            raise ZeroDivisionError('no')

        def parent(c, task=None):
            return (yield c.finish(WAIT))

        c = self.spawn(failing)
        p = self.spawn(parent, c)
        seen = self.result(p)
        self.assertIsInstance(seen, ZeroDivisionError)
        value = c.value(timeout=WAIT)
        self.assertIsInstance(value, ZeroDivisionError)
        self.assertEqual(str(value), 'no')
        self.assertIs(value, seen)

    def test_value_of_failed_task_is_final_once_not_alive(self):
        # Regression test; the bug was: Task._end sets ``_done = True`` first and records the failure
        # (``_exception``, after formatting the traceback) only later.  In between,
        # is_alive() is already False and value() from another thread returns at
        # once with ``_result()`` == ``_value`` (None, or the last value the task
        # yielded: here 0 from ``yield task.sleep(0)``) instead of the exception.
        # Seen by chance under load (value() of a plain function that raised gave
        # None); made deterministic here by an exception whose __str__, called while
        # _end formats the traceback on the runner, holds the runner in that window.
        formatting, checked = threading.Event(), threading.Event()

        class SlowStr(Exception):
            def __str__(self):
                if not formatting.is_set():
                    formatting.set()
                    checked.wait(WAIT)
                return 'slow to format'

        def failing(task=None):
            yield task.sleep(0)
            raise SlowStr()

        t = self.spawn(failing)
        try:
            self.assertTrue(formatting.wait(WAIT))
            alive = t.is_alive()
            early = t.value(timeout=0)
        finally:
            checked.set()
        self.assertIsInstance(self.outcome(t), SlowStr)
        self.assertTrue(alive or isinstance(early, SlowStr),
                        'not alive, yet value() is %r' % (early,))

    def test_finish_timeout(self):
        def slow(task=None):
            yield task.receive(timeout=WAIT)
            return 'slow'

        def parent(c, task=None):
            start = time.monotonic()
            value = yield c.finish(0.2)
            return value, time.monotonic() - start

        c = self.spawn(slow)
        value, elapsed = self.result(self.spawn(parent, c))
        self.assertIsNone(value)
        self.assertGreaterEqual(elapsed, 0.19)
        self.assertTrue(c.is_alive())
        self.assertIsNone(c.value(timeout=0.05))     # value() times out too
        c.send('go')
        self.assertEqual(self.result(c), 'slow')

    def test_value_on_the_runner_of_an_unfinished_task_raises(self):
        def slow(task=None):
            return (yield task.receive(timeout=WAIT))

        def asker(other, task=None):
            try:
                other.value()
            except RuntimeError:
                return 'RuntimeError'
            return 'no error'
            yield

        s = self.spawn(slow)
        self.assertEqual(self.result(self.spawn(asker, s)), 'RuntimeError')
        s.send('x')
        self.assertEqual(self.result(s), 'x')

    def test_sub_generator_return_value(self):
        def inner(n, task):
            yield task.sleep(0.01)
            return n * 10

        def middle(n, task):
            a = yield inner(n, task)
            b = yield inner(n + 1, task)
            return a + b

        def no_return(task):
            yield task.sleep(0)

        def outer(task=None):
            total = yield middle(1, task)
            ended = yield no_return(task)        # a sub-generator without return
            return total, ended

        self.assertEqual(self.result(self.spawn(outer))[0], 30)

    def test_sub_generator_exception_reaches_callers_except(self):
        def deep(task):
            yield task.sleep(0.01)
            raise KeyError('deep')

        def inner(task):
            yield deep(task)
            return 'not reached'

        def outer(task=None):
            try:
                yield inner(task)
            except KeyError as exc:
                caught = exc.args[0]
            else:
                caught = None
            after = yield inner_ok(task)
            return caught, after

        def inner_ok(task):
            yield task.sleep(0)
            return 'ok after'

        self.assertEqual(self.result(self.spawn(outer)), ('deep', 'ok after'))

    def test_uncaught_sub_generator_exception_fails_the_task(self):
        def inner(task):
            yield task.sleep(0)
            raise ValueError('unhandled')

        def outer(task=None):
            yield inner(task)
            return 'not reached'

        value = self.outcome(self.spawn(outer))
        self.assertIsInstance(value, ValueError)

    def test_py2_style_stop_iteration_value(self):
        def py2(task=None):
            yield task.sleep(0)
            raise StopIteration('py2 value')

        def py2_sub(task):
            yield task.sleep(0)
            raise StopIteration(99)

        def caller(task=None):
            got = yield py2_sub(task)
            return got

        self.assertEqual(self.result(self.spawn(py2)), 'py2 value')
        self.assertEqual(self.result(self.spawn(caller)), 99)

    def test_value_is_the_last_yielded_value_without_return(self):
        def yielder(task=None):
            yield 1
            yield 'two'
            yield 'last'

        def explicit_none(task=None):
            yield 'still last'
            return None

        self.assertEqual(self.result(self.spawn(yielder)), 'last')
        self.assertEqual(self.result(self.spawn(explicit_none)), 'still last')

    def test_plain_function_tasks(self):
        def plain(a, b):
            return a + b

        def plain_with_task(a, task=None):
            return a, isinstance(task, dispycos.Task)

        def plain_failing():
            raise LookupError('plain')

        self.assertEqual(self.result(self.spawn(plain, 2, b=3)), 5)
        self.assertEqual(self.result(self.spawn(plain_with_task, 'a')), ('a', True))
        self.assertIsInstance(self.outcome(self.spawn(plain_failing)), LookupError)

    def test_task_argument_is_the_task_itself(self):
        seen = []

        def gen(task=None):
            seen.append(task)
            yield task.sleep(0)
            return task is dispycos.current_task()

        t = self.spawn(gen)
        self.assertTrue(self.result(t))
        self.assertIs(seen[0], t)


class EndingTest(RuntimeCase):

    def test_terminate_while_blocked_in_receive(self):
        cleaned = threading.Event()

        def target(w, task=None):
            w.send(task)
            try:
                yield task.receive()
            finally:
                cleaned.set()

        def watcher(task=None):
            t = yield task.receive(timeout=WAIT)
            yield task.monitor(t)
            result = t.terminate()
            status = yield task.receive(timeout=WAIT)
            again = t.terminate()
            return result, status, again, t

        w = self.spawn(watcher)
        t = self.spawn(target, w)
        result, status, again, target_task = self.result(w)
        self.assertTrue(cleaned.wait(WAIT), 'finally did not run')
        self.assertEqual(result, 0)
        self.assertEqual(again, -1)
        self.assertIsInstance(status, dispycos.MonitorStatus)
        self.assertIs(status.info, t)
        self.assertIs(target_task, t)
        self.assertIs(status.type, GeneratorExit)
        self.assertFalse(t.is_alive())

    def test_terminate_while_sleeping(self):
        sleeping = threading.Event()
        closed = threading.Event()
        order = []

        def inner(task):
            try:
                sleeping.set()
                yield task.sleep(30)
            finally:
                order.append('inner')

        def sleeper(task=None):
            try:
                yield inner(task)
            finally:
                order.append('outer')
                closed.set()

        start = time.monotonic()
        s = self.spawn(sleeper)
        self.assertTrue(sleeping.wait(WAIT))
        self.assertEqual(s.terminate(), 0)
        self.result(s)
        self.assertTrue(closed.wait(WAIT), 'finally blocks did not run')
        self.assertLess(time.monotonic() - start, WAIT)
        self.assertEqual(order, ['inner', 'outer'])

    def test_throw_into_a_blocked_task_is_caught(self):
        blocked = threading.Event()

        def target(task=None):
            try:
                blocked.set()
                yield task.receive(timeout=WAIT)
            except ValueError as exc:
                caught = str(exc)
            else:
                caught = None
            after = yield task.receive(timeout=WAIT, alarm_value='alarm')
            return caught, after

        t = self.spawn(target)
        self.assertTrue(blocked.wait(WAIT))
        self.assertEqual(t.throw(ValueError('thrown')), 0)
        t.send('after throw')
        self.assertEqual(self.result(t), ('thrown', 'after throw'))
        self.assertEqual(t.throw(ValueError('late')), -1)

    def test_throw_into_a_task_from_another_task(self):
        def target(task=None):
            try:
                yield task.sleep(30)
            except KeyError:
                return 'caught in sleep'
            return 'not thrown'

        def thrower(task=None):
            other = yield task.receive(timeout=WAIT)
            return other.throw(KeyError, KeyError('k'))

        th = self.spawn(thrower)

        def starter(task=None):
            t = dispycos.Task(target)
            th.send(t)
            return (yield t.finish(WAIT))

        self.assertEqual(self.result(self.spawn(starter)), 'caught in sleep')
        self.assertEqual(self.result(th), 0)

    def test_monitor_of_a_failed_task_gets_class_and_traceback(self):
        def failing(task=None):
            yield task.receive(timeout=WAIT)
            raise IndexError('monitored failure')

        def watcher(target, task=None):
            yield task.monitor(target)
            target.send('go')
            return (yield task.receive(timeout=WAIT))

        f = self.spawn(failing)
        status = self.result(self.spawn(watcher, f))
        self.assertIsInstance(status, dispycos.MonitorStatus)
        self.assertIs(status.info, f)
        self.assertIs(status.type, IndexError)
        self.assertIsInstance(status.value, str)
        self.assertIn('Traceback', status.value)
        self.assertIn('IndexError: monitored failure', status.value)
        self.assertIsInstance(f.value(timeout=WAIT), IndexError)

    def test_monitor_of_a_finished_task_gets_stop_iteration_and_value(self):
        def quick(task=None):
            yield task.receive(timeout=WAIT)
            return 'fine'

        def watcher(target, task=None):
            yield task.monitor(target)
            target.send('go')
            first = yield task.receive(timeout=WAIT)
            yield task.monitor(target)      # already ended: told at once
            second = yield task.receive(timeout=WAIT)
            return first, second

        q = self.spawn(quick)
        first, second = self.result(self.spawn(watcher, q))
        for status in (first, second):
            self.assertIsInstance(status, dispycos.MonitorStatus)
            self.assertIs(status.info, q)
            self.assertIs(status.type, StopIteration)
            self.assertEqual(status.value, 'fine')


class NamesTest(RuntimeCase):

    def test_register_and_locate_locally(self):
        name = unique('server')

        def server(task=None):
            first = task.register(name)
            msg = yield task.receive(timeout=WAIT)
            return first, msg

        def rival(task=None):
            yield task.sleep(0)
            return task.register(name)       # taken by a live task

        def client(task=None):
            found = yield dispycos.Task.locate(name)
            found.send(('hello from', task))
            return found

        s = self.spawn(server)
        # The server registers in its first step; a rival started after it sees that.
        self.assertEqual(self.result(self.spawn(rival)), -1)
        found = self.result(self.spawn(client))
        self.assertIs(found, s)
        first, msg = self.result(s)
        self.assertEqual(first, 0)
        self.assertEqual(msg[0], 'hello from')

        def successor(task=None):
            yield task.sleep(0)
            return task.register(name)       # the first one ended: free again

        self.assertEqual(self.result(self.spawn(successor)), 0)


# ====================================================================================
# Synchronisation
# ====================================================================================

class EventTest(RuntimeCase):

    def test_wait_timeout_set_and_already_set(self):
        ev = dispycos.Event()

        def waiter(task=None):
            start = time.monotonic()
            timed_out = yield ev.wait(0.2)
            elapsed = time.monotonic() - start
            got = yield ev.wait(WAIT)
            again = yield ev.wait(0)        # set: at once
            return timed_out, elapsed, got, again

        w = self.spawn(waiter)

        def setter(task=None):
            yield task.sleep(0.4)
            ev.set()

        self.spawn(setter)
        timed_out, elapsed, got, again = self.result(w)
        self.assertIs(timed_out, False)
        self.assertGreaterEqual(elapsed, 0.19)
        self.assertIs(got, True)
        self.assertIs(again, True)
        self.assertTrue(ev.is_set())
        ev.clear()
        self.assertFalse(ev.is_set())

    def test_set_wakes_every_waiter_and_works_from_another_thread(self):
        ev = dispycos.Event()
        waiting = threading.Event()
        count = [0]

        def waiter(task=None):
            count[0] += 1
            if count[0] == 3:
                waiting.set()               # all three are in wait() once this step ends
            return (yield ev.wait(WAIT))

        tasks = [self.spawn(waiter) for _ in range(3)]
        self.assertTrue(waiting.wait(WAIT))
        ev.set()
        self.assertEqual([self.result(t) for t in tasks], [True, True, True])

    def test_wait_outside_a_task_raises(self):
        ev = dispycos.Event()
        with self.assertRaises(RuntimeError):
            ev.wait(1)


class LockTest(RuntimeCase):

    def test_lock_is_held_across_yields(self):
        lock = dispycos.Lock()
        log = []

        def user(n, task=None):
            for _ in range(3):
                yield lock.acquire()
                log.append(('in', n))
                yield task.sleep(0.01)
                log.append(('out', n))
                lock.release()
                yield
            return n

        tasks = [self.spawn(user, n) for n in range(3)]
        self.assertEqual([self.result(t) for t in tasks], [0, 1, 2])
        self.assertEqual(len(log), 18)
        for i in range(0, len(log), 2):
            self.assertEqual(log[i][0], 'in')
            self.assertEqual(log[i + 1], ('out', log[i][1]), log)
        self.assertFalse(lock.locked())

    def test_acquire_timeout_and_non_blocking(self):
        lock = dispycos.Lock()

        def holder(other_started, task=None):
            yield lock.acquire()
            other_started.send(task)
            msg = yield task.receive(timeout=WAIT)
            lock.release()
            return msg

        def contender(task=None):
            h = yield task.receive(timeout=WAIT)
            now = yield lock.acquire(blocking=False)
            start = time.monotonic()
            timed = yield lock.acquire(timeout=0.2)
            elapsed = time.monotonic() - start
            h.send('release it')
            got = yield lock.acquire(timeout=WAIT)
            lock.release()
            return now, timed, elapsed, got

        c = self.spawn(contender)
        h = self.spawn(holder, c)
        now, timed, elapsed, got = self.result(c)
        self.assertIs(now, False)
        self.assertIs(timed, False)
        self.assertGreaterEqual(elapsed, 0.19)
        self.assertIs(got, True)
        self.assertEqual(self.result(h), 'release it')
        self.assertFalse(lock.locked())

    def test_rlock_reentrant_and_release_unheld_raises(self):
        rlock = dispycos.RLock()
        lock = dispycos.Lock()

        def user(task=None):
            a = yield rlock.acquire()
            b = yield rlock.acquire()
            rlock.release()
            still = rlock.locked()
            rlock.release()
            try:
                lock.release()
            except RuntimeError:
                error = 'RuntimeError'
            else:
                error = None
            return a, b, still, rlock.locked(), error

        self.assertEqual(self.result(self.spawn(user)), (True, True, True, False,
                                                         'RuntimeError'))

    def test_lock_acquire_timeout_does_not_leave_a_stale_waiter(self):
        # Regression test; the bug was: Lock.acquire(timeout=...) that times out leaves the task in
        # lock._waiters.  When the holder later releases, Lock.release pops that
        # task and, if it is then blocked in any other "_WAIT_OTHER" wait (here an
        # Event.wait), makes it the lock's owner and wakes it with True: its
        # ev.wait() returns True though the event was never set, and the lock stays
        # owned by the contender (which never asked for it again) forever.
        lock = dispycos.Lock()
        ev = dispycos.Event()

        def holder(task=None):
            yield lock.acquire()
            yield task.sleep(0.3)
            lock.release()

        def contender(task=None):
            timed = yield lock.acquire(timeout=0.05)
            woken = yield ev.wait(2)
            return timed, woken, ev.is_set()

        self.spawn(holder)
        c = self.spawn(contender)
        self.assertEqual(self.result(c), (False, False, False))
        self.assertFalse(lock.locked())


class ConditionTest(RuntimeCase):

    def test_producer_consumer(self):
        cond = dispycos.Condition()
        items = []

        def consumer(task=None):
            got = []
            for _ in range(3):
                yield cond.acquire()
                for _ in range(10):
                    if items:
                        break
                    yield cond.wait(WAIT)
                got.append(items.pop(0) if items else None)
                cond.release()
            return got

        def producer(task=None):
            for i in range(3):
                yield task.sleep(0.02)
                yield cond.acquire()
                items.append(i)
                cond.notify()
                cond.release()
            return 'produced'

        c = self.spawn(consumer)
        p = self.spawn(producer)
        self.assertEqual(self.result(p), 'produced')
        self.assertEqual(self.result(c), [0, 1, 2])

    def test_wait_timeout_returns_false_with_the_lock_held(self):
        cond = dispycos.Condition()

        def waiter(task=None):
            yield cond.acquire()
            start = time.monotonic()
            notified = yield cond.wait(0.2)
            elapsed = time.monotonic() - start
            held = cond._lock.locked()
            cond.release()
            return notified, elapsed, held

        notified, elapsed, held = self.result(self.spawn(waiter))
        self.assertIs(notified, False)
        self.assertGreaterEqual(elapsed, 0.19)
        self.assertTrue(held)

    def test_notify_one_then_notify_all(self):
        cond = dispycos.Condition()
        woken = []
        all_waiting = threading.Event()
        count = [0]

        def waiter(n, task=None):
            yield cond.acquire()
            count[0] += 1
            if count[0] == 3:
                all_waiting.set()
            notified = yield cond.wait(WAIT)
            woken.append(n)
            cond.release()
            return notified

        def notifier(task=None):
            yield cond.acquire()
            cond.notify(1)
            cond.release()
            for _ in range(100):            # until the one woken has run
                if woken:
                    break
                yield task.sleep(0.01)
            first = list(woken)
            yield cond.acquire()
            cond.notify_all()
            cond.release()
            return first

        waiters = [self.spawn(waiter, n) for n in range(3)]
        self.assertTrue(all_waiting.wait(WAIT))
        first = self.result(self.spawn(notifier))
        self.assertEqual(len(first), 1)
        self.assertEqual([self.result(t) for t in waiters], [True, True, True])
        self.assertEqual(sorted(woken), [0, 1, 2])
        self.assertEqual(woken[0], first[0])


class SemaphoreTest(RuntimeCase):

    def test_at_most_value_holders(self):
        sem = dispycos.Semaphore(2)
        state = {'now': 0, 'max': 0}

        def user(task=None):
            yield sem.acquire()
            state['now'] += 1
            state['max'] = max(state['max'], state['now'])
            yield task.sleep(0.05)
            state['now'] -= 1
            sem.release()
            return 'used'

        tasks = [self.spawn(user) for _ in range(5)]
        self.assertEqual([self.result(t) for t in tasks], ['used'] * 5)
        self.assertEqual(state['max'], 2)
        self.assertEqual(state['now'], 0)

    def test_acquire_timeout_non_blocking_and_release_wakes(self):
        sem = dispycos.Semaphore(0)

        def acquirer(task=None):
            now = yield sem.acquire(blocking=False)
            start = time.monotonic()
            timed = yield sem.acquire(timeout=0.2)
            elapsed = time.monotonic() - start
            got = yield sem.acquire(timeout=WAIT)
            return now, timed, elapsed, got

        def releaser(task=None):
            yield task.sleep(0.4)
            sem.release()

        a = self.spawn(acquirer)
        self.spawn(releaser)
        now, timed, elapsed, got = self.result(a)
        self.assertIs(now, False)
        self.assertIs(timed, False)
        self.assertGreaterEqual(elapsed, 0.19)
        self.assertIs(got, True)
        with self.assertRaises(ValueError):
            dispycos.Semaphore(-1)

    def test_semaphore_acquire_timeout_does_not_leave_a_stale_waiter(self):
        # Regression test; the bug was: Semaphore.acquire(timeout=...) that times out leaves the task in
        # sem._waiters.  A later sem.release() pops it and, if it is then blocked in
        # another "_WAIT_OTHER" wait (here an Event.wait), wakes it with True: its
        # ev.wait() returns True though the event was never set, and the release is
        # lost (the semaphore's value stays 0).
        sem = dispycos.Semaphore(0)
        ev = dispycos.Event()

        def acquirer(task=None):
            timed = yield sem.acquire(timeout=0.05)
            woken = yield ev.wait(2)
            return timed, woken

        def releaser(task=None):
            yield task.sleep(0.3)
            sem.release()

        a = self.spawn(acquirer)
        self.spawn(releaser)
        self.assertEqual(self.result(a), (False, False))
        self.assertEqual(sem._value, 1)


class StaleWaiterTest(RuntimeCase):
    """Waits that time out must not be woken later by what they stopped waiting for."""

    def test_event_wait_timeout_does_not_leave_a_stale_waiter(self):
        # Regression test; the bug was: Event.wait(timeout) that times out leaves the task in ev._waiters.
        # A later ev.set() wakes it with True if it is then blocked in another
        # "_WAIT_OTHER" wait (here a Semaphore.acquire): the acquire returns True
        # though the semaphore was never released.
        ev = dispycos.Event()
        sem = dispycos.Semaphore(0)

        def waiter(task=None):
            timed = yield ev.wait(0.05)
            got = yield sem.acquire(timeout=2)
            return timed, got

        def setter(task=None):
            yield task.sleep(0.3)
            ev.set()

        w = self.spawn(waiter)
        self.spawn(setter)
        self.assertEqual(self.result(w), (False, False))

    def test_finish_timeout_does_not_leave_a_stale_waiter(self):
        # Regression test; the bug was: other.finish(timeout) that times out leaves the waiting task in
        # other._finish_waiters.  When ``other`` ends later, Task._end calls
        # waiter._wake(other's value) whatever the waiter is blocked in now (it does
        # not even check the kind of wait): here the waiter's receive() returns
        # other's value as if it were a message.
        def slow(task=None):
            yield task.sleep(0.3)
            return 'slow value'

        def waiter(other, task=None):
            timed = yield other.finish(timeout=0.05)
            msg = yield task.receive(timeout=2, alarm_value='no message')
            return timed, msg

        s = self.spawn(slow)
        w = self.spawn(waiter, s)
        self.assertEqual(self.result(w), (None, 'no message'))
        self.assertEqual(self.result(s), 'slow value')


# ====================================================================================
# Channel
# ====================================================================================

class ChannelTest(RuntimeCase):

    def test_fan_out_to_three_subscribers_and_unsubscribe(self):
        channel = dispycos.Channel(unique('chan'))
        self.addCleanup(channel.close)

        def subscriber(n, coordinator, task=None):
            yield channel.subscribe(task)
            coordinator.send(('subscribed', n))
            got = [(yield task.receive(timeout=WAIT))]
            if n == 0:
                channel.unsubscribe(task)
                coordinator.send(('unsubscribed', n))
                # Nothing more comes: the coordinator sends 'end' to this one only
                # after the second broadcast.
                got.append((yield task.receive(timeout=WAIT)))
            else:
                got.append((yield task.receive(timeout=WAIT)))
            return got

        def coordinator(task=None):
            for _ in range(3):
                yield task.receive(timeout=WAIT)
            first = channel.send('first')
            msg = yield task.receive(timeout=WAIT)
            second = channel.send('second')
            subscribers = channel.subscribers()
            return first, msg, second, subscribers

        coord = self.spawn(coordinator)
        subs = [self.spawn(subscriber, n, coord) for n in range(3)]
        first, msg, second, subscribers = self.result(coord)
        self.assertEqual(first, 3)
        self.assertEqual(msg, ('unsubscribed', 0))
        self.assertEqual(second, 2)
        self.assertEqual(len(subscribers), 2)
        self.assertNotIn(subs[0], subscribers)
        subs[0].send('end')
        self.assertEqual(self.result(subs[0]), ['first', 'end'])
        self.assertEqual(self.result(subs[1]), ['first', 'second'])
        self.assertEqual(self.result(subs[2]), ['first', 'second'])
        self.assertEqual(channel.unsubscribe(subs[0]), -1)


# ====================================================================================
# Many tasks; a script's exit
# ====================================================================================

class ManyTasksTest(RuntimeCase):

    timeout = 120

    def test_thousand_tasks_each_receive_one_message(self):
        def receiver(task=None):
            msg = yield task.receive(timeout=60, alarm_value=None)
            return None if msg is None else msg * 2

        tasks = [self.spawn(receiver) for _ in range(1000)]
        for i, task in enumerate(tasks):
            task.send(i)
        deadline = time.monotonic() + 60
        values = []
        for task in tasks:
            values.append(task.value(timeout=max(0.1, deadline - time.monotonic())))
        self.assertEqual(values, [2 * i for i in range(1000)])
        self.assertFalse([t for t in tasks if t.is_alive()])


SCRIPT_HEAD = 'import sys\nsys.path.insert(0, %r)\nimport dispycos\n' % support.ROOT


class ExitTest(RuntimeCase):

    timeout = 90

    def run_script(self, body, limit=30):
        start = time.monotonic()
        env = dict(os.environ)
        env.pop('DISPYCOS_DEBUG', None)
        proc = subprocess.run([sys.executable, '-c', SCRIPT_HEAD + body], cwd=support.ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=limit, env=env)
        return proc, time.monotonic() - start

    def test_script_waits_for_a_non_daemon_task_at_exit(self):
        proc, _elapsed = self.run_script(
            'def late(task=None):\n'
            '    yield task.sleep(0.3)\n'
            '    print("task finished", flush=True)\n'
            'dispycos.Task(late)\n'
            'print("script ended", flush=True)\n')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.split(), ['script', 'ended', 'task', 'finished'],
                         proc.stdout + proc.stderr)

    def test_daemon_task_does_not_keep_the_script_alive(self):
        proc, elapsed = self.run_script(
            'def forever(task=None):\n'
            '    yield task.sleep(30)\n'
            '    print("daemon woke", flush=True)\n'
            'def self_daemon(task=None):\n'
            '    task.set_daemon()\n'
            '    yield task.sleep(30)\n'
            '    print("self daemon woke", flush=True)\n'
            'def late(task=None):\n'
            '    yield task.sleep(0.3)\n'
            '    print("task finished", flush=True)\n'
            'd = dispycos.Task(forever)\n'
            'd.set_daemon()\n'
            'dispycos.Task(self_daemon)\n'
            'dispycos.Task(late)\n'
            'print("script ended", flush=True)\n', limit=20)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertLess(elapsed, 10)
        self.assertEqual(proc.stdout.split(), ['script', 'ended', 'task', 'finished'],
                         proc.stdout + proc.stderr)
        self.assertNotIn('woke', proc.stdout)


    def test_logger_prints_once_the_level_allows(self):
        """pycos.logger: INFO prints by default, DEBUG once setLevel(Logger.DEBUG)."""
        proc, _elapsed = self.run_script(
            'pycos = dispycos\n'
            'pycos.logger.debug("hidden debug line")\n'
            'pycos.logger.info("first info line")\n'
            'pycos.logger.setLevel(pycos.Logger.DEBUG)\n'
            'pycos.logger.debug("shown debug line")\n'
            'pycos.logger.setLevel(pycos.Logger.WARNING)\n'
            'pycos.logger.info("hidden info line")\n'
            'pycos.logger.warning("a warning line")\n')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        lines = [line.split(': ', 1)[-1] for line in proc.stderr.splitlines()]
        self.assertEqual(lines, ['first info line', 'shown debug line', 'a warning line'],
                         proc.stderr)
        self.assertEqual(proc.stdout, '')


if __name__ == '__main__':
    unittest.main()
