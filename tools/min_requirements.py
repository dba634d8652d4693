"""Prints the declared minimum versions as exact pins, one a line, for `pip install -r`.

  python3 tools/min_requirements.py [--extras=test] [--skip=lm-eval] > min-requirements.txt

Every `name>=x` of setup.cfg's install_requires (and of the named extras) becomes `name==x`;
`!=` exclusions are dropped (the minimum itself is what is pinned). A requirement without a
`>=` minimum is an error: each dependency declares the oldest version known to work, and
`make min-versions` installs exactly these and runs a smoke subset of the tests on them.
Standard library only: runs before any virtualenv exists.
"""

import argparse
import configparser
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REQUIREMENT = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[^\]]*\])?\s*"
    r">=\s*(?P<version>[^,;\s]+)(\s*,\s*!=\s*[^,;\s]+)*")


def _lines(text):
  return [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")]


def requirements(setup_cfg, extras=()):
  """install_requires, then each named extra's requirements, as written in `setup_cfg`."""
  cfg = configparser.ConfigParser()
  if not cfg.read(setup_cfg):
    raise FileNotFoundError(f"no such file: {setup_cfg}")
  out = _lines(cfg["options"]["install_requires"])
  for extra in extras:
    out += _lines(cfg["options.extras_require"][extra])
  return out


def pin(requirement):
  """'name[extra]>=x,!=y' -> 'name[extra]==x'.

  Raises:
    ValueError: `requirement` does not declare a `>=` minimum (or has other clauses).
  """
  m = _REQUIREMENT.fullmatch(requirement.strip())
  if m is None:
    raise ValueError(f"{requirement!r}: declare the minimum as name>=version")
  return f"{m['name']}{m['extras'] or ''}=={m['version']}"


def _normal(name):
  return re.sub(r"[-_.]+", "-", name).lower()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setup_cfg", default=os.path.join(ROOT, "setup.cfg"))
  parser.add_argument("--extras", default="", help="comma-separated extras to pin as well")
  parser.add_argument("--skip", default="", help="comma-separated names to leave out")
  args = parser.parse_args(argv)
  skip = {_normal(s) for s in args.skip.split(",") if s.strip()}
  extras = [e.strip() for e in args.extras.split(",") if e.strip()]
  try:
    pins = [pin(r) for r in requirements(args.setup_cfg, extras)]
  except (ValueError, KeyError, FileNotFoundError) as e:
    sys.exit(f"min_requirements: {e}")
  seen = set()
  for p in pins:
    name = _normal(re.split(r"[\[=]", p, maxsplit=1)[0])
    if name not in skip and name not in seen:
      seen.add(name)
      print(p)


if __name__ == "__main__":
  main()
