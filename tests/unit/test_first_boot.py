"""Which prediction a first verified boot is judged against (service.attest.first_boot_prediction)."""

from __future__ import annotations

from datetime import datetime, timezone

from tvorch.config import Config, Policy
from tvorch.core.launch.manifest import BootPredictionRecord, LaunchManifest, sign_manifest
from tvorch.core.boot.prediction import PredictedEvent, Prediction
from tvorch.core.signing import generate_key, issue_signing_cert, make_ca
from tvorch.service.attest import first_boot_prediction

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
PREDICTION = Prediction((PredictedEvent(4, "EV_EFI_BOOT_SERVICES_APPLICATION", "ab" * 32, "BOOTX64.EFI"),),
                        frozenset({4, 5}))


def manifest(record: BootPredictionRecord | None) -> bytes:
    ca_key, ca_cert = make_ca("tvorch node CA test", NOW)
    key = generate_key()
    cert = issue_signing_cert(ca_key, ca_cert, key.public_key(), "tvorch node test", NOW)
    return sign_manifest(LaunchManifest(
        instance_id="i-0123456789ab", name="vm1", uuid="0f8fad5b-d9cb-469f-a165-70867728950e", node="node1",
        created_at="2025-03-01T11:58:00.000+00:00", measurements=(), config_digest="c" * 64,
        policy_digest="d" * 64, boot_prediction=record), key, cert)


def test_the_signed_prediction_is_used_under_the_default_policy() -> None:
    prediction, why = first_boot_prediction(Config(), manifest(BootPredictionRecord("predicted", PREDICTION)))
    assert prediction == PREDICTION and why == ""


def test_under_learn_the_prediction_is_not_used_and_nothing_is_said() -> None:
    cfg = Config(policy=Policy(first_boot="learn"))
    assert first_boot_prediction(cfg, manifest(BootPredictionRecord("predicted", PREDICTION))) == (None, "")


def test_an_unavailable_or_absent_prediction_is_learned_saying_why() -> None:
    unavailable = BootPredictionRecord("unavailable", reason="no EFI system partition in the image")
    prediction, why = first_boot_prediction(Config(), manifest(unavailable))
    assert prediction is None and why == ("policy.first_boot is predicted, but the launch manifest's boot "
                                          "prediction is unavailable (no EFI system partition in the image): learned")
    prediction, why = first_boot_prediction(Config(), manifest(None))
    assert prediction is None and "the launch manifest has no boot prediction: learned" in why
    assert first_boot_prediction(Config(), None)[1].endswith("has no launch manifest: learned")
