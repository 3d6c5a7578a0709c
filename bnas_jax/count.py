r"""Parameter and multiply-add counts of an evaluation network (DARTS convention).

Usage::

  python -m bnas_jax.count --genotype darts_v2                    # CIFAR-10, C = 36, 20 cells
  python -m bnas_jax.count --genotype bayesnas_0.01 --dataset imagenet
  python -m bnas_jax.count --genotype runs/search/genotype.json --init_channels 16 --num_cells 8
  python -m bnas_jax.count --genotype tree_cell_a                 # PyramidNet, N = 18, alpha = 84
  python -m bnas_jax.count --genotype runs/proxyless/genotype.json --num_cells 18 --alpha 84

A tree cell (a registered name such as ``tree_cell_a`` or a tree-cell JSON file written by the
proxyless search) is counted in the PyramidNet it retrains in (`bnas_jax.models.pyramidnet`):
``--num_cells`` is then the number of bottleneck blocks per stage N (default 18), ``--alpha`` the
additive widening (default 84) and ``--groups`` the groups of its grouped convs (default 2).

Parameters are counted from `jax.eval_shape` of the model's init (nothing is allocated or compiled):
conv/linear weights, linear biases and BN scale/bias; BN running statistics are not parameters. The
reported number excludes the auxiliary head (DARTS convention); the head is printed separately.

Multiply-adds (the convention here): counted analytically from the parameter tree and the module
output shapes (again only abstract evaluation). Every weight of a convolution kernel is used once
per output position, so a convolution costs ``kernel.size * H_out * W_out`` multiply-adds per
image, whether it is dense, grouped, depthwise or dilated, and however the op implements it (lax
conv, shifted slices, matrix product); a linear layer costs ``kernel.size``. Biases, BN, ReLU,
pooling and the additions of a cell are not counted, and neither is the auxiliary head (it does not
run at test time). Output positions come from intercepting every module call
(`flax.linen.intercept_methods`) and reading the output shape of the innermost module that owns
each kernel.

This is a convolution + linear-layer count; it is not guaranteed to be the convention behind a
published figure, which papers do not define exactly. DARTS_V2 at the ImageNet mobile size (C = 48,
14 cells, 224 x 224) is counted here as 529.9 M multiply-adds and 4.72 M parameters; the DARTS
paper (Table 3) reports 574 M and 4.7 M. The parameters agree; the multiply-adds are 8 % lower
(conv + linear counts of the same network reported elsewhere range over 523-545 M). `PUBLISHED`
holds such figures, printed beside the computed ones.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from bnas_jax.models import eval_net

# Parameter leaf names that are not multiply-accumulated weights (BN affine, biases).
_NON_MAC_LEAVES = ("scale", "bias")

# (genotype, dataset) -> (multiply-adds, parameters, source) as published; conventions unstated.
PUBLISHED = {
    ("darts_v2", "imagenet"): (574e6, 4.7e6, "DARTS paper, Table 3 (ImageNet mobile setting)"),
}


def _prod(shape) -> int:
  out = 1
  for s in shape:
    out *= int(s)
  return out


def module_output_shapes(model: nn.Module, variables: Any, *args, **kwargs) -> dict:
  """Output shape of every module call, keyed by module path (abstract evaluation only).

  Args:
    model: an unbound linen module.
    variables: its (possibly abstract) variables.
    *args, **kwargs: the arguments of ``model.apply`` (arrays or `jax.ShapeDtypeStruct`).

  Returns:
    {module path tuple: output shape of its first array output} for every ``__call__`` made.
  """
  shapes: dict[tuple[str, ...], tuple[int, ...]] = {}

  def interceptor(next_fun, fargs, fkwargs, context):
    out = next_fun(*fargs, **fkwargs)
    if context.method_name == "__call__":
      leaves = [x for x in jax.tree_util.tree_leaves(out) if hasattr(x, "shape")]
      if leaves and context.module.path not in shapes:
        shapes[tuple(context.module.path)] = tuple(leaves[0].shape)
    return out

  def run(v, *a):
    with nn.intercept_methods(interceptor):
      return model.apply(v, *a, **kwargs)

  jax.eval_shape(run, variables, *args)
  return shapes


def multiply_adds(params: Any, output_shapes: dict, *, exclude=("auxiliary_head",)) -> int:
  """Multiply-adds of one forward pass of one example (see the module docstring).

  Args:
    params: the (possibly abstract) 'params' collection.
    output_shapes: `module_output_shapes` of a forward pass with batch size 1.
    exclude: top-level parameter subtrees to skip (the auxiliary head).

  Returns:
    The number of multiply-adds.

  Raises:
    ValueError: if a kernel's owning module was never called (not in `output_shapes`).
  """
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(getattr(k, "key", str(k)) for k in path)
    if names[0] in exclude or names[-1] in _NON_MAC_LEAVES:
      continue
    owner = names[:-1]
    while owner and owner not in output_shapes:
      owner = owner[:-1]  # leaves stored under a plain dict inside a module
    if owner not in output_shapes:
      raise ValueError(f"parameter {'/'.join(names)} belongs to no called module")
    out = output_shapes[owner]
    positions = _prod(out[1:-1]) if len(out) == 4 else 1
    total += _prod(leaf.shape) * positions
  return total


def count_pyramidnet(model: nn.Module, image_size: int = 32) -> dict[str, int]:
  """Parameters and multiply-adds of a PyramidNet with a tree cell (abstract evaluation only).

  Returns:
    {'params', 'multiply_adds' (per image)}; the network has no auxiliary head.
  """
  from bnas_jax.models import pyramidnet  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda k, im: model.init({"params": k}, im, train=False),
                             jax.random.key(0), x)
  shapes = module_output_shapes(model, variables, x, train=False)
  return {"params": pyramidnet.count_params(model, (image_size, image_size, 3)),
          "multiply_adds": multiply_adds(variables["params"], shapes)}


def count(model: eval_net.EvalNetwork, image_size: int | None = None) -> dict[str, int]:
  """Parameter counts and multiply-adds of `model` (abstract evaluation, no compile).

  Returns:
    {'params' (without aux head), 'aux_params', 'total', 'multiply_adds' (per image, no aux head)}.
  """
  size = image_size or eval_net.image_size_for(model)
  variables = eval_net.abstract_variables(model, image_size=size)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  shapes = module_output_shapes(model, variables, x, train=False)
  counts = eval_net.param_counts(model, image_size=size)
  counts["multiply_adds"] = multiply_adds(variables["params"], shapes)
  return counts


FLAGS = flags.FLAGS
flags.DEFINE_string("genotype", "darts_v2", "Registered genotype name or a genotype JSON path.")
flags.DEFINE_enum("dataset", "cifar10", sorted(eval_net.DATASET_DEFAULTS), "Network setting.")
flags.DEFINE_integer("init_channels", None, "Override C (default: 36 CIFAR, 48 ImageNet).")
flags.DEFINE_integer("num_cells", None, "Override the number of cells (default 20 / 14).")
flags.DEFINE_enum("prev_reduce", "auto", ["auto", "conv", "factorized"],
                  "BayesNAS flavour: c_{k-2} size reduction after a reduction cell.")
flags.DEFINE_float("alpha", 84.0, "Tree cells: the PyramidNet's additive widening alpha.")
flags.DEFINE_integer("groups", 2, "Tree cells: groups of the PyramidNet's grouped convs.")


def _create_or_exit(factory, *args, **kwargs):
  """``factory(*args, **kwargs)``; a bad --genotype etc. exits 2 with one line, no traceback."""
  try:
    return factory(*args, **kwargs)
  except (ValueError, FileNotFoundError) as e:
    print(f"bnas_jax.count: error: {e}", file=sys.stderr)
    sys.exit(2)


def _print_multiply_adds(c: dict[str, int]) -> None:
  print(f"multiply-adds per image: {c['multiply_adds']:,} ({c['multiply_adds'] / 1e6:.1f} M; "
        "conv + linear weights x output positions, see the module docstring)")


def _is_tree_cell(spec: str) -> bool:
  from bnas_jax.search_space import tree as tree_lib  # pylint: disable=g-import-not-at-top
  return spec in tree_lib.NAMED_TREE_CELLS or (os.path.isfile(spec)
                                                and tree_lib.is_tree_cell_json(spec))


def _main_tree_cell() -> None:
  from bnas_jax.models import pyramidnet  # pylint: disable=g-import-not-at-top
  if FLAGS.dataset != "cifar10" or FLAGS.init_channels is not None:
    print("bnas_jax.count: error: a tree cell is counted in the CIFAR PyramidNet: drop "
          "--dataset / --init_channels (use --num_cells, --alpha, --groups)", file=sys.stderr)
    sys.exit(2)
  n = FLAGS.num_cells or 18
  model = _create_or_exit(pyramidnet.create_pyramidnet, FLAGS.genotype, n, FLAGS.alpha,
                          FLAGS.groups, 10)
  c = count_pyramidnet(model)
  print(f"tree cell: {FLAGS.genotype}, PyramidNet N={n} blocks per stage, alpha={FLAGS.alpha:g}, "
        f"groups={FLAGS.groups}, CIFAR-10")
  print(f"params: {c['params']:,} ({c['params'] / 1e6:.3f} M)")
  _print_multiply_adds(c)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  if _is_tree_cell(FLAGS.genotype):
    _main_tree_cell()
    return
  model = _create_or_exit(eval_net.create_eval_net, FLAGS.genotype, dataset=FLAGS.dataset,
                          init_channels=FLAGS.init_channels, num_cells=FLAGS.num_cells,
                          prev_reduce=FLAGS.prev_reduce)
  c = count(model)
  print(f"genotype: {FLAGS.genotype} ({model.family} flavour), dataset: {FLAGS.dataset}, "
        f"C={model.init_channels}, cells={model.num_cells}")
  print(f"params (without aux head): {c['params']:,} ({c['params'] / 1e6:.3f} M)")
  print(f"aux head params: {c['aux_params']:,}")
  print(f"params with aux head: {c['total']:,}")
  _print_multiply_adds(c)
  published = PUBLISHED.get((FLAGS.genotype, FLAGS.dataset))
  if published and (FLAGS.init_channels, FLAGS.num_cells) == (None, None):
    print(f"published: {published[0] / 1e6:.0f} M multiply-adds, {published[1] / 1e6:.1f} M "
          f"params ({published[2]}; its counting convention is not stated)")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
