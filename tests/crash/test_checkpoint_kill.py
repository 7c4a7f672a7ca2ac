"""kill -9 of a training process at every commit-protocol point and at random instants: the newest
committed checkpoint loads, equals a deterministic replay of its step, and resuming reaches the
uninterrupted run's final state byte for byte."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import horizon
from horizon.checkpoint import PROTOCOL_POINTS
from horizon.checkpoint.commit import committed_steps
from ckpt_helpers import config, data, model, reference_states, states_equal, unit_state

STEPS = 5
NUM_RANDOM_KILLS = 20  # the "20+ random instants"
NUM_UNITS = 4  # embedding, 2 blocks, head: one shard each
CHILD = Path(__file__).with_name("ckpt_child.py")
ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def reference():
    return reference_states(STEPS)


def _child(root, *extra) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, str(CHILD), str(root), str(STEPS), str(torch.get_num_threads()),
                             *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _resume_and_check(root, reference) -> int:
    losses, states = reference
    committed = committed_steps(root)
    newest = committed[-1] if committed else 0
    ckpt = horizon.CheckpointConfig(dir=root, every_steps=1, keep_last=3)
    with horizon.Trainer(model(), config(ckpt, resume=True)) as trainer:
        assert trainer.global_step == newest
        assert states_equal(unit_state(trainer), states[newest])  # exactly the replay of that step
        assert not [n for n in os.listdir(root) if n.startswith(".inflight")]  # leftovers cleaned at start
        rest = [trainer.step(b).loss for b in data(STEPS)[newest:]]
        assert states_equal(unit_state(trainer), states[STEPS])
    assert rest == losses[newest:]
    return newest


# (point, nth): the second checkpoint's middle shard for per-shard points, the second commit otherwise
KILL_POINTS = [(p, NUM_UNITS + 2 if p.startswith("shard") else 2) for p in PROTOCOL_POINTS]


@pytest.mark.parametrize("point, nth", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_kill_at_a_protocol_point_then_resume(tmp_path, reference, point, nth):
    child = _child(tmp_path, point, nth)
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    newest = _resume_and_check(tmp_path, reference)
    before_commit = point in ("shard_written", "shard_synced", "manifest_written", "before_rename")
    assert newest == (1 if before_commit else 2)  # killed while committing step 2: 1 or 2 is the newest


def test_kill_at_random_instants_then_resume(tmp_path, reference):
    rng = random.Random(1234)
    outcomes = []
    for case in range(NUM_RANDOM_KILLS):
        root = tmp_path / f"case{case}"
        child = _child(root)
        started = child.stdout.readline()
        assert started.startswith("started"), child.stderr.read()
        for _ in range(rng.randrange(STEPS)):  # let a random number of steps finish, then a random instant
            child.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=60)
        outcomes.append(_resume_and_check(root, reference))
    assert len(set(outcomes)) >= 3, f"the kills landed at too few steps ({outcomes}): widen the window"
