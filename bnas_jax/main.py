r"""Entry point of bnas_jax: a BayesNAS search or a retraining run, chosen by ``config.mode``.

Usage::

  python -m bnas_jax.main --config experiments/cifar_proxy.py --workdir /tmp/bnas/proxy
  python -m bnas_jax.main --config experiments/cifar_proxy.py:cpu --workdir /tmp/bnas/cpu \
      --config.data.data_dir ~/.cache/bnas_jax/cifar-10-batches-bin --config.search.iterations 2

The config file exposes ``get_config(arg=None)``; ``:variant`` is passed as `arg`. The config is
locked, so an override of a field that does not exist (``--config.serch.lr=1``) fails at once and
names the field. ``--workdir`` alone (no ``--config``) resumes the run stored there: the config is
read back from ``<workdir>/config.json``.

This file stays thin on purpose (the flax examples' pattern): flags, logging, device set-up, then
one library call (`bnas_jax.search.run` or `bnas_jax.train_eval.run`), which tests and notebooks can
call directly.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from bnas_jax import config_files
from bnas_jax import errors
from bnas_jax import metrics as metrics_lib
from bnas_jax import xla_flags
from bnas_jax.data import dataset as dataset_lib

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Run directory (config, logs, checkpoints, TensorBoard, "
                    "genotype). An existing run directory is resumed.")
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/cifar_proxy.py[:variant]. May be "
    "omitted when resuming: the config stored in --workdir is used.", lock_config=True)
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (multi-host runs). "
                  "Defaults to config.distributed.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0's coordinator "
                    "(e.g. 127.0.0.1:12345 for several processes on one machine). Unset: "
                    "$JAX_COORDINATOR_ADDRESS or the cluster's (SLURM, TPU pods, ...). This flag, "
                    "--num_processes or --process_id implies --distributed.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (with "
                     "--coordinator_address). Unset: detected from the cluster.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in "
                     "[0, --num_processes) (with --coordinator_address). Unset: detected.")
flags.mark_flags_as_required(["workdir"])

CONFIG_FILE = "config.json"

# mode -> module whose ``run(config, workdir)`` does the work.
RUNNERS = {"search": "bnas_jax.search", "train": "bnas_jax.train_eval",
           "compress": "bnas_jax.compression.runner"}


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """Reads back the resolved config of an earlier run (``<workdir>/config.json``), locked.

  The stored values are laid over the runner's `default_config()`, so a workdir written by an
  older version resumes with the defaults of fields added since.

  Raises:
    FileNotFoundError: if the workdir holds no config.json (then pass --config).
    errors.ConfigError: if config.json has a field the runner does not know or a value of the
      wrong type (e.g. after a hand edit), naming the fields.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config not given and {path} does not exist: pass --config "
                            "experiments/<name>.py to start a new run")
  with open(path) as f:
    stored = json.load(f)
  # Fields added to the runner's defaults after the run started take their default values.
  runner = importlib.import_module(RUNNERS.get(stored.get("mode", "search"), RUNNERS["search"]))
  config = runner.default_config() if hasattr(runner, "default_config") else None
  if config is None:
    config = ml_collections.ConfigDict(stored)
  else:
    known = set(config_files.flatten(config.to_dict()))
    unknown = sorted(set(config_files.flatten(stored)) - known)
    if unknown:
      raise errors.ConfigError(
          f"{path} has fields this version of bnas_jax does not know: {', '.join(unknown)}; "
          "remove them from config.json (or start a new run with --config)")
    try:
      config.update(stored)
    except TypeError as e:
      raise errors.ConfigError(f"{path}: {e}; fix the value in config.json") from None
  config.lock()
  return config


def get_runner(mode: str):
  """Returns the ``run(config, workdir)`` function for `mode` ('search' or 'train').

  Raises:
    ValueError: naming the unknown mode and the known ones.
  """
  if mode not in RUNNERS:
    raise ValueError(f"config.mode={mode!r} is unknown; choose one of {sorted(RUNNERS)}")
  return importlib.import_module(RUNNERS[mode]).run  # lazy: train_eval is optional for a search


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """`jax.distributed.initialize` with CPU collectives that work across processes.

  Unset arguments are detected from the environment (``$JAX_COORDINATOR_ADDRESS``, SLURM, TPU
  pods, ...). On CPU the cross-process collectives (gradient all-reduce, checkpoint barriers) need
  a collectives implementation: 'gloo' is chosen unless one is configured
  (``--jax_cpu_collectives_implementation``). Call before anything asks JAX for its devices.
  """
  if jax.config.values.get("jax_cpu_collectives_implementation") in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def check_workdir(workdir: str) -> None:
  """Raises `errors.ConfigError` when `workdir` cannot be a run directory: it, or the nearest of
  its parents that exists, is not a folder, or that folder is not writable (a missing workdir is
  created by the runner)."""
  path = workdir
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  if not os.path.isdir(path):
    raise errors.ConfigError(f"--workdir={workdir}: {path} is a file, not a folder; pass the path "
                             "of a folder (created if missing)")
  if not os.access(path, os.W_OK | os.X_OK):
    raise errors.ConfigError(f"--workdir={workdir}: {path} is not writable; pass a folder you "
                             "can write to")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
  try:
    config = FLAGS.config if FLAGS.config is not None else load_config_from_workdir(workdir)
    config.get("mode")  # ml_collections defers a failed load of the --config file to here
  except (OSError, errors.ConfigError) as e:
    if e.__cause__ is not None:  # the deferred load error: its last line names the file
      lines = [ln.strip() for ln in str(e.__cause__).splitlines() if ln.strip()]
      e = f"--config={FLAGS['config'].serialize().split('=', 1)[-1]}: {lines[-1] if lines else e}"
    _exit_with_error(e)

  distributed = FLAGS.distributed
  # Any of the multi-host flags asks for a distributed run: without jax.distributed each process
  # would run its own search into the same workdir.
  multihost = [f"--{n}" for n in ("coordinator_address", "num_processes", "process_id")
               if FLAGS[n].value is not None]
  if distributed is None:
    distributed = bool(config.get("distributed", False)) or bool(multihost)
  elif not distributed and multihost:
    _exit_with_error(f"{', '.join(multihost)} set a multi-host run, --nodistributed a single "
                     "process: drop one of them")
  if distributed:  # before anything asks JAX for its devices (the config checks do)
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

  metrics_lib.quiet_library_logs()
  try:  # bad values, missing files and data are named before anything is logged or created
    check_workdir(workdir)
    runner = get_runner(config.mode)
    module = importlib.import_module(RUNNERS[config.mode])
    module.check_config(config)
    if hasattr(module, "check_inputs"):  # opens every path the config names
      module.check_inputs(config)
  except (ValueError, errors.ConfigError) as e:
    _exit_with_error(e)

  if not jax.config.values.get("jax_compilation_cache_dir"):
    # Compilation takes minutes on CPU and GPU alike; the persistent cache makes a resumed run (or
    # a rerun with the same pruning masks) skip it. --jax_compilation_cache_dir overrides the
    # location, BNAS_JAX_CACHE_DIR='' turns it off.
    logging.info("persistent compilation cache: %s", xla_flags.configure_cache() or "off")
  logging.info("JAX process %d / %d; local devices: %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  logging.info("global devices: %d (%s)", jax.device_count(), jax.default_backend())
  try:
    result = runner(config, workdir)
  except (errors.ConfigError, dataset_lib.DatasetError) as e:  # bad input, named: no traceback
    _exit_with_error(e)
  except errors.NonFiniteError as e:
    # The run diverged; the message names the kept checkpoint and the fix. Exit 1: not bad input.
    print(f"bnas_jax.main: error: {e}", file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    _exit_multihost_failure(e)
  stopped_by = (result.get("stopped_by", "") if isinstance(result, dict)
                else getattr(result, "stopped_by", ""))
  if stopped_by:  # checkpointed and stopped by SIGINT / SIGTERM: the shell's 128 + signal code
    sys.exit(128 + int(getattr(signal, stopped_by)))


# Messages of a failed cross-process collective (the gloo / coordination service wording); JAX
# raises them as JaxRuntimeError or ValueError depending on where the failure surfaces.
_COLLECTIVE_FAILURE = ("gloo", "heartbeat", "connection reset", "coordination service",
                       "barrier", "deadline_exceeded", "unavailable")


def _exit_multihost_failure(e: Exception) -> None:
  """Ends this process of a multi-host run after an unhandled error: one line, exit status 1.

  Either a collective with the other processes failed (usually another process died) or this
  process failed (the traceback goes to the log; the others then fail at their next collective).
  JAX's exit handler would wait for the other processes at a shutdown barrier until the heartbeat
  timeout and then abort with a native stack trace, so this process exits at once (`os._exit`)
  once the line and the logs are flushed. The checkpoints on disk are complete (orbax writes them
  atomically).
  """
  first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
  what = f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__
  where = f"process {jax.process_index()} of {jax.process_count()}"
  if any(k in str(e).lower() for k in _COLLECTIVE_FAILURE):
    msg = (f"{where}: a collective operation with the other processes failed ({what}); another "
           "process has probably stopped.")
  else:
    logging.exception("%s failed", where)
    msg = f"{where} failed ({what}; traceback in the log); the other processes stop with it."
  msg += " Restart every process with the same --workdir: the run resumes from its last checkpoint."
  logging.error("%s", msg)
  print(f"bnas_jax.main: error: {msg}", file=sys.stderr)
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access


def _exit_with_error(e: Exception) -> None:
  print(f"bnas_jax.main: error: {e}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every bad flag as a one-line error and exit status 2.

  A flag value absl cannot parse (``--config.model.remat=yes``, a missing ``--workdir``) is one
  line naming the flag, like a bad config value. ml_collections raises AttributeError / KeyError
  from inside the parser for a ``--config.<field>`` the config does not have (absl would print a
  traceback); the message names that override and the closest field.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # A config file whose get_config raised: its exception line, not ml_collections' traceback.
    head, sep, trace = str(e).partition("Traceback (most recent call last):")
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    msg = " ".join(head.split()) + (" " + lines[-1] if sep and lines else "")
    if "Unknown command line flag 'config." in msg:  # an override without --config
      msg += ("; --config.<field> overrides need --config experiments/<name>.py (to change a "
              "resume-safe field of a stored run, pass its experiment file and the override)")
    print(f"bnas_jax.main: error: {msg} (see --helpfull)", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    msg = str(e.args[0] if e.args else e)
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    key = re.match(r"\W*([\w-]+)", msg)
    # The override naming the unknown key (ml_collections' message starts with the key).
    bad = [a for a in overrides
           if key and key.group(1) in a.split("=", 1)[0].split(".")[1:]] or overrides
    hint = re.search(r'Did you mean "([^"]+)"', msg)
    path = bad[0].split("=", 1)[0][len("--config."):].split(".") if len(bad) == 1 else []
    if hint and key and key.group(1) in path:  # the full dotted name of the suggestion
      i = path.index(key.group(1))
      detail = f"did you mean {'.'.join(path[:i] + [hint.group(1)] + path[i + 1:])!r}?"
    else:
      detail = f"did you mean {hint.group(1)!r}?" if hint else "no such field"
    print(f"bnas_jax.main: error: unknown config field in {' '.join(bad) or 'the overrides'} "
          f"({detail}); see the experiment file or config.json for the fields", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)
