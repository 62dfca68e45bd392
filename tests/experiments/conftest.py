"""Fixtures of this folder: the team's MLflow server (PostgreSQL + S3), see ``tests/team_server.py``."""

from tests.team_server import team_server, use_server  # noqa: F401  (re-exported fixtures)
