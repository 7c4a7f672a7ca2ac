"""The `horizon` command and its byte-level data."""

import json

import pytest
import torch

from horizon.cli.main import main
from horizon.data.text import load_corpus, sample_batch, split, validation_batches


def test_batches_are_windows_with_labels_shifted_by_one_byte():
    data = torch.arange(200, dtype=torch.uint8)
    b = sample_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert b["input_ids"].shape == b["labels"].shape == (4, 16)
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
    assert torch.equal(b["labels"][:, -1], b["input_ids"][:, -1] + 1)
    train, val = split(data, 0.1, 16)
    assert torch.equal(torch.cat([train, val]), data) and len(val) == 20
    vb = validation_batches(val, 2, 8, 4)
    assert sum(x["input_ids"].shape[0] for x in vb) == min(8, (len(val) - 1) // 8)


def test_corpus_from_a_file_and_from_the_stdlib(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"hello world" * 10)
    data, what = load_corpus(str(path), 50)
    assert bytes(data.tolist()) == (b"hello world" * 10)[:50] and what == str(path)
    stdlib, what = load_corpus("stdlib", 100_000)
    assert len(stdlib) == 100_000 and "stdlib files" in what


def test_train_runs_end_to_end_and_the_loss_goes_down(tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    rc = main(["train", "--text", str(path), "--preset", "tiny", "--steps", "30", "--batch-size", "8",
               "--seq-len", "32", "--lr", "3e-3", "--eval-every-steps", "10", "--eval-batches", "1",
               "--metrics-jsonl", str(tmp_path / "metrics.jsonl")])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert "30/30" in err and " tok/s | host " in err and "(RSS " in err and "ETA 0s" in err  # the bar; no MFU: no known CPU peak
    assert "MFU" not in err and err.count("eval loss") == 4  # before, at steps 10 and 20, after
    line = out.strip().splitlines()[-1]
    assert line.startswith("loss went down:")
    first, last = (float(v) for v in line.split(":")[1].split("(")[0].split("->"))
    held_out = [float(v) for v in line.split("held out")[1].rstrip(")").split("->")]
    assert last < first - 0.5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 31)) and all(r["tokens"] == 8 * 32 for r in steps)
    assert f"{steps[0]['loss']:.2f}" == f"{first:.2f}"
    assert [r["step"] for r in evals] == [0, 10, 20, 30] and len({r["tokens"] for r in evals}) == 1
    assert [f"{evals[0]['loss']:.2f}", f"{evals[-1]['loss']:.2f}"] == [f"{v:.2f}" for v in held_out]


@pytest.mark.parametrize("argv,code", [
    (["train", "--steps", "0"], 2),
    (["train", "--lr", "nan"], 2),
    (["frobnicate"], 2),
])
def test_bad_arguments_exit_with_usage(argv, code):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code


def test_missing_text_file_is_a_message_not_a_traceback(capsys):
    assert main(["train", "--text", "/no/such/file"]) == 2
    assert "is not a file" in capsys.readouterr().err
