from dataclasses import dataclass, field

import pytest

from config.loader import ParamsError, build, load, load_section, param, to_dict


@dataclass(frozen=True)
class Inner:
    iterations: int = param(10, lo=1, help="mean-field iterations")
    scales: tuple[float, ...] = param((1.0, 0.5), lo=0.1, hi=4.0)
    pair: tuple[float, int] = param((0.5, 2))


@dataclass(frozen=True)
class Root:
    name: str = param("shapes", choices=("shapes", "voc"))
    ratio: float = param(0.5, lo=0.0, hi=1.0)
    flag: bool = True
    inner: Inner = field(default_factory=Inner)


def test_defaults_and_int_to_float():
    cfg = build(Root, {"ratio": 1})
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float)
    assert cfg.inner.iterations == 10 and cfg.inner.scales == (1.0, 0.5)
    assert build(Inner, {"pair": [1, 3]}).pair == (1.0, 3)


def test_fixed_length_tuples_check_length_and_item_types():
    with pytest.raises(ParamsError, match="pair: expected 2 items, got 3"):
        build(Inner, {"pair": [1, 2, 3]})
    with pytest.raises(ParamsError, match=r"pair\[1\]: expected an integer"):
        build(Inner, {"pair": [1.0, 2.5]})


@pytest.mark.parametrize("data, needle", [
    ({"nmae": "voc"}, "nmae: unknown key"),
    ({"inner": {"iteration": 3}}, "inner.iteration: unknown key"),
    ({"ratio": "high"}, "ratio: expected a number"),
    ({"ratio": 1.5}, "ratio: 1.5 is above the maximum 1.0"),
    ({"inner": {"iterations": 0}}, "inner.iterations: 0 is below the minimum 1"),
    ({"inner": {"iterations": 2.5}}, "inner.iterations: expected an integer"),
    ({"inner": {"scales": [1.0, 9.0]}}, "inner.scales: 9.0 is above the maximum 4.0"),
    ({"name": "coco"}, "name: 'coco' is not one of"),
    ({"flag": "yes"}, "flag: expected true/false"),
    ({"inner": 3}, "inner: expected a mapping"),
])
def test_errors_name_the_key(data, needle):
    with pytest.raises(ParamsError) as info:
        build(Root, data)
    assert needle in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("inner:\n  iterations: -1\n")
    with pytest.raises(ParamsError, match=r"params.yaml: inner.iterations: -1 is below"):
        load(Root, path)
    path.write_text("inner: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load(Root, path)
    with pytest.raises(ParamsError, match="params file not found"):
        load(Root, tmp_path / "missing.yaml")


def test_load_section_and_to_dict(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a:\n  iterations: 3\nb: {anything: 1}\n")
    cfg = load_section(Inner, path, "a")
    assert cfg.iterations == 3
    assert to_dict(cfg) == {"iterations": 3, "scales": [1.0, 0.5], "pair": [0.5, 2]}
