"""Multi-host search on one machine: two processes joined by `jax.distributed` on localhost.

Each process is ``python -m bnas_jax.main --config.distributed=True --coordinator_address
127.0.0.1:<free port> --num_processes 2 --process_id <i>`` with one CPU device, so the run has a
2-device mesh over 2 processes: every batch is assembled from per-process rows, the gradients are
all-reduced across processes (gloo) and the checkpoints are written collectively. The tiny search
(experiments/tiny.py without warm-up, one outer iteration, 3 steps of global batch 4) is checked
against:

* the same search in one process with one device (same global batch): the same genotype and alive
  mask, gamma and val accuracy up to float reassociation;
* the files: every process runs under an audit hook that records each file it opens for writing in
  the run directory; process 1 writes nothing there except its share of the checkpoints (logs,
  TensorBoard, config, genotype, pictures and prior are process 0's alone);
* a stop and a crash: SIGTERM to process 1 after optimiser step 1 of the 3-step epoch stops both
  processes at that step (checkpointed, both exit with SIGTERM's status); restarted, process 1 is
  SIGKILLed after step 2 (its checkpoint written) and process 0 then exits by itself with one line
  naming the failure; both restarted with the same --workdir (the multi-host flags alone, without
  --config.distributed) resume mid-epoch and end exactly as the uninterrupted two-process run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bnas_jax import checkpointing
from bnas_jax import genotype as genotype_lib
from bnas_jax import search
import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")
# No warm-up, one outer iteration; a search epoch of 3 steps (12 examples in batches of 4).
OVERRIDES = {"search.warmup_epochs": 0, "search.iterations": 1, "data.splits.search": 12}
TIMEOUT_S = 900

# Runs bnas_jax.main with an audit hook that appends "<path>" to $AUDIT_FILE for every file opened
# for writing or renamed to under $AUDIT_DIR (outside its checkpoints/ folder). Written with os.write on a file
# descriptor opened before the hook, so recording a write is not itself an audited open.
_AUDITED_MAIN = r"""
import os, runpy, sys
root = os.path.realpath(os.environ["AUDIT_DIR"]) + os.sep
skip = root + "checkpoints" + os.sep
out = os.open(os.environ["AUDIT_FILE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
  if event == "os.rename":  # also os.replace: record the destination of an atomic write
    writes, target = True, args[1]
  elif event == "open":
    mode, flags, target = args[1], args[2], args[0]
    writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
              else isinstance(flags, int) and bool(flags & WRITE))
  else:
    return
  if not isinstance(target, (str, bytes, os.PathLike)):
    return
  path = os.path.realpath(os.fsdecode(target))
  if writes and path.startswith(root) and not path.startswith(skip):
    os.write(out, (path[len(root):] + "\n").encode())
sys.addaudithook(hook)
sys.argv = ["bnas_jax.main"] + sys.argv[1:]
runpy.run_module("bnas_jax.main", run_name="__main__", alter_sys=True)
"""


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(data_cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  env.update(JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.path.join(data_cache_dir, "jax_compilation_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1")
  return env


class TwoProcesses:
  """Both processes of one launch: `wait` returns their exit codes, `log(i)` their output."""

  def __init__(self, workdir: str, data_dir: str, data_cache_dir: str, tag: str,
               extra: tuple[list[str], list[str]] = ([], []), config_switch: bool = True):
    self.workdir = workdir
    self.files = [os.path.join(os.path.dirname(workdir), f"{tag}.p{i}") for i in range(2)]
    port = _free_port()
    self.procs = []
    for i in range(2):
      cmd = [sys.executable, "-c", _AUDITED_MAIN, f"--config={TINY}", f"--workdir={workdir}",
             f"--config.data.data_dir={data_dir}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
      if config_switch:  # else the multi-host flags alone ask for jax.distributed
        cmd.append("--config.distributed=True")
      cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + extra[i]
      env = dict(_env(data_cache_dir), AUDIT_DIR=workdir, AUDIT_FILE=self.files[i] + ".writes")
      with open(self.files[i] + ".log", "w") as log:
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))

  def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
    finally:
      self.kill()

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def log(self, i: int) -> str:
    with open(self.files[i] + ".log") as f:
      return f.read()

  def writes(self, i: int) -> set[str]:
    path = self.files[i] + ".writes"
    if not os.path.exists(path):
      return set()
    with open(path) as f:
      return set(f.read().split())


def tiny_config(data_dir: str):
  return helpers.tiny_search_config(data_dir, OVERRIDES)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cifar10_subset_dir, data_cache_dir):
  """The uninterrupted two-process search, started first (it compiles while the rest runs)."""
  workdir = str(tmp_path_factory.mktemp("multihost") / "run")
  run = TwoProcesses(workdir, cifar10_subset_dir, data_cache_dir, "full")
  yield run
  run.kill()


@pytest.fixture(scope="module")
def one_process_result(two_process_run, tmp_path_factory, cifar10_subset_dir):
  del two_process_run  # started first
  return search.run(tiny_config(cifar10_subset_dir), str(tmp_path_factory.mktemp("one")))


@pytest.fixture(scope="module")
def two_process_result(two_process_run):
  rcs = two_process_run.wait()
  assert rcs == [0, 0], f"exit codes {rcs}\n" + "\n".join(
      two_process_run.log(i)[-3000:] for i in range(2))
  return two_process_run


def _prior(workdir: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, "prior.npz")) as f:
    return dict(f)


def test_two_processes_give_the_one_process_result_and_process_0_alone_writes(
    one_process_result, two_process_result):
  one, run = one_process_result, two_process_result
  logs = [run.log(i) for i in range(2)]
  for i in range(2):
    assert f"JAX process {i} / 2" in logs[i] and "global devices: 2 (cpu)" in logs[i]
  workdir = run.workdir
  assert genotype_lib.Genotype.load(os.path.join(workdir, "genotype.json")) == one.genotype
  prior = _prior(workdir)
  for t in one.gamma:
    np.testing.assert_array_equal(prior[f"alive/{t}"], one.alive[t])
    np.testing.assert_allclose(prior[f"gamma/{t}"].mean(0), one.gamma[t], rtol=1e-4, atol=1e-6)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["global_step"] == one.global_step == 3
  np.testing.assert_allclose(summary["val_accuracy"], one.val_accuracy, atol=1e-6)

  # Process 0 wrote the run's files (the audit hook sees them), process 1 nothing at all.
  written = run.writes(0)
  for name in ("log.txt", "config.json", "seeds.json", "genotype.json", "genotype.png",
               "prior.npz", "summary.json", "nb201_arch.txt"):
    assert name in written, (name, sorted(written))
  assert any(w.startswith("tensorboard" + os.sep) for w in written), sorted(written)
  assert run.writes(1) == set(), sorted(run.writes(1))
  with open(os.path.join(workdir, "log.txt")) as f:
    assert f.read().count("starting a new search") == 1


def _position(workdir: str, data_dir: str) -> tuple[str, int, int]:
  """(stage kind, step in the stage, global step) of the newest checkpoint."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    position = ckpt.restore_meta()["position"]
  finally:
    ckpt.close()
  kind = search.plan(tiny_config(data_dir))[position["stage"]].kind
  return kind, position["step"], position["global_step"]


def test_stopped_or_killed_process_then_both_restarted_resume_to_the_same_result(
    two_process_result, tmp_path, cifar10_subset_dir, data_cache_dir):
  workdir = str(tmp_path / "run")
  # SIGTERM to process 1 after step 1: both processes checkpoint that step and stop, with the
  # exit status of SIGTERM (process 0 never received it).
  term = TwoProcesses(workdir, cifar10_subset_dir, data_cache_dir, "term",
                      extra=([], ["--config.debug.signal_at_step=1"]))
  rcs = term.wait()
  assert rcs == [128 + signal.SIGTERM] * 2, "\n".join(term.log(i)[-3000:] for i in range(2))
  assert "another process received SIGTERM" in term.log(0)
  assert _position(workdir, cifar10_subset_dir) == ("search", 1, 1)

  # Restarted; process 1 is SIGKILLed after step 2 of the 3-step epoch (its checkpoint written).
  crash = TwoProcesses(workdir, cifar10_subset_dir, data_cache_dir, "crash",
                       extra=([], ["--config.debug.kill_at_step=2"]))
  rcs = crash.wait()
  assert rcs[1] == -signal.SIGKILL, crash.log(1)[-3000:]
  # The survivor's collective fails; it ends by itself with one line naming what to do.
  assert rcs[0] == 1, crash.log(0)[-3000:]
  assert "another process has probably stopped" in crash.log(0)
  assert "Check failure stack trace" not in crash.log(0)
  assert _position(workdir, cifar10_subset_dir) == ("search", 2, 2)
  assert not os.path.exists(os.path.join(workdir, "genotype.json"))

  # Restarted with the multi-host flags alone (config.distributed may change on resume).
  again = TwoProcesses(workdir, cifar10_subset_dir, data_cache_dir, "resume", config_switch=False)
  rcs = again.wait()
  assert rcs == [0, 0], "\n".join(again.log(i)[-3000:] for i in range(2))
  for i in range(2):
    assert "resumed checkpoint" in again.log(i)
  reference = two_process_result.workdir
  assert (genotype_lib.Genotype.load(os.path.join(workdir, "genotype.json"))
          == genotype_lib.Genotype.load(os.path.join(reference, "genotype.json")))
  got, want = _prior(workdir), _prior(reference)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  for run in (term, crash, again):
    assert run.writes(1) == set(), sorted(run.writes(1))


def test_multihost_flags_with_nodistributed_are_refused_in_one_line(tmp_path, cifar10_subset_dir):
  proc = subprocess.run(
      [sys.executable, "-m", "bnas_jax.main", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
       f"--config.data.data_dir={cifar10_subset_dir}", "--nodistributed", "--process_id=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ,
                                                                      JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip() == ("bnas_jax.main: error: --process_id set a multi-host run, "
                                 "--nodistributed a single process: drop one of them")
  assert not os.path.exists(tmp_path / "w")
