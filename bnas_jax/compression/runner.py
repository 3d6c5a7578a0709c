r"""``mode='compress'`` runs: compress an ordinary network with the HARD prior, or a baseline.

Usage::

  python -m bnas_jax.main --config experiments/compress_lenet5.py:cpu --workdir runs/compress_lenet5

The plan of a run is a list of stages, each one epoch-sized chunk of work (compression spec 3.2,
7.1):

1. ``pretrain`` (``pretrain.epochs`` epochs of the dense network; skipped when ``pretrained_dir``
   names an exported dense network, e.g. the ``pretrained/`` folder of an earlier run, so that
   every method starts from the same checkpoint). Its result is saved as ``<workdir>/pretrained``.
2. ``compress`` (``compress.iterations`` outer iterations of ``compress.epochs_per_iteration``
   epochs each), by ``method``:

   * ``'bayesnas'``: train weights and switches on ``E_D + lambda sum omega_g |s_g|``, then the
     GGN curvature, `bayes.update` (reweighting, hierarchy) and pruning (`train.prior_step`);
   * ``'group_lasso'`` (baseline B1, spec 7.2): the same switches, optimiser, penalty step and
     ``eps_s`` threshold with omega = 1 (no curvature, no gamma), i.e. network slimming's L1 on the
     switches;
   * ``'l1_filter'`` (B2) and ``'random'`` (B3) prune at once from the pretrained network (L1 norm
     of each filter / neuron, ``baseline.ratio`` per layer; or uniformly at random with the per
     layer counts of ``baseline.kept``) and spend the compression budget fine-tuning instead.
   ``'dense'`` stops after pretraining (the shared starting point of a benchmark).
3. export (spec 2.4) to ``<workdir>/exported`` (``structure.json`` with the counts, the weights);
4. ``finetune`` (``finetune.epochs`` epochs of the exported network, no penalty);
5. the test error, once, and ``<workdir>/result.json`` with the fields of spec 4.7 (the kept
   structure, weights / params / MACs dense and kept and their ratios, val and test error).

A checkpoint is written after every stage (and every ``checkpoint.every_steps`` steps); a run
stopped by a signal or killed resumes from it with the same data order and keys, and ends with
the same result as an uninterrupted run (tests/test_compression_runner.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnas_jax import bayes
from bnas_jax import errors
from bnas_jax import run_lib
from bnas_jax.compression import baselines
from bnas_jax.compression import compress_config
# The config half of this runner lives in compress_config; main and the experiments reach it here.
from bnas_jax.compression.compress_config import (METHODS, RESULT_JSON, RESUME_SAFE_FIELDS,
                                                  check_config, check_inputs, default_config,
                                                  load_data, make_arch)

__all__ = ["CompressResult", "Stage", "plan", "run", "METHODS", "RESULT_JSON", "RESUME_SAFE_FIELDS",
           "check_config", "check_inputs", "default_config", "load_data", "make_arch"]
from bnas_jax.compression import export
from bnas_jax.compression import groups
from bnas_jax.compression import networks
from bnas_jax.compression import train

# -------------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Stage:
  kind: str  # 'pretrain' | 'compress' | 'finetune'
  index: int  # epoch (pretrain, finetune) or outer iteration t (compress, 1-based)
  epochs: int


def plan(config) -> list[Stage]:
  """The stages of a run (module docstring)."""
  c = config
  stages = []
  if not c.pretrained_dir:
    stages += [Stage("pretrain", e, 1) for e in range(int(c.pretrain.epochs))]
  if c.method == "dense":
    return stages
  t_max, e_in = int(c.compress.iterations), int(c.compress.epochs_per_iteration)
  if c.method in ("bayesnas", "group_lasso"):
    stages += [Stage("compress", t, e_in) for t in range(1, t_max + 1)]
    ft = int(c.finetune.epochs)
  else:  # prune at once, fine-tune for the whole budget (spec 7.1: same total epochs)
    ft = t_max * e_in + int(c.finetune.epochs)
  stages += [Stage("finetune", e, 1) for e in range(ft)]
  return stages


# -------------------------------------------------------------------------------------------------
# The run.


class _Runner:
  """One run: the plan, the data and the state between stages."""

  def __init__(self, config, workdir: str, run: run_lib.Run):
    self.c, self.workdir, self.run = config, workdir, run
    self.arch = make_arch(config)
    self.data = load_data(config)
    self.stages = plan(config)
    self.first_ft = next((i for i, s in enumerate(self.stages) if s.kind == "finetune"),
                         len(self.stages))
    self.reweight = config.method == "bayesnas"
    # Per-group weights m (lambda_g = lambda m_g) for the penalty methods; None = unweighted.
    self.cost = (groups.cost_weights(self.arch, config.compress.cost_weighting)
                 if config.method in ("bayesnas", "group_lasso") else None)

  # -- state -----------------------------------------------------------------------------------

  def _dense_variables(self) -> dict[str, Any]:
    if self.c.pretrained_dir:
      arch, v = export.load(self.c.pretrained_dir)
      if dataclasses.replace(arch, fc_in_dropout=0.0, fc_dropout=0.0, convs=tuple(
          dataclasses.replace(l, dropout=0.0) for l in arch.convs)) != dataclasses.replace(
              self.arch, fc_in_dropout=0.0, fc_dropout=0.0,
              convs=tuple(dataclasses.replace(l, dropout=0.0) for l in self.arch.convs)):
        raise errors.ConfigError(f"config.pretrained_dir={self.c.pretrained_dir!r} holds a "
                                 f"{networks.structure(arch)} {arch.name}, not the "
                                 f"{networks.structure(self.arch)} {self.arch.name} of config.model")
      return v
    return networks.init_variables(self.arch, jax.random.key(int(self.c.seed)))

  def _full_state(self, variables) -> dict[str, Any]:
    sw = groups.init_switches(self.arch)
    cfg = compress_config.step_config(self.c, "compress")
    return {"train": train.init_state(variables, sw, cfg), "prior": bayes.init(sw)}

  def _initial_state(self) -> dict[str, Any]:
    return self._full_state(self._dense_variables())

  def _exported_state(self, arch, variables) -> dict[str, Any]:
    return {"train": train.init_state(variables, None, compress_config.step_config(self.c, "finetune"))}

  def _abstract(self, pos: run_lib.Position):
    exported = pos.stage > self.first_ft or (pos.stage == self.first_ft and pos.step > 0)
    if exported:
      arch, _ = export.load(os.path.join(self.workdir, "exported"))
      fn = lambda: self._exported_state(arch, networks.init_variables(arch, jax.random.key(0)))
    else:
      fn = lambda: self._full_state(networks.init_variables(self.arch, jax.random.key(0)))
    return jax.eval_shape(fn)

  # -- stages ----------------------------------------------------------------------------------

  def execute(self):
    run, c = self.run, self.c
    record = run_lib.RunRecord()
    state = None
    latest = run.checkpoints.latest_index()
    if latest is not None:
      meta = run.checkpoints.restore_meta(latest) or {}
      pos = run_lib.Position(**meta.get("position", {}))
      restored = run.restore(self._abstract(pos))
      state, record = restored
    pos = record.position
    if state is None:
      state = self._initial_state()
    arch = self.arch
    if pos.stage > self.first_ft or (pos.stage == self.first_ft and pos.step > 0):
      arch, _ = export.load(os.path.join(self.workdir, "exported"))
    history = list(record.history)

    while pos.stage < len(self.stages):
      stage = self.stages[pos.stage]
      if stage.kind == "finetune" and pos.stage == self.first_ft and pos.step == 0:
        try:
          arch, state = self._export(state, history)
        except groups.LayerCollapsedError as e:
          return self._collapsed(state, history, e), run_lib.FINISHED
      if stage.kind == "compress" and stage.index == 1 and pos.step == 0:  # fresh optimisers
        fresh = train.init_state({"params": state["train"].params}, state["train"].switches,
                                 compress_config.step_config(c, "compress"))
        state = self._with_train(state, state["train"]._replace(opt_w=fresh.opt_w,
                                                                opt_s=fresh.opt_s))
        if self.reweight and c.compress.initial_update:
          state = self._initial_update(state)
      state, pos, ended, summary = self._train_stage(stage, arch, state, pos, history)
      if ended != run_lib.FINISHED:
        run.stopped_warning(pos)
        return None, ended
      if stage.kind == "compress":
        state, summary = self._prior_update(stage, state, summary)
      if stage.kind == "pretrain" and pos.stage + 1 == len(
          [s for s in self.stages if s.kind == "pretrain"]):
        self._save_pretrained(state)
      history.append(summary)
      pos = pos.next_stage()
      run.save(state, run_lib.RunRecord(pos, history))
    if c.method == "dense" and not any(s.kind == "pretrain" for s in self.stages):
      raise errors.ConfigError("method='dense' with pretrained_dir has nothing to do")
    if c.method != "dense" and self.first_ft == len(self.stages):  # no fine-tune epochs
      try:
        arch, state = self._export(state, history)
      except groups.LayerCollapsedError as e:
        return self._collapsed(state, history, e), run_lib.FINISHED
    return self._finish(arch, state, history), run_lib.FINISHED

  def _train_stage(self, stage: Stage, arch, state, pos, history):
    c, run, data = self.c, self.run, self.data
    kind = stage.kind
    cfg = compress_config.step_config(c, kind)
    train_step, _ = train.make_step_fns(arch, cfg)
    bs = compress_config.batch_size(c, kind)
    spe = len(train.epoch_batches(len(data.train_y), bs, 0, 0))
    steps = spe * stage.epochs
    full = "prior" in state
    lam = (train.lambda_at(stage.index, int(c.compress.iterations), float(c.compress.lam),
                           float(c.compress.lambda_ramp)) if kind == "compress" else 0.0)
    if kind == "compress":
      omega = train.sparsity_penalty_omega(state["prior"], self.reweight, self.cost)
      alive = state["prior"].alive
      ts = state["train"]
    else:  # pretraining (switches all 1) or fine-tuning (exported net): no switches
      omega, alive = {}, {}
      ts = state["train"]._replace(switches={}, opt_s=())
    seed = int(c.data.seed)
    stage_seed = seed * 1_000_003 + pos.stage

    def batches(start):
      for i in range(start, steps):
        e, k = divmod(i, spe)
        idx = train.epoch_batches(len(data.train_y), bs, stage_seed, e)[k]
        yield {"image": data.train_x[idx], "label": data.train_y[idx], "e": e, "k": k}

    def step_fn(carry, batch):
      ts_, pending = carry
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(stage_seed), batch["e"]),
                               batch["k"])
      ts_, m = train_step(ts_, batch["image"], batch["label"], key, data.mean, data.std, omega,
                          alive, jnp.float32(lam), augment=data.augment)
      return ts_, pending + [m]

    sums = {}

    def flush(carry, p, seconds, n):
      ts_, pending = carry
      ms = jax.device_get(pending)
      for m in ms:
        for k, v in m.items():
          if not np.isfinite(v):
            raise run.nonfinite(k, f"{kind} stage {stage.index} step {p.step}",
                                "Lower the learning rate or lambda")
          sums[k] = sums.get(k, 0.0) + float(v)
      sums["n"] = sums.get("n", 0) + len(ms)
      if ms:
        run.writer.write_scalars(p.global_step, {k: float(np.mean([m[k] for m in ms]))
                                                 for k in ms[0]}, prefix=f"{kind}/", log=False)
      return ts_, []

    def save(carry, p):
      ts_ = carry[0]
      if kind != "compress" and full:  # the stored state keeps the layout of the full network
        ts_ = ts_._replace(switches=state["train"].switches, opt_s=state["train"].opt_s)
      run.save(self._with_train(state, ts_), run_lib.RunRecord(p, history))

    (ts, _), pos, ended = run.train_stage((ts, []), pos, batches(pos.step), step_fn, steps=steps,
                                          desc=f"{kind} {stage.index}", flush=flush, save=save)
    if kind != "compress" and full:
      ts = ts._replace(switches=state["train"].switches, opt_s=state["train"].opt_s)
    state = self._with_train(state, ts)
    n = max(sums.pop("n", 1), 1)
    summary = {"stage": kind, "index": stage.index, **{k: v / n for k, v in sums.items()}}
    if ended == run_lib.FINISHED:
      summary["val_error"] = self._val_error(arch, state)
      if kind == "compress":
        summary["lambda"] = lam
      run.writer.write_scalars(pos.global_step, {"val_error": summary["val_error"]},
                               prefix=f"{kind}/")
      logging.info("%s %d: %s", kind, stage.index, summary)
    return state, pos, ended, summary

  @staticmethod
  def _with_train(state, ts):
    return dict(state, train=ts)

  def _val_error(self, arch, state) -> float:
    ts = state["train"]
    full = "prior" in state
    _, eval_step = train.make_step_fns(arch, compress_config.step_config(self.c, "finetune"))
    alive = state["prior"].alive if full else {}
    return train.evaluate(eval_step, ts, alive, self.data.val_x, self.data.val_y,
                          self.data)["error"]

  def _curvature(self, ts, prior, iteration: int):
    c = self.c
    curv_fn = train.make_curvature_fn(self.arch, c.compress.curvature)
    h = train.curvature(curv_fn, ts, prior.alive, self.data,
                        batch_size=int(c.compress.curvature_batch_size),
                        num_batches=int(c.compress.curvature_batches), seed=int(c.data.seed),
                        iteration=iteration)
    for v in h.values():
      if not np.all(np.isfinite(np.asarray(v))):
        raise self.run.nonfinite("curvature", f"compress iteration {iteration}",
                                 "Lower the learning rate or lambda")
    return h

  def _initial_update(self, state):
    """The prior update at t = 0, on the pretrained network, without pruning: omega starts from
    the network's curvature instead of 1 (``compress.initial_update``)."""
    c = self.c
    ts, prior = state["train"], state["prior"]
    lam = train.lambda_at(1, int(c.compress.iterations), float(c.compress.lam),
                          float(c.compress.lambda_ramp))
    h = self._curvature(ts, prior, 0)
    if self.cost is not None:
      h = train.cost_scaled_curvature(h, self.cost)
    prior = bayes.update(prior, ts.switches, h, lambda_origin=lam, lambda_op=lam,
                         prune_threshold=0.0)
    omega = np.concatenate([np.asarray(w).reshape(-1) for w in prior.omega.values()])
    logging.info("initial prior update (t = 0): omega quantiles 10/50/90 %% = %s",
                 np.quantile(omega, [0.1, 0.5, 0.9]))
    return dict(state, prior=prior)

  def _prior_update(self, stage: Stage, state, summary):
    c = self.c
    ts, prior = state["train"], state["prior"]
    lam = summary.get("lambda", float(c.compress.lam))
    if self.reweight:
      h = self._curvature(ts, prior, stage.index)
    else:
      h = {tau: jnp.zeros_like(s) for tau, s in ts.switches.items()}
    gamma_prev = prior.gamma
    prior = train.prior_step(prior, ts.switches, h, lam=lam,
                             prune_threshold=float(c.compress.prune_threshold),
                             eps_s=float(c.compress.eps_s), reweight=self.reweight,
                             prune_rule=c.compress.prune_rule, cost=self.cost)
    masks = groups.unit_masks(self.arch, prior.alive)
    try:
      masks = groups.propagate(self.arch, masks)
    except groups.LayerCollapsedError as e:
      logging.warning("%s", e)
    else:
      prior = prior._replace(alive={k: jnp.asarray(v) for k, v in
                                    groups.group_alive(self.arch, masks).items()})
    ts = ts._replace(switches=bayes.apply_mask(ts.switches, prior.alive))
    kept = groups.kept_counts(self.arch, groups.unit_masks(self.arch, prior.alive))
    summary = dict(summary, live_units=kept)
    if self.reweight:
      scalars = {k: float(v) for k, v in bayes.calibration(gamma_prev, prior).items()}
      self.run.writer.write_scalars(stage.index, scalars, prefix="calibration/", log=False)
    self.run.writer.write_scalars(stage.index, {f"live/{k}": v for k, v in kept.items()},
                                  log=False)
    stats = {}
    for tau, sw in ts.switches.items():
      live = np.asarray(prior.alive[tau])
      a, w = np.abs(np.asarray(sw)[0])[live], np.broadcast_to(np.asarray(prior.omega[tau]),
                                                               live.shape)[live]
      if a.size:
        stats[tau] = f"|s| {np.median(a):.3g} omega {np.median(w):.3g}"
    logging.info("compress %d: lambda %.3g, live units %s; live medians %s", stage.index, lam,
                 kept, stats)
    return dict(state, train=ts, prior=prior), summary

  def _export(self, state, history):
    c = self.c
    ts = state["train"]
    variables = {"params": ts.params}
    if self.arch.batch_norm:
      variables["batch_stats"] = ts.batch_stats
    if c.method in ("bayesnas", "group_lasso"):
      masks = groups.unit_masks(self.arch, state["prior"].alive)
      switches = ts.switches
    elif c.method == "l1_filter":
      masks = baselines.l1_masks(self.arch, variables, float(c.baseline.ratio))
      switches = None
    else:
      counts = baselines.parse_structure(self.arch, c.baseline.kept)
      masks = baselines.random_masks(self.arch, counts, int(c.seed))
      switches = None
    arch, v = export.export(self.arch, variables, switches, masks)
    metrics = export.metrics(self.arch, arch)
    export.save(os.path.join(self.workdir, "exported"), arch, v, metrics)
    logging.info("exported %s: %s", arch.name, metrics)
    self.run.writer.write_text(0, "exported/structure", metrics["kept_structure"])
    return arch, self._exported_state(arch, v)

  def _collapsed(self, state, history, error) -> dict[str, Any]:
    """result.json of a run whose pruning removed a whole layer: the masked network is a
    constant function (its errors are reported), nothing is kept or fine-tuned."""
    c, data = self.c, self.data
    logging.warning("%s: no export, no fine-tuning", error)
    _, eval_step = train.make_step_fns(self.arch, compress_config.step_config(c, "finetune"))
    alive = state["prior"].alive
    test = train.evaluate(eval_step, state["train"], alive, data.test_x, data.test_y, data)
    val = train.evaluate(eval_step, state["train"], alive, data.val_x, data.val_y, data)
    dense = networks.count(self.arch)
    result = {"method": c.method, "seed": int(c.seed), "test_err": test["error"],
              "val_err": val["error"], "lambda": float(c.compress.lam),
              "cost_weighting": c.compress.cost_weighting,
              "ratio": float(c.baseline.ratio), "collapsed": str(error),
              "kept_structure": "collapsed", "weights_dense": dense["weights"], "weights_kept": 0,
              "params_dense": dense["params"], "params_kept": 0, "macs_dense": dense["macs"],
              "macs_kept": 0, "cr_w": float("inf"), "cr_all": float("inf"),
              "macs_ratio": float("inf"), "cr_bits": None, "history": history}
    with open(os.path.join(self.workdir, RESULT_JSON), "w") as f:
      json.dump(result, f, indent=2, default=run_lib.to_json_value)
    return result

  def _save_pretrained(self, state):
    ts = state["train"]
    v = {"params": ts.params}
    if self.arch.batch_norm:
      v["batch_stats"] = ts.batch_stats
    err = self._val_error(self.arch, state)
    export.save(os.path.join(self.workdir, "pretrained"), self.arch, v, {"val_error": err})

  def _finish(self, arch, state, history) -> dict[str, Any]:
    c, data = self.c, self.data
    ts = state["train"]
    full = "prior" in state
    _, eval_step = train.make_step_fns(arch, compress_config.step_config(c, "finetune"))
    alive = state["prior"].alive if full else {}
    test = train.evaluate(eval_step, ts, alive, data.test_x, data.test_y, data)
    val = train.evaluate(eval_step, ts, alive, data.val_x, data.val_y, data)
    result = {"method": c.method, "seed": int(c.seed), "test_err": test["error"],
              "val_err": val["error"], "lambda": float(c.compress.lam),
              "cost_weighting": c.compress.cost_weighting,
              "ratio": float(c.baseline.ratio),
              "epochs_total": int(sum(s.epochs for s in self.stages if s.kind != "pretrain")),
              "cr_bits": None, **export.metrics(self.arch, arch), "history": history}
    v = {"params": ts.params}
    if arch.batch_norm:
      v["batch_stats"] = ts.batch_stats
    export.save(os.path.join(self.workdir, "final"), arch, v, {
        k: result[k] for k in result if k != "history"})
    with open(os.path.join(self.workdir, RESULT_JSON), "w") as f:
      json.dump(result, f, indent=2, default=run_lib.to_json_value)
    self.run.writer.write_scalars(len(self.stages), {"final/test_err": test["error"],
                                                     "final/val_err": val["error"],
                                                     "final/cr_w": result["cr_w"],
                                                     "final/macs_ratio": result["macs_ratio"]})
    logging.info("result: %s", {k: v for k, v in result.items() if k != "history"})
    return result


@dataclasses.dataclass
class CompressResult:
  """What `run` returns: ``result`` (the result.json dict, None if stopped) and ``stopped_by``."""
  result: dict[str, Any] | None
  stopped_by: str = ""


def run(config: ml_collections.ConfigDict, workdir: str) -> CompressResult:
  """Runs (or resumes) the compression run of `config` in `workdir` (module docstring).

  Raises:
    errors.ConfigError: a bad config field or a workdir of another config.
    bnas_jax.data.dataset.DatasetError: missing or bad data.
    errors.NonFiniteError: the run diverged (the last good checkpoint is kept).
  """
  check_config(config)
  check_inputs(config)
  with run_lib.open_workdir(config, workdir, RESUME_SAFE_FIELDS) as wd:
    r = run_lib.Run(config, wd)
    try:
      runner = _Runner(config, wd, r)
      result, ended = runner.execute()
    finally:
      r.close()
  stopped = r.stop.name if ended == run_lib.STOPPED else ""
  return CompressResult(result, stopped)
