"""Data for bnas_jax: readers, preparation, the input pipeline and sharding, one module per job."""
