/* sizeof of each type as `bpftool btf dump file types.bpf.o format c` wrote it (types.h) */
#include <stdio.h>
#include "types.h"

int main(void)
{
	printf("struct packed_tail: C %zu, BTF 16\n", sizeof(struct packed_tail));
	printf("union over_aligned: C %zu, BTF 16\n", sizeof(union over_aligned));
	return sizeof(struct packed_tail) != 16 || sizeof(union over_aligned) != 16;
}
