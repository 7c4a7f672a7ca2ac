"""`horizon train --resume`: a run stopped at step S (its own final checkpoint) or killed with
SIGKILL mid-run (the last periodic one) and resumed gives the uninterrupted run's per-step losses
bit for bit on CPU, from the same batches: the data cursor in every checkpoint is the uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from horizon.checkpoint.commit import committed_steps, step_dir_name
from horizon.checkpoint.manifest import read_manifest
from horizon.cli.main import main

ROOT = Path(__file__).resolve().parent.parent.parent
TEXT = b"the quick brown fox jumps over the lazy dog. " * 20
STEPS, EVERY, BATCH, SEQ = 30, 3, 4, 32
TRAIN_TOKENS = len(TEXT) - max(int(len(TEXT) * 0.05), SEQ + 1)  # the end (data.eval_fraction) is held out
BATCHES_PER_EPOCH = (TRAIN_TOKENS - 1) // SEQ // BATCH  # 6: the runs cross epoch ends


def _argv(tmp_path: Path, name: str, steps: int, *extra: str) -> list[str]:
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_bytes(TEXT)
    return ["train", "--text", str(text), "--preset", "tiny", "--steps", str(steps), "--batch-size", str(BATCH),
            "--seq-len", str(SEQ), "--lr", "3e-3", "--eval-every-steps", "0", "--eval-batches", "1",
            "--metrics-jsonl", str(tmp_path / f"{name}.jsonl"), "--checkpoint-dir", str(tmp_path / name),
            "--set", f"checkpoint.every_steps={EVERY}", "--set", "checkpoint.keep_last=100",
            "--set", "training.preflight=false", *extra]


def _losses(path: Path) -> dict[int, float]:
    """Step -> loss of the last record of each step (a resumed run repeats the steps after its checkpoint);
    a last line cut short by SIGKILL is left out."""
    losses = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"line {i + 1} of {path} is not JSON: {line!r}"
            continue
        if "event" not in record:
            losses[record["step"]] = record["loss"]
    return losses


def _cursors(root: Path) -> dict[int, dict]:
    return {step: read_manifest(str(root / step_dir_name(step)))["train_state"]["data"]
            for step in committed_steps(str(root))}


def _uninterrupted(tmp_path: Path) -> tuple[dict[int, float], dict[int, dict]]:
    assert main(_argv(tmp_path, "full", STEPS)) == 0
    return _losses(tmp_path / "full.jsonl"), _cursors(tmp_path / "full")


def _check_cursors(cursors: dict[int, dict], want: dict[int, dict]) -> None:
    for step, cursor in cursors.items():
        assert cursor == want[step]
        # one batch per update; at an epoch's end the cursor stays (e, all batches) until the next draw
        assert cursor["epoch"] * BATCHES_PER_EPOCH + cursor["batch"] == step and 0 < cursor["batch"] <= BATCHES_PER_EPOCH


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys):
    want_losses, want_cursors = _uninterrupted(tmp_path)
    assert sorted(want_losses) == list(range(1, STEPS + 1)) and sorted(want_cursors) == list(range(3, STEPS + 1, 3))
    assert main(_argv(tmp_path, "cut", 7)) == 0  # stops at 7: the final checkpoint is step 7
    assert main(_argv(tmp_path, "cut", STEPS)) == 2  # refuses to overwrite without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(_argv(tmp_path, "cut", STEPS, "--resume")) == 0
    assert "resumed from step 7" in capsys.readouterr().out
    losses = _losses(tmp_path / "cut.jsonl")
    assert losses == want_losses  # bitwise: float equality of every step's loss
    cursors = _cursors(tmp_path / "cut")
    assert sorted(cursors) == sorted([*want_cursors, 7])
    _check_cursors(cursors, {**want_cursors, 7: {**want_cursors[6], "epoch": 1, "batch": 1}})
    assert main(_argv(tmp_path, "cut", STEPS, "--resume")) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert main(_argv(tmp_path, "cut", STEPS + 3, "--resume", "--seed", "1")) == 2  # another data order
    assert "resume with the same files, tokenizer, seq_len, batch_size and seed" in capsys.readouterr().err


def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    want_losses, want_cursors = _uninterrupted(tmp_path)
    kill_after = 6
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # the same threads: the same float sums
    child = subprocess.Popen([sys.executable, "-m", "horizon", *_argv(tmp_path, "killed", STEPS)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    metrics = tmp_path / "killed.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(_losses(metrics)) >= kill_after):
        assert child.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    killed_at = max(_losses(metrics))
    assert killed_at < STEPS
    resumed_from = max(committed_steps(str(tmp_path / "killed")))
    assert main(_argv(tmp_path, "killed", STEPS, "--resume")) == 0
    losses = _losses(metrics)
    assert losses == want_losses, f"killed after step {killed_at}, resumed from {resumed_from}"
    _check_cursors(_cursors(tmp_path / "killed"), want_cursors)
