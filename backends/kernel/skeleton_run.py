"""The skeleton life cycle on a real libbpf and kernel, by a C program generated for one object and one plan.

The program includes `bpftool gen skeleton`'s header and links the libbpf under test, as a user's loader does.
For each per-CPU map it reports what upstream's `global_data_init` asserts, over this object's layout: the
struct pointer after open and after load, `bpf_map__initial_value` against it, `sizeof` against `value_size`,
writes through each struct member, `bpf_map__set_value_size`, the read-only image after load, and libbpf's
`BPF_F_CPU`/`BPF_F_ALL_CPUS` lookups and updates with their error cases. The report is one JSON object on
stdout (schema.skeleton). The program is built on the host; `run_harness` runs it here, the vm backend in its
guest.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.kernel.observe import BackendUnavailable
from backends.kernel.skeleton import section_ident
from schema.messages import classify
from schema.skeleton import CONST_STRING_PROGRAMS, CPU_OUT_OF_RANGE, SkeletonPlan
from toolchain import insn as I
from toolchain.btf import Btf
from toolchain.elf import ObjectFacts
from toolchain.insn import Insn, encode
from toolchain.uapi import BPF_F_ALL_CPUS, BPF_F_CPU, BPF_F_RDONLY_PROG, BPF_MAP_TYPE_PERCPU_ARRAY

__all__ = ["Harness", "build_harness", "exposed_members", "run_harness"]

TIMEOUT = 60.0
BTF_VAR_STATIC = 0  # the skeleton exposes every other linkage
SOCKET_FILTER = 1  # BPF_PROG_TYPE_SOCKET_FILTER, as upstream's rdonly tests load

_PRELUDE = r"""
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>

static sigjmp_buf fault;
static void on_fault(int sig) { (void)sig; siglongjmp(fault, 1); }

/* whether one byte of p can be written (read back and stored unchanged): a fault says the page is read-only */
static int writable(volatile unsigned char *p)
{
	struct sigaction sa, old;
	int ok = 0;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_fault;
	sigaction(SIGSEGV, &sa, &old);
	if (!sigsetjmp(fault, 1)) {
		unsigned char v = p[0];
		p[0] = v;
		ok = 1;
	}
	sigaction(SIGSEGV, &old, NULL);
	return ok;
}

static void hex(const void *p, size_t n)
{
	const unsigned char *b = p;

	putchar('"');
	for (size_t i = 0; i < n; i++)
		printf("%02x", b[i]);
	putchar('"');
}

static void jstr(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			printf("\\u%04x", *s);
		else
			putchar(*s);
	}
	putchar('"');
}

static void unhex(const char *s, unsigned char *out, size_t n)
{
	for (size_t i = 0; i < n; i++)
		sscanf(s + 2 * i, "%2hhx", &out[i]);
}

/* each possible CPU's value through bpf_map__lookup_elem(BPF_F_CPU | cpu << 32), as a JSON list */
static void per_cpu(struct bpf_map *m, int ncpu)
{
	size_t vs = bpf_map__value_size(m);
	unsigned char *buf = calloc(1, vs + 8);
	unsigned int key = 0;

	putchar('[');
	for (int cpu = 0; cpu < ncpu; cpu++) {
		int err = bpf_map__lookup_elem(m, &key, sizeof(key), buf, vs, @BPF_F_CPU@ | ((__u64)cpu << 32));

		if (cpu)
			putchar(',');
		if (err)
			printf("%d", err);
		else
			hex(buf, vs);
	}
	putchar(']');
	free(buf);
}

static int silent(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	(void)level; (void)fmt; (void)ap;
	return 0;
}
"""


# The iterator of upstream's iter subtest, over any per-CPU map: it sums one byte of every possible CPU's value,
# read from the iterator's buffer at stride `stride` (round_up(value_size, 8), what the kernel fills it with).
# Its context types are declared here with preserve_access_index; libbpf relocates them against the kernel's BTF.
ITER_SOURCE = r"""
typedef unsigned char __u8;
typedef unsigned int __u32;
typedef unsigned long long __u64;
#define SEC(name) __attribute__((section(name), used))

struct bpf_iter_meta { void *seq; __u64 session_id; __u64 seq_num; } __attribute__((preserve_access_index));
struct bpf_map;
struct bpf_iter__bpf_map_elem {
	struct bpf_iter_meta *meta;
	struct bpf_map *map;
	void *key;
	void *value;
} __attribute__((preserve_access_index));

const volatile __u32 num_cpus = 1;
const volatile __u32 off = 0;
const volatile __u32 stride = 8;
__u64 sum = 0;
__u32 elems = 0;

SEC("iter/bpf_map_elem")
int sum_over_cpus(struct bpf_iter__bpf_map_elem *ctx)
{
	__u8 *value = ctx->value;

	if (!value)
		return 0;
	elems++;
	for (__u32 i = 0; i < num_cpus; i++)
		sum += value[i * stride + off];
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


@dataclass(frozen=True)
class Harness:
    executable: Path
    header: Path
    source: Path
    light: Path | None = None  # the light-skeleton program, when the plan asks for one


def _c_bytes(data: bytes) -> str:
    return '"' + data.hex() + '"'


def exposed_members(facts: ObjectFacts, section: str) -> list[tuple[str, int, int]]:
    """(member name, BTF offset, size) of each variable the skeleton struct of `section` exposes."""
    if facts.btf_data is None:
        return []
    btf = Btf.parse(facts.btf_data)
    sec = btf.datasecs().get(section)
    if sec is None:
        return []
    out = []
    for v in sec.var_secinfos:
        var = btf.get(v.type_id)
        if var.linkage == BTF_VAR_STATIC:
            continue
        # the object's DATASEC may leave offsets 0 (libbpf fixes them from the symbols at open): trust the symbol
        sym = facts.variable_symbol(section, var.name)
        out.append((re.sub(r"[^A-Za-z0-9_]", "_", var.name), sym.value if sym else v.offset, v.size))
    return out


def _member_writes(facts: ObjectFacts, section: str, image: bytes, pointer: str, indent: str) -> list[str]:
    """Each exposed variable written from its own bytes of `image`, through the struct member `pointer` has."""
    lines = [f"{indent}unhex({_c_bytes(image)}, w, {len(image)});"]
    for member, off, size in exposed_members(facts, section):
        if off + size <= len(image):
            lines.append(f"{indent}memcpy(&{pointer}->{member}, w + {off}, sizeof({pointer}->{member}));")
    return lines


def _map_block(name: str, section: str, facts: ObjectFacts, plan: SkeletonPlan) -> list[str]:
    ident = section_ident(section)
    m, p = f"skel->maps.{ident}", f"skel->{ident}"
    lines = [f"\t/* {section} */", "\t{", f"\t\tstruct bpf_map *m = {m};", "\t\tsize_t sz = 0;",
             "\t\tvoid *iv = bpf_map__initial_value(m, &sz);",
             f'\t\tprintf("%s\\"{section}\\":{{", first_map ? "" : ",");', "\t\tfirst_map = 0;",
             f'\t\tprintf("\\"skel_open\\":%s,\\"initial_value_is_skel\\":%s,\\"initial_value_size\\":%zu,'
             f'\\"value_size\\":%u,\\"struct_size\\":%zu,\\"btf_value_type\\":%s", {p} ? "true" : "false", '
             f'iv && iv == (void *){p} ? "true" : "false", sz, bpf_map__value_size(m), sizeof(*{p}), '
             f'bpf_map__btf_value_type_id(m) ? "true" : "false");']
    # sizeof(struct) as the size of bpf_map__set_initial_value, as upstream's test does: a copy of the image
    lines += ["\t\t{", f"\t\t\tvoid *copy = calloc(1, sizeof(*{p}) + sz + 1);",
              "\t\t\tif (iv) memcpy(copy, iv, sz);",
              f'\t\t\tprintf(",\\"set_initial_value_sizeof\\":%d", bpf_map__set_initial_value(m, copy, '
              f"sizeof(*{p})));", "\t\t\tfree(copy);", "\t\t}"]
    if section in plan.writes:
        lines += _member_writes(facts, section, plan.writes[section], p, "\t\t")
    if section in plan.resize:
        size = plan.resize[section]
        lines += ["\t\t{", f"\t\t\tint rc = bpf_map__set_value_size(m, {size});",
                  "\t\t\tsize_t nsz = 0;", "\t\t\tvoid *niv = bpf_map__initial_value(m, &nsz);",
                  '\t\t\tprintf(",\\"resize\\":{\\"rc\\":%d,\\"value_size\\":%u,\\"btf_value_type\\":%s,'
                  '\\"initial_value_size\\":%zu,\\"image\\":", rc, bpf_map__value_size(m), '
                  'bpf_map__btf_value_type_id(m) ? "true" : "false", nsz);',
                  "\t\t\tif (niv) hex(niv, nsz); else printf(\"null\");", '\t\t\tprintf("}");', "\t\t}"]
    lines += ['\t\tprintf("}");', "\t}"]
    return lines


def _after_load_block(section: str, plan: SkeletonPlan, phase: str) -> list[str]:
    ident = section_ident(section)
    m, p = f"skel->maps.{ident}", f"skel->{ident}"
    out = [f"\t/* {section}, {phase} */", "\t{", f"\t\tstruct bpf_map *m = {m};",
           "\t\tsize_t vs = bpf_map__value_size(m), sz = 0;", "\t\tunsigned int key = 0;",
           f'\t\tprintf("%s\\"{section}\\":{{", first_map ? "" : ",");', "\t\tfirst_map = 0;"]
    if phase == "loaded":
        out += ["\t\tvoid *iv = bpf_map__initial_value(m, &sz);",
                f'\t\tprintf("\\"skel_loaded\\":%s,\\"initial_value_is_skel_loaded\\":%s,'
                f'\\"image_writable_loaded\\":%s,\\"cpus_loaded\\":", {p} ? "true" : "false", '
                f'iv && iv == (void *){p} ? "true" : "false", {p} ? (writable((void *){p}) ? "true" : "false") '
                f': "null");',
                "\t\tper_cpu(m, ncpu);"]
    else:
        flags_both = BPF_F_CPU | BPF_F_ALL_CPUS
        out += ["\t\tunsigned char *buf = calloc(ncpu, ((vs + 7) & ~7UL) + 8);",
                '\t\tprintf("\\"cpus_after_runs\\":");', "\t\tper_cpu(m, ncpu);",
                f'\t\tprintf(",\\"both_flags\\":%d", bpf_map__lookup_elem(m, &key, 4, buf, vs, {flags_both}));',
                f'\t\tprintf(",\\"short_buffer\\":%d", bpf_map__lookup_elem(m, &key, 4, buf, vs + 1, {BPF_F_CPU}));',
                f'\t\tprintf(",\\"both_flags_kernel\\":%d", bpf_map_lookup_elem_flags(bpf_map__fd(m), &key, buf, '
                f"{flags_both}) ? -errno : 0);",
                f'\t\tprintf(",\\"cpu_out_of_range\\":%d", bpf_map__lookup_elem(m, &key, 4, buf, vs, '
                f"{BPF_F_CPU} | ((__u64){CPU_OUT_OF_RANGE} << 32)));"]
        if section == plan.iterate_section:
            out += _iter_block(plan.iterate_offset)
        if section in plan.all_cpus:
            value = plan.all_cpus[section]
            out += [f"\t\tunhex({_c_bytes(value)}, w, {len(value)});",
                    f'\t\tprintf(",\\"all_cpus_update\\":%d,\\"cpus_after_all_cpus\\":", '
                    f"bpf_map__update_elem(m, &key, 4, w, vs, {BPF_F_ALL_CPUS}));", "\t\tper_cpu(m, ncpu);"]
        if section in plan.one_cpu:
            cpu, value = plan.one_cpu[section]
            out += [f"\t\tunhex({_c_bytes(value)}, w, {len(value)});",
                    f'\t\tprintf(",\\"cpu_update\\":%d,\\"cpus_after_cpu_update\\":", '
                    f"bpf_map__update_elem(m, &key, 4, w, vs, {BPF_F_CPU} | ((__u64){cpu} << 32)));",
                    "\t\tper_cpu(m, ncpu);"]
        out += ["\t\tsize_t full = ncpu * ((vs + 7) & ~7UL);",
                '\t\tprintf(",\\"full_lookup\\":");',
                "\t\tif (bpf_map__lookup_elem(m, &key, 4, buf, full, 0) == 0) hex(buf, full); else printf(\"null\");",
                "\t\tfree(buf);"]
    out += ['\t\tprintf("}");', "\t}"]
    return out


def harness_source(name: str, facts: ObjectFacts, plan: SkeletonPlan, percpu: list[str],
                   plain: str | None, programs: list[str]) -> str:
    biggest = max([len(v) for v in [*plan.writes.values(), *plan.all_cpus.values(), plan.rdonly or b""]]
                  + [len(v) for _, v in plan.one_cpu.values()] + [8])
    # the UAPI numbers come from the suite's one owner: the system's linux/bpf.h may predate them
    lines = [_PRELUDE.replace("@BPF_F_CPU@", str(BPF_F_CPU)), '#include "types.h"', f'#include "{name}.skel.h"',
             '#include "iter.skel.h"',
             "", "int main(void)", "{",
             f"\tstatic unsigned char w[{biggest}];", "\tint ncpu = libbpf_num_possible_cpus(), first_map = 1, err;",
             "\tlibbpf_set_print(silent);",
             f"\tstruct {name} *skel = {name}__open();",
             '\tprintf("{\\"open\\":%s", skel ? "true" : "false");',
             '\tif (!skel) { printf(",\\"open_errno\\":%d}\\n", -errno); return 0; }',
             '\tprintf(",\\"maps\\":{");']
    for section in percpu:
        lines += _map_block(name, section, facts, plan)
    lines.append('\tprintf("}");')
    if not plan.load:
        lines += ['\tprintf("}\\n");', f"\t{name}__destroy(skel);", "\treturn 0;", "}", ""]
        return "\n".join(lines)
    lines += [f"\terr = {name}__load(skel);", '\tprintf(",\\"load\\":%d", err);',
              f'\tif (err) {{ printf("}}\\n"); {name}__destroy(skel); return 0; }}',
              '\tprintf(",\\"loaded\\":{");', "\tfirst_map = 1;"]
    for section in percpu:
        lines += _after_load_block(section, plan, "loaded")
    lines += ['\tprintf("}");', '\tprintf(",\\"runs\\":[");']
    for i, (prog, cpu, count) in enumerate(r for r in plan.runs if r[0] in programs):
        lines += ["\t{", f"\t\tLIBBPF_OPTS(bpf_test_run_opts, o, .flags = BPF_F_TEST_RUN_ON_CPU, .cpu = {cpu});",
                  f'\t\tprintf("{"," if i else ""}{{\\"program\\":\\"{prog}\\",\\"cpu\\":{cpu},\\"retval\\":[");',
                  f"\t\tfor (int k = 0; k < {count}; k++) {{",
                  f"\t\t\tint rc = bpf_prog_test_run_opts(bpf_program__fd(skel->progs.{prog}), &o);",
                  '\t\t\tif (k) putchar(\',\');',
                  '\t\t\tif (rc) printf("%d", rc); else printf("%u", o.retval);', "\t\t}",
                  '\t\tprintf("]}");', "\t}"]
    lines += ['\tprintf("],\\"after\\":{");', "\tfirst_map = 1;"]
    for section in percpu:
        lines += _after_load_block(section, plan, "after")
    lines.append('\tprintf("}");')
    if plain is not None:
        ident = section_ident(plain)
        lines += ["\t{", "\t\tunsigned int key = 0;",
                  f"\t\tunsigned char *buf = calloc(1, bpf_map__value_size(skel->maps.{ident}) + 8);",
                  f'\t\tprintf(",\\"plain_map_cpu_flag\\":%d", bpf_map_lookup_elem_flags(bpf_map__fd('
                  f"skel->maps.{ident}), &key, buf, {BPF_F_CPU}) ? -errno : 0);", "\t\tfree(buf);", "\t}"]
    if plan.rdonly is not None:
        lines += _rdonly_block(plan.rdonly)
    if plan.const_strings is not None:
        lines += _const_string_block(plan.const_strings, CONST_STRING_PROGRAMS)
    lines += ['\tprintf("}\\n");', f"\t{name}__destroy(skel);", "\treturn 0;", "}", ""]
    return "\n".join(lines)


def _insns(program: list[Insn]) -> str:
    return ", ".join(f"0x{b:02x}" for b in encode(program))


def _iter_block(offset: int) -> list[str]:
    """Upstream's iter subtest: the iterator's rodata set through its skeleton before load, attached to this
    map, read to the end; its sum and the number of elements it saw."""
    return ["\t\t{", "\t\t\tstruct iter *it = iter__open();", "\t\t\tint done = -1;",
            "\t\t\tif (it) {", "\t\t\t\tit->rodata->num_cpus = ncpu;",
            f"\t\t\t\tit->rodata->off = {offset};", "\t\t\t\tit->rodata->stride = (vs + 7) & ~7UL;",
            "\t\t\t\tdone = iter__load(it);", "\t\t\t}",
            "\t\t\tif (done == 0) {", "\t\t\t\tunion bpf_iter_link_info li;", "\t\t\t\tmemset(&li, 0, sizeof(li));",
            "\t\t\t\tli.map.map_fd = bpf_map__fd(m);",
            "\t\t\t\tLIBBPF_OPTS(bpf_iter_attach_opts, ao, .link_info = &li, .link_info_len = sizeof(li));",
            "\t\t\t\tstruct bpf_link *link = bpf_program__attach_iter(it->progs.sum_over_cpus, &ao);",
            "\t\t\t\tint ifd = link ? bpf_iter_create(bpf_link__fd(link)) : -1;", "\t\t\t\tchar sink[256];",
            "\t\t\t\tif (ifd >= 0) { while (read(ifd, sink, sizeof(sink)) > 0) ; close(ifd); }",
            '\t\t\t\tprintf(",\\"iterator\\":{\\"attached\\":%s,\\"sum\\":%llu,\\"elems\\":%u}", '
            'ifd >= 0 ? "true" : "false", (unsigned long long)it->bss->sum, it->bss->elems);',
            "\t\t\t\tbpf_link__destroy(link);", "\t\t\t} else {",
            '\t\t\t\tprintf(",\\"iterator\\":{\\"attached\\":false,\\"load\\":%d}", done);', "\t\t\t}",
            "\t\t\titer__destroy(it);", "\t\t}"]


def _const_string_block(obj: str, programs: tuple[str, ...]) -> list[str]:
    """Upstream's verifier_log subtest through libbpf: each `?` program of the const-string object loaded on
    purpose, alone, with its verifier log."""
    out = ['\tprintf(",\\"const_strings\\":{");']
    for i, prog in enumerate(programs):
        out += ["\t{", f'\t\tstruct bpf_object *o = bpf_object__open_file("{obj}", NULL);',
                "\t\tstatic char log[65536];", "\t\tint e = -1;", "\t\tlog[0] = 0;", "\t\tif (o) {",
                "\t\t\tstruct bpf_program *p;",
                "\t\t\tbpf_object__for_each_program(p, o)",
                f'\t\t\t\tbpf_program__set_autoload(p, strcmp(bpf_program__name(p), "{prog}") == 0);',
                f'\t\t\tp = bpf_object__find_program_by_name(o, "{prog}");',
                "\t\t\tbpf_program__set_log_buf(p, log, sizeof(log));", "\t\t\tbpf_program__set_log_level(p, 1);",
                "\t\t\te = bpf_object__load(o);", "\t\t}",
                f'\t\tprintf("{"," if i else ""}\\"{prog}\\":{{\\"open\\":%s,\\"load\\":%d,\\"log\\":", '
                'o ? "true" : "false", e);',
                "\t\tjstr(log);", '\t\tprintf("}");', "\t\tbpf_object__close(o);", "\t}"]
    return [*out, '\tprintf("}");']


def _rdonly_block(value: bytes) -> list[str]:
    """Upstream's rdonly_direct_read/_write on a map the suite makes: one BPF_F_ALL_CPUS update, freeze, then
    an 8-byte direct read (must load) and an 8-byte direct write (must be refused) of its value."""
    read = [*I.ld_map_value(1, 0, 0), I.ldx_mem(I.BPF_DW, 0, 1, 0), I.exit_insn()]
    write = [*I.ld_map_value(1, 0, 0), I.st_mem(I.BPF_DW, 1, 0, 1), I.mov64_imm(0, 0), I.exit_insn()]
    out = ["\t{", f'\t\tLIBBPF_OPTS(bpf_map_create_opts, mo, .map_flags = {BPF_F_RDONLY_PROG});',
           f'\t\tint fd = bpf_map_create({BPF_MAP_TYPE_PERCPU_ARRAY}, "percpu_ro_map", 4, {len(value)}, 1, &mo);',
           "\t\tunsigned int key = 0;", f"\t\tunsigned char *buf = calloc(1, {len(value)} + 8);",
           f"\t\tunhex({_c_bytes(value)}, w, {len(value)});",
           '\t\tprintf(",\\"rdonly\\":{\\"create\\":%d", fd < 0 ? -errno : 0);',
           f'\t\tprintf(",\\"all_cpus_update\\":%d", bpf_map_update_elem(fd, &key, w, {BPF_F_ALL_CPUS}) ? -errno : 0);',
           '\t\tprintf(",\\"freeze\\":%d", bpf_map_freeze(fd) ? -errno : 0);',
           '\t\tprintf(",\\"cpus\\":[");',
           "\t\tfor (int cpu = 0; cpu < ncpu; cpu++) {",
           f"\t\t\tint e = bpf_map_lookup_elem_flags(fd, &key, buf, {BPF_F_CPU} | ((__u64)cpu << 32)) ? -errno : 0;",
           "\t\t\tif (cpu) putchar(',');", f"\t\t\tif (e) printf(\"%d\", e); else hex(buf, {len(value)});", "\t\t}",
           '\t\tprintf("]");',
           f'\t\tprintf(",\\"update_frozen\\":%d}}", bpf_map_update_elem(fd, &key, w, {BPF_F_ALL_CPUS}) ? -errno : 0);']
    for label, prog in (("read_prog", read), ("write_prog", write)):
        out += ["\t\t{", f"\t\t\tstatic unsigned char code[] = {{{_insns(prog)}}};",
                "\t\t\tstruct bpf_insn *insns = (struct bpf_insn *)code;", "\t\t\tchar log[4096] = \"\";",
                "\t\t\tLIBBPF_OPTS(bpf_prog_load_opts, po, .log_buf = log, .log_size = sizeof(log), .log_level = 1);",
                "\t\t\tinsns[0].imm = fd;",
                f'\t\t\tint pfd = bpf_prog_load({SOCKET_FILTER}, "{label}", "GPL", insns, sizeof(code) / 8, &po);',
                f'\t\t\tprintf(",\\"{label}\\":{{\\"loaded\\":%s,\\"errno\\":%d,\\"write_forbidden\\":%s}}", '
                'pfd >= 0 ? "true" : "false", pfd >= 0 ? 0 : errno, '
                'strstr(log, "write into map forbidden") ? "true" : "false");',
                "\t\t\tif (pfd >= 0) close(pfd);", "\t\t}"]
    return [*out, "\t\tclose(fd);", "\t\tfree(buf);", "\t}"]


def _run(argv: list[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:  # noqa: ANN401
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    except FileNotFoundError:
        raise BackendUnavailable(f"{what} not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise BackendUnavailable(f"{what} timed out after {TIMEOUT:g}s") from None


class HarnessError(RuntimeError):
    """bpftool could not generate the skeleton, or the harness did not compile: `kind` says which, as the
    report's `harness` field ("bpftool_failed", "size_assert_failed", "compile_error")."""

    def __init__(self, message: str, kind: str = "bpftool_failed") -> None:
        super().__init__(message)
        self.kind = kind
        self.mismatched_types: list[str] = []  # "struct t5: C 13, BTF 16": the dumped C disagrees with BTF


def dumped_type_mismatches(facts: ObjectFacts, workdir: Path, cc: str = "gcc") -> list[str]:
    """Named structs and unions whose C, as `bpftool btf dump format c` wrote it (types.h), has another size
    than the object's BTF gives: the cause of a skeleton's failed size assertion, if that is it."""
    if facts.btf_data is None or not (workdir / "types.h").exists():
        return []
    types = Btf.parse(facts.btf_data).types
    dumped = (workdir / "types.h").read_text()
    missing = [f"{t.kind} {t.name}: not in the dump" for t in types
               if t.kind in ("enum", "enum64", "struct", "union") and t.name
               and not re.search(rf"^{'enum' if t.kind == 'enum64' else t.kind} {re.escape(t.name)} {{", dumped, re.M)]
    records = [(t.kind, t.name, t.size) for t in types
               if t.kind in ("struct", "union") and t.name and f"{t.kind} {t.name}: not in the dump" not in missing]
    if not records:
        return missing
    body = [f'\tprintf("{k} {n} %zu {size}\\n", sizeof({k} {n}));' for k, n, size in records]
    source = workdir / "type_sizes.c"
    source.write_text("\n".join(["#include <stdio.h>", '#include "types.h"', "int main(void)", "{", *body,
                                  "\treturn 0;", "}", ""]))
    exe = workdir.resolve() / "type_sizes"
    if _run([cc, "-w", "-o", str(exe), str(source)], "C compiler").returncode != 0:
        return missing
    out = list(missing)
    for line in _run([str(exe)], "type sizes").stdout.splitlines():
        kind, name, c_size, btf_size = line.split()
        if c_size != btf_size:
            out.append(f"{kind} {name}: C {c_size}, BTF {btf_size}")
    return out


def build_harness(obj: Path, facts: ObjectFacts, plan: SkeletonPlan, workdir: Path, *, bpftool: Path,
                  include: Path, libbpf: Path, clang: str, cc: str = "gcc", uapi: Path | None = None) -> Harness:
    """Generate the skeleton and the program, and compile it against `libbpf` (linked by path, run-path set)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", obj.name.split(".")[0]) or "obj"
    workdir.mkdir(parents=True, exist_ok=True)
    gen = _run([str(bpftool), "gen", "skeleton", str(obj), "name", name], "bpftool")
    if gen.returncode != 0:
        raise HarnessError(f"bpftool gen skeleton: {gen.stderr.strip() or f'exit {gen.returncode}'}")
    header = workdir / f"{name}.skel.h"
    header.write_text(gen.stdout)
    # the skeleton names struct/union/enum types it does not define: the object's own BTF, dumped as C, does
    types = _run([str(bpftool), "btf", "dump", "file", str(obj), "format", "c"], "bpftool")
    if types.returncode != 0:
        raise HarnessError(f"bpftool btf dump: {types.stderr.strip() or f'exit {types.returncode}'}")
    (workdir / "types.h").write_text(types.stdout)
    iter_obj = workdir / "iter.bpf.o"
    iterator = _run([clang, "-g", "-O2", "-target", "bpf", "-c", "-x", "c", "-", "-o", str(iter_obj)], "clang",
                    input=ITER_SOURCE)
    if iterator.returncode != 0:
        raise HarnessError(f"the iterator does not compile: {iterator.stderr.strip()[-300:]}", "compile_error")
    gen_iter = _run([str(bpftool), "gen", "skeleton", str(iter_obj), "name", "iter"], "bpftool")
    if gen_iter.returncode != 0:
        raise HarnessError(f"bpftool gen skeleton (iterator): {gen_iter.stderr.strip()}")
    (workdir / "iter.skel.h").write_text(gen_iter.stdout)
    sections = [s.name for s in facts.data_sections()]
    percpu = [s for s in sections if s == ".percpu" or s.startswith(".percpu.")]
    plain = next((s for s in sections if s in (".data", ".bss") and f"}} *{section_ident(s)};" in gen.stdout), None)
    programs = [f.name for f in facts.functions if f.is_program]
    source = workdir / "harness.c"
    source.write_text(harness_source(name, facts, plan, percpu, plain, programs))
    exe = workdir / "harness"
    comp = _run([cc, "-O1", "-w", "-I", str(workdir), "-I", str(include), "-o", str(exe), str(source),
                 str(libbpf), f"-Wl,-rpath,{libbpf.parent}", "-lelf", "-lz"], "C compiler")
    if comp.returncode != 0:
        first = next((ln for ln in comp.stderr.splitlines() if "error" in ln), comp.stderr.strip())
        # bpftool's own _Static_assert on a member's size: its header and the dumped types disagree
        kind = ("incomplete_type" if "has incomplete type" in comp.stderr
                else "size_assert_failed" if "unexpected size of" in comp.stderr else "compile_error")
        error = HarnessError(f"the skeleton harness does not compile: {first}", kind)
        error.mismatched_types = dumped_type_mismatches(facts, workdir, cc)
        raise error
    light = None
    if plan.light_object is not None:
        light = build_light_harness(plan, facts, workdir, bpftool=bpftool, include=include, libbpf=libbpf, cc=cc,
                                    uapi=uapi)
    return Harness(exe, header, source, light)


def light_harness_source(name: str, facts: ObjectFacts, plan: SkeletonPlan, percpu: list[str],
                         programs: list[str]) -> str:
    """Upstream's lskel subtest over this layout: open, write each exposed variable through the light
    skeleton's struct, load (gen_loader: IDX_VALUE relocations, one BPF_F_ALL_CPUS update of the image), read
    every possible CPU through the map fd, run, read again."""
    lines = [_PRELUDE.replace("@BPF_F_CPU@", str(BPF_F_CPU)), '#include "types.h"', f'#include "{name}.lskel.h"', "",
             "static void per_cpu_fd(int fd, size_t vs, int ncpu)", "{",
             "\tunsigned char *buf = calloc(1, vs + 8);", "\tunsigned int key = 0;", "\tputchar('[');",
             "\tfor (int cpu = 0; cpu < ncpu; cpu++) {",
             f"\t\tint e = bpf_map_lookup_elem_flags(fd, &key, buf, {BPF_F_CPU} | ((__u64)cpu << 32)) ? -errno : 0;",
             "\t\tif (cpu) putchar(',');", "\t\tif (e) printf(\"%d\", e); else hex(buf, vs);", "\t}",
             "\tputchar(']');", "\tfree(buf);", "}", "", "int main(void)", "{",
             f"\tstatic unsigned char w[{max([len(v) for v in plan.writes.values()] + [8])}];",
             "\tint ncpu = libbpf_num_possible_cpus(), err;",
             f"\tstruct {name} *skel = {name}__open();",
             '\tprintf("{\\"open\\":%s", skel ? "true" : "false");',
             '\tif (!skel) { printf("}\\n"); return 0; }']
    for section in percpu:
        ident = section_ident(section)
        if section in plan.writes:
            lines += _member_writes(facts, section, plan.writes[section], f"skel->{ident}", "\t")
    lines += [f"\terr = {name}__load(skel);", '\tprintf(",\\"load\\":%d", err);',
              f'\tif (err) {{ printf("}}\\n"); {name}__destroy(skel); return 0; }}', '\tprintf(",\\"maps\\":{");']
    sizes = {s.name: s.size for s in facts.data_sections()}
    for i, section in enumerate(percpu):
        ident = section_ident(section)
        lines += [f'\tprintf("{"," if i else ""}\\"{section}\\":{{\\"cpus_loaded\\":");',
                  f"\tper_cpu_fd(skel->maps.{ident}.map_fd, {sizes[section]}, ncpu);", '\tprintf("}");']
    lines += ['\tprintf("},\\"runs\\":[");']
    for i, (prog, cpu, count) in enumerate(r for r in plan.runs if r[0] in programs):
        lines += ["\t{", f"\t\tLIBBPF_OPTS(bpf_test_run_opts, o, .flags = BPF_F_TEST_RUN_ON_CPU, .cpu = {cpu});",
                  f'\t\tprintf("{"," if i else ""}{{\\"program\\":\\"{prog}\\",\\"cpu\\":{cpu},\\"retval\\":[");',
                  f"\t\tfor (int k = 0; k < {count}; k++) {{",
                  f"\t\t\tint rc = bpf_prog_test_run_opts(skel->progs.{prog}.prog_fd, &o);",
                  "\t\t\tif (k) putchar(',');", '\t\t\tif (rc) printf("%d", rc); else printf("%u", o.retval);',
                  "\t\t}", '\t\tprintf("]}");', "\t}"]
    lines += ['\tprintf("],\\"after\\":{");']
    for i, section in enumerate(percpu):
        ident = section_ident(section)
        lines += [f'\tprintf("{"," if i else ""}\\"{section}\\":{{\\"cpus_after_runs\\":");',
                  f"\tper_cpu_fd(skel->maps.{ident}.map_fd, {sizes[section]}, ncpu);", '\tprintf("}");']
    lines += ['\tprintf("}}\\n");', f"\t{name}__destroy(skel);", "\treturn 0;", "}", ""]
    return "\n".join(lines)


def build_light_harness(plan: SkeletonPlan, facts: ObjectFacts, workdir: Path, *, bpftool: Path, include: Path,
                        libbpf: Path, cc: str = "gcc", uapi: Path | None = None) -> Path:
    """`bpftool gen skeleton -L` of the plan's light object (the same program with its raw_tp sections named:
    bpftool crashes on a bare raw_tp, docs/findings.md#bpftool-lskel-bare-raw-tp) and its program."""
    assert plan.light_object is not None
    obj = Path(plan.light_object)
    name = (re.sub(r"[^A-Za-z0-9_]", "_", obj.name.split(".")[0]) or "obj") + "_lskel"
    gen = _run([str(bpftool), "gen", "skeleton", "-L", str(obj), "name", name], "bpftool")
    if gen.returncode != 0:
        raise HarnessError(f"bpftool gen skeleton -L: {gen.stderr.strip() or f'exit {gen.returncode}'}",
                           "light_bpftool_failed")
    (workdir / f"{name}.lskel.h").write_text(gen.stdout)
    sections = [s.name for s in facts.data_sections()]
    percpu = [s for s in sections if s == ".percpu" or s.startswith(".percpu.")]
    programs = [f.name for f in facts.functions if f.is_program]
    source = workdir / "light.c"
    source.write_text(light_harness_source(name, facts, plan, percpu, programs))
    exe = workdir / "light"
    # skel_internal.h wants the UAPI of its own kernel (bpf_attr's newest fields), not the system's older one
    uapi_dirs = ["-I", str(uapi)] if uapi is not None else []
    comp = _run([cc, "-O1", "-w", "-I", str(workdir), "-I", str(include), *uapi_dirs, "-o", str(exe), str(source),
                 str(libbpf), f"-Wl,-rpath,{libbpf.parent}", "-lelf", "-lz"], "C compiler")
    if comp.returncode != 0:
        first = next((ln for ln in comp.stderr.splitlines() if "error" in ln), comp.stderr.strip())
        raise HarnessError(f"the light-skeleton harness does not compile: {first}", "light_compile_error")
    return exe


def parse_light_report(stdout: str) -> dict[str, Any]:
    try:
        doc = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise HarnessError(f"the light-skeleton harness printed no report: {stdout[-300:]!r}") from None
    for section, fields in doc.pop("after", {}).items():
        doc.setdefault("maps", {}).setdefault(section, {}).update(fields)
    return dict(doc)


def parse_report(stdout: str) -> dict[str, Any]:
    try:
        doc = json.loads(stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise HarnessError(f"the skeleton harness printed no report: {stdout[-300:]!r}") from None
    # one document per map: what was seen at open, after load and after the runs, merged by section
    maps = doc.get("maps", {})
    for phase in ("loaded", "after"):
        for section, fields in doc.pop(phase, {}).items():
            maps.setdefault(section, {}).update(fields)
    for prog, run in doc.get("const_strings", {}).items():
        log = run.pop("log", "")
        run["message_class"] = classify(log.splitlines(), -int(run["load"])) if run["load"] else None
        doc["const_strings"][prog] = run
    doc["harness"] = "compiles"
    return dict(doc)


def run_harness(harness: Harness) -> dict[str, Any]:
    """Run it on this machine's kernel."""
    out = _run([str(harness.executable)], "skeleton harness")
    if out.returncode != 0:
        raise HarnessError(f"the skeleton harness exited {out.returncode}: {out.stderr.strip()[-300:]}")
    return parse_report(out.stdout)
