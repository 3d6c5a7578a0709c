"""Metric output: TensorBoard (tensorboardX), stdout/file logging (absl) and a tqdm progress bar.

Only process 0 of a multi-host run writes; the other processes get no-op writers. Nothing here
accumulates per-step arrays: callers hand in python floats (fetched from the device every N steps).

What a search shows in TensorBoard, besides its scalars:

* Histograms (`write_prior_histograms`, after every prior update): ``gamma``, ``omega``, ``H``
  (the scaled curvature) and ``switches``, one per cell type and switch kind, tagged
  ``'{field}/{cell type}/{origin|op}'`` (origin: the edge switch, column 0; op: the op switches),
  over live groups only (pruned ones are exactly 0 and would hide the rest).
* Images (`write_picture`): the iteration's cell picture ``genotype.png``, tag ``'cells'``.
* HParams (`write_hparams`, at the end): the flattened config, with ``final/val_accuracy`` and,
  for a NAS-Bench-201 search with a table, ``final/nb201_accuracy`` as metrics.
"""

from __future__ import annotations

import json
import logging as py_logging
import math
import os
import sys
from typing import Any, Mapping

from absl import logging
import numpy as np
import tensorboardX
import tqdm


def _to_float(v: Any) -> float:
  return float(np.asarray(v))


class MetricWriter:
  """Writes scalar dicts to TensorBoard event files and to the log.

  Args:
    logdir: TensorBoard directory (event files ``events.out.tfevents.*`` go there).
    enabled: False on non-zero processes of a multi-host run (then every call is a no-op).
  """

  def __init__(self, logdir: str, *, enabled: bool = True):
    self.logdir = logdir
    self.enabled = enabled
    self._writer = tensorboardX.SummaryWriter(logdir=logdir) if enabled else None

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *, log: bool = True,
                    prefix: str = "") -> None:
    """Writes each ``name: value`` at global step `step` (values: python / numpy / jax scalars)."""
    if not self.enabled or not scalars:
      return
    values = {f"{prefix}{k}": _to_float(v) for k, v in scalars.items()}
    for k, v in values.items():
      self._writer.add_scalar(k, v, global_step=step)
    if log:
      logging.info("[%d] %s", step, ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items())))

  def write_text(self, step: int, tag: str, text: str) -> None:
    """Writes a text summary (e.g. a genotype) and logs it."""
    if not self.enabled:
      return
    self._writer.add_text(tag, text, global_step=step)
    logging.info("[%d] %s: %s", step, tag, text)

  def write_histogram(self, step: int, tag: str, values: Any) -> None:
    """Writes a histogram of ``values`` (any array; empty arrays are skipped)."""
    values = np.asarray(values, np.float64).reshape(-1)
    if not self.enabled or not values.size:
      return
    self._writer.add_histogram(tag, values, global_step=step)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Writes ``image`` u8[H, W, C] (C = 1, 3 or 4) as an image summary."""
    if not self.enabled:
      return
    self._writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float],
                    step: int) -> None:
    """Writes an HParams session of this run: ``hparams`` (str / bool / int / float values) and
    ``metrics`` (``{tag: value}``, written as scalars at `step` too, which HParams reads)."""
    if not self.enabled:
      return
    from tensorboardX import summary as tbx_summary  # pylint: disable=g-import-not-at-top
    metrics = {k: _to_float(v) for k, v in metrics.items()}
    for proto in tbx_summary.hparams(dict(hparams), metrics):
      self._writer.file_writer.add_summary(proto)
    for k, v in metrics.items():
      self._writer.add_scalar(k, v, global_step=step)
    logging.info("[%d] hparams metrics: %s", step, metrics)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


# --------------------------------------------------------------------------------------------------
# The search in pictures.

# HardPriorState field -> histogram name (curvature is H, the scaled curvature of bayes.update).
_PRIOR_FIELDS = {"gamma": "gamma", "omega": "omega", "curvature": "H"}


def write_prior_histograms(writer: MetricWriter, step: int, prior: Any,
                           switches: Mapping[str, Any]) -> None:
  """Histograms of the prior state and the switches, per cell type and switch kind.

  Args:
    writer: the run's `MetricWriter`.
    step: global optimiser step.
    prior: a `bnas_jax.bayes.HardPriorState` (host or device arrays): ``gamma``, ``curvature``
      ``{tau: f32[n, E, K]}``, ``omega`` ``{tau: f32[E, K]}``, ``alive`` ``{tau: bool[E, K]}``;
      column 0 of K is the edge's origin switch, the rest its op switches.
    switches: ``{tau: f32[n, E, K]}``.

  Tags ``'{gamma|omega|H|switches}/{tau}/{origin|op}'``; values of live groups only.
  """
  if not writer.enabled:
    return
  for tau in sorted(prior.alive):
    alive = np.asarray(prior.alive[tau], bool)
    fields = {name: getattr(prior, field)[tau] for field, name in _PRIOR_FIELDS.items()}
    fields["switches"] = switches[tau]
    for name, value in fields.items():
      value = np.asarray(value, np.float64)
      mask = np.broadcast_to(alive, value.shape)  # [E, K] or [n, E, K]
      for kind, cols in (("origin", slice(0, 1)), ("op", slice(1, None))):
        writer.write_histogram(step, f"{name}/{tau}/{kind}", value[..., cols][mask[..., cols]])


def write_picture(writer: MetricWriter, step: int, path: str, tag: str = "cells") -> None:
  """Writes the PNG at ``path`` (e.g. an iteration's ``genotype.png``) as an image summary;
  a missing file is skipped with a warning."""
  if not writer.enabled:
    return
  if not os.path.isfile(path):
    logging.warning("no picture %s to write to TensorBoard", path)
    return
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    writer.write_image(step, tag, np.asarray(im.convert("RGB")))


def hparams_of(config: Any) -> dict[str, Any]:
  """The config (an ``ml_collections.ConfigDict``) flattened to ``{'a.b': str|bool|int|float}``
  for HParams (lists and None become strings)."""
  from bnas_jax import config_files  # pylint: disable=g-import-not-at-top
  flat = config_files.flatten(json.loads(config.to_json_best_effort()))
  return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
          for k, v in sorted(flat.items())}


def write_hparams(writer: MetricWriter, step: int, config: Any, summary: Mapping[str, Any]) -> None:
  """The run's config as HParams with its final accuracies as metrics.

  Args:
    writer: the run's `MetricWriter`.
    step: the last global step.
    config: the run's config.
    summary: the search summary; ``val_accuracy`` (supernet, val split) and, when present,
      ``nb201_accuracy`` (NAS-Bench-201 table look-up, %) become ``final/val_accuracy`` and
      ``final/nb201_accuracy``.
  """
  metrics = {f"final/{k}": summary[k] for k in ("val_accuracy", "nb201_accuracy")
             if summary.get(k) is not None}
  if metrics:
    writer.write_hparams(hparams_of(config), metrics, step)


def _fmt(v: float) -> str:
  if math.isfinite(v) and v == int(v) and abs(v) < 1e12:
    return str(int(v))
  return f"{v:.5g}"


class Progress:
  """A tqdm progress bar (with ETA) over `total` steps; a no-op when disabled.

  Args:
    total: number of steps in this phase.
    desc: label, e.g. ``"search t=2"``.
    initial: steps already done (resume mid-epoch).
    enabled: False to hide the bar (non-zero processes, tests).
  """

  def __init__(self, total: int, desc: str, *, initial: int = 0, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, desc=desc, initial=initial, disable=not enabled,
                          dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

  def update(self, n: int = 1, **postfix: Any) -> None:
    if postfix:
      self._bar.set_postfix({k: _fmt(_to_float(v)) for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    self._bar.close()


class _DropLibraryInfo(py_logging.Filter):
  """Drops INFO/DEBUG records emitted by noisy libraries (orbax logs every save step by step)."""

  def __init__(self, fragments: tuple[str, ...]):
    super().__init__()
    self._fragments = fragments

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return not any(f in path for f in self._fragments)


# orbax logs every save step by step; jax's backend probe logs "Unable to initialize backend 'tpu'"
# at INFO on every machine without one.
_LIBRARY_FILTER = _DropLibraryInfo(("/orbax/", "/jax/_src/xla_bridge.py"))


def quiet_library_logs() -> None:
  """Keeps orbax's per-save and jax's backend-probe INFO lines out of the log (warnings and
  errors still pass)."""
  # The logger sees absl.logging calls (orbax); the handler also sees the records of Python
  # loggers that propagate to the root logger (jax).
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    if _LIBRARY_FILTER not in target.filters:
      target.addFilter(_LIBRARY_FILTER)


class LogFile:
  """Context manager that copies absl log records into ``<workdir>/<name>`` while active."""

  def __init__(self, workdir: str, name: str = "log.txt"):
    self.path = os.path.join(workdir, name)
    self._handler: py_logging.Handler | None = None
    self._old_level = py_logging.NOTSET

  def __enter__(self) -> "LogFile":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handler = py_logging.FileHandler(self.path, mode="a")
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.get_absl_logger()
    logger.addHandler(handler)
    self._handler = handler
    # The run log records INFO even when the library is called outside absl.app (tests, notebooks).
    self._old_level = logger.level
    if logger.getEffectiveLevel() > py_logging.INFO:
      logger.setLevel(py_logging.INFO)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._handler is not None:
      logger = logging.get_absl_logger()
      logger.removeHandler(self._handler)
      logger.setLevel(self._old_level)
      self._handler.close()
      self._handler = None
