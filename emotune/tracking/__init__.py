"""The tracking wing: the MLflow store every layer records to, the UI, and the team server.

Only this wing talks to MLflow. ``emotune ui`` and ``emotune server`` are its commands.
"""
