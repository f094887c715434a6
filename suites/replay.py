"""`python -m suites.replay BUNDLE [--backend CONFIG] [--profile P] [--force]`: re-run a failure bundle's check.

Recompiles the bundle's model, builds the backend the bundle recorded (its configuration string: loader, libbpf
path, stack, kernel image) or another one, predicts and observes again, and prints the divergences. A backend whose
environment is not the recorded one (another profile, kernel release or libbpf) is refused unless --force: a
failure that does not reproduce there says nothing. Exit 1 when the failure reproduces, 0 when it does not, 2 on
bad input or a differing environment, 4 when the backend cannot run here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from generators.model import from_jsonable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suites.replay")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backend", help="a backend configuration or column (default: the bundle's)")
    parser.add_argument("--profile", help="profile of the prediction (default: the bundle's)")
    parser.add_argument("--sim-profile", help="simulator row to run, if not the profile's (default: the bundle's)")
    parser.add_argument("--clang")
    parser.add_argument("--libbpf")
    parser.add_argument("--force", action="store_true", help="replay where the environment differs")
    args = parser.parse_args(argv)
    try:
        meta = json.loads((args.bundle / "meta.json").read_text())
        model = from_jsonable(json.loads((args.bundle / "model.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"replay: {args.bundle} is not a readable bundle: {e}", file=sys.stderr)
        return 2
    from schema.profiles import UnknownProfile
    from suites.backends import ConfigError, Unavailable, format_config, from_config, parse_config
    from toolchain.clang import Clang, ToolchainError

    config = args.backend or meta.get("config") or meta["backend"]
    overrides = {k: v for k, v in (("profile", args.profile), ("sim_profile", args.sim_profile),
                                   ("libbpf", args.libbpf)) if v}
    try:
        clang = Clang.find(args.clang)
        kind, settings = parse_config(config)
        # the command line's settings win over the bundle's, where the backend takes them
        settings.update({k: v for k, v in overrides.items() if k in kind.settings})
        backend = from_config(format_config(kind, settings), {"clang": args.clang} if args.clang else {})
    except (ConfigError, UnknownProfile, ValueError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    except ToolchainError as e:
        print(f"replay: toolchain: {e}", file=sys.stderr)
        return 3
    except Unavailable as e:
        print(f"replay: {e}", file=sys.stderr)
        return 4
    differs = _environment_differs(meta, backend) if not (args.backend or overrides) else []
    if differs and not args.force:
        print(f"replay: the environment differs from the bundle's: {'; '.join(differs)} (--force replays anyway)",
              file=sys.stderr)
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


def _environment_differs(meta: dict, backend) -> list[str]:  # noqa: ANN001 - suites.backends.Backend
    recorded = {"profile": meta.get("profile"), **(meta.get("environment") or {})}
    env = getattr(backend, "env", None) or {}
    now = {"profile": backend.profile, **{k: env.get(k) for k in recorded if k != "profile"}}
    return [f"{k} {now.get(k)!r}, recorded {v!r}" for k, v in recorded.items() if v is not None and now.get(k) != v]


if __name__ == "__main__":
    sys.exit(main())
