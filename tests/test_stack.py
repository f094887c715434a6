"""The stack provisioner: pins, the private apt configuration, exit codes, atomic and idempotent provisioning
(offline, with stand-in packages whose builds are tiny), and the real provisioned stack (slow, only when present)."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from backends.stack import provision as stack
from backends.stack.provision import StackUnavailable
from backends.vm.runner import kernel_release

ROOT = Path(__file__).resolve().parent.parent
FAKE_RELEASE = "7.9.9-fake"
FAKE_VERSION = "7.9.9-1~test1"
SYSTEM_APT = ("/etc/apt", "/var/lib/apt", "/var/cache/apt", "/var/lib/dpkg")


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(stack.CACHE_ENV, str(cache))
    return cache


def _pins_file(tmp_path: Path, *, name: str = "fake", archive: str | None = None, version: str = FAKE_VERSION,
               release: str = FAKE_RELEASE, source: str = "linux-source-7.9") -> Path:
    archive_line = f'archive = "{archive}"\n' if archive else ""
    text = textwrap.dedent(f"""\
        [stack."{name}"]
        suite = "trixie-backports"
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        release = "{release}"
        libbpf_version = "1.8.0"
        bpftool_version = "7.8.0"
        source_tarball = "usr/src/{source}.tar.xz"
        """) + archive_line + textwrap.dedent(f"""\
        [stack."{name}".packages]
        image = {{ name = "linux-binary-{release}", version = "{version}" }}
        base = {{ name = "linux-base-{release}", version = "{version}" }}
        modules = {{ name = "linux-modules-{release}", version = "{version}" }}
        source = {{ name = "{source}", version = "{version}" }}
        """)
    path = tmp_path / "stacks.toml"
    path.write_text(text)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backends.stack", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _one_line_failure(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    *progress, failure = done.stderr.strip().splitlines()
    assert failure.startswith("backends.stack: "), failure
    assert all(re.match(r"stack \S+: [a-z-]+: .*\(\d+\.\d s\)$", line) for line in progress), progress
    assert done.stdout == ""
    return failure


# -- pins ----------------------------------------------------------------------------------------------------


def test_default_pins_parse() -> None:
    pins = stack.load_pins()
    assert pins.name == stack.DEFAULT_STACK == "7.3.4"
    assert pins.suite == "trixie-backports"
    assert pins.release == "7.3.4+deb13-amd64"
    assert (pins.libbpf_version, pins.bpftool_version) == ("1.8.0", "7.8.0")
    assert [p.role for p in pins.packages] == list(stack.PACKAGE_ROLES)
    assert pins.package("image").name == "linux-binary-7.3.4+deb13-amd64"
    assert pins.package("source").name == "linux-source-7.3"
    assert all(p.version == "7.3.4-1~bpo13+1" for p in pins.packages)


def test_unknown_stack_is_usage() -> None:
    line = _one_line_failure(_cli("paths", "--stack", "6.0-nope", "--no-provision"), stack.EXIT_USAGE)
    assert "unknown stack '6.0-nope'" in line and "7.3.4" in line


def test_system_archive_is_read_from_apt_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# none\n")
    (tmp_path / "sources.list.d" / "a.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\nComponents: main\n")
    assert stack.system_debian_archive(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d" / "a.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert stack.system_debian_archive(tmp_path) == "http://other.example/debian"


# -- the private apt -----------------------------------------------------------------------------------------


def test_apt_options_stay_under_the_cache(tmp_path: Path) -> None:
    options = stack.apt_options(tmp_path / "apt")
    values = dict(o.split("=", 1) for o in options[1::2])
    assert options[0::2] == ["-o"] * len(values)
    for key in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State::Lists", "Dir::State::status",
                "Dir::Cache", "Dir::Etc::Preferences", "Dir::Etc::PreferencesParts"):
        assert key in values
    for key, value in values.items():
        if key.startswith("Dir::"):
            assert value == "/dev/null" or value.startswith(str(tmp_path / "apt")), (key, value)
    assert values["Dir::Etc::SourceParts"] == "/dev/null"


def test_download_commands_never_name_system_apt_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_apt(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 100, "", "E: Version '0' for 'x' was not found\n")

    monkeypatch.setattr(stack, "_run_apt", fake_apt)
    pins = stack.load_pins("fake", _pins_file(tmp_path, archive="http://127.0.0.1:9/debian"))
    with pytest.raises(StackUnavailable):
        stack.download(pins, tmp_path / "stack", lambda line: None)
    assert seen and seen[0][:2] == ["apt-get", "-q"]
    for argv in seen:
        joined = " ".join(argv)
        assert not any(p in joined for p in SYSTEM_APT), joined
        assert "install" not in argv
    sources = (tmp_path / "stack" / "apt" / "sources.list").read_text()
    assert sources == ("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://127.0.0.1:9/debian "
                       "trixie-backports main\n")
    assert (tmp_path / "stack" / "apt" / "status").read_text() == ""


def test_no_network_exits_6(tmp_path: Path) -> None:
    line = _one_line_failure(_cli("paths", "--stack", "fake", "--pins",
                                  str(_pins_file(tmp_path, archive="http://127.0.0.1:9/debian"))), stack.EXIT_DOWNLOAD)
    assert line.startswith("backends.stack: stack download: cannot read http://127.0.0.1:9/debian trixie-backports")
    assert "check the network" in line


def test_missing_version_exits_7(tmp_path: Path) -> None:
    if _real_stack() is None:  # it needs the real archive; a provisioned stack shows it was reachable
        pytest.skip("the real stack is not provisioned here (make stack), so the archive may be unreachable")
    pins = stack.load_pins()
    pins_file = _pins_file(tmp_path, name="bogus", release="7.3.4+deb13-amd64", version="7.3.4-0~nope1",
                           source="linux-source-7.3")
    line = _one_line_failure(_cli("paths", "--stack", "bogus", "--pins", str(pins_file)), stack.EXIT_PACKAGE)
    assert "Version '7.3.4-0~nope1' for 'linux-" in line and "was not found" in line, line
    assert pins.package("image").version != "7.3.4-0~nope1"


# -- offline provisioning with stand-in packages -------------------------------------------------------------

LIBBPF_MAKEFILE = """\
all:
\tprintf 'int libbpf_major_version(void) { return 1; }\\nint libbpf_minor_version(void) { return 8; }\\n' \
> $(OUTPUT)v.c
\tgcc -shared -fPIC -o $(OUTPUT)libbpf.so.1.8.0 $(OUTPUT)v.c
install_headers:
\tmkdir -p $(DESTDIR)$(prefix)/include/bpf && touch $(DESTDIR)$(prefix)/include/bpf/bpf_helpers.h
"""
BPFTOOL_MAKEFILE = """\
all:
\tprintf '#!/bin/sh\\necho "bpftool v7.8.0"\\necho "using libbpf v1.8"\\necho "features:"\\n' > $(OUTPUT)bpftool
\tchmod +x $(OUTPUT)bpftool
"""
FAILING_MAKEFILE = "all:\n\t@echo 'libbpf.c:1: error: stand-in failure' >&2; false\n"


def _bzimage(release: str) -> bytes:
    """The part of an x86 boot image kernel_release reads: the HdrS magic and a pointer to the version string."""
    image = bytearray(0x1000)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, 0x300)
    image[0x500:0x500 + len(release) + 20] = f"{release} (fake@host) #1\0".encode().ljust(len(release) + 20, b"\0")
    return bytes(image)


def _deb(out: Path, name: str, files: dict[str, bytes], arch: str = "amd64") -> None:
    root = out / f".build-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {FAKE_VERSION}\nArchitecture: {arch}\nMaintainer: t <t@t>\nDescription: t\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root),
                    str(out / f"{name}_{FAKE_VERSION}_{arch}.deb")], check=True, capture_output=True)


def _source_tarball(tmp_path: Path, libbpf_makefile: str) -> bytes:
    top = tmp_path / "linux-source-7.9"
    files = {"tools/lib/bpf/Makefile": libbpf_makefile, "tools/lib/bpf/libbpf.c": "",
             "tools/bpf/bpftool/Makefile": BPFTOOL_MAKEFILE, "include/uapi/linux/bpf.h": "",
             "arch/x86/include/uapi/asm/bpf_perf_event.h": "", "kernel/bpf/disasm.c": "",
             "kernel/bpf/disasm.h": "", "scripts/bpf_doc.py": "", "Makefile": "", "drivers/skipped.c": ""}
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    tarball = tmp_path / "src.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(top, arcname=top.name)
    return tarball.read_bytes()


def _fake_stack(tmp_path: Path, libbpf_makefile: str = LIBBPF_MAKEFILE) -> Path:
    """Stand-in packages already in the stack's debs/ (so nothing is downloaded), and their pins."""
    debs = stack.cache_root() / "stack" / "fake" / "debs"
    debs.mkdir(parents=True)
    lib = f"usr/lib/modules/{FAKE_RELEASE}"
    _deb(debs, f"linux-binary-{FAKE_RELEASE}", {f"{lib}/vmlinuz": _bzimage(FAKE_RELEASE)})
    _deb(debs, f"linux-base-{FAKE_RELEASE}", {f"{lib}/config": b"CONFIG_BPF_SYSCALL=y\n", f"{lib}/System.map": b"",
                                               f"{lib}/modules.order": b"", f"{lib}/modules.builtin": b""})
    _deb(debs, f"linux-modules-{FAKE_RELEASE}", {f"{lib}/kernel/fs/9p/9p.ko": b""})
    _deb(debs, "linux-source-7.9", {"usr/src/linux-source-7.9.tar.xz": _source_tarball(tmp_path, libbpf_makefile)},
         arch="all")
    return _pins_file(tmp_path, archive="http://127.0.0.1:9/debian")  # unreachable: a download would fail


def test_offline_provisioning_then_cached_call(tmp_path: Path) -> None:
    pins_file = _fake_stack(tmp_path)
    lines: list[str] = []
    paths = stack.stack_paths("fake", pins_file=pins_file, log=lines.append)
    assert [ln.split(":")[1].strip() for ln in lines] == [
        "unpack-kernel", "unpack-modules", "unpack-source", "build-libbpf", "build-bpftool", "manifest"]
    assert paths.kernel_image.name == f"vmlinuz-{FAKE_RELEASE}" and kernel_release(paths.kernel_image) == FAKE_RELEASE
    assert paths.kernel_image.with_name(f"config-{FAKE_RELEASE}").is_file()
    assert (paths.modules / "lib" / "modules" / FAKE_RELEASE / "modules.dep").is_file()  # depmod ran
    assert not (paths.source / "drivers").exists()  # only the members the builds need
    assert stack.libbpf_so_version(paths.libbpf) == "1.8" and paths.libbpf_version == "1.8.0"
    assert stack.bpftool_version(paths.bpftool) == "7.8.0"
    manifest_path = stack.cache_root() / "stack" / "fake" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    image = manifest["packages"]["image"]
    assert image["version"] == FAKE_VERSION and len(image["sha256"]) == 64
    assert manifest["paths"] == paths.as_json()
    before = (manifest_path.read_bytes(), manifest_path.stat().st_mtime_ns)

    lines.clear()
    started = time.monotonic()
    again = stack.stack_paths("fake", pins_file=pins_file, log=lines.append)
    assert time.monotonic() - started < 1.0
    assert again == paths
    assert len(lines) == 1 and ": verify: " in lines[0]
    assert (manifest_path.read_bytes(), manifest_path.stat().st_mtime_ns) == before

    shown = _cli("paths", "--stack", "fake", "--pins", str(pins_file), "--no-provision")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == paths.as_json()


def test_failing_build_leaves_no_manifest(tmp_path: Path) -> None:
    pins_file = _fake_stack(tmp_path, libbpf_makefile=FAILING_MAKEFILE)
    line = _one_line_failure(_cli("paths", "--stack", "fake", "--pins", str(pins_file)), stack.EXIT_BUILD)
    stack_dir = stack.cache_root() / "stack" / "fake"
    assert line.startswith("backends.stack: stack build-libbpf: make -C tools/lib/bpf failed (exit 2)"), line
    assert str(stack_dir / "logs" / "build-libbpf.log") in line
    assert "stand-in failure" in (stack_dir / "logs" / "build-libbpf.log").read_text()
    assert not (stack_dir / "manifest.json").exists()
    assert not (stack_dir / "libbpf").exists() and not (stack_dir / "bpftool").exists()
    assert not [p.name for p in stack_dir.iterdir() if ".tmp-" in p.name]
    assert (stack_dir / "kernel").is_dir()  # finished pieces stay, and are reused by the next run
    with pytest.raises(StackUnavailable) as refused:
        stack.stack_paths("fake", pins_file=pins_file, provision=False)
    assert refused.value.step == "not-provisioned" and refused.value.exit_code == stack.EXIT_NOT_PROVISIONED
    # a run that only uses the stack (a default vm column) names why it is missing
    assert "make -C tools/lib/bpf failed (exit 2)" in str(refused.value)


def test_not_provisioned_exits_4() -> None:
    line = _one_line_failure(_cli("paths", "--no-provision"), stack.EXIT_NOT_PROVISIONED)
    assert "stack 7.3.4 is not provisioned" in line and "never provisioned" in line and "make stack" in line


@pytest.mark.parametrize("option", ["--kernel-image", "--libbpf", "--bpftool", "--modules"])
def test_bad_override_is_usage(tmp_path: Path, option: str) -> None:
    bogus = tmp_path / "not-it"
    bogus.write_text("nothing\n")
    if option == "--modules":
        bogus = tmp_path / "missing-dir"
    line = _one_line_failure(_cli("paths", option, str(bogus), "--no-provision"), stack.EXIT_USAGE)
    assert str(bogus) in line


def test_overrides_report_their_own_versions(tmp_path: Path) -> None:
    paths = stack.stack_paths("fake", pins_file=_fake_stack(tmp_path), log=lambda line: None)
    own = tmp_path / "own"
    own.mkdir()
    (own / "vmlinuz").write_bytes(_bzimage("7.9.10-mine"))
    tool = own / "bpftool"
    tool.write_text("#!/bin/sh\necho 'bpftool v7.9.1'\n")
    tool.chmod(0o755)
    mixed = stack.stack_paths("fake", pins_file=tmp_path / "stacks.toml", kernel_image=own / "vmlinuz",
                              bpftool=tool, libbpf=paths.libbpf, provision=False)
    assert (mixed.release, mixed.kernel_image) == ("7.9.10-mine", own / "vmlinuz")
    assert (mixed.bpftool_version, mixed.bpftool) == ("7.9.1", tool)
    assert mixed.libbpf_version == "1.8.0"  # read from the .so and its file name
    assert mixed.modules == paths.modules and mixed.include == paths.include


# -- the real stack (slow; only where it has been provisioned) ------------------------------------------------


def _real_stack() -> stack.StackPaths | None:
    real_cache = Path(os.environ.get("PERCPU_REAL_CACHE", Path.home() / ".cache" / "percpu-conformance"))
    saved = os.environ.get(stack.CACHE_ENV)
    os.environ[stack.CACHE_ENV] = str(real_cache)
    try:
        return stack.stack_paths(provision=False, log=lambda line: None)
    except StackUnavailable:
        return None
    finally:
        if saved is None:
            del os.environ[stack.CACHE_ENV]
        else:
            os.environ[stack.CACHE_ENV] = saved


@pytest.mark.slow
def test_real_stack_is_the_pinned_one() -> None:
    paths = _real_stack()
    if paths is None:
        pytest.skip("the real stack is not provisioned here; run: make stack")
    pins = stack.load_pins()
    assert kernel_release(paths.kernel_image) == pins.release == "7.3.4+deb13-amd64"
    config = paths.kernel_image.with_name(f"config-{pins.release}").read_text()
    assert "CONFIG_BPF_SYSCALL=y" in config and "CONFIG_9P_FS=" in config
    assert "9pnet_virtio.ko" in (paths.modules / "lib" / "modules" / pins.release / "modules.dep").read_text()
    assert stack.libbpf_so_version(paths.libbpf) == "1.8" and paths.libbpf.name == "libbpf.so.1.8.0"
    assert stack.bpftool_version(paths.bpftool) == "7.8.0"
    assert (paths.include / "bpf" / "bpf_helpers.h").is_file()
    for rel in ("tools/testing/selftests/bpf/progs/test_global_percpu_data.c",
                "tools/testing/selftests/bpf/prog_tests/global_data_init.c", "kernel/bpf/disasm.c"):
        assert (paths.source / rel).is_file(), rel
