"""The progress bar: its text, and its MFU against the FLOP formula written out by hand."""

import io

import pytest

from horizon.flops import flops_per_token
from horizon.metrics import MemoryReport
from horizon.progress import ProgressBar, format_duration, format_postfix
import horizon
from helpers import batches, tiny_decoder

GIB = 2**30


def memory(ssd_bytes=0):
    return MemoryReport(device_peak_bytes=3 * GIB // 2, host_bytes=12 * GIB, host_bytes_by_role={}, slot_bytes=1,
                        num_slots=2, ssd_bytes_by_role={"master": ssd_bytes} if ssd_bytes else {})


def test_postfix_and_durations():
    assert format_postfix(loss=2.34567, tokens_per_s=12345.6, mfu=0.4123, memory=memory(), rss_bytes=13 * GIB,
                          eta_s=65) == \
        "loss 2.346 | 12,346 tok/s | MFU 41.2% | host 12.00 GiB (RSS 13.00 GiB) | dev 1.50 GiB | ETA 1m05s"
    assert format_postfix(loss=1.0, tokens_per_s=10, mfu=None, memory=memory(ssd_bytes=2 * GIB), rss_bytes=2**20,
                          eta_s=3725) == \
        "loss 1.000 | 10 tok/s | host 12.00 GiB (RSS 1.0 MiB) | dev 1.50 GiB | ssd 2.00 GiB | ETA 1h02m05s"
    assert [format_duration(s) for s in (0, 7.4, 60, float("inf"))] == ["0s", "7s", "1m00s", "?"]


def test_mfu_is_the_formula_over_the_peak():
    model = tiny_decoder()  # dim 64, 2 layers, 4 heads / 2 kv heads (head 16), ffn 128, vocab 256, untied
    per_block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    seq = 16
    expected_fpt = 6 * (2 * per_block + 256 * 64) + 6 * 2 * seq * 64
    assert flops_per_token(model, seq) == expected_fpt
    out = io.StringIO()
    bar = ProgressBar(3, flops_per_token=flops_per_token(model, seq), peak_flops=1e9, file=out)
    with horizon.Trainer(model, horizon.TrainConfig(), callbacks=[bar]) as trainer:
        returned = [trainer.step(b) for b in batches(3, seq=seq)]
        trainer.evaluate(batches(1, seq=seq))
    bar.close()
    tokens, seconds = sum(m.tokens for m in returned), sum(m.seconds for m in returned)
    assert bar.mfu == pytest.approx(tokens / seconds * expected_fpt / 1e9, rel=1e-12)
    text = out.getvalue()
    assert "3/3" in text and f"MFU {100 * bar.mfu:.1f}%" in text and "ETA 0s" in text
    assert "step 3: eval loss" in text


def test_only_rank_0_draws_and_bad_arguments():
    out = io.StringIO()
    bar = ProgressBar(2, rank=1, file=out)
    with horizon.Trainer(tiny_decoder(), horizon.TrainConfig(), callbacks=[bar]) as trainer:
        trainer.step(batches(1)[0])
        trainer.evaluate(batches(1))
    bar.close()
    assert out.getvalue() == "" and bar.mfu is None
    with pytest.raises(ValueError, match="total_steps"):
        ProgressBar(0)
    with pytest.raises(ValueError, match="peak_flops"):
        ProgressBar(1, peak_flops=0.0)
