"""Configs (hsd.config): YAML + key=value overrides, type coercion, unknown keys, validation, save/load
round trip, and the command-line error contract (one line on stderr, exit status 2)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, Optional

import pytest
import yaml

from hsd.config import (
    apply_overrides,
    config_diff,
    config_from_dict,
    config_to_dict,
    load_config,
    run_main,
    save_config,
)
from train.config import BaseTrainConfig


@dataclasses.dataclass
class Opt:
    beta: float = 0.9
    name: str = "adamw"


@dataclasses.dataclass
class MyConfig(BaseTrainConfig):
    layers: list[int] = dataclasses.field(default_factory=lambda: [2, 4])
    temperature: Optional[float] = None
    head: Literal["lens", "mlp"] = "lens"
    sizes: tuple[int, ...] = (1, 2)
    opt: Opt = dataclasses.field(default_factory=Opt)

    resume_mutable: ClassVar[frozenset[str]] = BaseTrainConfig.resume_mutable | {"temperature"}


def test_defaults_match_pinned_interface():
    cfg = BaseTrainConfig()
    assert cfg.data == ["data/smollm2_chat.jsonl"] and cfg.batch_size == 1 and cfg.lr == 1e-4
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.warmup_ratio, cfg.max_grad_norm) == (0.9, 0.95, 0.015, 0.5)
    assert cfg.report_to == "wandb" and cfg.resume is False and cfg.overwrite is False
    assert BaseTrainConfig().data is not cfg.data  # no shared mutable default


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 3.0e-4\nbatch_size: 8\ndata: [a.jsonl]\nopt:\n  beta: 0.5\nlayers: [1, 3]\n")
    cfg = load_config(MyConfig, path, ["batch_size=2", "data=[x.jsonl,y.jsonl]", "opt.name=sgd",
                                       "temperature=0.7", "resume=true", "head=mlp", "sizes=[3,4,5]"])
    assert cfg.lr == pytest.approx(3e-4) and cfg.batch_size == 2
    assert cfg.data == ["x.jsonl", "y.jsonl"] and cfg.layers == [1, 3]
    assert cfg.opt == Opt(beta=0.5, name="sgd")
    assert cfg.temperature == pytest.approx(0.7) and cfg.resume is True and cfg.head == "mlp"
    assert cfg.sizes == (3, 4, 5)


def test_type_coercion():
    cfg = apply_overrides(MyConfig(), ["lr=1e-4", "max_steps=1e3", "eval_fraction=0", "layers=[1,2]",
                                        "run_name=007", "target=1e-4", "data=single.jsonl", "temperature=null"])
    assert isinstance(cfg.lr, float) and cfg.lr == 1e-4  # YAML 1.1 reads "1e-4" as a string
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert isinstance(cfg.eval_fraction, float) and cfg.eval_fraction == 0.0
    assert cfg.run_name == "007" and cfg.target == "1e-4"  # strings stay verbatim
    assert cfg.data == ["single.jsonl"]  # a bare value for a list field is a one-item list
    assert cfg.temperature is None
    for text, want in [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("off", False)]:
        assert apply_overrides(MyConfig(), [f"resume={text}"]).resume is want
    for bad in ["resume=maybe", "batch_size=2.5", "batch_size=abc", "lr=fast", "layers=[1,x]", "head=attn",
                "lr=null", "opt=3"]:
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            apply_overrides(MyConfig(), [bad])


def test_unknown_key_cli_names_key_and_close_matches():
    with pytest.raises(ValueError, match=r"'lrr'.*did you mean lr"):
        load_config(MyConfig, None, ["lrr=1"])
    with pytest.raises(ValueError, match=r"'opt.betta'.*did you mean beta"):
        load_config(MyConfig, None, ["opt.betta=0.1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(MyConfig, None, ["lr"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: 0.1\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match=r"'batch_sise'.*did you mean batch_size") as e:
        load_config(MyConfig, path)
    assert "bad.yaml" in str(e.value)
    nested = tmp_path / "nested.yaml"
    nested.write_text("opt:\n  bta: 0.1\n")
    with pytest.raises(ValueError, match=r"'opt.bta'"):
        load_config(MyConfig, nested)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(MyConfig, tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(MyConfig, path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\nbatch_size: 3\n")
    with pytest.raises(ValueError, match="broken.yaml.*not valid YAML"):
        load_config(MyConfig, broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(MyConfig, empty) == MyConfig()


@pytest.mark.parametrize("override, field", [
    ("report_to=mlflow", "report_to"), ("mixed_precision=fp8", "mixed_precision"), ("overflow=wrap", "overflow"),
    ("target_dtype=int8", "target_dtype"), ("batch_size=0", "batch_size"), ("eval_fraction=1.0", "eval_fraction"),
    ("max_steps=0", "max_steps"), ("lr=0", "lr"), ("warmup_ratio=1.5", "warmup_ratio"), ("keep_last=0", "keep_last"),
    ("save_every=-1", "save_every"), ("data=[]", "data"),
])
def test_validation(override, field):
    with pytest.raises(ValueError, match=field):
        load_config(MyConfig, None, [override])


def test_save_load_round_trip(tmp_path):
    cfg = load_config(MyConfig, None, ["lr=2e-4", "layers=[5,6]", "opt.beta=0.25", "temperature=1.5",
                                       "sizes=[7]", "data=[a,b]"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert not list(path.parent.glob("*.tmp-*"))
    assert yaml.safe_load(path.read_text())["opt"] == {"beta": 0.25, "name": "adamw"}
    assert load_config(MyConfig, path) == cfg
    assert config_from_dict(MyConfig, config_to_dict(cfg)) == cfg


def test_config_diff_ignores_mutable_keys():
    a = config_to_dict(MyConfig())
    b = config_to_dict(apply_overrides(MyConfig(), ["max_steps=50", "lr=0.5", "temperature=2", "opt.beta=0.1",
                                                     "report_to=none", "max_length=512"]))
    diff = config_diff(a, b, ignore=MyConfig.resume_mutable)
    assert set(diff) == {"lr", "opt.beta"}
    assert diff["lr"] == (1e-4, 0.5)
    # int vs float spelling of the same number is not a difference
    assert config_diff({"x": 1}, {"x": 1.0}) == {}
    assert config_diff({"x": [1, 2]}, {"x": (1, 2)}) == {}


def test_any_dataclass_and_literal_choices():
    """hsd.config serves any dataclass (no BaseTrainConfig, no validate); Literal fields list their choices."""

    @dataclasses.dataclass
    class Plain:
        method: Literal["hsd", "tokenwise"] = "hsd"
        k: int = 4

    assert load_config(Plain, None, ["method=tokenwise", "k=7"]) == Plain("tokenwise", 7)
    with pytest.raises(ValueError, match=r"'method' must be one of \['hsd', 'tokenwise'\], got 'blockwise'"):
        load_config(Plain, None, ["method=blockwise"])
    hints = __import__("typing").get_type_hints(BaseTrainConfig)
    for name in ("report_to", "mixed_precision", "overflow", "target_dtype"):
        assert __import__("typing").get_origin(hints[name]) is Literal, name


def test_run_main_turns_bad_input_into_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("HSD_TRACEBACK", raising=False)

    def bad_key(argv):
        load_config(MyConfig, None, argv)

    assert run_main(bad_key, ["lrr=1"], prog="hsd-train") == 2
    err = capsys.readouterr().err
    assert err.startswith("hsd-train: error: unknown config key 'lrr'") and err.count("\n") == 1
    assert "Traceback" not in err

    def missing(argv):
        open("/nonexistent/file.jsonl")

    assert run_main(missing, [], prog="x") == 2
    assert "No such file" in capsys.readouterr().err
    assert run_main(lambda argv: None, []) == 0

    def bug(argv):
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):  # programming errors keep their traceback
        run_main(bug, [])
    monkeypatch.setenv("HSD_TRACEBACK", "1")
    with pytest.raises(ValueError, match="lrr"):
        run_main(bad_key, ["lrr=1"])
