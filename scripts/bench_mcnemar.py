"""Time the exact McNemar p-value of `vmoe sweep` (scipy.stats.binomtest) against the exact big-integer sum it
replaced, at growing numbers of disagreeing images (only_a + only_b), and check they agree.

    python scripts/bench_mcnemar.py
"""
from __future__ import annotations

import math
import time

from vmoe.viz.sweep import mcnemar_p_value


def big_integer_p_value(only_a: int, only_b: int) -> float:
    """The former implementation: 2 * sum_{i <= min} C(n, i) / 2^n with Python integers."""
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def main() -> None:
    mcnemar_p_value(1, 2)  # import scipy.stats once, outside the timings
    print(f"{'disagreements':>13} {'binomtest ms':>13} {'big-int sum ms':>15} {'ratio':>8} {'p':>10}")
    for n in (500, 2000, 5000, 20000):
        a, b = int(n * 0.49), n - int(n * 0.49)
        start = time.perf_counter()
        p = mcnemar_p_value(a, b)
        fast = time.perf_counter() - start
        if n <= 2000:  # the old sum grows about cubically (issue 14: 12 s at 5,000, 8 min at 20,000)
            start = time.perf_counter()
            p_old = big_integer_p_value(a, b)
            slow = time.perf_counter() - start
            assert abs(p - p_old) <= 1e-9 * max(p_old, 1e-300) + 1e-12, (p, p_old)
            print(f"{n:>13} {1e3 * fast:>13.2f} {1e3 * slow:>15.1f} {slow / fast:>8.0f} {p:>10.4g}")
        else:
            print(f"{n:>13} {1e3 * fast:>13.2f} {'(not run)':>15} {'-':>8} {p:>10.4g}")


if __name__ == "__main__":
    main()
