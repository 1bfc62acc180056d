#!/usr/bin/env python3
"""The external program of dispycos_client5.py: a filter, stdin to stdout.

Each input line holds numbers; for each, one output line with that line's count,
sum, minimum and maximum and the running total so far.  At the end of the input a
last line with the totals.  Output is flushed line by line (a pipe is otherwise
block-buffered: the reader would see nothing until the end).
"""

import sys


def main():
    lines = 0
    total = 0.0
    for text in sys.stdin:
        values = [float(v) for v in text.split()]
        if not values:
            continue
        lines += 1
        total += sum(values)
        sys.stdout.write('line %d: count %d sum %g min %g max %g total %g\n' % (
            lines, len(values), sum(values), min(values), max(values), total))
        sys.stdout.flush()
    sys.stdout.write('end: %d lines, total %g\n' % (lines, total))
    sys.stdout.flush()
    return 0


if __name__ == '__main__':
    sys.exit(main())
