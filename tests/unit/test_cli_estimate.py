"""``horizon estimate``: the numbers of ``estimate_memory``, budgets, shortfalls and its error handling."""

import json

import pytest
import torch

import horizon
from horizon.cli.estimate import parse_bytes
from horizon.cli.main import build_parser, main
from horizon.estimate import estimate_memory
from horizon.models import Decoder, decoder_config


def _json(capsys, argv):
    rc = main(argv + ["--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_json_report_holds_the_estimate_of_the_preset(capsys):
    rc, r = _json(capsys, ["estimate", "--model", "1b", "--seq-len", "2048", "--batch-size", "2"])
    with torch.device("meta"):
        model = Decoder(decoder_config("1b"))
    want = estimate_memory(model, horizon.TrainConfig(device="cuda"), batch_size=2, seq_len=2048)
    assert rc == 0 and r["budget"] is None and r["fits"] is None
    assert r["host_bytes_by_role"] == want.host_bytes_by_role and r["host_bytes"] == want.host_bytes
    assert r["device_peak_bytes"] == want.device_peak_bytes and r["pinned_bytes"] == want.pinned_bytes
    assert r["num_params"] == 1_100_048_384 and set(r["derivation"]) >= {"host store", "device peak"}


def test_a_short_budget_exits_1_with_the_shortfall_and_the_largest_depth_that_fits(capsys):
    rc, r = _json(capsys, ["estimate", "--model", "1b", "--seq-len", "1024", "--host-ram", "8GiB",
                           "--gpu-mem", "80GB"])
    assert rc == 1 and r["fits"] is False and len(r["shortfalls"]) == 1 and r["shortfalls"][0].startswith("RAM")
    depth = r["largest"]["num_layers"]
    assert 0 < depth < 22

    def host(num_layers):
        with torch.device("meta"):
            model = Decoder(decoder_config("1b", num_layers=num_layers))
        return estimate_memory(model, horizon.TrainConfig(device="cuda"), batch_size=1, seq_len=1024).host_bytes

    assert host(depth) <= 8 * 2**30 < host(depth + 1)  # brute force on both sides of the answer


def test_a_hugging_face_config_json(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128)
    config.save_pretrained(tmp_path)
    rc, r = _json(capsys, ["estimate", "--model", str(tmp_path / "config.json"), "--seq-len", "16",
                           "--device", "cpu", "--host-ram", "64M"])
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    assert rc == 0 and r["num_params"] == sum(p.numel() for p in model.parameters())
    assert r["largest"]["num_layers"] > 2  # deeper Qwen2 models of this width are built with their layer types


def test_check_compares_with_this_machine(capsys):
    rc, r = _json(capsys, ["estimate", "--model", "70b", "--seq-len", "4096", "--device", "cpu", "--check"])
    assert rc == 1 and r["budget"]["ram_bytes"] > 0 and r["shortfalls"][0].startswith("RAM: needs")
    rc, r = _json(capsys, ["estimate", "--model", "125m", "--seq-len", "16", "--device", "cpu", "--check"])
    assert rc == 0 and r["fits"] is True and r["largest"]["num_layers"] >= 12


def test_table_output_names_every_role(capsys):
    assert main(["estimate", "--model", "125m", "--seq-len", "512", "--gpu-mem", "1G", "--host-ram", "4G"]) == 0
    out = capsys.readouterr().out
    for word in ("master", "exp_avg_sq", "activations", "pinned", "slots", "derived as", "largest of this width"):
        assert word in out


@pytest.mark.parametrize("text,n", [("512", 512), ("64G", 64 << 30), ("1.5GiB", 3 << 29), ("80GB", 80 * 10**9),
                                    ("2T", 2 << 40)])
def test_sizes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("argv", [["estimate", "--model", "1b"], ["estimate", "--model", "1b", "--seq-len", "0"],
                                  ["estimate", "--model", "1b", "--seq-len", "8", "--host-ram", "lots"],
                                  ["estimate", "--model", "1b", "--seq-len", "8", "--slots", "1"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_unknown_model_is_a_one_line_message(capsys):
    assert main(["estimate", "--model", "/no/such/config.json", "--seq-len", "8"]) == 2
    err = capsys.readouterr().err
    assert "neither a preset" in err and len(err.strip().splitlines()) == 1


def test_every_subcommand_has_help_with_units(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: horizon " + name in capsys.readouterr().out
    help_text = commands["estimate"].format_help()
    for unit in ("(tokens)", "(count)", "(bytes;"):
        assert unit in help_text
