"""Tools built on the rig: the mutant runner, the container matrix."""
