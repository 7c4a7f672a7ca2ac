"""A KEEP step on the CPU device does not fault its activations in again (horizon/engine/cpu_heap.py).

Each case runs in a fresh process: the allocator setting is process-wide and every CPU engine of this
test session has set it already. The control leaves the setting out and returns the freed heap to the
kernel after each step (``malloc_trim``), which is what glibc does on its own whenever its dynamic
thresholds let it: the next step must then fault its activations in, and the count shows it. (With
glibc's defaults alone, how much a step faults depends on where those thresholds have moved: 0-70% of
the kept bytes in session 9's runs, 12-77% before KEEP graphs stopped holding their outputs; too
variable for a control.)
"""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import horizon
    import horizon.engine.engine as engine_module
    from horizon.models import Decoder, decoder_config
    import ctypes
    trim = sys.argv[1] == "trim"
    if trim:
        engine_module.keep_freed_memory_mapped = lambda: False
    torch.manual_seed(0)
    cfg = decoder_config("small", dim=256, num_layers=6, num_heads=8, num_kv_heads=4, vocab_size=1024, ffn_dim=None)
    model = Decoder(cfg)
    trainer = horizon.Trainer(model, horizon.TrainConfig(plan="keep"))
    x = torch.randint(0, 1024, (4, 256))
    for _ in range(6):  # the heap reaches its peak
        trainer.step({"input_ids": x, "labels": x})
    trainer.updater.wait_all()
    trainer.engine.ledger.reset_peak()
    faults = []
    for _ in range(5):
        if trim:
            ctypes.CDLL(None).malloc_trim(0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        trainer.step({"input_ids": x, "labels": x})
        trainer.updater.wait_all()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sorted(faults)[2]  # the median step: now and then the heap's top moves and one step faults more
    kept = trainer.engine.ledger.peak_bytes - trainer.engine.ledger.current_bytes
    print(json.dumps({"faulted_bytes_per_step": faults * resource.getpagesize(), "kept_bytes": kept}))
""")


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _glibc() -> bool:
    from horizon.engine.cpu_heap import keep_freed_memory_mapped

    return keep_freed_memory_mapped()


@pytest.mark.skipif(not _glibc(), reason="the allocator setting is glibc's")
def test_a_keep_step_faults_in_a_small_fraction_of_its_activations():
    on, trimmed = _run("on"), _run("trim")
    assert on["kept_bytes"] > 32 * 2**20, "the model keeps enough activations for the test to mean something"
    # Measured: 4-8 KB a step with the setting (after 6 warm-up steps; after 3, now and then 1-2 MB).
    assert on["faulted_bytes_per_step"] < 0.01 * on["kept_bytes"], on
    # The control: the freed activations handed back, the next step faults them in, and the count shows it.
    assert trimmed["faulted_bytes_per_step"] > 0.5 * trimmed["kept_bytes"], trimmed

