"""Observation: stepping vCPUs, and the checks run on what was observed."""
