#!/usr/bin/env python3
"""dispycos: data broadcast to remote tasks through a channel, live analytics back.

As dispycos_client6.py, but the readings of one sensor go to a ``pycos.Channel``:
the client sends each reading once, to the channel, and every remote task that
subscribed to it gets it.  Each remote task finds the client's channel with
``Channel.locate``, subscribes, says so, and then analyses the stream in its own
way (its own moving-average window and threshold), sending alerts to the client's
``analytics`` task while the data still flows.  A ``None`` reading ends the stream;
each task unsubscribes and sends a summary.
"""

import math
import random

import dispycos as pycos
from dispycos import Computation, Scheduler

CHANNEL = 'sensor_readings'


def analyze(name, window, threshold, channel_name, client, task=None):
    """Runs on a server: subscribes to the client's channel, alerts to ``client``."""
    import collections
    # (a server has the computation's components, not the client's global names)
    channel = yield pycos.Channel.locate(channel_name, client.location, timeout=20)
    if channel is None:
        client.send(('failed', name, 'channel %s not found' % channel_name))
        return -1
    yield channel.subscribe(task)
    client.send(('subscribed', name, str(task.location)))
    recent = collections.deque(maxlen=window)
    count, alerts, above = 0, 0, False
    while True:
        reading = yield task.receive(timeout=60)
        if reading is None:
            break
        seq, value = reading
        count += 1
        recent.append(value)
        if len(recent) < window:
            continue
        average = sum(recent) / window
        if (average > threshold) != above:
            above = not above
            alerts += 1
            client.send(('alert', name, seq, round(average, 3), 'above' if above else 'below'))
    yield channel.unsubscribe(task)
    client.send(('summary', name, count, alerts, str(task.location)))
    return alerts


def expected_alerts(values, window, threshold):
    """The same analysis, done at the client: [(seq, direction), ...]."""
    found, above = [], False
    for seq in range(window - 1, len(values)):
        average = sum(values[seq - window + 1:seq + 1]) / window
        if (average > threshold) != above:
            above = not above
            found.append((seq, 'above' if above else 'below'))
    return found


def analytics(analyses, subscribed, streaming, task=None):
    """The client's task that receives what the remote tasks send."""
    alerts = {name: [] for name in analyses}
    done = set()
    while len(done) < len(analyses):
        msg = yield task.receive(timeout=60)
        if msg is None:
            print('no analytics in time')
            break
        if msg[0] == 'subscribed':
            print('%s subscribed at %s' % (msg[1], msg[2]))
            subscribed.release()
        elif msg[0] == 'alert':
            _, name, seq, average, direction = msg
            alerts[name].append((seq, direction))
            print('alert %s: moving average %.3f went %s at reading %d%s' % (
                name, average, direction, seq,
                ' (while streaming: %d readings sent)' % streaming[0] if streaming[0] >= 0
                else ''))
        elif msg[0] == 'summary':
            _, name, count, nalerts, where = msg
            done.add(name)
            print('summary %s at %s: %d readings, %d alerts' % (name, where, count, nalerts))
        elif msg[0] == 'failed':
            print('%s failed: %s' % (msg[1], msg[2]))
            done.add(msg[1])
            subscribed.release()
    return alerts


def client_proc(computation, nreadings, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    channel = pycos.Channel(CHANNEL)
    # name -> (window, threshold): each remote task analyses the stream its way
    analyses = {'short-70': (5, 70.0), 'long-60': (20, 60.0), 'long-70': (20, 70.0)}
    subscribed = pycos.Semaphore(0)
    streaming = [0]
    collector = pycos.Task(analytics, list(analyses), subscribed, streaming)
    for name, (window, threshold) in sorted(analyses.items()):
        rtask = yield computation.run_async(analyze, name, window, threshold, CHANNEL,
                                               collector)
        if not isinstance(rtask, pycos.Task):
            raise Exception('task %s could not be created: %s' % (name, rtask))
    for _ in analyses:              # every task subscribed before the first reading
        if not (yield subscribed.acquire(timeout=30)):
            collector.terminate()
            raise Exception('remote tasks did not subscribe in time')
    print('%d subscribers' % len(channel.subscribers()))
    values = []
    rng = random.Random(6)
    for seq in range(nreadings):
        value = 55 + 25 * math.sin(seq / 15.0) + rng.uniform(-5, 5)
        values.append(value)
        channel.send((seq, value))              # once, to every subscriber
        streaming[0] = seq + 1
        if seq % 10 == 9:
            yield task.sleep(0.02)
    streaming[0] = -1
    channel.send(None)
    alerts = yield collector.finish()
    for name, (window, threshold) in sorted(analyses.items()):
        want = expected_alerts(values, window, threshold)
        print('%s: %d alerts, %s' % (name, len(alerts[name]), 'as computed here'
                                     if alerts[name] == want else 'MISMATCH: expected %s' % want))
    yield computation.close()
    channel.close()


if __name__ == '__main__':
    import sys
    Scheduler()
    computation = Computation([analyze])
    pycos.Task(client_proc, computation, int(sys.argv[1]) if len(sys.argv) > 1 else 500)
