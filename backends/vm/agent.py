"""The guest side of the VM backend: `python -m backends.vm.agent DIR`, run by virtme-ng inside the booted kernel.

Reads DIR/requests.json, probes the guest kernel, observes each request with the kernel backend and writes
DIR/results.json (atomically: the host reads it only after the guest stopped, but a half-written file must never
pass for an answer). A failing request becomes an error entry; only a failure outside any request is `fatal`.
Progress goes to stdout, which is the guest console the host keeps. Nothing is pinned, so bpffs is not needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _say(text: str) -> None:
    print(f"percpu-vm: {text}", flush=True)


def _write(directory: Path, doc: dict[str, Any]) -> None:
    tmp = directory / "results.json.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "results.json")


def _guest_facts() -> dict[str, Any]:
    from backends.kernel import probes

    return {"kernel_release": probes.kernel_release(), "probe": probes.probe_all(),
            "btf_vmlinux": os.path.exists("/sys/kernel/btf/vmlinux"), "python": sys.version.split()[0]}


def _observe(req: dict[str, Any], libbpfs: dict[str | None, Any]) -> dict[str, Any]:
    from backends.kernel.observe import observe_libbpf, observe_raw, open_libbpf

    runs = [(str(p), int(c), int(n)) for p, c, n in req.get("runs", ())]
    initial = {name: bytes.fromhex(value) for name, value in (req.get("initial_values") or {}).items()}
    if req.get("loader", "libbpf") == "raw":
        return observe_raw(req["object"], runs=runs, initial_values=initial)
    path = req.get("libbpf")
    if path not in libbpfs:
        libbpfs[path] = open_libbpf(path)
    return observe_libbpf(req["object"], libbpf=libbpfs[path], runs=runs, initial_values=initial)


def _summary(doc: dict[str, Any]) -> str:
    verdicts = [p["verdict"] for p in doc.get("programs", [])]
    if not doc.get("open", {}).get("ok", True):
        return f"open failed ({doc['open'].get('error_class')})"
    return f"{len(verdicts)} programs {'/'.join(verdicts) or '-'}, {len(doc.get('runs', []))} runs"


def run(directory: Path) -> int:
    start = time.monotonic()
    requests = json.loads((directory / "requests.json").read_text())["requests"]
    guest = _guest_facts()
    _say(f"kernel {guest['kernel_release']}, {len(requests)} requests, "
         f"bpf {'usable' if guest['probe']['bpf_usable'] else 'unusable: ' + guest['probe']['bpf_unusable_reason']}")
    results: list[dict[str, Any]] = []
    libbpfs: dict[str | None, Any] = {}
    for i, req in enumerate(requests, 1):
        name = os.path.basename(req["object"])
        try:
            doc = _observe(req, libbpfs)
        except Exception as e:  # one bad request must not cost the others their answers
            message = " ".join(str(e).split())
            results.append({"error": {"type": type(e).__name__, "message": message}})
            _say(f"{i}/{len(requests)} {name} [{req.get('loader', 'libbpf')}] error: {type(e).__name__}: {message}")
            continue
        doc["source"] = "vm"
        results.append({"observation": doc})
        _say(f"{i}/{len(requests)} {name} [{req.get('loader', 'libbpf')}] {_summary(doc)}")
    guest["agent_seconds"] = round(time.monotonic() - start, 3)
    _write(directory, {"guest": guest, "results": results})
    _say(f"done in {guest['agent_seconds']:.1f}s")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m backends.vm.agent DIR", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    try:
        return run(directory)
    except Exception as e:
        traceback.print_exc()  # lands on the guest console, which the host keeps
        with contextlib.suppress(OSError):
            _write(directory, {"fatal": f"{type(e).__name__}: {e}"})
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
