"""Data for bnas_jax, one module per job.

* `bnas_jax.data.dataset`: the ``config.data`` fields, the `Dataset` type, its errors, and
  `check_data` (is the named data there, before anything is created).
* `bnas_jax.data.readers`: CIFAR layouts, TFDS, one's own ``.npz`` / image folders -> `Dataset`.
* `bnas_jax.data.idx`: MNIST-style IDX files -> `Dataset`.
* `bnas_jax.data.prepare`: TFDS preparation, CIFAR-10 built from shared/, and the command line
  ``python -m bnas_jax.data.prepare``.
* `bnas_jax.data.pipeline`: seeded splits and shuffles, augmentation, and `Loader` (one split's
  batches epoch by epoch: ``loader.epoch(e, start_step)``).
* `bnas_jax.data.imagenet`: ImageNet from TFDS, decoded per batch; each process reads its rows.
* `bnas_jax.data.sharding`: the device mesh, the batch sharding, placing host batches.
"""
