"""Redaction of credentials in every URL form READAR meets: userinfo passwords with any characters, secret
query parameters, rediss:// and amqps:// forms; in a URL alone and inside free text. Property-based over
generated URLs, plus the forms the hostile-input pass found leaking."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from storage.redact import MASK, SECRET_PARAMETERS, redact_text, redact_url
from storage.settings import Settings

SCHEMES = ["postgresql+psycopg", "postgresql", "redis", "rediss", "amqp", "amqps", "s3", "http"]
# A password may hold anything a user can type into an environment variable, URL delimiters included.
PASSWORD_ALPHABET = string.ascii_letters + string.digits + "@:/?#[]!$&'()*+,;=%-._~^{}|\\\"<> "
USER_ALPHABET = string.ascii_letters + string.digits + "-._"
HOST_ALPHABET = string.ascii_lowercase + string.digits + "-."

passwords = st.text(PASSWORD_ALPHABET, min_size=4, max_size=30).map(lambda p: f"Zq{p}")  # Zq: never in hosts
users = st.text(USER_ALPHABET, max_size=12)
hosts = st.text(HOST_ALPHABET, min_size=1, max_size=20)
paths = st.text(string.ascii_letters + string.digits + "/_-", max_size=15)


@settings(max_examples=400, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), user=users, password=passwords, host=hosts, port=st.integers(1, 65535),
       path=paths)
def test_userinfo_password_is_hidden_whatever_it_contains(scheme: str, user: str, password: str, host: str,
                                                          port: int, path: str) -> None:
    url = f"{scheme}://{user}:{password}@{host}:{port}/{path}"
    assert redact_url(url) == f"{scheme}://{user}:{MASK}@{host}:{port}/{path}"


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), host=hosts, name=st.sampled_from(SECRET_PARAMETERS),
       upper=st.booleans(), secret=st.text(string.ascii_letters + string.digits + "!$'()*+,:/?@-._~", min_size=1,
                                           max_size=30).map(lambda s: f"Zq{s}"),
       before=st.booleans())
def test_secret_query_parameters_are_hidden(scheme: str, host: str, name: str, upper: bool, secret: str,
                                            before: bool) -> None:
    name = name.upper() if upper else name
    other = "sslmode=require"
    query = f"{other}&{name}={secret}" if before else f"{name}={secret}&{other}"
    url = f"{scheme}://{host}:5432/db?{query}"
    redacted = redact_url(url)
    assert secret not in redacted
    if "@" not in secret:  # an "@" makes what precedes it count as userinfo: hidden too, by design
        assert f"{name}={MASK}" in redacted and other in redacted


@settings(max_examples=300, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), user=users,
       password=st.text(PASSWORD_ALPHABET.replace(" ", ""), min_size=4, max_size=30).map(lambda p: f"Zq{p}"),
       host=hosts, prefix=st.text(string.ascii_letters + " :", max_size=20))
def test_urls_inside_free_text_are_redacted(scheme: str, user: str, password: str, host: str, prefix: str) -> None:
    text = f"{prefix} could not connect to {scheme}://{user}:{password}@{host}/db (refused)"
    redacted = redact_text(text)
    assert password not in redacted
    assert redacted.endswith(f"{scheme}://{user}:{MASK}@{host}/db (refused)")


def test_forms_found_leaking() -> None:
    # A raw "@" in a password used to leave its second half in the clear.
    assert redact_url("postgresql://postgres:ret@ret@db:5432/x") == f"postgresql://postgres:{MASK}@db:5432/x"
    assert redact_url("redis://127.0.0.1:6379/0?password=hunter2") == f"redis://127.0.0.1:6379/0?password={MASK}"
    assert redact_url("rediss://:hunter2@cache:6380/0") == f"rediss://:{MASK}@cache:6380/0"
    assert redact_url("postgresql+psycopg://u@db/x?sslpassword=k3y&sslmode=verify-full") == \
        f"postgresql+psycopg://u@db/x?sslpassword={MASK}&sslmode=verify-full"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"  # nothing to hide: unchanged
    assert redact_url(None) is None
    assert redact_text("key ABCDEF used", ["ABCDEF"]) == f"key {MASK} used"


def test_stored_and_printed_settings_hide_query_passwords() -> None:
    public = Settings(database_url="postgresql+psycopg://u@db/x?password=hunter2",
                      broker_url="rediss://:hunter3@cache:6380/0").public()
    assert "hunter2" not in str(public) and "hunter3" not in str(public)
    with pytest.raises(ValidationError, match="put the broker's password in the URL before the host"):
        Settings(broker_url="redis://cache:6379/0?password=hunter4")  # kombu cannot take it there
