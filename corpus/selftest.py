"""The upstream selftest's layout (spec §6) as a fixed model: every property replays it as an @example."""

from __future__ import annotations

from generators.ctype import Array, Field, Record, Scalar
from generators.model import Access, Add, Function, ProgramModel, Run, Store, StoreCpu, Variable

S32, BOOL = Scalar("s32"), Scalar("bool")
# struct { char set; int i; int nums[7]; } = {0, -1}
STRUCT = Record("t1", "struct", (Field("set", Scalar("char")), Field("i", S32), Field("nums", Array(S32, 7))))


def selftest_model(cpus: tuple[int, ...] = (0, 1)) -> ProgramModel:
    variables = (
        Variable("data", S32, ".percpu", init=(-1,)),
        Variable("nums", Array(S32, 7), ".percpu"),
        Variable("set", BOOL, ".percpu"),
        Variable("struct_data", STRUCT, ".percpu", init=(0, -1)),
        Variable("cpu_id", Array(S32, 1), ".percpu"),  # last, so the section can be resized
        Variable("percpu_data", S32, ".percpu.data", init=(7,)),
        Variable("long_name", S32, ".percpu.looooooooong", init=(3,)),
        Variable("ordinary", S32, ".data.percpu", init=(9,)),
        Variable("counter", Scalar("u64"), ".bss"),
    )
    program = Function("update_percpu_data", (
        Store(Access("data"), 1),
        Store(Access("nums", (6,)), 0xC0DE),
        Store(Access("set"), 1),
        Store(Access("struct_data", ("set",)), 1),
        Store(Access("struct_data", ("i",)), 0xC0DE),
        Store(Access("struct_data", ("nums", 6)), 0xC0DE),
        Add(Access("counter"), 1),
        StoreCpu(Access("cpu_id", (0,))),
        Add(Access("percpu_data"), 1),
        Store(Access("long_name"), 0xC0DE),
    ))
    schedule = tuple(Run("update_percpu_data", cpu) for cpu in cpus)
    return ProgramModel("test_global_percpu_data", variables, (program,), schedule)
