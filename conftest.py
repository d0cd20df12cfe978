"""Top-level pytest configuration: load the cr3rig plugins that are not installed."""

import importlib.metadata

_PLUGINS = ("rig.pytestplugin.plugin", "rig.pytestplugin.caseoptions")
_installed = {ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
pytest_plugins = [p for p in _PLUGINS if p not in _installed]
