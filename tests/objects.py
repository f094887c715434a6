"""C text shared by the tests that compile small hand-written BPF objects."""

PRELUDE = """\
#define SEC(n) __attribute__((section(n), used))
typedef unsigned int __u32; typedef unsigned long long __u64;
static __u32 (*bpf_get_smp_processor_id)(void) = (void *) 8;
char _license[] SEC("license") = "GPL";
"""
