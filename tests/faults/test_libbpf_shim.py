"""A libbpf fault for the kernel backend: an LD_PRELOAD shim (built here with the system C compiler) corrupts the
initial value libbpf writes into an ordinary `.data` map. The kernel-backend map property must catch it, and
the same run without the shim must pass."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Interposes libc's syscall(): BPF_MAP_UPDATE_ELEM on a map whose kernel name contains ".data" gets its first
# value byte flipped before the real call. libbpf reaches bpf(2) through syscall(), so every write of an initial
# image passes here.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <string.h>
#include <sys/syscall.h>
#include <linux/bpf.h>

typedef long (*syscall_fn)(long, ...);

long syscall(long nr, ...)
{
    static syscall_fn real;
    va_list ap;
    long a[5];
    if (!real)
        real = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
    va_start(ap, nr);
    for (int i = 0; i < 5; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (nr == __NR_bpf && a[0] == BPF_MAP_UPDATE_ELEM) {
        union bpf_attr *attr = (union bpf_attr *)a[1];
        struct bpf_map_info info;
        union bpf_attr q;
        memset(&info, 0, sizeof(info));
        memset(&q, 0, sizeof(q));
        q.info.bpf_fd = attr->map_fd;
        q.info.info_len = sizeof(info);
        q.info.info = (unsigned long)&info;
        if (real(__NR_bpf, BPF_OBJ_GET_INFO_BY_FD, &q, sizeof(q)) == 0 && strstr(info.name, ".data"))
            ((unsigned char *)(unsigned long)attr->value)[0] ^= 0xff;
    }
    return real(nr, a[0], a[1], a[2], a[3], a[4]);
}
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the shim (apt-get install gcc)")
    out = tmp_path_factory.mktemp("shim")
    (out / "shim.c").write_text(SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out / "shim.so", out / "shim.c", "-ldl"], check=True,
                   capture_output=True)
    return out / "shim.so"


def _maps_on_kernel(tmp_path: Path, preload: Path | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERCPU_FAILURES": str(tmp_path / "failures"),
           "PERCPU_REPORTS": str(tmp_path / "reports")}
    if preload:
        env["LD_PRELOAD"] = str(preload)
    return subprocess.run([sys.executable, "-m", "pytest", "suites/test_maps.py", "-q", "-k", "corpus",
                           "--backend", "kernel", "--loader", "libbpf", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel backend needs root")
def test_corrupted_data_image_is_caught_by_the_kernel_map_property(tmp_path, shim):
    clean = _maps_on_kernel(tmp_path / "clean", None)
    assert clean.returncode == 0, clean.stdout[-3000:]
    faulty = _maps_on_kernel(tmp_path / "faulty", shim)
    assert faulty.returncode == 1, faulty.stdout[-3000:]
    assert "[loader] maps[.data" in faulty.stdout and "].before[cpu0]" in faulty.stdout
