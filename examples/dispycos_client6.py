#!/usr/bin/env python3
"""dispycos: data streamed to remote tasks, live analytics streamed back.

Two sensors' readings (simulated here) are streamed, one small message per reading,
each sensor to a remote task of its own (``rtask.send``).  Each remote task keeps a
moving average over the last readings and, while the data still flows, sends the
client's ``analytics`` task an alert whenever that average crosses the threshold
(up or down) and a progress report every 100 readings; at the end of its stream
(a ``None`` message) a summary.  The client checks the alerts against the same
computation done locally.
"""

import math
import random

import dispycos as pycos
from dispycos import Computation, Scheduler

WINDOW = 10         # readings in the moving average
THRESHOLD = 70.0    # an alert when the moving average crosses this


def analyze(sensor, window, threshold, client, task=None):
    """Runs on a server: moving average of the readings it receives, alerts to
    ``client`` as they happen."""
    import collections
    recent = collections.deque(maxlen=window)
    count, total, alerts, above = 0, 0.0, 0, False
    while True:
        reading = yield task.receive(timeout=60)
        if reading is None:
            break
        seq, value = reading
        count += 1
        total += value
        recent.append(value)
        if len(recent) < window:
            continue
        average = sum(recent) / window
        if (average > threshold) != above:
            above = not above
            alerts += 1
            client.send(('alert', sensor, seq, round(average, 3), 'above' if above else 'below'))
        if count % 100 == 0:
            client.send(('progress', sensor, seq, round(average, 3)))
    client.send(('summary', sensor, count, round(total / max(count, 1), 3), alerts,
                 str(task.location)))
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


def analytics(sensors, streaming, task=None):
    """The client's task that receives the analytics while data is being sent."""
    alerts = {sensor: [] for sensor in sensors}
    summaries = {}
    while len(summaries) < len(sensors):
        msg = yield task.receive(timeout=60)
        if msg is None:
            print('no analytics in time')
            break
        if msg[0] == 'alert':
            _, sensor, seq, average, direction = msg
            alerts[sensor].append((seq, direction))
            print('alert %s: moving average %.3f went %s %s at reading %d%s' % (
                sensor, average, direction, THRESHOLD, seq,
                ' (while streaming: %d readings sent)' % streaming[0] if streaming[0] >= 0
                else ''))
        elif msg[0] == 'progress':
            _, sensor, seq, average = msg
            print('progress %s: reading %d, moving average %.3f' % (sensor, seq, average))
        elif msg[0] == 'summary':
            _, sensor, count, mean, nalerts, where = msg
            summaries[sensor] = count
            print('summary %s at %s: %d readings, mean %.3f, %d alerts' % (
                sensor, where, count, mean, nalerts))
    return alerts


def client_proc(computation, nreadings, task=None):
    if (yield computation.schedule()):
        raise Exception('the computation could not be scheduled')
    sensors = ['sensor-a', 'sensor-b']
    streaming = [0]             # readings sent so far; -1 once the stream ended
    collector = pycos.Task(analytics, sensors, streaming)
    rtasks = {}
    for sensor in sensors:
        rtask = yield computation.run(analyze, sensor, WINDOW, THRESHOLD, collector)
        if not isinstance(rtask, pycos.Task):
            raise Exception('task for %s could not be created: %s' % (sensor, rtask))
        rtasks[sensor] = rtask
    data = {sensor: [] for sensor in sensors}
    rng = random.Random(6)
    for seq in range(nreadings):
        for n, sensor in enumerate(sensors):
            value = 55 + 25 * math.sin(seq / (15.0 + 7 * n)) + rng.uniform(-5, 5)
            data[sensor].append(value)
            rtasks[sensor].send((seq, value))        # one small message per reading
        streaming[0] = seq + 1
        if seq % 10 == 9:
            yield task.sleep(0.02)                   # readings come at some rate
    streaming[0] = -1
    for rtask in rtasks.values():
        rtask.send(None)                             # end of the stream
    alerts = yield collector.finish()
    for sensor in sensors:
        want = expected_alerts(data[sensor], WINDOW, THRESHOLD)
        print('%s: %d alerts, %s' % (sensor, len(alerts[sensor]),
                                     'as computed here' if alerts[sensor] == want
                                     else 'MISMATCH: expected %s' % want))
    yield computation.close()


if __name__ == '__main__':
    import sys
    Scheduler()
    computation = Computation([analyze])
    pycos.Task(client_proc, computation, int(sys.argv[1]) if len(sys.argv) > 1 else 500)
