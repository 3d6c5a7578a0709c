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
TFDS ``imagenet2012`` (the ImageNet section of this file; `IMAGENET_HELP` says how to provide it).

Engineering (as in `bnas_jax.search`): one `jax.jit`-ted train step over a 1-D device mesh, batch
sharded (``NamedSharding(mesh, P('data'))``), state replicated; the state is a plain pytree
``{'params', 'batch_stats', 'opt_state', 'step'}``; randomness comes from
``fold_in(key(seed), step)`` (drop path) and the data seed (`input_pipeline.batch_key`), so a run
resumed from a checkpoint (`bnas_jax.checkpointing`, taken at every epoch end and every
``checkpoint.every_steps`` steps) continues exactly as an uninterrupted one; TensorBoard scalars,
a log file and a tqdm progress bar come from `bnas_jax.metrics`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from bnas_jax import checkpointing
from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import input_pipeline
from bnas_jax import metrics as metrics_lib
from bnas_jax import phases
from bnas_jax.models import eval_net
from bnas_jax.models import layers

# Fields that may change when a run is resumed (`config_files.write_config`); the rest would
# change the training trajectory or the network, and are refused while checkpoints exist.
RESUME_SAFE_FIELDS = ("log_every_steps", "progress", "checkpoint.", "data.data_dir",
                      "model.dw_impl", "train.stop_after_steps", "train.eval_every_epochs",
                      "distributed")
RESULTS_JSON = "results.json"


class NonFiniteError(errors.NonFiniteError):
  """The training loss became NaN/inf (the last good checkpoint is kept)."""


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
  # Depthwise convs: 'auto' = 'shift_vjp' on CPU, 'lax' on GPU/TPU (the fastest measured step);
  # every choice computes the same function (bnas_jax.models.layers.depthwise_conv).
  c.model.dw_impl = "auto"

  c.data = input_pipeline.get_config()  # name, source, data_dir, num_train, num_test, seed, cutout
  c.data.seed = input_pipeline.follow(c, "seed")  # = c.seed unless overridden
  c.data.cutout = 16
  c.data.train_examples = -1  # > 0: train on the first N training images only (CPU variants)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 600
  c.train.batch_size = 96
  c.train.eval_batch_size = 500
  c.train.lr = 0.025
  c.train.lr_min = 0.0
  c.train.lr_schedule = "cosine"  # 'cosine' (per epoch, to lr_min) | 'exponential' (x lr_decay)
  c.train.lr_decay = 0.97
  c.train.momentum = 0.9
  c.train.weight_decay = 3e-4
  c.train.grad_clip = 5.0  # global-norm clip; <= 0 disables
  c.train.drop_prob = 0.2  # final drop-path / channel-dropout probability
  c.train.aux_weight = 0.4
  c.train.label_smoothing = 0.0
  c.train.max_steps_per_epoch = -1  # > 0 caps every epoch (smoke tests)
  c.train.max_eval_examples = -1  # > 0 evaluates on the first N test examples only
  c.train.eval_every_epochs = 1
  c.train.stop_after_steps = -1  # > 0: checkpoint and stop at this global step (preemption test)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = -1  # > 0: also checkpoint mid-epoch every N steps
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  c.log_every_steps = 50
  c.progress = True
  return c


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
  return eval_net.create_eval_net(
      config.genotype, dataset=dataset, num_classes=num_classes,
      init_channels=int(m.init_channels), num_cells=int(m.num_cells),
      auxiliary=bool(m.auxiliary), prev_reduce=m.prev_reduce, drop_mode=m.drop_mode or None,
      dw_impl=m.get("dw_impl", "auto"))


def learning_rate_fn(t: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable:
  """lr(step): constant within an epoch (torch schedulers stepped per epoch).

  'cosine': ``lr_min + (lr - lr_min) (1 + cos(pi e / epochs)) / 2`` (CosineAnnealingLR);
  'exponential': ``lr * lr_decay ** e`` (DARTS ImageNet StepLR(1, 0.97)); e = step // steps_per_epoch.

  Raises:
    ValueError: unknown schedule.
  """
  lr, lr_min, epochs = float(t.lr), float(t.lr_min), int(t.epochs)
  if t.lr_schedule == "cosine":
    def fn(step):
      e = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
      return lr_min + 0.5 * (lr - lr_min) * (1.0 + jnp.cos(jnp.pi * e / epochs))
  elif t.lr_schedule == "exponential":
    def fn(step):
      e = jnp.floor_divide(step, steps_per_epoch).astype(jnp.float32)
      return lr * jnp.power(float(t.lr_decay), e)
  else:
    raise ValueError(f"config.train.lr_schedule={t.lr_schedule!r}; use 'cosine' or 'exponential'")
  return fn


def create_optimizer(t: ml_collections.ConfigDict, steps_per_epoch: int):
  """clip(global norm) -> + wd * params -> SGD momentum (torch SGD semantics, DARTS train.py)."""
  parts = []
  if float(t.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(t.grad_clip)))
  parts.append(optax.add_decayed_weights(float(t.weight_decay)))
  parts.append(optax.sgd(learning_rate_fn(t, steps_per_epoch), momentum=float(t.momentum)))
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


@dataclasses.dataclass
class _Data:
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  image_size: int = 32  # ImageNet (decoded per batch): the crop size

  @property
  def host_decoded(self) -> bool:
    """ImageNet: images decoded and augmented on the host per batch (`_imagenet_batches`)."""
    return isinstance(self.train_images, _TfdsImages)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the network's input."""
    if self.host_decoded:
      return (self.image_size, self.image_size, 3)
    return tuple(int(d) for d in self.train_images.shape[1:])


def load_data(config: ml_collections.ConfigDict) -> _Data:
  """CIFAR via `input_pipeline.load_dataset`; ImageNet via TFDS (`_imagenet_source`)."""
  if config.data.name.startswith("imagenet"):
    return _imagenet_source(config)
  ds = input_pipeline.load_dataset(config.data)
  n = int(config.data.get("train_examples", -1))
  tr_x, tr_y = ds.train_images, ds.train_labels
  if n > 0:
    tr_x, tr_y = tr_x[:n], tr_y[:n]
  return _Data(tr_x, tr_y, ds.test_images, ds.test_labels, ds.num_classes, ds.mean, ds.std)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_HELP = (
    "ImageNet is read with TensorFlow Datasets as 'imagenet2012' in the array_record format. "
    "It cannot be downloaded automatically: get ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org, put them in <manual_dir>, then run "
    "`tfds build imagenet2012 --manual_dir <manual_dir> --data_dir <data_dir> "
    "--file_format array_record` and pass --config.data.data_dir=<data_dir>.")


class _TfdsImages:
  """Lazy random-access ImageNet split: ``len``, ``[i] -> (u8[H, W, 3], label)``."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    rec = self._source[int(i)]
    return np.asarray(rec["image"]), int(rec["label"])


def _imagenet_source(config) -> _Data:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    kw = {"data_dir": config.data.data_dir} if config.data.data_dir else {}
    train = tfds.data_source("imagenet2012", split="train", **kw)
    test = tfds.data_source("imagenet2012", split="validation", **kw)
  except Exception as e:  # pylint: disable=broad-except
    raise input_pipeline.DatasetNotFoundError(
        f"ImageNet (TFDS imagenet2012) is not available ({type(e).__name__}: {e}). "
        f"{IMAGENET_HELP}") from e
  return _Data(_TfdsImages(train), None, _TfdsImages(test), None, 1000,
               np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32),
               image_size=224)


def _random_resized_crop(rng: np.random.Generator, img, size: int):
  """torchvision RandomResizedCrop(size) (scale 0.08-1, ratio 3/4-4/3) + flip, with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = img.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      break
  else:
    ch = cw = min(h, w)
    y, x = (h - ch) // 2, (w - cw) // 2
  out = np.asarray(Image.fromarray(img[y:y + ch, x:x + cw]).resize((size, size), Image.BILINEAR))
  return out[:, ::-1] if rng.random() < 0.5 else out


def _center_crop(img, size: int):
  """Resize the short side to size / 0.875 (256 for 224), centre crop size x size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = img.shape[:2]
  s = int(round(size / 0.875)) / min(h, w)
  im = Image.fromarray(img).resize((max(size, round(w * s)), max(size, round(h * s))),
                                   Image.BILINEAR)
  a = np.asarray(im)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def _imagenet_batches(split: _TfdsImages, *, batch_size, seed, epoch, mean, std, train,
                      start_step=0, sharding=None, max_steps=-1) -> Iterator[dict]:
  """ImageNet batches (host decode/augment with PIL; brightness/contrast/saturation jitter 0.4
  per image as DARTS' ColorJitter, without its hue term)."""
  n = len(split)
  order = input_pipeline.epoch_permutation(n, seed, epoch) if train else np.arange(n)
  steps = n // batch_size if train else -(-n // batch_size)
  if max_steps > 0:
    steps = min(steps, max_steps)
  for step in range(start_step, steps):
    rng = np.random.default_rng([seed, epoch, step])
    idx = order[step * batch_size:(step + 1) * batch_size]
    valid = len(idx)
    idx = np.concatenate([idx, np.zeros(batch_size - valid, idx.dtype)])
    imgs, labels = [], []
    for i in idx:
      img, label = split[i]
      if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
      if train:
        img = _random_resized_crop(rng, img, 224).astype(np.float32) / 255.0
        for f in rng.permutation(3):
          a = rng.uniform(0.6, 1.4)
          ref = (0.0 if f == 0 else img.mean() if f == 1
                 else img.mean(-1, keepdims=True))
          img = np.clip(ref + a * (img - ref), 0.0, 1.0)
      else:
        img = _center_crop(img, 224).astype(np.float32) / 255.0
      imgs.append((img - mean) / std)
      labels.append(label)
    batch = {"image": np.stack(imgs).astype(np.float32), "label": np.asarray(labels, np.int32),
             "mask": (np.arange(batch_size) < valid).astype(np.float32)}
    yield (input_pipeline.shard_batch(batch, sharding, batch_size) if sharding is not None
           else {k: jnp.asarray(v) for k, v in batch.items()})


# --------------------------------------------------------------------------------------------------
# The loop.


def _to_py(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).item()
  raise TypeError(f"not JSON serialisable: {type(x)}")


class _Trainer:
  """Holds the per-run objects; `run` is the entry point."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = c = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.mesh = input_pipeline.make_mesh()
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = input_pipeline.batch_sharding(self.mesh)
    self.data = load_data(c)
    input_pipeline.check_image_shape(self.data.image_shape)
    self.model = create_model(c, self.data.num_classes)
    n_train = len(self.data.train_images)
    steps = input_pipeline.steps_per_epoch(n_train, int(c.train.batch_size))
    if steps == 0:
      raise ValueError(f"{n_train} training examples are fewer than one batch "
                       f"(config.train.batch_size={c.train.batch_size})")
    cap = int(c.train.max_steps_per_epoch)
    self.steps_per_epoch = min(steps, cap) if cap > 0 else steps
    self.tx = create_optimizer(c.train, self.steps_per_epoch)
    self.writer = metrics_lib.MetricWriter(os.path.join(workdir, "tensorboard"),
                                           enabled=self.is_main)
    self.ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(c.checkpoint.max_to_keep),
        async_save=bool(c.checkpoint.async_save))
    self.save_index = self.ckpt.latest_index() or 0
    self.history: list[dict[str, Any]] = []
    self._init = functools.partial(init_state, self.model, self.tx, self.data.image_shape)
    # Each compilation is logged before it starts (what, and how long it took last time).
    program = json.dumps({"genotype": c.genotype, "model": c.model.to_dict(),
                          "train": c.train.to_dict(), "image_shape": self.data.image_shape},
                         sort_keys=True, default=str)
    self._logged = functools.partial(phases.LoggedJit, detail=f"genotype {c.genotype}",
                                     program=program)
    self.train_step = self._logged(jax.jit(
        functools.partial(train_step, model=self.model, tx=self.tx, seed=int(c.seed),
                          aux_weight=float(c.train.aux_weight),
                          label_smoothing=float(c.train.label_smoothing)),
        donate_argnums=(0,), out_shardings=(self.replicated, self.replicated)), "train step")
    self.eval_step = self._logged(jax.jit(functools.partial(eval_step, model=self.model),
                                          out_shardings=self.replicated), "eval step")

  # ---- state ------------------------------------------------------------------------------------

  def abstract_state(self):
    shapes = jax.eval_shape(self._init, jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                        shapes)

  def restore_or_init(self):
    if self.ckpt.latest_index() is not None:
      # The newest checkpoint that restores (damaged ones are skipped with a warning each).
      index, state, meta = self.ckpt.restore_newest(self.abstract_state())
      self.history = list(meta.get("history", []))
      logging.info("resumed from checkpoint %d: epoch %d, step %d", index, meta["epoch"],
                   meta["step"])
      return state, int(meta["epoch"]), int(meta["step"])
    init = self._logged(jax.jit(self._init, out_shardings=self.replicated), "state initialisation")
    return init(jax.random.key(int(self.config.seed))), 0, 0

  def save(self, state, epoch: int, step: int):
    self.save_index += 1
    if self.config.checkpoint.async_save:
      state = jax.tree.map(jnp.copy, state)  # live buffers are donated to the next step
    self.ckpt.save(self.save_index, state, {"epoch": epoch, "step": step,
                                             "global_step": epoch * self.steps_per_epoch + step,
                                             "history": self.history})

  # ---- batches ----------------------------------------------------------------------------------

  def train_batches(self, epoch: int, start_step: int):
    c, d = self.config, self.data
    if d.host_decoded:
      return _imagenet_batches(d.train_images, batch_size=int(c.train.batch_size),
                               seed=int(c.data.seed), epoch=epoch, mean=d.mean, std=d.std,
                               train=True, start_step=start_step, sharding=self.batch_sharding,
                               max_steps=self.steps_per_epoch)
    it = input_pipeline.epoch_batches(
        d.train_images, d.train_labels, batch_size=int(c.train.batch_size), seed=int(c.data.seed),
        epoch=epoch, mean=d.mean, std=d.std, augment=True, cutout=int(c.data.cutout),
        start_step=start_step, sharding=self.batch_sharding)
    return (b for _, b in zip(range(start_step, self.steps_per_epoch), it))

  def evaluate(self, state) -> dict[str, float]:
    c, d = self.config, self.data
    bs = int(c.train.eval_batch_size)
    limit = int(c.train.max_eval_examples)
    if d.host_decoded:
      max_steps = -(-limit // bs) if limit > 0 else -1
      it = _imagenet_batches(d.test_images, batch_size=bs, seed=0, epoch=0, mean=d.mean,
                             std=d.std, train=False, sharding=self.batch_sharding,
                             max_steps=max_steps)
    else:
      x, y = d.test_images, d.test_labels
      if limit > 0:
        x, y = x[:limit], y[:limit]
      it = input_pipeline.epoch_batches(x, y, batch_size=bs, seed=0, epoch=0, mean=d.mean,
                                        std=d.std, shuffle=False, drop_remainder=False,
                                        sharding=self.batch_sharding)
    return test_metrics(functools.partial(self.eval_step, state), it)

  # ---- loop -------------------------------------------------------------------------------------

  def run(self) -> dict[str, Any]:
    c = self.config
    t0 = time.time()
    counts = eval_net.param_counts(self.model, image_size=self.data.image_shape)
    logging.info("genotype %s: %s params (aux head %s), %d steps/epoch, %d epochs",
                 c.genotype, f"{counts['params']:,}", f"{counts['aux_params']:,}",
                 self.steps_per_epoch, int(c.train.epochs))
    state, epoch, start = self.restore_or_init()
    epochs = int(c.train.epochs)
    log_every = max(1, int(c.log_every_steps))
    ckpt_every = int(c.checkpoint.every_steps)
    stop_at = int(c.train.stop_after_steps)
    stopped = False
    while epoch < epochs and not stopped:
      drop = jnp.asarray(drop_prob_at(c.train, epoch), jnp.float32)
      bar = metrics_lib.Progress(self.steps_per_epoch, f"train epoch {epoch + 1}/{epochs}",
                                 initial=start, enabled=self.is_main and bool(c.progress))
      acc: dict[str, float] = {}
      n_acc = 0
      step = start
      for batch in self.train_batches(epoch, start):
        state, m = self.train_step(state, batch, drop)
        step += 1
        gstep = epoch * self.steps_per_epoch + step
        if step % log_every == 0 or step == self.steps_per_epoch:
          m = jax.device_get(m)
          if not all(np.isfinite(v) for v in m.values()):
            self.ckpt.wait()
            raise NonFiniteError(f"non-finite training metrics {m} at epoch {epoch} step {step}; "
                                 f"the last good checkpoint is kept in {self.ckpt.directory}")
          m["lr"] = float(learning_rate_fn(c.train, self.steps_per_epoch)(gstep - 1))
          m["drop_prob"] = float(drop)
          self.writer.write_scalars(gstep, m, log=False, prefix="train/")
          bar.update(0, loss=m["loss"], acc=m["accuracy"])
        bar.update(1)
        if 0 < stop_at <= gstep:
          stopped = True
          break
        if ckpt_every > 0 and step % ckpt_every == 0 and step < self.steps_per_epoch:
          self.save(state, epoch, step)
      bar.close()
      if stopped and step < self.steps_per_epoch:
        self.save(state, epoch, step)
        break
      epoch, start = epoch + 1, 0
      record = {"epoch": epoch, "wall_s": time.time() - t0}
      if epoch % max(1, int(c.train.eval_every_epochs)) == 0 or epoch == epochs:
        record.update(self.evaluate(state))
        self.writer.write_scalars(epoch * self.steps_per_epoch, {
            k: v for k, v in record.items() if k.startswith("test_")})
      self.history.append(record)
      logging.info("epoch %d/%d: %s", epoch, epochs, json.dumps(record, default=_to_py))
      self.save(state, epoch, 0)
    self.ckpt.wait()
    result = {"genotype": c.genotype, "epochs_done": epoch, "epochs": epochs, **counts,
              "steps_per_epoch": self.steps_per_epoch, "history": self.history,
              "wall_s_this_process": time.time() - t0}
    if epoch == epochs and self.history and "test_error" in self.history[-1]:
      result.update({k: v for k, v in self.history[-1].items() if k.startswith("test_")})
    if self.is_main:
      with open(os.path.join(self.workdir, RESULTS_JSON), "w") as f:
        json.dump(result, f, indent=2, default=_to_py)
    self.state = state
    return result

  def close(self):
    self.ckpt.close()
    self.writer.close()


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `errors.ConfigError` naming a bad model field or batch size, before the workdir is
  created."""
  config_files.check_batch_sizes({f"train.{k}": config.train[k]
                                  for k in ("batch_size", "eval_batch_size")}, jax.device_count())
  try:
    layers.resolve_dw_impl(config.model.get("dw_impl", "auto"))
  except ValueError as e:
    raise errors.ConfigError(f"config.model.dw_impl: {e}") from None
  try:
    create_model(config, num_classes=None)  # genotype, prev_reduce, drop_mode, dataset
  except ValueError as e:
    raise errors.ConfigError(f"config.genotype / config.model: {e}") from None
  except OSError as e:  # a genotype JSON file that exists but cannot be read
    raise errors.ConfigError(
        f"config.genotype={config.genotype!r} cannot be read ({e.strerror or e}); pass a readable "
        "genotype JSON file or a registered genotype name") from None


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Opens the data `config` names (`input_pipeline.check_data`); run before the workdir is
  created. The genotype file is read by `check_config`.

  Raises:
    input_pipeline.DatasetError: missing or unreadable data (naming config.data.data_dir).
  """
  input_pipeline.check_data(config.data)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes training of) `config.genotype` from scratch in `workdir`.

  Args:
    config: a retraining config (`default_config` fields; ``experiments/cifar_eval.py``).
    workdir: run directory (config.json, log.txt, tensorboard/, checkpoints/, results.json). A
      workdir that holds checkpoints is resumed from the latest one.

  Returns:
    The results dict also written to ``<workdir>/results.json`` (params, history, final test
    error/accuracy when all epochs are done).

  Raises:
    NonFiniteError: the loss became non-finite.
    ValueError / input_pipeline.DatasetError: bad config values or missing data (named, before
      `workdir` is created).
  """
  check_config(config)
  check_inputs(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  with (metrics_lib.LogFile(workdir) if is_main else contextlib.nullcontext()):
    if is_main:
      config_files.write_config(config, workdir, RESUME_SAFE_FIELDS)
    trainer = _Trainer(config, workdir)
    try:
      return trainer.run()
    finally:
      trainer.close()
