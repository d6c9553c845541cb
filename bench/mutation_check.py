"""Mutation check: change one operator, comparison, constant, return or statement of the engine at a
time, run the tests of that module, and count the mutants the tests kill.

A test suite that passes on the code is only half the evidence; the other half is that it fails on
code that is wrong. A mutant is the smallest wrong program: ``a + b`` written ``a - b``, ``<`` written
``<=``, a constant off by one, a ``return`` that returns None, an ``x += y`` left out. A mutant the
tests still pass on ("survived") is either a bug the tests would miss, or an equivalent program (the
change cannot alter any result, e.g. ``<`` vs ``<=`` at a point that never ties); docs/mutation_check.md
gives the verdict on each survivor of the last run.

    git -C . worktree add /tmp/mut-wt HEAD
    nice -n 10 python -m bench.mutation_check --worktree /tmp/mut-wt --sample 120 --seed 0 --json run.json
    nice -n 10 python -m bench.mutation_check --worktree /tmp/mut-wt --rerun run.json   # after adding tests
    git worktree remove --force /tmp/mut-wt

The mutants are written into the worktree only (never into the checkout you work in), one at a time,
and the original is put back after each run. Each mutant runs a chosen subset of its module's tests
(``STAGES`` below) under ``pytest -x -q`` with a timeout of a few times the unmutated run: first the
fast subset (no TensorFlow: importing it costs ~10 s a run), then, for the survivors only, the wider
set with the TensorFlow comparisons. Outcomes: killed (a test failed, or the module no longer
imports), survived (every test passed), timeout (counted apart: a mutant that loops is caught, but
not by an assertion).

Not mutated, because no test should pin them: error-message text (everything inside ``raise``, f-strings,
``__repr__``), docstrings and type annotations.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

# Module -> (fast tests, their -k filter, wider tests for the survivors, their -k filter). The fast set
# leaves out the TensorFlow comparisons by name; the wider set runs only what the fast set left out: the
# TensorFlow comparisons and the tests of a module that uses this one (-k also matches file names).
NO_TF = "not tensorflow and not keras"
TRAINER_STAGE = (["tests/test_mutants.py", "tests/test_train.py"],
                 "(test_mutants.py and trainer) or (test_train.py and not original_unet and not flags1 and not flags2 "
                 "and not flags3 and not corrupt_dataset and not gpu_without and not bad_arguments)",
                 ["tests/test_faults.py", "tests/test_run_folders.py", "tests/test_prefetch.py",
                  "tests/test_data_parallel.py"],
                 "max_minutes or sigint_during_validation or without_the_best_epoch or closed_output_pipe "
                 "or best_epochs_weights or predict_with_last or early_stopped_run or stale_temporaries "
                 "or test_training_with_and_without_prefetch "
                 "or (test_data_parallel.py and (rank_slices or old_sequential))")
STAGES = {
    "minitensor/layers/": (["tests/test_layers.py", "tests/test_model.py", "tests/test_mutants.py"], NO_TF,
                           ["tests/test_layers.py", "tests/test_gradcheck.py"],
                           "tensorflow or keras or test_gradcheck.py"),
    "minitensor/losses.py": (["tests/test_losses.py", "tests/test_mutants.py"], NO_TF,
                             ["tests/test_losses.py", "tests/test_model.py"], "tensorflow or keras or test_model.py"),
    "minitensor/optimizers.py": (["tests/test_optimizers.py"], NO_TF,
                                 ["tests/test_optimizers.py", "tests/test_model.py"],
                                 "tensorflow or keras or test_model.py"),
    "minitensor/model.py": (["tests/test_model.py", "tests/test_mutants.py"], NO_TF,
                            ["tests/test_model.py", "tests/test_user_errors.py"],
                            "tensorflow or keras or test_user_errors.py"),
    # The trainer's tests are whole train.py runs (a few seconds each): the fast set is test_train.py less its
    # slowest variants; the wider set is the fault injections, the run-folder and prefetch runs and the
    # in-process data-parallel tests (the rest of test_data_parallel.py starts mpiexec: too slow per mutant).
    "unet/trainer.py": TRAINER_STAGE,
    "unet/trainer_checkpoints.py": TRAINER_STAGE,
}

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.FloorDiv: ast.Mult, ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv}
SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
SWAP_BOOLOP = {ast.And: ast.Or, ast.Or: ast.And}
SKIPPED_FUNCTIONS = {"__repr__", "__str__"}


class Mutant:
    """One change: the byte span [start, end) of the source (line, column pairs) and its new text."""

    def __init__(self, path, kind, node, replacement):
        self.path, self.kind, self.replacement = path, kind, replacement
        self.start = (node.lineno, node.col_offset)
        self.end = (node.end_lineno, node.end_col_offset)
        self.outcome, self.seconds, self.failed_test = None, None, None
        self.stage = None     # 0: decided by the fast tests, 2: by the wider set (the survivors of 0)

    def apply(self, source: str) -> str:
        """The source with the span replaced. AST columns count UTF-8 bytes, so the splice is on bytes."""
        lines = source.encode().splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        data = b"".join(lines)
        start = offsets[self.start[0] - 1] + self.start[1]
        end = offsets[self.end[0] - 1] + self.end[1]
        return (data[:start] + self.replacement.encode() + data[end:]).decode()

    def describe(self, source: str) -> str:
        """``path:line kind: old -> new`` with the old and new first lines, for the report."""
        return f"{self.path}:{self.start[0]} {self.kind}: {self.change(source)}"

    def change(self, source: str) -> str:
        """``kind: `old line` -> `new line```, which still names the mutant after lines above it moved."""
        old = source.splitlines()[self.start[0] - 1].strip()
        new = self.apply(source).splitlines()[self.start[0] - 1].strip()
        return f"`{old}` -> `{new}`"

    def as_dict(self, source):
        return {"where": self.describe(source), "kind": self.kind, "outcome": self.outcome, "stage": self.stage,
                "seconds": self.seconds, "failed_test": self.failed_test}


def _is_docstring(statement) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
        and isinstance(statement.value.value, str)


def _skipped_nodes(tree) -> set:
    """Ids of the nodes that carry no behaviour a test should pin: message text, docstrings, annotations."""
    skipped = set()

    def skip_all(node):
        skipped.update(id(inner) for inner in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.JoinedStr)):
            skip_all(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in SKIPPED_FUNCTIONS:
                skip_all(node)
            if node.returns is not None:
                skip_all(node.returns)
            for argument in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if argument.annotation is not None:
                    skip_all(argument.annotation)
        elif isinstance(node, ast.AnnAssign):
            skip_all(node.annotation)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body and _is_docstring(node.body[0]):
            skip_all(node.body[0])
    return skipped


def _replaced(node, **fields):
    """A copy of ``node`` with ``fields`` changed, unparsed in parentheses (safe in any expression)."""
    changed = copy.deepcopy(node)
    for name, value in fields.items():
        setattr(changed, name, value)
    return "(" + ast.unparse(changed) + ")"


def _constant_variants(value):
    """0, 1, 2 go one up and one down (an axis, an index, a count off by one); other numbers one up
    (integers) or doubled (floats: a scale or an epsilon); booleans flip."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1] if value in (0, 1, 2) else [value + 1]
    if isinstance(value, float):
        return [value + 1, value - 1] if value in (0.0, 1.0, 2.0) else [value * 2]
    return []


def mutants_of(path: str, source: str) -> list:
    """Every mutant of one file, in source order."""
    tree = ast.parse(source)
    skipped = _skipped_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
            found.append(Mutant(path, "operator", node, _replaced(node, op=SWAP_BINOP[type(node.op)]())))
        elif isinstance(node, ast.AugAssign):
            if type(node.op) in SWAP_BINOP:
                text = ast.unparse(ast.AugAssign(node.target, SWAP_BINOP[type(node.op)](), node.value))
                found.append(Mutant(path, "operator", node, text))
            found.append(Mutant(path, "statement dropped", node, "pass"))
        elif isinstance(node, ast.Compare):
            for index, op in enumerate(node.ops):
                if type(op) in SWAP_COMPARE:
                    ops = list(node.ops)
                    ops[index] = SWAP_COMPARE[type(op)]()
                    found.append(Mutant(path, "comparison", node, _replaced(node, ops=ops)))
        elif isinstance(node, ast.BoolOp):
            found.append(Mutant(path, "boolean", node, _replaced(node, op=SWAP_BOOLOP[type(node.op)]())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            found.append(Mutant(path, "unary dropped", node, "(" + ast.unparse(node.operand) + ")"))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None \
                and node.value is not Ellipsis:
            for value in _constant_variants(node.value):
                found.append(Mutant(path, "constant", node, f"({value!r})"))
        elif isinstance(node, ast.Return) and node.value is not None \
                and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            found.append(Mutant(path, "return None", node, "return None"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            found.append(Mutant(path, "statement dropped", node, "pass"))
    original = ast.dump(tree)
    kept = []
    for mutant in found:      # a mutant must parse and differ from the original (a guard on the splice)
        try:
            if ast.dump(ast.parse(mutant.apply(source))) != original:
                kept.append(mutant)
        except SyntaxError:
            pass
    return kept


def stage_of(path: str):
    for prefix, stage in STAGES.items():
        if path.startswith(prefix):
            return stage
    raise KeyError(path)


def run_tests(worktree: Path, tests, keyword, timeout):
    """(outcome, seconds, first failing test) of ``pytest -x -q`` in the worktree, killed past ``timeout``."""
    command = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider",
               f"--basetemp={worktree}/.pytest-tmp"]
    if keyword:
        command += ["-k", keyword]
    env = dict(os.environ, PYTHONPATH=str(worktree), PYTHONDONTWRITEBYTECODE="1")
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=worktree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)     # the whole group: pytest and anything it started
        process.communicate()
        return "timeout", round(time.perf_counter() - began, 1), None
    seconds = round(time.perf_counter() - began, 1)
    if process.returncode == 0:
        return "survived", seconds, None
    failed = next((line.split(" ")[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))),
                  output.strip().splitlines()[-1] if output.strip() else "")
    return "killed", seconds, failed


def check(worktree: Path, mutants, sources, log):
    """Run every mutant through its fast stage, then the survivors through the wider stage."""
    timeouts = {}

    def time_limit(prefix, stage_index):
        """3x the unmutated run + 10 s; the unmutated code must pass, else the check means nothing."""
        if (prefix, stage_index) not in timeouts:
            stage = STAGES[prefix]
            outcome, seconds, failed = run_tests(worktree, stage[stage_index], stage[stage_index + 1], 600)
            if outcome != "survived":
                raise SystemExit(f"the unmutated code fails {stage[stage_index]}: {failed}")
            timeouts[prefix, stage_index] = 3 * seconds + 10
            log(f"unmutated {prefix}, stage {stage_index}: {seconds} s")
        return timeouts[prefix, stage_index]

    for stage_index in (0, 2):
        todo = [m for m in mutants if stage_index == 0 or m.outcome == "survived"]
        for number, mutant in enumerate(todo, 1):
            prefix = next(p for p in STAGES if mutant.path.startswith(p))
            stage = STAGES[prefix]
            limit = time_limit(prefix, stage_index)
            target = worktree / mutant.path
            target.write_text(mutant.apply(sources[mutant.path]))
            try:
                mutant.outcome, mutant.seconds, mutant.failed_test = run_tests(
                    worktree, stage[stage_index], stage[stage_index + 1], limit)
                mutant.stage = stage_index
            finally:
                target.write_text(sources[mutant.path])
            log(f"[stage {stage_index}: {number}/{len(todo)}] {mutant.outcome:8} {mutant.seconds:6} s  "
                f"{mutant.describe(sources[mutant.path])}")


def summary(mutants, totals) -> str:
    """The counts per file as a Markdown table."""
    def row(name, mine, total):
        def count(outcome, stage=None):
            return sum(m.outcome == outcome and (stage is None or m.stage == stage) for m in mine)
        return (f"| {name} | {len(mine)} of {total} | {count('killed', 0)} | {count('killed', 2)} | "
                f"{count('survived')} | {count('timeout')} |")

    rows = ["| file | mutants run (of all) | killed by the fast tests | killed by the wider set | survived "
            "| timed out |", "|---|---|---|---|---|---|"]
    rows += [row(f"`{path}`", [m for m in mutants if m.path == path], totals[path]) for path in sorted(totals)]
    rows.append(row("all", mutants, sum(totals.values())))
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worktree", type=Path, required=True, help="a git worktree the mutants may be written into")
    parser.add_argument("--files", nargs="*", help="files to mutate (default: every module in STAGES)")
    parser.add_argument("--sample", type=int, help="run this many mutants, drawn at random over all files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the mutants and their count, run nothing")
    parser.add_argument("--json", type=Path, help="write every mutant's outcome here")
    parser.add_argument("--rerun", type=Path, help="run only the mutants that survived or timed out in this "
                                                   "--json file of an earlier run (after adding tests)")
    args = parser.parse_args(argv)
    worktree = args.worktree.resolve()
    if worktree == Path(__file__).resolve().parents[1]:
        raise SystemExit("--worktree must be a separate worktree: the mutants are written into it")
    paths = args.files or sorted(  # a folder's modules (its __init__.py only re-exports), or the one file
        str(p.relative_to(worktree)) for prefix in STAGES
        for p in (sorted(worktree.glob(prefix + "*.py")) if prefix.endswith("/") else [worktree / prefix])
        if p.name != "__init__.py")
    sources = {path: (worktree / path).read_text() for path in paths}
    everything = [mutant for path in paths for mutant in mutants_of(path, sources[path])]
    totals = {path: sum(m.path == path for m in everything) for path in paths}
    chosen = everything
    if args.rerun:
        def without_line(where):
            path_and_line, _, rest = where.partition(" ")
            return path_and_line.rpartition(":")[0] + " " + rest

        earlier = {without_line(m["where"]) for m in json.loads(args.rerun.read_text()) if m["outcome"] != "killed"}
        chosen = [m for m in everything if without_line(m.describe(sources[m.path])) in earlier]
    elif args.sample and args.sample < len(everything):
        chosen = sorted(random.Random(args.seed).sample(everything, args.sample),
                        key=lambda m: (m.path, m.start))
    if args.list:
        for mutant in chosen:
            print(mutant.describe(sources[mutant.path]))
        print(f"{len(chosen)} of {len(everything)} mutants:", totals)
        return 0
    modified = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=worktree, capture_output=True,
                              text=True, check=True).stdout
    if modified:
        raise SystemExit(f"the worktree's files differ from its commit (a mutant left by a killed run?):\n{modified}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))   # so the original is put back
    # A shell starts a background job (``... &``) with SIGINT ignored, and the tests' processes would inherit
    # that: the fault-injection tests that send themselves SIGINT would fail on the unmutated code. Handled
    # here (Ctrl-C still ends the check, the original put back), SIGINT is at its default in every child.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = time.perf_counter()
    check(worktree, chosen, sources, lambda line: print(line, flush=True))
    print(summary(chosen, totals))
    print(f"{time.perf_counter() - began:.0f} s")
    for mutant in chosen:
        if mutant.outcome != "killed":
            print(f"{mutant.outcome}: {mutant.describe(sources[mutant.path])}")
    if args.json:
        args.json.write_text(json.dumps([m.as_dict(sources[m.path]) for m in chosen], indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
