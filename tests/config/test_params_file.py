"""The shipped params.yaml: it loads strictly, every key carries a comment, and keys equal the schema."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from config.loader import ParamsError, to_dict
from config.schema import Params, load_params

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"


def test_shipped_params_load_and_match_schema_defaults():
    params = load_params(PARAMS)
    assert to_dict(params) == to_dict(Params()), "params.yaml values drifted from the dataclass defaults"


def test_every_key_has_a_comment():
    missing = []
    for number, line in enumerate(PARAMS.read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_][\w]*:\s*\S", line) and "#" not in line:
            missing.append(f"params.yaml:{number}: {line.strip()}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_every_schema_key_is_in_the_file():
    data = yaml.safe_load(PARAMS.read_text())
    for section in dataclasses.fields(Params):
        for key in dataclasses.fields(section.type if isinstance(section.type, type) else getattr(Params(), section.name)):
            assert key.name in data[section.name], f"{section.name}.{key.name} missing from params.yaml"


@pytest.mark.parametrize("edit, needle", [
    (("prepare", "sourse", "voc"), "prepare.sourse: unknown key"),
    (("prepare", "rows_per_shard", 0), "prepare.rows_per_shard: 0 is below the minimum 1"),
    (("shapes", "num_train", "many"), "shapes.num_train: expected an integer"),
    (("prepare", "source", "imagenet"), "prepare.source: 'imagenet' is not one of"),
])
def test_bad_key_names_file_and_key(tmp_path, edit, needle):
    data = yaml.safe_load(PARAMS.read_text())
    section, key, value = edit
    data[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value) and needle in str(info.value)
