"""Runs the whole suite: ``python -m tests`` (what .ci/run and the README use).

Discovers every ``tests/test_*.py`` (or the files matching the patterns given:
``python -m tests 'test_dispycos*.py' test_wire.py``), runs them with unittest and ends
with one line ``tests: N passed, N failed, N skipped``; exits non-zero if anything
failed.
"""

import os
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    suite = unittest.TestSuite()
    for pattern in sys.argv[1:] or ['test_*.py']:
        suite.addTests(unittest.defaultTestLoader.discover('tests', pattern=pattern,
                                                           top_level_dir=ROOT))
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print('tests: %d passed, %d failed, %d skipped' % (passed, failed, skipped), flush=True)
    sys.exit(0 if failed == 0 and result.testsRun > 0 else 1)


if __name__ == '__main__':
    main()
