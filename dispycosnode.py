#!/usr/bin/env python3
"""dispycosnode: the dispycos node program; it runs servers for dispycos schedulers.

``python dispycosnode.py`` starts one server process per CPU (``-c``); a scheduler
(a client's private one, or ``python dispycos.py``) reserves the node for one
computation at a time and runs that computation's tasks on its servers, many tasks
per server.  Every process here hosts dispycos's runtime (``dispycos.Pycos``): the
node process on port 9706 (``-u``), its servers on the following ports
(``--tcp_ports`` moves them)::

    scheduler ──sched.node_here◄── node process (this program)  TCP+UDP 9706
        │                            │ node.info, node.reserve, node.release
        │                            │ starts, watches and restarts:
        │                            ├─ server 1 (python -c ... server_main)  TCP 9707
        │                            ├─ server 2                              TCP 9708
        ▼                            ▼
    server.load (the computation's components), server.run (a task), server.close

The path of a task on a server: ``server.run`` from the scheduler → the server's
runner makes a Task of the computation's function (the namespace its components
were loaded into, as ``__main__``, so objects of the client's classes unpickle) →
the task exchanges messages with the client and others directly → at its end the
server calls ``sched.task_done`` with its MonitorStatus.

A server is a child process that reads its configuration (secret included: never on
a command line) from its stdin as one JSON line, says ``READY <port>`` on stdout,
and exits when its stdin closes: the node's death ends its servers.

A computation with ``node_setup`` gets servers of its own: ``node.setup`` (after
``node.reserve``) suspends the node's servers it reserved, starts a *setup process*
(``setup_main``) that runs node_setup in the node's folder with no network, and that
process then forks one server per suspended slot, on the same port; what node_setup
made (its globals) is in every forked server's ``__main__``.  At the computation's
close the setup process and its servers end and the node's own servers start again;
until then the node counts as busy::

    node ── reserve ──► setup ──► _SetupProcess.start: slots suspended
                                  setup process: node_setup, then fork ×N ─► servers
         ── release ──► _SetupProcess.stop (servers end) ─► slots resumed ─► free

Threads of the node process: dispycos's runner, I/O loop and listener; a watcher
thread per server process; a reader of a setup process's reports while there is one;
the stdin command reader (unless ``--daemon``).
"""

import base64
import collections
import functools
import itertools
import json
import linecache
import os
import pickle
import platform
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
import types

import dispy
import dispycos
from dispycos import Location, Task, TaskError, logger

__version__ = dispycos.__version__


# ================================================================================
# The server process
# ================================================================================

class ServerRuntime:
    """The services of one server process: a computation's components loaded into a
    fresh ``__main__``, its tasks run there, all of it undone at close."""

    def __init__(self, pycos, node_dir, index, preloaded=None):
        self.pycos = pycos
        self.node_dir = node_dir
        self.dir = os.path.join(node_dir, 'dispycosproc-%d' % index)
        self.index = index
        self.comp = None            # id of the computation loaded
        self.scheduler = None       # Location of its scheduler
        self.namespace = None       # its __main__ module
        self.tasks = {}             # task id -> Task of the computation
        self.cpu_running = None     # the CPU-bound task running (one at a time)
        self.cpu_waiting = collections.deque()     # CPU-bound tasks made, not started
        self.close_after = None     # the task that called dispycos_close_server()
        self.done = 0
        # (computation id, its __main__) made by the node's setup process, which forked
        # this server after node_setup: what node_setup made stays for the tasks
        self.preloaded = preloaded
        os.makedirs(self.dir, exist_ok=True)
        pycos.dest_path = self.dir      # files sent here land where its tasks run
        self._saved_main = sys.modules.get('__main__')
        self.modules_before = set(sys.modules)
        self._saved_path = list(sys.path)
        self._saved_cwd = os.getcwd()
        for op in ('load', 'run', 'close', 'peers', 'status'):
            pycos.add_service('server.' + op, getattr(self, '_op_' + op))
        pycos.peers.lost_hooks.append(self._peer_lost)

    # -- load ---------------------------------------------------------------------------
    def _op_load(self, caller, comp_id, spec, scheduler, setup_args):
        if self.comp is not None and self.comp != comp_id:
            raise TaskError('server %s serves another computation' % self.pycos.location)
        preloaded, self.preloaded = self.preloaded, None
        if preloaded is None:
            if self.comp is not None:
                self._close_now()
        elif preloaded[0] != comp_id:
            raise TaskError('server %s was made for computation %s' % (self.pycos.location,
                                                                       preloaded[0][:8]))
        os.makedirs(self.dir, exist_ok=True)
        os.chdir(self.dir)
        sys.path[:0] = [self.dir, self.node_dir]
        self.modules_before = set(sys.modules)
        try:
            module = preloaded[1] if preloaded else load_components(spec)
        except Exception as exc:
            self._close_now()
            raise TaskError('loading the computation failed: %s: %s' % (type(exc).__name__, exc))
        module.dispycos_close_server = self._close_request
        sys.modules['__main__'] = module
        self.namespace, self.comp, self.scheduler = module, comp_id, scheduler
        setup = spec.get('server_setup')
        if setup:
            return self._setup(module.__dict__[setup], setup_args)
        return 0

    def _setup(self, func, args):
        value = yield Task(func, *args).finish()
        if value != 0:
            self._close_now()
            return 'server_setup gave %r' % (value,)
        return 0

    # -- run --------------------------------------------------------------------------------
    def _op_run(self, caller, comp_id, func, blob, cpu):
        if comp_id != self.comp or self.namespace is None or self.close_after is not None:
            raise TaskError('computation %s is not loaded at %s' % (comp_id, self.pycos.location))
        name, source = func
        if source is not None:
            _exec_source(name, source, self.namespace)
        target = self.namespace.__dict__.get(name)
        if target is None:
            raise TaskError('%s is not defined at %s' % (name, self.pycos.location))
        args, kwargs = pickle.loads(blob)
        # made held, so its end is watched even if it ends as it starts (bad arguments)
        task = Task._held(target, args, kwargs)
        self.tasks[task._id] = task
        task._add_finish_waiter(lambda t: self._ended(t, cpu))
        if cpu and self.cpu_running is not None:
            self.cpu_waiting.append(task)               # after the one running
        else:
            if cpu:
                self.cpu_running = task
            task._release_held()
        return task

    def _ended(self, task, cpu):
        if task is self.cpu_running:
            self.cpu_running = None
            while self.cpu_waiting and self.cpu_running is None:
                nxt = self.cpu_waiting.popleft()
                if not nxt._done:
                    self.cpu_running = nxt
                    nxt._release_held()
        self.tasks.pop(task._id, None)
        self.done += 1
        status = _portable_status(task._end_status)
        failure = None
        if status.type not in (StopIteration, GeneratorExit):
            text = str(status.value).rstrip()
            logger.info('task %s failed:\n%s', task, text)
            failure = text.splitlines()[-1] if text else getattr(status.type, '__name__', '?')
        if self.scheduler is not None:
            blob = pickle.dumps(status, dispycos.BLOB_PROTOCOL)
            self.pycos.peers.notify(self.scheduler, 'sched.task_done',
                                    (self.comp, task, cpu, blob, failure))
            if task is self.close_after:     # in the same frame: no task comes here now
                self.pycos.peers.notify(self.scheduler, 'sched.server_closing', (self.comp,))
        if task is self.close_after:
            self.pycos._runner.post(self._close_and_exit)

    # -- close ------------------------------------------------------------------------------
    def _op_close(self, caller, comp_id):
        if comp_id == self.comp:
            self._close_now()
        return 0

    def _close_now(self):
        """Ends the computation here: its tasks terminated (each reported), its
        names gone, the folder emptied, ``__main__`` and sys.path as they were."""
        self.cpu_waiting.clear()
        for task in list(self.tasks.values()):
            task._terminate()
        self.tasks.clear()
        self.cpu_running = None
        if self.namespace is not None:
            self.namespace.__dict__.clear()
        self.namespace = self.comp = self.scheduler = None
        sys.modules['__main__'] = self._saved_main
        for name in set(sys.modules) - self.modules_before:
            # the computation's own modules (its files); not libraries it imported,
            # which some (C extensions) cannot be loaded twice in one process
            path = getattr(sys.modules[name], '__file__', None) or ''
            if path.startswith(self.node_dir + os.sep):
                del sys.modules[name]
        self.modules_before = set(sys.modules)
        sys.path[:] = self._saved_path
        try:
            os.chdir(self._saved_cwd)
        except OSError:
            os.chdir('/')
        if os.path.isdir(self.dir):
            dispy.empty_folder(self.dir)

    def _close_request(self):
        """``dispycos_close_server()`` (4.12, with ``restart_servers=True``): once the
        calling task ends, this server closes its computation and its process exits;
        the node starts a fresh one, which joins the computation again."""
        task = dispycos.current_task()
        if task is None or task._done:
            self.pycos._runner.post(self._close_and_exit)
        else:
            self.close_after = task

    def _close_and_exit(self):
        logger.info('server %s closed by its computation: a fresh one follows',
                    self.pycos.location)
        self._close_now()
        self.pycos._runner.call_later(0.5, os._exit, 0)    # the task reports leave first

    def _peer_lost(self, location):
        if location == self.scheduler:
            logger.info('scheduler %s lost: closing its computation', location)
            self._close_now()

    def _op_peers(self, caller, locations):
        for loc in locations:
            if loc != self.pycos.location:
                self.pycos.peers.notify(loc, 'pycos.hello', ())
        return 0

    def _op_status(self, caller):
        return {'location': self.pycos.location, 'computation': self.comp,
                'tasks': len(self.tasks), 'done': self.done}


def load_components(spec):
    """A fresh ``__main__`` module holding a computation's components: its module
    files imported (from the folders on sys.path), its functions and classes
    defined."""
    module = types.ModuleType('__main__')
    module.__dict__.update(pycos=dispycos, dispycos=dispycos)
    saved, sys.modules['__main__'] = sys.modules.get('__main__'), module
    try:
        for name in spec.get('modules', ()):
            modname = name[:-3] if name.endswith('.py') else name
            module.__dict__[modname] = __import__(modname)
        for name, source in spec['sources']:
            _exec_source(name, source, module)
    finally:
        sys.modules['__main__'] = saved
    return module


def _exec_source(name, source, module):
    """Defines a component in the computation's namespace; its lines are kept in
    linecache, so tracebacks of its tasks show them."""
    filename = '<dispycos %s>' % name
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, 'exec'), module.__dict__)


def _portable_status(status):
    """A MonitorStatus that pickles (a value or an exception class that does not is
    described instead)."""
    try:
        pickle.dumps(status, dispycos.BLOB_PROTOCOL)
        return status
    except Exception:
        kind = status.type if status.type in (StopIteration, GeneratorExit) else TaskError
        value = dispycos._portable(status.value) if kind is StopIteration else str(status.value)
        return dispycos.MonitorStatus(status.info, kind, value)


def _server_pycos(config, port):
    pycos = dispycos.Pycos(node=config['addr'], tcp_port=port,
                           ext_ip_addr=config.get('ext_addr'), name=config['name'],
                           secret=config['secret'], certfile=config.get('certfile'),
                           keyfile=config.get('keyfile'), dest_path=config['dest_path'],
                           max_file_size=config.get('max_file_size', 0))
    pycos.role = 'server'
    return pycos


def server_main():
    """A server process: configuration from stdin, READY on stdout, ends with stdin."""
    dispycos.provide_pycos_name()
    config = json.loads(sys.stdin.readline())
    if config.get('debug'):
        logger.setLevel(logger.DEBUG)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the node's to handle
    pycos = _server_pycos(config, config['port'])
    ServerRuntime(pycos, config['node_dir'], config['index'])
    sys.stdout.write('READY %d\n' % pycos.location.port)
    sys.stdout.flush()
    sys.stdin.read()                # until the node closes it (or dies)
    os._exit(0)


# ================================================================================
# The setup process (node_setup), and the servers it forks
# ================================================================================
#
#   node ──stdin: config line, then "FORK index port" lines──► setup process
#        ◄─stdout: "SETUP 0" | "SETUP <why>", "READY index port", "EXIT index status"─┘
#   what node_setup and the forked servers print goes to the node through a pipe of
#   its own (the "output" descriptor), relayed like a server's output.
#
# The setup process runs node_setup in the node's folder with no network, then
# stops its runner (one thread left) and forks one server per "FORK": each server
# starts its own network and keeps the __main__ node_setup filled (its globals).  It
# reaps them and reports each end, so that the node asks for a new one.  Its stdin's
# end (the node closing it, or dying) ends it and its servers; a server whose setup
# process is gone exits too.

SETUP_POLL = 0.5        # seconds between looks at the setup process's children


def setup_main():
    """The setup process of a computation with node_setup (POSIX: it forks)."""
    dispycos.provide_pycos_name()
    config = json.loads(sys.stdin.readline())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = os.dup(1)
    os.dup2(config['output_fd'], 1)     # prints (node_setup's, the tasks') to the relay
    os.close(config['output_fd'])
    sys.stdout.reconfigure(line_buffering=True)
    say = functools.partial(_say, control)
    os.chdir(config['node_dir'])
    sys.path.insert(0, config['node_dir'])
    try:
        module = load_components(config['spec'])
        args = pickle.loads(base64.b64decode(config['args']))
        sys.modules['__main__'] = module
        value = dispycos.run_without_network(module.__dict__[config['spec']['node_setup']],
                                             args, config['node_dir'], _stdin_open)
    except Exception as exc:
        value = '%s: %s' % (type(exc).__name__, exc)
    if not _stdin_open():               # the node let go (or died) during node_setup
        _end_group()
    if value != 0:
        say('SETUP ' + ' '.join(('node_setup gave %r' % (value,))[:1000].split()))
        _end_group()
    say('SETUP 0')
    _fork_servers(config, module, control, say)


def _stdin_open():
    """False once the node closed the setup process's stdin (or died); nothing else
    comes before "SETUP 0" is said."""
    readable, _w, _x = select.select([0], [], [], 0)
    return not readable or bool(os.read(0, 4096))


def _end_group():
    """Ends the setup process and whatever is left in its process group (programs
    node_setup or the tasks started)."""
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(0)


def _say(fd, line):
    try:
        os.write(fd, (line + '\n').encode())
    except OSError:                     # the node is gone: its end comes by stdin
        pass


def _fork_servers(config, module, control, say):
    """Forks a server per FORK line, reports their ends, until stdin ends."""
    children = {}           # pid -> index
    pending = b''
    me = os.getpid()
    with selectors.DefaultSelector() as selector:
        selector.register(0, selectors.EVENT_READ)
        for _ in itertools.count():
            if selector.select(SETUP_POLL):
                data = os.read(0, 4096)
                if not data:
                    break
                pending += data
                while b'\n' in pending:
                    line, pending = pending.split(b'\n', 1)
                    words = line.decode().split()
                    if len(words) == 3 and words[0] == 'FORK':
                        index, port = int(words[1]), int(words[2])
                        pid = os.fork()
                        if pid == 0:
                            _forked_server(config, module, index, port, control, me)
                        children[pid] = index
            _reap(children, say)
    for pid in children:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while children and time.monotonic() < deadline:
        _reap(children, say)
        time.sleep(0.05)
    _end_group()


def _reap(children, say):
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        index = children.pop(pid, None)
        if index is not None:
            say('EXIT %d %d' % (index, os.waitstatus_to_exitcode(status)))


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _forked_server(config, module, index, port, control, parent):
    """A server forked by the setup process: a network of its own, the computation
    already in its __main__; it exits when its setup process is gone."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)                # the commands are the setup process's
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        pycos = _server_pycos(config, port)
        ServerRuntime(pycos, config['node_dir'], index,
                      preloaded=(config['computation'], module))
        _say(control, 'READY %d %d' % (index, pycos.location.port))
        os.close(control)
    except BaseException:
        traceback.print_exc()           # (the node's stderr)
        os._exit(1)
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


# ================================================================================
# The node process
# ================================================================================

WINDOW_CHECK = 5.0      # seconds between looks at the service window


class _ServerProcess:
    """A server child process and its watcher thread (which restarts it)."""

    def __init__(self, node, index, port):
        self.node = node
        self.index = index
        self.port = port
        self.proc = None
        self.location = None
        self.ready = threading.Event()
        self.suspended = False      # its port lent to a server the setup process forked
        self.epoch = 0              # suspensions so far: a watcher of an older one is done

    def start(self):
        self.proc = subprocess.Popen(_child_command('server_main'), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=self.node.dir,
                                     start_new_session=True)
        config = dict(self.node.server_config, port=self.port, index=self.index)
        self.proc.stdin.write((json.dumps(config) + '\n').encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().decode().split()
        if len(line) != 2 or line[0] != 'READY':
            code = self.proc.wait(10)
            raise RuntimeError('server %d did not start (exit status %s)' % (self.index, code))
        self.location = Location(self.node.location.addr, int(line[1]))
        self.ready.set()
        threading.Thread(target=_relay_output, args=(self.proc.stdout,), daemon=True,
                         name='dispycos-output-%d' % self.index).start()
        threading.Thread(target=self._watch, daemon=True,
                         name='dispycos-server-%d' % self.index).start()

    def _watch(self):
        proc, epoch = self.proc, self.epoch
        proc.wait()
        if self.node.quitting or self.suspended or self.epoch != epoch:
            return
        self.ready.clear()
        # exit status 0: it closed itself (dispycos_close_server); else it died
        (logger.info if proc.returncode == 0 else logger.warning)(
            'server %s ended (exit status %s); starting a new one', self.location,
            proc.returncode)
        for attempt in range(5):
            try:
                self.start()
                self.node.pycos._runner.post(self.node.server_restarted, self)
                return
            except (OSError, RuntimeError) as exc:
                logger.warning('server %d could not be restarted: %s', self.index, exc)
                time.sleep(1 + attempt)

    def suspend(self):
        """Stops the process for a while (no restart): a forked server takes its port."""
        self.suspended = True
        self.epoch += 1
        self.stop()
        self.ready.clear()

    def resume(self):
        self.suspended = False
        for attempt in range(5):        # the port may be held a moment longer
            try:
                self.start()
                return
            except (OSError, RuntimeError) as exc:
                logger.warning('server %d could not be started again: %s', self.index, exc)
                time.sleep(0.5 * (attempt + 1))

    def stop(self, timeout=5):
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)


class _SetupProcess:
    """A computation's setup process (see setup_main) seen from the node: it lends
    the node's server slots (their ports) to the servers it forks, restarts one that
    dies, and gives the slots back at its end."""

    def __init__(self, node, comp_id, spec, args_blob, slots):
        self.node, self.comp_id, self.spec, self.args_blob = node, comp_id, spec, args_blob
        self.slots = {slot.index: slot for slot in slots}
        self.proc = None
        self.stopping = False
        self.stop_lock = threading.Lock()   # stop() once (its failed start, the release)
        self.started = set()        # indexes whose server started once
        self.failures = collections.Counter()   # forks in a row that never said READY

    def start(self):
        """Runs node_setup (blocking: a thread of its own); the servers' locations,
        or RuntimeError saying why the node is not used."""
        for slot in self.slots.values():
            slot.suspend()
        try:
            self._spawn()
            line = self.proc.stdout.readline().decode().strip()
            if line != 'SETUP 0':
                raise RuntimeError(line[6:] if line.startswith('SETUP ') else
                                   'the setup process ended (exit status %s)' % self.proc.wait(10))
            threading.Thread(target=self._read_control, daemon=True,
                             name='dispycos-setup').start()
            for slot in self.slots.values():
                self._fork(slot)
            for slot in self.slots.values():
                if not slot.ready.wait(30):
                    raise RuntimeError('server %d of the setup process did not start'
                                       % slot.index)
            return [list(slot.location.key()) for slot in self.slots.values()]
        except Exception:
            self.stop()
            raise

    def _spawn(self):
        out_r, out_w = os.pipe()
        self.proc = subprocess.Popen(_child_command('setup_main'), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=self.node.dir,
                                     pass_fds=(out_w,), start_new_session=True)
        os.close(out_w)
        threading.Thread(target=_relay_output, args=(os.fdopen(out_r, 'rb'),), daemon=True,
                         name='dispycos-setup-output').start()
        config = dict(self.node.server_config, output_fd=out_w, spec=self.spec,
                      computation=self.comp_id,
                      args=base64.b64encode(self.args_blob).decode())
        self._write(json.dumps(config))

    def _write(self, line):
        try:
            self.proc.stdin.write((line + '\n').encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass                    # it ended: its reader says so

    def _fork(self, slot):
        self._write('FORK %d %d' % (slot.index, slot.port))

    FORK_TRIES = 5          # forks in a row that fail to start before one gives up

    def _read_control(self):
        for raw in iter(self.proc.stdout.readline, b''):
            words = raw.decode(errors='replace').split()
            slot = self.slots.get(int(words[1])) if len(words) == 3 and \
                words[1].isdigit() else None
            if slot is None:
                continue
            if words[0] == 'READY':
                slot.location = Location(self.node.location.addr, int(words[2]))
                slot.ready.set()
                self.failures[slot.index] = 0
                if slot.index in self.started:
                    self.node.pycos._runner.post(self.node.server_restarted, slot)
                self.started.add(slot.index)
            elif words[0] == 'EXIT':
                self._server_ended(slot, words[2])
        if not self.stopping:           # it died: the computation ends on this node
            for slot in self.slots.values():
                slot.ready.clear()      # (its servers exit: their parent is gone)
            logger.warning('the setup process of computation %s ended (exit status %s)',
                           self.comp_id[:8], self.proc.wait())
            self.node.pycos._runner.post(self.node.setup_lost, self)

    def _server_ended(self, slot, status):
        """A forked server ended: another is forked (after a pause that grows while
        they fail to start, up to FORK_TRIES)."""
        slot.ready.clear()
        if self.stopping:
            return
        self.failures[slot.index] += 1          # back to 0 at its READY
        tries = self.failures[slot.index]
        if tries > self.FORK_TRIES:
            logger.warning('server %d of computation %s failed to start %d times: not '
                           'forked again', slot.index, self.comp_id[:8], self.FORK_TRIES)
            return
        (logger.info if status == '0' else logger.warning)(
            'server %s ended (exit status %s); forking a new one', slot.location, status)
        time.sleep(0.5 * (tries - 1))           # (this reader's own thread)
        self._fork(slot)

    def stop(self):
        """Ends the setup process and its servers; the node's own servers return
        (once, whoever asks first; a second caller waits for that)."""
        with self.stop_lock:
            if not self.stopping:
                self.stopping = True
                self._stop()

    def _stop(self):
        proc = self.proc
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
            # its servers and what node_setup or tasks started are in its group
            _kill_group(proc.pid)
            proc.wait(5)
        if not self.node.quitting:
            for slot in self.slots.values():
                slot.resume()


def _child_command(entry):
    """The command line of a child process of the node: this file's ``entry()``."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, '-c', 'import sys; sys.path.insert(0, %r); import dispycosnode; '
            'dispycosnode.%s()' % (here, entry)]


def _kill_group(leader):
    """Kills the process group of ``leader`` (a child started in a session of its own)."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except OSError:
        pass


def _absolute(path):
    return os.path.abspath(path) if path else path


def _relay_output(pipe):
    """What a server's tasks print reaches the node's stdout (its stderr is the
    node's already)."""
    out = getattr(sys.stdout, 'buffer', None)
    for line in iter(pipe.readline, b''):
        if out is not None:
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):
                return


class Node:
    """The node process: its servers, one computation at a time, discovery."""

    def __init__(self, config):
        self.config = config
        self.quitting = False
        self.accepting = True
        self.served = 0
        self.comp = None            # (computation id, scheduler Location)
        self.comp_spec = None       # its servers' part of the computation
        self.releasing = False      # the computation ends here: its servers come back
        self.comp_cpus = 0
        self.setup = None           # its _SetupProcess (node_setup), if any
        self.setups_ending = set()  # _SetupProcesses giving their servers back
        self.waiting = set()        # schedulers refused while busy
        self.ending = False         # _end_computation under way
        self.ended_here = set()     # computations its operator closed (not taken back)
        addr = config.ip_addr[0] if config.ip_addr else dispycos.default_address()
        addr = dispy.resolve_or_exit(addr, 'dispycosnode')
        ext = config.ext_ip_addr[0] if config.ext_ip_addr else None
        self.pycos = dispycos.Pycos(node=addr, tcp_port=config.udp_port, ext_ip_addr=ext,
                                    name=config.name, secret=config.secret,
                                    certfile=config.certfile, keyfile=config.keyfile,
                                    dest_path=config.dest_path,
                                    max_file_size=config.max_file_size)
        self.pycos.role = 'node'
        self.location = self.pycos.location
        self.name = self.pycos.name
        self.dir = os.path.join(self.pycos.dest_path, 'dispycos',
                                '%s_%s' % (self.location.addr, self.location.port))
        self._prepare_dir(config.clean)
        self.server_config = {
            'addr': addr, 'ext_addr': ext, 'name': self.name, 'secret': config.secret,
            'certfile': _absolute(config.certfile), 'keyfile': _absolute(config.keyfile),
            'dest_path': self.pycos.dest_path, 'node_dir': self.dir,
            'max_file_size': self.pycos.max_file_size, 'debug': config.debug}
        self.pycos.dest_path = self.dir     # files sent to the node: node_setup's folder
        ports = server_ports(config.tcp_ports, server_count(config.cpus),
                             self.location.port + 1)
        self.servers = [_ServerProcess(self, i + 1, port) for i, port in enumerate(ports)]
        for server in self.servers:
            server.start()
        self.avail = _avail_function(self.dir)
        for op in ('info', 'reserve', 'setup', 'release', 'status'):
            self.pycos.add_service('node.' + op, getattr(self, '_op_' + op))
        self.pycos.peers.lost_hooks.append(
            lambda loc: self.pycos._runner.post(self._peer_lost, loc))
        self.window = dispy.ServiceWindow(
            config.service_start, config.service_stop, config.service_end,
            float(os.environ.get('DISPY_NODE_CLOCK_OFFSET', 0)))
        self.in_window = self.window.state() == dispy.ServiceWindow.SERVING
        self.discovery = _NodeDiscovery(self, config)
        if not self.window.always:
            self.pycos._runner.call_later(WINDOW_CHECK, self._check_window)
        self.zombie_period = config.zombie_period
        self.last_busy = time.monotonic()
        if self.zombie_period:
            self.pycos._runner.call_later(self._idle_check_every(), self._check_idle)

    # -- --zombie_period: a computation idle that long is closed ----------------------
    def _idle_check_every(self):
        return max(0.5, min(5.0, self.zombie_period / 4))

    def _check_idle(self):
        if self.comp is not None and not self.ending:
            Task(self._look_idle, self.comp).set_daemon()
        if not self.quitting:
            self.pycos._runner.call_later(self._idle_check_every(), self._check_idle)

    def _look_idle(self, comp, task=None):
        """Asks the servers whether tasks of the computation run; none for
        --zombie_period seconds ends it (its scheduler told, not taken back)."""
        for server in self.servers:
            if server.ready.is_set():
                status = yield self.pycos.peers.call(server.location, 'server.status', (),
                                                     timeout=5)
                if not isinstance(status, dict) or status['tasks']:
                    self.last_busy = time.monotonic()   # running (or not answering)
                    return
        idle = time.monotonic() - self.last_busy
        if self.comp == comp and idle > self.zombie_period:
            logger.info('computation %s idle for %.0f s (--zombie_period): closing it',
                        comp[0][:8], idle)
            self._end_computation('idle for %.0f s (--zombie_period)' % idle, refuse=True)

    def _check_window(self):
        """The service window's turns (runner thread, every WINDOW_CHECK s): serving
        again is announced; stopped takes no new computation; out closes the current
        one."""
        state = self.window.state()
        serving = state == dispy.ServiceWindow.SERVING
        if serving and not self.in_window:
            logger.info('service window open: serving')
            self.in_window = True
            self.discovery.announce()
        elif not serving and self.in_window:
            logger.info('service window %s: no new computation', state)
            self.in_window = False
        if state == dispy.ServiceWindow.OUT and self.comp is not None:
            logger.info('service window ended: closing computation %s', self.comp[0][:8])
            self._end_computation('its service window ended')
        if not self.quitting:
            self.pycos._runner.call_later(WINDOW_CHECK, self._check_window)

    def _prepare_dir(self, clean):
        if any(files for _dir, _dirs, files in os.walk(self.dir)):
            if not clean:
                logger.info('%s holds files of an earlier run; --clean removes them', self.dir)
            else:
                dispy.empty_folder(self.dir)
        os.makedirs(self.dir, exist_ok=True)

    # -- services -------------------------------------------------------------------------
    def info(self):
        avail = self.avail()
        return {'location': list(self.location.key()), 'name': self.name,
                'cpus': len(self.servers), 'platform': platform.platform(),
                'servers': [list(s.location.key()) for s in self.servers if s.ready.is_set()],
                'avail': avail, 'busy': self.comp is not None, 'version': __version__}

    def _op_info(self, caller):
        return self.info()

    def _op_reserve(self, caller, comp_id, scheduler, client, spec, files, cpus):
        if not self.accepting or not self.in_window:
            raise TaskError('node %s is not accepting computations (%s)' % (
                self.location, 'outside its service window' if self.accepting else 'closing'))
        if comp_id in self.ended_here:
            raise TaskError('node %s ended computation %s' % (self.location, comp_id[:8]))
        if self.comp is not None and self.comp[0] != comp_id:
            self.waiting.add(scheduler)         # told when this node is free again
            raise TaskError('node %s serves another computation' % self.location)
        receiver = dispy.FileReceiver(self.dir, self.pycos.max_file_size)
        for name, data, mode in files:
            receiver.chunk(name, mode, 0, data, True, source=comp_id)
        self.comp = (comp_id, scheduler)
        self.comp_spec, self.comp_cpus = spec, cpus
        self.last_busy = time.monotonic()
        logger.info('computation %s of %s uses %d servers', comp_id[:8], client, cpus)
        return [list(s.location.key()) for s in self.servers[:cpus] if s.ready.is_set()]

    def _op_setup(self, caller, comp_id, args_blob):
        """node_setup(*args) for the computation reserved, in a setup process that
        then forks its servers; their locations (only them with no node_setup)."""
        if self.comp is None or self.comp[0] != comp_id or self.releasing:
            raise TaskError('computation %s is not reserved at %s' % (comp_id[:8],
                                                                      self.location))
        slots = self.servers[:self.comp_cpus]
        if not self.comp_spec.get('node_setup'):
            return [list(s.location.key()) for s in slots if s.ready.is_set()]
        if not hasattr(os, 'fork'):
            raise TaskError('node_setup needs os.fork, which %s lacks' % platform.system())
        if self.setup is not None:
            raise TaskError('node %s is set up already' % self.location)
        logger.info('computation %s: node_setup', comp_id[:8])
        self.setup = _SetupProcess(self, comp_id, self.comp_spec, args_blob, slots)
        return self._set_up(self.setup)

    def _set_up(self, setup, task=None):
        try:
            servers = yield dispycos._in_thread(setup.start)
        except Exception as exc:
            if self.setup is setup:
                self.setup = None
            if setup.stopping:          # released (or the node quits) during node_setup
                logger.info('computation %s: node_setup given up', setup.comp_id[:8])
            else:
                logger.warning('computation %s not served: %s', setup.comp_id[:8], exc)
            raise TaskError('node_setup at %s: %s' % (self.location, exc)) from None
        return servers

    def setup_lost(self, setup):
        """The setup process died: the computation ends on this node (its
        scheduler told); the node's own servers come back."""
        if setup is self.setup:
            self._end_computation('its node_setup process ended')

    def _op_release(self, caller, comp_id):
        if self.comp is not None and self.comp[0] == comp_id:
            self._release()
        return 0

    def _release(self, close_servers=False):
        """Ends the computation here; the node is free once a setup process it had
        gave the servers back (until then it is busy: schedulers asking are told)."""
        if self.releasing:
            return                  # being released already
        comp_id = self.comp[0]
        if close_servers:
            for server in self.servers:
                if server.location is not None and server.ready.is_set():
                    self.pycos.peers.notify(server.location, 'server.close', (comp_id,))
        self._remove_files()
        self.releasing = True
        setup, self.setup = self.setup, None
        if setup is not None:       # its servers end; the node's own come back, then free
            self.setups_ending.add(setup)

            def give_back():
                setup.stop()
                self.setups_ending.discard(setup)
                self.pycos._runner.post(self._released, comp_id)
            threading.Thread(target=give_back, daemon=True, name='dispycos-setup-end').start()
        else:
            self._released(comp_id)

    def _remove_files(self):
        """The computation's files in the node's folder (components, files sent
        to the node); the servers' folders are theirs to empty."""
        dispy.empty_folder(self.dir, keep={'dispycosproc-%d' % s.index for s in self.servers})

    def is_giving_back(self):
        """True while a released computation's setup process hands the servers back."""
        return self.releasing

    def _released(self, comp_id):
        self.comp = self.comp_spec = None
        self.releasing = False
        self.served += 1
        logger.info('computation %s closed', comp_id[:8])
        if self.config.serve > 0 and self.served >= self.config.serve:
            logger.info('served %d computation(s): quitting', self.served)
            self.accepting = False
            threading.Thread(target=self.shutdown, daemon=True).start()
        elif self.accepting:
            self.discovery.announce()
            waiting, self.waiting = self.waiting, set()
            for location in waiting:
                self.discovery.tell(location)

    def _op_status(self, caller):
        return self.info()

    def _peer_lost(self, location):
        if self.comp is not None and not self.releasing and self.comp[1] == location:
            logger.info('scheduler %s lost: computation %s closed', location, self.comp[0][:8])
            self._release(close_servers=True)

    def server_restarted(self, server):
        """A new server process is up: the scheduler of the computation may use it."""
        if self.comp is not None:
            self.discovery.tell(self.comp[1])
        elif self.accepting:            # a scheduler may have passed it over meanwhile
            self.discovery.announce()

    # -- operator commands ------------------------------------------------------------------
    def status_text(self):
        lines = ['dispycosnode %s at %s: %d servers, %s' % (
            self.name, self.location, len(self.servers),
            'computation %s' % self.comp[0][:8] if self.comp else 'idle')]
        for server in self.servers:
            state = self._server_status(server)
            lines.append('  server %s: %s' % (server.location, state))
        return '\n'.join(lines)

    def _server_status(self, server):
        if server.suspended and not server.ready.is_set():
            return 'lent to the computation\'s node_setup process'
        if server.location is None:
            return 'not started'
        value = self.pycos.peers.call_blocking(server.location, 'server.status', (), 5)
        if not isinstance(value, dict):
            return 'no answer (%s)' % (value,)
        return '%d task(s) running, %d done' % (value['tasks'], value['done'])

    def close_computation(self):
        """stdin's close: the computation ends here, its scheduler told."""
        self.pycos._runner.post(self._end_computation, 'closed by the node\'s operator',
                                True)

    def _end_computation(self, why, refuse=False):
        if self.comp is not None and not self.ending:
            self.ending = True
            if refuse:                  # the operator's close: not taken back
                if len(self.ended_here) > 100:
                    self.ended_here.clear()
                self.ended_here.add(self.comp[0])
            Task(self._end_computation_task, self.comp, why).set_daemon()

    def _end_computation_task(self, comp, why, task=None):
        """Closes the computation on each server (its tasks end, reported), then
        tells its scheduler, then frees the node."""
        comp_id, scheduler = comp
        for server in self.servers:
            if server.ready.is_set():
                yield self.pycos.peers.call(server.location, 'server.close', (comp_id,),
                                            timeout=dispycos.MsgTimeout)
        self.pycos.peers.notify(scheduler, 'sched.node_closed', (comp_id, why))
        self.ending = False
        if self.comp == comp:
            self._release()

    def shutdown(self, terminate=False):
        self.accepting = False
        if terminate and self.comp is not None:
            self.close_computation()        # its tasks end (reported) before servers stop
            for _ in range(100):
                if self.comp is None:
                    break
                time.sleep(0.05)
        else:
            for _ in range(int(1e9)):       # until the computation is closed
                if self.comp is None or self.quitting:
                    break
                time.sleep(0.2)
        self.quitting = True
        for setup in [self.setup] + list(self.setups_ending):
            if setup is not None:
                setup.stop()
        for server in self.servers:
            server.stop()
        self.discovery.close()
        self.done.set()

    done = None


class _NodeDiscovery:
    """The node's UDP side: answers schedulers' pings by calling sched.node_here,
    announces itself at start and when free again, and calls on ``--peer``s."""

    def __init__(self, node, config):
        self.node = node
        self.endpoint = dispy.DiscoveryEndpoint(node.pycos.secret, self._on_datagram)
        addr = node.location.addr
        bind = node.pycos.peers.listener.server_address[0]
        if dispy.is_loopback(addr) or config.ip_addr:
            self.endpoint.bind(bind, node.location.port, reuse=True)
            # a socket bound to one address does not get the LAN's broadcasts: one on
            # the broadcast address of that address's interface does
            for bcast in dispy.broadcast_addresses([bind]):
                self.endpoint.bind(bcast, node.location.port, reuse=True)
        else:
            self.endpoint.bind('', node.location.port, reuse=True)
        self.loop = node.pycos.peers.loop
        dispycos.watch_endpoint(self.loop, self.endpoint)
        self.scheduler_port = config.scheduler_port
        self.peers = [parse_location(p, dispycos.SCHEDULER_PORT) for p in config.peer or ()]
        self.announce()

    def _on_datagram(self, msg, addr, sock):
        if msg.get('t') == 'ping' and isinstance(msg.get('scheduler'), list):
            try:
                location = Location(str(msg['scheduler'][0]), int(msg['scheduler'][1]))
            except (ValueError, IndexError, TypeError):
                return
            self.node.pycos._runner.post(self.tell, location)

    def tell(self, location):
        """Makes this node known to the scheduler at ``location`` (runner thread);
        while the node gets its servers back from a setup process, once it has."""
        if self.node.is_giving_back():
            self.node.waiting.add(location)
        elif self.node.accepting and self.node.in_window:
            self.node.pycos.peers.call_back(location, 'sched.node_here', (self.node.info(),),
                                            lambda ok, value: None)

    def announce(self):
        data = self.endpoint.pack({'t': 'announce', 'port': self.node.location.port,
                                   'addr': self.node.location.addr})
        addr = self.node.location.addr
        if not dispy.is_loopback(addr):
            self.endpoint.broadcast(data, self.scheduler_port, [addr])
        for location in self.peers:
            self.node.pycos._runner.post(self.tell, location)

    def close(self):
        dispycos.unwatch_endpoint(self.loop, self.endpoint)


def _avail_function(path):
    """() -> {'cpu', 'memory', 'disk', 'swap'} with psutil on the node, else None."""
    try:
        import psutil
    except ImportError:
        return lambda: None

    def avail():
        try:
            return {'cpu': 100.0 - psutil.cpu_percent(), 'memory':
                    psutil.virtual_memory().available, 'disk': psutil.disk_usage(path).free,
                    'swap': psutil.swap_memory().free}
        except Exception:
            return None
    return avail


# ================================================================================
# Command line
# ================================================================================

def server_count(cpus):
    """``-c``: 0 all CPUs, negative leaves that many free, positive that many."""
    total = os.cpu_count() or 1
    if cpus <= 0:
        return max(1, total + cpus)
    return cpus


def server_ports(specs, count, first_default):
    """Ports of ``count`` servers from ``--tcp_ports`` (n or n1-n2, repeatable): the
    listed ones in order, then beyond the highest listed (the default: the ports
    after the node's)."""
    ports = []
    for spec in specs or ():
        for part in str(spec).split(','):
            low, _, high = part.strip().partition('-')
            low = int(low)
            high = int(high) if high else low
            if not (0 < low <= high < 65536):
                raise ValueError('bad port range %r' % part)
            ports.extend(p for p in range(low, high + 1) if p not in ports)
    nxt = max(ports) + 1 if ports else first_default
    while len(ports) < count:
        ports.append(nxt)
        nxt += 1
    return ports[:count]


def parse_location(text, default_port):
    host, _, port = text.rpartition(':') if text.count(':') == 1 else (text, '', '')
    return Location(dispy.resolve_host(host) or host, int(port) if port else default_port)


def build_parser():
    parser = dispy.ProgramArgumentParser(
        prog='dispycosnode.py', description='Run dispycos servers on this node.')
    add = parser.add_argument
    dispycos.add_common_options(add, 'node')
    add('-c', '--cpus', type=int, default=0,
        help='servers to run: 0 one per CPU, negative leaves that many CPUs free')
    add('-u', '--udp_port', type=int, default=dispycos.NODE_PORT,
        help='the node\'s port, TCP and UDP (default %(default)s)')
    add('--tcp_ports', '--node_ports', dest='tcp_ports', action='append', default=[],
        help='ports of the servers: n or n1-n2, repeatable (default: after the node\'s)')
    add('--scheduler_port', type=int, default=dispycos.SCHEDULER_PORT,
        help='UDP port schedulers hear announcements on (default %(default)s)')
    add('--min_pulse_interval', type=float, default=dispycos.MinPulseInterval,
        help='smallest pulse_interval a computation may ask for')
    add('--max_pulse_interval', type=float, default=dispycos.MaxPulseInterval,
        help='largest pulse_interval a computation may ask for')
    add('--zombie_period', type=float, default=None,
        help='seconds a computation may run no task here before the node closes it '
        '(default: never; a client that vanishes frees the node at once)')
    add('--serve', type=int, default=-1, help='quit after serving this many computations')
    dispy.add_service_window_options(add, 'computations', 'schedulers')
    add('--peer', action='append', default=[],
        help='host:port of a scheduler to make this node known to (repeatable)')
    add('--discover_peers', action='store_true', help='accepted for pycos 4.12 scripts')
    return parser


COMMANDS_HELP = 'commands: status, close, quit (or exit), terminate'


def run_command(node, line):
    """One stdin command; False when the node is to end."""
    cmd = line.strip().lower()
    if cmd == 'status':
        print(node.status_text(), flush=True)
    elif cmd == 'close':
        node.close_computation()
        print('closing the current computation', flush=True)
    elif cmd in ('quit', 'exit'):
        print('quitting once the computation is closed', flush=True)
        threading.Thread(target=node.shutdown, daemon=True).start()
    elif cmd == 'terminate':
        print('terminating', flush=True)
        threading.Thread(target=node.shutdown, args=(True,), daemon=True).start()
    elif cmd:
        print(COMMANDS_HELP, flush=True)
    return True


def main(argv=None):
    parser = build_parser()
    config = dispy.parse_program_args(parser, argv, 'dispycosnode',
                                      secret_files=(('secret_file', 'secret'),))
    if config.debug:
        logger.setLevel(logger.DEBUG)
    dispy.setup_logging(logger.DEBUG if config.debug else logger.INFO, 'dispycos')
    dispycos.MsgTimeout = config.msg_timeout
    dispy.check_service_window(config, 'dispycosnode')
    try:
        server_ports(config.tcp_ports, 1, 1)
    except ValueError as exc:
        dispy.exit_usage('dispycosnode', '--tcp_ports: %s' % exc)
    try:
        node = Node(config)
    except (OSError, RuntimeError, ValueError) as exc:
        print('dispycosnode: %s' % exc, file=sys.stderr)
        return 1
    node.done = threading.Event()
    print('dispycosnode %s at %s: %d servers at %s' % (
        node.name, node.location, len(node.servers),
        ', '.join(str(s.location.port) for s in node.servers)), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
        target=node.shutdown, args=(True,), daemon=True).start())
    if not config.daemon and sys.stdin is not None and not sys.stdin.closed:
        threading.Thread(target=_read_commands, args=(node,), daemon=True,
                         name='dispycos-stdin').start()
    try:
        while not node.done.wait(1.0):
            pass
    except KeyboardInterrupt:
        node.shutdown(terminate=True)
    return 0


def _read_commands(node):
    for line in sys.stdin:
        run_command(node, line)
        if node.quitting:
            return


if __name__ == '__main__':
    sys.exit(main())
