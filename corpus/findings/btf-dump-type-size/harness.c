/* what a skeleton user compiles: the dumped types, then bpftool's header (its _Static_asserts fire) */
#include "types.h"
#include "types.skel.h"

int main(void)
{
	struct types *skel = types__open_and_load();

	return skel == NULL;
}
