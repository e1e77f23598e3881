"""Row-block streams: ordered, with bounded look-ahead, and checked when collected."""
import threading

import numpy as np
import pytest

from vehiclenet.retrieval.blocks import collect, ordered_map


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_ordered_map_keeps_order_and_runs_at_most_workers_ahead(workers):
    started = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        return i * i

    taken = 0
    for value in ordered_map(work, range(40), workers):
        assert value == taken * taken
        taken += 1
        with lock:  # items started but not yet handed over stay within the look-ahead
            assert len(started) <= taken + workers - 1
    assert taken == 40 and sorted(started) == list(range(40))


def test_ordered_map_passes_errors_on():
    def work(i):
        if i == 5:
            raise RuntimeError("block 5 failed")
        return i

    with pytest.raises(RuntimeError, match="block 5"):
        list(ordered_map(work, range(10), 3))


def test_collect_checks_the_blocks():
    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(collect([(2, m[2:]), (0, m[:2])], (4, 3)), m)
    with pytest.raises(ValueError, match="row 3 is missing"):
        collect([(0, m[:3])], (4, 3))
    with pytest.raises(ValueError, match="outside"):
        collect([(3, m[:2])], (4, 3))
