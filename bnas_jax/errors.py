"""Exceptions shared by the runners and the command line."""


class ConfigError(ValueError):
  """A bad config value or a config that does not fit the workdir.

  The message names the field and the fix; `bnas_jax.main` prints it as one line (no traceback)
  and exits with status 2. Raised before any compilation or training.
  """


class NonFiniteError(FloatingPointError):
  """A run diverged: a non-finite loss, gradient or prior state stopped it.

  The runners keep the last good checkpoint and name it in the message; `bnas_jax.main` prints the
  message as one line (no traceback) and exits with status 1.
  """
