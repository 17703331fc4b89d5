"""Training loops for the parts of a method that learn (trajectory.py: the trajectory branch)."""
