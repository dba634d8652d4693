"""A fresh machine: tools/accelerator.py picks the jax build (TPU / CUDA / CPU) for faked TPU
VMs of every generation, NVIDIA machines and plain ones."""
import importlib.util
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TOOL = os.path.join(_ROOT, "tools", "accelerator.py")


def _accelerator():
  spec = importlib.util.spec_from_file_location("accelerator", _TOOL)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _machine(tmp_path, *, accel=(), vfio=(), pci=(), nvidia_smi=None):
  """Fake /dev and /sys roots and a PATH directory under tmp_path.

  accel: numbers of /dev/accel<N>; vfio: names under /dev/vfio ("vfio" is the control node
  every VFIO machine has, numbers are groups); pci: (vendor, device, driver or None) per PCI
  device; nvidia_smi: None (absent) or the exit status of a fake `nvidia-smi`.
  """
  dev, sys_root, bin_dir = tmp_path / "dev", tmp_path / "sys", tmp_path / "bin"
  for d in (dev, sys_root, bin_dir):
    d.mkdir()
  for n in accel:
    (dev / f"accel{n}").write_text("")
  if vfio:
    (dev / "vfio").mkdir()
    for name in vfio:
      (dev / "vfio" / str(name)).write_text("")
  drivers = sys_root / "bus" / "pci" / "drivers"
  for i, (vendor, device, driver) in enumerate(pci):
    d = sys_root / "bus" / "pci" / "devices" / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
    if driver:
      (drivers / driver).mkdir(parents=True, exist_ok=True)
      (d / "driver").symlink_to(drivers / driver)
  if nvidia_smi is not None:
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho 'GPU 0: fake'\nexit {nvidia_smi}\n")
    exe.chmod(0o755)
  return str(dev), str(sys_root), str(bin_dir)


GVNIC = ("0x1ae0", "0x0042", "gvnic")        # Google's virtual NIC: Google vendor, not a TPU
GCE_NVME = ("0x1ae0", "0x001f", "nvme")      # a GCE persistent disk
INTEL_NIC_VFIO = ("0x8086", "0x1572", "vfio-pci")  # a NIC handed to DPDK through VFIO

CASES = {
    # name: (machine, environment, expected)
    "tpu_v4_accel": (dict(accel=[0, 1, 2, 3]), {}, "tpu"),
    "tpu_v2_accel_only_node": (dict(accel=[0]), {}, "tpu"),
    "tpu_v5e_vfio_env": (dict(vfio=["vfio", 0, 1]), {"TPU_ACCELERATOR_TYPE": "v5litepod-8"},
                         "tpu"),
    "tpu_v5p_vfio_pci_id": (dict(vfio=["vfio", 0], pci=[("0x1ae0", "0x0062", "vfio-pci")]), {},
                            "tpu"),
    "tpu_v6e_pci_id_only": (dict(pci=[GVNIC, ("0x1ae0", "0x006f", None)]), {}, "tpu"),
    "tpu_future_chip_on_vfio": (dict(vfio=["vfio", 7], pci=[GVNIC, ("0x1ae0", "0x0099",
                                                                    "vfio-pci")]), {}, "tpu"),
    "tpu_beats_gpu": (dict(accel=[0], nvidia_smi=0), {}, "tpu"),
    "gpu": (dict(nvidia_smi=0), {}, "gpu"),
    "gpu_with_dpdk_vfio": (dict(vfio=["vfio", 12], pci=[INTEL_NIC_VFIO], nvidia_smi=0), {},
                           "gpu"),
    "driver_without_gpu": (dict(nvidia_smi=9), {}, "cpu"),
    "cpu": (dict(), {}, "cpu"),
    "vfio_control_node_and_env": (dict(vfio=["vfio"]), {"TPU_ACCELERATOR_TYPE": "v5p-8"}, "cpu"),
    "vfio_group_without_tpu_sign": (dict(vfio=["vfio", 3], pci=[INTEL_NIC_VFIO, GVNIC]), {},
                                    "cpu"),
    "gce_vm_google_devices": (dict(pci=[GVNIC, GCE_NVME]), {}, "cpu"),
    "env_without_device": (dict(), {"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_NAME": "x"}, "cpu"),
    "retired_colab_tpu_node": (dict(), {"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "cpu"),
    "accel_not_numbered": (dict(accel=["x"]), {}, "cpu"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_detection_for_faked_machines(tmp_path, name):
  machine, environ, expected = CASES[name]
  dev, sys_root, path = _machine(tmp_path, **machine)
  acc = _accelerator()
  got = acc.detect(dev_root=dev, sys_root=sys_root, environ=dict(environ, PATH=path))
  assert got == expected
  assert acc.pip_extra(got) == {"tpu": "tpu", "gpu": "gpu", "cpu": ""}[expected]


def test_override_and_its_error(tmp_path):
  dev, sys_root, path = _machine(tmp_path, accel=[0])
  acc = _accelerator()
  env = {"PATH": path, "SIMBAL_ACCELERATOR": "CPU"}
  assert acc.detect(dev_root=dev, sys_root=sys_root, environ=env) == "cpu"
  with pytest.raises(ValueError, match="SIMBAL_ACCELERATOR='tpu7'; valid: tpu, gpu, cpu"):
    acc.detect(dev_root=dev, sys_root=sys_root, environ=dict(env, SIMBAL_ACCELERATOR="tpu7"))


def test_command_line_prints_the_makefile_extra(tmp_path):
  """The script as the Makefile runs it (a fresh interpreter, no third-party import): the fake
  nvidia-smi on PATH makes it a GPU machine unless this one is a TPU VM."""
  _, _, path = _machine(tmp_path, nvidia_smi=0)
  env = {k: v for k, v in os.environ.items() if k != "SIMBAL_ACCELERATOR"}
  env["PATH"] = os.pathsep.join([path, env.get("PATH", "")])
  run = lambda *a, **e: subprocess.run([sys.executable, "-I", _TOOL, *a], env=dict(env, **e),
                                       capture_output=True, text=True, timeout=60, check=False)
  expected = "tpu" if _accelerator().tpu_signs() else "gpu"
  assert run().stdout == f"{expected}\n"
  assert run("--extra").stdout == f",{expected}\n"
  assert run("--extra", SIMBAL_ACCELERATOR="cpu").stdout == "\n"
  bad = run(SIMBAL_ACCELERATOR="npu")
  assert bad.returncode == 1 and bad.stderr.strip().endswith("valid: tpu, gpu, cpu")
