"""Boot a kernel image with virtme-ng and run the kernel backend inside it.

One boot serves one batch: `VmSession.run_batch` writes every request into a scratch directory, boots the image
once with that directory shared read-write (`--rwdir`), lets `backends.vm.agent` observe each object in the guest
and reads the answers back. A boot costs seconds (tens of them without KVM), so callers collect all the requests
of a test run first and call `run_batch` once; each call boots afresh and always leaves nothing running.

The guest sees the host's root read-only over 9p (`--force-9p`: Debian has no Rust virtiofsd), so the host's
interpreter, project tree and libbpf are used as they are; objects are copied into the scratch directory, which
is the one place both sides can write and which every guest mount layout keeps visible.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "VmConfig", "VmError", "VmSession", "VmUnavailable", "choose_accel", "default_kernel_image", "kernel_release",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]

QEMU = "qemu-system-x86_64"
BUSYBOX_NAMES = ("busybox-static", "busybox.static", "busybox")  # the names virtme-ng's initramfs builder tries
KVM_DEVICE = Path("/dev/kvm")
# Paravirtual KVM: /dev/kvm works, but ordinary kernels abort on MSR writes or hang in the decompressor.
PVM_MODULE = Path("/sys/module/kvm_pvm")
BOOT_DIR = Path("/boot")
ACCEL_ENV = "PERCPU_VM_ACCEL"  # "kvm" or "tcg" skips the probe

CONSOLE_TAIL_LINES = 40
MAX_WARNINGS = 5
_SCRIPT_STARTED = "init: starting script"  # virtme-ng-init and the older virtme-init alike
_WARNING = re.compile(r"\b(WARNING:|BUG:|Oops|general protection fault|kernel BUG)")
KVM_PROBE_TIMEOUT = 20.0
_KILL_GRACE = 5.0  # how long vng and QEMU get to stop after SIGTERM, before SIGKILL

# Modules udev would load in the guest for QEMU's emulated hardware (SATA, CD-ROM, watchdogs, input, crypto
# accelerators, nested KVM). None matters to BPF; skipping them saves seconds per boot under TCG.
SKIPPED_MODULES = (
    "kvm", "kvm_amd", "kvm_intel", "irqbypass", "ccp", "crct10dif_pclmul", "crc32_pclmul", "crc32c_intel",
    "ghash_clmulni_intel", "sha512_ssse3", "sha256_ssse3", "sha1_ssse3", "aesni_intel", "sr_mod", "cdrom", "sg",
    "iTCO_wdt", "intel_pmc_bxt", "ahci", "libahci", "libata", "evdev", "psmouse", "i2c_i801", "serio_raw",
    "pcspkr", "lpc_ich", "button", "powernow_k8",
)

# Directories the guest replaces with its own tmpfs: host files there are invisible inside.
_GUEST_HIDDEN = ("/run", "/dev/shm", "/var/tmp", "/var/log", "/var/cache", "/var/lib/apt", "/var/lib/private")

_GENERIC_IMAGE = re.compile(r"^vmlinuz-(\d+(?:\.\d+)*)-(\d+)-amd64$")

# A multiboot image that switches to 64-bit long mode and writes 0x21 to QEMU's isa-debug-exit port, which ends
# QEMU with status (0x21 << 1) | 1. Under an accelerator that cannot run guest code it never gets there.
_PROBE_ENTRY = 0x100000
_PROBE_STATUS = 0x43
_PROBE_CODE = bytes.fromhex(
    "bf00002000" "31c0" "b9000c0000" "f3ab"               # zero the three page-table pages at 2 MiB
    "c7050000200003102000"                                 # PML4[0] -> PDPT
    "c7050010200003202000"                                 # PDPT[0] -> PD
    "c7050020200083000000"                                 # PD[0]: 2 MiB identity page
    "b800002000" "0f22d8"                                  # cr3
    "0f20e0" "83c820" "0f22e0"                             # cr4.PAE
    "b9800000c0" "0f32" "0d00010000" "0f30"               # EFER.LME
    "0f20c0" "0d00000080" "0f22c0"                         # cr0.PG
    "0f0115a0001000"                                       # lgdt
    "ea840010000800"                                       # ljmp 0x08:64-bit code
    "b021" "e6f4" "f4" "ebfd"                              # out 0xf4, 0x21; hlt loop
    "8d74260090" "0000000000000000" "ffff0000009aaf00"     # pad; GDT: null, 64-bit code
    "0f0090001000"                                         # GDTR
)


class VmUnavailable(RuntimeError):
    """The VM backend cannot run here; the message is a one-line reason with the fix where there is one."""


class VmError(RuntimeError):
    """The guest failed: no boot, a panic, a timeout, no answer. Carries the end of the guest console."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.console_tail = console_tail


# -- choosing an accelerator -----------------------------------------------------------------------------------


def _probe_payload(directory: Path) -> Path:
    magic, flags = 0x1BADB002, 0x00010000  # multiboot v1, load address given in the header
    header = struct.pack("<8I", magic, flags, -(magic + flags) & 0xFFFFFFFF, _PROBE_ENTRY, _PROBE_ENTRY, 0, 0,
                         _PROBE_ENTRY + 32)
    path = directory / "accel-probe.bin"
    path.write_bytes(header + _PROBE_CODE)
    return path


def _qemu_probe_command(accel: str, payload: Path) -> list[str]:
    cpu = "host" if accel == "kvm" else "max"  # vng runs KVM guests with -cpu host: probe the same model
    return [QEMU, "-accel", accel, "-machine", "q35", "-cpu", cpu, "-m", "64M", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", "none", "-monitor", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(payload)]


def probe_guest_code(accel: str, timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Does QEMU run 64-bit guest code under `accel`? (ok, one-line reason when not)."""
    if shutil.which(QEMU) is None:
        return False, f"{QEMU} not installed"
    with tempfile.TemporaryDirectory(prefix="percpu-accel-") as tmp:
        try:
            proc = subprocess.run(_qemu_probe_command(accel, _probe_payload(Path(tmp))), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"a test guest did not finish within {timeout:g}s under {accel}"
        except OSError as e:
            return False, f"{QEMU} does not run: {e}"
    if proc.returncode == _PROBE_STATUS:
        return True, ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "warning" not in ln]
    return False, f"a test guest failed under {accel} (exit {proc.returncode}: {lines[-1] if lines else 'no output'})"


def choose_accel() -> tuple[str, str]:
    """("kvm" | "tcg", a notice saying why). KVM only when /dev/kvm opens, it is not paravirtual KVM, and QEMU
    really runs a test guest with it; anything else falls back to TCG, which is slow but boots every kernel."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced, f"accelerator {forced}: forced by {ACCEL_ENV}"
    if forced:
        raise VmUnavailable(f"{ACCEL_ENV}={forced!r}: want kvm or tcg")
    tcg = "accelerator tcg (software emulation, boots take tens of seconds)"
    if PVM_MODULE.exists():
        return "tcg", (f"{tcg}: {KVM_DEVICE} is paravirtual KVM ({PVM_MODULE.name} loaded), "
                       "which cannot boot ordinary kernels")
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return "tcg", f"{tcg}: {KVM_DEVICE} does not open ({e.strerror or e})"
    os.close(fd)
    ok, reason = probe_guest_code("kvm")
    if not ok:
        return "tcg", f"{tcg}: {reason}"
    return "kvm", f"accelerator kvm: {KVM_DEVICE} opens and a test guest ran under it"


# -- the kernel image ------------------------------------------------------------------------------------------


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text))


def _generic_images(boot: Path) -> list[Path]:
    try:
        names = os.listdir(boot)
    except OSError:
        return []
    found = [(m.group(1), int(m.group(2)), n) for n in names if (m := _GENERIC_IMAGE.match(n))]
    found.sort(key=lambda t: (_version_key(t[0]), t[1]))
    return [boot / n for _, _, n in found]


def default_kernel_image(install: bool = True) -> Path:
    """The newest /boot/vmlinuz-*-amd64 of Debian's generic flavour (the cloud flavour has no 9p, so it cannot
    mount the host root). Installs linux-image-amd64 when none is there and this process is root."""
    images = _generic_images(BOOT_DIR)
    if images:
        return images[-1]
    command = "apt-get install -y linux-image-amd64"
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise VmUnavailable(f"no Debian generic kernel in {BOOT_DIR}; as root run: {command}")
    print(f"vm: no kernel image in {BOOT_DIR}, running: {command}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "install", "-y", "-q", "linux-image-amd64"],
             ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "linux-image-amd64"])
    for argv in steps:  # a stale package list is the usual failure, so update and retry once
        try:
            done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise VmUnavailable(f"{' '.join(argv)} failed: {e}") from None
        if done.returncode == 0 and (images := _generic_images(BOOT_DIR)):
            return images[-1]
    raise VmUnavailable(f"could not install a kernel image; run: apt-get update && {command}")


def kernel_release(image: Path) -> str | None:
    """The release an x86 bzImage announces in its setup header; None for anything else."""
    try:
        with open(image, "rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    offset = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    if not offset or offset >= len(head):
        return None
    text = head[offset:offset + 256].split(b"\0", 1)[0].decode("ascii", "replace").split()
    return text[0] if text else None


def _kernel_config(image: Path, release: str | None) -> Path | None:
    candidates = []
    if release:
        candidates += [image.parent / f"config-{release}", BOOT_DIR / f"config-{release}"]
    resolved = image.resolve()
    if resolved.parent.name == "boot" and resolved.parent.parent.name == "x86":  # arch/x86/boot/bzImage
        candidates.append(resolved.parents[3] / ".config")
    return next((c for c in candidates if c.is_file()), None)


def _config_values(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("CONFIG_"):
            values[name] = value
    return values


def check_kernel(image: Path) -> str | None:
    """Refuse images that cannot serve before booting them, from their config when one is found next to them.
    Returns the release (None when the image does not say)."""
    if not image.is_file():
        raise VmUnavailable(f"no kernel image at {image}")
    if not os.access(image, os.R_OK):
        raise VmUnavailable(f"kernel image {image} is not readable by this user")
    release = kernel_release(image)
    config = _kernel_config(image, release)
    if config is None:
        return release
    values = _config_values(config)
    name = release or image.name
    if values.get("CONFIG_BPF_SYSCALL") != "y":
        raise VmUnavailable(f"kernel {name} has no BPF syscall (CONFIG_BPF_SYSCALL not set in {config})")
    for option in ("CONFIG_NET_9P", "CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS"):
        if values.get(option) not in ("y", "m"):
            raise VmUnavailable(f"kernel {name} cannot mount the host root over 9p ({option} not set in {config}); "
                                "Debian's cloud kernel lacks 9p, its generic one (linux-image-amd64) has it")
    return release


# -- the session -----------------------------------------------------------------------------------------------


@dataclass
class VmConfig:
    kernel_image: Path
    modules: Path | None = None  # INSTALL_MOD_PATH of the image's modules (holds lib/modules/<release>)
    cpus: int = 2
    memory: str = "1G"
    timeout: float = 300.0  # boot + shutdown, and with timeout_per_request the limit for one batch
    timeout_per_request: float = 2.0  # under TCG one observation takes 0.1-0.5 s: generous, yet a hang still ends
    accel: str | None = None  # "kvm" | "tcg"; None: choose_accel()
    workers: int | None = None  # guest processes observing side by side; None: one per guest CPU
    vng: Path | None = None  # default: vng on PATH or beside this interpreter


def _find_vng(explicit: Path | None) -> Path:
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise VmUnavailable(f"vng not found at {explicit}")
        return explicit
    beside = Path(sys.executable).parent / "vng"  # a venv's scripts are not always on PATH
    found = shutil.which("vng") or (str(beside) if os.access(beside, os.X_OK) else None)
    if found is None:
        raise VmUnavailable("virtme-ng not installed (pip install virtme-ng)")
    path = Path(found)
    if not os.access(path.parent / "virtme-run", os.X_OK) and shutil.which("virtme-run") is None:
        raise VmUnavailable(f"virtme-ng incomplete: no virtme-run beside {path}")
    return path


def _check_visible(what: str, path: Path) -> None:
    text = str(path)
    for hidden in _GUEST_HIDDEN:
        if text == hidden or text.startswith(hidden + "/"):
            raise VmUnavailable(f"{what} {path} is under {hidden}, which the guest replaces with an empty tmpfs")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _kernel_warnings(console: str) -> list[str]:
    """Kernel complaints printed once the agent started: a WARN or BUG under a test is a finding in itself,
    even when every observation came back."""
    _, started, after = console.partition(_SCRIPT_STARTED)
    return [ln.strip() for ln in after.splitlines() if _WARNING.search(ln)] if started else []


def _tail(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _request_objects(req: Mapping[str, Any]) -> list[Any]:
    """The object files of a request: one, or an object set's several (docs/object-sets.md)."""
    return list(req["objects"]) if "objects" in req else [req.get("object")]


def _check_request(i: int, req: Mapping[str, Any]) -> None:
    for obj in _request_objects(req):
        if not isinstance(obj, str | os.PathLike) or not os.path.isabs(obj):
            raise ValueError(f"request {i}: object must be an absolute path, not {obj!r}")
        if not os.path.isfile(obj):
            raise ValueError(f"request {i}: no object at {obj}")
    if req.get("loader", "libbpf") not in ("libbpf", "raw"):
        raise ValueError(f"request {i}: loader {req.get('loader')!r} (want libbpf or raw)")
    for run in req.get("runs", ()):
        if (len(run) != 3 or not isinstance(run[0], str)
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in run[1:])):
            raise ValueError(f"request {i}: run {run!r} is not [program, cpu, count]")
    lib = req.get("libbpf")
    if lib is not None and (not os.path.isabs(lib) or not os.path.isfile(lib)):
        raise ValueError(f"request {i}: libbpf must be the absolute path of a file, not {lib!r}")
    values = req.get("initial_values") or {}
    for per_object in (values if "objects" in req else [values]):
        for name, value in per_object.items():
            try:
                bytes.fromhex(value)
            except (TypeError, ValueError):
                raise ValueError(f"request {i}: initial value of {name!r} is not hex") from None


class VmSession:
    """Runs batches of kernel-backend requests in a guest booted from `config.kernel_image`."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        if config.cpus < 1:
            raise ValueError(f"cpus must be >= 1, not {config.cpus}")
        if config.workers is not None and config.workers < 1:
            raise ValueError(f"workers must be >= 1, not {config.workers}")
        self.release = check_kernel(Path(config.kernel_image))
        if shutil.which(QEMU) is None:
            raise VmUnavailable(f"{QEMU} not installed (apt-get install qemu-system-x86)")
        if not any(shutil.which(n) for n in BUSYBOX_NAMES):
            raise VmUnavailable("busybox not installed (apt-get install busybox-static)")
        self.vng = _find_vng(config.vng)
        self.python = Path(sys.executable).absolute()
        _check_visible("the interpreter", self.python)
        _check_visible("the project", PROJECT_ROOT)
        if config.modules is not None and not Path(config.modules).is_dir():
            raise VmUnavailable(f"no module directory at {config.modules}")
        if config.accel is not None:
            if config.accel not in ("kvm", "tcg"):
                raise ValueError(f"accel {config.accel!r} (want kvm or tcg)")
            self.accel, self.accel_notice = config.accel, f"accelerator {config.accel}: chosen by the caller"
        else:
            self.accel, self.accel_notice = choose_accel()
        self.guest: dict[str, Any] | None = None  # the guest's probe from the last batch
        self.last_console = ""
        self.kernel_warnings: list[str] = []  # WARN/BUG/Oops lines the kernel printed while the agent ran
        self.vm_seconds: float | None = None

    # the guest side of one batch

    def _stage_kernel(self, scratch: Path) -> Path:
        """The image to hand to vng. With `modules`, a tree vng reads as an installed system: it looks for
        lib/modules/<release> above the image, so a symlinked boot/ and lib/ pair points it at those modules."""
        image = Path(self.config.kernel_image).absolute()
        if self.config.modules is None:
            return image
        modules = Path(self.config.modules).absolute()
        stage = scratch / "kernel"
        (stage / "boot").mkdir(parents=True)
        staged = stage / "boot" / image.name
        staged.symlink_to(image)
        if (modules / "lib" / "modules").is_dir():
            (stage / "lib").symlink_to(modules / "lib")
        else:  # the lib/modules/<release> directory itself
            release = self.release or modules.name
            (stage / "lib" / "modules").mkdir(parents=True)
            (stage / "lib" / "modules" / release).symlink_to(modules)
        return staged

    def command(self, scratch: Path, image: Path) -> list[str]:
        guest = shlex.join(["env", f"PYTHONPATH={PROJECT_ROOT}", "PYTHONDONTWRITEBYTECODE=1", str(self.python),
                            "-m", "backends.vm.agent", str(scratch)])
        argv = [str(self.vng), "--run", str(image), "--force-9p", "--cpus", str(self.config.cpus),
                "--memory", self.config.memory, "--rwdir", str(scratch), "--cwd", str(PROJECT_ROOT),
                # --verbose puts the kernel log on the console: without it a panic leaves no trace
                "--verbose", "--append", "modprobe.blacklist=" + ",".join(SKIPPED_MODULES),
                "--exec", guest]
        if self.accel == "tcg":
            argv.insert(3, "--disable-kvm")
        return argv

    def _boot(self, argv: list[str], console: Path, timeout: float) -> int:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.vng.parent), env.get("PATH", os.defpath)])  # vng runs virtme-run
        start = time.monotonic()
        # A pipe, not the file: QEMU reopens its stdout for the guest's output channels, and a reopened file
        # would be written from offset 0 over the kernel log, while a reopened pipe keeps one ordered stream.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd=PROJECT_ROOT, start_new_session=True)
        assert proc.stdout is not None
        copier = threading.Thread(target=_copy, args=(proc.stdout, console), daemon=True)
        copier.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            self.vm_seconds = time.monotonic() - start
            copier.join(_KILL_GRACE)
            text = _read(console)
            self.last_console = text
            hint = ""
            if "Linux version" not in text:
                hint = "; the kernel never started" + (f" (set {ACCEL_ENV}=tcg if KVM cannot run it)"
                                                       if self.accel == "kvm" else "")
            raise VmError(f"guest timed out after {timeout:g}s (killed){hint}", _tail(text)) from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            _reap_group(proc)
            copier.join(_KILL_GRACE)
            proc.stdout.close()
        self.vm_seconds = time.monotonic() - start
        return rc

    def run_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Boot once, observe every request in the guest, stop the guest. Each request is {"object": absolute
        path of a .o, "loader": "libbpf"|"raw", "runs": [[prog, cpu, count], ...], "initial_values": {map: hex},
        optionally "libbpf": path of a libbpf.so}. Returns, in order, the Observation for each (source "vm",
        env extended with vm_seconds, vm_accel and vm_kernel_image) or, where the guest could not observe it,
        {"source": "vm", "object": ..., "env": ..., "error": {"type": ..., "message": ...}}."""
        for i, req in enumerate(requests):
            _check_request(i, req)
        scratch = Path(tempfile.mkdtemp(prefix="percpu-vm-"))
        try:
            return self._run(scratch, requests)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, scratch: Path, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        objects = scratch / "objects"
        guest_requests = []
        for i, req in enumerate(requests):
            copies = []
            for k, obj in enumerate(_request_objects(req)):
                src = Path(obj)
                dst = objects / str(i) / str(k) / src.name  # keep the name: libbpf derives map names from it
                dst.parent.mkdir(parents=True)
                shutil.copyfile(src, dst)
                copies.append(str(dst))
            guest = {"loader": req.get("loader", "libbpf"), "runs": [list(r) for r in req.get("runs", ())],
                     "libbpf": req.get("libbpf")}
            if "objects" in req:
                guest.update(objects=copies, reuse=[list(r) for r in req.get("reuse", ())],
                             attach=[list(a) for a in req.get("attach", ())],
                             initial_values=[dict(v) for v in req.get("initial_values") or ()])
            else:
                guest.update(object=copies[0], initial_values=dict(req.get("initial_values") or {}))
            guest_requests.append(guest)
        (scratch / "requests.json").write_text(json.dumps({"requests": guest_requests,
                                                            "workers": self.config.workers}))
        console = scratch / "console.log"
        timeout = self.config.timeout + self.config.timeout_per_request * len(requests)
        rc = self._boot(self.command(scratch, self._stage_kernel(scratch)), console, timeout)
        text = _read(console)
        self.last_console = text
        self.kernel_warnings = _kernel_warnings(text)
        if "Kernel panic" in text:
            line = next(ln for ln in text.splitlines() if "Kernel panic" in ln)
            reason = line[line.index("Kernel panic") + len("Kernel panic"):].lstrip(" -")
            raise VmError(f"guest kernel panicked: {_one_line(reason)}", _tail(text))
        try:
            answer = json.loads((scratch / "results.json").read_text())
        except (OSError, ValueError):
            raise VmError(f"guest wrote no results (vng exit {rc}, {self.vm_seconds:.1f}s)", _tail(text)) from None
        if answer.get("fatal"):
            raise VmError(f"guest agent failed: {_one_line(answer['fatal'])}", _tail(text))
        guest = answer.get("guest") or {}
        self.guest = guest
        probe = guest.get("probe") or {}
        if probe and not probe.get("bpf_usable", True):
            raise VmUnavailable(f"kernel {guest.get('kernel_release')} cannot load BPF programs: "
                                f"{probe.get('bpf_unusable_reason') or 'bpf() unusable'}")
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(requests):
            raise VmError(f"guest answered {len(results) if isinstance(results, list) else 'no'} results for "
                          f"{len(requests)} requests", _tail(text))
        vm_facts = {"vm_seconds": round(self.vm_seconds or 0.0, 3), "vm_accel": self.accel,
                    "vm_kernel_image": str(self.config.kernel_image),
                    "vm_kernel_warnings": self.kernel_warnings[:MAX_WARNINGS]}
        out = []
        for req, res in zip(requests, results, strict=True):
            host_paths = [os.fspath(p) for p in _request_objects(req)]
            host_path = host_paths[0]
            if "observation" in res:
                doc = res["observation"]
                doc["source"] = "vm"
                doc["env"].update(vm_facts)
                for part, path in zip(doc.get("objects", [doc]), host_paths, strict=True):
                    part["source"] = "vm"
                    if part.get("object"):
                        part["object"]["path"] = path
            else:
                doc = {"source": "vm", "object": {"path": host_path},
                       "env": {"kernel_release": guest.get("kernel_release"), **vm_facts},
                       "error": res.get("error") or {"type": "unknown", "message": "no observation"}}
            out.append(doc)
        return out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop vng and QEMU with it: vng runs in its own session, so its process group holds everything it began."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, _KILL_GRACE)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _copy(stream: io.BufferedReader, path: Path) -> None:
    with open(path, "wb") as out:
        while chunk := stream.read1(65536):
            out.write(chunk)
            out.flush()


def _reap_group(proc: subprocess.Popen[bytes]) -> None:
    """After vng itself ended, end anything of its group still alive (a QEMU it left behind)."""
    if proc.poll() is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
