"""What the training commands guarantee about the user's files and runs: never delete what gendistill did not write,
resume moved runs and older checkpoints exactly, never unpickle a checkpoint, refuse what cannot be restored exactly,
skip non-finite gradients, report divergence, and write results and logs so that a crash leaves them readable."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ToyTask
from PIL import Image
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.training.core import Trainer, complete_checkpoints, logged_values
from gendistill.training.recipes import TrainRecipe

# A LeNet-5-half on the MNIST subset, a few steps of batch 8: about a second in-process.
TEACH = ["teach", "classifier", "--arch", "lenet5_half", "--data", "mnist5k", "--batch-size", "8"]
TEACH += ["--eval-every", "0", "--sample-every", "0", "--log-every", "1", "--ema-decay", "0.9"]
TEACH += ["--lr-scheduler", "constant"]  # so that a run to 2 steps resumed to 4 equals a run to 4


def _fails(capsys, argv, *expected) -> str:
    """Run the CLI, expect exit 2 and one line on stderr holding every ``expected`` text; return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for text in expected:
        assert text in err, err
    return err


def _teach(output, *extra) -> int:
    return main([*TEACH, "--output", str(output), *extra])


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. --overwrite deletes only what gendistill wrote ----------------------------------------------------------
def test_overwrite_never_deletes_a_folder_gendistill_did_not_write(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("my thesis")
    before = _tree(thesis)
    argv = [*TEACH, "--output", str(thesis), "--max-steps", "1"]
    err = _fails(capsys, [*argv, "--overwrite"], "holds no gendistill run")
    assert "--overwrite" in err and "pass --overwrite" not in err  # says --overwrite does not apply, never advises it
    assert _tree(thesis) == before
    # Without --overwrite the refusal does not advise --overwrite either.
    err = _fails(capsys, argv, "holds no gendistill run")
    assert "pass --overwrite" not in err


def test_output_may_not_be_or_hold_or_lie_inside_an_input(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert _teach(teacher, "--max-steps", "1", "--arch", "lenet5") == 0
    before = _tree(teacher)
    dfkd = ["dfkd", "--teacher", str(teacher), "--method", "dafl", "--iterations", "1", "--batch-size", "4"]
    _fails(capsys, [*dfkd, "--output", str(teacher), "--overwrite"], "is the input --teacher")
    _fails(capsys, [*dfkd, "--output", str(teacher / "student")], "lies inside the input --teacher")
    _fails(capsys, [*dfkd, "--output", str(tmp_path), "--overwrite"], "contains the input --teacher")
    assert _tree(teacher) == before

    data = tmp_path / "digits"
    (data / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(data / "a" / f"{i}.png")
    before = _tree(data)
    teach = ["teach", "diffusion", "--data", str(data), "--max-steps", "1", "--image-size", "8"]
    _fails(capsys, [*teach, "--output", str(data), "--overwrite"], "is the input --data")
    assert _tree(data) == before


# --- 3. a run is identified by its recipe, not by where it lives --------------------------------------------------
def test_a_moved_run_resumes_exactly(tmp_path, capsys, monkeypatch):
    assert _teach(tmp_path / "straight", "--max-steps", "4") == 0
    assert _teach(tmp_path / "run", "--max-steps", "2") == 0
    shutil.move(tmp_path / "run", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    assert _teach("./moved/", "--max-steps", "4", "--resume", "latest") == 0
    assert _same_weights(tmp_path / "straight", tmp_path / "moved")


# --- 4. resuming an older checkpoint keeps it -----------------------------------------------------------------------
def test_resuming_an_older_checkpoint_keeps_it_and_is_exact(tmp_path):
    limit = ["--checkpoint-every", "1", "--checkpoints-total-limit", "2"]
    assert _teach(tmp_path / "straight", "--max-steps", "6") == 0
    run = tmp_path / "run"
    assert _teach(run, "--max-steps", "4", *limit) == 0
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint_2", "checkpoint_3"]
    older = run / "checkpoints" / "checkpoint_2"
    assert json.loads((older / "trainer_state.json").read_text())["step"] == 3
    # Three more steps from step 3, each checkpointed: rotation runs three times. The path may be relative to the run.
    assert _teach(run, "--max-steps", "6", "--resume", "checkpoints/checkpoint_2", *limit) == 0
    assert (older / "trainer_state.json").is_file()  # the checkpoint resumed from is still there, complete
    assert _same_weights(tmp_path / "straight", run)  # and the continuation from it is exact
    kept = [p.name for p in complete_checkpoints(run)]
    assert "checkpoint_2" in kept and len(kept) == 3  # the total limit applies besides the one resumed from
    # The continuation's own checkpoints are the newest, so "latest" is the newest step.
    assert json.loads((complete_checkpoints(run)[-1] / "trainer_state.json").read_text())["step"] == 6


# --- 5. no pickle is ever loaded from a checkpoint ---------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: proof that code from a checkpoint ran."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _plant(path: Path, target: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state": _Payload(target)}, f)


def test_resume_never_runs_code_from_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert _teach(run, "--max-steps", "2") == 0
    latest = complete_checkpoints(run)[-1]
    # Counters and EMA are JSON + safetensors: no custom pickled state is written.
    assert not list(latest.glob("custom_checkpoint_*"))
    ran = tmp_path / "code-ran"
    # A planted pickle is refused wherever it is put: exit 2 naming the checkpoint, and no code from it runs.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        victim = tmp_path / f"victim-{name}"
        shutil.copytree(latest, victim)
        _plant(victim / name, ran)
        _fails(capsys, [*TEACH, "--output", str(run), "--max-steps", "5", "--resume", str(victim)], str(victim))
        assert not ran.exists(), name


def test_ema_and_counters_resume_exactly(tmp_path):
    assert _teach(tmp_path / "straight", "--max-steps", "4") == 0
    assert _teach(tmp_path / "run", "--max-steps", "2") == 0
    latest = complete_checkpoints(tmp_path / "run")[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["counters"]["step"] == 2
    assert list(latest.glob("ema_*.safetensors"))
    assert _teach(tmp_path / "run", "--max-steps", "4", "--resume", "latest") == 0
    assert _same_weights(tmp_path / "straight", tmp_path / "run")  # the exported student is the EMA


# --- 6. a checkpoint that cannot be restored exactly is an error ---------------------------------------------------
def test_a_checkpoint_missing_its_rng_state_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert _teach(run, "--max-steps", "2") == 0
    (complete_checkpoints(run)[-1] / "random_states_0.pkl").unlink()
    _fails(capsys, [*TEACH, "--output", str(run), "--max-steps", "3", "--resume", "latest"], "random_states_0.pkl")


# --- 7. errors of a run are one line with a non-zero exit ----------------------------------------------------------
def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert _teach(run, "--max-steps", "2") == 0
    weights = complete_checkpoints(run)[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _fails(capsys, [*TEACH, "--output", str(run), "--max-steps", "3", "--resume", "latest"], "checkpoint_")


def test_a_diverged_run_exits_non_zero_with_one_line(tmp_path, capsys):
    argv = [*TEACH, "--output", str(tmp_path / "run"), "--max-steps", "30", "--lr", "1e30", "--grad-clip", "0"]
    capsys.readouterr()
    code = main([*argv, "--max-nonfinite-steps", "2", "--checkpoint-every", "1"])
    assert code not in (0, 2)  # not success, not a usage error
    err = capsys.readouterr().err
    assert "Traceback" not in err and "diverged" in err
    # No checkpoint holding non-finite weights is marked complete.
    for folder in complete_checkpoints(tmp_path / "run"):
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


# --- 8. non-finite gradients are skipped; numbers must be finite ----------------------------------------------------
class _InfGradTask(ToyTask):
    """A finite loss whose gradient is infinite on ``bad_calls``: sqrt(w - w) is 0 with gradient 1/(2*0)."""

    def __init__(self, bad_calls=()):
        super().__init__()
        self.bad_calls = set(bad_calls)

    def forward(self, phase, x):
        losses = super().forward(phase, x)
        if self.calls in self.bad_calls:
            w = self.model.weight[0, 0]
            losses["loss"] = losses["loss"] + torch.sqrt(w - w)
        return losses


def _toy_recipe(tmp_path, **kw) -> TrainRecipe:
    base = dict(output=str(tmp_path / "toy"), max_steps=4, batch_size=8, lr=1e-2, ema_decay=0.0, log_every=1)
    base.update(checkpoint_every=0, eval_every=0, sample_every=0, lr_scheduler="constant", grad_clip=0.0)
    return TrainRecipe(**{**base, **kw})


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_non_finite_gradients_of_a_finite_loss_are_skipped(tmp_path, grad_clip):
    task = _InfGradTask(bad_calls={2})
    trainer = Trainer(task, _toy_recipe(tmp_path, grad_clip=grad_clip), command="toy")
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in task.model.parameters())
    assert logged_values(tmp_path / "toy", "nonfinite_skipped")[-1] == 1


def test_non_finite_numbers_are_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    _fails(capsys, [*TEACH, "--output", out, "--lr", "inf"], "lr", "finite")
    _fails(capsys, [*TEACH, "--output", out, "--lr", "nan"], "lr", "finite")
    _fails(capsys, [*TEACH, "--output", out, "--max-seconds", "inf"], "max_seconds", "finite")
    _fails(capsys, [*TEACH, "--output", out, "--weight-decay=-inf"], "weight_decay", "finite")
    assert not (tmp_path / "o").exists()


def test_the_log_is_strict_json(tmp_path):
    trainer = Trainer(_InfGradTask(), _toy_recipe(tmp_path), command="toy")
    trainer.log({"metric": float("nan"), "other": float("inf"), "fine": 1.5}, step=1)

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    rows = [json.loads(line, parse_constant=refuse) for line in trainer.metrics_file.read_text().splitlines()]
    assert rows[-1]["metric"] is None and rows[-1]["other"] is None and rows[-1]["fine"] == 1.5


# --- 9. crash safety of results and logs ---------------------------------------------------------------------------
def test_a_partial_last_log_line_is_tolerated_and_the_log_continues(tmp_path):
    run = tmp_path / "run"
    assert _teach(run, "--max-steps", "2") == 0
    log = run / "logs" / "metrics.jsonl"
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"step": 99, "loss/mod')  # a run killed mid-write
    assert len(logged_values(run, "loss/model")) == 2
    assert _teach(run, "--max-steps", "4", "--resume", "latest") == 0
    rows = [line for line in log.read_text().splitlines() if line.strip()]
    good = [json.loads(line) for line in rows if not line.startswith('{"step": 99, "loss/mod')]
    assert [r["step"] for r in good if "loss/model" in r] == [1, 2, 3, 4]  # the rows after the cut are intact
    assert len(logged_values(run, "loss/model")) == 4


class _DiskFull:
    """A real file (opened, so truncated, as usual) that takes half of what is written, then fails as a full disk."""

    def __init__(self, real):
        self.real = real

    def write(self, text):
        self.real.write(text[: len(text) // 2])
        self.real.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_results_json_is_never_half_written(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert _teach(run, "--max-steps", "2") == 0
    results = run / "results.json"
    before = results.read_bytes()
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and isinstance(file, str | os.PathLike) and Path(file).name.startswith("results.json"):
            return _DiskFull(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)
    with pytest.raises(OSError):
        _teach(run, "--max-steps", "3", "--resume", "latest")
    monkeypatch.undo()
    assert results.read_bytes() == before  # the previous results, whole
