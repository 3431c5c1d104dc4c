"""Which config file the kernel uses when it starts: the discovery chain.

In order, the first that applies wins:

1. ``--config FILE`` on the command line (an error if it cannot be read);
2. ``$KERNEL_CONFIG`` (an error if it names a file that cannot be read);
3. ``$XDG_CONFIG_HOME/open-autoglm-kernel/config.toml`` (``~/.config/...`` when the variable is
   unset or empty), if the file exists;
4. ``/etc/open-autoglm-kernel/config.toml``, if the file exists;
5. the embedded demo config (``kernel/default_config.toml``), with a warning that names every
   place looked at.

An explicit choice (1, 2) that is missing is an error rather than a silent fall-through: a typo
in a unit file must not start the demo tasks on a production box. Pure apart from ``exists()``
checks; the environment, the home directory and the system directory are parameters so tests
never touch the real ``/etc``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

APP = "open-autoglm-kernel"
"""The directory name under ``$XDG_CONFIG_HOME`` and ``/etc`` (also the data dir's name)."""
CONFIG_NAME = "config.toml"
ENV_VAR = "KERNEL_CONFIG"
SYSTEM_DIR = Path("/etc")


@dataclass(frozen=True)
class Discovered:
    """The outcome: ``path`` (None for the embedded demo), how it was chosen, where we looked."""

    path: Path | None
    origin: str
    looked: tuple[str, ...]

    @property
    def is_demo(self) -> bool:
        return self.path is None

    def describe(self) -> str:
        """One line for the start-up banner and ``validate``: the file and why it was chosen."""
        if self.path is None:
            return "the embedded demo config (no config file found)"
        return f"{self.path} (from {self.origin})"

    def demo_warning(self) -> str:
        return ("no config file found (looked at: " + "; ".join(self.looked) + "); running the "
                "embedded demo config (a heartbeat every 5 s, `uptime` every 10 s). Create one "
                f"of those files, set ${ENV_VAR} or pass --config FILE.")


def user_config_path(env: Mapping[str, str], home: Path | None = None) -> Path:
    """``$XDG_CONFIG_HOME/<app>/config.toml``; per the XDG spec an empty or relative value is
    ignored and ``~/.config`` is used."""
    xdg = env.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else (home or Path.home()) / ".config"
    return base / APP / CONFIG_NAME


def system_config_path(system_dir: Path | None = None) -> Path:
    return (system_dir or SYSTEM_DIR) / APP / CONFIG_NAME


def discover(explicit: Path | None = None, *, env: Mapping[str, str] | None = None,
             home: Path | None = None, system_dir: Path | None = None) -> Discovered:
    """Apply the chain; see the module docstring."""
    env = os.environ if env is None else env
    if explicit is not None:
        return Discovered(explicit, "--config", ("--config",))
    looked: list[str] = []
    if value := env.get(ENV_VAR, ""):
        return Discovered(Path(value).expanduser(), f"${ENV_VAR}", (f"${ENV_VAR}",))
    looked.append(f"${ENV_VAR} (unset)")
    user = user_config_path(env, home)
    if user.is_file():
        xdg = env.get("XDG_CONFIG_HOME", "")
        origin = "$XDG_CONFIG_HOME" if xdg and os.path.isabs(xdg) else "~/.config"
        return Discovered(user, origin, (*looked, str(user)))
    looked.append(f"{user} (missing)")
    system = system_config_path(system_dir)
    if system.is_file():
        return Discovered(system, str(system.parent), (*looked, str(system)))
    looked.append(f"{system} (missing)")
    return Discovered(None, "embedded demo", tuple(looked))
