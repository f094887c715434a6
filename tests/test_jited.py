"""The x86-64 decoder of per-CPU offset adds (backends.kernel.jited) on hand-assembled bytes, its oracle, and the
decoder end to end on this kernel's JIT: the inlined bpf_get_smp_processor_id adds the offset into rax."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from backends.kernel import bpf, probes
from backends.kernel.jited import find_gs_adds, observe_percpu_addr_jit, percpu_add_regs
from oracle.jited import X86_REG_OF_BPF, predict_percpu_addr_jit
from oracle.profiles import kernel_axis
from toolchain import insn as I

DISP = bytes.fromhex("28603a83")  # an address of this_cpu_off, as a sign-extended disp32

# `add <reg>, gs:[disp32]` as the kernel JIT emits it (65, REX.W with REX.R for r8-r15, 03, ModRM 00 reg 100,
# SIB 25, disp32), written out per register; objdump confirms each below
ADD_GS = {
    "rax": "6548030425", "rdi": "6548033c25", "rsi": "6548033425", "rdx": "6548031425", "rcx": "6548030c25",
    "r8": "654c030425", "rbx": "6548031c25", "r13": "654c032c25", "r14": "654c033425", "r15": "654c033c25",
}
# movabs $imm64, <reg> (REX.W with REX.B for r8-r15, B8+r)
MOVABS = {
    "rax": "48b8", "rdi": "48bf", "rsi": "48be", "rdx": "48ba", "rcx": "48b9",
    "r8": "49b8", "rbx": "48bb", "r13": "49bd", "r14": "49be", "r15": "49bf",
}
IMM64 = bytes.fromhex("40a0030000e9ffff")


def _selftest_image() -> bytes:
    """verifier_percpu_addr's body as the JIT lays it out: movabs then the gs add, for r0..r9 in order."""
    return b"".join(bytes.fromhex(MOVABS[r]) + IMM64 + bytes.fromhex(ADD_GS[r]) + DISP for r in X86_REG_OF_BPF)


@pytest.mark.parametrize("bpf_reg", range(10))
def test_each_register_is_decoded_alone(bpf_reg: int) -> None:
    reg = X86_REG_OF_BPF[bpf_reg]
    [add] = find_gs_adds(b"\x90" + bytes.fromhex(ADD_GS[reg]) + DISP + b"\xc3")
    assert (add.at, add.reg, add.form, add.length) == (1, reg, "disp32", 9)
    assert add.disp == int.from_bytes(DISP, "little", signed=True)


def test_the_selftest_layout_gives_the_ten_registers_in_order() -> None:
    assert percpu_add_regs(_selftest_image()) == list(X86_REG_OF_BPF)
    assert X86_REG_OF_BPF == ("rax", "rdi", "rsi", "rdx", "rcx", "r8", "rbx", "r13", "r14", "r15")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to cross-check the hand assembly")
def test_objdump_reads_the_hand_assembly_as_gs_adds(tmp_path) -> None:
    image = tmp_path / "image.bin"
    image.write_bytes(_selftest_image())
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", str(image)], capture_output=True,
                         text=True, check=True).stdout
    adds = [line.split(",")[-1].strip().lstrip("%") for line in out.splitlines() if "add    %gs:" in line]
    assert adds == list(X86_REG_OF_BPF)


def test_rip_relative_form() -> None:
    # add r13, gs:[rip + disp32]: ModRM 00 101 101, REX.R
    assert [(a.reg, a.form, a.length) for a in find_gs_adds(bytes.fromhex("654c032d") + DISP)] == [
        ("r13", "rip", 8)]


@pytest.mark.parametrize("raw", [
    "4803042528603a83",  # no gs prefix
    "654003042528603a83",  # REX without W: a 32-bit add
    "654a03042528603a83",  # REX.X: SIB index r12, not an absolute address
    "654803442500603a83",  # mod 01: [SIB + disp8]
    "654803042428603a83",  # SIB with a base register (rsp)
    "654801042528603a83",  # ADD r/m64, r64 (01): the store direction
    "65480304252860",  # cut short
])
def test_other_encodings_are_not_counted(raw: str) -> None:
    assert find_gs_adds(bytes.fromhex(raw)) == []


# -- the oracle ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bpf_reg", range(10))
def test_merged_predicts_one_add_into_the_same_register(bpf_reg: int) -> None:
    assert predict_percpu_addr_jit(bpf_reg, 8, kernel_axis("patched")) == {
        "loaded": True, "errno": 0, "jited_percpu_add_regs": [X86_REG_OF_BPF[bpf_reg]]}


@pytest.mark.parametrize("axis", ["patched+jitoff", "unpatched"])
def test_refused_without_the_jit_or_the_feature(axis: str) -> None:
    assert predict_percpu_addr_jit(3, 0, kernel_axis(axis)) == {"loaded": False, "errno": 22,
                                                                "jited_percpu_add_regs": []}


# -- this kernel ----------------------------------------------------------------------------------------------------

_USABLE, _REASON = probes.bpf_usable()
needs_bpf = pytest.mark.skipif(not _USABLE, reason=_REASON or "bpf() unusable")


@needs_bpf
def test_inlined_cpu_id_adds_the_offset_into_rax() -> None:
    """6.18 and 7.3 inline bpf_get_smp_processor_id with BPF_MOV64_PERCPU_REG(r0, r0) when the JIT is on."""
    if not probes.jit_enabled() or not probes.probe_percpu_insn_jit():
        pytest.skip("this kernel does not inline bpf_get_smp_processor_id (JIT off or no per-CPU insn)")
    prog, _ = bpf.prog_load(bpf.RAW_TRACEPOINT, I.encode([I.call_helper(8), I.exit_insn()]), name="cpu_id")
    with prog:
        code = bpf.prog_jited_insns(prog)
        assert len(code) == bpf.prog_info(prog).jited_prog_len
    assert percpu_add_regs(code) == ["rax"]


@needs_bpf
@pytest.mark.parametrize("bpf_reg", [0, 5, 9])
def test_this_kernel_agrees_with_the_oracle(bpf_reg: int) -> None:
    """On a kernel without the feature the load is refused as predicted; with it, the add lands in the register."""
    axis = "patched" if probes.probe_percpu_data() else "unpatched"
    expected = predict_percpu_addr_jit(bpf_reg, 16, kernel_axis(axis))
    observed = observe_percpu_addr_jit(bpf_reg, 16)
    assert {k: observed[k] for k in expected} == expected


@needs_bpf
def test_the_vm_agent_answers_a_jited_request() -> None:
    from backends.vm.agent import _answer

    answer = _answer({"kind": "jited", "register": 7, "offset": 4}, {})
    assert answer["jited"] == observe_percpu_addr_jit(7, 4)


# -- the property can fail ----------------------------------------------------------------------------------------

class _FakeJit:
    """A merged kernel on the raw loader whose JIT sets `ext_bit` in REX for r8-r15 (REX.R right, REX.B the
    encoding the extended-register fix replaced: the add lands in the low register instead)."""

    name = "fake-jit"
    profile = "raw-patched"

    def __init__(self, ext_bit: int) -> None:
        self.ext_bit = ext_bit

    def observe_jited(self, register: int, offset: int) -> dict:
        from backends.kernel.jited import X86_REG_NAMES

        num = X86_REG_NAMES.index(X86_REG_OF_BPF[register])
        rex = 0x48 | (self.ext_bit if num >= 8 else 0)
        code = bytes([0x65, rex, 0x03, 0x04 | (num & 7) << 3, 0x25]) + DISP
        return {"loaded": True, "errno": 0, "jited_percpu_add_regs": percpu_add_regs(code)}


def test_the_property_catches_an_add_into_the_wrong_register(tmp_path, monkeypatch) -> None:
    from suites.test_jited_percpu import test_jited_percpu_add_goes_into_the_loaded_register as prop

    monkeypatch.setenv("PERCPU_FAILURES", str(tmp_path))
    prop(_FakeJit(0x4))  # REX.R: agrees
    with pytest.raises(AssertionError, match=r"expected .*'jited_percpu_add_regs': \['r(8|13|14|15)'\]"):
        prop(_FakeJit(0x1))
    assert any(p.name.startswith("jited-fake-jit-r") for p in tmp_path.iterdir())
