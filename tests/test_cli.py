"""The command line: every --help reads as plain text (each option explained, its default shown once,
no reST markup), and a device this machine lacks is a one-line error, not a traceback."""
import argparse
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from attn_patch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "recipes").glob("*.py"))
REST = re.compile(r"``|:(func|class|meth|mod|attr):`|::$", re.MULTILINE)


def _parsers(parser):
    """``parser`` and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _entries(help_text: str) -> list[str]:
    """The entries of the argument sections ("options:", "positional arguments:"): each starts at a
    line indented by two spaces, its help continues on lines indented further."""
    entries, in_section = [], False
    for line in help_text.splitlines():
        if re.fullmatch(r"\S.*:", line):
            in_section = line == "options:" or line.endswith("arguments:")
        elif in_section and re.match(r"  \S", line):
            entries.append(line)
        elif in_section and entries and line.startswith("   "):
            entries[-1] += "\n" + line
    return entries


def _problems(help_text: str) -> list[str]:
    problems = [f"reST markup {m.group(0)!r}" for m in REST.finditer(help_text)]
    for entry in _entries(help_text):
        first, *rest = entry.split("\n")
        if not rest and not re.search(r"\S  +\S", first.strip()):
            problems.append(f"no help text: {first.strip()}")
        if len(re.findall(r"default:", entry, re.IGNORECASE)) > 1:
            problems.append(f"default shown twice: {' '.join(entry.split())}")
        if re.search(r"default: (None|False)\)", entry):
            problems.append(f"meaningless default: {' '.join(entry.split())}")
    return problems


def _script_help(path: Path, capsys) -> str:
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = getattr(module, "main", None) or module.parse_args
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_subcommand_help_reads_well(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parsers = list(_parsers(build_parser()))
    assert {p.prog for p in parsers} >= {"attn-patch", "attn-patch run", "attn-patch methods", "attn-patch eval ppl",
                                         "attn-patch eval passkey", "attn-patch bench e2e", "attn-patch bench s2"}
    problems = {p.prog: _problems(p.format_help()) for p in parsers}
    assert {prog: found for prog, found in problems.items() if found} == {}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_help_reads_well(script, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    text = _script_help(script, capsys)
    assert text.startswith("usage:")
    assert _problems(text) == []


def test_help_shows_defaults_once_and_plainly(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    parsers = {p.prog: p for p in _parsers(build_parser())}
    text = parsers["attn-patch eval passkey"].format_help()
    assert "prompts per length (default: 10)" in text
    assert "(default: 1024 2048 4096 8192)" in text  # as it is typed, not a Python list
    assert "(chat=True, --chat)" in text and "(build_passkey_prompt, evaluate_passkey)" in text
    assert "random seed (default: 0)" in text  # a zero default is still shown
    assert "prompt length in tokens (default: 512)" in parsers["attn-patch run"].format_help()


def test_the_problem_finder_finds_problems():
    bad = ("usage: x\n\noptions:\n  --a A       a thing (default: 1) (default: 1)\n  --no-help\n"
           "  --b B       see :func:`f` and ``g`` (default: None)\n")
    found = _problems(bad)
    assert len(found) == 6, found  # the two `` of one literal count twice


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv", [["eval", "passkey", "--lengths", "256", "--trials", "1"], ["run"]])
def test_cli_device_cuda_without_cuda_is_a_clear_error(argv, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr("attn_patch.models.default_gguf_path", no_loading)
    assert main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "error: device 'cuda'" in err and "--device cpu" in err and "CUDA build of torch" in err
    assert "Traceback" not in err
