"""Settings: every problem at once, at start-up, with secrets masked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import SettingsError, load_settings, mask_url


def test_defaults_point_at_the_local_stack(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.kafka_bootstrap == "127.0.0.1:39092"
    assert settings.clickhouse_url == f"chdb://{tmp_path / 'clickhouse'}"
    assert settings.postgres_url.startswith("postgresql://tally@127.0.0.1:35432/")


def test_local_ports_move_the_default_urls() -> None:
    settings = load_settings(local_kafka_port=49092, local_redis_port=46379)
    assert settings.kafka_bootstrap == "127.0.0.1:49092"
    assert settings.redis_url == "redis://127.0.0.1:46379/0"


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(kafka_url="http://nope", partitions=0, max_event_bytes=-1, redis_url="mysql://x")
    text = str(caught.value)
    for name in ("TALLY_KAFKA_URL", "TALLY_PARTITIONS", "TALLY_MAX_EVENT_BYTES", "TALLY_REDIS_URL"):
        assert name in text
    assert len(caught.value.problems) == 4


def test_cross_field_rules() -> None:
    with pytest.raises(SettingsError, match="max_event_bytes must not exceed max_message_bytes"):
        load_settings(max_event_bytes=2_000_000, max_message_bytes=1_000_000)


def test_passwords_never_printed() -> None:
    assert mask_url("postgresql://tally:s3cret@db:5432/tally") == "postgresql://tally:***@db:5432/tally"
    settings = load_settings(postgres_url="postgresql://tally:s3cret@db:5432/tally")
    assert "s3cret" not in str(settings.redacted())


def test_config_check_command_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TALLY_PARTITIONS": "zero",
        "TALLY_KAFKA_URL": "nope://",
        "TALLY_DATA_DIR": str(tmp_path),
    }
    tally = str(Path(sys.executable).with_name("tally"))
    result = subprocess.run(
        [tally, "config", "--check"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "TALLY_PARTITIONS" in result.stderr
    assert "TALLY_KAFKA_URL" in result.stderr


def test_window_and_price_book_rules_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            window_size="PT7S",  # does not divide a day
            window_grace="-PT1S",
            window_idle_close="PT0S",
            price_books_dir=tmp_path,  # no default.yaml there
        )
    text = str(caught.value)
    for problem in (
        "window_size must divide a day",
        "window_grace must be a whole number of seconds, not negative",
        "window_idle_close must be at least 1 second",
        "default_price_book: no file default.yaml",
    ):
        assert problem in text
    assert load_settings(window_size="PT300S", window_grace="PT30S").window_size.seconds == 300
