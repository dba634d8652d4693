"""Which jax build this machine needs: prints `tpu`, `gpu` or `cpu` (`--extra`: the pip extra).

  python3 tools/accelerator.py            # tpu | gpu | cpu
  python3 tools/accelerator.py --extra    # ,tpu | ,gpu | (nothing): the Makefile's EXTRA
  SIMBAL_ACCELERATOR=cpu python3 tools/accelerator.py   # an override wins over detection

The Makefile (`make install` / `make test` / `make demo`) and the notebook's first cell both
ask this script, so a TPU VM gets `jax[tpu]`, an NVIDIA machine `jax[cuda12]` and anything else
CPU jax. Standard library only: it runs before any virtualenv exists.

The rule (first match wins):
  tpu  any of
       - a TPU driver device node /dev/accel<N> (TPU v2, v3, v4 VMs);
       - a PCI device of Google's vendor id 0x1ae0 whose device id is a TPU chip's
         (`TPU_PCI_DEVICE_IDS`, the list jax itself uses to suggest jax[tpu]);
       - a VFIO group /dev/vfio/<N> (TPU v5e, v5p, v6e chips are handed to libtpu through
         VFIO) together with a second TPU sign: the TPU_ACCELERATOR_TYPE variable TPU VMs set,
         or a Google-vendor PCI device bound to the vfio-pci driver. VFIO alone is no sign:
         any machine can bind a device (a NIC for DPDK, a GPU for a VM) to vfio-pci, and
         Google's vendor id alone is none either (GCE's gVNIC and NVMe disks carry it).
  gpu  `nvidia-smi -L` on PATH exits 0 (an NVIDIA driver that sees a GPU).
  cpu  otherwise.
TPU_ACCELERATOR_TYPE without a device, and COLAB_TPU_ADDR / TPU_NAME (the retired TPU-node
setups, where the TPU is a remote server that libtpu cannot drive), do not make a TPU.
`detect` takes the device and sysfs roots, the environment and PATH as arguments, so the
tests fake every case.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

CHOICES = ("tpu", "gpu", "cpu")
OVERRIDE = "SIMBAL_ACCELERATOR"
GOOGLE_PCI_VENDOR = "0x1ae0"
# TPU chips' PCI device ids (v2/v3, an unnamed one, v4, v5p, v5e, v6e, TPU7x), as in jax's
# hardware detection (jax/_src/hardware_utils.py).
TPU_PCI_DEVICE_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_NUMBERED = re.compile(r"^\d+$")


def _numbered(directory, prefix=""):
  """Names `<prefix><N>` in `directory` (sorted; [] when it does not exist)."""
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(n for n in names if n.startswith(prefix) and _NUMBERED.match(n[len(prefix):]))


def _read(path):
  try:
    with open(path, encoding="ascii", errors="replace") as f:
      return f.read().strip().lower()
  except OSError:
    return ""


def google_pci_devices(sys_root="/sys"):
  """[(device id, driver name or "")] of the PCI devices with Google's vendor id."""
  out = []
  for vendor in sorted(glob.glob(os.path.join(sys_root, "bus", "pci", "devices", "*", "vendor"))):
    if _read(vendor) != GOOGLE_PCI_VENDOR:
      continue
    device_dir = os.path.dirname(vendor)
    driver = os.path.join(device_dir, "driver")
    name = os.path.basename(os.path.realpath(driver)) if os.path.islink(driver) else ""
    out.append((_read(os.path.join(device_dir, "device")), name))
  return out


def tpu_signs(dev_root="/dev", sys_root="/sys", environ=None):
  """The TPU signs found (list of short strings; empty: not a TPU machine). See the rule."""
  environ = os.environ if environ is None else environ
  signs = [f"{dev_root}/{n}" for n in _numbered(dev_root, "accel")]
  google = google_pci_devices(sys_root)
  signs += [f"PCI {GOOGLE_PCI_VENDOR}:{d}" for d, _ in google if d in TPU_PCI_DEVICE_IDS]
  groups = _numbered(os.path.join(dev_root, "vfio"))
  if groups:
    second = ["TPU_ACCELERATOR_TYPE"] if environ.get("TPU_ACCELERATOR_TYPE", "").strip() else []
    second += [f"PCI {GOOGLE_PCI_VENDOR}:{d} on vfio-pci" for d, drv in google
               if drv == "vfio-pci"]
    if second:
      signs += [f"{dev_root}/vfio/{groups[0]}"] + second
  return signs


def nvidia_gpu(path=None):
  """True when `nvidia-smi -L` is found on `path` (default: PATH) and exits 0."""
  exe = shutil.which("nvidia-smi", path=path)
  if exe is None:
    return False
  try:
    return subprocess.run([exe, "-L"], capture_output=True, timeout=60, check=False).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def detect(dev_root="/dev", sys_root="/sys", environ=None, path=None):
  """"tpu", "gpu" or "cpu" for this machine (or the faked roots, environment and PATH).

  Raises:
    ValueError: SIMBAL_ACCELERATOR is set to something other than tpu, gpu or cpu.
  """
  environ = os.environ if environ is None else environ
  forced = environ.get(OVERRIDE, "").strip().lower()
  if forced:
    if forced not in CHOICES:
      raise ValueError(f"{OVERRIDE}={forced!r}; valid: {', '.join(CHOICES)}")
    return forced
  if tpu_signs(dev_root, sys_root, environ):
    return "tpu"
  if nvidia_gpu(environ.get("PATH") if path is None else path):
    return "gpu"
  return "cpu"


def pip_extra(kind):
  """The setup.cfg extra that installs jax for `kind`: "tpu", "gpu" or "" (CPU jax)."""
  return "" if kind == "cpu" else kind


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--extra", action="store_true",
                      help="print the Makefile's extra (',tpu', ',gpu' or nothing)")
  parser.add_argument("--why", action="store_true", help="also print the TPU signs to stderr")
  args = parser.parse_args(argv)
  try:
    kind = detect()
  except ValueError as e:
    sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")
  if args.why:
    print(f"{kind}; TPU signs: {tpu_signs() or 'none'}", file=sys.stderr)
  extra = pip_extra(kind)
  print(("," + extra if extra else "") if args.extra else kind)


if __name__ == "__main__":
  main()
