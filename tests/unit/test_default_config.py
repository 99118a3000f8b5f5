"""The commented /etc/tvorch/tvorch.toml the Debian package ships (tvorch.default_config)."""

from __future__ import annotations

import re
import tomllib

from tvorch.config import Config, FirmwareProfile, effective_config, parse_config
from tvorch.default_config import render

SETTING = re.compile(r"^# ([a-z_]+ = .*|\[[a-z_.]+\])$")


def uncommented(text: str) -> str:
    return "\n".join(line[2:] if SETTING.match(line) else line for line in text.splitlines()) + "\n"


def flat(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def test_as_shipped_it_is_all_comments_and_parses_to_the_defaults():
    text = render()
    assert tomllib.loads(text) == {}
    assert effective_config(parse_config(text.encode())) == effective_config(Config())


def test_uncommented_it_names_every_key_with_its_default():
    text = uncommented(render())
    keys = flat(tomllib.loads(text))
    example = {k: v for k, v in keys.items() if k.startswith("firmware_profiles.")}
    defaults = flat(effective_config(Config()))
    defaults.pop("firmware_profiles")
    assert {k: v for k, v in keys.items() if k not in example} == defaults
    # The firmware profile example is a valid profile, not a default.
    cfg = parse_config(text.encode())
    assert dict(cfg.firmware_profiles) == {"snakeoil": FirmwareProfile(
        "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd", "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd", True)}
    assert effective_config(cfg) | {"firmware_profiles": {}} == effective_config(Config())
