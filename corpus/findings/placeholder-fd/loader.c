// SPDX-License-Identifier: GPL-2.0
/* Load OBJ with libbpf and show what each map's bpf_map__fd refers to; with REUSE_OBJ, hand OBJ's .percpu fd to
 * REUSE_OBJ's .percpu map through bpf_map__reuse_fd and show the definition it takes; with -n, clear the .percpu
 * map's autocreate before load, as the user may (the path libbpf's comment describes).
 * usage: loader OBJ [REUSE_OBJ | -n] */
#include <string.h>
#include <bpf/libbpf.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

static int print_all(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	return vfprintf(stderr, fmt, ap);
}

static void show_fd(const char *what, int fd)
{
	char path[64], target[256];
	ssize_t n = -1;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	if (fd >= 0)
		n = readlink(path, target, sizeof(target) - 1);
	target[n > 0 ? n : 0] = '\0';
	printf("%s: bpf_map__fd = %d -> %s\n", what, fd, n > 0 ? target : "-");
}

int main(int argc, char **argv)
{
	struct bpf_object *obj, *other;
	struct bpf_map *map, *reused;
	int err;

	if (argc < 2) {
		fprintf(stderr, "usage: %s OBJ [REUSE_OBJ | -n]\n", argv[0]);
		return 2;
	}
	libbpf_set_print(print_all);
	obj = bpf_object__open_file(argv[1], NULL);
	if (!obj) {
		perror("bpf_object__open_file");
		return 2;
	}
	if (argc > 2 && strcmp(argv[2], "-n") == 0) {
		bpf_map__set_autocreate(bpf_object__find_map_by_name(obj, ".percpu"), false);
		argc = 2;
	}
	err = bpf_object__load(obj);
	printf("bpf_object__load(%s) = %d\n", argv[1], err);
	bpf_object__for_each_map(map, obj)
		show_fd(bpf_map__name(map), bpf_map__fd(map));
	if (argc > 2 && !err) {
		other = bpf_object__open_file(argv[2], NULL);
		if (!other) {
			perror("bpf_object__open_file");
			return 2;
		}
		reused = bpf_object__find_map_by_name(other, ".percpu");
		map = bpf_object__find_map_by_name(obj, ".percpu");
		err = bpf_map__reuse_fd(reused, bpf_map__fd(map));
		printf("bpf_map__reuse_fd(%s .percpu, fd %d) = %d: type %d, key_size %u, value_size %u, max_entries %u\n",
		       argv[2], bpf_map__fd(map), err, bpf_map__type(reused), bpf_map__key_size(reused),
		       bpf_map__value_size(reused), bpf_map__max_entries(reused));
		bpf_object__close(other);
	}
	bpf_object__close(obj);
	return 0;
}
