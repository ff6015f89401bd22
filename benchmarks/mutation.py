"""Mutation testing of the core modules with mutmut (configured in pyproject.toml's ``[tool.mutmut]``); not in CI.

    nice -n 10 python benchmarks/mutation.py                 # every core module, one worker
    python benchmarks/mutation.py caa loading                # some modules
    python benchmarks/mutation.py --report                   # the table of the last run, no mutants run

mutmut copies ``src/`` to ``mutants/``, records in one pass over the selected test files which tests call which
function, then runs each mutant against only those tests. Per module this script runs
``mutmut run "pole_hf.<module>.*"`` and prints a Markdown table: mutants, killed, equivalent (listed below with the reason, not counted), surviving,
score = killed / (mutants - equivalent). Mutant names are numbered by mutmut per function: after editing a module,
check the equivalent list with ``mutmut show NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ["caa", "objective", "masks", "evaluation", "prompt_learner", "selection", "loading", "data/voc", "data/spec",
        "cam_network_objective"]
KILLED = {1, 3, 37}  # mutmut: test failure, pytest internal error, caught by the type check

# mutants no behaviour can tell apart from the original (name -> reason); excluded from the score
EQUIVALENT: dict[str, str] = {}


def module_prefix(module: str) -> str:
    return "pole_hf." + module.replace("/", ".") + "."


def meta_path(module: str) -> Path:
    return ROOT / "mutants" / "src" / "pole_hf" / f"{module}.py.meta"


def module_report(module: str) -> dict:
    path = meta_path(module)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `python benchmarks/mutation.py {module}` first")
    codes = json.loads(path.read_text())["exit_code_by_key"]
    equivalent = sorted(name for name in codes if name in EQUIVALENT)
    killed = sorted(name for name, code in codes.items() if code in KILLED and name not in EQUIVALENT)
    surviving = sorted(name for name, code in codes.items() if code not in KILLED and name not in EQUIVALENT)
    counted = len(codes) - len(equivalent)
    return {"module": module, "mutants": len(codes), "killed": len(killed), "equivalent": equivalent,
            "surviving": {name: codes[name] for name in surviving},
            "score": len(killed) / counted if counted else 1.0}


def run_module(module: str, max_children: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # mutmut puts mutants/src first and must not see another pole_hf
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                             module_prefix(module) + "*"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    if result.returncode:
        raise SystemExit(f"mutmut run for {module} exited with {result.returncode}: rerun it by hand to see why")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=CORE, help=f"modules under src/pole_hf (default: {CORE})")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutants (default 1)")
    parser.add_argument("--report", action="store_true", help="only print the table of the last run")
    parser.add_argument("--json", help="also write the per-module results to this file")
    args = parser.parse_args()
    unknown = [m for m in args.modules if not (ROOT / "src" / "pole_hf" / f"{m}.py").is_file()]
    if unknown:
        parser.error(f"no module src/pole_hf/<name>.py for {unknown}; core modules: {CORE}")
    seconds = {} if args.report else {m: run_module(m, args.max_children) for m in args.modules}
    reports = [module_report(m) for m in args.modules]
    print("| module | mutants | killed | equivalent | surviving | score | run (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in reports:
        took = f"{seconds[r['module']]:.0f}" if r["module"] in seconds else "-"
        print(f"| {r['module']} | {r['mutants']} | {r['killed']} | {len(r['equivalent'])} | {len(r['surviving'])} "
              f"| {100 * r['score']:.1f}% | {took} |")
    for r in reports:
        for name, code in r["surviving"].items():
            print(f"surviving ({'not run' if code is None else code}): {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
