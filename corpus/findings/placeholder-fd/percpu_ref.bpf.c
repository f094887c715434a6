/* A per-CPU global that the only program writes: on a kernel without global percpu data (Linux <= 7.2) libbpf
 * 1.8 skips creating the .percpu map, and the program must then fail to load. */
int hits __attribute__((section(".percpu"), used)) = 1;

__attribute__((section("raw_tp"), used)) int touch(void *ctx)
{
	hits += 1;
	return 0;
}

char LICENSE[] __attribute__((section("license"), used)) = "GPL";
