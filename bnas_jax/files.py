"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temp file in the same folder and ``os.replace``.

  Missing folders are created; the file gets the usual mode (0666 minus the umask).

  Raises:
    OSError: the folder cannot be created or written (the temp file is removed).
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_figure(fig, path_prefix: str, dpi: int = 110) -> tuple[str, str]:
  """Saves a matplotlib figure as ``<path_prefix>.png`` (at `dpi`) and ``.svg``, then closes it.

  Missing folders are created. Returns the PNG and SVG paths.

  Raises:
    OSError: a file cannot be written (the figure is closed all the same).
  """
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  prefix = os.fspath(path_prefix)
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  paths = (prefix + ".png", prefix + ".svg")
  try:
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
  finally:
    plt.close(fig)
  return paths
