"""``mailgate settings-link USER_EMAIL --subaccount S``: print a sign-in link to the settings page.

Thin: resolve the user and sub-account, mint an expiring signed token
(``gateway.http.signin``), print ``{http.public_url}/settings/login?token=…``
(``--json``: ``{"url", "expires_in_seconds"}``). Registered in
``gateway/cli.py`` as ``main.add_command(settings_link_command)``.
"""

from __future__ import annotations

from typing import Any

import click

from gateway.cli_common import cli_settings, common_options, emit, fail, run_db
from gateway.http.signin import SettingsDisabled, SignIn, login_url, session_secret
from storage.repos.directory import resolve_subaccount
from storage.repos.mailboxes import member_user_id


@click.command("settings-link")
@click.argument("user_email")
@click.option("--subaccount", required=True, help="Sub-account id or name.")
@common_options
def settings_link_command(
    user_email: str, subaccount: str, config: str | None, json_mode: bool
) -> None:
    """Print a sign-in link to the user's "Email (2-way sync)" settings page."""
    settings = cli_settings(config, json_mode)
    try:
        session_secret(settings)
    except SettingsDisabled as exc:
        fail(json_mode, "settings_disabled", str(exc))

    def find(session: Any) -> tuple[int, int]:
        sub_id = resolve_subaccount(session, subaccount)
        return int(member_user_id(session, user_email, sub_id)), int(sub_id)

    user_id, sub_id = run_db(settings, json_mode, find)
    url = login_url(settings, SignIn(user_id=user_id, subaccount_id=sub_id))
    ttl = settings.http.login_link_ttl_seconds
    emit(json_mode, {"url": url, "expires_in_seconds": ttl}, url)
