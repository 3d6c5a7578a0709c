"""bnas_jax: BayesNAS (Zhou et al., ICML 2019) Bayesian one-shot NAS in JAX."""

__version__ = "0.1.0"
