import pytest

from tvorch.config import Config, load_config, parse_config
from tvorch.errors import ConfigError, ExitCode


def test_defaults_when_no_file(tmp_path, monkeypatch):
    monkeypatch.delenv("TVORCH_CONFIG", raising=False)
    monkeypatch.setattr("tvorch.config.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    cfg = load_config()
    assert cfg == Config()
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.state_dir == "/var/lib/tvorch"


def test_values_are_read_and_nested_tables_typed():
    cfg = parse_config(
        b'virt_type = "qemu"\nstop_timeout = 5\n[launch]\nvcpus = 2\n'
        b'[firmware_profiles.own]\ncode = "/c.fd"\nvars_template = "/v.fd"\n'
    )
    assert cfg.virt_type == "qemu"
    assert cfg.stop_timeout == 5
    assert cfg.launch.vcpus == 2
    assert cfg.launch.memory_mib == 1024  # untouched default
    assert cfg.firmware_profiles["own"].code == "/c.fd"
    assert cfg.firmware_profiles["own"].secure_boot is True


@pytest.mark.parametrize(
    "text, key",
    [
        (b"libvirt_url = 'x'\n", "libvirt_url"),
        (b"[launch]\nmemory = 5\n", "launch.memory"),
        (b"[firmware_profiles.p]\ncode='a'\nvars_template='b'\nsecure = true\n", "firmware_profiles.p.secure"),
    ],
)
def test_unknown_key_is_named(text, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        parse_config(text)


@pytest.mark.parametrize(
    "text, key",
    [
        (b"stop_timeout = '10'\n", "stop_timeout"),
        (b"[launch]\nvcpus = true\n", "launch.vcpus"),
        (b"[launch]\nsecure_boot = 1\n", "launch.secure_boot"),
        (b"launch = 3\n", "launch"),
        (b"state_dir = 7\n", "state_dir"),
    ],
)
def test_wrong_type_is_named(text, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be"):
        parse_config(text)


def test_choice_and_missing_profile_key():
    with pytest.raises(ConfigError, match="'virt_type' must be one of auto, kvm, qemu"):
        parse_config(b"virt_type = 'xen'\n")
    with pytest.raises(ConfigError, match="'firmware_profiles.p' lacks key 'vars_template'"):
        parse_config(b"[firmware_profiles.p]\ncode = 'a'\n")


def test_bad_toml_and_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config(b"= nope", "x.toml")
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(str(tmp_path / "nope.toml"))
    assert info.value.exit_code == ExitCode.CONFIG


def test_env_variable_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "t.toml"
    path.write_bytes(b"stop_timeout = 3\n")
    monkeypatch.setenv("TVORCH_CONFIG", str(path))
    cfg = load_config()
    assert cfg.stop_timeout == 3 and cfg.source == str(path) and cfg.raw == path.read_bytes()


def test_policy_list_is_typed_and_checked():
    cfg = parse_config(b"[policy]\nrequire_trusted = ['image', 'firmware']\n")
    assert cfg.policy.require_trusted == ("image", "firmware")
    with pytest.raises(ConfigError, match="'policy.require_trusted' items must be among"):
        parse_config(b"[policy]\nrequire_trusted = ['bogus']\n")
    with pytest.raises(ConfigError, match="'policy.require_trusted' must be a list of strings"):
        parse_config(b"[policy]\nrequire_trusted = 'image'\n")


def test_effective_config_covers_defaults_and_is_json_ready():
    import json

    from tvorch.config import effective_config

    data = effective_config(Config())
    assert data["policy"]["require_trusted"] == ("image",)
    assert "source" not in data and "raw" not in data
    json.dumps(data)  # serialisable, so it can be digested canonically


@pytest.mark.parametrize("text, words", [
    (b"hook_deadline_ms = 0\n", "'hook_deadline_ms' must be at least 1"),
    (b"[launch]\nvcpus = 0\n", "'launch.vcpus' must be at least 1"),
    (b"[serve]\nheartbeat_interval = 0\n", "'serve.heartbeat_interval' must be at least 1"),
    (b"[serve]\nstart_concurrency = 0\n", "'serve.start_concurrency' must be at least 1"),
    (b"state_dir = 'relative/state'\n", "'state_dir' must be an absolute path"),
    (b"[host]\npcrs = [99]\n", "'host.pcrs' must list PCR indices 0-23"),
    (b"[host]\npcrs = []\n", "'host.pcrs' must list PCR indices 0-23"),
])
def test_values_that_would_disable_a_safeguard_are_refused(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_config(text)


def test_serve_start_paths_keys():
    assert (parse_config(b"").serve.on_shutdown, parse_config(b"").serve.start_concurrency) == ("shutdown", 2)
    assert parse_config(b"[serve]\non_shutdown = 'save'\n").serve.on_shutdown == "save"
    with pytest.raises(ConfigError, match="'serve.on_shutdown' must be one of shutdown, save, none"):
        parse_config(b"[serve]\non_shutdown = 'suspend'\n")
