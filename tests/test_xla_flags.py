"""The compilation-cache guard of `bnas_jax.xla_flags`: CPU executables with more kernel objects
than `MAX_CPU_OBJECTS` are neither loaded from nor stored into JAX's persistent cache (XLA:CPU
segfaults reloading them); everything else passes through unchanged. And the curvature pass's own
compiler options."""

import types

import jax
from jax._src import compilation_cache as cc
import pytest

from bnas_jax import errors
from bnas_jax import search_config
from bnas_jax import xla_flags

ELF = b"\x7fELF"


class _Store:
  def __init__(self, entries):
    self.entries = entries

  def get(self, key):
    return self.entries.get(key)


def _entry(payload: bytes, compile_time: int = 7) -> bytes:
  """A cache entry as JAX writes it (the serialized executable and its compile time, compressed)."""
  return cc.compress_executable(cc.combine_executable_and_time(payload, compile_time))


def _fns(entries, platform="cpu"):
  calls = {"get": [], "put": []}
  store = _Store(entries)
  fake_cc = types.SimpleNamespace(
      _get_cache=lambda backend: store,
      decompress_executable=cc.decompress_executable,
      extract_executable_and_time=cc.extract_executable_and_time)

  def get(key, options, backend, *rest):
    calls["get"].append(key)
    serialized, t = cc.extract_executable_and_time(cc.decompress_executable(store.get(key)))
    return ("loaded", serialized), t

  def put(key, name, executable, backend, *rest):
    calls["put"].append(key)

  guarded_get, guarded_put = xla_flags._guarded(fake_cc, get, put)  # pylint: disable=protected-access
  backend = types.SimpleNamespace(platform=platform)
  return guarded_get, guarded_put, backend, calls


def test_count_objects_counts_elf_images():
  assert xla_flags.count_objects(b"head" + ELF + b"x" * 10 + ELF + b"tail") == 2
  assert xla_flags.count_objects(b"no objects") == 0


def test_large_cpu_executables_are_not_loaded_or_stored(monkeypatch):
  monkeypatch.setattr(xla_flags, "MAX_CPU_OBJECTS", 3)
  small, large = ELF * 3 + b"code", ELF * 4 + b"code"
  get, put, backend, calls = _fns({"small": _entry(small), "large": _entry(large)})
  assert get("large", None, backend, None) == (None, None)       # a miss: compiled instead
  assert get("small", None, backend, None) == (("loaded", small), 7)
  assert get("absent", None, backend, None) == (None, None)
  assert calls["get"] == ["small"]                                 # the large one never reached XLA
  put("k_large", "jit_step", types.SimpleNamespace(serialize=lambda: large), backend)
  put("k_small", "jit_step", types.SimpleNamespace(serialize=lambda: small), backend)
  assert calls["put"] == ["k_small"]


def test_other_backends_pass_through(monkeypatch):
  monkeypatch.setattr(xla_flags, "MAX_CPU_OBJECTS", 0)
  large = ELF * 10
  get, put, backend, calls = _fns({"k": _entry(large)}, platform="gpu")
  assert get("k", None, backend, None) == (("loaded", large), 7)
  put("k", "jit_step", types.SimpleNamespace(serialize=lambda: large), backend)
  assert calls == {"get": ["k"], "put": ["k"]}


def test_the_guard_is_installed_once():
  xla_flags._guard_cpu_cache()  # pylint: disable=protected-access  (configure_cache calls it)
  first = cc.get_executable_and_time
  assert getattr(first, "_bnas_guard", False)
  xla_flags._guard_cpu_cache()  # pylint: disable=protected-access
  assert cc.get_executable_and_time is first


def test_curvature_options_none_with_most_optimisations_disabled(full_xla_optimisation):
  jax.config.update("jax_disable_most_optimizations", True)  # the fixture restores the setting
  assert xla_flags.curvature_compiler_options(1, "cpu") is None


def test_curvature_options_only_below_level_3_on_cpu(full_xla_optimisation):
  assert xla_flags.curvature_compiler_options(1, "cpu") == {"xla_backend_optimization_level": 1}
  assert xla_flags.curvature_compiler_options(2, "cpu") == {"xla_backend_optimization_level": 2}
  assert xla_flags.curvature_compiler_options(3, "cpu") is None  # XLA's default
  assert xla_flags.curvature_compiler_options(1, "gpu") is None
  assert xla_flags.curvature_compiler_options(1, "tpu") is None


def test_bad_curvature_cpu_opt_level_is_a_config_error_naming_the_field():
  config = search_config.default_config()
  config.curvature.cpu_opt_level = 7
  with pytest.raises(errors.ConfigError, match="curvature.cpu_opt_level=7"):
    search_config.check_config(config)
