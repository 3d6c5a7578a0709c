"""Network compression by structured sparsity with the HARD prior (compression spec).

Modules: `networks` (the reference networks, unit switches, counts), `groups` (switch groups, the
hierarchy, structural deaths), `export` (the physically smaller network), `train` (pure step
functions and the BayesNAS outer loop on `bnas_jax.bayes` / `bnas_jax.curvature`), `baselines`
(group lasso, L1-norm filter pruning, random pruning), `runner` (``mode='compress'`` runs).
"""
