"""unet.train: flags, optimizer groups, schedule, checkpoints, exact resume, stops, and DDP on gloo."""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from unet import distributed, train, tuning
from unet.checkpoint import FORMAT_VERSION, Checkpoint, load_checkpoint, load_training_checkpoint, save_checkpoint
from unet.distributed import EpochSampler
from unet.losses import SegmentationLoss
from unet.normalization import subbatch_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_flags(output, *extra):
    """A run of a few seconds: 12 training and 2 validation images of 32 px, 3 batches per epoch, no tuning."""
    return ["--num-images", "12", "--val-fraction", "0.17", "--image-size", "32", "--batch-size", "4",
            "--workers", "0", "--threads", "1", "--epochs", "2", "--lr", "2e-3", "--warmup-steps", "2",
            "--device", "cpu", "--output", str(output), "--tune-trials", "0", *extra]


def params(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def run(flags):
    return train.train(train.parse_args(flags))


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
        (["--lr", "-1"], "argument --lr: expected a positive number, got -1"),
        (["--lr", "nan"], "argument --lr: expected a positive number"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        (["--weight-decay", "x"], "argument --weight-decay: expected a number >= 0, got 'x'"),
        (["--local-attention-levels", "0,a"], "argument --local-attention-levels: expected a comma list"),
        (["--val-fraction", "1.5"], "argument --val-fraction: expected a fraction in (0, 1)"),
        (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
        (["--norm", "layer"], "argument --norm: invalid choice: 'layer'"),
        (["--subbatch-extrapolate"], "argument --subbatch-extrapolate: needs --norm subbatch"),
        (["--norm", "batch", "--subbatch-extrapolate"], "argument --subbatch-extrapolate: needs --norm subbatch"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_default_threads_leave_cores_to_workers_and_other_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train.default_threads(workers=2) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert train.default_threads(workers=1) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train.default_threads(workers=1) == 1 and train.default_threads(workers=0) == 2


def test_flag_parsing_of_levels_and_default_output():
    args = train.parse_args(["--local-attention-levels", "0,2", "--preset", "small"])
    assert args.local_attention_levels == (0, 2)
    assert args.output == os.path.join("runs", "small")
    assert train.parse_args(["--local-attention-levels", "none"]).local_attention_levels == ()


def test_missing_resume_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert train.main(tiny_flags(tmp_path, "--resume", str(tmp_path / "nope.pt"))) == 1
    assert "--resume: no such checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pieces


def test_param_groups_decay_only_weight_tensors():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))
    model.register_parameter("relative_position_bias_table", torch.nn.Parameter(torch.zeros(3, 5, 5)))
    decay, no_decay = train.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    expected_free = [model[0].bias, model[1].weight, model[1].bias, model[2].bias, model.relative_position_bias_table]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected_free}


def test_warmup_cosine_schedule_shape():
    warmup, total = 5, 25
    factor = train.warmup_cosine(warmup, total)
    warm = [factor(s) for s in range(warmup + 1)]
    assert all(a < b for a, b in zip(warm, warm[1:])) and warm[0] > 0
    assert factor(warmup) == pytest.approx(1.0)
    assert factor(warmup + (total - warmup) // 2) == pytest.approx(0.5)
    for step in range(warmup, total + 1):  # the closed form of a cosine anneal to 0
        assert factor(step) == pytest.approx((1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2)
    assert factor(total + 10) == pytest.approx(0.0)


def test_epoch_sampler_shards_cover_every_index_and_resume_from_start():
    shards = [EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(1)
    taken = [list(shard) for shard in shards]
    assert [len(t) for t in taken] == [4, 4, 4]
    assert set(sum(taken, [])) == set(range(10))
    shards[0].set_epoch(1, start=3)
    assert list(shards[0]) == taken[0][3:] and len(shards[0]) == 1
    shards[0].set_epoch(1, start=6)  # past the end: nothing left
    assert list(shards[0]) == [] and len(shards[0]) == 0
    shards[0].set_epoch(2)
    assert list(shards[0]) != taken[0]


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "model_config": {"step": 1}}, path)

    def failing_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "model_config": {"step": 2}}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["model_config"] == {"step": 1} and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_load_checkpoint_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="lacks"):
        load_checkpoint(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- runs


def run_keeping_checkpoints(tmp_path_factory, name, *flags):
    """A run without interruption, every optimizer step's checkpoint kept aside as step<N>.pt."""
    output = tmp_path_factory.mktemp(name)
    kept = tmp_path_factory.mktemp(f"{name}_kept")
    original = train.save_checkpoint

    def save_and_keep(state, path):
        original(state, path)
        if path.name == "last.pt":
            shutil.copy(path, kept / f"step{state['global_step']}.pt")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "save_checkpoint", save_and_keep)
        result = run(tiny_flags(output, "--checkpoint-every", "1", *flags))
    return result, output, kept


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two epochs without interruption, every optimizer step's checkpoint kept aside."""
    return run_keeping_checkpoints(tmp_path_factory, "straight")


def test_straight_run_writes_logs_and_checkpoints(straight_run):
    result, output, _ = straight_run
    assert result.exit_code == 0 and result.global_step == 6 and len(result.losses) == 6
    assert all(math.isfinite(loss) for loss in result.losses)
    state = load_checkpoint(output / "last.pt")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (2, 0, 6)
    assert state["model_config"]["image_size"] == 32 and state["data_config"]["num_synthetic"] == 12
    assert_same_params(state["model"], params(result.model))
    train_rows = (output / "train.csv").read_text().splitlines()
    assert len(train_rows) == 1 + 6 and train_rows[0] == "step,epoch,lr,loss"
    assert [row.split(",")[1] for row in train_rows[1:]] == ["1", "1", "1", "2", "2", "2"]
    assert len((output / "eval.csv").read_text().splitlines()) == 1 + 2
    assert (output / "best.pt").is_file() and any((output / "tb").iterdir())


@pytest.mark.parametrize("resume_step", [3, 4])  # an epoch boundary, and mid-epoch
def test_resume_continues_exactly(straight_run, resume_step, tmp_path):
    result, _, kept = straight_run
    shutil.copy(kept / f"step{resume_step}.pt", tmp_path / "last.pt")
    resumed = run(tiny_flags(tmp_path, "--resume", "auto"))
    assert resumed.global_step == 6
    assert resumed.losses == result.losses[resume_step:]
    assert_same_params(params(resumed.model), params(result.model))
    rows = (tmp_path / "train.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(resume_step + 1, 7))


def test_accumulation_matches_one_large_batch(tmp_path, monkeypatch):
    """Two accumulated batches of 2 give the gradients and loss of one batch of 4 (same images, order)."""
    first_grads = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        first_grads.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    common = ["--no-augment", "--epochs", "1", "--clip-grad", "0", "--eval-every", "0"]
    big = run(tiny_flags(tmp_path / "big", *common))
    accumulated = run(tiny_flags(tmp_path / "acc", *common, "--batch-size", "2", "--accum-steps", "2"))
    assert accumulated.global_step == big.global_step == 3
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-5)
    big_grads, accumulated_grads = first_grads[0], first_grads[3]
    for a, b in zip(accumulated_grads, big_grads):  # float32 sums in another order: compare norms
        assert torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(b) + 1e-9


def _loss_patched(monkeypatch, at_call, action):
    """Make SegmentationLoss.forward run `action(loss)` on its `at_call`-th call."""
    original = SegmentationLoss.forward
    calls = []

    def forward(self, *args):
        loss, parts = original(self, *args)
        calls.append(1)
        return (action(loss), parts) if len(calls) == at_call else (loss, parts)

    monkeypatch.setattr(SegmentationLoss, "forward", forward)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _loss_patched(monkeypatch, 4, lambda loss: loss * float("nan"))
    assert train.main(tiny_flags(tmp_path, "--checkpoint-every", "2")) == 1
    err = capsys.readouterr().err
    assert "non-finite loss nan at epoch 2, after step 3" in err and "last good checkpoint" in err
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 3  # the epoch-end save, not the broken step


def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_same(straight_run, tmp_path, monkeypatch):
    handler = signal.getsignal(signal.SIGTERM)
    _loss_patched(monkeypatch, 2, lambda loss: os.kill(os.getpid(), signal.SIGTERM) or loss)
    stopped = run(tiny_flags(tmp_path, "--checkpoint-every", "100"))
    assert stopped.exit_code == 128 + signal.SIGTERM and stopped.global_step == 2
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    monkeypatch.undo()
    resumed = run(tiny_flags(tmp_path, "--resume", "auto"))
    assert_same_params(params(resumed.model), params(straight_run[0].model))


def _terminate_process_group():
    """What `kill -TERM -<pgid>` (a job scheduler, Ctrl-C for SIGINT) does: the data workers get it too."""
    workers = mp.active_children()
    # Sent by another process: torch's workers take a SIGTERM from their parent as a quiet shutdown.
    subprocess.run(["kill", "-TERM", *(str(worker.pid) for worker in workers)], check=True)
    time.sleep(0.5)  # a worker that dies of it has the DataLoader raise in the main process, on SIGCHLD
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_data_workers_still_writes_a_checkpoint(tmp_path, monkeypatch):
    _loss_patched(monkeypatch, 2, lambda loss: _terminate_process_group() or loss)
    stopped = run(tiny_flags(tmp_path, "--workers", "1", "--checkpoint-every", "100"))
    assert stopped.exit_code == 128 + signal.SIGTERM and stopped.global_step == 2
    assert load_checkpoint(tmp_path / "last.pt")["step_in_epoch"] == 2

# ----------------------------------------------------------------------------- sub-batch normalization

# Batches of 2 in accumulation groups of 4: 6 batches per epoch make a step of 4 sub-batches and a short one of 2.
SUBBATCH = ("--norm", "subbatch", "--subbatch-extrapolate", "--batch-size", "2", "--accum-steps", "4")


@pytest.fixture(scope="module")
def subbatch_run(tmp_path_factory):
    return run_keeping_checkpoints(tmp_path_factory, "subbatch", *SUBBATCH)


def test_sub_batch_norm_closes_every_optimizer_step_once(subbatch_run):
    result, output, kept = subbatch_run
    assert result.exit_code == 0 and result.global_step == 4
    layers = subbatch_layers(result.model)
    assert layers and all(layer.extrapolate for _, layer in layers)
    for step in range(1, 5):  # end_step ran before each checkpoint: its step is in the history
        state = load_checkpoint(kept / f"step{step}.pt")["model"]
        assert all(int(state[f"{name}.num_steps_tracked"]) == step for name, _ in layers)
    for _, layer in layers:  # the sub-batches of the last three steps, the short last groups included
        assert layer.history_count.tolist() == [2.0, 4.0, 2.0] and int(layer.pending_count) == 0
    assert_same_state(load_checkpoint(output / "last.pt")["model"], result.model.state_dict())


@pytest.mark.parametrize("resume_step", [1, 2])  # mid-epoch (after the group of 4), and an epoch boundary
def test_sub_batch_norm_resume_is_bitwise_exact(subbatch_run, resume_step, tmp_path):
    result, _, kept = subbatch_run
    shutil.copy(kept / f"step{resume_step}.pt", tmp_path / "last.pt")
    resumed = run(tiny_flags(tmp_path, "--resume", "auto", *SUBBATCH))
    assert resumed.losses == result.losses[resume_step:]
    assert_same_state(resumed.model.state_dict(), result.model.state_dict())  # weights and statistics


@pytest.mark.parametrize("signal_at, steps_done", [(2, 1), (5, 2)])  # a group's second sub-batch; the epoch's last group
def test_sigterm_inside_an_accumulation_group_finishes_the_step_then_resumes_exactly(
        subbatch_run, signal_at, steps_done, tmp_path, monkeypatch):
    """The group under way is finished, stepped, closed (end_step) and saved; the run resumed without
    the sub-batch flags takes them from the checkpoint. A stop at the epoch's last step resumes to
    its evaluation (the sampler has nothing left of that epoch)."""
    _loss_patched(monkeypatch, signal_at, lambda loss: os.kill(os.getpid(), signal.SIGTERM) or loss)
    stopped = run(tiny_flags(tmp_path, *SUBBATCH))
    assert stopped.exit_code == 128 + signal.SIGTERM and stopped.global_step == steps_done
    assert load_checkpoint(tmp_path / "last.pt")["step_in_epoch"] == steps_done
    monkeypatch.undo()
    resumed = run(tiny_flags(tmp_path, "--resume", "auto", "--batch-size", "2", "--accum-steps", "4"))
    assert resumed.model.config.norm == "subbatch" and resumed.model.config.subbatch_extrapolate
    assert resumed.losses == subbatch_run[0].losses[steps_done:]
    assert_same_state(resumed.model.state_dict(), subbatch_run[0].model.state_dict())
    assert len((tmp_path / "eval.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--norm", "group"], "--norm 'group' (the checkpoint has 'subbatch')"),
        (["--norm", "subbatch", "--local-attention-levels", "1"],
         "--local-attention-levels (1,) (the checkpoint has ())"),
    ],
)
def test_resume_with_model_flags_that_contradict_the_checkpoint_is_an_error(subbatch_run, flags, message, tmp_path,
                                                                           capsys):
    shutil.copy(subbatch_run[2] / "step2.pt", tmp_path / "last.pt")
    assert train.main(tiny_flags(tmp_path, "--resume", "auto", *flags)) == 1
    err = capsys.readouterr().err
    assert "--resume continues the checkpoint's model, which the flags contradict" in err and message in err
    assert load_checkpoint(tmp_path / "last.pt")["global_step"] == 2  # untouched


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_m_unet_train_stopped_by_sigterm_at_any_moment_resumes_bitwise_exactly(subbatch_run, tmp_path):
    """The real command line in its own process, stopped wherever the signal finds it after its first step."""
    command = [sys.executable, "-m", "unet.train", *tiny_flags(tmp_path, *SUBBATCH, "--checkpoint-every", "1")]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "last.pt").exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert 1 <= load_checkpoint(tmp_path / "last.pt")["global_step"] < 4
    resume = subprocess.run([*command, "--resume", "auto"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    assert_same_state(load_checkpoint(tmp_path / "last.pt")["model"], subbatch_run[0].model.state_dict())


# ----------------------------------------------------------------------------- the trainer and its checkpoints


def make_trainer(output, *flags):
    """A Trainer and its training loader built as a run builds them (fresh weights from --seed)."""
    args = train.parse_args(tiny_flags(output, *flags))
    info = distributed.setup("cpu")
    data_config = train.data_config_from_args(args)
    model = train.build_run_model(args, None, info.device)
    loader, _ = train.build_loaders(args, data_config, info)
    return train.Trainer(model, args, info, data_config, steps_per_epoch=len(loader)), loader


def one_step(trainer, batch):
    loss, _ = trainer.backward(batch, group_size=1, sync=True)
    trainer.optimizer_step(loss)
    return loss


def assert_same_state(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("norm", ["group", "subbatch"])
def test_trainer_state_round_trips_through_a_checkpoint_file_and_continues_identically(norm, tmp_path):
    trainer, loader = make_trainer(tmp_path, "--no-augment", "--norm", norm)
    first, second = list(loader)[:2]
    one_step(trainer, first)
    state = trainer.state_dict()
    assert state["format_version"] == FORMAT_VERSION
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 1, 1)
    assert len(state["rng"]) == 1 and state["optimizer"]["state"]  # AdamW moments after one step
    save_checkpoint(state, tmp_path / "state.pt")

    restored, _ = make_trainer(tmp_path, "--no-augment", "--norm", norm)  # fresh weights, no optimizer state
    assert not torch.equal(restored.model.label_head.weight, trainer.model.label_head.weight)
    restored.model(first["image"])  # a training-mode forward that no step of the loaded state follows
    restored.load_state_dict(load_training_checkpoint(tmp_path / "state.pt"))
    assert_same_state(restored.state_dict(), state)
    assert one_step(restored, second) == one_step(trainer, second)
    assert_same_state(restored.model.state_dict(), trainer.model.state_dict())


def test_checkpoints_of_the_first_format_still_resume(straight_run, tmp_path):
    """Files written before "format_version" existed hold the same fields."""
    result, _, kept = straight_run
    state = load_checkpoint(kept / "step4.pt")
    del state["format_version"]
    save_checkpoint(state, tmp_path / "last.pt")
    resumed = run(tiny_flags(tmp_path, "--resume", "auto"))
    assert resumed.losses == result.losses[4:]
    assert_same_params(params(resumed.model), params(result.model))


def test_checkpoint_format_errors_name_the_file_and_the_version(tmp_path, capsys):
    model_only = {"model": {}, "model_config": {}}
    save_checkpoint(model_only, tmp_path / "weights.pt")
    assert train.main(tiny_flags(tmp_path, "--resume", str(tmp_path / "weights.pt"))) == 1
    err = capsys.readouterr().err
    assert "weights.pt" in err and "(checkpoint format version 1) lacks ['data_config', 'args'," in err
    save_checkpoint({**model_only, "format_version": FORMAT_VERSION + 1}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=f"future.pt' has checkpoint format version {FORMAT_VERSION + 1}; "
                                         f"this unet reads versions 1 to {FORMAT_VERSION}"):
        load_training_checkpoint(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format version 1"):
        Checkpoint.from_dict(model_only)


# ----------------------------------------------------------------------------- what a run prints

EPOCH_LINE = re.compile(r"epoch (\d)/2: loss \d+\.\d{4}, val mean IoU \d\.\d{4}, pixel accuracy \d\.\d{4}, \d+ s")


def test_a_run_prints_one_line_per_epoch_and_the_table_once_at_the_end(tmp_path, capsys):
    assert train.main(tiny_flags(tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    epoch_lines = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert [EPOCH_LINE.fullmatch(lines[i]).group(1) for i in epoch_lines] == ["1", "2"]
    tables = [i for i, line in enumerate(lines) if line.startswith("label ")]
    assert len(tables) == 1 and tables[0] > epoch_lines[-1]
    assert lines[tables[0] + 2].startswith("background") and lines[tables[0] + 25].startswith("tie")
    assert lines[-2].startswith("final mean IoU") and lines[-1].startswith("wall time")
    assert len(lines) == 1 + 2 + 28 + 2  # header, epochs, table (24 labels, 2 rules, 2 totals), final lines


def test_verbose_prints_the_table_after_every_evaluation(tmp_path, capsys):
    assert train.main(tiny_flags(tmp_path, "--verbose")) == 0
    lines = capsys.readouterr().out.splitlines()
    epoch_lines = [i for i, line in enumerate(lines) if EPOCH_LINE.fullmatch(line)]
    tables = [i for i, line in enumerate(lines) if line.startswith("label ")]
    assert len(epoch_lines) == 2 and len(tables) == 2
    assert tables[0] < epoch_lines[0] < tables[1] < epoch_lines[1]  # each table, then its epoch's line
    assert lines[-2].startswith("final mean IoU")


TUNED_LINE = re.compile(r"post-processing tuned for best\.pt \(3 trials on 1 validation images\): mean IoU on the "
                        r"1 others: argmax \d\.\d{4}, defaults \d\.\d{4}, tuned \d\.\d{4} \(kept: (?:argmax|defaults)\); "
                        r"settings in (.+)")


def test_a_finished_run_tunes_the_post_processing_of_best_pt(tmp_path, capsys):
    assert train.main(tiny_flags(tmp_path, "--epochs", "1", "--tune-trials", "3")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("final mean IoU") and lines[-1].startswith("wall time")
    assert TUNED_LINE.fullmatch(lines[-2]).group(1) == str(tmp_path / "postprocess.json")
    written = json.loads((tmp_path / "postprocess.json").read_text())
    record = written.pop("tuning")
    assert record["checkpoint"] == "best.pt" and record["split"] == "val" and record["data"] == "synthetic"
    assert record["global_step"] == load_checkpoint(tmp_path / "best.pt")["global_step"] == 3
    assert record["trials_scored"] == 3 and record["images"] == {"tuning": 1, "held_out": 1}
    assert written == tuning.sample_configs(3, seed=0)[record["best_trial"]].to_dict()


def test_a_run_with_the_default_tuning_flag_writes_postprocess_json(tmp_path, monkeypatch):
    """Without --tune-trials (the default command's case) a run tunes with 100 trials; in this process
    here, as the pool of a real run would only cost process start-ups on 1 tuning image."""
    flags = tiny_flags(tmp_path, "--epochs", "1")
    del flags[flags.index("--tune-trials") : flags.index("--tune-trials") + 2]
    monkeypatch.setattr(tuning, "default_processes", lambda trials: 0)
    assert train.main(flags) == 0
    record = json.loads((tmp_path / "postprocess.json").read_text())["tuning"]
    assert record["checkpoint"] == "best.pt" and record["trials_scored"] == record["trials_planned"] == 100


def test_a_validation_split_too_small_to_tune_on_is_reported(tmp_path, capsys):
    assert train.main(tiny_flags(tmp_path, "--epochs", "1", "--val-fraction", "0.05", "--tune-trials", "3")) == 0
    assert "post-processing not tuned: holdout: 0.5 of 1 images leaves one part empty" in capsys.readouterr().out
    assert not (tmp_path / "postprocess.json").exists()


def test_without_evaluations_the_epoch_lines_hold_the_loss_only(tmp_path, capsys):
    assert train.main(tiny_flags(tmp_path, "--eval-every", "0")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("epoch ")] == [
        line for line in lines if re.fullmatch(r"epoch \d/2: loss \d+\.\d{4}, \d+ s", line)
    ]
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert sum(line.startswith("label ") for line in lines) == 1  # the final evaluation's table


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, output, results, flags=()):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    broadcast_buffers = []

    class RecordingDDP(train.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            broadcast_buffers.append(kwargs.get("broadcast_buffers", True))
            super().__init__(*args, **kwargs)

    train.DistributedDataParallel = RecordingDDP
    result = run(tiny_flags(output, "--epochs", "1", *flags))
    torch.save({"params": params(result.model), "matrix": result.metrics.matrix, "code": result.exit_code,
                "broadcast_buffers": broadcast_buffers}, results / f"rank{rank}.pt")


def test_a_one_process_torchrun_trains_under_ddp_like_a_plain_run(tmp_path, monkeypatch, capsys):
    """What `torchrun --nproc_per_node 1` does on a one-GPU machine: join the process group, train
    under DDP (gloo here, NCCL on a GPU), and give the losses of a run without torchrun."""
    plain = run(tiny_flags(tmp_path / "plain", "--epochs", "1"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    capsys.readouterr()
    assert train.main(tiny_flags(tmp_path / "torchrun", "--epochs", "1")) == 0
    assert " on cpu x1 (DDP, gloo); " in capsys.readouterr().out
    assert not torch.distributed.is_initialized()  # left as found
    state = load_checkpoint(tmp_path / "torchrun" / "last.pt")
    assert_same_params(state["model"], params(plain.model))


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    output, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), output, results), nprocs=2, join=True)
    ranks = [torch.load(results / f"rank{r}.pt") for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert_same_params(ranks[0]["params"], ranks[1]["params"])
    assert torch.equal(ranks[0]["matrix"], ranks[1]["matrix"])
    # the reduced matrix counts every validation pixel once: 2 images of 32x32
    assert int(ranks[0]["matrix"].sum()) == 2 * 32 * 32
    assert [r["broadcast_buffers"] for r in ranks] == [[True], [True]]
    state = load_checkpoint(output / "last.pt")
    assert_same_params(state["model"], ranks[0]["params"])


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_sub_batch_norm_exchange_statistics_once_per_step(tmp_path):
    """Each rank: 6 images, batches of 2, groups of 2 -> steps of 2 + 2 and 1 + 1 sub-batches."""
    output, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    flags = ("--norm", "subbatch", "--batch-size", "2", "--accum-steps", "2")
    mp.spawn(_ddp_worker, args=(2, _free_port(), output, results, flags), nprocs=2, join=True)
    ranks = [torch.load(results / f"rank{r}.pt") for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert [r["broadcast_buffers"] for r in ranks] == [[False], [False]]  # no synchronization in the forward
    assert_same_state(ranks[0]["params"], ranks[1]["params"])  # weights, and statistics no one broadcast
    counts = [value for name, value in ranks[0]["params"].items() if name.endswith("history_count")]
    assert counts and all(count.tolist() == [2.0, 4.0, 0.0] for count in counts)
    assert_same_state(dict(load_checkpoint(output / "last.pt")["model"]), ranks[0]["params"])
