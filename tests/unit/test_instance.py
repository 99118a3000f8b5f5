import pytest

from tvorch.core.launch.instance import (
    new_instance_id,
    validate_memory,
    validate_name,
    validate_vcpus,
)
from tvorch.errors import ExitCode, InputError


@pytest.mark.parametrize("name", ["web-1", "a", "VM_2.test", "x" * 64])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "must not be empty"),
        ("x" * 65, "65 characters, at most 64"),
        ("a<b", "letters, digits"),
        ("a&b", "letters, digits"),
        ("it's", "letters, digits"),
        ("a/b", "letters, digits"),
        ("..", "letters, digits"),
        (".hidden", "letters, digits"),
        ("a b", "letters, digits"),
        ("new\nline", "letters, digits"),
    ],
)
def test_bad_names_refused_in_one_line(name, why):
    with pytest.raises(InputError, match=why) as info:
        validate_name(name)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == ExitCode.INVALID_INPUT


def test_memory_and_vcpu_ranges():
    assert validate_memory(128, 1024) == 128
    assert validate_vcpus(4, 4) == 4
    for bad in (0, 127, 1025, -1):
        with pytest.raises(InputError, match="refused memory"):
            validate_memory(bad, 1024)
    for bad in (0, 5, -2):
        with pytest.raises(InputError, match="refused vcpus"):
            validate_vcpus(bad, 4)


def test_instance_ids_are_unique_and_shaped():
    ids = {new_instance_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("i-") and len(i) == 14 for i in ids)
