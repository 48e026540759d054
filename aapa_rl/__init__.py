"""aapa-rl: Adversarially Anchored Preference Alignment for OpenRLHF."""

__version__ = "0.1.0"
