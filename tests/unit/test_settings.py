"""Unit tests for pipeline.settings (environment -> frozen Settings)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from pipeline.errors import ConfigError, InferlaneError
from pipeline.settings import KNOWN_LANES, Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-V4lue-do-not-print"  # noqa: S105 - a fake secret, checked for leaks


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment without any INFERLANE_* variable."""
    for name in list(os.environ):
        if name.upper().startswith("INFERLANE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.topic_prefix == ""
    assert s.app_id == "inferlane"
    assert s.worker_id == f"{socket.gethostname()}-0"
    assert s.realtime_partitions == 4
    assert s.replication_factor is None and s.min_insync_replicas is None  # from the cluster
    assert s.session_timeout_ms == 10_000
    assert s.commit_interval_ms == 200
    assert s.commit_on_revoke is True
    assert s.static_membership is False
    assert s.max_in_flight_records == 20_000
    assert s.state_dir == Path(".inferlane")
    assert s.s3_endpoint_url is None
    assert s.s3_bucket == "inferlane"
    assert s.s3_region == "us-east-1"
    assert s.s3_access_key_id is None
    assert s.s3_secret_access_key is None
    assert s.lanes == ("fraud", "reco", "history", "archive", "batch")
    assert s.lanes == KNOWN_LANES
    assert s.web_port == 6066
    assert s.web_enabled is True
    assert s.fraud_batch_max_rows == 256
    assert s.fraud_max_wait_ms == 5.0
    assert s.fraud_budget_ms == 50.0
    assert s.fraud_model_dir is None and s.fraud_model_version == "latest"
    assert s.model_registry == str(REPO_ROOT / "models")
    assert s.fraud_model_precision == "int8"
    assert s.fraud_review_threshold is None
    assert s.fraud_decline_threshold is None
    assert s.inference_threads == 1
    assert s.reco_batch_max_rows == 32
    assert s.reco_max_wait_ms == 5.0
    assert s.reco_budget_ms == 100.0
    assert s.reco_inline_max_us == 4000.0
    assert s.reco_model_dir is None and s.reco_model_version == "latest"
    assert s.reco_model_precision == "int8"
    assert s.archive_max_bytes == 8 * 1024 * 1024
    assert s.archive_max_age_ms == 60_000


def test_default_topics_and_group_ids() -> None:
    s = load_settings()
    assert s.topic("fraud.scores") == "fraud.scores"
    assert s.group_id("fraud") == "inferlane-fraud"
    assert s.group_id("archive") == "inferlane-archive"


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_KAFKA_BOOTSTRAP", "broker-1:9093,broker-2:9093")
    monkeypatch.setenv("INFERLANE_STATIC_MEMBERSHIP", "true")
    monkeypatch.setenv("INFERLANE_FRAUD_BATCH_MAX_ROWS", "512")
    monkeypatch.setenv("INFERLANE_FRAUD_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("INFERLANE_COMMIT_ON_REVOKE", "false")
    monkeypatch.setenv("INFERLANE_FRAUD_REVIEW_THRESHOLD", "0.4")
    monkeypatch.setenv("INFERLANE_STATE_DIR", "/tmp/inferlane-state")  # noqa: S108
    s = load_settings()
    assert s.kafka_bootstrap == "broker-1:9093,broker-2:9093"
    assert s.static_membership is True
    assert s.fraud_batch_max_rows == 512
    assert s.fraud_max_wait_ms == 2.5
    assert s.commit_on_revoke is False
    assert s.fraud_review_threshold == 0.4
    assert s.fraud_decline_threshold is None
    assert s.state_dir == Path("/tmp/inferlane-state")  # noqa: S108


def test_env_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("inferlane_kafka_bootstrap", "lower:1")
    assert load_settings().kafka_bootstrap == "lower:1"


def test_topic_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_TOPIC_PREFIX", "staging.")
    s = load_settings()
    assert s.topic("fraud.scores") == "staging.fraud.scores"
    assert s.topic("fraud.requests.dlq") == "staging.fraud.requests.dlq"


def test_group_id_follows_app_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_APP_ID", "risk")
    s = load_settings()
    assert s.group_id("fraud") == "risk-fraud"
    assert s.group_id("archive") == "risk-archive"
    assert s.group_id("fraud") != s.group_id("archive")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fraud", ("fraud",)),
        ("archive", ("archive",)),
        (" fraud , archive ", ("fraud", "archive")),
        ("archive,fraud", ("archive", "fraud")),
        ("fraud,,", ("fraud",)),
        ("reco,archive", ("reco", "archive")),
    ],
)
def test_lanes_parsing(monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
                       ) -> None:
    monkeypatch.setenv("INFERLANE_LANES", value)
    assert load_settings().lanes == expected


def test_unknown_lane_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_LANES", "fraud,bogus")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert "INFERLANE_LANES" in message
    assert "bogus" in message
    assert isinstance(info.value, InferlaneError)
    assert info.value.retriable is False
    assert isinstance(info.value.__cause__, ValidationError)


@pytest.mark.parametrize("value", ["150", "-1", "100.5"])
def test_fraud_max_wait_out_of_range(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("INFERLANE_FRAUD_MAX_WAIT_MS", value)
    with pytest.raises(ConfigError, match="INFERLANE_FRAUD_MAX_WAIT_MS"):
        load_settings()


def test_fraud_max_wait_bounds_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_FRAUD_MAX_WAIT_MS", "100")
    assert load_settings().fraud_max_wait_ms == 100.0
    monkeypatch.setenv("INFERLANE_FRAUD_MAX_WAIT_MS", "0")
    assert load_settings().fraud_max_wait_ms == 0.0


def test_every_problem_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_FRAUD_MAX_WAIT_MS", "150")
    monkeypatch.setenv("INFERLANE_LANES", "bogus")
    monkeypatch.setenv("INFERLANE_WEB_PORT", "70000")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("invalid settings: ")
    for name in ("INFERLANE_FRAUD_MAX_WAIT_MS", "INFERLANE_LANES", "INFERLANE_WEB_PORT"):
        assert name in message


def test_non_numeric_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_FRAUD_BATCH_MAX_ROWS", "lots")
    with pytest.raises(ConfigError, match="INFERLANE_FRAUD_BATCH_MAX_ROWS"):
        load_settings()


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_APP_ID", "from-env")
    assert load_settings(app_id="from-kwarg").app_id == "from-kwarg"
    with pytest.raises(ConfigError, match="INFERLANE_FRAUD_BATCH_MAX_ROWS"):
        load_settings(fraud_batch_max_rows=0)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.app_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.lanes = ("fraud",)  # type: ignore[misc]
    assert s.app_id == "inferlane"
    assert s.lanes == ("fraud", "reco", "history", "archive", "batch")


def test_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_S3_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("INFERLANE_S3_ACCESS_KEY_ID", "AKIA-test-key-id")
    s = load_settings()
    assert isinstance(s.s3_secret_access_key, SecretStr)
    assert s.s3_secret_access_key.get_secret_value() == SECRET
    assert s.s3_access_key_id is not None
    assert s.s3_access_key_id.get_secret_value() == "AKIA-test-key-id"
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump()),
                 str(s.s3_secret_access_key), f"{s}"):
        assert SECRET not in text
        assert "AKIA-test-key-id" not in text
    assert '"s3_secret_access_key":"**********"' in s.model_dump_json()


# --- Kafka security and message size ---------------------------------------------------------

SASL_PASSWORD = "sasl-s3cr3t-do-not-print"  # noqa: S105 - a fake secret, checked for leaks


def test_security_defaults() -> None:
    s = load_settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_sasl_mechanism == "PLAIN"
    assert s.kafka_sasl_username is None and s.kafka_sasl_password is None
    assert s.kafka_ssl_cafile is None and s.kafka_ssl_certfile is None
    assert s.kafka_ssl_keyfile is None and s.kafka_ssl_keyfile_password is None
    assert s.max_message_bytes == 1024 * 1024


def test_sasl_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed by Settings")
    monkeypatch.setenv("INFERLANE_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("INFERLANE_KAFKA_SSL_CAFILE", str(ca))
    s = load_settings()
    assert s.kafka_security_protocol == "SASL_SSL"
    assert s.kafka_sasl_mechanism == "SCRAM-SHA-256"
    assert isinstance(s.kafka_sasl_password, SecretStr)
    assert s.kafka_sasl_password.get_secret_value() == SASL_PASSWORD
    assert s.kafka_ssl_cafile == ca


@pytest.mark.parametrize(("given", "named"), [
    ({}, ["INFERLANE_KAFKA_SASL_USERNAME", "INFERLANE_KAFKA_SASL_PASSWORD"]),
    ({"kafka_sasl_username": "svc"}, ["INFERLANE_KAFKA_SASL_PASSWORD"]),
    ({"kafka_sasl_password": SASL_PASSWORD}, ["INFERLANE_KAFKA_SASL_USERNAME"]),
])
def test_sasl_without_credentials_names_what_is_missing(given: dict[str, str],
                                                        named: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(kafka_security_protocol="SASL_PLAINTEXT", **given)
    message = str(info.value)
    assert "INFERLANE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT needs" in message
    for name in ("INFERLANE_KAFKA_SASL_USERNAME", "INFERLANE_KAFKA_SASL_PASSWORD"):
        assert (name in message) == (name in named), message
    assert SASL_PASSWORD not in message


def test_credentials_without_a_sasl_protocol_are_refused() -> None:
    with pytest.raises(ConfigError, match="does not use SASL"):
        load_settings(kafka_sasl_username="svc", kafka_sasl_password=SASL_PASSWORD)


def test_tls_files_without_a_tls_protocol_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigError, match="INFERLANE_KAFKA_SSL_CAFILE set but "
                                          "INFERLANE_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT"):
        load_settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u",
                      kafka_sasl_password="p", kafka_ssl_cafile=str(ca))  # noqa: S106


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(tmp_path / "nope.pem"))
    assert "INFERLANE_KAFKA_SSL_CAFILE" in str(info.value)
    assert "does not point to a file" in str(info.value)


def test_a_key_needs_its_certificate(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("x")
    with pytest.raises(ConfigError, match="INFERLANE_KAFKA_SSL_KEYFILE needs "
                                          "INFERLANE_KAFKA_SSL_CERTFILE"):
        load_settings(kafka_security_protocol="SSL", kafka_ssl_keyfile=str(key))


@pytest.mark.parametrize("mechanism", ["AWS_MSK_IAM", "GSSAPI", "OAUTHBEARER", "plain"])
def test_unsupported_sasl_mechanisms_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                 mechanism: str) -> None:
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_MECHANISM", mechanism)
    with pytest.raises(ConfigError, match="INFERLANE_KAFKA_SASL_MECHANISM"):
        load_settings()


@pytest.mark.parametrize("name", ["INFERLANE_S3_ACCESS_KEY_ID",
                                  "INFERLANE_S3_SECRET_ACCESS_KEY"])
def test_one_s3_key_without_the_other_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                 name: str) -> None:
    monkeypatch.setenv(name, SECRET)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "INFERLANE_S3_ACCESS_KEY_ID and INFERLANE_S3_SECRET_ACCESS_KEY go together" in str(
        info.value)
    assert SECRET not in str(info.value)


def test_max_message_bytes_has_a_floor() -> None:
    with pytest.raises(ConfigError, match="INFERLANE_MAX_MESSAGE_BYTES"):
        load_settings(max_message_bytes=10)
    assert load_settings(max_message_bytes=4096).max_message_bytes == 4096


def test_kafka_secrets_are_not_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERLANE_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("INFERLANE_S3_ACCESS_KEY_ID", "AKIA-test-key-id")
    monkeypatch.setenv("INFERLANE_S3_SECRET_ACCESS_KEY", SECRET)
    s = load_settings()
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert SASL_PASSWORD not in text and SECRET not in text
    assert '"kafka_sasl_password":"**********"' in s.model_dump_json()


def test_settings_command_masks_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("INFERLANE_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("INFERLANE_S3_ACCESS_KEY_ID", "AKIA-test-key-id")
    monkeypatch.setenv("INFERLANE_S3_SECRET_ACCESS_KEY", SECRET)
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert '"kafka_sasl_username": "svc"' in result.output
    assert '"kafka_sasl_password": "**********"' in result.output
    assert '"s3_secret_access_key": "**********"' in result.output
    for secret in (SASL_PASSWORD, SECRET, "AKIA-test-key-id"):
        assert secret not in result.output


def test_config_errors_and_their_traceback_hold_no_secret(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """ConfigError chains pydantic's ValidationError, whose text would quote the input (pydantic
    shortens a long input in the middle, so the secret here is short and the input small)."""
    import traceback

    secret = "pw-LEAK-42"  # noqa: S105
    monkeypatch.setenv("INFERLANE_KAFKA_SASL_PASSWORD", secret)  # without SASL: invalid
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = "".join(traceback.format_exception(info.value))
    # The cross-field check fails: pydantic's error then concerns the whole input.
    assert "does not use SASL" in text and "validation error for Settings" in text
    assert secret not in text
