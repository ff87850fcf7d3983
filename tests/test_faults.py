"""Faults: a training process SIGKILLed at random points and resumed, unusable checkpoints given to
every loader, a full disk while a run folder is written, and a DDP worker that dies.

- Kill and resume: `marn-fast train` runs in child processes (one thread each, so their sums
  are reproducible); the chain is killed during an optimiser step, in the middle of a
  checkpoint write (part of the bytes on disk), after a whole write but before its
  `os.replace`, and at a random time, each time followed by `--resume`. The final weights,
  history and test metrics must equal an uninterrupted run's, bit for bit, and after every
  kill every file under its final name must be complete.
- Bad checkpoints (truncated, empty, a bare state_dict, foreign pickle, not a torch file, weights
  that do not fit their config, another model config) given to `evaluate`, `predict`, `train
  --resume` and `load_model`: one line naming the file and the problem, exit code 2.
- Full disk: a real tmpfs just larger than the run folder when this process may mount one
  (root), and an injected ENOSPC in the write otherwise/also: a one-line error (exit 1), the
  previous checkpoint byte-identical, no temporary file left.
- DDP: two `marn-fast train` workers (gloo on the CPU) started with the environment that
  `torchrun --nproc-per-node 2` gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, ...), but
  without torchrun's agent, which would tear the survivor down itself and hide a hang; one
  worker is SIGKILLed mid-run, or stopped (SIGSTOP) so that it hangs: the other exits with a
  one-line error within a bounded time (the process group's timeout, MARN_FAST_DIST_TIMEOUT).
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from marn_fast import MARN, MARNConfig
from marn_fast.cli import main
from marn_fast.data import write_synthetic_corpus
from marn_fast.training import DataSettings, Experiment, TrainConfig, Trainer
from marn_fast.training.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 8
# A run of a few seconds: 48 short notes, 20 codes, batches of 8 (4 steps per epoch).
CORPUS = {"num_docs": 48, "median_tokens": 40, "num_codes": 20}
FLAGS = ["--hidden-size", str(HIDDEN), "--no-progress", "--word2vec-epochs", "1", "--batch-size", "8",
         "--max-length", "120", "--patience", "50"]
TIMING_KEYS = {"seconds", "elapsed_seconds", "docs_per_second", "checkpoint"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    write_synthetic_corpus(folder, seed=5, **CORPUS)
    return folder


def train_argv(corpus, out, epochs, *extra):
    return ["train", "--data", "caml", "--data-dir", str(corpus), "--out", str(out), "--epochs", str(epochs),
            *FLAGS, *extra]


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A finished one-epoch run (best.pt, last.pt, the word2vec cache), trained in this process."""
    out = tmp_path_factory.mktemp("base")
    assert main(train_argv(corpus, out, 1)) == 0
    return out


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    env.pop("WORLD_SIZE", None)
    return env


# ----------------------------------------------------------------------------- kill and resume
# Runs `marn_fast.cli.main(argv)` after installing one fault: SIGKILL at the n-th optimiser step
# (inside clip_grad_norm_, between backward and step), or in the n-th checkpoint write after a
# fraction of its bytes reached the disk (1.0: the whole file, killed before os.replace).
DRIVER = r"""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
fault, argv = json.loads(sys.argv[1]), sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if fault["kind"] == "step":
    import torch.nn.utils as nn_utils
    real_clip, steps = nn_utils.clip_grad_norm_, [0]
    def clip(*args, **kwargs):
        steps[0] += 1
        if steps[0] == fault["at"]:
            die()
        return real_clip(*args, **kwargs)
    nn_utils.clip_grad_norm_ = clip
elif fault["kind"] == "write":
    import marn_fast.training.checkpoint as checkpoint
    writes = [0]
    class DyingFile:
        def __init__(self, handle):
            self.handle = handle
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.handle.close()
        def write(self, data):
            data = memoryview(data)
            self.handle.write(data[: int(len(data) * fault["fraction"])])
            self.handle.flush()
            os.fsync(self.handle.fileno())
            die()
    def dying_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        if "w" in mode:
            writes[0] += 1
            if writes[0] == fault["at"]:
                return DyingFile(handle)
        return handle
    checkpoint.open = dying_open
from marn_fast.cli import main
sys.exit(main(argv))
"""


def start_child(argv, fault=None):
    cmd = [sys.executable, "-c", DRIVER, json.dumps(fault or {"kind": "none"}), *argv]
    # cwd: the tests folder, so that `-c` imports the installed package, not the source tree above
    return subprocess.Popen(cmd, env=child_env(), cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_child(proc, kill_after=None, timeout=300):
    """(exit code, stderr) once the child ends; SIGKILLed after `kill_after` seconds if given."""
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            proc.kill()
            raise
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def assert_complete_files(out):
    """Every file under its final name is whole: checkpoints load, JSON parses."""
    for name in ("best.pt", "last.pt"):
        if (out / name).exists():
            load_checkpoint(out / name)
    for path in out.glob("*.json"):
        json.loads(path.read_text())


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    epochs, steps_per_epoch = 3, 5  # 37 training notes in batches of 8
    reference_run = start_child(train_argv(corpus, tmp_path / "full", epochs))  # runs alongside the chain
    rng = random.Random(21)
    faults = [
        {"kind": "step", "at": rng.randint(1, steps_per_epoch)},                        # during epoch 1
        {"kind": "write", "at": rng.randint(1, 3), "fraction": rng.uniform(0.05, 0.95)},  # inside a write
        {"kind": "write", "at": 1, "fraction": 1.0},                                  # before os.replace
        {"kind": "timer", "after": rng.uniform(1.0, 4.0)},                            # anywhere
    ]
    cut = tmp_path / "cut"
    for fault in faults:
        child = start_child(train_argv(corpus, cut, epochs, "--resume"), fault=fault)
        code, err = finish_child(child, kill_after=fault.get("after"))
        assert code in (-signal.SIGKILL, 0), (fault, err[-2000:])
        assert_complete_files(cut)
    code, err = finish_child(start_child(train_argv(corpus, cut, epochs, "--resume")))
    assert code == 0, err[-3000:]
    assert not list(cut.glob(".*.tmp")), "temporary files of killed writes were not cleaned up"
    code, err = finish_child(reference_run)
    assert code == 0, err[-3000:]
    for name in ("best.pt", "last.pt"):
        want, got = load_checkpoint(tmp_path / "full" / name), load_checkpoint(cut / name)
        assert want["model"].keys() == got["model"].keys()
        for key in want["model"]:
            assert torch.equal(want["model"][key], got["model"][key]), (name, key)
    want, got = (json.loads((folder / "metrics.json").read_text()) for folder in (tmp_path / "full", cut))
    assert strip_timing(got) == strip_timing(want)
    assert len(got["history"]) == epochs


def test_resume_of_an_early_stopped_run_trains_no_more(corpus, tmp_path):
    """exact_match stays 0 on this tiny dev split: epoch 1 sets the best, epoch 2 does not improve
    on it and patience 1 stops the run; resuming the stopped run must not train on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = Experiment(DataSettings(str(corpus), batch_size=8, max_length=120))
    config = TrainConfig(max_epochs=4, patience=1, metric="exact_match", progress=False)

    def trainer():
        torch.manual_seed(0)
        model = MARN(MARNConfig(vocab_size=len(exp.vocab), num_icd=len(exp.icd_space), hidden_size=HIDDEN))
        return Trainer(model, config, tmp_path, exp.metadata(), device=torch.device("cpu"))

    state = trainer().fit(exp.loader("train"), exp.loader("dev"))
    assert len(state.history) == 2 and state.bad_epochs == 1
    resumed = trainer().fit(exp.loader("train"), exp.loader("dev"), resume=True)
    assert len(resumed.history) == 2 and resumed.epoch == 1


# ----------------------------------------------------------------------------- bad checkpoints
class Foreign:
    """A Python object that weights_only loading must refuse."""

    def __init__(self):
        self.weights = torch.ones(3)


def make_bad_checkpoint(kind, base_run, path):
    good = base_run / "last.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "state_dict":
        torch.save(load_checkpoint(good)["model"], path)
    elif kind == "pickle":
        torch.save({"format": "marn_fast.checkpoint/1", "model": Foreign()}, path)
    elif kind == "text":
        path.write_text("SUBJECT_ID,HADM_ID,TEXT,LABELS\n1,2,chest pain,4019\n")
    elif kind == "misfit":  # the config says hidden_size 16, the weights are hidden_size 8
        payload = load_checkpoint(good)
        payload["config"] = {**payload["config"], "hidden_size": 2 * HIDDEN}
        save_checkpoint(path, {k: v for k, v in payload.items() if k != "format"})
    elif kind == "other_config":  # a consistent checkpoint of another model (hidden_size 16)
        payload = load_checkpoint(good)
        config = MARNConfig.from_dict({**payload["config"], "hidden_size": 2 * HIDDEN})
        model = MARN(config)
        trainer_state = dict(payload["train"])
        save_checkpoint(path, {**{k: v for k, v in payload.items() if k not in ("format", "model", "config", "train")},
                               "config": config.to_dict(), "model": model.state_dict(), "train": trainer_state})
    return path


BAD = {"truncated": "truncated or damaged", "empty": "empty file", "state_dict": "bare state_dict",
       "pickle": "other than tensors", "text": "not a torch checkpoint file",
       "misfit": "config needs|another model config", "other_config": "another model config"}


def one_line_error(capsys, argv, code=2):
    got = main(argv)
    err = capsys.readouterr().err.strip()
    assert got == code, err
    assert "\n" not in err and "Traceback" not in err and err.startswith("marn-fast"), err
    return err


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_checkpoints_give_a_one_line_error_everywhere(kind, base_run, tmp_path, capsys):
    """evaluate and predict (CLI: exit 2, one line), Trainer.resume and load_model (CheckpointError,
    one line); each names the file and the problem. `train --resume` through the CLI: below."""
    bad = make_bad_checkpoint(kind, base_run, tmp_path / "bad.pt")
    problem = BAD[kind]
    note = tmp_path / "note.txt"
    note.write_text("patient with hypertension and atrial fibrillation")
    model, payload = load_model(base_run / "best.pt")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(bad, run / "last.pt")
    metadata = {k: payload[k] for k in ("vocab", "icd_labels", "ccs_labels", "data")}
    trainer = Trainer(model, TrainConfig(progress=False), run, metadata, device=torch.device("cpu"))
    for call, path in ((trainer.resume, run / "last.pt"), (lambda: load_model(bad, config=model.config), bad)):
        with pytest.raises(CheckpointError) as info:
            call()
        message = str(info.value)
        assert str(path) in message and re.search(problem, message) and "\n" not in message, message
    if kind == "other_config":  # a valid checkpoint of another model: evaluate and predict serve it
        assert main(["evaluate", str(bad), "--split", "dev", "--threshold", "0.5"]) == 0
        assert main(["predict", str(bad), str(note), "--top", "2"]) == 0
        return
    for argv in (["evaluate", str(bad)], ["predict", str(bad), str(note)]):
        err = one_line_error(capsys, argv)
        assert str(bad) in err and re.search(problem, err), err


@pytest.mark.parametrize("kind", ["truncated", "other_config"])
def test_train_resume_from_a_bad_last_checkpoint(kind, base_run, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run / "cache", run / "cache")  # the word2vec cache: no retraining
    make_bad_checkpoint(kind, base_run, run / "last.pt")
    err = one_line_error(capsys, train_argv(corpus, run, 2, "--resume"))
    assert str(run / "last.pt") in err and re.search(BAD[kind], err), err
    if kind == "other_config":
        assert "hidden_size 8 here vs 16 in the checkpoint" in err


def test_predict_names_a_missing_checkpoint_before_reading_stdin(tmp_path, capsys, monkeypatch):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError("stdin was read before the checkpoint was checked")

    monkeypatch.setattr(sys, "stdin", Untouchable())
    err = one_line_error(capsys, ["predict", str(tmp_path / "MISSING.pt")])
    assert "MISSING.pt" in err and "no such file" in err


def test_bad_checkpoint_folder_and_format(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    torch.save({"format": "marn_fast.checkpoint/99", "config": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 'marn_fast.checkpoint/99'"):
        load_checkpoint(tmp_path / "future.pt")


# ----------------------------------------------------------------------------- full disk
def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    return done.returncode == 0


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(how, base_run, corpus, tmp_path, capsys,
                                                                         monkeypatch):
    run = tmp_path / "run"
    if how == "tmpfs":
        # Room for the finished one-epoch run and a little more, not for a second copy of last.pt.
        size = _folder_bytes(base_run) + (base_run / "best.pt").stat().st_size // 2
        if not _mount_tmpfs(run, size):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    else:
        import errno

        import marn_fast.training.checkpoint as checkpoint

        class FullDisk:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()

            def write(self, data):
                self.handle.write(memoryview(data)[:4096])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def full_open(path, mode="r", *args, **kwargs):
            handle = open(path, mode, *args, **kwargs)
            return FullDisk(handle) if "w" in mode else handle

        monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    try:
        shutil.copytree(base_run, run, dirs_exist_ok=True)
        before = (run / "last.pt").read_bytes()
        err = one_line_error(capsys, train_argv(corpus, run, 2, "--resume"), code=1)
        assert "No space left on device" in err and "unchanged" in err, err
        assert (run / "last.pt").read_bytes() == before
        assert load_checkpoint(run / "last.pt")["train"]["state"]["epoch"] == 0
        assert not list(run.glob(".*.tmp"))
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", "-l", str(run)], check=False)


def test_a_full_disk_while_writing_a_report_file_names_it(tmp_path, monkeypatch):
    import errno

    import marn_fast.files as files_module
    from marn_fast.files import write_json_atomic

    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"epoch": 1})

    def full_open(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files_module, "open", full_open, raising=False)
    with pytest.raises(OSError, match="No space left on device") as info:
        write_json_atomic(path, {"epoch": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert json.loads(path.read_text()) == {"epoch": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ----------------------------------------------------------------------------- DDP worker dies
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_ddp_worker_lost_the_other_exits_with_an_error(sig, base_run, corpus, tmp_path):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) in the middle of training: rank 0 must not wait
    forever. A dead gloo peer fails its next collective at once; a hung one after the process
    group's timeout (3 s here through MARN_FAST_DIST_TIMEOUT)."""
    timeout_s = 3
    out = tmp_path / "ddp"
    shutil.copytree(base_run / "cache", out / "cache")  # no word2vec training in the workers
    port = _free_port()
    workers = []
    for rank in range(2):
        env = dict(child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MARN_FAST_DIST_TIMEOUT=str(timeout_s))
        argv = train_argv(corpus, out, 200)  # far more epochs than the test lets it run
        workers.append(subprocess.Popen([sys.executable, "-m", "marn_fast", *argv], env=env, cwd=tmp_path,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():  # rank 0 wrote a checkpoint: training is under way
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), \
                [w.communicate()[1][-2000:] for w in workers]
            time.sleep(0.05)
        time.sleep(random.Random(3).uniform(0.0, 0.5))
        os.kill(workers[1].pid, sig)
        lost = time.monotonic()
        _, err = workers[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - lost
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    assert workers[0].returncode == 1, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("marn-fast")]
    assert lines and "distributed" in lines[-1] and "Traceback" not in err, err[-3000:]
    assert waited < timeout_s + 30, waited
