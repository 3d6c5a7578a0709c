"""Loading experiment config files (``experiments/*.py``), which are plain files, not a package."""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any, Mapping


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
