"""The pieces of tools/reproduce.py: plan (what is trained), runs (training them), scoring (samples and metrics),
figures and report."""
