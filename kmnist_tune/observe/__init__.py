"""Observation: trial events and their listeners (progress lines, W&B runs, dashboard notes), the
report, plots and the dashboard launcher. Never imports torch.
"""
