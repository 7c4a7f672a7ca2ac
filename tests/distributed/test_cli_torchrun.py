"""`horizon train` under torchrun: both ranks train together, rank 0 alone prints."""

import json

from launch import start_ranks


def test_train_under_two_ranks_prints_once_and_the_loss_goes_down(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    argv = ["-m", "horizon", "train", "--text", path, "--preset", "tiny", "--steps", "30", "--batch-size", "4",
            "--seq-len", "32", "--lr", "3e-3", "--eval-every-steps", "10", "--eval-batches", "1"]
    outs = []
    for rank, proc in enumerate(start_ranks(argv)):
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"rank {rank}:\n{stdout}\n{stderr}"
        outs.append((stdout, stderr))
    rank0, rank1 = outs
    assert rank0[0].strip().splitlines()[-1].startswith("loss went down:")
    assert "eval loss" in rank0[0] + rank0[1]
    assert rank1[0] == ""
    assert "eval loss" not in rank1[1] and "step/s" not in rank1[1] and "it/s" not in rank1[1]


def _train_two_ranks(argv) -> str:
    outs = []
    for rank, proc in enumerate(start_ranks(argv)):
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"rank {rank}:\n{stdout}\n{stderr}"
        outs.append(stdout)
    return outs[0]


def _losses(path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "event" not in r}  # the last record of each step


def _num_step_records(path) -> int:
    return sum("event" not in json.loads(line) for line in path.read_text().splitlines())


def test_resume_under_two_ranks_equals_the_uninterrupted_run(tmp_path):
    """Each rank takes its share of every step's windows; rank 0's checkpoint holds the one cursor both
    restore, so a stopped and resumed two-rank run repeats the uninterrupted one's losses exactly."""
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)

    def argv(name, steps, *extra):
        return ["-m", "horizon", "train", "--text", path, "--preset", "tiny", "--steps", str(steps), "--batch-size",
                "2", "--seq-len", "32", "--lr", "3e-3", "--eval-every-steps", "0", "--eval-batches", "1",
                "--metrics-jsonl", tmp_path / f"{name}.jsonl", "--checkpoint-dir", tmp_path / name,
                "--set", "checkpoint.every_steps=4", "--set", "training.preflight=false", *extra]

    _train_two_ranks(argv("full", 12))
    _train_two_ranks(argv("cut", 5))
    assert "resumed from step 5" in _train_two_ranks(argv("cut", 12, "--resume"))
    want = _losses(tmp_path / "full.jsonl")
    assert sorted(want) == list(range(1, 13)) and _losses(tmp_path / "cut.jsonl") == want
    assert _num_step_records(tmp_path / "full.jsonl") == 12  # rank 0 alone writes the metrics file
