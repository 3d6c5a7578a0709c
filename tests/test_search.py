"""End-to-end tests of the search runner (`bnas_jax.search`) on the tiny config and real CIFAR-10.

One uninterrupted tiny search (nb201 space, C = 4, 1 cell per stage, 8 + 8 + 8 lossless CIFAR-10
images, batch 4, 1 warm-up epoch + 2 outer iterations, a relative prune threshold that prunes at
t = 1) is the reference (`reference_run`). Every other run in this file reuses its compiled step
functions (same static config), so they cost only their few steps:

* same seed twice -> identical gamma, alive mask and genotype;
* a run killed mid-epoch (``debug.stop_after_steps``), resumed twice from its workdir (once
  mid-epoch, once across a prior update) -> exactly the reference gamma, genotype and history;
* a NaN batch -> `NonFiniteError` naming the step, and the latest checkpoint is the last finite one;
* the same search on 2 simulated CPU devices (a subprocess started at the beginning so it compiles
  while the reference runs) -> the reference result up to float tolerance.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import checkpointing
from bnas_jax import errors
from bnas_jax import genotype as genotype_lib
from bnas_jax import run_lib
from bnas_jax import search
from bnas_jax import search_steps
import helpers
from bnas_jax.search_space import spaces
from bnas_jax.data import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")
# The 2-device comparison skips the warm-up and does one iteration (half the compilations of the
# subprocess); the step functions it needs in this process are those of the reference run.
TWO_DEVICE_OVERRIDES = {"search.warmup_epochs": 0, "search.iterations": 1}


def tiny_config(data_dir: str, **overrides):
  """The experiments/tiny.py config pointed at the lossless subset, with dotted overrides."""
  return helpers.tiny_search_config(data_dir, overrides)


def read_scalar_tags(event_file: str) -> set[str]:
  """Scalar tags in a TensorBoard event file (TFRecord framing: len, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  with open(event_file, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        break
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      f.read(4)
      event = event_pb2.Event()
      event.ParseFromString(data)
      for value in event.summary.value:
        tags.add(value.tag)
  return tags


@pytest.fixture(scope="module")
def two_device_run(tmp_path_factory, cifar10_subset_dir, data_cache_dir):
  """Starts the 2-device tiny search in a subprocess (collected by `test_two_devices_...`)."""
  workdir = str(tmp_path_factory.mktemp("two_devices"))
  with helpers.two_device_search(TINY, workdir, cifar10_subset_dir, data_cache_dir,
                                 TWO_DEVICE_OVERRIDES) as proc:
    yield proc, workdir


@pytest.fixture(scope="module")
def reference_run(two_device_run, tmp_path_factory, cifar10_subset_dir):
  del two_device_run  # started first so that it compiles concurrently
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = search.run(tiny_config(cifar10_subset_dir), workdir)
  return result, workdir


def assert_same_result(a: search.SearchResult, b: search.SearchResult, exact: bool = True):
  assert a.genotype == b.genotype
  assert set(a.gamma) == set(b.gamma)
  for t in a.gamma:
    np.testing.assert_array_equal(a.alive[t], b.alive[t])
    if exact:
      np.testing.assert_array_equal(a.gamma[t], b.gamma[t])
    else:
      np.testing.assert_allclose(a.gamma[t], b.gamma[t], rtol=1e-3, atol=1e-6)


def test_reference_run_writes_everything(reference_run, cifar10_subset_dir):
  result, workdir = reference_run
  assert result.completed and result.global_step == 6  # 2 warm-up + 2 x 2 search steps
  assert [h["iteration"] for h in result.history] == [1, 2]
  # The tiny threshold prunes at t = 1, so t = 2 ran on a rebuilt (smaller) supernet.
  assert result.history[0]["live_groups"] < 30
  assert result.history[1]["live_groups"] <= result.history[0]["live_groups"]
  assert 0.0 <= result.val_accuracy <= 1.0

  for name in ("config.json", "config.yaml", "seeds.json", "log.txt", "summary.json",
               "genotype.json", "genotype.png", "genotype.svg", "prior.npz", "nb201_arch.txt"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for t in ("t01", "t02"):
    for name in ("genotype.json", "genotype.png", "genotype.svg", "prior.npz", "nb201_arch.txt"):
      assert os.path.getsize(os.path.join(workdir, "iterations", t, name)) > 0, (t, name)
  assert genotype_lib.Genotype.load(os.path.join(workdir, "genotype.json")) == result.genotype
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["space"] == "nb201"

  # Pruned switches are exactly zero; the stored gamma is the returned one.
  prior = np.load(os.path.join(workdir, "prior.npz"))
  alive = prior["alive/normal"]
  assert not alive.all()
  assert np.all(prior["switches/normal"][:, ~alive] == 0.0)
  np.testing.assert_allclose(prior["gamma/normal"].mean(0), result.gamma["normal"], rtol=1e-6)

  # NB201 look-up of each iteration's cell (the shared table is present in this repo).
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert all(0.0 < h["nb201_accuracy"] <= 100.0 for h in summary["history"])
  with open(os.path.join(workdir, "nb201_arch.txt")) as f:
    assert f.read().strip() == summary["nb201_arch"]

  # Checkpoints: keep-last-2, the latest one marks the run as done.
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
  assert len(ckpt.all_indices()) == 2
  stages = search.plan(tiny_config(cifar10_subset_dir))
  assert [s.kind for s in stages] == ["warmup", "search", "update", "search", "update"]
  assert ckpt.restore_meta()["position"]["stage"] == len(stages)
  ckpt.close()

  # TensorBoard: training, prior and per-iteration scalars.
  (event_file,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  tags = read_scalar_tags(event_file)
  for tag in ("warmup/loss", "search/loss", "search/penalty", "search/accuracy",
              "search/step_time_s", "iteration/val_accuracy", "iteration/live_switches",
              "prior/normal/gamma_median", "prior/normal/omega_median", "prior/normal/C_median",
              "prior/normal/H_median", "prior/live_groups"):
    assert tag in tags, tag


def test_step_functions_compiled_once_per_mask(reference_run, cifar10_subset_dir):
  # One compilation per alive mask (full supernet, then the pruned one), none per epoch or run:
  # every jitted function holds exactly one executable although several runs in this module used it.
  result, _ = reference_run
  config = tiny_config(cifar10_subset_dir)
  mesh = sharding.make_mesh()
  full = search_steps.step_fns(search_steps.StepKey.create(config, 10, None, mesh))
  pruned = search_steps.step_fns(search_steps.StepKey.create(config, 10, result.alive, mesh))
  assert full is not pruned
  # The key holds what the functions close over: a field they do not read shares them.
  other = tiny_config(cifar10_subset_dir, **{"search.iterations": 7, "log_every_steps": 3})
  assert search_steps.step_fns(search_steps.StepKey.create(other, 10, None, mesh)) is full
  # The warm-up and the search epochs ran one train_step program (its phase flag is traced).
  for fns in (full, pruned):
    for name in ("train_step", "eval_step", "curvature_fn", "prior_update"):
      assert getattr(fns, name)._cache_size() == 1, name


def test_compile_ahead_leaves_nothing_to_compile_for_the_real_calls(tmp_path,
                                                                   cifar10_subset_dir):
  # search.lr enters the step functions: a static config no other test compiles.
  config = tiny_config(cifar10_subset_dir, **{"search.lr": 0.0123, "search.compile_ahead": True})
  compiled = []

  def listener(event, seconds, **kw):
    del seconds
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(kw.get("fun_name", ""))

  run_ = run_lib.Run(config, str(tmp_path))
  searcher = search._Search(config, run_)  # pylint: disable=protected-access
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    state, _ = searcher.restore_or_init()
    alive = {t: np.asarray(a) for t, a in state["prior"].alive.items()}
    searcher.compile_ahead(state, alive, train=True, evaluate=True, curvature_t=1)
    searcher.wait_compiles()
    steps = ("jit(train_step)", "jit(eval_step)", "jit(curvature)")
    ahead = [n for n in compiled if n in steps]
    assert sorted(ahead) == sorted(steps), compiled
    del compiled[:]
    # The real calls: an evaluation, a curvature pass and a training epoch of the search stage.
    fns = searcher.fns(alive)
    searcher.evaluate(state, fns)
    searcher.curvature(state, 1, fns)
    searcher.train_epoch(state, run_lib.Position(1, 0, 0), search.Stage(search.SEARCH, 1), fns,
                         [])
    assert not [n for n in compiled if n in steps], compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    searcher.close()
    run_.close()


def _one_step_inputs(config, mesh):
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  counts = supernet.cell_counts(config.space, config.model.num_cells)
  shapes = spaces.get_space(config.space).switch_shapes(counts)
  state = jax.jit(lambda k: search_steps.init_state(config, 10, shapes, k))(
      search_steps.init_key(3))
  k1, k2 = jax.random.split(jax.random.key(5))
  batch = {"image": jax.random.normal(k1, (4, 32, 32, 3)),
           "label": jax.random.randint(k2, (4,), 0, 10)}
  # Placed as the runner places them, so that the module's compiled train_step is reused.
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return (jax.device_put(state, repl), jax.device_put(batch, sharding.batch_sharding(mesh)),
          lambda: jax.device_put(search_steps.new_train_acc(), repl))


def test_warmup_phase_is_a_weights_only_sgd_step_on_the_nll(cifar10_subset_dir):
  """train_step(update_switches=False) against the warm-up step written out: switches frozen at 1,
  SGD + weight decay on the mean NLL, switch optimizer state untouched."""
  import optax  # pylint: disable=g-import-not-at-top
  config = tiny_config(cifar10_subset_dir)
  mesh = sharding.make_mesh()
  fns = search_steps.step_fns(search_steps.StepKey.create(config, 10, None, mesh))
  state, batch, new_acc = _one_step_inputs(config, mesh)
  model = search_steps.create_model(config, 10)

  def nll(params):
    ones = jax.tree.map(jnp.ones_like, state["switches"])
    logits, _ = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                            batch["image"], ones, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  s = config.search
  tx = optax.chain(optax.add_decayed_weights(float(s.weight_decay)),
                   optax.sgd(float(s.lr), momentum=float(s.momentum)))
  def reference_step(params):  # compiled: eagerly, each of its ops would be compiled alone
    loss, grads = jax.value_and_grad(nll)(params)
    upd, _ = tx.update(grads, tx.init(params), params)
    return loss, optax.apply_updates(params, upd)

  loss, want = jax.jit(reference_step)(state["params"])

  copy = lambda tree: jax.tree.map(jnp.array, tree)  # the step donates its inputs
  new, acc = fns.warmup_step(copy(state), new_acc(), batch)
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves((new["switches"], new["opt_s"])),
                  jax.tree.leaves((state["switches"], state["opt_s"]))):
    np.testing.assert_array_equal(a, b)
  assert all(np.all(np.asarray(x) == 1.0) for x in jax.tree.leaves(new["switches"]))
  np.testing.assert_allclose(acc["loss"], loss, rtol=1e-5)
  assert float(acc["penalty"]) == 0.0 and float(acc["switch_grad_norm"]) == 0.0

  # The search phase of the same program moves the switches and adds the penalty to the loss.
  new, acc = fns.search_step(copy(state), new_acc(), batch)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["switches"]),
                                                      jax.tree.leaves(state["switches"])))
  assert float(acc["penalty"]) > 0.0
  np.testing.assert_allclose(acc["loss"], loss + acc["penalty"], rtol=1e-5)


def test_same_seed_same_result(reference_run, tmp_path, cifar10_subset_dir):
  result, _ = reference_run
  again = search.run(tiny_config(cifar10_subset_dir), str(tmp_path))
  assert_same_result(result, again)
  assert [h["val_accuracy"] for h in again.history] == [h["val_accuracy"] for h in result.history]


def test_resume_after_kill_equals_uninterrupted(reference_run, tmp_path, cifar10_subset_dir):
  result, _ = reference_run
  workdir = str(tmp_path)
  # Killed after 3 steps: inside the first search epoch (2 warm-up steps + 1).
  first = search.run(tiny_config(cifar10_subset_dir, **{"debug.stop_after_steps": 3}), workdir)
  assert not first.completed and first.global_step == 3
  # Resumed mid-epoch, killed again after the t = 1 prior update (inside the t = 2 epoch).
  second = search.run(tiny_config(cifar10_subset_dir, **{"debug.stop_after_steps": 5}), workdir)
  assert not second.completed and second.global_step == 5
  assert len(second.history) == 1
  final = search.run(tiny_config(cifar10_subset_dir), workdir)
  assert final.completed and final.global_step == 6
  assert_same_result(result, final)
  assert [h["val_accuracy"] for h in final.history] == [h["val_accuracy"] for h in result.history]
  assert os.path.exists(os.path.join(workdir, "config.previous.json"))  # config change noted


def test_sigterm_checkpoints_the_current_step_and_resume_equals_uninterrupted(
    reference_run, tmp_path, cifar10_subset_dir):
  result, _ = reference_run
  workdir = str(tmp_path)
  # SIGTERM after step 3 (inside the first search epoch, whose checkpoints come only at its end).
  handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
  first = search.run(tiny_config(cifar10_subset_dir, **{"debug.signal_at_step": 3}), workdir)
  assert not first.completed and first.stopped_by == "SIGTERM" and first.global_step == 3
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  meta = ckpt.restore_meta()
  ckpt.close()
  assert meta["position"]["global_step"] == 3 and meta["position"]["step"] == 1
  # The run's handlers are gone: a later SIGTERM / Ctrl-C acts as before the run.
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
  final = search.run(tiny_config(cifar10_subset_dir), workdir)
  assert final.completed and final.global_step == 6 and final.stopped_by == ""
  assert_same_result(result, final)
  assert [h["val_accuracy"] for h in final.history] == [h["val_accuracy"] for h in result.history]


def test_finished_run_extended_to_more_iterations_equals_a_longer_run(reference_run, tmp_path,
                                                                       cifar10_subset_dir):
  _, workdir = reference_run
  extended_dir = str(tmp_path / "extended")
  shutil.copytree(workdir, extended_dir)
  three = {"search.iterations": 3}
  extended = search.run(tiny_config(cifar10_subset_dir, **three), extended_dir)
  longer = search.run(tiny_config(cifar10_subset_dir, **three), str(tmp_path / "longer"))
  assert extended.completed and len(extended.history) == 3
  assert extended.global_step == longer.global_step == 8
  assert_same_result(longer, extended)
  assert ([h["val_accuracy"] for h in extended.history]
          == [h["val_accuracy"] for h in longer.history])


def test_resume_with_a_different_config_is_refused_and_changes_nothing(tmp_path,
                                                                        cifar10_subset_dir):
  workdir = str(tmp_path)
  config = tiny_config(cifar10_subset_dir, **{"debug.stop_after_steps": 1})
  with open(os.path.join(workdir, "config.json"), "w") as f:  # as if a run had stored it
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.makedirs(os.path.join(workdir, "checkpoints", "1"))  # ... and checkpointed
  with open(os.path.join(workdir, "config.json")) as f:
    stored = f.read()
  other = tiny_config(cifar10_subset_dir, **{"model.init_channels": 8, "search.iterations": 3})
  with pytest.raises(ValueError, match=r"different config \(model.init_channels differ.*"
                                       r"--workdir"):
    search.run(other, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == stored
  assert not os.path.exists(os.path.join(workdir, "config.previous.json"))


def test_checkpoint_of_another_layout_is_refused_with_a_clear_error(reference_run, tmp_path,
                                                                     cifar10_subset_dir):
  # A checkpoint whose state tree differs from this version's (e.g. written before the supernet's
  # per-edge parameter layout) must stop with a ConfigError naming the fix, not a traceback.
  _, workdir = reference_run
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  config = tiny_config(cifar10_subset_dir)
  ckpt = checkpointing.Checkpointer(os.path.join(moved, "checkpoints"), async_save=False)
  latest = ckpt.latest_index()
  state, meta = ckpt.restore(_abstract_state(config), latest)
  params = dict(state["params"])
  cell = next(k for k in params if k.startswith("cell_"))
  params[cell] = {"w1_" + k: v for k, v in params[cell].items()}  # another parameter layout
  ckpt.save(latest + 1, {**state, "params": params}, meta)
  ckpt.close()
  with pytest.raises(errors.ConfigError, match=r"does not match the state .* new --workdir"):
    search.run(config, moved)


def test_checkpoint_of_the_older_format_is_refused_in_one_line(reference_run, tmp_path,
                                                               cifar10_subset_dir):
  # Meta of the format before the stage plan (phase / iteration / epoch): one line, the fix.
  _, workdir = reference_run
  moved = str(tmp_path / "old")
  shutil.copytree(workdir, moved)
  config = tiny_config(cifar10_subset_dir)
  ckpt = checkpointing.Checkpointer(os.path.join(moved, "checkpoints"), async_save=False)
  latest = ckpt.latest_index()
  state, _ = ckpt.restore(_abstract_state(config), latest)
  ckpt.save(latest + 1, state, {"position": {"phase": "done", "iteration": 2, "epoch": 0,
                                             "step": 0, "global_step": 6}, "history": []})
  ckpt.close()
  with pytest.raises(errors.ConfigError, match=r"older bnas_jax \(checkpoint format 1.*resume it "
                     r"with the version that wrote it.* new --workdir") as e:
    search.run(config, moved)
  assert "\n" not in str(e.value)


def truncate_largest_data_file(checkpoint_dir: str) -> str:
  """Cuts the largest array data file of one checkpoint folder to half its size; returns it."""
  files = glob.glob(os.path.join(checkpoint_dir, "state", "**", "d", "*"), recursive=True)
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def test_damaged_latest_checkpoint_is_skipped_and_resume_equals_resuming_the_older_one(
    tmp_path, cifar10_subset_dir, caplog):
  older, damaged = str(tmp_path / "older"), str(tmp_path / "damaged")
  search.run(tiny_config(cifar10_subset_dir, **{"debug.stop_after_steps": 3}), older)
  shutil.copytree(older, damaged)
  ckpt = checkpointing.Checkpointer(os.path.join(older, "checkpoints"))
  latest = ckpt.latest_index()
  ckpt.close()
  shutil.rmtree(os.path.join(older, "checkpoints", str(latest)))  # resumes from the one before
  truncate_largest_data_file(os.path.join(damaged, "checkpoints", str(latest)))
  expected = search.run(tiny_config(cifar10_subset_dir), older)
  with caplog.at_level(logging.WARNING):
    resumed = search.run(tiny_config(cifar10_subset_dir), damaged)
  skipped = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(skipped) == 1 and "\n" not in skipped[0]
  assert skipped[0].startswith(f"checkpoint #{latest} in {damaged}/checkpoints cannot be restored")
  assert resumed.completed and resumed.global_step == expected.global_step == 6
  assert_same_result(expected, resumed)
  assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"]
                                                           for h in expected.history]
  # When no checkpoint restores: one line naming the checkpoint folder and the fix.
  ckpt = checkpointing.Checkpointer(os.path.join(damaged, "checkpoints"))
  for index in ckpt.all_indices():
    truncate_largest_data_file(os.path.join(damaged, "checkpoints", str(index)))
  ckpt.close()
  with pytest.raises(errors.ConfigError, match=rf"no checkpoint in {damaged}/checkpoints can be "
                     r"restored .* start a new --workdir") as e:
    search.run(tiny_config(cifar10_subset_dir), damaged)
  assert "\n" not in str(e.value)


def test_nan_stops_and_keeps_last_good_checkpoint(reference_run, tmp_path, cifar10_subset_dir):
  del reference_run  # shares its compiled functions
  workdir = str(tmp_path)
  config = tiny_config(cifar10_subset_dir, **{"debug.nan_at_step": 3})
  message = (r"non-finite loss or gradient in optimiser step 3 .*"
             r"last good checkpoint \(#\d+, after optimiser step 2\) is kept")
  with pytest.raises(search.NonFiniteError, match=message):
    search.run(config, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  meta = ckpt.restore_meta()
  assert meta["position"]["global_step"] == 2  # saved after step 2, the one before the NaN
  runner_state, _ = ckpt.restore(_abstract_state(config))
  ckpt.close()
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(runner_state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _abstract_state(config):
  from bnas_jax.models import supernet  # pylint: disable=g-import-not-at-top
  from bnas_jax.search_space import spaces  # pylint: disable=g-import-not-at-top
  counts = supernet.cell_counts(config.space, config.model.num_cells)
  shapes = spaces.get_space(config.space).switch_shapes(counts)
  return jax.eval_shape(lambda k: search_steps.init_state(config, 10, shapes, k),
                        jax.random.key(0, impl="rbg"))


def test_two_devices_equal_one_device(reference_run, two_device_run, tmp_path,
                                     cifar10_subset_dir):
  del reference_run  # compiled the 1-device step functions
  one = search.run(tiny_config(cifar10_subset_dir, **TWO_DEVICE_OVERRIDES), str(tmp_path))
  proc, workdir = two_device_run
  rc = proc.wait(timeout=900)
  with open(os.path.join(workdir, "stdout.txt")) as f:
    log = f.read()
  assert rc == 0, log[-3000:]
  assert "global devices: 2" in log
  assert genotype_lib.Genotype.load(os.path.join(workdir, "genotype.json")) == one.genotype
  prior = np.load(os.path.join(workdir, "prior.npz"))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["global_step"] == one.global_step == 2
  for t in one.gamma:
    np.testing.assert_array_equal(prior[f"alive/{t}"], one.alive[t])
    np.testing.assert_allclose(prior[f"gamma/{t}"].mean(0), one.gamma[t], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(summary["val_accuracy"], one.val_accuracy, atol=1e-6)


def test_bad_config_values_are_named(tmp_path, cifar10_subset_dir):
  config = tiny_config(cifar10_subset_dir, **{"search.penalty_mode": "l1"})
  with pytest.raises(ValueError, match="config.search.penalty_mode"):
    search.run(config, str(tmp_path))
  config = tiny_config(cifar10_subset_dir, **{"curvature.kind": "exact"})
  with pytest.raises(ValueError, match="config.curvature.kind"):
    search.run(config, str(tmp_path))
  for field, value in (("bayes.prune_mode", "relatve"), ("bayes.lambda_op", 0.0),
                       ("bayes.prune_threshold", -1.0), ("genotype.max_ops", -1),
                       ("model.dw_impl", "cudnn"), ("model.edge_loop", "while"),
                       ("model.pruned_ops", "drop"), ("model.remat", None),
                       ("model.pool_bn", None), ("model.param_free_bn", None),
                       ("search.batch_size", 0), ("search.eval_batch_size", -2),
                       ("curvature.batch_size", 0), ("model.init_channels", 0),
                       ("model.num_cells", 0)):
    config = tiny_config(cifar10_subset_dir, **{field: value})
    with pytest.raises(ValueError, match=f"config.{field}"):
      search.run(config, str(tmp_path / "never"))
  assert not os.path.exists(tmp_path / "never")  # refused before the workdir is created


def test_checkpointer_keeps_last_n_and_refuses_old_index(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=2)
  state = {"w": np.arange(3, dtype=np.float32), "alive": np.array([True, False])}
  for i in range(4):
    ckpt.save(i, jax.tree.map(lambda x, i=i: x + i if x.dtype != bool else x, state), {"i": i})
  ckpt.wait()
  assert ckpt.all_indices() == [2, 3]
  with pytest.raises(ValueError, match="must be larger"):
    ckpt.save(3, state, {"i": 3})
  restored, meta = ckpt.restore(jax.eval_shape(lambda: jax.tree.map(jax.numpy.asarray, state)))
  assert meta == {"i": 3}
  np.testing.assert_array_equal(restored["w"], state["w"] + 3)
  np.testing.assert_array_equal(restored["alive"], state["alive"])
  ckpt.close()
  with pytest.raises(FileNotFoundError):
    checkpointing.Checkpointer(str(tmp_path / "empty")).restore({})
