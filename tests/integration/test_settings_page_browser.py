"""The "Email (2-way sync)" page in a real headless browser (Debian chromium + chromedriver).

Sign in with the link `mailgate settings-link` prints, choose Gmail, click
Connect, pass the testbed's consent page, land back on /settings/email
showing "connected" and the provider-vouched address, then Disconnect
(R19, R21). Selenium drives /usr/bin/chromium through /usr/bin/chromedriver;
Selenium Manager is never asked to download anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from gateway.cli_settings import settings_link_command
from gateway.http.pages import STATE_NOT_CONNECTED
from ingest.types import MailboxState
from tests.integration.http_gateway import Gateway, start_gateway
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DEBIAN_PACKAGES = {CHROMIUM: "chromium", CHROMEDRIVER: "chromium-driver"}
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "settings-email.png"
WAIT_SECONDS = 15
WINDOW = (760, 760)


@pytest.fixture
def gw(tmp_path: Path, oauth_provider: OAuthProvider) -> Iterator[Gateway]:
    with start_gateway(tmp_path, oauth_provider) as gateway:
        yield gateway


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    missing = [pkg for path, pkg in DEBIAN_PACKAGES.items() if not path.exists()]
    if missing:
        pytest.fail(
            f"headless browser missing: apt-get install {' '.join(missing)} (Debian packages)",
            pytrace=False,
        )
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download anything
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def settings_link(gw: Gateway, tmp_path: Path) -> str:
    """Run `mailgate settings-link` against the gateway's database; return the printed URL."""
    config = tmp_path / "mailgate.toml"
    secret = gw.settings.http.session_secret
    assert secret is not None
    config.write_text(
        "[storage]\n"
        f'database_url = "{gw.settings.storage.database_url}"\n'
        f'data_dir = "{tmp_path / "cli-data"}"\n'
        "[http]\n"
        f'public_url = "{gw.url}"\n'
        f'session_secret = "{secret.get_secret_value()}"\n',
        encoding="utf-8",
    )
    args = [gw.seeded.user_email, "--subaccount", "acme", "-c", str(config), "--json"]
    result = CliRunner().invoke(settings_link_command, args)
    assert result.exit_code == 0, result.output
    url = str(json.loads(result.output)["url"])
    assert url.startswith(gw.url + "/settings/login?token=")
    return url


def state_text(driver: webdriver.Chrome) -> str:
    return str(driver.find_element(By.ID, "mailbox-state").text)


def wait_for_state(driver: webdriver.Chrome, wanted: str) -> None:
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: d.find_elements(By.ID, "mailbox-state") and state_text(d) == wanted,
        f"#mailbox-state never showed {wanted!r}",
    )


def pass_consent(driver: webdriver.Chrome, address: str) -> None:
    """On the testbed consent page: fill the account field if empty, click Allow."""
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.find_elements(By.ID, "allow"))
    login = driver.find_element(By.ID, "login")
    if not login.get_attribute("value"):
        login.send_keys(address)
    driver.find_element(By.ID, "allow").click()


def test_r19_r21_connect_and_disconnect_in_a_real_browser(
    gw: Gateway, browser: webdriver.Chrome, gmail_user: TestbedUser, tmp_path: Path
) -> None:
    browser.get(settings_link(gw, tmp_path))
    wait_for_state(browser, STATE_NOT_CONNECTED)
    assert browser.current_url == gw.url + "/settings/email"
    bcc = browser.find_element(By.ID, "bcc-address").get_attribute("value") or ""
    assert bcc.endswith("@" + gw.settings.bcc.domain)
    browser.find_element(By.ID, "copy-bcc").click()
    WebDriverWait(browser, WAIT_SECONDS).until(lambda d: d.find_element(By.ID, "copy-status").text)

    browser.find_element(By.ID, "provider-gmail").click()
    browser.find_element(By.ID, "connect").click()
    pass_consent(browser, gmail_user.address)

    wait_for_state(browser, MailboxState.CONNECTED.value)
    assert browser.current_url == gw.url + "/settings/email"
    assert browser.find_element(By.ID, "mailbox-address").text == gmail_user.address
    assert browser.find_element(By.ID, "mailbox-provider").text == "Gmail"
    assert gmail_user.address in browser.find_element(By.ID, "flash").text
    assert browser.find_element(By.ID, "update").is_displayed()
    shot = browser.get_screenshot_as_png()
    (tmp_path / "settings-email-connected.png").write_bytes(shot)
    if os.environ.get("MAILGATE_UPDATE_SCREENSHOTS") == "1":  # refresh docs/img on request
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        DOCS_SCREENSHOT.write_bytes(shot)

    browser.find_element(By.ID, "disconnect").click()
    wait_for_state(browser, MailboxState.DISCONNECTED.value)
    assert browser.find_element(By.ID, "mailbox-address").text == gmail_user.address
    assert browser.find_element(By.ID, "connect").is_displayed()
    browser.get_screenshot_as_file(str(tmp_path / "settings-email-disconnected.png"))
