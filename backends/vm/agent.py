"""The guest side of the VM backend, run by virtme-ng inside the booted kernel.

`python -m backends.vm.agent DIR` (batch): reads DIR/requests.json, probes the guest kernel, observes each request
with the kernel backend and writes DIR/results.json (atomically: a half-written file must never pass for an
answer). A failing request becomes an error entry; only a failure outside any request is `fatal`.

`python -m backends.vm.agent --serve DIR` (persistent, docs/vm-backend.md): probes, sends its probe on the
agent's virtio-serial port (backends.vm.channel), then answers each request there, one at a time, until a
`shutdown` request or the host's end. Each answer carries the kernel's complaints (WARN, BUG, KASAN, "BPF:") read
from /dev/kmsg while that request ran. A failure before serving is written to DIR/ready.json.

Progress goes to stdout, which is the guest console the host keeps. Nothing is pinned, so bpffs is not needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from backends.vm.channel import PORT_NAME, LineChannel, find_port, unpack_file

_START = time.monotonic()


def _say(text: str) -> None:
    print(f"percpu-vm: [{time.monotonic() - _START:6.1f}s] {text}", flush=True)


def _write(directory: Path, doc: dict[str, Any], name: str = "results.json") -> None:
    # written, then renamed: the host never reads half a document. No fsync: 9p without a cache hands every
    # write to the host as it is made (what a panic could lose is the host's disk, which nothing here needs)
    tmp = directory / f"{name}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, directory / name)


def _guest_facts() -> dict[str, Any]:
    from backends.kernel import probes

    return {"kernel_release": probes.kernel_release(), "probe": probes.probe_all(),
            "btf_vmlinux": os.path.exists("/sys/kernel/btf/vmlinux"), "python": sys.version.split()[0]}


def _observe(req: dict[str, Any], libbpfs: dict[str | None, Any]) -> dict[str, Any]:
    from backends.kernel.observe import observe_libbpf, observe_raw, open_libbpf

    if "objects" in req:
        return _observe_set(req, libbpfs)
    runs = [(str(p), int(c), int(n)) for p, c, n in req.get("runs", ())]
    initial = {name: bytes.fromhex(value) for name, value in (req.get("initial_values") or {}).items()}
    if req.get("loader", "libbpf") == "raw":
        return observe_raw(req["object"], runs=runs, initial_values=initial)
    path = req.get("libbpf")
    if path not in libbpfs:
        libbpfs[path] = open_libbpf(path)
    return observe_libbpf(req["object"], libbpf=libbpfs[path], runs=runs, initial_values=initial)


def _observe_set(req: dict[str, Any], libbpfs: dict[str | None, Any]) -> dict[str, Any]:
    """An object set (docs/object-sets.md): several objects, map reuse, extension programs."""
    from backends.kernel.objectset import observe_set_libbpf, observe_set_raw
    from backends.kernel.observe import open_libbpf
    from schema.objectset import SetPlan

    plan = SetPlan(tuple(Path(p) for p in req["objects"]),
                   tuple((int(k), str(key), int(src)) for k, key, src in req.get("reuse", ())),
                   tuple((int(k), str(e), str(p), str(f)) for k, e, p, f in req.get("attach", ())),
                   tuple((str(p), int(c), int(n)) for p, c, n in req.get("runs", ())),
                   tuple({name: bytes.fromhex(v) for name, v in values.items()}
                         for values in req.get("initial_values", ())))
    if req.get("loader", "libbpf") == "raw":
        return observe_set_raw(plan)
    path = req.get("libbpf")
    if path not in libbpfs:
        libbpfs[path] = open_libbpf(path)
    return observe_set_libbpf(plan, libbpf=libbpfs[path])


def _summary(doc: dict[str, Any]) -> str:
    if "objects" in doc:
        return " | ".join(_summary(o) for o in doc["objects"])
    verdicts = [p["verdict"] for p in doc.get("programs", [])]
    if not doc.get("open", {}).get("ok", True):
        return f"open failed ({doc['open'].get('error_class')})"
    return f"{len(verdicts)} programs {'/'.join(verdicts) or '-'}, {len(doc.get('runs', []))} runs"


Indexed = list[tuple[int, dict[str, Any]]]


def _serve(shard: Indexed, total: int, libbpfs: dict[str | None, Any]) -> Indexed:
    out: Indexed = []
    for i, req in shard:
        files = req["objects"] if "objects" in req else [req["object"]]
        name = f"{i + 1}/{total} {'+'.join(os.path.basename(f) for f in files)} [{req.get('loader', 'libbpf')}]"
        try:
            doc = _observe(req, libbpfs)
        except Exception as e:  # one bad request must not cost the others their answers
            message = " ".join(str(e).split())
            out.append((i, {"error": {"type": type(e).__name__, "message": message}}))
            _say(f"{name} error: {type(e).__name__}: {message}")
            continue
        for d in [doc, *doc.get("objects", ())]:
            d["source"] = "vm"
        out.append((i, {"observation": doc}))
        _say(f"{name} {_summary(doc)}")
    return out


def _warm(requests: list[dict[str, Any]], libbpfs: dict[str | None, Any]) -> None:
    """Probe and open what every observation shares once, before forking, so no worker repeats it."""
    from backends.kernel import observe

    try:
        observe.require_bpf()
    except observe.BackendUnavailable:
        return
    observe.kernel_features()
    observe.bpftool_version()
    for path in {r.get("libbpf") for r in requests if r.get("loader", "libbpf") == "libbpf"}:
        with contextlib.suppress(observe.BackendUnavailable):  # reported per request instead
            libbpfs[path] = observe.open_libbpf(path)


def _fork_worker(shard: Indexed, total: int, libbpfs: dict[str | None, Any]) -> tuple[int, int]:
    """Serve `shard` in a child; its answers come back as JSON on the returned pipe."""
    read, write = os.pipe()
    sys.stdout.flush()  # or the child would print the parent's buffered lines again
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            answers = _serve(shard, total, libbpfs)
            with os.fdopen(write, "w") as f:
                json.dump(answers, f)
            code = 0
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(write)
    return pid, read


def run(directory: Path) -> int:
    start = time.monotonic()
    batch = json.loads((directory / "requests.json").read_text())
    requests = batch["requests"]
    guest = _guest_facts()
    probe = guest["probe"]
    _say(f"kernel {guest['kernel_release']}, {len(requests)} requests, "
         f"bpf {'usable' if probe['bpf_usable'] else 'unusable: ' + probe['bpf_unusable_reason']}")
    libbpfs: dict[str | None, Any] = {}
    _warm(requests, libbpfs)
    _say("loaders ready")
    # Observations of different objects share nothing in the kernel, so by default one worker per vCPU runs
    # them side by side: under emulation the Python around each observation costs more than the kernel work.
    workers = max(1, min(batch.get("workers") or len(probe["online_cpus"]), len(requests)))
    indexed = list(enumerate(requests))
    shards = [indexed[k::workers] for k in range(workers)]
    children = [(*_fork_worker(shard, len(requests), libbpfs), shard) for shard in shards[1:]]
    answers = dict(_serve(shards[0], len(requests), libbpfs))
    for pid, read, shard in children:
        with os.fdopen(read) as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        try:
            answers.update((i, doc) for i, doc in json.loads(data))
        except ValueError:
            for i, _ in shard:
                answers[i] = {"error": {"type": "WorkerDied",
                                        "message": f"guest worker ended with wait status {status} before answering"}}
    guest["workers"] = workers
    guest["agent_seconds"] = round(time.monotonic() - start, 3)
    _write(directory, {"guest": guest, "results": [answers[i] for i in range(len(requests))]})
    _say(f"done in {guest['agent_seconds']:.1f}s with {workers} workers")
    return 0


# -- the persistent agent ----------------------------------------------------------------------------------------

# What BPF CI greps dmesg for: a kernel complaint while a request ran fails that request's example.
SPLAT = re.compile(r"(WARNING:|BUG:|KASAN|Oops|general protection fault|kernel BUG|\bBPF:)")
_KMSG = "/dev/kmsg"


class KernelLog:
    """The kernel log since the last `drain`: /dev/kmsg opened non-blocking at its end."""

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open(_KMSG, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None

    def drain(self) -> list[str]:
        lines = []
        while self.fd is not None:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # overwritten records: go on from the next one
                    continue
                break
            if not record:
                break
            _, _, text = record.decode(errors="replace").partition(";")
            lines.append(text.split("\n", 1)[0])
        return lines


def _set_jit(enabled: bool) -> None:
    """Switch the JIT (net.core.bpf_jit_enable) for the requests that follow."""
    from backends.kernel import probes

    if probes.jit_enabled() == enabled:
        return
    with open("/proc/sys/net/core/bpf_jit_enable", "w") as f:
        f.write("1" if enabled else "0")
    if probes.jit_enabled() != enabled:
        raise RuntimeError(f"bpf_jit_enable did not become {int(enabled)} (CONFIG_BPF_JIT_ALWAYS_ON?)")


class JitWorker:
    """A child that observes with the JIT in one state only. libbpf keeps its feature probes for the life of
    the process, and so does the kernel backend: a process that saw the JIT on would answer for it when it is
    off. So each state has its own process, forked before any libbpf is loaded, as a user's fresh process."""

    def __init__(self, jit: bool) -> None:
        self.jit = jit
        parent_in, child_out = os.pipe()
        child_in, parent_out = os.pipe()
        sys.stdout.flush()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(parent_in)
            os.close(parent_out)
            code = 0
            try:
                self._serve(os.fdopen(child_in, "r"), os.fdopen(child_out, "w"))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.close(child_in)
        os.close(child_out)
        self.reader = os.fdopen(parent_in, "r")
        self.writer = os.fdopen(parent_out, "w")

    @staticmethod
    def _serve(requests: Any, answers: Any) -> None:  # noqa: ANN401 - text files
        libbpfs: dict[str | None, Any] = {}
        for line in requests:
            req = json.loads(line)
            try:
                answer = _answer(req, libbpfs)
            except Exception as e:  # one bad request must not end the worker
                answer = {"error": {"type": type(e).__name__, "message": " ".join(str(e).split())}}
            answers.write(json.dumps(answer) + "\n")
            answers.flush()

    def ask(self, req: dict[str, Any]) -> dict[str, Any]:
        self.writer.write(json.dumps(req) + "\n")
        self.writer.flush()
        line = self.reader.readline()
        if not line:
            _, status = os.waitpid(self.pid, 0)
            raise RuntimeError(f"the guest worker (JIT {'on' if self.jit else 'off'}) ended with wait status "
                               f"{status}")
        return dict(json.loads(line))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _libbpf_knows_percpu(req: dict[str, Any], libbpfs: dict[str | None, Any]) -> bool:
    """Does this libbpf open an object whose program references a .percpu variable (the host compiled it)?"""
    from backends.kernel.libbpf import LibbpfError
    from backends.kernel.observe import open_libbpf

    path = req.get("libbpf")
    if path not in libbpfs:
        libbpfs[path] = open_libbpf(path)
    try:
        with libbpfs[path].open(req["object"]):
            return True
    except LibbpfError:
        return False


def _verifier_case(req: dict[str, Any]) -> dict[str, Any]:
    from generators.model import from_jsonable
    from suites.verifier_backends import observe_kernel

    return observe_kernel(from_jsonable(req["case"]), [(int(c), int(n)) for c, n in req.get("runs", ())])


def _remember_facts(req: dict[str, Any]) -> None:
    """Take the host's reading of each object (a pickled toolchain.elf.ObjectFacts): parsing an ELF file in
    Python costs more than the whole kernel side of an observation under emulation."""
    from toolchain.elf import remember

    objects = req["objects"] if "objects" in req else [req["object"]]
    for obj, facts in zip(objects, req.get("facts") or (), strict=False):
        with open(facts, "rb") as f:
            remember(obj, pickle.load(f))


def _exec(req: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    try:
        out = subprocess.run([req["executable"], *req.get("args", ())], capture_output=True, text=True,
                             timeout=float(req.get("timeout", 60)), cwd=req.get("cwd"))
    except subprocess.TimeoutExpired:
        return {"returncode": None, "stdout": "", "stderr": f"timed out after {req.get('timeout', 60)}s"}
    return {"returncode": out.returncode, "stdout": out.stdout, "stderr": out.stderr[-4000:]}


def _profiled(observe: Any) -> dict[str, Any]:  # noqa: ANN401 - a callable returning the observation
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    doc = prof.runcall(observe)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    return {"observation": doc, "profile": text.getvalue()}


def _answer(req: dict[str, Any], libbpfs: dict[str | None, Any]) -> dict[str, Any]:
    kind = req.get("kind")
    if kind == "probe":  # the guest's facts; with "object", what the requested libbpf makes of .percpu
        facts = _guest_facts()
        if req.get("loader", "libbpf") == "libbpf" and req.get("object"):
            facts["libbpf_knows_percpu"] = _libbpf_knows_percpu(req, libbpfs)
            facts["libbpf"] = libbpfs[req.get("libbpf")].version
            facts["libbpf_path"] = libbpfs[req.get("libbpf")].path
        return {"probe": facts}
    if kind in ("observe", "observe_set"):
        _remember_facts(req)
        if req.get("profile"):  # where an observation's guest time goes (python -m backends.vm run --profile)
            return _profiled(lambda: _observe(req, libbpfs))
        doc = _observe(req, libbpfs)
        for d in [doc, *doc.get("objects", ())]:
            d["source"] = "vm"
        return {"observation": doc}
    if kind == "verifier_case":
        doc = _verifier_case(req)
        doc["source"] = "vm"
        return {"observation": doc}
    if kind == "jited":  # which registers the JIT adds the per-CPU offset into (backends.kernel.jited)
        from backends.kernel.jited import observe_percpu_addr_jit

        return {"jited": observe_percpu_addr_jit(int(req["register"]), int(req.get("offset", 0)))}
    if kind == "exec":  # a program the host built for this guest (the skeleton harness): its exit and output
        return {"exec": _exec(req)}
    if kind == "crash":  # fault injection for the suite's own tests: a real guest panic
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("c")
    if kind == "complain":  # fault injection: a kernel-log line as a WARN would print it
        with open(_KMSG, "w") as f:
            f.write("percpu-conformance: WARNING: injected complaint\n")
        return {"probe": {}}
    if kind == "hang":  # fault injection: a request that never answers
        while True:
            time.sleep(3600)
    raise ValueError(f"unknown request kind {kind!r}")


def _take_offline(keep: int) -> None:
    """Leave CPUs 0..keep-1 online: the others stay possible (per-CPU slots) but can run nothing."""
    from backends.kernel import probes

    for cpu in probes.online_cpus():
        if cpu >= keep:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/online", "w") as f:
                f.write("0")


def _preload() -> None:
    """Import what every request needs before answering the first, so each forked worker inherits it: under
    emulation the imports take about ten seconds, which the first observation paid. Imports only: nothing that
    probes the kernel or loads libbpf, whose answers depend on the JIT state a worker is forked for."""
    import backends.kernel.objectset  # noqa: F401
    import backends.kernel.observe  # noqa: F401
    import generators.model  # noqa: F401
    import suites.verifier_backends  # noqa: F401


def _unpacked(req: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The request with each file it carries written under `directory` and named by its guest path."""
    doc = dict(req)
    for key, packed in (doc.pop("files", None) or {}).items():
        doc[key] = ([unpack_file(p, directory / str(k)) for k, p in enumerate(packed)] if isinstance(packed, list)
                    else unpack_file(packed, directory / "0"))
    return doc


def serve(directory: Path, online: int | None = None) -> int:
    from backends.kernel import probes

    workers: dict[bool, JitWorker] = {}
    default_jit = probes.jit_enabled() is not False
    if online is not None:
        _take_offline(online)
    _preload()
    kmsg = KernelLog()
    guest = _guest_facts()
    channel = LineChannel(os.open(find_port(), os.O_RDWR | os.O_NONBLOCK))
    files = Path(tempfile.mkdtemp(prefix="percpu-agent-"))  # the guest's tmpfs, not the shared directory
    _say(f"kernel {guest['kernel_release']}, serving on port {PORT_NAME}")
    try:
        _answer_all(channel, files, workers, default_jit, kmsg, {"guest": guest})
    except BrokenPipeError:  # the host closed its socket, however it ended: leave no guest behind
        _say("the host is gone; powering off")
    finally:
        for worker in workers.values():
            worker.close()
    return 0


def _answer_all(channel: LineChannel, files: Path, workers: dict[bool, JitWorker], default_jit: bool,
                kmsg: KernelLog, ready: dict[str, Any]) -> None:
    """Say `ready`, then answer requests until a shutdown; BrokenPipeError when the host is gone."""
    channel.send(ready)
    seq = 0
    while True:
        req = channel.receive()
        if req is None:
            raise BrokenPipeError("end of file on the agent's port")
        if req.get("kind") == "shutdown":
            channel.send({"ok": True})
            return
        start = time.monotonic()
        kmsg.drain()
        jit = default_jit if req.get("jit") is None else bool(req["jit"])
        try:
            req = _unpacked(req, files / str(seq))
            _set_jit(jit)
            if jit not in workers:
                workers[jit] = JitWorker(jit)
            answer = workers[jit].ask(req)
        except Exception as e:  # one bad request must not end the agent
            workers.pop(jit, None)  # a worker that died is forked anew for the next request
            answer = {"error": {"type": type(e).__name__, "message": " ".join(str(e).split())}}
        answer["kernel_log"] = [ln for ln in kmsg.drain() if SPLAT.search(ln)]
        answer["seconds"] = round(time.monotonic() - start, 4)
        channel.send(answer)
        shutil.rmtree(files / str(seq), ignore_errors=True)
        seq += 1


def main(argv: list[str]) -> int:
    persistent = argv[:1] == ["--serve"]
    argv = argv[1:] if persistent else argv
    online = None
    if persistent and argv[1:2] == ["--online"] and len(argv) == 3 and argv[2].isdigit():
        argv, online = argv[:1], int(argv[2])
    if len(argv) != 1:
        print("usage: python -m backends.vm.agent [--serve DIR [--online N] | DIR]", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    try:
        return serve(directory, online) if persistent else run(directory)
    except Exception as e:
        traceback.print_exc()  # lands on the guest console, which the host keeps
        with contextlib.suppress(OSError):
            _write(directory, {"fatal": f"{type(e).__name__}: {e}"}, "ready.json" if persistent else "results.json")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
