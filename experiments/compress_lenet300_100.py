r"""LeNet-300-100 compressed by the HARD prior (compression spec 1.1, 3.2), or a baseline.

Variants: ``full`` (default; the four standard MNIST IDX files, 60,000 / 10,000 with the last
10,000 training images held out for selection, 200 pretraining epochs as Sparse VD's schedule
length, T = 100, 10 fine-tuning epochs) and ``cpu`` (the shared MNIST test files split
8,000 / 2,000, 10 pretraining epochs, T = 4, 2 fine-tuning epochs; figures on that split are not
comparable with published results, which train on 60,000 images).

Run::

  python -m bnas_jax.main --config experiments/compress_lenet300_100.py --workdir runs/lenet300 \
      --config.data.data_dir /path/to/mnist-idx
"""

from bnas_jax import config_files


def get_config(arg=None):
  """`arg`: None / 'full' or 'cpu' (as experiments/compress_lenet5.py)."""
  variant = arg or "full"
  if variant not in ("full", "cpu"):
    raise ValueError(f"unknown variant {arg!r} of experiments/compress_lenet300_100.py; use full "
                     "or cpu")
  c = config_files.load_sibling(__file__, "compress_lenet5").get_config(variant)
  c.model.name = "lenet300_100"
  if variant == "cpu":
    # posterior prune rule: lambda 1e-3 left 165-153-95-10 at val 5.4 % (dense 4.6 %); 3e-4 keeps
    # 260-239-96-10 (CR_w 3.1) at val 4.2 %, test 4.4 % (one run, seed 0).
    c.compress.lam = 3e-4
  return c
