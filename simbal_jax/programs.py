"""Jitted programs shared by the runs of one process.

The runs of a comparison (methods, seeds), a resumed run, the notebook and the tests build the
same model again and again in one process; each would trace, lower and compile its own copy of
every program. `program(name, key, make)` returns the jitted function that `make()` made for
the first caller with an equal `key`, so its compiled executables serve them all.

`key` is hashable and holds everything `make` reads; `make` closes over small objects only
(a model, an optimizer, shardings: never an Env or a run's data, which the cache would keep
alive). The keys the training code uses (`env.Env.model_key`, `state_key`, `program_key`) are
listed in docs/ARCHITECTURE.md (module `programs`). The newest `MAX_PROGRAMS` are kept. Code
a program calls is read when it is first traced: after editing the library in a live process
(a notebook), call `env.clear_programs()` (this module's `clear()` and the cached models).
"""

import collections

MAX_PROGRAMS = 64
_PROGRAMS = collections.OrderedDict()  # (name, key) -> jitted function, least recent first


def shared(cache, key, make, size):
  """cache[key], made by `make()` when missing; an LRU of `size` entries. (Not
  functools.lru_cache: `make` is a closure over unhashable objects, the key is what it reads.)"""
  got = cache.pop(key, None)
  if got is None:
    got = make()
  cache[key] = got
  while len(cache) > size:
    cache.popitem(last=False)
  return got


def program(name, key, make):
  """The jitted program `name` made by `make()`, shared by every caller with an equal `key`."""
  return shared(_PROGRAMS, (name, key), make, MAX_PROGRAMS)


def clear():
  """Forgets every shared program: the next caller traces afresh."""
  _PROGRAMS.clear()
