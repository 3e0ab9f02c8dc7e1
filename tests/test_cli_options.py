"""The command line derives its flags from the option dataclasses and sets no defaults of its own; errors are
one line, with the cause under --debug or MEA_DEBUG=1."""

import argparse
from dataclasses import dataclass, field, fields

import pytest

from mea.cli import add_dataclass_options, build_parser, main
from mea.compress.pipeline import CompressOptions
from mea.compress.recover import DistillConfig
from mea.train import TrainConfig


def leaf_parsers(parser: argparse.ArgumentParser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from leaf_parsers(child, path + (name,))


def dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions}


def test_every_option_field_has_a_flag():
    parsers = dict(leaf_parsers(build_parser()))
    assert {f.name for f in fields(CompressOptions)} <= dests(parsers[("compress",)])
    assert {f.name for f in fields(DistillConfig)} <= dests(parsers[("recover",)])
    assert {f.name for f in fields(TrainConfig)} - {"model"} <= dests(parsers[("train",)])


def test_parser_sets_no_defaults():
    """A flag not given is not passed: the default of the dataclass or the called function applies."""
    top = build_parser()
    for path, parser in leaf_parsers(top):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.default is argparse.SUPPRESS, (path, action.dest, action.default)
    args = vars(top.parse_args(["compress", "src", "out"]))
    assert set(args) == {"command", "run", "debug", "src", "out"}


def test_flags_reach_the_option_dataclasses(monkeypatch, capsys):
    import mea.compress.pipeline as pipeline

    seen = {}

    def fake_compress(src, out, opts, *, overwrite=False):
        seen.update(src=src, out=out, opts=opts, overwrite=overwrite)
        return {"out": out}

    monkeypatch.setattr(pipeline, "compress", fake_compress)
    code = main(["compress", "s", "o", "--virtual-heads", "2", "--no-eval", "--fit-kv-only", "--calib", "a", "b",
                 "--no-value-weighting", "--fit-mode", "teacher", "--eval-windows", "3"])
    assert code == 0
    assert seen["opts"] == CompressOptions(virtual_heads=2, evaluate=False, fit_query_output=False, calib=["a", "b"],
                                           value_weighting=False, fit_mode="teacher", eval_windows=3)
    assert seen["overwrite"] is False
    args = vars(build_parser().parse_args(["recover", "s", "o", "--teacher", "t", "--precision", "fp32",
                                           "--tokens", "512", "--train", "all", "--warmup-steps", "2",
                                           "--domain", "shakespeare"]))
    given = {k: args[k] for k in args if k in {f.name for f in fields(DistillConfig)}}
    assert DistillConfig(**given) == DistillConfig(precision="fp32", tokens=512, train="all", warmup_steps=2,
                                                   domain="shakespeare")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "s", "o", "--fit-mode", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_new_field_is_all_it_takes_to_get_a_flag():
    @dataclass
    class Options:
        knob: int = 3  # how far to turn the knob (10% steps)
        ratio: float | None = None
        names: list[str] = field(default_factory=list)  # some names
        mode: str = field(default="a", metadata={"choices": ("a", "b")})  # a or b
        fast: bool = False  # go fast
        check: bool = field(default=True, metadata={"flag": "--no-check"})  # check the result

    p = argparse.ArgumentParser()
    add_dataclass_options(p, Options)
    helps = {a.dest: a.help for a in p._actions}
    assert helps["knob"] == "how far to turn the knob (10%% steps) (default 3)"
    assert helps["mode"] == "a or b (default a)" and helps["fast"] == "go fast (default off)"
    assert helps["check"] == "check the result (default on; this flag turns it off)"
    assert "10% steps" in p.format_help()
    assert Options(**vars(p.parse_args([]))) == Options()
    parsed = Options(**vars(p.parse_args(["--knob", "5", "--ratio", "0.5", "--names", "x", "y", "--mode", "b",
                                          "--fast", "--no-check"])))
    assert parsed == Options(knob=5, ratio=0.5, names=["x", "y"], mode="b", fast=True, check=False)

    @dataclass
    class Unsupported:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="no command-line flag"):
        add_dataclass_options(argparse.ArgumentParser(), Unsupported)


@pytest.fixture
def bad_config(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    return ["train", "--out", str(tmp_path / "run"), "--config", str(path)]


def test_value_error_is_one_line_without_debug(capsys, monkeypatch, bad_config):
    monkeypatch.delenv("MEA_DEBUG", raising=False)
    assert main(bad_config) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mea train: error: could not parse")
    assert "--debug or MEA_DEBUG=1 shows the cause" in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["flag-first", "flag-last", "env"])
def test_debug_shows_the_cause(capsys, monkeypatch, bad_config, how):
    monkeypatch.delenv("MEA_DEBUG", raising=False)
    argv = {"flag-first": ["--debug", *bad_config], "flag-last": [*bad_config, "--debug"], "env": bad_config}[how]
    if how == "env":
        monkeypatch.setenv("MEA_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "JSONDecodeError" in err and "direct cause" in err
    assert err.rstrip().splitlines()[-1].startswith("mea train: error: could not parse")
