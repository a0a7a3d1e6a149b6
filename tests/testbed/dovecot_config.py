"""Render the configuration files of one test Dovecot instance.

Pure text generation, following the verified config of
/work/shared/notes/testbed.md §1.2 and the SPECIAL-USE layouts of §1.6. Must
not start processes or touch the network; :mod:`tests.testbed.dovecot` writes
these files and runs the server.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

#: Folder name → SPECIAL-USE attribute (RFC 6154) of each provider-like layout.
GMAIL_LAYOUT: tuple[tuple[str, str], ...] = (
    ("[Gmail]/All Mail", "\\All"),
    ("[Gmail]/Sent Mail", "\\Sent"),
    ("[Gmail]/Drafts", "\\Drafts"),
    ("[Gmail]/Trash", "\\Trash"),
    ("[Gmail]/Spam", "\\Junk"),
)
OUTLOOK_LAYOUT: tuple[tuple[str, str], ...] = (
    ("Sent Items", "\\Sent"),
    ("Deleted Items", "\\Trash"),
    ("Junk Email", "\\Junk"),
    ("Drafts", "\\Drafts"),
    ("Archive", "\\Archive"),
)
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "gmail": GMAIL_LAYOUT,
    "outlook": OUTLOOK_LAYOUT,
}
#: uid/gid that owns the mail files when Dovecot runs as root (``nobody``).
ROOT_MAIL_UID = 65534


@dataclass(frozen=True, slots=True, kw_only=True)
class DovecotPorts:
    """Loopback TCP ports of one instance.

    Attributes:
        imap: plain IMAP with STARTTLS (RFC 9051 §6.2.1).
        imaps: implicit TLS IMAP (RFC 8314).
        lmtp: LMTP (RFC 2033), plain.
    """

    imap: int
    imaps: int
    lmtp: int


def mail_owner() -> tuple[int, int]:
    """Return the (uid, gid) mail files belong to: nobody as root, else ourselves."""
    if os.geteuid() == 0:
        return ROOT_MAIL_UID, ROOT_MAIL_UID
    return os.getuid(), os.getgid()


def render_oauth2_ext(key_dir: Path) -> str:
    """Return ``oauth2.conf.ext`` for local HS256 JWT validation (testbed.md §1.2).

    Args:
        key_dir: holds ``default/HS256/<kid>`` files (see tests.testbed.tokens).
    """
    return (
        "introspection_mode = local\n"
        f"local_validation_key_dict = fs:posix:prefix={key_dir}/\n"
        "username_attribute = sub\n"
    )


def render_config(root: Path, ports: DovecotPorts, name: str) -> str:
    """Return ``dovecot.conf`` for an instance living in ``root``.

    Args:
        root: the instance directory ($D of testbed.md), absolute.
        ports: where to listen, all on 127.0.0.1.
        name: unique instance name (``instance_name``).

    Returns:
        The whole config as text.
    """
    uid, gid = mail_owner()
    return "\n".join(
        (
            _global_settings(root, name, uid, gid),
            _auth_settings(root, uid, gid),
            _services(ports),
            _namespace(),
        )
    )


def _global_settings(root: Path, name: str, uid: int, gid: int) -> str:
    return f"""
base_dir = {root}/run
state_dir = {root}/state
instance_name = {name}
listen = 127.0.0.1
protocols = imap lmtp
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
auth_verbose = yes
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
disable_plaintext_auth = no
{_user_settings()}
first_valid_uid = {min(uid, 100)}
first_valid_gid = {min(gid, 100)}
mail_location = maildir:{root}/mail/%u/Maildir
mail_max_userip_connections = 2000
mailbox_list_index = yes
login_trusted_networks = 127.0.0.0/8
protocol lmtp {{
  postmaster_address = postmaster@example.test
}}
"""


def _user_settings() -> str:
    if os.geteuid() == 0:
        return (
            "default_login_user = dovenull\n"
            "default_internal_user = dovecot\n"
            "default_internal_group = dovecot"
        )
    user = pwd.getpwuid(os.getuid()).pw_name
    return (
        f"default_login_user = {user}\n"
        f"default_internal_user = {user}\n"
        f"default_internal_group = {user}"
    )


def _auth_settings(root: Path, uid: int, gid: int) -> str:
    # One passwd-file per user: Dovecot re-checks a passwd-file at most once a
    # second, so users added to one shared file could stay unknown that long.
    return f"""
auth_mechanisms = plain login xoauth2 oauthbearer
auth_username_format = %Lu
auth_cache_size = 0
auth_failure_delay = 0
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf.ext
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {root}/passwd.d/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd.d/%u
  default_fields = uid={uid} gid={gid} home={root}/mail/%u
}}
"""


def _services(ports: DovecotPorts) -> str:
    # Rootless Dovecot cannot chroot its login/anvil processes (testbed.md §1.1).
    chroot = "" if os.geteuid() == 0 else "  chroot =\n"
    return f"""
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {ports.imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ports.imaps}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 1
  client_limit = 4000
  process_limit = 4
{chroot}}}
service imap {{
  process_limit = 4096
  client_limit = 1
}}
service stats {{
  client_limit = 10000
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {ports.lmtp}
  }}
}}
service anvil {{
  client_limit = 8000
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
{chroot}}}
service auth {{
  client_limit = 10000
}}
"""


def _namespace() -> str:
    boxes = [
        f'  mailbox "{folder}" {{\n    auto = no\n    special_use = {flag}\n  }}\n'
        for layout in LAYOUTS.values()
        for folder, flag in layout
    ]
    return "namespace inbox {\n  inbox = yes\n  separator = /\n" + "".join(boxes) + "}\n"
