"""`horizon train` under torchrun: both ranks train together, rank 0 alone prints."""

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
