from __future__ import annotations

import subprocess
import sys

import pytest

from pgqueue.config import Settings
from pgqueue.errors import ConfigError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.queue_enabled is True
    assert s.queue_name == "whatsapp-send"
    assert s.retry_attempts == 3 and s.max_attempts == 4
    assert s.backoff_delay_ms == 2000
    assert s.twilio_api_base_url == "https://api.twilio.com"
    assert s.provider == "twilio"
    assert s.database_url is None and s.redis_url is None


def test_values_are_read() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:p@db:5432/x",
            "WHATSAPP_SEND_QUEUE_ENABLED": "false",
            "WHATSAPP_SEND_QUEUE_NAME": "q2",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "QUEUE_RETRY_ATTEMPTS": "5",
            "QUEUE_BACKOFF_DELAY": "100",
            "TWILIO_API_BASE_URL": "http://127.0.0.1:9999/",
            "PGQUEUE_PROVIDER": "sandbox",
            "PGQUEUE_ADMIN_TOKEN": "x" * 20,
            "PGQUEUE_METRICS_TOKEN": "m" * 20,
            "PGQUEUE_HOME": "/tmp/h",
        }
    )
    assert s.queue_enabled is False and s.queue_name == "q2"
    assert s.retry_attempts == 5 and s.backoff_delay_ms == 100
    assert s.twilio_api_base_url == "http://127.0.0.1:9999"
    assert s.provider == "sandbox" and s.metrics_token == "m" * 20
    assert str(s.home) == "/tmp/h"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"QUEUE_RETRY_ATTEMPTS": "abc"}, "QUEUE_RETRY_ATTEMPTS"),
        ({"QUEUE_RETRY_ATTEMPTS": "-1"}, "QUEUE_RETRY_ATTEMPTS"),
        ({"QUEUE_BACKOFF_DELAY": "1.5"}, "QUEUE_BACKOFF_DELAY"),
        ({"WHATSAPP_SEND_QUEUE_ENABLED": "maybe"}, "WHATSAPP_SEND_QUEUE_ENABLED"),
        ({"PGQUEUE_PROVIDER": "smtp"}, "PGQUEUE_PROVIDER"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"TWILIO_API_BASE_URL": "ftp://x"}, "TWILIO_API_BASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"PGQUEUE_ADMIN_TOKEN": "short"}, "PGQUEUE_ADMIN_TOKEN"),
        ({"PGQUEUE_METRICS_TOKEN": "short"}, "PGQUEUE_METRICS_TOKEN"),
        ({"WHATSAPP_SEND_QUEUE_NAME": "x" * 60}, "WHATSAPP_SEND_QUEUE_NAME"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env(env)
    assert names in e.value.message


def test_password_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"DATABASE_URL": "mysql://u:hunter2@x/db"})
    assert "hunter2" not in e.value.message


def test_cli_reports_bad_config_in_one_line_with_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pgqueue.cli", "queue", "show"],
        env={"QUEUE_RETRY_ATTEMPTS": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pgqueue: QUEUE_RETRY_ATTEMPTS must be a whole number, got 'abc'"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_sandbox_settings() -> None:
    s = Settings.from_env(
        {
            "PGQUEUE_SANDBOX_LATENCY_MS": "50-80",
            "PGQUEUE_SANDBOX_FAILURE_PERCENT": "5",
            "PGQUEUE_SANDBOX_INVALID_NUMBERS": "+15550000000, +15550000001",
        }
    )
    assert s.sandbox_latency_s == (0.05, 0.08)
    assert s.sandbox_failure_rate == 0.05
    assert s.sandbox_invalid_numbers == {"+15550000000", "+15550000001"}
    with pytest.raises(ConfigError, match="PGQUEUE_SANDBOX_LATENCY_MS"):
        Settings.from_env({"PGQUEUE_SANDBOX_LATENCY_MS": "300-100"})
