"""Mutation testing of the core modules: do the tests notice a one-line bug?

For each core module (attention, embeddings, encoder, patches, t2t, hybrid, vit) this plants
one single-line mutation at a time -- swap `+`/`-`, `*`/`/`, flip a comparison, bump a
constant (`1 -> 2`, `-1 -> -2`, `0.5 -> 0.25`), swap two arguments (`permute(0, 2, 1)`,
`torch.where(c, a, b)`), drop a call (`.flatten(2)`, `.transpose(1, 2)`, `F.relu(x)`) or
delete a line -- runs that module's tests with `pytest -x -q -p no:cacheprovider`, and
records the mutant as killed (a test failed, or it timed out) or survived. It prints a
score per module and every survivor as `file:line` with the mutated line.

Run it by hand from the repository root; it is not a test (pytest does not collect it)
and no Makefile target or CI job runs it:

    .venv/bin/python tests/mutation.py                      # every module, 40 mutants each
    .venv/bin/python tests/mutation.py attention t2t        # some modules
    .venv/bin/python tests/mutation.py --max 0 encoder      # every mutant of one module
    .venv/bin/python tests/mutation.py --list patches       # show the sample, run nothing

Options: `--max N` mutants sampled per module (0: all), `--seed S` for the sample
(fixed, so two runs over the same source try the same mutants), `--timeout SEC` per
mutant, `--json PATH` to save the results. Only lines inside function bodies are mutated;
docstrings, `raise` statements and the `if` guards whose body only raises are left alone
(they are checked by the error tests, and the question here is the math).

The tests run with one torch thread, one mutant after the other: the CPU is shared. A
whole default run (7 x 40 mutants) took 9-13 minutes on two busy cores.

Safety: nothing under vit_tutorial/ is ever written. The package and tests/ are copied
into a temporary folder and mutated there (in place, the mutants would break everybody
else's test runs in the same checkout); each mutant is undone in a `finally` from the
original text kept in memory, Ctrl+C and SIGTERM included, the copy is checked against
the original before it is deleted, and the script ends by showing
`git diff --stat vit_tutorial/` and failing if it changed the package's files.

Speed: importing torch and timm takes ~10 s on a busy machine, longer than most test
files run. So the parent imports them once (never vit_tutorial) and forks one child per
mutant, which runs `pytest.main` on the mutated copy; `--no-fork` runs a fresh
`python -m pytest` per mutant instead.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import itertools
import json
import keyword
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here or in a child
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # never cache a mutant's bytecode
sys.dont_write_bytecode = True

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vit_tutorial"
# Each core module and the test files that are meant to check it (tests mirror modules).
MODULES = {
    "attention": ["tests/test_attention.py"],
    "embeddings": ["tests/test_embeddings.py"],
    "encoder": ["tests/test_encoder.py"],
    "patches": ["tests/test_patches.py"],
    "t2t": ["tests/test_t2t.py", "tests/test_t2t_vit.py"],
    "hybrid": ["tests/test_hybrid.py"],
    "vit": ["tests/test_vit.py"],
}
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]

BINARY = {"+": "-", "-": "+", "*": "/", "/": "*", "//": "*", "**": "*", "%": "//"}
AUGMENTED = {"+=": "-=", "-=": "+=", "*=": "/=", "/=": "*=", "//=": "*="}
COMPARE = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "=="}
KEYWORDS = {"and": "or", "or": "and", "True": "False", "False": "True"}
STRINGS = {"ij": "xy", "bicubic": "bilinear", "linear": "nearest", "gap": "token",
           "token": "gap", "same": "valid"}
# Tensor methods whose call can be dropped (`x.flatten(2)` -> `x`) and still run.
DROPPABLE = {"flatten", "transpose", "permute", "t", "float", "softmax", "sum", "mean",
             "unsqueeze", "squeeze", "contiguous", "clone", "detach", "expand", "to", "sqrt",
             "exp", "sin", "cos", "abs", "reshape", "view", "relu", "sigmoid", "tanh"}


@dataclass
class Mutant:
    module: str
    line: int  # 1-based line number in the module
    original: str  # the line before
    mutated: str  # the line after
    kind: str  # which operator made it
    status: str = "not run"  # killed | timeout | survived
    seconds: float = 0.0


# --- which lines may be mutated -----------------------------------------------------------


def mutable_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside function bodies, without docstrings, raises and raising guards."""
    lines, skip = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and _is_docstring(body[0]):
                skip.update(range(body[0].lineno, body[0].end_lineno + 1))
            for stmt in body:
                lines.update(range(stmt.lineno, stmt.end_lineno + 1))
        elif isinstance(node, ast.Raise):
            skip.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, ast.If) and all(isinstance(s, ast.Raise) for s in node.body):
            skip.update(range(node.test.lineno, node.test.end_lineno + 1))
    return lines - skip


def _is_docstring(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


# --- the mutation operators ---------------------------------------------------------------


def token_mutants(source: str, lines: set[int]) -> list[tuple[int, int, int, str, str]]:
    """(line, start col, end col, replacement, kind) for single tokens of the mutable lines."""
    out = []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
                                tokenize.INDENT, tokenize.DEDENT)]
    for i, tok in enumerate(tokens):
        row, col = tok.start
        if row not in lines or tok.end[0] != row:
            continue
        prev = tokens[i - 1] if i else None
        after_operand = prev is not None and (
            prev.type in (tokenize.NUMBER, tokenize.STRING) or prev.string in (")", "]")
            or prev.type == tokenize.NAME and not keyword.iskeyword(prev.string))
        s, end = tok.string, tok.end[1]
        if tok.type == tokenize.OP:
            if s in BINARY and after_operand:  # binary, not `*args` or unary minus
                out.append((row, col, end, BINARY[s], f"{s} -> {BINARY[s]}"))
            elif s == "-" and not after_operand:
                out.append((row, col, end, "", "drop unary -"))
            elif s in AUGMENTED:
                out.append((row, col, end, AUGMENTED[s], f"{s} -> {AUGMENTED[s]}"))
            elif s in COMPARE:
                out.append((row, col, end, COMPARE[s], f"{s} -> {COMPARE[s]}"))
        elif tok.type == tokenize.NAME and s in KEYWORDS:
            out.append((row, col, end, KEYWORDS[s], f"{s} -> {KEYWORDS[s]}"))
        elif tok.type == tokenize.NAME and s == "not" and i + 1 < len(tokens) and (
                prev is None or prev.string not in ("is",)) and tokens[i + 1].string != "in":
            out.append((row, col, tokens[i + 1].start[1], "", "drop not"))
        elif tok.type == tokenize.NUMBER:
            new = _bump_number(s)
            if new is not None:
                out.append((row, col, end, new, f"{s} -> {new}"))
        elif tok.type == tokenize.STRING:
            m = re.fullmatch(r"([\"'])(\w+)\1", s)
            if m and m.group(2) in STRINGS:
                new = f'"{STRINGS[m.group(2)]}"'
                out.append((row, col, end, new, f"{s} -> {new}"))
    return out


def _bump_number(s: str) -> str | None:
    """`1 -> 2`, `0 -> 1`; `0.5 -> 0.25`, `0.0 -> 1.0`; tiny epsilons 1000x larger."""
    try:
        value = int(s, 0)
    except ValueError:
        try:
            value = float(s)
        except ValueError:
            return None
        if value == 0:
            return "1.0"
        return repr(value * 1000) if abs(value) < 1e-3 else repr(value / 2)
    return str(value + 1)


def ast_mutants(tree: ast.Module, source_lines: list[str], lines: set[int]):
    """(line, start col, end col, replacement, kind) from the syntax tree: swapped arguments,
    dropped calls and deleted statements, each within one line."""
    out = []

    def seg(node):
        return source_lines[node.lineno - 1][node.col_offset:node.end_col_offset]

    def one_line(node):
        return node.lineno == node.end_lineno and node.lineno in lines

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and one_line(node):
            args = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(args) == len(node.args):
                for a, b in itertools.pairwise(args):  # swap neighbours: permute(0, 2, 1) etc.
                    if seg(a) != seg(b):
                        text = seg(b) + source_lines[a.lineno - 1][a.end_col_offset:b.col_offset]
                        out.append((a.lineno, a.col_offset, b.end_col_offset, text + seg(a),
                                    f"swap {seg(a)} and {seg(b)}"))
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in DROPPABLE:
                out.append((node.lineno, node.col_offset, node.end_col_offset,
                            seg(func.value), f"drop .{func.attr}(...)"))
            elif (len(node.args) == 1 and not node.keywords and _is_wrapper(func)
                  and not isinstance(node.args[0], (ast.Starred, ast.Constant))):
                out.append((node.lineno, node.col_offset, node.end_col_offset,
                            seg(node.args[0]), f"drop call {seg(func)}(...)"))
        elif isinstance(node, (ast.List, ast.Tuple)) and one_line(node):
            for a, b in itertools.pairwise(node.elts):  # torch.cat([a, b]) -> [b, a]
                if seg(a) != seg(b) and not isinstance(a, ast.Starred):
                    text = seg(b) + source_lines[a.lineno - 1][a.end_col_offset:b.col_offset]
                    out.append((a.lineno, a.col_offset, b.end_col_offset, text + seg(a),
                                f"swap {seg(a)} and {seg(b)}"))
        elif isinstance(node, ast.Attribute) and node.attr == "T" and one_line(node):
            out.append((node.lineno, node.col_offset, node.end_col_offset, seg(node.value),
                        "drop .T"))
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)) and one_line(
                node) and not _is_docstring(node):
            out.append((node.lineno, node.col_offset, node.end_col_offset, "pass", "delete line"))
    return out


def _is_wrapper(func: ast.expr) -> bool:
    """`f(x)`, `F.relu(x)`, `self.norm(x)`: a call whose removal leaves its argument."""
    return isinstance(func, ast.Name) or (
        isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name))


def make_mutants(module: str, source: str) -> list[Mutant]:
    """Every mutant of `source` that still compiles, in a fixed order, without duplicates."""
    tree = ast.parse(source)
    source_lines = source.splitlines()
    lines = mutable_lines(tree)
    seen, mutants = set(), []
    edits = token_mutants(source, lines) + ast_mutants(tree, source_lines, lines)
    for row, start, end, text, kind in sorted(edits):
        before = source_lines[row - 1]
        after = before[:start] + text + before[end:]
        if after == before or (row, after) in seen:
            continue
        seen.add((row, after))
        try:
            compile(_replace_line(source, row, after), module, "exec")
        except SyntaxError:
            continue
        mutants.append(Mutant(module, row, before, after, kind))
    return mutants


def _replace_line(source: str, row: int, new_line: str) -> str:
    lines = source.splitlines(keepends=True)
    ending = lines[row - 1][len(lines[row - 1].rstrip("\r\n")):]
    lines[row - 1] = new_line + ending
    return "".join(lines)


# --- running the tests ---------------------------------------------------------------------


class Runner:
    """Runs pytest in the temporary copy: in a forked child of this process (torch already
    imported) or, with fork=False, as a fresh `python -m pytest`."""

    def __init__(self, tree: Path, fork: bool):
        self.tree, self.fork = tree, fork and hasattr(os, "fork")
        self.log = tree / "last-run.log"
        if self.fork:
            import importlib.metadata

            import pytest  # noqa: F401  (imported once, here; the children inherit them)
            import torch  # noqa: F401

            for name in ["timm", *(ep.value.split(":")[0] for ep in
                                   importlib.metadata.entry_points(group="pytest11"))]:
                try:  # timm and pytest's plugins (nbval's Jupyter imports take seconds)
                    importlib.import_module(name)
                except Exception:
                    pass
            assert PACKAGE not in sys.modules, "the parent must never import the package"

    def run(self, test_files: list[str], timeout: float) -> tuple[str, float]:
        """('passed' | 'failed' | 'timeout', seconds)."""
        start = time.monotonic()
        if not self.fork:
            cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, *test_files]
            env = dict(os.environ, PYTHONPATH=str(self.tree))
            try:
                with open(self.log, "w") as log:
                    rc = subprocess.run(cmd, cwd=self.tree, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return "timeout", time.monotonic() - start
            return ("passed" if rc == 0 else "failed"), time.monotonic() - start
        pid = os.fork()
        if pid == 0:  # the child: never returns
            rc = 70
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(self.tree)
                sys.path.insert(0, str(self.tree))
                _limit_memory()
                import pytest

                # The plugins were imported before pytest could rewrite their asserts.
                quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
                rc = int(pytest.main([*PYTEST_ARGS, *quiet, *test_files]))
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        try:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(status)
                    return ("passed" if rc == 0 else "failed"), time.monotonic() - start
                if time.monotonic() - start > timeout:
                    return "timeout", time.monotonic() - start
                time.sleep(0.05)
        finally:
            try:  # a child still running (timeout, Ctrl+C) is ended and reaped
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _limit_memory(extra_gb: float = 6.0) -> None:
    """Cap the child's address space, so that a mutant that allocates a huge tensor fails
    instead of taking the shared machine's memory (Linux only)."""
    try:
        import resource

        vm_kb = int(re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text())[1])
        cap = (vm_kb * 1024) + int(extra_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, OSError, TypeError, ValueError):
        pass


def run_module(module: str, mutants: list[Mutant], runner: Runner, tree: Path,
                timeout: float) -> None:
    """Run the module's tests once unmutated, then once per mutant; fills in each status."""
    path = tree / PACKAGE / f"{module}.py"
    original = path.read_text()
    tests = MODULES[module]
    status, seconds = runner.run(tests, timeout=max(timeout, 600))
    if status != "passed":
        raise SystemExit(f"{module}: the tests fail without any mutation ({status}); see "
                         f"the log:\n{runner.log.read_text()[-3000:]}")
    limit = max(timeout, 4 * seconds)
    print(f"== {module}: {len(mutants)} mutants, {' '.join(tests)} "
          f"(unmutated {seconds:.1f} s, timeout {limit:.0f} s)", flush=True)
    for i, m in enumerate(mutants, 1):
        try:
            path.write_text(_replace_line(original, m.line, m.mutated))
            status, m.seconds = runner.run(tests, timeout=limit)
        finally:
            path.write_text(original)
        m.status = {"passed": "survived", "failed": "killed"}.get(status, status)
        mark = "SURVIVED" if m.status == "survived" else m.status
        print(f"  [{i:2d}/{len(mutants)}] {mark:8s} {m.seconds:5.1f}s  line {m.line}: "
              f"{m.kind}", flush=True)
    assert path.read_text() == original


def _digest(modules) -> dict[str, str]:
    return {m: hashlib.sha256((ROOT / PACKAGE / f"{m}.py").read_bytes()).hexdigest()
            for m in modules}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="module",
                        help=f"some of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--max", type=int, default=40, help="mutants per module, 0: all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per mutant, at "
                        "least (4x the unmutated run if that is longer)")
    parser.add_argument("--list", action="store_true", help="print the sample, run nothing")
    parser.add_argument("--no-fork", dest="fork", action="store_false",
                        help="a fresh `python -m pytest` per mutant (slower)")
    parser.add_argument("--json", type=Path, help="write every mutant and its status here")
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")

    samples = {}
    for module in modules:
        source = (ROOT / PACKAGE / f"{module}.py").read_text()
        pool = make_mutants(module, source)
        chosen = pool
        if args.max and len(pool) > args.max:
            rng = random.Random(f"{args.seed}:{module}")
            chosen = sorted(rng.sample(pool, args.max), key=lambda m: (m.line, m.mutated))
        samples[module] = chosen
        print(f"{module}: {len(chosen)} of {len(pool)} mutants")
    if args.list:
        for module, mutants in samples.items():
            for m in mutants:
                print(f"{PACKAGE}/{module}.py:{m.line}: [{m.kind}] {m.mutated.strip()}")
        return 0

    before = _digest(modules)

    def stop(signum, frame):  # SIGTERM/SIGHUP unwind like Ctrl+C, through the finally blocks
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    tree = Path(tempfile.mkdtemp(prefix="vit-mutation-"))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / PACKAGE, tree / PACKAGE, ignore=ignore)
        shutil.copytree(ROOT / "tests", tree / "tests", ignore=ignore)
        shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")  # pytest's settings
        runner = Runner(tree, fork=args.fork)
        started = time.monotonic()
        for module, mutants in samples.items():
            run_module(module, mutants, runner, tree, args.timeout)
    except KeyboardInterrupt:
        print("\ninterrupted: the results so far", file=sys.stderr)
    finally:
        shutil.rmtree(tree, ignore_errors=True)

    print(f"\n{'module':12s} {'killed':>7s} {'of':>4s}  score   (timeouts)")
    for module, mutants in samples.items():
        ran = [m for m in mutants if m.status != "not run"]
        killed = sum(m.status != "survived" for m in ran)
        timeouts = sum(m.status == "timeout" for m in ran)
        score = f"{100 * killed / len(ran):5.1f}%" if ran else "   - "
        print(f"{module:12s} {killed:7d} {len(ran):4d}  {score}  ({timeouts})")
    survivors = [m for ms in samples.values() for m in ms if m.status == "survived"]
    if survivors:
        print("\nsurvivors:")
    for m in survivors:
        print(f"  {PACKAGE}/{m.module}.py:{m.line}: [{m.kind}]\n      - {m.original.strip()}"
              f"\n      + {m.mutated.strip()}")
    if "started" in locals():
        print(f"\n{time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(m) for ms in samples.values() for m in ms],
                                        indent=1))

    diff = subprocess.run(["git", "diff", "--stat", f"{PACKAGE}/"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    print(f"git diff --stat {PACKAGE}/: {diff or '(empty)'}")
    if _digest(modules) != before:
        print(f"error: a module of {PACKAGE}/ changed during the run; this script writes only "
              f"in its temporary copy, so someone else edited it meanwhile?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
