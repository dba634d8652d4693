"""The experiment configs, installed as `simbal_jax.configs` (the repository's configs/ folder).

`--config=NAME[:variant]` names one of them from any directory (`--config=demo:simbal`);
`resolve` turns such a value into the installed file. A path to a config file works as well.
"""

import os

DIR = os.path.dirname(os.path.abspath(__file__))


def names():
  """The installed config names (file names without `.py`: base, demo, moe_m, ...), sorted."""
  return sorted(f[:-3] for f in os.listdir(DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve(value):
  """Maps a `--config` value PATH[:variant] or NAME[:variant] to PATH[:variant].

  An existing file wins; otherwise NAME (or NAME.py) is an installed config (`names()`) and
  becomes its file here. The variant is kept as given.

  Raises:
    ValueError: the value is neither an existing file nor an installed config's name.
  """
  path, sep, variant = str(value).partition(":")
  if os.path.isfile(path):
    return str(value)
  name = path[:-len(".py")] if path.endswith(".py") else path
  if name in names():
    return os.path.join(DIR, name + ".py") + sep + variant
  what = "no such config file" if os.sep in path or "/" in path else "no such config name"
  raise ValueError(f"{what} {path!r}; config names: {', '.join(names())} (a name or a file "
                   "path, then an optional :variant, e.g. --config=demo:simbal)")
