"""Pictures of genotypes: one arc diagram per cell type, saved as PNG and SVG (matplotlib)."""

from __future__ import annotations


from bnas_jax import files
from bnas_jax.genotype.cell import Genotype, _node_label
from bnas_jax.search_space import tree as tree_lib


def _cell_layout(genotype: Genotype, cell_type: str):
  """Edge labels, arc height per unit span and the top y of one cell's drawing."""
  topo = genotype.search_space.cells[cell_type]
  max_span = max(topo.num_inputs + topo.num_nodes - 1, 1)

  def label_of(ops):
    per_line = 2 if max(len(op) for op in ops) <= 5 else 1  # short BayesNAS names: 2 a line
    return "\n".join(" + ".join(ops[i:i + per_line]) for i in range(0, len(ops), per_line))

  edge_labels = {e: label_of(ops) for e, ops in genotype.edge_ops(cell_type).items()}
  max_lines = max([lbl.count("\n") + 1 for lbl in edge_labels.values()], default=1)
  step = max(1.5, 0.45 * max_lines + 0.5)  # arc height per unit span: labels never overlap
  return edge_labels, step, step * max_span + 0.4 * max_lines + 0.5


def _draw_cell(ax, genotype: Genotype, cell_type: str) -> None:
  """Draws one cell as an arc diagram: nodes on a line in topological order, every edge an arc above
  the line (height grows with the span, so labels never share a position), labelled with its ops;
  grey arcs below the line join the output nodes to the cell output."""
  from matplotlib import patches  # pylint: disable=g-import-not-at-top

  topo = genotype.search_space.cells[cell_type]
  n_all = topo.num_inputs + topo.num_nodes
  concat = genotype.concat(cell_type)
  single_output = len(topo.concat) == 1
  xs = {node: 3.0 * node for node in range(n_all)}
  out_x = xs[n_all - 1] + 3.0
  used = {s for _, s, _ in genotype.cell(cell_type)} | {t for t, _, _ in genotype.cell(cell_type)}
  edge_labels, step, top = _cell_layout(genotype, cell_type)

  for (source, target), label in edge_labels.items():
    x0, x1 = xs[source], xs[target]
    height = step * (target - source)
    arc = patches.Arc(((x0 + x1) / 2, 0.0), x1 - x0, 2 * height, theta1=0, theta2=180,
                      color="tab:blue", lw=1.6, zorder=1)
    ax.add_patch(arc)
    ax.annotate("", xy=(x1, 0.35), xytext=(x1 + 0.02, 0.6),
                arrowprops=dict(arrowstyle="-|>", color="tab:blue", lw=1.2))
    ax.text((x0 + x1) / 2, height, label, ha="center", va="center", fontsize=8,
            zorder=3, bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="tab:blue", lw=0.8))

  if not single_output:
    for node in concat:
      depth = 0.8 + 0.35 * (out_x - xs[node]) / 3.0
      ax.add_patch(patches.Arc(((xs[node] + out_x) / 2, 0.0), out_x - xs[node], 2 * depth,
                               theta1=180, theta2=360, color="0.55", lw=1.0, ls="--", zorder=1))

  for node in range(n_all):
    if node < topo.num_inputs:
      color = "palegreen"
    elif node in used or node in concat:
      color = "lightskyblue"
    else:
      color = "0.9"  # pruned node
    label = _node_label(genotype.space, node)
    ax.text(xs[node], 0.0, f"${label}$" if "{" in label else label, ha="center", va="center",
            fontsize=9, zorder=4, bbox=dict(boxstyle="round,pad=0.35", fc=color, ec="black"))
  if single_output:
    out_label = "output = n3" if concat else "output = 0 (all none)"
    ax.text(xs[n_all - 1], -1.2, out_label, ha="center", va="center", fontsize=9)
  else:
    ax.text(out_x, 0.0, "concat" if concat else "empty", ha="center", va="center", fontsize=9,
            zorder=4, bbox=dict(boxstyle="round,pad=0.35", fc="khaki", ec="black"))
  ax.set_xlim(-1.5, out_x + 1.5)
  ax.set_ylim(-0.8 - 0.35 * (n_all + 1) - 0.5, top)
  ax.set_aspect("equal")
  ax.axis("off")
  ax.set_title(f"{cell_type} cell ({len(genotype.cell(cell_type))} ops, output "
               f"{list(concat)})", fontsize=10)


def plot(genotype: Genotype, path_prefix: str, title: str | None = None) -> tuple[str, str]:
  """Draws the cells of `genotype` and writes ``<path_prefix>.png`` and ``<path_prefix>.svg``.

  Uses matplotlib with the Agg backend (no display, no graphviz). Each cell is an arc diagram:
  green = cell inputs, blue = intermediate nodes, grey = pruned nodes; each blue arc is one edge
  labelled with all its ops (several ops on an edge are summed); dashed arcs feed the concat.

  Args:
    genotype: the genotype to draw.
    path_prefix: output path without extension; missing folders are created.
    title: figure title (default: the space name).

  Returns:
    The PNG and SVG paths.
  """
  if isinstance(genotype, tree_lib.TreeCell):  # the proxyless search's tree cells
    return tree_lib.plot(genotype, path_prefix, title)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  cell_types = genotype.cell_types
  # Figure size follows the drawing's extent in data units (equal aspect), 0.4 inch per unit.
  topo = genotype.search_space.cells["normal"]
  n_all = topo.num_inputs + topo.num_nodes
  width = 3.0 * n_all + 3.0
  heights = [_cell_layout(genotype, t)[2] + 0.35 * (n_all + 1) + 1.3 + 1.0 for t in cell_types]
  fig, axes = plt.subplots(len(cell_types), 1, figsize=(0.4 * width, 0.4 * sum(heights) + 0.5),
                           squeeze=False, gridspec_kw={"height_ratios": heights})
  for ax, cell_type in zip(axes[:, 0], cell_types):
    _draw_cell(ax, genotype, cell_type)
  fig.suptitle(title or f"{genotype.space} genotype", fontsize=12)
  fig.tight_layout()
  return files.save_figure(fig, path_prefix)
