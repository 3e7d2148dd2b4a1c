"""Mutation testing of the method's wiring: would the test suite notice a one-token slip in the method?

    python bench/mutants.py                          # every mutant of the targets below, the method's tests
    python bench/mutants.py --list                   # the mutants only, no tests run
    python bench/mutants.py --only freeflow.py:412   # the mutants of one line
    python bench/mutants.py --tests tests            # judge them by the whole suite (slow)
    python bench/mutants.py --json out/mutants.json  # stopped? the same command again judges only what is left

A mutant is the code with one edit: an arithmetic operator swapped (+ -, * /), a comparison loosened or flipped
(<= <, >= >, == !=), a boolean operator swapped (and or), a 0 and 1 exchanged, a `not` dropped, or a plain
statement replaced by `pass`. Each is written into a private copy of the repository and judged by
`python -m pytest -x` on the tests of each stage in turn (STAGES, or --tests): killed if any test fails, survived
if every test passes (a mutant that does not compile is not counted, nor one that runs past --timeout: that is no
verdict, and --only reruns it). The targets are the method's wiring: freeflow.py sections 1 to 7, distill() and
resume_from(), and the data-based baseline's step in toy/mismatch.py. Prints a line per mutant as it is
judged, then the score and the survivors; --json FILE keeps them. docs/method.md lists the survivors and why
each is equivalent (it changes nothing a user could observe) or which test now kills it."""

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (file, first line's text, the line after the last): the regions mutated
TARGETS = [
    ("freeflow.py", "# 1. The prior", "# 8. Configuration"),
    ("freeflow.py", "def distill(", "# Watching a long run"),
    ("freeflow.py", "def resume_from(", "def _plain("),
    ("toy/mismatch.py", "def sample_t_s(", "# The command"),
]
# the tests that judge a mutant, in stages: the next stage runs only on what the last one let live (the fast
# hand-pinned step first; last the ImageNet path's bf16 passes and torchrun's two processes, and the SiT's attention)
STAGES = [["tests/test_freeflow_step.py"], ["tests/test_freeflow.py", "tests/test_toy_mismatch.py"],
          ["tests/test_freeflow_imagenet.py", "tests/test_sit.py"]]
SWAPS = {"+": "-", "-": "+", "*": "/", "/": "*", "<=": "<", "<": "<=", ">=": ">", ">": ">=", "==": "!=",
         "!=": "==", "and": "or", "or": "and", "0": "1", "1": "0", "0.0": "1.0", "1.0": "0.0"}
PLAIN_STATEMENT = re.compile(r"^\s*(?!(def|class|if|elif|else|for|while|with|try|except|finally|return|yield|raise|"
                             r"import|from|@|#|\"|'|\)|\]|\}|pass)\b)[A-Za-z_][\w\.\[\], ]*(\(.*\))?\s*([+\-*/]?=|\()")


def region_lines(lines, start, end):
    """Line numbers (1-based) of the region from the line containing `start` to the one before `end`."""
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i, line in enumerate(lines) if i > first and end in line)
    return range(first + 1, last + 1)


def string_lines(source):
    """The lines a string literal covers (docstrings, long messages): no statement starts there."""
    return {line for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.STRING
            for line in range(tok.start[0], tok.end[0] + 1)}


def code_tokens(source):
    """(line, column, text) of every operator, number and and/or/not token that is code (not a docstring)."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.OP or tok.type == tokenize.NUMBER or (tok.type == tokenize.NAME and
                                                                     tok.string in ("and", "or", "not")):
            out.append((tok.start[0], tok.start[1], tok.string))
    return out


def mutants(path, start, end):
    """(line, description, mutated source) of every mutant of the region."""
    source = open(os.path.join(ROOT, path)).read()
    lines = source.splitlines(keepends=True)
    wanted = set(region_lines(lines, start, end))
    found = []
    for line, col, text in code_tokens(source):
        if line not in wanted:
            continue
        new = "" if text == "not" else SWAPS.get(text)
        if new is None:
            continue
        old_line = lines[line - 1]
        width = len(text) + (1 if text == "not" else 0)  # `not x` -> `x`
        mutated_line = old_line[:col] + new + old_line[col + width:]
        found.append((line, f"{text!r} -> {new!r}" if new else "drop 'not'", mutated_line))
    for line in sorted(wanted - string_lines(source)):
        old_line = lines[line - 1]
        if PLAIN_STATEMENT.match(old_line) and not old_line.rstrip().endswith((",", "(", "[", "\\")) \
                and old_line.count("(") == old_line.count(")"):
            indent = old_line[:len(old_line) - len(old_line.lstrip())]
            found.append((line, "statement -> pass", indent + "pass\n"))
    result = []
    for line, what, mutated_line in found:
        new_source = "".join(lines[:line - 1] + [mutated_line] + lines[line:])
        try:
            compile(new_source, path, "exec")
        except SyntaxError:
            continue
        result.append((line, what, new_source))
    return result


def code_digest():
    """sha1 of every .py file of the repository (not out/): a verdict holds only for the code it was judged on."""
    h = hashlib.sha1()
    for folder, dirs, files in sorted(os.walk(ROOT)):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "out", "__pycache__", ".pytest_cache"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            h.update(os.path.relpath(path, ROOT).encode() + b"\0" + open(path, "rb").read())
    return h.hexdigest()


def earlier_verdicts(path, key):
    """{mutant as JSON: verdict} of an earlier run of the same campaign (same code, stages and -k) kept in `path`;
    timeouts are judged again."""
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict) or saved.get("key") != key:
        return {}
    mutant = lambda v: json.dumps({k: v[k] for k in ("file", "line", "edit", "code")}, sort_keys=True)  # noqa: E731
    return {mutant(v): v for v in saved.get("verdicts", []) if v.get("verdict") != "timeout"}


def write_verdicts(path, key, verdicts):
    """Write the campaign so far to `path` whole (a temporary file renamed over it: a stopped run leaves a readable
    file)."""
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "verdicts": verdicts}, f, indent=1)
    os.replace(path + ".tmp", path)


def pytest_command(tests, select):
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests,
            *(["-k", select] if select else [])]


def unmutated(copy, tests, timeout, select):
    """None if `tests` run and pass on the code as it is; otherwise what is wrong (a failing test, or a -k that selects
    nothing, pytest's exit 5: every mutant would then count as killed)."""
    code = subprocess.run(pytest_command(tests, select), cwd=copy, capture_output=True, timeout=timeout).returncode
    if code == 5:
        return f"-k {select!r} selects no test of {' '.join(tests)}"
    return None if code == 0 else f"{' '.join(tests)} fail (exit {code}) without a mutant"


def judge(copy, path, source, stages, timeout, select=None):
    """('killed', the stage that killed it), ('survived', None) or ('timeout', stage) for one mutant written into the
    copy of the repository, judged by each stage's tests in turn."""
    target = os.path.join(copy, path)
    original = open(target).read()
    with open(target, "w") as f:
        f.write(source)
    try:
        for i, tests in enumerate(stages, 1):
            try:
                code = subprocess.run(pytest_command(tests, select), cwd=copy, capture_output=True,
                                      timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                return "timeout", i
            if code != 0:
                return "killed", i
        return "survived", None
    finally:
        with open(target, "w") as f:
            f.write(original)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tests", nargs="+", default=None, help="the tests that judge each mutant, in one stage "
                        "(default: the stages of STAGES, " + " | ".join(" ".join(s) for s in STAGES) + ")")
    parser.add_argument("-k", dest="select", default="not compiled",
                        help="pytest's -k: which of those tests (default: all but the compiled step, 8 s of "
                             "torch.compile that sees the same code as the eager step)")
    parser.add_argument("--only", help="FILE:LINE: the mutants of one line")
    parser.add_argument("--regions", nargs="+", type=int, default=list(range(len(TARGETS))),
                        help="which of the targets to mutate, by index: " + "; ".join(
                            f"{i}: {path} from {start!r}" for i, (path, start, _) in enumerate(TARGETS)))
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as killed")
    parser.add_argument("--json", help="keep every verdict in this file, written after each mutant; run the same "
                        "command again and it judges only what the file lacks, if no .py file has changed since")
    args = parser.parse_args(argv)
    todo = [(path, line, what, source) for i, (path, start, end) in enumerate(TARGETS) if i in args.regions
            for line, what, source in mutants(path, start, end)
            if not args.only or args.only == f"{path}:{line}"]
    if args.list:
        for path, line, what, _ in todo:
            print(f"{path}:{line}: {what}")
        print(f"{len(todo)} mutants")
        return 0
    stages = [args.tests] if args.tests else STAGES
    key = {"code": code_digest(), "stages": stages, "select": args.select}
    earlier = earlier_verdicts(args.json, key)
    verdicts = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache"))
        baseline = [unmutated(copy, tests, args.timeout, args.select) for tests in stages]
        if any(baseline):
            sys.exit(f"mutants.py: the tests must pass on the code as it is before they can judge a mutant: "
                     f"{next(b for b in baseline if b)}")
        for i, (path, line, what, source) in enumerate(todo, 1):
            code = source.splitlines()[line - 1].strip()
            mutant = {"file": path, "line": line, "edit": what, "code": code}
            done = earlier.get(json.dumps(mutant, sort_keys=True))
            if done is None:
                seconds = time.perf_counter()
                verdict, stage = judge(copy, path, source, stages, args.timeout, args.select)
                done = {**mutant, "verdict": verdict, "stage": stage, "seconds": round(time.perf_counter() - seconds)}
            verdicts.append(done)
            print(f"[{i}/{len(todo)}] {done['verdict']:8s} {done['stage'] or '-'} {path}:{line}: {what}   {code}",
                  flush=True)
            if args.json:
                write_verdicts(args.json, key, verdicts + [v for k, v in earlier.items() if v not in verdicts])
    judged = [v for v in verdicts if v["verdict"] != "timeout"]  # a timeout is no verdict: run it again alone
    killed = sum(v["verdict"] == "killed" for v in judged)
    print(f"\n{killed} of {len(judged)} mutants killed ({100 * killed / max(1, len(judged)):.1f} %) by "
          f"{' | '.join(' '.join(s) for s in stages)} in {time.perf_counter() - start:.0f} s; "
          f"{len(verdicts) - len(judged)} timed out")
    for kind in ("survived", "timeout"):
        for v in verdicts:
            if v["verdict"] == kind:
                print(f"  {kind}: {v['file']}:{v['line']}: {v['edit']}   {v['code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
