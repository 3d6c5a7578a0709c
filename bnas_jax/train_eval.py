r"""Training a discovered architecture from scratch (retraining / "evaluation", spec 7.3, 7.4).

``python -m bnas_jax.main --config experiments/cifar_eval.py --workdir DIR`` (``make train
EXP=cifar_eval``) dispatches here (``config.mode == 'train'``). The genotype is ``config.genotype``:
a registered name (``bayesnas_0.01``, ``darts_v2``, ...) or the path of a genotype JSON file written
by a search (``<search workdir>/genotype.json``); override it with ``--config.genotype=...``.

Protocol (DARTS ``train.py``, the BayesNAS paper's "following DARTS"; `default_config`): 600 epochs
over the 50k CIFAR-10 training images, batch 96, SGD momentum 0.9, lr 0.025 with per-epoch cosine
decay to 0, weight decay 3e-4 (added to the clipped gradient, as torch's SGD does), gradient-norm
clip 5, crop + flip + cutout 16, drop path (DARTS cells) / channel dropout (BayesNAS cells) with a
probability rising linearly ``0.2 * epoch / epochs``, auxiliary head weight 0.4. The test set is
evaluated after every ``eval_every_epochs`` epochs and at the end; the final test error is written to
``<workdir>/results.json``. ImageNet (``experiments/imagenet_eval.py``, DARTS ``train_imagenet.py``):
250 epochs, batch 128, lr 0.1 decayed by 0.97 per epoch, wd 3e-5, label smoothing 0.1, aux 0.4, on
TFDS ``imagenet2012`` (`bnas_jax.data.imagenet`; its ``HELP`` says how to provide it).

Engineering (as in `bnas_jax.search`): one `jax.jit`-ted train step over a 1-D device mesh, batch
sharded (``NamedSharding(mesh, P('data'))``), state replicated; the state is a plain pytree
``{'params', 'batch_stats', 'opt_state', 'step'}``; randomness comes from
``fold_in(key(seed), step)`` (drop path) and the data seed (`bnas_jax.data.pipeline.batch_key`),
so a run resumed from a checkpoint (taken at every epoch end and every ``checkpoint.every_steps``
steps) continues exactly as an uninterrupted one. The run directory, log, checkpoints (one
`run_lib.RunRecord`: the epoch as the stage, the step, the history), stop signals and the step
loop of an epoch come from `bnas_jax.run_lib`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import phases
from bnas_jax import run_lib
from bnas_jax.data import dataset as dataset_lib
from bnas_jax.data import imagenet
from bnas_jax.data import pipeline
from bnas_jax.data import readers
from bnas_jax.data import sharding as sharding_lib
from bnas_jax.models import eval_net
from bnas_jax.models import layers

# Fields that may change when a run is resumed (`config_files.write_config`); the rest would
# change the training trajectory or the network, and are refused while checkpoints exist.
RESUME_SAFE_FIELDS = run_lib.COMMON_RESUME_SAFE_FIELDS + ("model.dw_impl",
                                                          "train.eval_every_epochs")
RESULTS_JSON = "results.json"
NonFiniteError = run_lib.NonFiniteError


def default_config() -> ml_collections.ConfigDict:
  """All fields of a retraining config, with the DARTS CIFAR-10 protocol (spec 7.3)."""
  c = ml_collections.ConfigDict()
  c.mode = "train"
  c.seed = 0  # init and drop-path keys; config.data.seed follows it unless set
  c.distributed = False
  c.genotype = "bayesnas_0.01"  # registered name or genotype JSON path

  c.model = ml_collections.ConfigDict()
  c.model.init_channels = 36
  c.model.num_cells = 20
  c.model.auxiliary = True
  c.model.prev_reduce = "auto"  # BayesNAS cells: 'auto' | 'conv' | 'factorized'
  c.model.drop_mode = ""  # '' = flavour default (DARTS cells: 'path'; BayesNAS: 'channel')
  # Depthwise convs: 'auto' = 'shift_vjp' on CPU, 'lax' on GPU/TPU; every choice computes the
  # same function (bnas_jax.models.layers.depthwise_conv).
  c.model.dw_impl = "auto"
  # 'cells': the DARTS-protocol network of a cell genotype; 'pyramidnet': the PyramidNet of a
  # tree cell (experiments/proxyless_eval.py) with widening `alpha` and conv `groups`.
  c.model.backbone = "cells"
  c.model.alpha = 84.0
  c.model.groups = 2

  c.data = dataset_lib.get_config()  # name, source, data_dir, num_train, num_test, seed, cutout
  c.data.seed = dataset_lib.follow(c, "seed")  # = c.seed unless overridden
  c.data.cutout = 16
  c.data.train_examples = -1  # > 0: train on the first N training images only (CPU variants)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 600
  c.train.batch_size = 96
  c.train.eval_batch_size = 500
  c.train.lr = 0.025
  c.train.lr_min = 0.0
  # 'cosine' (stepped per epoch, to lr_min) | 'cosine_step' (per step, to lr_min) |
  # 'exponential' (x lr_decay per epoch)
  c.train.lr_schedule = "cosine"
  c.train.lr_decay = 0.97
  c.train.momentum = 0.9
  c.train.nesterov = False  # Nesterov momentum (torch SGD(nesterov=True) semantics)
  c.train.weight_decay = 3e-4
  c.train.grad_clip = 5.0  # global-norm clip; <= 0 disables
  c.train.drop_prob = 0.2  # final drop-path / channel-dropout probability
  c.train.aux_weight = 0.4
  c.train.label_smoothing = 0.0
  c.train.max_steps_per_epoch = -1  # > 0 caps every epoch (smoke tests)
  c.train.max_eval_examples = -1  # > 0 evaluates on the first N test examples only
  c.train.eval_every_epochs = 1

  # log_every_steps, progress_bar, checkpoint.* (every_steps > 0: also checkpoint mid-epoch),
  # debug.* (stop_after_steps, nan_at_step, signal_at_step, kill_at_step): `run_lib`.
  return run_lib.add_common_fields(c, checkpoint_every_steps=-1, async_save=True)


# --------------------------------------------------------------------------------------------------
# Pure pieces: model, schedules, steps.


def create_model(config: ml_collections.ConfigDict,
                 num_classes: int | None) -> eval_net.EvalNetwork:
  """The evaluation network of `config.genotype` (see `bnas_jax.models.eval_net`).

  ImageNet names get the ImageNet setting; CIFAR-100 its own; any other data (one's own, TFDS)
  the CIFAR-10 setting (stem, channels, cells) with `num_classes` outputs.
  """
  name = config.data.name
  dataset = ("imagenet" if name.startswith("imagenet")
             else name if name in eval_net.DATASET_DEFAULTS else "cifar10")
  m = config.model
  if m.backbone == "pyramidnet":  # the proxyless search's PyramidNet + tree cell
    from bnas_jax.models import pyramidnet  # pylint: disable=g-import-not-at-top
    return pyramidnet.create_pyramidnet(config.genotype, int(m.num_cells), float(m.alpha),
                                        int(m.groups), num_classes, m.get("dw_impl", "auto"))
  return eval_net.create_eval_net(
      config.genotype, dataset=dataset, num_classes=num_classes,
      init_channels=int(m.init_channels), num_cells=int(m.num_cells),
      auxiliary=bool(m.auxiliary), prev_reduce=m.prev_reduce, drop_mode=m.drop_mode or None,
      dw_impl=m.get("dw_impl", "auto"))


def learning_rate_fn(t: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """lr(step).

  'cosine': ``lr_min + (lr - lr_min) (1 + cos(pi e / epochs)) / 2`` (CosineAnnealingLR stepped
  per epoch, constant within an epoch); 'cosine_step': the same curve over steps,
  ``lr_min + (lr - lr_min) (1 + cos(pi step / (epochs * steps_per_epoch))) / 2`` (optax's
  cosine decay; the proxyless retraining recipe); 'exponential': ``lr * lr_decay ** e`` (DARTS
  ImageNet StepLR(1, 0.97)); e = step // steps_per_epoch.

  Raises:
    ValueError: unknown schedule.
  """
  lr, lr_min, epochs = float(t.lr), float(t.lr_min), int(t.epochs)
  if t.lr_schedule == "cosine_step":
    return optax.cosine_decay_schedule(lr, epochs * steps_per_epoch,
                                       alpha=lr_min / lr if lr > 0 else 0.0)
  if t.lr_schedule == "cosine":
    def fn(step):
      e = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
      return lr_min + 0.5 * (lr - lr_min) * (1.0 + jnp.cos(jnp.pi * e / epochs))
  elif t.lr_schedule == "exponential":
    def fn(step):
      e = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
      return lr * jnp.power(float(t.lr_decay), e)
  else:
    raise ValueError(f"config.train.lr_schedule={t.lr_schedule!r}; use 'cosine', 'cosine_step' or "
                     "'exponential'")
  return fn


def create_optimizer(t: ml_collections.ConfigDict, steps_per_epoch: int):
  """clip(global norm) -> + wd * params -> SGD momentum, Nesterov if ``t.nesterov`` (torch SGD
  semantics, DARTS train.py)."""
  parts = []
  if float(t.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
  parts.append(optax.add_decayed_weights(float(t.weight_decay)))
  parts.append(optax.sgd(learning_rate_fn(t, steps_per_epoch), momentum=float(t.momentum),
                        nesterov=bool(t.get("nesterov", False))))
  return optax.chain(*parts)


def drop_prob_at(t: ml_collections.ConfigDict, epoch: int) -> float:
  """DARTS: ``drop_path_prob * epoch / epochs`` for the (0-based) epoch."""
  return float(t.drop_prob) * epoch / int(t.epochs)


def init_state(model, tx, image_size: int | tuple[int, int, int], key: jax.Array) -> dict:
  """Fresh state pytree ``{'params', 'batch_stats', 'opt_state', 'step': i32[]}`` for images of
  ``image_size`` (a side: square RGB; or ``(H, W, C)``)."""
  x = jnp.zeros((1, *eval_net.image_shape_of(image_size)), jnp.float32)
  variables = model.init({"params": key}, x, train=False)
  params = variables["params"]
  return {"params": params, "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy f32[B] with optional label smoothing."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if smoothing:
    onehot = optax.smooth_labels(onehot, smoothing)
  return optax.softmax_cross_entropy(logits, onehot)


def train_step(state, batch, drop_prob, *, model, tx, seed: int, aux_weight: float,
               label_smoothing: float):
  """One SGD step. Pure; jit it. Returns (new_state, metrics dict of scalars)."""
  key = jax.random.fold_in(jax.random.key(seed), state["step"])

  def loss_fn(params):
    (logits, aux), new_vars = model.apply(
        {"params": params, "batch_stats": state["batch_stats"]}, batch["image"], train=True,
        drop_prob=drop_prob, rngs={"dropout": key}, mutable=["batch_stats"])
    loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
    total = loss
    if aux is not None and aux_weight:
      total = total + aux_weight * jnp.mean(cross_entropy(aux, batch["label"], label_smoothing))
    return total, (loss, logits, new_vars["batch_stats"])

  (total, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  metrics = {"loss": loss, "total_loss": total, "grad_norm": optax.tree.norm(grads),
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
  return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
          "step": state["step"] + 1}, metrics


def test_metrics(eval_fn, batches) -> dict[str, float]:
  """Test loss, accuracy, top-5 accuracy, error (%) and example count over `batches`.

  Args:
    eval_fn: ``batch -> {'loss', 'correct', 'correct5', 'count'}`` sums over the batch (e.g.
      `eval_step` with the variables bound).
    batches: an iterable of batches.
  """
  sums = None
  for batch in batches:
    out = eval_fn(batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = float(sums["count"])
  return {"test_loss": float(sums["loss"]) / n, "test_accuracy": float(sums["correct"]) / n,
          "test_top5_accuracy": float(sums["correct5"]) / n,
          "test_error": 100.0 * (1.0 - float(sums["correct"]) / n), "test_examples": n}


def eval_step(state, batch, *, model):
  """Sums over the (masked) batch: loss, top-1 and top-5 correct, count."""
  logits, _ = model.apply({"params": state["params"], "batch_stats": state["batch_stats"]},
                          batch["image"], train=False)
  mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
  labels = batch["label"]
  k = min(5, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return {"loss": jnp.sum(cross_entropy(logits, labels) * mask),
          "correct": jnp.sum((topk[:, 0] == labels) * mask),
          "correct5": jnp.sum(jnp.any(topk == labels[:, None], -1) * mask),
          "count": jnp.sum(mask)}


# --------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class RetrainData:
  """The loaders of a retraining run.

  Attributes:
    train: the training set's `pipeline.Loader` (crop + flip + cutout) or `imagenet.Loader`.
    test: the test set's loader (file order, last batch padded with a ``'mask'``).
    num_classes: classifier outputs.
    image_shape: ``(H, W, C)`` of the network's input.
  """
  train: Any
  test: Any
  num_classes: int
  image_shape: tuple[int, int, int]


def create_loaders(config: ml_collections.ConfigDict, *, sharding=None,
                   eval_batch_size: int | None = None,
                   max_eval_examples: int | None = None) -> RetrainData:
  """The train and test loaders of `config` (ImageNet names: `bnas_jax.data.imagenet`; others:
  `bnas_jax.data.readers.load_dataset`, the first ``data.train_examples`` training images).

  Args:
    config: a retraining config.
    sharding: the batch sharding (None: one device).
    eval_batch_size: default ``train.eval_batch_size``.
    max_eval_examples: > 0 keeps the first N test examples; default ``train.max_eval_examples``.

  Raises:
    dataset.DatasetError: missing or unreadable data, or images the networks cannot take.
  """
  t, seed = config.train, int(config.data.seed)
  b = int(t.batch_size)
  eb = int(eval_batch_size or t.eval_batch_size)
  limit = int(t.max_eval_examples if max_eval_examples is None else max_eval_examples)
  cap = int(t.max_steps_per_epoch)
  if config.data.name.startswith("imagenet"):
    d = imagenet.load(config.data.data_dir)
    common = dict(seed=seed, mean=d.mean, std=d.std, sharding=sharding)
    return RetrainData(
        imagenet.Loader(d.train, b, train=True, max_steps=cap, **common),
        imagenet.Loader(d.test, eb, train=False, max_steps=-(-limit // eb) if limit > 0 else -1,
                        **common),
        d.num_classes, d.image_shape)
  ds = readers.load_dataset(config.data)
  dataset_lib.check_image_shape(ds.image_shape)
  n = int(config.data.get("train_examples", -1))
  tr_x, tr_y = (ds.train_images[:n], ds.train_labels[:n]) if n > 0 else (ds.train_images,
                                                                         ds.train_labels)
  te_x, te_y = (ds.test_images[:limit], ds.test_labels[:limit]) if limit > 0 else (
      ds.test_images, ds.test_labels)
  if pipeline.steps_per_epoch(len(tr_y), b) == 0:
    raise dataset_lib.DatasetError(f"{len(tr_y)} training examples are fewer than one batch "
                                   f"(config.train.batch_size={b})")
  train = pipeline.Loader(tr_x, tr_y, b, seed, ds.mean, ds.std, augment=True,
                          cutout=int(config.data.cutout), sharding=sharding, max_steps=cap)
  test = pipeline.Loader(te_x, te_y, eb, 0, ds.mean, ds.std, shuffle=False,
                         drop_remainder=False, sharding=sharding)
  return RetrainData(train, test, int(ds.num_classes), ds.image_shape)


# --------------------------------------------------------------------------------------------------
# The run.


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes training of) `config.genotype` from scratch in `workdir`.

  Args:
    config: a retraining config (`default_config` fields; ``experiments/cifar_eval.py``).
    workdir: run directory (config.json, log.txt, tensorboard/, checkpoints/, results.json). A
      workdir that holds checkpoints is resumed from the latest one.

  Returns:
    The results dict also written to ``<workdir>/results.json`` (params, history, final test
    error/accuracy when all epochs are done; ``stopped_by``: the signal that stopped the run, or
    '').

  Raises:
    NonFiniteError: the loss became non-finite (the last good checkpoint is kept).
    ValueError / dataset.DatasetError: bad config values or missing data (named, before
      `workdir` is created).
  """
  return run_lib.execute(config, workdir, RESUME_SAFE_FIELDS, _train,
                         checks=(check_config, check_inputs))


def _train(config: ml_collections.ConfigDict, run_: run_lib.Run) -> dict[str, Any]:
  c, t0 = config, time.time()
  mesh = sharding_lib.make_mesh()
  replicated = NamedSharding(mesh, P())
  data = create_loaders(c, sharding=sharding_lib.batch_sharding(mesh))
  model = create_model(c, data.num_classes)
  steps = data.train.steps
  tx = create_optimizer(c.train, steps)
  init = functools.partial(init_state, model, tx, data.image_shape)
  # Each compilation is logged before it starts (what, and how long it took last time).
  program = json.dumps({"genotype": c.genotype, "model": c.model.to_dict(),
                        "train": c.train.to_dict(), "image_shape": data.image_shape},
                       sort_keys=True, default=str)
  logged = functools.partial(phases.LoggedJit, detail=f"genotype {c.genotype}", program=program)
  train_fn = logged(jax.jit(
      functools.partial(train_step, model=model, tx=tx, seed=int(c.seed),
                        aux_weight=float(c.train.aux_weight),
                        label_smoothing=float(c.train.label_smoothing)),
      donate_argnums=(0,), out_shardings=(replicated, replicated)), "train step")
  eval_fn = logged(jax.jit(functools.partial(eval_step, model=model), out_shardings=replicated),
                   "eval step")
  lr_fn = learning_rate_fn(c.train, steps)

  counts = eval_net.param_counts(model, image_size=data.image_shape)
  epochs = int(c.train.epochs)
  logging.info("genotype %s: %s params (aux head %s), %d steps/epoch, %d epochs", c.genotype,
               f"{counts['params']:,}", f"{counts['aux_params']:,}", steps, epochs)
  restored = run_.restore(run_lib.abstract_state(init, jax.random.key(0), replicated))
  if restored is None:
    state = logged(jax.jit(init, out_shardings=replicated), "state initialisation")(
        jax.random.key(int(c.seed)))
    record = run_lib.RunRecord()
  else:
    state, record = restored
  pos, history = record.position, list(record.history)

  ended = run_lib.FINISHED
  while pos.stage < epochs:  # stage = epoch
    epoch = pos.stage
    drop = jnp.asarray(drop_prob_at(c.train, epoch), jnp.float32)

    def flush(carry, p, seconds, n, epoch=epoch, drop=drop):
      m = jax.device_get(carry[1])
      if not all(np.isfinite(v) for v in m.values()):
        raise run_.nonfinite(f"training metrics {m}", f"epoch {epoch + 1}, optimiser step "
                             f"{p.global_step}", "Lower config.train.lr or check the data")
      m.update(lr=float(lr_fn(p.global_step - 1)), drop_prob=float(drop),
               step_time_s=seconds / max(n, 1))
      run_.writer.write_scalars(p.global_step, m, log=False, prefix="train/")
      return carry

    (state, _), pos, ended = run_.train_stage(
        (state, None), pos, data.train.epoch(epoch, pos.step),
        lambda carry, batch, drop=drop: train_fn(carry[0], batch, drop), steps=steps,
        desc=f"train epoch {epoch + 1}/{epochs}", flush=flush,
        save=lambda carry, p: run_.save(carry[0], run_lib.RunRecord(p, history)))
    if ended != run_lib.FINISHED:
      break
    pos = pos.next_stage()
    entry = {"epoch": pos.stage, "wall_s": time.time() - t0}
    if pos.stage % max(1, int(c.train.eval_every_epochs)) == 0 or pos.stage == epochs:
      entry.update(test_metrics(functools.partial(eval_fn, state), data.test.epoch(0)))
      run_.writer.write_scalars(pos.global_step,
                                {k: v for k, v in entry.items() if k.startswith("test_")})
    history.append(entry)
    logging.info("epoch %d/%d: %s", pos.stage, epochs,
                 json.dumps(entry, default=run_lib.to_json_value))
    run_.save(state, run_lib.RunRecord(pos, history))
    if pos.stage < epochs and run_.stop.agreed():
      ended = run_lib.STOPPED
      break
  if ended == run_lib.STOPPED:
    run_.stopped_warning(pos)
  run_.checkpoints.wait()
  result = {"genotype": c.genotype, "epochs_done": pos.stage, "epochs": epochs, **counts,
            "steps_per_epoch": steps, "history": history,
            "wall_s_this_process": time.time() - t0,
            "stopped_by": run_.stop.name if ended == run_lib.STOPPED else ""}
  if pos.stage == epochs and history and "test_error" in history[-1]:
    result.update({k: v for k, v in history[-1].items() if k.startswith("test_")})
  if run_.is_main:
    with open(os.path.join(run_.workdir, RESULTS_JSON), "w") as f:
      json.dump(result, f, indent=2, default=run_lib.to_json_value)
  return result


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` naming a bad model field, batch size or common field, before the
  workdir is created."""
  run_lib.check_common_fields(config)
  config_files.check_batch_sizes({f"train.{k}": config.train[k]
                                  for k in ("batch_size", "eval_batch_size")}, jax.device_count())
  try:
    layers.resolve_dw_impl(config.model.get("dw_impl", "auto"))
  except ValueError as e:
    raise errors.ConfigError(f"config.model.dw_impl: {e}") from None
  try:
    learning_rate_fn(config.train, 1)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  if config.model.backbone not in ("cells", "pyramidnet"):
    raise errors.ConfigError(f"config.model.backbone={config.model.backbone!r}; use 'cells' (a "
                             "cell genotype) or 'pyramidnet' (a tree cell)")
  try:
    create_model(config, num_classes=None)  # genotype, prev_reduce, drop_mode, dataset
  except ValueError as e:
    raise errors.ConfigError(f"config.genotype / config.model: {e}") from None
  except OSError as e:  # a genotype JSON file that exists but cannot be read
    raise errors.ConfigError(
        f"config.genotype={config.genotype!r} cannot be read ({e.strerror or e}); pass a readable "
        "genotype JSON file or a registered genotype name") from None


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Opens the data `config` names (`bnas_jax.data.dataset.check_data`); run before the workdir
  is created. The genotype file is read by `check_config`.

  Raises:
    dataset.DatasetError: missing or unreadable data (naming config.data.data_dir).
  """
  dataset_lib.check_data(config.data)
