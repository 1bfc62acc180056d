"""A private virtual LAN built from Linux network namespaces, for tests.

Default dispy discovery sends UDP broadcasts on the machine's interfaces.  Tests
must never do that on the real network, so tests that need it run their
programs inside a ``NetLab``: a small LAN made only of network namespaces that
the lab creates itself and deletes when done::

      root namespace: untouched (only the namespace *names* live there)
    +------------------------------------------------------------------+
    |                   switch namespace  <prefix>sw                   |
    |                    br0 (Linux bridge, no address)                |
    |              p0 ----------- p1 ----------- p2   (veth ends)      |
    +--------------|-------------|--------------|----------------------+
                   | veth        | veth         | veth
    +--------------|--+ +--------|--------+ +---|---------------------+
    | eth0 10.213.N.1 | | eth0 10.213.N.2 | | eth0 10.213.N.3         |
    | lo 127.0.0.1    | | lo 127.0.0.1    | | lo 127.0.0.1            |
    | <prefix>h-client| | <prefix>h-node1 | | <prefix>h-node2         |
    +-----------------+ +-----------------+ +-------------------------+

Each host has ``lo`` up, one address on the lab subnet ``10.213.N.0/24`` (with
its broadcast address ``10.213.N.255``), and a default route via
``10.213.N.254``, an address nobody holds: it makes the host look like a
machine on an ordinary LAN (so ``255.255.255.255`` broadcasts and "which
address would reach the outside" look-ups work) while anything sent "out"
just dies inside the lab.  ``N`` is derived from the PID only to make logs of
parallel runs easy to tell apart; namespaces keep labs isolated anyway.

With ``hostnames=True`` (the default, when ``unshare`` exists) every process
started in a host also gets its own UTS namespace whose host name is the lab
host's name, and sees (through iproute2's ``/etc/netns/<ns>/`` mechanism) an
``/etc/hosts`` that maps every lab host name to its lab address and a
``resolv.conf`` pointing at 127.0.0.1, so that name look-ups fail fast
instead of waiting for a DNS server that the lab cannot reach.

Safety rule enforced here: nothing is created or changed in the root network
namespace except the namespace names themselves.  Veth pairs are created from
*inside* the switch namespace with their peer placed directly in the host
namespace (``ip -n SW link add pK type veth peer name eth0 netns HOST``), so
no interface ever exists in the root namespace, and every other command runs
with ``ip -n NS`` or ``ip netns exec NS``.  No route, address, link or
firewall rule of the root namespace is ever touched.

Everything the lab creates carries the prefix ``dspy<pid>-<k>-`` and is
removed by ``close()`` (called by ``__exit__`` and, as a last resort, at
interpreter exit): processes started through the lab (and their descendants,
and any other process left inside the lab's namespaces) are killed by PID,
then the namespaces are deleted, which also destroys their veths and bridge.
Namespaces left behind by a test process that died (its PID is gone) are
removed by ``remove_stale()``, which ``available()`` runs once.

Usage::

    from tests import netns
    netns.require()                       # unittest.SkipTest if not possible
    with netns.NetLab(['client', 'node1', 'node2']) as lab:
        node = lab.spawn('node1', [sys.executable, 'dispynode.py', '-d'])
        node.wait_for(r'serving at', timeout=20)
        result = lab.run('client', [sys.executable, 'sample.py'], timeout=60)
        lab.link_down('node1')            # simulate a network partition
        lab.link_up('node1')

``RoutedLab([[hosts of LAN 0], [hosts of LAN 1], ...])`` builds several such LANs
joined by a router namespace that forwards unicast between them but, as routers do,
no broadcast (for relays and nodes beyond the client's network).
"""

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

__all__ = ['NetLab', 'RoutedLab', 'LabProcess', 'available', 'require', 'remove_stale']

IP = shutil.which('ip') or '/usr/sbin/ip'
UNSHARE = shutil.which('unshare')
NAME_PREFIX = 'dspy'                       # every namespace is dspy<pid>-...
NETNS_RUN_DIR = '/run/netns'
NETNS_ETC_DIR = '/etc/netns'
TMP_PREFIX = 'dspy-netlab-'                # lab folders: dspy-netlab-<pid>-XXXX
CMD_TIMEOUT = 15.0                         # seconds, for each `ip` command
GATEWAY_OCTET = 254                        # default route target; never assigned
HOST_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9-]{0,31}$')
MAX_HOSTS = 64

_lab_counter = itertools.count()
_probe_result = None                       # cached (ok, reason) of available()
_uts_ok = False                            # probe: `unshare --uts` works here


# -- availability -------------------------------------------------------------

def available():
    """``(True, '')`` if labs can be built here, else ``(False, reason)``.

    Probes once per process: creates a throwaway namespace holding a bridge
    and a veth pair, runs a command in it, and deletes it.  Also removes
    namespaces left by dead test processes (see ``remove_stale``).
    """
    global _probe_result
    if _probe_result is None:
        _probe_result = _probe()
    return _probe_result


def require():
    """Raises ``unittest.SkipTest`` (with the reason) if labs are unavailable."""
    ok, reason = available()
    if not ok:
        raise unittest.SkipTest('network namespaces unavailable: %s' % reason)


def _probe():
    if not hasattr(os, 'geteuid') or os.geteuid() != 0:
        return False, 'not running as root'
    if not os.path.exists(IP):
        return False, 'no "ip" binary (iproute2)'
    remove_stale()
    name = '%s%d-probe' % (NAME_PREFIX, os.getpid())
    steps = [['netns', 'add', name],
             ['-n', name, 'link', 'add', 'br0', 'type', 'bridge'],
             ['-n', name, 'link', 'add', 'p0', 'type', 'veth', 'peer', 'name', 'p1'],
             ['netns', 'exec', name, IP, 'link', 'set', 'lo', 'up']]
    try:
        for step in steps:
            proc = _ip(step, check=False)
            if proc.returncode != 0:
                return False, '"ip %s" failed: %s' % (' '.join(step), proc.stderr.strip())
        _probe_uts(name)
        return True, ''
    except (OSError, subprocess.SubprocessError) as exc:
        return False, 'probe failed: %s' % exc
    finally:
        _delete_netns(name)


def _probe_uts(name):
    """Sets ``_uts_ok`` if a process in ``name`` can get its own host name."""
    global _uts_ok
    if UNSHARE and shutil.which('hostname'):
        proc = _ip(['netns', 'exec', name, UNSHARE, '--uts', '--', 'sh', '-c',
                    'hostname dspy-probe && test "$(hostname)" = dspy-probe'], check=False)
        _uts_ok = proc.returncode == 0


# -- low-level helpers --------------------------------------------------------

def _ip(args, check=True, timeout=CMD_TIMEOUT):
    """Runs ``ip ARGS`` (bounded); raises RuntimeError if ``check`` and it fails."""
    proc = subprocess.run([IP] + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError('"ip %s" failed (%s): %s'
                           % (' '.join(args), proc.returncode, proc.stderr.strip()))
    return proc


def list_netns():
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip(['netns', 'list']).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_inode(name):
    try:
        return os.stat(os.path.join(NETNS_RUN_DIR, name)).st_ino
    except OSError:
        return None


def _delete_netns(name):
    """Kills whatever still runs inside namespace ``name``, then deletes it."""
    inode = _netns_inode(name)
    if inode is not None:
        _kill_pids(_pids_in_netns({inode}), grace=2.0)
    try:
        _ip(['netns', 'del', name], check=False)
    except (OSError, subprocess.SubprocessError):
        pass
    shutil.rmtree(os.path.join(NETNS_ETC_DIR, name), ignore_errors=True)


def remove_stale():
    """Deletes ``dspy<pid>-*`` namespaces (and lab folders) whose creating
    process is gone: what a test run killed with SIGKILL left behind."""
    try:
        names = list_netns()
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return
    for name in names:
        match = re.match(r'^%s(\d+)-' % NAME_PREFIX, name)
        if match and not _pid_alive(int(match.group(1))):
            _delete_netns(name)
    _remove_empty_etc_netns()
    _remove_stale_folders()


def _remove_stale_folders():
    """Removes lab folders (log files) of test processes that are gone."""
    tmp = tempfile.gettempdir()
    for entry in os.listdir(tmp):
        match = re.match(r'^%s(\d+)-' % re.escape(TMP_PREFIX), entry)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)


def _remove_empty_etc_netns():
    try:
        os.rmdir(NETNS_ETC_DIR)             # only succeeds when empty
    except OSError:
        pass


# -- processes ------------------------------------------------------------------

def _pid_alive(pid):
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ('Z', 'X')


def _proc_table():
    """``{pid: ppid}`` of every process, from /proc."""
    table = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as f:
                table[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid):
    """PIDs of all live descendants of ``pid``."""
    children = {}
    for child, parent in _proc_table().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo and len(found) < 100000:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pids_in_netns(inodes):
    """PIDs of processes whose network namespace inode is in ``inodes``
    (never those sharing this process's own namespace, as a safety net)."""
    inodes = set(inodes) - {os.stat('/proc/self/ns/net').st_ino}
    pids = []
    if not inodes:
        return pids
    for pid in _proc_table():
        try:
            link = os.readlink('/proc/%d/ns/net' % pid)
        except OSError:
            continue
        match = re.match(r'net:\[(\d+)\]', link)
        if match and int(match.group(1)) in inodes and pid != os.getpid():
            pids.append(pid)
    return pids


def _signal(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _kill_pids(pids, grace=5.0):
    """SIGTERM ``pids``, wait up to ``grace`` seconds, then SIGKILL survivors."""
    pids = [pid for pid in pids if pid != os.getpid()]
    if not pids:
        return
    _signal(pids, signal.SIGCONT)
    _signal(pids, signal.SIGTERM)
    _wait_dead(pids, grace)
    _signal([pid for pid in pids if _pid_alive(pid)], signal.SIGKILL)
    _wait_dead(pids, 2.0)


def _wait_dead(pids, timeout):
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


class LabProcess:
    """A process started by ``NetLab.spawn``; its stdout and stderr go to files.

    Attributes: ``host`` (lab host name), ``popen`` (the ``subprocess.Popen``),
    ``pid``, ``stdout_path``, ``stderr_path``.
    """

    def __init__(self, lab, host, popen, stdout_path, stderr_path):
        self.lab = lab
        self.host = host
        self.popen = popen
        self.pid = popen.pid
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path

    def poll(self):
        return self.popen.poll()

    def wait(self, timeout):
        return self.popen.wait(timeout)

    @property
    def returncode(self):
        return self.popen.returncode

    def stdout(self):
        return _read_text(self.stdout_path)

    def stderr(self):
        return _read_text(self.stderr_path)

    def output(self):
        """Both streams, labelled, for error messages."""
        return '--- %s pid %s stdout:\n%s\n--- stderr:\n%s' % (
            self.host, self.pid, self.stdout(), self.stderr())

    def wait_for(self, pattern, timeout=20.0, interval=0.05, stream='stdout'):
        """Waits (bounded) until ``pattern`` appears in ``stream`` ('stdout',
        'stderr' or 'both'); returns the match.

        Raises RuntimeError, with the process output, if the process exits or
        ``timeout`` passes first.
        """
        regex = re.compile(pattern)
        read = {'stdout': self.stdout, 'stderr': self.stderr,
                'both': lambda: self.stdout() + self.stderr()}[stream]
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(read())
            if match:
                return match
            if self.poll() is not None:
                raise RuntimeError('process exited (%s) before printing %r\n%s'
                                   % (self.returncode, pattern, self.output()))
            if time.monotonic() >= deadline:
                raise RuntimeError('no %r within %ss\n%s' % (pattern, timeout, self.output()))
            time.sleep(interval)

    def stop(self, grace=5.0):
        """SIGTERM, then SIGKILL, to the process and its descendants."""
        self.lab.stop(self.popen, grace)


def _read_text(path):
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return ''


# -- the lab ----------------------------------------------------------------------

class NetLab:
    """A virtual LAN of network namespaces (see the module docstring).

    ``hosts``: host names (letters, digits, '-'), in address order: the first
    gets ``.1``.  ``hostnames``: give processes their lab host name and an
    ``/etc/hosts`` of the lab (needs ``unshare`` and ``hostname``; silently
    off without them: check ``lab.hostnames``).
    ``default_route``: add the black-hole default route (see above).
    """

    def __init__(self, hosts, hostnames=True, default_route=True):
        self._check_hosts(hosts)
        ok, reason = available()
        if not ok:
            raise RuntimeError('cannot build a NetLab: %s' % reason)
        seq = next(_lab_counter)
        self.prefix = '%s%d-%d-' % (NAME_PREFIX, os.getpid(), seq)
        self.subnet_octet = 1 + (os.getpid() + seq) % 250
        self.subnet = '10.213.%d.0/24' % self.subnet_octet
        self.hosts = list(hosts)
        self.hostnames = bool(hostnames and _uts_ok)
        self.default_route = default_route
        self.switch = self.prefix + 'sw'
        self.dir = tempfile.mkdtemp(prefix='%s%d-' % (TMP_PREFIX, os.getpid()))
        self._procs = []
        self._namespaces = []
        self._down = set()
        self._closed = False
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_hosts(hosts):
        if not hosts or len(hosts) > MAX_HOSTS:
            raise ValueError('need 1..%d hosts' % MAX_HOSTS)
        if len(set(hosts)) != len(hosts):
            raise ValueError('duplicate host names: %r' % (hosts,))
        for host in hosts:
            if not HOST_NAME_RE.match(host):
                raise ValueError('bad host name %r' % (host,))

    # -- names and addresses --------------------------------------------------
    def namespace(self, host):
        """Name of the network namespace of ``host``."""
        self._index(host)
        return self.prefix + 'h-' + host

    def ip(self, host):
        """Lab IPv4 address of ``host``, e.g. '10.213.7.2'."""
        return '10.213.%d.%d' % (self.subnet_octet, self._index(host) + 1)

    def broadcast(self, host=None):
        """Broadcast address of the lab subnet (the same for every host)."""
        if host is not None:
            self._index(host)
        return '10.213.%d.255' % self.subnet_octet

    def gateway(self, host=None):
        """The (unassigned) default-route target."""
        return '10.213.%d.%d' % (self.subnet_octet, GATEWAY_OCTET)

    def _index(self, host):
        try:
            return self.hosts.index(host)
        except ValueError:
            raise KeyError('no lab host %r (hosts: %s)' % (host, ', '.join(self.hosts)))

    def _port(self, host):
        return 'p%d' % self._index(host)

    # -- building ---------------------------------------------------------------
    def _add_netns(self, name):
        _ip(['netns', 'add', name])
        self._namespaces.append(name)

    def _build(self):
        self._add_netns(self.switch)
        _ip(['-n', self.switch, 'link', 'add', 'br0', 'type', 'bridge'])
        _ip(['-n', self.switch, 'link', 'set', 'br0', 'up'])
        for host in self.hosts:
            self._add_host(host)

    def _add_host(self, host):
        ns, port = self.namespace(host), self._port(host)
        self._add_netns(ns)
        if self.hostnames:
            self._write_etc(ns)
        # Both veth ends are born in their namespaces: never in the root one.
        _ip(['-n', self.switch, 'link', 'add', port, 'type', 'veth',
             'peer', 'name', 'eth0', 'netns', ns])
        _ip(['-n', self.switch, 'link', 'set', port, 'master', 'br0'])
        _ip(['-n', self.switch, 'link', 'set', port, 'up'])
        _ip(['-n', ns, 'link', 'set', 'lo', 'up'])
        _ip(['-n', ns, 'addr', 'add', self.ip(host) + '/24', 'brd', '+', 'dev', 'eth0'])
        _ip(['-n', ns, 'link', 'set', 'eth0', 'up'])
        if self.default_route:
            _ip(['-n', ns, 'route', 'add', 'default', 'via', self.gateway(host), 'dev',
                 'eth0'])

    def _write_etc(self, ns):
        """Per-namespace /etc/hosts and resolv.conf (bind-mounted by ip netns exec)."""
        path = os.path.join(NETNS_ETC_DIR, ns)
        os.makedirs(path, exist_ok=True)
        lines = ['127.0.0.1\tlocalhost', '::1\tlocalhost ip6-localhost ip6-loopback']
        lines += ['%s\t%s' % (self.ip(h), h) for h in self.hosts]
        with open(os.path.join(path, 'hosts'), 'w') as f:
            f.write('\n'.join(lines) + '\n')
        with open(os.path.join(path, 'resolv.conf'), 'w') as f:
            f.write('# dispy test lab: no DNS server is reachable from here\n'
                    'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n')

    # -- links ------------------------------------------------------------------
    def link_down(self, host):
        """Unplugs ``host`` from the switch: its eth0 loses carrier and every
        packet to or from it is silently dropped (a network partition)."""
        _ip(['-n', self.switch, 'link', 'set', self._port(host), 'down'])
        self._down.add(host)

    def link_up(self, host):
        """Plugs ``host`` back in (the bridge forwards at once: STP is off)."""
        _ip(['-n', self.switch, 'link', 'set', self._port(host), 'up'])
        self._down.discard(host)

    # -- processes ----------------------------------------------------------------
    def command(self, host, argv):
        """The full argv that runs ``argv`` inside ``host``'s namespaces."""
        argv = [str(arg) for arg in argv]
        cmd = [IP, 'netns', 'exec', self.namespace(host)]
        if self.hostnames:
            # New UTS namespace, set its host name, then exec the program.
            cmd += [UNSHARE, '--uts', '--', 'sh', '-c',
                    'hostname "$0" && exec "$@"', host]
        return cmd + argv

    def popen(self, host, argv, **kwargs):
        """``subprocess.Popen`` of ``argv`` inside ``host``; tracked and killed
        by ``close()``.  Defaults: stdin=DEVNULL, start_new_session=True."""
        if self._closed:
            raise RuntimeError('lab is closed')
        kwargs.setdefault('stdin', subprocess.DEVNULL)
        kwargs.setdefault('start_new_session', True)
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def spawn(self, host, argv, env=None, cwd=None):
        """Starts ``argv`` in ``host`` in the background, with stdout and stderr
        written to files in the lab's folder; returns a ``LabProcess``."""
        base = os.path.join(self.dir, '%s-%d' % (host, len(self._procs)))
        with open(base + '.out', 'wb') as out, open(base + '.err', 'wb') as err:
            proc = self.popen(host, argv, stdout=out, stderr=err, env=env, cwd=cwd)
        return LabProcess(self, host, proc, base + '.out', base + '.err')

    def run(self, host, argv, timeout=60.0, **kwargs):
        """Runs ``argv`` in ``host`` to completion; returns a CompletedProcess
        (text output captured by default).  On timeout the process and its
        descendants are killed and ``subprocess.TimeoutExpired`` is raised."""
        kwargs.setdefault('stdout', subprocess.PIPE)
        kwargs.setdefault('stderr', subprocess.PIPE)
        kwargs.setdefault('text', True)
        proc = self.popen(host, argv, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.stop(proc, grace=1.0)
            exc.stdout, exc.stderr = _drain(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def stop(self, proc, grace=5.0):
        """SIGTERM, then SIGKILL after ``grace`` s, to ``proc`` and descendants.

        Descendants are looked up only while ``proc`` is alive (once reaped,
        its PID may belong to someone else); orphans left inside the lab are
        killed by ``close()``, which sweeps the lab's namespaces.
        """
        _kill_pids(_tree([proc]), grace)
        _reap([proc])

    # -- teardown -----------------------------------------------------------------
    def close(self):
        """Kills every process of the lab and deletes its namespaces.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        _kill_pids(_tree(self._procs), grace=3.0)
        _reap(self._procs)
        inodes = {_netns_inode(ns) for ns in self._namespaces} - {None}
        _kill_pids(_pids_in_netns(inodes), grace=2.0)
        for ns in reversed(self._namespaces):
            _delete_netns(ns)
        _remove_empty_etc_netns()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def leftovers(self):
        """Namespaces with this lab's prefix that still exist (for checks)."""
        return [name for name in list_netns() if name.startswith(self.prefix)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return '<NetLab %s %s hosts=%s>' % (self.prefix, self.subnet, self.hosts)


class RoutedLab(NetLab):
    """Several LANs of the lab kind joined by a router namespace that forwards
    unicast between them and, as every router, no broadcast::

        lan 0: 10.213.N.0/24 ── switch ─┐                ┌─ switch ── lan 1: 10.214.N.0/24
          hosts .1, .2, ...             └── <prefix>rt ──┘     hosts .1, .2, ...
                                        .254 on each LAN, ip_forward on

    ``lans``: a list of host-name lists, one per LAN (at most 8 LANs).  Every host's
    default route is its LAN's .254, so the router's address is the gateway and the
    other LANs are reachable; nothing in the root namespace changes (forwarding is
    turned on inside the router's namespace only).
    """

    def __init__(self, lans, hostnames=True):
        if not lans or len(lans) > 8:
            raise ValueError('need 1..8 LANs')
        self.lan_of = {host: k for k, hosts in enumerate(lans) for host in hosts}
        self.lans = [list(hosts) for hosts in lans]
        super().__init__([host for hosts in lans for host in hosts], hostnames,
                         default_route=True)

    def lan(self, host):
        return self.lan_of[self._check(host)]

    def _check(self, host):
        if host not in self.lan_of:
            raise KeyError('no lab host %r (hosts: %s)' % (host, ', '.join(self.hosts)))
        return host

    def subnet_of(self, lan):
        return '10.%d.%d.0/24' % (213 + lan, self.subnet_octet)

    def ip(self, host):
        lan = self.lan(host)
        return '10.%d.%d.%d' % (213 + lan, self.subnet_octet, self.lans[lan].index(host) + 1)

    def broadcast(self, host=None):
        lan = self.lan(host) if host is not None else 0
        return '10.%d.%d.255' % (213 + lan, self.subnet_octet)

    def gateway(self, host=None):
        """The router's address on ``host``'s LAN (the first LAN's without one)."""
        lan = self.lan(host) if host is not None else 0
        return '10.%d.%d.%d' % (213 + lan, self.subnet_octet, GATEWAY_OCTET)

    def _switch(self, host):
        return '%ssw%d' % (self.prefix, self.lan(host))

    def _port(self, host):
        return 'p%d' % self.lans[self.lan(host)].index(host)

    def _build(self):
        router = self.router = self.prefix + 'rt'
        self._add_netns(router)
        _ip(['-n', router, 'link', 'set', 'lo', 'up'])
        for lan, hosts in enumerate(self.lans):
            switch = '%ssw%d' % (self.prefix, lan)
            self._add_netns(switch)
            _ip(['-n', switch, 'link', 'add', 'br0', 'type', 'bridge'])
            _ip(['-n', switch, 'link', 'set', 'br0', 'up'])
            leg = 'eth%d' % lan      # the router's leg on this LAN
            _ip(['-n', switch, 'link', 'add', 'rt', 'type', 'veth', 'peer', 'name', leg,
                 'netns', router])
            _ip(['-n', switch, 'link', 'set', 'rt', 'master', 'br0'])
            _ip(['-n', switch, 'link', 'set', 'rt', 'up'])
            _ip(['-n', router, 'addr', 'add', '10.%d.%d.%d/24' % (
                213 + lan, self.subnet_octet, GATEWAY_OCTET), 'brd', '+', 'dev', leg])
            _ip(['-n', router, 'link', 'set', leg, 'up'])
            for host in hosts:
                self._add_host(host)
        # forwarding in the router's own namespace (a per-namespace setting)
        subprocess.run([IP, 'netns', 'exec', router, 'sysctl', '-qw',
                        'net.ipv4.ip_forward=1'], check=True, timeout=CMD_TIMEOUT,
                       capture_output=True)

    def _add_host(self, host):
        self.switch = self._switch(host)    # NetLab's plumbing, on this host's LAN
        super()._add_host(host)

    def link_down(self, host):
        _ip(['-n', self._switch(host), 'link', 'set', self._port(host), 'down'])
        self._down.add(host)

    def link_up(self, host):
        _ip(['-n', self._switch(host), 'link', 'set', self._port(host), 'up'])
        self._down.discard(host)

    def __repr__(self):
        return '<RoutedLab %s lans=%s>' % (self.prefix, self.lans)


def _tree(procs):
    """PIDs of the live processes among ``procs`` and of their descendants."""
    pids = []
    for proc in procs:
        if proc.poll() is None:
            pids += [proc.pid] + descendants(proc.pid)
    return pids


def _reap(procs):
    for proc in procs:
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass


def _drain(proc):
    """Whatever output a killed ``proc`` left in its pipes (bounded)."""
    try:
        return proc.communicate(timeout=2.0)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None, None
