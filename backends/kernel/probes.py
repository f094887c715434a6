"""Facts about the running kernel and machine, found out by asking it, never assumed from a version number.

Every probe that loads something closes what it created. A probe that cannot run (no usable bpf()) is
reported as None by `probe_all`, never guessed.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Callable
from typing import Any, TypeVar

from backends.kernel import bpf
from schema.cpulist import format_cpulist, parse_cpulist  # noqa: F401  (re-exported)
from toolchain import insn as I
from toolchain.btf import INT_SIGNED, LINKAGE_GLOBAL, Btf, BtfType, Param
from toolchain.btf import encode as btf_encode

_CPU_SYSFS = "/sys/devices/system/cpu"
_JIT_SYSCTL = "/proc/sys/net/core/bpf_jit_enable"

_T = TypeVar("_T")

BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_get_smp_processor_id = 8




def _read_cpulist(name: str) -> list[int]:
    with open(os.path.join(_CPU_SYSFS, name)) as f:
        return parse_cpulist(f.read())


def possible_cpus() -> list[int]:
    """CPU ids the kernel may ever bring up: per-CPU map values have one slot for each of these. Fixed at boot,
    so read once."""
    return list(_possible())


@functools.cache
def _possible() -> tuple[int, ...]:
    return tuple(_read_cpulist("possible"))


def online_cpus() -> list[int]:
    return _read_cpulist("online")


def kernel_release() -> str:
    return os.uname().release


def jit_enabled() -> bool | None:
    """The bpf_jit_enable sysctl (0 off, 1 on, 2 on with debug output); None when it cannot be read."""
    try:
        with open(_JIT_SYSCTL) as f:
            value = f.read().strip()
    except OSError:
        return None
    try:
        return int(value) != 0
    except ValueError:
        return None


def _kernel_config_lines() -> list[str] | None:
    """The running kernel's build configuration (/proc/config.gz or /boot/config-<release>), None if neither."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return f.read().splitlines()
    except OSError:
        pass
    try:
        with open(f"/boot/config-{kernel_release()}") as f:
            return f.read().splitlines()
    except OSError:
        return None


def jit_always_on() -> bool | None:
    """CONFIG_BPF_JIT_ALWAYS_ON: the sysctl cannot turn the JIT off (it reads 1); None when no config is found.
    Debian's 7.3 leaves it unset, so bpf_jit_enable=0 really runs the interpreter."""
    lines = _kernel_config_lines()
    if lines is None:
        return None
    return "CONFIG_BPF_JIT_ALWAYS_ON=y" in lines


def _trivial_prog() -> bytes:
    return I.encode([I.mov64_imm(0, 0), I.exit_insn()])


def bpf_usable() -> tuple[bool, str]:
    """Whether this process can create maps and load programs; on False, a one-line reason."""
    machine = os.uname().machine
    if machine != "x86_64":
        return False, f"bpf() syscall number is only known for x86_64, not {machine}"
    euid = os.geteuid()
    if euid != 0:
        return False, f"not root (euid {euid})"
    try:
        with bpf.map_create(bpf.ARRAY, 4, 4, 1):
            pass
        fd, _ = bpf.prog_load(bpf.SOCKET_FILTER, _trivial_prog(), log_level=0)
        fd.close()
    except bpf.BpfError as e:
        if e.errno == errno.ENOSYS:
            return False, "bpf() not implemented (ENOSYS)"
        if e.errno == errno.EPERM:
            return False, f"bpf() refused: EPERM on {e.op} (missing CAP_BPF/CAP_SYS_ADMIN, or seccomp/LSM)"
        return False, f"bpf() failed: {e}"
    return True, ""


JIT_REQUIRED_MESSAGE = "program requires BPF JIT compiler but it is not available"


def _percpu_data_load() -> str:
    """Load libbpf's FEAT_PERCPU_DATA probe (ld_imm64 BPF_PSEUDO_MAP_VALUE into a 1-entry PERCPU_ARRAY):
    "loaded"; "no_direct_value" (EINVAL: a kernel without global per-CPU data); "jit_required" (EINVAL after
    verification: the feature is there but the JIT is off, and the per-CPU rewrite needs it). Other failures are
    not a verdict and propagate."""
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, 8, 1, name="libbpf_percpu") as m:
        prog = I.encode([*I.ld_map_value(1, m.fileno(), 0), I.ldx_mem(I.BPF_DW, 0, 1, 0), I.exit_insn()])
        try:
            fd, _ = bpf.prog_load(bpf.SOCKET_FILTER, prog)
        except bpf.BpfError as e:
            if e.errno == errno.EINVAL:
                return "jit_required" if JIT_REQUIRED_MESSAGE in e.log else "no_direct_value"
            raise
        fd.close()
        return "loaded"


def probe_percpu_data() -> bool:
    """libbpf's FEAT_PERCPU_DATA check: does a program taking a direct pointer into a PERCPU_ARRAY value load?
    False on a kernel without the feature and on a merged kernel with the JIT off alike."""
    return _percpu_data_load() == "loaded"


def probe_percpu_direct_value() -> bool:
    """The feature's kernel half: PERCPU_ARRAY has map_direct_value_addr, whether or not the JIT is on."""
    return _percpu_data_load() != "no_direct_value"


def probe_bpf_f_cpu() -> bool:
    """Does a PERCPU_ARRAY lookup accept BPF_F_CPU (CPU 0 in the flags' upper half, one value-sized slot)?
    Kernels that do not know the flag reject it with EINVAL."""
    with bpf.map_create(bpf.PERCPU_ARRAY, 4, 8, 1) as m:
        try:
            bpf.map_lookup_elem(m, struct.pack("<I", 0), 8, bpf.BPF_F_CPU | (0 << 32))
        except bpf.BpfError as e:
            if e.errno == errno.EINVAL:
                return False
            raise
        return True


def probe_percpu_insn_jit() -> bool | None:
    """Does the JIT support the verifier's internal per-CPU instructions?

    When it does, the verifier inlines bpf_get_smp_processor_id() instead of calling the helper. On x86_64
    the xlated dump of `call 8; exit` then reads (observed on 6.18):
        r0 = <per-CPU offset of cpu_number>   (MOV64 imm)
        r0 = per-CPU address of r0            (MOV64 reg with off == BPF_ADDR_PERCPU)
        r0 = *(u32 *)(r0 + 0)
        exit
    i.e. no helper call remains and the program grew from 2 to 4 instructions. Without JIT support (or with
    the interpreter) the helper call stays. True: inlined; False: the call remains in a JITed program;
    None: cannot tell (JIT off, the program was not JITed, or a dump that matches neither shape).
    """
    if jit_enabled() is False:
        return None
    fd, _ = bpf.prog_load(bpf.SOCKET_FILTER, I.encode([I.call_helper(BPF_FUNC_get_smp_processor_id),
                                                       I.exit_insn()]), log_level=0)
    with fd:
        if not bpf.prog_info(fd).jited:
            return None
        xlated = I.decode(bpf.prog_xlated(fd))
    if any(i.is_helper_call for i in xlated):
        return False
    if any(i.is_percpu_mov for i in xlated):
        return True
    return None


# BTF for the freplace probe: int f(void); int probe_main(void *ctx) calls it; int probe_ext(void) replaces it.
_FREPLACE_BTF = Btf([
    BtfType("void"),
    BtfType("int", "int", size=4, encoding=INT_SIGNED, bits=32),  # [1]
    BtfType("func_proto", type_id=1),  # [2] int (void)
    BtfType("func", "f", type_id=2, linkage=LINKAGE_GLOBAL),  # [3]
    BtfType("ptr", type_id=0),  # [4] void *
    BtfType("func_proto", type_id=1, params=(Param("ctx", 4),)),  # [5] int (void *)
    BtfType("func", "probe_main", type_id=5, linkage=LINKAGE_GLOBAL),  # [6]
    BtfType("func", "probe_ext", type_id=2, linkage=LINKAGE_GLOBAL),  # [7]
])
_FREPLACE_TARGET_FUNC = 3


def probe_freplace() -> tuple[bool, str]:
    """Can an extension program replace a global subprogram of a program this process loaded? Loads a raw_tp
    program returning its subprogram's 1, an extension returning 0 (it inherits the raw_tp return range, which
    is 0 only), links it (BPF_LINK_CREATE to that program only, never a live hook) and runs the target. On False,
    a one-line reason: some kernels refuse every BPF_PROG_TYPE_EXT load with EPERM before verification (observed
    on 6.18.44-fc, with fentry, fexit, fmod_ret and LSM programs alike)."""
    target = I.encode([I.call_rel(1), I.exit_insn(), I.mov64_imm(0, 1), I.exit_insn()])
    ext = I.encode([I.mov64_imm(0, 0), I.exit_insn()])
    step = "BPF_BTF_LOAD"
    try:
        with bpf.btf_load(btf_encode(_FREPLACE_BTF)) as btf:
            step = "BPF_PROG_LOAD of the target"
            tfd, _ = bpf.prog_load(bpf.RAW_TRACEPOINT, target, name="probe_main", prog_btf_fd=btf,
                                   func_info=[(0, 6), (2, _FREPLACE_TARGET_FUNC)])
            with tfd:
                step = "BPF_PROG_LOAD of an extension program"
                efd, _ = bpf.prog_load(bpf.EXT, ext, name="probe_ext", prog_btf_fd=btf, func_info=[(0, 7)],
                                       attach_prog_fd=tfd, attach_btf_id=_FREPLACE_TARGET_FUNC)
                with efd:
                    step = "BPF_LINK_CREATE"
                    with bpf.link_create(efd, tfd, bpf.BPF_TRACE_FREPLACE, _FREPLACE_TARGET_FUNC):
                        step = "BPF_PROG_TEST_RUN"
                        retval = bpf.prog_test_run(tfd).retval
    except bpf.BpfError as e:
        return False, f"{step}: {e.strerror} ({e.errno_name}){': ' + e.reason if e.reason else ''}"
    if retval != 0:
        return False, f"the linked target returned {retval}, not the extension's 0"
    return True, ""


def _try(probe: Callable[[], _T | None]) -> _T | None:
    try:
        return probe()
    except OSError:
        return None


def probe_all() -> dict[str, Any]:
    """Everything above in one JSON-friendly dict; features that could not be probed are None."""
    usable, reason = bpf_usable()
    features: dict[str, bool | None] = {"percpu_data": None, "percpu_direct_value": None, "bpf_f_cpu": None,
                                        "percpu_insn_jit": None, "freplace": None, "jit": jit_enabled()}
    if usable:
        verdict = _try(_percpu_data_load)
        features = {
            "percpu_data": None if verdict is None else verdict == "loaded",
            "percpu_direct_value": None if verdict is None else verdict != "no_direct_value",
            "bpf_f_cpu": _try(probe_bpf_f_cpu),
            "percpu_insn_jit": _try(probe_percpu_insn_jit),
            "freplace": _try(lambda: probe_freplace()[0]),
            "jit": jit_enabled(),
        }
    return {
        "kernel_release": kernel_release(),
        "possible_cpus": len(possible_cpus()),
        "online_cpus": online_cpus(),
        "jit_enabled": jit_enabled(),
        "jit_always_on": jit_always_on(),
        "bpf_usable": usable,
        "bpf_unusable_reason": reason,
        "features": features,
    }
