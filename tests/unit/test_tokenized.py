"""Tokenised text: the stream is the tokenizer's own encoding, every window is visited once per epoch,
and a resumed cursor (alone, or through a checkpoint) gives exactly the uninterrupted order."""

import collections
import copy
import random

import pytest
import torch

import horizon
from helpers import tiny_decoder
from horizon.data import TokenizedText

tokenizers = pytest.importorskip("tokenizers")

WORDS = "the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs".split()
TEXTS = [" ".join(random.Random(seed).choices(WORDS, k=n)) + "." for seed, n in ((0, 300), (1, 250))]
VOCAB = 96


@pytest.fixture
def corpus(tmp_path):
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text)
    return paths


@pytest.fixture
def tokenizer_file(tmp_path):
    """A tiny byte-level BPE trained here on the test text: nothing is downloaded."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(TEXTS, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def reference_stream(tokenizer, eos):
    ids = []
    for text in TEXTS:
        ids += tokenizer.encode(text).ids + [eos]
    return torch.tensor(ids)


def test_one_epoch_visits_every_window_of_the_tokenizers_stream_once(corpus, tokenizer_file):
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id("</s>")
    data = TokenizedText(corpus, tokenizer_file, seq_len=16, batch_size=4, seed=3, eos_token_id=eos)
    stream = reference_stream(tok, eos)
    assert torch.equal(data.tokens, stream)
    windows = collections.Counter(tuple(stream[i * 16:i * 16 + 17].tolist()) for i in range((len(stream) - 1) // 16))
    seen = []
    for _ in range(data.batches_per_epoch):
        batch = next(data)
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        seen += [tuple(x.tolist()) + (int(y[-1]),) for x, y in zip(batch["input_ids"], batch["labels"])]
    assert len(seen) == data.batches_per_epoch * 4 and collections.Counter(seen) <= windows  # each at most once
    assert windows.total() - len(seen) < 4  # only the incomplete last batch is dropped
    other = TokenizedText(corpus, tokenizer_file, seq_len=16, batch_size=4, seed=4, eos_token_id=eos)
    assert not torch.equal(next(other)["input_ids"], next(TokenizedText(
        corpus, tokenizer_file, seq_len=16, batch_size=4, seed=3, eos_token_id=eos))["input_ids"])


def test_transformers_tokenizer_folder_and_bytes(corpus, tokenizer_file, tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    data = TokenizedText(corpus, str(tmp_path / "tok"), seq_len=16, batch_size=2)
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    assert torch.equal(data.tokens, reference_stream(tok, tok.token_to_id("</s>")))  # EOS from the tokenizer
    raw = TokenizedText(corpus, seq_len=16, batch_size=2)
    assert torch.equal(raw.tokens, torch.tensor(list("".join(TEXTS).encode())))


def test_resumed_cursor_continues_the_uninterrupted_order(corpus, tokenizer_file):
    make = lambda: TokenizedText(corpus, tokenizer_file, seq_len=16, batch_size=4, seed=1)  # noqa: E731
    straight = make()
    want = [next(straight) for _ in range(2 * straight.batches_per_epoch + 3)]  # crosses two epoch ends
    for cut in (0, 5, straight.batches_per_epoch, straight.batches_per_epoch + 2):
        first = make()
        for _ in range(cut):
            next(first)
        resumed = make()
        resumed.load_state_dict(copy.deepcopy(first.state_dict()))
        for expected in want[cut:]:
            got = next(resumed)
            assert torch.equal(got["input_ids"], expected["input_ids"])


def test_checkpoint_resume_sees_the_same_batches_and_losses(corpus, tmp_path):
    """Through Trainer.register_data: 6 steps straight equal 3 steps, a checkpoint, a new process's resume, 3 more."""
    make = lambda: TokenizedText(corpus, seq_len=16, batch_size=2, seed=7)  # noqa: E731
    config = dict(optimizer=horizon.AdamW(lr=1e-3))
    with horizon.Trainer(tiny_decoder(), horizon.TrainConfig(**config)) as trainer:
        data = make()
        straight = [trainer.step(next(data)).loss for _ in range(6)]
    ckpt = horizon.CheckpointConfig(dir=str(tmp_path / "ckpt"), every_steps=3, final_save=False)
    with horizon.Trainer(tiny_decoder(), horizon.TrainConfig(checkpoint=ckpt, **config)) as trainer:
        data = make()
        trainer.register_data(data)
        first = [trainer.step(next(data)).loss for _ in range(4)]  # the 4th step is lost in the "crash"
    announced = []
    with horizon.Trainer(tiny_decoder(seed=99), horizon.TrainConfig(checkpoint=ckpt, resume=True, **config),
                         callbacks=[Announced(announced)]) as trainer:
        data = make()
        trainer.register_data(data)
        assert trainer.global_step == 3 and data.state_dict()["batch"] == 3
        rest = [trainer.step(next(data)).loss for _ in range(3)]
    assert first[:3] + rest == straight
    assert announced == [6]  # the checkpoint it resumed from is not announced again


class Announced(horizon.Callback):
    def __init__(self, steps):
        self.steps = steps

    def on_checkpoint(self, trainer, step, path):
        self.steps.append(step)


def test_bad_input(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        TokenizedText(corpus, seq_len=0, batch_size=2)
    with pytest.raises(ValueError, match="not files"):
        TokenizedText([tmp_path / "missing.txt"], seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenizedText(corpus, seq_len=4096, batch_size=2)
    with pytest.raises(ValueError, match="neither a tokenizer.json file nor a tokenizer folder"):
        TokenizedText(corpus, str(tmp_path / "nope.json"), seq_len=16, batch_size=2)
    state = TokenizedText(corpus, seq_len=16, batch_size=2).state_dict()
    with pytest.raises(ValueError, match="resume with the same files"):
        TokenizedText(corpus, seq_len=16, batch_size=4).load_state_dict(state)


def test_ranks_split_each_step_of_the_one_rank_order():
    """Two ranks of batch 3 see, step by step, the halves of one rank's batch of 6, across epoch ends,
    and their cursors are the same (the checkpoint saves rank 0's)."""
    tokens = torch.arange(1000) % 251
    whole = TokenizedText.from_tokens(tokens, seq_len=10, batch_size=6, seed=2)
    ranks = [TokenizedText.from_tokens(tokens, seq_len=10, batch_size=3, seed=2, rank=r, num_ranks=2) for r in (0, 1)]
    assert whole.batches_per_epoch == ranks[0].batches_per_epoch == 99 // 6
    for _ in range(2 * whole.batches_per_epoch + 1):
        want = next(whole)
        got = [next(r) for r in ranks]
        for key in ("input_ids", "labels"):
            assert torch.equal(torch.cat([g[key] for g in got]), want[key])
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert {k: v for k, v in ranks[0].state_dict().items() if k not in ("batch_size", "num_ranks")} == \
        {k: v for k, v in whole.state_dict().items() if k not in ("batch_size", "num_ranks")}


def test_from_tokens_equals_the_files_it_came_from(corpus):
    files = TokenizedText(corpus, seq_len=16, batch_size=2, seed=5)
    tokens = TokenizedText.from_tokens(files.tokens.clone(), seq_len=16, batch_size=2, seed=5)
    for _ in range(files.batches_per_epoch + 2):
        assert torch.equal(next(files)["input_ids"], next(tokens)["input_ids"])
    assert files.state_dict() == tokens.state_dict()
    with pytest.raises(ValueError, match="1-D integer tensor"):
        TokenizedText.from_tokens(torch.zeros(100), seq_len=4, batch_size=2)
    with pytest.raises(ValueError, match="rank=2 must be below num_ranks=2"):
        TokenizedText.from_tokens(torch.arange(100), seq_len=4, batch_size=2, rank=2, num_ranks=2)
    with pytest.raises(ValueError, match="fewer than one batch of 2 per rank for 8 rank"):
        TokenizedText.from_tokens(torch.arange(50), seq_len=4, batch_size=2, num_ranks=8)
