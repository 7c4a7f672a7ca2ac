"""The TOML run file of ``horizon train``: round trips, overrides, and errors that name the key."""

import pytest

import horizon
from horizon.cli.main import main
from horizon.cli.run_config import (CheckpointSection, DataSection, ModelSection, OptimizerSection, RunConfig,
                                    TrainingSection, load_run_config, parse_override, to_toml)

CUSTOM = RunConfig(model=ModelSection(preset="tiny"),
                   data=DataSection(text='a "quoted" path\\x.txt', max_bytes=1000, seq_len=32, batch_size=3),
                   training=TrainingSection(steps=7, seed=5, eval_every_steps=0, eval_batches=2, device="cpu",
                                            plan="keep", grad_clip_norm=0.0, grad_accum_steps=2, resume=True),
                   optimizer=OptimizerSection(lr=3e-4, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0,
                                              weight_decay_exclude=("norm", r"bias$")),
                   checkpoint=CheckpointSection(dir="ckpt dir", every_steps=5, keep_last=3, keep_every=100,
                                                on_busy="skip", timeout_s=60.0))


@pytest.mark.parametrize("config", [RunConfig(), CUSTOM], ids=["defaults", "custom"])
def test_a_config_round_trips_through_toml(tmp_path, config):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(config))
    assert load_run_config(str(path)) == config


def test_file_then_flags_then_set(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optimizer]\nlr = 1e-2\nbetas = [0.9, 0.9]\n[training]\nsteps = 3\n')
    cfg = load_run_config(str(path), flags={"training.steps": 4, "optimizer.lr": 2e-2},
                          overrides=["optimizer.lr=3e-4", "model.preset=tiny", "optimizer.weight_decay=0"])
    assert (cfg.training.steps, cfg.optimizer.lr, cfg.optimizer.betas) == (4, 3e-4, (0.9, 0.9))
    assert cfg.model.preset == "tiny" and cfg.optimizer.weight_decay == 0.0 and cfg.data == DataSection()


def test_the_trainer_config_it_makes():
    train = CUSTOM.train_config()
    assert train.grad_clip_norm is None and train.plan == "keep" and train.grad_accum_steps == 2
    assert train.optimizer == horizon.AdamW(lr=3e-4, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0,
                                            weight_decay_exclude=("norm", r"bias$"))
    assert RunConfig().train_config().grad_clip_norm == 1.0
    assert train.resume and train.checkpoint == horizon.CheckpointConfig(
        dir="ckpt dir", every_steps=5, keep_last=3, keep_every=100, on_busy="skip", timeout_s=60.0)
    assert RunConfig().train_config().checkpoint is None and not RunConfig().train_config().resume
    only_dir = RunConfig(checkpoint=CheckpointSection(dir="c")).train_config().checkpoint
    assert (only_dir.every_steps, only_dir.keep_every) == (None, None)  # 0 in the file is "off"


@pytest.mark.parametrize("text,message", [
    ("[optimiser]\nlr = 1\n", "unknown key optimiser; RunConfig has checkpoint, data, model, optimizer, training"),
    ("[optimizer]\nlearning_rate = 1\n", "unknown key optimizer.learning_rate; OptimizerSection has betas"),
    ("[data]\nseq_len = \"long\"\n", "data.seq_len must be int, got 'long'"),
    ("[training]\nsteps = true\n", "training.steps must be int, got True"),
    ("[training]\nsteps = 0\n", "training.steps must be positive, got 0"),
    ("[optimizer]\nbetas = [0.9, 1.5]\n", "optimizer: AdamW.betas must be two numbers in [0, 1)"),
    ("[model]\npreset = \"huge\"\n", "model.preset='huge': choose one of"),
    ("model = 3\n", "model must be a table, got 3"),
    ("[data\n", "is not valid TOML"),
    ("[checkpoint]\nevry_steps = 3\n", "unknown key checkpoint.evry_steps; CheckpointSection has dir, every_steps"),
    ("[checkpoint]\nevery_steps = -1\n", "checkpoint.every_steps must be >= 0 (0 = off), got -1"),
    ("[checkpoint]\nevery_steps = 2.5\n", "checkpoint.every_steps must be int, got 2.5"),
    ("[checkpoint]\nkeep_every = -3\n", "checkpoint.keep_every must be >= 0 (0 = off), got -3"),
    ("[checkpoint]\nkeep_last = 1\n", "checkpoint.keep_last must be >= 2, got 1"),
    ("[checkpoint]\non_busy = \"later\"\n", "checkpoint.on_busy='later': use 'wait' or 'skip'"),
    ("[checkpoint]\ntimeout_s = 0\n", "checkpoint.timeout_s must be a positive number of seconds, got 0.0"),
    ("[checkpoint]\ndir = 3\n", "checkpoint.dir must be str, got 3"),
    ("checkpoint = \"ckpt\"\n", "checkpoint must be a table, got 'ckpt'"),
    ("[training]\nresume = 1\n", "training.resume must be bool, got 1"),
    ("[training]\nresume = true\n", "training.resume needs checkpoint.dir"),
])
def test_bad_files_are_errors_that_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_run_config(str(path))
    assert message in str(e.value)


def test_overrides_parse_as_toml_or_strings():
    assert parse_override("optimizer.betas=[0.9, 0.95]") == (["optimizer", "betas"], [0.9, 0.95])
    assert parse_override("data.text=/tmp/x.txt") == (["data", "text"], "/tmp/x.txt")
    for bad in ("optimizer.lr", "=3", "optimizer..lr=3"):
        with pytest.raises(ValueError, match="write section.key=value"):
            parse_override(bad)
    with pytest.raises(ValueError, match="lr is a value, not a section"):
        load_run_config(overrides=["optimizer.lr=1", "optimizer.lr.x=2"])


def test_cli_dump_config_reads_back_and_bad_keys_exit_2(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--set", "optimizer.lr=3e-4", "--dump-config"]) == 0
    path = tmp_path / "run.toml"
    path.write_text(capsys.readouterr().out)
    assert load_run_config(str(path)) == load_run_config(flags={"model.preset": "tiny"},
                                                         overrides=["optimizer.lr=3e-4"])
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(path), "--set", "training.stpes=3"])
    assert e.value.code == 2 and "unknown key training.stpes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "missing.toml")])
    assert "cannot read the config file" in capsys.readouterr().err


def test_cli_dump_config_round_trips_the_checkpoint_section(tmp_path, capsys):
    argv = ["train", "--checkpoint-dir", str(tmp_path / "ck"), "--resume", "--set", "checkpoint.every_steps=10",
            "--set", "checkpoint.keep_every=50", "--set", "checkpoint.on_busy=skip",
            "--set", "checkpoint.recycle_files=false", "--dump-config"]
    assert main(argv) == 0
    dumped = capsys.readouterr().out
    assert "[checkpoint]\n" in dumped and "resume = true\n" in dumped
    path = tmp_path / "run.toml"
    path.write_text(dumped)
    cfg = load_run_config(str(path))
    assert cfg.checkpoint == CheckpointSection(dir=str(tmp_path / "ck"), every_steps=10, keep_every=50, on_busy="skip",
                                               recycle_files=False)
    assert not cfg.checkpoint.checkpoint_config().recycle_files
    assert cfg.training.resume
    # without --resume on the command line, the file's resume = true stands
    assert main(["train", "--config", str(path), "--dump-config"]) == 0 and capsys.readouterr().out == dumped


def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="checkpoint.dir=.* is a file: name a folder"):
        load_run_config(overrides=[f"checkpoint.dir={tmp_path / 'f'}"])


def test_cli_trains_from_a_config_file(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\npreset = "tiny"\n[data]\ntext = "{text}"\nseq_len = 32\nbatch_size = 8\n'
                    '[training]\nsteps = 30\neval_every_steps = 0\neval_batches = 1\n[optimizer]\nlr = 1.0\n')
    assert main(["train", "--config", str(path), "--set", "optimizer.lr=3e-3"]) == 0
    out = capsys.readouterr().out
    assert "30 steps of 8 x 32 tokens" in out and out.strip().splitlines()[-1].startswith("loss went down:")
