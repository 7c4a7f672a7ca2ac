"""``horizon train`` on a Hugging Face model named by its config folder, with a local tokenizer."""

import json

import pytest
import torch
import torch.nn.functional as F

from horizon.cli.main import main
from horizon.cli.run_config import DataSection
from horizon.cli.train_data import load_tokens
from horizon.data.text import split, validation_batches

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs. " * 60


def make_tokenizer(tmp_path):
    """A byte-level BPE trained here on the test text (nothing downloaded), saved as a tokenizer folder."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    folder = tmp_path / "tokenizer"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(folder)
    return folder, tok.get_vocab_size()


def llama(vocab_size):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def run_toml(tmp_path, text, tokenizer, model_dir, weights):
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\nhf_config = "{model_dir}"\nhf_weights = "{model_dir if weights else ""}"\n'
                    f'[data]\ntext = "{text}"\ntokenizer = "{tokenizer}"\nseq_len = 24\nbatch_size = 4\n'
                    f'[training]\nsteps = 12\neval_every_steps = 6\neval_batches = 2\n'
                    f'metrics_jsonl = "{tmp_path / "m.jsonl"}"\n[optimizer]\nlr = 3e-3\n')
    return path


@pytest.mark.parametrize("weights", [False, True], ids=["initialised", "safetensors"])
def test_train_an_hf_llama_with_a_local_tokenizer(tmp_path, capsys, weights):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    tokenizer, vocab = make_tokenizer(tmp_path)
    model = llama(vocab + 4)
    model.save_pretrained(tmp_path / "model")  # config.json + model.safetensors
    rc = main(["train", "--config", str(run_toml(tmp_path, text, tokenizer, tmp_path / "model", weights))])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "llama from" in out and ("weights from" in out) == weights and "12 steps of 4 x 24 tokens" in out
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 6, 12] and evals[-1]["loss"] < evals[0]["loss"]
    if weights:  # the first evaluation is plain PyTorch's loss of the saved model on the same held-out tokens
        tokens, _ = load_tokens(DataSection(text=str(text), tokenizer=str(tokenizer), seq_len=24, batch_size=4))
        held_out = validation_batches(split(tokens, 0.05, 24)[1], 4, 24, 2)
        model.eval()
        with torch.no_grad():
            total = sum(float(F.cross_entropy(model(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten(),
                                              reduction="sum")) for b in held_out)
        assert evals[0]["loss"] == pytest.approx(total / sum(b["labels"].numel() for b in held_out), rel=1e-5)
        assert evals[0]["tokens"] == sum(b["labels"].numel() for b in held_out)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    tokenizer, vocab = make_tokenizer(tmp_path)
    llama(vocab - 10).save_pretrained(tmp_path / "model")
    assert main(["train", "--config", str(run_toml(tmp_path, text, tokenizer, tmp_path / "model", False))]) == 2
    err = capsys.readouterr().err
    assert f"has {vocab} token ids but the model" in err and f"embeds {vocab - 10}" in err


def test_hf_weights_without_a_config_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--set", f"model.hf_weights={tmp_path}"])
    assert e.value.code == 2 and "model.hf_weights needs model.hf_config" in capsys.readouterr().err
