"""The input pipeline: seeded splits and shuffles, on-device augmentation, and `Loader`, one
split's batches epoch by epoch (``loader.epoch(e, start_step)``).

Randomness (all reproducible from the data seed):

* Splits: a permutation of ``range(num_train)`` from ``seed`` (`stable_permutation`, a SplitMix64
  hash: identical on every platform and numpy version); consecutive chunks go to the splits in
  the order given.
* Shuffling: a permutation of the split from ``(seed, epoch)``.
* Augmentation: ``jax.random`` keyed by ``fold_in(fold_in(key(seed), epoch), step)``
  (`batch_key`) inside one jitted function, so a run resumed at ``(epoch, start_step)`` sees
  exactly the batches of an uninterrupted run.

Augmentation (spec section 5; DARTS): random H x W crop of the image zero-padded by 4 pixels (in
pixel space), horizontal flip with probability 1/2, per-channel normalisation with the dataset's
mean/std, then cutout: a ``cutout x cutout`` square centred uniformly in the image, clipped at the
borders, set to 0 *after* normalisation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bnas_jax.data import sharding as sharding_lib
from bnas_jax.data.dataset import Dataset, DatasetError


# ---------------------------------------------------------------------------
# Seeded permutations and splits (host, numpy).
# ---------------------------------------------------------------------------

_U64 = np.uint64


def splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 (Steele, Lea & Flood 2014; Vigna's reference code): one output per input state.

  ``splitmix64(s)`` is the first output of a SplitMix64 generator seeded with state ``s``.

  Args:
    x: u64[...] states.

  Returns:
    u64[...] hashes.
  """
  with np.errstate(over='ignore'):
    z = np.asarray(x, _U64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _stream(*words: int) -> np.uint64:
  """A 64-bit stream id from non-negative integers (hash chaining)."""
  h = _U64(0)
  for w in words:
    if w < 0:
      raise DatasetError(f'seeds, epochs and steps must be >= 0, got {w}.')
    h = splitmix64(h ^ _U64(w % (1 << 64)))
  return h


def stable_permutation(n: int, *seeds: int) -> np.ndarray:
  """A permutation of ``range(n)`` determined by ``seeds`` alone.

  Sorts ``splitmix64(stream(seeds) + i)``; unlike numpy's Generators this is bit-identical on
  every platform and numpy version.

  Returns:
    i64[n].
  """
  with np.errstate(over='ignore'):
    keys = splitmix64(_stream(*seeds) + np.arange(n, dtype=_U64))
  return np.argsort(keys, kind='stable')


_SPLIT_TAG, _SHUFFLE_TAG = 0x5B117, 0x5BFF1E  # Separate the split and shuffle streams.


def split_train(num_examples: int, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
  """Seeded, disjoint subsets of ``range(num_examples)`` (training-set indices), by name.

  Args:
    num_examples: size of the training set.
    sizes: ``{split name: size}``; the splits take consecutive chunks of one seeded permutation in
      this order, so a split depends only on the seed and the sizes before it.
    seed: the data seed.

  Returns:
    ``{name: i64[size]}`` sorted indices (sorted for locality; `epoch_batches` shuffles).

  Raises:
    DatasetError: a negative size, or sizes summing to more than ``num_examples``.
  """
  sizes = dict(sizes)
  if any(int(s) < 0 for s in sizes.values()) or sum(int(s) for s in sizes.values()) > num_examples:
    raise DatasetError(
        f'config.data.splits={sizes} do not fit into the {num_examples:,} training examples '
        f'(sizes must be >= 0 and sum to at most {num_examples:,}, here {sum(sizes.values()):,}).')
  perm = stable_permutation(num_examples, _SPLIT_TAG, seed)
  out, start = {}, 0
  for name, size in sizes.items():
    out[name] = np.sort(perm[start:start + int(size)])
    start += int(size)
  return out


def make_splits(dataset: Dataset, sizes: Mapping[str, int], seed: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{name: (u8[n, H, W, C] images, i32[n] labels)}`` for the `split_train` splits."""
  idx = split_train(len(dataset.train_labels), sizes, seed)
  return {k: (dataset.train_images[v], dataset.train_labels[v]) for k, v in idx.items()}


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffle order i64[n] of epoch ``epoch`` of an ``n``-example set."""
  return stable_permutation(n, _SHUFFLE_TAG, seed, epoch)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Number of batches in one epoch."""
  if batch_size <= 0:
    raise DatasetError(f'batch_size must be positive, got {batch_size}.')
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


# ---------------------------------------------------------------------------
# Augmentation (device, jax.random).
# ---------------------------------------------------------------------------


def batch_key(seed: int, epoch: int, step: int) -> jax.Array:
  """The augmentation key of batch ``step`` of ``epoch``: fold_in(fold_in(key(seed), epoch), step)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), step)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """u8[B, H, W, C] pixels -> f32[B, H, W, C] ``(x / 255 - mean) / std`` (per channel)."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, mean: jax.Array, std: jax.Array, *,
            crop_padding: int = 4, flip: bool = True, cutout: int = 0) -> jax.Array:
  """Random crop + flip, normalisation, cutout (DARTS / spec section 5), per example.

  Args:
    key: a PRNG key (use `batch_key`).
    images: u8[B, H, W, C].
    mean: f32[C] per-channel mean in [0, 1] units.
    std: f32[C] per-channel std.
    crop_padding: zero-pad each side by this many pixels (in pixel space, before normalisation)
      and crop a random HxW window; 0 = no crop.
    flip: mirror left-right with probability 1/2.
    cutout: side of the square set to 0 after normalisation, centred uniformly in the image and
      clipped at the borders (rows ``[cy - cutout//2, cy + cutout//2)``); 0 = off.

  Returns:
    f32[B, H, W, C].
  """
  b, h, w, _ = images.shape
  k_crop, k_flip, k_cut = jax.random.split(key, 3)
  x = images
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
        padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(do_flip[:, None, None, None], x[:, :, ::-1, :], x)
  x = normalize(x, mean, std)
  if cutout:
    centre = jax.random.randint(k_cut, (b, 2), 0, jnp.array([h, w]))
    rows = jnp.arange(h)[None, :] - centre[:, :1]
    cols = jnp.arange(w)[None, :] - centre[:, 1:]
    half = cutout // 2
    in_rows = (rows >= -half) & (rows < cutout - half)
    in_cols = (cols >= -half) & (cols < cutout - half)
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    x = jnp.where(hole[..., None], 0.0, x)
  return x


def _transform(images, seed, epoch, step, mean, std, *, train: bool, cutout: int):
  if not train:
    return normalize(images, mean, std)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), step)
  return augment(key, images, mean, std, cutout=cutout)


@functools.lru_cache(maxsize=None)
def _transform_fn(sharding: jax.sharding.Sharding | None):
  kw = {} if sharding is None else {'out_shardings': sharding}
  return jax.jit(_transform, static_argnames=('train', 'cutout'), **kw)



# ---------------------------------------------------------------------------
# Epoch iterator.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loader:
  """One split's batches, epoch by epoch, on device: ``for batch in loader.epoch(e, start_step)``.

  Batch ``step`` of epoch ``e`` holds examples ``perm[step * B:(step + 1) * B]`` with
  ``perm = epoch_permutation(N, seed, e)`` (or ``arange(N)`` when ``shuffle=False``) and is
  augmented with key `batch_key` ``(seed, e, step)``, so the batches depend only on
  ``(seed, e, step)``: starting at ``start_step`` gives exactly the tail of a full epoch.

  Attributes:
    images: u8[N, H, W, C] host array (e.g. one split from `make_splits`).
    labels: int[N].
    batch_size: global batch size B.
    seed: data seed (shuffle and augmentation), in [0, 2**31).
    mean: f32[C] normalisation mean in [0, 1] units (``Dataset.mean``).
    std: f32[C] normalisation std (``Dataset.std``).
    augment: random crop (pad 4) + flip + cutout; False = normalisation only.
    cutout: cutout side when ``augment`` (0 = off).
    shuffle: shuffle with `epoch_permutation`; False = file order (evaluation).
    drop_remainder: drop the last partial batch. If False, the last batch is padded to B with
      copies of example 0 and every batch carries ``'mask': f32[B]`` (1 = real example, 0 = pad).
    sharding: where to put each batch (`sharding.batch_sharding`); None = default device. With
      several processes each one reads only its own rows.
    max_steps: > 0 caps the steps of every epoch (smoke tests); -1 = whole epochs.

  Raises (at construction):
    DatasetError: mismatched inputs, a batch size not divisible by the device count, a seed
      outside [0, 2**31), or a split smaller than one batch (naming the fix).
  """
  images: np.ndarray
  labels: np.ndarray
  batch_size: int
  seed: int
  mean: np.ndarray
  std: np.ndarray
  augment: bool = False
  cutout: int = 0
  shuffle: bool = True
  drop_remainder: bool = True
  sharding: jax.sharding.Sharding | None = None
  max_steps: int = -1

  def __post_init__(self):
    n = len(self.labels)
    if self.images.ndim != 4 or self.images.dtype != np.uint8 or len(self.images) != n:
      raise DatasetError(f'Loader expects u8[N, H, W, C] images and N labels, got '
                         f'{self.images.dtype}{list(self.images.shape)} and {n} labels.')
    if not 0 <= self.seed < 2**31:
      raise DatasetError(f'seed={self.seed} must lie in [0, 2**31).')
    if self.sharding is not None:
      sharding_lib.check_divisible(self.sharding, self.batch_size)
    steps_per_epoch(n, self.batch_size, self.drop_remainder)  # checks the batch size

  @property
  def steps(self) -> int:
    """Batches per epoch (capped by `max_steps`)."""
    n = steps_per_epoch(len(self.labels), self.batch_size, self.drop_remainder)
    return min(n, self.max_steps) if self.max_steps > 0 else n

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Batches ``start_step .. steps - 1`` of `epoch`.

    Yields:
      ``{'image': f32[B, H, W, C], 'label': i32[B]}`` (+ ``'mask': f32[B]``), placed per
      ``sharding``.

    Raises:
      DatasetError: an epoch outside [0, 2**31) or a ``start_step`` outside ``[0, steps]``.
    """
    steps, b = self.steps, self.batch_size
    if not 0 <= epoch < 2**31:
      raise DatasetError(f'epoch={epoch} must lie in [0, 2**31).')
    if not 0 <= start_step <= steps:
      raise DatasetError(f'start_step={start_step} outside [0, {steps}] (steps in this epoch).')
    return self._batches(epoch, start_step, steps, b)

  def _batches(self, epoch, start_step, steps, b):
    n = len(self.labels)
    rows = slice(0, b) if self.sharding is None else sharding_lib.local_rows(self.sharding, b)
    order = epoch_permutation(n, self.seed, epoch) if self.shuffle else np.arange(n)
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    fn = _transform_fn(self.sharding)
    cutout = int(self.cutout) if self.augment else 0
    for step in range(start_step, steps):
      idx = order[step * b:(step + 1) * b]
      valid = len(idx)
      if valid < b:
        idx = np.concatenate([idx, np.zeros(b - valid, idx.dtype)])
      idx = idx[rows]
      host = {'image': self.images[idx], 'label': np.asarray(self.labels[idx], np.int32)}
      if not self.drop_remainder:
        host['mask'] = (np.arange(b)[rows] < valid).astype(np.float32)
      if self.sharding is not None:
        host = sharding_lib.shard_batch(host, self.sharding, b)
      out = dict(host)
      out['image'] = fn(host['image'], np.int32(self.seed), np.int32(epoch), np.int32(step), mean,
                        std, train=self.augment, cutout=cutout)
      if self.sharding is None:
        out = {k: jnp.asarray(v) for k, v in out.items()}
      yield out
