"""``python -m exercises [N ...] [--solutions]``: check the exercises and say which pass."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from . import EXERCISES, checks


def run(number, module_name, package="exercises"):
    """Check one exercise; returns (status, detail): 'passed', 'not written yet' or 'FAILED'."""
    try:
        module = importlib.import_module(f"{package}.{module_name}")
        getattr(checks, f"check_{module_name}")(module)
    except NotImplementedError as exc:
        return "not written yet", str(exc)
    except AssertionError as exc:
        return "FAILED", str(exc) or "a check failed"
    except Exception:                                   # a bug in the learner's code: show where
        return "FAILED", traceback.format_exc(limit=-3).strip()
    return "passed", ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exercises", description="Check the exercises in exercises/.")
    parser.add_argument("numbers", nargs="*", type=int, help="which exercises (default: all)")
    parser.add_argument("--solutions", action="store_true", help="check the reference solutions instead")
    args = parser.parse_args(argv)
    known = {number for number, _, _ in EXERCISES}
    unknown = [n for n in args.numbers if n not in known]
    if unknown:
        parser.error(f"no exercise {', '.join(map(str, unknown))}; they are numbered 1 to {max(known)}")
    package = "exercises.solutions" if args.solutions else "exercises"
    chosen = [e for e in EXERCISES if not args.numbers or e[0] in args.numbers]
    passed = 0
    for number, module_name, title in chosen:
        status, detail = run(number, module_name, package)
        passed += status == "passed"
        print(f"{number}. {title:66s} {status}")
        if status == "FAILED":
            print("   " + detail.replace("\n", "\n   "))
    print(f"{passed} of {len(chosen)} pass" + ("" if args.solutions else "; edit exercises/exN_*.py and run again"))
    return 0 if passed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
