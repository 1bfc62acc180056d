"""dispy's test suite: ``python -m unittest discover -s tests -t .``

Every test runs under a watchdog: if one takes longer than its class's ``timeout``
attribute (default ``DEFAULT_TEST_TIMEOUT`` seconds), ``faulthandler`` prints every
thread's stack and ends the run, so a hang fails loudly instead of stalling CI.
"""

import faulthandler
import sys
import unittest

DEFAULT_TEST_TIMEOUT = 120

_original_run = unittest.TestCase.run


def _run_with_watchdog(self, result=None):
    timeout = getattr(self, 'timeout', DEFAULT_TEST_TIMEOUT)
    faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)
    try:
        return _original_run(self, result)
    finally:
        faulthandler.cancel_dump_traceback_later()


unittest.TestCase.run = _run_with_watchdog
