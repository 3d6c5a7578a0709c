"""Metric output: TensorBoard (tensorboardX), stdout/file logging (absl) and a tqdm progress bar.

Only process 0 of a multi-host run writes; the other processes get no-op writers. Nothing here
accumulates per-step arrays: callers hand in python floats (fetched from the device every N steps).
"""

from __future__ import annotations

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

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


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
