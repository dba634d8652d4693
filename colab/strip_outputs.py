"""Strips a notebook to what git keeps: no outputs, no execution counts, no run metadata.

  python colab/strip_outputs.py colab/simbal_demo.ipynb          # strip in place
  python colab/strip_outputs.py --check colab/simbal_demo.ipynb  # exit 1 if not stripped

Kept: the sources, cell ids (one is given where missing: nbformat 4.5 ids keep diffs stable),
cell tags, and the notebook's kernelspec, language name and Colab name. Dropped: outputs,
execution counts, other cell metadata (Colab's output ids, collapsed, execution timings) and
notebook metadata such as saved widget state. Reads and writes JSON as nbformat does (one-space
indent, sorted keys), with the standard library only.
"""

import json
import re
import sys

_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _metadata(meta):
  out = {k: meta[k] for k in ("kernelspec", "accelerator") if k in meta}
  if "language_info" in meta:
    out["language_info"] = {"name": meta["language_info"].get("name", "python")}
  if "colab" in meta:
    out["colab"] = {"provenance": []}
    if "name" in meta["colab"]:
      out["colab"]["name"] = meta["colab"]["name"]
  return out


def strip(nb):
  """The stripped notebook (a new dict); `nb` is a notebook's JSON as a dict."""
  nb = json.loads(json.dumps(nb))
  nb["nbformat"], nb["nbformat_minor"] = 4, max(int(nb.get("nbformat_minor", 5)), 5)
  nb["metadata"] = _metadata(nb.get("metadata", {}))
  seen = set()
  for i, cell in enumerate(nb["cells"]):
    tags = cell.get("metadata", {}).get("tags")
    cell["metadata"] = {"tags": tags} if tags else {}
    cid = cell.get("id")
    if not cid or not _ID.match(cid) or cid in seen:
      cid = f"cell-{i}"
    cell["id"] = cid
    seen.add(cid)
    if cell["cell_type"] == "code":
      cell["outputs"], cell["execution_count"] = [], None
  return nb


def problems(nb):
  """What `strip` would change, as a list of one-line descriptions (empty: stripped)."""
  out = []
  if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) < (4, 5):
    out.append(f"nbformat {nb.get('nbformat')}.{nb.get('nbformat_minor')}: cell ids need 4.5")
  for i, (a, b) in enumerate(zip(nb["cells"], strip(nb)["cells"])):
    for key in ("id", "outputs", "execution_count", "metadata"):
      if a.get(key) != b.get(key):
        out.append(f"cell {i} ({a.get('id')}): {key}")
  if nb.get("metadata") != strip(nb)["metadata"]:
    out.append("notebook metadata")
  return out


def dumps(nb):
  """The notebook's JSON text as nbformat writes it."""
  return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main(argv):
  check = "--check" in argv
  paths = [a for a in argv if a != "--check"]
  if not paths:
    print("usage: python colab/strip_outputs.py [--check] NOTEBOOK...", file=sys.stderr)
    return 2
  status = 0
  for path in paths:
    with open(path, encoding="utf-8") as f:
      nb = json.load(f)
    found = problems(nb)
    if check:
      for p in found:
        print(f"{path}: not stripped: {p}")
      status |= bool(found)
    else:
      with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(strip(nb)))
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
