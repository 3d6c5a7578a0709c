"""Names of the data package under their former module (`bnas_jax.data` holds the code).

New code imports the data modules themselves: `bnas_jax.data.dataset` (config, `Dataset`,
errors, `check_data`), `bnas_jax.data.readers` (loaders), `bnas_jax.data.prepare` (preparation and
its command line), `bnas_jax.data.pipeline` (splits, augmentation, `Loader`) and
`bnas_jax.data.sharding` (mesh, batch sharding).
"""

from bnas_jax.data.dataset import Dataset, DatasetError, DatasetNotFoundError  # pylint: disable=unused-import
from bnas_jax.data.pipeline import stable_permutation  # pylint: disable=unused-import
from bnas_jax.data.readers import channel_stats, load_tfds  # pylint: disable=unused-import
