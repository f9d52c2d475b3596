"""The plumbing the standalone scripts share is one implementation copied verbatim: each definition of a
script's shared block is the text of shortrun_ebm.py's, in the same order, so a fix made in one copy and
not the others fails here. Also: every line of the four scripts is at most 110 characters."""
import ast
import os

import pytest
import torch

import dual_mcmc as dm
import shortrun_ebm as sr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("shortrun_ebm.py", "dual_mcmc.py", "toy_1d_2d.py")
# What differs per script is a constant of that script, not a variant of a shared definition.
PER_SCRIPT = ("PROG", "REUSE_HINT", "RUN_FILES")


def definitions(path):
    """name -> (source text, position, in the shared block?) of every top-level def, class and assignment.
    The shared block is the appendix: from the line starting '# ---- appendix: shared harness' to the end
    of the file (only `if __name__ == "__main__"` may follow it)."""
    with open(path) as fh:
        src = fh.read()
    lines = src.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ---- appendix: shared harness")) + 1
    end = len(lines) + 1
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
            found[name] = (ast.get_source_segment(src, node), pos, start < node.lineno < end)
    return found


@pytest.fixture(scope="module")
def defs():
    return {script: definitions(os.path.join(REPO, script)) for script in SCRIPTS}


def test_every_shared_definition_is_shortrun_ebms_text_in_the_same_order(defs):
    """shortrun_ebm.py's shared block is the reference; the others copy from it what they use, verbatim,
    in its order, and define nothing else in their shared block."""
    ref = {n: v for n, v in defs["shortrun_ebm.py"].items() if v[2]}
    assert {"read_checkpoint", "load_data", "time_steps", "restore_rng", "print_config"} <= set(ref)
    order = sorted(ref, key=lambda n: ref[n][1])
    for script in SCRIPTS[1:]:
        shared = {n: v for n, v in defs[script].items() if v[2]}
        assert set(shared) <= set(ref), f"{script}: not in shortrun_ebm.py's block: {set(shared) - set(ref)}"
        for name, (text, _, _) in shared.items():
            assert text == ref[name][0], f"{name} differs between shortrun_ebm.py and {script}"
        assert sorted(shared, key=lambda n: shared[n][1]) == [n for n in order if n in shared], script
    assert set(defs["dual_mcmc.py"]) >= set(ref)       # dual uses the whole block


def test_each_script_has_the_essentials_and_its_own_constants(defs):
    for script, d in defs.items():
        for name in ("EXIT_USAGE", "UsageError", "usage_error", "ArgumentParser", "HelpFormatter",
                     "resolve_device", "check_run_folder", "format_eta", *PER_SCRIPT):
            assert name in d, f"{script} lacks {name}"
        assert d["PROG"][0] == f'PROG = "{script}"' and not d["PROG"][2]


def test_the_test_catches_drift(tmp_path, defs):
    """A copy that differs by one character is seen as different (the comparison is not vacuous)."""
    src = open(os.path.join(REPO, "toy_1d_2d.py")).read()
    drifted = src.replace("seconds = int(seconds)", "seconds = int(round(seconds))", 1)
    assert drifted != src
    (tmp_path / "toy.py").write_text(drifted)
    assert definitions(tmp_path / "toy.py")["format_eta"][0] != defs["shortrun_ebm.py"]["format_eta"][0]


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    """get_rng_state -> torch.save -> torch.load(weights_only=True) -> set_rng_state replays the same torch
    draws (the only generator the scripts draw from), in both training scripts."""
    cpu = torch.device("cpu")
    sr.seed_everything(3)
    torch.save(sr.get_rng_state(cpu), tmp_path / "rng.pt")
    expected = torch.rand(4).tolist()
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    for module in (sr, dm):
        torch.manual_seed(99)                                               # move the stream elsewhere
        module.set_rng_state(state, cpu)
        assert torch.rand(4).tolist() == expected


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


def test_a_repeated_stop_signal_counts_once_and_a_later_one_aborts(monkeypatch, capfd):
    """torchrun forwards the SIGTERM a scheduler also sends its workers: a repeat within REPEAT_S is the same
    stop; a signal after that is a user's second Ctrl-C and aborts."""
    clock = [100.0]
    monkeypatch.setattr(sr.time, "monotonic", lambda: clock[0])
    with sr.StopFlag() as stop:
        stop.handle(sr.signal.SIGTERM, None)
        clock[0] += sr.REPEAT_S / 2
        stop.handle(sr.signal.SIGTERM, None)
        assert stop.requested
        clock[0] += sr.REPEAT_S
        with pytest.raises(KeyboardInterrupt):
            stop.handle(sr.signal.SIGINT, None)
    assert capfd.readouterr().err.count("saving a checkpoint") == 1       # written to fd 2, not print


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_name_the_shared_block_reads_exists_in_the_script(script):
    """A copied definition may read a module (shutil, io, ...) its new script never imported: every global
    name read inside the shared block resolves in that script (a NameError would surface only on the rare
    path that reads it, e.g. a failed download)."""
    import builtins
    import importlib
    module = importlib.import_module(script.removesuffix(".py"))
    src = open(os.path.join(REPO, script)).read()
    start = src.index("\n# ---- appendix: shared harness")
    block = ast.parse(src[start:])
    local = {n.id for n in ast.walk(block) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    local |= {a.arg for n in ast.walk(block) if isinstance(n, ast.arguments)
              for a in n.args + n.kwonlyargs + [x for x in (n.vararg, n.kwarg) if x]}
    local |= {n.name for n in ast.walk(block) if isinstance(n, ast.ExceptHandler) and n.name}
    local |= {(a.asname or a.name).split(".")[0] for n in ast.walk(block)
              if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}     # imports inside functions
    read = {n.id for n in ast.walk(block) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    missing = {name for name in read - local if not hasattr(module, name) and not hasattr(builtins, name)}
    assert not missing, f"{script}: the shared block reads undefined names {sorted(missing)}"
