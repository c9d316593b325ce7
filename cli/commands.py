"""Imports every sub-command module so that it registers itself on the group."""

from f2m_ray_cli import cmd_model, cmd_phantoms  # noqa: F401
