"""Input-pipeline throughput (images/s) at the search batch sizes.

Usage: python bench/bench_input.py [--batch_sizes 18,64] [--steps 200] [--cutout 16] [--data_dir DIR]

Times `bnas_jax.data.pipeline.Loader.epoch` end to end (host gather of uint8 images, transfer, jitted
crop/flip/normalise/cutout on the default device, batch placed with the 1-D data sharding), after
one warm-up batch that pays for compilation. Uses the local CIFAR-10 from ``--data_dir`` (default
``$BNAS_DATA_DIR`` or ``~/.cache/bnas_jax``, see ``make data-shared``); falls back to random
uint8 images of the same shape when none is there.
"""

import argparse
import time

import jax
import numpy as np

from bnas_jax.data import dataset
from bnas_jax.data import pipeline
from bnas_jax.data import readers
from bnas_jax.data import sharding as sharding_lib


def _images(data_dir):
  try:
    ds = readers.load_local('cifar10', data_dir)
    x, y = pipeline.make_splits(ds, {'search': 40_000}, seed=0)['search']
    return x, y, f'CIFAR-10 search split from {ds.source}'
  except dataset.DatasetError as e:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (40_000, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, 40_000), f'random uint8 images ({type(e).__name__})')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_sizes', default='18,64')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--cutout', type=int, default=16)
  parser.add_argument('--data_dir', default=None)
  args = parser.parse_args()
  images, labels, what = _images(args.data_dir)
  sharding = sharding_lib.batch_sharding(sharding_lib.make_mesh())
  print(f'data: {what}; devices: {jax.device_count()} x {jax.devices()[0].platform}')
  for bs in [int(b) for b in args.batch_sizes.split(',')]:
    for augment in (True, False):
      loader = pipeline.Loader(images, labels, batch_size=bs, seed=0, mean=dataset.CIFAR10_MEAN,
                               std=dataset.CIFAR10_STD, augment=augment, cutout=args.cutout,
                               sharding=sharding)
      it = loader.epoch(0)
      jax.block_until_ready(next(it))  # Compile.
      start = time.perf_counter()
      n = 0
      for batch in it:
        n += 1
        if n == args.steps:
          break
      jax.block_until_ready(batch)
      dt = time.perf_counter() - start
      mode = f'augment (crop+flip+cutout {args.cutout})' if augment else 'normalise only'
      print(f'batch {bs:4d}  {mode:32s} {n * bs / dt:10.0f} images/s  ({1e3 * dt / n:.3f} ms/batch)')


if __name__ == '__main__':
  main()
