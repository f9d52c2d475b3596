"""Helpers the test files share (imported from conftest): one CPU thread, main(argv) -> (exit code, stderr),
tiny image folders drawn here, a script's method block run alone, the JSON files a run writes, a training
subprocess that has logged a few rows (for the stop-signal tests)."""
import ast
import json
import os
import re
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_IMPORTS = ("import math\nimport contextlib\nimport torch\nimport torch.nn as nn\n"
                  "import torch.nn.functional as F\n")       # all a method block may use


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny nets on a shared 2-core machine: two contending OpenMP threads run them several times slower
    than one (a 20-step chain of shortrun_ebm's n_f 8 net at B = 32: 1.25 s vs 0.35 s). Child processes
    (torchrun, Ctrl-C runs) get one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def run_main(main, argv, capsys=None):
    """main(argv) -> (exit code, stderr since the last read or ""); argparse's errors arrive as SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, (capsys.readouterr().err if capsys else "")


def draw_squares(folder, n, size=32, seed=0):
    """n PNGs: dark background, one bright square of a random hue (structured, far from uniform noise)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = np.full((size, size, 3), 20, np.uint8)
        s = int(rng.integers(size // 4, size // 2))
        x, y = rng.integers(0, size - s, 2)
        im[y:y + s, x:x + s] = (np.array([1.0, 0.3, 0.2])[rng.permutation(3)] * 230).astype(np.uint8)
        Image.fromarray(im).save(os.path.join(folder, f"{i:04d}.png"))
    return folder


def draw_disks(folder, n, seed=0):
    """n 32x32 PNGs: reddish background with a vertical green ramp and a yellow disk."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    for i in range(n):
        im = np.zeros((32, 32, 3))
        im[..., 0], im[..., 1], im[..., 2] = 200, 60 + 3 * yy, 40
        cy, cx, r = *rng.integers(8, 24, 2), rng.integers(4, 8)
        im[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = [250, 250, 80]
        Image.fromarray(im.astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return folder


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return draw_squares(str(tmp_path_factory.mktemp("squares")), 64)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return draw_disks(str(tmp_path_factory.mktemp("imgs")), 64)


def method_block(script):
    """REPO/script's text from the line starting '# ---- method' to the next line starting '# ----';
    above it only the docstring and imports."""
    with open(os.path.join(REPO, script)) as fh:
        lines = fh.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- method"))
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("# ----"))
    above = [node for node in ast.parse("\n".join(lines)).body if node.lineno <= start]
    assert all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in above[1:]), script
    return "\n".join(lines[start:end]) + "\n"


def banner_imports(block):
    """The import lines a method block's banner names ("# Runs alone ... imports contextlib, torch and
    torch.nn as nn."), each one of METHOD_IMPORTS'."""
    line = next(line for line in block.splitlines()[1:3] if "imports " in line)
    names = re.split(r", | and ", line.split("imports ", 1)[1].strip().rstrip("."))
    imports = "".join(f"import {name}\n" for name in names)
    assert set(imports.splitlines()) <= set(METHOD_IMPORTS.splitlines()), imports
    return imports


def exec_method_block(script, path):
    """script's method block run alone under the imports its banner names, written to path (tracebacks
    name it): its namespace, into which nothing but those came along."""
    block = method_block(script)
    source = banner_imports(block) + "\n" + block
    path.write_text(source)
    ns = {"__name__": path.stem}
    exec(compile(source, str(path), "exec"), ns)
    assert not {"np", "os", "sys", "json", "argparse", "dist", "torchvision"} & set(ns)
    return ns


def read_json(*path):
    """The JSON object in os.path.join(*path), e.g. read_json(out, "metrics.json")."""
    with open(os.path.join(*path)) as fh:
        return json.load(fh)


def read_jsonl(*path):
    """The rows of a JSON-lines file, e.g. read_jsonl(out, "log.jsonl")."""
    with open(os.path.join(*path)) as fh:
        return [json.loads(line) for line in fh]


def run_until_logged(cmd, out, cwd, rows=3):
    """cmd started in cwd; returns the process once its log.jsonl holds `rows` rows."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=cwd)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len(read_jsonl(out, "log.jsonl")) < rows:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    return proc
