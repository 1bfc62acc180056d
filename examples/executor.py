"""A program written for concurrent.futures.ProcessPoolExecutor, moved to a cluster by
changing one line: the import of ProcessPoolExecutor (kept below as a comment).

``is_prime`` (a helper), ``math`` (a module-level import) and ``CHUNK`` (a module-level
constant) are what ``count_primes`` uses: dispy.ClusterExecutor ships them to the nodes
with it.  Run dispynode.py on the nodes, then:  python examples/executor.py
(without nodes=, the executor finds nodes as JobCluster does; DISPY_NODES and the
other DISPY_* variables point it elsewhere).
"""

import concurrent.futures
import math

# from concurrent.futures import ProcessPoolExecutor
from dispy import ClusterExecutor as ProcessPoolExecutor

CHUNK = 5000                    # numbers per call


def is_prime(n):
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def count_primes(start):
    """How many primes in [start, start + CHUNK)."""
    return start, sum(1 for n in range(start, start + CHUNK) if is_prime(n))


def main():
    starts = [i * CHUNK for i in range(8)]
    with ProcessPoolExecutor(4) as executor:
        futures = [executor.submit(count_primes, start) for start in starts]
        done = sorted(f.result() for f in concurrent.futures.as_completed(futures))
        for start, count in done:
            print('%6d..%6d: %4d primes' % (start, start + CHUNK - 1, count))
        total = sum(count for _, count in executor.map(count_primes, starts, chunksize=3))
    print('total: %d primes below %d' % (total, len(starts) * CHUNK))


if __name__ == '__main__':
    main()
