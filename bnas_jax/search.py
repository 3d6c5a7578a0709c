"""BayesNAS search runner: Algorithm 1 with T outer iterations (spec 4.4, 5, 11).

`run(config, workdir)` walks a precomputed stage plan (`plan`), with all state checkpointed so a
killed run resumes exactly:

1. ``search.warmup_epochs`` warm-up stages: one epoch each on the network weights only (switches
   frozen at 1) on the ``'warmup'`` split (spec 5 step 1; cutout ``config.data.cutout``), then the
   supernet's val accuracy;
2. for t = 1..T (``search.iterations``) two stages:

   a. ``search``: one epoch on weights and switches on the ``'search'`` split (spec 5 step 2): two
      SGD optimisers with momentum (weights: ``search.lr`` / ``search.weight_decay``; switches:
      ``search.switch_lr``, no weight decay), loss = mean NLL + the reweighted group-l1 penalty
      `bayes.penalty` (``search.penalty_mode='subgradient'``, as the original) or NLL followed by
      the group soft-threshold `bayes.prox_group_l1` (``'proximal'``); pruned switches stay
      exactly 0;
   b. ``update``: a curvature pass (``curvature.kind`` of `bnas_jax.curvature.CURVATURE_FNS` over
      ``curvature.num_batches`` batches of the search split, averaged: the curvature of the
      *mean* loss, times ``bayes.curvature_scale``, see below), `bayes.update` (gamma, omega, C,
      pruning), then one host view (`search_outputs.HostView`: alive mask, scores, genotype)
      handed to the evaluation on the ``'val'`` split (the test set is never used for
      decisions), the iteration's record and its files under ``<workdir>/iterations/tNN/``. The
      supernet of the next epoch is built with the new static ``alive`` mask (pruned ops cost no
      compute; the step functions are compiled once per mask);
3. ``<workdir>/genotype.json`` + cell pictures, ``prior.npz`` and ``summary.json``.

The run's position is `run_lib.Position` (stage index in the plan, step inside it, optimiser
steps); checkpoint meta holds it and the history (one record per evaluated stage), nothing else.
A finished run resumed with a larger T continues where its plan ended.

Where things are: the config (`bnas_jax.search_config`), the model, state and pure step
functions with their compile cache (`bnas_jax.search_steps`), the host view and the files
(`bnas_jax.search_outputs`), the workdir, checkpoints, signals and the step loop of a stage
(`bnas_jax.run_lib`), the data (`bnas_jax.data`).

Curvature units (spec 4.1, 4.3, 6.4). The epoch minimises ``E_D + sum_g lambda_k omega_g ||S_g||``
with ``E_D`` the *mean* NLL. Divided by lambda this is ``E_D / lambda + sum_g omega_g ||S_g||``: the
negative log of the likelihood tempered by ``1/lambda`` times the tangent-bounded HARD prior, whose
Laplace precision for a switch is ``1/gamma + h / lambda`` with ``h`` the curvature of the same
mean loss. So ``H = curvature_scale * h / lambda`` with ``bayes.curvature_scale = 1`` (the default)
is the precision consistent with the loss the switches are trained on; lambda is then the one
temperature shared by the penalty and the update. (The original's h was a *sum* over its last
18-image batch with quirky constants, spec 6.3, and its lambdas 0.005-0.01 were tuned against that;
``curvature_scale = 18`` with those lambdas mimics it, and puts ``gamma * H`` far above 1 where
gamma follows the switch size alone, see `bayes.calibration`, logged every iteration.)

Data parallelism: one `jax.jit`-ted step over a 1-D mesh of all devices (axis ``'data'``), the
batch sharded (``NamedSharding(mesh, P('data'))``) and the state replicated; XLA's SPMD partitioner
inserts the gradient all-reduce and computes train-mode batch-norm statistics over the *global*
batch, so any device count gives the single-device result (up to float reassociation).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from bnas_jax import bayes
from bnas_jax import curvature as curvature_lib
from bnas_jax import metrics as metrics_lib
from bnas_jax import phases
from bnas_jax import run_lib
from bnas_jax import search_outputs
from bnas_jax import search_steps
from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import pipeline
from bnas_jax.data import readers
from bnas_jax.data import sharding as sharding_lib
from bnas_jax.search_config import (RESUME_SAFE_FIELDS, check_config, check_inputs,  # pylint: disable=unused-import
                                    curvature_batch_size, curvature_scale, default_config,
                                    load_nb201_table)
from bnas_jax.search_space import spaces

WARMUP, SEARCH, UPDATE = "warmup", "search", "update"
NonFiniteError = run_lib.NonFiniteError


class Stage(NamedTuple):
  """One stage of the plan: ``kind`` (WARMUP, SEARCH or UPDATE) and ``index`` (the 0-based
  warm-up epoch, or the 1-based outer iteration t)."""
  kind: str
  index: int


def plan(config: ml_collections.ConfigDict) -> tuple[Stage, ...]:
  """The stages of a search: the warm-up epochs, then (search epoch, prior update) per iteration."""
  warmup = tuple(Stage(WARMUP, e) for e in range(int(config.search.warmup_epochs)))
  return warmup + tuple(Stage(kind, t) for t in range(1, int(config.search.iterations) + 1)
                        for kind in (SEARCH, UPDATE))


@dataclasses.dataclass
class SearchResult:
  """What `run` returns (also written to ``<workdir>/summary.json``).

  Attributes:
    completed: False if the run stopped early (SIGINT / SIGTERM, ``debug.stop_after_steps``).
    genotype: the final `bnas_jax.genotype.Genotype` (None if not completed).
    gamma: group prior variances ``{tau: f32[E, K]}`` (numpy) at the end.
    alive: group mask ``{tau: bool[E, K]}`` at the end.
    val_accuracy: supernet accuracy on the val split after the last iteration (or warm-up).
    history: one dict per finished outer iteration (val accuracy, live switches, genotype, ...).
    global_step: optimiser steps taken.
    stopped_by: the signal that stopped the run ('' otherwise).
  """
  completed: bool
  genotype: Any
  gamma: dict[str, np.ndarray]
  alive: dict[str, np.ndarray]
  val_accuracy: float | None
  history: list[dict[str, Any]]
  global_step: int
  stopped_by: str = ""


def phase_seed(data_seed: int, stream: str) -> int:
  """A fixed per-stream data seed (warm-up, search, curvature batches are independent streams)."""
  return int(data_seed) * 1000 + {"warmup": 1, "search": 2, "curvature": 3}[stream]


def run(config: ml_collections.ConfigDict, workdir: str) -> SearchResult:
  """Runs (or resumes) a BayesNAS search described by `config` in `workdir`.

  Args:
    config: a search config (`default_config` fields; see ``experiments/*.py``).
    workdir: the run directory. If it holds checkpoints the run resumes from the latest.

  Returns:
    a `SearchResult`.

  Raises:
    NonFiniteError: a non-finite loss/gradient/prior state (the last good checkpoint is kept).
    ValueError: a bad config value (`errors.ConfigError`, named, before `workdir` is created),
      e.g. a batch size that is not a positive multiple of the device count; missing or
      unreadable data (`dataset.DatasetError`) or a named NAS-Bench-201 table that does not load
      (`check_inputs`), also before `workdir` is created; a checkpoint of an older format or
      another layout (`errors.ConfigError`, one line naming the fix).
  """
  return run_lib.execute(config, workdir, RESUME_SAFE_FIELDS, _search,
                         checks=(check_config, check_inputs))


def _search(config: ml_collections.ConfigDict, run_: run_lib.Run) -> SearchResult:
  if run_.is_main:
    _write_seeds(config, run_.workdir)
  logging.info("search space %s, %d devices (%s), workdir %s", config.space, jax.device_count(),
               jax.default_backend(), run_.workdir)
  searcher = _Search(config, run_)
  try:
    return searcher.run()
  finally:
    searcher.close()


class _Search:
  """The per-run objects of a search (data, mesh, step functions) and its stages."""

  def __init__(self, config: ml_collections.ConfigDict, run_: run_lib.Run):
    c = self.config = config
    self.run_ = run_
    self.space = spaces.get_space(c.space)
    self.mesh = sharding_lib.make_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    ds = readers.load_dataset(c.data)
    dataset_lib.check_image_shape(ds.image_shape)
    self.image_shape, self.num_classes = ds.image_shape, int(ds.num_classes)
    splits = pipeline.make_splits(ds, dict(c.data.splits), int(c.data.seed))
    common = dict(mean=ds.mean, std=ds.std, sharding=sharding_lib.batch_sharding(self.mesh))
    b, cap, seed = int(c.search.batch_size), int(c.search.max_steps_per_epoch), int(c.data.seed)
    val_x, val_y = splits["val"]
    if int(c.search.max_eval_examples) > 0:
      val_x, val_y = val_x[:int(c.search.max_eval_examples)], val_y[:int(c.search.max_eval_examples)]
    self.loaders = {
        WARMUP: pipeline.Loader(*splits["warmup"], b, phase_seed(seed, "warmup"), augment=True,
                                cutout=int(c.data.cutout), max_steps=cap, **common),
        SEARCH: pipeline.Loader(*splits["search"], b, phase_seed(seed, "search"), augment=True,
                                cutout=int(c.search.switch_cutout), max_steps=cap, **common),
        "val": pipeline.Loader(val_x, val_y, int(c.search.eval_batch_size), 0, shuffle=False,
                               drop_remainder=False, **common),
        "curvature": pipeline.Loader(*splits["search"], curvature_batch_size(c),
                                     phase_seed(seed, "curvature"), **common)}
    for name in (WARMUP, SEARCH):
      if self.loaders[name].steps == 0:
        raise dataset_lib.DatasetError(
            f"the {name!r} split ({len(splits[name][1])} examples) is smaller than one batch "
            f"({b}); enlarge config.data.splits.{name}")
    m, curv = int(c.curvature.num_batches), self.loaders["curvature"]
    if curv.steps < m:
      raise dataset_lib.DatasetError(
          f"curvature.num_batches={m} batches of {curv.batch_size} need {m * curv.batch_size} "
          f"search examples, the split has {len(curv.labels)}")
    self.switch_shapes = self.space.switch_shapes(search_steps.cell_counts(c))
    self.nb201_table = load_nb201_table(c)  # None: no look-ups (warned once if unnamed)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                       thread_name_prefix="compile_ahead")
    self._compiling: list[concurrent.futures.Future] = []

  # ---- state and step functions -----------------------------------------------------------------

  def fns(self, alive) -> search_steps.StepFns:
    """The step functions of mask `alive` (compiled once per mask, shared across runs)."""
    return search_steps.step_fns(search_steps.StepKey.create(self.config, self.num_classes,
                                                             alive, self.mesh))

  def restore_or_init(self) -> tuple[Any, run_lib.RunRecord]:
    init = functools.partial(search_steps.init_state, self.config, self.num_classes,
                             self.switch_shapes, image_shape=self.image_shape)
    restored = self.run_.restore(run_lib.abstract_state(init, search_steps.init_key(0),
                                                        self.replicated))
    if restored is not None:
      return restored
    logging.info("starting a new search in %s", self.run_.workdir)
    logged = phases.LoggedJit(jax.jit(init), "state initialisation", program=repr(
        (search_steps.StepKey.create(self.config, self.num_classes, None, self.mesh),
         self.switch_shapes, self.image_shape)))
    # Computed on one device and replicated: identical for any device count.
    return (run_lib.replicate(logged(search_steps.init_key(int(self.config.seed))),
                              self.replicated), run_lib.RunRecord())

  def view(self, state) -> search_outputs.HostView:
    return search_outputs.HostView.create(
        self.space, state["prior"], state["switches"], max_ops=int(self.config.genotype.max_ops),
        nb201_table=self.nb201_table)

  # ---- the loop ---------------------------------------------------------------------------------

  def run(self) -> SearchResult:
    if int(self.config.search.iterations) == 0:
      logging.warning("config.search.iterations=0: no prior update runs, so nothing is searched "
                      "or pruned; the genotype is read from the initial prior (every op alive). "
                      "Set it to 1 or more to search.")
    state, record = self.restore_or_init()
    pos, history = record.position, list(record.history)
    stages = plan(self.config)
    view = self.view(state)  # the host view of the current prior: alive mask, scores, genotype
    if pos.stage < len(stages):  # while this thread compiles the next step, compile what follows
      first = stages[pos.stage]
      t = (first.index if first.kind == SEARCH
           else 1 if first.kind == WARMUP and any(s.kind == SEARCH for s in stages) else None)
      self.compile_ahead(state, view.alive, evaluate=True, curvature_t=t)
    while pos.stage < len(stages):
      stage = stages[pos.stage]
      fns = self.fns(view.alive)
      if stage.kind == UPDATE:
        state, view, entry = self.update(state, pos, stage.index, fns)
        history.append(entry)
      else:
        state, pos, ended = self.train_epoch(state, pos, stage, fns, history)
        if ended != run_lib.FINISHED:
          return self.result(view, pos, history, completed=False)
        if stage.kind == WARMUP:
          # Checkpoint the epoch's end before the evaluation (whose compilation can take
          # minutes): a kill there costs only the evaluation (a resume runs no step, then
          # evaluates).
          self.run_.save(state, run_lib.RunRecord(pos, history))
          if self.run_.stop.agreed():
            return self.result(view, pos, history, completed=False)
          ev = self.evaluate(state, fns)
          self.run_.writer.write_scalars(pos.global_step, ev, prefix="warmup/")
          history.append({"warmup_epoch": stage.index + 1, "global_step": pos.global_step, **ev})
      pos = pos.next_stage()
      self.run_.save(state, run_lib.RunRecord(pos, history))
      if pos.stage < len(stages) and self.run_.stop.agreed():
        return self.result(view, pos, history, completed=False)
    if self.run_.checkpoints.latest_index() is None:  # an empty plan: the initial state is final
      self.run_.save(state, run_lib.RunRecord(pos, history))
    return self.result(view, pos, history, completed=True)

  def train_epoch(self, state, pos: run_lib.Position, stage: Stage, fns, history):
    """Runs (the rest of) the warm-up or search epoch of `stage`; ``(state, pos, ended)``."""
    c = self.config
    loader = self.loaders[stage.kind]
    step_fn = fns.warmup_step if stage.kind == WARMUP else fns.search_step
    if stage.kind == WARMUP:
      data_epoch, desc = stage.index, f"warm-up {stage.index + 1}/{c.search.warmup_epochs}"
    else:
      data_epoch, desc = stage.index - 1, f"search t={stage.index}/{c.search.iterations}"

    def flush(carry, p, seconds, n):
      """Fetches the device sums, checks finiteness, writes metrics; fresh sums."""
      host = jax.device_get(carry[1])
      if int(host["nonfinite"]) > 0:
        raise self.run_.nonfinite(
            "loss or gradient", f"optimiser step {int(host['first_bad_step']) + 1} ({stage.kind} "
            f"stage {p.stage}, t={stage.index})", "Lower search.lr / search.switch_lr or check "
            "the data")
      steps, count = max(float(host["steps"]), 1.0), max(float(host["count"]), 1.0)
      scalars = {"loss": host["loss"] / steps, "nll": host["nll"] / steps,
                 "accuracy": host["correct"] / count, "grad_norm": host["grad_norm"] / steps,
                 "step_time_s": seconds / max(n, 1), "epoch_step": p.step}
      if stage.kind == SEARCH:
        scalars.update(penalty=host["penalty"] / steps, iteration=stage.index,
                       switch_grad_norm=host["switch_grad_norm"] / steps)
      self.run_.writer.write_scalars(p.global_step, scalars, prefix=f"{stage.kind}/")
      return carry[0], run_lib.replicate(search_steps.new_train_acc(), self.replicated)

    (state, _), pos, ended = self.run_.train_stage(
        (state, run_lib.replicate(search_steps.new_train_acc(), self.replicated)), pos,
        loader.epoch(data_epoch, pos.step), lambda carry, batch: step_fn(*carry, batch),
        steps=loader.steps, desc=desc, flush=flush,
        save=lambda carry, p: self.run_.save(carry[0], run_lib.RunRecord(p, history)))
    return state, pos, ended

  def evaluate(self, state, fns) -> dict[str, float]:
    """Supernet loss/accuracy on the val split (batch norm per ``search.eval_bn``)."""
    acc = run_lib.replicate(search_steps.new_eval_acc(), self.replicated)
    for batch in self.loaders["val"].epoch(0):
      acc = fns.eval_step(state, acc, batch)
    host = jax.device_get(acc)
    count = max(float(host["count"]), 1.0)
    return {"val_accuracy": float(host["correct"]) / count, "val_nll": float(host["nll"]) / count}

  def curvature_batches(self, t: int):
    """The M curvature batches of outer iteration `t` (search split, no augmentation)."""
    return itertools.islice(self.loaders["curvature"].epoch(t - 1),
                            int(self.config.curvature.num_batches))

  def curvature_key(self, state, t: int) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), t)

  def curvature(self, state, t: int, fns):
    """Mean-loss curvature diagonal over the M batches of iteration `t`, times
    ``bayes.curvature_scale``: ``{tau: f32[n, E, K]}``."""
    c = self.config
    h = curvature_lib.accumulate(
        fns.curvature_fn, state["switches"], {k: state[k] for k in ("params", "batch_stats")},
        self.curvature_batches(t), self.curvature_key(state, t),
        progress=phases.PassProgress(int(c.curvature.num_batches),
                                     f"curvature pass t={t}/{c.search.iterations}",
                                     log=self.run_.is_main,
                                     bar=bool(c.progress_bar) and self.run_.is_main))
    scale = curvature_scale(c)
    return jax.tree.map(lambda x: x * scale, h)

  def update(self, state, pos: run_lib.Position, t: int, fns):
    """Curvature pass + prior update + one host view + eval + record of iteration `t`."""
    c, t0 = self.config, time.perf_counter()
    h = self.curvature(state, t, fns)
    gamma_prev, switches_prev = state["prior"].gamma, state["switches"]
    prior, switches = fns.prior_update(state["prior"], state["switches"], h)
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(
        (h, prior.gamma, prior.omega, prior.posterior_variance))):
      raise self.run_.nonfinite("curvature or prior state", f"the update after optimiser step "
                                f"{pos.global_step} (t={t})", "Lower search.lr / "
                                "search.switch_lr or check the data")
    old_alive = state["prior"].alive
    state = dict(state, prior=prior, switches=switches)
    view = self.view(state)
    if t < int(c.search.iterations) and any(
        not np.array_equal(view.alive[k], np.asarray(old_alive[k])) for k in view.alive):
      # Pruned: the next epoch runs new programs; compile them while this thread evaluates.
      self.compile_ahead(state, view.alive, train=True, curvature_t=t + 1)
    seconds = time.perf_counter() - t0
    ev = self.evaluate(state, self.fns(view.alive))  # the supernet of the new mask
    summ = {k: float(v) for k, v in jax.device_get(bayes.summaries(view.prior)).items()}
    calib = {k: float(v) for k, v in jax.device_get(bayes.calibration(gamma_prev,
                                                                        view.prior)).items()}
    entry = search_outputs.iteration_record(t, pos.global_step, ev, view, summ, calib, seconds)
    writer, step = self.run_.writer, pos.global_step
    writer.write_scalars(step, summ, log=False, prefix="prior/")
    writer.write_scalars(step, calib, log=False, prefix="calibration/")
    writer.write_scalars(step, {k: v for k, v in entry.items() if isinstance(v, (int, float))},
                         prefix="iteration/")
    writer.write_text(step, "genotype", str(view.genotype))
    search_outputs.log_iteration(entry, summ, calib)
    folder = os.path.join(self.run_.workdir, "iterations", f"t{t:02d}")
    if self.run_.is_main:
      search_outputs.write_outputs(folder, view, {
          "gamma_prev": gamma_prev, "switches_prev": switches_prev, "h": h})
    metrics_lib.write_prior_histograms(writer, step, view.prior, view.switches)
    metrics_lib.write_picture(writer, step, os.path.join(folder, "genotype.png"))
    return state, view, entry

  def result(self, view: search_outputs.HostView, pos: run_lib.Position, history,
             *, completed: bool) -> SearchResult:
    """Ends the run: on completion the final outputs and summary; else the stop's log line."""
    self.run_.checkpoints.wait()
    iterations = [h for h in history if "iteration" in h]
    val = next((h["val_accuracy"] for h in reversed(history) if "val_accuracy" in h), None)
    if completed and self.run_.is_main:
      search_outputs.write_outputs(self.run_.workdir, view)
      summary = search_outputs.write_summary(self.run_.workdir, view, global_step=pos.global_step,
                                             val_accuracy=val, history=iterations)
      metrics_lib.write_hparams(self.run_.writer, pos.global_step, self.config, summary)
    if completed:
      logging.info("search finished: genotype %s, val accuracy %s", view.genotype, val)
    else:
      self.run_.stopped_warning(pos)
    return SearchResult(completed=completed, genotype=view.genotype if completed else None,
                        gamma=view.gamma, alive=view.alive, val_accuracy=val, history=iterations,
                        global_step=pos.global_step,
                        stopped_by="" if completed else self.run_.stop.name)

  # ---- compiling ahead --------------------------------------------------------------------------

  def compile_ahead(self, state, alive, *, train: bool = False, evaluate: bool = False,
                    curvature_t: int | None = None) -> None:
    """Starts compiling step functions of mask `alive` in background threads: the train step,
    the evaluation, the curvature pass of iteration `curvature_t`.

    ``jit(f).lower(*args).compile()`` fills f's own compilation cache, so the first real call
    runs at once. The abstract arguments come from the same loaders as the real calls (one
    batch each), so the signatures match. A failure is logged and left to the real call. Off
    with ``search.compile_ahead=False``.
    """
    if not bool(self.config.search.compile_ahead):
      return
    fns = self.fns(alive)
    spec = lambda tree: jax.tree.map(_abstract, tree)
    replicate = lambda tree: run_lib.replicate(tree, self.replicated)
    jobs = []
    if train:
      batch = next(dataclasses.replace(self.loaders[SEARCH], max_steps=1).epoch(0))
      jobs.append(("train_step", fns.train_step, (spec(state), spec(replicate(
          search_steps.new_train_acc())), spec(batch), True)))
    if evaluate:
      jobs.append(("eval_step", fns.eval_step, (spec(state), spec(replicate(
          search_steps.new_eval_acc())), spec(next(self.loaders["val"].epoch(0))))))
    if curvature_t is not None:
      variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
      key = jax.random.fold_in(self.curvature_key(state, curvature_t), 0)
      jobs.append(("curvature_fn", fns.curvature_fn, (
          spec(state["switches"]), spec(variables),
          spec(next(self.curvature_batches(curvature_t))), key)))
    for name, fn, args in jobs:
      self._compiling.append(self._pool.submit(_compile, name, fn, args))

  def wait_compiles(self) -> None:
    """Blocks until the background compilations have finished."""
    for f in self._compiling:
      f.result()
    self._compiling = []

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


def _abstract(x):
  """A jax.Array's abstract value with its sharding (what `jit(...).lower` needs)."""
  if isinstance(x, jax.Array) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding,
                                weak_type=x.aval.weak_type)
  return x


def _compile(name: str, fn, args) -> None:
  """Compiles `fn` (a `phases.LoggedJit`: it logs the compilation) for `args` ahead of its call."""
  try:
    fn.precompile(*args, ahead=True)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("compiling %s ahead failed (%s: %s); it compiles on its first call instead",
                    name, type(e).__name__, e)


def _write_seeds(config, workdir: str) -> None:
  seeds = {"seed": int(config.seed), "data_seed": int(config.data.seed),
           "streams": {s: phase_seed(int(config.data.seed), s)
                       for s in ("warmup", "search", "curvature")},
           "jax_version": jax.__version__}
  with open(os.path.join(workdir, "seeds.json"), "w") as f:
    json.dump(seeds, f, indent=2)
