/* The same per-CPU global, referenced by no program: the object loads, and its .percpu map is never created. */
int hits __attribute__((section(".percpu"), used)) = 1;
int plain __attribute__((section(".data"), used)) = 2;

__attribute__((section("raw_tp"), used)) int touch(void *ctx)
{
	plain += 1;
	return 0;
}

char LICENSE[] __attribute__((section("license"), used)) = "GPL";
