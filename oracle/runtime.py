"""The C meaning of a model's operations, executed on byte images: one image per section, one per CPU for
per-CPU sections. This is the oracle's runtime truth; it knows nothing of eBPF."""

from __future__ import annotations

from generators.ctype import decode, encode, wrap
from generators.model import Access, Add, Branch, Call, Copy, Op, ProgramModel, Store, StoreCpu, TailCall
from toolchain.elf import ObjectFacts

# The kernel's MAX_TAIL_CALL_CNT: past it bpf_tail_call fails and the caller goes on [V: include/linux/bpf.h].
MAX_TAIL_CALLS = 33


class Machine:
    def __init__(self, model: ProgramModel, facts: ObjectFacts, possible_cpus: int) -> None:
        self.model = model
        self.possible_cpus = possible_cpus
        self.images: dict[str, list[bytearray]] = {}  # section -> one image, or one per possible CPU
        self.percpu: dict[str, bool] = {}
        self.tail_calls = 0
        self.current = ""  # the program running: a replaced function is replaced in that program only
        # (program, function) -> (the extension's machine, the extension program): what freplace attached
        self.replacements: dict[tuple[str, str], tuple[Machine, str]] = {}
        self.offsets = {}
        for v in model.variables:
            sym = facts.variable_symbol(v.section, v.name)
            if sym is not None:
                self.offsets[v.name] = sym.value

    def add_section(self, section: str, image: bytearray, *, percpu: bool) -> None:
        copies = self.possible_cpus if percpu else 1
        # every possible CPU starts from the same image [V]
        self.images[section] = [bytearray(image) for _ in range(copies)]
        self.percpu[section] = percpu

    def snapshot(self, section: str, value_size: int) -> list[str]:
        return [bytes(img[:value_size]).ljust(value_size, b"\0").hex() for img in self.images[section]]

    def run(self, function: str, cpu: int) -> None:
        """One test run of a program on `cpu`; a tail call continues in its target on the same CPU."""
        self.tail_calls = 0
        self.current = function
        self._ops(self.model.function(function).ops, cpu)

    def _where(self, access: Access, cpu: int) -> tuple[bytearray, int, int]:
        var = self.model.variable(access.var)
        slot = self.model.slot(access)
        images = self.images.get(var.section)
        if images is None:  # a section no loader maps: its accesses never reach a loaded program
            images = self.images[var.section] = [bytearray(self.offsets[var.name] + var.type.size)]
            self.percpu[var.section] = False
        image = images[cpu] if self.percpu[var.section] else images[0]
        return image, self.offsets[var.name] + slot.offset, slot.type.size

    def read(self, access: Access, cpu: int) -> int:
        image, off, size = self._where(access, cpu)
        return decode(bytes(image[off:off + size]), self.model.leaf(access))

    def write(self, access: Access, cpu: int, value: int) -> None:
        image, off, size = self._where(access, cpu)
        leaf = self.model.leaf(access)
        image[off:off + size] = encode(wrap(value, leaf), leaf)

    def _ops(self, ops: tuple[Op, ...], cpu: int) -> bool:
        """Run `ops`; True when a tail call took over, which ends every enclosing level too."""
        for op in ops:
            if isinstance(op, Store):
                self.write(op.dst, cpu, op.value)
            elif isinstance(op, Add):
                self.write(op.dst, cpu, self.read(op.dst, cpu) + op.value)
            elif isinstance(op, Copy):
                self.write(op.dst, cpu, self.read(op.src, cpu))
            elif isinstance(op, StoreCpu):
                self.write(op.dst, cpu, cpu)
            elif isinstance(op, Branch):
                taken = self.read(op.cond, cpu) > op.threshold
                if self._ops(op.then if taken else op.orelse, cpu):
                    return True
            elif isinstance(op, Call):
                ext = self.replacements.get((self.current, op.function))
                if ext is not None:  # the extension runs instead, on its own object's variables
                    machine, name = ext
                    machine._ops(machine.model.function(name).ops, cpu)
                elif self._ops(self.model.function(op.function).ops, cpu):
                    return True
            elif isinstance(op, TailCall):
                if self.tail_calls >= MAX_TAIL_CALLS:
                    continue  # the helper fails and returns to the caller
                self.tail_calls += 1
                self.current = op.program
                self._ops(self.model.function(op.program).ops, cpu)
                return True
            else:
                raise TypeError(op)
        return False
