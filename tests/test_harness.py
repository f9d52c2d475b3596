"""The plumbing the standalone scripts share is one implementation copied verbatim: each shared
definition has the same text in every script that defines it, in the same order, so a fix made in one
copy and not the others fails here. Also: every line of the four scripts is at most 110 characters."""
import ast
import os
import random

import numpy as np
import pytest
import torch

import dual_mcmc as dm
import shortrun_ebm as sr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("shortrun_ebm.py", "dual_mcmc.py", "toy_1d_2d.py")
# Every concept the scripts share, in the order it stands in each file (a script may skip what it
# does not use: toy has no checkpoints, images or ranks). What differs per script is a constant of
# that script (PROG, RUN_FILES, REUSE_HINT, RESUME_OVERRIDES, OLD_RUN_DEFAULTS), not a variant of these.
SHARED = ("EXIT_USAGE", "IMAGE_EXTS", "UsageError", "usage_error", "ArgumentParser", "HelpFormatter",
          "resolve_device", "seed_everything", "get_rng_state", "set_rng_state", "gather_rng",
          "atomic_write", "atomic_save", "atomic_write_json", "versions", "load_file", "check_run_folder",
          "read_run", "merge_resume_args", "read_log", "truncate_log", "folder_path", "folder_images",
          "place_data", "save_grid", "plot_curves", "format_eta", "StopFlag", "any_rank", "setup_distributed",
          "autocast_for", "cuda_graph_replay")
PER_SCRIPT = ("PROG", "REUSE_HINT")


def definitions(path):
    """name -> (source text, position) of every top-level def, class and assignment of a file."""
    with open(path) as fh:
        src = fh.read()
    found = {}
    for pos, node in enumerate(ast.parse(src).body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [e.id for t in node.targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                     if isinstance(e, ast.Name)]
        else:
            continue
        for name in names:
            found[name] = (ast.get_source_segment(src, node), pos)
    return found


@pytest.fixture(scope="module")
def defs():
    return {script: definitions(os.path.join(REPO, script)) for script in SCRIPTS}


@pytest.mark.parametrize("name", SHARED)
def test_a_shared_definition_is_the_same_text_in_every_script_that_has_it(name, defs):
    texts = {script: d[name][0] for script, d in defs.items() if name in d}
    assert len(texts) >= 2, f"{name} is shared by fewer than two scripts: {sorted(texts)}"
    first_script, first = next(iter(texts.items()))
    for script, text in texts.items():
        assert text == first, f"{name} differs between {first_script} and {script}"


def test_shared_definitions_stand_in_the_same_order_and_each_script_has_the_essentials(defs):
    for script, d in defs.items():
        positions = [d[name][1] for name in SHARED if name in d]
        assert positions == sorted(positions), f"{script}: shared definitions out of order"
        for name in ("EXIT_USAGE", "UsageError", "usage_error", "ArgumentParser", "resolve_device",
                     "check_run_folder", "format_eta", *PER_SCRIPT):
            assert name in d, f"{script} lacks {name}"
        assert d["PROG"][0] == f'PROG = "{script}"'


def test_the_test_catches_drift(tmp_path, defs):
    """A copy that differs by one character is seen as different (the comparison is not vacuous)."""
    src = open(os.path.join(REPO, "toy_1d_2d.py")).read()
    drifted = src.replace("seconds = int(seconds)", "seconds = int(round(seconds))", 1)
    assert drifted != src
    (tmp_path / "toy.py").write_text(drifted)
    assert definitions(tmp_path / "toy.py")["format_eta"][0] != defs["shortrun_ebm.py"]["format_eta"][0]


def test_rng_state_survives_a_weights_only_checkpoint_in_old_and_new_formats(tmp_path):
    """get_rng_state -> torch.save -> torch.load(weights_only=True) -> set_rng_state replays the same torch,
    numpy and python draws; so do the formats older checkpoints hold (dual's python state as lists)."""
    cpu = torch.device("cpu")
    sr.seed_everything(3)
    torch.save(sr.get_rng_state(cpu), tmp_path / "rng.pt")
    draws = lambda: (torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)])
    expected = draws()
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    old_dual = dict(state, python=[state["python"][0], list(state["python"][1]), state["python"][2]])
    for module, s in ((sr, state), (dm, old_dual), (dm, state)):
        random.seed(99), np.random.seed(99), torch.manual_seed(99)          # move every stream elsewhere
        module.set_rng_state(s, cpu)
        assert draws() == expected


def test_toy_refuses_an_out_that_is_a_file_in_one_line(tmp_path, capsys):
    import toy_1d_2d as toy
    (tmp_path / "run").write_text("my notes")
    assert toy.main(["--density", "mog1d", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"toy_1d_2d.py: error: --out {tmp_path / 'run'} is a file; choose a folder"]
    assert (tmp_path / "run").read_text() == "my notes"


@pytest.mark.parametrize("script", SCRIPTS + ("evaluate.py",))
def test_lines_are_at_most_110_characters(script):
    with open(os.path.join(REPO, script)) as fh:
        long = [i for i, line in enumerate(fh, 1) if len(line.rstrip("\n")) > 110]
    assert not long, f"{script}: lines longer than 110 characters: {long}"


@pytest.mark.parametrize("module", ["shortrun_ebm", "dual_mcmc"])
def test_resume_log_truncation_survives_a_line_cut_off_by_a_kill(module, tmp_path):
    script = __import__(module)
    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 10, "f": 1.0}\n{"iteration": 20, "f": 2.0}\n'
                   '{"iteration": 30, "f": 3.0}\n{"iteration": 40, "f"')       # killed mid-write
    assert [row["iteration"] for _, row in script.read_log(log)] == [10, 20, 30]
    script.truncate_log(log, 20)
    assert log.read_text() == '{"iteration": 10, "f": 1.0}\n{"iteration": 20, "f": 2.0}\n'
