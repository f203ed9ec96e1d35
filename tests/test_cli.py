"""The command lines as a newcomer meets them: --help says what each flag defaults to (and the description
once), an abbreviated flag is an error rather than a guess, and a failing run writes nothing first."""
import ast
import pathlib
import subprocess
import sys

import pytest

import finetune
import pretrain

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("*.py"), *ROOT.glob("data/*.py")])
# every command-line script (a __main__ block) answers --help before torch is imported (seconds): the
# heavy imports come after the command line, and the names finetune.py's flags offer live in config.py
LIGHT_HELP = [str(p.relative_to(ROOT)) for p in sorted([*SCRIPTS, *ROOT.glob("scripts/*.py")])
              if 'if __name__ == "__main__"' in p.read_text()]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_argument_parser_turns_prefix_matching_off(path):
    # with prefix matching, `--lr-min 0` would silently set a flag that merely starts that way, and a flag
    # added later would change what an old command line means
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
            kw = {k.arg: k.value for k in node.keywords}
            assert "allow_abbrev" in kw and kw["allow_abbrev"].value is False, f"{path.name}:{node.lineno}"


def test_an_abbreviated_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.build_parser().parse_args(["--max-step", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --max-step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--max-step", "3"])


def test_finetune_help_shows_the_defaults_and_its_description_once(capsys):
    with pytest.raises(SystemExit):
        finetune.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert text.count(finetune.__doc__.split("\n")[0]) == 1
    flat = " ".join(text.split())
    for shown in ("--task {binary,multiclass,pair,regression,simcse,token,qa,prompt} what the labels are: see Tasks above "
                  "(default: binary; not with --tasks)", "--method", "(default: full)", "--adv-steps ADV_STEPS ascent steps of pgd / freelb (default: 3)",
                  "--out OUT output folder: checkpoint, exported model, metrics.jsonl (default: out/finetune)"):
        assert shown in flat, shown


def test_pretrain_help_explains_attention_dropout_and_seed(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--attention {sdpa,math} sdpa: PyTorch's fused" in flat
    assert "--dropout DROPOUT dropout on hidden states and attention weights (default: 0.1)" in flat
    assert "--seed SEED seeds dropout" in flat


def test_a_bad_init_fails_before_the_sample_or_the_output_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "SAMPLE_DIR", tmp_path / "sample_binary")
    monkeypatch.setattr(finetune, "GLUE_DIR", tmp_path / "glue")
    code = finetune.main(["--task", "binary", "--init", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --init {tmp_path / 'nowhere'}: folder not found")
    assert not (tmp_path / "sample_binary").exists() and not (tmp_path / "out").exists()


def test_pretrain_on_raw_text_suggests_a_prepared_folder_outside_the_raw_data(tmp_path, monkeypatch):
    raw = tmp_path / "books"
    raw.mkdir()
    (raw / "a.txt").write_text("some raw text\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        pretrain.Shards(str(raw))
    assert f"python data/prepare.py --input {raw} --out data/books, then --data data/books" in str(e.value)
    inside = tmp_path / "data" / "books"                 # raw text already under data/: a name beside it
    inside.mkdir(parents=True)
    with pytest.raises(ValueError, match="--out data/books-prepared"):
        pretrain.Shards("data/books")


# torch made unimportable: `import torch` anywhere raises ImportError, so the script can only answer --help
# (exit 0, its usage line) if nothing on that path imports it. No clock involved.
BLOCK_TORCH = """import runpy, sys
sys.modules["torch"] = None
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", LIGHT_HELP)
def test_help_is_answered_without_importing_torch(script):
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and "--help" in proc.stdout


def test_the_torch_block_itself_works(tmp_path):
    # the check above is only worth something if a script that imports torch before parsing fails under it
    script = tmp_path / "heavy.py"
    script.write_text("import argparse\nimport torch\nargparse.ArgumentParser().parse_args()\n")
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_a_bad_flag_is_answered_before_torch_too():
    code = BLOCK_TORCH.replace('"--help"', '"--max-step", "3"')
    proc = subprocess.run([sys.executable, "-c", code, "pretrain.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --max-step" in proc.stderr


def test_the_flag_names_in_config_are_the_keys_of_the_tables_behind_them():
    import config
    import multitask
    import peft
    from finetuned import TASKS
    assert tuple(TASKS) == config.TASK_KINDS
    assert list(peft.METHODS) == list(config.PEFT_OPTIONS)
    assert all(m.options == config.PEFT_OPTIONS[name] for name, m in peft.METHODS.items())
    assert multitask.SAMPLING is config.SAMPLING


def test_finetune_help_describes_every_task_kind_of_the_table():
    import finetune
    from finetuned import TASKS
    tasks_section = finetune.__doc__.split("Tasks:", 1)[1].split("\n\n", 1)[0]
    listed = {line.split()[0] for line in tasks_section.splitlines()[1:] if line.startswith("    ") and line.split()}
    assert set(TASKS) <= listed, f"not described in finetune.py's Tasks: {sorted(set(TASKS) - listed)}"
