"""Pictures of tree cells (matplotlib, Agg backend; imported inside `plot`)."""

from __future__ import annotations

from typing import Optional

from bnas_jax import files
from bnas_jax.search_space.tree import ROOT_OP, TreeCell, TreeNode


def plot(cell: TreeCell, path_prefix: str, title: str | None = None) -> tuple[str, str]:
  """Draws `cell` top-down and writes ``<path_prefix>.png`` and ``<path_prefix>.svg``.

  The cell input enters the root at the top; every edge is an arrow labelled with its op(s)
  (several ops are summed); internal nodes are boxes labelled with their merge (``add`` = mean of
  the branches, ``concat``, ``none``); leaves are dots whose output returns to the parent's merge;
  the root's merge is the cell output. Matplotlib, Agg backend.

  Returns:
    The PNG and SVG paths.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  pos: dict[str, tuple[float, float]] = {}
  counter = [0]

  def place(n: Optional[TreeNode], path: str, depth: int) -> float:
    if n is None:
      x = 1.4 * counter[0]  # leaves 1.4 units apart: the labels of a 3-branch node stay apart
      counter[0] += 1
    else:
      xs = [place(b.child, f"{path}{i + 1}", depth + 1) for i, b in enumerate(n.branches)]
      x = sum(xs) / len(xs)
    pos[path] = (x, -1.6 * depth)
    return x

  place(cell.root, "R", 0)
  n_leaves = counter[0]
  fig, ax = plt.subplots(figsize=(max(4.0, 2.0 * n_leaves + 1.0), 1.6 * (cell.depth + 1) + 1.2))
  for path, parent, b, _ in cell.edges():
    (x0, y0), (x1, y1) = pos[path[:-1]], pos[path]
    color = "tab:red" if b.ops == (ROOT_OP,) else "tab:blue"
    ax.annotate("", xy=(x1, y1 + 0.25), xytext=(x0, y0 - 0.25),
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.4))
    label = "\n".join(b.ops)
    ax.text((x0 + x1) / 2, (y0 + y1) / 2, label, ha="center", va="center", fontsize=7,
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=color, lw=0.8))
  for path, n, _ in cell.nodes():
    x, y = pos[path]
    label = {"add": "add (mean)", "concat": "concat", "none": "none"}[n.merge]
    if n.allocation == "split":
      label += "\n(split)"
    ax.text(x, y, f"{path}: {label}", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round,pad=0.3", fc="palegreen" if path == "R" else "lightskyblue",
                      ec="black"))
  for path, _, b, _ in cell.edges():
    if b.child is None:
      x, y = pos[path]
      ax.plot([x], [y], "o", color="0.3", ms=6)
  x_r, y_r = pos["R"]
  ax.text(x_r, y_r + 0.9, "cell input (C channels) -> root; root merge = cell output",
          ha="center", va="center", fontsize=8)
  ax.set_xlim(-1.0, 1.4 * max(n_leaves - 1, 1) + 1.0)
  ax.set_ylim(-1.6 * cell.depth - 0.8, 1.4)
  ax.axis("off")
  ax.set_title(title or f"tree cell: {cell}", fontsize=9)
  fig.tight_layout()
  return files.save_figure(fig, path_prefix)
