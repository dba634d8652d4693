"""simbal_jax.programs: one made object per key, least recently used evicted first; `program`
shares a jitted function between callers with equal keys and `clear` forgets them all.
(tests/test_env.py checks the training code's keys: equal runs share their programs.)"""
import collections

import jax
import jax.numpy as jnp

from simbal_jax import programs


def test_shared_makes_once_per_key_and_evicts_the_least_recently_used():
  cache, made = collections.OrderedDict(), []

  def get(key):
    return programs.shared(cache, key, lambda: made.append(key) or f"obj-{key}", size=2)

  assert get("a") == "obj-a" and get("b") == "obj-b"
  assert get("a") == "obj-a"  # a hit: nothing made, and "a" is now the most recent
  assert made == ["a", "b"]
  get("c")  # a third key: "b", the least recently used, goes
  assert list(cache) == ["a", "c"]
  get("b")  # made again, and "a" goes
  assert made == ["a", "b", "c", "b"] and list(cache) == ["c", "b"]


def test_program_shares_one_jitted_function_per_name_and_key_until_cleared():
  programs.clear()
  calls = []

  def make(scale):
    calls.append(scale)
    return jax.jit(lambda x: scale * x)

  f = programs.program("scale", 2.0, lambda: make(2.0))
  assert programs.program("scale", 2.0, lambda: make(2.0)) is f  # equal key: the same function
  assert programs.program("other", 2.0, lambda: make(2.0)) is not f  # another name
  g = programs.program("scale", 3.0, lambda: make(3.0))
  assert float(f(jnp.float32(1.5))) == 3.0 and float(g(jnp.float32(1.5))) == 4.5
  assert calls == [2.0, 2.0, 3.0]
  programs.clear()
  assert programs.program("scale", 2.0, lambda: make(2.0)) is not f  # made afresh
  assert calls == [2.0, 2.0, 3.0, 2.0]
  programs.clear()


def test_program_keeps_the_newest_max_programs():
  programs.clear()
  first = programs.program("p", 0, object)
  for i in range(1, programs.MAX_PROGRAMS):
    programs.program("p", i, object)
  assert programs.program("p", 0, object) is first  # 64 entries: all still there
  programs.program("p", programs.MAX_PROGRAMS, object)  # a 65th evicts the oldest, key 1
  assert programs.program("p", 0, object) is first
  assert ("p", 1) not in programs._PROGRAMS  # pylint: disable=protected-access
  programs.clear()
