"""Tests of the evaluation networks (bnas_jax.models.eval_net) and the counting CLI (bnas_jax.count).

Oracles: the exact parameter counts of reference_numbers.md (published / recomputed from the
original PyTorch definitions), a multiply-add count done by hand for a one-cell network, and
exact equality for determinism and checkpoint round trips.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnas_jax import checkpointing
from bnas_jax import count as count_lib
from bnas_jax import errors
from bnas_jax import genotype as genotype_lib
from bnas_jax.models import eval_net
from bnas_jax.models import layers

# reference_numbers.md: CIFAR evaluation network, C = 36, 20 cells, without the aux head.
REFERENCE_PARAMS = {
    "darts_v1": 3_169_414,
    "darts_v2": 3_349_342,
    "pc_darts": 3_634_678,
    "drnas": 4_099_294,
    "gdas_v1": 3_368_782,
    "bayesnas_0.01": 2_575_702,
    "bayesnas_0.007": 3_197_350,
    "bayesnas_0.005": 2_512_198,
}
DARTS_AUX_PARAMS = 476_426


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_cifar_param_counts_match_reference_exactly(name):
  counts = eval_net.param_counts(eval_net.create_eval_net(name))
  assert counts["params"] == REFERENCE_PARAMS[name]
  # The DARTS-style aux head sits on the 576-channel 8x8 output of cell 13 in both flavours.
  assert counts["aux_params"] == DARTS_AUX_PARAMS
  assert counts["total"] == REFERENCE_PARAMS[name] + DARTS_AUX_PARAMS


def test_bayesnas_prev_reduce_variant_changes_count_as_released():
  # The 0.005 model uses the factorised reduce on c_{k-2} after each reduction: two 1x1 convs
  # C_in -> C_in/2 (2 * C_in * C_in/2 weights) instead of one C_in -> C_in conv (C_in^2): equal
  # counts, different parameter trees.
  geno = "bayesnas_0.005"
  fact = eval_net.create_eval_net(geno)
  conv = eval_net.create_eval_net(geno, prev_reduce="conv")
  assert fact.prev_reduce == "factorized" and conv.prev_reduce == "conv"
  pf = eval_net.abstract_variables(fact)["params"]
  pc = eval_net.abstract_variables(conv)["params"]
  assert "reduce_2" in pf["cell_7"]["preprocess0"]
  assert "reduce_2" not in pc["cell_7"]["preprocess0"]
  assert pf["cell_7"]["preprocess0"]["reduce_2"]["kernel"].shape[-2:] == (144, 72)
  assert eval_net.count_params(pf) == eval_net.count_params(pc)


def test_imagenet_mobile_counts():
  # reference_numbers.md: about 4.009 M (0.01) and 3.901 M (0.005); DARTS paper: 4.7 M (DARTS_V2).
  c01 = eval_net.param_counts(eval_net.create_eval_net("bayesnas_0.01", dataset="imagenet"))
  c005 = eval_net.param_counts(eval_net.create_eval_net("bayesnas_0.005", dataset="imagenet"))
  cd = eval_net.param_counts(eval_net.create_eval_net("darts_v2", dataset="imagenet"))
  assert round(c01["params"] / 1e6, 3) == 4.009
  assert round(c005["params"] / 1e6, 3) == 3.901
  assert round(cd["params"] / 1e6, 1) == 4.7


# ---- a tiny network for the numeric tests ---------------------------------------------------------

TINY_DARTS = genotype_lib.Genotype(
    space="darts",
    normal=((2, 0, "sep_conv_3x3"), (2, 1, "skip_connect"), (3, 2, "dil_conv_3x3"),
            (3, 1, "max_pool_3x3"), (4, 1, "avg_pool_3x3"), (5, 4, "skip_connect")),
    reduce=((2, 0, "sep_conv_3x3"), (2, 1, "max_pool_3x3"), (3, 2, "dil_conv_3x3"),
            (3, 1, "skip_connect"), (4, 3, "skip_connect"), (4, 0, "avg_pool_3x3"),
            (5, 2, "sep_conv_5x5"), (5, 4, "max_pool_3x3")),
    normal_concat=(2, 3, 4, 5), reduce_concat=(2, 3, 4, 5))


def test_multiply_adds_match_hand_count():
  # One cell (a reduction cell, since L // 3 = 0), C = 4 -> 8 in the cell, stem 3 -> 12, 32x32.
  model = eval_net.create_eval_net(TINY_DARTS, init_channels=4, num_cells=1, auxiliary=False)
  hw, hw2 = 32 * 32, 16 * 16
  stem = 12 * 3 * 9 * hw
  preprocess = 2 * (12 * 8 * hw)  # two ReLUConvBN 1x1 12 -> 8 at 32x32
  sep3 = (9 * 8 + 8 * 8 + 9 * 8 + 8 * 8) * hw2  # stride 2: every conv runs at 16x16
  dil3 = (9 * 8 + 8 * 8) * hw2
  skip_fr = 2 * (8 * 4) * hw2  # skip_connect at stride 2 = FactorizedReduce 8 -> 4 + 4
  sep5 = (25 * 8 + 8 * 8 + 25 * 8 + 8 * 8) * hw2
  classifier = 32 * 10
  expected = stem + preprocess + sep3 + dil3 + skip_fr + sep5 + classifier
  assert expected == 784_704
  assert count_lib.count(model)["multiply_adds"] == expected


@pytest.fixture(scope="module")
def tiny():
  """A 2-cell C = 4 DARTS-flavour net with aux head (both cells are reductions: 32 -> 8)."""
  model = eval_net.create_eval_net(TINY_DARTS, init_channels=4, num_cells=2)
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
  variables = jax.jit(lambda k: model.init({"params": k}, images, train=False))(jax.random.key(0))

  @jax.jit
  def eval_apply(v, x):
    return model.apply(v, x, train=False, drop_prob=0.5)[0]

  @jax.jit
  def train_apply(v, x, p, key):
    (logits, aux), new = model.apply(v, x, train=True, drop_prob=p, rngs={"dropout": key},
                                     mutable=["batch_stats"])
    return logits, aux, new["batch_stats"]

  return model, images, variables, eval_apply, train_apply


def test_depthwise_impls_give_the_same_eval_net(tiny):
  """'auto' (shift_vjp on CPU) and 'lax' build the same parameters and the same function."""
  model, images, variables, _, train_apply = tiny
  assert model.dw_impl == layers.resolve_dw_impl("auto")
  ref = model.clone(dw_impl="lax")
  p = jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: ref.init({"params": jax.random.key(0)}, images, train=False))["params"])
  assert p == jax.tree.map(jnp.shape, variables["params"])
  logits, _, _ = train_apply(variables, images, 0.0, jax.random.key(1))
  # Compiled: eagerly, each op of the 'lax' network would be compiled alone.
  (ref_logits, _), _ = jax.jit(lambda v, x: ref.apply(
      v, x, train=True, drop_prob=0.0, rngs={"dropout": jax.random.key(1)},
      mutable=["batch_stats"]))(variables, images)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_eval_mode_is_deterministic_without_drop_path(tiny):
  model, images, variables, eval_apply, train_apply = tiny
  a = eval_apply(variables, images)
  b = eval_apply(variables, images)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # drop_prob is ignored in eval mode: the same program (and logits) as the call without it.
  c, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert aux is None
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  # In train mode the drop path is active (different keys -> different logits) only when p > 0.
  l1, aux1, _ = train_apply(variables, images, 0.5, jax.random.key(1))
  l2, _, _ = train_apply(variables, images, 0.5, jax.random.key(2))
  assert aux1.shape == (4, 10)
  assert not np.allclose(np.asarray(l1), np.asarray(l2))
  z1, _, _ = train_apply(variables, images, 0.0, jax.random.key(1))
  z2, _, _ = train_apply(variables, images, 0.0, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(z1), np.asarray(z2))


def test_save_then_restore_gives_identical_logits(tiny, tmp_path):
  _, images, variables, eval_apply, train_apply = tiny
  _, _, stats = train_apply(variables, images, 0.0, jax.random.key(0))  # non-trivial BN stats
  variables = {"params": variables["params"], "batch_stats": stats}
  before = np.asarray(eval_apply(variables, images))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, variables, {"note": "eval_net test"})
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  restored, meta = checkpointing.Checkpointer(str(tmp_path / "ckpt")).restore(abstract)
  assert meta == {"note": "eval_net test"}
  np.testing.assert_array_equal(before, np.asarray(eval_apply(restored, images)))
  # A checkpoint of the older layout (a leading group axis of 1 on every op parameter) is refused
  # with a ConfigError naming the checkpoint and the fix, not an orbax traceback.
  old = jax.tree.map(lambda x: x[None], variables)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "old"), async_save=False)
  ckpt.save(3, old, {"note": "old layout"})
  ckpt.close()
  with pytest.raises(errors.ConfigError, match=r"checkpoint #3 in .*old does not match .* new "
                     r"--workdir \(ValueError: state leaf \S+ has shape \(\d+,\), "
                     r"the checkpoint \(1, \d+\)"):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "old"))
    try:
      ckpt.restore(abstract)
    finally:
      ckpt.close()


def test_bayesnas_flavour_structure():
  # Released structure: stem conv without BN, CReduct preprocessing, final BN, no ReLU head.
  p = eval_net.abstract_variables(eval_net.create_eval_net("bayesnas_0.01"))["params"]
  assert "stem_bn" not in p and "final_bn" in p
  assert set(p["cell_7"]["preprocess0"]) == {"reduce", "bn", "pw"}  # 1x1 stride-2 conv first
  assert p["cell_7"]["preprocess0"]["reduce"]["kernel"].shape[-2:] == (144, 144)
  # Several ops on one edge are all present (normal n0 <- {sep5, max, avg, ident}(k-2)).
  edges = {k for k in p["cell_0"] if k.startswith("edge_")}
  assert "edge_2_0_sep5" in edges and "edge_2_1_sep5" in edges


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown dataset"):
    eval_net.create_eval_net("darts_v2", dataset="mnist")
  with pytest.raises(ValueError, match="prev_reduce"):
    eval_net.create_eval_net("bayesnas_0.01", prev_reduce="pool")
  with pytest.raises(ValueError, match="neither a registered genotype"):
    eval_net.create_eval_net("no_such_cell")
  model = eval_net.create_eval_net(TINY_DARTS, init_channels=4, num_cells=2)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((2, 3, 32, 32)),
                                      train=False))


def test_count_cli_prints_darts_convention():
  out = subprocess.run([sys.executable, "-m", "bnas_jax.count", "--genotype", "darts_v2"],
                       capture_output=True, text=True, check=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert "params (without aux head): 3,349,342" in out
  assert "aux head params: 476,426" in out
  assert "multiply-adds per image:" in out


def test_nb201_genotypes_are_refused_with_a_clear_error():
  with pytest.raises(ValueError, match="'nb201' cell; evaluation networks are built for"):
    eval_net.create_eval_net("nb201_best_val")


def test_empty_cell_genotype_is_refused_with_a_clear_error():
  from bnas_jax import genotype as genotype_lib  # pylint: disable=import-outside-toplevel
  g = genotype_lib.get_genotype("darts_v2")
  empty = genotype_lib.Genotype(space="darts", normal=g.normal, normal_concat=g.normal_concat,
                                reduce=(), reduce_concat=())
  with pytest.raises(ValueError, match="reduce cell of this darts genotype is empty"):
    eval_net.create_eval_net(empty)


def test_count_docstring_gives_the_computed_figure_beside_the_published_one():
  model = eval_net.create_eval_net("darts_v2", dataset="imagenet")
  c = count_lib.count(model)
  computed = f"{c['multiply_adds'] / 1e6:.1f} M"
  assert computed == "529.9 M" and round(c["params"] / 1e6, 2) == 4.72
  published = count_lib.PUBLISHED[("darts_v2", "imagenet")]
  assert published[:2] == (574e6, 4.7e6)
  assert computed in count_lib.__doc__ and "574 M" in count_lib.__doc__


def test_count_cli_counts_tree_cells_in_the_pyramidnet():
  # Spec oracle (proxyless spec 3): TreeCell-A in the PyramidNet with N = 18 blocks per stage,
  # alpha = 84, 2 groups has 5,724,330 parameters.
  out = subprocess.run([sys.executable, "-m", "bnas_jax.count", "--genotype", "tree_cell_a"],
                       capture_output=True, text=True, check=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
  assert "params: 5,724,330" in out and "multiply-adds per image:" in out
