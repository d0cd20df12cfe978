"""Top-level pytest configuration: load the cr3rig plugin when it is not installed."""

import importlib.metadata

if not any(ep.value == "rig.pytestplugin.plugin" for ep in importlib.metadata.entry_points(group="pytest11")):
    pytest_plugins = ["rig.pytestplugin.plugin"]
