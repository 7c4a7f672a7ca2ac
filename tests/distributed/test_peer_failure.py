"""A rank that dies or hangs mid-step makes the other fail with PeerFailure within the timeout."""

import re
import time
from pathlib import Path

import pytest

from launch import start_ranks

TIMEOUT_S = 4.0


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_the_surviving_rank_exits_nonzero_with_a_clear_message(tmp_path, mode):
    rank0, rank1 = start_ranks([Path(__file__).parent / "dp_child.py", tmp_path, "fail", mode, TIMEOUT_S])
    try:
        # Rank 0 blocks in the third step's gradient all-reduce from the moment rank 1 stops.
        for line in rank0.stdout:
            if line.startswith("step 2 "):
                stalled_at = time.monotonic()
                break
        else:
            pytest.fail(f"rank 0 never finished step 2:\n{rank0.stderr.read()}")
        _, stderr = rank0.communicate(timeout=60)
        waited_s = time.monotonic() - stalled_at
    finally:
        rank1.kill()
        rank1.communicate()
    print(f"{mode}: rank 0 failed {waited_s:.2f} s after its last step")
    assert rank0.returncode != 0
    # A killed peer resets every connection: whichever collective runs next reports it.
    assert re.search(r"PeerFailure: rank 0 of 2: the [a-z -]+ collective failed", stderr), stderr[-3000:]
    assert "DistributedConfig.timeout_s=4 s" in stderr
    assert waited_s < TIMEOUT_S + 10, f"rank 0 took {waited_s:.1f} s to fail"
    if mode == "hang":  # nothing closed a socket: only the timeout can have ended the wait
        assert waited_s >= TIMEOUT_S - 0.5
