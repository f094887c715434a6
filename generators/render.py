"""Render a program model as C, deterministically, in two forms.

*global*: the feature under test, per-CPU variables as globals in `.percpu*` sections.
*lowered*: the emulation the series replaces (spec §4): each `.percpu*` section becomes the struct value of a
1-entry PERCPU_ARRAY map reached with `bpf_map_lookup_elem`. The lowered struct pins every variable at the offset
clang chose for the global form, so both leave byte-identical per-CPU contents.

The prelude is self-contained (no libbpf headers), so compiling needs only clang.
"""

from __future__ import annotations

from collections.abc import Mapping

from generators.ctype import Array, CType, Enum, Leaf, Record, Scalar, init_slots, named_types
from generators.model import (
    JMP_TABLE,
    Access,
    Add,
    Branch,
    Call,
    Copy,
    Function,
    Op,
    ProgramModel,
    Store,
    StoreCpu,
    TailCall,
    Variable,
    walk_ops,
)

PRELUDE = """\
typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef signed short __s16;
typedef unsigned int __u32;
typedef signed int __s32;
typedef unsigned long long __u64;
typedef signed long long __s64;

#define SEC(name) __attribute__((section(name), used))
#define __noinline __attribute__((noinline))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define __array(name, val) typeof(val) *name[]

static __u32 (*bpf_get_smp_processor_id)(void) = (void *)8;
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
"""

UNSIGNED_OF_SIZE = {1: "__u8", 2: "__u16", 4: "__u32", 8: "__u64"}
from toolchain.uapi import BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PROG_ARRAY  # noqa: E402, F401

TAIL_CALL_HELPER = "static long (*bpf_tail_call)(void *ctx, void *prog_array_map, __u32 index) = (void *)12;"


def c_literal(value: int, leaf: Leaf) -> str:
    """An integer constant of leaf's type that never overflows a C literal."""
    if isinstance(leaf, Enum):
        for name, v in leaf.values:
            if v == value:
                return name
        return f"{value}" if leaf.signed else f"{value}U"
    if leaf.kind == "u64":
        return f"{value}ULL"
    if leaf.kind == "s64":
        return "(-9223372036854775807LL - 1)" if value == -(1 << 63) else f"{value}LL"
    if leaf.kind == "u32":
        return f"{value}U"
    if leaf.kind == "s32":
        return "(-2147483647 - 1)" if value == -(1 << 31) else f"{value}"
    return str(value)


def leaf_c_type(leaf: Leaf) -> str:
    return leaf.c_name


def declarator(ctype: CType, name: str) -> tuple[str, str]:
    """(base type, declarator) so that arrays of arrays read `T name[2][3]`."""
    dims = ""
    while isinstance(ctype, Array):
        dims += f"[{ctype.count}]"
        ctype = ctype.elem
    return ctype.c_name, f"{name}{dims}"


def type_definition(t: Enum | Record) -> str:
    if isinstance(t, Enum):
        body = ", ".join(f"{n} = {v}" for n, v in t.values)
        return f"enum {t.tag} {{ {body} }};"
    lines = [f"{t.kind} {t.tag} {{"]
    for f in t.fields:
        base, decl = declarator(f.type, f.name)
        attr = f" __attribute__((aligned({f.aligned})))" if f.aligned else ""
        lines.append(f"\t{base} {decl}{attr};")
    attrs = []
    if t.packed:
        attrs.append("packed")
    if t.aligned:
        attrs.append(f"aligned({t.aligned})")
    tail = f" __attribute__(({', '.join(attrs)}))" if attrs else ""
    lines.append(f"}}{tail};")
    return "\n".join(lines)


def init_leaves(ctype: CType) -> list[Leaf]:
    return [slot.type for slot in init_slots(ctype)]


def initializer(ctype: CType, values: tuple[int, ...] | None) -> str:
    if values is None:
        return ""
    if not values:
        return " = 0" if isinstance(ctype, Scalar | Enum) else " = {}"
    cursor = _Cursor(list(zip(values, init_leaves(ctype), strict=False)))
    return " = " + _init_text(ctype, cursor)


class _Cursor:
    """The initialiser's remaining (value, leaf) pairs; nested lists stop early when it runs out."""

    def __init__(self, items: list[tuple[int, Leaf]]) -> None:
        self.items, self.pos = items, 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.items)

    def take(self) -> tuple[int, Leaf]:
        self.pos += 1
        return self.items[self.pos - 1]


def _init_text(ctype: CType, cursor: _Cursor) -> str:
    if isinstance(ctype, Scalar | Enum):
        value, leaf = cursor.take()
        return c_literal(value, leaf)
    if isinstance(ctype, Array):
        children = [ctype.elem] * ctype.count
    else:
        members = ctype.fields[:1] if ctype.kind == "union" else ctype.fields
        children = [f.type for f in members]
    parts = []
    for child in children:
        if cursor.done:
            break
        parts.append(_init_text(child, cursor))
    return "{ " + ", ".join(parts) + " }"


def section_attribute(var: Variable) -> str:
    """Where a plain declaration would land elsewhere, pin the section explicitly."""
    zero = var.init is None or not any(var.init)
    if var.section == ".bss" and zero:
        return ""
    if var.section == ".data" and not zero:
        return ""
    if var.section == ".rodata" and not zero:
        return ""
    return f' SEC("{var.section}")'


def variable_definition(var: Variable) -> str:
    base, decl = declarator(var.type, var.name)
    qual = "const volatile " if var.read_only else ""
    storage = "static " if var.static else ""
    used = " __attribute__((used))" if var.static else ""  # a static nobody reads must still be emitted
    return f"{storage}{qual}{base} {decl}{section_attribute(var)}{used}{initializer(var.type, var.init)};"


def access_text(access: Access, base: str) -> str:
    out = base
    for step in access.path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}"
    return out


class _Emitter:
    def __init__(self, model: ProgramModel, var_base: Mapping[str, str]) -> None:
        self.model = model
        self.var_base = var_base

    def lvalue(self, access: Access) -> str:
        return access_text(access, self.var_base.get(access.var, access.var))

    def ops(self, ops: tuple[Op, ...], indent: str) -> list[str]:
        lines: list[str] = []
        for op in ops:
            lines += self.op(op, indent)
        return lines

    def op(self, op: Op, indent: str) -> list[str]:
        if isinstance(op, Store):
            return [f"{indent}{self.lvalue(op.dst)} = {c_literal(op.value, self.model.leaf(op.dst))};"]
        if isinstance(op, Add):
            leaf = self.model.leaf(op.dst)
            u = UNSIGNED_OF_SIZE[leaf.size]
            dst = self.lvalue(op.dst)
            # unsigned arithmetic: no signed-overflow UB for clang to exploit
            return [f"{indent}{dst} = ({leaf.c_name})(({u}){dst} + ({u}){c_literal(op.value, leaf)});"]
        if isinstance(op, Copy):
            return [f"{indent}{self.lvalue(op.dst)} = {self.lvalue(op.src)};"]
        if isinstance(op, StoreCpu):
            return [f"{indent}{self.lvalue(op.dst)} = bpf_get_smp_processor_id();"]
        if isinstance(op, Branch):
            cond = f"{self.lvalue(op.cond)} > {c_literal(op.threshold, self.model.leaf(op.cond))}"
            lines = [f"{indent}if ({cond}) {{", *self.ops(op.then, indent + "\t")]
            if op.orelse:
                lines += [f"{indent}}} else {{", *self.ops(op.orelse, indent + "\t")]
            return [*lines, f"{indent}}}"]
        if isinstance(op, Call):
            return [f"{indent}{op.function}();"]
        if isinstance(op, TailCall):
            return [f"{indent}bpf_tail_call(ctx, &{JMP_TABLE}, {self.model.prog_slot(op.program)});"]
        raise TypeError(op)


def _function_head(fn: Function) -> str:
    if fn.subprogram:
        return f"{'' if fn.exported else 'static '}__noinline int {fn.name}(void)"
    if fn.replaces is not None:
        # the extension's prototype must match its target's: int (void)
        return f'SEC("freplace/{fn.replaces.function}") int {fn.name}(void)'
    return f'SEC("raw_tp") int {fn.name}(void *ctx)'


def _keep_call(fn: Function) -> list[str]:
    """An exported subprogram is what an extension replaces, so every call to it must stay: clang drops a call
    to a function it finds free of side effects (`v = v`), noinline or not. An empty asm with a memory clobber
    emits no instruction and forbids that."""
    return ['\t__asm__ __volatile__("" ::: "memory");'] if fn.subprogram and fn.exported else []


def check_tail_calls(model: ProgramModel) -> None:
    """Tail calls come from programs (the ctx is their argument) and go to programs."""
    programs = {f.name for f in model.programs if f.replaces is None}
    if model.extensions:
        raise ValueError("tail calls and extension programs in one object are not generated")
    for fn in model.functions:
        for op in walk_ops(fn.ops):
            if not isinstance(op, TailCall):
                continue
            if fn.subprogram:
                raise ValueError(f"subprogram {fn.name} tail-calls {op.program}: only programs have a ctx")
            if op.program not in programs:
                raise ValueError(f"{fn.name} tail-calls {op.program}, which is not a program")


def jmp_table(model: ProgramModel) -> list[str]:
    """The PROG_ARRAY every tail call goes through, statically initialised (libbpf fills it after load).

    Every program gets its slot, named in model order: clang emits functions in the order they are first
    referenced, so this keeps the programs' ELF (and load) order equal to the model's."""
    if not model.has_tail_calls:
        return []
    check_tail_calls(model)
    progs = model.programs
    slots = ", ".join(f"[{i}] = (void *)&{f.name}" for i, f in enumerate(progs))
    return [
        TAIL_CALL_HELPER,
        *(_function_head(f) + ";" for f in progs),
        "struct {",
        f"\t__uint(type, {BPF_MAP_TYPE_PROG_ARRAY} /* BPF_MAP_TYPE_PROG_ARRAY */);",
        f"\t__uint(max_entries, {len(progs)});",
        "\t__type(key, __u32);",
        "\t__array(values, int (void *));",
        f'}} {JMP_TABLE} SEC(".maps") = {{ .values = {{ {slots} }} }};',
    ]


def _common(model: ProgramModel, variables: list[Variable]) -> list[str]:
    out = [f"/* percpu-conformance model {model.name} */", PRELUDE]
    seen: list[Enum | Record] = []
    for v in variables:
        for t in named_types(v.type):
            if t not in seen:
                seen.append(t)
    out += [type_definition(t) for t in seen]
    return out


def render_global(model: ProgramModel) -> str:
    out = _common(model, list(model.variables))
    out += [variable_definition(v) for v in model.variables]
    out.append("")
    out += jmp_table(model)
    out += [_function_head(f) + ";" for f in model.functions if f.subprogram]
    emitter = _Emitter(model, {})
    for fn in model.functions:
        out += ["", _function_head(fn), "{", *_keep_call(fn), *emitter.ops(fn.ops, "\t"), "\treturn 0;", "}"]
    out += ["", 'char LICENSE[] SEC("license") = "GPL";', ""]
    return "\n".join(out)


def section_ident(section: str) -> str:
    return section.lstrip(".").replace(".", "_").replace("-", "_")


def render_lowered(model: ProgramModel, offsets: Mapping[str, int]) -> str:
    """`offsets`: each per-CPU variable's offset in its section, as clang placed it in the global form."""
    percpu = [v for v in model.variables if v.percpu]
    sections = [s for s in model.sections() if any(v.section == s for v in percpu)]
    out = _common(model, list(model.variables))
    out += [variable_definition(v) for v in model.variables if not v.percpu]
    var_base: dict[str, str] = {}
    for k, section in enumerate(sections):
        ident = section_ident(section)
        members = sorted((v for v in percpu if v.section == section), key=lambda v: offsets[v.name])
        lines, asserts, cur = [f"struct {ident}_value {{"], [], 0
        for i, v in enumerate(members):
            off = offsets[v.name]
            if off > cur:
                lines.append(f"\tchar __pad{i}[{off - cur}];")
            base, decl = declarator(v.type, v.name)
            lines.append(f"\t{base} {decl};")
            asserts.append(f'_Static_assert(__builtin_offsetof(struct {ident}_value, {v.name}) == {off}, '
                           f'"{v.name} keeps its global offset");')
            cur = off + v.type.size
            var_base[v.name] = f"__pc{k}->{v.name}"
        out += [*lines, "};", *asserts]
        out += [
            "struct {",
            f"\t__uint(type, {BPF_MAP_TYPE_PERCPU_ARRAY});",
            "\t__uint(max_entries, 1);",
            "\t__type(key, __u32);",
            f"\t__type(value, struct {ident}_value);",
            f'}} {ident} SEC(".maps");',
        ]
    out.append("")
    out += jmp_table(model)
    out += [_function_head(f) + ";" for f in model.functions if f.subprogram]
    emitter = _Emitter(model, var_base)
    for fn in model.functions:
        body = ["\t__u32 __zero = 0;"] if sections else []
        for k, section in enumerate(sections):
            ident = section_ident(section)
            body += [f"\tstruct {ident}_value *__pc{k} = bpf_map_lookup_elem(&{ident}, &__zero);",
                     f"\tif (!__pc{k})", "\t\treturn 0;"]
        out += ["", _function_head(fn), "{", *_keep_call(fn), *body, *emitter.ops(fn.ops, "\t"), "\treturn 0;",
                "}"]
    out += ["", 'char LICENSE[] SEC("license") = "GPL";', ""]
    return "\n".join(out)


def lowered_value_size(model: ProgramModel, offsets: Mapping[str, int], section: str) -> int:
    """sizeof the lowered struct of one section: its last member's end, rounded to the struct's alignment."""
    members = [v for v in model.variables if v.section == section]
    end = max(offsets[v.name] + v.type.size for v in members)
    align = max(v.type.align for v in members)
    return -(-end // align) * align
