"""The cr3rig pytest plugin."""
