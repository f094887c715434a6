/* Two types whose BTF size the dumped C does not keep, each in a .percpu variable a skeleton exposes. */
typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned int __u32;
typedef signed int __s32;

#define SEC(name) __attribute__((section(name), used))

struct packed_tail {
	__s8 f0;
	__u32 f1;
} __attribute__((packed, aligned(16)));	/* BTF: size 16, f1 at byte 1 */

union over_aligned {
	__s32 f0 __attribute__((aligned(8)));
	__u8 f1 __attribute__((aligned(16)));
};	/* BTF: size 16, largest member 4 bytes */

struct packed_tail pt SEC(".percpu");
union over_aligned ou SEC(".percpu");

SEC("raw_tp") int touch(void *ctx)
{
	pt.f0 = 1;
	ou.f0 = 2;
	return 0;
}

char _license[] SEC("license") = "GPL";
