"""`python -m oracle predict MODEL.json [--profile P] [--possible-cpus N] [--online-cpus LIST] [--clang PATH]`

Compiles the model's global rendering and prints the prediction in the result schema. MODEL.json may also be
an object set (docs/object-sets.md): every object is compiled and the set document is printed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from generators.model import ObjectSet, ProgramModel, from_jsonable
from generators.render import render_global
from oracle.predict import OracleError, predict
from oracle.profiles import UnknownProfile, profile
from schema.cpulist import format_cpulist, parse_cpulist
from toolchain.clang import Clang, CompileError, ToolchainError, compile_c
from toolchain.elf import ObjectError, read_object


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oracle")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict loader, verifier and runtime outcomes for a model")
    p.add_argument("model", type=Path, help="a program model as JSON (see README)")
    p.add_argument("--profile", default="merged")
    p.add_argument("--possible-cpus", type=int, default=4)
    p.add_argument("--online-cpus", help="cpulist, default: every possible CPU")
    p.add_argument("--clang", help="clang binary (default: clang-19 or newer on PATH)")
    args = parser.parse_args(argv)
    try:
        prof = profile(args.profile)
        model = from_jsonable(json.loads(args.model.read_text()))
        if not isinstance(model, ProgramModel | ObjectSet):
            raise ValueError(f"{args.model} is neither a ProgramModel nor an ObjectSet document")
        online = parse_cpulist(args.online_cpus) if args.online_cpus else list(range(args.possible_cpus))
        if any(c >= args.possible_cpus for c in online) or args.possible_cpus < 1:
            raise ValueError(f"online CPUs {online} are not a subset of {args.possible_cpus} possible CPUs")
        schedules = [model.schedule]
        for run in (r for schedule in schedules for r in schedule):
            if run.cpu not in online:
                raise ValueError(f"the schedule runs {run.program} on CPU {run.cpu}, which is not online "
                                 f"(online: {format_cpulist(online)})")
        clang = Clang.find(args.clang)
        if isinstance(model, ObjectSet):
            from oracle.objectset import predict_set

            facts = [read_object(compile_c(clang, render_global(m), name=m.name)) for m in model.objects]
            result = predict_set(model, facts, prof, possible_cpus=args.possible_cpus, online_cpus=online,
                                 clang=clang.version)
        else:
            facts1 = read_object(compile_c(clang, render_global(model), name=model.name))
            result = predict(model, facts1, prof, possible_cpus=args.possible_cpus, online_cpus=online,
                             clang=clang.version)
    except CompileError as e:
        print(f"oracle: {e}", file=sys.stderr)
        return 3
    except (OSError, ValueError, KeyError, TypeError, UnknownProfile, ToolchainError, ObjectError,
            OracleError) as e:
        print(f"oracle: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
