"""The expected next boot: the launch prediction with its disk side replaced (service.next_boot.combine)."""

from __future__ import annotations

from tvorch.core.boot.prediction import PredictedEvent, Prediction
from tvorch.service.next_boot import combine


def ev(pcr: int, type_name: str, seed: str) -> PredictedEvent:
    return PredictedEvent(pcr, type_name, seed * 64, f"{type_name} {seed}")


LAUNCHED = Prediction((ev(0, "EV_POST_CODE", "a"), ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", "b"),
                       ev(7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "c"), ev(11, "EV_IPL", "d")),
                      frozenset({0, 4, 7, 11, 12}))


def test_the_disk_side_is_replaced_and_the_firmware_side_kept() -> None:
    new = (ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", "e"), ev(11, "EV_IPL", "f"))
    combined = combine(LAUNCHED, new, frozenset({4, 11, 12}), set())
    assert combined.covered == {0, 4, 7, 11, 12}
    assert [e.digest[0] for e in combined.events] == ["a", "e", "c", "f"]


def test_a_pcr_the_new_disk_side_cannot_predict_is_left_out() -> None:
    combined = combine(LAUNCHED, (ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", "e"),), frozenset({4}), {11, 12})
    assert combined.covered == {0, 4, 7}


def test_pcr7_with_db_authority_events_follows_the_new_boot_file_and_is_left_out() -> None:
    secure = Prediction(LAUNCHED.events + (ev(7, "EV_EFI_VARIABLE_AUTHORITY", "9"),), LAUNCHED.covered)
    combined = combine(secure, (ev(4, "EV_EFI_BOOT_SERVICES_APPLICATION", "e"),), frozenset({4}), set())
    assert 7 not in combined.covered and all(e.pcr != 7 for e in combined.events)
