"""Runs kconfiglib's tools for many cases in one Python process.

Usage: python oracle_driver.py MANIFEST

MANIFEST has one JSON object per line:
  {"cwd": DIR, "result": DIR, "tool": NAME, "args": [...], "env": {...}}

For each case the tool's main() runs with that working directory,
environment (replacing os.environ) and sys.argv; stdout, stderr and the exit
status are written to result/stdout, result/stderr and result/status.
The tool "get" prints a symbol's value after loading the configuration (the
counterpart of `config get`).
"""
import contextlib
import importlib
import io
import json
import os
import sys
import traceback

import kconfiglib

if kconfiglib.VERSION != (14, 1, 0):
    sys.exit("kconfiglib 14.1.0 required, found {}".format(kconfiglib.VERSION))


def get_main():
    kconf = kconfiglib.Kconfig("Kconfig", suppress_traceback=True)
    print(kconf.load_config(), file=sys.stderr)
    name = sys.argv[1]
    sym = kconf.syms.get(name)
    if sym is None:
        sys.exit("error: no symbol '{}' in configuration".format(name))
    print(sym.str_value)


def run_case(case):
    os.chdir(case["cwd"])
    os.environ.clear()
    os.environ.update(case["env"])
    sys.argv = [case["tool"]] + case["args"]
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if case["tool"] == "get":
                get_main()
            else:
                importlib.import_module(case["tool"]).main()
        except SystemExit as e:
            if e.code is None:
                status = 0
            elif isinstance(e.code, int):
                status = e.code
            else:
                err.write(str(e.code) + "\n")
                status = 1
        except Exception:
            traceback.print_exc(file=err)
            status = 1
    res = case["result"]
    os.makedirs(res, exist_ok=True)
    with open(os.path.join(res, "stdout"), "w") as f:
        f.write(out.getvalue())
    with open(os.path.join(res, "stderr"), "w") as f:
        f.write(err.getvalue())
    with open(os.path.join(res, "status"), "w") as f:
        f.write(str(status))


def main():
    saved_env = dict(os.environ)
    with open(sys.argv[1]) as f:
        cases = [json.loads(line) for line in f if line.strip()]
    for case in cases:
        run_case(case)
    os.environ.clear()
    os.environ.update(saved_env)
    print("ran {} cases".format(len(cases)))


if __name__ == "__main__":
    main()
