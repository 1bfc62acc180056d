#!/usr/bin/env python3
"""dispycos: files to remote tasks, result files back to the client.

The client writes a few data files, starts one remote task per file and sends each
task its file with ``Pycos().send_file`` (to the task's location: the file lands in
that server's ``dest_path``, under ``dir``), then tells the task by a message.  Each
task checks the file, computes a checksum and a few counts, writes a result file in
its working directory and sends that file back to the client (to the client's
``dest_path``, under ``dir``), then answers with a message naming it.  The client
opens each result where it arrived (``Pycos().dest_path``/dispycos_client4, where
the result files stay) and checks it against its own data.

A component file (``rules.txt`` here) goes to every node with the computation: it is
in the node's folder, the parent of each server's working directory (``../rules.txt``).
"""

import hashlib
import os
import random
import tempfile

import dispycos as pycos
from dispycos import Computation, Scheduler


def compute(client, task=None):
    """Runs on a server: waits for the client's message naming a file sent to this
    server, processes it, sends a result file back."""
    import hashlib, os
    msg = yield task.receive(timeout=60)
    if not isinstance(msg, tuple):
        return 'no file announced: %r' % (msg,)
    name, folder = msg
    # send_file put it under this server's dest_path, in the folder it was given
    path = os.path.join(pycos.Pycos().dest_path, folder, name)
    with open(path, 'rb') as f:
        data = f.read()
    with open(os.path.join('..', 'rules.txt')) as f:    # the component file
        rules = f.read().split()
    words = data.split()
    result_name = os.path.splitext(name)[0] + '.result'
    with open(result_name, 'w') as f:       # in this server's working directory
        f.write('file %s\n' % name)
        f.write('sha1 %s\n' % hashlib.sha1(data).hexdigest())
        f.write('bytes %d\nlines %d\nwords %d\n' % (len(data), data.count(b'\n'), len(words)))
        for rule in rules:
            f.write('count %s %d\n' % (rule, words.count(rule.encode())))
        f.write('upper %s\n' % data.splitlines()[0].decode().upper())
        f.write('server %s\n' % task.location)
    os.remove(path)                         # done with the input
    sent = yield pycos.Pycos().send_file(client.location, result_name, dir=folder,
                                         overwrite=True)
    client.send((name, result_name, sent, str(task.location)))
    return sent


def client_proc(computation, nfiles, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    work = tempfile.mkdtemp(prefix='dispycos_client4-')
    folder = 'dispycos_client4'             # under dest_path, at servers and here
    expected = {}
    for i in range(nfiles):
        name = 'data%d.txt' % i
        lines = ['%s %d' % (' '.join(random.choice(WORDS) for _ in range(8)), n)
                 for n in range(random.randint(20, 60))]
        data = ('\n'.join(lines) + '\n').encode()
        with open(os.path.join(work, name), 'wb') as f:
            f.write(data)
        expected[name] = data
        rtask = yield computation.run(compute, task)
        if not isinstance(rtask, pycos.Task):
            print('task for %s could not be created: %s' % (name, rtask))
            continue
        sent = yield pycos.Pycos().send_file(rtask.location, os.path.join(work, name),
                                             dir=folder, overwrite=True)
        if sent == 0:
            rtask.send((name, folder))
        else:
            print('%s could not be sent to %s' % (name, rtask.location))
            rtask.send(None)
            del expected[name]
    for _ in range(len(expected)):
        msg = yield task.receive(timeout=60)
        if not isinstance(msg, tuple):
            print('no result in time')
            break
        name, result_name, sent, where = msg
        path = os.path.join(pycos.Pycos().dest_path, folder, result_name)
        if sent != 0 or not os.path.isfile(path):
            print('result of %s from %s did not arrive (%s)' % (name, where, sent))
            continue
        with open(path) as f:
            fields = dict(line.split(' ', 1) for line in f.read().splitlines()
                          if not line.startswith('count '))
        data = expected[name]
        ok = (fields['sha1'] == hashlib.sha1(data).hexdigest()
              and int(fields['lines']) == data.count(b'\n') and fields['server'] == where)
        print('result %s from %s: sha1 %s, %s lines, %s words: %s' % (
            name, where, fields['sha1'], fields['lines'], fields['words'],
            'ok' if ok else 'MISMATCH'))
        print('  arrived at %s' % path)
    for name in os.listdir(work):
        os.remove(os.path.join(work, name))
    os.rmdir(work)
    yield computation.close()


WORDS = ['alpha', 'beta', 'gamma', 'delta', 'pycos', 'dispy']


if __name__ == '__main__':
    import sys
    Scheduler()
    # the component file: the words to count, written here for the example
    rules = os.path.join(tempfile.mkdtemp(prefix='dispycos_client4-'), 'rules.txt')
    with open(rules, 'w') as f:
        f.write('alpha pycos dispy\n')
    computation = Computation([compute, rules])
    os.remove(rules)                        # its contents travel with the computation
    os.rmdir(os.path.dirname(rules))
    pycos.Task(client_proc, computation, int(sys.argv[1]) if len(sys.argv) > 1 else 4)
