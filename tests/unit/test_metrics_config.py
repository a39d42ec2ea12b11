"""[metrics] listen: the address `etl run` serves its page on, its environment override, its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etl import config
from etl.errors import ConfigError
from tests.conftest import run_etl

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "etl.toml"
HOSTS = st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "::1", "::", "10.1.2.3", "metrics.internal"])


def test_the_shipped_config_serves_on_loopback_9464_and_off_turns_it_off() -> None:
    assert config.load({}, SHIPPED).metrics.address == ("127.0.0.1", 9464)
    assert config.load({"ETL_METRICS_LISTEN": "off"}, SHIPPED).metrics.address is None
    assert config.load({"ETL_METRICS_LISTEN": "OFF"}, SHIPPED).metrics.address is None


@given(host=HOSTS, port=st.integers(0, 65535))
def test_any_host_and_port_round_trips(host: str, port: int) -> None:
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert config.listen_address(text) == (host, port)
    assert config.load({"ETL_METRICS_LISTEN": text}, SHIPPED).metrics.listen == text


@given(
    text=st.one_of(
        st.sampled_from(["9464", ":9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536"]),
        st.text(st.characters(blacklist_characters=":"), max_size=20).filter(
            lambda t: t.strip().lower() not in ("off", "")
        ),
    )
)
def test_a_bad_address_is_one_named_config_problem(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load({"ETL_METRICS_LISTEN": text}, SHIPPED)
    assert "ETL_METRICS_LISTEN" in str(err.value) and "HOST:PORT" in str(err.value)


def test_a_bad_address_in_the_file_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "etl.toml"
    path.write_text(SHIPPED.read_text().replace('listen = "127.0.0.1:9464"', 'listen = "9464"\nport = 1'))
    with pytest.raises(ConfigError) as err:
        config.load({}, path)
    assert "metrics.listen: '9464' is not HOST:PORT" in str(err.value)
    assert "unknown setting metrics.port" in str(err.value)


def test_etl_metrics_with_a_bad_address_exits_78_naming_it(tmp_path: Path) -> None:
    env = {"ETL_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "ETL_METRICS_LISTEN": "nowhere"}
    proc = run_etl(["metrics"], env)
    assert proc.returncode == 78
    assert "ETL_METRICS_LISTEN: 'nowhere' is not HOST:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr
