r"""Using a trained network: load a retraining run's evaluation network, score it on the test set.

Command line (prints the test accuracy of the newest checkpoint, or of ``--step``)::

  python -m bnas_jax.evaluate --workdir runs/cifar_eval
  python -m bnas_jax.evaluate --workdir runs/cifar_eval --step 1500 --max_examples 1000 \
      --data_dir ~/.cache/bnas_jax/cifar-10-batches-bin

Python::

  from bnas_jax import evaluate
  net = evaluate.load("runs/cifar_eval")          # newest checkpoint; step=N picks another
  logits = net.logits(images)                     # f32[B, classes], eval mode
  print(evaluate.metrics_on_test_set(net)["test_accuracy"])

`load` reads the run's stored config (``<workdir>/config.json``, written by `bnas_jax.train_eval`)
and one checkpoint of ``<workdir>/checkpoints``; it needs neither the data nor the trainer. The
network is rebuilt from the stored config (its ``genotype``: a registered name or the genotype JSON
path the run was started with, which must still exist); the number of classes is read from the
checkpoint's classifier.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bnas_jax import checkpointing
from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import run_lib
from bnas_jax import train_eval
from bnas_jax.data import dataset
from bnas_jax.models import eval_net


@dataclasses.dataclass(frozen=True)
class TrainedNetwork:
  """A retrained evaluation network and its variables, as stored in one checkpoint.

  Attributes:
    model: the unbound `eval_net.EvalNetwork`.
    variables: ``{'params', 'batch_stats'}`` (arrays on the first local device); eval mode is
      ``model.apply(variables, images, train=False)``, which returns ``(logits, None)``.
    config: the run's config (locked).
    workdir: the run directory.
    checkpoint: the checkpoint's save index (the folder name under ``checkpoints/``).
    epoch: epochs finished when it was taken.
    global_step: optimiser steps taken when it was taken.
  """
  model: eval_net.EvalNetwork
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  workdir: str
  checkpoint: int
  epoch: int
  global_step: int

  @functools.cached_property
  def _apply(self):
    return jax.jit(lambda variables, images: self.model.apply(variables, images, train=False)[0])

  def logits(self, images) -> jax.Array:
    """Eval-mode logits ``f32[B, classes]`` of normalised images ``f32[B, H, W, C]`` (normalised
    as in training: `bnas_jax.data.pipeline.normalize` with the dataset's mean and std)."""
    return self._apply(self.variables, jnp.asarray(images, jnp.float32))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The stored config of retraining run `workdir` over `train_eval.default_config` (locked).

  Raises:
    FileNotFoundError: no ``config.json`` in `workdir`.
    errors.ConfigError: the run is not a retraining run (a search: train its genotype first), or
      config.json has fields or values this version does not know.
  """
  path = os.path.join(workdir, config_files.CONFIG_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be the run directory of a "
                            "retraining run (python -m bnas_jax.main --config "
                            "experiments/cifar_eval.py --workdir DIR)")
  with open(path) as f:
    stored = json.load(f)
  if stored.get("mode") != "train":
    fix = ("its NAS-Bench-201 cell is not retrained: the table accuracy is in summary.json"
           if stored.get("space") == "nb201" else
           "train its genotype first: python -m bnas_jax.main --config experiments/cifar_eval.py "
           f"--config.genotype {os.path.join(workdir, 'genotype.json')} --workdir <new dir>")
    raise errors.ConfigError(
        f"{workdir} is a {stored.get('mode', 'search')!r} run, not a retraining run; {fix}")
  config = train_eval.default_config()
  unknown = sorted(set(config_files.flatten(stored)) - set(config_files.flatten(config.to_dict())))
  if unknown:
    raise errors.ConfigError(f"{path} has fields this version of bnas_jax does not know: "
                             f"{', '.join(unknown)}")
  try:
    config.update(stored)
  except TypeError as e:
    raise errors.ConfigError(f"{path}: {e}") from None
  config.lock()
  return config


def load(workdir: str, step: int | None = None) -> TrainedNetwork:
  """The evaluation network and variables of a retraining run's newest (or chosen) checkpoint.

  Args:
    workdir: the run directory of `bnas_jax.train_eval` (``config.json``, ``checkpoints/``).
    step: None = the newest checkpoint that restores (a damaged newest one is skipped with a
      warning); else the checkpoint taken after this many optimiser steps (the ``global_step``
      of its meta: every epoch end and every ``checkpoint.every_steps`` steps).

  Returns:
    a `TrainedNetwork`.

  Raises:
    FileNotFoundError: no config.json, or no checkpoint in the workdir.
    errors.ConfigError: not a retraining run; no checkpoint at `step` (the message lists the
      steps there are); the config's genotype file is missing; or the checkpoint does not hold
      this config's network.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  config = load_config(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise FileNotFoundError(f"no checkpoint in {directory}: the run has not finished an epoch "
                            "(or checkpoint.every_steps steps) yet")
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=1 << 30, async_save=False)
  try:
    indices = ckpt.all_indices()
    if step is None:
      index, state, meta = ckpt.restore_newest(_stored_abstract_state(directory, indices[-1]))
    else:
      steps = {_record(ckpt.restore_meta(i), i, directory).position.global_step: i
               for i in indices}
      if int(step) not in steps:
        raise errors.ConfigError(
            f"no checkpoint of {workdir} was taken at step {step}; the kept ones are at steps "
            f"{', '.join(str(s) for s in sorted(steps))} (omit the step for the newest)")
      index = steps[int(step)]
      state, meta = ckpt.restore(_stored_abstract_state(directory, index), index)
  finally:
    ckpt.close()
  position = _record(meta, index, directory).position
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  model = _create_model(config, variables, workdir)
  return TrainedNetwork(model=model, variables=variables, config=config, workdir=workdir,
                        checkpoint=int(index), epoch=position.stage,
                        global_step=position.global_step)


def _record(meta, index: int, directory: str) -> run_lib.RunRecord:
  """The run record of checkpoint `index` (an older format: `errors.ConfigError`, one line)."""
  return run_lib.RunRecord.from_json(meta, f"checkpoint #{index} in {directory}")


def _stored_abstract_state(directory: str, index: int) -> Any:
  """The stored state's tree of `jax.ShapeDtypeStruct` on the first local device (orbax metadata:
  no array is read)."""
  tree = checkpointing.stored_tree(os.path.join(directory, str(index), checkpointing.STATE))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                      tree)


def _create_model(config, variables, workdir: str) -> eval_net.EvalNetwork:
  genotype = config.genotype
  if (genotype.endswith(".json") or os.sep in genotype) and not os.path.exists(genotype):
    raise errors.ConfigError(
        f"the genotype file of {workdir} ({genotype}, config.genotype) does not exist any more; "
        "put it back there (the run's network is built from it)")
  num_classes = int(np.shape(variables["params"]["classifier"]["kernel"])[-1])
  model = train_eval.create_model(config, num_classes)
  # Every stored parameter must fit the rebuilt network (the auxiliary head, unused in eval mode,
  # has shapes that depend on the image size: not compared).
  stem = variables["params"].get("stem_conv", {}).get("kernel")
  channels = int(np.shape(stem)[2]) if stem is not None else 3
  side = eval_net.image_size_for(model)
  want = eval_net.abstract_variables(model, image_size=(side, side, channels))
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x))
                       for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                       if "auxiliary_head" not in str(path)}
  got, expected = flat(variables), flat({k: want[k] for k in ("params", "batch_stats")})
  if got != expected:
    diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
    raise errors.ConfigError(
        f"the checkpoint of {workdir} does not hold the network of its config.json (first "
        f"differences: {diff}); was config.json edited, or the genotype file replaced?")
  return model


def metrics_on_test_set(net: TrainedNetwork, *, data_dir: str | None = None,
                 batch_size: int | None = None, max_examples: int = -1) -> dict[str, float]:
  """Loss, top-1 / top-5 accuracy and error of `net` on its run's test set (eval mode).

  Args:
    net: from `load`.
    data_dir: the data folder (default: the run's ``config.data.data_dir``).
    batch_size: evaluation batch (default: the run's ``train.eval_batch_size``).
    max_examples: > 0 scores the first N test examples only; -1 all of them.

  Returns:
    ``{'test_loss', 'test_accuracy', 'test_top5_accuracy', 'test_error' (percent),
    'test_examples'}``, as the trainer's evaluation (``results.json``) computes them.

  Raises:
    dataset.DatasetError: the data cannot be read (named).
  """
  config = net.config
  if data_dir is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.data_dir = data_dir
  data = train_eval.create_loaders(config, eval_batch_size=batch_size,
                                  max_eval_examples=max_examples)
  step = jax.jit(functools.partial(train_eval.eval_step, model=net.model))
  return train_eval.test_metrics(functools.partial(step, net.variables), data.test.epoch(0))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m bnas_jax.evaluate",
      description="Test accuracy of a retraining run's network (newest checkpoint by default).")
  parser.add_argument("--workdir", required=True, help="the retraining run's directory")
  parser.add_argument("--step", type=int, default=None,
                      help="the checkpoint taken after this many optimiser steps (default newest)")
  parser.add_argument("--data_dir", default=None, help="data folder (default: the run's)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="evaluation batch (default: the run's train.eval_batch_size)")
  parser.add_argument("--max_examples", type=int, default=-1,
                      help="score the first N test examples only (default: all)")
  args = parser.parse_args(argv)
  try:
    net = load(args.workdir, args.step)
    m = metrics_on_test_set(net, data_dir=args.data_dir, batch_size=args.batch_size,
                     max_examples=args.max_examples)
  except (OSError, errors.ConfigError, dataset.DatasetError) as e:
    print(f"bnas_jax.evaluate: error: {e}", file=sys.stderr)
    return 2
  print(f"checkpoint #{net.checkpoint} of {net.workdir} (epoch {net.epoch}, step "
        f"{net.global_step}), genotype {net.config.genotype}")
  print(f"test accuracy {m['test_accuracy']:.4f} (top-5 {m['test_top5_accuracy']:.4f}, loss "
        f"{m['test_loss']:.4f}) on {int(m['test_examples'])} test examples")
  return 0


if __name__ == "__main__":
  sys.exit(main())
