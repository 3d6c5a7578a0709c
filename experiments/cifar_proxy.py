r"""BayesNAS proxy search on CIFAR-10, the official protocol (spec 5, 7.1).

The bayesnas space (8 edges per cell, 7 ops + an origin switch per edge), an 8-cell supernet with
C = 36, batch 18, SGD lr 0.1 / momentum 0.9 / weight decay 1e-4 for the weights and lr 0.1 /
momentum 0.9 for the switches, one warm-up epoch on 5,000 images (crop + flip + cutout 16), then
T outer iterations of (one switch epoch on 40,000 images, curvature, prior update); lambda 0.01.

Run::

  python -m bnas_jax.main --config experiments/cifar_proxy.py --workdir /tmp/bnas/proxy
  python -m bnas_jax.main --config experiments/cifar_proxy.py:cpu --workdir /tmp/bnas/proxy_cpu \
      --config.data.data_dir ~/.cache/bnas_jax/cifar-10-batches-bin

Deviations from the original code (documented on purpose):

* Splits: one seeded permutation of the 50k training images is cut into disjoint warm-up (5k),
  search (40k) and val (5k) splits. The original drew two independent 10%/90% splits, so its 5k
  warm-up images largely overlapped its 45k switch images, and it "validated" on the CIFAR-10 test
  set (spec 9.6). Here the test set is never touched by the search.
* T = 3 outer iterations by default (the original code did exactly one, spec 9.2); set
  ``--config.search.iterations=1`` for the original's single update.
* gamma = omega = 1 at the start (the original: U(0, 1), spec 4.2; ``--config.bayes.random_init``).
* Pruning decides the cell: a switch group is pruned when its gamma falls below 0.72 times the
  median live gamma of its switch kind (``bayes.prune_threshold``, relative mode), and the
  genotype is every op that survives (the original derived cells by hand). The threshold was
  chosen on an earlier program of the ``cpu`` variant, where three updates left 12 (normal) and
  11 (reduce) ops; the current program leaves 10 and 4: float-rounding changes of the program
  move the cell (docs/results.md), so the threshold is not robust, and it is not tuned on the
  full protocol. ``--config.genotype.max_ops=13``
  caps the cell at the 13 surviving ops with the largest gamma, the size of the released cells.
* Curvature: GGN diagonal over 10 batches of the mean loss with batch-norm statistics held fixed,
  H = h / lambda (``bayes.curvature_scale = 1``: the precision of the loss the switches are
  trained on, see `bnas_jax.search`), instead of the original's quirky one-batch recursion
  (spec 6.3; ``--config.curvature.kind=recursive`` is the recursion without its bugs, and
  ``--config.bayes.curvature_scale=-1`` the original's sum-over-batch units).

Variants (``:name``):

* ``cpu``: a small supernet (C = 8, 5 cells) on a data subset (500 warm-up / 2,000 search / 500
  val images), T = 3, for a CPU. Pruned ops are computed with a zero switch
  (``model.pruned_ops='zero'``), so every outer iteration runs the full supernet's programs: with
  ``'skip'`` each pruned supernet is a new train step, eval step and curvature pass, which
  XLA:CPU compiles anew on every run (their executables are too large for the persistent cache
  on a CPU, ``bnas_jax.xla_flags``), minutes each on 2 cores; the price is a slower step once
  much is pruned. The persistent compilation cache removes the full supernet's compiles from a
  resumed run or a rerun.
"""

from bnas_jax import search


def get_config(arg=None):
  """The proxy-search config; `arg` selects a variant (None or 'cpu')."""
  config = search.default_config()
  config.space = "bayesnas"
  config.model.init_channels = 36
  config.model.num_cells = 8
  config.data.name = "cifar10"
  config.data.splits.warmup = 5_000
  config.data.splits.search = 40_000
  config.data.splits.val = 5_000
  config.data.cutout = 16
  config.search.iterations = 3
  config.search.batch_size = 18
  config.search.eval_batch_size = 200
  config.bayes.lambda_origin = 0.01
  config.bayes.lambda_op = 0.01
  config.checkpoint.every_steps = 500
  config.bayes.prune_threshold = 0.72  # relative to the median live gamma of the switch kind
  config.genotype.max_ops = 0  # the survivors define the cell; no cap

  if arg in (None, ""):
    return config
  if arg == "cpu":
    config.model.init_channels = 8
    config.model.num_cells = 5
    config.data.splits.warmup = 500
    config.data.splits.search = 2_000
    config.data.splits.val = 500
    config.search.eval_batch_size = 100
    config.curvature.num_batches = 4
    config.checkpoint.every_steps = 100
    config.log_every_steps = 25
    config.model.pruned_ops = "zero"  # one program per kind for the whole search (see above)
    return config
  raise ValueError(f"unknown variant {arg!r} of experiments/cifar_proxy.py; use '' or 'cpu'")
