#!/usr/bin/env python3
"""dispyscheduler: one scheduler for many client programs that share the same nodes.

Run ``python dispyscheduler.py`` on any host (beside dispy.py); programs use
``dispy.SharedJobCluster(..., scheduler_node=HOST)`` instead of ``JobCluster``.  Towards
the nodes it is one dispy client (UDP and TCP 51347, one session on each node for
every program's computations); towards the programs it serves TCP 51349.  It hosts the
very ``Scheduler`` and ``NodePool`` a ``JobCluster`` program does (imported from
dispy.py): only the cluster end differs, a ``RemoteCluster`` that forwards the
scheduler's ``ClusterHooks`` calls to its program::

    SharedJobCluster ──JOB──► Listener ─► ClientRouter ─► RemoteCluster ─► SharedScheduler
      (RemoteScheduler,       (dispy.py,   which cluster    its jobs,        (dispy.Scheduler:
       dispy.py)               socketserver) a connection    results until    policy between
          ▲                                 is            the client ACKs  clusters, windows
          │                                               them             shared per node)
          └───────────── STATE, DONE ◄──────────────────────┘                  │ JOB
                                                                                 ▼
                                                                 NodePool ─► dispynode

The path a job takes: the program's JOB arrives on the I/O loop → RemoteCluster.on_job
gives it the scheduler's key (the cluster's number × 2**40 + the program's key, so a
restarted scheduler recognises it) → SharedScheduler.submit → a node; the node's
RESULT → job_ended → DONE to the program, the result kept here (and not acknowledged to
the node) until the program's ACK; then the node's ACK.  So a result is always held by
the node, by this scheduler or by the program, and a crash of any one loses none.

Threads: dispy-hub (the I/O loop: node connections, program connections, UDP, timers),
dispy-worker-N (files, allocate() round trips, big frames), one handshake thread per
connection being authenticated (dispy.Listener), main (stdin commands or a wait).

Between clusters (``--early_cluster_scheduler``, ``--fair_cluster_scheduler``, default
oldest job first) every cluster set up on a node shares that node's window of jobs in
flight, so the node's CPUs go where the policy says.  ``exclusive=True`` clusters wait
until every running cluster has closed, then run alone (``ClusterAdmission``).
"""

import collections
import fcntl
import itertools
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

import dispy
from dispy import DispyJob, Msg, logger

__version__ = dispy.__version__

SCHEDULER_PORT = dispy.SCHEDULER_PORT
KEY_BITS = 40                   # a program's job key below, the cluster's number above
KEY_MASK = (1 << KEY_BITS) - 1
ALLOCATE_TIMEOUT = 30.0         # seconds a program has to answer ALLOCATE
RETURN_GRACE = 3.0              # a restarted scheduler waits this long for its nodes
RETURN_WINDOW = 120.0           # ... and takes their jobs of before it for this long
MAX_ORPHANS = 100000            # jobs of clusters not (yet) back after a restart
ATTEMPT_BASE = random.SystemRandom().randrange(1 << 40)    # attempts: new each run


# ================================================================================
# The scheduler: dispy.Scheduler, shared between clusters
# ================================================================================

class SharedJob(DispyJob):
    """A program's job as the scheduler keeps it: its key there, and the node whose
    result waits for the program's ACK."""

    __slots__ = ('client_key', 'ack')

    def __init__(self, cluster, client_key, blob, pin, options):
        super().__init__(None, cluster, blob, pin, options, args=None)   # never unpickled here
        self._key = (cluster.key << KEY_BITS) | client_key
        # attempts of this run of the scheduler do not meet those of an earlier run
        self._attempt = ATTEMPT_BASE
        self.client_key = client_key
        self.ack = None             # (link, key, attempt) to acknowledge to the node


class SharedScheduler(dispy.Scheduler):
    """``dispy.Scheduler`` with the hooks a shared scheduler needs:

    * blobs (arguments, results) pass through unopened (``load_blob``);
    * a result is acknowledged to its node once the program has it (``RemoteCluster``
      does; ``_result_recorded`` only for jobs no program waits for);
    * the clusters set up on a node share one window of jobs in flight there
      (``NodeLink.shared``), and a freed slot goes to the cluster the policy names;
    * jobs a node holds that this scheduler does not know (it restarted) are kept for
      their cluster's return instead of cancelled (``orphans``).
    """

    def __init__(self, threads, cluster_keys=None, job_keys=None):
        super().__init__(threads, cluster_keys, job_keys)
        self.policy = 'oldest_job'
        self.served = itertools.count(1)
        self.orphans = {}           # node key -> (link, attempt, since): running there
        self.kept = {}              # link -> computations it said it has when it came
        self.orphan_results = {}    # node key -> (link, RESULT record, since)

    def load_blob(self, msg):
        return getattr(msg, 'blob', None), None

    def _result_recorded(self, link, job, msg):
        if job.ack is None:         # nobody will acknowledge it
            link.acks.append((msg.key, msg.attempt))

    def _room_changed(self, link, ckey=None):
        super()._room_changed(link, None)   # a freed slot may go to any cluster

    def add_allocations(self, cluster, allocs):
        """A cluster picks among the nodes the scheduler uses (its ``-n``): hosts it
        names outside them are not dialed, and its patterns broadcast nothing."""
        super().add_allocations(cluster, [a for a in allocs if a.ip_addr is not None
                                          and self.wants_node(a.ip_addr, a.host)])

    def node_ready(self, link, restarted, info):
        link.shared = True
        kept = info.get('computations', ())
        self.kept[link] = {k for k in kept if type(k) is int} if isinstance(kept, list) else set()
        super().node_ready(link, restarted, info)

    # -- which cluster's job goes next -------------------------------------------------------
    def _fill(self, queues):
        if self.policy == 'early' or len(queues) < 2:
            super()._fill(queues)       # clusters in the order they came
            return
        while True:
            queue = self._next_queue()
            if queue is None:
                break
            link = queue.least_loaded()
            if link is None:
                queue.blocked = True
                continue
            queue.served = next(self.served)
            self._send_job(link, queue.pending.popleft())
        for queue in queues:
            queue.blocked = False

    def _next_queue(self):
        """The cluster whose job the policy sends next, among those with jobs queued
        and a node with room: least recently served (fair), or oldest first job."""
        best, best_rank = None, None
        for queue in self.queues.values():
            if not queue.pending or queue.blocked:
                continue
            while queue.pending and queue.pending.first().status in dispy.FINAL_STATUSES:
                queue.pending.popleft()     # cancelled while queued
            if not queue.pending:
                continue
            rank = queue.served if self.policy == 'fair' else queue.pending.first().submit_time
            if best is None or rank < best_rank:
                best, best_rank = queue, rank
        return best

    # -- jobs of a scheduler that restarted ---------------------------------------------------
    # A node that comes to a restarted scheduler names the jobs it runs for it and sends
    # the results it kept.  Their keys carry their cluster's number; until that cluster
    # is back (its program reconnects and sends its open jobs again) they are orphans.
    # A returning cluster's job then takes over its orphan instead of running again.
    # Jobs of clusters here now that a node has and the scheduler does not (superseded,
    # or cancelled while the node was away) are cancelled, as dispy.Scheduler does.

    def cluster_of(self, key):
        """The cluster a node's job key belongs to, if it is here (set by the program)."""
        return None

    def _unknown_job(self, link, key, attempt):
        cluster = self.cluster_of(key)
        job = cluster.jobs.get(key & KEY_MASK) if cluster is not None else None
        if cluster is not None and not cluster.returning or job is not None and job._node:
            link.send(Msg.CANCEL(key, attempt))     # superseded, or it runs elsewhere now
        elif job is not None and job.status == DispyJob.Created and self._unqueue(job):
            self._take_over(job, link, attempt)     # queued again after a restart: no rerun
        elif len(self.orphans) >= MAX_ORPHANS:
            link.send(Msg.CANCEL(key, attempt))
        else:       # its cluster is not back, or not in its turn yet: adopt() takes it
            old = self.orphans.get(key)
            if old is not None and old[0] is not link:
                old[0].send(Msg.CANCEL(key, old[1]))    # one run of it is enough
            self.orphans[key] = (link, attempt, time.monotonic())

    def _unknown_result(self, link, msg, loaded):
        link.cancels.discard((msg.key, msg.attempt))
        cluster = self.cluster_of(msg.key)
        job = cluster.jobs.get(msg.key & KEY_MASK) if cluster is not None else None
        kept = cluster.results.get(msg.key & KEY_MASK) if cluster is not None else None
        if kept is not None and kept[1] == (link, msg.key, msg.attempt):
            return      # sent again after a reconnect: acknowledged once the program has it
        if cluster is not None and not cluster.returning or msg.status == DispyJob.Cancelled \
                or kept is not None or job is not None and job.status in dispy.FINAL_STATUSES:
            # a stale attempt; or a run of before the restart that was cancelled (it never
            # counts: the job runs again)
            held = self.orphans.get(msg.key)
            if held is not None and held[:2] == (link, msg.attempt):
                del self.orphans[msg.key]
            link.acks.append((msg.key, msg.attempt))
        elif job is not None:       # the job came back before its result: this counts
            self._drop_run(job)
            self._end_with(job, link, msg)
        elif len(self.orphan_results) >= MAX_ORPHANS:
            link.acks.append((msg.key, msg.attempt))
        else:       # kept for its cluster's return
            self.orphans.pop(msg.key, None)
            old = self.orphan_results.get(msg.key)
            if old is not None:
                old[0].send(Msg.ACK([(old[1].key, old[1].attempt)]))
            self.orphan_results[msg.key] = (link, msg, time.monotonic())

    def adopt(self, job):
        """A returning cluster's job that its node still holds (running, or its
        result kept) is taken over instead of run again (lock held); True if so."""
        key = job._key
        kept = self.orphan_results.pop(key, None)
        if kept is not None:
            self._end_with(job, kept[0], kept[1])
            return True
        held = self.orphans.pop(key, None)
        if held is None:
            return False
        link, attempt, _ = held
        if link.conn is None or not link.ready:
            return False
        self._take_over(job, link, attempt)
        return True

    def cancel_orphan(self, key):
        """The program cancelled a job that is still an orphan here (lock held)."""
        held = self.orphans.pop(key, None)
        if held is not None:
            held[0].send(Msg.CANCEL(key, held[1]))
        kept = self.orphan_results.pop(key, None)
        if kept is not None:
            kept[0].send(Msg.ACK([(kept[1].key, kept[1].attempt)]))
        return held is not None or kept is not None

    def _end_with(self, job, link, msg):
        """The job ends with a result its node kept from before a restart."""
        job.ack = (link, msg.key, msg.attempt)
        job.ip_addr = link.ip_addr
        job.start_time = msg.start_time
        self._end_job(job, msg.status, msg.blob, msg.stdout, msg.stderr, msg.exception,
                      msg.end_time)

    def _take_over(self, job, link, attempt):
        """The job is the one its node runs since before a restart."""
        job._attempt = attempt
        job._node = link
        job.ip_addr = link.ip_addr
        link.jobs[job._key] = job
        link.in_flight[job._cluster.key] += 1
        job.status = DispyJob.Running       # as far as anyone can tell: its program hears so
        job._cluster.job_changed(job, DispyJob.Running)

    def _drop_run(self, job):
        """The job's own run (sent after the restart) is not needed: cancelled there,
        or taken out of its queue."""
        link = job._node
        if link is not None:
            link.cancels.add((job._key, job._attempt))
            link.send(Msg.CANCEL(job._key, job._attempt))
            del link.jobs[job._key]
            self._slot_freed(link, job._cluster.key)
            job._node = None
        else:
            self._unqueue(job)

    def _unqueue(self, job):
        """Takes a job out of its cluster's queue (or its node's, for submit_node)."""
        queue = self.queues.get(job._cluster.key)
        if queue is None:
            return False
        for waiting in [queue.pending] + list(queue.pinned.values()):
            try:
                waiting.remove(job)
                return True
            except ValueError:
                continue
        return False

    def orphan_numbers(self):
        """Cluster numbers that orphans or kept computations carry (lock held)."""
        numbers = {key >> KEY_BITS for key in itertools.chain(self.orphans,
                                                               self.orphan_results)}
        for kept in self.kept.values():
            numbers |= kept
        return numbers

    def expire_orphans(self, age, closing_time):
        """Orphans no cluster came back for within ``age`` seconds: cancelled, their
        results acknowledged; once ``closing_time`` came, computations nodes kept for
        clusters not here and with no orphans left are closed (lock held)."""
        now = time.monotonic()
        for key, (link, attempt, since) in list(self.orphans.items()):
            if now - since > age:
                del self.orphans[key]
                link.send(Msg.CANCEL(key, attempt))
        for key, (link, msg, since) in list(self.orphan_results.items()):
            if now - since > age:
                del self.orphan_results[key]
                link.send(Msg.ACK([(msg.key, msg.attempt)]))
        if not closing_time:
            return
        waiting = {key >> KEY_BITS for key in itertools.chain(self.orphans,
                                                               self.orphan_results)}
        for link, kept in list(self.kept.items()):
            for ckey in list(kept):
                if (ckey not in self.queues and ckey not in waiting
                        and self.cluster_of(ckey << KEY_BITS) is None
                        and link.send(Msg.CLOSE_COMPUTE(ckey)) is not False):
                    kept.discard(ckey)
                elif ckey in self.queues or self.cluster_of(ckey << KEY_BITS) is not None:
                    kept.discard(ckey)      # its cluster is back: its own now
            if not kept:
                del self.kept[link]


# ================================================================================
# A program's cluster, as the scheduler hosts it
# ================================================================================

class RemoteCluster(dispy.ClusterHooks):
    """One SharedJobCluster of one program: the ``ClusterHooks`` the scheduler calls,
    forwarded over the program's connection, and what the program sends, handled.

    Its life: ``files`` (CLUSTER came, its files arrive) → ``waiting`` (for its turn:
    ClusterAdmission) → ``active`` (in the scheduler) → ``closed``.  The connection may
    drop at any point: the cluster goes on detached (its jobs run, results are kept)
    until the program comes back or ``--zombie_interval`` passes.
    """

    def __init__(self, program, uid, client_id, number, address):
        self.program = program
        self.scheduler = program.scheduler
        self.lock = program.scheduler.lock
        self.uid = uid
        self.client_id = client_id
        self.key = number
        self.address = address
        self.name = uid
        self.state = 'new'
        self.conn = None
        self.recovering = False     # the connection is recover_jobs'
        self.detached_at = None
        self.exclusive = False
        self.reentrant = False
        self.allocations = []
        self.specs = []
        self.files = []
        self.folder = os.path.join(program.config.dest_path_prefix, 'cluster-%d' % number)
        self.receiver = None        # its files (FileReceiver)
        self.put_receivers = {}     # node -> FileReceiver of send_file files on their way
        self.jobs = {}              # program's key -> SharedJob not ended
        self.held = []              # jobs that came before the cluster's turn
        self.results = {}           # program's key -> DONE, until the program's ACK
        self.starts = {}            # program's key -> job whose STATE Running is due
        self.replies = {}           # token -> cpus (ALLOCATED)
        self.awaited = set()        # tokens of ALLOCATEs waiting for their answer
        self.tokens = itertools.count(1)
        self.returning = False      # it existed before this scheduler restarted
        self.received = 0           # the program's highest job key received
        self.live = dispy.LiveOutputRelay()     # its jobs' live lines (stream_output)

    def __repr__(self):
        return '<RemoteCluster %s %s>' % (self.key, self.name)

    # -- what the program sends (loop thread; ClientRouter holds the lock) ----------------------
    def send(self, msg, hold=False):
        conn = self.conn
        if conn is not None:
            conn.send(msg, hold=hold)

    def on_cluster(self, info):
        if self.state != 'new':
            return
        specs, allocations = info.get('specs'), info.get('allocations')
        if not isinstance(specs, list) or not specs or not isinstance(allocations, list):
            raise dispy.ProtocolError('malformed CLUSTER')
        self.name = str(info.get('name', ''))[:200] or self.address
        self.exclusive = bool(info.get('exclusive'))
        self.reentrant = bool(info.get('reentrant'))
        self.files = [dispy.FileReceiver.plain_name(name) for name in info.get('files', ())]
        self.specs = [self._checked_spec(spec) for spec in specs]
        self.allocations = [self._allocation(entry) for entry in allocations]
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder, mode=0o700)
        self.receiver = dispy.FileReceiver(self.folder, self.program.config.max_file_size)
        self.state = 'files'
        self._files_arrived()

    def _checked_spec(self, spec):
        if not isinstance(spec, dict) or not isinstance(spec.get('name'), str):
            raise dispy.ProtocolError('malformed computation')
        names = spec.get('files', [])
        if not isinstance(names, list) or not set(names) <= set(self.files):
            # only files sent with the cluster, read from its own folder
            raise dispy.ProtocolError('computation names files not sent with it')
        spec = dict(spec)
        if self.program.config.cleanup_nodes:
            spec['remove_files'] = True
        return spec

    def _allocation(self, entry):
        host, port, cpus, custom, index, spec = entry
        alloc = dispy.NodeAllocate(str(host), port or self.program.config.node_port, cpus)
        alloc.custom, alloc.index = bool(custom), int(index)
        alloc.spec = int(spec) if 0 <= int(spec) < len(self.specs) else 0
        return alloc

    def restart_upload(self):
        """The connection dropped before the cluster and its files were all here."""
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        shutil.rmtree(self.folder, ignore_errors=True)
        self.state = 'new'

    def on_file(self, msg):
        """A chunk of the computation's files (no lock: a disk write)."""
        if self.state != 'files' or msg.name not in self.files:
            raise dispy.ProtocolError('unexpected file %r' % (msg.name,))
        if self.receiver.chunk(msg.name, msg.mode, msg.offset, msg.data, msg.last):
            with self.lock:
                self._files_arrived()

    def _files_arrived(self):
        if self.state == 'files' and all(os.path.isfile(os.path.join(self.folder, name)) for name in self.files):
            self.state = 'waiting'
            self.send(Msg.CLUSTER_READY(None))
            self.program.admission.request(self)

    def on_job(self, msg):
        key = msg.key
        if type(key) is not int or not 0 < key < 1 << KEY_BITS:
            raise dispy.ProtocolError('malformed job key')
        self.received = max(self.received, key)     # jobs come in key order
        if key in self.jobs or key in self.results:
            return      # sent again after a reconnect: it has it already
        try:
            blob = dispy.checked_blob(msg.blob)
            options = dict(dispy.checked_job_options(msg.options) or {})
            if dispy.blob_size(blob) > self.program.config.max_frame - 65536:
                raise ValueError('arguments of %d bytes exceed the scheduler\'s frame limit '
                                 '(--max_frame_size)' % dispy.blob_size(blob))
        except ValueError as exc:   # the job ends here, with the reason
            self._end_unrun(key, 'Terminated: %s' % exc)
            return
        pin = options.pop('node', None)
        job = SharedJob(self, key, blob, pin, options or None)
        self.jobs[key] = job
        if self.state == 'active':
            self._submit(job)
        else:
            self.held.append(job)

    def _end_unrun(self, key, text):
        done = Msg.DONE(key, None, DispyJob.Terminated, None, None, None, text, None,
                        time.time(), None)
        self.results[key] = (done, None)
        self.send(done)

    def _submit(self, job):
        if not (self.returning and self.scheduler.adopt(job)):
            self.scheduler.submit(job)

    def activate(self):
        """Its turn came (lock held): into the scheduler, with the jobs held."""
        self.state = 'active'
        self.scheduler.add_cluster(self)
        held, self.held = self.held, []
        for job in held:
            if job.status not in dispy.FINAL_STATUSES:
                self._submit(job)

    def on_cancel(self, msg):
        job = self.jobs.get(msg.key)
        if job is None:
            if type(msg.key) is int and self.returning:
                self.scheduler.cancel_orphan((self.key << KEY_BITS) | msg.key)
            return
        if self.state == 'active':
            self.scheduler.cancel(job)
        else:
            self.scheduler._end_job(job, DispyJob.Cancelled, exception='Cancelled')

    def on_ack(self, msg):
        """The program has these results: their nodes may drop them now."""
        by_link = collections.defaultdict(list)
        for entry in msg.jobs:
            key = entry[0] if isinstance(entry, (list, tuple)) and entry else None
            done = self.results.pop(key, None)
            if done is None:
                continue
            ack = done[1]
            if ack is not None:
                by_link[ack[0]].append((ack[1], ack[2]))
        for link, keys in by_link.items():
            link.send(Msg.ACK(keys))
        if self.recovering and not self.jobs and not self.results:
            self.program.admission.close(self)      # all recovered

    def on_node_op(self, msg):
        """A cluster method on a node (on a worker thread: some wait for the node)."""
        self.program.waits.submit(self._node_op, self.conn, msg.token, msg.op,
                                        msg.node, msg.arg)

    def _node_op(self, conn, token, op, node, arg):
        scheduler, value = self.scheduler, -1
        try:
            addr = dispy.resolve_host(str(node)) if node is not None else None
            if op == 'deallocate':
                value = scheduler.deallocate(self, addr)
            elif op in ('close', 'resetup'):
                value = scheduler.close_node(self, addr, bool(arg), resetup=op == 'resetup')
            elif op == 'set_cpus':
                value = (scheduler.set_node_cpus(self, addr, int(arg))
                         if self.program.config.cooperative else -2)
            elif op == 'allocate':
                value = self._add_allocations([self._allocation(entry) for entry in arg])
        except (TypeError, ValueError) as exc:
            logger.warning('cluster %s: malformed %s request: %s', self.name, op, exc)
        except Exception:
            logger.exception('cluster %s: %s failed', self.name, op)
        conn.send(Msg.OP_DONE(token, value))

    def on_put_file(self, msg):
        """A chunk of ``cluster.send_file`` for a node: kept here, then sent on."""
        node = msg.cluster
        if not isinstance(node, str):
            raise dispy.ProtocolError('malformed node of send_file')
        try:
            receiver = self._put_receiver(node)
            path = receiver.chunk(msg.name, msg.mode, msg.offset, msg.data, msg.last)
        except (ValueError, OSError) as exc:
            self.send(Msg.PUT_FILE_DONE(node, msg.name, str(exc)))
            return
        if path is not None:
            # a folder of its own, so that the next file to that node cannot replace it
            # while it is sent
            with self.lock:
                del self.put_receivers[node]
            self.program.waits.submit(self._put_file, self.conn, node, msg.name, path,
                                            receiver)

    def _put_receiver(self, node):
        with self.lock:
            receiver = self.put_receivers.get(node)
            if receiver is None:
                if len(self.put_receivers) >= 64:
                    raise ValueError('too many send_file transfers at once')
                folder = tempfile.mkdtemp(prefix='put-', dir=self.folder)
                receiver = self.put_receivers[node] = dispy.FileReceiver(
                    folder, self.program.config.max_file_size)
            return receiver

    def _put_file(self, conn, node, name, path, receiver):
        addr = dispy.resolve_host(str(node)) or str(node)
        with self.lock:
            known = self.scheduler._link_of(self, addr, 'ready') is not None
        error = None if known else 'node %s is not set up for this cluster' % node
        if known and self.scheduler.send_file(self, addr, path, 60) != 0:
            error = 'node %s did not take the file' % node
        receiver.close()
        shutil.rmtree(receiver.folder, ignore_errors=True)
        conn.send(Msg.PUT_FILE_DONE(node, name, error))

    def on_allocated(self, msg):
        if msg.token in self.awaited:       # a late or made-up answer is dropped
            self.replies[msg.token] = msg.cpus
            self.scheduler.cond.notify_all()

    # -- the program comes and goes ---------------------------------------------------------------
    def attach(self, conn, recovering=False):
        """A connection of the program (again, lock held): what it has not got yet
        follows the NODE answer."""
        if self.conn is not None and self.conn is not conn:
            self.conn.close('replaced by a new connection')
        self.conn, self.recovering, self.detached_at = conn, recovering, None
        for key, (done, ack) in list(self.results.items()):
            self.results[key] = (self._within_limit(done), ack)
            conn.send(self.results[key][0])
        if not recovering:
            for job in self.jobs.values():
                if job.status == DispyJob.Running:
                    conn.send(Msg.STATE(job.client_key, DispyJob.Running, job.ip_addr,
                                        job.start_time))
            if self.state == 'active':      # nodes its allocate() could not answer for
                self.scheduler.add_allocations(self, [])

    def _within_limit(self, done):
        """A DONE the program's frame limit admits: one whose result is too big for it
        is Terminated instead, saying so (the node keeps nothing of it then)."""
        conn = self.conn
        size = dispy.blob_size(done[4]) if done[4] is not None else 0
        if conn is None or size <= conn.channel.peer_max_frame - 65536:
            return done
        rec = Msg.DONE.read(done)
        return Msg.DONE(rec.key, rec.ip, DispyJob.Terminated, None, rec.stdout, rec.stderr,
                        'Terminated: its result of %d bytes exceeds the program\'s frame '
                        'limit (max_frame_size) of %d' % (size, conn.channel.peer_max_frame),
                        rec.start_time, rec.end_time, rec.retried)

    def detach(self):
        self.conn = None
        self.recovering = False
        self.detached_at = time.monotonic()

    # -- ClusterHooks (scheduler lock held) --------------------------------------------------------
    def allocate(self, alloc, link):
        if not alloc.custom:
            return alloc.allocate(None, link.ip_addr, link.name, link.cpus, link.avail_info,
                                  link.platform)
        token = next(self.tokens)
        with self.lock:
            conn = self.conn
            if conn is None or self.recovering:
                return 0        # the program is away: no answer, no node
            conn.send(Msg.ALLOCATE(token, alloc.index, dispy._NodeView.describe(link,
                                                                                 self.key)))
            self.awaited.add(token)
            self.scheduler.cond.wait_for(lambda: token in self.replies, ALLOCATE_TIMEOUT)
            self.awaited.discard(token)
            cpus = self.replies.pop(token, 0)
        return int(cpus) if isinstance(cpus, int) else 0

    def computation(self, alloc):
        spec = self.specs[alloc.spec]
        return spec, [(name, os.path.join(self.folder, name)) for name in spec.get('files', ())]

    def job_submitted(self, job):
        if (monitor := self.monitor) is not None:
            monitor.job_submitted(job)

    def job_dispatched(self, job, link):
        if (monitor := self.monitor) is not None:
            monitor.job_dispatched(job, link.ip_addr)

    def job_changed(self, job, status):
        if (monitor := self.monitor) is not None and status == DispyJob.Running:
            monitor.job_running(job)
        if status == DispyJob.Running:
            if not self.starts:     # sent after this frame's events: a result in the same
                self.program.hub.loop.call_soon(self._send_starts)  # frame makes it moot
            self.starts[job.client_key] = job
        elif status == DispyJob.Created:
            self.send(Msg.STATE(job.client_key, DispyJob.Created, None, None))
        elif status == DispyJob.ProvisionalResult:
            self.send(Msg.PROVISIONAL(job.client_key, job._attempt, job.result))

    def _send_starts(self):
        with self.lock:
            starts, self.starts = self.starts, {}
            for job in starts.values():
                if job.status == DispyJob.Running:
                    self.send(Msg.STATE(job.client_key, DispyJob.Running, job.ip_addr,
                                        job.start_time), hold=True)

    def job_ended(self, job, link):
        if (monitor := self.monitor) is not None:
            monitor.job_ended(job, link.ip_addr if link is not None else job.ip_addr)
        key = job.client_key
        self.jobs.pop(key, None)
        self.starts.pop(key, None)
        if self.live.lost:      # the count of its live lines lost, before its DONE
            self.live.job_ended(self._live_conn(), key, job._attempt)
        if job.ack is None and link is not None and self.state != 'closed':
            job.ack = (link, job._key, job._attempt)    # acknowledged once the program has it
        done = self._within_limit(Msg.DONE(
            key, link.ip_addr if link is not None else job.ip_addr, job.status, job.result,
            job.stdout, job.stderr, job.exception, job.start_time, job.end_time,
            [tuple(attempt) for attempt in job._tries] if job._tries else None))
        self.results[key] = (done, job.ack)
        job.result = None
        if self.conn is not None:   # held for company only while more of its jobs run
            self.conn.send(done, hold=bool(self.jobs))

    def node_changed(self, link, status):
        if (monitor := self.monitor) is not None:
            monitor.node_changed(link.ip_addr, status, link.name,
                                      link.alloc_cpus.get(self.key, 0), link.cpus,
                                      link.platform, link.avail_info)
        self.send(Msg.NODE_STATUS(status, dispy._NodeView.describe(link, self.key)))

    def setup_failed(self, link, error):
        self.send(Msg.NODE_STATUS(dispy.SETUP_FAILED, {'ip_addr': link.ip_addr,
                                                       'error': str(error)[:2000]}))

    def job_file(self, job, path, mode, offset, data, last):
        self.send(Msg.SEND_FILE(job.client_key, job._attempt, path, mode, offset, data, last))

    def job_output(self, job, stream, text, dropped):
        self.live.pass_on(self._live_conn(), job.client_key, job._attempt, stream, text,
                          dropped)

    def _live_conn(self):
        """Where live output goes: the program, if attached (not recover_jobs)."""
        return self.conn if not self.recovering else None

    # -- what the web monitor (--httpd) may do: JobCluster's methods of the same names -----------
    def is_closed(self):
        return self.state == 'closed'

    def hooks_lock(self):
        return self.lock

    def cancel(self, job):
        return self.scheduler.cancel(job, 'Cancelled in the web monitor')

    def set_node_cpus(self, node, cpus):
        result = self.scheduler.set_node_cpus(self, node, cpus)
        if result >= 0 and (monitor := self.monitor) is not None:
            monitor.node_cpus(node, result)
        return result

    def deallocate_node(self, node):
        result = self.scheduler.deallocate(self, node)
        if result == 0 and (monitor := self.monitor) is not None:
            monitor.node_cpus(node, 0)
        return result

    def close_node(self, node, terminate_pending=False):
        return self.scheduler.close_node(self, node, terminate_pending)

    def allocate_node(self, node):
        return self._add_allocations(dispy._node_allocations([node],
                                                             self.program.config.node_port))

    def _add_allocations(self, allocs):
        with self.lock:
            self.allocations.extend(allocs)
        if self.state == 'active':
            self.scheduler.add_allocations(self, allocs)
        return 0

    # -- the end ------------------------------------------------------------------------------------
    def close(self):
        """Out of the scheduler: computations closed on the nodes, files removed, kept
        results acknowledged to their nodes (lock held)."""
        if self.state == 'active':
            for job in list(self.jobs.values()):
                self.scheduler.cancel(job, 'Cancelled: cluster closed')
            self.scheduler.remove_cluster(self)
        self.state = 'closed'
        for done, ack in self.results.values():
            if ack is not None:
                ack[0].send(Msg.ACK([(ack[1], ack[2])]))
        self.results.clear()
        for receiver in [self.receiver] + list(self.put_receivers.values()):
            if receiver is not None:
                receiver.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# ================================================================================
# Admission: whose turn it is (exclusive clusters run alone)
# ================================================================================

class ClusterAdmission:
    """Clusters enter the scheduler in the order they are ready, except that an
    exclusive one waits until every cluster in it has closed and then runs alone, and
    clusters ready after a waiting exclusive one wait behind it (seed 002 §1.2)."""

    def __init__(self, program):
        self.program = program
        self.active = []
        self.waiting = collections.deque()

    def request(self, cluster):
        self.waiting.append(cluster)
        self._admit()

    def close(self, cluster):
        """The cluster is done (lock held): the next ones may enter."""
        if cluster.state == 'closed':
            return
        if cluster in self.waiting:
            self.waiting.remove(cluster)
        if cluster in self.active:
            self.active.remove(cluster)
        self.program.router.forget(cluster)
        cluster.close()
        self._admit()

    def _admit(self):
        program = self.program
        while self.waiting:
            cluster = self.waiting[0]
            if cluster.returning and time.monotonic() < program.started + RETURN_GRACE:
                # after a restart: the nodes first, so their jobs are found, not rerun
                program.hub.loop.call_later(RETURN_GRACE, self._admit_later)
                return
            if any(c.exclusive for c in self.active):
                return
            if cluster.exclusive and self.active:
                return
            self.waiting.popleft()
            self.active.append(cluster)
            if cluster.exclusive:
                logger.info('cluster %s runs alone (exclusive)', cluster.name)
            cluster.activate()

    def _admit_later(self):
        with self.program.scheduler.lock:
            self._admit()


# ================================================================================
# Program connections: which cluster each one is
# ================================================================================

class ClientRouter:
    """Takes each authenticated connection from the Listener: a SharedJobCluster
    (new, or back after a dropped connection or a restart of this scheduler), or
    ``recover_jobs`` of a program that vanished.  Handles their messages on the loop,
    and ends the clusters of programs that never come back."""

    OFFLOAD = frozenset(('FILE', 'PUT_FILE'))     # written to disk off the loop

    def __init__(self, program):
        self.program = program
        self.lock = program.scheduler.lock
        self.clusters = {}          # uid -> RemoteCluster
        self.by_conn = {}           # LoopConnection -> RemoteCluster(s)

    # -- connections (handshake threads) ----------------------------------------------------------
    def attach(self, channel, addr, info):
        program = self.program
        conn = dispy.LoopConnection(channel, self, 'client-%s' % addr[0], program.hub.loop,
                                    program.hub.threads, channel.take_buffered())
        client_id, uid = str(info.get('id', '')), info.get('cluster')
        with self.lock:
            if info.get('recover') is not None:
                self._recover(conn, client_id, info.get('recover'))
                return
            if not isinstance(uid, str) or not uid:
                raise dispy.ProtocolError('CLIENT names no cluster')
            cluster = self.clusters.get(uid)
            known = cluster is not None and cluster.state in ('waiting', 'active')
            if cluster is not None and cluster.state in ('new', 'files'):
                cluster.restart_upload()    # cut off while it came: it comes again
            elif not known:
                cluster = self._new_cluster(uid, client_id, info.get('number'), addr[0])
            self.by_conn[conn] = [cluster]
            conn.start()
            conn.send(Msg.NODE({'scheduler': program.name, 'known': known,
                                'number': cluster.key, 'instance': program.instance,
                                'pulse_interval': program.config.pulse_interval,
                                'received': cluster.received}))
            cluster.attach(conn)
        logger.info('%s cluster %s of %s (%s)', 'resumed' if known else 'new', cluster.key,
                    addr[0], info.get('name', ''))

    def _new_cluster(self, uid, client_id, number, address):
        used = {c.key for c in self.clusters.values()}
        returning = isinstance(number, int) and 0 < number < 1 << 20 and number not in used
        used |= self.program.scheduler.orphan_numbers()     # a cluster of before may return
        if not returning:
            number = random.randrange(1, 1 << 20)
            while number in used:
                number = random.randrange(1, 1 << 20)
        cluster = RemoteCluster(self.program, uid, client_id, number, address)
        cluster.returning = returning
        self.clusters[uid] = cluster
        if self.program.httpd is not None:
            self.program.httpd.add_cluster(cluster)
        return cluster

    def _recover(self, conn, client_id, keys):
        """recover_jobs of a program: its clusters here answer as a node would."""
        wanted = set(k for k in keys if type(k) is int) if isinstance(keys, list) else set()
        mine = [c for c in self.clusters.values()
                if c.client_id == client_id and c.state != 'closed']
        self.by_conn[conn] = mine
        conn.start()
        held = [[k, 0] for c in mine for k in c.jobs if k in wanted]
        conn.send(Msg.NODE({'scheduler': self.program.name, 'jobs': held,
                            'instance': self.program.instance}))
        for cluster in mine:
            cluster.attach(conn, recovering=True)

    def cluster_of(self, key):
        """The cluster here whose number a node's job key carries (lock held)."""
        number = key >> KEY_BITS if type(key) is int else None
        for cluster in self.clusters.values():
            if cluster.key == number and cluster.state != 'closed':
                return cluster
        return None

    def forget(self, cluster):
        if self.clusters.get(cluster.uid) is cluster:
            del self.clusters[cluster.uid]
        if self.program.httpd is not None:
            self.program.httpd.del_cluster(cluster)

    # -- messages (loop thread; FILE and PUT_FILE on the connection's strand) ---------------------
    def on_messages(self, conn, msgs):
        clusters = self.by_conn.get(conn)
        if not clusters:
            return
        for msg in msgs:
            kind = msg[0] if isinstance(msg, tuple) and msg else None
            kind = dispy.TO_SCHEDULER.get(kind) if isinstance(kind, str) else None
            if kind is None:
                logger.warning('%s sent an unknown message; ignored', conn.name)
                continue
            try:
                if kind.name in self.OFFLOAD:   # disk writes: not under the lock
                    self._handle(conn, clusters, kind, kind.read(msg))
                    continue
                with self.lock:
                    if conn in self.by_conn:
                        self._handle(conn, clusters, kind, kind.read(msg))
            except (ValueError, TypeError, IndexError, KeyError, OSError,
                    dispy.ProtocolError) as exc:
                logger.warning('%s sent a malformed or refused %s: %s', conn.name,
                               kind.name, exc)
                with self.lock:
                    if (clusters[0].state in ('new', 'files') and not clusters[0].recovering
                            and clusters[0].conn is conn):
                        conn.send(Msg.CLUSTER_READY('refused: %s' % exc))
                        self.program.admission.close(clusters[0])
                        conn.close('cluster refused', flush=True)
                        return

    def _handle(self, conn, clusters, kind, msg):
        name = kind.name
        if name == 'PULSE' or name == 'CLIENT':
            return
        if clusters[0].conn is not conn:
            return      # an older connection of the program's: its messages are moot
        if clusters[0].recovering:      # recover_jobs: ACK, CANCEL, RELEASE only
            for cluster in clusters:
                if name == 'ACK':
                    cluster.on_ack(msg)
                elif name == 'CANCEL':
                    cluster.on_cancel(msg)
            return
        cluster = clusters[0]
        if name == 'RELEASE':
            logger.info('cluster %s closed by its program', cluster.name)
            self.program.admission.close(cluster)
            conn.close('released', flush=True)
            return
        handler = {'CLUSTER': lambda m: cluster.on_cluster(m.info), 'FILE': cluster.on_file,
                   'JOB': cluster.on_job, 'CANCEL': cluster.on_cancel, 'ACK': cluster.on_ack,
                   'NODE_OP': cluster.on_node_op, 'PUT_FILE': cluster.on_put_file,
                   'ALLOCATED': cluster.on_allocated}[name]
        handler(msg)

    def on_closed(self, conn, reason):
        with self.lock:
            for cluster in self.by_conn.pop(conn, ()):
                if cluster.conn is conn:
                    if not cluster.recovering and cluster.state != 'closed':
                        logger.warning('program of cluster %s went away (%s): its %d job(s) '
                                       'go on, results are kept', cluster.name, reason,
                                       len(cluster.jobs))
                    cluster.detach()

    # -- timers (loop thread) ---------------------------------------------------------------------
    def tick(self, now):
        config = self.program.config
        with self.lock:
            for cluster in list(self.clusters.values()):
                if cluster.returning and now - self.program.started > RETURN_WINDOW:
                    cluster.returning = False   # what its nodes kept has come back by now
                if cluster.conn is None and cluster.detached_at is not None:
                    self._tick_detached(cluster, now, config.zombie_interval)
                elif cluster.conn is not None:
                    self._keep_alive(cluster, now)
            if now >= self.program.next_expiry:
                self.program.next_expiry = now + 5.0
                self.program.scheduler.expire_orphans(
                    max(config.zombie_interval, 60.0),
                    now - self.program.started > RETURN_WINDOW)

    def _keep_alive(self, cluster, now):
        conn = cluster.conn
        if conn.idle_send >= self.program.config.pulse_interval:
            conn.send(Msg.NODE_PULSE(time.time(), None))
        if now - conn.last_recv > dispy.DEAD_PULSES * max(self.program.config.pulse_interval,
                                                           dispy.DEFAULT_PULSE_INTERVAL):
            conn.close('no message from the program for %.0f s' % (now - conn.last_recv))

    def _tick_detached(self, cluster, now, zombie_interval):
        gone = now - cluster.detached_at
        if cluster.state != 'active' and gone > dispy.HANDSHAKE_TIMEOUT * 3:
            self.program.admission.close(cluster)      # never got going
        elif not cluster.jobs and not cluster.results and gone > dispy.HANDSHAKE_TIMEOUT:
            # nothing to run or keep for it (a program that only lost its connection is
            # back long before; one that comes back later sets the cluster up again)
            self.program.admission.close(cluster)
        elif gone > zombie_interval:
            if cluster.jobs:
                logger.warning('program of cluster %s did not come back in %.1f minutes: '
                               'its jobs are cancelled', cluster.name, zombie_interval / 60)
            self.program.admission.close(cluster)


# ================================================================================
# The program
# ================================================================================

class DispyScheduler:
    """The dispyscheduler program: a ``dispy.ClientHub`` towards the nodes (its I/O
    loop, worker threads, UDP port and the SharedScheduler with its NodePool), a
    ``dispy.Listener`` per address towards the programs, the ClientRouter and
    ClusterAdmission between them."""

    def __init__(self, config):
        self.config = config
        self.name = socket.gethostname()
        self.instance = os.urandom(8).hex()
        self.started = time.monotonic()
        self.secret = config.cluster_secret
        self.max_frame = config.max_frame
        self.ssl_context = dispy.make_ssl_context(True, config.cluster_certfile,
                                                  config.cluster_keyfile)
        self.hub = dispy.ClientHub(self._node_options())
        # The same identity towards the nodes after a restart: they keep its jobs and
        # results for it (see the module docstring).
        self.hub.client_id = self.hub.client['id'] = self._identity()
        self.scheduler = self.hub.scheduler_for(self._node_options(), SharedScheduler)
        self.scheduler.policy = config.policy
        self.router = ClientRouter(self)
        self.admission = ClusterAdmission(self)
        self.listeners = []
        self.admission_limits = dispy.HandshakeAdmission(total=64, per_address=16)
        # node methods and send_file wait for nodes: two worker threads at most, so the
        # others stay free for big frames and setups whatever programs ask
        self.waits = dispy.Strand(self.hub.threads, width=2)
        self.node_allocations = dispy._node_allocations(config.nodes or ['*'],
                                                        config.node_port)
        self.scheduler.wants_node = self._wants_node
        self.scheduler.cluster_of = self.router.cluster_of
        self.next_expiry = 0.0
        self.httpd = None           # the web monitor (--httpd)
        self.hub.loop.add_ticker(self._tick)

    def _node_options(self):
        config = self.config
        return {'ip_addrs': config.ip_addrs, 'explicit_ip_addrs': bool(config.ip_addrs),
                'port': config.client_port, 'explicit_port': False,
                'ext_ip_addrs': config.ext_ip_addrs, 'secret': config.node_secret,
                'certfile': config.node_certfile, 'keyfile': config.node_keyfile,
                'cafile': None, 'node_port': config.node_port, 'max_frame': config.max_frame,
                'pulse_interval': config.pulse_interval, 'ping_interval': config.ping_interval}

    def _identity(self):
        path = os.path.join(self.config.dest_path_prefix, 'scheduler-id')
        try:
            with open(path) as f:
                ident = f.read().strip()
            if len(ident) == 32:
                return ident
        except OSError:
            pass
        ident = self.hub.client_id
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, 'w') as f:
            f.write(ident)
        return ident

    def _wants_node(self, ip, name):
        """Every node the scheduler's ``-n`` (default: all) names is dialed, clusters
        or not: a restarted scheduler must hear what they hold."""
        return any(alloc.matches(ip, name) for alloc in self.node_allocations)

    def start(self):
        config = self.config
        for addr in config.ip_addrs or ['']:
            try:
                listener = dispy.Listener(self, addr, config.port, self.admission_limits)
            except OSError as exc:
                self.shutdown()
                raise SystemExit('dispyscheduler: cannot listen on %s:%s: %s'
                                 % (addr or '*', config.port, exc.strerror))
            self.listeners.append(listener)
            config.port = listener.port
            threading.Thread(target=listener.serve_forever, daemon=True,
                             name='dispyscheduler-listen').start()
        self.scheduler.pool.add_allocations(self.node_allocations)
        if config.httpd:
            self._start_httpd()

    def _start_httpd(self):
        """The web monitor of every cluster (dispyhttpd.py beside this file)."""
        import dispyhttpd
        try:
            self.httpd = dispyhttpd.DispyHTTPServer(
                None, host=self.config.ip_addrs[0] if self.config.ip_addrs else '',
                port=self.config.httpd_port, certfile=self.config.cluster_certfile,
                keyfile=self.config.cluster_keyfile)
        except OSError as exc:
            self.shutdown()
            raise SystemExit('dispyscheduler: cannot serve the web monitor on port %s: %s'
                             % (self.config.httpd_port, exc.strerror))
        with self.scheduler.lock:
            clusters = list(self.router.clusters.values())
        for cluster in clusters:
            self.httpd.add_cluster(cluster)

    def attach(self, channel, addr, info):
        self.router.attach(channel, addr, info)

    def _tick(self):
        self.router.tick(time.monotonic())

    def status_text(self):
        with self.scheduler.lock:
            links = [l for l in self.scheduler.pool.links.values() if l.ready]
            clusters = list(self.router.clusters.values())
            lines = ['%d node(s), %d cluster(s)' % (len(links), len(clusters))]
            for link in links:
                lines.append('  node %s (%s): %d CPUs, %d job(s) in flight'
                             % (link.ip_addr, link.name, link.cpus, len(link.jobs)))
            for c in clusters:
                lines.append('  cluster %s %s: %s, %d job(s) open, %d result(s) kept%s'
                             % (c.key, c.name, c.state, len(c.jobs), len(c.results),
                                ' (detached)' if c.conn is None else ''))
        return '\n'.join(lines)

    def shutdown(self):
        """Stops; the nodes keep running what they have for it (not released), so a
        scheduler started again on the same folder goes on with it."""
        for listener in self.listeners:
            listener.close()
        if self.httpd is not None:
            self.httpd.shutdown(wait=False)
        self.hub.shutdown(release=False)


# ================================================================================
# Command line
# ================================================================================

def build_parser():
    parser = dispy.ProgramArgumentParser(
        prog='dispyscheduler.py',
        description='Schedule the jobs of many dispy programs (SharedJobCluster) on the '
                    'same nodes.  Programs connect to TCP port 51349; the scheduler finds '
                    'and uses nodes as a dispy client does (port 51347).',
        epilog='Without --daemon, commands are read on stdin: status, quit.')
    add = parser.add_argument
    dispy.add_config_options(add)
    add('-d', '--debug', action='store_true', help='log debug messages')
    add('-n', '--node', '--nodes', dest='nodes', action='append', default=[],
        help='node name, address or pattern to use (repeatable; default: every node that '
        'answers a broadcast; name nodes beyond the LAN here)')
    add('-i', '--host', '--ip_addr', dest='ip_addrs', action='append', default=[],
        help='address to serve on and reach nodes from (repeatable; default all)')
    add('--ext_host', '--ext_ip_addr', dest='ext_ip_addrs', action='append', default=[],
        help='address nodes and programs should use for this host (NAT)')
    add('-p', '--port', '--scheduler_port', dest='port', type=int, default=SCHEDULER_PORT,
        help='TCP port for programs (SharedJobCluster scheduler_port; default %(default)s)')
    add('--client_port', type=int, default=dispy.CLIENT_PORT,
        help='UDP port where node announcements arrive (default %(default)s, shared with '
        'client programs on this host; 0: none)')
    add('--node_port', type=int, default=dispy.NODE_PORT,
        help='nodes\' port (default %(default)s)')
    add('--ipv4_udp_multicast', action='store_true',
        help='accepted for 4.15 scripts (IPv4 discovery uses broadcast here)')
    add('--node_secret', default='', help='secret shared with the nodes')
    add('--node_keyfile', help='TLS private key towards nodes, if not in --node_certfile')
    add('--node_certfile', help='TLS certificate towards nodes')
    add('--cluster_secret', default='', help='secret SharedJobClusters must know')
    add('--cluster_keyfile', help='TLS private key towards programs')
    add('--cluster_certfile', help='TLS certificate towards programs')
    add('--pulse_interval', type=float, default=dispy.DEFAULT_PULSE_INTERVAL,
        help='seconds between liveness messages with nodes and programs (1-600)')
    add('--ping_interval', type=float, default=None,
        help='seconds between discovery broadcasts (default: only until a node answers)')
    add('--zombie_interval', type=float, default=60.0,
        help='minutes a vanished program\'s cluster is kept (its jobs run, results kept '
        'for recover_jobs) before it is closed (default %(default)s)')
    add('--msg_timeout', type=float, default=dispy.MsgTimeout,
        help='seconds to wait for a peer\'s answer (default %(default)s)')
    add('--dest_path_prefix', default=os.path.join(tempfile.gettempdir(), 'dispy',
                                                   'scheduler'),
        help='folder for the clusters\' files and the scheduler\'s identity '
        '(default %(default)s)')
    add('--max_file_size', type=dispy.parse_size, default=0,
        help='largest file a program may send, with k/m/g suffix (default 0: unlimited)')
    add('--max_frame_size', type=dispy.parse_size, default=dispy.DEFAULT_MAX_FRAME,
        help='largest message accepted (default 256m)')
    add('--clean', action='store_true',
        help='remove the files and identity of an earlier run at start (its nodes\' jobs '
        'are not recognised then)')
    add('--httpd', action='store_true',
        help='serve the web monitor of all clusters (dispyhttpd.py; its address and '
        'access token are printed at start)')
    add('--httpd_port', type=int, default=8181,
        help='the web monitor\'s port (default %(default)s)')
    add('--fair_cluster_scheduler', action='store_true',
        help='a freed CPU takes the next job of the cluster least recently served')
    add('--early_cluster_scheduler', action='store_true',
        help='a freed CPU takes the next job of the cluster created first')
    add('--cooperative', action='store_true',
        help='programs may change the CPUs they use on a node (set_node_cpus)')
    add('--cleanup_nodes', action='store_true',
        help='nodes remove a cluster\'s files at its end even if it asked cleanup=False')
    add('--daemon', action='store_true', help='do not read commands on stdin')
    return parser


def configure(argv=None):
    parser = build_parser()
    config = dispy.parse_program_args(parser, argv, 'dispyscheduler')
    if config.fair_cluster_scheduler and config.early_cluster_scheduler:
        parser.error('--fair_cluster_scheduler and --early_cluster_scheduler exclude each '
                     'other')
    if not 0 < config.pulse_interval <= 600:
        parser.error('--pulse_interval must be more than 0 and at most 600 seconds')
    config.policy = ('fair' if config.fair_cluster_scheduler else
                     'early' if config.early_cluster_scheduler else 'oldest_job')
    return dispy.finish_program_config(config, 'dispyscheduler')


def _prepare_folder(config):
    """The scheduler's folder, locked for this process (two schedulers on one folder
    would share an identity towards the nodes); returns the open lock file."""
    os.makedirs(config.dest_path_prefix, mode=0o700, exist_ok=True)
    lock = open(os.path.join(config.dest_path_prefix, 'scheduler.lock'), 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        raise SystemExit('dispyscheduler: another dispyscheduler (pid %s) uses %s; give this '
                         'one its own --dest_path_prefix' % (lock.read().strip() or '?',
                                                             config.dest_path_prefix))
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    if config.clean:
        dispy.empty_folder(config.dest_path_prefix, keep=('scheduler.lock',))
    for name in os.listdir(config.dest_path_prefix):     # files of an earlier run's clusters
        if name.startswith('cluster-'):
            shutil.rmtree(os.path.join(config.dest_path_prefix, name), ignore_errors=True)
    return lock


def _read_commands(program, stop):
    """stdin commands; EOF (e.g. started with no terminal) just stops reading."""
    for line in sys.stdin:
        command = line.strip().lower()
        if command == 'status':
            print(program.status_text(), flush=True)
        elif command in ('quit', 'exit', 'terminate'):
            stop.set()
            return
        elif command:
            print('commands: status, quit', flush=True)


def main(argv=None):
    config = configure(argv)
    dispy.setup_logging(logger.DEBUG if config.debug else logger.INFO, 'dispyscheduler')
    dispy.MsgTimeout = config.msg_timeout
    lock = _prepare_folder(config)   # held until the process ends
    program = DispyScheduler(config)
    program.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    where = ', '.join(config.ip_addrs) or '*'
    logger.info('dispyscheduler %s serving programs at %s:%s (policy %s)', __version__,
                where, config.port, config.policy)
    print('dispyscheduler serving at %s:%s' % (where, config.port), file=sys.stderr, flush=True)
    if not config.daemon and sys.stdin is not None:
        threading.Thread(target=_read_commands, args=(program, stop), daemon=True).start()
    while not stop.wait(1.0):
        pass
    logger.info('dispyscheduler stopping')
    program.shutdown()
    lock.close()


if __name__ == '__main__':
    main()
