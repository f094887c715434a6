"""`python -m suites.replay BUNDLE [--backend NAME] [--profile P]`: re-run a failure bundle's check.

Recompiles the bundle's model, predicts and observes again on the bundle's backend (or another one), and prints
the divergences. Exit 1 when the failure reproduces, 0 when it does not, 2 on bad input."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from generators.model import from_jsonable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.replay")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backend", help="sim, kernel-libbpf or kernel-raw (default: the bundle's)")
    parser.add_argument("--profile", help="profile of the prediction (default: the bundle's)")
    parser.add_argument("--sim-profile", help="simulator row to run, if not the profile's (default: the bundle's)")
    parser.add_argument("--clang")
    parser.add_argument("--libbpf")
    args = parser.parse_args(argv)
    try:
        meta = json.loads((args.bundle / "meta.json").read_text())
        model = from_jsonable(json.loads((args.bundle / "model.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"replay: {args.bundle} is not a readable bundle: {e}", file=sys.stderr)
        return 2
    from suites.backends import KernelBackend, SimBackend, Unavailable
    from toolchain.clang import Clang, ToolchainError

    try:
        clang = Clang.find(args.clang)
        name = args.backend or meta["backend"]
        if name == "sim":
            backend = SimBackend(args.profile or meta["profile"], meta["possible_cpus"], tuple(meta["online_cpus"]),
                                 sim_profile=args.sim_profile or meta.get("sim_profile"))
        elif name.startswith("kernel-"):
            backend = KernelBackend(name.removeprefix("kernel-"), args.libbpf, clang)
        else:
            raise Unavailable(f"unknown backend {name!r}")
    except (ToolchainError, Unavailable, KeyError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    from suites.sets import check_set_lowered_twin, differential_set
    from suites.support import differential
    from suites.test_lowered_twin import check_lowered_twin

    try:
        if meta["check"] == "setlowered":
            check_set_lowered_twin(clang, backend, model)
        elif meta.get("set"):
            differential_set(meta["check"], backend, clang, model, tuple(meta["layers"]))
        elif meta["check"] == "lowered":
            check_lowered_twin(clang, backend, model)
        else:
            differential(meta["check"], backend, clang, model, tuple(meta["layers"]))
    except AssertionError as e:
        print(f"reproduced on {backend.name}:\n{e}")
        return 1
    print(f"not reproduced on {backend.name} (profile {backend.profile})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
