"""Execute every notebook of a folder with nbclient on the knlp kernel.

Usage: run_notebooks.py KNLP_BINARY NOTEBOOK_DIR WORKDIR

The kernelspec is installed into WORKDIR/prefix; each notebook runs with
WORKDIR/<name> as its working folder (its runs and plots land there, not in
the repository) and must finish without an error. Stored notebooks must
have their outputs cleared.
"""
import glob
import os
import subprocess
import sys
import time

import nbformat
from nbclient import NotebookClient

knlp, nbdir, work = sys.argv[1], sys.argv[2], sys.argv[3]
prefix = os.path.join(work, "prefix")
subprocess.run([knlp, "jupyter", "install", "--prefix", prefix], check=True, stdout=subprocess.DEVNULL)
os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")

paths = sorted(glob.glob(os.path.join(nbdir, "*.ipynb")))
assert paths, f"no notebooks in {nbdir}"
for path in paths:
    nb = nbformat.read(path, as_version=4)
    name = os.path.splitext(os.path.basename(path))[0]
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path}: cell {i} is stored with outputs"
    assert nb.metadata.get("kernelspec", {}).get("name") == "knlp", f"{path}: kernelspec is not knlp"
    cwd = os.path.join(work, name)
    os.makedirs(cwd, exist_ok=True)
    t0 = time.time()
    client = NotebookClient(nb, kernel_name="knlp", timeout=900, resources={"metadata": {"path": cwd}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path}: {errors}"
    kinds = sorted({o.output_type for o in outputs})
    nbformat.write(nb, os.path.join(work, name + ".executed.ipynb"))
    print(f"ok {name}: {len(nb.cells)} cells, outputs {kinds}, {time.time() - t0:.1f} s")
print(f"notebooks ran: {len(paths)}")
