#!/usr/bin/env python3
"""A small standalone program for dispy to distribute (spec 6.1 / 6.2): it prints its
arguments and exits 0.  python_script.py runs it on the nodes; so can the command line:
    python examples/local_cluster.py dispy.py -a "arg11 arg12" -a arg3 examples/dispy_program.py
(from the repository root).
"""

import socket
import sys

print('%s: dispy_program called with %s' % (socket.gethostname(), sys.argv[1:]))
sys.exit(0)
