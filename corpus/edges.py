"""Edges named in review of the series (spec §7), as fixed models."""

from __future__ import annotations

from generators.ctype import Array, Scalar
from generators.model import Access, Add, Copy, Function, ProgramModel, Run, Store, StoreCpu, TailCall, Variable

U8, U64 = Scalar("u8"), Scalar("u64")


def _runs(program: str, cpus: tuple[int, ...]) -> tuple[Run, ...]:
    return tuple(Run(program, cpu) for cpu in cpus[:2])


def at_percpu_limit(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    """round_up(value_size, 8) == 32 KiB exactly: still created."""
    big = Variable("big", Array(U64, 4096), ".percpu.b")
    prog = Function("touch", (StoreCpu(Access("big", (4095,))), Add(Access("big", (0,)), 1)))
    return ProgramModel("edge", (big,), (prog,), _runs("touch", cpus))


def over_percpu_limit(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    """One byte more than the per-CPU allocator takes: E2BIG, and nothing loads."""
    big = Variable("big", Array(U8, 32 * 1024 + 1), ".percpu.b")
    small = Variable("counter", U64, ".bss")
    prog = Function("touch", (Store(Access("big", (0,)), 1), Add(Access("counter"), 1)))
    return ProgramModel("edge", (big, small), (prog,), _runs("touch", cpus))


def one_byte_variables(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    """1-byte per-CPU variables (clang 17 crashed on them), static and global, initialised and not."""
    vs = (Variable("a", U8, ".percpu", init=(7,)), Variable("b", Scalar("bool"), ".percpu", static=True),
          Variable("c", Scalar("char"), ".percpu", init=(-1,)), Variable("d", U8, ".percpu.data", static=True,
                                                                       init=(200,)))
    prog = Function("touch", (Add(Access("a"), 1), StoreCpu(Access("b")), Add(Access("c"), 1),
                              Add(Access("d"), 100)))
    return ProgramModel("edge", vs, (prog,), _runs("touch", cpus))


def static_only_sections(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    """Sections holding only static variables: libbpf does not make such data maps mmapable."""
    vs = (Variable("s", U64, ".data", static=True, init=(5,)), Variable("t", U64, ".bss", static=True),
          Variable("u", U64, ".percpu", static=True, init=(9,)))
    prog = Function("touch", (Add(Access("s"), 1), Add(Access("t"), 2), Add(Access("u"), 3)))
    return ProgramModel("edge", vs, (prog,), _runs("touch", cpus))


def plain_data(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    """Ordinary global data only (spec §2b): the regression baseline every libbpf and kernel handles."""
    vs = (Variable("d", Scalar("s32"), ".data", init=(5,)), Variable("b", Scalar("s32"), ".bss"),
          Variable("r", Scalar("s32"), ".rodata", init=(7,)), Variable("t", Scalar("s32"), ".data.tally",
                                                                       init=(1,)),
          Variable("g", Scalar("s32"), ".rodata.tag", init=(2,)))
    prog = Function("touch", (Add(Access("d"), 1), StoreCpu(Access("b")), Copy(Access("t"), Access("r"))))
    return ProgramModel("plain_data", vs, (prog,), _runs("touch", cpus))


def tail_call_shared_variable(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    """Tail calls sharing one per-CPU variable (spec §7): prog0 writes it and tail-calls prog1, which increments
    the same variable and stores the CPU id, in the slot of the CPU prog0 runs on. prog0's store after the tail
    call must never happen."""
    vs = (Variable("hits", U64, ".percpu", init=(100,)), Variable("cpu_id", Scalar("u32"), ".percpu"))
    caller = Function("prog0", (Store(Access("hits"), 1), TailCall("prog1"), Store(Access("hits"), 0xDEAD)))
    callee = Function("prog1", (Add(Access("hits"), 1), StoreCpu(Access("cpu_id"))))
    return ProgramModel("tail_call", vs, (caller, callee), _runs("prog0", cpus))
