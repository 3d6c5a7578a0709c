"""Experiment config files (``experiments/*.py``, plain files, not a package) and the resolved
config stored in a run directory (``config.json``)."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from typing import Any, Mapping, Sequence

from absl import logging
import ml_collections

from bnas_jax import errors

CONFIG_JSON = "config.json"
CONFIG_YAML = "config.yaml"
PREVIOUS_JSON = "config.previous.json"


def load_sibling(anchor_file: str, name: str) -> types.ModuleType:
  """Loads ``<dir of anchor_file>/<name>.py`` as a module (for configs that extend another).

  Args:
    anchor_file: ``__file__`` of the calling config.
    name: the sibling's file name without ``.py``, e.g. ``'cifar_proxy'``.

  Raises:
    FileNotFoundError: naming the missing file.
  """
  return load(os.path.join(os.path.dirname(os.path.abspath(anchor_file)), f"{name}.py"))


def load(path: str) -> types.ModuleType:
  """Loads the config file at `path` as a module (``get_config`` and friends).

  Raises:
    FileNotFoundError: naming the missing file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"_bnas_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a.b': leaf}`` for a nested mapping such as a config's JSON (empty mappings vanish)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def write_config(config: ml_collections.ConfigDict, workdir: str,
                 resume_safe: Sequence[str]) -> None:
  """Stores the resolved config in `workdir` (``config.json``, ``config.yaml``).

  When the workdir already holds a config (a resumed run), the two are compared by value. If only
  fields starting with one of `resume_safe` differ (or fields the stored config does not have yet,
  added to bnas_jax since), the new config is stored and the old one kept as
  ``config.previous.json``, with a warning naming the fields (an info line when the workdir holds
  no checkpoint yet: an earlier attempt that stopped at start-up leaves nothing to resume, so any
  field may change). An identical config (however it is formatted) is left as it is.

  Raises:
    errors.ConfigError: if other fields differ and the workdir holds checkpoints; nothing is
      written then.
  """
  path = os.path.join(workdir, CONFIG_JSON)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      stored = flatten(json.load(f))
    new = flatten(json.loads(text))
    diff = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
    if not diff:
      return
    # Fields absent from the stored config were added to bnas_jax after that run started.
    unsafe = [k for k in diff if k in stored and not k.startswith(tuple(resume_safe))]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
      if unsafe:
        raise errors.ConfigError(
            f"{workdir} holds checkpoints of a run with a different config ({', '.join(unsafe)} "
            f"differ from {path}); nothing was changed. Resume it with its own config "
            f"(python -m bnas_jax.main --workdir {workdir}) or start this config in a new "
            f"--workdir. Only {', '.join(resume_safe)} may change on resume.")
      logging.warning("config differs from the one stored in %s in %s; the new config is used "
                      "and stored (the old one is kept as %s)", path, diff, PREVIOUS_JSON)
    else:  # an earlier attempt stopped before its first checkpoint (bad data, say): nothing to keep
      logging.info("%s holds no checkpoint yet; its stored config (%s differ) is replaced by this "
                   "one (the old one is kept as %s)", workdir, diff, PREVIOUS_JSON)
    os.replace(path, os.path.join(workdir, PREVIOUS_JSON))
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.join(workdir, CONFIG_YAML), "w") as f:
    f.write(config.to_yaml())


def check_batch_sizes(sizes: Mapping[str, int], num_devices: int, note: str = "") -> None:
  """Raises `errors.ConfigError` for the first batch size that is not a positive multiple of
  `num_devices` (the data-parallel mesh splits every batch evenly over the devices).

  Args:
    sizes: ``{config field name: batch size}``, e.g. ``{'search.batch_size': 18}``.
    num_devices: the devices the mesh spans (`jax.device_count()`).
    note: appended to the message (e.g. what a sentinel value means).
  """
  for name, b in sizes.items():
    if int(b) < 1 or int(b) % num_devices:
      raise errors.ConfigError(f"config.{name}={b} must be a positive multiple of the "
                               f"{num_devices} device(s){note}")
