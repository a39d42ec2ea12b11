"""Database passwords from credentials files (systemd LoadCredential=, Docker secrets), never the environment."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from etl import config as config_mod

PASSWORDS = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
)


def load(tmp: Path, files: dict[str, str], **env: str) -> config_mod.Config:
    creds = tmp / "creds"
    creds.mkdir(exist_ok=True)
    for name, value in files.items():
        (creds / name).write_text(value, encoding="utf-8")
    return config_mod.load({"CREDENTIALS_DIRECTORY": str(creds), **env}, None)


@given(password=PASSWORDS)
def test_the_database_password_comes_from_the_credentials_folder(
    tmp_path_factory: object, password: str
) -> None:
    tmp = tmp_path_factory.mktemp("c")  # type: ignore[attr-defined]
    cfg = load(
        tmp,
        {"database_password": password + "\n"},
        ETL_DATABASE_URL="postgresql://etl_svc@db.internal:5432/etl",
    )
    url = make_url(cfg.database_url)
    assert (url.username, url.password, url.host, url.database) == ("etl_svc", password, "db.internal", "etl")
    assert cfg.warehouse_url == cfg.database_url and not cfg.separate_warehouse
    assert config_mod.mask_url(cfg.database_url) == "postgresql://etl_svc:***@db.internal:5432/etl"
    # Both the decoded password and the URL's quoted form of it are redacted from logs.
    assert set(config_mod.url_passwords(cfg)) == {password, quote(password, safe="")}


def test_a_separate_warehouse_takes_its_own_password_and_a_url_password_wins(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {"database_password": "q", "warehouse_password": "w"},
        ETL_DATABASE_URL="postgresql://a:inline@db/etl",
        ETL_WAREHOUSE_URL="postgres://b@wh/analytics",
    )
    assert make_url(cfg.database_url).password == "inline"
    assert make_url(cfg.warehouse_url).password == "w"


def test_no_credentials_file_leaves_the_url_alone_and_sqlite_never_takes_one(tmp_path: Path) -> None:
    assert (
        load(tmp_path, {}, ETL_DATABASE_URL="postgresql://a@db/etl").database_url == "postgresql://a@db/etl"
    )
    sqlite = f"sqlite:///{tmp_path / 'x.db'}"
    assert load(tmp_path, {"database_password": "p"}, ETL_DATABASE_URL=sqlite).database_url == sqlite
