"""A `.percpu.fmt` string as a const string (upstream's verifier_log subtest, audit §B6, §D1 #23-#24): a static
const char array in a per-CPU section, handed to bpf_snprintf as its format and to bpf_strncmp as its constant
string, each from a `?kprobe` program, so libbpf loads neither unless asked. The verifier must refuse both."""

from __future__ import annotations

from schema.skeleton import CONST_STRING_PROGRAMS

SOURCE = r"""
typedef unsigned int __u32;
typedef unsigned long long __u64;
#define SEC(name) __attribute__((section(name), used))

static long (*bpf_snprintf)(char *str, __u32 str_size, const char *fmt, __u64 *data, __u32 data_len) = (void *)165;
static long (*bpf_strncmp)(const char *s1, __u32 s1_sz, const char *s2) = (void *)182;

static const char fmt[] SEC(".percpu.fmt") = "data %d\n";
char out[16];
__u64 args[1];

SEC("?kprobe") int fmt_snprintf(void *ctx)
{
	return bpf_snprintf(out, sizeof(out), fmt, args, sizeof(args));
}

SEC("?kprobe") int fmt_strncmp(void *ctx)
{
	return bpf_strncmp(out, sizeof(out), fmt);
}

char LICENSE[] SEC("license") = "GPL";
"""

assert all(f"int {p}(" in SOURCE for p in CONST_STRING_PROGRAMS)
