"""The simulator's helper table and printf grammar: the verifier and the kernel model read the same entries and
never import each other's types; every entry is well formed and runs; the inline counts reach the xlated length;
the one format grammar admits what it renders."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from backends.sim import printf
from backends.sim.helpers import BUFFER_ARGS, HELPER_PROTOS, BPF_FUNC_get_smp_processor_id, BPF_FUNC_snprintf
from backends.sim.kernel import SimError, SimKernel
from toolchain.insn import (
    BPF_ADD,
    BPF_DW,
    Insn,
    alu64_imm,
    call_helper,
    exit_insn,
    ld_map_value,
    mov64_imm,
    mov64_reg,
    st_mem,
)
from toolchain.uapi import BPF_F_RDONLY_PROG, BPF_MAP_TYPE_ARRAY

SIM = Path(__file__).resolve().parent.parent / "backends" / "sim"


def _imports(module: str) -> set[str]:
    """Every module `backends/sim/<module>.py` imports, TYPE_CHECKING blocks included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse((SIM / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_verifier_does_not_import_the_kernel_model():
    assert not {m for m in _imports("verifier") if m.startswith("backends.sim.kernel")}


@pytest.mark.parametrize("module", ["helpers", "printf"])
def test_the_shared_tables_import_neither_side(module):
    assert not {m for m in _imports(module) if m.startswith(("backends.sim.kernel", "backends.sim.verifier",
                                                               "backends.sim.interp"))}


def test_the_kernel_model_takes_helper_facts_from_the_table_not_the_verifier():
    tree = ast.parse((SIM / "kernel.py").read_text())
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "vf"}
    assert not {a for a in used if a.startswith("BPF_FUNC_") or "HELPER" in a or "format" in a}


def test_every_entry_runs_in_the_kernel_model():
    k = SimKernel("patched")
    assert set(k.helpers) == set(HELPER_PROTOS)
    for func, proto in HELPER_PROTOS.items():
        assert callable(getattr(SimKernel, proto.runtime)), proto.name
        assert proto.func_id == func


@pytest.mark.parametrize("func", sorted(HELPER_PROTOS))
def test_entries_are_well_formed(func):
    proto = HELPER_PROTOS[func]
    args = proto.args
    for i, kind in enumerate(args):
        # a size follows each buffer, and only a buffer
        assert (kind == "const_size") == (i > 0 and args[i - 1] in BUFFER_ARGS), (proto.name, i)
        if kind in ("map_key", "map_value"):
            assert any(a in ("map_ptr", "prog_array") for a in args[:i]), proto.name
    if proto.ret == "map_value_or_null" or proto.writes_map or proto.inline_by_map_type:
        assert "map_ptr" in args, proto.name
    if proto.printf_format is not None:
        fmt_reg, len_reg = proto.printf_format
        assert (args[fmt_reg - 1], args[len_reg - 1]) == ("const_str", "const_size")
    lo, hi = proto.ret_range
    assert -(1 << 63) <= lo <= hi < 1 << 63


@pytest.mark.parametrize(("profile", "xlated"), [
    ("patched", 4),  # mov imm, per-CPU mov, 32-bit load, then exit
    ("patched-nojit", 2),  # no per-CPU instruction in the JIT: the call stays
    ("patched+jitoff", 2),  # nothing is inlined without jit_requested
])
def test_the_inline_count_reaches_the_xlated_length(profile, xlated):
    _, n, _ = SimKernel(profile).prog_load([call_helper(BPF_FUNC_get_smp_processor_id), exit_insn()], "cpu")
    assert n == xlated


# -- printf -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "nargs"), [
    (b"", 0), (b"plain text\t\n", 0), (b"100%% sure", 0), (b"%d", 1), (b"%-+ 0#12llx", 1), (b"%hu%li%c%s%p%X", 6),
    (b"%d" * 12, 12),
])
def test_formats_bpf_snprintf_accepts(fmt, nargs):
    assert printf.check(fmt, nargs)


@pytest.mark.parametrize(("fmt", "nargs"), [
    (b"%", 0), (b"%q", 1), (b"%5", 1), (b"%-%", 0), (b"%lf", 1), (b"bell\x07", 0), (b"\xe9", 0),
    (b"%d", 0), (b"%d", 2), (b"%d" * 13, 13),
])
def test_formats_bpf_snprintf_refuses(fmt, nargs):
    assert not printf.check(fmt, nargs)


def test_render_follows_the_c_conversions():
    strings = {0x1000: b"str"}
    fmt = b"%d|%5u|%-4x|%lld|%c|%s|%%|%p|%ld|%X|%-5s|%+d|%+u|%05d|%-05d|%#x"
    args = [(-5) & (2 ** 64 - 1), 42, 255, (-7) & (2 ** 64 - 1), 0x41, 0x1000, 0xABC, 1 << 40, 0xBEEF, 0x1000,
            3, 3, 42, 42, 255]
    assert printf.render(fmt, args, strings.__getitem__) == \
        "-5|   42|ff  |-7|A|str|%|0xabc|1099511627776|BEEF|str  |+3|3|00042|42   |0xff"
    with pytest.raises(ValueError):
        printf.render(b"%q", [], strings.__getitem__)


def _snprintf_program(out_fd: int, fmt_fd: int, data: list[int]) -> list[Insn]:
    """bpf_snprintf(out map value, 32, fmt, fp - 8 * len(data), 8 * len(data))."""
    n = len(data)
    insns = [st_mem(BPF_DW, 10, -8 * (n - i), v) for i, v in enumerate(data)]
    insns += [*ld_map_value(1, out_fd, 0), mov64_imm(2, 32), *ld_map_value(3, fmt_fd, 0),
              mov64_reg(4, 10), alu64_imm(BPF_ADD, 4, -8 * n), mov64_imm(5, 8 * n)]
    return [*insns, call_helper(BPF_FUNC_snprintf), exit_insn()]


def _string_map(k: SimKernel, text: bytes) -> int:
    fd = k.map_create(BPF_MAP_TYPE_ARRAY, 4, 16, 1, BPF_F_RDONLY_PROG, "fmt")
    k.map_update(fd, bytes(4), text.ljust(16, b"\0"))
    k.map_freeze(fd)
    return fd


def test_the_verifier_and_the_runtime_read_one_grammar():
    k = SimKernel("patched")
    out = k.map_create(BPF_MAP_TYPE_ARRAY, 4, 32, 1, 0, "out")
    fd, _, _ = k.prog_load(_snprintf_program(out, _string_map(k, b"%d,%3u|%%\0"), [-5, 7]), "ok")
    assert k.test_run(fd, 0) == len("-5,  7|%") + 1
    assert k.map_lookup(out, bytes(4)).rstrip(b"\0") == b"-5,  7|%"
    for fmt, data in ((b"%d%q\0", [1, 2]), (b"%d\0", [1, 2]), (b"%d,%d\0", [1])):
        with pytest.raises(SimError) as e:
            k.prog_load(_snprintf_program(out, _string_map(k, fmt), data), "bad")
        assert (e.value.errno, e.value.message) == (errno.EINVAL, "Invalid format string")
