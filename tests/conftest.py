"""Test-suite wide plugins: the local provider testbed's fixtures (docs/testbed.md)."""

pytest_plugins = ["tests.testbed.plugin"]
