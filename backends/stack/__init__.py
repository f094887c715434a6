"""The real merged stack (a Debian kernel, libbpf and bpftool built from its source), provisioned into the cache."""

from backends.stack.provision import DEFAULT_STACK, StackPaths, StackUnavailable, stack_paths

__all__ = ["DEFAULT_STACK", "StackPaths", "StackUnavailable", "stack_paths"]
