"""The plumbing the standalone scripts share is one implementation copied verbatim: each shared
definition has the same text in every script that defines it, in the same order, so a fix made in one
copy and not the others fails here. Also: every line of the four scripts is at most 110 characters."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("shortrun_ebm.py", "dual_mcmc.py", "toy_1d_2d.py")
# Every concept the scripts share, in the order it stands in each file (a script may skip what it
# does not use: toy has no checkpoints, images or ranks). What differs per script is a constant of
# that script (PROG, RUN_FILES, REUSE_HINT, RESUME_OVERRIDES, OLD_RUN_DEFAULTS), not a variant of these.
SHARED = ("EXIT_USAGE", "IMAGE_EXTS", "UsageError", "ArgumentParser", "resolve_device", "seed_everything",
          "get_rng_state", "set_rng_state", "gather_rng", "atomic_save", "atomic_write_json", "load_file",
          "check_run_folder", "read_run", "merge_resume_args", "truncate_log", "folder_path", "folder_images",
          "save_grid", "plot_curves", "format_eta", "StopFlag", "any_rank", "setup_distributed",
          "autocast_for")
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
        for name in ("EXIT_USAGE", "UsageError", "ArgumentParser", "resolve_device", "check_run_folder",
                     "format_eta", *PER_SCRIPT):
            assert name in d, f"{script} lacks {name}"
        assert d["PROG"][0] == f'PROG = "{script}"'


def test_the_test_catches_drift(tmp_path, defs):
    """A copy that differs by one character is seen as different (the comparison is not vacuous)."""
    src = open(os.path.join(REPO, "toy_1d_2d.py")).read()
    drifted = src.replace("seconds = int(seconds)", "seconds = int(round(seconds))", 1)
    assert drifted != src
    (tmp_path / "toy.py").write_text(drifted)
    assert definitions(tmp_path / "toy.py")["format_eta"][0] != defs["shortrun_ebm.py"]["format_eta"][0]


@pytest.mark.parametrize("script", SCRIPTS + ("evaluate.py",))
def test_lines_are_at_most_110_characters(script):
    with open(os.path.join(REPO, script)) as fh:
        long = [i for i, line in enumerate(fh, 1) if len(line.rstrip("\n")) > 110]
    assert not long, f"{script}: lines longer than 110 characters: {long}"
