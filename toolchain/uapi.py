"""Numbers of the BPF UAPI (include/uapi/linux/bpf.h) the suite uses, in one place. Every model and backend reads
them from here: the oracle, the simulator and the kernel backend share numbers, never behaviour."""

from __future__ import annotations

BPF_OBJ_NAME_LEN = 16

# enum bpf_map_type (the ones the suite creates)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_HASH_OF_MAPS = 13

# map_flags of BPF_MAP_CREATE
BPF_F_NO_PREALLOC = 0x1
BPF_F_NUMA_NODE = 0x4
BPF_F_RDONLY = 0x8
BPF_F_WRONLY = 0x10
BPF_F_RDONLY_PROG = 0x80
BPF_F_WRONLY_PROG = 0x100
BPF_F_MMAPABLE = 0x400
BPF_F_PRESERVE_ELEMS = 0x800
BPF_F_INNER_MAP = 0x1000
BPF_F_TOKEN_FD = 0x10000

# flags of element lookup/update; with BPF_F_CPU the target CPU goes in the upper 32 bits
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4
BPF_F_CPU = 8
BPF_F_ALL_CPUS = 16

# BPF_PROG_TEST_RUN flags
BPF_F_TEST_RUN_ON_CPU = 1 << 0
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
